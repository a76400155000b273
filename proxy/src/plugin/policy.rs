//! One loaded plugin version: compiled once, evaluated on a pool of long-lived instances.

use super::bindings::{self, HostState, MessageRes, WitVerdict, MAX_CALL_MESSAGES};
use super::limits::{FailMode, PolicySettings, MAX_MEMORY};
use super::shared::{PluginShared, PolicyState};
use super::stats::PolicyStats;
use super::{wasi, ErrorKind, Evaluation, MessageFacts, PluginEngine, PluginError, PluginVerdict};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{
    Component, ComponentExportIndex, InstancePre, Linker, Resource, TypedFunc,
};
use wasmtime::{Store, Trap};

/// Time `init` may take (it runs at load and whenever an instance is rebuilt).
const INIT_BUDGET: Duration = Duration::from_secs(1);

type EvaluateFn = TypedFunc<(Resource<MessageRes>,), (WitVerdict,)>;
type EvaluateBatchFn = TypedFunc<(Vec<Resource<MessageRes>>,), (Vec<WitVerdict>,)>;

/// A loaded policy plugin. `Send + Sync`; share it behind the `Arc` that [`Policy::load`]
/// returns. Messages evaluated on an old version finish there while a reload swaps in a new one.
pub struct Policy {
    settings: PolicySettings,
    path: PathBuf,
    hash: String,
    engine: Arc<PluginEngine>,
    pre: InstancePre<HostState>,
    exports: Exports,
    config: Arc<str>,
    state: Arc<PolicyState>,
    shared: Arc<PluginShared>,
    pool: Mutex<Vec<Slot>>,
    stats: PolicyStats,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.settings.name)
            .field("path", &self.path)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
struct Exports {
    init: ComponentExportIndex,
    evaluate: ComponentExportIndex,
    evaluate_batch: ComponentExportIndex,
}

/// One live instance.
struct Slot {
    store: Store<HostState>,
    evaluate: EvaluateFn,
    evaluate_batch: EvaluateBatchFn,
}

enum SlotError {
    /// `init` returned an error.
    Rejected(String),
    /// Anything else: instantiation, export types, a trap in `init`.
    Failed(wasmtime::Error),
}

/// Clears the store's message pointers when a call ends, also on unwind.
struct CallScope<'a>(&'a mut Store<HostState>);

impl Deref for CallScope<'_> {
    type Target = Store<HostState>;
    fn deref(&self) -> &Store<HostState> {
        self.0
    }
}

impl DerefMut for CallScope<'_> {
    fn deref_mut(&mut self) -> &mut Store<HostState> {
        self.0
    }
}

impl Drop for CallScope<'_> {
    fn drop(&mut self) {
        self.0.data_mut().end();
    }
}

impl Policy {
    /// Reads, compiles and instantiates the plugin at `path`, and calls its `init` with
    /// `settings.config_json`. Errors name the policy and file and say what went wrong:
    /// unreadable, not a valid component, built for another WIT version, an import sluice does
    /// not provide, or the plugin's own message when `init` rejects the config.
    pub fn load(
        engine: &Arc<PluginEngine>,
        path: &Path,
        settings: PolicySettings,
        shared: &Arc<PluginShared>,
    ) -> Result<Arc<Policy>, PluginError> {
        let policy = settings.name.to_string();
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            policy: policy.clone(),
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(engine, path, &bytes, settings, shared)
    }

