//! Accept loops, one per `[[listener]]`, plus the upstream readiness probe.

use crate::protocol::amqp::client::ProbeClient;
use crate::protocol::Protocol;
use crate::runtime::Runtime;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Accept clients until shutdown or `stop` (the listener moved or was removed); each connection
/// runs in its own task with the listener's settings as they are when it is accepted.
pub async fn accept_loop(
    rt: Arc<Runtime>,
    name: Arc<str>,
    sock: TcpListener,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = sock.accept() => match r {
                Ok((stream, peer)) => {
                    let active = rt.active();
                    let Some(listener) = active.config.listeners.iter().find(|l| l.name == name) else {
                        break;
                    };
                    let listener = Arc::new(listener.clone());
                    match listener.protocol {
                        Protocol::Amqp091 => tokio::spawn(crate::session::connection::serve(rt.clone(), listener, stream, peer)),
                        Protocol::Redis => tokio::spawn(crate::session::redis::serve(rt.clone(), listener, stream, peer)),
                    };
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    error!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    info!(listener = %name, "stopped accepting");
}

/// Probe each listener's upstream every `every`: log in with sluice's own credentials. The
/// result feeds `/readyz`.
pub async fn probe_loop(rt: Arc<Runtime>, every: Duration) {
    loop {
        for l in rt.active().config.listeners.clone() {
            let result = match l.protocol {
                Protocol::Amqp091 => match ProbeClient::connect(&l.probe).await {
                    Ok(c) => {
                        c.close().await;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                },
                Protocol::Redis => crate::protocol::redis::client::probe(&l.probe).await,
            };
            let ok = match result {
                Ok(()) => true,
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
