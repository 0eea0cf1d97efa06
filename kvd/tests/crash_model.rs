//! Crash model: the storage engine over a simulated file system that loses
//! power at a chosen moment (see `sim` for what a crash leaves on disk).
//!
//! Over many seeded crash points, recovery must boot every time and hold
//! every acknowledged write; the one write in flight at the crash may or
//! may not survive, but never partially. Every seed's crash fires: the
//! writers keep writing until the power fails, so no seed degenerates into
//! a clean shutdown. Torn WAL tails of every kind (a prefix of the
//! unsynced bytes, then maybe zeros or garbage) must each have reached
//! recovery a number of times, or the run proves too little. Crashes inside
//! snapshot install, the mode switch's rebase and masterless ingest are in
//! `crash_replicated.rs`; crashes around votes and epochs (`meta`) in
//! `crash_votes.rs`.

mod sim;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kvd::model::{Expiry, KeyMeta, KeyRange, RangeRead};
use kvd::storage::{Engine, EngineConfig, Op, Txn};
use sim::model::{apply_model, contents, random_op, random_txn, Model};
use sim::{SimFs, TailTally};

fn config() -> EngineConfig {
    let mut cfg = EngineConfig::new("/sim/data");
    // Tiny segments and snapshots so that a short workload crosses segment
    // rolls, snapshots and WAL compaction, and crashes land inside them.
    cfg.segment_max_bytes = 2048;
    cfg.snapshot_every_bytes = 4096;
    cfg.queue_capacity = 64;
    cfg
}

/// Writes one writer attempts at most: far more than the crash points
/// (each write costs at least a write and an fsync), so the crash always
/// comes first.
const MAX_WRITES_PER_WRITER: u64 = 5_000;

/// One writer's view: what was acknowledged and what was in flight.
struct Writer {
    prefix: String,
    acked: Model,
    in_flight: Option<Op>,
}

/// Writes `op` (a transaction's branch as a transaction with no compares).
fn write(engine: &Engine, op: Op) -> Result<(), kvd::storage::Error> {
    match op {
        Op::Txn { ops } => engine.write_txn_blocking(Txn {
            success: ops,
            ..Txn::default()
        }),
        op => engine.write_blocking(op, true),
    }
    .map(|_| ())
}

/// Every key's versions.
fn versions(engine: &Engine) -> Vec<(Bytes, KeyMeta)> {
    let read = RangeRead {
        range: KeyRange::prefix(b""),
        limit: 10_000,
        keys_only: true,
    };
    let page = engine.range(&read);
    assert!(!page.more);
    page.items.into_iter().map(|i| (i.key, i.meta)).collect()
}

