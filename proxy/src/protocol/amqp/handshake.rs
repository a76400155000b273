//! The connection handshake as sluice sees it: who the client is (`connection.start-ok`) and the
//! capability sluice adds so the broker tells it about `connection.blocked`.

use super::method::MethodId;
use super::table::{self, FieldTable, FieldValue};
use super::wire::{put_long_bytes, put_short_str, Reader, WireError};
use bytes::{BufMut, BytesMut};

/// What `connection.start-ok` says about the client.
#[derive(Debug, Clone, PartialEq)]
pub struct StartOk {
    /// Decoded client properties.
    pub client_properties: FieldTable,
    /// SASL mechanism (`PLAIN`, `AMQPLAIN`, `EXTERNAL`…).
    pub mechanism: String,
    /// The raw SASL response, forwarded untouched.
    pub response: Vec<u8>,
    /// Locale.
    pub locale: String,
}

impl StartOk {
    /// Decode `connection.start-ok` arguments.
    pub fn decode(args: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(args);
        let client_properties = table::decode_table(&mut r)?;
        let mechanism = String::from_utf8_lossy(r.short_bytes("mechanism")?).into_owned();
        let response = r.long_bytes("response")?.to_vec();
        let locale = String::from_utf8_lossy(r.short_bytes("locale")?).into_owned();
        Ok(StartOk {
            client_properties,
            mechanism,
            response,
            locale,
        })
    }

    /// The user name carried by the SASL response, for `PLAIN` and `AMQPLAIN`.
    pub fn user(&self) -> Option<String> {
        sasl_user(&self.mechanism, &self.response)
    }

    /// A client property as text (`connection_name`, `product`…).
    pub fn client_property(&self, name: &str) -> Option<String> {
        self.client_properties
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.to_text())
            .map(|c| c.into_owned())
    }

    /// Whether the client advertised `capabilities.<name> = true`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities()
            .and_then(|caps| caps.iter().find(|(k, _)| k == name))
            .is_some_and(|(_, v)| matches!(v, FieldValue::Bool(true)))
    }

    fn capabilities(&self) -> Option<&FieldTable> {
        self.client_properties
            .iter()
            .find(|(k, _)| k == "capabilities")
            .and_then(|(_, v)| match v {
                FieldValue::Table(t) => Some(t),
                _ => None,
            })
    }

    /// Set `capabilities.<name> = true`, adding the table if the client sent none.
    pub fn set_capability(&mut self, name: &str) {
        let caps = match self
            .client_properties
            .iter_mut()
            .find(|(k, _)| k == "capabilities")
        {
            Some((_, FieldValue::Table(t))) => t,
            Some((_, other)) => {
                *other = FieldValue::Table(Vec::new());
                match other {
                    FieldValue::Table(t) => t,
                    _ => return,
                }
            }
            None => {
                self.client_properties
                    .push(("capabilities".into(), FieldValue::Table(Vec::new())));
                match self.client_properties.last_mut() {
                    Some((_, FieldValue::Table(t))) => t,
                    _ => return,
                }
            }
        };
        match caps.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = FieldValue::Bool(true),
            None => caps.push((name.into(), FieldValue::Bool(true))),
        }
    }

    /// Encode as a method frame payload.
    pub fn encode(&self) -> Result<BytesMut, WireError> {
        let mut p = BytesMut::with_capacity(512);
        p.put_u16(MethodId::CONNECTION_START_OK.0);
        p.put_u16(MethodId::CONNECTION_START_OK.1);
        table::encode_table(&mut p, &self.client_properties)?;
        put_short_str(&mut p, &self.mechanism)?;
        put_long_bytes(&mut p, &self.response);
        put_short_str(&mut p, &self.locale)?;
        Ok(p)
    }
}

/// The login name in a SASL response. `PLAIN` is `authzid NUL authcid NUL password`; `AMQPLAIN`
/// is a field table body (no length prefix) with `LOGIN` and `PASSWORD`.
pub fn sasl_user(mechanism: &str, response: &[u8]) -> Option<String> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|&b| b == 0);
            let _authzid = parts.next()?;
            let authcid = parts.next()?;
            Some(String::from_utf8_lossy(authcid).into_owned())
        }
        "AMQPLAIN" => table::find(response, "LOGIN")
            .ok()
            .flatten()
            .and_then(|v| v.as_text())
            .map(|c| c.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::amqp::oracle;
    use amq_protocol::protocol::{connection, AMQPClass};
    use amq_protocol::types::{AMQPValue, FieldTable as RefTable, LongString};

    fn start_ok(mechanism: &str, response: &[u8], with_caps: bool) -> Vec<u8> {
        let mut props = RefTable::default();
        props.insert(
            "connection_name".into(),
            AMQPValue::LongString(LongString::from("web-login")),
        );
        props.insert(
            "product".into(),
            AMQPValue::LongString(LongString::from("pika")),
        );
        if with_caps {
            let mut caps = RefTable::default();
            caps.insert("publisher_confirms".into(), AMQPValue::Boolean(true));
            caps.insert("connection.blocked".into(), AMQPValue::Boolean(false));
            props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        }
        let wire = oracle::method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: mechanism.into(),
                response: LongString::from(response.to_vec()),
                locale: "en_US".into(),
            })),
        );
        wire[11..wire.len() - 1].to_vec()
    }

    #[test]
    fn plain_start_ok_names_user_and_connection() {
        let args = start_ok("PLAIN", b"\0guest\0secret", true);
        let s = StartOk::decode(&args).unwrap();
        assert_eq!(s.user().as_deref(), Some("guest"));
        assert_eq!(
            s.client_property("connection_name").as_deref(),
            Some("web-login")
        );
        assert!(!s.has_capability("connection.blocked"));
        assert!(s.has_capability("publisher_confirms"));
    }

    #[test]
    fn amqplain_user_is_read_from_the_unprefixed_table() {
        let mut resp = BytesMut::new();
        table::encode_table(
            &mut resp,
            &vec![
                ("LOGIN".into(), FieldValue::LongStr(b"celery".to_vec())),
                ("PASSWORD".into(), FieldValue::LongStr(b"pw".to_vec())),
            ],
        )
        .unwrap();
        let args = start_ok("AMQPLAIN", &resp[4..], false);
        let s = StartOk::decode(&args).unwrap();
        assert_eq!(s.user().as_deref(), Some("celery"));
    }

    #[test]
    fn capability_rewrite_round_trips_and_keeps_credentials() {
        for with_caps in [true, false] {
            let args = start_ok("PLAIN", b"\0guest\0guest", with_caps);
            let mut s = StartOk::decode(&args).unwrap();
            s.set_capability("connection.blocked");
            let encoded = s.encode().unwrap();
            let again = StartOk::decode(&encoded[4..]).unwrap();
            assert!(again.has_capability("connection.blocked"));
            assert_eq!(again.response, b"\0guest\0guest");
            assert_eq!(again.client_property("product").as_deref(), Some("pika"));
        }
    }
}
