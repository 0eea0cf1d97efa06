//! The `kvclient` command line: arguments, output formats and exit codes.
//!
//! Contract: stdout carries only the result (raw value bytes for `get`, one
//! line for writes, JSON with `--json`); every failure is exactly one line on
//! stderr starting with `kvclient: `, and the exit status tells "key not
//! found" (1) apart from every other failure (2), so scripts can branch
//! without parsing text.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use kvclient::lock::LockOptions;
use kvclient::{
    BulkRequest, Client, Expiry, Precondition, PutOptions, TlsFiles, WatchRequest, WireValue,
    DEFAULT_ENDPOINT,
};
use serde_json::{json, Value};

mod lock;
mod watch;

/// Hard-wrapped by hand: the workspace builds clap without `wrap_help`.
const LONG_ABOUT: &str = "\
Command-line client for kvstore, a replicated persistent key-value store.

Talks to any node of a cluster: a write sent to a secondary follows its
redirect to the primary, and failed connections, timeouts and 503 answers
are retried on the next endpoint with backoff until --timeout-ms runs out.

Output goes to stdout: the raw value bytes for `get` (no newline added, so
binary values round-trip), a one-line summary for writes, or JSON with --json.

Exit status:
  0  success
  1  `get`: the key does not exist
  2  any other failure: bad arguments, unreachable cluster, server error
  3  a precondition failed (`set --if-version`/`--if-absent`,
     `del --if-version`): nothing was written
  4  `lock`: the lock was lost while the command ran (it was stopped)
  5  `lock`: the lock was not taken within --wait-ms
`lease` exits 1 for a lease that is not alive; `watch` exits 2 once the
node no longer holds the index it would resume from; otherwise `lock` exits
with the command's own exit status.
A failure prints one line on stderr, starting with \"kvclient: \".";

