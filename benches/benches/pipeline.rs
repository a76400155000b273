//! The publish hot path, piece by piece and whole, on a Celery task publish (method, content
//! header with the headers Celery 5 sets, one 512 B body frame):
//!
//! - `frame/split`: splitting 64 buffered publishes (192 frames) into zero-copy frames;
//! - `assemble`: split + decode `basic.publish` + parse the content header + collect the
//!   frames of each publish (what the inbound pump does before deciding);
//! - `header/*`: the lazy content-header scan (`task` header, `app_id` property);
//! - `identity/*`: naming the producer (connection name; a per-message header source);
//! - `quota/check`: one never-firing per-producer quota (governor GCRA + dashmap);
//! - `chain/quotas`: the policy chain with that quota;
//! - `plugin/evaluate`: the `celery_task_quota` plugin on the publish, through a lazy
//!   `MessageFacts` over the frames (skipped when the plugin is not built);
//! - `chain/quotas+plugin`: the chain with the quota and the plugin as a `[[policy]]` stage;
//! - `pipeline/*`: all of it per message, plus queueing the original bytes for the upstream.
//!
//! Times are per message (criterion's throughput is in messages).
//!
//! `cargo bench -p sluice-benches --bench pipeline`

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice::config::units::Rate;
use sluice::identity::{ConnFacts, IdentitySpec, MessageIdentity, Source};
use sluice::plugin::{MessageFacts, PluginEngine, PluginShared, Policy, PolicySettings};
use sluice::policy::chain::{Chain, EvalState, Matcher, PublishView, QuotaStage, Step};
use sluice::policy::glob::Glob;
use sluice::policy::verdict::ActionSpec;
use sluice::policy::PolicyStage;
use sluice::protocol::amqp::frame::{self, Frame, FrameKind};
use sluice::protocol::amqp::header::{ContentHeader, PropValue, Property};
use sluice::protocol::amqp::method::{self, Publish};
use sluice::protocol::amqp::reply;
use sluice::protocol::amqp::table::{self, FieldValue};
use sluice::protocol::amqp::wire::put_short_str;
use sluice::quota::local::Limiter;
use sluice::session::io::OutQueue;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 64;
const BODY: usize = 512;
const FRAME_MAX: u32 = 131_072;

fn text(s: &str) -> FieldValue {
    FieldValue::LongStr(s.as_bytes().to_vec())
}

/// A content header payload as Celery 5 (kombu, py-amqp) sends it.
fn celery_header_payload(task: &str, body: u64) -> Vec<u8> {
    let id = "9b1f3c1e-5c2d-4d8e-9a47-2f6b8e0d4c11";
    let headers = vec![
        ("lang".to_string(), text("py")),
        ("task".to_string(), text(task)),
        ("id".to_string(), text(id)),
        ("shadow".to_string(), FieldValue::Void),
        ("eta".to_string(), FieldValue::Void),
        ("expires".to_string(), FieldValue::Void),
        ("group".to_string(), FieldValue::Void),
        ("group_index".to_string(), FieldValue::Void),
        ("retries".to_string(), FieldValue::I32(0)),
        (
            "timelimit".to_string(),
            FieldValue::Array(vec![FieldValue::Void, FieldValue::Void]),
        ),
        ("root_id".to_string(), text(id)),
        ("parent_id".to_string(), FieldValue::Void),
        ("argsrepr".to_string(), text("(42,)")),
        ("kwargsrepr".to_string(), text("{'force': True}")),
        ("origin".to_string(), text("gen4242@web-7f9c6d5b8-x2k4p")),
        ("ignore_result".to_string(), FieldValue::Bool(false)),
        ("replaced_task_nesting".to_string(), FieldValue::I32(0)),
        ("stamped_headers".to_string(), FieldValue::Void),
        ("stamps".to_string(), FieldValue::Table(vec![])),
    ];
    let flags = [
        Property::ContentType,
        Property::ContentEncoding,
        Property::Headers,
        Property::DeliveryMode,
        Property::Priority,
        Property::CorrelationId,
    ]
    .iter()
    .fold(0u16, |f, p| f | 1 << (15 - *p as u16));
    let mut p = BytesMut::new();
    p.put_u16(60);
    p.put_u16(0);
    p.put_u64(body);
    p.put_u16(flags);
    put_short_str(&mut p, "application/json").expect("short string");
    put_short_str(&mut p, "utf-8").expect("short string");
    table::encode_table(&mut p, &headers).expect("headers");
    p.put_u8(2);
    p.put_u8(0);
    put_short_str(&mut p, id).expect("short string");
    p.to_vec()
}

