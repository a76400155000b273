//! Field tables: full decode, encode, lazy `find` and allocation-free `validate`.
//!
//! Input: a table body (no length prefix). Checks:
//! * `validate` refusing means the full decode refuses too (it checks a subset);
//! * decode → encode → decode gives the same table, and encoding is then a fixed point;
//! * `decode_table` (length-prefixed) agrees with `decode_table_body`;
//! * `find(key)` returns the first entry with that key, as the full decode sees it;
//! * `RawValue::as_text` agrees with `FieldValue::to_text`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::table::{self, FieldValue};
use sluice::protocol::amqp::wire::{Reader, WireError};
use sluice_fuzz::{raw_to_value, same, same_table};

fn visit_text(v: &FieldValue) {
    let _ = v.to_text();
    match v {
        FieldValue::Array(items) => items.iter().for_each(visit_text),
        FieldValue::Table(t) => t.iter().for_each(|(_, v)| visit_text(v)),
        _ => {}
    }
}

/// Longest key anywhere in the table, nested tables and arrays included.
fn longest_key(t: &table::FieldTable) -> usize {
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

fuzz_target!(|body: &[u8]| {
    let decoded = table::decode_table_body(body);
    let valid = table::validate(body);
    if decoded.is_ok() {
        assert_eq!(valid, Ok(()), "full decode accepts what validate refuses");
    }

    // With the length prefix, through a Reader: same result, prefix and body consumed.
    let mut prefixed = (body.len() as u32).to_be_bytes().to_vec();
    prefixed.extend_from_slice(body);
    let mut r = Reader::new(&prefixed);
    let again = table::decode_table(&mut r);
    match (&decoded, &again) {
        (Ok(a), Ok(b)) => {
            assert!(same_table(a, b));
            assert_eq!(r.remaining(), 0);
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        other => panic!("decode_table and decode_table_body disagree: {other:?}"),
    }

    // A key that is not in the table is not found.
    if let (Ok(()), Ok(t)) = (&valid, &decoded) {
        let absent = "\u{1}sluice-fuzz-absent";
        if !t.iter().any(|(k, _)| k == absent) {
            assert_eq!(table::find(body, absent), Ok(None));
        }
    }

    let Ok(t) = decoded else { return };
    t.iter().for_each(|(_, v)| visit_text(v));

    // find() agrees with the full decode on the first entry of every key. Keys holding U+FFFD
    // are skipped: the full decode repairs invalid UTF-8 keys lossily, find() matches bytes.
    for (k, _) in &t {
        if k.contains('\u{FFFD}') {
            continue;
        }
        let first = &t.iter().find(|(k2, _)| k2 == k).expect("present").1;
        let raw = table::find(body, k)
            .expect("validated table")
            .expect("key of the full decode not found");
        let lazy = raw_to_value(raw).expect("found value decodes");
        assert!(same(first, &lazy), "find({k:?}): {lazy:?} != {first:?}");
        if let Some(text) = raw.as_text() {
            assert_eq!(Some(text), first.to_text(), "as_text vs to_text for {k:?}");
        }
    }

    // Round trip. Encoding only fails when a lossily repaired key outgrew 255 bytes.
    let mut out = BytesMut::new();
    match table::encode_table(&mut out, &t) {
        Ok(()) => {}
        Err(WireError::ShortStrTooLong) => {
            assert!(longest_key(&t) > 255, "ShortStrTooLong without a long key");
            return;
        }
        Err(e) => panic!("encode failed: {e:?}"),
    }
    assert_eq!(
        u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize,
        out.len() - 4
    );
    let round = table::decode_table_body(&out[4..]).expect("encoded table decodes");
    assert!(same_table(&t, &round), "round trip changed the table");
    let mut out2 = BytesMut::new();
    table::encode_table(&mut out2, &round).expect("re-encode");
    assert_eq!(out, out2, "encoding is not a fixed point");
});
