//! `connection.start-ok` arguments: decode, the capability rewrite sluice does, encode, and the
//! SASL user name (`PLAIN`, `AMQPLAIN`).
//!
//! Checks that a decoded start-ok re-encodes to something that decodes to the same start-ok,
//! that the capability rewrite keeps the credentials, and that `sasl_user` never panics on the
//! raw input under either mechanism and agrees with a direct reading of the response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::handshake::{sasl_user, StartOk};
use sluice::protocol::amqp::table::{self, FieldTable, FieldValue};
use sluice::protocol::amqp::wire::WireError;
use sluice_fuzz::same_table;

fn same_start_ok(a: &StartOk, b: &StartOk) -> bool {
    same_table(&a.client_properties, &b.client_properties)
        && a.mechanism == b.mechanism
        && a.response == b.response
        && a.locale == b.locale
}

fn longest_key(t: &FieldTable) -> usize {
    fn in_value(v: &FieldValue) -> usize {
        match v {
            FieldValue::Table(t) => longest_key(t),
            FieldValue::Array(items) => items.iter().map(in_value).max().unwrap_or(0),
            _ => 0,
        }
    }
    t.iter()
        .map(|(k, v)| k.len().max(in_value(v)))
        .max()
        .unwrap_or(0)
}

/// Encode and decode again; `None` when encoding fails for the one allowed reason (a string
/// repaired from invalid UTF-8 outgrew 255 bytes).
fn round_trip(s: &StartOk) -> Option<StartOk> {
    match s.encode() {
        Ok(p) => {
            assert_eq!(&p[..4], &[0, 10, 0, 11], "start-ok method id");
            Some(StartOk::decode(&p[4..]).expect("encoded start-ok decodes"))
        }
        Err(WireError::ShortStrTooLong) => {
            assert!(
                s.mechanism.len() > 255
                    || s.locale.len() > 255
                    || longest_key(&s.client_properties) > 255,
                "ShortStrTooLong without a long string"
            );
            None
        }
        Err(e) => panic!("encode: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The response alone, as each mechanism reads it.
    let plain = sasl_user("PLAIN", data);
    let mut parts = data.split(|&b| b == 0);
    let expected = match (parts.next(), parts.next()) {
        (Some(_), Some(authcid)) => Some(String::from_utf8_lossy(authcid).into_owned()),
        _ => None,
    };
    assert_eq!(plain, expected);
    let amqplain = sasl_user("AMQPLAIN", data);
    if amqplain.is_some() {
        assert!(matches!(table::find(data, "LOGIN"), Ok(Some(_))));
    }
    assert_eq!(sasl_user("EXTERNAL", data), None);

    let Ok(s) = StartOk::decode(data) else { return };
    let _ = s.user();
    let _ = s.client_property("connection_name");
    let _ = s.client_property("product");
    let had_blocked = s.has_capability("connection.blocked");

    if let Some(again) = round_trip(&s) {
        assert!(
            same_start_ok(&s, &again),
            "start-ok changed in a round trip"
        );
        // Stable from there on.
        let third = round_trip(&again).expect("re-encode");
        assert!(same_start_ok(&again, &third));
    }

    // The rewrite sluice applies before forwarding.
    let mut rewritten = s.clone();
    rewritten.set_capability("connection.blocked");
    assert!(rewritten.has_capability("connection.blocked"));
    if had_blocked {
        assert!(
            same_start_ok(&s, &rewritten),
            "setting a set capability changed the start-ok"
        );
    }
    assert_eq!(rewritten.user(), s.user());
    if let Some(again) = round_trip(&rewritten) {
        assert!(again.has_capability("connection.blocked"));
        assert_eq!(again.response, s.response, "credentials changed");
        assert_eq!(again.mechanism, s.mechanism);
    }
});
