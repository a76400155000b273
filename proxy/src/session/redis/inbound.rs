//! Client → server: commands are split whole, connection facts are picked up on the way
//! (`CLIENT SETNAME`, `AUTH`, `HELLO`, `SELECT`), pushes and publishes are decided by the policy
//! chain, and `MULTI … EXEC` is held until `EXEC` so the transaction is decided as a whole.

use super::facts::{Envelope, RedisMessage};
use super::{Shared, Slot};
use crate::admin::metrics::Limit;
use crate::admin::{ListenerStats, ProducerStats};
use crate::config::validate::ListenerConfig;
use crate::identity::{ConnFacts, ConnIdentity};
use crate::policy::{Decision, EvalState, PublishView, Step, Verdict, VerdictKind};
use crate::protocol::redis::resp::{
    encode_command, error_reply, simple_reply, Command, CommandLimits, CommandSplitter,
};
use crate::protocol::redis::{PublishKind, RespError};
use crate::runtime::{Active, BudgetShare, Runtime};
use crate::session::io::OutQueue;
use crate::session::read_ahead::ReadAhead;
use crate::tls::{ReadHalf, WriteHalf};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{info, trace, warn};

/// A connection whose reads were held stops counting as held after this long without a hold.
const UNBLOCK_IDLE: Duration = Duration::from_millis(250);

/// How often a connection whose replies back up re-checks whether its client has read them.
const BACKLOG_POLL: Duration = Duration::from_millis(5);

/// Room for the key and framing on top of `max_message_size` in one command.
const COMMAND_OVERHEAD: u64 = 64 * 1024;

/// Why the inbound pump stopped.
enum Stop {
    /// The client closed its side.
    ClientEof,
    /// The server side is gone.
    ServerGone,
    /// sluice is shutting down.
    Shutdown,
    /// The client broke the protocol or a limit: answered, then closed.
    Fatal,
}

/// `MULTI` seen, `EXEC` not yet.
#[derive(Default)]
struct Transaction {
    multi: Option<Command>,
    commands: Vec<Command>,
    bytes: u64,
    /// A command could not be queued: `EXEC` answers `EXECABORT`, as Redis does.
    aborted: bool,
}

/// What happens to one push or publish command.
enum Outcome {
    Forward,
    Divert(String),
    Shed(Arc<str>),
}

pub(super) struct Inbound {
    rt: Arc<Runtime>,
    listener: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    shared: Arc<Shared>,
    client: ReadHalf,
    buf: BytesMut,
    splitter: CommandSplitter,
    upstream: WriteHalf,
    out: OutQueue,
    peer: SocketAddr,
    facts: Arc<ConnFacts>,
    identity: Option<ConnIdentity>,
    producer: Option<Arc<ProducerStats>>,
    /// Replies no longer pair with commands (pub/sub, MONITOR, CLIENT REPLY OFF).
    raw: bool,
    tx: Option<Transaction>,
    holding: bool,
    /// Slots of commands queued in `out`, handed to the reply queue before `out` is written.
    slots: Vec<Slot>,
    /// Reads made while a push waits (see [`crate::session::read_ahead`]), and their share of
    /// `max_buffered_total`.
    ahead: ReadAhead,
    budget: BudgetShare,
}

impl Inbound {
    pub(super) fn new(
        rt: Arc<Runtime>,
        listener: Arc<ListenerConfig>,
        stats: Arc<ListenerStats>,
        shared: Arc<Shared>,
        client: ReadHalf,
        upstream: WriteHalf,
        peer: SocketAddr,
    ) -> Self {
        let facts = ConnFacts {
            peer_ip: Some(peer.ip()),
            vhost: Some("0".into()),
            ..ConnFacts::default()
        };
        let budget = BudgetShare::new(rt.buffered.clone());
        Inbound {
            rt,
            listener,
            stats,
            shared,
            client,
            buf: BytesMut::with_capacity(16 * 1024),
            splitter: CommandSplitter::default(),
            upstream,
            out: OutQueue::default(),
            peer,
            facts: Arc::new(facts),
            identity: None,
            producer: None,
            raw: false,
            tx: None,
            holding: false,
            slots: Vec::new(),
            ahead: ReadAhead::new(),
            budget,
        }
    }

