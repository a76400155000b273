//! The `sluice` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config;
use sluice::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Broker-protection proxy: per-producer quotas in front of RabbitMQ.
#[derive(Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    ///
    /// Example: sluice run -c config/sluice.toml
    Run {
        /// Config file.
        #[arg(short, long, default_value = "sluice.toml")]
        config: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file offline; exits non-zero and lists every problem with its line.
    ///
    /// Divert targets are checked when the broker is reachable, skipped with a warning otherwise.
    /// Example: sluice check config/sluice.toml
    Check {
        /// Config file.
        file: PathBuf,
    },
    /// Work with policy plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin on messages from a JSON file; print the verdicts and the counters it touched.
    ///
    /// Example: sluice plugin test plugins/dist/celery_task_quota.wasm --message msg.json --config cfg.json
    Test(sluice::plugin::cli::TestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Run { config, log_format } => {
            telemetry::init(log_format);
            match rt.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { file } => rt.block_on(check(file)),
        Command::Plugin {
            command: PluginCommand::Test(args),
        } => {
            telemetry::init(LogFormat::Text);
            match sluice::plugin::cli::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn check(file: PathBuf) -> ExitCode {
    let cfg = match config::load(&file) {
        Ok(c) => c,
        Err(report) => {
            eprintln!("{report}");
            eprintln!("{}: {} problem(s)", file.display(), report.problems.len());
            return ExitCode::from(1);
        }
    };
    let targets = config::targets::check_divert_targets(&cfg).await;
    for w in &targets.skipped {
        eprintln!("warning: {w}");
    }
    if !targets.problems.is_empty() {
        let report = config::Report {
            path: file.clone(),
            problems: targets.problems,
        };
        eprintln!("{report}");
        eprintln!("{}: {} problem(s)", file.display(), report.problems.len());
        return ExitCode::from(1);
    }
    println!(
        "{}: ok ({} listener(s), {} quota(s))",
        file.display(),
        cfg.listeners.len(),
        cfg.quotas.len()
    );
    ExitCode::SUCCESS
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path).map_err(|r| anyhow::anyhow!("invalid config:\n{r}"))?;
    let targets = config::targets::check_divert_targets(&cfg).await;
    for w in &targets.skipped {
        tracing::warn!("{w}");
    }
    if !targets.problems.is_empty() {
        let report = config::Report {
            path: path.clone(),
            problems: targets.problems,
        };
        anyhow::bail!("invalid config:\n{report}");
    }
    let server = sluice::Server::start(cfg)
        .await
        .map_err(anyhow::Error::msg)
        .context("starting")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
