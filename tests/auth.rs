//! Bearer tokens with roles (docs/DESIGN.md §2.18) against a real kvd
//! started with `--auth-file`:
//!
//! - without a token (or with one the file does not hold) every route but
//!   the open ones is 401 with a JSON body and `WWW-Authenticate`; the
//!   peers' `/internal/*` routes ask for no token;
//! - a token reads and writes only under its prefixes (403 naming it
//!   otherwise), bulks and transactions are refused whole when one part is
//!   not the token's (nothing written), a prefix delete needs every key it
//!   could remove; ranges, counts, watches and search hits hold only what
//!   it may read; admin and metrics routes need their roles, and each
//!   admin action is logged with the token's name;
//! - SIGHUP reads the file again; a file that no longer parses changes
//!   nothing; a bad file at start is a refusal naming the entry.

use std::path::Path;
use std::time::Duration;

use kvd::auth::token_hash;
use kvstore_testkit::watch::{index, kind, RawWatch};
use kvstore_testkit::{run_to_exit, wait_until, Kvd};
use nix::sys::signal::Signal;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

const T: Duration = Duration::from_secs(10);
const APP: &str = "app-secret-0123456789abcdef";
const OPS: &str = "ops-secret-0123456789abcdef";
const LATE: &str = "late-secret-0123456789abcdef";

fn token_file(extra: &[(&str, &str, Value)]) -> String {
    let mut tokens = vec![
        json!({"name": "app", "sha256": token_hash(APP),
               "read": ["app/", "shared/"], "write": ["app/"]}),
        json!({"name": "ops", "sha256": token_hash(OPS),
               "read": [""], "write": [""], "admin": true, "metrics": true}),
    ];
    for (name, secret, roles) in extra {
        let mut t = roles.clone();
        t["name"] = json!(name);
        t["sha256"] = json!(token_hash(secret));
        tokens.push(t);
    }
    json!({ "tokens": tokens }).to_string()
}

fn start(dir: &Path) -> Kvd {
    let file = dir.join("tokens.json");
    std::fs::write(&file, token_file(&[])).unwrap();
    let file = file.to_str().unwrap().to_string();
    Kvd::start(&dir.join("data"), &["--auth-file", &file, "--index"]).unwrap()
}

struct Http {
    client: Client,
    base: String,
}

