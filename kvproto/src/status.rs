//! The `/v1/status` body, and the short status the mode-switch endpoints
//! answer with.
//!
//! Fields are declared in alphabetical order: the bodies were JSON maps,
//! which serde_json writes sorted, and typed bodies keep that order (a
//! [`Timestamp`] inside is written in its own field order).

use serde::{Deserialize, Serialize};

use crate::{or_switching, Mode, Timestamp};

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub applied_index: u64,
    pub commit_index: u64,
    /// Primary/secondary: the configuration in effect (docs/DESIGN.md
    /// §4.11). Absent in other modes and from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::members::Members>,
    pub data_dir: String,
    /// Content digest (XOR of per-entry hashes), 16 hex digits.
    pub digest: String,
    pub epoch: u64,
    /// The node's hybrid logical clock.
    pub hlc: Timestamp,
    /// With `--index`.
    pub index: Option<IndexStatus>,
    pub keys: u64,
    pub last_index: u64,
    pub last_log_epoch: u64,
    /// In masterless mode.
    pub masterless: Option<MasterlessStatus>,
    pub memory: Memory,
    /// `None` ("switching") between two modes during a live switch.
    #[serde(with = "or_switching")]
    pub mode: Option<Mode>,
    pub node_id: String,
    pub peers: Peers,
    /// Primary/secondary: the primary's base URL, when known.
    pub primary: Option<String>,
    /// Re-seeded after losing its data and not caught up yet: no votes,
    /// no promotion (docs/DESIGN.md §4.10). Absent from older nodes.
    #[serde(default)]
    pub rejoining: bool,
    pub role: Role,
    pub snapshot_index: u64,
    /// What went wrong, when `storage_state` is not `ok`.
    pub storage_detail: Option<String>,
    /// `storage_state` is not `ok`: the node refuses writes.
    pub storage_poisoned: bool,
    pub storage_state: StorageState,
    pub uptime_seconds: u64,
    pub version: String,
    /// Primary/secondary: whether this node is a voter of its
    /// configuration in effect. Absent in other modes and from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voter: Option<bool>,
    pub wal_bytes: u64,
    pub wal_segments: u64,
    /// Paused for a mode switch.
    pub writes_paused: bool,
}

/// What a node is in its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes (a single node is its own primary).
    Primary,
    /// Follows a primary; redirects writes to it.
    Secondary,
    /// Masterless: every node takes writes.
    Peer,
}

/// Whether a node's storage takes writes, and if not, why. Anything but
/// `Ok` lasts until a restart re-reads what is really on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageState {
    #[default]
    Ok,
    /// A WAL write or fsync failed: the kernel may have dropped its pages.
    Poisoned,
    /// The data dir, its `LOCK` or `wal/` was removed or replaced.
    DataDirLost,
}

impl StorageState {
    pub const ALL: [StorageState; 3] = [
        StorageState::Ok,
        StorageState::Poisoned,
        StorageState::DataDirLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StorageState::Ok => "ok",
            StorageState::Poisoned => "poisoned",
            StorageState::DataDirLost => "data_dir_lost",
        }
    }
}

/// The data set against `--max-memory-mib`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub data_set_bytes: u64,
    pub max_bytes: Option<u64>,
}

/// The search index (`--index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexStatus {
    pub documents: u64,
    pub memory_bytes: u64,
    pub postings: u64,
    pub stemming: bool,
    pub terms: u64,
}

/// The peers as the node's mode sees them: empty for a single node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Peers {
    Replication(Vec<ReplicaPeer>),
    Masterless(Vec<MasterlessPeer>),
}

