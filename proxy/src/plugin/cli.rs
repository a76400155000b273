//! `sluice plugin test`: run a policy plugin on a message described in JSON, outside the proxy,
//! and print the verdicts and the counters it touched.
//!
//! The message file holds one message or a list:
//!
//! ```json
//! {
//!   "producer": "web",
//!   "vhost": "/",
//!   "user": "guest",
//!   "peer": "10.0.0.7:50123",
//!   "client_properties": { "connection_name": "web-1" },
//!   "exchange": "",
//!   "routing_key": "celery",
//!   "properties": { "content_type": "application/json", "priority": 0 },
//!   "headers": { "task": "reports.rebuild", "id": "3f5a8e2c-0d41-4f1b-9a53-8a4c9e0e1b7d" },
//!   "body": "[[], {}, {}]"
//! }
//! ```
//! Every field is optional; `protocol` defaults to `amqp091`. Property and header values may be
//! strings, numbers or booleans (other JSON is passed as its JSON text).

use super::{
    FailMode, MessageFacts, PluginEngine, PluginShared, PluginVerdict, Policy, PolicySettings,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `sluice plugin test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin (`.wasm` component).
    pub plugin: PathBuf,
    /// JSON file with one message or a list of messages.
    #[arg(long)]
    pub message: PathBuf,
    /// JSON file with the policy's config (what `config = {...}` holds in sluice.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Evaluate the messages this many times (to see quotas run out).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Verdict when the plugin fails.
    #[arg(long, value_parser = ["open", "closed"], default_value = "open")]
    pub fail: String,
    /// Time budget per call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub time_budget_ms: u64,
    /// Memory cap, in MiB.
    #[arg(long, default_value_t = 16)]
    pub memory_mib: usize,
}

/// A message read from JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonMessage {
    protocol: Option<String>,
    producer: String,
    vhost: Option<String>,
    user: Option<String>,
    peer: Option<String>,
    client_properties: BTreeMap<String, serde_json::Value>,
    exchange: String,
    routing_key: String,
    properties: BTreeMap<String, serde_json::Value>,
    headers: BTreeMap<String, serde_json::Value>,
    body: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Box<JsonMessage>),
    Many(Vec<JsonMessage>),
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl MessageFacts for JsonMessage {
    fn protocol(&self) -> &str {
        self.protocol.as_deref().unwrap_or("amqp091")
    }
    fn producer(&self) -> &str {
        &self.producer
    }
    fn vhost(&self) -> &str {
        self.vhost.as_deref().unwrap_or("/")
    }
    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    fn peer(&self) -> Option<String> {
        self.peer.clone()
    }
    fn client_property(&self, name: &str) -> Option<String> {
        self.client_properties.get(name).map(text)
    }
    fn exchange(&self) -> &str {
        &self.exchange
    }
    fn routing_key(&self) -> &str {
        &self.routing_key
    }
    fn property(&self, name: &str) -> Option<String> {
        self.properties.get(name).map(text)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(text)
    }
    fn header_names(&self) -> Vec<String> {
        self.headers.keys().cloned().collect()
    }
    fn body_size(&self) -> u64 {
        self.body.len() as u64
    }
    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        let b = self.body.as_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
        let end = start.saturating_add(len as usize).min(b.len());
        b.get(start..end).unwrap_or_default().to_vec()
    }
}

fn describe(v: &PluginVerdict) -> String {
    match v {
        PluginVerdict::Forward => "forward".into(),
        PluginVerdict::Delay(d) => format!("delay {}ms", d.as_millis()),
        PluginVerdict::Shed(reason) => format!("shed: {reason}"),
        PluginVerdict::Divert {
            exchange,
            routing_key,
        } => format!("divert to exchange {exchange:?} routing key {routing_key:?}"),
    }
}

/// Runs `sluice plugin test`. Returns an error message for the caller to print; plugin
/// failures during evaluation are reported in the output and make the result an error too.
pub fn run(args: &TestArgs) -> Result<(), String> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let messages: Vec<JsonMessage> = match serde_json::from_str(&read(&args.message)?) {
        Ok(OneOrMany::One(m)) => vec![*m],
        Ok(OneOrMany::Many(v)) => v,
        Err(e) => {
            return Err(format!(
                "{}: not a message or list of messages: {e}",
                args.message.display()
            ))
        }
    };
    let config = match &args.config {
        Some(p) => {
            let text = read(p)?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("{}: invalid JSON: {e}", p.display()))?;
            text
        }
        None => String::new(),
    };
    let mut settings = PolicySettings::new("test", config);
    settings.fail = if args.fail == "closed" {
        FailMode::Closed
    } else {
        FailMode::Open
    };
    settings.time_budget = Duration::from_millis(args.time_budget_ms);
    settings.memory_limit = args.memory_mib.saturating_mul(1 << 20);
    settings.max_errors = u32::MAX;

    let engine = PluginEngine::new().map_err(|e| e.to_string())?;
    let shared = PluginShared::new();
    let policy =
        Policy::load(&engine, &args.plugin, settings, &shared).map_err(|e| e.to_string())?;
    println!(
        "plugin  {} (sha256 {})",
        args.plugin.display(),
        policy.hash()
    );

    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0u64;
    let total = messages.len() as u64 * u64::from(args.repeat);
    for round in 0..args.repeat {
        for (i, msg) in messages.iter().enumerate() {
            let e = policy.evaluate(msg);
            let verdict = describe(&e.verdict);
            let line = match e.error {
                Some(kind) => {
                    failures += 1;
                    format!("{verdict} (plugin failed: {kind})")
                }
                None => verdict,
            };
            // Print every verdict for small runs, then only the summary.
            if total <= 20 {
                println!("message {} round {}: {line}", i + 1, round + 1);
            }
            let key = match &e.verdict {
                PluginVerdict::Forward => "forward",
                PluginVerdict::Delay(_) => "delay",
                PluginVerdict::Shed(_) => "shed",
                PluginVerdict::Divert { .. } => "divert",
            };
            *tally.entry(key.into()).or_default() += 1;
        }
    }
    let summary: Vec<String> = tally.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("verdicts: {} ({total} evaluations)", summary.join(", "));
    let counters = policy.stats().counters();
    if counters.is_empty() {
        println!("counters: none");
    } else {
        println!("counters:");
        for (name, v) in counters {
            println!("  {name} {v}");
        }
    }
    let stats = policy.stats();
    let per = stats.eval_time().as_nanos() / u128::from(stats.evaluations().max(1));
    println!("time: {per} ns per evaluation (including the first call)");
    if failures > 0 {
        return Err(format!(
            "the plugin failed {failures} of {total} evaluations"
        ));
    }
    Ok(())
}
