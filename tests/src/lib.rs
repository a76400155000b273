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
    http_auth(addr, method, path, None).await
}

/// As [`http`], with a bearer token.
pub async fn http_auth(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: test\r\n{auth}Content-Length: 0\r\n\r\n")
            .as_bytes(),
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

// ---------------------------------------------------------------------------------------------
// Hostile clients and broker faults: a raw AMQP client, a well-behaved bystander, process and
// broker probes.
// ---------------------------------------------------------------------------------------------

/// AMQP frame type octets.
pub mod frame_type {
    /// Method frame.
    pub const METHOD: u8 = 1;
    /// Content header frame.
    pub const HEADER: u8 = 2;
    /// Content body frame.
    pub const BODY: u8 = 3;
    /// Heartbeat frame.
    pub const HEARTBEAT: u8 = 8;
}

/// Hand-built AMQP 0-9-1 frames, independent of sluice's own encoder (so tests do not share its
/// mistakes).
pub mod wire {
    /// The protocol header of AMQP 0-9-1.
    pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

    /// A whole frame: type, channel, size, payload, `0xCE`.
    pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out.push(0xCE);
        out
    }

    /// A method frame.
    pub fn method(channel: u16, class: u16, method: u16, args: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(args.len() + 4);
        p.extend_from_slice(&class.to_be_bytes());
        p.extend_from_slice(&method.to_be_bytes());
        p.extend_from_slice(args);
        frame(super::frame_type::METHOD, channel, &p)
    }

    /// Append a short string.
    pub fn shortstr(out: &mut Vec<u8>, s: &str) {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    /// Append a long string.
    pub fn longstr(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// Append a field table of already-encoded entries (`name`, type octet + value).
    pub fn table(out: &mut Vec<u8>, entries: &[(&str, Vec<u8>)]) {
        let mut body = Vec::new();
        for (k, v) in entries {
            shortstr(&mut body, k);
            body.extend_from_slice(v);
        }
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
    }

    /// `connection.start-ok` with PLAIN guest/guest, a `connection_name` and, when asked, the
    /// `connection.blocked` capability.
    pub fn start_ok(name: &str, blocked_capable: bool) -> Vec<u8> {
        let mut caps = vec![
            ("publisher_confirms", vec![b't', 1]),
            ("basic.nack", vec![b't', 1]),
        ];
        if blocked_capable {
            caps.push(("connection.blocked", vec![b't', 1]));
        }
        let mut caps_table = vec![b'F'];
        table(&mut caps_table, &caps);
        let mut name_value = vec![b'S'];
        longstr(&mut name_value, name.as_bytes());
        let mut args = Vec::new();
        table(
            &mut args,
            &[
                ("connection_name", name_value),
                ("capabilities", caps_table),
            ],
        );
        shortstr(&mut args, "PLAIN");
        longstr(&mut args, b"\0guest\0guest");
        shortstr(&mut args, "en_US");
        method(0, 10, 11, &args)
    }

    /// `connection.tune-ok`.
    pub fn tune_ok(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&channel_max.to_be_bytes());
        a.extend_from_slice(&frame_max.to_be_bytes());
        a.extend_from_slice(&heartbeat.to_be_bytes());
        method(0, 10, 31, &a)
    }

    /// `connection.open` on vhost `/`.
    pub fn open() -> Vec<u8> {
        let mut a = Vec::new();
        shortstr(&mut a, "/");
        shortstr(&mut a, "");
        a.push(0);
        method(0, 10, 40, &a)
    }

    /// `connection.close-ok`.
    pub fn close_ok() -> Vec<u8> {
        method(0, 10, 51, &[])
    }

    /// `channel.open`.
    pub fn channel_open(ch: u16) -> Vec<u8> {
        let mut a = Vec::new();
        shortstr(&mut a, "");
        method(ch, 20, 10, &a)
    }

    /// `confirm.select`.
    pub fn confirm_select(ch: u16) -> Vec<u8> {
        method(ch, 85, 10, &[0])
    }

    /// `queue.declare` (non-durable, no arguments).
    pub fn queue_declare(ch: u16, queue: &str) -> Vec<u8> {
        let mut a = vec![0, 0];
        shortstr(&mut a, queue);
        a.push(0);
        table(&mut a, &[]);
        method(ch, 50, 10, &a)
    }

    /// `basic.qos` with a prefetch count (0 = unlimited).
    pub fn basic_qos(ch: u16, prefetch: u16) -> Vec<u8> {
        let mut a = vec![0, 0, 0, 0];
        a.extend_from_slice(&prefetch.to_be_bytes());
        a.push(0);
        method(ch, 60, 10, &a)
    }

    /// `basic.consume`, automatic acknowledgement when `no_ack`.
    pub fn basic_consume(ch: u16, queue: &str, no_ack: bool) -> Vec<u8> {
        let mut a = vec![0, 0];
        shortstr(&mut a, queue);
        shortstr(&mut a, "");
        a.push(if no_ack { 0b10 } else { 0 });
        table(&mut a, &[]);
        method(ch, 60, 20, &a)
    }

    /// `basic.publish` (method frame only).
    pub fn basic_publish(ch: u16, exchange: &str, routing_key: &str) -> Vec<u8> {
        let mut a = vec![0, 0];
        shortstr(&mut a, exchange);
        shortstr(&mut a, routing_key);
        a.push(0);
        method(ch, 60, 40, &a)
    }

    /// A content header of class basic declaring `body_size`, no properties.
    pub fn content_header(ch: u16, body_size: u64) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&body_size.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        frame(super::frame_type::HEADER, ch, &p)
    }

    /// A content body frame.
    pub fn body(ch: u16, bytes: &[u8]) -> Vec<u8> {
        frame(super::frame_type::BODY, ch, bytes)
    }

    /// A whole publish: method, header and one body frame.
    pub fn publish(ch: u16, routing_key: &str, body: &[u8]) -> Vec<u8> {
        let mut out = basic_publish(ch, "", routing_key);
        out.extend(content_header(ch, body.len() as u64));
        out.extend(self::body(ch, body));
        out
    }
}

