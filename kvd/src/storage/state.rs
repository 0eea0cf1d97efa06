//! The in-memory key space: what reads see.
//!
//! Sharded so that readers on different keys do not contend and so that a
//! snapshot can be taken one shard at a time while writes keep flowing.
//! Each entry is ONE heap allocation, `[key_len u16][key][value]`, held in a
//! `hashbrown::HashTable`: about 16 bytes of table slot plus the allocation,
//! which keeps a million small keys well under what Redis needs for them.
//!
//! Invariant: only the WAL writer thread mutates the state (through
//! [`State::apply`]), in log order; everyone else only reads.
//!
//! The data set's size ([`State::data_bytes`], what `--max-memory-mib`
//! bounds) is kept current on every change rather than measured: each entry
//! counts its allocation (`2 + key + value` bytes) plus
//! [`ENTRY_OVERHEAD_BYTES`]. Reading the process's RSS instead would cost a
//! system call per write and count what is not data (the WAL buffer, the
//! log cache, freed memory the allocator keeps).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockWriteGuard};

use super::record::Op;
use crate::index::Index;

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

type Entry = Box<[u8]>;

/// Memory an entry costs beyond its allocation's length: its table slot (a
/// 16-byte pointer and a control byte, in a table kept between 7/16 and
/// 7/8 full) and the allocator's header and rounding.
pub const ENTRY_OVERHEAD_BYTES: u64 = 48;

/// What an entry of `entry_len` allocated bytes counts in the data set.
fn charge(entry_len: usize) -> u64 {
    entry_len as u64 + ENTRY_OVERHEAD_BYTES
}

/// Whether a write that grows the data set by `growth` bytes (negative: it
/// shrinks) fits in `limit` with `used` bytes taken: `Ok(used after)`, or
/// `Err(what it would reach)`. Writes that do not grow it always fit, so
/// deletes are taken even over the limit; what they free is not credited
/// until they are applied.
pub fn admit(used: u64, growth: i64, limit: u64) -> Result<u64, u64> {
    let Ok(growth) = u64::try_from(growth) else {
        return Ok(used);
    };
    if growth == 0 {
        return Ok(used);
    }
    let after = used.saturating_add(growth);
    if after <= limit {
        Ok(after)
    } else {
        Err(after)
    }
}

fn entry_key(e: &[u8]) -> &[u8] {
    let n = u16::from_le_bytes([e[0], e[1]]) as usize;
    &e[2..2 + n]
}

fn entry_value(e: &[u8]) -> &[u8] {
    let n = u16::from_le_bytes([e[0], e[1]]) as usize;
    &e[2 + n..]
}

fn make_entry(key: &[u8], value: &[u8]) -> Entry {
    let klen =
        u16::try_from(key.len()).expect("keys are at most 1024 bytes (validated at the API)");
    let mut v = Vec::with_capacity(2 + key.len() + value.len());
    v.extend_from_slice(&klen.to_le_bytes());
    v.extend_from_slice(key);
    v.extend_from_slice(value);
    v.into_boxed_slice()
}

/// What applying one op changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// For a delete: whether the key existed.
    pub deleted: bool,
    /// For a transaction, on the node that answers it: which branch ran
    /// and what its ops returned.
    pub txn: Option<crate::model::TxnResult>,
}

/// The key space.
pub struct State {
    shards: Box<[RwLock<HashTable<Entry>>]>,
    hasher: foldhash::fast::RandomState,
    keys: AtomicU64,
    /// Sum of [`charge`] over all entries (see the module docs).
    bytes: AtomicU64,
    /// XOR of `entry_digest` over all entries, kept current on every apply
    /// so that comparing replicas costs nothing.
    digest: AtomicU64,
    /// `kvd --index`: told every change in `put_locked` / `delete_locked`
    /// (and rebuilt by `replace_with`). Any new path that changes the key
    /// space must go through those two functions, or tell the index itself
    /// (`put` of the live value; a tombstone is a `delete` to the index).
    index: Option<Arc<Index>>,
}

