//! The end-to-end harness: in one run, the same load against the broker directly, through
//! HAProxy (TCP mode) and through sluice in three modes, alternating targets over several
//! rounds so machine noise shows; then confirm latency at half load, and resident memory per
//! idle proxied connection. Results are reported as paired ratios against direct. With `--tls`
//! the targets are TLS on every client leg instead: stunnel in front of the broker
//! (`direct-tls`) and sluice terminating TLS with a TLS upstream to that stunnel (`sluice-tls`).

pub mod idle;
pub mod procs;
pub mod report;
pub mod tls;

use crate::loadgen::{self, ConfirmMode, TaskWeight};
use anyhow::{bail, Context, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use procs::{Proc, SluiceMode};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where a leg's producers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The broker itself.
    Direct,
    /// HAProxy in TCP mode.
    Haproxy,
    /// sluice in a mode.
    Sluice(SluiceMode),
    /// TLS to the broker: stunnel terminating TLS in front of it (`--tls`).
    DirectTls,
    /// sluice terminating client TLS, TLS upstream to that stunnel, no rules (`--tls`).
    SluiceTls,
}

impl Target {
    /// Name in tables and `--targets`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Haproxy => "haproxy",
            Target::Sluice(m) => m.name(),
            Target::DirectTls => "direct-tls",
            Target::SluiceTls => "sluice-tls",
        }
    }

    /// Every target, in table order.
    pub const ALL: [Target; 7] = [
        Target::Direct,
        Target::Haproxy,
        Target::Sluice(SluiceMode::NoRules),
        Target::Sluice(SluiceMode::Quotas),
        Target::Sluice(SluiceMode::Plugin),
        Target::DirectTls,
        Target::SluiceTls,
    ];

    /// The default targets of a plain run.
    pub const PLAIN: [Target; 5] = [
        Target::Direct,
        Target::Haproxy,
        Target::Sluice(SluiceMode::NoRules),
        Target::Sluice(SluiceMode::Quotas),
        Target::Sluice(SluiceMode::Plugin),
    ];

    /// The default targets of a `--tls` run.
    pub const TLS: [Target; 2] = [Target::DirectTls, Target::SluiceTls];

    /// Whether clients speak TLS to this target.
    pub fn is_tls(self) -> bool {
        matches!(self, Target::DirectTls | Target::SluiceTls)
    }

    /// Parse a `--targets` entry.
    pub fn parse(s: &str) -> Result<Target, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown target '{s}' (direct, haproxy, sluice, sluice-quotas, sluice-plugin, \
                     direct-tls, sluice-tls)"
                )
            })
    }
}

/// One point of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Cell {
    /// Producer connections.
    pub producers: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Confirm mode, as text (`batch:256`, `none`, `each`).
    pub confirm: ConfirmLabel,
}

/// A [`ConfirmMode`] that can be ordered and serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfirmLabel(pub u32);

impl ConfirmLabel {
    /// `0` = none, `u32::MAX` = each, else the batch window.
    pub fn new(m: ConfirmMode) -> Self {
        ConfirmLabel(match m {
            ConfirmMode::None => 0,
            ConfirmMode::Each => u32::MAX,
            ConfirmMode::Batch(n) => n,
        })
    }

    /// Back to the mode.
    pub fn mode(self) -> ConfirmMode {
        match self.0 {
            0 => ConfirmMode::None,
            u32::MAX => ConfirmMode::Each,
            n => ConfirmMode::Batch(n),
        }
    }
}

impl Serialize for ConfirmLabel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.mode().to_string())
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "P={} {} {}",
            self.producers,
            report::size_label(self.size),
            self.confirm.mode()
        )
    }
}