const GET_ABOUT: &str = "\
Print the value stored under KEY as raw bytes, without a trailing newline.
With --json, print {\"key\": KEY, \"value\": V} where V is a string for UTF-8
values and {\"base64\": \"...\"} otherwise. With --show-version, print that
JSON with the key's versions added (create_index, mod_index, version, etag),
--json or not; mod_index is what `set --if-version` takes.
Exits 1 if the key does not exist.";

const LS_ABOUT: &str = "\
List the keys that start with PREFIX (all keys without one), in byte order,
reading page after page until the end or --limit.

One line per key: KEY<TAB>VALUE, or KEY with --keys-only. In both, a
backslash, tab, line feed and carriage return are written as \\\\, \\t, \\n,
\\r, and any other control byte or byte that is not UTF-8 as \\xNN, so every
line is one key. With --json, one JSON object per line: {\"key\", \"value\",
\"create_index\", \"mod_index\", \"version\"}, the value as a string or
{\"base64\": \"...\"}.";

const LOCK_ABOUT: &str = "\
Take the lock NAME (a key attached to a lease), run CMD while keeping the
lease alive, and release the lock when CMD exits; exit with CMD's status.
CMD gets KV_LOCK_KEY (NAME), KV_LOCK_TOKEN (the fencing token: the key's
mod_index, larger for every holder) and KV_LOCK_LEASE in its environment.
If the lock is lost meanwhile, CMD gets SIGTERM (SIGKILL 5 s later) and
kvclient exits 4. Not taken within --wait-ms: exit 5. SIGTERM or SIGINT to
kvclient is passed on to CMD; the lock is released once CMD exits.";

const WATCH_ABOUT: &str = "\
Print the changes to the keys under PREFIX (every key without one), or to
--key K, one line per event as it happens, until interrupted:
  TYPE INDEX KEY[ VALUE]
(TYPE put, delete or expire; the value of a put; fields escaped as `ls`
does). With --json, each event's JSON on one line, progress events too.
Broken connections are resumed on the next endpoint from the last event,
for up to a minute (or --timeout-ms if longer) of failures in a row. When
the node no longer holds the index to resume from, exit 2 naming the
oldest index it holds.";

const TXN_ABOUT: &str = "\
Run a transaction: read its JSON body from FILE or standard input,
  {\"compare\": [{\"key\", \"target\", \"op\", \"value\"}, ...],
   \"success\": [{\"put\": {\"key\", \"value\"}}, ...], \"failure\": [...]}
(docs/DESIGN.md section 2.13), send it as it is, and print the answer JSON
{\"succeeded\", \"index\", \"results\"}. Which branch ran is the answer's
\"succeeded\" (the exit status is 0 either way).";

const BULK_ABOUT: &str = "\
Write many keys in one atomic batch: after success, or after a crash,
either all items exist or none do.

The input is the API's JSON document
  {\"items\": [{\"key\": K, \"value\": V}, ...]}
where V is a UTF-8 string or {\"base64\": \"...\"}; an item may add \"ttl_ms\",
\"lease\" or \"keep_ttl\" (docs/DESIGN.md section 2.15). With --kv it is lines of
KEY=VALUE instead: split at the first '=', nothing trimmed, blank lines
skipped.";

/// Parsed command line.
#[derive(Debug, Parser)]
#[command(
    name = "kvclient",
    version,
    about = "Command-line client for kvstore",
    long_about = LONG_ABOUT
)]
pub struct Cli {
    /// Base URLs of the nodes, comma-separated; tried in order, writes
    /// follow the primary
    #[arg(
        long,
        env = "KV_ENDPOINTS",
        hide_env_values = true,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT,
        global = true
    )]
    endpoints: Vec<String>,

    /// Give up after this many milliseconds (at most an hour), counting
    /// every retry and redirect
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000),
        global = true
    )]
    timeout_ms: u64,

    /// Retries after a failed attempt (connection error, timeout, 503);
    /// 0 tries once
    #[arg(long, value_name = "N", default_value_t = 8, global = true)]
    retries: u32,

    /// Print machine-readable JSON instead of human output
    #[arg(long, global = true)]
    json: bool,

    /// CA certificates (PEM) that https:// nodes' certificates must chain
    /// to. Like --cert and --key, given before the command (`watch` and
    /// `similar` have a --key of their own)
    #[arg(long = "ca", env = "KV_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present when a node asks (needs --key)
    #[arg(
        long = "cert",
        env = "KV_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --cert
    #[arg(
        long = "key",
        env = "KV_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// Bearer token to send to nodes that ask for one (a node's
    /// --auth-file); better through KV_TOKEN or --token-file than on the
    /// command line, where other users can see it
    #[arg(long, env = "KV_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// File holding the bearer token (its first line)
    #[arg(
        long,
        env = "KV_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the value stored under KEY (exit 1 if there is none)
    #[command(
        long_about = GET_ABOUT
    )]
    Get {
        /// The key (UTF-8, 1 to 1024 bytes, no NUL)
        key: String,
        /// Linearizable read: the primary confirms with a majority that it is
        /// still primary before answering
        #[arg(long)]
        consistent: bool,
        /// Print JSON with the key's versions (create_index, mod_index,
        /// version, etag)
        #[arg(long)]
        show_version: bool,
    },

    /// Store a value under KEY
    Set(SetArgs),

    /// Delete KEY (succeeds whether or not it existed), or every key
    /// under --prefix
    Del(DelArgs),

    /// List keys in order, with their values
    #[command(long_about = LS_ABOUT)]
    Ls(LsArgs),

    /// Run a transaction from its JSON (compares, success and failure ops)
    #[command(long_about = TXN_ABOUT)]
    Txn {
        /// File to read the JSON from; '-' (the default) reads standard input
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: String,
    },

    /// Write many keys in one atomic batch
    #[command(
        long_about = BULK_ABOUT
    )]
    Bulk {
        /// File to read the items from; '-' (the default) reads standard input
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: String,
        /// Read KEY=VALUE lines instead of a JSON document
        #[arg(long)]
        kv: bool,
    },

    /// Show the answering node's status (id, mode, role, epoch, indexes, peers)
    Status,

    /// Grant, keep alive, revoke or show a lease
    #[command(subcommand)]
    Lease(LeaseCommand),

    /// Run a command while holding a lock (exit 4 if lost, 5 if not taken)
    #[command(long_about = LOCK_ABOUT)]
    Lock(LockArgs),

    /// Print changes to keys as they happen, resuming by itself
    #[command(long_about = WATCH_ABOUT)]
    Watch(WatchArgs),

    /// Full-text search over values, best match first (needs kvd --index)
    Search {
        /// Words to search for
        query: String,
        /// Most hits to return
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Skip this many best hits (the next page starts at the previous
        /// page's offset plus its hits)
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },

    /// Keys whose values are most similar to QUERY, or to KEY's value with
    /// --key (needs kvd --index)
    Similar {
        /// Text to compare values against
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        query: Option<String>,
        /// Compare against this key's value instead ("more like this"; the
        /// key itself is left out)
        #[arg(long)]
        key: Option<String>,
        /// Most hits to return
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Skip this many best hits
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The key (UTF-8, 1 to 1024 bytes, no NUL)
    key: String,
    /// The value; '-' reads it from standard input (binary-safe)
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    value: Option<String>,
    /// Read the value from this file instead (binary-safe)
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Write only if the key's mod_index is N (as `get --show-version`
    /// prints it); else exit 3
    #[arg(long, value_name = "N", conflicts_with = "if_absent")]
    if_version: Option<u64>,
    /// Write only if the key does not exist yet; else exit 3
    #[arg(long)]
    if_absent: bool,
    /// The key expires N ms after the node takes the write
    #[arg(long, value_name = "N", group = "expiry")]
    ttl_ms: Option<u64>,
    /// The key lives as long as lease ID (`lease grant`)
    #[arg(long, value_name = "ID", group = "expiry")]
    lease: Option<u64>,
    /// The key keeps the deadline or lease it had
    #[arg(long, group = "expiry")]
    keep_ttl: bool,
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Grant a lease of TTL_MS milliseconds; print its id
    Grant {
        /// Its TTL in milliseconds
        #[arg(value_name = "TTL_MS")]
        ttl_ms: u64,
    },
    /// Move a lease's deadline to now + its TTL; print the answer JSON
    Keepalive {
        /// The lease
        id: u64,
    },
    /// End a lease and delete its keys; print the answer JSON
    Revoke {
        /// The lease
        id: u64,
    },
    /// Print a lease's TTL, time left and keys as JSON
    Show {
        /// The lease
        id: u64,
    },
}

#[derive(Debug, Args)]
struct LockArgs {
    /// The lock's key
    name: String,
    /// The lease's TTL: how long the lock outlives a kvclient that died
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(3..=kvclient::MAX_TTL_MS))]
    ttl_ms: u64,
    /// Give up (exit 5) if the lock is not taken within N ms; default: wait
    #[arg(long, value_name = "N")]
    wait_ms: Option<u64>,
    /// The command and its arguments, after --
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Watch the keys that start with this (default: every key)
    #[arg(default_value = "", conflicts_with = "key")]
    prefix: String,
    /// Watch this one key instead
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// Start at this log index (default: the changes after the watch starts)
    #[arg(long, value_name = "N")]
    from_index: Option<u64>,
    /// Put, delete and expire events carry the previous value
    #[arg(long)]
    prev_value: bool,
}

