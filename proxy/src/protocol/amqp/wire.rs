//! Bounds-checked readers and writers for AMQP primitive types.

use bytes::{BufMut, BytesMut};

/// A primitive could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended before the field did.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field table value had a type tag sluice does not know.
    #[error("unknown field value type {0:#04x}")]
    UnknownFieldType(u8),
    /// A string was not valid UTF-8 where UTF-8 is required.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// Field tables nest deeper than sluice allows.
    #[error("field table nested too deeply")]
    TooDeep,
    /// A string is too long to encode as a short string.
    #[error("short string longer than 255 bytes")]
    ShortStrTooLong,
}

/// A cursor over a byte slice; every read checks bounds.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Read from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Number of bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Read a fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Read an octet.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    /// Read a big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Read a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Read a big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Read a short string (u8 length) as raw bytes.
    pub fn short_bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u8(what)? as usize;
        self.bytes(n, what)
    }

    /// Read a short string that must be UTF-8.
    pub fn short_str(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.short_bytes(what)?).map_err(|_| WireError::Utf8(what))
    }

    /// Read a long string (u32 length) as raw bytes.
    pub fn long_bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.bytes(n, what)
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, n: usize, what: &'static str) -> Result<(), WireError> {
        self.bytes(n, what).map(|_| ())
    }
}

/// Append a short string; errors if longer than 255 bytes.
pub fn put_short_str(out: &mut BytesMut, s: &str) -> Result<(), WireError> {
    let len = u8::try_from(s.len()).map_err(|_| WireError::ShortStrTooLong)?;
    out.put_u8(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// Append a short string, cutting it at 255 bytes on a character boundary.
/// Used for reply texts sluice composes, which must never fail to encode.
pub fn put_short_str_lossy(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let text = s.get(..end).unwrap_or_default();
    out.put_u8(text.len() as u8);
    out.put_slice(text.as_bytes());
}

/// Append a long string.
pub fn put_long_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = Reader::new(&[0, 5, 1]);
        assert_eq!(r.u16("x"), Ok(5));
        assert_eq!(r.u16("y"), Err(WireError::Truncated("y")));
        assert_eq!(r.u8("z"), Ok(1));
    }

    #[test]
    fn lossy_short_string_cuts_on_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let mut out = BytesMut::new();
        put_short_str_lossy(&mut out, &long);
        assert_eq!(out[0], 254);
        assert!(std::str::from_utf8(&out[1..]).is_ok());
    }
}
