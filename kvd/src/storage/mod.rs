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
//! - Replicated mode (`EngineConfig::replicated`): a durable
//!   entry is applied, and its write acknowledged, only when
//!   [`Engine::commit_to`] reaches it; a secondary takes the primary's
//!   entries through [`Engine::replicate`], which follows
//!   `replication::rules::check_append` and may cut an uncommitted suffix
//!   (whose waiting writers get [`Error::Superseded`]). After a restart,
//!   entries past the snapshot wait for the primary's commit index.
//!
//! Threads: the WAL writer owns the log and applies; the snapshotter writes
//! snapshots in the background and hands compaction back to the writer, so
//! every WAL file operation happens on one thread.

pub mod fs;
pub mod log_index;
pub mod lww;
pub mod meta;
pub mod record;
pub mod snapshot;
pub mod state;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

pub use fs::{Fs, RealFs};
pub use meta::{Meta, MetaStore};
pub use record::{Op, Record, Timestamp};
pub use state::{ApplyOutcome, State};

use crate::masterless::hlc::{Hlc, WallClock};
use crate::metrics::Metrics;
use crate::replication::rules::{self, AppendOutcome, LogPos, LogView};
use log_index::{EpochRuns, LogCache};
use lww::Lww;

/// Longest key, in bytes (DESIGN §2).
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
    /// Replicated mode: a durable entry is applied (and its write
    /// acknowledged) only once [`Engine::commit_to`] says it is committed.
    /// Off, an entry commits when it is durable here (a single node).
    pub replicated: bool,
    /// Recent records kept in memory for shipping to secondaries.
    pub log_cache_bytes: usize,
    /// Masterless mode: every record is merged last-write-wins by its
    /// timestamp (see [`lww`]), and peers' writes arrive through
    /// [`Engine::ingest`]. Excludes `replicated`.
    pub masterless: bool,
    /// The wall clock under the hybrid logical clock (with its test offset).
    pub wall: WallClock,
    /// `--index`: the search index the state keeps in step (DESIGN §7).
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
            replicated: false,
            log_cache_bytes: 64 << 20,
            masterless: false,
            wall: WallClock::default(),
            index: None,
            limits: record::Limits::default(),
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            max_data_bytes: None,
        }
    }
}

/// Default of `--max-clock-offset-ms`: far above what synchronised clocks
/// differ by, and above the clock faults the tests inject (10 s).
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 60_000;

/// Result of one acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// Whether the engine takes writes, and if not, why (the wire type of
/// `/v1/status`).
pub use kvproto::status::StorageState;

/// The engine's [`StorageState`], readable from any thread; set only by
/// the WAL thread, and never back to `Ok`.
#[derive(Default)]
struct Health {
    state: AtomicU8,
    detail: Mutex<Option<String>>,
}

impl Health {
    fn get(&self) -> StorageState {
        StorageState::ALL[usize::from(self.state.load(Ordering::Acquire))]
    }

    /// Records the first failure; says whether this call recorded it.
    fn fail(&self, state: StorageState, detail: String) -> bool {
        if state == StorageState::Ok || self.get() != StorageState::Ok {
            return false;
        }
        *self.detail.lock() = Some(detail);
        self.state.store(state as u8, Ordering::Release);
        true
    }

    /// The error a write gets now, if any.
    fn refusal(&self) -> Option<Error> {
        let detail = || self.detail.lock().clone().unwrap_or_default();
        match self.get() {
            StorageState::Ok => None,
            StorageState::Poisoned => Some(Error::Poisoned),
            StorageState::DataDirLost => Some(Error::DataDirLost(detail())),
        }
    }
}

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
        snapshot: IncomingSnapshot,
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
/// restarts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rebase {
    pub masterless: bool,
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

/// A durable entry waiting for its commit (replicated mode).
struct PendingEntry {
    index: u64,
    ts: Timestamp,
    op: Op,
    apply: bool,
    reply: Option<oneshot::Sender<Result<WriteResult, Error>>>,
}

