//! The `kvclient` binary against a real kvd: output of get/set/del/bulk/
//! status, human and `--json`; exit 1 for a missing key; server errors as
//! one stderr line with exit 2; values from stdin and files, binary ones
//! included; `get --show-version`, conditional `set`/`del` (exit 3 on a
//! failed precondition), `ls` paged and escaped, `del --prefix`, and `txn`
//! from stdin or a file.
//!
//! Argument errors, help and unreachable endpoints need no node and are
//! tested in kvclient/tests/cli.rs. Not covered: redirects to the primary
//! (needs replication) and search/similar (in tests/search.rs); the
//! rendering of a non-empty peers list is unit-tested in kvclient/src/cli.rs,
//! since a single node always reports none.

use std::process::Output;

use assert_cmd::Command;
use kvstore_testkit::{bin, free_port, Kvd};
use serde_json::{json, Value};
use tempfile::TempDir;

/// Per-call budget of the CLI: generous, because debug builds on a loaded
/// CI machine are slow and no call here is expected to fail by timing out.
const TIMEOUT_MS: &str = "30000";

fn start(tmp: &TempDir, extra: &[&str]) -> Kvd {
    Kvd::start(&tmp.path().join("data"), extra)
        .unwrap_or_else(|e| panic!("kvd failed to start: {e:#}"))
}

/// The CLI with a clean environment (a KV_ENDPOINTS set by whoever runs the
/// tests must not leak in), pointed at `endpoints`.
fn kvclient(endpoints: &str) -> Command {
    let mut cmd = Command::new(bin("kvclient"));
    cmd.env_remove("KV_ENDPOINTS")
        .args(["--endpoints", endpoints, "--timeout-ms", TIMEOUT_MS]);
    cmd
}

/// Runs `args` against `kvd` with `stdin`.
fn run(kvd: &Kvd, args: &[&str], stdin: &[u8]) -> Output {
    kvclient(&kvd.url())
        .args(args)
        .write_stdin(stdin.to_vec())
        .output()
        .expect("running kvclient")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success with nothing on stderr and returns stdout as text.
fn success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status.code(),
        stderr_of(output)
    );
    assert!(output.stderr.is_empty(), "stderr: {}", stderr_of(output));
    stdout_of(output)
}

/// Asserts success and parses stdout as one JSON document.
fn success_json(output: &Output) -> Value {
    let out = success(output);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"))
}

/// Asserts the failure contract: the exit code, nothing on stdout, and
/// exactly one stderr line starting with "kvclient: ".
fn assert_one_line_failure(output: &Output, code: i32) -> String {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {}", stdout_of(output));
    assert!(stderr.starts_with("kvclient: "), "{stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    stderr
}

/// The index N of a one-line answer `<prefix>N)\n`.
fn index_in(line: &str, prefix: &str) -> u64 {
    line.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(")\n"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected {prefix:?}<index>)\\n, got {line:?}"))
}

#[test]
fn get_prints_raw_bytes_and_json_picks_text_or_base64() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let binary = [0xff, 0x00, b'\n'];
    success(&run(&kvd, &["set", "bin", "-"], &binary));
    success(&run(&kvd, &["set", "text", "hello"], b""));

    // Raw bytes, nothing added or taken away.
    let out = run(&kvd, &["get", "bin"], b"");
    success(&out);
    assert_eq!(out.stdout, binary);
    assert_eq!(run(&kvd, &["get", "text"], b"").stdout, b"hello");

    // --json: a string for UTF-8, base64 otherwise; before or after the
    // subcommand.
    assert_eq!(
        success_json(&run(&kvd, &["get", "bin", "--json"], b"")),
        json!({"key": "bin", "value": {"base64": "/wAK"}})
    );
    assert_eq!(
        success_json(&run(&kvd, &["--json", "get", "text"], b"")),
        json!({"key": "text", "value": "hello"})
    );
}

