//! Operator commands that read a running sluice's admin API: `sluice top` (a live view of
//! `/v1/producers`: rates, verdict counts, connections) and `sluice drain` (wait until clients
//! have disconnected, for a Kubernetes `preStop` hook). Plain ANSI, no TUI library: the view is
//! redrawn in the terminal's alternate screen once per interval.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin API address (`[admin] listen`).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9090")]
    pub admin: String,
    /// File holding the admin bearer token (`[admin] token_file`).
    #[arg(long, value_name = "PATH", conflicts_with = "token_env")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the admin bearer token (`[admin] token_env`).
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
}

/// How `sluice top` orders producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Publishes per second (all verdicts), busiest first.
    Rate,
    /// Shed publishes per second.
    Shed,
    /// Publishes since sluice started.
    Total,
    /// Producer name.
    Name,
}

/// `sluice top` options.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Admin API address and token.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Refresh interval (`500ms`, `1s`, `5s`...).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    pub interval: Duration,
    /// Print one snapshot and exit.
    #[arg(long)]
    pub once: bool,
    /// With --once: print the `/v1/producers` document as JSON (for scripts and jq).
    #[arg(long, requires = "once")]
    pub json: bool,
    /// Order of the rows.
    #[arg(long, value_enum, default_value = "rate")]
    pub sort: SortBy,
    /// Most producers shown (default: what fits the terminal, from $LINES, else 30).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `sluice drain` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// Admin API address and token.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Give up after this long (exit status 1); keep it under the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = duration)]
    pub timeout: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::config::units::parse_duration(s)
}

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No connection or a broken reply.
    #[error("admin API at {addr}: {message}")]
    Io {
        /// Address tried.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// A status other than 200.
    #[error("admin API at {addr}: {path} answered {status}: {body}")]
    Status {
        /// Address.
        addr: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Body, trimmed.
        body: String,
    },
    /// The token could not be read.
    #[error("admin token: {0}")]
    Token(String),
}

/// A tiny HTTP/1.0 client for the admin API (one request per connection, as curl would).
#[derive(Debug, Clone)]
pub struct AdminClient {
    addr: String,
    token: Option<String>,
}

impl AdminClient {
    /// A client for `args`, with its token read now.
    pub fn new(args: &AdminArgs) -> Result<AdminClient, AdminError> {
        let token = match (&args.token_file, &args.token_env) {
            (Some(p), _) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| AdminError::Token(format!("cannot read {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, Some(v)) => Some(
                std::env::var(v)
                    .map_err(|_| AdminError::Token(format!("environment variable {v} is not set")))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(AdminClient {
            addr: args.admin.clone(),
            token,
        })
    }

    /// GET `path`; the body of a 200 reply.
    pub async fn get(&self, path: &str) -> Result<String, AdminError> {
        let io = |message: String| AdminError::Io {
            addr: self.addr.clone(),
            message,
        };
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.addr).await?;
            let auth = self
                .token
                .as_ref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n{auth}\r\n", self.addr);
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let buf = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| io("no reply within 5 s".into()))?
            .map_err(|e| io(e.to_string()))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| io("reply without an HTTP header".into()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io("reply without an HTTP status".into()))?;
        if status != 200 {
            return Err(AdminError::Status {
                addr: self.addr.clone(),
                path: path.into(),
                status,
                body: body.trim().chars().take(200).collect(),
            });
        }
        Ok(body.to_string())
    }
}

/// `/v1/producers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Producers {
    /// Busiest first.
    pub producers: Vec<Producer>,
}

/// One producer of `/v1/producers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Producer {
    /// Listener name.
    pub listener: String,
    /// Producer name (`other` past `[admin] max_producers`).
    pub producer: String,
    /// Publishes per second over the last second.
    pub rate: f64,
    /// Publishes since start.
    pub total: u64,
    /// Publishes per verdict since start.
    pub verdicts: BTreeMap<String, u64>,
    /// Open connections.
    pub connections: i64,
    /// Connections whose reads are held by a delay.
    pub held_connections: i64,
}

impl Producer {
    fn count(&self, verdict: &str) -> u64 {
        self.verdicts.get(verdict).copied().unwrap_or(0)
    }
}

/// Rates between two snapshots (all verdicts, then per verdict).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rates {
    all: Option<f64>,
    shed: Option<f64>,
    divert: Option<f64>,
    delay: Option<f64>,
}

