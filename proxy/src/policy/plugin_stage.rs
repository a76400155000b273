//! One `[[policy]]` in the chain: a Wasm plugin, with its previous version kept so a version that
//! starts failing right after a reload is rolled back automatically.

use super::chain::Matcher;
use crate::plugin::{Evaluation, MessageFacts, Policy};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tracing::error;

/// A policy stage, ready to evaluate.
pub struct PolicyStage {
    /// Policy name.
    pub name: Arc<str>,
    /// Which publishes it sees (the rest pass it untouched).
    pub matcher: Matcher,
    /// The version loaded by the config in force.
    pub policy: Arc<Policy>,
    /// The version it replaced at the last reload, if the plugin changed: the last known good.
    pub previous: Option<Arc<Policy>>,
    /// Count, don't act.
    pub dry_run: bool,
    /// Longest a publish may be held by this policy's `delay` verdicts; past it, shed.
    pub max_delay: Duration,
    rolled_back: AtomicBool,
    rollbacks: AtomicU64,
}

impl PolicyStage {
    /// A stage; `previous` is the version this one replaces (rollback target).
    pub fn new(
        name: Arc<str>,
        matcher: Matcher,
        policy: Arc<Policy>,
        previous: Option<Arc<Policy>>,
        dry_run: bool,
        max_delay: Duration,
    ) -> Self {
        PolicyStage {
            name,
            matcher,
            policy,
            previous,
            dry_run,
            max_delay,
            rolled_back: AtomicBool::new(false),
            rollbacks: AtomicU64::new(0),
        }
    }

    /// The same loaded versions (and rollback state) under a new config's settings.
    pub fn carried_over(&self, matcher: Matcher, dry_run: bool, max_delay: Duration) -> Self {
        PolicyStage {
            name: self.name.clone(),
            matcher,
            policy: self.policy.clone(),
            previous: self.previous.clone(),
            dry_run,
            max_delay,
            rolled_back: AtomicBool::new(self.is_rolled_back()),
            rollbacks: AtomicU64::new(self.rollbacks()),
        }
    }

    /// The version that evaluates now: the loaded one, or its predecessor after a rollback.
    pub fn current(&self) -> &Arc<Policy> {
        match &self.previous {
            Some(prev) if self.rolled_back.load(Relaxed) => prev,
            _ => &self.policy,
        }
    }

    /// Whether this stage has rolled back to the previous plugin version.
    pub fn is_rolled_back(&self) -> bool {
        self.rolled_back.load(Relaxed)
    }

    /// Rollbacks performed by this stage (0 or 1).
    pub fn rollbacks(&self) -> u64 {
        self.rollbacks.load(Relaxed)
    }

    /// Evaluate one publish. When the loaded version has just disabled itself (too many errors
    /// in its window) and a previous version exists that is still healthy, switch to it.
    pub fn evaluate(&self, facts: &dyn MessageFacts) -> Evaluation {
        let current = self.current();
        let ev = current.evaluate(facts);
        if ev.error.is_some() && !self.is_rolled_back() && self.policy.stats().is_disabled() {
            if let Some(prev) = &self.previous {
                if !prev.stats().is_disabled()
                    && self
                        .rolled_back
                        .compare_exchange(false, true, Relaxed, Relaxed)
                        .is_ok()
                {
                    self.rollbacks.fetch_add(1, Relaxed);
                    error!(
                        policy = %self.name,
                        failed = %self.policy.hash(),
                        restored = %prev.hash(),
                        "policy version failed after reload: rolled back to the last good version"
                    );
                }
            }
        }
        ev
    }
}
