//! Global quotas: three sluices in front of the same RabbitMQ share one quota through the real
//! Redis on 127.0.0.1:6379, each with a flooding lapin producer of the same identity. Acks are
//! counted per 100 ms, so rates are measured over windows of several seconds after warm-up.
//!
//! `redis_outage_falls_back_as_configured_and_recovers` stops Redis (broker-wide state): it runs
//! only with `SLUICE_REDIS_FAULTS=1`, alone (`make test-redis-faults`), and a guard restarts
//! Redis with the README's command even when the test fails.

use anyhow::{ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use sluice_tests::{connect, http, unique, Broker, Queues, Sluice};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The global quota, messages per second, shared by the three sidecars.
const RATE: f64 = 300.0;
const SLOT: Duration = Duration::from_millis(100);
const REDIS: &str = "redis://127.0.0.1:6379";

/// A sidecar's config: the global quota, holding publishes over it (delay) for up to 5 s.
fn config(prefix: &str, fail: &str) -> String {
    format!(
        "[coordination]\nredis = \"{REDIS}\"\nprefix = \"{prefix}\"\n\n\
         [[quota]]\nname = \"global-flood\"\nmatch = {{ producer = \"flood-*\" }}\n\
         messages = \"{RATE}/s\"\nscope = \"global\"\nfail = \"{fail}\"\ninstances = 3\n\
         on_exceed = {{ delay = \"5s\" }}\n"
    )
}

/// Deletes the run's Redis keys when dropped (they also expire by themselves).
struct RedisKeys(String);

impl RedisKeys {
    fn count(&self) -> Result<usize> {
        let mut c = redis::Client::open(REDIS)?.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut c)?;
        Ok(keys.len())
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(mut c) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut c);
        }
    }
}

/// Acks counted per 100 ms slot since the start of the test.
struct Tally {
    start: Instant,
    slots: Vec<AtomicU64>,
}

impl Tally {
    fn new(start: Instant) -> Arc<Tally> {
        Arc::new(Tally {
            start,
            slots: (0..1200).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn ack(&self) {
        let i = (self.start.elapsed().as_millis() / SLOT.as_millis()) as usize;
        if let Some(s) = self.slots.get(i) {
            s.fetch_add(1, Relaxed);
        }
    }

    /// Acks per second between two offsets from the start.
    fn rate(&self, from: Duration, to: Duration) -> f64 {
        let (a, b) = (
            (from.as_millis() / SLOT.as_millis()) as usize,
            (to.as_millis() / SLOT.as_millis()) as usize,
        );
        let n: u64 = self
            .slots
            .get(a..b)
            .unwrap_or_default()
            .iter()
            .map(|s| s.load(Relaxed))
            .sum();
        n as f64 / (to - from).as_secs_f64()
    }
}

fn total(ts: &[&Arc<Tally>], from: Duration, to: Duration) -> f64 {
    ts.iter().map(|t| t.rate(from, to)).sum()
}

/// A producer publishing as fast as confirms allow (200 in flight), counting acks.
struct Flood {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<(u64, u64)>>,
    tally: Arc<Tally>,
}

impl Flood {
    fn start(url: String, queue: String, start: Instant) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Tally::new(start);
        let (s, t) = (stop.clone(), tally.clone());
        let task = tokio::spawn(async move {
            let conn = connect(&url, "flood-global").await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let mut pending = VecDeque::new();
            let (mut acked, mut nacked) = (0u64, 0u64);
            let mut settle = |c: Confirmation| {
                if c.is_ack() {
                    acked += 1;
                    t.ack();
                } else {
                    nacked += 1;
                }
            };
            while !s.load(Relaxed) {
                let p = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"global quota test",
                        BasicProperties::default(),
                    )
                    .await?;
                pending.push_back(p);
                if pending.len() >= 200 {
                    if let Some(p) = pending.pop_front() {
                        settle(p.await?);
                    }
                }
            }
            // Stop publishing; what is in flight settles (or the connection just goes).
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(p) = pending.pop_front() {
                    if let Ok(c) = p.await {
                        settle(c);
                    }
                }
            })
            .await;
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
            Ok((acked, nacked))
        });
        Flood { stop, task, tally }
    }

    async fn stop(self) -> Result<(u64, u64)> {
        self.stop.store(true, Relaxed);
        self.task.await.context("flood task panicked")?
    }
}

