//! Deadlines and leases (docs/DESIGN.md §2.15, §2.16): the rules of when a
//! key or a lease is expired, and the indexes the state keeps beside its
//! key space to find what is due.
//!
//! Every rule compares a deadline with one instant: a read with the
//! reading node's wall clock, a record with its stamp's `physical_ms`, so
//! every replica and every replay decides a record alike. The indexes live
//! under the state's lock and change only with it (in `State::apply`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::model::{Expiry, KeyMeta, KeyRange};

/// A lease as the state holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ttl_ms: u64,
    pub deadline_ms: u64,
}

/// One row of a snapshot's lease section: `(id, ttl_ms, deadline_ms)`.
pub type LeaseRow = (u64, u64, u64);

/// Whether `lease` is alive at `at_ms` (absent: it is not).
pub fn lease_alive(lease: Option<&Lease>, at_ms: u64) -> bool {
    lease.is_some_and(|l| l.deadline_ms > at_ms)
}

/// Whether an `Expire` (record `index`, stamped `at_ms`) naming a key at
/// `named_mod_index` removes the key whose versions are `meta` and expiry
/// `expiry`: only if it was not written since and its deadline has passed
/// (and, the replay rule, the key's write is before the record: it always
/// is unless a fuzzy snapshot holds a later one).
pub fn expire_applies(
    meta: KeyMeta,
    expiry: Expiry,
    named_mod_index: u64,
    (index, at_ms): (u64, u64),
) -> bool {
    meta.mod_index == named_mod_index
        && meta.mod_index < index
        && matches!(expiry, Expiry::At(d) if d <= at_ms)
}

/// The deadline order of keys with [`Expiry::At`], the lease table, the
/// keys of each lease and the deadline order of leases.
#[derive(Default, Debug)]
pub struct Expiries {
    deadlines: BTreeSet<(u64, Box<[u8]>)>,
    leases: HashMap<u64, Lease>,
    lease_order: BTreeSet<(u64, u64)>,
    /// Keys attached to each lease, in byte order. Kept even for a lease
    /// whose row is missing (a fuzzy snapshot's entry of a lease granted
    /// after its last index), so that a revoke still finds them.
    lease_keys: HashMap<u64, BTreeSet<Box<[u8]>>>,
    /// Keys with a deadline or a lease.
    with_ttl: u64,
}

impl Expiries {
    /// Whether no key has a deadline or lease and no lease exists: reads
    /// then skip every expiry check.
    pub fn is_empty(&self) -> bool {
        self.with_ttl == 0 && self.leases.is_empty()
    }

    pub fn keys_with_ttl(&self) -> u64 {
        self.with_ttl
    }

    pub fn lease_count(&self) -> u64 {
        self.leases.len() as u64
    }

