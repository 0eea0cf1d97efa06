//! Error codes: the `code` of [`crate::ErrorBody`], stable across releases
//! (clients branch on them; messages may change).

// --- Requests a node refuses (4xx) ---
/// A key that is empty, over 1024 bytes, or holds a NUL.
pub const INVALID_KEY: &str = "invalid_key";
/// A query string that does not parse or decode to UTF-8.
pub const INVALID_QUERY: &str = "invalid_query";
/// A JSON body that does not parse as the route's body.
pub const INVALID_JSON: &str = "invalid_json";
/// A bulk with no items.
pub const INVALID_BULK: &str = "invalid_bulk";
/// A bulk item with a bad key or value.
pub const INVALID_ITEM: &str = "invalid_item";
/// A bulk over `--max-bulk-items`.
pub const TOO_MANY_ITEMS: &str = "too_many_items";
/// A value or body over its limit.
pub const VALUE_TOO_LARGE: &str = "value_too_large";
/// A body that could not be read.
pub const BAD_BODY: &str = "bad_body";
/// A body that did not arrive in time.
pub const REQUEST_TIMEOUT: &str = "request_timeout";
/// A GET of a key that is not there.
pub const KEY_NOT_FOUND: &str = "key_not_found";
/// A route that does not exist.
pub const NOT_FOUND: &str = "not_found";
/// A method the route does not serve.
pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
/// A transfer coding other than `chunked` alone.
pub const UNSUPPORTED_TRANSFER_ENCODING: &str = "unsupported_transfer_encoding";
/// A request hyper could not parse.
pub const MALFORMED_REQUEST: &str = "malformed_request";
/// A request head over 64 KiB or 100 fields.
pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
/// A request target too long to parse.
pub const URI_TOO_LONG: &str = "uri_too_long";
/// A debug knob used without `--enable-debug`.
pub const DEBUG_DISABLED: &str = "debug_disabled";
/// A search on a node without `--index`.
pub const INDEX_DISABLED: &str = "index_disabled";
/// A search `limit`/`top_k` out of range.
pub const INVALID_LIMIT: &str = "invalid_limit";
/// A search `offset` out of range.
pub const INVALID_OFFSET: &str = "invalid_offset";
/// A search query with no word.
pub const EMPTY_QUERY: &str = "empty_query";
/// A search query over 1024 bytes or 64 words.
pub const QUERY_TOO_LONG: &str = "query_too_long";
/// A query parameter the route does not take (the message names it).
pub const UNKNOWN_PARAMETER: &str = "unknown_parameter";
/// A range with `start` after `end`, or a bound over 1024 bytes.
pub const INVALID_RANGE: &str = "invalid_range";
/// A page token that does not decode, fails its checksum, or belongs to
/// another range.
pub const INVALID_PAGE_TOKEN: &str = "invalid_page_token";
/// An `If-Match` / `If-None-Match` header that is not `"N"` or `*`.
pub const INVALID_PRECONDITION: &str = "invalid_precondition";
/// A conditional write whose condition does not hold: nothing written.
pub const PRECONDITION_FAILED: &str = "precondition_failed";
/// A transaction with a bad key, target, operator or operand.
pub const INVALID_TXN: &str = "invalid_txn";
/// A transaction over 128 compares and ops.
pub const TOO_MANY_OPS: &str = "too_many_ops";
/// A conditional write or a transaction with a compare on a masterless
/// node, which has no single order of writes to check it against.
pub const UNSUPPORTED_IN_MASTERLESS: &str = "unsupported_in_masterless";
/// A `ttl_ms` that is not an integer in 1 ..= ten years, or given with
/// `lease` or `keep_ttl`.
pub const INVALID_TTL: &str = "invalid_ttl";
/// A lease id that no live lease has (never granted, revoked or expired).
pub const LEASE_NOT_FOUND: &str = "lease_not_found";
/// A grant past `--max-leases` live leases.
pub const TOO_MANY_LEASES: &str = "too_many_leases";
/// Watch parameters that do not name one range, or a bad `from_index` or
/// `progress_ms`.
pub const INVALID_WATCH: &str = "invalid_watch";
/// A watch `from_index` past the last index this node holds in its log.
pub const FUTURE_INDEX: &str = "future_index";
/// A watch from an index older than the oldest event the node still holds
/// (410; the body names `oldest_index`).
pub const COMPACTED: &str = "compacted";
/// A watch past `--max-watchers` open watches.
pub const TOO_MANY_WATCHERS: &str = "too_many_watchers";
/// In a watch's error event: the watcher fell behind what the node keeps
/// and was cut off; it resumes from the event's `resume_index`.
pub const WATCHER_TOO_SLOW: &str = "watcher_too_slow";

