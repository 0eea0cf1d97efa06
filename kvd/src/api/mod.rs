//! The HTTP API of a node (docs/DESIGN.md §2).
//!
//! Handlers are thin: decode and validate the request, call the engine,
//! encode the response. Validation happens before anything reaches the WAL,
//! so a rejected request never writes anything. Errors become responses in
//! one place, [`error::ApiError`].

pub mod access;
pub mod admin;
mod backup;
pub mod body_budget;
pub mod conn_io;
pub mod error;
mod lease;
pub mod listener;
pub mod members;
mod peers;
mod precondition;
pub mod query;
mod range;
mod search;
pub mod serve;
pub mod tls;
mod token;
mod ttl;
mod txn;
mod upload;
mod watch;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderName, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

pub use error::ApiError;

use kvproto::admin::{PromoteAnswer, TransferAnswer, TransferRequest};

use self::access::Caller;
use crate::auth::Action;
use kvproto::status::{IndexStatus, Memory, Peers, Status};
use kvproto::{code, header as h};

use crate::metrics::Metrics;
use crate::model::{Item, KeyMeta, OpResult, TxnOp};
use crate::node::{self as node_layer, Node, Runtime, WriteTarget, Written};
use crate::replication::node::{self, AppendReply};
use crate::replication::rules;
use crate::storage::{self, Engine, Op, Timestamp};
use precondition::{Condition, Precondition};
use query::{NoParams, Params};
use wire::JsonValue;

/// Request limits, from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_bulk_bytes: usize,
    pub max_bulk_items: usize,
    pub max_inflight_requests: usize,
    pub body_timeout: std::time::Duration,
    /// Largest snapshot upload from a primary (`--max-snapshot-mib`).
    pub max_snapshot_bytes: u64,
    /// Bytes of request bodies held in memory at once (`body_budget`).
    pub max_inflight_body_bytes: u32,
    /// `--max-watchers`: open watches at once.
    pub max_watchers: usize,
}

impl Limits {
    /// Largest batch a peer sends (`/internal/append`, `/internal/ml/stream`):
    /// a bulk request's worth of records, with room for their framing.
    pub fn max_peer_body_bytes(&self) -> usize {
        self.max_bulk_bytes.saturating_mul(2)
    }
}

/// What every handler can reach.
pub struct AppState {
    /// The node: its mode, runtime and write path.
    pub node: Arc<Node>,
    /// The node's engine (reads, status).
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub enable_debug: bool,
    pub data_dir: String,
    pub started: Instant,
    /// The engine's expired-keys count when `/metrics` last read it: the
    /// counter advances by the difference (a counter cannot be set).
    expired_seen: std::sync::atomic::AtomicU64,
    inflight: Semaphore,
    body_budget: body_budget::BodyBudget,
    /// Metric handles per operation, resolved once: looking labels up on
    /// every request costs more than the rest of a GET's bookkeeping.
    op_metrics: Vec<OpMetrics>,
    /// Open watches (`--max-watchers`).
    watchers: watch::Watchers,
    /// The token file (`--auth-file`); `None`: no tokens are asked for.
    pub access: Option<Arc<access::Access>>,
}

struct OpMetrics {
    duration: prometheus::Histogram,
    ok: prometheus::IntCounter,
}

