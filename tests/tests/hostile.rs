//! Hostile clients: bytes no real client sends, clients that stall or stop reading, floods of
//! connections and of noise. Each test checks the hostile connection gets a clear answer (an
//! AMQP close with the right code, or the protocol header and a closed socket), that sluice's
//! memory stays bounded where that is the point, and that a well-behaved client on another
//! connection ([`Bystander`]) keeps publishing with confirms and consuming throughout.

use anyhow::{bail, ensure, Context, Result};
use sluice_tests::{
    assert_upstream_closed_cleanly, rss_bytes, unique, wait_broker_connection_gone, wire, Broker,
    Bystander, Queues, RawAmqp, Sluice,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tests that measure this process's memory, or load it heavily, run one at a time so they do
/// not see each other's allocations.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1024 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn addr(s: &Sluice) -> Result<SocketAddr> {
    RawAmqp::addr_of(&s.url)
}

/// A raw connection through sluice, open, with channel 1 open.
async fn raw_with_channel(s: &Sluice, name: &str) -> Result<RawAmqp> {
    let mut c = RawAmqp::open(addr(s)?, name).await?;
    c.open_channel(1).await?;
    Ok(c)
}

/// Expect sluice to close the connection with `code`, then close the socket.
async fn expect_closed_with(c: &mut RawAmqp, code: u16, what: &str) -> Result<String> {
    let (got, text) = c
        .expect_connection_close(WAIT)
        .await
        .with_context(|| format!("{what}: no connection.close"))?;
    ensure!(
        got == code,
        "{what}: expected connection.close {code}, got {got} ({text})"
    );
    c.expect_eof(WAIT)
        .await
        .with_context(|| format!("{what}: socket not closed after connection.close"))?;
    Ok(text)
}

async fn metric(s: &Sluice, name: &str, labels: &[&str]) -> Result<f64> {
    s.metric(name, labels).await
}

/// Tiny xorshift generator: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

#[tokio::test]
async fn wrong_protocol_header_is_answered_with_amqp_0_9_1_header_and_closed() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let headers: [&[u8]; 4] = [
        b"AMQP\x00\x01\x00\x00",                         // AMQP 1.0
        b"AMQP\x01\x01\x00\x09",                         // 0-9 with the old class octet
        b"GET / HTTP/1.1\r\n\r\n",                       // not AMQP at all
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello on the plain port
    ];
    for h in headers {
        let mut c = RawAmqp::connect(addr(&s)?).await?;
        c.send(h).await?;
        let answer = c.read_exact(8, WAIT).await?;
        ensure!(
            answer == wire::PROTOCOL_HEADER,
            "answer to {h:?} was {answer:?}, not AMQP's own header"
        );
        c.expect_eof(WAIT).await.context("socket left open")?;
    }
    bystander.alive("after wrong headers").await?;
    ensure!(metric(&s, "sluice_protocol_errors_total", &[]).await? >= 4.0);
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_frame_end_gets_501_and_the_upstream_is_closed_cleanly() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let name = unique("bad-end");
    let mut c = raw_with_channel(&s, &name).await?;
    let mut f = wire::queue_declare(1, "whatever");
    *f.last_mut().context("empty frame")? = 0x00;
    c.send(&f).await?;
    let text = expect_closed_with(&mut c, 501, "bad frame end").await?;
    ensure!(
        text.contains("frame end"),
        "reason does not say why: {text}"
    );
    assert_upstream_closed_cleanly(&name).await?;
    bystander.alive("after a bad frame end").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn oversized_frame_gets_501_without_sluice_waiting_for_its_payload() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let name = unique("oversized");
    let mut c = raw_with_channel(&s, &name).await?;
    ensure!(c.frame_max > 0, "broker proposed no frame_max");
    // Only the 7-byte header of a frame 16x the negotiated frame_max: sluice must refuse it from
    // the header alone, not buffer (or wait for) the payload.
    let size = c.frame_max * 16;
    let mut header = vec![wire_type_body(), 0, 1];
    header.extend_from_slice(&size.to_be_bytes());
    c.send(&header).await?;
    let text = expect_closed_with(&mut c, 501, "oversized frame").await?;
    ensure!(
        text.contains("frame_max"),
        "reason does not say why: {text}"
    );
    assert_upstream_closed_cleanly(&name).await?;

    // The same before the handshake is done: a start-ok frame larger than any start-ok.
    let mut c = RawAmqp::connect(addr(&s)?).await?;
    c.send(wire::PROTOCOL_HEADER).await?;
    c.next_method(WAIT).await?;
    let mut header = vec![1, 0, 0];
    header.extend_from_slice(&(64u32 * 1024 * 1024).to_be_bytes());
    c.send(&header).await?;
    expect_closed_with(&mut c, 501, "oversized start-ok").await?;
    ensure!(
        metric(&s, "sluice_limit_hits_total", &["limit=\"max_frame_size\""]).await? >= 1.0,
        "oversized frames are not counted in sluice_limit_hits_total"
    );

    bystander.alive("after oversized frames").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

