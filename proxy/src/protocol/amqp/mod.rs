//! AMQP 0-9-1: frame splitting, lazy decoding of the few methods and properties sluice reads,
//! and encoding of the frames sluice injects.
//!
//! Everything here parses bytes that come straight from the network, so panicking constructs
//! are denied: every decode returns a typed error that maps to an AMQP reply code.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod client;
pub mod frame;
pub mod handshake;
pub mod header;
pub mod method;
pub mod reply;
pub mod table;
pub mod wire;

pub use frame::{Frame, FrameError, FrameKind};

/// AMQP reply codes sluice sends.
pub mod code {
    /// Normal close.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Message could not be routed (used for `basic.return` of a shed mandatory publish).
    pub const NO_ROUTE: u16 = 312;
    /// The server (sluice) forced the connection closed, e.g. on shutdown.
    pub const CONNECTION_FORCED: u16 = 320;
    /// Access refused.
    pub const ACCESS_REFUSED: u16 = 403;
    /// A precondition failed: used when a shed publish closes its channel.
    pub const PRECONDITION_FAILED: u16 = 406;
    /// A frame was malformed.
    pub const FRAME_ERROR: u16 = 501;
    /// A field could not be decoded.
    pub const SYNTAX_ERROR: u16 = 502;
    /// A method arrived that is not allowed in this state.
    pub const COMMAND_INVALID: u16 = 503;
    /// A frame on a channel that is not open.
    pub const CHANNEL_ERROR: u16 = 504;
    /// A frame arrived out of sequence (e.g. a method in the middle of a content).
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// A resource limit was hit.
    pub const RESOURCE_ERROR: u16 = 506;
    /// The peer is not allowed to do this (e.g. too many connection attempts).
    pub const NOT_ALLOWED: u16 = 530;
    /// Something went wrong inside sluice or its upstream.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// The reference encoder (`amq-protocol`), used by tests as an oracle.
#[cfg(test)]
pub(crate) mod oracle {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use amq_protocol::frame::{gen_frame, AMQPFrame};
    use amq_protocol::protocol::AMQPClass;

    /// Encode any frame with the reference implementation.
    pub fn frame(frame: &AMQPFrame) -> Vec<u8> {
        let (buf, _) = cookie_factory::gen(gen_frame(frame), Vec::new()).unwrap();
        buf
    }

    /// Encode a method frame with the reference implementation.
    pub fn method_frame(channel: u16, class: AMQPClass) -> Vec<u8> {
        frame(&AMQPFrame::Method(channel, class))
    }
}
