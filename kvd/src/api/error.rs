//! The one place where errors become HTTP responses.
//!
//! Every error body is `{"error": {"code": "<snake_case>", "message": "..."}}`.
//! Client mistakes are 4xx; 5xx is kept for the node's own failures.

use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
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
            "not_primary",
            format!("this node is a secondary; send writes to {primary}"),
        );
        e.headers.push((header::LOCATION, target));
        e.headers
            .push((HeaderName::from_static("x-kv-primary"), primary.to_string()));
        e
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
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
            E::Poisoned => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            E::DataDirLost(_) => (StatusCode::SERVICE_UNAVAILABLE, "data_dir_lost"),
            // Nothing was logged and the WAL retries the roll on the next
            // write: worth retrying soon.
            E::SegmentUnavailable(_) => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "wal_unavailable",
                    e.to_string(),
                )
                .retry_after(1)
            }
            // Not retryable: only deletes (or a higher limit) make room.
            E::MemoryFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "memory_full"),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            // Logged by a primary that was deposed before it could commit:
            // the write did not happen, and the client may retry it.
            E::Superseded => (StatusCode::SERVICE_UNAVAILABLE, "write_superseded"),
            E::Replication(rules::AppendError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_append")
            }
            E::Replication(_) => (StatusCode::INTERNAL_SERVER_ERROR, "replication_error"),
            E::NotQuiescent(_) => (StatusCode::CONFLICT, "not_quiescent"),
            // A peer sent what no client could: its request, not our fault.
            E::InvalidEntry(_) => (StatusCode::BAD_REQUEST, "invalid_entry"),
            E::StampOutOfRange(_) => (StatusCode::BAD_REQUEST, "stamp_out_of_range"),
            E::NotDurable(_) | E::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            E::Corruption { .. } | E::Decode(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage_corruption")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}
