//! Accept loops, one per `[[listener]]`, plus the upstream readiness probe.

use crate::config::validate::ListenerConfig;
use crate::protocol::amqp::client::ProbeClient;
use crate::runtime::Runtime;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// Bind every listener of the active config. Errors name the address that could not be bound.
pub async fn bind_all(
    rt: &Arc<Runtime>,
) -> Result<Vec<(Arc<ListenerConfig>, TcpListener)>, String> {
    let mut out = Vec::new();
    for l in &rt.active().config.listeners {
        let sock = TcpListener::bind(l.listen)
            .await
            .map_err(|e| format!("listener '{}': cannot bind {}: {e}", l.name, l.listen))?;
        info!(listener = %l.name, listen = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), upstream = %l.upstream.addr, "listening");
        out.push((Arc::new(l.clone()), sock));
    }
    Ok(out)
}

/// Accept clients until shutdown; each connection runs in its own task.
pub async fn accept_loop(rt: Arc<Runtime>, listener: Arc<ListenerConfig>, sock: TcpListener) {
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            r = sock.accept() => match r {
                Ok((stream, peer)) => {
                    tokio::spawn(crate::session::connection::serve(rt.clone(), listener.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    error!(listener = %listener.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    info!(listener = %listener.name, "stopped accepting");
}

/// Probe each listener's upstream every `every`: log in with sluice's own credentials. The
/// result feeds `/readyz`.
pub async fn probe_loop(rt: Arc<Runtime>, every: Duration) {
    loop {
        for l in rt.active().config.listeners.clone() {
            let ok = match ProbeClient::connect(&l.probe).await {
                Ok(c) => {
                    c.close().await;
                    true
                }
                Err(e) => {
                    warn!(listener = %l.name, upstream = %l.upstream.addr, error = %e, "upstream probe failed");
                    false
                }
            };
            let was = rt.upstream_ready.insert(l.name.clone(), ok);
            if was == Some(false) && ok {
                info!(listener = %l.name, "upstream reachable again");
            }
        }
        tokio::select! {
            _ = rt.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