struct WriteReq {
    op: Op,
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
    log: parking_lot::Mutex<EpochRuns>,
    cache: parking_lot::Mutex<LogCache>,
    last_index: AtomicU64,
    applied_index: AtomicU64,
    snapshot_index: AtomicU64,
    wal_bytes: AtomicU64,
    wal_segments: AtomicU64,
    health: Health,
    snapshot_running: AtomicBool,
    /// Masterless mode (changes only in a mode switch).
    masterless: AtomicBool,
    /// Last-write-wins stamps and tombstones (empty unless masterless).
    lww: Arc<Lww>,
    /// The clock's latest timestamp, for status.
    hlc: parking_lot::Mutex<Timestamp>,
    /// Largest timestamp of a durable record, published after
    /// `last_index` (see [`Engine::durable_hlc`]).
    durable_hlc: parking_lot::Mutex<Timestamp>,
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
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What [`Engine::open`] found on disk.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub snapshot_index: u64,
    pub records_replayed: u64,
    pub truncated_bytes: u64,
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
        let wal_dir = cfg.data_dir.join("wal");
        let state = Arc::new(State::with_index(cfg.index.clone()));
        let lww = Arc::new(Lww::new());
        let lww_opt = cfg.masterless.then_some(&*lww);

        let mut snap_meta = snapshot::SnapshotMeta::default();
        let snapshots = snapshot::list(fs.as_ref(), &snap_dir)?;
        if let Some((_, path)) = snapshots.first() {
            // The newest snapshot is the only one whose WAL suffix is
            // guaranteed to exist; a damaged one is damaged acknowledged data.
            snap_meta = snapshot::load(fs.as_ref(), path, &state, lww_opt, snapshot::Source::Own)?;
        }
        for (_, older) in snapshots.iter().skip(1) {
            let _ = fs.remove(older);
        }

