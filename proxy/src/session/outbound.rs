//! Upstream → client: forwards the broker's frames, translating confirm tags on channels where
//! sluice shed publishes, and slots the frames sluice injects in between at content boundaries
//! (a frame must never land inside a delivery's header/body sequence on the same channel).

use super::io::OutQueue;
use super::{Shared, ToClient};
use crate::admin::ListenerStats;
use crate::config::validate::ListenerConfig;
use crate::protocol::amqp::frame::{self, Frame, FrameKind};
use crate::protocol::amqp::header::ContentHeader;
use crate::protocol::amqp::method::{self, Close, Confirm, MethodId, Tune};
use crate::protocol::amqp::reply;
use crate::runtime::Runtime;
use crate::tls::{ReadHalf as OwnedReadHalf, WriteHalf as OwnedWriteHalf};
use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A delivery, return or get-ok whose content is still coming on a channel.
struct Content {
    /// Body bytes still to come; `None` until the content header.
    left: Option<u64>,
    /// It started after sluice began closing the channel: the client must not see it.
    discard: bool,
}

pub(super) struct Outbound {
    rt: Arc<Runtime>,
    _listener: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    shared: Arc<Mutex<Shared>>,
    upstream: OwnedReadHalf,
    buf: BytesMut,
    client: OwnedWriteHalf,
    rx: UnboundedReceiver<ToClient>,
    rx_open: bool,
    out: OutQueue,
    frame_max: u32,
    conn_done: CancellationToken,
    content: HashMap<u16, Content>,
    parked: HashMap<u16, Vec<Frame>>,
    client_sees_blocked: bool,
    upstream_blocked: bool,
    client_closed: bool,
    finished: bool,
    broker_closed: bool,
}

