//! kvd's log on stderr: `--log-format json` writes one JSON object per line
//! with a `level` and `fields.message`; `KVD_LOG` filters by level (`warn`
//! hides the start-up's info lines); text written to a file has no colour
//! codes; a `KVD_LOG` that does not parse stops kvd at once, naming it.
//!
//! Runs the real binary on a free port in a temporary data dir.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(60);

/// A kvd started by the test, its stderr in a file.
struct Kvd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Kvd {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Kvd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("kvd.log");
        let stderr = std::fs::File::create(&log).expect("creating the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvd"));
        cmd.args(["--port", &port.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(args)
            .env_remove("KVD_LOG")
            .env_remove("KVD_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("spawning kvd");
        let mut kvd = Kvd { child, port, log };
        kvd.wait_healthy();
        kvd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Some(exit) = self.child.try_wait().expect("polling kvd") {
                panic!("kvd exited ({exit}) during start-up; log:\n{}", self.log());
            }
            if health(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "kvd did not answer /health in {DEADLINE:?}; log:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then the whole log once kvd has exited.
    fn stop(mut self) -> String {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits i32"));
        kill(pid, Signal::SIGTERM).expect("signalling kvd");
        let exit = self.child.wait().expect("waiting for kvd");
        assert!(
            exit.success(),
            "kvd exited with {exit}; log:\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for Kvd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /health` answers 200.
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let request = b"GET /health HTTP/1.1\r\nHost: kvd\r\nConnection: close\r\n\r\n";
    if s.write_all(request).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

#[test]
fn json_lines_have_a_level_and_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let kvd = Kvd::start(dir.path(), &["--log-format", "json"], &[]);
    let log = kvd.stop();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{log}")))
        .collect();
    for e in &events {
        assert!(e["level"].is_string(), "no level: {e}");
        assert!(e["fields"]["message"].is_string(), "no fields.message: {e}");
    }
    let serving = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving on http://"))
        })
        .unwrap_or_else(|| panic!("no start-up line:\n{log}"));
    assert_eq!(serving["level"], "INFO", "{serving}");
    assert_eq!(serving["fields"]["node"], "n0", "{serving}");
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "shut down cleanly"),
        "no shutdown line:\n{log}"
    );
}

#[test]
fn the_format_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let kvd = Kvd::start(dir.path(), &[], &[("KVD_LOG_FORMAT", "json")]);
    let log = kvd.stop();
    assert!(!log.is_empty(), "no log at all");
    for l in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l:?}"
        );
    }
}

#[test]
fn kvd_log_warn_hides_info_lines() {
    let dir = tempfile::tempdir().unwrap();
    let kvd = Kvd::start(dir.path(), &[], &[("KVD_LOG", "warn")]);
    let log = kvd.stop();
    assert!(
        !log.contains("INFO") && !log.contains("serving on"),
        "KVD_LOG=warn let info lines through:\n{log}"
    );

    // The same start-up at the default filter says it is serving.
    let dir = tempfile::tempdir().unwrap();
    let log = Kvd::start(dir.path(), &[], &[]).stop();
    assert!(
        log.lines()
            .any(|l| l.contains("INFO") && l.contains("serving on http://")),
        "the default filter is info:\n{log}"
    );
}

#[test]
fn text_in_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Kvd::start(dir.path(), &[], &[]).stop();
    assert!(log.contains("serving on"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
}

#[test]
fn a_filter_that_does_not_parse_stops_kvd_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .args(["--port", "0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("KVD_LOG", "kvd=notalevel")
        .stdin(Stdio::null())
        .output()
        .expect("running kvd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kvd started with a bad filter: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.starts_with("kvd: KVD_LOG="), "{err:?}");
    assert!(
        !dir.path().join("data").exists(),
        "kvd touched its data dir before checking the filter"
    );
}
