//! Frames sluice creates itself: confirms for shed publishes, returns, closes, blocked
//! notifications, heartbeats, and the rewritten `basic.publish` of a divert.

use super::frame::{Frame, FrameKind};
use super::method::MethodId;
use super::wire::{put_short_str, put_short_str_lossy, WireError};
use bytes::{BufMut, BytesMut};

fn method(channel: u16, id: MethodId, args: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut payload = BytesMut::with_capacity(64);
    payload.put_u16(id.0);
    payload.put_u16(id.1);
    args(&mut payload);
    Frame::encode(FrameKind::Method, channel, &payload)
}

/// `basic.ack` to the client.
pub fn ack(channel: u16, tag: u64, multiple: bool) -> Frame {
    method(channel, MethodId::BASIC_ACK, |p| {
        p.put_u64(tag);
        p.put_u8(multiple as u8);
    })
}

/// `basic.nack` to the client (requeue is meaningless for publisher confirms: always false).
pub fn nack(channel: u16, tag: u64, multiple: bool) -> Frame {
    method(channel, MethodId::BASIC_NACK, |p| {
        p.put_u64(tag);
        p.put_u8(multiple as u8);
    })
}

/// `basic.return`; the caller sends the original content header and body frames after it.
pub fn basic_return(
    channel: u16,
    code: u16,
    text: &str,
    exchange: &str,
    routing_key: &str,
) -> Frame {
    method(channel, MethodId::BASIC_RETURN, |p| {
        p.put_u16(code);
        put_short_str_lossy(p, text);
        put_short_str_lossy(p, exchange);
        put_short_str_lossy(p, routing_key);
    })
}

/// `channel.close`.
pub fn channel_close(channel: u16, code: u16, text: &str, cause: MethodId) -> Frame {
    method(channel, MethodId::CHANNEL_CLOSE, |p| {
        p.put_u16(code);
        put_short_str_lossy(p, text);
        p.put_u16(cause.0);
        p.put_u16(cause.1);
    })
}

/// `channel.close-ok`.
pub fn channel_close_ok(channel: u16) -> Frame {
    method(channel, MethodId::CHANNEL_CLOSE_OK, |_| {})
}

/// `connection.close`.
pub fn connection_close(code: u16, text: &str, cause: MethodId) -> Frame {
    method(0, MethodId::CONNECTION_CLOSE, |p| {
        p.put_u16(code);
        put_short_str_lossy(p, text);
        p.put_u16(cause.0);
        p.put_u16(cause.1);
    })
}

/// `connection.close-ok`.
pub fn connection_close_ok() -> Frame {
    method(0, MethodId::CONNECTION_CLOSE_OK, |_| {})
}

/// `connection.tune` with these values: the broker's tune with its channel limit lowered to
/// sluice's `max_channels`.
pub fn connection_tune(t: super::method::Tune) -> Frame {
    method(0, MethodId::CONNECTION_TUNE, |p| {
        p.put_u16(t.channel_max);
        p.put_u32(t.frame_max);
        p.put_u16(t.heartbeat);
    })
}

/// `connection.blocked` with a reason.
pub fn connection_blocked(reason: &str) -> Frame {
    method(0, MethodId::CONNECTION_BLOCKED, |p| {
        put_short_str_lossy(p, reason)
    })
}

/// `connection.unblocked`.
pub fn connection_unblocked() -> Frame {
    method(0, MethodId::CONNECTION_UNBLOCKED, |_| {})
}

/// `basic.publish` to a new destination, keeping the flags of the original.
pub fn publish(
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    immediate: bool,
) -> Result<Frame, WireError> {
    let mut payload = BytesMut::with_capacity(16 + exchange.len() + routing_key.len());
    payload.put_u16(MethodId::BASIC_PUBLISH.0);
    payload.put_u16(MethodId::BASIC_PUBLISH.1);
    payload.put_u16(0);
    put_short_str(&mut payload, exchange)?;
    put_short_str(&mut payload, routing_key)?;
    payload.put_u8(mandatory as u8 | (immediate as u8) << 1);
    Ok(Frame::encode(FrameKind::Method, channel, &payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::amqp::oracle;
    use amq_protocol::protocol::{basic, channel, connection, AMQPClass};

    #[test]
    fn injected_frames_match_the_reference_encoder() {
        assert_eq!(
            nack(3, 42, false).raw.to_vec(),
            oracle::method_frame(
                3,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 42,
                    multiple: false,
                    requeue: false
                }))
            )
        );
        assert_eq!(
            ack(1, 7, true).raw.to_vec(),
            oracle::method_frame(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 7,
                    multiple: true
                }))
            )
        );
        assert_eq!(
            channel_close(2, 406, "shed", MethodId::BASIC_PUBLISH)
                .raw
                .to_vec(),
            oracle::method_frame(
                2,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 406,
                    reply_text: "shed".into(),
                    class_id: 60,
                    method_id: 40
                }))
            )
        );
        assert_eq!(
            connection_tune(super::super::method::Tune {
                channel_max: 3,
                frame_max: 131072,
                heartbeat: 60
            })
            .raw
            .to_vec(),
            oracle::method_frame(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                    channel_max: 3,
                    frame_max: 131072,
                    heartbeat: 60
                }))
            )
        );
        assert_eq!(
            connection_blocked("quota").raw.to_vec(),
            oracle::method_frame(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: "quota".into()
                }))
            )
        );
        assert_eq!(
            publish(5, "overflow", "jobs", true, false)
                .unwrap()
                .raw
                .to_vec(),
            oracle::method_frame(
                5,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "overflow".into(),
                    routing_key: "jobs".into(),
                    mandatory: true,
                    immediate: false
                }))
            )
        );
        assert_eq!(
            basic_return(1, 312, "NO_ROUTE", "x", "k").raw.to_vec(),
            oracle::method_frame(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into(),
                    exchange: "x".into(),
                    routing_key: "k".into()
                }))
            )
        );
    }
}