/// One refresh of the view, as lines without escapes. `prev` is the snapshot `elapsed` seconds
/// earlier (per-verdict rates need two).
fn render(
    now: &Producers,
    prev: Option<(&Producers, f64)>,
    sort: SortBy,
    limit: usize,
    header: &str,
) -> Vec<String> {
    let before: HashMap<(&str, &str), &Producer> = prev
        .map(|(p, _)| {
            p.producers
                .iter()
                .map(|x| ((x.listener.as_str(), x.producer.as_str()), x))
                .collect()
        })
        .unwrap_or_default();
    let old = |p: &Producer| {
        before
            .get(&(p.listener.as_str(), p.producer.as_str()))
            .copied()
    };
    let per_sec = |now: u64, then: u64| -> Option<f64> {
        let (_, secs) = prev?;
        Some(now.saturating_sub(then) as f64 / secs.max(0.001))
    };
    let rate_of = |p: &Producer, verdict: &str| -> Option<f64> {
        per_sec(p.count(verdict), old(p).map_or(0, |o| o.count(verdict)))
    };
    let mut rows: Vec<(&Producer, Rates)> = now
        .producers
        .iter()
        .map(|p| {
            (
                p,
                Rates {
                    // Between refreshes when there are two; the server's last-second rate
                    // otherwise.
                    all: per_sec(p.total, old(p).map_or(0, |o| o.total)).or(Some(p.rate)),
                    shed: rate_of(p, "shed"),
                    divert: rate_of(p, "divert"),
                    delay: rate_of(p, "delay"),
                },
            )
        })
        .collect();
    match sort {
        SortBy::Rate => rows.sort_by(|a, b| {
            b.1.all
                .unwrap_or(0.0)
                .total_cmp(&a.1.all.unwrap_or(0.0))
                .then(b.0.total.cmp(&a.0.total))
        }),
        SortBy::Shed => rows.sort_by(|a, b| {
            b.1.shed
                .unwrap_or(0.0)
                .total_cmp(&a.1.shed.unwrap_or(0.0))
                .then(b.0.count("shed").cmp(&a.0.count("shed")))
        }),
        SortBy::Total => rows.sort_by_key(|r| std::cmp::Reverse(r.0.total)),
        SortBy::Name => {
            rows.sort_by(|a, b| (&a.0.producer, &a.0.listener).cmp(&(&b.0.producer, &b.0.listener)))
        }
    }
    let listeners: std::collections::BTreeSet<&str> =
        now.producers.iter().map(|p| p.listener.as_str()).collect();
    let show_listener = listeners.len() > 1;
    let total_rate: f64 = rows.iter().map(|r| r.1.all.unwrap_or(0.0)).sum();
    let shed_rate: Option<f64> = rows.iter().map(|r| r.1.shed).sum();
    let mut out = vec![
        format!(
            "{header}  {} producers  {} msg/s  shed {}/s",
            now.producers.len(),
            num(total_rate),
            shed_rate.map_or("-".into(), num)
        ),
        String::new(),
        format!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10} {:>10} {:>10} {:>5} {:>5}",
            "PRODUCER",
            "MSG/S",
            "SHED/S",
            "DIVERT/S",
            "DELAY/S",
            "FORWARD",
            "SHED",
            "DIVERT",
            "DELAY",
            "CONN",
            "HELD"
        ),
    ];
    for (p, r) in rows.iter().take(limit) {
        let mut name = if show_listener {
            format!("{}/{}", p.listener, p.producer)
        } else {
            p.producer.clone()
        };
        if name.chars().count() > 28 {
            name = name.chars().take(27).collect::<String>() + "…";
        }
        let opt = |v: Option<f64>| v.map_or("-".to_string(), num);
        out.push(format!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10} {:>10} {:>10} {:>5} {:>5}",
            name,
            opt(r.all),
            opt(r.shed),
            opt(r.divert),
            opt(r.delay),
            p.count("forward"),
            p.count("shed"),
            p.count("divert"),
            p.count("delay"),
            p.connections,
            p.held_connections
        ));
    }
    if rows.len() > limit {
        out.push(format!("… {} more producers", rows.len() - limit));
    }
    if rows.is_empty() {
        out.push("(no producers yet)".into());
    }
    out
}

