//! The example policies, built as plugins (`make plugins`), load in the real host and decide
//! through the real host calls: token buckets, counters, broker signals, queue depths.

use serde_json::json;
use sluice::plugin::cli::JsonMessage;
use sluice::plugin::{
    MessageFacts, PluginEngine, PluginShared, PluginVerdict, Policy, PolicySettings,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A built plugin; fails (never skips) when it is missing.
fn plugin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make plugins`",
        path.display()
    );
    path
}

fn msg(v: serde_json::Value) -> JsonMessage {
    serde_json::from_value(v).expect("test message")
}

fn celery(task: &str) -> JsonMessage {
    msg(json!({
        "producer": "web",
        "routing_key": "celery",
        "properties": { "content_type": "application/json", "priority": 0 },
        "headers": { "task": task, "id": "3f5a8e2c-0d41-4f1b-9a53-8a4c9e0e1b7d" },
        "body": "[[], {}, {}]"
    }))
}

fn load(name: &str, config: serde_json::Value, shared: &Arc<PluginShared>) -> Arc<Policy> {
    let engine = PluginEngine::new().expect("engine");
    let mut settings = PolicySettings::new(name, config.to_string());
    // These tests are about decisions, not time budgets: a loaded CI machine must not trip one.
    settings.time_budget = Duration::from_secs(2);
    Policy::load(&engine, &plugin(name), settings, shared).expect("plugin loads")
}

fn forwarded(p: &Policy, m: &dyn MessageFacts, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            let e = p.evaluate(m);
            assert_eq!(e.error, None);
            e.verdict == PluginVerdict::Forward
        })
        .count()
}

#[test]
fn celery_task_quota_limits_reports_while_auth_passes() {
    let shared = PluginShared::new();
    let config = json!({
        "default": "1000/s",
        "limits": [{ "match": "reports.*", "rate": "5/m burst 5" }],
        "critical": ["auth.*"]
    });
    let p = load("celery_task_quota", config, &shared);
    assert_eq!(forwarded(&p, &celery("reports.rebuild"), 50), 5);
    assert_eq!(forwarded(&p, &celery("auth.login"), 2000), 2000);
    assert_eq!(
        shared.counters("celery_task_quota"),
        vec![("limited".to_string(), 45)]
    );

    // Batches decide exactly as single calls do, in order.
    let (r, a) = (celery("reports.rebuild"), celery("auth.login"));
    let out = p.evaluate_batch(&[&r, &a, &r, &a]);
    let verdicts: Vec<bool> = out
        .iter()
        .map(|e| e.verdict == PluginVerdict::Forward)
        .collect();
    assert_eq!(verdicts, [false, true, false, true]);

    // Buckets belong to the policy name and survive a reload of the plugin.
    let reloaded = load(
        "celery_task_quota",
        json!({ "limits": [{ "match": "reports.*", "rate": "5/m burst 5" }] }),
        &shared,
    );
    assert_eq!(forwarded(&reloaded, &celery("reports.rebuild"), 10), 0);
}

#[test]
fn overflow_divert_sends_the_excess_to_the_overflow_queue() {
    let shared = PluginShared::new();
    let p = load("overflow_divert", json!({ "rate": "2/s burst 2" }), &shared);
    let m = celery("mail.send");
    let out: Vec<PluginVerdict> = (0..4).map(|_| p.evaluate(&m).verdict).collect();
    assert_eq!(out[0], PluginVerdict::Forward);
    assert_eq!(out[1], PluginVerdict::Forward);
    assert_eq!(
        out[2],
        PluginVerdict::Divert {
            exchange: String::new(),
            routing_key: "overflow.celery".into()
        }
    );
}

#[test]
fn priority_shed_reads_broker_signals_from_the_host() {
    let shared = PluginShared::new();
    let p = load(
        "priority_shed",
        json!({ "critical": ["auth.*"], "queues": { "celery": 100 } }),
        &shared,
    );
    let low = celery("reports.rebuild");
    assert_eq!(p.evaluate(&low).verdict, PluginVerdict::Forward);

    shared.signals().set_queue_depth("celery", 5000);
    assert!(
        matches!(p.evaluate(&low).verdict, PluginVerdict::Shed(r) if r.contains("queue celery"))
    );
    shared.signals().set_queue_depth("celery", 0);

    shared.signals().add_blocked_connections(1);
    assert!(
        matches!(p.evaluate(&low).verdict, PluginVerdict::Shed(r) if r.contains("upstream blocked"))
    );
    assert_eq!(
        p.evaluate(&celery("auth.login")).verdict,
        PluginVerdict::Forward
    );
    shared.signals().add_blocked_connections(-1);
    assert_eq!(p.evaluate(&low).verdict, PluginVerdict::Forward);
}

#[test]
fn broker_pressure_tightens_on_slow_confirms() {
    let shared = PluginShared::new();
    let p = load(
        "broker_pressure",
        json!({ "rate": "100/h burst 100", "target_latency_ms": 50 }),
        &shared,
    );
    let m = celery("orders.confirm");
    assert_eq!(forwarded(&p, &m, 100), 100);

    // Confirms ten times slower than the target: a tenth of the rate and burst, already used.
    for _ in 0..100 {
        shared
            .signals()
            .record_confirm(Duration::from_millis(500), true);
    }
    let out = p.evaluate(&m);
    assert!(
        matches!(out.verdict, PluginVerdict::Delay(d) if d == Duration::from_millis(100)),
        "{out:?}"
    );
    let counters = shared.counters("broker_pressure");
    assert!(
        counters.iter().any(|(n, v)| n == "tightened" && *v >= 1),
        "{counters:?}"
    );
}
