//! The connection budget: how many connections kvd accepts at once, and
//! what the accept loop does when accepting fails.
//!
//! Two pools. Client connections take `--max-connections` slots. Once those
//! are all taken, a further connection may take one of the
//! `--reserved-connections` slots, which serve anything but close idle or
//! slow connections after a short timeout (see `serve`): a flood of idle
//! sockets can fill the client pool, but peers and kvsup's health checks
//! still get in, and whoever takes a reserved slot gives it back quickly.
//! With both pools full, kvd stops accepting and new connections wait in
//! the kernel's accept backlog.
//!
//! Both pools fit in the descriptors `RLIMIT_NOFILE` allows, minus those
//! open at start and [`FD_RESERVE`] more: the WAL, snapshots and peer
//! connections always find a descriptor, whatever the clients do.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ConnectionMetrics;

/// Descriptors kept free beyond those open at start, for what the node
/// opens later: new WAL segments and the directory fsyncs after them,
/// snapshot files, `meta` rewrites, old segments read back for shipping,
/// and outgoing connections to peers (a few per peer).
pub const FD_RESERVE: u64 = 64;

/// How many connections each pool may hold, and where the figure came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub clients: usize,
    pub reserve: usize,
    /// The soft `RLIMIT_NOFILE` the budget was fitted into.
    pub nofile: u64,
    /// Descriptors open when the budget was computed.
    pub open_at_start: u64,
    /// True when `--max-connections` had to be lowered to fit.
    pub lowered: bool,
}

impl Budget {
    /// One line for the start-up log.
    pub fn describe(&self, max_connections: usize) -> String {
        let lowered = if self.lowered {
            format!(" (--max-connections {max_connections} lowered to fit)")
        } else {
            String::new()
        };
        format!(
            "up to {} client connections{lowered} + {} reserved for peers and health checks \
             (RLIMIT_NOFILE {}: {} descriptors open at start, {FD_RESERVE} kept for the WAL, \
             snapshots and peer traffic)",
            self.clients, self.reserve, self.nofile, self.open_at_start
        )
    }
}

/// Fits `max_connections` client and `reserved` extra connections into the
/// descriptors left by `nofile` after `open_fds` and [`FD_RESERVE`]. The
/// reserve keeps at most half of what is left, and the client pool shrinks
/// first. Fails when not even one connection of each kind fits.
pub fn connection_budget(
    nofile: u64,
    open_fds: u64,
    max_connections: usize,
    reserved: usize,
) -> Result<Budget, String> {
    let usable = nofile.saturating_sub(open_fds.saturating_add(FD_RESERVE));
    let usable = usize::try_from(usable).unwrap_or(usize::MAX);
    let reserve = reserved.min(usable / 2);
    let room = usable - reserve;
    if room == 0 || (reserved > 0 && reserve == 0) {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile} and {open_fds} descriptors are open: that leaves no \
             descriptor for connections once {FD_RESERVE} are kept for the WAL, snapshots and \
             peers; raise `ulimit -n` to at least {}",
            open_fds + FD_RESERVE + 2
        ));
    }
    let clients = max_connections.max(1).min(room);
    Ok(Budget {
        clients,
        reserve,
        nofile,
        open_at_start: open_fds,
        lowered: clients < max_connections,
    })
}

/// The soft `RLIMIT_NOFILE` and how many descriptors are open now (0 when
/// `/proc/self/fd` cannot be read).
pub fn descriptor_usage() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    // Listing the directory opens one descriptor of its own, counted here.
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0);
    Ok((soft, open))
}

/// Which pool a connection's slot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Client,
    Reserve,
}

impl Pool {
    pub fn label(self) -> &'static str {
        match self {
            Pool::Client => "client",
            Pool::Reserve => "reserve",
        }
    }
}

/// The two pools of slots.
pub struct Pools {
    clients: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    metrics: ConnectionMetrics,
    /// `kvd_http_connections` per pool, resolved once.
    open: [prometheus::IntGauge; 2],
}

impl Pools {
    pub fn new(budget: &Budget, metrics: ConnectionMetrics) -> Pools {
        let gauge = |v: &prometheus::IntGaugeVec, pool: Pool| v.with_label_values(&[pool.label()]);
        gauge(&metrics.limit, Pool::Client).set(budget.clients as i64);
        gauge(&metrics.limit, Pool::Reserve).set(budget.reserve as i64);
        Pools {
            clients: Arc::new(Semaphore::new(budget.clients)),
            reserve: Arc::new(Semaphore::new(budget.reserve)),
            open: [
                gauge(&metrics.open, Pool::Client),
                gauge(&metrics.open, Pool::Reserve),
            ],
            metrics,
        }
    }

