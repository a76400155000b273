//! Wasm policies in the chain with real lapin clients: a plugin's shed and divert behave exactly
//! like a quota's (confirms renumbered, nothing lost), critical traffic passes at full rate, and
//! dry-run only counts.

use anyhow::{ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use sluice_tests::{connect, unique, Broker, Queues, Sluice};
use std::collections::BTreeSet;
use std::time::Duration;

/// A built example plugin (`make plugins` puts them in `plugins/dist/`).
fn plugin(name: &str) -> Result<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    ensure!(
        p.is_file(),
        "{} is missing: run `make plugins` first",
        p.display()
    );
    Ok(p.canonicalize()?.display().to_string())
}

/// Publish Celery-like tasks: `n` per task name, interleaved, body = global sequence number.
/// Returns, per task name, (acked seqs, nacked seqs).
async fn publish_tasks(
    ch: &Channel,
    queue: &str,
    tasks: &[&str],
    n: u32,
) -> Result<Vec<(BTreeSet<u32>, BTreeSet<u32>)>> {
    let mut pending = Vec::new();
    let mut seq = 0u32;
    for i in 0..n {
        for (t, task) in tasks.iter().enumerate() {
            let mut headers = FieldTable::default();
            headers.insert("task".into(), AMQPValue::LongString((*task).into()));
            headers.insert(
                "id".into(),
                AMQPValue::LongString(format!("{task}-{i}").as_str().into()),
            );
            headers.insert("lang".into(), AMQPValue::LongString("py".into()));
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers);
            let p = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &seq.to_be_bytes(),
                    props,
                )
                .await?;
            pending.push((t, seq, p));
            seq += 1;
        }
    }
    let mut out = vec![(BTreeSet::new(), BTreeSet::new()); tasks.len()];
    for (t, s, p) in pending {
        match tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .context("confirm never came")??
        {
            Confirmation::Ack(None) => out[t].0.insert(s),
            Confirmation::Nack(None) => out[t].1.insert(s),
            other => anyhow::bail!("unexpected confirmation {other:?}"),
        };
    }
    Ok(out)
}

async fn seqs_in(broker: &Broker, q: &str) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for b in broker.drain(q).await? {
        let arr: [u8; 4] = b
            .as_slice()
            .try_into()
            .context("body is not a sequence number")?;
        ensure!(
            out.insert(u32::from_be_bytes(arr)),
            "duplicate message in {q}"
        );
    }
    Ok(out)
}

