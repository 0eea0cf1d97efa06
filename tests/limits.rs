//! Limits on connections and what they hold: the connection budget (and the
//! reserve kept for peers and health checks), the header and idle timeouts,
//! the descriptors kept for the WAL under a low `ulimit -n`, and the memory
//! budget for request bodies. Everything is observed over raw sockets, and
//! every wait polls for a positive signal with a generous deadline.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvstore_testkit::node::start;
use kvstore_testkit::raw::{
    self, answered_within, closed_by_server, connect, get, put, read_answer, wait_for_metric,
    DEADLINE,
};
use kvstore_testkit::{bin, free_port, http_get, wait_until};
use tempfile::TempDir;

/// Long enough that no timeout fires during a test that does not test it.
const NEVER_MS: &str = "600000";

#[test]
fn a_client_over_the_connection_limit_waits_until_one_closes() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &[
            "--max-connections",
            "2",
            "--reserved-connections",
            "0",
            "--idle-timeout-ms",
            NEVER_MS,
        ],
    );

    // Two keep-alive connections, each proven accepted by a served request.
    let mut a = connect(kvd.port);
    let mut b = connect(kvd.port);
    assert_eq!(get(&mut a, "/health").unwrap().status, 200);
    assert_eq!(get(&mut b, "/health").unwrap().status, 200);

    // The third connects (the kernel queues it) and sends its request.
    let mut c = connect(kvd.port);
    write!(c, "GET /health HTTP/1.1\r\nHost: kvd\r\n\r\n").unwrap();

    // kvd says it has stopped accepting with both slots taken: the third
    // is in the backlog, not being served.
    let m = wait_for_metric(&mut b, "kvd_http_accept_paused", |v| v == 1.0);
    assert_eq!(
        raw::metric(&m, "kvd_http_connections{pool=\"client\"}"),
        Some(2.0)
    );

    // Closing one frees its slot: the waiting client gets its answer.
    drop(a);
    let served = answered_within(&mut c, DEADLINE).expect("the waiting client was never served");
    assert_eq!(served.status, 200);
    drop(b);
}

#[test]
fn idle_connections_holding_every_client_slot_leave_room_for_health_checks() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &[
            "--max-connections",
            "4",
            "--reserved-connections",
            "2",
            "--idle-timeout-ms",
            NEVER_MS,
            "--header-timeout-ms",
            NEVER_MS,
        ],
    );
    // Four keep-alive clients that made a request and then went quiet. The
    // first waits until it is the only one open (the kit's start-up check
    // closes its connection asynchronously), so the others are counted
    // against the client pool, not the reserve.
    let mut idle = vec![connect(kvd.port)];
    wait_for_metric(&mut idle[0], "kvd_http_connections{pool=\"client\"}", |v| {
        v == 1.0
    });
    idle.extend((0..3).map(|_| connect(kvd.port)));
    for s in &mut idle {
        assert_eq!(get(s, "/health").unwrap().status, 200);
    }

    // kvsup's health check (and a peer's append) arrives on a new
    // connection: a reserved slot serves it.
    let mut check = connect(kvd.port);
    write!(check, "GET /v1/status HTTP/1.1\r\nHost: kvd\r\n\r\n").unwrap();
    let answer = answered_within(&mut check, DEADLINE)
        .expect("a health check was not answered while idle clients held every slot");
    assert_eq!(answer.status, 200);

    // A reserved slot is handed back quickly: idle, it is closed within
    // about a second, while the client-pool connections are kept.
    if !closed_by_server(&mut check, DEADLINE) {
        let m = get(&mut idle[0], "/metrics").unwrap();
        let m = String::from_utf8_lossy(&m.body).into_owned();
        panic!(
            "a reserved connection was kept idle: {}",
            m.lines()
                .filter(|l| l.starts_with("kvd_http_conn"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // Sockets that take the reserved slots and send nothing lose them too,
    // and whoever waits behind them is served.
    let mut squatters: Vec<TcpStream> = (0..2).map(|_| connect(kvd.port)).collect();
    let mut late = connect(kvd.port);
    write!(late, "GET /v1/status HTTP/1.1\r\nHost: kvd\r\n\r\n").unwrap();
    let answer = answered_within(&mut late, DEADLINE)
        .expect("a client behind silent reserved connections was never served");
    assert_eq!(answer.status, 200);
    for s in &mut squatters {
        assert!(
            closed_by_server(s, DEADLINE),
            "a silent reserved connection was kept"
        );
    }
    for s in &mut idle {
        assert_eq!(
            get(s, "/health").unwrap().status,
            200,
            "client-pool connections keep their long timeouts"
        );
    }
}

#[test]
fn a_connection_that_sends_half_a_head_is_closed() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &["--header-timeout-ms", "300", "--idle-timeout-ms", NEVER_MS],
    );

    // A new connection that stops in the middle of its head.
    let mut half = connect(kvd.port);
    write!(half, "GET /health HTTP/1.1\r\nHost: kvd\r\n").unwrap();
    // A new connection that sends nothing at all.
    let mut silent = connect(kvd.port);
    // A keep-alive connection that was served, then stalls in its next head
    // (its idle timeout is long; the header timeout still applies).
    let mut stalled = connect(kvd.port);
    assert_eq!(get(&mut stalled, "/health").unwrap().status, 200);
    write!(stalled, "PUT /v1/kv/k HTTP/1.1\r\n").unwrap();

    for (name, s) in [
        ("half a head", &mut half),
        ("nothing", &mut silent),
        ("half its second head", &mut stalled),
    ] {
        assert!(
            closed_by_server(s, DEADLINE),
            "a connection that sent {name} was kept open"
        );
    }
    // The node still serves.
    let mut fresh = connect(kvd.port);
    assert_eq!(get(&mut fresh, "/health").unwrap().status, 200);
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &["--idle-timeout-ms", "300", "--header-timeout-ms", NEVER_MS],
    );
    let mut s = connect(kvd.port);
    assert_eq!(get(&mut s, "/health").unwrap().status, 200);
    assert!(
        closed_by_server(&mut s, DEADLINE),
        "an idle keep-alive connection was kept open"
    );
}