        let mut log = EpochRuns::new(snap_meta.last_index, snap_meta.last_epoch);
        let mut cache = LogCache::new(cfg.log_cache_bytes);
        let mut pending = std::collections::VecDeque::new();
        let (mut wal, wal_report) = wal::Wal::open(
            fs.clone(),
            &wal_dir,
            snap_meta.last_index,
            cfg.segment_max_bytes,
            |rec| {
                log.push(rec.index, rec.epoch);
                if cfg.masterless {
                    cache.push(rec.clone());
                    lww.apply(&state, rec.ts, &rec.op);
                } else if cfg.replicated {
                    // Whether these were committed is for the primary to say:
                    // until then they wait, unapplied.
                    cache.push(rec.clone());
                    pending.push_back(PendingEntry {
                        index: rec.index,
                        ts: rec.ts,
                        op: rec.op,
                        apply: true,
                        reply: None,
                    });
                } else {
                    state.apply(&rec.op);
                }
            },
        )?;
        wal.watch(fs::Anchors::record(
            fs.as_ref(),
            &[
                cfg.data_dir.clone(),
                cfg.data_dir.join("LOCK"),
                wal_dir.clone(),
            ],
        ));
        let last_index = wal.next_index() - 1;
        let committed = if cfg.replicated {
            snap_meta.last_index
        } else {
            last_index
        };
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(cfg.epoch),
            commit_index: AtomicU64::new(committed),
            durable_changed: tokio::sync::Notify::new(),
            log: parking_lot::Mutex::new(log),
            cache: parking_lot::Mutex::new(cache),
            last_index: AtomicU64::new(last_index),
            applied_index: AtomicU64::new(committed),
            snapshot_index: AtomicU64::new(0),
            wal_bytes: AtomicU64::new(0),
            wal_segments: AtomicU64::new(0),
            health: Health::default(),
            snapshot_running: AtomicBool::new(false),
            masterless: AtomicBool::new(cfg.masterless),
            lww: lww.clone(),
            hlc: parking_lot::Mutex::new(Timestamp::default()),
            durable_hlc: parking_lot::Mutex::new(lww.max_ts()),
        });
        shared
            .snapshot_index
            .store(snap_meta.last_index, Ordering::Relaxed);
        shared.wal_bytes.store(wal.total_bytes(), Ordering::Relaxed);
        shared
            .wal_segments
            .store(wal.segment_count() as u64, Ordering::Relaxed);

        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let (snap_tx, snap_rx) = std_mpsc::sync_channel::<snapshot::SnapshotMeta>(1);
        let (compact_tx, compact_rx) = std_mpsc::channel::<u64>();

        let writer = Writer {
            wal,
            state: state.clone(),
            shared: shared.clone(),
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            clock: {
                // Past every stamp on disk: strictly increasing across restarts.
                let mut c = Hlc::new(cfg.node_tag);
                c.observe(lww.max_ts(), 0);
                c
            },
            wall: cfg.wall.clone(),
            masterless: cfg.masterless,
            replicated: cfg.replicated,
            // Replayed WAL bytes count toward the next snapshot.
            bytes_since_snapshot: shared.wal_bytes.load(Ordering::Relaxed),
            first_unapplied: None,
            pending,
            roll_refusals: 0,
            fs: fs.clone(),
            snap_dir: snap_dir.clone(),
            snap_tx,
            compact_rx,
        };
        let snapshotter = Snapshotter {
            fs: fs.clone(),
            dir: snap_dir,
            state: state.clone(),
            shared: shared.clone(),
            metrics,
            compact_tx,
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("kvd-wal".into())
                .spawn(move || writer.run(rx))
                .map_err(|e| Error::io("spawning the WAL thread".into(), e))?,
            std::thread::Builder::new()
                .name("kvd-snapshot".into())
                .spawn(move || snapshotter.run(snap_rx))
                .map_err(|e| Error::io("spawning the snapshot thread".into(), e))?,
        ];
        let report = OpenReport {
            snapshot_index: snap_meta.last_index,
            records_replayed: wal_report.records_replayed,
            truncated_bytes: wal_report.truncated_bytes,
            keys: state.len(),
            duration: started.elapsed(),
        };
        Ok((
            Engine {
                fs,
                limits: cfg.limits,
                wall: cfg.wall.clone(),
                max_clock_offset_ms: cfg.max_clock_offset_ms,
                snap_dir: cfg.data_dir.join("snap"),
                max_data_bytes: cfg.max_data_bytes,
                state,
                shared,
                tx: Mutex::new(Some(tx)),
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
        let (tx, req, rx) = self.prepare(op, apply)?;
        tx.send(req).await.map_err(|_| Error::ShuttingDown)?;
        Ok(rx)
    }

    /// Blocking form of [`Engine::write`] for callers outside a runtime.
    pub fn write_blocking(&self, op: Op, apply: bool) -> Result<WriteResult, Error> {
        let (tx, req, rx) = self.prepare(op, apply)?;
        tx.blocking_send(req).map_err(|_| Error::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| Error::ShuttingDown)?
    }

    /// Refuses early when poisoned or shutting down; otherwise a request and
    /// the channel to send it on.
    fn prepare(&self, op: Op, apply: bool) -> Result<(mpsc::Sender<Cmd>, Cmd, Pending), Error> {
        if let Some(e) = self.shared.health.refusal() {
            return Err(e);
        }
        let tx = self.tx.lock().clone().ok_or(Error::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        Ok((tx, Cmd::Write(WriteReq { op, apply, reply }), rx))
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
        self.check_entries(&req.records)?;
        self.ask(|reply| Cmd::Replicate(ReplicateReq { req, reply }))
            .await?
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

    /// Masterless: advances the clock to the wall clock when idle.
    pub async fn tick_clock(&self) -> Result<(), Error> {
        self.sender()?
            .send(Cmd::Tick)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    pub fn is_masterless(&self) -> bool {
        self.shared.masterless.load(Ordering::Acquire)
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

    /// `(epoch, index)` of the last durable entry.
    pub fn last_log_pos(&self) -> LogPos {
        self.shared.log.lock().last()
    }

    pub fn commit_index(&self) -> u64 {
        self.shared.commit_index.load(Ordering::Acquire)
    }

    /// Notified (`notify_waiters`) whenever the durable last index moves.
    /// Create and `enable` a `notified()` future before checking the log,
    /// so that no move between the check and the wait is missed.
    pub fn durable_notify(&self) -> &tokio::sync::Notify {
        &self.shared.durable_changed
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.state.get(key)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether writes are refused for a storage reason ([`StorageState`]).
    pub fn is_poisoned(&self) -> bool {
        self.storage_state() != StorageState::Ok
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
            poisoned: s.health.get() != StorageState::Ok,
            storage_state: s.health.get(),
            storage_detail: s.health.detail.lock().clone(),
            data_set_bytes: self.state.data_bytes(),
            max_data_bytes: self.max_data_bytes,
        }
    }

    /// Stops taking writes, lets queued ones finish (each is fsync'd before
    /// its reply), and joins the engine's threads.
    pub fn shutdown(&self) {
        self.tx.lock().take();
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

/// The WAL thread: batches, fsyncs, applies, replies.
struct Writer {
    wal: wal::Wal,
    state: Arc<State>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    metrics: Option<Arc<Metrics>>,
    clock: Hlc,
    wall: WallClock,
    /// Current mode (a mode switch changes it, see [`Writer::rebase`]).
    masterless: bool,
    replicated: bool,
    bytes_since_snapshot: u64,
    /// Lowest index logged but deliberately not applied (`debug_flaky`);
    /// snapshots must not claim to cover it.
    first_unapplied: Option<u64>,
    /// Replicated mode: durable entries not yet known to be committed.
    pending: std::collections::VecDeque<PendingEntry>,
    /// Batches refused in a row because no new segment could be started
    /// (logged when it starts and when it ends, not once per batch).
    roll_refusals: u64,
    fs: Arc<dyn Fs>,
    snap_dir: PathBuf,
    snap_tx: std_mpsc::SyncSender<snapshot::SnapshotMeta>,
    compact_rx: std_mpsc::Receiver<u64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<WriteReq> = Vec::with_capacity(self.cfg.max_batch_records);
        let mut other: Vec<Cmd> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = 0;
            let mut next = Some(first);
            // Group commit: take every write already queued (up to the
            // batch limits); anything else waits until the batch is durable.
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
            if !batch.is_empty() {
                self.commit(&mut batch, &mut buf);
            }
            for cmd in other.drain(..) {
                match cmd {
                    Cmd::Write(_) => unreachable!("writes are batched above"),
                    // A count by a primary since deposed is of a log it
                    // may no longer hold (a newer primary's entries may
                    // have replaced its suffix): not ours to commit.
                    Cmd::Commit { index, epoch } => {
                        if epoch == self.shared.epoch.load(Ordering::Acquire) {
                            self.advance_commit(index)
                        }
                    }
                    Cmd::Replicate(r) => {
                        let outcome = self.replicate(r.req, &mut buf);
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
                        let _ = reply.send(self.ingest(records, &mut buf));
                    }
                    Cmd::Rebase { req, reply } => {
                        let _ = reply.send(self.rebase(req));
                    }
                    // A poisoned WAL may hold stamped records whose fate
                    // is unknown until a restart: claim nothing then.
                    Cmd::Tick if self.wal.is_poisoned() => {}
                    Cmd::Tick => {
                        let wall = self.wall.now_ms();
                        if wall > self.clock.last().physical_ms {
                            self.clock.now(wall);
                        }
                        // No stamp is outstanding: the writer issues and
                        // logs stamps in one step.
                        *self.shared.hlc.lock() = self.clock.last();
                        *self.shared.durable_hlc.lock() = self.clock.last();
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
                        self.publish_storage_state(None);
                        let _ = reply.send(self.wal.state());
                    }
                }
            }
            self.compact();
            // Off the reply path: the next roll then needs no new file.
            let _ = self.wal.prepare_spare();
            // Any WAL operation above may have poisoned the log.
            self.publish_storage_state(None);
        }
        // The channel is closed and drained: every reply went out after its
        // fsync, so there is nothing left to flush.
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
        let outcome = if apply && self.masterless {
            self.shared.lww.apply(&self.state, ts, op)
        } else if apply {
            self.state.apply(op)
        } else {
            self.first_unapplied.get_or_insert(index);
            ApplyOutcome::default()
        };
        self.shared.applied_index.store(index, Ordering::Release);
        outcome
    }

    /// Records newly durable entries in the in-memory log view.
    fn remember(&mut self, records: impl Iterator<Item = Record>) {
        let mut log = self.shared.log.lock();
        let mut cache = self.shared.cache.lock();
        for rec in records {
            log.push(rec.index, rec.epoch);
            if self.replicated || self.masterless {
                cache.push(rec);
            }
        }
    }

    /// Secondary: replaces log and state with a snapshot from the primary
    /// (see [`Engine::install_snapshot`]).
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
        for (_, old) in snapshot::list(self.fs.as_ref(), &self.snap_dir)? {
            if old != final_path {
                let _ = self.fs.remove(&old);
            }
        }
        self.wal.reset(next, meta.last_epoch)?;
        for p in self.pending.drain(..) {
            if let Some(reply) = p.reply {
                let _ = reply.send(Err(Error::Superseded));
            }
        }
        *self.shared.log.lock() = EpochRuns::new(meta.last_index, meta.last_epoch);
        self.shared.cache.lock().clear();
        self.state.replace_with(fresh);
        self.first_unapplied = None;
        self.bytes_since_snapshot = 0;
        for idx in [
            &self.shared.last_index,
            &self.shared.commit_index,
            &self.shared.applied_index,
            &self.shared.snapshot_index,
        ] {
            idx.store(meta.last_index, Ordering::Release);
        }
        self.publish_wal_stats();
        Ok(meta.last_index)
    }

    /// Secondary side of log shipping (see [`Engine::replicate`]).
    fn replicate(
        &mut self,
        req: ReplicateRequest,
        buf: &mut Vec<u8>,
    ) -> Result<AppendOutcome, Error> {
        if self.wal.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let positions: Vec<LogPos> = req
            .records
            .iter()
            .map(|r| LogPos {
                epoch: r.epoch,
                index: r.index,
            })
            .collect();
        let my_epoch = self.shared.epoch.load(Ordering::Acquire);
        let commit = self.shared.commit_index.load(Ordering::Acquire);
        let decision = {
            let log = self.shared.log.lock();
            rules::check_append(
                &*log,
                my_epoch,
                commit,
                &rules::AppendRequest {
                    epoch: req.epoch,
                    prev: req.prev,
                    entries: &positions,
                    leader_commit: req.leader_commit,
                },
            )?
        };
        if let Some(e) = decision.new_epoch_to_persist {
            // The caller persisted it before handing us the request.
            self.shared.epoch.fetch_max(e, Ordering::AcqRel);
        }
        let AppendOutcome::Accept {
            truncate_from,
            append_from,
            commit,
            ..
        } = decision.outcome.clone()
        else {
            return Ok(decision.outcome);
        };
        if let Some(from) = truncate_from {
            self.wal.truncate_from(from)?;
            self.shared.log.lock().truncate_from(from);
            self.shared.cache.lock().truncate_from(from);
            // Our own writes in the cut suffix were never committed: their
            // clients learn that they did not happen.
            while self.pending.back().is_some_and(|p| p.index >= from) {
                if let Some(reply) = self.pending.pop_back().and_then(|p| p.reply) {
                    let _ = reply.send(Err(Error::Superseded));
                }
            }
            self.shared.last_index.store(from - 1, Ordering::Release);
        }
        let new = &req.records[append_from..];
        if let (Some(first), Some(last)) = (new.first(), new.last()) {
            buf.clear();
            for r in new {
                r.encode_into(buf);
            }
            let durable = self
                .wal
                .append(first.index, new.len() as u64, buf, last.epoch)
                .and_then(|_| self.wal.sync());
            if let Err(e) = durable {
                self.publish_storage_state(Some(&e));
                return Err(e);
            }
            for r in new {
                self.pending.push_back(PendingEntry {
                    index: r.index,
                    ts: r.ts,
                    op: r.op.clone(),
                    apply: true,
                    reply: None,
                });
            }
            self.remember(new.iter().cloned());
            self.shared.last_index.store(last.index, Ordering::Release);
            self.bytes_since_snapshot += buf.len() as u64;
            self.publish_wal_stats();
            self.shared.durable_changed.notify_waiters();
        }
        self.advance_commit(commit);
        Ok(decision.outcome)
    }

    fn commit(&mut self, batch: &mut Vec<WriteReq>, buf: &mut Vec<u8>) {
        self.refuse_over_memory(batch);
        if batch.is_empty() {
            return;
        }
        let first = self.wal.next_index();
        buf.clear();
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let mut stamps = Vec::with_capacity(batch.len());
        let wall = self.wall.now_ms();
        for (i, req) in batch.iter().enumerate() {
            let ts = self.clock.now(wall);
            stamps.push(ts);
            record::encode(first + i as u64, epoch, ts, &req.op, buf);
        }
        let count = batch.len() as u64;
        let fsync_started = Instant::now();
        let durable = self
            .wal
            .append(first, count, buf, epoch)
            .and_then(|_| self.wal.sync());
        if let Err(e) = durable {
            self.refuse_batch(batch, &e);
            return;
        }
        if self.roll_refusals > 0 {
            eprintln!(
                "kvd: a new WAL segment was started after {} refused write batches; \
                 writes are taken again",
                self.roll_refusals
            );
            self.roll_refusals = 0;
        }
        if let Some(m) = &self.metrics {
            m.wal_fsync_seconds
                .observe(fsync_started.elapsed().as_secs_f64());
            m.wal_batch_records.observe(count as f64);
        }
        *self.shared.hlc.lock() = self.clock.last();
        if self.replicated || self.masterless {
            let records =
                batch
                    .iter()
                    .zip(stamps.iter().copied())
                    .enumerate()
                    .map(|(i, (req, ts))| Record {
                        index: first + i as u64,
                        epoch,
                        ts,
                        op: req.op.clone(),
                    });
            self.remember(records);
        } else {
            // A single node ships nothing: only the epochs are kept.
            let mut log = self.shared.log.lock();
            for index in first..first + count {
                log.push(index, epoch);
            }
        }
        let last = first + count - 1;
        self.shared.last_index.store(last, Ordering::Release);
        // Every stamp this node has issued is now durable.
        *self.shared.durable_hlc.lock() = self.clock.last();
        if self.replicated {
            // Durable here; applied and acknowledged once committed.
            for (i, req) in batch.drain(..).enumerate() {
                self.pending.push_back(PendingEntry {
                    index: first + i as u64,
                    ts: stamps[i],
                    op: req.op,
                    apply: req.apply,
                    reply: Some(req.reply),
                });
            }
            self.shared.durable_changed.notify_waiters();
        } else {
            self.shared.commit_index.store(last, Ordering::Release);
            for (i, req) in batch.drain(..).enumerate() {
                let index = first + i as u64;
                let outcome = self.apply_entry(index, stamps[i], &req.op, req.apply);
                let _ = req.reply.send(Ok(WriteResult {
                    index,
                    outcome,
                    ts: stamps[i],
                }));
            }
            if self.masterless {
                self.shared.durable_changed.notify_waiters();
            }
        }
        self.bytes_since_snapshot += buf.len() as u64;
        self.publish_wal_stats();
        self.maybe_snapshot();
    }

    /// Answers every write of a batch that could not be logged. Only a
    /// failed roll leaves the WAL usable; anything else refuses all later
    /// writes too.
    fn refuse_batch(&mut self, batch: &mut Vec<WriteReq>, e: &Error) {
        self.publish_storage_state(Some(e));
        if let Error::SegmentUnavailable(_) = e {
            if self.roll_refusals == 0 {
                eprintln!("kvd: refusing writes until a new WAL segment can be started: {e}");
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
        for req in batch.drain(..) {
            let _ = req.reply.send(Err(each(e)));
        }
    }

    /// `--max-memory-mib`: answers [`Error::MemoryFull`] to the writes of
    /// `batch` that would grow the data set past the budget, in order, and
    /// keeps the rest. Shrinking writes free nothing for the rest of the
    /// batch (they are not applied yet), which keeps the check on the safe
    /// side. On a primary, writes logged but not yet committed are not in
    /// the state yet: concurrent writes can overshoot by what is in flight.
    fn refuse_over_memory(&self, batch: &mut Vec<WriteReq>) {
        let Some(limit) = self.cfg.max_data_bytes else {
            return;
        };
        let mut used = self.state.data_bytes();
        let mut kept = Vec::with_capacity(batch.len());
        for req in batch.drain(..) {
            match state::admit(used, self.state.growth_bytes(&req.op), limit) {
                Ok(now) => {
                    used = now;
                    kept.push(req);
                }
                Err(would_be) => {
                    let _ = req.reply.send(Err(Error::MemoryFull { would_be, limit }));
                }
            }
        }
        *batch = kept;
    }

    /// Makes the WAL's refusal (if it has started refusing) visible to
    /// `prepare`, `/ready` and `/v1/status`, and logs it the first time.
    /// `cause` is the failure that made the WAL refuse, if the caller has it.
    fn publish_storage_state(&self, cause: Option<&Error>) {
        let Some(refusal) = self.wal.refusal() else {
            return;
        };
        let (detail, log) = match (&refusal, cause) {
            (Error::DataDirLost(what), _) => (what.clone(), refusal.to_string()),
            (_, Some(cause)) => (cause.to_string(), format!("{refusal} ({cause})")),
            (refusal, None) => (refusal.to_string(), refusal.to_string()),
        };
        if self.shared.health.fail(self.wal.state(), detail) {
            eprintln!("kvd: refusing writes until restart: {log}");
        }
    }

    /// Masterless side of [`Engine::ingest`].
    fn ingest(&mut self, records: Vec<Record>, buf: &mut Vec<u8>) -> Result<u64, Error> {
        if self.wal.is_poisoned() {
            return Err(Error::Poisoned);
        }
        if !self.masterless {
            return Err(Error::NotQuiescent(
                "this node is not in masterless mode".into(),
            ));
        }
        let wall = self.wall.now_ms();
        let mut winners = Vec::with_capacity(records.len());
        for r in &records {
            self.clock.observe(r.ts, wall);
            if let Some(op) = self.shared.lww.winning(r.ts, &r.op) {
                winners.push((r.ts, op));
            }
        }
        *self.shared.hlc.lock() = self.clock.last();
        let first = self.wal.next_index();
        if winners.is_empty() {
            *self.shared.durable_hlc.lock() = self.clock.last();
            return Ok(first - 1);
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        buf.clear();
        for (i, (ts, op)) in winners.iter().enumerate() {
            record::encode(first + i as u64, epoch, *ts, op, buf);
        }
        let count = winners.len() as u64;
        let durable = self
            .wal
            .append(first, count, buf, epoch)
            .and_then(|_| self.wal.sync());
        if let Err(e) = durable {
            self.publish_storage_state(Some(&e));
            eprintln!("kvd: WAL write failed: {e}");
            return Err(e);
        }
        let last = first + count - 1;
        self.remember(winners.iter().enumerate().map(|(i, (ts, op))| Record {
            index: first + i as u64,
            epoch,
            ts: *ts,
            op: op.clone(),
        }));
        self.shared.last_index.store(last, Ordering::Release);
        self.shared.commit_index.store(last, Ordering::Release);
        *self.shared.durable_hlc.lock() = self.clock.last();
        for (i, (ts, op)) in winners.iter().enumerate() {
            self.apply_entry(first + i as u64, *ts, op, true);
        }
        self.bytes_since_snapshot += buf.len() as u64;
        self.publish_wal_stats();
        self.shared.durable_changed.notify_waiters();
        self.maybe_snapshot();
        Ok(last)
    }

    /// Side of [`Engine::rebase`] on the WAL thread.
    fn rebase(&mut self, req: Rebase) -> Result<(), Error> {
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
        let Some(next) = req.base_index.checked_add(1) else {
            return Err(Error::NotQuiescent(
                "a base index of 2^64-1 leaves no index for the next entry".into(),
            ));
        };
        // The snapshot thread must not write concurrently.
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.shared.snapshot_running.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return Err(Error::NotQuiescent(
                    "a snapshot is still being written".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The new mode's stamps (none when leaving masterless) are built
        // aside and take over only once the snapshot holding them is
        // durable: a rebase that fails leaves the node as it was.
        let stamps = Lww::new();
        if req.masterless {
            stamps.seed_from_state(&self.state, req.base_ts);
        }
        let meta = snapshot::SnapshotMeta {
            last_index: req.base_index,
            last_epoch: req.epoch,
        };
        let (path, _) = snapshot::write(
            self.fs.as_ref(),
            &self.snap_dir,
            &self.state,
            req.masterless.then_some(&stamps),
            meta,
        )?;
        self.shared.lww.replace_with(stamps);
        for (_, old) in snapshot::list(self.fs.as_ref(), &self.snap_dir)? {
            if old != path {
                let _ = self.fs.remove(&old);
            }
        }
        // Durable snapshot first, then the log restarts after it (a crash in
        // between leaves a snapshot ahead of the log, which recovery handles).
        self.wal.reset(next, req.epoch)?;
        self.shared
            .masterless
            .store(req.masterless, Ordering::Release);
        self.masterless = req.masterless;
        self.replicated = !req.masterless;
        *self.shared.log.lock() = EpochRuns::new(req.base_index, req.epoch);
        self.shared.cache.lock().clear();
        self.shared.epoch.fetch_max(req.epoch, Ordering::AcqRel);
        self.first_unapplied = None;
        self.bytes_since_snapshot = 0;
        for idx in [
            &self.shared.last_index,
            &self.shared.commit_index,
            &self.shared.applied_index,
            &self.shared.snapshot_index,
        ] {
            idx.store(req.base_index, Ordering::Release);
        }
        let wall = self.wall.now_ms();
        self.clock.observe(req.base_ts, wall);
        *self.shared.hlc.lock() = self.clock.last();
        {
            let mut d = self.shared.durable_hlc.lock();
            *d = (*d).max(req.base_ts);
        }
        self.publish_wal_stats();
        self.shared.durable_changed.notify_waiters();
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

    fn compact(&mut self) {
        while let Ok(upto) = self.compact_rx.try_recv() {
            match self.wal.remove_covered(upto) {
                Ok(_) => {
                    // Entries gone from the WAL can only reach a peer by
                    // snapshot: say so to the catch-up rules.
                    let first = self.wal.first_index();
                    self.shared.log.lock().compact_to(first.saturating_sub(1));
                    self.publish_wal_stats();
                }
                Err(e) => eprintln!("kvd: WAL compaction failed (will retry later): {e}"),
            }
        }
    }
}

/// The snapshot thread.
struct Snapshotter {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    state: Arc<State>,
    shared: Arc<Shared>,
    metrics: Option<Arc<Metrics>>,
    compact_tx: std_mpsc::Sender<u64>,
}

impl Snapshotter {
    fn run(self, rx: std_mpsc::Receiver<snapshot::SnapshotMeta>) {
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
                Err(e) => eprintln!("kvd: snapshot at index {} failed: {e}", meta.last_index),
            }
            self.shared.snapshot_running.store(false, Ordering::Release);
        }
    }

    fn take(&self, meta: snapshot::SnapshotMeta) -> Result<(), Error> {
        let lww = self
            .shared
            .masterless
            .load(Ordering::Acquire)
            .then_some(&*self.shared.lww);
        let (path, _size) = snapshot::write(self.fs.as_ref(), &self.dir, &self.state, lww, meta)?;
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

/// Path of the WAL directory under a data dir.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}
