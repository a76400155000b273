//! Differential: sluice's lazy content-header scan against `amq-protocol`'s full decode of the
//! same payload.
//!
//! * When `amq-protocol` decodes the payload, sluice must parse it, agree on class, body size and
//!   every property, and its full table decoder must give the same `headers` table.
//! * When sluice accepts the payload (`validate`, plus a full decode of `headers`) and every
//!   string the reference requires to be UTF-8 is, `amq-protocol` must decode it too.
//!
//! Intentional differences, excluded from the comparison:
//! * Type tags `U` and `L`: `amq-protocol` reads them as a short int and a long long int (what
//!   the 0-9-1 spec text says); RabbitMQ does not know them, and neither does sluice
//!   (`UnknownFieldType`).
//! * Nesting: sluice's full decoder refuses tables and arrays nested deeper than 16 (`TooDeep`);
//!   the reference has no limit. The lazy scan never recurses, so it is unaffected.
//! * UTF-8: the reference refuses short strings (properties, table keys) that are not UTF-8;
//!   sluice keeps property bytes as they are and repairs keys lossily.
//! * Duplicate keys: the reference keeps the last (it decodes into a map); sluice's `header()`
//!   returns the first, as RabbitMQ's own table lookup does. Values are compared per key only
//!   when the key occurs once.
//! * Neither side looks at bytes after the last property, at the class id or at flag bits 0-1.
#![no_main]

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::types::ShortString;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::header::{ContentHeader, PropValue, Property};
use sluice::protocol::amqp::table;
use sluice::protocol::amqp::wire::WireError;
use sluice_fuzz::{norm, norm_amq, norm_amq_table, norm_table, raw_to_value, table_keys_utf8};

fn intentional(e: &WireError) -> bool {
    matches!(
        e,
        WireError::UnknownFieldType(b'U' | b'L') | WireError::TooDeep
    )
}

fn str_prop(v: Option<PropValue<'_>>, r: &Option<ShortString>, p: Property) {
    let ours = v.map(|v| match v {
        PropValue::Str(s) => s,
        other => panic!("{p:?} read as {other:?}"),
    });
    assert_eq!(ours, r.as_ref().map(|s| s.as_str().as_bytes()), "{p:?}");
}

fuzz_target!(|data: &[u8]| {
    let ours = ContentHeader::parse(data);
    let reference = parse_content_header(data).ok().map(|(_, h)| h);

    if let Some(r) = &reference {
        let h = ours
            .clone()
            .expect("amq-protocol decodes the header, sluice does not");
        assert_eq!((h.class, h.body_size), (r.class_id, r.body_size));
        match h.validate() {
            Ok(()) => {}
            Err(e) => assert!(intentional(&e), "validate: {e:?}"),
        }
        let rp = &r.properties;
        let get = |p| h.get(p).unwrap_or_else(|e| panic!("{p:?}: {e:?}"));
        str_prop(
            get(Property::ContentType),
            rp.content_type(),
            Property::ContentType,
        );
        str_prop(
            get(Property::ContentEncoding),
            rp.content_encoding(),
            Property::ContentEncoding,
        );
        let octet = |p| match get(p) {
            None => None,
            Some(PropValue::Octet(o)) => Some(o),
            Some(other) => panic!("{p:?} read as {other:?}"),
        };
        assert_eq!(octet(Property::DeliveryMode), *rp.delivery_mode());
        assert_eq!(octet(Property::Priority), *rp.priority());
        str_prop(
            get(Property::CorrelationId),
            rp.correlation_id(),
            Property::CorrelationId,
        );
        str_prop(get(Property::ReplyTo), rp.reply_to(), Property::ReplyTo);
        str_prop(
            get(Property::Expiration),
            rp.expiration(),
            Property::Expiration,
        );
        str_prop(
            get(Property::MessageId),
            rp.message_id(),
            Property::MessageId,
        );
        let ts = match get(Property::Timestamp) {
            None => None,
            Some(PropValue::Timestamp(t)) => Some(t),
            Some(other) => panic!("timestamp read as {other:?}"),
        };
        assert_eq!(ts, *rp.timestamp());
        str_prop(get(Property::Type), rp.kind(), Property::Type);
        str_prop(get(Property::UserId), rp.user_id(), Property::UserId);
        str_prop(get(Property::AppId), rp.app_id(), Property::AppId);
        str_prop(
            get(Property::ClusterId),
            rp.cluster_id(),
            Property::ClusterId,
        );

        match (get(Property::Headers), rp.headers()) {
            (None, None) => {}
            (Some(PropValue::Table(body)), Some(rt)) => match table::decode_table_body(body) {
                Ok(full) => {
                    assert_eq!(norm_table(&full), norm_amq_table(rt), "headers table");
                    for (k, rv) in rt.inner() {
                        let raw = h
                            .header(k.as_str())
                            .unwrap_or_else(|e| panic!("header({k:?}): {e:?}"))
                            .unwrap_or_else(|| panic!("header({k:?}) not found"));
                        if full.iter().filter(|(k2, _)| k2 == k.as_str()).count() == 1 {
                            let lazy = raw_to_value(raw).expect("found value decodes");
                            assert_eq!(norm(&lazy), norm_amq(rv), "header({k:?})");
                        }
                    }
                }
                Err(e) => assert!(intentional(&e), "full decode of headers: {e:?}"),
            },
            other => panic!("headers disagree: {other:?}"),
        }
    }

    // The other way round.
    let Ok(h) = ours else { return };
    if h.validate().is_err() {
        return;
    }
    let mut reference_must_decode = true;
    for p in Property::ALL {
        match h.get(p).expect("validated") {
            Some(PropValue::Str(s)) => reference_must_decode &= std::str::from_utf8(s).is_ok(),
            Some(PropValue::Table(body)) => {
                reference_must_decode &=
                    table::decode_table_body(body).is_ok() && table_keys_utf8(body)
            }
            _ => {}
        }
    }
    if reference_must_decode {
        assert!(
            reference.is_some(),
            "sluice accepts a header amq-protocol refuses"
        );
    }
});
