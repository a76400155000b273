//! The protocol-neutral decision: identity → quotas → (plugins) → one verdict per publish.

pub mod chain;
pub mod glob;
pub mod verdict;

pub use chain::{Chain, Decision, EvalState, PublishView, Step};
pub use verdict::{ActionSpec, DivertTarget, Verdict, VerdictKind};