#[derive(Debug, Args)]
struct DelArgs {
    /// The key to delete
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    key: Option<String>,
    /// Delete every key that starts with PREFIX instead, atomically
    #[arg(long, value_name = "PREFIX", conflicts_with = "if_version")]
    prefix: Option<String>,
    /// Delete only if the key's mod_index is N; else exit 3
    #[arg(long, value_name = "N")]
    if_version: Option<u64>,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// List the keys that start with this (default: every key)
    #[arg(default_value = "")]
    prefix: String,
    /// Print keys without values
    #[arg(long)]
    keys_only: bool,
    /// Print at most N keys
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Keys per request (1 to 10000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(kvclient::MAX_PAGE_SIZE))
    )]
    page_size: u32,
    /// Print only how many keys there are
    #[arg(long, conflicts_with_all = ["keys_only", "limit"])]
    count: bool,
}

/// How a command failed; decides the exit status and how the error prints.
enum Failure {
    /// `get` of an absent key: exit 1.
    NotFound(String),
    /// A conditional write whose precondition failed: exit 3.
    Precondition(kvclient::Error),
    /// A lease that is not alive: exit 1.
    NoLease(String),
    /// `lock`: lost while the command ran (4), not taken in time (5).
    Lock(u8, String),
    /// `lock`: the command's own failing status, nothing more to say.
    Status(u8),
    /// A client error: its Display is already one complete line (printing
    /// its source chain as well would repeat the root cause).
    Client(kvclient::Error),
    /// Local failures (files, stdin, input format), printed with context.
    Other(anyhow::Error),
}

impl From<kvclient::Error> for Failure {
    fn from(err: kvclient::Error) -> Self {
        match err {
            kvclient::Error::PreconditionFailed { .. } => Failure::Precondition(err),
            kvclient::Error::LeaseNotFound { .. } => Failure::NoLease(err.to_string()),
            kvclient::Error::LockTimeout { .. } => Failure::Lock(5, err.to_string()),
            err => Failure::Client(err),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Other(err)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(Failure::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::NotFound(key)) => {
            report(&format!("key not found: {key:?}"));
            ExitCode::from(1)
        }
        Err(Failure::Precondition(err)) => {
            report(&err.to_string());
            ExitCode::from(3)
        }
        Err(Failure::NoLease(message)) => {
            report(&message);
            ExitCode::from(1)
        }
        Err(Failure::Lock(code, message)) => {
            report(&message);
            ExitCode::from(code)
        }
        Err(Failure::Status(code)) => ExitCode::from(code),
        Err(Failure::Client(err)) => {
            report(&err.to_string());
            ExitCode::from(2)
        }
        Err(Failure::Other(err)) => {
            report(&format!("{err:#}"));
            ExitCode::from(2)
        }
    }
}

/// Keeps clap's own output for help and version (and for a bare
/// `kvclient`, where the help is the useful answer), but shortens usage
/// errors to the one-line failure contract; the exit status is 2 either way.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
        _ => {
            // clap's message is a paragraph, then usage and tips; the first
            // paragraph says what was wrong.
            let text = err.to_string();
            let first = text.split("\n\n").next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            report(&format!("{first} (see --help)"));
            ExitCode::from(2)
        }
    }
}

/// Prints the one-line error; newlines from nested messages are folded so
/// the line stays one line.
fn report(message: &str) {
    let line: Vec<&str> = message.split_whitespace().collect();
    eprintln!("kvclient: {}", line.join(" "));
}

fn build_client(cli: &Cli) -> Result<Client, Failure> {
    let budget = Duration::from_millis(cli.timeout_ms);
    let builder = Client::builder()
        .endpoints(cli.endpoints.iter().cloned())
        .request_timeout(budget)
        .connect_timeout(budget.min(Duration::from_secs(1)))
        .retry_deadline(budget)
        .max_retries(cli.retries)
        .tls(TlsFiles {
            ca: cli.tls_ca.clone(),
            cert: cli.tls_cert.clone(),
            key: cli.tls_key.clone(),
        });
    let builder = match token_of(cli)? {
        Some(t) => builder.token(t),
        None => builder,
    };
    Ok(builder.build()?)
}

