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
#[command(
    name = "sluice",
    version,
    about,
    long_about = None,
    after_help = "\
Examples:
  sluice run -c /etc/sluice/sluice.toml --log-format json
  sluice check /etc/sluice/sluice.toml
  sluice top --admin 127.0.0.1:9090
  sluice completions bash > /etc/bash_completion.d/sluice

Each subcommand has its own --help.

Exit status:
  0  success (sluice run: stopped by SIGTERM/SIGINT after draining)
  1  failure: invalid config, cannot bind or start, plugin error, admin API unreachable
     or refusing the token, drain timed out
  2  command-line usage error",
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    ///
    /// SIGHUP (or POST /v1/reload, or a change of the file) reloads the config; SIGTERM and
    /// SIGINT stop accepting, let publishes already read reach the broker and their confirms
    /// reach clients (up to 10 s), then exit 0.
    #[command(after_help = concat!("\
Examples:
  sluice run -c config/sluice.toml
  sluice run -c /etc/sluice/sluice.toml --log-format json
  RUST_LOG=sluice=debug sluice run -c sluice.toml

", "Exit status: 0 after a clean stop, 1 if sluice cannot start (invalid config, address in use)."))]
    Run {
        /// Config file.
        #[arg(short, long, value_name = "FILE", default_value = "sluice.toml")]
        config: PathBuf,
        /// Log format: text (human) or json (one object per line).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file offline; exits non-zero and lists every problem with its line.
    ///
    /// Plugins are compiled and initialised with their config. Divert targets are checked when
    /// the broker is reachable, skipped with a warning otherwise.
    #[command(after_help = "\
Examples:
  sluice check config/sluice.toml
  sluice check /etc/sluice/sluice.toml && systemctl reload sluice

Exit status: 0 valid, 1 invalid (every problem is listed with its line).")]
    Check {
        /// Config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Live view of the producers of a running sluice (GET /v1/producers once a second).
    ///
    /// Rows are producers, busiest first: publishes per second, shed/divert/delay per second
    /// (between two refreshes), counts per verdict since start, open and held connections.
    #[command(after_help = "\
Examples:
  sluice top
  sluice top --admin 10.0.3.7:9090 --token-file /etc/sluice/admin.token --sort shed
  sluice top --once --json | jq '.producers[] | select(.verdicts.shed > 0) | .producer'

Exit status: 0 (Ctrl-C quits the live view), 1 if the admin API cannot be read (--once).")]
    Top(sluice::top::TopArgs),
    /// Wait until a running sluice has no client connections left (for a preStop hook).
    ///
    /// Polls /metrics until sluice_connections is 0 or the timeout passes. An unreachable
    /// admin API counts as drained.
    #[command(after_help = "\
Examples:
  sluice drain --timeout 20s
  sluice drain --admin 127.0.0.1:9090 --token-file /etc/sluice/admin.token

Exit status: 0 drained, 1 connections still open at the timeout.")]
    Drain(sluice::top::DrainArgs),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  sluice completions bash > /etc/bash_completion.d/sluice
  sluice completions zsh > \"${fpath[1]}/_sluice\"
  sluice completions fish > ~/.config/fish/completions/sluice.fish")]
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
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
    #[command(after_help = "\
Examples:
  sluice plugin test plugins/dist/celery_task_quota.wasm --message msg.json --config cfg.json
  sluice plugin test policy.wasm --message msgs.json --repeat 100

Exit status: 0 evaluated, 1 the plugin or a file could not be loaded.")]
    Test(sluice::plugin::cli::TestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        // Into a buffer first: clap_complete panics on a closed pipe (`... | head`).
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "sluice", &mut script);
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return ExitCode::SUCCESS;
    }
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
        Command::Top(args) => match rt.block_on(sluice::top::top(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice top: {e}");
                ExitCode::from(1)
            }
        },
        Command::Drain(args) => match rt.block_on(sluice::top::drain(&args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("sluice drain: {e}");
                ExitCode::from(1)
            }
        },
        Command::Completions { .. } => ExitCode::SUCCESS,
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
