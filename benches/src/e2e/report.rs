//! Turning legs into the tables of `benches/RESULTS.md`: paired ratios against direct (the
//! median over rounds, with the range), proxy CPU per message, latency added at half load,
//! memory per idle connection, and the facts of the machine.

use super::{median, Cell, Leg, Plan, Results, Target};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::process::Command;

/// `512 B`, `64 KiB`.
pub fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// What the machine and the software under test were.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// `rabbitmqctl version`.
    pub rabbitmq: String,
    /// `haproxy -v`, first line.
    pub haproxy: String,
    /// `sluice --version`.
    pub sluice: String,
    /// `/proc/loadavg` when the run ended.
    pub loadavg_end: String,
    /// Rounds, leg length and bodies.
    pub plan: String,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

impl Facts {
    /// Gather facts (best effort: unknowns say so).
    pub fn gather(plan: &Plan) -> Facts {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        Facts {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease"),
            rabbitmq: first_line("rabbitmqctl", &["version"]),
            haproxy: first_line(&plan.haproxy_bin, &["-v"]),
            sluice: first_line(&plan.sluice_bin.to_string_lossy(), &["--version"]),
            loadavg_end: read("/proc/loadavg"),
            plan: format!(
                "{} rounds, ~{:.1} s per leg, {:?} bodies",
                plan.rounds, plan.leg_seconds, plan.body
            ),
        }
    }
}

/// Median and range of some values.
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

/// Per round, `f(target leg, baseline leg)` for one cell, phase and target.
fn paired(
    legs: &[Leg],
    phase: &str,
    cell: Cell,
    target: Target,
    base: Target,
    f: impl Fn(&Leg, &Leg) -> f64,
) -> Vec<f64> {
    let of = |t: Target| {
        legs.iter()
            .filter(move |l| l.phase == phase && l.cell == cell && l.target == t)
    };
    of(target)
        .filter_map(|l| of(base).find(|d| d.round == l.round).map(|d| f(l, d)))
        .collect()
}

fn values(
    legs: &[Leg],
    phase: &str,
    cell: Cell,
    target: Target,
    f: impl Fn(&Leg) -> Option<f64>,
) -> Vec<f64> {
    legs.iter()
        .filter(|l| l.phase == phase && l.cell == cell && l.target == target)
        .filter_map(f)
        .collect()
}

