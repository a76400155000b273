//! sluice's own Redis connection for `/readyz`: connect (TLS when the listener's upstream uses
//! it), `AUTH` when the listener has probe credentials, then `PING`.

use super::resp::{encode_command, ReplyScanner};
use crate::protocol::amqp::client::ProbeTarget;
use crate::tls::Stream;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Check that the Redis behind `target` answers. An error names what failed.
pub async fn probe(target: &ProbeTarget) -> Result<(), String> {
    let t = target.timeout;
    tokio::time::timeout(t * 3, async {
        let tcp = TcpStream::connect(&target.addr)
            .await
            .map_err(|e| format!("connect to {}: {e}", target.addr))?;
        let mut s = match &target.tls {
            None => Stream::Plain(tcp),
            Some(tls) => tls
                .connect(tcp)
                .await
                .map_err(|e| format!("TLS to {}: {e}", target.addr))?,
        };
        let mut buf = BytesMut::with_capacity(512);
        if !target.password.is_empty() {
            let auth = if target.user.is_empty() || target.user == "default" {
                encode_command([&b"AUTH"[..], target.password.as_bytes()])
            } else {
                encode_command([
                    &b"AUTH"[..],
                    target.user.as_bytes(),
                    target.password.as_bytes(),
                ])
            };
            let reply = round_trip(&mut s, &mut buf, &auth).await?;
            if !reply.starts_with(b"+OK") {
                return Err(format!("AUTH refused: {}", text(&reply)));
            }
        }
        let reply = round_trip(&mut s, &mut buf, &encode_command([&b"PING"[..]])).await?;
        // A Redis that wants a login still answers; that is up, if not usable by sluice itself.
        if reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH") {
            let _ = s.shutdown().await;
            Ok(())
        } else {
            Err(format!("PING answered {}", text(&reply)))
        }
    })
    .await
    .map_err(|_| format!("no answer from {} within {:?}", target.addr, t * 3))?
}

async fn round_trip(s: &mut Stream, buf: &mut BytesMut, cmd: &[u8]) -> Result<Vec<u8>, String> {
    s.write_all(cmd).await.map_err(|e| e.to_string())?;
    buf.clear();
    loop {
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        let scan = ReplyScanner::default()
            .scan(buf)
            .map_err(|e| e.to_string())?;
        if let Some(&(end, _)) = scan.ends.first() {
            return Ok(buf.get(..end).unwrap_or_default().to_vec());
        }
        if buf.len() > 64 * 1024 {
            return Err("reply too long".into());
        }
    }
}

fn text(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).trim_end().to_string()
}
