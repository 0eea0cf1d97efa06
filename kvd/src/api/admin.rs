//! Masterless traffic (`/internal/ml/*`), the mode-switch admin endpoints
//! and the debug clock knob.
//!
//! # Mode switch (DESIGN §6), node side
//!
//! The orchestrator (`kvclient::admin::switch_mode`) drives every node:
//!
//! 1. `POST /v1/admin/pause_writes`: new writes get 503 `writes_paused`
//!    with `Retry-After: 1`; the call returns once every write in flight
//!    here has finished (acknowledged or failed), with the node's status.
//! 2. The orchestrator polls `/v1/status` until every node shows the same
//!    `digest` and has applied its whole log (`commit_index == last_index`).
//! 3. `POST /v1/admin/mode` with `{"mode", "base_index", "epoch",
//!    "base_ts_ms", "primary"}`, the same on every node: the node stops its
//!    current replication runtime, makes its contents a snapshot at
//!    `(base_index, epoch)` and restarts its log after it
//!    (`Engine::rebase`), persists mode, epoch and vote in `meta`, and
//!    starts the runtime of the new mode (primary/secondary: the node named
//!    `primary` leads `epoch`, the others follow it).
//! 4. `POST /v1/admin/resume_writes`.
//!
//! Why this is safe is argued in ARCHITECTURE.md ("Mode switch").

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{read_body, ApiError, AppState, Runtime, Shared};
use crate::masterless::node::{self as ml, MlNode};
use crate::replication::node::{self as ps, Replicator};
use crate::replication::rules;
use crate::server::Meta;
use crate::storage::{self, Engine, Op, Rebase, Timestamp};

/// What a node needs to build the runtime of either mode.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: String,
    pub advertise_url: String,
    pub peers: Vec<String>,
    pub sync_replicas: usize,
    pub write_quorum: usize,
    pub data_dir: PathBuf,
}

/// Builds (and starts) the runtime for `mode` (`masterless` or
/// `primary-secondary`).
pub fn start_runtime(
    engine: &Arc<Engine>,
    c: &ClusterSettings,
    meta: &Meta,
    primary: bool,
    reset_to: Option<(u64, Timestamp)>,
) -> anyhow::Result<Runtime> {
    if meta.mode == "masterless" {
        let node = MlNode::new(
            engine.clone(),
            ml::Settings {
                node_id: c.node_id.clone(),
                advertise_url: c.advertise_url.clone(),
                peers: c.peers.clone(),
                write_quorum: c.write_quorum,
                data_dir: c.data_dir.clone(),
            },
            reset_to,
        )?;
        node.start();
        Ok(Runtime {
            replicator: None,
            masterless: Some(node),
        })
    } else {
        let r = Replicator::new(
            engine.clone(),
            ps::Settings {
                node_id: c.node_id.clone(),
                advertise_url: c.advertise_url.clone(),
                peers: c.peers.clone(),
                sync_replicas: c.sync_replicas,
                data_dir: c.data_dir.clone(),
            },
            meta.clone(),
            primary,
        );
        r.start();
        Ok(Runtime {
            replicator: Some(r),
            masterless: None,
        })
    }
}

/// Header with a retry hint in milliseconds (kvclient reads it first).
pub const RETRY_AFTER_MS_HEADER: &str = "x-kv-retry-after-ms";

/// 503 `writes_paused` with `Retry-After: 1` and `X-KV-Retry-After-Ms: 50`.
pub fn paused_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "writes_paused",
        "writes are paused for a mode switch; retry shortly",
    )
    .retry_after(1)
    // A finer hint for kvclient: a switch's pause is usually under 1 s.
    .with_header(RETRY_AFTER_MS_HEADER, "50".to_string())
}

/// A client write in masterless mode: durable here, then (with
/// `--write-quorum W`) durable on `W - 1` peers, within the commit timeout.
pub async fn masterless_write(
    st: &AppState,
    node: &MlNode,
    op: Op,
    apply: bool,
) -> Result<storage::WriteResult, ApiError> {
    let r = st.engine.write(op, apply).await?;
    if !node.wait_quorum(r.index, st.commit_timeout).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "quorum_timeout",
            format!(
                "the write is durable on this node but not on {} nodes within {:?}; \
                 it will still reach the others, and retrying it is safe",
                node.write_quorum(),
                st.commit_timeout
            ),
        )
        .retry_after(1));
    }
    Ok(r)
}

