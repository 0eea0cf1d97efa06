//! Bad requests get a 4xx JSON error and leave the store unchanged; a
//! second kvd on a data dir in use refuses to start.

use std::time::Duration;

use kvstore_testkit::node::{
    self, data_dir, expect_json_error, fingerprint, get_raw, http, key_url, start,
};
use kvstore_testkit::{free_port, run_to_exit, Kvd};
use reqwest::Method;
use serde_json::json;
use tempfile::TempDir;

const MAX_VALUE: usize = 1024;

/// One bad request and what it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    body: Vec<u8>,
    json_body: bool,
    statuses: &'static [u16],
    /// Keys the request would have written had it been (partly) accepted.
    must_stay_absent: Vec<String>,
}

fn case(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    statuses: &'static [u16],
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        body: Vec::new(),
        json_body: false,
        statuses,
        must_stay_absent: Vec::new(),
    }
}

/// A bulk whose items are good except the one at `bad_at`.
fn bulk_with_bad_item(
    name: &'static str,
    bad: serde_json::Value,
    statuses: &'static [u16],
) -> Case {
    let goods: Vec<String> = (0..5).map(|i| format!("{name}/good/{i}")).collect();
    let mut items: Vec<serde_json::Value> = goods
        .iter()
        .map(|k| json!({"key": k, "value": "good"}))
        .collect();
    items.insert(2, bad);
    Case {
        body: serde_json::to_vec(&json!({ "items": items })).unwrap(),
        json_body: true,
        must_stay_absent: goods,
        ..case(name, Method::POST, "/v1/bulk", statuses)
    }
}

fn bulk_raw(name: &'static str, body: &str) -> Case {
    Case {
        body: body.as_bytes().to_vec(),
        json_body: true,
        ..case(name, Method::POST, "/v1/bulk", &[400])
    }
}

