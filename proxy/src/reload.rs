//! Hot reload: every trigger (file watch, `SIGHUP`, `POST /v1/reload`) becomes a request to one
//! task, which validates the new config completely (TOML, divert targets, plugins compiled and
//! initialised, listener sockets bound) before anything changes, then swaps it in atomically.
//! A refused reload changes nothing: the old config keeps running and the reasons are logged,
//! counted and shown by `/v1/config`.

use crate::config::{self, Config, Report};
use crate::runtime::Runtime;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The config file or a plugin file changed.
    FileWatch,
    /// `SIGHUP`.
    Signal,
    /// `POST /v1/reload`.
    Api,
}

impl Trigger {
    /// Log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::FileWatch => "file-watch",
            Trigger::Signal => "sighup",
            Trigger::Api => "api",
        }
    }
}

/// The result of one reload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new config is in force.
    Applied {
        /// Its version.
        version: u64,
    },
    /// Nothing changed (same file, same plugins).
    Unchanged {
        /// The running version.
        version: u64,
    },
    /// Refused; the old config keeps running.
    Rejected {
        /// Every problem, one per line, `file:line: reason`.
        reasons: String,
    },
}

/// A request to the reload task.
pub struct Request {
    /// Who asked.
    pub trigger: Trigger,
    /// Where to send the outcome (optional).
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// A handle to send reload requests.
#[derive(Clone)]
pub struct Handle(mpsc::Sender<Request>);

impl Handle {
    /// Ask for a reload and wait for its outcome.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let req = Request {
            trigger,
            reply: Some(tx),
        };
        if self.0.send(req).await.is_err() {
            return Outcome::Rejected {
                reasons: "sluice is shutting down".into(),
            };
        }
        rx.await.unwrap_or(Outcome::Rejected {
            reasons: "the reload task stopped".into(),
        })
    }

    /// Ask for a reload without waiting.
    pub fn request(&self, trigger: Trigger) {
        let _ = self.0.try_send(Request {
            trigger,
            reply: None,
        });
    }
}

/// A listener's accept loop, stoppable on its own (its address moved or it was removed).
struct Bound {
    listen: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

/// The listeners sluice accepts on, by name; owned by the reload task once started.
pub struct Listeners {
    bound: HashMap<Arc<str>, Bound>,
}

impl Listeners {
    /// Bind every listener of `cfg` (startup): fails naming the address that could not be bound.
    pub async fn bind_all(rt: &Arc<Runtime>, cfg: &Config) -> Result<Listeners, String> {
        let mut socks = Vec::new();
        for l in &cfg.listeners {
            let sock = bind(l.listen, &l.name).await?;
            socks.push((l.name.clone(), l.listen, sock));
        }
        let mut me = Listeners {
            bound: HashMap::new(),
        };
        for (name, listen, sock) in socks {
            me.start(rt, name, listen, sock);
        }
        Ok(me)
    }

    /// The local address of each listener (useful with port 0).
    pub fn addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.bound
            .iter()
            .map(|(n, b)| (n.clone(), b.local))
            .collect()
    }

    fn start(&mut self, rt: &Arc<Runtime>, name: Arc<str>, listen: SocketAddr, sock: TcpListener) {
        let local = sock.local_addr().unwrap_or(listen);
        let stop = rt.shutdown.child_token();
        info!(listener = %name, listen = %local, "listening");
        tokio::spawn(crate::listener::accept_loop(
            rt.clone(),
            name.clone(),
            sock,
            stop.clone(),
        ));
        if let Some(old) = self.bound.insert(
            name,
            Bound {
                listen,
                local,
                stop,
            },
        ) {
            old.stop.cancel();
        }
    }

