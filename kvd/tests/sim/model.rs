//! The workload of the crash models: random puts, deletes and bulks over a
//! small key space, and the plain map they should leave.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::Rng;

use kvd::model::{Expiry, TxnOp};
use kvd::storage::{Engine, Op};

/// Keys per prefix: few, so that writes overwrite and delete each other.
pub const KEYS: usize = 12;

pub type Model = BTreeMap<Bytes, Bytes>;

pub fn key(prefix: &str, i: usize) -> Bytes {
    Bytes::from(format!("{prefix}k{i}"))
}

pub fn apply_model(m: &mut Model, op: &Op) {
    match op {
        Op::Put { key, value, .. } => {
            m.insert(key.clone(), value.clone());
        }
        Op::Delete { key } => {
            m.remove(key);
        }
        Op::Bulk { items } => {
            for (k, v, _) in items {
                m.insert(k.clone(), v.clone());
            }
        }
        Op::Noop | Op::Config { .. } => {}
        Op::Expire { .. }
        | Op::LeaseGrant { .. }
        | Op::LeaseKeepAlive { .. }
        | Op::LeaseRevoke { .. } => {
            unreachable!("the simulated workload writes no expiries or leases")
        }
        Op::Txn { ops } => {
            for op in ops {
                match op {
                    TxnOp::Put { key, value, .. } => {
                        m.insert(key.clone(), value.clone());
                    }
                    TxnOp::Delete { key } => {
                        m.remove(key);
                    }
                    TxnOp::DeletePrefix { prefix } => m.retain(|k, _| !k.starts_with(prefix)),
                    TxnOp::Get { .. } | TxnOp::Range(_) => {}
                }
            }
        }
    }
}

/// A random put (60%), delete (20%) or bulk (20%) of keys under `prefix`.
/// Values name the op that wrote them (`seq`), so a mix-up would be visible.
pub fn random_op(rng: &mut StdRng, prefix: &str, seq: u64) -> Op {
    let k = |rng: &mut StdRng| key(prefix, rng.gen_range(0..KEYS));
    let value = |rng: &mut StdRng| {
        let mut v = format!("{prefix}{seq}:").into_bytes();
        v.resize(v.len() + rng.gen_range(0..200), b'x');
        Bytes::from(v)
    };
    match rng.gen_range(0..10) {
        0..=5 => Op::Put {
            key: k(rng),
            value: value(rng),
            expiry: Expiry::Never,
        },
        6..=7 => Op::Delete { key: k(rng) },
        _ => Op::Bulk {
            items: (0..rng.gen_range(1..6))
                .map(|_| (k(rng), value(rng), Expiry::Never))
                .collect(),
        },
    }
}

/// A transaction's branch of 1 to 4 ops under `prefix`: puts, deletes,
/// a prefix delete (of `k1`, `k10` and `k11`) and reads, as one record.
pub fn random_txn(rng: &mut StdRng, prefix: &str, seq: u64) -> Op {
    let k = |rng: &mut StdRng| key(prefix, rng.gen_range(0..KEYS));
    let ops = (0..rng.gen_range(1..5))
        .map(|i| match rng.gen_range(0..10) {
            0..=4 => TxnOp::Put {
                key: k(rng),
                value: Bytes::from(format!("{prefix}{seq}.{i}:txn")),
                expiry: Expiry::Never,
            },
            5..=6 => TxnOp::Delete { key: k(rng) },
            7 => TxnOp::DeletePrefix {
                prefix: Bytes::from(format!("{prefix}k1")),
            },
            _ => TxnOp::Get { key: k(rng) },
        })
        .collect();
    Op::Txn { ops }
}

/// The engine's contents under `prefix`.
pub fn contents(engine: &Engine, prefix: &str) -> Model {
    (0..KEYS)
        .filter_map(|i| {
            let k = key(prefix, i);
            engine.get(&k).map(|v| (k, v))
        })
        .collect()
}