/// A frame read by [`RawAmqp`].
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// Frame type octet.
    pub kind: u8,
    /// Channel.
    pub channel: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// Class and method of a method frame.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        if self.kind != frame_type::METHOD {
            return None;
        }
        let p = self.payload.get(..4)?;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// Reply code and text of a `connection.close` or `channel.close`.
    pub fn close_reason(&self) -> Option<(u16, String)> {
        match self.method_id()? {
            (10, 50) | (20, 40) => {}
            _ => return None,
        }
        let code = u16::from_be_bytes([*self.payload.get(4)?, *self.payload.get(5)?]);
        let len = *self.payload.get(6)? as usize;
        let text = self.payload.get(7..7 + len)?;
        Some((code, String::from_utf8_lossy(text).into_owned()))
    }

    /// Whether this is `connection.close`.
    pub fn is_connection_close(&self) -> bool {
        self.channel == 0 && self.method_id() == Some((10, 50))
    }
}

/// A client that speaks AMQP by hand over a plain socket, to send what real clients never do.
pub struct RawAmqp {
    /// The socket.
    pub sock: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// `frame_max` the server proposed in `connection.tune`.
    pub frame_max: u32,
    /// `channel_max` the server proposed in `connection.tune`.
    pub channel_max: u16,
}

impl RawAmqp {
    /// Connect (TCP only, nothing sent).
    pub async fn connect(addr: std::net::SocketAddr) -> Result<RawAmqp> {
        let sock = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .context("TCP connect timed out")??;
        let _ = sock.set_nodelay(true);
        Ok(RawAmqp {
            sock,
            buf: Vec::with_capacity(8192),
            frame_max: 0,
            channel_max: 0,
        })
    }

    /// The `host:port` of an `amqp://` URL.
    pub fn addr_of(url: &str) -> Result<std::net::SocketAddr> {
        let rest = url.split('@').nth(1).context("no @ in URL")?;
        let hostport = rest.split('/').next().context("no host in URL")?;
        Ok(hostport.parse()?)
    }

