//! Counters and gauges, kept as atomics next to what they measure and rendered as Prometheus
//! text. Producer labels are bounded: past `max_producers` names, new producers count as `other`.

use crate::policy::VerdictKind;
use dashmap::DashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

const KINDS: usize = VerdictKind::ALL.len();

fn idx(k: VerdictKind) -> usize {
    VerdictKind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

/// Counters for one (listener, producer).
#[derive(Debug)]
pub struct ProducerStats {
    /// Listener name.
    pub listener: Arc<str>,
    /// Producer name (or `other`).
    pub producer: Arc<str>,
    messages: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
    /// Open connections of this producer.
    pub connections: AtomicI64,
    /// Connections whose reads are held right now.
    pub held: AtomicI64,
    rate_bits: AtomicU64,
    last_total: AtomicU64,
}

impl ProducerStats {
    fn new(listener: Arc<str>, producer: Arc<str>) -> Self {
        ProducerStats {
            listener,
            producer,
            messages: Default::default(),
            bytes: Default::default(),
            connections: AtomicI64::new(0),
            held: AtomicI64::new(0),
            rate_bits: AtomicU64::new(0),
            last_total: AtomicU64::new(0),
        }
    }

    /// Count one publish under a verdict.
    pub fn record(&self, kind: VerdictKind, bytes: u64) {
        let i = idx(kind);
        if let (Some(m), Some(b)) = (self.messages.get(i), self.bytes.get(i)) {
            m.fetch_add(1, Relaxed);
            b.fetch_add(bytes, Relaxed);
        }
    }

    /// Publishes counted under a verdict.
    pub fn count(&self, kind: VerdictKind) -> u64 {
        self.messages
            .get(idx(kind))
            .map(|m| m.load(Relaxed))
            .unwrap_or(0)
    }

    /// All publishes seen (every verdict but the dry-run ones, which are also counted as forward).
    pub fn total(&self) -> u64 {
        [
            VerdictKind::Forward,
            VerdictKind::Delay,
            VerdictKind::Shed,
            VerdictKind::Divert,
        ]
        .iter()
        .map(|k| self.count(*k))
        .sum()
    }

    /// Publishes per second over the last sampling interval.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Relaxed))
    }

    fn sample(&self, interval_secs: f64) {
        let total = self.total();
        let last = self.last_total.swap(total, Relaxed);
        let rate = total.saturating_sub(last) as f64 / interval_secs;
        self.rate_bits.store(rate.to_bits(), Relaxed);
    }
}

/// Counters for one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Open client connections.
    pub connections: AtomicI64,
    /// Connections whose upstream has sent `connection.blocked`.
    pub upstream_blocked: AtomicI64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connection attempts held by the tarpit.
    pub tarpitted: AtomicU64,
    /// Connections refused (limits, tarpit past its maximum).
    pub refused: AtomicU64,
    /// Client protocol errors (bad frames, unexpected frames…).
    pub protocol_errors: AtomicU64,
    /// Upstream connect failures.
    pub upstream_errors: AtomicU64,
    /// Publish to publisher-confirm latency of forwarded publishes.
    pub confirm_latency: super::histogram::Histogram,
    limit_hits: [AtomicU64; Limit::ALL.len()],
}

/// A `[limits]` bound, as counted by `sluice_limit_hits_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`: a connection refused with 530.
    MaxConnections,
    /// `max_connections_per_producer`: a connection refused with 530.
    MaxConnectionsPerProducer,
    /// `max_channels`: a connection closed with 530 for a `channel.open` past the
    /// `channel_max` sluice told the client.
    MaxChannels,
    /// `max_message_size`: a channel closed with 406.
    MaxMessageSize,
    /// `max_buffered_per_connection`: a connection closed with 506.
    MaxBufferedPerConnection,
    /// `max_buffered_total`: a publish that had to wait for room (its connection's reads
    /// paused), counted once per wait.
    MaxBufferedTotal,
    /// A frame over the frame size in force: a connection closed with 501.
    MaxFrameSize,
    /// `handshake_timeout`: a connection closed before it was open.
    HandshakeTimeout,
    /// `max_read_ahead`: a connection whose publishes wait had that much read ahead, so sluice
    /// stopped reading it until they move on (counted once per wait).
    MaxReadAhead,
}