impl Http {
    async fn send(&self, m: Method, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .client
            .request(m, format!("{}{path}", self.base))
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("kvd answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn code(&self, m: Method, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let (status, v) = self.send(m, path, token, body).await;
        (
            status,
            v["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    }
}

fn keys(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["key"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_asks_for_a_token_and_each_role_allows_only_its_own() {
    let tmp = TempDir::new().unwrap();
    let node = start(tmp.path());
    let h = Http {
        client: kvstore_testkit::api::client(T),
        base: node.url(),
    };
    use Method as M;

    // Open routes, and none else without a token.
    assert_eq!(h.code(M::GET, "/health", None, "").await.0, 200);
    assert_eq!(h.code(M::GET, "/ready", None, "").await.0, 200);
    for (m, p) in [
        (M::GET, "/v1/status"),
        (M::GET, "/v1/kv/app/1"),
        (M::PUT, "/v1/kv/app/1"),
        (M::GET, "/v1/kv"),
        (M::GET, "/metrics"),
        (M::POST, "/v1/admin/pause_writes"),
        (M::GET, "/v1/search?q=x"),
    ] {
        for token in [None, Some("not-a-token")] {
            let (status, code) = h.code(m.clone(), p, token, "v").await;
            assert_eq!(
                (status, code.as_str()),
                (401, "unauthenticated"),
                "{m} {p} {token:?}"
            );
        }
    }
    let resp = h
        .client
        .get(format!("{}/v1/status", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"kvd\"");
    // Peers' routes are a certificate's business, never a token's.
    let (status, code) = h.code(M::POST, "/internal/vote", None, "{}").await;
    assert_ne!(status, 401, "{code}");

    // Keys: the token's prefixes only.
    for (token, key, value) in [
        (OPS, "shared/s", "hello world"),
        (OPS, "other/o", "hello there"),
        (APP, "app/1", "hello app"),
        (APP, "app/2", "two"),
    ] {
        let (status, _) = h
            .send(M::PUT, &format!("/v1/kv/{key}"), Some(token), value)
            .await;
        assert_eq!(status, 200, "{key}");
    }
    let (status, body) = h.send(M::PUT, "/v1/kv/other/x", Some(APP), "no").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"app\"") && message.contains("other/x"),
        "{message}"
    );
    assert_eq!(h.code(M::GET, "/v1/kv/other/o", Some(APP), "").await.0, 403);
    assert_eq!(
        h.code(M::DELETE, "/v1/kv/shared/s", Some(APP), "").await.0,
        403
    );
    assert_eq!(
        h.code(M::GET, "/v1/kv/shared/s", Some(APP), "").await.0,
        200
    );
    assert_eq!(
        h.code(M::GET, "/v1/kv/app/none", Some(APP), "").await.0,
        404
    );
    assert_eq!(h.code(M::GET, "/v1/status", Some(APP), "").await.0, 200);

    // A bulk or a transaction with one part not the token's: refused whole.
    let bulk = json!({"items": [{"key": "app/3", "value": "3"}, {"key": "other/3", "value": "3"}]});
    assert_eq!(
        h.code(M::POST, "/v1/bulk", Some(APP), &bulk.to_string())
            .await
            .0,
        403
    );
    let txn = json!({"compare": [{"key": "other/o", "target": "version", "op": ">", "value": 0}],
                     "success": [{"put": {"key": "app/4", "value": "4"}}]});
    assert_eq!(
        h.code(M::POST, "/v1/txn", Some(APP), &txn.to_string())
            .await
            .0,
        403
    );
    for key in ["app/3", "app/4", "other/3"] {
        let path = format!("/v1/kv/{key}");
        assert_eq!(
            h.code(M::GET, &path, Some(OPS), "").await.0,
            404,
            "{key} was written"
        );
    }
    // A prefix delete: `app` would reach `app2/` too.
    assert_eq!(
        h.code(M::DELETE, "/v1/kv?prefix=app", Some(APP), "")
            .await
            .0,
        403
    );

    // Ranges, counts and search hits: only what the token may read.
    let (_, page) = h.send(M::GET, "/v1/kv", Some(APP), "").await;
    assert_eq!(keys(&page), ["app/1", "app/2", "shared/s"]);
    assert_eq!(page["count"], 3);
    let (_, all) = h.send(M::GET, "/v1/kv", Some(OPS), "").await;
    assert_eq!(keys(&all), ["app/1", "app/2", "other/o", "shared/s"]);
    let (_, count) = h
        .send(M::GET, "/v1/kv?count_only=true", Some(APP), "")
        .await;
    assert_eq!(count["count"], 3);
    assert_eq!(
        h.code(M::GET, "/v1/kv?prefix=other/", Some(APP), "")
            .await
            .0,
        403
    );
    let (_, hits) = h.send(M::GET, "/v1/search?q=hello", Some(APP), "").await;
    let found: Vec<&str> = hits["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["key"].as_str().unwrap())
        .collect();
    assert!(!found.contains(&"other/o"), "{hits}");
    assert_eq!(
        (found.len(), hits["total"].as_u64()),
        (2, Some(2)),
        "{hits}"
    );
    let (_, hits) = h.send(M::GET, "/v1/search?q=hello", Some(OPS), "").await;
    assert_eq!(hits["total"], 3);

    // A watch of every key streams the token's keys only.
    let auth = format!("Authorization: Bearer {APP}");
    let mut w = RawWatch::open(node.port, "prefix=&from_index=1", &[&auth], T).unwrap();
    assert_eq!(w.status, 200);
    let last = h.send(M::PUT, "/v1/kv/app/5", Some(APP), "5").await.1["index"]
        .as_u64()
        .unwrap();
    let events = w
        .events_until(T, |e| kind(e) == "progress" && index(e) >= last)
        .unwrap();
    let streamed: Vec<&str> = events
        .iter()
        .filter(|e| kind(e) == "put")
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, ["shared/s", "app/1", "app/2", "app/5"]);

    // Admin and metrics: their roles; admin actions are in the audit log.
    let pause = "/v1/admin/pause_writes";
    assert_eq!(h.code(M::POST, pause, Some(APP), "").await.0, 403);
    assert_eq!(h.code(M::GET, "/metrics", Some(APP), "").await.0, 403);
    assert_eq!(h.code(M::POST, pause, Some(OPS), "").await.0, 200);
    assert_eq!(
        h.code(M::POST, "/v1/admin/resume_writes", Some(OPS), "")
            .await
            .0,
        200
    );
    let resp = h
        .client
        .get(format!("{}/metrics", h.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let audited = wait_until(T, || {
        let log = node.log();
        log.contains("admin action") && log.contains("ops") && log.contains(pause)
    });
    assert!(audited, "no audit line: {}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_token_file_again_and_a_bad_one_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let node = start(tmp.path());
    let h = Http {
        client: kvstore_testkit::api::client(T),
        base: node.url(),
    };
    let status = |token: &'static str| {
        let h = &h;
        async move { h.code(Method::GET, "/v1/status", Some(token), "").await.0 }
    };
    assert_eq!(status(LATE).await, 401);
    let file = tmp.path().join("tokens.json");
    std::fs::write(
        &file,
        token_file(&[("late", LATE, json!({"read": ["late/"]}))]),
    )
    .unwrap();
    node.signal(Signal::SIGHUP).unwrap();
    let mut taken = false;
    for _ in 0..200 {
        if status(LATE).await == 200 {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(taken, "the new token was not taken: {}", node.log());

    std::fs::write(&file, "{\"tokens\": [ not json").unwrap();
    node.signal(Signal::SIGHUP).unwrap();
    let refused = wait_until(T, || node.log().contains("token file not taken"));
    assert!(refused, "{}", node.log());
    assert_eq!(status(LATE).await, 200, "a bad file took tokens away");
    assert_eq!(status(APP).await, 200);
}

#[test]
fn a_bad_token_file_is_a_refusal_to_start_naming_the_entry() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("tokens.json");
    let text = json!({"tokens": [
        {"name": "ok", "sha256": token_hash("a")},
        {"name": "bad", "sha256": "1234"},
    ]});
    std::fs::write(&file, text.to_string()).unwrap();
    let data = tmp.path().join("data");
    let (status, out) = run_to_exit(
        "kvd",
        &[
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
            "--auth-file",
            file.to_str().unwrap(),
        ],
        T,
    )
    .unwrap();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("tokens.json") && out.contains("tokens[1] (\"bad\")"),
        "{out}"
    );
    let (status, out) = run_to_exit(
        "kvd",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--auth-file",
            "/nonexistent/tokens.json",
        ],
        T,
    )
    .unwrap();
    assert!(
        !status.success() && out.contains("/nonexistent/tokens.json"),
        "{out}"
    );
}

/// Over TLS with a token file, an operator's route takes the admin token
/// (no certificate needed) or a node certificate; a peer's route still
/// takes only a node certificate, whatever token comes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_admin_token_opens_operator_routes_and_never_peer_routes() {
    use kvstore_testkit::tls::{self, TlsDir, CLIENT};
    let tmp = TempDir::new().unwrap();
    let certs = TlsDir::create(&tmp.path().join("tls"), &["n0"]).unwrap();
    let file = tmp.path().join("tokens.json");
    std::fs::write(&file, token_file(&[])).unwrap();
    let node = tls::start_node(
        &certs,
        "n0",
        &tmp.path().join("data"),
        &["--auth-file", file.to_str().unwrap()],
    )
    .unwrap();
    let base = node.url();
    assert!(base.starts_with("https://"), "{base}");
    let post = |client: reqwest::Client, path: &'static str, token: Option<&'static str>| {
        let url = format!("{base}{path}");
        async move {
            let mut req = client.post(url).body("{}");
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.expect("kvd answers");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let plain = certs.http(Some(CLIENT));
    let pause = "/v1/admin/pause_writes";
    assert_eq!(post(plain.clone(), pause, Some(OPS)).await.0, 200);
    assert_eq!(
        post(plain.clone(), "/v1/admin/resume_writes", Some(OPS))
            .await
            .0,
        200
    );
    let (status, code) = post(plain.clone(), pause, Some(APP)).await;
    assert_eq!((status, code.as_str()), (403, "permission_denied"));
    let (status, code) = post(plain.clone(), pause, None).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let (status, code) = post(plain, "/internal/vote", Some(OPS)).await;
    assert_eq!((status, code.as_str()), (403, "peer_certificate_required"));
    // A cluster member's certificate opens them too, token or not (a
    // primary handing over promotes its successor so).
    let member = certs.http(Some("n0"));
    assert_eq!(post(member.clone(), pause, None).await.0, 200);
    assert_eq!(post(member, "/v1/admin/resume_writes", None).await.0, 200);
    let audited = wait_until(T, || {
        node.log().contains("admin action by a node certificate")
    });
    assert!(audited, "{}", node.log());
}

#[test]
fn the_cli_sends_its_token_from_a_flag_the_environment_or_a_file() {
    let tmp = TempDir::new().unwrap();
    let node = start(tmp.path());
    let url = node.url();
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(kvstore_testkit::bin("kvclient"))
            .args(["--endpoints", &url, "--retries", "0"])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, out) = cli(&["set", "app/cli", "v1"], &[]);
    assert!(!ok && out.contains("unauthenticated"), "{out}");
    let (ok, out) = cli(&["--token", APP, "set", "app/cli", "v1"], &[]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["get", "app/cli"], &[("KV_TOKEN", APP)]);
    assert!(ok && out.contains("v1"), "{out}");
    let file = tmp.path().join("app.token");
    std::fs::write(&file, format!("{APP}\n")).unwrap();
    let (ok, out) = cli(
        &["--token-file", file.to_str().unwrap(), "get", "other/x"],
        &[],
    );
    assert!(!ok && out.contains("permission_denied"), "{out}");
    let (ok, out) = cli(&["--token-file", "/nonexistent/t", "get", "app/cli"], &[]);
    assert!(!ok && out.contains("/nonexistent/t"), "{out}");
}

/// Protected mode: beyond loopback, no TLS and tokens is a refusal that
/// says why, before the data dir is touched (nothing is bound either).
#[test]
fn a_node_listening_beyond_loopback_without_tls_and_tokens_refuses_to_start() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let (status, out) = run_to_exit(
        "kvd",
        &[
            "--bind",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        T,
    )
    .unwrap();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("refusing to listen on 0.0.0.0") && out.contains("--insecure"),
        "{out}"
    );
    assert!(!data.exists(), "the refusal touched the data dir");
}

/// The refusals one by one, each leaving the node as it was: a read-only
/// token writing, a prefix token reading, listing or watching past its
/// prefix, and every admin route from a token without the admin role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_leaves_the_node_as_it_was() {
    const READER: &str = "reader-secret-0123456789abcdef";
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("tokens.json");
    std::fs::write(
        &file,
        token_file(&[("reader", READER, json!({"read": [""]}))]),
    )
    .unwrap();
    let node = Kvd::start(
        &tmp.path().join("data"),
        &["--auth-file", file.to_str().unwrap()],
    )
    .unwrap();
    let h = Http {
        client: kvstore_testkit::api::client(T),
        base: node.url(),
    };
    use Method as M;
    assert_eq!(
        h.code(M::PUT, "/v1/kv/b/x", Some(OPS), "theirs").await.0,
        200
    );
    let (_, before) = h.send(M::GET, "/v1/status", Some(OPS), "").await;
    let refused: Vec<(Method, &str, &str, &str)> = vec![
        (M::PUT, "/v1/kv/b/x", READER, "mine"),
        (M::DELETE, "/v1/kv/b/x", READER, ""),
        (M::GET, "/v1/kv/b/x", APP, ""),
        (M::GET, "/v1/kv?prefix=b/", APP, ""),
        (M::GET, "/v1/kv?start=b&end=c", APP, ""),
        (M::GET, "/v1/watch?prefix=b/", APP, ""),
        (M::POST, "/v1/admin/pause_writes", APP, ""),
        (M::POST, "/v1/admin/mode", APP, r#"{"mode": "masterless"}"#),
        (M::POST, "/v1/admin/promote", APP, ""),
        (M::POST, "/promote_to_primary", READER, ""),
        (
            M::POST,
            "/v1/admin/transfer",
            APP,
            r#"{"to": "http://127.0.0.1:1"}"#,
        ),
    ];
    for (m, path, token, body) in refused {
        let (status, code) = h.code(m.clone(), path, Some(token), body).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "permission_denied"),
            "{m} {path}"
        );
    }
    let (_, after) = h.send(M::GET, "/v1/status", Some(OPS), "").await;
    for field in ["last_index", "digest", "epoch", "role", "keys"] {
        assert_eq!(before[field], after[field], "{field}: {before} -> {after}");
    }
    let resp = h
        .client
        .get(format!("{}/v1/kv/b/x", h.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "theirs");
    // Not paused: a write goes through.
    assert_eq!(h.code(M::PUT, "/v1/kv/app/ok", Some(APP), "1").await.0, 200);
}
