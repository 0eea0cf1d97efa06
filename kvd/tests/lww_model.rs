//! Property test of the masterless merge: the
//! same set of writes, applied in any order and with any duplication,
//! gives the same state, and that state is the model's: per key, the write
//! with the highest timestamp (a delete leaves the key absent). Also
//! merging two nodes' halves through anti-entropy versions gives the same.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bytes::Bytes;
use kvd::model::{Expiry, TxnOp};
use kvd::storage::lww::{bucket_of, Lww};
use kvd::storage::{Op, State, Timestamp};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const KEYS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn key(i: usize) -> Bytes {
    Bytes::from_static(KEYS[i].as_bytes())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| Op::Put {
            key: key(k),
            value: Bytes::from(vec![v]),
            expiry: Expiry::Never,
        }),
        (0..KEYS.len()).prop_map(|k| Op::Delete { key: key(k) }),
        prop::collection::vec((0..KEYS.len(), any::<u8>()), 1..4).prop_map(|items| Op::Bulk {
            items: items
                .into_iter()
                .map(|(k, v)| (key(k), Bytes::from(vec![v]), Expiry::Never))
                .collect(),
        }),
        // A masterless transaction as it is logged: puts, deletes and reads
        // (its prefix deletes resolved into deletes), one stamp for all.
        prop::collection::vec((0..KEYS.len(), any::<u8>(), 0..3u8), 0..5).prop_map(|ops| Op::Txn {
            ops: ops
                .into_iter()
                .map(|(k, v, kind)| match kind {
                    0 => TxnOp::Put {
                        key: key(k),
                        value: Bytes::from(vec![v]),
                        expiry: Expiry::Never,
                    },
                    1 => TxnOp::Delete { key: key(k) },
                    _ => TxnOp::Get { key: key(k) },
                })
                .collect(),
        }),
    ]
}

/// Writes with distinct stamps (as real writes have: a node never reuses
/// one, and node ids differ).
fn writes_strategy() -> impl Strategy<Value = Vec<(Timestamp, Op)>> {
    prop::collection::vec(((0u64..8, 0u32..3, 1u32..4), op_strategy()), 1..24).prop_map(|ws| {
        let mut seen = std::collections::HashSet::new();
        ws.into_iter()
            .filter(|((p, l, n), _)| seen.insert((*p, *l, *n)))
            .map(|((physical_ms, logical, node), op)| {
                (
                    Timestamp {
                        physical_ms,
                        logical,
                        node,
                    },
                    op,
                )
            })
            .collect()
    })
}

