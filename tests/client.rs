//! The kvclient library against real kvd processes: what each call sends
//! and gets back, typed errors, failover across endpoints, timeouts of a
//! stopped node and the bounds of a call.
//!
//! Every node is a real `kvd` on a free loopback port with a data dir in a
//! temp dir. Where the client must have sent something (or nothing), the
//! proof comes from the node itself: its stored keys and its
//! `kvd_http_requests_total` counters.
//!
//! Not covered here, because a single-node kvd cannot produce them yet:
//! redirects to the primary (307 + `X-KV-Primary`; the redirect-target
//! parsing is unit-tested in kvclient/src/client.rs), `Retry-After` (kvd
//! never sends it). Search and similar, library and CLI, are in tests/search.rs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvclient::{Backoff, Client, ClientBuilder, Error, KeyError, Precondition};
use kvstore_testkit::{free_port, http_get, wait_until, Kvd, Sig};
use serde_json::json;
use tempfile::TempDir;

/// Bound for anything that should be quick: debug builds on a loaded CI
/// machine are slow, and a hang must still end the test.
const GENEROUS: Duration = Duration::from_secs(30);

/// Starts a kvd in its own subdirectory of `tmp` (so several nodes can share
/// one temp dir), panicking with its log if it fails.
fn start(tmp: &TempDir, name: &str, extra: &[&str]) -> Kvd {
    Kvd::start(&tmp.path().join(name), extra)
        .unwrap_or_else(|e| panic!("kvd {name} failed to start: {e:#}"))
}

/// A client over `urls` with generous timeouts and millisecond backoff, so
/// retries are quick and only the limits a test sets can end a call early.
fn builder(urls: &[String]) -> ClientBuilder {
    Client::builder()
        .endpoints(urls.iter().cloned())
        .request_timeout(GENEROUS)
        .retry_deadline(GENEROUS)
        .backoff(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        })
}

fn client(urls: &[String]) -> Client {
    builder(urls).build().expect("building a client")
}

/// `kvd_http_requests_total` of `kvd`, summed over the series whose labels
/// satisfy `keep(op, code)`. Read after the client has its answer, so every
/// request it made is counted (kvd counts before it responds).
fn requests(kvd: &Kvd, keep: impl Fn(&str, &str) -> bool) -> u64 {
    let (status, body) = http_get(kvd.port, "/metrics", GENEROUS).expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics");
    let text = String::from_utf8(body).expect("metrics are UTF-8");
    let label = |line: &str, name: &str| -> String {
        let start = format!("{name}=\"");
        line.split_once(&start)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(value, _)| value.to_owned())
            .unwrap_or_default()
    };
    text.lines()
        .filter(|line| line.starts_with("kvd_http_requests_total{"))
        .filter(|line| keep(&label(line, "op"), &label(line, "code")))
        .map(|line| {
            let value = line.rsplit(' ').next().unwrap_or_default();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad counter line {line:?}")) as u64
        })
        .sum()
}

/// Requests of one operation answered with one status code.
fn answered(kvd: &Kvd, op: &str, code: u16) -> u64 {
    let code = code.to_string();
    requests(kvd, |o, c| o == op && c == code)
}

/// Single-letter process state from `/proc/<pid>/stat` (`T` once stopped).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may contain spaces; the state
    // is the first field after the closing one.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .unwrap_or('?')
}

/// A node stopped with SIGSTOP: it keeps its socket, so connections are
/// accepted by the kernel and then nothing answers. SIGCONT on drop, also
/// when the test panics, so the kit can kill it cleanly.
struct Stopped<'a>(&'a Kvd);

