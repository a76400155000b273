//! What every connection shares: the active config (swapped atomically), metrics, the tarpit,
//! connection counts and the shutdown signal.

use crate::admin::Metrics;
use crate::config::{Config, Problem, Report};
use crate::plugin::{PluginEngine, PluginShared, Policy};
use crate::policy::chain::{Chain, QuotaStage};
use crate::policy::PolicyStage;
use crate::quota::global::{Coordinator, QuotaScope};
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
    /// Redis leases for global quotas (`[coordination]`), kept across reloads while unchanged.
    pub coordinator: Option<Arc<Coordinator>>,
}

impl Active {
    /// Build the chain and limiters of a config, with its policy stages already loaded. Quota
    /// buckets whose quota is unchanged (same name, match, rates and action) are carried over
    /// from `previous`.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Active>,
        version: u64,
        policies: Vec<PolicyStage>,
    ) -> Active {
        let old_coordinator = previous.and_then(|p| p.coordinator.as_ref());
        let coordinator = Coordinator::for_config(config.coordination.as_ref(), old_coordinator);
        let same_coordinator = match (&coordinator, old_coordinator) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let mut stages = Vec::with_capacity(config.quotas.len());
        for q in &config.quotas {
            let reuse = previous.and_then(|p| {
                let old_cfg = p.config.quotas.iter().find(|o| o.name == q.name)?;
                let old = p.chain.quotas().iter().find(|s| s.name == q.name)?;
                let same = old_cfg.messages == q.messages
                    && old_cfg.bytes == q.bytes
                    && old_cfg.on_exceed == q.on_exceed
                    && old_cfg.scope == q.scope
                    && format!("{:?}", old_cfg.matcher) == format!("{:?}", q.matcher);
                same.then(|| {
                    let global = old.global.clone().filter(|_| same_coordinator);
                    (old.limiter.clone(), old.divert_limiter.clone(), global)
                })
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
            if let Some((limiter, divert, global)) = reuse {
                stage.limiter = limiter;
                stage.divert_limiter = divert;
                stage.global = global;
            }
            if let (QuotaScope::Global(scope), Some(c), None) =
                (q.scope, &coordinator, &stage.global)
            {
                stage.global = Some(c.limiter(&q.name, q.messages, q.bytes, scope));
            }
            stages.push(stage);
        }
        let tarpit = config
            .tarpit
            .rate
            .map(|r| Arc::new(Limiter::new(Some((r, config.tarpit.burst as u64)), None)));
        Active {
            chain: Arc::new(Chain::new(stages, config.dry_run).with_policies(policies)),
            tarpit,
            config,
            loaded_at: SystemTime::now(),
            version,
            coordinator,
        }
    }
}

/// Bytes buffered over all connections: unfinished publishes (counted from the moment their
/// content header is admitted, for the whole declared body) and frames sluice injected that
/// the outbound pumps have not taken yet. Bounded by `[limits] max_buffered_total`: a publish
/// whose content does not fit waits before its body is read (the connection's reads pause),
/// until other connections free enough.
#[derive(Debug, Default)]
pub struct BufferBudget {
    used: AtomicU64,
    /// Bytes held by connections that are waiting for room themselves.
    waiting: AtomicU64,
    waiters: AtomicUsize,
    freed: tokio::sync::Notify,
    /// Unix second of the last "publishes wait for room" warning (at most one per 10 s).
    last_warning: AtomicU64,
}

impl BufferBudget {
    /// Bytes buffered now (the `sluice_buffered_bytes` gauge).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Count bytes that are buffered whatever the limit (they are already in memory).
    pub fn add(&self, n: u64) {
        if n > 0 {
            self.used.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Bytes no longer buffered; wakes connections waiting for room.
    pub fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Take `n` bytes if they fit under `max`.
    pub fn try_take(&self, n: u64, max: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u.saturating_add(n) <= max).then(|| u.saturating_add(n))
            })
            .is_ok()
    }

    /// Whether a publish that has to wait should be logged: once per 10 s for the whole process
    /// (the wait is per publish; `sluice_limit_hits_total` counts every one).
    pub fn warn_now(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_warning.load(Ordering::Relaxed);
        now >= last.saturating_add(10)
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Start waiting for room while holding `held` bytes already (earlier frames of this
    /// connection's unfinished publishes).
    pub fn wait(&self, held: u64) -> BudgetWait<'_> {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        self.waiting.fetch_add(held, Ordering::AcqRel);
        BudgetWait { budget: self, held }
    }
}

/// A connection waiting for room in the [`BufferBudget`]; stops counting as waiting on drop.
pub struct BudgetWait<'a> {
    budget: &'a BufferBudget,
    held: u64,
}

