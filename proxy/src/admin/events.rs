//! Verdict events aggregated per producer and interval. A flood sheds thousands of publishes a
//! second; one log line each would bury everything else (and cost more than the shed itself), so
//! the publish path only bumps a counter keyed by (listener, producer, verdict, stage) and a
//! periodic task writes one line per key: "shed 12,408 publishes from hotfix-svc in the last
//! 10 s". At most [`MAX_LINES`] lines per interval, whatever the flood.

use super::ProducerStats;
use crate::policy::{Decision, Verdict, VerdictKind};
use crate::runtime::Runtime;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Most lines one flush writes: the busiest keys, then one line summing the rest.
pub const MAX_LINES: usize = 20;

/// The default `[log] verdict_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    listener: Arc<str>,
    producer: Arc<str>,
    kind: VerdictKind,
    by: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Tally {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// The shed reason of the first publish counted in this interval.
    reason: Mutex<Option<Arc<str>>>,
}

/// What one key counted over one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Listener name.
    pub listener: Arc<str>,
    /// Producer name (bounded like the metric labels: past the bound it is `other`).
    pub producer: Arc<str>,
    /// The verdict.
    pub kind: VerdictKind,
    /// The quota or policy that decided.
    pub by: Option<Arc<str>>,
    /// Publishes.
    pub messages: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// A shed reason (the first of the interval).
    pub reason: Option<Arc<str>>,
}

/// Shed, divert and delay counts since the last flush. Forwards are not tracked.
#[derive(Debug)]
pub struct VerdictLog {
    tallies: DashMap<Key, Tally>,
    last_flush: Mutex<Instant>,
}

impl Default for VerdictLog {
    fn default() -> Self {
        VerdictLog {
            tallies: DashMap::new(),
            last_flush: Mutex::new(Instant::now()),
        }
    }
}

impl VerdictLog {
    /// Count a decided publish: its verdict unless it was a plain forward, and every dry-run
    /// stage that would have acted.
    pub fn record(&self, stats: &ProducerStats, d: &Decision, bytes: u64) {
        if d.kind != VerdictKind::Forward {
            let reason = match &d.verdict {
                Verdict::Shed { reason } => Some(reason),
                _ => None,
            };
            self.add(stats, d.kind, d.by.as_ref(), reason, bytes);
        }
        for (kind, by) in &d.would {
            self.add(stats, *kind, Some(by), None, bytes);
        }
    }

    fn add(
        &self,
        stats: &ProducerStats,
        kind: VerdictKind,
        by: Option<&Arc<str>>,
        reason: Option<&Arc<str>>,
        bytes: u64,
    ) {
        let key = Key {
            listener: stats.listener.clone(),
            producer: stats.producer.clone(),
            kind,
            by: by.cloned(),
        };
        // The shard's read guard is held while counting, so a flush (write guard) never removes
        // a tally between lookup and increment.
        let bump = |t: &Tally| {
            if t.messages.fetch_add(1, Relaxed) == 0 {
                *t.reason.lock() = reason.cloned();
            }
            t.bytes.fetch_add(bytes, Relaxed);
        };
        if let Some(t) = self.tallies.get(&key) {
            bump(&t);
            return;
        }
        bump(&self.tallies.entry(key).or_default());
    }

    /// Take the counts so far, busiest first; keys idle for a whole interval are forgotten.
    pub fn take(&self) -> Vec<Summary> {
        let mut out = Vec::new();
        self.tallies.retain(|k, t| {
            let messages = t.messages.swap(0, Relaxed);
            if messages == 0 {
                return false;
            }
            out.push(Summary {
                listener: k.listener.clone(),
                producer: k.producer.clone(),
                kind: k.kind,
                by: k.by.clone(),
                messages,
                bytes: t.bytes.swap(0, Relaxed),
                reason: t.reason.lock().take(),
            });
            true
        });
        out.sort_by(|a, b| {
            b.messages
                .cmp(&a.messages)
                .then_with(|| (&a.producer, a.kind.as_str()).cmp(&(&b.producer, b.kind.as_str())))
        });
        out
    }

    /// Log what was counted since the last flush; returns the number of lines written (at most
    /// [`MAX_LINES`]).
    pub fn flush(&self) -> usize {
        let elapsed = {
            let mut last = self.last_flush.lock();
            let e = last.elapsed();
            *last = Instant::now();
            e
        };
        let all = self.take();
        let secs = elapsed.as_secs_f64().round().max(1.0) as u64;
        let shown = if all.len() > MAX_LINES {
            MAX_LINES - 1
        } else {
            all.len()
        };
        let (head, rest) = all.split_at(shown);
        for s in head {
            emit(s, secs);
        }
        if rest.is_empty() {
            return head.len();
        }
        let messages: u64 = rest.iter().map(|s| s.messages).sum();
        let producers = {
            let mut p: Vec<_> = rest.iter().map(|s| &s.producer).collect();
            p.sort();
            p.dedup();
            p.len()
        };
        warn!(
            keys = rest.len(),
            producers,
            messages,
            interval_s = secs,
            "and {} more publishes shed, diverted or delayed for {} more producer/verdict pairs ({} producers) in the last {} s",
            thousands(messages),
            rest.len(),
            producers,
            secs
        );
        head.len() + 1
    }
}

