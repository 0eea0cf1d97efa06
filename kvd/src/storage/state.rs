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

//!
//! Expiry (docs/DESIGN.md §2.15, §2.16; the rules in [`super::expiry`]):
//! an entry carries its deadline or lease, and the lock also guards the
//! deadline order and the lease table. Reads take the reading node's clock
//! and hide keys expired by it; a record decides by its stamp ("expired at
//! a record": such a key is absent to it). Every applied record's changes
//! go to the watch hub as one [`RecordEvents`], in log order.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::expiry::{self, Expiries, Lease, LeaseRow};
use super::keyspace::{Entry, EntryRef, KeySpace, Upsert};
use super::record::Op;
use super::watch::WatchHub;
use crate::index::Index;
use crate::model::{
    Event, EventKind, Expiry, Item, KeyMeta, KeyRange, LeaseInfo, OpResult, Page, RangeRead,
    RecordEvents, Timestamp, TxnOp, TxnResult, MAX_PAGE_VALUE_BYTES,
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

/// The expiry a put of `asked` leaves on a key that holds `current` (`None`:
/// absent or expired): [`Expiry::Keep`] keeps what it had, or none.
pub fn resolve_keep(asked: Expiry, current: Option<Expiry>) -> Expiry {
    match asked {
        Expiry::Keep => current.unwrap_or(Expiry::Never),
        other => other,
    }
}

/// Why a record changed nothing (the writer answers its request with it;
/// elsewhere it is just the record's effect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It names a lease that is not alive at its stamp.
    LeaseNotFound(u64),
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
    /// The record changed nothing, for this reason.
    pub refused: Option<Refusal>,
    /// A lease grant or keep-alive: the lease after it (no keys).
    pub lease: Option<LeaseInfo>,
    /// A lease revoke: how many keys it deleted.
    pub removed: u64,
}

/// The key space, the index of the last record applied to it, and the
/// deadlines and leases of its keys.
#[derive(Default)]
struct Inner {
    space: KeySpace,
    applied: u64,
    ttl: Expiries,
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
    /// Keys removed because they expired, since the state was made.
    expired: AtomicU64,
    /// The lease table as it was at an index a snapshot is about to cover
    /// (see [`State::freeze_leases`]).
    frozen_leases: Mutex<Option<(u64, Vec<LeaseRow>)>>,
    /// The configuration record a loaded snapshot carried (docs/DESIGN.md
    /// §3.4, §4.11): the log view starts its history from it.
    snapshot_config: Mutex<Option<(u64, crate::replication::config::Config)>>,
    /// `kvd --index`: told every change [`State::apply`] makes (after the
    /// state's lock is released, in one index batch per record) and
    /// rebuilt by [`State::replace_with`].
    index: Option<Arc<Index>>,
    /// Told every record [`State::apply`] applies, with what it changed.
    watch: Arc<WatchHub>,
    /// Tests: every record's events, as published.
    #[cfg(test)]
    published: Mutex<Vec<RecordEvents>>,
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
        expiry: e.expiry(),
    }
}

/// Whether `e` is readable at `now` (no expiry check at all while no key
/// has a deadline or a lease).
fn visible(ttl: &Expiries, e: EntryRef<'_>, now: u64) -> bool {
    ttl.is_empty() || !ttl.expired(e.expiry(), now)
}

