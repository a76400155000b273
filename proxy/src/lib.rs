//! sluice: a broker-protection proxy. For every message a producer publishes it names the
//! producer, checks its quotas, and forwards, delays, sheds or diverts it; everything else passes
//! through untouched.
//!
//! The path of a publish, one module each: [`protocol::amqp::frame`] (split) →
//! [`session::inbound`](session) (assemble) → [`identity`] → [`policy::chain`] (quotas) →
//! [`policy::verdict`] → [`protocol::amqp::reply`] (injected frames) or forward.
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod identity;
pub mod listener;
pub mod plugin;
pub mod policy;
pub mod protocol;
pub mod quota;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod top;

pub use server::Server;
