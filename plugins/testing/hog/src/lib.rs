//! Allocates without bound on messages routed to "hog"; forwards everything else.
//! The host's memory cap must stop it.

use sluice_policy_sdk::{export_policy, Host, Message, Policy, Verdict};

struct Hog;

impl Policy for Hog {
    fn init(_: &str) -> Result<Self, String> {
        Ok(Hog)
    }

    fn evaluate(&self, msg: &dyn Message, _: &dyn Host) -> Verdict {
        if msg.routing_key() == "hog" {
            // Reserve 1 MiB at a time without touching it: the linear memory grows as fast as
            // the allocator can ask, so the cap is hit long before the time budget.
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = Vec::<u8>::with_capacity(1 << 20);
                chunk.push(1);
                chunks.push(std::hint::black_box(chunk));
            }
        }
        Verdict::Forward
    }
}

export_policy!(Hog);
