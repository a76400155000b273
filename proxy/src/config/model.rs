//! The config file as written (serde types). Values that need checking keep their position in
//! the file (`Spanned`) so validation can name the line.

use serde::Deserialize;
use toml::Spanned;

/// The whole `sluice.toml`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Evaluate every quota and policy but forward everything ("would" verdicts are counted).
    #[serde(default)]
    pub dry_run: bool,
    /// Admin HTTP API.
    #[serde(default)]
    pub admin: AdminFile,
    /// Listeners: one per protocol endpoint.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
    /// How producers are named.
    #[serde(default)]
    pub identity: IdentityFile,
    /// Resource bounds.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Connection-attempt limit per producer.
    #[serde(default)]
    pub tarpit: TarpitFile,
    /// AMQP signalling choices.
    #[serde(default)]
    pub amqp: AmqpFile,
    /// Logging.
    #[serde(default)]
    pub log: LogFile,
    /// Rate quotas.
    #[serde(default, rename = "quota")]
    pub quotas: Vec<QuotaFile>,
    /// `[[policy]]` tables, in file order.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyFile>,
    /// How sidecars share `scope = "global"` quotas.
    pub coordination: Option<Spanned<CoordinationFile>>,
}

/// `[admin]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Address of the admin HTTP API (default `127.0.0.1:9090`).
    pub listen: Option<Spanned<String>>,
    /// Most producers tracked by name in metrics; the rest are counted as `other`.
    pub max_producers: Option<usize>,
    /// File holding the API's bearer token (required when `listen` is not loopback).
    pub token_file: Option<Spanned<String>>,
    /// Environment variable holding the token.
    pub token_env: Option<Spanned<String>>,
    /// Serve `/metrics` without the token (default true).
    pub metrics_open: Option<bool>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name, used as the `listener` metric label.
    pub name: Spanned<String>,
    /// `amqp091`.
    pub protocol: Spanned<String>,
    /// Address to accept clients on.
    pub listen: Spanned<String>,
    /// The broker.
    pub upstream: Spanned<UpstreamFile>,
    /// Credentials sluice uses on its own connection (readiness, divert checks).
    #[serde(default)]
    pub probe: ProbeFile,
    /// TLS termination for clients.
    pub tls: Option<Spanned<ListenerTlsFile>>,
}

/// `[listener.tls]`: sluice terminates TLS for clients.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    /// Certificate chain (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
    /// CA (PEM) client certificates must chain to; when set, clients must present one.
    pub client_ca: Option<String>,
}

/// `upstream = "host:port"` or `upstream = { addr = "host:port" }`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum UpstreamFile {
    /// Plain address.
    Addr(String),
    /// Address with options.
    Table {
        /// `host:port`.
        addr: String,
        /// TLS to the broker.
        #[serde(default)]
        tls: bool,
        /// CA bundle (PEM) to verify the broker with; the system roots when absent.
        #[serde(default)]
        ca: Option<String>,
        /// Name to verify in the broker's certificate and send as SNI (default: the host).
        #[serde(default)]
        server_name: Option<String>,
        /// Client certificate chain (PEM) for brokers that ask for one.
        #[serde(default)]
        cert: Option<String>,
        /// Its private key (PEM).
        #[serde(default)]
        key: Option<String>,
    },
}

/// `[listener.probe]`: how sluice logs in on its own connection.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProbeFile {
    /// User (default `guest`).
    pub user: Option<String>,
    /// Environment variable that holds the password (default: password `guest`).
    pub password_env: Option<String>,
    /// Virtual host (default `/`).
    pub vhost: Option<String>,
}

/// `[identity]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Sources in order; the first that yields a value names the producer.
    pub from: Option<Vec<Spanned<String>>>,
}

/// `[limits]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest message (body) accepted; a larger publish closes its channel with 406.
    pub max_message_size: Option<Spanned<String>>,
    /// Most bytes of unfinished publishes buffered per connection.
    pub max_buffered_per_connection: Option<Spanned<String>>,
    /// Most bytes of unfinished publishes and pending answers buffered over all connections;
    /// past it, publishes wait to be read (backpressure).
    pub max_buffered_total: Option<Spanned<String>>,
    /// Most bytes read ahead of a connection whose publishes wait (paced, or a slow broker).
    pub max_read_ahead: Option<Spanned<String>>,
    /// Largest frame sluice accepts when the client negotiates `frame_max = 0`.
    pub max_frame_size: Option<Spanned<String>>,
    /// Time a client has to finish the AMQP handshake.
    pub handshake_timeout: Option<Spanned<String>>,
    /// Time to connect to the upstream.
    pub connect_timeout: Option<Spanned<String>>,
    /// Most client connections in total.
    pub max_connections: Option<usize>,
    /// Most client connections per producer.
    pub max_connections_per_producer: Option<usize>,
    /// Most channels per connection: passed on to clients as `channel_max` in
    /// `connection.tune`, enforced on `channel.open`.
    pub max_channels: Option<Spanned<u16>>,
}

/// `[tarpit]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TarpitFile {
    /// Connection attempts per producer, e.g. `5/s`.
    pub rate: Option<Spanned<String>>,
    /// Attempts allowed at once before the rate applies.
    pub burst: Option<u32>,
    /// Longest an attempt is held before it is refused with `530`.
    pub max_delay: Option<Spanned<String>>,
}

