//! How kvd and kvsup log (feature `logging`): `tracing` events on stderr,
//! filtered by an environment variable in EnvFilter syntax (`debug`,
//! `kvd=debug,hyper=warn`; default `info`), as text for people or JSON
//! lines for machines. Text is coloured only when stderr is a terminal, so
//! a log file holds plain lines; in JSON an event's message is
//! `fields.message` and its other fields sit beside it.

/// The filter when the variable is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// One line per event: time, level, span, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The flag's value (to hand the same format to another process).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the process's log subscriber, its filter read from
/// `filter_env`; fails on a filter that does not parse, naming the
/// variable.
pub fn init(filter_env: &str, format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var(filter_env) {
        Ok(s) if !s.trim().is_empty() => s,
        _ => DEFAULT_FILTER.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("{filter_env}={filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| format!("installing the log subscriber: {e}"))
}
