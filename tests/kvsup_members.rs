//! Adding and removing nodes of a running primary/secondary cluster by
//! editing its manifest, end to end with real kvsup and kvd: 3 -> 5 -> 3
//! under the chaos clients (the primary among the nodes removed), commit
//! following the voters of the configuration at 5, and bad edits refused
//! with nothing changed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvstore_testkit::chaos::{final_reads, lost_writes, Clients, Endpoints, Progress, RECOVERY};
use kvstore_testkit::linearizability::check;
use kvstore_testkit::sup::{manifest_text, Supervised};
use kvstore_testkit::sup_change::{events, kvsup, manifest, wait_change_over, wait_same_digests};
use kvstore_testkit::{free_port, http_get, wait_until};
use serde_json::Value;
use tempfile::TempDir;

/// Writes refused by a primary that cannot commit come back within 2 s.
const EXTRA: &str = "  kvdArgs: [\"--commit-timeout-ms=2000\"]\n";

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Writes the cluster's manifest with node list `nodes` as `name`.
fn with_nodes(c: &Supervised, name: &str, nodes: &[(String, u16)], extra: &str) -> String {
    manifest(c, name, &manifest_text("test", nodes, c.sup_port, extra))
}

/// Applies manifest `m` and waits for its node change to end, then until
/// the status shows `voters` voters, no learner, and every node a voter
/// (the health checks see each node's next status); that status.
async fn change_nodes(c: &Arc<Supervised>, m: &str, voters: usize) -> Value {
    let (ok, out) = kvsup(c, &["apply", "-f", m]).await;
    assert!(ok, "{out}");
    assert!(out.contains("spec.nodes:"), "apply prints the plan: {out}");
    let st = wait_change_over(c, Duration::from_secs(180));
    assert_eq!(st["change"]["state"], "done", "{st:#}\n{}", events(c));
    let mut last = Value::Null;
    let settled = wait_until(Duration::from_secs(20), || {
        last = c.status().unwrap();
        let config = &last["config"];
        last["conditions"]["Ready"] == true
            && config["voters"].as_array().map(Vec::len) == Some(voters)
            && config["learners"].as_array().is_some_and(Vec::is_empty)
            && last["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["voter"] == true)
    });
    assert!(settled, "{last:#}");
    last
}

/// The names in the status, in order.
fn names(st: &Value) -> Vec<String> {
    st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the clients have `n` more acknowledged writes than now.
fn more_writes(p: &Progress, n: u64) {
    let now = || p.puts.load(Ordering::Relaxed) + p.bulks.load(Ordering::Relaxed);
    let target = now() + n;
    assert!(
        wait_until(Duration::from_secs(60), || now() >= target),
        "the clients' writes stalled at {}",
        now()
    );
}

/// A status code of `PUT key` on the node at `port` (the node's own commit
/// wait bounds it).
async fn put(port: u16, key: &str) -> u16 {
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/kv/{key}", url(port)))
        .body("x")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

fn port_of(nodes: &[(String, u16)], name: &str) -> u16 {
    nodes.iter().find(|(n, _)| n == name).unwrap().1
}

/// With 5 voters, two secondaries stopped still leave a majority: a write
/// commits. A third stopped leaves none: a write is not committed (nor
/// readable on the primary) until they are continued.
async fn commit_follows_five_voters(c: &Supervised, nodes: &[(String, u16)]) {
    let st = c.wait_ready(RECOVERY).unwrap();
    let primary = st["primary"].as_str().unwrap().to_string();
    let secondaries: Vec<String> = names(&st).into_iter().filter(|n| *n != primary).collect();
    let pport = port_of(nodes, &primary);
    c.signal(&secondaries[0], "STOP").unwrap();
    c.signal(&secondaries[1], "STOP").unwrap();
    assert_eq!(put(pport, "quorum/two-stopped").await, 200);
    c.signal(&secondaries[2], "STOP").unwrap();
    assert_eq!(put(pport, "quorum/three-stopped").await, 503);
    let (code, _) = http_get(pport, "/v1/kv/quorum/three-stopped", Duration::from_secs(2)).unwrap();
    assert_eq!(code, 404, "a write 2 of 5 voters hold is not committed");
    for s in &secondaries[..3] {
        c.signal(s, "CONT").unwrap();
    }
    c.wait_ready(RECOVERY).unwrap();
}

fn pid_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Removes node `name` by editing the manifest; checks it left the
/// configuration, was stopped, and kept its data dir.
async fn remove(c: &Arc<Supervised>, nodes: &mut Vec<(String, u16)>, name: &str) {
    let pid = c.node_status(name).unwrap()["pid"].as_u64().unwrap();
    nodes.retain(|(n, _)| n != name);
    let m = with_nodes(c, &format!("without-{name}.yaml"), nodes, EXTRA);
    let st = change_nodes(c, &m, nodes.len()).await;
    assert!(!names(&st).contains(&name.to_string()), "{st:#}");
    assert_ne!(st["primary"].as_str(), Some(name), "{st:#}");
    assert!(wait_until(Duration::from_secs(10), || !pid_alive(pid)));
    assert!(c.state_dir.join(name).join("data").join("meta").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_to_five_to_three_under_the_chaos_clients_loses_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, EXTRA).unwrap());
    let mut nodes = c.nodes.clone();
    let added: Vec<(String, u16)> = ["n3", "n4"]
        .iter()
        .map(|n| (n.to_string(), free_port()))
        .collect();
    // The clients know every node that will ever be: the added ones
    // refuse connections until they run, the removed ones once stopped.
    let urls: Vec<String> = nodes.iter().chain(&added).map(|(_, p)| url(*p)).collect();
    let to = Endpoints::plain(urls);
    let clients = Clients::spawn(&to);
    let (start, progress) = (clients.start, clients.progress.clone());
    let p = progress.clone();
    tokio::task::spawn_blocking(move || more_writes(&p, 50))
        .await
        .unwrap();

    for new in &added {
        nodes.push(new.clone());
        let m = with_nodes(&c, &format!("with-{}.yaml", new.0), &nodes, EXTRA);
        let st = change_nodes(&c, &m, nodes.len()).await;
        assert_eq!(names(&st).last(), Some(&new.0), "{st:#}");
        let p = progress.clone();
        tokio::task::spawn_blocking(move || more_writes(&p, 50))
            .await
            .unwrap();
    }
    let st = c.status().unwrap();
    assert_eq!(
        st["config"]["voters"].as_array().unwrap().len(),
        5,
        "{st:#}"
    );
    assert_eq!(c.metric("kvsup_config_voters").unwrap(), 5.0);
    commit_follows_five_voters(&c, &nodes).await;

    // Down to 3: the primary first, then one of the first nodes.
    let primary = c.wait_ready(RECOVERY).unwrap()["primary"]
        .as_str()
        .unwrap()
        .to_string();
    remove(&c, &mut nodes, &primary).await;
    let next = ["n0", "n1", "n2"]
        .into_iter()
        .find(|n| *n != primary)
        .unwrap();
    remove(&c, &mut nodes, next).await;
    let p = progress.clone();
    tokio::task::spawn_blocking(move || more_writes(&p, 50))
        .await
        .unwrap();

    let mut history = clients.finish().await;
    c.wait_ready(RECOVERY).unwrap();
    let finals = final_reads(&to, start, &mut history).await;
    let lost = lost_writes(&history, &finals);
    let report = check(&history);
    let ev = events(&c);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}\n{ev}");
    assert!(report.ok(), "{report:?}\n{ev}");
    wait_same_digests(&c);
    let metrics = c.metrics().unwrap();
    for (kind, n) in [("add_node", 2), ("remove_node", 2)] {
        let line = format!("kvsup_changes_total{{kind=\"{kind}\",result=\"ok\"}} {n}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert_eq!(c.metric("kvsup_failovers_total").unwrap(), 0.0, "{ev}");
    assert!(ev.contains("planned switchover"), "{ev}");
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "3 -> 5 -> 3 (removed {primary}, the primary, and {next}): {} operations, {} puts, \
         {} unknown outcomes, {} keys checked, 0 lost, 0 violations",
        history.len(),
        count(&progress.puts),
        count(&progress.unknown),
        report.keys
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_edits_are_refused_and_change_nothing() {
    let tmp = TempDir::new().unwrap();
    let extra = "  rollout: {readyTimeoutMs: 10000}\n";
    let c = Arc::new(Supervised::apply(tmp.path(), 3, extra).unwrap());
    let before = c.status().unwrap();
    let pids = |st: &Value| -> HashMap<String, Value> {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["name"].as_str().unwrap().to_string(), n["pid"].clone()))
            .collect()
    };
    let unchanged = |what: &str| {
        let after = c.status().unwrap();
        assert_eq!(pids(&after), pids(&before), "{what}");
        assert_eq!(after["config"], before["config"], "{what}");
        assert_eq!(after["manifest"], before["manifest"], "{what}");
    };
    let nodes = c.nodes.clone();
    let refused = |name: &str, list: Vec<(String, u16)>| {
        let m = with_nodes(&c, name, &list, extra);
        let c = c.clone();
        async move {
            let (ok, out) = kvsup(&c, &["apply", "-f", &m]).await;
            assert!(!ok, "{out}");
            out
        }
    };

    let mut two = nodes.clone();
    two.push(("n3".into(), free_port()));
    two.push(("n4".into(), free_port()));
    let out = refused("two.yaml", two).await;
    assert!(out.contains("add or remove one node per apply"), "{out}");
    unchanged("two nodes added at once");

    let out = refused("majority.yaml", nodes[..1].to_vec()).await;
    assert!(out.contains("would remove a majority"), "{out}");
    unchanged("a majority removed at once");

    // A node whose data dir holds data was a member once: refused.
    std::fs::create_dir_all(c.state_dir.join("n5").join("data").join("wal")).unwrap();
    let mut old = nodes.clone();
    old.push(("n5".into(), free_port()));
    let out = refused("old.yaml", old).await;
    assert!(out.contains("holds data"), "{out}");
    unchanged("a node with an old data dir");

    // A change while another runs: an external node that never answers
    // (a listener held here, which accepts and says nothing) keeps its
    // addition waiting, so the next edit finds it in progress.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let text = manifest_text("test", &nodes, c.sup_port, extra).replace(
        "  supervisor:",
        &format!("    - {{name: n6, port: {port}, runtime: external}}\n  supervisor:"),
    );
    let m = manifest(&c, "external.yaml", &text);
    let (ok, out) = kvsup(&c, &["apply", "-f", &m]).await;
    assert!(ok, "{out}");
    let out = refused("during.yaml", nodes[..2].to_vec()).await;
    assert!(
        out.contains("a change is in progress: add_node"),
        "{out}\n{}",
        events(&c)
    );
    // It fails at the ready timeout and is undone.
    let st = wait_change_over(&c, Duration::from_secs(60));
    assert_eq!(st["change"]["state"], "failed", "{st:#}");
    let reason = st["change"]["reason"].as_str().unwrap();
    assert!(reason.contains("n6 not healthy"), "{reason}");
    assert_eq!(names(&st), ["n0", "n1", "n2"], "{st:#}");
    unchanged("an addition that failed");
    drop(silent);
    let metrics = c.metrics().unwrap();
    assert!(
        metrics.contains("kvsup_changes_total{kind=\"add_node\",result=\"failed\"} 1"),
        "{metrics}"
    );
    // The cluster still takes writes.
    let (_, p) = nodes
        .iter()
        .find(|(n, _)| Some(n.as_str()) == c.primary().as_deref())
        .cloned()
        .unwrap();
    assert_eq!(put(p, "after").await, 200);
}
