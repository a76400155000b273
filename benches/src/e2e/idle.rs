//! Resident memory per idle proxied connection: a fresh proxy, a baseline after a few
//! connections came and went, then N idle AMQP connections (handshake done, no channel) held
//! open through it; the growth of `VmRSS` divided by N.

use super::procs::{self, Proc, SluiceMode};
use super::{Plan, Target};
use anyhow::{Context, Result};
use bytes::{BufMut, BytesMut};
use serde::Serialize;
use sluice::protocol::amqp::frame::{self, Frame, FrameKind, PROTOCOL_HEADER};
use sluice::protocol::amqp::method::{self, MethodId, Tune};
use sluice::protocol::amqp::table::{self, FieldValue};
use sluice::protocol::amqp::wire::{put_long_bytes, put_short_str};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Memory of one proxy holding idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRss {
    /// Which proxy.
    pub target: String,
    /// Connections held open.
    pub connections: usize,
    /// `VmRSS` before, KiB.
    pub baseline_kib: u64,
    /// `VmRSS` with the connections open, KiB.
    pub loaded_kib: u64,
    /// (loaded − baseline) / connections.
    pub kib_per_connection: f64,
}

/// An AMQP connection that finished its handshake (guest/guest, vhost `/`) and does nothing.
struct IdleConn {
    sock: TcpStream,
    buf: BytesMut,
}

fn method_frame(id: MethodId, args: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut p = BytesMut::with_capacity(128);
    p.put_u16(id.0);
    p.put_u16(id.1);
    args(&mut p);
    Frame::encode(FrameKind::Method, 0, &p)
}

impl IdleConn {
    async fn open(addr: &str, name: &str) -> Result<IdleConn> {
        let sock = TcpStream::connect(addr).await?;
        let _ = sock.set_nodelay(true);
        let mut c = IdleConn {
            sock,
            buf: BytesMut::with_capacity(4096),
        };
        c.sock.write_all(PROTOCOL_HEADER).await?;
        c.expect(MethodId::CONNECTION_START).await?;
        let mut props = BytesMut::new();
        table::encode_table(
            &mut props,
            &vec![(
                "connection_name".to_string(),
                FieldValue::LongStr(name.as_bytes().to_vec()),
            )],
        )?;
        let start_ok = method_frame(MethodId::CONNECTION_START_OK, |p| {
            p.put_slice(&props);
            let _ = put_short_str(p, "PLAIN");
            put_long_bytes(p, b"\0guest\0guest");
            let _ = put_short_str(p, "en_US");
        });
        c.sock.write_all(&start_ok.raw).await?;
        let tune = c.expect(MethodId::CONNECTION_TUNE).await?;
        let tune = Tune::decode(&tune)?;
        let tune_ok = method_frame(MethodId::CONNECTION_TUNE_OK, |p| {
            p.put_u16(tune.channel_max.clamp(1, 16));
            p.put_u32(131_072);
            p.put_u16(0); // no heartbeats: idle means idle
        });
        c.sock.write_all(&tune_ok.raw).await?;
        let open = method_frame(MethodId::CONNECTION_OPEN, |p| {
            let _ = put_short_str(p, "/");
            p.put_u8(0);
            p.put_u8(0);
        });
        c.sock.write_all(&open.raw).await?;
        c.expect(MethodId::CONNECTION_OPEN_OK).await?;
        Ok(c)
    }

    /// Read until a method frame on channel 0; return its arguments if it is `want`.
    async fn expect(&mut self, want: MethodId) -> Result<Vec<u8>> {
        loop {
            if let Some(f) = frame::split(&mut self.buf, 131_072)? {
                if f.kind != FrameKind::Method {
                    continue;
                }
                let (id, args) = method::split_id(f.payload())?;
                anyhow::ensure!(id == want, "expected {want}, got {id}");
                return Ok(args.to_vec());
            }
            anyhow::ensure!(
                self.sock.read_buf(&mut self.buf).await? > 0,
                "connection closed"
            );
        }
    }

