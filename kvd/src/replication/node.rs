//! The replication runtime: moves bytes and persists what the rules decide.
//!
//! On the primary, one task per peer ships log entries as soon as they are
//! written (`POST /internal/append`, batched, a bounded pipeline of
//! appends per peer whose answers are taken in order, see
//! [`rules::next_send`] and [`rules::pipeline_step`]) and a commit task
//! advances the commit index with [`rules::commit_index`] whenever the
//! durable local log or a peer's match index moves. On a secondary, the
//! append handler persists a newer epoch before anything else, then hands
//! the entries to the WAL writer in `prev_index` order
//! ([`Engine::submit_replicate`], [`rules::in_order`]).
//!
//! Promotion (`POST /promote_to_primary`) follows `replication::mod`'s steps:
//! a pre-vote round (no state changes anywhere) whose answers also feed the
//! precheck, then the node's own vote persisted, then the real vote, then a
//! no-op entry in the new epoch. Votes travel as JSON on `/internal/vote`.
//!
//! Epoch and role are one value ([`Leadership`]), read together under the
//! `term` lock: a primary captures it before it prepares a round (reads
//! entries, a snapshot) and sends only if it still holds exactly that
//! leadership, in that epoch ([`rules::send_epoch`]). A secondary takes
//! appends and snapshots of an epoch from one sender only, the first it
//! hears from in that epoch ([`rules::judge_sender`]).
//!
//! # `/internal/append` body (version 1), integers little-endian
//!
//! ```text
//! b"KVAP" | version u32 = 1 | epoch u64 | prev_index u64 | prev_epoch u64
//! | leader_commit u64 | leader_url_len u16 | leader_url (UTF-8)
//! | WAL frames (see storage::record), contiguous from prev_index + 1
//! ```

use kvproto::code;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvproto::bytes::{PutLe, Reader};
use kvproto::status::ReplicaPeer;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::config::{self, Action, ChangeRefusal, ChangeState, Config, InEffect};
pub use super::rules::Role;
use super::rules::{
    self, AppendOutcome, CatchUp, ConflictHint, ElectionOutcome, Leadership, LogPos, PeerStatus,
    Refusal, SenderVerdict, VoteDecision, VoteReason, VoteReply, VoteRequest, VoterState,
};
use crate::storage::record::{self, Record};
use crate::storage::{self, Engine, IncomingSnapshot, Meta, MetaStore, Op, ReplicateRequest};
use crate::tasks::Tasks;

const MAGIC: &[u8; 4] = b"KVAP";
const VERSION: u32 = 1;
/// Magic, version, four u64s and the URL's length.
const FIXED_HEADER_BYTES: usize = 4 + 4 + 8 * 4 + 2;
/// Payload bytes per append request: big enough to batch, small enough to
/// keep one round trip short.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// An idle primary still sends this often, carrying its commit index.
const HEARTBEAT: Duration = Duration::from_millis(50);
/// One append round trip may take this long before the peer counts as down.
const APPEND_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot transfer may take this long (hundreds of MB on loopback),
/// both for the sender and for the receiver reading it.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a secondary holds an append that overtook its predecessor
/// (see `Replicator::handle_append`) before handing it over anyway.
const ORDER_WAIT: Duration = Duration::from_millis(500);

/// How long an election waits for the remaining peers once a majority has
/// answered (see `ask_votes`).
const VOTE_STRAGGLER_GRACE: Duration = Duration::from_millis(100);

/// Static settings of the replication runtime.
#[derive(Clone)]
pub struct Settings {
    pub node_id: String,
    /// How peers and clients reach this node.
    pub advertise_url: String,
    pub peers: Vec<String>,
    /// Secondaries that must hold an entry durably before it commits, a
    /// fixed count (`--sync-replicas`); `None`: a majority of the voters of
    /// the configuration in effect (docs/DESIGN.md §4.11).
    pub sync_replicas: Option<usize>,
    /// `--join`: this node is not in the bootstrap configuration.
    pub join: bool,
    /// Where this node's epoch and vote are persisted.
    pub meta: MetaStore,
}

struct Peer {
    url: String,
    match_index: AtomicU64,
    next_index: AtomicU64,
    reachable: AtomicBool,
    last_ack: Mutex<Option<Instant>>,
    /// No longer a member of the configuration in effect: its shipping
    /// task ends.
    gone: AtomicBool,
    /// Removed by the configuration record at this index (0: a member):
    /// it is still shipped to until it holds that record, so that it
    /// learns it is no voter, for [`LEAVING_GRACE`] at most.
    leaving: Mutex<Option<(u64, Instant)>>,
}

impl Peer {
    fn new(url: String, next: u64) -> Peer {
        Peer {
            url,
            match_index: AtomicU64::new(0),
            next_index: AtomicU64::new(next),
            reachable: AtomicBool::new(false),
            last_ack: Mutex::new(None),
            gone: AtomicBool::new(false),
            leaving: Mutex::new(None),
        }
    }

    /// Whether shipping to this peer is over: it left the configuration
    /// and holds the record that says so (or the grace has passed).
    fn done(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return true;
        }
        let Some((index, since)) = *self.leaving.lock() else {
            return false;
        };
        if self.match_index.load(Ordering::Acquire) >= index || since.elapsed() > LEAVING_GRACE {
            self.gone.store(true, Ordering::Release);
            return true;
        }
        false
    }
}

/// How long a removed member is still shipped to, at most, for it to learn
/// of its removal.
const LEAVING_GRACE: Duration = Duration::from_secs(10);

/// What this node is in which epoch: `meta` (epoch, vote) as persisted,
/// the role in that epoch, and whom it follows in it. One lock, so that
/// epoch and role are always read and changed together.
struct Term {
    meta: Meta,
    primary: bool,
    /// The URL of the primary of `meta.epoch` (ourselves when primary):
    /// the one sender whose appends and snapshots this epoch accepts.
    leader: Option<String>,
    /// Where a mode switch said the primary is, for redirects until its
    /// first append arrives (not trusted as `leader`).
    hint: Option<String>,
}

impl Term {
    fn leadership(&self) -> Leadership {
        Leadership {
            epoch: self.meta.epoch,
            role: if self.primary {
                Role::Primary
            } else {
                Role::Secondary
            },
        }
    }

    /// A new epoch (already persisted): nobody is known to lead it yet.
    fn enter(&mut self, meta: Meta) {
        self.meta = meta;
        self.primary = false;
        self.leader = None;
        self.hint = None;
    }
}

/// The replication state of this node.
pub struct Replicator {
    engine: Arc<Engine>,
    settings: Settings,
    term: Mutex<Term>,
    /// Every member of the configuration in effect but this node, voters
    /// and learners, each with its shipping task (see `reconcile`).
    peers: Mutex<Vec<Arc<Peer>>>,
    /// The configuration of a log without a configuration record.
    bootstrap: Config,
    /// This node's URL as members are named.
    me: String,
    /// One membership change at a time on this node.
    changing: tokio::sync::Mutex<()>,
    /// Woken when a peer's match index moves.
    acked: Notify,
    /// One promotion at a time on this node.
    promoting: tokio::sync::Mutex<()>,
    /// While set and in the future, client writes are refused (503): a
    /// leadership transfer is letting its target catch up.
    transfer_until: Mutex<Option<Instant>>,
    /// First log index of this node's current term as primary (its no-op
    /// goes there or later). Until the commit index reaches it, this node
    /// may not know everything its predecessors committed, so linearizable
    /// reads wait for it (Raft §8).
    lead_from: AtomicU64,
    http: reqwest::Client,
    /// Set by [`Replicator::stop`]: the background tasks end.
    stopped: AtomicBool,
    /// The background tasks (shipping, commit, a new epoch's no-op).
    tasks: Tasks,
    /// One incoming snapshot at a time: they share one temp file.
    receiving_snapshot: tokio::sync::Mutex<()>,
    /// Secondary: how far the appends of the newest epoch have been
    /// handed to the WAL writer (for their order, see `handle_append`).
    handoff: Mutex<Handoff>,
    /// Woken when an append is handed to the WAL writer.
    handed: Notify,
}

