//! Frame splitting: check that a whole frame is buffered (cheap, no allocation), then split it
//! off as a zero-copy [`Bytes`] that still holds the original wire bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes before the payload: type, channel, size.
pub const HEADER_LEN: usize = 7;
/// Header plus the frame-end octet.
pub const OVERHEAD: usize = HEADER_LEN + 1;
/// The protocol header a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The smallest `frame_max` a peer may negotiate; also the limit before `tune-ok`.
pub const FRAME_MIN_SIZE: u32 = 4096;

/// The four frame types of AMQP 0-9-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A method frame.
    Method,
    /// A content header frame.
    Header,
    /// A content body frame.
    Body,
    /// A heartbeat frame.
    Heartbeat,
}

impl FrameKind {
    fn from_octet(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameKind::Method),
            2 => Some(FrameKind::Header),
            3 => Some(FrameKind::Body),
            8 => Some(FrameKind::Heartbeat),
            _ => None,
        }
    }

    /// The wire octet of this frame type.
    pub fn octet(self) -> u8 {
        match self {
            FrameKind::Method => 1,
            FrameKind::Header => 2,
            FrameKind::Body => 3,
            FrameKind::Heartbeat => 8,
        }
    }
}

/// One whole frame, holding its original bytes (header, payload and frame end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type.
    pub kind: FrameKind,
    /// Channel number.
    pub channel: u16,
    /// The frame exactly as it was on the wire.
    pub raw: Bytes,
}

impl Frame {
    /// The payload between the 7-byte header and the frame-end octet.
    pub fn payload(&self) -> &[u8] {
        self.raw
            .get(HEADER_LEN..self.raw.len().saturating_sub(1))
            .unwrap_or_default()
    }

    /// Build a frame from a payload (used for frames sluice injects).
    pub fn encode(kind: FrameKind, channel: u16, payload: &[u8]) -> Frame {
        let mut out = BytesMut::with_capacity(payload.len() + OVERHEAD);
        out.put_u8(kind.octet());
        out.put_u16(channel);
        out.put_u32(payload.len() as u32);
        out.put_slice(payload);
        out.put_u8(FRAME_END);
        Frame {
            kind,
            channel,
            raw: out.freeze(),
        }
    }

    /// A heartbeat frame.
    pub fn heartbeat() -> Frame {
        Frame::encode(FrameKind::Heartbeat, 0, &[])
    }
}

/// Why a frame was refused; all map to `501 FRAME_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame type octet is not one AMQP defines.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The frame is larger than the negotiated `frame_max`.
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    TooLarge {
        /// Size of the whole frame.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// The octet after the payload is not `0xCE`.
    #[error("bad frame end octet {found:#04x} on channel {channel}")]
    BadFrameEnd {
        /// Channel of the bad frame.
        channel: u16,
        /// The octet found instead of `0xCE`.
        found: u8,
    },
    /// A heartbeat frame on a channel other than 0.
    #[error("heartbeat frame on channel {0}")]
    HeartbeatChannel(u16),
}

/// Check whether `buf` starts with a whole frame. Returns its total length, `None` if more bytes
/// are needed, or an error as soon as the header shows the frame cannot be valid (before any of
/// the payload has to be buffered). `frame_max` counts the whole frame, as in the spec.
pub fn check(buf: &[u8], frame_max: u32) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        if let Some(&t) = buf.first() {
            if FrameKind::from_octet(t).is_none() {
                return Err(FrameError::UnknownType(t));
            }
        }
        return Ok(None);
    };
    let mut h = header;
    let t = h.get_u8();
    let channel = h.get_u16();
    let size = h.get_u32();
    let kind = FrameKind::from_octet(t).ok_or(FrameError::UnknownType(t))?;
    if kind == FrameKind::Heartbeat && channel != 0 {
        return Err(FrameError::HeartbeatChannel(channel));
    }
    let total = size as u64 + OVERHEAD as u64;
    if frame_max != 0 && total > frame_max as u64 {
        return Err(FrameError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    let total = total as usize;
    match buf.get(total - 1) {
        None => Ok(None),
        Some(&FRAME_END) => Ok(Some(total)),
        Some(&found) => Err(FrameError::BadFrameEnd { channel, found }),
    }
}

/// Split the next whole frame off the front of `buf`, zero-copy.
pub fn split(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    let Some(len) = check(buf, frame_max)? else {
        return Ok(None);
    };
    let raw = buf.split_to(len).freeze();
    let kind = raw
        .first()
        .copied()
        .and_then(FrameKind::from_octet)
        .ok_or(FrameError::UnknownType(0))?;
    let channel = raw
        .get(1..3)
        .and_then(|c| <[u8; 2]>::try_from(c).ok())
        .map(u16::from_be_bytes)
        .unwrap_or(0);
    Ok(Some(Frame { kind, channel, raw }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_frame(channel: u16, payload: &[u8]) -> Vec<u8> {
        Frame::encode(FrameKind::Method, channel, payload)
            .raw
            .to_vec()
    }

    #[test]
    fn splits_whole_frames_and_waits_for_partial_ones() {
        let mut wire = method_frame(1, &[0, 60, 0, 40]);
        wire.extend(method_frame(2, &[0, 20, 0, 10, 0]));
        let mut buf = BytesMut::from(&wire[..wire.len() - 3]);
        let f = split(&mut buf, 4096).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.channel, f.payload()),
            (FrameKind::Method, 1, &[0, 60, 0, 40][..])
        );
        assert_eq!(split(&mut buf, 4096).unwrap(), None);
        buf.extend_from_slice(&wire[wire.len() - 3..]);
        let f = split(&mut buf, 4096).unwrap().unwrap();
        assert_eq!(f.channel, 2);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_frame_from_header_alone() {
        // Only the 7-byte header is present: the size field already exceeds frame_max.
        let buf = [1u8, 0, 1, 0, 1, 0, 0];
        assert_eq!(
            check(&buf, 4096),
            Err(FrameError::TooLarge {
                size: 65536 + 8,
                max: 4096
            })
        );
    }

    #[test]
    fn refuses_bad_frame_end() {
        let mut wire = method_frame(3, &[0, 60, 0, 40]);
        let last = wire.len() - 1;
        wire[last] = 0;
        assert_eq!(
            check(&wire, 4096),
            Err(FrameError::BadFrameEnd {
                channel: 3,
                found: 0
            })
        );
    }

    #[test]
    fn refuses_unknown_type_on_first_byte() {
        assert_eq!(check(b"G", 4096), Err(FrameError::UnknownType(b'G')));
    }

    #[test]
    fn frame_max_zero_means_unlimited() {
        let wire = Frame::encode(FrameKind::Body, 1, &vec![7u8; 10_000]).raw;
        assert_eq!(check(&wire, 0), Ok(Some(10_008)));
    }
}