impl AppState {
    pub fn new(
        node: Arc<Node>,
        metrics: Arc<Metrics>,
        limits: Limits,
        enable_debug: bool,
        data_dir: String,
    ) -> Self {
        let op_metrics = OPS
            .iter()
            .map(|op| OpMetrics {
                duration: metrics
                    .http_request_duration_seconds
                    .with_label_values(&[op]),
                ok: metrics.http_requests_total.with_label_values(&[op, "200"]),
            })
            .collect();
        AppState {
            op_metrics,
            watchers: watch::Watchers::new(limits.max_watchers, &metrics.watch),
            inflight: Semaphore::new(limits.max_inflight_requests.max(1)),
            body_budget: body_budget::BodyBudget::new(
                limits.max_inflight_body_bytes,
                metrics.connections.body_bytes_inflight.clone(),
            ),
            engine: node.engine().clone(),
            node,
            metrics,
            limits,
            enable_debug,
            data_dir,
            access: None,
            started: Instant::now(),
            expired_seen: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

type Shared = Arc<AppState>;

/// Builds the router with every route of docs/DESIGN.md §2 that a single node serves.
pub fn router(state: Shared) -> Router {
    let routes = Router::new()
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route(
            "/v1/kv",
            get(range::list)
                .delete(txn::delete_prefix)
                .fallback(empty_key),
        )
        .route("/v1/kv/", any(empty_key))
        .route("/v1/txn", axum::routing::post(txn::txn))
        .route("/v1/bulk", axum::routing::post(bulk))
        .route("/v1/watch", get(watch::watch))
        .route("/openapi.json", get(openapi))
        .route("/internal/append", axum::routing::post(internal_append))
        .route("/internal/vote", axum::routing::post(internal_vote))
        .route("/internal/snapshot", axum::routing::post(internal_snapshot))
        .route("/promote_to_primary", axum::routing::post(promote))
        .route("/v1/admin/promote", axum::routing::post(promote))
        .route("/v1/admin/transfer", axum::routing::post(transfer))
        .route(
            "/v1/admin/members",
            get(members::show).post(members::change),
        )
        .route("/v1/search", get(search::search))
        .route("/v1/similar", get(search::similar))
        .route("/v1/leases", axum::routing::post(lease::grant))
        .route("/v1/leases/{id}", get(lease::show).delete(lease::revoke))
        .route(
            "/v1/leases/{id}/keepalive",
            axum::routing::post(lease::keepalive),
        )
        .route("/v1/status", get(status))
        .route(
            "/v1/admin/pause_writes",
            axum::routing::post(admin::pause_writes),
        )
        .route(
            "/v1/admin/resume_writes",
            axum::routing::post(admin::resume_writes),
        )
        .route("/v1/admin/mode", axum::routing::post(admin::switch_mode))
        .route("/v1/admin/snapshot", get(backup::snapshot))
        .route("/v1/admin/peers", get(peers::show).post(peers::change))
        .route(
            "/v1/admin/debug/clock",
            axum::routing::post(admin::debug_clock),
        )
        .route("/internal/ml/stream", axum::routing::post(admin::ml_stream))
        .route("/internal/ml/digest", get(admin::ml_digest))
        .route(
            "/internal/ml/buckets",
            axum::routing::post(admin::ml_buckets),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed);
    // Without a token file no request is asked for one: the guard is not
    // put in every request's way at all.
    let routes = match &state.access {
        Some(_) => routes.layer(middleware::from_fn_with_state(state.clone(), access::guard)),
        None => routes,
    };
    routes
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Admission control and metrics for every request.
async fn observe(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let op = op_label(
        req.method(),
        req.extensions().get::<MatchedPath>().map(|p| p.as_str()),
    );
    let started = Instant::now();
    let response = match check_request(&req, st.access.is_some()) {
        Err(e) => e.into_response(),
        Ok(()) => match st.inflight.try_acquire() {
            Ok(_permit) => {
                let (req, _hold) = budget_body(&st, req);
                next.run(req).await
            }
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight; retry shortly",
            )
            .into_response(),
        },
    };
    let m = &st.op_metrics[op];
    if response.status() == StatusCode::OK {
        m.ok.inc();
    } else {
        st.metrics
            .http_requests_total
            .with_label_values(&[OPS[op], response.status().as_str()])
            .inc();
    }
    m.duration.observe(started.elapsed().as_secs_f64());
    response
}

/// What every request must satisfy before any handler sees it; `tokens`:
/// the node has a token file.
fn check_request(req: &Request, tokens: bool) -> Result<(), ApiError> {
    peer_routes_guarded(req, tokens)?;
    transfer_codings_supported(req.headers())?;
    if let Some(q) = req.uri().query() {
        query_is_utf8(q)?;
    }
    Ok(())
}

/// Over TLS, the routes of peers and operators take only a connection
/// whose client certificate names a node of the cluster (`tls`); with TLS
/// off (or a request that came through no connection) nothing changes.
/// With a token file, an operator's route is the admin token's to allow
/// (`access`), certificate or not; a peer's never is.
fn peer_routes_guarded(req: &Request, tokens: bool) -> Result<(), ApiError> {
    let plain = tls::PeerIdentity::Plain;
    let identity = req
        .extensions()
        .get::<tls::PeerIdentity>()
        .unwrap_or(&plain);
    let path = req.uri().path();
    let by_token = tokens && !path.starts_with("/internal/");
    if !tls::is_privileged(path) || by_token || tls::may_call_privileged(identity) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        code::PEER_CERTIFICATE_REQUIRED,
        "this route needs a client certificate of the cluster CA that names a node \
         (a URI SAN kvd://node/<id>)",
    ))
}

/// hyper decodes `chunked`, and refuses (400) a list that does not end
/// with it; anything before it (`gzip, chunked`) would reach a handler
/// still encoded, so it gets 501 (RFC 9112 §6.1).
fn transfer_codings_supported(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .map(|c| c.trim_ascii());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            code::UNSUPPORTED_TRANSFER_ENCODING,
            "only the chunked transfer coding is supported; send the body as it is to be stored",
        )),
    }
}

/// Query parameters are decoded leniently (bad UTF-8 becomes U+FFFD), so
/// a query that does not decode to UTF-8 is refused before that happens.
fn query_is_utf8(query: &str) -> Result<(), ApiError> {
    percent_encoding::percent_decode_str(query)
        .decode_utf8()
        .map(|_| ())
        .map_err(|_| {
            ApiError::bad_request(
                code::INVALID_QUERY,
                "the query string does not decode to UTF-8",
            )
        })
}

/// Puts a request's body under the body budget (`body_budget`); the hold
/// lasts until the handler has answered. Bodiless requests (most GETs)
/// skip it, and so does `/internal/snapshot`, whose body is streamed to
/// disk rather than held.
fn budget_body(st: &AppState, req: Request) -> (Request, Option<body_budget::Hold>) {
    use axum::body::HttpBody;
    let streamed = req.uri().path() == "/internal/snapshot";
    if streamed || req.body().size_hint().exact() == Some(0) {
        return (req, None);
    }
    let (parts, body) = req.into_parts();
    let (body, hold) = st.body_budget.wrap(body);
    (Request::from_parts(parts, body), Some(hold))
}

/// Values of the `op` label; `op_label` returns an index into this.
const OPS: [&str; 14] = [
    "get",
    "put",
    "delete",
    "bulk",
    "status",
    "health",
    "ready",
    "metrics",
    "other",
    "search",
    "similar",
    "range",
    "txn",
    "delete_range",
];

