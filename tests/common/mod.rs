//! Helpers shared by the end-to-end tests: starting nodes in temp dirs, raw
//! HTTP checks, and reading the WAL's on-disk format (kvd/src/storage/wal.rs
//! and record.rs) so recovery tests can damage it precisely.
//!
//! Every test crate includes this module but uses a different subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvstore::Kvd;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

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

// --- WAL on-disk format (see kvd/src/storage/wal.rs and record.rs) -------

/// Bytes of the segment header (magic, version, reserved).
pub const SEGMENT_HEADER_BYTES: usize = 16;
/// Bytes of a frame header (len u32 LE, crc32c u32 LE).
pub const FRAME_HEADER_BYTES: usize = 8;
/// Payload prefix before the op body: op u8, index u64, epoch u64,
/// ts (ms u64, logical u32, node u32).
pub const PAYLOAD_FIXED_BYTES: usize = 1 + 8 + 8 + 8 + 4 + 4;

/// WAL segment files of a data dir as (first index, path), oldest first.
pub fn wal_segments(data_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir.join("wal"))
        .expect("listing the WAL dir")
        .filter_map(|e| {
            let path = e.expect("WAL dir entry").path();
            let name = path.file_name()?.to_str()?.to_string();
            let first = name.strip_suffix(".wal")?.parse().ok()?;
            Some((first, path))
        })
        .collect();
    out.sort();
    out
}

/// Path of the segment whose first record has index `first`.
pub fn segment_path(data_dir: &Path, first: u64) -> PathBuf {
    data_dir.join("wal").join(format!("{first:020}.wal"))
}

/// One frame of a segment.
#[derive(Debug, Clone, Copy)]
pub struct FrameAt {
    /// Offset of the frame header in the file.
    pub offset: usize,
    /// Payload length.
    pub len: usize,
}

impl FrameAt {
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.offset + FRAME_HEADER_BYTES..self.offset + FRAME_HEADER_BYTES + self.len]
    }

    pub fn end(&self) -> usize {
        self.offset + FRAME_HEADER_BYTES + self.len
    }
}

/// Walks the frames of a whole, undamaged segment from the start. Checks the
/// magic and each CRC so a misreading of the format fails loudly here rather
/// than as a puzzling kvd result.
pub fn frames(buf: &[u8]) -> Vec<FrameAt> {
    assert!(
        buf.len() >= SEGMENT_HEADER_BYTES,
        "segment shorter than its header"
    );
    assert_eq!(&buf[..8], b"KVSTWAL\0", "segment magic");
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_BYTES;
    while off < buf.len() {
        assert!(
            off + FRAME_HEADER_BYTES <= buf.len(),
            "partial frame header at {off}"
        );
        let len = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
        let end = off + FRAME_HEADER_BYTES + len;
        assert!(
            end <= buf.len(),
            "frame at {off} runs past the end of the file"
        );
        let actual = crc32c_append(crc32c(&buf[off..off + 4]), &buf[off + 8..end]);
        assert_eq!(actual, crc, "CRC of the frame at {off}");
        out.push(FrameAt { offset: off, len });
        off = end;
    }
    out
}

/// Log index stored in a record payload.
pub fn payload_index(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"))
}

/// Key of a Put (op 1) record payload, if it is one.
pub fn payload_put_key(payload: &[u8]) -> Option<String> {
    if payload[0] != 1 {
        return None;
    }
    let at = PAYLOAD_FIXED_BYTES;
    let n = u32::from_le_bytes(payload[at..at + 4].try_into().ok()?) as usize;
    String::from_utf8(payload[at + 4..at + 4 + n].to_vec()).ok()
}

/// CRC-32C (Castagnoli), bitwise: the tests only checksum a few KiB, and
/// this keeps them free of a dependency the root crate does not have.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// GETs many paths over one pipelined HTTP/1.1 connection and returns each
/// answer's (status, body), in order. Checking every one of 10,000 keys per
/// round this way costs the node little and the test client almost nothing,
/// where a full HTTP client in a debug build would dominate the suite's time.
pub fn pipelined_get(port: u16, paths: &[String]) -> Vec<(u16, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to kvd");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("read timeout");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("cloning the socket");
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
        reader.read_line(&mut line).expect("reading a status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?} for {p}"));
        let mut content_length = None;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("reading a header");
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
        let n = content_length.unwrap_or_else(|| panic!("no content-length in answer for {p}"));
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body).expect("reading a body");
        out.push((status, body));
    }
    sender
        .join()
        .expect("request writer thread")
        .expect("writing pipelined requests");
    out
}
