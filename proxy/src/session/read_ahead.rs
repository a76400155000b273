//! Reading a client whose publishes wait, a little at a time, so that its TCP receive window
//! keeps opening: shared by the AMQP and Redis sessions, which both pace a producer by reading
//! it no faster than its quota.

use crate::admin::metrics::Limit;
use crate::admin::ListenerStats;
use crate::runtime::{BudgetShare, Runtime};
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tracing::debug;

/// While a connection's publishes wait, sluice still reads it this often, this much at a time
/// (up to `max_read_ahead`). Not reading lets the client's TCP receive window shut, and Linux
/// aborts a socket whose peer's window stays shut longer than its `TCP_USER_TIMEOUT` (py-amqp,
/// Celery's AMQP client, sets 1 s), even though every zero-window probe is answered. A read
/// reopens the window only once it frees a whole segment (64 KiB on loopback, where a sidecar's
/// clients are) plus the kernel's per-buffer overhead. In trials (`benches/drill/zero_window.py`)
/// 128 KiB every 250 ms kept such a client connected every time; 16 KiB every 250 ms never did,
/// and 64-96 KiB every 400 ms or 256 KiB every 800 ms did only some of the time.
pub(crate) const READ_AHEAD_EVERY: Duration = Duration::from_millis(200);
pub(crate) const READ_AHEAD_CHUNK: u64 = 128 * 1024;

/// Reads made while the connection's publishes wait.
pub(crate) struct ReadAhead {
    /// Bytes of the process-wide budget taken for them; given back once the pump has processed
    /// what they read.
    pub reserved: u64,
    /// The last read of the client's socket, paused or not.
    pub last: Instant,
    /// The client closed its side (seen by one of these reads).
    pub eof: bool,
    /// `max_read_ahead` was reached during this wait (counted once per wait).
    pub full: bool,
}

impl ReadAhead {
    pub(crate) fn new() -> Self {
        ReadAhead {
            reserved: 0,
            last: Instant::now(),
            eof: false,
            full: false,
        }
    }

    /// Give back the budget taken for reads ahead whose bytes were processed: what is left
    /// unprocessed in `buf` is all they can still account for.
    fn settle(&mut self, buf: &BytesMut, budget: &mut BudgetShare) {
        let done = self.reserved.saturating_sub(buf.len() as u64);
        if done > 0 {
            budget.release(done);
            self.reserved -= done;
        }
    }

    /// The pump reads normally again: settle, and count a new stop at the cap next time.
    pub(crate) fn resume(&mut self, buf: &BytesMut, budget: &mut BudgetShare) {
        self.settle(buf, budget);
        self.full = false;
    }

    /// One read of a client whose publishes wait, after giving back what was processed: no
    /// sooner than [`READ_AHEAD_EVERY`] after the last read, at most [`READ_AHEAD_CHUNK`] and
    /// never past `max_read_ahead` unprocessed bytes, and only with room in the process-wide
    /// budget. Never completes while no read is allowed (the client closed, `max_read_ahead` is
    /// 0 or reached), so it fits as a `select!` branch beside whatever the connection waits for.
    /// Cancel-safe: it reads nothing unless it completes.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &mut self,
        rt: &Runtime,
        stats: &ListenerStats,
        client: &mut R,
        buf: &mut BytesMut,
        budget: &mut BudgetShare,
    ) -> std::io::Result<()> {
        self.settle(buf, budget);
        let Some((max, max_total)) = self.bounds(rt, stats, buf) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(self.last + READ_AHEAD_EVERY).await;
        let n = READ_AHEAD_CHUNK.min(max.saturating_sub(buf.len() as u64));
        if n == 0 || !budget.try_take(n, max_total) {
            // Full, or no room anywhere: try again a period later.
            self.last = Instant::now();
            return Ok(());
        }
        self.reserved += n;
        buf.reserve(n as usize);
        let got = client.read_buf(&mut (&mut *buf).limit(n as usize)).await?;
        self.last = Instant::now();
        if got == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// Whether to read ahead now, and if so under which bounds (`max_read_ahead`,
    /// `max_buffered_total`). Counts the first time in a wait that `max_read_ahead` stops it.
    fn bounds(
        &mut self,
        rt: &Runtime,
        stats: &ListenerStats,
        buf: &BytesMut,
    ) -> Option<(u64, u64)> {
        if self.eof {
            return None;
        }
        let active = rt.active();
        let limits = &active.config.limits;
        if limits.max_read_ahead == 0 {
            return None;
        }
        // A smaller read would not reopen the window (see READ_AHEAD_EVERY): wait for room for
        // a whole one.
        if buf.len() as u64 + READ_AHEAD_CHUNK > limits.max_read_ahead {
            if !self.full {
                self.full = true;
                stats.limit_hit(Limit::MaxReadAhead);
                debug!(
                    max_read_ahead = limits.max_read_ahead,
                    "publishes wait and max_read_ahead is read ahead: reads stop until they move"
                );
            }
            return None;
        }
        Some((limits.max_read_ahead, limits.max_buffered_total))
    }
}
