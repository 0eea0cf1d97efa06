//! `GET /v1/watch` end to end (docs/DESIGN.md §2.17): a real kvd, watched
//! over a raw socket whose chunked body is read line by line, so that the
//! tests see exactly what a client gets and when the stream ends. Writes go
//! over another connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use kvstore_testkit::node::start;
use kvstore_testkit::raw::{self, connect, exchange, get, metric, wait_for_metric, DEADLINE};
use kvstore_testkit::Kvd;
use serde_json::{json, Value};
use tempfile::TempDir;

/// An open watch: the answer's head, then its chunked body as lines.
struct Watch {
    status: u16,
    head: String,
    body: BufReader<TcpStream>,
    /// Decoded body bytes not yet returned as lines.
    pending: Vec<u8>,
    /// Body bytes decoded so far.
    received: usize,
    ended: bool,
}

impl Watch {
    fn open(port: u16, query: &str, accept: Option<&str>) -> Watch {
        Watch::open_on(connect(port), query, accept)
    }

    /// A watch on a connection whose receive buffer is as small as the
    /// kernel allows, so that a client that does not read stalls the node's
    /// writes at once (loopback buffers can otherwise hold tens of MiB).
    fn open_stalling(port: u16, query: &str) -> Watch {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let s = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
            s.into_std().unwrap()
        });
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Watch::open_on(s, query, None)
    }

    fn open_on(mut s: TcpStream, query: &str, accept: Option<&str>) -> Watch {
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        write!(
            s,
            "GET /v1/watch{query} HTTP/1.1\r\nHost: kvd\r\n{accept}\r\n"
        )
        .unwrap();
        let mut body = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            body.read_line(&mut line)
                .expect("reading the answer's head");
            assert!(!line.is_empty(), "closed in the head: {head:?}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        Watch {
            status,
            head,
            body,
            pending: Vec::new(),
            received: 0,
            ended: false,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The next chunk of the body into `pending`; false at its end.
    fn chunk(&mut self) -> io::Result<bool> {
        let mut size = String::new();
        if self.body.read_line(&mut size)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        let mut data = vec![0u8; n + 2];
        self.body.read_exact(&mut data)?;
        self.received += n;
        self.pending.extend_from_slice(&data[..n]);
        Ok(n > 0)
    }

    /// The next line of the body (without its newline), `None` at its end.
    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                return Some(String::from_utf8(line[..at].to_vec()).expect("UTF-8"));
            }
            if self.ended || !self.chunk().expect("reading the stream") {
                self.ended = true;
                assert!(self.pending.is_empty(), "a partial line at the end");
                return None;
            }
        }
    }

    /// The next NDJSON event.
    fn event(&mut self) -> Option<Value> {
        let line = self.line()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
    }

    /// The events up to and including the first progress event.
    fn until_progress(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let e = self
                .event()
                .expect("the stream ended before a progress event");
            let done = e["type"] == "progress";
            events.push(e);
            if done {
                return events;
            }
        }
    }
}

fn put(port: u16, key: &str, value: &str) -> u64 {
    let a = raw::put(&mut connect(port), key, value.as_bytes()).unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    serde_json::from_slice::<Value>(&a.body).unwrap()["index"]
        .as_u64()
        .unwrap()
}

fn request(port: u16, method: &str, path: &str, body: &str) -> raw::Answer {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: kvd\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(&mut connect(port), req.as_bytes()).unwrap()
}

fn delete(port: u16, key: &str) -> u64 {
    let a = request(port, "DELETE", &format!("/v1/kv/{key}"), "");
    assert_eq!(a.status, 200);
    serde_json::from_slice::<Value>(&a.body).unwrap()["index"]
        .as_u64()
        .unwrap()
}

/// Only the fields a test compares: type, index, key, value, prev_value.
fn brief(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .map(|e| {
            let mut b = json!({"type": e["type"], "index": e["index"]});
            for f in ["key", "value", "prev_value"] {
                if !e[f].is_null() {
                    b[f] = e[f].clone();
                }
            }
            b
        })
        .collect()
}

fn metrics(port: u16) -> String {
    String::from_utf8(get(&mut connect(port), "/metrics").unwrap().body).unwrap()
}

