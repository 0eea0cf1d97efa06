//! What the compatibility tests share: a real kvd on a copy of a
//! fixture data dir, plain HTTP to it, and what they compare.

#![allow(dead_code)] // each test file uses its part

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

pub const DEADLINE: Duration = Duration::from_secs(60);

/// A kvd started by the test on `data`, its stderr in a file beside it.
pub struct Kvd {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Kvd {
    pub fn start(data: &Path, args: &[&str]) -> Kvd {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        call(self.port, method, path, body).unwrap_or_else(|| panic!("{method} {path} failed"))
    }

    /// SIGTERM, and a clean exit.
    pub fn stop(mut self) {
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
pub fn call(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
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
pub type Shown = (String, Vec<u8>, [u64; 3]);

pub fn listing(kvd: &Kvd) -> Vec<Shown> {
    let (code, body) = kvd.call("GET", "/v1/kv?limit=1000", b"");
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(code, 200, "{page}");
    shown_items(&page)
}

/// The items of a whole range page (`GET /v1/kv`).
pub fn shown_items(page: &Value) -> Vec<Shown> {
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

/// A copy of fixture `name` in a temp dir.
pub fn copy_of(name: &str, tmp: &Path) -> PathBuf {
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
pub fn segment_versions(data: &Path) -> Vec<(String, u32)> {
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

/// A fixture data dir and what this release must read in it.
pub struct Fixture {
    pub name: &'static str,
    /// Every key, by the range API, in key order; the first is `a`.
    pub expected: Vec<Shown>,
    /// Keys written and deleted: absent.
    pub gone: &'static [&'static str],
    /// The name and format version of the WAL segment it holds.
    pub segment: (&'static str, u32),
    /// The index the next write gets.
    pub next_index: u64,
}

/// Opens a copy of `f` with `args`: every key with its value and versions;
/// then a write of `a` goes into a new segment of this release's format,
/// and a restart reads both.
pub fn opens_and_keeps_every_key_and_version(f: &Fixture, args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = copy_of(f.name, tmp.path());
    let kvd = Kvd::start(&data, args);
    assert_eq!(listing(&kvd), f.expected, "{} as found", f.name);
    for gone in f.gone {
        let code = kvd.call("GET", &format!("/v1/kv/{gone}"), b"").0;
        assert_eq!(code, 404, "{gone}");
    }
    let (code, body) = kvd.call("PUT", "/v1/kv/a", b"4");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    kvd.stop();
    let next = format!("{:020}.wal", f.next_index);
    assert_eq!(
        segment_versions(&data),
        vec![
            (f.segment.0.to_string(), f.segment.1),
            (next, SEGMENT_VERSION)
        ],
        "{}: the write started a segment of this release's format",
        f.name
    );

    let kvd = Kvd::start(&data, args);
    let mut want = f.expected.clone();
    let [create, _, version] = want[0].2;
    want[0] = (
        "a".to_string(),
        b"4".to_vec(),
        [create, f.next_index, version + 1],
    );
    assert_eq!(
        listing(&kvd),
        want,
        "{} after a write and a restart",
        f.name
    );
    kvd.stop();
}
