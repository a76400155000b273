//! Turning a config file into a [`Config`]: every problem is collected, with its line, into one
//! [`Report`] before anything changes.

use super::model::*;
use super::units::{parse_duration, parse_rate, parse_size, Rate};
use crate::identity::{IdentitySpec, Source};
use crate::policy::chain::Matcher;
use crate::policy::glob::Glob;
use crate::policy::verdict::{ActionSpec, DivertTarget};
use crate::protocol::amqp::client::ProbeTarget;
use crate::protocol::Protocol;
use crate::quota::global::{Coordination, FailMode, GlobalScope, QuotaScope};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(l) => write!(f, "{}:{}: {}", self.path.display(), l, p.message)?,
                None => write!(f, "{}: {}", self.path.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// Admin API settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Most producers tracked by name in metrics.
    pub max_producers: usize,
    /// Bearer token for the API (from `token_file` or `token_env`, never from the TOML).
    pub token: Option<Arc<str>>,
    /// Serve `/metrics` without the token.
    pub metrics_open: bool,
}

impl AdminConfig {
    /// Whether a request with this `Authorization` header value carries the token
    /// (constant time in the token's length).
    pub fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let given = header
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let want = token.as_bytes();
        let mut diff = (given.len() ^ want.len()) as u8 | u8::from(given.len() != want.len());
        for (i, w) in want.iter().enumerate() {
            diff |= w ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

/// The broker behind a listener.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host:port`.
    pub addr: String,
    /// TLS to the broker.
    pub tls: Option<crate::tls::ClientTls>,
}

/// One validated listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name (metric label).
    pub name: Arc<str>,
    /// Protocol.
    pub protocol: Protocol,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The broker.
    pub upstream: Upstream,
    /// sluice's own login on the broker.
    pub probe: ProbeTarget,
    /// TLS termination for clients.
    pub tls: Option<crate::tls::ServerTls>,
}

/// Resource bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message body.
    pub max_message_size: u64,
    /// Most bytes of unfinished publishes buffered per connection.
    pub max_buffered_per_connection: u64,
    /// Most bytes of unfinished publishes and answers not yet sent to clients, over all
    /// connections.
    pub max_buffered_total: u64,
    /// Most bytes sluice reads ahead of a connection whose publishes wait, so that the client's
    /// TCP receive window keeps opening (0: reads stop while publishes wait).
    pub max_read_ahead: u64,
    /// Frame size cap when `frame_max = 0` is negotiated.
    pub max_frame_size: u32,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Upstream connect deadline.
    pub connect_timeout: Duration,
    /// Most client connections in total.
    pub max_connections: usize,
    /// Most client connections per producer.
    pub max_connections_per_producer: usize,
    /// Most channels per connection.
    pub max_channels: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 128 << 20,
            max_buffered_per_connection: 256 << 20,
            max_buffered_total: default_max_buffered_total(),
            max_read_ahead: 8 << 20,
            max_frame_size: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_per_producer: 1_000,
            max_channels: 2047,
        }
    }
}

/// The default `max_buffered_total`: 1 GiB, or a quarter of the memory sluice may use when that
/// is less (the cgroup's `memory.max` in a container, else the machine's memory). Buffered
/// publishes are sluice's only memory that grows with what clients send; a quarter leaves the
/// rest for read buffers that frames still point into, plugin instances, per-connection state
/// and allocator slack.
pub fn default_max_buffered_total() -> u64 {
    const CAP: u64 = 1 << 30;
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .next();
    let physical = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    // cgroup v1 reports "no limit" as a huge number: the smaller of the two is what counts.
    let memory = match (cgroup, physical) {
        (Some(c), Some(p)) => Some(c.min(p)),
        (c, p) => c.or(p),
    };
    memory.map_or(CAP, |m| (m / 4).clamp(16 << 20, CAP))
}

/// Connection-attempt limit per producer.
#[derive(Debug, Clone)]
pub struct Tarpit {
    /// Attempts per producer (`None` = off).
    pub rate: Option<Rate>,
    /// Attempts allowed at once.
    pub burst: u32,
    /// Longest hold before the attempt is refused.
    pub max_delay: Duration,
}

/// What a shed publish without confirms does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedUnconfirmed {
    /// Drop it, count it, log it.
    Drop,
    /// Close the channel with 406 and a reply text naming the quota.
    CloseChannel,
}

