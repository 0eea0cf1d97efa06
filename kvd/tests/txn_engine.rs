//! Transactions and versions through the storage engine, in-process: a
//! transaction is one record whose compares see every entry logged before
//! it (committed or not), answered once its record is applied; versions
//! come back the same from a restart, and a failed compare still logs (and
//! waits for) its record.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvd::model::{
    Cmp, Compare, Expiry, Item, KeyMeta, KeyRange, OpResult, RangeRead, Target, TxnOp,
};
use kvd::storage::{CommitPolicy, Engine, EngineConfig, Op, RealFs, Txn};
use tempfile::TempDir;

fn open(dir: &TempDir, policy: CommitPolicy) -> Arc<Engine> {
    let mut cfg = EngineConfig::new(dir.path());
    cfg.policy = policy;
    let (engine, _) = Engine::open(Arc::new(RealFs), cfg, None).unwrap();
    Arc::new(engine)
}

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

fn meta(create_index: u64, mod_index: u64, version: u64) -> KeyMeta {
    KeyMeta {
        create_index,
        mod_index,
        version,
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
        success: vec![TxnOp::Put {
            key: b(key),
            value: b(value),
            expiry: Expiry::Never,
        }],
        failure: vec![TxnOp::Get { key: b(key) }],
    }
}