fn not_masterless() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_masterless",
        "this node is not in masterless mode",
    )
}

/// `POST /internal/ml/stream`: a peer's own writes.
pub async fn ml_stream(State(st): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let node = st.ml().ok_or_else(not_masterless)?;
    let raw = read_body(
        body,
        st.limits.max_bulk_bytes.saturating_mul(2),
        st.limits.body_timeout,
        "stream body",
    )
    .await?;
    let req = ml::decode_stream(&raw).map_err(|m| ApiError::bad_request("invalid_stream", m))?;
    if node.is_stopped() {
        return Err(not_masterless());
    }
    let pos = node.handle_stream(req).await?;
    Ok(Json(json!({ "pos": pos })).into_response())
}

/// `GET /internal/ml/digest`: bucket digests for anti-entropy.
pub async fn ml_digest(State(st): State<Shared>) -> Result<Response, ApiError> {
    let node = st.ml().ok_or_else(not_masterless)?;
    Ok(Json(node.digest_answer()).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketsRequest {
    buckets: Vec<usize>,
}

/// `POST /internal/ml/buckets`: the versions in some buckets.
pub async fn ml_buckets(State(st): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let node = st.ml().ok_or_else(not_masterless)?;
    let raw = read_body(body, 1 << 20, st.limits.body_timeout, "buckets request").await?;
    let req: BucketsRequest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    let out = tokio::task::spawn_blocking(move || node.buckets_answer(&req.buckets))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

fn switch_status(st: &AppState) -> serde_json::Value {
    let s = st.engine.status();
    json!({
        "node_id": st.node_id,
        "mode": st.mode(),
        "writes_paused": st.paused.load(Ordering::Acquire),
        "epoch": st.epoch(),
        "last_index": s.last_index,
        "commit_index": st.engine.commit_index(),
        "applied_index": s.applied_index,
        "digest": format!("{:016x}", st.engine.state().digest()),
        "hlc": st.engine.hlc(),
    })
}

/// `POST /v1/admin/pause_writes`: new writes get 503 until resumed; returns
/// once the writes in flight have finished.
pub async fn pause_writes(State(st): State<Shared>) -> Response {
    st.paused.store(true, Ordering::Release);
    // Every write holds the gate shared while in flight.
    drop(st.write_gate.write().await);
    Json(switch_status(&st)).into_response()
}

/// `POST /v1/admin/resume_writes`.
pub async fn resume_writes(State(st): State<Shared>) -> Response {
    st.paused.store(false, Ordering::Release);
    Json(switch_status(&st)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeRequest {
    /// `masterless` or `primary-secondary`.
    mode: String,
    /// Common log base: at least every node's last index.
    base_index: u64,
    /// Greater than every node's epoch.
    epoch: u64,
    /// Masterless: the stamp every key gets (ms; logical 0, node 0).
    #[serde(default)]
    base_ts_ms: u64,
    /// Primary/secondary: node id of the primary of `epoch`.
    #[serde(default)]
    primary: Option<String>,
    /// Primary/secondary: the primary's URL for clients, so secondaries
    /// redirect writes at once (else they learn it from its first append).
    #[serde(default)]
    primary_url: Option<String>,
}

/// `POST /v1/admin/mode`: switch this node (writes must be paused).
pub async fn switch_mode(State(st): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let raw = read_body(body, 64 << 10, st.limits.body_timeout, "mode request").await?;
    let req: ModeRequest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    let Some(cluster) = st.cluster.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_peers",
            "this node runs alone (no --peers); it has no replication mode",
        ));
    };
    let masterless = match req.mode.as_str() {
        "masterless" => true,
        "primary-secondary" => false,
        other => {
            return Err(ApiError::bad_request(
                "invalid_mode",
                format!("mode must be masterless or primary-secondary, got {other:?}"),
            ))
        }
    };
    let primary = match (&req.primary, masterless) {
        (Some(p), false) => Some(p.clone()),
        (None, false) => {
            return Err(ApiError::bad_request(
                "invalid_mode",
                "switching to primary-secondary needs \"primary\" (a node id)",
            ))
        }
        (_, true) => None,
    };
    if !st.paused.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "writes_not_paused",
            "pause writes (POST /v1/admin/pause_writes) before switching modes",
        ));
    }
    let _one = st.switching.lock().await;
    let current = st.mode();
    // Idempotent: a repeated request finds the switch done.
    if current == req.mode && st.engine.epoch() == req.epoch {
        return Ok(Json(switch_status(&st)).into_response());
    }
    if req.epoch <= st.epoch() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_epoch",
            format!(
                "the switch's epoch {} is not above this node's epoch {}",
                req.epoch,
                st.epoch()
            ),
        ));
    }
    if !rules::epoch_in_reach(st.epoch(), req.epoch) {
        return Err(ApiError::bad_request(
            "epoch_out_of_range",
            format!(
                "the switch's epoch {} is more than {} above this node's epoch {}",
                req.epoch,
                rules::MAX_EPOCH_STEP,
                st.epoch()
            ),
        ));
    }
    let base_ts = Timestamp {
        physical_ms: req.base_ts_ms,
        logical: 0,
        node: 0,
    };
    // Every node observes the base stamp: one far ahead would move every
    // clock there.
    st.engine.check_stamp(base_ts)?;
    // Stop the old runtime: no more shipping, streaming or repairs here.
    let old = std::mem::take(&mut *st.runtime.write());
    if let Some(r) = &old.replicator {
        r.stop();
    }
    if let Some(n) = &old.masterless {
        n.stop();
    }
    let rebase = Rebase {
        masterless,
        base_index: req.base_index,
        epoch: req.epoch,
        base_ts,
    };
    if let Err(e) = st.engine.rebase(rebase).await {
        // Nothing changed: the old runtime resumes.
        let restart = restart_runtime(&st, &cluster, &old);
        return Err(match (e, restart) {
            (storage::Error::NotQuiescent(m), _) => {
                ApiError::new(StatusCode::CONFLICT, "not_quiescent", m)
            }
            (e, _) => ApiError::from(e),
        });
    }
    let meta = {
        let (mut meta, _) = Meta::load_or_init(&cluster.data_dir, &cluster.node_id, &req.mode)
            .map_err(|e| internal("meta_read_failed", e))?;
        meta.mode = req.mode.clone();
        meta.epoch = req.epoch;
        // Every node records its vote in the new epoch for the one primary
        // the switch names, so no one else can win that epoch.
        meta.voted_for = primary.clone();
        meta.store(&cluster.data_dir)
            .map_err(|e| internal("meta_write_failed", e))?;
        meta
    };
    let i_lead = primary.as_deref() == Some(cluster.node_id.as_str());
    let rt = start_runtime(
        &st.engine,
        &cluster,
        &meta,
        i_lead,
        Some((req.base_index, base_ts)),
    )
    .map_err(|e| internal("runtime_start_failed", e))?;
    if let (Some(r), Some(url), false) = (&rt.replicator, &req.primary_url, i_lead) {
        r.set_primary_hint(url.trim_end_matches('/').to_string());
    }
    st.set_runtime(rt);
    eprintln!(
        "kvd: switched to {} at base index {} in epoch {}{}",
        req.mode,
        req.base_index,
        req.epoch,
        if i_lead { " as primary" } else { "" }
    );
    Ok(Json(switch_status(&st)).into_response())
}

