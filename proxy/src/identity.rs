//! Naming the producer: the first configured source that yields a value.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

use std::net::IpAddr;
use std::sync::Arc;

/// Where a producer's name can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A client property from the handshake, e.g. `connection_name`.
    ClientProperty(String),
    /// The authenticated user (SASL PLAIN / AMQPLAIN login).
    User,
    /// The virtual host.
    Vhost,
    /// The client's IP address.
    PeerIp,
    /// Per message: the `app_id` property.
    AppId,
    /// Per message: the `user_id` property.
    UserId,
    /// Per message: a header (AMQP headers table).
    Header(String),
}

impl Source {
    /// Parse one entry of `[identity] from`.
    pub fn parse(s: &str) -> Result<Source, String> {
        Ok(match s.split_once(':') {
            Some(("client_property", name)) if !name.is_empty() => {
                Source::ClientProperty(name.into())
            }
            Some(("header", name)) if !name.is_empty() => Source::Header(name.into()),
            None if s == "user" => Source::User,
            None if s == "vhost" => Source::Vhost,
            None if s == "peer_ip" => Source::PeerIp,
            None if s == "app_id" => Source::AppId,
            None if s == "user_id" => Source::UserId,
            _ => {
                return Err(format!(
                "unknown identity source '{s}' (use client_property:NAME, user, vhost, peer_ip, \
                     app_id, user_id or header:NAME)"
            ))
            }
        })
    }

    /// Whether the value differs per message (so it cannot be resolved once per connection).
    pub fn per_message(&self) -> bool {
        matches!(self, Source::AppId | Source::UserId | Source::Header(_))
    }
}

/// What is known about a connection once its handshake is done.
#[derive(Debug, Clone, Default)]
pub struct ConnFacts {
    /// Client properties as text (name, value).
    pub client_properties: Vec<(String, String)>,
    /// Login name, when the mechanism carries one.
    pub user: Option<String>,
    /// Virtual host.
    pub vhost: Option<String>,
    /// Client IP.
    pub peer_ip: Option<IpAddr>,
}

impl ConnFacts {
    /// A client property by name, as text.
    pub fn client_property(&self, name: &str) -> Option<String> {
        self.client_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

/// Per-message lookups a protocol adapter provides for identity sources.
pub trait MessageIdentity {
    /// `app_id` property.
    fn app_id(&self) -> Option<String>;
    /// `user_id` property.
    fn user_id(&self) -> Option<String>;
    /// A header value as text.
    fn header(&self, name: &str) -> Option<String>;
}

/// The ordered list of sources.
#[derive(Debug, Clone)]
pub struct IdentitySpec {
    sources: Vec<Source>,
}

impl Default for IdentitySpec {
    fn default() -> Self {
        IdentitySpec {
            sources: vec![
                Source::ClientProperty("connection_name".into()),
                Source::User,
                Source::PeerIp,
            ],
        }
    }
}

/// A connection's identity: the name it resolves to without looking at messages, and whether
/// any per-message source comes before that name in the list.
#[derive(Debug, Clone)]
pub struct ConnIdentity {
    /// The connection-level name (`unknown` if nothing yields).
    pub name: Arc<str>,
    /// Per-message sources to try first, in order.
    pub message_sources: Arc<[Source]>,
}

impl IdentitySpec {
    /// Build from sources.
    pub fn new(sources: Vec<Source>) -> Self {
        IdentitySpec { sources }
    }

    /// The configured sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Resolve what can be resolved from the connection alone.
    pub fn for_connection(&self, facts: &ConnFacts) -> ConnIdentity {
        let mut message_sources = Vec::new();
        for s in &self.sources {
            if s.per_message() {
                message_sources.push(s.clone());
                continue;
            }
            if let Some(v) = conn_value(s, facts) {
                return ConnIdentity {
                    name: v.into(),
                    message_sources: message_sources.into(),
                };
            }
        }
        ConnIdentity {
            name: "unknown".into(),
            message_sources: message_sources.into(),
        }
    }
}

fn conn_value(s: &Source, facts: &ConnFacts) -> Option<String> {
    let v = match s {
        Source::ClientProperty(name) => facts.client_property(name),
        Source::User => facts.user.clone(),
        Source::Vhost => facts.vhost.clone(),
        Source::PeerIp => facts.peer_ip.map(|ip| ip.to_string()),
        _ => None,
    };
    v.filter(|v| !v.is_empty())
}

impl ConnIdentity {
    /// The producer of one message: the first per-message source that yields, else the
    /// connection's name. Allocation-free when there are no per-message sources.
    pub fn for_message(&self, msg: &dyn MessageIdentity) -> Arc<str> {
        for s in self.message_sources.iter() {
            let v = match s {
                Source::AppId => msg.app_id(),
                Source::UserId => msg.user_id(),
                Source::Header(h) => msg.header(h),
                _ => None,
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                return v.into();
            }
        }
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Msg(Option<&'static str>);
    impl MessageIdentity for Msg {
        fn app_id(&self) -> Option<String> {
            self.0.map(String::from)
        }
        fn user_id(&self) -> Option<String> {
            None
        }
        fn header(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn facts() -> ConnFacts {
        ConnFacts {
            client_properties: vec![("product".into(), "pika".into())],
            user: Some("guest".into()),
            vhost: Some("/".into()),
            peer_ip: Some("127.0.0.1".parse().unwrap()),
        }
    }

    #[test]
    fn first_source_that_yields_wins() {
        let spec = IdentitySpec::default();
        // No connection_name: falls through to the user.
        assert_eq!(&*spec.for_connection(&facts()).name, "guest");
        let mut f = facts();
        f.client_properties
            .push(("connection_name".into(), "web-login".into()));
        assert_eq!(&*spec.for_connection(&f).name, "web-login");
    }

    #[test]
    fn per_message_sources_come_first_when_listed_first() {
        let spec = IdentitySpec::new(vec![Source::AppId, Source::User]);
        let id = spec.for_connection(&facts());
        assert_eq!(&*id.for_message(&Msg(Some("hotfix-svc"))), "hotfix-svc");
        assert_eq!(&*id.for_message(&Msg(None)), "guest");
    }

    #[test]
    fn sources_parse_with_clear_errors() {
        assert_eq!(
            Source::parse("client_property:connection_name"),
            Ok(Source::ClientProperty("connection_name".into()))
        );
        assert_eq!(
            Source::parse("header:task"),
            Ok(Source::Header("task".into()))
        );
        assert!(Source::parse("cookie")
            .unwrap_err()
            .contains("unknown identity source"));
    }
}
