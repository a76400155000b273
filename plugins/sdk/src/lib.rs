//! Write sluice policy plugins in Rust.
//!
//! A policy is a type that implements [`Policy`]: built once from its JSON config, then asked
//! for a [`Verdict`] on each published message. [`export_policy!`] turns it into a plugin:
//!
//! ```
//! use sluice_policy_sdk::{export_policy, Host, Limit, Message, Policy, Verdict};
//!
//! struct PerProducer {
//!     limit: Limit,
//! }
//!
//! impl Policy for PerProducer {
//!     fn init(config: &str) -> Result<Self, String> {
//!         let limit = if config.is_empty() { "100/s" } else { config.trim_matches('"') };
//!         Ok(Self { limit: limit.parse()? })
//!     }
//!
//!     fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
//!         if host.try_acquire(&msg.producer(), self.limit) {
//!             Verdict::Forward
//!         } else {
//!             Verdict::shed("over the per-producer limit")
//!         }
//!     }
//! }
//!
//! export_policy!(PerProducer);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2` and point a `[[policy]]` at the
//! `.wasm`. Because the logic only sees the [`Message`] and [`Host`] traits, it is unit-tested
//! natively with [`testing::FakeMessage`] and [`testing::FakeHost`].
//!
//! Each proxy worker thread runs its own instance of the plugin, so state kept in the policy
//! value is per instance. Anything that must be shared (rates, quotas, totals) belongs in the
//! host: [`Host::try_acquire`], [`Host::rate`], [`Host::incr`].
#![warn(missing_docs)]

mod config;
mod glob;
mod host;
mod message;
pub mod testing;
mod verdict;

#[doc(hidden)]
pub mod __private;
#[doc(hidden)]
pub mod bindings;

pub use config::{parse_config, Action, Limit};
pub use glob::glob_match;
pub use host::{BrokerSignals, Host, Level, WasmHost};
pub use message::Message;
pub use verdict::Verdict;

/// A policy: built from its config, then asked about each message.
///
/// `Send + Sync` because the plugin keeps it in a static; plain data always is.
pub trait Policy: Send + Sync + Sized + 'static {
    /// Builds the policy from its config (the `config` of its `[[policy]]` as JSON; empty when
    /// none is given). An `Err` rejects the config at load with that message.
    fn init(config: &str) -> Result<Self, String>;

    /// Decides one message.
    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict;
}

/// Exports a [`Policy`] type as the plugin's implementation of `sluice:policy/policy`.
///
/// Invoke once, at the crate root of a `cdylib` built for `wasm32-wasip2`. On other targets it
/// expands to nothing, so the same crate also builds and tests natively.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static POLICY: ::std::sync::OnceLock<$policy> = ::std::sync::OnceLock::new();

            struct Export;

            impl $crate::__private::Guest for Export {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$policy>(&POLICY, &config)
                }

                fn evaluate(msg: &$crate::__private::WitMessage) -> $crate::__private::WitVerdict {
                    $crate::__private::evaluate::<$policy>(&POLICY, msg)
                }

                fn evaluate_batch(
                    msgs: ::std::vec::Vec<$crate::__private::WitMessage>,
                ) -> ::std::vec::Vec<$crate::__private::WitVerdict> {
                    $crate::__private::evaluate_batch::<$policy>(&POLICY, msgs)
                }
            }

    $crate::__private::export!(Export with_types_in $crate::bindings);
        };
        // Natively nothing is exported; this keeps the policy type "used" for the compiler.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(&str) -> ::std::result::Result<$policy, ::std::string::String> =
            <$policy as $crate::Policy>::init;
    };
}
