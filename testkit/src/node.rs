//! One node in a test's temp dir and its HTTP API: starting and restarting
//! it (panicking with its log on failure), `kvclient` and `reqwest` clients
//! for it, its status document, checks of error bodies, and GETs of many
//! keys over one pipelined connection.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

use crate::Kvd;

/// A generous bound for one request: debug builds on a loaded 2-core CI
/// machine are slow, and a hang must still end the test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Data dir of a test: a child of the temp dir, so the kit's per-node log
/// (written beside the data dir) is cleaned up with it.
pub fn data_dir(tmp: &TempDir) -> PathBuf {
    tmp.path().join("data")
}

/// Starts a kvd on `tmp`'s data dir, panicking with its log if it fails.
pub fn start(tmp: &TempDir, extra: &[&str]) -> Kvd {
    match Kvd::start(&data_dir(tmp), extra) {
        Ok(k) => k,
        Err(e) => panic!("kvd failed to start: {e:#}"),
    }
}

/// Restarts a stopped node, panicking with its log if it fails.
pub fn restart(kvd: &mut Kvd) {
    if let Err(e) = kvd.restart() {
        panic!("kvd failed to restart: {e:#}");
    }
}

/// SIGKILL and restart: everything acknowledged must survive this.
pub fn crash_restart(kvd: &mut Kvd) {
    kvd.kill9().expect("SIGKILL of kvd");
    restart(kvd);
}

/// A kvclient over one node. Retries stay on (the library's default) since
/// every call the tests make through it is idempotent.
pub fn client(kvd: &Kvd) -> kvclient::Client {
    kvclient::Client::builder()
        .endpoint(kvd.url())
        .request_timeout(REQUEST_TIMEOUT)
        .retry_deadline(REQUEST_TIMEOUT)
        .build()
        .expect("building a kvclient")
}

/// A plain HTTP client for checks of status codes and error bodies.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        // An HTTP_PROXY in the environment must not capture loopback traffic.
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("building a reqwest client")
}

/// URL of a key, percent-encoded the way kvclient sends it.
pub fn key_url(kvd: &Kvd, key: &str) -> String {
    format!("{}/v1/kv/{}", kvd.url(), kvclient::encode_key(key))
}

/// `GET /v1/status` as JSON.
pub async fn status(http: &reqwest::Client, kvd: &Kvd) -> Value {
    let resp = http
        .get(format!("{}/v1/status", kvd.url()))
        .send()
        .await
        .expect("GET /v1/status");
    assert_eq!(resp.status(), StatusCode::OK, "GET /v1/status");
    resp.json().await.expect("status is JSON")
}

/// `GET /v1/status` of the node at `url` as JSON (whatever its status code).
pub async fn status_at(http: &reqwest::Client, url: &str) -> Value {
    http.get(format!("{url}/v1/status"))
        .send()
        .await
        .expect("GET /v1/status")
        .json()
        .await
        .expect("status is JSON")
}

/// `GET /metrics` of the node at `url`: the Prometheus text.
pub async fn metrics_at(http: &reqwest::Client, url: &str) -> String {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics are text")
}

/// A numeric field of the status document.
pub fn field(status: &Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no numeric {name:?}: {status}"))
}

/// `(last_index, keys, digest)`: what must not change when a request is
/// rejected.
pub async fn fingerprint(http: &reqwest::Client, kvd: &Kvd) -> (u64, u64, String) {
    let s = status(http, kvd).await;
    let digest = s["digest"].as_str().unwrap_or_default().to_string();
    (field(&s, "last_index"), field(&s, "keys"), digest)
}

/// Raw GET of a key: `Some(value)` on 200, `None` on 404, panic otherwise.
pub async fn get_raw(http: &reqwest::Client, kvd: &Kvd, key: &str) -> Option<Vec<u8>> {
    let resp = http
        .get(key_url(kvd, key))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key:?}: {e}"));
    match resp.status() {
        StatusCode::OK => Some(resp.bytes().await.expect("GET body").to_vec()),
        StatusCode::NOT_FOUND => None,
        other => panic!("GET {key:?} answered {other}"),
    }
}

/// Checks that `resp` is a 4xx whose body is `{"error": {"code", "message"}}`
/// with non-empty strings, and returns (status, code).
pub async fn expect_json_error(resp: reqwest::Response, what: &str) -> (u16, String) {
    let status = resp.status();
    let body = resp.bytes().await.expect("error body");
    assert!(
        status.is_client_error(),
        "{what}: expected a 4xx, got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{what}: error body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !code.is_empty() && !message.is_empty(),
        "{what}: error body lacks error.code or error.message: {v}"
    );
    assert!(
        code.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "{what}: error code {code:?} is not snake_case"
    );
    (status.as_u16(), code.to_string())
}

/// GETs many paths over one pipelined HTTP/1.1 connection and returns each
/// answer's (status, body), in order. Checking every one of 10,000 keys per
/// round this way costs the node little and the test client almost nothing,
/// where a full HTTP client in a debug build would dominate the suite's time.
pub fn pipelined_get(port: u16, paths: &[String]) -> Vec<(u16, Vec<u8>)> {
    try_pipelined_get(port, paths).unwrap_or_else(|e| panic!("pipelined GETs: {e:#}"))
}

/// [`pipelined_get`] that returns an error instead of panicking (a node
/// that is down or restarting, in a test that expects it).
pub fn try_pipelined_get(port: u16, paths: &[String]) -> anyhow::Result<Vec<(u16, Vec<u8>)>> {
    use anyhow::Context;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    let stream = TcpStream::connect(("127.0.0.1", port)).context("connecting to kvd")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let requests: Vec<u8> = paths
        .iter()
        .flat_map(|p| format!("GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes())
        .collect();
    // Written from another thread so that neither side's socket buffer can
    // fill up and stall the other while we read the answers here.
    let sender = std::thread::spawn(move || writer.write_all(&requests));

    let mut reader = BufReader::new(stream);
    let mut out = Vec::with_capacity(paths.len());
    let mut line = String::new();
    for p in paths {
        line.clear();
        reader
            .read_line(&mut line)
            .context("reading a status line")?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?} for {p}"))?;
        let mut content_length = None;
        loop {
            line.clear();
            reader.read_line(&mut line).context("reading a header")?;
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let n = content_length.with_context(|| format!("no content-length in answer for {p}"))?;
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body).context("reading a body")?;
        out.push((status, body));
    }
    // The sender ends once everything is written or the socket fails; a
    // failure after every answer arrived changes nothing.
    let _ = sender.join();
    Ok(out)
}