/// The token of `--token`/`KV_TOKEN`, or the first line of `--token-file`.
fn token_of(cli: &Cli) -> Result<Option<String>, Failure> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.trim().to_string()));
    }
    let Some(path) = &cli.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::Other(anyhow::anyhow!(
            "reading the token file {}: {e}",
            path.display()
        ))
    })?;
    match text.lines().next().map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => Ok(Some(t.to_string())),
        None => Err(Failure::Other(anyhow::anyhow!(
            "the token file {} is empty",
            path.display()
        ))),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let client = build_client(&cli)?;
    let json = cli.json;
    match &cli.command {
        Command::Get {
            key,
            consistent,
            show_version,
        } => get(&client, json, key, *consistent, *show_version).await,
        Command::Set(args) => set(&client, json, args).await,
        Command::Del(args) => del(&client, json, args).await,
        Command::Ls(args) => ls(&client, json, args).await,
        Command::Txn { file } => txn(&client, file).await,
        Command::Bulk { file, kv } => bulk(&client, json, file, *kv).await,
        Command::Status => {
            let status = client.status().await?;
            if json {
                print_json(status.as_json())
            } else {
                write_stdout(render_status(status.as_json()).as_bytes())
            }
        }
        Command::Lease(command) => lease(&client, json, command).await,
        Command::Lock(args) => run_locked(&client, args).await,
        Command::Watch(args) => watch_keys(&client, json, &cli, args).await,
        Command::Search {
            query,
            limit,
            offset,
        } => {
            let page = client.search_page(query, *limit, *offset).await?;
            print_hits(json, &page)
        }
        Command::Similar {
            query,
            key,
            top_k,
            offset,
        } => {
            // clap insists on exactly one of the two.
            let to = match key {
                Some(k) => kvclient::SimilarTo::Key(k),
                None => kvclient::SimilarTo::Text(query.as_deref().unwrap_or_default()),
            };
            let page = client.similar_page(to, *top_k, *offset).await?;
            print_hits(json, &page)
        }
    }
}

async fn get(
    client: &Client,
    json: bool,
    key: &str,
    consistent: bool,
    show_version: bool,
) -> Result<(), Failure> {
    if show_version {
        let versioned = if consistent {
            client.get_versioned_consistent(key).await?
        } else {
            client.get_versioned(key).await?
        };
        let v = versioned.ok_or_else(|| Failure::NotFound(key.to_owned()))?;
        let mut doc = json!({
            "key": key,
            "value": WireValue::from_bytes(&v.value),
            "create_index": v.create_index,
            "mod_index": v.mod_index,
            "version": v.version,
            "etag": v.etag,
        });
        if let Some(ttl_ms) = v.ttl_ms {
            doc["ttl_ms"] = json!(ttl_ms);
        }
        if let Some(lease) = v.lease {
            doc["lease"] = json!(lease);
        }
        return print_json(&doc);
    }
    let value = if consistent {
        client.get_consistent(key).await?
    } else {
        client.get(key).await?
    };
    let value = value.ok_or_else(|| Failure::NotFound(key.to_owned()))?;
    if json {
        print_json(&json!({"key": key, "value": WireValue::from_bytes(&value)}))
    } else {
        write_stdout(&value)
    }
}

async fn set(client: &Client, json: bool, args: &SetArgs) -> Result<(), Failure> {
    let value = read_value(args)?;
    let precondition = match (args.if_version, args.if_absent) {
        (Some(n), _) => Some(Precondition::ModIndex(n)),
        (None, true) => Some(Precondition::Absent),
        (None, false) => None,
    };
    let expiry = match (args.ttl_ms, args.lease, args.keep_ttl) {
        (Some(ms), _, _) => Some(Expiry::ttl_ms(ms)),
        (None, Some(id), _) => Some(Expiry::Lease(id)),
        (None, None, true) => Some(Expiry::KeepTtl),
        (None, None, false) => None,
    };
    let mut options = PutOptions::new().expiry(expiry);
    if let Some(pre) = precondition {
        options = options.precondition(pre);
    }
    let index = client.put(&args.key, value, options).await?;
    if json {
        print_json(&json!({"index": index}))
    } else {
        print_line(&format!("OK (index {index})"))
    }
}

async fn lease(client: &Client, json: bool, command: &LeaseCommand) -> Result<(), Failure> {
    match command {
        LeaseCommand::Grant { ttl_ms } => {
            let answer = client
                .lease_grant_answer(Duration::from_millis(*ttl_ms))
                .await?;
            if json {
                print_json(&json!(answer))
            } else {
                print_line(&answer.id.to_string())
            }
        }
        LeaseCommand::Keepalive { id } => print_json(&json!(client.lease_keepalive(*id).await?)),
        LeaseCommand::Revoke { id } => print_json(&json!(client.lease_revoke_answer(*id).await?)),
        LeaseCommand::Show { id } => match client.lease_info(*id).await? {
            Some(info) => print_json(&json!(info)),
            None => Err(Failure::NoLease(format!("lease {id} is not alive"))),
        },
    }
}

