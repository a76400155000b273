//! Glue used by [`crate::export_policy!`]; not part of the API.
#![allow(missing_docs)]

#[cfg(target_arch = "wasm32")]
pub use imp::*;

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::bindings::exports::sluice::policy::policy as exports;
    use crate::bindings::sluice::policy::types::{self as wit, DivertTarget};
    use crate::{Policy, Verdict, WasmHost};
    use std::sync::OnceLock;

    pub use crate::bindings::export;
    pub use exports::Guest;
    pub use wit::{Message as WitMessage, Verdict as WitVerdict};

    pub fn init<P: Policy>(cell: &OnceLock<P>, config: &str) -> Result<(), String> {
        let policy = P::init(config)?;
        cell.set(policy)
            .map_err(|_| "init called twice on one instance".to_string())
    }

    pub fn evaluate<P: Policy>(cell: &OnceLock<P>, msg: &WitMessage) -> WitVerdict {
        match cell.get() {
            Some(p) => to_wit(p.evaluate(msg, &WasmHost)),
            // The host always calls init first; refuse rather than guess.
            None => WitVerdict::Shed("policy not initialised".to_string()),
        }
    }

    pub fn evaluate_batch<P: Policy>(cell: &OnceLock<P>, msgs: Vec<WitMessage>) -> Vec<WitVerdict> {
        msgs.iter().map(|m| evaluate(cell, m)).collect()
    }

    fn to_wit(v: Verdict) -> WitVerdict {
        match v {
            Verdict::Forward => WitVerdict::Forward,
            Verdict::Delay(d) => WitVerdict::Delay(d.as_millis().min(u128::from(u32::MAX)) as u32),
            Verdict::Shed(reason) => WitVerdict::Shed(reason),
            Verdict::Divert {
                exchange,
                routing_key,
            } => WitVerdict::Divert(DivertTarget {
                exchange,
                routing_key,
            }),
        }
    }
}
