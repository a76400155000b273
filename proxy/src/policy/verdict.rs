//! Verdicts and the configured actions that produce them.

use std::sync::Arc;
use std::time::Duration;

use crate::config::units::Rate;

/// What happens to one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass unchanged.
    Forward,
    /// Refuse: nack, return, drop or channel close, depending on the protocol and settings.
    Shed {
        /// Why, shown to the client where the protocol allows.
        reason: Arc<str>,
    },
    /// Publish to another destination.
    Divert {
        /// New exchange.
        exchange: Arc<str>,
        /// New routing key (templates already applied).
        routing_key: String,
        /// Whether the target was checked against the broker when the config was loaded
        /// (otherwise it is checked, once, before the first message goes there).
        checked: bool,
    },
}

/// The verdict labels used in metrics. `Delay` is a verdict that ends in one of the others; it is
/// counted on its own when a publish was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerdictKind {
    /// Forwarded unchanged.
    Forward,
    /// Held, then forwarded.
    Delay,
    /// Shed.
    Shed,
    /// Diverted.
    Divert,
    /// Dry run: would have been held.
    WouldDelay,
    /// Dry run: would have been shed.
    WouldShed,
    /// Dry run: would have been diverted.
    WouldDivert,
}

impl VerdictKind {
    /// Every kind, in metric order.
    pub const ALL: [VerdictKind; 7] = [
        VerdictKind::Forward,
        VerdictKind::Delay,
        VerdictKind::Shed,
        VerdictKind::Divert,
        VerdictKind::WouldDelay,
        VerdictKind::WouldShed,
        VerdictKind::WouldDivert,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Forward => "forward",
            VerdictKind::Delay => "delay",
            VerdictKind::Shed => "shed",
            VerdictKind::Divert => "divert",
            VerdictKind::WouldDelay => "would_delay",
            VerdictKind::WouldShed => "would_shed",
            VerdictKind::WouldDivert => "would_divert",
        }
    }

    /// The dry-run counterpart.
    pub fn would(self) -> VerdictKind {
        match self {
            VerdictKind::Delay => VerdictKind::WouldDelay,
            VerdictKind::Shed => VerdictKind::WouldShed,
            VerdictKind::Divert => VerdictKind::WouldDivert,
            other => other,
        }
    }
}

/// Where a divert sends a publish. The routing key may contain `{routing_key}`, `{exchange}` and
/// `{producer}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DivertTarget {
    /// Target exchange.
    pub exchange: Arc<str>,
    /// Routing key template.
    pub routing_key: String,
}

impl DivertTarget {
    /// Whether the routing key depends on the message.
    pub fn is_template(&self) -> bool {
        self.routing_key.contains('{')
    }

    /// The routing key for one publish.
    pub fn render(&self, exchange: &str, routing_key: &str, producer: &str) -> String {
        if !self.is_template() {
            return self.routing_key.clone();
        }
        self.routing_key
            .replace("{routing_key}", routing_key)
            .replace("{exchange}", exchange)
            .replace("{producer}", producer)
    }
}

/// A configured reaction to a publish over a limit.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionSpec {
    /// Let it through anyway.
    Forward,
    /// Refuse it.
    Shed {
        /// Reason shown to the client.
        reason: Arc<str>,
    },
    /// Wait for tokens up to `max` (reading from the client paced), then `then`.
    Delay {
        /// Longest hold.
        max: Duration,
        /// Fallback when the hold would be longer.
        then: Box<ActionSpec>,
    },
    /// Publish elsewhere, optionally at a bounded rate of its own.
    Divert {
        /// Destination.
        target: DivertTarget,
        /// The divert's own rate and burst; past it `then` applies.
        limit: Option<(Rate, u64)>,
        /// Action past the divert's own rate.
        then: Box<ActionSpec>,
    },
}

impl ActionSpec {
    /// The verdict label this action ends in when it is taken at once.
    pub fn kind(&self) -> VerdictKind {
        match self {
            ActionSpec::Forward => VerdictKind::Forward,
            ActionSpec::Shed { .. } => VerdictKind::Shed,
            ActionSpec::Delay { .. } => VerdictKind::Delay,
            ActionSpec::Divert { .. } => VerdictKind::Divert,
        }
    }

    /// Every divert target this action can reach.
    pub fn divert_targets(&self) -> Vec<&DivertTarget> {
        match self {
            ActionSpec::Forward | ActionSpec::Shed { .. } => vec![],
            ActionSpec::Delay { then, .. } => then.divert_targets(),
            ActionSpec::Divert { target, then, .. } => {
                let mut v = vec![target];
                v.extend(then.divert_targets());
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divert_templates_render_per_message() {
        let t = DivertTarget {
            exchange: "".into(),
            routing_key: "overflow.{routing_key}".into(),
        };
        assert!(t.is_template());
        assert_eq!(t.render("", "celery", "hotfix"), "overflow.celery");
    }
}
