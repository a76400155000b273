//! AMQP field tables: a lazy key lookup for the hot path (no allocation) and a full decode and
//! encode for the handshake, where sluice rewrites `client_properties`.

use super::wire::{put_long_bytes, put_short_str, Reader, WireError};
use bytes::{BufMut, BytesMut};
use std::borrow::Cow;

/// Deepest nesting of tables and arrays sluice decodes.
const MAX_DEPTH: usize = 16;

/// A decoded field value (RabbitMQ's dialect of the type tags).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: scale and unscaled value.
    Decimal(u8, u32),
    /// `S`: bytes, usually UTF-8.
    LongStr(Vec<u8>),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
    /// `x`
    Bytes(Vec<u8>),
}

/// A decoded field table, in wire order.
pub type FieldTable = Vec<(String, FieldValue)>;

impl FieldValue {
    /// The value as text, for identities and logs: strings as they are, numbers formatted.
    pub fn to_text(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            FieldValue::LongStr(b) | FieldValue::Bytes(b) => String::from_utf8_lossy(b),
            FieldValue::Bool(v) => Cow::Owned(v.to_string()),
            FieldValue::I8(v) => Cow::Owned(v.to_string()),
            FieldValue::U8(v) => Cow::Owned(v.to_string()),
            FieldValue::I16(v) => Cow::Owned(v.to_string()),
            FieldValue::U16(v) => Cow::Owned(v.to_string()),
            FieldValue::I32(v) => Cow::Owned(v.to_string()),
            FieldValue::U32(v) => Cow::Owned(v.to_string()),
            FieldValue::I64(v) => Cow::Owned(v.to_string()),
            FieldValue::F32(v) => Cow::Owned(v.to_string()),
            FieldValue::F64(v) => Cow::Owned(v.to_string()),
            FieldValue::Timestamp(v) => Cow::Owned(v.to_string()),
            FieldValue::Decimal(..)
            | FieldValue::Array(_)
            | FieldValue::Table(_)
            | FieldValue::Void => return None,
        })
    }
}

/// Decode a table body (without its u32 length prefix).
pub fn decode_table_body(body: &[u8]) -> Result<FieldTable, WireError> {
    decode_table_at(body, 0)
}

fn decode_table_at(body: &[u8], depth: usize) -> Result<FieldTable, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep);
    }
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let key = String::from_utf8_lossy(r.short_bytes("field name")?).into_owned();
        let value = decode_value(&mut r, depth)?;
        out.push((key, value));
    }
    Ok(out)
}

/// Decode a table with its u32 length prefix.
pub fn decode_table(r: &mut Reader<'_>) -> Result<FieldTable, WireError> {
    let body = r.long_bytes("field table")?;
    decode_table_body(body)
}

fn decode_value(r: &mut Reader<'_>, depth: usize) -> Result<FieldValue, WireError> {
    let tag = r.u8("field type")?;
    Ok(match tag {
        b't' => FieldValue::Bool(r.u8("bool")? != 0),
        b'b' => FieldValue::I8(r.u8("i8")? as i8),
        b'B' => FieldValue::U8(r.u8("u8")?),
        b's' => FieldValue::I16(r.u16("i16")? as i16),
        b'u' => FieldValue::U16(r.u16("u16")?),
        b'I' => FieldValue::I32(r.u32("i32")? as i32),
        b'i' => FieldValue::U32(r.u32("u32")?),
        b'l' => FieldValue::I64(r.u64("i64")? as i64),
        b'f' => FieldValue::F32(f32::from_bits(r.u32("f32")?)),
        b'd' => FieldValue::F64(f64::from_bits(r.u64("f64")?)),
        b'D' => FieldValue::Decimal(r.u8("decimal")?, r.u32("decimal")?),
        b'S' => FieldValue::LongStr(r.long_bytes("long string")?.to_vec()),
        b'x' => FieldValue::Bytes(r.long_bytes("byte array")?.to_vec()),
        b'T' => FieldValue::Timestamp(r.u64("timestamp")?),
        b'V' => FieldValue::Void,
        b'F' => FieldValue::Table(decode_table_at(r.long_bytes("field table")?, depth + 1)?),
        b'A' => {
            if depth + 1 > MAX_DEPTH {
                return Err(WireError::TooDeep);
            }
            let mut items = Reader::new(r.long_bytes("field array")?);
            let mut out = Vec::new();
            while items.remaining() > 0 {
                out.push(decode_value(&mut items, depth + 1)?);
            }
            FieldValue::Array(out)
        }
        other => return Err(WireError::UnknownFieldType(other)),
    })
}