/// Runs `writers` concurrent writers until the disk dies, reboots, recovers.
/// With `txns`, a third of the writes are transactions of several ops.
/// Returns the torn tails the reboot left.
fn crash_once(seed: u64, writers: usize, txns: bool) -> Vec<sim::TornTail> {
    let mut rng = StdRng::seed_from_u64(seed);
    let fs = SimFs::default();
    // A few hundred operations cover start-up, rolls, snapshots, compaction.
    let crash_at = rng.gen_range(0..600);
    fs.crash_after(crash_at);

    let results: Vec<Writer> = match Engine::open(Arc::new(fs.clone()), config(), None) {
        Err(_) => Vec::new(), // the power failed during the very first start
        Ok((engine, _)) => {
            let engine = Arc::new(engine);
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let engine = engine.clone();
                    let mut rng =
                        StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(w as u64));
                    std::thread::spawn(move || {
                        let mut me = Writer {
                            prefix: format!("w{w}-"),
                            acked: Model::new(),
                            in_flight: None,
                        };
                        for seq in 0..MAX_WRITES_PER_WRITER {
                            let op = if txns && rng.gen_bool(0.3) {
                                random_txn(&mut rng, &me.prefix, seq)
                            } else {
                                random_op(&mut rng, &me.prefix, seq)
                            };
                            match write(&engine, op.clone()) {
                                Ok(_) => apply_model(&mut me.acked, &op),
                                Err(_) => {
                                    me.in_flight = Some(op);
                                    break;
                                }
                            }
                        }
                        me
                    })
                })
                .collect();
            let out = handles
                .into_iter()
                .map(|h| h.join().expect("writer thread panicked"))
                .collect();
            engine.shutdown();
            out
        }
    };
    assert!(
        fs.crashed(),
        "seed {seed}: the crash at operation {crash_at} never fired; \
         the seed tested only a clean shutdown"
    );

    let (rebooted, tails) = fs.reboot(&mut rng);
    let (engine, report) = Engine::open(Arc::new(rebooted.clone()), config(), None)
        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed to boot: {e}\ntails: {tails:?}"));
    for w in &results {
        let got = contents(&engine, &w.prefix);
        let mut with_in_flight = w.acked.clone();
        if let Some(op) = &w.in_flight {
            apply_model(&mut with_in_flight, op);
        }
        assert!(
            got == w.acked || got == with_in_flight,
            "seed {seed}: writer {} lost acknowledged data or saw a partial write\n\
             recovered: {got:?}\nacknowledged: {:?}\nin flight: {:?}\nreport: {report:?}\n\
             tails: {tails:?}",
            w.prefix,
            w.acked,
            w.in_flight
        );
    }
    // The recovered engine takes writes and recovers them again, with the
    // same versions.
    let recovered = versions(&engine);
    engine
        .write_blocking(
            Op::Put {
                key: Bytes::from_static(b"after"),
                value: Bytes::from_static(b"crash"),
                expiry: Expiry::Never,
            },
            true,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: write after recovery failed: {e}"));
    engine.shutdown();
    drop(engine);
    let (again, _) = Engine::open(Arc::new(rebooted), config(), None)
        .unwrap_or_else(|e| panic!("seed {seed}: second recovery failed: {e}"));
    assert_eq!(
        again.get(b"after"),
        Some(Bytes::from_static(b"crash")),
        "seed {seed}"
    );
    let mut again = versions(&again);
    again.retain(|(k, _)| k != "after");
    assert_eq!(
        again, recovered,
        "seed {seed}: versions changed on a restart"
    );
    tails
}

#[test]
fn a_single_writer_survives_1000_crash_points() {
    sim::crash_points(0, 1000, 100, |seed| crash_once(seed, 1, false));
}

#[test]
fn concurrent_writers_with_group_commit_survive_300_crash_points() {
    sim::crash_points(10_000, 300, 10, |seed| crash_once(seed, 4, false));
}

/// A transaction is one record: all of its writes survive a crash, or none.
#[test]
fn transactions_survive_300_crash_points_whole() {
    sim::crash_points(20_000, 300, 10, |seed| crash_once(seed, 2, true));
}

#[test]
fn a_failed_fsync_poisons_the_wal_until_restart() {
    let fs = SimFs::default();
    let (engine, _) = Engine::open(Arc::new(fs.clone()), config(), None).unwrap();
    let put = |v: &'static [u8]| Op::Put {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(v),
        expiry: Expiry::Never,
    };
    engine.write_blocking(put(b"1"), true).unwrap();
    fs.fail_next_sync();
    assert!(engine.write_blocking(put(b"2"), true).is_err());
    // The disk works again, but the engine must not trust it: the kernel may
    // have dropped the pages of the failed write.
    let err = engine.write_blocking(put(b"3"), true).unwrap_err();
    assert!(matches!(err, kvd::storage::Error::Poisoned), "got {err}");
    assert!(engine.is_poisoned());
    assert_eq!(engine.get(b"k"), Some(Bytes::from_static(b"1")));
    engine.shutdown();
    drop(engine);
    let (engine, _) = Engine::open(Arc::new(fs), config(), None).unwrap();
    assert!(!engine.is_poisoned());
    engine.write_blocking(put(b"4"), true).unwrap();
}

