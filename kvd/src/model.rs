//! The model: the types every layer speaks in, with no I/O and no
//! dependency on anything else in kvd.
//!
//! - [`Op`] and [`Record`]: a write and a log entry (their WAL encoding is
//!   `storage::record`).
//! - [`Timestamp`]: a hybrid-logical-clock stamp (the wire type).
//! - [`LogPos`]: a position `(epoch, index)` in a replicated log.
//! - [`KeyMeta`], [`Item`], [`KeyRange`], [`RangeRead`], [`Page`]: a key's
//!   versions and what reads return.
//! - [`Txn`], [`Compare`], [`TxnOp`], [`TxnResult`]: a transaction as a
//!   client asks for it and as it is answered; the branch it chose is
//!   logged as [`Op::Txn`].
//!
//! The pure rules of the bottom layer live beside the runtimes they govern
//! and import only this: `replication::rules` (votes, commit index, log
//! matching), `masterless::rules` (stream positions, stable time, quorum
//! counting) and `masterless::hlc` (the clock).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use kvproto::Timestamp;

/// What a record does to the key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Bytes,
        value: Bytes,
        expiry: Expiry,
    },
    Delete {
        key: Bytes,
    },
    /// Each item is `(key, value, expiry)`.
    Bulk {
        items: Vec<(Bytes, Bytes, Expiry)>,
    },
    Noop,
    /// The branch a transaction chose, resolved by the node that took it:
    /// its compares are not logged, so every replica applies the same ops
    /// whatever state it replays them on. Reads are carried too, so that
    /// the node answering runs them at the record's place in the log.
    Txn {
        ops: Vec<TxnOp>,
    },
    /// Removes each key whose `mod_index` is still the one named and whose
    /// deadline ([`Expiry::At`]) is at or before the record's stamp: the
    /// expiries a primary (or a masterless node, for itself) decided.
    Expire {
        keys: Vec<(Bytes, u64)>,
    },
    /// Grants a lease of `ttl_ms`; its id is the record's index, its
    /// deadline the record's stamp plus `ttl_ms`.
    LeaseGrant {
        ttl_ms: u64,
    },
    /// Moves lease `id`'s deadline to the record's stamp plus its TTL, if
    /// the lease is alive at that stamp.
    LeaseKeepAlive {
        id: u64,
    },
    /// Ends lease `id` and deletes every key attached to it. `expired`:
    /// the primary's expiry, which applies only if the lease's deadline is
    /// at or before the record's stamp (its keys' events are `expire`).
    LeaseRevoke {
        id: u64,
        expired: bool,
    },
    /// The cluster's configuration from this record on (docs/DESIGN.md
    /// §4.11): it changes no key.
    Config {
        config: crate::replication::config::Config,
    },
}

/// When a key stops being readable. Deadlines are Unix times in
/// milliseconds, of the clock of the node that took the write, as Redis
/// keeps them (`PEXPIREAT`), so they mean the same on every replica and
/// after a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Expiry {
    /// No deadline: a plain write clears any TTL or lease the key had.
    #[default]
    Never,
    /// Unreadable from this deadline on.
    At(u64),
    /// Lives as long as the lease with this id.
    Lease(u64),
    /// A write that keeps what the key had (`keep_ttl`); resolved when the
    /// record is applied, never stored.
    Keep,
}

pub use kvproto::MAX_TTL_MS;

/// Most keys one [`Op::Expire`] record removes, so that expiring many keys
/// at once is spread over many batches and never holds writes up.
pub const MAX_EXPIRE_KEYS: usize = 1000;

/// A lease as reads show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: u64,
    pub ttl_ms: u64,
    /// Unix ms.
    pub deadline_ms: u64,
    /// The keys attached to it, in byte order.
    pub keys: Vec<Bytes>,
}

/// What happened to one key in one record, as a watch streams it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Put,
    Delete,
    /// Removed because its deadline passed or its lease ended by expiry.
    Expire,
}

/// One key's change. `meta` is the key's new versions for a put, zeros
/// otherwise; `value` the new value (a put); `prev` the value it had
/// (when it had one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub key: Bytes,
    pub value: Option<Bytes>,
    pub prev: Option<Bytes>,
    pub meta: KeyMeta,
}

/// Every change one applied record made, in the order it made them (the
/// same on every replica), with the record's index and stamp. A record
/// that changed nothing (a noop, a read) has no events but still moves the
/// watch position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordEvents {
    pub index: u64,
    pub ts: Timestamp,
    pub events: Vec<Event>,
}

/// A key's versions, as etcd keeps them: the log index that created the
/// key (since it last did not exist), the index of its last write, and the
/// number of writes since its creation (1 after the first). An absent key
/// reads as all zeros in a compare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyMeta {
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
}

/// One key as a read returns it; `value` is `None` for a keys-only read.
/// `expiry` is what the key holds: never [`Expiry::Keep`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub key: Bytes,
    pub value: Option<Bytes>,
    pub meta: KeyMeta,
    pub expiry: Expiry,
}