    /// As [`Policy::load`], from bytes already read; `path` is only used in messages.
    pub fn from_bytes(
        engine: &Arc<PluginEngine>,
        path: &Path,
        bytes: &[u8],
        settings: PolicySettings,
        shared: &Arc<PluginShared>,
    ) -> Result<Arc<Policy>, PluginError> {
        let policy = settings.name.to_string();
        let file = path.to_path_buf();
        if settings.memory_limit > MAX_MEMORY {
            return Err(PluginError::Settings {
                policy,
                reason: format!(
                    "memory limit {} bytes is above the maximum of {MAX_MEMORY}",
                    settings.memory_limit
                ),
            });
        }
        let compile_err = |reason: String| PluginError::Compile {
            policy: policy.clone(),
            path: file.clone(),
            reason,
        };
        if is_core_module(bytes) {
            return Err(compile_err(
                "it is a core Wasm module, not a component: build it for wasm32-wasip2 with \
                 sluice-policy-sdk"
                    .into(),
            ));
        }
        let component =
            Component::new(engine.engine(), bytes).map_err(|e| compile_err(format!("{e:#}")))?;
        check_versions(engine, &component).map_err(|found| PluginError::IncompatibleVersion {
            policy: policy.clone(),
            path: file.clone(),
            found,
            expected: super::WIT_VERSION,
        })?;
        let exports = find_exports(&component).ok_or_else(|| {
            compile_err(format!(
                "it does not export {} with init, evaluate and evaluate-batch (is it built with \
                 sluice-policy-sdk?)",
                bindings::EXPORT_INTERFACE
            ))
        })?;

        let mut linker = Linker::new(engine.engine());
        let link_err = |e: wasmtime::Error| PluginError::Instantiate {
            policy: policy.clone(),
            path: file.clone(),
            reason: format!("{e:#}"),
        };
        bindings::add_to_linker(&mut linker).map_err(link_err)?;
        if let Some(import) =
            wasi::add_to_linker(&mut linker, engine.engine(), &component).map_err(link_err)?
        {
            return Err(PluginError::UnknownImport {
                policy,
                path: file,
                import,
            });
        }
        let pre = linker.instantiate_pre(&component).map_err(link_err)?;

        let state = shared.policy_state(&settings.name);
        let name = settings.name.clone();
        let this = Policy {
            config: settings.config_json.as_str().into(),
            hash: sha256_hex(bytes),
            path: file.clone(),
            engine: engine.clone(),
            pre,
            exports,
            stats: PolicyStats::new(name, state.clone()),
            state,
            shared: shared.clone(),
            pool: Mutex::new(Vec::new()),
            settings,
        };
        match this.new_slot() {
            Ok(slot) => this.pool.lock().push(slot),
            Err(SlotError::Rejected(message)) => {
                return Err(PluginError::InitRejected {
                    policy,
                    path: file,
                    message,
                })
            }
            Err(SlotError::Failed(e)) => return Err(link_err(e)),
        }
        Ok(Arc::new(this))
    }

    /// Decides one message. Never fails: when the plugin traps, runs out of time or memory, or
    /// the policy is disabled, the verdict is the fail-mode verdict and `error` says why.
    pub fn evaluate(&self, msg: &dyn MessageFacts) -> Evaluation {
        if self.stats.is_disabled() {
            return self.failed(ErrorKind::Disabled, None);
        }
        let start = Instant::now();
        let out = match self.take_slot() {
            Err(e) => self.failed(ErrorKind::Instantiate, Some(&e)),
            Ok(mut slot) => match self.call_one(&mut slot, msg) {
                Ok(v) => {
                    self.pool.lock().push(slot);
                    Evaluation {
                        verdict: v.into(),
                        error: None,
                    }
                }
                Err(e) => self.discard(slot, e),
            },
        };
        self.stats.observe(start.elapsed(), 1);
        out
    }