    pub(super) async fn run(mut self) {
        let stop = self.pump().await;
        match stop {
            Ok(Stop::ClientEof) => {
                let _ = self.flush().await;
                let _ = self.upstream.shutdown().await;
            }
            Ok(Stop::ServerGone) => {}
            Ok(Stop::Shutdown | Stop::Fatal) => {
                // Whole commands already read go to the server; the client gets every reply it
                // is owed, then both legs close.
                let _ = self.flush().await;
                self.close_when_answered().await;
                let _ = self.upstream.shutdown().await;
            }
            Err(e) => {
                info!(error = %e, "client connection ended");
                let _ = self.upstream.shutdown().await;
            }
        }
        self.end_hold();
        if let Some(p) = self.producer.take() {
            p.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Wait (bounded) until every reply the client is owed has gone out, then close it.
    async fn close_when_answered(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.shared.done.is_cancelled() {
            if self.shared.replies.lock().slots.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.shared.done.cancel();
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.shared.push_all(&mut self.slots);
        if !self.out.is_empty() {
            self.out.flush(&mut self.upstream).await?;
        }
        Ok(())
    }

    async fn pump(&mut self) -> std::io::Result<Stop> {
        loop {
            if let Some(stop) = self.process_buffered().await? {
                return Ok(stop);
            }
            if self.ahead.eof {
                return Ok(Stop::ClientEof);
            }
            self.ahead.resume(&self.buf, &mut self.budget);
            self.flush().await?;
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let backlogged = self.shared.replies.lock().local_bytes as u64
                > self.rt.active().config.limits.max_buffered_per_connection;
            tokio::select! {
                biased;
                _ = self.shared.done.cancelled() => return Ok(Stop::ServerGone),
                _ = self.rt.shutdown.cancelled() => {
                    self.process_buffered().await?;
                    return Ok(Stop::Shutdown);
                }
                _ = tokio::time::sleep(UNBLOCK_IDLE), if self.holding => self.end_hold(),
                _ = tokio::time::sleep(BACKLOG_POLL), if backlogged => {}
                r = self.client.read_buf(&mut self.buf), if !backlogged => {
                    if r? == 0 {
                        return Ok(Stop::ClientEof);
                    }
                    self.ahead.last = Instant::now();
                }
            }
        }
    }

    fn command_limits(&self, active: &Active) -> CommandLimits {
        CommandLimits {
            max_command: active
                .config
                .limits
                .max_message_size
                .saturating_add(COMMAND_OVERHEAD),
            ..CommandLimits::default()
        }
    }

    async fn process_buffered(&mut self) -> std::io::Result<Option<Stop>> {
        // The config in force for this read batch (a reload applies from the next one).
        let active = self.rt.active();
        let limits = self.command_limits(&active);
        loop {
            let cmd = match self.splitter.split(&mut self.buf, &limits) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.stats.protocol_errors.fetch_add(1, Relaxed);
                    let text = match &e {
                        RespError::TooLarge {
                            what: "command", ..
                        } => {
                            self.stats.limit_hit(Limit::MaxMessageSize);
                            format!("ERR sluice: {e} (limits.max_message_size)")
                        }
                        _ => format!("ERR Protocol error: {e}"),
                    };
                    warn!(error = %e, "closing client connection");
                    self.reply_local(error_reply(&text));
                    return Ok(Some(Stop::Fatal));
                }
            };
            if let Some(stop) = self.on_command(cmd, &active).await? {
                return Ok(Some(stop));
            }
        }
    }

    async fn on_command(&mut self, cmd: Command, active: &Active) -> std::io::Result<Option<Stop>> {
        if self.tx.is_some() {
            return self.in_transaction(cmd, active).await;
        }
        let name = cmd.name();
        if let Some(kind) = PublishKind::of(&cmd) {
            return self.publish(cmd, kind, active).await;
        }
        self.note_facts(&cmd);
        match name.as_bytes() {
            b"MULTI" if !self.raw => {
                self.tx = Some(Transaction {
                    multi: Some(cmd),
                    ..Transaction::default()
                });
                self.reply_local(simple_reply("OK"));
            }
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
            | b"SUNSUBSCRIBE" | b"MONITOR" => {
                self.forward(&cmd.raw);
                self.go_raw();
            }
            b"CLIENT"
                if cmd.arg(1).is_some_and(|a| a.eq_ignore_ascii_case(b"REPLY"))
                    && !cmd.arg(2).is_some_and(|a| a.eq_ignore_ascii_case(b"ON")) =>
            {
                self.forward(&cmd.raw);
                self.go_raw();
            }
            _ => {
                self.forward(&cmd.raw);
                self.expect_reply();
            }
        }
        Ok(None)
    }

    /// Connection facts carried by commands: the client name, the login, the database.
    fn note_facts(&mut self, cmd: &Command) {
        if !matches!(
            cmd.name().as_bytes(),
            b"CLIENT" | b"AUTH" | b"HELLO" | b"SELECT"
        ) {
            return;
        }
        let text = |i: usize| cmd.arg(i).map(|a| String::from_utf8_lossy(a).into_owned());
        let f = Arc::make_mut(&mut self.facts);
        let mut set = |k: &str, v: String| {
            f.client_properties.retain(|(n, _)| n != k);
            f.client_properties.push((k.to_string(), v));
        };
        let mut user = None;
        let mut db = None;
        let mut changed = true;
        match cmd.name().as_bytes() {
            b"CLIENT" => match cmd.arg(1).map(|a| a.to_ascii_uppercase()).as_deref() {
                Some(b"SETNAME") => {
                    if let Some(n) = text(2) {
                        set("connection_name", n.clone());
                        set("name", n);
                    }
                }
                Some(b"SETINFO") => {
                    if let (Some(attr), Some(v)) = (text(2), text(3)) {
                        set(&attr.to_ascii_lowercase(), v);
                    }
                }
                _ => changed = false,
            },
            b"AUTH" => {
                user = Some(if cmd.args.len() >= 3 {
                    text(1)
                } else {
                    Some("default".into())
                });
            }
            b"HELLO" => {
                let mut i = 2;
                while let Some(opt) = cmd.arg(i) {
                    if opt.eq_ignore_ascii_case(b"AUTH") {
                        user = Some(text(i + 1));
                        i += 3;
                    } else if opt.eq_ignore_ascii_case(b"SETNAME") {
                        if let Some(n) = text(i + 1) {
                            set("connection_name", n.clone());
                            set("name", n);
                        }
                        i += 2;
                    } else {
                        break;
                    }
                }
            }
            b"SELECT" => db = Some(text(1)),
            _ => changed = false,
        }
        if let Some(u) = user {
            f.user = u;
        }
        if let Some(d) = db {
            f.vhost = d;
        }
        if changed {
            // Resolved again, from the new facts, at the next publish.
            self.identity = None;
        }
    }

    fn forward(&mut self, raw: &Bytes) {
        self.out.push(raw);
    }

    /// The command just forwarded is owed the server's reply.
    fn expect_reply(&mut self) {
        if !self.raw {
            self.slots.push(Slot::Upstream);
        }
    }

    fn reply_local(&mut self, reply: Bytes) {
        if !self.raw {
            self.slots.push(Slot::Local(reply));
        }
    }

    fn go_raw(&mut self) {
        if !self.raw {
            self.slots.push(Slot::Raw);
            self.raw = true;
        }
    }

    async fn in_transaction(
        &mut self,
        cmd: Command,
        active: &Active,
    ) -> std::io::Result<Option<Stop>> {
        let name = cmd.name();
        match name.as_bytes() {
            b"EXEC" => {
                let Some(tx) = self.tx.take() else {
                    return Ok(None);
                };
                self.exec(tx, cmd, active).await
            }
            b"DISCARD" => {
                self.tx = None;
                // Redis forgets WATCHed keys on DISCARD; the server never saw the MULTI.
                self.forward(&encode_command([&b"UNWATCH"[..]]));
                self.slots.push(Slot::Swallow);
                self.reply_local(simple_reply("OK"));
                Ok(None)
            }
            b"MULTI" => {
                self.reply_local(error_reply("ERR MULTI calls can not be nested"));
                Ok(None)
            }
            b"WATCH" => {
                self.reply_local(error_reply("ERR WATCH inside MULTI is not allowed"));
                Ok(None)
            }
            _ => {
                let max = active.config.limits.max_buffered_per_connection;
                let Some(tx) = self.tx.as_mut() else {
                    return Ok(None);
                };
                let size = cmd.raw.len() as u64;
                if tx.aborted || tx.bytes + size > max {
                    if !tx.aborted {
                        self.stats.limit_hit(Limit::MaxBufferedPerConnection);
                        warn!(max, "transaction larger than max_buffered_per_connection; it will be aborted");
                    }
                    tx.aborted = true;
                    tx.commands.clear();
                    self.reply_local(error_reply(&format!(
                        "ERR sluice: transaction larger than {max} bytes (limits.max_buffered_per_connection)"
                    )));
                    return Ok(None);
                }
                tx.bytes += size;
                self.note_facts(&cmd);
                if let Some(tx) = self.tx.as_mut() {
                    tx.commands.push(cmd);
                }
                self.reply_local(simple_reply("QUEUED"));
                Ok(None)
            }
        }
    }

    /// Decide a whole transaction: any shed command sheds all of it; otherwise it goes to the
    /// server with diverted commands rewritten.
    async fn exec(
        &mut self,
        tx: Transaction,
        exec: Command,
        active: &Active,
    ) -> std::io::Result<Option<Stop>> {
        if tx.aborted {
            self.forward(&encode_command([&b"UNWATCH"[..]]));
            self.slots.push(Slot::Swallow);
            self.reply_local(error_reply(
                "EXECABORT Transaction discarded because of previous errors.",
            ));
            return Ok(None);
        }
        let publishes: Vec<(usize, PublishKind)> = tx
            .commands
            .iter()
            .enumerate()
            .filter_map(|(i, c)| PublishKind::of(c).map(|k| (i, k)))
            .collect();
        let mut decisions = Vec::new();
        for &(i, kind) in &publishes {
            let Some(cmd) = tx.commands.get(i) else {
                continue;
            };
            match self.decide(cmd, kind, active).await {
                Some(d) => decisions.push((i, d)),
                None => return Ok(Some(Stop::Shutdown)),
            }
        }
        let shed = decisions
            .iter()
            .flat_map(|(_, d)| d.iter())
            .find_map(|(d, _, _)| match &d.verdict {
                Verdict::Shed { reason } => Some((reason.clone(), d.by.clone())),
                _ => None,
            });
        let mut outcomes = Vec::new();
        for (i, ds) in decisions {
            outcomes.push((i, self.settle(ds, shed.clone())));
        }
        if let Some((reason, _)) = shed {
            trace!(%reason, "transaction shed");
            self.forward(&encode_command([&b"UNWATCH"[..]]));
            self.slots.push(Slot::Swallow);
            self.reply_local(error_reply(&format!("SLUICE shed: {reason}")));
            return Ok(None);
        }
        if let Some(m) = &tx.multi {
            self.forward(&m.raw);
        }
        self.slots.push(Slot::Swallow);
        for (i, cmd) in tx.commands.iter().enumerate() {
            match outcomes.iter().find(|(j, _)| *j == i).map(|(_, o)| o) {
                Some(Outcome::Divert(key)) => {
                    let rewritten = rewrite_key(cmd, key);
                    self.forward(&rewritten);
                }
                _ => self.forward(&cmd.raw),
            }
            self.slots.push(Slot::Swallow);
        }
        self.forward(&exec.raw);
        self.expect_reply();
        Ok(None)
    }

    /// One push or publish outside a transaction.
    async fn publish(
        &mut self,
        cmd: Command,
        kind: PublishKind,
        active: &Active,
    ) -> std::io::Result<Option<Stop>> {
        let identity = self.conn_identity(active);
        if active.chain.is_empty() && identity.message_sources.is_empty() {
            // Nothing to decide: count and forward.
            if let Some(stats) = &self.producer {
                for v in kind.values(&cmd) {
                    stats.record(VerdictKind::Forward, v.len() as u64);
                }
            }
            self.forward(&cmd.raw);
            self.expect_reply();
            return Ok(None);
        }
        let Some(decisions) = self.decide(&cmd, kind, active).await else {
            // Shutting down while held: a whole command already read still goes through.
            self.forward(&cmd.raw);
            self.expect_reply();
            return Ok(Some(Stop::Shutdown));
        };
        match self.settle(decisions, None) {
            Outcome::Forward => {
                self.forward(&cmd.raw);
                self.expect_reply();
            }
            Outcome::Divert(key) => {
                let rewritten = rewrite_key(&cmd, &key);
                self.forward(&rewritten);
                self.expect_reply();
            }
            Outcome::Shed(reason) => {
                if self.raw {
                    // The client reads no replies in this mode: the shed is counted and logged.
                    trace!(%reason, "publish shed on a connection that takes no replies");
                } else {
                    self.reply_local(error_reply(&format!("SLUICE shed: {reason}")));
                }
            }
        }
        Ok(None)
    }

    /// The identity of this connection, resolved from its facts as they are now.
    fn conn_identity(&mut self, active: &Active) -> ConnIdentity {
        if let Some(i) = &self.identity {
            return i.clone();
        }
        let identity = active.config.identity.for_connection(&self.facts);
        let stats = self
            .rt
            .metrics
            .producer(&self.listener.name, &identity.name);
        if self
            .producer
            .as_ref()
            .is_none_or(|p| !Arc::ptr_eq(p, &stats))
        {
            stats.connections.fetch_add(1, Relaxed);
            if let Some(old) = self.producer.replace(stats.clone()) {
                old.connections.fetch_sub(1, Relaxed);
                if self.holding {
                    old.held.fetch_sub(1, Relaxed);
                    stats.held.fetch_add(1, Relaxed);
                }
            } else {
                info!(producer = %identity.name, "client identified");
            }
            tracing::Span::current().record("producer", &*identity.name);
        }
        self.identity = Some(identity.clone());
        identity
    }

    /// Evaluate each message of a command (one per pushed value). `None` when shutdown
    /// interrupted a hold.
    async fn decide(
        &mut self,
        cmd: &Command,
        kind: PublishKind,
        active: &Active,
    ) -> Option<Vec<(Decision, Arc<ProducerStats>, u64)>> {
        let identity = self.conn_identity(active);
        let conn_stats = self.producer.clone()?;
        let key = cmd.arg(1).map(String::from_utf8_lossy).unwrap_or_default();
        let values = kind.values(cmd);
        let facts = self.facts.clone();
        let vhost = facts.vhost.clone().unwrap_or_else(|| "0".into());
        let mut out = Vec::with_capacity(values.len());
        for value in values {
            let size = value.len() as u64;
            if active.chain.is_empty() && identity.message_sources.is_empty() {
                out.push((forward_decision(), conn_stats.clone(), size));
                continue;
            }
            let producer = identity.for_message(&Envelope(value));
            let stats = if *producer == *identity.name {
                conn_stats.clone()
            } else {
                self.rt.metrics.producer(&self.listener.name, &producer)
            };
            let message = RedisMessage {
                producer: &producer,
                conn: &facts,
                peer: self.peer,
                key: &key,
                value,
            };
            let view = PublishView {
                producer: &producer,
                vhost: &vhost,
                exchange: "",
                routing_key: &key,
                size,
                facts: Some(&message),
            };
            let mut st = EvalState::default();
            let decision = loop {
                match active.chain.evaluate(&view, &mut st) {
                    Step::Done(d) => break d,
                    Step::Wait(d) => {
                        if self.hold(d).await {
                            return None;
                        }
                    }
                }
            };
            if st.held().is_zero() {
                self.end_hold();
            }
            out.push((decision, stats, size));
        }
        Some(out)
    }

    /// Count a command's decisions and reduce them to one outcome: the first shed (or the
    /// given one, for a transaction shed as a whole) sheds all; else the first divert applies.
    fn settle(
        &mut self,
        decisions: Vec<(Decision, Arc<ProducerStats>, u64)>,
        forced_shed: Option<(Arc<str>, Option<Arc<str>>)>,
    ) -> Outcome {
        let shed = forced_shed.or_else(|| {
            decisions.iter().find_map(|(d, _, _)| match &d.verdict {
                Verdict::Shed { reason } => Some((reason.clone(), d.by.clone())),
                _ => None,
            })
        });
        let divert = decisions.iter().find_map(|(d, _, _)| match &d.verdict {
            Verdict::Divert { routing_key, .. } => Some(routing_key.clone()),
            _ => None,
        });
        for (mut d, stats, size) in decisions {
            if let Some((reason, by)) = &shed {
                if !matches!(d.verdict, Verdict::Shed { .. }) {
                    d.verdict = Verdict::Shed {
                        reason: reason.clone(),
                    };
                    d.kind = VerdictKind::Shed;
                    d.by = by.clone();
                }
            } else if let Some(key) = &divert {
                if !matches!(d.verdict, Verdict::Divert { .. }) {
                    d.verdict = Verdict::Divert {
                        exchange: "".into(),
                        routing_key: key.clone(),
                        checked: true,
                    };
                    d.kind = VerdictKind::Divert;
                }
            }
            for (kind, _) in &d.would {
                stats.record(*kind, size);
            }
            stats.record(d.kind, size);
            self.rt.metrics.verdicts.record(&stats, &d, size);
        }
        match (shed, divert) {
            (Some((reason, _)), _) => Outcome::Shed(reason),
            (None, Some(key)) => Outcome::Divert(key),
            (None, None) => Outcome::Forward,
        }
    }

    /// Hold this connection's commands for `d`, still reading the client ahead now and then so
    /// its TCP window keeps opening. Returns `true` if shutdown or the end of the connection
    /// interrupted the hold.
    async fn hold(&mut self, d: Duration) -> bool {
        if self.flush().await.is_err() {
            return true;
        }
        if !self.holding {
            self.holding = true;
            if let Some(p) = &self.producer {
                p.held.fetch_add(1, Relaxed);
            }
        }
        let deadline = Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = self.rt.shutdown.cancelled() => return true,
                _ = self.shared.done.cancelled() => return true,
                r = self.ahead.read(
                    &self.rt,
                    &self.stats,
                    &mut self.client,
                    &mut self.buf,
                    &mut self.budget,
                ) => {
                    if let Err(e) = r {
                        // The pump ends the session once what was read is processed.
                        trace!(error = %e, "client read failed during a hold");
                        self.ahead.eof = true;
                    }
                }
            }
        }
    }

    fn end_hold(&mut self) {
        if self.holding {
            self.holding = false;
            if let Some(p) = &self.producer {
                p.held.fetch_sub(1, Relaxed);
            }
        }
    }
}

fn forward_decision() -> Decision {
    Decision {
        verdict: Verdict::Forward,
        kind: VerdictKind::Forward,
        by: None,
        would: vec![],
    }
}

/// The command with its key (argument 1) replaced.
fn rewrite_key(cmd: &Command, key: &str) -> Bytes {
    let args = cmd
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| if i == 1 { key.as_bytes() } else { &a[..] });
    encode_command(args)
}
