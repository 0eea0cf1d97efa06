//! `GET` and `POST /v1/admin/peers`: a masterless node's peer set, read and
//! changed at run time (docs/DESIGN.md §5.9). The decision is
//! `masterless::rules::change_peers`; `MlNode::set_peers` starts and stops
//! the tasks.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvproto::code;
use serde::Deserialize;
use serde_json::json;

use super::query::{NoParams, Params};
use super::{read_body, ApiError, Shared};
use crate::masterless::node::{MlNode, PeersError};
use crate::masterless::rules;

/// Largest body: 64 URLs of a few hundred bytes each fit well within it.
const MAX_BODY_BYTES: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersRequest {
    peers: Vec<String>,
}

fn not_masterless() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        code::NOT_MASTERLESS,
        "this node is not in masterless mode; its peers are --peers",
    )
}

fn masterless(st: &Shared) -> Result<Arc<MlNode>, ApiError> {
    st.node
        .masterless()
        .filter(|n| !n.is_stopped())
        .ok_or_else(not_masterless)
}

/// `GET /v1/admin/peers`: `{"peers": [...]}`.
pub async fn show(State(st): State<Shared>, _: Params<NoParams>) -> Result<Response, ApiError> {
    let node = masterless(&st)?;
    Ok(Json(json!({ "peers": node.peer_urls() })).into_response())
}

/// `POST /v1/admin/peers {"peers": [...]}`: the complete new peer set.
pub async fn change(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    // The body is judged before the mode, so a malformed one is 400 on
    // any node.
    let raw = read_body(&st, body, MAX_BODY_BYTES, "peers request").await?;
    let value: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(code::INVALID_JSON, e.to_string()))?;
    let req: PeersRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(code::INVALID_PEERS, e.to_string()))?;
    rules::check_peer_list(&req.peers)
        .map_err(|m| ApiError::bad_request(code::INVALID_PEERS, m))?;
    let node = masterless(&st)?;
    match node.set_peers(&req.peers).await {
        Ok(answer) => Ok(Json(answer).into_response()),
        Err(PeersError::Invalid(m)) => Err(ApiError::bad_request(code::INVALID_PEERS, m)),
        Err(PeersError::Stopped) => Err(not_masterless()),
    }
}
