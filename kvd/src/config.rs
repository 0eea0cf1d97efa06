//! Command-line configuration of a node.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use kvproto::Mode;

use crate::logging::LogFormat;

/// kvd: a kvstore node. Serves get/set/delete and atomic bulk set over HTTP;
/// every acknowledged write is in a write-ahead log fsync'd before the reply.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "kvd",
    version,
    // `kvd restore ...` takes only its own flags; `kvd --port ...` serves.
    args_conflicts_with_subcommands = true,
    after_help = "Signals: SIGTERM or SIGINT stop the node gracefully (in-flight writes finish, exit 0).\n\
                  Exit status 1: the node could not start (data dir in use, corrupt data, port taken); \
                  the message says which and where."
)]
pub struct Config {
    /// Something else than serving (without one, kvd serves).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TCP port of the HTTP API.
    #[arg(long, default_value_t = 8765)]
    pub port: u16,

    /// Address to listen on. The default keeps the node private to this
    /// machine; any other needs TLS (--tls-cert, --tls-key) and tokens
    /// (--auth-file), or --insecure
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Serve a non-loopback --bind without TLS and tokens: only on a
    /// network where everyone who can reach the port may read and write
    /// every key and run the admin routes
    #[arg(long)]
    pub insecure: bool,

    /// Directory holding the WAL (wal/), snapshots (snap/), node metadata
    /// (meta) and the LOCK file. Created if missing; one kvd per directory.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,

    /// Name of this node, shown in /v1/status and metrics.
    #[arg(long, default_value = "n0")]
    pub node_id: String,

    /// Base URLs of the other nodes of a primary/secondary cluster,
    /// comma-separated (e.g. http://127.0.0.1:8766,http://127.0.0.1:8767).
    /// Empty: a single node.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,

    /// This node lost its data and rejoins its cluster with a fresh data
    /// dir: it may have acknowledged entries it no longer holds, so it
    /// grants no vote and cannot be promoted until its log reaches a
    /// primary's commit index. Only for a fresh data dir (ignored, with a
    /// warning, for one with history); not with --role primary
    #[arg(long)]
    pub rejoin: bool,

    /// This node joins a running primary/secondary cluster (docs/DESIGN.md
    /// §4.11): it is not in the bootstrap configuration (--peers names the
    /// cluster's nodes), and until its log holds a configuration it is a
    /// learner of an unknown one, never promoted. The primary adds it with
    /// `POST /v1/admin/members`. It always starts as a secondary (--role
    /// is ignored); not with --rejoin
    #[arg(long)]
    pub join: bool,

    /// Role when the data dir is fresh: the `primary` bootstraps the cluster
    /// in epoch 1. A restarted node trusts its persisted epoch and log, not
    /// this flag, and starts as a secondary until promoted.
    #[arg(long, value_enum, default_value = "primary")]
    pub role: BootRole,

    /// Secondaries that must hold a write durably before it is
    /// acknowledged, a fixed count. Absent (the default): a majority of the
    /// voters of the configuration in effect (docs/DESIGN.md §4.11), 1
    /// secondary of 3. 0 = asynchronous replication: a write is
    /// acknowledged once durable on the primary alone and CAN BE LOST if the
    /// primary fails before shipping it. A fixed count refuses membership
    /// changes (409 fixed_quorum)
    #[arg(long)]
    pub sync_replicas: Option<usize>,

    /// URL other nodes and clients use to reach this node (default
    /// http://<bind>:<port>).
    #[arg(long)]
    pub advertise_url: Option<String>,

    /// A write not committed within this many milliseconds gets 503
    /// (it may still commit later; retrying a PUT is safe).
    #[arg(long, default_value_t = 10_000)]
    pub commit_timeout_ms: u64,

    /// Largest value accepted by PUT or in one bulk item, in bytes; larger
    /// ones get 413 and write nothing.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_value_bytes: usize,

    /// Largest POST /v1/bulk request body, in bytes (413 beyond it).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_bulk_bytes: usize,

    /// Most items in one bulk request (413 beyond it).
    #[arg(long, default_value_t = 100_000)]
    pub max_bulk_items: usize,

    /// Take a snapshot (and delete the WAL segments it covers) after this
    /// many MiB have been written to the WAL since the last snapshot.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every_mib: u64,

    /// Size in MiB at which a WAL segment is sealed and a new one started.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub wal_segment_mib: u64,

    // --- HTTP connections, timeouts and body memory (api::listener, api::serve) ---
    /// Open client connections. At the limit, a further connection takes
    /// one of --reserved-connections; with those taken too, new ones wait
    /// in the kernel's accept backlog until one closes. Lowered at start
    /// to fit RLIMIT_NOFILE (`ulimit -n`), minus the descriptors open and
    /// 64 more kept for the WAL, snapshots and peers; the start-up log
    /// says the figure.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,

    /// Connections kept for when the --max-connections are all open, so
    /// that peers and kvsup's health checks still get in. They serve
    /// anything, but close after 1 s idle (or 1 s to send a request head),
    /// so whoever takes one hands it back quickly. 0 = none.
    #[arg(long, default_value_t = 32)]
    pub reserved_connections: usize,

    /// A connection must send a complete request head (request line and
    /// headers) within this many milliseconds of its first byte (a new
    /// connection: of being accepted), or it is closed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,

    /// A keep-alive connection with no request for this many milliseconds
    /// is closed.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// Bytes of request bodies held in memory at once, over all requests:
    /// each reserves its Content-Length before it is read (a chunked body:
    /// each chunk as it arrives), and one that does not fit gets 503
    /// "overloaded". A body larger than this is read only when it is alone.
    #[arg(long, default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_body_bytes: u32,

