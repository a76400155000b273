//! Quotas: token buckets keyed by producer (or any string), local to this process
//! ([`local`]) or shared by every sidecar through Redis with local leases ([`global`]).

pub mod global;
pub mod local;

pub use global::{Coordinator, GlobalLimiter};
pub use local::{Admission, Limiter};
