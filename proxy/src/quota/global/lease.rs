//! The lease side of a global quota: tokens granted by Redis are spent here with atomics, and a
//! renewer (the coordinator's task) asks for more before they run out.
//!
//! Per key (producer) and dimension (messages, bytes) a lease holds a token count. The hot path
//! takes tokens with a compare-and-swap; it never waits on Redis. Three rules keep the global
//! total honest and the hot path fair:
//! - **Lease size follows local demand**: about `lease` (200 ms) of the demand measured here, at
//!   least 1, at most the burst. An idle key hands its tokens back; a shrinking one returns the
//!   excess. So idle sidecars do not hoard.
//! - **Borrowing while the bucket has room**: a lease may go below zero by one lease size while
//!   Redis last said the global bucket had room, so a new producer's first publish or a renewal
//!   still in flight does not refuse a publish the bucket would have allowed. The debt is repaid
//!   from the next grant; once Redis says the bucket is dry, only granted tokens are spent.
//! - **Redis down**: no borrowing; `fail = "open"` falls back to a local limiter at the quota's
//!   rate divided by `instances`, `fail = "closed"` answers over quota.
// Every index here is a dimension (`MESSAGES`, `BYTES`, or `i` in `0..DIMS`) into an array of
// length `DIMS`, never a value from the network (Redis's answers are matched by `zip`), so the
// quota module's ban on indexing is lifted for this file alone.
#![allow(clippy::indexing_slicing)]

use super::stats::LeaseStats;
use super::{FailMode, GlobalScope};
use crate::config::units::Rate;
use crate::quota::local::{Limiter, BYTE_UNIT};
use crate::quota::Admission;
use dashmap::mapref::one::Ref;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use parking_lot::Mutex;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

const DIMS: usize = 2;
const MESSAGES: usize = 0;
const BYTES: usize = 1;
/// Key suffix per dimension in Redis.
const DIM_KEYS: [&str; DIMS] = ["m", "b"];

/// How leases are sized and renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// A lease holds about this long of the local demand.
    pub lease: Duration,
    /// Demand is measured over this interval.
    pub sample: Duration,
    /// Shortest wait before asking a dry bucket again.
    pub min_retry: Duration,
    /// Longest wait before asking again; also the hint when Redis is down and `fail = "closed"`.
    pub max_retry: Duration,
    /// A key without demand this long hands its tokens back.
    pub idle_return: Duration,
    /// A key idle this long, holding nothing, is forgotten.
    pub forget_after: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            lease: Duration::from_millis(200),
            sample: Duration::from_millis(100),
            min_retry: Duration::from_millis(10),
            max_retry: Duration::from_millis(100),
            idle_return: Duration::from_secs(1),
            forget_after: Duration::from_secs(30),
        }
    }
}

/// What the hot path and the coordinator share: whether Redis is up, and a way to wake the
/// renewer early.
#[derive(Debug, Default)]
pub struct Link {
    up: AtomicBool,
    nudge: tokio::sync::Notify,
}

impl Link {
    /// Whether Redis answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Record whether Redis answers; returns the previous state.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Relaxed)
    }

    /// Ask the renewer to look at the leases now (never blocks).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Wait for a nudge.
    pub async fn nudged(&self) {
        self.nudge.notified().await
    }
}

/// One global bucket's parameters, in tokens (messages, or units of [`BYTE_UNIT`] bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Refill, tokens per second.
    pub rate: f64,
    /// Capacity.
    pub burst: i64,
}

impl Bucket {
    fn new(rate: &Rate, burst: u64, unit: u64) -> Bucket {
        let amount = (rate.amount / unit).max(1) as f64;
        Bucket {
            rate: amount / rate.per.as_secs_f64().max(1e-9),
            burst: i64::try_from((burst / unit).max(1)).unwrap_or(i64::MAX),
        }
    }
}

/// Redis's answer for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// Tokens granted.
    pub granted: i64,
    /// Microseconds until the bucket holds one token again.
    pub wait_us: i64,
    /// Whole tokens left in the bucket.
    pub left: i64,
}

