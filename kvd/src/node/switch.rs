//! The live mode switch (docs/DESIGN.md §6), node side.
//!
//! The orchestrator (`kvclient::admin::switch_mode`) drives every node:
//!
//! 1. `POST /v1/admin/pause_writes`: new writes get 503 `writes_paused`
//!    with `Retry-After: 1`; the call returns once every write in flight
//!    here has finished (acknowledged or failed), with the node's status.
//! 2. The orchestrator polls `/v1/status` until every node shows the same
//!    `digest` and has applied its whole log (`commit_index == last_index`).
//! 3. `POST /v1/admin/mode` with `{"mode", "base_index", "epoch",
//!    "base_ts_ms", "primary"}`, the same on every node: [`Node::switch_mode`]
//!    stops the current runtime, makes the node's contents a snapshot at
//!    `(base_index, epoch)` and restarts its log after it
//!    (`Engine::rebase`), persists mode, epoch and vote in `meta`, and
//!    starts the runtime of the new mode (primary/secondary: the node named
//!    `primary` leads `epoch`, the others follow it).
//! 4. `POST /v1/admin/resume_writes`.
//!
//! Why this is safe is argued in ARCHITECTURE.md ("Mode switch").

use kvproto::admin::ModeRequest;
use kvproto::status::SwitchStatus;
use kvproto::Mode;

use super::{ClusterSettings, Node, Runtime};
use crate::replication::rules;
use crate::storage::{self, Rebase, Timestamp};

/// Why a node did not switch. Nothing changed, except where it says so.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("this node runs alone (no --peers); it has no replication mode")]
    NoPeers,
    /// The request names no cluster mode, or lacks what its mode needs.
    #[error("{0}")]
    InvalidMode(String),
    #[error("pause writes (POST /v1/admin/pause_writes) before switching modes")]
    NotPaused,
    #[error("the switch's epoch {epoch} is not above this node's epoch {mine}")]
    StaleEpoch { epoch: u64, mine: u64 },
    #[error(
        "the switch's epoch {epoch} is more than {} above this node's epoch {mine}",
        rules::MAX_EPOCH_STEP
    )]
    EpochOutOfReach { epoch: u64, mine: u64 },
    /// Entries not yet applied, or a base behind this node's log.
    #[error("{0}")]
    NotQuiescent(String),
    /// The base stamp, or the rebase, was refused by the engine.
    #[error(transparent)]
    Storage(storage::Error),
    /// The switch is done in the engine but `meta` could not be read.
    #[error("{0}")]
    MetaRead(storage::Error),
    /// The switch is done in the engine but `meta` could not be written.
    #[error("{0}")]
    MetaWrite(storage::Error),
    #[error("{0}")]
    RuntimeStart(storage::Error),
}

/// A checked [`ModeRequest`].
struct Target {
    mode: Mode,
    /// Primary/secondary: the node id of the primary of the new epoch.
    primary: Option<String>,
}

fn target(req: &ModeRequest) -> Result<Target, SwitchError> {
    let mode = match req.mode.parse::<Mode>() {
        Ok(m) if m.is_cluster() => m,
        _ => {
            return Err(SwitchError::InvalidMode(format!(
                "mode must be masterless or primary-secondary, got {:?}",
                req.mode
            )))
        }
    };
    let primary = match (&req.primary, mode) {
        (_, Mode::Masterless) => None,
        (Some(p), _) => Some(p.clone()),
        (None, _) => {
            return Err(SwitchError::InvalidMode(
                "switching to primary-secondary needs \"primary\" (a node id)".into(),
            ))
        }
    };
    Ok(Target { mode, primary })
}

