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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// For a delete: whether the key existed.
    pub deleted: bool,
}

/// The key space.
pub struct State {
    shards: Box<[RwLock<HashTable<Entry>>]>,
    hasher: foldhash::fast::RandomState,
    keys: AtomicU64,
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
        match shard.find_mut(h, |e| entry_key(e) == key) {
            Some(slot) => {
                d ^= entry_digest(slot);
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
}