fn wire_type_body() -> u8 {
    sluice_tests::frame_type::BODY
}

#[tokio::test]
async fn method_frame_inside_a_publish_content_gets_505_and_nothing_is_published() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let q = unique("mid-content");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let name = unique("mid-content");
    let mut c = raw_with_channel(&s, &name).await?;
    let mut bytes = wire::basic_publish(1, "", &q);
    bytes.extend(wire::content_header(1, 10));
    bytes.extend(wire::body(1, b"12345"));
    // A method on the same channel before the last 5 body bytes.
    bytes.extend(wire::queue_declare(1, &q));
    c.send(&bytes).await?;
    let text = expect_closed_with(&mut c, 505, "method inside content").await?;
    ensure!(text.contains("middle of a publish"), "reason: {text}");
    assert_upstream_closed_cleanly(&name).await?;
    ensure!(
        broker.depth(&q).await? == 0,
        "a half-sent publish reached the broker"
    );
    bystander.alive("after a method inside a content").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn body_longer_than_its_header_declared_gets_505_and_nothing_is_published() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let q = unique("long-body");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let name = unique("long-body");
    let mut c = raw_with_channel(&s, &name).await?;
    // A whole, well-formed publish first: it must arrive.
    c.send(&wire::publish(1, &q, b"fine")).await?;
    let mut bytes = wire::basic_publish(1, "", &q);
    bytes.extend(wire::content_header(1, 5));
    bytes.extend(wire::body(1, b"0123456789"));
    c.send(&bytes).await?;
    let text = expect_closed_with(&mut c, 505, "body longer than declared").await?;
    ensure!(text.contains("longer than"), "reason: {text}");
    assert_upstream_closed_cleanly(&name).await?;
    let bodies = broker.drain(&q).await?;
    ensure!(
        bodies == vec![b"fine".to_vec()],
        "expected only the good publish, the queue holds {bodies:?}"
    );
    bystander.alive("after an overlong body").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn frames_on_a_channel_never_opened_close_the_connection_with_a_reason() -> Result<()> {
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;

    // Content on a channel with no publish (and never opened): sluice itself refuses it.
    let name = unique("ghost-content");
    let mut c = raw_with_channel(&s, &name).await?;
    c.send(&wire::content_header(9, 3)).await?;
    let text = expect_closed_with(&mut c, 505, "content on a ghost channel").await?;
    ensure!(text.contains("channel 9"), "reason: {text}");
    assert_upstream_closed_cleanly(&name).await?;

    // A method on a channel never opened passes to the broker, whose channel error the client
    // gets as it would without sluice.
    let name = unique("ghost-method");
    let mut c = raw_with_channel(&s, &name).await?;
    c.send(&wire::queue_declare(7, "ghost")).await?;
    let (code, text) = c.expect_connection_close(WAIT).await?;
    ensure!(
        code == 504,
        "expected the broker's 504 CHANNEL_ERROR, got {code} {text}"
    );
    c.expect_eof(WAIT).await?;
    wait_broker_connection_gone(&name, WAIT).await?;

    // A whole publish on a channel never opened: the same broker error, not a hang.
    let name = unique("ghost-publish");
    let mut c = raw_with_channel(&s, &name).await?;
    c.send(&wire::publish(5, "nowhere", b"boo")).await?;
    let (code, text) = c.expect_connection_close(WAIT).await?;
    ensure!(code == 504, "expected 504, got {code} {text}");
    c.expect_eof(WAIT).await?;
    wait_broker_connection_gone(&name, WAIT).await?;

    bystander.alive("after frames on unknown channels").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn stalled_handshakes_are_closed_after_handshake_timeout() -> Result<()> {
    let s = Sluice::start("[limits]\nhandshake_timeout = \"1s\"\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    let before = metric(&s, "sluice_protocol_errors_total", &[]).await?;
    let a = addr(&s)?;
    // Generous: the timeout is 1 s, this only catches a connection left open for good.
    let bound = Duration::from_secs(15);

    // Connected, nothing sent.
    let mut silent = RawAmqp::connect(a).await?;
    // Half a protocol header.
    let mut half = RawAmqp::connect(a).await?;
    half.send(b"AMQ").await?;
    // Protocol header, then no start-ok.
    let mut no_start_ok = RawAmqp::connect(a).await?;
    no_start_ok.send(wire::PROTOCOL_HEADER).await?;
    no_start_ok.next_method(WAIT).await?;
    // start-ok sent one byte at a time, slower than the deadline allows (slowloris).
    let mut slow = RawAmqp::connect(a).await?;
    slow.send(wire::PROTOCOL_HEADER).await?;
    slow.next_method(WAIT).await?;
    let drip = tokio::spawn(async move {
        for b in wire::start_ok("slowloris", true) {
            if slow.send(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        slow
    });
    // start-ok, then no tune-ok: sluice is already connected upstream for this one.
    let name = unique("no-tune-ok");
    let mut no_tune_ok = RawAmqp::connect(a).await?;
    no_tune_ok.send(wire::PROTOCOL_HEADER).await?;
    no_tune_ok.next_method(WAIT).await?;
    no_tune_ok.send(&wire::start_ok(&name, true)).await?;

    let t = Instant::now();
    silent.expect_eof(bound).await.context("silent client")?;
    half.expect_eof(bound).await.context("half header")?;
    no_start_ok.expect_eof(bound).await.context("no start-ok")?;
    let (code, text) = no_tune_ok
        .expect_connection_close(bound)
        .await
        .context("no tune-ok")?;
    ensure!(
        code == 320 && text.contains("handshake"),
        "stall after start-ok: {code} {text}"
    );
    no_tune_ok.expect_eof(bound).await?;
    let mut slow = drip.await?;
    slow.expect_eof(bound).await.context("slowloris")?;
    eprintln!("stalled handshakes closed within {:?}", t.elapsed());
    wait_broker_connection_gone(&name, WAIT).await?;

    let after = metric(&s, "sluice_protocol_errors_total", &[]).await?;
    ensure!(
        after - before >= 5.0,
        "5 handshake timeouts, protocol errors went {before} -> {after}"
    );
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"handshake_timeout\""]
        )
        .await?
            >= 5.0,
        "handshake timeouts are not counted in sluice_limit_hits_total"
    );
    bystander.alive("after stalled handshakes").await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_that_stops_reading_deliveries_does_not_grow_sluice_memory() -> Result<()> {
    let _heavy = HEAVY.lock().await;
    // 100 MiB waiting in a queue for a consumer that never reads: the broker must feel the
    // backpressure, sluice must not buffer it. The bound on sluice's growth is 32 MiB.
    const BODY: usize = 64 * 1024;
    const COUNT: usize = 1600;
    const BOUND: u64 = 32 * MIB;
    let s = Sluice::start("").await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let q = unique("unread");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    fill_queue(&q, COUNT, BODY).await?;
    ensure!(
        broker.depth(&q).await? as usize == COUNT,
        "queue not filled"
    );

    let base = rss_bytes();
    let name = unique("deaf-consumer");
    let mut c = raw_with_channel(&s, &name).await?;
    c.send(&wire::basic_qos(1, 0)).await?;
    c.send(&wire::basic_consume(1, &q, true)).await?;
    // From here on the client reads nothing. Wait for the broker to stop sending: the depth
    // stops falling.
    let mut last = u32::MAX;
    let mut peak = 0u64;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_bytes());
        let d = broker.depth(&q).await?;
        if d == last {
            break;
        }
        last = d;
    }
    bystander.alive("while a consumer does not read").await?;
    peak = peak.max(rss_bytes());
    let pushed = (COUNT as u64 - u64::from(last)) * BODY as u64;
    let grew = peak.saturating_sub(base);
    eprintln!(
        "unread consumer: broker pushed {} MiB before backpressure held it, sluice RSS grew {} MiB",
        pushed / MIB,
        grew / MIB
    );
    ensure!(
        last > 0,
        "the broker pushed the whole queue: nothing held it back"
    );
    ensure!(
        grew < BOUND,
        "sluice grew by {} MiB for a client that does not read (bound {} MiB)",
        grew / MIB,
        BOUND / MIB
    );
    drop(c);
    wait_broker_connection_gone(&name, WAIT).await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

/// Publish `count` bodies of `size` bytes straight to the broker, confirmed.
async fn fill_queue(q: &str, count: usize, size: usize) -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = sluice_tests::connect(&sluice_tests::broker_url(), &unique("filler")).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![7u8; size];
    let mut pending = Vec::new();
    for _ in 0..count {
        pending.push(
            ch.basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default(),
            )
            .await?,
        );
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                ensure!(p.await?.is_ack(), "filler publish nacked");
            }
        }
    }
    for p in pending {
        ensure!(p.await?.is_ack(), "filler publish nacked");
    }
    conn.close(200, "filled".into()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_that_stops_reading_while_its_publishes_are_shed_does_not_grow_sluice_memory(
) -> Result<()> {
    let _heavy = HEAVY.lock().await;
    // Every publish of this producer is shed and answered by sluice itself (basic.return with
    // the body, then an ack). The client never reads those answers. sluice must stop reading
    // its publishes rather than queue answers without bound: 200 MiB offered, answers waiting
    // for the client bounded by max_buffered_per_connection (16 MiB), growth bound 64 MiB.
    const BODY: usize = 64 * 1024;
    const COUNT: usize = 3200;
    const BOUND: u64 = 64 * MIB;
    let s = Sluice::start(
        r#"
[limits]
max_buffered_per_connection = "16MiB"

[amqp]
shed_mandatory = "return"

[[quota]]
name = "deaf"
match = { producer = "deaf-*" }
messages = "1/s"
burst = 1
on_exceed = "shed"
"#,
    )
    .await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let q = unique("deaf-shed");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;
    let base = rss_bytes();
    let name = unique("deaf-publisher");
    let mut c = raw_with_channel(&s, &name).await?;
    c.send(&wire::confirm_select(1)).await?;
    c.expect(1, (85, 11)).await?;
    let mut one = wire::basic_publish(1, "", &q);
    // mandatory
    let bits = one.len() - 2;
    one[bits] = 1;
    one.extend(wire::content_header(1, BODY as u64));
    one.extend(wire::body(1, &vec![1u8; BODY]));
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..COUNT {
            if c.send(&one).await.is_err() {
                break;
            }
            counter.fetch_add(1, SeqCst);
        }
        c
    });
    // Let the writer run until sluice stops reading it (its writes stall) or it sent everything.
    let mut peak = 0u64;
    let mut last = u64::MAX;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_bytes());
        let n = sent.load(SeqCst);
        if n == last || writer.is_finished() {
            break;
        }
        last = n;
    }
    peak = peak.max(rss_bytes());
    bystander.alive("while a publisher does not read").await?;
    let n = sent.load(SeqCst);
    let grew = peak.saturating_sub(base);
    eprintln!(
        "deaf publisher: {} MiB of shed publishes accepted, sluice RSS grew {} MiB",
        n * BODY as u64 / MIB,
        grew / MIB
    );
    writer.abort();
    ensure!(
        grew < BOUND,
        "sluice grew by {} MiB answering a client that does not read (bound {} MiB): \
         frames sluice injects are queued without bound",
        grew / MIB,
        BOUND / MIB
    );
    wait_broker_connection_gone(&name, Duration::from_secs(30)).await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

