//! Request and answer bodies of the admin endpoints.
//!
//! Fields of answers are declared in alphabetical order (see
//! [`crate::status`]).

use serde::{Deserialize, Serialize};

use crate::{Mode, Timestamp};

// The configuration's bodies live apart: the status names them too.
pub use crate::members::{Members, MembersRequest};

/// `POST /v1/admin/mode`: switch a node (writes paused on every node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeRequest {
    /// `masterless` or `primary-secondary` (a [`Mode`] name; a string, so
    /// that a node answers any other with `invalid_mode`).
    pub mode: String,
    /// Common log base: at least every node's last index.
    pub base_index: u64,
    /// Greater than every node's epoch.
    pub epoch: u64,
    /// Masterless: the stamp every key gets (ms; logical 0, node 0).
    #[serde(default)]
    pub base_ts_ms: u64,
    /// Primary/secondary: node id of the primary of `epoch`.
    #[serde(default)]
    pub primary: Option<String>,
    /// Primary/secondary: the primary's URL for clients, so secondaries
    /// redirect writes at once (else they learn it from its first append).
    #[serde(default)]
    pub primary_url: Option<String>,
}

impl ModeRequest {
    /// A request to switch to `mode`.
    pub fn new(mode: Mode, base_index: u64, epoch: u64) -> ModeRequest {
        ModeRequest {
            mode: mode.as_str().to_string(),
            base_index,
            epoch,
            base_ts_ms: 0,
            primary: None,
            primary_url: None,
        }
    }
}

/// `POST /promote_to_primary` (and `/v1/admin/promote`), when won.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteAnswer {
    pub epoch: u64,
    pub role: crate::status::Role,
}

/// `POST /v1/admin/transfer`: hand the primary role to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// URL of the peer, as in `--peers`.
    pub to: String,
    #[serde(default = "TransferRequest::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl TransferRequest {
    pub fn default_timeout_ms() -> u64 {
        10_000
    }
}

/// The answer to a transfer that completed: the target's new epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferAnswer {
    pub epoch: u64,
    pub to: String,
}

/// `POST /v1/admin/debug/clock` (needs `--enable-debug`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    pub offset_ms: i64,
}

/// The answer to a clock change: the offset now and the node's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockAnswer {
    pub hlc: Timestamp,
    pub offset_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_request_omits_nothing_a_node_needs() {
        let mut r = ModeRequest::new(Mode::PrimarySecondary, 10, 3);
        r.primary = Some("n1".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mode"], "primary-secondary");
        assert_eq!(v["primary"], "n1");
        let back: ModeRequest =
            serde_json::from_str(r#"{"mode":"masterless","base_index":1,"epoch":2}"#).unwrap();
        assert_eq!(back, ModeRequest::new(Mode::Masterless, 1, 2));
        assert!(serde_json::from_str::<ModeRequest>(
            r#"{"mode":"masterless","base_index":1,"epoch":2,"x":1}"#
        )
        .is_err());
    }

    #[test]
    fn a_transfer_waits_ten_seconds_by_default() {
        let r: TransferRequest = serde_json::from_str(r#"{"to":"http://a"}"#).unwrap();
        assert_eq!(r.timeout_ms, 10_000);
    }
}
