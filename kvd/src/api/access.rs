//! Bearer tokens at the API (docs/DESIGN.md §2.18): the token file is held
//! here and reloaded on SIGHUP; every request but the open routes and the
//! peers' `/internal/*` must present a token the file holds (401
//! otherwise). Routes whose need is known from the route alone (admin,
//! metrics, status, leases) are decided here; key routes decide in their
//! handler, once the key or body is parsed, through [`Caller`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use kvproto::code;
use parking_lot::RwLock;

use super::{tls, ApiError, Shared};
use crate::auth::{self, Action, Denied, Grant, Tokens};
use crate::model::{Txn, TxnOp};

/// The token file of `--auth-file` and what it held when last read.
pub struct Access {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
}

impl Access {
    /// Reads the token file; the error says which file and what is wrong.
    pub fn load(path: &Path) -> Result<Access, String> {
        let tokens = read(path)?;
        Ok(Access {
            path: path.to_path_buf(),
            tokens: RwLock::new(Arc::new(tokens)),
        })
    }

    /// Reads the file again (SIGHUP). A file that no longer parses changes
    /// nothing: the tokens it held stay in force, and the error says why.
    pub fn reload(&self) -> Result<usize, String> {
        let tokens = read(&self.path)?;
        let n = tokens.len();
        *self.tokens.write() = Arc::new(tokens);
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn identify(&self, secret: &str) -> Option<Arc<Grant>> {
        self.tokens.read().identify(secret).cloned()
    }
}

fn read(path: &Path) -> Result<Tokens, String> {
    let at = |e: String| format!("token file {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| at(e.to_string()))?;
    if meta.len() > auth::MAX_AUTH_FILE_BYTES as u64 {
        return Err(at(format!(
            "{} bytes, more than the {} a token file may hold",
            meta.len(),
            auth::MAX_AUTH_FILE_BYTES
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    Tokens::parse(&text).map_err(at)
}

/// Who sent a request, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The node runs without a token file: everyone may do everything.
    Anyone,
    Token(Arc<Grant>),
}

impl Caller {
    /// The caller of a request, from what [`guard`] left in it. Fails
    /// closed: with a token file, a request that passed no guard has no
    /// rights.
    pub fn of(st: &Shared, ext: Option<Extension<Caller>>) -> Result<Caller, ApiError> {
        match (ext, &st.access) {
            (Some(Extension(c)), _) => Ok(c),
            (None, None) => Ok(Caller::Anyone),
            (None, Some(_)) => Err(denied(Denied::Unauthenticated)),
        }
    }

    /// 403 unless the caller may do `action`.
    pub fn check(&self, action: Action<'_>) -> Result<(), ApiError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Token(g) => g.check(action).map_err(denied),
        }
    }

    pub fn may_read(&self, key: &[u8]) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Token(g) => g.may_read(key),
        }
    }

    /// 403 unless the caller may do every part of `txn`: read each key it
    /// compares or gets and each range it reads (whole: a transaction's
    /// answer is not filtered), write each key it writes, either branch.
    pub fn check_txn(&self, txn: &Txn) -> Result<(), ApiError> {
        for c in &txn.compare {
            self.check(Action::Read(&c.key))?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            self.check(match op {
                TxnOp::Put { key, .. } | TxnOp::Delete { key } => Action::Write(key),
                TxnOp::DeletePrefix { prefix } => Action::WritePrefix(prefix),
                TxnOp::Get { key } => Action::Read(key),
                TxnOp::Range(read) => Action::ReadAll(&read.range),
            })?;
        }
        Ok(())
    }

    /// The token whose reads are filtered: one that may not read every key.
    pub fn filter(&self) -> Option<&Grant> {
        match self {
            Caller::Token(g) if !g.reads_everything() => Some(g),
            _ => None,
        }
    }

    /// The token's name, for the audit log.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anyone => "-",
            Caller::Token(g) => &g.name,
        }
    }
}

/// What the route alone says a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Open to all: liveness, readiness, the API description, unknown routes.
    Open,
    /// Node-to-node traffic: peers prove themselves by certificate, not token.
    Peer,
    /// A token allowed this action.
    Role(Action<'static>),
    /// A token; the handler decides on what the request names.
    Token,
}

