//! The engine's two threads: the WAL writer ([`Writer`]: batches, fsyncs,
//! applies, replies; every WAL file operation happens here, but for a
//! primary's fsyncs, which it hands to its [`Syncer`] and waits out while
//! it applies commits) and the snapshotter ([`Snapshotter`]: writes
//! snapshots in the background and hands compaction back to the writer).
//!
//! Every record reaches the log through one path: [`Writer::write_entries`]
//! (frame, write(2), in replicated mode into the log view and the ship
//! cache at once, shippers woken), one fsync (a failure marks the storage
//! state), then [`Writer::publish_durable`] (the durable last index,
//! waiters notified). Client writes ([`Writer::commit`]) and peers' merged
//! writes ([`Writer::ingest`]) take it one batch at a time
//! ([`Writer::append_durably`]); a secondary takes the primary's appends
//! queued together as one group under one fsync
//! ([`Writer::replicate_group`]), and a masterless node the peers' merges
//! queued together, with its client batch when there is one
//! ([`Writer::commit`]) or alone ([`Writer::ingest_group`]). They differ only in what they append and
//! when they apply it, which the [`CommitPolicy`] decides.
//!
//! # Invariants (checked with `debug_assert!`)
//!
//! - commit index <= last index;
//! - the applied index never decreases;
//! - pending entries (logged, waiting for their commit) are in strictly
//!   ascending index order, all after the commit index;
//! - the commit index never passes the durable last index, which never
//!   passes the written one (the log view's last index).
//!
//! # Compare-and-write
//!
//! A transaction goes through the same queue and batch as every write.
//! When the writer forms a batch it resolves each transaction, in batch
//! order, against the [`PendingView`] (the applied state with every entry
//! logged but not applied laid over it, the batch's earlier requests
//! included) and logs the branch it chose as one `Op::Txn` record; nothing
//! can come between the check and the write. The reads of that record are
//! computed when it is applied, on the node that answers it.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::fs::Fs;
use super::log_index::EpochRuns;
use super::lww::{note_ahead, Ahead, Lww};
use super::pending_view::PendingView;
use super::record::{self, Record};
use super::resolve::{PendingEntry, Resolved, Resolver, TxnAnswer};
use super::state::{ApplyOutcome, Refusal, State};
use super::syncer::Syncer;
use super::{
    snapshot, wal, Cmd, CommitPolicy, EngineConfig, Error, IncomingSnapshot, Rebase,
    ReplicateRequest, Shared, WriteReq, WriteResult,
};
use crate::masterless::hlc::{Hlc, WallClock};
use crate::metrics::Metrics;
use crate::model::{Op, Timestamp, MAX_EXPIRE_KEYS};
use crate::replication::rules::{self, AppendOutcome, LogPos, LogView};

/// One entry on its way into the log: its epoch, stamp and op.
type Entry<'a> = (u64, Timestamp, &'a Op);

/// A peer's records to merge and where their answer goes.
type IngestReq = (Vec<Record>, oneshot::Sender<Result<u64, Error>>);

/// The records of `merges`, in order, and their answers' channels.
fn split_merges(merges: Vec<IngestReq>) -> (Vec<Record>, Vec<oneshot::Sender<Result<u64, Error>>>) {
    let mut records = Vec::new();
    let mut replies = Vec::with_capacity(merges.len());
    for (recs, reply) in merges {
        records.extend(recs);
        replies.push(reply);
    }
    (records, replies)
}

/// Answers every merged batch with the append's outcome.
fn answer_merges(replies: Vec<oneshot::Sender<Result<u64, Error>>>, outcome: Result<u64, Error>) {
    match outcome {
        Ok(last) => {
            for reply in replies {
                let _ = reply.send(Ok(last));
            }
        }
        Err(e) => {
            let text = e.to_string();
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
            }
            for reply in replies {
                let _ = reply.send(Err(Error::NotDurable(text.clone())));
            }
        }
    }
}

/// What [`Writer::write_entries`] wrote (write(2), not yet fsync'd).
struct Written {
    first: u64,
    last: u64,
    /// When the write began.
    started: Instant,
}

/// What [`Writer::append_durably`] made durable.
struct Appended {
    last: u64,
    /// The write and fsync took this long.
    fsync: Duration,
    /// When the write began (the start of an entry's commit latency).
    written_at: Instant,
}

/// Most appends from the primary one fsync covers on a secondary: the
/// primary keeps at most a few in flight per peer (and read barriers add
/// empty ones), so a group rarely reaches it; it bounds the replies held
/// back by one fsync.
const MAX_GROUP_APPENDS: usize = 16;

/// Batches of a primary whose commit is still awaited, with when they were
/// written, for `kvd_commit_latency_seconds`. Bounded: past the bound the
/// oldest is dropped (one sample lost, nothing else).
#[derive(Default)]
pub(super) struct CommitClock {
    batches: VecDeque<(u64, Instant)>,
}

/// Batches [`CommitClock`] keeps at most (the writer's queue holds fewer
/// batches than this in flight).
const COMMIT_CLOCK_BATCHES: usize = 4096;

impl CommitClock {
    /// A batch ending at `last` was written at `at`.
    fn written(&mut self, last: u64, at: Instant) {
        if self.batches.len() >= COMMIT_CLOCK_BATCHES {
            self.batches.pop_front();
        }
        self.batches.push_back((last, at));
    }

    /// The commit index reached `commit`: how long each batch it covers
    /// took from its write.
    fn committed(&mut self, commit: u64, mut observe: impl FnMut(Duration)) {
        while let Some(&(last, at)) = self.batches.front() {
            if last > commit {
                break;
            }
            observe(at.elapsed());
            self.batches.pop_front();
        }
    }