#[test]
fn a_watch_from_index_1_streams_every_change_in_log_order_then_live_ones() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    put(port, "a/1", "x");
    put(port, "b/1", "y");
    put(port, "a/1", "z");
    delete(port, "a/1");
    let bulk = request(
        port,
        "POST",
        "/v1/bulk",
        r#"{"items": [{"key": "a/3", "value": "3"}, {"key": "a/2", "value": {"base64": "/w=="}}]}"#,
    );
    assert_eq!(bulk.status, 200);

    let mut w = Watch::open(port, "?from_index=1", None);
    assert_eq!(w.status, 200, "{}", w.head);
    assert_eq!(w.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(w.header("cache-control"), Some("no-cache"));
    assert_eq!(w.header("x-kv-watch-index"), Some("5"));
    let events = w.until_progress();
    assert_eq!(
        brief(&events),
        [
            json!({"type": "put", "index": 1, "key": "a/1", "value": "x"}),
            json!({"type": "put", "index": 2, "key": "b/1", "value": "y"}),
            json!({"type": "put", "index": 3, "key": "a/1", "value": "z"}),
            json!({"type": "delete", "index": 4, "key": "a/1"}),
            // A bulk's events are in key order.
            json!({"type": "put", "index": 5, "key": "a/2", "value": {"base64": "/w=="}}),
            json!({"type": "put", "index": 5, "key": "a/3", "value": "3"}),
            json!({"type": "progress", "index": 5}),
        ]
    );
    assert_eq!(
        (
            &events[2]["create_index"],
            &events[2]["mod_index"],
            &events[2]["version"]
        ),
        (&json!(1), &json!(3), &json!(2))
    );
    let index = put(port, "c", "live");
    let live = w.event().unwrap();
    assert_eq!(
        brief(&[live]),
        [json!({"type": "put", "index": index, "key": "c", "value": "live"})]
    );

    // Without from_index: what is applied after the watch starts.
    let mut now = Watch::open(port, "", None);
    assert_eq!(
        brief(&now.until_progress()),
        [json!({"type": "progress", "index": index})]
    );
    let next = delete(port, "c");
    assert_eq!(
        brief(&[now.event().unwrap()]),
        [json!({"type": "delete", "index": next, "key": "c"})]
    );
}

#[test]
fn a_watch_sees_only_its_range_and_the_previous_values_it_asks_for() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    put(port, "a/1", "v1");
    put(port, "b", "other");
    put(port, "a/1", "v2");
    put(port, "a/10", "ten");
    delete(port, "a/1");

    let mut prefix = Watch::open(port, "?from_index=1&prefix=a/&prev_value=true", None);
    assert_eq!(
        brief(&prefix.until_progress()),
        [
            json!({"type": "put", "index": 1, "key": "a/1", "value": "v1"}),
            json!({"type": "put", "index": 3, "key": "a/1", "value": "v2", "prev_value": "v1"}),
            json!({"type": "put", "index": 4, "key": "a/10", "value": "ten"}),
            json!({"type": "delete", "index": 5, "key": "a/1", "prev_value": "v2"}),
            json!({"type": "progress", "index": 5}),
        ]
    );
    let mut key = Watch::open(port, "?from_index=1&key=a/1", None);
    assert_eq!(
        brief(&key.until_progress()),
        [
            json!({"type": "put", "index": 1, "key": "a/1", "value": "v1"}),
            json!({"type": "put", "index": 3, "key": "a/1", "value": "v2"}),
            json!({"type": "delete", "index": 5, "key": "a/1"}),
            json!({"type": "progress", "index": 5}),
        ]
    );
    let mut bounds = Watch::open(port, "?from_index=2&start=a/10&end=c", None);
    assert_eq!(
        brief(&bounds.until_progress()),
        [
            json!({"type": "put", "index": 2, "key": "b", "value": "other"}),
            json!({"type": "put", "index": 4, "key": "a/10", "value": "ten"}),
            json!({"type": "progress", "index": 5}),
        ]
    );
    // A write outside the range moves progress only.
    let mut idle = Watch::open(port, "?prefix=zzz&progress_ms=100", None);
    idle.until_progress();
    let outside = put(port, "b", "again");
    let mut seen = 0;
    while seen < outside {
        let e = idle.event().unwrap();
        assert_eq!(e["type"], "progress", "{e}");
        seen = e["index"].as_u64().unwrap();
    }
}