#[test]
fn a_missing_key_exits_1_with_one_line() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    for args in [&["get", "nope"][..], &["get", "nope", "--json"]] {
        let out = run(&kvd, args, b"");
        let stderr = assert_one_line_failure(&out, 1);
        assert!(stderr.contains("not found"), "{stderr}");
        assert!(stderr.contains("nope"), "{stderr}");
    }
}

#[test]
fn set_reads_the_value_from_the_argument_stdin_or_a_file() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);

    let first = index_in(
        &success(&run(&kvd, &["set", "arg", "v"], b"")),
        "OK (index ",
    );
    let stdin_value = b"\x00from stdin\xff\n";
    let second = index_in(
        &success(&run(&kvd, &["set", "stdin", "-"], stdin_value)),
        "OK (index ",
    );
    assert!(second > first, "{second} after {first}");
    let file = tmp.path().join("value");
    let file_value = b"from file\x00\x01";
    std::fs::write(&file, file_value).unwrap();
    let path = file.to_str().unwrap();
    let third = index_in(
        &success(&run(&kvd, &["set", "file", "--file", path], b"")),
        "OK (index ",
    );
    assert!(third > second, "{third} after {second}");
    let doc = success_json(&run(&kvd, &["set", "arg", "w", "--json"], b""));
    let fourth = doc["index"].as_u64().unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(doc, json!({"index": fourth}));
    assert!(fourth > third);

    // What the node stored, byte for byte.
    assert_eq!(run(&kvd, &["get", "arg"], b"").stdout, b"w");
    assert_eq!(run(&kvd, &["get", "stdin"], b"").stdout, stdin_value);
    assert_eq!(run(&kvd, &["get", "file"], b"").stdout, file_value);
    // An empty stdin is an empty value, not a missing one.
    success(&run(&kvd, &["set", "empty", "-"], b""));
    let out = run(&kvd, &["get", "empty"], b"");
    success(&out);
    assert!(out.stdout.is_empty());
}

#[test]
fn del_says_whether_the_key_existed() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    success(&run(&kvd, &["set", "k", "v"], b""));
    success(&run(&kvd, &["set", "j", "v"], b""));

    let deleted = index_in(&success(&run(&kvd, &["del", "k"], b"")), "deleted (index ");
    let absent = index_in(
        &success(&run(&kvd, &["del", "k"], b"")),
        "not found (index ",
    );
    assert!(absent > deleted);
    assert_one_line_failure(&run(&kvd, &["get", "k"], b""), 1);

    let doc = success_json(&run(&kvd, &["del", "j", "--json"], b""));
    assert_eq!(doc["deleted"], json!(true), "{doc}");
    assert!(doc["index"].as_u64().is_some_and(|i| i > absent), "{doc}");
    let doc = success_json(&run(&kvd, &["del", "j", "--json"], b""));
    assert_eq!(doc["deleted"], json!(false), "{doc}");
}

#[test]
fn bulk_reads_kv_lines_and_json_documents() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);

    // KEY=VALUE lines from stdin: split at the first '='.
    let out = run(&kvd, &["bulk", "--kv", "-"], b"a=1\nb=x=y\n\n");
    let first = index_in(&success(&out), "OK: 2 keys (index ");
    assert_eq!(run(&kvd, &["get", "a"], b"").stdout, b"1");
    assert_eq!(run(&kvd, &["get", "b"], b"").stdout, b"x=y");

    // The API's JSON document, from stdin (the default) and from a file.
    let doc = br#"{"items":[{"key":"t","value":"text"},{"key":"bin","value":{"base64":"AP8K"}}]}"#;
    let second = index_in(&success(&run(&kvd, &["bulk"], doc)), "OK: 2 keys (index ");
    assert!(second > first);
    assert_eq!(run(&kvd, &["get", "t"], b"").stdout, b"text");
    assert_eq!(run(&kvd, &["get", "bin"], b"").stdout, [0x00, 0xff, b'\n']);

    let file = tmp.path().join("bulk.json");
    std::fs::write(
        &file,
        br#"{"items":[{"key":"f1","value":"one"},{"key":"f2","value":""},{"key":"f3","value":"3"}]}"#,
    )
    .unwrap();
    let out = run(&kvd, &["bulk", file.to_str().unwrap(), "--json"], b"");
    let doc = success_json(&out);
    assert_eq!(doc["count"], json!(3), "{doc}");
    assert!(doc["index"].as_u64().is_some_and(|i| i > second), "{doc}");
    assert_eq!(run(&kvd, &["get", "f1"], b"").stdout, b"one");
    let out = run(&kvd, &["get", "f2"], b"");
    success(&out);
    assert!(out.stdout.is_empty());
}

