//! A secured cluster from one manifest, end to end: `spec.tls: auto` makes
//! kvsup create a CA, node certificates and tokens, run its nodes over
//! mutual TLS with a token file, and still do everything it does for a
//! plain cluster (health checks, failover, switchover, the mode switch,
//! status). Clients reach it with the CA and the client token: the
//! `kvclient` command, curl, (and the Python client, python/tests).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvstore_testkit::sup::{run_in, Supervised};
use kvstore_testkit::wait_until;
use serde_json::Value;
use tempfile::TempDir;

const TLS: &str = "  tls: auto\n";

/// What curl did: its exit status, and the HTTP status (0 when none came).
struct Curl {
    exit: i32,
    code: u16,
    body: String,
}

/// `curl ARGS URL` with a time limit; the status code on the last line.
fn curl(args: &[&str], url: &str) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        code: code.trim().parse().unwrap_or(0),
        body: format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The arguments that make curl trust the cluster CA and send `token`.
fn trusted(c: &Supervised, token: &str) -> Vec<String> {
    vec![
        "--cacert".into(),
        c.creds_dir().join("ca.pem").display().to_string(),
        "-H".into(),
        format!("Authorization: Bearer {token}"),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// PUT `key` = `value` to the current primary (or any node, masterless)
/// with the client token, until one answers 200 within `timeout`.
fn put_until_ok(c: &Supervised, key: &str, value: &str, timeout: Duration) -> bool {
    let token = c.cluster_token("client").unwrap();
    let mut args = trusted(c, &token);
    args.extend(["-X", "PUT", "-L", "--data-binary", value].map(String::from));
    wait_until(timeout, || {
        let url = match c.primary() {
            Some(p) => c.url(&p),
            None => c.urls()[0].clone(),
        };
        curl(&refs(&args), &format!("{url}/v1/kv/{key}")).code == 200
    })
}

fn get_value(c: &Supervised, url: &str, key: &str) -> Curl {
    let token = c.cluster_token("client").unwrap();
    curl(&refs(&trusted(c, &token)), &format!("{url}/v1/kv/{key}"))
}

/// `kvsup apply -f FILE` for the cluster, which must succeed; its output.
fn apply_file(c: &Supervised, file: &Path) -> String {
    let m = file.display().to_string();
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["apply", "-f", &m],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(ok.success(), "{out}");
    out
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_tls_auto_cluster_serves_only_holders_of_the_ca_and_a_token() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, TLS).unwrap();
    let creds = c.creds_dir();

    // The state dir and the set are private; no file is readable by others.
    assert_eq!(mode_of(&c.state_dir), 0o700);
    assert_eq!(mode_of(&creds), 0o700);
    let names: Vec<String> = std::fs::read_dir(&creds)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5 + 2 * 3, "{names:?}");
    for n in &names {
        assert_eq!(mode_of(&creds.join(n)), 0o600, "{n}");
    }

    // The nodes serve https; status and `kvsup creds` say where the CA
    // and the client token are.
    let st = c.status().unwrap();
    for n in st["nodes"].as_array().unwrap() {
        assert!(n["url"].as_str().unwrap().starts_with("https://"), "{n}");
    }
    let ca = creds.join("ca.pem");
    assert_eq!(st["tls"]["ca"], ca.display().to_string(), "{st:#}");
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["creds", "-f", &c.manifest.display().to_string()],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(ok.success(), "{out}");
    assert!(out.contains(&ca.display().to_string()), "{out}");
    assert!(
        out.contains(&creds.join("client.token").display().to_string()),
        "{out}"
    );
    let (_, text) = c.kvsup(&["status"]).unwrap();
    assert!(text.contains(&ca.display().to_string()), "{text}");

    // curl: with the CA and the client token it writes and reads.
    let primary = c.primary().unwrap();
    let token = c.cluster_token("client").unwrap();
    let mut put = trusted(&c, &token);
    put.extend(["-X", "PUT", "--data-binary", "over-tls"].map(String::from));
    let r = curl(&refs(&put), &format!("{}/v1/kv/curl", c.url(&primary)));
    assert_eq!(r.code, 200, "{}", r.body);
    let r = get_value(&c, &c.url(&primary), "curl");
    assert_eq!((r.code, r.body.as_str()), (200, "over-tls"));
    // Without the token: 401. Without the CA: no connection at all.
    let cacert = ca.display().to_string();
    let r = curl(
        &["--cacert", &cacert],
        &format!("{}/v1/kv/curl", c.url(&primary)),
    );
    assert_eq!(r.code, 401, "{}", r.body);
    let bearer = format!("Authorization: Bearer {token}");
    let r = curl(&["-H", &bearer], &format!("{}/v1/kv/curl", c.url(&primary)));
    assert!(r.exit != 0 && r.code == 0, "{} {}", r.exit, r.body);
    // The client token is no admin's: it may not scrape or promote.
    let r = curl(
        &refs(&trusted(&c, &token)),
        &format!("{}/metrics", c.url(&primary)),
    );
    assert_eq!(r.code, 403, "{}", r.body);
    let admin = c.cluster_token("admin").unwrap();
    let r = curl(
        &refs(&trusted(&c, &admin)),
        &format!("{}/metrics", c.url(&primary)),
    );
    assert_eq!(r.code, 200, "{}", r.body);

    // The kvclient command with --ca and --token.
    let endpoints = c.urls().join(",");
    let kv = |args: &[&str]| {
        let mut all = vec![
            "--endpoints",
            &endpoints,
            "--ca",
            &cacert,
            "--token",
            &token,
        ];
        all.extend(args);
        kvstore_testkit::run_to_exit("kvclient", &all, Duration::from_secs(30)).unwrap()
    };
    let (ok, out) = kv(&["set", "cli", "from-kvclient"]);
    assert!(ok.success(), "{out}");
    let (ok, out) = kv(&["get", "cli"]);
    assert!(ok.success() && out.contains("from-kvclient"), "{out}");

    // A switchover goes through the nodes' admin routes, with the token.
    let other = c
        .nodes
        .iter()
        .map(|(n, _)| n.clone())
        .find(|n| *n != primary)
        .unwrap();
    let (ok, out) = c.kvsup(&["promote", &other]).unwrap();
    assert!(ok.success(), "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || c.primary().as_deref()
            == Some(other.as_str())),
        "{:#}",
        c.status().unwrap()
    );
    assert!(put_until_ok(
        &c,
        "after-promote",
        "x",
        Duration::from_secs(30)
    ));

    // Nothing secret reached the logs.
    for log in ["kvsup.log", "n0.log", "n1.log", "n2.log"] {
        let text = std::fs::read_to_string(c.state_dir.join(log)).unwrap_or_default();
        assert!(!text.contains(&token) && !text.contains(&admin), "{log}");
    }
}