impl Peers {
    pub fn len(&self) -> usize {
        match self {
            Peers::Replication(p) => p.len(),
            Peers::Masterless(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A peer as a primary/secondary node sees it (the match index is what a
/// primary knows the peer holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPeer {
    pub lag_entries: u64,
    pub last_ack_ms_ago: Option<u64>,
    pub match_index: u64,
    pub reachable: bool,
    pub url: String,
}

/// A peer as a masterless node sees it: what it holds of our stream, and
/// what we hold of its.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterlessPeer {
    /// Our log index the peer holds durably, once it said.
    pub acked_index: Option<u64>,
    /// The last anti-entropy round found every bucket equal.
    pub in_sync: bool,
    pub lag_entries: u64,
    pub last_ack_ms_ago: Option<u64>,
    /// Once a digest answer told us.
    pub node_id: Option<String>,
    pub reachable: bool,
    pub received_hlc: Option<Timestamp>,
    pub received_through: Option<u64>,
    /// The peer's stable time, from its last digest answer.
    pub stable: Timestamp,
    pub stream_gap: Option<bool>,
    pub url: String,
}

/// The masterless part of the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterlessStatus {
    /// The node's debug wall-clock offset.
    pub clock_offset_ms: i64,
    pub global_stable_time: Timestamp,
    /// Digest of the last-write-wins stamps, 16 hex digits.
    pub lww_digest: String,
    pub peers: Vec<MasterlessPeer>,
    pub purged_tombstones: u64,
    pub repaired_versions: u64,
    pub stable_time: Timestamp,
    pub stream_gaps_total: u64,
    pub tombstones: u64,
    pub write_quorum: u64,
}

/// What `pause_writes`, `resume_writes` and `mode` answer: enough to tell
/// whether the nodes are identical and quiet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchStatus {
    pub applied_index: u64,
    pub commit_index: u64,
    pub digest: String,
    pub epoch: u64,
    pub hlc: Timestamp,
    pub last_index: u64,
    #[serde(with = "or_switching")]
    pub mode: Option<Mode>,
    pub node_id: String,
    pub writes_paused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_status() -> Status {
        Status {
            applied_index: 3,
            commit_index: 3,
            config: Some(crate::members::Members {
                committed: true,
                index: 0,
                learners: vec![],
                voters: vec!["http://127.0.0.1:0".into(), "http://127.0.0.1:1".into()],
            }),
            data_dir: "d".into(),
            digest: "00000000000000ff".into(),
            epoch: 2,
            hlc: Timestamp::default(),
            index: None,
            keys: 1,
            last_index: 3,
            last_log_epoch: 2,
            masterless: None,
            memory: Memory {
                data_set_bytes: 60,
                max_bytes: None,
            },
            mode: Some(Mode::PrimarySecondary),
            node_id: "n0".into(),
            peers: Peers::Replication(vec![ReplicaPeer {
                lag_entries: 0,
                last_ack_ms_ago: Some(4),
                match_index: 3,
                reachable: true,
                url: "http://127.0.0.1:1".into(),
            }]),
            primary: Some("http://127.0.0.1:0".into()),
            rejoining: false,
            role: Role::Primary,
            snapshot_index: 0,
            storage_detail: None,
            storage_poisoned: false,
            storage_state: StorageState::Ok,
            uptime_seconds: 9,
            version: "0.1.0".into(),
            voter: Some(true),
            wal_bytes: 100,
            wal_segments: 1,
            writes_paused: false,
        }
    }

    #[test]
    fn a_status_writes_its_fields_in_the_order_of_a_sorted_json_map() {
        let s = replica_status();
        let typed = serde_json::to_string(&s).unwrap();
        let value: serde_json::Value = serde_json::from_str(&typed).unwrap();
        // serde_json's map is sorted: re-serialising the value sorts keys
        // (the timestamps' too, which the typed body writes in field order).
        let sorted_ts = r#"{"logical":0,"node":0,"physical_ms":0}"#;
        let typed_ts = r#"{"physical_ms":0,"logical":0,"node":0}"#;
        assert_eq!(typed, value.to_string().replace(sorted_ts, typed_ts));
        assert_eq!(serde_json::from_str::<Status>(&typed).unwrap(), s);
        assert_eq!(value["mode"], "primary-secondary");
        assert_eq!(value["storage_state"], "ok");
        assert_eq!(value["peers"][0]["match_index"], 3);
    }

    #[test]
    fn masterless_peers_read_back_as_masterless() {
        let peer = MasterlessPeer {
            acked_index: None,
            in_sync: false,
            lag_entries: 2,
            last_ack_ms_ago: None,
            node_id: Some("n1".into()),
            reachable: true,
            received_hlc: Some(Timestamp::default()),
            received_through: Some(0),
            stable: Timestamp::default(),
            stream_gap: Some(false),
            url: "u".into(),
        };
        let mut s = replica_status();
        s.mode = None;
        s.role = Role::Peer;
        s.peers = Peers::Masterless(vec![peer]);
        let typed = serde_json::to_string(&s).unwrap();
        let value: serde_json::Value = serde_json::from_str(&typed).unwrap();
        assert_eq!(value["mode"], "switching");
        assert_eq!(value["role"], "peer");
        assert_eq!(serde_json::from_str::<Status>(&typed).unwrap(), s);
    }
}
