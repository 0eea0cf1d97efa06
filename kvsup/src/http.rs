//! The daemon's HTTP API, spoken by the `kvsup` commands (and scraped by
//! Prometheus at `/metrics`). Loopback only, and every request passes
//! [`crate::auth::Guard`] first: it can kill nodes. No route answers CORS
//! preflights or sends CORS headers, so a web page can send none of the
//! requests that carry the token.
//!
//! `/`, `/dashboard.js` and `/dashboard.css` are the dashboard's page
//! (`crate::dashboard`): open, as they hold no data; the page's script
//! fetches `/v1/status`, `/v1/events` and `/v1/samples` from this same
//! origin with the token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::{Guard, Head, Refusal};
use crate::daemon::{ApplyError, Sup};
use crate::dashboard;

#[derive(Clone)]
struct Ctx {
    sup: Arc<Sup>,
    stop: mpsc::Sender<()>,
}

pub fn router(sup: Arc<Sup>, stop: mpsc::Sender<()>, guard: Guard) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/", get(page))
        .route("/dashboard.js", get(page))
        .route("/dashboard.css", get(page))
        .route("/v1/samples", get(samples))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/apply", post(apply))
        .route("/v1/kill", post(kill))
        .route("/v1/promote", post(promote))
        .route("/v1/down", post(down))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(Ctx { sup, stop })
        // Outermost, so that it runs before routing, the body extractors
        // and the fallback.
        .layer(axum::middleware::from_fn_with_state(Arc::new(guard), admit))
}

/// Lets a request through only if [`Guard::check`] passes it.
async fn admit(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let mut host = values(h, &header::HOST);
    if let Some(a) = req.uri().authority() {
        host.push(a.as_str().as_bytes());
    }
    let head = Head {
        path: req.uri().path(),
        origin: values(h, &header::ORIGIN),
        host,
        authorization: values(h, &header::AUTHORIZATION),
    };
    match guard.check(&head) {
        Ok(()) => next.run(req).await,
        Err(r) => refused(r, guard.port()),
    }
}

fn values<'a>(h: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(|v| v.as_bytes()).collect()
}

/// 403 for a request from a web page or to a foreign host name; 401 (with
/// the challenge RFC 6750 asks for) for a missing or wrong token.
fn refused(r: Refusal, port: u16) -> Response {
    let (code, challenge) = match r {
        Refusal::OriginNotAllowed | Refusal::HostNotAllowed => (StatusCode::FORBIDDEN, None),
        Refusal::TokenRequired => (StatusCode::UNAUTHORIZED, Some("Bearer realm=\"kvsup\"")),
        Refusal::TokenInvalid => (
            StatusCode::UNAUTHORIZED,
            Some("Bearer realm=\"kvsup\", error=\"invalid_token\""),
        ),
    };
    let mut resp = error(code, r.code(), r.message(port));
    if let Some(c) = challenge {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(c),
        );
    }
    resp
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

/// A file of the dashboard's page, with headers that keep it to itself:
/// its own origin only (CSP), never framed, never cached, no referrer.
async fn page(uri: Uri) -> Response {
    let Some(a) = dashboard::asset(uri.path()) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such route".into());
    };
    (
        [
            (header::CONTENT_TYPE, a.content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                dashboard::CONTENT_SECURITY_POLICY,
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        a.body,
    )
        .into_response()
}

async fn samples(State(c): State<Ctx>) -> Response {
    Json(c.sup.samples()).into_response()
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
    /// `kvsup apply --kvd`: the binary the nodes move to (absolute).
    #[serde(default)]
    kvd: Option<PathBuf>,
}

async fn apply(State(c): State<Ctx>, Json(req): Json<ApplyReq>) -> Response {
    // Relative paths would resolve against the daemon's directory, which
    // the requester does not know.
    let relative_kvd = req.kvd.as_ref().is_some_and(|k| !k.is_absolute());
    if !req.path.is_absolute() || !req.base_dir.is_absolute() || relative_kvd {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "path, base_dir and kvd must be absolute".into(),
        );
    }
    match c
        .sup
        .apply(&req.path, &req.base_dir, req.kvd.as_deref(), req.dry_run)
        .await
    {
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
