//! What the load generator publishes: opaque bodies of a fixed size, or Celery protocol 2 task
//! messages (the headers kombu sets, a JSON body) with a configurable mix of task names.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::sync::Arc;

/// A task name and its share of the mix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskWeight {
    /// Celery task name, e.g. `reports.rebuild`.
    pub name: String,
    /// Relative weight.
    pub weight: u32,
}

/// Parse `reports.rebuild:90,auth.login_audit:10` (a missing weight counts as 1).
pub fn parse_tasks(s: &str) -> Result<Vec<TaskWeight>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = match part.rsplit_once(':') {
            Some((n, w)) => (
                n,
                w.parse::<u32>().map_err(|_| {
                    format!("task mix '{part}': weight '{w}' is not a whole number")
                })?,
            ),
            None => (part, 1),
        };
        if name.is_empty() || weight == 0 {
            return Err(format!(
                "task mix '{part}': need NAME:WEIGHT with WEIGHT > 0"
            ));
        }
        out.push(TaskWeight {
            name: name.to_string(),
            weight,
        });
    }
    if out.is_empty() {
        return Err("task mix is empty".into());
    }
    Ok(out)
}

/// A small, fast, seedable generator (xorshift64*): task choice and task ids.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A version-4-shaped UUID string.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }
}

/// Builds the messages of one producer.
#[derive(Debug, Clone)]
pub enum MessageKind {
    /// Opaque bodies, no properties.
    Raw {
        /// The body every message carries.
        body: Arc<Vec<u8>>,
    },
    /// Celery task messages.
    Celery(CeleryMix),
}

/// One task of the mix, with its headers prepared once.
#[derive(Debug, Clone)]
struct Task {
    weight: u32,
    headers: FieldTable,
}

/// Celery protocol 2 task messages, task names drawn from a weighted mix.
#[derive(Debug, Clone)]
pub struct CeleryMix {
    tasks: Vec<Task>,
    total: u64,
    body: Arc<Vec<u8>>,
}

impl CeleryMix {
    /// A mix whose bodies are padded to about `size` bytes.
    pub fn new(tasks: &[TaskWeight], size: usize) -> Self {
        let origin = format!("gen{}@loadgen", std::process::id());
        let tasks = tasks
            .iter()
            .map(|t| Task {
                weight: t.weight,
                headers: celery_headers(&t.name, &origin),
            })
            .collect::<Vec<_>>();
        let total = tasks.iter().map(|t| t.weight as u64).sum::<u64>().max(1);
        CeleryMix {
            tasks,
            total,
            body: Arc::new(celery_body(size)),
        }
    }

    fn pick(&self, rng: &mut Rng) -> &Task {
        let mut x = rng.next_u64() % self.total;
        for t in &self.tasks {
            if x < t.weight as u64 {
                return t;
            }
            x -= t.weight as u64;
        }
        &self.tasks[0]
    }
}

/// The headers Celery 5 sets on a task message, without the per-message `id` and `root_id`.
fn celery_headers(task: &str, origin: &str) -> FieldTable {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut h = FieldTable::default();
    h.insert("lang".into(), text("py"));
    h.insert("task".into(), text(task));
    h.insert("shadow".into(), AMQPValue::Void);
    h.insert("eta".into(), AMQPValue::Void);
    h.insert("expires".into(), AMQPValue::Void);
    h.insert("group".into(), AMQPValue::Void);
    h.insert("group_index".into(), AMQPValue::Void);
    h.insert("retries".into(), AMQPValue::LongInt(0));
    h.insert(
        "timelimit".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    h.insert("parent_id".into(), AMQPValue::Void);
    h.insert("argsrepr".into(), text("(42,)"));
    h.insert("kwargsrepr".into(), text("{'force': True}"));
    h.insert("origin".into(), text(origin));
    h.insert("ignore_result".into(), AMQPValue::Boolean(false));
    h.insert("replaced_task_nesting".into(), AMQPValue::LongInt(0));
    h.insert("stamped_headers".into(), AMQPValue::Void);
    h.insert(
        "stamps".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    h
}

/// `[args, kwargs, embed]` as Celery serializes it, the argument padded to reach `size` bytes.
fn celery_body(size: usize) -> Vec<u8> {
    let head = r#"[["#;
    let tail = r#"], {"force": true}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    let fixed = head.len() + tail.len() + 2;
    let pad = size.saturating_sub(fixed);
    let mut b = Vec::with_capacity(fixed + pad);
    b.extend_from_slice(head.as_bytes());
    b.push(b'"');
    b.resize(b.len() + pad, b'x');
    b.push(b'"');
    b.extend_from_slice(tail.as_bytes());
    b
}

/// One message ready to publish.
pub struct Outgoing<'a> {
    /// Body.
    pub body: &'a [u8],
    /// Properties (headers included).
    pub properties: BasicProperties,
}

impl MessageKind {
    /// Opaque bodies of `size` bytes.
    pub fn raw(size: usize) -> Self {
        let body = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        MessageKind::Raw {
            body: Arc::new(body),
        }
    }

    /// The next message.
    pub fn next<'a>(&'a self, rng: &mut Rng) -> Outgoing<'a> {
        match self {
            MessageKind::Raw { body } => Outgoing {
                body,
                properties: BasicProperties::default(),
            },
            MessageKind::Celery(mix) => {
                let task = mix.pick(rng);
                let id = rng.uuid();
                let mut headers = task.headers.clone();
                headers.insert("id".into(), AMQPValue::LongString(id.as_str().into()));
                headers.insert("root_id".into(), AMQPValue::LongString(id.as_str().into()));
                let properties = BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_content_encoding(ShortString::from("utf-8"))
                    .with_headers(headers)
                    .with_delivery_mode(2)
                    .with_priority(0)
                    .with_correlation_id(ShortString::from(id));
                Outgoing {
                    body: &mix.body,
                    properties,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_mix_parses_and_rejects_nonsense() {
        let t = parse_tasks("reports.rebuild:90, auth.login_audit:10").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].name, "auth.login_audit");
        assert_eq!(parse_tasks("mail.send").unwrap()[0].weight, 1);
        assert!(parse_tasks("a:0").is_err());
        assert!(parse_tasks("a:x").is_err());
    }

    #[test]
    fn celery_messages_follow_the_mix_and_have_unique_ids() {
        let mix = CeleryMix::new(&parse_tasks("hot:9,cold:1").unwrap(), 512);
        assert_eq!(mix.body.len(), 512);
        let kind = MessageKind::Celery(mix);
        let mut rng = Rng::new(7);
        let (mut hot, mut ids) = (0, std::collections::HashSet::new());
        for _ in 0..1000 {
            let m = kind.next(&mut rng);
            let h = m.properties.headers().clone().unwrap();
            let inner = h.inner();
            if inner.get("task") == Some(&AMQPValue::LongString("hot".into())) {
                hot += 1;
            }
            let Some(AMQPValue::LongString(id)) = inner.get("id") else {
                panic!("no id header");
            };
            assert!(ids.insert(id.to_string()));
        }
        assert!((850..950).contains(&hot), "{hot}");
    }
}
