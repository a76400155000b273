//! The plugin sandbox holds against hostile plugins (built by `make plugins` from
//! `plugins/testing/`): a loop is stopped within its time budget, unbounded allocation hits the
//! memory cap, a trap is contained and the instance rebuilt, escape attempts get nothing, other
//! threads keep evaluating meanwhile, and a policy that keeps failing disables itself.

use serde_json::json;
use sluice::plugin::cli::JsonMessage;
use sluice::plugin::{
    ErrorKind, FailMode, PluginEngine, PluginError, PluginShared, PluginVerdict, Policy,
    PolicySettings,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

fn routed(key: &str) -> JsonMessage {
    msg(json!({ "producer": "test", "routing_key": key }))
}

fn settings(name: &str, fail: FailMode) -> PolicySettings {
    let mut s = PolicySettings::new(name, "");
    s.fail = fail;
    // Generous unless a test is about the budget: a loaded CI machine must not trip it.
    s.time_budget = Duration::from_secs(1);
    s
}

fn load(name: &str, s: PolicySettings) -> Arc<Policy> {
    let engine = PluginEngine::new().expect("engine");
    let shared = PluginShared::new();
    Policy::load(&engine, &plugin(name), s, &shared).expect("plugin loads")
}

#[test]
fn infinite_loop_is_stopped_within_its_budget_and_gets_the_fail_verdict() {
    let mut s = settings("spin", FailMode::Closed);
    s.time_budget = Duration::from_millis(20);
    let policy = load("hostile_spin", s);

    let start = Instant::now();
    let e = policy.evaluate(&routed("spin"));
    let took = start.elapsed();
    assert_eq!(e.error, Some(ErrorKind::Timeout));
    assert!(matches!(e.verdict, PluginVerdict::Shed(_)), "{e:?}");
    // The whole budget and at most one epoch tick more; the upper bound leaves room for a
    // busy CI machine descheduling the thread.
    assert!(took >= Duration::from_millis(20), "stopped early: {took:?}");
    assert!(took < Duration::from_millis(250), "stopped late: {took:?}");

    // The next call runs on a fresh instance and works.
    let e = policy.evaluate(&routed("ok"));
    assert_eq!(e.error, None);
    assert_eq!(e.verdict, PluginVerdict::Forward);
    assert_eq!(policy.stats().errors(ErrorKind::Timeout), 1);
}

/// The epoch ticker sleeps while no plugin code runs (an idle sidecar is not woken 1,000 times a
/// second), and a call that starts while it sleeps wakes it: a loop is still stopped in time.
#[test]
fn the_ticker_sleeps_when_idle_and_a_loop_that_wakes_it_is_still_stopped() {
    let engine = PluginEngine::new().expect("engine");
    let mut s = settings("spin", FailMode::Closed);
    s.time_budget = Duration::from_millis(20);
    let policy = Policy::load(&engine, &plugin("hostile_spin"), s, &PluginShared::new())
        .expect("plugin loads");
    for round in 0..3 {
        let idle_by = Instant::now() + Duration::from_secs(5);
        while !engine.ticker_idle() {
            assert!(
                Instant::now() < idle_by,
                "round {round}: the ticker never went idle"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let start = Instant::now();
        let e = policy.evaluate(&routed("spin"));
        let took = start.elapsed();
        assert_eq!(e.error, Some(ErrorKind::Timeout), "round {round}: {e:?}");
        assert!(
            took < Duration::from_millis(250),
            "round {round}: stopped late: {took:?}"
        );
    }
    assert_eq!(policy.stats().errors(ErrorKind::Timeout), 3);
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let mut s = settings("hog", FailMode::Open);
    s.memory_limit = 8 << 20;
    s.time_budget = Duration::from_secs(2);
    let policy = load("hostile_hog", s);

    let e = policy.evaluate(&routed("hog"));
    assert_eq!(e.error, Some(ErrorKind::Memory));
    assert_eq!(e.verdict, PluginVerdict::Forward);
    let e = policy.evaluate(&routed("ok"));
    assert_eq!(e.error, None);
    assert_eq!(policy.stats().errors(ErrorKind::Memory), 1);
}

#[test]
fn trap_is_contained_and_the_instance_rebuilt() {
    let policy = load("hostile_trap", settings("trap", FailMode::Open));
    let report = || msg(json!({ "routing_key": "ok", "headers": { "report": "1" } }));
    let calls = |e: sluice::plugin::Evaluation| match e.verdict {
        PluginVerdict::Shed(s) => s,
        v => panic!("expected the call report, got {v:?}"),
    };
    assert_eq!(calls(policy.evaluate(&report())), "instance calls=1");
    assert_eq!(calls(policy.evaluate(&report())), "instance calls=2");

    for key in ["panic", "unreachable"] {
        let e = policy.evaluate(&routed(key));
        assert_eq!(e.error, Some(ErrorKind::Trap), "{key}");
        assert_eq!(e.verdict, PluginVerdict::Forward, "fail open");
        // A new instance: its own call count starts over.
        assert_eq!(calls(policy.evaluate(&report())), "instance calls=1");
    }
    assert_eq!(policy.stats().errors(ErrorKind::Trap), 2);
    assert_eq!(policy.stats().instances(), 1);
}

#[test]
fn escape_attempts_get_nothing() {
    let policy = load("hostile_escape", settings("escape", FailMode::Open));
    let e = policy.evaluate(&routed("any"));
    // Forward means every attempt failed; a leak would shed with what leaked.
    assert_eq!(e.error, None, "{e:?}");
    assert_eq!(e.verdict, PluginVerdict::Forward, "{e:?}");
    let counters: std::collections::BTreeMap<String, u64> =
        policy.stats().counters().into_iter().collect();
    assert_eq!(counters.get("denied_fs"), Some(&4), "{counters:?}");
    assert_eq!(counters.get("denied_env"), Some(&3), "{counters:?}");
    assert_eq!(counters.get("denied_net"), Some(&3), "{counters:?}");
    assert_eq!(counters.get("denied_clock"), Some(&1), "{counters:?}");
}

const SPIN_BUDGET: Duration = Duration::from_millis(300);

#[test]
fn other_threads_keep_evaluating_while_a_plugin_spins() {
    let engine = PluginEngine::new().expect("engine");
    let shared = PluginShared::new();
    let mut s = settings("spin", FailMode::Open);
    s.max_errors = u32::MAX;
    s.time_budget = SPIN_BUDGET;
    let spin = Policy::load(&engine, &plugin("hostile_spin"), s, &shared).expect("spin");
    let mut s = PolicySettings::new("celery", r#"{"default": "1000000/s"}"#);
    s.time_budget = Duration::from_secs(1);
    let good = Policy::load(&engine, &plugin("celery_task_quota"), s, &shared).expect("celery");

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let good = good.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let m = msg(
                    json!({ "routing_key": "celery", "headers": { "task": "orders.confirm" } }),
                );
                let (mut n, mut slowest) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let e = good.evaluate(&m);
                    slowest = slowest.max(t.elapsed());
                    assert_eq!(e.error, None);
                    assert_eq!(e.verdict, PluginVerdict::Forward);
                    n += 1;
                }
                (n, slowest)
            })
        })
        .collect();

    for _ in 0..3 {
        assert_eq!(
            spin.evaluate(&routed("spin")).error,
            Some(ErrorKind::Timeout)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let (n, slowest) = w.join().expect("worker");
        assert!(n > 100, "only {n} evaluations while the other plugin spun");
        // No evaluation waited for a spinning call (each spins for the whole budget).
        assert!(
            slowest < SPIN_BUDGET - Duration::from_millis(50),
            "slowest {slowest:?}"
        );
    }
    assert_eq!(good.stats().errors(ErrorKind::Trap), 0);
    assert_eq!(spin.stats().errors(ErrorKind::Timeout), 3);
}