// --- The node's state refuses a write or read (4xx, 5xx) ---
/// A write (or consistent read) sent to a secondary: 307 to the primary.
pub const NOT_PRIMARY: &str = "not_primary";
/// A secondary that knows no primary yet.
pub const NO_PRIMARY: &str = "no_primary";
/// The primary is handing over; retry shortly.
pub const TRANSFER_IN_PROGRESS: &str = "transfer_in_progress";
/// Writes paused for a mode switch; retry shortly.
pub const WRITES_PAUSED: &str = "writes_paused";
/// A write not committed within `--commit-timeout-ms`.
pub const COMMIT_TIMEOUT: &str = "commit_timeout";
/// A masterless write not on `--write-quorum` nodes in time.
pub const QUORUM_TIMEOUT: &str = "quorum_timeout";
/// A write logged by a primary deposed before it committed.
pub const WRITE_SUPERSEDED: &str = "write_superseded";
/// Too many requests or request-body bytes in flight.
pub const OVERLOADED: &str = "overloaded";
/// A write that would grow the data set past `--max-memory-mib`.
pub const MEMORY_FULL: &str = "memory_full";
/// The WAL is poisoned (a write or fsync failed).
pub const STORAGE_UNAVAILABLE: &str = "storage_unavailable";
/// The data dir was removed or replaced under the node.
pub const DATA_DIR_LOST: &str = "data_dir_lost";
/// No new WAL segment could be started; retry.
pub const WAL_UNAVAILABLE: &str = "wal_unavailable";
/// Another storage failure.
pub const STORAGE_ERROR: &str = "storage_error";
/// Damaged data found on disk.
pub const STORAGE_CORRUPTION: &str = "storage_corruption";
/// The node is stopping.
pub const SHUTTING_DOWN: &str = "shutting_down";
/// A consistent read whose barrier was not applied in time.
pub const APPLY_TIMEOUT: &str = "apply_timeout";

// --- Elections, promotion and transfer ---
/// A cluster operation on a node without `--peers`.
pub const NO_PEERS: &str = "no_peers";
/// A promotion asked of a masterless node.
pub const MASTERLESS: &str = "masterless";
/// No majority reachable.
pub const NO_MAJORITY: &str = "no_majority";
/// A reachable peer is more up to date.
pub const BEHIND_PEER: &str = "behind_peer";
/// The election did not win a majority.
pub const NOT_ENOUGH_VOTES: &str = "not_enough_votes";
/// A newer epoch or another primary appeared during the election.
pub const OVERTAKEN: &str = "overtaken";
/// A backup asked of a masterless node: its log merges peers' writes, so
/// it is not one history another node could replay.
pub const BACKUP_UNSUPPORTED: &str = "backup_unsupported";
/// A backup could not pin the newest snapshot with the log after it, or
/// does not know its last entry's epoch; retry.
pub const BACKUP_UNAVAILABLE: &str = "backup_unavailable";
/// A node re-seeded after losing its data has not caught up with a
/// primary yet: it may not lead.
pub const REJOINING: &str = "rejoining";
/// A leadership transfer that did not complete.
pub const TRANSFER_FAILED: &str = "transfer_failed";
/// A membership change whose body is not one well-formed action
/// (docs/DESIGN.md §4.11).
pub const INVALID_MEMBER: &str = "invalid_member";
/// A membership change while the newest configuration, or the primary's
/// first entry of its epoch, is not committed yet.
pub const CONFIG_CHANGE_IN_PROGRESS: &str = "config_change_in_progress";
/// Adding a node that is already a member.
pub const ALREADY_MEMBER: &str = "already_member";
/// Promoting or removing a URL that is not a member.
pub const NOT_MEMBER: &str = "not_member";
/// Promoting a member that is not a learner.
pub const NOT_LEARNER: &str = "not_learner";
/// Promoting a learner whose log is behind the primary's commit index.
pub const LEARNER_BEHIND: &str = "learner_behind";
/// The primary asked to remove itself (transfer leadership first).
pub const REMOVE_SELF: &str = "remove_self";
/// Removing the only voter.
pub const LAST_VOTER: &str = "last_voter";
/// A membership change on a node whose quorum `--sync-replicas` fixes.
pub const FIXED_QUORUM: &str = "fixed_quorum";
/// Promoting a node that is not a voter of its configuration (a learner,
/// a removed node, a `--join` node before it has a configuration).
pub const LEARNER: &str = "learner";
/// A transfer request that does not parse.
pub const INVALID_TRANSFER: &str = "invalid_transfer";
/// A vote request that does not parse.
pub const INVALID_VOTE: &str = "invalid_vote";
/// A vote that could not be decided.
pub const VOTE_FAILED: &str = "vote_failed";
/// Persisting epoch or vote in `meta` failed.
pub const META_WRITE_FAILED: &str = "meta_write_failed";
/// Reading `meta` failed.
pub const META_READ_FAILED: &str = "meta_read_failed";

