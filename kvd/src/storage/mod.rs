//! The storage engine: WAL + in-memory state + snapshots.
//!
//! # Contract
//!
//! - A write is acknowledged (its future resolves `Ok`) only after the
//!   fdatasync that covers its WAL record has returned. Concurrent writes
//!   share one fdatasync (group commit).
//! - The in-memory state reflects only durable records, applied in log order
//!   by one function, [`State::apply`], on one thread (the WAL writer).
//! - Recovery replays the newest snapshot plus the WAL after it, cuts a torn
//!   tail (an unacknowledged write), and refuses to start on damage anywhere
//!   else, naming the file and offset.
//! - After a failed write or fsync the engine is poisoned and refuses writes;
//!   so it does once its data dir is removed or replaced under it (checked
//!   at every segment roll and by [`Engine::check_data_dir`]). Either lasts
//!   until a restart; [`StorageState`] says which. A segment roll that fails
//!   before any record reached the new segment only refuses its batch
//!   ([`Error::SegmentUnavailable`]).
//! - With `EngineConfig::max_data_bytes`, a local write that would grow the
//!   data set ([`State::data_bytes`]) past it is refused before it is logged
//!   ([`Error::MemoryFull`]); deletes and shrinking writes always pass.
//! - Replicated mode ([`CommitPolicy::Replicated`]): a durable
//!   entry is applied, and its write acknowledged, only when
//!   [`Engine::commit_to`] reaches it; a secondary takes the primary's
//!   entries through [`Engine::replicate`], which follows
//!   `replication::rules::check_append` and may cut an uncommitted suffix
//!   (whose waiting writers get [`Error::Superseded`]). After a restart,
//!   entries past the snapshot wait for the primary's commit index.
//! - Replicated mode, written before durable: a batch is in the log view
//!   and the ship cache from its write(2) on ([`Engine::written_notify`],
//!   [`Engine::written_last_index`]), so it can be shipped while its fsync
//!   runs; [`Engine::last_log_pos`] and the commit index speak of the
//!   durable log only, and nothing past it is applied or acknowledged.
//!
//! Threads (`writer.rs`): the WAL writer owns the log and applies; the
//! snapshotter writes snapshots in the background and hands compaction
//! back to the writer, so every WAL file operation happens on one thread.
//! One [`Health`] flag says whether the engine takes writes: the WAL sets
//! it where a failure happens, everyone else reads it.

pub mod backup;
pub mod expiry;
pub mod fs;
mod health;
pub mod keyspace;
pub mod log_index;
pub mod lww;
pub mod meta;
pub mod pending_view;
pub mod record;
mod resolve;
pub mod snapshot;
pub mod state;
mod syncer;
pub mod wal;
pub mod watch;
mod writer;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

pub use crate::model::{Item, KeyMeta, KeyRange, LeaseInfo, Page, RangeRead, Txn};
pub use fs::{Fs, RealFs};
pub use meta::{Meta, MetaStore};
pub use record::{Op, Record, Timestamp};
pub use state::{ApplyOutcome, State};

pub use health::Health;
use kvproto::Mode;

use crate::masterless::hlc::{Hlc, WallClock};
use crate::metrics::Metrics;
use crate::replication::rules::{self, AppendOutcome, LogPos, LogView};
use log_index::{EpochRuns, LogCache};
use lww::Lww;
use resolve::PendingEntry;
use writer::{Snapshotter, Writer};

/// Longest key, in bytes (docs/DESIGN.md §2).
pub use kvproto::MAX_KEY_BYTES;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data in {file} at offset {offset}: {reason}")]
    Corruption {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("cannot decode record: {0}")]
    Decode(String),
    #[error("the WAL refused further writes after an I/O failure; restart kvd to recover")]
    Poisoned,
    #[error(
        "the data dir was removed or replaced under this node ({0}); it refuses writes, \
         which would go to files no restart reads: stop this kvd, then restore the data dir"
    )]
    DataDirLost(String),
    #[error("no new WAL segment could be started ({0}); the write was not logged: retry it")]
    SegmentUnavailable(String),
    #[error(
        "the data set would grow to {would_be} bytes, past the --max-memory-mib budget of \
         {limit} bytes; the write was not logged (deletes are still taken)"
    )]
    MemoryFull { would_be: u64, limit: u64 },
    #[error("write not durable: {0}")]
    NotDurable(String),
    #[error("the storage engine is shutting down")]
    ShuttingDown,
    #[error("the write was logged but a newer primary's log replaced it; it was not applied")]
    Superseded,
    #[error("invalid replication request: {0}")]
    Replication(#[from] rules::AppendError),
    #[error("cannot change mode now: {0}")]
    NotQuiescent(String),
    /// A record from a peer that no client write could carry (see
    /// [`record::validate_op`]); nothing of its batch was logged.
    #[error("invalid entry from a peer: {0}")]
    InvalidEntry(String),
    /// A timestamp from elsewhere too far ahead of this node's wall clock
    /// (see [`EngineConfig::max_clock_offset_ms`]); nothing was logged.
    #[error("{0}")]
    StampOutOfRange(String),
    /// A write naming a lease that is not alive at its record's index
    /// (never granted, revoked or expired): the record changed nothing.
    #[error("lease {0} not found (never granted, revoked or expired)")]
    LeaseNotFound(u64),
    /// A grant past `--max-leases` live leases.
    #[error("{live} leases are alive, the --max-leases limit; revoke some or raise it")]
    TooManyLeases { live: u64 },
}

impl Error {
    pub fn io(context: String, source: std::io::Error) -> Self {
        Error::Io { context, source }
    }

