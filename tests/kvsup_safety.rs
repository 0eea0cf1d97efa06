//! kvsup under faults that its health checks used to miss or mishandle: a
//! primary that steps down but keeps answering, a primary whose disk is
//! full, a cluster whose bootstrap primary dies at once or that restarts
//! whole, manifests and API requests that would break the supervisor, and
//! output into a closed pipe. Real kvsup and kvd processes on free loopback
//! ports, in temp dirs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kvstore_testkit::sup::{manifest_text, run_in, Supervised};
use kvstore_testkit::{bin, free_port, wait_until};
use serde_json::json;
use tempfile::TempDir;

/// A generous deadline for a positive signal on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// A client that retries (and follows redirects) until `deadline`, not
/// for a number of attempts.
fn client(c: &Supervised, deadline: Duration) -> kvclient::Client {
    kvclient::Client::builder()
        .endpoints(c.urls())
        .request_timeout(Duration::from_secs(2))
        .max_retries(u32::MAX)
        .retry_deadline(deadline)
        .build()
        .unwrap()
}

fn events(c: &Supervised) -> String {
    c.kvsup(&["events"]).map(|(_, e)| e).unwrap_or_default()
}

/// The primary in kvsup's status and its epoch, once there is one.
fn wait_primary(c: &Supervised, what: impl Fn(&str, u64) -> bool) -> Option<(String, u64)> {
    let mut found = None;
    wait_until(DEADLINE, || {
        let Ok(st) = c.status() else { return false };
        let (Some(p), Some(e)) = (st["primary"].as_str(), st["epoch"].as_u64()) else {
            return false;
        };
        if what(p, e) {
            found = Some((p.to_string(), e));
        }
        found.is_some()
    });
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_steps_down_but_stays_healthy_is_replaced() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let kv = client(&c, DEADLINE);
    kv.set("before", "1").await.unwrap();
    let st = c.status().unwrap();
    let old = st["primary"].as_str().unwrap().to_string();
    let epoch = st["epoch"].as_u64().unwrap();

    // A vote for a higher epoch from a candidate nobody elects: the primary
    // persists the epoch and steps down, and no node leads that epoch.
    let forced = epoch + 5;
    let resp = reqwest::Client::new()
        .post(format!("{}/internal/vote", c.url(&old)))
        .json(&json!({"epoch": forced, "candidate": "x",
                      "last": {"epoch": 0, "index": 0}, "pre_vote": false}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert!(
        wait_until(DEADLINE, || c
            .node_status(&old)
            .is_ok_and(|n| n["role"] == "secondary")),
        "{old} did not step down: {:#}",
        c.status().unwrap()
    );

    // kvsup elects a primary of a newer epoch still, and writes go there.
    let new = wait_primary(&c, |_, e| e > forced);
    assert!(
        new.is_some(),
        "no primary above epoch {forced}: {:#}\n{}",
        c.status().unwrap(),
        events(&c)
    );
    kv.set("after", "2").await.unwrap();
    let ev = events(&c);
    assert!(ev.contains("failover"), "{ev}");
    assert_eq!(kv.get_consistent("before").await.unwrap().unwrap(), "1");
    assert_eq!(kv.get_consistent("after").await.unwrap().unwrap(), "2");
}

/// A tmpfs mounted for the length of a test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs at {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Fills the file system with one file until a write fails.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a node outlived the test): detach it at least.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_disk_is_full_is_failed_over_and_writes_continue() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs (a disk that fills up) needs root");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let c = Supervised::prepare(tmp.path(), 3, "").unwrap();
    // Each node's directory on its own small file system.
    let disks: Vec<(String, Tmpfs)> = c
        .nodes
        .iter()
        .map(|(n, _)| (n.clone(), Tmpfs::mount(&c.state_dir.join(n), "32m")))
        .collect();
    // Bound after the disks, so dropped (brought down) before they are
    // unmounted.
    let mut c = c;
    c.start().unwrap();
    c.wait_ready(DEADLINE).unwrap();
    let kv = client(&c, DEADLINE);
    kv.set("before", "1").await.unwrap();
    let old = c.primary().unwrap();

    // The primary's disk fills up. Its WAL holds up to 1 MiB of zeros
    // written ahead, which the next writes still fill; the first write
    // past them fails and poisons the log.
    disks.iter().find(|(n, _)| *n == old).unwrap().1.fill();
    // That write is refused (500 storage_error: not acknowledged); those
    // before it were acknowledged and stay; the next ones must find a new
    // primary.
    let mut taken = Vec::new();
    let mut refused = None;
    for i in 0..16 {
        let key = format!("big/{i}");
        match kv.set(&key, "x".repeat(256 << 10)).await {
            Ok(_) => taken.push(key),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(
        refused.is_some(),
        "16 writes of 256 KiB on a full disk: {taken:?}"
    );
    let after = kv.set("after", "2").await;
    assert!(
        after.is_ok(),
        "{after:?}: {:#}\n{}",
        c.status().unwrap(),
        events(&c)
    );
    let new = wait_primary(&c, |p, _| p != old);
    assert!(
        new.is_some(),
        "no new primary: {:#}\n{}",
        c.status().unwrap(),
        events(&c)
    );
    kv.set("after-2", "3").await.unwrap();
    let n = c.node_status(&old).unwrap();
    assert_eq!(n["healthy"], false, "{n:#}");
    assert!(events(&c).contains("failover"), "{}", events(&c));
    for (k, v) in [("before", "1"), ("after", "2"), ("after-2", "3")] {
        assert_eq!(kv.get_consistent(k).await.unwrap().unwrap(), v);
    }
    for k in &taken {
        let v = kv.get_consistent(k).await.unwrap();
        assert_eq!(v.map(|v| v.len()), Some(256 << 10), "{k}");
    }
    c.down().unwrap();
}

/// A health interval of a minute: an election that waits for health
/// intervals (rather than for what kvsup already knows) cannot happen
/// within the test's deadline.
const SLOW_CHECKS: &str = "  healthCheck: {intervalMs: 60000}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_primary_killed_right_after_apply_is_replaced_at_once() {
    let tmp = TempDir::new().unwrap();
    let mut c = Supervised::prepare(tmp.path(), 3, SLOW_CHECKS).unwrap();
    c.start().unwrap();
    // Every node has started (made its data dir's meta), so n0, the
    // bootstrap primary, is not bootstrapped again when it is restarted.
    let meta = |n: &str| c.state_dir.join(n).join("data/meta");
    assert!(
        wait_until(DEADLINE, || c.nodes.iter().all(|(n, _)| meta(n).exists())),
        "not every node made its meta: {:#}",
        c.status().unwrap()
    );
    let (ok, out) = c.kvsup(&["kill", "n0"]).unwrap();
    assert!(ok.success(), "{out}");
    let kv = client(&c, Duration::from_secs(30));
    let written = kv.set("first", "1").await;
    assert!(
        written.is_ok(),
        "{written:?}: {:#}\n{}",
        c.status().unwrap(),
        events(&c)
    );
    let st = c.status().unwrap();
    assert_ne!(st["primary"], "n0", "{st:#}");
    assert!(events(&c).contains("failover"), "{}", events(&c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_elects_once_every_node_answers() {
    let tmp = TempDir::new().unwrap();
    let mut c = Supervised::apply(tmp.path(), 3, "").unwrap();
    client(&c, DEADLINE).set("k", "v").await.unwrap();
    c.down().unwrap();
    // Every node comes back as a secondary; nobody bootstraps.
    let text = std::fs::read_to_string(&c.manifest).unwrap();
    std::fs::write(&c.manifest, format!("{text}{SLOW_CHECKS}")).unwrap();
    c.start().unwrap();
    let kv = client(&c, Duration::from_secs(30));
    let written = kv.set("k2", "v2").await;
    assert!(
        written.is_ok(),
        "{written:?}: {:#}\n{}",
        c.status().unwrap(),
        events(&c)
    );
    assert_eq!(kv.get_consistent("k").await.unwrap().unwrap(), "v");
}

/// `kvsup apply --dry-run -f` of `text` in a fresh directory: (refused?,
/// output). A dry run starts nothing even where validation is missing.
fn dry_run(text: &str) -> (bool, String) {
    let tmp = TempDir::new().unwrap();
    let f = tmp.path().join("m.yaml");
    std::fs::write(&f, text).unwrap();
    let (st, out) = run_in(
        tmp.path(),
        "kvsup",
        &["apply", "--dry-run", "-f", f.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .unwrap();
    (!st.success(), out)
}

#[test]
fn manifests_that_would_break_the_supervisor_are_refused() {
    let nodes: Vec<(String, u16)> = (0..3).map(|i| (format!("n{i}"), free_port())).collect();
    let good = manifest_text("edge", &nodes, free_port(), "");
    let up = "../".repeat(64);
    let cases = [
        (
            "a node named like the daemon's own files",
            good.replace("name: n1,", "name: kvsup,"),
            "spec.nodes[1].name",
        ),
        (
            "the file system root",
            good.replace("stateDir: state", "stateDir: /"),
            "spec.stateDir",
        ),
        (
            "a system directory",
            good.replace("stateDir: state", "stateDir: /etc"),
            "spec.stateDir",
        ),
        (
            "a relative path up to the root",
            good.replace("stateDir: state", &format!("stateDir: {up}")),
            "spec.stateDir",
        ),
        (
            "a restart backoff no node outlives",
            format!(
                "{good}  restart: {{backoffInitialMs: {m}, backoffMaxMs: {m}}}\n",
                m = u64::MAX
            ),
            "spec.restart",
        ),
    ];
    let mut accepted = Vec::new();
    for (what, text, field) in cases {
        let (refused, out) = dry_run(&text);
        if !refused || !out.contains(field) {
            accepted.push(format!("{what}: refused={refused}, output: {out}"));
        }
    }
    assert!(accepted.is_empty(), "{}", accepted.join("\n"));
    // The limits are not in the way of an ordinary manifest.
    let (refused, out) = dry_run(&good.replace(
        "stateDir: state",
        "stateDir: state\n  restart: {backoffInitialMs: 1000, backoffMaxMs: 300000}",
    ));
    assert!(!refused, "{out}");
}

#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 1, "").unwrap();
    let url = format!("http://127.0.0.1:{}", c.sup_port);
    let token = c.token_file();
    for cmd in [&["status"][..], &["status", "--json"], &["events"]] {
        let mut child = Command::new(bin("kvsup"))
            .args(cmd)
            .args(["--supervisor", &url])
            .arg("--token-file")
            .arg(&token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before kvsup has printed anything (it still
        // has to ask the daemon), as `kvsup status | head -0` would.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "kvsup {cmd:?} into a closed pipe: {}: {err}",
            out.status
        );
    }
}

/// A file only its owner may read, holding `text`.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    p
}

/// Opens `fifo` for writing without blocking and closes it at once, which
/// ends a read that is waiting on it (and does nothing if none is).
fn release(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(fifo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_requests_read_only_small_regular_files_and_echo_none() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let sup_pid = c.status().unwrap()["supervisor_pid"].as_u64().unwrap();
    // A safety net for this test's own machine: should the daemon ever read
    // /dev/zero to the end again, it fails at 1 GiB instead of taking every
    // byte of memory from whatever else runs here.
    let limited = Command::new("prlimit")
        .args(["--pid", &sup_pid.to_string(), "--as=1073741824"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(limited, "prlimit on the supervisor failed");

    let http = reqwest::Client::new();
    let token = c.token().unwrap();
    let apply = |path: PathBuf| {
        let req = http
            .post(format!("http://127.0.0.1:{}/v1/apply", c.sup_port))
            .bearer_auth(&token)
            .json(&json!({"path": path, "base_dir": tmp.path()}))
            .timeout(Duration::from_secs(10));
        async move {
            match req.send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, format!("no answer: {e}")),
            }
        }
    };
    let files = TempDir::new().unwrap();
    let secret = "hunter2-do-not-print-me";
    let mut problems = Vec::new();
    for (what, path, needle) in [
        (
            "a private plain-text file",
            private_file(files.path(), "secret.txt", secret),
            secret,
        ),
        (
            "a private YAML file",
            private_file(files.path(), "secret.yaml", &format!("{secret}: 1\n")),
            secret,
        ),
    ] {
        let (code, body) = apply(path).await;
        if code != 400 || body.contains(needle) {
            problems.push(format!("{what}: {code} {body}"));
        }
    }
    // Anything but a regular file is refused for what it is, unread.
    let not_regular = |what: &str, (code, body): (u16, String)| {
        (code != 400 || !body.contains("not a regular file"))
            .then(|| format!("{what}: {code} {body}"))
    };
    problems.extend(not_regular("a directory", apply(files.path().into()).await));
    // FIFOs: a read of one waits for a writer that never comes.
    let fifos = [fifo(files.path(), "a.fifo"), fifo(files.path(), "b.fifo")];
    let (a, b) = tokio::join!(apply(fifos[0].clone()), apply(fifos[1].clone()));
    problems.extend(not_regular("a FIFO", a));
    problems.extend(not_regular("another FIFO", b));
    // Health checks and the API still run while those requests are answered.
    if let Err(e) = c.status() {
        problems.push(format!("status after the FIFOs: {e:#}"));
    }
    for f in &fifos {
        release(f);
    }
    problems.extend(not_regular("/dev/zero", apply("/dev/zero".into()).await));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // And the supervisor still fails over a killed primary.
    let old = c.primary().unwrap();
    let (ok, out) = c.kvsup(&["kill", &old]).unwrap();
    assert!(ok.success(), "{out}");
    client(&c, DEADLINE).set("after", "1").await.unwrap();
    assert_ne!(c.primary().as_deref(), Some(old.as_str()));
}