#[test]
fn an_idle_watch_sends_progress_and_outlives_the_connection_timeouts() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &["--idle-timeout-ms", "200", "--header-timeout-ms", "200"],
    );
    let port = kvd.port;
    let index = put(port, "k", "v");
    let mut w = Watch::open(port, "?progress_ms=100", None);
    let mut progress = 0;
    // Twenty idle periods of 100 ms: well past both timeouts.
    while progress < 20 {
        let e = w.event().expect("the stream ended");
        assert_eq!(e, json!({"type": "progress", "index": index}));
        progress += 1;
    }
    let later = put(port, "k", "w");
    loop {
        let e = w.event().expect("the stream ended");
        if e["type"] == "put" {
            assert_eq!(e["index"], later);
            break;
        }
    }
}

#[test]
fn server_sent_events_carry_the_same_events() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    put(port, "k", "v");
    let mut w = Watch::open(port, "?from_index=1", Some("text/event-stream"));
    assert_eq!(w.status, 200);
    assert_eq!(w.header("content-type"), Some("text/event-stream"));
    let lines: Vec<String> = (0..6).map(|_| w.line().unwrap()).collect();
    assert_eq!(lines[0], "event: put");
    let data: Value = serde_json::from_str(lines[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        brief(&[data]),
        [json!({"type": "put", "index": 1, "key": "k", "value": "v"})]
    );
    assert_eq!(lines[2], "");
    assert_eq!(lines[3], "event: progress");
    assert_eq!(lines[4], r#"data: {"type":"progress","index":1}"#);
    assert_eq!(lines[5], "");
}

#[test]
fn bad_watches_are_refused_with_json_errors() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    put(port, "k", "v");
    for (query, status, code) in [
        ("?ttl_ms=5", 400, "unknown_parameter"),
        ("?prefix=a&prefix=b", 400, "invalid_query"),
        ("?prev_value=yes", 400, "invalid_query"),
        ("?key=a&prefix=a", 400, "invalid_watch"),
        ("?prefix=a&start=b", 400, "invalid_watch"),
        ("?start=b&end=a", 400, "invalid_watch"),
        ("?key=", 400, "invalid_watch"),
        ("?from_index=0", 400, "invalid_watch"),
        ("?from_index=x", 400, "invalid_watch"),
        ("?progress_ms=99", 400, "invalid_watch"),
        ("?from_index=3", 400, "future_index"),
    ] {
        let a = get(&mut connect(port), &format!("/v1/watch{query}")).unwrap();
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (status, code),
            "{query}"
        );
    }
    // One past the last index waits for it.
    let mut w = Watch::open(port, "?from_index=2", None);
    assert_eq!(w.status, 200);
    assert_eq!(w.event().unwrap(), json!({"type": "progress", "index": 1}));
    put(port, "k", "w");
    assert_eq!(w.event().unwrap()["index"], 2);
}

#[test]
fn watches_past_max_watchers_get_503_until_one_closes() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--max-watchers", "1"]);
    let port = kvd.port;
    let mut first = Watch::open(port, "", None);
    assert_eq!(first.status, 200);
    first.event();
    let a = get(&mut connect(port), "/v1/watch").unwrap();
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (503, "too_many_watchers")
    );
    assert_eq!(a.header("retry-after"), Some("1"));
    let mut m = connect(port);
    wait_for_metric(&mut m, "kvd_watchers ", |v| v == 1.0);
    drop(first);
    // The server notices the client is gone at its next progress event.
    wait_for_metric(&mut m, "kvd_watchers ", |v| v == 0.0);
    assert_eq!(Watch::open(port, "", None).status, 200);
}