    /// Entries from `from` on were cut: they never commit.
    fn forget_from(&mut self, from: u64) {
        while self.batches.back().is_some_and(|&(last, _)| last >= from) {
            self.batches.pop_back();
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
    }
}

/// The WAL thread.
pub(super) struct Writer {
    pub wal: wal::Wal,
    pub state: Arc<State>,
    pub shared: Arc<Shared>,
    pub cfg: EngineConfig,
    pub metrics: Option<Arc<Metrics>>,
    pub clock: Hlc,
    pub wall: WallClock,
    pub bytes_since_snapshot: u64,
    /// Lowest index logged but deliberately not applied (`debug_flaky`);
    /// snapshots must not claim to cover it.
    pub first_unapplied: Option<u64>,
    /// Replicated mode: durable entries not yet known to be committed.
    pub pending: VecDeque<PendingEntry>,
    /// What transactions are checked against, while a batch or the pending
    /// entries need it (see [`PendingView`]).
    pub view: Option<PendingView>,
    /// Batches refused in a row because no new segment could be started
    /// (logged when it starts and when it ends, not once per batch).
    pub roll_refusals: u64,
    pub fs: Arc<dyn Fs>,
    pub snap_dir: PathBuf,
    pub snap_tx: std_mpsc::SyncSender<snapshot::SnapshotMeta>,
    pub compact_rx: std_mpsc::Receiver<u64>,
    /// The last index of the newest durable snapshot (see [`Writer::compact`]).
    pub covered: u64,
    /// The expiries logged and not applied yet (see [`Writer::expiries`]).
    pub in_flight: InFlight,
    /// Replicated mode: the epoch in which this node logged its own entries
    /// as primary, and the first of them (its epoch's no-op).
    pub led: Option<(u64, u64)>,
    /// Writes are paused for a mode switch: no expiries either.
    pub expiries_paused: bool,
    /// Primary: when its uncommitted batches were written.
    pub commit_clock: CommitClock,
    /// The queue, once [`Writer::run`] took it.
    pub inbox: Option<mpsc::Receiver<Cmd>>,
    /// Commands taken from the queue while an fsync ran, to carry out after
    /// it, in order, before anything queued since.
    pub held: VecDeque<Cmd>,
    /// The queue, held weakly, for the fsync thread to wake the writer.
    pub wake: mpsc::WeakSender<Cmd>,
    /// The primary's fsync thread, once started (see [`super::syncer`]).
    pub syncer: Option<Syncer>,
}

/// The keys named by `Expire` records and the leases by expired
/// `LeaseRevoke` records that are logged but not applied yet: the expirer
/// names none of them again.
#[derive(Default)]
pub(super) struct InFlight {
    keys: HashSet<Box<[u8]>>,
    leases: HashSet<u64>,
}

impl InFlight {
    fn logged(&mut self, op: &Op) {
        match op {
            Op::Expire { keys } => self
                .keys
                .extend(keys.iter().map(|(k, _)| k.to_vec().into())),
            Op::LeaseRevoke { id, expired: true } => {
                self.leases.insert(*id);
            }
            _ => {}
        }
    }

    fn applied(&mut self, op: &Op) {
        match op {
            Op::Expire { keys } => keys.iter().for_each(|(k, _)| {
                self.keys.remove(&k[..]);
            }),
            Op::LeaseRevoke { id, expired: true } => {
                self.leases.remove(id);
            }
            _ => {}
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.leases.clear();
    }
}

/// Keys one batch's `Expire` removes. Fewer than a record may hold
/// ([`MAX_EXPIRE_KEYS`]): the record is applied under the state's write
/// lock, beside the batch's client writes, and with a thousand keys (and
/// their thousand events) it held them up by several times their p99
/// while a million keys expired (`benches/expiry.rs`).
const EXPIRE_KEYS_PER_BATCH: usize = 128;
const _: () = assert!(EXPIRE_KEYS_PER_BATCH <= MAX_EXPIRE_KEYS);

/// The expirer's records for one batch (docs/DESIGN.md §2.15, §2.16): at
/// most one `Expire` of up to [`EXPIRE_KEYS_PER_BATCH`] keys past their
/// deadline at `now` and one expired `LeaseRevoke`, none of what is in
/// flight.
fn expiry_ops(state: &State, now: u64, in_flight: &InFlight) -> Vec<Op> {
    let (keys, lease) = state.due(
        now,
        EXPIRE_KEYS_PER_BATCH,
        &in_flight.keys,
        &in_flight.leases,
    );
    let expire = (!keys.is_empty()).then_some(Op::Expire { keys });
    let revoke = lease.map(|id| Op::LeaseRevoke { id, expired: true });
    expire.into_iter().chain(revoke).collect()
}

impl Writer {
    /// The current commit policy (only [`Writer::rebase`] changes it).
    fn policy(&self) -> CommitPolicy {
        self.shared.policy()
    }

    pub fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<WriteReq> = Vec::with_capacity(self.cfg.max_batch_records);
        let mut other: Vec<Cmd> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        self.inbox = Some(rx);
        while let Some(first) = self.next_cmd(true) {
            self.gather(first, &mut batch, &mut other);
            // Commits first: they apply entries that are durable already,
            // and taken after the batch they would wait out its fsync
            // (their writers' replies with them).
            other.retain(|cmd| match cmd {
                Cmd::Commit { index, epoch } => {
                    self.commit_counted(*index, *epoch);
                    false
                }
                _ => true,
            });
            if !batch.is_empty() {
                let merges = self.take_merges(&mut other);
                self.commit(&mut batch, merges, &mut buf);
            }
            let mut cmds = other.drain(..).peekable();
            while let Some(cmd) = cmds.next() {
                if let Cmd::Ingest { records, reply } = cmd {
                    // Peers' batches queued together (one per origin)
                    // share one fsync, as a secondary's appends do.
                    let mut group = vec![(records, reply)];
                    while group.len() < MAX_GROUP_APPENDS {
                        match cmds.next_if(|c| matches!(c, Cmd::Ingest { .. })) {
                            Some(Cmd::Ingest { records, reply }) => group.push((records, reply)),
                            _ => break,
                        }
                    }
                    self.ingest_group(group, &mut buf);
                    continue;
                }
                let Cmd::Replicate(first) = cmd else {
                    self.handle(cmd, &mut buf);
                    continue;
                };
                // Appends queued while the last fsync ran share the next.
                let mut group = vec![first];
                while group.len() < MAX_GROUP_APPENDS {
                    match cmds.next_if(|c| matches!(c, Cmd::Replicate(_))) {
                        Some(Cmd::Replicate(r)) => group.push(r),
                        _ => break,
                    }
                }
                self.replicate_group(group, &mut buf);
            }
            self.compact();
            // Off the reply path: the next roll then needs no new file.
            let _ = self.wal.prepare_spare();
            self.check_invariants();
        }
        // The channel is closed and drained: every reply went out after its
        // fsync, so there is nothing left to flush.
    }

    /// The next command: one held during an fsync, else from the queue
    /// (waiting for one if `wait`); `None` once the queue is closed and
    /// drained.
    fn next_cmd(&mut self, wait: bool) -> Option<Cmd> {
        if let Some(cmd) = self.held.pop_front() {
            return Some(cmd);
        }
        let rx = self.inbox.as_mut()?;
        if wait {
            rx.blocking_recv()
        } else {
            rx.try_recv().ok()
        }
    }