    /// A client slot if one is free, else a reserved one, else waits for
    /// whichever frees first. `None` only if the pools were closed.
    pub async fn acquire(&self) -> Option<Slot> {
        if let Ok(p) = self.clients.clone().try_acquire_owned() {
            return Some(self.slot(p, Pool::Client));
        }
        if let Ok(p) = self.reserve.clone().try_acquire_owned() {
            return Some(self.slot(p, Pool::Reserve));
        }
        // Every slot is taken: kvd stops accepting (the kernel queues new
        // connections in the backlog) until a connection closes.
        let _paused = Paused::new(&self.metrics.accept_paused);
        let got = tokio::select! {
            p = self.clients.clone().acquire_owned() => p.ok().map(|p| (p, Pool::Client)),
            p = self.reserve.clone().acquire_owned() => p.ok().map(|p| (p, Pool::Reserve)),
        };
        got.map(|(p, pool)| self.slot(p, pool))
    }

    /// The slot of a connection just accepted, now counted as open. A
    /// reserved slot taken before `accept` is traded for a client slot if
    /// one has been freed meanwhile, so that the connection gets the
    /// client pool's timeouts.
    pub fn accepted(&self, slot: Slot) -> Slot {
        let mut slot = match slot.pool {
            Pool::Reserve => match self.clients.clone().try_acquire_owned() {
                Ok(p) => self.slot(p, Pool::Client),
                Err(_) => slot,
            },
            Pool::Client => slot,
        };
        let open = self.open[slot.pool as usize].clone();
        open.inc();
        slot.open = Some(open);
        slot
    }

    fn slot(&self, permit: OwnedSemaphorePermit, pool: Pool) -> Slot {
        Slot {
            pool,
            open: None,
            _permit: permit,
        }
    }
}

/// `kvd_http_accept_paused` is 1 while this lives (also if the wait for a
/// slot is abandoned, as on shutdown, it goes back to 0).
struct Paused<'a>(&'a prometheus::IntGauge);

impl<'a> Paused<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Paused<'a> {
        gauge.set(1);
        Paused(gauge)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// A connection's place in a pool, given back when dropped.
pub struct Slot {
    pub pool: Pool,
    /// `kvd_http_connections` of the pool, once the connection is accepted.
    open: Option<prometheus::IntGauge>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

/// What the accept loop does after `accept(2)` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptAction {
    /// The error belonged to one connection (reset before it was accepted):
    /// accept the next one at once.
    Next,
    /// A shortage (EMFILE, ENFILE, ENOBUFS, ...) or anything unexpected:
    /// wait before trying again, so the loop neither spins nor dies.
    Wait(Duration),
}

/// First wait after a failed accept; doubles per failure in a row.
pub const ACCEPT_RETRY_FIRST: Duration = Duration::from_millis(10);
/// Longest wait between two accepts that fail.
pub const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Decides what follows the `failures`-th failed accept in a row (from 1).
pub fn on_accept_error(e: &io::Error, failures: u32) -> AcceptAction {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted => {
            AcceptAction::Next
        }
        _ => AcceptAction::Wait(accept_retry_delay(failures)),
    }
}

/// 10 ms, 20 ms, 40 ms, ... up to 1 s.
pub fn accept_retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    ACCEPT_RETRY_FIRST
        .saturating_mul(1 << doublings)
        .min(ACCEPT_RETRY_MAX)
}

