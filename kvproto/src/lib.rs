//! kvproto: the wire types of kvstore, shared by `kvd` (which writes them)
//! and its clients (`kvclient`, `kvsup`), so that each fact has one type.
//!
//! - [`Mode`]: a node's or cluster's replication mode.
//! - [`status`]: the `/v1/status` body; [`admin`]: the admin request and
//!   answer bodies (mode switch, promotion, transfer, debug clock).
//! - [`header`]: header names; [`code`]: error codes; [`ErrorBody`]: the
//!   JSON error body every 4xx and 5xx carries.
//! - [`key`]: which keys a node accepts.
//! - [`Timestamp`]: a hybrid-logical-clock stamp, as it travels.
//! - [`bytes::Reader`]: the little-endian reader of the binary encodings
//!   (`/internal/append`, `/internal/ml/stream`).
//!
//! - [`logging`] (feature `logging`): the log subscriber of kvd and kvsup.
//!
//! Small on purpose: serde only (clap and tracing-subscriber behind
//! features), no I/O but the logger's, no async.

pub mod admin;
pub mod bytes;
pub mod code;
mod error;
pub mod header;
pub mod key;
#[cfg(feature = "logging")]
pub mod logging;
pub mod members;
mod mode;
pub mod status;
mod timestamp;

pub use error::{ErrorBody, ErrorDetail};
pub use key::{validate_key, KeyError, MAX_KEY_BYTES};
pub use mode::{or_switching, Mode, UnknownMode};
pub use timestamp::Timestamp;

/// Longest `ttl_ms` of a key or a lease: ten years.
pub const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
