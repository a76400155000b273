//! State shared by every instance of every policy and kept across reloads: token buckets and
//! counters (namespaced by policy name), the broker signals, and the plugins' clock.

use super::bucket::{Bucket, Buckets};
use super::signals::Signals;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Bucket keys one policy may create; past this, new keys share one overflow bucket.
pub(crate) const MAX_BUCKET_KEYS: usize = 100_000;
/// Counter names one policy may create; past this, increments go to `other`.
pub(crate) const MAX_COUNTERS: usize = 256;
/// Plugin log lines per second per policy (burst [`LOG_BURST`]); the rest are counted, not logged.
const LOG_RATE: f64 = 10.0;
const LOG_BURST: u32 = 50;

/// Process-wide plugin state that outlives any one loaded plugin. A reloaded policy with the
/// same name finds its buckets and counters as it left them.
#[derive(Debug)]
pub struct PluginShared {
    origin: Instant,
    signals: Signals,
    policies: DashMap<Arc<str>, Arc<PolicyState>>,
}

/// One policy's buckets, counters and log limiter.
#[derive(Debug)]
pub(crate) struct PolicyState {
    pub(crate) buckets: Buckets,
    counters: DashMap<Box<str>, AtomicU64>,
    log_bucket: Bucket,
    pub(crate) logs_dropped: AtomicU64,
}

impl PolicyState {
    fn new() -> Self {
        Self {
            buckets: Buckets::new(MAX_BUCKET_KEYS),
            counters: DashMap::new(),
            log_bucket: Bucket::default(),
            logs_dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn incr(&self, name: &str, delta: u64) {
        if let Some(c) = self.counters.get(name) {
            c.fetch_add(delta, Relaxed);
            return;
        }
        let name = if self.counters.len() >= MAX_COUNTERS {
            "other"
        } else {
            name
        };
        self.counters
            .entry(name.into())
            .or_default()
            .fetch_add(delta, Relaxed);
    }

    /// Counters sorted by name.
    pub(crate) fn counters(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .counters
            .iter()
            .map(|e| (e.key().to_string(), e.value().load(Relaxed)))
            .collect();
        v.sort();
        v
    }

    /// True if a log line may be written now; counts the ones that may not.
    pub(crate) fn log_allowed(&self, now: u64) -> bool {
        let ok = self.log_bucket.try_acquire(now, LOG_RATE, LOG_BURST);
        if !ok {
            self.logs_dropped.fetch_add(1, Relaxed);
        }
        ok
    }
}

impl PluginShared {
    /// Empty state, clock starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            signals: Signals::default(),
            policies: DashMap::new(),
        })
    }

    /// The broker signals plugins see; the proxy updates them.
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// A policy's counters, sorted by name.
    pub fn counters(&self, policy: &str) -> Vec<(String, u64)> {
        self.policies
            .get(policy)
            .map(|s| s.counters())
            .unwrap_or_default()
    }

    /// Drops the buckets and counters of a policy that is no longer configured.
    pub fn forget_policy(&self, policy: &str) {
        self.policies.remove(policy);
    }

    /// Nanoseconds since this state was created: the plugins' monotonic clock.
    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn policy_state(&self, policy: &Arc<str>) -> Arc<PolicyState> {
        if let Some(s) = self.policies.get(policy) {
            return s.clone();
        }
        self.policies
            .entry(policy.clone())
            .or_insert_with(|| Arc::new(PolicyState::new()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_under_the_same_name() {
        let shared = PluginShared::new();
        let name: Arc<str> = "celery".into();
        shared.policy_state(&name).incr("limited", 2);
        shared.policy_state(&name).incr("limited", 3);
        assert_eq!(shared.counters("celery"), vec![("limited".to_string(), 5)]);
        shared.forget_policy("celery");
        assert!(shared.counters("celery").is_empty());
    }

    #[test]
    fn counter_names_are_bounded() {
        let state = PolicyState::new();
        for i in 0..MAX_COUNTERS + 10 {
            state.incr(&format!("c{i}"), 1);
        }
        let counters = state.counters();
        assert!(counters.len() <= MAX_COUNTERS + 1);
        assert!(counters.iter().any(|(n, v)| n == "other" && *v == 10));
    }
}
