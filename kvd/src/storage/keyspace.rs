//! The ordered index of the key space: every key with its value and
//! versions, in byte order (docs/DESIGN.md §3.8 says what an entry costs).
//!
//! Two levels. Leaves hold at most [`MAX_LEAF_ENTRIES`] entries each, in
//! key order, packed back to back in ONE buffer per leaf with their end
//! offsets beside it. A `BTreeMap` from a separator to its leaf finds the
//! leaf of a key: the last one whose separator is at most the key. A
//! separator is a lower bound of its leaf's keys fixed when the leaf is
//! made (the first leaf's is empty), so an insert touches the map only when
//! a leaf splits. A leaf past its limits splits in two by bytes, except
//! that an insert past the last entry of a full leaf starts a new leaf, so
//! ascending loads fill their leaves. A leaf under a quarter full after a
//! removal merges with its successor when both fit in one.
//!
//! Why packed leaves rather than one allocation per entry: a boxed entry
//! costs a 16-byte pointer in its leaf, the allocator's 8-byte header and
//! up to 15 bytes of rounding; a packed one costs its 4-byte offset and its
//! share of the leaf's spare capacity, which growth keeps near 1/8.
//!
//! An entry is `[key_len u16][key][value][create_index, mod_index, version
//! as LEB128 varints][expiry kind, value as varints, only if it has one]
//! [meta_len u8]`. Its first three parts are the layout of the first
//! release's entries, so the content digest (a hash of exactly those bytes)
//! is what it was; a key without a deadline or lease pays nothing for them.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Bound;

use crate::model::{Expiry, KeyMeta, KeyRange};

/// Most entries in one leaf.
pub const MAX_LEAF_ENTRIES: usize = 64;
/// A leaf with more bytes than this and more than one entry splits (one
/// large value may make a leaf of its own larger).
pub const MAX_LEAF_BYTES: usize = 16 << 10;
/// A leaf with fewer entries than this after a removal tries to merge.
const MIN_LEAF_ENTRIES: usize = MAX_LEAF_ENTRIES / 4;

/// The digest of one entry's content (`[key_len u16][key][value]`) under a
/// fixed seed: equal on every node.
pub fn content_digest(content: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6b76_7374_6f72_6521).hash_one(content)
}

/// One entry, borrowed from its leaf.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a>(&'a [u8]);

impl<'a> EntryRef<'a> {
    fn key_len(self) -> usize {
        usize::from(u16::from_le_bytes([self.0[0], self.0[1]]))
    }

    fn meta_start(self) -> usize {
        let last = self.0.len() - 1;
        last - usize::from(self.0[last])
    }

    pub fn key(self) -> &'a [u8] {
        &self.0[2..2 + self.key_len()]
    }

    pub fn value(self) -> &'a [u8] {
        &self.0[2 + self.key_len()..self.meta_start()]
    }

    pub fn meta(self) -> KeyMeta {
        let mut r = &self.0[self.meta_start()..self.0.len() - 1];
        KeyMeta {
            create_index: varint(&mut r),
            mod_index: varint(&mut r),
            version: varint(&mut r),
        }
    }

    /// The key's deadline or lease ([`Expiry::Never`] when it has none;
    /// never [`Expiry::Keep`]).
    pub fn expiry(self) -> Expiry {
        let mut r = &self.0[self.meta_start()..self.0.len() - 1];
        for _ in 0..3 {
            varint(&mut r);
        }
        if r.is_empty() {
            return Expiry::Never;
        }
        match (varint(&mut r), varint(&mut r)) {
            (EXPIRY_AT, d) => Expiry::At(d),
            (EXPIRY_LEASE, id) => Expiry::Lease(id),
            _ => Expiry::Never,
        }
    }

    /// `[key_len u16][key][value]`: what the digest hashes.
    fn content(self) -> &'a [u8] {
        &self.0[..self.meta_start()]
    }

    /// Its digest and content length.
    pub fn summary(self) -> Entry {
        let content = self.content();
        Entry {
            digest: content_digest(content),
            content_len: content.len(),
        }
    }
}