impl<'a> Stopped<'a> {
    fn new(kvd: &'a Kvd) -> Stopped<'a> {
        kvd.signal(Sig::SIGSTOP).expect("SIGSTOP kvd");
        let pid = kvd.pid().expect("kvd runs");
        assert!(
            wait_until(GENEROUS, || proc_state(pid) == 'T'),
            "kvd did not stop"
        );
        Stopped(kvd)
    }

    /// SIGCONT, then waits until the node answers again.
    fn resume(self) {
        let kvd = self.0;
        drop(self);
        assert!(
            wait_until(GENEROUS, || matches!(
                http_get(kvd.port, "/health", Duration::from_secs(1)),
                Ok((200, _))
            )),
            "kvd did not come back after SIGCONT"
        );
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = self.0.signal(Sig::SIGCONT);
    }
}

/// Occupies the only request slot of a kvd started with
/// `--max-inflight-requests 1`: a PUT whose body has not finished arriving
/// stays in flight, so kvd answers every other request 503 "overloaded"
/// until [`HeldRequest::release`].
struct HeldRequest {
    stream: TcpStream,
    /// Earlier tries of the held PUT that kvd refused with 503 (see
    /// [`HeldRequest::start`]); they count in kvd's metrics like any other.
    refused: u64,
}

const HELD_BODY: &[u8] = b"held value";

impl HeldRequest {
    fn start(kvd: &Kvd) -> HeldRequest {
        let mut held = HeldRequest::send(kvd);
        // The slot is ours once kvd refuses a request of our own: nothing
        // else talks to this node. But the probe can reach kvd before the
        // held request and take the slot first, so the held request is
        // refused instead; then it is sent again.
        let overloaded = wait_until(GENEROUS, || {
            if held.was_answered() {
                let refused = held.refused + 1;
                held = HeldRequest::send(kvd);
                held.refused = refused;
            }
            matches!(
                http_get(kvd.port, "/health", Duration::from_secs(1)),
                Ok((503, _))
            )
        });
        assert!(
            overloaded && !held.was_answered(),
            "could not occupy kvd's request slot; log:\n{}",
            kvd.log()
        );
        held
    }

    /// Sends the request's head and the first byte of its body.
    fn send(kvd: &Kvd) -> HeldRequest {
        let mut stream = TcpStream::connect(("127.0.0.1", kvd.port)).expect("connecting to kvd");
        stream
            .set_read_timeout(Some(GENEROUS))
            .expect("setting a read timeout");
        write!(
            stream,
            "PUT /v1/kv/held HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            HELD_BODY.len()
        )
        .expect("sending the held request's head");
        stream
            .write_all(&HELD_BODY[..1])
            .expect("sending the first body byte");
        HeldRequest { stream, refused: 0 }
    }

