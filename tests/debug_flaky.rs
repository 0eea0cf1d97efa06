//! `debug_flaky` simulates a crash between "durable
//! in the WAL" and "applied in memory", and only with `--enable-debug`.

use kvstore_testkit::node::{
    self, crash_restart, expect_json_error, field, fingerprint, get_raw, http, start, status,
};
use serde_json::json;
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_writes_are_acknowledged_unapplied_and_recovered_by_replay() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &["--enable-debug"]);
    let http = http();

    // A normal write first, so we can tell "not applied" from "store empty".
    let resp = http
        .put(node::key_url(&kvd, "normal"))
        .body("applied")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let before = field(&status(&http, &kvd).await, "last_index");

    let mut flaky: Vec<(String, String)> = Vec::new();
    for i in 0..5 {
        let (k, v) = (format!("flaky/put/{i}"), format!("put value {i}"));
        let resp = http
            .put(format!("{}?debug_flaky=1.0", node::key_url(&kvd, &k)))
            .body(v.clone())
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
        assert!(reply["index"].as_u64().is_some(), "PUT reply: {reply}");
        flaky.push((k, v));
    }
    let bulk_items: Vec<(String, String)> = (0..20)
        .map(|i| (format!("flaky/bulk/{i}"), format!("bulk value {i}")))
        .collect();
    let body = json!({"items": bulk_items
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect::<Vec<_>>()});
    let resp = http
        .post(format!("{}/v1/bulk?debug_flaky=1.0", kvd.url()))
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
    flaky.extend(bulk_items);

    // Acknowledged, logged, but not in memory: every key reads as absent.
    for (k, _) in &flaky {
        assert_eq!(
            get_raw(&http, &kvd, k).await,
            None,
            "{k} must read as absent"
        );
    }
    let s = status(&http, &kvd).await;
    assert_eq!(
        field(&s, "last_index"),
        before + 6,
        "five PUTs and one bulk were logged"
    );
    assert_eq!(field(&s, "keys"), 1, "only the normal write is in memory");

    // Replay after a crash applies what the WAL holds.
    crash_restart(&mut kvd);
    for (k, v) in &flaky {
        assert_eq!(
            get_raw(&http, &kvd, k).await.as_deref(),
            Some(v.as_bytes()),
            "{k} must be recovered from the WAL"
        );
    }
    assert_eq!(
        get_raw(&http, &kvd, "normal").await.as_deref(),
        Some(&b"applied"[..])
    );
    let s = status(&http, &kvd).await;
    assert_eq!(field(&s, "keys"), 1 + flaky.len() as u64);
    assert_eq!(field(&s, "last_index"), before + 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_zero_applies_normally() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--enable-debug"]);
    let http = http();
    let resp = http
        .put(format!("{}?debug_flaky=0.0", node::key_url(&kvd, "k")))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(get_raw(&http, &kvd, "k").await.as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enable_debug_flaky_is_refused_and_writes_nothing() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let http = http();
    let resp = http
        .put(node::key_url(&kvd, "existing"))
        .body("old")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let before = fingerprint(&http, &kvd).await;

    let resp = http
        .put(format!(
            "{}?debug_flaky=1.0",
            node::key_url(&kvd, "refused/put")
        ))
        .body("nope")
        .send()
        .await
        .unwrap();
    let (code, _) = expect_json_error(resp, "PUT with debug_flaky").await;
    assert_eq!(code, 400);

    // Also for an overwrite of an existing key: the old value must stay.
    let resp = http
        .put(format!(
            "{}?debug_flaky=1.0",
            node::key_url(&kvd, "existing")
        ))
        .body("new")
        .send()
        .await
        .unwrap();
    let (code, _) = expect_json_error(resp, "PUT overwrite with debug_flaky").await;
    assert_eq!(code, 400);

    let resp = http
        .post(format!("{}/v1/bulk?debug_flaky=1.0", kvd.url()))
        .json(&json!({"items": [
            {"key": "refused/bulk/a", "value": "1"},
            {"key": "refused/bulk/b", "value": "2"},
        ]}))
        .send()
        .await
        .unwrap();
    let (code, _) = expect_json_error(resp, "bulk with debug_flaky").await;
    assert_eq!(code, 400);

    assert_eq!(
        fingerprint(&http, &kvd).await,
        before,
        "refused requests must not change last_index, keys or digest"
    );
    let refused = ["refused/put", "refused/bulk/a", "refused/bulk/b"];
    for k in refused {
        assert_eq!(get_raw(&http, &kvd, k).await, None, "{k}");
    }
    assert_eq!(
        get_raw(&http, &kvd, "existing").await.as_deref(),
        Some(&b"old"[..])
    );

    // Nothing reached the WAL either: a replay brings nothing back.
    crash_restart(&mut kvd);
    for k in refused {
        assert_eq!(get_raw(&http, &kvd, k).await, None, "{k} after restart");
    }
    assert_eq!(
        get_raw(&http, &kvd, "existing").await.as_deref(),
        Some(&b"old"[..])
    );
    assert_eq!(fingerprint(&http, &kvd).await, before);
}