/// What the state's counters need of an entry that came or went: its
/// digest and the length of its content (`2 + key + value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub digest: u64,
    pub content_len: usize,
}

/// What [`KeySpace::upsert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsert {
    /// The key was new.
    Inserted {
        new: Entry,
    },
    Replaced {
        old: Entry,
        new: Entry,
    },
    /// The caller's rule said to leave the key as it is.
    Skipped,
}

/// The kinds of an entry's optional expiry.
const EXPIRY_AT: u64 = 1;
const EXPIRY_LEASE: u64 = 2;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads one varint this module wrote.
fn varint(r: &mut &[u8]) -> u64 {
    let mut n = 0u64;
    let mut shift = 0u32;
    while let Some((&b, rest)) = r.split_first() {
        *r = rest;
        n |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
        if b < 0x80 {
            break;
        }
        shift += 7;
    }
    n
}

/// Appends the entry of `(key, value, meta, expiry)` to `out`.
fn encode_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8], meta: KeyMeta, expiry: Expiry) {
    let klen = u16::try_from(key.len()).expect("keys are at most 1024 bytes (validated)");
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let at = out.len();
    put_varint(out, meta.create_index);
    put_varint(out, meta.mod_index);
    put_varint(out, meta.version);
    match expiry {
        Expiry::At(d) => {
            put_varint(out, EXPIRY_AT);
            put_varint(out, d);
        }
        Expiry::Lease(id) => {
            put_varint(out, EXPIRY_LEASE);
            put_varint(out, id);
        }
        Expiry::Never | Expiry::Keep => {}
    }
    let meta_len = u8::try_from(out.len() - at).expect("five varints take at most 50 bytes");
    out.push(meta_len);
}

fn entry_bytes(key: &[u8], value: &[u8], meta: KeyMeta, expiry: Expiry) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 16);
    encode_entry(&mut out, key, value, meta, expiry);
    out
}

fn offset(n: usize) -> u32 {
    u32::try_from(n).expect("a leaf splits long before 4 GiB")
}

/// A leaf: its entries back to back in `buf`, `ends[i]` the offset just
/// past entry `i`.
#[derive(Default, Debug)]
struct Leaf {
    buf: Vec<u8>,
    ends: Vec<u32>,
}

