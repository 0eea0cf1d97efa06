//! The accept loop and the serving of each connection (HTTP/1.1, hyper).
//!
//! This replaces `axum::serve`, which has no way to time a connection out.
//! Per connection:
//!
//! - A connection's first request head must arrive whole within the header
//!   timeout of its accept. After a request, the connection may sit idle
//!   for the idle timeout; once the next head's first byte arrives, the
//!   rest of that head must follow within the header timeout. A connection
//!   that misses a deadline is closed without an answer (nothing was asked
//!   yet). Connections in the reserved pool (see `listener`) get at most
//!   [`RESERVE_TIMEOUT`] for both, so they are handed back quickly.
//! - A request head is at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] fields
//!   (431 beyond, with a JSON body: see `conn_io`).
//! - Keep-alive as usual; pipelined requests are answered in order, each
//!   answer flushed when ready (hyper's pipeline flushing stays off).
//!
//! With TLS on (`ServeConfig::tls`), a connection's TLS handshake comes
//! first, within the header timeout and holding the connection's slot; a
//! failed one (a client speaking plain HTTP, say) closes the connection
//! with a rate-limited log line (`tls`). Every request then carries the
//! connection's `tls::PeerIdentity` as an extension.
//!
//! The loop takes a slot (`listener::Pools`) before it accepts, so a
//! connection beyond the budget waits in the kernel's backlog. A failed
//! accept never ends the loop: a shortage such as EMFILE waits with backoff
//! (`listener::on_accept_error`). On shutdown the loop stops accepting,
//! every connection finishes the request it is serving and closes, and
//! `serve` returns once all are closed. A response that would never finish
//! by itself (a watch) learns of the shutdown through the [`Serving`]
//! extension of its request and ends; a connection that still has one
//! after [`STREAM_GRACE`] (a client that stopped reading) is dropped. The connections' tasks are owned
//! by `serve` (a `JoinSet`): if `serve` itself is dropped, they are
//! aborted with it, so none outlives the server.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::conn_io::{self, Activity, ConnIo, HeadLimits, ParkedSlot};
use super::listener::{self, AcceptAction, Budget, Pool, Pools, Slot};
use super::tls::{self, HandshakeLog, PeerIdentity, Socket};
use crate::metrics::ConnectionMetrics;

/// Largest request head (request line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most header fields in one request: hyper's default, which `connection`
/// relies on.
pub const MAX_HEADERS: usize = 100;
/// The idle and header timeouts of a connection in the reserved pool.
pub const RESERVE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection with a long-lived response still open gets to
/// close after a shutdown, before it is dropped.
pub const STREAM_GRACE: Duration = Duration::from_millis(500);

/// What a request learns of the server serving it (a request extension):
/// whether it is shutting down, for responses that never end by
/// themselves.
#[derive(Clone)]
pub struct Serving {
    stop: watch::Receiver<bool>,
    /// Long-lived responses open on this connection.
    streams: Arc<AtomicUsize>,
}

impl Serving {
    /// Resolves once the server shuts down (or is gone).
    pub async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|stop| *stop).await;
    }

    /// Marks a long-lived response on this connection until the mark is
    /// dropped: a shutdown then waits at most [`STREAM_GRACE`] for it.
    pub fn stream(&self) -> StreamMark {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamMark(self.streams.clone())
    }
}

/// See [`Serving::stream`].
pub struct StreamMark(Arc<AtomicUsize>);

impl Drop for StreamMark {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The router's service with [`Serving`] and the connection's
/// [`PeerIdentity`] put into every request.
struct WithServing<S> {
    inner: S,
    serving: Serving,
    identity: PeerIdentity,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for WithServing<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: hyper::Request<B>) -> S::Future {
        req.extensions_mut().insert(self.serving.clone());
        req.extensions_mut().insert(self.identity.clone());
        self.inner.call(req)
    }
}

const HEAD_LIMITS: HeadLimits = HeadLimits {
    max_head_bytes: MAX_HEAD_BYTES,
    max_headers: MAX_HEADERS,
};

