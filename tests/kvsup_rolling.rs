//! Rolling changes end to end: a real `kvsup apply` of a changed
//! `kvdArgs` or kvd binary on a running 3-node cluster restarts the nodes
//! one at a time under 16 writers; a node that cannot start stops the
//! change with the rest untouched; refused applies change nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::bin;
use kvstore_testkit::sup::Supervised;
use kvstore_testkit::sup_change::{
    assert_nothing_lost, events, kvsup, manifest, node_pids, wait_change_over, with_spec, Load,
};
use serde_json::Value;
use tempfile::TempDir;

/// The flag the rolling change adds: harmless, and seen in each node's
/// command line.
const NEW_FLAG: &str = "--max-bulk-items=50000";

fn cmdline(pid: u64) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn exe(pid: u64) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kvd_args_change_rolls_node_by_node_under_16_writers_losing_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    let before = c.status().unwrap();
    let first_primary = before["primary"].as_str().unwrap().to_string();
    let old_pids = node_pids(&before);
    let load = Load::start(&c, 16);
    load.more(100).await;

    let m = manifest(
        &c,
        "rolled.yaml",
        &with_spec(&c, &format!("  kvdArgs: [\"{NEW_FLAG}\"]\n")),
    );
    let (ok, dry) = kvsup(&c, &["apply", "--dry-run", "-f", &m]).await;
    assert!(ok && dry.contains("rolling change"), "{dry}");
    assert_eq!(
        c.status().unwrap()["change"],
        Value::Null,
        "a dry run starts nothing"
    );
    let began = Instant::now();
    let (ok, out) = kvsup(&c, &["apply", "-f", &m]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("rolling change") && out.contains(NEW_FLAG),
        "apply prints the plan: {out}"
    );
    let st = wait_change_over(&c, Duration::from_secs(180));
    let took = began.elapsed();
    assert_eq!(st["change"]["state"], "done", "{st:#}");
    load.more(100).await;
    let (acked, failed, pause) = load.finish().await;

    // Every node runs the new flag in a new process, on generation 2.
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    for (name, pid) in node_pids(&st) {
        let old = old_pids.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_ne!(pid, old, "{name} was not restarted");
        assert!(
            cmdline(pid).iter().any(|a| a == NEW_FLAG),
            "{name}: {:?}",
            cmdline(pid)
        );
    }
    for n in st["nodes"].as_array().unwrap() {
        assert_eq!(n["generation"], 2, "{n:#}");
    }
    let mut done: Vec<String> = serde_json::from_value(st["change"]["nodes_done"].clone()).unwrap();
    assert_eq!(
        done.pop().as_deref(),
        Some(first_primary.as_str()),
        "the old primary goes last: {st:#}"
    );
    // The primary moved by a planned switchover, never by a failover.
    assert_ne!(
        st["primary"].as_str(),
        Some(first_primary.as_str()),
        "{st:#}"
    );
    let ev = events(&c);
    assert!(ev.contains("planned switchover"), "{ev}");
    assert_eq!(c.metric("kvsup_failovers_total").unwrap(), 0.0, "{ev}");
    assert!(
        c.metrics()
            .unwrap()
            .contains("kvsup_changes_total{kind=\"rolling\",result=\"ok\"} 1"),
        "{}",
        c.metrics().unwrap()
    );
    assert_nothing_lost(&c, &acked).await;
    eprintln!(
        "rolling kvdArgs change of 3 nodes: {} ms; {} writes acknowledged, {failed} failed; \
         longest write pause of any of 16 writers: {} ms",
        took.as_millis(),
        acked.len(),
        pause.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kvd_binary_rolls_onto_every_node() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    // A second kvd file: a copy of the built one at another path.
    let v2 = tmp.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    let kvd2 = v2.join("kvd");
    std::fs::copy(bin("kvd"), &kvd2).unwrap();
    let load = Load::start(&c, 16);
    load.more(50).await;

    let k = kvd2.display().to_string();
    let (ok, out) = kvsup(
        &c,
        &[
            "apply",
            "--kvd",
            &k,
            "-f",
            &c.manifest.display().to_string(),
        ],
    )
    .await;
    assert!(ok && out.contains("kvd binary"), "{out}");
    let st = wait_change_over(&c, Duration::from_secs(180));
    assert_eq!(st["change"]["state"], "done", "{st:#}");
    load.more(50).await;
    let (acked, _, pause) = load.finish().await;
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    for (name, pid) in node_pids(&st) {
        assert_eq!(exe(pid), kvd2, "{name} (pid {pid}) runs another binary");
    }
    assert_nothing_lost(&c, &acked).await;
    // The same manifest and binary again: nothing to do.
    let (ok, out) = kvsup(
        &c,
        &[
            "apply",
            "--kvd",
            &k,
            "-f",
            &c.manifest.display().to_string(),
        ],
    )
    .await;
    assert!(ok && out.contains("unchanged"), "{out}");
    eprintln!(
        "rolling binary change: longest write pause {} ms",
        pause.as_millis()
    );
}

