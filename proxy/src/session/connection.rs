//! Accepting one client: protocol header, `connection.start` (replayed from the upstream's last
//! one), `start-ok` (identity, tarpit, limits), then the upstream connection and the two pumps.
//!
//! sluice answers the client's protocol header before it connects upstream, so a tarpitted or
//! refused attempt never costs the broker a connection, and an unreachable broker gets the client
//! a proper `connection.close` with a reason instead of a reset.

use super::inbound::Inbound;
use super::outbound::Outbound;
use super::{Shared, ToClient};
use crate::admin::metrics::Limit;
use crate::admin::ListenerStats;
use crate::config::validate::ListenerConfig;
use crate::identity::ConnFacts;
use crate::protocol::amqp::frame::{self, Frame, FrameKind, PROTOCOL_HEADER};
use crate::protocol::amqp::handshake::StartOk;
use crate::protocol::amqp::method::{self, MethodId};
use crate::protocol::amqp::table::{self, FieldValue};
use crate::protocol::amqp::wire::put_long_bytes;
use crate::protocol::amqp::{code, reply};
use crate::quota::Admission;
use crate::runtime::Runtime;
use crate::tls::Stream;
use bytes::{BufMut, Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

/// Frames before `tune-ok` may be at most this large (start-ok carries client properties).
pub const HANDSHAKE_FRAME_MAX: u32 = 128 * 1024;

/// Serve one accepted client connection to the end.
pub async fn serve(
    rt: Arc<Runtime>,
    listener: Arc<ListenerConfig>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let id = rt.next_conn_id();
    let stats = rt.metrics.listener(&listener.name);
    stats.accepted.fetch_add(1, Relaxed);
    let span = tracing::info_span!("conn", id, listener = %listener.name, peer = %peer, producer = tracing::field::Empty);
    async move {
        let _ = client.set_nodelay(true);
        let Some(client) = client_stream(&rt, &listener, &stats, client).await else {
            return;
        };
        let total = rt.connections.fetch_add(1, Relaxed) + 1;
        stats.connections.fetch_add(1, Relaxed);
        let max = rt.active().config.limits.max_connections;
        let result = if total > max {
            stats.refused.fetch_add(1, Relaxed);
            stats.limit_hit(Limit::MaxConnections);
            refuse_early(
                client,
                &rt,
                &listener,
                code::NOT_ALLOWED,
                &format!("NOT_ALLOWED - sluice: connection limit of {max} reached; retry later"),
            )
            .await;
            Ok(())
        } else {
            run(&rt, &listener, &stats, client, peer).await
        };
        if let Err(e) = result {
            debug!(error = %e, "connection ended");
        }
        stats.connections.fetch_sub(1, Relaxed);
        rt.connections.fetch_sub(1, Relaxed);
    }
    .instrument(span)
    .await
}

/// The client's byte stream: TLS terminated here when the listener has it (within the
/// handshake timeout), plain otherwise. `None` when the TLS handshake failed (counted, logged).
pub(crate) async fn client_stream(
    rt: &Runtime,
    listener: &ListenerConfig,
    stats: &ListenerStats,
    client: TcpStream,
) -> Option<Stream> {
    match &listener.tls {
        None => Some(Stream::Plain(client)),
        Some(tls) => {
            let timeout = rt.active().config.limits.handshake_timeout;
            match tokio::time::timeout(timeout, tls.acceptor.accept(client)).await {
                Ok(Ok(s)) => Some(Stream::ClientTls(Box::new(s))),
                Ok(Err(e)) => {
                    stats.protocol_errors.fetch_add(1, Relaxed);
                    warn!(error = %e, "client TLS handshake failed");
                    None
                }
                Err(_) => {
                    stats.protocol_errors.fetch_add(1, Relaxed);
                    stats.limit_hit(Limit::HandshakeTimeout);
                    warn!("client TLS handshake timed out");
                    None
                }
            }
        }
    }
}

/// The `connection.start` sluice replays to clients: the upstream's own when known.
fn start_frame(rt: &Runtime, listener: &Arc<str>) -> Bytes {
    if let Some(b) = rt.start_cache.get(listener) {
        return b.clone();
    }
    default_start().raw
}

/// A RabbitMQ-compatible `connection.start`, used until the upstream has sent its own.
pub fn default_start() -> Frame {
    let caps: Vec<(String, FieldValue)> = [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ]
    .iter()
    .map(|c| (c.to_string(), FieldValue::Bool(true)))
    .collect();
    let props = vec![
        (
            "product".to_string(),
            FieldValue::LongStr(b"sluice".to_vec()),
        ),
        (
            "version".to_string(),
            FieldValue::LongStr(env!("CARGO_PKG_VERSION").as_bytes().to_vec()),
        ),
        ("capabilities".to_string(), FieldValue::Table(caps)),
    ];
    let mut p = BytesMut::with_capacity(512);
    p.put_u16(MethodId::CONNECTION_START.0);
    p.put_u16(MethodId::CONNECTION_START.1);
    p.put_u8(0);
    p.put_u8(9);
    let _ = table::encode_table(&mut p, &props);
    put_long_bytes(&mut p, b"PLAIN AMQPLAIN");
    put_long_bytes(&mut p, b"en_US");
    Frame::encode(FrameKind::Method, 0, &p)
}

/// Read frames from the client until a method frame on channel 0 arrives.
async fn read_method(sock: &mut Stream, buf: &mut BytesMut) -> Result<Frame, super::SessionError> {
    loop {
        if let Some(f) = frame::split(buf, HANDSHAKE_FRAME_MAX)? {
            if f.kind == FrameKind::Heartbeat {
                continue;
            }
            if f.kind != FrameKind::Method || f.channel != 0 {
                return Err(super::SessionError::Unexpected(format!(
                    "expected connection.start-ok, got a {:?} frame on channel {}",
                    f.kind, f.channel
                )));
            }
            return Ok(f);
        }
        if sock.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

/// Close a client that has sent start-ok: `connection.close`, then wait briefly for close-ok.
async fn close_client(sock: &mut Stream, buf: &mut BytesMut, code: u16, text: &str) {
    let close = reply::connection_close(code, text, MethodId(0, 0));
    if sock.write_all(&close.raw).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(f) = read_method(sock, buf).await {
            if let Ok((MethodId::CONNECTION_CLOSE_OK, _)) = method::split_id(f.payload()) {
                break;
            }
        }
    })
    .await;
    let _ = sock.shutdown().await;
}

/// Refuse a connection with a reason, as far into the handshake as the client lets us.
async fn refuse_early(
    mut client: Stream,
    rt: &Runtime,
    listener: &ListenerConfig,
    code: u16,
    text: &str,
) {
    let timeout = rt.active().config.limits.handshake_timeout;
    let _ = tokio::time::timeout(timeout, async {
        let mut header = [0u8; 8];
        if client.read_exact(&mut header).await.is_err() || &header != PROTOCOL_HEADER {
            let _ = client.write_all(PROTOCOL_HEADER).await;
            return;
        }
        if client
            .write_all(&start_frame(rt, &listener.name))
            .await
            .is_err()
        {
            return;
        }
        let mut buf = BytesMut::with_capacity(4096);
        if read_method(&mut client, &mut buf).await.is_ok() {
            close_client(&mut client, &mut buf, code, text).await;
        }
    })
    .await;
}

async fn run(
    rt: &Arc<Runtime>,
    listener: &Arc<ListenerConfig>,
    stats: &Arc<ListenerStats>,
    mut client: Stream,
    peer: SocketAddr,
) -> Result<(), super::SessionError> {
    let active = rt.active();
    let limits = active.config.limits.clone();
    let handshake_deadline = Instant::now() + limits.handshake_timeout;

    // 1. Protocol header.
    let mut header = [0u8; 8];
    match tokio::time::timeout(limits.handshake_timeout, client.read_exact(&mut header)).await {
        Ok(Ok(_)) if &header == PROTOCOL_HEADER => {}
        Ok(Ok(_)) => {
            // The spec's answer to a wrong header: our own header, then close.
            stats.protocol_errors.fetch_add(1, Relaxed);
            warn!(header = ?String::from_utf8_lossy(&header), "not an AMQP 0-9-1 client; answered with the protocol header");
            let _ = client.write_all(PROTOCOL_HEADER).await;
            let _ = client.shutdown().await;
            return Ok(());
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            stats.protocol_errors.fetch_add(1, Relaxed);
            stats.limit_hit(Limit::HandshakeTimeout);
            return Err(super::SessionError::HandshakeTimeout);
        }
    }

    // 2. connection.start (replayed), 3. start-ok.
    client.write_all(&start_frame(rt, &listener.name)).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let start_ok_frame = match tokio::time::timeout_at(
        handshake_deadline.into(),
        read_method(&mut client, &mut buf),
    )
    .await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            stats.protocol_errors.fetch_add(1, Relaxed);
            let text = format!("sluice: {e}");
            close_client(&mut client, &mut buf, e.reply_code(), &text).await;
            return Err(e);
        }
        Err(_) => {
            stats.protocol_errors.fetch_add(1, Relaxed);
            stats.limit_hit(Limit::HandshakeTimeout);
            return Err(super::SessionError::HandshakeTimeout);
        }
    };
    let (id, args) = method::split_id(start_ok_frame.payload())?;
    if id != MethodId::CONNECTION_START_OK {
        stats.protocol_errors.fetch_add(1, Relaxed);
        let text = format!("COMMAND_INVALID - sluice: expected connection.start-ok, got {id}");
        close_client(&mut client, &mut buf, code::COMMAND_INVALID, &text).await;
        return Ok(());
    }
    let mut start_ok = match StartOk::decode(args) {
        Ok(s) => s,
        Err(e) => {
            stats.protocol_errors.fetch_add(1, Relaxed);
            let text = format!("SYNTAX_ERROR - sluice: malformed connection.start-ok: {e}");
            close_client(&mut client, &mut buf, code::SYNTAX_ERROR, &text).await;
            return Ok(());
        }
    };
    let facts = ConnFacts {
        client_properties: start_ok
            .client_properties
            .iter()
            .filter_map(|(k, v)| v.to_text().map(|t| (k.clone(), t.into_owned())))
            .collect(),
        user: start_ok.user(),
        vhost: None,
        peer_ip: Some(peer.ip()),
    };
    let pre_identity = active.config.identity.for_connection(&facts).name;

    // 4. Tarpit: pace connection attempts per producer; past max_delay refuse with 530.
    if let Some(tarpit) = &active.tarpit {
        let mut held = Duration::ZERO;
        loop {
            match tarpit.check(&pre_identity, 1) {
                Admission::Allowed => break,
                Admission::Wait(d) if held + d <= active.config.tarpit.max_delay => {
                    if held.is_zero() {
                        stats.tarpitted.fetch_add(1, Relaxed);
                    }
                    held += d;
                    tokio::time::sleep(d).await;
                }
                _ => {
                    // Refuse only after holding the attempt for max_delay, so a client that
                    // reconnects at once after a refusal still cannot spin.
                    let rest = active.config.tarpit.max_delay.saturating_sub(held);
                    if held.is_zero() {
                        stats.tarpitted.fetch_add(1, Relaxed);
                    }
                    tokio::time::sleep(rest).await;
                    stats.refused.fetch_add(1, Relaxed);
                    info!(producer = %pre_identity, "connection attempt refused by the tarpit");
                    let text = format!(
                        "NOT_ALLOWED - sluice: too many connection attempts from producer '{pre_identity}'; retry later"
                    );
                    close_client(&mut client, &mut buf, code::NOT_ALLOWED, &text).await;
                    return Ok(());
                }
            }
        }
    }
    if !rt.add_producer_conn(&pre_identity, limits.max_connections_per_producer) {
        stats.refused.fetch_add(1, Relaxed);
        stats.limit_hit(Limit::MaxConnectionsPerProducer);
        let text = format!(
            "NOT_ALLOWED - sluice: producer '{pre_identity}' has {} connections, the limit",
            limits.max_connections_per_producer
        );
        close_client(&mut client, &mut buf, code::NOT_ALLOWED, &text).await;
        return Ok(());
    }
    let result = proxy(
        rt,
        listener,
        stats,
        client,
        buf,
        peer,
        facts,
        &mut start_ok,
        handshake_deadline,
    )
    .await;
    rt.remove_producer_conn(&pre_identity);
    result
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    rt: &Arc<Runtime>,
    listener: &Arc<ListenerConfig>,
    stats: &Arc<ListenerStats>,
    mut client: Stream,
    mut buf: BytesMut,
    peer: SocketAddr,
    facts: ConnFacts,
    start_ok: &mut StartOk,
    handshake_deadline: Instant,
) -> Result<(), super::SessionError> {
    let limits = rt.active().config.limits.clone();
    // 5. Upstream: connect, exchange protocol headers, take its connection.start.
    let upstream = match connect_upstream(rt, listener, limits.connect_timeout).await {
        Ok(u) => u,
        Err(e) => {
            stats.upstream_errors.fetch_add(1, Relaxed);
            warn!(upstream = %listener.upstream.addr, error = %e, "upstream unreachable");
            let text = format!(
                "INTERNAL_ERROR - sluice: upstream {} unreachable: {e}",
                listener.upstream.addr
            );
            close_client(&mut client, &mut buf, code::INTERNAL_ERROR, &text).await;
            return Ok(());
        }
    };
    let (mut upstream, upstream_buf) = upstream;

    // 6. start-ok, with the connection.blocked capability so the broker tells sluice.
    let client_blocked_capable = start_ok.has_capability("connection.blocked");
    start_ok.set_capability("connection.blocked");
    let payload = start_ok.encode()?;
    let start_ok_frame = Frame::encode(FrameKind::Method, 0, &payload);
    upstream.write_all(&start_ok_frame.raw).await?;

    let mut shared = Shared::default();
    shared.client_blocked_capable = client_blocked_capable;
    shared.budget = Some(rt.buffered.clone());
    let shared = Arc::new(parking_lot::Mutex::new(shared));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ToClient>();
    let (client_rd, client_wr) = client.into_split();
    let (upstream_rd, upstream_wr) = upstream.into_split();
    let done = rt.shutdown.child_token();
    let conn_done = tokio_util::sync::CancellationToken::new();
    let outbound = Outbound::new(
        rt.clone(),
        listener.clone(),
        stats.clone(),
        shared.clone(),
        upstream_rd,
        upstream_buf,
        client_wr,
        rx,
        limits.max_frame_size,
        conn_done.clone(),
    );
    let out_task = tokio::spawn(outbound.run().in_current_span());
    let inbound = Inbound::new(
        rt.clone(),
        listener.clone(),
        stats.clone(),
        shared,
        client_rd,
        buf,
        upstream_wr,
        tx,
        facts,
        peer,
        handshake_deadline,
        done,
        conn_done.clone(),
    );
    let result = inbound.run().await;
    // Let the outbound pump finish the close handshake it may be in, then stop it.
    let mut out_task = out_task;
    if tokio::time::timeout(Duration::from_secs(3), &mut out_task)
        .await
        .is_err()
    {
        out_task.abort();
    }
    result
}

