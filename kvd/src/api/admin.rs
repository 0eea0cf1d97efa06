//! Masterless traffic (`/internal/ml/*`), the mode-switch admin endpoints
//! (the switch itself is `node::switch`) and the debug clock knob.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvproto::admin::{ClockAnswer, ClockRequest, ModeRequest};
use kvproto::code;
use serde::Deserialize;
use serde_json::json;

use super::query::{NoParams, Params};
use super::{blocking, read_body, ApiError, Shared};
use crate::masterless::node::{self as ml, MlNode};

fn not_masterless() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        code::NOT_MASTERLESS,
        "this node is not in masterless mode",
    )
}

/// The masterless runtime, or 409 `not_masterless`.
fn masterless(st: &Shared) -> Result<Arc<MlNode>, ApiError> {
    st.node.masterless().ok_or_else(not_masterless)
}

/// Parses a JSON request body, or 400 `invalid_json`.
fn parse<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw)
        .map_err(|e| ApiError::bad_request(code::INVALID_JSON, e.to_string()))
}

/// `POST /internal/ml/stream`: a peer's own writes.
pub async fn ml_stream(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let node = masterless(&st)?;
    let raw = read_body(&st, body, st.limits.max_peer_body_bytes(), "stream body").await?;
    let req =
        ml::decode_stream(&raw).map_err(|m| ApiError::bad_request(code::INVALID_STREAM, m))?;
    if node.is_stopped() {
        return Err(not_masterless());
    }
    let pos = node.handle_stream(req).await?;
    Ok(Json(json!({ "pos": pos })).into_response())
}

/// `GET /internal/ml/digest`: bucket digests for anti-entropy.
pub async fn ml_digest(
    State(st): State<Shared>,
    _: Params<NoParams>,
) -> Result<Response, ApiError> {
    Ok(Json(masterless(&st)?.digest_answer()).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketsRequest {
    buckets: Vec<usize>,
}

/// `POST /internal/ml/buckets`: the versions in some buckets.
pub async fn ml_buckets(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let node = masterless(&st)?;
    let raw = read_body(&st, body, 1 << 20, "buckets request").await?;
    let req: BucketsRequest = parse(&raw)?;
    let out = blocking(move || node.buckets_answer(&req.buckets)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// `POST /v1/admin/pause_writes`: new writes get 503 until resumed; returns
/// once the writes in flight have finished.
pub async fn pause_writes(State(st): State<Shared>, _: Params<NoParams>) -> Response {
    Json(st.node.pause_writes().await).into_response()
}

/// `POST /v1/admin/resume_writes`.
pub async fn resume_writes(State(st): State<Shared>, _: Params<NoParams>) -> Response {
    Json(st.node.resume_writes().await).into_response()
}

/// `POST /v1/admin/mode`: switch this node (writes must be paused).
pub async fn switch_mode(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&st, body, 64 << 10, "mode request").await?;
    let req: ModeRequest = parse(&raw)?;
    Ok(Json(st.node.switch_mode(&req).await?).into_response())
}

/// `POST /v1/admin/debug/clock {"offset_ms": N}` (needs `--enable-debug`):
/// sets this node's wall-clock offset, e.g. to jump it backwards.
pub async fn debug_clock(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    if !st.enable_debug {
        return Err(ApiError::bad_request(
            code::DEBUG_DISABLED,
            "the clock offset needs kvd to run with --enable-debug",
        ));
    }
    let raw = read_body(&st, body, 4 << 10, "clock request").await?;
    let req: ClockRequest = parse(&raw)?;
    st.node.wall().set_offset_ms(req.offset_ms);
    Ok(Json(ClockAnswer {
        hlc: st.engine.hlc(),
        offset_ms: req.offset_ms,
    })
    .into_response())
}