    /// Damage to data on disk, as opposed to an operational failure.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. } | Error::Decode(_))
    }
}

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_max_bytes: u64,
    /// A snapshot is taken after this many WAL bytes since the last one.
    pub snapshot_every_bytes: u64,
    /// Most records one group commit takes (bounds latency of a batch).
    pub max_batch_records: usize,
    /// Most payload bytes one group commit takes.
    pub max_batch_bytes: usize,
    /// Writes waiting for the WAL writer; senders wait when it is full.
    pub queue_capacity: usize,
    /// Epoch stamped on new records (replication raises it).
    pub epoch: u64,
    /// Node tag in HLC timestamps.
    pub node_tag: u32,
    /// When a durable entry commits, and how it is applied (a mode
    /// switch changes it, see [`Engine::rebase`]).
    pub policy: CommitPolicy,
    /// Recent records kept in memory for shipping to peers.
    pub log_cache_bytes: usize,
    /// The wall clock under the hybrid logical clock (with its test offset).
    pub wall: WallClock,
    /// `--index`: the search index the state keeps in step (docs/DESIGN.md §7).
    pub index: Option<Arc<crate::index::Index>>,
    /// What a client write may carry; records from peers are held to it.
    pub limits: record::Limits,
    /// Masterless: how far a peer's stamp may be ahead of our wall clock
    /// (`--max-clock-offset-ms`). A stamp far in the future would win
    /// every later write to its key, and one near 2^64 would leave the
    /// clock no room to grow.
    pub max_clock_offset_ms: u64,
    /// `--max-memory-mib`: local writes that would grow the data set
    /// ([`State::data_bytes`]) past this many bytes are refused.
    pub max_data_bytes: Option<u64>,
    /// `--max-leases`: a grant past this many live leases is refused.
    pub max_leases: u64,
    /// `--watch-cache-mib` in bytes: the events kept for watches.
    pub watch_cache_bytes: usize,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            segment_max_bytes: 64 << 20,
            snapshot_every_bytes: 64 << 20,
            max_batch_records: 4096,
            max_batch_bytes: 16 << 20,
            queue_capacity: 8192,
            epoch: 1,
            node_tag: 0,
            policy: CommitPolicy::Local,
            log_cache_bytes: 64 << 20,
            wall: WallClock::default(),
            index: None,
            limits: record::Limits::default(),
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            max_data_bytes: None,
            max_leases: 100_000,
            watch_cache_bytes: 32 << 20,
        }
    }
}

/// When a durable entry commits (is applied, and its write acknowledged),
/// and how it is applied: the storage side of the cluster [`Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitPolicy {
    /// A single node: an entry commits at its own fsync.
    #[default]
    Local,
    /// Replicated mode: a durable entry commits only once
    /// [`Engine::commit_to`] reaches it (durable on a majority); a
    /// secondary takes the primary's entries through [`Engine::replicate`].
    Replicated,
    /// Masterless mode: an entry commits at its own fsync and is merged
    /// last-write-wins by its timestamp (see [`lww`]); peers' writes
    /// arrive through [`Engine::ingest`].
    Merge,
}

impl CommitPolicy {
    const ALL: [CommitPolicy; 3] = [
        CommitPolicy::Local,
        CommitPolicy::Replicated,
        CommitPolicy::Merge,
    ];

    /// Whether durable entries are kept in memory for shipping to peers.
    pub fn ships(self) -> bool {
        self != CommitPolicy::Local
    }
}

impl From<Mode> for CommitPolicy {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Single => CommitPolicy::Local,
            Mode::PrimarySecondary => CommitPolicy::Replicated,
            Mode::Masterless => CommitPolicy::Merge,
        }
    }
}

/// Default of `--max-clock-offset-ms`: far above what synchronised clocks
/// differ by, and above the clock faults the tests inject (10 s).
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 60_000;

/// Result of one acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    pub index: u64,
    pub outcome: ApplyOutcome,
    /// The write's hybrid-logical-clock stamp (its last-write-wins order in
    /// masterless mode; zero for entries applied at a primary's commit).
    pub ts: Timestamp,
}

/// A point-in-time view of the engine for `/v1/status` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStatus {
    pub last_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub keys: u64,
    pub wal_bytes: u64,
    pub wal_segments: u64,
    /// Refusing writes for a storage reason: `storage_state` is not `Ok`.
    pub poisoned: bool,
    pub storage_state: StorageState,
    /// What went wrong, when `storage_state` is not `Ok`.
    pub storage_detail: Option<String>,
    /// The data set as `--max-memory-mib` counts it.
    pub data_set_bytes: u64,
    pub max_data_bytes: Option<u64>,
    /// Live keys with a deadline or a lease.
    pub keys_with_ttl: u64,
    /// Keys removed by expiry since the node started.
    pub expired_keys: u64,
    /// Live leases.
    pub leases: u64,
}

/// Whether the engine takes writes, and if not, why (the wire type of
/// `/v1/status`).
pub use kvproto::status::StorageState;

/// Resolves when a submitted write is durable and applied.
pub type Pending = oneshot::Receiver<Result<WriteResult, Error>>;

