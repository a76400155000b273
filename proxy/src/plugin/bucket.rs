//! Token buckets keyed by any string, for the `try-acquire` and `rate` host calls.
//!
//! Each bucket is a GCRA ("theoretical arrival time") limiter whose rate and burst come with
//! every call, so a plugin can change a key's limit at any time, plus a sliding one-second
//! window that estimates how often the key is asked for. Time is passed in, in nanoseconds
//! since an arbitrary origin, so tests drive it by hand.

use dashmap::DashMap;
use parking_lot::Mutex;

const SECOND: f64 = 1e9;

#[derive(Debug, Default)]
struct State {
    /// Theoretical arrival time of the next request, ns.
    tat: f64,
    /// Start of the current one-second window, ns.
    window_start: u64,
    window_count: u64,
    previous_count: u64,
}

/// One key's bucket.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    state: Mutex<State>,
}

impl Bucket {
    /// Takes a token if one is available at `now`.
    pub(crate) fn try_acquire(&self, now: u64, per_second: f64, burst: u32) -> bool {
        let mut s = self.state.lock();
        s.count(now);
        if !(per_second > 0.0 && per_second.is_finite()) {
            return false;
        }
        let interval = SECOND / per_second;
        let tolerance = interval * f64::from(burst.max(1));
        let now = now as f64;
        let next = s.tat.max(now) + interval;
        if next - now > tolerance {
            return false;
        }
        s.tat = next;
        true
    }

    /// Requests per second over the last second (granted or not).
    pub(crate) fn rate(&self, now: u64) -> f64 {
        let mut s = self.state.lock();
        s.roll(now);
        let into = now.saturating_sub(s.window_start) as f64 / SECOND;
        s.previous_count as f64 * (1.0 - into) + s.window_count as f64
    }
}

impl State {
    fn roll(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed >= SECOND as u64 {
            let windows = elapsed / SECOND as u64;
            self.previous_count = if windows == 1 { self.window_count } else { 0 };
            self.window_count = 0;
            self.window_start += windows * SECOND as u64;
        }
    }

    fn count(&mut self, now: u64) {
        self.roll(now);
        self.window_count += 1;
    }
}

/// The buckets of one policy. At most `max_keys` keys; past that, new keys share one overflow
/// bucket so that a flood of distinct keys cannot exhaust memory.
#[derive(Debug)]
pub(crate) struct Buckets {
    map: DashMap<Box<str>, Bucket>,
    overflow: Bucket,
    max_keys: usize,
}

impl Buckets {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            map: DashMap::new(),
            overflow: Bucket::default(),
            max_keys,
        }
    }

    /// Runs `f` on the bucket for `key`, creating it if needed.
    pub(crate) fn with<R>(&self, key: &str, f: impl FnOnce(&Bucket) -> R) -> R {
        if let Some(b) = self.map.get(key) {
            return f(&b);
        }
        if self.map.len() >= self.max_keys {
            return f(&self.overflow);
        }
        let b = self.map.entry(key.into()).or_default();
        f(&b)
    }

    /// Number of keys (not counting the overflow bucket).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_steady_rate() {
        let b = Bucket::default();
        let t0 = 10 * 1000 * MS;
        let granted = (0..20).filter(|_| b.try_acquire(t0, 10.0, 5)).count();
        assert_eq!(granted, 5);
        assert!(!b.try_acquire(t0 + 50 * MS, 10.0, 5));
        assert!(b.try_acquire(t0 + 100 * MS, 10.0, 5));
        assert!(!b.try_acquire(t0 + 100 * MS, 10.0, 5));
        // A quiet second refills to the burst, not beyond.
        let t1 = t0 + 2000 * MS;
        assert_eq!((0..20).filter(|_| b.try_acquire(t1, 10.0, 5)).count(), 5);
    }

    #[test]
    fn zero_or_invalid_rate_grants_nothing() {
        let b = Bucket::default();
        assert!(!b.try_acquire(0, 0.0, 10));
        assert!(!b.try_acquire(0, f64::NAN, 10));
        assert!(!b.try_acquire(0, -1.0, 10));
    }

    #[test]
    fn rate_counts_requests_over_the_last_second() {
        let b = Bucket::default();
        for i in 0..100 {
            b.try_acquire(i * 10 * MS, 1.0, 1);
        }
        // 100 requests spread over the first second.
        let r = b.rate(1000 * MS);
        assert!((95.0..=100.0).contains(&r), "{r}");
        // Half a second later, half of them still count.
        let r = b.rate(1500 * MS);
        assert!((45.0..=55.0).contains(&r), "{r}");
        assert_eq!(b.rate(3000 * MS), 0.0);
    }

    #[test]
    fn keys_past_the_cap_share_the_overflow_bucket() {
        let buckets = Buckets::new(2);
        assert!(buckets.with("a", |b| b.try_acquire(0, 1.0, 1)));
        assert!(buckets.with("b", |b| b.try_acquire(0, 1.0, 1)));
        assert!(buckets.with("c", |b| b.try_acquire(0, 1.0, 1)));
        assert!(!buckets.with("d", |b| b.try_acquire(0, 1.0, 1)));
        assert!(!buckets.with("a", |b| b.try_acquire(0, 1.0, 1)));
        assert_eq!(buckets.len(), 2);
    }
}
