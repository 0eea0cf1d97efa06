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
//! - After a failed write or fsync the engine is poisoned and refuses writes.
//!
//! Threads: the WAL writer owns the log and applies; the snapshotter writes
//! snapshots in the background and hands compaction back to the writer, so
//! every WAL file operation happens on one thread.

pub mod fs;
pub mod record;
pub mod snapshot;
pub mod state;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

pub use fs::{Fs, RealFs};
pub use record::{Op, Record, Timestamp};
pub use state::{ApplyOutcome, State};

use crate::metrics::Metrics;

/// Longest key, in bytes (DESIGN §2).
pub const MAX_KEY_BYTES: usize = 1024;

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
    #[error("write not durable: {0}")]
    NotDurable(String),
    #[error("the storage engine is shutting down")]
    ShuttingDown,
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
        }
    }
}

/// Result of one acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteResult {
    pub index: u64,
    pub outcome: ApplyOutcome,
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
    pub poisoned: bool,
}

/// Resolves when a submitted write is durable and applied.
pub type Pending = oneshot::Receiver<Result<WriteResult, Error>>;

struct WriteReq {
    op: Op,
    /// False for `debug_flaky`: durable in the WAL but kept out of memory.
    apply: bool,
    reply: oneshot::Sender<Result<WriteResult, Error>>,
}

/// Counters shared between the engine's threads and readers.
#[derive(Default)]
struct Shared {
    last_index: AtomicU64,
    applied_index: AtomicU64,
    snapshot_index: AtomicU64,
    wal_bytes: AtomicU64,
    wal_segments: AtomicU64,
    poisoned: AtomicBool,
    snapshot_running: AtomicBool,
}

/// The storage engine handle. Cheap to share behind an `Arc`.
pub struct Engine {
    state: Arc<State>,
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<WriteReq>>>,
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
        let state = Arc::new(State::new());

        let mut snap_meta = snapshot::SnapshotMeta::default();
        let snapshots = snapshot::list(fs.as_ref(), &snap_dir)?;
        if let Some((_, path)) = snapshots.first() {
            // The newest snapshot is the only one whose WAL suffix is
            // guaranteed to exist; a damaged one is damaged acknowledged data.
            snap_meta = snapshot::load(fs.as_ref(), path, &state, record::MAX_PAYLOAD_BYTES)?;
        }
        for (_, older) in snapshots.iter().skip(1) {
            let _ = fs.remove(older);
        }

        let (wal, wal_report) = wal::Wal::open(
            fs.clone(),
            &wal_dir,
            snap_meta.last_index,
            cfg.segment_max_bytes,
            |rec| {
                state.apply(&rec.op);
            },
        )?;
        let last_index = wal.next_index() - 1;
        let shared = Arc::new(Shared::default());
        shared.last_index.store(last_index, Ordering::Relaxed);
        shared.applied_index.store(last_index, Ordering::Relaxed);
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
            clock: Clock::new(cfg.node_tag),
            // Replayed WAL bytes count toward the next snapshot.
            bytes_since_snapshot: shared.wal_bytes.load(Ordering::Relaxed),
            first_unapplied: None,
            snap_tx,
            compact_rx,
        };
        let snapshotter = Snapshotter {
            fs,
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
    fn prepare(
        &self,
        op: Op,
        apply: bool,
    ) -> Result<(mpsc::Sender<WriteReq>, WriteReq, Pending), Error> {
        if self.shared.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        let tx = self.tx.lock().clone().ok_or(Error::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        Ok((tx, WriteReq { op, apply, reply }, rx))
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.state.get(key)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Relaxed)
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
            poisoned: s.poisoned.load(Ordering::Relaxed),
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

/// Hybrid logical clock for record timestamps: strictly increasing even if
/// the wall clock steps back.
struct Clock {
    last: Timestamp,
}

impl Clock {
    fn new(node: u32) -> Self {
        Clock {
            last: Timestamp {
                physical_ms: 0,
                logical: 0,
                node,
            },
        }
    }

    fn now(&mut self) -> Timestamp {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if wall > self.last.physical_ms {
            self.last.physical_ms = wall;
            self.last.logical = 0;
        } else {
            self.last.logical += 1;
        }
        self.last
    }
}

/// The WAL thread: batches, fsyncs, applies, replies.
struct Writer {
    wal: wal::Wal,
    state: Arc<State>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    metrics: Option<Arc<Metrics>>,
    clock: Clock,
    bytes_since_snapshot: u64,
    /// Lowest index logged but deliberately not applied (`debug_flaky`);
    /// snapshots must not claim to cover it.
    first_unapplied: Option<u64>,
    snap_tx: std_mpsc::SyncSender<snapshot::SnapshotMeta>,
    compact_rx: std_mpsc::Receiver<u64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        let mut batch: Vec<WriteReq> = Vec::with_capacity(self.cfg.max_batch_records);
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.op.encoded_len();
            batch.push(first);
            while batch.len() < self.cfg.max_batch_records && bytes < self.cfg.max_batch_bytes {
                match rx.try_recv() {
                    Ok(req) => {
                        bytes += req.op.encoded_len();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, &mut buf);
            self.compact();
        }
        // The channel is closed and drained: every reply went out after its
        // fsync, so there is nothing left to flush.
    }

    fn commit(&mut self, batch: &mut Vec<WriteReq>, buf: &mut Vec<u8>) {
        let first = self.wal.next_index();
        buf.clear();
        let epoch = self.cfg.epoch;
        for (i, req) in batch.iter().enumerate() {
            record::encode(first + i as u64, epoch, self.clock.now(), &req.op, buf);
        }
        let count = batch.len() as u64;
        let fsync_started = Instant::now();
        let durable = self
            .wal
            .append(first, count, buf, epoch)
            .and_then(|_| self.wal.sync());
        if let Err(e) = durable {
            self.shared.poisoned.store(true, Ordering::Relaxed);
            eprintln!("kvd: WAL write failed, refusing further writes: {e}");
            let msg = e.to_string();
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(Error::NotDurable(msg.clone())));
            }
            return;
        }
        if let Some(m) = &self.metrics {
            m.wal_fsync_seconds
                .observe(fsync_started.elapsed().as_secs_f64());
            m.wal_batch_records.observe(count as f64);
        }
        self.shared
            .last_index
            .store(first + count - 1, Ordering::Release);
        for (i, req) in batch.drain(..).enumerate() {
            let index = first + i as u64;
            let outcome = if req.apply {
                self.state.apply(&req.op)
            } else {
                self.first_unapplied.get_or_insert(index);
                ApplyOutcome::default()
            };
            self.shared.applied_index.store(index, Ordering::Release);
            let _ = req.reply.send(Ok(WriteResult { index, outcome }));
        }
        self.bytes_since_snapshot += buf.len() as u64;
        self.publish_wal_stats();
        self.maybe_snapshot();
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
            last_epoch: self.wal.last_epoch(),
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
                Ok(_) => self.publish_wal_stats(),
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
        let (path, _size) = snapshot::write(self.fs.as_ref(), &self.dir, &self.state, meta)?;
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
