//! One proxied Redis client connection.
//!
//! Redis clients pipeline: many commands go out before the first reply comes back, and replies
//! come back strictly in command order. sluice answers some commands itself (a shed push gets
//! `-SLUICE shed: …`; inside `MULTI` every command gets `+QUEUED` while the transaction is held
//! to be decided as a whole), so the two directions share a queue of [`Slot`]s, one per reply the
//! client is owed, in command order. The outbound pump walks it: an upstream reply fills the
//! front `Upstream` slot, and the `Local` replies behind it go out right after, exactly where the
//! client expects them, however many commands are still waiting on the server.

mod facts;
mod inbound;

use crate::admin::metrics::Limit;
use crate::admin::ListenerStats;
use crate::config::validate::ListenerConfig;
use crate::protocol::redis::resp::{error_reply, ReplyScanner};
use crate::runtime::Runtime;
use crate::session::io::OutQueue;
use crate::tls::{ReadHalf, Stream, WriteHalf};
use bytes::{Bytes, BytesMut};
use inbound::Inbound;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

/// One reply the client is owed, in command order.
#[derive(Debug)]
enum Slot {
    /// The server's next reply goes to the client.
    Upstream,
    /// The server's next reply is dropped (sluice already answered the command itself).
    Swallow,
    /// sluice's own reply.
    Local(Bytes),
    /// From here on replies do not pair with commands (RESP2 pub/sub, `MONITOR`,
    /// `CLIENT REPLY OFF`): everything the server sends goes to the client as it comes.
    Raw,
}

/// The reply queue both pumps share.
#[derive(Debug, Default)]
struct Replies {
    slots: VecDeque<Slot>,
    /// Bytes of `Local` replies queued (bounded by `max_buffered_per_connection`).
    local_bytes: usize,
    /// Slots that wait for the server (`Upstream`, `Swallow`, `Raw`): while there are none, a
    /// new `Local` reply can go out at once.
    waiting: usize,
}

impl Replies {
    fn pop_front(&mut self) -> Option<Slot> {
        let slot = self.slots.pop_front()?;
        match &slot {
            Slot::Local(b) => self.local_bytes = self.local_bytes.saturating_sub(b.len()),
            _ => self.waiting = self.waiting.saturating_sub(1),
        }
        Some(slot)
    }
}

struct Shared {
    replies: Mutex<Replies>,
    /// Wakes the outbound pump when a `Local` reply may be ready to go.
    wake: Notify,
    /// Cancelled when the outbound pump is done (server or client gone).
    done: CancellationToken,
}

