//! Hot reload that cannot hurt: under steady confirmed load, twenty reloads (limits up and down,
//! a plugin swapped, broken configs in between) drop no connection and lose no message; broken
//! configs are refused with file:line and change nothing; dry-run counts what enforce sheds.

use anyhow::{ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use sluice_tests::{connect, unique, Broker, Queues, Sluice};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn plugin(name: &str) -> Result<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    ensure!(
        p.is_file(),
        "{} is missing: run `make plugins` first",
        p.display()
    );
    Ok(p.canonicalize()?.display().to_string())
}

/// A config file in its own temp dir; `body` follows the admin + listener sections.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(body: &str) -> Result<ConfigFile> {
        let dir = std::env::temp_dir().join(unique("sluice-reload"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("sluice.toml");
        let f = ConfigFile { dir, path };
        f.write(body)?;
        Ok(f)
    }

    fn write(&self, body: &str) -> Result<()> {
        std::fs::write(self.dir.join("admin.token"), TOKEN)?;
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n{body}\n",
            sluice_tests::broker_addr()
        );
        // Write then rename, as deploy tools do, so a reader never sees half a file.
        let tmp = self.dir.join("sluice.toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The admin token every config here uses (from `admin.token` beside the config).
const TOKEN: &str = "reload-test-token-0123456789";

async fn reload(s: &Sluice) -> Result<(u16, serde_json::Value)> {
    let (status, body) =
        sluice_tests::http_auth(s.admin, "POST", "/v1/reload", Some(TOKEN)).await?;
    Ok((
        status,
        serde_json::from_str(&body).with_context(|| format!("reload reply: {body}"))?,
    ))
}

async fn running_version(s: &Sluice) -> Result<u64> {
    let (_, body) = sluice_tests::http_auth(s.admin, "GET", "/v1/config", Some(TOKEN)).await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["version"].as_u64().context("no version in /v1/config")
}

fn quota(rate: &str) -> String {
    format!(
        "[[quota]]\nname = \"steady\"\nmatch = {{ producer = \"steady-*\" }}\nmessages = \"{rate}\"\nburst = 5\non_exceed = \"shed\"\n"
    )
}

fn policy(wasm: &str, rate: &str) -> String {
    format!(
        "[[policy]]\nname = \"tasks\"\nplugin = \"{wasm}\"\nconfig = {{ limits = [{{ match = \"reports.*\", rate = \"{rate}\" }}] }}\n"
    )
}

/// One steady producer: publishes a Celery-like task every `every`, at most 64 unconfirmed.
/// Returns (acked, nacked, publish errors).
async fn steady_producer(
    url: String,
    name: String,
    queue: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Result<(BTreeSet<u32>, BTreeSet<u32>)> {
    let conn = connect(&url, &name).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let id: u32 = name.bytes().last().map(u32::from).unwrap_or(0) << 24;
    let (mut acked, mut nacked) = (BTreeSet::new(), BTreeSet::new());
    let mut pending = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(every);
    let mut i = 0u32;
    while !stop.load(SeqCst) {
        tick.tick().await;
        let mut headers = FieldTable::default();
        headers.insert(
            "task".into(),
            AMQPValue::LongString("reports.rebuild".into()),
        );
        let seq = id | i;
        let p = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &seq.to_be_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await
            .with_context(|| format!("{name}: publish {i} failed"))?;
        pending.push_back((seq, p));
        i += 1;
        while pending.len() > 64 {
            let (seq, p) = pending.pop_front().context("empty")?;
            match p.await? {
                Confirmation::Ack(_) => acked.insert(seq),
                _ => nacked.insert(seq),
            };
        }
    }
    for (seq, p) in pending {
        match tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .context("confirm lost")??
        {
            Confirmation::Ack(_) => acked.insert(seq),
            _ => nacked.insert(seq),
        };
    }
    ensure!(
        conn.status().connected(),
        "{name}: connection dropped during reloads"
    );
    conn.close(200, "bye".into()).await?;
    Ok((acked, nacked))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_drop_no_connection_and_lose_nothing() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let broker = Broker::connect().await?;
    let q = unique("reload-steady");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let cfg = ConfigFile::new(&format!("{}\n{}", quota("1000/s"), policy(&wasm, "1000/s")))?;
    let s = Sluice::start_file(&cfg.path).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for k in 0..4 {
        producers.push(tokio::spawn(steady_producer(
            s.url.clone(),
            format!("steady-{k}"),
            q.clone(),
            Duration::from_millis(5), // ~200/s each
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let shed = |s: &Sluice| {
        let s = s.admin;
        async move {
            let m = sluice_tests::http(s, "GET", "/metrics").await?.1;
            anyhow::Ok(sluice_tests::sum_metric(
                &m,
                "sluice_messages_total",
                &["verdict=\"shed\""],
            ))
        }
    };
    let mut applied = 0;
    for round in 0..20u32 {
        let version_before = running_version(&s).await?;
        let tight = round % 2 == 0;
        let body = match round {
            // Two broken configs in the middle: refused, the running one stays.
            7 => format!(
                "{}\n[[quota]]\nname = \"broken\"\nmessages = \"lots\"\n",
                quota("50/s")
            ),
            13 => format!(
                "{}\n{}",
                quota("50/s"),
                policy("/nonexistent/policy.wasm", "1/s")
            ),
            // The plugin is swapped for a new version (new config) every third round.
            _ if round % 3 == 0 => format!(
                "{}\n{}",
                quota(if tight { "50/s" } else { "1000/s" }),
                policy(&wasm, &format!("{}/s", 900 + round))
            ),
            _ => format!(
                "{}\n{}",
                quota(if tight { "50/s" } else { "1000/s" }),
                policy(&wasm, "1000/s")
            ),
        };
        cfg.write(&body)?;
        let (status, reply) = reload(&s).await?;
        if round == 7 || round == 13 {
            ensure!(
                status == 422,
                "broken config in round {round} must be refused: {reply}"
            );
            ensure!(
                running_version(&s).await? == version_before,
                "a refused reload changed the version"
            );
            continue;
        }
        // The file watcher may have applied it first; either way the new config is in force.
        ensure!(status == 200, "round {round}: {reply}");
        ensure!(
            running_version(&s).await? > version_before,
            "round {round}: version did not move"
        );
        applied += 1;
        // The new limit is observable within 1 s: a tight limit sheds, a loose one stops shedding.
        let t = Instant::now();
        let before = shed(&s).await?;
        if tight {
            let mut seen = false;
            while t.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if shed(&s).await? > before {
                    seen = true;
                    break;
                }
            }
            ensure!(
                seen,
                "round {round}: 50/s against 800/s did not shed within 1 s"
            );
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let settled = shed(&s).await?;
            tokio::time::sleep(Duration::from_millis(700)).await;
            ensure!(
                shed(&s).await? == settled,
                "round {round}: 1000/s still sheds 300 ms after the reload"
            );
        }
    }
    stop.store(true, SeqCst);
    let (mut acked, mut nacked) = (BTreeSet::new(), BTreeSet::new());
    for p in producers {
        let (a, n) = p.await??;
        acked.extend(a);
        nacked.extend(n);
    }
    ensure!(applied == 18);
    ensure!(
        !nacked.is_empty() && acked.len() > 1000,
        "acked {} nacked {}",
        acked.len(),
        nacked.len()
    );
    let mut held = BTreeSet::new();
    for b in broker.drain(&q).await? {
        held.insert(u32::from_be_bytes(b.as_slice().try_into()?));
    }
    ensure!(
        held == acked,
        "broker holds {}, clients saw {} acked",
        held.len(),
        acked.len()
    );
    let m = s.admin_get("/metrics").await?.1;
    ensure!(
        sluice_tests::sum_metric(&m, "sluice_config_reloads_total", &["result=\"error\""]) >= 2.0
    );
    ensure!(
        sluice_tests::sum_metric(&m, "sluice_messages_total", &["verdict=\"shed\""]) as usize
            == nacked.len()
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn broken_configs_are_refused_with_file_and_line_and_change_nothing() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let broker = Broker::connect().await?;
    let overflow = unique("reload-overflow");
    let _g = Queues::new([overflow.clone()]);
    broker.queue(&overflow).await?;
    let good = format!("{}\n{}", quota("100/s"), policy(&wasm, "10/s"));
    let cfg = ConfigFile::new(&good)?;
    let s = Sluice::start_file(&cfg.path).await?;
    let version = running_version(&s).await?;
    let garbage = cfg.dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm this is not a component")?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?;
    let file = cfg.path.display().to_string();

    // (config body, what the error must mention)
    let cases: Vec<(String, String)> = vec![
        (format!("{good}\n[[quota]]\nname = \"x\"\nmessages = \"10 per second\"\n"), format!("{file}:")),
        (format!("{good}\n[[quota]]\nname = \"steady\"\nmessages = \"10/s\"\n"), "duplicate quota name".into()),
        (format!("{good}\n[tarpit]\nrate = \"5/s\"\nspeed = 3\n"), "unknown field".into()),
        (format!("{good}\n[[quota]]\nname = \"d\"\nmessages = \"1/s\"\non_exceed = {{ divert = {{ exchange = \"\", routing_key = \"{}\" }} }}\n", unique("no-such-queue")), "does not exist".into()),
        (format!("{}\n[[policy]]\nname = \"bad\"\nplugin = \"{}\"\n", quota("1/s"), garbage.display()), "bad".into()),
        (format!("{}\n[[policy]]\nname = \"picky\"\nplugin = \"{wasm}\"\nconfig = {{ no_such_option = 1 }}\n", quota("1/s")), "no_such_option".into()),
        (format!("{}\n[[policy]]\nname = \"gone\"\nplugin = \"missing.wasm\"\n", quota("1/s")), "not found".into()),
    ];
    for (i, (body, expect)) in cases.iter().enumerate() {
        cfg.write(body)?;
        let (status, reply) = reload(&s).await?;
        let text = reply.to_string();
        ensure!(status == 422, "case {i} must be refused: {text}");
        ensure!(
            text.contains(expect.as_str()),
            "case {i}: expected '{expect}' in {text}"
        );
        ensure!(
            text.contains(&format!("{file}:")),
            "case {i}: no file:line in {text}"
        );
        ensure!(
            running_version(&s).await? == version,
            "case {i} changed the running config"
        );
        let (_, c) = sluice_tests::http_auth(s.admin, "GET", "/v1/config", Some(TOKEN)).await?;
        ensure!(
            c.contains("last_error") && !c.contains("\"last_error\":null"),
            "case {i}: /v1/config has no last_error"
        );
    }
    // A taken listener address: refused before anything changes.
    cfg.write(&good)?;
    let moved = std::fs::read_to_string(&cfg.path)?.replace(
        "listen = \"127.0.0.1:0\"\nupstream",
        &format!("listen = \"{taken_addr}\"\nupstream"),
    );
    std::fs::write(&cfg.path, &moved)?;
    let (status, reply) = reload(&s).await?;
    ensure!(
        status == 422 && reply.to_string().contains("cannot bind"),
        "taken address: {reply}"
    );
    ensure!(running_version(&s).await? == version);
    drop(taken);

    // The running config still works, and a good file applies again.
    cfg.write(&good)?;
    let (status, reply) = reload(&s).await?;
    ensure!(status == 200, "{reply}");
    let conn = connect(&s.url, "after-broken").await?;
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_changed_file_is_picked_up_by_the_watcher_within_a_second() -> Result<()> {
    let cfg = ConfigFile::new(&quota("100/s"))?;
    let s = Sluice::start_file(&cfg.path).await?;
    let v = running_version(&s).await?;
    cfg.write(&quota("200/s"))?;
    let t = Instant::now();
    while running_version(&s).await? == v {
        ensure!(
            t.elapsed() < Duration::from_secs(3),
            "the watcher did not reload the changed file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("watcher applied the change after {:?}", t.elapsed());
    let (_, body) = sluice_tests::http_auth(s.admin, "GET", "/v1/config", Some(TOKEN)).await?;
    ensure!(
        body.contains("200/s") || body.contains("200/1s") || body.contains("\\\"200/s\\\""),
        "new limit not shown: {body}"
    );
    s.stop().await;
    Ok(())
}

/// A change written while sluice starts (after it read the file, before its watcher first
/// looked) is applied: the watcher compares against the file as it was read, not as it first
/// sees it.
#[tokio::test]
async fn a_change_made_while_sluice_starts_is_not_missed() -> Result<()> {
    let cfg = ConfigFile::new(&quota("100/s"))?;
    let s = Sluice::start_file(&cfg.path).await?;
    // Nothing has yielded since the server started: on this single-threaded test runtime its
    // watcher task has not run yet.
    cfg.write(&quota("2500/s"))?;
    let t = Instant::now();
    loop {
        let (_, body) = sluice_tests::http_auth(s.admin, "GET", "/v1/config", Some(TOKEN)).await?;
        if body.contains("2500") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "a change made during start-up was never applied: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn dry_run_would_shed_matches_what_enforce_sheds_on_the_same_flood() -> Result<()> {
    let broker = Broker::connect().await?;
    let q = unique("reload-dry");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let rule = "[[quota]]\nname = \"flood\"\nmatch = { producer = \"flood-*\" }\nmessages = \"200/s\"\nburst = 50\non_exceed = \"shed\"\n";
    let cfg = ConfigFile::new(&format!("{rule}dry_run = true\n"))?;
    let s = Sluice::start_file(&cfg.path).await?;

    async fn flood(url: &str, name: &str, q: &str) -> Result<(usize, usize)> {
        let conn = connect(url, name).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut pending = Vec::new();
        for i in 0..2000u32 {
            pending.push(
                ch.basic_publish(
                    "".into(),
                    q.into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await?,
            );
        }
        let (mut a, mut n) = (0, 0);
        for p in pending {
            if p.await?.is_ack() {
                a += 1
            } else {
                n += 1
            }
        }
        conn.close(200, "bye".into()).await?;
        Ok((a, n))
    }
    let (acked, nacked) = flood(&s.url, "flood-dry", &q).await?;
    ensure!(
        acked == 2000 && nacked == 0,
        "dry run must forward everything: {acked} acked {nacked} nacked"
    );
    let would = s
        .metric(
            "sluice_messages_total",
            &["producer=\"flood-dry\"", "verdict=\"would_shed\""],
        )
        .await?;

    cfg.write(rule)?;
    let (status, reply) = reload(&s).await?;
    ensure!(status == 200, "{reply}");
    let (_, shed) = flood(&s.url, "flood-enforce", &q).await?;
    eprintln!("dry run would shed {would}, enforce shed {shed}");
    ensure!(shed > 0);
    let diff = (would - shed as f64).abs() / shed as f64;
    ensure!(
        diff <= 0.10,
        "would_shed {would} vs shed {shed}: {:.0}% apart",
        diff * 100.0
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_policy_failing_right_after_a_reload_is_rolled_back_to_the_last_good_version(
) -> Result<()> {
    let good = plugin("celery_task_quota")?;
    let bad = plugin("hostile_trap")?;
    let stage = |wasm: &str| {
        format!(
            "[[policy]]\nname = \"guard\"\nplugin = \"{wasm}\"\nfail = \"open\"\nmax_errors = 3\n\
             config = {{ limits = [{{ match = \"reports.*\", rate = \"5/s burst 5\" }}] }}\n"
        )
    };
    let cfg = ConfigFile::new(&stage(&good))?;
    let s = Sluice::start_file(&cfg.path).await?;
    // The new version traps on every message routed to "panic".
    cfg.write(&stage(&bad).replace(
        "config = { limits = [{ match = \"reports.*\", rate = \"5/s burst 5\" }] }\n",
        "",
    ))?;
    let (status, reply) = reload(&s).await?;
    ensure!(status == 200, "{reply}");

    let conn = connect(&s.url, "rollback-pub").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let publish = |task: &'static str| {
        let ch = ch.clone();
        async move {
            let mut headers = FieldTable::default();
            headers.insert("task".into(), AMQPValue::LongString(task.into()));
            // amq.topic with no binding: the broker drops it, but still confirms.
            let c = ch
                .basic_publish(
                    "amq.topic".into(),
                    "panic".into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default().with_headers(headers),
                )
                .await?
                .await?;
            anyhow::Ok(c.is_ack())
        }
    };
    // Failing open: every message passes while the bad version traps.
    for _ in 0..5 {
        ensure!(
            publish("reports.rebuild").await?,
            "fail-open policy must forward"
        );
    }
    let (_, body) = sluice_tests::http_auth(s.admin, "GET", "/v1/config", Some(TOKEN)).await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let p = &v["policies"][0];
    ensure!(p["rolled_back"] == true, "policy not rolled back: {p}");
    ensure!(
        p["running_hash"] != p["hash"],
        "rolled back but still running the failing version: {p}"
    );
    let m = s.admin_get("/metrics").await?.1;
    ensure!(
        sluice_tests::sum_metric(&m, "sluice_policy_rollbacks_total", &["policy=\"guard\""]) == 1.0
    );
    ensure!(
        p["errors"].as_u64() >= Some(3),
        "the failing version's errors are not reported: {p}"
    );
    // The last good version is in force again: its 5/s limit sheds a burst of reports tasks.
    let mut nacked = 0;
    for _ in 0..20 {
        if !publish("reports.rebuild").await? {
            nacked += 1;
        }
    }
    ensure!(nacked > 0, "the restored celery policy does not limit");
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn admin_api_needs_the_token_for_reload_and_config_but_not_for_probes() -> Result<()> {
    let cfg = ConfigFile::new(&quota("100/s"))?;
    let s = Sluice::start_file(&cfg.path).await?;
    let a = s.admin;
    use sluice_tests::http_auth;
    ensure!(http_auth(a, "POST", "/v1/reload", None).await?.0 == 401);
    ensure!(
        http_auth(
            a,
            "POST",
            "/v1/reload",
            Some("reload-test-token-0123456788")
        )
        .await?
        .0 == 401
    );
    ensure!(http_auth(a, "POST", "/v1/reload", Some(TOKEN)).await?.0 == 200);
    ensure!(http_auth(a, "GET", "/v1/config", None).await?.0 == 401);
    ensure!(http_auth(a, "GET", "/v1/producers", None).await?.0 == 401);
    ensure!(http_auth(a, "GET", "/v1/producers", Some(TOKEN)).await?.0 == 200);
    ensure!(http_auth(a, "GET", "/healthz", None).await?.0 == 200);
    ensure!(
        http_auth(a, "GET", "/metrics", None).await?.0 == 200,
        "metrics_open defaults to true"
    );
    let m = http_auth(a, "GET", "/metrics", None).await?.1;
    ensure!(sluice_tests::sum_metric(&m, "sluice_admin_auth_failures_total", &[]) == 4.0);
    s.stop().await;

    // Without a token, mutating endpoints stay closed even on loopback.
    let open = Sluice::start("").await?;
    let (status, body) = http_auth(open.admin, "POST", "/v1/reload", None).await?;
    ensure!(
        status == 401 && body.contains("token_file"),
        "{status} {body}"
    );
    open.stop().await;

    // A non-loopback admin address without a token is a config error.
    let text =
        "[admin]\nlisten = \"0.0.0.0:9999\"\n[[listener]]\nname = \"a\"\nprotocol = \"amqp091\"\n\
                listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:5672\"\n";
    let err = sluice::config::parse(text, Path::new("a.toml"))
        .err()
        .context("must be refused")?;
    ensure!(
        err.to_string()
            .contains("a.toml:2: admin.listen 0.0.0.0:9999 is not loopback"),
        "{err}"
    );
    Ok(())
}
