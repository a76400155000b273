//! Client → upstream: frames are split and forwarded as they are, except publishes, which are
//! assembled whole per channel (method, header, bodies), decided by the policy chain, and then
//! forwarded, diverted (method re-encoded), held (reads paced) or shed (signalled to the client).

use super::channel::{ChannelState, ConfirmMap, SluiceClose};
use super::facts::AmqpMessage;
use super::io::OutQueue;
use super::read_ahead::ReadAhead;
use super::{SessionError, Shared, ToClient};
use crate::admin::metrics::Limit;
use crate::admin::{ListenerStats, ProducerStats};
use crate::config::validate::{ListenerConfig, ShedMandatory, ShedUnconfirmed};
use crate::identity::{ConnFacts, ConnIdentity, MessageIdentity};
use crate::policy::{EvalState, PublishView, Step, Verdict, VerdictKind};
use crate::protocol::amqp::frame::{self, Frame, FrameKind};
use crate::protocol::amqp::header::{ContentHeader, Property};
use crate::protocol::amqp::method::{self, MethodId, Publish, Tune};
use crate::protocol::amqp::{code, reply, FrameError};
use crate::runtime::{Active, BudgetShare, Runtime};
use crate::tls::{ReadHalf as OwnedReadHalf, WriteHalf as OwnedWriteHalf};
use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

/// A connection whose reads were held stops being shown as blocked after this long without a hold.
const UNBLOCK_IDLE: Duration = Duration::from_millis(250);

/// How often a publish waiting for room under `max_buffered_total` re-checks without a wake-up.
const ROOM_POLL: Duration = Duration::from_millis(100);

/// Bytes of the body frames of a `body_size` content sent in frames of `frame_max`: what a
/// publish is admitted for at its content header.
fn body_frames_bytes(body_size: u64, frame_max: u32) -> u64 {
    let per_frame = u64::from(frame_max.saturating_sub(8).max(1));
    body_size.saturating_add(body_size.div_ceil(per_frame).saturating_mul(8))
}

/// The reason sluice gives the broker when it closes a channel after a shed publish.
const SHED_CLOSE: &str = "sluice: closing the channel after a shed publish";

/// How often a connection whose answers back up re-checks whether its client has read them.
const BACKLOG_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Open,
}

enum Exit {
    ClientEof,
    Shutdown,
    UpstreamDone,
}

/// A publish being assembled on one channel.
struct Pending {
    frames: Vec<Frame>,
    body_size: u64,
    received: u64,
    header_seen: bool,
    bytes: u64,
    /// Bytes admitted into the process-wide budget for body frames still to come.
    reserved: u64,
}

#[derive(Default, Clone, Copy)]
struct LocalChannel {
    confirm: bool,
    tx: bool,
}

pub(super) struct Inbound {
    rt: Arc<Runtime>,
    listener: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    shared: Arc<Mutex<Shared>>,
    client: OwnedReadHalf,
    buf: BytesMut,
    upstream: OwnedWriteHalf,
    out: OutQueue,
    last_upstream_write: Instant,
    to_client: UnboundedSender<ToClient>,
    facts: Arc<ConnFacts>,
    peer: SocketAddr,
    handshake_deadline: Instant,
    shutdown: CancellationToken,
    conn_done: CancellationToken,
    phase: Phase,
    frame_max: u32,
    heartbeat: Duration,
    identity: Option<ConnIdentity>,
    producer: Option<Arc<ProducerStats>>,
    assembling: HashMap<u16, Pending>,
    channels: HashMap<u16, LocalChannel>,
    buffered: u64,
    /// This connection's bytes in the process-wide budget (`max_buffered_total`).
    budget: BudgetShare,
    holding: bool,
    blocked_sent: bool,
    ahead: ReadAhead,
}

struct AmqpIdentity<'a>(&'a ContentHeader<'a>);

impl MessageIdentity for AmqpIdentity<'_> {
    fn app_id(&self) -> Option<String> {
        self.0
            .get_str(Property::AppId)
            .ok()
            .flatten()
            .map(|c| c.into_owned())
    }
    fn user_id(&self) -> Option<String> {
        self.0
            .get_str(Property::UserId)
            .ok()
            .flatten()
            .map(|c| c.into_owned())
    }
    fn header(&self, name: &str) -> Option<String> {
        self.0
            .header(name)
            .ok()
            .flatten()
            .and_then(|v| v.as_text())
            .map(|c| c.into_owned())
    }
}

