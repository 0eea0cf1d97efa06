//! Keys that expire and leases through the storage engine, in-process over
//! real files (docs/DESIGN.md §2.15, §2.16): deadlines hide keys by the
//! node's clock and the expirer removes them in bounded records; deadlines
//! and leases come back exactly from a restart (replay and snapshot); a
//! lease's keys go with it in one record; a write naming a dead lease
//! changes nothing. The node's clock is moved by its test offset, so no
//! test waits for a deadline to pass.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvd::masterless::hlc::WallClock;
use kvd::model::{Expiry, KeyRange, TxnOp, MAX_EXPIRE_KEYS};
use kvd::storage::{CommitPolicy, Engine, EngineConfig, Error, Op, RealFs, Txn};
use tempfile::TempDir;

const MINUTE: u64 = 60_000;

struct Node {
    engine: Engine,
    clock: WallClock,
}

fn open_with(dir: &TempDir, clock: &WallClock, tune: impl Fn(&mut EngineConfig)) -> Node {
    let mut cfg = EngineConfig::new(dir.path());
    cfg.wall = clock.clone();
    tune(&mut cfg);
    let (engine, _) = Engine::open(Arc::new(RealFs), cfg, None).unwrap();
    Node {
        engine,
        clock: clock.clone(),
    }
}

fn open(dir: &TempDir) -> Node {
    open_with(dir, &WallClock::new(0), |_| {})
}

impl Node {
    /// Moves this node's clock `ms` forward.
    fn advance(&self, ms: u64) {
        self.clock.set_offset_ms(self.clock.offset_ms() + ms as i64);
    }

    fn write(&self, op: Op) -> Result<kvd::storage::WriteResult, Error> {
        self.engine.write_blocking(op, true)
    }

    fn put(&self, k: &str, v: &str, expiry: Expiry) -> u64 {
        self.write(put(k, v, expiry)).unwrap().index
    }

    fn grant(&self, ttl_ms: u64) -> u64 {
        let r = self.write(Op::LeaseGrant { ttl_ms }).unwrap();
        let lease = r.outcome.lease.unwrap();
        assert_eq!(lease.id, r.index, "a lease's id is its grant's index");
        r.index
    }

