//! Last-write-wins bookkeeping of masterless mode: for every key, the
//! timestamp of the write that holds it and whether that write was a delete
//! (a tombstone).
//!
//! The values themselves stay in [`State`]; every change reaches it through
//! [`State::apply`] (so indexes hooked there see masterless writes too).
//! [`Lww::apply`] is the merge: an op's item changes a key only if its
//! timestamp is greater than the key's current one. Timestamps are totally
//! ordered and unique per write, so the merge is commutative, associative
//! and idempotent: any order and any duplication of the same writes ends in
//! the same state (`kvd/tests/lww_model.rs` checks this over 10k cases).
//!
//! Keys are grouped into [`BUCKETS`] buckets by a fixed hash, each with an
//! incrementally kept digest (XOR of `hash(key, ts)` over its live keys) for
//! anti-entropy. Tombstones are left out of the digest: two nodes that show
//! the same keys with the same values are equal, whether or not one of them
//! still remembers a delete. Why that is safe is argued in ARCHITECTURE.md
//! (tombstones reach every node through the origin's stream, and are purged
//! only below the global stable time).
//!
//! One lock guards the buckets: only the WAL writer thread takes it for
//! writing (it applies in log order); anti-entropy and snapshots read a
//! bucket's timestamps and the matching values under the read lock, so they
//! never see a value with another write's timestamp.

use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;
use parking_lot::RwLock;

use super::expiry::expire_applies;
use super::state::{ApplyOutcome, State};
use crate::model::{Expiry, KeyMeta, KeyRange, Op, Timestamp, TxnOp};

/// Anti-entropy buckets (a power of two).
pub const BUCKETS: usize = 1024;

/// What a node knows about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LwwEntry {
    pub ts: Timestamp,
    pub tombstone: bool,
}

/// One key as anti-entropy and snapshots carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub key: Bytes,
    pub ts: Timestamp,
    /// `None` for a tombstone.
    pub value: Option<Bytes>,
    /// This node's versions of the key (zero for a tombstone).
    pub meta: KeyMeta,
    /// The deadline it was written with (docs/DESIGN.md §5.7): it travels
    /// with the version.
    pub expiry: Expiry,
}

impl Versioned {
    /// The log op that recreates this version.
    pub fn to_op(&self) -> Op {
        match &self.value {
            Some(v) => Op::Put {
                key: self.key.clone(),
                value: v.clone(),
                expiry: self.expiry,
            },
            None => Op::Delete {
                key: self.key.clone(),
            },
        }
    }
}

type Map = hashbrown::HashMap<Box<[u8]>, LwwEntry, foldhash::fast::RandomState>;

struct Bucket {
    map: Map,
    digest: u64,
}

struct Inner {
    buckets: Vec<Bucket>,
    max_ts: Timestamp,
    tombstones: u64,
}

/// Per-key timestamps and tombstones, in anti-entropy buckets.
pub struct Lww {
    inner: RwLock<Inner>,
}

impl Default for Lww {
    fn default() -> Self {
        Self::new()
    }
}

const SEED: u64 = 0x6c77_775f_6275_636b;

/// Bucket of a key: the same on every node and release.
pub fn bucket_of(key: &[u8]) -> usize {
    (foldhash::quality::FixedState::with_seed(SEED).hash_one(key) as usize) & (BUCKETS - 1)
}

fn entry_digest(key: &[u8], ts: Timestamp) -> u64 {
    let mut h = foldhash::quality::FixedState::with_seed(SEED ^ 0x5a5a).build_hasher();
    h.write(key);
    h.write_u64(ts.physical_ms);
    h.write_u32(ts.logical);
    h.write_u32(ts.node);
    h.finish()
}

impl Inner {
    fn wins(&self, key: &[u8], ts: Timestamp) -> bool {
        self.buckets[bucket_of(key)]
            .map
            .get(key)
            .is_none_or(|e| ts > e.ts)
    }