impl Limit {
    /// Every limit, in label order.
    pub const ALL: [Limit; 9] = [
        Limit::MaxConnections,
        Limit::MaxConnectionsPerProducer,
        Limit::MaxChannels,
        Limit::MaxMessageSize,
        Limit::MaxBufferedPerConnection,
        Limit::MaxBufferedTotal,
        Limit::MaxFrameSize,
        Limit::HandshakeTimeout,
        Limit::MaxReadAhead,
    ];

    /// The `limit` label: the config key.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::MaxConnectionsPerProducer => "max_connections_per_producer",
            Limit::MaxChannels => "max_channels",
            Limit::MaxMessageSize => "max_message_size",
            Limit::MaxBufferedPerConnection => "max_buffered_per_connection",
            Limit::MaxBufferedTotal => "max_buffered_total",
            Limit::MaxFrameSize => "max_frame_size",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::MaxReadAhead => "max_read_ahead",
        }
    }
}

impl ListenerStats {
    /// Count one hit of a limit.
    pub fn limit_hit(&self, limit: Limit) {
        if let Some(c) = self.limit_hits.get(limit as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Hits of a limit so far.
    pub fn limit_hits(&self, limit: Limit) -> u64 {
        self.limit_hits
            .get(limit as usize)
            .map(|c| c.load(Relaxed))
            .unwrap_or(0)
    }
}

/// All of sluice's metrics.
#[derive(Debug)]
pub struct Metrics {
    max_producers: AtomicU64,
    producers: DashMap<(Arc<str>, Arc<str>), Arc<ProducerStats>>,
    listeners: DashMap<Arc<str>, Arc<ListenerStats>>,
    /// Each listener's protocol, the `protocol` label of per-producer families.
    protocols: DashMap<Arc<str>, &'static str>,
    /// Config reloads applied.
    pub reloads_ok: AtomicU64,
    /// Config reloads refused.
    pub reloads_error: AtomicU64,
    /// Admin API requests refused for a missing or wrong token.
    pub admin_auth_failures: AtomicU64,
    /// Shed, divert and delay counts waiting for their aggregated log line.
    pub verdicts: super::events::VerdictLog,
    started: std::time::Instant,
}

/// A per-listener gauge: name, type, help, reader.
type GaugeFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ListenerStats) -> i64,
);
/// A per-listener counter: name, help, reader.
type CounterFamily = (&'static str, &'static str, fn(&ListenerStats) -> u64);

impl Metrics {
    /// Empty metrics tracking at most `max_producers` producer names.
    pub fn new(max_producers: usize) -> Self {
        Metrics {
            max_producers: AtomicU64::new(max_producers as u64),
            producers: DashMap::new(),
            listeners: DashMap::new(),
            protocols: DashMap::new(),
            reloads_ok: AtomicU64::new(0),
            reloads_error: AtomicU64::new(0),
            admin_auth_failures: AtomicU64::new(0),
            verdicts: Default::default(),
            started: std::time::Instant::now(),
        }
    }

    /// Change the producer bound (on reload).
    pub fn set_max_producers(&self, n: usize) {
        self.max_producers.store(n as u64, Relaxed);
    }

    /// The stats of a listener.
    pub fn listener(&self, name: &Arc<str>) -> Arc<ListenerStats> {
        if let Some(s) = self.listeners.get(name) {
            return s.clone();
        }
        self.listeners.entry(name.clone()).or_default().clone()
    }

