//! Decoding of the method frames sluice acts on. Every other method is forwarded as raw bytes
//! without being decoded past its class and method ids.

use super::wire::{Reader, WireError};

/// A (class id, method id) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodId(pub u16, pub u16);

#[allow(missing_docs)]
impl MethodId {
    pub const CONNECTION_START: MethodId = MethodId(10, 10);
    pub const CONNECTION_START_OK: MethodId = MethodId(10, 11);
    pub const CONNECTION_SECURE: MethodId = MethodId(10, 20);
    pub const CONNECTION_SECURE_OK: MethodId = MethodId(10, 21);
    pub const CONNECTION_TUNE: MethodId = MethodId(10, 30);
    pub const CONNECTION_TUNE_OK: MethodId = MethodId(10, 31);
    pub const CONNECTION_OPEN: MethodId = MethodId(10, 40);
    pub const CONNECTION_OPEN_OK: MethodId = MethodId(10, 41);
    pub const CONNECTION_CLOSE: MethodId = MethodId(10, 50);
    pub const CONNECTION_CLOSE_OK: MethodId = MethodId(10, 51);
    pub const CONNECTION_BLOCKED: MethodId = MethodId(10, 60);
    pub const CONNECTION_UNBLOCKED: MethodId = MethodId(10, 61);
    pub const CHANNEL_OPEN: MethodId = MethodId(20, 10);
    pub const CHANNEL_OPEN_OK: MethodId = MethodId(20, 11);
    pub const CHANNEL_CLOSE: MethodId = MethodId(20, 40);
    pub const CHANNEL_CLOSE_OK: MethodId = MethodId(20, 41);
    pub const EXCHANGE_DECLARE: MethodId = MethodId(40, 10);
    pub const EXCHANGE_DECLARE_OK: MethodId = MethodId(40, 11);
    pub const QUEUE_DECLARE: MethodId = MethodId(50, 10);
    pub const QUEUE_DECLARE_OK: MethodId = MethodId(50, 11);
    pub const BASIC_PUBLISH: MethodId = MethodId(60, 40);
    pub const BASIC_RETURN: MethodId = MethodId(60, 50);
    pub const BASIC_DELIVER: MethodId = MethodId(60, 60);
    pub const BASIC_GET_OK: MethodId = MethodId(60, 71);
    pub const BASIC_ACK: MethodId = MethodId(60, 80);
    pub const BASIC_NACK: MethodId = MethodId(60, 120);
    pub const CONFIRM_SELECT: MethodId = MethodId(85, 10);
    pub const CONFIRM_SELECT_OK: MethodId = MethodId(85, 11);
    pub const TX_SELECT: MethodId = MethodId(90, 10);

    /// Methods that are followed by a content header and body frames.
    pub fn has_content(self) -> bool {
        matches!(
            self,
            MethodId::BASIC_PUBLISH
                | MethodId::BASIC_RETURN
                | MethodId::BASIC_DELIVER
                | MethodId::BASIC_GET_OK
        )
    }
}

impl std::fmt::Display for MethodId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            MethodId::CONNECTION_START => "connection.start",
            MethodId::CONNECTION_START_OK => "connection.start-ok",
            MethodId::CONNECTION_TUNE => "connection.tune",
            MethodId::CONNECTION_TUNE_OK => "connection.tune-ok",
            MethodId::CONNECTION_OPEN => "connection.open",
            MethodId::CONNECTION_CLOSE => "connection.close",
            MethodId::CHANNEL_OPEN => "channel.open",
            MethodId::CHANNEL_CLOSE => "channel.close",
            MethodId::BASIC_PUBLISH => "basic.publish",
            MethodId::BASIC_ACK => "basic.ack",
            MethodId::BASIC_NACK => "basic.nack",
            _ => return write!(f, "method {}.{}", self.0, self.1),
        };
        f.write_str(name)
    }
}

/// Read the class and method ids of a method frame payload; returns the arguments after them.
pub fn split_id(payload: &[u8]) -> Result<(MethodId, &[u8]), WireError> {
    let mut r = Reader::new(payload);
    let class = r.u16("class id")?;
    let method = r.u16("method id")?;
    Ok((MethodId(class, method), r.rest()))
}

/// `basic.publish` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Target exchange (`""` is the default exchange).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// The mandatory flag.
    pub mandatory: bool,
    /// The immediate flag (unsupported by RabbitMQ, forwarded as is).
    pub immediate: bool,
}