/// Key -> value of the highest-stamped write (None: deleted).
fn model(writes: &[(Timestamp, Op)]) -> BTreeMap<Bytes, Option<Bytes>> {
    let mut best: BTreeMap<Bytes, (Timestamp, Option<Bytes>)> = BTreeMap::new();
    let mut offer = |k: &Bytes, ts: Timestamp, v: Option<Bytes>| {
        let e = best.entry(k.clone()).or_insert((ts, v.clone()));
        if ts > e.0 {
            *e = (ts, v);
        }
    };
    for (ts, op) in writes {
        match op {
            Op::Put { key, value, .. } => offer(key, *ts, Some(value.clone())),
            Op::Delete { key } => offer(key, *ts, None),
            Op::Bulk { items } => {
                // Within one bulk the last item for a key wins.
                let mut last: BTreeMap<&Bytes, &Bytes> = BTreeMap::new();
                for (k, v, _) in items {
                    last.insert(k, v);
                }
                for (k, v) in last {
                    offer(k, *ts, Some(v.clone()));
                }
            }
            Op::Noop
            | Op::Config { .. }
            | Op::Expire { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseKeepAlive { .. }
            | Op::LeaseRevoke { .. } => {}
            Op::Txn { ops } => {
                // Within one transaction the last write of a key wins.
                let mut last: BTreeMap<&Bytes, Option<Bytes>> = BTreeMap::new();
                for op in ops {
                    match op {
                        TxnOp::Put { key, value, .. } => last.insert(key, Some(value.clone())),
                        TxnOp::Delete { key } => last.insert(key, None),
                        _ => None,
                    };
                }
                for (k, v) in last {
                    offer(k, *ts, v);
                }
            }
        }
    }
    best.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

struct Node {
    state: State,
    lww: Lww,
}

impl Node {
    fn new() -> Node {
        Node {
            state: State::new(),
            lww: Lww::new(),
        }
    }

    fn apply_all<'a>(&self, writes: impl IntoIterator<Item = &'a (Timestamp, Op)>) {
        for (ts, op) in writes {
            let index = self.state.applied_index() + 1;
            self.lww.apply(&self.state, index, *ts, op, false);
        }
    }

    fn contents(&self) -> Vec<Option<Bytes>> {
        (0..KEYS.len())
            .map(|k| self.state.get(&key(k), 0))
            .collect()
    }

    /// Every version this node holds, as anti-entropy ships them (from
    /// the buckets our few keys fall in).
    fn versions(&self) -> Vec<(Timestamp, Op)> {
        let mut buckets: Vec<usize> = (0..KEYS.len()).map(|k| bucket_of(&key(k))).collect();
        buckets.sort_unstable();
        buckets.dedup();
        buckets
            .into_iter()
            .flat_map(|b| self.lww.bucket(&self.state, b))
            .map(|v| (v.ts, v.to_op()))
            .collect()
    }
}

/// `writes` in a shuffled order, with random duplicates mixed in.
fn shuffled_with_duplicates(writes: &[(Timestamp, Op)], rng: &mut StdRng) -> Vec<(Timestamp, Op)> {
    let mut out: Vec<(Timestamp, Op)> = writes.to_vec();
    let dups = rng.gen_range(0..=writes.len());
    for _ in 0..dups {
        out.push(writes[rng.gen_range(0..writes.len())].clone());
    }
    out.shuffle(rng);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, .. ProptestConfig::default() })]

    #[test]
    fn any_order_and_duplication_of_the_same_writes_gives_the_same_state(
        writes in writes_strategy(),
        seed in any::<u64>(),
        split in any::<prop::sample::Index>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let want: Vec<Option<Bytes>> = {
            let m = model(&writes);
            (0..KEYS.len()).map(|k| m.get(&key(k)).cloned().flatten()).collect()
        };

        // The model does not depend on order, so one random order (with
        // duplicates) per case matching it covers "any order".
        let a = Node::new();
        a.apply_all(&shuffled_with_duplicates(&writes, &mut rng));
        prop_assert_eq!(a.contents(), want.clone());

        // Two nodes with one part each, merged both ways through their
        // anti-entropy versions (associativity across nodes).
        let cut = split.index(writes.len() + 1);
        let (x, y) = (Node::new(), Node::new());
        x.apply_all(&writes[..cut]);
        y.apply_all(&writes[cut..]);
        let (xv, yv) = (x.versions(), y.versions());
        x.apply_all(&yv);
        y.apply_all(&xv);
        // And once more: applying the same versions again changes nothing.
        x.apply_all(&yv);
        prop_assert_eq!(x.contents(), want.clone());
        prop_assert_eq!(y.contents(), want);
        prop_assert_eq!(x.lww.digest(), a.lww.digest());
        prop_assert_eq!(y.lww.digest(), a.lww.digest());
        prop_assert_eq!(x.state.digest(), a.state.digest());
    }
}

fn expiry_strategy() -> impl Strategy<Value = Expiry> {
    prop_oneof![Just(Expiry::Never), (0u64..12).prop_map(Expiry::At)]
}