impl BudgetWait<'_> {
    /// Take `n` bytes if they fit under `max`, or if every byte in use belongs to connections
    /// that are waiting too: none of them can finish a publish to free anything, so one goes
    /// ahead instead of all waiting forever (e.g. publishes interleaved on several channels of
    /// each connection, or one message larger than the whole limit).
    pub fn try_take(&self, n: u64, max: u64) -> bool {
        if self.budget.try_take(n, max) {
            return true;
        }
        let waiting = self.budget.waiting.load(Ordering::Acquire);
        if self.budget.used.load(Ordering::Acquire) <= waiting {
            self.budget.add(n);
            return true;
        }
        false
    }

    /// Resolves when bytes are released. Create it (and `enable` it) before [`Self::try_take`]
    /// so a release in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.budget.freed.notified()
    }
}

impl Drop for BudgetWait<'_> {
    fn drop(&mut self) {
        self.budget.waiters.fetch_sub(1, Ordering::AcqRel);
        let _ = self
            .budget
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(w.saturating_sub(self.held))
            });
    }
}

/// Bytes one connection holds in the [`BufferBudget`], given back when it is dropped (however
/// the connection ends).
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<BufferBudget>,
    held: u64,
}

impl BudgetShare {
    /// A share holding nothing yet.
    pub fn new(budget: Arc<BufferBudget>) -> Self {
        BudgetShare { budget, held: 0 }
    }

    /// The budget this share is part of.
    pub fn budget(&self) -> &Arc<BufferBudget> {
        &self.budget
    }

    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Count bytes whatever the limit.
    pub fn add(&mut self, n: u64) {
        self.budget.add(n);
        self.held = self.held.saturating_add(n);
    }

    /// Take `n` bytes from the budget if they fit under `max`.
    pub fn try_take(&mut self, n: u64, max: u64) -> bool {
        let ok = self.budget.try_take(n, max);
        if ok {
            self.held = self.held.saturating_add(n);
        }
        ok
    }

    /// Record bytes the caller took from the budget itself (after waiting for room).
    pub fn taken(&mut self, n: u64) {
        self.held = self.held.saturating_add(n);
    }

    /// Give bytes back.
    pub fn release(&mut self, n: u64) {
        let n = n.min(self.held);
        self.held -= n;
        self.budget.release(n);
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.release(self.held);
    }
}

/// Shared by every task of the process.
pub struct Runtime {
    active: ArcSwap<Active>,
    /// The Wasm engine (made on first use) and what plugins share across reloads.
    pub plugins: PluginHost,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// Open client connections in total.
    pub connections: AtomicUsize,
    /// Open client connections per producer.
    pub per_producer: DashMap<Arc<str>, usize>,
    /// Bytes buffered over all connections, bounded by `[limits] max_buffered_total`.
    pub buffered: Arc<BufferBudget>,
    /// The last `connection.start` each listener's upstream sent, replayed to new clients so the
    /// tarpit and limits act before any upstream connection is opened.
    pub start_cache: DashMap<Arc<str>, Bytes>,
    /// Whether each listener's upstream answered the last probe.
    pub upstream_ready: DashMap<Arc<str>, bool>,
    /// Divert targets decided per message, checked once each against the broker.
    pub divert_targets: crate::config::targets::TargetCache,
    /// Where reload requests go (set when sluice runs from a config file).
    pub reload: std::sync::OnceLock<crate::reload::Handle>,
    /// The last reload error, if the last reload failed.
    pub last_error: parking_lot::Mutex<Option<String>>,
    next_conn_id: AtomicU64,
}

