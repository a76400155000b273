//! The AMQP publish as policies see it: a [`MessageFacts`] answered lazily from the frames
//! sluice already holds. Nothing is decoded or copied until a plugin asks for it.

use crate::identity::ConnFacts;
use crate::plugin::MessageFacts;
use crate::protocol::amqp::frame::Frame;
use crate::protocol::amqp::header::{ContentHeader, PropValue, Property};
use crate::protocol::amqp::table::{self, FieldValue};
use std::net::SocketAddr;

/// One assembled publish plus its connection.
pub(super) struct AmqpMessage<'a> {
    pub producer: &'a str,
    pub conn: &'a ConnFacts,
    pub peer: SocketAddr,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub header: &'a ContentHeader<'a>,
    /// The body frames (after method and header).
    pub body: &'a [Frame],
}

impl MessageFacts for AmqpMessage<'_> {
    fn protocol(&self) -> &str {
        "amqp091"
    }

    fn producer(&self) -> &str {
        self.producer
    }

    fn vhost(&self) -> &str {
        self.conn.vhost.as_deref().unwrap_or("/")
    }

    fn user(&self) -> Option<&str> {
        self.conn.user.as_deref()
    }

    fn peer(&self) -> Option<String> {
        Some(self.peer.to_string())
    }

    fn client_property(&self, name: &str) -> Option<String> {
        self.conn.client_property(name)
    }

    fn exchange(&self) -> &str {
        self.exchange
    }

    fn routing_key(&self) -> &str {
        self.routing_key
    }

    fn property(&self, name: &str) -> Option<String> {
        let p = Property::from_name(name)?;
        match self.header.get(p).ok()?? {
            PropValue::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
            PropValue::Octet(o) => Some(o.to_string()),
            PropValue::Timestamp(t) => Some(t.to_string()),
            PropValue::Table(_) => None,
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.header
            .header(name)
            .ok()
            .flatten()
            .and_then(|v| v.as_text())
            .map(|c| c.into_owned())
    }

    fn header_names(&self) -> Vec<String> {
        match self.header.get(Property::Headers) {
            Ok(Some(PropValue::Table(body))) => table::decode_table_body(body)
                .map(|t| {
                    t.into_iter()
                        .map(|(k, _v): (String, FieldValue)| k)
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn body_size(&self) -> u64 {
        self.header.body_size
    }

    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        let end = offset.saturating_add(u64::from(len));
        for f in self.body {
            let chunk = f.payload();
            let next = pos + chunk.len() as u64;
            if next > offset && pos < end {
                let from = offset.saturating_sub(pos) as usize;
                let to = (end.min(next) - pos) as usize;
                if let Some(part) = chunk.get(from..to) {
                    out.extend_from_slice(part);
                }
            }
            if next >= end {
                break;
            }
            pos = next;
        }
        out
    }
}