/// One bucket of a lease request: Redis key, refill rate, burst, tokens wanted (negative: handed
/// back).
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Redis key.
    pub key: String,
    /// Tokens per second.
    pub rate: f64,
    /// Capacity.
    pub burst: i64,
    /// Wanted (or, negative, returned).
    pub want: i64,
}

#[derive(Debug, Default)]
struct RenewState {
    primed: bool,
    rate: [f64; DIMS],
    seen: [u64; DIMS],
    target: [i64; DIMS],
    sampled_at: u64,
    active_at: u64,
    retry_at: u64,
}

/// The lease of one key.
#[derive(Debug, Default)]
pub struct KeyLease {
    tokens: [AtomicI64; DIMS],
    demand: [AtomicU64; DIMS],
    borrow: [AtomicI64; DIMS],
    low: [AtomicI64; DIMS],
    dry: AtomicBool,
    in_flight: AtomicBool,
    retry_at: AtomicU64,
    renew: Mutex<RenewState>,
}

impl KeyLease {
    fn holds_nothing(&self) -> bool {
        self.tokens.iter().all(|t| t.load(Relaxed) == 0)
    }
}

/// Take `n` tokens unless that leaves fewer than `floor`; returns what is left.
#[inline]
fn take(t: &AtomicI64, n: i64, floor: i64) -> Option<i64> {
    let mut cur = t.load(Relaxed);
    loop {
        let next = cur - n;
        if next < floor {
            return None;
        }
        match t.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
            Ok(_) => return Some(next),
            Err(c) => cur = c,
        }
    }
}

/// Take every token above `keep`; returns how many.
fn take_above(t: &AtomicI64, keep: i64) -> i64 {
    match t.fetch_update(Relaxed, Relaxed, |v| (v > keep).then_some(keep)) {
        Ok(old) => old - keep,
        Err(_) => 0,
    }
}

/// A renewal the coordinator must send: see [`GlobalLimiter::parts`] and [`GlobalLimiter::settle`].
#[derive(Debug)]
pub struct Renewal {
    key: Arc<str>,
    lease: Arc<KeyLease>,
    want: [i64; DIMS],
}

impl Renewal {
    /// The producer key.
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }
}

/// A quota whose buckets live in Redis, spent here through leases.
pub struct GlobalLimiter<C: Clock = DefaultClock> {
    name: Arc<str>,
    buckets: [Option<Bucket>; DIMS],
    scope: GlobalScope,
    keys: DashMap<Arc<str>, Arc<KeyLease>>,
    fallback: Limiter<C>,
    link: Arc<Link>,
    tuning: Tuning,
    clock: C,
    epoch: C::Instant,
    jitter: AtomicU64,
    swept_at: AtomicU64,
    /// Counters.
    pub stats: LeaseStats,
}

impl<C: Clock> std::fmt::Debug for GlobalLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimiter")
            .field("name", &self.name)
            .field("buckets", &self.buckets)
            .field("scope", &self.scope)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A different non-zero seed for every limiter of the process.
