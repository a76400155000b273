//! Helpers shared by the fuzz targets: comparing field values (floats by bit pattern, so NaN
//! equals itself), turning a lazily found [`RawValue`] into a decoded value, and normalising
//! both sluice's and `amq-protocol`'s decoded tables into one comparable shape.

use amq_protocol::types::{AMQPValue, FieldTable as AmqTable};
use sluice::protocol::amqp::table::{self, FieldTable, FieldValue, RawValue};
use sluice::protocol::amqp::wire::{Reader, WireError};
use std::collections::BTreeMap;

/// Decode a value found by `table::find` with the full decoder, by wrapping it into a one-entry
/// table body (`find` strips the length prefix of variable-size values; it is put back here).
pub fn raw_to_value(raw: RawValue<'_>) -> Result<FieldValue, WireError> {
    let mut body = vec![1u8, b'k', raw.tag];
    if matches!(raw.tag, b'S' | b'x' | b'F' | b'A') {
        body.extend_from_slice(&(raw.bytes.len() as u32).to_be_bytes());
    }
    body.extend_from_slice(raw.bytes);
    let mut t = table::decode_table_body(&body)?;
    assert_eq!(
        t.len(),
        1,
        "one-entry wrapper decoded to {} entries",
        t.len()
    );
    Ok(t.remove(0).1)
}

/// Structural equality of two decoded values; floats compare by bits.
pub fn same(a: &FieldValue, b: &FieldValue) -> bool {
    use FieldValue as V;
    match (a, b) {
        (V::F32(x), V::F32(y)) => x.to_bits() == y.to_bits(),
        (V::F64(x), V::F64(y)) => x.to_bits() == y.to_bits(),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (V::Table(x), V::Table(y)) => same_table(x, y),
        _ => a == b,
    }
}

/// Structural equality of two decoded tables (order and duplicates kept); floats by bits.
pub fn same_table(a: &FieldTable, b: &FieldTable) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
}

/// A value in a shape both decoders map onto: tables become maps (last duplicate key wins, as
/// in `amq-protocol`'s `BTreeMap`), floats become their bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Norm {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(u32),
    F64(u64),
    Decimal(u8, u32),
    LongStr(Vec<u8>),
    Bytes(Vec<u8>),
    Array(Vec<Norm>),
    Timestamp(u64),
    Table(BTreeMap<String, Norm>),
    Void,
    /// Only `amq-protocol` has a short-string value; no type tag decodes to it.
    ShortStr(String),
}

/// Normalise one of sluice's values.
pub fn norm(v: &FieldValue) -> Norm {
    use FieldValue as V;
    match v {
        V::Bool(x) => Norm::Bool(*x),
        V::I8(x) => Norm::I8(*x),
        V::U8(x) => Norm::U8(*x),
        V::I16(x) => Norm::I16(*x),
        V::U16(x) => Norm::U16(*x),
        V::I32(x) => Norm::I32(*x),
        V::U32(x) => Norm::U32(*x),
        V::I64(x) => Norm::I64(*x),
        V::F32(x) => Norm::F32(x.to_bits()),
        V::F64(x) => Norm::F64(x.to_bits()),
        V::Decimal(s, x) => Norm::Decimal(*s, *x),
        V::LongStr(b) => Norm::LongStr(b.clone()),
        V::Bytes(b) => Norm::Bytes(b.clone()),
        V::Array(items) => Norm::Array(items.iter().map(norm).collect()),
        V::Timestamp(x) => Norm::Timestamp(*x),
        V::Table(t) => Norm::Table(norm_table(t)),
        V::Void => Norm::Void,
    }
}

/// Normalise one of sluice's tables: later duplicates replace earlier ones.
pub fn norm_table(t: &FieldTable) -> BTreeMap<String, Norm> {
    t.iter().map(|(k, v)| (k.clone(), norm(v))).collect()
}

/// Normalise one of `amq-protocol`'s values.
pub fn norm_amq(v: &AMQPValue) -> Norm {
    match v {
        AMQPValue::Boolean(x) => Norm::Bool(*x),
        AMQPValue::ShortShortInt(x) => Norm::I8(*x),
        AMQPValue::ShortShortUInt(x) => Norm::U8(*x),
        AMQPValue::ShortInt(x) => Norm::I16(*x),
        AMQPValue::ShortUInt(x) => Norm::U16(*x),
        AMQPValue::LongInt(x) => Norm::I32(*x),
        AMQPValue::LongUInt(x) => Norm::U32(*x),
        AMQPValue::LongLongInt(x) => Norm::I64(*x),
        AMQPValue::Float(x) => Norm::F32(x.to_bits()),
        AMQPValue::Double(x) => Norm::F64(x.to_bits()),
        AMQPValue::DecimalValue(d) => Norm::Decimal(d.scale, d.value),
        AMQPValue::ShortString(s) => Norm::ShortStr(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Norm::LongStr(s.as_bytes().to_vec()),
        AMQPValue::FieldArray(a) => Norm::Array(a.as_slice().iter().map(norm_amq).collect()),
        AMQPValue::Timestamp(x) => Norm::Timestamp(*x),
        AMQPValue::FieldTable(t) => Norm::Table(norm_amq_table(t)),
        AMQPValue::ByteArray(b) => Norm::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => Norm::Void,
    }
}

/// Normalise one of `amq-protocol`'s tables.
pub fn norm_amq_table(t: &AmqTable) -> BTreeMap<String, Norm> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), norm_amq(v)))
        .collect()
}

/// Whether every key of a table body, nested tables included, and every other field the
/// reference decoder requires to be UTF-8 is UTF-8. Only meaningful on a body sluice's full
/// decoder accepted (structure is not re-checked beyond what the walk needs).
pub fn table_keys_utf8(body: &[u8]) -> bool {
    let mut r = Reader::new(body);
    while r.remaining() > 0 {
        let Ok(k) = r.short_bytes("key") else {
            return false;
        };
        if std::str::from_utf8(k).is_err() || !value_keys_utf8(&mut r) {
            return false;
        }
    }
    true
}

fn value_keys_utf8(r: &mut Reader<'_>) -> bool {
    let Ok(tag) = r.u8("tag") else { return false };
    let fixed = match tag {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'l' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => return r.long_bytes("v").is_ok(),
        b'F' => return r.long_bytes("v").is_ok_and(table_keys_utf8),
        b'A' => {
            let Ok(items) = r.long_bytes("v") else {
                return false;
            };
            let mut ir = Reader::new(items);
            while ir.remaining() > 0 {
                if !value_keys_utf8(&mut ir) {
                    return false;
                }
            }
            return true;
        }
        _ => return false,
    };
    r.skip(fixed, "v").is_ok()
}

/// A little-endian cursor over fuzz input, for targets that derive parameters from the bytes.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// Next byte, or 0 once exhausted.
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// Next u32 (big-endian), zero-padded.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}