/// Outcome of one connection attempt in a crowd.
enum Attempt {
    Open(RawAmqp),
    Refused(u16, String),
    Failed(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_connections_at_once_meet_max_connections_and_the_tarpit() -> Result<()> {
    let _heavy = HEAVY.lock().await;
    // Each attempt costs up to 3 descriptors in this process (the client socket, sluice's
    // accepted socket and its upstream socket): scale the crowd to the soft limit.
    let limit = sluice_tests::fd_soft_limit();
    let crowd = 2000usize.min((limit.saturating_sub(300) / 3) as usize);
    if crowd < 2000 {
        eprintln!("fd soft limit {limit}: crowd scaled down to {crowd}");
    }
    const MAX_CONNECTIONS: usize = 500;
    let s = Sluice::start(
        r#"
[limits]
max_connections = 500
handshake_timeout = "30s"

[tarpit]
rate = "50/s"
burst = 50
max_delay = "2s"
"#,
    )
    .await?;
    let bystander = Bystander::start(&s.url).await?;
    let fds_before = sluice_tests::open_fds();
    let base = rss_bytes();
    let a = addr(&s)?;
    let herd = unique("herd");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(crowd);
    let gate = Arc::new(tokio::sync::Barrier::new(crowd));
    for _ in 0..crowd {
        let (herd, gate) = (herd.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let mut c = match RawAmqp::connect(a).await {
                Ok(c) => c,
                Err(e) => return Attempt::Failed(format!("connect: {e:#}")),
            };
            match tokio::time::timeout(Duration::from_secs(60), c.try_handshake(&herd, true)).await
            {
                Ok(Ok(None)) => Attempt::Open(c),
                Ok(Ok(Some((code, text)))) => Attempt::Refused(code, text),
                Ok(Err(e)) => Attempt::Failed(format!("{e:#}")),
                Err(_) => Attempt::Failed("handshake hung for 60 s".into()),
            }
        }));
    }
    let mut peak_rss = 0u64;
    let mut open = Vec::new();
    let (mut by_limit, mut by_tarpit, mut failed) = (0usize, 0usize, Vec::new());
    for t in tasks {
        peak_rss = peak_rss.max(rss_bytes());
        match t.await? {
            Attempt::Open(c) => open.push(c),
            Attempt::Refused(530, text) if text.contains("connection limit") => by_limit += 1,
            Attempt::Refused(530, text) if text.contains("too many connection attempts") => {
                by_tarpit += 1
            }
            Attempt::Refused(code, text) => failed.push(format!("refused {code}: {text}")),
            Attempt::Failed(e) => failed.push(e),
        }
    }
    let took = started.elapsed().as_secs_f64();
    peak_rss = peak_rss.max(rss_bytes());
    eprintln!(
        "{crowd} at once: {} open, {by_limit} refused by max_connections, {by_tarpit} by the \
         tarpit, {} failed, in {took:.1}s; RSS +{} MiB",
        open.len(),
        failed.len(),
        peak_rss.saturating_sub(base) / MIB
    );
    ensure!(
        failed.is_empty(),
        "{} attempts got no clear answer, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    ensure!(open.len() + by_limit + by_tarpit == crowd);
    ensure!(by_limit > 0, "max_connections never refused anyone");
    ensure!(by_tarpit > 0, "the tarpit never refused anyone");
    // The tarpit admits its burst plus its rate over the time the crowd took.
    let allowed = 50.0 + 50.0 * took + 10.0;
    ensure!(
        (open.len() as f64) <= allowed && open.len() < MAX_CONNECTIONS,
        "{} connections got through (tarpit allows ~{allowed:.0}, max_connections {MAX_CONNECTIONS})",
        open.len()
    );
    let refused = metric(&s, "sluice_connections_refused_total", &[]).await?;
    ensure!(
        refused as usize == by_limit + by_tarpit,
        "refused metric {refused}, counted {}",
        by_limit + by_tarpit
    );
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"max_connections\""]
        )
        .await?
            == by_limit as f64,
        "max_connections refusals are not counted in sluice_limit_hits_total"
    );
    // Every connection sluice let in is a broker connection; nothing else reached the broker.
    let listed = tokio::task::spawn_blocking(|| {
        sluice_tests::rabbitmqctl(&["list_connections", "-q", "client_properties"])
    })
    .await??;
    let upstream = listed.matches(&format!("\"{herd}\"")).count();
    ensure!(
        upstream == open.len(),
        "{} open through sluice but {upstream} at the broker",
        open.len()
    );
    // Memory: the whole crowd (2,000 sockets, a few hundred proxied) stays under 256 MiB.
    let grew = peak_rss.saturating_sub(base);
    ensure!(
        grew < 256 * MIB,
        "sluice grew by {} MiB for {crowd} connections",
        grew / MIB
    );
    bystander.alive("with the crowd connected").await?;
    drop(open);
    // Everything is released: connection gauge back to the bystander alone, descriptors back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = metric(&s, "sluice_connections", &["listener=\"amqp\""]).await?;
        if n == 1.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("sluice_connections still {n} after the crowd left");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fds_after = sluice_tests::open_fds();
    ensure!(
        fds_after <= fds_before + 10,
        "descriptors: {fds_before} before the crowd, {fds_after} after"
    );
    wait_broker_connection_gone(&herd, Duration::from_secs(30)).await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bytes_at_high_rate_from_several_connections_are_closed_and_cleaned_up() -> Result<()>
{
    let _heavy = HEAVY.lock().await;
    let s =
        Sluice::start("[limits]\nhandshake_timeout = \"2s\"\n[tarpit]\nrate = \"off\"\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    let a = addr(&s)?;
    let prefix = unique("noise");
    let run_for = Duration::from_secs(4);
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let prefix = prefix.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = Noise(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
            let started = Instant::now();
            let (mut conns, mut bytes) = (0u64, 0u64);
            while started.elapsed() < run_for {
                conns += 1;
                let mut c = RawAmqp::connect(a).await?;
                // Three kinds of noise: from the first byte, after a valid protocol header, and
                // after a whole handshake (as frames inside an open connection).
                match conns % 3 {
                    0 => {}
                    1 => c.send(wire::PROTOCOL_HEADER).await?,
                    _ => {
                        let name = format!("{prefix}-{w}");
                        if let Some((code, text)) = c.try_handshake(&name, true).await? {
                            bail!("handshake refused: {code} {text}");
                        }
                    }
                }
                let mut junk = vec![0u8; 64 * 1024];
                for _ in 0..16 {
                    rng.fill(&mut junk);
                    // Half of the time make it look like a frame header first.
                    if rng.0 & 1 == 0 {
                        junk[0] = 1 + (rng.0 % 3) as u8;
                    }
                    if c.send(&junk).await.is_err() {
                        break;
                    }
                    bytes += junk.len() as u64;
                }
                c.expect_eof(WAIT)
                    .await
                    .with_context(|| format!("worker {w}: connection {conns} left open"))?;
            }
            Ok::<_, anyhow::Error>((conns, bytes))
        }));
    }
    let (mut conns, mut bytes) = (0, 0);
    for w in workers {
        let (c, b) = w.await??;
        conns += c;
        bytes += b;
    }
    eprintln!(
        "noise: {conns} connections, {} MiB of random bytes",
        bytes / MIB
    );
    bystander.alive("after the noise").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = metric(&s, "sluice_connections", &["listener=\"amqp\""]).await?;
        if n == 1.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("sluice_connections still {n} after the noise stopped");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in 0..8 {
        wait_broker_connection_gone(&format!("{prefix}-{w}"), WAIT).await?;
    }
    ensure!(metric(&s, "sluice_protocol_errors_total", &[]).await? > 0.0);
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