    /// Records `(key, ts, tombstone)` as the key's winner (caller checked).
    fn set(&mut self, key: &[u8], ts: Timestamp, tombstone: bool) {
        let b = &mut self.buckets[bucket_of(key)];
        let new = LwwEntry { ts, tombstone };
        let old = match b.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, new)),
            None => {
                b.map.insert(key.into(), new);
                None
            }
        };
        if let Some(old) = old {
            if !old.tombstone {
                b.digest ^= entry_digest(key, old.ts);
            } else {
                self.tombstones -= 1;
            }
        }
        if tombstone {
            self.tombstones += 1;
        } else {
            b.digest ^= entry_digest(key, ts);
        }
        self.max_ts = self.max_ts.max(ts);
    }
}

impl Inner {
    /// The ops of a transaction stamped `ts` that change this node, with
    /// their stamps set: a prefix delete becomes deletes of the keys this
    /// node holds under it, each key is decided by its last write in the
    /// record, the reads stay (they see the writes before them).
    fn txn_winners(&mut self, state: &State, ts: Timestamp, ops: &[TxnOp]) -> Vec<TxnOp> {
        let mut flat = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::DeletePrefix { prefix } => flat.extend(
                    state
                        .keys_in(&KeyRange::prefix(prefix), ts.physical_ms)
                        .into_iter()
                        .map(|key| TxnOp::Delete { key }),
                ),
                other => flat.push(other.clone()),
            }
        }
        let mut last: hashbrown::HashMap<Bytes, bool> = hashbrown::HashMap::new();
        for op in &flat {
            match op {
                TxnOp::Put { key, .. } if self.wins(key, ts) => last.insert(key.clone(), false),
                TxnOp::Delete { key } if self.wins(key, ts) => last.insert(key.clone(), true),
                _ => None,
            };
        }
        for (key, tombstone) in &last {
            self.set(key, ts, *tombstone);
        }
        flat.retain(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => last.contains_key(key),
            TxnOp::DeletePrefix { .. } | TxnOp::Get { .. } | TxnOp::Range(_) => true,
        });
        flat
    }
}

impl Lww {
    pub fn new() -> Self {
        // One seed for every bucket: building 1024 random states would
        // cost more than the empty maps themselves.
        let hasher = foldhash::fast::RandomState::default();
        Lww {
            inner: RwLock::new(Inner {
                buckets: (0..BUCKETS)
                    .map(|_| Bucket {
                        map: Map::with_hasher(hasher),
                        digest: 0,
                    })
                    .collect(),
                max_ts: Timestamp::default(),
                tombstones: 0,
            }),
        }
    }

    /// The part of `op` (stamped `ts`) that would change this node: `None`
    /// if every item is older than what the node holds.
    pub fn winning(&self, ts: Timestamp, op: &Op) -> Option<Op> {
        self.winning_after(ts, op, &mut Ahead::default())
    }

    /// [`Lww::winning`] for a record logged after `ahead` in one append:
    /// an item must also be newer than the stamp `ahead` holds for its key,
    /// so the same version arriving twice (a stream batch and a repair) is
    /// logged once. The winning part's keys join `ahead`.
    pub fn winning_after(&self, ts: Timestamp, op: &Op, ahead: &mut Ahead) -> Option<Op> {
        let won = {
            let inner = self.inner.read();
            let wins = |key: &[u8]| inner.wins(key, ts) && ahead.get(key).is_none_or(|a| ts > *a);
            winning_part(op, wins)
        };
        if let Some(op) = &won {
            note_ahead(ahead, ts, op);
        }
        won
    }