/// Logs the 1st, 2nd, 4th, 8th, ... failure of a streak: a long shortage
/// stays visible without flooding the log.
pub fn should_log_accept_failure(failures: u32) -> bool {
    failures.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_fits_in_the_descriptor_limit() {
        let b = connection_budget(1024, 20, 4096, 32).unwrap();
        assert_eq!((b.clients, b.reserve), (1024 - 20 - 64 - 32, 32));
        assert!(b.lowered);
        assert!(b.clients as u64 + b.reserve as u64 + 20 + FD_RESERVE <= 1024);
    }

    #[test]
    fn a_generous_limit_keeps_the_flags() {
        let b = connection_budget(1 << 20, 20, 4096, 32).unwrap();
        assert_eq!((b.clients, b.reserve, b.lowered), (4096, 32, false));
    }

    #[test]
    fn a_tight_limit_halves_the_reserve_before_refusing() {
        let b = connection_budget(20 + 64 + 10, 20, 4096, 32).unwrap();
        assert_eq!((b.clients, b.reserve), (5, 5));
        let b = connection_budget(20 + 64 + 2, 20, 4096, 32).unwrap();
        assert_eq!((b.clients, b.reserve), (1, 1));
        assert!(connection_budget(20 + 64 + 1, 20, 4096, 32).is_err());
        assert!(connection_budget(50, 20, 4096, 32).is_err());
    }

    #[test]
    fn no_reserve_asked_means_none() {
        let b = connection_budget(20 + 64 + 1, 20, 8, 0).unwrap();
        assert_eq!((b.clients, b.reserve), (1, 0));
    }

    #[test]
    fn zero_max_connections_still_serves_one() {
        let b = connection_budget(1 << 20, 0, 0, 0).unwrap();
        assert_eq!(b.clients, 1);
    }

    #[test]
    fn the_log_line_says_where_the_figure_came_from() {
        let b = connection_budget(1024, 20, 4096, 32).unwrap();
        let line = b.describe(4096);
        assert!(line.contains("908 client connections"), "{line}");
        assert!(line.contains("lowered"), "{line}");
        assert!(line.contains("RLIMIT_NOFILE 1024"), "{line}");
    }

    fn pools(clients: usize, reserve: usize) -> (Pools, ConnectionMetrics) {
        let metrics = crate::metrics::Metrics::new().unwrap().connections;
        let budget = Budget {
            clients,
            reserve,
            nofile: 1 << 20,
            open_at_start: 0,
            lowered: false,
        };
        (Pools::new(&budget, metrics.clone()), metrics)
    }

    #[tokio::test]
    async fn the_reserve_opens_only_once_the_clients_are_full() {
        let (pools, m) = pools(1, 1);
        let a = pools.acquire().await.unwrap();
        let b = pools.acquire().await.unwrap();
        assert_eq!((a.pool, b.pool), (Pool::Client, Pool::Reserve));
        let open = |pool: Pool| m.open.with_label_values(&[pool.label()]).get();
        assert_eq!(open(Pool::Client), 0, "not open before it is accepted");
        let (a, b) = (pools.accepted(a), pools.accepted(b));
        assert_eq!((a.pool, b.pool), (Pool::Client, Pool::Reserve));
        assert_eq!((open(Pool::Client), open(Pool::Reserve)), (1, 1));

        // Both taken: acquiring waits, and says so.
        {
            let wait = pools.acquire();
            tokio::pin!(wait);
            assert!(futures_poll_once(wait.as_mut()).await.is_none());
            assert_eq!(m.accept_paused.get(), 1);
        }
        assert_eq!(m.accept_paused.get(), 0, "an abandoned wait is not a pause");

        // A client slot freed while a reserved one waited for `accept`.
        drop(a);
        let c = pools.acquire().await.unwrap();
        drop(b);
        assert_eq!(c.pool, Pool::Client);
        let waiting = pools.acquire().await.unwrap();
        assert_eq!(waiting.pool, Pool::Reserve);
        drop(c);
        let d = pools.accepted(waiting);
        assert_eq!(d.pool, Pool::Client);
        assert_eq!((open(Pool::Client), open(Pool::Reserve)), (1, 0));
    }

    /// Polls `f` once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn a_shortage_backs_off_and_a_dead_connection_does_not() {
        let emfile = io::Error::from_raw_os_error(24);
        assert_eq!(
            on_accept_error(&emfile, 1),
            AcceptAction::Wait(Duration::from_millis(10))
        );
        assert_eq!(
            on_accept_error(&emfile, 3),
            AcceptAction::Wait(Duration::from_millis(40))
        );
        assert_eq!(
            on_accept_error(&emfile, 1000),
            AcceptAction::Wait(ACCEPT_RETRY_MAX)
        );
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(on_accept_error(&aborted, 5), AcceptAction::Next);
    }

    #[test]
    fn failures_are_logged_at_doubling_counts() {
        let logged: Vec<u32> = (1..=20).filter(|&n| should_log_accept_failure(n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
