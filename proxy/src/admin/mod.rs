//! The operations surface: Prometheus metrics and the admin HTTP API.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod events;
pub mod histogram;
pub mod http;
pub mod metrics;

pub use metrics::{ListenerStats, Metrics, ProducerStats};
