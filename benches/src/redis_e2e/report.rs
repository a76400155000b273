//! The Markdown report of a Redis run: paired throughput ratios against direct (the median over
//! rounds, with the range), CPU per request of the proxy and of Redis, latency as
//! `redis-benchmark` reports it at full load, and the loss check.

use super::{Cell, Leg, Results};
use crate::e2e::{median, Target};
use std::collections::BTreeSet;
use std::fmt::Write;

struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(v: Vec<f64>) -> Option<Spread> {
    let v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Spread {
        median: median(v),
        min,
        max,
    })
}

fn matrix(legs: &[Leg], cell: Cell, target: Target) -> impl Iterator<Item = &Leg> {
    legs.iter()
        .filter(move |l| l.phase == "matrix" && l.cell == cell && l.target == target)
}

/// Per round, target ÷ direct of the same round.
fn ratios(legs: &[Leg], cell: Cell, target: Target) -> Vec<f64> {
    matrix(legs, cell, target)
        .filter_map(|l| {
            matrix(legs, cell, Target::Direct)
                .find(|d| d.round == l.round)
                .map(|d| l.rps / d.rps)
        })
        .collect()
}

fn med(legs: &[Leg], cell: Cell, target: Target, f: impl Fn(&Leg) -> Option<f64>) -> String {
    spread(matrix(legs, cell, target).filter_map(f).collect())
        .map_or_else(|| "–".to_string(), |v| format!("{:.2}", v.median))
}

/// The Markdown report of a run.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let targets: Vec<Target> = {
        let set: BTreeSet<Target> = r
            .legs
            .iter()
            .filter(|l| l.phase == "matrix")
            .map(|l| l.target)
            .collect();
        Target::ALL
            .into_iter()
            .filter(|t| set.contains(t))
            .collect()
    };
    let proxies: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| *t != Target::Direct)
        .collect();
    // Cells in the order they were measured (the plan's).
    let mut cells: Vec<Cell> = Vec::new();
    for l in r.legs.iter().filter(|l| l.phase == "matrix") {
        if !cells.contains(&l.cell) {
            cells.push(l.cell);
        }
    }
    let columns = |s: &mut String, first: &str, names: &[String]| {
        let _ = write!(s, "| workload | -P | -c | {first} |");
        for n in names {
            let _ = write!(s, " {n} |");
        }
        let _ = write!(s, "\n|---|---|---|---|");
        for _ in names {
            s.push_str("---|");
        }
        s.push('\n');
    };
    let row_start = |s: &mut String, c: Cell| {
        let _ = write!(
            s,
            "| {} | {} | {} |",
            c.workload.name(),
            c.pipeline,
            c.clients
        );
    };
    let names: Vec<String> = proxies.iter().map(|t| t.name().to_string()).collect();

    let _ = writeln!(
        s,
        "#### Redis: throughput relative to direct (median of paired rounds, range in brackets)\n"
    );
    columns(&mut s, "direct req/s", &names);
    for &cell in &cells {
        row_start(&mut s, cell);
        let direct = spread(
            matrix(&r.legs, cell, Target::Direct)
                .map(|l| l.rps)
                .collect(),
        );
        let _ = write!(
            s,
            " {} |",
            direct.map_or("–".into(), |d| format!("{:.0}", d.median))
        );
        for &t in &proxies {
            let v = spread(ratios(&r.legs, cell, t));
            let _ = write!(
                s,
                " {} |",
                v.map_or("–".into(), |v| format!(
                    "{:.2} ({:.2}–{:.2})",
                    v.median, v.min, v.max
                ))
            );
        }
        s.push('\n');
    }

    let _ = writeln!(
        s,
        "\n#### Redis: CPU per request (µs, median over rounds)\n"
    );
    columns(&mut s, "redis-server (direct)", &names);
    for &cell in &cells {
        row_start(&mut s, cell);
        let _ = write!(
            s,
            " {} |",
            med(&r.legs, cell, Target::Direct, |l| l.redis_cpu_us)
        );
        for &t in &proxies {
            let _ = write!(s, " {} |", med(&r.legs, cell, t, |l| l.proxy_cpu_us));
        }
        s.push('\n');
    }

    let _ = writeln!(
        s,
        "\n#### Redis: latency at full load, p50 / p99 ms (redis-benchmark's, median over rounds)\n"
    );
    let all: Vec<String> = targets.iter().map(|t| t.name().to_string()).collect();
    let _ = write!(s, "| workload | -P | -c |");
    for n in &all {
        let _ = write!(s, " {n} |");
    }
    let _ = write!(s, "\n|---|---|---|");
    for _ in &all {
        s.push_str("---|");
    }
    s.push('\n');
    for &cell in &cells {
        row_start(&mut s, cell);
        for &t in &targets {
            let _ = write!(
                s,
                " {} / {} |",
                med(&r.legs, cell, t, |l| l.p50_ms),
                med(&r.legs, cell, t, |l| l.p99_ms)
            );
        }
        s.push('\n');
    }

    let checked: Vec<&Leg> = r.legs.iter().filter(|l| l.phase == "matrix").collect();
    let lost: u64 = checked.iter().map(|l| l.lost).sum();
    let _ = writeln!(
        s,
        "\nLoss check: {} legs; {} pushed values missing from their list (LLEN read on Redis after each leg, the list deleted before and after).",
        checked.len(),
        lost
    );
    for (what, why) in &r.skipped {
        let _ = writeln!(s, "\nSkipped {what}: {why}");
    }
    let f = &r.facts;
    let _ = writeln!(
        s,
        "\nMachine: {} cores ({}), Linux {}; Redis {}; {}; {}; {}. Plan: {}; run took {:.0} s; load average at the start: {}; at the end: {}.",
        f.cores,
        f.cpu,
        f.kernel,
        f.redis,
        f.redis_benchmark,
        f.haproxy,
        f.sluice,
        f.plan,
        r.seconds,
        f.loadavg_start,
        f.loadavg_end
    );
    s
}