#[test]
fn policy_is_disabled_after_max_errors_in_its_window() {
    let mut s = settings("flaky", FailMode::Closed);
    s.max_errors = 3;
    s.error_window = Duration::from_secs(60);
    let policy = load("hostile_trap", s);

    for _ in 0..3 {
        assert_eq!(
            policy.evaluate(&routed("panic")).error,
            Some(ErrorKind::Trap)
        );
    }
    assert!(policy.stats().is_disabled());
    // Disabled: the plugin is not run, every message gets the fail verdict.
    let e = policy.evaluate(&routed("ok"));
    assert_eq!(e.error, Some(ErrorKind::Disabled));
    assert!(matches!(e.verdict, PluginVerdict::Shed(_)));
    let batch = policy.evaluate_batch(&[&routed("ok"), &routed("ok")]);
    assert!(batch.iter().all(|e| e.error == Some(ErrorKind::Disabled)));

    let mut out = String::new();
    policy.stats().render_prometheus(&mut out);
    assert!(
        out.contains("sluice_plugin_disabled{policy=\"flaky\"} 1"),
        "{out}"
    );
    assert!(
        out.contains("sluice_plugin_errors_total{policy=\"flaky\",kind=\"trap\"} 3"),
        "{out}"
    );
}

#[test]
fn a_failing_batch_gets_the_fail_verdict_for_every_message() {
    let policy = load("hostile_trap", settings("trap", FailMode::Open));
    let (ok, bad) = (routed("ok"), routed("panic"));
    let out = policy.evaluate_batch(&[&ok, &ok, &bad]);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|e| e.error == Some(ErrorKind::Trap)));
    assert_eq!(policy.stats().errors(ErrorKind::Trap), 1);
    let out = policy.evaluate_batch(&[&ok, &ok]);
    assert!(out
        .iter()
        .all(|e| e.error.is_none() && e.verdict == PluginVerdict::Forward));
}

