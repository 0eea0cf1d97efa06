//! The pending view: the key space as it will be once every entry logged
//! but not yet applied is applied. A transaction's compares are evaluated
//! against it (docs/DESIGN.md §2.12, §2.13), so that nothing logged before
//! a transaction, committed or not, can come between its check and its
//! write: on a primary the entries waiting for their commit (earlier
//! epochs' too), and the earlier requests of the same batch everywhere.
//!
//! It is the applied state overlaid with the newest pending write of each
//! key (its position and what it leaves: versions and value, or nothing)
//! and the pending prefix deletes, so a lookup costs one map probe, a scan
//! of the (few) pending prefix deletes and at most one read of the state.
//! The WAL writer keeps it while it has a use for it: built from the
//! pending entries when a batch holds a transaction, told every entry it
//! logs after that and every entry it applies, and dropped once nothing is
//! pending (or when the log is cut, replaced or refused a batch).
//!
//! Its versions follow the state's rule exactly (`state::put_meta`): a
//! record writes each key once, however often it names it.

use std::collections::HashMap;

use bytes::Bytes;

use super::expiry::Lease;
use super::state::{put_meta, resolve_keep, State};
use crate::model::{Expiry, KeyMeta, KeyRange, Op, Timestamp, TxnOp};

/// Where a write is in the log: its record's index, then its place in the
/// record (a bulk's item, a transaction's op), so that two writes of one
/// record are ordered too.
type At = (u64, u32);

/// What a key will hold: its versions, value and expiry, or nothing.
type Held = Option<(KeyMeta, Bytes, Expiry)>;

/// See the module docs.
#[derive(Default)]
pub struct PendingView {
    keys: HashMap<Bytes, (At, Held), foldhash::fast::RandomState>,
    /// Pending prefix deletes, in log order.
    prefixes: Vec<(At, Bytes)>,
    /// The leases pending records grant, keep alive (`Some`: the lease
    /// after) or end (`None`), with the index of the record.
    leases: HashMap<u64, (Option<Lease>, u64)>,
}

impl PendingView {
    /// The view of `state` with `entries` (index, stamp, op; ascending)
    /// pending.
    pub fn of<'a>(
        state: &State,
        entries: impl Iterator<Item = (u64, Timestamp, &'a Op)>,
    ) -> PendingView {
        let mut view = PendingView::default();
        for (index, ts, op) in entries {
            view.push(state, index, ts, op);
        }
        view
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty() && self.leases.is_empty()
    }

    /// The newest pending prefix delete that covers `key`.
    fn cut(&self, key: &[u8]) -> Option<At> {
        self.prefixes
            .iter()
            .filter(|(_, p)| key.starts_with(p))
            .map(|(at, _)| *at)
            .max()
    }

    /// Lease `id` once everything pending is applied.
    fn lease(&self, state: &State, id: u64) -> Option<Lease> {
        match self.leases.get(&id) {
            Some((lease, _)) => *lease,
            None => state.lease_row(id),
        }
    }

    fn lease_alive(&self, state: &State, id: u64, at_ms: u64) -> bool {
        self.lease(state, id).is_some_and(|l| l.deadline_ms > at_ms)
    }

    /// Whether a key holding `expiry` is expired at a record stamped
    /// `at_ms` that follows everything pending (the state's rule, with the
    /// pending lease records laid over its lease table).
    fn expired(&self, state: &State, expiry: Expiry, at_ms: u64) -> bool {
        match expiry {
            Expiry::At(d) => d <= at_ms,
            Expiry::Lease(id) => !self.lease_alive(state, id, at_ms),
            Expiry::Never | Expiry::Keep => false,
        }
    }

    /// What `key` holds once everything pending is applied, expired or not.
    fn raw(&self, state: &State, key: &[u8]) -> Held {
        match (self.keys.get(key), self.cut(key)) {
            (Some((at, _)), Some(cut)) if cut > *at => None,
            (Some((_, held)), _) => held.clone(),
            (None, Some(_)) => None,
            (None, None) => state
                .get_raw(key)
                .and_then(|i| Some((i.meta, i.value?, i.expiry))),
        }
    }

    /// What `key` holds, to a record stamped `at_ms`, once everything
    /// pending is applied.
    pub fn held(&self, state: &State, key: &[u8], at_ms: u64) -> Held {
        self.raw(state, key)
            .filter(|(_, _, x)| !self.expired(state, *x, at_ms))
    }

    /// [`PendingView::held`] as a compare reads it: versions and value.
    pub fn get(&self, state: &State, key: &[u8], at_ms: u64) -> Option<(KeyMeta, Bytes)> {
        self.held(state, key, at_ms).map(|(m, v, _)| (m, v))
    }

    /// The keys under `prefix` once everything pending is applied, in
    /// order, as a record stamped `at_ms` finds them.
    pub fn keys_under(&self, state: &State, prefix: &[u8], at_ms: u64) -> Vec<Bytes> {
        let mut keys = state.keys_in(&KeyRange::prefix(prefix), at_ms);
        keys.extend(self.keys.keys().filter(|k| k.starts_with(prefix)).cloned());
        keys.sort();
        keys.dedup();
        keys.retain(|k| self.held(state, k, at_ms).is_some());
        keys
    }