fn op_label(method: &Method, path: Option<&str>) -> usize {
    match (path, method) {
        // A HEAD is a GET without the body (axum runs the GET handler).
        (Some("/v1/kv/{*key}"), &Method::GET | &Method::HEAD) => 0,
        (Some("/v1/kv/{*key}"), &Method::PUT) => 1,
        (Some("/v1/kv/{*key}"), &Method::DELETE) => 2,
        (Some("/v1/bulk"), _) => 3,
        (Some("/v1/status"), _) => 4,
        (Some("/health"), _) => 5,
        (Some("/ready"), _) => 6,
        (Some("/metrics"), _) => 7,
        (Some("/v1/search"), _) => 9,
        (Some("/v1/similar"), _) => 10,
        (Some("/v1/kv"), &Method::GET | &Method::HEAD) => 11,
        (Some("/v1/txn"), _) => 12,
        (Some("/v1/kv"), &Method::DELETE) => 13,
        _ => 8,
    }
}

/// Checks a key against docs/DESIGN.md §2: UTF-8 (guaranteed by the caller's type),
/// 1..=1024 bytes, no NUL. The same rule holds records from peers
/// ([`storage::record::validate_key`]).
pub fn validate_key(key: &str) -> Result<(), String> {
    storage::record::validate_key(key.as_bytes())
}

fn key_from_path(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request(code::INVALID_KEY, e.body_text()))?;
    validate_key(&key).map_err(|m| ApiError::bad_request(code::INVALID_KEY, m))?;
    Ok(key)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    debug_flaky: Option<f64>,
}

/// The parameters of `PUT /v1/kv/{key}`: the expiry's numbers as text, so
/// that any malformed one is `invalid_ttl` ([`ttl::from_query`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutParams {
    debug_flaky: Option<f64>,
    ttl_ms: Option<String>,
    lease: Option<String>,
    #[serde(default)]
    keep_ttl: bool,
}

/// Decides whether this write is applied in memory (false only when
/// `debug_flaky` is allowed, valid, and the coin says so).
fn apply_decision(st: &AppState, debug_flaky: Option<f64>) -> Result<bool, ApiError> {
    let Some(p) = debug_flaky else {
        return Ok(true);
    };
    if !st.enable_debug {
        return Err(ApiError::bad_request(
            code::DEBUG_DISABLED,
            "debug_flaky needs kvd to run with --enable-debug",
        ));
    }
    if !(0.0..=1.0).contains(&p) {
        return Err(ApiError::bad_request(
            code::INVALID_QUERY,
            format!("debug_flaky must be within 0.0..=1.0, got {p}"),
        ));
    }
    Ok(rand::random::<f64>() >= p)
}

/// Reads a request body of at most `limit` bytes (413 beyond it) within
/// the body timeout (408 after it), if the body budget has room (503 if
/// not).
async fn read_body(st: &AppState, body: Body, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    let timeout = st.limits.body_timeout;
    // The rest of the body is never read, so the connection cannot carry
    // another request: say so, or a client may reuse it and lose its next
    // request to the close.
    let too_large = || {
        ApiError::too_large(
            code::VALUE_TOO_LARGE,
            format!("{what} exceeds the limit of {limit} bytes"),
        )
        .with_header("connection", "close".to_string())
    };
    // Refused on its Content-Length before any of it is read, so that a
    // client waiting for `100 Continue` gets the 413 instead.
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                code::REQUEST_TIMEOUT,
                format!("the {what} did not arrive within {timeout:?}"),
            )
        })?;
    read.map_err(|e| {
        let e = e.into_inner();
        if caused_by::<http_body_util::LengthLimitError>(&*e) {
            too_large()
        } else if let Some(over) = cause::<body_budget::OverBudget>(&*e) {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                over.to_string(),
            )
            .retry_after(1)
        } else {
            ApiError::bad_request(code::BAD_BODY, format!("could not read the {what}"))
        }
    })
}

/// `bytes` in an allocation of their own. A body read whole is a slice of
/// the connection's read buffer (8 KiB or more); a value the engine keeps
/// (the watch cache holds recent writes' values) would keep all of that
/// buffer alive and make hyper allocate a new one for the next request.
/// Copying a value costs less than the memory it would pin.
fn owned(bytes: Bytes) -> Bytes {
    Bytes::copy_from_slice(&bytes)
}

/// The first error of type `T` in `e`'s chain of sources.
fn cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        at = e.source();
    }
    None
}

fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    cause::<T>(e).is_some()
}

