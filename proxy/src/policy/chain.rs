//! The policy chain every publish walks: quotas in file order, then Wasm policies in file order.
//! The first stage that does not pass decides. Evaluation is a pure state machine: it never sleeps, it
//! returns [`Step::Wait`] and the protocol adapter holds the publish, then resumes.

use super::glob::Glob;
use super::plugin_stage::PolicyStage;
use super::verdict::{ActionSpec, Verdict, VerdictKind};
use crate::config::units::Rate;
use crate::plugin::{MessageFacts, PluginVerdict};
use crate::quota::{Admission, GlobalLimiter, Limiter};
use governor::clock::{Clock, DefaultClock};
use std::sync::Arc;
use std::time::Duration;

/// The facts about one publish that quotas match on, and the full view plugins read.
#[derive(Clone, Copy)]
pub struct PublishView<'a> {
    /// Producer identity.
    pub producer: &'a Arc<str>,
    /// Virtual host (or namespace) of the connection.
    pub vhost: &'a str,
    /// Destination exchange.
    pub exchange: &'a str,
    /// Routing key (or queue key).
    pub routing_key: &'a str,
    /// Body size in bytes.
    pub size: u64,
    /// Everything else about the message, read by policies on request.
    pub facts: Option<&'a (dyn MessageFacts + Sync)>,
}

/// Which publishes a quota applies to.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// Producer glob.
    pub producer: Option<Glob>,
    /// Vhost glob.
    pub vhost: Option<Glob>,
    /// Exchange glob.
    pub exchange: Option<Glob>,
    /// Routing key glob.
    pub routing_key: Option<Glob>,
}

impl Matcher {
    /// Whether the publish matches every given glob.
    pub fn matches(&self, v: &PublishView<'_>) -> bool {
        let ok = |g: &Option<Glob>, s: &str| g.as_ref().is_none_or(|g| g.matches(s));
        ok(&self.producer, v.producer)
            && ok(&self.vhost, v.vhost)
            && ok(&self.exchange, v.exchange)
            && ok(&self.routing_key, v.routing_key)
    }
}

/// One `[[quota]]`, ready to evaluate.
pub struct QuotaStage<C: Clock = DefaultClock> {
    /// Quota name.
    pub name: Arc<str>,
    /// Which publishes it covers.
    pub matcher: Matcher,
    /// Its buckets, keyed by producer.
    pub limiter: Arc<Limiter<C>>,
    /// Action over the limit.
    pub on_exceed: ActionSpec,
    /// Buckets of the divert's own rate, if the action has one.
    pub divert_limiter: Option<Arc<Limiter<C>>>,
    /// Count, don't act.
    pub dry_run: bool,
    /// Set for `scope = "global"`: buckets in Redis, spent through local leases (instead of
    /// `limiter`).
    pub global: Option<Arc<GlobalLimiter<C>>>,
}

impl<C: Clock + Clone> QuotaStage<C> {
    /// Build a stage with fresh buckets.
    pub fn new(
        name: &str,
        matcher: Matcher,
        messages: Option<(Rate, u64)>,
        bytes: Option<(Rate, u64)>,
        on_exceed: ActionSpec,
        dry_run: bool,
        clock: C,
    ) -> Self {
        let divert_limiter = divert_limit(&on_exceed)
            .map(|l| Arc::new(Limiter::with_clock(Some(l), None, clock.clone())));
        QuotaStage {
            name: name.into(),
            matcher,
            limiter: Arc::new(Limiter::with_clock(messages, bytes, clock)),
            on_exceed,
            divert_limiter,
            dry_run,
            global: None,
        }
    }
}

fn divert_limit(a: &ActionSpec) -> Option<(Rate, u64)> {
    match a {
        ActionSpec::Divert { limit, .. } => *limit,
        ActionSpec::Delay { then, .. } => divert_limit(then),
        _ => None,
    }
}