    fn put(&mut self, state: &State, at: At, at_ms: u64, key: &Bytes, value: &Bytes, x: Expiry) {
        // The state's rule: the replay rule cannot apply to a record logged
        // after everything the view holds, and a key expired at the record
        // is absent to it, unless the record itself wrote it.
        let raw = self.raw(state, key);
        // The same record wrote it before: one write, as the state counts.
        let rewrite = raw.is_some() && self.keys.get(key).is_some_and(|(a, _)| a.0 == at.0);
        let current = match rewrite {
            true => raw,
            false => raw.filter(|(_, _, x)| !self.expired(state, *x, at_ms)),
        };
        let expiry = resolve_keep(x, current.as_ref().map(|(_, _, x)| *x));
        if let Some(meta) = put_meta(current.map(|(m, _, _)| m), at.0, rewrite) {
            self.keys
                .insert(key.clone(), (at, Some((meta, value.clone(), expiry))));
        }
    }

    fn delete(&mut self, at: At, key: &Bytes) {
        self.keys.insert(key.clone(), (at, None));
    }

    /// Record `index` (`op`, stamped `ts`) was logged and is not applied
    /// yet.
    pub fn push(&mut self, state: &State, index: u64, ts: Timestamp, op: &Op) {
        let at_ms = ts.physical_ms;
        if self.names_dead_lease(state, op, at_ms) {
            return; // it will change nothing
        }
        match op {
            Op::Put { key, value, expiry } => {
                self.put(state, (index, 0), at_ms, key, value, *expiry)
            }
            Op::Delete { key } => self.delete((index, 0), key),
            Op::Bulk { items } => {
                // As the state applies it: the last item of each key.
                let mut last: HashMap<&Bytes, usize> = HashMap::new();
                for (i, (k, _, _)) in items.iter().enumerate() {
                    last.insert(k, i);
                }
                for (i, (k, v, x)) in items.iter().enumerate() {
                    if last.get(k) == Some(&i) {
                        self.put(state, (index, place(i)), at_ms, k, v, *x);
                    }
                }
            }
            Op::Txn { ops } => {
                for (i, op) in ops.iter().enumerate() {
                    let at = (index, place(i));
                    match op {
                        TxnOp::Put { key, value, expiry } => {
                            self.put(state, at, at_ms, key, value, *expiry)
                        }
                        TxnOp::Delete { key } => self.delete(at, key),
                        TxnOp::DeletePrefix { prefix } => self.prefixes.push((at, prefix.clone())),
                        TxnOp::Get { .. } | TxnOp::Range(_) => {}
                    }
                }
            }
            Op::LeaseGrant { ttl_ms } => {
                let lease = Lease {
                    ttl_ms: *ttl_ms,
                    deadline_ms: at_ms.saturating_add(*ttl_ms),
                };
                self.leases.insert(index, (Some(lease), index));
            }
            Op::LeaseKeepAlive { id } => {
                if let Some(l) = self.lease(state, *id).filter(|l| l.deadline_ms > at_ms) {
                    let deadline_ms = at_ms.saturating_add(l.ttl_ms).max(l.deadline_ms);
                    let lease = Lease { deadline_ms, ..l };
                    self.leases.insert(*id, (Some(lease), index));
                }
            }
            Op::LeaseRevoke { id, expired } => {
                // As the state decides: a client's revoke of a live lease,
                // the expirer's of a dead one.
                if self.lease_alive(state, *id, at_ms) != *expired {
                    self.leases.insert(*id, (None, index));
                }
            }
            // An expiry needs nothing here: every later record's stamp is at
            // or past it, so the keys it names are expired to those already.
            Op::Noop | Op::Expire { .. } | Op::Config { .. } => {}
        }
    }

    /// Whether `op` names a lease that is dead at its stamp (the state will
    /// refuse it whole).
    fn names_dead_lease(&self, state: &State, op: &Op, at_ms: u64) -> bool {
        let dead = |x: &Expiry| matches!(x, Expiry::Lease(_)) && self.expired(state, *x, at_ms);
        match op {
            Op::Put { expiry, .. } => dead(expiry),
            Op::Bulk { items } => items.iter().any(|(_, _, x)| dead(x)),
            Op::Txn { ops } => ops.iter().any(|op| match op {
                TxnOp::Put { expiry, .. } => dead(expiry),
                _ => false,
            }),
            _ => false,
        }
    }

    /// Record `index` (`op`) is now applied to the state: what the view
    /// held for it only, it forgets (a later pending write of a key stays).
    pub fn applied(&mut self, index: u64, op: &Op) {
        let mut forget = |key: &Bytes| {
            if self.keys.get(key).is_some_and(|(at, _)| at.0 == index) {
                self.keys.remove(key);
            }
        };
        op.for_each_written_key(&mut forget);
        match op {
            Op::LeaseGrant { .. } => self.forget_lease(index, index),
            Op::LeaseKeepAlive { id } | Op::LeaseRevoke { id, .. } => self.forget_lease(*id, index),
            _ => {}
        }
        self.prefixes.retain(|(at, _)| at.0 != index);
    }
}