fn cases() -> Vec<Case> {
    let long_key = "x".repeat(1025);
    let too_big = vec![b'v'; MAX_VALUE + 1];
    vec![
        case("empty key", Method::PUT, "/v1/kv/", &[400]),
        case("empty key, no slash", Method::PUT, "/v1/kv", &[400]),
        case("get of empty key", Method::GET, "/v1/kv/", &[400]),
        case("delete of empty key", Method::DELETE, "/v1/kv/", &[400]),
        case(
            "key over 1024 bytes",
            Method::PUT,
            format!("/v1/kv/{long_key}"),
            &[400],
        ),
        // 342 three-byte characters: 342 chars but 1026 bytes.
        case(
            "key over 1024 bytes of UTF-8",
            Method::PUT,
            format!("/v1/kv/{}", kvclient::encode_key(&"€".repeat(342))),
            &[400],
        ),
        case("key with NUL", Method::PUT, "/v1/kv/a%00b", &[400]),
        case("key not UTF-8", Method::PUT, "/v1/kv/%FF%FE", &[400]),
        Case {
            body: too_big.clone(),
            must_stay_absent: vec!["big".into()],
            ..case("value over the limit", Method::PUT, "/v1/kv/big", &[413])
        },
        Case {
            body: too_big,
            ..case(
                "value over the limit, overwriting",
                Method::PUT,
                "/v1/kv/existing",
                &[413],
            )
        },
        bulk_raw(
            "malformed bulk JSON",
            "{\"items\": [{\"key\": \"a\", \"value\"",
        ),
        bulk_raw("bulk body not JSON", "key=value"),
        bulk_raw("bulk items not a list", r#"{"items": "a=1"}"#),
        bulk_raw("bulk without items", r#"{}"#),
        bulk_raw("bulk with no items", r#"{"items": []}"#),
        bulk_raw(
            "bulk item without value",
            r#"{"items": [{"key": "novalue"}]}"#,
        ),
        bulk_with_bad_item(
            "bulk with an empty key",
            json!({"key": "", "value": "v"}),
            &[400],
        ),
        bulk_with_bad_item(
            "bulk with a key over 1024 bytes",
            json!({"key": "k".repeat(1025), "value": "v"}),
            &[400],
        ),
        bulk_with_bad_item(
            "bulk with a NUL in a key",
            json!({"key": "a\u{0}b", "value": "v"}),
            &[400],
        ),
        bulk_with_bad_item(
            "bulk with bad base64",
            json!({"key": "b64", "value": {"base64": "!!not base64!!"}}),
            &[400],
        ),
        bulk_with_bad_item(
            "bulk with a numeric value",
            json!({"key": "num", "value": 42}),
            &[400],
        ),
        bulk_with_bad_item(
            "bulk with a value over the limit",
            json!({"key": "huge", "value": "h".repeat(MAX_VALUE + 1)}),
            &[413],
        ),
        case("unknown route", Method::GET, "/v1/nope", &[404]),
        case("unknown route, top level", Method::PUT, "/kv/x", &[404]),
        case(
            "unknown API version",
            Method::GET,
            "/v2/kv/existing",
            &[404],
        ),
        case(
            "wrong method on a key",
            Method::POST,
            "/v1/kv/existing",
            &[405],
        ),
        case("wrong method on bulk", Method::GET, "/v1/bulk", &[405]),
        case("delete on bulk", Method::DELETE, "/v1/bulk", &[405]),
        case("wrong method on status", Method::PUT, "/v1/status", &[405]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_json_errors_and_change_nothing() {
    let tmp = TempDir::new().unwrap();
    let max = MAX_VALUE.to_string();
    let kvd = start(&tmp, &["--max-value-bytes", &max]);
    let http = http();

    // Limits are inclusive: the largest legal key and value are accepted.
    let longest_key = "k".repeat(1024);
    let resp = http
        .put(key_url(&kvd, &longest_key))
        .body(vec![b'v'; MAX_VALUE])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "a 1024-byte key with a value at the limit is legal"
    );
    let resp = http
        .put(key_url(&kvd, "existing"))
        .body("old")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    for c in cases() {
        let before = fingerprint(&http, &kvd).await;
        let mut req = http.request(c.method.clone(), format!("{}{}", kvd.url(), c.path));
        if c.json_body {
            req = req.header("content-type", "application/json");
        }
        let resp = req.body(c.body.clone()).send().await.unwrap();
        let (status, code) = expect_json_error(resp, c.name).await;
        assert!(
            c.statuses.contains(&status),
            "{}: expected {:?}, got {status} ({code})",
            c.name,
            c.statuses
        );
        assert_eq!(
            fingerprint(&http, &kvd).await,
            before,
            "{}: a rejected request must not change last_index, keys or digest",
            c.name
        );
        for k in &c.must_stay_absent {
            assert_eq!(
                get_raw(&http, &kvd, k).await,
                None,
                "{}: {k:?} must not have been written",
                c.name
            );
        }
    }
    assert_eq!(
        get_raw(&http, &kvd, "existing").await.as_deref(),
        Some(&b"old"[..]),
        "rejected overwrites leave the old value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_kvd_on_the_same_data_dir_exits_and_the_first_keeps_serving() {
    let tmp = TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let first = start(&tmp, &[]);
    let c = node::client(&first);
    c.set("before", "1").await.unwrap();

    let port = free_port().to_string();
    let dir_s = dir.to_str().unwrap();
    let (exit, out) = run_to_exit(
        "kvd",
        &["--port", &port, "--data-dir", dir_s],
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        !exit.success(),
        "a second kvd on {dir_s} must exit non-zero; output:\n{out}"
    );
    assert!(
        out.contains(dir_s) && out.to_lowercase().contains("in use"),
        "the message must name the data dir and say it is in use; output:\n{out}"
    );
    // The first node is untouched and still takes reads and writes.
    assert_eq!(c.get("before").await.unwrap().as_deref(), Some(&b"1"[..]));
    c.set("after", "2").await.unwrap();
    assert_eq!(c.get("after").await.unwrap().as_deref(), Some(&b"2"[..]));

    // The kit's own start fails the same way.
    let err = Kvd::start(&dir, &[])
        .err()
        .expect("a second Kvd::start must fail");
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    assert_eq!(c.get("after").await.unwrap().as_deref(), Some(&b"2"[..]));
}

/// A client that stops sending its body mid-way gets 408 once
/// `--body-timeout-ms` passes, and nothing is written.
#[tokio::test]
async fn a_stalled_body_gets_408_and_writes_nothing() {
    use std::io::{Read, Write};

    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--body-timeout-ms", "300"]);
    let http = http();
    let before = fingerprint(&http, &kvd).await;

    let port = kvd.port;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Promise 100 bytes, send 10, then wait for the server's answer.
        write!(
            s,
            "PUT /v1/kv/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") || !raw.ends_with(b"}") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    })
    .await
    .unwrap();

    assert_eq!(status, 408, "body: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");
    assert_eq!(fingerprint(&http, &kvd).await, before);
    assert_eq!(get_raw(&http, &kvd, "stalled").await, None);
}