/// A crash at any point of `truncate_from` leaves a log that boots and is
/// contiguous: the records before the cut, plus possibly some of the
/// doomed suffix (which the primary will cut again), never a gap.
#[test]
fn truncating_a_suffix_survives_a_crash_at_every_step() {
    use kvd::storage::record::{Record, Timestamp};
    use kvd::storage::wal::Wal;

    let dir = Path::new("/sim/data/wal");
    let record = |index: u64| Record {
        index,
        epoch: 1,
        ts: Timestamp::default(),
        op: Op::Put {
            key: Bytes::from(format!("k{index}")),
            value: Bytes::from(vec![b'v'; 60]),
            expiry: Expiry::Never,
        },
    };
    for crash_at in 0..40 {
        let fs = SimFs::default();
        let (mut wal, _) = Wal::open(Arc::new(fs.clone()), dir, 0, 400, |_| {}).unwrap();
        for i in 1..=30 {
            let mut buf = Vec::new();
            record(i).encode_into(&mut buf);
            wal.append(i, 1, &buf, 1).unwrap();
            wal.sync().unwrap();
        }
        fs.crash_after(crash_at);
        let finished = wal.truncate_from(12).is_ok();
        drop(wal);

        let mut rng = StdRng::seed_from_u64(crash_at);
        let (rebooted, _) = fs.reboot(&mut rng);
        let mut seen = Vec::new();
        let (wal, _) = Wal::open(Arc::new(rebooted), dir, 0, 400, |r| seen.push(r.index))
            .unwrap_or_else(|e| panic!("crash at op {crash_at}: the log does not boot: {e}"));
        assert!(
            seen.iter().enumerate().all(|(n, &i)| i == n as u64 + 1),
            "crash at op {crash_at}: gap in the log: {seen:?}"
        );
        assert!(
            seen.len() >= 11,
            "crash at op {crash_at}: lost entries before the cut"
        );
        if finished {
            assert_eq!(seen.len(), 11, "a finished truncation must be durable");
        }
        assert_eq!(wal.next_index(), seen.len() as u64 + 1);
    }
}

/// What a writer of deadlines and leases expects a key to hold.
type TtlModel = std::collections::BTreeMap<Bytes, (Bytes, Expiry)>;

/// The state's rules over the model: `Keep` keeps what the key had; a
/// revoke takes the lease's keys along. Deadlines lie a day ahead, so none
/// passes during the run.
fn apply_ttl_model(m: &mut TtlModel, op: &Op) {
    let mut put = |k: &Bytes, v: &Bytes, x: Expiry| {
        let x = match x {
            Expiry::Keep => m.get(k).map_or(Expiry::Never, |(_, had)| *had),
            x => x,
        };
        m.insert(k.clone(), (v.clone(), x));
    };
    match op {
        Op::Put { key, value, expiry } => put(key, value, *expiry),
        // The last item of each key; every Keep against the key before.
        Op::Bulk { items } => {
            let before = m.clone();
            for (k, v, x) in items {
                let x = match x {
                    Expiry::Keep => before.get(k).map_or(Expiry::Never, |(_, had)| *had),
                    x => *x,
                };
                m.insert(k.clone(), (v.clone(), x));
            }
        }
        Op::Delete { key } => {
            m.remove(key);
        }
        Op::LeaseRevoke { id, .. } => m.retain(|_, (_, x)| *x != Expiry::Lease(*id)),
        _ => {}
    }
}