impl PendingView {
    /// Record `index`, now applied, set lease `id`: the state holds it now
    /// (unless a later pending record set it again).
    fn forget_lease(&mut self, id: u64, index: u64) {
        if self.leases.get(&id).is_some_and(|(_, at)| *at == index) {
            self.leases.remove(&id);
        }
    }
}

fn place(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    const KEYS: [&str; 6] = ["a/1", "a/2", "a/3", "b/1", "b/2", "c"];

    /// Record `index`'s stamp: 10 ms a record.
    fn stamp(index: u64) -> Timestamp {
        Timestamp {
            physical_ms: index * 10,
            logical: 0,
            node: 0,
        }
    }

    /// Deadlines around the stamps of a run of 20 records, and leases
    /// granted at some of the first indexes.
    fn random_expiry(rng: &mut StdRng) -> Expiry {
        match rng.gen_range(0..8) {
            0..=3 => Expiry::Never,
            4 | 5 => Expiry::At(rng.gen_range(0..250)),
            6 => Expiry::Lease(rng.gen_range(1..12)),
            _ => Expiry::Keep,
        }
    }

    fn random_op(rng: &mut StdRng) -> Op {
        let k = |rng: &mut StdRng| b(KEYS[rng.gen_range(0..KEYS.len())]);
        let v = |rng: &mut StdRng| b(&rng.gen_range(0..1000).to_string());
        match rng.gen_range(0..9) {
            0 => Op::Put {
                key: k(rng),
                value: v(rng),
                expiry: random_expiry(rng),
            },
            1 => Op::Delete { key: k(rng) },
            2 => Op::Bulk {
                items: (0..rng.gen_range(1..4))
                    .map(|_| (k(rng), v(rng), random_expiry(rng)))
                    .collect(),
            },
            3 => Op::Noop,
            4 => Op::LeaseGrant {
                ttl_ms: rng.gen_range(1..120),
            },
            5 => Op::LeaseKeepAlive {
                id: rng.gen_range(1..12),
            },
            6 => Op::LeaseRevoke {
                id: rng.gen_range(1..12),
                expired: rng.gen_bool(0.5),
            },
            7 => Op::Expire {
                keys: vec![(k(rng), rng.gen_range(0..12))],
            },
            _ => Op::Txn {
                ops: (0..rng.gen_range(0..5))
                    .map(|_| match rng.gen_range(0..4) {
                        0 => TxnOp::Put {
                            key: k(rng),
                            value: v(rng),
                            expiry: random_expiry(rng),
                        },
                        1 => TxnOp::Delete { key: k(rng) },
                        2 => TxnOp::DeletePrefix {
                            prefix: b(["a/", "b/", "c"][rng.gen_range(0..3)]),
                        },
                        _ => TxnOp::Get { key: k(rng) },
                    })
                    .collect(),
            },
        }
    }

    /// The view and the state agree, as a record stamped `at_ms` sees them.
    fn assert_same(view: &PendingView, base: &State, want: &State, at_ms: u64, what: &str) {
        for k in KEYS {
            let got = view.held(base, k.as_bytes(), at_ms);
            let expect = want
                .get_item(k.as_bytes(), at_ms)
                .map(|i| (i.meta, i.value.unwrap(), i.expiry));
            assert_eq!(got, expect, "{k} {what}");
        }
        let under: Vec<Bytes> = view.keys_under(base, b"a/", at_ms);
        let expect = want.keys_in(&KeyRange::prefix(b"a/"), at_ms);
        assert_eq!(under, expect, "{what}");
    }

    /// The view of a state with entries pending is the state those entries
    /// make when applied, versions and expiries included, to the next
    /// record, at every step of applying them.
    #[test]
    fn the_view_is_what_applying_the_pending_entries_gives() {
        let mut rng = StdRng::seed_from_u64(13);
        for case in 0..3000 {
            let (base, want) = (State::new(), State::new());
            let mut index = 0;
            for _ in 0..rng.gen_range(0..8) {
                index += 1;
                let op = random_op(&mut rng);
                base.apply(index, stamp(index), &op, false);
                want.apply(index, stamp(index), &op, false);
            }
            let pending: Vec<(u64, Op)> = (0..rng.gen_range(1..10))
                .map(|i| (index + 1 + i, random_op(&mut rng)))
                .collect();
            let mut view =
                PendingView::of(&base, pending.iter().map(|(i, op)| (*i, stamp(*i), op)));
            for (i, op) in &pending {
                want.apply(*i, stamp(*i), op, false);
            }
            let next = stamp(pending.last().map_or(index, |(i, _)| *i) + 1).physical_ms;
            let all = format!("case {case}, all pending");
            assert_same(&view, &base, &want, next, &all);
            for (i, op) in &pending {
                base.apply(*i, stamp(*i), op, false);
                view.applied(*i, op);
                let what = format!("case {case}, through {i}");
                assert_same(&view, &base, &want, next, &what);
            }
            assert!(
                view.is_empty(),
                "case {case}: nothing pending, nothing held"
            );
        }
    }
}