async fn run_locked(client: &Client, args: &LockArgs) -> Result<(), Failure> {
    let options = LockOptions {
        ttl: Duration::from_millis(args.ttl_ms),
        wait: args.wait_ms.map(Duration::from_millis),
    };
    match lock::run(client, &args.name, options, &args.cmd).await {
        Ok(lock::Outcome::Exited(0)) => Ok(()),
        Ok(lock::Outcome::Exited(code)) => Err(Failure::Status(code)),
        Ok(lock::Outcome::Interrupted(code)) => Err(Failure::Lock(
            code,
            format!("interrupted before the lock {:?} was taken", args.name),
        )),
        Ok(lock::Outcome::Lost) => Err(Failure::Lock(
            4,
            format!(
                "lost the lock {:?} while the command ran; it was stopped",
                args.name
            ),
        )),
        Err(lock::Error::Client(err)) => Err(err.into()),
        Err(lock::Error::Local(err)) => Err(err.into()),
    }
}

/// How long `watch` rides out failures in a row: a node restart, a
/// failover.
const WATCH_RECONNECT: Duration = Duration::from_secs(60);

async fn watch_keys(
    client: &Client,
    json: bool,
    cli: &Cli,
    args: &WatchArgs,
) -> Result<(), Failure> {
    let mut request = match &args.key {
        Some(key) => WatchRequest::key(key.as_str()),
        None => WatchRequest::prefix(args.prefix.as_str()),
    }
    .prev_value(args.prev_value)
    .reconnect_budget(WATCH_RECONNECT.max(Duration::from_millis(cli.timeout_ms)));
    if let Some(n) = args.from_index {
        request = request.from_index(n);
    }
    let mut events = client.watch(request);
    loop {
        let event = events.next().await?;
        let Some(line) = watch::line(&event, json, escape_field) else {
            continue;
        };
        // Flushed per event: the reader sees each as it happens.
        if !write_out(format!("{line}\n").as_bytes())? {
            return Ok(());
        }
    }
}

async fn del(client: &Client, json: bool, args: &DelArgs) -> Result<(), Failure> {
    if let Some(prefix) = &args.prefix {
        let outcome = client.delete_prefix(prefix).await?;
        return if json {
            print_json(&json!(outcome))
        } else {
            let keys = if outcome.deleted == 1 { "key" } else { "keys" };
            print_line(&format!(
                "deleted {} {keys} (index {})",
                outcome.deleted, outcome.index
            ))
        };
    }
    // clap insists on a key without --prefix.
    let key = args.key.as_deref().unwrap_or_default();
    let outcome = match args.if_version {
        Some(n) => client.delete_if(key, Precondition::ModIndex(n)).await?,
        None => client.delete(key).await?,
    };
    if json {
        print_json(&json!(outcome))
    } else if outcome.deleted {
        print_line(&format!("deleted (index {})", outcome.index))
    } else {
        print_line(&format!("not found (index {})", outcome.index))
    }
}

/// Prints the range page by page, so memory stays one page whatever the
/// range's size, and stops early once --limit keys are out or the reader
/// went away (`kvclient ls | head`).
async fn ls(client: &Client, json: bool, args: &LsArgs) -> Result<(), Failure> {
    let request = client.list(args.prefix.as_str()).keys_only(args.keys_only);
    if args.count {
        let count = request.count().await?;
        return if json {
            print_json(&json!({"count": count}))
        } else {
            print_line(&count.to_string())
        };
    }
    let mut left = args.limit.unwrap_or(u64::MAX);
    // A small --limit needs no more keys from the node than it prints.
    let page_size = u32::try_from(left).map_or(args.page_size, |l| l.clamp(1, args.page_size));
    let mut pager = request.page_size(page_size).pager();
    while left > 0 {
        let Some(page) = pager.next_page().await? else {
            break;
        };
        let take = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(page.items.len());
        let mut out = Vec::new();
        for item in &page.items[..take] {
            ls_line(&mut out, item, json, args.keys_only);
        }
        left -= take as u64;
        if !write_out(&out)? {
            break;
        }
    }
    Ok(())
}

/// One `ls` line for `item`.
fn ls_line(out: &mut Vec<u8>, item: &kvclient::Item, json: bool, keys_only: bool) {
    if json {
        out.extend_from_slice(json!(item).to_string().as_bytes());
    } else {
        out.extend_from_slice(escape_field(item.key.as_bytes()).as_bytes());
        if let (false, Some(value)) = (keys_only, &item.value) {
            out.push(b'\t');
            out.extend_from_slice(escape_field(value).as_bytes());
        }
    }
    out.push(b'\n');
}

