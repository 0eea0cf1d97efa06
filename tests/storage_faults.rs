//! Storage resources running out or going away under a live node: its data
//! dir deleted, its file descriptors used up, its memory budget full. In
//! each case the node refuses writes with a JSON 5xx that says why, writes
//! nothing it did not acknowledge, and (where the shortage passes) takes
//! writes again without a restart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use kvstore_testkit::node::{data_dir, start, REQUEST_TIMEOUT};
use kvstore_testkit::{free_port, run_to_exit, wait_until, Kvd};
use serde_json::Value;
use tempfile::TempDir;

/// A keep-alive HTTP/1.1 connection, so that a test can talk to a node
/// that has no descriptor left for a new one.
struct Conn(TcpStream);

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to kvd");
        s.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        Conn(s)
    }

    /// One request; `(status, body)` of its response (kvd always sends a
    /// Content-Length).
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        write!(
            self.0,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.0.write_all(body)?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 64 << 10];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.0.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let (Some(status), Some(len)) = (status, len) else {
            return Err(std::io::Error::other(format!(
                "unexpected response head: {head}"
            )));
        };
        let mut body = raw.split_off(head_end);
        while body.len() < len {
            let n = self.0.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            body.extend_from_slice(&buf[..n]);
        }
        Ok((status, body))
    }

    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn status(&mut self) -> Value {
        let (code, body) = self.call("GET", "/v1/status", b"");
        assert_eq!(code, 200, "GET /v1/status");
        serde_json::from_slice(&body).expect("status is JSON")
    }
}

/// One request on a fresh connection.
fn call(kvd: &Kvd, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    Conn::open(kvd.port).call(method, path, body)
}

/// The `error.code` of a JSON error body (panics if it is not one).
fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error body without a message: {v}"
    );
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error body without a code: {v}"))
        .to_string()
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// `rm -rf` of a running node's data dir: fsync on the unlinked files still
/// succeeds, so only the node's own check can tell. It must stop taking
/// writes, say so on `/ready`, `/v1/status` and in its log, and keep a
/// second kvd off the path while it still serves.
#[test]
fn removing_the_data_dir_of_a_running_node_stops_its_writes() {
    let tmp = TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let kvd = start(&tmp, &[]);
    assert_eq!(call(&kvd, "PUT", "/v1/kv/before", b"1").0, 200);

    std::fs::remove_dir_all(&dir).unwrap();
    // The very next write is refused, not acknowledged: its fsync went to
    // an unlinked segment, which the WAL checks after every fsync.
    let (code, body) = call(&kvd, "PUT", "/v1/kv/right-after", b"0");
    assert_eq!(
        code,
        503,
        "a write right after the removal: {}",
        text(&body)
    );
    assert_eq!(error_code(&body), "data_dir_lost");
    // Noticed without any write too: /ready fails.
    let mut ready = (0, Vec::new());
    let noticed = wait_until(Duration::from_secs(30), || {
        ready = call(&kvd, "GET", "/ready", b"");
        ready.0 != 200
    });
    assert!(
        noticed,
        "/ready still answers 200 after the data dir was removed: {}",
        text(&ready.1)
    );
    assert_eq!(ready.0, 503, "/ready: {}", text(&ready.1));
    assert_eq!(error_code(&ready.1), "data_dir_lost");

    let writes: [(&str, &str, &[u8]); 3] = [
        ("PUT", "/v1/kv/after", b"2"),
        ("DELETE", "/v1/kv/before", b""),
        (
            "POST",
            "/v1/bulk",
            br#"{"items":[{"key":"b","value":"3"}]}"#,
        ),
    ];
    for (method, path, body) in writes {
        let (code, body) = call(&kvd, method, path, body);
        assert_eq!(code, 503, "{method} {path}: {}", text(&body));
        assert_eq!(error_code(&body), "data_dir_lost", "{method} {path}");
    }
    let s = Conn::open(kvd.port).status();
    assert_eq!(s["storage_poisoned"], true, "{s}");
    assert_eq!(s["storage_state"], "data_dir_lost", "{s}");
    let dir_s = dir.to_str().unwrap();
    assert!(
        s["storage_detail"]
            .as_str()
            .is_some_and(|d| d.contains(dir_s)),
        "the status names what was lost: {s}"
    );
    assert_eq!(s["last_index"], 1, "the refused writes logged nothing: {s}");
    // What was acknowledged is still served from memory.
    assert_eq!(
        call(&kvd, "GET", "/v1/kv/before", b""),
        (200, b"1".to_vec())
    );
    let log = kvd.log();
    assert!(
        log.lines()
            .any(|l| l.contains("refusing writes") && l.contains(dir_s)),
        "no log line says why writes are refused:\n{log}"
    );

    let port = free_port().to_string();
    let (exit, out) = run_to_exit(
        "kvd",
        &["--port", &port, "--data-dir", dir_s],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("a second kvd on the same path did not refuse to start: {e:#}"));
    assert!(
        !exit.success() && out.contains(dir_s) && out.contains("in use"),
        "a second kvd must refuse the path while the first serves it ({exit}):\n{out}"
    );
    assert_eq!(
        call(&kvd, "GET", "/v1/kv/before", b""),
        (200, b"1".to_vec())
    );
}

