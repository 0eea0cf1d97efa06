//! The daemon's log: `tracing` events on stderr (the daemon's stderr is
//! `<stateDir>/kvsup.log`), filtered by `KVSUP_LOG` (EnvFilter syntax, such
//! as `debug` or `kvsup=debug,reqwest=warn`; default `info`), as text for
//! people or JSON lines for machines (`--log-format`).
//!
//! The `kvsup events` log is not this: it is a product feature, kept by the
//! daemon and served over its API; each event is also logged here.

use anyhow::{anyhow, Result};
use tracing_subscriber::EnvFilter;

/// The environment variable that holds the log filter.
pub const FILTER_ENV: &str = "KVSUP_LOG";

/// The filter when [`FILTER_ENV`] is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The flag's value, to hand the same format to a forked daemon.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
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
