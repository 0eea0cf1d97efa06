//! The masterless runtime: streams, write quorums, anti-entropy, purging.
//!
//! # Streaming (each node's own writes to each peer)
//!
//! One task per peer sends the records of this node's log that this node
//! stamped itself (`ts.node` is our tag), in log order, from the peer's
//! position: `POST /internal/ml/stream`, one request in flight per peer,
//! batches up to 4 MiB, an empty one every 100 ms when idle. The RECEIVER
//! owns the position: after it has merged a batch durably
//! ([`Engine::ingest`] fsyncs before returning) it answers `{"pos": N}`
//! ("origin X: through X's index N"); the sender always continues from
//! `pos + 1`. The positions reach `ml-recv.json` (temp file, fsync,
//! rename) from a keeper task, one store at a time, each taking every
//! change made meanwhile: no answer waits for the file, and batches of
//! different origins are merged concurrently (one at a time per origin),
//! so the WAL writer can put them under one fsync. A restart of either
//! side resumes where the receiver's stored copy ends: the sender learns
//! the position from the first answer. A position file behind the WAL
//! only means records arrive twice, which the merge ignores; the stable
//! time counts only positions stored.
//!
//! If the sender's WAL no longer holds `pos + 1` (compacted after a
//! snapshot), it sends from its oldest entry with `gap = 1`; anti-entropy
//! repairs what the gap held. A receiver that holds no position for an
//! origin at all (a node that joined a running cluster) takes the origin's
//! first batch as a gap at the sender's end, merging none of it
//! ([`rules::receive_first`]): a WAL's history may hold puts whose deletes
//! the cluster has purged since.
//!
//! # Write quorum
//!
//! A local write is acknowledged once durable here and, with
//! `--write-quorum W`, once `W - 1` peers have answered a stream request
//! with a position at or past its index.
//!
//! # Anti-entropy
//!
//! Every 250 ms, for each peer: `GET /internal/ml/digest` (the peer's 1024
//! bucket digests, its durable clock and stable time), compare with ours,
//! and for differing buckets `POST /internal/ml/buckets` to pull their
//! versions (keys with stamps, values, tombstones), merged like any peer
//! write. Every node pulls from every peer, so differences disappear in
//! both directions. While a stream gap is open for the peer's origin, a
//! round pulls every bucket (digests leave tombstones out, so equal ones
//! do not prove we hold them), and only then may the gap close.
//!
//! # The peer set
//!
//! Each peer owns its stream and anti-entropy tasks. `set_peers`
//! (`POST /v1/admin/peers`, docs/DESIGN.md §5.9) starts an added peer's
//! and stops (awaits) a removed peer's before it answers; the stable time,
//! the purges, quorums and status read the current set.
//!
//! # Tombstone purging
//!
//! Each stream request carries the sender's durable clock `H` when the batch
//! reaches the end of its log: "you now have every write I stamped at or
//! before H". The receiver keeps the largest such `H` per origin (durably,
//! with the position). A node's *stable time* is the minimum over origins;
//! the *global stable time* (GST) is the minimum of its own and every peer's
//! (learned from digests), zero unless every peer counts as many members
//! as we do (a peer-set change half done). A tombstone older than the GST
//! is held by every node, and no older write for its key can still arrive from any stream,
//! so it can go. A stream gap freezes the origin's `H` until an
//! anti-entropy round finds the origin and us equal.
//!
//! # Wire formats (version 1, integers little-endian)
//!
//! ```text
//! stream request: b"KVML" | version u32 | from u64 | upto u64
//!   | hlc_ms u64 | hlc_logical u32 | hlc_node u32 | complete u8 | gap u8
//!   | origin_len u16 | origin (node id, UTF-8) | WAL frames (storage::record)
//! buckets answer: WAL frames, index 0, epoch 0, Put or Delete per version
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kvproto::bytes::{PutLe, Reader};
use kvproto::status::{MasterlessPeer, MasterlessStatus};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::hlc::node_tag;
pub use super::rules::RecvPos;
use super::rules::{self, Batch, Receive};
use crate::storage::fs::Fs;
use crate::storage::lww::BUCKETS;
use crate::storage::record::{self, Record};
use crate::storage::{self, Engine, Op, Timestamp};
use crate::tasks::Tasks;