/// The wire bytes of one publish: method, content header, one body frame.
fn publish_wire(channel: u16, task: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(
        &reply::publish(channel, "", "celery", false, false)
            .expect("publish")
            .raw,
    );
    let header = celery_header_payload(task, BODY as u64);
    out.extend_from_slice(&Frame::encode(FrameKind::Header, channel, &header).raw);
    out.extend_from_slice(&Frame::encode(FrameKind::Body, channel, &[b'x'; BODY]).raw);
    out
}

fn wire(n: usize) -> Vec<u8> {
    let tasks = [
        "orders.confirm",
        "auth.login",
        "mail.send",
        "reports.rebuild",
    ];
    (0..n)
        .flat_map(|i| publish_wire(1, tasks[i % tasks.len()]))
        .collect()
}

/// One assembled publish, as the inbound pump holds it before deciding.
struct Assembled {
    frames: Vec<Frame>,
}

fn assemble(buf: &mut BytesMut, out: &mut Vec<Assembled>) {
    let mut cur: Vec<Frame> = Vec::new();
    while let Ok(Some(f)) = frame::split(buf, FRAME_MAX) {
        match f.kind {
            FrameKind::Method => {
                let (_, args) = method::split_id(f.payload()).expect("method");
                black_box(Publish::decode(args).expect("publish"));
                cur = Vec::with_capacity(3);
                cur.push(f);
            }
            FrameKind::Header => {
                let h = ContentHeader::parse(f.payload()).expect("header");
                black_box(h.body_size);
                cur.push(f);
            }
            FrameKind::Body => {
                cur.push(f);
                out.push(Assembled {
                    frames: std::mem::take(&mut cur),
                });
            }
            FrameKind::Heartbeat => {}
        }
    }
}

/// What a policy plugin sees: answered lazily from the frames (as sluice's own adapter does).
struct Facts<'a> {
    producer: &'a str,
    conn: &'a ConnFacts,
    publish: Publish<'a>,
    header: ContentHeader<'a>,
}

impl MessageFacts for Facts<'_> {
    fn protocol(&self) -> &str {
        "amqp091"
    }
    fn producer(&self) -> &str {
        self.producer
    }
    fn vhost(&self) -> &str {
        self.conn.vhost.as_deref().unwrap_or("/")
    }
    fn user(&self) -> Option<&str> {
        self.conn.user.as_deref()
    }
    fn peer(&self) -> Option<String> {
        Some("127.0.0.1:40000".into())
    }
    fn client_property(&self, name: &str) -> Option<String> {
        self.conn
            .client_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
    fn exchange(&self) -> &str {
        self.publish.exchange
    }
    fn routing_key(&self) -> &str {
        self.publish.routing_key
    }
    fn property(&self, name: &str) -> Option<String> {
        match self.header.get(Property::from_name(name)?).ok()?? {
            PropValue::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
            PropValue::Octet(o) => Some(o.to_string()),
            PropValue::Timestamp(t) => Some(t.to_string()),
            PropValue::Table(_) => None,
        }
    }
    fn header(&self, name: &str) -> Option<String> {
        self.header
            .header(name)
            .ok()
            .flatten()
            .and_then(|v| v.as_text())
            .map(|c| c.into_owned())
    }
    fn header_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn body_size(&self) -> u64 {
        self.header.body_size
    }
    fn body(&self, _offset: u64, _len: u32) -> Vec<u8> {
        Vec::new()
    }
}