/// Work for the WAL thread.
enum Cmd {
    Write(WriteReq),
    Replicate(ReplicateReq),
    /// Commit through `index`, as counted by the primary of `epoch`.
    Commit {
        index: u64,
        epoch: u64,
    },
    ReadFrom {
        from: u64,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<Record>, Error>>,
    },
    InstallSnapshot {
        snapshot: Box<IncomingSnapshot>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Masterless: a peer's writes (or anti-entropy repairs), merged.
    Ingest {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Mode switch: restart the log at a common base (see [`Engine::rebase`]).
    Rebase {
        req: Rebase,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Masterless: move the clock to the wall clock's time, so an idle
    /// node's durable clock (and the global stable time) still advances.
    Tick,
    /// The fsync thread is done (its outcome is with it, see `syncer`).
    Synced,
    /// The expirer's wake-up when no write comes (every 100 ms): log what
    /// is due, if this node decides expiries.
    ExpiryTick,
    /// See [`Engine::pause_expiries`].
    PauseExpiries {
        paused: bool,
        reply: oneshot::Sender<()>,
    },
    /// Masterless: forget tombstones older than the global stable time.
    Purge {
        before: Timestamp,
        reply: oneshot::Sender<u64>,
    },
    /// See [`Engine::check_data_dir`].
    CheckDataDir {
        reply: oneshot::Sender<StorageState>,
    },
}

/// A mode switch's common log base: every node of the cluster makes its
/// (identical) contents a snapshot at `base_index` in `epoch`, and its log
/// restarts after it, committing by `policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebase {
    pub policy: CommitPolicy,
    pub base_index: u64,
    pub epoch: u64,
    /// Masterless: the stamp every key gets (equal on every node).
    pub base_ts: Timestamp,
}

/// Entries from the primary, for a secondary's log.
pub struct ReplicateRequest {
    /// The sender's epoch (the caller has already persisted it if newer).
    pub epoch: u64,
    pub prev: LogPos,
    /// Contiguous from `prev.index + 1`.
    pub records: Vec<Record>,
    pub leader_commit: u64,
}

struct ReplicateReq {
    req: ReplicateRequest,
    reply: oneshot::Sender<Result<AppendOutcome, Error>>,
}

/// What a client asks the WAL writer to log.
enum Write {
    Op(Op),
    /// Resolved by the writer into the `Op::Txn` of the branch it chose.
    Txn(Txn),
}

impl Write {
    /// About the payload bytes it will log (for batch sizing).
    fn len_hint(&self) -> usize {
        match self {
            Write::Op(op) => op.encoded_len(),
            Write::Txn(t) => {
                let branch =
                    |ops: &[crate::model::TxnOp]| Op::Txn { ops: ops.to_vec() }.encoded_len();
                branch(&t.success).max(branch(&t.failure))
            }
        }
    }
}

struct WriteReq {
    write: Write,
    /// False for `debug_flaky`: durable in the WAL but kept out of memory.
    apply: bool,
    reply: oneshot::Sender<Result<WriteResult, Error>>,
}

/// Counters shared between the engine's threads and readers.
struct Shared {
    /// Epoch stamped on new local records (raised by a promotion).
    epoch: AtomicU64,
    commit_index: AtomicU64,
    /// Woken whenever the durable last index moves (replication recomputes
    /// the commit index then).
    durable_changed: tokio::sync::Notify,
    /// Woken whenever entries are written (write(2), before their fsync)
    /// into the log view and the ship cache: a primary's shippers send
    /// them while the fsync runs.
    written_changed: tokio::sync::Notify,
    /// The epochs of the written log (it may run ahead of `last_index` by
    /// the batch being fsync'd, or for good once the WAL is poisoned).
    log: parking_lot::Mutex<EpochRuns>,
    /// Recent written entries, for shipping (replicated mode ships them
    /// before their fsync; masterless only once durable).
    cache: parking_lot::Mutex<LogCache>,
    /// The durable last index: what votes, commit counting and
    /// acknowledgements speak of.
    last_index: AtomicU64,
    applied_index: AtomicU64,
    snapshot_index: AtomicU64,
    wal_bytes: AtomicU64,
    wal_segments: AtomicU64,
    /// The storage state; the WAL sets it where a failure happens.
    health: Arc<Health>,
    snapshot_running: AtomicBool,
    /// The expirer's last round found work (there may be more): the idle
    /// wake-ups come quickly until one finds none.
    expiry_backlog: AtomicBool,
    /// The [`CommitPolicy`] (as `u8`): set by the WAL thread, and changed
    /// only by a mode switch.
    policy: AtomicU8,
    /// Last-write-wins stamps and tombstones (empty unless masterless).
    lww: Arc<Lww>,
    /// The clock's latest timestamp, for status.
    hlc: parking_lot::Mutex<Timestamp>,
    /// Largest timestamp of a durable record, published after
    /// `last_index` (see [`Engine::durable_hlc`]).
    durable_hlc: parking_lot::Mutex<Timestamp>,
}

impl Shared {
    fn policy(&self) -> CommitPolicy {
        CommitPolicy::ALL[usize::from(self.policy.load(Ordering::Acquire))]
    }

    fn set_policy(&self, policy: CommitPolicy) {
        self.policy.store(policy as u8, Ordering::Release);
    }
}

/// A snapshot from the primary, loaded and checked ([`Engine::verify_snapshot`])
/// but not installed yet.
pub struct IncomingSnapshot {
    path: PathBuf,
    pub meta: snapshot::SnapshotMeta,
    state: State,
}

/// The storage engine handle. Cheap to share behind an `Arc`.
pub struct Engine {
    fs: Arc<dyn Fs>,
    /// Rules for records from peers (see [`Engine::check_entries`]).
    limits: record::Limits,
    wall: WallClock,
    max_clock_offset_ms: u64,
    snap_dir: PathBuf,
    max_data_bytes: Option<u64>,
    state: Arc<State>,
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    /// Dropped at shutdown: ends the expiry ticker's wait at once (else
    /// every shutdown would wait out its tick).
    expiry_stop: Mutex<Option<std_mpsc::Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What [`Engine::open`] found on disk.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub snapshot_index: u64,
    pub records_replayed: u64,
    pub truncated_bytes: u64,
    /// Zeros written ahead of the last record, cut (not a torn write).
    pub zeros_cut: u64,
    pub keys: u64,
    pub duration: Duration,
}

impl Engine {
    /// Recovers the data dir and starts the writer and snapshot threads.
    pub fn open(
        fs: Arc<dyn Fs>,
        cfg: EngineConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<(Engine, OpenReport), Error> {
        let started = Instant::now();
        let snap_dir = cfg.data_dir.join("snap");
        let state = Arc::new(State::with_index(cfg.index.clone()));
        state.watch().set_budget(cfg.watch_cache_bytes);
        let lww = Arc::new(Lww::new());
        let stamps = (cfg.policy == CommitPolicy::Merge).then_some(&*lww);
        let snap = recover_snapshot(fs.as_ref(), &snap_dir, &state, stamps)?;
        // Watches start after the snapshot: the replay fills the hub from there.
        state.watch().reset(snap.last_index + 1);
        let Recovered {
            log,
            view,
            cache,
            report: replayed,
        } = replay_wal(&fs, &cfg, snap, &state, &lww)?;
        let report = OpenReport {
            snapshot_index: snap.last_index,
            records_replayed: replayed.records_replayed,
            truncated_bytes: replayed.truncated_bytes,
            zeros_cut: replayed.zeros_cut,
            keys: state.len(),
            duration: started.elapsed(),
        };
        let shared = Arc::new(Shared::recovered(&cfg, &log.wal, view, cache, snap, lww));
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let ticks = tx.downgrade();
        let (expiry_stop, stop) = std_mpsc::channel();
        let channels = (rx, ticks, stop);
        let threads = start_threads(&fs, &cfg, metrics, &state, &shared, log, channels)?;
        Ok((
            Engine {
                fs,
                limits: cfg.limits,
                wall: cfg.wall.clone(),
                max_clock_offset_ms: cfg.max_clock_offset_ms,
                snap_dir,
                max_data_bytes: cfg.max_data_bytes,
                state,
                shared,
                tx: Mutex::new(Some(tx)),
                expiry_stop: Mutex::new(Some(expiry_stop)),
                threads: Mutex::new(threads),
            },
            report,
        ))
    }

    /// Logs `op`, waits for it to be durable, applies it (unless `apply` is
    /// false: the `debug_flaky` simulation of a crash between log and apply).
    pub async fn write(&self, op: Op, apply: bool) -> Result<WriteResult, Error> {
        let rx = self.submit(op, apply).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Queues a write; the receiver resolves once it is durable and applied.
    pub async fn submit(&self, op: Op, apply: bool) -> Result<Pending, Error> {
        let (tx, req, rx) = self.prepare(Write::Op(op), apply)?;
        tx.send(req).await.map_err(|_| Error::ShuttingDown)?;
        Ok(rx)
    }

    /// Blocking form of [`Engine::write`] for callers outside a runtime.
    pub fn write_blocking(&self, op: Op, apply: bool) -> Result<WriteResult, Error> {
        let (tx, req, rx) = self.prepare(Write::Op(op), apply)?;
        tx.blocking_send(req).map_err(|_| Error::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| Error::ShuttingDown)?
    }

    /// Blocking form of [`Engine::write_txn`].
    pub fn write_txn_blocking(&self, txn: Txn) -> Result<WriteResult, Error> {
        let (tx, req, rx) = self.prepare(Write::Txn(txn), true)?;
        tx.blocking_send(req).map_err(|_| Error::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| Error::ShuttingDown)?
    }

    /// Refuses early when poisoned or shutting down; otherwise a request and
    /// the channel to send it on.
    fn prepare(
        &self,
        write: Write,
        apply: bool,
    ) -> Result<(mpsc::Sender<Cmd>, Cmd, Pending), Error> {
        if let Some(e) = self.shared.health.refusal() {
            return Err(e);
        }
        let tx = self.tx.lock().clone().ok_or(Error::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        Ok((
            tx,
            Cmd::Write(WriteReq {
                write,
                apply,
                reply,
            }),
            rx,
        ))
    }

    fn sender(&self) -> Result<mpsc::Sender<Cmd>, Error> {
        self.tx.lock().clone().ok_or(Error::ShuttingDown)
    }

    /// Sends the WAL thread the command `cmd` builds around a reply channel,
    /// and waits for its answer.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(cmd(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Replicated mode: entries up to `index` are committed (durable on a
    /// majority, as counted by the primary of `epoch`); apply them and
    /// acknowledge their writes. Never moves the commit index back, nor
    /// past the local log; ignored once this node's epoch is no longer
    /// `epoch` (a deposed primary's count was of a log it may have lost).
    pub async fn commit_to(&self, index: u64, epoch: u64) -> Result<(), Error> {
        self.sender()?
            .send(Cmd::Commit { index, epoch })
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Secondary: appends the primary's entries after log matching
    /// ([`rules::check_append`]), truncating a conflicting uncommitted
    /// suffix, and makes them durable before answering. Refuses the whole
    /// request, changing nothing, if any entry fails [`Engine::check_entries`].
    pub async fn replicate(&self, req: ReplicateRequest) -> Result<AppendOutcome, Error> {
        self.submit_replicate(req)
            .await?
            .await
            .map_err(|_| Error::ShuttingDown)?
    }

    /// [`Engine::replicate`] in two steps: returns once the request is
    /// queued for the WAL writer (requests reach it in the order they were
    /// queued), with the receiver of its answer.
    pub async fn submit_replicate(
        &self,
        req: ReplicateRequest,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, Error>>, Error> {
        self.check_entries(&req.records)?;
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Cmd::Replicate(ReplicateReq { req, reply }))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(rx)
    }

    /// Checks records from a peer as a client write is checked (keys,
    /// value sizes, bulk sizes): a bad one refuses its whole batch.
    pub fn check_entries(&self, records: &[Record]) -> Result<(), Error> {
        records.iter().try_for_each(|r| {
            record::validate_op(&r.op, &self.limits)
                .map_err(|why| Error::InvalidEntry(format!("entry {}: {why}", r.index)))
        })
    }

    /// Masterless: refuses a timestamp from elsewhere that is more than
    /// `--max-clock-offset-ms` ahead of this node's wall clock.
    pub fn check_stamp(&self, ts: Timestamp) -> Result<(), Error> {
        let wall = self.wall.now_ms();
        if crate::masterless::hlc::within_offset(ts, wall, self.max_clock_offset_ms) {
            return Ok(());
        }
        Err(Error::StampOutOfRange(format!(
            "stamp {} ms is more than {} ms ahead of this node's clock ({wall} ms)",
            ts.physical_ms, self.max_clock_offset_ms
        )))
    }

    /// Log entries from `from` on (about `max_bytes`), for shipping: from
    /// memory when recent, else from the WAL on disk.
    pub async fn entries_from(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, Error> {
        if let Some(recs) = self.shared.cache.lock().get_from(from, max_bytes) {
            return Ok(recs);
        }
        self.ask(|reply| Cmd::ReadFrom {
            from,
            max_bytes,
            reply,
        })
        .await?
    }

    /// Secondary: loads the snapshot the primary sent (written to `path`,
    /// see [`Engine::incoming_snapshot_path`]) into a fresh state, checking
    /// its checksum and that every key and value is one a client could
    /// write. Changes nothing; blocking (it reads the whole file).
    pub fn verify_snapshot(&self, path: PathBuf) -> Result<IncomingSnapshot, Error> {
        let state = self.state.empty_like();
        let source = snapshot::Source::Peer(&self.limits);
        let meta = snapshot::load(self.fs.as_ref(), &path, &state, None, source)?;
        Ok(IncomingSnapshot { path, meta, state })
    }

    /// Secondary: installs a verified snapshot, replacing log and state
    /// (unless this node has already committed past it). Returns the last
    /// index this node then holds.
    pub async fn install_snapshot(&self, snapshot: IncomingSnapshot) -> Result<u64, Error> {
        let snapshot = Box::new(snapshot);
        self.ask(|reply| Cmd::InstallSnapshot { snapshot, reply })
            .await?
    }

    /// Masterless: merges records from a peer (its own writes, or
    /// anti-entropy repairs), keeping their timestamps. Only the items newer
    /// than what this node holds are logged (durably, before this returns)
    /// and applied. Returns this node's last log index. A batch with a bad
    /// record or stamp ([`Engine::check_entries`], [`Engine::check_stamp`])
    /// is refused whole before anything, the clock included, changes.
    pub async fn ingest(&self, records: Vec<Record>) -> Result<u64, Error> {
        self.check_entries(&records)?;
        records.iter().try_for_each(|r| self.check_stamp(r.ts))?;
        self.ask(|reply| Cmd::Ingest { records, reply }).await?
    }

    /// Mode switch: makes the current contents a durable snapshot at
    /// `req.base_index` in `req.epoch` and restarts the log after it, in the
    /// new mode. Refused unless every logged entry is applied (no
    /// uncommitted entries) and `base_index` is at least the last index.
    /// The caller has paused writes on every node.
    pub async fn rebase(&self, req: Rebase) -> Result<(), Error> {
        self.ask(|reply| Cmd::Rebase { req, reply }).await?
    }

    /// Masterless: purges tombstones stamped before `before`; how many.
    /// Skipped (0) while a snapshot is being written, so that a snapshot
    /// never misses a tombstone that the WAL after it still needs.
    pub async fn purge_tombstones(&self, before: Timestamp) -> Result<u64, Error> {
        self.ask(|reply| Cmd::Purge { before, reply }).await
    }

    /// Stops (or restarts) the expirer: while writes are paused for a mode
    /// switch, this node logs no `Expire` or expired `LeaseRevoke` either,
    /// so that its last index stays where the switch read it. Returns once
    /// the WAL writer took it: every expiry logged before is durable, none
    /// follows until it is resumed.
    pub async fn pause_expiries(&self, paused: bool) -> Result<(), Error> {
        self.ask(|reply| Cmd::PauseExpiries { paused, reply }).await
    }

    /// Masterless: advances the clock to the wall clock when idle.
    pub async fn tick_clock(&self) -> Result<(), Error> {
        self.sender()?
            .send(Cmd::Tick)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    pub fn is_masterless(&self) -> bool {
        self.policy() == CommitPolicy::Merge
    }

    /// The current [`CommitPolicy`].
    pub fn policy(&self) -> CommitPolicy {
        self.shared.policy()
    }

    /// The file system the engine persists through (the node's other
    /// durable files, `meta` and `ml-recv.json`, and incoming snapshots go
    /// through it too).
    pub fn fs(&self) -> Arc<dyn Fs> {
        self.fs.clone()
    }

    /// Last-write-wins stamps (masterless mode).
    pub fn lww(&self) -> &Lww {
        &self.shared.lww
    }

    /// The hybrid logical clock's latest timestamp.
    pub fn hlc(&self) -> Timestamp {
        *self.shared.hlc.lock()
    }

    /// `(durable_hlc, last_index)`: every record stamped by this node at or
    /// before `durable_hlc` is in the log at or before `last_index` (the
    /// stamp is read first; the writer publishes it after the index).
    pub fn durable_hlc(&self) -> (Timestamp, u64) {
        let ts = *self.shared.durable_hlc.lock();
        (ts, self.shared.last_index.load(Ordering::Acquire))
    }

    /// Index of the oldest entry the WAL still holds (older ones are only
    /// in the snapshot).
    /// The newest configuration record of the log (written, not yet
    /// durable included: it takes effect when appended), if any.
    pub fn config(&self) -> Option<(u64, crate::replication::config::Config)> {
        self.shared.log.lock().config().map(|(i, c)| (i, c.clone()))
    }

    pub fn first_log_index(&self) -> u64 {
        self.shared.log.lock().first_index()
    }

    /// The newest durable snapshot file and its last index, for shipping.
    pub fn latest_snapshot(&self) -> Option<(PathBuf, u64)> {
        let index = self.shared.snapshot_index.load(Ordering::Acquire);
        (index > 0).then(|| (self.snap_dir.join(snapshot::snapshot_name(index)), index))
    }

    /// Where a snapshot arriving from the primary is written first: outside
    /// `snap/`, whose leftover `.tmp` files the snapshot thread removes. The
    /// receiver removes it whenever the snapshot is not installed.
    pub fn incoming_snapshot_path(&self) -> PathBuf {
        self.snap_dir.with_file_name("snapshot-incoming.tmp")
    }

    /// Sets the epoch stamped on new local records (after a promotion,
    /// once the caller has persisted it).
    pub fn set_epoch(&self, epoch: u64) {
        self.shared.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Epoch of log entry `index`, when this node still knows it.
    pub fn epoch_at(&self, index: u64) -> Option<u64> {
        self.shared.log.lock().epoch_at(index)
    }

    /// Where a primary resumes shipping to a peer that rejected an append
    /// at `rejected_prev_index` with `hint`.
    pub fn catch_up_after_reject(
        &self,
        rejected_prev_index: u64,
        hint: &rules::ConflictHint,
    ) -> rules::CatchUp {
        rules::next_index_after_reject(&*self.shared.log.lock(), rejected_prev_index, hint)
    }

    /// `(epoch, index)` of the last durable entry (the written log may
    /// hold more, not yet fsync'd: those count for nothing here).
    pub fn last_log_pos(&self) -> LogPos {
        let log = self.shared.log.lock();
        let written = log.last();
        let durable = self.shared.last_index.load(Ordering::Acquire);
        if durable >= written.index {
            return written;
        }
        LogPos {
            epoch: log.epoch_at(durable).unwrap_or(0),
            index: durable,
        }
    }

    pub fn commit_index(&self) -> u64 {
        self.shared.commit_index.load(Ordering::Acquire)
    }

    /// The last index written to the log (write(2)), durable or not: what
    /// a primary can ship, and where a secondary's next append starts.
    pub fn written_last_index(&self) -> u64 {
        self.shared.log.lock().last().index
    }

    /// Notified (`notify_waiters`) whenever entries are written to the log
    /// (before their fsync) and can be read with [`Engine::entries_from`].
    /// Create and `enable` a `notified()` future before reading, as with
    /// [`Engine::durable_notify`].
    pub fn written_notify(&self) -> &tokio::sync::Notify {
        &self.shared.written_changed
    }

    /// Notified (`notify_waiters`) whenever the durable last index moves.
    /// Create and `enable` a `notified()` future before checking the log,
    /// so that no move between the check and the wait is missed.
    pub fn durable_notify(&self) -> &tokio::sync::Notify {
        &self.shared.durable_changed
    }

    /// A key's value, unless it is absent or past its deadline by this
    /// node's clock (docs/DESIGN.md §2.15).
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.state.get(key, self.wall_ms())
    }

    /// A key's value with its versions (as [`Engine::get`]).
    pub fn get_versioned(&self, key: &[u8]) -> Option<(Bytes, KeyMeta)> {
        self.state.get_versioned(key, self.wall_ms())
    }

    /// A key as a read returns it (value, versions and expiry), or `None`
    /// when it is absent or past its deadline by this node's clock
    /// (docs/DESIGN.md §2.15).
    pub fn get_item(&self, key: &[u8]) -> Option<Item> {
        self.state.get_item(key, self.wall_ms())
    }

    /// A live lease with its keys (at most `max_keys` of them, and whether
    /// there are more), or `None` once it is revoked or past its deadline
    /// by this node's clock.
    pub fn lease(&self, id: u64, max_keys: usize) -> Option<(LeaseInfo, bool)> {
        self.state.lease(id, max_keys, self.wall_ms())
    }

    /// This node's wall clock in Unix ms (with the test offset of
    /// `--clock-offset-ms`): what deadlines are compared with.
    pub fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }

    /// One page of a range read, a consistent cut of the applied state:
    /// at most `read.limit` keys from `read.range.start` (fewer once their
    /// values reach [`crate::model::MAX_PAGE_VALUE_BYTES`], at least one),
    /// `more` when the range holds keys after them, `index` the applied
    /// index of the cut. In masterless mode tombstones are not keys.
    pub fn range(&self, read: &RangeRead) -> Page {
        self.state.range(read, self.wall_ms())
    }

    /// How many keys `range` holds (readable by this node's clock), and the
    /// applied index of that count.
    pub fn count(&self, range: &KeyRange) -> (u64, u64) {
        self.state.count(range, self.wall_ms())
    }

    /// Logs a transaction as one record: the compares are evaluated by
    /// the WAL writer against every entry before it (applied or not), and
    /// only the chosen branch's ops are logged. Resolves once the record
    /// is durable and applied (committed, in a cluster), with
    /// `outcome.txn` saying which branch ran and what its ops returned.
    /// A failed compare still logs one record (the failure branch).
    pub async fn write_txn(&self, txn: Txn) -> Result<WriteResult, Error> {
        let (tx, req, rx) = self.prepare(Write::Txn(txn), true)?;
        tx.send(req).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The events of the records applied here, for watches.
    pub fn watch(&self) -> &Arc<watch::WatchHub> {
        self.state().watch()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether writes are refused for a storage reason ([`StorageState`]).
    pub fn is_poisoned(&self) -> bool {
        !self.shared.health.is_ok()
    }

    pub fn storage_state(&self) -> StorageState {
        self.shared.health.get()
    }

    /// The error a write would get now for a storage reason, if any.
    pub fn storage_refusal(&self) -> Option<Error> {
        self.shared.health.refusal()
    }

    /// Checks that the data dir, its `LOCK` and `wal/` are still the ones
    /// the engine opened (the server asks periodically; every segment roll
    /// checks too). Once one is gone, writes are refused until a restart.
    pub async fn check_data_dir(&self) -> Result<StorageState, Error> {
        self.ask(|reply| Cmd::CheckDataDir { reply }).await
    }

    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        EngineStatus {
            last_index: s.last_index.load(Ordering::Relaxed),
            applied_index: s.applied_index.load(Ordering::Relaxed),
            snapshot_index: s.snapshot_index.load(Ordering::Relaxed),
            keys: self.state.len(),
            wal_bytes: s.wal_bytes.load(Ordering::Relaxed),
            wal_segments: s.wal_segments.load(Ordering::Relaxed),
            poisoned: !s.health.is_ok(),
            storage_state: s.health.get(),
            storage_detail: s.health.detail(),
            data_set_bytes: self.state.data_bytes(),
            max_data_bytes: self.max_data_bytes,
            keys_with_ttl: self.state.keys_with_ttl(),
            expired_keys: self.state.expired_keys(),
            leases: self.state.lease_count(),
        }
    }

    /// Stops taking writes, lets queued ones finish (each is fsync'd before
    /// its reply), and joins the engine's threads.
    pub fn shutdown(&self) {
        self.tx.lock().take();
        self.expiry_stop.lock().take();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Loads the newest snapshot in `snap_dir` (stamps too, when `stamps` is
/// given) and removes older ones; the default (index 0) when there is none.
fn recover_snapshot(
    fs: &dyn Fs,
    snap_dir: &Path,
    state: &State,
    stamps: Option<&Lww>,
) -> Result<snapshot::SnapshotMeta, Error> {
    let mut meta = snapshot::SnapshotMeta::default();
    let snapshots = snapshot::list(fs, snap_dir)?;
    if let Some((_, path)) = snapshots.first() {
        // The newest snapshot is the only one whose WAL suffix is
        // guaranteed to exist; a damaged one is damaged acknowledged data.
        meta = snapshot::load(fs, path, state, stamps, snapshot::Source::Own)?;
    }
    for (_, older) in snapshots.iter().skip(1) {
        let _ = fs.remove(older);
    }
    Ok(meta)
}

/// What the WAL thread takes over from recovery.
struct RecoveredLog {
    wal: wal::Wal,
    /// Replicated: entries past the snapshot, waiting for the primary's
    /// commit index.
    pending: VecDeque<PendingEntry>,
}

/// The log as recovery left it, before the engine's threads start.
struct Recovered {
    log: RecoveredLog,
    /// The epochs of the log's entries.
    view: EpochRuns,
    /// Recent entries, for shipping.
    cache: LogCache,
    report: wal::RecoveryReport,
}

/// Replays the WAL after `snap` into the log view and, as the policy says,
/// into the state (now) or the pending entries (once committed).
fn replay_wal(
    fs: &Arc<dyn Fs>,
    cfg: &EngineConfig,
    snap: snapshot::SnapshotMeta,
    state: &State,
    lww: &Lww,
) -> Result<Recovered, Error> {
    let dir = wal_dir(&cfg.data_dir);
    let mut log =
        EpochRuns::new(snap.last_index, snap.last_epoch).with_config(state.loaded_config());
    let mut cache = LogCache::new(cfg.log_cache_bytes);
    let mut pending = VecDeque::new();
    let (mut wal, report) = wal::Wal::open(
        fs.clone(),
        &dir,
        snap.last_index,
        cfg.segment_max_bytes,
        |rec| {
            log.push(rec.index, rec.epoch);
            if let Op::Config { config } = &rec.op {
                log.push_config(rec.index, config.clone());
            }
            match cfg.policy {
                CommitPolicy::Local => {
                    state.apply(rec.index, rec.ts, &rec.op, false);
                }
                CommitPolicy::Merge => {
                    cache.push(rec.clone());
                    lww.apply(state, rec.index, rec.ts, &rec.op, false);
                }
                CommitPolicy::Replicated => {
                    // Whether these were committed is for the primary to
                    // say: until then they wait, unapplied.
                    cache.push(rec.clone());
                    pending.push_back(PendingEntry {
                        index: rec.index,
                        ts: rec.ts,
                        op: rec.op,
                        apply: true,
                        reply: None,
                        txn: None,
                    });
                }
            }
        },
    )?;
    let anchors = [cfg.data_dir.clone(), cfg.data_dir.join("LOCK"), dir];
    wal.watch(fs::Anchors::record(fs.as_ref(), &anchors));
    Ok(Recovered {
        log: RecoveredLog { wal, pending },
        view: log,
        cache,
        report,
    })
}

impl Shared {
    /// The counters as recovery left them.
    fn recovered(
        cfg: &EngineConfig,
        wal: &wal::Wal,
        view: EpochRuns,
        cache: LogCache,
        snap: snapshot::SnapshotMeta,
        lww: Arc<Lww>,
    ) -> Shared {
        let last_index = wal.next_index() - 1;
        let committed = match cfg.policy {
            CommitPolicy::Replicated => snap.last_index,
            CommitPolicy::Local | CommitPolicy::Merge => last_index,
        };
        Shared {
            epoch: AtomicU64::new(cfg.epoch),
            commit_index: AtomicU64::new(committed),
            durable_changed: tokio::sync::Notify::new(),
            written_changed: tokio::sync::Notify::new(),
            log: parking_lot::Mutex::new(view),
            cache: parking_lot::Mutex::new(cache),
            last_index: AtomicU64::new(last_index),
            applied_index: AtomicU64::new(committed),
            snapshot_index: AtomicU64::new(snap.last_index),
            wal_bytes: AtomicU64::new(wal.total_bytes()),
            wal_segments: AtomicU64::new(wal.segment_count() as u64),
            health: wal.health(),
            snapshot_running: AtomicBool::new(false),
            expiry_backlog: AtomicBool::new(false),
            policy: AtomicU8::new(cfg.policy as u8),
            durable_hlc: parking_lot::Mutex::new(lww.max_ts()),
            lww,
            hlc: parking_lot::Mutex::new(Timestamp::default()),
        }
    }
}

/// Starts the WAL thread (which takes over the recovered log) and the
/// snapshot thread.
fn start_threads(
    fs: &Arc<dyn Fs>,
    cfg: &EngineConfig,
    metrics: Option<Arc<Metrics>>,
    state: &Arc<State>,
    shared: &Arc<Shared>,
    recovered: RecoveredLog,
    (rx, ticks, stop): (
        mpsc::Receiver<Cmd>,
        mpsc::WeakSender<Cmd>,
        std_mpsc::Receiver<()>,
    ),
) -> Result<Vec<JoinHandle<()>>, Error> {
    let snap_dir = cfg.data_dir.join("snap");
    let (snap_tx, snap_rx) = std_mpsc::sync_channel::<snapshot::SnapshotMeta>(1);
    let (compact_tx, compact_rx) = std_mpsc::channel::<u64>();
    // Past every stamp on disk: strictly increasing across restarts.
    let mut clock = Hlc::new(cfg.node_tag);
    clock.observe(shared.lww.max_ts(), 0);
    let writer = Writer {
        wal: recovered.wal,
        state: state.clone(),
        shared: shared.clone(),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        clock,
        wall: cfg.wall.clone(),
        // Replayed WAL bytes count toward the next snapshot.
        bytes_since_snapshot: shared.wal_bytes.load(Ordering::Relaxed),
        first_unapplied: None,
        pending: recovered.pending,
        view: None,
        roll_refusals: 0,
        fs: fs.clone(),
        snap_dir: snap_dir.clone(),
        snap_tx,
        compact_rx,
        covered: 0,
        in_flight: writer::InFlight::default(),
        led: None,
        expiries_paused: false,
        commit_clock: writer::CommitClock::default(),
        inbox: None,
        held: std::collections::VecDeque::new(),
        wake: ticks.clone(),
        syncer: None,
    };
    let (ticker, ticker_state, ticker_wall) = (shared.clone(), state.clone(), cfg.wall.clone());
    let snapshotter = Snapshotter {
        fs: fs.clone(),
        dir: snap_dir,
        state: state.clone(),
        shared: shared.clone(),
        metrics,
        compact_tx,
    };
    let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(format!("kvd-{name}"))
            .spawn(body)
            .map_err(|e| Error::io(format!("spawning the {name} thread"), e))
    };
    Ok(vec![
        spawn("wal", Box::new(move || writer.run(rx)))?,
        spawn("snapshot", Box::new(move || snapshotter.run(snap_rx)))?,
        spawn(
            "expiry",
            Box::new(move || expiry_ticks(ticks, &stop, &ticker, &ticker_state, &ticker_wall)),
        )?,
    ])
}

/// How often an idle writer looks for keys and leases past their deadline.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// ... and while its last look found some (a backlog of expiries, a
/// record of at most 128 keys and one lease each time).
const EXPIRY_BACKLOG_TICK: Duration = Duration::from_millis(5);

/// Wakes the WAL writer every [`EXPIRY_TICK`] (or [`EXPIRY_BACKLOG_TICK`])
/// while a deadline has passed, until the engine shuts down (a state with
/// no deadline due never wakes it). It holds the channel only weakly (so
/// shutdown still closes it), and never waits for room in it: a busy
/// writer forms batches anyway, and each batch carries the expiries due.
/// It waits on `stop`, which shutdown drops, so it never holds one up.
fn expiry_ticks(
    ticks: mpsc::WeakSender<Cmd>,
    stop: &std_mpsc::Receiver<()>,
    shared: &Shared,
    state: &State,
    wall: &WallClock,
) {
    loop {
        let backlog = shared.expiry_backlog.load(Ordering::Relaxed);
        let tick = if backlog {
            EXPIRY_BACKLOG_TICK
        } else {
            EXPIRY_TICK
        };
        if stop.recv_timeout(tick) != Err(std_mpsc::RecvTimeoutError::Timeout) {
            return;
        }
        let Some(tx) = ticks.upgrade() else {
            return;
        };
        if state.next_deadline().is_none_or(|d| d > wall.now_ms()) {
            shared.expiry_backlog.store(false, Ordering::Relaxed);
            continue;
        }
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Cmd::ExpiryTick) {
            return;
        }
    }
}

/// Path of the WAL directory under a data dir.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_has_its_commit_policy_and_only_a_single_node_ships_nothing() {
        let policies =
            [Mode::Single, Mode::PrimarySecondary, Mode::Masterless].map(CommitPolicy::from);
        assert_eq!(
            policies,
            [
                CommitPolicy::Local,
                CommitPolicy::Replicated,
                CommitPolicy::Merge
            ]
        );
        assert_eq!(policies.map(CommitPolicy::ships), [false, true, true]);
        for p in CommitPolicy::ALL {
            assert_eq!(CommitPolicy::ALL[p as usize], p, "the u8 form round-trips");
        }
    }
}
