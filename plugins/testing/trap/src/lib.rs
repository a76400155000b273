//! Panics on messages routed to "panic", executes `unreachable` on "unreachable", and
//! otherwise forwards while counting its own calls (so a test can see the instance was
//! rebuilt: the count starts over).

use sluice_policy_sdk::{export_policy, Host, Message, Policy, Verdict};
use std::sync::atomic::{AtomicU64, Ordering};

struct Trap {
    calls: AtomicU64,
}

impl Policy for Trap {
    fn init(_: &str) -> Result<Self, String> {
        Ok(Trap {
            calls: AtomicU64::new(0),
        })
    }

    fn evaluate(&self, msg: &dyn Message, host: &dyn Host) -> Verdict {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        match msg.routing_key().as_str() {
            "panic" => panic!("hostile_trap was asked to panic"),
            #[cfg(target_arch = "wasm32")]
            "unreachable" => core::arch::wasm32::unreachable(),
            _ => {
                host.incr("calls", 1);
                // Forward, but say how many calls this instance has seen.
                if msg.header("report").is_some() {
                    Verdict::shed(format!("instance calls={n}"))
                } else {
                    Verdict::Forward
                }
            }
        }
    }
}

export_policy!(Trap);
