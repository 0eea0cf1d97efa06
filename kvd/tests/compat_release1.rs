//! A data dir of the first release opens: the fixtures under
//! `kvd/tests/fixtures/release1-*` were written by that release's kvd
//! (`make-release1.sh` says how, and which writes): a format 1 snapshot
//! (single node) or format 2 (masterless, with tombstones), then WAL format
//! 1 records after it. This release's kvd, run on a copy, must show every
//! key with its value; keys the snapshot holds get versions 0/0/1, keys the
//! WAL wrote after it real indexes. A write then goes into a new segment in
//! this release's format, and a restart reads both.
//!
//! Runs the real binary on a free port.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kvd::storage::wal::SEGMENT_VERSION;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// A kvd started by the test on `data`, its stderr in a file beside it.
struct Kvd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Kvd {
    fn start(data: &Path, args: &[&str]) -> Kvd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let log = data.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_kvd"))
            .args(["--port", &port.to_string()])
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut kvd = Kvd { child, port, log };
        let start = Instant::now();
        while call(port, "GET", "/health", b"").is_none_or(|(code, _)| code != 200) {
            if let Some(exit) = kvd.child.try_wait().unwrap() {
                panic!("kvd exited ({exit}) at start; log:\n{}", kvd.log());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no /health; log:\n{}",
                kvd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        kvd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        call(self.port, method, path, body).unwrap_or_else(|| panic!("{method} {path} failed"))
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let exit = self.child.wait().unwrap();
        assert!(
            exit.success(),
            "kvd exited with {exit}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Kvd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection: status and body.
fn call(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kvd\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = std::str::from_utf8(&answer[9..12]).ok()?.parse().ok()?;
    Some((status, answer[split + 4..].to_vec()))
}

/// A key as the range API shows it: value bytes and versions.
type Shown = (String, Vec<u8>, [u64; 3]);

fn listing(kvd: &Kvd) -> Vec<Shown> {
    let (code, body) = kvd.call("GET", "/v1/kv?limit=1000", b"");
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.get("next_page_token").is_none(), "{page}");
    let n = |item: &Value, f: &str| item[f].as_u64().unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let value = match &item["value"] {
                Value::String(s) => s.as_bytes().to_vec(),
                v => base64::engine::general_purpose::STANDARD
                    .decode(v["base64"].as_str().unwrap())
                    .unwrap(),
            };
            let versions = [
                n(item, "create_index"),
                n(item, "mod_index"),
                n(item, "version"),
            ];
            (item["key"].as_str().unwrap().to_string(), value, versions)
        })
        .collect()
}

/// What the first release's writes leave, read by this one (indexes in
/// `make-release1.sh`; the snapshot is at 22).
fn expected() -> Vec<Shown> {
    let shown = |k: &str, v: &[u8], versions| (k.to_string(), v.to_vec(), versions);
    vec![
        shown("a", b"3", [0, 24, 2]),
        shown("bin", b"\x00\xff\x01\x80", [0, 0, 1]),
        shown("bin2", b"\xff\xfe", [28, 28, 1]),
        shown("dir/with space", "é".as_bytes(), [0, 0, 1]),
        shown("k/1", b"one", [0, 0, 1]),
        shown("k/2", b"TWO", [0, 28, 2]),
        shown("k/4", b"four", [28, 28, 1]),
        shown("new", b"fresher", [26, 27, 2]),
    ]
}

/// A copy of fixture `name` in a temp dir.
fn copy_of(name: &str, tmp: &Path) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let to = tmp.join(name);
    for sub in ["", "snap", "wal"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    to
}

/// The format version in the header of each WAL segment, by name.
fn segment_versions(data: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
        })
        .collect();
    out.sort();
    out
}

fn opens_and_keeps_every_key_and_version(fixture: &str, args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = copy_of(fixture, tmp.path());
    let kvd = Kvd::start(&data, args);
    assert_eq!(listing(&kvd), expected(), "{fixture} as found");
    for gone in ["b", "gone", "filler", "pad", "k/3"] {
        assert_eq!(
            kvd.call("GET", &format!("/v1/kv/{gone}"), b"").0,
            404,
            "{gone}"
        );
    }
    let (code, body) = kvd.call("PUT", "/v1/kv/a", b"4");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    kvd.stop();
    assert_eq!(
        segment_versions(&data),
        vec![
            ("00000000000000000023.wal".to_string(), 1),
            ("00000000000000000030.wal".to_string(), SEGMENT_VERSION)
        ],
        "{fixture}: the write started a segment of this release's format"
    );

    let kvd = Kvd::start(&data, args);
    let mut want = expected();
    want[0] = ("a".to_string(), b"4".to_vec(), [0, 30, 3]);
    assert_eq!(listing(&kvd), want, "{fixture} after a write and a restart");
    kvd.stop();
}

#[test]
fn a_single_nodes_data_dir_of_the_first_release_opens_with_its_versions() {
    opens_and_keeps_every_key_and_version("release1-single", &[]);
}

#[test]
fn a_masterless_data_dir_of_the_first_release_opens_with_its_versions() {
    // A peer that never answers: the node takes writes alone (quorum 1).
    let args = ["--mode", "masterless", "--peers", "http://127.0.0.1:9"];
    opens_and_keeps_every_key_and_version("release1-masterless", &args);
}
