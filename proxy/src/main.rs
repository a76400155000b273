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
    // The same checks a reload runs: divert targets (when the broker answers) and every
    // plugin compiled and initialised with its config.
    let targets = config::targets::check_divert_targets(&cfg).await;
    for w in &targets.skipped {
        eprintln!("warning: {w}");
    }
    let mut problems = targets.problems;
    let cfg = std::sync::Arc::new(cfg);
    let plugins_cfg = cfg.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        sluice::runtime::PluginHost::default().load_policies(&plugins_cfg, None)
    })
    .await;
    match loaded {
        Ok(Ok(_)) => {}
        Ok(Err(report)) => problems.extend(report.problems),
        Err(e) => problems.push(config::Problem {
            line: None,
            message: format!("loading plugins failed: {e}"),
        }),
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line.unwrap_or(0));
        let report = config::Report {
            path: file.clone(),
            problems,
        };
        eprintln!("{report}");
        eprintln!("{}: {} problem(s)", file.display(), report.problems.len());
        return ExitCode::from(1);
    }
    println!(
        "{}: ok ({} listener(s), {} quota(s), {} policy(ies))",
        file.display(),
        cfg.listeners.len(),
        cfg.quotas.len(),
        cfg.policies.len()
    );
    ExitCode::SUCCESS
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let server = sluice::Server::start_file(&path)
        .await
        .map_err(anyhow::Error::msg)
        .context("starting")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", path.display());
                // The outcome is logged and counted by the reload task.
                let _ = server.reload().await;
            }
        }
    }
    server.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