    /// The merge: applies the items of `op` (record `index`, stamped `ts`)
    /// that are newer than what each key holds, to `state` through
    /// [`State::apply`] (which sees the record's index even when nothing of
    /// it wins). `reads`: this node answers the record (see [`State::apply`]).
    pub fn apply(
        &self,
        state: &State,
        index: u64,
        ts: Timestamp,
        op: &Op,
        reads: bool,
    ) -> ApplyOutcome {
        let mut inner = self.inner.write();
        if state.refuses(op, ts.physical_ms) {
            // A lease is named (never taken in masterless mode): the state
            // changes nothing, and neither may the stamps.
            return state.apply(index, ts, op, reads);
        }
        let winners = match op {
            Op::Put { key, .. } | Op::Delete { key } => {
                let wins = inner.wins(key, ts);
                if wins {
                    inner.set(key, ts, matches!(op, Op::Delete { .. }));
                }
                wins.then(|| op.clone())
            }
            Op::Bulk { items } => {
                // Duplicate keys in one bulk: the last wins, as in State.
                let mut seen = hashbrown::HashSet::with_capacity(items.len());
                let mut winners: Vec<(Bytes, Bytes, Expiry)> = items
                    .iter()
                    .rev()
                    .filter(|(k, _, _)| seen.insert(k.clone()) && inner.wins(k, ts))
                    .cloned()
                    .collect();
                winners.reverse();
                for (k, _, _) in &winners {
                    inner.set(k, ts, false);
                }
                (!winners.is_empty()).then_some(Op::Bulk { items: winners })
            }
            Op::Txn { ops } => Some(Op::Txn {
                ops: inner.txn_winners(state, ts, ops),
            }),
            // This node's own expiry: each key that goes becomes a
            // tombstone with its version's own stamp, so a write stamped
            // after the version still wins, and a peer's copy of the
            // version (an equal stamp) changes nothing.
            Op::Expire { keys } => {
                for (key, named) in keys {
                    let Some(e) = inner.buckets[bucket_of(key)].map.get(&key[..]).copied() else {
                        continue;
                    };
                    let goes = !e.tombstone
                        && state.get_raw(key).is_some_and(|i| {
                            expire_applies(i.meta, i.expiry, *named, (index, ts.physical_ms))
                        });
                    if goes {
                        inner.set(key, e.ts, true);
                    }
                }
                Some(op.clone())
            }
            // The expiry of a lease a mode switch brought along (masterless
            // mode takes no lease writes): its keys go as an Expire's do.
            Op::LeaseRevoke { id, expired: true } => {
                if !state.lease_alive(*id, ts.physical_ms) {
                    for key in state.lease_keys(*id) {
                        if let Some(e) = inner.buckets[bucket_of(&key)].map.get(&key[..]).copied() {
                            if !e.tombstone {
                                inner.set(&key, e.ts, true);
                            }
                        }
                    }
                }
                Some(op.clone())
            }
            Op::Noop
            | Op::Config { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseKeepAlive { .. }
            | Op::LeaseRevoke { .. } => None,
        };
        match winners {
            Some(op) => state.apply(index, ts, &op, reads),
            None => {
                state.skip_record(index, ts);
                ApplyOutcome::default()
            }
        }
    }

    /// Snapshot load: `key` stamped `ts`, live with `value`, `meta` and
    /// `expiry` or a tombstone, if it is newer than what the key holds.
    pub fn load(
        &self,
        state: &State,
        key: &[u8],
        ts: Timestamp,
        live: Option<(&[u8], KeyMeta, Expiry)>,
    ) {
        let mut inner = self.inner.write();
        if !inner.wins(key, ts) {
            return;
        }
        inner.set(key, ts, live.is_none());
        match live {
            Some((value, meta, expiry)) => state.load_expiring(key, value, meta, expiry),
            None => state.unload(key),
        }
    }

    /// The key's current winner, if the node knows the key.
    pub fn entry(&self, key: &[u8]) -> Option<LwwEntry> {
        self.inner.read().buckets[bucket_of(key)]
            .map
            .get(key)
            .copied()
    }

    /// Every bucket's digest.
    pub fn digests(&self) -> Vec<u64> {
        self.inner.read().buckets.iter().map(|b| b.digest).collect()
    }

    /// XOR of the bucket digests: one number for "same contents".
    pub fn digest(&self) -> u64 {
        self.inner
            .read()
            .buckets
            .iter()
            .fold(0, |acc, b| acc ^ b.digest)
    }

    /// The versions of bucket `b` (live keys with their values, and
    /// tombstones), read consistently with `state`.
    pub fn bucket(&self, state: &State, b: usize) -> Vec<Versioned> {
        let inner = self.inner.read();
        let mut out = Vec::new();
        if let Some(bucket) = inner.buckets.get(b) {
            for (k, e) in &bucket.map {
                // The writer changes state and timestamps together under the
                // write lock, so a live key is always in `state`.
                let (value, meta, expiry) = match e.tombstone {
                    true => (None, KeyMeta::default(), Expiry::Never),
                    false => state.get_raw(k).map_or(
                        (Some(Bytes::new()), KeyMeta::default(), Expiry::Never),
                        |i| (i.value, i.meta, i.expiry),
                    ),
                };
                out.push(Versioned {
                    key: Bytes::copy_from_slice(k),
                    ts: e.ts,
                    value,
                    meta,
                    expiry,
                });
            }
        }
        out
    }

    /// Forgets tombstones older than `before` (the global stable time);
    /// returns how many.
    pub fn purge(&self, before: Timestamp) -> u64 {
        let mut inner = self.inner.write();
        let mut purged = 0;
        for b in inner.buckets.iter_mut() {
            b.map.retain(|_, e| {
                let drop = e.tombstone && e.ts < before;
                purged += u64::from(drop);
                !drop
            });
        }
        inner.tombstones -= purged;
        purged
    }

    /// Starts over from `state`'s contents, every key stamped `base` (the
    /// mode switch into masterless: identical contents on every node get
    /// identical stamps).
    pub fn seed_from_state(&self, state: &State, base: Timestamp) {
        let mut inner = self.inner.write();
        for b in inner.buckets.iter_mut() {
            b.map.clear();
            b.digest = 0;
        }
        inner.tombstones = 0;
        state.for_each(|k, _, _| inner.set(k, base, false));
        inner.max_ts = inner.max_ts.max(base);
    }

    /// Takes `other`'s stamps and tombstones in one step (readers see the
    /// old set or the new one), keeping the largest timestamp either saw.
    pub fn replace_with(&self, other: Lww) {
        let mut inner = self.inner.write();
        let max_ts = inner.max_ts;
        *inner = other.inner.into_inner();
        inner.max_ts = inner.max_ts.max(max_ts);
    }

    /// Forgets everything (leaving masterless mode).
    pub fn clear(&self) {
        let mut inner = self.inner.write();
        for b in inner.buckets.iter_mut() {
            b.map.clear();
            b.digest = 0;
        }
        inner.tombstones = 0;
    }

    /// Largest timestamp ever merged (the clock starts past it on restart).
    pub fn max_ts(&self) -> Timestamp {
        self.inner.read().max_ts
    }

    pub fn tombstones(&self) -> u64 {
        self.inner.read().tombstones
    }
}

/// Stamps of the keys an append logs ahead of the record being judged.
pub type Ahead = hashbrown::HashMap<Bytes, Timestamp>;

/// Records the keys `op` (stamped `ts`) writes in `ahead`.
pub fn note_ahead(ahead: &mut Ahead, ts: Timestamp, op: &Op) {
    op.for_each_written_key(|key| {
        let at = ahead.entry(key.clone()).or_default();
        *at = (*at).max(ts);
    });
}

/// The items of `op` for which `wins` holds (see [`Lww::winning`]).
fn winning_part(op: &Op, wins: impl Fn(&[u8]) -> bool) -> Option<Op> {
    match op {
        // Reads are of the node that answered; a prefix delete (which
        // the node that took it resolves into deletes) is kept whole.
        Op::Txn { ops } => {
            let ops: Vec<TxnOp> = ops
                .iter()
                .filter(|op| match op {
                    TxnOp::Put { key, .. } | TxnOp::Delete { key } => wins(key),
                    TxnOp::DeletePrefix { .. } => true,
                    TxnOp::Get { .. } | TxnOp::Range(_) => false,
                })
                .cloned()
                .collect();
            (!ops.is_empty()).then_some(Op::Txn { ops })
        }
        Op::Put { key, .. } | Op::Delete { key } => wins(key).then(|| op.clone()),
        Op::Bulk { items } => {
            let items: Vec<_> = items.iter().filter(|(k, _, _)| wins(k)).cloned().collect();
            (!items.is_empty()).then_some(Op::Bulk { items })
        }
        // Expiries are each node's own (docs/DESIGN.md §5.7) and
        // leases are not taken in masterless mode: a peer's are ignored.
        Op::Noop
        | Op::Expire { .. }
        | Op::Config { .. }
        | Op::LeaseGrant { .. }
        | Op::LeaseKeepAlive { .. }
        | Op::LeaseRevoke { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64, node: u32) -> Timestamp {
        Timestamp {
            physical_ms: ms,
            logical: 0,
            node,
        }
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            expiry: Expiry::Never,
        }
    }

    fn del(k: &'static str) -> Op {
        Op::Delete {
            key: Bytes::from_static(k.as_bytes()),
        }
    }

    #[test]
    fn an_older_put_never_undoes_a_delete() {
        let (s, l) = (State::new(), Lww::new());
        l.apply(&s, 1, ts(5, 1), &put("a", "new"), false);
        l.apply(&s, 2, ts(6, 2), &del("a"), false);
        l.apply(&s, 3, ts(4, 3), &put("a", "old"), false);
        assert_eq!(s.get(b"a", 0), None);
        assert_eq!(
            s.applied_index(),
            3,
            "a record that loses still counts as applied"
        );
        assert_eq!(l.tombstones(), 1);
        assert_eq!(l.purge(ts(7, 0)), 1);
        assert_eq!(l.tombstones(), 0);
    }

    #[test]
    fn digest_counts_live_keys_only() {
        let (s1, l1) = (State::new(), Lww::new());
        let (s2, l2) = (State::new(), Lww::new());
        l1.apply(&s1, 1, ts(1, 1), &put("a", "x"), false);
        l2.apply(&s2, 1, ts(1, 1), &put("a", "x"), false);
        l2.apply(&s2, 2, ts(2, 1), &del("gone"), false);
        assert_eq!(l1.digests(), l2.digests());
        let b = &l1.bucket(&s1, bucket_of(b"a"))[0];
        assert_eq!(b.value.as_deref(), Some(&b"x"[..]));
        assert_eq!(b.meta.mod_index, 1);
    }

    #[test]
    fn a_version_logged_ahead_in_the_same_append_is_not_logged_again() {
        let (s, l) = (State::new(), Lww::new());
        l.apply(&s, 1, ts(5, 1), &put("old", "x"), false);
        let mut ahead = Ahead::default();
        // A stream batch and a repair carrying the same version.
        assert!(l
            .winning_after(ts(7, 2), &put("k", "v"), &mut ahead)
            .is_some());
        assert_eq!(l.winning_after(ts(7, 2), &put("k", "v"), &mut ahead), None);
        // An older version after a newer one loses; a newer one wins.
        assert_eq!(l.winning_after(ts(6, 3), &put("k", "w"), &mut ahead), None);
        assert!(l
            .winning_after(ts(8, 3), &put("k", "w"), &mut ahead)
            .is_some());
        // A bulk keeps only the items nothing ahead of it beats.
        let bulk = Op::Bulk {
            items: vec![
                (
                    Bytes::from_static(b"k"),
                    Bytes::from_static(b"b"),
                    Expiry::Never,
                ),
                (
                    Bytes::from_static(b"old"),
                    Bytes::from_static(b"b"),
                    Expiry::Never,
                ),
                (
                    Bytes::from_static(b"new"),
                    Bytes::from_static(b"b"),
                    Expiry::Never,
                ),
            ],
        };
        let won = l.winning_after(ts(7, 4), &bulk, &mut ahead);
        let Some(Op::Bulk { items }) = won else {
            panic!("the bulk's newer items win: {won:?}");
        };
        let keys: Vec<&[u8]> = items.iter().map(|(k, _, _)| &k[..]).collect();
        assert_eq!(keys, vec![&b"old"[..], &b"new"[..]]);
        // Without anything ahead, the state alone decides, as before.
        assert!(l.winning(ts(7, 2), &put("k", "v")).is_some());
    }

    #[test]
    fn a_transaction_merges_key_by_key_by_its_last_write() {
        let (s, l) = (State::new(), Lww::new());
        let b = |k: &'static str| Bytes::from_static(k.as_bytes());
        l.apply(&s, 1, ts(5, 1), &put("p/old", "x"), false);
        l.apply(&s, 2, ts(9, 1), &put("p/newer", "y"), false);
        let ops = vec![
            TxnOp::Put {
                key: b("k"),
                value: b("1"),
                expiry: Expiry::Never,
            },
            TxnOp::Delete { key: b("k") },
            TxnOp::DeletePrefix { prefix: b("p/") },
            TxnOp::Put {
                key: b("j"),
                value: b("2"),
                expiry: Expiry::Never,
            },
            TxnOp::Get { key: b("j") },
        ];
        assert_eq!(
            l.winning(ts(7, 2), &Op::Txn { ops: ops.clone() })
                .map(|op| match op {
                    Op::Txn { ops } => ops.len(),
                    _ => 0,
                }),
            Some(4),
            "the read is not merged"
        );
        let r = l
            .apply(&s, 3, ts(7, 2), &Op::Txn { ops }, true)
            .txn
            .unwrap();
        assert_eq!(s.get(b"k", 0), None);
        assert_eq!(l.entry(b"k").map(|e| e.tombstone), Some(true));
        assert_eq!(s.get(b"p/old", 0), None, "older than the prefix delete");
        assert_eq!(
            s.get(b"p/newer", 0).as_deref(),
            Some(&b"y"[..]),
            "newer: kept"
        );
        assert_eq!(s.get(b"j", 0).as_deref(), Some(&b"2"[..]));
        assert_eq!(r.results.len(), 5, "the prefix became one delete here");
    }

    #[test]
    fn a_local_expiry_leaves_a_tombstone_with_the_versions_own_stamp() {
        let (s, l) = (State::new(), Lww::new());
        let k = Bytes::from_static(b"k");
        let with = |v: &str, x| Op::Put {
            key: k.clone(),
            value: Bytes::copy_from_slice(v.as_bytes()),
            expiry: x,
        };
        l.apply(&s, 1, ts(10, 2), &with("v", Expiry::At(50)), false);
        assert_eq!(s.get(b"k", 49).as_deref(), Some(&b"v"[..]));
        assert_eq!(s.get(b"k", 50), None, "hidden from its deadline on");
        let expire = Op::Expire {
            keys: vec![(k.clone(), 1)],
        };
        assert_eq!(l.winning(ts(60, 1), &expire), None, "a peer's is ignored");
        l.apply(&s, 2, ts(60, 1), &expire, false);
        assert_eq!(s.get_raw(b"k"), None);
        let e = l.entry(b"k").unwrap();
        assert_eq!((e.ts, e.tombstone), (ts(10, 2), true));
        assert_eq!(l.digest(), 0, "tombstones are not in the digest");
        // The same version again (a peer's copy) ties and changes nothing.
        assert_eq!(l.winning(ts(10, 2), &with("v", Expiry::At(50))), None);
        // A write stamped after the version wins, as it would have.
        l.apply(&s, 3, ts(20, 3), &with("w", Expiry::Never), false);
        assert_eq!(s.get(b"k", u64::MAX).as_deref(), Some(&b"w"[..]));
        // A version's deadline travels with it to anti-entropy.
        l.apply(&s, 4, ts(30, 3), &with("x", Expiry::At(90)), false);
        let v = l.bucket(&s, bucket_of(b"k")).pop().unwrap();
        assert_eq!(
            (v.expiry, v.to_op()),
            (Expiry::At(90), with("x", Expiry::At(90)))
        );
    }

    #[test]
    fn a_lease_brought_along_by_a_mode_switch_expires_as_keys_do() {
        let (s, l) = (State::new(), Lww::new());
        // As a rebase leaves it: the lease and its key in the state.
        s.apply(1, ts(0, 1), &Op::LeaseGrant { ttl_ms: 100 }, false);
        let key = Bytes::from_static(b"k");
        let put = Op::Put {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            expiry: Expiry::Lease(1),
        };
        l.apply(&s, 2, ts(10, 1), &put, false);
        let revoke = Op::LeaseRevoke {
            id: 1,
            expired: true,
        };
        l.apply(&s, 3, ts(100, 1), &revoke, false);
        assert_eq!(s.get_raw(b"k"), None);
        assert_eq!(s.lease_count(), 0);
        let e = l.entry(b"k").unwrap();
        assert_eq!((e.ts, e.tombstone), (ts(10, 1), true));
    }
}