/// How long a connection may take to deliver a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the end of one request until the next head's first byte.
    pub idle: Duration,
    /// From the first byte of a head (a new connection: from its accept)
    /// until the head is complete.
    pub header: Duration,
}

impl Timeouts {
    /// The shorter timeouts of a reserved-pool connection.
    pub fn for_reserve(self) -> Timeouts {
        Timeouts {
            idle: self.idle.min(RESERVE_TIMEOUT),
            header: self.header.min(RESERVE_TIMEOUT),
        }
    }
}

/// When a connection that started waiting for a head at `wanted_at` is
/// closed: `first` is whether it is the connection's first head, and
/// `first_byte` when that head's first byte arrived, if it has.
pub fn head_deadline(
    wanted_at: Instant,
    first: bool,
    first_byte: Option<Instant>,
    t: Timeouts,
) -> Instant {
    match (first, first_byte) {
        (true, _) => wanted_at + t.header,
        (false, None) => wanted_at + t.idle,
        (false, Some(at)) => at + t.header,
    }
}

/// What `serve` needs besides the listener and the router.
pub struct ServeConfig {
    pub budget: Budget,
    /// Timeouts of client-pool connections.
    pub timeouts: Timeouts,
    pub metrics: ConnectionMetrics,
    /// TLS on the whole port (`None`: plain HTTP).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves `router` on `listener` until `shutdown` completes, then waits
/// for every connection to finish its request and close (its task to end).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let pools = Pools::new(&cfg.budget, cfg.metrics.clone());
    let handshakes = Arc::new(HandshakeLog::new(
        cfg.metrics.tls_handshake_failures_total.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut failures = 0u32;
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            slot = pools.acquire() => match slot {
                Some(s) => s,
                None => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                drop(slot);
                cfg.metrics.accept_errors_total.inc();
                let AcceptAction::Wait(delay) = listener::on_accept_error(&e, failures + 1) else {
                    continue;
                };
                failures = failures.saturating_add(1);
                if listener::should_log_accept_failure(failures) {
                    tracing::warn!(
                        error = %e,
                        failures,
                        retry_in = ?delay,
                        "accept failed; retrying"
                    );
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let slot = pools.accepted(slot);
        let timeouts = match slot.pool {
            Pool::Client => cfg.timeouts,
            Pool::Reserve => cfg.timeouts.for_reserve(),
        };
        // Forget connections that have closed, so the set holds about the
        // open ones (at most the budget's slots, plus those closed since).
        while connections.try_join_next().is_some() {}
        let tls = cfg
            .tls
            .clone()
            .map(|acceptor| (acceptor, handshakes.clone()));
        connections.spawn(connection(
            stream,
            slot,
            router.clone(),
            timeouts,
            tls,
            stop_rx.clone(),
        ));
    }
    // Closing the listener refuses what waits in the backlog.
    drop(listener);
    let _ = stop_tx.send(true);
    // A connection that panicked has ended too (its slot was dropped).
    while connections.join_next().await.is_some() {}
}

/// Serves one connection; its slot is given back when this returns.
async fn connection(
    stream: TcpStream,
    slot: Slot,
    router: Router,
    timeouts: Timeouts,
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<HandshakeLog>)>,
    mut stop: watch::Receiver<bool>,
) {
    // Replies are small and each completes a request: send them at once
    // rather than letting Nagle wait for the client's delayed ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
    let (stream, identity) = match tls {
        None => (Socket::Plain(stream), PeerIdentity::Plain),
        Some((acceptor, log)) => {
            let handshake = tls::handshake(&acceptor, stream, timeouts.header, &log);
            let done = tokio::select! {
                done = handshake => done,
                // A shutdown does not wait for a handshake: no request was asked.
                _ = async { drop(stop.wait_for(|stop| *stop).await) } => None,
            };
            match done {
                Some(done) => done,
                None => return,
            }
        }
    };
    let activity = Arc::new(Activity::new());
    let parked = ParkedSlot::<Socket>::default();
    let io = TokioIo::new(ConnIo::new(stream, activity.clone(), parked.clone()));
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer::new(activity, timeouts))
        // Turns the timer on; `HeadTimer` computes the actual deadlines.
        .header_read_timeout(timeouts.header)
        .max_header_size(MAX_HEAD_BYTES);
    // `MAX_HEADERS` is hyper's own default, so it is not set: once set
    // (`.max_headers`), hyper fills two arrays of that many header slots
    // one by one for every request head, where its default leaves them
    // uninitialised.
    let serving = Serving {
        stop: stop.clone(),
        streams: Arc::new(AtomicUsize::new(0)),
    };
    let service = WithServing {
        inner: TowerToHyperService::new(router),
        serving: serving.clone(),
        identity,
    };
    let mut conn = pin!(builder.serve_connection(io, service));
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { drop(stop.wait_for(|stop| *stop).await) } => {
            conn.as_mut().graceful_shutdown();
            if serving.streams.load(Ordering::Relaxed) == 0 {
                conn.as_mut().await
            } else {
                match tokio::time::timeout(STREAM_GRACE, conn.as_mut()).await {
                    Ok(r) => r,
                    // A stream its client does not read: dropped with the connection.
                    Err(_) => return,
                }
            }
        }
    };
    let parked = parked.lock().take();
    if let Some(p) = parked {
        conn_io::finish_parked(p, result.as_ref().err(), &HEAD_LIMITS).await;
    }
    drop(slot);
}