    /// Polls `cond` until it holds (10 s at most).
    fn until(&self, what: &str, cond: impl Fn(&Engine) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(&self.engine) {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(k: &str, v: &str, expiry: Expiry) -> Op {
    Op::Put {
        key: b(k),
        value: b(v),
        expiry,
    }
}

#[test]
fn a_key_is_hidden_from_its_deadline_and_the_expirer_removes_it() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let deadline = n.engine.wall_ms() + MINUTE;
    n.put("t", "v", Expiry::At(deadline));
    n.put("p", "v", Expiry::Never);
    let item = n.engine.get_item(b"t").unwrap();
    assert_eq!(item.expiry, Expiry::At(deadline));
    assert_eq!(n.engine.status().keys_with_ttl, 1);
    n.advance(MINUTE);
    // Hidden at once, whether or not the removal is applied yet.
    assert_eq!(n.engine.get(b"t"), None);
    assert_eq!(n.engine.count(&KeyRange::prefix(b"")).0, 1);
    n.until("the expirer removes it", |e| e.status().expired_keys == 1);
    let s = n.engine.status();
    assert_eq!((s.keys, s.keys_with_ttl), (1, 0));
    assert_eq!(n.engine.state().get_raw(b"t"), None, "gone from memory");
}

#[test]
fn deadlines_and_leases_come_back_exactly_from_the_wal_and_from_a_snapshot() {
    for snapshot in [false, true] {
        let dir = TempDir::new().unwrap();
        let clock = WallClock::new(0);
        let tune = |cfg: &mut EngineConfig| {
            if snapshot {
                cfg.snapshot_every_bytes = 1;
            }
        };
        let n = open_with(&dir, &clock, tune);
        let deadline = n.engine.wall_ms() + 10 * MINUTE;
        let lease = n.grant(5 * MINUTE);
        n.put("t", "1", Expiry::At(deadline));
        n.put("l", "2", Expiry::Lease(lease));
        n.write(Op::LeaseKeepAlive { id: lease }).unwrap();
        let before = n.engine.lease(lease, 10).unwrap().0;
        if snapshot {
            // Each write asks for a snapshot unless one is being written.
            let deadline = Instant::now() + Duration::from_secs(10);
            while n.engine.status().snapshot_index < 4 {
                assert!(Instant::now() < deadline, "never: a snapshot");
                n.write(Op::Noop).unwrap();
            }
        }
        drop(n);
        let n = open_with(&dir, &clock, tune);
        let what = format!("snapshot: {snapshot}");
        assert_eq!(
            n.engine.get_item(b"t").map(|i| i.expiry),
            Some(Expiry::At(deadline)),
            "{what}"
        );
        assert_eq!(n.engine.lease(lease, 10).unwrap().0, before, "{what}");
        assert_eq!(before.keys, vec![b("l")]);
        let s = n.engine.status();
        assert_eq!((s.keys_with_ttl, s.leases), (2, 1), "{what}");
        // And they still end where they should.
        n.advance(10 * MINUTE);
        n.until("both removed", |e| e.status().keys_with_ttl == 0);
        n.until("the lease revoked", |e| e.status().leases == 0);
    }
}

#[test]
fn a_lease_is_kept_alive_revoked_with_its_keys_and_refused_once_gone() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let id = n.grant(MINUTE);
    for k in ["a", "b", "c"] {
        n.put(k, "v", Expiry::Lease(id));
    }
    n.put("c", "plain", Expiry::Never); // leaves the lease
    n.advance(MINUTE / 2);
    let ka = n.write(Op::LeaseKeepAlive { id }).unwrap();
    let deadline = ka.outcome.lease.unwrap().deadline_ms;
    assert!(deadline >= n.engine.wall_ms() + MINUTE - 1_000);
    let (info, more) = n.engine.lease(id, 10).unwrap();
    assert_eq!((info.keys, more), (vec![b("a"), b("b")], false));
    let revoke = Op::LeaseRevoke { id, expired: false };
    let r = n.write(revoke.clone()).unwrap();
    assert_eq!(r.outcome.removed, 2);
    assert_eq!((n.engine.get(b"a"), n.engine.get(b"b")), (None, None));
    assert_eq!(n.engine.get(b"c"), Some(b("plain")));
    assert!(matches!(n.write(revoke), Err(Error::LeaseNotFound(i)) if i == id));
    assert!(matches!(
        n.write(Op::LeaseKeepAlive { id }),
        Err(Error::LeaseNotFound(_))
    ));
    assert_eq!(n.engine.lease(id, 10), None);
}

#[test]
fn an_expired_lease_takes_its_keys_at_once_and_is_revoked_by_the_expirer() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let id = n.grant(MINUTE);
    n.put("s/1", "v", Expiry::Lease(id));
    n.put("s/2", "v", Expiry::Lease(id));
    n.advance(MINUTE);
    assert_eq!(
        n.engine.get(b"s/1"),
        None,
        "hidden with its lease's deadline"
    );
    assert_eq!(n.engine.lease(id, 10), None);
    n.until("revoked", |e| {
        e.status().leases == 0 && e.status().keys == 0
    });
    assert_eq!(n.engine.status().expired_keys, 2);
}

#[test]
fn a_write_naming_a_dead_lease_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    n.put("a", "old", Expiry::Never);
    let id = n.grant(MINUTE);
    n.advance(MINUTE);
    let bulk = Op::Bulk {
        items: vec![
            (b("a"), b("new"), Expiry::Never),
            (b("b"), b("x"), Expiry::Lease(id)),
        ],
    };
    assert!(matches!(n.write(bulk), Err(Error::LeaseNotFound(i)) if i == id));
    let txn = Txn {
        success: vec![
            TxnOp::Delete { key: b("a") },
            TxnOp::Put {
                key: b("b"),
                value: b("x"),
                expiry: Expiry::Lease(id + 100),
            },
        ],
        ..Txn::default()
    };
    assert!(matches!(
        n.engine.write_txn_blocking(txn),
        Err(Error::LeaseNotFound(_))
    ));
    assert_eq!(n.engine.get(b"a"), Some(b("old")));
    assert_eq!(n.engine.get(b"b"), None);
}

