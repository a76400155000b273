//! Loops forever on messages routed to "spin"; forwards everything else.
//! The host's time budget must stop it.

use sluice_policy_sdk::{export_policy, Host, Message, Policy, Verdict};

struct Spin;

impl Policy for Spin {
    fn init(_: &str) -> Result<Self, String> {
        Ok(Spin)
    }

    fn evaluate(&self, msg: &dyn Message, _: &dyn Host) -> Verdict {
        if msg.routing_key() == "spin" {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Verdict::Forward
    }
}

export_policy!(Spin);