/// hyper's timer for the header read timeout, which it arms whenever it
/// starts waiting for a request head: the sleep it hands out ends at
/// [`head_deadline`], recomputed as the head's first byte arrives.
///
/// Every sleep of a connection shares one tokio timer (`alarm`), which is
/// left armed when hyper drops a sleep: a fresh timer per head would be
/// put into tokio's timer wheel and taken out again for every request,
/// for a deadline that a busy connection never reaches. The shared timer
/// may ring before the deadline hyper is now waiting for (it was set for
/// an earlier head); it is then moved to that deadline ([`on_alarm`]). So
/// a connection busy with requests moves its timer about once per idle
/// timeout, not once per request.
struct HeadTimer {
    activity: Arc<Activity>,
    timeouts: Timeouts,
    alarm: Alarm,
}

/// The connection's one tokio timer, created when first needed.
type Alarm = Arc<parking_lot::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

impl HeadTimer {
    fn new(activity: Arc<Activity>, timeouts: Timeouts) -> HeadTimer {
        HeadTimer {
            activity,
            timeouts,
            alarm: Alarm::default(),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // Not used by hyper's HTTP/1 server; a plain sleep all the same.
        hyper::rt::Timer::sleep(&hyper_util::rt::TokioTimer::new(), duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let first = self.activity.head_wanted();
        Box::pin(HeadSleep {
            activity: self.activity.clone(),
            timeouts: self.timeouts,
            alarm: self.alarm.clone(),
            wanted_at: Instant::now(),
            first,
        })
    }
}

struct HeadSleep {
    activity: Arc<Activity>,
    timeouts: Timeouts,
    alarm: Alarm,
    wanted_at: Instant,
    first: bool,
}

/// What a head's sleep does with the connection's timer, set for `armed`,
/// when the head's deadline is `deadline`; `rang`: the timer has gone off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmAction {
    /// Wait for the timer as it is.
    Wait,
    /// Set the timer for the deadline and wait.
    Move,
    /// The deadline has passed: the head's time is up.
    Expired,
}

/// Decides [`AlarmAction`]. A timer set for later than the deadline is
/// moved (the head's first byte has brought its deadline forward); one
/// that rang early (set for an earlier head) is moved to the deadline.
pub fn on_alarm(armed: Instant, deadline: Instant, rang: bool) -> AlarmAction {
    match (rang, armed.cmp(&deadline)) {
        (_, std::cmp::Ordering::Greater) => AlarmAction::Move,
        (true, std::cmp::Ordering::Equal) => AlarmAction::Expired,
        (true, std::cmp::Ordering::Less) => AlarmAction::Move,
        (false, _) => AlarmAction::Wait,
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &*self;
        let deadline = tokio::time::Instant::from_std(head_deadline(
            this.wanted_at,
            this.first,
            this.activity.first_byte(),
            this.timeouts,
        ));
        let mut alarm = this.alarm.lock();
        let sleep = alarm.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Two rounds suffice: after a move the timer is set for the
        // deadline, so the second poll waits or expires.
        for _ in 0..2 {
            let rang = sleep.as_mut().poll(cx).is_ready();
            match on_alarm(sleep.deadline().into_std(), deadline.into_std(), rang) {
                AlarmAction::Wait => return Poll::Pending,
                AlarmAction::Expired => return Poll::Ready(()),
                AlarmAction::Move => sleep.as_mut().reset(deadline),
            }
        }
        // The last poll registered the waker, and the timer is set for the
        // deadline.
        let _ = sleep.as_mut().poll(cx);
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        header: Duration::from_secs(10),
    };

    #[test]
    fn a_new_connection_has_the_header_timeout_from_its_accept() {
        let t0 = Instant::now();
        assert_eq!(head_deadline(t0, true, None, T), t0 + T.header);
        let byte = t0 + Duration::from_secs(5);
        assert_eq!(head_deadline(t0, true, Some(byte), T), t0 + T.header);
    }

    #[test]
    fn a_keep_alive_connection_idles_then_has_the_header_timeout() {
        let t0 = Instant::now();
        assert_eq!(head_deadline(t0, false, None, T), t0 + T.idle);
        let byte = t0 + Duration::from_secs(30);
        assert_eq!(head_deadline(t0, false, Some(byte), T), byte + T.header);
    }

    #[test]
    fn the_shared_timer_moves_only_when_it_rings_early_or_is_set_late() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        // Set for an earlier head's deadline: left alone until it rings.
        assert_eq!(on_alarm(t0, later, false), AlarmAction::Wait);
        assert_eq!(on_alarm(t0, later, true), AlarmAction::Move);
        // Set for this deadline.
        assert_eq!(on_alarm(later, later, false), AlarmAction::Wait);
        assert_eq!(on_alarm(later, later, true), AlarmAction::Expired);
        // Set for later than the deadline (the head's first byte came).
        assert_eq!(on_alarm(later, t0, false), AlarmAction::Move);
        assert_eq!(on_alarm(later, t0, true), AlarmAction::Move);
    }