    /// Write bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.sock.write_all(bytes).await?;
        Ok(())
    }

    /// Read exactly `n` bytes (e.g. the protocol header a server answers with).
    pub async fn read_exact(&mut self, n: usize, within: Duration) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            let got = tokio::time::timeout(within, self.sock.read_buf(&mut self.buf))
                .await
                .context("no answer in time")??;
            if got == 0 {
                bail!(
                    "connection closed after {} of {n} bytes: {:?}",
                    self.buf.len(),
                    self.buf
                );
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next frame; `None` when the server closed the socket. Fails after `within` without one.
    pub async fn read_frame(&mut self, within: Duration) -> Result<Option<RawFrame>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= size + 8 {
                    let end = self.buf[size + 7];
                    if end != 0xCE {
                        bail!("server sent a frame with end octet {end:#04x}");
                    }
                    let f = RawFrame {
                        kind: self.buf[0],
                        channel: u16::from_be_bytes([self.buf[1], self.buf[2]]),
                        payload: self.buf[7..7 + size].to_vec(),
                    };
                    self.buf.drain(..size + 8);
                    return Ok(Some(f));
                }
            }
            let read = tokio::time::timeout_at(deadline, self.sock.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => bail!("no frame within {within:?}"),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Skip heartbeats and return the next method frame, failing on anything else (a
    /// `connection.close` is returned like any other method).
    pub async fn next_method(&mut self, within: Duration) -> Result<RawFrame> {
        loop {
            match self.read_frame(within).await? {
                None => bail!("server closed the socket"),
                Some(f) if f.kind == frame_type::HEARTBEAT => {}
                Some(f) if f.kind == frame_type::METHOD => return Ok(f),
                Some(f) => bail!("expected a method frame, got type {}", f.kind),
            }
        }
    }

    /// Wait for a method `(class, method)` on `channel`; fails on a close or another method.
    pub async fn expect(&mut self, channel: u16, id: (u16, u16)) -> Result<RawFrame> {
        let f = self.next_method(Duration::from_secs(20)).await?;
        if let Some((code, text)) = f.close_reason() {
            bail!(
                "expected {id:?} on channel {channel}, got a close {code}: {text} (channel {})",
                f.channel
            );
        }
        anyhow::ensure!(
            f.channel == channel && f.method_id() == Some(id),
            "expected {id:?} on channel {channel}, got {:?} on channel {}",
            f.method_id(),
            f.channel
        );
        Ok(f)
    }

    /// Read frames until `connection.close`, answer it with close-ok and return its code and
    /// text. Fails if the socket closes first or nothing comes within `within`.
    pub async fn expect_connection_close(&mut self, within: Duration) -> Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await? {
                None => bail!("socket closed without a connection.close"),
                Some(f) if f.is_connection_close() => {
                    let reason = f.close_reason().context("malformed connection.close")?;
                    let _ = self.send(&wire::close_ok()).await;
                    return Ok(reason);
                }
                Some(_) => {}
            }
        }
    }

    /// Read (and discard) until the server closes the socket; fails after `within`.
    pub async fn expect_eof(&mut self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.sock.read(&mut scratch)).await {
                Err(_) => bail!("socket still open after {within:?}"),
                Ok(Ok(0)) => return Ok(()),
                Ok(Err(_)) => return Ok(()),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Run the handshake up to `connection.open-ok`. `Ok(None)` when open; `Ok(Some((code,
    /// text)))` when the server closed the connection instead.
    pub async fn try_handshake(
        &mut self,
        name: &str,
        blocked_capable: bool,
    ) -> Result<Option<(u16, String)>> {
        let within = Duration::from_secs(30);
        self.send(wire::PROTOCOL_HEADER).await?;
        let start = self.next_method(within).await?;
        anyhow::ensure!(
            start.method_id() == Some((10, 10)),
            "expected connection.start, got {:?}",
            start.method_id()
        );
        self.send(&wire::start_ok(name, blocked_capable)).await?;
        let tune = self.next_method(within).await?;
        if let Some(reason) = tune.close_reason() {
            let _ = self.send(&wire::close_ok()).await;
            return Ok(Some(reason));
        }
        anyhow::ensure!(
            tune.method_id() == Some((10, 30)),
            "expected connection.tune, got {:?}",
            tune.method_id()
        );
        let p = &tune.payload;
        anyhow::ensure!(p.len() >= 12, "short connection.tune");
        self.channel_max = u16::from_be_bytes([p[4], p[5]]);
        self.frame_max = u32::from_be_bytes([p[6], p[7], p[8], p[9]]);
        self.send(&wire::tune_ok(self.channel_max, self.frame_max, 0))
            .await?;
        self.send(&wire::open()).await?;
        let ok = self.next_method(within).await?;
        if let Some(reason) = ok.close_reason() {
            let _ = self.send(&wire::close_ok()).await;
            return Ok(Some(reason));
        }
        anyhow::ensure!(
            ok.method_id() == Some((10, 41)),
            "expected connection.open-ok, got {:?}",
            ok.method_id()
        );
        Ok(None)
    }

    /// Connect and open a connection named `name` (with the `connection.blocked` capability).
    pub async fn open(addr: std::net::SocketAddr, name: &str) -> Result<RawAmqp> {
        let mut c = RawAmqp::connect(addr).await?;
        if let Some((code, text)) = c.try_handshake(name, true).await? {
            bail!("handshake refused: {code} {text}");
        }
        Ok(c)
    }

    /// Open a channel and wait for open-ok.
    pub async fn open_channel(&mut self, ch: u16) -> Result<()> {
        self.send(&wire::channel_open(ch)).await?;
        self.expect(ch, (20, 11)).await?;
        Ok(())
    }
}

