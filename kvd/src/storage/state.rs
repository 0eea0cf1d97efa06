//! The in-memory key space: what reads see.
//!
//! One ordered index ([`KeySpace`]) of every key with its value and
//! versions, behind one `RwLock`, with the index of the last record applied
//! kept under the same lock: a read knows which cut of the log it saw (a
//! range page answers with it). A bulk or a transaction is applied under
//! one write lock, so readers see all of it or none of it. Snapshots copy
//! the keys out in chunks by key cursor ([`State::chunk`]), taking the lock
//! once per chunk, so writes go on between chunks.
//!
//! Invariant: only the WAL writer thread mutates the state (through
//! [`State::apply`]), in log order; everyone else only reads.
//!
//! Versions (docs/DESIGN.md §2.10): a record that puts a key makes its
//! `mod_index` the record's index and adds one to its `version` (however
//! often the record writes it), a key it creates gets `create_index` too,
//! a delete forgets them. **Replay rule** (§3.4): a record leaves alone
//! every key whose `mod_index` is at or past the record's index. In a
//! straight run no key can be there yet; after a fuzzy snapshot such a key
//! already holds that record's effect or a later one, and applying it again
//! would count its version twice.
//!
//! The data set's size ([`State::data_bytes`], what `--max-memory-mib`
//! bounds) is kept current on every change rather than measured: each entry
//! counts `2 + key + value` bytes plus [`ENTRY_OVERHEAD_BYTES`]. Reading the
//! process's RSS instead would cost a system call per write and count what
//! is not data (the WAL buffer, the log cache, freed memory the allocator
//! keeps).

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use super::keyspace::{Entry, EntryRef, KeySpace, Upsert};
use super::record::Op;
use super::watch::WatchHub;
use crate::index::Index;
use crate::model::{
    Expiry, Item, KeyMeta, KeyRange, OpResult, Page, RangeRead, TxnOp, TxnResult,
    MAX_PAGE_VALUE_BYTES,
};

/// Memory an entry costs beyond its `2 + key + value` bytes: its versions
/// (three varints and their length, 8 bytes once indexes pass 2^14), its
/// end offset in the leaf (4), and its share of the leaf's spare capacity
/// and of the allocator's holes and the leaf's own cost. Measured for a
/// million 16-byte keys with 100-byte values (118 content bytes each), the
/// state grows the process by 134 bytes a key loaded in key order and 160 in
/// random order: 16 and 42 bytes over the content; this is between.
pub const ENTRY_OVERHEAD_BYTES: u64 = 32;

/// What an entry whose content is `content_len` bytes counts in the data set.
fn charge(content_len: usize) -> u64 {
    content_len as u64 + ENTRY_OVERHEAD_BYTES
}

/// What `(key, value)` would count.
fn charge_of(key: &[u8], value: &[u8]) -> u64 {
    charge(2 + key.len() + value.len())
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

/// The versions a put at log index `index` gives a key whose versions are
/// `current` (`None`: absent), or `None` when the replay rule leaves the key
/// alone. `rewrite`: the same record already wrote the key (a transaction
/// writing it twice), which counts as one write.
pub fn put_meta(current: Option<KeyMeta>, index: u64, rewrite: bool) -> Option<KeyMeta> {
    match current {
        None => Some(KeyMeta {
            create_index: index,
            mod_index: index,
            version: 1,
        }),
        Some(m) if rewrite => Some(m),
        Some(m) if m.mod_index < index => Some(KeyMeta {
            mod_index: index,
            version: m.version.saturating_add(1),
            ..m
        }),
        Some(_) => None,
    }
}

/// Whether a delete at `index` removes a key whose versions are `current`
/// (the replay rule of [`put_meta`]).
pub fn delete_applies(current: KeyMeta, index: u64, rewrite: bool) -> bool {
    rewrite || current.mod_index < index
}

/// What applying one op changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// For a delete: whether the key existed.
    pub deleted: bool,
    /// For a transaction, on the node that answers it: what its ops
    /// returned (the caller fills in `succeeded`, which the record does not
    /// carry).
    pub txn: Option<TxnResult>,
}

/// The key space and the index of the last record applied to it.
#[derive(Default)]
struct Inner {
    space: KeySpace,
    applied: u64,
}

