//! The Redis end-to-end harness: in one run, `redis-benchmark` against Redis directly, through
//! HAProxy (TCP mode) and through sluice's Redis listener in three modes, alternating targets
//! over several rounds; paired ratios against direct, CPU per request of the proxy and of
//! `redis-server`, and a check that every pushed value reached the list.

pub mod report;
pub mod resp;

use crate::e2e::procs::{self, Proc, SluiceMode};
use crate::e2e::Target;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The list `redis-benchmark -t lpush` pushes to (fixed in redis-benchmark).
pub const LPUSH_KEY: &str = "mylist";
/// The list the `celery` workload pushes to.
pub const CELERY_KEY: &str = "sluice-bench:celery";

/// What `redis-benchmark` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// `-t lpush`: `LPUSH mylist <-d bytes>`, values the plugin finds no task header in.
    Lpush,
    /// `LPUSH sluice-bench:celery <kombu envelope>`: a Celery task message (`reports.rebuild`)
    /// as kombu pushes it, so the plugin reads its `task` header.
    Celery,
}

impl Workload {
    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Lpush => "lpush",
            Workload::Celery => "celery",
        }
    }

    /// The list it pushes to.
    pub fn key(self) -> &'static str {
        match self {
            Workload::Lpush => LPUSH_KEY,
            Workload::Celery => CELERY_KEY,
        }
    }
}

/// A kombu envelope of a Celery protocol 2 task message, as Celery on `redis://` pushes it.
pub fn celery_envelope() -> String {
    let id = "9b1f3c1e-5c2d-4d8e-9a47-2f6b8e0d4c11";
    serde_json::json!({
        "body": "W1s0Ml0sIHsiZm9yY2UiOiB0cnVlfSwgeyJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAiY2hhaW4iOiBudWxsLCAiY2hvcmQiOiBudWxsfV0=",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": "reports.rebuild", "id": id, "shadow": null, "eta": null,
            "expires": null, "group": null, "group_index": null, "retries": 0,
            "timelimit": [null, null], "root_id": id, "parent_id": null,
            "argsrepr": "(42,)", "kwargsrepr": "{'force': True}",
            "origin": "gen4242@web-7f9c6d5b8-x2k4p", "ignore_result": false,
            "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}
        },
        "properties": {
            "correlation_id": id, "reply_to": "c7f1a4e2-0b7d-3c55-9d1e-6a8f2b4c9e01",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "priority": 0, "body_encoding": "base64",
            "delivery_tag": "4f0b6a52-2d6e-4f3b-8c1a-7e9d5b3a2c10"
        }
    })
    .to_string()
}

/// One point of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Cell {
    /// What is sent.
    pub workload: Workload,
    /// `-P`: commands in flight per connection.
    pub pipeline: u32,
    /// `-c`: connections.
    pub clients: u32,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -P {} -c {}",
            self.workload.name(),
            self.pipeline,
            self.clients
        )
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Redis `host:port`.
    pub redis: String,
    /// Matrix cells.
    pub cells: Vec<Cell>,
    /// Targets (direct, haproxy, sluice modes), in the order of the first round.
    pub targets: Vec<Target>,
    /// Rounds over the whole matrix.
    pub rounds: usize,
    /// Seconds of load per leg (the request count is sized from a calibration run).
    pub leg_seconds: f64,
    /// `-d`: value size of the `lpush` workload.
    pub data_size: usize,
    /// The sluice binary.
    pub sluice_bin: PathBuf,
    /// The HAProxy binary.
    pub haproxy_bin: String,
    /// The `redis-benchmark` binary.
    pub redis_benchmark_bin: String,
    /// The `celery_task_quota` plugin.
    pub plugin: PathBuf,
    /// Configs, logs and the JSON results go here.
    pub dir: PathBuf,
}

