//! The node: what it is (its id, persisted epoch and vote in `meta`), the
//! mode it runs in and that mode's runtime ([`Runtime`]), the write path
//! every mode shares (pauses, commit and quorum waits), the runtime's
//! lifecycle (started at boot, stopped on shutdown and for a mode switch)
//! and the live mode switch ([`switch`]).
//!
//! Below it: the storage engine and the two runtimes; above it: the HTTP
//! API, which maps this layer's errors ([`WriteError`],
//! [`switch::SwitchError`]) to status codes.

pub mod switch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvproto::status::{Role, SwitchStatus};
use kvproto::Mode;

use crate::masterless::hlc::WallClock;
use crate::masterless::node::{self as ml, MlNode};
use crate::model::{Expiry, TxnOp};
use crate::replication::node::{self as ps, Replicator};
use crate::replication::rules;
use crate::storage::{self, ApplyOutcome, Engine, Meta, MetaStore, Op, Timestamp, Txn};

/// What a node needs to build the runtime of either cluster mode.
#[derive(Clone)]
pub struct ClusterSettings {
    pub node_id: String,
    pub advertise_url: String,
    pub peers: Vec<String>,
    /// `--sync-replicas`, if given (a fixed count instead of the voters).
    pub sync_replicas: Option<usize>,
    /// `--join`: not in the bootstrap configuration.
    pub join: bool,
    pub write_quorum: usize,
    pub data_dir: PathBuf,
    /// The data dir's `meta`.
    pub meta: MetaStore,
}

/// The replication runtime of the node's current mode.
#[derive(Clone)]
pub enum Runtime {
    /// A node without peers: nothing runs beside the engine.
    Single,
    /// Between two modes, during a live switch: no runtime, writes refused.
    Switching,
    PrimarySecondary(Arc<Replicator>),
    Masterless(Arc<MlNode>),
}

impl Runtime {
    /// Builds and starts the runtime of `meta.mode` (a cluster mode).
    /// `primary`: lead `meta.epoch` (primary/secondary). `reset_to`: after
    /// a mode switch, the common base (index and stamp) every masterless
    /// stream restarts from.
    pub fn start(
        engine: &Arc<Engine>,
        c: &ClusterSettings,
        meta: &Meta,
        primary: bool,
        reset_to: Option<(u64, Timestamp)>,
    ) -> Result<Runtime, storage::Error> {
        let rt = if meta.mode == Mode::Masterless {
            let settings = ml::Settings {
                node_id: c.node_id.clone(),
                advertise_url: c.advertise_url.clone(),
                peers: c.peers.clone(),
                write_quorum: c.write_quorum,
                data_dir: c.data_dir.clone(),
            };
            Runtime::Masterless(MlNode::new(engine.clone(), settings, reset_to)?)
        } else {
            let settings = ps::Settings {
                node_id: c.node_id.clone(),
                advertise_url: c.advertise_url.clone(),
                peers: c.peers.clone(),
                sync_replicas: c.sync_replicas,
                join: c.join,
                meta: c.meta.clone(),
            };
            Runtime::PrimarySecondary(Replicator::new(
                engine.clone(),
                settings,
                meta.clone(),
                primary,
            ))
        };
        match &rt {
            Runtime::PrimarySecondary(r) => r.start(),
            Runtime::Masterless(n) => n.start(),
            Runtime::Single | Runtime::Switching => {}
        }
        Ok(rt)
    }

    /// The mode this runtime serves; `None` while switching.
    pub fn mode(&self) -> Option<Mode> {
        match self {
            Runtime::Single => Some(Mode::Single),
            Runtime::Switching => None,
            Runtime::PrimarySecondary(_) => Some(Mode::PrimarySecondary),
            Runtime::Masterless(_) => Some(Mode::Masterless),
        }
    }

    /// Stops the background tasks and waits for them to end.
    pub async fn stop(&self) {
        match self {
            Runtime::PrimarySecondary(r) => r.stop().await,
            Runtime::Masterless(n) => n.stop().await,
            Runtime::Single | Runtime::Switching => {}
        }
    }

    /// `(peer URL, entries of our log it lacks)` for every peer.
    pub fn peer_lags(&self) -> Vec<(String, u64)> {
        match self {
            Runtime::PrimarySecondary(r) => r.peer_lags(),
            Runtime::Masterless(n) => n.peer_lags(),
            Runtime::Single | Runtime::Switching => Vec::new(),
        }
    }
}

/// Where a client write may go, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteTarget {
    /// Here (a primary, a masterless peer, a single node).
    Here,
    /// The primary is handing over to another node.
    Transferring,
    /// A secondary: to the primary at this base URL.
    Primary(String),
    /// A secondary that knows no primary yet.
    NoPrimary,
}

