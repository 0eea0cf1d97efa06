//! The `kvclient` binary without a server: help, argument errors, exit
//! codes, endpoints from the environment and errors caught before any
//! request. Failures that need a node use a loopback port with nothing
//! listening. Output formats and server errors are tested against a real
//! kvd in the root package (tests/kvclient_cli.rs).

// Test helpers outside #[test] functions unwrap too: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use assert_cmd::Command;

/// The binary with a clean environment: a KV_ENDPOINTS set by whoever runs
/// the tests must not leak into them.
fn kvclient() -> Command {
    let mut cmd = Command::cargo_bin("kvclient").unwrap();
    cmd.env_remove("KV_ENDPOINTS");
    cmd
}

/// A loopback port with nothing listening: bound, then released. Another
/// process could grab it in between, which would only make a test fail
/// loudly, never pass wrongly.
fn unused_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the failure contract: the exit code, nothing on stdout, and
/// exactly one stderr line starting with "kvclient: ".
fn assert_one_line_failure(output: &std::process::Output, code: i32) -> String {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {}", stdout_of(output));
    assert!(stderr.starts_with("kvclient: "), "{stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    stderr
}

const SUBCOMMANDS: [&str; 12] = [
    "get", "set", "del", "ls", "txn", "bulk", "status", "search", "similar", "lease", "lock",
    "watch",
];

#[test]
fn help_describes_every_subcommand_and_the_exit_codes() {
    let output = kvclient().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = stdout_of(&output);
    for sub in SUBCOMMANDS {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{sub} ")))
            .unwrap_or_else(|| panic!("no help line for {sub}:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "{sub} has no description: {line:?}"
        );
    }
    for needle in [
        "--endpoints",
        "KV_ENDPOINTS",
        "--timeout-ms",
        "--json",
        "--retries",
        "Exit status",
        "1  `get`: the key does not exist",
        "2  any other failure",
        "3  a precondition failed",
        "4  `lock`: the lock was lost",
        "5  `lock`: the lock was not taken",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in:\n{help}");
    }
}

#[test]
fn every_subcommand_has_its_own_help() {
    for sub in SUBCOMMANDS {
        let output = kvclient().args([sub, "--help"]).output().unwrap();
        assert!(output.status.success(), "{sub}");
        let help = stdout_of(&output);
        assert!(help.contains("Usage: kvclient"), "{sub}: {help}");
        // Global flags are accepted after the subcommand too.
        assert!(help.contains("--json"), "{sub}: {help}");
    }
    let set_help = stdout_of(&kvclient().args(["set", "--help"]).output().unwrap());
    assert!(set_help.contains("--file"), "{set_help}");
    assert!(set_help.contains("standard input"), "{set_help}");
    let bulk_help = stdout_of(&kvclient().args(["bulk", "--help"]).output().unwrap());
    assert!(bulk_help.contains("--kv"), "{bulk_help}");
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    // A bare `kvclient` prints the help (on stderr) and fails.
    let output = kvclient().output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("Usage: kvclient"));

    for (args, expected) in [
        (vec!["frobnicate"], "frobnicate"),
        (vec!["get"], "<KEY>"),
        (vec!["set", "k"], "<VALUE>"),
        (vec!["set", "k", "v", "--file", "x"], "--file"),
        (vec!["--timeout-ms", "0", "status"], "--timeout-ms"),
        (vec!["--timeout-ms", "soon", "status"], "soon"),
        (vec!["search"], "<QUERY>"),
        (vec!["del", "k", "extra"], "extra"),
        (vec!["del"], "<KEY>"),
        (vec!["set", "k", "v", "--if-version", "x"], "--if-version"),
        (
            vec!["set", "k", "v", "--if-version", "1", "--if-absent"],
            "--if-absent",
        ),
        (vec!["del", "--prefix", "p", "k"], "--prefix"),
        (vec!["ls", "--page-size", "0"], "--page-size"),
        (
            vec!["set", "k", "v", "--ttl-ms", "5", "--keep-ttl"],
            "--keep-ttl",
        ),
        (vec!["lease", "grant"], "<TTL_MS>"),
        (vec!["lease", "show", "x"], "x"),
        (vec!["lock", "l"], "<CMD>"),
        (vec!["lock", "l", "--ttl-ms", "1", "--", "true"], "--ttl-ms"),
        (vec!["watch", "p/", "--key", "k"], "--key"),
        (vec!["watch", "--from-index", "soon"], "soon"),
    ] {
        let output = kvclient().args(&args).output().unwrap();
        let stderr = assert_one_line_failure(&output, 2);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn unreachable_endpoint_is_one_line_and_exit_2() {
    let port = unused_port();
    let started = Instant::now();
    let output = kvclient()
        .args([
            "--endpoints",
            &format!("http://127.0.0.1:{port}"),
            "--timeout-ms",
            "300",
            "get",
            "k",
        ])
        .output()
        .unwrap();
    let stderr = assert_one_line_failure(&output, 2);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn endpoints_come_from_the_environment() {
    let port = unused_port();
    let output = kvclient()
        .env("KV_ENDPOINTS", format!("127.0.0.1:{port}"))
        .args(["--timeout-ms", "200", "status"])
        .output()
        .unwrap();
    let stderr = assert_one_line_failure(&output, 2);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

#[test]
fn local_errors_are_reported_before_any_request() {
    let endpoint = format!("http://127.0.0.1:{}", unused_port());
    let cases: [(&[&str], &str, &str); 10] = [
        (&["get", ""], "", "invalid key"),
        (&["set", "k", "v", "--ttl-ms", "0"], "", "TTL"),
        (&["lease", "grant", "0"], "", "TTL"),
        (&["watch", "--key", ""], "", "invalid key"),
        (&["del", "--prefix", ""], "", "prefix to delete is empty"),
        (&["txn"], "{not json", "parsing the transaction JSON"),
        (
            &["--endpoints", "ftp://x:1", "status"],
            "",
            "invalid endpoint",
        ),
        (&["bulk", "--kv"], "a=1\nno-equals-sign\n", "line 2"),
        (&["bulk"], "not json", "parsing bulk JSON"),
        (&["bulk", "--kv"], "\n\n", "no items"),
    ];
    for (args, stdin, expected) in cases {
        let output = kvclient()
            .args(["--endpoints", &endpoint])
            .args(args)
            .write_stdin(stdin)
            .output()
            .unwrap();
        let stderr = assert_one_line_failure(&output, 2);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = kvclient()
        .args([
            "--endpoints",
            &endpoint,
            "set",
            "k",
            "--file",
            "/nonexistent/value",
        ])
        .output()
        .unwrap();
    let stderr = assert_one_line_failure(&output, 2);
    assert!(stderr.contains("/nonexistent/value"), "{stderr}");
}
