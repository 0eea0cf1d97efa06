//! The library's one error type.
//!
//! Callers mostly need two answers from an error: "is it worth trying again
//! later?" ([`Error::is_retryable`]) and "which failure was it, in a form a
//! script can match?" ([`Error::code`]). Every variant carries the endpoint it
//! came from, because in a cluster "connection refused" means little without
//! knowing which node refused.

use std::time::Duration;

use kvproto::code;

use serde::{Deserialize, Serialize};

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a key was refused before anything was sent.
///
/// These mirror the server's rules (docs/DESIGN.md §2) so that a bad key fails fast
/// and identically on every node, instead of costing a round trip and a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Keys are 1..=1024 bytes; the empty key would also collide with the
    /// `/v1/kv/` collection path.
    #[error("key is empty")]
    Empty,
    /// Longer than [`crate::MAX_KEY_BYTES`] bytes of UTF-8.
    #[error("key is {len} bytes, the limit is {max} bytes", max = crate::MAX_KEY_BYTES)]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// NUL is reserved by the server (C-string safety in tooling, unambiguous
    /// key framing).
    #[error("key contains a NUL byte at byte {at}")]
    ContainsNul {
        /// Byte offset of the first NUL.
        at: usize,
    },
    /// A valid key that no URL-based HTTP client can address: URL parsers
    /// (WHATWG, and so `reqwest`) remove `.` and `..` path segments, even
    /// percent-encoded ones, so `GET /v1/kv/..` would silently become
    /// `GET /v1/`. Such keys can still be written with `bulk_set`.
    #[error("key {0} cannot be sent in a URL path (HTTP clients remove dot segments); write it with a bulk request")]
    DotSegment(&'static str),
}