impl AppState {
    /// Only the primary takes writes: anyone else points the client at it
    /// (307 with `Location` and `X-KV-Primary`), or says it knows none (503).
    fn check_primary(&self, uri: &Uri) -> Result<(), ApiError> {
        match self.node.write_target() {
            WriteTarget::Here => Ok(()),
            WriteTarget::Transferring => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::TRANSFER_IN_PROGRESS,
                "the primary is handing over to another node; retry shortly",
            )
            .retry_after(1)
            // A finer hint for kvclient, as for a mode switch's pause: a
            // handover takes milliseconds, and a client that slept the
            // whole second would stall its writes for that long.
            .with_header(h::RETRY_AFTER_MS, "50".to_string())),
            WriteTarget::Primary(primary) => Err(ApiError::redirect(&primary, uri)),
            WriteTarget::NoPrimary => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::NO_PRIMARY,
                "this node is a secondary and knows no primary yet; retry shortly",
            )
            .retry_after(1)
            // Right after a handover the new primary is known within
            // milliseconds: the same finer hint.
            .with_header(h::RETRY_AFTER_MS, "50".to_string())),
        }
    }

    fn is_masterless(&self) -> bool {
        self.node.mode() == Some(kvproto::Mode::Masterless)
    }

    /// 409 on a masterless node, for a lease route or a write on a lease,
    /// before anything else is read.
    fn refuse_lease_if_masterless(&self) -> Result<(), ApiError> {
        if self.is_masterless() {
            return Err(node_layer::WriteError::UnsupportedInMasterless.into());
        }
        Ok(())
    }

    /// Logs a write and waits for its commit, within the commit timeout.
    async fn write(&self, op: Op, apply: bool) -> Result<Written, ApiError> {
        Ok(self.node.write(op, apply).await?)
    }

    /// A conditional write (docs/DESIGN.md §2.12): `write` of `key` happens
    /// only if `pre` holds, in one transaction. Its index and result, or
    /// 412 with the key's current state.
    async fn write_if(
        &self,
        key: Bytes,
        pre: Precondition,
        write: TxnOp,
    ) -> Result<(u64, OpResult), ApiError> {
        let txn = precondition::conditional_txn(key, pre, write);
        let w = self.node.write_txn(txn).await?;
        let r = txn::results(&w)?;
        if !r.succeeded {
            return Err(precondition::failed(r));
        }
        match r.results.first() {
            Some(result) => Ok((w.index, result.clone())),
            None => Err(txn::unexpected(None)),
        }
    }

    /// For `consistent=true` on a cluster: only the primary answers, once
    /// it has confirmed its leadership with a majority (§4.7). A single
    /// node's local read already sees every acknowledged write.
    async fn read_barrier(&self, uri: &Uri, consistent: bool) -> Result<(), ApiError> {
        let (true, Some(r)) = (consistent, self.node.replicator()) else {
            return Ok(());
        };
        self.check_primary(uri)?;
        r.read_barrier(self.node.commit_timeout())
            .await
            .map_err(|why| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    why,
                    "could not confirm leadership with a majority for a consistent read; retry",
                )
                .retry_after(1)
            })
    }
}

/// A masterless write's answer also says its last-write-wins stamp.
fn with_stamp(mut body: serde_json::Value, stamp: Option<Timestamp>) -> serde_json::Value {
    if let Some(ts) = stamp {
        body["ts"] = json!(ts);
    }
    body
}

/// Runs `f` on a blocking thread (a long read must not hold a runtime
/// worker).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            e.to_string(),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    #[serde(default)]
    consistent: bool,
}

/// How often a masterless read retries to see a value and a stamp of the
/// same write before it answers with what it has.
const STAMP_READ_TRIES: usize = 16;

/// A key as a read shows it (absent once past its deadline), and in
/// masterless mode its stamp. The WAL thread changes a key's value and
/// stamp together under the stamps' lock, and a key's stamps only grow, so
/// a value read between two equal stamps is that stamp's write.
fn read_item(engine: &Engine, key: &[u8]) -> Option<(Item, Option<Timestamp>)> {
    if !engine.is_masterless() {
        return engine.get_item(key).map(|i| (i, None));
    }
    let mut tries = 0;
    loop {
        let before = engine.lww().entry(key);
        let read = engine.get_item(key);
        tries += 1;
        if tries == STAMP_READ_TRIES || engine.lww().entry(key) == before {
            let ts = before.map(|e| e.ts).unwrap_or_default();
            return read.map(|i| (i, Some(ts)));
        }
    }
}

/// The lease deadlines of `engine`, for a [`wire::Clock`].
fn lease_deadline(engine: &Engine) -> impl Fn(u64) -> Option<u64> + '_ {
    |id| engine.lease(id, 0).map(|(l, _)| l.deadline_ms)
}

/// `X-KV-TTL-Ms` and `X-KV-Lease` of a key with a deadline (§2.15), or
/// `None` when its lease is gone since the read (the key with it).
fn ttl_headers(engine: &Engine, item: &Item) -> Option<axum::http::HeaderMap> {
    let mut headers = axum::http::HeaderMap::new();
    // Most keys have no deadline: no clock read for them.
    if matches!(item.expiry, crate::model::Expiry::Never) {
        return Some(headers);
    }
    let leases = lease_deadline(engine);
    let clock = wire::Clock {
        now_ms: engine.wall_ms(),
        lease_deadline: &leases,
    };
    if let crate::model::Expiry::Lease(id) = item.expiry {
        leases(id)?;
    }
    let (ttl_ms, lease) = clock.left(item.expiry);
    for (name, value) in [(h::TTL_MS, ttl_ms), (h::LEASE, lease)] {
        if let Some(v) = value {
            headers.insert(HeaderName::from_static(name), v.into());
        }
    }
    Some(headers)
}

/// The headers of a key's read (§2.10): `ETag` is the quoted mod_index,
/// or in masterless mode the quoted stamp. Built as header values, not
/// text to be checked again: this is every GET's answer.
fn version_headers(
    meta: &KeyMeta,
    stamp: Option<Timestamp>,
) -> impl axum::response::IntoResponseParts {
    const MOD_INDEX: HeaderName = HeaderName::from_static(h::MOD_INDEX);
    const CREATE_INDEX: HeaderName = HeaderName::from_static(h::CREATE_INDEX);
    const VERSION: HeaderName = HeaderName::from_static(h::VERSION);
    let etag = match stamp {
        Some(ts) => format!("\"{}.{}.{}\"", ts.physical_ms, ts.logical, ts.node),
        None => precondition::etag(meta.mod_index),
    };
    let number = axum::http::HeaderValue::from;
    (
        [(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/octet-stream"),
        )],
        [(header::ETAG, etag)],
        [
            (MOD_INDEX, number(meta.mod_index)),
            (CREATE_INDEX, number(meta.create_index)),
            (VERSION, number(meta.version)),
        ],
    )
}

