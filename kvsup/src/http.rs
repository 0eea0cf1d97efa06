//! The daemon's HTTP API, spoken by the `kvsup` commands (and scraped by
//! Prometheus at `/metrics`). Loopback only: it can kill nodes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::daemon::{ApplyError, Sup};

#[derive(Clone)]
struct Ctx {
    sup: Arc<Sup>,
    stop: mpsc::Sender<()>,
}

pub fn router(sup: Arc<Sup>, stop: mpsc::Sender<()>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/apply", post(apply))
        .route("/v1/kill", post(kill))
        .route("/v1/promote", post(promote))
        .route("/v1/down", post(down))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(Ctx { sup, stop })
}

fn error(code: StatusCode, kind: &str, message: String) -> Response {
    (
        code,
        Json(json!({"error": {"code": kind, "message": message}})),
    )
        .into_response()
}

async fn status(State(c): State<Ctx>) -> Response {
    Json(c.sup.status()).into_response()
}

async fn events(State(c): State<Ctx>) -> Response {
    Json(json!({"events": c.sup.events()})).into_response()
}

async fn metrics(State(c): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.sup.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyReq {
    path: PathBuf,
    base_dir: PathBuf,
    #[serde(default)]
    dry_run: bool,
}

async fn apply(State(c): State<Ctx>, Json(req): Json<ApplyReq>) -> Response {
    // Relative paths would resolve against the daemon's directory, which
    // the requester does not know.
    if !req.path.is_absolute() || !req.base_dir.is_absolute() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "path and base_dir must be absolute".into(),
        );
    }
    match c.sup.apply(&req.path, &req.base_dir, req.dry_run).await {
        Ok(changes) => Json(json!({"changes": changes, "dry_run": req.dry_run})).into_response(),
        Err(ApplyError::Invalid(m)) => error(StatusCode::BAD_REQUEST, "invalid_manifest", m),
        Err(ApplyError::Refused(m)) => error(StatusCode::CONFLICT, "change_refused", m),
        Err(ApplyError::Failed(m)) => error(StatusCode::INTERNAL_SERVER_ERROR, "apply_failed", m),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillReq {
    node: String,
    #[serde(default = "default_signal")]
    signal: String,
}

fn default_signal() -> String {
    "KILL".into()
}

/// The signals `kvsup kill` may send.
pub fn parse_signal(s: &str) -> Option<Signal> {
    match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
        "KILL" => Some(Signal::SIGKILL),
        "TERM" => Some(Signal::SIGTERM),
        "STOP" => Some(Signal::SIGSTOP),
        "CONT" => Some(Signal::SIGCONT),
        _ => None,
    }
}

async fn kill(State(c): State<Ctx>, Json(req): Json<KillReq>) -> Response {
    let Some(sig) = parse_signal(&req.signal) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_signal",
            format!("{:?}: use KILL, TERM, STOP or CONT", req.signal),
        );
    };
    match c.sup.kill(&req.node, sig) {
        Ok(pid) => {
            Json(json!({"node": req.node, "pid": pid, "signal": sig.to_string()})).into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, "no_such_process", format!("{e:#}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteReq {
    node: String,
    #[serde(default = "default_promote_ms")]
    timeout_ms: u64,
}

fn default_promote_ms() -> u64 {
    30_000
}

async fn promote(State(c): State<Ctx>, Json(req): Json<PromoteReq>) -> Response {
    let timeout = Duration::from_millis(req.timeout_ms.clamp(100, 600_000));
    match c.sup.promote(&req.node, timeout).await {
        Ok(epoch) => Json(json!({"node": req.node, "epoch": epoch})).into_response(),
        Err(e) => error(StatusCode::CONFLICT, "promote_failed", format!("{e:#}")),
    }
}

async fn down(State(c): State<Ctx>) -> Response {
    let report = c.sup.down(Duration::from_secs(10)).await;
    // Stop serving once this answer is out.
    let _ = c.stop.try_send(());
    Json(json!({"stopped": report, "supervisor_pid": std::process::id()})).into_response()
}