// --- [limits]: each bound hit gives a clear close and is counted ------------------------------

/// The close reason lapin reports for a failed connect or operation.
fn reason(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

#[tokio::test]
async fn max_connections_refuses_with_530_and_is_counted() -> Result<()> {
    let s = Sluice::start("[limits]\nmax_connections = 2\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    let second = sluice_tests::connect(&s.url, &unique("second")).await?;
    let err = sluice_tests::connect(&s.url, &unique("third"))
        .await
        .err()
        .context("a third connection got past max_connections = 2")?;
    let text = reason(&err);
    ensure!(
        text.contains("connection limit of 2"),
        "unclear refusal: {text}"
    );
    ensure!(metric(&s, "sluice_connections_refused_total", &[]).await? >= 1.0);
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"max_connections\""]
        )
        .await?
            >= 1.0,
        "not counted in sluice_limit_hits_total"
    );
    second.close(200, "bye".into()).await?;
    // A slot is free again.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = sluice_tests::connect(&s.url, &unique("fourth")).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.context("no connection possible after one closed")?;
    again.close(200, "bye".into()).await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn max_connections_per_producer_refuses_with_530_naming_the_producer() -> Result<()> {
    let s = Sluice::start("[limits]\nmax_connections_per_producer = 2\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    let who = unique("greedy");
    let a = sluice_tests::connect(&s.url, &who).await?;
    let b = sluice_tests::connect(&s.url, &who).await?;
    let err = sluice_tests::connect(&s.url, &who)
        .await
        .err()
        .context("a third connection of one producer got past the limit of 2")?;
    let text = reason(&err);
    ensure!(
        text.contains(&who) && text.contains("limit"),
        "unclear refusal: {text}"
    );
    // Another producer is not affected.
    let other = sluice_tests::connect(&s.url, &unique("modest")).await?;
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"max_connections_per_producer\""]
        )
        .await?
            >= 1.0,
        "not counted in sluice_limit_hits_total"
    );
    for c in [a, b, other] {
        c.close(200, "bye".into()).await?;
    }
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn max_channels_is_passed_on_in_tune_and_a_channel_past_it_closes_with_530() -> Result<()> {
    let s = Sluice::start("[limits]\nmax_channels = 3\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    // A well-behaved client learns the limit from connection.tune and refuses by itself.
    let conn = sluice_tests::connect(&s.url, &unique("channels-lapin")).await?;
    let mut channels = Vec::new();
    let refusal = loop {
        match conn.create_channel().await {
            Ok(ch) => channels.push(ch),
            Err(e) => break e,
        }
        ensure!(
            channels.len() <= 3,
            "lapin opened {} channels: it was not told max_channels = 3",
            channels.len()
        );
    };
    ensure!(
        matches!(refusal.kind(), lapin::ErrorKind::ChannelsLimitReached),
        "expected lapin's own channel limit error, got: {refusal}"
    );
    ensure!(
        conn.status().connected(),
        "connection closed by the refusal"
    );
    let first = channels.first().context("no channel opened at all")?;
    first
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .context("the channels within the limit stopped working")?;
    conn.close(200, "bye".into()).await?;

    // A client that ignores it gets the connection closed with 530, as RabbitMQ does.
    let name = unique("channels");
    let mut c = RawAmqp::open(addr(&s)?, &name).await?;
    ensure!(
        c.channel_max == 3,
        "connection.tune offered channel_max {}, not max_channels = 3",
        c.channel_max
    );
    for ch in 1..=3 {
        c.open_channel(ch).await?;
    }
    c.send(&wire::channel_open(4)).await?;
    let text = expect_closed_with(&mut c, 530, "fourth channel").await?;
    ensure!(
        text.contains("NOT_ALLOWED") && text.contains("channel_max (3)"),
        "reason: {text}"
    );
    assert_upstream_closed_cleanly(&name).await?;
    ensure!(
        metric(&s, "sluice_limit_hits_total", &["limit=\"max_channels\""]).await? >= 1.0,
        "not counted in sluice_limit_hits_total"
    );
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn message_over_max_message_size_closes_its_channel_with_406_and_the_rest_carries_on(
) -> Result<()> {
    use futures_lite::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
    let s = Sluice::start("[limits]\nmax_message_size = \"64KiB\"\n").await?;
    let bystander = Bystander::start(&s.url).await?;
    let broker = Broker::connect().await?;
    let q = unique("too-big");
    let other_q = unique("too-big-other");
    let _g = Queues::new([q.clone(), other_q.clone()]);
    broker.queue(&q).await?;
    broker.queue(&other_q).await?;
    let conn = sluice_tests::connect(&s.url, &unique("big-pub")).await?;
    // The same connection also has a consumer and a confirmed publisher on other channels.
    let other = conn.create_channel().await?;
    other
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = other
        .basic_consume(
            other_q.as_str().into(),
            "big-pub-consumer".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let publish_other = |i: u32| {
        let other = other.clone();
        let other_q = other_q.clone();
        async move {
            let c = other
                .basic_publish(
                    "".into(),
                    other_q.as_str().into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    lapin::BasicProperties::default(),
                )
                .await?
                .await?;
            ensure!(c.is_ack(), "publish {i} on the other channel was nacked");
            Ok::<_, anyhow::Error>(())
        }
    };
    publish_other(1).await?;

    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let ok = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &vec![0u8; 60 * 1024],
            lapin::BasicProperties::default(),
        )
        .await?
        .await?;
    ensure!(ok.is_ack(), "a message under the limit was not acked");
    let big = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &vec![0u8; 100 * 1024],
            lapin::BasicProperties::default(),
        )
        .await;
    let outcome = match big {
        Err(e) => Err(e),
        Ok(confirm) => tokio::time::timeout(WAIT, confirm)
            .await
            .context("no answer to an oversized publish")?
            .map(|_| ()),
    };
    let err = outcome.err().context("an oversized publish was accepted")?;
    let text = format!("{err}");
    // RabbitMQ's own words for its max_message_size (clients match on them), then sluice's key.
    ensure!(
        text.contains("larger than configured max size") && text.contains("max_message_size"),
        "unclear error: {text}"
    );
    ensure!(
        matches!(
            err.kind(),
            lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406
        ),
        "expected a 406 channel close, got: {err:?}"
    );
    let deadline = Instant::now() + WAIT;
    while ch.status().connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(!ch.status().connected(), "the channel was left open");
    // Only that channel: the connection, its consumer and its other publisher carry on.
    ensure!(
        conn.status().connected(),
        "the connection was closed, not the channel"
    );
    for i in 2..=5 {
        publish_other(i).await?;
    }
    let mut got = 0;
    while got < 5 {
        tokio::time::timeout(WAIT, consumer.next())
            .await
            .context("the consumer on the same connection stalled")?
            .context("consumer ended")??;
        got += 1;
    }
    let again = conn.create_channel().await?;
    again
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"after",
            lapin::BasicProperties::default(),
        )
        .await?;
    again.close(200, "bye".into()).await?;
    ensure!(
        broker.settled_depth(&q).await? == 2,
        "expected the small message and the one after the close, not the oversized one"
    );
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"max_message_size\""]
        )
        .await?
            >= 1.0,
        "not counted in sluice_limit_hits_total"
    );
    conn.close(200, "bye".into()).await?;
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn unfinished_publishes_over_max_buffered_per_connection_close_with_506() -> Result<()> {
    let s = Sluice::start(
        "[limits]\nmax_buffered_per_connection = \"64KiB\"\nmax_message_size = \"1MiB\"\n",
    )
    .await?;
    let bystander = Bystander::start(&s.url).await?;
    let name = unique("hoarder");
    let mut c = raw_with_channel(&s, &name).await?;
    c.open_channel(2).await?;
    // Two publishes started on two channels, neither finished: 2 x 40 KiB buffered.
    for ch in [1u16, 2] {
        let mut bytes = wire::basic_publish(ch, "", "nowhere");
        bytes.extend(wire::content_header(ch, 512 * 1024));
        bytes.extend(wire::body(ch, &vec![0u8; 40 * 1024]));
        c.send(&bytes).await?;
    }
    let text = expect_closed_with(&mut c, 506, "buffered limit").await?;
    ensure!(text.contains("buffered"), "reason: {text}");
    assert_upstream_closed_cleanly(&name).await?;
    ensure!(
        metric(
            &s,
            "sluice_limit_hits_total",
            &["limit=\"max_buffered_per_connection\""]
        )
        .await?
            >= 1.0,
        "not counted in sluice_limit_hits_total"
    );
    bystander.finish().await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn upstream_that_never_answers_gets_the_client_a_close_after_connect_timeout() -> Result<()> {
    // Accepts TCP and then says nothing, like a broker stuck in a GC pause or a black-holed LB.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mute_addr = mute.local_addr()?;
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((sock, _)) = mute.accept().await {
            socks.push(sock);
        }
    });
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{mute_addr}\"\n[limits]\nconnect_timeout = \"1s\"\n"
    );
    let config = sluice::config::validate::parse(&text, std::path::Path::new("t.toml"))
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let server = sluice::Server::start(config)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let a = server.listener_addr("amqp").context("no listener")?;
    let mut c = RawAmqp::connect(a).await?;
    let refused = c.try_handshake(&unique("patient"), true).await?;
    let (code, text) = refused.context("handshake through a mute upstream succeeded")?;
    ensure!(
        code == 541 && text.contains("connection.start"),
        "unclear close: {code} {text}"
    );
    let (_, metrics) = sluice_tests::http(server.admin_addr(), "GET", "/metrics").await?;
    // A broker that does not answer is an upstream failure, counted as such.
    ensure!(sluice_tests::sum_metric(&metrics, "sluice_upstream_errors_total", &[]) >= 1.0);
    server.shutdown(Duration::from_secs(1)).await;
    held.abort();
    Ok(())
}
