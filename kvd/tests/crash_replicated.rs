//! Crash model of the engine's replicated paths, over the simulated disk of
//! `sim`: a power cut at every file-system operation of a snapshot install
//! (a secondary that fell behind its primary) and of a mode switch's
//! rebase, and at random points of a masterless workload that merges
//! peers' records (`Engine::ingest`) besides taking its own writes.
//!
//! After each crash and reboot the node must boot, hold everything it
//! acknowledged, show the interrupted step whole or not at all, and take a
//! new write that survives another recovery.
//!
//! The install and rebase models run without background snapshots, so every
//! file-system operation happens on the WAL thread in request order and the
//! k-th operation of a seed is the same in every run: a dry run counts a
//! step's operations, then the power fails at each of them in turn.

mod sim;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::runtime::Runtime;

use kvd::model::{Expiry, KeyMeta, TxnOp};
use kvd::replication::rules::{AppendOutcome, LogPos};
use kvd::storage::fs::Fs;
use kvd::storage::snapshot::{self, SnapshotMeta, Versions};
use kvd::storage::{
    CommitPolicy, Engine, EngineConfig, Error, Op, OpenReport, Rebase, Record, ReplicateRequest,
    State, Timestamp,
};
use sim::model::{apply_model, contents, key, random_op, Model, KEYS};
use sim::{SimFs, TailTally, TornTail};

/// The workload's keys carry no prefix: one node, one key space.
const P: &str = "";

/// 2100-01-01 in ms. Peers stamp their records from here on, above any
/// wall clock, so which records win does not depend on when the test runs
/// (this node's own stamps jump past what it observes).
const FUTURE_MS: u64 = 4_102_444_800_000;

/// This node's tag in stamps; its peers are 2 and 3.
const ME: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    PrimarySecondary,
    Masterless,
}

impl Mode {
    fn other(self) -> Mode {
        match self {
            Mode::PrimarySecondary => Mode::Masterless,
            Mode::Masterless => Mode::PrimarySecondary,
        }
    }

    fn policy(self) -> CommitPolicy {
        match self {
            Mode::PrimarySecondary => CommitPolicy::Replicated,
            Mode::Masterless => CommitPolicy::Merge,
        }
    }
}

fn config(mode: Mode, epoch: u64) -> EngineConfig {
    let mut cfg = EngineConfig::new("/sim/data");
    cfg.segment_max_bytes = 2048;
    // No background snapshot (see the module doc).
    cfg.snapshot_every_bytes = u64::MAX;
    cfg.queue_capacity = 64;
    cfg.epoch = epoch;
    cfg.node_tag = ME;
    cfg.policy = mode.policy();
    // Peers' stamps here lie in the year 2100, so that which version wins
    // never depends on the wall clock; the bound on stamps ahead of the
    // clock is not what this model is about (tests/masterless_safety.rs).
    cfg.max_clock_offset_ms = u64::MAX;
    cfg
}

fn open(fs: &SimFs, cfg: EngineConfig) -> Result<(Engine, OpenReport), Error> {
    Engine::open(Arc::new(fs.clone()), cfg, None)
}

/// The engine's async calls need only channels, not a reactor.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
}

/// Appends `ops` after the node's last entry as its primary of `epoch`
/// would, with the primary's commit index `commit` (the node caps it at
/// what matches). Returns the new last index.
fn replicate(rt: &Runtime, e: &Engine, epoch: u64, ops: &[Op], commit: u64) -> Result<u64, Error> {
    let prev = e.last_log_pos();
    let records = (prev.index + 1..)
        .zip(ops)
        .map(|(index, op)| Record {
            index,
            epoch,
            ts: Timestamp::default(),
            op: op.clone(),
        })
        .collect();
    let req = ReplicateRequest {
        epoch,
        prev,
        records,
        leader_commit: commit,
    };
    match rt.block_on(e.replicate(req))? {
        AppendOutcome::Accept { match_index, .. } => Ok(match_index),
        other => panic!("the node refused its primary's append: {other:?}"),
    }
}

/// The epoch of the node's next primary: at least the node's, and at least
/// its last entry's (a rebase whose snapshot became durable just before the
/// crash has a newer epoch than the `meta` the node booted with).
fn primary_epoch(e: &Engine, epoch: u64) -> u64 {
    epoch.max(e.last_log_pos().epoch)
}