    /// Group commit: takes `first` and every write already queued (up to
    /// the batch limits) into `batch`; anything else goes to `other`, to
    /// wait until the batch is durable.
    fn gather(&mut self, first: Cmd, batch: &mut Vec<WriteReq>, other: &mut Vec<Cmd>) {
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Write(req) => {
                    bytes += req.write.len_hint();
                    batch.push(req);
                }
                cmd => other.push(cmd),
            }
            if batch.len() < self.cfg.max_batch_records && bytes < self.cfg.max_batch_bytes {
                next = self.next_cmd(false);
            }
        }
    }

    /// Carries out one command other than a write.
    fn handle(&mut self, cmd: Cmd, buf: &mut Vec<u8>) {
        match cmd {
            Cmd::Write(_) => unreachable!("writes are batched by gather"),
            // A count by a primary since deposed is of a log it may no
            // longer hold (a newer primary's entries may have replaced its
            // suffix): not ours to commit.
            Cmd::Commit { index, epoch } => self.commit_counted(index, epoch),
            Cmd::Replicate(r) => self.replicate_group(vec![r], buf),
            Cmd::ReadFrom {
                from,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.wal.read_from(from, max_bytes));
            }
            Cmd::InstallSnapshot { snapshot, reply } => {
                let _ = reply.send(self.install_snapshot(*snapshot));
            }
            Cmd::Ingest { records, reply } => self.ingest_group(vec![(records, reply)], buf),
            Cmd::Rebase { req, reply } => {
                let _ = reply.send(self.rebase(req));
            }
            Cmd::Tick => self.tick(),
            // Its outcome was taken where the fsync was awaited.
            Cmd::Synced => {}
            Cmd::ExpiryTick => self.expire_idle(buf),
            Cmd::PauseExpiries { paused, reply } => {
                self.expiries_paused = paused;
                let _ = reply.send(());
            }
            Cmd::Purge { before, reply } => {
                let n = if self.shared.snapshot_running.load(Ordering::Acquire) {
                    0
                } else {
                    self.shared.lww.purge(before)
                };
                let _ = reply.send(n);
            }
            Cmd::CheckDataDir { reply } => {
                self.wal.check_anchors();
                let _ = reply.send(self.wal.state());
            }
        }
    }

    /// A primary's count: commits through `index` unless this node has
    /// left `epoch` since.
    fn commit_counted(&mut self, index: u64, epoch: u64) {
        if epoch == self.shared.epoch.load(Ordering::Acquire) {
            self.advance_commit(index)
        }
    }

    /// Moves the clock to the wall clock's time, so an idle node's durable
    /// clock (and the global stable time) still advances. A poisoned WAL
    /// may hold stamped records whose fate is unknown until a restart:
    /// claim nothing then.
    fn tick(&mut self) {
        if self.wal.is_poisoned() {
            return;
        }
        let wall = self.wall.now_ms();
        if wall > self.clock.last().physical_ms {
            self.clock.now(wall);
        }
        // No stamp is outstanding: the writer issues and logs stamps in
        // one step.
        *self.shared.hlc.lock() = self.clock.last();
        *self.shared.durable_hlc.lock() = self.clock.last();
    }

    /// The writer's invariants, after every round of commands.
    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            let last = self.shared.last_index.load(Ordering::Acquire);
            let commit = self.shared.commit_index.load(Ordering::Acquire);
            debug_assert!(
                commit <= last,
                "WAL writer invariant: commit index {commit} is past the last index {last}"
            );
            let mut prev = commit;
            for p in &self.pending {
                debug_assert!(
                    p.index > prev,
                    "WAL writer invariant: pending entry {} does not follow {prev} \
                     (pending entries ascend, after the commit index)",
                    p.index
                );
                prev = p.index;
            }
        }
    }

    /// The one way records enter the log: [`Writer::write_entries`],
    /// then one fsync, then [`Writer::publish_durable`]. Only then do they
    /// count as part of the log (the durable last index, votes, commit
    /// counting, acknowledgements); in replicated mode they were already
    /// in the log view and the ship cache at their write, so that shippers
    /// send them while the fsync runs, and in the other modes they enter
    /// those only now. On failure nothing of them counts, and the storage
    /// state says why (the WAL marks it where it failed, and refuses
    /// everything after).
    fn append_durably<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a>> + Clone,
        durable_hlc: Option<Timestamp>,
        buf: &mut Vec<u8>,
    ) -> Result<Appended, Error> {
        let written = self.write_entries(entries.clone(), buf)?;
        if self.policy() == CommitPolicy::Replicated {
            self.sync_applying_commits()?;
        } else {
            self.wal.sync()?;
        }
        let fsync = written.started.elapsed();
        if !self.ships_at_write() {
            self.remember(written.first, entries);
        }
        self.publish_durable(written.last, durable_hlc);
        Ok(Appended {
            last: written.last,
            fsync,
            written_at: written.started,
        })
    }

    /// A primary's fsync, run on the fsync thread while this one applies
    /// the commits that arrive (acknowledgements of earlier batches: the
    /// commit index stays below the durable index, so nothing of this
    /// batch is applied) and holds every other command for later. Where
    /// there is no second handle or thread, the fsync runs here.
    fn sync_applying_commits(&mut self) -> Result<(), Error> {
        let Some(handle) = self.wal.sync_handle()? else {
            return self.wal.sync();
        };
        if self.syncer.is_none() {
            self.syncer = Syncer::start(self.wake.clone()).ok();
        }
        let Some(syncer) = &self.syncer else {
            return self.wal.sync();
        };
        let outcome = syncer.outcome.clone();
        if syncer.submit(handle).is_err() {
            return self.wal.sync();
        }
        let result = loop {
            if let Some(r) = outcome.take() {
                break r;
            }
            if self.held.len() >= self.cfg.queue_capacity {
                // As many held as the queue holds: wait, as it would.
                break outcome.wait();
            }
            match self.inbox.as_mut().and_then(|rx| rx.blocking_recv()) {
                Some(Cmd::Commit { index, epoch }) => self.commit_counted(index, epoch),
                Some(Cmd::Synced) => {}
                Some(cmd) => self.held.push_back(cmd),
                None => break outcome.wait(),
            }
        };
        self.wal.sync_end(result)
    }

    /// Frames `entries` (contiguous from the WAL's next index) into one
    /// write(2), not yet durable. In replicated mode they enter the log
    /// view and the ship cache now and shippers are woken: a secondary's
    /// fsync then runs while ours does.
    fn write_entries<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a>> + Clone,
        buf: &mut Vec<u8>,
    ) -> Result<Written, Error> {
        let first = self.wal.next_index();
        buf.clear();
        let mut count = 0u64;
        let mut last_epoch = 0;
        for (i, (epoch, ts, op)) in entries.clone().enumerate() {
            record::encode(first + i as u64, epoch, ts, op, buf);
            count += 1;
            last_epoch = epoch;
        }
        debug_assert!(count > 0, "an append carries at least one entry");
        let started = Instant::now();
        self.wal.append(first, count, buf, last_epoch)?;
        self.bytes_since_snapshot += buf.len() as u64;
        if self.ships_at_write() {
            self.remember(first, entries);
            self.shared.written_changed.notify_waiters();
        }
        Ok(Written {
            first,
            last: first + count - 1,
            started,
        })
    }

    /// Whether written entries are shipped before their fsync: in
    /// replicated mode, where a primary counts itself toward a commit only
    /// at its own fsync. (Masterless streams only durable entries.)
    fn ships_at_write(&self) -> bool {
        self.policy() == CommitPolicy::Replicated
    }

    /// Everything written through `last` is durable: the durable last
    /// index published, then `durable_hlc` (the clock's value once these
    /// are durable, for a writer whose clock stamped or observed them),
    /// then waiters notified.
    fn publish_durable(&mut self, last: u64, durable_hlc: Option<Timestamp>) {
        self.shared.last_index.store(last, Ordering::SeqCst);
        if let Some(ts) = durable_hlc {
            // Published after the index: see `Engine::durable_hlc`.
            *self.shared.durable_hlc.lock() = ts;
        }
        self.publish_wal_stats();
        self.shared.durable_changed.notify_waiters();
    }

    /// Records newly written (replicated mode) or durable entries in the
    /// in-memory log view: their epochs always, the entries themselves
    /// when this node ships them.
    fn remember<'a>(&mut self, first: u64, entries: impl Iterator<Item = Entry<'a>>) {
        let mut log = self.shared.log.lock();
        let mut cache = self.policy().ships().then(|| self.shared.cache.lock());
        for (i, (epoch, ts, op)) in entries.enumerate() {
            let index = first + i as u64;
            log.push(index, epoch);
            if let Op::Config { config } = op {
                log.push_config(index, config.clone());
            }
            if let Some(cache) = cache.as_mut() {
                cache.push(Record {
                    index,
                    epoch,
                    ts,
                    op: op.clone(),
                });
            }
        }
    }

    /// Queues a logged entry for its commit (applied only once durable
    /// here too: [`Writer::advance_commit`] stops at the durable index).
    fn push_pending(&mut self, entry: PendingEntry) {
        debug_assert!(
            self.pending.back().is_none_or(|p| p.index < entry.index),
            "WAL writer invariant: pending entries ascend ({:?} then {})",
            self.pending.back().map(|p| p.index),
            entry.index
        );
        self.pending.push_back(entry);
    }

    /// Replicated mode: applies pending entries up to the commit index,
    /// never past what is durable here (a poisoned WAL's written entries
    /// are never acknowledged by this node).
    fn advance_commit(&mut self, index: u64) {
        let durable = self.shared.last_index.load(Ordering::Acquire);
        let commit = index.min(durable);
        let old = self.shared.commit_index.fetch_max(commit, Ordering::AcqRel);
        if commit <= old {
            return;
        }
        if let Some(m) = &self.metrics {
            let latency = &m.commit_latency_seconds;
            self.commit_clock
                .committed(commit, |d| latency.observe(d.as_secs_f64()));
        }
        while self.pending.front().is_some_and(|p| p.index <= commit) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let outcome = self.apply_entry(p.index, p.ts, &p.op, p.apply, p.txn.as_ref());
            if let Some(view) = self.view.as_mut() {
                view.applied(p.index, &p.op);
            }
            if let Some(reply) = p.reply {
                let _ = reply.send(answer(p.index, outcome, p.ts));
            }
        }
        if self.pending.is_empty() {
            self.view = None;
        }
        self.maybe_snapshot();
    }

    /// Applies one durable entry; `answer`: a transaction this node
    /// answers, whose reads run now.
    fn apply_entry(
        &mut self,
        index: u64,
        ts: Timestamp,
        op: &Op,
        apply: bool,
        answer: Option<&TxnAnswer>,
    ) -> ApplyOutcome {
        let reads = answer.is_some();
        let mut outcome = match (apply, self.policy()) {
            (true, CommitPolicy::Merge) => self.shared.lww.apply(&self.state, index, ts, op, reads),
            (true, _) => self.state.apply(index, ts, op, reads),
            (false, _) => {
                self.first_unapplied.get_or_insert(index);
                self.state.skip_record(index, ts);
                ApplyOutcome::default()
            }
        };
        self.in_flight.applied(op);
        if let Some(a) = answer {
            outcome.txn = outcome.txn.map(|r| a.answer(r));
        }
        let before = self.shared.applied_index.swap(index, Ordering::AcqRel);
        debug_assert!(
            index > before,
            "WAL writer invariant: the applied index went from {before} to {index}"
        );
        outcome
    }

    /// Client writes: resolved (transactions) and checked against the
    /// memory budget, logged in one durable append, then applied and
    /// acknowledged now (at their own fsync) or once committed (replicated).
    ///
    /// Masterless: `merges` (peers' batches queued meanwhile) go into the
    /// same append, after the client writes, so both share one fsync; the
    /// clock observes their stamps first, so the client writes' stamps
    /// follow everything this node has seen.
    fn commit(&mut self, batch: &mut Vec<WriteReq>, merges: Vec<IngestReq>, buf: &mut Vec<u8>) {
        let wall = self.wall.now_ms();
        let (records, replies) = split_merges(merges);
        for r in &records {
            self.clock.observe(r.ts, wall);
        }
        // Stamped before they are resolved: a record decides expiry by its
        // own stamp, and so must its transaction's compares.
        let stamps: Vec<Timestamp> = batch.iter().map(|_| self.clock.now(wall)).collect();
        let mut resolved = self.resolve(batch, &stamps);
        // Logged after the client writes: a peer's version of a key they
        // write loses to them, and is not logged at all.
        let mut ahead = Ahead::default();
        for r in &resolved {
            note_ahead(&mut ahead, r.ts, &r.op);
        }
        let winners = self.merge_winners(&records, wall, &mut ahead);
        if resolved.is_empty() && winners.is_empty() {
            if !replies.is_empty() {
                // Nothing to log: every stamp seen is covered, as an
                // ingest with no winner has it.
                *self.shared.durable_hlc.lock() = self.clock.last();
            }
            let last = self.wal.next_index() - 1;
            answer_merges(replies, Ok(last));
            return;
        }
        let merged = replies.len();
        // No client waits on a peer's record: its batch's answer does.
        resolved.extend(
            winners
                .into_iter()
                .map(|(ts, op)| Resolved::unanswered(op, ts)),
        );
        self.add_expiries(&mut resolved, wall);
        let logged = self.log_and_apply(resolved, buf);
        if logged.is_ok() && merged > 0 {
            if let Some(m) = &self.metrics {
                m.wal_appends_per_fsync.observe(merged as f64);
            }
        }
        answer_merges(replies, logged.map_err(Error::NotDurable));
    }

    /// Masterless: the peers' batches queued in `other`, taken out to go
    /// with the client batch (at most [`MAX_GROUP_APPENDS`]).
    fn take_merges(&self, other: &mut Vec<Cmd>) -> Vec<IngestReq> {
        if self.policy() != CommitPolicy::Merge || self.wal.is_poisoned() {
            return Vec::new();
        }
        let mut merges = Vec::new();
        let mut rest = Vec::with_capacity(other.len());
        for cmd in other.drain(..) {
            match cmd {
                Cmd::Ingest { records, reply } if merges.len() < MAX_GROUP_APPENDS => {
                    merges.push((records, reply));
                }
                cmd => rest.push(cmd),
            }
        }
        *other = rest;
        merges
    }

    /// Adds the expirer's records to a batch about to be logged, if this
    /// node decides expiries now (no client waits for them).
    fn add_expiries(&mut self, resolved: &mut Vec<Resolved>, wall: u64) {
        if !self.decides_expiries() {
            return;
        }
        let ops = expiry_ops(&self.state, wall, &self.in_flight);
        self.shared
            .expiry_backlog
            .store(!ops.is_empty(), Ordering::Relaxed);
        for op in ops {
            let ts = self.clock.now(wall);
            resolved.push(Resolved::unanswered(op, ts));
        }
    }

    /// Whether this node removes expired keys and leases now: a single
    /// node and a masterless one (for itself) always; in a cluster the
    /// primary of the current epoch once its epoch's first entry is applied
    /// (it then holds everything committed before it).
    fn decides_expiries(&self) -> bool {
        if self.expiries_paused {
            return false;
        }
        match self.policy() {
            CommitPolicy::Local | CommitPolicy::Merge => true,
            CommitPolicy::Replicated => self.led.is_some_and(|(epoch, first)| {
                epoch == self.shared.epoch.load(Ordering::Acquire)
                    && self.shared.applied_index.load(Ordering::Acquire) >= first
            }),
        }
    }

    /// An idle round of the expirer: logs what is due, if anything.
    fn expire_idle(&mut self, buf: &mut Vec<u8>) {
        if self.wal.is_poisoned() || !self.decides_expiries() {
            return;
        }
        let mut resolved = Vec::new();
        self.add_expiries(&mut resolved, self.wall.now_ms());
        if !resolved.is_empty() {
            // A refusal has answered nobody to tell: the storage state says it.
            let _ = self.log_and_apply(resolved, buf);
        }
    }

    /// Logs resolved records in one durable append, then applies and
    /// acknowledges them now (at their own fsync) or once committed
    /// (replicated).
    fn log_and_apply(&mut self, resolved: Vec<Resolved>, buf: &mut Vec<u8>) -> Result<u64, String> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let entries = resolved.iter().map(|r| (epoch, r.ts, &r.op));
        let first = self.wal.next_index();
        // Once the batch is durable, so is every stamp this node has issued.
        let issued = self.clock.last();
        let appended = match self.append_durably(entries, Some(issued), buf) {
            Ok(a) => a,
            Err(e) => {
                // The view holds the batch as if logged.
                self.view = None;
                let text = e.to_string();
                self.refuse_batch(resolved, &e);
                return Err(text);
            }
        };
        self.roll_taken_again();
        if let Some(m) = &self.metrics {
            m.wal_fsync_seconds.observe(appended.fsync.as_secs_f64());
            m.wal_batch_records.observe(resolved.len() as f64);
        }
        *self.shared.hlc.lock() = issued;
        for r in &resolved {
            self.in_flight.logged(&r.op);
        }
        let requests = resolved.into_iter().enumerate();
        if self.policy() == CommitPolicy::Replicated {
            if self.led.is_none_or(|(e, _)| e != epoch) {
                self.led = Some((epoch, first));
            }
            self.commit_clock
                .written(appended.last, appended.written_at);
            // Durable here; applied and acknowledged once committed.
            for (i, r) in requests {
                self.push_pending(PendingEntry {
                    index: first + i as u64,
                    ts: r.ts,
                    op: r.op,
                    apply: r.apply,
                    reply: Some(r.reply),
                    txn: r.txn,
                });
            }
        } else {
            self.shared
                .commit_index
                .store(appended.last, Ordering::Release);
            for (i, r) in requests {
                let index = first + i as u64;
                let outcome = self.apply_entry(index, r.ts, &r.op, r.apply, r.txn.as_ref());
                let _ = r.reply.send(answer(index, outcome, r.ts));
            }
            // Nothing is pending once the batch is applied.
            self.view = None;
        }
        self.maybe_snapshot();
        Ok(appended.last)
    }

    /// Turns the batch's requests into the ops they log (see [`Resolver`]).
    fn resolve(&mut self, batch: &mut Vec<WriteReq>, stamps: &[Timestamp]) -> Vec<Resolved> {
        Resolver {
            state: &self.state,
            view: &mut self.view,
            pending: &self.pending,
            merges: self.shared.policy() == CommitPolicy::Merge,
            max_bulk_items: self.cfg.limits.max_bulk_items,
            max_data_bytes: self.cfg.max_data_bytes,
            max_leases: self.cfg.max_leases,
            first_index: self.wal.next_index(),
            stamps,
        }
        .resolve(batch)
    }

    /// Logs, once, that a new segment could be started after refusals.
    fn roll_taken_again(&mut self) {
        if self.roll_refusals > 0 {
            tracing::info!(
                refused_batches = self.roll_refusals,
                "a new WAL segment was started after refused write batches; \
                 writes are taken again"
            );
            self.roll_refusals = 0;
        }
    }

    /// Answers every write of a batch that could not be logged. Only a
    /// failed roll leaves the WAL usable; anything else refuses all later
    /// writes too (the WAL has marked the storage state).
    fn refuse_batch(&mut self, batch: Vec<Resolved>, e: &Error) {
        if let Error::SegmentUnavailable(_) = e {
            if self.roll_refusals == 0 {
                tracing::warn!(error = %e, "refusing writes until a new WAL segment can be started");
            }
            self.roll_refusals = self.roll_refusals.saturating_add(1);
            if let Some(m) = &self.metrics {
                m.wal_roll_failures_total.inc();
            }
        }
        let each = |e: &Error| match e {
            Error::SegmentUnavailable(m) => Error::SegmentUnavailable(m.clone()),
            Error::DataDirLost(m) => Error::DataDirLost(m.clone()),
            Error::Poisoned => Error::Poisoned,
            other => Error::NotDurable(other.to_string()),
        };
        for req in batch {
            let _ = req.reply.send(Err(each(e)));
        }
    }

    /// Secondary side of log shipping (see [`super::Engine::replicate`])
    /// for appends queued together: each in turn is decided by the rules
    /// against the log as the earlier ones left it (written, and with the
    /// commit index they taught), a conflicting suffix is cut, new entries
    /// are written; then ONE fsync covers them all, and only then is each
    /// answered and the commit index applied.
    fn replicate_group(&mut self, group: Vec<super::ReplicateReq>, buf: &mut Vec<u8>) {
        let started = Instant::now();
        let mut commit = self.shared.commit_index.load(Ordering::Acquire);
        let (mut records, mut appends) = (0usize, 0usize);
        let mut answers = Vec::with_capacity(group.len());
        for r in group {
            let epoch = r.req.epoch;
            let outcome = self.replicate_one(r.req, &mut commit, buf);
            if let Ok((_, n @ 1..)) = outcome {
                records += n;
                appends += 1;
            }
            answers.push((r.reply, epoch, outcome.map(|(o, _)| o)));
        }
        if appends > 0 {
            if let Err(e) = self.wal.sync() {
                tracing::error!(error = %e, "WAL fsync failed");
                for (reply, _, _) in answers {
                    let _ = reply.send(Err(Error::NotDurable(e.to_string())));
                }
                return;
            }
            self.publish_durable(self.wal.next_index() - 1, None);
            if let Some(m) = &self.metrics {
                m.wal_fsync_seconds.observe(started.elapsed().as_secs_f64());
                m.wal_batch_records.observe(records as f64);
                m.wal_appends_per_fsync.observe(appends as f64);
            }
        }
        self.advance_commit(commit);
        // After the fsync: an epoch entered meanwhile (a vote, a newer
        // primary) may have been decided on a log without these entries.
        let my_epoch = self.shared.epoch.load(Ordering::SeqCst);
        for (reply, epoch, outcome) in answers {
            let outcome = outcome.map(|o| rules::answer_after_fsync(o, epoch, my_epoch));
            let _ = reply.send(outcome);
        }
    }

    /// One append of [`Writer::replicate_group`]: decided against the
    /// written log and `commit` (the group's commit index so far, raised
    /// by an accepted append), new entries written but not fsync'd.
    /// Returns the outcome and how many entries it wrote.
    fn replicate_one(
        &mut self,
        req: ReplicateRequest,
        commit: &mut u64,
        buf: &mut Vec<u8>,
    ) -> Result<(AppendOutcome, usize), Error> {
        if self.wal.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let decision = self.check_append(&req, *commit)?;
        if let Some(e) = decision.new_epoch_to_persist {
            // The caller persisted it before handing us the request.
            self.shared.epoch.fetch_max(e, Ordering::AcqRel);
        }
        let AppendOutcome::Accept {
            truncate_from,
            append_from,
            commit: learned,
            ..
        } = decision.outcome.clone()
        else {
            return Ok((decision.outcome, 0));
        };
        if let Some(from) = truncate_from {
            self.truncate_suffix(from)?;
        }
        let new = &req.records[append_from..];
        if !new.is_empty() {
            debug_assert!(
                new.iter()
                    .zip(self.wal.next_index()..)
                    .all(|(r, i)| r.index == i),
                "the rules accept only entries that continue the log"
            );
            let entries = new.iter().map(|r| (r.epoch, r.ts, &r.op));
            self.write_entries(entries, buf)?;
            // A secondary checks no transactions; if it leads again, the
            // view is built afresh from its pending entries.
            self.view = None;
            for r in new {
                self.push_pending(PendingEntry {
                    index: r.index,
                    ts: r.ts,
                    op: r.op.clone(),
                    apply: true,
                    reply: None,
                    txn: None,
                });
            }
        }
        *commit = (*commit).max(learned.min(self.wal.next_index() - 1));
        Ok((decision.outcome, new.len()))
    }

    /// What [`rules::check_append`] says of `req` against this log.
    fn check_append(
        &self,
        req: &ReplicateRequest,
        commit: u64,
    ) -> Result<rules::AppendDecision, Error> {
        let positions: Vec<LogPos> = req
            .records
            .iter()
            .map(|r| LogPos {
                epoch: r.epoch,
                index: r.index,
            })
            .collect();
        let my_epoch = self.shared.epoch.load(Ordering::Acquire);
        let log = self.shared.log.lock();
        let request = rules::AppendRequest {
            epoch: req.epoch,
            prev: req.prev,
            entries: &positions,
            leader_commit: req.leader_commit,
        };
        Ok(rules::check_append(&*log, my_epoch, commit, &request)?)
    }

    /// Cuts the uncommitted suffix from `from` on, durably, from the WAL
    /// and the log view.
    fn truncate_suffix(&mut self, from: u64) -> Result<(), Error> {
        self.wal.truncate_from(from)?;
        self.view = None;
        // What was cut is decided again once it is due.
        self.in_flight.clear();
        self.shared.log.lock().truncate_from(from);
        self.shared.cache.lock().truncate_from(from);
        self.commit_clock.forget_from(from);
        // Our own writes in the cut suffix were never committed: their
        // clients learn that they did not happen.
        while self.pending.back().is_some_and(|p| p.index >= from) {
            if let Some(reply) = self.pending.pop_back().and_then(|p| p.reply) {
                let _ = reply.send(Err(Error::Superseded));
            }
        }
        // Written entries before `from` may not be fsync'd yet: the
        // durable index only ever moves down here.
        self.shared.last_index.fetch_min(from - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Masterless side of [`super::Engine::ingest`]: the clock observes
    /// every stamp; the items that win are appended durably and applied.
    /// A peer's records that win over what this node holds, the clock
    /// moved past each of their stamps.
    fn merge_winners(
        &mut self,
        records: &[Record],
        wall: u64,
        ahead: &mut Ahead,
    ) -> Vec<(Timestamp, Op)> {
        let mut winners = Vec::with_capacity(records.len());
        for r in records {
            self.clock.observe(r.ts, wall);
            // Judged against the records before it in this append too: the
            // same version from two batches is logged once.
            if let Some(op) = self.shared.lww.winning_after(r.ts, &r.op, ahead) {
                winners.push((r.ts, op));
            }
        }
        *self.shared.hlc.lock() = self.clock.last();
        winners
    }

    /// Merges several ingests' records as one (in their order, under one
    /// fsync) and answers each: a record's fate does not depend on which
    /// batch carried it, since every apply decides by the stamps alone.
    fn ingest_group(&mut self, group: Vec<IngestReq>, buf: &mut Vec<u8>) {
        let batches = group.len();
        let (records, replies) = split_merges(group);
        let outcome = self.ingest(records, batches, buf);
        answer_merges(replies, outcome);
    }

    fn ingest(
        &mut self,
        records: Vec<Record>,
        batches: usize,
        buf: &mut Vec<u8>,
    ) -> Result<u64, Error> {
        if self.wal.is_poisoned() {
            return Err(Error::Poisoned);
        }
        if self.policy() != CommitPolicy::Merge {
            return Err(Error::NotQuiescent(
                "this node is not in masterless mode".into(),
            ));
        }
        let wall = self.wall.now_ms();
        let winners = self.merge_winners(&records, wall, &mut Ahead::default());
        let observed = self.clock.last();
        let first = self.wal.next_index();
        if winners.is_empty() {
            *self.shared.durable_hlc.lock() = observed;
            return Ok(first - 1);
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let entries = winners.iter().map(|(ts, op)| (epoch, *ts, op));
        let appended = match self.append_durably(entries, Some(observed), buf) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "WAL write failed");
                return Err(e);
            }
        };
        if let Some(m) = &self.metrics {
            m.wal_appends_per_fsync.observe(batches as f64);
        }
        self.shared
            .commit_index
            .store(appended.last, Ordering::Release);
        for (i, (ts, op)) in winners.iter().enumerate() {
            self.apply_entry(first + i as u64, *ts, op, true, None);
        }
        self.maybe_snapshot();
        Ok(appended.last)
    }

    /// Secondary: replaces log and state with a snapshot from the primary
    /// (see [`super::Engine::install_snapshot`]).
    fn install_snapshot(&mut self, incoming: IncomingSnapshot) -> Result<u64, Error> {
        let IncomingSnapshot {
            path: tmp_path,
            meta,
            state: fresh,
        } = incoming;
        let tmp_path = tmp_path.as_path();
        let commit = self.shared.commit_index.load(Ordering::Acquire);
        if meta.last_index <= commit {
            // We already have all of it committed; nothing to do.
            let _ = self.fs.remove(tmp_path);
            return Ok(commit);
        }
        let next = meta.last_index.checked_add(1).ok_or(Error::Replication(
            rules::AppendError::Malformed("snapshot at the last index"),
        ))?;
        // Durable snapshot first; then the log restarts after it. A crash in
        // between leaves a snapshot ahead of the log, which recovery handles
        // by starting the log afresh.
        let final_path = self.snap_dir.join(snapshot::snapshot_name(meta.last_index));
        self.fs
            .rename(tmp_path, &final_path)
            .and_then(|_| self.fs.sync_dir(&self.snap_dir))
            .map_err(|e| Error::io(format!("installing {}", final_path.display()), e))?;
        self.remove_snapshots_but(&final_path)?;
        self.wal.reset(next, meta.last_epoch)?;
        self.view = None;
        self.in_flight.clear();
        for p in self.pending.drain(..) {
            if let Some(reply) = p.reply {
                let _ = reply.send(Err(Error::Superseded));
            }
        }
        let config = fresh.loaded_config();
        self.state.replace_with(fresh);
        self.restart_log_at(meta, config);
        Ok(meta.last_index)
    }

    /// Removes every snapshot but `keep` (best effort: a leftover is
    /// removed at the next start).
    fn remove_snapshots_but(&self, keep: &std::path::Path) -> Result<(), Error> {
        for (_, old) in snapshot::list(self.fs.as_ref(), &self.snap_dir)? {
            if old != keep {
                let _ = self.fs.remove(&old);
            }
        }
        Ok(())
    }

    /// After the WAL was reset to start after `base`: the log view, the
    /// indexes and the snapshot bookkeeping say so too.
    fn restart_log_at(
        &mut self,
        base: snapshot::SnapshotMeta,
        config: Option<(u64, crate::replication::config::Config)>,
    ) {
        let applied = self.shared.applied_index.load(Ordering::Acquire);
        debug_assert!(
            base.last_index >= applied,
            "WAL writer invariant: a new log base at {} would move the applied index back \
             from {applied}",
            base.last_index
        );
        *self.shared.log.lock() =
            EpochRuns::new(base.last_index, base.last_epoch).with_config(config);
        self.shared.cache.lock().clear();
        self.commit_clock.clear();
        self.first_unapplied = None;
        self.bytes_since_snapshot = 0;
        self.covered = base.last_index;
        for idx in [
            &self.shared.last_index,
            &self.shared.commit_index,
            &self.shared.applied_index,
            &self.shared.snapshot_index,
        ] {
            idx.store(base.last_index, Ordering::Release);
        }
        self.publish_wal_stats();
    }

    /// Side of [`super::Engine::rebase`] on the WAL thread.
    fn rebase(&mut self, req: Rebase) -> Result<(), Error> {
        let next = self.check_rebase(&req)?;
        self.wait_for_snapshotter()?;
        // The new mode's stamps (none when not merging) are built aside
        // and take over only once the snapshot holding them is durable: a
        // rebase that fails leaves the node as it was.
        let merges = req.policy == CommitPolicy::Merge;
        let stamps = Lww::new();
        if merges {
            stamps.seed_from_state(&self.state, req.base_ts);
        }
        let base = snapshot::SnapshotMeta {
            last_index: req.base_index,
            last_epoch: req.epoch,
        };
        let (path, _) = snapshot::write(
            self.fs.as_ref(),
            &self.snap_dir,
            &self.state,
            merges.then_some(&stamps),
            base,
            snapshot::Versions::Rebased,
            None,
        )?;
        self.shared.lww.replace_with(stamps);
        // As in the snapshot, identical on every node (docs/DESIGN.md §6.1).
        self.state.rebase_versions(req.base_index);
        self.view = None;
        self.in_flight.clear();
        self.remove_snapshots_but(&path)?;
        // Durable snapshot first, then the log restarts after it (a crash in
        // between leaves a snapshot ahead of the log, which recovery handles).
        self.wal.reset(next, req.epoch)?;
        self.shared.set_policy(req.policy);
        self.shared.epoch.fetch_max(req.epoch, Ordering::AcqRel);
        // A mode switch starts the cluster afresh from its own --peers.
        self.restart_log_at(base, None);
        let wall = self.wall.now_ms();
        self.clock.observe(req.base_ts, wall);
        *self.shared.hlc.lock() = self.clock.last();
        {
            let mut d = self.shared.durable_hlc.lock();
            *d = (*d).max(req.base_ts);
        }
        self.shared.durable_changed.notify_waiters();
        Ok(())
    }

    /// Refuses a rebase unless every logged entry is applied and the base
    /// is at or past the last index; the index the log restarts at.
    fn check_rebase(&self, req: &Rebase) -> Result<u64, Error> {
        if self.wal.is_poisoned() {
            return Err(Error::Poisoned);
        }
        if !self.pending.is_empty() {
            return Err(Error::NotQuiescent(format!(
                "{} logged entries are not committed yet",
                self.pending.len()
            )));
        }
        let last = self.wal.next_index() - 1;
        if req.base_index < last {
            return Err(Error::NotQuiescent(format!(
                "base index {} is behind this node's last index {last}",
                req.base_index
            )));
        }
        req.base_index.checked_add(1).ok_or_else(|| {
            Error::NotQuiescent("a base index of 2^64-1 leaves no index for the next entry".into())
        })
    }

    /// Waits (up to two minutes) until the snapshot thread is not writing,
    /// so that it does not write concurrently with a rebase.
    fn wait_for_snapshotter(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.shared.snapshot_running.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return Err(Error::NotQuiescent(
                    "a snapshot is still being written".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Makes the WAL's size visible to `/v1/status` and metrics.
    fn publish_wal_stats(&self) {
        self.shared
            .wal_bytes
            .store(self.wal.total_bytes(), Ordering::Relaxed);
        self.shared
            .wal_segments
            .store(self.wal.segment_count() as u64, Ordering::Relaxed);
    }

    fn maybe_snapshot(&mut self) {
        if self.bytes_since_snapshot < self.cfg.snapshot_every_bytes
            || self.shared.snapshot_running.load(Ordering::Acquire)
        {
            return;
        }
        let applied = self.shared.applied_index.load(Ordering::Acquire);
        let upto = match self.first_unapplied {
            Some(i) => applied.min(i - 1),
            None => applied,
        };
        if upto <= self.shared.snapshot_index.load(Ordering::Relaxed) {
            return;
        }
        self.shared.snapshot_running.store(true, Ordering::Release);
        // The lease section holds the leases of the snapshot's last index.
        self.state.freeze_leases(upto);
        let meta = snapshot::SnapshotMeta {
            last_index: upto,
            // The epoch of the snapshot's own last entry: a secondary
            // matches logs against it after compaction.
            last_epoch: self
                .shared
                .log
                .lock()
                .epoch_at(upto)
                .unwrap_or_else(|| self.wal.last_epoch()),
        };
        if self.snap_tx.try_send(meta).is_ok() {
            self.bytes_since_snapshot = 0;
        } else {
            self.shared.snapshot_running.store(false, Ordering::Release);
        }
    }

    /// Removes the segments the newest durable snapshot covers. A segment
    /// is removable only once the next one exists: the one a snapshot
    /// covers may still be the active segment (a snapshot is taken at the
    /// segment size, the roll comes at the next append), so the covered
    /// index is kept and tried again every round until it is.
    fn compact(&mut self) {
        while let Ok(upto) = self.compact_rx.try_recv() {
            self.covered = self.covered.max(upto);
        }
        if self.covered == 0 || self.wal.segment_count() < 2 {
            return;
        }
        match self.wal.remove_covered(self.covered) {
            Ok(0) => {}
            Ok(_) => {
                // Entries gone from the WAL can only reach a peer by
                // snapshot: say so to the catch-up rules.
                let first = self.wal.first_index();
                self.shared.log.lock().compact_to(first.saturating_sub(1));
                self.publish_wal_stats();
            }
            Err(e) => {
                let upto = self.covered;
                tracing::warn!(upto, error = %e, "WAL compaction failed (will retry later)")
            }
        }
    }
}

/// A write's answer: its result, or the error of a record the state
/// refused (it changed nothing).
fn answer(index: u64, outcome: ApplyOutcome, ts: Timestamp) -> Result<WriteResult, Error> {
    match outcome.refused {
        Some(Refusal::LeaseNotFound(id)) => Err(Error::LeaseNotFound(id)),
        None => Ok(WriteResult { index, outcome, ts }),
    }
}

/// The snapshot thread.
pub(super) struct Snapshotter {
    pub fs: Arc<dyn Fs>,
    pub dir: PathBuf,
    pub state: Arc<State>,
    pub shared: Arc<Shared>,
    pub metrics: Option<Arc<Metrics>>,
    pub compact_tx: std_mpsc::Sender<u64>,
}

impl Snapshotter {
    pub fn run(self, rx: std_mpsc::Receiver<snapshot::SnapshotMeta>) {
        while let Ok(meta) = rx.recv() {
            let started = Instant::now();
            match self.take(meta) {
                Ok(()) => {
                    self.shared
                        .snapshot_index
                        .store(meta.last_index, Ordering::Release);
                    if let Some(m) = &self.metrics {
                        m.snapshots_total.inc();
                        m.snapshot_seconds.observe(started.elapsed().as_secs_f64());
                    }
                    let _ = self.compact_tx.send(meta.last_index);
                }
                Err(e) => tracing::error!(index = meta.last_index, error = %e, "snapshot failed"),
            }
            self.shared.snapshot_running.store(false, Ordering::Release);
        }
    }

    fn take(&self, meta: snapshot::SnapshotMeta) -> Result<(), Error> {
        let merges = self.shared.policy() == CommitPolicy::Merge;
        let stamps = merges.then_some(&*self.shared.lww);
        // The configuration in effect at the snapshot's index: the log
        // view holds it until the WAL this snapshot covers is removed.
        let config = self.shared.log.lock().config_at(meta.last_index);
        let (path, _size) = snapshot::write(
            self.fs.as_ref(),
            &self.dir,
            &self.state,
            stamps,
            meta,
            snapshot::Versions::Kept,
            config.as_ref(),
        )?;
        // Older snapshots are now redundant; the WAL they needed goes too.
        for (_, old) in snapshot::list(self.fs.as_ref(), &self.dir)? {
            if old != path {
                self.fs
                    .remove(&old)
                    .map_err(|e| Error::io(format!("removing {}", old.display()), e))?;
            }
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(format!("fsync of {}", self.dir.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_clock_times_each_batch_once_and_forgets_cut_ones() {
        let mut clock = CommitClock::default();
        let t = Instant::now();
        for last in [3, 7, 12] {
            clock.written(last, t);
        }
        let mut seen = 0;
        clock.committed(8, |_| seen += 1);
        assert_eq!(seen, 2, "the batches ending at 3 and 7");
        clock.committed(8, |_| seen += 1);
        assert_eq!(seen, 2, "each batch is timed once");
        clock.forget_from(10);
        clock.committed(u64::MAX, |_| seen += 1);
        assert_eq!(seen, 2, "the batch ending at 12 was cut");
    }

    #[test]
    fn the_commit_clock_is_bounded() {
        let mut clock = CommitClock::default();
        let t = Instant::now();
        for last in 1..=(COMMIT_CLOCK_BATCHES as u64 + 10) {
            clock.written(last, t);
        }
        assert_eq!(clock.batches.len(), COMMIT_CLOCK_BATCHES);
        let mut seen = 0;
        clock.committed(u64::MAX, |_| seen += 1);
        assert_eq!(seen, COMMIT_CLOCK_BATCHES);
    }
}
