//! The error codes of kvd's JSON error bodies that the client acts on, in
//! one place (they mirror the codes kvd writes; a shared wire crate can
//! take their place here).

/// Error code of the server's 404 for an absent key (other 404s, such as an
/// unknown route, carry `not_found`).
pub const KEY_NOT_FOUND: &str = "key_not_found";

/// 503 while a mode switch has paused writes; nothing was written.
pub const WRITES_PAUSED: &str = "writes_paused";

/// 503 while the primary hands over to another node; nothing was written.
pub const TRANSFER_IN_PROGRESS: &str = "transfer_in_progress";

/// No primary is known yet (an election is in progress); nothing was
/// written. The client also uses it for a redirect that names no primary.
pub const NO_PRIMARY: &str = "no_primary";

/// 503 when the node is at its request or body-memory limit; nothing was
/// written.
pub const OVERLOADED: &str = "overloaded";

/// The codes of answers that say nothing was written, so retrying a write
/// cannot apply it twice.
pub const NOT_APPLIED: [&str; 4] = [WRITES_PAUSED, TRANSFER_IN_PROGRESS, NO_PRIMARY, OVERLOADED];
