//! The bodies of a primary/secondary cluster's configuration
//! (docs/DESIGN.md §4.11), shared by the members routes and the status.

use serde::{Deserialize, Serialize};

/// `GET /v1/admin/members`, the answer of `POST /v1/admin/members`, and
/// `config` in `/v1/status` (docs/DESIGN.md §4.11): the configuration in
/// effect on the node that answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Whether this node's commit index has reached `index`.
    pub committed: bool,
    /// The configuration record's log index; 0 for the bootstrap
    /// configuration (this node and `--peers`, all voters).
    pub index: u64,
    pub learners: Vec<String>,
    pub voters: Vec<String>,
}

/// `POST /v1/admin/members`: exactly one of the three actions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersRequest {
    /// Adds a node (its advertised base URL) as a learner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_learner: Option<String>,
    /// Makes a learner that has caught up a voter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<String>,
    /// Removes a member (voter or learner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<String>,
    /// How long to wait for the new configuration to commit (default
    /// `--commit-timeout-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}
