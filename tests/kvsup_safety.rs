//! kvsup under faults that its health checks used to miss or mishandle: a
//! primary that steps down but keeps answering, a primary whose disk is
//! full, a cluster whose bootstrap primary dies at once or that restarts
//! whole. Real kvsup and kvd processes on free loopback ports, in temp dirs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvstore::sup::Supervised;
use kvstore::wait_until;
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

    // The primary's disk fills up: its next WAL write that needs a new
    // page (a value larger than the last page's slack) fails and poisons it.
    disks.iter().find(|(n, _)| *n == old).unwrap().1.fill();
    // That write is refused (500 storage_error: not acknowledged); the
    // next ones must find a new primary.
    let refused = kv.set("poison", "x".repeat(256 << 10)).await;
    assert!(refused.is_err(), "{refused:?}");
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
    assert!(wait_until(DEADLINE, || c.nodes.iter().all(|(n, _)| c
        .state_dir
        .join(n)
        .join("data/meta")
        .exists())));
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
