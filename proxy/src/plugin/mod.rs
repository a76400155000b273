//! Wasm policy plugins: sandboxed components that decide a verdict for each publish.
//!
//! A plugin implements the `sluice:policy@0.1.0` WIT package (`wit/` at the repository root;
//! authors use the `sluice-policy-sdk` crate in `plugins/`). The proxy holds:
//!
//! - one [`PluginEngine`] per process: the wasmtime engine (pooling allocator, epoch
//!   interruption) and the thread that ticks epochs;
//! - one [`PluginShared`] per process: what survives reloads (token buckets, plugin counters,
//!   broker [`Signals`]);
//! - one [`Policy`] per loaded plugin version: compiled once, with a pool of long-lived
//!   instances, one per thread evaluating at the same time.
//!
//! [`Policy::evaluate`] never fails: a trap, a time-budget overrun or the memory cap gives the
//! policy's [`FailMode`] verdict, is counted in [`PolicyStats`], and the instance is replaced.
//! After `max_errors` errors within `error_window` the policy disables itself: every later
//! evaluation returns the fail verdict without running the plugin, and the caller should roll
//! back to the last good version.
//!
//! The message is not copied into the plugin: the guest gets a handle and asks for the fields it
//! needs, which are answered from the caller's [`MessageFacts`] during the call.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod bindings;
mod bucket;
pub mod cli;
mod error;
mod host;
mod limits;
mod policy;
mod shared;
mod signals;
mod stats;
mod wasi;

pub use error::{ErrorKind, PluginError};
pub use host::PluginEngine;
pub use limits::{FailMode, PolicySettings, MAX_MEMORY};
pub use policy::{sha256_hex, Policy};
pub use shared::PluginShared;
pub use signals::{BrokerSignals, Signals};
pub use stats::{render_prometheus, PolicyStats};

use std::time::Duration;

/// The version of the WIT package this host implements; a plugin must export
/// `sluice:policy/policy@` this version.
pub const WIT_VERSION: &str = "0.1.0";

/// A protocol-neutral view of one publish, implemented by each protocol adapter. The plugin
/// reads fields through it on request; nothing is copied up front.
pub trait MessageFacts {
    /// Wire protocol, e.g. `"amqp091"`.
    fn protocol(&self) -> &str;
    /// The producer's identity.
    fn producer(&self) -> &str;
    /// Virtual host ("" where the protocol has none).
    fn vhost(&self) -> &str;
    /// Authenticated user.
    fn user(&self) -> Option<&str>;
    /// Client address `ip:port`.
    fn peer(&self) -> Option<String>;
    /// A client property from the handshake (AMQP `client_properties`).
    fn client_property(&self, name: &str) -> Option<String>;
    /// Destination exchange.
    fn exchange(&self) -> &str;
    /// Routing key.
    fn routing_key(&self) -> &str;
    /// A message property by name: `content_type`, `app_id`, `user_id`, `priority`,
    /// `message_id`, `delivery_mode`, ...
    fn property(&self, name: &str) -> Option<String>;
    /// An application header rendered as text.
    fn header(&self, name: &str) -> Option<String>;
    /// Names of all application headers.
    fn header_names(&self) -> Vec<String>;
    /// Body size in bytes.
    fn body_size(&self) -> u64;
    /// Up to `len` body bytes from `offset` (empty past the end). Only called when the plugin
    /// asks for the body.
    fn body(&self, offset: u64, len: u32) -> Vec<u8>;
}

/// A plugin's decision on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginVerdict {
    /// Pass to the next policy.
    Forward,
    /// Hold the producer for up to this long.
    Delay(Duration),
    /// Refuse, with a reason.
    Shed(String),
    /// Publish elsewhere.
    Divert {
        /// Target exchange.
        exchange: String,
        /// Target routing key.
        routing_key: String,
    },
}

/// The outcome of evaluating one message: the verdict to apply and, when the plugin failed, why
/// (the verdict is then the policy's fail verdict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The verdict to apply.
    pub verdict: PluginVerdict,
    /// Set when the plugin did not decide: the verdict is the fail-mode verdict.
    pub error: Option<ErrorKind>,
}
