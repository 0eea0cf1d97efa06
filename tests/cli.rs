//! Help texts and the `kvclient` CLI (docs/DESIGN.md §9)
//! against a real kvd.

use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use base64::Engine as _;
use kvstore_testkit::{bin, free_port, http_get, node, Kvd};
use serde_json::Value;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Checks that every flag appears in `help` with a description, either on
/// its own line (clap's long help) or after it on the same line.
fn assert_flags_described(program: &str, help: &str, flags: &[&str]) {
    let lines: Vec<&str> = help.lines().collect();
    for flag in flags {
        let at = lines
            .iter()
            .position(|l| {
                let t = l.trim_start();
                t.starts_with(&format!("{flag} ")) || t == *flag || t.contains(&format!(", {flag}"))
            })
            .unwrap_or_else(|| panic!("`{program} --help` does not list {flag}:\n{help}"));
        let same_line = lines[at]
            .trim()
            .split_once("  ")
            .map(|(_, rest)| rest.trim())
            .unwrap_or("");
        let next_line = lines.get(at + 1).map(|l| l.trim()).unwrap_or("");
        let described =
            !same_line.is_empty() || (!next_line.is_empty() && !next_line.starts_with('-'));
        assert!(
            described,
            "`{program} --help` lists {flag} without a description:\n{help}"
        );
    }
}

fn help_of(program: &str) -> String {
    let out = Command::new(bin(program))
        .arg("--help")
        .timeout(TIMEOUT)
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn kvd_help_describes_every_flag() {
    let help = help_of("kvd");
    assert_flags_described(
        "kvd",
        &help,
        &[
            "--port",
            "--bind",
            "--data-dir",
            "--node-id",
            "--max-value-bytes",
            "--max-bulk-bytes",
            "--max-bulk-items",
            "--snapshot-every-mib",
            "--wal-segment-mib",
            "--max-inflight-requests",
            "--write-queue",
            "--enable-debug",
            "--help",
            "--version",
        ],
    );
    // Defaults a user needs to know are stated (docs/DESIGN.md §2).
    assert!(help.contains("8765"), "default port missing:\n{help}");
    assert!(
        help.contains("127.0.0.1"),
        "default bind address missing:\n{help}"
    );
}

#[test]
fn kvclient_help_describes_every_flag_and_command() {
    let help = help_of("kvclient");
    assert_flags_described(
        "kvclient",
        &help,
        &[
            "--endpoints",
            "--timeout-ms",
            "--retries",
            "--json",
            "--help",
            "--version",
        ],
    );
    for cmd in ["get", "set", "del", "bulk", "status"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "`kvclient --help` does not list the {cmd} command:\n{help}"
        );
    }
    assert!(
        help.contains("KV_ENDPOINTS"),
        "the endpoints env var is not documented:\n{help}"
    );
}

/// A `kvclient` command aimed at `url` only (an inherited KV_ENDPOINTS must
/// not redirect the test).
#[test]
fn kvsup_help_describes_every_command_and_flag() {
    let help = help_of("kvsup");
    for cmd in [
        "apply",
        "status",
        "kill",
        "promote",
        "down",
        "events",
        "render",
        "dashboard",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(cmd) && l.len() > cmd.len() + 8),
            "`kvsup --help` does not describe the {cmd} command:\n{help}"
        );
    }
    assert_flags_described("kvsup", &help, &["--supervisor", "--file", "--help"]);
    assert!(help.contains("KVSUP_URL"), "{help}");
    let out = Command::new(bin("kvsup"))
        .args(["apply", "--help"])
        .output()
        .unwrap();
    let apply = String::from_utf8_lossy(&out.stdout);
    assert_flags_described("kvsup apply", &apply, &["--kvd", "--dry-run"]);
    let out = Command::new(bin("kvsup"))
        .args(["kill", "--help"])
        .output()
        .unwrap();
    let kill = String::from_utf8_lossy(&out.stdout);
    assert!(kill.contains("KILL, TERM, STOP or CONT"), "{kill}");
}

fn kvc(url: &str) -> Command {
    let mut c = Command::new(bin("kvclient"));
    c.env_remove("KV_ENDPOINTS")
        .args(["--endpoints", url])
        .timeout(TIMEOUT);
    c
}

fn run(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args).output().unwrap()
}

fn ok(cmd: Command, args: &[&str]) -> Vec<u8> {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "kvclient {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ok_json(cmd: Command, args: &[&str]) -> Value {
    let stdout = ok(cmd, args);
    serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "kvclient {args:?} --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&stdout)
        )
    })
}

/// The value as the server holds it, read without the CLI.
fn server_value(kvd: &Kvd, key: &str) -> Option<Vec<u8>> {
    let path = format!("/v1/kv/{}", kvclient::encode_key(key));
    let (status, body) = http_get(kvd.port, &path, Duration::from_secs(10)).unwrap();
    match status {
        200 => Some(body),
        404 => None,
        s => panic!("GET {key} answered {s}"),
    }
}

fn assert_one_error_line(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: expected one line on stderr, got {stderr:?}"
    );
    assert!(!stderr.trim().is_empty(), "{what}: no error message");
}

