//! The model: the types every layer speaks in, with no I/O and no
//! dependency on anything else in kvd.
//!
//! - [`Op`] and [`Record`]: a write and a log entry (their WAL encoding is
//!   `storage::record`).
//! - [`Timestamp`]: a hybrid-logical-clock stamp (the wire type).
//! - [`LogPos`]: a position `(epoch, index)` in a replicated log.
//!
//! The pure rules of the bottom layer live beside the runtimes they govern
//! and import only this: `replication::rules` (votes, commit index, log
//! matching), `masterless::rules` (stream positions, stable time, quorum
//! counting) and `masterless::hlc` (the clock).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use kvproto::Timestamp;

/// What a record does to the key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: Bytes, value: Bytes },
    Delete { key: Bytes },
    Bulk { items: Vec<(Bytes, Bytes)> },
    Noop,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub epoch: u64,
    pub ts: Timestamp,
    pub op: Op,
}

/// A position in the log: the `(epoch, index)` of an entry.
///
/// The derived order compares `epoch` first, then `index` (field order
/// matters): that is Raft's "at least as up to date" order of two logs'
/// last entries. A log whose last entry has a newer epoch is more up to date
/// even if it is shorter, because entries of an older epoch that the newer
/// log lacks cannot be committed (a newer primary would have had them).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPos {
    pub epoch: u64,
    pub index: u64,
}

impl LogPos {
    /// The empty log's last position (the index-0 sentinel).
    pub const ZERO: LogPos = LogPos { epoch: 0, index: 0 };

    pub const fn new(epoch: u64, index: u64) -> LogPos {
        LogPos { epoch, index }
    }

    /// Raft's rule: is a log ending at `self` at least as up to date as one
    /// ending at `other`?
    pub fn at_least_as_up_to_date_as(&self, other: &LogPos) -> bool {
        self >= other
    }
}
