//! Divert targets are checked against the broker at load (passive declare on sluice's own
//! connection): a missing exchange would close the client's channel with 404, a missing queue
//! would silently drop diverted messages.

use super::validate::{Config, Problem};
use crate::protocol::amqp::client::{ProbeClient, ProbeError};

/// Outcome of checking every divert target.
#[derive(Debug, Default)]
pub struct TargetCheck {
    /// Targets that do not exist (errors).
    pub problems: Vec<Problem>,
    /// Checks that could not run (broker unreachable): warnings.
    pub skipped: Vec<String>,
}

/// Check every divert target of every quota against each listener's broker.
pub async fn check_divert_targets(cfg: &Config) -> TargetCheck {
    let mut out = TargetCheck::default();
    let targets: Vec<_> = cfg
        .quotas
        .iter()
        .flat_map(|q| {
            q.on_exceed
                .divert_targets()
                .into_iter()
                .map(move |t| (q, t.clone()))
        })
        .collect();
    if targets.is_empty() {
        return out;
    }
    for l in &cfg.listeners {
        let mut client = match ProbeClient::connect(&l.probe).await {
            Ok(c) => c,
            Err(e) => {
                out.skipped.push(format!(
                    "listener '{}': divert targets not checked, broker {} not reachable: {e}",
                    l.name, l.upstream.addr
                ));
                continue;
            }
        };
        for (q, t) in &targets {
            let result = if !t.exchange.is_empty() {
                client.check_exchange(&t.exchange).await
            } else if t.is_template() {
                // Default exchange with a per-message queue name: the queue cannot be checked
                // here; the operator must declare every overflow queue the template can produce.
                Ok(())
            } else {
                client.queue_depth(&t.routing_key).await.map(|_| ())
            };
            match result {
                Ok(()) => {}
                Err(e @ ProbeError::NotFound { .. }) => out.problems.push(Problem {
                    line: Some(q.line),
                    message: format!(
                        "quota '{}': divert target {e} (listener '{}'); declare it or change the target",
                        q.name, l.name
                    ),
                }),
                Err(e) => out.skipped.push(format!(
                    "quota '{}': divert target not checked on listener '{}': {e}",
                    q.name, l.name
                )),
            }
        }
        client.close().await;
    }
    out
}
