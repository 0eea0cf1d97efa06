//! The one place where errors become HTTP responses.
//!
//! Every error body is `{"error": {"code": "<snake_case>", "message": "..."}}`.
//! Client mistakes are 4xx; 5xx is kept for the node's own failures.

use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvproto::{code, header as h, ErrorBody};

use crate::node::switch::SwitchError;
use crate::node::WriteError;
use crate::replication::node::{self as ps, PromoteError, VoteError};
use crate::replication::rules;
use crate::storage;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra headers: `Retry-After`, or `Location` and `X-KV-Primary`.
    pub headers: Vec<(HeaderName, String)>,
    /// Fields of the body beside `error` (a refused conditional write's
    /// `current`, docs/DESIGN.md §2.12).
    pub fields: Vec<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// Adds a field to the body, beside `error`.
    pub fn with_field(mut self, name: &'static str, value: serde_json::Value) -> Self {
        self.fields.push((name, value));
        self
    }

    /// Adds a header (a static, valid header name).
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((HeaderName::from_static(name), value));
        self
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.headers.push((header::RETRY_AFTER, secs.to_string()));
        self
    }

    /// 307 to the same path and query on `primary` (a base URL).
    pub fn redirect(primary: &str, uri: &Uri) -> Self {
        let primary = primary.trim_end_matches('/');
        let target = format!(
            "{primary}{}",
            uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut e = Self::new(
            StatusCode::TEMPORARY_REDIRECT,
            code::NOT_PRIMARY,
            format!("this node is a secondary; send writes to {primary}"),
        );
        e.headers.push((header::LOCATION, target));
        e.headers
            .push((HeaderName::from_static(h::PRIMARY), primary.to_string()));
        e
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody::new(self.code, self.message);
        let mut resp = if self.fields.is_empty() {
            (self.status, Json(body)).into_response()
        } else {
            let mut body = serde_json::json!(body);
            for (name, value) in self.fields {
                body[name] = value;
            }
            (self.status, Json(body)).into_response()
        };
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        resp
    }
}

impl From<storage::Error> for ApiError {
    fn from(e: storage::Error) -> Self {
        use storage::Error as E;
        let (status, code) = match &e {
            E::Poisoned => (StatusCode::SERVICE_UNAVAILABLE, code::STORAGE_UNAVAILABLE),
            E::DataDirLost(_) => (StatusCode::SERVICE_UNAVAILABLE, code::DATA_DIR_LOST),
            // Nothing was logged and the WAL retries the roll on the next
            // write: worth retrying soon.
            E::SegmentUnavailable(_) => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::WAL_UNAVAILABLE,
                    e.to_string(),
                )
                .retry_after(1)
            }
            // Not retryable: only deletes (or a higher limit) make room.
            E::MemoryFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, code::MEMORY_FULL),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, code::SHUTTING_DOWN),
            // Logged by a primary that was deposed before it could commit:
            // the write did not happen, and the client may retry it.
            E::Superseded => (StatusCode::SERVICE_UNAVAILABLE, code::WRITE_SUPERSEDED),
            E::Replication(rules::AppendError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, code::INVALID_APPEND)
            }
            E::Replication(_) => (StatusCode::INTERNAL_SERVER_ERROR, code::REPLICATION_ERROR),
            E::NotQuiescent(_) => (StatusCode::CONFLICT, code::NOT_QUIESCENT),
            // A peer sent what no client could: its request, not our fault.
            E::InvalidEntry(_) => (StatusCode::BAD_REQUEST, code::INVALID_ENTRY),
            E::StampOutOfRange(_) => (StatusCode::BAD_REQUEST, code::STAMP_OUT_OF_RANGE),
            E::LeaseNotFound(_) => (StatusCode::NOT_FOUND, code::LEASE_NOT_FOUND),
            // Like the memory budget: only revokes (or a higher limit) help.
            E::TooManyLeases { .. } => (StatusCode::INSUFFICIENT_STORAGE, code::TOO_MANY_LEASES),
            E::NotDurable(_) | E::Io { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, code::STORAGE_ERROR)
            }
            E::Corruption { .. } | E::Decode(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, code::STORAGE_CORRUPTION)
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// 503 `writes_paused` with `Retry-After: 1` and `X-KV-Retry-After-Ms: 50`.
pub fn paused_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code::WRITES_PAUSED,
        WriteError::Paused.to_string(),
    )
    .retry_after(1)
    // A finer hint for kvclient: a switch's pause is usually under 1 s.
    .with_header(h::RETRY_AFTER_MS, "50".to_string())
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let code = match e {
            WriteError::Paused => return paused_error(),
            WriteError::Storage(e) => return e.into(),
            WriteError::UnsupportedInMasterless => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    code::UNSUPPORTED_IN_MASTERLESS,
                    e.to_string(),
                )
            }
            WriteError::CommitTimeout(_) => code::COMMIT_TIMEOUT,
            WriteError::QuorumTimeout { .. } => code::QUORUM_TIMEOUT,
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string()).retry_after(1)
    }
}

