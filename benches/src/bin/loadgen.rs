//! `loadgen`: publish load through sluice (or anything that speaks AMQP 0-9-1) and report
//! throughput, confirm latency and the broker's queue depth afterwards.
//!
//! ```text
//! loadgen --url amqp://guest:guest@127.0.0.1:5673/%2f --producers 8 --messages 200000 \
//!         --size 512 --confirm batch:256 --queue bench --declare --json
//! loadgen --shape celery --tasks reports.rebuild:90,auth.login_audit:10 --rate 2000 \
//!         --messages 20000 --queue celery --declare
//! ```

use anyhow::Result;
use clap::Parser;
use sluice_benches::loadgen::{self, parse_tasks, ConfirmMode, Shape};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Publish N messages from P named producer connections and summarize what happened.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// Where producers connect: sluice, another proxy, or the broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5673/%2f")]
    url: String,
    /// The broker itself, for the queue depth afterwards ("" skips the check).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// Producer connections, each with its own `connection_name`.
    #[arg(long, short = 'P', default_value_t = 1)]
    producers: usize,
    /// Messages in total, shared evenly between producers.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, short = 's', default_value_t = 512)]
    size: usize,
    /// none | each | batch:N (at most N unconfirmed per producer).
    #[arg(long, default_value = "batch:256", value_parser = parse_confirm)]
    confirm: ConfirmMode,
    /// Total offered rate, e.g. `2000` or `2000/s`; unpaced when absent.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Traffic shape.
    #[arg(long, value_enum, default_value = "steady")]
    shape: Shape,
    /// Messages per burst (all producers together) with `--shape burst`.
    #[arg(long, default_value_t = 1000)]
    burst_size: u64,
    /// Routing key (the queue, through the default exchange).
    #[arg(long, short = 'q', default_value = "loadgen")]
    queue: String,
    /// Exchange to publish to (default: the default exchange).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Declare the queue (non-durable) before publishing.
    #[arg(long)]
    declare: bool,
    /// Delete the queue on the broker after the depth was read.
    #[arg(long)]
    delete: bool,
    /// Producer i is named `<prefix>-<i>`.
    #[arg(long, default_value = "loadgen")]
    name_prefix: String,
    /// Celery task mix, e.g. `reports.rebuild:90,auth.login_audit:10` (implies Celery messages).
    #[arg(long)]
    tasks: Option<String>,
    /// Publish with the `mandatory` flag (unroutable messages come back as returns).
    #[arg(long)]
    mandatory: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// A CA certificate (PEM) to trust for an `amqps://` --url, besides the system roots.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn parse_confirm(s: &str) -> Result<ConfirmMode, String> {
    s.parse()
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!(
            "rate '{s}': a positive number of messages per second"
        )),
    }
}

async fn run(args: Args) -> Result<bool> {
    let mut cfg = loadgen::Config::new(&args.url, &args.queue);
    cfg.broker_url = (!args.broker_url.is_empty()).then(|| args.broker_url.clone());
    cfg.producers = args.producers;
    cfg.messages = args.messages;
    cfg.size = args.size;
    cfg.confirm = args.confirm;
    cfg.rate = args.rate;
    cfg.shape = args.shape;
    cfg.burst_size = args.burst_size;
    cfg.exchange = args.exchange;
    cfg.declare = args.declare;
    cfg.name_prefix = args.name_prefix;
    cfg.tasks = match &args.tasks {
        Some(t) => Some(parse_tasks(t).map_err(|e| anyhow::anyhow!("--tasks: {e}"))?),
        None => None,
    };
    cfg.mandatory = args.mandatory;
    cfg.progress = !args.quiet;
    cfg.timeout = Duration::from_secs(args.timeout);
    cfg.tls_ca = args.ca;
    let summary = loadgen::run(&cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary.line());
    }
    if args.delete {
        if let Some(b) = &cfg.broker_url {
            loadgen::delete_queues(b, &[&cfg.queue]).await?;
        }
    }
    Ok(summary.errors.is_empty())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
