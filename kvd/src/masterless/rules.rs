//! The decisions of masterless mode, as plain functions over state, like
//! `replication::rules`: where a stream resumes, what a receiver makes of
//! a batch, when a write has its quorum, and the stable times that decide
//! tombstone purges. The runtime (`masterless::node`) moves the bytes and
//! persists what these say.

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;

/// What a receiver durably holds of one origin's stream.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecvPos {
    /// The origin's log index through which we hold its writes.
    pub pos: u64,
    /// We hold every write the origin stamped at or before this.
    pub hlc: Timestamp,
    /// A compaction gap was skipped; `hlc` is frozen until anti-entropy
    /// finds us equal with the origin.
    pub gap: bool,
}

/// Where a sender's next batch starts: `next`, or the oldest entry its
/// log still holds (`first`) if `next` was compacted away, with the gap
/// flagged. Index 0 is no entry.
pub fn send_from(next: u64, first: u64) -> (u64, bool) {
    if next < first {
        (first, true)
    } else {
        (next.max(1), false)
    }
}

/// The header of a stream batch, as the receiver judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub from: u64,
    pub upto: u64,
    /// The sender's durable clock when `complete`.
    pub hlc: Timestamp,
    /// The batch reaches the end of the sender's log.
    pub complete: bool,
    /// The sender skipped a compacted stretch before `from`.
    pub gap: bool,
}

/// What a receiver does with a stream batch, given what it holds (`cur`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receive {
    /// Answer `pos`; if `store`, first record it (only the clock moved).
    Answer { pos: u64, store: Option<RecvPos> },
    /// Merge the batch's records durably, then store `next` and answer
    /// `next.pos`. `crossed_gap`: the batch skipped entries (counted).
    Ingest { next: RecvPos, crossed_gap: bool },
}

/// Decides what a batch does (see the module docs of `masterless::node`):
/// a sender ahead of us resumes from our position; a batch holding nothing
/// new only moves our stable time for an idle, caught-up origin; anything
/// else is merged, and the clock moves with it only if the batch reaches
/// the origin's end and no gap is open.
pub fn receive(cur: RecvPos, b: Batch) -> Receive {
    let contiguous = b.from <= cur.pos.saturating_add(1);
    if !contiguous && !b.gap {
        return Receive::Answer {
            pos: cur.pos,
            store: None,
        };
    }
    if b.upto <= cur.pos {
        let clock_moves = b.upto == cur.pos && b.complete && !cur.gap && b.hlc > cur.hlc;
        return Receive::Answer {
            pos: cur.pos,
            store: clock_moves.then_some(RecvPos { hlc: b.hlc, ..cur }),
        };
    }
    let mut next = RecvPos {
        pos: b.upto,
        hlc: cur.hlc,
        gap: cur.gap || !contiguous,
    };
    if b.complete && !next.gap {
        next.hlc = next.hlc.max(b.hlc);
    }
    Receive::Ingest {
        next,
        crossed_gap: !contiguous,
    }
}

/// After a stream gap, the origin's clock may advance again once we hold
/// everything it held when it answered a digest (equal digests, and our
/// position at its last index): the position with the gap closed.
pub fn close_gap(cur: RecvPos, origin_last: u64, origin_durable: Timestamp) -> Option<RecvPos> {
    (cur.gap && cur.pos >= origin_last).then(|| RecvPos {
        pos: cur.pos,
        hlc: cur.hlc.max(origin_durable),
        gap: false,
    })
}

/// Whether a write at `index` has its quorum: `write_quorum - 1` peers
/// (this node holds it already) have answered at or past it.
pub fn has_quorum(
    peer_acks: impl IntoIterator<Item = u64>,
    index: u64,
    write_quorum: usize,
) -> bool {
    let needed = write_quorum.saturating_sub(1);
    needed == 0 || peer_acks.into_iter().filter(|&a| a >= index).count() >= needed
}

/// A node's stable time: the least of what it holds of each peer's stream
/// (`None` for a peer whose id it does not know yet, which holds it at
/// zero). With no peers, its own durable clock.
pub fn stable_time(held: &[Option<Timestamp>], own_durable: Timestamp) -> Timestamp {
    if held.iter().any(Option::is_none) {
        return Timestamp::default();
    }
    held.iter().flatten().copied().min().unwrap_or(own_durable)
}