    /// The stats of a producer on a listener; `other` once the bound is reached.
    pub fn producer(&self, listener: &Arc<str>, producer: &Arc<str>) -> Arc<ProducerStats> {
        let key = (listener.clone(), producer.clone());
        if let Some(s) = self.producers.get(&key) {
            return s.clone();
        }
        if self.producers.len() as u64 >= self.max_producers.load(Relaxed) {
            let other: (Arc<str>, Arc<str>) = (listener.clone(), "other".into());
            return self
                .producers
                .entry(other)
                .or_insert_with(|| Arc::new(ProducerStats::new(listener.clone(), "other".into())))
                .clone();
        }
        self.producers
            .entry(key)
            .or_insert_with(|| Arc::new(ProducerStats::new(listener.clone(), producer.clone())))
            .clone()
    }

    /// Every producer's stats.
    pub fn producers(&self) -> Vec<Arc<ProducerStats>> {
        self.producers.iter().map(|e| e.value().clone()).collect()
    }

    /// Record a listener's protocol (on every config install).
    pub fn set_protocol(&self, listener: &Arc<str>, protocol: &'static str) {
        self.protocols.insert(listener.clone(), protocol);
    }

    /// A listener's protocol label (`amqp091` until told otherwise).
    pub fn protocol_of(&self, listener: &str) -> &'static str {
        self.protocols
            .get(listener)
            .map(|p| *p)
            .unwrap_or("amqp091")
    }

    /// Recompute rates; call once per `interval_secs`.
    pub fn sample(&self, interval_secs: f64) {
        for p in self.producers.iter() {
            p.sample(interval_secs);
        }
    }

    /// Render every family in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut producers = self.producers();
        producers.sort_by(|a, b| (&a.listener, &a.producer).cmp(&(&b.listener, &b.producer)));
        family(
            &mut out,
            "sluice_messages_total",
            "counter",
            "Publishes by listener, producer and verdict.",
        );
        for p in &producers {
            for k in VerdictKind::ALL {
                let _ = writeln!(
                    out,
                    "sluice_messages_total{{listener=\"{}\",protocol=\"{}\",producer=\"{}\",verdict=\"{}\"}} {}",
                    esc(&p.listener),
                    self.protocol_of(&p.listener),
                    esc(&p.producer),
                    k.as_str(),
                    p.count(k)
                );
            }
        }
        family(
            &mut out,
            "sluice_bytes_total",
            "counter",
            "Body bytes of publishes by listener, producer and verdict.",
        );
        for p in &producers {
            for k in VerdictKind::ALL {
                let v = p.bytes.get(idx(k)).map(|b| b.load(Relaxed)).unwrap_or(0);
                let _ = writeln!(
                    out,
                    "sluice_bytes_total{{listener=\"{}\",protocol=\"{}\",producer=\"{}\",verdict=\"{}\"}} {}",
                    esc(&p.listener),
                    self.protocol_of(&p.listener),
                    esc(&p.producer),
                    k.as_str(),
                    v
                );
            }
        }
        family(
            &mut out,
            "sluice_producer_connections",
            "gauge",
            "Open client connections per producer.",
        );
        for p in &producers {
            let _ = writeln!(
                out,
                "sluice_producer_connections{{listener=\"{}\",protocol=\"{}\",producer=\"{}\"}} {}",
                esc(&p.listener),
                self.protocol_of(&p.listener),
                esc(&p.producer),
                p.connections.load(Relaxed)
            );
        }
        family(
            &mut out,
            "sluice_producer_held_connections",
            "gauge",
            "Connections per producer whose reads are held by a delay right now.",
        );
        for p in &producers {
            let _ = writeln!(
                out,
                "sluice_producer_held_connections{{listener=\"{}\",protocol=\"{}\",producer=\"{}\"}} {}",
                esc(&p.listener),
                self.protocol_of(&p.listener),
                esc(&p.producer),
                p.held.load(Relaxed)
            );
        }
        let mut listeners: Vec<_> = self
            .listeners
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        listeners.sort_by(|a, b| a.0.cmp(&b.0));
        let gauges: [GaugeFamily; 2] = [
            (
                "sluice_connections",
                "gauge",
                "Open client connections.",
                |l| l.connections.load(Relaxed),
            ),
            (
                "sluice_upstream_blocked",
                "gauge",
                "Upstream connections the broker has blocked (connection.blocked).",
                |l| l.upstream_blocked.load(Relaxed),
            ),
        ];
        for (name, kind, help, get) in gauges {
            family(&mut out, name, kind, help);
            for (n, l) in &listeners {
                let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", esc(n), get(l));
            }
        }
        let counters: [CounterFamily; 5] = [
            (
                "sluice_connections_accepted_total",
                "Client connections accepted.",
                |l| l.accepted.load(Relaxed),
            ),
            (
                "sluice_connections_tarpitted_total",
                "Connection attempts held by the tarpit.",
                |l| l.tarpitted.load(Relaxed),
            ),
            (
                "sluice_connections_refused_total",
                "Connection attempts refused by a limit.",
                |l| l.refused.load(Relaxed),
            ),
            (
                "sluice_protocol_errors_total",
                "Client connections closed for a protocol error.",
                |l| l.protocol_errors.load(Relaxed),
            ),
            (
                "sluice_upstream_errors_total",
                "Failures to connect to the upstream.",
                |l| l.upstream_errors.load(Relaxed),
            ),
        ];
        for (name, help, get) in counters {
            family(&mut out, name, "counter", help);
            for (n, l) in &listeners {
                let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", esc(n), get(l));
            }
        }
        family(
            &mut out,
            "sluice_limit_hits_total",
            "counter",
            "Connections refused or closed, channels closed, or publishes paused because a [limits] bound was hit, by limit.",
        );
        for (n, l) in &listeners {
            for limit in Limit::ALL {
                let _ = writeln!(
                    out,
                    "sluice_limit_hits_total{{listener=\"{}\",limit=\"{}\"}} {}",
                    esc(n),
                    limit.as_str(),
                    l.limit_hits(limit)
                );
            }
        }
        family(
            &mut out,
            "sluice_confirm_latency_seconds",
            "histogram",
            "Time from forwarding a confirmed publish to the broker's ack or nack.",
        );
        for (n, l) in &listeners {
            let labels = format!("listener=\"{}\"", esc(n));
            l.confirm_latency
                .render(&mut out, "sluice_confirm_latency_seconds", &labels);
        }
        family(
            &mut out,
            "sluice_config_reloads_total",
            "counter",
            "Config reloads by result.",
        );
        let _ = writeln!(
            out,
            "sluice_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "sluice_config_reloads_total{{result=\"error\"}} {}",
            self.reloads_error.load(Relaxed)
        );
        family(
            &mut out,
            "sluice_admin_auth_failures_total",
            "counter",
            "Admin API requests refused for a missing or wrong token.",
        );
        let _ = writeln!(
            out,
            "sluice_admin_auth_failures_total {}",
            self.admin_auth_failures.load(Relaxed)
        );
        family(
            &mut out,
            "sluice_uptime_seconds",
            "gauge",
            "Seconds since sluice started.",
        );
        let _ = writeln!(
            out,
            "sluice_uptime_seconds {:.3}",
            self.started.elapsed().as_secs_f64()
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_labels_are_bounded() {
        let m = Metrics::new(2);
        let l: Arc<str> = "amqp".into();
        let a = m.producer(&l, &"a".into());
        let _b = m.producer(&l, &"b".into());
        let c = m.producer(&l, &"c".into());
        let d = m.producer(&l, &"d".into());
        assert_eq!(&*c.producer, "other");
        assert!(Arc::ptr_eq(&c, &d));
        a.record(VerdictKind::Shed, 10);
        let text = m.render();
        assert!(text.contains(
            "sluice_messages_total{listener=\"amqp\",protocol=\"amqp091\",producer=\"a\",verdict=\"shed\"} 1"
        ));
        assert!(text.contains("# HELP sluice_connections "));
    }
}