/// Three sidecars sharing the global quota, a queue, and a producer on each.
struct Fleet {
    sluices: Vec<Sluice>,
    floods: Vec<Option<Flood>>,
    start: Instant,
    _queues: Queues,
    keys: RedisKeys,
}

impl Fleet {
    async fn start(fails: [&str; 3]) -> Result<Fleet> {
        let prefix = format!("{}:", unique("sluice-test-gq"));
        let keys = RedisKeys(prefix.clone());
        let broker = Broker::connect().await?;
        let q = unique("global-quota");
        broker.queue(&q).await?;
        let queues = Queues::new([q.clone()]);
        let mut sluices = Vec::new();
        for f in fails {
            sluices.push(Sluice::start(&config(&prefix, f)).await?);
        }
        // Each sidecar connects to Redis before producers arrive.
        for s in &sluices {
            wait_metric(s, "sluice_coordinator_up", 1.0, Duration::from_secs(5)).await?;
        }
        let start = Instant::now();
        let floods = sluices
            .iter()
            .map(|s| Some(Flood::start(s.url.clone(), q.clone(), start)))
            .collect();
        Ok(Fleet {
            sluices,
            floods,
            start,
            _queues: queues,
            keys,
        })
    }

    fn tallies(&self) -> Vec<Arc<Tally>> {
        self.floods
            .iter()
            .flatten()
            .map(|f| f.tally.clone())
            .collect()
    }

    async fn sleep_until(&self, at: Duration) {
        tokio::time::sleep_until((self.start + at).into()).await;
    }

    async fn finish(mut self) -> Result<()> {
        for f in self.floods.iter_mut() {
            if let Some(f) = f.take() {
                f.stop().await?;
            }
        }
        for s in self.sluices.drain(..) {
            s.stop().await;
        }
        Ok(())
    }
}

