//! The Redis side of global quotas: one multiplexed connection, the lease script (EVALSHA, loaded
//! on `NOSCRIPT`), and a background task that renews every global quota's leases. Redis down or
//! slower than `timeout` marks the coordinator down (quotas use their fail mode); it reconnects by
//! itself with exponential backoff.

use super::lease::{Grant, Link, Part, Renewal, Tuning};
use super::stats::{render_coordinator, render_leases, Histogram};
use super::{Coordination, FailMode, GlobalLimiter, GlobalScope, LEASE_SCRIPT};
use crate::config::units::Rate;
use governor::clock::DefaultClock;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the renewer looks at leases when nothing nudges it.
const TICK: Duration = Duration::from_millis(10);
/// First and longest wait between reconnect attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

#[derive(Debug)]
struct Down {
    since: Option<Instant>,
    total: Duration,
    last_error: Option<String>,
    /// No reconnect before this.
    next_try: Option<Instant>,
    /// Doubles with every failure in a row, back to the first value after a lease request
    /// succeeds (not merely a connect: a Redis too slow for leases must not flap up and down).
    backoff: Duration,
}

impl Default for Down {
    fn default() -> Self {
        Down {
            since: None,
            total: Duration::ZERO,
            last_error: None,
            next_try: None,
            backoff: BACKOFF.0,
        }
    }
}

/// Shares global quotas with other sidecars through Redis. One per config's `[coordination]`,
/// carried over reloads while it is unchanged.
pub struct Coordinator {
    settings: Coordination,
    client: Result<redis::Client, String>,
    script: redis::Script,
    link: Arc<Link>,
    conn: Mutex<Option<MultiplexedConnection>>,
    limiters: Mutex<Vec<Weak<GlobalLimiter>>>,
    latency: Histogram,
    errors: AtomicU64,
    down: Mutex<Down>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("redis", &self.settings.redacted())
            .field("up", &self.link.is_up())
            .finish()
    }
}

impl Coordinator {
    /// A coordinator for `settings`, not started.
    pub fn new(settings: Coordination) -> Arc<Coordinator> {
        let client = redis::Client::open(settings.redis.as_str()).map_err(|e| e.to_string());
        Arc::new(Coordinator {
            settings,
            client,
            script: redis::Script::new(LEASE_SCRIPT),
            link: Arc::new(Link::default()),
            conn: Mutex::new(None),
            limiters: Mutex::new(Vec::new()),
            latency: Histogram::default(),
            errors: AtomicU64::new(0),
            down: Mutex::new(Down::default()),
        })
    }

    /// The coordinator a config needs: `previous` when its settings are unchanged, else a new one
    /// started on the current tokio runtime (none without `[coordination]`).
    pub fn for_config(
        settings: Option<&Coordination>,
        previous: Option<&Arc<Coordinator>>,
    ) -> Option<Arc<Coordinator>> {
        let settings = settings?;
        if let Some(p) = previous.filter(|p| &p.settings == settings) {
            return Some(p.clone());
        }
        let c = Coordinator::new(settings.clone());
        c.start();
        Some(c)
    }