impl Shared {
    /// Queue the slots of the commands about to be written upstream (before they are written,
    /// so no reply can arrive ahead of its slot), under one lock.
    fn push_all(&self, slots: &mut Vec<Slot>) {
        if slots.is_empty() {
            return;
        }
        let mut r = self.replies.lock();
        // Only a reply that can go out now needs the pump woken.
        let mut wake = false;
        for slot in slots.drain(..) {
            wake |= r.waiting == 0 && matches!(slot, Slot::Local(_) | Slot::Raw);
            match &slot {
                Slot::Local(b) => r.local_bytes += b.len(),
                _ => r.waiting += 1,
            }
            r.slots.push_back(slot);
        }
        drop(r);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Serve one accepted Redis client to the end.
pub async fn serve(
    rt: Arc<Runtime>,
    listener: Arc<ListenerConfig>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let id = rt.next_conn_id();
    let stats = rt.metrics.listener(&listener.name);
    stats.accepted.fetch_add(1, Relaxed);
    let span = tracing::info_span!("conn", id, listener = %listener.name, protocol = "redis", peer = %peer, producer = tracing::field::Empty);
    async move {
        let _ = client.set_nodelay(true);
        let Some(mut client) =
            crate::session::connection::client_stream(&rt, &listener, &stats, client).await
        else {
            return;
        };
        let total = rt.connections.fetch_add(1, Relaxed) + 1;
        stats.connections.fetch_add(1, Relaxed);
        let max = rt.active().config.limits.max_connections;
        if total > max {
            stats.refused.fetch_add(1, Relaxed);
            stats.limit_hit(Limit::MaxConnections);
            // Redis's own words for this, so clients treat it as they would the server's.
            let _ = client
                .write_all(&error_reply(&format!(
                    "ERR max number of clients reached (sluice: connection limit of {max})"
                )))
                .await;
            let _ = client.shutdown().await;
        } else {
            match connect_upstream(&listener).await {
                Ok(upstream) => run(&rt, &listener, &stats, client, upstream, peer).await,
                Err(e) => {
                    stats.upstream_errors.fetch_add(1, Relaxed);
                    warn!(upstream = %listener.upstream.addr, error = %e, "upstream unreachable");
                    let _ = client
                        .write_all(&error_reply(&format!(
                            "ERR sluice: upstream {} unreachable: {e}",
                            listener.upstream.addr
                        )))
                        .await;
                    let _ = client.shutdown().await;
                }
            }
        }
        stats.connections.fetch_sub(1, Relaxed);
        rt.connections.fetch_sub(1, Relaxed);
    }
    .instrument(span)
    .await
}

async fn connect_upstream(listener: &ListenerConfig) -> Result<Stream, String> {
    let timeout = Duration::from_secs(5).min(listener.probe.timeout.max(Duration::from_secs(1)));
    crate::session::connection::dial_upstream(listener, timeout).await
}

async fn run(
    rt: &Arc<Runtime>,
    listener: &Arc<ListenerConfig>,
    stats: &Arc<ListenerStats>,
    client: Stream,
    upstream: Stream,
    peer: SocketAddr,
) {
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let shared = Arc::new(Shared {
        replies: Mutex::new(Replies::default()),
        wake: Notify::new(),
        done: CancellationToken::new(),
    });
    let outbound = Outbound {
        shared: shared.clone(),
        stats: stats.clone(),
        upstream: up_r,
        client: client_w,
        buf: BytesMut::with_capacity(16 * 1024),
        scanner: ReplyScanner::default(),
        out: OutQueue::default(),
        raw: false,
    };
    let mut out_task = tokio::spawn(outbound.run().in_current_span());
    let inbound = Inbound::new(
        rt.clone(),
        listener.clone(),
        stats.clone(),
        shared.clone(),
        client_r,
        up_w,
        peer,
    );
    inbound.run().await;
    // The outbound pump ends once the server closes its side (after answering everything sent)
    // or the client goes away.
    if tokio::time::timeout(Duration::from_secs(5), &mut out_task)
        .await
        .is_err()
    {
        out_task.abort();
    }
    debug!("connection closed");
}

/// Server → client: forwards replies, slotting sluice's own in between.
struct Outbound {
    shared: Arc<Shared>,
    stats: Arc<ListenerStats>,
    upstream: ReadHalf,
    client: WriteHalf,
    buf: BytesMut,
    scanner: ReplyScanner,
    out: OutQueue,
    raw: bool,
}

impl Outbound {
    async fn run(mut self) {
        if let Err(e) = self.pump().await {
            debug!(error = %e, "outbound pump ended");
        }
        let _ = self.out.flush(&mut self.client).await;
        let _ = self.client.shutdown().await;
        self.shared.done.cancel();
    }

    async fn pump(&mut self) -> std::io::Result<()> {
        loop {
            self.take_locals();
            if !self.out.is_empty() {
                self.out.flush(&mut self.client).await?;
            }
            if self.buf.capacity() - self.buf.len() < 4 * 1024 {
                self.buf.reserve(32 * 1024);
            }
            tokio::select! {
                _ = self.shared.wake.notified() => continue,
                r = self.upstream.read_buf(&mut self.buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                }
            }
            self.on_upstream_bytes();
        }
    }

    /// Move `Local` replies (and a `Raw` switch) at the front of the queue to the client, unless
    /// a reply is partly forwarded (they go out when it ends).
    fn take_locals(&mut self) {
        if self.scanner.mid_reply() {
            return;
        }
        let mut r = self.shared.replies.lock();
        drain_locals(&mut r, &mut self.out, &mut self.raw);
    }

    fn on_upstream_bytes(&mut self) {
        let scan = match self.scanner.scan(&self.buf) {
            Ok(s) => s,
            Err(e) => {
                // The server's bytes are not RESP: pass them on and stop pairing replies.
                self.stats.protocol_errors.fetch_add(1, Relaxed);
                warn!(error = %e, "unparseable reply from the server; forwarding raw from here on");
                self.raw = true;
                let all = self.buf.split().freeze();
                self.out.push(&all);
                return;
            }
        };
        // One lock for the whole read: every reply that ended in it is paired with its slot.
        let mut r = self.shared.replies.lock();
        let mut taken = 0;
        for (end, push) in scan.ends {
            let reply = self.buf.split_to(end - taken).freeze();
            taken = end;
            if self.raw || push {
                self.out.push(&reply);
            } else {
                match r.slots.front() {
                    Some(Slot::Swallow) => {
                        r.pop_front();
                    }
                    Some(Slot::Upstream) => {
                        r.pop_front();
                        self.out.push(&reply);
                    }
                    // Local and Raw slots were drained at the previous reply boundary, so this
                    // is a reply nothing asked for (a server-initiated error before closing).
                    _ => {
                        info!("reply from the server with no command waiting for it");
                        self.out.push(&reply);
                    }
                }
            }
            // A reply boundary: sluice's own replies that come next go out now, in place.
            drain_locals(&mut r, &mut self.out, &mut self.raw);
        }
        // A reply still arriving: stream what is here if it goes to the client.
        if scan.consumed > taken {
            let part = self.buf.split_to(scan.consumed - taken).freeze();
            let swallowed = !self.raw
                && !self.scanner.in_push()
                && matches!(r.slots.front(), Some(Slot::Swallow));
            if !swallowed {
                self.out.push(&part);
            }
        }
    }
}

/// Pop the `Local` replies and `Raw` switches at the front of the queue into `out`.
fn drain_locals(r: &mut Replies, out: &mut OutQueue, raw: &mut bool) {
    while matches!(r.slots.front(), Some(Slot::Local(_) | Slot::Raw)) {
        match r.pop_front() {
            Some(Slot::Local(b)) => out.push(&b),
            Some(Slot::Raw) => *raw = true,
            _ => break,
        }
    }
}