#[test]
fn status_prints_known_fields_first_or_the_servers_json() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--node-id", "cli-node"]);
    success(&run(&kvd, &["bulk", "--kv"], b"a=1\nb=2\nc=3\n"));

    let text = success(&run(&kvd, &["status"], b""));
    // Top-level fields; a nested object's fields follow indented.
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(
        names[..7],
        [
            "node_id",
            "mode",
            "role",
            "epoch",
            "last_index",
            "commit_index",
            "keys"
        ],
        "{text}"
    );
    assert_eq!(rows[0], ["node_id", "cli-node"], "{text}");
    assert_eq!(rows[2], ["role", "primary"], "{text}");
    assert_eq!(rows[6], ["keys", "3"], "{text}");
    assert!(
        rows.iter().any(|r| r[..] == ["peers", "(none)"]),
        "an empty list says so: {text}"
    );
    // The rest follows in name order, so new server fields show up too.
    let rest = &names[7..];
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert!(
        rest.contains(&"digest") && rest.contains(&"wal_bytes"),
        "{text}"
    );
    // Values of scalar fields line up in one column.
    let columns: Vec<usize> = text
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.trim_end().ends_with(':'))
        .map(|l| l.len() - l[l.find(' ').unwrap_or(0)..].trim_start().len())
        .collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{text}");

    let doc = success_json(&run(&kvd, &["status", "--json"], b""));
    assert_eq!(doc["node_id"], json!("cli-node"), "{doc}");
    assert_eq!(doc["role"], json!("primary"), "{doc}");
    assert_eq!(doc["keys"], json!(3), "{doc}");
    assert_eq!(doc["peers"], json!([]), "{doc}");
    assert_eq!(doc["last_index"], doc["commit_index"], "{doc}");
}

#[test]
fn server_errors_are_one_line_and_exit_2() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--max-value-bytes", "16"]);
    let file = tmp.path().join("too-big");
    std::fs::write(&file, [b'x'; 17]).unwrap();

    let out = run(&kvd, &["set", "k", "--file", file.to_str().unwrap()], b"");
    let stderr = assert_one_line_failure(&out, 2);
    for needle in ["413", "value_too_large", "16 bytes", kvd.url().as_str()] {
        assert!(stderr.contains(needle), "missing {needle:?}: {stderr}");
    }
    // The same through stdin, and with --json: errors are never JSON on
    // stdout.
    let out = run(&kvd, &["set", "k", "-", "--json"], &[0u8; 17]);
    let stderr = assert_one_line_failure(&out, 2);
    assert!(stderr.contains("value_too_large"), "{stderr}");
    // Nothing was written.
    assert_one_line_failure(&run(&kvd, &["get", "k"], b""), 1);

    let out = run(&kvd, &["bulk", "--kv"], b"a=0123456789abcdefg\n");
    let stderr = assert_one_line_failure(&out, 2);
    assert!(stderr.contains("items[0]"), "{stderr}");
}