/// The end (`prev_index` + entries) of the furthest append of `epoch`
/// handed to the WAL writer.
#[derive(Default)]
struct Handoff {
    epoch: u64,
    end: u64,
}

impl Handoff {
    fn handed(&mut self, epoch: u64, end: u64) {
        if epoch > self.epoch {
            *self = Handoff { epoch, end };
        } else if epoch == self.epoch {
            self.end = self.end.max(end);
        }
    }

    /// How far appends of `epoch` were handed over (0: none yet).
    fn end(&self, epoch: u64) -> u64 {
        if epoch == self.epoch {
            self.end
        } else {
            0
        }
    }
}

/// The secondary's answer to an append.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AppendReply {
    Accept { match_index: u64 },
    Stale { my_epoch: u64 },
    Mismatch { hint: ConflictHint },
}

/// One append on its way to a peer: after which index, how many entries,
/// how many payload bytes.
#[derive(Debug, Clone, Copy)]
struct Sent {
    prev_index: u64,
    count: u64,
    bytes: usize,
}

/// What [`Replicator::prepare_append`] found.
enum Prepared {
    /// Send this body (for the entries `Sent` describes).
    Send(Sent, Vec<u8>),
    /// Nothing can be sent until the answers in flight are in.
    Wait,
    /// Start again from the peer's `next_index` (a snapshot went, the
    /// log could not be read, or this node no longer leads).
    Restart,
}

/// The appends in flight to one peer, oldest first, each on its own task;
/// the tasks end with it (aborted when it is dropped: their answers are
/// no longer wanted).
#[derive(Default)]
struct Pipeline {
    sent: std::collections::VecDeque<(Sent, tokio::task::JoinHandle<Option<AppendReply>>)>,
    /// Payload bytes in flight.
    bytes: usize,
}

impl Pipeline {
    fn len(&self) -> usize {
        self.sent.len()
    }

    fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    fn push(&mut self, sent: Sent, task: tokio::task::JoinHandle<Option<AppendReply>>) {
        self.bytes += sent.bytes;
        self.sent.push_back((sent, task));
    }

    /// Waits for the oldest append's answer (`None` for none) and takes it
    /// out of the window; `None` if nothing is in flight.
    async fn oldest(&mut self) -> Option<(Sent, Option<AppendReply>)> {
        let (_, task) = self.sent.front_mut()?;
        let reply = task.await.ok().flatten();
        let (sent, _) = self.sent.pop_front()?;
        self.bytes -= sent.bytes;
        Some((sent, reply))
    }
}

impl Pipeline {
    /// Drops every append in flight (their answers are ignored).
    fn clear(&mut self) {
        for (_, task) in self.sent.drain(..) {
            task.abort();
        }
        self.bytes = 0;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A voter's answer on `/internal/vote`: its state, whatever it decided.
#[derive(Debug, Serialize, Deserialize)]
pub struct VoteAnswer {
    pub granted: bool,
    pub epoch: u64,
    pub last: LogPos,
    pub reason: String,
}

/// Why a vote was not answered.
#[derive(Debug, thiserror::Error)]
pub enum VoteError {
    /// The epoch is beyond [`rules::epoch_in_reach`].
    #[error(
        "epoch {epoch} is more than {} above this node's epoch {my_epoch}",
        rules::MAX_EPOCH_STEP
    )]
    OutOfReach { epoch: u64, my_epoch: u64 },
    /// Persisting the vote failed.
    #[error("could not persist the vote: {0}")]
    Persist(storage::Error),
}

/// Why the replication runtime refused a request from a peer, or could not
/// carry it out. Nothing changed unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sender's epoch is beyond [`rules::epoch_in_reach`] of ours.
    #[error(
        "epoch {epoch} is more than {} above this node's epoch {my_epoch}",
        rules::MAX_EPOCH_STEP
    )]
    EpochOutOfReach { epoch: u64, my_epoch: u64 },
    /// We are the primary of the sender's epoch ourselves.
    #[error("this node is primary of epoch {my_epoch} too; refusing")]
    TwoPrimaries { my_epoch: u64 },
    /// Another sender already leads the sender's epoch here.
    #[error("epoch {epoch} is led by {leader}, not {sender}; refusing")]
    EpochHasPrimary {
        epoch: u64,
        leader: String,
        sender: String,
    },
    /// The sender's epoch is older than ours: it must step down.
    #[error("the sender's epoch is older than this node's epoch {my_epoch}")]
    StaleEpoch { my_epoch: u64 },
    #[error("another snapshot is being received; one at a time")]
    SnapshotInProgress,
    /// The snapshot does not load (checksum, keys, values).
    #[error("{0}")]
    InvalidSnapshot(storage::Error),
    /// The snapshot loads but is not one its sender could send.
    #[error("{0}")]
    SnapshotRefused(rules::SnapshotRefusal),
    /// The task checking the snapshot failed.
    #[error("{0}")]
    SnapshotCheck(String),
    /// Persisting a newer epoch failed (nothing else changed).
    #[error("could not persist epoch {epoch}: {source}")]
    PersistEpoch {
        epoch: u64,
        #[source]
        source: storage::Error,
    },
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// What a primary says about itself when it sends a snapshot
/// (`POST /internal/snapshot` query parameters).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotOffer {
    pub epoch: u64,
    pub leader: String,
    /// The end of the sender's log, which the snapshot cannot be past.
    pub last_index: u64,
    pub last_epoch: u64,
}

impl SnapshotOffer {
    fn sender_last(&self) -> LogPos {
        LogPos::new(self.last_epoch, self.last_index)
    }
}

/// Why a membership change was not made (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// This node is no longer (or not) the primary.
    #[error("this node is not the primary")]
    NotPrimary,
    #[error("{0}")]
    Refused(ChangeRefusal),
}

/// Why a promotion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The election rules refused it.
    #[error("{0}")]
    Refused(Refusal),
    /// Persisting the new epoch failed.
    #[error("could not persist the new epoch: {0}")]
    Persist(storage::Error),
}

/// A decoded `/internal/append` body.
pub struct AppendBody {
    pub epoch: u64,
    pub prev: LogPos,
    pub leader_commit: u64,
    pub leader_url: String,
    pub records: Vec<Record>,
}

/// Encodes an append request body (format in the module docs).
pub fn encode_append(
    epoch: u64,
    prev: LogPos,
    leader_commit: u64,
    leader_url: &str,
    records: &[Record],
) -> Vec<u8> {
    record::body_with_records(MAGIC, VERSION, records, |out| {
        for n in [epoch, prev.index, prev.epoch, leader_commit] {
            out.put_u64(n);
        }
        out.put_str16(leader_url);
    })
}