/// A rate for people: `0`, `3.5`, `1,204`.
fn num(v: f64) -> String {
    if v < 10.0 && v.fract() != 0.0 {
        return format!("{v:.1}");
    }
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn snapshot(client: &AdminClient) -> Result<(Producers, String), AdminError> {
    let body = client.get("/v1/producers").await?;
    let parsed: Producers = serde_json::from_str(&body).map_err(|e| AdminError::Io {
        addr: client.addr.clone(),
        message: format!("/v1/producers is not what sluice top expects: {e}"),
    })?;
    Ok((parsed, body))
}

fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// Restores the terminal when the live view ends, however it ends.
struct Screen;

impl Screen {
    fn enter() -> Screen {
        // Alternate screen, no cursor, no line wrap (long rows are clipped, not wrapped).
        print!("\x1b[?1049h\x1b[?25l\x1b[?7l");
        let _ = std::io::stdout().flush();
        Screen
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?7h\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
    }
}

/// `sluice top`.
pub async fn top(args: &TopArgs) -> Result<(), AdminError> {
    let client = AdminClient::new(&args.admin)?;
    let limit = args.limit.unwrap_or_else(|| {
        std::env::var("LINES")
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .map_or(30, |l| l.saturating_sub(5).max(1))
    });
    if args.once {
        let (now, raw) = snapshot(&client).await?;
        if args.json {
            println!("{}", raw.trim());
        } else {
            let header = format!("sluice top  {}  {}", args.admin.admin, clock());
            for line in render(&now, None, args.sort, limit, &header) {
                println!("{line}");
            }
        }
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let _screen = tty.then(Screen::enter);
    let mut prev: Option<(Producers, Instant)> = None;
    loop {
        let header = format!(
            "sluice top  {}  {}  every {:?}  (Ctrl-C quits)",
            args.admin.admin,
            clock(),
            args.interval
        );
        let lines = match snapshot(&client).await {
            Ok((now, _)) => {
                let p = prev.as_ref().map(|(p, at)| (p, at.elapsed().as_secs_f64()));
                let lines = render(&now, p, args.sort, limit, &header);
                prev = Some((now, Instant::now()));
                lines
            }
            Err(e) => vec![header, String::new(), format!("error: {e}")],
        };
        let mut text = String::new();
        if tty {
            text.push_str("\x1b[H");
            for l in &lines {
                text.push_str(l);
                text.push_str("\x1b[K\r\n");
            }
            text.push_str("\x1b[J");
        } else {
            for l in &lines {
                text.push_str(l);
                text.push('\n');
            }
            text.push('\n');
        }
        {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// `sluice drain`: wait until the instance has no client connections (`sluice_connections`
/// summed over listeners is 0). `Ok(false)` on timeout.
pub async fn drain(args: &DrainArgs) -> Result<bool, AdminError> {
    let client = AdminClient::new(&args.admin)?;
    let deadline = Instant::now() + args.timeout;
    loop {
        let open = match client.get("/metrics").await {
            Ok(text) => Some(open_connections(&text)),
            // Already gone: nothing to drain.
            Err(AdminError::Io { .. }) => Some(0.0),
            Err(e) => return Err(e),
        };
        if open == Some(0.0) {
            eprintln!("sluice drain: no client connections left");
            return Ok(true);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "sluice drain: {} client connection(s) still open after {:?}",
                open.unwrap_or(0.0),
                args.timeout
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn open_connections(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("sluice_connections{") || l.starts_with("sluice_connections "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, rate: f64, shed: u64, fwd: u64) -> Producer {
        Producer {
            listener: "amqp".into(),
            producer: name.into(),
            rate,
            total: shed + fwd,
            verdicts: [("shed".to_string(), shed), ("forward".to_string(), fwd)]
                .into_iter()
                .collect(),
            connections: 1,
            held_connections: 0,
        }
    }

    #[test]
    fn busiest_producer_is_on_top_with_its_shed_rate() {
        let before = Producers {
            producers: vec![p("calm", 2.0, 0, 10), p("hotfix-svc", 0.0, 0, 0)],
        };
        let now = Producers {
            producers: vec![p("calm", 2.0, 0, 12), p("hotfix-svc", 5000.0, 10_000, 500)],
        };
        let lines = render(&now, Some((&before, 2.0)), SortBy::Rate, 10, "h");
        assert!(lines[0].contains("2 producers"), "{lines:?}");
        assert!(lines[0].contains("shed 5,000/s"), "{lines:?}");
        assert!(lines[2].starts_with("PRODUCER"));
        assert!(lines[3].starts_with("hotfix-svc"), "{lines:?}");
        assert!(lines[3].contains(" 5,000 "), "{lines:?}");
        // msg/s between the two snapshots: 10,500 publishes in 2 s.
        assert!(lines[3].contains(" 5,250 "), "{lines:?}");
        assert!(lines[0].contains("5,251 msg/s"), "{lines:?}");
        assert!(lines[4].starts_with("calm"));
        let first = render(&now, None, SortBy::Name, 1, "h");
        assert!(first[3].starts_with("calm") && first[3].contains(" - "));
        assert_eq!(first[4], "… 1 more producers");
    }

    #[test]
    fn connections_are_summed_over_listeners() {
        let m = "# HELP sluice_connections x\nsluice_connections{listener=\"a\"} 2\n\
                 sluice_connections{listener=\"b\"} 1\nsluice_connections_accepted_total{listener=\"a\"} 9\n";
        assert_eq!(open_connections(m), 3.0);
    }

    #[test]
    fn rates_read_well() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(12_408.4), "12,408");
    }
}
