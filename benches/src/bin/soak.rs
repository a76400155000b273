//! `soak`: run a sluice process under mixed load for N minutes and check that it holds up: RSS
//! flat, file descriptors back to their baseline, every confirmed message in the broker.
//!
//! The load, all through one sluice started here with a generated config:
//! - confirmed publishers (windows of 64 unconfirmed), one of them over a quota that sheds
//!   (so sluice nacks and renumbers confirms the whole time);
//! - a publisher without confirms and a publisher confirming each message, each with a consumer
//!   acking what it gets;
//! - connection churn: short connections that publish a few confirmed messages and close, and
//!   raw sockets that say the protocol header and vanish;
//! - a `[[policy]]` running `hostile_trap.wasm` (`fail = "open"`) that traps on one message
//!   every 10 s (the instance is rebuilt, the message forwarded);
//! - a config reload every minute (the shedding quota's rate changes), by SIGHUP and
//!   `POST /v1/reload` in turn.
//!
//! Run it with `benches/soak/run` (builds sluice and this tool in release mode first).

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ExchangeKind, PublisherConfirm};
use sluice_benches::loadgen::{connect, settled_depth};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Run sluice under mixed load and report RSS over time, file descriptors and a loss check.
#[derive(Parser, Debug)]
#[command(name = "soak", version, about)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The sluice binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// The trapping plugin (built by `make plugins`).
    #[arg(long, default_value = "plugins/dist/hostile_trap.wasm")]
    plugin: PathBuf,
    /// The broker sluice forwards to.
    #[arg(long, default_value = "127.0.0.1:5672")]
    upstream: String,
    /// AMQP port sluice listens on (loopback).
    #[arg(long, default_value_t = 5693)]
    port: u16,
    /// Admin API port (loopback).
    #[arg(long, default_value_t = 9193)]
    admin_port: u16,
    /// Messages per second of each of the two confirmed publishers.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds between config reloads.
    #[arg(long, default_value_t = 60)]
    reload_secs: u64,
    /// Seconds between samples of RSS, file descriptors and metrics.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Where the config, the token and sluice's log go (a fresh directory under /tmp by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Counts of one stream of load.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    consumed: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counts {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Relaxed);
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }
    fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

/// One sample of the sluice process.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    t_s: f64,
    rss_kib: u64,
    fds: usize,
    connections: f64,
    buffered_bytes: f64,
    reloads_ok: f64,
    reloads_error: f64,
    plugin_traps: f64,
}

struct Names {
    confirmed: String,
    unconfirmed: String,
    each: String,
    trap_queue: String,
    trap_exchange: String,
}

impl Names {
    fn new() -> Names {
        let id = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        Names {
            confirmed: format!("soak-confirmed-{id}"),
            unconfirmed: format!("soak-unconfirmed-{id}"),
            each: format!("soak-each-{id}"),
            trap_queue: format!("soak-trap-{id}"),
            trap_exchange: format!("soak-trap-x-{id}"),
        }
    }
    fn queues(&self) -> [&str; 4] {
        [
            &self.confirmed,
            &self.unconfirmed,
            &self.each,
            &self.trap_queue,
        ]
    }
}