#[test]
fn a_tls_auto_cluster_fails_over_and_switches_mode() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, TLS).unwrap();
    assert!(put_until_ok(&c, "before", "1", Duration::from_secs(30)));

    // A crash the supervisor only sees: SIGKILL of the primary's kvd.
    let old = c.primary().unwrap();
    c.kill_node_process(&old).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || c
            .primary()
            .is_some_and(|p| p != old)),
        "no new primary: {:#}",
        c.status().unwrap()
    );
    assert!(put_until_ok(
        &c,
        "after-failover",
        "2",
        Duration::from_secs(30)
    ));
    c.wait_ready(Duration::from_secs(60)).unwrap();

    // To masterless and back, through the nodes' admin routes over TLS.
    let text = std::fs::read_to_string(&c.manifest).unwrap();
    let masterless = tmp.path().join("masterless.yaml");
    std::fs::write(
        &masterless,
        text.replace("stateDir: state", "stateDir: state\n  mode: masterless"),
    )
    .unwrap();
    let out = apply_file(&c, &masterless);
    assert!(out.contains("spec.mode"), "{out}");
    let st: Value = c.wait_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(st["mode"], "masterless", "{st:#}");
    assert!(put_until_ok(&c, "masterless", "3", Duration::from_secs(30)));
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(ok.success() && out.contains("spec.mode"), "{out}");
    let st = c.wait_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(st["mode"], "primary-secondary", "{st:#}");
    assert!(put_until_ok(&c, "back", "4", Duration::from_secs(30)));
    let primary = c.primary().unwrap();
    for (k, v) in [
        ("before", "1"),
        ("after-failover", "2"),
        ("masterless", "3"),
        ("back", "4"),
    ] {
        let r = get_value(&c, &c.url(&primary), k);
        assert_eq!((r.code, r.body.as_str()), (200, v), "{k}");
    }
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert!(events.contains("failover"), "{events}");
}

#[test]
fn a_partial_credential_set_is_refused_naming_what_is_missing() {
    let tmp = TempDir::new().unwrap();
    let mut c = Supervised::apply(tmp.path(), 2, TLS).unwrap();
    let ca_before = std::fs::read(c.creds_dir().join("ca.pem")).unwrap();
    c.down().unwrap();
    // Applied again: the same CA and tokens, never made anew.
    c.start().unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(
        std::fs::read(c.creds_dir().join("ca.pem")).unwrap(),
        ca_before
    );
    c.down().unwrap();
    std::fs::remove_file(c.creds_dir().join("n1.key")).unwrap();
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(!ok.success(), "{out}");
    assert!(out.contains("n1.key") && out.contains("missing"), "{out}");
}

#[test]
fn a_node_added_to_a_tls_auto_cluster_gets_a_certificate_of_its_ca() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, TLS).unwrap();
    assert!(put_until_ok(&c, "before", "1", Duration::from_secs(30)));
    let mut nodes = c.nodes.clone();
    nodes.push(("n3".into(), kvstore_testkit::free_port()));
    let grown = tmp.path().join("grown.yaml");
    std::fs::write(
        &grown,
        kvstore_testkit::sup::manifest_text("test", &nodes, c.sup_port, TLS),
    )
    .unwrap();
    let out = apply_file(&c, &grown);
    assert!(out.contains("add node n3"), "{out}");
    let mut st = Value::Null;
    let done = wait_until(Duration::from_secs(120), || {
        st = c.status().unwrap();
        st["change"]["state"] != "running"
            && st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "n3" && n["voter"] == true)
    });
    assert!(done, "{st:#}");
    assert_eq!(st["change"]["state"], "done", "{st:#}");
    let key = c.creds_dir().join("n3.key");
    assert_eq!(mode_of(&key), 0o600);
    // n3 serves https with its new certificate, which clients holding the
    // cluster CA trust, and it holds what was written before it joined.
    let url = st["nodes"][3]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://"), "{url}");
    let r = get_value(&c, &url, "before");
    assert_eq!((r.code, r.body.as_str()), (200, "1"), "{}", r.body);
}
