//! The engine's two threads: the WAL writer ([`Writer`]: batches, fsyncs,
//! applies, replies; every WAL file operation happens here) and the
//! snapshotter ([`Snapshotter`]: writes snapshots in the background and
//! hands compaction back to the writer).
//!
//! Every record reaches the log through one path,
//! [`Writer::append_durably`] (frame, write, fsync, mark the storage state
//! on failure, make the entries part of the log view, notify): client
//! writes ([`Writer::commit`]), a primary's entries
//! ([`Writer::replicate`]) and peers' merged writes ([`Writer::ingest`])
//! differ only in what they append and when they apply it, which the
//! [`CommitPolicy`] decides.
//!
//! # Invariants (checked with `debug_assert!`)
//!
//! - commit index <= last index;
//! - the applied index never decreases;
//! - pending entries (durable, waiting for their commit) are in strictly
//!   ascending index order, all after the commit index.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::fs::Fs;
use super::log_index::EpochRuns;
use super::lww::Lww;
use super::record::{self, Record};
use super::state::{self, ApplyOutcome, State};
use super::{
    snapshot, wal, Cmd, CommitPolicy, EngineConfig, Error, IncomingSnapshot, Rebase,
    ReplicateRequest, Shared, WriteReq, WriteResult,
};
use crate::masterless::hlc::{Hlc, WallClock};
use crate::metrics::Metrics;
use crate::model::{Op, Timestamp};
use crate::replication::rules::{self, AppendOutcome, LogPos};

/// A durable entry waiting for its commit (replicated mode).
pub(super) struct PendingEntry {
    pub index: u64,
    pub ts: Timestamp,
    pub op: Op,
    pub apply: bool,
    pub reply: Option<oneshot::Sender<Result<WriteResult, Error>>>,
}

/// One entry on its way into the log: its epoch, stamp and op.
type Entry<'a> = (u64, Timestamp, &'a Op);

