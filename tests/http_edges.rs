//! Protocol edges, over raw sockets: `Expect: 100-continue` on a body over
//! the limit, transfer codings kvd does not decode, query parameters that
//! are not UTF-8, and the errors hyper answers itself before any handler
//! runs (head too large, malformed framing), which must carry the JSON
//! error body like every other error. None of them writes anything.

use std::io::Write;

use kvstore_testkit::node::{fingerprint, http, start};
use kvstore_testkit::raw::{self, connect, exchange, get, read_answer, Answer};
use tempfile::TempDir;

/// Sends `request` on a new connection and reads the one answer. The
/// request is written from another thread, whose errors are ignored: kvd
/// may answer and close before it has read all of a request it refuses.
fn answer_to(port: u16, request: &[u8]) -> Answer {
    let mut s = connect(port);
    let mut writer = s.try_clone().unwrap();
    let request = request.to_vec();
    let what = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let answer = read_answer(&mut s).unwrap_or_else(|e| panic!("no answer to {what:?}: {e}"));
    // Unblocks the writer if kvd stopped reading.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_over_the_limit_gets_413_and_no_100() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--max-value-bytes", "1000"]);
    let port = kvd.port;
    let before = fingerprint(&http(), &kvd).await;

    let first = tokio::task::spawn_blocking(move || {
        answer_to(
            port,
            b"PUT /v1/kv/big HTTP/1.1\r\nHost: kvd\r\nContent-Length: 1001\r\n\
              Expect: 100-continue\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(
        first.status, 413,
        "a body announced over the limit must be refused before it is sent: {}",
        first.head
    );
    assert_eq!(first.error_code(), "value_too_large");

    // The same for a bulk over --max-bulk-bytes.
    let tmp2 = TempDir::new().unwrap();
    let kvd2 = start(&tmp2, &["--max-bulk-bytes", "1000"]);
    let port2 = kvd2.port;
    let bulk = tokio::task::spawn_blocking(move || {
        answer_to(
            port2,
            b"POST /v1/bulk HTTP/1.1\r\nHost: kvd\r\nContent-Length: 5000\r\n\
              Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(bulk.status, 413, "{}", bulk.head);
    assert_eq!(bulk.error_code(), "value_too_large");

    // Within the limit, the 100 comes and the write goes through.
    let ok = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        write!(
            s,
            "PUT /v1/kv/small HTTP/1.1\r\nHost: kvd\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\n\r\n"
        )
        .unwrap();
        let cont = read_answer(&mut s).unwrap();
        assert_eq!(cont.status, 100);
        s.write_all(b"hello").unwrap();
        read_answer(&mut s).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    let after = fingerprint(&http(), &kvd).await;
    assert_eq!(after.0, before.0 + 1, "only the small PUT was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    let before = fingerprint(&http(), &kvd).await;
    let answers = tokio::task::spawn_blocking(move || {
        [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: deflate,chunked\r\n",
        ]
        .map(|te| {
            let req =
                format!("PUT /v1/kv/coded HTTP/1.1\r\nHost: kvd\r\n{te}\r\n3\r\nabc\r\n0\r\n\r\n");
            (te, answer_to(port, req.as_bytes()))
        })
    })
    .await
    .unwrap();
    for (te, a) in answers {
        assert_eq!(a.status, 501, "{te:?}: {}", a.head);
        assert_eq!(a.error_code(), "unsupported_transfer_encoding", "{te:?}");
    }
    assert_eq!(
        fingerprint(&http(), &kvd).await,
        before,
        "nothing was written"
    );

    // Plain chunked still works.
    let ok = tokio::task::spawn_blocking(move || {
        answer_to(
            port,
            b"PUT /v1/kv/plain HTTP/1.1\r\nHost: kvd\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    let mut s = connect(port);
    assert_eq!(get(&mut s, "/v1/kv/plain").unwrap().body, b"abc");
}

#[test]
fn query_parameters_that_are_not_utf8_get_400() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--index"]);
    let mut s = connect(kvd.port);
    let put = raw::put(&mut s, "doc", b"a caf\xc3\xa9 in paris").unwrap();
    assert_eq!(put.status, 200);

    for path in [
        "/v1/search?q=caf%C3",
        "/v1/search?q=paris%FF",
        "/v1/similar?q=caf%C3%28",
        "/v1/similar?key=do%FFc",
        "/v1/search?q=paris&offset=%FF",
    ] {
        let mut s = connect(kvd.port);
        let a = get(&mut s, path).unwrap();
        assert_eq!(
            a.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.error_code(), "invalid_query", "{path}");
    }
    // Well-formed percent-encoded UTF-8 still finds the document.
    let a = get(&mut s, "/v1/search?q=caf%C3%A9").unwrap();
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).contains("\"doc\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_answered_below_the_router_have_json_bodies() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let port = kvd.port;
    let before = fingerprint(&http(), &kvd).await;

    let header_of = |bytes: usize| {
        format!(
            "GET /health HTTP/1.1\r\nHost: kvd\r\nX-Big: {}\r\n\r\n",
            "a".repeat(bytes)
        )
        .into_bytes()
    };
    let many_headers = format!(
        "GET /health HTTP/1.1\r\nHost: kvd\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("a 1 MiB head", header_of(1 << 20), 431, "headers_too_large"),
        ("a head over 64 KiB", header_of(65 << 10), 431, "headers_too_large"),
        ("150 headers", many_headers.into_bytes(), 431, "headers_too_large"),
        (
            "a request line that is not HTTP",
            b"GARBAGE\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "a Content-Length that is not a number",
            b"PUT /v1/kv/x HTTP/1.1\r\nHost: kvd\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "two different Content-Lengths",
            b"PUT /v1/kv/x HTTP/1.1\r\nHost: kvd\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
            400,
            "malformed_request",
        ),
        (
            "a transfer coding list that does not end with chunked",
            b"PUT /v1/kv/x HTTP/1.1\r\nHost: kvd\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                .to_vec(),
            400,
            "malformed_request",
        ),
        (
            "a header line without a colon",
            b"GET /health HTTP/1.1\r\nHost: kvd\r\nno colon here\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
    ];
    let answers = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(name, req, status, code)| (name, answer_to(port, &req), status, code))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (name, a, status, code) in answers {
        assert_eq!(a.status, status, "{name}: {}", a.head);
        assert_eq!(a.error_code(), code, "{name}");
        assert_eq!(a.header("connection"), Some("close"), "{name}");
    }
    assert_eq!(
        fingerprint(&http(), &kvd).await,
        before,
        "nothing was written"
    );
}

#[test]
fn a_value_that_looks_like_an_error_answer_is_served_as_stored() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    // The bytes of hyper's own 400 answer, stored as a value.
    let lookalike = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
        date: Tue, 01 Dec 2026 21:54:25 GMT\r\n\r\n";
    let mut s = connect(kvd.port);
    assert_eq!(
        raw::put(&mut s, "lookalike", lookalike).unwrap().status,
        200
    );
    for close in ["", "Connection: close\r\n"] {
        let mut s = connect(kvd.port);
        let a = exchange(
            &mut s,
            format!("GET /v1/kv/lookalike HTTP/1.1\r\nHost: kvd\r\n{close}\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.body, lookalike, "served byte for byte ({close:?})");
    }
}