impl<'a> Publish<'a> {
    /// Decode the arguments of `basic.publish`.
    pub fn decode(args: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(args);
        r.skip(2, "reserved")?;
        let exchange = r.short_str("exchange")?;
        let routing_key = r.short_str("routing key")?;
        let bits = r.u8("publish flags")?;
        Ok(Publish {
            exchange,
            routing_key,
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        })
    }
}

/// `basic.ack` or `basic.nack` from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    /// Delivery tag.
    pub tag: u64,
    /// Covers every tag up to this one.
    pub multiple: bool,
    /// For nacks only: the requeue flag.
    pub requeue: bool,
}

impl Confirm {
    /// Decode `basic.ack` or `basic.nack` arguments.
    pub fn decode(args: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(args);
        let tag = r.u64("delivery tag")?;
        let bits = r.u8("confirm flags")?;
        Ok(Confirm {
            tag,
            multiple: bits & 1 != 0,
            requeue: bits & 2 != 0,
        })
    }
}

/// `connection.close` or `channel.close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close<'a> {
    /// Reply code.
    pub code: u16,
    /// Reply text.
    pub text: &'a str,
    /// Class of the method that caused the close.
    pub class: u16,
    /// Method that caused the close.
    pub method: u16,
}

impl<'a> Close<'a> {
    /// Decode close arguments. An invalid UTF-8 text is tolerated: it is only logged.
    pub fn decode(args: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(args);
        let code = r.u16("reply code")?;
        let text = std::str::from_utf8(r.short_bytes("reply text")?).unwrap_or("<invalid utf-8>");
        let class = r.u16("class id")?;
        let method = r.u16("method id")?;
        Ok(Close {
            code,
            text,
            class,
            method,
        })
    }
}

/// `connection.tune` / `connection.tune-ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tune {
    /// Highest channel number.
    pub channel_max: u16,
    /// Largest frame, header and end included; 0 = no limit.
    pub frame_max: u32,
    /// Heartbeat interval in seconds; 0 = off.
    pub heartbeat: u16,
}

impl Tune {
    /// Decode tune arguments.
    pub fn decode(args: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(args);
        Ok(Tune {
            channel_max: r.u16("channel max")?,
            frame_max: r.u32("frame max")?,
            heartbeat: r.u16("heartbeat")?,
        })
    }
}

/// The virtual host of `connection.open`.
pub fn decode_open_vhost(args: &[u8]) -> Result<&str, WireError> {
    Reader::new(args).short_str("virtual host")
}

/// The reason of `connection.blocked`.
pub fn decode_blocked_reason(args: &[u8]) -> Result<&str, WireError> {
    Reader::new(args).short_str("blocked reason")
}

/// `queue.declare-ok`: the queue's name, message count and consumer count.
pub fn decode_queue_declare_ok(args: &[u8]) -> Result<(&str, u32, u32), WireError> {
    let mut r = Reader::new(args);
    Ok((
        r.short_str("queue")?,
        r.u32("message count")?,
        r.u32("consumer count")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::amqp::oracle;
    use amq_protocol::protocol::{basic, AMQPClass};

    fn encode(class: AMQPClass) -> Vec<u8> {
        let wire = oracle::method_frame(1, class);
        wire[7..wire.len() - 1].to_vec()
    }

    #[test]
    fn publish_decodes_like_the_reference_encoder() {
        let payload = encode(AMQPClass::Basic(basic::AMQPMethod::Publish(
            basic::Publish {
                exchange: "jobs".into(),
                routing_key: "reports".into(),
                mandatory: true,
                immediate: false,
            },
        )));
        let (id, args) = split_id(&payload).unwrap();
        assert_eq!(id, MethodId::BASIC_PUBLISH);
        let p = Publish::decode(args).unwrap();
        assert_eq!(
            (p.exchange, p.routing_key, p.mandatory, p.immediate),
            ("jobs", "reports", true, false)
        );
    }

    #[test]
    fn ack_decodes_like_the_reference_encoder() {
        let payload = encode(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 77,
            multiple: true,
            requeue: false,
        })));
        let (id, args) = split_id(&payload).unwrap();
        assert_eq!(id, MethodId::BASIC_NACK);
        assert_eq!(
            Confirm::decode(args).unwrap(),
            Confirm {
                tag: 77,
                multiple: true,
                requeue: false
            }
        );
    }

    #[test]
    fn truncated_publish_is_an_error() {
        assert!(Publish::decode(&[0, 0, 4, b'a']).is_err());
    }
}