async fn wait_metric(s: &Sluice, name: &str, want: f64, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let v = s.metric(name, &[]).await?;
        if v == want {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < within,
            "{name} stayed {v} (want {want}) for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn within(rate: f64, want: f64, tolerance: f64) -> bool {
    (rate - want).abs() <= want * tolerance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_hold_the_global_rate_within_ten_percent() -> Result<()> {
    let fleet = Fleet::start(["open", "open", "open"]).await?;
    let s = &fleet.sluices;
    // Warm-up: the bucket's burst (one second's worth) and the first leases are spent.
    fleet.sleep_until(Duration::from_secs(9)).await;
    let ts = fleet.tallies();
    let (from, to) = (Duration::from_secs(3), Duration::from_secs(9));
    let rates: Vec<f64> = ts.iter().map(|t| t.rate(from, to)).collect();
    let sum: f64 = rates.iter().sum();
    eprintln!(
        "global {RATE}/s: accepted {sum:.1}/s over {from:?}..{to:?}, per sidecar {rates:.1?}"
    );
    ensure!(
        within(sum, RATE, 0.10),
        "accepted {sum:.1}/s, quota {RATE}/s (per sidecar {rates:?})"
    );
    for r in &rates {
        ensure!(*r > RATE / 3.0 * 0.4, "a sidecar was starved: {rates:?}");
    }
    // The buckets are Redis's, the leases counted.
    ensure!(
        fleet.keys.count()? >= 1,
        "no bucket under the run's Redis prefix"
    );
    for x in s {
        ensure!(
            x.metric(
                "sluice_quota_lease_requests_total",
                &["quota=\"global-flood\""]
            )
            .await?
                > 0.0
        );
        ensure!(x.metric("sluice_quota_lease_grants_total", &[]).await? > 0.0);
        ensure!(
            x.metric("sluice_coordinator_latency_seconds_count", &[])
                .await?
                > 0.0
        );
        let (status, body) = x.admin_get("/readyz").await?;
        ensure!(status == 200, "/readyz {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(v["coordinator"]["up"] == true, "{body}");
        ensure!(v["coordinator"]["quotas"][0]["mode"] == "leases", "{body}");
    }
    // Dry buckets deny (sidecars asked when no token was left): the quota was the limit.
    let mut denials = 0.0;
    for x in s {
        denials += x.metric("sluice_quota_lease_denials_total", &[]).await?;
    }
    ensure!(
        denials > 0.0,
        "no lease was ever denied: the quota never bound"
    );
    fleet.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sidecars_share_goes_to_the_others_within_seconds() -> Result<()> {
    let mut fleet = Fleet::start(["open", "open", "open"]).await?;
    fleet.sleep_until(Duration::from_secs(5)).await;
    let ts = fleet.tallies();
    let before = total(
        &ts.iter().collect::<Vec<_>>(),
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    // The third producer goes idle: it stops publishing and its last publishes settle.
    if let Some(f) = fleet.floods.get_mut(2).and_then(Option::take) {
        f.stop().await?;
    }
    let idle_at = fleet.start.elapsed();
    fleet.sleep_until(idle_at + Duration::from_secs(8)).await;
    let two = [&ts[0], &ts[1]];
    // First second-long window (sliding by 100 ms) in which the two others reach 90%.
    let mut caught_up = None;
    let mut at = idle_at;
    while at + Duration::from_secs(1) <= idle_at + Duration::from_secs(8) {
        if total(&two, at, at + Duration::from_secs(1)) >= RATE * 0.9 {
            caught_up = Some(at + Duration::from_secs(1) - idle_at);
            break;
        }
        at += SLOT;
    }
    let (from, to) = (
        idle_at + Duration::from_secs(3),
        idle_at + Duration::from_secs(8),
    );
    let after = total(&two, from, to);
    let ramp: Vec<String> = (0..8)
        .map(|i| {
            let a = idle_at + Duration::from_millis(500 * i);
            format!("{:.0}", total(&two, a, a + Duration::from_millis(500)))
        })
        .collect();
    eprintln!("two sidecars per 500 ms after the third went idle: {ramp:?}");
    eprintln!(
        "three sidecars {before:.1}/s; one idle: the other two reach 90% of {RATE}/s after {caught_up:?}, \
         {after:.1}/s over 3..8 s after"
    );
    ensure!(
        within(after, RATE, 0.10),
        "two sidecars accepted {after:.1}/s after the third went idle, quota {RATE}/s"
    );
    ensure!(
        caught_up.is_some_and(|d| d <= Duration::from_secs(3)),
        "the idle sidecar's share took {caught_up:?} to move"
    );
    let returned = fleet.sluices[2]
        .metric("sluice_quota_lease_tokens_returned_total", &[])
        .await?;
    eprintln!("the idle sidecar handed back {returned} tokens");
    fleet.finish().await
}

/// Stops Redis on drop if asked, then restarts it with the README's command and waits for it.
struct RedisGuard;

const REDIS_START: [&str; 14] = [
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
];

impl RedisGuard {
    fn ping() -> bool {
        std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            .unwrap_or(false)
    }

    fn stop() -> Result<RedisGuard> {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"])
            .output()
            .context("redis-cli")?;
        let guard = RedisGuard;
        for _ in 0..50 {
            if !Self::ping() {
                return Ok(guard);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!(
            "Redis still answers after shutdown: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn restart() -> Result<()> {
        if Self::ping() {
            return Ok(());
        }
        let status = std::process::Command::new("redis-server")
            .args(REDIS_START)
            .arg("/var/log/redis/ci.log")
            .status()
            .context("redis-server")?;
        ensure!(status.success(), "redis-server exited {status}");
        for _ in 0..100 {
            if Self::ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("Redis did not come back on 127.0.0.1:6379")
    }
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        if let Err(e) = Self::restart() {
            eprintln!("restarting Redis failed: {e:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_as_configured_and_recovers() -> Result<()> {
    if std::env::var("SLUICE_REDIS_FAULTS").as_deref() != Ok("1") {
        eprintln!(
            "skipped: stops Redis; run alone with SLUICE_REDIS_FAULTS=1 (make test-redis-faults)"
        );
        return Ok(());
    }
    // Two sidecars fail open (each falls back to 300/s / 3), one fails closed.
    let fleet = Fleet::start(["open", "open", "closed"]).await?;
    let s = &fleet.sluices;
    let ts = fleet.tallies();
    let all: Vec<&Arc<Tally>> = ts.iter().collect();
    fleet.sleep_until(Duration::from_secs(6)).await;
    let before = total(&all, Duration::from_secs(3), Duration::from_secs(6));
    ensure!(
        within(before, RATE, 0.10),
        "before the outage: {before:.1}/s"
    );

    let guard = RedisGuard::stop()?;
    let down_at = fleet.start.elapsed();
    for x in s {
        wait_metric(x, "sluice_coordinator_up", 0.0, Duration::from_secs(3)).await?;
    }
    let (status, body) = http(s[0].admin, "GET", "/readyz").await?;
    ensure!(
        status == 200,
        "fail-open sidecar must stay ready: {status} {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        v["coordinator"]["up"] == false && v["coordinator"]["quotas"][0]["mode"] == "fallback",
        "{body}"
    );
    let (status, body) = http(s[2].admin, "GET", "/readyz").await?;
    ensure!(
        status == 503,
        "fail-closed sidecar is not ready without Redis: {status} {body}"
    );
    ensure!(body.contains("\"mode\":\"closed\""), "{body}");

    // Measure the outage after the fallback buckets' own burst is spent.
    let (from, to) = (
        down_at + Duration::from_secs(2),
        down_at + Duration::from_secs(8),
    );
    fleet.sleep_until(to).await;
    let open = total(&[&ts[0], &ts[1]], from, to);
    let ramp: Vec<String> = (0..16)
        .map(|i| {
            let a = down_at + Duration::from_millis(500 * i);
            let b = a + Duration::from_millis(500);
            format!(
                "{:.0}/{:.0}/{:.0}",
                ts[0].rate(a, b),
                ts[1].rate(a, b),
                ts[2].rate(a, b)
            )
        })
        .collect();
    eprintln!("per sidecar per 500 ms from the stop: {ramp:?}");
    let closed = ts[2].rate(from, to);
    eprintln!(
        "Redis down: fail-open sidecars {open:.1}/s (want {:.0}), fail-closed {closed:.1}/s",
        RATE * 2.0 / 3.0
    );
    ensure!(
        within(open, RATE * 2.0 / 3.0, 0.10),
        "fail-open fallback accepted {open:.1}/s, want rate / instances each"
    );
    ensure!(
        closed <= RATE / 3.0 * 0.1,
        "fail-closed sidecar accepted {closed:.1}/s"
    );
    for x in &s[..2] {
        ensure!(x.metric("sluice_quota_fallback_checks_total", &[]).await? > 0.0);
    }
    ensure!(
        s[2].metric("sluice_quota_closed_refusals_total", &[])
            .await?
            > 0.0
    );

    // Redis comes back: every sidecar reconnects by itself.
    drop(guard);
    let back_at = fleet.start.elapsed();
    let mut reconnect = Duration::ZERO;
    for x in s {
        reconnect = reconnect
            .max(wait_metric(x, "sluice_coordinator_up", 1.0, Duration::from_secs(10)).await?);
    }
    for x in s {
        ensure!(
            x.metric("sluice_coordinator_fallback_seconds_total", &[])
                .await?
                >= 3.0
        );
    }
    // Redis restarted empty: its buckets start full, so skip their burst.
    let (from, to) = (
        back_at + reconnect + Duration::from_secs(3),
        back_at + reconnect + Duration::from_secs(8),
    );
    fleet.sleep_until(to).await;
    let after = total(&all, from, to);
    eprintln!(
        "Redis back after a stop: reconnected within {reconnect:?}, {after:.1}/s ({before:.1}/s before)"
    );
    ensure!(within(after, RATE, 0.10), "after recovery: {after:.1}/s");

    // A Redis that stops answering (paused) counts as down too, and recovers when it answers.
    let mut c = redis::Client::open(REDIS)?.get_connection()?;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query(&mut c)?;
    for x in s {
        wait_metric(x, "sluice_coordinator_up", 0.0, Duration::from_secs(2)).await?;
    }
    for x in s {
        wait_metric(x, "sluice_coordinator_up", 1.0, Duration::from_secs(8)).await?;
    }
    eprintln!("a paused Redis was detected and recovered from");
    fleet.finish().await
}

/// The global quota's limiter in force on a sidecar (and its coordinator).
fn global_of(
    s: &Sluice,
    quota: &str,
) -> (
    Option<Arc<sluice::quota::GlobalLimiter>>,
    Option<Arc<sluice::quota::Coordinator>>,
) {
    let a = s.server().runtime().active();
    let g = a
        .chain
        .quotas()
        .iter()
        .find(|q| &*q.name == quota)
        .and_then(|q| q.global.clone());
    (g, a.coordinator.clone())
}

/// Rewrite the config file and reload until the new version is in force.
async fn rewrite(s: &Sluice, path: &std::path::Path, text: &str) -> Result<()> {
    let before = s.server().runtime().active().version;
    std::fs::write(path, text)?;
    for _ in 0..100 {
        let _ = s.server().reload().await;
        if s.server().runtime().active().version > before {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the rewritten config was never applied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_leases_of_an_unchanged_global_quota() -> Result<()> {
    let prefix = format!("{}:", unique("sluice-test-gq"));
    let _keys = RedisKeys(prefix.clone());
    let dir = std::env::temp_dir().join(unique("sluice-gq-reload"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sluice.toml");
    let head = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n",
        sluice_tests::broker_addr()
    );
    let base = format!("{head}{}", config(&prefix, "open"));
    std::fs::write(&path, &base)?;
    let s = Sluice::start_file(&path).await?;
    let result = async {
        let broker = Broker::connect().await?;
        let q = unique("global-quota-reload");
        broker.queue(&q).await?;
        let _queues = Queues::new([q.clone()]);
        let conn = connect(&s.url, "flood-reload").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        for _ in 0..20 {
            let c = ch
                .basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default(),
                )
                .await?
                .await?;
            ensure!(c.is_ack());
        }
        let (g1, c1) = global_of(&s, "global-flood");
        let g1 = g1.context("no global limiter")?;
        ensure!(g1.len() == 1, "one producer holds a lease");
        let requests = s.metric("sluice_quota_lease_requests_total", &[]).await?;

        // An unrelated change: same quota, same coordinator, same leases and counters.
        let more = format!(
            "{base}\n[[quota]]\nname = \"other\"\nmatch = {{ producer = \"nobody\" }}\nmessages = \"5/s\"\n"
        );
        rewrite(&s, &path, &more).await?;
        let (g2, c2) = global_of(&s, "global-flood");
        ensure!(
            g2.as_ref().is_some_and(|g| Arc::ptr_eq(g, &g1)),
            "the unchanged global quota got new leases"
        );
        ensure!(matches!((&c1, &c2), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        ensure!(s.metric("sluice_quota_lease_requests_total", &[]).await? >= requests);

        // A changed rate starts afresh; so does a changed [coordination].
        rewrite(&s, &path, &more.replace("messages = \"300/s\"", "messages = \"200/s\"")).await?;
        let (g3, c3) = global_of(&s, "global-flood");
        ensure!(g3.is_some_and(|g| !Arc::ptr_eq(&g, &g1)));
        ensure!(matches!((&c1, &c3), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        let moved = more.replace(&prefix, &format!("{prefix}moved:"));
        rewrite(&s, &path, &moved).await?;
        let (_, c4) = global_of(&s, "global-flood");
        ensure!(matches!((&c1, &c4), (Some(a), Some(b)) if !Arc::ptr_eq(a, b)));
        let _ = conn.close(200, "done".into()).await;
        anyhow::Ok(())
    }
    .await;
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn lease_script_grants_refills_by_redis_time_and_takes_tokens_back() -> Result<()> {
    let keys = RedisKeys(format!("{}:", unique("sluice-test-gq-script")));
    let key = format!("{}{{q:p}}:m", keys.0);
    let mut c = redis::Client::open(REDIS)?.get_connection()?;
    let script = redis::Script::new(sluice::quota::global::LEASE_SCRIPT);
    let mut call = |want: i64| -> Result<Vec<i64>> {
        Ok(script
            .key(&key)
            .arg(100.0)
            .arg(50)
            .arg(want)
            .invoke(&mut c)?)
    };
    // A new bucket starts full (burst 50): 30 granted, 20 left.
    ensure!(call(30)? == vec![30, 0, 20]);
    // Asking for more than is left grants what is left; the wait is the time to one token
    // at 100/s (10 ms), give or take the time that passed.
    let v = call(40)?;
    ensure!(v[0] >= 20 && v[0] <= 21 && v[2] == 0, "{v:?}");
    ensure!(v[1] > 0 && v[1] <= 10_000, "{v:?}");
    // Refilled by Redis's clock: after 100 ms about 10 tokens.
    std::thread::sleep(Duration::from_millis(100));
    let v = call(50)?;
    ensure!((9..=13).contains(&v[0]), "{v:?}");
    // Handing back: tokens return to the bucket, never above the burst.
    let v = call(-100)?;
    ensure!(v[0] == 0 && v[2] == 50, "{v:?}");
    // The key expires once the bucket would be full again.
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c)?;
    ensure!(ttl > 0 && ttl <= 1_000, "ttl {ttl}");
    Ok(())
}
