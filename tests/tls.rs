//! TLS on the client API and mutual TLS between peers (docs/DESIGN.md §12),
//! against real kvd processes on loopback: a cluster that replicates and
//! fails over over mutual TLS, forged peer traffic without a node
//! certificate refused (403) while the primary carries on, clients that
//! verify the server (kvclient's library and CLI, curl), plain HTTP to a
//! TLS port, starts refused for unusable files, and certificates and CAs
//! rotated by SIGHUP alone.

use std::process::Command;
use std::time::Duration;

use kvd::replication::node::encode_append;
use kvd::replication::rules::LogPos;
use kvstore_testkit::node::{data_dir, REQUEST_TIMEOUT};
use kvstore_testkit::tls::{self, TlsDir, CLIENT};
use kvstore_testkit::{bin, free_port, http_get, run_to_exit, Kvd};
use serde_json::Value;
use tempfile::TempDir;

async fn status(http: &reqwest::Client, url: &str) -> Value {
    let resp = http
        .get(format!("{url}/v1/status"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}/v1/status: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}/v1/status");
    resp.json().await.expect("status is JSON")
}

/// Polls `cond` until it holds, failing the test after 30 s.
async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let held = kvstore_testkit::masterless::eventually(Duration::from_secs(30), cond).await;
    assert!(held, "timed out: {what}");
}