/// At most `read.limit` items of `read.range` readable at `now` (fewer once
/// the values reach [`MAX_PAGE_VALUE_BYTES`], at least one), and whether
/// the range holds keys after them.
fn page(space: &KeySpace, ttl: &Expiries, read: &RangeRead, now: u64) -> (Vec<Item>, bool) {
    let (mut items, mut bytes, mut more) = (Vec::new(), 0usize, false);
    let end = read.range.end.as_deref();
    space.scan(Bound::Included(&read.range.start), |e| {
        if end.is_some_and(|end| e.key() >= end) {
            return false;
        }
        if !visible(ttl, e, now) {
            return true;
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
            expired: AtomicU64::new(0),
            frozen_leases: Mutex::new(None),
            snapshot_config: Mutex::new(None),
            index,
            watch: Arc::new(WatchHub::new()),
            #[cfg(test)]
            published: Mutex::new(Vec::new()),
        }
    }

    /// Hands a record's events to the watch hub (in log order: only the
    /// writer thread applies).
    fn publish(&self, events: RecordEvents) {
        #[cfg(test)]
        self.published.lock().push(events.clone());
        self.watch.publish(events);
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
    /// one step: readers see the old contents or the new. Watches cannot
    /// go on across it: the hub starts over after the new applied index.
    pub fn replace_with(&self, other: State) {
        let theirs = std::mem::take(&mut *other.inner.write());
        let next = theirs.applied + 1;
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
        self.watch.reset(next);
    }

    pub fn get(&self, key: &[u8], now: u64) -> Option<Bytes> {
        self.get_item(key, now).and_then(|i| i.value)
    }

    /// A key's value and versions, if it is readable at `now`.
    pub fn get_versioned(&self, key: &[u8], now: u64) -> Option<(Bytes, KeyMeta)> {
        self.get_item(key, now)
            .and_then(|i| i.value.map(|v| (v, i.meta)))
    }

    /// A key as a read returns it, if it is readable at `now`.
    pub fn get_item(&self, key: &[u8], now: u64) -> Option<Item> {
        let inner = self.inner.read();
        let e = inner.space.get(key)?;
        visible(&inner.ttl, e, now).then(|| item(e, false))
    }

    /// A key as it is held, expired or not (anti-entropy sends a version
    /// with the expiry it was written with).
    pub fn get_raw(&self, key: &[u8]) -> Option<Item> {
        self.inner.read().space.get(key).map(|e| item(e, false))
    }

    /// One page of a range read at `now`, and the applied index it is a
    /// cut of.
    pub fn range(&self, read: &RangeRead, now: u64) -> Page {
        let inner = self.inner.read();
        let (items, more) = page(&inner.space, &inner.ttl, read, now);
        Page {
            items,
            more,
            index: inner.applied,
        }
    }

    /// How many keys `range` holds at `now`, and the applied index of that
    /// count.
    pub fn count(&self, range: &KeyRange, now: u64) -> (u64, u64) {
        let inner = self.inner.read();
        let mut n = inner.space.count(range);
        if !inner.ttl.is_empty() {
            n = n.saturating_sub(inner.ttl.expired_in(range, now));
        }
        (n, inner.applied)
    }

    /// The keys of `range` readable at `now`, in order.
    pub fn keys_in(&self, range: &KeyRange, now: u64) -> Vec<Bytes> {
        let inner = self.inner.read();
        let mut keys = Vec::new();
        let end = range.end.as_deref();
        inner.space.scan(Bound::Included(&range.start), |e| {
            let inside = end.is_none_or(|end| e.key() < end);
            if inside && visible(&inner.ttl, e, now) {
                keys.push(Bytes::copy_from_slice(e.key()));
            }
            inside
        });
        keys
    }

    /// A lease alive at `now` with at most `max_keys` of its keys (in byte
    /// order), and whether it has more.
    pub fn lease(&self, id: u64, max_keys: usize, now: u64) -> Option<(LeaseInfo, bool)> {
        let inner = self.inner.read();
        let lease = inner.ttl.lease(id).filter(|l| l.deadline_ms > now)?;
        let mut keys = inner.ttl.keys_of(id);
        let taken: Vec<Bytes> = keys
            .by_ref()
            .take(max_keys)
            .map(Bytes::copy_from_slice)
            .collect();
        let more = keys.next().is_some();
        let info = LeaseInfo {
            id,
            ttl_ms: lease.ttl_ms,
            deadline_ms: lease.deadline_ms,
            keys: taken,
        };
        Some((info, more))
    }

    /// The keys attached to lease `id`, in byte order, alive or not.
    pub fn lease_keys(&self, id: u64) -> Vec<Bytes> {
        let inner = self.inner.read();
        inner.ttl.keys_of(id).map(Bytes::copy_from_slice).collect()
    }

    /// Lease `id`'s row, alive or not (a pending view lays pending lease
    /// records over it).
    pub fn lease_row(&self, id: u64) -> Option<Lease> {
        self.inner.read().ttl.lease(id).copied()
    }

    /// Whether lease `id` is alive at `at_ms`.
    pub fn lease_alive(&self, id: u64, at_ms: u64) -> bool {
        expiry::lease_alive(self.inner.read().ttl.lease(id), at_ms)
    }

    /// Live keys with a deadline or a lease.
    pub fn keys_with_ttl(&self) -> u64 {
        self.inner.read().ttl.keys_with_ttl()
    }

    /// Leases in the table (alive, or dead and not revoked yet).
    pub fn lease_count(&self) -> u64 {
        self.inner.read().ttl.lease_count()
    }

    /// Keys removed by expiry since this state was made.
    pub fn expired_keys(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// The expirer's work at `now`: up to `max` keys past their deadline
    /// with the `mod_index` they expire, earliest first, none of `skip`;
    /// and a lease past its deadline not in `skip_leases`.
    pub fn due(
        &self,
        now: u64,
        max: usize,
        skip: &std::collections::HashSet<Box<[u8]>>,
        skip_leases: &std::collections::HashSet<u64>,
    ) -> (Vec<(Bytes, u64)>, Option<u64>) {
        let inner = self.inner.read();
        if inner.ttl.next_deadline().is_none_or(|d| d > now) {
            return (Vec::new(), None);
        }
        let keys = inner
            .ttl
            .due_keys(now, max, skip)
            .into_iter()
            .filter_map(|k| {
                let m = inner.space.get(&k)?.meta().mod_index;
                Some((Bytes::from(k.into_vec()), m))
            })
            .collect();
        (keys, inner.ttl.due_lease(now, skip_leases))
    }

    /// The earliest deadline of a key or a lease (the expirer sleeps until
    /// then).
    pub fn next_deadline(&self) -> Option<u64> {
        self.inner.read().ttl.next_deadline()
    }

    /// The lease table as a snapshot's lease section holds it: the one
    /// frozen at `last_index` by [`State::freeze_leases`], else the
    /// current one.
    pub fn lease_rows(&self, last_index: u64) -> Vec<LeaseRow> {
        if let Some((at, rows)) = self.frozen_leases.lock().take() {
            if at == last_index {
                return rows;
            }
        }
        self.inner.read().ttl.lease_rows()
    }

    /// Keeps the lease table as it is now (the writer calls this with the
    /// applied index when it asks for a snapshot through it): the entries
    /// are fuzzy, but the leases are then exactly those at the snapshot's
    /// last index, so that lease records replayed after it decide as they
    /// did (a keep-alive, a revoke or a put naming a lease).
    pub fn freeze_leases(&self, at: u64) {
        let rows = self.inner.read().ttl.lease_rows();
        *self.frozen_leases.lock() = Some((at, rows));
    }

    /// Snapshot load: the configuration section's record.
    pub fn load_config(&self, config: Option<(u64, crate::replication::config::Config)>) {
        *self.snapshot_config.lock() = config;
    }

    /// The configuration record the snapshot this state was loaded from
    /// carried, if any.
    pub fn loaded_config(&self) -> Option<(u64, crate::replication::config::Config)> {
        self.snapshot_config.lock().clone()
    }

    /// Snapshot load: a lease of the lease section.
    pub fn load_lease(&self, (id, ttl_ms, deadline_ms): LeaseRow) {
        self.inner.write().ttl.grant(
            id,
            Lease {
                ttl_ms,
                deadline_ms,
            },
        );
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
            Op::Noop | Op::Config { .. } => return 0,
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
    /// `None`) in key order through `f` (key, value, versions, expiry),
    /// about `max_bytes` of them under one read lock; returns the key to
    /// continue after, or `None` when this chunk reached the end.
    pub fn chunk(
        &self,
        after: Option<&[u8]>,
        max_bytes: usize,
        mut f: impl FnMut(&[u8], &[u8], KeyMeta, Expiry),
    ) -> Option<Vec<u8>> {
        let inner = self.inner.read();
        let (mut taken, mut last, mut stopped) = (0usize, None, false);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        inner.space.scan(start, |e| {
            if taken >= max_bytes {
                stopped = true;
                return false;
            }
            f(e.key(), e.value(), e.meta(), e.expiry());
            taken += e.key().len() + e.value().len() + 32;
            last = Some(e.key());
            true
        });
        stopped.then(|| last.map(<[u8]>::to_vec)).flatten()
    }

    /// Calls `f(key, value, versions)` for every entry in key order, one
    /// chunk of about 1 MiB per read lock.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8], KeyMeta)) {
        let mut g = |k: &[u8], v: &[u8], m: KeyMeta, _: Expiry| f(k, v, m);
        let mut cursor = self.chunk(None, 1 << 20, &mut g);
        while let Some(after) = cursor {
            cursor = self.chunk(Some(&after), 1 << 20, &mut g);
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
        self.load_expiring(key, value, meta, Expiry::Never);
    }

    /// Snapshot load: sets `key` with the versions and expiry the snapshot
    /// holds (indexed for the expirer and its lease's revoke).
    pub fn load_expiring(&self, key: &[u8], value: &[u8], meta: KeyMeta, expiry: Expiry) {
        let up = {
            let mut inner = self.inner.write();
            let Inner { space, ttl, .. } = &mut *inner;
            let mut old = None;
            let up = space.upsert(key, value, |cur| {
                old = cur.map(|e| e.expiry());
                Some((meta, expiry))
            });
            if let Some(old) = old {
                ttl.detach(key, old);
            }
            ttl.attach(key, expiry);
            up
        };
        self.counted(up);
        if let Some(ix) = &self.index {
            ix.put(key, value);
        }
    }

    /// Snapshot load: removes `key` (a tombstone newer than an earlier
    /// entry of the same key).
    pub fn unload(&self, key: &[u8]) {
        let old = {
            let mut inner = self.inner.write();
            let Inner { space, ttl, .. } = &mut *inner;
            let mut expiry = Expiry::Never;
            let old = space.remove_if(key, |e| {
                expiry = e.expiry();
                true
            });
            ttl.detach(key, expiry);
            old
        };
        if let Some(old) = old {
            self.removed(old);
            if let Some(ix) = &self.index {
                ix.delete(key);
            }
        }
    }

    /// Marks `index` applied without changing anything: a loaded snapshot's
    /// last index.
    pub fn skip_to(&self, index: u64) {
        let mut inner = self.inner.write();
        inner.applied = inner.applied.max(index);
    }

    /// Record `index` (stamped `ts`) changes nothing here: logged but kept
    /// out of memory (`debug_flaky`), or lost to newer writes in a merge.
    /// It is applied all the same: watches move past it.
    pub fn skip_record(&self, index: u64, ts: Timestamp) {
        self.skip_to(index);
        self.publish(RecordEvents {
            index,
            ts,
            events: Vec::new(),
        });
    }

    /// Mode switch: every key gets `create_index = mod_index = base`,
    /// `version = 1` (docs/DESIGN.md §6.1), and `base` is the applied index.
    pub fn rebase_versions(&self, base: u64) {
        {
            let mut inner = self.inner.write();
            inner.space.map_meta(|_| KeyMeta {
                create_index: base,
                mod_index: base,
                version: 1,
            });
            inner.applied = base;
        }
        self.watch.reset(base + 1);
    }

    /// Applies record `index`'s op, stamped `ts`: the single place where the
    /// key space changes (local writes, WAL replay, replicated entries and
    /// merges all come through here). `reads`: this node answers the
    /// record, so a transaction's reads and results are computed (a
    /// secondary and a replay skip them). The record's events go to the
    /// watch hub, even when it changed nothing.
    pub fn apply(&self, index: u64, ts: Timestamp, op: &Op, reads: bool) -> ApplyOutcome {
        let mut changes = self.index.as_ref().map(|_| Vec::new());
        let mut events = Vec::new();
        let outcome = {
            let mut inner = self.inner.write();
            debug_assert!(
                index > inner.applied || index == 0,
                "State invariant: record {index} applied after {}",
                inner.applied
            );
            inner.applied = inner.applied.max(index);
            let Inner { space, ttl, .. } = &mut *inner;
            let mut a = Apply {
                state: self,
                space,
                ttl,
                index,
                at_ms: ts.physical_ms,
                rewrites: matches!(op, Op::Txn { .. }).then(Vec::new),
                changes: changes.as_mut(),
                events: &mut events,
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
        self.publish(RecordEvents { index, ts, events });
        outcome
    }

    /// Whether applying `op` at a record stamped `at_ms` would change
    /// nothing because it names a lease not alive then (the merge must not
    /// take the stamps of a record the state refuses).
    pub fn refuses(&self, op: &Op, at_ms: u64) -> bool {
        let inner = self.inner.read();
        leases_named(op)
            .into_iter()
            .any(|id| !expiry::lease_alive(inner.ttl.lease(id), at_ms))
    }

    /// Order-independent digest of the contents, for comparing replicas.
    pub fn digest(&self) -> u64 {
        self.digest.load(Ordering::Relaxed)
    }
}

/// The leases the puts of `op` name.
fn leases_named(op: &Op) -> Vec<u64> {
    let lease = |x: &Expiry| match x {
        Expiry::Lease(id) => Some(*id),
        _ => None,
    };
    match op {
        Op::Put { expiry, .. } => lease(expiry).into_iter().collect(),
        Op::Bulk { items } => items.iter().filter_map(|(_, _, x)| lease(x)).collect(),
        Op::Txn { ops } => ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Put { expiry, .. } => lease(expiry),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// One record being applied under the state's write lock.
struct Apply<'a> {
    state: &'a State,
    space: &'a mut KeySpace,
    ttl: &'a mut Expiries,
    index: u64,
    /// The record's stamp, in Unix ms: what "expired at the record" means.
    at_ms: u64,
    /// A transaction: the keys it has put so far (its second write of a key
    /// is not a replayed one).
    rewrites: Option<Vec<Bytes>>,
    /// With `--index`: every change, for the index once the lock is gone.
    changes: Option<&'a mut Vec<(Bytes, Option<Bytes>)>>,
    /// What the record changed, in order, for watches.
    events: &'a mut Vec<Event>,
}

fn event(kind: EventKind, key: &[u8], prev: Option<Bytes>) -> Event {
    Event {
        kind,
        key: Bytes::copy_from_slice(key),
        value: None,
        prev,
        meta: KeyMeta::default(),
    }
}

impl Apply<'_> {
    fn op(&mut self, op: &Op, reads: bool) -> ApplyOutcome {
        // A record naming a dead lease changes nothing: checked before
        // anything is applied, so that it stays one step.
        if let Some(id) = leases_named(op)
            .into_iter()
            .find(|id| !expiry::lease_alive(self.ttl.lease(*id), self.at_ms))
        {
            return refused(id);
        }
        match op {
            Op::Put { key, value, expiry } => self.put(key, value, *expiry),
            Op::Delete { key } => {
                return ApplyOutcome {
                    deleted: self.delete(key),
                    ..ApplyOutcome::default()
                }
            }
            Op::Bulk { items } => self.bulk(items),
            Op::Noop | Op::Config { .. } => {}
            Op::Expire { keys } => self.expire(keys),
            Op::LeaseGrant { ttl_ms } => return self.grant(*ttl_ms),
            Op::LeaseKeepAlive { id } => return self.keep_alive(*id),
            Op::LeaseRevoke { id, expired } => return self.revoke(*id, *expired),
            Op::Txn { ops } => {
                return ApplyOutcome {
                    txn: self.txn(ops, reads),
                    ..ApplyOutcome::default()
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

    /// A put: a key expired at the record is absent to it (created afresh,
    /// no event for its removal); `Keep` takes the expiry the key had.
    fn put(&mut self, key: &Bytes, value: &Bytes, asked: Expiry) {
        let (index, at_ms, rewrite) = (self.index, self.at_ms, self.rewrite(key));
        let ttl = &*self.ttl;
        // (old expiry, the value it had if it was alive), new meta, new expiry
        let mut old: Option<(Expiry, Option<Bytes>)> = None;
        let mut new = (KeyMeta::default(), Expiry::Never);
        let up = self.space.upsert(key, value, |cur| {
            if cur.is_some_and(|e| !rewrite && e.meta().mod_index >= index) {
                return None; // the replay rule
            }
            let live = cur.filter(|e| rewrite || !ttl.expired(e.expiry(), at_ms));
            old = cur.map(|e| (e.expiry(), live.map(|l| Bytes::copy_from_slice(l.value()))));
            let expiry = resolve_keep(asked, live.map(|e| e.expiry()));
            let meta = put_meta(live.map(|e| e.meta()), index, rewrite && live.is_some())?;
            new = (meta, expiry);
            Some(new)
        });
        if up == Upsert::Skipped {
            return;
        }
        self.state.counted(up);
        let prev = old.and_then(|(was, prev)| {
            self.ttl.detach(key, was);
            prev
        });
        self.ttl.attach(key, new.1);
        self.events.push(Event {
            kind: EventKind::Put,
            key: key.clone(),
            value: Some(value.clone()),
            prev,
            meta: new.0,
        });
        if let Some(c) = self.changes.as_mut() {
            c.push((key.clone(), Some(value.clone())));
        }
        if let Some(r) = self.rewrites.as_mut().filter(|_| !rewrite) {
            r.push(key.clone());
        }
    }

    /// Removes `key` if `rule` agrees: an `expire` event if it was expired
    /// at the record (a key this record put is not: `rewrite`), else a
    /// `delete`. `None` if it stayed, else whether it was alive.
    fn remove(
        &mut self,
        key: &[u8],
        rewrite: bool,
        rule: impl FnOnce(EntryRef<'_>) -> bool,
    ) -> Option<bool> {
        let (ttl, at_ms) = (&*self.ttl, self.at_ms);
        let mut seen = None;
        let old = self.space.remove_if(key, |e| {
            let gone = rule(e);
            if gone {
                let expired = !rewrite && ttl.expired(e.expiry(), at_ms);
                seen = Some((e.expiry(), expired, Bytes::copy_from_slice(e.value())));
            }
            gone
        })?;
        let (was, expired, prev) = seen?;
        self.removed(key, old, was, expired, prev);
        Some(!expired)
    }

    /// The bookkeeping of a key that went.
    fn removed(&mut self, key: &[u8], old: Entry, was: Expiry, expired: bool, prev: Bytes) {
        self.state.removed(old);
        self.ttl.detach(key, was);
        let kind = if expired {
            self.state.expired.fetch_add(1, Ordering::Relaxed);
            EventKind::Expire
        } else {
            EventKind::Delete
        };
        self.events.push(event(kind, key, Some(prev)));
        if let Some(c) = self.changes.as_mut() {
            c.push((Bytes::copy_from_slice(key), None));
        }
    }

    fn delete(&mut self, key: &Bytes) -> bool {
        let (index, rewrite) = (self.index, self.rewrite(key));
        self.remove(key, rewrite, |e| delete_applies(e.meta(), index, rewrite))
            .unwrap_or(false)
    }

    /// A bulk: the last item of each key, in key order.
    fn bulk(&mut self, items: &[(Bytes, Bytes, Expiry)]) {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| items[a].0.cmp(&items[b].0).then(b.cmp(&a)));
        order.dedup_by(|a, b| items[*a].0 == items[*b].0);
        for i in order {
            self.put(&items[i].0, &items[i].1, items[i].2);
        }
    }

    /// The primary's expiry of keys past their deadline: each goes only if
    /// it still holds the `mod_index` named and its deadline is passed at
    /// the record.
    fn expire(&mut self, keys: &[(Bytes, u64)]) {
        let now = (self.index, self.at_ms);
        for (key, named) in keys {
            self.remove(key, false, |e| {
                expiry::expire_applies(e.meta(), e.expiry(), *named, now)
            });
        }
    }

    /// A lease whose id is this record's index.
    fn grant(&mut self, ttl_ms: u64) -> ApplyOutcome {
        let lease = Lease {
            ttl_ms,
            deadline_ms: self.at_ms.saturating_add(ttl_ms),
        };
        self.ttl.grant(self.index, lease);
        let lease = self.ttl.lease(self.index).copied().unwrap_or(lease);
        with_lease(self.index, lease)
    }

    fn keep_alive(&mut self, id: u64) -> ApplyOutcome {
        match self.ttl.keep_alive(id, self.at_ms) {
            Some(lease) => with_lease(id, lease),
            None => refused(id),
        }
    }

    /// Ends a lease and deletes its keys. A client's revoke of a lease dead
    /// at the record is refused; the primary's (`expired`) applies only if
    /// the lease's deadline is passed at the record (a keep-alive logged
    /// before it wins).
    fn revoke(&mut self, id: u64, expired: bool) -> ApplyOutcome {
        let alive = expiry::lease_alive(self.ttl.lease(id), self.at_ms);
        if !expired && !alive {
            return refused(id);
        }
        if expired && alive {
            return ApplyOutcome::default();
        }
        // Its keys go first, while the lease still says whether they were
        // alive (a `delete`) or dead (an `expire`) at the record.
        let keys: Vec<Box<[u8]>> = self.ttl.keys_of(id).map(Into::into).collect();
        let index = self.index;
        let mut removed = 0;
        for key in keys {
            let gone = self.remove(&key, false, |e| {
                e.expiry() == Expiry::Lease(id) && delete_applies(e.meta(), index, false)
            });
            removed += u64::from(gone.is_some());
        }
        self.ttl.end_lease(id);
        ApplyOutcome {
            removed,
            ..ApplyOutcome::default()
        }
    }

    fn delete_prefix(&mut self, prefix: &[u8]) -> u64 {
        let Apply {
            space,
            ttl,
            index,
            at_ms,
            rewrites,
            ..
        } = self;
        let mut gone = Vec::new();
        space.remove_range_if(&KeyRange::prefix(prefix), |e| {
            let rewrite = rewrites
                .as_ref()
                .is_some_and(|r| r.iter().any(|k| k == e.key()));
            let goes = delete_applies(e.meta(), *index, rewrite);
            if goes {
                let expired = !rewrite && ttl.expired(e.expiry(), *at_ms);
                let prev = Bytes::copy_from_slice(e.value());
                gone.push((e.key().to_vec(), e.summary(), e.expiry(), expired, prev));
            }
            goes
        });
        let mut live = 0;
        for (key, old, was, expired, prev) in gone {
            live += u64::from(!expired);
            self.removed(&key, old, was, expired, prev);
        }
        live
    }

    /// A transaction's ops in order; with `reads`, what each returned
    /// (reads see the writes before them, and the keys alive at the
    /// record's stamp).
    fn txn(&mut self, ops: &[TxnOp], reads: bool) -> Option<TxnResult> {
        let mut results = Vec::with_capacity(if reads { ops.len() } else { 0 });
        for op in ops {
            let result = match op {
                TxnOp::Put { key, value, expiry } => {
                    self.put(key, value, *expiry);
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
                    let rewrite = self.rewrite(key);
                    let found = self
                        .space
                        .get(key)
                        .filter(|e| rewrite || !self.ttl.expired(e.expiry(), self.at_ms));
                    OpResult::Get(found.map(|e| item(e, false)))
                }
                TxnOp::Range(read) if reads => {
                    let (items, more) = page(self.space, self.ttl, read, self.at_ms);
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

fn refused(id: u64) -> ApplyOutcome {
    ApplyOutcome {
        refused: Some(Refusal::LeaseNotFound(id)),
        ..ApplyOutcome::default()
    }
}

fn with_lease(id: u64, lease: Lease) -> ApplyOutcome {
    ApplyOutcome {
        lease: Some(LeaseInfo {
            id,
            ttl_ms: lease.ttl_ms,
            deadline_ms: lease.deadline_ms,
            keys: Vec::new(),
        }),
        ..ApplyOutcome::default()
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
            let index = first + i as u64;
            s.apply(index, stamp(index), op, false);
        }
    }

    /// The stamp the tests give record `index`: 10 ms a record.
    fn stamp(index: u64) -> Timestamp {
        at(index * 10)
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp {
            physical_ms: ms,
            logical: 0,
            node: 0,
        }
    }

    #[test]
    fn put_get_delete() {
        let s = State::new();
        run(&s, &[put("a", "1"), put("a", "2")]);
        assert_eq!(s.get(b"a", 0), Some(b("2")));
        assert_eq!(s.len(), 1);
        assert!(s.apply(3, Timestamp::default(), &del("a"), false).deleted);
        assert!(!s.apply(4, Timestamp::default(), &del("a"), false).deleted);
        assert_eq!(s.get(b"a", 0), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn versions_count_writes_since_creation() {
        let s = State::new();
        run(
            &s,
            &[put("a", "1"), put("b", "1"), put("a", "2"), put("a", "3")],
        );
        assert_eq!(s.get_versioned(b"a", 0), Some((b("3"), meta(1, 4, 3))));
        assert_eq!(s.get_versioned(b"b", 0), Some((b("1"), meta(2, 2, 1))));
        run(&s, &[del("a"), put("a", "again")]);
        assert_eq!(s.get_versioned(b"a", 0), Some((b("again"), meta(6, 6, 1))));
        let bulk = Op::Bulk {
            items: vec![
                (b("b"), b("x"), Expiry::Never),
                (b("c"), b("y"), Expiry::Never),
                (b("b"), b("z"), Expiry::Never),
            ],
        };
        run(&s, &[bulk]);
        assert_eq!(
            s.get_versioned(b"b", 0),
            Some((b("z"), meta(2, 7, 2))),
            "one write per record"
        );
        assert_eq!(s.get_versioned(b"c", 0), Some((b("y"), meta(7, 7, 1))));
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
        let r = s
            .apply(4, Timestamp::default(), &Op::Txn { ops }, true)
            .txn
            .unwrap();
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
                Timestamp::default(),
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
        let p = s.range(&read("k3", Some("k6"), 10), 0);
        assert_eq!((p.items.len(), p.more, p.index), (3, false, 2));
        let p = s.range(&read("k3", Some("k6"), 3), 0);
        assert_eq!((p.items.len(), p.more), (3, false));
        let p = s.range(&read("k3", Some("k6"), 2), 0);
        assert_eq!((p.items.len(), p.more), (2, true));
        assert_eq!(p.items[1].key, b("k4"));
        assert_eq!(s.count(&KeyRange::prefix(b"k"), 0), (10, 2));
        assert_eq!(s.keys_in(&KeyRange::prefix(b"k9"), 0), vec![b("k9")]);
    }

    #[test]
    fn bulk_and_digest() {
        let s = State::new();
        let items: Vec<_> = (0..1000)
            .map(|i| (b(&format!("k{i}")), b(&format!("v{i}")), Expiry::Never))
            .collect();
        s.apply(
            1,
            Timestamp::default(),
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
                Timestamp::default(),
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
            s.apply(i as u64 + 1, Timestamp::default(), op, false);
            assert_eq!(s.data_bytes(), recount(&s), "after {op:?}");
            assert_eq!(s.data_bytes() as i64 - before as i64, growth, "{op:?}");
        }
        assert_eq!(
            s.data_bytes(),
            3 * ENTRY_OVERHEAD_BYTES + (2 + 1 + 1) + (2 + 1 + 2) + (2 + 1 + 1)
        );
        let t = s.empty_like();
        t.apply(1, Timestamp::default(), &put("x", "y"), false);
        s.replace_with(t);
        assert_eq!(s.data_bytes(), recount(&s));
        s.apply(2, Timestamp::default(), &del("x"), false);
        assert_eq!(s.data_bytes(), 0);
    }

    #[test]
    fn chunks_visit_every_key_once_in_order() {
        let s = State::new();
        let items = (0..5000)
            .map(|i| (b(&format!("k{i:05}")), b("value"), Expiry::Never))
            .collect();
        s.apply(1, Timestamp::default(), &Op::Bulk { items }, false);
        let (mut seen, mut chunks) = (Vec::new(), 0);
        let mut cursor = None::<Vec<u8>>;
        loop {
            chunks += 1;
            cursor = s.chunk(cursor.as_deref(), 4096, |k, _, _, _| seen.push(k.to_vec()));
            if cursor.is_none() {
                break;
            }
        }
        assert!(chunks > 10);
        let want: Vec<_> = (0..5000).map(|i| format!("k{i:05}").into_bytes()).collect();
        assert_eq!(seen, want);
    }

    /// Expiries that make keys come and go within a run of 40 records
    /// (stamps 10 ms apart), leases that may or may not be granted.
    fn random_expiry(rng: &mut StdRng, grants: &[u64]) -> Expiry {
        match rng.gen_range(0..8) {
            0..=3 => Expiry::Never,
            4 | 5 => Expiry::At(rng.gen_range(0..450)),
            6 => Expiry::Lease(lease_id(rng, grants)),
            _ => Expiry::Keep,
        }
    }

    /// Mostly a lease granted earlier in the run (`grants`: their indexes).
    fn lease_id(rng: &mut StdRng, grants: &[u64]) -> u64 {
        match grants {
            [] => rng.gen_range(1..40),
            _ if rng.gen_bool(0.1) => rng.gen_range(1..40),
            _ => grants[rng.gen_range(0..grants.len())],
        }
    }

    /// Ops as records 1, 2, ... (a run from an empty state).
    fn random_ops(rng: &mut StdRng, n: usize) -> Vec<Op> {
        let mut grants = Vec::new();
        (1..=n as u64)
            .map(|index| {
                let op = random_op(rng, &grants);
                if let Op::LeaseGrant { .. } = op {
                    grants.push(index);
                }
                op
            })
            .collect()
    }

    fn random_op(rng: &mut StdRng, grants: &[u64]) -> Op {
        let k = |rng: &mut StdRng| b(["a/1", "a/2", "b/1", "b/2", "c"][rng.gen_range(0..5)]);
        let v = |rng: &mut StdRng| b(&rng.gen_range(0..100).to_string());
        match rng.gen_range(0..14) {
            0..=3 => Op::Put {
                key: k(rng),
                value: v(rng),
                expiry: random_expiry(rng, grants),
            },
            4..=5 => Op::Delete { key: k(rng) },
            6 => Op::Bulk {
                items: (0..rng.gen_range(1..4))
                    .map(|_| (k(rng), v(rng), random_expiry(rng, grants)))
                    .collect(),
            },
            7 | 8 => Op::Txn {
                ops: (0..rng.gen_range(0..5))
                    .map(|_| match rng.gen_range(0..4) {
                        0 | 1 => TxnOp::Put {
                            key: k(rng),
                            value: v(rng),
                            expiry: random_expiry(rng, grants),
                        },
                        2 => TxnOp::Delete { key: k(rng) },
                        _ => TxnOp::DeletePrefix {
                            prefix: b(["a/", "b/"][rng.gen_range(0..2)]),
                        },
                    })
                    .collect(),
            },
            9 => Op::Expire {
                keys: (0..rng.gen_range(1..3))
                    .map(|_| (k(rng), rng.gen_range(0..40)))
                    .collect(),
            },
            10 => Op::LeaseGrant {
                ttl_ms: rng.gen_range(1..150),
            },
            11 => Op::LeaseKeepAlive {
                id: lease_id(rng, grants),
            },
            12 => Op::LeaseRevoke {
                id: lease_id(rng, grants),
                expired: rng.gen_bool(0.5),
            },
            _ => Op::Noop,
        }
    }

    type Everything = (Vec<(Vec<u8>, Vec<u8>, KeyMeta, Expiry)>, Vec<LeaseRow>);

    /// The contents with their expiries, and the lease table.
    fn everything(s: &State) -> Everything {
        let mut out = Vec::new();
        let mut cursor = None::<Vec<u8>>;
        loop {
            cursor = s.chunk(cursor.as_deref(), 1 << 20, |k, v, m, x| {
                out.push((k.to_vec(), v.to_vec(), m, x))
            });
            if cursor.is_none() {
                break;
            }
        }
        (out, s.inner.read().ttl.lease_rows())
    }

    /// docs/DESIGN.md §3.4: a snapshot taken while writes go on, one small
    /// chunk of keys at a time with records applied between chunks, then
    /// the log replayed after its last index, ends in exactly the contents
    /// and versions of a straight run; with deadlines, leases and expiries
    /// too (the lease section frozen at the last index).
    #[test]
    fn a_fuzzy_snapshot_and_its_replay_give_the_versions_of_a_straight_run() {
        let mut rng = StdRng::seed_from_u64(34);
        for case in 0..20000 {
            let n = rng.gen_range(1..40);
            let ops = random_ops(&mut rng, n);
            let straight = State::new();
            run(&straight, &ops);
            let live = State::new();
            let last = rng.gen_range(0..=ops.len());
            run(&live, &ops[..last]);
            live.freeze_leases(last as u64);
            let (snap, mut applied) = (State::new(), last);
            let mut cursor = None::<Vec<u8>>;
            loop {
                cursor = live.chunk(cursor.as_deref(), 1, |k, v, m, x| {
                    snap.load_expiring(k, v, m, x)
                });
                let more = rng.gen_range(0..3).min(ops.len() - applied);
                run(&live, &ops[applied..applied + more]);
                applied += more;
                if cursor.is_none() {
                    break;
                }
            }
            live.lease_rows(last as u64)
                .into_iter()
                .for_each(|row| snap.load_lease(row));
            snap.skip_to(last as u64);
            run(&snap, &ops[last..]);
            assert_eq!(everything(&snap), everything(&straight), "case {case}");
            assert_eq!(snap.digest(), straight.digest(), "case {case}");
            let counters = |s: &State| (s.len(), s.keys_with_ttl(), s.data_bytes());
            assert_eq!(counters(&snap), counters(&straight), "case {case}");
        }
    }

    fn put_x(k: &str, v: &str, expiry: Expiry) -> Op {
        Op::Put {
            key: b(k),
            value: b(v),
            expiry,
        }
    }

    /// Applies `op` as the next record, stamped `ms`.
    fn apply_at(s: &State, ms: u64, op: &Op) -> ApplyOutcome {
        s.apply(s.applied_index() + 1, at(ms), op, true)
    }

    fn kinds(s: &State, index: u64) -> Vec<(EventKind, String, Option<Bytes>)> {
        let published = s.published.lock();
        let r = published.iter().find(|r| r.index == index).unwrap();
        r.events
            .iter()
            .map(|e| {
                let k = String::from_utf8(e.key.to_vec()).unwrap();
                (e.kind, k, e.prev.clone())
            })
            .collect()
    }

    #[test]
    fn reads_hide_a_key_from_its_deadline_on_removed_or_not() {
        let s = State::new();
        apply_at(&s, 10, &put_x("a", "1", Expiry::At(100)));
        apply_at(&s, 11, &put("b", "2"));
        assert_eq!(s.get(b"a", 99), Some(b("1")));
        assert_eq!(s.get(b"a", 100), None);
        assert_eq!(s.get_item(b"a", 99).unwrap().expiry, Expiry::At(100));
        assert!(s.get_raw(b"a").is_some(), "still held");
        let all = RangeRead {
            range: KeyRange::prefix(b""),
            limit: 10,
            keys_only: true,
        };
        assert_eq!(s.range(&all, 99).items.len(), 2);
        assert_eq!(s.range(&all, 100).items.len(), 1);
        assert_eq!(s.count(&KeyRange::prefix(b""), 99).0, 2);
        assert_eq!(s.count(&KeyRange::prefix(b""), 100).0, 1);
        assert_eq!(s.keys_in(&KeyRange::prefix(b""), 100), vec![b("b")]);
        assert_eq!(s.keys_with_ttl(), 1);
    }

    #[test]
    fn a_record_at_or_past_a_deadline_finds_the_key_absent() {
        let s = State::new();
        apply_at(&s, 10, &put_x("a", "1", Expiry::At(100)));
        apply_at(&s, 10, &put_x("d", "1", Expiry::At(100)));
        // A put creates it afresh (a new create_index, version 1).
        apply_at(&s, 100, &put("a", "2"));
        assert_eq!(s.get_versioned(b"a", 0), Some((b("2"), meta(3, 3, 1))));
        assert_eq!(s.get_item(b"a", 0).unwrap().expiry, Expiry::Never);
        assert_eq!(kinds(&s, 3), [(EventKind::Put, "a".into(), None)]);
        // A delete answers deleted: false, and the removal is an expiry.
        assert!(!apply_at(&s, 100, &del("d")).deleted);
        assert_eq!(
            kinds(&s, 4),
            [(EventKind::Expire, "d".into(), Some(b("1")))]
        );
        assert_eq!((s.len(), s.expired_keys(), s.keys_with_ttl()), (1, 1, 0));
        // A transaction's reads too.
        apply_at(&s, 100, &put_x("t", "1", Expiry::At(200)));
        let read = Op::Txn {
            ops: vec![TxnOp::Get { key: b("t") }],
        };
        let got = |ms| match &apply_at(&s, ms, &read).txn.unwrap().results[0] {
            OpResult::Get(item) => item.is_some(),
            other => panic!("{other:?}"),
        };
        assert!(got(199));
        assert!(!got(200));
    }

    #[test]
    fn keep_ttl_keeps_the_deadline_or_lease_a_live_key_has() {
        let s = State::new();
        apply_at(&s, 10, &put_x("a", "1", Expiry::At(100)));
        apply_at(&s, 20, &put_x("a", "2", Expiry::Keep));
        assert_eq!(s.get_item(b"a", 0).unwrap().expiry, Expiry::At(100));
        apply_at(&s, 30, &put_x("n", "1", Expiry::Keep));
        assert_eq!(s.get_item(b"n", 0).unwrap().expiry, Expiry::Never);
        apply_at(&s, 100, &put_x("a", "3", Expiry::Keep));
        assert_eq!(
            s.get_item(b"a", 0).unwrap().expiry,
            Expiry::Never,
            "expired at the record: nothing to keep"
        );
        apply_at(&s, 110, &put_x("a", "4", Expiry::At(500)));
        apply_at(&s, 120, &put("a", "5"));
        assert_eq!(s.get_item(b"a", 0).unwrap().expiry, Expiry::Never);
        assert_eq!(s.keys_with_ttl(), 0, "a plain put clears it");
    }

    #[test]
    fn an_expire_removes_a_key_only_at_the_mod_index_it_names_once_due() {
        let s = State::new();
        apply_at(&s, 10, &put_x("a", "1", Expiry::At(100))); // 1
        apply_at(&s, 10, &put_x("b", "1", Expiry::At(100))); // 2
        apply_at(&s, 50, &put_x("b", "2", Expiry::At(100))); // 3: written again
        let expire = Op::Expire {
            keys: vec![(b("a"), 1), (b("b"), 2)],
        };
        apply_at(&s, 99, &expire); // 4: not due yet
        assert_eq!(s.len(), 2);
        apply_at(&s, 100, &expire); // 5
        assert_eq!(s.get_raw(b"a"), None);
        assert!(
            s.get_raw(b"b").is_some(),
            "b was written after the named index"
        );
        assert_eq!(
            kinds(&s, 5),
            [(EventKind::Expire, "a".into(), Some(b("1")))]
        );
        assert_eq!(s.expired_keys(), 1);
        let (due, _) = s.due(100, 10, &Default::default(), &Default::default());
        assert_eq!(due, vec![(b("b"), 3)]);
    }

    #[test]
    fn a_lease_lives_from_its_grant_by_keep_alives_and_takes_its_keys_along() {
        let s = State::new();
        let g = apply_at(&s, 1000, &Op::LeaseGrant { ttl_ms: 100 }); // 1
        let lease = g.lease.unwrap();
        assert_eq!((lease.id, lease.deadline_ms), (1, 1100));
        apply_at(&s, 1010, &put_x("k/1", "a", Expiry::Lease(1))); // 2
        apply_at(&s, 1010, &put_x("k/2", "b", Expiry::Lease(1))); // 3
        apply_at(&s, 1010, &put_x("k/3", "c", Expiry::Lease(1))); // 4
        apply_at(&s, 1020, &put("k/3", "plain")); // 5: leaves the lease
        let ka = apply_at(&s, 1050, &Op::LeaseKeepAlive { id: 1 }); // 6
        assert_eq!(ka.lease.unwrap().deadline_ms, 1150);
        let (info, more) = s.lease(1, 1, 1149).unwrap();
        assert_eq!((info.keys, more), (vec![b("k/1")], true));
        assert!(
            s.lease(1, 10, 1150).is_none(),
            "dead here from its deadline"
        );
        assert_eq!(s.get(b"k/1", 1149), Some(b("a")));
        assert_eq!(s.get(b"k/1", 1150), None);
        // The primary's expiry loses to the keep-alive logged before it.
        let early = Op::LeaseRevoke {
            id: 1,
            expired: true,
        };
        assert_eq!(apply_at(&s, 1100, &early).removed, 0); // 7
        assert_eq!(s.len(), 3);
        assert_eq!(apply_at(&s, 1150, &early).removed, 2); // 8
        assert_eq!(
            kinds(&s, 8),
            [
                (EventKind::Expire, "k/1".into(), Some(b("a"))),
                (EventKind::Expire, "k/2".into(), Some(b("b")))
            ]
        );
        assert_eq!((s.len(), s.lease_count(), s.keys_with_ttl()), (1, 0, 0));
        // Once passed, final: no keep-alive brings it back.
        let again = apply_at(&s, 1160, &Op::LeaseKeepAlive { id: 1 });
        assert_eq!(again.refused, Some(Refusal::LeaseNotFound(1)));
    }

    #[test]
    fn a_revoke_deletes_the_keys_of_a_live_lease_and_refuses_a_dead_one() {
        let s = State::new();
        apply_at(&s, 1000, &Op::LeaseGrant { ttl_ms: 100 }); // 1
        apply_at(&s, 1000, &put_x("k", "v", Expiry::Lease(1))); // 2
        let revoke = Op::LeaseRevoke {
            id: 1,
            expired: false,
        };
        let r = apply_at(&s, 1050, &revoke); // 3
        assert_eq!((r.removed, r.refused), (1, None));
        assert_eq!(
            kinds(&s, 3),
            [(EventKind::Delete, "k".into(), Some(b("v")))]
        );
        assert_eq!(
            apply_at(&s, 1060, &revoke).refused,
            Some(Refusal::LeaseNotFound(1))
        );
        apply_at(&s, 2000, &Op::LeaseGrant { ttl_ms: 100 }); // 5
        assert_eq!(
            apply_at(
                &s,
                2100,
                &Op::LeaseRevoke {
                    id: 5,
                    expired: false
                }
            )
            .refused,
            Some(Refusal::LeaseNotFound(5)),
            "dead at the record: the client's revoke is refused, the expirer's is not"
        );
    }

    #[test]
    fn a_record_naming_a_dead_lease_changes_nothing() {
        let s = State::new();
        apply_at(&s, 1000, &Op::LeaseGrant { ttl_ms: 100 }); // 1
        apply_at(&s, 1000, &put("a", "old")); // 2
        let bulk = Op::Bulk {
            items: vec![
                (b("a"), b("new"), Expiry::Never),
                (b("b"), b("x"), Expiry::Lease(1)),
            ],
        };
        let r = apply_at(&s, 1100, &bulk); // 3
        assert_eq!(r.refused, Some(Refusal::LeaseNotFound(1)));
        assert_eq!(s.get(b"a", 0), Some(b("old")), "nothing of it applied");
        assert_eq!(s.get(b"b", 0), None);
        assert_eq!(kinds(&s, 3), [], "its events: none, but it is published");
        assert_eq!(apply_at(&s, 1099, &bulk).refused, None); // 4
        assert_eq!(s.get(b"a", 0), Some(b("new")));
        let unknown = put_x("c", "1", Expiry::Lease(77));
        assert_eq!(
            apply_at(&s, 1099, &unknown).refused,
            Some(Refusal::LeaseNotFound(77))
        );
    }

    #[test]
    fn every_record_is_published_in_order_with_its_events_and_previous_values() {
        let s = State::new();
        run(&s, &[put("a", "1"), put("b", "1")]);
        let txn = Op::Txn {
            ops: vec![
                TxnOp::Put {
                    key: b("a"),
                    value: b("2"),
                    expiry: Expiry::Never,
                },
                TxnOp::Get { key: b("a") },
                TxnOp::DeletePrefix { prefix: b("") },
            ],
        };
        run(&s, &[txn, Op::Noop]);
        s.skip_record(5, stamp(5));
        let published = s.published.lock();
        let indexes: Vec<u64> = published.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [1, 2, 3, 4, 5]);
        assert_eq!(published[2].ts, stamp(3));
        let e = &published[2].events;
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[0].kind, e[0].prev.as_deref()),
            (EventKind::Put, Some(&b"1"[..]))
        );
        assert_eq!(e[0].meta, meta(1, 3, 2));
        assert_eq!(e[0].value, Some(b("2")));
        assert_eq!((e[1].kind, &e[1].key[..]), (EventKind::Delete, &b"a"[..]));
        assert_eq!(e[1].prev, Some(b("2")), "the value the record gave it");
        assert_eq!((e[2].kind, &e[2].key[..]), (EventKind::Delete, &b"b"[..]));
        assert!(published[3].events.is_empty() && published[4].events.is_empty());
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