/// The half-open key range `[start, end)` in byte order; `end: None` runs
/// to the end of the key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// Every key that starts with `prefix` (the empty prefix: every key).
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        KeyRange {
            start: Bytes::copy_from_slice(prefix),
            end: prefix_end(prefix).map(Bytes::from),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= &self.start[..] && self.end.as_ref().is_none_or(|e| key < &e[..])
    }
}

/// The first key after every key that starts with `prefix`, or `None` if
/// there is none (an empty prefix, or one of only 0xFF bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A range read: at most `limit` keys of `range` in byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRead {
    pub range: KeyRange,
    pub limit: usize,
    pub keys_only: bool,
}

/// A page of a range read, a consistent cut of the state at `index` (the
/// applied index when it was read). `more`: the range holds keys after
/// the last item (the page stopped at its limit, or at
/// [`MAX_PAGE_VALUE_BYTES`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Item>,
    pub more: bool,
    pub index: u64,
}

/// Most keys one range read returns (a page, or a transaction's range).
pub const MAX_RANGE_LIMIT: usize = 10_000;

/// A page stops early once its values reach this many bytes (it always
/// holds at least one item), so that an answer stays bounded whatever the
/// values' sizes.
pub const MAX_PAGE_VALUE_BYTES: usize = 16 << 20;

/// One operation of a transaction's branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Bytes,
        value: Bytes,
        expiry: Expiry,
    },
    Delete {
        key: Bytes,
    },
    /// Deletes every key that starts with `prefix` (never empty).
    DeletePrefix {
        prefix: Bytes,
    },
    Get {
        key: Bytes,
    },
    Range(RangeRead),
}

impl Op {
    /// Calls `f` with every key this op puts or deletes by name (a prefix
    /// delete names none).
    pub fn for_each_written_key(&self, mut f: impl FnMut(&Bytes)) {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => f(key),
            Op::Bulk { items } => items.iter().for_each(|(k, _, _)| f(k)),
            Op::Txn { ops } => {
                for op in ops {
                    if let TxnOp::Put { key, .. } | TxnOp::Delete { key } = op {
                        f(key);
                    }
                }
            }
            _ => {}
        }
    }
}

impl TxnOp {
    /// Whether the op changes the key space.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            TxnOp::Put { .. } | TxnOp::Delete { .. } | TxnOp::DeletePrefix { .. }
        )
    }
}

/// What a compare looks at, with the operand it is compared to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    ModIndex(u64),
    CreateIndex(u64),
    Version(u64),
    Value(Bytes),
    /// Only `==` and `!=` (the API refuses the others).
    Exists(bool),
}

/// A compare's operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Gt,
}

impl Cmp {
    fn test<T: Ord + ?Sized>(self, current: &T, operand: &T) -> bool {
        match self {
            Cmp::Eq => current == operand,
            Cmp::Ne => current != operand,
            Cmp::Lt => current < operand,
            Cmp::Gt => current > operand,
        }
    }
}

/// One condition of a transaction: `key`'s current target `cmp` the
/// operand the target carries (`version == 3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Bytes,
    pub target: Target,
    pub cmp: Cmp,
}

impl Compare {
    /// Whether the compare holds of the key's current `(meta, value)`
    /// (`None`: absent). An absent key has versions 0 and does not
    /// exist; a compare of the value of an absent key never holds.
    pub fn holds(&self, current: Option<(&KeyMeta, &[u8])>) -> bool {
        let zero = KeyMeta::default();
        let meta = current.map_or(&zero, |(m, _)| m);
        match &self.target {
            Target::ModIndex(n) => self.cmp.test(&meta.mod_index, n),
            Target::CreateIndex(n) => self.cmp.test(&meta.create_index, n),
            Target::Version(n) => self.cmp.test(&meta.version, n),
            Target::Value(v) => current.is_some_and(|(_, cur)| self.cmp.test(cur, &v[..])),
            Target::Exists(e) => self.cmp.test(&current.is_some(), e),
        }
    }
}

/// A transaction as a client asks for it: if every compare holds, the
/// `success` ops run, else the `failure` ops, in order, as one record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// The branch that runs given each key's current `(meta, value)`
    /// (`None`: absent): whether every compare held, and its ops.
    pub fn into_branch<V: AsRef<[u8]>>(
        self,
        current: impl Fn(&[u8]) -> Option<(KeyMeta, V)>,
    ) -> (bool, Vec<TxnOp>) {
        let holds = self.compare.iter().all(|c| {
            let cur = current(&c.key);
            c.holds(cur.as_ref().map(|(m, v)| (m, v.as_ref())))
        });
        if holds {
            (true, self.success)
        } else {
            (false, self.failure)
        }
    }
}

/// Most compares plus ops one transaction may hold.
pub const MAX_TXN_OPS: usize = 128;

