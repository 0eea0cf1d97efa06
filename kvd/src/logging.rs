//! The node's log: `tracing` events on stderr, filtered by `KVD_LOG`, as
//! text or JSON lines (`--log-format`); the subscriber is the one kvsup
//! also installs (`kvproto::logging`). The node's id is in the `node`
//! field of its events.

use anyhow::{anyhow, Result};
pub use kvproto::logging::LogFormat;

/// The environment variable that holds the log filter.
pub const FILTER_ENV: &str = "KVD_LOG";

/// Installs the process's log subscriber; fails on a filter that does not
/// parse, naming the variable.
pub fn init(format: LogFormat) -> Result<()> {
    kvproto::logging::init(FILTER_ENV, format).map_err(|e| anyhow!(e))
}