/// Decodes an append request body; every error is a 400 for the sender.
pub fn decode_append(body: &[u8]) -> Result<AppendBody, String> {
    let mut r = Reader::new(body);
    record::check_body_start(
        &mut r,
        body.len(),
        (MAGIC, VERSION),
        FIXED_HEADER_BYTES,
        "append",
    )?;
    let short = || "append body ends inside its header".to_string();
    let mut u64s = [0u64; 4];
    for n in &mut u64s {
        *n = r.u64().ok_or_else(short)?;
    }
    let [epoch, prev_index, prev_epoch, leader_commit] = u64s;
    let url_len = r.u16().ok_or_else(short)?;
    let url = r
        .bytes(usize::from(url_len))
        .ok_or("append body ends inside the leader URL")?;
    let leader_url = std::str::from_utf8(url)
        .map_err(|_| "leader URL is not UTF-8".to_string())?
        .to_string();
    let records = record::decode_frames(body, r.offset(), |_| Ok(()))?;
    Ok(AppendBody {
        epoch,
        prev: LogPos {
            epoch: prev_epoch,
            index: prev_index,
        },
        leader_commit,
        leader_url,
        records,
    })
}

impl Replicator {
    pub fn new(engine: Arc<Engine>, settings: Settings, meta: Meta, primary: bool) -> Arc<Self> {
        let me = config::normalize(&settings.advertise_url);
        let bootstrap = Config::bootstrap(&me, &settings.peers);
        let http = crate::peer_http::client(APPEND_TIMEOUT);
        engine.set_epoch(meta.epoch);
        Arc::new(Replicator {
            term: Mutex::new(Term {
                meta,
                primary,
                leader: primary.then(|| settings.advertise_url.clone()),
                hint: None,
            }),
            engine,
            settings,
            peers: Mutex::new(Vec::new()),
            bootstrap,
            me,
            changing: tokio::sync::Mutex::new(()),
            acked: Notify::new(),
            promoting: tokio::sync::Mutex::new(()),
            transfer_until: Mutex::new(None),
            lead_from: AtomicU64::new(0),
            http,
            stopped: AtomicBool::new(false),
            tasks: Tasks::new(),
            receiving_snapshot: tokio::sync::Mutex::new(()),
            handoff: Mutex::new(Handoff::default()),
            handed: Notify::new(),
        })
    }

    /// Whether client writes are paused for a leadership transfer.
    pub fn writes_paused(&self) -> bool {
        matches!(*self.transfer_until.lock(), Some(t) if Instant::now() < t)
    }

