//! The frame splitter on an arbitrary byte stream.
//!
//! Input: one byte picking `frame_max` (0 = unlimited, 4096, 131072, or the next four bytes),
//! one byte picking the read size, then the stream. The stream is split twice: all at once, and
//! fed in reads of that size the way a socket delivers it. Both must yield the same frames and
//! the same error, and every frame must be well formed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::amqp::frame::{self, Frame, FrameError, FrameKind, FRAME_END, HEADER_LEN};
use sluice_fuzz::Input;

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<FrameError>,
    consumed: usize,
}

fn check_frame(f: &Frame, frame_max: u32) {
    let raw = &f.raw[..];
    assert!(raw.len() >= HEADER_LEN + 1);
    let size = u32::from_be_bytes([raw[3], raw[4], raw[5], raw[6]]) as usize;
    assert_eq!(
        raw.len(),
        HEADER_LEN + size + 1,
        "raw length is not 7 + size + 1"
    );
    assert_eq!(raw[raw.len() - 1], FRAME_END);
    assert_eq!(raw[0], f.kind.octet());
    assert_eq!(u16::from_be_bytes([raw[1], raw[2]]), f.channel);
    assert_eq!(f.payload(), &raw[HEADER_LEN..raw.len() - 1]);
    if frame_max != 0 {
        assert!(
            raw.len() as u64 <= frame_max as u64,
            "frame exceeds frame_max"
        );
    }
    if f.kind == FrameKind::Heartbeat {
        assert_eq!(f.channel, 0);
    }
}

/// Split `stream` delivered in reads of `chunk` bytes, the way a connection does: split while
/// whole frames are buffered, then read more.
fn run(stream: &[u8], chunk: usize, frame_max: u32) -> Outcome {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut consumed = 0;
    let mut reads = stream.chunks(chunk);
    loop {
        // What `check` says must match what `split` does.
        let checked = frame::check(&buf, frame_max);
        match frame::split(&mut buf, frame_max) {
            Ok(Some(f)) => {
                assert_eq!(checked, Ok(Some(f.raw.len())));
                check_frame(&f, frame_max);
                consumed += f.raw.len();
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(checked, Ok(None));
                match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None => break,
                }
            }
            Err(e) => {
                assert_eq!(checked, Err(e.clone()));
                if let FrameError::TooLarge { size, max } = e {
                    assert!(size > max as u64 && max == frame_max);
                }
                return Outcome {
                    frames,
                    error: Some(e),
                    consumed,
                };
            }
        }
    }
    Outcome {
        frames,
        error: None,
        consumed,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let frame_max = match input.byte() & 3 {
        0 => 0,
        1 => frame::FRAME_MIN_SIZE,
        2 => 131_072,
        _ => input.u32(),
    };
    let chunk = input.byte() as usize + 1;
    let stream = input.0;

    let whole = run(stream, stream.len().max(1), frame_max);
    assert!(whole.consumed <= stream.len());
    // The frames are the stream's own bytes, back to back, from its start.
    let mut at = 0;
    for f in &whole.frames {
        assert_eq!(&stream[at..at + f.raw.len()], &f.raw[..]);
        at += f.raw.len();
    }
    assert_eq!(at, whole.consumed);

    let pieces = run(stream, chunk, frame_max);
    assert_eq!(whole, pieces, "result depends on how the stream was read");
});