/// Resident set size of this process (sluice runs in-process in these tests), from
/// `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The soft limit on open file descriptors of this process.
pub fn fd_soft_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// File descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Run `rabbitmqctl` against the test broker's node (`SLUICE_TEST_RABBITMQ_NODE`, default the
/// local node), synchronously; fails with its output when it fails.
pub fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new("rabbitmqctl");
    if let Ok(node) = std::env::var("SLUICE_TEST_RABBITMQ_NODE") {
        cmd.arg("-n").arg(node);
    }
    let out = cmd
        .args(args)
        .output()
        .context("running rabbitmqctl (is RabbitMQ installed here?)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "rabbitmqctl {} failed: {}{}",
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// Whether the broker has a connection whose client-provided name is `name`.
pub fn broker_has_connection(name: &str) -> Result<bool> {
    let text = rabbitmqctl(&["list_connections", "-q", "client_properties"])?;
    let needle = format!("\"{name}\"");
    Ok(text.contains(&needle))
}

/// Wait (up to `within`) until the broker no longer has a connection named `name`.
pub async fn wait_broker_connection_gone(name: &str, within: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let n = name.to_string();
        let present = tokio::task::spawn_blocking(move || broker_has_connection(&n)).await??;
        if !present {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the broker still has connection '{name}' after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How the broker saw a connection named `name` end, from its log
/// (`SLUICE_TEST_RABBITMQ_LOG`, default `/var/log/rabbitmq/rabbit@localhost.log`):
/// `Some(true)` closed with the AMQP close handshake, `Some(false)` the socket dropped,
/// `None` when the log has no close for it (yet) or cannot be read.
pub fn broker_log_close(name: &str) -> Option<bool> {
    let path = std::env::var("SLUICE_TEST_RABBITMQ_LOG")
        .unwrap_or_else(|_| "/var/log/rabbitmq/rabbit@localhost.log".to_string());
    let text = std::fs::read_to_string(path).ok()?;
    let needle = format!(" - {name}, vhost:");
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("closing AMQP connection") && l.contains(&needle))?;
    // A clean close is logged at info level on one line; a dropped socket is a warning whose
    // line ends with ':' and is followed by "client unexpectedly closed TCP connection".
    Some(line.contains("[info]") && !line.trim_end().ends_with(':'))
}

/// Wait until the broker has no connection named `name` and, when its log is readable, check
/// that it was closed with the AMQP close handshake rather than a dropped socket.
pub async fn assert_upstream_closed_cleanly(name: &str) -> Result<()> {
    wait_broker_connection_gone(name, Duration::from_secs(15)).await?;
    for _ in 0..50 {
        match broker_log_close(name) {
            Some(true) => return Ok(()),
            Some(false) => bail!("the broker logged connection '{name}' as dropped, not closed"),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    eprintln!("note: no broker log line for '{name}'; checked only that it is gone");
    Ok(())
}

/// A well-behaved lapin client on its own connection through sluice: one task publishes with
/// confirms, one consumes, so a test can check that whatever it does to sluice, other clients
/// keep working.
pub struct Bystander {
    conn: Connection,
    queue: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<AtomicU64>,
    consumed: std::sync::Arc<AtomicU64>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    publisher: tokio::task::JoinHandle<()>,
    _queues: Queues,
}

impl Bystander {
    /// Connect through sluice at `url` as producer `bystander-…` and start publishing and
    /// consuming on a queue of its own.
    pub async fn start(url: &str) -> Result<Bystander> {
        use futures_lite::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let queue = unique("bystander");
        let guard = Queues::new([queue.clone()]);
        let conn = connect(url, &unique("bystander")).await?;
        let setup = conn.create_channel().await?;
        setup
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let consumed = Arc::new(AtomicU64::new(0));
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));

        let mut consumer = setup
            .basic_consume(
                queue.as_str().into(),
                "bystander".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (c, e) = (consumed.clone(), error.clone());
        tokio::spawn(async move {
            while let Some(d) = consumer.next().await {
                match d {
                    Ok(_) => {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => {
                        e.lock()
                            .map(|mut g| *g = Some(format!("consumer: {err}")))
                            .ok();
                        return;
                    }
                }
            }
        });

        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (s, a, e, q) = (stop.clone(), acked.clone(), error.clone(), queue.clone());
        let publisher = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let r = async {
                    let confirm = ch
                        .basic_publish(
                            "".into(),
                            q.as_str().into(),
                            BasicPublishOptions::default(),
                            &i.to_be_bytes(),
                            lapin::BasicProperties::default(),
                        )
                        .await?;
                    let c = tokio::time::timeout(Duration::from_secs(30), confirm)
                        .await
                        .context("no confirm within 30 s")??;
                    anyhow::ensure!(c.is_ack(), "publish {i} was nacked");
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                if let Err(err) = r {
                    e.lock()
                        .map(|mut g| *g = Some(format!("publisher: {err:#}")))
                        .ok();
                    return;
                }
                a.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let b = Bystander {
            conn,
            queue,
            stop,
            acked,
            consumed,
            error,
            publisher,
            _queues: guard,
        };
        b.alive("at start").await?;
        Ok(b)
    }

    /// The queue the bystander publishes to and consumes from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn failure(&self) -> Option<String> {
        self.error.lock().ok().and_then(|g| g.clone())
    }

    /// Check that the bystander still makes progress: at least 5 more confirmed publishes and
    /// 5 more deliveries (within 30 s, a bound against hangs, not a speed requirement).
    pub async fn alive(&self, when: &str) -> Result<()> {
        let (a0, c0) = (
            self.acked.load(Ordering::SeqCst),
            self.consumed.load(Ordering::SeqCst),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.failure() {
                bail!("bystander failed {when}: {e}");
            }
            let (a, c) = (
                self.acked.load(Ordering::SeqCst),
                self.consumed.load(Ordering::SeqCst),
            );
            if a >= a0 + 5 && c >= c0 + 5 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "bystander stalled {when}: {} confirms and {} deliveries in 30 s",
                    a - a0,
                    c - c0
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop, check that nothing failed and every confirmed publish was delivered, and close.
    /// Returns the number of confirmed publishes.
    pub async fn finish(self) -> Result<u64> {
        self.alive("at the end").await?;
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.publisher).await;
        if let Some(e) = self.error.lock().ok().and_then(|g| g.clone()) {
            bail!("bystander failed: {e}");
        }
        let acked = self.acked.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.consumed.load(Ordering::SeqCst) < acked {
            if std::time::Instant::now() > deadline {
                bail!(
                    "bystander: {acked} confirmed but only {} delivered",
                    self.consumed.load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.conn.close(200, "bye".into()).await;
        Ok(acked)
    }
}

/// Whether something accepts TCP connections on the test broker's address.
pub fn broker_listening() -> bool {
    broker_addr()
        .parse::<std::net::SocketAddr>()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// Start the broker's RabbitMQ application and wait until it accepts connections again.
pub fn broker_start_app() -> Result<()> {
    rabbitmqctl(&["start_app"])?;
    let _ = rabbitmqctl(&["await_startup"]);
    for _ in 0..120 {
        if broker_listening() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "RabbitMQ started but does not accept connections on {}",
        broker_addr()
    )
}

/// The broker's RabbitMQ application stopped (`rabbitmqctl stop_app`; the Erlang node stays up,
/// which makes a restart take seconds). Dropping the guard starts it again, synchronously, even
/// when the test failed or panicked.
pub struct BrokerStopped {
    running: bool,
}

impl BrokerStopped {
    /// Stop the application now (every connection is closed by the broker).
    pub fn stop() -> Result<BrokerStopped> {
        let guard = BrokerStopped { running: false };
        rabbitmqctl(&["stop_app"])?;
        Ok(guard)
    }

    /// Start it again now.
    pub fn start(&mut self) -> Result<()> {
        broker_start_app()?;
        self.running = true;
        Ok(())
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.running {
            if let Err(e) = broker_start_app() {
                eprintln!(
                    "could not restart RabbitMQ after a test: {e:#}; run `rabbitmqctl start_app`"
                );
            }
        }
    }
}

/// The broker's memory high watermark, as `rabbitmqctl set_vm_memory_high_watermark` takes it:
/// `["0.4"]` or `["absolute", "1073741824"]`.
pub fn broker_watermark() -> Result<Vec<String>> {
    let live = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])?;
    let live = live.trim();
    if let Some(n) = live
        .strip_prefix("{absolute,")
        .and_then(|r| r.strip_suffix('}'))
    {
        return Ok(vec!["absolute".into(), n.trim().to_string()]);
    }
    let relative: f64 = live
        .parse()
        .with_context(|| format!("unexpected watermark {live:?}"))?;
    if relative >= 0.01 {
        return Ok(vec![live.to_string()]);
    }
    // A tiny value is what a test run killed before it could restore leaves behind: go back to
    // the configured one.
    let env = rabbitmqctl(&["environment"])?;
    let configured = env
        .split("{vm_memory_high_watermark,")
        .nth(1)
        .and_then(|r| r.split('}').next())
        .map(|v| v.trim().to_string())
        .filter(|v| v.parse::<f64>().is_ok())
        .unwrap_or_else(|| "0.4".to_string());
    eprintln!("broker watermark is {live}, a leftover: restoring the configured {configured}");
    Ok(vec![configured])
}

/// The broker's memory watermark set tiny, which raises its memory alarm. Dropping the guard
/// restores the value it had, synchronously, even when the test failed or panicked.
pub struct LowWatermark {
    original: Vec<String>,
    restored: bool,
}

impl LowWatermark {
    /// Read the current watermark, then set it to `tiny` (e.g. `"0.0000001"`).
    pub fn set(tiny: &str) -> Result<LowWatermark> {
        let original = broker_watermark()?;
        let guard = LowWatermark {
            original,
            restored: false,
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", tiny])?;
        Ok(guard)
    }

    /// The watermark that will be restored.
    pub fn original(&self) -> String {
        self.original.join(" ")
    }

    /// Restore the original watermark now.
    pub fn restore(&mut self) -> Result<()> {
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.original.iter().map(String::as_str));
        rabbitmqctl(&args)?;
        self.restored = true;
        Ok(())
    }
}

impl Drop for LowWatermark {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self.restore() {
                eprintln!(
                    "could not restore the broker watermark to {}: {e:#}",
                    self.original()
                );
            }
        }
    }
}