/// Waits until the engine's WAL thread has finished what it did for
/// earlier commands, including work it does after replying (making the
/// next WAL segment in advance): it answers commands in order, so the
/// answer to a no-op command comes after all of that.
fn settle(rt: &Runtime, e: &Engine) {
    // A purge before the zero timestamp removes nothing.
    let _ = rt.block_on(e.purge_tombstones(Timestamp::default()));
}

/// Runs `step` on `engine` with the power failing at its `crash_at`-th
/// file-system operation (None: not at all). Returns the step's result and
/// how many operations it got through, counted from a settled engine to a
/// settled engine so that the count is the same in every run of a seed.
fn cut_power<T>(
    fs: &SimFs,
    (rt, engine): (&Runtime, &Engine),
    crash_at: Option<u64>,
    what: &str,
    step: impl FnOnce() -> T,
) -> (T, u64) {
    settle(rt, engine);
    let start = fs.ops();
    if let Some(k) = crash_at {
        fs.crash_after(k);
    }
    let out = step();
    settle(rt, engine);
    if crash_at.is_some() {
        assert!(fs.crashed(), "{what}: the crash never fired");
    }
    (out, fs.ops() - start)
}

/// Runs seed `seed` once without a crash to count its step's operations,
/// then once with the power failing at each of them; `run` returns the
/// operations its step took. Returns the number of crash points.
fn at_every_step(seed: u64, run: impl Fn(u64, Option<u64>) -> u64) -> u64 {
    let ops = run(seed, None);
    for k in 0..ops {
        run(seed, Some(k));
    }
    ops
}

fn after_op() -> Op {
    Op::Put {
        key: Bytes::from_static(b"after"),
        value: Bytes::from_static(b"crash"),
        expiry: Expiry::Never,
    }
}

/// The rebooted node takes a write, and holds it after another reboot.
/// Returns the write's index.
fn assert_after_write_survives(
    rt: &Runtime,
    engine: Engine,
    disk: &SimFs,
    mode: Mode,
    epoch: u64,
    what: &str,
) -> u64 {
    let epoch = primary_epoch(&engine, epoch);
    let index = match mode {
        Mode::PrimarySecondary => replicate(rt, &engine, epoch, &[after_op()], u64::MAX),
        Mode::Masterless => engine.write_blocking(after_op(), true).map(|r| r.index),
    }
    .unwrap_or_else(|e| panic!("{what}: a write after recovery failed: {e}"));
    engine.shutdown();
    drop(engine);
    let (again, _) =
        open(disk, config(mode, epoch)).unwrap_or_else(|e| panic!("{what}: second boot: {e}"));
    if mode == Mode::PrimarySecondary {
        // After a restart the entries wait for the primary's commit index.
        replicate(rt, &again, epoch, &[], index).expect("heartbeat");
    }
    assert_eq!(
        again.get(b"after"),
        Some(Bytes::from_static(b"crash")),
        "{what}: the write after recovery was lost"
    );
    index
}

// ---- Snapshot install ----------------------------------------------------

/// A model built by `n` random ops whose values are numbered from `seq`.
fn random_model(rng: &mut StdRng, seq: u64, n: u64) -> Model {
    let mut m = Model::new();
    for s in seq..seq + n {
        apply_model(&mut m, &random_op(rng, P, s));
    }
    m
}

/// The bytes of a snapshot file of `model` at `(index, epoch)`, as a
/// primary would send it.
fn snapshot_file(model: &Model, index: u64, epoch: u64) -> Vec<u8> {
    let state = State::new();
    // Every key last written at the snapshot's index, as a primary's
    // snapshot may hold them (none past what its log will send).
    let versions = KeyMeta {
        create_index: index,
        mod_index: index,
        version: 1,
    };
    for (k, v) in model {
        state.load(k, v, versions);
    }
    let scratch = SimFs::default();
    let meta = SnapshotMeta {
        last_index: index,
        last_epoch: epoch,
    };
    let (path, _) = snapshot::write(
        &scratch,
        Path::new("/primary/snap"),
        &state,
        None,
        meta,
        Versions::Kept,
        None,
    )
    .expect("writing a snapshot on a disk that does not crash");
    scratch.read(&path).expect("reading it back")
}

