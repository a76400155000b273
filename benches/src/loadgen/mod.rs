//! The load generator: P producer connections (lapin), each named `connection_name =
//! <prefix>-<i>`, publishing N messages in total with a confirm mode, an optional total rate and
//! a traffic shape, then a summary (throughput, confirm latency, the broker's queue depth for
//! loss checks). Used by the `loadgen` binary, the end-to-end harness and the drill.

pub mod message;
pub mod pace;
mod producer;
pub mod summary;

pub use message::{parse_tasks, MessageKind, TaskWeight};
pub use pace::{Pace, Shape};
pub use summary::{Latency, Summary};

use anyhow::{bail, Context, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How publishes are confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmMode {
    /// No `confirm.select`: fire and forget.
    None,
    /// Confirms on, at most this many unconfirmed publishes per producer.
    Batch(u32),
    /// Confirms on, each publish waits for its confirm.
    Each,
}

impl FromStr for ConfirmMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ConfirmMode::None),
            "each" => Ok(ConfirmMode::Each),
            "batch" => Ok(ConfirmMode::Batch(256)),
            _ => match s.strip_prefix("batch:").map(str::parse::<u32>) {
                Some(Ok(n)) if n > 0 => Ok(ConfirmMode::Batch(n)),
                _ => Err(format!(
                    "confirm mode '{s}': use none, each, batch or batch:N (N > 0 in flight)"
                )),
            },
        }
    }
}

impl std::fmt::Display for ConfirmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfirmMode::None => f.write_str("none"),
            ConfirmMode::Each => f.write_str("each"),
            ConfirmMode::Batch(n) => write!(f, "batch:{n}"),
        }
    }
}

/// One load-generator run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where producers connect (sluice, a proxy, or the broker).
    pub url: String,
    /// The broker itself, for the queue depth afterwards (`None`: skip the check).
    pub broker_url: Option<String>,
    /// Producer connections.
    pub producers: usize,
    /// Messages in total, shared evenly between producers.
    pub messages: u64,
    /// Body size in bytes.
    pub size: usize,
    /// Confirm mode.
    pub confirm: ConfirmMode,
    /// Total offered rate (messages per second); `None` = as fast as possible.
    pub rate: Option<f64>,
    /// Traffic shape.
    pub shape: Shape,
    /// Messages per burst (all producers together) for [`Shape::Burst`].
    pub burst_size: u64,
    /// Destination exchange (`""` = default exchange).
    pub exchange: String,
    /// Routing key, and the queue whose depth is checked.
    pub queue: String,
    /// Declare the queue first (non-durable).
    pub declare: bool,
    /// `connection_name` of producer i is `<name_prefix>-<i>`.
    pub name_prefix: String,
    /// Celery task mix; Celery messages are sent when the shape is `celery` or this is set.
    pub tasks: Option<Vec<TaskWeight>>,
    /// Publish with `mandatory`.
    pub mandatory: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Give up on a run after this long.
    pub timeout: Duration,
    /// A CA certificate (PEM file) to trust for `amqps://` URLs, besides the system roots.
    pub tls_ca: Option<PathBuf>,
}

impl Config {
    /// Defaults for everything but the target and the queue.
    pub fn new(url: &str, queue: &str) -> Self {
        Config {
            url: url.to_string(),
            broker_url: Some("amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
            producers: 1,
            messages: 10_000,
            size: 512,
            confirm: ConfirmMode::Batch(256),
            rate: None,
            shape: Shape::Steady,
            burst_size: 1000,
            exchange: String::new(),
            queue: queue.to_string(),
            declare: false,
            name_prefix: "loadgen".to_string(),
            tasks: None,
            mandatory: false,
            progress: false,
            timeout: Duration::from_secs(600),
            tls_ca: None,
        }
    }

    fn message_kind(&self) -> MessageKind {
        match (&self.tasks, self.shape) {
            (Some(t), _) => MessageKind::Celery(message::CeleryMix::new(t, self.size)),
            (None, Shape::Celery) => MessageKind::Celery(message::CeleryMix::new(
                &[TaskWeight {
                    name: "app.tasks.process".into(),
                    weight: 1,
                }],
                self.size,
            )),
            (None, _) => MessageKind::raw(self.size),
        }
    }
}

/// Connect with a `connection_name`.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    connect_tls(url, name, None).await
}

/// Connect with a `connection_name`; for `amqps://` URLs, `ca_pem` (PEM text) is trusted as
/// well as the system roots.
pub async fn connect_tls(url: &str, name: &str, ca_pem: Option<&str>) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = match ca_pem {
        None => Connection::connect(url, props).await,
        Some(pem) => {
            let tls = OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem.to_string()),
            };
            let rt = lapin::runtime::default_runtime().context("lapin runtime")?;
            Connection::connect_with_config(url, props, tls, rt).await
        }
    };
    conn.with_context(|| format!("connect to {url} as {name}"))
}