impl From<ps::Error> for ApiError {
    fn from(e: ps::Error) -> Self {
        use ps::Error as E;
        let (status, code) = match e {
            E::Storage(e) => return e.into(),
            E::StaleEpoch { my_epoch } => {
                return ApiError::new(StatusCode::CONFLICT, code::STALE_EPOCH, e.to_string())
                    .with_header(h::EPOCH, my_epoch.to_string())
            }
            E::SnapshotRefused(why) => {
                return ApiError::bad_request(why.code(), why.to_string());
            }
            E::EpochOutOfReach { .. } => (StatusCode::BAD_REQUEST, code::EPOCH_OUT_OF_RANGE),
            E::TwoPrimaries { .. } => (StatusCode::CONFLICT, code::TWO_PRIMARIES),
            E::EpochHasPrimary { .. } => (StatusCode::CONFLICT, code::EPOCH_HAS_PRIMARY),
            E::SnapshotInProgress => (StatusCode::CONFLICT, code::SNAPSHOT_IN_PROGRESS),
            E::InvalidSnapshot(_) => (StatusCode::BAD_REQUEST, code::INVALID_SNAPSHOT),
            E::SnapshotCheck(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                code::SNAPSHOT_VERIFY_FAILED,
            ),
            E::PersistEpoch { .. } => (StatusCode::INTERNAL_SERVER_ERROR, code::META_WRITE_FAILED),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// `meta` (epoch and vote) could not be stored: nothing was decided.
fn meta_write_failed(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::META_WRITE_FAILED,
        e.to_string(),
    )
}

impl From<VoteError> for ApiError {
    fn from(e: VoteError) -> Self {
        match e {
            VoteError::OutOfReach { .. } => {
                ApiError::bad_request(code::EPOCH_OUT_OF_RANGE, e.to_string())
            }
            VoteError::Persist(_) => meta_write_failed(&e),
        }
    }
}

impl From<PromoteError> for ApiError {
    fn from(e: PromoteError) -> Self {
        match e {
            PromoteError::Refused(why) => {
                ApiError::new(StatusCode::CONFLICT, why.code(), why.to_string())
            }
            PromoteError::Persist(_) => meta_write_failed(&e),
        }
    }
}

impl From<SwitchError> for ApiError {
    fn from(e: SwitchError) -> Self {
        use SwitchError as E;
        let (status, code) = match e {
            E::Storage(e) => return e.into(),
            E::NoPeers => (StatusCode::CONFLICT, code::NO_PEERS),
            E::InvalidMode(_) => (StatusCode::BAD_REQUEST, code::INVALID_MODE),
            E::NotPaused => (StatusCode::CONFLICT, code::WRITES_NOT_PAUSED),
            E::StaleEpoch { .. } => (StatusCode::CONFLICT, code::STALE_EPOCH),
            E::EpochOutOfReach { .. } => (StatusCode::BAD_REQUEST, code::EPOCH_OUT_OF_RANGE),
            E::NotQuiescent(_) => (StatusCode::CONFLICT, code::NOT_QUIESCENT),
            E::MetaRead(_) => (StatusCode::INTERNAL_SERVER_ERROR, code::META_READ_FAILED),
            E::MetaWrite(_) => (StatusCode::INTERNAL_SERVER_ERROR, code::META_WRITE_FAILED),
            E::RuntimeStart(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                code::RUNTIME_START_FAILED,
            ),
        };
        ApiError::new(status, code, e.to_string())
    }
}