/// Message bodies of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    /// Opaque bytes, no properties.
    Raw,
    /// Celery task messages (headers `task`, `id`…), a mix the plugin looks at.
    Celery,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Broker `host:port`.
    pub broker: String,
    /// Matrix cells.
    pub cells: Vec<Cell>,
    /// Targets, in the order of the first round (later rounds rotate it).
    pub targets: Vec<Target>,
    /// Rounds over the whole matrix.
    pub rounds: usize,
    /// Seconds of load per leg (the message count is sized from a calibration run).
    pub leg_seconds: f64,
    /// Message bodies.
    pub body: Body,
    /// The cell measured at half of its direct rate for latency (`None`: skip).
    pub latency_cell: Option<Cell>,
    /// Idle connections opened for the memory measurement (0: skip).
    pub idle_connections: usize,
    /// The sluice binary.
    pub sluice_bin: PathBuf,
    /// The HAProxy binary.
    pub haproxy_bin: String,
    /// The `celery_task_quota` plugin.
    pub plugin: PathBuf,
    /// Configs, logs and the JSON results go here.
    pub dir: PathBuf,
    /// TLS mode: `direct-tls` is the baseline, and the TLS targets may run.
    pub tls: bool,
    /// The stunnel binary (`None`: `stunnel4`, else `stunnel`).
    pub stunnel_bin: Option<String>,
}

impl Plan {
    /// The AMQP URL of the broker.
    pub fn broker_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.broker)
    }

    /// The target every ratio is taken against: `direct`, or `direct-tls` with `--tls`.
    pub fn baseline(&self) -> Target {
        if self.tls {
            Target::DirectTls
        } else {
            Target::Direct
        }
    }
}

/// One measured leg.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    /// Phase: `matrix` or `half-load`.
    pub phase: &'static str,
    /// Round (0-based).
    pub round: usize,
    /// Cell.
    pub cell: Cell,
    /// Target.
    pub target: Target,
    /// Offered rate, when paced.
    pub rate: Option<f64>,
    /// Messages published.
    pub sent: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages nacked.
    pub nacked: u64,
    /// Throughput.
    pub msg_per_s: f64,
    /// Confirm latency p50 (µs).
    pub p50_us: u64,
    /// Confirm latency p99 (µs).
    pub p99_us: u64,
    /// Confirm latency p99.9 (µs).
    pub p999_us: u64,
    /// Messages in the queue afterwards.
    pub depth: u64,
    /// Confirmed (or, without confirms, sent) messages missing from the queue.
    pub lost: u64,
    /// CPU µs per message of the proxy (none for direct and direct-tls).
    pub proxy_cpu_us: Option<f64>,
    /// CPU µs per message of stunnel, the TLS terminator in front of the broker (TLS targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stunnel_cpu_us: Option<f64>,
    /// CPU µs per message of the broker (`beam.smp`), when found.
    pub broker_cpu_us: Option<f64>,
    /// CPU µs per message of the load generator (this process).
    pub loadgen_cpu_us: f64,
    /// Producer errors.
    pub errors: Vec<String>,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Machine and software facts.
    pub facts: report::Facts,
    /// Targets skipped, with the reason.
    pub skipped: Vec<(String, String)>,
    /// The target ratios are taken against.
    pub baseline: Target,
    /// Every leg.
    pub legs: Vec<Leg>,
    /// Idle-connection memory.
    pub idle: Vec<idle::IdleRss>,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The processes under test.
struct Running {
    haproxy: Option<Proc>,
    sluice: BTreeMap<SluiceMode, Proc>,
    // Dropped (killed) before stunnel, its upstream.
    sluice_tls: Option<Proc>,
    stunnel: Option<Proc>,
}

impl Running {
    /// The proxy a target's CPU is measured on.
    fn proc(&self, t: Target) -> Option<&Proc> {
        match t {
            Target::Direct | Target::DirectTls => None,
            Target::Haproxy => self.haproxy.as_ref(),
            Target::Sluice(m) => self.sluice.get(&m),
            Target::SluiceTls => self.sluice_tls.as_ref(),
        }
    }