const MAGIC: &[u8; 4] = b"KVML";
const VERSION: u32 = 1;
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most bytes of versions in one buckets answer.
pub const MAX_BUCKETS_ANSWER_BYTES: usize = 8 << 20;
const IDLE: Duration = Duration::from_millis(100);
const ANTI_ENTROPY_EVERY: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Buckets asked for in one request.
const BUCKETS_PER_REQUEST: usize = 128;
const RECV_FILE: &str = "ml-recv.json";

/// Static settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub advertise_url: String,
    pub peers: Vec<String>,
    /// Nodes (this one included) holding a write durably before its ack.
    pub write_quorum: usize,
    pub data_dir: PathBuf,
}

struct Peer {
    url: String,
    /// Its stream and anti-entropy tasks, stopped when it leaves the set.
    tasks: Tasks,
    /// Members (the peer and its peers) its last digest answer counted; 0
    /// until it answered.
    members: AtomicU64,
    /// The peer's node id, once a digest answer told us.
    node_id: Mutex<Option<String>>,
    /// Our log position the peer holds durably (from its last answer).
    acked: AtomicU64,
    /// Whether `acked` was heard from the peer since we started.
    known: AtomicBool,
    reachable: AtomicBool,
    last_ack: Mutex<Option<Instant>>,
    /// The peer's stable time, from its last digest answer.
    stable: Mutex<Timestamp>,
    /// Whether the last anti-entropy round found every bucket equal.
    in_sync: AtomicBool,
}

impl Peer {
    fn new(url: &str) -> Peer {
        Peer {
            url: rules::peer_url(url),
            tasks: Tasks::new(),
            members: AtomicU64::new(0),
            node_id: Mutex::new(None),
            acked: AtomicU64::new(0),
            known: AtomicBool::new(false),
            reachable: AtomicBool::new(false),
            last_ack: Mutex::new(None),
            stable: Mutex::new(Timestamp::default()),
            in_sync: AtomicBool::new(false),
        }
    }
}

/// `ml-recv.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RecvFile {
    format_version: u32,
    origins: BTreeMap<String, RecvPos>,
}

/// A decoded stream request.
pub struct StreamBody {
    pub from: u64,
    pub upto: u64,
    pub hlc: Timestamp,
    pub complete: bool,
    pub gap: bool,
    pub origin: String,
    pub records: Vec<Record>,
}

/// The answer to `GET /internal/ml/digest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DigestAnswer {
    pub node_id: String,
    /// Durable clock and last index, read before the digests.
    pub durable_hlc: Timestamp,
    pub last_index: u64,
    pub stable: Timestamp,
    /// This node and its peers: how many it counts (0 from a node that
    /// does not say).
    #[serde(default)]
    pub members: u64,
    /// `BUCKETS` little-endian u64 digests, base64.
    pub buckets: String,
}

