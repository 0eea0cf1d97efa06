//! HTTP/1.1 keep-alive and pipelining on one connection (docs/DESIGN.md
//! §2.6), over a raw socket: requests written back to back in one write,
//! bodies among them, are answered in order, each with its own status and
//! body; an error answer in the middle does not end the connection; and one
//! connection carries many requests in turn.

use std::io::Write;

use kvstore_testkit::node::start;
use kvstore_testkit::raw::{self, connect, read_answer, Answer};
use tempfile::TempDir;

/// A request with a `Content-Length` body.
fn with_body(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: kvd\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn bodiless(method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: kvd\r\n\r\n").into_bytes()
}

/// `body` sent in `chunked` transfer coding, in two chunks.
fn chunked_put(path: &str, body: &[u8]) -> Vec<u8> {
    let (a, b) = body.split_at(body.len() / 2);
    let mut req = format!("PUT {path} HTTP/1.1\r\nHost: kvd\r\nTransfer-Encoding: chunked\r\n\r\n")
        .into_bytes();
    for part in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// Writes `requests` in one write (from another thread, so that neither
/// side can stall on a full socket buffer) and reads one answer each.
fn pipeline(port: u16, requests: &[Vec<u8>]) -> Vec<Answer> {
    let mut s = connect(port);
    let mut writer = s.try_clone().expect("cloning the socket");
    let all: Vec<u8> = requests.concat();
    let sender = std::thread::spawn(move || writer.write_all(&all));
    let answers = (0..requests.len())
        .map(|i| read_answer(&mut s).unwrap_or_else(|e| panic!("answer {i}: {e}")))
        .collect();
    sender
        .join()
        .expect("the writer thread")
        .expect("writing the requests");
    answers
}

fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body).unwrap_or_else(|e| {
        panic!(
            "{} answer is not JSON ({e}): {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        )
    })
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    // A value that reads like a request: only Content-Length frames it.
    let tricky = b"GET /v1/kv/pipe/a HTTP/1.1\r\nHost: kvd\r\n\r\n";
    let requests = [
        with_body("PUT", "/v1/kv/pipe/a", b"one"),
        with_body("PUT", "/v1/kv/pipe/b", tricky),
        bodiless("GET", "/v1/kv/pipe/a"),
        bodiless("GET", "/v1/kv/pipe/b"),
        bodiless("GET", "/v1/kv/pipe/missing"),
        bodiless("GET", "/v1/kv/pipe/a?nonsense=1"),
        chunked_put("/v1/kv/pipe/c", b"sent in two chunks"),
        bodiless("DELETE", "/v1/kv/pipe/a"),
        bodiless("GET", "/v1/kv/pipe/a"),
        bodiless("GET", "/v1/kv/pipe/c"),
        bodiless("GET", "/health"),
    ];
    let a = pipeline(kvd.port, &requests);
    let statuses: Vec<u16> = a.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 404, 400, 200, 200, 404, 200, 200]
    );
    let index = |a: &Answer| json(a)["index"].as_u64().expect("an index");
    assert!(index(&a[0]) < index(&a[1]), "writes in order");
    assert!(index(&a[1]) < index(&a[6]), "writes in order");
    assert_eq!(a[2].body, b"one");
    assert_eq!(a[3].body, tricky);
    assert_eq!(a[4].error_code(), "key_not_found");
    assert_eq!(a[5].error_code(), "unknown_parameter");
    assert_eq!(json(&a[7])["deleted"], true);
    assert!(index(&a[6]) < index(&a[7]), "writes in order");
    assert_eq!(a[8].error_code(), "key_not_found");
    assert_eq!(a[9].body, b"sent in two chunks");
    assert_eq!(json(&a[10])["status"], "ok");
    for (i, answer) in a.iter().enumerate() {
        assert_eq!(answer.header("connection"), None, "answer {i} ends nothing");
    }
}

#[test]
fn a_long_pipeline_spans_many_reads() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    // About 200 KiB of requests: more than one read of the socket.
    const N: usize = 100;
    let value = |i: usize| format!("{i:04}").repeat(256).into_bytes();
    let mut requests: Vec<Vec<u8>> = (0..N)
        .map(|i| with_body("PUT", &format!("/v1/kv/long/{i:03}"), &value(i)))
        .collect();
    requests.extend((0..N).map(|i| bodiless("GET", &format!("/v1/kv/long/{i:03}"))));
    let answers = pipeline(kvd.port, &requests);
    let (puts, gets) = answers.split_at(N);
    let mut last = 0;
    for (i, a) in puts.iter().enumerate() {
        assert_eq!(
            a.status,
            200,
            "PUT {i}: {:?}",
            String::from_utf8_lossy(&a.body)
        );
        let index = json(a)["index"].as_u64().expect("an index");
        assert!(index > last, "PUT {i} answered out of order");
        last = index;
    }
    for (i, a) in gets.iter().enumerate() {
        assert_eq!(a.status, 200, "GET {i}");
        assert_eq!(a.body, value(i), "GET {i} has its own value");
    }
}

#[test]
fn keep_alive_carries_many_requests_in_turn() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let mut s = connect(kvd.port);
    for i in 0..300 {
        let key = format!("ka/{i}");
        let value = format!("value {i}");
        let put = raw::put(&mut s, &key, value.as_bytes()).expect("PUT on the connection");
        assert_eq!(put.status, 200, "PUT {i}");
        let got = raw::get(&mut s, &format!("/v1/kv/{key}")).expect("GET on the connection");
        assert_eq!(
            (got.status, &got.body),
            (200, &value.into_bytes()),
            "GET {i}"
        );
        assert_eq!(got.header("connection"), None, "request {i} ends nothing");
    }
}