#[test]
fn kvclient_cli_against_a_real_node() {
    let tmp = TempDir::new().unwrap();
    let kvd = node::start(&tmp, &[]);
    let url = kvd.url();
    let k = || kvc(&url);

    // set / get, human output.
    let out = ok(k(), &["set", "greeting", "hello world"]);
    assert_eq!(
        String::from_utf8_lossy(&out).trim().lines().count(),
        1,
        "one line for a write"
    );
    assert_eq!(
        server_value(&kvd, "greeting").as_deref(),
        Some(&b"hello world"[..])
    );
    assert_eq!(
        ok(k(), &["get", "greeting"]),
        b"hello world",
        "get prints the raw value"
    );

    // --json forms.
    let v = ok_json(k(), &["--json", "set", "dir/key with space", "v2"]);
    assert!(v["index"].as_u64().is_some(), "set --json: {v}");
    let v = ok_json(k(), &["get", "--json", "dir/key with space"]);
    assert_eq!(v["key"], "dir/key with space");
    assert_eq!(v["value"], "v2");

    // Binary values through stdin, raw bytes back out.
    let binary: Vec<u8> = vec![0, 159, 146, 150, 255, b'\n', 0];
    let mut cmd = k();
    cmd.write_stdin(binary.clone());
    ok(cmd, &["set", "bin", "-"]);
    assert_eq!(server_value(&kvd, "bin"), Some(binary.clone()));
    assert_eq!(ok(k(), &["get", "bin"]), binary);
    let v = ok_json(k(), &["--json", "get", "bin"]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary);
    assert_eq!(
        v["value"]["base64"], b64,
        "binary values print as base64 in JSON"
    );

    // bulk: the API's JSON document, and KEY=VALUE lines.
    let doc = format!(
        r#"{{"items": [{{"key": "b/1", "value": "one"}}, {{"key": "b/2", "value": {{"base64": "{b64}"}}}}]}}"#
    );
    let mut cmd = k();
    cmd.write_stdin(doc);
    let v = ok_json(cmd, &["--json", "bulk"]);
    assert_eq!(v["count"], 2, "bulk --json: {v}");
    assert!(v["index"].as_u64().is_some(), "bulk --json: {v}");
    assert_eq!(server_value(&kvd, "b/1").as_deref(), Some(&b"one"[..]));
    assert_eq!(server_value(&kvd, "b/2"), Some(binary.clone()));
    let mut cmd = k();
    cmd.write_stdin("kv/1=x\nkv/2=a=b\n");
    let out = ok(cmd, &["bulk", "--kv"]);
    assert!(!out.is_empty(), "bulk prints a summary");
    assert_eq!(server_value(&kvd, "kv/1").as_deref(), Some(&b"x"[..]));
    assert_eq!(server_value(&kvd, "kv/2").as_deref(), Some(&b"a=b"[..]));

    // del, human and JSON.
    ok(k(), &["del", "greeting"]);
    assert_eq!(server_value(&kvd, "greeting"), None);
    let v = ok_json(k(), &["--json", "del", "greeting"]);
    assert_eq!(v["deleted"], false, "deleting an absent key: {v}");

    // A missing key: exit 1, nothing on stdout, one line on stderr.
    let out = run(k(), &["get", "greeting"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "missing key must exit 1: {out:?}"
    );
    assert!(out.stdout.is_empty(), "no stdout for a missing key");
    assert_one_error_line(&out, "missing key");

    // status: human and JSON agree with the server.
    // "dir/key with space", bin, b/1, b/2, kv/1 and kv/2; greeting is gone.
    let expected_keys = 6;
    let v = ok_json(k(), &["--json", "status"]);
    assert_eq!(v["keys"], expected_keys, "status --json: {v}");
    assert!(v["last_index"].as_u64().unwrap() >= 7, "status --json: {v}");
    let human = String::from_utf8(ok(k(), &["status"])).unwrap();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("keys") && l.trim_end().ends_with(&expected_keys.to_string())),
        "human status lacks the key count:\n{human}"
    );

    // Endpoints from the environment.
    let mut cmd = Command::new(bin("kvclient"));
    cmd.env("KV_ENDPOINTS", &url).timeout(TIMEOUT);
    assert_eq!(ok(cmd, &["get", "b/1"]), b"one");

    // A bad key is a failure other than "not found".
    let long = "x".repeat(1025);
    let out = run(k(), &["set", &long, "v"]);
    assert!(
        !out.status.success() && out.status.code() != Some(1),
        "{out:?}"
    );
    assert_one_error_line(&out, "bad key");
}

#[test]
fn kvclient_cli_fails_cleanly_when_the_connection_is_refused() {
    // A port nobody listens on (it was free a moment ago).
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["--retries", "0", "--timeout-ms", "3000", "get", "k"][..],
        &["--retries", "0", "--timeout-ms", "3000", "set", "k", "v"][..],
        &["--retries", "1", "--timeout-ms", "3000", "--json", "status"][..],
    ] {
        let out = run(kvc(&url), args);
        assert!(!out.status.success(), "{args:?} must fail: {out:?}");
        assert_ne!(
            out.status.code(),
            Some(1),
            "{args:?}: exit 1 means 'not found', not 'unreachable'"
        );
        assert_one_error_line(&out, "refused connection");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}
