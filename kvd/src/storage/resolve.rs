//! What a batch of client writes logs: the WAL writer's decisions before
//! the append, as one step over the applied state and the pending view
//! (docs/DESIGN.md §2.12, §2.13, §3.8).
//!
//! In batch order, each request becomes the op its record carries: a write
//! as it is, a transaction as the branch its compares choose in the
//! [`PendingView`] (the applied state with every entry logged but not
//! applied laid over it, and the batch's earlier requests); and with
//! `--max-memory-mib` each write that would grow the data set past the
//! budget is refused. A request taken is added to the view at once, so the
//! next one in the batch sees it.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use tokio::sync::oneshot;

use super::pending_view::PendingView;
use super::state::{self, State};
use super::{Error, Write, WriteReq, WriteResult};
use crate::model::{Expiry, Op, OpResult, Timestamp, Txn, TxnOp, TxnResult, MAX_TTL_MS};

/// A durable entry waiting for its commit (replicated mode).
pub(super) struct PendingEntry {
    pub index: u64,
    pub ts: Timestamp,
    pub op: Op,
    pub apply: bool,
    pub reply: Option<oneshot::Sender<Result<WriteResult, Error>>>,
    /// A transaction this node answers.
    pub txn: Option<TxnAnswer>,
}
/// What answering a transaction needs beyond its record: which branch ran,
/// and (masterless mode, where a prefix delete is logged as the deletes it
/// resolved into) how many logged ops each of the branch's ops became.
pub(super) struct TxnAnswer {
    succeeded: bool,
    /// Per op of the branch: `None` for one logged op, `Some(n)` for a
    /// prefix delete logged as `n` deletes.
    expanded: Option<Vec<Option<usize>>>,
}

impl TxnAnswer {
    /// The answer from what the record's logged ops returned.
    pub fn answer(&self, mut r: TxnResult) -> TxnResult {
        r.succeeded = self.succeeded;
        let Some(expanded) = &self.expanded else {
            return r;
        };
        let mut logged = std::mem::take(&mut r.results).into_iter();
        for e in expanded {
            let result = match e {
                None => logged.next(),
                Some(n) => {
                    let gone = logged
                        .by_ref()
                        .take(*n)
                        .filter(|x| *x == OpResult::Delete { deleted: true })
                        .count();
                    Some(OpResult::DeletePrefix {
                        deleted: gone as u64,
                    })
                }
            };
            r.results.extend(result);
        }
        r
    }
}

/// A write request resolved to the op it logs, with the stamp it was
/// resolved at (the record's).
pub(super) struct Resolved {
    pub op: Op,
    pub ts: Timestamp,
    pub apply: bool,
    pub reply: oneshot::Sender<Result<WriteResult, Error>>,
    pub txn: Option<TxnAnswer>,
}

impl Resolved {
    /// A record no client waits for (an expiry, a peer's merged write):
    /// applied when logged, its answer dropped.
    pub fn unanswered(op: Op, ts: Timestamp) -> Resolved {
        let (reply, _) = oneshot::channel();
        Resolved {
            op,
            ts,
            apply: true,
            reply,
            txn: None,
        }
    }
}

/// One batch's resolution, over the writer's state (see the module docs).
pub(super) struct Resolver<'a> {
    pub state: &'a State,
    /// Built here from `pending` when the batch holds a transaction (or, in
    /// masterless mode, a `keep_ttl` write) and there is none; kept up to
    /// date with every request taken.
    pub view: &'a mut Option<PendingView>,
    pub pending: &'a VecDeque<PendingEntry>,
    /// Masterless mode: prefix deletes are logged as deletes, and
    /// `keep_ttl` as the expiry the key has.
    pub merges: bool,
    pub max_bulk_items: usize,
    pub max_data_bytes: Option<u64>,
    /// `--max-leases`: a grant past this many leases is refused.
    pub max_leases: u64,
    /// The index the batch's first record will get.
    pub first_index: u64,
    /// The stamp of each request of the batch, in order (issued before
    /// resolving, so that "expired at a record" is decided with the stamp
    /// the record gets; a refused request's stamp is just not used).
    pub stamps: &'a [Timestamp],
}

