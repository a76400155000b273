//! Per-policy settings and the sandbox limits they configure.

use std::sync::Arc;
use std::time::Duration;
use wasmtime::ResourceLimiter;

/// What a failed evaluation turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Forward the message: a broken policy does not stop traffic.
    #[default]
    Open,
    /// Shed the message: a broken policy stops what it was meant to control.
    Closed,
}

/// How one policy runs. [`PolicySettings::new`] gives safe defaults: 20 ms per call, 16 MiB of
/// memory, fail open, disabled after 10 errors in 60 s.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Policy name (metrics label, log field, namespace of its buckets and counters).
    pub name: Arc<str>,
    /// Config handed to the plugin's `init` (JSON text; may be empty).
    pub config_json: String,
    /// Verdict when the plugin fails.
    pub fail: FailMode,
    /// Time budget of one call (a batch gets this per message, capped at
    /// [`MAX_BATCH_BUDGET`]). Enforced by epoch interruption: a call is stopped between
    /// `time_budget` and `time_budget` + [`EPOCH_TICK`].
    pub time_budget: Duration,
    /// Cap on the plugin's linear memory, in bytes (at most [`MAX_MEMORY`]).
    pub memory_limit: usize,
    /// Errors within `error_window` that disable the policy.
    pub max_errors: u32,
    /// Window for `max_errors`.
    pub error_window: Duration,
}

/// Default per-call time budget. The budget is wall-clock time: a warm call takes microseconds,
/// but on a busy host a call preempted mid-way can take milliseconds, and a budget that such a
/// preemption overruns would disable a healthy policy exactly when the host is under pressure.
/// 20 ms still stops a runaway loop long before a client notices.
pub const DEFAULT_TIME_BUDGET: Duration = Duration::from_millis(20);
/// Default memory cap.
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;
/// Largest memory cap a policy may ask for (the pooling allocator's slot size).
pub const MAX_MEMORY: usize = 256 << 20;
/// Default number of errors that disables a policy.
pub const DEFAULT_MAX_ERRORS: u32 = 10;
/// Default window for counting errors.
pub const DEFAULT_ERROR_WINDOW: Duration = Duration::from_secs(60);
/// Epoch tick: the resolution of time budgets.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Largest time budget of one batch call.
pub const MAX_BATCH_BUDGET: Duration = Duration::from_millis(100);

impl PolicySettings {
    /// Defaults for a policy with this name and config.
    pub fn new(name: impl Into<Arc<str>>, config_json: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            config_json: config_json.into(),
            fail: FailMode::Open,
            time_budget: DEFAULT_TIME_BUDGET,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            max_errors: DEFAULT_MAX_ERRORS,
            error_window: DEFAULT_ERROR_WINDOW,
        }
    }

    /// Epoch ticks for a call over `messages` messages. The deadline counts ticks from a moment
    /// somewhere within the current tick, so one tick is added: a call always gets its whole
    /// budget and at most one tick more.
    pub(crate) fn deadline_ticks(&self, messages: usize) -> u64 {
        let per = self.time_budget.as_nanos();
        let total = per
            .saturating_mul(messages.max(1) as u128)
            .min(MAX_BATCH_BUDGET.as_nanos().max(per));
        let tick = EPOCH_TICK.as_nanos();
        u64::try_from(total.div_ceil(tick) + 1).unwrap_or(u64::MAX)
    }
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self::new("policy", "")
    }
}

/// Caps one instance's memory and tables, and remembers whether the cap was hit so that a
/// resulting trap is reported as [`super::ErrorKind::Memory`].
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_limit: usize,
    pub(crate) hit: bool,
}

/// Table elements allowed per table (Rust guests use a few hundred).
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl Limiter {
    pub(crate) fn new(memory_limit: usize) -> Self {
        Self {
            memory_limit,
            hit: false,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_cover_the_budget_and_scale_with_batches() {
        let mut s = PolicySettings::default();
        assert_eq!(s.deadline_ticks(1), 21);
        assert_eq!(s.deadline_ticks(4), 81);
        assert_eq!(s.deadline_ticks(10), 101);
        assert_eq!(s.deadline_ticks(1000), 101);
        s.time_budget = Duration::from_micros(1500);
        assert_eq!(s.deadline_ticks(1), 3);
        s.time_budget = Duration::from_micros(10);
        assert_eq!(s.deadline_ticks(1), 2);
        s.time_budget = Duration::from_millis(500);
        assert_eq!(s.deadline_ticks(10), 501);
    }
}
