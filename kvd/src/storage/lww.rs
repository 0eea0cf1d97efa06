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

use super::state::{ApplyOutcome, State};
use crate::model::{Op, Timestamp};

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
}

impl Versioned {
    /// The log op that recreates this version.
    pub fn to_op(&self) -> Op {
        match &self.value {
            Some(v) => Op::Put {
                key: self.key.clone(),
                value: v.clone(),
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
        let inner = self.inner.read();
        match op {
            Op::Txn { .. } => todo!("transactions are not built yet"),
            Op::Put { key, .. } | Op::Delete { key } => inner.wins(key, ts).then(|| op.clone()),
            Op::Bulk { items } => {
                let items: Vec<_> = items
                    .iter()
                    .filter(|(k, _)| inner.wins(k, ts))
                    .cloned()
                    .collect();
                (!items.is_empty()).then_some(Op::Bulk { items })
            }
            Op::Noop => None,
        }
    }

    /// The merge: applies the items of `op` (stamped `ts`) that are newer
    /// than what each key holds, to `state` through [`State::apply`].
    pub fn apply(&self, state: &State, ts: Timestamp, op: &Op) -> ApplyOutcome {
        let mut inner = self.inner.write();
        match op {
            Op::Txn { .. } => todo!("transactions are not built yet"),
            Op::Put { key, .. } => {
                if inner.wins(key, ts) {
                    inner.set(key, ts, false);
                    state.apply(op);
                }
                ApplyOutcome::default()
            }
            Op::Delete { key } => {
                if inner.wins(key, ts) {
                    inner.set(key, ts, true);
                    state.apply(op)
                } else {
                    ApplyOutcome::default()
                }
            }
            Op::Bulk { items } => {
                // Duplicate keys in one bulk: the last wins, as in State.
                let mut seen = hashbrown::HashSet::with_capacity(items.len());
                let mut winners: Vec<(Bytes, Bytes)> = items
                    .iter()
                    .rev()
                    .filter(|(k, _)| seen.insert(k.clone()) && inner.wins(k, ts))
                    .cloned()
                    .collect();
                winners.reverse();
                for (k, _) in &winners {
                    inner.set(k, ts, false);
                }
                if !winners.is_empty() {
                    state.apply(&Op::Bulk { items: winners });
                }
                ApplyOutcome::default()
            }
            Op::Noop => ApplyOutcome::default(),
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
                let value = if e.tombstone {
                    None
                } else {
                    // The writer changes state and timestamps together under
                    // the write lock, so a live key is always in `state`.
                    Some(state.get(k).unwrap_or_default())
                };
                out.push(Versioned {
                    key: Bytes::copy_from_slice(k),
                    ts: e.ts,
                    value,
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
        for shard in 0..state.shard_count() {
            let mut keys = Vec::new();
            state.for_each_in_shard(shard, |k, _| keys.push(k.to_vec()));
            for k in keys {
                inner.set(&k, base, false);
            }
        }
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
        }
    }

    #[test]
    fn an_older_put_never_undoes_a_delete() {
        let (s, l) = (State::new(), Lww::new());
        l.apply(&s, ts(5, 1), &put("a", "new"));
        l.apply(
            &s,
            ts(6, 2),
            &Op::Delete {
                key: Bytes::from_static(b"a"),
            },
        );
        l.apply(&s, ts(4, 3), &put("a", "old"));
        assert_eq!(s.get(b"a"), None);
        assert_eq!(l.tombstones(), 1);
        assert_eq!(l.purge(ts(7, 0)), 1);
        assert_eq!(l.tombstones(), 0);
    }

    #[test]
    fn digest_counts_live_keys_only() {
        let (s1, l1) = (State::new(), Lww::new());
        let (s2, l2) = (State::new(), Lww::new());
        l1.apply(&s1, ts(1, 1), &put("a", "x"));
        l2.apply(&s2, ts(1, 1), &put("a", "x"));
        l2.apply(
            &s2,
            ts(2, 1),
            &Op::Delete {
                key: Bytes::from_static(b"gone"),
            },
        );
        assert_eq!(l1.digests(), l2.digests());
        assert_eq!(
            l1.bucket(&s1, bucket_of(b"a"))[0].value.as_deref(),
            Some(&b"x"[..])
        );
    }
}