struct HeaderIdentity<'a>(&'a ContentHeader<'a>);

impl MessageIdentity for HeaderIdentity<'_> {
    fn app_id(&self) -> Option<String> {
        self.0
            .get_str(Property::AppId)
            .ok()
            .flatten()
            .map(|c| c.into_owned())
    }
    fn user_id(&self) -> Option<String> {
        None
    }
    fn header(&self, name: &str) -> Option<String> {
        self.0
            .header(name)
            .ok()
            .flatten()
            .and_then(|v| v.as_text())
            .map(|c| c.into_owned())
    }
}

fn conn_facts() -> ConnFacts {
    ConnFacts {
        client_properties: vec![
            ("product".into(), "py-amqp".into()),
            ("connection_name".into(), "web-7f9c6d5b8-x2k4p".into()),
        ],
        user: Some("guest".into()),
        vhost: Some("/".into()),
        peer_ip: "127.0.0.1".parse().ok(),
    }
}

fn never_firing_chain() -> Chain {
    let huge = Rate {
        amount: 100_000_000,
        per: Duration::from_secs(1),
    };
    let bytes = Rate {
        amount: 100 << 30,
        per: Duration::from_secs(1),
    };
    let stage = QuotaStage::new(
        "per-producer",
        Matcher {
            producer: Some(Glob::new("*")),
            ..Default::default()
        },
        Some((huge, 100_000_000)),
        Some((bytes, 100 << 30)),
        ActionSpec::Shed {
            reason: "over quota".into(),
        },
        false,
        governor::clock::DefaultClock::default(),
    );
    Chain::new(vec![stage], false)
}

fn chain_with_plugin(policy: &Arc<Policy>) -> Chain {
    never_firing_chain().with_policies(vec![PolicyStage::new(
        "celery-tasks".into(),
        Matcher::default(),
        policy.clone(),
        None,
        false,
        Duration::from_secs(1),
    )])
}

fn load_plugin() -> Option<Arc<Policy>> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist/celery_task_quota.wasm");
    if !path.exists() {
        eprintln!(
            "{} missing (make plugins): plugin benches skipped",
            path.display()
        );
        return None;
    }
    let engine = PluginEngine::new().expect("engine");
    let settings = PolicySettings::new(
        "celery-tasks",
        r#"{"default": "1000000000/s", "limits": [{"match": "reports.*", "rate": "100000000/s"}], "critical": ["auth.*"]}"#,
    );
    Some(Policy::load(&engine, &path, settings, &PluginShared::new()).expect("load plugin"))
}