#[test]
fn keep_ttl_keeps_the_deadline_and_a_plain_put_clears_it() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let deadline = n.engine.wall_ms() + MINUTE;
    n.put("k", "1", Expiry::At(deadline));
    n.put("k", "2", Expiry::Keep);
    let item = n.engine.get_item(b"k").unwrap();
    assert_eq!(
        (item.value, item.expiry),
        (Some(b("2")), Expiry::At(deadline))
    );
    assert_eq!(item.meta.version, 2);
    n.put("k", "3", Expiry::Never);
    assert_eq!(n.engine.get_item(b"k").unwrap().expiry, Expiry::Never);
    assert_eq!(n.engine.status().keys_with_ttl, 0);
}

#[test]
fn a_grant_past_max_leases_is_refused_before_it_is_logged() {
    let dir = TempDir::new().unwrap();
    let n = open_with(&dir, &WallClock::new(0), |cfg| cfg.max_leases = 2);
    n.grant(MINUTE);
    let second = n.grant(MINUTE);
    let last = n.engine.last_log_pos().index;
    assert!(matches!(
        n.write(Op::LeaseGrant { ttl_ms: MINUTE }),
        Err(Error::TooManyLeases { live: 2 })
    ));
    assert_eq!(n.engine.last_log_pos().index, last, "nothing logged");
    n.write(Op::LeaseRevoke {
        id: second,
        expired: false,
    })
    .unwrap();
    n.grant(MINUTE);
}

#[test]
fn many_keys_expiring_at_once_are_removed_in_bounded_records_beside_client_writes() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let deadline = n.engine.wall_ms() + MINUTE;
    let count = 2 * MAX_EXPIRE_KEYS + 500;
    let items = (0..count)
        .map(|i| (b(&format!("k{i:05}")), b("v"), Expiry::At(deadline)))
        .collect();
    n.write(Op::Bulk { items }).unwrap();
    let before = n.engine.last_log_pos().index;
    n.advance(MINUTE);
    // A client write is taken while the expiries go on.
    n.put("client", "v", Expiry::Never);
    n.until("all removed", |e| e.status().keys == 1);
    let records = n.engine.last_log_pos().index - before - 1;
    assert!(
        records >= count.div_ceil(MAX_EXPIRE_KEYS) as u64,
        "{records} Expire records for {count} keys"
    );
    assert_eq!(n.engine.status().expired_keys, count as u64);
}

#[test]
fn a_primary_decides_expiries_only_once_its_epochs_first_entry_is_applied() {
    let dir = TempDir::new().unwrap();
    let n = open_with(&dir, &WallClock::new(0), |cfg| {
        cfg.policy = CommitPolicy::Replicated
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = n.engine.wall_ms() + MINUTE;
    let pending = rt
        .block_on(n.engine.submit(put("t", "v", Expiry::At(deadline)), true))
        .unwrap();
    n.until("durable", |e| e.last_log_pos().index >= 1);
    n.advance(MINUTE);
    // Not committed, so not applied: a batch formed now carries no expiry.
    let other = rt
        .block_on(n.engine.submit(put("x", "v", Expiry::Never), true))
        .unwrap();
    n.until("durable", |e| e.last_log_pos().index >= 2);
    assert_eq!(n.engine.last_log_pos().index, 2, "no expiry logged");
    rt.block_on(n.engine.commit_to(2, 1)).unwrap();
    rt.block_on(pending).unwrap().unwrap();
    rt.block_on(other).unwrap().unwrap();
    n.until("the Expire logged", |e| e.last_log_pos().index >= 3);
    assert_eq!(n.engine.get(b"t"), None, "hidden by the clock meanwhile");
    assert_eq!(n.engine.status().keys, 2, "logged, not committed");
    rt.block_on(n.engine.commit_to(3, 1)).unwrap();
    n.until("applied", |e| e.status().keys == 1);
}

#[test]
fn paused_expiries_log_nothing_until_resumed() {
    let dir = TempDir::new().unwrap();
    let n = open(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    n.put("t", "v", Expiry::At(n.engine.wall_ms() + MINUTE));
    rt.block_on(n.engine.pause_expiries(true)).unwrap();
    n.advance(MINUTE);
    // A batch formed now would carry the expiry: it carries none.
    let index = n.put("x", "v", Expiry::Never);
    assert_eq!(n.engine.last_log_pos().index, index, "no expiry logged");
    assert_eq!(n.engine.get(b"t"), None, "hidden all the same");
    rt.block_on(n.engine.pause_expiries(false)).unwrap();
    n.until("removed once resumed", |e| e.status().expired_keys == 1);
}
