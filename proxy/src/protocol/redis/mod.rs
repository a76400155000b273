//! Redis (RESP2/RESP3): command splitting and reply scanning ([`resp`]), the lazy read of a
//! kombu message envelope ([`json`]) and the readiness probe ([`client`]).
//!
//! Everything here parses bytes that come straight from the network, so panicking constructs
//! are denied: every decode returns a typed error or `None`.
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
pub mod json;
pub mod resp;

pub use resp::{Command, CommandSplitter, ReplyScanner, RespError};

/// How a command delivers messages, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishKind {
    /// `LPUSH`/`RPUSH`/`LPUSHX`/`RPUSHX key value [value ...]`: kombu's queue delivery.
    Push,
    /// `PUBLISH`/`SPUBLISH channel message`: kombu's fanout.
    Publish,
}

impl PublishKind {
    /// The publish kind of a command, if it is one that delivers messages (with enough
    /// arguments to do so).
    pub fn of(cmd: &Command) -> Option<PublishKind> {
        let name = cmd.name();
        let kind = match name.as_bytes() {
            b"LPUSH" | b"RPUSH" | b"LPUSHX" | b"RPUSHX" => PublishKind::Push,
            b"PUBLISH" | b"SPUBLISH" => PublishKind::Publish,
            _ => return None,
        };
        let enough = match kind {
            PublishKind::Push => cmd.args.len() >= 3,
            PublishKind::Publish => cmd.args.len() == 3,
        };
        enough.then_some(kind)
    }

    /// The messages a command of this kind carries: every pushed value, or the one published.
    pub fn values(self, cmd: &Command) -> &[bytes::Bytes] {
        match self {
            PublishKind::Push => cmd.args.get(2..).unwrap_or_default(),
            PublishKind::Publish => cmd.args.get(2..3).unwrap_or_default(),
        }
    }
}
