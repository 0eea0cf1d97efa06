//! Who may use kvsup's API, end to end: a real kvsup daemon and real kvd
//! nodes on loopback. Without the admin token, with a wrong one, from a web
//! page (a foreign `Origin`, a "simple" form post, a preflight) or through a
//! rebound host name, a request is refused and the cluster is untouched;
//! the token works for the `kvsup` commands; the token file is private and
//! a daemon refuses one that is not.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use kvstore_testkit::sup::{run_in, Supervised};
use kvstore_testkit::wait_until;
use serde_json::{json, Value};
use tempfile::TempDir;

/// An answer: status, headers (names lowercased), body.
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The start of the body, for a failure message.
    fn excerpt(&self) -> String {
        self.body.chars().take(160).collect()
    }

    fn error_code(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// One HTTP/1.1 request written byte by byte, so that the test controls
/// every header (Host included); `headers` are `Name: value` lines. No
/// answer is status 0 with the error as the body.
fn send(port: u16, method: &str, path: &str, headers: &[String], body: &str) -> Answer {
    exchange(port, method, path, headers, body).unwrap_or_else(|e| Answer {
        code: 0,
        headers: Vec::new(),
        body: format!("no answer: {e}"),
    })
}

fn exchange(
    port: u16,
    method: &str,
    path: &str,
    headers: &[String],
    body: &str,
) -> std::io::Result<Answer> {
    let timeout = Duration::from_secs(15);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for h in headers {
        head.push_str(&format!("{h}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        code,
        headers,
        body: body.to_string(),
    })
}

fn pids(st: &Value) -> Vec<u64> {
    st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap_or(0))
        .collect()
}

/// Every route, with a body that would do something if it were let in.
fn routes(c: &Supervised) -> Vec<(&'static str, &'static str, String)> {
    let apply = json!({"path": c.manifest, "base_dir": c.dir}).to_string();
    vec![
        ("GET", "/v1/status", String::new()),
        ("GET", "/v1/events", String::new()),
        ("GET", "/v1/samples", String::new()),
        ("GET", "/metrics", String::new()),
        ("GET", "/no/such/route", String::new()),
        ("POST", "/v1/apply", apply),
        ("POST", "/v1/kill", json!({"node": "n0"}).to_string()),
        ("POST", "/v1/promote", json!({"node": "n1"}).to_string()),
        ("POST", "/v1/down", "{}".into()),
    ]
}

/// The cluster is as it was: the same node processes, the supervisor
/// alive, no kill or down in its events.
fn untouched(c: &Supervised, before: &[u64], what: &str) {
    let st = c
        .status()
        .unwrap_or_else(|e| panic!("{what}: no status: {e:#}"));
    assert_eq!(pids(&st), before, "{what}: {st:#}");
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert!(
        !events.contains(" kill ") && !events.contains(" down "),
        "{what}: {events}"
    );
}

#[test]
fn without_the_right_token_every_route_but_health_is_refused_and_nothing_changes() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let before = pids(&c.status().unwrap());
    let json_type = "Content-Type: application/json".to_string();
    let wrong = format!("Authorization: Bearer {}", "0".repeat(64));
    let mut problems = Vec::new();
    for (method, path, body) in routes(&c) {
        for (auth, code) in [
            (None, "token_required"),
            (Some(wrong.clone()), "token_invalid"),
            (
                Some("Authorization: Basic a3ZzdXA6a3ZzdXA=".into()),
                "token_required",
            ),
        ] {
            let headers: Vec<String> = [Some(json_type.clone()), auth]
                .into_iter()
                .flatten()
                .collect();
            let a = send(c.sup_port, method, path, &headers, &body);
            let challenge = a.header("www-authenticate").unwrap_or("");
            if a.code != 401 || a.error_code() != code || !challenge.starts_with("Bearer") {
                problems.push(format!(
                    "{method} {path} {headers:?}: {} {challenge:?} {}",
                    a.code,
                    a.excerpt()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    untouched(&c, &before, "after the refused requests");
    let health = send(c.sup_port, "GET", "/health", &[], "");
    assert_eq!(health.code, 200, "{}", health.body);

    // The commands send the token; without one they say what is missing.
    let url = format!("http://127.0.0.1:{}", c.sup_port);
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["status", "--supervisor", &url],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!ok.success() && out.contains("--token-file"), "{out}");
    let missing = tmp.path().join("no-such.token");
    let m = missing.display().to_string();
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["kill", "n0", "--supervisor", &url, "--token-file", &m],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!ok.success() && out.contains(&m), "{out}");
    let wrong_file = tmp.path().join("wrong.token");
    std::fs::write(&wrong_file, format!("{}\n", "0".repeat(64))).unwrap();
    let w = wrong_file.display().to_string();
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["kill", "n0", "--supervisor", &url, "--token-file", &w],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        !ok.success() && out.contains("refused") && out.contains(&w),
        "{out}"
    );
    untouched(&c, &before, "after the commands without the token");

    // With the token: status through -f (the token from the manifest's
    // state dir), and a kill that kvsup carries out.
    let f = c.manifest.display().to_string();
    let (ok, out) = run_in(
        &c.dir,
        "kvsup",
        &["status", "-f", &f],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(ok.success() && out.contains("CLUSTER test"), "{out}");
    let (ok, out) = c.kvsup(&["kill", "n2"]).unwrap();
    assert!(ok.success(), "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || c
            .node_status("n2")
            .is_ok_and(|n| n["pid"].as_u64().is_some_and(|p| p != before[2]))),
        "n2 was not killed and restarted: {:#}",
        c.status().unwrap()
    );
}

#[test]
fn requests_a_web_page_can_send_are_refused_and_the_cluster_still_runs() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let before = pids(&c.status().unwrap());
    let auth = format!("Authorization: Bearer {}", c.token().unwrap());
    let evil = "Origin: http://evil.example".to_string();
    let mut problems = Vec::new();
    let mut expect = |what: &str, a: Answer, code: u16, error: &str| {
        let cors = a
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("access-control-"));
        if a.code != code || a.error_code() != error || cors {
            problems.push(format!(
                "{what}: {} {:?} {}",
                a.code,
                a.headers,
                a.excerpt()
            ));
        }
    };

    // A foreign Origin is refused before anything else, even with the token.
    for (method, path, body) in routes(&c) {
        let headers = [
            evil.clone(),
            auth.clone(),
            "Content-Type: application/json".into(),
        ];
        let a = send(c.sup_port, method, path, &headers, &body);
        expect(
            &format!("{method} {path} from evil.example"),
            a,
            403,
            "origin_not_allowed",
        );
    }
    // A "simple" form post (no preflight in a browser): text/plain, no
    // token; as the browser sends it (with Origin) and without Origin.
    let form = "Content-Type: text/plain".to_string();
    let a = send(
        c.sup_port,
        "POST",
        "/v1/down",
        &[form.clone(), evil.clone()],
        "x=1",
    );
    expect("form post to /v1/down", a, 403, "origin_not_allowed");
    let a = send(
        c.sup_port,
        "POST",
        "/v1/down",
        std::slice::from_ref(&form),
        "x=1",
    );
    expect(
        "form post to /v1/down without Origin",
        a,
        401,
        "token_required",
    );
    // The preflight a page needs before it may send Authorization.
    let preflight = [
        evil.clone(),
        "Access-Control-Request-Method: POST".into(),
        "Access-Control-Request-Headers: authorization".into(),
    ];
    let a = send(c.sup_port, "OPTIONS", "/v1/down", &preflight, "");
    expect("preflight of /v1/down", a, 403, "origin_not_allowed");
    // DNS rebinding: the page's own name now resolves to 127.0.0.1, so
    // the request carries that name in Host.
    let rebound = format!("Host: evil.example:{}", c.sup_port);
    let a = send(
        c.sup_port,
        "POST",
        "/v1/down",
        &[rebound, auth.clone()],
        "{}",
    );
    expect("Host evil.example", a, 403, "host_not_allowed");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    untouched(&c, &before, "after the web page's requests");

    // kvsup's own origin, with the token, is let in.
    let own = format!("Origin: http://127.0.0.1:{}", c.sup_port);
    let a = send(c.sup_port, "GET", "/v1/status", &[own, auth.clone()], "");
    assert_eq!(a.code, 200, "{}", a.body);
    // And nothing answers a preflight, even one that passes the checks.
    let a = send(c.sup_port, "OPTIONS", "/v1/down", &[auth], "");
    let cors = a
        .headers
        .iter()
        .any(|(n, _)| n.starts_with("access-control-"));
    assert!(a.code == 405 && !cors, "{} {:?}", a.code, a.headers);
}