    /// Where a target's clients connect.
    fn url(&self, t: Target, broker_url: &str) -> Result<String> {
        let missing = || anyhow::anyhow!("{} is not running", t.name());
        Ok(match t {
            Target::Direct => broker_url.to_string(),
            Target::DirectTls => tls::url(self.stunnel.as_ref().ok_or_else(missing)?.addr.port()),
            Target::SluiceTls => {
                tls::url(self.sluice_tls.as_ref().ok_or_else(missing)?.addr.port())
            }
            _ => self.proc(t).ok_or_else(missing)?.url(),
        })
    }
}

/// Runs a plan.
pub struct Harness {
    plan: Plan,
    ticks: f64,
    broker_pid: Option<u32>,
    admin: Option<(lapin::Connection, Channel)>,
    legs_run: usize,
    tasks: Vec<TaskWeight>,
    pki: Option<tls::Pki>,
    stunnel_bin: String,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

impl Harness {
    /// A harness for `plan`.
    pub fn new(plan: Plan) -> Self {
        Harness {
            plan,
            ticks: procs::clock_ticks(),
            broker_pid: procs::find_pid("beam.smp"),
            admin: None,
            legs_run: 0,
            tasks: crate::loadgen::parse_tasks(
                "orders.confirm:80,auth.login:10,reports.rebuild:10",
            )
            .unwrap_or_default(),
            pki: None,
            stunnel_bin: String::new(),
        }
    }