/// What a shed `mandatory` publish under confirms gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedMandatory {
    /// `basic.nack`.
    Nack,
    /// `basic.return` (312) then `basic.ack`.
    Return,
}

/// AMQP signalling settings.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Shed without confirms.
    pub shed_unconfirmed: ShedUnconfirmed,
    /// Shed of mandatory publishes under confirms.
    pub shed_mandatory: ShedMandatory,
    /// Hold length after which capable clients get `connection.blocked`.
    pub blocked_after: Duration,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// How often aggregated shed/divert/delay lines are written.
    pub verdict_interval: Duration,
}

/// One validated quota.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// Name.
    pub name: Arc<str>,
    /// Line of its `name`.
    pub line: usize,
    /// What it covers.
    pub matcher: Matcher,
    /// Message rate and burst.
    pub messages: Option<(Rate, u64)>,
    /// Byte rate and burst.
    pub bytes: Option<(Rate, u64)>,
    /// Action over the limit.
    pub on_exceed: ActionSpec,
    /// Count, don't act.
    pub dry_run: bool,
    /// Local buckets or global ones shared through Redis.
    pub scope: QuotaScope,
}

/// A validated, immutable config.
#[derive(Debug, Clone)]
pub struct Config {
    /// File it came from.
    pub path: PathBuf,
    /// Hash of the file's text (hex), shown by `/v1/config`.
    pub hash: String,
    /// The file's text.
    pub source: Arc<str>,
    /// Global dry run.
    pub dry_run: bool,
    /// Admin API.
    pub admin: AdminConfig,
    /// Listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Identity sources.
    pub identity: IdentitySpec,
    /// Resource bounds.
    pub limits: Limits,
    /// Tarpit.
    pub tarpit: Tarpit,
    /// AMQP signalling.
    pub amqp: AmqpSettings,
    /// Logging.
    pub log: LogSettings,
    /// Quotas in file order.
    pub quotas: Vec<QuotaConfig>,
    /// Wasm policies in file order (after the quotas).
    pub policies: Vec<super::policies::PolicyConfig>,
    /// Redis for global quotas.
    pub coordination: Option<Coordination>,
}

/// Read and validate a file.
pub fn load(path: &Path) -> Result<Config, Report> {
    let text = std::fs::read_to_string(path).map_err(|e| Report {
        path: path.to_path_buf(),
        problems: vec![Problem {
            line: None,
            message: format!("cannot read config file: {e}"),
        }],
    })?;
    parse(&text, path)
}

pub(super) struct Ctx<'a> {
    pub(super) src: &'a str,
    pub(super) problems: Vec<Problem>,
}

impl Ctx<'_> {
    pub(super) fn line_of(&self, offset: usize) -> usize {
        self.src
            .as_bytes()
            .get(..offset.min(self.src.len()))
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() + 1)
            .unwrap_or(1)
    }

    pub(super) fn at<T>(&mut self, s: &Spanned<T>, message: impl Into<String>) {
        let line = self.line_of(s.span().start);
        self.problems.push(Problem {
            line: Some(line),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        s: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match s {
            None => default,
            Some(v) => parse_duration(v.get_ref()).unwrap_or_else(|e| {
                self.at(v, format!("{key}: {e}"));
                default
            }),
        }
    }

    pub(super) fn size(&mut self, s: &Option<Spanned<String>>, key: &str, default: u64) -> u64 {
        match s {
            None => default,
            Some(v) => parse_size(v.get_ref()).unwrap_or_else(|e| {
                self.at(v, format!("{key}: {e}"));
                default
            }),
        }
    }
}

fn hash_hex(text: &str) -> String {
    // FNV-1a, 64 bit: a stable fingerprint for "which config is running", not a security hash.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Parse and validate config text. `path` is used in messages only.
pub fn parse(text: &str, path: &Path) -> Result<Config, Report> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let mut cx = Ctx {
            src: text,
            problems: vec![],
        };
        let line = e.span().map(|s| cx.line_of(s.start));
        let mut message = e.message().to_string();
        if message.contains("untagged enum ActionFile") {
            message = "on_exceed must be \"shed\", { shed = \"reason\" }, { delay = \"250ms\", then = ... } \
                       or { divert = { exchange = \"...\", routing_key = \"...\" } }"
                .into();
        } else if message.contains("untagged enum UpstreamFile") {
            message = "upstream must be \"host:port\" or { addr = \"host:port\", tls = true|false }".into();
        }
        cx.problems.push(Problem { line, message });
        Report {
            path: path.to_path_buf(),
            problems: cx.problems,
        }
    })?;
    let mut cx = Ctx {
        src: text,
        problems: vec![],
    };
    let cfg = build(&file, &mut cx, text, path);
    if cx.problems.is_empty() {
        Ok(cfg)
    } else {
        cx.problems.sort_by_key(|p| p.line.unwrap_or(0));
        Err(Report {
            path: path.to_path_buf(),
            problems: cx.problems,
        })
    }
}