/// `[amqp]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AmqpFile {
    /// Shed without confirms: `"drop"` (count and log) or `"close_channel"` (406).
    pub shed_unconfirmed: Option<Spanned<String>>,
    /// Shed of a `mandatory` publish under confirms: `"nack"` or `"return"` (`basic.return` + ack).
    pub shed_mandatory: Option<Spanned<String>>,
    /// A delay hold longer than this sends `connection.blocked` to capable clients.
    pub blocked_after: Option<Spanned<String>>,
}

/// `[log]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// How often shed/divert/delay counts are logged, one line per producer and verdict
    /// (default `10s`).
    pub verdict_interval: Option<Spanned<String>>,
}

/// `[[quota]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFile {
    /// Unique name.
    pub name: Spanned<String>,
    /// Which publishes the quota applies to.
    #[serde(default, rename = "match")]
    pub matches: MatchFile,
    /// Message rate, e.g. `500/s`.
    pub messages: Option<Spanned<String>>,
    /// Byte rate, e.g. `5MiB/s`.
    pub bytes: Option<Spanned<String>>,
    /// Messages allowed at once above the rate (default: one second's worth).
    pub burst: Option<Spanned<u64>>,
    /// What happens to a publish over the quota (default `"shed"`).
    pub on_exceed: Option<Spanned<ActionFile>>,
    /// Count what would happen but forward.
    #[serde(default)]
    pub dry_run: bool,
    /// `"local"` (default: buckets in this process) or `"global"` (shared through Redis).
    pub scope: Option<Spanned<String>>,
    /// Global quotas while Redis is down: `"open"` (local fallback) or `"closed"` (over quota).
    pub fail: Option<Spanned<String>>,
    /// Global quotas: sidecars expected to share the quota; the fallback gets rate / instances.
    pub instances: Option<Spanned<u32>>,
}

/// `[coordination]`: the Redis that global quotas share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationFile {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub redis: Spanned<String>,
    /// Prefix of every key sluice writes (default `sluice:`).
    pub prefix: Option<String>,
    /// Longest a Redis call may take before Redis counts as down (default `250ms`).
    pub timeout: Option<Spanned<String>>,
    /// A lease holds about this long of the local demand (default `200ms`).
    pub lease: Option<Spanned<String>>,
}

/// `match = { producer = "web-*", exchange = "", routing_key = "celery" }`; globs with `*`, `?`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    /// Producer identity glob.
    pub producer: Option<String>,
    /// Virtual host glob.
    pub vhost: Option<String>,
    /// Exchange glob (the default exchange is `""`).
    pub exchange: Option<String>,
    /// Routing key glob.
    pub routing_key: Option<String>,
}

/// A verdict for publishes over a limit.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum ActionFile {
    /// `"shed"` or `"forward"`.
    Word(String),
    /// A table with exactly one of `shed`, `delay`, `divert`.
    Table(ActionTable),
}

/// `{ shed = "reason" }`, `{ delay = "250ms", then = ... }`, `{ divert = { ... } }`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ActionTable {
    /// Shed with this reason.
    pub shed: Option<String>,
    /// Hold up to this long for tokens.
    pub delay: Option<String>,
    /// Divert to another destination.
    pub divert: Option<DivertFile>,
    /// What to do when a delay would exceed its maximum (default `"shed"`).
    pub then: Option<Box<ActionFile>>,
}

/// `divert = { exchange = "", routing_key = "overflow.{routing_key}", messages = "2000/s" }`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DivertFile {
    /// Target exchange (`""` = default exchange).
    pub exchange: String,
    /// Target routing key; `{routing_key}`, `{exchange}` and `{producer}` are replaced.
    pub routing_key: String,
    /// The divert's own message rate; past it `then` applies.
    pub messages: Option<String>,
    /// Burst of the divert's own rate.
    pub burst: Option<u64>,
    /// What to do past the divert's own rate (default `{ delay = "1s" }`, then shed).
    pub then: Option<Box<ActionFile>>,
}

/// `[[policy]]`: a Wasm plugin in the chain, after the quotas.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Unique name: metric label and namespace of the plugin's buckets and counters.
    pub name: Spanned<String>,
    /// Path of the `.wasm` component, relative to the config file.
    pub plugin: Spanned<String>,
    /// Which publishes the policy sees (globs, like a quota's).
    #[serde(default, rename = "match")]
    pub matches: MatchFile,
    /// Handed to the plugin's `init` as JSON.
    pub config: Option<Spanned<toml::Value>>,
    /// "open" (forward) or "closed" (shed) when the plugin fails.
    pub fail: Option<Spanned<String>>,
    /// Count "would" verdicts, forward everything.
    #[serde(default)]
    pub dry_run: bool,
    /// Per-call time budget, e.g. "20ms" (the default).
    pub time_budget: Option<Spanned<String>>,
    /// Linear memory cap, e.g. "16MiB".
    pub memory_limit: Option<Spanned<String>>,
    /// Errors within `error_window` that disable the policy (and roll it back after a reload).
    pub max_errors: Option<u32>,
    /// Window for `max_errors`, e.g. "60s".
    pub error_window: Option<Spanned<String>>,
    /// Longest hold the policy's delay verdicts may cause; past it the publish is shed.
    pub max_delay: Option<Spanned<String>>,
}