/// The bytes as one field of a line: printable UTF-8 as it is; a
/// backslash, tab, line feed, carriage return as `\\`, `\t`, `\n`, `\r`;
/// other control bytes and bytes that are not UTF-8 as `\xNN`. Lossless,
/// and the result holds no tab or newline.
fn escape_field(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() && c.is_ascii() => {
                    out.push_str(&format!("\\x{:02x}", u32::from(c)));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

async fn txn(client: &Client, file: &str) -> Result<(), Failure> {
    let input = read_input(file)?;
    let body: Value = serde_json::from_slice(&input)
        .context("parsing the transaction JSON (docs/DESIGN.md section 2.13)")?;
    let answer = client.txn_json(&body, may_compare(&body)).await?;
    print_json(&json!(answer))
}

/// Whether a transaction body may hold compares, which makes its retries
/// those of a conditional write: anything but a missing or empty
/// `compare` (the safe side when unsure).
fn may_compare(body: &Value) -> bool {
    match body.get("compare") {
        None => false,
        Some(Value::Array(list)) => !list.is_empty(),
        Some(_) => true,
    }
}

async fn bulk(client: &Client, json: bool, file: &str, kv: bool) -> Result<(), Failure> {
    let input = read_input(file)?;
    let request = if kv {
        BulkRequest::from_pairs(&parse_kv_lines(&input)?)
    } else {
        parse_bulk_json(&input)?
    };
    if request.items.is_empty() {
        // Almost always an empty file or a forgotten pipe, not intent.
        return Err(anyhow::anyhow!("bulk input has no items").into());
    }
    // Sent as read: items keep their ttl_ms, lease or keep_ttl.
    let outcome = client.bulk(&request).await?;
    if json {
        print_json(&json!(outcome))
    } else {
        print_line(&format!(
            "OK: {} keys (index {})",
            outcome.count, outcome.index
        ))
    }
}

fn read_value(args: &SetArgs) -> Result<Bytes, Failure> {
    match (&args.value, &args.file) {
        (Some(value), _) if value == "-" => Ok(read_input("-")?.into()),
        (Some(value), _) => Ok(Bytes::copy_from_slice(value.as_bytes())),
        (None, Some(path)) => {
            let data = std::fs::read(path)
                .with_context(|| format!("reading value file {}", path.display()))?;
            Ok(data.into())
        }
        // clap's required_unless_present rules this out; kept as an error
        // rather than a panic in case the attributes ever change.
        (None, None) => Err(anyhow::anyhow!("set needs a VALUE or --file").into()),
    }
}

/// Reads a whole file, or standard input for `-`.
fn read_input(file: &str) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    if file == "-" {
        io::stdin()
            .lock()
            .read_to_end(&mut data)
            .context("reading standard input")?;
    } else {
        data = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    }
    Ok(data)
}

/// Parses the API's bulk document, so a file can be replayed with curl
/// too; every value is checked to decode.
fn parse_bulk_json(input: &[u8]) -> Result<BulkRequest, Failure> {
    let doc: BulkRequest = serde_json::from_slice(input).context(
        "parsing bulk JSON (expected {\"items\": [{\"key\": ..., \"value\": ...}]}, or use --kv)",
    )?;
    doc.to_pairs()?;
    Ok(doc)
}

/// Parses `KEY=VALUE` lines: split at the first `=` (so values may contain
/// `=`, keys may not), nothing trimmed except a CRLF line ending, blank lines
/// skipped.
fn parse_kv_lines(input: &[u8]) -> anyhow::Result<Vec<(String, Bytes)>> {
    let text = std::str::from_utf8(input).context("--kv input is not UTF-8")?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: expected KEY=VALUE", n + 1);
        };
        items.push((key.to_owned(), Bytes::copy_from_slice(value.as_bytes())));
    }
    Ok(items)
}

fn print_hits(json_output: bool, page: &kvclient::SearchPage) -> Result<(), Failure> {
    if json_output {
        return print_json(&json!({
            "hits": page.hits,
            "total": page.total,
            "next_offset": page.next_offset,
        }));
    }
    let mut out = String::new();
    for hit in &page.hits {
        out.push_str(&format!("{:>10.4}  {}\n", hit.score, hit.key));
    }
    write_stdout(out.as_bytes())
}