/// Descriptors kvd holds now (the test runs as the same user).
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing /proc/<pid>/fd")
        .count() as u64
}

/// Idle connections take every descriptor a node has, so the WAL cannot
/// create a file, and writes roll segments. A write may be refused
/// meanwhile (503, nothing logged) but never poisons the WAL: once the
/// connections close, writes work again without a restart, and everything
/// acknowledged survives one. kvd fits its connection budget to `ulimit -n`
/// at start, so to run it out of descriptors the test lowers the running
/// process's limit below that budget (`prlimit`), as an operator might.
/// (A roll takes the segment made in advance and frees the sealed one's
/// descriptor for the next, so it may need no new descriptor at all; the
/// refusal itself is tested deterministically in `storage::wal`'s unit
/// tests.)
#[test]
fn a_descriptor_shortage_refuses_writes_only_while_it_lasts() {
    const VALUE_BYTES: usize = 256 << 10;
    let tmp = TempDir::new().unwrap();
    let args = ["--wal-segment-mib", "1", "--snapshot-every-mib", "1024"];
    let mut kvd =
        Kvd::start(&data_dir(&tmp), &args).unwrap_or_else(|e| panic!("kvd failed to start: {e:#}"));
    let pid = kvd.pid().expect("kvd runs");
    let value = |i: usize| vec![b'a' + (i % 26) as u8; VALUE_BYTES];
    // Opened first, so the test can still talk to kvd at the limit.
    let mut writer = Conn::open(kvd.port);
    assert_eq!(writer.call("PUT", "/v1/kv/k00", &value(0)).0, 200);

    let fd_limit = open_fds(pid) + 32;
    let lowered = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={fd_limit}:{fd_limit}"),
        ])
        .status()
        .expect("running prlimit");
    assert!(lowered.success(), "prlimit failed: {lowered}");
    let mut idle = Vec::new();
    for _ in 0..fd_limit {
        if open_fds(pid) >= fd_limit {
            break;
        }
        let mut c = Conn::open(kvd.port);
        match c.request("GET", "/health", b"") {
            Ok((200, _)) => idle.push(c),
            _ => break,
        }
    }
    let held = open_fds(pid);
    eprintln!(
        "{} idle connections; kvd holds {held} of {fd_limit} descriptors",
        idle.len()
    );
    assert_eq!(
        held, fd_limit,
        "the idle connections did not use up kvd's descriptors"
    );

    // Six segments' worth.
    let (mut acked, mut refused) = (vec![0], Vec::new());
    for i in 1..24 {
        let (code, body) = writer.call("PUT", &format!("/v1/kv/k{i:02}"), &value(i));
        match code {
            200 => acked.push(i),
            503 if error_code(&body) == "wal_unavailable" => refused.push(i),
            _ => panic!(
                "write {i} answered {code} {}: a descriptor shortage must refuse with \
                 503 wal_unavailable and leave the WAL usable",
                text(&body)
            ),
        }
    }
    let s = writer.status();
    assert_eq!(s["storage_state"], "ok", "a shortage is not poison: {s}");
    assert_eq!(s["storage_poisoned"], false, "{s}");
    assert_eq!(writer.call("GET", "/ready", b"").0, 200);

    drop(idle);
    let mut last = (0, Vec::new());
    let recovered = wait_until(Duration::from_secs(60), || {
        last = writer.call("PUT", "/v1/kv/after", b"shortage over");
        last.0 == 200
    });
    assert!(
        recovered,
        "writes are still refused after the idle connections closed: {} {}",
        last.0,
        text(&last.1)
    );
    drop(writer);

    kvd.terminate().unwrap();
    kvd.restart().unwrap();
    for i in acked {
        let (code, body) = call(&kvd, "GET", &format!("/v1/kv/k{i:02}"), b"");
        assert!(code == 200 && body == value(i), "acknowledged k{i:02} lost");
    }
    for i in refused {
        let (code, _) = call(&kvd, "GET", &format!("/v1/kv/k{i:02}"), b"");
        assert_eq!(code, 404, "refused k{i:02} was written");
    }
    assert_eq!(call(&kvd, "GET", "/v1/kv/after", b"").0, 200);
}