/// Writes an arriving snapshot the way the replication runtime does:
/// create, write, fsync (install renames it into `snap/` and fsyncs that).
fn write_incoming(fs: &SimFs, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs.create(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// A secondary's state before the install.
struct OldLog {
    /// Committed contents.
    model: Model,
    snapshot_index: u64,
    commit: u64,
    last: u64,
}

/// Gives the node an old log: for half the seeds an earlier installed
/// snapshot first (so the log does not start at 1), then entries its
/// primary of epoch 1 committed, then some it did not.
fn old_log(rt: &Runtime, e: &Engine, fs: &SimFs, rng: &mut StdRng) -> OldLog {
    let mut model = Model::new();
    let mut snapshot_index = 0;
    if rng.gen_bool(0.5) {
        snapshot_index = rng.gen_range(1..20);
        model = random_model(rng, 10_000, 20);
        let tmp = e.incoming_snapshot_path();
        write_incoming(fs, &tmp, &snapshot_file(&model, snapshot_index, 1)).expect("setup");
        let incoming = e.verify_snapshot(tmp).expect("setup snapshot verifies");
        rt.block_on(e.install_snapshot(incoming))
            .expect("setup install");
    }
    let ops: Vec<Op> = (0..rng.gen_range(1..40))
        .map(|seq| random_op(rng, P, seq))
        .collect();
    let committed = rng.gen_range(0..=ops.len());
    let commit = snapshot_index + committed as u64;
    for chunk in ops.chunks(7) {
        replicate(rt, e, 1, chunk, commit).expect("setup append");
    }
    for op in &ops[..committed] {
        apply_model(&mut model, op);
    }
    OldLog {
        model,
        snapshot_index,
        commit,
        last: e.last_log_pos().index,
    }
}

/// How a seed's install went without a crash.
struct InstallRun {
    ops: u64,
    /// The snapshot was ahead of the commit index (else the install is a
    /// no-op).
    ahead: bool,
}

/// Writes an arriving snapshot and installs it, the power failing at the
/// `crash_at`-th file-system operation; then reboots and checks.
fn install_once(seed: u64, crash_at: Option<u64>) -> InstallRun {
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let fs = SimFs::default();
    let what = format!("install seed {seed}, crash at {crash_at:?}");
    let (engine, _) = open(&fs, config(Mode::PrimarySecondary, 1)).expect("setup boots");
    let old = old_log(&rt, &engine, &fs, &mut rng);
    // The new primary's snapshot, usually past the whole log; sometimes
    // inside its uncommitted part, or (a no-op) at the commit index.
    let snap = random_model(&mut rng, 20_000, 30);
    let snap_index = rng.gen_range(old.commit.max(1)..=old.last + 10);
    let bytes = snapshot_file(&snap, snap_index, 2);
    let tmp = engine.incoming_snapshot_path();

    let (installed, ops) = cut_power(&fs, (&rt, &engine), crash_at, &what, || {
        write_incoming(&fs, &tmp, &bytes)
            .map_err(|e| Error::io("incoming snapshot".into(), e))
            .and_then(|_| engine.verify_snapshot(tmp.clone()))
            .and_then(|incoming| rt.block_on(engine.install_snapshot(incoming)))
    });
    engine.shutdown();
    drop(engine);
    let ahead = snap_index > old.commit;
    if crash_at.is_none() {
        installed
            .as_ref()
            .expect("an install without a crash works");
    }

    let (disk, tails) = fs.reboot(&mut rng);
    let what = format!("{what}, torn tails {tails:?}");
    // The node adopted the new primary's epoch before the snapshot came.
    let (engine, report) = open(&disk, config(Mode::PrimarySecondary, 2))
        .unwrap_or_else(|e| panic!("{what}: does not boot: {e}"));
    let took_snapshot = ahead && report.snapshot_index == snap_index;
    assert!(
        took_snapshot || !(ahead && installed.is_ok()),
        "{what}: an installed snapshot was lost"
    );
    let want = if took_snapshot {
        assert!(engine.last_log_pos().index >= snap_index, "{what}");
        snap
    } else {
        assert_eq!(
            report.snapshot_index, old.snapshot_index,
            "{what}: neither the old snapshot nor the installed one"
        );
        // The primary's next heartbeat tells the node its commit index.
        replicate(&rt, &engine, 2, &[], old.commit).expect("heartbeat");
        old.model
    };
    assert_eq!(contents(&engine, P), want, "{what}: old state or snapshot");
    assert_eq!(engine.state().len(), want.len() as u64, "{what}");
    assert_after_write_survives(&rt, engine, &disk, Mode::PrimarySecondary, 2, &what);
    InstallRun { ops, ahead }
}

#[test]
fn a_crash_at_any_step_of_a_snapshot_install_leaves_the_old_state_or_the_snapshot() {
    let (mut crashes, mut installs) = (0, 0);
    for seed in 0..40 {
        installs += u64::from(install_once(seed, None).ahead);
        crashes += at_every_step(seed, |seed, k| install_once(seed, k).ops);
    }
    // Most seeds install for real (the rest find the snapshot committed).
    assert!(installs >= 30, "only {installs} of 40 seeds installed");
    assert!(crashes >= 40 * 8, "{crashes} crash points");
}

// ---- Rebase (the mode switch) ----------------------------------------------

/// Stamps of two peers' records, moving forward from [`FUTURE_MS`] with
/// some jitter, so that some arrive older than what the node holds.
struct Peers {
    next_ms: u64,
    seq: u32,
}

impl Peers {
    fn new() -> Self {
        Peers {
            next_ms: FUTURE_MS,
            seq: 0,
        }
    }

    /// A batch of 1 to 4 records from one peer, as a stream or a repair
    /// would bring them.
    fn batch(&mut self, rng: &mut StdRng) -> Vec<Record> {
        let node = rng.gen_range(2..=3);
        self.next_ms += 100;
        (0..rng.gen_range(1..5))
            .map(|_| {
                self.seq += 1;
                Record {
                    index: u64::from(self.seq),
                    epoch: 1,
                    ts: Timestamp {
                        physical_ms: self.next_ms + rng.gen_range(0..2_000),
                        logical: self.seq,
                        node,
                    },
                    op: random_op(rng, P, 50_000 + u64::from(self.seq)),
                }
            })
            .collect()
    }

    /// A mode switch's common stamp: above every stamp issued so far.
    fn base_ts(&mut self) -> Timestamp {
        self.next_ms += 10_000;
        let ts = Timestamp {
            physical_ms: self.next_ms,
            logical: 0,
            node: 0,
        };
        self.next_ms += 10_000;
        ts
    }
}

/// Committed writes in `mode`: appends from a primary, or this node's own
/// writes and its peers' records.
fn fill(rt: &Runtime, e: &Engine, mode: Mode, epoch: u64, rng: &mut StdRng, peers: &mut Peers) {
    for i in 0..rng.gen_range(1..12) {
        let seq = rng.gen_range(0..1_000_000);
        let op = random_op(rng, P, seq);
        match mode {
            Mode::PrimarySecondary => {
                let ops = [op, random_op(rng, P, seq + 1)];
                replicate(rt, e, epoch, &ops, u64::MAX).expect("setup append");
            }
            // The first is the node's own write: the log always grows.
            Mode::Masterless if i == 0 || rng.gen_bool(0.5) => {
                e.write_blocking(op, true).expect("setup write");
            }
            Mode::Masterless => {
                rt.block_on(e.ingest(peers.batch(rng)))
                    .expect("setup ingest");
            }
        }
    }
}

/// A node in `from` mode with committed writes; for half the seeds it has
/// rebased in place before (so it holds an older snapshot and a log after
/// it). Returns the node and its epoch.
fn before_rebase(
    rt: &Runtime,
    fs: &SimFs,
    from: Mode,
    rng: &mut StdRng,
    peers: &mut Peers,
) -> (Engine, u64) {
    let mut epoch = 1;
    let (engine, _) = open(fs, config(from, epoch)).expect("setup boots");
    fill(rt, &engine, from, epoch, rng, peers);
    if rng.gen_bool(0.5) {
        epoch += 1;
        let req = Rebase {
            policy: from.policy(),
            base_index: engine.last_log_pos().index + rng.gen_range(0..3),
            epoch,
            base_ts: peers.base_ts(),
        };
        rt.block_on(engine.rebase(req)).expect("setup rebase");
        fill(rt, &engine, from, epoch, rng, peers);
    }
    (engine, epoch)
}

/// One rebase from `from` to the other mode, the power failing at its
/// `crash_at`-th file-system operation; then reboots and checks. Returns
/// the operations the rebase took.
fn rebase_once(seed: u64, from: Mode, crash_at: Option<u64>) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let fs = SimFs::default();
    let what = format!("rebase from {from:?}, seed {seed}, crash at {crash_at:?}");
    let mut peers = Peers::new();
    let (engine, old_epoch) = before_rebase(&rt, &fs, from, &mut rng, &mut peers);
    let before = contents(&engine, P);
    let last = engine.last_log_pos().index;
    let to = from.other();
    let req = Rebase {
        policy: to.policy(),
        base_index: last + rng.gen_range(0..4),
        epoch: old_epoch + 1,
        base_ts: peers.base_ts(),
    };
    let (done, ops) = cut_power(&fs, (&rt, &engine), crash_at, &what, || {
        rt.block_on(engine.rebase(req))
    });
    let done = done.is_ok();
    engine.shutdown();
    drop(engine);
    assert!(
        done || crash_at.is_some(),
        "{what}: a rebase without a crash works"
    );

    // Until the rebase has returned, the node's `meta` still names the old
    // mode and epoch, and that is what it boots with.
    let (mode, epoch) = if done {
        (to, req.epoch)
    } else {
        (from, old_epoch)
    };
    let (disk, tails) = fs.reboot(&mut rng);
    let what = format!("{what}, torn tails {tails:?}");
    let (engine, report) =
        open(&disk, config(mode, epoch)).unwrap_or_else(|e| panic!("{what}: no boot: {e}"));
    let rebased = report.snapshot_index == req.base_index;
    assert!(rebased || !done, "{what}: the rebase's snapshot was lost");
    let last = if rebased {
        let base = LogPos::new(req.epoch, req.base_index);
        assert_eq!(
            engine.last_log_pos(),
            base,
            "{what}: the log restarts after B"
        );
        req.base_index
    } else {
        assert_eq!(engine.last_log_pos().index, last, "{what}: the old log");
        last
    };
    if mode == Mode::PrimarySecondary {
        // Everything was committed before the switch.
        let epoch = primary_epoch(&engine, epoch);
        replicate(&rt, &engine, epoch, &[], last).expect("heartbeat");
    }
    assert_eq!(contents(&engine, P), before, "{what}: contents changed");
    assert_eq!(engine.state().len(), before.len() as u64, "{what}");
    if rebased && mode == Mode::Masterless && to == Mode::Masterless {
        for k in before.keys() {
            let stamp = engine.lww().entry(k).map(|e| e.ts);
            assert_eq!(
                stamp,
                Some(req.base_ts),
                "{what}: {k:?} lost the base stamp"
            );
        }
    }
    let index = assert_after_write_survives(&rt, engine, &disk, mode, epoch, &what);
    assert_eq!(index, last + 1, "{what}: the next write's index");
    ops
}

#[test]
fn a_crash_at_any_step_of_a_rebase_to_masterless_keeps_the_contents() {
    let crashes: u64 = (0..30)
        .map(|seed| at_every_step(seed, |s, k| rebase_once(s, Mode::PrimarySecondary, k)))
        .sum();
    assert!(crashes >= 30 * 8, "{crashes} crash points");
}

#[test]
fn a_crash_at_any_step_of_a_rebase_to_primary_secondary_keeps_the_contents() {
    let crashes: u64 = (0..30)
        .map(|seed| at_every_step(seed, |s, k| rebase_once(s, Mode::Masterless, k)))
        .sum();
    assert!(crashes >= 30 * 8, "{crashes} crash points");
}

// ---- Masterless ingest -----------------------------------------------------

/// A key's last-write-wins version: its stamp, and its value (None: a
/// tombstone).
type Version = (Timestamp, Option<Bytes>);

/// The versions `op` writes, one per key (in a bulk the last item wins).
fn versions(op: &Op) -> Vec<(Bytes, Option<Bytes>)> {
    match op {
        Op::Put { key, value, .. } => vec![(key.clone(), Some(value.clone()))],
        Op::Delete { key } => vec![(key.clone(), None)],
        Op::Bulk { items } => {
            let last: BTreeMap<_, _> = items
                .iter()
                .map(|(k, v, _)| (k.clone(), v.clone()))
                .collect();
            last.into_iter().map(|(k, v)| (k, Some(v))).collect()
        }
        Op::Noop | Op::Config { .. } => Vec::new(),
        Op::Expire { .. }
        | Op::LeaseGrant { .. }
        | Op::LeaseKeepAlive { .. }
        | Op::LeaseRevoke { .. } => unreachable!("the workload writes no expiries or leases"),
        // The workload's transactions (none yet) would name their keys:
        // the last write of each key is its version.
        Op::Txn { ops } => {
            let mut last = BTreeMap::new();
            for op in ops {
                match op {
                    TxnOp::Put { key, value, .. } => last.insert(key.clone(), Some(value.clone())),
                    TxnOp::Delete { key } => last.insert(key.clone(), None),
                    _ => None,
                };
            }
            last.into_iter().collect()
        }
    }
}

/// The model of last-write-wins: per key, the version with the highest stamp.
fn merge(m: &mut BTreeMap<Bytes, Version>, ts: Timestamp, op: &Op) {
    for (k, v) in versions(op) {
        if m.get(&k).is_none_or(|(old, _)| ts > *old) {
            m.insert(k, (ts, v));
        }
    }
}

/// The step a masterless node was taking when the power failed.
#[derive(Debug)]
enum InFlight {
    None,
    /// Its records are independent: any of them may have survived.
    Ingest(Vec<Record>),
    /// One record whose stamp was never reported; it is above every stamp
    /// seen before it.
    Local(Op),
}

/// Steps a masterless workload takes at most: far more than the crash
/// points, so the crash always comes first.
const MAX_STEPS: u64 = 5_000;

/// Merges peers' batches (70%) and takes the node's own writes until a step
/// fails. Returns what was acknowledged and the step in flight.
fn masterless_until_crash(
    rt: &Runtime,
    engine: &Engine,
    rng: &mut StdRng,
) -> (BTreeMap<Bytes, Version>, InFlight) {
    let mut peers = Peers::new();
    let mut acked = BTreeMap::new();
    for seq in 0..MAX_STEPS {
        if rng.gen_bool(0.7) {
            let batch = peers.batch(rng);
            if rt.block_on(engine.ingest(batch.clone())).is_err() {
                return (acked, InFlight::Ingest(batch));
            }
            for r in &batch {
                merge(&mut acked, r.ts, &r.op);
            }
        } else {
            let op = random_op(rng, P, seq);
            match engine.write_blocking(op.clone(), true) {
                Ok(r) => merge(&mut acked, r.ts, &op),
                Err(_) => return (acked, InFlight::Local(op)),
            }
        }
    }
    (acked, InFlight::None)
}

fn recovered_version(engine: &Engine, k: &Bytes, what: &str) -> Option<Version> {
    let e = engine.lww().entry(k)?;
    let value = engine.get(k);
    assert_eq!(
        value.is_none(),
        e.tombstone,
        "{what}: {k:?} stamp and value disagree"
    );
    Some((e.ts, value))
}

/// Every key holds its acknowledged version, or a newer one the step in
/// flight wrote; a write in flight survived whole or not at all.
fn assert_versions(
    engine: &Engine,
    acked: &BTreeMap<Bytes, Version>,
    in_flight: &InFlight,
    what: &str,
) {
    let newest_acked = acked.values().map(|(ts, _)| *ts).max().unwrap_or_default();
    let mut from_local = Vec::new();
    for k in (0..KEYS).map(|i| key(P, i)) {
        let got = recovered_version(engine, &k, what);
        let want = acked.get(&k).cloned();
        if got == want {
            continue;
        }
        let Some((ts, value)) = got.clone() else {
            panic!("{what}: acknowledged {k:?} = {want:?} is gone");
        };
        let wrote = |op: &Op| versions(op).contains(&(k.clone(), value.clone()));
        let newer = want.as_ref().is_none_or(|(w, _)| ts > *w);
        let explained = newer
            && match in_flight {
                InFlight::None => false,
                InFlight::Ingest(batch) => batch.iter().any(|r| r.ts == ts && wrote(&r.op)),
                InFlight::Local(op) => ts > newest_acked && ts.node == ME && wrote(op),
            };
        assert!(explained, "{what}: {k:?} is {got:?}, acknowledged {want:?}");
        from_local.push(ts);
    }
    if let InFlight::Local(op) = in_flight {
        let keys = versions(op).len();
        assert!(
            from_local.is_empty() || from_local.len() == keys,
            "{what}: {} of the {keys} keys of the write in flight survived",
            from_local.len()
        );
        assert!(
            from_local.windows(2).all(|w| w[0] == w[1]),
            "{what}: one stamp"
        );
    }
}

/// A masterless node with background snapshots merges and writes until the
/// power fails at a random operation; then recovery. Returns the torn tails.
fn ingest_once(seed: u64) -> Vec<TornTail> {
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let fs = SimFs::default();
    let mut cfg = config(Mode::Masterless, 1);
    cfg.snapshot_every_bytes = 4096;
    let crash_at = rng.gen_range(0..600);
    fs.crash_after(crash_at);
    let what = format!("ingest seed {seed}, crash at {crash_at}");
    let (acked, in_flight) = match open(&fs, cfg.clone()) {
        Ok((engine, _)) => masterless_until_crash(&rt, &engine, &mut rng),
        Err(_) => (BTreeMap::new(), InFlight::None), // the power failed at the first start
    };
    assert!(fs.crashed(), "{what}: the crash never fired");

    let (disk, tails) = fs.reboot(&mut rng);
    let what = format!("{what}, in flight {in_flight:?}, torn tails {tails:?}");
    let (engine, _) = open(&disk, cfg.clone()).unwrap_or_else(|e| panic!("{what}: no boot: {e}"));
    assert_versions(&engine, &acked, &in_flight, &what);
    // The clock restarts past every stamp it recovered.
    let recovered = (0..KEYS).filter_map(|i| engine.lww().entry(&key(P, i)).map(|e| e.ts));
    let newest = recovered.chain(acked.values().map(|v| v.0)).max();
    let r = engine
        .write_blocking(after_op(), true)
        .unwrap_or_else(|e| panic!("{what}: a write after recovery failed: {e}"));
    assert!(
        Some(r.ts) > newest,
        "{what}: stamp {:?} after recovery",
        r.ts
    );
    engine.shutdown();
    drop(engine);
    let (again, _) = open(&disk, cfg).unwrap_or_else(|e| panic!("{what}: second boot: {e}"));
    assert_eq!(
        again.get(b"after"),
        Some(Bytes::from_static(b"crash")),
        "{what}"
    );
    assert_eq!(
        again.lww().entry(b"after").map(|e| e.ts),
        Some(r.ts),
        "{what}"
    );
    tails
}

#[test]
fn a_masterless_node_merging_peers_survives_300_crash_points() {
    let mut tally = TailTally::default();
    for seed in 0..300 {
        tally.add(&ingest_once(seed));
    }
    tally.assert_each_at_least(10);
}

/// A rebase whose snapshot cannot be made durable (a failed fsync, no
/// crash) changes nothing: the node stays in its old mode with its stamps
/// and tombstones, so the switch can be refused and tried again.
#[test]
fn a_failed_rebase_leaves_a_masterless_node_its_stamps() {
    let rt = runtime();
    let fs = SimFs::default();
    let mut peers = Peers::new();
    let mut rng = StdRng::seed_from_u64(7);
    let (engine, _) = open(&fs, config(Mode::Masterless, 1)).expect("boots");
    fill(&rt, &engine, Mode::Masterless, 1, &mut rng, &mut peers);
    let stamps = |e: &Engine| -> Vec<_> {
        (0..KEYS)
            .map(|i| e.lww().entry(&key(P, i)).map(|v| (v.ts, v.tombstone)))
            .collect()
    };
    let before = (stamps(&engine), engine.lww().digest(), contents(&engine, P));
    assert!(
        before.0.iter().any(Option::is_some),
        "the node holds stamps"
    );

    fs.fail_next_sync();
    let req = Rebase {
        policy: CommitPolicy::Replicated,
        base_index: engine.last_log_pos().index,
        epoch: 2,
        base_ts: peers.base_ts(),
    };
    assert!(rt.block_on(engine.rebase(req)).is_err(), "the fsync failed");
    assert!(engine.is_masterless(), "still masterless");
    let after = (stamps(&engine), engine.lww().digest(), contents(&engine, P));
    assert_eq!(after, before, "a failed rebase changed the stamps");
}
