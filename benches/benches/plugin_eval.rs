//! Cost of one policy-plugin evaluation: `celery_task_quota` on a Celery task publish, one
//! message per call and 64 per call (`evaluate_batch`). Criterion reports time per message
//! (throughput is in messages).
//!
//! `make plugins && cargo bench -p sluice-benches --bench plugin_eval`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice::plugin::{MessageFacts, PluginEngine, PluginShared, Policy, PolicySettings};
use sluice_benches::celery::CeleryMessage;
use sluice_benches::plugin_path;
use std::hint::black_box;
use std::sync::Arc;

const CONFIG: &str = r#"{
    "default": "1000000000/s",
    "limits": [{"match": "reports.*", "rate": "5/s"}, {"match": "mail.*", "rate": "500/s"}],
    "critical": ["auth.*", "payments.*"]
}"#;

const BATCH: usize = 64;

fn load() -> Arc<Policy> {
    let engine = PluginEngine::new().expect("engine");
    let shared = PluginShared::new();
    let settings = PolicySettings::new("celery-tasks", CONFIG);
    Policy::load(
        &engine,
        &plugin_path("celery_task_quota"),
        settings,
        &shared,
    )
    .expect("load")
}

fn bench(c: &mut Criterion) {
    let policy = load();
    let mut g = c.benchmark_group("celery_task_quota");
    g.throughput(Throughput::Elements(1));

    // Under its limit: header read, pattern match, one token taken, forward.
    let forward = CeleryMessage::new("orders.confirm");
    g.bench_function("single/forward", |b| {
        b.iter(|| black_box(policy.evaluate(black_box(&forward))))
    });
    // Critical: header read and pattern match only.
    let critical = CeleryMessage::new("auth.login");
    g.bench_function("single/critical", |b| {
        b.iter(|| black_box(policy.evaluate(black_box(&critical))))
    });
    // Over its limit: the shed reason is formatted and copied out.
    let limited = CeleryMessage::new("reports.rebuild");
    g.bench_function("single/shed", |b| {
        b.iter(|| black_box(policy.evaluate(black_box(&limited))))
    });

    g.throughput(Throughput::Elements(BATCH as u64));
    let tasks = [
        "orders.confirm",
        "auth.login",
        "mail.send",
        "reports.rebuild",
    ];
    let msgs: Vec<CeleryMessage> = (0..BATCH)
        .map(|i| CeleryMessage::new(tasks[i % tasks.len()]))
        .collect();
    let refs: Vec<&dyn MessageFacts> = msgs.iter().map(|m| m as &dyn MessageFacts).collect();
    g.bench_function("batch64/mixed", |b| {
        b.iter(|| black_box(policy.evaluate_batch(black_box(&refs))))
    });
    let same: Vec<&dyn MessageFacts> = (0..BATCH).map(|_| &forward as &dyn MessageFacts).collect();
    g.bench_function("batch64/forward", |b| {
        b.iter_batched(
            || (),
            |()| black_box(policy.evaluate_batch(&same)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