fn code_name(code: u16) -> &'static str {
    match code {
        code::FRAME_ERROR => "FRAME_ERROR",
        code::SYNTAX_ERROR => "SYNTAX_ERROR",
        code::COMMAND_INVALID => "COMMAND_INVALID",
        code::CHANNEL_ERROR => "CHANNEL_ERROR",
        code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        code::RESOURCE_ERROR => "RESOURCE_ERROR",
        code::NOT_ALLOWED => "NOT_ALLOWED",
        code::CONNECTION_FORCED => "CONNECTION_FORCED",
        _ => "INTERNAL_ERROR",
    }
}

impl Inbound {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        rt: Arc<Runtime>,
        listener: Arc<ListenerConfig>,
        stats: Arc<ListenerStats>,
        shared: Arc<Mutex<Shared>>,
        client: OwnedReadHalf,
        buf: BytesMut,
        upstream: OwnedWriteHalf,
        to_client: UnboundedSender<ToClient>,
        facts: ConnFacts,
        peer: SocketAddr,
        handshake_deadline: std::time::Instant,
        shutdown: CancellationToken,
        conn_done: CancellationToken,
    ) -> Self {
        let budget = BudgetShare::new(rt.buffered.clone());
        Inbound {
            rt,
            listener,
            stats,
            shared,
            client,
            buf,
            upstream,
            out: OutQueue::default(),
            last_upstream_write: Instant::now(),
            to_client,
            facts: Arc::new(facts),
            peer,
            handshake_deadline: handshake_deadline.into(),
            shutdown,
            conn_done,
            phase: Phase::Handshake,
            frame_max: super::connection::HANDSHAKE_FRAME_MAX,
            heartbeat: Duration::ZERO,
            identity: None,
            producer: None,
            assembling: HashMap::new(),
            channels: HashMap::new(),
            buffered: 0,
            budget,
            holding: false,
            blocked_sent: false,
            ahead: ReadAhead::new(),
        }
    }

    pub(super) async fn run(mut self) -> Result<(), SessionError> {
        let exit = self.pump().await;
        let result = match exit {
            Ok(Exit::ClientEof) => {
                self.shared.lock().client_finished.cancel();
                let _ = self.flush().await;
                let _ = self.upstream.shutdown().await;
                Ok(())
            }
            Ok(Exit::UpstreamDone) => Ok(()),
            Ok(Exit::Shutdown) => {
                self.drain_for_shutdown().await;
                Ok(())
            }
            Err(SessionError::Io(e)) => Err(SessionError::Io(e)),
            Err(e) => {
                self.stats.protocol_errors.fetch_add(1, Relaxed);
                if let SessionError::Frame(FrameError::TooLarge { .. }) = e {
                    self.stats.limit_hit(Limit::MaxFrameSize);
                }
                let code = e.reply_code();
                let text = format!("{} - sluice: {e}", code_name(code));
                warn!(code, error = %e, "closing client connection");
                let _ = self.to_client.send(ToClient::Close(code, text));
                self.close_upstream("client protocol error").await;
                Err(e)
            }
        };
        self.release();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.conn_done.cancelled()).await;
        result
    }

    fn release(&mut self) {
        if let Some(p) = self.producer.take() {
            p.connections.fetch_sub(1, Relaxed);
            if self.holding {
                p.held.fetch_sub(1, Relaxed);
            }
        }
    }

    async fn close_upstream(&mut self, why: &str) {
        self.shared.lock().upstream_close_by_sluice = true;
        let _ = self.flush().await;
        let close = reply::connection_close(
            code::REPLY_SUCCESS,
            &format!("sluice: {why}"),
            MethodId(0, 0),
        );
        let _ = self.upstream.write_all(&close.raw).await;
    }

    /// Graceful shutdown: whole publishes already read go to the broker, their confirms come
    /// back, then both legs get a proper close.
    async fn drain_for_shutdown(&mut self) {
        if self.phase == Phase::Open {
            let _ = self.process_buffered().await;
        }
        let _ = self.flush().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.lock().unconfirmed() > 0 && Instant::now() < deadline {
            if self.conn_done.is_cancelled() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.to_client.send(ToClient::Close(
            code::CONNECTION_FORCED,
            "CONNECTION_FORCED - sluice is shutting down".into(),
        ));
        self.close_upstream("shutting down").await;
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            self.out.flush(&mut self.upstream).await?;
            self.last_upstream_write = Instant::now();
        }
        Ok(())
    }

    /// Write everything queued for the upstream, reading the client ahead meanwhile if the
    /// upstream is slow to take it (see [`super::read_ahead`]).
    async fn flush_reading(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let flush = self.out.flush(&mut self.upstream);
        tokio::pin!(flush);
        loop {
            tokio::select! {
                biased;
                r = &mut flush => {
                    r?;
                    break;
                }
                r = self.ahead.read(
                    &self.rt,
                    &self.stats,
                    &mut self.client,
                    &mut self.buf,
                    &mut self.budget,
                ) => r?,
            }
        }
        self.last_upstream_write = Instant::now();
        Ok(())
    }

    async fn pump(&mut self) -> Result<Exit, SessionError> {
        loop {
            self.process_buffered().await?;
            let unprocessed = self.buf.len();
            self.flush_reading().await?;
            if self.buf.len() != unprocessed {
                // Read ahead while the upstream was slow: process that first.
                continue;
            }
            if self.ahead.eof {
                return Ok(Exit::ClientEof);
            }
            self.ahead.resume(&self.buf, &mut self.budget);
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let handshake = self.phase == Phase::Handshake;
            // A client that does not read what sluice answers it (nacks, returns) is not read
            // either, so those answers wait in bounded memory.
            let backlogged = self.shared.lock().to_client_bytes as u64
                > self.rt.active().config.limits.max_buffered_per_connection;
            tokio::select! {
                biased;
                _ = self.conn_done.cancelled() => return Ok(Exit::UpstreamDone),
                _ = self.shutdown.cancelled() => return Ok(Exit::Shutdown),
                _ = tokio::time::sleep_until(self.handshake_deadline), if handshake => {
                    self.stats.limit_hit(Limit::HandshakeTimeout);
                    return Err(SessionError::HandshakeTimeout)
                }
                _ = tokio::time::sleep(UNBLOCK_IDLE), if self.holding => self.end_hold(),
                _ = tokio::time::sleep(BACKLOG_POLL), if backlogged => {}
                r = self.client.read_buf(&mut self.buf), if !backlogged => {
                    if r? == 0 {
                        return Ok(Exit::ClientEof);
                    }
                    self.ahead.last = Instant::now();
                }
            }
        }
    }

    async fn process_buffered(&mut self) -> Result<(), SessionError> {
        while let Some(f) = frame::split(&mut self.buf, self.frame_max)? {
            match f.kind {
                FrameKind::Heartbeat => self.out.push(&f.raw),
                FrameKind::Method => self.on_method(f).await?,
                FrameKind::Header => self.on_header(f).await?,
                FrameKind::Body => self.on_body(f).await?,
            }
        }
        Ok(())
    }

    async fn on_method(&mut self, f: Frame) -> Result<(), SessionError> {
        let ch = f.channel;
        let (id, args) = method::split_id(f.payload())?;
        if ch == 0 {
            return self.on_connection_method(id, args, &f);
        }
        if self.phase != Phase::Open {
            return Err(SessionError::CommandInvalid(format!(
                "{id} on channel {ch} before connection.open"
            )));
        }
        if self.assembling.contains_key(&ch) {
            return Err(SessionError::Unexpected(format!(
                "{id} on channel {ch} in the middle of a publish's content"
            )));
        }
        let closing = self.shared.lock().channels.get(&ch).and_then(|c| c.closing);
        if let Some(cl) = closing {
            if id == MethodId::CHANNEL_OPEN && cl.client_ok {
                self.await_upstream_close(ch).await;
            } else {
                self.on_sluice_closing(ch, id);
                return Ok(());
            }
        }
        match id {
            MethodId::BASIC_PUBLISH => {
                Publish::decode(args)?;
                let bytes = f.raw.len() as u64;
                self.account(bytes)?;
                self.budget.add(bytes);
                self.assembling.insert(
                    ch,
                    Pending {
                        frames: vec![f],
                        body_size: 0,
                        received: 0,
                        header_seen: false,
                        bytes,
                        reserved: 0,
                    },
                );
                return Ok(());
            }
            MethodId::CONFIRM_SELECT => {
                self.channels.entry(ch).or_default().confirm = true;
                let mut s = self.shared.lock();
                let st = s.channels.entry(ch).or_default();
                if st.confirms.is_none() {
                    st.confirms = Some(ConfirmMap::new());
                }
            }
            MethodId::TX_SELECT => self.channels.entry(ch).or_default().tx = true,
            MethodId::CHANNEL_OPEN => {
                // The limit the client was told in connection.tune; as RabbitMQ does for its own
                // channel_max, going past it closes the connection with 530.
                let max = match self.shared.lock().channel_max {
                    0 => self.rt.active().config.limits.max_channels,
                    n => n,
                };
                let open = self.channels.len();
                if open >= max as usize && !self.channels.contains_key(&ch) {
                    self.stats.limit_hit(Limit::MaxChannels);
                    return Err(SessionError::NotAllowed(format!(
                        "number of channels opened ({open}) has reached the negotiated \
                         channel_max ({max}) (limits.max_channels)"
                    )));
                }
                self.channels.insert(ch, LocalChannel::default());
                self.shared
                    .lock()
                    .channels
                    .insert(ch, ChannelState::default());
            }
            MethodId::CHANNEL_CLOSE_OK | MethodId::CHANNEL_CLOSE => {
                self.channels.remove(&ch);
            }
            _ => {}
        }
        self.out.push(&f.raw);
        Ok(())
    }

    /// A client frame on a channel sluice is closing: only the close handshake matters.
    fn on_sluice_closing(&mut self, ch: u16, id: MethodId) {
        let crossing = id == MethodId::CHANNEL_CLOSE;
        if id == MethodId::CHANNEL_CLOSE_OK || crossing {
            if crossing {
                self.inject(ch, vec![reply::channel_close_ok(ch)]);
            }
            self.channels.remove(&ch);
            let mut s = self.shared.lock();
            let done = match s.channels.get_mut(&ch).and_then(|c| c.closing.as_mut()) {
                Some(cl) => {
                    cl.client_ok = true;
                    cl.upstream_ok
                }
                None => false,
            };
            if done {
                s.channels.remove(&ch);
            }
        }
    }

    /// The client reopens a channel sluice closed: wait until the broker confirmed the close.
    async fn await_upstream_close(&mut self, ch: u16) {
        let _ = self.flush().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = {
                let s = self.shared.lock();
                s.channels
                    .get(&ch)
                    .and_then(|c| c.closing)
                    .is_some_and(|c| !c.upstream_ok)
            };
            if !open || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.shared.lock().channels.remove(&ch);
    }

    fn on_connection_method(
        &mut self,
        id: MethodId,
        args: &[u8],
        f: &Frame,
    ) -> Result<(), SessionError> {
        match id {
            MethodId::CONNECTION_TUNE_OK => {
                let t = Tune::decode(args)?;
                let limits = &self.rt.active().config.limits;
                self.frame_max = if t.frame_max == 0 {
                    limits.max_frame_size
                } else {
                    t.frame_max.max(frame::FRAME_MIN_SIZE)
                };
                self.heartbeat = Duration::from_secs(t.heartbeat as u64);
            }
            MethodId::CONNECTION_OPEN => {
                let vhost = method::decode_open_vhost(args)?;
                Arc::make_mut(&mut self.facts).vhost = Some(vhost.to_string());
                let active = self.rt.active();
                let identity = active.config.identity.for_connection(&self.facts);
                tracing::Span::current().record("producer", &*identity.name);
                let stats = self
                    .rt
                    .metrics
                    .producer(&self.listener.name, &identity.name);
                stats.connections.fetch_add(1, Relaxed);
                info!(producer = %identity.name, vhost, "client connected");
                self.producer = Some(stats);
                self.identity = Some(identity);
                self.phase = Phase::Open;
            }
            MethodId::CONNECTION_CLOSE_OK => self.shared.lock().client_finished.cancel(),
            _ => {}
        }
        self.out.push(&f.raw);
        Ok(())
    }

    /// Whether sluice has closed this channel and waits for the client's close-ok.
    fn sluice_closing(&self, ch: u16) -> bool {
        self.shared
            .lock()
            .channels
            .get(&ch)
            .is_some_and(|c| c.closing.is_some())
    }

    /// Count bytes of an unfinished publish against `max_buffered_per_connection` (a close with
    /// 506 past it).
    fn account(&mut self, bytes: u64) -> Result<(), SessionError> {
        self.buffered += bytes;
        let max = self.rt.active().config.limits.max_buffered_per_connection;
        if self.buffered > max {
            self.stats.limit_hit(Limit::MaxBufferedPerConnection);
            return Err(SessionError::Resource(format!(
                "more than {max} bytes of unfinished publishes buffered on this connection"
            )));
        }
        Ok(())
    }

    async fn on_header(&mut self, f: Frame) -> Result<(), SessionError> {
        let ch = f.channel;
        let (max, max_total) = {
            let active = self.rt.active();
            let l = &active.config.limits;
            (l.max_message_size, l.max_buffered_total)
        };
        if !self.assembling.contains_key(&ch) && self.sluice_closing(ch) {
            // Content of a publish the client sent before it saw sluice's channel.close: the
            // channel is closing, so (as for its method frame) every frame is discarded.
            return Ok(());
        }
        let Some(p) = self.assembling.get_mut(&ch) else {
            return Err(SessionError::Unexpected(format!(
                "content header on channel {ch} without a basic.publish before it"
            )));
        };
        if p.header_seen {
            return Err(SessionError::Unexpected(format!(
                "second content header on channel {ch} for one publish"
            )));
        }
        let (class, body_size) = {
            let h = ContentHeader::parse(f.payload())?;
            (h.class, h.body_size)
        };
        if class != 60 {
            return Err(SessionError::Unexpected(format!(
                "content header of class {class} on channel {ch}; basic (60) expected"
            )));
        }
        if body_size > max {
            // As RabbitMQ does for its own max_message_size: the channel is closed with 406,
            // the connection and its other channels carry on. The body frames the client sends
            // before it sees the close are discarded unread (the channel is closing).
            self.stats.limit_hit(Limit::MaxMessageSize);
            if let Some(p) = self.assembling.remove(&ch) {
                self.buffered = self.buffered.saturating_sub(p.bytes);
                self.budget.release(p.bytes + p.reserved);
            }
            info!(
                channel = ch,
                body_size, max, "message over max_message_size: channel closed"
            );
            self.close_channel(
                ch,
                &format!(
                    "PRECONDITION_FAILED - message size {body_size} is larger than configured \
                     max size {max} (sluice: limits.max_message_size)"
                ),
                "sluice: closing the channel after a message over max_message_size",
            );
            return Ok(());
        }
        // The whole content is admitted into the process-wide budget at once, before any body
        // frame is read: a publish that does not fit waits here, with this connection's reads
        // paused, and one that was admitted can always finish.
        let len = f.raw.len() as u64;
        let body = body_frames_bytes(body_size, self.frame_max);
        self.wait_for_room(len + body, max_total).await?;
        let Some(p) = self.assembling.get_mut(&ch) else {
            return Ok(());
        };
        p.body_size = body_size;
        p.header_seen = true;
        p.bytes += len;
        p.reserved = body;
        p.frames.push(f);
        self.account(len)?;
        if body_size == 0 {
            self.complete(ch).await?;
        }
        Ok(())
    }

    /// Take `need` bytes from the process-wide budget, waiting (reads paused, the broker's
    /// heartbeat kept) until other connections free enough.
    async fn wait_for_room(&mut self, need: u64, max: u64) -> Result<(), SessionError> {
        if self.budget.try_take(need, max) {
            return Ok(());
        }
        let budget = self.budget.budget().clone();
        self.stats.limit_hit(Limit::MaxBufferedTotal);
        if budget.warn_now() {
            warn!(
                need,
                buffered = budget.used(),
                max,
                "max_buffered_total reached: publishes wait for room, their connections' reads \
                 paused (logged at most every 10 s; counted in sluice_limit_hits_total)"
            );
        } else {
            debug!(
                need,
                buffered = budget.used(),
                max,
                "over max_buffered_total: this publish waits for room"
            );
        }
        self.flush().await?;
        let wait = budget.wait(self.budget.held());
        loop {
            let freed = wait.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let max = self.rt.active().config.limits.max_buffered_total;
            if wait.try_take(need, max) {
                break;
            }
            let now = Instant::now();
            let mut wake = now + ROOM_POLL;
            if !self.heartbeat.is_zero() {
                wake = wake.min(self.last_upstream_write + self.heartbeat / 2);
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(wake) => {}
                // Ending anyway: let the publish through rather than hold the drain up.
                _ = self.shutdown.cancelled() => {
                    budget.add(need);
                    break;
                }
                _ = self.conn_done.cancelled() => {
                    budget.add(need);
                    break;
                }
            }
            if !self.heartbeat.is_zero()
                && Instant::now() >= self.last_upstream_write + self.heartbeat / 2
            {
                self.upstream.write_all(&Frame::heartbeat().raw).await?;
                self.last_upstream_write = Instant::now();
            }
        }
        drop(wait);
        self.budget.taken(need);
        Ok(())
    }

    async fn on_body(&mut self, f: Frame) -> Result<(), SessionError> {
        let ch = f.channel;
        if !self.assembling.contains_key(&ch) && self.sluice_closing(ch) {
            return Ok(());
        }
        let Some(p) = self.assembling.get_mut(&ch).filter(|p| p.header_seen) else {
            return Err(SessionError::Unexpected(format!(
                "body frame on channel {ch} without a content header before it"
            )));
        };
        let n = f.payload().len() as u64;
        p.received += n;
        if p.received > p.body_size {
            return Err(SessionError::Unexpected(format!(
                "body on channel {ch} is longer than the {} bytes its header declared",
                p.body_size
            )));
        }
        let len = f.raw.len() as u64;
        p.bytes += len;
        // Frames smaller than frame_max cost more headers than were admitted: count the excess.
        let beyond = len.saturating_sub(p.reserved);
        p.reserved = p.reserved.saturating_sub(len);
        let done = p.received == p.body_size;
        p.frames.push(f);
        self.budget.add(beyond);
        self.account(len)?;
        if done {
            self.complete(ch).await?;
        }
        Ok(())
    }

    /// A whole publish is buffered on `ch`: decide and act.
    async fn complete(&mut self, ch: u16) -> Result<(), SessionError> {
        let Some(p) = self.assembling.remove(&ch) else {
            return Ok(());
        };
        self.buffered = self.buffered.saturating_sub(p.bytes);
        // The frames stay in memory until the verdict is applied (a delay may hold them): they
        // leave the process-wide budget only then.
        let result = self.decide(ch, &p).await;
        self.budget.release(p.bytes + p.reserved);
        result
    }

    async fn decide(&mut self, ch: u16, p: &Pending) -> Result<(), SessionError> {
        let active = self.rt.active();
        let (Some(identity), Some(conn_stats)) = (self.identity.clone(), self.producer.clone())
        else {
            return Err(SessionError::CommandInvalid(
                "publish before connection.open".into(),
            ));
        };
        if active.chain.is_empty() && identity.message_sources.is_empty() {
            self.forward(ch, &p.frames, None);
            conn_stats.record(VerdictKind::Forward, p.body_size);
            return Ok(());
        }
        let (Some(method_frame), Some(header_frame)) = (p.frames.first(), p.frames.get(1)) else {
            return Ok(());
        };
        let (_, args) = method::split_id(method_frame.payload())?;
        let publish = Publish::decode(args)?;
        let header = ContentHeader::parse(header_frame.payload())?;
        let producer = identity.for_message(&AmqpIdentity(&header));
        let stats = if Arc::ptr_eq(&producer, &identity.name) || *producer == *identity.name {
            conn_stats
        } else {
            self.rt.metrics.producer(&self.listener.name, &producer)
        };
        let conn_facts = self.facts.clone();
        let vhost = conn_facts.vhost.as_deref().unwrap_or("/");
        let message = AmqpMessage {
            producer: &producer,
            conn: &conn_facts,
            peer: self.peer,
            exchange: publish.exchange,
            routing_key: publish.routing_key,
            header: &header,
            body: p.frames.get(2..).unwrap_or_default(),
        };
        let view = PublishView {
            producer: &producer,
            vhost,
            exchange: publish.exchange,
            routing_key: publish.routing_key,
            size: p.body_size,
            facts: Some(&message),
        };
        let mut st = EvalState::default();
        let decision = loop {
            match active.chain.evaluate(&view, &mut st) {
                Step::Done(d) => break d,
                Step::Wait(d) => {
                    if self.hold(d, st.held(), &active).await? {
                        // Shutting down: whole publishes already read go through.
                        break crate::policy::Decision {
                            verdict: Verdict::Forward,
                            kind: VerdictKind::Delay,
                            by: None,
                            would: vec![],
                        };
                    }
                }
            }
        };
        if st.held().is_zero() {
            self.end_hold();
        }
        let mut decision = decision;
        if let Verdict::Divert {
            exchange,
            routing_key,
            checked: false,
        } = &decision.verdict
        {
            // Never let a divert become a 404 channel close for the client.
            if !self
                .rt
                .divert_targets
                .exists(&self.listener, exchange, routing_key)
                .await
            {
                let target = if exchange.is_empty() {
                    format!("queue '{routing_key}'")
                } else {
                    format!("exchange '{exchange}'")
                };
                // Per message, so never above trace: the shed is counted and logged once per
                // interval by the verdict log, with this reason.
                trace!(producer = %producer, %target, "divert target does not exist: publish shed instead");
                decision.verdict = Verdict::Shed {
                    reason: format!("divert target {target} does not exist").into(),
                };
                decision.kind = VerdictKind::Shed;
            }
        }
        for (kind, _) in &decision.would {
            stats.record(*kind, p.body_size);
        }
        stats.record(decision.kind, p.body_size);
        self.rt
            .metrics
            .verdicts
            .record(&stats, &decision, p.body_size);
        match decision.verdict {
            Verdict::Forward => self.forward(ch, &p.frames, None),
            Verdict::Divert {
                exchange,
                routing_key,
                ..
            } => {
                let m = reply::publish(
                    ch,
                    &exchange,
                    &routing_key,
                    publish.mandatory,
                    publish.immediate,
                )?;
                self.forward(ch, &p.frames, Some(m));
            }
            Verdict::Shed { reason } => {
                let by = decision.by.as_deref().unwrap_or("policy");
                trace!(producer = %producer, by, %reason, "publish shed");
                self.shed(ch, &p.frames, &publish, &reason, &active);
            }
        }
        Ok(())
    }

    fn forward(&mut self, ch: u16, frames: &[Frame], method: Option<Frame>) {
        if self.channels.get(&ch).is_some_and(|c| c.confirm) {
            let mut s = self.shared.lock();
            if let Some(m) = s.channels.get_mut(&ch).and_then(|c| c.confirms.as_mut()) {
                m.forwarded();
            }
        }
        let mut it = frames.iter();
        if let Some(m) = method {
            it.next();
            self.out.push(&m.raw);
        }
        for f in it {
            self.out.push(&f.raw);
        }
    }

    fn shed(
        &mut self,
        ch: u16,
        frames: &[Frame],
        publish: &Publish<'_>,
        reason: &str,
        active: &Active,
    ) {
        let local = self.channels.get(&ch).copied().unwrap_or_default();
        let settings = &active.config.amqp;
        if local.tx {
            self.close_channel(
                ch,
                &format!(
                    "PRECONDITION_FAILED - sluice: publish shed inside a transaction: {reason}"
                ),
                SHED_CLOSE,
            );
            return;
        }
        let returned = publish.mandatory && settings.shed_mandatory == ShedMandatory::Return;
        let mut inject = Vec::new();
        if returned {
            inject.push(reply::basic_return(
                ch,
                code::NO_ROUTE,
                &format!("NO_ROUTE - sluice: {reason}"),
                publish.exchange,
                publish.routing_key,
            ));
            inject.extend(frames.iter().skip(1).cloned());
        }
        if local.confirm {
            let tag = {
                let mut s = self.shared.lock();
                let st = s.channels.entry(ch).or_default();
                st.confirms.get_or_insert_with(ConfirmMap::new).shed()
            };
            inject.push(if returned {
                reply::ack(ch, tag, false)
            } else {
                reply::nack(ch, tag, false)
            });
        } else if !returned && settings.shed_unconfirmed == ShedUnconfirmed::CloseChannel {
            self.close_channel(
                ch,
                &format!("PRECONDITION_FAILED - sluice: publish shed: {reason}"),
                SHED_CLOSE,
            );
            return;
        }
        if !inject.is_empty() {
            self.inject(ch, inject);
        }
    }

    /// Queue frames sluice answers the client with on `ch`, counted until the outbound pump
    /// takes them.
    fn inject(&mut self, ch: u16, frames: Vec<Frame>) {
        let bytes: usize = frames.iter().map(|f| f.raw.len()).sum();
        self.shared.lock().injected(bytes);
        let _ = self.to_client.send(ToClient::Frames(ch, frames));
    }

    /// Close a channel on both legs: 406 to the client, a normal close to the broker.
    fn close_channel(&mut self, ch: u16, text: &str, upstream_text: &str) {
        {
            let mut s = self.shared.lock();
            let st = s.channels.entry(ch).or_default();
            st.confirms = None;
            st.closing = Some(SluiceClose::default());
        }
        self.inject(
            ch,
            vec![reply::channel_close(
                ch,
                code::PRECONDITION_FAILED,
                text,
                MethodId::BASIC_PUBLISH,
            )],
        );
        let up = reply::channel_close(ch, code::REPLY_SUCCESS, upstream_text, MethodId(0, 0));
        self.out.push(&up.raw);
    }

    /// Hold this connection's reads for `d`, keeping the upstream's heartbeat alive. `held` is
    /// how long this publish will have waited in all once `d` is over: a client that supports it
    /// is told `connection.blocked` when one publish waits past `blocked_after`. A producer paced
    /// at its quota (every publish waiting a little) is not blocked: it flows at that rate, and
    /// blocking it would turn pacing into stop-and-go below the quota. Returns `true` if
    /// interrupted by shutdown or the end of the connection.
    async fn hold(
        &mut self,
        d: Duration,
        held: Duration,
        active: &Active,
    ) -> Result<bool, SessionError> {
        self.flush_reading().await?;
        if !self.holding {
            self.holding = true;
            if let Some(p) = &self.producer {
                p.held.fetch_add(1, Relaxed);
            }
        }
        let deadline = Instant::now() + d;
        if !self.blocked_sent
            && held >= active.config.amqp.blocked_after
            && self.shared.lock().client_blocked_capable
        {
            self.blocked_sent = true;
            let _ = self.to_client.send(ToClient::SluiceBlocked(true));
        }
        loop {
            let wake = if self.heartbeat.is_zero() {
                deadline
            } else {
                (self.last_upstream_write + self.heartbeat / 2).min(deadline)
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.shutdown.cancelled() => return Ok(true),
                _ = self.conn_done.cancelled() => return Ok(true),
                r = self.ahead.read(
                    &self.rt,
                    &self.stats,
                    &mut self.client,
                    &mut self.buf,
                    &mut self.budget,
                ) => {
                    r?;
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.out.push(&Frame::heartbeat().raw);
            self.flush_reading().await?;
        }
    }

    /// The connection is no longer held.
    fn end_hold(&mut self) {
        if self.holding {
            self.holding = false;
            if let Some(p) = &self.producer {
                p.held.fetch_sub(1, Relaxed);
            }
        }
        if self.blocked_sent {
            self.blocked_sent = false;
            let _ = self.to_client.send(ToClient::SluiceBlocked(false));
        }
    }
}
