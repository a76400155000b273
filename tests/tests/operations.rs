//! Operating sluice with the real tools: a real Prometheus scrapes sluice while a producer is shed
//! and its alert fires; promtool accepts `/metrics` and the rules; every dashboard query parses
//! in Prometheus and names only metrics sluice exports; a flood of 100k shed publishes writes a
//! bounded number of log lines; `sluice top` agrees with `/v1/producers` and shows the flooding
//! producer first in a real terminal (tmux).
//!
//! prometheus, promtool and tmux come from Debian packages that `.ci/ensure-tools` installs; a
//! test fails (never passes silently) when one is missing.

use anyhow::{bail, ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::Value;
use sluice_tests::{
    broker_addr, connect, http, http_auth, sluice_bin, unique, Broker, Queues, Sluice,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Support: the repository, tools, a Prometheus process, producers.
// ---------------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool from PATH, or a failure that says how to install it.
fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "FAIL: `{name}` is not installed; run .ci/ensure-tools (Debian packages prometheus, tmux)"
    )
}

/// A built example plugin (`make plugins` puts them in `plugins/dist/`).
fn plugin(name: &str) -> Result<String> {
    let p = repo().join("plugins/dist").join(format!("{name}.wasm"));
    ensure!(
        p.is_file(),
        "{} is missing: run `make plugins` first",
        p.display()
    );
    Ok(p.canonicalize()?.display().to_string())
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Percent-encode a query-string value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus on loopback scraping one sluice every second, evaluating rules every
/// second. Killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    /// Start it with these rule files (name, YAML text).
    async fn start(target: SocketAddr, rules: &[(&str, String)]) -> Result<Prometheus> {
        let bin = tool("prometheus")?;
        let dir = TempDir::new("prometheus")?;
        let mut files = Vec::new();
        for (name, text) in rules {
            std::fs::write(dir.0.join(name), text)?;
            files.push(format!("\"{name}\""));
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{target}\"]\n",
            files.join(", ")
        );
        std::fs::write(dir.0.join("prometheus.yml"), config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = std::fs::File::create(dir.0.join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(p.addr, "GET", "/-/ready").await {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited with {status}:\n{}", p.log());
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query`: the `data` of a successful answer, or Prometheus's error
    /// (`bad_data` for a query that does not parse).
    async fn query(&self, q: &str) -> Result<Value> {
        let (status, body) =
            http(self.addr, "GET", &format!("/api/v1/query?query={}", enc(q))).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status}: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "prometheus refused `{q}`: {} {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or("?")
            );
        }
        Ok(v["data"].clone())
    }

    /// The first sample's value of an instant vector query whose labels include `labels`.
    async fn value(&self, q: &str) -> Result<Option<f64>> {
        let data = self.query(q).await?;
        Ok(data["result"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok()))
    }

    async fn alerts(&self) -> Result<Vec<Value>> {
        let (_, body) = http(self.addr, "GET", "/api/v1/alerts").await?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["alerts"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The alert rules with every `for:` shortened to `for`, so a test sees pending → firing in
/// seconds (`promtool test rules` covers the real durations).
fn alerts_with_short_for(short: &str) -> Result<String> {
    let text = std::fs::read_to_string(repo().join("config/prometheus/sluice-alerts.yml"))?;
    Ok(text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: {short}", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Publish with confirms as fast as the broker confirms, `window` unconfirmed at most, until
/// `stop` (or `limit` publishes). Returns (acked, nacked).
async fn flood(
    url: String,
    name: String,
    queue: String,
    stop: Arc<AtomicBool>,
    limit: u64,
    window: usize,
) -> Result<(u64, u64)> {
    let conn = connect(&url, &name).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (mut acked, mut nacked, mut sent) = (0u64, 0u64, 0u64);
    let body = [7u8; 64];
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let mut pending = Vec::with_capacity(window);
        while pending.len() < window && sent < limit {
            pending.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await?,
            );
            sent += 1;
        }
        for p in pending {
            if tokio::time::timeout(Duration::from_secs(60), p)
                .await
                .context("confirm never came")??
                .is_ack()
            {
                acked += 1;
            } else {
                nacked += 1;
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok((acked, nacked))
}

/// Publish `per_sec` publishes a second (confirmed one by one) until `stop`.
async fn trickle(
    url: String,
    name: String,
    queue: String,
    per_sec: u32,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    let conn = connect(&url, &name).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"calm",
            BasicProperties::default(),
        )
        .await?
        .await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(1000 / per_sec.max(1) as u64)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(n)
}

/// Families named in `# TYPE` lines of a scrape.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The config shared by the Prometheus tests: producers named `flood-*` get 20 publishes/s,
/// then are shed; a Celery policy (limits that never fire on these producers) makes the plugin
/// families appear.
fn flood_config() -> Result<String> {
    Ok(format!(
        r#"
[[quota]]
name = "flood-limit"
match = {{ producer = "flood-*" }}
messages = "20/s"
burst = 20
on_exceed = "shed"

[[policy]]
name = "celery-tasks"
plugin = "{}"
config = {{ limits = [{{ match = "reports.*", rate = "5/s burst 5" }}], on_exceed = "shed" }}
"#,
        plugin("celery_task_quota")?
    ))
}

// ---------------------------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------------------------

fn promtool(args: &[&str], stdin: Option<&str>) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new(tool("promtool")?)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ promtool {}\n{text}", args.join(" "));
    Ok((out.status.success(), text))
}

#[tokio::test]
async fn metrics_pass_promtool_check_metrics_with_every_family_present() -> Result<()> {
    let s = Sluice::start(&flood_config()?).await?;
    let broker = Broker::connect().await?;
    let q = unique("ops-promtool");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    // Forwarded, shed (quota) and plugin-limited publishes, so counters, the confirm latency
    // histogram, the policy histogram and the plugin's own event counter all have samples.
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, nacked) = flood(s.url.clone(), unique("flood"), q.clone(), stop, 300, 100).await?;
    ensure!(acked > 0 && nacked > 0, "acked {acked}, nacked {nacked}");
    let conn = connect(&s.url, &unique("celery")).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for i in 0..30 {
        let mut headers = FieldTable::default();
        headers.insert(
            "task".into(),
            AMQPValue::LongString("reports.rebuild".into()),
        );
        headers.insert(
            "id".into(),
            AMQPValue::LongString(format!("t{i}").as_str().into()),
        );
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_headers(headers),
        )
        .await?
        .await?;
    }
    let _ = conn.close(200, "".into()).await;
    let (status, scrape) = s.admin_get("/metrics").await?;
    ensure!(status == 200);
    ensure!(
        sluice_tests::sum_metric(&scrape, "sluice_plugin_events_total", &["name=\"limited\""])
            > 0.0,
        "the plugin counted nothing:\n{scrape}"
    );
    ensure!(
        sluice_tests::sum_metric(&scrape, "sluice_confirm_latency_seconds_count", &[]) > 0.0,
        "no confirm latency observed"
    );
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape))?;
    ensure!(
        ok,
        "promtool check metrics failed:\n{out}\n--- scrape:\n{scrape}"
    );
    ensure!(
        out.trim().is_empty(),
        "promtool check metrics warned:\n{out}"
    );
    // The public names of DESIGN.md are all there.
    let names = families(&scrape);
    for n in [
        "sluice_messages_total",
        "sluice_bytes_total",
        "sluice_policy_eval_seconds",
        "sluice_plugin_errors_total",
        "sluice_connections",
        "sluice_config_reloads_total",
        "sluice_upstream_blocked",
        "sluice_confirm_latency_seconds",
        "sluice_config_last_reload_successful",
    ] {
        ensure!(names.contains(n), "{n} missing from /metrics");
    }
    s.stop().await;
    Ok(())
}

