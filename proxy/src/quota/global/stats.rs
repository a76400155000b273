//! Counters of leases and of the coordinator, kept as atomics and rendered as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counters of one global quota.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Lease requests sent to Redis (renewals and returns).
    pub requests: AtomicU64,
    /// Requests that were granted at least one token.
    pub grants: AtomicU64,
    /// Requests for tokens that got none: the global bucket was dry.
    pub denials: AtomicU64,
    /// Requests that failed (Redis down, slow or erroring).
    pub errors: AtomicU64,
    /// Tokens granted, all dimensions.
    pub tokens_granted: AtomicU64,
    /// Unused tokens handed back by idle or shrinking leases.
    pub tokens_returned: AtomicU64,
    /// Publishes decided by the local fallback limiter while Redis was down (`fail = "open"`).
    pub fallback_checks: AtomicU64,
    /// Publishes refused because Redis was down (`fail = "closed"`).
    pub closed_refusals: AtomicU64,
}

/// Upper bounds (seconds) of the Redis latency histogram.
const BUCKETS: [f64; 12] = [
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    inf: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => {
                if let Some(c) = self.counts.get(i) {
                    c.fetch_add(1, Relaxed);
                }
            }
            None => {
                self.inf.fetch_add(1, Relaxed);
            }
        }
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum::<u64>() + self.inf.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.inf.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum {:.6}",
            self.sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

pub(super) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The per-quota lease families for `quotas` (name, stats).
pub(super) fn render_leases(out: &mut String, quotas: &[(std::sync::Arc<str>, &LeaseStats)]) {
    type Family = (&'static str, &'static str, fn(&LeaseStats) -> u64);
    let families: [Family; 8] = [
        (
            "sluice_quota_lease_requests_total",
            "Lease requests sent to Redis by global quotas.",
            |s| s.requests.load(Relaxed),
        ),
        (
            "sluice_quota_lease_grants_total",
            "Lease requests granted at least one token.",
            |s| s.grants.load(Relaxed),
        ),
        (
            "sluice_quota_lease_denials_total",
            "Lease requests that got no token: the global bucket was empty.",
            |s| s.denials.load(Relaxed),
        ),
        (
            "sluice_quota_lease_errors_total",
            "Lease requests that failed: Redis down, slow or erroring.",
            |s| s.errors.load(Relaxed),
        ),
        (
            "sluice_quota_lease_tokens_granted_total",
            "Tokens granted to this sidecar by Redis.",
            |s| s.tokens_granted.load(Relaxed),
        ),
        (
            "sluice_quota_lease_tokens_returned_total",
            "Unused tokens handed back to Redis by idle or shrinking leases.",
            |s| s.tokens_returned.load(Relaxed),
        ),
        (
            "sluice_quota_fallback_checks_total",
            "Publishes decided by the local fallback limiter while Redis was down (fail = open).",
            |s| s.fallback_checks.load(Relaxed),
        ),
        (
            "sluice_quota_closed_refusals_total",
            "Publishes treated as over quota because Redis was down (fail = closed).",
            |s| s.closed_refusals.load(Relaxed),
        ),
    ];
    for (name, help, get) in families {
        family(out, name, "counter", help);
        for (q, s) in quotas {
            let _ = writeln!(out, "{name}{{quota=\"{}\"}} {}", esc(q), get(s));
        }
    }
}

/// The coordinator families.
pub(super) fn render_coordinator(
    out: &mut String,
    up: bool,
    latency: &Histogram,
    fallback: Duration,
    errors: u64,
) {
    family(
        out,
        "sluice_coordinator_up",
        "gauge",
        "1 while Redis answers lease requests, 0 while global quotas run on their fallback.",
    );
    let _ = writeln!(out, "sluice_coordinator_up {}", u8::from(up));
    family(
        out,
        "sluice_coordinator_latency_seconds",
        "histogram",
        "Round-trip time of lease requests to Redis.",
    );
    latency.render(out, "sluice_coordinator_latency_seconds");
    family(
        out,
        "sluice_coordinator_fallback_seconds_total",
        "counter",
        "Time spent with Redis unreachable (global quotas on their fail mode).",
    );
    let _ = writeln!(
        out,
        "sluice_coordinator_fallback_seconds_total {:.3}",
        fallback.as_secs_f64()
    );
    family(
        out,
        "sluice_coordinator_errors_total",
        "counter",
        "Failed connects and lease requests to Redis.",
    );
    let _ = writeln!(out, "sluice_coordinator_errors_total {errors}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let mut out = String::new();
        h.render(&mut out, "x");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }
}
