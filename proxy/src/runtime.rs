//! What every connection shares: the active config (swapped atomically), metrics, the tarpit,
//! connection counts and the shutdown signal.

use crate::admin::Metrics;
use crate::config::Config;
use crate::policy::chain::{Chain, QuotaStage};
use crate::quota::Limiter;
use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use governor::clock::DefaultClock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// A config with everything built from it.
pub struct Active {
    /// The validated config.
    pub config: Arc<Config>,
    /// Its policy chain.
    pub chain: Arc<Chain>,
    /// Connection attempts per producer.
    pub tarpit: Option<Arc<Limiter>>,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// 1 for the first config, +1 per applied reload.
    pub version: u64,
}

impl Active {
    /// Build the chain and limiters of a config. Quota buckets whose quota is unchanged (same
    /// name, match, rates and action) are carried over from `previous`.
    pub fn build(config: Arc<Config>, previous: Option<&Active>, version: u64) -> Active {
        let mut stages = Vec::with_capacity(config.quotas.len());
        for q in &config.quotas {
            let reuse = previous.and_then(|p| {
                let old_cfg = p.config.quotas.iter().find(|o| o.name == q.name)?;
                let old = p.chain.quotas().iter().find(|s| s.name == q.name)?;
                let same = old_cfg.messages == q.messages
                    && old_cfg.bytes == q.bytes
                    && old_cfg.on_exceed == q.on_exceed
                    && format!("{:?}", old_cfg.matcher) == format!("{:?}", q.matcher);
                same.then(|| (old.limiter.clone(), old.divert_limiter.clone()))
            });
            let mut stage = QuotaStage::new(
                &q.name,
                q.matcher.clone(),
                q.messages,
                q.bytes,
                q.on_exceed.clone(),
                q.dry_run,
                DefaultClock::default(),
            );
            if let Some((limiter, divert)) = reuse {
                stage.limiter = limiter;
                stage.divert_limiter = divert;
            }
            stages.push(stage);
        }
        let tarpit = config
            .tarpit
            .rate
            .map(|r| Arc::new(Limiter::new(Some((r, config.tarpit.burst as u64)), None)));
        Active {
            chain: Arc::new(Chain::new(stages, config.dry_run)),
            tarpit,
            config,
            loaded_at: SystemTime::now(),
            version,
        }
    }
}

/// Shared by every task of the process.
pub struct Runtime {
    active: ArcSwap<Active>,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// Open client connections in total.
    pub connections: AtomicUsize,
    /// Open client connections per producer.
    pub per_producer: DashMap<Arc<str>, usize>,
    /// The last `connection.start` each listener's upstream sent, replayed to new clients so the
    /// tarpit and limits act before any upstream connection is opened.
    pub start_cache: DashMap<Arc<str>, Bytes>,
    /// Whether each listener's upstream answered the last probe.
    pub upstream_ready: DashMap<Arc<str>, bool>,
    /// The last reload error, if the last reload failed.
    pub last_error: parking_lot::Mutex<Option<String>>,
    next_conn_id: AtomicU64,
}

impl Runtime {
    /// A runtime for a first config.
    pub fn new(config: Config) -> Arc<Runtime> {
        let metrics = Arc::new(Metrics::new(config.admin.max_producers));
        let active = Active::build(Arc::new(config), None, 1);
        Arc::new(Runtime {
            active: ArcSwap::from_pointee(active),
            metrics,
            shutdown: CancellationToken::new(),
            connections: AtomicUsize::new(0),
            per_producer: DashMap::new(),
            start_cache: DashMap::new(),
            upstream_ready: DashMap::new(),
            last_error: parking_lot::Mutex::new(None),
            next_conn_id: AtomicU64::new(1),
        })
    }

    /// The config in force now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Swap in a new config; connections pick it up on their next publish.
    pub fn swap(&self, config: Config) -> Arc<Active> {
        let prev = self.active();
        let next = Arc::new(Active::build(
            Arc::new(config),
            Some(&prev),
            prev.version + 1,
        ));
        self.metrics
            .set_max_producers(next.config.admin.max_producers);
        self.active.store(next.clone());
        next
    }

    /// A process-unique connection id for logs.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Count a producer's connection; `false` if over the per-producer limit.
    pub fn add_producer_conn(&self, producer: &Arc<str>, max: usize) -> bool {
        let mut e = self.per_producer.entry(producer.clone()).or_insert(0);
        if *e >= max {
            return false;
        }
        *e += 1;
        true
    }

    /// Release a producer's connection.
    pub fn remove_producer_conn(&self, producer: &Arc<str>) {
        let remove = match self.per_producer.get_mut(producer) {
            Some(mut e) => {
                *e = e.saturating_sub(1);
                *e == 0
            }
            None => false,
        };
        if remove {
            self.per_producer.remove_if(producer, |_, n| *n == 0);
        }
    }
}
