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
    /// Merge nothing, store `next` (a gap opened) and answer `next.pos`.
    Skip { next: RecvPos },
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

/// Most peers a node takes (`POST /v1/admin/peers`).
pub const MAX_PEERS: usize = 64;

/// A change of this node's peer set, as decided before anything moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    /// The complete new set, in the order given.
    pub peers: Vec<String>,
    /// In the new set and not the current one.
    pub added: Vec<String>,
    /// In the current set and not the new one.
    pub removed: Vec<String>,
}

/// A peer URL as a node keeps it: without a trailing slash.
pub fn peer_url(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// Checks that `url` is `http(s)://host:port` and nothing more (a path,
/// query, user or fragment would be glued to every route we call).
pub fn check_peer_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("peer {url:?} is not an http:// or https:// URL"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("peer {url:?} has no port"))?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-[]:".contains(&c))
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok {
        return Err(format!("peer {url:?} has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|c| c.is_ascii_digit()) => Ok(()),
        _ => Err(format!("peer {url:?} has no valid port")),
    }
}

/// Checks a peer list on its own (what any node, in any mode, can tell of
/// it): at most [`MAX_PEERS`], every URL well formed, no duplicates. The
/// URLs as kept ([`peer_url`]).
pub fn check_peer_list(new: &[String]) -> Result<Vec<String>, String> {
    if new.len() > MAX_PEERS {
        return Err(format!(
            "{} peers; at most {MAX_PEERS} are allowed",
            new.len()
        ));
    }
    let mut peers: Vec<String> = Vec::with_capacity(new.len());
    for url in new {
        check_peer_url(url)?;
        let url = peer_url(url);
        let lower = url.to_ascii_lowercase();
        if peers.iter().any(|p| p.to_ascii_lowercase() == lower) {
            return Err(format!("peer {url:?} is listed twice"));
        }
        peers.push(url);
    }
    Ok(peers)
}

/// Decides a change of the peer set from `current` to `new` for the node
/// reachable at `own_url`: a list [`check_peer_list`] takes, without this
/// node, and enough peers left for the write quorum. The same set again is
/// a change with nothing added or removed.
pub fn change_peers(
    current: &[String],
    new: &[String],
    own_url: &str,
    write_quorum: usize,
) -> Result<PeerChange, String> {
    let peers = check_peer_list(new)?;
    let own = peer_url(own_url).to_ascii_lowercase();
    if let Some(url) = peers.iter().find(|p| p.to_ascii_lowercase() == own) {
        return Err(format!("peer {url:?} is this node itself"));
    }
    if peers.len() + 1 < write_quorum {
        return Err(format!(
            "a write quorum of {write_quorum} needs at least {} peers",
            write_quorum - 1
        ));
    }
    let current: Vec<String> = current.iter().map(|u| peer_url(u)).collect();
    let added = peers
        .iter()
        .filter(|p| !current.contains(p))
        .cloned()
        .collect();
    let removed = current
        .iter()
        .filter(|p| !peers.contains(p))
        .cloned()
        .collect();
    Ok(PeerChange {
        peers,
        added,
        removed,
    })
}

/// What a receiver does with the first batch of an origin it holds no
/// position for (no entry and no mode-switch base): a sender starting at
/// its log's beginning is taken as usual; any other batch starts our
/// position at the sender's `upto` with a gap open, merging none of its
/// records. A node that joins a running cluster must not replay a WAL's
/// history: a put there may be older than a tombstone the cluster has
/// purged, and would come back to life. Anti-entropy pulls the origin's
/// whole state instead before the gap closes.
pub fn receive_first(b: Batch) -> Receive {
    if b.from <= 1 {
        return receive(RecvPos::default(), b);
    }
    Receive::Skip {
        next: RecvPos {
            pos: b.upto,
            hlc: Timestamp::default(),
            gap: true,
        },
    }
}

/// The global stable time a node may purge below: the least of ours and
/// every peer's, and zero unless every peer reported the same member count
/// as ours (`members`: this node and its peers). While nodes are told of
/// an added or removed node one by one, some count a node the others do
/// not: the stable times of the ones not told yet leave out the new
/// node's stream, or still count a removed one.
pub fn purge_time(
    ours: Timestamp,
    members: u64,
    peers: impl IntoIterator<Item = (Timestamp, u64)>,
) -> Timestamp {
    let mut gst = ours;
    for (stable, theirs) in peers {
        if theirs != members {
            return Timestamp::default();
        }
        gst = gst.min(stable);
    }
    gst
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

    fn urls(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_peer_change_says_what_was_added_and_removed() {
        let cur = urls(&["http://a:1", "http://b:2"]);
        let c = change_peers(
            &cur,
            &urls(&["http://b:2/", "http://c:3"]),
            "http://me:9",
            1,
        )
        .unwrap();
        assert_eq!(c.peers, urls(&["http://b:2", "http://c:3"]));
        assert_eq!(c.added, urls(&["http://c:3"]));
        assert_eq!(c.removed, urls(&["http://a:1"]));
        // The same set again changes nothing.
        let same = change_peers(&cur, &cur, "http://me:9", 1).unwrap();
        assert!(same.added.is_empty() && same.removed.is_empty());
        assert_eq!(same.peers, cur);
        // No peers at all is a set too (a quorum of one).
        assert!(change_peers(&cur, &[], "http://me:9", 1).is_ok());
    }

    #[test]
    fn bad_peer_sets_are_refused() {
        let cur = urls(&["http://a:1"]);
        let too_many: Vec<String> = (1..=65).map(|p| format!("http://h:{p}")).collect();
        let max: Vec<String> = (1..=64).map(|p| format!("http://h:{p}")).collect();
        assert!(change_peers(&cur, &max, "http://me:9", 1).is_ok());
        for (new, why) in [
            (too_many, "at most"),
            (urls(&["http://me:9/"]), "itself"),
            (urls(&["http://ME:9"]), "itself"),
            (urls(&["http://b:2", "http://b:2/"]), "twice"),
            (urls(&["ftp://b:2"]), "http"),
            (urls(&["b:2"]), "http"),
            (urls(&["http://b"]), "port"),
            (urls(&["http://b:0"]), "port"),
            (urls(&["http://b:99999"]), "port"),
            (urls(&["http://b:2/x"]), "port"),
            (urls(&["http://:2"]), "host"),
            (urls(&["http://u@b:2"]), "host"),
            (urls(&["http://b:2?q=1"]), "port"),
        ] {
            let e = change_peers(&cur, &new, "http://me:9", 1).unwrap_err();
            assert!(e.contains(why), "{new:?}: {e}");
        }
        let e = change_peers(&cur, &[], "http://me:9", 2).unwrap_err();
        assert!(e.contains("quorum"), "{e}");
        assert!(check_peer_url("https://[::1]:8443").is_ok());
        assert!(check_peer_url("http://127.0.0.1:80").is_ok());
    }

    #[test]
    fn a_new_origin_starts_past_the_senders_history_with_a_gap() {
        // The sender's first offer: its end, no records.
        assert_eq!(
            receive_first(batch(41, 40, 50, true, false)),
            Receive::Skip {
                next: RecvPos {
                    pos: 40,
                    hlc: Timestamp::default(),
                    gap: true
                }
            }
        );
        // A compacted sender's oldest entry onward: not replayed either.
        assert_eq!(
            receive_first(batch(30, 40, 50, true, true)),
            Receive::Skip {
                next: RecvPos {
                    pos: 40,
                    hlc: Timestamp::default(),
                    gap: true
                }
            }
        );
        // A sender whose log starts at 1 (a cluster starting together)
        // streams as always.
        assert_eq!(
            receive_first(batch(1, 3, 50, true, false)),
            Receive::Ingest {
                next: at(3, 50, false),
                crossed_gap: false
            }
        );
    }

    #[test]
    fn purges_wait_until_every_node_counts_the_same_members() {
        assert_eq!(purge_time(ts(9), 4, [(ts(7), 4), (ts(8), 4)]), ts(7));
        // One peer not told of the fourth node yet (or of a removal).
        assert_eq!(
            purge_time(ts(9), 4, [(ts(7), 4), (ts(8), 3)]),
            Timestamp::default()
        );
        // A peer that never answered a digest counts nothing yet.
        assert_eq!(
            purge_time(ts(9), 3, [(ts(7), 3), (Timestamp::default(), 0)]),
            Timestamp::default()
        );
        assert_eq!(purge_time(ts(9), 1, []), ts(9));
    }

    #[test]
    fn a_changed_set_changes_the_stable_time() {
        // Three peers, all known.
        let three = [Some(ts(5)), Some(ts(6)), Some(ts(7))];
        assert_eq!(stable_time(&three, ts(9)), ts(5));
        // A fourth added: zero until its id is known, then it counts.
        let added = [Some(ts(5)), Some(ts(6)), Some(ts(7)), None];
        assert_eq!(stable_time(&added, ts(9)), Timestamp::default());
        let known = [Some(ts(5)), Some(ts(6)), Some(ts(7)), Some(ts(0))];
        assert_eq!(stable_time(&known, ts(9)), ts(0));
        // The one holding it back (a dead peer) removed: it moves again.
        let removed = [Some(ts(6)), Some(ts(7))];
        assert_eq!(stable_time(&removed, ts(9)), ts(6));
    }
}
