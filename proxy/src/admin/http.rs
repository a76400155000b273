//! The admin HTTP API (hyper): `/metrics`, `/healthz`, `/readyz`, `/v1/producers`, `/v1/config`,
//! `POST /v1/reload`.

use crate::runtime::Runtime;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{debug, info};

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Reply {
    reply(status, "application/json", v.to_string())
}

/// Serve the admin API until shutdown.
pub async fn serve(rt: Arc<Runtime>, sock: TcpListener) {
    info!(listen = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin API listening");
    loop {
        let (stream, _) = tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            r = sock.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&rt, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

/// Who may call what: `/healthz` and `/readyz` are open (probes); `/metrics` is open unless
/// `metrics_open = false`; everything else needs the bearer token when one is configured, and
/// `POST /v1/reload` always needs it.
fn allowed(rt: &Runtime, req: &Request<Incoming>) -> Result<(), Box<Reply>> {
    let active = rt.active();
    let admin = &active.config.admin;
    let path = req.uri().path();
    let open = match path {
        "/healthz" | "/readyz" => true,
        "/metrics" => admin.metrics_open,
        _ => req.method() != Method::POST && admin.token.is_none(),
    };
    if open {
        return Ok(());
    }
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if admin.authorized(header) {
        return Ok(());
    }
    rt.metrics.admin_auth_failures.fetch_add(1, Relaxed);
    let message = if admin.token.is_none() {
        "this endpoint needs a token: set admin.token_file or admin.token_env"
    } else {
        "missing or wrong bearer token"
    };
    let mut r = json_reply(StatusCode::UNAUTHORIZED, json!({"error": message}));
    if let Ok(v) = "Bearer".parse() {
        r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
    }
    Err(Box::new(r))
}

async fn route(rt: &Runtime, req: Request<Incoming>) -> Reply {
    if let Err(refused) = allowed(rt, &req) {
        return *refused;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(rt),
        ),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => readyz(rt),
        (&Method::GET, "/v1/producers") => producers(rt),
        (&Method::GET, "/v1/config") => config(rt),
        (&Method::POST, "/v1/reload") => reload(rt).await,
        (
            _,
            "/metrics" | "/healthz" | "/readyz" | "/v1/producers" | "/v1/config" | "/v1/reload",
        ) => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// Proxy metrics, then the plugin families of the policies in force.
fn metrics(rt: &Runtime) -> String {
    use std::fmt::Write;
    let mut text = rt.metrics.render();
    let _ = writeln!(
        text,
        "# HELP sluice_config_last_reload_successful 0 while the last reload was refused (the config before it stays in force).\n\
         # TYPE sluice_config_last_reload_successful gauge\n\
         sluice_config_last_reload_successful {}",
        u8::from(rt.last_error.lock().is_none())
    );
    let _ = writeln!(
        text,
        "# HELP sluice_buffered_bytes Bytes of unfinished publishes and of answers not yet sent to clients, over all connections (bounded by [limits] max_buffered_total).\n\
         # TYPE sluice_buffered_bytes gauge\n\
         sluice_buffered_bytes {}",
        rt.buffered.used()
    );
    let active = rt.active();
    let stages = active.chain.policies();
    if !stages.is_empty() {
        crate::plugin::render_prometheus(stages.iter().map(|s| s.current().stats()), &mut text);
        let _ = writeln!(
            text,
            "# HELP sluice_policy_rollbacks_total Policies rolled back to their last good version after failing.\n\
             # TYPE sluice_policy_rollbacks_total counter"
        );
        for s in stages {
            let _ = writeln!(
                text,
                "sluice_policy_rollbacks_total{{policy=\"{}\"}} {}",
                s.name.replace('\\', "\\\\").replace('"', "\\\""),
                s.rollbacks()
            );
        }
    }
    if let Some(c) = &active.coordinator {
        c.render_prometheus(&mut text);
    }
    text
}

/// `POST /v1/reload`: reload the config file now; the reply says applied or why not.
async fn reload(rt: &Runtime) -> Reply {
    use crate::reload::{Outcome, Trigger};
    let Some(handle) = rt.reload.get() else {
        return json_reply(
            StatusCode::CONFLICT,
            json!({"result": "error", "error": "sluice was not started from a config file"}),
        );
    };
    match handle.reload(Trigger::Api).await {
        Outcome::Applied { version } => json_reply(
            StatusCode::OK,
            json!({"result": "applied", "version": version}),
        ),
        Outcome::Unchanged { version } => json_reply(
            StatusCode::OK,
            json!({"result": "unchanged", "version": version}),
        ),
        Outcome::Rejected { reasons } => json_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"result": "error", "errors": reasons.lines().collect::<Vec<_>>(), "version": rt.active().version}),
        ),
    }
}

fn readyz(rt: &Runtime) -> Reply {
    let active = rt.active();
    let mut all = !rt.shutdown.is_cancelled();
    let mut detail = serde_json::Map::new();
    for l in &active.config.listeners {
        let ok = rt.upstream_ready.get(&l.name).map(|v| *v).unwrap_or(false);
        all &= ok;
        detail.insert(
            l.name.to_string(),
            json!({"upstream": l.upstream.addr, "reachable": ok}),
        );
    }
    // Redis down is not-ready only for fail-closed global quotas (fail-open ones keep serving).
    let coordinator = active.coordinator.as_ref().map(|c| {
        all &= c.ready();
        c.status()
    });
    let status = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_reply(
        status,
        json!({"ready": all, "shutting_down": rt.shutdown.is_cancelled(), "listeners": detail, "coordinator": coordinator}),
    )
}

fn producers(rt: &Runtime) -> Reply {
    let mut list = rt.metrics.producers();
    list.sort_by(|a, b| {
        b.rate()
            .total_cmp(&a.rate())
            .then(b.total().cmp(&a.total()))
    });
    let items: Vec<_> = list
        .iter()
        .map(|p| {
            let verdicts: serde_json::Map<String, serde_json::Value> =
                crate::policy::VerdictKind::ALL
                    .iter()
                    .map(|k| (k.as_str().to_string(), json!(p.count(*k))))
                    .collect();
            json!({
                "listener": &*p.listener,
                "protocol": rt.metrics.protocol_of(&p.listener),
                "producer": &*p.producer,
                "rate": (p.rate() * 10.0).round() / 10.0,
                "total": p.total(),
                "verdicts": verdicts,
                "connections": p.connections.load(Relaxed),
                "held_connections": p.held.load(Relaxed),
            })
        })
        .collect();
    json_reply(StatusCode::OK, json!({"producers": items}))
}

fn config(rt: &Runtime) -> Reply {
    let a = rt.active();
    let loaded = a
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json_reply(
        StatusCode::OK,
        json!({
            "version": a.version,
            "hash": a.config.hash,
            "path": a.config.path.display().to_string(),
            "loaded_at_unix": loaded,
            "last_error": rt.last_error.lock().clone(),
            "dry_run": a.config.dry_run,
            "listeners": a.config.listeners.iter().map(|l| json!({
                "name": &*l.name, "protocol": l.protocol.as_str(), "listen": l.listen.to_string(), "upstream": l.upstream.addr,
            })).collect::<Vec<_>>(),
            "quotas": a.config.quotas.iter().map(|q| json!({
                "name": &*q.name,
                "messages": q.messages.map(|(r, b)| json!({"rate": r.to_string(), "burst": b})),
                "bytes": q.bytes.map(|(r, b)| json!({"rate": r.to_string(), "burst": b})),
                "dry_run": q.dry_run,
                "scope": q.scope.describe(),
            })).collect::<Vec<_>>(),
            "policies": a.chain.policies().iter().map(|p| json!({
                "name": &*p.name,
                "plugin": p.policy.path().display().to_string(),
                "hash": p.policy.hash(),
                "running_hash": p.current().hash(),
                "rolled_back": p.is_rolled_back(),
                "errors": crate::plugin::ErrorKind::ALL.iter().map(|k| p.policy.stats().errors(*k)).sum::<u64>(),
                "disabled": p.current().stats().is_disabled(),
                "dry_run": p.dry_run,
            })).collect::<Vec<_>>(),
            "source": &*a.config.source,
        }),
    )
}