#[test]
fn load_errors_say_what_and_where() {
    let engine = PluginEngine::new().expect("engine");
    let shared = PluginShared::new();
    let dir = std::env::temp_dir().join(format!("sluice-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    // Rejected config: the plugin's own message.
    let err = Policy::load(
        &engine,
        &plugin("celery_task_quota"),
        PolicySettings::new("celery", r#"{"default": "fast"}"#),
        &shared,
    )
    .expect_err("bad config");
    assert!(matches!(err, PluginError::InitRejected { .. }), "{err}");
    assert!(err.to_string().contains("invalid rate \"fast\""), "{err}");

    // Built for another version of the WIT package.
    let mut bytes = std::fs::read(plugin("celery_task_quota")).expect("read");
    let (from, to) = (b"sluice:policy/policy@0.1.0", b"sluice:policy/policy@0.9.0");
    let mut replaced = 0;
    while let Some(i) = bytes.windows(from.len()).position(|w| w == from) {
        bytes[i..i + to.len()].copy_from_slice(to);
        replaced += 1;
    }
    assert!(replaced > 0);
    let path = dir.join("future.wasm");
    std::fs::write(&path, &bytes).expect("write");
    let err = Policy::load(&engine, &path, PolicySettings::new("future", ""), &shared)
        .expect_err("incompatible");
    let text = err.to_string();
    assert!(
        matches!(err, PluginError::IncompatibleVersion { .. }),
        "{text}"
    );
    assert!(text.contains("sluice:policy/policy@0.9.0"), "{text}");
    assert!(text.contains("sluice:policy@0.1.0"), "{text}");
    assert!(text.contains("future.wasm"), "{text}");

    // A core module, and garbage.
    let path = dir.join("core.wasm");
    std::fs::write(&path, b"\0asm\x01\0\0\0").expect("write");
    let err =
        Policy::load(&engine, &path, PolicySettings::new("core", ""), &shared).expect_err("core");
    assert!(err.to_string().contains("core Wasm module"), "{err}");
    let path = dir.join("junk.wasm");
    std::fs::write(&path, b"not wasm").expect("write");
    let err =
        Policy::load(&engine, &path, PolicySettings::new("junk", ""), &shared).expect_err("junk");
    assert!(matches!(err, PluginError::Compile { .. }), "{err}");
    assert!(err.to_string().contains("junk.wasm"), "{err}");

    // Missing file.
    let err = Policy::load(
        &engine,
        &dir.join("none.wasm"),
        PolicySettings::new("none", ""),
        &shared,
    )
    .expect_err("missing");
    assert!(matches!(err, PluginError::Read { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
