//! A Redis publish as policies see it. The pushed value is usually a kombu envelope (JSON with
//! `headers`, `properties`, `content-type` and a base64 `body`); headers and properties are read
//! from it lazily, so a policy that asks for `task` costs one scan of the envelope's keys.

use crate::identity::{ConnFacts, MessageIdentity};
use crate::plugin::MessageFacts;
use crate::protocol::redis::json;
use std::net::SocketAddr;

/// One message of a push or publish command.
pub(super) struct RedisMessage<'a> {
    pub producer: &'a str,
    pub conn: &'a ConnFacts,
    pub peer: SocketAddr,
    /// The list key or channel.
    pub key: &'a str,
    /// The pushed value.
    pub value: &'a [u8],
}

/// Lookups in the kombu envelope, shared by identity and policies.
pub(super) struct Envelope<'a>(pub &'a [u8]);

impl Envelope<'_> {
    fn looks_like_json(&self) -> bool {
        self.0
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{')
    }

    /// `headers.NAME` as text.
    pub fn header(&self, name: &str) -> Option<String> {
        if !self.looks_like_json() {
            return None;
        }
        let headers = json::get(self.0, "headers")?;
        json::get(headers, name)
            .and_then(json::text)
            .map(|c| c.into_owned())
    }

    /// A message property: `content_type` and `content_encoding` from the envelope's top level,
    /// anything else from its `properties`.
    pub fn property(&self, name: &str) -> Option<String> {
        if !self.looks_like_json() {
            return None;
        }
        let v = match name {
            "content_type" => json::get(self.0, "content-type"),
            "content_encoding" => json::get(self.0, "content-encoding"),
            _ => json::get(self.0, "properties").and_then(|p| json::get(p, name)),
        };
        v.and_then(json::text).map(|c| c.into_owned())
    }

    /// Names of the envelope's headers.
    pub fn header_names(&self) -> Vec<String> {
        if !self.looks_like_json() {
            return Vec::new();
        }
        json::get(self.0, "headers")
            .map(json::keys)
            .unwrap_or_default()
    }
}

impl MessageIdentity for Envelope<'_> {
    fn app_id(&self) -> Option<String> {
        self.property("app_id")
    }
    fn user_id(&self) -> Option<String> {
        self.property("user_id")
    }
    fn header(&self, name: &str) -> Option<String> {
        Envelope::header(self, name)
    }
}

impl MessageFacts for RedisMessage<'_> {
    fn protocol(&self) -> &str {
        "redis"
    }

    fn producer(&self) -> &str {
        self.producer
    }

    fn vhost(&self) -> &str {
        self.conn.vhost.as_deref().unwrap_or("0")
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
        ""
    }

    fn routing_key(&self) -> &str {
        self.key
    }

    fn property(&self, name: &str) -> Option<String> {
        Envelope(self.value).property(name)
    }

    fn header(&self, name: &str) -> Option<String> {
        Envelope(self.value).header(name)
    }

    fn header_names(&self) -> Vec<String> {
        Envelope(self.value).header_names()
    }

    fn body_size(&self) -> u64 {
        self.value.len() as u64
    }

    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(len as usize).min(self.value.len());
        self.value.get(start..end).unwrap_or_default().to_vec()
    }
}