// --- Traffic between nodes ---
/// Replication traffic sent to a single node.
pub const NOT_REPLICATED: &str = "not_replicated";
/// Masterless traffic sent to a node in another mode.
pub const NOT_MASTERLESS: &str = "not_masterless";
/// A masterless peer set (`POST /v1/admin/peers`) that is not well formed.
pub const INVALID_PEERS: &str = "invalid_peers";
/// An `/internal/append` body that does not decode.
pub const INVALID_APPEND: &str = "invalid_append";
/// An `/internal/ml/stream` body that does not decode.
pub const INVALID_STREAM: &str = "invalid_stream";
/// A record from a peer that no client could have written.
pub const INVALID_ENTRY: &str = "invalid_entry";
/// A snapshot from a primary that does not load.
pub const INVALID_SNAPSHOT: &str = "invalid_snapshot";
/// A snapshot past its sender's own log.
pub const SNAPSHOT_AHEAD_OF_SENDER: &str = "snapshot_ahead_of_sender";
/// A snapshot upload over `--max-snapshot-mib`.
pub const SNAPSHOT_TOO_LARGE: &str = "snapshot_too_large";
/// A second snapshot upload while one is running.
pub const SNAPSHOT_IN_PROGRESS: &str = "snapshot_in_progress";
/// The incoming snapshot could not be written.
pub const SNAPSHOT_WRITE_FAILED: &str = "snapshot_write_failed";
/// The incoming snapshot could not be checked.
pub const SNAPSHOT_VERIFY_FAILED: &str = "snapshot_verify_failed";
/// The sender's epoch is older (its epoch in `x-kv-epoch`).
pub const STALE_EPOCH: &str = "stale_epoch";
/// A primary sent appends by another primary of its epoch.
pub const TWO_PRIMARIES: &str = "two_primaries";
/// Appends from a second sender in an epoch that has a primary.
pub const EPOCH_HAS_PRIMARY: &str = "epoch_has_primary";
/// An epoch more than 2^32 above the node's.
pub const EPOCH_OUT_OF_RANGE: &str = "epoch_out_of_range";
/// A stamp too far ahead of the node's clock.
pub const STAMP_OUT_OF_RANGE: &str = "stamp_out_of_range";
/// A replication request the engine could not follow.
pub const REPLICATION_ERROR: &str = "replication_error";
/// A peer or admin route over TLS without a client certificate of the
/// cluster CA that names a node.
pub const PEER_CERTIFICATE_REQUIRED: &str = "peer_certificate_required";

// --- Mode switch ---
/// A mode request naming no cluster mode, or without its primary.
pub const INVALID_MODE: &str = "invalid_mode";
/// A mode switch asked before writes were paused.
pub const WRITES_NOT_PAUSED: &str = "writes_not_paused";
/// A node with entries not yet applied, or behind the switch's base.
pub const NOT_QUIESCENT: &str = "not_quiescent";
/// The new mode's runtime did not start.
pub const RUNTIME_START_FAILED: &str = "runtime_start_failed";
/// A task of the node failed unexpectedly.
pub const INTERNAL: &str = "internal";

// --- Access ---
/// No token, or one the node's token file does not hold (401).
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// A valid token without the role the request needs (403).
pub const PERMISSION_DENIED: &str = "permission_denied";

/// The codes of answers that say nothing was written (writes paused, a
/// primary handing over, no primary known yet, overload): retrying such a
/// write cannot apply it twice.
pub const NOT_APPLIED: [&str; 4] = [WRITES_PAUSED, TRANSFER_IN_PROGRESS, NO_PRIMARY, OVERLOADED];
