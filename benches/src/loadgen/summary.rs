//! The JSON summary of a run.

use super::producer::Outcome;
use super::{Config, Shape};
use serde::Serialize;
use std::time::Duration;

/// Confirm latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Confirms measured.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// What one run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Target URL.
    pub url: String,
    /// Producer connections.
    pub producers: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Confirm mode (`none`, `batch:N`, `each`).
    pub confirm: String,
    /// Traffic shape.
    pub shape: Shape,
    /// Offered total rate, if paced.
    pub rate: Option<f64>,
    /// Publishes written.
    pub sent: u64,
    /// Publishes the broker (or sluice) acked.
    pub acked: u64,
    /// Publishes nacked.
    pub nacked: u64,
    /// Mandatory publishes returned.
    pub returned: u64,
    /// Seconds from the first publish to the last publish or confirm.
    pub elapsed_s: f64,
    /// Messages per second.
    pub msg_per_s: f64,
    /// Body megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Publish-to-confirm latency.
    pub confirm_latency: Latency,
    /// Messages ready in the queue afterwards (direct passive declare on the broker).
    pub queue_depth: Option<u64>,
    /// Producer errors (a producer stops at its first).
    pub errors: Vec<String>,
}

impl Summary {
    pub(super) fn new(cfg: &Config, o: Outcome, elapsed: Duration, depth: Option<u64>) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let h = &o.latency;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        Summary {
            url: cfg.url.clone(),
            producers: cfg.producers,
            size: cfg.size,
            confirm: cfg.confirm.to_string(),
            shape: cfg.shape,
            rate: cfg.rate,
            sent: o.sent,
            acked: o.acked,
            nacked: o.nacked,
            returned: o.returned,
            elapsed_s: secs,
            msg_per_s: o.sent as f64 / secs,
            mb_per_s: (o.sent as f64 * cfg.size as f64) / secs / 1e6,
            confirm_latency: Latency {
                count: h.len(),
                p50_us: q(0.50),
                p99_us: q(0.99),
                p999_us: q(0.999),
                max_us: if h.is_empty() { 0 } else { h.max() },
            },
            queue_depth: depth,
            errors: o.errors,
        }
    }

    /// One human line.
    pub fn line(&self) -> String {
        format!(
            "sent {} acked {} nacked {} returned {} in {:.2}s: {:.0} msg/s, {:.1} MB/s; \
             confirm p50 {} µs p99 {} µs p99.9 {} µs; queue depth {}{}",
            self.sent,
            self.acked,
            self.nacked,
            self.returned,
            self.elapsed_s,
            self.msg_per_s,
            self.mb_per_s,
            self.confirm_latency.p50_us,
            self.confirm_latency.p99_us,
            self.confirm_latency.p999_us,
            self.queue_depth
                .map_or_else(|| "not checked".to_string(), |d| d.to_string()),
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} error(s): {}",
                    self.errors.len(),
                    self.errors.join("; ")
                )
            }
        )
    }
}
