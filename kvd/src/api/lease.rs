//! Leases (docs/DESIGN.md §2.16): `POST /v1/leases` grants one,
//! `POST /v1/leases/{id}/keepalive` renews it, `DELETE /v1/leases/{id}`
//! revokes it with its keys, `GET /v1/leases/{id}` shows it. The three
//! writes are log records, taken by the node's write path like any other
//! write (307 on a secondary, 503 while paused); a masterless node has no
//! single log for a lease's deadline to move in, so every route there is
//! 409 before anything is read.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kvproto::code;
use serde::Deserialize;
use serde_json::json;

use super::access::Caller;
use super::query::{NoParams, Params};
use super::wire::{from_object, remaining_ms};
use super::{read_body, ttl, ApiError, Shared};
use crate::auth::Action;
use crate::model::{LeaseInfo, Op};
use crate::storage::{self, Engine};

/// Largest grant body: `{"ttl_ms": N}` takes a few bytes.
pub const MAX_GRANT_BYTES: usize = 4 << 10;

/// Most keys `GET /v1/leases/{id}` lists (`more` says whether there are
/// others).
pub const MAX_LISTED_KEYS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantJson {
    ttl_ms: serde_json::Value,
}

/// A grant's TTL from its body: `{"ttl_ms": N}` and nothing else
/// (`invalid_json` for another shape, `invalid_ttl` for a bad N).
pub fn grant_ttl(raw: &[u8]) -> Result<u64, ApiError> {
    let req: GrantJson = from_object(raw).map_err(|e| {
        ApiError::bad_request(
            code::INVALID_JSON,
            format!("a lease grant's body is {{\"ttl_ms\": N}}: {e}"),
        )
    })?;
    ttl::ttl_field("ttl_ms", &req.ttl_ms)
}

/// The lease id of a route's path: a positive decimal integer (400
/// `invalid_query` otherwise; a well-formed id no lease has is a 404 later).
fn path_id(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(text) = path.map_err(|e| ApiError::bad_request(code::INVALID_QUERY, e.body_text()))?;
    ttl::lease_id(&text).map_err(|m| ApiError::bad_request(code::INVALID_QUERY, m))
}

/// The lease a keep-alive or a revoke names, once this node may log it:
/// 409 on a masterless node, 400 for a malformed id, 307 on a secondary.
fn lease_to_write(
    st: &Shared,
    uri: &Uri,
    path: Result<Path<String>, PathRejection>,
) -> Result<u64, ApiError> {
    st.refuse_lease_if_masterless()?;
    let id = path_id(path)?;
    st.check_primary(uri)?;
    Ok(id)
}

/// 404 `lease_not_found`.
fn not_found(id: u64) -> ApiError {
    storage::Error::LeaseNotFound(id).into()
}

/// The lease as reads show it, with at most `max_keys` keys, or 404.
fn live(engine: &Engine, id: u64, max_keys: usize) -> Result<(LeaseInfo, bool), ApiError> {
    engine.lease(id, max_keys).ok_or_else(|| not_found(id))
}

/// `POST /v1/leases`: `{"id", "ttl_ms", "index"}`; the id is the grant's
/// log index.
pub async fn grant(
    State(st): State<Shared>,
    uri: Uri,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    st.refuse_lease_if_masterless()?;
    st.check_primary(&uri)?;
    let raw = read_body(&st, body, MAX_GRANT_BYTES, "lease grant body").await?;
    let ttl_ms = grant_ttl(&raw)?;
    let w = st.write(Op::LeaseGrant { ttl_ms }, true).await?;
    Ok(Json(json!({"id": w.index, "ttl_ms": ttl_ms, "index": w.index})).into_response())
}