/// A "kvd" that fails to start node `fail` while `marker` exists, and
/// runs the real kvd otherwise.
fn wrapper(dir: &Path, fail: &str, marker: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("kvd-wrapper");
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" --node-id {fail} \"*) if [ -e '{}' ]; then echo \
         \"wrapper: {fail} refuses to start\" >&2; exit 1; fi;; esac\nexec '{}' \"$@\"\n",
        marker.display(),
        bin("kvd").display()
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_stops_the_rollout_and_is_put_back() {
    let tmp = TempDir::new().unwrap();
    let c =
        Arc::new(Supervised::apply(tmp.path(), 3, "  rollout: {readyTimeoutMs: 5000}\n").unwrap());
    let before = c.wait_ready(Duration::from_secs(30)).unwrap();
    let primary = before["primary"].as_str().unwrap().to_string();
    // The first node restarted: the first secondary in the list.
    let fail = c
        .nodes
        .iter()
        .map(|(n, _)| n.clone())
        .find(|n| *n != primary)
        .unwrap();
    let old_pids = node_pids(&before);
    let marker = tmp.path().join("fail-marker");
    std::fs::write(&marker, "").unwrap();
    let w = wrapper(tmp.path(), &fail, &marker).display().to_string();
    let load = Load::start(&c, 16);
    load.more(50).await;

    let m = c.manifest.display().to_string();
    let (ok, out) = kvsup(&c, &["apply", "--kvd", &w, "-f", &m]).await;
    assert!(ok, "{out}");
    // While it runs, any other change is refused.
    let other = manifest(
        &c,
        "other.yaml",
        &with_spec(&c, "  kvdArgs: [\"--max-bulk-items=7\"]\n"),
    );
    let (ok, out) = kvsup(&c, &["apply", "-f", &other]).await;
    assert!(
        !ok && out.contains("a change is in progress: rolling"),
        "{out}"
    );

    let st = wait_change_over(&c, Duration::from_secs(120));
    assert_eq!(st["change"]["state"], "failed", "{st:#}");
    let reason = st["change"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&fail) && reason.contains("refuses to start"),
        "{st:#}"
    );
    let ev = events(&c);
    assert!(ev.contains(&format!("{fail} did not come back")), "{ev}");
    // The failed node is back on its old binary and healthy; the others
    // were never touched.
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    for (name, pid) in node_pids(&st) {
        let old = old_pids.iter().find(|(n, _)| *n == name).unwrap().1;
        if name == fail {
            assert_ne!(pid, old, "{name}");
            assert_eq!(exe(pid), bin("kvd").canonicalize().unwrap(), "{name}");
        } else {
            assert_eq!(pid, old, "{name} was restarted");
        }
    }
    let row = c.node_status(&fail).unwrap();
    assert_eq!(
        (row["generation"].as_u64(), row["healthy"].as_bool()),
        (Some(1), Some(true)),
        "{row:#}"
    );
    load.more(50).await;

    // Fixed, the same apply resumes it with the nodes not yet on it.
    std::fs::remove_file(&marker).unwrap();
    let (ok, out) = kvsup(&c, &["apply", "--kvd", &w, "-f", &m]).await;
    assert!(ok && out.contains("rolling change"), "{out}");
    let st = wait_change_over(&c, Duration::from_secs(180));
    assert_eq!(st["change"]["state"], "done", "{st:#}");
    load.more(50).await;
    let (acked, failed, pause) = load.finish().await;
    assert_nothing_lost(&c, &acked).await;
    eprintln!(
        "failed and resumed rollout: {} writes acknowledged, {failed} failed, longest pause {} ms",
        acked.len(),
        pause.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_apply_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    let before = c.status().unwrap();
    let text = std::fs::read_to_string(&c.manifest).unwrap();
    let (_, port) = c.nodes[2].clone();
    // An existing node's port edited, together with a kvdArgs change.
    let edited = text.replace(&format!("port: {port}"), &format!("port: {}", port + 1))
        + "  kvdArgs: [\"--max-bulk-items=7\"]\n";
    let m = manifest(&c, "edited.yaml", &edited);
    let (ok, out) = kvsup(&c, &["apply", "-f", &m]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("an existing node's port") && out.contains("remove it and add"),
        "{out}"
    );
    let after = c.status().unwrap();
    assert_eq!(node_pids(&after), node_pids(&before));
    assert_eq!(after["manifest"], before["manifest"]);
    assert_eq!(after["change"], Value::Null);
    assert_eq!(after["generation"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masterless_cluster_rolls_in_order_losing_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "  mode: masterless\n").unwrap());
    let old_pids = node_pids(&c.status().unwrap());
    let load = Load::start(&c, 16);
    load.more(100).await;
    let m = manifest(
        &c,
        "rolled.yaml",
        &with_spec(&c, &format!("  kvdArgs: [\"{NEW_FLAG}\"]\n")),
    );
    let (ok, out) = kvsup(&c, &["apply", "-f", &m]).await;
    assert!(ok && out.contains("rolling change"), "{out}");
    let st = wait_change_over(&c, Duration::from_secs(180));
    assert_eq!(st["change"]["state"], "done", "{st:#}");
    let order: Vec<String> = serde_json::from_value(st["change"]["nodes_done"].clone()).unwrap();
    assert_eq!(order, ["n0", "n1", "n2"], "{st:#}");
    load.more(100).await;
    let (acked, failed, pause) = load.finish().await;
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    for (name, pid) in node_pids(&st) {
        let old = old_pids.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_ne!(pid, old, "{name} was not restarted");
        assert!(cmdline(pid).iter().any(|a| a == NEW_FLAG), "{name}");
    }
    assert_nothing_lost(&c, &acked).await;
    eprintln!(
        "masterless rolling change: {} writes acknowledged, {failed} failed, longest pause {} ms",
        acked.len(),
        pause.as_millis()
    );
}