/// `GET` and `HEAD /v1/kv/{key}` (axum answers a HEAD with the GET's
/// headers and no body).
async fn get_key(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    Params(params): Params<ReadParams>,
) -> Result<Response, ApiError> {
    let key = key_from_path(path)?;
    Caller::of(&st, caller)?.check(Action::Read(key.as_bytes()))?;
    st.read_barrier(&uri, params.consistent).await?;
    let found = read_item(&st.engine, key.as_bytes())
        .and_then(|(item, stamp)| Some((ttl_headers(&st.engine, &item)?, item, stamp)));
    match found {
        Some((ttl, item, stamp)) => {
            let value = item.value.unwrap_or_default();
            Ok((version_headers(&item.meta, stamp), ttl, value).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::KEY_NOT_FOUND,
            format!("key {key:?} not found"),
        )),
    }
}

/// 400: `debug_flaky` skips applying a write, which a transaction's
/// answer (the 412 of a conditional write) could not say.
fn flaky_and_conditional() -> ApiError {
    ApiError::bad_request(
        code::INVALID_QUERY,
        "debug_flaky does not combine with If-Match or If-None-Match",
    )
}

async fn put_key(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    Params(params): Params<PutParams>,
    condition: Condition,
    body: Body,
) -> Result<Response, ApiError> {
    let key = key_from_path(path)?;
    Caller::of(&st, caller)?.check(Action::Write(key.as_bytes()))?;
    let pre = condition.check(st.is_masterless())?;
    let ttl = ttl::from_query(
        params.ttl_ms.as_deref(),
        params.lease.as_deref(),
        params.keep_ttl,
    )?;
    if ttl.is_lease() {
        st.refuse_lease_if_masterless()?;
    }
    if pre.is_some() && params.debug_flaky.is_some() {
        return Err(flaky_and_conditional());
    }
    let apply = apply_decision(&st, params.debug_flaky)?;
    st.check_primary(&uri)?;
    let value = owned(read_body(&st, body, st.limits.max_value_bytes, "value").await?);
    let key = Bytes::from(key.into_bytes());
    // The deadline counts from when the write is taken, once its body is in.
    let expiry = ttl.expiry(st.engine.wall_ms());
    let (index, stamp) = match pre {
        None => {
            let r = st.write(Op::Put { key, value, expiry }, apply).await?;
            (r.index, r.stamp)
        }
        Some(pre) => {
            let write = TxnOp::Put {
                key: key.clone(),
                value,
                expiry,
            };
            (st.write_if(key, pre, write).await?.0, None)
        }
    };
    // The hottest response: formatted directly rather than via a JSON map.
    // Masterless writes also say their last-write-wins stamp.
    let body = match stamp {
        Some(ts) => format!(
            "{{\"index\":{},\"ts\":{{\"physical_ms\":{},\"logical\":{},\"node\":{}}}}}",
            index, ts.physical_ms, ts.logical, ts.node
        ),
        None => format!("{{\"index\":{index}}}"),
    };
    let json = axum::http::HeaderValue::from_static("application/json");
    Ok(([(header::CONTENT_TYPE, json)], body).into_response())
}

