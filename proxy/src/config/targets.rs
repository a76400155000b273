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
    // A Redis list or channel needs no declaring: only AMQP targets can be missing.
    for l in cfg
        .listeners
        .iter()
        .filter(|l| l.protocol == crate::protocol::Protocol::Amqp091)
    {
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

/// Divert targets decided per message (by a plugin, or a template that names a queue per
/// message) cannot be checked at load. Each distinct target is checked once on sluice's own
/// connection, and the answer cached, so a divert never ends in a 404 channel close for the
/// client: a missing target sheds the message instead, with a reason.
#[derive(Default)]
pub struct TargetCache {
    seen: dashmap::DashMap<u64, (bool, std::time::Instant)>,
}

/// How long a target known to exist is trusted.
const EXISTS_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a missing target is remembered (an operator may declare it any moment).
const MISSING_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most targets remembered.
const MAX_TARGETS: usize = 4096;

impl TargetCache {
    /// Whether `exchange` (or, on the default exchange, the queue `routing_key`) exists on the
    /// listener's broker. When the broker cannot be asked, the answer is yes: the publish goes
    /// on and the broker decides, as it would without sluice.
    pub async fn exists(
        &self,
        listener: &super::validate::ListenerConfig,
        exchange: &str,
        routing_key: &str,
    ) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &*listener.name,
            exchange,
            exchange.is_empty().then_some(routing_key),
        )
            .hash(&mut h);
        let key = h.finish();
        if let Some(e) = self.seen.get(&key) {
            let (exists, at) = *e;
            let ttl = if exists { EXISTS_TTL } else { MISSING_TTL };
            if at.elapsed() < ttl {
                return exists;
            }
        }
        let answer = match ProbeClient::connect(&listener.probe).await {
            Ok(mut c) => {
                let r = if exchange.is_empty() {
                    c.queue_depth(routing_key).await.map(|_| ())
                } else {
                    c.check_exchange(exchange).await
                };
                c.close().await;
                match r {
                    Ok(()) => Some(true),
                    Err(ProbeError::NotFound { .. }) => Some(false),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        match answer {
            Some(exists) => {
                if self.seen.len() >= MAX_TARGETS {
                    self.seen.clear();
                }
                self.seen.insert(key, (exists, std::time::Instant::now()));
                exists
            }
            None => true,
        }
    }
}