/// One measured leg.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    /// `calibrate`, `warmup` or `matrix`.
    pub phase: &'static str,
    /// Round (0-based).
    pub round: usize,
    /// Cell.
    pub cell: Cell,
    /// Target.
    pub target: Target,
    /// `-n`: requests sent.
    pub requests: u64,
    /// Requests per second, as `redis-benchmark` reports it.
    pub rps: f64,
    /// Latency reported by `redis-benchmark` (ms; `None` when its CSV has no such column).
    pub avg_ms: Option<f64>,
    /// p50 latency (ms).
    pub p50_ms: Option<f64>,
    /// p99 latency (ms).
    pub p99_ms: Option<f64>,
    /// Length of the list afterwards (read directly on Redis).
    pub list_len: u64,
    /// Requests whose value is not in the list.
    pub lost: u64,
    /// CPU µs per request of the proxy (none for direct).
    pub proxy_cpu_us: Option<f64>,
    /// CPU µs per request of `redis-server`, when found.
    pub redis_cpu_us: Option<f64>,
    /// Wall time of the `redis-benchmark` run.
    pub seconds: f64,
}

/// Machine and software facts.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// `redis_version` from `INFO server`.
    pub redis: String,
    /// `redis-benchmark --version`.
    pub redis_benchmark: String,
    /// `haproxy -v`, first line.
    pub haproxy: String,
    /// `sluice --version`.
    pub sluice: String,
    /// `/proc/loadavg` when the run started.
    pub loadavg_start: String,
    /// `/proc/loadavg` when the run ended.
    pub loadavg_end: String,
    /// Rounds and leg length.
    pub plan: String,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Machine and software facts.
    pub facts: Facts,
    /// Targets skipped, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Every leg (calibration and warm-up included, by phase).
    pub legs: Vec<Leg>,
    /// Wall time of the run.
    pub seconds: f64,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn read_trimmed(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Facts {
    fn gather(plan: &Plan, loadavg_start: String) -> Facts {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let redis = resp::info_field(&plan.redis, "server", "redis_version")
            .unwrap_or_else(|_| "unknown".into());
        Facts {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            redis,
            redis_benchmark: first_line(&plan.redis_benchmark_bin, &["--version"]),
            haproxy: first_line(&plan.haproxy_bin, &["-v"]),
            sluice: first_line(&plan.sluice_bin.to_string_lossy(), &["--version"]),
            loadavg_start,
            loadavg_end: read_trimmed("/proc/loadavg"),
            plan: format!(
                "{} rounds, ~{:.1} s per leg, lpush values of {} B",
                plan.rounds, plan.leg_seconds, plan.data_size
            ),
        }
    }
}

const NEVER_FIRES_QUOTA: &str = r#"
[[quota]]
name = "never"
match = { producer = "*" }
messages = "10000000/s"
burst = 10000000
on_exceed = "shed"
"#;

/// The sluice config of a mode: a Redis listener on `port` in front of `redis`.
pub fn sluice_config(mode: SluiceMode, port: u16, redis: &str, plugin: &Path) -> String {
    let mut s = format!(
        "# Generated by the redis_e2e harness.\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"redis\"\nprotocol = \"redis\"\n\
         listen = \"127.0.0.1:{port}\"\nupstream = \"{redis}\"\n\n\
         # redis-benchmark opens its connections at once, all with one producer identity (the\n\
         # peer address); the tarpit is not what is measured here.\n\
         [tarpit]\nrate = \"off\"\n\n\
         [limits]\nmax_connections = 20000\nmax_connections_per_producer = 20000\n"
    );
    if mode != SluiceMode::NoRules {
        s.push_str(NEVER_FIRES_QUOTA);
    }
    if mode == SluiceMode::Plugin {
        s.push_str(&format!(
            "\n[[policy]]\nname = \"celery-tasks\"\nplugin = \"{}\"\nfail = \"open\"\n\
             time_budget = \"25ms\"\n\
             config = {{ limits = [{{ match = \"reports.*\", rate = \"10000000/s burst 10000000\" }}], critical = [\"auth.*\"] }}\n",
            plugin.display()
        ));
    }
    s
}

fn start_sluice(plan: &Plan, mode: SluiceMode) -> Result<Proc> {
    let port = procs::free_port()?;
    let cfg = plan.dir.join(format!("redis-{}.toml", mode.name()));
    std::fs::write(&cfg, sluice_config(mode, port, &plan.redis, &plan.plugin))?;
    let mut cmd = Command::new(&plan.sluice_bin);
    cmd.arg("run").arg("-c").arg(&cfg);
    Proc::start(
        mode.name(),
        cmd,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &plan.dir.join(format!("redis-{}.log", mode.name())),
    )
}

/// What `redis-benchmark --csv` printed: requests per second and latencies.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOutput {
    /// Requests per second.
    pub rps: f64,
    /// Average latency (ms).
    pub avg_ms: Option<f64>,
    /// p50 latency (ms).
    pub p50_ms: Option<f64>,
    /// p99 latency (ms).
    pub p99_ms: Option<f64>,
}