    pub fn lease(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Whether a key holding `expiry` is expired at `at_ms`: its deadline
    /// is at or before it, or its lease is dead then or gone.
    pub fn expired(&self, expiry: Expiry, at_ms: u64) -> bool {
        match expiry {
            Expiry::At(d) => d <= at_ms,
            Expiry::Lease(id) => !lease_alive(self.leases.get(&id), at_ms),
            Expiry::Never | Expiry::Keep => false,
        }
    }

    /// A key now holds `expiry`: index it.
    pub fn attach(&mut self, key: &[u8], expiry: Expiry) {
        match expiry {
            Expiry::At(d) => {
                self.deadlines.insert((d, key.into()));
            }
            Expiry::Lease(id) => {
                self.lease_keys.entry(id).or_default().insert(key.into());
            }
            Expiry::Never | Expiry::Keep => return,
        }
        self.with_ttl += 1;
    }

    /// A key no longer holds `expiry` (removed or rewritten).
    pub fn detach(&mut self, key: &[u8], expiry: Expiry) {
        let found = match expiry {
            Expiry::At(d) => self.deadlines.remove(&(d, key.into())),
            Expiry::Lease(id) => match self.lease_keys.get_mut(&id) {
                Some(keys) => {
                    let found = keys.remove(key);
                    if keys.is_empty() {
                        self.lease_keys.remove(&id);
                    }
                    found
                }
                None => false,
            },
            Expiry::Never | Expiry::Keep => false,
        };
        self.with_ttl -= u64::from(found);
    }

    /// Adds lease `id` (false if it exists: a replayed grant).
    pub fn grant(&mut self, id: u64, lease: Lease) -> bool {
        if self.leases.contains_key(&id) {
            return false;
        }
        self.leases.insert(id, lease);
        self.lease_order.insert((lease.deadline_ms, id));
        true
    }

    /// Moves lease `id`'s deadline to `at_ms + ttl` if it is alive at
    /// `at_ms` (never back: a replay over a snapshot that already holds a
    /// later keep-alive leaves it); the lease after, or `None` if dead.
    pub fn keep_alive(&mut self, id: u64, at_ms: u64) -> Option<Lease> {
        let lease = self.leases.get_mut(&id).filter(|l| l.deadline_ms > at_ms)?;
        let deadline = at_ms.saturating_add(lease.ttl_ms).max(lease.deadline_ms);
        self.lease_order.remove(&(lease.deadline_ms, id));
        lease.deadline_ms = deadline;
        self.lease_order.insert((deadline, id));
        Some(*lease)
    }

    /// Removes lease `id`'s row; what it was.
    pub fn end_lease(&mut self, id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.lease_order.remove(&(lease.deadline_ms, id));
        Some(lease)
    }

    /// The keys attached to lease `id`, in byte order.
    pub fn keys_of(&self, id: u64) -> impl Iterator<Item = &[u8]> {
        self.lease_keys
            .get(&id)
            .into_iter()
            .flatten()
            .map(|k| &k[..])
    }

    pub fn has_keys(&self, id: u64) -> bool {
        self.lease_keys.contains_key(&id)
    }

    /// Up to `max` keys whose deadline is at or before `now`, earliest
    /// first, leaving out those in `skip` (named by a record in flight).
    pub fn due_keys(&self, now: u64, max: usize, skip: &HashSet<Box<[u8]>>) -> Vec<Box<[u8]>> {
        self.deadlines
            .iter()
            .take_while(|(d, _)| *d <= now)
            .filter(|(_, k)| !skip.contains(k))
            .take(max)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// The lease with the earliest deadline at or before `now` not in
    /// `skip`.
    pub fn due_lease(&self, now: u64, skip: &HashSet<u64>) -> Option<u64> {
        self.lease_order
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, id)| *id)
            .find(|id| !skip.contains(id))
    }

    /// The earliest deadline of a key or a lease.
    pub fn next_deadline(&self) -> Option<u64> {
        let key = self.deadlines.first().map(|(d, _)| *d);
        let lease = self.lease_order.first().map(|(d, _)| *d);
        key.into_iter().chain(lease).min()
    }