async fn delete_key(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
    condition: Condition,
) -> Result<Response, ApiError> {
    let key = key_from_path(path)?;
    Caller::of(&st, caller)?.check(Action::Write(key.as_bytes()))?;
    let pre = condition.check(st.is_masterless())?;
    st.check_primary(&uri)?;
    let key = Bytes::from(key.into_bytes());
    let (deleted, index, stamp) = match pre {
        None => {
            let r = st.write(Op::Delete { key }, true).await?;
            (r.outcome.deleted, r.index, r.stamp)
        }
        Some(pre) => {
            let write = TxnOp::Delete { key: key.clone() };
            let (index, result) = st.write_if(key, pre, write).await?;
            let deleted = matches!(result, OpResult::Delete { deleted: true });
            (deleted, index, None)
        }
    };
    let body = json!({"deleted": deleted, "index": index});
    Ok(Json(with_stamp(body, stamp)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkRequest {
    items: Vec<wire::Obj<BulkItem>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkItem {
    key: String,
    value: JsonValue,
    #[serde(default, deserialize_with = "ttl::present")]
    ttl_ms: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "ttl::present")]
    lease: Option<serde_json::Value>,
    #[serde(default)]
    keep_ttl: bool,
}

/// 413 for a value over `--max-value-bytes`.
fn check_value_size(path: &str, value: &[u8], limits: &Limits) -> Result<(), ApiError> {
    if value.len() > limits.max_value_bytes {
        return Err(ApiError::too_large(
            code::VALUE_TOO_LARGE,
            format!(
                "{path}: the value is {} bytes; the limit is {}",
                value.len(),
                limits.max_value_bytes
            ),
        ));
    }
    Ok(())
}

/// Turns a parsed bulk request into one log op, or says which item is bad;
/// `now_ms`: this node's wall clock, that items' `ttl_ms` count from.
fn bulk_op(req: BulkRequest, limits: &Limits, now_ms: u64) -> Result<Op, ApiError> {
    if req.items.is_empty() {
        return Err(ApiError::bad_request(
            code::INVALID_BULK,
            "bulk has no items",
        ));
    }
    if req.items.len() > limits.max_bulk_items {
        return Err(ApiError::too_large(
            code::TOO_MANY_ITEMS,
            format!(
                "bulk has {} items; the limit is {}",
                req.items.len(),
                limits.max_bulk_items
            ),
        ));
    }
    let mut items = Vec::with_capacity(req.items.len());
    for (i, wire::Obj(item)) in req.items.into_iter().enumerate() {
        let bad = |m: String| ApiError::bad_request(code::INVALID_ITEM, format!("items[{i}]: {m}"));
        validate_key(&item.key).map_err(bad)?;
        let at = format!("items[{i}]");
        let ttl = ttl::from_json(
            &at,
            item.ttl_ms.as_ref(),
            item.lease.as_ref(),
            item.keep_ttl,
        )?;
        let value = item.value.into_bytes().map_err(bad)?;
        check_value_size(&at, &value, limits)?;
        items.push((
            Bytes::from(item.key.into_bytes()),
            value,
            ttl.expiry(now_ms),
        ));
    }
    Ok(Op::Bulk { items })
}

async fn bulk(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    Params(params): Params<WriteParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    let apply = apply_decision(&st, params.debug_flaky)?;
    st.check_primary(&uri)?;
    let raw = read_body(&st, body, st.limits.max_bulk_bytes, "bulk body").await?;
    let req: BulkRequest = wire::from_object(&raw).map_err(|e| {
        ApiError::bad_request(
            code::INVALID_JSON,
            format!("bulk body is not {{\"items\": [{{\"key\", \"value\"}}]}}: {e}"),
        )
    })?;
    let op = bulk_op(req, &st.limits, st.engine.wall_ms())?;
    let count = match &op {
        Op::Bulk { items } => {
            for (key, _, _) in items {
                caller.check(Action::Write(key))?;
            }
            items.len()
        }
        _ => 0,
    };
    let r = st.write(op, apply).await?;
    Ok(Json(json!({"index": r.index, "count": count})).into_response())
}

/// The OpenAPI 3.1 description of the public routes, as built.
const OPENAPI: &str = include_str!("../../../docs/openapi.json");

async fn openapi(_: Params<NoParams>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status(State(st): State<Shared>, _: Params<NoParams>) -> Json<Status> {
    let s = st.engine.status();
    st.metrics.keys.set(s.keys as i64);
    let node = &st.node;
    let runtime = node.runtime();
    let (peers, masterless) = match &runtime {
        Runtime::PrimarySecondary(r) => (Peers::Replication(r.peer_status()), None),
        Runtime::Masterless(ml) => {
            let ml = ml.status(node.wall().offset_ms());
            (Peers::Masterless(ml.peers.clone()), Some(ml))
        }
        Runtime::Single | Runtime::Switching => (Peers::Replication(Vec::new()), None),
    };
    let (primary, config, voter) = match &runtime {
        Runtime::PrimarySecondary(r) => (r.primary_url(), Some(r.members()), Some(r.is_voter())),
        _ => (None, None, None),
    };
    Json(Status {
        applied_index: s.applied_index,
        commit_index: st.engine.commit_index(),
        config,
        data_dir: st.data_dir.clone(),
        digest: format!("{:016x}", st.engine.state().digest()),
        epoch: node.epoch(),
        hlc: st.engine.hlc(),
        index: st.engine.state().index().map(|ix| {
            let s = ix.stats();
            IndexStatus {
                documents: s.documents,
                memory_bytes: s.memory_bytes,
                postings: s.postings,
                stemming: ix.stemming(),
                terms: s.terms,
            }
        }),
        keys: s.keys,
        last_index: s.last_index,
        last_log_epoch: st.engine.last_log_pos().epoch,
        masterless,
        memory: Memory {
            data_set_bytes: s.data_set_bytes,
            max_bytes: s.max_data_bytes,
        },
        mode: runtime.mode(),
        node_id: node.node_id().to_string(),
        peers,
        primary,
        rejoining: node.rejoining(),
        role: node.role(),
        snapshot_index: s.snapshot_index,
        storage_detail: s.storage_detail,
        storage_poisoned: s.poisoned,
        storage_state: s.storage_state,
        uptime_seconds: st.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        voter,
        wal_bytes: s.wal_bytes,
        wal_segments: s.wal_segments,
        writes_paused: node.writes_paused(),
    })
}

/// The primary/secondary runtime, or the refusal of a node without peers.
fn replicator(st: &AppState, takes: &str) -> Result<Arc<node::Replicator>, ApiError> {
    st.node.replicator().ok_or_else(|| {
        ApiError::bad_request(
            code::NOT_REPLICATED,
            format!("this node runs alone (no --peers); it takes no {takes}"),
        )
    })
}

/// Replication traffic from the primary (see `replication::node`).
async fn internal_append(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let r = replicator(&st, "replication traffic")?;
    let raw = read_body(&st, body, st.limits.max_peer_body_bytes(), "append body").await?;
    let append =
        node::decode_append(&raw).map_err(|m| ApiError::bad_request(code::INVALID_APPEND, m))?;
    match r.handle_append(append).await? {
        // A deposed primary is told so with a 409 that carries our epoch.
        AppendReply::Stale { my_epoch } => Err(node::Error::StaleEpoch { my_epoch }.into()),
        reply => Ok(Json(reply).into_response()),
    }
}

/// A snapshot from the primary for a secondary behind its WAL: streamed
/// to disk as it arrives (see `upload`), then checked before anything
/// changes (see [`node::Replicator::receive_snapshot`]).
async fn internal_snapshot(
    State(st): State<Shared>,
    Params(offer): Params<node::SnapshotOffer>,
    body: Body,
) -> Result<Response, ApiError> {
    let r = replicator(&st, "replication traffic")?;
    let _slot = r.begin_snapshot(&offer)?;
    // Declared after the slot, so dropped (and removed) before it frees.
    let tmp = upload::TempFile::new(st.engine.fs(), st.engine.incoming_snapshot_path());
    let limits = upload::UploadLimits {
        max_bytes: st.limits.max_snapshot_bytes,
        idle: st.limits.body_timeout,
        total: node::SNAPSHOT_TIMEOUT,
    };
    upload::receive(body, &tmp, &limits).await?;
    let last_index = r.receive_snapshot(&offer, tmp.path().to_path_buf()).await?;
    Ok(Json(json!({"last_index": last_index})).into_response())
}

/// A candidate's vote request (see `replication::node`).
async fn internal_vote(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let r = replicator(&st, "votes")?;
    let raw = read_body(&st, body, 64 << 10, "vote request").await?;
    let req: rules::VoteRequest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(code::INVALID_VOTE, format!("bad vote request: {e}")))?;
    let answer = tokio::task::spawn_blocking(move || r.handle_vote(&req))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::VOTE_FAILED,
                e.to_string(),
            )
        })??;
    Ok(Json(answer).into_response())
}