/// An acknowledged client write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub index: u64,
    pub outcome: ApplyOutcome,
    /// The last-write-wins stamp, when the write's mode orders by it
    /// (masterless).
    pub stamp: Option<Timestamp>,
}

/// Why a client write was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Writes are paused for a mode switch: nothing was logged.
    #[error("writes are paused for a mode switch; retry shortly")]
    Paused,
    /// Logged, but not committed in time; it may still commit.
    #[error(
        "the write was not committed within {0:?} (no majority reachable?); \
         it may still commit, and retrying it is safe"
    )]
    CommitTimeout(Duration),
    /// Masterless: durable here, but not on the write quorum in time.
    #[error(
        "the write is durable on this node but not on {quorum} nodes within {timeout:?}; \
         it will still reach the others, and retrying it is safe"
    )]
    QuorumTimeout { quorum: usize, timeout: Duration },
    /// Masterless mode has no single order of writes for a compare to
    /// hold in (docs/DESIGN.md §2.12), nor for a lease's deadline to move
    /// in (§2.16): nothing was logged.
    #[error(
        "a masterless node takes no conditional write, transaction with a compare or lease: \
         its nodes order writes by stamp, not by one log, so the check or the lease could not hold"
    )]
    UnsupportedInMasterless,
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// Whether a client write may be logged now: not while writes are paused
/// or the node is between modes, and one that needs a single log order
/// (`one_log`: a compare, a lease) not in masterless mode (`mode`: `None`
/// while switching).
pub fn admit(paused: bool, mode: Option<Mode>, one_log: bool) -> Result<(), WriteError> {
    match mode {
        _ if paused => Err(WriteError::Paused),
        None => Err(WriteError::Paused),
        Some(Mode::Masterless) if one_log => Err(WriteError::UnsupportedInMasterless),
        Some(_) => Ok(()),
    }
}

/// Whether a write holds only in a single log order: a lease's grant,
/// keep-alive or revoke, or a key put on a lease (a lease's deadline moves
/// by records in log order, which masterless nodes do not share).
pub fn needs_one_log(op: &Op) -> bool {
    match op {
        Op::LeaseGrant { .. } | Op::LeaseKeepAlive { .. } | Op::LeaseRevoke { .. } => true,
        Op::Put { expiry, .. } => on_lease(expiry),
        Op::Bulk { items } => items.iter().any(|(_, _, e)| on_lease(e)),
        Op::Txn { ops } => ops.iter().any(txn_op_on_lease),
        Op::Delete { .. } | Op::Noop | Op::Expire { .. } | Op::Config { .. } => false,
    }
}

/// [`needs_one_log`] of a transaction: a compare, or a put on a lease.
pub fn txn_needs_one_log(txn: &Txn) -> bool {
    !txn.compare.is_empty() || txn.success.iter().chain(&txn.failure).any(txn_op_on_lease)
}

fn on_lease(e: &Expiry) -> bool {
    matches!(e, Expiry::Lease(_))
}

fn txn_op_on_lease(op: &TxnOp) -> bool {
    matches!(op, TxnOp::Put { expiry, .. } if on_lease(expiry))
}

/// A running node.
pub struct Node {
    engine: Arc<Engine>,
    node_id: String,
    /// How to build a runtime of either cluster mode (None: a single node).
    cluster: Option<ClusterSettings>,
    /// The runtime of the current mode (a live switch replaces it).
    runtime: parking_lot::RwLock<Runtime>,
    /// Epoch of a single node (a cluster node's is its runtime's).
    single_epoch: u64,
    /// Writes answer [`WriteError::Paused`] while set (mode switch).
    paused: AtomicBool,
    /// Held shared by every write in flight; a pause takes it exclusively
    /// to wait for them.
    write_gate: tokio::sync::RwLock<()>,
    /// One mode switch at a time.
    switching: tokio::sync::Mutex<()>,
    /// Longest a write waits for its commit (or quorum).
    commit_timeout: Duration,
    /// The node's wall clock (its offset is a debug knob).
    wall: WallClock,
}