/// Hash of one entry under a fixed seed: equal on every node and release.
fn entry_digest(entry: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6b76_7374_6f72_6521).hash_one(entry)
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    pub fn new() -> Self {
        Self::with_index(None)
    }

    /// A state that keeps `index` in step with its contents.
    pub fn with_index(index: Option<Arc<Index>>) -> Self {
        State {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            keys: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            digest: AtomicU64::new(0),
            index,
        }
    }

    /// The search index, with `kvd --index`.
    pub fn index(&self) -> Option<&Arc<Index>> {
        self.index.as_ref()
    }

    /// An empty state hashing like this one, to load a snapshot into
    /// before [`State::replace_with`] (without an index: that one rebuilds
    /// this state's index from the new contents).
    pub fn empty_like(&self) -> State {
        State {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            hasher: self.hasher,
            keys: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            digest: AtomicU64::new(0),
            index: None,
        }
    }

    /// Takes `other`'s contents (a state made by [`State::empty_like`]),
    /// shard by shard: readers see each key either old or new, which is
    /// what a secondary installing a snapshot may show.
    pub fn replace_with(&self, other: State) {
        for (mine, theirs) in self.shards.iter().zip(other.shards.iter()) {
            *mine.write() = std::mem::take(&mut *theirs.write());
        }
        self.keys
            .store(other.keys.load(Ordering::Relaxed), Ordering::Relaxed);
        self.bytes
            .store(other.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.digest
            .store(other.digest.load(Ordering::Relaxed), Ordering::Relaxed);
        if let Some(ix) = &self.index {
            ix.rebuild(|put| {
                for i in 0..SHARDS {
                    self.for_each_in_shard(i, |k, v| put(k, v));
                }
            });
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Shard from the middle bits of the hash. Not the top bits: hashbrown
    /// keeps the top 7 as each slot's tag, and if every entry of a shard
    /// shared its tag, every probe would have to compare whole keys.
    fn shard_of(hash: u64) -> usize {
        ((hash >> 32) & (SHARDS as u64 - 1)) as usize
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let h = self.hash(key);
        let shard = self.shards[Self::shard_of(h)].read();
        shard
            .find(h, |e| entry_key(e) == key)
            .map(|e| Bytes::copy_from_slice(entry_value(e)))
    }

    /// Number of live keys.
    pub fn len(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data set's size in bytes, as `--max-memory-mib` counts it.
    pub fn data_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// What `key`'s entry counts now (0 if absent).
    fn charged(&self, key: &[u8]) -> u64 {
        let h = self.hash(key);
        let shard = self.shards[Self::shard_of(h)].read();
        shard
            .find(h, |e| entry_key(e) == key)
            .map_or(0, |e| charge(e.len()))
    }

    /// How much applying `op` now would change [`State::data_bytes`].
    pub fn growth_bytes(&self, op: &Op) -> i64 {
        let new = |k: &[u8], v: &[u8]| charge(2 + k.len() + v.len());
        let diff = |new: u64, old: u64| {
            i64::try_from(new).unwrap_or(i64::MAX) - i64::try_from(old).unwrap_or(i64::MAX)
        };
        match op {
            Op::Txn { .. } => todo!("transactions are not built yet"),
            Op::Put { key, value } => diff(new(key, value), self.charged(key)),
            Op::Delete { key } => diff(0, self.charged(key)),
            Op::Bulk { items } => {
                // The last item for a key is what stays.
                let mut last = std::collections::HashMap::with_capacity(items.len());
                for (k, v) in items {
                    last.insert(&k[..], new(k, v));
                }
                last.into_iter()
                    .map(|(k, n)| diff(n, self.charged(k)))
                    .fold(0i64, i64::saturating_add)
            }
            Op::Noop => 0,
        }
    }

    pub fn shard_count(&self) -> usize {
        SHARDS
    }

    /// Calls `f(key, value)` for every entry of shard `i` under its read lock.
    pub fn for_each_in_shard(&self, i: usize, mut f: impl FnMut(&[u8], &[u8])) {
        let shard = self.shards[i].read();
        for e in shard.iter() {
            f(entry_key(e), entry_value(e));
        }
    }

    fn put_locked(&self, shard: &mut HashTable<Entry>, h: u64, key: &[u8], value: &[u8]) {
        if let Some(ix) = &self.index {
            ix.put(key, value);
        }
        let entry = make_entry(key, value);
        let mut d = entry_digest(&entry);
        self.bytes.fetch_add(charge(entry.len()), Ordering::Relaxed);
        match shard.find_mut(h, |e| entry_key(e) == key) {
            Some(slot) => {
                d ^= entry_digest(slot);
                self.bytes.fetch_sub(charge(slot.len()), Ordering::Relaxed);
                *slot = entry;
            }
            None => {
                shard.insert_unique(h, entry, |e| self.hash(entry_key(e)));
                self.keys.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.digest.fetch_xor(d, Ordering::Relaxed);
    }

    fn delete_locked(&self, shard: &mut HashTable<Entry>, h: u64, key: &[u8]) -> bool {
        match shard.find_entry(h, |e| entry_key(e) == key) {
            Ok(occupied) => {
                if let Some(ix) = &self.index {
                    ix.delete(key);
                }
                let (old, _) = occupied.remove();
                self.digest.fetch_xor(entry_digest(&old), Ordering::Relaxed);
                self.bytes.fetch_sub(charge(old.len()), Ordering::Relaxed);
                self.keys.fetch_sub(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Applies one log operation. The single place where the key space
    /// changes: local writes, WAL replay and (later) replicated entries all
    /// come through here.
    pub fn apply(&self, op: &Op) -> ApplyOutcome {
        match op {
            Op::Txn { .. } => todo!("transactions are not built yet"),
            Op::Put { key, value } => {
                let h = self.hash(key);
                let mut shard = self.shards[Self::shard_of(h)].write();
                self.put_locked(&mut shard, h, key, value);
                ApplyOutcome::default()
            }
            Op::Delete { key } => {
                let h = self.hash(key);
                let mut shard = self.shards[Self::shard_of(h)].write();
                ApplyOutcome {
                    deleted: self.delete_locked(&mut shard, h, key),
                    ..Default::default()
                }
            }
            Op::Bulk { items } => {
                // Readers must see all of a bulk or none of it, so every shard
                // it touches stays write-locked until the last item is in.
                // Locks are taken in shard order; readers hold one at a time.
                let hashes: Vec<u64> = items.iter().map(|(k, _)| self.hash(k)).collect();
                let mut wanted = [false; SHARDS];
                for h in &hashes {
                    wanted[Self::shard_of(*h)] = true;
                }
                let mut guards: Vec<Option<RwLockWriteGuard<'_, HashTable<Entry>>>> = wanted
                    .iter()
                    .enumerate()
                    .map(|(i, w)| w.then(|| self.shards[i].write()))
                    .collect();
                // Searches, too, see all of the bulk or none of it.
                let _index_batch = self.index.as_deref().map(Index::batch);
                for ((k, v), h) in items.iter().zip(&hashes) {
                    let guard = guards[Self::shard_of(*h)]
                        .as_mut()
                        .expect("every shard an item hashes to was locked above");
                    self.put_locked(guard, *h, k, v);
                }
                ApplyOutcome::default()
            }
            Op::Noop => ApplyOutcome::default(),
        }
    }

    /// Order-independent digest of the contents, for comparing replicas.
    pub fn digest(&self) -> u64 {
        self.digest.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn put_get_delete() {
        let s = State::new();
        s.apply(&Op::Put {
            key: b("a"),
            value: b("1"),
        });
        s.apply(&Op::Put {
            key: b("a"),
            value: b("2"),
        });
        assert_eq!(s.get(b"a"), Some(b("2")));
        assert_eq!(s.len(), 1);
        assert!(s.apply(&Op::Delete { key: b("a") }).deleted);
        assert!(!s.apply(&Op::Delete { key: b("a") }).deleted);
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn bulk_and_digest() {
        let s = State::new();
        let items: Vec<_> = (0..1000)
            .map(|i| (b(&format!("k{i}")), b(&format!("v{i}"))))
            .collect();
        s.apply(&Op::Bulk {
            items: items.clone(),
        });
        assert_eq!(s.len(), 1000);
        let t = State::new();
        for (k, v) in items.into_iter().rev() {
            t.apply(&Op::Put { key: k, value: v });
        }
        assert_eq!(s.digest(), t.digest());
    }

    /// What `data_bytes` must be: the charge of every entry, recounted.
    fn recount(s: &State) -> u64 {
        (0..s.shard_count())
            .map(|i| {
                let mut n = 0;
                s.for_each_in_shard(i, |k, v| n += charge(2 + k.len() + v.len()));
                n
            })
            .sum()
    }

    #[test]
    fn data_bytes_follow_every_change_and_growth_predicts_it() {
        let s = State::new();
        let ops = [
            Op::Put {
                key: b("a"),
                value: b("1234"),
            },
            Op::Put {
                key: b("a"),
                value: b("12"),
            },
            Op::Put {
                key: b("b"),
                value: b(&"x".repeat(1000)),
            },
            Op::Bulk {
                items: vec![(b("a"), b("long value")), (b("c"), b("")), (b("a"), b("z"))],
            },
            Op::Delete { key: b("b") },
            Op::Delete { key: b("missing") },
            Op::Noop,
        ];
        for op in &ops {
            let before = s.data_bytes();
            let growth = s.growth_bytes(op);
            s.apply(op);
            assert_eq!(s.data_bytes(), recount(&s), "after {op:?}");
            assert_eq!(s.data_bytes() as i64 - before as i64, growth, "{op:?}");
        }
        assert_eq!(
            s.data_bytes(),
            2 * ENTRY_OVERHEAD_BYTES + (2 + 1 + 1) + (2 + 1)
        );
        let t = s.empty_like();
        t.apply(&Op::Put {
            key: b("x"),
            value: b("y"),
        });
        s.replace_with(t);
        assert_eq!(s.data_bytes(), recount(&s));
        s.apply(&Op::Delete { key: b("x") });
        assert_eq!(s.data_bytes(), 0);
    }

    #[test]
    fn admit_refuses_only_growth_past_the_limit() {
        assert_eq!(admit(90, 10, 100), Ok(100));
        assert_eq!(admit(90, 11, 100), Err(101));
        assert_eq!(
            admit(150, -20, 100),
            Ok(150),
            "shrinking writes pass over the limit"
        );
        assert_eq!(admit(150, 0, 100), Ok(150), "so do deletes of absent keys");
        assert_eq!(
            admit(u64::MAX - 1, 5, u64::MAX - 1),
            Err(u64::MAX),
            "saturates"
        );
    }
}
