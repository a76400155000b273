//! Method frame payloads: `split_id` and every method decoder sluice has, each checked against
//! `amq-protocol`'s parser of the same payload.
//!
//! Every decoder runs on every input (not only on its own method id) so that each one sees the
//! whole input space. Where `amq-protocol` decodes the payload as the method a sluice decoder is
//! for, sluice must decode it too and agree field by field; where sluice decodes one of the
//! methods whose every field it reads, `amq-protocol` must agree in turn.
#![no_main]

use amq_protocol::protocol::{basic, channel, connection, parse_class, queue, AMQPClass};
use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::method::{
    decode_blocked_reason, decode_open_vhost, decode_queue_declare_ok, split_id, Close, Confirm,
    MethodId, Publish, Tune,
};

fuzz_target!(|data: &[u8]| {
    let Ok((id, args)) = split_id(data) else {
        assert!(data.len() < 4);
        return;
    };
    assert_eq!(
        id,
        MethodId(
            u16::from_be_bytes([data[0], data[1]]),
            u16::from_be_bytes([data[2], data[3]])
        )
    );
    assert_eq!(args, &data[4..]);
    let _ = id.to_string();
    let _ = id.has_content();

    let publish = Publish::decode(args);
    let confirm = Confirm::decode(args);
    let close = Close::decode(args);
    let tune = Tune::decode(args);
    let vhost = decode_open_vhost(args);
    let blocked = decode_blocked_reason(args);
    let declare_ok = decode_queue_declare_ok(args);

    // Fixed-size decoders succeed exactly when enough bytes are there.
    assert_eq!(confirm.is_ok(), args.len() >= 9);
    assert_eq!(tune.is_ok(), args.len() >= 8);
    if let Ok(p) = &publish {
        assert!(p.exchange.len() <= 255 && p.routing_key.len() <= 255);
        assert_eq!(p.exchange.as_bytes(), &args[3..3 + p.exchange.len()]);
    }
    if let Ok(c) = &close {
        assert_eq!(c.code, u16::from_be_bytes([args[0], args[1]]));
    }
    // Open's vhost and blocked's reason are the same short-string read.
    assert_eq!(vhost.clone().ok(), blocked.clone().ok());

    let reference = parse_class(data).ok().map(|(_, class)| class);
    match &reference {
        Some(AMQPClass::Basic(basic::AMQPMethod::Publish(r))) => {
            let p = publish
                .clone()
                .expect("amq-protocol decodes basic.publish, sluice does not");
            assert_eq!(
                (p.exchange, p.routing_key, p.mandatory, p.immediate),
                (
                    r.exchange.as_str(),
                    r.routing_key.as_str(),
                    r.mandatory,
                    r.immediate
                )
            );
        }
        Some(AMQPClass::Basic(basic::AMQPMethod::Ack(r))) => {
            let c = confirm.clone().expect("basic.ack");
            assert_eq!((c.tag, c.multiple), (r.delivery_tag, r.multiple));
        }
        Some(AMQPClass::Basic(basic::AMQPMethod::Nack(r))) => {
            let c = confirm.clone().expect("basic.nack");
            assert_eq!(
                (c.tag, c.multiple, c.requeue),
                (r.delivery_tag, r.multiple, r.requeue)
            );
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::Close(r))) => {
            let c = close.clone().expect("connection.close");
            assert_eq!(
                (c.code, c.text, c.class, c.method),
                (r.reply_code, r.reply_text.as_str(), r.class_id, r.method_id)
            );
        }
        Some(AMQPClass::Channel(channel::AMQPMethod::Close(r))) => {
            let c = close.clone().expect("channel.close");
            assert_eq!(
                (c.code, c.text, c.class, c.method),
                (r.reply_code, r.reply_text.as_str(), r.class_id, r.method_id)
            );
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::Tune(r))) => {
            let t = tune.clone().expect("connection.tune");
            assert_eq!(
                (t.channel_max, t.frame_max, t.heartbeat),
                (r.channel_max, r.frame_max, r.heartbeat)
            );
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::TuneOk(r))) => {
            let t = tune.clone().expect("connection.tune-ok");
            assert_eq!(
                (t.channel_max, t.frame_max, t.heartbeat),
                (r.channel_max, r.frame_max, r.heartbeat)
            );
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::Open(r))) => {
            assert_eq!(
                vhost.clone().expect("connection.open"),
                r.virtual_host.as_str()
            );
        }
        Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(r))) => {
            assert_eq!(
                blocked.clone().expect("connection.blocked"),
                r.reason.as_str()
            );
        }
        Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(r))) => {
            let (q, messages, consumers) = declare_ok.clone().expect("queue.declare-ok");
            assert_eq!(
                (q, messages, consumers),
                (r.queue.as_str(), r.message_count, r.consumer_count)
            );
        }
        _ => {}
    }

    // The other way round, for methods whose every field sluice reads (so a sluice success
    // means the payload is complete). Close's text is only required to be UTF-8 by the
    // reference decoder: sluice tolerates (and only logs) an invalid one.
    let decoded = reference.is_some();
    match id {
        MethodId::BASIC_PUBLISH if publish.is_ok() => assert!(decoded, "basic.publish"),
        MethodId::BASIC_ACK | MethodId::BASIC_NACK if confirm.is_ok() => {
            assert!(decoded, "basic.ack/nack")
        }
        MethodId::CONNECTION_TUNE | MethodId::CONNECTION_TUNE_OK if tune.is_ok() => {
            assert!(decoded, "connection.tune")
        }
        MethodId::CONNECTION_BLOCKED if blocked.is_ok() => assert!(decoded, "connection.blocked"),
        MethodId::QUEUE_DECLARE_OK if declare_ok.is_ok() => assert!(decoded, "queue.declare-ok"),
        MethodId::CONNECTION_CLOSE | MethodId::CHANNEL_CLOSE if close.is_ok() => {
            let n = args[2] as usize;
            if std::str::from_utf8(&args[3..3 + n]).is_ok() {
                assert!(decoded, "close");
            }
        }
        _ => {}
    }
});