/// What a peer-set change did (`POST /v1/admin/peers`).
#[derive(Debug, Clone, Serialize)]
pub struct PeersAnswer {
    pub peers: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Why a peer-set change was refused.
#[derive(Debug)]
pub enum PeersError {
    /// The set itself (400 `invalid_peers`).
    Invalid(String),
    /// The runtime has stopped (a mode switch, a shutdown).
    Stopped,
}

/// The masterless state of this node.
pub struct MlNode {
    engine: Arc<Engine>,
    settings: Settings,
    tag: u32,
    /// The current peer set, in the order it was given. Changed only under
    /// `changing`; readers take a copy of the `Arc`s.
    peers: parking_lot::RwLock<Vec<Arc<Peer>>>,
    /// Held by a peer-set change and by `stop`, so none starts tasks after
    /// the runtime stopped.
    changing: tokio::sync::Mutex<()>,
    /// The positions as this node knows them: ahead of the file while a
    /// store is due.
    recv: tokio::sync::Mutex<RecvFile>,
    /// The origins as last stored in `ml-recv.json` (no await needed):
    /// what the stable time, gaps and status count, so none of them
    /// counts a position a crash could take back.
    recv_view: Mutex<BTreeMap<String, RecvPos>>,
    /// Rung when `recv` changes; the position keeper then stores it.
    recv_changed: Notify,
    /// Held while `ml-recv.json` is written, by the keeper's blocking
    /// store and the last one at stop alike (a stopped keeper's blocking
    /// store may still be running).
    recv_store: Arc<Mutex<()>>,
    /// One per origin (a few: the peers, past and present).
    origin_locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    acked: Notify,
    stopped: AtomicBool,
    /// The clock tick and the purges (each peer owns its own tasks).
    tasks: Tasks,
    http: reqwest::Client,
    repaired: AtomicU64,
    purged: AtomicU64,
    /// Stream batches accepted across a compaction gap.
    gaps: AtomicU64,
    gst: Mutex<Timestamp>,
}

impl MlNode {
    /// A runtime for `engine` (already in masterless mode). `reset_to`:
    /// after a mode switch, every origin's log restarts after this index
    /// and everyone holds everything stamped up to the given base stamp.
    pub fn new(
        engine: Arc<Engine>,
        settings: Settings,
        reset_to: Option<(u64, Timestamp)>,
    ) -> Result<Arc<MlNode>, storage::Error> {
        let path = settings.data_dir.join(RECV_FILE);
        let fs = engine.fs();
        let recv = match reset_to {
            Some((base, ts)) => {
                let file = RecvFile {
                    format_version: 1,
                    origins: BTreeMap::from([(
                        "*".to_string(),
                        RecvPos {
                            pos: base,
                            hlc: ts,
                            gap: false,
                        },
                    )]),
                };
                store_recv(fs.as_ref(), &settings.data_dir, &file)?;
                file
            }
            None => match fs.read(&path) {
                // A damaged or missing file only makes peers resend.
                Ok(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
                    tracing::warn!(
                        node = %settings.node_id,
                        file = %path.display(),
                        error = %e,
                        "ignoring an unreadable file; peers will resend"
                    );
                    RecvFile::default()
                }),
                Err(_) => RecvFile::default(),
            },
        };
        let peers = settings
            .peers
            .iter()
            .map(|url| Arc::new(Peer::new(url)))
            .collect();
        let http = crate::peer_http::client(REQUEST_TIMEOUT);
        Ok(Arc::new(MlNode {
            tag: node_tag(&settings.node_id),
            recv_view: Mutex::new(recv.origins.clone()),
            recv: tokio::sync::Mutex::new(recv),
            recv_changed: Notify::new(),
            recv_store: Arc::new(Mutex::new(())),
            origin_locks: Mutex::new(BTreeMap::new()),
            engine,
            settings,
            peers: parking_lot::RwLock::new(peers),
            changing: tokio::sync::Mutex::new(()),
            acked: Notify::new(),
            stopped: AtomicBool::new(false),
            tasks: Tasks::new(),
            http,
            repaired: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            gst: Mutex::new(Timestamp::default()),
        }))
    }

    /// Starts every peer's stream and anti-entropy tasks, and the purges.
    pub fn start(self: &Arc<Self>) {
        for peer in self.peers() {
            self.start_peer(&peer);
        }
        self.tasks
            .spawn_on(self, |me| async move { me.housekeeping().await });
        self.tasks
            .spawn_on(self, |me| async move { me.keep_positions().await });
    }

    fn start_peer(self: &Arc<Self>, peer: &Arc<Peer>) {
        let (me, p) = (self.clone(), peer.clone());
        peer.tasks.spawn(async move { me.stream_to(p).await });
        let (me, p) = (self.clone(), peer.clone());
        peer.tasks.spawn(async move { me.anti_entropy(p).await });
    }

