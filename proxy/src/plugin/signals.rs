//! Broker signals the proxy observes and plugins read: blocked upstream connections, publisher
//! confirm latency and nack rate, and queue depths.

use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Weight of a new confirm in the latency average (about the last 20 confirms dominate).
const LATENCY_ALPHA: f64 = 0.05;
/// Weight of a new confirm in the nack rate (about the last 100 confirms dominate).
const NACK_ALPHA: f64 = 0.01;
/// Queue names tracked at most.
const MAX_QUEUES: usize = 1024;

/// Broker signals, updated by the proxy from any thread and read by plugins on every call.
/// Averages are exponentially weighted per confirm.
#[derive(Debug, Default)]
pub struct Signals {
    blocked: AtomicBool,
    blocked_connections: AtomicU32,
    latency_ms: AtomicU64,
    nack_rate: AtomicU64,
    confirms: AtomicU64,
    queues: DashMap<Box<str>, u64>,
}

/// A snapshot of [`Signals`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerSignals {
    /// True while the broker blocks any upstream connection (or the proxy said so).
    pub upstream_blocked: bool,
    /// Upstream connections currently blocked.
    pub blocked_connections: u32,
    /// Smoothed confirm latency in milliseconds (0 before the first confirm).
    pub confirm_latency_ms: f64,
    /// Smoothed fraction of nacked publishes, 0.0 to 1.0.
    pub nack_rate: f64,
}

fn ewma(cell: &AtomicU64, sample: f64, alpha: f64, first: bool) {
    let _ = cell.fetch_update(Relaxed, Relaxed, |bits| {
        let old = f64::from_bits(bits);
        let new = if first {
            sample
        } else {
            old + alpha * (sample - old)
        };
        Some(new.to_bits())
    });
}

impl Signals {
    /// Marks the upstream blocked or not, independently of per-connection counts (e.g. from a
    /// management API alarm).
    pub fn set_upstream_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Relaxed);
    }

    /// Sets how many upstream connections are blocked right now (`connection.blocked` received
    /// and not yet `connection.unblocked`).
    pub fn set_blocked_connections(&self, n: u32) {
        self.blocked_connections.store(n, Relaxed);
    }

    /// One more or one fewer blocked upstream connection.
    pub fn add_blocked_connections(&self, delta: i32) {
        let _ = self
            .blocked_connections
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add_signed(delta)));
    }

    /// Records one publisher confirm: how long the broker took, and ack or nack.
    pub fn record_confirm(&self, latency: Duration, acked: bool) {
        let first = self.confirms.fetch_add(1, Relaxed) == 0;
        ewma(
            &self.latency_ms,
            latency.as_secs_f64() * 1e3,
            LATENCY_ALPHA,
            first,
        );
        ewma(
            &self.nack_rate,
            if acked { 0.0 } else { 1.0 },
            NACK_ALPHA,
            first,
        );
    }

    /// Sets a queue's depth as last polled. At most 1024 queues are tracked; others are ignored.
    pub fn set_queue_depth(&self, queue: &str, depth: u64) {
        if let Some(mut d) = self.queues.get_mut(queue) {
            *d = depth;
        } else if self.queues.len() < MAX_QUEUES {
            self.queues.insert(queue.into(), depth);
        }
    }

    /// Forgets a queue's depth (no longer polled).
    pub fn clear_queue_depth(&self, queue: &str) {
        self.queues.remove(queue);
    }

    /// A queue's last polled depth.
    pub fn queue_depth(&self, queue: &str) -> Option<u64> {
        self.queues.get(queue).map(|d| *d)
    }

    /// The current values.
    pub fn snapshot(&self) -> BrokerSignals {
        let n = self.blocked_connections.load(Relaxed);
        BrokerSignals {
            upstream_blocked: self.blocked.load(Relaxed) || n > 0,
            blocked_connections: n,
            confirm_latency_ms: f64::from_bits(self.latency_ms.load(Relaxed)),
            nack_rate: f64::from_bits(self.nack_rate.load(Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_from_flag_or_connections() {
        let s = Signals::default();
        assert!(!s.snapshot().upstream_blocked);
        s.add_blocked_connections(1);
        assert!(s.snapshot().upstream_blocked);
        s.add_blocked_connections(-1);
        s.add_blocked_connections(-1);
        assert_eq!(s.snapshot().blocked_connections, 0);
        s.set_upstream_blocked(true);
        assert!(s.snapshot().upstream_blocked);
    }

    #[test]
    fn confirm_averages_follow_samples() {
        let s = Signals::default();
        s.record_confirm(Duration::from_millis(10), true);
        assert_eq!(s.snapshot().confirm_latency_ms, 10.0);
        for _ in 0..200 {
            s.record_confirm(Duration::from_millis(100), false);
        }
        let snap = s.snapshot();
        assert!((snap.confirm_latency_ms - 100.0).abs() < 1.0, "{snap:?}");
        assert!(snap.nack_rate > 0.8, "{snap:?}");
    }

    #[test]
    fn queue_depths() {
        let s = Signals::default();
        assert_eq!(s.queue_depth("celery"), None);
        s.set_queue_depth("celery", 5);
        s.set_queue_depth("celery", 7);
        assert_eq!(s.queue_depth("celery"), Some(7));
        s.clear_queue_depth("celery");
        assert_eq!(s.queue_depth("celery"), None);
    }
}
