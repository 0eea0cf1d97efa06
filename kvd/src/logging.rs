//! The node's log: `tracing` events on stderr, filtered by `KVD_LOG`
//! (EnvFilter syntax, such as `debug` or `kvd=debug,hyper=warn`; default
//! `info`), as text for people or JSON lines for machines (`--log-format`).
//!
//! Text is coloured only when stderr is a terminal, so a log file holds
//! plain lines. In JSON, an event's message is `fields.message` and its
//! other fields sit beside it; the node's id is in the `node` span.

use anyhow::{anyhow, Result};
use tracing_subscriber::EnvFilter;

/// The environment variable that holds the log filter.
pub const FILTER_ENV: &str = "KVD_LOG";

/// The filter when [`FILTER_ENV`] is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event: time, level, span, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process's log subscriber; fails on a filter that does not
/// parse, naming the variable.
pub fn init(format: LogFormat) -> Result<()> {
    let filter = match std::env::var(FILTER_ENV) {
        Ok(s) if !s.trim().is_empty() => s,
        _ => DEFAULT_FILTER.to_string(),
    };
    let filter =
        EnvFilter::try_new(&filter).map_err(|e| anyhow!("{FILTER_ENV}={filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow!("installing the log subscriber: {e}"))
}
