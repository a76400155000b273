//! The protocol-neutral decision: identity → quotas → plugins → one verdict per publish.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod chain;
pub mod glob;
pub mod plugin_stage;
pub mod verdict;

pub use chain::{Chain, Decision, EvalState, PublishView, Step};
pub use plugin_stage::PolicyStage;
pub use verdict::{ActionSpec, DivertTarget, Verdict, VerdictKind};