/// Everything that can go wrong in a [`crate::Client`] call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key breaks the server's key rules; nothing was sent.
    #[error("invalid key {key}: {reason}")]
    InvalidKey {
        /// The key, quoted and shortened for display.
        key: String,
        /// Which rule it breaks.
        reason: KeyError,
    },

    /// A configured (or server-advertised) endpoint is not a usable base URL.
    #[error("invalid endpoint {url:?}: {reason}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The builder was given no endpoints at all.
    #[error("no endpoints configured")]
    NoEndpoints,

    /// A builder setting is unusable (e.g. a zero timeout).
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),

    /// A value in a bulk document could not be turned into bytes (bad base64).
    #[error("invalid value for key {key:?}: {reason}")]
    InvalidValue {
        /// The item's key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },

    /// The server answered with an error status and (usually) a JSON error
    /// body `{"error": {"code", "message"}}`.
    #[error("{endpoint} answered {status}: {message} ({code})")]
    Server {
        /// Base URL of the node that answered.
        endpoint: String,
        /// HTTP status code.
        status: u16,
        /// The server's snake_case error code, or `http_<status>` when the
        /// body was not a JSON error.
        code: String,
        /// The server's message, or a prefix of the body.
        message: String,
        /// The `Retry-After` the server asked for (503 while a cluster is
        /// paused for a mode switch).
        retry_after: Option<Duration>,
    },

    /// No complete answer within the request timeout.
    #[error("request to {endpoint} timed out after {} ms", timeout.as_millis())]
    Timeout {
        /// Base URL of the node that did not answer in time.
        endpoint: String,
        /// The timeout that ran out (it may be shorter than the configured
        /// request timeout when the call's retry deadline was nearly spent).
        timeout: Duration,
        /// The underlying error, kept for debugging.
        #[source]
        source: reqwest::Error,
    },

    /// No TCP connection could be made (refused, unreachable, connect timeout).
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// Base URL of the node.
        endpoint: String,
        /// The root cause, e.g. "Connection refused (os error 111)".
        reason: String,
        /// The underlying error, kept for debugging.
        #[source]
        source: reqwest::Error,
    },

    /// The TLS handshake failed: the node's certificate does not chain to
    /// the trusted CA (or names another host), or the node refused ours.
    /// A setting to fix, not a moment to wait out: never retried.
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls {
        /// Base URL of the node.
        endpoint: String,
        /// What TLS said, e.g. "invalid peer certificate: UnknownIssuer".
        reason: String,
        /// The underlying error, kept for debugging.
        #[source]
        source: reqwest::Error,
    },

    /// The connection broke while the request or response was in flight.
    #[error("HTTP exchange with {endpoint} failed: {reason}")]
    Transport {
        /// Base URL of the node.
        endpoint: String,
        /// The root cause.
        reason: String,
        /// The underlying error, kept for debugging.
        #[source]
        source: reqwest::Error,
    },

    /// A 2xx answer whose body is not what the API promises.
    #[error("cannot decode {what} from {endpoint}: {reason}")]
    Decode {
        /// Base URL of the node.
        endpoint: String,
        /// What was being decoded, e.g. "set response".
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },

    /// The answer was bigger than the client's response limit.
    #[error("response from {endpoint} exceeds the limit of {limit_bytes} bytes")]
    ResponseTooLarge {
        /// Base URL of the node.
        endpoint: String,
        /// The configured limit.
        limit_bytes: u64,
    },

    /// Redirects did not settle on a primary within the hop limit; usually
    /// two nodes that each believe the other is primary.
    #[error("gave up following the primary after {hops} redirects (last: {last})")]
    RedirectLoop {
        /// Redirects followed.
        hops: u32,
        /// The last redirect target.
        last: String,
    },

    /// A redirect that names no primary: the node knows it is not primary
    /// but not who is (an election is in progress).
    #[error("{endpoint} answered {status} without naming a primary")]
    NoPrimary {
        /// Base URL of the node.
        endpoint: String,
        /// The redirect status.
        status: u16,
    },

    /// A conditional write's precondition did not hold (412
    /// `precondition_failed`): nothing was written. `current` is the key's
    /// state when the node checked, so a compare-and-swap loop can retry
    /// from it without another read.
    #[error("{endpoint} answered 412: {message} (precondition_failed; {current})")]
    PreconditionFailed {
        /// Base URL of the node.
        endpoint: String,
        /// The server's message.
        message: String,
        /// The key as the check saw it.
        current: Current,
    },

    /// A request the client refuses to send, whatever the key (an empty
    /// prefix to delete, `If-None-Match` on a delete, a transaction over
    /// the op limit or with a compare whose operand does not fit its
    /// target); nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The lease named is not alive (404 `lease_not_found`, docs/DESIGN.md
    /// §2.16): gone, expired or never granted; nothing was written.
    #[error("{endpoint} answered 404: {message} (lease_not_found)")]
    LeaseNotFound {
        /// Base URL of the node.
        endpoint: String,
        /// The server's message.
        message: String,
    },

    /// A watch asked for records the node no longer holds (410
    /// `compacted`, or an error event `compacted`, §2.17): re-read the
    /// range and watch from the page's `index` + 1.
    #[error(
        "{endpoint}: the watch is compacted, the oldest index held is {oldest_index} (compacted)"
    )]
    Compacted {
        /// Base URL of the node.
        endpoint: String,
        /// The first index the node can stream from.
        oldest_index: u64,
    },

    /// A stream (a watch) that sent nothing for this long, its head or its
    /// events: taken for a dead connection, and resumed elsewhere.
    #[error("{endpoint} sent nothing on the stream for {silence:?} (stalled)")]
    Stalled {
        /// Base URL of the node.
        endpoint: String,
        /// How long it was silent.
        silence: Duration,
    },

    /// A stream (a watch) the node ended without an error event: resumed
    /// elsewhere.
    #[error("{endpoint} ended the stream (stream_ended)")]
    StreamEnded {
        /// Base URL of the node.
        endpoint: String,
    },

    /// A lock was not taken within its wait ([`crate::lock::LockOptions`]).
    #[error("lock {name:?} was not taken within {waited:?} (lock_timeout)")]
    LockTimeout {
        /// The lock's key.
        name: String,
        /// How long the contender waited.
        waited: Duration,
    },
}