/// The key space.
pub struct State {
    inner: RwLock<Inner>,
    keys: AtomicU64,
    /// Sum of [`charge`] over all entries (see the module docs).
    bytes: AtomicU64,
    /// XOR of the entries' content digests, kept current on every apply so
    /// that comparing replicas costs nothing.
    digest: AtomicU64,
    /// `kvd --index`: told every change [`State::apply`] makes (after the
    /// state's lock is released, in one index batch per record) and
    /// rebuilt by [`State::replace_with`].
    index: Option<Arc<Index>>,
    /// Told every record [`State::apply`] applies, with what it changed.
    watch: Arc<WatchHub>,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

fn item(e: EntryRef<'_>, keys_only: bool) -> Item {
    Item {
        key: Bytes::copy_from_slice(e.key()),
        value: (!keys_only).then(|| Bytes::copy_from_slice(e.value())),
        meta: e.meta(),
        expiry: Expiry::Never,
    }
}

/// At most `read.limit` items of `read.range` (fewer once the values reach
/// [`MAX_PAGE_VALUE_BYTES`], at least one), and whether the range holds
/// keys after them.
fn page(space: &KeySpace, read: &RangeRead) -> (Vec<Item>, bool) {
    let (mut items, mut bytes, mut more) = (Vec::new(), 0usize, false);
    let end = read.range.end.as_deref();
    space.scan(Bound::Included(&read.range.start), |e| {
        if end.is_some_and(|end| e.key() >= end) {
            return false;
        }
        if items.len() >= read.limit || (bytes >= MAX_PAGE_VALUE_BYTES && !items.is_empty()) {
            more = true;
            return false;
        }
        if !read.keys_only {
            bytes += e.value().len();
        }
        items.push(item(e, read.keys_only));
        true
    });
    (items, more)
}

impl State {
    pub fn new() -> Self {
        Self::with_index(None)
    }

    /// A state that keeps `index` in step with its contents.
    pub fn with_index(index: Option<Arc<Index>>) -> Self {
        State {
            inner: RwLock::new(Inner::default()),
            keys: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            digest: AtomicU64::new(0),
            index,
            watch: Arc::new(WatchHub::new()),
        }
    }

    /// The events of the records applied here, for watches.
    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.watch
    }

    /// The search index, with `kvd --index`.
    pub fn index(&self) -> Option<&Arc<Index>> {
        self.index.as_ref()
    }

    /// An empty state to load a snapshot into before
    /// [`State::replace_with`] (without an index: that one rebuilds this
    /// state's index from the new contents).
    pub fn empty_like(&self) -> State {
        State::new()
    }