    /// Check configs, start the targets, run every phase, stop the targets.
    pub async fn run(&mut self) -> Result<Results> {
        let started = Instant::now();
        std::fs::create_dir_all(&self.plan.dir)?;
        let mut skipped = Vec::new();
        if self.plan.tls {
            self.stunnel_bin = tls::find_stunnel(self.plan.stunnel_bin.as_deref())?;
            self.pki = Some(tls::Pki::generate(&self.plan.dir).context("generate the test CA")?);
        } else if let Some(t) = self.plan.targets.iter().find(|t| t.is_tls()) {
            bail!("target {} needs --tls", t.name());
        }
        let targets = self.usable_targets(&mut skipped)?;
        self.plan.targets = targets;
        let conn = loadgen::connect(&self.plan.broker_url(), "e2e-admin").await?;
        let ch = conn.create_channel().await?;
        self.admin = Some((conn, ch));

        let running = self.start_targets()?;
        let mut legs = Vec::new();
        let result = self.phases(&running, &mut legs).await;
        drop(running);
        if let Err(e) = result {
            eprintln!("e2e: run stopped early: {e:#}");
            skipped.push(("(run)".into(), format!("stopped early: {e:#}")));
        }
        // Idle connections are plain AMQP through HAProxy or sluice: a TLS-only run has none.
        let plain_proxy = self
            .plan
            .targets
            .iter()
            .any(|t| matches!(t, Target::Haproxy | Target::Sluice(_)));
        let idle = if self.plan.idle_connections > 0 && plain_proxy {
            match idle::measure(&self.plan, &self.plan.targets).await {
                Ok(v) => v,
                Err(e) => {
                    skipped.push(("idle RSS".into(), format!("{e:#}")));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if let Some((conn, _)) = self.admin.take() {
            let _ = conn.close(200, "e2e done".into()).await;
        }
        Ok(Results {
            facts: report::Facts::gather(&self.plan),
            skipped,
            baseline: self.plan.baseline(),
            legs,
            idle,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Drop targets that cannot run here (no HAProxy binary, a sluice mode its config check
    /// rejects), saying why.
    fn usable_targets(&self, skipped: &mut Vec<(String, String)>) -> Result<Vec<Target>> {
        if !self.plan.sluice_bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p sluice` (or pass --sluice-bin)",
                self.plan.sluice_bin.display()
            );
        }
        let mut out = Vec::new();
        for &t in &self.plan.targets {
            match t {
                Target::Direct | Target::DirectTls => out.push(t),
                Target::SluiceTls => {
                    let Some(pki) = self.pki.as_ref() else {
                        bail!("sluice-tls needs --tls");
                    };
                    let path = self.plan.dir.join("sluice-tls-check.toml");
                    std::fs::write(&path, tls::sluice_tls_config(1, 2, pki))?;
                    match procs::check_sluice_config(&self.plan.sluice_bin, &path) {
                        Ok(()) => out.push(t),
                        Err(why) => {
                            eprintln!(
                                "e2e: skipping sluice-tls: `sluice check` rejects its config:\n{why}"
                            );
                            skipped.push((
                                t.name().into(),
                                format!("`sluice check` rejected the config: {why}"),
                            ));
                        }
                    }
                }
                Target::Haproxy => {
                    let ok = std::process::Command::new(&self.plan.haproxy_bin)
                        .arg("-v")
                        .output()
                        .is_ok_and(|o| o.status.success());
                    if ok {
                        out.push(t);
                    } else {
                        let why = format!(
                            "`{} -v` failed: install it with `apt-get install -y haproxy`",
                            self.plan.haproxy_bin
                        );
                        eprintln!("e2e: skipping haproxy: {why}");
                        skipped.push(("haproxy".into(), why));
                    }
                }
                Target::Sluice(m) => {
                    if m == SluiceMode::Plugin && !self.plan.plugin.exists() {
                        let why = format!(
                            "{} is missing: run `make plugins`",
                            self.plan.plugin.display()
                        );
                        eprintln!("e2e: skipping {}: {why}", m.name());
                        skipped.push((m.name().into(), why));
                        continue;
                    }
                    let path = self.plan.dir.join(format!("{}-check.toml", m.name()));
                    let port = procs::free_port()?;
                    std::fs::write(
                        &path,
                        procs::sluice_config(m, port, &self.plan.broker, &self.plan.plugin),
                    )?;
                    match procs::check_sluice_config(&self.plan.sluice_bin, &path) {
                        Ok(()) => out.push(t),
                        Err(why) => {
                            eprintln!(
                                "e2e: skipping {}: `sluice check` rejects its config:\n{why}",
                                m.name()
                            );
                            skipped.push((
                                m.name().into(),
                                format!("`sluice check` rejected the config: {why}"),
                            ));
                        }
                    }
                }
            }
        }
        let base = self.plan.baseline();
        if !out.contains(&base) {
            bail!(
                "the {} target is the baseline of every ratio; keep it in --targets",
                base.name()
            );
        }
        Ok(out)
    }

    fn start_targets(&self) -> Result<Running> {
        let mut r = Running {
            haproxy: None,
            sluice: BTreeMap::new(),
            sluice_tls: None,
            stunnel: None,
        };
        if let (Some(pki), true) = (&self.pki, self.plan.targets.iter().any(|t| t.is_tls())) {
            let st = tls::start_stunnel(
                &self.stunnel_bin,
                &self.plan.dir,
                &self.plan.broker,
                pki,
                "",
            )?;
            if self.plan.targets.contains(&Target::SluiceTls) {
                r.sluice_tls = Some(tls::start_sluice_tls(
                    &self.plan.sluice_bin,
                    &self.plan.dir,
                    st.addr.port(),
                    pki,
                )?);
            }
            r.stunnel = Some(st);
        }
        for &t in &self.plan.targets {
            match t {
                Target::Direct | Target::DirectTls | Target::SluiceTls => {}
                Target::Haproxy => {
                    r.haproxy = Some(procs::start_haproxy(
                        &self.plan.haproxy_bin,
                        &self.plan.dir,
                        &self.plan.broker,
                    )?)
                }
                Target::Sluice(m) => {
                    let p = procs::start_sluice(
                        &self.plan.sluice_bin,
                        &self.plan.dir,
                        m,
                        &self.plan.broker,
                        &self.plan.plugin,
                        "",
                    )?;
                    r.sluice.insert(m, p);
                }
            }
        }
        Ok(r)
    }

    async fn phases(&mut self, running: &Running, legs: &mut Vec<Leg>) -> Result<()> {
        let plan = self.plan.clone();
        let base = plan.baseline();
        // Calibrate: a short direct run per cell sizes the legs (and warms the broker up).
        let mut counts = BTreeMap::new();
        for &cell in &plan.cells {
            let n0 = ((20_000_000 / cell.size.max(1)) as u64).clamp(300, 20_000);
            let n0 = n0.max(cell.producers as u64 * 20);
            let l = self
                .leg("calibrate", 0, cell, base, running, n0, None)
                .await?;
            let n = ((l.msg_per_s * plan.leg_seconds) as u64).max(cell.producers as u64 * 20);
            eprintln!(
                "e2e: {cell}: {} ≈ {:.0} msg/s → {n} messages per leg",
                base.name(),
                l.msg_per_s
            );
            counts.insert(cell, n);
        }
        for &t in &plan.targets {
            if t != base {
                if let Some(&cell) = plan.cells.first() {
                    let n = counts[&cell] / 4;
                    self.leg("warmup", 0, cell, t, running, n, None).await?;
                }
            }
        }
        let total = plan.rounds * plan.cells.len() * plan.targets.len();
        eprintln!("e2e: matrix: {total} legs of ~{:.1} s", plan.leg_seconds);
        for round in 0..plan.rounds {
            for (ci, &cell) in plan.cells.iter().enumerate() {
                let k = plan.targets.len();
                for i in 0..k {
                    let t = plan.targets[(i + round + ci) % k];
                    let l = self
                        .leg("matrix", round, cell, t, running, counts[&cell], None)
                        .await?;
                    legs.push(l);
                }
            }
        }
        if let Some(cell) = plan.latency_cell {
            let direct: Vec<f64> = legs
                .iter()
                .filter(|l| l.cell == cell && l.target == base)
                .map(|l| l.msg_per_s)
                .collect();
            let max = if direct.is_empty() {
                self.leg("calibrate", 0, cell, base, running, 20_000, None)
                    .await?
                    .msg_per_s
            } else {
                median(direct)
            };
            let rate = (max / 2.0).max(1.0);
            let n = ((rate * plan.leg_seconds) as u64).max(cell.producers as u64 * 20);
            eprintln!("e2e: half load: {cell} at {rate:.0} msg/s ({n} messages per leg)");
            for round in 0..plan.rounds {
                let k = plan.targets.len();
                for i in 0..k {
                    let t = plan.targets[(i + round) % k];
                    let l = self
                        .leg("half-load", round, cell, t, running, n, Some(rate))
                        .await?;
                    legs.push(l);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn leg(
        &mut self,
        phase: &'static str,
        round: usize,
        cell: Cell,
        target: Target,
        running: &Running,
        messages: u64,
        rate: Option<f64>,
    ) -> Result<Leg> {
        let Some((_, admin)) = &self.admin else {
            bail!("no admin connection");
        };
        self.legs_run += 1;
        let queue = format!("e2e-{}-{}", std::process::id(), self.legs_run);
        admin
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declare {queue}"))?;
        let proc = running.proc(target);
        let url = running.url(target, &self.plan.broker_url())?;
        let stunnel = if target.is_tls() {
            running.stunnel.as_ref().map(Proc::pid)
        } else {
            None
        };
        let mut cfg = loadgen::Config::new(&url, &queue);
        if target.is_tls() {
            cfg.tls_ca = self.pki.as_ref().map(|p| p.ca.clone());
        }
        cfg.broker_url = None;
        cfg.producers = cell.producers;
        cfg.messages = messages;
        cfg.size = cell.size;
        cfg.confirm = cell.confirm.mode();
        cfg.rate = rate;
        cfg.name_prefix = format!("e2e-{}", target.name());
        cfg.timeout = Duration::from_secs_f64((self.plan.leg_seconds * 30.0).max(120.0));
        if self.plan.body == Body::Celery {
            cfg.tasks = Some(self.tasks.clone());
        }
        let me = std::process::id();
        // The proxies and the broker keep their threads: schedstat's nanoseconds. This process
        // starts and ends a lapin I/O thread per connection: tick-based totals that keep them.
        let cpu = |pid: Option<u32>| {
            pid.and_then(|p| {
                procs::cpu_seconds_precise(p).or_else(|| procs::cpu_seconds(p, self.ticks).ok())
            })
        };
        let own = || procs::cpu_seconds(me, self.ticks).ok();
        // stunnel runs a thread per connection, ended with it: tick-based totals too.
        let tunnel = || stunnel.and_then(|p| procs::cpu_seconds(p, self.ticks).ok());
        let before = (
            cpu(proc.map(Proc::pid)),
            cpu(self.broker_pid),
            own(),
            tunnel(),
        );
        let s = loadgen::run(&cfg).await?;
        let after = (
            cpu(proc.map(Proc::pid)),
            cpu(self.broker_pid),
            own(),
            tunnel(),
        );
        let depth = settled_depth(admin, &queue).await?;
        let _ = admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let per_msg = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if s.sent > 0 => Some((b - a) * 1e6 / s.sent as f64),
            _ => None,
        };
        let expected = if cell.confirm.mode() == ConfirmMode::None {
            s.sent
        } else {
            s.acked
        };
        let leg = Leg {
            phase,
            round,
            cell,
            target,
            rate,
            sent: s.sent,
            acked: s.acked,
            nacked: s.nacked,
            msg_per_s: s.msg_per_s,
            p50_us: s.confirm_latency.p50_us,
            p99_us: s.confirm_latency.p99_us,
            p999_us: s.confirm_latency.p999_us,
            depth,
            lost: expected.saturating_sub(depth),
            proxy_cpu_us: per_msg(before.0, after.0),
            stunnel_cpu_us: per_msg(before.3, after.3),
            broker_cpu_us: per_msg(before.1, after.1),
            loadgen_cpu_us: per_msg(before.2, after.2).unwrap_or(f64::NAN),
            errors: s.errors,
        };
        eprintln!(
            "e2e: {phase:9} r{round} {cell:24} {:14} {:>8.0} msg/s  p50 {:>6} µs  p99 {:>7} µs  \
             proxy {:>5} µs/msg  broker {:>5} µs/msg{}{}{}",
            target.name(),
            leg.msg_per_s,
            leg.p50_us,
            leg.p99_us,
            leg.proxy_cpu_us
                .map_or_else(|| "-".to_string(), |c| format!("{c:.2}")),
            leg.broker_cpu_us
                .map_or_else(|| "-".to_string(), |c| format!("{c:.1}")),
            leg.stunnel_cpu_us
                .map_or_else(String::new, |c| format!("  stunnel {c:.2} µs/msg")),
            if leg.lost > 0 {
                format!("  LOST {}", leg.lost)
            } else {
                String::new()
            },
            if leg.errors.is_empty() {
                String::new()
            } else {
                format!("  errors: {}", leg.errors.join("; "))
            }
        );
        Ok(leg)
    }
}

/// Passive-declare `queue` until two reads 100 ms apart agree (at most 10 s).
async fn settled_depth(ch: &Channel, queue: &str) -> Result<u64> {
    let depth = || async {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("passive declare {queue}"))?;
        anyhow::Ok(q.message_count() as u64)
    };
    let mut last = depth().await?;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = depth().await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

pub use report::markdown;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn targets_parse_by_name() {
        assert_eq!(
            Target::parse("sluice-quotas"),
            Ok(Target::Sluice(SluiceMode::Quotas))
        );
        assert!(Target::parse("nginx").is_err());
        assert_eq!(Target::parse("sluice-tls"), Ok(Target::SluiceTls));
        assert!(Target::TLS.iter().all(|t| t.is_tls()));
        assert!(!Target::PLAIN.iter().any(|t| t.is_tls()));
    }
}