#[test]
fn a_watch_from_before_the_cache_is_410_with_the_oldest_index() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", "1"]);
    let port = kvd.port;
    let big = "x".repeat(400 << 10);
    let mut last = 0;
    for i in 0..4 {
        last = put(port, &format!("k{i}"), &big);
    }
    let a = get(&mut connect(port), "/v1/watch?from_index=1").unwrap();
    assert_eq!((a.status, a.error_code().as_str()), (410, "compacted"));
    let body: Value = serde_json::from_slice(&a.body).unwrap();
    let oldest = body["oldest_index"].as_u64().expect("oldest_index");
    assert!(oldest > 1 && oldest <= last, "{body}");
    let mut w = Watch::open(port, &format!("?from_index={oldest}"), None);
    assert_eq!(w.status, 200);
    let events = w.until_progress();
    assert_eq!(events[0]["index"], oldest);
    assert_eq!(events.last().unwrap()["index"], last);
}

#[test]
fn the_replayed_log_fills_the_cache_after_a_restart() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    put(kvd.port, "a", "1");
    put(kvd.port, "b", "2");
    kvd.terminate().unwrap();
    kvstore_testkit::node::restart(&mut kvd);
    let mut w = Watch::open(kvd.port, "?from_index=1", None);
    assert_eq!(
        brief(&w.until_progress()),
        [
            json!({"type": "put", "index": 1, "key": "a", "value": "1"}),
            json!({"type": "put", "index": 2, "key": "b", "value": "2"}),
            json!({"type": "progress", "index": 2}),
        ]
    );
}

/// Writes `n` values of `size` bytes to one key, from another thread.
fn write_in_background(port: u16, n: usize, size: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let value = vec![b'v'; size];
        let mut s = connect(port);
        for _ in 0..n {
            let a = raw::put(&mut s, "big", &value).unwrap();
            assert_eq!(a.status, 200);
        }
    })
}

#[test]
fn a_watcher_that_stops_reading_is_cut_while_it_can_still_resume() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", "1"]);
    let port = kvd.port;
    let mut stalled = Watch::open_stalling(port, "");
    assert_eq!(stalled.status, 200);
    // Writes until the node cuts the watcher, which it must do before its
    // unsent records leave the cache: at half of it, 16 of these values.
    let value = vec![b'v'; 32 << 10];
    let (mut w, mut m) = (connect(port), connect(port));
    let cut = "kvd_watchers_cut_total{reason=\"watcher_too_slow\"}";
    let mut written = 0;
    loop {
        assert!(
            written < 2000,
            "{written} writes and the watcher was not cut"
        );
        assert_eq!(raw::put(&mut w, "big", &value).unwrap().status, 200);
        written += 1;
        let text = String::from_utf8(get(&mut m, "/metrics").unwrap().body).unwrap();
        if metric(&text, cut).is_some_and(|v| v >= 1.0) {
            break;
        }
    }
    // What the node still holds, now that nothing more is written.
    let probe = get(&mut connect(port), "/v1/watch?from_index=1").unwrap();
    let oldest = match probe.status {
        410 => serde_json::from_slice::<Value>(&probe.body).unwrap()["oldest_index"]
            .as_u64()
            .unwrap(),
        _ => 1,
    };
    drop(probe);
    // The stalled client reads at last: the events it was sent, then the
    // error event, whose resume index is still held.
    let mut last = None;
    while let Some(line) = stalled.line() {
        last = Some(line);
    }
    let last: Value = serde_json::from_str(&last.unwrap()).unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "watcher_too_slow");
    let resume = last["resume_index"].as_u64().unwrap();
    assert!(
        resume >= oldest && resume <= written,
        "resume_index {resume}: the node holds {oldest}.. of {written}"
    );
    assert!(
        stalled.received < written as usize * value.len(),
        "it was sent less"
    );
    let mut again = Watch::open(port, &format!("?from_index={resume}"), None);
    assert_eq!(again.status, 200, "{}", again.head);
    assert_eq!(again.event().unwrap()["index"], resume);
    drop(again);
    wait_for_metric(&mut m, "kvd_watchers ", |v| v == 0.0);
    let text = metrics(port);
    assert!(metric(&text, "kvd_watch_events_sent_total").is_some_and(|v| v >= 1.0));
}

