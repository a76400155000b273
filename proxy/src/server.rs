//! Starting and stopping a whole sluice: listeners, admin API, background tasks.

use crate::config::{self, Config};
use crate::reload::{self, Listeners};
use crate::runtime::Runtime;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::info;

/// A running sluice.
pub struct Server {
    rt: Arc<Runtime>,
    listeners: Vec<(Arc<str>, SocketAddr)>,
    admin: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Bind everything and start serving a config that did not come from a file (tests,
    /// embedding): reload requests are refused. Fails if an address cannot be bound or a plugin
    /// does not load.
    pub async fn start(config: Config) -> Result<Server, String> {
        Self::start_inner(config, None).await
    }

    /// Load the config file (divert targets checked, plugins compiled), start serving, and
    /// reload on `SIGHUP`-style requests ([`Server::reload`]), `POST /v1/reload` and changes of
    /// the file or its plugins.
    pub async fn start_file(path: &Path) -> Result<Server, String> {
        // Stamped before it is read: a change made while sluice starts is then seen by the
        // watcher, however late its task first runs.
        let loaded = reload::stamp_file(path);
        let cfg = config::load(path).map_err(|r| format!("invalid config:\n{r}"))?;
        let targets = config::targets::check_divert_targets(&cfg).await;
        for w in &targets.skipped {
            tracing::warn!("{w}");
        }
        if !targets.problems.is_empty() {
            let report = config::Report {
                path: path.to_path_buf(),
                problems: targets.problems,
            };
            return Err(format!("invalid config:\n{report}"));
        }
        Self::start_inner(cfg, Some((path.to_path_buf(), loaded))).await
    }

    async fn start_inner(
        config: Config,
        path: Option<(PathBuf, Option<reload::FileStamp>)>,
    ) -> Result<Server, String> {
        let admin_addr = config.admin.listen;
        // Compiling plugins blocks: keep it off the async workers.
        let rt = tokio::task::spawn_blocking(move || Runtime::new(config))
            .await
            .map_err(|e| format!("loading the config: {e}"))?
            .map_err(|report| format!("invalid config:\n{report}"))?;
        let bound = Listeners::bind_all(&rt, &rt.active().config).await?;
        let admin_sock = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|e| format!("admin: cannot bind {admin_addr}: {e}"))?;
        let admin = admin_sock.local_addr().map_err(|e| e.to_string())?;
        let listeners = bound.addrs();
        let mut tasks = Vec::new();
        if let Some((path, loaded)) = path {
            let mut seen = reload::stamps(&rt, &path);
            if let Some(first) = seen.first_mut() {
                first.1 = loaded;
            }
            let handle = reload::spawn(rt.clone(), path.clone(), bound);
            let _ = rt.reload.set(handle.clone());
            tasks.push(tokio::spawn(reload::watch(
                rt.clone(),
                path,
                handle,
                Duration::from_millis(500),
                Duration::from_millis(200),
                seen,
            )));
        } else {
            // No file to reload from: the accept loops run until shutdown.
            drop(bound);
        }
        tasks.push(tokio::spawn(crate::admin::http::serve(
            rt.clone(),
            admin_sock,
        )));
        tasks.push(tokio::spawn(crate::listener::probe_loop(
            rt.clone(),
            Duration::from_secs(2),
        )));
        tasks.push(tokio::spawn(housekeeping(rt.clone())));
        tasks.push(tokio::spawn(crate::admin::events::flush_loop(rt.clone())));
        Ok(Server {
            rt,
            listeners,
            admin,
            tasks,
        })
    }

    /// Reload the config file now (what `SIGHUP` does).
    pub async fn reload(&self) -> reload::Outcome {
        match self.rt.reload.get() {
            Some(h) => h.reload(reload::Trigger::Signal).await,
            None => reload::Outcome::Rejected {
                reasons: "sluice was not started from a config file".into(),
            },
        }
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, a)| *a)
    }

    /// The admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The shared runtime (config, metrics).
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// Stop accepting, let connections finish their close handshakes (up to `grace`), stop.
    pub async fn shutdown(self, grace: Duration) {
        info!("shutting down");
        self.rt.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        while self.rt.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in self.tasks {
            t.abort();
        }
        // Sheds during the drain are logged too.
        self.rt.metrics.verdicts.flush();
        info!(remaining = self.rt.connections.load(Relaxed), "stopped");
    }
}

/// Once a second: producer rates. Every 30 s: forget idle quota keys.
async fn housekeeping(rt: Arc<Runtime>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        rt.metrics.sample(1.0);
        n += 1;
        if n.is_multiple_of(30) {
            let a = rt.active();
            for q in a.chain.quotas() {
                q.limiter.retain_recent();
                if let Some(d) = &q.divert_limiter {
                    d.retain_recent();
                }
            }
            if let Some(t) = &a.tarpit {
                t.retain_recent();
            }
        }
    }
}