    async fn close(mut self) {
        let mut args = BytesMut::new();
        args.put_u16(200);
        let _ = put_short_str(&mut args, "idle test done");
        args.put_u32(0);
        let close = method_frame(MethodId::CONNECTION_CLOSE, |p| p.put_slice(&args));
        if self.sock.write_all(&close.raw).await.is_ok() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                self.expect(MethodId::CONNECTION_CLOSE_OK),
            )
            .await;
        }
    }
}

async fn open(addr: String, n: usize) -> Result<Vec<IdleConn>> {
    let gate = Arc::new(Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, gate) = (addr.clone(), gate.clone());
        set.spawn(async move {
            let _slot = gate.acquire_owned().await;
            tokio::time::timeout(
                Duration::from_secs(30),
                IdleConn::open(&addr, &format!("e2e-idle-{i}")),
            )
            .await
            .context("idle connection handshake timed out")?
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.context("connect task")? {
            Ok(c) => out.push(c),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        eprintln!(
            "e2e: idle: {} of {n} connections failed, e.g. {}",
            failed.len(),
            failed[0]
        );
    }
    anyhow::ensure!(!out.is_empty(), "no idle connection could be opened");
    Ok(out)
}

async fn close(conns: Vec<IdleConn>) {
    let mut set = tokio::task::JoinSet::new();
    for c in conns {
        set.spawn(c.close());
    }
    while set.join_next().await.is_some() {}
}

async fn measure_one(p: &Proc, n: usize) -> Result<IdleRss> {
    let addr = p.addr.to_string();
    // Warm up: thread pools, allocator arenas, the first connection's one-off costs.
    close(open(addr.clone(), 16).await?).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = procs::rss_kib(p.pid())?;
    let conns = open(addr, n).await?;
    let opened = conns.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = procs::rss_kib(p.pid())?;
    close(conns).await;
    Ok(IdleRss {
        target: p.name.clone(),
        connections: opened,
        baseline_kib: baseline,
        loaded_kib: loaded,
        kib_per_connection: loaded.saturating_sub(baseline) as f64 / opened as f64,
    })
}

/// Sockets the local RabbitMQ can still accept, less a margin, from `rabbitmqctl status`
/// ("Sockets: USED, limit: MAX"). Running a node out of file descriptors does not just refuse
/// connections: it can take down the node's memory monitor and leave it unable to declare queues
/// until the application is restarted, so the idle measurement stays below the limit.
fn broker_socket_headroom() -> Option<usize> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("status")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("Sockets:"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse::<usize>().ok());
    let (used, limit) = (nums.next()?, nums.next()?);
    Some(limit.saturating_sub(used).saturating_sub(100))
}

/// Measure HAProxy and sluice (its most complete mode among `targets`), each freshly started.
pub async fn measure(plan: &Plan, targets: &[Target]) -> Result<Vec<IdleRss>> {
    let n = match broker_socket_headroom() {
        Some(room) if room < plan.idle_connections => {
            eprintln!(
                "e2e: idle: the broker has room for {room} more sockets (its `ulimit -n`); \
                 measuring {room} connections instead of {}",
                plan.idle_connections
            );
            room
        }
        _ => plan.idle_connections,
    };
    let mut out = Vec::new();
    if targets.contains(&Target::Haproxy) {
        let p = procs::start_haproxy(&plan.haproxy_bin, &plan.dir, &plan.broker)?;
        match measure_one(&p, n).await {
            Ok(r) => {
                eprintln!(
                    "e2e: idle: haproxy {:.1} KiB per connection",
                    r.kib_per_connection
                );
                out.push(r);
            }
            Err(e) => eprintln!("e2e: idle: haproxy not measured: {e:#}"),
        }
    }
    let mode = [SluiceMode::Plugin, SluiceMode::Quotas, SluiceMode::NoRules]
        .into_iter()
        .find(|m| targets.contains(&Target::Sluice(*m)));
    if let Some(m) = mode {
        let p = procs::start_sluice(
            &plan.sluice_bin,
            &plan.dir,
            m,
            &plan.broker,
            &plan.plugin,
            "-idle",
        )?;
        let r = measure_one(&p, n).await?;
        eprintln!(
            "e2e: idle: {} {:.1} KiB per connection",
            m.name(),
            r.kib_per_connection
        );
        out.push(r);
    }
    Ok(out)
}