#[test]
fn a_dead_first_endpoint_is_skipped() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    success(&run(&kvd, &["set", "k", "live"], b""));
    let endpoints = format!("http://127.0.0.1:{},{}", free_port(), kvd.url());
    let out = kvclient(&endpoints)
        .args(["get", "k"])
        .output()
        .expect("running kvclient");
    success(&out);
    assert_eq!(out.stdout, b"live");
    // The same list from the environment.
    let out = Command::new(bin("kvclient"))
        .env("KV_ENDPOINTS", &endpoints)
        .args(["--timeout-ms", TIMEOUT_MS, "get", "k"])
        .output()
        .expect("running kvclient");
    success(&out);
    assert_eq!(out.stdout, b"live");
}

/// `get --show-version` of `key`, as JSON.
fn show_version(kvd: &Kvd, key: &str) -> Value {
    success_json(&run(kvd, &["get", key, "--show-version"], b""))
}

#[test]
fn get_show_version_prints_the_versions_as_json() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let first = index_in(
        &success(&run(&kvd, &["set", "k", "one"], b"")),
        "OK (index ",
    );
    let second = index_in(
        &success(&run(&kvd, &["set", "k", "-"], b"\xff")),
        "OK (index ",
    );
    let expected = json!({
        "key": "k", "value": {"base64": "/w=="},
        "create_index": first, "mod_index": second, "version": 2,
        "etag": format!("\"{second}\""),
    });
    assert_eq!(show_version(&kvd, "k"), expected);
    // --json changes nothing; --consistent reads the same.
    let out = run(
        &kvd,
        &["--json", "get", "k", "--show-version", "--consistent"],
        b"",
    );
    assert_eq!(success_json(&out), expected);
    let out = run(&kvd, &["get", "nope", "--show-version"], b"");
    assert_one_line_failure(&out, 1);
}

#[test]
fn set_if_absent_twice_creates_once_and_exits_3_the_second_time() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let created = index_in(
        &success(&run(&kvd, &["set", "lock", "me", "--if-absent"], b"")),
        "OK (index ",
    );
    let out = run(&kvd, &["set", "lock", "you", "--if-absent"], b"");
    let stderr = assert_one_line_failure(&out, 3);
    for needle in [
        "412",
        "precondition_failed",
        &format!("mod_index {created}"),
    ] {
        assert!(stderr.contains(needle), "missing {needle:?}: {stderr}");
    }
    assert_eq!(run(&kvd, &["get", "lock"], b"").stdout, b"me");

    // --if-version: over the version it names only.
    let out = run(
        &kvd,
        &["set", "lock", "mine", "--if-version", &created.to_string()],
        b"",
    );
    let moved = index_in(&success(&out), "OK (index ");
    let out = run(
        &kvd,
        &[
            "set",
            "lock",
            "x",
            "--if-version",
            &created.to_string(),
            "--json",
        ],
        b"",
    );
    assert_one_line_failure(&out, 3);
    let out = run(
        &kvd,
        &["del", "lock", "--if-version", &created.to_string()],
        b"",
    );
    assert_one_line_failure(&out, 3);
    assert_eq!(run(&kvd, &["get", "lock"], b"").stdout, b"mine");
    let out = run(
        &kvd,
        &["del", "lock", "--if-version", &moved.to_string()],
        b"",
    );
    index_in(&success(&out), "deleted (index ");
    assert_one_line_failure(&run(&kvd, &["get", "lock"], b""), 1);
}

