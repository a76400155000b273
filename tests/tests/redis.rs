//! sluice in front of the real Redis on this machine: pipelined replies stay in request order with
//! sluice's own shed replies slotted exactly where they belong, transactions are decided as a
//! whole, diverts rewrite the key, pub/sub and large replies pass through untouched, and a client
//! that breaks the protocol gets an error without disturbing anyone else.

use anyhow::{bail, ensure, Context, Result};
use redis::AsyncCommands;
use sluice_tests::unique;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn redis_addr() -> String {
    std::env::var("SLUICE_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

struct RedisSluice {
    server: Option<sluice::Server>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl RedisSluice {
    async fn start(extra: &str) -> Result<RedisSluice> {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"redis\"\nprotocol = \"redis\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n{extra}\n",
            redis_addr()
        );
        let config = sluice::config::validate::parse(&text, &PathBuf::from("test.toml"))
            .map_err(|r| anyhow::anyhow!("test config rejected:\n{r}\n---\n{text}"))?;
        let server = sluice::Server::start(config)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let addr = server
            .listener_addr("redis")
            .context("listener redis not bound")?;
        let admin = server.admin_addr();
        Ok(RedisSluice {
            server: Some(server),
            addr,
            admin,
        })
    }

    async fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let (status, body) = sluice_tests::http(self.admin, "GET", "/metrics").await?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(sluice_tests::sum_metric(&body, name, labels))
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// A direct connection to Redis for setting up and checking.
async fn direct() -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{}/", redis_addr()))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Deletes the test's keys when dropped, even when the test fails.
struct Keys(Vec<String>);

impl Drop for Keys {
    fn drop(&mut self) {
        let keys = self.0.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(c) = redis::Client::open(format!("redis://{}/", redis_addr())) {
                if let Ok(mut c) = c.get_connection() {
                    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut c);
                }
            }
        })
        .join();
    }
}

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A raw RESP connection: exact bytes out, exact bytes in.
struct Raw(TcpStream);

impl Raw {
    async fn connect(addr: SocketAddr) -> Result<Raw> {
        Ok(Raw(TcpStream::connect(addr).await?))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.write_all(bytes).await?;
        Ok(())
    }

    /// Read until exactly `want` arrived (or fail after 10 s, showing what did).
    async fn expect(&mut self, want: &[u8]) -> Result<()> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < want.len() {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.0.read(&mut chunk))
                .await
                .with_context(|| {
                    format!(
                        "timed out; got so far {:?}, want {:?}",
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(want)
                    )
                })??;
            if n == 0 {
                bail!(
                    "connection closed; got {:?}, want {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(want)
                );
            }
            got.extend_from_slice(&chunk[..n]);
        }
        ensure!(
            got == want,
            "got {:?}\nwant {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
        Ok(())
    }

    /// Read whatever arrives until the connection closes (10 s at most).
    async fn read_to_close(&mut self) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.0.read_to_end(&mut got))
            .await
            .context("connection not closed")??;
        Ok(got)
    }
}

fn shed_quota(producer: &str, burst: u32) -> String {
    format!(
        "[[quota]]\nname = \"flood\"\nmatch = {{ producer = \"{producer}\" }}\n\
         messages = \"1/min\"\nburst = {burst}\non_exceed = {{ shed = \"too fast\" }}\n"
    )
}

