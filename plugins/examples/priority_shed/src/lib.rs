//! Shed low-priority publishes first while the broker signals pressure.
//!
//! Pressure is a confirm latency above `confirm_latency_ms`, a nack rate above `nack_rate`, or
//! a polled queue deeper than its limit in `queues`; then messages with a priority below
//! `shed_below` are shed. While the broker blocks publishers outright (memory or disk alarm),
//! the bar rises to `shed_below_when_blocked`. Critical traffic (routing keys or Celery task
//! names matching `critical`) is never shed. Without pressure everything passes.
//!
//! ```json
//! {
//!   "shed_below": 5,
//!   "shed_below_when_blocked": 9,
//!   "default_priority": 0,
//!   "critical": ["auth.*", "payments.*"],
//!   "confirm_latency_ms": 250,
//!   "nack_rate": 0.05,
//!   "queues": { "celery": 100000 }
//! }
//! ```
//! All fields are optional (defaults as above, no queue limits). The priority is the message's
//! `priority` property, else `default_priority`. Counters: `shed_pressure`, `shed_blocked`.

use serde::Deserialize;
use sluice_policy_sdk::{export_policy, glob_match, parse_config, Host, Message, Policy, Verdict};
use std::collections::BTreeMap;

/// The policy and its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityShed {
    shed_below: u8,
    shed_below_when_blocked: u8,
    default_priority: u8,
    critical: Vec<String>,
    confirm_latency_ms: f64,
    nack_rate: f64,
    queues: BTreeMap<String, u64>,
}

impl Default for PriorityShed {
    fn default() -> Self {
        Self {
            shed_below: 5,
            shed_below_when_blocked: 9,
            default_priority: 0,
            critical: Vec::new(),
            confirm_latency_ms: 250.0,
            nack_rate: 0.05,
            queues: BTreeMap::new(),
        }
    }
}

/// How hard the broker is pushing back.
#[derive(Debug, Clone, PartialEq)]
enum Pressure {
    None,
    /// Slow confirms, nacks or a deep queue: the reason.
    High(String),
    /// The broker blocks publishers.
    Blocked,
}

impl PriorityShed {
    fn pressure(&self, host: &dyn Host) -> Pressure {
        let s = host.signals();
        if s.upstream_blocked {
            return Pressure::Blocked;
        }
        if s.confirm_latency_ms > self.confirm_latency_ms {
            return Pressure::High(format!("confirm latency {:.0}ms", s.confirm_latency_ms));
        }
        if s.nack_rate > self.nack_rate {
            return Pressure::High(format!("nack rate {:.1}%", s.nack_rate * 100.0));
        }
        for (queue, max) in &self.queues {
            if let Some(depth) = host.queue_depth(queue) {
                if depth > *max {
                    return Pressure::High(format!("queue {queue} at {depth} messages"));
                }
            }
        }
        Pressure::None
    }

    fn is_critical(&self, msg: &dyn Message) -> bool {
        if self.critical.is_empty() {
            return false;
        }
        let key = msg.routing_key();
        let task = msg.header("task");
        self.critical
            .iter()
            .any(|p| glob_match(p, &key) || task.as_deref().is_some_and(|t| glob_match(p, t)))
    }
}

impl Policy for PriorityShed {
    fn init(config: &str) -> Result<Self, String> {
        parse_config(config)
    }

    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
        let pressure = self.pressure(host);
        let (bar, why, counter) = match &pressure {
            Pressure::None => return Verdict::Forward,
            Pressure::High(why) => (self.shed_below, why.as_str(), "shed_pressure"),
            Pressure::Blocked => (
                self.shed_below_when_blocked,
                "upstream blocked",
                "shed_blocked",
            ),
        };
        let priority = msg.priority().unwrap_or(self.default_priority);
        if priority >= bar || self.is_critical(msg) {
            return Verdict::Forward;
        }
        host.incr(counter, 1);
        Verdict::shed(format!(
            "broker under pressure ({why}): priority {priority} below {bar}"
        ))
    }
}

export_policy!(PriorityShed);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy_sdk::testing::{FakeHost, FakeMessage};
    use sluice_policy_sdk::BrokerSignals;

    fn msg(priority: u8) -> FakeMessage {
        FakeMessage::new()
            .routing_key("celery")
            .property("priority", &priority.to_string())
    }

    fn policy(config: &str) -> PriorityShed {
        PriorityShed::init(config).unwrap()
    }

    #[test]
    fn without_pressure_everything_passes() {
        let p = policy("");
        let host = FakeHost::new();
        assert!((0..=9).all(|pr| p.evaluate(&msg(pr), &host).is_forward()));
    }

    #[test]
    fn slow_confirms_shed_below_the_bar() {
        let p = policy("");
        let host = FakeHost::new();
        host.set_signals(BrokerSignals {
            confirm_latency_ms: 400.0,
            ..Default::default()
        });
        assert!(!p.evaluate(&msg(4), &host).is_forward());
        assert!(p.evaluate(&msg(5), &host).is_forward());
        match p.evaluate(&FakeMessage::new(), &host) {
            Verdict::Shed(r) => assert!(r.contains("confirm latency 400ms"), "{r}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(host.counter("shed_pressure"), 2);
    }

    #[test]
    fn blocked_raises_the_bar_but_critical_always_passes() {
        let p = policy(r#"{"critical": ["auth.*"]}"#);
        let host = FakeHost::new();
        host.set_signals(BrokerSignals {
            upstream_blocked: true,
            blocked_connections: 1,
            ..Default::default()
        });
        assert!(!p.evaluate(&msg(8), &host).is_forward());
        assert!(p.evaluate(&msg(9), &host).is_forward());
        let login = FakeMessage::celery("auth.login");
        assert!(p.evaluate(&login, &host).is_forward());
        let by_key = FakeMessage::new().routing_key("auth.events");
        assert!(p.evaluate(&by_key, &host).is_forward());
        assert_eq!(host.counter("shed_blocked"), 1);
    }

    #[test]
    fn deep_queue_and_nacks_are_pressure() {
        let p = policy(r#"{"queues": {"celery": 1000}}"#);
        let host = FakeHost::new();
        host.set_queue_depth("celery", 999);
        assert!(p.evaluate(&msg(0), &host).is_forward());
        host.set_queue_depth("celery", 5000);
        assert!(!p.evaluate(&msg(0), &host).is_forward());
        host.set_queue_depth("celery", 0);
        host.set_signals(BrokerSignals {
            nack_rate: 0.2,
            ..Default::default()
        });
        assert!(!p.evaluate(&msg(0), &host).is_forward());
    }

    #[test]
    fn default_priority_applies_without_the_property() {
        let p = policy(r#"{"default_priority": 5}"#);
        let host = FakeHost::new();
        host.set_signals(BrokerSignals {
            confirm_latency_ms: 1000.0,
            ..Default::default()
        });
        assert!(p.evaluate(&FakeMessage::new(), &host).is_forward());
    }
}
