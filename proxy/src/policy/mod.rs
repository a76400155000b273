//! The protocol-neutral decision: identity → quotas → plugins → one verdict per publish.

pub mod chain;
pub mod glob;
pub mod plugin_stage;
pub mod verdict;

pub use chain::{Chain, Decision, EvalState, PublishView, Step};
pub use plugin_stage::PolicyStage;
pub use verdict::{ActionSpec, DivertTarget, Verdict, VerdictKind};