/// The global stable time: the least of ours and every peer's. A tombstone
/// stamped before it is held by every node and can go.
pub fn global_stable_time(
    ours: Timestamp,
    peers: impl IntoIterator<Item = Timestamp>,
) -> Timestamp {
    peers.into_iter().fold(ours, Timestamp::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> Timestamp {
        Timestamp {
            physical_ms: ms,
            logical: 0,
            node: 1,
        }
    }

    fn at(pos: u64, hlc: u64, gap: bool) -> RecvPos {
        RecvPos {
            pos,
            hlc: ts(hlc),
            gap,
        }
    }

    fn batch(from: u64, upto: u64, hlc: u64, complete: bool, gap: bool) -> Batch {
        Batch {
            from,
            upto,
            hlc: ts(hlc),
            complete,
            gap,
        }
    }

    #[test]
    fn a_sender_starts_at_its_oldest_entry_when_the_next_is_compacted() {
        assert_eq!(send_from(5, 1), (5, false));
        assert_eq!(send_from(0, 0), (1, false));
        assert_eq!(send_from(3, 10), (10, true));
        assert_eq!(send_from(10, 10), (10, false));
    }

    #[test]
    fn a_sender_ahead_of_the_receiver_resumes_from_its_position() {
        let r = receive(at(4, 0, false), batch(9, 12, 50, true, false));
        assert_eq!(
            r,
            Receive::Answer {
                pos: 4,
                store: None
            }
        );
    }

    #[test]
    fn a_contiguous_batch_is_merged_and_moves_the_clock_only_when_complete() {
        let cur = at(4, 10, false);
        assert_eq!(
            receive(cur, batch(5, 8, 50, true, false)),
            Receive::Ingest {
                next: at(8, 50, false),
                crossed_gap: false
            }
        );
        assert_eq!(
            receive(cur, batch(3, 8, 50, false, false)),
            Receive::Ingest {
                next: at(8, 10, false),
                crossed_gap: false
            }
        );
    }

    #[test]
    fn a_gap_is_crossed_but_freezes_the_clock() {
        let r = receive(at(4, 10, false), batch(9, 12, 50, true, true));
        assert_eq!(
            r,
            Receive::Ingest {
                next: at(12, 10, true),
                crossed_gap: true
            }
        );
        // An open gap keeps freezing it, even on contiguous batches.
        let r = receive(at(12, 10, true), batch(13, 14, 60, true, false));
        assert_eq!(
            r,
            Receive::Ingest {
                next: at(14, 10, true),
                crossed_gap: false
            }
        );
    }

    #[test]
    fn an_idle_caught_up_origin_moves_only_the_clock() {
        let cur = at(8, 10, false);
        assert_eq!(
            receive(cur, batch(9, 8, 20, true, false)),
            Receive::Answer {
                pos: 8,
                store: Some(at(8, 20, false))
            }
        );
        // Not past what we hold, not complete, an older clock, or a gap open:
        // nothing to store.
        for (cur, b) in [
            (cur, batch(5, 7, 20, true, false)),
            (cur, batch(9, 8, 20, false, false)),
            (cur, batch(9, 8, 5, true, false)),
            (at(8, 10, true), batch(9, 8, 20, true, false)),
        ] {
            assert_eq!(
                receive(cur, b),
                Receive::Answer {
                    pos: 8,
                    store: None
                }
            );
        }
    }

    #[test]
    fn a_gap_closes_once_we_hold_the_origins_whole_log() {
        assert_eq!(
            close_gap(at(12, 10, true), 12, ts(40)),
            Some(at(12, 40, false))
        );
        assert_eq!(close_gap(at(12, 10, true), 13, ts(40)), None);
        assert_eq!(close_gap(at(12, 10, false), 12, ts(40)), None);
        // The clock never goes back.
        assert_eq!(
            close_gap(at(12, 50, true), 12, ts(40)),
            Some(at(12, 50, false))
        );
    }

    #[test]
    fn a_quorum_counts_this_node_and_the_peers_at_or_past_the_write() {
        assert!(has_quorum([], 5, 1));
        assert!(!has_quorum([4, 4], 5, 2));
        assert!(has_quorum([4, 5], 5, 2));
        assert!(!has_quorum([4, 5], 5, 3));
        assert!(has_quorum([9, 5], 5, 3));
    }

    #[test]
    fn stable_times_are_minimums_and_an_unknown_peer_holds_them_at_zero() {
        assert_eq!(stable_time(&[], ts(7)), ts(7));
        assert_eq!(stable_time(&[Some(ts(5)), Some(ts(3))], ts(7)), ts(3));
        assert_eq!(
            stable_time(&[Some(ts(5)), None], ts(7)),
            Timestamp::default()
        );
        assert_eq!(global_stable_time(ts(5), [ts(9), ts(4)]), ts(4));
        assert_eq!(global_stable_time(ts(5), []), ts(5));
    }
}