fn need(method: &Method, path: Option<&str>) -> Need {
    let Some(path) = path else {
        return Need::Open;
    };
    match path {
        "/health" | "/ready" | "/openapi.json" => Need::Open,
        p if p.starts_with("/internal/") => Need::Peer,
        "/promote_to_primary" => Need::Role(Action::Admin),
        p if p.starts_with("/v1/admin/") => Need::Role(Action::Admin),
        "/metrics" => Need::Role(Action::Metrics),
        "/v1/status" => Need::Role(Action::Status),
        // A revoke also deletes the lease's keys: its handler checks them.
        "/v1/leases" | "/v1/leases/{id}/keepalive" => Need::Role(Action::Lease),
        "/v1/leases/{id}" if method == Method::GET => Need::Role(Action::Lease),
        _ => Need::Token,
    }
}

/// The bearer token of a request, if it sent one.
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The middleware, layered only on a node with a token file: authenticates
/// the request and decides what the route alone decides; admin actions are
/// logged with the token's name (or the node's, for a node certificate).
pub async fn guard(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(access) = &st.access else {
        return next.run(req).await;
    };
    let need = need(
        req.method(),
        req.extensions().get::<MatchedPath>().map(|p| p.as_str()),
    );
    if matches!(need, Need::Open | Need::Peer) {
        return next.run(req).await;
    }
    // A cluster member (a verified node certificate) may run the operator's
    // routes as it may the peers': a primary handing over calls its
    // successor's promote with its certificate, not a token.
    if need == Need::Role(Action::Admin) {
        if let Some(tls::PeerIdentity::Tls { node: Some(node) }) = req.extensions().get() {
            tracing::info!(
                target: "kvd::audit",
                node = %node,
                method = %req.method(),
                path = req.uri().path(),
                "admin action by a node certificate"
            );
            return next.run(req).await;
        }
    }
    let Some(grant) = bearer(&req).and_then(|t| access.identify(t)) else {
        return denied(Denied::Unauthenticated).into_response();
    };
    let caller = Caller::Token(grant);
    if let Need::Role(action) = need {
        if let Err(e) = caller.check(action) {
            return e.into_response();
        }
        if action == Action::Admin {
            tracing::info!(
                target: "kvd::audit",
                token = caller.name(),
                method = %req.method(),
                path = req.uri().path(),
                "admin action"
            );
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// 401 or 403 with the usual JSON body.
pub fn denied(d: Denied) -> ApiError {
    match d {
        Denied::Unauthenticated => ApiError::new(
            StatusCode::UNAUTHORIZED,
            code::UNAUTHENTICATED,
            "send a token of this node's token file: Authorization: Bearer <token>",
        )
        .with_header("www-authenticate", "Bearer realm=\"kvd\"".into()),
        Denied::Forbidden { token, lacks } => ApiError::new(
            StatusCode::FORBIDDEN,
            code::PERMISSION_DENIED,
            format!("token {token:?} lacks {lacks}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_what_its_kind_does() {
        let n = |m: Method, p: &str| need(&m, Some(p));
        assert_eq!(n(Method::GET, "/health"), Need::Open);
        assert_eq!(n(Method::GET, "/ready"), Need::Open);
        assert_eq!(need(&Method::GET, None), Need::Open, "unknown routes: 404");
        assert_eq!(n(Method::POST, "/internal/append"), Need::Peer);
        assert_eq!(n(Method::POST, "/internal/ml/stream"), Need::Peer);
        assert_eq!(
            n(Method::POST, "/v1/admin/promote"),
            Need::Role(Action::Admin)
        );
        assert_eq!(
            n(Method::POST, "/promote_to_primary"),
            Need::Role(Action::Admin)
        );
        assert_eq!(n(Method::POST, "/v1/admin/mode"), Need::Role(Action::Admin));
        assert_eq!(n(Method::GET, "/metrics"), Need::Role(Action::Metrics));
        assert_eq!(n(Method::GET, "/v1/status"), Need::Role(Action::Status));
        assert_eq!(n(Method::POST, "/v1/leases"), Need::Role(Action::Lease));
        assert_eq!(n(Method::GET, "/v1/leases/{id}"), Need::Role(Action::Lease));
        assert_eq!(n(Method::DELETE, "/v1/leases/{id}"), Need::Token);
        assert_eq!(n(Method::GET, "/v1/kv/{*key}"), Need::Token);
        assert_eq!(n(Method::POST, "/v1/txn"), Need::Token);
        assert_eq!(n(Method::GET, "/v1/watch"), Need::Token);
    }
}
