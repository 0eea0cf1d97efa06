//! Masterless safety at the edges: stream batches from a peer are held to
//! the rules of a client write (keys, value size) and to the clock bound
//! (a stamp too far ahead of this node's wall clock would win every later
//! write), are refused whole with a 4xx, and change nothing.

#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kvd::masterless::hlc::node_tag;
use kvd::masterless::node::encode_stream;
use kvd::model::Expiry;
use kvd::storage::{Op, Record, Timestamp};
use kvstore_testkit::node::{self, expect_json_error};
use kvstore_testkit::{free_port, Kvd};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A masterless node whose peers never answer: only the test talks to it.
fn lone_node(tmp: &TempDir, extra: &[&str]) -> Kvd {
    let peers = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let mut args = vec!["--node-id", "n0", "--peers", &peers, "--mode", "masterless"];
    args.extend_from_slice(extra);
    Kvd::start(&tmp.path().join("n0"), &args).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A stamp of peer "n1" at `ms`.
fn stamp(ms: u64, logical: u32) -> Timestamp {
    Timestamp {
        physical_ms: ms,
        logical,
        node: node_tag("n1"),
    }
}

fn rec(index: u64, ts: Timestamp, op: Op) -> Record {
    Record {
        index,
        epoch: 1,
        ts,
        op,
    }
}

fn put(key: &[u8], value: &[u8]) -> Op {
    Op::Put {
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(value),
        expiry: Expiry::Never,
    }
}

/// Peer n1's stream batch `from..=upto` with its durable clock `hlc`.
async fn stream(
    http: &reqwest::Client,
    to: &Kvd,
    upto: u64,
    hlc: Timestamp,
    records: &[Record],
) -> reqwest::Response {
    let body = encode_stream(1, upto, hlc, true, false, "n1", records);
    http.post(format!("{}/internal/ml/stream", to.url()))
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn status(http: &reqwest::Client, node: &Kvd) -> Value {
    node::status(http, node).await
}

/// What a refused batch must leave as it was.
fn view(s: &Value) -> Value {
    json!({
        "last_index": s["last_index"], "keys": s["keys"], "digest": s["digest"],
        "lww_digest": s["masterless"]["lww_digest"],
        "stable_time": s["masterless"]["stable_time"],
    })
}

/// The node's clock, which idles along with its wall clock, must stay near
/// it.
fn assert_clock_near_wall(s: &Value, what: &str) {
    let ms = s["hlc"]["physical_ms"].as_u64().unwrap();
    assert!(
        ms <= now_ms() + 60_000,
        "{what}: the clock moved to {}",
        s["hlc"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_far_ahead_of_the_wall_clock_are_refused() {
    let tmp = TempDir::new().unwrap();
    let node = lone_node(&tmp, &[]);
    let http = node::http();
    let before = status(&http, &node).await;

    let cases = [
        ("a stamp of 2^64-1", stamp(u64::MAX, u32::MAX)),
        ("a stamp an hour ahead", stamp(now_ms() + 3_600_000, 0)),
    ];
    for (what, ts) in cases {
        let forged = rec(1, ts, put(b"k", b"forged"));
        let resp = stream(&http, &node, 1, stamp(now_ms(), 0), &[forged]).await;
        let (code, err) = expect_json_error(resp, what).await;
        assert_eq!((code, err.as_str()), (400, "stamp_out_of_range"), "{what}");
        // Only in the batch's durable clock, with no records.
        let resp = stream(&http, &node, 1, ts, &[]).await;
        let (code, err) = expect_json_error(resp, what).await;
        assert_eq!(
            (code, err.as_str()),
            (400, "stamp_out_of_range"),
            "{what} (clock)"
        );
        let after = status(&http, &node).await;
        assert_eq!(view(&after), view(&before), "{what}");
        assert_clock_near_wall(&after, what);
    }

    // A stamp a second ahead is ordinary clock skew: merged.
    let skewed = rec(1, stamp(now_ms() + 1_000, 0), put(b"k", b"skewed"));
    let resp = stream(&http, &node, 1, stamp(now_ms(), 0), &[skewed]).await;
    assert_eq!(resp.status(), 200);
    // And a client write afterwards still wins, with a stamp above it.
    let resp = http
        .put(node::key_url(&node, "k"))
        .body("mine")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r: Value = resp.json().await.unwrap();
    assert!(
        r["ts"]["physical_ms"].as_u64().unwrap() < u64::MAX / 2,
        "{r}"
    );
    assert_eq!(
        node::get_raw(&http, &node, "k").await.as_deref(),
        Some(&b"mine"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_records_are_validated_like_client_writes() {
    let tmp = TempDir::new().unwrap();
    let node = lone_node(&tmp, &["--max-value-bytes", "1024"]);
    let http = node::http();
    let before = status(&http, &node).await;

    let long_key = vec![b'k'; 1025];
    let big_value = vec![b'v'; 1025];
    let cases: Vec<(&str, Op)> = vec![
        ("a NUL in the key", put(b"a\0b", b"v")),
        ("a key that is not UTF-8", put(b"\xff", b"v")),
        ("an empty key", put(b"", b"v")),
        ("a key over 1024 bytes", put(&long_key, b"v")),
        ("a value over --max-value-bytes", put(b"big", &big_value)),
        (
            "a bulk item with a NUL key",
            Op::Bulk {
                items: vec![
                    (
                        Bytes::from_static(b"ok"),
                        Bytes::from_static(b"v"),
                        Expiry::Never,
                    ),
                    (
                        Bytes::from_static(b"x\0"),
                        Bytes::from_static(b"v"),
                        Expiry::Never,
                    ),
                ],
            },
        ),
        ("an empty bulk", Op::Bulk { items: vec![] }),
    ];
    for (what, bad) in cases {
        let t = now_ms();
        let batch = [
            rec(1, stamp(t, 0), put(b"good", b"v")),
            rec(2, stamp(t, 1), bad),
        ];
        let resp = stream(&http, &node, 2, stamp(t, 1), &batch).await;
        let (code, err) = expect_json_error(resp, what).await;
        assert_eq!((code, err.as_str()), (400, "invalid_entry"), "{what}");
        assert_eq!(view(&status(&http, &node).await), view(&before), "{what}");
        assert_eq!(node::get_raw(&http, &node, "good").await, None, "{what}");
    }
    // A good batch still merges.
    let t = now_ms();
    let resp = stream(
        &http,
        &node,
        1,
        stamp(t, 0),
        &[rec(1, stamp(t, 0), put(b"good", b"v"))],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        node::get_raw(&http, &node, "good").await.as_deref(),
        Some(&b"v"[..])
    );
}
