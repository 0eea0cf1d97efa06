//! The HTTP API of TTLs and leases (docs/DESIGN.md §2.15, §2.16) against
//! real kvd processes: bad input gets the right 4xx JSON and changes
//! nothing, a masterless node refuses every lease route and `lease=`, and
//! the happy paths: a PUT with `ttl_ms` shows `X-KV-TTL-Ms`, a lease is
//! granted, keys attached, kept alive, shown and revoked with its keys.

use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::node::{expect_json_error, fingerprint, http, start};
use kvstore_testkit::Kvd;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

fn url(kvd: &Kvd, path: &str) -> String {
    format!("{}{path}", kvd.url())
}

/// The JSON body of an answer that must be 200.
async fn ok_json(req: RequestBuilder, what: &str) -> Value {
    let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{what}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"))
}

/// Sends each request and checks it is refused with `(status, code)`.
async fn refused(cases: Vec<(RequestBuilder, u16, &str)>) {
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let what = format!("request {i}: {req:?}");
        let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = expect_json_error(resp, &what).await;
        assert_eq!(got, (status, code.to_string()), "{what}");
    }
}

#[tokio::test]
async fn bad_ttls_and_lease_ids_get_4xx_and_change_nothing() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let h = http();
    ok_json(h.put(url(&kvd, "/v1/kv/k")).body("v"), "a first PUT").await;
    let before = fingerprint(&h, &kvd).await;
    let put = |query: &str| h.put(url(&kvd, &format!("/v1/kv/k?{query}"))).body("new");
    let bulk = |item: Value| {
        h.post(url(&kvd, "/v1/bulk"))
            .json(&json!({"items": [item]}))
    };
    let txn_put = |put: Value| {
        h.post(url(&kvd, "/v1/txn"))
            .json(&json!({"success": [{"put": put}]}))
    };
    let grant = |body: &str| {
        h.post(url(&kvd, "/v1/leases"))
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let mut cases = Vec::new();
    for ttl in [
        "-1",
        "0",
        "315360000001",
        "99999999999999999999999",
        "abc",
        "1.5",
        "",
    ] {
        cases.push((put(&format!("ttl_ms={ttl}")), 400, "invalid_ttl"));
    }
    for pair in [
        "ttl_ms=5&lease=1",
        "ttl_ms=5&keep_ttl=true",
        "lease=1&keep_ttl=true",
        "lease=0",
        "lease=x",
    ] {
        cases.push((put(pair), 400, "invalid_ttl"));
    }
    cases.push((put("keep_ttl=yes"), 400, "invalid_query"));
    cases.push((put("ttl=5"), 400, "unknown_parameter"));
    cases.push((put("ttl_ms=5&ttl_ms=6"), 400, "invalid_query"));
    for bad in [json!(0), json!(-1), json!("5"), json!(1.5), json!(1e30)] {
        let item = json!({"key": "b", "value": "x", "ttl_ms": bad});
        cases.push((bulk(item), 400, "invalid_ttl"));
        let op = json!({"key": "t", "value": "x", "ttl_ms": bad});
        cases.push((txn_put(op), 400, "invalid_ttl"));
    }
    let two = json!({"key": "b", "value": "x", "ttl_ms": 5, "keep_ttl": true});
    cases.push((bulk(two.clone()), 400, "invalid_ttl"));
    cases.push((txn_put(two), 400, "invalid_ttl"));
    let unknown = json!({"key": "b", "value": "x", "ttl": 5});
    cases.push((bulk(unknown.clone()), 400, "invalid_json"));
    cases.push((txn_put(unknown), 400, "invalid_json"));
    for (body, code) in [
        (r#"{"ttl_ms": 0}"#, "invalid_ttl"),
        (r#"{"ttl_ms": -5}"#, "invalid_ttl"),
        (r#"{"ttl_ms": 315360000001}"#, "invalid_ttl"),
        (r#"{"ttl_ms": "1000"}"#, "invalid_ttl"),
        (r#"{"ttl_ms": 1000, "keys": []}"#, "invalid_json"),
        (r#"{}"#, "invalid_json"),
        (r#"[1000]"#, "invalid_json"),
        ("", "invalid_json"),
    ] {
        cases.push((grant(body), 400, code));
    }
    cases.push((
        h.post(url(&kvd, "/v1/leases?ttl_ms=5"))
            .body(r#"{"ttl_ms": 5}"#),
        400,
        "unknown_parameter",
    ));
    cases.push((
        grant(&format!(r#"{{"ttl_ms": "{}"}}"#, "9".repeat(5000))),
        413,
        "value_too_large",
    ));
    for id in ["0", "-1", "abc", "1.5", "18446744073709551616"] {
        let lease = format!("/v1/leases/{id}");
        cases.push((h.get(url(&kvd, &lease)), 400, "invalid_query"));
        cases.push((h.delete(url(&kvd, &lease)), 400, "invalid_query"));
        let keepalive = format!("{lease}/keepalive");
        cases.push((h.post(url(&kvd, &keepalive)), 400, "invalid_query"));
    }
    cases.push((
        h.get(url(&kvd, "/v1/leases/1?keys=1")),
        400,
        "unknown_parameter",
    ));
    cases.push((
        h.post(url(&kvd, "/v1/leases/1/keepalive?ttl_ms=5")),
        400,
        "unknown_parameter",
    ));
    cases.push((
        h.delete(url(&kvd, "/v1/leases/1?x=1")),
        400,
        "unknown_parameter",
    ));
    // A well-formed id no lease has: a read finds nothing.
    cases.push((h.get(url(&kvd, "/v1/leases/999")), 404, "lease_not_found"));
    refused(cases).await;
    assert_eq!(
        fingerprint(&h, &kvd).await,
        before,
        "a refusal wrote nothing"
    );
    let resp = h.get(url(&kvd, "/v1/kv/k")).send().await.unwrap();
    assert!(
        resp.headers().get("x-kv-ttl-ms").is_none(),
        "a plain PUT has no TTL"
    );
    assert_eq!(resp.text().await.unwrap(), "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masterless_node_refuses_leases_before_anything_is_read() {
    let cluster = Cluster::start("masterless", |_| Vec::new());
    let n0 = &cluster.nodes[0];
    let h = http();
    ok_json(h.put(url(n0, "/v1/kv/m/a")).body("1"), "a masterless PUT").await;
    // Only keys and digest: a masterless node's log also takes its peers'.
    let keys_and_digest = |f: (u64, u64, String)| (f.1, f.2);
    let before = keys_and_digest(fingerprint(&h, n0).await);
    let conflict = "unsupported_in_masterless";
    refused(vec![
        (
            h.post(url(n0, "/v1/leases")).body(r#"{"ttl_ms": 5000}"#),
            409,
            conflict,
        ),
        // Refused before the body is read: even one that is not JSON.
        (
            h.post(url(n0, "/v1/leases")).body("not json"),
            409,
            conflict,
        ),
        (h.post(url(n0, "/v1/leases/1/keepalive")), 409, conflict),
        (h.get(url(n0, "/v1/leases/1")), 409, conflict),
        (h.delete(url(n0, "/v1/leases/1")), 409, conflict),
        (
            h.put(url(n0, "/v1/kv/m/a?lease=1")).body("2"),
            409,
            conflict,
        ),
        (
            h.post(url(n0, "/v1/bulk")).json(&json!({"items": [
                {"key": "m/b", "value": "x"},
                {"key": "m/c", "value": "x", "lease": 1},
            ]})),
            409,
            conflict,
        ),
        (
            h.post(url(n0, "/v1/txn")).json(&json!({"success": [
                {"put": {"key": "m/d", "value": "x", "lease": 1}},
            ]})),
            409,
            conflict,
        ),
        // Bad input is still 400 there.
        (
            h.put(url(n0, "/v1/kv/m/a?ttl_ms=0")).body("2"),
            400,
            "invalid_ttl",
        ),
    ])
    .await;
    assert_eq!(keys_and_digest(fingerprint(&h, n0).await), before);
}