#[tokio::test]
async fn celery_plugin_sheds_excess_task_with_nack_while_critical_tasks_pass() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let s = Sluice::start(&format!(
        r#"
[[policy]]
name = "celery-tasks"
plugin = "{wasm}"
config = {{ limits = [{{ match = "reports.*", rate = "20/s burst 10" }}], critical = ["auth.*"], on_exceed = "shed" }}
"#
    ))
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("plugin-shed");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let conn = connect(&s.url, "celery-web").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let r = publish_tasks(&ch, &q, &["reports.rebuild", "auth.login_audit"], 300).await?;
    let (reports_ok, reports_nack) = &r[0];
    let (auth_ok, auth_nack) = &r[1];
    ensure!(
        auth_nack.is_empty() && auth_ok.len() == 300,
        "critical tasks must all pass: {} nacked",
        auth_nack.len()
    );
    ensure!(
        !reports_nack.is_empty(),
        "the flooding task must be limited"
    );
    ensure!(reports_ok.len() + reports_nack.len() == 300);
    ensure!(reports_ok.len() >= 10, "the burst passes");
    // Nacks from the plugin go through the same tag map: the broker holds exactly the acked.
    let acked: BTreeSet<u32> = reports_ok.union(auth_ok).copied().collect();
    ensure!(
        seqs_in(&broker, &q).await? == acked,
        "broker content differs from what the client saw acked"
    );
    let shed = s
        .metric(
            "sluice_messages_total",
            &["producer=\"celery-web\"", "verdict=\"shed\""],
        )
        .await?;
    ensure!(
        shed as usize == reports_nack.len(),
        "shed metric {shed} != nacks {}",
        reports_nack.len()
    );
    let limited = s
        .metric(
            "sluice_plugin_events_total",
            &["policy=\"celery-tasks\"", "name=\"limited\""],
        )
        .await?;
    ensure!(
        limited as usize == reports_nack.len(),
        "plugin counter {limited}"
    );
    let evals = s.admin_get("/metrics").await?.1;
    ensure!(
        evals.contains("sluice_policy_eval_seconds_count{policy=\"celery-tasks\"}"),
        "no eval histogram"
    );
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn celery_plugin_divert_lands_excess_in_overflow_and_loses_nothing() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let broker = Broker::connect().await?;
    let (q, overflow) = (unique("plugin-divert"), unique("plugin-overflow"));
    let _g = Queues::new([q.clone(), overflow.clone()]);
    broker.queue(&q).await?;
    broker.queue(&overflow).await?;
    let s = Sluice::start(&format!(
        r#"
[[policy]]
name = "celery-divert"
plugin = "{wasm}"
config = {{ limits = [{{ match = "reports.*", rate = "20/s burst 10" }}], critical = ["auth.*"], on_exceed = {{ divert = {{ exchange = "", routing_key = "{overflow}" }} }} }}
"#
    ))
    .await?;
    let conn = connect(&s.url, "celery-divert").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let r = publish_tasks(&ch, &q, &["reports.rebuild", "auth.login_audit"], 300).await?;
    ensure!(r.iter().all(|(_, n)| n.is_empty()), "divert must not nack");
    let main = seqs_in(&broker, &q).await?;
    let over = seqs_in(&broker, &overflow).await?;
    ensure!(!over.is_empty(), "excess reports must be diverted");
    ensure!(over.is_subset(&r[0].0), "only the limited task is diverted");
    ensure!(
        r[1].0.is_subset(&main),
        "critical tasks stay in their queue"
    );
    ensure!(
        main.len() + over.len() == 600,
        "main {} + overflow {} != 600",
        main.len(),
        over.len()
    );
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn dry_run_policy_counts_would_shed_and_forwards_everything() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let s = Sluice::start(&format!(
        r#"
[[policy]]
name = "celery-dry"
plugin = "{wasm}"
dry_run = true
config = {{ limits = [{{ match = "reports.*", rate = "20/s burst 10" }}], on_exceed = "shed" }}
"#
    ))
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("plugin-dry");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let conn = connect(&s.url, "celery-dry").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let r = publish_tasks(&ch, &q, &["reports.rebuild"], 300).await?;
    ensure!(
        r[0].1.is_empty() && r[0].0.len() == 300,
        "dry run must forward everything"
    );
    ensure!(broker.settled_depth(&q).await? == 300);
    let would = s
        .metric(
            "sluice_messages_total",
            &["producer=\"celery-dry\"", "verdict=\"would_shed\""],
        )
        .await?;
    ensure!(would > 0.0 && would < 300.0, "would_shed = {would}");
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn plugin_divert_to_a_missing_queue_is_shed_not_a_channel_close() -> Result<()> {
    let wasm = plugin("celery_task_quota")?;
    let missing = unique("no-such-overflow");
    let s = Sluice::start(&format!(
        r#"
[[policy]]
name = "divert-nowhere"
plugin = "{wasm}"
config = {{ limits = [{{ match = "reports.*", rate = "20/s burst 10" }}], on_exceed = {{ divert = {{ exchange = "", routing_key = "{missing}" }} }} }}
"#
    ))
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("plugin-divert-missing");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let conn = connect(&s.url, "divert-nowhere").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let r = publish_tasks(&ch, &q, &["reports.rebuild"], 100).await?;
    let (acked, nacked) = &r[0];
    ensure!(
        !nacked.is_empty(),
        "diverts to a missing queue must be nacked"
    );
    ensure!(acked.len() + nacked.len() == 100);
    ensure!(
        ch.status().connected(),
        "the client's channel must stay open"
    );
    ensure!(seqs_in(&broker, &q).await? == *acked);
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}
