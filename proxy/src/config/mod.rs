//! Configuration: the file as written ([`model`]), its units ([`units`]), and the validated,
//! immutable [`Config`] the running proxy uses ([`validate`]).

pub mod model;
pub mod policies;
pub mod targets;
pub mod units;
pub mod validate;

pub use validate::{load, parse, Config, Problem, Report};
