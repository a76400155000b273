//! Adaptive per-producer limit: tightened while the broker struggles, relaxed as it recovers.
//!
//! Each producer (or routing key) gets `rate`, scaled by how the broker is doing:
//! - confirm latency at or under `target_latency_ms`: full rate;
//! - above it: `rate × target / latency`, but not below `rate × min_factor`;
//! - upstream blocked, or nack rate above `max_nack_rate`: `rate × min_factor`.
//!
//! The host smooths latency and nack rate, so the limit relaxes gradually as confirms speed up
//! again. Over the limit the message gets `on_exceed` (a short delay by default, which paces
//! the producer at the reduced rate).
//!
//! ```json
//! {
//!   "rate": "1000/s",
//!   "key": "producer",
//!   "target_latency_ms": 50,
//!   "min_factor": 0.1,
//!   "max_nack_rate": 0.01,
//!   "on_exceed": { "delay_ms": 100 }
//! }
//! ```
//! `rate` is required. `key` is `"producer"` (default) or `"routing_key"`.
//! Counters: `tightened` (messages evaluated under a reduced limit), `limited`.

use serde::Deserialize;
use sluice_policy_sdk::{
    export_policy, parse_config, Action, BrokerSignals, Host, Limit, Message, Policy, Verdict,
};

/// What the limit is per.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    /// Per producer.
    #[default]
    Producer,
    /// Per routing key.
    RoutingKey,
}

fn default_target() -> f64 {
    50.0
}
fn default_min_factor() -> f64 {
    0.1
}
fn default_max_nack_rate() -> f64 {
    0.01
}
fn default_on_exceed() -> Action {
    Action::DelayMs(100)
}

/// The policy and its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerPressure {
    rate: Limit,
    #[serde(default)]
    key: Key,
    #[serde(default = "default_target")]
    target_latency_ms: f64,
    #[serde(default = "default_min_factor")]
    min_factor: f64,
    #[serde(default = "default_max_nack_rate")]
    max_nack_rate: f64,
    #[serde(default = "default_on_exceed")]
    on_exceed: Action,
}

impl BrokerPressure {
    /// The fraction of `rate` allowed under these signals, in `[min_factor, 1]`.
    pub fn factor(&self, s: &BrokerSignals) -> f64 {
        if s.upstream_blocked || s.nack_rate > self.max_nack_rate {
            return self.min_factor;
        }
        if s.confirm_latency_ms <= self.target_latency_ms {
            return 1.0;
        }
        (self.target_latency_ms / s.confirm_latency_ms).clamp(self.min_factor, 1.0)
    }
}

impl Policy for BrokerPressure {
    fn init(config: &str) -> Result<Self, String> {
        let p: Self = parse_config(config)?;
        if !(p.min_factor > 0.0 && p.min_factor <= 1.0) {
            return Err(format!(
                "min_factor must be in (0, 1], got {}",
                p.min_factor
            ));
        }
        if p.target_latency_ms.is_nan() || p.target_latency_ms <= 0.0 {
            return Err("target_latency_ms must be positive".into());
        }
        Ok(p)
    }

    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
        let factor = self.factor(&host.signals());
        let limit = if factor < 1.0 {
            host.incr("tightened", 1);
            self.rate.scaled(factor)
        } else {
            self.rate
        };
        let key = match self.key {
            Key::Producer => msg.producer(),
            Key::RoutingKey => msg.routing_key(),
        };
        if host.try_acquire(&key, limit) {
            return Verdict::Forward;
        }
        host.incr("limited", 1);
        self.on_exceed.verdict(|| {
            format!("{key} over its adaptive limit of {limit} (broker at {factor:.2} of normal)")
        })
    }
}

export_policy!(BrokerPressure);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy_sdk::testing::{FakeHost, FakeMessage};
    use std::time::Duration;

    fn policy(config: &str) -> BrokerPressure {
        BrokerPressure::init(config).unwrap()
    }

    fn passed_in_one_second(p: &BrokerPressure, host: &FakeHost) -> usize {
        let msg = FakeMessage::new().producer("web");
        let mut n = 0;
        for _ in 0..100 {
            host.advance(Duration::from_millis(10));
            n += (0..10)
                .filter(|_| p.evaluate(&msg, host).is_forward())
                .count();
        }
        n
    }

    #[test]
    fn healthy_broker_gets_the_full_rate() {
        let p = policy(r#"{"rate": "100/s burst 1"}"#);
        let host = FakeHost::new();
        let n = passed_in_one_second(&p, &host);
        assert!((99..=101).contains(&n), "{n}");
        assert_eq!(host.counter("tightened"), 0);
    }

    #[test]
    fn slow_confirms_scale_the_rate_down_and_recovery_relaxes_it() {
        let p = policy(r#"{"rate": "100/s burst 1", "target_latency_ms": 50}"#);
        let host = FakeHost::new();
        host.set_signals(BrokerSignals {
            confirm_latency_ms: 200.0,
            ..Default::default()
        });
        let n = passed_in_one_second(&p, &host);
        assert!((24..=26).contains(&n), "{n}");
        host.set_signals(BrokerSignals {
            confirm_latency_ms: 40.0,
            ..Default::default()
        });
        let n = passed_in_one_second(&p, &host);
        assert!((99..=101).contains(&n), "{n}");
    }

    #[test]
    fn blocked_or_nacking_broker_gets_the_minimum() {
        let p = policy(r#"{"rate": "100/s burst 1", "min_factor": 0.1}"#);
        let host = FakeHost::new();
        host.set_signals(BrokerSignals {
            upstream_blocked: true,
            ..Default::default()
        });
        let n = passed_in_one_second(&p, &host);
        assert!((9..=11).contains(&n), "{n}");
        assert_eq!(
            p.factor(&BrokerSignals {
                nack_rate: 0.5,
                ..Default::default()
            }),
            0.1
        );
    }

    #[test]
    fn over_the_limit_delays_by_default() {
        let p = policy(r#"{"rate": "1/s"}"#);
        let host = FakeHost::new();
        let msg = FakeMessage::new().producer("web");
        assert!(p.evaluate(&msg, &host).is_forward());
        assert_eq!(p.evaluate(&msg, &host), Verdict::delay_ms(100));
        assert_eq!(host.counter("limited"), 1);
    }

    #[test]
    fn invalid_factors_are_rejected() {
        assert!(BrokerPressure::init(r#"{"rate": "1/s", "min_factor": 0}"#).is_err());
        assert!(BrokerPressure::init(r#"{"rate": "1/s", "target_latency_ms": -1}"#).is_err());
    }
}