impl Error {
    /// Whether the same call may succeed if tried again later or elsewhere.
    ///
    /// True for transport failures, timeouts, a missing primary and the
    /// statuses that mean "not now" (429, 502, 503, 504). False for anything
    /// the caller must change first (bad key, 4xx, undecodable answers): retrying
    /// those would only repeat the failure. The client has already retried
    /// retryable errors within its budget when it returns one.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::Connect { .. }
            | Error::Transport { .. }
            | Error::NoPrimary { .. }
            | Error::Stalled { .. }
            | Error::StreamEnded { .. } => true,
            Error::Server { status, .. } => is_retryable_status(*status),
            Error::InvalidKey { .. }
            | Error::InvalidEndpoint { .. }
            | Error::NoEndpoints
            | Error::InvalidConfig(_)
            | Error::InvalidValue { .. }
            | Error::Tls { .. }
            | Error::Decode { .. }
            | Error::ResponseTooLarge { .. }
            | Error::RedirectLoop { .. }
            | Error::PreconditionFailed { .. }
            | Error::InvalidRequest(_)
            | Error::LeaseNotFound { .. }
            | Error::Compacted { .. }
            | Error::LockTimeout { .. } => false,
        }
    }

    /// Whether a write that failed this way may have been applied all the
    /// same: the answer was lost (a timeout, a connection broken after the
    /// request went out), or the node logged the write and could not say
    /// whether it committed (503 `commit_timeout`, `quorum_timeout`, or a
    /// 5xx the node does not promise wrote nothing, docs/DESIGN.md §2.7).
    ///
    /// The client does not retry a conditional write or a transaction with
    /// compares after such a failure (a retry could be refused by the
    /// first attempt's own success), so the caller sees it and decides,
    /// typically by reading the key back.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Transport { .. } => true,
            Error::Server { status, code, .. } => *status >= 500 && !NOT_WRITTEN.contains(&&**code),
            _ => false,
        }
    }

    /// Whether the server refused the request before doing anything (so
    /// retrying a write cannot apply it twice): paused writes, a primary
    /// handing over, no primary known yet, or overload.
    pub fn was_not_applied(&self) -> bool {
        code::NOT_APPLIED.contains(&self.code())
    }

    /// A stable snake_case code for scripts and metrics: the server's own code
    /// for [`Error::Server`], a client-side code otherwise.
    pub fn code(&self) -> &str {
        match self {
            Error::InvalidKey { .. } => "invalid_key",
            Error::InvalidEndpoint { .. } => "invalid_endpoint",
            Error::NoEndpoints => "no_endpoints",
            Error::InvalidConfig(_) => "invalid_config",
            Error::InvalidValue { .. } => "invalid_value",
            Error::Server { code, .. } => code,
            Error::Timeout { .. } => "timeout",
            Error::Connect { .. } => "connect",
            Error::Tls { .. } => "tls",
            Error::Transport { .. } => "transport",
            Error::Decode { .. } => "decode",
            Error::ResponseTooLarge { .. } => "response_too_large",
            Error::RedirectLoop { .. } => "redirect_loop",
            Error::NoPrimary { .. } => code::NO_PRIMARY,
            Error::PreconditionFailed { .. } => code::PRECONDITION_FAILED,
            Error::InvalidRequest(_) => "invalid_request",
            Error::LeaseNotFound { .. } => code::LEASE_NOT_FOUND,
            Error::Compacted { .. } => code::COMPACTED,
            Error::LockTimeout { .. } => "lock_timeout",
            Error::Stalled { .. } => "stalled",
            Error::StreamEnded { .. } => "stream_ended",
        }
    }

    /// The HTTP status, when the server answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Server { status, .. } | Error::NoPrimary { status, .. } => Some(*status),
            Error::PreconditionFailed { .. } => Some(412),
            Error::LeaseNotFound { .. } => Some(404),
            _ => None,
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The endpoint the error came from, when one was involved.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Error::Server { endpoint, .. }
            | Error::Timeout { endpoint, .. }
            | Error::Connect { endpoint, .. }
            | Error::Tls { endpoint, .. }
            | Error::Transport { endpoint, .. }
            | Error::Decode { endpoint, .. }
            | Error::ResponseTooLarge { endpoint, .. }
            | Error::NoPrimary { endpoint, .. }
            | Error::PreconditionFailed { endpoint, .. }
            | Error::LeaseNotFound { endpoint, .. }
            | Error::Compacted { endpoint, .. }
            | Error::Stalled { endpoint, .. }
            | Error::StreamEnded { endpoint } => Some(endpoint),
            Error::RedirectLoop { last, .. } => Some(last),
            Error::InvalidKey { .. }
            | Error::InvalidEndpoint { .. }
            | Error::NoEndpoints
            | Error::InvalidConfig(_)
            | Error::InvalidValue { .. }
            | Error::InvalidRequest(_)
            | Error::LockTimeout { .. } => None,
        }
    }

    /// Builds [`Error::InvalidKey`] with a display-safe rendering of the key:
    /// quoted with escapes (a NUL must not reach a terminal raw) and cut
    /// short, because a 1 KiB key makes an unreadable one-line error.
    pub(crate) fn invalid_key(key: &str, reason: KeyError) -> Self {
        const PREVIEW_CHARS: usize = 64;
        let shown = if key.chars().count() > PREVIEW_CHARS {
            let prefix: String = key.chars().take(PREVIEW_CHARS).collect();
            format!("{prefix:?}...")
        } else {
            format!("{key:?}")
        };
        Error::InvalidKey { key: shown, reason }
    }

    /// Sorts a `reqwest` failure into connect / timeout / transport.
    ///
    /// Connect is checked first: a connect timeout is a connect failure to
    /// the user ("that node is down"), not a slow request.
    pub(crate) fn from_reqwest(endpoint: &str, timeout: Duration, err: reqwest::Error) -> Self {
        let endpoint = endpoint.to_owned();
        if is_tls_failure(&err) {
            let reason = root_cause(&err);
            Error::Tls {
                endpoint,
                reason,
                source: err,
            }
        } else if err.is_connect() {
            let reason = root_cause(&err);
            Error::Connect {
                endpoint,
                reason,
                source: err,
            }
        } else if err.is_timeout() {
            Error::Timeout {
                endpoint,
                timeout,
                source: err,
            }
        } else {
            let reason = root_cause(&err);
            Error::Transport {
                endpoint,
                reason,
                source: err,
            }
        }
    }
}

