//! Fakes for testing policy logic natively: a message built field by field and a host with
//! real token buckets on a clock the test moves by hand.
//!
//! ```
//! use sluice_policy_sdk::testing::{FakeHost, FakeMessage};
//! use sluice_policy_sdk::{Host, Limit};
//! use std::time::Duration;
//!
//! let host = FakeHost::new();
//! let limit: Limit = "2/s".parse().unwrap();
//! assert!(host.try_acquire("k", limit));
//! assert!(host.try_acquire("k", limit));
//! assert!(!host.try_acquire("k", limit));
//! host.advance(Duration::from_millis(500));
//! assert!(host.try_acquire("k", limit));
//! let msg = FakeMessage::new().header("task", "reports.rebuild");
//! ```

use crate::{BrokerSignals, Host, Level, Limit, Message};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

/// A message built for a test. Unset fields read as empty / `None`.
#[derive(Debug, Clone, Default)]
pub struct FakeMessage {
    /// Protocol; "amqp091" by default.
    pub protocol: String,
    /// Producer identity.
    pub producer: String,
    /// Virtual host; "/" by default.
    pub vhost: String,
    /// Authenticated user.
    pub user: Option<String>,
    /// Client address.
    pub peer: Option<String>,
    /// Client properties.
    pub client_properties: BTreeMap<String, String>,
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Message properties.
    pub properties: BTreeMap<String, String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

impl FakeMessage {
    /// An empty AMQP message on vhost "/".
    pub fn new() -> Self {
        Self {
            protocol: "amqp091".into(),
            vhost: "/".into(),
            ..Self::default()
        }
    }

    /// A Celery task message as kombu publishes it: default exchange, `task` and `id`
    /// headers, JSON body.
    pub fn celery(task: &str) -> Self {
        Self::new()
            .routing_key("celery")
            .property("content_type", "application/json")
            .property("priority", "0")
            .header("task", task)
            .header("id", "3f5a8e2c-0d41-4f1b-9a53-8a4c9e0e1b7d")
            .body(br#"[[], {}, {"callbacks": null}]"#.to_vec())
    }

    /// Sets the producer.
    pub fn producer(mut self, p: &str) -> Self {
        self.producer = p.into();
        self
    }
    /// Sets the exchange.
    pub fn exchange(mut self, e: &str) -> Self {
        self.exchange = e.into();
        self
    }
    /// Sets the routing key.
    pub fn routing_key(mut self, k: &str) -> Self {
        self.routing_key = k.into();
        self
    }
    /// Sets a message property.
    pub fn property(mut self, name: &str, value: &str) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
    /// Sets an application header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Sets a client property.
    pub fn client_property(mut self, name: &str, value: &str) -> Self {
        self.client_properties.insert(name.into(), value.into());
        self
    }
    /// Sets the body.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

impl Message for FakeMessage {
    fn protocol(&self) -> String {
        self.protocol.clone()
    }
    fn producer(&self) -> String {
        self.producer.clone()
    }
    fn vhost(&self) -> String {
        self.vhost.clone()
    }
    fn user(&self) -> Option<String> {
        self.user.clone()
    }
    fn peer(&self) -> Option<String> {
        self.peer.clone()
    }
    fn client_property(&self, name: &str) -> Option<String> {
        self.client_properties.get(name).cloned()
    }
    fn exchange(&self) -> String {
        self.exchange.clone()
    }
    fn routing_key(&self) -> String {
        self.routing_key.clone()
    }
    fn property(&self, name: &str) -> Option<String> {
        self.properties.get(name).cloned()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).cloned()
    }
    fn header_names(&self) -> Vec<String> {
        self.headers.keys().cloned().collect()
    }
    fn body_size(&self) -> u64 {
        self.body.len() as u64
    }
    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.body.len());
        let end = start.saturating_add(len as usize).min(self.body.len());
        self.body[start..end].to_vec()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Duration,
    calls: u64,
}

/// A host for tests: token buckets on a manual clock, counters, signals and logs to inspect.
#[derive(Debug, Default)]
pub struct FakeHost {
    now: Cell<Duration>,
    buckets: RefCell<BTreeMap<String, Bucket>>,
    counters: RefCell<BTreeMap<String, u64>>,
    /// Broker signals returned by [`Host::signals`]; tests set them directly.
    pub signals: Cell<BrokerSignals>,
    queue_depths: RefCell<BTreeMap<String, u64>>,
    logs: RefCell<Vec<(Level, String)>>,
}

impl FakeHost {
    /// A host at time zero with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }

    /// Sets the broker signals.
    pub fn set_signals(&self, s: BrokerSignals) {
        self.signals.set(s);
    }

    /// Sets a queue's depth.
    pub fn set_queue_depth(&self, queue: &str, depth: u64) {
        self.queue_depths.borrow_mut().insert(queue.into(), depth);
    }

    /// A counter's value (0 if never incremented).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.borrow().get(name).copied().unwrap_or(0)
    }

    /// Everything logged so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

impl Host for FakeHost {
    fn try_acquire(&self, key: &str, limit: Limit) -> bool {
        let now = self.now.get();
        let mut buckets = self.buckets.borrow_mut();
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            last: now,
            calls: 0,
        });
        let elapsed = (now - b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        b.last = now;
        b.calls += 1;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Calls per second since the bucket was created (a test approximation of the host's
    /// smoothed rate).
    fn rate(&self, key: &str) -> f64 {
        let buckets = self.buckets.borrow();
        let Some(b) = buckets.get(key) else {
            return 0.0;
        };
        let secs = self.now.get().as_secs_f64().max(1.0);
        b.calls as f64 / secs
    }

    fn incr(&self, name: &str, delta: u64) {
        *self.counters.borrow_mut().entry(name.into()).or_default() += delta;
    }

    fn signals(&self) -> BrokerSignals {
        self.signals.get()
    }

    fn queue_depth(&self, queue: &str) -> Option<u64> {
        self.queue_depths.borrow().get(queue).copied()
    }

    fn now(&self) -> Duration {
        self.now.get()
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.into()));
    }
}