/// Human rendering of a status document: the well-known fields first, then
/// the rest; nested objects and lists (peers) one item per indented line.
/// Works on any JSON so that new server fields show up without a client
/// release.
fn render_status(status: &Value) -> String {
    const FIRST: [&str; 7] = [
        "node_id",
        "mode",
        "role",
        "epoch",
        "last_index",
        "commit_index",
        "keys",
    ];
    let Value::Object(map) = status else {
        return format!("{}\n", pretty(status));
    };
    // The rest sorted explicitly: the map's own order depends on whether
    // some crate in the build enables serde_json's `preserve_order`.
    let mut rest: Vec<&String> = map
        .keys()
        .filter(|k| !FIRST.contains(&k.as_str()))
        .collect();
    rest.sort();
    let names: Vec<&String> = FIRST
        .iter()
        .filter_map(|name| map.get_key_value(*name).map(|(k, _)| k))
        .chain(rest)
        .collect();
    let width = names.iter().map(|k| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for name in names {
        match &map[name.as_str()] {
            Value::Array(items) if !items.is_empty() => {
                out.push_str(&format!("{name}:\n"));
                for item in items {
                    out.push_str(&format!("  - {}\n", inline(item)));
                }
            }
            Value::Object(fields) if !fields.is_empty() => {
                out.push_str(&format!("{name}:\n"));
                for (k, v) in fields {
                    out.push_str(&format!("  {k}: {}\n", inline(v)));
                }
            }
            Value::Array(_) | Value::Object(_) => {
                out.push_str(&format!("{name:<width$}  (none)\n"));
            }
            scalar => out.push_str(&format!("{name:<width$}  {}\n", inline(scalar))),
        }
    }
    out
}

/// One value on one line: plain scalars, `k=v` pairs for flat objects,
/// compact JSON for anything deeper.
fn inline(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::Object(fields) if fields.values().all(|v| !v.is_object() && !v.is_array()) => fields
            .iter()
            .map(|(k, v)| format!("{k}={}", inline(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(_) | Value::Object(_) => value.to_string(),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn print_json(value: &Value) -> Result<(), Failure> {
    print_line(&pretty(value))
}

fn print_line(line: &str) -> Result<(), Failure> {
    write_stdout(format!("{line}\n").as_bytes())
}

fn write_stdout(data: &[u8]) -> Result<(), Failure> {
    write_out(data).map(|_| ())
}

/// Writes to stdout; `false` once the reader went away (`kvclient get k |
/// head -c 10`): the command itself succeeded, so that is no failure, but
/// there is no point in producing more.
fn write_out(data: &[u8]) -> Result<bool, Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(data).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(anyhow::Error::new(err).context("writing to stdout").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kv_lines_split_at_first_equals() {
        let items = parse_kv_lines(b"a=1\r\n\nb==x=y\nc=\n").unwrap();
        assert_eq!(
            items,
            vec![
                ("a".to_owned(), Bytes::from_static(b"1")),
                ("b".to_owned(), Bytes::from_static(b"=x=y")),
                ("c".to_owned(), Bytes::new()),
            ]
        );
        let err = parse_kv_lines(b"a=1\nnoequals\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: expected KEY=VALUE");
    }

    #[test]
    fn bulk_json_accepts_text_and_base64() {
        let items = parse_bulk_json(
            br#"{"items":[{"key":"a","value":"x"},{"key":"b","value":{"base64":"AAE="}}]}"#,
        )
        .ok()
        .unwrap()
        .to_pairs()
        .unwrap();
        assert_eq!(items[1].1, Bytes::from_static(&[0, 1]));
        assert!(parse_bulk_json(b"a=1").is_err());
    }

    #[test]
    fn status_renders_known_fields_first_and_peers_per_line() {
        let text = render_status(&json!({
            "zeta": true,
            "role": "primary",
            "node_id": "n0",
            "peers": [{"id": "n1", "lag": 0}, {"id": "n2", "lag": 3}],
            "empty": [],
        }));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "node_id  n0",
                "role     primary",
                "empty    (none)",
                "peers:",
                "  - id=n1 lag=0",
                "  - id=n2 lag=3",
                "zeta     true",
            ]
        );
    }

    #[test]
    fn ls_fields_escape_what_would_break_a_line() {
        assert_eq!(escape_field(b"plain text/\xc3\xa9"), "plain text/\u{e9}");
        assert_eq!(escape_field(b"a\tb\nc\rd\\e"), "a\\tb\\nc\\rd\\\\e");
        assert_eq!(escape_field(b"\x00\x1f\x7f"), "\\x00\\x1f\\x7f");
        assert_eq!(escape_field(&[0xff, b'a', 0xc3]), "\\xffa\\xc3");
        assert_eq!(escape_field(b""), "");
        let key = kvclient::Item {
            key: "k\t1".into(),
            value: Some(Bytes::from_static(b"line\nbreak")),
            create_index: 1,
            mod_index: 2,
            version: 2,
            ttl_ms: None,
            lease: None,
        };
        let mut out = Vec::new();
        ls_line(&mut out, &key, false, false);
        ls_line(&mut out, &key, false, true);
        ls_line(&mut out, &key, true, false);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["k\\t1\tline\\nbreak", "k\\t1"]);
        assert_eq!(
            serde_json::from_str::<Value>(lines[2]).unwrap(),
            json!({"key": "k\t1", "value": "line\nbreak", "create_index": 1, "mod_index": 2, "version": 2})
        );
    }

    #[test]
    fn a_transaction_without_compares_is_retried_as_any_write() {
        assert!(!may_compare(
            &json!({"success": [{"put": {"key": "a", "value": "v"}}]})
        ));
        assert!(!may_compare(&json!({"compare": []})));
        assert!(may_compare(&json!({"compare": [{"key": "a"}]})));
        assert!(
            may_compare(&json!({"compare": "odd"})),
            "unsure: the safe side"
        );
    }

    #[test]
    fn conditional_and_prefix_flags_exclude_what_makes_no_sense() {
        let parses = |args: &[&str]| Cli::try_parse_from(args).is_ok();
        assert!(parses(&["kvclient", "set", "k", "v", "--if-version", "3"]));
        assert!(parses(&["kvclient", "set", "k", "v", "--if-absent"]));
        assert!(!parses(&[
            "kvclient",
            "set",
            "k",
            "v",
            "--if-absent",
            "--if-version",
            "3"
        ]));
        assert!(!parses(&[
            "kvclient",
            "set",
            "k",
            "v",
            "--if-version",
            "-1"
        ]));
        assert!(parses(&["kvclient", "del", "k", "--if-version", "3"]));
        assert!(parses(&["kvclient", "del", "--prefix", "p/"]));
        assert!(!parses(&["kvclient", "del"]));
        assert!(!parses(&["kvclient", "del", "k", "--prefix", "p/"]));
        assert!(!parses(&[
            "kvclient",
            "del",
            "--prefix",
            "p/",
            "--if-version",
            "3"
        ]));
        assert!(parses(&["kvclient", "ls"]));
        assert!(parses(&[
            "kvclient",
            "ls",
            "p/",
            "--keys-only",
            "--limit",
            "5"
        ]));
        assert!(!parses(&["kvclient", "ls", "--page-size", "0"]));
        assert!(!parses(&["kvclient", "ls", "--page-size", "10001"]));
        assert!(!parses(&["kvclient", "ls", "--count", "--limit", "5"]));
        assert!(parses(&[
            "kvclient",
            "get",
            "k",
            "--show-version",
            "--consistent"
        ]));
    }

    #[test]
    fn ttl_lease_lock_and_watch_flags_parse_as_documented() {
        let parses = |args: &[&str]| Cli::try_parse_from(args).is_ok();
        assert!(parses(&["kvclient", "set", "k", "v", "--ttl-ms", "500"]));
        assert!(parses(&[
            "kvclient",
            "set",
            "k",
            "v",
            "--lease",
            "7",
            "--if-absent"
        ]));
        assert!(parses(&["kvclient", "set", "k", "v", "--keep-ttl"]));
        assert!(!parses(&[
            "kvclient",
            "set",
            "k",
            "v",
            "--ttl-ms",
            "5",
            "--keep-ttl"
        ]));
        assert!(!parses(&[
            "kvclient", "set", "k", "v", "--ttl-ms", "5", "--lease", "1"
        ]));
        for sub in [
            &["grant", "1000"][..],
            &["keepalive", "3"],
            &["revoke", "3"],
            &["show", "3"],
        ] {
            let mut args = vec!["kvclient", "lease"];
            args.extend_from_slice(sub);
            assert!(parses(&args), "{args:?}");
        }
        assert!(!parses(&["kvclient", "lease", "grant"]));
        assert!(parses(&[
            "kvclient",
            "lock",
            "l",
            "--ttl-ms",
            "3000",
            "--wait-ms",
            "0",
            "--",
            "sh",
            "-c",
            "exit 3"
        ]));
        assert!(!parses(&["kvclient", "lock", "l"]), "no command");
        assert!(!parses(&[
            "kvclient", "lock", "l", "--ttl-ms", "2", "--", "true"
        ]));
        assert!(parses(&["kvclient", "watch"]));
        assert!(parses(&[
            "kvclient",
            "watch",
            "p/",
            "--from-index",
            "9",
            "--prev-value",
            "--json"
        ]));
        assert!(parses(&["kvclient", "watch", "--key", "k"]));
        assert!(!parses(&["kvclient", "watch", "p/", "--key", "k"]));
    }

    #[test]
    fn watch_lines_are_type_index_key_and_a_puts_value() {
        let event = |json: Value| kvclient::WatchEvent::from_json(json).unwrap();
        let put = event(
            json!({"type": "put", "index": 12, "key": "a\t1", "value": "x y", "create_index": 3, "mod_index": 12, "version": 2}),
        );
        assert_eq!(
            watch::line(&put, false, escape_field).unwrap(),
            "put 12 a\\t1 x y"
        );
        let gone = event(json!({"type": "expire", "index": 20, "key": "a/2", "prev_value": "y"}));
        assert_eq!(
            watch::line(&gone, false, escape_field).unwrap(),
            "expire 20 a/2"
        );
        let progress = event(json!({"type": "progress", "index": 25}));
        assert_eq!(watch::line(&progress, false, escape_field), None);
        assert_eq!(
            serde_json::from_str::<Value>(&watch::line(&progress, true, escape_field).unwrap())
                .unwrap(),
            json!({"type": "progress", "index": 25})
        );
    }

    #[test]
    fn set_value_and_file_are_exclusive() {
        assert!(Cli::try_parse_from(["kvclient", "set", "k"]).is_err());
        assert!(Cli::try_parse_from(["kvclient", "set", "k", "v", "--file", "f"]).is_err());
        assert!(Cli::try_parse_from(["kvclient", "set", "k", "--file", "f"]).is_ok());
        assert!(Cli::try_parse_from(["kvclient", "set", "k", "-"]).is_ok());
    }
}