fn internal(code: &'static str, e: anyhow::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, code, format!("{e:#}"))
}

/// After a refused rebase, the runtime that was stopped comes back.
fn restart_runtime(st: &AppState, c: &ClusterSettings, old: &Runtime) -> anyhow::Result<()> {
    let (meta, _) = Meta::load_or_init(&c.data_dir, &c.node_id, "primary-secondary")?;
    let was_primary = old
        .replicator
        .as_ref()
        .is_some_and(|r| r.primary_url().as_deref() == Some(c.advertise_url.as_str()));
    let rt = start_runtime(&st.engine, c, &meta, was_primary, None)?;
    st.set_runtime(rt);
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    offset_ms: i64,
}

/// `POST /v1/admin/debug/clock {"offset_ms": N}` (needs `--enable-debug`):
/// sets this node's wall-clock offset, e.g. to jump it backwards.
pub async fn debug_clock(State(st): State<Shared>, body: Body) -> Result<Response, ApiError> {
    if !st.enable_debug {
        return Err(ApiError::bad_request(
            "debug_disabled",
            "the clock offset needs kvd to run with --enable-debug",
        ));
    }
    let raw = read_body(body, 4 << 10, st.limits.body_timeout, "clock request").await?;
    let req: ClockRequest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    st.wall.set_offset_ms(req.offset_ms);
    Ok(Json(json!({"offset_ms": req.offset_ms, "hlc": st.engine.hlc()})).into_response())
}
