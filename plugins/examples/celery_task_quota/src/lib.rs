//! Per-Celery-task-name quotas.
//!
//! Celery (protocol 2) names the task in the `task` header. Each task name gets its own token
//! bucket, with the rate of the first `limits` pattern it matches, else `default`. Tasks
//! matching `critical` are never limited; messages without a `task` header pass.
//!
//! ```json
//! {
//!   "default": "100/s",
//!   "limits": [{ "match": "reports.*", "rate": "5/s burst 10" }],
//!   "critical": ["auth.*"],
//!   "per_producer": false,
//!   "on_exceed": { "divert": { "exchange": "", "routing_key": "overflow.celery" } }
//! }
//! ```
//! All fields are optional. Without `default`, tasks matching no pattern are not limited.
//! `per_producer` gives each producer its own buckets. `on_exceed` is `"shed"` (the default),
//! `{"delay_ms": N}` or `{"divert": {...}}`. Counter: `limited`.

use serde::Deserialize;
use sluice_policy_sdk::{
    export_policy, glob_match, parse_config, Action, Host, Limit, Message, Policy, Verdict,
};

/// One pattern's rate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskLimit {
    /// Task-name pattern, `*` as wildcard.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Its rate.
    pub rate: Limit,
}

/// The policy and its config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeleryTaskQuota {
    #[serde(default)]
    default: Option<Limit>,
    #[serde(default)]
    limits: Vec<TaskLimit>,
    #[serde(default)]
    critical: Vec<String>,
    #[serde(default)]
    per_producer: bool,
    #[serde(default)]
    on_exceed: Action,
}

impl CeleryTaskQuota {
    fn limit_for(&self, task: &str) -> Option<Limit> {
        match self.limits.iter().find(|l| glob_match(&l.pattern, task)) {
            Some(l) => Some(l.rate),
            None => self.default,
        }
    }
}

impl Policy for CeleryTaskQuota {
    fn init(config: &str) -> Result<Self, String> {
        parse_config(config)
    }

    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
        let Some(task) = msg.header("task") else {
            return Verdict::Forward;
        };
        if self.critical.iter().any(|p| glob_match(p, &task)) {
            return Verdict::Forward;
        }
        let Some(limit) = self.limit_for(&task) else {
            return Verdict::Forward;
        };
        let granted = if self.per_producer {
            host.try_acquire(&format!("{}\u{1f}{task}", msg.producer()), limit)
        } else {
            host.try_acquire(&task, limit)
        };
        if granted {
            return Verdict::Forward;
        }
        host.incr("limited", 1);
        self.on_exceed
            .verdict(|| format!("celery task {task} over its quota of {limit}"))
    }
}

export_policy!(CeleryTaskQuota);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy_sdk::testing::{FakeHost, FakeMessage};
    use std::time::Duration;

    fn policy(config: &str) -> CeleryTaskQuota {
        CeleryTaskQuota::init(config).unwrap()
    }

    fn run(p: &CeleryTaskQuota, host: &FakeHost, task: &str, n: usize) -> usize {
        let msg = FakeMessage::celery(task);
        (0..n)
            .filter(|_| p.evaluate(&msg, host).is_forward())
            .count()
    }

    #[test]
    fn pattern_limit_applies_per_task_name_and_refills() {
        let p = policy(r#"{"limits": [{"match": "reports.*", "rate": "5/s"}]}"#);
        let host = FakeHost::new();
        assert_eq!(run(&p, &host, "reports.rebuild", 20), 5);
        // Another task under the same pattern has its own bucket.
        assert_eq!(run(&p, &host, "reports.export", 20), 5);
        host.advance(Duration::from_secs(1));
        assert_eq!(run(&p, &host, "reports.rebuild", 20), 5);
        assert_eq!(host.counter("limited"), 45);
    }

    #[test]
    fn critical_tasks_are_never_limited() {
        let p = policy(r#"{"default": "1/s", "critical": ["auth.*"]}"#);
        let host = FakeHost::new();
        assert_eq!(run(&p, &host, "auth.login", 1000), 1000);
        assert_eq!(run(&p, &host, "mail.send", 10), 1);
    }

    #[test]
    fn first_matching_pattern_wins_then_default() {
        let p = policy(
            r#"{"default": "100/s", "limits": [
                {"match": "reports.rebuild", "rate": "1/s"},
                {"match": "reports.*", "rate": "10/s"}]}"#,
        );
        let host = FakeHost::new();
        assert_eq!(run(&p, &host, "reports.rebuild", 50), 1);
        assert_eq!(run(&p, &host, "reports.other", 50), 10);
        assert_eq!(run(&p, &host, "mail.send", 500), 100);
    }

    #[test]
    fn unmatched_tasks_pass_without_default_and_non_celery_passes() {
        let p = policy(r#"{"limits": [{"match": "reports.*", "rate": "1/s"}]}"#);
        let host = FakeHost::new();
        assert_eq!(run(&p, &host, "mail.send", 100), 100);
        let plain = FakeMessage::new().routing_key("orders");
        assert!(p.evaluate(&plain, &host).is_forward());
    }

    #[test]
    fn on_exceed_divert_and_shed_reason() {
        let host = FakeHost::new();
        let p = policy(
            r#"{"default": "1/s", "on_exceed": {"divert": {"exchange": "", "routing_key": "overflow.celery"}}}"#,
        );
        let msg = FakeMessage::celery("reports.rebuild");
        assert!(p.evaluate(&msg, &host).is_forward());
        assert_eq!(
            p.evaluate(&msg, &host),
            Verdict::divert("", "overflow.celery")
        );

        let p = policy(r#"{"default": "1/s"}"#);
        let host = FakeHost::new();
        p.evaluate(&msg, &host);
        match p.evaluate(&msg, &host) {
            Verdict::Shed(reason) => assert!(reason.contains("reports.rebuild"), "{reason}"),
            v => panic!("expected shed, got {v:?}"),
        }
    }

    #[test]
    fn per_producer_buckets_are_separate() {
        let p = policy(r#"{"default": "2/s", "per_producer": true}"#);
        let host = FakeHost::new();
        let a = FakeMessage::celery("t").producer("web");
        let b = FakeMessage::celery("t").producer("cron");
        let pass = |m: &FakeMessage| {
            (0..10)
                .filter(|_| p.evaluate(m, &host).is_forward())
                .count()
        };
        assert_eq!(pass(&a), 2);
        assert_eq!(pass(&b), 2);
    }

    #[test]
    fn bad_config_is_rejected_with_a_reason() {
        let err = CeleryTaskQuota::init(r#"{"default": "fast"}"#).unwrap_err();
        assert!(err.contains("invalid rate"), "{err}");
        let err = CeleryTaskQuota::init(r#"{"defualt": "1/s"}"#).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }
}
