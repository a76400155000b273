//! Per-channel state shared by both directions of a connection: the publisher-confirm tag map
//! and whether sluice is closing the channel on the client's behalf.

use std::collections::VecDeque;
use std::time::Instant;

/// Delivery-tag translation for one channel in confirm mode.
///
/// The client numbers every publish from 1; the broker numbers only the publishes sluice
/// forwarded. A shed publish takes a client tag, is nacked by sluice at once, and never reaches
/// the broker, so every later broker tag maps to a higher client tag. `pending` keeps forwarded,
/// unconfirmed publishes in order, so `multiple = true` confirms map to the client tag of their
/// highest covered publish.
#[derive(Debug, Default, Clone)]
pub struct ConfirmMap {
    next_client: u64,
    next_upstream: u64,
    /// (upstream tag, client tag, forwarded at), ascending.
    pending: VecDeque<(u64, u64, Instant)>,
}

/// A broker confirm, translated for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    /// Client delivery tag.
    pub tag: u64,
    /// Multiple flag for the client.
    pub multiple: bool,
    /// Whether the frame differs from the broker's (so it must be re-encoded).
    pub changed: bool,
    /// When the (last) confirmed publish was forwarded: confirm latency.
    pub sent: Instant,
}

impl ConfirmMap {
    /// A fresh map (after `confirm.select`).
    pub fn new() -> Self {
        ConfirmMap {
            next_client: 1,
            next_upstream: 1,
            pending: VecDeque::new(),
        }
    }

    /// A publish is forwarded: returns its client tag.
    pub fn forwarded(&mut self) -> u64 {
        let c = self.next_client;
        self.pending
            .push_back((self.next_upstream, c, Instant::now()));
        self.next_client += 1;
        self.next_upstream += 1;
        c
    }

    /// A publish is shed: returns the client tag sluice must nack (or ack after a return).
    pub fn shed(&mut self) -> u64 {
        let c = self.next_client;
        self.next_client += 1;
        c
    }

    /// Forwarded publishes the broker has not confirmed yet.
    pub fn unconfirmed(&self) -> usize {
        self.pending.len()
    }

    /// Translate a broker `basic.ack`/`basic.nack`. `None` when the tag is not one sluice
    /// forwarded (a broker bug or a stale confirm): the caller drops it and logs.
    pub fn translate(&mut self, upstream_tag: u64, multiple: bool) -> Option<Translated> {
        if multiple {
            // Pop every pending publish up to the tag; the client tag of the last one covers
            // them all (shed tags in between were already nacked, so the client no longer
            // waits for them).
            let mut last = None;
            while let Some(&(u, c, at)) = self.pending.front() {
                if u > upstream_tag {
                    break;
                }
                last = Some((c, at));
                self.pending.pop_front();
            }
            return last.map(|(c, sent)| Translated {
                tag: c,
                multiple: true,
                changed: c != upstream_tag,
                sent,
            });
        }
        let i = self
            .pending
            .binary_search_by_key(&upstream_tag, |&(u, _, _)| u)
            .ok()?;
        let (_, c, sent) = self.pending.remove(i)?;
        Some(Translated {
            tag: c,
            multiple: false,
            changed: c != upstream_tag,
            sent,
        })
    }
}

/// Where sluice is in closing a channel on its own initiative (shed with `close_channel`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SluiceClose {
    /// The client answered our `channel.close`.
    pub client_ok: bool,
    /// The broker answered our `channel.close`.
    pub upstream_ok: bool,
}

/// State of one channel.
#[derive(Debug, Default, Clone)]
pub struct ChannelState {
    /// Set by `confirm.select`.
    pub confirms: Option<ConfirmMap>,
    /// Set by `tx.select`.
    pub tx: bool,
    /// Set while sluice closes the channel itself.
    pub closing: Option<SluiceClose>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shed_message_is_nacked_and_later_tags_renumbered() {
        let mut m = ConfirmMap::new();
        assert_eq!(m.forwarded(), 1); // upstream 1
        assert_eq!(m.shed(), 2); // nacked by sluice
        assert_eq!(m.forwarded(), 3); // upstream 2
        assert_eq!(m.forwarded(), 4); // upstream 3
        assert_eq!(
            m.translate(1, false)
                .map(|t| (t.tag, t.multiple, t.changed)),
            Some((1, false, false))
        );
        assert_eq!(
            m.translate(3, false)
                .map(|t| (t.tag, t.multiple, t.changed)),
            Some((4, false, true))
        );
        assert_eq!(
            m.translate(2, false)
                .map(|t| (t.tag, t.multiple, t.changed)),
            Some((3, false, true))
        );
        assert_eq!(m.unconfirmed(), 0);
    }

    #[test]
    fn multiple_ack_maps_to_highest_covered_client_tag() {
        let mut m = ConfirmMap::new();
        m.forwarded(); // c1 u1
        m.shed(); // c2
        m.shed(); // c3
        m.forwarded(); // c4 u2
        m.forwarded(); // c5 u3
        let t = m.translate(2, true).unwrap();
        assert_eq!((t.tag, t.multiple), (4, true));
        assert_eq!(m.unconfirmed(), 1);
        // A multiple confirm that covers nothing pending is dropped.
        assert!(m.translate(2, true).is_none());
        assert_eq!(m.translate(3, true).unwrap().tag, 5);
    }

    #[test]
    fn unknown_single_tag_is_none() {
        let mut m = ConfirmMap::new();
        m.forwarded();
        assert_eq!(m.translate(9, false), None);
    }
}