impl Leaf {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1] as usize
        }
    }

    fn entry(&self, i: usize) -> EntryRef<'_> {
        EntryRef(&self.buf[self.start(i)..self.ends[i] as usize])
    }

    /// `Ok(i)`: entry `i` holds `key`; `Err(i)`: it would go at `i`.
    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.entry(mid).key().cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Position of the first key at or after `key`.
    fn lower_bound(&self, key: &[u8]) -> usize {
        self.find(key).unwrap_or_else(|i| i)
    }

    fn full(&self, adding: usize) -> bool {
        self.len() >= MAX_LEAF_ENTRIES || self.buf.len() + adding > MAX_LEAF_BYTES
    }

    fn overfull(&self) -> bool {
        self.len() > MAX_LEAF_ENTRIES || (self.buf.len() > MAX_LEAF_BYTES && self.len() > 1)
    }

    /// Replaces bytes `a..b` of the buffer with `new`, growing the buffer
    /// by an eighth beyond what it needs (not doubling it: the spare
    /// capacity of every leaf is memory every key pays for).
    fn splice(&mut self, a: usize, b: usize, new: &[u8]) {
        let len = self.buf.len();
        if new.len() > b - a {
            let extra = new.len() - (b - a);
            let need = len + extra;
            if need > self.buf.capacity() {
                self.buf.reserve_exact(extra + need / 8);
            }
            self.buf.resize(need, 0);
            self.buf.copy_within(b..len, b + extra);
        } else {
            let less = (b - a) - new.len();
            self.buf.copy_within(b..len, b - less);
            self.buf.truncate(len - less);
            if self.buf.capacity() > 2 * self.buf.len() + 1024 {
                self.buf.shrink_to(self.buf.len() + self.buf.len() / 8);
            }
        }
        self.buf[a..a + new.len()].copy_from_slice(new);
    }

    /// Moves the end offsets from entry `from` on by `delta` bytes.
    fn shift_ends(&mut self, from: usize, grew: usize, shrank: usize) {
        for e in &mut self.ends[from..] {
            *e = *e + offset(grew) - offset(shrank);
        }
    }

    fn insert(&mut self, i: usize, entry: &[u8]) {
        let at = self.start(i);
        self.splice(at, at, entry);
        self.ends.insert(i, offset(at));
        self.shift_ends(i, entry.len(), 0);
    }

    fn replace(&mut self, i: usize, entry: &[u8]) {
        let (a, b) = (self.start(i), self.ends[i] as usize);
        self.splice(a, b, entry);
        self.shift_ends(i, entry.len(), b - a);
    }

    fn remove(&mut self, i: usize) {
        let (a, b) = (self.start(i), self.ends[i] as usize);
        self.splice(a, b, &[]);
        self.ends.remove(i);
        self.shift_ends(i, 0, b - a);
    }

    /// Splits off the upper half by bytes (at least one entry each side);
    /// returns it.
    fn split(&mut self) -> Leaf {
        let half = offset(self.buf.len() / 2);
        let at = self
            .ends
            .partition_point(|&e| e <= half)
            .clamp(1, self.len() - 1);
        let cut = self.start(at);
        let right = Leaf {
            buf: self.buf[cut..].to_vec(),
            ends: self.ends[at..].iter().map(|&e| e - offset(cut)).collect(),
        };
        self.buf.truncate(cut);
        self.buf.shrink_to(cut + cut / 8);
        self.ends.truncate(at);
        right
    }

    /// Splits until every part is within the limits (a large value ends up
    /// alone, or nearly); returns the parts after this one.
    fn split_all(&mut self) -> Vec<Leaf> {
        if !self.overfull() {
            return Vec::new();
        }
        let mut right = self.split();
        let mut parts = self.split_all();
        let more = right.split_all();
        parts.push(right);
        parts.extend(more);
        parts
    }

    /// Appends every entry of `other` (whose keys all follow this leaf's).
    fn append(&mut self, other: &Leaf) {
        let base = offset(self.buf.len());
        self.splice(self.buf.len(), self.buf.len(), &other.buf);
        self.ends.extend(other.ends.iter().map(|&e| e + base));
    }

    /// Rebuilds the leaf from what `f` makes of each entry: `None` drops
    /// it, `Some(meta)` keeps it with that meta (and its expiry). Returns
    /// how many it dropped.
    fn rebuild(&mut self, mut f: impl FnMut(EntryRef<'_>) -> Option<KeyMeta>) -> usize {
        let mut buf = Vec::with_capacity(self.buf.len() + self.buf.len() / 8);
        let mut ends = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let e = self.entry(i);
            if let Some(meta) = f(e) {
                if meta == e.meta() {
                    buf.extend_from_slice(e.0);
                } else {
                    encode_entry(&mut buf, e.key(), e.value(), meta, e.expiry());
                }
                ends.push(offset(buf.len()));
            }
        }
        let dropped = self.len() - ends.len();
        self.buf = buf;
        self.ends = ends;
        dropped
    }
}

/// The ordered key space.
#[derive(Debug)]
pub struct KeySpace {
    leaves: BTreeMap<Box<[u8]>, Leaf>,
    len: usize,
}

impl Default for KeySpace {
    fn default() -> Self {
        let mut leaves = BTreeMap::new();
        leaves.insert(Box::default(), Leaf::default());
        KeySpace { leaves, len: 0 }
    }
}

type Up<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The map range of every separator at or below `key`.
fn at_or_below(key: &[u8]) -> Up<'_> {
    (Bound::Unbounded, Bound::Included(key))
}