    /// Whether kvd has answered (or closed) the held request already.
    fn was_answered(&self) -> bool {
        let mut byte = [0u8; 1];
        self.stream
            .set_nonblocking(true)
            .expect("making the socket non-blocking");
        let answered = !matches!(
            self.stream.peek(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        self.stream
            .set_nonblocking(false)
            .expect("making the socket blocking");
        answered
    }

    /// Sends the rest of the body and returns the held request's status.
    fn release(mut self) -> u16 {
        self.stream
            .write_all(&HELD_BODY[1..])
            .expect("sending the rest of the body");
        let mut raw = Vec::new();
        self.stream
            .read_to_end(&mut raw)
            .expect("reading the held request's response");
        let head = String::from_utf8_lossy(&raw);
        head.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_round_trips_through_a_real_kvd() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &["--node-id", "round-trip"]);
    let c = client(&[kvd.url()]);

    // Every byte value, and an empty value (present, not absent).
    let binary: Vec<u8> = (0..=255u8).collect();
    let set_index = c.set("bin", binary.clone()).await.unwrap();
    assert!(set_index >= 1, "{set_index}");
    assert_eq!(
        c.get("bin").await.unwrap(),
        Some(Bytes::from(binary.clone()))
    );
    assert_eq!(
        c.get_consistent("bin").await.unwrap(),
        Some(Bytes::from(binary.clone()))
    );
    let empty_index = c.set("empty", Bytes::new()).await.unwrap();
    assert!(empty_index > set_index, "{empty_index} after {set_index}");
    assert_eq!(c.get("empty").await.unwrap(), Some(Bytes::new()));
    assert_eq!(c.get("missing").await.unwrap(), None);
    assert_eq!(c.get_consistent("missing").await.unwrap(), None);

    let deleted = c.delete("bin").await.unwrap();
    assert!(deleted.deleted);
    assert!(deleted.index > empty_index);
    assert_eq!(c.get("bin").await.unwrap(), None);
    let again = c.delete("bin").await.unwrap();
    assert!(
        !again.deleted,
        "deleting an absent key succeeds, deleted=false"
    );
    assert!(again.index > deleted.index);

    // UTF-8 values travel as JSON strings, others as base64; the node must
    // store the decoded bytes either way.
    let items = vec![
        ("t".to_owned(), Bytes::from_static(b"text")),
        ("b".to_owned(), Bytes::from_static(&[0, 0xff])),
        ("looks-like-base64".to_owned(), Bytes::from_static(b"AP8=")),
        ("e".to_owned(), Bytes::new()),
    ];
    let bulk = c.bulk_set(&items).await.unwrap();
    assert_eq!(bulk.count, 4);
    assert!(bulk.index > again.index);
    for (key, value) in &items {
        assert_eq!(c.get(key).await.unwrap().as_ref(), Some(value), "{key}");
    }
    let (status, raw) = http_get(kvd.port, "/v1/kv/b", GENEROUS).unwrap();
    assert_eq!((status, raw.as_slice()), (200, &[0u8, 0xff][..]));

    let status = c.status().await.unwrap();
    assert_eq!(status.node_id().as_deref(), Some("round-trip"));
    assert_eq!(status.role(), Some("primary"));
    assert_eq!(status.epoch(), Some(1));
    assert_eq!(status.keys(), Some(5), "empty, t, b, looks-like-base64, e");
    assert_eq!(status.last_index(), Some(bulk.index));
    assert_eq!(status.commit_index(), Some(bulk.index));
    // Fields without an accessor are kept, not dropped.
    assert_eq!(status.as_json()["mode"], json!("single"));
    assert_eq!(status.as_json()["peers"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_needing_percent_encoding_address_exactly_that_key() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    let c = client(&[kvd.url()]);
    let long = "k".repeat(kvclient::MAX_KEY_BYTES);
    let keys = [
        "a b",
        "dir/sub/leaf",
        "dir/",
        "/leading",
        "a//b",
        "ünïcødé/键/🔑",
        "100%",
        "%2F",
        "%41",
        "what?",
        "what?x=1&y=2",
        "frag#ment",
        "a+b",
        "semi;colon",
        "tab\there",
        "line\nbreak",
        "quote\"'`",
        "back\\slash",
        "a/../b",
        "./x",
        "x/.",
        "...",
        long.as_str(),
    ];
    // Written through the URL path...
    for key in keys {
        c.set(key, format!("set:{key}")).await.unwrap();
    }
    let status = c.status().await.unwrap();
    assert_eq!(
        status.keys(),
        Some(keys.len() as u64),
        "each key is its own key on the node"
    );
    for key in keys {
        let got = c.get(key).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("set:{key}").as_bytes()),
            "{key:?}"
        );
    }
    // ...then overwritten through bulk JSON, where a key is a plain string.
    // Had the path encoding stored any key under a different name, the
    // bulk write would have created a second key instead of replacing it.
    let items: Vec<(String, Bytes)> = keys
        .iter()
        .map(|k| (k.to_string(), Bytes::from(format!("bulk:{k}"))))
        .collect();
    c.bulk_set(&items).await.unwrap();
    let status = c.status().await.unwrap();
    assert_eq!(status.keys(), Some(keys.len() as u64), "no key was added");
    for key in keys {
        let got = c.get(key).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("bulk:{key}").as_bytes()),
            "{key:?}"
        );
        assert!(c.delete(key).await.unwrap().deleted, "{key:?}");
    }
    assert_eq!(c.status().await.unwrap().keys(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_refused_before_any_request() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    let c = client(&[kvd.url()]);
    let not_metrics = |op: &str, _: &str| op != "metrics";
    let before = requests(&kvd, not_metrics);

    let too_long = "k".repeat(kvclient::MAX_KEY_BYTES + 1);
    type IsExpected = fn(&KeyError) -> bool;
    let cases: [(&str, IsExpected); 5] = [
        ("", |r| matches!(r, KeyError::Empty)),
        ("a\0b", |r| matches!(r, KeyError::ContainsNul { at: 1 })),
        (&too_long, |r| matches!(r, KeyError::TooLong { len: 1025 })),
        (".", |r| matches!(r, KeyError::DotSegment(_))),
        ("..", |r| matches!(r, KeyError::DotSegment(_))),
    ];
    for (key, expected) in cases {
        let errors = [
            c.set(key, "v").await.unwrap_err(),
            c.get(key).await.unwrap_err(),
            c.get_consistent(key).await.unwrap_err(),
            c.delete(key).await.unwrap_err(),
        ];
        for err in errors {
            match &err {
                Error::InvalidKey { reason, .. } => assert!(expected(reason), "{key:?}: {err}"),
                other => panic!("{key:?}: expected InvalidKey, got {other:?}"),
            }
            assert_eq!(err.code(), "invalid_key");
            assert!(!err.is_retryable());
            assert_eq!(err.endpoint(), None, "no node was involved");
        }
    }
    // One bad key fails the whole bulk before sending.
    for bad in ["", "a\0b", too_long.as_str()] {
        let err = c
            .bulk_set(&[
                ("ok".to_owned(), Bytes::from_static(b"v")),
                (bad.to_owned(), Bytes::from_static(b"v")),
            ])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_key", "{bad:?}");
    }
    assert_eq!(
        requests(&kvd, not_metrics),
        before,
        "an invalid key never reaches the node"
    );
    assert_eq!(c.get("ok").await.unwrap(), None, "nothing was written");

    // Dot keys are valid keys that only a URL cannot carry; bulk can.
    let bulk = c
        .bulk_set(&[("..".to_owned(), Bytes::from_static(b"dots"))])
        .await
        .unwrap();
    assert_eq!(bulk.count, 1);
    assert_eq!(c.status().await.unwrap().keys(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_carry_the_servers_status_and_code_and_are_not_retried() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        "n",
        &["--max-value-bytes", "16", "--max-bulk-items", "2"],
    );
    let c = client(&[kvd.url()]);

    let err = c.set("k", vec![b'x'; 17]).await.unwrap_err();
    match &err {
        Error::Server {
            endpoint,
            status,
            code,
            message,
            retry_after,
        } => {
            assert_eq!(endpoint, &kvd.url());
            assert_eq!(*status, 413);
            assert_eq!(code, "value_too_large");
            assert!(message.contains("16"), "the limit is named: {message}");
            assert_eq!(*retry_after, None);
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(err.status(), Some(413));
    assert!(!err.is_retryable());
    assert_eq!(answered(&kvd, "put", 413), 1, "a 413 is not retried");
    assert_eq!(c.get("k").await.unwrap(), None, "nothing was written");
    // At the limit is fine.
    c.set("k", vec![b'x'; 16]).await.unwrap();

    let err = c
        .bulk_set(&[
            ("a".to_owned(), Bytes::from_static(b"1")),
            ("b".to_owned(), Bytes::from(vec![0u8; 17])),
        ])
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(413), "value_too_large"));
    assert!(err.to_string().contains("items[1]"), "{err}");
    let three: Vec<(String, Bytes)> = ["a", "b", "c"]
        .iter()
        .map(|k| (k.to_string(), Bytes::from_static(b"v")))
        .collect();
    let err = c.bulk_set(&three).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(413), "too_many_items"));
    assert!(!err.is_retryable());
    assert_eq!(answered(&kvd, "bulk", 413), 2, "neither was retried");
    assert_eq!(
        c.get("a").await.unwrap(),
        None,
        "a failed bulk writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_other_than_key_not_found_is_an_error_not_an_absent_key() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    // A wrong base URL: every request lands on kvd's unknown-route 404.
    let c = client(&[format!("{}/wrong-prefix", kvd.url())]);
    let err = c.get("k").await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(404), "not_found"),
        "{err}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_responses_are_refused() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    client(&[kvd.url()])
        .set("big", vec![b'x'; 2048])
        .await
        .unwrap();
    let c = builder(&[kvd.url()])
        .max_response_bytes(1024)
        .build()
        .unwrap();
    let err = c.get("big").await.unwrap_err();
    assert!(
        matches!(&err, Error::ResponseTooLarge { limit_bytes: 1024, endpoint } if *endpoint == kvd.url()),
        "{err:?}"
    );
    assert_eq!(err.code(), "response_too_large");
    assert!(!err.is_retryable());
    // A small value through the same client is fine.
    c.set("small", "v").await.unwrap();
    assert_eq!(c.get("small").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_with_nothing_listening_is_skipped() {
    let tmp = TempDir::new().unwrap();
    let live = start(&tmp, "live", &[]);
    client(&[live.url()]).set("k", "v").await.unwrap();

    let dead = format!("http://127.0.0.1:{}", free_port());
    let c = client(&[dead.clone(), live.url()]);
    assert_eq!(c.current_endpoint(), dead);
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(
        c.current_endpoint(),
        live.url(),
        "it stays on the live node"
    );
    c.set("k2", "v2").await.unwrap();
    assert_eq!(answered(&live, "put", 200), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_over_when_the_current_node_is_killed() {
    let tmp = TempDir::new().unwrap();
    let mut a = start(&tmp, "a", &[]);
    let b = start(&tmp, "b", &[]);
    let c = client(&[a.url(), b.url()]);

    c.set("k", "on a").await.unwrap();
    assert_eq!(c.current_endpoint(), a.url());
    assert_eq!(answered(&a, "put", 200), 1);

    a.kill9().unwrap();
    c.set("k", "on b").await.unwrap();
    assert_eq!(c.current_endpoint(), b.url());
    assert_eq!(
        client(&[b.url()]).get("k").await.unwrap().as_deref(),
        Some(&b"on b"[..])
    );
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"on b"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_down_is_a_retryable_connect_error_within_the_deadline() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, "n", &[]);
    let url = kvd.url();
    kvd.kill9().unwrap();

    let deadline = Duration::from_millis(500);
    let c = builder(std::slice::from_ref(&url))
        .max_retries(1_000)
        .retry_deadline(deadline)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = c.status().await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.code(), "connect");
    assert_eq!(err.endpoint(), Some(url.as_str()));
    assert!(elapsed < deadline * 10, "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_times_out() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    let timeout = Duration::from_millis(300);
    let c = builder(&[kvd.url()])
        .request_timeout(timeout)
        .max_retries(0)
        .build()
        .unwrap();

    let stopped = Stopped::new(&kvd);
    let started = Instant::now();
    let err = c.get("k").await.unwrap_err();
    let elapsed = started.elapsed();
    stopped.resume();

    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.code(), "timeout");
    assert_eq!(err.endpoint(), Some(kvd.url().as_str()));
    assert!(elapsed >= timeout, "gave up early: {elapsed:?}");
    assert!(elapsed < timeout * 10, "{elapsed:?}");
    // The node answers again once continued.
    assert_eq!(c.get("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_deadline_bounds_a_call_to_a_stopped_node() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &[]);
    let deadline = Duration::from_millis(500);
    // Each attempt could wait far longer than the deadline; the deadline
    // must cut it short.
    let c = builder(&[kvd.url()])
        .request_timeout(Duration::from_secs(20))
        .max_retries(1_000)
        .retry_deadline(deadline)
        .build()
        .unwrap();

    let stopped = Stopped::new(&kvd);
    let started = Instant::now();
    let err = c.set("k", "v").await.unwrap_err();
    let elapsed = started.elapsed();
    stopped.resume();

    match &err {
        Error::Timeout { timeout, .. } => {
            assert!(*timeout <= deadline, "attempt timeout {timeout:?}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert!(elapsed < deadline * 10, "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_skipped_after_its_timeout() {
    let tmp = TempDir::new().unwrap();
    let stuck = start(&tmp, "stuck", &[]);
    let live = start(&tmp, "live", &[]);
    client(&[live.url()]).set("k", "live").await.unwrap();
    let c = builder(&[stuck.url(), live.url()])
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();

    let stopped = Stopped::new(&stuck);
    let got = c.get("k").await;
    let current = c.current_endpoint();
    stopped.resume();

    assert_eq!(got.unwrap().as_deref(), Some(&b"live"[..]));
    assert_eq!(current, live.url());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_write_is_not_retried_after_an_unknown_outcome() {
    let tmp = TempDir::new().unwrap();
    let stuck = start(&tmp, "stuck", &[]);
    let live = start(&tmp, "live", &[]);
    let c = builder(&[stuck.url(), live.url()])
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();

    // The request reaches the stopped node's socket and may be served once
    // it runs again (or not: that depends on when it sees the client hang
    // up): the outcome is unknown, so the client must not try the next
    // node, where a retry could be refused by the first attempt's success.
    let stopped = Stopped::new(&stuck);
    let err = c
        .put_if("k", "once", Precondition::Absent)
        .await
        .unwrap_err();
    stopped.resume();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.outcome_unknown() && err.is_retryable());
    assert_eq!(
        answered(&live, "put", 200),
        0,
        "not retried on the live node"
    );
    // A plain write after the same failure is retried on the next node.
    let stopped = Stopped::new(&stuck);
    let index = c.set("k", "plain").await;
    stopped.resume();
    index.unwrap();
    assert_eq!(answered(&live, "put", 200), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_write_is_retried_when_nothing_was_sent() {
    let tmp = TempDir::new().unwrap();
    let live = start(&tmp, "live", &[]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let c = client(&[dead, live.url()]);
    let index = c.put_if("k", "v", Precondition::Absent).await.unwrap();
    assert_eq!(c.current_endpoint(), live.url());
    let err = c.put_if("k", "w", Precondition::Absent).await.unwrap_err();
    match err {
        Error::PreconditionFailed { current, .. } => assert_eq!(current.mod_index, index),
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_is_retried_on_the_next_endpoint() {
    let tmp = TempDir::new().unwrap();
    let busy = start(&tmp, "busy", &["--max-inflight-requests", "1"]);
    let live = start(&tmp, "live", &[]);
    let c = client(&[busy.url(), live.url()]);

    let held = HeldRequest::start(&busy);
    let result = c.set("k", "v").await;
    let refused = held.refused;
    assert_eq!(held.release(), 200, "the held write completes");

    result.unwrap();
    assert_eq!(c.current_endpoint(), live.url());
    assert_eq!(
        answered(&busy, "put", 503),
        1 + refused,
        "the busy node said 503 to the client once"
    );
    assert_eq!(
        client(&[live.url()]).get("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_is_a_retryable_503_retried_max_retries_times() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &["--max-inflight-requests", "1"]);
    let c = builder(&[kvd.url()]).max_retries(3).build().unwrap();

    let held = HeldRequest::start(&kvd);
    let result = c.set("k", "v").await;
    let refused = held.refused;
    assert_eq!(held.release(), 200, "the held write completes");

    let err = result.unwrap_err();
    match &err {
        Error::Server {
            endpoint,
            status,
            code,
            ..
        } => {
            assert_eq!(endpoint, &kvd.url());
            assert_eq!((*status, code.as_str()), (503, "overloaded"));
        }
        other => panic!("expected 503 overloaded, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert_eq!(
        answered(&kvd, "put", 503),
        4 + refused,
        "one attempt and 3 retries"
    );
    // Once the node has room again, the same client gets through.
    c.set("k", "v").await.unwrap();
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(c.get("held").await.unwrap().as_deref(), Some(HELD_BODY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_deadline_bounds_a_call_to_an_overloaded_node() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, "n", &["--max-inflight-requests", "1"]);
    let deadline = Duration::from_millis(500);
    let c = builder(&[kvd.url()])
        .max_retries(1_000)
        .backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
        })
        .retry_deadline(deadline)
        .build()
        .unwrap();

    let held = HeldRequest::start(&kvd);
    let started = Instant::now();
    let result = c.set("k", "v").await;
    let elapsed = started.elapsed();
    let refused = held.refused;
    assert_eq!(held.release(), 200, "the held write completes");

    // Usually the last 503; but an attempt started just before the deadline
    // gets only the time left, and may time out instead. Either way the
    // caller learns it may try again later.
    let err = result.unwrap_err();
    assert!(
        err.status() == Some(503) || matches!(err, Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(elapsed < deadline * 10, "{elapsed:?}");
    assert!(
        answered(&kvd, "put", 503) >= 2 + refused,
        "the client did retry"
    );
}