#[test]
fn alert_and_recording_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let (ok, out) = promtool(
        &[
            "check",
            "rules",
            "config/prometheus/sluice-rules.yml",
            "config/prometheus/sluice-alerts.yml",
        ],
        None,
    )?;
    ensure!(ok, "promtool check rules failed:\n{out}");
    ensure!(
        !out.to_lowercase().contains("warning"),
        "promtool check rules warned:\n{out}"
    );
    let (ok, out) = promtool(
        &[
            "test",
            "rules",
            "config/prometheus/tests/sluice-alerts.test.yml",
        ],
        None,
    )?;
    ensure!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    // Every alert has a unit test.
    let alerts = std::fs::read_to_string(repo().join("config/prometheus/sluice-alerts.yml"))?;
    let tests =
        std::fs::read_to_string(repo().join("config/prometheus/tests/sluice-alerts.test.yml"))?;
    for name in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
    {
        let fires = tests.contains(&format!(
            "alertname: {name}\n        exp_alerts:\n          -"
        ));
        let quiet = tests.contains(&format!("alertname: {name}\n        exp_alerts: []"));
        ensure!(
            fires && quiet,
            "alert {name} needs a unit test where it fires and one where it stays quiet"
        );
    }
    Ok(())
}

#[test]
fn every_subcommand_has_help_with_examples_and_exit_status_and_completions_load() -> Result<()> {
    let bin = sluice_bin()?;
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(&bin).args(args).output()?)
    };
    let top = run(&["--help"])?;
    let text = String::from_utf8_lossy(&top.stdout);
    ensure!(top.status.success() && text.contains("Exit status:") && text.contains("Examples:"));
    for cmd in [
        &["run"][..],
        &["check"],
        &["top"],
        &["drain"],
        &["completions"],
        &["plugin", "test"],
    ] {
        let out = run(&[cmd, &["--help"]].concat())?;
        let help = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "sluice {cmd:?} --help failed");
        ensure!(
            help.contains("Examples:\n  sluice "),
            "sluice {cmd:?} --help has no examples:\n{help}"
        );
        ensure!(
            cmd == ["completions"] || help.contains("Exit status:"),
            "sluice {cmd:?} --help does not document its exit status:\n{help}"
        );
    }
    // A usage error is exit status 2, as documented.
    ensure!(run(&["top", "--json"])?.status.code() == Some(2));
    ensure!(run(&["no-such-command"])?.status.code() == Some(2));
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell])?;
        let script = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && script.contains("drain") && script.contains("token-file"),
            "{shell} completions:\n{script}"
        );
    }
    // The bash script loads in a real bash and completes the subcommands.
    let script = String::from_utf8(run(&["completions", "bash"])?.stdout)?;
    let dir = TempDir::new("completions")?;
    std::fs::write(dir.0.join("sluice.bash"), script)?;
    let probe = format!(
        "source '{}' && COMP_WORDS=(sluice t) && COMP_CWORD=1 && COMP_LINE='sluice t' && \
         COMP_POINT=8 && _sluice sluice t sluice && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.0.join("sluice.bash").display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output()?;
    let words = String::from_utf8_lossy(&out.stdout);
    ensure!(
        words.lines().any(|w| w == "top"),
        "bash completion of `sluice t`: {words:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_per_producer_shed_rate_and_the_shedding_alert_fires() -> Result<()> {
    let s = Sluice::start(&flood_config()?).await?;
    let rules = std::fs::read_to_string(repo().join("config/prometheus/sluice-rules.yml"))?;
    let prom = Prometheus::start(
        s.admin,
        &[
            ("sluice-rules.yml", rules),
            ("sluice-alerts.yml", alerts_with_short_for("2s")?),
        ],
    )
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("ops-prom");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let flooder = unique("flood");
    let calm = unique("calm");
    let stop = Arc::new(AtomicBool::new(false));
    let f = tokio::spawn(flood(
        s.url.clone(),
        flooder.clone(),
        q.clone(),
        stop.clone(),
        u64::MAX,
        200,
    ));
    let c = tokio::spawn(trickle(
        s.url.clone(),
        calm.clone(),
        q.clone(),
        5,
        stop.clone(),
    ));

    let result = async {
        let deadline = Instant::now() + Duration::from_secs(90);
        let raw = format!(
            "sum(rate(sluice_messages_total{{job=\"sluice\",producer=\"{flooder}\",verdict=\"shed\"}}[10s]))"
        );
        let recorded = format!("sluice:messages:rate1m{{producer=\"{flooder}\",verdict=\"shed\"}}");
        let mut firing = None;
        let (mut raw_rate, mut recorded_rate) = (None, None);
        while firing.is_none() {
            ensure!(
                Instant::now() < deadline,
                "no firing SluiceProducerShedding for {flooder} after 90 s (shed rate {raw_rate:?}, \
                 recorded {recorded_rate:?}); alerts: {:?}\nprometheus log:\n{}",
                prom.alerts().await?,
                prom.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            raw_rate = prom.value(&raw).await?;
            recorded_rate = prom.value(&recorded).await?;
            firing = prom.alerts().await?.into_iter().find(|a| {
                a["labels"]["alertname"] == "SluiceProducerShedding"
                    && a["labels"]["producer"] == flooder.as_str()
                    && a["state"] == "firing"
            });
        }
        let raw_rate = raw_rate.context("no shed rate")?;
        let recorded_rate = recorded_rate.context("no recorded shed rate")?;
        println!(
            "shed rate of {flooder}: {raw_rate:.0}/s (10 s window), {recorded_rate:.0}/s recorded; alert: {}",
            firing.as_ref().map(|a| a.to_string()).unwrap_or_default()
        );
        ensure!(raw_rate > 1.0 && recorded_rate > 1.0);
        // The producer that stays within its quota is never shed and never alerted on.
        let calm_shed = prom
            .value(&format!(
                "sluice:messages:rate1m{{producer=\"{calm}\",verdict=\"shed\"}}"
            ))
            .await?;
        ensure!(calm_shed == Some(0.0), "calm producer shed rate {calm_shed:?}");
        let calm_forward = prom
            .value(&format!(
                "sluice:messages:rate1m{{producer=\"{calm}\",verdict=\"forward\"}}"
            ))
            .await?;
        ensure!(calm_forward.is_some_and(|v| v > 0.0), "calm {calm_forward:?}");
        ensure!(!prom.alerts().await?.iter().any(|a| a["labels"]["producer"] == calm.as_str()));
        // Nothing else is wrong: the broker is not blocking, no plugin fails, sluice is up.
        let others: Vec<_> = prom
            .alerts()
            .await?
            .into_iter()
            .filter(|a| a["labels"]["alertname"] != "SluiceProducerShedding")
            .collect();
        ensure!(others.is_empty(), "unexpected alerts: {others:?}");
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let flooded = f.await?;
    let calmed = c.await?;
    result?;
    let (acked, nacked) = flooded?;
    ensure!(nacked > acked, "flood: {acked} acked, {nacked} nacked");
    calmed?;
    s.stop().await;
    Ok(())
}

/// The identifiers of a PromQL expression that are metric names: what is left once strings,
/// label matchers, ranges, grouping clauses, functions, keywords and numbers are taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut cleaned = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_str = false;
    for c in expr.chars() {
        match c {
            '"' if depth_brace > 0 || in_str => in_str = !in_str,
            '{' if !in_str => depth_brace += 1,
            '}' if !in_str => depth_brace -= 1,
            '[' if !in_str => depth_bracket += 1,
            ']' if !in_str => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 || in_str => {}
            _ => cleaned.push(c),
        }
        if matches!(c, '{' | '}' | '[' | ']') {
            cleaned.push(' ');
        }
    }
    // Drop `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`.
    let mut out = BTreeSet::new();
    let tokens: Vec<(String, char)> = {
        let mut v = Vec::new();
        let mut cur = String::new();
        let chars: Vec<char> = cleaned.chars().collect();
        for (i, c) in chars.iter().enumerate() {
            if c.is_ascii_alphanumeric() || *c == '_' || *c == ':' || *c == '.' {
                cur.push(*c);
            } else if !cur.is_empty() {
                let next = chars[i..].iter().find(|x| !x.is_whitespace()).copied();
                v.push((std::mem::take(&mut cur), next.unwrap_or(' ')));
            }
        }
        if !cur.is_empty() {
            v.push((cur, ' '));
        }
        v
    };
    let mut skip_group = false;
    for (i, (tok, next)) in tokens.iter().enumerate() {
        let (tok, next) = (tok.as_str(), *next);
        // `sum by (...) (...)`: an aggregation, not a metric.
        if tokens
            .get(i + 1)
            .is_some_and(|(t, _)| t == "by" || t == "without")
        {
            continue;
        }
        if skip_group {
            if next == ')' {
                skip_group = false;
            }
            continue;
        }
        if matches!(
            tok,
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        ) {
            skip_group = next == '(';
            continue;
        }
        if next == '(' || tok.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        if matches!(tok, "bool" | "and" | "or" | "unless" | "offset") {
            continue;
        }
        out.insert(tok.to_string());
    }
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    let e = r#"histogram_quantile(0.99, sum by (policy, le) (rate(sluice_policy_eval_seconds_bucket{job=~"$job",x="a{b}"}[5m]))) / on (job) group_left up or vector(0)"#;
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        vec!["sluice_policy_eval_seconds_bucket".to_string(), "up".into()]
    );
}

/// Grafana's variables replaced by what Prometheus can run: every `$var` matches anything.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${datasource}", "prometheus")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$listener", ".*")
        .replace("$producer", ".*")
}