/// Waits until every node at `urls` has applied `index` and holds `key` = `value`.
async fn replicated(http: &reqwest::Client, urls: &[String], index: u64, key: &str, value: &str) {
    for url in urls {
        eventually(&format!("{url} applies {key}"), || async {
            status(http, url).await["applied_index"].as_u64() >= Some(index)
        })
        .await;
        let resp = http.get(format!("{url}/v1/kv/{key}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {key} on {url}");
        assert_eq!(resp.text().await.unwrap(), value, "{key} on {url}");
    }
}

/// An `/internal/append` from a would-be primary of epoch `epoch` that
/// matches the log of the node whose status is `s` (a heartbeat after its
/// last entry): a node of a lower epoch that took it would step down.
fn forged_append(s: &Value, epoch: u64) -> Vec<u8> {
    let last = s["last_index"].as_u64().unwrap();
    let prev = LogPos::new(s["last_log_epoch"].as_u64().unwrap(), last);
    encode_append(epoch, prev, last, "https://127.0.0.1:1", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_replicates_refuses_forged_peers_and_fails_over() {
    let tmp = TempDir::new().unwrap();
    let (certs, mut nodes) = tls::start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
    let http = certs.http(None);
    let client = certs.kvclient(&urls);

    let index = client.set("before", "1").await.unwrap();
    replicated(&http, &urls, index, "before", "1").await;
    let s0 = status(&http, &urls[0]).await;
    assert_eq!(s0["role"], "primary", "{s0}");
    let epoch = s0["epoch"].as_u64().unwrap();

    // Forged peer traffic from a higher epoch, over TLS: with no client
    // certificate, and with a certificate of the cluster CA that names no
    // node. Either would depose n0 if it were taken.
    for (who, forger) in [
        ("no client certificate", certs.http(None)),
        ("a certificate without a node SAN", certs.http(Some(CLIENT))),
    ] {
        let resp = forger
            .post(format!("{}/internal/append", urls[0]))
            .body(forged_append(&s0, epoch + 5))
            .send()
            .await
            .unwrap();
        let code = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(code, 403, "forged append with {who}: {body}");
        assert_eq!(body["error"]["code"], "peer_certificate_required", "{who}");
        let resp = forger
            .post(format!("{}/v1/admin/promote", urls[1]))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "promote with {who}");
    }
    let s0 = status(&http, &urls[0]).await;
    assert_eq!(s0["role"], "primary", "n0 was deposed: {s0}");
    assert_eq!(s0["epoch"].as_u64(), Some(epoch), "{s0}");
    let index = client.set("after-forgery", "2").await.unwrap();
    replicated(&http, &urls, index, "after-forgery", "2").await;

    // The primary dies; a survivor is promoted (an operator's request,
    // with a node certificate) and takes writes, replicated to the other.
    nodes[0].kill9().unwrap();
    let operator = certs.http(Some("n1"));
    let survivors = urls[1..].to_vec();
    let won = tls::promote_survivor(&operator, &survivors, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("no survivor became primary: {e:#}"));
    let index = certs
        .kvclient(&survivors)
        .set("after-failover", "3")
        .await
        .unwrap();
    replicated(&http, &survivors, index, "after-failover", "3").await;
    let s = status(&http, &survivors[won]).await;
    assert_eq!(s["role"], "primary", "{s}");
    assert!(s["epoch"].as_u64() > Some(epoch), "{s}");
}

/// A single TLS node (its certificate names node `n0`) in `tmp`.
fn tls_node(tmp: &TempDir) -> (TlsDir, Kvd) {
    let certs = TlsDir::create(&tmp.path().join("tls"), &["n0"]).unwrap();
    let node = tls::start_node(&certs, "n0", &data_dir(tmp), &[]).unwrap();
    (certs, node)
}

fn kvclient_cli(args: &[&str]) -> std::process::Output {
    Command::new(bin("kvclient"))
        .args(args)
        .env_remove("KV_CA")
        .env_remove("KV_ENDPOINTS")
        .output()
        .expect("running kvclient")
}

#[test]
fn the_cli_and_curl_verify_the_server_against_the_ca() {
    let tmp = TempDir::new().unwrap();
    let (certs, node) = tls_node(&tmp);
    let url = node.url();
    let ca = certs.ca().display().to_string();

    let set = kvclient_cli(&["--endpoints", &url, "--ca", &ca, "set", "k", "v1"]);
    assert!(set.status.success(), "set over TLS: {set:?}");
    let get = kvclient_cli(&["--endpoints", &url, "--ca", &ca, "get", "k"]);
    assert!(get.status.success(), "get over TLS: {get:?}");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");

    // Without the CA nothing is trusted: a certificate error, not a retry loop.
    let untrusted = kvclient_cli(&["--endpoints", &url, "--timeout-ms", "3000", "get", "k"]);
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        !untrusted.status.success(),
        "get without --ca: {untrusted:?}"
    );
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "get without --ca: not a certificate error: {stderr}"
    );

    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed: its checks are skipped");
        return;
    }
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--noproxy", "*"])
            .args(args)
            .output()
            .expect("running curl")
    };
    let got = curl(&["--cacert", &ca, &format!("{url}/v1/kv/k")]);
    assert!(got.status.success(), "curl --cacert: {got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "v1");
    let refused = curl(&[&format!("{url}/v1/kv/k")]);
    assert!(
        !refused.status.success(),
        "curl trusted the node without --cacert"
    );
    // A client certificate of the CA without a node SAN: the key routes
    // serve it, the admin routes do not.
    let (cert, key) = (certs.cert(CLIENT), certs.key(CLIENT));
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let with_cert = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let got = curl(&[&with_cert[..], &[&format!("{url}/v1/kv/k")]].concat());
    assert_eq!(String::from_utf8_lossy(&got.stdout), "v1", "{got:?}");
    let admin = curl(
        &[
            &with_cert[..],
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("{url}/v1/admin/pause_writes"),
            ],
        ]
        .concat(),
    );
    assert_eq!(String::from_utf8_lossy(&admin.stdout), "403", "{admin:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_tls_port_fails_and_tls_goes_on() {
    let tmp = TempDir::new().unwrap();
    let (certs, node) = tls_node(&tmp);
    for _ in 0..3 {
        let plain = http_get(node.port, "/health", Duration::from_secs(5));
        assert!(
            !matches!(plain, Ok((200, _))),
            "plain HTTP was answered: {plain:?}"
        );
    }
    let health = certs.client_config(None).unwrap();
    let (code, _) = tls::https_get(&health, node.port, "/health", REQUEST_TIMEOUT).unwrap();
    assert_eq!(code, 200);
    let client = certs.kvclient(&[node.url()]);
    client.set("still", "serving").await.unwrap();
    assert_eq!(
        client.get("still").await.unwrap().as_deref(),
        Some(&b"serving"[..])
    );
    // The library without the CA trusts nothing, and says it is TLS.
    let untrusted = kvclient::Client::new([node.url()]).unwrap();
    let err = untrusted.get("still").await.unwrap_err();
    assert_eq!(err.code(), "tls", "{err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(
        node.log().contains("TLS handshake failed"),
        "no log line for the failed handshake:\n{}",
        node.log()
    );
    let (code, body) = tls::https_get(&health, node.port, "/metrics", REQUEST_TIMEOUT).unwrap();
    assert_eq!(code, 200);
    let failures = metric(
        &String::from_utf8_lossy(&body),
        "kvd_tls_handshake_failures_total",
    );
    assert!(
        failures >= 3.0,
        "3 plain requests, {failures} failures counted"
    );
}