/// Puts with deadlines around the stamps (0..8 ms), and deletes.
fn ttl_op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>(), expiry_strategy()).prop_map(|(k, v, expiry)| Op::Put {
            key: key(k),
            value: Bytes::from(vec![v]),
            expiry,
        }),
        (0..KEYS.len()).prop_map(|k| Op::Delete { key: key(k) }),
        prop::collection::vec((0..KEYS.len(), any::<u8>(), expiry_strategy()), 1..4).prop_map(
            |items| Op::Bulk {
                items: items
                    .into_iter()
                    .map(|(k, v, x)| (key(k), Bytes::from(vec![v]), x))
                    .collect(),
            }
        ),
    ]
}

fn ttl_writes_strategy() -> impl Strategy<Value = Vec<(Timestamp, Op)>> {
    prop::collection::vec(((0u64..8, 0u32..3, 1u32..4), ttl_op_strategy()), 1..24).prop_map(|ws| {
        let mut seen = std::collections::HashSet::new();
        ws.into_iter()
            .filter(|((p, l, n), _)| seen.insert((*p, *l, *n)))
            .map(|((physical_ms, logical, node), op)| {
                let ts = Timestamp {
                    physical_ms,
                    logical,
                    node,
                };
                (ts, op)
            })
            .collect()
    })
}

impl Node {
    /// This node's own expiry at `now` (docs/DESIGN.md §5.7): one `Expire`
    /// of every key due, as its writer logs it.
    fn expire(&self, now: u64, node: u32) {
        let none = Default::default();
        let (keys, _) = self.state.due(now, 1000, &none, &Default::default());
        if keys.is_empty() {
            return;
        }
        let ts = Timestamp {
            physical_ms: now,
            logical: 0,
            node,
        };
        let index = self.state.applied_index() + 1;
        self.lww
            .apply(&self.state, index, ts, &Op::Expire { keys }, false);
    }

    /// Each key's winner: its stamp and whether it is a tombstone.
    fn winners(&self) -> Vec<Option<(Timestamp, bool)>> {
        (0..KEYS.len())
            .map(|k| self.lww.entry(&key(k)).map(|e| (e.ts, e.tombstone)))
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, .. ProptestConfig::default() })]

    /// Masterless expiry: nodes that take the same writes in different
    /// orders and expire keys by their own clocks at different moments
    /// (each with its own `Expire`, never streamed) end with the same
    /// winners, tombstones included, once their clocks pass every
    /// deadline and anti-entropy has run both ways: a tombstone carries
    /// the expired version's stamp, so it ties with the version and loses
    /// to every later write, as the version would.
    #[test]
    fn nodes_expiring_by_their_own_clocks_converge(
        writes in ttl_writes_strategy(),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = [Node::new(), Node::new()];
        for (n, node) in nodes.iter().enumerate() {
            let mut now = 0;
            for w in shuffled_with_duplicates(&writes, &mut rng) {
                node.apply_all([&w]);
                if rng.gen_bool(0.3) {
                    now += rng.gen_range(0..4);
                    node.expire(now, 10 + n as u32);
                }
            }
        }
        for (n, node) in nodes.iter().enumerate() {
            node.expire(100, 10 + n as u32);
        }
        let versions: Vec<_> = nodes.iter().map(Node::versions).collect();
        nodes[0].apply_all(&versions[1]);
        nodes[1].apply_all(&versions[0]);
        for (n, node) in nodes.iter().enumerate() {
            node.expire(100, 10 + n as u32);
        }
        prop_assert_eq!(nodes[0].winners(), nodes[1].winners());
        prop_assert_eq!(nodes[0].lww.digest(), nodes[1].lww.digest());
        let read = |node: &Node| -> Vec<Option<Bytes>> {
            (0..KEYS.len()).map(|k| node.state.get(&key(k), 100)).collect()
        };
        prop_assert_eq!(read(&nodes[0]), read(&nodes[1]));
        // What is left is what the model's winner leaves by then.
        let want: Vec<Option<Bytes>> = {
            let m = model(&writes);
            (0..KEYS.len()).map(|k| m.get(&key(k)).cloned().flatten()).collect()
        };
        for (k, got) in read(&nodes[0]).into_iter().enumerate() {
            prop_assert!(got.is_none() || got == want[k], "key {}", k);
        }
    }
}
