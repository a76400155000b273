//! Divert to an overflow queue above a rate.
//!
//! Messages within `rate` (per routing key by default) pass. Above it they are diverted to
//! `exchange` with routing key `prefix` + the original routing key, e.g. `overflow.celery`,
//! a queue meant to page to disk (lazy / classic v2 / stream). The overflow has its own
//! `overflow_rate`; past it the flood gets `on_overflow_full` (a delay by default), so a
//! diverted flood cannot fill the broker either.
//!
//! ```json
//! {
//!   "rate": "500/s burst 1000",
//!   "key": "routing_key",
//!   "exchange": "",
//!   "prefix": "overflow.",
//!   "overflow_rate": "2000/s",
//!   "on_overflow_full": { "delay_ms": 200 }
//! }
//! ```
//! `rate` is required. `key` is `"routing_key"` (default), `"producer"` or
//! `"producer_routing_key"`. Messages already routed to the overflow pass untouched.
//! Counters: `diverted`, `overflow_full`.

use serde::Deserialize;
use sluice_policy_sdk::{
    export_policy, parse_config, Action, Host, Limit, Message, Policy, Verdict,
};

/// What a rate is counted per.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    /// Per routing key (per queue on the default exchange).
    #[default]
    RoutingKey,
    /// Per producer.
    Producer,
    /// Per producer and routing key.
    ProducerRoutingKey,
}

fn default_prefix() -> String {
    "overflow.".into()
}

fn default_full() -> Action {
    Action::DelayMs(200)
}

/// The policy and its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverflowDivert {
    rate: Limit,
    #[serde(default)]
    key: Key,
    #[serde(default)]
    exchange: String,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default)]
    overflow_rate: Option<Limit>,
    #[serde(default = "default_full")]
    on_overflow_full: Action,
}

impl Policy for OverflowDivert {
    fn init(config: &str) -> Result<Self, String> {
        let p: Self = parse_config(config)?;
        if p.prefix.is_empty() {
            return Err(
                "prefix must not be empty: diverting to the same routing key would loop".into(),
            );
        }
        Ok(p)
    }

    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
        let routing_key = msg.routing_key();
        if routing_key.starts_with(&self.prefix) {
            return Verdict::Forward;
        }
        let granted = match self.key {
            Key::RoutingKey => host.try_acquire(&routing_key, self.rate),
            Key::Producer => host.try_acquire(&msg.producer(), self.rate),
            Key::ProducerRoutingKey => {
                host.try_acquire(&format!("{}\u{1f}{routing_key}", msg.producer()), self.rate)
            }
        };
        if granted {
            return Verdict::Forward;
        }
        let target = format!("{}{routing_key}", self.prefix);
        if let Some(limit) = self.overflow_rate {
            if !host.try_acquire(&format!("\u{1f}overflow\u{1f}{target}"), limit) {
                host.incr("overflow_full", 1);
                return self
                    .on_overflow_full
                    .verdict(|| format!("overflow {target} is over its rate of {limit}"));
            }
        }
        host.incr("diverted", 1);
        Verdict::divert(self.exchange.clone(), target)
    }
}

export_policy!(OverflowDivert);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy_sdk::testing::{FakeHost, FakeMessage};
    use std::time::Duration;

    fn policy(config: &str) -> OverflowDivert {
        OverflowDivert::init(config).unwrap()
    }

    #[test]
    fn above_the_rate_diverts_to_prefixed_routing_key() {
        let p = policy(r#"{"rate": "3/s"}"#);
        let host = FakeHost::new();
        let msg = FakeMessage::celery("t");
        let verdicts: Vec<Verdict> = (0..5).map(|_| p.evaluate(&msg, &host)).collect();
        assert_eq!(
            verdicts[..3],
            [Verdict::Forward, Verdict::Forward, Verdict::Forward]
        );
        assert_eq!(verdicts[3], Verdict::divert("", "overflow.celery"));
        assert_eq!(host.counter("diverted"), 2);
        host.advance(Duration::from_secs(1));
        assert!(p.evaluate(&msg, &host).is_forward());
    }

    #[test]
    fn overflow_has_its_own_rate_then_delays() {
        let p = policy(r#"{"rate": "1/s", "overflow_rate": "2/s", "exchange": "spill"}"#);
        let host = FakeHost::new();
        let msg = FakeMessage::new().routing_key("orders");
        let verdicts: Vec<Verdict> = (0..5).map(|_| p.evaluate(&msg, &host)).collect();
        assert_eq!(verdicts[0], Verdict::Forward);
        assert_eq!(verdicts[1], Verdict::divert("spill", "overflow.orders"));
        assert_eq!(verdicts[2], Verdict::divert("spill", "overflow.orders"));
        assert_eq!(verdicts[3], Verdict::delay_ms(200));
        assert_eq!(host.counter("overflow_full"), 2);
    }

    #[test]
    fn rate_per_producer_when_configured() {
        let p = policy(r#"{"rate": "1/s", "key": "producer"}"#);
        let host = FakeHost::new();
        let a = FakeMessage::new().routing_key("q").producer("a");
        let b = FakeMessage::new().routing_key("q").producer("b");
        assert!(p.evaluate(&a, &host).is_forward());
        assert!(p.evaluate(&b, &host).is_forward());
        assert!(!p.evaluate(&a, &host).is_forward());
    }

    #[test]
    fn overflow_traffic_is_not_diverted_again() {
        let p = policy(r#"{"rate": "1/s"}"#);
        let host = FakeHost::new();
        let msg = FakeMessage::new().routing_key("overflow.celery");
        assert!((0..10).all(|_| p.evaluate(&msg, &host).is_forward()));
    }

    #[test]
    fn config_needs_a_rate_and_a_prefix() {
        assert!(OverflowDivert::init("{}").unwrap_err().contains("rate"));
        assert!(OverflowDivert::init(r#"{"rate": "1/s", "prefix": ""}"#).is_err());
    }
}
