//! One proxied client connection: a client ↔ sluice ↔ upstream pair, run as two pumps.
//!
//! - [`inbound`]: client → upstream. Splits frames, assembles publishes, asks the policy chain,
//!   holds (paced reads), forwards, diverts or sheds.
//! - [`outbound`]: upstream → client. Translates confirm tags, injects the frames sluice creates
//!   at content boundaries, tracks `connection.blocked`.
//!
//! They share a small [`Shared`] state behind a mutex (uncontended: one lock per confirm).
//!
//! Every byte these modules handle comes from a client or a broker, so panicking constructs are
//! denied here as in the protocol modules: a bad frame must end in an AMQP close, never a panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod channel;
pub mod connection;
mod facts;
mod inbound;
pub mod io;
mod outbound;
mod read_ahead;
pub mod redis;

use crate::protocol::amqp::frame::Frame;
use crate::protocol::amqp::wire::WireError;
use crate::protocol::amqp::FrameError;
use crate::runtime::BufferBudget;
use channel::ChannelState;
use std::collections::HashMap;
use std::sync::Arc;

/// Something the inbound pump asks the outbound pump to send to the client.
#[derive(Debug)]
pub enum ToClient {
    /// Frames for one channel, sent whole at the next content boundary of that channel.
    Frames(u16, Vec<Frame>),
    /// sluice holds this connection's reads (true) or stopped holding (false).
    SluiceBlocked(bool),
    /// Close the client connection with this code and text.
    Close(u16, String),
}

/// State both pumps read and write.
#[derive(Debug, Default)]
pub struct Shared {
    /// Channels with state (confirm mode, tx, sluice closing).
    pub channels: HashMap<u16, ChannelState>,
    /// The `channel_max` sluice passed on to the client in `connection.tune` (the broker's,
    /// lowered to `[limits] max_channels`); 0 until the broker's tune has gone by.
    pub channel_max: u16,
    /// The client advertised `capabilities.connection.blocked`.
    pub client_blocked_capable: bool,
    /// The broker has blocked this connection.
    pub upstream_blocked: bool,
    /// sluice holds this connection's reads past `blocked_after`.
    pub sluice_blocked: bool,
    /// sluice sent `connection.close` upstream itself: swallow the broker's close-ok.
    pub upstream_close_by_sluice: bool,
    /// Bytes of frames the inbound pump injected that the outbound pump has not taken yet; past
    /// `max_buffered_per_connection` the inbound pump stops reading the client. Also counted in
    /// the process-wide budget, which gets back what is left when the connection ends.
    pub to_client_bytes: usize,
    /// The process-wide budget of buffered bytes (`max_buffered_total`).
    pub budget: Option<Arc<BufferBudget>>,
    /// Cancelled once the client has answered a close with close-ok or closed its socket.
    pub client_finished: tokio_util::sync::CancellationToken,
}

impl Shared {
    /// Frames were queued for the client.
    pub fn injected(&mut self, bytes: usize) {
        self.to_client_bytes += bytes;
        if let Some(b) = &self.budget {
            b.add(bytes as u64);
        }
    }

    /// Queued frames were taken by the outbound pump (sent or dropped).
    pub fn taken(&mut self, bytes: usize) {
        let n = bytes.min(self.to_client_bytes);
        self.to_client_bytes -= n;
        if let Some(b) = &self.budget {
            b.release(n as u64);
        }
    }

    /// Forwarded publishes the broker has not confirmed, over all channels.
    pub fn unconfirmed(&self) -> usize {
        self.channels
            .values()
            .filter_map(|c| c.confirms.as_ref())
            .map(|m| m.unconfirmed())
            .sum()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Frames never taken (the outbound pump ended first) leave the budget with the
        // connection.
        if let Some(b) = &self.budget {
            b.release(self.to_client_bytes as u64);
        }
    }
}

/// Why a connection ended abnormally. Each maps to an AMQP reply code for the client.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A malformed frame.
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    /// A field that does not decode.
    #[error("syntax error: {0}")]
    Syntax(#[from] WireError),
    /// A frame out of sequence (e.g. a method inside a content).
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// A command not allowed now.
    #[error("command invalid: {0}")]
    CommandInvalid(String),
    /// A resource bound was hit.
    #[error("resource limit: {0}")]
    Resource(String),
    /// The client went past a limit it was told about (e.g. the negotiated `channel_max`).
    #[error("{0}")]
    NotAllowed(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl SessionError {
    /// The AMQP reply code sent to the client for this error.
    pub fn reply_code(&self) -> u16 {
        use crate::protocol::amqp::code;
        match self {
            SessionError::Frame(_) => code::FRAME_ERROR,
            SessionError::Syntax(_) => code::SYNTAX_ERROR,
            SessionError::Unexpected(_) => code::UNEXPECTED_FRAME,
            SessionError::CommandInvalid(_) => code::COMMAND_INVALID,
            SessionError::Resource(_) => code::RESOURCE_ERROR,
            SessionError::NotAllowed(_) => code::NOT_ALLOWED,
            SessionError::HandshakeTimeout => code::CONNECTION_FORCED,
            SessionError::Io(_) => code::INTERNAL_ERROR,
        }
    }
}
