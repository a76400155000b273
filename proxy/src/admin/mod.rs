//! The operations surface: Prometheus metrics and the admin HTTP API.

pub mod events;
pub mod histogram;
pub mod http;
pub mod metrics;

pub use metrics::{ListenerStats, Metrics, ProducerStats};