    /// Stops the background tasks, waiting until they are gone (a mode
    /// switch, a shutdown); handlers refuse after.
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.acked.notify_waiters();
        let _changing = self.changing.lock().await;
        for peer in self.peers() {
            peer.tasks.stop().await;
        }
        self.tasks.stop().await;
        // What the keeper had not stored yet: a restart then resumes every
        // stream where it stood.
        self.store_positions().await;
    }

    /// A copy of the current peer set.
    fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.read().clone()
    }

    /// The current peers' URLs.
    pub fn peer_urls(&self) -> Vec<String> {
        self.peers.read().iter().map(|p| p.url.clone()).collect()
    }

    /// Replaces the peer set with `new` (docs/DESIGN.md §5.9): returns once
    /// every added peer's stream and anti-entropy run and every removed
    /// peer's have ended. The same set again changes nothing.
    pub async fn set_peers(self: &Arc<Self>, new: &[String]) -> Result<PeersAnswer, PeersError> {
        let _changing = self.changing.lock().await;
        if self.is_stopped() {
            return Err(PeersError::Stopped);
        }
        let change = rules::change_peers(
            &self.peer_urls(),
            new,
            &self.settings.advertise_url,
            self.settings.write_quorum,
        )
        .map_err(PeersError::Invalid)?;
        let current = self.peers();
        let mut next = Vec::with_capacity(change.peers.len());
        let mut started = Vec::new();
        for url in &change.peers {
            match current.iter().find(|p| &p.url == url) {
                Some(p) => next.push(p.clone()),
                None => {
                    let p = Arc::new(Peer::new(url));
                    self.start_peer(&p);
                    started.push(p.clone());
                    next.push(p);
                }
            }
        }
        let gone: Vec<Arc<Peer>> = current
            .iter()
            .filter(|p| change.removed.contains(&p.url))
            .cloned()
            .collect();
        // From here on the stable time, the purges, quorums and status see
        // the new set; the removed peers' tasks end before we answer.
        *self.peers.write() = next;
        for p in &gone {
            p.tasks.stop().await;
        }
        self.acked.notify_waiters();
        tracing::info!(
            node = %self.settings.node_id,
            peers = ?change.peers,
            added = ?change.added,
            removed = ?change.removed,
            "peer set changed"
        );
        Ok(PeersAnswer {
            peers: change.peers,
            added: change.added,
            removed: change.removed,
        })
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn write_quorum(&self) -> usize {
        self.settings.write_quorum
    }

    /// Waits until `write_quorum - 1` peers hold our log through `index`.
    pub async fn wait_quorum(&self, index: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.acked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let peers = self.peers();
            let acks = peers.iter().map(|p| p.acked.load(Ordering::Acquire));
            if rules::has_quorum(acks, index, self.settings.write_quorum) {
                return true;
            }
            if self.is_stopped() {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    // ----- streaming, sender side -----

    async fn stream_to(self: Arc<Self>, peer: Arc<Peer>) {
        // Until the peer tells us its position, offer nothing but our end.
        let mut next = self.engine.durable_hlc().1.saturating_add(1);
        while !self.is_stopped() {
            let durable = self.engine.durable_notify().notified();
            tokio::pin!(durable);
            durable.as_mut().enable();
            let (hlc, last) = self.engine.durable_hlc();
            let first = self.engine.first_log_index();
            let (from, gap) = rules::send_from(next, first);
            let records = if from <= last {
                match self.engine.entries_from(from, MAX_BATCH_BYTES).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(node = %self.settings.node_id, peer = %peer.url, error = %e, "reading entries to stream");
                        tokio::time::sleep(IDLE).await;
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            let upto = records.last().map_or(from - 1, |r| r.index);
            let complete = upto >= last;
            // Expiries are each node's own (docs/DESIGN.md §5.7): never
            // streamed (a peer would ignore them anyway).
            let own: Vec<Record> = records
                .into_iter()
                .filter(|r| r.ts.node == self.tag && streams(&r.op))
                .collect();
            let body = encode_stream(from, upto, hlc, complete, gap, &self.settings.node_id, &own);
            let reply =
                crate::peer_http::post_body(&self.http, &peer.url, "/internal/ml/stream", body)
                    .await;
            let pos = match reply {
                Ok(r) if r.status().is_success() => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["pos"].as_u64()),
                _ => None,
            };
            peer.reachable.store(pos.is_some(), Ordering::Release);
            let Some(pos) = pos else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            *peer.last_ack.lock() = Some(Instant::now());
            peer.acked.store(pos, Ordering::Release);
            peer.known.store(true, Ordering::Release);
            self.acked.notify_waiters();
            next = pos.saturating_add(1);
            if complete && pos >= last {
                tokio::select! {
                    _ = durable => {}
                    _ = tokio::time::sleep(IDLE) => {}
                }
            }
        }
    }

    // ----- streaming, receiver side -----

    /// Merges a peer's stream batch; answers our durable position for it.
    /// A batch whose clock or any record fails the checks of
    /// [`Engine::ingest`] is refused whole, changing nothing.
    pub async fn handle_stream(&self, body: StreamBody) -> Result<u64, crate::storage::Error> {
        // The sender's clock becomes our stable time for it, which decides
        // tombstone purges: it must be no more believable than its records.
        self.engine.check_stamp(body.hlc)?;
        // One batch of an origin at a time, from the decision to the
        // stored position; other origins' batches go on meanwhile, so
        // their merges can share the WAL's next fsync.
        let origin = self.origin_lock(&body.origin);
        let _one_batch = origin.lock().await;
        let held = {
            let recv = self.recv.lock().await;
            recv.origins
                .get(&body.origin)
                .or_else(|| recv.origins.get("*"))
                .copied()
        };
        let batch = Batch {
            from: body.from,
            upto: body.upto,
            hlc: body.hlc,
            complete: body.complete,
            gap: body.gap,
        };
        let decision = match held {
            Some(cur) => rules::receive(cur, batch),
            None => rules::receive_first(batch),
        };
        match decision {
            Receive::Answer { pos, store } => {
                if let Some(next) = store {
                    self.store(&body.origin, next).await;
                }
                Ok(pos)
            }
            Receive::Ingest { next, crossed_gap } => {
                if !body.records.is_empty() {
                    self.engine.ingest(body.records).await?;
                }
                if crossed_gap {
                    self.gaps.fetch_add(1, Ordering::Relaxed);
                }
                // Never ahead of the WAL: stored after the ingest's fsync.
                self.store(&body.origin, next).await;
                Ok(next.pos)
            }
            Receive::Skip { next } => {
                self.gaps.fetch_add(1, Ordering::Relaxed);
                self.store(&body.origin, next).await;
                Ok(next.pos)
            }
        }
    }

    /// Records `origin`'s new position; the keeper stores it. The answer
    /// need not wait: the records it counts are durable in the WAL
    /// already, and a file that lags the WAL only makes peers resend.
    async fn store(&self, origin: &str, pos: RecvPos) {
        self.recv
            .lock()
            .await
            .origins
            .insert(origin.to_string(), pos);
        self.recv_changed.notify_one();
    }

    /// The lock under which `origin`'s position is decided and changed.
    fn origin_lock(&self, origin: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.origin_locks
            .lock()
            .entry(origin.to_string())
            .or_default()
            .clone()
    }

    /// Stores the positions whenever they change, one store at a time:
    /// changes made during a store are taken by the next one, so under
    /// load the file is written back to back, off every answer's path.
    async fn keep_positions(self: Arc<Self>) {
        loop {
            self.recv_changed.notified().await;
            self.store_positions().await;
        }
    }

    /// Writes the current positions to `ml-recv.json` (fsync'd), then
    /// makes them the ones the stable time counts.
    async fn store_positions(&self) {
        let file = self.recv.lock().await.clone();
        let dir = self.settings.data_dir.clone();
        let fs = self.engine.fs();
        let lock = self.recv_store.clone();
        let origins = file.origins.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = lock.lock();
            store_recv(fs.as_ref(), &dir, &file)
        })
        .await;
        let failed = match stored {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        match failed {
            None => *self.recv_view.lock() = origins,
            Some(error) => tracing::warn!(
                node = %self.settings.node_id,
                file = RECV_FILE,
                error,
                "could not store the stream positions; peers may resend"
            ),
        }
    }

    // ----- anti-entropy -----

    /// This node's answer to a digest request.
    pub fn digest_answer(&self) -> DigestAnswer {
        let (durable_hlc, last_index) = self.engine.durable_hlc();
        let digests = self.engine.lww().digests();
        let mut raw = Vec::with_capacity(digests.len() * 8);
        for d in digests {
            raw.extend_from_slice(&d.to_le_bytes());
        }
        DigestAnswer {
            node_id: self.settings.node_id.clone(),
            durable_hlc,
            last_index,
            stable: self.stable_time(),
            members: self.peers.read().len() as u64 + 1,
            buckets: base64::engine::general_purpose::STANDARD.encode(raw),
        }
    }

    /// The versions of the asked buckets, as WAL frames (answer capped at
    /// [`MAX_BUCKETS_ANSWER_BYTES`], whole buckets, at least one).
    pub fn buckets_answer(&self, buckets: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in buckets {
            if b >= BUCKETS {
                continue;
            }
            if !out.is_empty() && out.len() >= MAX_BUCKETS_ANSWER_BYTES {
                break;
            }
            for v in self.engine.lww().bucket(self.engine.state(), b) {
                record::encode(0, 0, v.ts, &v.to_op(), &mut out);
            }
        }
        out
    }

    /// Our stable time: every origin's writes up to it are here.
    pub fn stable_time(&self) -> Timestamp {
        let view = self.recv_view.lock();
        let base = view.get("*").copied().unwrap_or_default();
        let held: Vec<Option<Timestamp>> = self
            .peers()
            .iter()
            .map(|p| {
                let id = p.node_id.lock().clone()?;
                Some(view.get(&id).copied().unwrap_or(base).hlc)
            })
            .collect();
        rules::stable_time(&held, self.engine.durable_hlc().0)
    }

    /// Anti-entropy with one peer, every 250 ms, until it leaves the set.
    async fn anti_entropy(self: Arc<Self>, peer: Arc<Peer>) {
        while !self.is_stopped() {
            tokio::time::sleep(ANTI_ENTROPY_EVERY).await;
            if let Err(e) = self.sync_with(&peer).await {
                peer.in_sync.store(false, Ordering::Release);
                let _ = e; // unreachable peers are normal; status shows it
            }
        }
    }

    /// Every 250 ms: the idle clock tick, and purging the tombstones below
    /// the global stable time over the current peer set.
    async fn housekeeping(self: Arc<Self>) {
        while !self.is_stopped() {
            tokio::time::sleep(ANTI_ENTROPY_EVERY).await;
            let _ = self.engine.tick_clock().await;
            let peers = self.peers();
            let members = peers.len() as u64 + 1;
            let views = peers
                .iter()
                .map(|p| (*p.stable.lock(), p.members.load(Ordering::Acquire)));
            let gst = rules::purge_time(self.stable_time(), members, views);
            *self.gst.lock() = gst;
            if gst > Timestamp::default() {
                if let Ok(n) = self.engine.purge_tombstones(gst).await {
                    self.purged.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    async fn sync_with(&self, peer: &Peer) -> anyhow::Result<()> {
        let answer: DigestAnswer = self
            .http
            .get(format!("{}/internal/ml/digest", peer.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        // Its clocks feed our stable times (and purges): held to the same
        // bound as its records' stamps.
        self.engine.check_stamp(answer.durable_hlc)?;
        self.engine.check_stamp(answer.stable)?;
        *peer.node_id.lock() = Some(answer.node_id.clone());
        *peer.stable.lock() = answer.stable;
        peer.members.store(answer.members, Ordering::Release);
        let raw = base64::engine::general_purpose::STANDARD.decode(&answer.buckets)?;
        anyhow::ensure!(raw.len() == BUCKETS * 8, "digest answer has the wrong size");
        let mine = self.engine.lww().digests();
        let differing: Vec<usize> = (0..BUCKETS)
            .filter(|&b| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&raw[b * 8..b * 8 + 8]);
                u64::from_le_bytes(w) != mine[b]
            })
            .collect();
        // With a gap open for this origin, equal digests do not prove we
        // hold its tombstones (digests leave them out): pull every bucket,
        // and only then may the gap close.
        let gap_open = self
            .recv_view
            .lock()
            .get(&answer.node_id)
            .is_some_and(|r| r.gap);
        if differing.is_empty() && !gap_open {
            peer.in_sync.store(true, Ordering::Release);
            return Ok(());
        }
        peer.in_sync.store(differing.is_empty(), Ordering::Release);
        let pull: Vec<usize> = if gap_open {
            (0..BUCKETS).collect()
        } else {
            differing
        };
        self.pull(peer, &pull).await?;
        if gap_open {
            self.close_gap(&answer).await;
        }
        Ok(())
    }

    /// Pulls the versions of `buckets` from `peer` and merges them. An
    /// answer may stop early at its size cap (whole buckets), so a chunk
    /// whose answer reached the cap is asked again bucket by bucket: a
    /// one-bucket answer is never cut.
    async fn pull(&self, peer: &Peer, buckets: &[usize]) -> anyhow::Result<()> {
        for chunk in buckets.chunks(BUCKETS_PER_REQUEST) {
            let n = self.pull_chunk(peer, chunk).await?;
            if n >= MAX_BUCKETS_ANSWER_BYTES && chunk.len() > 1 {
                for b in chunk {
                    self.pull_chunk(peer, std::slice::from_ref(b)).await?;
                }
            }
        }
        Ok(())
    }

    /// One buckets request, merged; the answer's size.
    async fn pull_chunk(&self, peer: &Peer, chunk: &[usize]) -> anyhow::Result<usize> {
        let bytes = self
            .http
            .post(format!("{}/internal/ml/buckets", peer.url))
            .json(&serde_json::json!({ "buckets": chunk }))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let records = decode_frames(&bytes, 0).map_err(anyhow::Error::msg)?;
        let n = records.len() as u64;
        if n > 0 {
            self.engine.ingest(records).await?;
            self.repaired.fetch_add(n, Ordering::Relaxed);
        }
        Ok(bytes.len())
    }

    /// After a stream gap, the origin's clock may advance again once we
    /// hold everything it held when it answered (every bucket pulled after
    /// its answer, and our stream position at its last index).
    async fn close_gap(&self, answer: &DigestAnswer) {
        let origin = self.origin_lock(&answer.node_id);
        let _one_change = origin.lock().await;
        let held = self.recv.lock().await.origins.get(&answer.node_id).copied();
        let Some(cur) = held else {
            return;
        };
        if let Some(next) = rules::close_gap(cur, answer.last_index, answer.durable_hlc) {
            self.store(&answer.node_id, next).await;
        }
    }

    // ----- status -----

    /// Masterless fields of `/v1/status`; `clock_offset_ms` is the wall
    /// clock's debug offset.
    pub fn status(&self, clock_offset_ms: i64) -> MasterlessStatus {
        let last = self.engine.durable_hlc().1;
        let view = self.recv_view.lock().clone();
        let base = view.get("*").copied().unwrap_or_default();
        let peers = self
            .peers()
            .iter()
            .map(|p| {
                let id = p.node_id.lock().clone();
                let acked = p.acked.load(Ordering::Acquire);
                let recv = id.as_ref().map(|id| view.get(id).copied().unwrap_or(base));
                MasterlessPeer {
                    acked_index: p.known.load(Ordering::Acquire).then_some(acked),
                    in_sync: p.in_sync.load(Ordering::Acquire),
                    lag_entries: last.saturating_sub(acked),
                    last_ack_ms_ago: p.last_ack.lock().map(|t| t.elapsed().as_millis() as u64),
                    node_id: id,
                    reachable: p.reachable.load(Ordering::Acquire),
                    received_hlc: recv.map(|r| r.hlc),
                    received_through: recv.map(|r| r.pos),
                    stable: *p.stable.lock(),
                    stream_gap: recv.map(|r| r.gap),
                    url: p.url.clone(),
                }
            })
            .collect();
        MasterlessStatus {
            clock_offset_ms,
            global_stable_time: *self.gst.lock(),
            lww_digest: format!("{:016x}", self.engine.lww().digest()),
            peers,
            purged_tombstones: self.purged.load(Ordering::Relaxed),
            repaired_versions: self.repaired.load(Ordering::Relaxed),
            stable_time: self.stable_time(),
            stream_gaps_total: self.gaps.load(Ordering::Relaxed),
            tombstones: self.engine.lww().tombstones(),
            write_quorum: self.settings.write_quorum as u64,
        }
    }

    /// `(peer URL, entries of our log it does not hold yet)`.
    pub fn peer_lags(&self) -> Vec<(String, u64)> {
        let last = self.engine.durable_hlc().1;
        self.peers()
            .iter()
            .map(|p| {
                (
                    p.url.clone(),
                    last.saturating_sub(p.acked.load(Ordering::Acquire)),
                )
            })
            .collect()
    }
}

/// Replaces `ml-recv.json` durably (temp file, fsync, rename, directory
/// fsync), through the engine's file system.
fn store_recv(fs: &dyn Fs, dir: &Path, file: &RecvFile) -> Result<(), storage::Error> {
    let tmp = dir.join(format!("{RECV_FILE}.tmp"));
    let path = dir.join(RECV_FILE);
    let mut file = file.clone();
    file.format_version = 1;
    let raw = serde_json::to_vec(&file).map_err(|e| storage::Error::Decode(e.to_string()))?;
    let io = |e| storage::Error::io(format!("storing {}", path.display()), e);
    let mut f = fs.create(&tmp).map_err(io)?;
    f.write_all(&raw).map_err(io)?;
    f.sync_data().map_err(io)?;
    drop(f);
    fs.rename(&tmp, &path).map_err(io)?;
    fs.sync_dir(dir).map_err(io)
}

/// Encodes a stream request (format in the module docs).
pub fn encode_stream(
    from: u64,
    upto: u64,
    hlc: Timestamp,
    complete: bool,
    gap: bool,
    origin: &str,
    records: &[Record],
) -> Vec<u8> {
    record::body_with_records(MAGIC, VERSION, records, |out| {
        out.put_u64(from);
        out.put_u64(upto);
        out.put_u64(hlc.physical_ms);
        out.put_u32(hlc.logical);
        out.put_u32(hlc.node);
        out.push(u8::from(complete));
        out.push(u8::from(gap));
        out.put_str16(origin);
    })
}

/// The fixed part of a stream request, before the origin's bytes.
struct StreamHeader {
    from: u64,
    upto: u64,
    hlc: Timestamp,
    complete: bool,
    gap: bool,
    origin_len: u16,
}

/// Reads the fixed part; `None` if the body ends inside it.
fn stream_header(r: &mut Reader<'_>) -> Option<StreamHeader> {
    Some(StreamHeader {
        from: r.u64()?,
        upto: r.u64()?,
        hlc: Timestamp {
            physical_ms: r.u64()?,
            logical: r.u32()?,
            node: r.u32()?,
        },
        complete: r.flag()?,
        gap: r.flag()?,
        origin_len: r.u16()?,
    })
}

/// Decodes a stream request; every error is a 400 for the sender.
pub fn decode_stream(body: &[u8]) -> Result<StreamBody, String> {
    const FIXED: usize = 4 + 4 + 8 + 8 + 8 + 4 + 4 + 1 + 1 + 2;
    let mut r = Reader::new(body);
    record::check_body_start(&mut r, body.len(), (MAGIC, VERSION), FIXED, "stream")?;
    let short = || "stream body ends inside its header".to_string();
    let h = stream_header(&mut r).ok_or_else(short)?;
    let origin = r
        .bytes(usize::from(h.origin_len))
        .ok_or("stream body ends inside the origin")?;
    let origin = std::str::from_utf8(origin)
        .map_err(|_| "origin is not UTF-8".to_string())?
        .to_string();
    if origin.is_empty() || origin == "*" {
        return Err("origin must be a node id".into());
    }
    if h.from == 0 || h.upto.saturating_add(1) < h.from {
        return Err(format!("bad range {}..={}", h.from, h.upto));
    }
    let records = decode_frames(body, r.offset())?;
    Ok(StreamBody {
        from: h.from,
        upto: h.upto,
        hlc: h.hlc,
        complete: h.complete,
        gap: h.gap,
        origin,
        records,
    })
}

/// Whether a record of this node's own goes to its peers: its writes, not
/// its expiries (nor leases, which masterless mode does not take, nor a
/// primary/secondary configuration left in its log from before a switch).
fn streams(op: &Op) -> bool {
    !matches!(
        op,
        Op::Expire { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseKeepAlive { .. }
            | Op::LeaseRevoke { .. }
            | Op::Config { .. }
    )
}

/// Decodes contiguous WAL frames of writes (no no-ops, no configurations)
/// from `off` to the end of `buf`.
pub fn decode_frames(buf: &[u8], off: usize) -> Result<Vec<Record>, String> {
    record::decode_frames(buf, off, |rec| match rec.op {
        Op::Noop => Err("a no-op is not a write".into()),
        Op::Config { .. } => Err("a configuration is not a masterless write".into()),
        _ => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use bytes::Bytes;

    #[test]
    fn expiries_and_leases_are_never_streamed() {
        let key = Bytes::from_static(b"k");
        assert!(!streams(&Op::Expire {
            keys: vec![(key.clone(), 1)]
        }));
        assert!(!streams(&Op::LeaseGrant { ttl_ms: 5 }));
        assert!(!streams(&Op::LeaseRevoke {
            id: 1,
            expired: true
        }));
        assert!(streams(&Op::Delete { key }));
    }

    #[test]
    fn stream_body_round_trips() {
        let rec = Record {
            index: 7,
            epoch: 1,
            ts: Timestamp {
                physical_ms: 5,
                logical: 2,
                node: 9,
            },
            op: Op::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
                expiry: Expiry::Never,
            },
        };
        let hlc = Timestamp {
            physical_ms: 6,
            logical: 0,
            node: 9,
        };
        let body = encode_stream(3, 7, hlc, true, false, "n1", std::slice::from_ref(&rec));
        let d = decode_stream(&body).unwrap();
        assert_eq!(
            (d.from, d.upto, d.hlc, d.complete, d.gap),
            (3, 7, hlc, true, false)
        );
        assert_eq!(d.origin, "n1");
        assert_eq!(d.records, vec![rec]);
        assert!(decode_stream(&body[..body.len() - 1]).is_err());
        assert!(decode_stream(b"nope").is_err());
    }
}
