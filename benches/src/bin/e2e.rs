//! `e2e`: sluice's cost side by side with direct-to-broker and HAProxy (TCP mode), in one run.
//!
//! ```text
//! cargo build --release -p sluice -p sluice-benches
//! cargo run --release -p sluice-benches --bin e2e                # quick: ~2-3 min
//! cargo run --release -p sluice-benches --bin e2e -- --full      # the whole matrix: ~20 min
//! cargo run --release -p sluice-benches --bin e2e -- --tls       # TLS: direct-tls vs sluice-tls
//! ```
//!
//! Prints Markdown tables (paste into `benches/RESULTS.md`); every leg is kept in
//! `<dir>/results.json`.

use anyhow::{Context, Result};
use clap::Parser;
use sluice_benches::e2e::{self, Body, Cell, ConfirmLabel, Harness, Plan, Target};
use sluice_benches::loadgen::ConfirmMode;
use std::path::PathBuf;
use std::process::ExitCode;

/// Measure direct, HAProxy and sluice (three modes) over a matrix, alternating targets.
#[derive(Parser, Debug)]
#[command(name = "e2e", about)]
struct Args {
    /// The whole matrix: P = 1,8,64; 512 B and 64 KiB; batch:256 and none; 5 rounds of 2 s legs.
    #[arg(long)]
    full: bool,
    /// Producer counts (default: 8; with --full 1,8,64).
    #[arg(long, value_delimiter = ',')]
    producers: Option<Vec<usize>>,
    /// Body sizes in bytes (default 512,65536).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Confirm modes (default batch:256,none).
    #[arg(long, value_delimiter = ',', value_parser = parse_confirm)]
    confirms: Option<Vec<ConfirmMode>>,
    /// Rounds over the matrix (default 3; with --full 5).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of load per leg (default 1; with --full 2).
    #[arg(long)]
    leg_seconds: Option<f64>,
    /// Targets (default: direct, haproxy and the three sluice modes; with --tls direct-tls and
    /// sluice-tls). A sluice mode whose config `sluice check` rejects is skipped.
    #[arg(long, value_delimiter = ',', value_parser = Target::parse)]
    targets: Option<Vec<Target>>,
    /// Message bodies: raw bytes, or Celery task messages (headers the plugin reads).
    #[arg(long, value_enum, default_value = "raw")]
    body: Body,
    /// Half-load latency cell as `P,SIZE` (confirms batch:256), or `off`.
    #[arg(long, default_value = "8,512")]
    latency: String,
    /// Idle connections for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// The broker, `host:port`.
    #[arg(long, default_value = "127.0.0.1:5672")]
    broker: String,
    /// The sluice binary (default: `sluice` next to this executable).
    #[arg(long)]
    sluice_bin: Option<PathBuf>,
    /// The HAProxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy_bin: String,
    /// The `celery_task_quota` plugin.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Where configs, logs and results go (default /tmp/sluice-e2e-<pid>).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// TLS on the client legs: a throwaway CA, stunnel in front of the broker (`direct-tls`, the
    /// baseline) and sluice with a TLS listener and a TLS upstream to that stunnel
    /// (`sluice-tls`).
    #[arg(long)]
    tls: bool,
    /// The stunnel binary (default: `stunnel4`, else `stunnel`).
    #[arg(long)]
    stunnel_bin: Option<String>,
}

fn parse_confirm(s: &str) -> Result<ConfirmMode, String> {
    s.parse()
}

fn plan(a: Args) -> Result<Plan> {
    let producers = a
        .producers
        .unwrap_or_else(|| if a.full { vec![1, 8, 64] } else { vec![8] });
    let sizes = a.sizes.unwrap_or_else(|| vec![512, 65536]);
    let confirms = a
        .confirms
        .unwrap_or_else(|| vec![ConfirmMode::Batch(256), ConfirmMode::None]);
    let mut cells = Vec::new();
    for &p in &producers {
        for &size in &sizes {
            for &c in &confirms {
                cells.push(Cell {
                    producers: p,
                    size,
                    confirm: ConfirmLabel::new(c),
                });
            }
        }
    }
    let latency_cell = match a.latency.as_str() {
        "off" | "none" => None,
        s => {
            let (p, size) = s
                .split_once(',')
                .context("--latency: P,SIZE (e.g. 8,512) or off")?;
            Some(Cell {
                producers: p.trim().parse().context("--latency producers")?,
                size: size.trim().parse().context("--latency size")?,
                confirm: ConfirmLabel::new(ConfirmMode::Batch(256)),
            })
        }
    };
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let plugin = a.plugin.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/celery_task_quota.wasm")
    });
    Ok(Plan {
        broker: a.broker,
        cells,
        targets: a.targets.unwrap_or_else(|| {
            if a.tls {
                Target::TLS.to_vec()
            } else {
                Target::PLAIN.to_vec()
            }
        }),
        rounds: a.rounds.unwrap_or(if a.full { 5 } else { 3 }).max(1),
        leg_seconds: a.leg_seconds.unwrap_or(if a.full { 2.0 } else { 1.0 }),
        body: a.body,
        latency_cell,
        idle_connections: a.idle_connections,
        sluice_bin: a.sluice_bin.unwrap_or_else(|| exe_dir.join("sluice")),
        haproxy_bin: a.haproxy_bin,
        plugin: std::fs::canonicalize(&plugin).unwrap_or(plugin),
        dir: a.dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("sluice-e2e-{}", std::process::id()))
        }),
        tls: a.tls,
        stunnel_bin: a.stunnel_bin,
    })
}

async fn run(args: Args) -> Result<()> {
    let plan = plan(args)?;
    let dir = plan.dir.clone();
    eprintln!(
        "e2e: {} cells × {} targets × {} rounds; configs, logs and results in {}",
        plan.cells.len(),
        plan.targets.len(),
        plan.rounds,
        dir.display()
    );
    let results = Harness::new(plan).run().await?;
    let md = e2e::markdown(&results);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    eprintln!("e2e: results in {}", dir.display());
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
            eprintln!("e2e: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // On SIGINT or SIGTERM the run is dropped, and with it the child proxies (killed on drop).
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
            eprintln!("e2e: {e:#}");
            ExitCode::from(1)
        }
    }
}