/// `--max-memory-mib`: a write that would grow the data set past it gets
/// 507 and writes nothing; deletes are taken and make room again.
#[test]
fn writes_past_the_memory_budget_get_507_and_deletes_make_room() {
    const LIMIT_BYTES: u64 = 1 << 20;
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--max-memory-mib", "1"]);
    let mut c = Conn::open(kvd.port);
    let value = vec![b'v'; 64 << 10];

    let mut stored = 0;
    let refusal = loop {
        let (code, body) = c.call("PUT", &format!("/v1/kv/k{stored:02}"), &value);
        if code != 200 {
            break (code, body);
        }
        stored += 1;
        assert!(stored <= 16, "16 values of 64 KiB already fill 1 MiB");
    };
    assert!(stored >= 14, "only {stored} values of 64 KiB fit in 1 MiB");
    assert_eq!(refusal.0, 507, "{}", text(&refusal.1));
    assert_eq!(error_code(&refusal.1), "memory_full");
    let full = c.status();
    let used = full["memory"]["data_set_bytes"]
        .as_u64()
        .expect("data_set_bytes");
    assert!(
        used <= LIMIT_BYTES,
        "the data set outgrew its budget: {full}"
    );
    assert_eq!(full["memory"]["max_bytes"], LIMIT_BYTES, "{full}");

    // Less than one more 64 KiB value fits; each of these needs more.
    let big = "x".repeat(40 << 10);
    let bulk =
        format!(r#"{{"items":[{{"key":"b1","value":"{big}"}},{{"key":"b2","value":"{big}"}}]}}"#);
    let new_key_value = vec![b'n'; 64 << 10];
    for (method, path, body) in [
        ("POST", "/v1/bulk", bulk.as_bytes()),
        ("PUT", "/v1/kv/new", &new_key_value[..]),
    ] {
        let (code, body) = c.call(method, path, body);
        assert_eq!(code, 507, "{method} {path}: {}", text(&body));
        assert_eq!(error_code(&body), "memory_full");
    }
    let s = c.status();
    assert_eq!(
        s["last_index"], full["last_index"],
        "a refusal logged something"
    );
    assert_eq!(s["keys"], stored, "{s}");
    assert_eq!(
        s["storage_state"], "ok",
        "a full budget is not a storage fault"
    );
    assert_eq!(c.call("GET", "/ready", b"").0, 200);

    // A write that does not grow the data set still passes; a delete frees.
    assert_eq!(c.call("PUT", "/v1/kv/k00", b"small").0, 200);
    let (code, body) = c.call("DELETE", "/v1/kv/k01", b"");
    assert_eq!(
        (code, text(&body).contains("\"deleted\":true")),
        (200, true)
    );
    assert_eq!(c.call("PUT", "/v1/kv/new", &new_key_value).0, 200);
    assert_eq!(c.call("GET", "/v1/kv/new", b""), (200, new_key_value));
    let after = c.status();
    assert!(after["memory"]["data_set_bytes"].as_u64().unwrap() <= LIMIT_BYTES);
}