impl Node {
    /// `POST /v1/admin/mode`: switches this node (writes must be paused).
    /// Idempotent: a repeated request finds the switch done.
    pub async fn switch_mode(&self, req: &ModeRequest) -> Result<SwitchStatus, SwitchError> {
        let Some(cluster) = self.cluster.clone() else {
            return Err(SwitchError::NoPeers);
        };
        let to = target(req)?;
        if !self.writes_paused() {
            return Err(SwitchError::NotPaused);
        }
        let _one = self.switching.lock().await;
        if self.mode() == Some(to.mode) && self.engine.epoch() == req.epoch {
            return Ok(self.switch_status());
        }
        self.check_epoch(req.epoch)?;
        let base_ts = Timestamp {
            physical_ms: req.base_ts_ms,
            logical: 0,
            node: 0,
        };
        // Every node observes the base stamp: one far ahead would move every
        // clock there.
        self.engine
            .check_stamp(base_ts)
            .map_err(SwitchError::Storage)?;
        self.rebase(&cluster, &to, req, base_ts).await?;
        let i_lead = to.primary.as_deref() == Some(cluster.node_id.as_str());
        let meta = self.persist_switch(&cluster, &to, req.epoch)?;
        let rt = Runtime::start(
            &self.engine,
            &cluster,
            &meta,
            i_lead,
            Some((req.base_index, base_ts)),
        )
        .map_err(SwitchError::RuntimeStart)?;
        if let (Runtime::PrimarySecondary(r), Some(url), false) = (&rt, &req.primary_url, i_lead) {
            r.set_primary_hint(url.trim_end_matches('/').to_string());
        }
        self.set_runtime(rt);
        tracing::info!(
            node = %self.node_id,
            mode = %to.mode,
            base_index = req.base_index,
            epoch = req.epoch,
            primary = i_lead,
            "switched mode"
        );
        Ok(self.switch_status())
    }

    /// The switch's epoch must be above ours, and within reach of it.
    fn check_epoch(&self, epoch: u64) -> Result<(), SwitchError> {
        let mine = self.epoch();
        if epoch <= mine {
            return Err(SwitchError::StaleEpoch { epoch, mine });
        }
        if !rules::epoch_in_reach(mine, epoch) {
            return Err(SwitchError::EpochOutOfReach { epoch, mine });
        }
        Ok(())
    }

    /// Stops the old runtime (no more shipping, streaming or repairs here)
    /// and rebases the engine; if the engine refuses, the old runtime comes
    /// back and nothing has changed.
    async fn rebase(
        &self,
        cluster: &ClusterSettings,
        to: &Target,
        req: &ModeRequest,
        base_ts: Timestamp,
    ) -> Result<(), SwitchError> {
        let old = std::mem::replace(&mut *self.runtime.write(), Runtime::Switching);
        old.stop().await;
        let rebase = Rebase {
            policy: to.mode.into(),
            base_index: req.base_index,
            epoch: req.epoch,
            base_ts,
        };
        let Err(e) = self.engine.rebase(rebase).await else {
            return Ok(());
        };
        if let Err(restart) = self.restart_runtime(cluster, &old) {
            tracing::error!(
                node = %self.node_id,
                error = %restart,
                "the runtime stopped for a refused switch did not restart"
            );
        }
        Err(match e {
            storage::Error::NotQuiescent(m) => SwitchError::NotQuiescent(m),
            e => SwitchError::Storage(e),
        })
    }

    /// Persists the new mode and epoch in `meta`, with every node's vote in
    /// the new epoch for the one primary the switch names, so no one else
    /// can win that epoch.
    fn persist_switch(
        &self,
        cluster: &ClusterSettings,
        to: &Target,
        epoch: u64,
    ) -> Result<storage::Meta, SwitchError> {
        let (mut meta, _) = cluster
            .meta
            .load_or_init(&cluster.node_id, to.mode)
            .map_err(SwitchError::MetaRead)?;
        meta.mode = to.mode;
        meta.epoch = epoch;
        meta.voted_for = to.primary.clone();
        cluster.meta.store(&meta).map_err(SwitchError::MetaWrite)?;
        Ok(meta)
    }

    /// After a refused rebase, the runtime that was stopped comes back.
    fn restart_runtime(&self, c: &ClusterSettings, old: &Runtime) -> Result<(), storage::Error> {
        let (meta, _) = c.meta.load_or_init(&c.node_id, Mode::PrimarySecondary)?;
        let was_primary = match old {
            Runtime::PrimarySecondary(r) => {
                r.primary_url().as_deref() == Some(c.advertise_url.as_str())
            }
            _ => false,
        };
        self.set_runtime(Runtime::start(&self.engine, c, &meta, was_primary, None)?);
        Ok(())
    }
}