/// Whether `op` has a put that keeps its key's expiry.
fn keeps(op: &Op) -> bool {
    match op {
        Op::Put { expiry, .. } => *expiry == Expiry::Keep,
        Op::Bulk { items } => items.iter().any(|(_, _, x)| *x == Expiry::Keep),
        _ => false,
    }
}

impl Resolver<'_> {
    /// Turns the batch's requests into the ops they log, in order, and
    /// answers those refused ([`Error::MemoryFull`]; a masterless prefix
    /// delete too large for one record; a lease grant past
    /// `--max-leases`). Shrinking writes free nothing for the rest of the
    /// batch (they are not applied yet), which keeps the memory check on
    /// the safe side. On a primary, writes logged but not yet committed are
    /// not in the state yet: concurrent writes can overshoot the budget by
    /// what is in flight.
    pub fn resolve(self, batch: &mut Vec<WriteReq>) -> Vec<Resolved> {
        let needs_view = batch.iter().any(|r| match &r.write {
            Write::Txn(_) => true,
            Write::Op(op) => keeps(op),
        });
        if needs_view && self.view.is_none() {
            let pending = self.pending.iter().filter(|p| p.apply);
            *self.view = Some(PendingView::of(
                self.state,
                pending.map(|p| (p.index, p.ts, &p.op)),
            ));
        }
        let mut used = self.state.data_bytes();
        let mut leases = self.leases_counted();
        let mut out = Vec::with_capacity(batch.len());
        for (req, ts) in batch.drain(..).zip(self.stamps.iter().copied()) {
            let (op, txn) = match req.write {
                Write::Op(op) => (self.keep_resolved(op, ts.physical_ms), None),
                Write::Txn(t) => match self.txn(t, ts.physical_ms) {
                    Ok((op, answer)) => (op, Some(answer)),
                    Err(e) => {
                        let _ = req.reply.send(Err(e));
                        continue;
                    }
                },
            };
            if let Op::LeaseGrant { ttl_ms } = op {
                // The WAL could not be read back with one (the API refuses
                // it first).
                if !(1..=MAX_TTL_MS).contains(&ttl_ms) {
                    let why = format!("lease TTL {ttl_ms} ms is not 1..={MAX_TTL_MS}");
                    let _ = req.reply.send(Err(Error::InvalidEntry(why)));
                    continue;
                }
                if leases >= self.max_leases {
                    let _ = req.reply.send(Err(Error::TooManyLeases { live: leases }));
                    continue;
                }
                leases += 1;
            }
            if let Some(limit) = self.max_data_bytes {
                match state::admit(used, self.state.growth_bytes(&op), limit) {
                    Ok(now) => used = now,
                    Err(would_be) => {
                        let _ = req.reply.send(Err(Error::MemoryFull { would_be, limit }));
                        continue;
                    }
                }
            }
            // A `debug_flaky` write never reaches the state.
            if let Some(view) = self.view.as_mut().filter(|_| req.apply) {
                view.push(self.state, self.first_index + out.len() as u64, ts, &op);
            }
            out.push(Resolved {
                op,
                ts,
                apply: req.apply,
                reply: req.reply,
                txn,
            });
        }
        out
    }

    /// The leases a grant is counted against: those of the state and those
    /// granted by entries not applied yet. Decided here rather than when
    /// applied, so that every replica (whatever its own `--max-leases`)
    /// applies the same grants.
    fn leases_counted(&self) -> u64 {
        let pending = self
            .pending
            .iter()
            .filter(|p| matches!(p.op, Op::LeaseGrant { .. }))
            .count() as u64;
        self.state.lease_count() + pending
    }

    /// A `keep_ttl` put is logged with the expiry its key has in the log
    /// before it (the view's, at the record's stamp): the record then says
    /// the same wherever and whenever it is applied. (Resolved at apply, a
    /// replay over a fuzzy snapshot could find the key in another state,
    /// say absent because a later revoke removed it, and bring it back
    /// with no lease; masterless nodes must merge the same deadline.)
    fn keep_resolved(&self, op: Op, at_ms: u64) -> Op {
        let Some(view) = self.view.as_ref().filter(|_| keeps(&op)) else {
            return op;
        };
        let kept = |key: &[u8], x: Expiry| {
            state::resolve_keep(x, view.held(self.state, key, at_ms).map(|(_, _, x)| x))
        };
        match op {
            Op::Put { key, value, expiry } => {
                let expiry = kept(&key, expiry);
                Op::Put { key, value, expiry }
            }
            // Each item against the view before the bulk: the state applies
            // the last item of each key, as one write.
            Op::Bulk { items } => Op::Bulk {
                items: items
                    .into_iter()
                    .map(|(k, v, x)| {
                        let x = kept(&k, x);
                        (k, v, x)
                    })
                    .collect(),
            },
            other => other,
        }
    }

    /// The record a transaction logs: the branch its compares choose in
    /// the pending view, at the stamp its record gets. Masterless mode
    /// (where the API takes no compares) resolves each prefix delete into
    /// deletes of the keys this node holds, so that other nodes merge it
    /// key by key, and each `keep_ttl` put into the expiry its key has.
    fn txn(&self, txn: Txn, at_ms: u64) -> Result<(Op, TxnAnswer), Error> {
        let view = self
            .view
            .as_ref()
            .expect("the view is built for a batch holding a transaction");
        let (succeeded, ops) = txn.into_branch(|k| view.get(self.state, k, at_ms));
        let mut answer = TxnAnswer {
            succeeded,
            expanded: None,
        };
        let prefixes = ops
            .iter()
            .any(|op| matches!(op, TxnOp::DeletePrefix { .. }));
        let keeps = ops.iter().any(|op| {
            matches!(
                op,
                TxnOp::Put {
                    expiry: Expiry::Keep,
                    ..
                }
            )
        });
        if !(keeps || self.merges && prefixes) {
            return Ok((Op::Txn { ops }, answer));
        }
        let (mut flat, mut expanded) = (Vec::with_capacity(ops.len()), Vec::new());
        // What the branch's earlier ops did to a key: present (with its
        // expiry) or not; and the prefixes it deleted (when not expanded).
        let mut own: BTreeMap<Bytes, Option<Expiry>> = BTreeMap::new();
        let mut cleared: Vec<Bytes> = Vec::new();
        for op in ops {
            match op {
                TxnOp::DeletePrefix { prefix } if !self.merges => {
                    own.retain(|k, _| !k.starts_with(&prefix));
                    cleared.push(prefix.clone());
                    expanded.push(None);
                    flat.push(TxnOp::DeletePrefix { prefix });
                }
                TxnOp::DeletePrefix { prefix } => {
                    let mut keys = view.keys_under(self.state, &prefix, at_ms);
                    keys.retain(|k| !matches!(own.get(k), Some(None)));
                    let put_here = own
                        .iter()
                        .filter(|(k, there)| there.is_some() && k.starts_with(&prefix));
                    keys.extend(put_here.map(|(k, _)| k.clone()));
                    keys.sort();
                    keys.dedup();
                    expanded.push(Some(keys.len()));
                    for key in keys {
                        own.insert(key.clone(), None);
                        flat.push(TxnOp::Delete { key });
                    }
                }
                TxnOp::Put { key, value, expiry } => {
                    let had = match own.get(&key) {
                        Some(x) => *x,
                        None if cleared.iter().any(|p| key.starts_with(p)) => None,
                        None => view.held(self.state, &key, at_ms).map(|(_, _, x)| x),
                    };
                    let expiry = state::resolve_keep(expiry, had);
                    own.insert(key.clone(), Some(expiry));
                    expanded.push(None);
                    flat.push(TxnOp::Put { key, value, expiry });
                }
                op => {
                    if let TxnOp::Delete { key } = &op {
                        own.insert(key.clone(), None);
                    }
                    expanded.push(None);
                    flat.push(op);
                }
            }
        }
        // Peers take at most this many more ops in a record (`validate_op`).
        let (max, deletes) = (
            self.max_bulk_items,
            expanded.iter().flatten().sum::<usize>(),
        );
        if deletes > max {
            return Err(Error::InvalidEntry(format!(
                "the transaction's prefix deletes would log {deletes} deletes; masterless mode \
                 takes at most --max-bulk-items ({max}) in one record"
            )));
        }
        // Only masterless mode expands prefix deletes (and says so).
        answer.expanded = self.merges.then_some(expanded);
        Ok((Op::Txn { ops: flat }, answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use crate::model::{Cmp, Compare, KeyRange, Target};
    use crate::storage::record::Timestamp;
    use tokio::sync::oneshot::Receiver;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn put(k: &str, v: &str) -> TxnOp {
        TxnOp::Put {
            key: b(k),
            value: b(v),
            expiry: Expiry::Never,
        }
    }

    /// If `key` is at `mod_index`, put `value`; else read the key.
    fn cas(key: &str, mod_index: u64, value: &str) -> Txn {
        Txn {
            compare: vec![Compare {
                key: b(key),
                target: Target::ModIndex(mod_index),
                cmp: Cmp::Eq,
            }],
            success: vec![put(key, value)],
            failure: vec![TxnOp::Get { key: b(key) }],
        }
    }

    type Answer = Receiver<Result<WriteResult, Error>>;

    fn request(write: Write) -> (WriteReq, Answer) {
        let (reply, rx) = oneshot::channel();
        let req = WriteReq {
            write,
            apply: true,
            reply,
        };
        (req, rx)
    }

    struct Setup {
        state: State,
        view: Option<PendingView>,
        pending: VecDeque<PendingEntry>,
        merges: bool,
        max_data_bytes: Option<u64>,
        /// The stamp (ms) every request of the batch gets.
        at_ms: u64,
    }

    impl Setup {
        /// A state whose record 5 put `k`.
        fn new() -> Setup {
            let state = State::new();
            state.skip_to(4);
            state.apply(
                5,
                Timestamp::default(),
                &Op::Put {
                    key: b("k"),
                    value: b("v"),
                    expiry: Expiry::Never,
                },
                false,
            );
            Setup {
                state,
                view: None,
                pending: VecDeque::new(),
                merges: false,
                max_data_bytes: None,
                at_ms: 0,
            }
        }

        fn resolve(&mut self, writes: Vec<Write>) -> (Vec<Resolved>, Vec<Answer>) {
            let first_index = self.pending.back().map_or(6, |p| p.index + 1);
            let (mut batch, answers): (Vec<_>, Vec<_>) = writes.into_iter().map(request).unzip();
            let ts = Timestamp {
                physical_ms: self.at_ms,
                ..Timestamp::default()
            };
            let stamps = vec![ts; batch.len()];
            let out = Resolver {
                state: &self.state,
                view: &mut self.view,
                pending: &self.pending,
                merges: self.merges,
                max_bulk_items: 3,
                max_data_bytes: self.max_data_bytes,
                max_leases: 2,
                first_index,
                stamps: &stamps,
            }
            .resolve(&mut batch);
            (out, answers)
        }
    }

    fn succeeded(r: &Resolved) -> Option<bool> {
        r.txn.as_ref().map(|t| t.succeeded)
    }

    #[test]
    fn of_two_compare_and_swaps_in_one_batch_the_second_sees_the_first() {
        let mut s = Setup::new();
        let (out, _) = s.resolve(vec![
            Write::Txn(cas("k", 5, "a")),
            Write::Txn(cas("k", 5, "b")),
        ]);
        assert_eq!(
            out.iter().map(succeeded).collect::<Vec<_>>(),
            [Some(true), Some(false)]
        );
        assert_eq!(
            out[0].op,
            Op::Txn {
                ops: vec![put("k", "a")]
            }
        );
        assert_eq!(
            out[1].op,
            Op::Txn {
                ops: vec![TxnOp::Get { key: b("k") }]
            }
        );
        // The first is record 6: the next one's compare against 6 holds.
        let (out, _) = s.resolve(vec![Write::Txn(cas("k", 6, "c"))]);
        assert_eq!(succeeded(&out[0]), Some(true));
    }

    #[test]
    fn a_compare_sees_an_entry_logged_but_not_committed() {
        let mut s = Setup::new();
        s.pending.push_back(PendingEntry {
            index: 6,
            ts: Timestamp::default(),
            op: Op::Put {
                key: b("k"),
                value: b("pending"),
                expiry: Expiry::Never,
            },
            apply: true,
            reply: None,
            txn: None,
        });
        let (out, _) = s.resolve(vec![
            Write::Txn(cas("k", 5, "x")),
            Write::Txn(cas("k", 6, "y")),
        ]);
        assert_eq!(
            out.iter().map(succeeded).collect::<Vec<_>>(),
            [Some(false), Some(true)]
        );
        let view = s.view.as_ref().unwrap();
        let (meta, value) = view.get(&s.state, b"k", 0).unwrap();
        assert_eq!(
            (meta.mod_index, meta.version, &value[..]),
            (8, 3, &b"y"[..])
        );
    }

    #[test]
    fn a_plain_write_earlier_in_the_batch_counts_too() {
        let mut s = Setup::new();
        let plain = Write::Op(Op::Delete { key: b("k") });
        let (out, _) = s.resolve(vec![plain, Write::Txn(cas("k", 5, "x"))]);
        assert_eq!(succeeded(&out[1]), Some(false), "k was deleted by record 6");
    }

    #[test]
    fn a_write_past_the_memory_budget_is_refused_and_not_seen_by_the_next() {
        let mut s = Setup::new();
        s.max_data_bytes = Some(s.state.data_bytes() + 10);
        let big = Write::Txn(Txn {
            success: vec![put("k", &"x".repeat(100))],
            ..Txn::default()
        });
        let (out, mut answers) = s.resolve(vec![big, Write::Txn(cas("k", 5, "y"))]);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            answers[0].try_recv(),
            Ok(Err(Error::MemoryFull { .. }))
        ));
        assert_eq!(
            succeeded(&out[0]),
            Some(true),
            "the refused write is not in the view"
        );
    }

    #[test]
    fn masterless_prefix_deletes_are_logged_as_the_deletes_of_the_keys_held() {
        let mut s = Setup::new();
        s.merges = true;
        s.state.apply(
            6,
            Timestamp::default(),
            &Op::Put {
                key: b("p/1"),
                value: b(""),
                expiry: Expiry::Never,
            },
            false,
        );
        let txn = |prefix: &str| {
            Write::Txn(Txn {
                success: vec![
                    put("p/2", "new"),
                    TxnOp::DeletePrefix { prefix: b(prefix) },
                    TxnOp::Range(crate::model::RangeRead {
                        range: KeyRange::prefix(b"p/"),
                        limit: 10,
                        keys_only: true,
                    }),
                ],
                ..Txn::default()
            })
        };
        let (out, _) = s.resolve(vec![txn("p/")]);
        let Op::Txn { ops } = &out[0].op else {
            panic!("a transaction record");
        };
        assert_eq!(
            &ops[1..3],
            &[
                TxnOp::Delete { key: b("p/1") },
                TxnOp::Delete { key: b("p/2") }
            ]
        );
        // What the record's ops return is folded back into one result per op.
        let logged = TxnResult {
            succeeded: true,
            results: vec![
                OpResult::Put { mod_index: 7 },
                OpResult::Delete { deleted: true },
                OpResult::Delete { deleted: true },
                OpResult::Range {
                    items: vec![],
                    more: false,
                },
            ],
        };
        let answer = out[0].txn.as_ref().unwrap().answer(logged);
        assert_eq!(answer.results[1], OpResult::DeletePrefix { deleted: 2 });
        assert_eq!(answer.results.len(), 3);
        // Beyond --max-bulk-items (3 here) deletes: refused, nothing logged.
        for i in 3..6 {
            s.state.apply(
                i + 4,
                Timestamp::default(),
                &Op::Put {
                    key: b(&format!("p/{i}")),
                    value: b(""),
                    expiry: Expiry::Never,
                },
                false,
            );
        }
        let (out, mut answers) = s.resolve(vec![txn("p/")]);
        assert!(out.is_empty());
        assert!(matches!(
            answers[0].try_recv(),
            Ok(Err(Error::InvalidEntry(_)))
        ));
    }

    /// If `key` does not exist, put `value`.
    fn create(key: &str, value: &str) -> Txn {
        Txn {
            compare: vec![Compare {
                key: b(key),
                target: Target::Exists(false),
                cmp: Cmp::Eq,
            }],
            success: vec![put(key, value)],
            failure: vec![],
        }
    }

    #[test]
    fn a_compare_finds_a_key_expired_at_its_records_stamp_absent() {
        let mut s = Setup::new();
        s.state.apply(
            6,
            Timestamp::default(),
            &Op::Put {
                key: b("t"),
                value: b("v"),
                expiry: Expiry::At(100),
            },
            false,
        );
        s.at_ms = 99;
        let (out, _) = s.resolve(vec![Write::Txn(create("t", "new"))]);
        assert_eq!(succeeded(&out[0]), Some(false), "alive at 99");
        s.view = None;
        s.at_ms = 100;
        let (out, _) = s.resolve(vec![Write::Txn(create("t", "new"))]);
        assert_eq!(succeeded(&out[0]), Some(true), "expired at 100");
        assert_eq!(out[0].ts.physical_ms, 100, "resolved at the stamp it logs");
    }

    #[test]
    fn keep_ttl_is_logged_as_the_expiry_the_key_has_in_every_mode() {
        let mut s = Setup::new();
        s.merges = true;
        s.state.apply(
            6,
            Timestamp::default(),
            &Op::Put {
                key: b("t"),
                value: b("v"),
                expiry: Expiry::At(500),
            },
            false,
        );
        let keep = |k: &str| Op::Put {
            key: b(k),
            value: b("w"),
            expiry: Expiry::Keep,
        };
        let (out, _) = s.resolve(vec![Write::Op(keep("t")), Write::Op(keep("k"))]);
        let expiries: Vec<Expiry> = out
            .iter()
            .map(|r| match &r.op {
                Op::Put { expiry, .. } => *expiry,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(expiries, [Expiry::At(500), Expiry::Never]);
        // Outside masterless mode too: a replay must not resolve it again.
        s.merges = false;
        s.view = None;
        let (out, _) = s.resolve(vec![Write::Op(keep("t"))]);
        assert!(matches!(
            &out[0].op,
            Op::Put {
                expiry: Expiry::At(500),
                ..
            }
        ));
    }

    #[test]
    fn a_grant_past_max_leases_counts_the_pending_ones_and_the_batch() {
        let mut s = Setup::new();
        s.pending.push_back(PendingEntry {
            index: 6,
            ts: Timestamp::default(),
            op: Op::LeaseGrant { ttl_ms: 10 },
            apply: true,
            reply: None,
            txn: None,
        });
        let grant = || Write::Op(Op::LeaseGrant { ttl_ms: 10 });
        let (out, mut answers) = s.resolve(vec![grant(), grant()]);
        assert_eq!(out.len(), 1, "--max-leases 2 here");
        assert!(answers[0].try_recv().is_err(), "the first is taken");
        assert!(matches!(
            answers[1].try_recv(),
            Ok(Err(Error::TooManyLeases { live: 2 }))
        ));
    }
}
