//! The storage engine in replicated mode, driven in-process: a primary's
//! durable entries wait for their commit, entries ship to a secondary
//! through `replicate`, and a conflicting uncommitted suffix is cut.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvd::model::Expiry;
use kvd::replication::rules::{AppendOutcome, LogPos};
use kvd::storage::{
    CommitPolicy, Engine, EngineConfig, Error, Op, RealFs, Record, ReplicateRequest, Timestamp,
};
use tempfile::TempDir;
use tokio::sync::oneshot::error::TryRecvError;

fn open(dir: &TempDir, epoch: u64) -> Arc<Engine> {
    open_with_cache(dir, epoch, 64 << 20)
}

fn open_with_cache(dir: &TempDir, epoch: u64, log_cache_bytes: usize) -> Arc<Engine> {
    let mut cfg = EngineConfig::new(dir.path());
    cfg.policy = CommitPolicy::Replicated;
    cfg.epoch = epoch;
    cfg.log_cache_bytes = log_cache_bytes;
    let (engine, _) = Engine::open(Arc::new(RealFs), cfg, None).unwrap();
    Arc::new(engine)
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        expiry: Expiry::Never,
    }
}

fn rec(index: u64, epoch: u64, key: &str, value: &str) -> Record {
    Record {
        index,
        epoch,
        ts: Timestamp::default(),
        op: put(key, value),
    }
}

fn get(e: &Engine, key: &str) -> Option<String> {
    e.get(key.as_bytes())
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
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

/// Returns once the WAL thread has handled every command sent before: it
/// answers them in order, and this one has an answer (a purge of
/// tombstones stamped before the zero stamp, which removes nothing).
async fn handled_so_far(e: &Engine) {
    e.purge_tombstones(Timestamp::default()).await.unwrap();
}

fn accepted_match(outcome: &AppendOutcome) -> u64 {
    match outcome {
        AppendOutcome::Accept { match_index, .. } => *match_index,
        other => panic!("expected Accept, got {other:?}"),
    }
}

#[tokio::test]
async fn a_durable_write_is_applied_and_acknowledged_only_at_commit() {
    let dir = TempDir::new().unwrap();
    let p = open(&dir, 1);
    let mut reply = p.submit(put("k", "v"), true).await.unwrap();
    until_durable(&p, 1).await;
    // The WAL thread is done with the write: any answer would be there.
    handled_so_far(&p).await;
    assert_eq!(get(&p, "k"), None, "applied before commit");
    assert!(
        matches!(reply.try_recv(), Err(TryRecvError::Empty)),
        "acknowledged before commit"
    );

    p.commit_to(1, 1).await.unwrap();
    let r = reply.await.unwrap().unwrap();
    assert_eq!(r.index, 1);
    assert_eq!(get(&p, "k").as_deref(), Some("v"));
    assert_eq!(p.commit_index(), 1);
    // The commit index never goes back, nor past the log.
    p.commit_to(0, 1).await.unwrap();
    p.commit_to(99, 1).await.unwrap();
    handled_so_far(&p).await;
    assert_eq!(
        p.commit_index(),
        1,
        "the commit index moved back or past the log"
    );
}

#[tokio::test]
async fn entries_ship_to_a_secondary_which_applies_them_at_commit() {
    let (pd, sd) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    // A cache of about two records: shipping from index 1 reads the WAL.
    let p = open_with_cache(&pd, 1, 100);
    let s = open(&sd, 1);
    let writes: Vec<_> = (0..10)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(
                async move { p.write(put(&format!("k{i}"), &format!("v{i}")), true).await },
            )
        })
        .collect();
    until_durable(&p, 10).await;

    let entries = p.entries_from(1, usize::MAX).await.unwrap();
    assert_eq!(entries.len(), 10);
    let outcome = s
        .replicate(ReplicateRequest {
            epoch: 1,
            prev: LogPos::ZERO,
            records: entries,
            leader_commit: 0,
        })
        .await
        .unwrap();
    assert_eq!(accepted_match(&outcome), 10);
    assert_eq!(
        s.last_log_pos(),
        LogPos {
            epoch: 1,
            index: 10
        }
    );
    assert_eq!(s.state().len(), 0, "nothing is applied before commit");

    p.commit_to(10, 1).await.unwrap();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    // A heartbeat carries the commit index.
    let outcome = s
        .replicate(ReplicateRequest {
            epoch: 1,
            prev: LogPos {
                epoch: 1,
                index: 10,
            },
            records: vec![],
            leader_commit: 10,
        })
        .await
        .unwrap();
    assert_eq!(accepted_match(&outcome), 10);
    assert_eq!(s.state().len(), 10);
    assert_eq!(s.state().digest(), p.state().digest());

    // Recent entries come from the cache, older ones from the WAL: the same.
    let recent = p.entries_from(10, usize::MAX).await.unwrap();
    let old = p.entries_from(3, usize::MAX).await.unwrap();
    assert_eq!(old.len(), 8);
    assert_eq!(old.last(), recent.last());
}

