//! Connection-level behaviour: the tarpit against reconnect storms, clear errors when the
//! broker is unreachable, graceful shutdown, and the admin API.

use anyhow::{ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use sluice_tests::{connect, unique, Broker, Queues, Sluice};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Several worker threads: the storm's 50 clients must really be concurrent.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn connection_flood_is_tarpitted_while_another_producer_connects_at_once() -> Result<()> {
    let s = Sluice::start(
        r#"
[tarpit]
rate = "5/s"
burst = 10
max_delay = "1s"
"#,
    )
    .await?;
    let url = s.url.clone();
    let (ok, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let started = Instant::now();
    // 500 attempts from one producer, 50 at a time, each closed as soon as it is open.
    let mut workers = Vec::new();
    for _ in 0..50 {
        let (url, ok, refused) = (url.clone(), ok.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..10 {
                match connect(&url, "storm").await {
                    Ok(c) => {
                        ok.fetch_add(1, SeqCst);
                        let _ = c.close(200, "bye".into()).await;
                    }
                    Err(e) => {
                        let text = e.to_string();
                        refused.fetch_add(1, SeqCst);
                        if !text.contains("NOT_ALLOWED")
                            && !text.contains("530")
                            && !text.contains("too many")
                        {
                            eprintln!("unexpected connect error: {text}");
                        }
                    }
                }
            }
        }));
    }

    // While the storm runs, another producer connects without waiting in the storm's tarpit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let calm = connect(&url, "calm-conn").await?;
    let calm_took = t.elapsed();
    ensure!(
        calm_took < Duration::from_secs(1),
        "an unrelated producer waited {calm_took:?}"
    );
    let ch = calm.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    calm.close(200, "bye".into()).await?;

    for w in workers {
        w.await?;
    }
    let took = started.elapsed().as_secs_f64();
    let (ok, refused) = (ok.load(SeqCst), refused.load(SeqCst));
    eprintln!("storm: {ok} connected, {refused} refused in {took:.1}s");
    ensure!(ok + refused == 500);
    // Never more than burst + rate × time get through.
    let allowed = 10.0 + 5.0 * took + 5.0;
    ensure!(
        f64::from(ok) <= allowed,
        "{ok} connections got through, the tarpit allows ~{allowed:.0}"
    );
    ensure!(refused > 0, "the storm must be refused past max_delay");
    // Refusals are paced too: 50 workers × 10 attempts cannot finish in under a second.
    ensure!(
        took > 2.0,
        "storm finished in {took:.1}s: refusals are not paced"
    );
    ensure!(s.metric("sluice_connections_tarpitted_total", &[]).await? > 0.0);
    ensure!(s.metric("sluice_connections_refused_total", &[]).await? == f64::from(refused));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn unreachable_broker_gets_the_client_a_clear_close() -> Result<()> {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{dead}\"\n"
    );
    let config = sluice::config::validate::parse(&text, std::path::Path::new("t.toml"))
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let server = sluice::Server::start(config)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let addr = server.listener_addr("amqp").context("no listener")?;
    let err = connect(&format!("amqp://guest:guest@{addr}/%2f"), "lonely")
        .await
        .err()
        .context("connecting through sluice to a dead broker must fail")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("upstream") || msg.contains("broker"),
        "close reason should name the broker: {msg}"
    );
    let (status, _) = sluice_tests::http(server.admin_addr(), "GET", "/readyz").await?;
    ensure!(
        status == 503,
        "/readyz must fail while the broker is unreachable, got {status}"
    );
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_delivers_every_confirmed_publish_and_closes_cleanly() -> Result<()> {
    let s = Sluice::start("").await?;
    let broker = Broker::connect().await?;
    let q = unique("shutdown");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let conn = connect(&s.url, "shutdown-pub").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = Vec::new();
    for i in 0..500u32 {
        pending.push(
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await?,
        );
    }
    s.stop().await;
    let mut acked = 0u32;
    for p in pending {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), p).await {
            if c.is_ack() {
                acked += 1;
            }
        }
    }
    ensure!(
        !conn.status().connected(),
        "the client must see its connection closed"
    );
    let held = broker.settled_depth(&q).await?;
    ensure!(
        held >= acked,
        "{acked} confirmed but only {held} in the broker"
    );
    Ok(())
}

#[tokio::test]
async fn admin_api_reports_health_readiness_producers_and_config() -> Result<()> {
    let s = Sluice::start(
        r#"
[[quota]]
name = "admin-view"
match = { producer = "admin-*" }
messages = "1000/s"
"#,
    )
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("admin");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let conn = connect(&s.url, "admin-pub").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for i in 0..20u32 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await?
        .await?;
    }
    ensure!(s.admin_get("/healthz").await?.0 == 200);
    // Readiness follows the upstream probe, which runs every 2 s.
    let mut ready = 0;
    for _ in 0..30 {
        ready = s.admin_get("/readyz").await?.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        ready == 200,
        "/readyz with a reachable broker answered {ready}"
    );
    let (status, body) = s.admin_get("/v1/producers").await?;
    ensure!(status == 200);
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let text = v.to_string();
    ensure!(
        text.contains("admin-pub"),
        "/v1/producers does not list the producer: {text}"
    );
    let (status, body) = s.admin_get("/v1/config").await?;
    ensure!(
        status == 200 && body.contains("admin-view"),
        "/v1/config: {status} {body}"
    );
    let metrics = s.admin_get("/metrics").await?.1;
    ensure!(
        sluice_tests::sum_metric(
            &metrics,
            "sluice_messages_total",
            &["producer=\"admin-pub\"", "verdict=\"forward\""]
        ) == 20.0
    );
    ensure!(
        sluice_tests::sum_metric(&metrics, "sluice_connections", &["listener=\"amqp\""]) >= 1.0
    );
    ensure!(metrics.contains("sluice_upstream_blocked"));
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[test]
fn check_reports_every_problem_with_file_and_line() -> Result<()> {
    let dir = std::env::temp_dir().join(unique("check"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("broken.toml");
    std::fs::write(
        &file,
        r#"[admin]
listen = "127.0.0.1:9090"

[[listener]]
name = "amqp"
protocol = "amqp091"
listen = "127.0.0.1:5673"
upstream = "127.0.0.1:5672"

[[quota]]
name = "a"
messages = "fast"
burst = 10

[[quota]]
name = "b"
messages = "10/s"
on_exceed = { delay = "soon" }
"#,
    )?;
    let out = std::process::Command::new(sluice_tests::sluice_bin()?)
        .arg("check")
        .arg(&file)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success(),
        "check must fail on a broken file:\n{text}"
    );
    ensure!(
        text.contains("broken.toml:12"),
        "the bad rate on line 12 is not reported:\n{text}"
    );
    ensure!(
        text.contains("broken.toml:18"),
        "the bad delay on line 18 is not reported:\n{text}"
    );
    let good = std::process::Command::new(sluice_tests::sluice_bin()?)
        .arg("check")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sluice.toml"
        ))
        .output()?;
    ensure!(
        good.status.success(),
        "the example config must pass: {}",
        String::from_utf8_lossy(&good.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