/// The outcome of a whole evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do with the publish.
    pub verdict: Verdict,
    /// The label it is counted under (`delay` when it was held, then forwarded).
    pub kind: VerdictKind,
    /// The quota or policy that decided, if any.
    pub by: Option<Arc<str>>,
    /// Dry-run stages that would have acted: (label, stage).
    pub would: Vec<(VerdictKind, Arc<str>)>,
}

/// One step of evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Decided.
    Done(Decision),
    /// Hold the publish this long, then call [`Chain::evaluate`] again with the same state.
    Wait(Duration),
}

/// Where an evaluation is, across holds.
#[derive(Debug, Default, Clone)]
pub struct EvalState {
    stage: usize,
    held: Duration,
    would: Vec<(VerdictKind, Arc<str>)>,
}

impl EvalState {
    /// Total time this publish has been held so far.
    pub fn held(&self) -> Duration {
        self.held
    }

    fn done(&mut self, verdict: Verdict, kind: VerdictKind, by: Option<Arc<str>>) -> Step {
        Step::Done(Decision {
            verdict,
            kind,
            by,
            would: std::mem::take(&mut self.would),
        })
    }
}

enum Gate {
    Pass,
    Final(Verdict, VerdictKind),
    Wait(Duration),
}

/// The ordered stages of one config.
pub struct Chain<C: Clock = DefaultClock> {
    quotas: Vec<QuotaStage<C>>,
    policies: Vec<PolicyStage>,
    dry_run: bool,
}

impl<C: Clock + Clone> Chain<C> {
    /// A chain of quotas; `dry_run` makes every stage count instead of act.
    pub fn new(quotas: Vec<QuotaStage<C>>, dry_run: bool) -> Self {
        Chain {
            quotas,
            policies: Vec::new(),
            dry_run,
        }
    }

    /// The same chain with policy stages after the quotas.
    pub fn with_policies(mut self, policies: Vec<PolicyStage>) -> Self {
        self.policies = policies;
        self
    }

    /// The quota stages.
    pub fn quotas(&self) -> &[QuotaStage<C>] {
        &self.quotas
    }

    /// The policy stages.
    pub fn policies(&self) -> &[PolicyStage] {
        &self.policies
    }

    /// Whether no stage can ever act (the fast path skips evaluation entirely).
    pub fn is_empty(&self) -> bool {
        self.quotas.is_empty() && self.policies.is_empty()
    }

    /// Evaluate (or resume evaluating) a publish.
    pub fn evaluate(&self, v: &PublishView<'_>, st: &mut EvalState) -> Step {
        while let Some(q) = self.quotas.get(st.stage) {
            if !q.matcher.matches(v) {
                st.stage += 1;
                continue;
            }
            let adm = match &q.global {
                Some(g) => g.check(v.producer, v.size),
                None => q.limiter.check(v.producer, v.size),
            };
            if adm == Admission::Allowed {
                st.stage += 1;
                continue;
            }
            if q.dry_run || self.dry_run {
                st.would.push((q.on_exceed.kind().would(), q.name.clone()));
                st.stage += 1;
                continue;
            }
            match self.apply(q, &q.on_exceed, adm, v, st.held) {
                Gate::Pass => st.stage += 1,
                Gate::Wait(d) => {
                    st.held += d;
                    return Step::Wait(d);
                }
                Gate::Final(verdict, kind) => return st.done(verdict, kind, Some(q.name.clone())),
            }
        }
        while let Some(p) = self.policies.get(st.stage - self.quotas.len()) {
            let Some(facts) = v.facts.filter(|_| p.matcher.matches(v)) else {
                st.stage += 1;
                continue;
            };
            let (verdict, kind) = match p.evaluate(facts).verdict {
                PluginVerdict::Forward => {
                    st.stage += 1;
                    continue;
                }
                PluginVerdict::Delay(d)
                    if st.held + d <= p.max_delay || p.dry_run || self.dry_run =>
                {
                    if p.dry_run || self.dry_run {
                        st.would.push((VerdictKind::WouldDelay, p.name.clone()));
                        st.stage += 1;
                        continue;
                    }
                    let d = d.max(Duration::from_micros(50));
                    st.held += d;
                    return Step::Wait(d);
                }
                PluginVerdict::Delay(_) => (
                    Verdict::Shed {
                        reason: format!("held longer than policy '{}' allows", p.name).into(),
                    },
                    VerdictKind::Shed,
                ),
                PluginVerdict::Shed(reason) => (
                    Verdict::Shed {
                        reason: if reason.is_empty() {
                            format!("shed by policy '{}'", p.name).into()
                        } else {
                            reason.into()
                        },
                    },
                    VerdictKind::Shed,
                ),
                PluginVerdict::Divert {
                    exchange,
                    routing_key,
                } => (
                    Verdict::Divert {
                        exchange: exchange.into(),
                        routing_key,
                        checked: false,
                    },
                    VerdictKind::Divert,
                ),
            };
            if p.dry_run || self.dry_run {
                st.would.push((kind.would(), p.name.clone()));
                st.stage += 1;
                continue;
            }
            return st.done(verdict, kind, Some(p.name.clone()));
        }
        let kind = if st.held.is_zero() {
            VerdictKind::Forward
        } else {
            VerdictKind::Delay
        };
        st.done(Verdict::Forward, kind, None)
    }

