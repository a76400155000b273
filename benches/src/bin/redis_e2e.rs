//! `redis_e2e`: sluice's Redis listener side by side with Redis directly and HAProxy (TCP
//! mode), measured with `redis-benchmark`, in one run.
//!
//! ```text
//! cargo build --release -p sluice -p sluice-benches
//! cargo run --release -p sluice-benches --bin redis_e2e             # quick: ~1 min
//! cargo run --release -p sluice-benches --bin redis_e2e -- --workloads lpush,celery --rounds 5
//! ```
//!
//! Prints Markdown tables; every leg is kept in `<dir>/results.json`.

use anyhow::{bail, Result};
use clap::Parser;
use sluice_benches::e2e::Target;
use sluice_benches::redis_e2e::{self, Cell, Harness, Plan, Workload};
use std::path::PathBuf;
use std::process::ExitCode;

/// Measure redis-benchmark against direct Redis, HAProxy and sluice (three modes), alternating
/// targets over rounds.
#[derive(Parser, Debug)]
#[command(name = "redis_e2e", about)]
struct Args {
    /// Workloads: `lpush` (`redis-benchmark -t lpush`) and/or `celery` (LPUSH of a kombu
    /// envelope of a Celery task, which the plugin reads).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "lpush")]
    workloads: Vec<Workload>,
    /// Pipeline depths (`-P`), one cell each.
    #[arg(long, value_delimiter = ',', default_value = "16,1")]
    pipelines: Vec<u32>,
    /// Connections (`-c`), one cell each.
    #[arg(long, value_delimiter = ',', default_value = "50")]
    clients: Vec<u32>,
    /// Rounds over the matrix (at least 3 for a median and a range).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of load per leg (the request count is sized from a calibration run on direct).
    #[arg(long, default_value_t = 2.0)]
    leg_seconds: f64,
    /// Value size in bytes of the `lpush` workload (`-d`).
    #[arg(long, default_value_t = 3)]
    data_size: usize,
    /// Targets: direct, haproxy, sluice, sluice-quotas, sluice-plugin (default: all; a sluice
    /// mode whose config `sluice check` rejects is skipped).
    #[arg(long, value_delimiter = ',', value_parser = Target::parse)]
    targets: Option<Vec<Target>>,
    /// Redis, `ip:port`.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// The sluice binary (default: `sluice` next to this executable).
    #[arg(long)]
    sluice_bin: Option<PathBuf>,
    /// The HAProxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy_bin: String,
    /// The redis-benchmark binary.
    #[arg(long, default_value = "redis-benchmark")]
    redis_benchmark_bin: String,
    /// The `celery_task_quota` plugin.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Where configs, logs and results go (default /tmp/sluice-redis-e2e-<pid>).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn plan(a: Args) -> Result<Plan> {
    if a.pipelines.contains(&0) || a.clients.contains(&0) {
        bail!("--pipelines and --clients must be at least 1");
    }
    if !(a.leg_seconds.is_finite() && a.leg_seconds > 0.0) {
        bail!("--leg-seconds must be a positive number");
    }
    if a.redis.parse::<std::net::SocketAddr>().is_err() {
        bail!(
            "--redis {}: give an ip:port such as 127.0.0.1:6379",
            a.redis
        );
    }
    let mut cells = Vec::new();
    for &workload in &a.workloads {
        for &pipeline in &a.pipelines {
            for &clients in &a.clients {
                cells.push(Cell {
                    workload,
                    pipeline,
                    clients,
                });
            }
        }
    }
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let plugin = a.plugin.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/celery_task_quota.wasm")
    });
    Ok(Plan {
        redis: a.redis,
        cells,
        targets: a.targets.unwrap_or_else(|| Target::PLAIN.to_vec()),
        rounds: a.rounds.max(1),
        leg_seconds: a.leg_seconds,
        data_size: a.data_size,
        sluice_bin: a.sluice_bin.unwrap_or_else(|| exe_dir.join("sluice")),
        haproxy_bin: a.haproxy_bin,
        redis_benchmark_bin: a.redis_benchmark_bin,
        plugin: std::fs::canonicalize(&plugin).unwrap_or(plugin),
        dir: a.dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("sluice-redis-e2e-{}", std::process::id()))
        }),
    })
}

async fn run(args: Args) -> Result<()> {
    let plan = plan(args)?;
    let dir = plan.dir.clone();
    eprintln!(
        "redis_e2e: {} cells × {} targets × {} rounds; configs, logs and results in {}",
        plan.cells.len(),
        plan.targets.len(),
        plan.rounds,
        dir.display()
    );
    let results = Harness::new(plan).run().await?;
    let md = redis_e2e::markdown(&results);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    eprintln!("redis_e2e: results in {}", dir.display());
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redis_e2e: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // On SIGINT or SIGTERM the run is dropped, and with it the child proxies and the running
    // redis-benchmark (killed on drop).
    let outcome = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redis_e2e: {e:#}");
            ExitCode::from(1)
        }
    }
}
