//! `[limits] max_buffered_total`: bytes buffered over all connections are bounded. A publish
//! whose content does not fit waits before its body is read (its connection's reads pause:
//! backpressure, not an error) until other connections free enough, and is counted in
//! `sluice_limit_hits_total{limit="max_buffered_total"}`; `sluice_buffered_bytes` shows the total.
//! `[limits] max_read_ahead`: how far a paced connection is read ahead of its waiting publishes.

use anyhow::{ensure, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use sluice_tests::{unique, wire, Broker, Bystander, Queues, RawAmqp, Sluice};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const LIMIT: u64 = 64 * KIB;
const WAIT: Duration = Duration::from_secs(20);

/// How the client stuck in the middle of its publish lets go.
#[derive(Clone, Copy, Debug)]
enum Frees {
    /// It sends the rest of its body: its publish completes and is forwarded.
    Finishing,
    /// Its socket goes away: what it had buffered is dropped.
    Disconnecting,
}

/// Publishers on their own connections: `count` confirmed publishes of `size` bytes each, one
/// at a time; returns the number acked so far.
fn publisher(url: String, queue: String, count: u64, size: usize) -> Arc<AtomicU64> {
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    tokio::spawn(async move {
        let r = async {
            let conn = sluice_tests::connect(&url, &unique("waiting-pub")).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            for _ in 0..count {
                let c = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &vec![7u8; size],
                        lapin::BasicProperties::default(),
                    )
                    .await?
                    .await?;
                ensure!(c.is_ack(), "a publish was nacked");
                a.fetch_add(1, SeqCst);
            }
            conn.close(200, "bye".into()).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = r {
            eprintln!("publisher failed: {e:#}");
        }
    });
    acked
}

async fn stuck_client_holds_others_under_the_total(frees: Frees) -> Result<()> {
    // Room for the stuck client's 56 KiB content and small publishes, not for a 16 KiB one
    // next to it.
    let s = Sluice::start(&format!(
        "[limits]\nmax_buffered_total = \"{LIMIT}B\"\nmax_message_size = \"60KiB\"\n"
    ))
    .await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let (stuck_q, q) = (unique("total-stuck"), unique("total-waiting"));
    let _g = Queues::new([stuck_q.clone(), q.clone()]);
    broker.queue(&stuck_q).await?;
    broker.queue(&q).await?;

    // The stuck client: a 56 KiB publish of which it sends 8 KiB, then nothing.
    let mut stuck = RawAmqp::open(RawAmqp::addr_of(&s.url)?, &unique("stuck")).await?;
    stuck.open_channel(1).await?;
    let declared = 56 * KIB as usize;
    let mut bytes = wire::basic_publish(1, "", &stuck_q);
    bytes.extend(wire::content_header(1, declared as u64));
    bytes.extend(wire::body(1, &vec![1u8; 8 * KIB as usize]));
    stuck.send(&bytes).await?;
    let deadline = Instant::now() + WAIT;
    while s.metric("sluice_buffered_bytes", &[]).await? < declared as f64 {
        ensure!(
            Instant::now() < deadline,
            "the stuck publish never showed in sluice_buffered_bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Two publishers of 16 KiB messages: neither fits next to it.
    let a = publisher(s.url.clone(), q.clone(), 3, 16 * KIB as usize);
    let b = publisher(s.url.clone(), q.clone(), 3, 16 * KIB as usize);
    let mut peak = 0f64;
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        peak = peak.max(s.metric("sluice_buffered_bytes", &[]).await?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        peak <= LIMIT as f64,
        "sluice_buffered_bytes reached {peak}, over max_buffered_total = {LIMIT}"
    );
    ensure!(
        a.load(SeqCst) == 0 && b.load(SeqCst) == 0,
        "a 16 KiB publish was confirmed while it could not fit under the total"
    );
    ensure!(
        broker.depth(&q).await? == 0,
        "a publish that did not fit reached the broker"
    );
    ensure!(
        s.metric("sluice_limit_hits_total", &["limit=\"max_buffered_total\""])
            .await?
            >= 2.0,
        "the waiting publishes were not counted in sluice_limit_hits_total"
    );
    // Small publishes that fit still go through.
    bystander
        .alive("while the stuck client holds most of the total")
        .await?;

    match frees {
        Frees::Finishing => {
            stuck
                .send(&wire::body(1, &vec![1u8; declared - 8 * KIB as usize]))
                .await?
        }
        Frees::Disconnecting => drop(stuck),
    }
    let deadline = Instant::now() + WAIT;
    while a.load(SeqCst) < 3 || b.load(SeqCst) < 3 {
        ensure!(
            Instant::now() < deadline,
            "publishers did not proceed once the stuck client let go ({frees:?}): {} and {} of 3 acked",
            a.load(SeqCst),
            b.load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        broker.settled_depth(&q).await? == 6,
        "not every confirmed publish is in the broker"
    );
    let stuck_depth = broker.settled_depth(&stuck_q).await?;
    match frees {
        Frees::Finishing => ensure!(
            stuck_depth == 1,
            "the finished publish is not in the broker"
        ),
        Frees::Disconnecting => ensure!(
            stuck_depth == 0,
            "half a publish reached the broker after its client went away"
        ),
    }
    bystander.finish().await?;
    // Nothing is left counted once the connections are gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = s.metric("sluice_buffered_bytes", &[]).await?;
        if left == 0.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{left} bytes still counted in sluice_buffered_bytes after every publish ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_mid_publish_holds_others_under_max_buffered_total_until_it_finishes(
) -> Result<()> {
    stuck_client_holds_others_under_the_total(Frees::Finishing).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_mid_publish_that_disconnects_frees_its_share_of_max_buffered_total(
) -> Result<()> {
    stuck_client_holds_others_under_the_total(Frees::Disconnecting).await
}

#[tokio::test]
async fn max_buffered_total_below_max_message_size_is_a_config_error() -> Result<()> {
    let err =
        Sluice::start("[limits]\nmax_buffered_total = \"1MiB\"\nmax_message_size = \"2MiB\"\n")
            .await
            .err()
            .context("a total smaller than one message was accepted")?;
    let text = format!("{err:#}");
    ensure!(
        text.contains("max_buffered_total") && text.contains("max_message_size"),
        "unclear error: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn publishes_interleaved_on_one_connection_never_wait_for_each_other() -> Result<()> {
    // Two 40 KiB publishes interleaved on two channels: the second content header does not fit
    // next to the first publish, whose body is still to come behind it on the same socket. If
    // it waited for room, nothing could ever free any.
    let s = Sluice::start(&format!(
        "[limits]\nmax_buffered_total = \"{LIMIT}B\"\nmax_message_size = \"60KiB\"\n"
    ))
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("total-interleaved");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let mut c = RawAmqp::open(RawAmqp::addr_of(&s.url)?, &unique("interleaver")).await?;
    for ch in [1u16, 2] {
        c.open_channel(ch).await?;
        c.send(&wire::confirm_select(ch)).await?;
        c.expect(ch, (85, 11)).await?;
    }
    let half = vec![3u8; 20 * KIB as usize];
    let mut bytes = Vec::new();
    for ch in [1u16, 2] {
        bytes.extend(wire::basic_publish(ch, "", &q));
        bytes.extend(wire::content_header(ch, 2 * half.len() as u64));
        bytes.extend(wire::body(ch, &half));
    }
    for ch in [1u16, 2] {
        bytes.extend(wire::body(ch, &half));
    }
    c.send(&bytes).await?;
    let mut acked = [false, false];
    while acked != [true, true] {
        let f = c
            .next_method(WAIT)
            .await
            .context("the interleaved publishes were never confirmed")?;
        ensure!(
            f.method_id() == Some((60, 80)),
            "expected basic.ack, got {:?} on channel {}: {:?}",
            f.method_id(),
            f.channel,
            f.close_reason()
        );
        if let Some(a) = acked.get_mut(usize::from(f.channel).saturating_sub(1)) {
            *a = true;
        }
    }
    ensure!(
        broker.settled_depth(&q).await? == 2,
        "not both in the broker"
    );
    s.stop().await;
    Ok(())
}

/// A producer paced far below what it writes is still read, ahead of its waiting publishes, so
/// that its TCP receive window keeps opening (a client with a short `TCP_USER_TIMEOUT` would
/// otherwise abort its socket), but only up to `[limits] max_read_ahead`: the bytes it holds are
/// in `sluice_buffered_bytes`, the stop is counted, and every publish lands, in order.
#[tokio::test]
async fn a_paced_producer_is_read_ahead_up_to_max_read_ahead_and_loses_nothing() -> Result<()> {
    const AHEAD: u64 = 512 * KIB;
    const N: u32 = 48;
    const SIZE: usize = 32 * 1024;
    let s = Sluice::start(&format!(
        r#"
[limits]
max_read_ahead = "{AHEAD}B"

[[quota]]
name = "paced"
match = {{ producer = "read-ahead-*" }}
messages = "8/s"
burst = 1
on_exceed = {{ delay = "60s" }}
"#
    ))
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("read-ahead");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    // 48 publishes of 32 KiB (1.5 MiB) written as fast as the socket takes them, no confirms:
    // paced to 8/s (256 KiB/s), slower than sluice reads a waiting connection ahead.
    let mut c = RawAmqp::open(RawAmqp::addr_of(&s.url)?, &unique("read-ahead")).await?;
    c.open_channel(1).await?;
    let queue = q.clone();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let mut body = vec![0u8; SIZE];
            body[..4].copy_from_slice(&i.to_be_bytes());
            c.send(&wire::publish(1, &queue, &body)).await?;
        }
        anyhow::Ok(c)
    });

    // At 8/s the publishes take 6 s to go through; sample what sluice holds meanwhile.
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.depth(&q).await? < N && Instant::now() < deadline {
        peak = peak.max(s.metric("sluice_buffered_bytes", &[]).await?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = writer.await??;
    let hits = s
        .metric("sluice_limit_hits_total", &["limit=\"max_read_ahead\""])
        .await?;
    eprintln!("read ahead: peak {peak:.0} B buffered (max_read_ahead {AHEAD}), {hits} stops");
    // Read ahead: far more than the one publish being decided (32 KiB) ...
    ensure!(
        peak >= (AHEAD / 2) as f64,
        "peak {peak} B buffered: the paced producer was not read ahead"
    );
    // ... and never past the bound (plus the publish being decided and one being assembled).
    ensure!(
        peak <= (AHEAD + 2 * (SIZE as u64 + KIB)) as f64,
        "peak {peak} B buffered is past max_read_ahead = {AHEAD}"
    );
    ensure!(hits >= 1.0, "reaching max_read_ahead was not counted");
    let bodies = broker.drain(&q).await?;
    let seqs: Vec<u32> = bodies
        .iter()
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    ensure!(
        seqs == (0..N).collect::<Vec<_>>(),
        "{} of {N} publishes in the queue, or out of order",
        seqs.len()
    );
    c.send(&wire::method(0, 10, 50, &[0, 200, 0, 0, 0, 0, 0]))
        .await
        .context("connection.close")?;
    s.stop().await;
    Ok(())
}
