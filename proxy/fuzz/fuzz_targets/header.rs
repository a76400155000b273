//! Content header payloads: the lazy property scan (`get`, `get_str`, `header`, `validate`).
//!
//! Checks that the lazy scan is consistent with itself and with the full table decoder:
//! `validate` succeeding means every property reads; a property that reads means every present
//! property before it reads; `header(key)` finds the first entry with that key, as decoded by
//! `table::decode_table_body`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::header::{ContentHeader, PropValue, Property};
use sluice::protocol::amqp::table;
use sluice_fuzz::{raw_to_value, same};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = ContentHeader::parse(data) else {
        assert!(data.len() < 14);
        return;
    };
    assert_eq!(h.class, u16::from_be_bytes([data[0], data[1]]));
    let valid = h.validate().is_ok();

    let mut earlier_ok = true;
    let mut headers_body = None;
    for p in Property::ALL {
        assert_eq!(Property::from_name(p.name()), Some(p));
        let got = h.get(p);
        let text = h.get_str(p);
        match &got {
            Ok(None) => assert!(!h.has(p)),
            Ok(Some(v)) => {
                assert!(h.has(p));
                assert!(
                    earlier_ok,
                    "{p:?} read although an earlier property did not"
                );
                match (p, v) {
                    (Property::Headers, PropValue::Table(body)) => headers_body = Some(*body),
                    (Property::DeliveryMode | Property::Priority, PropValue::Octet(_)) => {}
                    (Property::Timestamp, PropValue::Timestamp(_)) => {}
                    (_, PropValue::Str(s)) => assert!(s.len() <= 255),
                    _ => panic!("{p:?} read as {v:?}"),
                }
            }
            Err(_) => {
                assert!(h.has(p));
                assert!(!valid, "validate() passed but {p:?} does not read");
                earlier_ok = false;
            }
        }
        // get_str is get, as text.
        match (&got, &text) {
            (Ok(Some(PropValue::Table(_))), Ok(None)) | (Ok(None), Ok(None)) | (Err(_), Err(_)) => {
            }
            (Ok(Some(_)), Ok(Some(_))) => {}
            other => panic!("get and get_str disagree on {p:?}: {other:?}"),
        }
    }

    // A few fixed keys (the ones identity sources use most) and one taken from the input.
    let tail_key = data
        .len()
        .checked_sub(8)
        .map(|s| String::from_utf8_lossy(&data[s..]).into_owned());
    for key in ["task", "id", "x-producer", ""]
        .into_iter()
        .chain(tail_key.as_deref())
    {
        let found = h.header(key);
        if valid {
            assert!(
                found.is_ok(),
                "validate() passed but header({key:?}) failed"
            );
        }
        if let Ok(Some(raw)) = found {
            let _ = raw.as_text();
            // What the lazy scan found is what the full decoder sees first under that key.
            let body = headers_body.expect("header() found a key without a headers property");
            // (A key with U+FFFD may also be the lossy repair of an earlier, invalid key.)
            if let (false, Ok(full)) = (key.contains('\u{FFFD}'), table::decode_table_body(body)) {
                let first = full.iter().find(|(k, _)| k == key).map(|(_, v)| v);
                let first = first.expect("header() found a key the full decode lacks");
                let lazy = raw_to_value(raw).expect("found value does not decode");
                assert!(same(first, &lazy), "{first:?} != {lazy:?}");
            }
        }
    }

    // Every key the full decoder sees (without lossy UTF-8 repair) is found by the lazy scan.
    if let (true, Some(body)) = (valid, headers_body) {
        if let Ok(full) = table::decode_table_body(body) {
            for (k, v) in &full {
                if k.contains('\u{FFFD}') {
                    continue;
                }
                let raw = h
                    .header(k)
                    .expect("valid")
                    .expect("key of full decode not found");
                let first = full
                    .iter()
                    .find(|(k2, _)| k2 == k)
                    .map(|(_, v)| v)
                    .unwrap_or(v);
                assert!(same(first, &raw_to_value(raw).expect("decodes")));
            }
        }
    }
});