/// `POST /promote_to_primary`: run an election for this node.
async fn promote(State(st): State<Shared>, _: Params<NoParams>) -> Result<Response, ApiError> {
    let r = match st.node.runtime() {
        Runtime::PrimarySecondary(r) => r,
        Runtime::Masterless(_) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                code::MASTERLESS,
                "this node is in masterless mode: every node takes writes and there is no primary",
            ))
        }
        Runtime::Single | Runtime::Switching => return Err(no_peers("to hold an election with")),
    };
    let epoch = r.promote().await?;
    Ok(Json(PromoteAnswer {
        epoch,
        role: kvproto::status::Role::Primary,
    })
    .into_response())
}

/// 409 `no_peers`: a node alone has nobody `for_what`.
fn no_peers(for_what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        code::NO_PEERS,
        format!("this node runs alone (no --peers): there is nobody {for_what}"),
    )
}

/// Planned switchover, asked of the primary (`kvsup promote`): see
/// [`node::Replicator::transfer`].
async fn transfer(
    State(st): State<Shared>,
    _: Params<NoParams>,
    body: Result<Json<TransferRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError::bad_request(code::INVALID_TRANSFER, e.body_text()))?;
    let Some(r) = st.node.replicator() else {
        return Err(no_peers("to hand over to"));
    };
    let timeout = Duration::from_millis(req.timeout_ms.clamp(10, 600_000));
    match r.transfer(&req.to, timeout).await {
        Ok(epoch) => Ok(Json(TransferAnswer { epoch, to: req.to }).into_response()),
        Err(why) => Err(ApiError::new(
            StatusCode::CONFLICT,
            code::TRANSFER_FAILED,
            why,
        )),
    }
}

async fn health(_: Params<NoParams>) -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 while the engine takes writes; 503 with the storage reason once it
/// refuses them (a full memory budget is not a reason: deletes still work,
/// and every replica holds the same data set).
async fn ready(State(st): State<Shared>, _: Params<NoParams>) -> Response {
    match st.engine.storage_refusal() {
        Some(e) => ApiError::from(e).into_response(),
        None => Json(json!({"ready": true})).into_response(),
    }
}

