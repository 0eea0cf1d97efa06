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
use crate::metrics::ConnectionMetrics;

/// Largest request head (request line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most header fields in one request (hyper's default).
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

/// The router's service with [`Serving`] put into every request.
struct WithServing<S> {
    inner: S,
    serving: Serving,
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
        connections.spawn(connection(
            stream,
            slot,
            router.clone(),
            timeouts,
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
    mut stop: watch::Receiver<bool>,
) {
    // Replies are small and each completes a request: send them at once
    // rather than letting Nagle wait for the client's delayed ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    let parked = ParkedSlot::default();
    let io = TokioIo::new(ConnIo::new(stream, activity.clone(), parked.clone()));
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer { activity, timeouts })
        // Turns the timer on; `HeadTimer` computes the actual deadlines.
        .header_read_timeout(timeouts.header)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let serving = Serving {
        stop: stop.clone(),
        streams: Arc::new(AtomicUsize::new(0)),
    };
    let service = WithServing {
        inner: TowerToHyperService::new(router),
        serving: serving.clone(),
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
struct HeadTimer {
    activity: Arc<Activity>,
    timeouts: Timeouts,
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
            wanted_at: Instant::now(),
            first,
            sleep: None,
        })
    }
}

struct HeadSleep {
    activity: Arc<Activity>,
    timeouts: Timeouts,
    wanted_at: Instant,
    first: bool,
    /// Created on the first poll: most heads arrive before hyper waits.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let deadline = tokio::time::Instant::from_std(head_deadline(
            this.wanted_at,
            this.first,
            this.activity.first_byte(),
            this.timeouts,
        ));
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
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
