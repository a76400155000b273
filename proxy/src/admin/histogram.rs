//! A fixed-bucket latency histogram kept as atomics and rendered as a Prometheus histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds in seconds: 100 µs (a broker confirm on loopback) to 10 s (a broker under
/// memory alarm).
const BOUNDS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Observations counted per bucket, with their sum, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_S.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Count one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BOUNDS_S.partition_point(|b| *b < s);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Write the `_bucket`, `_sum` and `_count` series of `name` with `labels` (already
    /// rendered, e.g. `listener="amqp"`; may be empty). `HELP`/`TYPE` are the caller's.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Relaxed);
            let le = BOUNDS_S
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |s| s.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {total}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let count = self.count.load(Relaxed);
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
        } else {
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "listener=\"a\"");
        assert!(out.contains("x_seconds_bucket{listener=\"a\",le=\"0.0001\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{listener=\"a\",le=\"0.005\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{listener=\"a\",le=\"10\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{listener=\"a\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_count{listener=\"a\"} 3\n"));
        assert_eq!(h.count(), 3);
    }
}