impl Runtime {
    /// A runtime for a first config: loads its plugins (compiling them), fails with a report
    /// when one does not load.
    pub fn new(config: Config) -> Result<Arc<Runtime>, Report> {
        let metrics = Arc::new(Metrics::new(config.admin.max_producers));
        for l in &config.listeners {
            metrics.set_protocol(&l.name, l.protocol.as_str());
        }
        let plugins = PluginHost::default();
        let policies = plugins.load_policies(&config, None)?;
        let active = Active::build(Arc::new(config), None, 1, policies);
        Ok(Arc::new(Runtime {
            active: ArcSwap::from_pointee(active),
            plugins,
            metrics,
            shutdown: CancellationToken::new(),
            connections: AtomicUsize::new(0),
            per_producer: DashMap::new(),
            buffered: Arc::default(),
            start_cache: DashMap::new(),
            upstream_ready: DashMap::new(),
            divert_targets: Default::default(),
            reload: std::sync::OnceLock::new(),
            last_error: parking_lot::Mutex::new(None),
            next_conn_id: AtomicU64::new(1),
        }))
    }

    /// The config in force now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Build everything a new config needs without touching the running one: plugins are
    /// compiled (unchanged ones reused), quota buckets carried over. Blocking (compiles Wasm):
    /// call it from a blocking thread.
    pub fn prepare(&self, config: Config) -> Result<Active, Report> {
        let prev = self.active();
        let policies = self.plugins.load_policies(&config, Some(&prev))?;
        Ok(Active::build(
            Arc::new(config),
            Some(&prev),
            prev.version + 1,
            policies,
        ))
    }

    /// Make a prepared config the one in force: publishes being evaluated finish on the old
    /// one, new ones use this one.
    pub fn install(&self, next: Active) -> Arc<Active> {
        let next = Arc::new(next);
        self.metrics
            .set_max_producers(next.config.admin.max_producers);
        for l in &next.config.listeners {
            self.metrics.set_protocol(&l.name, l.protocol.as_str());
        }
        self.active.store(next.clone());
        next
    }