    #[test]
    fn reserved_connections_time_out_quickly() {
        let r = T.for_reserve();
        assert_eq!(r.idle, RESERVE_TIMEOUT);
        assert_eq!(r.header, RESERVE_TIMEOUT);
        let short = Timeouts {
            idle: Duration::from_millis(200),
            header: Duration::from_millis(100),
        };
        assert_eq!(short.for_reserve(), short, "never longer than configured");
    }

    /// A server on loopback whose only route never answers; its port and
    /// the task that runs `serve`.
    async fn stuck_server(
        shutdown: tokio::sync::oneshot::Receiver<()>,
    ) -> (u16, tokio::task::JoinHandle<()>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let metrics = crate::metrics::Metrics::new().unwrap().connections.clone();
        let cfg = ServeConfig {
            budget: listener::connection_budget(1 << 20, 0, 16, 0).unwrap(),
            timeouts: T,
            metrics,
            tls: None,
        };
        let router = Router::new().route("/", axum::routing::get(std::future::pending::<()>));
        let server = tokio::spawn(serve(tcp, router, cfg, async {
            let _ = shutdown.await;
        }));
        (port, server)
    }

    /// Connects and sends a request the server will never answer.
    async fn ask(port: u16) -> TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        client
    }

    /// Whether the server closes `client` within a few seconds.
    async fn closed(client: &mut TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn dropping_serve_ends_its_connections() {
        let (_stop, shutdown) = tokio::sync::oneshot::channel();
        let (port, server) = stuck_server(shutdown).await;
        let mut client = ask(port).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.abort();
        assert!(server.await.unwrap_err().is_cancelled());
        assert!(
            closed(&mut client).await,
            "a connection outlived the server that accepted it"
        );
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_request_in_flight() {
        let (stop, shutdown) = tokio::sync::oneshot::channel();
        let (port, server) = stuck_server(shutdown).await;
        let _client = ask(port).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(500), server).await;
        assert!(waited.is_err(), "serve returned with a request unanswered");
    }
}