/// How long a client that the broker closed gets to answer with close-ok before sluice
/// half-closes its socket.
const CLOSE_OK_GRACE: Duration = Duration::from_secs(1);

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        rt: Arc<Runtime>,
        listener: Arc<ListenerConfig>,
        stats: Arc<ListenerStats>,
        shared: Arc<Mutex<Shared>>,
        upstream: OwnedReadHalf,
        buf: BytesMut,
        client: OwnedWriteHalf,
        rx: UnboundedReceiver<ToClient>,
        frame_max: u32,
        conn_done: CancellationToken,
    ) -> Self {
        Outbound {
            rt,
            _listener: listener,
            stats,
            shared,
            upstream,
            buf,
            client,
            rx,
            rx_open: true,
            out: OutQueue::default(),
            frame_max,
            conn_done,
            content: HashMap::new(),
            parked: HashMap::new(),
            client_sees_blocked: false,
            upstream_blocked: false,
            client_closed: false,
            finished: false,
            broker_closed: false,
        }
    }

    pub(super) async fn run(mut self) {
        if let Err(e) = self.pump().await {
            debug!(error = %e, "upstream pump ended");
        }
        let _ = self.out.flush(&mut self.client).await;
        if self.broker_closed && !self.client_closed {
            // The broker closed the connection and then its socket (RabbitMQ does both at once
            // when it stops). A client that reads the end of the stream right behind the close
            // reports a broken socket instead of the broker's reason: let it answer first.
            let answered = self.shared.lock().client_finished.clone();
            let _ = tokio::time::timeout(CLOSE_OK_GRACE, answered.cancelled()).await;
        }
        if self.upstream_blocked {
            self.stats.upstream_blocked.fetch_sub(1, Relaxed);
            self.rt.plugins.shared.signals().add_blocked_connections(-1);
        }
        let _ = self.client.shutdown().await;
        self.conn_done.cancel();
    }

    async fn pump(&mut self) -> Result<(), super::SessionError> {
        loop {
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            tokio::select! {
                biased;
                cmd = self.rx.recv(), if self.rx_open => match cmd {
                    Some(c) => {
                        self.on_cmd(c);
                        self.drain_cmds();
                    }
                    None => self.rx_open = false,
                },
                r = self.upstream.read_buf(&mut self.buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    // Injections queued before these bytes arrived go first: a shed nack must
                    // reach the client before any later confirm that covers its tag.
                    self.drain_cmds();
                    self.process()?;
                }
            }
            self.out.flush(&mut self.client).await?;
            if self.finished {
                return Ok(());
            }
        }
    }

    fn drain_cmds(&mut self) {
        while let Ok(c) = self.rx.try_recv() {
            self.on_cmd(c);
        }
    }

    fn on_cmd(&mut self, cmd: ToClient) {
        if let ToClient::Frames(_, frames) = &cmd {
            let bytes: usize = frames.iter().map(|f| f.raw.len()).sum();
            self.shared.lock().taken(bytes);
        }
        if self.client_closed {
            return;
        }
        match cmd {
            ToClient::Frames(ch, frames) => {
                if self.content.contains_key(&ch) {
                    self.parked.entry(ch).or_default().extend(frames);
                } else {
                    for f in &frames {
                        self.out.push(&f.raw);
                    }
                }
            }
            ToClient::SluiceBlocked(b) => {
                self.shared.lock().sluice_blocked = b;
                self.update_blocked();
            }
            ToClient::Close(code, text) => {
                self.out
                    .push(&reply::connection_close(code, &text, MethodId(0, 0)).raw);
                self.client_closed = true;
            }
        }
    }

    fn update_blocked(&mut self) {
        let (capable, visible) = {
            let s = self.shared.lock();
            (
                s.client_blocked_capable,
                s.upstream_blocked || s.sluice_blocked,
            )
        };
        if !capable || visible == self.client_sees_blocked {
            return;
        }
        self.client_sees_blocked = visible;
        let f = if visible {
            let reason = if self.upstream_blocked {
                "broker resource alarm"
            } else {
                "sluice: producer over quota, publishes are paced"
            };
            reply::connection_blocked(reason)
        } else {
            reply::connection_unblocked()
        };
        self.out.push(&f.raw);
    }

    fn process(&mut self) -> Result<(), super::SessionError> {
        while let Some(f) = frame::split(&mut self.buf, self.frame_max)? {
            if self.client_closed {
                // The client is being closed: only the broker's close-ok still matters.
                if f.kind == FrameKind::Method
                    && matches!(
                        method::split_id(f.payload()),
                        Ok((MethodId::CONNECTION_CLOSE_OK, _))
                    )
                {
                    self.finished = true;
                }
                continue;
            }
            match f.kind {
                FrameKind::Heartbeat => self.out.push(&f.raw),
                FrameKind::Method => self.on_method(f)?,
                FrameKind::Header => {
                    let ch = f.channel;
                    let size = ContentHeader::parse(f.payload())?.body_size;
                    match self.content.get_mut(&ch) {
                        Some(c) if c.left.is_none() => {
                            if !c.discard {
                                self.out.push(&f.raw);
                            }
                            c.left = Some(size);
                            if size == 0 {
                                self.end_content(ch);
                            }
                        }
                        Some(c) if c.discard => {}
                        _ => self.out.push(&f.raw),
                    }
                }
                FrameKind::Body => {
                    let ch = f.channel;
                    let len = f.payload().len() as u64;
                    match self.content.get_mut(&ch) {
                        Some(Content {
                            left: Some(rem),
                            discard,
                        }) => {
                            if !*discard {
                                self.out.push(&f.raw);
                            }
                            *rem = rem.saturating_sub(len);
                            if *rem == 0 {
                                self.end_content(ch);
                            }
                        }
                        Some(c) if c.discard => {}
                        _ => self.out.push(&f.raw),
                    }
                }
            }
        }
        Ok(())
    }

    fn end_content(&mut self, ch: u16) {
        self.content.remove(&ch);
        if let Some(frames) = self.parked.remove(&ch) {
            for f in &frames {
                self.out.push(&f.raw);
            }
        }
    }

    fn on_method(&mut self, f: Frame) -> Result<(), super::SessionError> {
        let ch = f.channel;
        let (id, args) = method::split_id(f.payload())?;
        // Once sluice has closed a channel towards the client (a shed or oversized publish), the
        // client sees nothing more on it but the close handshake: deliveries, returns and
        // confirms the broker still sends are dropped (the broker requeues unacked deliveries
        // when sluice's own close of the channel reaches it).
        let sluice_closing = ch != 0
            && !matches!(id, MethodId::CHANNEL_CLOSE | MethodId::CHANNEL_CLOSE_OK)
            && self
                .shared
                .lock()
                .channels
                .get(&ch)
                .is_some_and(|st| st.closing.is_some());
        if id.has_content() {
            self.content.insert(
                ch,
                Content {
                    left: None,
                    discard: sluice_closing,
                },
            );
            if !sluice_closing {
                self.out.push(&f.raw);
            }
            return Ok(());
        }
        if sluice_closing {
            return Ok(());
        }
        if ch == 0 {
            match id {
                MethodId::CONNECTION_TUNE => {
                    // Tell the client sluice's channel limit, so a well-behaved client never
                    // opens more channels than sluice allows (its library refuses first).
                    let mut t = Tune::decode(args)?;
                    let max = self.rt.active().config.limits.max_channels;
                    let offered = if t.channel_max == 0 {
                        max
                    } else {
                        t.channel_max.min(max)
                    };
                    self.shared.lock().channel_max = offered;
                    if offered == t.channel_max {
                        self.out.push(&f.raw);
                    } else {
                        t.channel_max = offered;
                        self.out.push(&reply::connection_tune(t).raw);
                    }
                }
                MethodId::CONNECTION_BLOCKED => {
                    let reason = method::decode_blocked_reason(args).unwrap_or("");
                    warn!(reason, "broker blocked the connection");
                    if !self.upstream_blocked {
                        self.stats.upstream_blocked.fetch_add(1, Relaxed);
                        self.rt.plugins.shared.signals().add_blocked_connections(1);
                    }
                    self.upstream_blocked = true;
                    self.shared.lock().upstream_blocked = true;
                    self.update_blocked();
                }
                MethodId::CONNECTION_UNBLOCKED => {
                    info!("broker unblocked the connection");
                    if self.upstream_blocked {
                        self.stats.upstream_blocked.fetch_sub(1, Relaxed);
                        self.rt.plugins.shared.signals().add_blocked_connections(-1);
                    }
                    self.upstream_blocked = false;
                    self.shared.lock().upstream_blocked = false;
                    self.update_blocked();
                }
                MethodId::CONNECTION_CLOSE_OK if self.shared.lock().upstream_close_by_sluice => {
                    self.finished = true;
                }
                MethodId::CONNECTION_CLOSE => {
                    if let Ok(c) = Close::decode(args) {
                        info!(code = c.code, text = c.text, "broker closed the connection");
                    }
                    self.broker_closed = true;
                    self.out.push(&f.raw);
                }
                _ => self.out.push(&f.raw),
            }
            return Ok(());
        }
        match id {
            MethodId::BASIC_ACK | MethodId::BASIC_NACK => {
                let c = Confirm::decode(args)?;
                let t = {
                    let mut s = self.shared.lock();
                    s.channels
                        .get_mut(&ch)
                        .and_then(|st| st.confirms.as_mut())
                        .map(|m| m.translate(c.tag, c.multiple))
                };
                if let Some(Some(t)) = &t {
                    self.stats.confirm_latency.observe(t.sent.elapsed());
                    self.rt
                        .plugins
                        .shared
                        .signals()
                        .record_confirm(t.sent.elapsed(), id == MethodId::BASIC_ACK);
                }
                match t {
                    // Not a channel sluice tracks confirms on (e.g. consumer acks never come
                    // this way, but be transparent): forward untouched.
                    None => self.out.push(&f.raw),
                    Some(None) => {
                        debug!(
                            channel = ch,
                            tag = c.tag,
                            "confirm for no pending publish dropped"
                        )
                    }
                    Some(Some(t)) if !t.changed && t.multiple == c.multiple => {
                        self.out.push(&f.raw)
                    }
                    Some(Some(t)) => {
                        let frame = if id == MethodId::BASIC_ACK {
                            reply::ack(ch, t.tag, t.multiple)
                        } else {
                            reply::nack(ch, t.tag, t.multiple)
                        };
                        self.out.push(&frame.raw);
                    }
                }
            }
            MethodId::CHANNEL_CLOSE_OK => {
                let mut s = self.shared.lock();
                let sluice_closing =
                    match s.channels.get_mut(&ch).and_then(|st| st.closing.as_mut()) {
                        Some(cl) => {
                            cl.upstream_ok = true;
                            Some(cl.client_ok)
                        }
                        None => None,
                    };
                match sluice_closing {
                    Some(client_ok) => {
                        if client_ok {
                            s.channels.remove(&ch);
                        }
                    }
                    None => {
                        s.channels.remove(&ch);
                        drop(s);
                        self.content.remove(&ch);
                        self.out.push(&f.raw);
                    }
                }
            }
            MethodId::CHANNEL_CLOSE => {
                let mut s = self.shared.lock();
                match s.channels.get_mut(&ch).and_then(|st| st.closing.as_mut()) {
                    // The broker closed the channel while sluice was closing it: treat as done.
                    Some(cl) => cl.upstream_ok = true,
                    None => {
                        s.channels.remove(&ch);
                        drop(s);
                        self.content.remove(&ch);
                        self.out.push(&f.raw);
                    }
                }
            }
            _ => self.out.push(&f.raw),
        }
        Ok(())
    }
}
