//! The names of kvd's own HTTP headers, in one place (they mirror the
//! names kvd writes; a shared wire crate can take their place here).

/// Header with which a secondary names the primary's base URL (DESIGN §4).
pub const PRIMARY_HEADER: &str = "x-kv-primary";

/// kvd's finer hint beside `Retry-After`, in milliseconds (a mode
/// switch's pause is usually well under a second).
pub const RETRY_AFTER_MS_HEADER: &str = "x-kv-retry-after-ms";
