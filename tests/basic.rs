//! The common operations against a real kvd.

use base64::Engine as _;
use bytes::Bytes;
use kvstore_testkit::node::{self, client, get_raw, http, start};
use serde_json::json;
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_then_get_returns_the_value() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);

    let index = c.set("greeting", "hello").await.unwrap();
    assert!(index >= 1, "a write gets a log index >= 1, got {index}");
    assert_eq!(
        c.get("greeting").await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
    // The raw API serves the exact bytes too, not some JSON wrapping.
    assert_eq!(
        get_raw(&http(), &kvd, "greeting").await.as_deref(),
        Some(&b"hello"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_delete_then_get_is_404() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);

    let set_index = c.set("doomed", "x").await.unwrap();
    let del = c.delete("doomed").await.unwrap();
    assert!(del.deleted, "deleting a present key reports deleted=true");
    assert!(del.index > set_index, "the delete is logged after the set");
    assert_eq!(c.get("doomed").await.unwrap(), None);
    assert_eq!(
        get_raw(&http(), &kvd, "doomed").await,
        None,
        "raw GET is 404"
    );

    let again = c.delete("doomed").await.unwrap();
    assert!(
        !again.deleted,
        "deleting an absent key reports deleted=false"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_a_never_set_key_is_404_with_a_json_error() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let http = http();

    let resp = http
        .get(node::key_url(&kvd, "never-set"))
        .send()
        .await
        .unwrap();
    let (status, _code) = node::expect_json_error(resp, "GET of a never-set key").await;
    assert_eq!(status, 404);
    assert_eq!(client(&kvd).get("never-set").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_twice_then_get_returns_the_latest() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);

    let first = c.set("k", "first").await.unwrap();
    let second = c.set("k", "second").await.unwrap();
    assert!(
        second > first,
        "log indexes increase: {first} then {second}"
    );
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"second"[..]));
    let status = c.status().await.unwrap();
    assert_eq!(status.keys(), Some(1), "an overwrite does not add a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_sigterm_restart_get() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let c = client(&kvd);
    c.set("survivor", "still here").await.unwrap();

    let exit = kvd.terminate().unwrap();
    assert!(
        exit.success(),
        "SIGTERM must end kvd with status 0, got {exit}; log:\n{}",
        kvd.log()
    );
    node::restart(&mut kvd);
    assert_eq!(
        c.get("survivor").await.unwrap().as_deref(),
        Some(&b"still here"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_set_then_get_every_item() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();

    // Through the library: UTF-8 values go as strings, others as base64.
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let mut items: Vec<(String, Bytes)> = (0..50)
        .map(|i| (format!("bulk/{i}"), Bytes::from(format!("value {i}"))))
        .collect();
    items.push(("bulk/binary".into(), Bytes::from(binary.clone())));
    items.push(("bulk/empty".into(), Bytes::new()));
    let outcome = c.bulk_set(&items).await.unwrap();
    assert_eq!(outcome.count, items.len() as u64);
    for (k, v) in &items {
        assert_eq!(c.get(k).await.unwrap().as_ref(), Some(v), "key {k:?}");
    }

    // Through the raw API, with an explicit {"base64": ...} value.
    let raw_binary = [0u8, 1, 2, 0xfe, 0xff, b'\n', 0];
    let body = json!({"items": [
        {"key": "raw/text", "value": "plain text"},
        {"key": "raw/binary", "value": {"base64": base64::engine::general_purpose::STANDARD.encode(raw_binary)}},
    ]});
    let resp = http
        .post(format!("{}/v1/bulk", kvd.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let reply: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(reply["count"], 2, "bulk reply: {reply}");
    assert!(reply["index"].as_u64().is_some(), "bulk reply: {reply}");
    assert_eq!(
        get_raw(&http, &kvd, "raw/text").await.as_deref(),
        Some(&b"plain text"[..])
    );
    assert_eq!(
        get_raw(&http, &kvd, "raw/binary").await.as_deref(),
        Some(&raw_binary[..])
    );

    let status = c.status().await.unwrap();
    assert_eq!(status.keys(), Some(items.len() as u64 + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_slashes_spaces_and_unicode_round_trip() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();

    let keys = [
        "users/42/name",
        "a/b/c/",
        "with space",
        "  leading and trailing  ",
        "ünïcödé/ключ/鍵/🔑",
        "query?and#hash&amp=1+2%20",
        "back\\slash",
    ];
    for (i, k) in keys.iter().enumerate() {
        c.set(k, format!("v{i}:{k}")).await.unwrap();
    }
    let kvd_url = kvd.url();
    let check = |label: &'static str| {
        let c = c.clone();
        let http = http.clone();
        let kvd_url = kvd_url.clone();
        async move {
            for (i, k) in keys.iter().enumerate() {
                let want = format!("v{i}:{k}");
                assert_eq!(
                    c.get(k).await.unwrap().as_deref(),
                    Some(want.as_bytes()),
                    "{label}: key {k:?} via kvclient"
                );
                // A key must address exactly itself: no normalisation of
                // slashes or decoding differences between the routes.
                let url = format!("{kvd_url}/v1/kv/{}", kvclient::encode_key(k));
                let got = http.get(url).send().await.unwrap();
                assert_eq!(got.status(), 200, "{label}: key {k:?} via raw GET");
                assert_eq!(got.bytes().await.unwrap(), want.as_bytes());
            }
            let status = c.status().await.unwrap();
            assert_eq!(
                status.keys(),
                Some(keys.len() as u64),
                "{label}: distinct keys"
            );
        }
    };
    check("before restart").await;

    // Keys also survive the WAL's encoding and replay byte for byte.
    node::crash_restart(&mut kvd);
    check("after SIGKILL and restart").await;

    // A bulk write takes the same keys (JSON strings, not URL paths).
    let items: Vec<(String, Bytes)> = keys
        .iter()
        .map(|k| (format!("bulk:{k}"), Bytes::from(k.to_string())))
        .collect();
    c.bulk_set(&items).await.unwrap();
    for (k, v) in &items {
        assert_eq!(
            get_raw(&http, &kvd, k).await.as_deref(),
            Some(&v[..]),
            "{k:?}"
        );
    }
}