    /// Sockets a new config needs that are not bound yet: bind them now (before the swap), so a
    /// taken address refuses the reload instead of leaving a listener down.
    async fn bind_new(
        &self,
        cfg: &Config,
    ) -> Result<Vec<(Arc<str>, SocketAddr, TcpListener)>, Vec<String>> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for l in &cfg.listeners {
            let same = self
                .bound
                .get(&l.name)
                .is_some_and(|b| b.listen == l.listen);
            if same {
                continue;
            }
            match bind(l.listen, &l.name).await {
                Ok(sock) => out.push((l.name.clone(), l.listen, sock)),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// After the swap: start the new sockets, stop accepting on the ones no longer configured.
    /// Connections accepted earlier are not touched: they drain on their own.
    fn apply(
        &mut self,
        rt: &Arc<Runtime>,
        cfg: &Config,
        new: Vec<(Arc<str>, SocketAddr, TcpListener)>,
    ) {
        for (name, listen, sock) in new {
            self.start(rt, name, listen, sock);
        }
        let gone: Vec<Arc<str>> = self
            .bound
            .keys()
            .filter(|n| !cfg.listeners.iter().any(|l| &l.name == *n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(b) = self.bound.remove(&n) {
                info!(listener = %n, "listener removed: stopped accepting, its connections drain");
                b.stop.cancel();
            }
        }
    }
}

async fn bind(addr: SocketAddr, name: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listener '{name}': cannot bind {addr}: {e}"))
}

/// Start the reload task for the config at `path`; returns the handle triggers use.
pub fn spawn(rt: Arc<Runtime>, path: PathBuf, listeners: Listeners) -> Handle {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(rt, path, listeners, rx));
    Handle(tx)
}

async fn run(
    rt: Arc<Runtime>,
    path: PathBuf,
    mut listeners: Listeners,
    mut rx: mpsc::Receiver<Request>,
) {
    loop {
        let req = tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let outcome = reload_once(&rt, &path, &mut listeners, req.trigger).await;
        if let Some(reply) = req.reply {
            let _ = reply.send(outcome);
        }
    }
}

async fn reload_once(
    rt: &Arc<Runtime>,
    path: &Path,
    listeners: &mut Listeners,
    trigger: Trigger,
) -> Outcome {
    let current = rt.active();
    let rejected = |reasons: String| {
        rt.metrics.reloads_error.fetch_add(1, Relaxed);
        error!(
            trigger = trigger.as_str(),
            "config reload refused, the running config stays:\n{reasons}"
        );
        *rt.last_error.lock() = Some(reasons.clone());
        Outcome::Rejected { reasons }
    };
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(report) => return rejected(report.to_string()),
    };
    if cfg.hash == current.config.hash && !plugins_changed(&current) {
        return Outcome::Unchanged {
            version: current.version,
        };
    }
    let targets = config::targets::check_divert_targets(&cfg).await;
    for w in &targets.skipped {
        warn!("{w}");
    }
    if !targets.problems.is_empty() {
        let report = Report {
            path: path.to_path_buf(),
            problems: targets.problems,
        };
        return rejected(report.to_string());
    }
    let new_socks = match listeners.bind_new(&cfg).await {
        Ok(s) => s,
        Err(errors) => return rejected(format!("{}: {}", path.display(), errors.join("; "))),
    };
    // Plugins compile on a blocking thread; the running config serves meanwhile.
    let rt2 = rt.clone();
    let prepared = match tokio::task::spawn_blocking(move || rt2.prepare(cfg)).await {
        Ok(Ok(a)) => a,
        Ok(Err(report)) => return rejected(report.to_string()),
        Err(e) => return rejected(format!("{}: loading failed: {e}", path.display())),
    };
    for l in &prepared.config.listeners {
        let moved = current
            .config
            .listeners
            .iter()
            .find(|o| o.name == l.name)
            .is_none_or(|o| o.upstream.addr != l.upstream.addr);
        if moved {
            // A different broker may announce itself differently.
            rt.start_cache.remove(&l.name);
        }
    }
    let next = rt.install(prepared);
    listeners.apply(rt, &next.config, new_socks);
    rt.metrics.reloads_ok.fetch_add(1, Relaxed);
    *rt.last_error.lock() = None;
    info!(
        trigger = trigger.as_str(),
        version = next.version,
        hash = %next.config.hash,
        quotas = next.config.quotas.len(),
        policies = next.config.policies.len(),
        "config reloaded"
    );
    Outcome::Applied {
        version: next.version,
    }
}

/// Whether any loaded plugin's file differs from what was loaded.
fn plugins_changed(active: &crate::runtime::Active) -> bool {
    active.chain.policies().iter().any(|s| {
        std::fs::read(s.policy.path())
            .map(|b| crate::plugin::sha256_hex(&b) != s.policy.hash())
            .unwrap_or(true)
    })
}

/// A watched file's modification time and length (`None`: it cannot be read).
pub type FileStamp = (SystemTime, u64);

/// The stamp of one file now.
pub fn stamp_file(f: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(f).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The stamps of the config file (first) and of every plugin file it names.
pub fn stamps(rt: &Runtime, path: &Path) -> Vec<(PathBuf, Option<FileStamp>)> {
    let mut files = vec![path.to_path_buf()];
    files.extend(rt.active().config.policies.iter().map(|p| p.plugin.clone()));
    files
        .into_iter()
        .map(|f| {
            let s = stamp_file(&f);
            (f, s)
        })
        .collect()
}

/// Watch the config file and every plugin file it names; request a reload when one changes
/// (debounced: a change is acted on once the files have been still for `settle`). `seen` are the
/// stamps of the files the running config was loaded from, taken before they were read.
pub async fn watch(
    rt: Arc<Runtime>,
    path: PathBuf,
    handle: Handle,
    every: Duration,
    settle: Duration,
    mut seen: Vec<(PathBuf, Option<FileStamp>)>,
) {
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = stamps(&rt, &path);
        if now == seen {
            continue;
        }
        // Wait until writes stop (editors write in several steps).
        let mut last = now;
        loop {
            tokio::time::sleep(settle).await;
            let again = stamps(&rt, &path);
            if again == last {
                break;
            }
            last = again;
        }
        info!(file = %path.display(), "config or plugin file changed: reloading");
        let _ = handle.reload(Trigger::FileWatch).await;
        seen = stamps(&rt, &path);
    }
}