/// The PEM text of a CA file, checked to hold a certificate.
pub fn read_ca(path: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("read the CA certificate {}", path.display()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(pem)
}

/// Run the load and summarize it. Producers that fail stop early; their errors are in the
/// summary rather than failing the run, so a loss check can still be made.
pub async fn run(cfg: &Config) -> Result<Summary> {
    if cfg.producers == 0 {
        bail!("--producers must be at least 1");
    }
    let kind = Arc::new(cfg.message_kind());
    let ca: Option<Arc<str>> = match &cfg.tls_ca {
        Some(p) => Some(read_ca(p)?.into()),
        None => None,
    };
    let mut conns = Vec::with_capacity(cfg.producers);
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..cfg.producers {
        let (url, name) = (cfg.url.clone(), format!("{}-{i}", cfg.name_prefix));
        let ca = ca.clone();
        connecting.spawn(async move { (i, connect_tls(&url, &name, ca.as_deref()).await) });
    }
    while let Some(r) = connecting.join_next().await {
        let (i, conn) = r.context("connect task")?;
        conns.push((i, conn?));
    }
    conns.sort_by_key(|(i, _)| *i);
    if cfg.declare {
        let ch = conns[0].1.create_channel().await?;
        ch.queue_declare(
            cfg.queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare queue {}", cfg.queue))?;
        let _ = ch.close(200, "declared".into()).await;
    }

    let sent = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(cfg, &sent);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let base = cfg.messages / cfg.producers as u64;
    let extra = cfg.messages % cfg.producers as u64;
    for (i, conn) in &conns {
        let n = base + u64::from((*i as u64) < extra);
        let pace = Pace::new(cfg.shape, cfg.rate, cfg.producers, n, cfg.burst_size)
            .map_err(anyhow::Error::msg)?;
        let p = producer::Producer {
            index: *i,
            channel: conn.create_channel().await?,
            n,
            pace,
            kind: kind.clone(),
            exchange: cfg.exchange.clone(),
            routing_key: cfg.queue.clone(),
            confirm: cfg.confirm,
            mandatory: cfg.mandatory,
            sent: sent.clone(),
            start,
        };
        tasks.spawn(p.run());
    }
    let mut totals = producer::Outcome::default();
    let deadline = tokio::time::sleep(cfg.timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(r) => totals.merge(r.context("producer task")?),
                None => break,
            },
            _ = &mut deadline => {
                tasks.abort_all();
                totals.errors.push(format!("run timed out after {:?}", cfg.timeout));
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Close concurrently, each bounded: a proxy that never answers `connection.close` must not
    // hang the run (it is reported instead).
    let mut closing = tokio::task::JoinSet::new();
    for (i, c) in conns {
        closing.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), c.close(200, "loadgen done".into()))
                .await
            {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("producer {i}: connection.close failed: {e}")),
                Err(_) => Some(format!(
                    "producer {i}: connection.close not answered within 10 s"
                )),
            }
        });
    }
    while let Some(r) = closing.join_next().await {
        if let Ok(Some(e)) = r {
            totals.errors.push(e);
        }
    }
    let depth = match &cfg.broker_url {
        Some(b) => Some(settled_depth(b, &cfg.queue).await?),
        None => None,
    };
    Ok(Summary::new(cfg, totals, elapsed, depth))
}

fn progress_bar(cfg: &Config, sent: &Arc<AtomicU64>) -> Option<indicatif::ProgressBar> {
    if !cfg.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(cfg.messages);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} msgs {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let (b, sent) = (bar.clone(), sent.clone());
    tokio::spawn(async move {
        while !b.is_finished() {
            b.set_position(sent.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Some(bar)
}

/// Messages ready in `queue` on the broker, once publishes in flight have landed: polled
/// (passive declare) until two reads 100 ms apart agree, for at most 10 s.
pub async fn settled_depth(broker_url: &str, queue: &str) -> Result<u64> {
    let conn = connect(broker_url, "loadgen-depth").await?;
    let ch = conn.create_channel().await?;
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
            .with_context(|| format!("passive declare of queue {queue} on {broker_url}"))?;
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
    let _ = conn.close(200, "depth read".into()).await;
    Ok(last)
}

/// Delete queues on the broker (best effort): purging between rounds and cleanup.
pub async fn delete_queues(broker_url: &str, queues: &[&str]) -> Result<()> {
    let conn = connect(broker_url, "loadgen-cleanup").await?;
    let ch = conn.create_channel().await?;
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
    Ok(())
}

/// Declare a non-durable queue on the broker.
pub async fn declare_queue(broker_url: &str, queue: &str) -> Result<()> {
    let conn = connect(broker_url, "loadgen-declare").await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declare queue {queue}"))?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}