/// A kvd started under `ulimit -n nofile` (through `sh`, which the kit
/// cannot do), killed by PID when dropped.
struct LimitedKvd {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl LimitedKvd {
    fn start(dir: &Path, nofile: u32, extra: &[&str]) -> LimitedKvd {
        let port = free_port();
        let log = dir.join("kvd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin("kvd"))
            .args(["--port", &port.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut kvd = LimitedKvd { child, port, log };
        let up = wait_until(Duration::from_secs(60), || {
            assert!(
                kvd.child.try_wait().unwrap().is_none(),
                "kvd exited: {}",
                kvd.log()
            );
            matches!(
                http_get(port, "/health", Duration::from_millis(500)),
                Ok((200, _))
            )
        });
        assert!(up, "kvd did not start: {}", kvd.log());
        kvd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for LimitedKvd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_connection_flood_cannot_take_the_descriptors_the_wal_needs() {
    const NOFILE: u32 = 256;
    let tmp = TempDir::new().unwrap();
    let kvd = LimitedKvd::start(
        tmp.path(),
        NOFILE,
        &[
            "--wal-segment-mib",
            "1",
            "--snapshot-every-mib",
            "1",
            "--idle-timeout-ms",
            NEVER_MS,
            "--header-timeout-ms",
            NEVER_MS,
        ],
    );

    // A client that is in before the flood.
    let mut w = connect(kvd.port);
    assert_eq!(put(&mut w, "before", b"1").unwrap().status, 200);

    // More connections than the process may have descriptors, all idle.
    let flood: Vec<TcpStream> = (0..NOFILE + 50)
        .map(|_| TcpStream::connect(("127.0.0.1", kvd.port)).unwrap())
        .collect();
    // kvd has taken as many as it will: all of its descriptors but the 64
    // it keeps (give or take a few that come and go).
    let slack = 8;
    let took_them = wait_until(DEADLINE, || kvd.open_fds() >= NOFILE as usize - 64 - slack);
    assert!(took_them, "kvd has {} descriptors open", kvd.open_fds());

    // Writes that need new WAL segments and a snapshot still succeed.
    let value = vec![b'v'; 600 << 10];
    for i in 0..4 {
        let a = put(&mut w, &format!("big{i}"), &value).unwrap();
        assert_eq!(
            a.status,
            200,
            "PUT {i} after the connection flood: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let segments = std::fs::read_dir(tmp.path().join("data/wal"))
        .unwrap()
        .count();
    let snapshots = std::fs::read_dir(tmp.path().join("data/snap"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        segments + snapshots >= 2,
        "the writes were meant to open a new segment or snapshot \
         ({segments} segments, {snapshots} snapshots)"
    );
    let ready = get(&mut w, "/ready").unwrap();
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert!(
        kvd.log().contains(&format!("RLIMIT_NOFILE {NOFILE}")),
        "the start-up log must give the connection budget and its source:\n{}",
        kvd.log()
    );
    drop(flood);
}

/// `PUT /v1/kv/key` on a new connection, sending the body only once kvd
/// answers `100 Continue`; the final answer.
fn put_expecting_continue(port: u16, key: &str, value: &[u8]) -> raw::Answer {
    let mut s = connect(port);
    write!(
        s,
        "PUT /v1/kv/{key} HTTP/1.1\r\nHost: kvd\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        value.len()
    )
    .unwrap();
    let first = read_answer(&mut s).unwrap();
    if first.status != 100 {
        return first;
    }
    s.write_all(value).unwrap();
    read_answer(&mut s).unwrap()
}

#[test]
fn request_bodies_beyond_the_memory_budget_get_503_overloaded() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &[
            "--max-inflight-body-bytes",
            "1000000",
            "--max-value-bytes",
            "800000",
            "--body-timeout-ms",
            NEVER_MS,
        ],
    );

    // A announces 800 000 bytes and waits for `100 Continue`: kvd sends it
    // when the handler starts reading, after the body's bytes are reserved.
    let mut a = connect(kvd.port);
    write!(
        a,
        "PUT /v1/kv/a HTTP/1.1\r\nHost: kvd\r\nContent-Length: 800000\r\n\
         Expect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let cont = read_answer(&mut a).unwrap();
    assert_eq!(cont.status, 100, "{}", cont.head);

    // B's 400 000 bytes do not fit beside them: refused before B sends them.
    let refused = put_expecting_continue(kvd.port, "b", &vec![b'b'; 400_000]);
    assert_eq!(
        refused.status,
        503,
        "a body beyond the budget: {}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.error_code(), "overloaded");
    let mut c = connect(kvd.port);
    assert_eq!(
        get(&mut c, "/v1/kv/b").unwrap().status,
        404,
        "B wrote nothing"
    );

    // Once A is done, its bytes are given back.
    a.write_all(&vec![b'a'; 800_000]).unwrap();
    assert_eq!(read_answer(&mut a).unwrap().status, 200);
    assert_eq!(put(&mut c, "b", &vec![b'b'; 400_000]).unwrap().status, 200);

    // A chunked body reserves its bytes as they arrive: 750 000 of them.
    let mut chunked = connect(kvd.port);
    write!(
        chunked,
        "PUT /v1/kv/chunked HTTP/1.1\r\nHost: kvd\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for size in [100_000; 7].into_iter().chain([50_000]) {
        write!(chunked, "{size:x}\r\n").unwrap();
        chunked.write_all(&vec![b'c'; size]).unwrap();
        chunked.write_all(b"\r\n").unwrap();
    }
    // Once kvd says it holds all of them, a body that does not fit beside
    // them is refused.
    wait_for_metric(&mut c, "kvd_http_body_bytes_inflight", |v| v >= 750_000.0);
    let d = put_expecting_continue(kvd.port, "d", &vec![b'd'; 300_000]);
    assert_eq!(
        d.status,
        503,
        "a body beside 750 000 chunked bytes being read: {}",
        String::from_utf8_lossy(&d.body)
    );
    assert_eq!(d.error_code(), "overloaded");
    chunked.write_all(b"0\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut chunked).unwrap().status, 200);
    let d = put_expecting_continue(kvd.port, "d", &vec![b'd'; 300_000]);
    assert_eq!(d.status, 200);
}