fn build(file: &ConfigFile, cx: &mut Ctx<'_>, text: &str, path: &Path) -> Config {
    let admin = AdminConfig {
        listen: match &file.admin.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 9090)),
            Some(l) => l.get_ref().parse().unwrap_or_else(|_| {
                cx.at(
                    l,
                    format!(
                        "admin.listen: '{}' is not an address like 127.0.0.1:9090",
                        l.get_ref()
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 9090))
            }),
        },
        max_producers: file.admin.max_producers.unwrap_or(200),
        token: None,
        metrics_open: file.admin.metrics_open.unwrap_or(true),
    };
    let mut admin = admin;
    let token_source = match (&file.admin.token_file, &file.admin.token_env) {
        (Some(f), None) => {
            let p = path.parent().unwrap_or(Path::new(".")).join(f.get_ref());
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    cx.at(f, format!("admin.token_file {} is empty", p.display()));
                    None
                }
                Err(e) => {
                    cx.at(
                        f,
                        format!("admin.token_file: cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        }
        (None, Some(v)) => match std::env::var(v.get_ref()) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => {
                cx.at(
                    v,
                    format!(
                        "admin.token_env: environment variable {} is not set",
                        v.get_ref()
                    ),
                );
                None
            }
        },
        (Some(f), Some(_)) => {
            cx.at(f, "admin: give token_file or token_env, not both");
            None
        }
        (None, None) => None,
    };
    if let Some(t) = &token_source {
        if t.len() < 16 {
            cx.problems.push(Problem {
                line: None,
                message: "admin token must be at least 16 characters".into(),
            });
        }
    }
    admin.token = token_source.map(|t| t.into());
    if !admin.listen.ip().is_loopback() && admin.token.is_none() {
        let line = file
            .admin
            .listen
            .as_ref()
            .map(|l| cx.line_of(l.span().start));
        cx.problems.push(Problem {
            line,
            message: format!(
                "admin.listen {} is not loopback: set admin.token_file or admin.token_env",
                admin.listen
            ),
        });
    }

    let limits_default = Limits::default();
    let l = &file.limits;
    let limits = Limits {
        max_message_size: cx.size(
            &l.max_message_size,
            "limits.max_message_size",
            limits_default.max_message_size,
        ),
        max_buffered_per_connection: cx.size(
            &l.max_buffered_per_connection,
            "limits.max_buffered_per_connection",
            limits_default.max_buffered_per_connection,
        ),
        max_frame_size: {
            let v = cx.size(
                &l.max_frame_size,
                "limits.max_frame_size",
                limits_default.max_frame_size as u64,
            );
            if v < 4096 || v > u32::MAX as u64 {
                if let Some(s) = &l.max_frame_size {
                    cx.at(s, "limits.max_frame_size must be between 4KiB and 4GiB");
                }
            }
            v.clamp(4096, u32::MAX as u64) as u32
        },
        handshake_timeout: cx.duration(
            &l.handshake_timeout,
            "limits.handshake_timeout",
            limits_default.handshake_timeout,
        ),
        connect_timeout: cx.duration(
            &l.connect_timeout,
            "limits.connect_timeout",
            limits_default.connect_timeout,
        ),
        max_connections: l.max_connections.unwrap_or(limits_default.max_connections),
        max_connections_per_producer: l
            .max_connections_per_producer
            .unwrap_or(limits_default.max_connections_per_producer),
        max_buffered_total: cx.size(
            &l.max_buffered_total,
            "limits.max_buffered_total",
            limits_default.max_buffered_total,
        ),
        max_read_ahead: cx.size(
            &l.max_read_ahead,
            "limits.max_read_ahead",
            limits_default.max_read_ahead,
        ),
        max_channels: match &l.max_channels {
            None => limits_default.max_channels,
            Some(v) if *v.get_ref() == 0 => {
                cx.at(v, "limits.max_channels must be at least 1");
                limits_default.max_channels
            }
            Some(v) => *v.get_ref(),
        },
    };
    if let Some(v) = &l.max_buffered_total {
        if limits.max_buffered_total < limits.max_message_size {
            cx.at(
                v,
                format!(
                    "limits.max_buffered_total ({}) is less than limits.max_message_size ({}): \
                     a message that large could only be read while no other publish is buffered",
                    limits.max_buffered_total, limits.max_message_size
                ),
            );
        }
    }

    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    let mut listeners = Vec::new();
    if file.listeners.is_empty() {
        cx.problems.push(Problem {
            line: None,
            message: "no [[listener]]: add one with name, protocol, listen and upstream".into(),
        });
    }
    for lf in &file.listeners {
        if !names.insert(lf.name.get_ref().clone()) {
            cx.at(
                &lf.name,
                format!("duplicate listener name '{}'", lf.name.get_ref()),
            );
        }
        let protocol = match lf.protocol.get_ref().as_str() {
            "amqp091" | "amqp" => Protocol::Amqp091,
            "redis" => Protocol::Redis,
            other => {
                cx.at(
                    &lf.protocol,
                    format!("unknown protocol '{other}' (supported: amqp091, redis)"),
                );
                Protocol::Amqp091
            }
        };
        let listen = lf
            .listen
            .get_ref()
            .parse::<SocketAddr>()
            .unwrap_or_else(|_| {
                cx.at(
                    &lf.listen,
                    format!(
                        "listen: '{}' is not an address like 127.0.0.1:5673",
                        lf.listen.get_ref()
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            });
        if listen.port() != 0 && !addrs.insert(listen) {
            cx.at(
                &lf.listen,
                format!("listen address {listen} is used by two listeners"),
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let upstream = match lf.upstream.get_ref() {
            UpstreamFile::Addr(a) => Upstream {
                addr: a.clone(),
                tls: None,
            },
            UpstreamFile::Table {
                addr,
                tls,
                ca,
                server_name,
                cert,
                key,
            } => {
                let files = crate::tls::ClientTlsFiles {
                    ca: ca.as_ref().map(|c| base.join(c)),
                    server_name: server_name.clone(),
                    client_cert: match (cert, key) {
                        (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
                        (None, None) => None,
                        _ => {
                            cx.at(&lf.upstream, "upstream: cert and key go together");
                            None
                        }
                    },
                };
                if !tls && (ca.is_some() || server_name.is_some() || cert.is_some()) {
                    cx.at(
                        &lf.upstream,
                        "upstream: ca, server_name and cert need tls = true",
                    );
                }
                let tls = if *tls {
                    match crate::tls::ClientTls::load(addr, &files) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            cx.at(&lf.upstream, format!("upstream TLS: {e}"));
                            None
                        }
                    }
                } else {
                    None
                };
                Upstream {
                    addr: addr.clone(),
                    tls,
                }
            }
        };
        if upstream
            .addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            cx.at(
                &lf.upstream,
                format!("upstream '{}' must be host:port", upstream.addr),
            );
        }
        let tls = lf.tls.as_ref().and_then(|t| {
            let f = t.get_ref();
            crate::tls::ServerTls::load(
                &base.join(&f.cert),
                &base.join(&f.key),
                f.client_ca.as_ref().map(|c| base.join(c)).as_deref(),
            )
            .map_err(|e| cx.at(t, format!("listener '{}': tls: {e}", lf.name.get_ref())))
            .ok()
        });
        // RabbitMQ's default login; a Redis probe sends AUTH only when a password is given.
        let default_login = if protocol == Protocol::Redis {
            ""
        } else {
            "guest"
        };
        let password = match &lf.probe.password_env {
            Some(var) => std::env::var(var).unwrap_or_default(),
            None => default_login.into(),
        };
        listeners.push(ListenerConfig {
            name: lf.name.get_ref().as_str().into(),
            protocol,
            listen,
            probe: ProbeTarget {
                addr: upstream.addr.clone(),
                user: lf
                    .probe
                    .user
                    .clone()
                    .unwrap_or_else(|| default_login.into()),
                password,
                vhost: lf.probe.vhost.clone().unwrap_or_else(|| "/".into()),
                timeout: limits.connect_timeout,
                tls: upstream.tls.clone(),
            },
            tls,
            upstream,
        });
    }

    let identity = match &file.identity.from {
        None => IdentitySpec::default(),
        Some(list) => {
            let mut sources = vec![];
            for s in list {
                match Source::parse(s.get_ref()) {
                    Ok(src) => sources.push(src),
                    Err(e) => cx.at(s, format!("identity.from: {e}")),
                }
            }
            if list.is_empty() {
                cx.problems.push(Problem {
                    line: None,
                    message: "identity.from is empty: list at least one source, e.g. \"peer_ip\""
                        .into(),
                });
            }
            IdentitySpec::new(sources)
        }
    };

    let tarpit = Tarpit {
        rate: match &file.tarpit.rate {
            None => Some(Rate {
                amount: 20,
                per: Duration::from_secs(1),
            }),
            Some(r) if r.get_ref() == "off" => None,
            Some(r) => parse_rate(r.get_ref(), false)
                .map_err(|e| cx.at(r, format!("tarpit.rate: {e}")))
                .ok(),
        },
        burst: file.tarpit.burst.unwrap_or(40).max(1),
        max_delay: cx.duration(
            &file.tarpit.max_delay,
            "tarpit.max_delay",
            Duration::from_secs(5),
        ),
    };

    let amqp = AmqpSettings {
        shed_unconfirmed: match &file.amqp.shed_unconfirmed {
            None => ShedUnconfirmed::Drop,
            Some(s) => match s.get_ref().as_str() {
                "drop" => ShedUnconfirmed::Drop,
                "close_channel" => ShedUnconfirmed::CloseChannel,
                other => {
                    cx.at(s, format!("amqp.shed_unconfirmed: '{other}' must be \"drop\" or \"close_channel\""));
                    ShedUnconfirmed::Drop
                }
            },
        },
        shed_mandatory: match &file.amqp.shed_mandatory {
            None => ShedMandatory::Nack,
            Some(s) => match s.get_ref().as_str() {
                "nack" => ShedMandatory::Nack,
                "return" => ShedMandatory::Return,
                other => {
                    cx.at(
                        s,
                        format!("amqp.shed_mandatory: '{other}' must be \"nack\" or \"return\""),
                    );
                    ShedMandatory::Nack
                }
            },
        },
        blocked_after: cx.duration(
            &file.amqp.blocked_after,
            "amqp.blocked_after",
            Duration::from_secs(2),
        ),
    };

    let log = LogSettings {
        verdict_interval: cx.duration(
            &file.log.verdict_interval,
            "log.verdict_interval",
            crate::admin::events::DEFAULT_INTERVAL,
        ),
    };
    if let Some(v) = &file.log.verdict_interval {
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&log.verdict_interval) {
            cx.at(v, "log.verdict_interval: must be between 1s and 1h");
        }
    }

    let mut quota_names = HashSet::new();
    let mut quotas = Vec::new();
    for q in &file.quotas {
        let name = q.name.get_ref();
        if !quota_names.insert(name.clone()) {
            cx.at(&q.name, format!("duplicate quota name '{name}'"));
        }
        let burst = q.burst.as_ref().map(|b| {
            if *b.get_ref() == 0 {
                cx.at(b, format!("quota '{name}': burst must be at least 1"));
            }
            *b.get_ref()
        });
        let messages = q
            .messages
            .as_ref()
            .and_then(|m| match parse_rate(m.get_ref(), false) {
                Ok(r) => Some((
                    r,
                    burst.unwrap_or_else(|| crate::quota::local::default_burst(&r)),
                )),
                Err(e) => {
                    cx.at(m, format!("quota '{name}': messages: {e}"));
                    None
                }
            });
        let bytes = q
            .bytes
            .as_ref()
            .and_then(|m| match parse_rate(m.get_ref(), true) {
                Ok(r) => Some((r, crate::quota::local::default_burst(&r))),
                Err(e) => {
                    cx.at(m, format!("quota '{name}': bytes: {e}"));
                    None
                }
            });
        if q.messages.is_none() && q.bytes.is_none() {
            cx.at(
                &q.name,
                format!("quota '{name}' has neither messages nor bytes: add messages = \"500/s\""),
            );
        }
        let on_exceed = match &q.on_exceed {
            None => ActionSpec::Shed {
                reason: format!("over quota '{name}'").into(),
            },
            Some(a) => {
                let line = cx.line_of(a.span().start);
                action(a.get_ref(), name, line, cx, 0)
            }
        };
        let m = &q.matches;
        quotas.push(QuotaConfig {
            name: name.as_str().into(),
            line: cx.line_of(q.name.span().start),
            matcher: Matcher {
                producer: m.producer.as_deref().map(Glob::new),
                vhost: m.vhost.as_deref().map(Glob::new),
                exchange: m.exchange.as_deref().map(Glob::new),
                routing_key: m.routing_key.as_deref().map(Glob::new),
            },
            messages,
            bytes,
            on_exceed,
            dry_run: q.dry_run,
            scope: quota_scope(q, name, file.coordination.is_some(), cx),
        });
    }

    Config {
        path: path.to_path_buf(),
        hash: hash_hex(text),
        source: text.into(),
        dry_run: file.dry_run,
        admin,
        listeners,
        identity,
        limits,
        tarpit,
        amqp,
        log,
        policies: super::policies::build(&file.policies, &quota_names, path, cx),
        quotas,
        coordination: coordination(file, cx),
    }
}

fn action(a: &ActionFile, quota: &str, line: usize, cx: &mut Ctx<'_>, depth: usize) -> ActionSpec {
    let problem = |cx: &mut Ctx<'_>, msg: String| {
        cx.problems.push(Problem {
            line: Some(line),
            message: format!("quota '{quota}': on_exceed: {msg}"),
        })
    };
    let shed_default = || ActionSpec::Shed {
        reason: format!("over quota '{quota}'").into(),
    };
    if depth > 4 {
        problem(cx, "actions nest too deeply".into());
        return shed_default();
    }
    match a {
        ActionFile::Word(w) => match w.as_str() {
            "shed" => shed_default(),
            "forward" => ActionSpec::Forward,
            "delay" => ActionSpec::Delay {
                max: Duration::from_secs(1),
                then: Box::new(shed_default()),
            },
            other => {
                problem(cx, format!("unknown action '{other}' (use \"shed\", \"delay\", \"forward\" or a table)"));
                shed_default()
            }
        },
        ActionFile::Table(t) => {
            let set = [t.shed.is_some(), t.delay.is_some(), t.divert.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if set != 1 {
                problem(cx, "give exactly one of shed, delay or divert".into());
                return shed_default();
            }
            let then = |cx: &mut Ctx<'_>, default: ActionSpec| match &t.then {
                Some(n) => action(n, quota, line, cx, depth + 1),
                None => default,
            };
            if let Some(reason) = &t.shed {
                if t.then.is_some() {
                    problem(cx, "'then' has no meaning after shed".into());
                }
                return ActionSpec::Shed {
                    reason: reason.as_str().into(),
                };
            }
            if let Some(d) = &t.delay {
                let max = parse_duration(d).unwrap_or_else(|e| {
                    problem(cx, format!("delay: {e}"));
                    Duration::from_secs(1)
                });
                return ActionSpec::Delay {
                    max,
                    then: Box::new(then(cx, shed_default())),
                };
            }
            if let Some(dv) = &t.divert {
                if t.then.is_some() {
                    problem(cx, "put 'then' inside divert = { ... } (it applies past the divert's own rate)".into());
                }
                if dv.exchange.len() > 255 || dv.routing_key.len() > 255 {
                    problem(
                        cx,
                        "divert exchange and routing_key must be at most 255 bytes".into(),
                    );
                }
                let limit = dv
                    .messages
                    .as_ref()
                    .and_then(|m| match parse_rate(m, false) {
                        Ok(r) => Some((
                            r,
                            dv.burst
                                .unwrap_or_else(|| crate::quota::local::default_burst(&r)),
                        )),
                        Err(e) => {
                            problem(cx, format!("divert messages: {e}"));
                            None
                        }
                    });
                let then = match &dv.then {
                    Some(n) => action(n, quota, line, cx, depth + 1),
                    None => ActionSpec::Delay {
                        max: Duration::from_secs(1),
                        then: Box::new(shed_default()),
                    },
                };
                return ActionSpec::Divert {
                    target: DivertTarget {
                        exchange: dv.exchange.as_str().into(),
                        routing_key: dv.routing_key.clone(),
                    },
                    limit,
                    then: Box::new(then),
                };
            }
            shed_default()
        }
    }
}

fn coordination(file: &ConfigFile, cx: &mut Ctx<'_>) -> Option<Coordination> {
    let f = file.coordination.as_ref()?.get_ref();
    if let Err(e) = redis::Client::open(f.redis.get_ref().as_str()) {
        cx.at(
            &f.redis,
            format!("coordination.redis: not a Redis URL ({e}): use redis://host:6379 or rediss://host:6380"),
        );
    }
    let timeout = cx.duration(
        &f.timeout,
        "coordination.timeout",
        Duration::from_millis(250),
    );
    if let Some(t) = f
        .timeout
        .as_ref()
        .filter(|_| !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&timeout))
    {
        cx.at(t, "coordination.timeout must be between 1ms and 10s");
    }
    let lease = cx.duration(&f.lease, "coordination.lease", Duration::from_millis(200));
    if let Some(l) = f
        .lease
        .as_ref()
        .filter(|_| !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&lease))
    {
        cx.at(l, "coordination.lease must be between 10ms and 10s");
    }
    Some(Coordination {
        redis: f.redis.get_ref().clone(),
        prefix: f.prefix.clone().unwrap_or_else(|| "sluice:".into()),
        timeout,
        lease,
    })
}