/// Waits until the node has stopped handing events to its watches (a
/// client that does not read has filled the socket buffers): the count
/// stays the same over 10 reads of `/metrics` 50 ms apart. (Were it still
/// moving, the test would only be easier to pass, never fail wrongly.)
fn sending_stalls(m: &mut TcpStream) {
    let sent = |m: &mut TcpStream| {
        let text = String::from_utf8(get(m, "/metrics").unwrap().body).unwrap();
        metric(&text, "kvd_watch_events_sent_total").unwrap()
    };
    let (mut last, mut same) = (sent(m), 0);
    let deadline = std::time::Instant::now() + DEADLINE;
    while same < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = sent(m);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
}

/// Sends SIGTERM and waits for the exit, SIGKILLing the node (and failing)
/// if it has not exited within `within`.
fn terminate_within(mut kvd: Kvd, within: Duration) -> std::process::ExitStatus {
    let pid = kvd.pid().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(kvd.terminate());
    });
    match rx.recv_timeout(within) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("kvd did not exit within {within:?} of SIGTERM with watches open");
        }
    }
}

#[test]
fn shutdown_ends_open_watches_and_exits_promptly() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", "64"]);
    let port = kvd.port;
    // A history larger than the socket buffers and the stream's channel,
    // but under half the cache: its watcher, which reads nothing, blocks
    // the node's writes to it without being cut.
    write_in_background(port, 24, 1 << 20).join().unwrap();
    let stalled = Watch::open_stalling(port, "?from_index=1");
    assert_eq!(stalled.status, 200);
    let mut reading = Watch::open(port, "?progress_ms=60000", None);
    reading.until_progress();
    let mut m = connect(port);
    wait_for_metric(&mut m, "kvd_watchers ", |v| v == 2.0);
    sending_stalls(&mut m);
    drop(m);
    let status = terminate_within(kvd, DEADLINE);
    assert!(status.success(), "{status}");
    let e = reading.event().expect("an error event before the end");
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "shutting_down");
    assert!(reading.event().is_none(), "the stream ends after it");
    drop(stalled);
}

/// Waits until every node of a cluster knows a primary (its status says).
fn primary_known(nodes: &[Kvd]) {
    for n in nodes {
        let known = kvstore_testkit::wait_until(DEADLINE, || {
            let a = get(&mut connect(n.port), "/v1/status").unwrap();
            serde_json::from_slice::<Value>(&a.body).unwrap()["primary"].is_string()
        });
        assert!(known, "{} knows no primary", n.url());
    }
}

#[test]
fn a_secondary_streams_what_it_applies_as_the_primary_does() {
    let tmp = TempDir::new().unwrap();
    let nodes = kvstore_testkit::start_cluster(tmp.path(), &[]).unwrap();
    primary_known(&nodes);
    let mut secondary = Watch::open(nodes[1].port, "?prefix=k", None);
    assert_eq!(secondary.status, 200);
    secondary.until_progress();
    let first = put(nodes[0].port, "k1", "a");
    let second = put(nodes[0].port, "k2", "b");
    let mut on_primary = Watch::open(nodes[0].port, &format!("?from_index={first}"), None);
    let mut from_secondary = Vec::new();
    while from_secondary.len() < 2 {
        let e = secondary.event().unwrap();
        if e["type"] != "progress" {
            from_secondary.push(e);
        }
    }
    let want = [
        json!({"type": "put", "index": first, "key": "k1", "value": "a"}),
        json!({"type": "put", "index": second, "key": "k2", "value": "b"}),
    ];
    assert_eq!(brief(&from_secondary), want);
    assert_eq!(
        from_secondary,
        on_primary.until_progress()[..2],
        "the same events"
    );
}

#[test]
fn a_masterless_node_streams_the_writes_it_merges_with_their_stamps() {
    let c = kvstore_testkit::cluster::Cluster::start("masterless", |_| Vec::new());
    let mut w = Watch::open(c.nodes[1].port, "?key=m", None);
    assert_eq!(w.status, 200);
    w.until_progress();
    put(c.nodes[0].port, "m", "merged");
    let e = loop {
        let e = w.event().unwrap();
        if e["type"] != "progress" {
            break e;
        }
    };
    assert_eq!(
        (&e["type"], &e["key"], &e["value"]),
        (&json!("put"), &json!("m"), &json!("merged"))
    );
    // The provisional publish in State::apply logs no stamp (zeros): with
    // the real one this can check physical_ms > 0.
    assert!(e["stamp"]["physical_ms"].is_u64(), "{e}");
}