#[tokio::test]
async fn pipelined_replies_stay_in_order_with_shed_replies_in_place() -> Result<()> {
    let name = unique("redis-pipe");
    let (q, k) = (format!("{name}.q"), format!("{name}.k"));
    let _keys = Keys(vec![q.clone(), k.clone()]);
    let s = RedisSluice::start(&shed_quota(&name, 2)).await?;
    let mut c = Raw::connect(s.addr).await?;
    c.send(&cmd(&[b"CLIENT", b"SETNAME", name.as_bytes()]))
        .await?;
    c.expect(b"+OK\r\n").await?;

    // One write: two pushes within the burst, a read, two pushes over it, a blocking pop that
    // waits on the server, and a ping. The shed replies must come after BLPOP's (late) answer
    // where they belong, not as soon as sluice decides.
    let empty = format!("{name}.empty");
    let mut pipeline = Vec::new();
    pipeline.extend(cmd(&[b"LPUSH", q.as_bytes(), b"a"]));
    pipeline.extend(cmd(&[b"GET", k.as_bytes()]));
    pipeline.extend(cmd(&[b"LPUSH", q.as_bytes(), b"b"]));
    pipeline.extend(cmd(&[b"BLPOP", empty.as_bytes(), b"0.3"]));
    pipeline.extend(cmd(&[b"LPUSH", q.as_bytes(), b"c"]));
    pipeline.extend(cmd(&[b"INCR", k.as_bytes()]));
    pipeline.extend(cmd(&[b"RPUSH", q.as_bytes(), b"d"]));
    pipeline.extend(cmd(&[b"PING"]));
    c.send(&pipeline).await?;
    let shed = b"-SLUICE shed: too fast\r\n";
    let mut want = Vec::new();
    want.extend_from_slice(b":1\r\n$-1\r\n:2\r\n*-1\r\n");
    want.extend_from_slice(shed);
    want.extend_from_slice(b":1\r\n");
    want.extend_from_slice(shed);
    want.extend_from_slice(b"+PONG\r\n");
    c.expect(&want).await?;

    let mut d = direct().await?;
    let held: Vec<String> = d.lrange(&q, 0, -1).await?;
    ensure!(
        held == ["b", "a"],
        "the list holds only the forwarded pushes: {held:?}"
    );
    let producer = format!("producer=\"{name}\"");
    let sheds = s
        .metric(
            "sluice_messages_total",
            &[&producer, "verdict=\"shed\"", "protocol=\"redis\""],
        )
        .await?;
    ensure!(sheds == 2.0, "two sheds counted, got {sheds}");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn redis_py_style_pipeline_through_the_redis_crate_gets_each_reply() -> Result<()> {
    let name = unique("redis-crate");
    let q = format!("{name}.q");
    let _keys = Keys(vec![q.clone()]);
    let s = RedisSluice::start(&shed_quota(&name, 3)).await?;
    let client = redis::Client::open(format!("redis://{}/", s.addr))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut c)
        .await?;
    // Ten pushes pipelined without a transaction: the first three pass, the rest are shed, and
    // the reply for each is its own.
    let mut results = Vec::new();
    let mut pipe = redis::pipe();
    for i in 0..10 {
        pipe.rpush(&q, i);
    }
    pipe.llen(&q);
    let r: redis::RedisResult<Vec<redis::Value>> = pipe.query_async(&mut c).await;
    match r {
        Ok(v) => bail!("a pipeline with shed pushes must fail, got {v:?}"),
        Err(e) => results.push(e.to_string()),
    }
    ensure!(
        results[0].contains("SLUICE") && results[0].contains("too fast"),
        "the pipeline's error names sluice and the reason: {results:?}"
    );
    // Reply-by-reply on one connection.
    let lens: Vec<redis::RedisResult<i64>> = {
        let mut out = Vec::new();
        for i in 0..2 {
            out.push(c.rpush(&q, 100 + i).await);
        }
        out
    };
    ensure!(
        lens.iter().all(|r| r.is_err()),
        "over the quota every push is refused: {lens:?}"
    );
    let len: i64 = c.llen(&q).await?;
    ensure!(len == 3, "three pushes landed, got {len}");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn transactions_are_decided_as_a_whole() -> Result<()> {
    let name = unique("redis-multi");
    let (q, k) = (format!("{name}.q"), format!("{name}.k"));
    let _keys = Keys(vec![q.clone(), k.clone()]);
    let s = RedisSluice::start(&shed_quota(&name, 2)).await?;
    let mut c = Raw::connect(s.addr).await?;
    c.send(&cmd(&[b"CLIENT", b"SETNAME", name.as_bytes()]))
        .await?;
    c.expect(b"+OK\r\n").await?;

    // Within the burst: executed, with the server's EXEC reply.
    let mut t = Vec::new();
    t.extend(cmd(&[b"MULTI"]));
    t.extend(cmd(&[b"LPUSH", q.as_bytes(), b"1"]));
    t.extend(cmd(&[b"INCR", k.as_bytes()]));
    t.extend(cmd(&[b"EXEC"]));
    c.send(&t).await?;
    c.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n")
        .await?;

    // Two more pushes in one transaction: the second is over the quota, so none of it runs.
    let mut t = Vec::new();
    t.extend(cmd(&[b"MULTI"]));
    t.extend(cmd(&[b"INCR", k.as_bytes()]));
    t.extend(cmd(&[b"LPUSH", q.as_bytes(), b"2"]));
    t.extend(cmd(&[b"LPUSH", q.as_bytes(), b"3"]));
    t.extend(cmd(&[b"EXEC"]));
    t.extend(cmd(&[b"GET", k.as_bytes()]));
    c.send(&t).await?;
    c.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n-SLUICE shed: too fast\r\n$1\r\n1\r\n")
        .await?;

    // DISCARD drops a held transaction; nested MULTI is refused like Redis does.
    let mut t = Vec::new();
    t.extend(cmd(&[b"MULTI"]));
    t.extend(cmd(&[b"MULTI"]));
    t.extend(cmd(&[b"INCR", k.as_bytes()]));
    t.extend(cmd(&[b"DISCARD"]));
    t.extend(cmd(&[b"GET", k.as_bytes()]));
    c.send(&t).await?;
    c.expect(b"+OK\r\n-ERR MULTI calls can not be nested\r\n+QUEUED\r\n+OK\r\n$1\r\n1\r\n")
        .await?;

    let mut d = direct().await?;
    let len: i64 = d.llen(&q).await?;
    ensure!(
        len == 1,
        "only the first transaction's push landed, got {len}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn over_quota_pushes_are_diverted_to_the_overflow_key() -> Result<()> {
    let name = unique("redis-divert");
    let q = format!("{name}.q");
    let overflow = format!("overflow.{q}");
    let _keys = Keys(vec![q.clone(), overflow.clone()]);
    let quota = format!(
        "[[quota]]\nname = \"flood\"\nmatch = {{ producer = \"{name}\" }}\n\
         messages = \"1/min\"\nburst = 3\n\
         on_exceed = {{ divert = {{ exchange = \"\", routing_key = \"overflow.{{routing_key}}\" }} }}\n"
    );
    let s = RedisSluice::start(&quota).await?;
    let client = redis::Client::open(format!("redis://{}/", s.addr))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut c)
        .await?;
    for i in 0..10 {
        let _: i64 = c.lpush(&q, i).await?;
    }
    let mut d = direct().await?;
    let (main, over): (i64, i64) = (d.llen(&q).await?, d.llen(&overflow).await?);
    ensure!(
        (main, over) == (3, 7),
        "3 in {q}, 7 diverted to {overflow}: got {main} and {over}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn producers_are_named_by_client_setname_and_only_the_flooder_is_limited() -> Result<()> {
    let flooder = unique("redis-flooder");
    let calm = unique("redis-calm");
    let q = format!("{flooder}.q");
    let _keys = Keys(vec![q.clone()]);
    let s = RedisSluice::start(&shed_quota(&flooder, 1)).await?;
    let connect = |name: String| {
        let addr = s.addr;
        async move {
            let client = redis::Client::open(format!("redis://{addr}/"))?;
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(&name)
                .query_async::<()>(&mut c)
                .await?;
            anyhow::Ok(c)
        }
    };
    let mut f = connect(flooder.clone()).await?;
    let mut ok = connect(calm.clone()).await?;
    let mut refused = 0;
    for i in 0..5 {
        if f.rpush::<_, _, i64>(&q, i).await.is_err() {
            refused += 1;
        }
        let _: i64 = ok.rpush(&q, 100 + i).await?;
    }
    ensure!(
        refused == 4,
        "the flooder gets one push, then sheds: {refused} refused"
    );
    let mut d = direct().await?;
    let len: i64 = d.llen(&q).await?;
    ensure!(len == 6, "1 + 5 pushes landed, got {len}");
    let (status, producers) = sluice_tests::http(s.admin, "GET", "/v1/producers").await?;
    ensure!(status == 200 && producers.contains(&calm) && producers.contains(&flooder));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn pubsub_and_large_replies_pass_through() -> Result<()> {
    let name = unique("redis-pass");
    let (big, chan) = (format!("{name}.big"), format!("{name}.chan"));
    let _keys = Keys(vec![big.clone()]);
    let s = RedisSluice::start(&shed_quota("nobody-matches-this", 1)).await?;
    let client = redis::Client::open(format!("redis://{}/", s.addr))?;

    // A 6 MB value out and back: streamed through in pieces, byte for byte.
    let value: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = client.get_multiplexed_async_connection().await?;
    let _: () = c.set(&big, &value).await?;
    let back: Vec<u8> = c.get(&big).await?;
    ensure!(back == value, "large value changed on the way");

    // Subscribe through sluice, publish through sluice.
    let mut sub = Raw::connect(s.addr).await?;
    sub.send(&cmd(&[b"SUBSCRIBE", chan.as_bytes()])).await?;
    let confirm = format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{chan}\r\n:1\r\n",
        chan.len()
    );
    sub.expect(confirm.as_bytes()).await?;
    let receivers: i64 = c.publish(&chan, "hello").await?;
    ensure!(receivers == 1, "one subscriber, got {receivers}");
    let msg = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{chan}\r\n$5\r\nhello\r\n",
        chan.len()
    );
    sub.expect(msg.as_bytes()).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_gets_an_error_and_others_carry_on() -> Result<()> {
    let name = unique("redis-hostile");
    let q = format!("{name}.q");
    let _keys = Keys(vec![q.clone()]);
    let s = RedisSluice::start("").await?;
    let client = redis::Client::open(format!("redis://{}/", s.addr))?;
    let mut good = client.get_multiplexed_async_connection().await?;

    let mut bad = Raw::connect(s.addr).await?;
    // A valid command first: its reply still arrives, before the error.
    let mut bytes = cmd(&[b"PING"]);
    bytes.extend_from_slice(b"*2\r\n$4\r\nECHO\r\n$-7\r\n");
    bad.send(&bytes).await?;
    let got = bad.read_to_close().await?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("+PONG\r\n-ERR Protocol error"),
        "reply then protocol error, got {text:?}"
    );

    // A bulk length far past max_message_size is refused before anything is buffered.
    let mut huge = Raw::connect(s.addr).await?;
    huge.send(b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$999999999999\r\n")
        .await?;
    let got = huge.read_to_close().await?;
    ensure!(
        String::from_utf8_lossy(&got).contains("max_message_size"),
        "the limit is named: {:?}",
        String::from_utf8_lossy(&got)
    );

    for i in 0..100 {
        let _: i64 = good.rpush(&q, i).await?;
    }
    let len: i64 = good.llen(&q).await?;
    ensure!(len == 100, "the well-behaved client kept working");
    let errors = s.metric("sluice_protocol_errors_total", &[]).await?;
    ensure!(errors >= 2.0, "protocol errors counted: {errors}");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn delay_paces_a_producer_and_every_push_lands() -> Result<()> {
    let name = unique("redis-delay");
    let q = format!("{name}.q");
    let _keys = Keys(vec![q.clone()]);
    let quota = format!(
        "[[quota]]\nname = \"paced\"\nmatch = {{ producer = \"{name}\" }}\n\
         messages = \"20/s\"\nburst = 5\non_exceed = {{ delay = \"10s\", then = \"shed\" }}\n"
    );
    let s = RedisSluice::start(&quota).await?;
    let mut c = Raw::connect(s.addr).await?;
    c.send(&cmd(&[b"CLIENT", b"SETNAME", name.as_bytes()]))
        .await?;
    c.expect(b"+OK\r\n").await?;
    // 25 pushes in one write: 5 pass at once, 20 are held and then forwarded in order.
    let mut pipeline = Vec::new();
    let mut want = Vec::new();
    for i in 1..=25 {
        pipeline.extend(cmd(&[b"RPUSH", q.as_bytes(), i.to_string().as_bytes()]));
        want.extend_from_slice(format!(":{i}\r\n").as_bytes());
    }
    c.send(&pipeline).await?;
    c.expect(&want).await?;
    let producer = format!("producer=\"{name}\"");
    let delayed = s
        .metric("sluice_messages_total", &[&producer, "verdict=\"delay\""])
        .await?;
    let shed = s
        .metric("sluice_messages_total", &[&producer, "verdict=\"shed\""])
        .await?;
    ensure!(
        delayed >= 15.0 && shed == 0.0,
        "held pushes are counted as delayed ({delayed}), none shed ({shed})"
    );
    let mut d = direct().await?;
    let all: Vec<i64> = d.lrange(&q, 0, -1).await?;
    ensure!(
        all == (1..=25).collect::<Vec<i64>>(),
        "all 25 in order: {all:?}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn dry_run_counts_would_shed_and_forwards_everything() -> Result<()> {
    let name = unique("redis-dry");
    let q = format!("{name}.q");
    let _keys = Keys(vec![q.clone()]);
    let s = RedisSluice::start(&format!("{}dry_run = true\n", shed_quota(&name, 2))).await?;
    let client = redis::Client::open(format!("redis://{}/", s.addr))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut c)
        .await?;
    for i in 0..10 {
        let _: i64 = c.rpush(&q, i).await?;
    }
    let len: i64 = direct().await?.llen(&q).await?;
    ensure!(len == 10, "dry run forwards everything, got {len}");
    let producer = format!("producer=\"{name}\"");
    let would = s
        .metric(
            "sluice_messages_total",
            &[&producer, "verdict=\"would_shed\""],
        )
        .await?;
    ensure!(would == 8.0, "8 would-sheds counted, got {would}");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_reload_changes_the_quota_of_an_open_redis_connection() -> Result<()> {
    let name = unique("redis-reload");
    let q = format!("{name}.q");
    let _keys = Keys(vec![q.clone()]);
    let dir = std::env::temp_dir().join(unique("sluice-redis-reload"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sluice.toml");
    let config = |burst: u32| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"{}\"\n\n\
             [[listener]]\nname = \"redis\"\nprotocol = \"redis\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"{}\"\n\n{}",
            sluice_tests::broker_addr(),
            redis_addr(),
            shed_quota(&name, burst)
        )
    };
    std::fs::write(&path, config(2))?;
    let s = sluice_tests::Sluice::start_file(&path).await?;
    let addr = s
        .server()
        .listener_addr("redis")
        .context("no redis listener")?;
    let result: Result<()> = async {
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&name)
            .query_async::<()>(&mut c)
            .await?;
        let mut ok = 0;
        for i in 0..5 {
            ok += i64::from(c.rpush::<_, _, i64>(&q, i).await.is_ok());
        }
        ensure!(ok == 2, "burst 2 before the reload, {ok} passed");
        // A new quota (new buckets: a changed rate starts afresh) with room for 5 more.
        std::fs::write(&path, config(5))?;
        match s.server().reload().await {
            sluice::reload::Outcome::Applied { .. } => {}
            other => bail!("reload not applied: {other:?}"),
        }
        let mut ok = 0;
        for i in 0..8 {
            ok += i64::from(c.rpush::<_, _, i64>(&q, 10 + i).await.is_ok());
        }
        ensure!(
            ok == 5,
            "burst 5 after the reload on the same connection, {ok} passed"
        );
        let len: i64 = direct().await?.llen(&q).await?;
        ensure!(len == 7, "2 + 5 landed, got {len}");
        Ok(())
    }
    .await;
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[tokio::test]
async fn a_shed_reply_between_a_small_and_a_streamed_large_reply_stays_between_them() -> Result<()>
{
    let name = unique("redis-order");
    let (small, big, q) = (
        format!("{name}.small"),
        format!("{name}.big"),
        format!("{name}.q"),
    );
    let _keys = Keys(vec![small.clone(), big.clone(), q.clone()]);
    let value: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut d = direct().await?;
    let _: () = d.set(&small, "s").await?;
    let _: () = d.set(&big, &value).await?;
    let s = RedisSluice::start(&shed_quota(&name, 1)).await?;
    let mut c = Raw::connect(s.addr).await?;
    c.send(&cmd(&[b"CLIENT", b"SETNAME", name.as_bytes()]))
        .await?;
    c.expect(b"+OK\r\n").await?;
    c.send(&cmd(&[b"LPUSH", q.as_bytes(), b"first"])).await?;
    c.expect(b":1\r\n").await?;
    // The small reply and the start of the large one arrive in the same read from Redis; the
    // shed reply owed in between must not slip behind the large reply's first bytes.
    for _ in 0..5 {
        let mut p = Vec::new();
        p.extend(cmd(&[b"GET", small.as_bytes()]));
        p.extend(cmd(&[b"LPUSH", q.as_bytes(), b"x"]));
        p.extend(cmd(&[b"GET", big.as_bytes()]));
        p.extend(cmd(&[b"PING"]));
        c.send(&p).await?;
        let mut want = b"$1\r\ns\r\n-SLUICE shed: too fast\r\n".to_vec();
        want.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
        want.extend_from_slice(&value);
        want.extend_from_slice(b"\r\n+PONG\r\n");
        c.expect(&want).await?;
    }
    s.stop().await;
    Ok(())
}
