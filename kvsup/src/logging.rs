//! The daemon's log: `tracing` events on stderr (the daemon's stderr is
//! `<stateDir>/kvsup.log`), filtered by `KVSUP_LOG`, as text or JSON lines
//! (`--log-format`); the subscriber is the one kvd also installs
//! (`kvproto::logging`).
//!
//! The `kvsup events` log is not this: it is a product feature, kept by the
//! daemon and served over its API; each event is also logged here.

use anyhow::{anyhow, Result};
pub use kvproto::logging::LogFormat;

/// The environment variable that holds the log filter.
pub const FILTER_ENV: &str = "KVSUP_LOG";

/// Installs the process's log subscriber; fails on a filter that does not
/// parse, naming the variable.
pub fn init(format: LogFormat) -> Result<()> {
    kvproto::logging::init(FILTER_ENV, format).map_err(|e| anyhow!(e))
}