fn config_text(a: &Args, dir: &Path, shed_rate: u32) -> String {
    format!(
        r#"# Generated by benches soak: reloaded every minute with another shed rate.
[admin]
listen = "127.0.0.1:{admin}"
token_file = "{dir}/token"

[[listener]]
name = "amqp"
protocol = "amqp091"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"

[identity]
from = ["client_property:connection_name", "peer_ip"]

[[quota]]
name = "soak-shed"
match = {{ producer = "soak-shed-*" }}
messages = "{shed_rate}/s"
burst = 20
on_exceed = "shed"

[[policy]]
name = "trap"
plugin = "{plugin}"
fail = "open"
"#,
        admin = a.admin_port,
        dir = dir.display(),
        port = a.port,
        upstream = a.upstream,
        plugin = a.plugin.display(),
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A plain HTTP/1.1 request to the admin API; returns (status, body).
async fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("admin API: connect timed out")??;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .context("admin API: no answer")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sum of the series of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

async fn sample(admin: &str, pid: u32, start: Instant) -> Sample {
    let text = http(admin, "GET", "/metrics", None)
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    Sample {
        t_s: start.elapsed().as_secs_f64(),
        rss_kib: rss_kib(pid),
        fds: open_fds(pid),
        connections: metric(&text, "sluice_connections", &[]),
        buffered_bytes: metric(&text, "sluice_buffered_bytes", &[]),
        reloads_ok: metric(&text, "sluice_config_reloads_total", &["result=\"ok\""]),
        reloads_error: metric(&text, "sluice_config_reloads_total", &["result=\"error\""]),
        plugin_traps: metric(&text, "sluice_plugin_errors_total", &["kind=\"trap\""]),
    }
}

async fn settle(c: PublisherConfirm, counts: &Counts) {
    match c.await {
        Ok(Confirmation::Ack(_)) => {
            counts.acked.fetch_add(1, Relaxed);
        }
        Ok(Confirmation::Nack(_)) => {
            counts.nacked.fetch_add(1, Relaxed);
        }
        Ok(Confirmation::NotRequested) => {}
        Err(e) => counts.error(format!("confirm: {e}")),
    }
}

/// One publisher connection until `stop`, reconnecting after a failure (counted).
#[allow(clippy::too_many_arguments)]
async fn publisher(
    url: String,
    name: String,
    exchange: String,
    routing_key: String,
    rate: f64,
    // None: no confirms; Some(0): wait for each; Some(n): at most n unconfirmed.
    window: Option<usize>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let body = vec![b's'; 512];
    while !stop.load(Relaxed) {
        let r = async {
            let conn = connect(&url, &name).await?;
            let ch = conn.create_channel().await?;
            if window.is_some() {
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending = VecDeque::new();
            while !stop.load(Relaxed) {
                tick.tick().await;
                let c = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await?;
                counts.sent.fetch_add(1, Relaxed);
                if let Some(w) = window {
                    pending.push_back(c);
                    while pending.len() > w {
                        if let Some(c) = pending.pop_front() {
                            settle(c, &counts).await;
                        }
                    }
                }
            }
            while let Some(c) = pending.pop_front() {
                settle(c, &counts).await;
            }
            conn.close(200, "soak done".into()).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = r {
            counts.error(format!("{name}: {e:#}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A consumer acking each delivery; after `stop` it drains the queue (until 2 s pass without a
/// delivery) and closes.
async fn consumer(url: String, queue: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    loop {
        let r = async {
            let conn = connect(&url, &format!("soak-consumer-{queue}")).await?;
            let ch = conn.create_channel().await?;
            ch.basic_qos(100, BasicQosOptions::default()).await?;
            let mut deliveries = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            loop {
                let idle = if stop.load(Relaxed) {
                    Duration::from_secs(2)
                } else {
                    Duration::from_millis(500)
                };
                match tokio::time::timeout(idle, deliveries.next()).await {
                    Ok(Some(d)) => {
                        d?.ack(BasicAckOptions::default()).await?;
                        counts.consumed.fetch_add(1, Relaxed);
                    }
                    Ok(None) => bail!("consumer cancelled"),
                    Err(_) if stop.load(Relaxed) => break,
                    Err(_) => {}
                }
            }
            conn.close(200, "soak done".into()).await?;
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => {
                counts.error(format!("consumer of {queue}: {e:#}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Short connections: three in four connect, publish 5 confirmed messages and close; one in
/// four is a raw socket that sends the protocol header, reads `connection.start` and vanishes.
async fn churn(
    url: String,
    addr: String,
    queue: String,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0u64;
    while !stop.load(Relaxed) {
        i += 1;
        if i.is_multiple_of(4) {
            let r = async {
                let mut s = tokio::net::TcpStream::connect(&addr).await?;
                s.write_all(b"AMQP\x00\x00\x09\x01").await?;
                let mut buf = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = r {
                counts.error(format!("raw churn: {e:#}"));
            }
        } else {
            let r = async {
                let conn = connect(&url, &format!("soak-churn-{}", i % 8)).await?;
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                let mut pending = Vec::new();
                for _ in 0..5 {
                    pending.push(
                        ch.basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            b"churn",
                            BasicProperties::default(),
                        )
                        .await?,
                    );
                    counts.sent.fetch_add(1, Relaxed);
                }
                for c in pending {
                    settle(c, &counts).await;
                }
                conn.close(200, "churn".into()).await?;
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = r {
                counts.error(format!("churn: {e:#}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every 10 s, one confirmed publish with routing key `panic`, on which `hostile_trap` traps.
async fn trapper(url: String, exchange: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    while !stop.load(Relaxed) {
        let r = async {
            let conn = connect(&url, "soak-trap").await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            while !stop.load(Relaxed) {
                let c = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        "panic".into(),
                        BasicPublishOptions::default(),
                        b"trap",
                        BasicProperties::default(),
                    )
                    .await?;
                counts.sent.fetch_add(1, Relaxed);
                settle(c, &counts).await;
                for _ in 0..100 {
                    if stop.load(Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            conn.close(200, "soak done".into()).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = r {
            counts.error(format!("trap publisher: {e:#}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn setup_broker(broker_url: &str, n: &Names) -> Result<Connection> {
    let conn = connect(broker_url, "soak-setup").await?;
    let ch = conn.create_channel().await?;
    for q in n.queues() {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare {q}"))?;
    }
    ch.exchange_declare(
        n.trap_exchange.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        n.trap_queue.as_str().into(),
        n.trap_exchange.as_str().into(),
        "panic".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(conn)
}

async fn cleanup_broker(broker_url: &str, n: &Names) {
    let Ok(conn) = connect(broker_url, "soak-cleanup").await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in n.queues() {
            let _ = ch
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(
                n.trap_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "soak cleanup".into()).await;
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Least-squares slope of RSS over time, in KiB per minute.
fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.t_s).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.t_s - mx) * (s.rss_kib as f64 - my);
        den += (s.t_s - mx).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

async fn run(a: Args) -> Result<bool> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("sluice-soak-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let plugin = std::fs::canonicalize(&a.plugin)
        .with_context(|| format!("{}: run `make plugins` first", a.plugin.display()))?;
    let a = Args { plugin, ..a };
    let token = format!(
        "soak-{:x}",
        u64::from(std::process::id()).wrapping_mul(2654435761)
    );
    std::fs::write(dir.join("token"), &token)?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, config_text(&a, &dir, 100))?;
    let broker_url = format!("amqp://guest:guest@{}/%2f", a.upstream);
    let names = Names::new();
    let setup = setup_broker(&broker_url, &names).await?;
    let result = soak(&a, &dir, &config, &token, &names, setup).await;
    cleanup_broker(&broker_url, &names).await;
    result
}

async fn soak(
    a: &Args,
    dir: &Path,
    config: &Path,
    token: &str,
    names: &Names,
    setup: Connection,
) -> Result<bool> {
    let broker_url = format!("amqp://guest:guest@{}/%2f", a.upstream);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", a.port);
    let admin = format!("127.0.0.1:{}", a.admin_port);

    let log = std::fs::File::create(dir.join("sluice.log"))?;
    let mut child = tokio::process::Command::new(&a.sluice)
        .arg("run")
        .arg("-c")
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", a.sluice.display()))?;
    let pid = child.id().context("sluice exited at once")?;
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http(&admin, "GET", "/readyz", None).await {
            break;
        }
        if Instant::now() > ready {
            bail!("sluice not ready within 30 s; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Settle, then take the baseline with sluice idle (its own probe connection included).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    let baseline = sample(&admin, pid, start).await;
    eprintln!(
        "soak: sluice pid {pid} ready; baseline RSS {} KiB, {} fds; {} min of load; files in {}",
        baseline.rss_kib,
        baseline.fds,
        a.minutes,
        dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(Counts::default());
    let shed = Arc::new(Counts::default());
    let unconfirmed = Arc::new(Counts::default());
    let each = Arc::new(Counts::default());
    let churned = Arc::new(Counts::default());
    let trapped = Arc::new(Counts::default());
    let mut load = tokio::task::JoinSet::new();
    for i in 0..2 {
        load.spawn(publisher(
            url.clone(),
            format!("soak-confirm-{i}"),
            String::new(),
            names.confirmed.clone(),
            a.rate,
            Some(64),
            confirmed.clone(),
            stop.clone(),
        ));
    }
    load.spawn(publisher(
        url.clone(),
        "soak-shed-0".into(),
        String::new(),
        names.confirmed.clone(),
        150.0,
        Some(64),
        shed.clone(),
        stop.clone(),
    ));
    load.spawn(publisher(
        url.clone(),
        "soak-noconfirm-0".into(),
        String::new(),
        names.unconfirmed.clone(),
        200.0,
        None,
        unconfirmed.clone(),
        stop.clone(),
    ));
    load.spawn(publisher(
        url.clone(),
        "soak-each-0".into(),
        String::new(),
        names.each.clone(),
        20.0,
        Some(0),
        each.clone(),
        stop.clone(),
    ));
    load.spawn(churn(
        url.clone(),
        format!("127.0.0.1:{}", a.port),
        names.confirmed.clone(),
        churned.clone(),
        stop.clone(),
    ));
    load.spawn(trapper(
        url.clone(),
        names.trap_exchange.clone(),
        trapped.clone(),
        stop.clone(),
    ));
    let mut consumers = tokio::task::JoinSet::new();
    consumers.spawn(consumer(
        url.clone(),
        names.unconfirmed.clone(),
        unconfirmed.clone(),
        stop.clone(),
    ));
    consumers.spawn(consumer(
        url.clone(),
        names.each.clone(),
        each.clone(),
        stop.clone(),
    ));

    let run_for = Duration::from_secs_f64(a.minutes * 60.0);
    let mut samples = vec![baseline.clone()];
    let mut next_reload = Duration::from_secs(a.reload_secs);
    let mut reloads_sent = 0u32;
    let mut reload_failures = Vec::new();
    let mut next_sample = Duration::from_secs(a.sample_secs);
    let mut next_report = Duration::from_secs(60);
    while start.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "sluice exited during the soak ({status}); see {}",
                dir.join("sluice.log").display()
            );
        }
        let el = start.elapsed();
        if el >= next_sample {
            next_sample += Duration::from_secs(a.sample_secs);
            samples.push(sample(&admin, pid, start).await);
        }
        if el >= next_reload && el + Duration::from_secs(5) < run_for {
            next_reload += Duration::from_secs(a.reload_secs);
            reloads_sent += 1;
            let rate = if reloads_sent % 2 == 1 { 120 } else { 100 };
            std::fs::write(config, config_text(a, dir, rate))?;
            if reloads_sent % 2 == 1 {
                let ok = std::process::Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    reload_failures.push(format!("reload {reloads_sent}: kill -HUP failed"));
                }
            } else {
                match http(&admin, "POST", "/v1/reload", Some(token)).await {
                    Ok((200, _)) => {}
                    Ok((code, body)) => reload_failures.push(format!(
                        "reload {reloads_sent}: POST /v1/reload answered {code}: {}",
                        body.trim()
                    )),
                    Err(e) => reload_failures.push(format!("reload {reloads_sent}: {e:#}")),
                }
            }
        }
        if el >= next_report {
            next_report += Duration::from_secs(60);
            if let Some(s) = samples.last() {
                eprintln!(
                    "soak: {:>4.1} min  RSS {:>7} KiB  fds {:>4}  connections {:>3}  confirmed {}  shed-nacked {}  traps {}  reloads ok {}",
                    el.as_secs_f64() / 60.0,
                    s.rss_kib,
                    s.fds,
                    s.connections,
                    confirmed.acked.load(Relaxed) + churned.acked.load(Relaxed),
                    shed.nacked.load(Relaxed),
                    s.plugin_traps,
                    s.reloads_ok
                );
            }
        }
    }
    let load_end = samples.last().cloned().unwrap_or(baseline.clone());

    // Stop the load, let consumers drain, and wait for every connection to be gone.
    stop.store(true, Relaxed);
    while load.join_next().await.is_some() {}
    while consumers.join_next().await.is_some() {}
    let _ = setup.close(200, "soak setup done".into()).await;
    let quiet = Instant::now() + Duration::from_secs(30);
    let mut after = sample(&admin, pid, start).await;
    while (after.connections > 0.0 || after.fds > baseline.fds) && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = sample(&admin, pid, start).await;
    }
    samples.push(after.clone());

    // Loss check, straight on the broker.
    let depth_confirmed = settled_depth(&broker_url, &names.confirmed).await?;
    let depth_unconfirmed = settled_depth(&broker_url, &names.unconfirmed).await?;
    let depth_each = settled_depth(&broker_url, &names.each).await?;
    let depth_trap = settled_depth(&broker_url, &names.trap_queue).await?;

    // Stop sluice as an orchestrator would.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let exit_ok = matches!(&exit, Ok(Ok(s)) if s.success());
    let log_text = std::fs::read_to_string(dir.join("sluice.log")).unwrap_or_default();
    // A plugin's own panic is logged as its output (and is the trap this soak provokes); a
    // panic of sluice itself is not.
    let panics = log_text
        .lines()
        .filter(|l| l.contains("panicked at") && !l.contains("plugin output"))
        .count();
    let errors = log_text.lines().filter(|l| l.contains("ERROR")).count();

    // RSS: flat once warmed up (the first fifth of the run, at most 2 minutes).
    let warm = (run_for.as_secs_f64() / 5.0).min(120.0);
    let loaded: Vec<Sample> = samples
        .iter()
        .filter(|s| s.t_s >= warm && s.t_s <= run_for.as_secs_f64() + 0.5)
        .cloned()
        .collect();
    let head = median(loaded.iter().take(3).map(|s| s.rss_kib).collect());
    let tail = median(loaded.iter().rev().take(3).map(|s| s.rss_kib).collect());
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let slope = slope_kib_per_min(&loaded);
    let growth = tail as f64 - head as f64;
    let rss_flat = growth <= (head as f64 * 0.10).max(4096.0);

    let acked_into_confirmed =
        confirmed.acked.load(Relaxed) + shed.acked.load(Relaxed) + churned.acked.load(Relaxed);
    let each_landed = each.consumed.load(Relaxed) + depth_each;
    let unconfirmed_landed = unconfirmed.consumed.load(Relaxed) + depth_unconfirmed;
    let no_loss = depth_confirmed == acked_into_confirmed
        && each_landed >= each.acked.load(Relaxed)
        && depth_trap == trapped.acked.load(Relaxed);
    let fds_back = after.fds <= baseline.fds;
    let reloads_ok = after.reloads_ok - baseline.reloads_ok;
    let reloads_refused = after.reloads_error - baseline.reloads_error;
    let traps = after.plugin_traps - baseline.plugin_traps;
    let pass = no_loss
        && fds_back
        && rss_flat
        && exit_ok
        && panics == 0
        && reload_failures.is_empty()
        && reloads_refused == 0.0
        && reloads_ok >= f64::from(reloads_sent)
        && (traps >= 1.0 || a.minutes < 0.2);

    let mut r = String::new();
    let _ = writeln!(
        r,
        "## sluice soak: {:.1} min, sample every {} s\n",
        a.minutes, a.sample_secs
    );
    let _ = writeln!(
        r,
        "| t (min) | RSS (MiB) | fds | connections | buffered (KiB) | reloads ok | traps |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    let every = (60 / a.sample_secs.max(1)).max(1) as usize;
    for (i, s) in samples.iter().enumerate() {
        if i % every == 0 || i + 1 == samples.len() {
            let _ = writeln!(
                r,
                "| {:.1} | {:.1} | {} | {} | {:.1} | {} | {} |",
                s.t_s / 60.0,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.connections,
                s.buffered_bytes / 1024.0,
                s.reloads_ok,
                s.plugin_traps
            );
        }
    }
    let row = |name: &str, c: &Counts| {
        format!(
            "| {name} | {} | {} | {} | {} | {} |",
            c.sent.load(Relaxed),
            c.acked.load(Relaxed),
            c.nacked.load(Relaxed),
            c.consumed.load(Relaxed),
            c.errors.load(Relaxed)
        )
    };
    let _ = writeln!(
        r,
        "\n| load | sent | acked | nacked | consumed | client errors |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|");
    for (name, c) in [
        ("confirmed x2 (window 64)", &confirmed),
        ("over quota, shed (window 64)", &shed),
        ("without confirms", &unconfirmed),
        ("confirm each", &each),
        ("churn (5 confirmed per connection)", &churned),
        ("trap (1 per 10 s)", &trapped),
    ] {
        let _ = writeln!(r, "{}", row(name, c));
    }
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "- RSS: baseline {:.1} MiB, after warm-up ({:.0} s) {:.1} MiB, at the end of the load {:.1} MiB, peak {:.1} MiB; growth {:+.1} MiB, slope {:+.0} KiB/min -> {}",
        baseline.rss_kib as f64 / 1024.0,
        warm,
        head as f64 / 1024.0,
        tail as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth / 1024.0,
        slope,
        if rss_flat { "flat" } else { "GROWING" }
    );
    let _ = writeln!(
        r,
        "- fds: baseline {}, under load {}, after the clients left {} -> {}",
        baseline.fds,
        load_end.fds,
        after.fds,
        if fds_back { "back to baseline" } else { "LEAK" }
    );
    let _ = writeln!(
        r,
        "- loss check: confirmed queue {depth_confirmed} messages for {acked_into_confirmed} acks (confirmed + shed-quota acks + churn); confirm-each {each_landed} consumed or queued for {} acks; trap queue {depth_trap} for {} acks -> {}",
        each.acked.load(Relaxed),
        trapped.acked.load(Relaxed),
        if no_loss {
            "nothing confirmed was lost"
        } else if depth_confirmed < acked_into_confirmed || depth_trap < trapped.acked.load(Relaxed) {
            "LOSS"
        } else {
            "MISMATCH: more messages than acks (did a nacked publish land?)"
        }
    );
    let _ = writeln!(
        r,
        "- without confirms: {} sent, {unconfirmed_landed} consumed or queued",
        unconfirmed.sent.load(Relaxed)
    );
    let _ = writeln!(
        r,
        "- reloads: {reloads_sent} sent (SIGHUP and POST /v1/reload in turn), {reloads_ok} applied, {reloads_refused} refused{}",
        if reload_failures.is_empty() {
            String::new()
        } else {
            format!("; {}", reload_failures.join("; "))
        }
    );
    let _ = writeln!(r, "- plugin traps counted by sluice: {traps}");
    let _ = writeln!(
        r,
        "- sluice after SIGTERM: {}; log: {errors} ERROR lines, {panics} panics ({})",
        match &exit {
            Ok(Ok(s)) => s.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "none within 20 s".into(),
        },
        dir.join("sluice.log").display()
    );
    for (name, c) in [
        ("confirmed", &confirmed),
        ("shed", &shed),
        ("unconfirmed", &unconfirmed),
        ("each", &each),
        ("churn", &churned),
        ("trap", &trapped),
    ] {
        if let Some(e) = c.last_error() {
            let _ = writeln!(r, "- last client error ({name}): {e}");
        }
    }
    let _ = writeln!(r, "\n**{}**", if pass { "PASS" } else { "FAIL" });
    println!("{r}");
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "minutes": a.minutes,
            "pass": pass,
            "samples": samples,
            "rss_kib": {"baseline": baseline.rss_kib, "warm": head, "end": tail, "peak": peak, "slope_kib_per_min": slope},
            "fds": {"baseline": baseline.fds, "under_load": load_end.fds, "after": after.fds},
            "loss": {
                "confirmed_queue": depth_confirmed, "acked": acked_into_confirmed,
                "each_landed": each_landed, "each_acked": each.acked.load(Relaxed),
                "trap_queue": depth_trap, "trap_acked": trapped.acked.load(Relaxed),
                "unconfirmed_sent": unconfirmed.sent.load(Relaxed), "unconfirmed_landed": unconfirmed_landed,
                "shed_nacked": shed.nacked.load(Relaxed),
            },
            "reloads": {"sent": reloads_sent, "ok": reloads_ok, "refused": reloads_refused},
            "traps": traps,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(pass)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}