/// Keeps writing puts with deadlines, `keep_ttl` and leases, bulks,
/// deletes, grants and revokes under `prefix` until the disk dies.
fn ttl_writer(engine: &Engine, seed: u64, prefix: &str) -> (TtlModel, Option<Op>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut acked, mut lease) = (TtlModel::new(), None::<u64>);
    let far = engine.wall_ms() + 24 * 3600 * 1000;
    for seq in 0..MAX_WRITES_PER_WRITER {
        let k = |rng: &mut StdRng| Bytes::from(format!("{prefix}k{}", rng.gen_range(0..8)));
        let v = Bytes::from(format!("{prefix}{seq}"));
        let x = |rng: &mut StdRng| match rng.gen_range(0..5) {
            0 => Expiry::Never,
            1 | 2 => Expiry::At(far + seq),
            3 => Expiry::Keep,
            _ => lease.map_or(Expiry::Never, Expiry::Lease),
        };
        let op = match (rng.gen_range(0..10), lease) {
            (0, _) | (_, None) => Op::LeaseGrant {
                ttl_ms: kvd::model::MAX_TTL_MS,
            },
            (1, Some(id)) => Op::LeaseRevoke { id, expired: false },
            (2, _) => Op::Delete { key: k(&mut rng) },
            (3, _) => Op::Bulk {
                items: (0..3)
                    .map(|_| (k(&mut rng), v.clone(), x(&mut rng)))
                    .collect(),
            },
            _ => Op::Put {
                key: k(&mut rng),
                value: v.clone(),
                expiry: x(&mut rng),
            },
        };
        match engine.write_blocking(op.clone(), true) {
            Ok(r) => {
                apply_ttl_model(&mut acked, &op);
                match op {
                    Op::LeaseGrant { .. } => lease = Some(r.index),
                    Op::LeaseRevoke { .. } => lease = None,
                    _ => {}
                }
            }
            Err(_) => return (acked, Some(op)),
        }
    }
    (acked, None)
}

/// Deadlines and leases survive a crash exactly: every acknowledged key
/// comes back with the value and the deadline or lease it was given, its
/// lease alive, through fuzzy snapshots (of a frozen lease table) and
/// replay; the write in flight is there whole or not at all.
#[test]
fn deadlines_and_leases_survive_300_crash_points() {
    let mut tally = TailTally::default();
    for seed in 30_000..30_300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let fs = SimFs::default();
        fs.crash_after(rng.gen_range(0..600));
        let results: Vec<(String, TtlModel, Option<Op>)> =
            match Engine::open(Arc::new(fs.clone()), config(), None) {
                Err(_) => Vec::new(),
                Ok((engine, _)) => {
                    let engine = Arc::new(engine);
                    let handles: Vec<_> = (0..2)
                        .map(|w| {
                            let engine = engine.clone();
                            std::thread::spawn(move || {
                                let prefix = format!("w{w}-");
                                let (acked, in_flight) = ttl_writer(&engine, seed * 7 + w, &prefix);
                                (prefix, acked, in_flight)
                            })
                        })
                        .collect();
                    let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
                    engine.shutdown();
                    out
                }
            };
        assert!(fs.crashed(), "seed {seed}: no crash");
        let (rebooted, tails) = fs.reboot(&mut rng);
        tally.add(&tails);
        let (engine, _) = Engine::open(Arc::new(rebooted), config(), None)
            .unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
        for (prefix, acked, in_flight) in results {
            let got: TtlModel = (0..8)
                .filter_map(|i| {
                    let k = Bytes::from(format!("{prefix}k{i}"));
                    let item = engine.get_item(&k)?;
                    Some((k, (item.value?, item.expiry)))
                })
                .collect();
            let mut with_in_flight = acked.clone();
            if let Some(op) = &in_flight {
                apply_ttl_model(&mut with_in_flight, op);
            }
            assert!(
                got == acked || got == with_in_flight,
                "seed {seed}: writer {prefix}\nrecovered: {got:?}\nacknowledged: {acked:?}\n\
                 in flight: {in_flight:?}"
            );
            for (_, x) in got.values() {
                if let Expiry::Lease(id) = x {
                    assert!(engine.lease(*id, 1).is_some(), "seed {seed}: lease {id}");
                }
            }
        }
    }
    tally.assert_each_at_least(10);
}