/// The value of an unlabelled metric in a Prometheus text page (0 if absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether a fresh TLS connection with `config` gets `/health` from `port`.
fn handshakes(config: &std::sync::Arc<rustls::ClientConfig>, port: u16) -> bool {
    matches!(
        tls::https_get(config, port, "/health", Duration::from_secs(5)),
        Ok((200, _))
    )
}

/// Copies certificate and key `name` of `from` over the files of the same
/// name in `to` (where the nodes' flags point).
fn copy_cert(from: &TlsDir, to: &TlsDir, name: &str) {
    std::fs::copy(from.cert(name), to.cert(name)).unwrap();
    std::fs::copy(from.key(name), to.key(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_new_certificates_and_a_new_ca_and_keeps_the_old_on_a_bad_file() {
    use kvstore_testkit::Sig;
    let tmp = TempDir::new().unwrap();
    let (live, mut nodes) = tls::start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    // `live` is where the flags point; `old` keeps the first CA's files,
    // `new` is a second CA with certificates for the same nodes.
    let old = TlsDir::create(&tmp.path().join("old"), &[]).unwrap();
    for name in ["n0", "n1", "n2"] {
        copy_cert(&live, &old, name);
    }
    std::fs::copy(live.ca(), old.ca()).unwrap();
    let new = TlsDir::create(&tmp.path().join("new"), &["n0", "n1", "n2"]).unwrap();
    let hup = |nodes: &[Kvd]| nodes.iter().for_each(|n| n.signal(Sig::SIGHUP).unwrap());
    let index = old.kvclient(&urls).set("before", "1").await.unwrap();
    replicated(&old.http(None), &urls, index, "before", "1").await;

    // 1. Both CAs trusted, 2. the new certificates, each by SIGHUP alone.
    let both = [
        std::fs::read(old.ca()).unwrap(),
        std::fs::read(new.ca()).unwrap(),
    ]
    .concat();
    std::fs::write(live.ca(), both).unwrap();
    hup(&nodes);
    for name in ["n0", "n1", "n2"] {
        copy_cert(&new, &live, name);
    }
    hup(&nodes);
    let trusts_new = new.client_config(None).unwrap();
    for &port in &ports {
        assert!(
            kvstore_testkit::wait_until(Duration::from_secs(30), || handshakes(&trusts_new, port)),
            "port {port} still serves the old certificate"
        );
    }
    let index = new.kvclient(&urls).set("rotated", "2").await.unwrap();
    replicated(&new.http(None), &urls, index, "rotated", "2").await;

    // 3. The old CA dropped: its certificates no longer make a member.
    std::fs::copy(new.ca(), live.ca()).unwrap();
    hup(&nodes);
    let old_member = old.client_config(Some("n1")).unwrap();
    let refused = kvstore_testkit::wait_until(Duration::from_secs(30), || {
        let mut cfg = (*new.client_config(None).unwrap()).clone();
        cfg.client_auth_cert_resolver = old_member.client_auth_cert_resolver.clone();
        // A certificate sent is verified: one the CA did not sign fails
        // the handshake (only sending none gets in, as no member).
        !handshakes(&std::sync::Arc::new(cfg), ports[0])
    });
    assert!(refused, "a certificate of the dropped CA still gets in");

    // The primary presents its new certificate as a client too: a
    // secondary restarted trusting only the new CA takes its appends.
    nodes[2].kill9().unwrap();
    let mut flags = live.node_flags("n2");
    flags.extend(["--node-id", "n2", "--role", "secondary"].map(String::from));
    flags.extend(["--peers".to_string(), format!("{},{}", urls[0], urls[1])]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    nodes[2] =
        Kvd::start_tls_on(ports[2], &tmp.path().join("n2"), &args, trusts_new.clone()).unwrap();
    let index = new.kvclient(&urls).set("after-restart", "3").await.unwrap();
    replicated(&new.http(None), &urls, index, "after-restart", "3").await;

    // A file that does not parse changes nothing: the node serves on with
    // what it had, and says why.
    std::fs::write(live.cert("n0"), "not a certificate").unwrap();
    nodes[0].signal(Sig::SIGHUP).unwrap();
    let logged = kvstore_testkit::wait_until(Duration::from_secs(30), || {
        nodes[0].log().contains("TLS files not taken")
    });
    assert!(
        logged,
        "no log line for the unusable file:\n{}",
        nodes[0].log()
    );
    assert!(handshakes(&trusts_new, ports[0]));
    let index = new
        .kvclient(&urls)
        .set("after-bad-file", "4")
        .await
        .unwrap();
    replicated(&new.http(None), &urls, index, "after-bad-file", "4").await;
}

#[test]
fn a_start_with_an_unusable_tls_file_is_refused_naming_it() {
    let tmp = TempDir::new().unwrap();
    let certs = TlsDir::create(&tmp.path().join("tls"), &["n0"]).unwrap();
    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(&garbage, "this is no certificate\n").unwrap();
    let missing = tmp.path().join("missing.pem");
    let (cert, key) = (certs.cert("n0"), certs.key("n0"));
    let cases = [
        (&missing, &key, "missing.pem", "No such file"),
        (&garbage, &key, "garbage.pem", "no PEM certificate"),
        (&cert, &garbage, "garbage.pem", "private key"),
        (&cert, &certs.key(CLIENT), "client-key.pem", "does not fit"),
    ];
    for (cert, key, named, why) in cases {
        let port = free_port().to_string();
        let dir = tmp.path().join("data").display().to_string();
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let args = [
            "--port",
            &port,
            "--data-dir",
            &dir,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        let (exit, out) = run_to_exit("kvd", &args, Duration::from_secs(30)).unwrap();
        assert!(!exit.success(), "kvd started with {cert} / {key}: {out}");
        assert!(
            out.contains(named) && out.contains(why),
            "the refusal does not name {named} ({why}): {out}"
        );
    }
    // Peers over TLS are https:// and authenticated by the cluster CA.
    let (cert, key, ca) = (
        cert.display().to_string(),
        key.display().to_string(),
        certs.ca().display().to_string(),
    );
    let tls_flags = ["--tls-cert", &cert, "--tls-key", &key];
    let cases: [(&[&str], &str); 2] = [
        (&["--peers", "https://127.0.0.1:1"], "needs --tls-client-ca"),
        (
            &["--tls-client-ca", &ca, "--peers", "http://127.0.0.1:1"],
            "peer URLs are https://",
        ),
    ];
    for (flags, why) in cases {
        let port = free_port().to_string();
        let dir = tmp.path().join("data").display().to_string();
        let args = [
            &["--port", &port, "--data-dir", &dir][..],
            &tls_flags,
            flags,
        ]
        .concat();
        let (exit, out) = run_to_exit("kvd", &args, Duration::from_secs(30)).unwrap();
        assert!(!exit.success(), "kvd started with {flags:?}: {out}");
        assert!(
            out.contains(why),
            "{flags:?}: the refusal does not say {why:?}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masterless_cluster_streams_its_writes_over_mutual_tls() {
    let tmp = TempDir::new().unwrap();
    let (certs, nodes) = tls::start_cluster(tmp.path(), &["--mode", "masterless"]).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let http = certs.http(None);
    assert_eq!(status(&http, &urls[0]).await["mode"], "masterless");
    for (i, url) in urls.iter().enumerate() {
        let key = format!("from-n{i}");
        let resp = http
            .put(format!("{url}/v1/kv/{key}"))
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "PUT {key}");
    }
    // Every node gets every other node's write through /internal/ml/stream.
    for url in &urls {
        for i in 0..urls.len() {
            let key = format!("from-n{i}");
            eventually(&format!("{url} has {key}"), || async {
                let resp = http.get(format!("{url}/v1/kv/{key}")).send().await;
                resp.is_ok_and(|r| r.status() == 200)
            })
            .await;
        }
    }
}

/// Every kind of forged peer traffic over TLS without a node certificate
/// (none, or one of the CA naming no node) is refused before it is read,
/// and the cluster is as it was: an append that injects a key, a snapshot
/// that would replace the data, a vote with the largest epoch, a
/// masterless stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_traffic_of_every_kind_changes_nothing_without_a_node_certificate() {
    use bytes::Bytes;
    use kvd::model::Expiry;
    use kvd::storage::{Op, Record, Timestamp};
    let tmp = TempDir::new().unwrap();
    let (certs, nodes) = tls::start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let http = certs.http(None);
    let client = certs.kvclient(&urls);
    let index = client.set("real", "1").await.unwrap();
    replicated(&http, &urls, index, "real", "1").await;
    let before: Vec<Value> = futures_status(&http, &urls).await;
    let s0 = &before[0];
    let epoch = s0["epoch"].as_u64().unwrap();
    let last = s0["last_index"].as_u64().unwrap();
    let injected = Record {
        index: last + 1,
        epoch: epoch + 5,
        ts: Timestamp::default(),
        op: Op::Put {
            key: Bytes::from_static(b"injected"),
            value: Bytes::from_static(b"evil"),
            expiry: Expiry::Never,
        },
    };
    let prev = LogPos::new(s0["last_log_epoch"].as_u64().unwrap(), last);
    let inject = encode_append(
        epoch + 5,
        prev,
        last + 1,
        "https://127.0.0.1:1",
        &[injected],
    );
    let vote = serde_json::json!({"epoch": u64::MAX, "candidate": "n9",
        "last": {"epoch": u64::MAX, "index": u64::MAX}, "pre_vote": false});
    let forged: Vec<(&str, String, Vec<u8>)> = vec![
        ("an append injecting a key", format!("{}/internal/append", urls[1]), inject),
        (
            "a snapshot",
            format!(
                "{}/internal/snapshot?epoch={}&leader=https://127.0.0.1:1&last_index={}&last_epoch={}",
                urls[2],
                epoch + 5,
                last + 10,
                epoch + 5
            ),
            b"not a snapshot, and never read".to_vec(),
        ),
        ("a vote of epoch 2^64-1", format!("{}/internal/vote", urls[0]), vote.to_string().into_bytes()),
        ("a masterless stream", format!("{}/internal/ml/stream", urls[1]), b"KVML".to_vec()),
    ];
    for (who, forger) in [
        ("no certificate", certs.http(None)),
        ("a non-node certificate", certs.http(Some(CLIENT))),
    ] {
        for (what, url, body) in &forged {
            let resp = forger.post(url).body(body.clone()).send().await.unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 403, "{what} with {who}: {body}");
            assert_eq!(
                body["error"]["code"], "peer_certificate_required",
                "{what} with {who}"
            );
        }
    }
    let after = futures_status(&http, &urls).await;
    for (b, a) in before.iter().zip(&after) {
        for field in ["role", "epoch", "last_index", "digest", "primary"] {
            assert_eq!(b[field], a[field], "{field} changed: {b} -> {a}");
        }
    }
    for url in &urls {
        let resp = http
            .get(format!("{url}/v1/kv/injected"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{url} holds the injected key");
    }
    let index = client.set("after", "2").await.unwrap();
    replicated(&http, &urls, index, "after", "2").await;
}

async fn futures_status(http: &reqwest::Client, urls: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for u in urls {
        out.push(status(http, u).await);
    }
    out
}