/// A connection to the listener's upstream, TLS when it is configured, each step within
/// `timeout`. Shared by every protocol's session.
pub(crate) async fn dial_upstream(
    listener: &ListenerConfig,
    timeout: Duration,
) -> Result<Stream, String> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&listener.upstream.addr))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    match &listener.upstream.tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => tokio::time::timeout(timeout, tls.connect(tcp))
            .await
            .map_err(|_| format!("no TLS handshake within {timeout:?}"))?
            .map_err(|e| format!("TLS to the broker failed: {e}")),
    }
}

async fn connect_upstream(
    rt: &Runtime,
    listener: &ListenerConfig,
    timeout: Duration,
) -> Result<(Stream, BytesMut), String> {
    let mut s = dial_upstream(listener, timeout).await?;
    s.write_all(PROTOCOL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let start = tokio::time::timeout(timeout, async {
        loop {
            if buf.starts_with(b"AMQP") && buf.len() >= 8 {
                return Err(format!(
                    "upstream does not speak AMQP 0-9-1 (answered {:?})",
                    buf.get(..8).unwrap_or_default()
                ));
            }
            match frame::split(&mut buf, HANDSHAKE_FRAME_MAX) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame from upstream: {e}")),
            }
            match s.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err("upstream closed the connection during the handshake".to_string())
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| format!("no connection.start within {timeout:?}"))??;
    match method::split_id(start.payload()) {
        Ok((MethodId::CONNECTION_START, _)) => {
            rt.start_cache
                .insert(listener.name.clone(), start.raw.clone());
        }
        _ => return Err("upstream did not send connection.start".to_string()),
    }
    Ok((s, buf))
}