    /// Prepare and install in one step (startup and tests; reloads go through
    /// [`crate::config::reload`]).
    pub fn swap(&self, config: Config) -> Result<Arc<Active>, Report> {
        let next = self.prepare(config)?;
        Ok(self.install(next))
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

/// The Wasm side of the runtime.
pub struct PluginHost {
    engine: parking_lot::Mutex<Option<Arc<PluginEngine>>>,
    /// Token buckets, counters and broker signals that plugins share; survive reloads.
    pub shared: Arc<PluginShared>,
}

impl Default for PluginHost {
    fn default() -> Self {
        PluginHost {
            engine: parking_lot::Mutex::new(None),
            shared: PluginShared::new(),
        }
    }
}

impl PluginHost {
    /// The engine, made on first use (a config without policies never starts one).
    pub fn engine(&self) -> Result<Arc<PluginEngine>, crate::plugin::PluginError> {
        let mut e = self.engine.lock();
        if let Some(engine) = &*e {
            return Ok(engine.clone());
        }
        let engine = PluginEngine::new()?;
        *e = Some(engine.clone());
        Ok(engine)
    }

    /// Load the policy stages of `config`. A policy whose plugin file and settings are
    /// unchanged since `prev` keeps its loaded version; a changed one is compiled anew and keeps
    /// the version it replaces as its rollback target. Every failure is reported at its
    /// `plugin` line.
    pub fn load_policies(
        &self,
        config: &Config,
        prev: Option<&Active>,
    ) -> Result<Vec<PolicyStage>, Report> {
        let mut stages = Vec::with_capacity(config.policies.len());
        let mut problems = Vec::new();
        for pc in &config.policies {
            let old_cfg = prev.and_then(|p| p.config.policies.iter().find(|o| o.name == pc.name));
            let old_stage =
                prev.and_then(|p| p.chain.policies().iter().find(|s| s.name == pc.name));
            let bytes = match std::fs::read(&pc.plugin) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(Problem {
                        line: Some(pc.plugin_line),
                        message: format!(
                            "policy '{}': cannot read plugin {}: {e}",
                            pc.name,
                            pc.plugin.display()
                        ),
                    });
                    continue;
                }
            };
            let hash = crate::plugin::sha256_hex(&bytes);
            if let (Some(oc), Some(os)) = (old_cfg, old_stage) {
                if oc.same_load(pc) && os.policy.hash() == hash {
                    stages.push(os.carried_over(pc.matcher.clone(), pc.dry_run, pc.max_delay));
                    continue;
                }
            }
            let engine = match self.engine() {
                Ok(e) => e,
                Err(e) => {
                    problems.push(Problem {
                        line: Some(pc.plugin_line),
                        message: format!("policy '{}': {e}", pc.name),
                    });
                    continue;
                }
            };
            match Policy::from_bytes(
                &engine,
                &pc.plugin,
                &bytes,
                pc.settings.clone(),
                &self.shared,
            ) {
                Ok(policy) => stages.push(PolicyStage::new(
                    pc.name.clone(),
                    pc.matcher.clone(),
                    policy,
                    old_stage.map(|s| s.current().clone()),
                    pc.dry_run,
                    pc.max_delay,
                )),
                Err(e) => problems.push(Problem {
                    line: Some(pc.plugin_line),
                    message: e.to_string(),
                }),
            }
        }
        if problems.is_empty() {
            Ok(stages)
        } else {
            Err(Report {
                path: config.path.clone(),
                problems,
            })
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn takes_only_what_fits_and_releases_on_drop() {
        let b = Arc::new(BufferBudget::default());
        let mut a = BudgetShare::new(b.clone());
        assert!(b.try_take(60, 100));
        a.taken(60);
        assert!(!b.try_take(50, 100), "60 + 50 is over 100");
        assert!(b.try_take(40, 100));
        b.release(40);
        a.add(10);
        assert_eq!(b.used(), 70);
        drop(a);
        assert_eq!(b.used(), 0, "a dropped share gives back all it held");
    }

    #[test]
    fn a_waiter_goes_ahead_only_when_every_byte_in_use_is_held_by_waiters() {
        let b = BufferBudget::default();
        // Connection A holds 60 (a publish admitted, its body still coming); B holds 30.
        assert!(b.try_take(60, 100));
        assert!(b.try_take(30, 100));
        // A needs 50 more for a publish interleaved on another channel: it waits, as B is not
        // waiting and may finish and free its 30.
        let wait_a = b.wait(60);
        assert!(!wait_a.try_take(50, 100));
        // B now waits for room too, behind A: nobody could ever free anything, so one goes.
        let wait_b = b.wait(30);
        assert!(wait_b.try_take(50, 100) || wait_a.try_take(50, 100));
        assert_eq!(b.used(), 140);
        drop(wait_b);
        // With B no longer waiting (it went ahead and will finish), A waits again.
        assert!(!wait_a.try_take(50, 100));
        drop(wait_a);
        b.release(140);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter() {
        let b = Arc::new(BufferBudget::default());
        assert!(b.try_take(90, 100));
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let w = b2.wait(0);
            loop {
                let freed = w.freed();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if w.try_take(50, 100) {
                    return;
                }
                freed.await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        b.release(90);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("a release did not wake the waiter")
            .expect("waiter panicked");
        assert_eq!(b.used(), 50);
    }
}