    /// Decides several messages in one call into the plugin (one verdict per message, in
    /// order), which costs far less per message than separate calls. If the plugin fails, every
    /// message of the failed call gets the fail verdict and the failure counts once.
    pub fn evaluate_batch(&self, msgs: &[&dyn MessageFacts]) -> Vec<Evaluation> {
        let mut out = Vec::with_capacity(msgs.len());
        for chunk in msgs.chunks(MAX_CALL_MESSAGES) {
            if self.stats.is_disabled() {
                let e = self.failed(ErrorKind::Disabled, None);
                out.extend(std::iter::repeat_n(e, chunk.len()));
                continue;
            }
            let start = Instant::now();
            match self.take_slot() {
                Err(e) => {
                    let e = self.failed(ErrorKind::Instantiate, Some(&e));
                    out.extend(std::iter::repeat_n(e, chunk.len()));
                }
                Ok(mut slot) => match self.call_batch(&mut slot, chunk) {
                    Ok(verdicts) => {
                        self.pool.lock().push(slot);
                        out.extend(verdicts.into_iter().map(|v| Evaluation {
                            verdict: v.into(),
                            error: None,
                        }));
                    }
                    Err(e) => {
                        let e = self.discard(slot, e);
                        out.extend(std::iter::repeat_n(e, chunk.len()));
                    }
                },
            }
            self.stats.observe(start.elapsed(), chunk.len());
        }
        out
    }

    /// Errors, eval times, instances and the plugin's counters.
    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    /// SHA-256 of the plugin file, lowercase hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The file the plugin was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings it was loaded with.
    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    fn call_one(&self, slot: &mut Slot, msg: &dyn MessageFacts) -> wasmtime::Result<WitVerdict> {
        let _running = self.engine.running();
        let store = &mut slot.store;
        store.set_epoch_deadline(self.settings.deadline_ticks(1));
        store.data_mut().limiter.hit = false;
        let rep = store.data_mut().begin(std::slice::from_ref(&msg));
        let mut scope = CallScope(store);
        let (verdict,) = slot
            .evaluate
            .call(&mut *scope, (Resource::new_borrow(rep),))?;
        Ok(verdict)
    }

    fn call_batch(
        &self,
        slot: &mut Slot,
        msgs: &[&dyn MessageFacts],
    ) -> wasmtime::Result<Vec<WitVerdict>> {
        let _running = self.engine.running();
        let store = &mut slot.store;
        store.set_epoch_deadline(self.settings.deadline_ticks(msgs.len()));
        store.data_mut().limiter.hit = false;
        let base = store.data_mut().begin(msgs);
        let handles = (0..msgs.len() as u32)
            .map(|i| Resource::new_own(base | i))
            .collect();
        let mut scope = CallScope(store);
        let (verdicts,) = slot.evaluate_batch.call(&mut *scope, (handles,))?;
        if verdicts.len() != msgs.len() {
            wasmtime::bail!(
                "evaluate-batch returned {} verdicts for {} messages",
                verdicts.len(),
                msgs.len()
            );
        }
        Ok(verdicts)
    }

    fn take_slot(&self) -> Result<Slot, wasmtime::Error> {
        if let Some(slot) = self.pool.lock().pop() {
            return Ok(slot);
        }
        match self.new_slot() {
            Ok(slot) => Ok(slot),
            Err(SlotError::Rejected(m)) => {
                Err(wasmtime::format_err!("init rejected its config: {m}"))
            }
            Err(SlotError::Failed(e)) => Err(e),
        }
    }

    fn new_slot(&self) -> Result<Slot, SlotError> {
        let data = HostState::new(
            self.settings.name.clone(),
            self.config.clone(),
            self.settings.memory_limit,
            self.state.clone(),
            self.shared.clone(),
        );
        let mut store = Store::new(self.engine.engine(), data);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(INIT_BUDGET.as_millis() as u64);
        let _running = self.engine.running();
        let build = |store: &mut Store<HostState>| -> wasmtime::Result<_> {
            let instance = self.pre.instantiate(&mut *store)?;
            let init = instance.get_typed_func::<(String,), (Result<(), String>,)>(
                &mut *store,
                self.exports.init,
            )?;
            let evaluate = instance.get_typed_func(&mut *store, self.exports.evaluate)?;
            let evaluate_batch =
                instance.get_typed_func(&mut *store, self.exports.evaluate_batch)?;
            let (result,) = init.call(&mut *store, (self.config.to_string(),))?;
            Ok((result, evaluate, evaluate_batch))
        };
        let (result, evaluate, evaluate_batch) = build(&mut store).map_err(SlotError::Failed)?;
        result.map_err(SlotError::Rejected)?;
        self.stats.instances.fetch_add(1, Relaxed);
        Ok(Slot {
            store,
            evaluate,
            evaluate_batch,
        })
    }

