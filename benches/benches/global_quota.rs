//! Per-publish cost of a global quota (Redis leases spent locally) against a local one (governor
//! GCRA + dashmap), on the allowed path every publish under the quota takes:
//!
//! - `limiter/*`: the limiter's check alone, messages and bytes;
//! - `chain/*`: `Chain::evaluate` with one matching quota stage, local or `scope = "global"`.
//!
//! The global limiter's lease is renewed by a thread playing the coordinator (plan, then a full
//! grant every 10 ms), as the real one does from its own task; no Redis is involved, since the hot
//! path never touches it. Target: global within 10% of local.
//!
//! `cargo bench -p sluice-benches --bench global_quota`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::config::units::Rate;
use sluice::policy::chain::{Chain, EvalState, Matcher, PublishView, QuotaStage, Step};
use sluice::policy::glob::Glob;
use sluice::policy::verdict::ActionSpec;
use sluice::quota::global::lease::{Grant, Link, Tuning};
use sluice::quota::global::{FailMode, GlobalLimiter, GlobalScope};
use sluice::quota::local::Limiter;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// A rate and its burst.
type Limit = Option<(Rate, u64)>;

/// Rates no benchmark loop can reach: the quota always allows.
fn limits() -> (Limit, Limit) {
    let messages = Rate {
        amount: 1_000_000_000,
        per: Duration::from_secs(1),
    };
    let bytes = Rate {
        amount: 1 << 40,
        per: Duration::from_secs(1),
    };
    (Some((messages, 1_000_000_000)), Some((bytes, 1 << 40)))
}

fn global() -> Arc<GlobalLimiter> {
    let link = Arc::new(Link::default());
    link.set_up(true);
    let (m, b) = limits();
    Arc::new(GlobalLimiter::with_clock(
        "per-producer",
        m,
        b,
        GlobalScope {
            fail: FailMode::Open,
            instances: 1,
        },
        link,
        Tuning::default(),
        governor::clock::DefaultClock::default(),
    ))
}

/// Plays the coordinator: every 10 ms, grant every due renewal in full.
struct Renewer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Renewer {
    fn start(l: Arc<GlobalLimiter>) -> Renewer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut due = Vec::new();
            while !s.load(Relaxed) {
                l.plan(&mut due);
                for r in due.drain(..) {
                    let grants: Vec<Grant> = l
                        .parts(&r, "bench:")
                        .iter()
                        .map(|p| Grant {
                            granted: p.want.max(0),
                            wait_us: 0,
                            left: p.burst,
                        })
                        .collect();
                    l.settle(r, Some(&grants));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Renewer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stage() -> QuotaStage {
    let (m, b) = limits();
    QuotaStage::new(
        "per-producer",
        Matcher {
            producer: Some(Glob::new("*")),
            ..Default::default()
        },
        m,
        b,
        ActionSpec::Shed {
            reason: "over quota".into(),
        },
        false,
        governor::clock::DefaultClock::default(),
    )
}

fn bench(c: &mut Criterion) {
    let producer: Arc<str> = "hotfix-svc".into();
    let mut g = c.benchmark_group("global_quota");
    g.throughput(Throughput::Elements(1));

    let (m, b) = limits();
    let local = Limiter::new(m, b);
    g.bench_function("limiter/local", |bch| {
        bch.iter(|| black_box(local.check(black_box(&producer), 512)))
    });
    let gl = global();
    let _renewer = Renewer::start(gl.clone());
    // Let the first lease arrive.
    gl.check(&producer, 512);
    std::thread::sleep(Duration::from_millis(50));
    g.bench_function("limiter/global", |bch| {
        bch.iter(|| black_box(gl.check(black_box(&producer), 512)))
    });

    let view = PublishView {
        producer: &producer,
        vhost: "/",
        exchange: "",
        routing_key: "celery",
        size: 512,
        facts: None,
    };
    let run = |chain: &Chain| {
        let mut st = EvalState::default();
        match chain.evaluate(black_box(&view), &mut st) {
            Step::Done(d) => d,
            Step::Wait(_) => unreachable!("the quota always allows"),
        }
    };
    let local_chain = Chain::new(vec![stage()], false);
    g.bench_function("chain/local", |bch| {
        bch.iter(|| black_box(run(&local_chain)))
    });
    let mut s = stage();
    s.global = Some(gl.clone());
    let global_chain = Chain::new(vec![s], false);
    g.bench_function("chain/global", |bch| {
        bch.iter(|| black_box(run(&global_chain)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