/// Split one CSV line of `redis-benchmark` (every field quoted; a custom command's name may hold
/// quotes of its own, so fields are split on `","` between the outer quotes).
fn csv_fields(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.split("\",\"").map(str::to_string).collect())
}

/// Parse `redis-benchmark -q --csv` output: a header line, then one line per test (the first
/// is used). The numeric columns are at the end, so they are found from the right: a custom
/// command's text may contain `","`.
pub fn parse_csv(out: &str) -> Result<BenchOutput> {
    let mut lines = out.lines().filter(|l| l.trim_start().starts_with('"'));
    let header = lines
        .next()
        .and_then(csv_fields)
        .context("no CSV header in redis-benchmark's output")?;
    let row = lines
        .next()
        .and_then(csv_fields)
        .context("no result line in redis-benchmark's output")?;
    if row.len() < header.len() {
        bail!("redis-benchmark's result line has fewer fields than its header");
    }
    // Align from the right: the first field (the test) may have been split.
    let offset = row.len() - header.len();
    let col = |name: &str| -> Option<f64> {
        let i = header.iter().position(|h| h == name)?;
        let i = if i == 0 { 0 } else { i + offset };
        row.get(i)?.parse().ok()
    };
    let rps = col("rps").context("no rps column in redis-benchmark's output")?;
    if !(rps.is_finite() && rps > 0.0) {
        bail!("redis-benchmark reported {rps} requests per second");
    }
    Ok(BenchOutput {
        rps,
        avg_ms: col("avg_latency_ms"),
        p50_ms: col("p50_latency_ms"),
        p99_ms: col("p99_latency_ms"),
    })
}

/// The processes under test.
struct Running {
    haproxy: Option<Proc>,
    sluice: BTreeMap<SluiceMode, Proc>,
}

impl Running {
    fn proc(&self, t: Target) -> Option<&Proc> {
        match t {
            Target::Haproxy => self.haproxy.as_ref(),
            Target::Sluice(m) => self.sluice.get(&m),
            _ => None,
        }
    }
}

/// Runs a plan.
pub struct Harness {
    plan: Plan,
    ticks: f64,
    redis_pid: Option<u32>,
    celery_value: String,
}

impl Harness {
    /// A harness for `plan`.
    pub fn new(plan: Plan) -> Self {
        Harness {
            plan,
            ticks: procs::clock_ticks(),
            redis_pid: procs::find_pid("redis-server"),
            celery_value: celery_envelope(),
        }
    }