#[test]
fn the_token_file_is_private_kept_across_restarts_and_a_readable_one_is_refused() {
    let tmp = TempDir::new().unwrap();
    let mut c = Supervised::apply(tmp.path(), 1, "").unwrap();
    let file = c.token_file();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let token = c.token().unwrap();
    assert_eq!(token.len(), 64, "{token}");
    let log = std::fs::read_to_string(c.state_dir.join("kvsup.log")).unwrap();
    assert!(!log.contains(&token), "the token is in the log:\n{log}");

    c.down().unwrap();
    c.start().unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(
        c.token().unwrap(),
        token,
        "a restarted daemon made a new token"
    );
    c.down().unwrap();

    // Group-readable: the daemon does not start, and says why and how to fix.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(
        !ok.success(),
        "started with a group-readable token file: {out}"
    );
    let name = file.display().to_string();
    assert!(
        out.contains(&name) && out.contains("0640") && out.contains("chmod 600"),
        "{out}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", c.sup_port)).is_err(),
        "something answers on the supervisor port"
    );
    let log = std::fs::read_to_string(c.state_dir.join("kvsup.log")).unwrap();
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
}

/// Another local user: the directories on the way are open to them, so it
/// is the token file's own mode that keeps its secret; without it their
/// `kvsup` cannot act on the cluster. Runs as root (CI does), acting as
/// `nobody` through `setpriv`.
#[test]
fn another_local_user_can_neither_read_the_token_nor_act_on_the_cluster() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test acts as another user through setpriv and needs root"
    );
    let open = |p: &std::path::Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap()
    };
    let tmp = TempDir::new().unwrap();
    open(tmp.path());
    let c = Supervised::apply(tmp.path(), 1, "").unwrap();
    open(&c.state_dir);
    // A kvsup binary that user can run, wherever the build lives.
    let bin = TempDir::new().unwrap();
    open(bin.path());
    let kvsup = bin.path().join("kvsup");
    std::fs::copy(kvstore_testkit::bin("kvsup"), &kvsup).unwrap();
    open(&kvsup);
    let before = pids(&c.status().unwrap());
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(args)
            .output()
            .expect("running setpriv");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let file = c.token_file().display().to_string();
    let (ok, out) = as_nobody(&["cat", &file]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let url = format!("http://127.0.0.1:{}", c.sup_port);
    let kvsup = kvsup.display().to_string();
    let (ok, out) = as_nobody(&[
        &kvsup,
        "kill",
        "n0",
        "--supervisor",
        &url,
        "--token-file",
        &file,
    ]);
    assert!(!ok && out.contains(&file), "{out}");
    untouched(&c, &before, "another user");
}
