//! Everything that is not limited passes through sluice untouched: lapin clients see the same
//! broker behaviour as direct.

use anyhow::{ensure, Context, Result};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sluice_tests::{connect, unique, Broker, Queues, Sluice};
use std::time::Duration;

/// No quota: every publish is forwarded as it came.
async fn plain_sluice() -> Result<Sluice> {
    Sluice::start("").await
}

#[tokio::test]
async fn publish_consume_ack_round_trip_preserves_body_and_properties() -> Result<()> {
    let s = plain_sluice().await?;
    let broker = Broker::connect().await?;
    let q = unique("rt");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let conn = connect(&s.url, "roundtrip").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "task".into(),
        lapin::types::AMQPValue::LongString("reports.rebuild".into()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_app_id("billing".into())
        .with_message_id("m-1".into())
        .with_headers(headers);
    for i in 0..50u32 {
        let body = format!("{{\"n\":{i}}}");
        let c = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props.clone(),
            )
            .await?
            .await?;
        ensure!(c.is_ack(), "publish {i} not acked: {c:?}");
    }

    let consumer = conn.create_channel().await?;
    let mut deliveries = consumer
        .basic_consume(
            q.as_str().into(),
            "rt".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for i in 0..50u32 {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .context("delivery timed out")?
            .context("consumer ended")??;
        ensure!(
            d.data == format!("{{\"n\":{i}}}").as_bytes(),
            "body {i} changed"
        );
        ensure!(d.properties.app_id().as_ref().map(|s| s.as_str()) == Some("billing"));
        ensure!(d.properties.message_id().as_ref().map(|s| s.as_str()) == Some("m-1"));
        let task = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("task").cloned());
        ensure!(
            matches!(task, Some(lapin::types::AMQPValue::LongString(ref v)) if v.to_string() == "reports.rebuild"),
            "header changed: {task:?}"
        );
        d.ack(BasicAckOptions::default()).await?;
    }
    conn.close(200, "bye".into()).await?;
    ensure!(
        broker.settled_depth(&q).await? == 0,
        "acked messages must leave the queue"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn several_channels_publishing_interleaved_all_arrive_intact() -> Result<()> {
    let s = plain_sluice().await?;
    let broker = Broker::connect().await?;
    let q = unique("interleave");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let conn = connect(&s.url, "interleave").await?;
    let mut tasks = Vec::new();
    for c in 0..6u32 {
        let ch = conn.create_channel().await?;
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let mut pending = Vec::new();
            for i in 0..300u32 {
                // Sizes vary so that some publishes span several body frames.
                let size = 16 + ((i * 7919 + c * 104729) % 300_000) as usize;
                let mut body = vec![(c as u8) ^ (i as u8); size];
                body[..8].copy_from_slice(&[
                    c as u8,
                    0,
                    0,
                    0,
                    (i >> 24) as u8,
                    (i >> 16) as u8,
                    (i >> 8) as u8,
                    i as u8,
                ]);
                pending.push(
                    ch.basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await?,
                );
            }
            for p in pending {
                ensure!(p.await?.is_ack());
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let bodies = broker.drain(&q).await?;
    ensure!(
        bodies.len() == 6 * 300,
        "expected 1800 messages, got {}",
        bodies.len()
    );
    let mut seen = std::collections::HashSet::new();
    for b in &bodies {
        let c = b[0] as u32;
        let i = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let size = 16 + ((i * 7919 + c * 104729) % 300_000) as usize;
        ensure!(
            b.len() == size,
            "message {c}/{i}: {} bytes, expected {size}",
            b.len()
        );
        ensure!(
            b[8..].iter().all(|&x| x == (c as u8) ^ (i as u8)),
            "message {c}/{i} corrupted"
        );
        seen.insert((c, i));
    }
    ensure!(seen.len() == 1800, "duplicates among delivered messages");
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn five_mib_message_split_across_frames_arrives_whole() -> Result<()> {
    let s = plain_sluice().await?;
    let broker = Broker::connect().await?;
    let q = unique("big");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let body: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let conn = connect(&s.url, "bigpub").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let c = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await?
        .await?;
    ensure!(c.is_ack());
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("queue empty")?;
    ensure!(
        got.delivery.data.len() == body.len(),
        "length {}",
        got.delivery.data.len()
    );
    ensure!(got.delivery.data == body, "content changed");
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn transactions_commit_and_rollback_pass_through() -> Result<()> {
    let s = plain_sluice().await?;
    let broker = Broker::connect().await?;
    let q = unique("tx");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let conn = connect(&s.url, "txpub").await?;
    let ch = conn.create_channel().await?;
    ch.tx_select().await?;
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await?;
    }
    ch.tx_rollback().await?;
    for i in 0..7u8 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await?;
    }
    ch.tx_commit().await?;
    ensure!(
        broker.settled_depth(&q).await? == 7,
        "rolled back publishes must not arrive"
    );
    conn.close(200, "bye".into()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn basic_get_and_prefetch_consumers_work() -> Result<()> {
    let s = plain_sluice().await?;
    let broker = Broker::connect().await?;
    let q = unique("prefetch");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let conn = connect(&s.url, "consumer").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for i in 0..400u32 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await?;
    }
    ch.wait_for_confirms().await?;

    // basic.get, one message at a time.
    for i in 0..5u32 {
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await?
            .context("basic.get-empty on a full queue")?;
        ensure!(m.delivery.data == i.to_be_bytes());
        m.delivery.ack(BasicAckOptions::default()).await?;
    }

    // Two consumers with prefetch 10 share the rest; each acks.
    let mut handles = Vec::new();
    let total = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    for k in 0..2 {
        let c = conn.create_channel().await?;
        c.basic_qos(10, BasicQosOptions::default()).await?;
        let mut stream = c
            .basic_consume(
                q.as_str().into(),
                format!("c{k}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let total = total.clone();
        handles.push(tokio::spawn(async move {
            while total.load(std::sync::atomic::Ordering::SeqCst) < 395 {
                match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                    Ok(Some(d)) => {
                        let d = d?;
                        total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        d.ack(BasicAckOptions::default()).await?;
                    }
                    Ok(None) => break,
                    Err(_) => continue,
                }
            }
            anyhow::Ok(())
        }));
    }
    let wait = tokio::time::timeout(Duration::from_secs(30), async {
        for h in handles {
            h.await??;
        }
        anyhow::Ok(())
    })
    .await;
    wait.context("consumers did not finish")??;
    ensure!(total.load(std::sync::atomic::Ordering::SeqCst) == 395);
    conn.close(200, "bye".into()).await?;
    ensure!(broker.settled_depth(&q).await? == 0);
    s.stop().await;
    Ok(())
}
