use crate::config::Limit;
use std::time::Duration;

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very detailed.
    Trace,
    /// Diagnostic.
    Debug,
    /// Normal operation.
    Info,
    /// Something an operator should look at.
    Warn,
    /// Something failed.
    Error,
}

/// Broker signals, as the proxy last observed them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerSignals {
    /// True while any upstream connection is blocked by the broker (memory or disk alarm).
    pub upstream_blocked: bool,
    /// Number of upstream connections currently blocked.
    pub blocked_connections: u32,
    /// Smoothed publisher-confirm latency in milliseconds (0 when unknown).
    pub confirm_latency_ms: f64,
    /// Smoothed fraction of publishes nacked by the broker, 0.0 to 1.0.
    pub nack_rate: f64,
}

/// What the proxy grants a policy. In a plugin this is [`WasmHost`]; in tests,
/// [`crate::testing::FakeHost`].
pub trait Host {
    /// Takes one token from the bucket `key` (created on first use, shared by every instance of
    /// this policy, kept across reloads). False when the bucket is empty.
    fn try_acquire(&self, key: &str, limit: Limit) -> bool;
    /// Recent rate of `try_acquire` calls on `key` (granted or not), per second.
    fn rate(&self, key: &str) -> f64;
    /// Adds `delta` to a named counter (a metric `sluice_plugin_events_total{policy,name}`).
    /// Use a small, fixed set of names.
    fn incr(&self, name: &str, delta: u64);
    /// Current broker signals.
    fn signals(&self) -> BrokerSignals;
    /// Depth of a queue the proxy polls, if configured.
    fn queue_depth(&self, queue: &str) -> Option<u64>;
    /// Monotonic time since an arbitrary origin.
    fn now(&self) -> Duration;
    /// Writes to the proxy's log under this policy's name (rate limited by the proxy).
    fn log(&self, level: Level, message: &str);
}

/// The real host, through the plugin's imports. Only functional inside a plugin.
#[derive(Debug, Clone, Copy, Default)]
pub struct WasmHost;

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::bindings::sluice::policy::host as wit;

    impl Host for WasmHost {
        fn try_acquire(&self, key: &str, limit: Limit) -> bool {
            wit::try_acquire(key, limit.per_second, limit.burst)
        }
        fn rate(&self, key: &str) -> f64 {
            wit::rate(key)
        }
        fn incr(&self, name: &str, delta: u64) {
            wit::incr(name, delta)
        }
        fn signals(&self) -> BrokerSignals {
            let s = wit::signals();
            BrokerSignals {
                upstream_blocked: s.upstream_blocked,
                blocked_connections: s.blocked_connections,
                confirm_latency_ms: s.confirm_latency_ms,
                nack_rate: s.nack_rate,
            }
        }
        fn queue_depth(&self, queue: &str) -> Option<u64> {
            wit::queue_depth(queue)
        }
        fn now(&self) -> Duration {
            Duration::from_nanos(wit::now_ns())
        }
        fn log(&self, level: Level, message: &str) {
            let level = match level {
                Level::Trace => wit::Level::Trace,
                Level::Debug => wit::Level::Debug,
                Level::Info => wit::Level::Info,
                Level::Warn => wit::Level::Warn,
                Level::Error => wit::Level::Error,
            };
            wit::log(level, message)
        }
    }
}

/// Outside a plugin there is no proxy to ask: every call panics. Use
/// [`crate::testing::FakeHost`] in tests.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;

    const NATIVE: &str = "WasmHost only works inside a plugin; use testing::FakeHost in tests";

    impl Host for WasmHost {
        fn try_acquire(&self, _: &str, _: Limit) -> bool {
            panic!("{NATIVE}")
        }
        fn rate(&self, _: &str) -> f64 {
            panic!("{NATIVE}")
        }
        fn incr(&self, _: &str, _: u64) {
            panic!("{NATIVE}")
        }
        fn signals(&self) -> BrokerSignals {
            panic!("{NATIVE}")
        }
        fn queue_depth(&self, _: &str) -> Option<u64> {
            panic!("{NATIVE}")
        }
        fn now(&self) -> Duration {
            panic!("{NATIVE}")
        }
        fn log(&self, _: Level, _: &str) {
            panic!("{NATIVE}")
        }
    }
}