    /// Check tools and configs, start the targets, calibrate, run the rounds, stop the targets.
    pub async fn run(&mut self) -> Result<Results> {
        let started = Instant::now();
        let loadavg_start = read_trimmed("/proc/loadavg");
        std::fs::create_dir_all(&self.plan.dir)
            .with_context(|| format!("create {}", self.plan.dir.display()))?;
        self.check_tools()?;
        let mut skipped = Vec::new();
        self.plan.targets = self.usable_targets(&mut skipped)?;
        if self.redis_pid.is_none() {
            eprintln!("redis_e2e: no redis-server process found: Redis CPU is not reported");
        }
        let running = self.start_targets()?;
        let mut legs = Vec::new();
        let result = self.phases(&running, &mut legs).await;
        drop(running);
        for w in [Workload::Lpush, Workload::Celery] {
            let _ = resp::del(&self.plan.redis, w.key());
        }
        if let Err(e) = result {
            eprintln!("redis_e2e: run stopped early: {e:#}");
            skipped.push(("(run)".into(), format!("stopped early: {e:#}")));
        }
        Ok(Results {
            facts: Facts::gather(&self.plan, loadavg_start),
            skipped,
            legs,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// `redis-benchmark` runs and Redis answers `PING`; the sluice binary exists.
    fn check_tools(&self) -> Result<()> {
        let bin = &self.plan.redis_benchmark_bin;
        match Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => bail!(
                "`{bin} --version` failed ({}): install it with `apt-get install -y redis-tools`",
                o.status
            ),
            Err(e) => bail!(
                "cannot run {bin} ({e}): install it with `apt-get install -y redis-tools` \
                 (or pass --redis-benchmark-bin)"
            ),
        }
        resp::ping(&self.plan.redis).with_context(|| {
            format!(
                "Redis on {} does not answer PING (start it, or pass --redis)",
                self.plan.redis
            )
        })?;
        if !self.plan.sluice_bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p sluice` (or pass --sluice-bin)",
                self.plan.sluice_bin.display()
            );
        }
        Ok(())
    }

    /// Drop targets that cannot run here, saying why.
    fn usable_targets(&self, skipped: &mut Vec<(String, String)>) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for &t in &self.plan.targets {
            match t {
                Target::Direct => out.push(t),
                Target::Haproxy => {
                    let ok = Command::new(&self.plan.haproxy_bin)
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
                        eprintln!("redis_e2e: skipping haproxy: {why}");
                        skipped.push(("haproxy".into(), why));
                    }
                }
                Target::Sluice(m) => {
                    if m == SluiceMode::Plugin && !self.plan.plugin.exists() {
                        let why = format!(
                            "{} is missing: run `make plugins`",
                            self.plan.plugin.display()
                        );
                        eprintln!("redis_e2e: skipping {}: {why}", m.name());
                        skipped.push((m.name().into(), why));
                        continue;
                    }
                    let path = self.plan.dir.join(format!("redis-{}-check.toml", m.name()));
                    let port = procs::free_port()?;
                    std::fs::write(
                        &path,
                        sluice_config(m, port, &self.plan.redis, &self.plan.plugin),
                    )?;
                    match procs::check_sluice_config(&self.plan.sluice_bin, &path) {
                        Ok(()) => out.push(t),
                        Err(why) => {
                            eprintln!(
                                "redis_e2e: skipping {}: `sluice check` rejects its config:\n{why}",
                                m.name()
                            );
                            skipped.push((
                                m.name().into(),
                                format!("`sluice check` rejected the config: {why}"),
                            ));
                        }
                    }
                }
                Target::DirectTls | Target::SluiceTls => {
                    bail!("target {} is AMQP only (the e2e harness)", t.name())
                }
            }
        }
        if !out.contains(&Target::Direct) {
            bail!("the direct target is the baseline of every ratio; keep it in --targets");
        }
        Ok(out)
    }

    fn start_targets(&self) -> Result<Running> {
        let mut r = Running {
            haproxy: None,
            sluice: BTreeMap::new(),
        };
        for &t in &self.plan.targets {
            match t {
                Target::Haproxy => {
                    r.haproxy = Some(procs::start_haproxy(
                        &self.plan.haproxy_bin,
                        &self.plan.dir,
                        &self.plan.redis,
                    )?)
                }
                Target::Sluice(m) => {
                    r.sluice.insert(m, start_sluice(&self.plan, m)?);
                }
                _ => {}
            }
        }
        // Accepting TCP is not enough: each proxy must relay a command to Redis and back.
        for &t in &self.plan.targets {
            if let Some(p) = r.proc(t) {
                resp::ping(&p.addr.to_string()).with_context(|| {
                    format!(
                        "{} on {} does not relay PING to Redis (log: {})",
                        t.name(),
                        p.addr,
                        p.log.display()
                    )
                })?;
            }
        }
        Ok(r)
    }

    async fn phases(&mut self, running: &Running, legs: &mut Vec<Leg>) -> Result<()> {
        let plan = self.plan.clone();
        let mut counts = BTreeMap::new();
        for &cell in &plan.cells {
            let n0 = (u64::from(cell.pipeline) * 10_000).clamp(20_000, 200_000);
            let l = self
                .leg("calibrate", 0, cell, Target::Direct, running, n0)
                .await?;
            let n = round_up(
                (l.rps * plan.leg_seconds) as u64,
                u64::from(cell.pipeline),
                u64::from(cell.pipeline) * u64::from(cell.clients) * 10,
            );
            eprintln!(
                "redis_e2e: {cell}: direct ≈ {:.0} requests/s → {n} requests per leg",
                l.rps
            );
            legs.push(l);
            counts.insert(cell, n);
        }
        for &t in &plan.targets {
            if t != Target::Direct {
                if let Some(&cell) = plan.cells.first() {
                    let n = round_up(
                        counts[&cell] / 4,
                        u64::from(cell.pipeline),
                        u64::from(cell.pipeline),
                    );
                    let l = self.leg("warmup", 0, cell, t, running, n).await?;
                    legs.push(l);
                }
            }
        }
        let total = plan.rounds * plan.cells.len() * plan.targets.len();
        eprintln!(
            "redis_e2e: matrix: {total} legs of ~{:.1} s",
            plan.leg_seconds
        );
        for round in 0..plan.rounds {
            for (ci, &cell) in plan.cells.iter().enumerate() {
                let k = plan.targets.len();
                for i in 0..k {
                    let t = plan.targets[(i + round + ci) % k];
                    let l = self
                        .leg("matrix", round, cell, t, running, counts[&cell])
                        .await?;
                    legs.push(l);
                }
            }
        }
        Ok(())
    }

    async fn leg(
        &mut self,
        phase: &'static str,
        round: usize,
        cell: Cell,
        target: Target,
        running: &Running,
        requests: u64,
    ) -> Result<Leg> {
        let proc = running.proc(target);
        let addr = match proc {
            Some(p) => p.addr,
            None => self
                .plan
                .redis
                .parse::<SocketAddr>()
                .with_context(|| format!("--redis {}: not an ip:port", self.plan.redis))?,
        };
        let key = cell.workload.key();
        resp::del(&self.plan.redis, key)?;
        let mut cmd = tokio::process::Command::new(&self.plan.redis_benchmark_bin);
        cmd.arg("-h")
            .arg(addr.ip().to_string())
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-P")
            .arg(cell.pipeline.to_string())
            .arg("-n")
            .arg(requests.to_string())
            .arg("-c")
            .arg(cell.clients.to_string())
            .arg("-q")
            .arg("--csv");
        match cell.workload {
            Workload::Lpush => {
                cmd.arg("-t")
                    .arg("lpush")
                    .arg("-d")
                    .arg(self.plan.data_size.to_string());
            }
            Workload::Celery => {
                cmd.arg("LPUSH").arg(CELERY_KEY).arg(&self.celery_value);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);

        let cpu = |pid: Option<u32>| {
            pid.and_then(|p| {
                procs::cpu_seconds_precise(p).or_else(|| procs::cpu_seconds(p, self.ticks).ok())
            })
        };
        let pid = proc.map(Proc::pid);
        let before = (cpu(pid), cpu(self.redis_pid));
        let t0 = Instant::now();
        // redis-benchmark retries forever when it cannot connect: bound every leg.
        let limit = Duration::from_secs_f64((self.plan.leg_seconds * 30.0).max(60.0));
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "redis-benchmark against {} ({addr}) did not finish within {limit:?}",
                    target.name()
                )
            })?
            .with_context(|| format!("run {}", self.plan.redis_benchmark_bin))?;
        let seconds = t0.elapsed().as_secs_f64();
        let after = (cpu(pid), cpu(self.redis_pid));
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "redis-benchmark against {} ({addr}) exited with {}: {}{}",
                target.name(),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let b = parse_csv(&stdout).with_context(|| {
            format!(
                "redis-benchmark against {}: {}{}",
                target.name(),
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        let list_len = resp::llen(&self.plan.redis, key)?;
        resp::del(&self.plan.redis, key)?;
        let per_req = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if requests > 0 => Some((b - a) * 1e6 / requests as f64),
            _ => None,
        };
        let leg = Leg {
            phase,
            round,
            cell,
            target,
            requests,
            rps: b.rps,
            avg_ms: b.avg_ms,
            p50_ms: b.p50_ms,
            p99_ms: b.p99_ms,
            list_len,
            lost: requests.saturating_sub(list_len),
            proxy_cpu_us: per_req(before.0, after.0),
            redis_cpu_us: per_req(before.1, after.1),
            seconds,
        };
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        eprintln!(
            "redis_e2e: {phase:9} r{round} {cell:22} {:14} {:>9.0} req/s  p50 {:>6} ms  p99 {:>6} ms  \
             proxy {:>5} µs/req  redis {:>5} µs/req{}",
            target.name(),
            leg.rps,
            ms(leg.p50_ms),
            ms(leg.p99_ms),
            leg.proxy_cpu_us
                .map_or_else(|| "-".to_string(), |c| format!("{c:.2}")),
            leg.redis_cpu_us
                .map_or_else(|| "-".to_string(), |c| format!("{c:.2}")),
            if leg.lost > 0 {
                format!("  LOST {} (list holds {list_len})", leg.lost)
            } else {
                String::new()
            },
        );
        Ok(leg)
    }
}

/// `n` rounded up to a multiple of `step` (redis-benchmark issues whole pipelines, so `-n` a
/// multiple of `-P` is sent exactly), and at least `min`.
fn round_up(n: u64, step: u64, min: u64) -> u64 {
    let step = step.max(1);
    n.max(min).div_ceil(step) * step
}

pub use report::markdown;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_a_builtin_and_a_custom_command() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"LPUSH\",\"163934.42\",\"0.725\",\"0.168\",\"0.495\",\"2.871\",\"5.279\",\"7.847\"\n";
        let b = parse_csv(out).unwrap();
        assert_eq!(b.rps, 163934.42);
        assert_eq!(b.p50_ms, Some(0.495));
        assert_eq!(b.p99_ms, Some(5.279));
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"LPUSH k {\"a\",\"b\": 1}\",\"533333.31\",\"0.090\",\"0.056\",\"0.087\",\"0.119\",\"0.287\",\"0.303\"\n";
        let b = parse_csv(out).unwrap();
        assert_eq!(b.rps, 533333.31);
        assert_eq!(b.avg_ms, Some(0.090));
        assert_eq!(b.p99_ms, Some(0.287));
        // Older redis-benchmark: rps only.
        let b = parse_csv("\"test\",\"rps\"\n\"LPUSH\",\"1000.00\"\n").unwrap();
        assert_eq!((b.rps, b.p50_ms), (1000.0, None));
    }

    #[test]
    fn bad_csv_is_an_error_not_a_panic() {
        for out in [
            "",
            "Could not connect to Redis at 127.0.0.1:1: Connection refused",
            "\"test\",\"rps\"\n",
            "\"test\",\"rps\",\"x\"\n\"LPUSH\"\n",
            "\"test\",\"rps\"\n\"LPUSH\",\"nan\"\n",
            "\"test\",\"rps\"\n\"LPUSH\",\"0\"\n",
        ] {
            assert!(parse_csv(out).is_err(), "{out:?}");
        }
    }

    #[test]
    fn configs_and_envelope() {
        let c = sluice_config(
            SluiceMode::Plugin,
            6999,
            "127.0.0.1:6379",
            Path::new("/p.wasm"),
        );
        assert!(c.contains("protocol = \"redis\"") && c.contains("127.0.0.1:6999"));
        assert!(c.contains("[[quota]]") && c.contains("[[policy]]") && c.contains("/p.wasm"));
        let c = sluice_config(SluiceMode::NoRules, 1, "r:1", Path::new("x"));
        assert!(!c.contains("[[quota]]") && !c.contains("[[policy]]"));
        let v: serde_json::Value = serde_json::from_str(&celery_envelope()).unwrap();
        assert_eq!(v["headers"]["task"], "reports.rebuild");
    }

    #[test]
    fn request_counts_are_whole_pipelines() {
        assert_eq!(round_up(100, 16, 0), 112);
        assert_eq!(round_up(5, 16, 800), 800);
        assert_eq!(round_up(7, 1, 0), 7);
        assert_eq!(round_up(7, 0, 0), 7);
    }
}
