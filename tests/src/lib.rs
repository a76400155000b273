//! Test support: a sluice started in-process in front of the real RabbitMQ on 127.0.0.1:5672,
//! direct broker access for setup and loss checks, and small helpers shared by the
//! integration tests in `tests/tests/`.
//!
//! Every test names its own queues with [`unique`] and deletes them through a [`Queues`] guard,
//! so tests run in parallel against one broker.

use anyhow::{bail, Context, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The broker every test talks to (override with `SLUICE_TEST_BROKER=host:port`).
pub fn broker_addr() -> String {
    std::env::var("SLUICE_TEST_BROKER").unwrap_or_else(|_| "127.0.0.1:5672".to_string())
}

/// AMQP URL of the broker, direct (no sluice).
pub fn broker_url() -> String {
    format!("amqp://guest:guest@{}/%2f", broker_addr())
}

/// A name no other test (or earlier run) uses: `prefix-<pid>-<n>-<nanos>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connect with a `connection_name` client property (sluice's default producer identity).
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props)
        .await
        .with_context(|| format!("connect {url} as {name}"))
}

/// A sluice running in this process, configured from a TOML fragment.
pub struct Sluice {
    server: Option<sluice::Server>,
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` of the `amqp` listener.
    pub url: String,
    /// Admin API address.
    pub admin: std::net::SocketAddr,
}

impl Sluice {
    /// Start sluice with one `amqp` listener (random port) in front of the test broker, an admin
    /// API on a random port, and `extra` appended to the config (quotas, `[amqp]`, `[tarpit]`...).
    pub async fn start(extra: &str) -> Result<Sluice> {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n{extra}\n",
            broker_addr()
        );
        let path = PathBuf::from("test.toml");
        let config = sluice::config::validate::parse(&text, &path)
            .map_err(|r| anyhow::anyhow!("test config rejected:\n{r}\n---\n{text}"))?;
        let server = sluice::Server::start(config)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let addr = server
            .listener_addr("amqp")
            .context("listener amqp not bound")?;
        let admin = server.admin_addr();
        Ok(Sluice {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            admin,
            server: Some(server),
        })
    }

    /// Start sluice from a config file (reload enabled: file watch, [`Sluice::reload`] and
    /// `POST /v1/reload`). The file must define the `amqp` listener.
    pub async fn start_file(path: &std::path::Path) -> Result<Sluice> {
        let server = sluice::Server::start_file(path)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let addr = server
            .listener_addr("amqp")
            .context("listener amqp not bound")?;
        let admin = server.admin_addr();
        Ok(Sluice {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            admin,
            server: Some(server),
        })
    }

    /// The running server (runtime, metrics).
    pub fn server(&self) -> &sluice::Server {
        match &self.server {
            Some(s) => s,
            None => unreachable!("server is only taken by stop()"),
        }
    }

    /// GET a path on the admin API; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http(self.admin, "GET", path).await
    }

    /// The Prometheus value of the first series whose line starts with `name{` and contains every
    /// label in `labels` (e.g. `verdict="shed"`), summed over all matching series.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let (status, body) = self.admin_get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(sum_metric(&body, name, labels))
    }

    /// Graceful shutdown.
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// Sum the values of the series of `name` that carry every label in `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.0 request to the admin API; returns (status, body).
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

/// Direct access to the broker for setup, loss checks and cleanup.
pub struct Broker {
    conn: Connection,
}

impl Broker {
    /// Connect directly to the test broker.
    pub async fn connect() -> Result<Broker> {
        Ok(Broker {
            conn: connect(&broker_url(), &unique("test-admin")).await?,
        })
    }

    /// Declare a (non-durable) queue and return a guard that deletes it.
    pub async fn queue(&self, name: &str) -> Result<()> {
        self.queue_with(name, FieldTable::default()).await
    }

    /// Declare a queue with arguments.
    pub async fn queue_with(&self, name: &str, args: FieldTable) -> Result<()> {
        let ch = self.conn.create_channel().await?;
        ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
            .await
            .with_context(|| format!("declare {name}"))?;
        let _ = ch.close(200, "".into()).await;
        Ok(())
    }

    /// Messages ready in a queue (passive declare).
    pub async fn depth(&self, name: &str) -> Result<u32> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("passive declare {name}"))?;
        let _ = ch.close(200, "".into()).await;
        Ok(q.message_count())
    }

    /// Wait until a queue's depth stops changing (publishes in flight settle), then return it.
    pub async fn settled_depth(&self, name: &str) -> Result<u32> {
        let mut last = self.depth(name).await?;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.depth(name).await?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// Fetch every ready message body of a queue (basic.get with ack until empty).
    pub async fn drain(&self, name: &str) -> Result<Vec<Vec<u8>>> {
        use lapin::options::{BasicAckOptions, BasicGetOptions};
        let ch = self.conn.create_channel().await?;
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(name.into(), BasicGetOptions::default())
            .await?
        {
            out.push(m.delivery.data.clone());
            m.delivery.ack(BasicAckOptions::default()).await?;
        }
        let _ = ch.close(200, "".into()).await;
        Ok(out)
    }

    /// Delete queues (best effort).
    pub async fn delete(&self, names: &[&str]) {
        if let Ok(ch) = self.conn.create_channel().await {
            for n in names {
                let _ = ch
                    .queue_delete((*n).into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = ch.close(200, "".into()).await;
        }
    }
}

/// Deletes its queues when dropped, even when the test failed (runs the deletes on a thread of
/// its own because `Drop` cannot await).
pub struct Queues(pub Vec<String>);

impl Queues {
    /// Guard these names.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Queues {
        Queues(names.into_iter().map(Into::into).collect())
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(b) = Broker::connect().await {
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    b.delete(&refs).await;
                    let _ = b.conn.close(200, "".into()).await;
                }
            });
        })
        .join();
    }
}

/// The `sluice` binary built beside the test executable (`target/<profile>/sluice`).
pub fn sluice_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no target dir")?;
    let bin = dir.join("sluice");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build -p sluice` (or set SLUICE_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}