    /// Requests handled at once; more get 503 "overloaded" at once instead of
    /// queueing without bound.
    #[arg(long, default_value_t = 4096)]
    pub max_inflight_requests: usize,

    /// A request body must arrive within this many milliseconds (408 after),
    /// so a stalled client cannot hold a request slot forever.
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    // --- end of HTTP connections ---
    /// Memory budget of the data set, in MiB (0: none). A PUT, bulk or
    /// transaction that would grow it past this gets 507 "memory_full" and
    /// writes nothing; deletes and writes that do not grow it are always
    /// taken (like Redis's maxmemory with noeviction). The data set is
    /// every key and value plus 32 bytes per key (versions, the ordered
    /// index and allocator overhead),
    /// counted as it changes; the search index, masterless stamps and
    /// buffers are not in it, so leave headroom above it.
    #[arg(long, default_value_t = 0)]
    pub max_memory_mib: u64,

    /// Writes queued for the WAL writer; past this, handlers wait (back-pressure).
    #[arg(long, default_value_t = 8192)]
    pub write_queue: usize,

    /// Replication mode of a cluster (with --peers): `primary-secondary`
    /// (one primary takes writes, docs/DESIGN.md §4) or `masterless` (every node
    /// takes writes, last-write-wins by hybrid logical clock, docs/DESIGN.md §5).
    /// Used when the data dir is fresh; afterwards the mode persisted in
    /// `meta` wins (a live mode switch changes it).
    #[arg(long, value_enum, default_value = "primary-secondary")]
    pub mode: Mode,

    /// Masterless: nodes (this one included, 1..=3) that must hold a write
    /// durably before it is acknowledged. 1 acknowledges after the local
    /// fsync; peers get the write asynchronously.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3))]
    pub write_quorum: u64,

    /// Masterless: refuse writes from peers (and a mode switch's base stamp)
    /// stamped more than this many milliseconds ahead of this node's wall
    /// clock: a stamp far in the future would win every later write to its
    /// key. Nodes whose clocks differ by more than this stop merging each
    /// other's writes (the refused batches are retried) until they agree.
    #[arg(long, default_value_t = crate::storage::DEFAULT_MAX_CLOCK_OFFSET_MS)]
    pub max_clock_offset_ms: u64,

    /// Largest snapshot a primary may upload to this node, in MiB (413
    /// beyond it; the upload is streamed to disk, not held in memory).
    /// Must exceed the data set of the cluster.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_snapshot_mib: u64,

    /// Debug only (needs --enable-debug): offset added to this node's wall
    /// clock, in milliseconds (negative: behind), to test clock faults.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub clock_offset_ms: i64,

    /// Allow debug-only request options such as `debug_flaky=P` (a write made
    /// durable but not applied in memory, as if the node crashed in between).
    /// Never enable in production.
    #[arg(long)]
    pub enable_debug: bool,

    /// Bearer tokens and their roles (a JSON file of SHA-256 hashes, never
    /// the secrets; docs/DESIGN.md §2.18), read again on SIGHUP. Without it
    /// no token is asked for.
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<std::path::PathBuf>,

    /// Keep a full-text (BM25) and TF-IDF similarity index over the values
    /// and serve GET /v1/search and /v1/similar. Rebuilt from the data on
    /// every start (it is not stored); costs memory and some write speed.
    #[arg(long)]
    pub index: bool,

    /// With --index: reduce words to their English stems (Snowball), so
    /// "running" finds "runs". Every node of a cluster must use the same
    /// setting, or their results differ.
    #[arg(long, requires = "index")]
    pub index_stem: bool,

    /// Most live leases (POST /v1/leases); a grant past it is refused
    /// (507 too_many_leases) until some are revoked or expire.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_leases: u64,

    /// Memory for the recent changes that watches stream (GET /v1/watch),
    /// in MiB: a watch can start from any index still held; older ones
    /// answer 410 compacted.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub watch_cache_mib: u64,

    /// Most watches open at once; one more is refused (503
    /// too_many_watchers).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_watchers: u64,

    // --- TLS (api::tls, docs/DESIGN.md §12) ---
    /// Serve the whole port over TLS with this certificate chain (PEM;
    /// needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The cluster's CA (PEM). Client certificates are asked for and
    /// verified against it; clients without one still reach the key
    /// routes, but /internal/* and /v1/admin/* need a node certificate of
    /// this CA. Peers are then reached over mutual TLS (https --peers).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    // --- end of TLS ---
    /// How the node writes its log to stderr: text, or JSON lines (one
    /// object per event). The filter is the KVD_LOG environment variable
    /// (e.g. `debug`, `kvd=debug,hyper=warn`; default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KVD_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// `--role`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootRole {
    Primary,
    Secondary,
}

/// kvd's subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Make a data dir from a backup (`GET /v1/admin/snapshot`): verifies
    /// the whole file first (a damaged one is refused, naming the byte
    /// offset, and nothing is created), then writes DATA_DIR (which must
    /// not exist or be empty) holding exactly the state at the backup's
    /// index. Exit 0 with a line naming the index, keys and digest.
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long)]
    pub from: PathBuf,

    /// The data dir to make (absent or empty). Required unless --check.
    #[arg(long, required_unless_present = "check")]
    pub data_dir: Option<PathBuf>,

    /// Verify the file only; create nothing.
    #[arg(long)]
    pub check: bool,

    /// Largest value a key of the backup may hold (as kvd's
    /// --max-value-bytes: a restored node must be able to serve it).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_value_bytes: usize,

    /// Largest bulk of an entry of the backup (as kvd's --max-bulk-items).
    #[arg(long, default_value_t = 100_000)]
    pub max_bulk_items: usize,
}
