//! The process-wide Wasm engine: compiler settings, the pooling allocator and the epoch ticker
//! that enforces time budgets.

use super::limits::{EPOCH_TICK, MAX_MEMORY};
use super::PluginError;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

/// Live component instances the pool holds, across every policy and reload. Each policy keeps
/// one instance per thread evaluating it concurrently.
const MAX_INSTANCES: u32 = 256;

/// The ticker sleeps once no call has run for this long, and wakes with the next call. A busy
/// proxy keeps it ticking (no wake-up per call); an idle one costs no wake-ups at all, where a
/// ticker that never slept woke the process 1,000 times a second.
const IDLE_AFTER: Duration = Duration::from_millis(100);

/// One per process: the wasmtime [`Engine`] and the thread that advances its epoch every
/// [`EPOCH_TICK`](super::limits::EPOCH_TICK) while plugin code runs. Dropping the last `Arc`
/// stops the thread.
pub struct PluginEngine {
    engine: Engine,
    ticker: Arc<TickerState>,
    thread: Option<(JoinHandle<()>, Thread)>,
}

/// What the calling threads and the ticker share.
#[derive(Default)]
struct TickerState {
    /// Calls into plugin code running now (instantiation and `init` included).
    running: AtomicUsize,
    /// The ticker is parked, or about to park: a call that starts must unpark it.
    parked: AtomicBool,
    stop: AtomicBool,
}

/// Marks a call into plugin code: while one is alive, the epoch advances, so the call's time
/// budget is enforced.
pub(crate) struct Running<'a>(&'a PluginEngine);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.ticker.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The ticker's loop. Parking is safe against a call starting at the same moment: the ticker
/// announces `parked` before it checks `running` one last time, and a call counts itself in
/// `running` before it checks `parked` (both sequentially consistent), so at least one of them
/// sees the other; an unpark that comes before the park makes the park return at once.
fn tick(engine: Engine, state: Arc<TickerState>) {
    let mut busy_at = Instant::now();
    while !state.stop.load(Ordering::SeqCst) {
        std::thread::sleep(EPOCH_TICK);
        engine.increment_epoch();
        if state.running.load(Ordering::SeqCst) > 0 {
            busy_at = Instant::now();
            continue;
        }
        if busy_at.elapsed() < IDLE_AFTER {
            continue;
        }
        state.parked.store(true, Ordering::SeqCst);
        if state.running.load(Ordering::SeqCst) == 0 && !state.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        state.parked.store(false, Ordering::SeqCst);
        busy_at = Instant::now();
    }
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine").finish_non_exhaustive()
    }
}

impl PluginEngine {
    /// Creates the engine and starts the epoch ticker.
    pub fn new() -> Result<Arc<Self>, PluginError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(MAX_INSTANCES)
            // A Rust component is its module plus a few small shim modules.
            .total_core_instances(MAX_INSTANCES * 4)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES * 2)
            .max_memory_size(MAX_MEMORY);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;

        let ticker = Arc::new(TickerState::default());
        let handle = {
            let engine = engine.clone();
            let state = ticker.clone();
            std::thread::Builder::new()
                .name("sluice-wasm-epoch".into())
                .spawn(move || tick(engine, state))
                .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?
        };
        let thread = handle.thread().clone();
        Ok(Arc::new(Self {
            engine,
            ticker,
            thread: Some((handle, thread)),
        }))
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Call before running plugin code; keep the guard until it returns.
    pub(crate) fn running(&self) -> Running<'_> {
        self.ticker.running.fetch_add(1, Ordering::SeqCst);
        if self.ticker.parked.load(Ordering::SeqCst) {
            if let Some((_, t)) = &self.thread {
                t.unpark();
            }
        }
        Running(self)
    }

    /// Whether the ticker is asleep (nothing ran for [`IDLE_AFTER`]).
    pub fn ticker_idle(&self) -> bool {
        self.ticker.parked.load(Ordering::SeqCst)
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        if let Some((handle, thread)) = self.thread.take() {
            thread.unpark();
            let _ = handle.join();
        }
    }
}