fn emit(s: &Summary, secs: u64) {
    let verb = match s.kind {
        VerdictKind::Shed => "shed",
        VerdictKind::Divert => "diverted",
        VerdictKind::Delay => "delayed",
        VerdictKind::WouldShed => "would have shed (dry run)",
        VerdictKind::WouldDivert => "would have diverted (dry run)",
        VerdictKind::WouldDelay => "would have delayed (dry run)",
        VerdictKind::Forward => "forwarded",
    };
    let by = s.by.as_deref().unwrap_or("-");
    let why = match (&s.by, &s.reason) {
        (Some(b), Some(r)) => format!(" (by {b}: {r})"),
        (Some(b), None) => format!(" (by {b})"),
        (None, Some(r)) => format!(" ({r})"),
        (None, None) => String::new(),
    };
    let text = format!(
        "{verb} {} publishes ({}) from {} in the last {secs} s{why}",
        thousands(s.messages),
        human_bytes(s.bytes),
        s.producer
    );
    let verdict = s.kind.as_str();
    let listener = &*s.listener;
    let producer = &*s.producer;
    if s.kind == VerdictKind::Shed {
        warn!(
            listener,
            producer,
            verdict,
            by,
            messages = s.messages,
            bytes = s.bytes,
            interval_s = secs,
            "{text}"
        );
    } else {
        info!(
            listener,
            producer,
            verdict,
            by,
            messages = s.messages,
            bytes = s.bytes,
            interval_s = secs,
            "{text}"
        );
    }
}

/// Flush every `[log] verdict_interval` (re-read after each flush, so a reload applies) until
/// shutdown; [`crate::Server::shutdown`] flushes once more after connections drained.
pub async fn flush_loop(rt: Arc<Runtime>) {
    // Counted from when serving starts, not from when the metrics were made (before plugins
    // compiled).
    *rt.metrics.verdicts.last_flush.lock() = Instant::now();
    loop {
        let every = rt.active().config.log.verdict_interval;
        tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        rt.metrics.verdicts.flush();
    }
}

/// `12408` → `12,408`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Metrics;

    fn shed(by: &str) -> Decision {
        Decision {
            verdict: Verdict::Shed {
                reason: format!("over quota '{by}'").into(),
            },
            kind: VerdictKind::Shed,
            by: Some(by.into()),
            would: vec![],
        }
    }

    #[test]
    fn counts_are_aggregated_per_producer_and_verdict() {
        let m = Metrics::new(100);
        let l: Arc<str> = "amqp".into();
        let hot = m.producer(&l, &"hotfix-svc".into());
        let calm = m.producer(&l, &"billing".into());
        let log = VerdictLog::default();
        for _ in 0..12_408 {
            log.record(&hot, &shed("per-producer"), 100);
        }
        log.record(&calm, &shed("per-producer"), 10);
        let forward = Decision {
            verdict: Verdict::Forward,
            kind: VerdictKind::Forward,
            by: None,
            would: vec![(VerdictKind::WouldDivert, "dry".into())],
        };
        log.record(&calm, &forward, 10);
        let s = log.take();
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(&*s[0].producer, "hotfix-svc");
        assert_eq!(s[0].messages, 12_408);
        assert_eq!(s[0].bytes, 1_240_800);
        assert_eq!(s[0].reason.as_deref(), Some("over quota 'per-producer'"));
        assert!(s
            .iter()
            .any(|x| x.kind == VerdictKind::WouldDivert && &*x.producer == "billing"));
        // Counted once: the next interval starts from zero and idle keys are dropped.
        assert!(log.take().is_empty());
        assert!(log.tallies.is_empty());
    }

    #[test]
    fn a_flush_writes_at_most_max_lines_whatever_the_flood() {
        let m = Metrics::new(1000);
        let l: Arc<str> = "amqp".into();
        let log = VerdictLog::default();
        for i in 0..100_000u32 {
            let p = m.producer(&l, &format!("p{}", i % 50).into());
            log.record(&p, &shed("q"), 1);
        }
        assert_eq!(log.flush(), MAX_LINES);
        assert_eq!(log.flush(), 0);
    }

    #[test]
    fn the_interval_is_configurable_within_bounds() {
        const LISTENER: &str = "[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
                                listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:5672\"\n";
        let path = std::path::Path::new("t.toml");
        let cfg = |v: &str| {
            crate::config::parse(
                &format!("{LISTENER}[log]\nverdict_interval = \"{v}\"\n"),
                path,
            )
        };
        let ok = cfg("2s").map_err(|r| r.to_string());
        assert_eq!(
            ok.map(|c| c.log.verdict_interval),
            Ok(Duration::from_secs(2))
        );
        let err = cfg("100ms").map(|_| ()).map_err(|r| r.to_string());
        assert!(
            err.as_ref().is_err_and(
                |e| e.contains("t.toml:7: log.verdict_interval: must be between 1s and 1h")
            ),
            "{err:?}"
        );
        let default = crate::config::parse(LISTENER, path).map_err(|r| r.to_string());
        assert_eq!(
            default.map(|c| c.log.verdict_interval),
            Ok(DEFAULT_INTERVAL)
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(12_408), "12,408");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
    }
}