fn quota_scope(q: &QuotaFile, name: &str, coordinated: bool, cx: &mut Ctx<'_>) -> QuotaScope {
    let global = match &q.scope {
        None => false,
        Some(s) => match s.get_ref().as_str() {
            "local" => false,
            "global" => {
                if !coordinated {
                    cx.at(s, format!("quota '{name}': scope = \"global\" needs a [coordination] section with redis = \"redis://host:6379\""));
                }
                true
            }
            other => {
                cx.at(
                    s,
                    format!("quota '{name}': scope '{other}' must be \"local\" or \"global\""),
                );
                false
            }
        },
    };
    let fail = match &q.fail {
        None => FailMode::Open,
        Some(f) => match f.get_ref().as_str() {
            "open" => FailMode::Open,
            "closed" => FailMode::Closed,
            other => {
                cx.at(
                    f,
                    format!("quota '{name}': fail '{other}' must be \"open\" or \"closed\""),
                );
                FailMode::Open
            }
        },
    };
    let instances = match &q.instances {
        None => 1,
        Some(n) if *n.get_ref() == 0 => {
            cx.at(n, format!("quota '{name}': instances must be at least 1"));
            1
        }
        Some(n) => *n.get_ref(),
    };
    if global {
        return QuotaScope::Global(GlobalScope { fail, instances });
    }
    if let Some(f) = &q.fail {
        cx.at(
            f,
            format!("quota '{name}': fail only applies to scope = \"global\""),
        );
    }
    if let Some(n) = &q.instances {
        cx.at(
            n,
            format!("quota '{name}': instances only applies to scope = \"global\""),
        );
    }
    QuotaScope::Local
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[admin]
listen = "127.0.0.1:9090"

[[listener]]
name = "amqp"
protocol = "amqp091"
listen = "127.0.0.1:5673"
upstream = "127.0.0.1:5672"

[identity]
from = ["client_property:connection_name", "user", "peer_ip"]

[[quota]]
name = "per-producer"
match = { producer = "*" }
messages = "500/s"
bytes = "5MiB/s"
burst = 1000
on_exceed = { divert = { exchange = "", routing_key = "overflow" } }
"#;

    #[test]
    fn design_example_validates() {
        let c = parse(GOOD, Path::new("sluice.toml")).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.quotas[0].messages.unwrap().1, 1000);
        assert!(matches!(c.quotas[0].on_exceed, ActionSpec::Divert { .. }));
    }

    #[test]
    fn limits_parse_and_their_problems_have_lines() {
        let good =
            format!("{GOOD}\n[limits]\nmax_buffered_total = \"512MiB\"\nmax_channels = 16\n");
        let c = parse(&good, Path::new("l.toml")).unwrap();
        assert_eq!(c.limits.max_buffered_total, 512 << 20);
        assert_eq!(c.limits.max_channels, 16);
        let d = default_max_buffered_total();
        assert!((16 << 20..=1 << 30).contains(&d), "default {d}");

        let bad = format!(
            "{GOOD}\n[limits]\nmax_message_size = \"2MiB\"\nmax_buffered_total = \"1MiB\"\nmax_channels = 0\n"
        );
        let text = parse(&bad, Path::new("l.toml")).unwrap_err().to_string();
        assert!(
            text.contains("l.toml:24: limits.max_buffered_total (1048576) is less than limits.max_message_size"),
            "{text}"
        );
        assert!(
            text.contains("l.toml:25: limits.max_channels must be at least 1"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let bad = r#"
[[listener]]
name = "amqp"
protocol = "mqtt"
listen = "nowhere"
upstream = "127.0.0.1:5672"

[[listener]]
name = "amqp"
protocol = "amqp091"
listen = "127.0.0.1:5674"
upstream = "127.0.0.1:5672"

[[quota]]
name = "q"
messages = "lots/s"
on_exceed = { delay = "soon" }
"#;
        let r = parse(bad, Path::new("bad.toml")).unwrap_err();
        let text = r.to_string();
        assert!(
            text.contains("bad.toml:4: unknown protocol 'mqtt'"),
            "{text}"
        );
        assert!(text.contains("bad.toml:5: listen: 'nowhere'"), "{text}");
        assert!(
            text.contains("bad.toml:9: duplicate listener name 'amqp'"),
            "{text}"
        );
        assert!(text.contains("bad.toml:16: quota 'q': messages"), "{text}");
        assert!(
            text.contains("bad.toml:17: quota 'q': on_exceed: delay"),
            "{text}"
        );
        assert_eq!(r.problems.len(), 5, "{text}");
    }

    #[test]
    fn global_quotas_parse_and_their_problems_have_lines() {
        let good = format!(
            "{GOOD}\n[coordination]\nredis = \"redis://127.0.0.1:6379\"\nprefix = \"t:\"\n\n\
             [[quota]]\nname = \"g\"\nmessages = \"300/s\"\nscope = \"global\"\nfail = \"closed\"\ninstances = 3\n"
        );
        let c = parse(&good, Path::new("g.toml")).unwrap();
        assert_eq!(c.quotas[0].scope, QuotaScope::Local);
        assert_eq!(
            c.quotas[1].scope,
            QuotaScope::Global(GlobalScope {
                fail: FailMode::Closed,
                instances: 3
            })
        );
        let co = c.coordination.unwrap();
        assert_eq!(co.prefix, "t:");
        assert_eq!(co.timeout, Duration::from_millis(250));

        let bad = "[[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\nlisten = \"127.0.0.1:5673\"\nupstream = \"127.0.0.1:5672\"\n\n\
                   [[quota]]\nname = \"g\"\nmessages = \"300/s\"\nscope = \"global\"\nfail = \"maybe\"\ninstances = 0\n\n\
                   [[quota]]\nname = \"l\"\nmessages = \"300/s\"\nscope = \"planet\"\nfail = \"open\"\n";
        let text = parse(bad, Path::new("b.toml")).unwrap_err().to_string();
        assert!(
            text.contains("b.toml:10: quota 'g': scope = \"global\" needs a [coordination]"),
            "{text}"
        );
        assert!(
            text.contains("b.toml:11: quota 'g': fail 'maybe'"),
            "{text}"
        );
        assert!(
            text.contains("b.toml:12: quota 'g': instances must be at least 1"),
            "{text}"
        );
        assert!(
            text.contains("b.toml:17: quota 'l': scope 'planet'"),
            "{text}"
        );
        assert!(
            text.contains("b.toml:18: quota 'l': fail only applies"),
            "{text}"
        );

        let bad_url =
            format!("{GOOD}\n[coordination]\nredis = \"http://nowhere\"\ntimeout = \"1h\"\n");
        let text = parse(&bad_url, Path::new("u.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("u.toml:23: coordination.redis: not a Redis URL"),
            "{text}"
        );
        assert!(
            text.contains("u.toml:24: coordination.timeout must be"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_line() {
        let r = parse(
            "[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        let text = r.to_string();
        assert!(
            text.starts_with("x.toml:3: unknown field `lisen`"),
            "{text}"
        );
    }
}
