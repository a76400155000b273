//! Per-policy statistics and their Prometheus rendering: errors by kind, the disabled flag,
//! the evaluation-time histogram, live instances and the plugin's own counters.

use super::shared::PolicyState;
use super::ErrorKind;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bounds of the evaluation-time histogram, in nanoseconds per message.
const BOUNDS_NS: [u64; 17] = [
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
];

/// What one policy version has done. Shared by reference through [`super::Policy::stats`].
#[derive(Debug)]
pub struct PolicyStats {
    name: Arc<str>,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    disabled: AtomicBool,
    recent_errors: Mutex<VecDeque<Instant>>,
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
    pub(crate) instances: AtomicU64,
    state: Arc<PolicyState>,
}

impl PolicyStats {
    pub(crate) fn new(name: Arc<str>, state: Arc<PolicyState>) -> Self {
        Self {
            name,
            errors: Default::default(),
            disabled: AtomicBool::new(false),
            recent_errors: Mutex::new(VecDeque::new()),
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
            instances: AtomicU64::new(0),
            state,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Errors of one kind so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors.get(kind.index()).map_or(0, |c| c.load(Relaxed))
    }

    /// True once too many errors disabled the policy.
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Relaxed)
    }

    /// Messages evaluated (including failed evaluations).
    pub fn evaluations(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Total evaluation time.
    pub fn eval_time(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Relaxed))
    }

    /// Cumulative histogram: (upper bound in seconds, messages at or below it); the last bound
    /// is infinity.
    pub fn histogram(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Relaxed);
            let le = BOUNDS_NS
                .get(i)
                .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
            out.push((le, total));
        }
        out
    }

    /// The plugin's counters (from `incr`), sorted by name. They belong to the policy name and
    /// carry over across reloads.
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.state.counters()
    }

    /// Plugin log lines dropped by the log rate limit.
    pub fn logs_dropped(&self) -> u64 {
        self.state.logs_dropped.load(Relaxed)
    }

    /// Live instances of this version.
    pub fn instances(&self) -> u64 {
        self.instances.load(Relaxed)
    }

    /// Records `messages` messages decided in `elapsed` (a batch counts as that many messages
    /// of the average time).
    pub(crate) fn observe(&self, elapsed: Duration, messages: usize) {
        let n = messages.max(1) as u64;
        let total = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let per = total / n;
        let i = BOUNDS_NS.partition_point(|b| *b < per);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(n, Relaxed);
        }
        self.sum_ns.fetch_add(total, Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Counts one error; returns true if it disables the policy (`max_errors` within `window`).
    pub(crate) fn record_error(&self, kind: ErrorKind, max_errors: u32, window: Duration) -> bool {
        if let Some(c) = self.errors.get(kind.index()) {
            c.fetch_add(1, Relaxed);
        }
        if kind == ErrorKind::Disabled || self.is_disabled() {
            return false;
        }
        let now = Instant::now();
        let mut recent = self.recent_errors.lock();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            recent.pop_front();
        }
        if recent.len() >= max_errors.max(1) as usize {
            return !self.disabled.swap(true, Relaxed);
        }
        false
    }

    /// Renders this policy alone; see [`render_prometheus`] for several.
    pub fn render_prometheus(&self, out: &mut String) {
        render_prometheus([self], out);
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the plugin metric families of several policies as Prometheus text, each family's
/// `HELP`/`TYPE` once: `sluice_plugin_errors_total{policy,kind}`,
/// `sluice_plugin_disabled{policy}`, `sluice_policy_eval_seconds{policy}` (histogram),
/// `sluice_plugin_instances{policy}`, `sluice_plugin_logs_dropped_total{policy}` and
/// `sluice_plugin_events_total{policy,name}`.
pub fn render_prometheus<'a>(
    policies: impl IntoIterator<Item = &'a PolicyStats>,
    out: &mut String,
) {
    let policies: Vec<&PolicyStats> = policies.into_iter().collect();
    let _ = writeln!(
        out,
        "# HELP sluice_plugin_errors_total Plugin evaluations that failed, by kind."
    );
    let _ = writeln!(out, "# TYPE sluice_plugin_errors_total counter");
    for p in &policies {
        let name = label(&p.name);
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "sluice_plugin_errors_total{{policy=\"{name}\",kind=\"{kind}\"}} {}",
                p.errors(kind)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sluice_plugin_disabled 1 when a policy was disabled after too many errors."
    );
    let _ = writeln!(out, "# TYPE sluice_plugin_disabled gauge");
    for p in &policies {
        let _ = writeln!(
            out,
            "sluice_plugin_disabled{{policy=\"{}\"}} {}",
            label(&p.name),
            u8::from(p.is_disabled())
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_policy_eval_seconds Time a policy plugin took per message."
    );
    let _ = writeln!(out, "# TYPE sluice_policy_eval_seconds histogram");
    for p in &policies {
        let name = label(&p.name);
        for (le, n) in p.histogram() {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                format!("{le}")
            };
            let _ = writeln!(
                out,
                "sluice_policy_eval_seconds_bucket{{policy=\"{name}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "sluice_policy_eval_seconds_sum{{policy=\"{name}\"}} {}",
            p.eval_time().as_secs_f64()
        );
        let _ = writeln!(
            out,
            "sluice_policy_eval_seconds_count{{policy=\"{name}\"}} {}",
            p.evaluations()
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_plugin_instances Live instances of a policy plugin."
    );
    let _ = writeln!(out, "# TYPE sluice_plugin_instances gauge");
    for p in &policies {
        let _ = writeln!(
            out,
            "sluice_plugin_instances{{policy=\"{}\"}} {}",
            label(&p.name),
            p.instances()
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_plugin_logs_dropped_total Plugin log lines over the log rate limit."
    );
    let _ = writeln!(out, "# TYPE sluice_plugin_logs_dropped_total counter");
    for p in &policies {
        let _ = writeln!(
            out,
            "sluice_plugin_logs_dropped_total{{policy=\"{}\"}} {}",
            label(&p.name),
            p.logs_dropped()
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_plugin_events_total Events a policy plugin counted with incr, by name."
    );
    let _ = writeln!(out, "# TYPE sluice_plugin_events_total counter");
    for p in &policies {
        let name = label(&p.name);
        for (counter, v) in p.counters() {
            let _ = writeln!(
                out,
                "sluice_plugin_events_total{{policy=\"{name}\",name=\"{}\"}} {v}",
                label(&counter)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::PluginShared;

    fn stats() -> PolicyStats {
        let shared = PluginShared::new();
        let name: Arc<str> = "p\"1".into();
        PolicyStats::new(name.clone(), shared.policy_state(&name))
    }

    #[test]
    fn histogram_is_cumulative_and_batches_count_per_message() {
        let s = stats();
        s.observe(Duration::from_nanos(400), 1);
        s.observe(Duration::from_micros(64), 64);
        s.observe(Duration::from_millis(1), 1);
        let h = s.histogram();
        assert_eq!(h[0], (250e-9, 0));
        assert_eq!(h[1].1, 1);
        assert_eq!(h[2].1, 65);
        assert_eq!(h.last().map(|x| x.1), Some(66));
        assert_eq!(s.evaluations(), 66);
    }

    #[test]
    fn disabled_after_max_errors_in_window() {
        let s = stats();
        assert!(!s.record_error(ErrorKind::Trap, 3, Duration::from_secs(60)));
        assert!(!s.record_error(ErrorKind::Timeout, 3, Duration::from_secs(60)));
        assert!(s.record_error(ErrorKind::Trap, 3, Duration::from_secs(60)));
        assert!(s.is_disabled());
        assert!(!s.record_error(ErrorKind::Trap, 3, Duration::from_secs(60)));
        assert_eq!(s.errors(ErrorKind::Trap), 3);
    }

    #[test]
    fn errors_outside_the_window_do_not_count() {
        let s = stats();
        assert!(!s.record_error(ErrorKind::Trap, 2, Duration::ZERO));
        std::thread::sleep(Duration::from_millis(2));
        assert!(!s.record_error(ErrorKind::Trap, 2, Duration::ZERO));
        assert!(!s.is_disabled());
    }

    #[test]
    fn renders_prometheus_text_with_escaped_labels() {
        let s = stats();
        s.observe(Duration::from_micros(3), 1);
        s.record_error(ErrorKind::Memory, 10, Duration::from_secs(1));
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(
            out.contains("sluice_plugin_errors_total{policy=\"p\\\"1\",kind=\"memory\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("sluice_policy_eval_seconds_bucket{policy=\"p\\\"1\",le=\"+Inf\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("sluice_policy_eval_seconds_count{policy=\"p\\\"1\"} 1"),
            "{out}"
        );
        assert_eq!(
            out.matches("# TYPE sluice_policy_eval_seconds histogram")
                .count(),
            1
        );
    }
}