/// (where, expression) of every PromQL expression in the dashboard: panel targets, annotations
/// and the metric selector of each `label_values(...)` variable.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel '{title}' {}", t["refId"]), e.to_string()));
                }
            }
            walk(
                p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                out,
            );
        }
    }
    walk(
        dash["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
        &mut out,
    );
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["expr"].as_str() {
            out.push((format!("annotation '{}'", a["name"]), e.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(inner) = q.and_then(|q| q.strip_prefix("label_values(")) {
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push((format!("variable '{}'", v["name"]), selector.to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_parse_in_prometheus_and_name_only_exported_metrics() -> Result<()> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("config/grafana/sluice.json"),
    )?)?;
    let queries = dashboard_queries(&dash);
    ensure!(queries.len() >= 20, "only {} queries found", queries.len());
    for needed in [
        "Per-producer publish rate by verdict",
        "Top talkers",
        "Upstream blocked",
        "Confirm latency",
        "Policy eval latency",
        "Plugin errors",
        "Config reloads",
    ] {
        ensure!(
            queries.iter().any(|(w, _)| w.contains(needed)),
            "the dashboard has no '{needed}' panel"
        );
    }
    let s = Sluice::start(&flood_config()?).await?;
    let prom = Prometheus::start(s.admin, &[]).await?;
    let broker = Broker::connect().await?;
    let q = unique("ops-dash");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let flooder = unique("flood");
    let stop = Arc::new(AtomicBool::new(false));
    let f = tokio::spawn(flood(
        s.url.clone(),
        flooder.clone(),
        q.clone(),
        stop.clone(),
        u64::MAX,
        100,
    ));
    let result = async {
        let (_, scrape) = s.admin_get("/metrics").await?;
        let exported = families(&scrape);
        // Wait for a few scrapes so range queries have samples.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let per_producer = prom
                .query(&format!(
                    "sum by (producer) (rate(sluice_messages_total{{producer=\"{flooder}\"}}[1m]))"
                ))
                .await?;
            if per_producer["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break;
            }
            ensure!(Instant::now() < deadline, "prometheus never scraped sluice");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut problems = Vec::new();
        for (where_, expr) in &queries {
            let names = metric_names(expr);
            if names.is_empty() {
                problems.push(format!("{where_}: no metric in `{expr}`"));
            }
            for n in &names {
                // Histogram series are named after their family.
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| n.strip_suffix(suf))
                    .filter(|base| exported.contains(*base))
                    .unwrap_or(n);
                if !exported.contains(family) {
                    problems.push(format!("{where_}: `{n}` is not a metric sluice exports"));
                }
            }
            match prom.query(&substitute(expr)).await {
                Ok(data) => println!(
                    "ok   {where_}: {} series",
                    data["result"].as_array().map_or(0, Vec::len)
                ),
                Err(e) => problems.push(format!("{where_}: {e}")),
            }
        }
        ensure!(
            problems.is_empty(),
            "dashboard problems:\n{}",
            problems.join("\n")
        );
        // The flooding producer shows in the per-producer and top-talker panels.
        for (where_, expr) in queries
            .iter()
            .filter(|(w, _)| w.contains("Per-producer publish rate") || w.contains("Top talkers"))
        {
            let data = prom.query(&substitute(expr)).await?;
            ensure!(
                data["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["metric"]["producer"] == flooder.as_str()),
                "{where_} does not show {flooder}: {data}"
            );
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    f.await??;
    result?;
    s.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Logs that survive a flood
// ---------------------------------------------------------------------------------------------

/// The `sluice` binary as a child process with a config file, its stderr collected line by line.
struct ChildSluice {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _dir: TempDir,
}

impl ChildSluice {
    fn start(config: &str, args: &[&str]) -> Result<ChildSluice> {
        let dir = TempDir::new("sluice-child")?;
        let path = dir.0.join("sluice.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(sluice_bin()?)
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        Ok(ChildSluice {
            child,
            lines,
            reader: Some(reader),
            _dir: dir,
        })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// JSON log lines.
    fn json(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait for a JSON line whose `fields.message` is `message`; return its `field`.
    async fn field_of(&self, message: &str, field: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self
                .json()
                .iter()
                .find(|v| v["fields"]["message"] == message)
                .and_then(|v| v["fields"][field].as_str().map(str::to_string))
            {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "sluice never logged '{message}':\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, wait for the exit (15 s at most), collect the rest of stderr.
    async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            ensure!(Instant::now() < deadline, "sluice did not stop within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

impl Drop for ChildSluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_100k_shed_publishes_writes_a_bounded_number_of_log_lines() -> Result<()> {
    const FLOOD: u64 = 100_000;
    // At most this many lines besides the aggregated verdict lines: start (2), one "client
    // connected", shutdown (2), with room for a few more.
    const FIXED_LINES: usize = 12;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n\
         [log]\nverdict_interval = \"1s\"\n\n\
         [[quota]]\nname = \"flood-limit\"\nmatch = {{ producer = \"flood-*\" }}\nmessages = \"10/s\"\nburst = 10\non_exceed = \"shed\"\n",
        broker_addr()
    );
    let mut sluice = ChildSluice::start(&config, &["--log-format", "json"])?;
    let listen = sluice.field_of("listening", "listen").await?;
    let admin: SocketAddr = sluice
        .field_of("admin API listening", "listen")
        .await?
        .parse()?;
    let broker = Broker::connect().await?;
    let q = unique("ops-logs");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let flooder = unique("flood");
    let started = Instant::now();
    let (acked, nacked) = flood(
        format!("amqp://guest:guest@{listen}/%2f"),
        flooder.clone(),
        q.clone(),
        Arc::new(AtomicBool::new(false)),
        FLOOD,
        2000,
    )
    .await?;
    let flood_secs = started.elapsed().as_secs_f64();
    ensure!(acked + nacked == FLOOD, "{acked} + {nacked} != {FLOOD}");
    ensure!(nacked >= FLOOD - 1000, "only {nacked} shed");
    let (_, scrape) = http(admin, "GET", "/metrics").await?;
    let shed_metric = sluice_tests::sum_metric(
        &scrape,
        "sluice_messages_total",
        &[&format!("producer=\"{flooder}\""), "verdict=\"shed\""],
    ) as u64;
    ensure!(
        shed_metric == nacked,
        "metric {shed_metric} != nacks {nacked}"
    );
    // Every shed publish is in an aggregated line once the last interval is flushed.
    let shed_logged = |s: &ChildSluice| -> u64 {
        s.json()
            .iter()
            .filter(|v| {
                v["fields"]["verdict"] == "shed" && v["fields"]["producer"] == flooder.as_str()
            })
            .filter_map(|v| v["fields"]["messages"].as_u64())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while shed_logged(&sluice) < nacked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = sluice.stop().await?;
    ensure!(status.success(), "sluice exited with {status}");
    let lines = sluice.lines();
    let verdict_lines = sluice
        .json()
        .iter()
        .filter(|v| v["fields"]["verdict"].is_string())
        .count();
    let run_secs = started.elapsed().as_secs_f64();
    // One aggregated line per interval (1 s) the run lasted, plus the last partial interval.
    let bound = FIXED_LINES + run_secs.ceil() as usize + 2;
    println!(
        "{FLOOD} publishes ({nacked} shed) in {flood_secs:.1} s, run {run_secs:.1} s: {} log lines \
         ({verdict_lines} aggregated verdict lines), bound {bound}",
        lines.len()
    );
    for l in &lines {
        println!("  {l}");
    }
    ensure!(
        shed_logged(&sluice) == nacked,
        "aggregated lines count {} shed, the client saw {nacked} nacks",
        shed_logged(&sluice)
    );
    ensure!(
        lines.len() <= bound,
        "{} log lines for {FLOOD} shed publishes, more than {bound}",
        lines.len()
    );
    ensure!(
        !lines.iter().any(|l| l.contains("publish shed")),
        "a per-message line was logged"
    );
    let first = sluice
        .json()
        .into_iter()
        .find(|v| v["fields"]["verdict"] == "shed")
        .context("no aggregated shed line")?;
    let msg = first["fields"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.starts_with("shed ")
            && msg.contains("publishes (")
            && msg.contains(&format!("from {flooder} in the last ")),
        "aggregated line reads: {msg}"
    );
    ensure!(first["level"] == "WARN", "{first}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sluice top
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_json_is_what_v1_producers_says() -> Result<()> {
    let dir = TempDir::new("top-token")?;
    let token = "top-test-token-0123456789abcdef";
    let token_file = dir.0.join("admin.token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    // Sluice::start writes its own [admin] section; a token needs a whole config file.
    let config = dir.0.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n\
             [[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n\
             [[quota]]\nname = \"flood-limit\"\nmatch = {{ producer = \"flood-*\" }}\nmessages = \"20/s\"\nburst = 20\non_exceed = \"shed\"\n",
            token_file.display(),
            broker_addr()
        ),
    )?;
    let s = Sluice::start_file(&config).await?;
    let broker = Broker::connect().await?;
    let q = unique("ops-top");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let flooder = unique("flood");
    let calm = unique("calm");
    let stop = Arc::new(AtomicBool::new(false));
    flood(
        s.url.clone(),
        flooder.clone(),
        q.clone(),
        stop.clone(),
        500,
        100,
    )
    .await?;
    flood(s.url.clone(), calm.clone(), q.clone(), stop, 7, 7).await?;
    // Rates are sampled every second: let them settle at 0 so both reads agree.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let admin = s.admin.to_string();
    let bin = sluice_bin()?;
    let refused = Command::new(&bin)
        .args(["top", "--admin", &admin, "--once", "--json"])
        .output()?;
    ensure!(
        refused.status.code() == Some(1),
        "top without the token: {:?}",
        refused
    );
    ensure!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let out = Command::new(&bin)
        .args(["top", "--admin", &admin, "--once", "--json", "--token-file"])
        .arg(&token_file)
        .output()?;
    ensure!(
        out.status.success(),
        "sluice top failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = http_auth(s.admin, "GET", "/v1/producers", Some(token)).await?;
    ensure!(status == 200);
    let by_name = |v: &Value| -> BTreeMap<String, Value> {
        v["producers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["producer"].as_str().unwrap_or("").to_string(), p.clone()))
            .collect()
    };
    let top: Value = serde_json::from_slice(&out.stdout)?;
    let api: Value = serde_json::from_str(&body)?;
    ensure!(
        by_name(&top) == by_name(&api),
        "sluice top says {top}\n/v1/producers says {api}"
    );
    let f = &by_name(&top)[&flooder];
    ensure!(f["verdicts"]["shed"].as_u64().unwrap_or(0) > 0 && f["total"] == 500);
    ensure!(by_name(&top)[&calm]["verdicts"]["forward"] == 7);
    // The table form of one snapshot.
    let table = Command::new(&bin)
        .args([
            "top",
            "--admin",
            &admin,
            "--once",
            "--sort",
            "total",
            "--token-file",
        ])
        .arg(&token_file)
        .output()?;
    let text = String::from_utf8_lossy(&table.stdout);
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("PRODUCER"))
        .collect();
    ensure!(
        rows.get(1).is_some_and(|r| r.starts_with(&flooder)),
        "table:\n{text}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_a_real_terminal_shows_the_flooding_producer_first() -> Result<()> {
    let tmux = tool("tmux")?;
    let s = Sluice::start(&flood_config()?).await?;
    let broker = Broker::connect().await?;
    let q = unique("ops-tmux");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let flooder = unique("flood");
    let calm = unique("calm");
    let stop = Arc::new(AtomicBool::new(false));
    let f = tokio::spawn(flood(
        s.url.clone(),
        flooder.clone(),
        q.clone(),
        stop.clone(),
        u64::MAX,
        100,
    ));
    let c = tokio::spawn(trickle(
        s.url.clone(),
        calm.clone(),
        q.clone(),
        5,
        stop.clone(),
    ));
    let socket = unique("sluice-top");
    let tmux_cmd = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(&tmux)
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(args)
            .output()?)
    };
    let view = format!(
        "'{}' top --admin {} --interval 500ms",
        sluice_bin()?.display(),
        s.admin
    );
    let result = async {
        let started = tmux_cmd(&["new-session", "-d", "-s", "top", "-x", "180", "-y", "40", &view])?;
        ensure!(
            started.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let shot = tmux_cmd(&["capture-pane", "-p", "-t", "top"])?;
            let screen = String::from_utf8_lossy(&shot.stdout).into_owned();
            let rows: Vec<&str> = screen
                .lines()
                .skip_while(|l| !l.starts_with("PRODUCER"))
                .skip(1)
                .collect();
            let first_is_flood = rows.first().is_some_and(|r| r.starts_with(&flooder));
            let shed_rate_shown = rows
                .first()
                .and_then(|r| r.split_whitespace().nth(2))
                .is_some_and(|v| v != "-" && v != "0");
            let calm_below = rows.iter().skip(1).any(|r| r.starts_with(&calm));
            if first_is_flood && shed_rate_shown && calm_below {
                println!("{screen}");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the live view never showed {flooder} first with its shed rate, {calm} below:\n{screen}"
            );
        }
    }
    .await;
    let _ = tmux_cmd(&["kill-server"]);
    stop.store(true, Ordering::Relaxed);
    f.await??;
    c.await??;
    result?;
    s.stop().await;
    Ok(())
}