/// The Markdown report of a run.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let base = r.baseline;
    let bname = base.name();
    let targets: Vec<Target> = {
        let set: BTreeSet<Target> = r.legs.iter().map(|l| l.target).collect();
        Target::ALL
            .into_iter()
            .filter(|t| set.contains(t))
            .collect()
    };
    let proxies: Vec<Target> = targets.iter().copied().filter(|t| *t != base).collect();
    let cells: BTreeSet<Cell> = r
        .legs
        .iter()
        .filter(|l| l.phase == "matrix")
        .map(|l| l.cell)
        .collect();

    let _ = writeln!(
        s,
        "#### Throughput relative to {bname} (median of paired rounds, range in brackets)\n"
    );
    let mut head = format!("| P | size | confirms | {bname} msg/s |");
    let mut rule = "|---|---|---|---|".to_string();
    for t in &proxies {
        let _ = write!(head, " {} |", t.name());
        rule.push_str("---|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for &cell in &cells {
        let direct = spread(values(&r.legs, "matrix", cell, base, |l| Some(l.msg_per_s)));
        let _ = write!(
            s,
            "| {} | {} | {} | {} |",
            cell.producers,
            size_label(cell.size),
            cell.confirm.mode(),
            direct.map_or("–".into(), |d| format!("{:.0}", d.median))
        );
        for &t in &proxies {
            let v = spread(paired(&r.legs, "matrix", cell, t, base, |l, d| {
                l.msg_per_s / d.msg_per_s
            }));
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

    let _ = writeln!(s, "\n#### CPU per message (µs, median over rounds)\n");
    let mut head = format!("| P | size | confirms | broker ({bname}) |");
    let mut rule = "|---|---|---|---|".to_string();
    for t in &proxies {
        let _ = write!(head, " {} |", t.name());
        rule.push_str("---|");
    }
    // With TLS, stunnel (the terminator in front of the broker) is on every TLS target's path.
    let stunnel: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|&t| {
            r.legs
                .iter()
                .any(|l| l.target == t && l.stunnel_cpu_us.is_some())
        })
        .collect();
    for t in &stunnel {
        let _ = write!(head, " stunnel ({}) |", t.name());
        rule.push_str("---|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for &cell in &cells {
        let b = spread(values(&r.legs, "matrix", cell, base, |l| l.broker_cpu_us));
        let _ = write!(
            s,
            "| {} | {} | {} | {} |",
            cell.producers,
            size_label(cell.size),
            cell.confirm.mode(),
            b.map_or("–".into(), |v| format!("{:.1}", v.median))
        );
        for &t in &proxies {
            let v = spread(values(&r.legs, "matrix", cell, t, |l| l.proxy_cpu_us));
            let _ = write!(
                s,
                " {} |",
                v.map_or("–".into(), |v| format!("{:.2}", v.median))
            );
        }
        for &t in &stunnel {
            let v = spread(values(&r.legs, "matrix", cell, t, |l| l.stunnel_cpu_us));
            let _ = write!(
                s,
                " {} |",
                v.map_or("–".into(), |v| format!("{:.2}", v.median))
            );
        }
        s.push('\n');
    }

    let half: BTreeSet<Cell> = r
        .legs
        .iter()
        .filter(|l| l.phase == "half-load")
        .map(|l| l.cell)
        .collect();
    for cell in half {
        let rate = r
            .legs
            .iter()
            .find(|l| l.phase == "half-load" && l.cell == cell)
            .and_then(|l| l.rate)
            .unwrap_or(0.0);
        let _ = writeln!(
            s,
            "\n#### Confirm latency at half of {bname}'s maximum ({cell}, {rate:.0} msg/s offered)\n"
        );
        let _ = writeln!(s, "| target | msg/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | proxy CPU µs/msg |\n|---|---|---|---|---|---|---|---|");
        for &t in &targets {
            let m = |f: fn(&Leg) -> f64| {
                spread(values(&r.legs, "half-load", cell, t, |l| Some(f(l))))
                    .map_or(f64::NAN, |v| v.median)
            };
            let added = |f: fn(&Leg) -> f64| {
                spread(paired(&r.legs, "half-load", cell, t, base, |l, d| {
                    f(l) - f(d)
                }))
                .map_or("–".into(), |v| format!("{:+.0}", v.median))
            };
            let cpu = spread(values(&r.legs, "half-load", cell, t, |l| l.proxy_cpu_us));
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                t.name(),
                m(|l| l.msg_per_s),
                m(|l| l.p50_us as f64),
                m(|l| l.p99_us as f64),
                m(|l| l.p999_us as f64),
                if t == base {
                    "–".into()
                } else {
                    added(|l| l.p50_us as f64)
                },
                if t == base {
                    "–".into()
                } else {
                    added(|l| l.p99_us as f64)
                },
                cpu.map_or("–".into(), |v| format!("{:.2}", v.median)),
            );
        }
    }

    if !r.idle.is_empty() {
        let _ = writeln!(s, "\n#### Memory per idle proxied connection\n");
        let _ = writeln!(s, "| proxy | connections | RSS before | RSS with them open | per connection |\n|---|---|---|---|---|");
        for i in &r.idle {
            let _ = writeln!(
                s,
                "| {} | {} | {} KiB | {} KiB | {:.1} KiB |",
                i.target, i.connections, i.baseline_kib, i.loaded_kib, i.kib_per_connection
            );
        }
    }

    let lost: u64 = r.legs.iter().map(|l| l.lost).sum();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &r.legs {
        if !l.errors.is_empty() {
            *errors.entry(l.target.name()).or_default() += 1;
        }
    }
    let _ = writeln!(
        s,
        "\nLoss check: {} legs, {} confirmed (or, without confirms, sent) messages missing from their queue; legs with producer errors: {}.",
        r.legs.len(),
        lost,
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ")
        }
    );
    for (what, why) in &r.skipped {
        let _ = writeln!(s, "\nSkipped {what}: {why}");
    }
    let f = &r.facts;
    let _ = writeln!(
        s,
        "\nMachine: {} cores ({}), Linux {}; RabbitMQ {}; {}; {}. Plan: {}; run took {:.0} s; load average at the end: {}.",
        f.cores, f.cpu, f.kernel, f.rabbitmq, f.haproxy, f.sluice, f.plan, r.seconds, f.loadavg_end
    );
    s
}
