//! Header names of the HTTP API (lowercase, as `http` wants them).

/// On a secondary's 307: the base URL of the primary to send writes to.
pub const PRIMARY: &str = "x-kv-primary";

/// On a `stale_epoch` refusal between nodes: the refusing node's epoch,
/// which tells a deposed primary to step down.
pub const EPOCH: &str = "x-kv-epoch";

/// A retry hint in milliseconds, finer than `Retry-After` (kvclient reads
/// it first).
pub const RETRY_AFTER_MS: &str = "x-kv-retry-after-ms";

/// On a read of a key: the log index of its last write (also its `ETag`,
/// quoted, outside masterless mode).
pub const MOD_INDEX: &str = "x-kv-mod-index";

/// On a read of a key: the log index of the write that created it.
pub const CREATE_INDEX: &str = "x-kv-create-index";

/// On a read of a key: the writes since its creation (1 after the first).
pub const VERSION: &str = "x-kv-version";

/// On a read of a key with a deadline: the milliseconds it has left (at
/// least 1), of its own deadline or its lease's.
pub const TTL_MS: &str = "x-kv-ttl-ms";

/// On a read of a key attached to a lease: the lease's id.
pub const LEASE: &str = "x-kv-lease";

/// On a watch: the node's applied index when the watch started.
pub const WATCH_INDEX: &str = "x-kv-watch-index";