    /// Drops an instance that failed a call and returns the fail evaluation.
    fn discard(&self, mut slot: Slot, err: wasmtime::Error) -> Evaluation {
        let kind = if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            ErrorKind::Timeout
        } else if slot.store.data().limiter.hit {
            ErrorKind::Memory
        } else {
            ErrorKind::Trap
        };
        slot.store.data_mut().flush_output();
        drop(slot);
        self.stats.instances.fetch_sub(1, Relaxed);
        self.failed(kind, Some(&err))
    }

    /// Counts a failure (maybe disabling the policy) and returns the fail-mode evaluation.
    fn failed(&self, kind: ErrorKind, err: Option<&wasmtime::Error>) -> Evaluation {
        let s = &self.settings;
        let disabled_now = self.stats.record_error(kind, s.max_errors, s.error_window);
        if let Some(err) = err {
            if self.state.log_allowed(self.shared.now_ns()) {
                tracing::warn!(policy = %s.name, kind = %kind, "policy plugin failed: {err:#}");
            }
        }
        if disabled_now {
            tracing::error!(
                policy = %s.name,
                plugin = %self.path.display(),
                "policy DISABLED after {} errors within {:?}: every message now gets its fail \
                 verdict ({:?}) without running the plugin; fix or roll back the plugin",
                s.max_errors,
                s.error_window,
                s.fail,
            );
        }
        let verdict = match s.fail {
            FailMode::Open => PluginVerdict::Forward,
            FailMode::Closed => PluginVerdict::Shed(format!("policy {} failed ({kind})", s.name)),
        };
        Evaluation {
            verdict,
            error: Some(kind),
        }
    }
}

impl From<WitVerdict> for PluginVerdict {
    fn from(v: WitVerdict) -> Self {
        match v {
            WitVerdict::Forward => PluginVerdict::Forward,
            WitVerdict::Delay(ms) => PluginVerdict::Delay(Duration::from_millis(u64::from(ms))),
            WitVerdict::Shed(reason) => PluginVerdict::Shed(reason),
            WitVerdict::Divert(d) => PluginVerdict::Divert {
                exchange: d.exchange,
                routing_key: d.routing_key,
            },
        }
    }
}

/// A core module starts with the Wasm magic and version 1; a component has layer 1.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.get(..8) == Some(b"\0asm\x01\0\0\0".as_slice())
}

/// `Err(name)` for a `sluice:policy` export or import of a version this host does not implement.
fn check_versions(engine: &PluginEngine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let engine = engine.engine();
    if ty.get_export(engine, bindings::EXPORT_INTERFACE).is_none() {
        if let Some((name, _)) = ty
            .exports(engine)
            .find(|(n, _)| n.starts_with("sluice:policy/policy"))
        {
            return Err(name.to_string());
        }
    }
    for (name, _) in ty.imports(engine) {
        if name.starts_with("sluice:policy/")
            && name != bindings::TYPES_INTERFACE
            && name != bindings::HOST_INTERFACE
        {
            return Err(name.to_string());
        }
    }
    Ok(())
}

fn find_exports(component: &Component) -> Option<Exports> {
    let iface = component.get_export_index(None, bindings::EXPORT_INTERFACE)?;
    Some(Exports {
        init: component.get_export_index(Some(&iface), "init")?,
        evaluate: component.get_export_index(Some(&iface), "evaluate")?,
        evaluate_batch: component.get_export_index(Some(&iface), "evaluate-batch")?,
    })
}

/// Hex SHA-256 of a plugin's bytes: its version identity.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}