    /// How many keys of `range` are expired at `now` but not removed yet
    /// (what a count subtracts from the key space's): keys past their
    /// deadline, and keys of leases dead by then.
    pub fn expired_in(&self, range: &KeyRange, now: u64) -> u64 {
        let keys = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now)
            .filter(|(_, k)| range.contains(k))
            .count();
        // Leases dead by now, earliest first (a lease whose row is missing,
        // which only a replay over a fuzzy snapshot has for a moment, is
        // not counted).
        let of_dead_leases: usize = self
            .lease_order
            .iter()
            .take_while(|(d, _)| *d <= now)
            .filter_map(|(_, id)| self.lease_keys.get(id))
            .map(|ks| ks.iter().filter(|k| range.contains(k)).count())
            .sum();
        (keys + of_dead_leases) as u64
    }

    /// The lease table, in id order (a snapshot's lease section).
    pub fn lease_rows(&self) -> Vec<LeaseRow> {
        let sorted: BTreeMap<_, _> = self.leases.iter().collect();
        sorted
            .into_iter()
            .map(|(id, l)| (*id, l.ttl_ms, l.deadline_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> HashSet<Box<[u8]>> {
        HashSet::new()
    }

    #[test]
    fn a_deadline_is_passed_from_its_own_millisecond_on() {
        let x = Expiries::default();
        assert!(!x.expired(Expiry::At(10), 9));
        assert!(x.expired(Expiry::At(10), 10));
        assert!(x.expired(Expiry::At(10), 11));
        assert!(!x.expired(Expiry::Never, u64::MAX));
        assert!(x.expired(Expiry::Lease(3), 0), "a lease that is not there");
    }

    #[test]
    fn lease_keys_live_as_long_as_the_lease() {
        let mut x = Expiries::default();
        assert!(x.grant(
            5,
            Lease {
                ttl_ms: 100,
                deadline_ms: 1100
            }
        ));
        assert!(!x.grant(
            5,
            Lease {
                ttl_ms: 1,
                deadline_ms: 1
            }
        ));
        assert!(!x.expired(Expiry::Lease(5), 1099));
        assert!(x.expired(Expiry::Lease(5), 1100));
        assert_eq!(x.keep_alive(5, 1050).map(|l| l.deadline_ms), Some(1150));
        assert_eq!(
            x.keep_alive(5, 1000).map(|l| l.deadline_ms),
            Some(1150),
            "a replayed earlier keep-alive does not move it back"
        );
        assert_eq!(x.keep_alive(5, 1150), None, "dead at its deadline");
        assert_eq!(x.due_lease(1149, &HashSet::new()), None);
        assert_eq!(x.due_lease(1150, &HashSet::new()), Some(5));
        assert_eq!(x.due_lease(1150, &HashSet::from([5])), None);
        x.end_lease(5);
        assert!(x.expired(Expiry::Lease(5), 0));
        assert_eq!(x.keep_alive(5, 0), None, "gone");
    }

    #[test]
    fn due_keys_come_earliest_first_bounded_and_without_those_in_flight() {
        let mut x = Expiries::default();
        for (k, d) in [("c", 30), ("a", 10), ("b", 20), ("late", 99)] {
            x.attach(k.as_bytes(), Expiry::At(d));
        }
        x.attach(b"l", Expiry::Lease(1));
        x.attach(b"n", Expiry::Never);
        x.grant(
            1,
            Lease {
                ttl_ms: 5,
                deadline_ms: 15,
            },
        );
        assert_eq!(x.keys_with_ttl(), 5);
        let due = |now, max, skip: &HashSet<Box<[u8]>>| -> Vec<String> {
            x.due_keys(now, max, skip)
                .iter()
                .map(|k| String::from_utf8(k.to_vec()).unwrap())
                .collect()
        };
        assert_eq!(due(30, 10, &none()), ["a", "b", "c"]);
        assert_eq!(due(30, 2, &none()), ["a", "b"]);
        assert_eq!(due(30, 2, &HashSet::from([b"a"[..].into()])), ["b", "c"]);
        assert_eq!(x.next_deadline(), Some(10));
        assert_eq!(x.expired_in(&KeyRange::prefix(b""), 20), 3, "a, b and l");
        assert_eq!(x.expired_in(&KeyRange::prefix(b""), 14), 1, "a");
        assert_eq!(x.expired_in(&KeyRange::prefix(b"b"), 20), 1);
        x.detach(b"a", Expiry::At(10));
        x.detach(b"a", Expiry::At(10));
        x.detach(b"l", Expiry::Lease(1));
        assert_eq!(x.keys_with_ttl(), 3, "each detach counts once");
        assert!(!x.has_keys(1));
    }

    #[test]
    fn an_expire_removes_only_the_version_it_names_once_due() {
        let m = KeyMeta {
            create_index: 1,
            mod_index: 7,
            version: 2,
        };
        assert!(expire_applies(m, Expiry::At(50), 7, (8, 50)));
        assert!(!expire_applies(m, Expiry::At(50), 7, (8, 49)), "not due");
        assert!(
            !expire_applies(m, Expiry::At(50), 6, (8, 60)),
            "written since"
        );
        assert!(
            !expire_applies(m, Expiry::Never, 7, (8, 60)),
            "made permanent"
        );
        assert!(
            !expire_applies(m, Expiry::Lease(1), 7, (8, 60)),
            "leases revoke"
        );
        assert!(
            !expire_applies(m, Expiry::At(50), 7, (7, 60)),
            "the replay rule: a write at or past the record"
        );
    }
}
