//! Quotas: token buckets keyed by producer (or any string), local to this process
//! ([`local`]) or shared by every sidecar through Redis with local leases ([`global`]).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod global;
pub mod local;

pub use global::{Coordinator, GlobalLimiter};
pub use local::{Admission, Limiter};