#[tokio::test]
async fn a_conflicting_uncommitted_suffix_is_cut_and_its_writers_told() {
    let (sd, ad) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    // `a` was primary in epoch 1; its writes 1..=3 never committed.
    let a = open(&ad, 1);
    let waiting: Vec<_> = (1..=3)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.write(put(&format!("a{i}"), "old"), true).await })
        })
        .collect();
    until_durable(&a, 3).await;

    // The epoch-2 primary's log: entries 1..=2 in epoch 2.
    let new_log = vec![rec(1, 2, "b1", "new"), rec(2, 2, "b2", "new")];
    a.set_epoch(2);
    let outcome = a
        .replicate(ReplicateRequest {
            epoch: 2,
            prev: LogPos::ZERO,
            records: new_log.clone(),
            leader_commit: 2,
        })
        .await
        .unwrap();
    assert_eq!(accepted_match(&outcome), 2);
    for w in waiting {
        assert!(
            matches!(w.await.unwrap(), Err(Error::Superseded)),
            "a cut write must fail, not hang or succeed"
        );
    }
    assert_eq!(a.last_log_pos(), LogPos { epoch: 2, index: 2 });
    assert_eq!(get(&a, "b1").as_deref(), Some("new"));
    assert_eq!(get(&a, "a1"), None);

    // Stale and mismatching appends change nothing.
    let stale = a
        .replicate(ReplicateRequest {
            epoch: 1,
            prev: LogPos::ZERO,
            records: vec![rec(1, 1, "x", "y")],
            leader_commit: 1,
        })
        .await
        .unwrap();
    assert_eq!(stale, AppendOutcome::Stale { my_epoch: 2 });
    let mismatch = a
        .replicate(ReplicateRequest {
            epoch: 2,
            prev: LogPos { epoch: 2, index: 7 },
            records: vec![rec(8, 2, "x", "y")],
            leader_commit: 2,
        })
        .await
        .unwrap();
    assert!(
        matches!(mismatch, AppendOutcome::Mismatch(_)),
        "{mismatch:?}"
    );
    assert_eq!(a.last_log_pos(), LogPos { epoch: 2, index: 2 });

    // After a restart the log is the new one; entries wait for a commit.
    a.shutdown();
    drop(a);
    let a = open(&ad, 2);
    assert_eq!(a.last_log_pos(), LogPos { epoch: 2, index: 2 });
    assert_eq!(
        a.state().len(),
        0,
        "uncommitted-as-far-as-we-know entries wait"
    );
    let s = open(&sd, 2);
    let outcome = s
        .replicate(ReplicateRequest {
            epoch: 2,
            prev: LogPos::ZERO,
            records: new_log,
            leader_commit: 2,
        })
        .await
        .unwrap();
    assert_eq!(accepted_match(&outcome), 2);
    a.replicate(ReplicateRequest {
        epoch: 2,
        prev: LogPos { epoch: 2, index: 2 },
        records: vec![],
        leader_commit: 2,
    })
    .await
    .unwrap();
    assert_eq!(a.state().digest(), s.state().digest());
    assert_eq!(a.state().len(), 2);
}
