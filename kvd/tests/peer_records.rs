//! Records from peers meet the rules of a client write before the engine
//! logs anything: masterless merges (stream batches and anti-entropy bucket
//! pulls both end in `Engine::ingest`) refuse a bad batch whole, with
//! nothing logged, applied or observed by the clock.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use bytes::Bytes;
use kvd::model::Expiry;
use kvd::storage::{CommitPolicy, Engine, EngineConfig, Op, RealFs, Record, Timestamp};
use tempfile::TempDir;

fn masterless(dir: &TempDir) -> Engine {
    let mut cfg = EngineConfig::new(dir.path());
    cfg.policy = CommitPolicy::Merge;
    cfg.node_tag = 1;
    Engine::open(Arc::new(RealFs), cfg, None).unwrap().0
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn put(ms: u64, key: &[u8]) -> Record {
    Record {
        index: 0,
        epoch: 0,
        ts: Timestamp {
            physical_ms: ms,
            logical: 0,
            node: 2,
        },
        op: Op::Put {
            key: Bytes::copy_from_slice(key),
            value: Bytes::from_static(b"v"),
            expiry: Expiry::Never,
        },
    }
}

#[tokio::test]
async fn a_merge_with_one_bad_record_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let e = masterless(&dir);
    let t = now_ms();
    let bad_batches = [
        ("a NUL in a key", vec![put(t, b"good"), put(t, b"a\0b")]),
        (
            "a key that is not UTF-8",
            vec![put(t, b"good"), put(t, b"\xff")],
        ),
        ("an empty key", vec![put(t, b"good"), put(t, b"")]),
        (
            "a stamp of 2^64-1",
            vec![put(t, b"good"), put(u64::MAX, b"k")],
        ),
        ("a stamp a day ahead", vec![put(t + 86_400_000, b"k")]),
    ];
    for (what, batch) in bad_batches {
        let (last, hlc) = (e.last_log_pos(), e.hlc());
        assert!(e.ingest(batch).await.is_err(), "{what}: merged");
        assert_eq!(e.last_log_pos(), last, "{what}: logged");
        assert_eq!(e.hlc(), hlc, "{what}: the clock moved");
        assert_eq!(e.get(b"good"), None, "{what}: applied");
    }
    e.ingest(vec![put(t, b"good")]).await.unwrap();
    assert_eq!(e.get(b"good").as_deref(), Some(&b"v"[..]));
}