/// Encode a table with its u32 length prefix.
pub fn encode_table(out: &mut BytesMut, table: &FieldTable) -> Result<(), WireError> {
    let len_at = out.len();
    out.put_u32(0);
    for (k, v) in table {
        put_short_str(out, k)?;
        encode_value(out, v)?;
    }
    let len = (out.len() - len_at - 4) as u32;
    if let Some(slot) = out.get_mut(len_at..len_at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

fn encode_value(out: &mut BytesMut, v: &FieldValue) -> Result<(), WireError> {
    match v {
        FieldValue::Bool(b) => {
            out.put_u8(b't');
            out.put_u8(*b as u8);
        }
        FieldValue::I8(x) => {
            out.put_u8(b'b');
            out.put_i8(*x);
        }
        FieldValue::U8(x) => {
            out.put_u8(b'B');
            out.put_u8(*x);
        }
        FieldValue::I16(x) => {
            out.put_u8(b's');
            out.put_i16(*x);
        }
        FieldValue::U16(x) => {
            out.put_u8(b'u');
            out.put_u16(*x);
        }
        FieldValue::I32(x) => {
            out.put_u8(b'I');
            out.put_i32(*x);
        }
        FieldValue::U32(x) => {
            out.put_u8(b'i');
            out.put_u32(*x);
        }
        FieldValue::I64(x) => {
            out.put_u8(b'l');
            out.put_i64(*x);
        }
        FieldValue::F32(x) => {
            out.put_u8(b'f');
            out.put_f32(*x);
        }
        FieldValue::F64(x) => {
            out.put_u8(b'd');
            out.put_f64(*x);
        }
        FieldValue::Decimal(s, x) => {
            out.put_u8(b'D');
            out.put_u8(*s);
            out.put_u32(*x);
        }
        FieldValue::LongStr(b) => {
            out.put_u8(b'S');
            put_long_bytes(out, b);
        }
        FieldValue::Bytes(b) => {
            out.put_u8(b'x');
            put_long_bytes(out, b);
        }
        FieldValue::Timestamp(x) => {
            out.put_u8(b'T');
            out.put_u64(*x);
        }
        FieldValue::Void => out.put_u8(b'V'),
        FieldValue::Table(t) => {
            out.put_u8(b'F');
            encode_table(out, t)?;
        }
        FieldValue::Array(items) => {
            out.put_u8(b'A');
            let len_at = out.len();
            out.put_u32(0);
            for item in items {
                encode_value(out, item)?;
            }
            let len = (out.len() - len_at - 4) as u32;
            if let Some(slot) = out.get_mut(len_at..len_at + 4) {
                slot.copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    Ok(())
}

/// A value found by the lazy scan, still borrowing the wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawValue<'a> {
    /// The type tag.
    pub tag: u8,
    /// The encoded value after the tag (for strings: without the length prefix).
    pub bytes: &'a [u8],
}

impl<'a> RawValue<'a> {
    /// The value as text when it is a string or an integer; borrowed for strings.
    pub fn as_text(&self) -> Option<Cow<'a, str>> {
        let mut r = Reader::new(self.bytes);
        let s = match self.tag {
            b'S' | b'x' => return Some(String::from_utf8_lossy(self.bytes)),
            b't' => (r.u8("").ok()? != 0).to_string(),
            b'b' => (r.u8("").ok()? as i8).to_string(),
            b'B' => r.u8("").ok()?.to_string(),
            b's' => (r.u16("").ok()? as i16).to_string(),
            b'u' => r.u16("").ok()?.to_string(),
            b'I' => (r.u32("").ok()? as i32).to_string(),
            b'i' => r.u32("").ok()?.to_string(),
            b'l' => (r.u64("").ok()? as i64).to_string(),
            b'T' => r.u64("").ok()?.to_string(),
            _ => return None,
        };
        Some(Cow::Owned(s))
    }
}

/// Skip one value, returning it raw.
fn skip_value<'a>(r: &mut Reader<'a>) -> Result<RawValue<'a>, WireError> {
    let tag = r.u8("field type")?;
    let fixed = match tag {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'l' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' | b'F' | b'A' => {
            return Ok(RawValue {
                tag,
                bytes: r.long_bytes("field value")?,
            })
        }
        other => return Err(WireError::UnknownFieldType(other)),
    };
    Ok(RawValue {
        tag,
        bytes: r.bytes(fixed, "field value")?,
    })
}