async fn until_durable(e: &Engine, index: u64) {
    for _ in 0..500 {
        if e.last_log_pos().index >= index {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("index {index} never became durable");
}

#[tokio::test]
async fn on_a_primary_a_compare_sees_uncommitted_entries_and_a_failed_one_waits_for_its_commit() {
    let dir = TempDir::new().unwrap();
    let p = open(&dir, CommitPolicy::Replicated);
    let write = p.submit(put("k", "v1"), true).await.unwrap();
    until_durable(&p, 1).await;
    assert_eq!(p.get(b"k"), None, "not committed, not applied");

    // Against the entry logged but not committed: its index is the key's.
    let ok = tokio::spawn({
        let p = p.clone();
        async move { p.write_txn(cas("k", 1, "v2")).await }
    });
    until_durable(&p, 2).await;
    let failed = tokio::spawn({
        let p = p.clone();
        async move { p.write_txn(cas("k", 1, "v3")).await }
    });
    until_durable(&p, 3).await;
    assert!(
        !ok.is_finished() && !failed.is_finished(),
        "answered before the commit"
    );

    p.commit_to(3, 1).await.unwrap();
    write.await.unwrap().unwrap();
    let ok = ok.await.unwrap().unwrap();
    assert_eq!(ok.index, 2);
    let r = ok.outcome.txn.unwrap();
    assert!(r.succeeded);
    assert_eq!(r.results, vec![OpResult::Put { mod_index: 2 }]);
    let failed = failed.await.unwrap().unwrap();
    assert_eq!(failed.index, 3, "a failed compare is still one record");
    let r = failed.outcome.txn.unwrap();
    assert!(!r.succeeded);
    let item = Item {
        key: b("k"),
        value: Some(b("v2")),
        meta: meta(1, 2, 2),
        expiry: Expiry::Never,
    };
    assert_eq!(
        r.results,
        vec![OpResult::Get(Some(item))],
        "read at its place"
    );
    assert_eq!(p.get_versioned(b"k"), Some((b("v2"), meta(1, 2, 2))));
    assert_eq!(p.last_log_pos().index, 3);
}

#[tokio::test]
async fn versions_and_ranges_come_back_the_same_after_a_restart_and_a_snapshot() {
    let dir = TempDir::new().unwrap();
    let e = open(&dir, CommitPolicy::Local);
    for op in [
        put("a/1", "x"),
        put("a/2", "y"),
        put("a/1", "z"),
        put("b", "w"),
    ] {
        e.write(op, true).await.unwrap();
    }
    let txn = Txn {
        success: vec![
            TxnOp::DeletePrefix { prefix: b("a/") },
            TxnOp::Put {
                key: b("a/3"),
                value: b("new"),
                expiry: Expiry::Never,
            },
        ],
        ..Txn::default()
    };
    let r = e.write_txn(txn).await.unwrap();
    assert_eq!(r.index, 5);
    assert_eq!(
        r.outcome.txn.unwrap().results,
        vec![
            OpResult::DeletePrefix { deleted: 2 },
            OpResult::Put { mod_index: 5 }
        ]
    );
    let read = RangeRead {
        range: KeyRange::prefix(b""),
        limit: 100,
        keys_only: false,
    };
    let before = e.range(&read);
    assert_eq!(before.index, 5);
    assert_eq!(
        before
            .items
            .iter()
            .map(|i| (i.key.clone(), i.meta))
            .collect::<Vec<_>>(),
        vec![(b("a/3"), meta(5, 5, 1)), (b("b"), meta(4, 4, 1))]
    );
    assert_eq!(e.count(&KeyRange::prefix(b"a/")), (1, 5));
    e.shutdown();
    drop(e);

    // Replayed from the WAL.
    let e = open(&dir, CommitPolicy::Local);
    assert_eq!(e.range(&read), before);
    e.shutdown();
    drop(e);

    // From a snapshot: a small --snapshot-every makes the next write take one.
    let mut cfg = EngineConfig::new(dir.path());
    cfg.snapshot_every_bytes = 1;
    let (e, _) = Engine::open(Arc::new(RealFs), cfg, None).unwrap();
    e.write(put("c", "1"), true).await.unwrap();
    for _ in 0..500 {
        if e.status().snapshot_index >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(e.status().snapshot_index, 6, "a snapshot was taken");
    let with_c = e.range(&read);
    e.shutdown();
    drop(e);
    let e = open(&dir, CommitPolicy::Local);
    assert_eq!(e.range(&read), with_c);
    assert_eq!(e.get_versioned(b"c"), Some((b("1"), meta(6, 6, 1))));
}

#[tokio::test]
async fn masterless_a_prefix_delete_is_logged_as_deletes_and_answered_as_one() {
    let dir = TempDir::new().unwrap();
    let e = open(&dir, CommitPolicy::Merge);
    e.write(put("p/1", "x"), true).await.unwrap();
    e.write(put("p/2", "y"), true).await.unwrap();
    let txn = Txn {
        success: vec![
            TxnOp::DeletePrefix { prefix: b("p/") },
            TxnOp::Get { key: b("p/1") },
        ],
        ..Txn::default()
    };
    let r = e.write_txn(txn).await.unwrap();
    assert_eq!(
        r.outcome.txn.unwrap().results,
        vec![OpResult::DeletePrefix { deleted: 2 }, OpResult::Get(None)]
    );
    let logged = e.entries_from(3, 1 << 20).await.unwrap();
    let want = Op::Txn {
        ops: vec![
            TxnOp::Delete { key: b("p/1") },
            TxnOp::Delete { key: b("p/2") },
            TxnOp::Get { key: b("p/1") },
        ],
    };
    assert_eq!(logged[0].op, want, "peers merge it key by key");
    assert_eq!(
        e.lww().entry(b"p/2").map(|s| s.tombstone),
        Some(true),
        "tombstoned"
    );
}

/// A snapshot is asked for at the same size as a segment, so the segment
/// it covers is still the active one when it is done; the covered segment
/// goes once the next one starts, however many rounds the writer ran in
/// between (a purge of tombstones is one).
#[tokio::test]
async fn a_covered_segment_goes_once_the_next_one_starts() {
    let dir = TempDir::new().unwrap();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.segment_max_bytes = 4096;
    cfg.snapshot_every_bytes = 4096;
    let (e, _) = Engine::open(Arc::new(RealFs), cfg, None).unwrap();
    let value = "v".repeat(500);
    while e.status().wal_bytes < 4096 {
        e.write(put("k", &value), true).await.unwrap();
    }
    for _ in 0..500 {
        if e.status().snapshot_index > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let covered = e.status().snapshot_index;
    assert!(covered > 0, "a snapshot was taken");
    for _ in 0..3 {
        e.purge_tombstones(kvd::storage::Timestamp::default())
            .await
            .unwrap();
    }
    assert_eq!(e.status().wal_segments, 1, "nothing to remove yet");
    e.write(put("k", "x"), true).await.unwrap();
    e.purge_tombstones(kvd::storage::Timestamp::default())
        .await
        .unwrap();
    assert_eq!(e.first_log_index(), covered + 1, "the covered segment went");
    assert_eq!(e.status().wal_segments, 1);
}

/// docs/DESIGN.md §6.1: a mode switch's rebase gives every key
/// `create_index = mod_index = base_index`, `version = 1`, the same on
/// every node whatever their own numbers were, and a restart keeps them.
#[tokio::test]
async fn a_rebase_sets_every_keys_versions_to_the_base() {
    let dir = TempDir::new().unwrap();
    let e = open(&dir, CommitPolicy::Local);
    for op in [put("a", "1"), put("a", "2"), put("b", "1")] {
        e.write(op, true).await.unwrap();
    }
    let base_ts = kvd::storage::Timestamp {
        physical_ms: 1_700_000_000_000,
        logical: 0,
        node: 0,
    };
    let rebase = kvd::storage::Rebase {
        policy: CommitPolicy::Merge,
        base_index: 10,
        epoch: 2,
        base_ts,
    };
    e.rebase(rebase).await.unwrap();
    let base = meta(10, 10, 1);
    let read = RangeRead {
        range: KeyRange::prefix(b""),
        limit: 10,
        keys_only: true,
    };
    let keys = |e: &Engine| {
        let page = e.range(&read);
        (
            page.index,
            page.items
                .iter()
                .map(|i| (i.key.clone(), i.meta))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(keys(&e), (10, vec![(b("a"), base), (b("b"), base)]));
    let r = e.write(put("a", "3"), true).await.unwrap();
    assert_eq!(r.index, 11);
    assert_eq!(e.get_versioned(b"a"), Some((b("3"), meta(10, 11, 2))));
    e.shutdown();
    drop(e);
    let e = open(&dir, CommitPolicy::Merge);
    assert_eq!(
        keys(&e),
        (11, vec![(b("a"), meta(10, 11, 2)), (b("b"), base)])
    );
}
