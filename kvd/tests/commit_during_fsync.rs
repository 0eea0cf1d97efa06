//! A primary applies and answers what the commit count reached for earlier
//! batches while the fsync of its latest batch runs, rather than after it
//! returns; and nothing of the batch in flight is applied before it is
//! durable. The simulated disk holds the fsync as long as the test needs.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod sim;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvd::model::Expiry;
use kvd::storage::{CommitPolicy, Engine, EngineConfig, Op};
use sim::SimFs;

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: Bytes::copy_from_slice(k.as_bytes()),
        value: Bytes::copy_from_slice(v.as_bytes()),
        expiry: Expiry::Never,
    }
}

/// Polls `cond` until it holds or 10 s pass.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Releases the held fsyncs when the test ends, passed or failed: the
/// engine's shutdown waits for its writer, which waits for its fsync.
struct Release(SimFs);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.hold_syncs(false);
    }
}

#[tokio::test]
async fn a_commit_counted_during_an_fsync_is_answered_before_that_fsync_returns() {
    let fs = SimFs::default();
    let mut cfg = EngineConfig::new("/sim/data");
    cfg.policy = CommitPolicy::Replicated;
    let (engine, _) = Engine::open(Arc::new(fs.clone()), cfg, None).unwrap();
    let e = Arc::new(engine);
    let _release = Release(fs.clone());

    let first = e.submit(put("a", "1"), true).await.unwrap();
    until("a durable", || e.last_log_pos().index >= 1).await;
    // The next batch's fsync does not return until released.
    fs.hold_syncs(true);
    let second = e.submit(put("b", "2"), true).await.unwrap();
    until("b's fsync under way", || fs.syncs_held() == 1).await;

    // A peer's acknowledgement of the first batch arrives meanwhile, and
    // one counted past it (as two secondaries holding b could count).
    e.commit_to(2, 1).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), first).await;
    let first = answered.expect("the commit waited for the next batch's fsync");
    assert_eq!(first.unwrap().unwrap().index, 1);
    assert_eq!(e.get(b"a"), Some(Bytes::from_static(b"1")));
    assert_eq!(e.get(b"b"), None, "applied before it was durable here");
    assert_eq!(e.last_log_pos().index, 1, "b counted durable while held");

    // Released: b is durable, and the count (made again, as the commit
    // task does when the durable index moves) reaches it.
    fs.hold_syncs(false);
    until("b durable", || e.last_log_pos().index >= 2).await;
    e.commit_to(2, 1).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("b answered once durable and counted");
    assert_eq!(second.unwrap().unwrap().index, 2);
    assert_eq!(e.get(b"b"), Some(Bytes::from_static(b"2")));
}