fn seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ N.fetch_add(1, Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// A rate and burst split evenly over `instances` (the fallback's share).
fn share((rate, burst): (Rate, u64), instances: u32) -> (Rate, u64) {
    let n = instances.max(1);
    (
        Rate {
            amount: rate.amount,
            per: rate.per.saturating_mul(n),
        },
        (burst / u64::from(n)).max(1),
    )
}

impl<C: Clock + Clone> GlobalLimiter<C> {
    /// A global quota named `name` (its Redis keys are `<prefix>{<name>:<producer>}:m|b`).
    pub fn with_clock(
        name: &str,
        messages: Option<(Rate, u64)>,
        bytes: Option<(Rate, u64)>,
        scope: GlobalScope,
        link: Arc<Link>,
        tuning: Tuning,
        clock: C,
    ) -> Self {
        let fallback = Limiter::with_clock(
            messages.map(|m| share(m, scope.instances)),
            bytes.map(|b| share(b, scope.instances)),
            clock.clone(),
        );
        GlobalLimiter {
            name: name.into(),
            buckets: [
                messages.map(|(r, b)| Bucket::new(&r, b, 1)),
                bytes.map(|(r, b)| Bucket::new(&r, b, BYTE_UNIT)),
            ],
            scope,
            keys: DashMap::new(),
            fallback,
            link,
            tuning,
            epoch: clock.now(),
            clock,
            jitter: AtomicU64::new(seed()),
            swept_at: AtomicU64::new(0),
            stats: LeaseStats::default(),
        }
    }

    /// The quota's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its fail mode and instance count.
    pub fn scope(&self) -> GlobalScope {
        self.scope
    }

    /// Keys (producers) with a lease.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key has a lease.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Tokens this sidecar holds for `key` (messages, bytes); negative while borrowing.
    pub fn held(&self, key: &str) -> (i64, i64) {
        self.keys
            .get(key)
            .map(|l| {
                (
                    l.tokens[MESSAGES].load(Relaxed),
                    l.tokens[BYTES].load(Relaxed),
                )
            })
            .unwrap_or((0, 0))
    }

    /// `d` scaled by a pseudo-random factor in [0.5, 1.5): sidecars that found the bucket dry at
    /// the same moment ask again at different moments, so none wins every refill.
    fn jittered(&self, d: Duration) -> u64 {
        let mut x = self.jitter.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Relaxed);
        let f = 0.5 + (x >> 11) as f64 / (1u64 << 53) as f64;
        (d.as_nanos() as f64 * f) as u64
    }

    fn now_ns(&self) -> u64 {
        u64::from(self.clock.now().duration_since(self.epoch))
    }

    fn lease_for(&self, key: &Arc<str>) -> Ref<'_, Arc<str>, Arc<KeyLease>> {
        if let Some(l) = self.keys.get(key) {
            return l;
        }
        let now = self.now_ns();
        let lease_s = self.tuning.lease.as_secs_f64();
        let instances = f64::from(self.scope.instances.max(1));
        let mut st = RenewState {
            sampled_at: now,
            active_at: now,
            ..Default::default()
        };
        let mut lease = KeyLease::default();
        for (i, b) in self.buckets.iter().enumerate() {
            if let (Some(b), Some(t)) = (b, st.target.get_mut(i)) {
                *t = ((b.rate / instances * lease_s).ceil() as i64).clamp(1, b.burst);
                lease.borrow[i].store(*t, Relaxed);
            }
        }
        *lease.renew.get_mut() = st;
        let l = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Arc::new(lease))
            .downgrade();
        self.link.nudge();
        l
    }

    /// Take one message of `size` bytes for `key`: from the lease (atomics, never waits), else
    /// from the fallback while Redis is down.
    pub fn check(&self, key: &Arc<str>, size: u64) -> Admission {
        let units = i64::try_from((size / BYTE_UNIT).max(1)).unwrap_or(i64::MAX);
        if let Some(b) = &self.buckets[BYTES] {
            if units > b.burst {
                return Admission::Never;
            }
        }
        let lease = self.lease_for(key);
        let up = self.link.is_up();
        let borrowing = up && !lease.dry.load(Relaxed);
        let costs = [1, units];
        for i in [MESSAGES, BYTES] {
            if self.buckets[i].is_none() {
                continue;
            }
            let cost = costs[i];
            lease.demand[i].fetch_add(cost as u64, Relaxed);
            let floor = if borrowing {
                -lease.borrow[i].load(Relaxed)
            } else {
                0
            };
            match take(&lease.tokens[i], cost, floor) {
                Some(left) => {
                    let low = lease.low[i].load(Relaxed);
                    if left <= low && left + cost > low {
                        self.link.nudge();
                    }
                }
                None => {
                    if i == BYTES && self.buckets[MESSAGES].is_some() {
                        lease.tokens[MESSAGES].fetch_add(1, Relaxed);
                    }
                    let until = lease.retry_at.load(Relaxed).saturating_sub(self.now_ns());
                    // Wake the renewer only when it may ask now: a dry bucket is asked again
                    // on its own schedule, and a request in flight will answer soon.
                    if up && until == 0 && !lease.in_flight.load(Relaxed) {
                        self.link.nudge();
                    }
                    drop(lease);
                    return self.empty(key, size, up, Duration::from_nanos(until));
                }
            }
        }
        Admission::Allowed
    }

    #[cold]
    fn empty(&self, key: &Arc<str>, size: u64, up: bool, hint: Duration) -> Admission {
        if up {
            return Admission::Wait(hint.clamp(Duration::from_millis(1), self.tuning.max_retry));
        }
        match self.scope.fail {
            FailMode::Open => {
                self.stats.fallback_checks.fetch_add(1, Relaxed);
                self.fallback.check(key, size)
            }
            FailMode::Closed => {
                self.stats.closed_refusals.fetch_add(1, Relaxed);
                Admission::Wait(self.tuning.max_retry)
            }
        }
    }

    /// The renewals due now: leases under their low-water mark (not waiting out a dry bucket),
    /// leases to hand back, debts to repay. Forgets keys idle for long.
    pub fn plan(&self, out: &mut Vec<Renewal>) {
        let now = self.now_ns();
        let idle_ns = self.tuning.idle_return.as_nanos() as u64;
        let forget_ns = self.tuning.forget_after.as_nanos() as u64;
        // The fallback's buckets are keyed by producer too: forget the idle ones now and then.
        if now.saturating_sub(self.swept_at.load(Relaxed)) >= forget_ns {
            self.swept_at.store(now, Relaxed);
            self.fallback.retain_recent();
        }
        let leases: Vec<(Arc<str>, Arc<KeyLease>)> = self
            .keys
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (key, lease) in leases {
            if lease.in_flight.load(Acquire) {
                continue;
            }
            let mut st = lease.renew.lock();
            self.sample(&lease, &mut st, now);
            let idle_for = now.saturating_sub(st.active_at);
            let idle = idle_for >= idle_ns;
            let mut want = [0i64; DIMS];
            for (i, w) in want.iter_mut().enumerate() {
                if self.buckets[i].is_none() {
                    continue;
                }
                let target = st.target[i];
                lease.borrow[i].store(target, Relaxed);
                lease.low[i].store(target / 2, Relaxed);
                let have = lease.tokens[i].load(Relaxed);
                *w = if idle {
                    if have > 0 {
                        -take_above(&lease.tokens[i], 0)
                    } else {
                        -have
                    }
                } else if have <= target / 2 {
                    target - have
                } else if have > 2 * target + 1 {
                    -take_above(&lease.tokens[i], target)
                } else {
                    0
                };
            }
            if now < st.retry_at {
                for w in want.iter_mut().filter(|w| **w > 0) {
                    *w = 0;
                }
            }
            if want.iter().all(|w| *w == 0) {
                drop(st);
                if idle_for >= forget_ns && lease.holds_nothing() {
                    self.keys
                        .remove_if(&key, |_, l| !l.in_flight.load(Acquire) && l.holds_nothing());
                }
                continue;
            }
            drop(st);
            lease.in_flight.store(true, Release);
            out.push(Renewal { key, lease, want });
        }
    }

    fn sample(&self, lease: &KeyLease, st: &mut RenewState, now: u64) {
        let elapsed = now.saturating_sub(st.sampled_at);
        if elapsed < self.tuning.sample.as_nanos() as u64 {
            return;
        }
        let secs = elapsed as f64 / 1e9;
        let lease_s = self.tuning.lease.as_secs_f64();
        let mut grew = false;
        for (i, b) in self.buckets.iter().enumerate() {
            let Some(b) = b else { continue };
            let d = lease.demand[i].load(Relaxed);
            let delta = d.saturating_sub(st.seen[i]);
            st.seen[i] = d;
            grew |= delta > 0;
            let now_rate = delta as f64 / secs;
            st.rate[i] = if st.primed {
                0.7 * st.rate[i] + 0.3 * now_rate
            } else {
                now_rate
            };
            st.target[i] = ((st.rate[i] * lease_s).ceil() as i64).clamp(1, b.burst);
        }
        st.primed = true;
        st.sampled_at = now;
        if grew {
            st.active_at = now;
        }
    }

    /// The buckets a renewal asks Redis about, in order.
    pub fn parts(&self, r: &Renewal, prefix: &str) -> Vec<Part> {
        let mut parts = Vec::with_capacity(DIMS);
        for (i, b) in self.buckets.iter().enumerate() {
            if let (Some(b), Some(&want)) = (b, r.want.get(i)) {
                if want != 0 {
                    parts.push(Part {
                        key: format!("{prefix}{{{}:{}}}:{}", self.name, r.key, DIM_KEYS[i]),
                        rate: b.rate,
                        burst: b.burst,
                        want,
                    });
                }
            }
        }
        parts
    }

    /// Apply Redis's answer to a renewal (one [`Grant`] per part, in order), or its failure
    /// (`None`).
    pub fn settle(&self, r: Renewal, answer: Option<&[Grant]>) {
        let now = self.now_ns();
        let lease = &r.lease;
        let s = &self.stats;
        s.requests.fetch_add(1, Relaxed);
        let Some(grants) = answer else {
            s.errors.fetch_add(1, Relaxed);
            let mut st = lease.renew.lock();
            st.retry_at = now + self.jittered(self.tuning.min_retry);
            lease.retry_at.store(st.retry_at, Relaxed);
            drop(st);
            lease.in_flight.store(false, Release);
            return;
        };
        let mut asked = false;
        let mut short = false;
        let mut granted = 0;
        let mut wait_us = 0;
        let dims = (0..DIMS).filter(|&i| self.buckets[i].is_some() && r.want[i] != 0);
        for (i, g) in dims.zip(grants) {
            let want = r.want[i];
            if want > 0 {
                asked = true;
                let got = g.granted.clamp(0, want);
                lease.tokens[i].fetch_add(got, Relaxed);
                granted += got;
                if got < want {
                    short = true;
                    wait_us = wait_us.max(g.wait_us);
                }
            } else {
                s.tokens_returned.fetch_add(want.unsigned_abs(), Relaxed);
            }
        }
        s.tokens_granted.fetch_add(granted as u64, Relaxed);
        if asked {
            if granted > 0 {
                s.grants.fetch_add(1, Relaxed);
            } else {
                s.denials.fetch_add(1, Relaxed);
            }
            let mut st = lease.renew.lock();
            st.retry_at = if short {
                let wait = Duration::from_micros(wait_us.max(0) as u64)
                    .clamp(self.tuning.min_retry, self.tuning.max_retry);
                now + self.jittered(wait)
            } else {
                now
            };
            lease.retry_at.store(st.retry_at, Relaxed);
            lease.dry.store(short, Relaxed);
        }
        lease.in_flight.store(false, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(n: u64) -> Rate {
        Rate {
            amount: n,
            per: Duration::from_secs(1),
        }
    }

    /// The Lua script's arithmetic, on the fake clock: the "Redis" of these tests.
    struct FakeRedis {
        clock: FakeRelativeClock,
        epoch: <FakeRelativeClock as Clock>::Instant,
        buckets: std::collections::HashMap<String, (f64, u64)>,
    }

    impl FakeRedis {
        fn new(clock: &FakeRelativeClock) -> Self {
            FakeRedis {
                clock: clock.clone(),
                epoch: clock.now(),
                buckets: Default::default(),
            }
        }

        fn call(&mut self, parts: &[Part]) -> Vec<Grant> {
            let now = u64::from(self.clock.now().duration_since(self.epoch)) / 1000;
            parts
                .iter()
                .map(|p| {
                    let (tokens, ts) = self
                        .buckets
                        .entry(p.key.clone())
                        .or_insert((p.burst as f64, now));
                    *tokens = (*tokens + (now - *ts) as f64 * p.rate / 1e6).min(p.burst as f64);
                    *ts = now;
                    let mut granted = 0;
                    if p.want > 0 {
                        granted = (p.want as f64).min(tokens.floor()).max(0.0) as i64;
                        *tokens -= granted as f64;
                    } else {
                        *tokens = (*tokens - p.want as f64).min(p.burst as f64);
                    }
                    let wait = if *tokens < 1.0 {
                        ((1.0 - *tokens) * 1e6 / p.rate).ceil() as i64
                    } else {
                        0
                    };
                    Grant {
                        granted,
                        wait_us: wait,
                        left: tokens.floor() as i64,
                    }
                })
                .collect()
        }

        fn renew(&mut self, l: &GlobalLimiter<FakeRelativeClock>) {
            let mut due = vec![];
            l.plan(&mut due);
            for r in due {
                let parts = l.parts(&r, "t:");
                let grants = self.call(&parts);
                l.settle(r, Some(&grants));
            }
        }
    }

    fn limiter(
        clock: &FakeRelativeClock,
        link: &Arc<Link>,
        fail: FailMode,
        instances: u32,
    ) -> GlobalLimiter<FakeRelativeClock> {
        GlobalLimiter::with_clock(
            "per-producer",
            Some((rate(300), 300)),
            None,
            GlobalScope { fail, instances },
            link.clone(),
            Tuning::default(),
            clock.clone(),
        )
    }

    fn up_link() -> Arc<Link> {
        let l = Arc::new(Link::default());
        l.set_up(true);
        l
    }

    #[test]
    fn first_publish_borrows_and_the_debt_is_repaid() {
        let clock = FakeRelativeClock::default();
        let link = up_link();
        let l = limiter(&clock, &link, FailMode::Open, 3);
        let mut redis = FakeRedis::new(&clock);
        let k: Arc<str> = "flood".into();
        // 200 ms of a third of 300/s = 20 may be borrowed before Redis has answered.
        for _ in 0..20 {
            assert_eq!(l.check(&k, 10), Admission::Allowed);
        }
        assert!(matches!(l.check(&k, 10), Admission::Wait(_)));
        assert_eq!(l.held("flood").0, -20);
        redis.renew(&l);
        // The grant covered the debt and a lease of 20.
        assert_eq!(l.held("flood").0, 20);
        assert_eq!(redis.buckets["t:{per-producer:flood}:m"].0, 260.0);
    }

    #[test]
    fn three_flooding_sidecars_share_the_global_rate() {
        let clock = FakeRelativeClock::default();
        let link = up_link();
        let ls: Vec<_> = (0..3)
            .map(|_| limiter(&clock, &link, FailMode::Open, 3))
            .collect();
        let mut redis = FakeRedis::new(&clock);
        let k: Arc<str> = "flood".into();
        let mut allowed = [0u64; 3];
        // 10 s, each sidecar trying 2 publishes per ms; the renewer runs every 10 ms.
        for ms in 0..10_000u64 {
            for (i, l) in ls.iter().enumerate() {
                for _ in 0..2 {
                    if l.check(&k, 10) == Admission::Allowed {
                        allowed[i] += 1;
                    }
                }
            }
            // Each sidecar's renewer runs on its own schedule (nudged by its hot path).
            for i in 0..3 {
                redis.renew(&ls[(i + ms as usize) % 3]);
            }
            clock.advance(Duration::from_millis(1));
        }
        let total: u64 = allowed.iter().sum();
        // 300/s for 10 s plus the burst of 300, plus at most the borrowed first leases.
        assert!((3000..=3360).contains(&total), "{allowed:?}");
        for a in allowed {
            assert!(a > 700, "unfair split: {allowed:?}");
        }
    }

    #[test]
    fn an_idle_sidecar_hands_its_lease_back_and_the_others_take_its_share() {
        let clock = FakeRelativeClock::default();
        let link = up_link();
        let ls: Vec<_> = (0..3)
            .map(|_| limiter(&clock, &link, FailMode::Open, 3))
            .collect();
        let mut redis = FakeRedis::new(&clock);
        let k: Arc<str> = "flood".into();
        let mut late = 0u64;
        for ms in 0..8_000u64 {
            // The third sidecar's producer stops after 3 s.
            let active = if ms < 3_000 { 3 } else { 2 };
            for l in &ls[..active] {
                for _ in 0..2 {
                    if l.check(&k, 10) == Admission::Allowed && ms >= 5_000 {
                        late += 1;
                    }
                }
            }
            // Each sidecar's renewer runs on its own schedule (nudged by its hot path).
            for i in 0..3 {
                redis.renew(&ls[(i + ms as usize) % 3]);
            }
            clock.advance(Duration::from_millis(1));
        }
        // From 2 s after the stop, the two others get the whole 300/s between them.
        assert!((850..=960).contains(&late), "{late}");
        assert_eq!(ls[2].held("flood").0, 0, "the idle sidecar holds nothing");
        assert!(ls[2].stats.tokens_returned.load(Relaxed) > 0);
    }

    #[test]
    fn redis_down_falls_back_open_or_refuses_closed() {
        let clock = FakeRelativeClock::default();
        let link = Arc::new(Link::default());
        let open = limiter(&clock, &link, FailMode::Open, 3);
        let closed = limiter(&clock, &link, FailMode::Closed, 3);
        let k: Arc<str> = "p".into();
        // Fallback: 100/s with a burst of 100 (a third of 300/s, burst 300).
        let mut ok = 0;
        for _ in 0..150 {
            if open.check(&k, 10) == Admission::Allowed {
                ok += 1;
            }
        }
        assert_eq!(ok, 100);
        assert_eq!(open.stats.fallback_checks.load(Relaxed), 150);
        assert!(matches!(closed.check(&k, 10), Admission::Wait(_)));
        assert_eq!(closed.stats.closed_refusals.load(Relaxed), 1);
    }

    #[test]
    fn a_failed_renewal_is_retried_and_a_dry_bucket_stops_borrowing() {
        let clock = FakeRelativeClock::default();
        let link = up_link();
        let l = limiter(&clock, &link, FailMode::Open, 1);
        let k: Arc<str> = "p".into();
        assert_eq!(l.check(&k, 1), Admission::Allowed);
        let mut due = vec![];
        l.plan(&mut due);
        assert_eq!(due.len(), 1);
        let r = due.pop().unwrap();
        l.settle(r, None);
        assert_eq!(l.stats.errors.load(Relaxed), 1);
        l.plan(&mut due);
        assert!(
            due.is_empty(),
            "no retry before min_retry (jittered: 5 to 15 ms)"
        );
        clock.advance(Duration::from_millis(15));
        l.plan(&mut due);
        let r = due.pop().unwrap();
        l.settle(
            r,
            Some(&[Grant {
                granted: 0,
                wait_us: 3333,
                left: 0,
            }]),
        );
        assert_eq!(l.stats.denials.load(Relaxed), 1);
        // Dry: the debt of 1 stays, nothing more is borrowed.
        assert!(matches!(l.check(&k, 1), Admission::Wait(d) if d >= Duration::from_millis(4)));
    }

    #[test]
    fn bytes_are_leased_too_and_an_oversized_message_never_fits() {
        let clock = FakeRelativeClock::default();
        let link = up_link();
        let l = GlobalLimiter::with_clock(
            "bytes",
            None,
            Some((rate(1 << 20), 1 << 20)),
            GlobalScope {
                fail: FailMode::Open,
                instances: 1,
            },
            link,
            Tuning::default(),
            clock.clone(),
        );
        let k: Arc<str> = "p".into();
        assert_eq!(l.check(&k, 2 << 20), Admission::Never);
        assert_eq!(l.check(&k, 4096), Admission::Allowed);
        let mut redis = FakeRedis::new(&clock);
        redis.renew(&l);
        let (_, b) = l.held("p");
        assert!(b > 0, "{b}");
    }
}