/// `POST /v1/leases/{id}/keepalive`: `{"id", "ttl_ms", "index"}`, or 404
/// if the lease is not alive at the keep-alive's record.
pub async fn keepalive(
    State(st): State<Shared>,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Result<Response, ApiError> {
    let id = lease_to_write(&st, &uri, path)?;
    let w = st.write(Op::LeaseKeepAlive { id }, true).await?;
    // The apply outcome carries the lease as the keep-alive left it.
    let lease = w.outcome.lease.ok_or_else(|| not_found(id))?;
    Ok(Json(json!({"id": id, "ttl_ms": lease.ttl_ms, "index": w.index})).into_response())
}

/// `DELETE /v1/leases/{id}`: `{"id", "deleted": C, "index"}`, the lease
/// and its C keys gone in one record; 404 if it is not alive.
pub async fn revoke(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    let id = lease_to_write(&st, &uri, path)?;
    if caller != Caller::Anyone {
        // A revoke deletes the lease's keys: each must be the token's to
        // write (as the lease now holds them).
        caller.check(Action::Lease)?;
        let (lease, _) = live(&st.engine, id, usize::MAX)?;
        for key in &lease.keys {
            caller.check(Action::Write(key))?;
        }
    }
    let w = st
        .write(Op::LeaseRevoke { id, expired: false }, true)
        .await?;
    // The apply outcome counts the keys the revoke deleted.
    Ok(Json(json!({"id": id, "deleted": w.outcome.removed, "index": w.index})).into_response())
}

/// `GET /v1/leases/{id}`: `{"id", "ttl_ms", "remaining_ms", "keys",
/// "more"}`, its first [`MAX_LISTED_KEYS`] keys in byte order; 404 once its
/// deadline has passed by this node's clock.
pub async fn show(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    st.refuse_lease_if_masterless()?;
    let id = path_id(path)?;
    let (mut lease, more) = live(&st.engine, id, MAX_LISTED_KEYS)?;
    // Only the keys the caller may read are named.
    lease.keys.retain(|k| caller.may_read(k));
    Ok(Json(shown(&lease, more, st.engine.wall_ms())).into_response())
}

/// The answer of [`show`] at `now_ms`.
fn shown(lease: &LeaseInfo, more: bool, now_ms: u64) -> serde_json::Value {
    // Keys are UTF-8: every write checked them.
    let keys: Vec<String> = lease
        .keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    json!({
        "id": lease.id,
        "ttl_ms": lease.ttl_ms,
        "remaining_ms": remaining_ms(lease.deadline_ms, now_ms),
        "keys": keys,
        "more": more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_grant_body_is_ttl_ms_alone() {
        assert_eq!(grant_ttl(br#"{"ttl_ms": 5000}"#).unwrap(), 5000);
        assert_eq!(grant_ttl(b" {\"ttl_ms\":1}\n").unwrap(), 1);
        for (body, code) in [
            (&br#"{"ttl_ms": 0}"#[..], "invalid_ttl"),
            (br#"{"ttl_ms": -5}"#, "invalid_ttl"),
            (br#"{"ttl_ms": "5"}"#, "invalid_ttl"),
            (br#"{"ttl_ms": 1.5}"#, "invalid_ttl"),
            (br#"{"ttl_ms": null}"#, "invalid_ttl"),
            (br#"{"ttl_ms": 315360000001}"#, "invalid_ttl"),
            (br#"{"ttl_ms": 99999999999999999999999}"#, "invalid_ttl"),
            (br#"{"ttl_ms": 5, "id": 3}"#, "invalid_json"),
            (br#"{}"#, "invalid_json"),
            (br#"[5]"#, "invalid_json"),
            (b"", "invalid_json"),
            (b"ttl_ms=5", "invalid_json"),
        ] {
            let e = grant_ttl(body).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (400, code),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn ids_are_positive_decimals() {
        let id = |s: &str| path_id(Ok(Path(s.to_string())));
        assert_eq!(id("1").unwrap(), 1);
        assert_eq!(id("18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            "0",
            "-1",
            "abc",
            "",
            "1.0",
            "18446744073709551616",
            "0x10",
            " 3",
        ] {
            let e = id(bad).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (400, "invalid_query"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_shown_lease_says_its_time_left_and_keys() {
        let lease = LeaseInfo {
            id: 7,
            ttl_ms: 10_000,
            deadline_ms: 50_000,
            keys: vec![Bytes::from_static(b"a/1"), Bytes::from_static(b"b")],
        };
        assert_eq!(
            shown(&lease, true, 42_000),
            json!({"id": 7, "ttl_ms": 10_000, "remaining_ms": 8_000, "keys": ["a/1", "b"], "more": true})
        );
        assert_eq!(shown(&lease, false, 50_000)["remaining_ms"], 1);
    }
}
