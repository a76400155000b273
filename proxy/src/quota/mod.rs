//! Quotas: token buckets keyed by producer (or any string), local to this process.

pub mod local;

pub use local::{Admission, Limiter};
