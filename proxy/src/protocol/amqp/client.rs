//! A minimal AMQP client on sluice's own connection to the broker: readiness probes, passive
//! declares that check divert targets at config load, and queue depth polling.

use super::frame::{self, Frame, FrameKind, PROTOCOL_HEADER};
use super::method::{self, Close, MethodId};
use super::table::FieldValue;
use super::wire::{put_long_bytes, put_short_str, WireError};
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// TCP connect or I/O failed.
    #[error("cannot reach broker at {addr}: {source}")]
    Io {
        /// Broker address.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The broker did not answer in time.
    #[error("broker at {0} did not answer within the probe timeout")]
    Timeout(String),
    /// The broker refused the connection (bad credentials, vhost…).
    #[error("broker closed the connection: {code} {text}")]
    Refused {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The object does not exist (passive declare answered 404).
    #[error("{kind} '{name}' does not exist on the broker")]
    NotFound {
        /// `exchange` or `queue`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The broker closed the channel for another reason.
    #[error("broker closed the channel: {code} {text}")]
    ChannelClosed {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The broker sent something that is not AMQP 0-9-1.
    #[error("protocol error talking to broker: {0}")]
    Protocol(String),
}

impl From<WireError> for ProbeError {
    fn from(e: WireError) -> Self {
        ProbeError::Protocol(e.to_string())
    }
}

impl From<frame::FrameError> for ProbeError {
    fn from(e: frame::FrameError) -> Self {
        ProbeError::Protocol(e.to_string())
    }
}

/// Credentials and target of a probe connection.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// `host:port` of the broker.
    pub addr: String,
    /// SASL PLAIN user.
    pub user: String,
    /// SASL PLAIN password.
    pub password: String,
    /// Virtual host.
    pub vhost: String,
    /// Timeout for each step.
    pub timeout: Duration,
    /// TLS to the broker.
    pub tls: Option<crate::tls::ClientTls>,
}

/// An open probe connection.
pub struct ProbeClient {
    stream: crate::tls::Stream,
    buf: BytesMut,
    addr: String,
    timeout: Duration,
    next_channel: u16,
}

fn method_frame(channel: u16, id: MethodId, args: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut p = BytesMut::with_capacity(64);
    p.put_u16(id.0);
    p.put_u16(id.1);
    args(&mut p);
    Frame::encode(FrameKind::Method, channel, &p)
}

impl ProbeClient {
    /// Connect and log in with SASL PLAIN.
    pub async fn connect(target: &ProbeTarget) -> Result<Self, ProbeError> {
        let io = |source| ProbeError::Io {
            addr: target.addr.clone(),
            source,
        };
        let stream = tokio::time::timeout(target.timeout, TcpStream::connect(&target.addr))
            .await
            .map_err(|_| ProbeError::Timeout(target.addr.clone()))?
            .map_err(io)?;
        let _ = stream.set_nodelay(true);
        let stream = match &target.tls {
            None => crate::tls::Stream::Plain(stream),
            Some(tls) => tokio::time::timeout(target.timeout, tls.connect(stream))
                .await
                .map_err(|_| ProbeError::Timeout(target.addr.clone()))?
                .map_err(io)?,
        };
        let mut c = ProbeClient {
            stream,
            buf: BytesMut::with_capacity(8192),
            addr: target.addr.clone(),
            timeout: target.timeout,
            next_channel: 1,
        };
        c.write_raw(PROTOCOL_HEADER).await?;
        c.expect(0, MethodId::CONNECTION_START).await?;
        let mut props = BytesMut::new();
        super::table::encode_table(
            &mut props,
            &vec![
                (
                    "product".into(),
                    FieldValue::LongStr(b"sluice-probe".to_vec()),
                ),
                (
                    "connection_name".into(),
                    FieldValue::LongStr(b"sluice probe".to_vec()),
                ),
            ],
        )?;
        let mut response = Vec::with_capacity(2 + target.user.len() + target.password.len());
        response.push(0);
        response.extend_from_slice(target.user.as_bytes());
        response.push(0);
        response.extend_from_slice(target.password.as_bytes());
        let start_ok = method_frame(0, MethodId::CONNECTION_START_OK, |p| {
            p.put_slice(&props);
            let _ = put_short_str(p, "PLAIN");
            put_long_bytes(p, &response);
            let _ = put_short_str(p, "en_US");
        });
        c.write_frame(&start_ok).await?;
        let tune = c.expect(0, MethodId::CONNECTION_TUNE).await?;
        let tune = method::Tune::decode(&tune)?;
        let tune_ok = method_frame(0, MethodId::CONNECTION_TUNE_OK, |p| {
            p.put_u16(tune.channel_max.clamp(1, 16));
            p.put_u32(if tune.frame_max == 0 {
                131_072
            } else {
                tune.frame_max.min(131_072)
            });
            p.put_u16(0);
        });
        c.write_frame(&tune_ok).await?;
        let vhost = target.vhost.clone();
        let open = method_frame(0, MethodId::CONNECTION_OPEN, |p| {
            let _ = put_short_str(p, &vhost);
            p.put_u8(0);
            p.put_u8(0);
        });
        c.write_frame(&open).await?;
        c.expect(0, MethodId::CONNECTION_OPEN_OK).await?;
        Ok(c)
    }

    /// Check that an exchange exists (passive declare). The default exchange always exists.
    pub async fn check_exchange(&mut self, name: &str) -> Result<(), ProbeError> {
        if name.is_empty() {
            return Ok(());
        }
        let ch = self.open_channel().await?;
        let frame = method_frame(ch, MethodId::EXCHANGE_DECLARE, |p| {
            p.put_u16(0);
            let _ = put_short_str(p, name);
            let _ = put_short_str(p, "direct");
            p.put_u8(1); // passive
            p.put_u32(0); // empty arguments table
        });
        self.write_frame(&frame).await?;
        self.expect_or_not_found(ch, MethodId::EXCHANGE_DECLARE_OK, "exchange", name)
            .await?;
        self.close_channel(ch).await
    }

    /// Passive-declare a queue: returns (messages ready, consumers).
    pub async fn queue_depth(&mut self, name: &str) -> Result<(u32, u32), ProbeError> {
        let ch = self.open_channel().await?;
        let frame = method_frame(ch, MethodId::QUEUE_DECLARE, |p| {
            p.put_u16(0);
            let _ = put_short_str(p, name);
            p.put_u8(1); // passive
            p.put_u32(0);
        });
        self.write_frame(&frame).await?;
        let args = self
            .expect_or_not_found(ch, MethodId::QUEUE_DECLARE_OK, "queue", name)
            .await?;
        let (_, messages, consumers) = method::decode_queue_declare_ok(&args)?;
        self.close_channel(ch).await?;
        Ok((messages, consumers))
    }

    /// Close the connection politely.
    pub async fn close(mut self) {
        let close = super::reply::connection_close(200, "probe done", MethodId(0, 0));
        if self.write_frame(&close).await.is_ok() {
            let _ = self.expect(0, MethodId::CONNECTION_CLOSE_OK).await;
        }
    }

    async fn open_channel(&mut self) -> Result<u16, ProbeError> {
        let ch = self.next_channel;
        self.next_channel = self.next_channel.wrapping_add(1).max(1);
        let open = method_frame(ch, MethodId::CHANNEL_OPEN, |p| p.put_u8(0));
        self.write_frame(&open).await?;
        self.expect(ch, MethodId::CHANNEL_OPEN_OK).await?;
        Ok(ch)
    }

    async fn close_channel(&mut self, ch: u16) -> Result<(), ProbeError> {
        let close = super::reply::channel_close(ch, 200, "probe done", MethodId(0, 0));
        self.write_frame(&close).await?;
        self.expect(ch, MethodId::CHANNEL_CLOSE_OK)
            .await
            .map(|_| ())
    }

    async fn expect_or_not_found(
        &mut self,
        ch: u16,
        id: MethodId,
        kind: &'static str,
        name: &str,
    ) -> Result<Vec<u8>, ProbeError> {
        match self.expect(ch, id).await {
            Err(ProbeError::ChannelClosed { code: 404, .. }) => {
                let ok = super::reply::channel_close_ok(ch);
                self.write_frame(&ok).await?;
                Err(ProbeError::NotFound {
                    kind,
                    name: name.to_string(),
                })
            }
            other => other,
        }
    }

    /// Read frames until method `id` arrives on `ch`; returns its arguments.
    async fn expect(&mut self, ch: u16, id: MethodId) -> Result<Vec<u8>, ProbeError> {
        loop {
            let f = self.read_frame().await?;
            if f.kind != FrameKind::Method {
                continue;
            }
            let (got, args) = method::split_id(f.payload())?;
            if got == MethodId::CONNECTION_CLOSE {
                let c = Close::decode(args)?;
                return Err(ProbeError::Refused {
                    code: c.code,
                    text: c.text.to_string(),
                });
            }
            if got == MethodId::CHANNEL_CLOSE && f.channel == ch {
                let c = Close::decode(args)?;
                return Err(ProbeError::ChannelClosed {
                    code: c.code,
                    text: c.text.to_string(),
                });
            }
            if got == id && f.channel == ch {
                return Ok(args.to_vec());
            }
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, ProbeError> {
        loop {
            if let Some(f) = frame::split(&mut self.buf, 1 << 20)? {
                return Ok(f);
            }
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| ProbeError::Timeout(self.addr.clone()))?
                .map_err(|source| ProbeError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ProbeError::Io {
                    addr: self.addr.clone(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    async fn write_frame(&mut self, f: &Frame) -> Result<(), ProbeError> {
        self.write_raw(&f.raw).await
    }

    async fn write_raw(&mut self, b: &[u8]) -> Result<(), ProbeError> {
        tokio::time::timeout(self.timeout, self.stream.write_all(b))
            .await
            .map_err(|_| ProbeError::Timeout(self.addr.clone()))?
            .map_err(|source| ProbeError::Io {
                addr: self.addr.clone(),
                source,
            })
    }
}
