//! The process's file-descriptor budget (`ulimit -n`): how many client
//! connections fit beside the descriptors kvd needs for its own work.
//! Connections past the budget would take the descriptors the WAL, the
//! snapshots and the peers need, and fail writes that could have been
//! served.

/// Descriptors kept back for everything but client connections: stdio, the
/// runtime's epoll and wakers, the listener, `LOCK` and the data dir's
/// claim, the WAL's active and spare segments and its directory, snapshot
/// and WAL reads and writes, `meta`, and connections to peers. An idle
/// single node holds about 17.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The soft `RLIMIT_NOFILE`: how many descriptors this process may hold.
pub fn nofile_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(soft)
}

/// Client connections that fit in `nofile` descriptors with `reserved`
/// kept back; 0 when the limit does not even cover the reserve.
pub fn connection_budget(nofile: u64, reserved: u64) -> u64 {
    nofile.saturating_sub(reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_limit_less_the_reserve() {
        assert_eq!(connection_budget(1024, RESERVED_DESCRIPTORS), 960);
        assert_eq!(connection_budget(64, RESERVED_DESCRIPTORS), 0);
        assert_eq!(connection_budget(10, RESERVED_DESCRIPTORS), 0);
        assert_eq!(connection_budget(u64::MAX, 64), u64::MAX - 64);
        assert!(nofile_limit().unwrap() > 0);
    }
}