    /// Run the renewer on the current tokio runtime (no-op outside one, e.g. `sluice check`). It
    /// stops when the coordinator is dropped.
    pub fn start(self: &Arc<Self>) {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(run(Arc::downgrade(self)));
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Coordination {
        &self.settings
    }

    /// Whether Redis answers now.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// A global quota's limiter, renewed by this coordinator.
    pub fn limiter(
        self: &Arc<Self>,
        name: &str,
        messages: Option<(Rate, u64)>,
        bytes: Option<(Rate, u64)>,
        scope: GlobalScope,
    ) -> Arc<GlobalLimiter> {
        let tuning = Tuning {
            lease: self.settings.lease,
            ..Tuning::default()
        };
        let l = Arc::new(GlobalLimiter::with_clock(
            name,
            messages,
            bytes,
            scope,
            self.link.clone(),
            tuning,
            DefaultClock::default(),
        ));
        let mut all = self.limiters.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&l));
        l
    }

    fn live(&self) -> Vec<Arc<GlobalLimiter>> {
        let mut all = self.limiters.lock();
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    }

    /// Time spent with Redis unreachable so far.
    pub fn fallback_time(&self) -> Duration {
        let d = self.down.lock();
        d.total + d.since.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Ready unless Redis is down and a live global quota fails closed.
    pub fn ready(&self) -> bool {
        self.is_up()
            || !self
                .live()
                .iter()
                .any(|l| l.scope().fail == FailMode::Closed)
    }

    /// `/readyz` detail.
    pub fn status(&self) -> serde_json::Value {
        let up = self.is_up();
        let (state, down_for, last_error) = {
            let d = self.down.lock();
            let state = match (up, d.since) {
                (true, _) => "up",
                (false, Some(_)) => "down",
                (false, None) => "connecting",
            };
            (
                state,
                d.since.map(|s| s.elapsed().as_secs_f64()),
                d.last_error.clone(),
            )
        };
        let quotas: Vec<_> = self
            .live()
            .iter()
            .map(|l| {
                let s = l.scope();
                let mode = match (up, s.fail) {
                    (true, _) => "leases",
                    (false, FailMode::Open) => "fallback",
                    (false, FailMode::Closed) => "closed",
                };
                json!({
                    "name": &**l.name(),
                    "fail": s.fail.as_str(),
                    "instances": s.instances,
                    "mode": mode,
                    "keys": l.len(),
                })
            })
            .collect();
        json!({
            "redis": self.settings.redacted(),
            "up": up,
            "state": state,
            "down_for_seconds": down_for,
            "last_error": last_error,
            "fallback_seconds_total": self.fallback_time().as_secs_f64(),
            "quotas": quotas,
        })
    }

    /// The lease and coordinator metric families.
    pub fn render_prometheus(&self, out: &mut String) {
        let live = self.live();
        let quotas: Vec<_> = live.iter().map(|l| (l.name().clone(), &l.stats)).collect();
        render_leases(out, &quotas);
        render_coordinator(
            out,
            self.is_up(),
            &self.latency,
            self.fallback_time(),
            self.errors.load(Relaxed),
        );
    }

    fn mark_up(&self) {
        if !self.link.set_up(true) {
            let mut d = self.down.lock();
            if let Some(s) = d.since.take() {
                d.total += s.elapsed();
                info!(redis = %self.settings.redacted(), after = ?s.elapsed(), "coordinator: Redis reachable again, global quotas back on leases");
            } else {
                info!(redis = %self.settings.redacted(), "coordinator: connected to Redis");
            }
        }
    }

    /// Redis failed a connect or a request: drop the connection, use the fail modes, and wait
    /// the backoff before reconnecting (doubled once per failure of the connection, not once per
    /// request that was in flight on it).
    fn mark_down(&self, error: String, connecting: bool) {
        self.errors.fetch_add(1, Relaxed);
        let had_conn = self.conn.lock().take().is_some();
        let was_up = self.link.set_up(false);
        let mut d = self.down.lock();
        if was_up || d.since.is_none() {
            d.since = Some(Instant::now());
            warn!(redis = %self.settings.redacted(), %error, "coordinator: Redis unreachable, global quotas on their fail mode");
        }
        if connecting || had_conn {
            d.next_try = Some(Instant::now() + d.backoff);
            d.backoff = (d.backoff * 2).min(BACKOFF.1);
        }
        d.last_error = Some(error);
    }

    fn request_succeeded(&self) {
        let mut d = self.down.lock();
        if d.backoff != BACKOFF.0 {
            d.backoff = BACKOFF.0;
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let client = self.client.as_ref().map_err(|e| e.clone())?;
        let t = self.settings.timeout;
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(t))
            .set_response_timeout(Some(t));
        let mut conn =
            tokio::time::timeout(t, client.get_multiplexed_async_connection_with_config(&cfg))
                .await
                .map_err(|_| format!("connect timed out after {t:?}"))?
                .map_err(|e| e.to_string())?;
        // A paused or overloaded Redis accepts connections but does not answer.
        let pong: String = tokio::time::timeout(t, redis::cmd("PING").query_async(&mut conn))
            .await
            .map_err(|_| format!("PING timed out after {t:?}"))?
            .map_err(|e| e.to_string())?;
        if pong != "PONG" {
            return Err(format!("unexpected PING reply {pong:?}"));
        }
        Ok(conn)
    }

    fn renew_all(self: &Arc<Self>, due: &mut Vec<Renewal>) {
        let Some(conn) = self.conn.lock().clone() else {
            return;
        };
        for lim in self.live() {
            lim.plan(due);
            for r in due.drain(..) {
                let parts = lim.parts(&r, &self.settings.prefix);
                tokio::spawn(request(self.clone(), lim.clone(), conn.clone(), r, parts));
            }
        }
    }
}

/// One lease request: send, settle, and mark Redis down on failure.
async fn request(
    c: Arc<Coordinator>,
    lim: Arc<GlobalLimiter>,
    mut conn: MultiplexedConnection,
    r: Renewal,
    parts: Vec<Part>,
) {
    let started = Instant::now();
    let mut inv = c.script.prepare_invoke();
    for p in &parts {
        inv.key(&p.key);
    }
    for p in &parts {
        inv.arg(p.rate).arg(p.burst).arg(p.want);
    }
    let t = c.settings.timeout;
    let reply = match tokio::time::timeout(t, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
        Ok(Ok(v)) if v.len() == parts.len() * 3 => Ok(v),
        Ok(Ok(v)) => Err(format!(
            "lease script answered {} numbers for {} buckets",
            v.len(),
            parts.len()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("lease request timed out after {t:?}")),
    };
    match reply {
        Ok(v) => {
            c.latency.observe(started.elapsed());
            c.request_succeeded();
            let grants: Vec<Grant> = v
                .chunks_exact(3)
                .map(|g| Grant {
                    granted: g.first().copied().unwrap_or(0),
                    wait_us: g.get(1).copied().unwrap_or(0),
                    left: g.get(2).copied().unwrap_or(0),
                })
                .collect();
            lim.settle(r, Some(&grants));
        }
        Err(e) => {
            lim.settle(r, None);
            c.mark_down(e, false);
        }
    }
}

/// The renewer: keep a connection (reconnecting with backoff), and renew due leases every tick or
/// when the hot path nudges.
async fn run(weak: Weak<Coordinator>) {
    let mut due = Vec::new();
    loop {
        let Some(c) = weak.upgrade() else { return };
        let link = c.link.clone();
        let connected = c.conn.lock().is_some();
        if !connected {
            let wait = c
                .down
                .lock()
                .next_try
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            if !wait.is_zero() {
                drop(c);
                tokio::time::sleep(wait).await;
                continue;
            }
            match c.connect().await {
                Ok(conn) => {
                    *c.conn.lock() = Some(conn);
                    c.mark_up();
                }
                Err(e) => {
                    c.mark_down(e, true);
                    continue;
                }
            }
        }
        c.renew_all(&mut due);
        drop(c);
        tokio::select! {
            _ = link.nudged() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}