    /// Planned switchover to the peer at `to` (Raft's leadership transfer):
    /// stop taking client writes, wait until `to` holds this node's whole
    /// log, then ask it to run for primary. Its vote is then won at once
    /// (it is as up to date as anyone), so no acknowledged write is lost and
    /// the pause lasts about one replication round trip. Writes resume on
    /// return whatever happened (if the target lost, this node is still
    /// primary). Returns the target's new epoch.
    pub async fn transfer(&self, to: &str, timeout: Duration) -> Result<u64, String> {
        if !self.is_primary() {
            return Err("this node is not the primary".into());
        }
        let to = &config::normalize(to);
        let Some(peer) = self.peer(to) else {
            return Err(format!("{to} is not a peer of this node"));
        };
        if !self.in_effect().config.is_voter(to) {
            return Err(format!(
                "{to} is not a voter of this node's configuration: only a voter can lead"
            ));
        }
        let deadline = Instant::now() + timeout;
        *self.transfer_until.lock() = Some(deadline);
        let result = async {
            // Writes admitted before the pause may still be on their way
            // into the log; wait until the target matches a log that has
            // stopped growing.
            loop {
                let last = self.engine.last_log_pos().index;
                if peer.match_index.load(Ordering::Acquire) >= last {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{to} did not catch up within {timeout:?} (it is at {} of {last})",
                        peer.match_index.load(Ordering::Acquire)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let resp = self
                .http
                .post(format!("{to}/promote_to_primary"))
                .timeout(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1)),
                )
                .send()
                .await
                .map_err(|e| format!("asking {to} to run: {e}"))?;
            let ok = resp.status().is_success();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if ok {
                Ok(body
                    .get("epoch")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0))
            } else {
                Err(format!("{to} refused: {body}"))
            }
        }
        .await;
        *self.transfer_until.lock() = None;
        result
    }

    /// Starts the background tasks (they idle while this node is secondary).
    pub fn start(self: &Arc<Self>) {
        self.reconcile();
        let tasks = &self.tasks;
        tasks.spawn_on(self, |me| async move { me.advance_commit().await });
        tasks.spawn_on(self, |me| async move { me.follow_members().await });
    }

    /// The configuration in effect (docs/DESIGN.md §4.11): the newest
    /// configuration record of the log, committed or not; without one, the
    /// bootstrap configuration (this node and `--peers`, all voters), or
    /// for a `--join` node an unknown one in which it is a learner.
    pub fn in_effect(&self) -> InEffect {
        match self.engine.config() {
            Some((index, config)) => InEffect { index, config },
            None if self.settings.join => config::joining(),
            None => InEffect {
                index: 0,
                config: self.bootstrap.clone(),
            },
        }
    }

    /// Whether this node is a voter of its configuration in effect.
    pub fn is_voter(&self) -> bool {
        self.in_effect().config.is_voter(&self.me)
    }

    /// The configuration in effect as `GET /v1/admin/members` shows it.
    pub fn members(&self) -> kvproto::admin::Members {
        let InEffect { index, config } = self.in_effect();
        kvproto::admin::Members {
            committed: self.engine.commit_index() >= index,
            index,
            learners: config.learners,
            voters: config.voters,
        }
    }

    /// The peers now (members of the configuration in effect but us).
    fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.lock().clone()
    }

    fn peer(&self, url: &str) -> Option<Arc<Peer>> {
        self.peers.lock().iter().find(|p| p.url == url).cloned()
    }

    /// Makes the peers the members of the configuration in effect: a
    /// shipping task for each new member (from our log's end, falling back
    /// as after any refusal), the tasks of members gone told to end.
    fn reconcile(self: &Arc<Self>) {
        let InEffect { index, config: cfg } = self.in_effect();
        let wanted: Vec<&String> = cfg.members().filter(|m| **m != self.me).collect();
        let mut peers = self.peers.lock();
        peers.retain(|p| {
            let keep = wanted.contains(&&p.url);
            if !keep {
                // Its task ends once it holds the record removing it.
                *p.leaving.lock() = Some((index, Instant::now()));
                tracing::info!(node = %self.settings.node_id, peer = %p.url, index, "no longer a member: shipping to it stops once it holds its removal");
            }
            keep
        });
        let next = self.engine.last_log_pos().index.saturating_add(1);
        for url in wanted {
            if peers.iter().any(|p| p.url == *url) {
                continue;
            }
            let peer = Arc::new(Peer::new(url.clone(), next));
            peers.push(peer.clone());
            self.tasks
                .spawn_on(self, |me| async move { me.ship_to(peer).await });
        }
    }

    /// Follows the configuration in effect: whenever entries are written
    /// or cut (a configuration record among them, or cut), the peers are
    /// made its members again.
    async fn follow_members(self: Arc<Self>) {
        let mut seen = self.in_effect();
        while !self.stopped.load(Ordering::Acquire) {
            let written = self.engine.written_notify().notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let now = self.in_effect();
            if now != seen {
                self.reconcile();
                seen = now;
            }
            tokio::select! {
                _ = written => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// Plans one membership change on the primary: the new configuration
    /// ([`config::check_change`]) under the change lock, which the caller
    /// holds until the record is appended.
    pub async fn plan_change(
        &self,
        action: &Action,
    ) -> Result<(Config, tokio::sync::MutexGuard<'_, ()>), MembersError> {
        let guard = self.changing.lock().await;
        if !self.is_primary() {
            return Err(MembersError::NotPrimary);
        }
        let current = self.in_effect();
        let state = ChangeState {
            current: &current,
            me: &self.me,
            commit: self.engine.commit_index(),
            lead_from: self.lead_from.load(Ordering::Acquire),
            fixed_quorum: self.settings.sync_replicas.is_some(),
        };
        let next = config::check_change(&state, action, |url| {
            self.peer(url)
                .map_or(0, |p| p.match_index.load(Ordering::Acquire))
        })
        .map_err(MembersError::Refused)?;
        Ok((next, guard))
    }

    /// Tells a secondary where the primary is before its first append
    /// arrives (a mode switch names it), so writes redirect at once.
    pub fn set_primary_hint(&self, url: String) {
        let mut t = self.term.lock();
        if !t.primary && t.leader.is_none() {
            t.hint = Some(url);
        }
    }

    /// Ends the background tasks, waiting until they are gone, and steps
    /// down (a mode switch, a shutdown).
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.term.lock().primary = false;
        self.acked.notify_waiters();
        self.tasks.stop().await;
    }

    /// Epoch and role, read together.
    pub fn leadership(&self) -> Leadership {
        self.term.lock().leadership()
    }

    pub fn is_primary(&self) -> bool {
        self.term.lock().primary
    }

    pub fn role(&self) -> Role {
        self.leadership().role
    }

    pub fn epoch(&self) -> u64 {
        self.term.lock().meta.epoch
    }

    /// The primary's base URL, when known.
    pub fn primary_url(&self) -> Option<String> {
        let t = self.term.lock();
        t.leader.clone().or_else(|| t.hint.clone())
    }

    /// Per-peer replication state for `/v1/status`.
    pub fn peer_status(&self) -> Vec<ReplicaPeer> {
        let last = self.engine.last_log_pos().index;
        self.peers()
            .iter()
            .map(|p| {
                let m = p.match_index.load(Ordering::Acquire);
                ReplicaPeer {
                    lag_entries: last.saturating_sub(m),
                    last_ack_ms_ago: p.last_ack.lock().map(|t| t.elapsed().as_millis() as u64),
                    match_index: m,
                    reachable: p.reachable.load(Ordering::Acquire),
                    url: p.url.clone(),
                }
            })
            .collect()
    }

    /// `(peer URL, entries behind our last index)` for every peer.
    pub fn peer_lags(&self) -> Vec<(String, u64)> {
        let last = self.engine.last_log_pos().index;
        self.peers()
            .iter()
            .map(|p| {
                let m = p.match_index.load(Ordering::Acquire);
                (p.url.clone(), last.saturating_sub(m))
            })
            .collect()
    }

    /// Persists a newer epoch (fsync) before anything acts on it, and steps
    /// down if this node was primary. An epoch out of reach is refused
    /// ([`rules::epoch_in_reach`]): one forged answer must not use up
    /// every epoch.
    fn adopt_epoch(&self, epoch: u64) -> Result<(), storage::Error> {
        self.enter_epoch(&mut self.term.lock(), epoch)
    }

    /// [`Replicator::adopt_epoch`] with the term lock held.
    fn enter_epoch(&self, t: &mut Term, epoch: u64) -> Result<(), storage::Error> {
        if epoch <= t.meta.epoch {
            return Ok(());
        }
        if !rules::epoch_in_reach(t.meta.epoch, epoch) {
            return Err(storage::Error::io(
                "adopting an epoch".into(),
                std::io::Error::other(format!(
                    "epoch {epoch} is out of reach of this node's epoch {}",
                    t.meta.epoch
                )),
            ));
        }
        self.persist(t, adopted(&t.meta, epoch))
    }

    /// Stores `next` (a newer epoch, and its vote) in `meta`, then enters
    /// it: steps down, and forgets the old epoch's primary.
    fn persist(&self, t: &mut Term, next: Meta) -> Result<(), storage::Error> {
        self.settings.meta.store(&next)?;
        let (epoch, was_primary) = (next.epoch, t.primary);
        t.enter(next);
        self.engine.set_epoch(epoch);
        if was_primary {
            tracing::info!(node = %self.settings.node_id, epoch, "saw a newer epoch; stepping down to secondary");
        }
        Ok(())
    }

    /// Linearizable read barrier (Raft's ReadIndex): confirms with a
    /// majority that this node still leads its epoch, then waits until
    /// everything committed when the read arrived is applied. A peer that
    /// answers an append without calling it stale has not moved past our
    /// epoch, so no newer primary can have committed anything yet.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), &'static str> {
        let lead = self.leadership();
        if !lead.leads() {
            return Err(code::NOT_PRIMARY);
        }
        let deadline = Instant::now() + timeout;
        // A new primary first commits its no-op: only then is its commit
        // index at least everything any earlier primary acknowledged.
        let lead_from = self.lead_from.load(Ordering::Acquire);
        while self.engine.commit_index() < lead_from {
            if Instant::now() >= deadline || self.leadership() != lead {
                return Err(code::NO_MAJORITY);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let read_index = self.engine.commit_index();
        let body = encode_append(
            lead.epoch,
            LogPos::ZERO,
            read_index,
            &self.settings.advertise_url,
            &[],
        );
        // Confirmations count from the voters of the configuration in
        // effect only (this node too, if it is one).
        let cfg = self.in_effect().config;
        let needed = config::voter_quorum(&cfg);
        let mut confirmed = config::count_voters(&cfg, &self.me, |_| false);
        let mut asks = tokio::task::JoinSet::new();
        for p in self.peers().iter().filter(|p| cfg.is_voter(&p.url)) {
            let (http, url, body) = (self.http.clone(), p.url.clone(), body.clone());
            asks.spawn(async move {
                let resp = http
                    .post(format!("{url}/internal/append"))
                    .timeout(Duration::from_secs(1))
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                parse_append_reply(resp).await
            });
        }
        while confirmed < needed {
            let Some(done) = asks.join_next().await else {
                break;
            };
            match done {
                Ok(Some(AppendReply::Stale { my_epoch })) => {
                    let _ = self.adopt_epoch(my_epoch);
                    return Err(code::NOT_PRIMARY);
                }
                Ok(Some(_)) => confirmed += 1,
                _ => {}
            }
        }
        // The confirmations are for the leadership the read started in.
        if confirmed < needed || self.leadership() != lead {
            return Err(code::NO_MAJORITY);
        }
        while self.engine.status().applied_index < read_index {
            if Instant::now() >= deadline {
                return Err(code::APPLY_TIMEOUT);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Voter side of `/internal/vote`: decides with [`rules::decide_vote`]
    /// and persists a new epoch (and vote) before answering. An epoch out
    /// of reach is refused with nothing persisted.
    pub fn handle_vote(&self, req: &VoteRequest) -> Result<VoteAnswer, VoteError> {
        let last = self.engine.last_log_pos();
        let mut t = self.term.lock();
        let (decision, next) = vote_step(&t.meta, last, req);
        if decision.reason == VoteReason::EpochOutOfReach {
            return Err(VoteError::OutOfReach {
                epoch: req.epoch,
                my_epoch: t.meta.epoch,
            });
        }
        let (mut granted, mut reason, mut last) = (decision.granted, decision.reason, last);
        if let Some(next) = next {
            self.persist(&mut t, next).map_err(VoteError::Persist)?;
            // An append accepted while `last` was read is answered after
            // its fsync only if the epoch had not moved on by then
            // (`rules::answer_after_fsync`); if it had not, its entries are
            // durable now: the candidate must hold them too.
            std::sync::atomic::fence(Ordering::SeqCst);
            last = self.engine.last_log_pos();
            (granted, reason) = rules::confirm_grant(granted, reason, req.last, last);
        }
        Ok(VoteAnswer {
            granted,
            epoch: t.meta.epoch,
            last,
            reason: reason.as_str().to_string(),
        })
    }

    /// Asks every voter in `voters` (the other voters of a configuration of
    /// `cluster` voters) for its vote in `epoch`; `None` for no answer.
    ///
    /// Returns when every one answered, or [`VOTE_STRAGGLER_GRACE`] after a
    /// majority did.
    async fn ask_votes(
        &self,
        epoch: u64,
        pre_vote: bool,
        voters: &[Arc<Peer>],
        cluster: usize,
    ) -> Vec<Option<VoteAnswer>> {
        let req = VoteRequest {
            epoch,
            candidate: self.settings.node_id.clone(),
            last: self.engine.last_log_pos(),
            pre_vote,
        };
        // Ask everyone at once: an unreachable peer costs one timeout, not
        // one per peer.
        let mut asks = tokio::task::JoinSet::new();
        for (i, p) in voters.iter().enumerate() {
            let (http, url, req) = (self.http.clone(), p.url.clone(), req.clone());
            asks.spawn(async move {
                let resp = http
                    .post(format!("{url}/internal/vote"))
                    .timeout(Duration::from_secs(1))
                    .json(&req)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())?;
                resp.json::<VoteAnswer>().await.ok().map(|a| (i, a))
            });
        }
        let mut answers: Vec<Option<VoteAnswer>> = voters.iter().map(|_| None).collect();
        // Once a majority (with us) has answered, a peer that is stopped or
        // cut off should not hold the election up for a whole timeout: the
        // rest get a short grace, then count as unreachable. Safety does not
        // depend on the stragglers; every rule is decided by the answers.
        let needed = rules::majority(cluster);
        let mut answered = 1;
        let mut grace_until: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace_until {
                Some(t) => match tokio::time::timeout_at(t, asks.join_next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
                None => asks.join_next().await,
            };
            let Some(done) = next else { break };
            if let Ok(Some((i, a))) = done {
                answers[i] = Some(a);
                answered += 1;
                if answered >= needed && grace_until.is_none() {
                    grace_until = Some(tokio::time::Instant::now() + VOTE_STRAGGLER_GRACE);
                }
            }
        }
        answers
    }

    /// Counts the answers of `voters` (the other voters of a configuration
    /// of `cluster` voters, this candidate being one).
    fn tally(
        &self,
        voters: &[Arc<Peer>],
        cluster: usize,
        answers: &[Option<VoteAnswer>],
    ) -> ElectionOutcome {
        let replies: Vec<(&str, VoteReply)> = voters
            .iter()
            .zip(answers)
            .map(|(p, a)| {
                let reply = match a {
                    Some(a) if a.granted => VoteReply::Granted,
                    Some(a) => VoteReply::Refused {
                        epoch: a.epoch,
                        last: a.last,
                    },
                    None => VoteReply::Unreachable,
                };
                (p.url.as_str(), reply)
            })
            .collect();
        rules::tally(self.engine.last_log_pos(), &replies, cluster)
    }

    /// Runs an election for this node (docs/DESIGN.md §4); returns the new epoch.
    pub async fn promote(self: &Arc<Self>) -> Result<u64, PromoteError> {
        let _one_at_a_time = self.promoting.lock().await;
        let now = self.leadership();
        if now.leads() {
            return Ok(now.epoch);
        }
        if self.term.lock().meta.rejoining {
            return Err(PromoteError::Refused(Refusal::Rejoining));
        }
        // Only a voter of its own configuration may lead, and it counts
        // the votes of that configuration's voters alone.
        let cfg = self.in_effect().config;
        if !cfg.is_voter(&self.me) {
            return Err(PromoteError::Refused(Refusal::Learner));
        }
        let cluster = cfg.voters.len();
        let voters: Vec<Arc<Peer>> = self
            .peers()
            .into_iter()
            .filter(|p| cfg.is_voter(&p.url))
            .collect();
        let my_last = self.engine.last_log_pos();
        if cluster == 1 {
            // The only voter left (the others were removed): its own vote
            // is the majority.
            return self.win_alone(now.epoch.saturating_add(1), my_last).await;
        }
        // 1. Probe with a pre-vote: its answers carry every peer's epoch and
        //    log, for the precheck. Nothing changes anywhere yet.
        let probe = self
            .ask_votes(now.epoch.saturating_add(1), true, &voters, cluster)
            .await;
        let statuses: Vec<(&str, Option<PeerStatus>)> = voters
            .iter()
            .zip(&probe)
            .map(|(p, a)| {
                let status = a.as_ref().map(|a| PeerStatus {
                    epoch: a.epoch,
                    last: a.last,
                });
                (p.url.as_str(), status)
            })
            .collect();
        let epoch = rules::promotion_precheck(self.epoch(), my_last, &statuses, cluster)
            .map_err(PromoteError::Refused)?;
        // 2. The pre-vote at the epoch we will really run for.
        let pre = self.ask_votes(epoch, true, &voters, cluster).await;
        if let ElectionOutcome::Lost(why) = self.tally(&voters, cluster, &pre) {
            return Err(PromoteError::Refused(why));
        }
        // 3. Our own vote, persisted, then the real vote.
        let own = VoteRequest {
            epoch,
            candidate: self.settings.node_id.clone(),
            last: my_last,
            pre_vote: false,
        };
        let not_granted = || {
            PromoteError::Refused(Refusal::NotEnoughVotes {
                granted: 0,
                needed: rules::majority(cluster),
            })
        };
        let mine = self.handle_vote(&own).map_err(|e| match e {
            VoteError::Persist(e) => PromoteError::Persist(e),
            VoteError::OutOfReach { .. } => not_granted(),
        })?;
        if !mine.granted {
            return Err(not_granted());
        }
        let votes = self.ask_votes(epoch, false, &voters, cluster).await;
        if let ElectionOutcome::Lost(why) = self.tally(&voters, cluster, &votes) {
            return Err(PromoteError::Refused(why));
        }
        self.won(epoch)
    }

    /// The only voter of its configuration runs: its own vote, persisted,
    /// is the majority.
    async fn win_alone(self: &Arc<Self>, epoch: u64, my_last: LogPos) -> Result<u64, PromoteError> {
        let own = VoteRequest {
            epoch,
            candidate: self.settings.node_id.clone(),
            last: my_last,
            pre_vote: false,
        };
        let refused = || {
            PromoteError::Refused(Refusal::NotEnoughVotes {
                granted: 0,
                needed: 1,
            })
        };
        let mine = self.handle_vote(&own).map_err(|e| match e {
            VoteError::Persist(e) => PromoteError::Persist(e),
            VoteError::OutOfReach { .. } => refused(),
        })?;
        if !mine.granted {
            return Err(refused());
        }
        self.won(epoch)
    }

    /// 4. Won: lead, and commit a no-op of our epoch (which commits older
    ///    entries with it).
    fn won(self: &Arc<Self>, epoch: u64) -> Result<u64, PromoteError> {
        self.take_lead(epoch).map_err(PromoteError::Refused)?;
        tracing::info!(node = %self.settings.node_id, epoch, "promoted to primary");
        let (engine, node) = (self.engine.clone(), self.settings.node_id.clone());
        self.tasks.spawn(async move {
            if let Err(e) = engine.write(Op::Noop, true).await {
                tracing::warn!(node, epoch, error = %e, "the new epoch's no-op did not commit");
            }
        });
        Ok(epoch)
    }

    /// Becomes primary of `epoch`, whose votes this node has just won,
    /// starting every peer right after our log. Refused if the election
    /// was overtaken while the votes were out: a newer epoch seen, or
    /// another sender already followed as `epoch`'s primary.
    fn take_lead(&self, epoch: u64) -> Result<(), Refusal> {
        let mut t = self.term.lock();
        if t.meta.epoch != epoch || t.leader.is_some() {
            return Err(Refusal::Overtaken {
                ran_for: epoch,
                now: t.meta.epoch,
            });
        }
        let next = self.engine.last_log_pos().index.saturating_add(1);
        for p in self.peers() {
            p.match_index.store(0, Ordering::Release);
            p.next_index.store(next, Ordering::Release);
        }
        self.lead_from.store(next, Ordering::Release);
        t.primary = true;
        t.leader = Some(self.settings.advertise_url.clone());
        Ok(())
    }

    /// Maps [`rules::judge_sender`]'s verdict on a request of `epoch` from
    /// `sender` to a refusal (nothing changes), or returns it.
    fn judge(&self, t: &Term, epoch: u64, sender: &str) -> Result<SenderVerdict, Error> {
        let my_epoch = t.meta.epoch;
        let verdict = rules::judge_sender(t.leadership(), t.leader.as_deref(), epoch, sender);
        match verdict {
            SenderVerdict::OutOfReach => Err(Error::EpochOutOfReach { epoch, my_epoch }),
            SenderVerdict::TwoPrimaries => Err(Error::TwoPrimaries { my_epoch }),
            SenderVerdict::SecondPrimary => Err(Error::EpochHasPrimary {
                epoch,
                leader: t.leader.as_deref().unwrap_or("another node").to_string(),
                sender: sender.to_string(),
            }),
            v @ (SenderVerdict::Stale | SenderVerdict::Follow { .. }) => Ok(v),
        }
    }

    /// Follows `sender` as the primary of `epoch` if [`Replicator::judge`]
    /// allows, persisting a newer epoch first. `Some(our epoch)`: the
    /// sender is stale.
    fn follow(&self, epoch: u64, sender: &str) -> Result<Option<u64>, Error> {
        let mut t = self.term.lock();
        match self.judge(&t, epoch, sender)? {
            SenderVerdict::Follow { adopt } => {
                if adopt {
                    self.enter_epoch(&mut t, epoch)
                        .map_err(|source| Error::PersistEpoch { epoch, source })?;
                }
                t.leader = Some(sender.to_string());
                Ok(None)
            }
            _ => Ok(Some(t.meta.epoch)),
        }
    }

    /// Secondary side of `/internal/append`. Nothing changes (not even the
    /// epoch) unless every entry is one a client could have written and
    /// the sender may lead the epoch it claims.
    ///
    /// Appends of one epoch arrive over several connections and may
    /// overtake each other: one that starts past what has been handed to
    /// the WAL writer waits (at most [`ORDER_WAIT`]) for its predecessor,
    /// then goes anyway. The order is only for speed (an append out of
    /// order is refused as a mismatch, and the primary falls back); what is
    /// safe to take is for the writer's rules alone.
    pub async fn handle_append(&self, body: AppendBody) -> Result<AppendReply, Error> {
        self.engine.check_entries(&body.records)?;
        if let Some(my_epoch) = self.follow(body.epoch, &body.leader_url)? {
            return Ok(AppendReply::Stale { my_epoch });
        }
        let (epoch, end) = (
            body.epoch,
            body.prev.index.saturating_add(body.records.len() as u64),
        );
        self.wait_for_predecessor(epoch, body.prev.index).await;
        let answer = self
            .engine
            .submit_replicate(ReplicateRequest {
                epoch,
                prev: body.prev,
                records: body.records,
                leader_commit: body.leader_commit,
            })
            .await?;
        // Queued: the writer takes it before any append queued later.
        self.handoff.lock().handed(epoch, end);
        self.handed.notify_waiters();
        let outcome = answer.await.map_err(|_| storage::Error::ShuttingDown)??;
        Ok(match outcome {
            AppendOutcome::Accept { match_index, .. } => {
                self.caught_up(match_index, body.leader_commit)?;
                AppendReply::Accept { match_index }
            }
            AppendOutcome::Stale { my_epoch } => AppendReply::Stale { my_epoch },
            AppendOutcome::Mismatch(hint) => AppendReply::Mismatch { hint },
        })
    }

    /// Re-seeded after losing its data and not caught up yet.
    pub fn rejoining(&self) -> bool {
        self.term.lock().meta.rejoining
    }

    /// A rejoining node whose log, durable now, reaches the commit index of
    /// the primary that sent it holds every entry that was committed with
    /// its lost acknowledgements: it may vote and run again.
    fn caught_up(&self, match_index: u64, leader_commit: u64) -> Result<(), storage::Error> {
        let mut t = self.term.lock();
        if !t.meta.rejoining || match_index < leader_commit {
            return Ok(());
        }
        let next = Meta {
            rejoining: false,
            ..t.meta.clone()
        };
        self.settings.meta.store(&next)?;
        t.meta = next;
        tracing::info!(
            node = %self.settings.node_id,
            index = match_index,
            "re-seeded node caught up with the primary's commit index; it votes again"
        );
        Ok(())
    }

    /// Waits until an append of `epoch` after `prev_index` is next in line
    /// ([`rules::in_order`]), or [`ORDER_WAIT`] has passed.
    async fn wait_for_predecessor(&self, epoch: u64, prev_index: u64) {
        let deadline = tokio::time::Instant::now() + ORDER_WAIT;
        loop {
            let handed = self.handed.notified();
            tokio::pin!(handed);
            handed.as_mut().enable();
            let end = self.handoff.lock().end(epoch);
            if rules::in_order(prev_index, end, self.engine.written_last_index()) {
                return;
            }
            if tokio::time::timeout_at(deadline, handed).await.is_err() {
                return;
            }
        }
    }

    /// Primary: keeps `peer` up to date while it is a member.
    async fn ship_to(self: Arc<Self>, peer: Arc<Peer>) {
        let peer = &*peer;
        // After a refusal, one append at a time until one is accepted.
        let mut probing = false;
        while !self.stopped.load(Ordering::Acquire) && !peer.done() {
            let lead = self.leadership();
            if !lead.leads() {
                tokio::time::sleep(HEARTBEAT).await;
                continue;
            }
            probing = self.ship_as(peer, lead, probing).await;
        }
    }

    /// Ships to `peer` as the primary of `lead`, with up to
    /// [`rules::MAX_APPENDS_IN_FLIGHT`] appends in flight (one while
    /// `probing`), their answers taken in the order they were sent. Returns
    /// when this node no longer leads so, or after anything but an accept
    /// (handled as one append at a time would be; the answers still in
    /// flight are dropped), with whether the next round probes: the caller
    /// then starts again from the last acknowledged match index.
    async fn ship_as(&self, peer: &Peer, lead: Leadership, mut probing: bool) -> bool {
        let mut pipe = Pipeline::default();
        let mut next = peer.next_index.load(Ordering::Acquire).max(1);
        let mut last_send: Option<Instant> = None;
        let mut commit_sent = None;
        loop {
            if self.stopped.load(Ordering::Acquire) || peer.done() || self.leadership() != lead {
                return probing;
            }
            // Register for "new entries" before looking, so none is missed.
            let written = self.engine.written_notify().notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let commit = self.engine.commit_index();
            let idle_for = last_send.map_or(HEARTBEAT, |t| t.elapsed());
            let decision = rules::next_send(
                pipe.len(),
                pipe.bytes,
                probing,
                next <= self.engine.written_last_index(),
                idle_for,
                HEARTBEAT,
                commit_sent != Some(commit),
            );
            // New entries can go as soon as they are written while the
            // window has room, unless the next append must wait for the
            // answers in flight.
            let mut listen = rules::has_room(pipe.len(), pipe.bytes, probing);
            if decision != rules::SendDecision::Wait {
                match self.prepare_append(peer, lead, next, commit, &pipe).await {
                    Prepared::Send(sent, body) => {
                        next += sent.count;
                        last_send = Some(Instant::now());
                        commit_sent = Some(commit);
                        pipe.push(sent, self.post_append(peer, body));
                        continue;
                    }
                    Prepared::Wait => listen = false,
                    Prepared::Restart => return probing,
                }
            }
            let heartbeat_in = HEARTBEAT.saturating_sub(idle_for);
            tokio::select! {
                answer = pipe.oldest(), if !pipe.is_empty() => {
                    let Some((sent, reply)) = answer else { continue };
                    // An answer about a log this node led before a
                    // step-down says nothing about the log it holds now.
                    if self.leadership() != lead {
                        return probing;
                    }
                    peer.reachable.store(reply.is_some(), Ordering::Release);
                    let accepted = match &reply {
                        Some(AppendReply::Accept { match_index }) => Some(*match_index),
                        _ => None,
                    };
                    match rules::pipeline_step(sent.prev_index, sent.count, accepted) {
                        rules::PipelineStep::Acked { match_index } => {
                            probing = false;
                            *peer.last_ack.lock() = Some(Instant::now());
                            peer.match_index.fetch_max(match_index, Ordering::AcqRel);
                            peer.next_index
                                .store(match_index.saturating_add(1), Ordering::Release);
                            self.acked.notify_one();
                        }
                        rules::PipelineStep::Drain => {
                            pipe.clear();
                            self.after_refusal(peer, lead, sent.prev_index, reply).await;
                            return true;
                        }
                    }
                }
                _ = &mut written, if listen => {}
                _ = tokio::time::sleep(heartbeat_in), if pipe.is_empty() => {}
            }
        }
    }

    /// The next append to `peer` from `next` on (entries, or none for a
    /// heartbeat), unless it must wait for the answers in flight or needs a
    /// snapshot (sent here when nothing is in flight).
    async fn prepare_append(
        &self,
        peer: &Peer,
        lead: Leadership,
        next: u64,
        commit: u64,
        pipe: &Pipeline,
    ) -> Prepared {
        let prev_index = next - 1;
        let Some(prev_epoch) = self.engine.epoch_at(prev_index) else {
            if !pipe.is_empty() {
                return Prepared::Wait;
            }
            // The entries it needs are only in our snapshot now.
            self.send_snapshot(peer, lead).await;
            return Prepared::Restart;
        };
        let records = match self.engine.entries_from(next, MAX_BATCH_BYTES).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(node = %self.settings.node_id, peer = %peer.url, error = %e, "reading entries to ship");
                if pipe.is_empty() {
                    tokio::time::sleep(HEARTBEAT).await;
                    return Prepared::Restart;
                }
                return Prepared::Wait;
            }
        };
        // Reading the log may have waited: deposed meanwhile, this node
        // must not present these entries as any epoch's primary.
        let Some(epoch) = rules::send_epoch(lead, self.leadership()) else {
            return Prepared::Restart;
        };
        let sent = Sent {
            prev_index,
            count: records.len() as u64,
            bytes: records.iter().map(|r| r.op.encoded_len()).sum(),
        };
        let body = encode_append(
            epoch,
            LogPos {
                epoch: prev_epoch,
                index: prev_index,
            },
            commit,
            &self.settings.advertise_url,
            &records,
        );
        Prepared::Send(sent, body)
    }

    /// Sends one append to `peer` on a task of its own (so that several
    /// are in flight); its handle yields the answer, `None` for none.
    fn post_append(
        &self,
        peer: &Peer,
        body: Vec<u8>,
    ) -> tokio::task::JoinHandle<Option<AppendReply>> {
        let (http, url) = (self.http.clone(), peer.url.clone());
        tokio::spawn(async move {
            let reply = crate::peer_http::post_body(&http, &url, "/internal/append", body).await;
            match reply {
                Ok(r) => parse_append_reply(r).await,
                Err(_) => None,
            }
        })
    }

    /// After anything but an accept, as one append at a time did: no
    /// answer waits a heartbeat, a newer epoch is adopted, a mismatch moves
    /// `next_index` back by the hint (or sends the snapshot).
    async fn after_refusal(
        &self,
        peer: &Peer,
        lead: Leadership,
        prev_index: u64,
        reply: Option<AppendReply>,
    ) {
        match reply {
            None | Some(AppendReply::Accept { .. }) => tokio::time::sleep(HEARTBEAT).await,
            Some(AppendReply::Stale { my_epoch }) => {
                if let Err(e) = self.adopt_epoch(my_epoch) {
                    tracing::warn!(node = %self.settings.node_id, epoch = my_epoch, peer = %peer.url, error = %e, "could not adopt a peer's epoch");
                }
            }
            Some(AppendReply::Mismatch { hint }) => {
                match self.engine.catch_up_after_reject(prev_index, &hint) {
                    CatchUp::Append { next_index } => {
                        peer.next_index.store(next_index, Ordering::Release)
                    }
                    CatchUp::InstallSnapshot => self.send_snapshot(peer, lead).await,
                }
            }
        }
    }

    /// Primary: sends our newest snapshot to a peer that is behind our WAL
    /// (`POST /internal/snapshot` with a [`SnapshotOffer`] as the query, the
    /// snapshot file as the body), then resumes shipping after it; only as
    /// the primary of `lead`, which the snapshot was chosen under.
    async fn send_snapshot(&self, peer: &Peer, lead: Leadership) {
        let Some((path, index)) = self.engine.latest_snapshot() else {
            tokio::time::sleep(HEARTBEAT).await;
            return;
        };
        // A newer snapshot may replace this one while we read; then retry.
        // Read through the engine's `Fs`, like every other file of the data
        // dir, so a test's simulated disk sees it too.
        let fs = self.engine.fs();
        let read = tokio::task::spawn_blocking(move || fs.read(&path)).await;
        let Ok(Ok(bytes)) = read else {
            tokio::time::sleep(HEARTBEAT).await;
            return;
        };
        let Some(epoch) = rules::send_epoch(lead, self.leadership()) else {
            return;
        };
        let last = self.engine.last_log_pos();
        let offer = SnapshotOffer {
            epoch,
            leader: self.settings.advertise_url.clone(),
            last_index: last.index,
            last_epoch: last.epoch,
        };
        tracing::info!(node = %self.settings.node_id, index, bytes = bytes.len(), peer = %peer.url, "sending snapshot");
        let reply = self
            .http
            .post(format!("{}/internal/snapshot", peer.url))
            .query(&offer)
            .timeout(SNAPSHOT_TIMEOUT)
            .body(bytes)
            .send()
            .await;
        if self.leadership() != lead {
            return;
        }
        match reply {
            Ok(r) if r.status().is_success() => {
                // A peer holds at most our log.
                let installed = r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["last_index"].as_u64())
                    .unwrap_or(index)
                    .min(last.index);
                peer.match_index.fetch_max(installed, Ordering::AcqRel);
                peer.next_index
                    .store(installed.saturating_add(1), Ordering::Release);
                peer.reachable.store(true, Ordering::Release);
                self.acked.notify_one();
            }
            Ok(r) => {
                if let Some(AppendReply::Stale { my_epoch }) = parse_append_reply(r).await {
                    let _ = self.adopt_epoch(my_epoch);
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
            Err(_) => tokio::time::sleep(HEARTBEAT).await,
        }
    }

    /// Secondary side of `/internal/snapshot`, before the body is read: the
    /// sender checks of an append (nothing changes), and one upload at a
    /// time (they share one temp file); the slot is held until the guard
    /// drops.
    pub fn begin_snapshot(
        &self,
        offer: &SnapshotOffer,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        {
            let t = self.term.lock();
            if let SenderVerdict::Stale = self.judge(&t, offer.epoch, &offer.leader)? {
                return Err(Error::StaleEpoch {
                    my_epoch: t.meta.epoch,
                });
            }
        }
        self.receiving_snapshot
            .try_lock()
            .map_err(|_| Error::SnapshotInProgress)
    }

    /// Secondary side of `/internal/snapshot`, once the upload is on disk
    /// at `path`: loads and checks it (checksum, keys and values, its
    /// position against the sender's log), and only then takes the sender
    /// as primary (persisting a newer epoch) and installs it, replacing our
    /// log and state. A refusal changes nothing; the caller removes `path`
    /// unless it was installed.
    pub async fn receive_snapshot(
        &self,
        offer: &SnapshotOffer,
        path: PathBuf,
    ) -> Result<u64, Error> {
        let engine = self.engine.clone();
        let incoming: IncomingSnapshot =
            tokio::task::spawn_blocking(move || engine.verify_snapshot(path))
                .await
                .map_err(|e| Error::SnapshotCheck(e.to_string()))?
                .map_err(|e| {
                    if e.is_corruption() {
                        Error::InvalidSnapshot(e)
                    } else {
                        Error::Storage(e)
                    }
                })?;
        let at = LogPos::new(incoming.meta.last_epoch, incoming.meta.last_index);
        rules::check_snapshot(offer.epoch, offer.sender_last(), at)
            .map_err(Error::SnapshotRefused)?;
        if let Some(my_epoch) = self.follow(offer.epoch, &offer.leader)? {
            return Err(Error::StaleEpoch { my_epoch });
        }
        Ok(self.engine.install_snapshot(incoming).await?)
    }

    /// Primary: commits what a majority holds durably.
    async fn advance_commit(self: Arc<Self>) {
        while !self.stopped.load(Ordering::Acquire) {
            let durable = self.engine.durable_notify().notified();
            tokio::pin!(durable);
            durable.as_mut().enable();
            let acked = self.acked.notified();
            let lead = self.leadership();
            if lead.leads() {
                let peers = self.peers();
                let engine = &self.engine;
                let durable = engine.last_log_pos().index;
                let commit = match self.settings.sync_replicas {
                    Some(fixed) => {
                        let matches: Vec<u64> = peers
                            .iter()
                            .map(|p| p.match_index.load(Ordering::Acquire))
                            .collect();
                        rules::commit_index(
                            lead.epoch,
                            durable,
                            &matches,
                            |i| engine.epoch_at(i),
                            engine.commit_index(),
                            fixed,
                        )
                    }
                    None => {
                        // A majority of the voters of the configuration in
                        // effect; learners never count.
                        let cfg = self.in_effect().config;
                        let matches: Vec<(&str, u64)> = peers
                            .iter()
                            .map(|p| (p.url.as_str(), p.match_index.load(Ordering::Acquire)))
                            .collect();
                        let n = config::replicated_by_voters(&cfg, &self.me, durable, &matches);
                        rules::commit_at(
                            lead.epoch,
                            n,
                            |i| engine.epoch_at(i),
                            engine.commit_index(),
                        )
                    }
                };
                // Tagged with the epoch it was counted in: the WAL thread
                // ignores it if this node has been deposed since.
                if commit > engine.commit_index()
                    && engine.commit_to(commit, lead.epoch).await.is_err()
                {
                    return; // shutting down
                }
            }
            tokio::select! {
                _ = durable => {}
                _ = acked => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }
}

/// A vote on `req` by a node whose `meta` is `meta` and whose log ends at
/// `last`: the decision ([`rules::decide_vote`]), and the `meta` that must
/// be durable before the answer is sent when the decision changes it. The
/// vote handler and the crash model of votes both take exactly this step.
pub fn vote_step(meta: &Meta, last: LogPos, req: &VoteRequest) -> (VoteDecision, Option<Meta>) {
    let mut state = VoterState {
        current_epoch: meta.epoch,
        voted_for: meta.voted_for.clone(),
        last,
        rejoining: meta.rejoining,
    };
    let decision = rules::decide_vote(&state, req);
    if decision.reason == VoteReason::EpochOutOfReach || decision.new_epoch_to_persist.is_none() {
        return (decision, None);
    }
    state.apply_vote(req, &decision);
    let next = Meta {
        epoch: state.current_epoch,
        voted_for: state.voted_for,
        ..meta.clone()
    };
    (decision, Some(next))
}

/// The `meta` of a node that adopts `epoch` (newer than its own, seen from
/// a primary or a refused vote): the epoch used up, with no vote in it.
pub fn adopted(meta: &Meta, epoch: u64) -> Meta {
    Meta {
        epoch,
        voted_for: None,
        ..meta.clone()
    }
}

/// Header carrying the answering node's epoch on a `stale_epoch` refusal.
pub use kvproto::header::EPOCH as EPOCH_HEADER;

/// Reads a peer's answer to an append: 200 with a JSON reply, or 409
/// `stale_epoch` with the peer's epoch in [`EPOCH_HEADER`]. Anything else
/// counts as no answer.
async fn parse_append_reply(resp: reqwest::Response) -> Option<AppendReply> {
    if resp.status() == reqwest::StatusCode::CONFLICT {
        let my_epoch = resp
            .headers()
            .get(EPOCH_HEADER)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        return Some(AppendReply::Stale { my_epoch });
    }
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<AppendReply>().await.ok()
}