/// Find `key` in a table body (no length prefix) without decoding other values.
/// Only the keys up to the match are visited; nested tables are skipped whole.
pub fn find<'a>(body: &'a [u8], key: &str) -> Result<Option<RawValue<'a>>, WireError> {
    let mut r = Reader::new(body);
    while r.remaining() > 0 {
        let k = r.short_bytes("field name")?;
        let v = skip_value(&mut r)?;
        if k == key.as_bytes() {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Check a table body is well formed (every key and value in bounds, known tags), allocation-free.
pub fn validate(body: &[u8]) -> Result<(), WireError> {
    let mut r = Reader::new(body);
    while r.remaining() > 0 {
        r.short_bytes("field name")?;
        skip_value(&mut r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FieldTable {
        vec![
            (
                "task".into(),
                FieldValue::LongStr(b"reports.rebuild".to_vec()),
            ),
            ("retries".into(), FieldValue::I32(3)),
            (
                "nested".into(),
                FieldValue::Table(vec![("x".into(), FieldValue::Bool(true))]),
            ),
            (
                "list".into(),
                FieldValue::Array(vec![FieldValue::U8(1), FieldValue::Void]),
            ),
            ("id".into(), FieldValue::LongStr(b"abc-123".to_vec())),
        ]
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut out = BytesMut::new();
        encode_table(&mut out, &sample()).unwrap();
        let mut r = Reader::new(&out);
        assert_eq!(decode_table(&mut r).unwrap(), sample());
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn lazy_find_agrees_with_full_decode() {
        let mut out = BytesMut::new();
        encode_table(&mut out, &sample()).unwrap();
        let body = &out[4..];
        assert_eq!(
            find(body, "id").unwrap().unwrap().as_text().unwrap(),
            "abc-123"
        );
        assert_eq!(
            find(body, "retries").unwrap().unwrap().as_text().unwrap(),
            "3"
        );
        assert_eq!(find(body, "missing").unwrap(), None);
        assert!(validate(body).is_ok());
    }

    #[test]
    fn truncated_and_unknown_values_are_errors() {
        let mut out = BytesMut::new();
        encode_table(&mut out, &sample()).unwrap();
        let body = &out[4..out.len() - 2];
        assert!(validate(body).is_err());
        assert!(decode_table_body(body).is_err());
        assert_eq!(
            validate(&[1, b'k', b'Z']),
            Err(WireError::UnknownFieldType(b'Z'))
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        // 100 nested arrays: each is 'A' + u32 len + inner.
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..100 {
            let mut v = vec![b'A'];
            v.extend((inner.len() as u32).to_be_bytes());
            v.extend(&inner);
            inner = v;
        }
        let mut body = vec![1, b'k'];
        body.extend(inner);
        assert_eq!(decode_table_body(&body), Err(WireError::TooDeep));
    }
}