/// What [`Writer::append_durably`] made durable.
struct Appended {
    last: u64,
    /// The write and fsync took this long.
    fsync: Duration,
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
    /// The current mode's commit policy (a mode switch changes it, see
    /// [`Writer::rebase`]).
    pub policy: CommitPolicy,
    pub bytes_since_snapshot: u64,
    /// Lowest index logged but deliberately not applied (`debug_flaky`);
    /// snapshots must not claim to cover it.
    pub first_unapplied: Option<u64>,
    /// Replicated mode: durable entries not yet known to be committed.
    pub pending: VecDeque<PendingEntry>,
    /// Batches refused in a row because no new segment could be started
    /// (logged when it starts and when it ends, not once per batch).
    pub roll_refusals: u64,
    pub fs: Arc<dyn Fs>,
    pub snap_dir: PathBuf,
    pub snap_tx: std_mpsc::SyncSender<snapshot::SnapshotMeta>,
    pub compact_rx: std_mpsc::Receiver<u64>,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<WriteReq> = Vec::with_capacity(self.cfg.max_batch_records);
        let mut other: Vec<Cmd> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            self.gather(&mut rx, first, &mut batch, &mut other);
            if !batch.is_empty() {
                self.commit(&mut batch, &mut buf);
            }
            for cmd in other.drain(..) {
                self.handle(cmd, &mut buf);
            }
            self.compact();
            // Off the reply path: the next roll then needs no new file.
            let _ = self.wal.prepare_spare();
            self.check_invariants();
        }
        // The channel is closed and drained: every reply went out after its
        // fsync, so there is nothing left to flush.
    }

    /// Group commit: takes `first` and every write already queued (up to
    /// the batch limits) into `batch`; anything else goes to `other`, to
    /// wait until the batch is durable.
    fn gather(
        &self,
        rx: &mut mpsc::Receiver<Cmd>,
        first: Cmd,
        batch: &mut Vec<WriteReq>,
        other: &mut Vec<Cmd>,
    ) {
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Write(req) => {
                    bytes += req.op.encoded_len();
                    batch.push(req);
                }
                cmd => other.push(cmd),
            }
            if batch.len() < self.cfg.max_batch_records && bytes < self.cfg.max_batch_bytes {
                next = rx.try_recv().ok();
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
            Cmd::Commit { index, epoch } => {
                if epoch == self.shared.epoch.load(Ordering::Acquire) {
                    self.advance_commit(index)
                }
            }
            Cmd::Replicate(r) => {
                let outcome = self.replicate(r.req, buf);
                let _ = r.reply.send(outcome);
            }
            Cmd::ReadFrom {
                from,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.wal.read_from(from, max_bytes));
            }
            Cmd::InstallSnapshot { snapshot, reply } => {
                let _ = reply.send(self.install_snapshot(snapshot));
            }
            Cmd::Ingest { records, reply } => {
                let _ = reply.send(self.ingest(records, buf));
            }
            Cmd::Rebase { req, reply } => {
                let _ = reply.send(self.rebase(req));
            }
            Cmd::Tick => self.tick(),
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

    /// The one way records enter the log: frames `entries` (contiguous
    /// from the WAL's next index) into one write, fsyncs it, and only then
    /// makes them part of the log: recorded in the log view (and the ship
    /// cache, in a cluster), the last index published, waiters notified.
    /// On failure nothing of them counts, and the storage state says why
    /// (the WAL marks it where it failed).
    fn append_durably<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a>> + Clone,
        buf: &mut Vec<u8>,
    ) -> Result<Appended, Error> {
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
        let fsync_started = Instant::now();
        self.wal
            .append(first, count, buf, last_epoch)
            .and_then(|_| self.wal.sync())?;
        let fsync = fsync_started.elapsed();
        self.remember(first, entries);
        let last = first + count - 1;
        self.shared.last_index.store(last, Ordering::Release);
        self.bytes_since_snapshot += buf.len() as u64;
        self.publish_wal_stats();
        self.shared.durable_changed.notify_waiters();
        Ok(Appended { last, fsync })
    }

    /// Records newly durable entries in the in-memory log view: their
    /// epochs always, the entries themselves when this node ships them.
    fn remember<'a>(&mut self, first: u64, entries: impl Iterator<Item = Entry<'a>>) {
        let mut log = self.shared.log.lock();
        let mut cache = self.policy.ships().then(|| self.shared.cache.lock());
        for (i, (epoch, ts, op)) in entries.enumerate() {
            let index = first + i as u64;
            log.push(index, epoch);
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

    /// Queues a durable entry for its commit.
    fn push_pending(&mut self, entry: PendingEntry) {
        debug_assert!(
            self.pending.back().is_none_or(|p| p.index < entry.index),
            "WAL writer invariant: pending entries ascend ({:?} then {})",
            self.pending.back().map(|p| p.index),
            entry.index
        );
        self.pending.push_back(entry);
    }

    /// Replicated mode: applies pending entries up to the commit index.
    fn advance_commit(&mut self, index: u64) {
        let last = self.wal.next_index() - 1;
        let commit = index.min(last);
        let old = self.shared.commit_index.fetch_max(commit, Ordering::AcqRel);
        if commit <= old {
            return;
        }
        while self.pending.front().is_some_and(|p| p.index <= commit) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let outcome = self.apply_entry(p.index, p.ts, &p.op, p.apply);
            if let Some(reply) = p.reply {
                let _ = reply.send(Ok(WriteResult {
                    index: p.index,
                    outcome,
                    ts: p.ts,
                }));
            }
        }
        self.maybe_snapshot();
    }

    fn apply_entry(&mut self, index: u64, ts: Timestamp, op: &Op, apply: bool) -> ApplyOutcome {
        let outcome = match (apply, self.policy) {
            (true, CommitPolicy::Merge) => self.shared.lww.apply(&self.state, ts, op),
            (true, _) => self.state.apply(op),
            (false, _) => {
                self.first_unapplied.get_or_insert(index);
                ApplyOutcome::default()
            }
        };
        let before = self.shared.applied_index.swap(index, Ordering::AcqRel);
        debug_assert!(
            index > before,
            "WAL writer invariant: the applied index went from {before} to {index}"
        );
        outcome
    }

    /// Client writes: logged in one durable append, then applied and
    /// acknowledged now (at their own fsync) or once committed (replicated).
    fn commit(&mut self, batch: &mut Vec<WriteReq>, buf: &mut Vec<u8>) {
        self.refuse_over_memory(batch);
        if batch.is_empty() {
            return;
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let wall = self.wall.now_ms();
        let stamps: Vec<Timestamp> = batch.iter().map(|_| self.clock.now(wall)).collect();
        let entries = batch
            .iter()
            .zip(&stamps)
            .map(|(req, ts)| (epoch, *ts, &req.op));
        let first = self.wal.next_index();
        let appended = match self.append_durably(entries, buf) {
            Ok(a) => a,
            Err(e) => return self.refuse_batch(batch, &e),
        };
        self.roll_taken_again();
        if let Some(m) = &self.metrics {
            m.wal_fsync_seconds.observe(appended.fsync.as_secs_f64());
            m.wal_batch_records.observe(batch.len() as f64);
        }
        *self.shared.hlc.lock() = self.clock.last();
        // Every stamp this node has issued is now durable.
        *self.shared.durable_hlc.lock() = self.clock.last();
        let requests = batch.drain(..).zip(stamps).enumerate();
        if self.policy == CommitPolicy::Replicated {
            // Durable here; applied and acknowledged once committed.
            for (i, (req, ts)) in requests {
                self.push_pending(PendingEntry {
                    index: first + i as u64,
                    ts,
                    op: req.op,
                    apply: req.apply,
                    reply: Some(req.reply),
                });
            }
        } else {
            self.shared
                .commit_index
                .store(appended.last, Ordering::Release);
            for (i, (req, ts)) in requests {
                let index = first + i as u64;
                let outcome = self.apply_entry(index, ts, &req.op, req.apply);
                let _ = req.reply.send(Ok(WriteResult { index, outcome, ts }));
            }
        }
        self.maybe_snapshot();
    }
}