impl Node {
    pub fn new(
        engine: Arc<Engine>,
        meta: &Meta,
        cluster: Option<ClusterSettings>,
        runtime: Runtime,
        wall: WallClock,
        commit_timeout: Duration,
    ) -> Node {
        Node {
            engine,
            node_id: meta.node_id.clone(),
            cluster,
            runtime: parking_lot::RwLock::new(runtime),
            single_epoch: meta.epoch,
            paused: AtomicBool::new(false),
            write_gate: tokio::sync::RwLock::new(()),
            switching: tokio::sync::Mutex::new(()),
            commit_timeout,
            wall,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Longest a write waits for its commit (or a consistent read for its
    /// barrier).
    pub fn commit_timeout(&self) -> Duration {
        self.commit_timeout
    }

    pub fn wall(&self) -> &WallClock {
        &self.wall
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The runtime of the current mode (a cheap clone).
    pub fn runtime(&self) -> Runtime {
        self.runtime.read().clone()
    }

    fn set_runtime(&self, rt: Runtime) {
        *self.runtime.write() = rt;
    }

    /// The current mode; `None` in the middle of a switch.
    pub fn mode(&self) -> Option<Mode> {
        self.runtime.read().mode()
    }

    /// The primary/secondary runtime, when in that mode.
    pub fn replicator(&self) -> Option<Arc<Replicator>> {
        match &*self.runtime.read() {
            Runtime::PrimarySecondary(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// The masterless runtime, when in that mode.
    pub fn masterless(&self) -> Option<Arc<MlNode>> {
        match &*self.runtime.read() {
            Runtime::Masterless(n) => Some(n.clone()),
            _ => None,
        }
    }

    pub fn epoch(&self) -> u64 {
        match self.replicator() {
            Some(r) => r.epoch(),
            None if self.cluster.is_some() => self.engine.epoch(),
            None => self.single_epoch,
        }
    }

    /// The primary/secondary role (a node outside that mode counts as a
    /// primary: it takes writes).
    pub fn replication_role(&self) -> rules::Role {
        self.replicator().map_or(rules::Role::Primary, |r| r.role())
    }

    /// The role `/v1/status` shows.
    pub fn role(&self) -> Role {
        match self.runtime() {
            Runtime::Masterless(_) => Role::Peer,
            _ => match self.replication_role() {
                rules::Role::Primary => Role::Primary,
                rules::Role::Secondary => Role::Secondary,
            },
        }
    }

    /// The primary/secondary runtime's node was re-seeded and has not
    /// caught up yet.
    pub fn rejoining(&self) -> bool {
        self.replicator().is_some_and(|r| r.rejoining())
    }

    pub fn writes_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Only the primary takes writes (in primary/secondary mode).
    pub fn write_target(&self) -> WriteTarget {
        let Some(r) = self.replicator() else {
            return WriteTarget::Here;
        };
        if r.is_primary() {
            if r.writes_paused() {
                return WriteTarget::Transferring;
            }
            return WriteTarget::Here;
        }
        match r.primary_url() {
            Some(primary) => WriteTarget::Primary(primary),
            None => WriteTarget::NoPrimary,
        }
    }

    /// Logs a client write and waits for its commit (primary/secondary) or
    /// write quorum (masterless), within the commit timeout.
    /// A masterless node refuses the lease ops and puts on a lease.
    pub async fn write(&self, op: Op, apply: bool) -> Result<Written, WriteError> {
        let one_log = needs_one_log(&op);
        self.logged(one_log, self.commit_timeout, || {
            self.engine.write(op, apply)
        })
        .await
    }

    /// [`Node::write`] waiting up to `timeout` for the commit (a
    /// membership change's own `timeout_ms`).
    pub async fn write_within(&self, op: Op, timeout: Duration) -> Result<Written, WriteError> {
        let one_log = needs_one_log(&op);
        self.logged(one_log, timeout, || self.engine.write(op, true))
            .await
    }

    /// Logs a transaction as one record, under the same rules as
    /// [`Node::write`]; a masterless node refuses one with a compare or a
    /// put on a lease.
    pub async fn write_txn(&self, txn: Txn) -> Result<Written, WriteError> {
        let one_log = txn_needs_one_log(&txn);
        self.logged(one_log, self.commit_timeout, || self.engine.write_txn(txn))
            .await
    }

    /// The write path every client write takes: `log` hands the write to
    /// the engine, and the runtime decides what else it waits for.
    async fn logged<F>(
        &self,
        one_log: bool,
        commit_timeout: Duration,
        log: impl FnOnce() -> F,
    ) -> Result<Written, WriteError>
    where
        F: Future<Output = Result<storage::WriteResult, storage::Error>>,
    {
        // Held while in flight, so that a pause can wait for this write.
        let _gate = self.write_gate.read().await;
        let runtime = self.runtime();
        admit(self.writes_paused(), runtime.mode(), one_log)?;
        let r = match runtime {
            Runtime::Switching => return Err(WriteError::Paused),
            Runtime::Masterless(n) => return self.quorum(&n, log().await?).await,
            // A single node commits at its own fsync: nothing to time out on.
            Runtime::Single => log().await?,
            Runtime::PrimarySecondary(_) => tokio::time::timeout(commit_timeout, log())
                .await
                .map_err(|_| WriteError::CommitTimeout(commit_timeout))??,
        };
        Ok(Written {
            index: r.index,
            outcome: r.outcome,
            stamp: None,
        })
    }

    /// A masterless write, durable here, once (with `--write-quorum W`) it
    /// is durable on `W - 1` peers too, within the commit timeout.
    async fn quorum(&self, node: &MlNode, r: storage::WriteResult) -> Result<Written, WriteError> {
        if !node.wait_quorum(r.index, self.commit_timeout).await {
            return Err(WriteError::QuorumTimeout {
                quorum: node.write_quorum(),
                timeout: self.commit_timeout,
            });
        }
        Ok(Written {
            index: r.index,
            outcome: r.outcome,
            stamp: Some(r.ts),
        })
    }

    /// Refuses new writes until [`Node::resume_writes`]; returns once the
    /// writes in flight have finished.
    pub async fn pause_writes(&self) -> SwitchStatus {
        self.paused.store(true, Ordering::Release);
        // Every write holds the gate shared while in flight.
        drop(self.write_gate.write().await);
        // Nor may the expirer log: the switch reads this node's last index
        // now and expects it to stay. A failure here is the engine's (it
        // is stopping or poisoned), and the status says so.
        if let Err(e) = self.engine.pause_expiries(true).await {
            tracing::warn!(error = %e, "could not pause expiries");
        }
        self.switch_status()
    }

    pub async fn resume_writes(&self) -> SwitchStatus {
        self.paused.store(false, Ordering::Release);
        if let Err(e) = self.engine.pause_expiries(false).await {
            tracing::warn!(error = %e, "could not resume expiries");
        }
        self.switch_status()
    }

    /// What a mode-switch step answers.
    pub fn switch_status(&self) -> SwitchStatus {
        let s = self.engine.status();
        SwitchStatus {
            applied_index: s.applied_index,
            commit_index: self.engine.commit_index(),
            digest: format!("{:016x}", self.engine.state().digest()),
            epoch: self.epoch(),
            hlc: self.engine.hlc(),
            last_index: s.last_index,
            mode: self.mode(),
            node_id: self.node_id.clone(),
            writes_paused: self.writes_paused(),
        }
    }

    /// Stops the runtime for good (shutdown): its tasks end, its peers are
    /// no longer served.
    pub async fn stop(&self) {
        let rt = std::mem::replace(&mut *self.runtime.write(), Runtime::Switching);
        rt.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(expiry: Expiry) -> TxnOp {
        TxnOp::Put {
            key: bytes::Bytes::from_static(b"k"),
            value: bytes::Bytes::new(),
            expiry,
        }
    }

    #[test]
    fn leases_need_one_log_and_deadlines_do_not() {
        let k = || bytes::Bytes::from_static(b"k");
        for op in [
            Op::LeaseGrant { ttl_ms: 5 },
            Op::LeaseKeepAlive { id: 1 },
            Op::LeaseRevoke {
                id: 1,
                expired: false,
            },
            Op::Put {
                key: k(),
                value: k(),
                expiry: Expiry::Lease(3),
            },
            Op::Bulk {
                items: vec![(k(), k(), Expiry::At(9)), (k(), k(), Expiry::Lease(3))],
            },
            Op::Txn {
                ops: vec![put(Expiry::Never), put(Expiry::Lease(2))],
            },
        ] {
            assert!(needs_one_log(&op), "{op:?}");
        }
        for op in [
            Op::Put {
                key: k(),
                value: k(),
                expiry: Expiry::At(5),
            },
            Op::Put {
                key: k(),
                value: k(),
                expiry: Expiry::Keep,
            },
            Op::Bulk {
                items: vec![(k(), k(), Expiry::At(9)), (k(), k(), Expiry::Never)],
            },
            Op::Delete { key: k() },
            Op::Noop,
            Op::Expire {
                keys: vec![(k(), 3)],
            },
            Op::Txn {
                ops: vec![put(Expiry::Keep), put(Expiry::At(1))],
            },
        ] {
            assert!(!needs_one_log(&op), "{op:?}");
        }
        let on_lease = Txn {
            failure: vec![put(Expiry::Lease(4))],
            ..Txn::default()
        };
        assert!(txn_needs_one_log(&on_lease));
        let timed = Txn {
            success: vec![put(Expiry::At(4)), put(Expiry::Keep)],
            ..Txn::default()
        };
        assert!(!txn_needs_one_log(&timed));
    }

    #[test]
    fn which_writes_are_admitted() {
        for compares in [false, true] {
            for mode in [Mode::Single, Mode::PrimarySecondary, Mode::Masterless] {
                let why = format!("{mode:?}, compares {compares}");
                assert!(
                    matches!(admit(true, Some(mode), compares), Err(WriteError::Paused)),
                    "{why}"
                );
                let admitted = admit(false, Some(mode), compares);
                if mode == Mode::Masterless && compares {
                    assert!(
                        matches!(admitted, Err(WriteError::UnsupportedInMasterless)),
                        "{why}"
                    );
                } else {
                    assert!(admitted.is_ok(), "{why}");
                }
            }
            assert!(matches!(
                admit(false, None, compares),
                Err(WriteError::Paused)
            ));
        }
    }
}