/// What one op of the branch that ran returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// The key's new `mod_index` (the record's index).
    Put {
        mod_index: u64,
    },
    Delete {
        deleted: bool,
    },
    DeletePrefix {
        deleted: u64,
    },
    Get(Option<Item>),
    Range {
        items: Vec<Item>,
        more: bool,
    },
}

/// A transaction's answer: which branch ran, and each op's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    pub results: Vec<OpResult>,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub epoch: u64,
    pub ts: Timestamp,
    pub op: Op,
}

/// A position in the log: the `(epoch, index)` of an entry.
///
/// The derived order compares `epoch` first, then `index` (field order
/// matters): that is Raft's "at least as up to date" order of two logs'
/// last entries. A log whose last entry has a newer epoch is more up to date
/// even if it is shorter, because entries of an older epoch that the newer
/// log lacks cannot be committed (a newer primary would have had them).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPos {
    pub epoch: u64,
    pub index: u64,
}

impl LogPos {
    /// The empty log's last position (the index-0 sentinel).
    pub const ZERO: LogPos = LogPos { epoch: 0, index: 0 };

    pub const fn new(epoch: u64, index: u64) -> LogPos {
        LogPos { epoch, index }
    }

    /// Raft's rule: is a log ending at `self` at least as up to date as one
    /// ending at `other`?
    pub fn at_least_as_up_to_date_as(&self, other: &LogPos) -> bool {
        self >= other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(create: u64, m: u64, version: u64) -> KeyMeta {
        KeyMeta {
            create_index: create,
            mod_index: m,
            version,
        }
    }

    fn cmp(target: Target, cmp: Cmp) -> Compare {
        Compare {
            key: Bytes::from_static(b"k"),
            target,
            cmp,
        }
    }

    #[test]
    fn compares_of_a_present_key() {
        let m = meta(3, 7, 2);
        let cur = Some((&m, &b"abc"[..]));
        assert!(cmp(Target::ModIndex(7), Cmp::Eq).holds(cur));
        assert!(!cmp(Target::ModIndex(7), Cmp::Ne).holds(cur));
        assert!(cmp(Target::ModIndex(8), Cmp::Lt).holds(cur));
        assert!(cmp(Target::CreateIndex(2), Cmp::Gt).holds(cur));
        assert!(cmp(Target::Version(2), Cmp::Eq).holds(cur));
        assert!(cmp(Target::Value(Bytes::from_static(b"abd")), Cmp::Lt).holds(cur));
        assert!(cmp(Target::Value(Bytes::from_static(b"abc")), Cmp::Eq).holds(cur));
        assert!(cmp(Target::Exists(true), Cmp::Eq).holds(cur));
        assert!(cmp(Target::Exists(false), Cmp::Ne).holds(cur));
    }

    #[test]
    fn an_absent_key_has_versions_zero_and_no_value() {
        assert!(cmp(Target::ModIndex(0), Cmp::Eq).holds(None));
        assert!(cmp(Target::Version(0), Cmp::Eq).holds(None));
        assert!(cmp(Target::CreateIndex(1), Cmp::Lt).holds(None));
        assert!(cmp(Target::Exists(false), Cmp::Eq).holds(None));
        for c in [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Gt] {
            assert!(
                !cmp(Target::Value(Bytes::new()), c).holds(None),
                "{c:?} of an absent value"
            );
        }
    }

    #[test]
    fn a_transaction_runs_success_only_if_every_compare_holds() {
        let put = |k: &'static str| TxnOp::Put {
            key: Bytes::from_static(k.as_bytes()),
            value: Bytes::new(),
            expiry: Expiry::Never,
        };
        let txn = |compare: Vec<Compare>| Txn {
            compare,
            success: vec![put("s")],
            failure: vec![put("f")],
        };
        let m = meta(1, 5, 1);
        let current = |k: &[u8]| (k == b"k").then_some((m, &b"v"[..]));
        assert_eq!(txn(vec![]).into_branch(current), (true, vec![put("s")]));
        let at5 = cmp(Target::ModIndex(5), Cmp::Eq);
        let at6 = cmp(Target::ModIndex(6), Cmp::Eq);
        assert!(txn(vec![at5.clone()]).into_branch(current).0);
        assert_eq!(
            txn(vec![at5, at6]).into_branch(current),
            (false, vec![put("f")])
        );
        let absent = Compare {
            key: Bytes::from_static(b"other"),
            ..cmp(Target::Exists(false), Cmp::Eq)
        };
        assert!(txn(vec![absent]).into_branch(current).0);
    }

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
        let r = KeyRange::prefix(b"p/");
        assert!(r.contains(b"p/"));
        assert!(r.contains(b"p/x"));
        assert!(!r.contains(b"p0"));
        assert!(!r.contains(b"p"));
        assert!(KeyRange::prefix(b"").contains(b"anything"));
    }
}