impl KeySpace {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leaves in the index (for the memory figures).
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    fn leaf_for(&self, key: &[u8]) -> (&[u8], &Leaf) {
        let (sep, leaf) = self
            .leaves
            .range::<[u8], _>(at_or_below(key))
            .next_back()
            .expect("the first leaf's separator is empty, below every key");
        (sep, leaf)
    }

    fn leaf_for_mut(&mut self, key: &[u8]) -> (&[u8], &mut Leaf) {
        let (sep, leaf) = self
            .leaves
            .range_mut::<[u8], _>(at_or_below(key))
            .next_back()
            .expect("the first leaf's separator is empty, below every key");
        (sep, leaf)
    }

    pub fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        let (_, leaf) = self.leaf_for(key);
        leaf.find(key).ok().map(|i| leaf.entry(i))
    }

    /// Sets `key` to `value` with the meta and expiry `rule` gives from the
    /// key's current entry (`None`: absent), or leaves the key alone if
    /// `rule` says `None`. One descent of the index either way.
    pub fn upsert(
        &mut self,
        key: &[u8],
        value: &[u8],
        rule: impl FnOnce(Option<EntryRef<'_>>) -> Option<(KeyMeta, Expiry)>,
    ) -> Upsert {
        let (_, leaf) = self.leaf_for_mut(key);
        let found = leaf.find(key);
        let current = found.ok().map(|i| leaf.entry(i));
        let Some((meta, expiry)) = rule(current) else {
            return Upsert::Skipped;
        };
        let bytes = entry_bytes(key, value, meta, expiry);
        let new = EntryRef(&bytes).summary();
        let (outcome, parts) = match found {
            Ok(i) => {
                let old = leaf.entry(i).summary();
                leaf.replace(i, &bytes);
                (Upsert::Replaced { old, new }, leaf.split_all())
            }
            // Past the last entry of a full leaf: a new leaf, so that an
            // ascending load leaves full leaves behind it.
            Err(i) if i == leaf.len() && i > 0 && leaf.full(bytes.len()) => {
                // Likely left alone from now on: no spare capacity.
                leaf.buf.shrink_to_fit();
                let mut fresh = Leaf::default();
                fresh.insert(0, &bytes);
                (Upsert::Inserted { new }, vec![fresh])
            }
            Err(i) => {
                leaf.insert(i, &bytes);
                (Upsert::Inserted { new }, leaf.split_all())
            }
        };
        for part in parts {
            self.leaves.insert(part.entry(0).key().into(), part);
        }
        if matches!(outcome, Upsert::Inserted { .. }) {
            self.len += 1;
        }
        outcome
    }

    /// Removes `key` if it is there and `rule` agrees; what went.
    pub fn remove_if(
        &mut self,
        key: &[u8],
        rule: impl FnOnce(EntryRef<'_>) -> bool,
    ) -> Option<Entry> {
        let (sep, leaf) = self.leaf_for_mut(key);
        let i = leaf.find(key).ok()?;
        let e = leaf.entry(i);
        if !rule(e) {
            return None;
        }
        let old = e.summary();
        leaf.remove(i);
        let under = (leaf.len() < MIN_LEAF_ENTRIES).then(|| Box::<[u8]>::from(sep));
        self.len -= 1;
        if let Some(sep) = under {
            self.rebalance(&sep);
        }
        Some(old)
    }

    /// Removes every key of `range` for which `gone` says true, leaf by
    /// leaf; `gone` sees each entry of the range once, in order.
    pub fn remove_range_if(
        &mut self,
        range: &KeyRange,
        mut gone: impl FnMut(EntryRef<'_>) -> bool,
    ) -> usize {
        let end = range.end.as_deref();
        let first: Box<[u8]> = self.leaf_for(&range.start).0.into();
        let seps: Vec<Box<[u8]>> = self
            .leaves
            .range::<[u8], _>((Bound::Included(&first[..]), Bound::Unbounded))
            .map(|(s, _)| s)
            .take_while(|s| end.is_none_or(|e| &s[..] < e))
            .cloned()
            .collect();
        let mut removed = 0;
        for sep in &seps {
            if let Some(leaf) = self.leaves.get_mut(sep) {
                removed += leaf.rebuild(|e| {
                    let drop_it = range.contains(e.key()) && gone(e);
                    (!drop_it).then(|| e.meta())
                });
            }
        }
        self.len -= removed;
        for sep in seps.iter().rev() {
            if self.leaves.contains_key(sep) {
                self.rebalance(sep);
            }
        }
        removed
    }

    /// After removals from the leaf at `sep`: drops it if empty (but the
    /// first), or merges its successor into it if the two fit in one.
    fn rebalance(&mut self, sep: &[u8]) {
        let Some(leaf) = self.leaves.get(sep) else {
            return;
        };
        if leaf.len() == 0 && !sep.is_empty() {
            self.leaves.remove(sep);
            return;
        }
        if leaf.len() >= MIN_LEAF_ENTRIES {
            return;
        }
        let (n, bytes) = (leaf.len(), leaf.buf.len());
        let next = self
            .leaves
            .range::<[u8], _>((Bound::Excluded(sep), Bound::Unbounded))
            .next()
            .filter(|(_, l)| {
                n + l.len() <= MAX_LEAF_ENTRIES * 3 / 4 && bytes + l.buf.len() <= MAX_LEAF_BYTES
            })
            .map(|(s, _)| s.clone());
        if let Some(next) = next.and_then(|s| self.leaves.remove(&s)) {
            if let Some(leaf) = self.leaves.get_mut(sep) {
                leaf.append(&next);
            }
        }
    }

    /// Calls `f` on every entry from `start` on, in key order, until it
    /// returns false.
    pub fn scan<'a>(&'a self, start: Bound<&[u8]>, mut f: impl FnMut(EntryRef<'a>) -> bool) {
        let (from, skip) = match start {
            Bound::Unbounded => (&[][..], None),
            Bound::Included(k) => (self.leaf_for(k).0, Some((k, true))),
            Bound::Excluded(k) => (self.leaf_for(k).0, Some((k, false))),
        };
        let leaves = self
            .leaves
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded));
        for (n, (_, leaf)) in leaves.enumerate() {
            let first = match (n, skip) {
                (0, Some((k, inclusive))) => match leaf.find(k) {
                    Ok(i) if !inclusive => i + 1,
                    Ok(i) | Err(i) => i,
                },
                _ => 0,
            };
            for i in first..leaf.len() {
                if !f(leaf.entry(i)) {
                    return;
                }
            }
        }
    }

    /// Number of keys in `range`: two binary searches per leaf it spans.
    pub fn count(&self, range: &KeyRange) -> u64 {
        let from = self.leaf_for(&range.start).0;
        let end = range.end.as_deref();
        let mut n = 0u64;
        for (sep, leaf) in self
            .leaves
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
        {
            if end.is_some_and(|e| &sep[..] >= e) {
                break;
            }
            let lo = leaf.lower_bound(&range.start);
            let hi = end.map_or(leaf.len(), |e| leaf.lower_bound(e));
            n += hi.saturating_sub(lo) as u64;
        }
        n
    }

    /// Sets every key's meta to what `f` makes of it.
    pub fn map_meta(&mut self, f: impl Fn(KeyMeta) -> KeyMeta) {
        for leaf in self.leaves.values_mut() {
            leaf.rebuild(|e| Some(f(e.meta())));
        }
    }

    /// Checks the structure (tests): keys ascend within and across leaves,
    /// each at or above its separator; limits hold; offsets are in bounds.
    #[cfg(test)]
    fn check(&self) {
        let mut prev: Option<Vec<u8>> = None;
        let mut count = 0;
        let first = self.leaves.keys().next().expect("a first leaf");
        assert!(first.is_empty(), "the first separator is empty");
        for (sep, leaf) in &self.leaves {
            assert_eq!(leaf.ends.last().map_or(0, |&e| e as usize), leaf.buf.len());
            assert!(leaf.len() <= MAX_LEAF_ENTRIES, "leaf of {}", leaf.len());
            assert!(leaf.len() > 0 || sep.is_empty(), "an empty leaf is kept");
            for i in 0..leaf.len() {
                let k = leaf.entry(i).key();
                assert!(k >= &sep[..], "{k:?} below its separator {sep:?}");
                assert!(prev.as_deref().is_none_or(|p| p < k), "keys out of order");
                prev = Some(k.to_vec());
                count += 1;
            }
        }
        assert_eq!(count, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    fn meta(n: u64) -> KeyMeta {
        KeyMeta {
            create_index: n,
            mod_index: n * 1000,
            version: n % 7 + 1,
        }
    }

    fn put(s: &mut KeySpace, k: &[u8], v: &[u8], m: KeyMeta) -> Upsert {
        s.upsert(k, v, |_| Some((m, expiry_of(&m))))
    }

    /// Some keys carry a deadline or a lease, as the state gives them.
    fn expiry_of(m: &KeyMeta) -> Expiry {
        match m.create_index % 3 {
            0 => Expiry::Never,
            1 => Expiry::At(m.mod_index + (1 << 40)),
            _ => Expiry::Lease(m.create_index),
        }
    }

    fn contents(s: &KeySpace) -> Vec<(Vec<u8>, Vec<u8>, KeyMeta, Expiry)> {
        let mut out = Vec::new();
        s.scan(Bound::Unbounded, |e| {
            out.push((e.key().to_vec(), e.value().to_vec(), e.meta(), e.expiry()));
            true
        });
        out
    }

    #[test]
    fn entries_read_back_and_the_digest_is_the_first_releases() {
        let m = KeyMeta {
            create_index: 300,
            mod_index: u64::MAX,
            version: 0,
        };
        let bytes = entry_bytes(b"key", b"\x00value\xff", m, Expiry::Never);
        let e = EntryRef(&bytes);
        assert_eq!(
            (e.key(), e.value(), e.meta(), e.expiry()),
            (&b"key"[..], &b"\x00value\xff"[..], m, Expiry::Never)
        );
        for expiry in [Expiry::At(u64::MAX), Expiry::Lease(7)] {
            let with = entry_bytes(b"key", b"\x00value\xff", m, expiry);
            let w = EntryRef(&with);
            assert_eq!((w.key(), w.value(), w.meta()), (e.key(), e.value(), m));
            assert_eq!(w.expiry(), expiry);
            assert_eq!(w.summary(), e.summary(), "the digest ignores the expiry");
        }
        // The first release hashed `[key_len u16][key][value]` as a slice.
        let mut old = vec![3, 0];
        old.extend_from_slice(b"key\x00value\xff");
        assert_eq!(e.summary().digest, content_digest(&old));
        assert_eq!(e.summary().content_len, old.len());
    }

    #[test]
    fn ascending_loads_fill_their_leaves() {
        let mut s = KeySpace::default();
        for i in 0..MAX_LEAF_ENTRIES * 100 {
            put(&mut s, format!("k{i:08}").as_bytes(), &[b'v'; 100], meta(1));
        }
        s.check();
        assert_eq!(s.leaf_count(), 100);
    }

    #[test]
    fn a_large_value_gets_a_leaf_of_its_own() {
        let mut s = KeySpace::default();
        for i in 0..40u8 {
            put(&mut s, &[b'a', i], b"small", meta(1));
        }
        put(&mut s, b"a\x10x", &vec![7; 1 << 20], meta(2));
        s.check();
        let big = s.leaves.values().find(|l| l.buf.len() > 1 << 20).unwrap();
        assert_eq!(big.len(), 1, "the large entry shares its leaf");
        assert_eq!(s.get(b"a\x10x").unwrap().value().len(), 1 << 20);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put(u16, usize, u64),
        Remove(u16),
        RemoveRange(u16, u16, bool),
        Scan(u16, bool),
        Count(u16, u16),
        Rebase(u64),
    }

    fn key(k: u16) -> Vec<u8> {
        // Shared prefixes and several lengths, as real keys have.
        format!("{}/{}", k % 7, k).into_bytes()
    }

    fn step() -> impl Strategy<Value = Step> {
        let k = 0u16..600;
        prop_oneof![
            6 => (k.clone(), prop_oneof![9 => 0usize..200, 1 => 0usize..40_000], any::<u64>())
                .prop_map(|(k, n, m)| Step::Put(k, n, m)),
            3 => k.clone().prop_map(Step::Remove),
            1 => (k.clone(), k.clone(), any::<bool>()).prop_map(|(a, b, odd)| Step::RemoveRange(a, b, odd)),
            1 => (k.clone(), any::<bool>()).prop_map(|(a, inc)| Step::Scan(a, inc)),
            1 => (k.clone(), k).prop_map(|(a, b)| Step::Count(a, b)),
            1 => (0u64..1000).prop_map(Step::Rebase),
        ]
    }

    fn range(a: u16, b: u16) -> KeyRange {
        let (a, b) = (key(a.min(b)), key(a.max(b)));
        KeyRange {
            start: a.into(),
            end: Some(b.into()),
        }
    }

    type M = Model<Vec<u8>, (Vec<u8>, KeyMeta, Expiry)>;

    fn run(s: &mut KeySpace, m: &mut M, step: Step) {
        match step {
            Step::Put(k, n, x) => {
                let v = vec![(x % 251) as u8; n];
                let got = put(s, &key(k), &v, meta(x % 5000));
                let was = m.insert(key(k), (v, meta(x % 5000), expiry_of(&meta(x % 5000))));
                assert_eq!(matches!(got, Upsert::Replaced { .. }), was.is_some());
            }
            Step::Remove(k) => {
                assert_eq!(
                    s.remove_if(&key(k), |_| true).is_some(),
                    m.remove(&key(k)).is_some()
                );
            }
            Step::RemoveRange(a, b, odd) => {
                let r = range(a, b);
                let gone = |meta: &KeyMeta| (meta.version % 2 == 1) == odd;
                let n = s.remove_range_if(&r, |e| gone(&e.meta()));
                let before = m.len();
                m.retain(|k, (_, meta, _)| !(r.contains(k) && gone(meta)));
                assert_eq!(n, before - m.len());
            }
            Step::Scan(a, inclusive) => {
                let k = key(a);
                let bound = if inclusive {
                    Bound::Included(&k[..])
                } else {
                    Bound::Excluded(&k[..])
                };
                let mut got = Vec::new();
                s.scan(bound, |e| {
                    got.push(e.key().to_vec());
                    got.len() < 50
                });
                let want: Vec<_> = m
                    .range::<[u8], _>((bound, Bound::Unbounded))
                    .map(|(k, _)| k.clone())
                    .take(50)
                    .collect();
                assert_eq!(got, want);
            }
            Step::Count(a, b) => {
                let r = range(a, b);
                assert_eq!(
                    s.count(&r),
                    m.keys().filter(|k| r.contains(k)).count() as u64
                );
            }
            Step::Rebase(base) => {
                let f = |x: KeyMeta| KeyMeta {
                    create_index: base,
                    mod_index: base,
                    version: x.version,
                };
                s.map_meta(f);
                m.values_mut().for_each(|(_, meta, _)| *meta = f(*meta));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// The index against a `BTreeMap`: the same contents in the same
        /// order after every step, and its structure sound.
        #[test]
        fn the_index_is_an_ordered_map(steps in proptest::collection::vec(step(), 1..400)) {
            let (mut s, mut m) = (KeySpace::default(), M::new());
            for st in steps {
                run(&mut s, &mut m, st);
                s.check();
                prop_assert_eq!(s.len(), m.len());
            }
            let want: Vec<_> = m.into_iter().map(|(k, (v, meta, x))| (k, v, meta, x)).collect();
            prop_assert_eq!(contents(&s), want);
        }
    }
}