    fn apply(
        &self,
        q: &QuotaStage<C>,
        a: &ActionSpec,
        adm: Admission,
        v: &PublishView<'_>,
        held: Duration,
    ) -> Gate {
        match a {
            ActionSpec::Forward => Gate::Pass,
            ActionSpec::Shed { reason } => Gate::Final(
                Verdict::Shed {
                    reason: reason.clone(),
                },
                VerdictKind::Shed,
            ),
            ActionSpec::Delay { max, then } => match adm {
                Admission::Wait(d) if held + d <= *max => {
                    Gate::Wait(d.max(Duration::from_micros(50)))
                }
                _ => self.apply(q, then, Admission::Never, v, held),
            },
            ActionSpec::Divert { target, then, .. } => {
                let divert = || {
                    Gate::Final(
                        Verdict::Divert {
                            exchange: target.exchange.clone(),
                            routing_key: target.render(v.exchange, v.routing_key, v.producer),
                            // Only a default-exchange template names a queue per message.
                            checked: !(target.exchange.is_empty() && target.is_template()),
                        },
                        VerdictKind::Divert,
                    )
                };
                match &q.divert_limiter {
                    None => divert(),
                    Some(l) => match l.check(v.producer, v.size) {
                        Admission::Allowed => divert(),
                        adm => self.apply(q, then, adm, v, held),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::verdict::DivertTarget;
    use governor::clock::FakeRelativeClock;

    fn rate(n: u64) -> Rate {
        Rate {
            amount: n,
            per: Duration::from_secs(1),
        }
    }

    fn stage(action: ActionSpec, clock: &FakeRelativeClock) -> QuotaStage<FakeRelativeClock> {
        QuotaStage::new(
            "per-producer",
            Matcher {
                producer: Some(Glob::new("hotfix-*")),
                ..Default::default()
            },
            Some((rate(100), 2)),
            None,
            action,
            false,
            clock.clone(),
        )
    }

    fn view(p: &Arc<str>) -> PublishView<'_> {
        PublishView {
            producer: p,
            vhost: "/",
            exchange: "",
            routing_key: "celery",
            size: 2048,
            facts: None,
        }
    }

    fn run(chain: &Chain<FakeRelativeClock>, p: &Arc<str>, clock: &FakeRelativeClock) -> Decision {
        let mut st = EvalState::default();
        loop {
            match chain.evaluate(&view(p), &mut st) {
                Step::Done(d) => return d,
                Step::Wait(d) => clock.advance(d),
            }
        }
    }

    #[test]
    fn over_quota_is_shed_and_other_producers_pass() {
        let clock = FakeRelativeClock::default();
        let chain = Chain::new(
            vec![stage(
                ActionSpec::Shed {
                    reason: "over quota".into(),
                },
                &clock,
            )],
            false,
        );
        let hot: Arc<str> = "hotfix-svc".into();
        let web: Arc<str> = "web-login".into();
        assert_eq!(run(&chain, &hot, &clock).kind, VerdictKind::Forward);
        assert_eq!(run(&chain, &hot, &clock).kind, VerdictKind::Forward);
        let d = run(&chain, &hot, &clock);
        assert_eq!(d.kind, VerdictKind::Shed);
        assert_eq!(d.by.as_deref(), Some("per-producer"));
        for _ in 0..10 {
            assert_eq!(run(&chain, &web, &clock).kind, VerdictKind::Forward);
        }
    }

    #[test]
    fn delay_holds_until_tokens_then_falls_back_past_max() {
        let clock = FakeRelativeClock::default();
        let delay = ActionSpec::Delay {
            max: Duration::from_millis(25),
            then: Box::new(ActionSpec::Shed {
                reason: "held too long".into(),
            }),
        };
        let chain = Chain::new(vec![stage(delay, &clock)], false);
        let hot: Arc<str> = "hotfix-svc".into();
        run(&chain, &hot, &clock);
        run(&chain, &hot, &clock);
        let mut st = EvalState::default();
        let v = view(&hot);
        assert_eq!(
            chain.evaluate(&v, &mut st),
            Step::Wait(Duration::from_millis(10))
        );
        clock.advance(Duration::from_millis(10));
        match chain.evaluate(&v, &mut st) {
            Step::Done(d) => assert_eq!(d.kind, VerdictKind::Delay),
            other => panic!("{other:?}"),
        }
        // Three more publishes at the same instant: each waits longer; the third passes 25 ms.
        let mut waits = vec![];
        for _ in 0..3 {
            let mut st = EvalState::default();
            match chain.evaluate(&v, &mut st) {
                Step::Wait(d) => waits.push(d),
                Step::Done(d) => {
                    assert_eq!(d.kind, VerdictKind::Shed);
                    waits.push(Duration::ZERO)
                }
            }
        }
        assert_eq!(waits[0], Duration::from_millis(10));
    }

    #[test]
    fn divert_renders_target_and_its_own_rate_falls_back() {
        let clock = FakeRelativeClock::default();
        let divert = ActionSpec::Divert {
            target: DivertTarget {
                exchange: "".into(),
                routing_key: "overflow.{routing_key}".into(),
            },
            limit: Some((rate(1), 1)),
            then: Box::new(ActionSpec::Shed {
                reason: "overflow full".into(),
            }),
        };
        let chain = Chain::new(vec![stage(divert, &clock)], false);
        let hot: Arc<str> = "hotfix-svc".into();
        run(&chain, &hot, &clock);
        run(&chain, &hot, &clock);
        let d = run(&chain, &hot, &clock);
        assert_eq!(
            d.verdict,
            Verdict::Divert {
                exchange: "".into(),
                routing_key: "overflow.celery".into(),
                // A queue named per message: checked at runtime, not at load.
                checked: false,
            }
        );
        assert_eq!(run(&chain, &hot, &clock).kind, VerdictKind::Shed);
    }

    #[test]
    fn dry_run_counts_would_verdicts_and_forwards() {
        let clock = FakeRelativeClock::default();
        let chain = Chain::new(
            vec![stage(ActionSpec::Shed { reason: "x".into() }, &clock)],
            true,
        );
        let hot: Arc<str> = "hotfix-svc".into();
        let mut would = 0;
        for _ in 0..10 {
            let d = run(&chain, &hot, &clock);
            assert_eq!(d.verdict, Verdict::Forward);
            would += d.would.len();
        }
        assert_eq!(would, 8);
    }
}
