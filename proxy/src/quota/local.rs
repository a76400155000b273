//! Local token buckets: governor's GCRA with a dashmap-backed keyed state store.

use crate::config::units::Rate;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Bytes are counted in units of this many bytes, so byte rates up to ~16 GB/s fit governor's
/// nanosecond resolution. A message is charged at least one unit.
pub const BYTE_UNIT: u64 = 16;

type Keyed<C> =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The outcome of asking a limiter for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Tokens taken.
    Allowed,
    /// Not yet: room in this long.
    Wait(Duration),
    /// Never: the message alone is larger than the burst.
    Never,
}

/// A message-rate and/or byte-rate limit, keyed by any string.
pub struct Limiter<C: Clock = DefaultClock> {
    messages: Option<Keyed<C>>,
    bytes: Option<Keyed<C>>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("messages", &self.messages.is_some())
            .field("bytes", &self.bytes.is_some())
            .finish()
    }
}

fn quota(amount: u64, per: Duration, burst: u64) -> Quota {
    let amount = amount.max(1);
    let period = (per / u32::try_from(amount).unwrap_or(u32::MAX)).max(Duration::from_nanos(1));
    let burst =
        NonZeroU32::new(u32::try_from(burst.max(1)).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// One second's worth of a rate, at least 1: the default burst.
pub fn default_burst(rate: &Rate) -> u64 {
    (rate.per_second().ceil() as u64).max(1)
}

impl Limiter<DefaultClock> {
    /// A limiter on the real clock.
    pub fn new(messages: Option<(Rate, u64)>, bytes: Option<(Rate, u64)>) -> Self {
        Limiter::with_clock(messages, bytes, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// A limiter on a given clock (tests use a fake one).
    pub fn with_clock(messages: Option<(Rate, u64)>, bytes: Option<(Rate, u64)>, clock: C) -> Self {
        let keyed = |q: Quota| RateLimiter::new(q, DashMapStateStore::default(), clock.clone());
        Limiter {
            messages: messages.map(|(r, burst)| keyed(quota(r.amount, r.per, burst))),
            bytes: bytes.map(|(r, burst)| {
                let units = (r.amount / BYTE_UNIT).max(1);
                keyed(quota(units, r.per, (burst / BYTE_UNIT).max(1)))
            }),
            clock,
        }
    }

    /// Take one message of `size` bytes for `key`. When the byte check fails after the message
    /// check passed, the message token is spent: a retry waits for both.
    pub fn check(&self, key: &Arc<str>, size: u64) -> Admission {
        if let Some(m) = &self.messages {
            if let Err(not_until) = m.check_key(key) {
                return Admission::Wait(not_until.wait_time_from(self.clock.now()));
            }
        }
        if let Some(b) = &self.bytes {
            let units = (size / BYTE_UNIT).max(1);
            let n = NonZeroU32::new(u32::try_from(units).unwrap_or(u32::MAX))
                .unwrap_or(NonZeroU32::MIN);
            match b.check_key_n(key, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Admission::Wait(not_until.wait_time_from(self.clock.now()))
                }
                Err(_) => return Admission::Never,
            }
        }
        Admission::Allowed
    }

    /// Forget keys whose buckets are full again (idle producers), bounding memory.
    pub fn retain_recent(&self) {
        for l in [&self.messages, &self.bytes].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Number of keys with state.
    pub fn len(&self) -> usize {
        self.messages
            .as_ref()
            .or(self.bytes.as_ref())
            .map(|l| l.len())
            .unwrap_or(0)
    }

    /// Whether no key has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(amount: u64) -> Rate {
        Rate {
            amount,
            per: Duration::from_secs(1),
        }
    }

    #[test]
    fn burst_then_rate_per_key() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(Some((rate(200), 50)), None, clock.clone());
        let a: Arc<str> = "hotfix".into();
        let b: Arc<str> = "web-login".into();
        for _ in 0..50 {
            assert_eq!(l.check(&a, 100), Admission::Allowed);
        }
        match l.check(&a, 100) {
            Admission::Wait(d) => assert!(d <= Duration::from_millis(5), "{d:?}"),
            other => panic!("expected wait, got {other:?}"),
        }
        // Another key is independent.
        assert_eq!(l.check(&b, 100), Admission::Allowed);
        clock.advance(Duration::from_millis(5));
        assert_eq!(l.check(&a, 100), Admission::Allowed);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn byte_rate_limits_and_oversized_message_never_fits() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(None, Some((rate(1 << 20), 1 << 20)), clock.clone());
        let k: Arc<str> = "p".into();
        assert_eq!(l.check(&k, 1 << 20), Admission::Allowed);
        assert!(matches!(l.check(&k, 1024), Admission::Wait(_)));
        clock.advance(Duration::from_millis(10));
        assert_eq!(l.check(&k, 1024), Admission::Allowed);
        assert_eq!(l.check(&k, 4 << 20), Admission::Never);
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(Some((rate(10), 10)), None, clock.clone());
        l.check(&"a".into(), 1);
        clock.advance(Duration::from_secs(5));
        l.retain_recent();
        assert!(l.is_empty());
    }
}
