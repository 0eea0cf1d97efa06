//! The accept loop when the process runs out of file descriptors: accept(2)
//! fails with EMFILE, and the loop must neither spin on it nor give up.
//!
//! In-process (the only way to exhaust the descriptors of the process that
//! runs the loop at a chosen moment), and alone in its test binary, since
//! it lowers this process's RLIMIT_NOFILE: a real listener on 127.0.0.1, a
//! real client socket, and the descriptor table filled with /dev/null.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use kvd::api::listener::{self, connection_budget};
use kvd::api::serve::{serve, ServeConfig, Timeouts};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

const DEADLINE: Duration = Duration::from_secs(30);

fn open_fds() -> u64 {
    // Listing the directory takes a descriptor of its own.
    std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .count() as u64
        - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_on_emfile_and_serves_once_descriptors_free_up() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let metrics = kvd::metrics::Metrics::new().unwrap();
    let accept_errors = metrics.connections.accept_errors_total.clone();
    let cfg = ServeConfig {
        budget: connection_budget(1 << 20, 0, 16, 0).unwrap(),
        timeouts: Timeouts {
            idle: DEADLINE,
            header: DEADLINE,
        },
        metrics: metrics.connections.clone(),
        tls: None,
    };
    let router = Router::new().route("/", get(|| async { "ok" }));
    tokio::spawn(serve(tcp, router, cfg, std::future::pending()));

    // Leave this process exactly one free descriptor, for the client.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 16, hard).unwrap();
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(libc_emfile()) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    fillers.pop();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let connected = Instant::now();

    // The loop cannot take the connection: each accept fails. Four
    // failures take at least the three waits between them.
    let failed = wait_until(|| accept_errors.get() >= 4);
    let elapsed = connected.elapsed();
    drop(fillers);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert!(
        failed,
        "accept never failed: the test did not exhaust the descriptors"
    );
    let waits = listener::accept_retry_delay(1)
        + listener::accept_retry_delay(2)
        + listener::accept_retry_delay(3);
    assert!(
        elapsed >= waits - Duration::from_millis(5),
        "4 failed accepts in {elapsed:?}: the loop spins instead of waiting {waits:?}"
    );

    // With descriptors free again, the same loop accepts and serves.
    let answer = tokio::task::spawn_blocking(move || {
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            client,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
}

/// EMFILE on Linux.
fn libc_emfile() -> i32 {
    nix::errno::Errno::EMFILE as i32
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}