#[test]
fn ls_pages_through_every_key_and_escapes_each_line() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let lines: String = (0..25).map(|i| format!("p/{i:02}=v{i}\n")).collect();
    success(&run(
        &kvd,
        &["bulk", "--kv"],
        format!("{lines}q=outside\n").as_bytes(),
    ));
    let doc = br#"{"items":[{"key":"p/tab\tkey","value":"line\nbreak"},{"key":"p/zbin","value":{"base64":"AP8="}}]}"#;
    success(&run(&kvd, &["bulk"], doc));

    // Pages of 4: seven requests for 27 keys, one line per key in order.
    let out = success(&run(&kvd, &["ls", "p/", "--page-size", "4"], b""));
    let mut expected: Vec<String> = (0..25).map(|i| format!("p/{i:02}\tv{i}")).collect();
    expected.push("p/tab\\tkey\tline\\nbreak".into());
    expected.push("p/zbin\t\\x00\\xff".into());
    assert_eq!(out.lines().collect::<Vec<_>>(), expected);

    let keys = success(&run(
        &kvd,
        &[
            "ls",
            "p/",
            "--keys-only",
            "--limit",
            "6",
            "--page-size",
            "4",
        ],
        b"",
    ));
    assert_eq!(
        keys, "p/00\np/01\np/02\np/03\np/04\np/05\n",
        "--limit counts keys, not pages"
    );
    let all = success(&run(&kvd, &["ls", "--keys-only"], b""));
    assert_eq!(all.lines().count(), 28, "no prefix: every key");
    assert_eq!(all.lines().last(), Some("q"));
    assert_eq!(success(&run(&kvd, &["ls", "p/", "--count"], b"")), "27\n");
    assert_eq!(
        success_json(&run(&kvd, &["ls", "p/", "--count", "--json"], b"")),
        json!({"count": 27})
    );
    assert_eq!(success(&run(&kvd, &["ls", "none/"], b"")), "");

    // --json: one object per line, the value as a string or base64.
    let out = success(&run(&kvd, &["ls", "p/t", "--json"], b""));
    let docs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 1, "{out}");
    assert_eq!(docs[0]["key"], json!("p/tab\tkey"));
    assert_eq!(docs[0]["value"], json!("line\nbreak"));
    assert_eq!(docs[0]["version"], json!(1));
    let out = success(&run(&kvd, &["ls", "p/z", "--json", "--keys-only"], b""));
    let doc: Value = serde_json::from_str(out.trim_end()).unwrap();
    assert_eq!(doc.get("value"), None, "{doc}");
}

#[test]
fn del_prefix_deletes_every_key_under_it() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    success(&run(
        &kvd,
        &["bulk", "--kv"],
        b"a/1=1\na/2=2\na=root\nb/1=1\n",
    ));
    let out = success(&run(&kvd, &["del", "--prefix", "a/"], b""));
    index_in(&out, "deleted 2 keys (index ");
    assert_eq!(success(&run(&kvd, &["ls", "--keys-only"], b"")), "a\nb/1\n");
    let doc = success_json(&run(&kvd, &["del", "--prefix", "a/", "--json"], b""));
    assert_eq!(doc["deleted"], json!(0), "{doc}");
}

#[test]
fn txn_reads_its_json_from_stdin_and_prints_the_answer() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let created = index_in(
        &success(&run(&kvd, &["set", "a", "old"], b"")),
        "OK (index ",
    );
    let body = json!({
        "compare": [{"key": "a", "target": "mod_index", "op": "==", "value": created}],
        "success": [{"put": {"key": "a", "value": "new"}}, {"get": {"key": "a"}}],
        "failure": [{"get": {"key": "a"}}],
    })
    .to_string();
    let answer = success_json(&run(&kvd, &["txn"], body.as_bytes()));
    assert_eq!(answer["succeeded"], json!(true), "{answer}");
    let index = answer["index"].as_u64().unwrap();
    assert_eq!(answer["results"][0], json!({"put": {"mod_index": index}}));
    assert_eq!(answer["results"][1]["get"]["value"], json!("new"));

    // The same again: the failure branch ran, exit 0 all the same.
    let file = tmp.path().join("txn.json");
    std::fs::write(&file, &body).unwrap();
    let answer = success_json(&run(&kvd, &["txn", file.to_str().unwrap()], b""));
    assert_eq!(answer["succeeded"], json!(false), "{answer}");
    assert_eq!(answer["results"][0]["get"]["mod_index"], json!(index));

    // The node's refusal is one line, exit 2.
    let bad = br#"{"compare": [{"key": "a", "target": "colour", "op": "==", "value": 1}]}"#;
    let stderr = assert_one_line_failure(&run(&kvd, &["txn"], bad), 2);
    assert!(stderr.contains("invalid_txn"), "{stderr}");
}