async fn metrics(State(st): State<Shared>, _: Params<NoParams>) -> Response {
    let s = st.engine.status();
    let m = &st.metrics;
    m.keys.set(s.keys as i64);
    m.epoch.set(st.node.epoch() as i64);
    m.is_primary.set(i64::from(
        st.node.replication_role() == rules::Role::Primary,
    ));
    if let Some(r) = st.node.replicator() {
        let c = r.members();
        m.config_index
            .set(i64::try_from(c.index).unwrap_or(i64::MAX));
        m.config_voters.set(c.voters.len() as i64);
        m.config_learners.set(c.learners.len() as i64);
    }
    m.last_index.set(s.last_index as i64);
    m.commit_index.set(st.engine.commit_index() as i64);
    m.wal_bytes.set(s.wal_bytes as i64);
    m.wal_segments.set(s.wal_segments as i64);
    m.storage_poisoned.set(i64::from(s.poisoned));
    for state in storage::StorageState::ALL {
        m.storage_state
            .with_label_values(&[state.as_str()])
            .set(i64::from(state == s.storage_state));
    }
    m.data_set_bytes
        .set(i64::try_from(s.data_set_bytes).unwrap_or(i64::MAX));
    m.max_data_bytes.set(
        s.max_data_bytes
            .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
    );
    set_expiry_metrics(&st, &s);
    if let Some(ix) = st.engine.state().index() {
        let s = ix.stats();
        m.index.documents.set(s.documents as i64);
        m.index.terms.set(s.terms as i64);
        m.index.postings.set(s.postings as i64);
        m.index.memory_bytes.set(s.memory_bytes as i64);
    }
    let runtime = st.node.runtime();
    let ml_peers = match &runtime {
        Runtime::Masterless(n) => n.peer_urls().len(),
        _ => 0,
    };
    m.ml_peers.set(ml_peers as i64);
    // A peer that left the set (§5.9) leaves no stale gauge behind.
    m.replication_lag_entries.reset();
    for (peer, lag) in runtime.peer_lags() {
        m.replication_lag_entries
            .with_label_values(&[&peer])
            .set(lag as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// The TTL gauges from the engine, and the expired-keys counter advanced
/// by what the engine counted since the last read (concurrent reads each
/// add their own part: `fetch_max` hands out every step once).
fn set_expiry_metrics(st: &AppState, s: &storage::EngineStatus) {
    let m = &st.metrics.expiry;
    m.keys_with_ttl
        .set(i64::try_from(s.keys_with_ttl).unwrap_or(i64::MAX));
    m.leases.set(i64::try_from(s.leases).unwrap_or(i64::MAX));
    let seen = st
        .expired_seen
        .fetch_max(s.expired_keys, std::sync::atomic::Ordering::AcqRel);
    m.expired_keys_total
        .inc_by(counter_step(seen, s.expired_keys));
}

/// How far a counter advances from the last value seen to `now` (never
/// back).
fn counter_step(seen: u64, now: u64) -> u64 {
    now.saturating_sub(seen)
}

async fn empty_key() -> ApiError {
    ApiError::bad_request(code::INVALID_KEY, "key is empty")
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        code::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn codings(values: &[&'static str]) -> Result<(), ApiError> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
        }
        transfer_codings_supported(&h)
    }

    #[test]
    fn only_chunked_alone_is_a_supported_transfer_coding() {
        assert!(codings(&[]).is_ok());
        assert!(codings(&["chunked"]).is_ok());
        assert!(codings(&["Chunked "]).is_ok());
        for bad in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["identity"],
        ] {
            let e = codings(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_IMPLEMENTED, "{bad:?}");
            assert_eq!(e.code, "unsupported_transfer_encoding");
        }
    }

    #[test]
    fn op_labels_of_the_kv_routes() {
        let label = |m: Method, p: &str| OPS[op_label(&m, Some(p))];
        assert_eq!(label(Method::GET, "/v1/kv/{*key}"), "get");
        assert_eq!(label(Method::HEAD, "/v1/kv/{*key}"), "get");
        assert_eq!(label(Method::PUT, "/v1/kv/{*key}"), "put");
        assert_eq!(label(Method::DELETE, "/v1/kv/{*key}"), "delete");
        assert_eq!(label(Method::GET, "/v1/kv"), "range");
        assert_eq!(label(Method::HEAD, "/v1/kv"), "range");
        assert_eq!(label(Method::DELETE, "/v1/kv"), "delete_range");
        assert_eq!(label(Method::PUT, "/v1/kv"), "other");
        assert_eq!(label(Method::POST, "/v1/txn"), "txn");
        assert_eq!(label(Method::GET, "/openapi.json"), "other");
        assert_eq!(OPS[op_label(&Method::GET, None)], "other");
    }

    fn limits() -> Limits {
        Limits {
            max_value_bytes: 8,
            max_bulk_bytes: 1 << 20,
            max_bulk_items: 10,
            max_inflight_requests: 10,
            body_timeout: Duration::from_secs(1),
            max_snapshot_bytes: 1 << 20,
            max_inflight_body_bytes: 1 << 20,
            max_watchers: 10,
        }
    }

    fn bulk_of(body: serde_json::Value) -> Result<Op, ApiError> {
        let req: BulkRequest = serde_json::from_value(body)
            .map_err(|e| ApiError::bad_request(code::INVALID_JSON, e.to_string()))?;
        bulk_op(req, &limits(), 1_000)
    }

    #[test]
    fn bulk_items_carry_their_expiry() {
        use crate::model::Expiry;
        let op = bulk_of(json!({"items": [
            {"key": "a", "value": "x", "ttl_ms": 250},
            {"key": "b", "value": "x", "lease": 3},
            {"key": "c", "value": "x", "keep_ttl": true},
            {"key": "d", "value": "x"},
        ]}))
        .unwrap();
        let Op::Bulk { items } = op else {
            panic!("{op:?}")
        };
        let expiries: Vec<Expiry> = items.iter().map(|(_, _, e)| *e).collect();
        assert_eq!(
            expiries,
            [
                Expiry::At(1_250),
                Expiry::Lease(3),
                Expiry::Keep,
                Expiry::Never
            ]
        );
        for (item, field) in [
            (
                json!({"key": "a", "value": "x", "ttl_ms": 0}),
                "items[1].ttl_ms",
            ),
            (
                json!({"key": "a", "value": "x", "ttl_ms": -4}),
                "items[1].ttl_ms",
            ),
            (
                json!({"key": "a", "value": "x", "lease": "x"}),
                "items[1].lease",
            ),
            (
                json!({"key": "a", "value": "x", "lease": 1, "ttl_ms": 4}),
                "items[1]",
            ),
        ] {
            let ok = json!({"key": "k", "value": "v"});
            let e = bulk_of(json!({"items": [ok, item]})).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, "invalid_ttl"), "{item}");
            assert!(e.message.starts_with(&format!("{field}:")), "{}", e.message);
        }
        let unknown = bulk_of(json!({"items": [{"key": "a", "value": "x", "ttl": 5}]}));
        assert_eq!(unknown.unwrap_err().code, "invalid_json");
    }

    #[test]
    fn the_expired_counter_only_moves_forward() {
        assert_eq!(counter_step(0, 5), 5);
        assert_eq!(counter_step(5, 5), 0);
        assert_eq!(counter_step(5, 12), 7);
        assert_eq!(counter_step(12, 3), 0);
    }

    #[test]
    fn a_query_must_decode_to_utf8() {
        for good in ["q=caf%C3%A9", "q=a+b&limit=3", "q=%ZZ", "", "key=%E2%82%AC"] {
            assert!(query_is_utf8(good).is_ok(), "{good}");
        }
        for bad in ["q=caf%C3", "q=%FF", "q=ok&offset=%C3%28", "key=%E2%82"] {
            assert_eq!(
                query_is_utf8(bad).unwrap_err().code,
                "invalid_query",
                "{bad}"
            );
        }
    }
}
