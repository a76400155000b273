//! Batched writes: small frames are copied into one buffer, large ones are queued by reference,
//! and the whole batch goes out with vectored writes (one syscall per batch in the common case).

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Frames smaller than this are copied; larger ones are queued as zero-copy references.
const COPY_BELOW: usize = 2048;

/// Bytes waiting to be written to one socket.
#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    small: BytesMut,
    len: usize,
}

impl OutQueue {
    /// Queue bytes.
    pub fn push(&mut self, b: &Bytes) {
        self.len += b.len();
        if b.len() < COPY_BELOW {
            if self.small.capacity() - self.small.len() < b.len() {
                self.small.reserve(16 * 1024);
            }
            self.small.extend_from_slice(b);
        } else {
            self.seal();
            self.chunks.push_back(b.clone());
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
    }

    /// Write everything queued.
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.seal();
        while !self.chunks.is_empty() {
            let n = {
                let iov: Vec<IoSlice<'_>> = self
                    .chunks
                    .iter()
                    .take(64)
                    .map(|c| IoSlice::new(c))
                    .collect();
                w.write_vectored(&iov).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.len = self.len.saturating_sub(n);
            let mut left = n;
            while left > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        self.len = 0;
        // Give the copy buffer back once everything is written: an idle connection then holds no
        // write buffer at all (two per connection were 32 KiB of its memory), and a busy one
        // takes a fresh one per batch from the allocator's thread cache.
        if self.small.is_empty() && self.small.capacity() > 0 {
            self.small = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_and_large_frames_come_out_in_order() {
        let mut q = OutQueue::default();
        let a = Bytes::from_static(b"abc");
        let big = Bytes::from(vec![7u8; 5000]);
        let z = Bytes::from_static(b"z");
        q.push(&a);
        q.push(&big);
        q.push(&z);
        assert_eq!(q.len(), 5004);
        let mut out: Vec<u8> = Vec::new();
        q.flush(&mut out).await.unwrap();
        assert_eq!(out.len(), 5004);
        assert_eq!(&out[..3], b"abc");
        assert_eq!(out[5003], b'z');
        assert!(q.is_empty());
    }
}