fn bench(c: &mut Criterion) {
    let wire = wire(BATCH);
    let one = publish_wire(1, "orders.confirm");
    let header_payload = celery_header_payload("orders.confirm", BODY as u64);
    let facts = conn_facts();
    let conn_id = IdentitySpec::default().for_connection(&facts);
    let header_id = IdentitySpec::new(vec![
        Source::Header("x-producer".into()),
        Source::ClientProperty("connection_name".into()),
    ])
    .for_connection(&facts);
    let chain = never_firing_chain();
    let plugin = load_plugin();
    let producer: Arc<str> = "web-7f9c6d5b8-x2k4p".into();

    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("frame/split", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                while let Ok(Some(f)) = frame::split(buf, FRAME_MAX) {
                    black_box(&f);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("assemble", |b| {
        b.iter_batched_ref(
            || (BytesMut::from(&wire[..]), Vec::with_capacity(BATCH)),
            |(buf, out)| assemble(buf, out),
            BatchSize::SmallInput,
        )
    });

    g.throughput(Throughput::Elements(1));
    g.bench_function("header/task", |b| {
        b.iter(|| {
            let h = ContentHeader::parse(black_box(&header_payload)).expect("header");
            black_box(h.header("task").expect("scan").map(|v| v.as_text()))
        })
    });
    g.bench_function("header/app_id_absent", |b| {
        b.iter(|| {
            let h = ContentHeader::parse(black_box(&header_payload)).expect("header");
            black_box(h.get_str(Property::AppId).expect("scan"))
        })
    });
    let h = ContentHeader::parse(&header_payload).expect("header");
    g.bench_function("identity/connection_name", |b| {
        b.iter(|| black_box(conn_id.for_message(&HeaderIdentity(black_box(&h)))))
    });
    g.bench_function("identity/header_then_connection", |b| {
        b.iter(|| black_box(header_id.for_message(&HeaderIdentity(black_box(&h)))))
    });
    let limiter = Limiter::new(
        Some((
            Rate {
                amount: 100_000_000,
                per: Duration::from_secs(1),
            },
            100_000_000,
        )),
        Some((
            Rate {
                amount: 100 << 30,
                per: Duration::from_secs(1),
            },
            100 << 30,
        )),
    );
    g.bench_function("quota/check", |b| {
        b.iter(|| black_box(limiter.check(black_box(&producer), BODY as u64)))
    });
    let (_, args) = method::split_id(
        frame::check(&one, FRAME_MAX)
            .ok()
            .flatten()
            .and_then(|n| one.get(7..n - 1))
            .expect("method frame"),
    )
    .expect("method");
    let publish = Publish::decode(args).expect("publish");
    let m = Facts {
        producer: &producer,
        conn: &facts,
        publish,
        header: h,
    };
    let view = PublishView {
        producer: &producer,
        vhost: "/",
        exchange: "",
        routing_key: "celery",
        size: BODY as u64,
        facts: Some(&m),
    };
    g.bench_function("chain/quotas", |b| {
        b.iter(|| {
            let mut st = EvalState::default();
            black_box(chain.evaluate(black_box(&view), &mut st))
        })
    });
    let plugin_chain = plugin.as_ref().map(chain_with_plugin);
    if let (Some(policy), Some(pc)) = (&plugin, &plugin_chain) {
        g.bench_function("plugin/evaluate", |b| {
            b.iter(|| black_box(policy.evaluate(black_box(&m))))
        });
        g.bench_function("chain/quotas+plugin", |b| {
            b.iter(|| {
                let mut st = EvalState::default();
                black_box(pc.evaluate(black_box(&view), &mut st))
            })
        });
    }

    // Everything per message: split, assemble, decode, identity, chain (and plugin), queue the
    // original bytes for the upstream write.
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut run_pipeline = |name: &str, chain: &Chain| {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || {
                    (
                        BytesMut::from(&wire[..]),
                        Vec::with_capacity(BATCH),
                        OutQueue::default(),
                    )
                },
                |(buf, assembled, out)| {
                    assemble(buf, assembled);
                    for p in assembled.drain(..) {
                        let (_, args) = method::split_id(p.frames[0].payload()).expect("method");
                        let publish = Publish::decode(args).expect("publish");
                        let header = ContentHeader::parse(p.frames[1].payload()).expect("header");
                        let producer = conn_id.for_message(&HeaderIdentity(&header));
                        let m = Facts {
                            producer: &producer,
                            conn: &facts,
                            publish,
                            header,
                        };
                        let view = PublishView {
                            producer: &producer,
                            vhost: "/",
                            exchange: publish.exchange,
                            routing_key: publish.routing_key,
                            size: header.body_size,
                            facts: Some(&m),
                        };
                        let mut st = EvalState::default();
                        let step = chain.evaluate(&view, &mut st);
                        debug_assert!(matches!(step, Step::Done(_)));
                        for f in &p.frames {
                            out.push(&f.raw);
                        }
                    }
                    black_box(out.len())
                },
                BatchSize::SmallInput,
            )
        });
    };
    run_pipeline("pipeline/quotas", &chain);
    if let Some(pc) = &plugin_chain {
        run_pipeline("pipeline/quotas+plugin", pc);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