/// 5xx codes whose request the node refused before logging anything
/// (docs/DESIGN.md §2.7: "was it written? no"), so a retry cannot apply a
/// write twice. Any other 5xx may hide a logged write.
const NOT_WRITTEN: [&str; 9] = [
    code::NO_PRIMARY,
    code::TRANSFER_IN_PROGRESS,
    code::WRITES_PAUSED,
    code::OVERLOADED,
    code::MEMORY_FULL,
    code::STORAGE_UNAVAILABLE,
    code::DATA_DIR_LOST,
    code::WAL_UNAVAILABLE,
    code::WRITE_SUPERSEDED,
];

/// Statuses that mean "not now" rather than "not like this".
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// Whether a TLS error (rustls's) is in `err`'s chain of sources. reqwest
/// wraps it in I/O errors, one inside another, whose `source` skips the
/// error they wrap: those are unwrapped by hand.
fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let mut layer = e;
        while let Some(inner) = layer
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            layer = inner;
        }
        if layer.is::<rustls::Error>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The innermost error message: `reqwest` wraps the useful part ("Connection
/// refused") three layers deep under "error sending request for url".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A key's state as a failed precondition reports it (docs/DESIGN.md
/// §2.12): whether it exists and, if it does, its versions (§2.10; all 0
/// when it does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// Whether the key exists.
    pub exists: bool,
    /// Log index of the write that created it.
    #[serde(default)]
    pub create_index: u64,
    /// Log index of its last write: what `Precondition::ModIndex` names.
    #[serde(default)]
    pub mod_index: u64,
    /// Writes since its creation (1 after the first).
    #[serde(default)]
    pub version: u64,
}

impl std::fmt::Display for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exists {
            write!(
                f,
                "the key has mod_index {}, version {}",
                self.mod_index, self.version
            )
        } else {
            f.write_str("the key does not exist")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16) -> Error {
        Error::Server {
            endpoint: "http://n0".into(),
            status,
            code: "x".into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn only_transient_statuses_are_retryable() {
        for status in [429, 502, 503, 504] {
            assert!(server(status).is_retryable(), "{status}");
        }
        for status in [400, 404, 409, 413, 500] {
            assert!(!server(status).is_retryable(), "{status}");
        }
    }

    fn coded(status: u16, code: &str) -> Error {
        Error::Server {
            endpoint: "http://n0".into(),
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn an_unknown_outcome_is_a_lost_answer_or_a_5xx_that_may_hide_a_write() {
        for code in [
            "commit_timeout",
            "quorum_timeout",
            "shutting_down",
            "storage_error",
            "http_502",
        ] {
            assert!(coded(503, code).outcome_unknown(), "{code}");
        }
        for code in NOT_WRITTEN {
            assert!(!coded(503, code).outcome_unknown(), "{code}");
        }
        // A 4xx is a refusal, whatever its code.
        for (status, code) in [
            (412, "precondition_failed"),
            (400, "invalid_txn"),
            (429, "x"),
        ] {
            assert!(!coded(status, code).outcome_unknown(), "{status} {code}");
        }
        let nothing_sent = [
            Error::NoEndpoints,
            Error::InvalidRequest("r".into()),
            Error::NoPrimary {
                endpoint: "http://n0".into(),
                status: 307,
            },
            Error::PreconditionFailed {
                endpoint: "http://n0".into(),
                message: "m".into(),
                current: Current::default(),
            },
        ];
        for err in nothing_sent {
            assert!(!err.outcome_unknown(), "{err}");
        }
    }

    #[test]
    fn a_failed_precondition_reports_the_keys_state() {
        let err = Error::PreconditionFailed {
            endpoint: "http://n0".into(),
            message: "mod_index is 9, not 7".into(),
            current: Current {
                exists: true,
                create_index: 3,
                mod_index: 9,
                version: 2,
            },
        };
        assert_eq!(
            (err.code(), err.status(), err.is_retryable()),
            ("precondition_failed", Some(412), false)
        );
        assert_eq!(
            err.to_string(),
            "http://n0 answered 412: mod_index is 9, not 7 (precondition_failed; \
             the key has mod_index 9, version 2)"
        );
        assert_eq!(Current::default().to_string(), "the key does not exist");
    }

    #[test]
    fn invalid_key_display_is_escaped_and_short() {
        let long = "k".repeat(2000);
        let err = Error::invalid_key(&long, KeyError::TooLong { len: 2000 });
        let shown = err.to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.contains("2000 bytes"), "{shown}");
        let err = Error::invalid_key("a\0b", KeyError::ContainsNul { at: 1 });
        assert!(!err.to_string().contains('\0'));
        assert_eq!(err.code(), "invalid_key");
        assert!(!err.is_retryable());
    }
}