    /// Takes `other`'s contents (a state made by [`State::empty_like`]) in
    /// one step: readers see the old contents or the new.
    pub fn replace_with(&self, other: State) {
        let theirs = std::mem::take(&mut *other.inner.write());
        *self.inner.write() = theirs;
        for (mine, theirs) in [
            (&self.keys, &other.keys),
            (&self.bytes, &other.bytes),
            (&self.digest, &other.digest),
        ] {
            mine.store(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Some(ix) = &self.index {
            ix.rebuild(|put| self.for_each(|k, v, _| put(k, v)));
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let inner = self.inner.read();
        inner
            .space
            .get(key)
            .map(|e| Bytes::copy_from_slice(e.value()))
    }

    /// A key's value and versions.
    pub fn get_versioned(&self, key: &[u8]) -> Option<(Bytes, KeyMeta)> {
        let inner = self.inner.read();
        inner
            .space
            .get(key)
            .map(|e| (Bytes::copy_from_slice(e.value()), e.meta()))
    }

    /// One page of a range read, and the applied index it is a cut of.
    pub fn range(&self, read: &RangeRead) -> Page {
        let inner = self.inner.read();
        let (items, more) = page(&inner.space, read);
        Page {
            items,
            more,
            index: inner.applied,
        }
    }

    /// How many keys `range` holds, and the applied index of that count.
    pub fn count(&self, range: &KeyRange) -> (u64, u64) {
        let inner = self.inner.read();
        (inner.space.count(range), inner.applied)
    }

    /// The keys of `range`, in order.
    pub fn keys_in(&self, range: &KeyRange) -> Vec<Bytes> {
        let inner = self.inner.read();
        let mut keys = Vec::new();
        let end = range.end.as_deref();
        inner.space.scan(Bound::Included(&range.start), |e| {
            let inside = end.is_none_or(|end| e.key() < end);
            if inside {
                keys.push(Bytes::copy_from_slice(e.key()));
            }
            inside
        });
        keys
    }

    /// Index of the last record applied (or skipped, `debug_flaky`); a
    /// loaded snapshot's last index.
    pub fn applied_index(&self) -> u64 {
        self.inner.read().applied
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

    /// Leaves of the ordered index (for the memory figures).
    pub fn leaf_count(&self) -> usize {
        self.inner.read().space.leaf_count()
    }

    /// How much applying `op` now would change [`State::data_bytes`]: each
    /// key a bulk or a transaction writes counts by its last write.
    pub fn growth_bytes(&self, op: &Op) -> i64 {
        let inner = self.inner.read();
        let charged = |k: &[u8]| {
            inner
                .space
                .get(k)
                .map_or(0, |e| charge(2 + e.key().len() + e.value().len()))
        };
        let diff = |new: u64, old: u64| {
            i64::try_from(new).unwrap_or(i64::MAX) - i64::try_from(old).unwrap_or(i64::MAX)
        };
        let mut last: HashMap<&[u8], u64> = HashMap::new();
        match op {
            Op::Put { key, value, .. } => return diff(charge_of(key, value), charged(key)),
            Op::Delete { key } => return diff(0, charged(key)),
            Op::Noop => return 0,
            Op::Expire { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseKeepAlive { .. }
            | Op::LeaseRevoke { .. } => return 0,
            Op::Bulk { items } => {
                for (k, v, _) in items {
                    last.insert(k, charge_of(k, v));
                }
            }
            // A prefix delete only frees, which is credited once applied.
            Op::Txn { ops } => {
                for op in ops {
                    match op {
                        TxnOp::Put { key, value, .. } => last.insert(key, charge_of(key, value)),
                        TxnOp::Delete { key } => last.insert(key, 0),
                        _ => None,
                    };
                }
            }
        }
        last.into_iter()
            .map(|(k, n)| diff(n, charged(k)))
            .fold(0i64, i64::saturating_add)
    }

    /// Copies out the entries after `after` (from the first key when
    /// `None`) in key order through `f`, about `max_bytes` of them under
    /// one read lock; returns the key to continue after, or `None` when
    /// this chunk reached the end.
    pub fn chunk(
        &self,
        after: Option<&[u8]>,
        max_bytes: usize,
        mut f: impl FnMut(&[u8], &[u8], KeyMeta),
    ) -> Option<Vec<u8>> {
        let inner = self.inner.read();
        let (mut taken, mut last, mut stopped) = (0usize, None, false);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        inner.space.scan(start, |e| {
            if taken >= max_bytes {
                stopped = true;
                return false;
            }
            f(e.key(), e.value(), e.meta());
            taken += e.key().len() + e.value().len() + 32;
            last = Some(e.key());
            true
        });
        stopped.then(|| last.map(<[u8]>::to_vec)).flatten()
    }

    /// Calls `f(key, value, versions)` for every entry in key order, one
    /// chunk of about 1 MiB per read lock.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8], KeyMeta)) {
        let mut cursor = self.chunk(None, 1 << 20, &mut f);
        while let Some(after) = cursor {
            cursor = self.chunk(Some(&after), 1 << 20, &mut f);
        }
    }

    fn counted(&self, up: Upsert) {
        match up {
            Upsert::Inserted { new } => {
                self.keys.fetch_add(1, Ordering::Relaxed);
                self.bytes
                    .fetch_add(charge(new.content_len), Ordering::Relaxed);
                self.digest.fetch_xor(new.digest, Ordering::Relaxed);
            }
            Upsert::Replaced { old, new } => {
                self.bytes
                    .fetch_add(charge(new.content_len), Ordering::Relaxed);
                self.bytes
                    .fetch_sub(charge(old.content_len), Ordering::Relaxed);
                self.digest
                    .fetch_xor(old.digest ^ new.digest, Ordering::Relaxed);
            }
            Upsert::Skipped => {}
        }
    }

    fn removed(&self, old: Entry) {
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.bytes
            .fetch_sub(charge(old.content_len), Ordering::Relaxed);
        self.digest.fetch_xor(old.digest, Ordering::Relaxed);
    }

    /// Snapshot load: sets `key` with the versions the snapshot holds.
    pub fn load(&self, key: &[u8], value: &[u8], meta: KeyMeta) {
        let up = self.inner.write().space.upsert(key, value, |_| Some(meta));
        self.counted(up);
        if let Some(ix) = &self.index {
            ix.put(key, value);
        }
    }

    /// Snapshot load: removes `key` (a tombstone newer than an earlier
    /// entry of the same key).
    pub fn unload(&self, key: &[u8]) {
        let old = self.inner.write().space.remove_if(key, |_| true);
        if let Some(old) = old {
            self.removed(old);
            if let Some(ix) = &self.index {
                ix.delete(key);
            }
        }
    }

    /// Marks `index` applied without changing anything: a loaded snapshot's
    /// last index, or a record logged but kept out of memory
    /// (`debug_flaky`).
    pub fn skip_to(&self, index: u64) {
        let mut inner = self.inner.write();
        inner.applied = inner.applied.max(index);
    }

    /// Mode switch: every key gets `create_index = mod_index = base`,
    /// `version = 1` (docs/DESIGN.md §6.1), and `base` is the applied index.
    pub fn rebase_versions(&self, base: u64) {
        let mut inner = self.inner.write();
        inner.space.map_meta(|_| KeyMeta {
            create_index: base,
            mod_index: base,
            version: 1,
        });
        inner.applied = base;
    }

    /// Applies record `index`'s op: the single place where the key space
    /// changes (local writes, WAL replay, replicated entries and merges all
    /// come through here). `reads`: this node answers the record, so a
    /// transaction's reads and results are computed (a secondary and a
    /// replay skip them).
    pub fn apply(&self, index: u64, op: &Op, reads: bool) -> ApplyOutcome {
        // provisional: what the keys held before, for the watch events.
        let provisional_prev = provisional_keys(op)
            .into_iter()
            .map(|k| (k.clone(), self.get(k)))
            .collect::<Vec<_>>();
        let mut changes = self.index.as_ref().map(|_| Vec::new());
        let outcome = {
            let mut inner = self.inner.write();
            debug_assert!(
                index > inner.applied || index == 0,
                "State invariant: record {index} applied after {}",
                inner.applied
            );
            inner.applied = inner.applied.max(index);
            let mut a = Apply {
                state: self,
                space: &mut inner.space,
                index,
                rewrites: matches!(op, Op::Txn { .. }).then(Vec::new),
                changes: changes.as_mut(),
            };
            a.op(op, reads)
        };
        if let (Some(ix), Some(changes)) = (&self.index, changes) {
            // Searches, too, see all of a record or none of it.
            let _batch = ix.batch();
            for (k, v) in changes {
                match v {
                    Some(v) => ix.put(&k, &v),
                    None => ix.delete(&k),
                }
            }
        }
        // provisional: the events of a put, delete or bulk (no stamp), until
        // the apply itself reports them.
        let events = provisional_prev
            .into_iter()
            .filter_map(|(key, prev)| {
                let now = self.get_versioned(&key);
                let deleted = matches!(op, Op::Delete { .. });
                let (kind, value, meta) = match now {
                    Some((v, m)) if !deleted => (crate::model::EventKind::Put, Some(v), m),
                    _ if deleted && outcome.deleted => {
                        (crate::model::EventKind::Delete, None, KeyMeta::default())
                    }
                    _ => return None,
                };
                Some(crate::model::Event {
                    kind,
                    key,
                    value,
                    prev,
                    meta,
                })
            })
            .collect();
        self.watch.publish(crate::model::RecordEvents {
            index,
            ts: Default::default(),
            events,
        });
        outcome
    }

    /// Order-independent digest of the contents, for comparing replicas.
    pub fn digest(&self) -> u64 {
        self.digest.load(Ordering::Relaxed)
    }
}

// provisional: the keys a put, delete or bulk writes, in event order (a
// bulk: each key once, in key order).
fn provisional_keys(op: &Op) -> Vec<&Bytes> {
    match op {
        Op::Put { key, .. } | Op::Delete { key } => vec![key],
        Op::Bulk { items } => {
            let mut keys: Vec<&Bytes> = items.iter().map(|(k, _, _)| k).collect();
            keys.sort();
            keys.dedup();
            keys
        }
        _ => Vec::new(),
    }
}

/// One record being applied under the state's write lock.
struct Apply<'a> {
    state: &'a State,
    space: &'a mut KeySpace,
    index: u64,
    /// A transaction: the keys it has put so far (its second write of a key
    /// is not a replayed one).
    rewrites: Option<Vec<Bytes>>,
    /// With `--index`: every change, for the index once the lock is gone.
    changes: Option<&'a mut Vec<(Bytes, Option<Bytes>)>>,
}

impl Apply<'_> {
    fn op(&mut self, op: &Op, reads: bool) -> ApplyOutcome {
        match op {
            Op::Put { key, value, .. } => self.put(key, value),
            Op::Delete { key } => {
                return ApplyOutcome {
                    deleted: self.delete(key),
                    txn: None,
                }
            }
            Op::Bulk { items } => self.bulk(items),
            Op::Noop => {}
            Op::Expire { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseKeepAlive { .. }
            | Op::LeaseRevoke { .. } => {}
            Op::Txn { ops } => {
                return ApplyOutcome {
                    deleted: false,
                    txn: self.txn(ops, reads),
                }
            }
        }
        ApplyOutcome::default()
    }

    fn rewrite(&self, key: &[u8]) -> bool {
        self.rewrites
            .as_ref()
            .is_some_and(|r| r.iter().any(|k| k == key))
    }

    fn put(&mut self, key: &Bytes, value: &Bytes) {
        let (index, rewrite) = (self.index, self.rewrite(key));
        let up = self.space.upsert(key, value, |cur| {
            put_meta(cur.map(|e| e.meta()), index, rewrite)
        });
        if up == Upsert::Skipped {
            return;
        }
        self.state.counted(up);
        if let Some(c) = self.changes.as_mut() {
            c.push((key.clone(), Some(value.clone())));
        }
        if let Some(r) = self.rewrites.as_mut().filter(|_| !rewrite) {
            r.push(key.clone());
        }
    }

    fn delete(&mut self, key: &Bytes) -> bool {
        let (index, rewrite) = (self.index, self.rewrite(key));
        let Some(old) = self
            .space
            .remove_if(key, |e| delete_applies(e.meta(), index, rewrite))
        else {
            return false;
        };
        self.state.removed(old);
        if let Some(c) = self.changes.as_mut() {
            c.push((key.clone(), None));
        }
        true
    }

    /// A bulk: the last item of each key, in key order.
    fn bulk(&mut self, items: &[(Bytes, Bytes, Expiry)]) {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| items[a].0.cmp(&items[b].0).then(b.cmp(&a)));
        order.dedup_by(|a, b| items[*a].0 == items[*b].0);
        for i in order {
            self.put(&items[i].0, &items[i].1);
        }
    }

    fn delete_prefix(&mut self, prefix: &[u8]) -> u64 {
        let Apply {
            state,
            space,
            index,
            rewrites,
            changes,
        } = self;
        let n = space.remove_range_if(&KeyRange::prefix(prefix), |e| {
            let rewrite = rewrites
                .as_ref()
                .is_some_and(|r| r.iter().any(|k| k == e.key()));
            let gone = delete_applies(e.meta(), *index, rewrite);
            if gone {
                state.removed(e.summary());
                if let Some(c) = changes.as_mut() {
                    c.push((Bytes::copy_from_slice(e.key()), None));
                }
            }
            gone
        });
        n as u64
    }

    /// A transaction's ops in order; with `reads`, what each returned
    /// (reads see the writes before them).
    fn txn(&mut self, ops: &[TxnOp], reads: bool) -> Option<TxnResult> {
        let mut results = Vec::with_capacity(if reads { ops.len() } else { 0 });
        for op in ops {
            let result = match op {
                TxnOp::Put { key, value, .. } => {
                    self.put(key, value);
                    OpResult::Put {
                        mod_index: self.index,
                    }
                }
                TxnOp::Delete { key } => OpResult::Delete {
                    deleted: self.delete(key),
                },
                TxnOp::DeletePrefix { prefix } => OpResult::DeletePrefix {
                    deleted: self.delete_prefix(prefix),
                },
                TxnOp::Get { key } if reads => {
                    OpResult::Get(self.space.get(key).map(|e| item(e, false)))
                }
                TxnOp::Range(read) if reads => {
                    let (items, more) = page(self.space, read);
                    OpResult::Range { items, more }
                }
                TxnOp::Get { .. } | TxnOp::Range(_) => continue,
            };
            if reads {
                results.push(result);
            }
        }
        reads.then_some(TxnResult {
            succeeded: true,
            results,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: b(k),
            value: b(v),
            expiry: Expiry::Never,
        }
    }

    fn del(k: &str) -> Op {
        Op::Delete { key: b(k) }
    }

    fn meta(create_index: u64, mod_index: u64, version: u64) -> KeyMeta {
        KeyMeta {
            create_index,
            mod_index,
            version,
        }
    }

    /// Applies `ops` as records 1, 2, ...
    fn run(s: &State, ops: &[Op]) {
        let first = s.applied_index() + 1;
        for (i, op) in ops.iter().enumerate() {
            s.apply(first + i as u64, op, false);
        }
    }

    #[test]
    fn put_get_delete() {
        let s = State::new();
        run(&s, &[put("a", "1"), put("a", "2")]);
        assert_eq!(s.get(b"a"), Some(b("2")));
        assert_eq!(s.len(), 1);
        assert!(s.apply(3, &del("a"), false).deleted);
        assert!(!s.apply(4, &del("a"), false).deleted);
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn versions_count_writes_since_creation() {
        let s = State::new();
        run(
            &s,
            &[put("a", "1"), put("b", "1"), put("a", "2"), put("a", "3")],
        );
        assert_eq!(s.get_versioned(b"a"), Some((b("3"), meta(1, 4, 3))));
        assert_eq!(s.get_versioned(b"b"), Some((b("1"), meta(2, 2, 1))));
        run(&s, &[del("a"), put("a", "again")]);
        assert_eq!(s.get_versioned(b"a"), Some((b("again"), meta(6, 6, 1))));
        let bulk = Op::Bulk {
            items: vec![
                (b("b"), b("x"), Expiry::Never),
                (b("c"), b("y"), Expiry::Never),
                (b("b"), b("z"), Expiry::Never),
            ],
        };
        run(&s, &[bulk]);
        assert_eq!(
            s.get_versioned(b"b"),
            Some((b("z"), meta(2, 7, 2))),
            "one write per record"
        );
        assert_eq!(s.get_versioned(b"c"), Some((b("y"), meta(7, 7, 1))));
    }

    #[test]
    fn the_replay_rule_skips_keys_already_at_or_past_the_record() {
        assert_eq!(put_meta(None, 5, false), Some(meta(5, 5, 1)));
        assert_eq!(put_meta(Some(meta(2, 4, 3)), 5, false), Some(meta(2, 5, 4)));
        assert_eq!(put_meta(Some(meta(2, 5, 3)), 5, false), None);
        assert_eq!(put_meta(Some(meta(2, 9, 3)), 5, false), None);
        assert_eq!(put_meta(Some(meta(2, 5, 3)), 5, true), Some(meta(2, 5, 3)));
        assert!(delete_applies(meta(1, 4, 1), 5, false));
        assert!(!delete_applies(meta(1, 5, 1), 5, false));
        assert!(delete_applies(meta(1, 5, 1), 5, true));
    }

    #[test]
    fn a_transaction_reads_its_own_writes_and_counts_one_write_per_key() {
        let s = State::new();
        run(&s, &[put("p/1", "old"), put("p/2", "x"), put("q", "y")]);
        let ops = vec![
            TxnOp::Put {
                key: b("p/1"),
                value: b("a"),
                expiry: Expiry::Never,
            },
            TxnOp::Put {
                key: b("p/1"),
                value: b("b"),
                expiry: Expiry::Never,
            },
            TxnOp::Get { key: b("p/1") },
            TxnOp::DeletePrefix { prefix: b("p/") },
            TxnOp::Get { key: b("p/1") },
            TxnOp::Put {
                key: b("p/3"),
                value: b("c"),
                expiry: Expiry::Never,
            },
            TxnOp::Range(RangeRead {
                range: KeyRange::prefix(b""),
                limit: 10,
                keys_only: true,
            }),
            TxnOp::Delete { key: b("nope") },
        ];
        let r = s.apply(4, &Op::Txn { ops }, true).txn.unwrap();
        let got = |k: &str, m| Item {
            key: b(k),
            value: None,
            meta: m,
            expiry: Expiry::Never,
        };
        assert_eq!(
            r.results,
            vec![
                OpResult::Put { mod_index: 4 },
                OpResult::Put { mod_index: 4 },
                OpResult::Get(Some(Item {
                    key: b("p/1"),
                    value: Some(b("b")),
                    meta: meta(1, 4, 2),
                    expiry: Expiry::Never,
                })),
                OpResult::DeletePrefix { deleted: 2 },
                OpResult::Get(None),
                OpResult::Put { mod_index: 4 },
                OpResult::Range {
                    items: vec![got("p/3", meta(4, 4, 1)), got("q", meta(3, 3, 1))],
                    more: false
                },
                OpResult::Delete { deleted: false },
            ]
        );
        assert_eq!(s.len(), 2);
        // A replica or a replay runs no reads.
        assert_eq!(
            s.apply(
                5,
                &Op::Txn {
                    ops: vec![TxnOp::Get { key: b("q") }]
                },
                false
            )
            .txn,
            None
        );
    }

    #[test]
    fn pages_stop_at_their_limit_and_say_whether_more_follow() {
        let s = State::new();
        let items = (0..10)
            .map(|i| (b(&format!("k{i}")), b("v"), Expiry::Never))
            .collect();
        run(&s, &[Op::Bulk { items }, put("l", "")]);
        let read = |start: &str, end: Option<&str>, limit| RangeRead {
            range: KeyRange {
                start: b(start),
                end: end.map(b),
            },
            limit,
            keys_only: false,
        };
        let p = s.range(&read("k3", Some("k6"), 10));
        assert_eq!((p.items.len(), p.more, p.index), (3, false, 2));
        let p = s.range(&read("k3", Some("k6"), 3));
        assert_eq!((p.items.len(), p.more), (3, false));
        let p = s.range(&read("k3", Some("k6"), 2));
        assert_eq!((p.items.len(), p.more), (2, true));
        assert_eq!(p.items[1].key, b("k4"));
        assert_eq!(s.count(&KeyRange::prefix(b"k")), (10, 2));
        assert_eq!(s.keys_in(&KeyRange::prefix(b"k9")), vec![b("k9")]);
    }

    #[test]
    fn bulk_and_digest() {
        let s = State::new();
        let items: Vec<_> = (0..1000)
            .map(|i| (b(&format!("k{i}")), b(&format!("v{i}")), Expiry::Never))
            .collect();
        s.apply(
            1,
            &Op::Bulk {
                items: items.clone(),
            },
            false,
        );
        assert_eq!(s.len(), 1000);
        let t = State::new();
        for (i, (k, v, _)) in items.into_iter().rev().enumerate() {
            t.apply(
                i as u64 + 1,
                &Op::Put {
                    key: k,
                    value: v,
                    expiry: Expiry::Never,
                },
                false,
            );
        }
        assert_eq!(s.digest(), t.digest());
    }

    /// What `data_bytes` must be: the charge of every entry, recounted.
    fn recount(s: &State) -> u64 {
        let mut n = 0;
        s.for_each(|k, v, _| n += charge_of(k, v));
        n
    }

    #[test]
    fn data_bytes_follow_every_change_and_growth_predicts_it() {
        let s = State::new();
        let txn = Op::Txn {
            ops: vec![
                TxnOp::Put {
                    key: b("t"),
                    value: b("12345"),
                    expiry: Expiry::Never,
                },
                TxnOp::Delete { key: b("c") },
                TxnOp::Put {
                    key: b("t"),
                    value: b("1"),
                    expiry: Expiry::Never,
                },
                TxnOp::Put {
                    key: b("c"),
                    value: b("cc"),
                    expiry: Expiry::Never,
                },
            ],
        };
        let ops = [
            put("a", "1234"),
            put("a", "12"),
            put("b", &"x".repeat(1000)),
            Op::Bulk {
                items: vec![
                    (b("a"), b("long value"), Expiry::Never),
                    (b("c"), b(""), Expiry::Never),
                    (b("a"), b("z"), Expiry::Never),
                ],
            },
            del("b"),
            del("missing"),
            txn,
            Op::Noop,
        ];
        for (i, op) in ops.iter().enumerate() {
            let before = s.data_bytes();
            let growth = s.growth_bytes(op);
            s.apply(i as u64 + 1, op, false);
            assert_eq!(s.data_bytes(), recount(&s), "after {op:?}");
            assert_eq!(s.data_bytes() as i64 - before as i64, growth, "{op:?}");
        }
        assert_eq!(
            s.data_bytes(),
            3 * ENTRY_OVERHEAD_BYTES + (2 + 1 + 1) + (2 + 1 + 2) + (2 + 1 + 1)
        );
        let t = s.empty_like();
        t.apply(1, &put("x", "y"), false);
        s.replace_with(t);
        assert_eq!(s.data_bytes(), recount(&s));
        s.apply(2, &del("x"), false);
        assert_eq!(s.data_bytes(), 0);
    }

    #[test]
    fn chunks_visit_every_key_once_in_order() {
        let s = State::new();
        let items = (0..5000)
            .map(|i| (b(&format!("k{i:05}")), b("value"), Expiry::Never))
            .collect();
        s.apply(1, &Op::Bulk { items }, false);
        let (mut seen, mut chunks) = (Vec::new(), 0);
        let mut cursor = None::<Vec<u8>>;
        loop {
            chunks += 1;
            cursor = s.chunk(cursor.as_deref(), 4096, |k, _, _| seen.push(k.to_vec()));
            if cursor.is_none() {
                break;
            }
        }
        assert!(chunks > 10);
        let want: Vec<_> = (0..5000).map(|i| format!("k{i:05}").into_bytes()).collect();
        assert_eq!(seen, want);
    }

    fn random_op(rng: &mut StdRng) -> Op {
        let k = |rng: &mut StdRng| b(["a/1", "a/2", "b/1", "b/2", "c"][rng.gen_range(0..5)]);
        let v = |rng: &mut StdRng| b(&rng.gen_range(0..100).to_string());
        match rng.gen_range(0..10) {
            0..=3 => Op::Put {
                key: k(rng),
                value: v(rng),
                expiry: Expiry::Never,
            },
            4..=5 => Op::Delete { key: k(rng) },
            6 => Op::Bulk {
                items: (0..rng.gen_range(1..4))
                    .map(|_| (k(rng), v(rng), Expiry::Never))
                    .collect(),
            },
            _ => Op::Txn {
                ops: (0..rng.gen_range(0..5))
                    .map(|_| match rng.gen_range(0..4) {
                        0 | 1 => TxnOp::Put {
                            key: k(rng),
                            value: v(rng),
                            expiry: Expiry::Never,
                        },
                        2 => TxnOp::Delete { key: k(rng) },
                        _ => TxnOp::DeletePrefix {
                            prefix: b(["a/", "b/"][rng.gen_range(0..2)]),
                        },
                    })
                    .collect(),
            },
        }
    }

    fn everything(s: &State) -> Vec<(Vec<u8>, Vec<u8>, KeyMeta)> {
        let mut out = Vec::new();
        s.for_each(|k, v, m| out.push((k.to_vec(), v.to_vec(), m)));
        out
    }

    /// docs/DESIGN.md §3.4: a snapshot taken while writes go on, one small
    /// chunk of keys at a time with records applied between chunks, then
    /// the log replayed after its last index, ends in exactly the contents
    /// and versions of a straight run.
    #[test]
    fn a_fuzzy_snapshot_and_its_replay_give_the_versions_of_a_straight_run() {
        let mut rng = StdRng::seed_from_u64(34);
        for case in 0..500 {
            let ops: Vec<Op> = (0..rng.gen_range(1..40))
                .map(|_| random_op(&mut rng))
                .collect();
            let straight = State::new();
            run(&straight, &ops);
            let live = State::new();
            let last = rng.gen_range(0..=ops.len());
            run(&live, &ops[..last]);
            let (snap, mut applied) = (State::new(), last);
            let mut cursor = None::<Vec<u8>>;
            loop {
                cursor = live.chunk(cursor.as_deref(), 1, |k, v, m| snap.load(k, v, m));
                let more = rng.gen_range(0..3).min(ops.len() - applied);
                run(&live, &ops[applied..applied + more]);
                applied += more;
                if cursor.is_none() {
                    break;
                }
            }
            snap.skip_to(last as u64);
            run(&snap, &ops[last..]);
            assert_eq!(everything(&snap), everything(&straight), "case {case}");
            assert_eq!(snap.digest(), straight.digest(), "case {case}");
        }
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
