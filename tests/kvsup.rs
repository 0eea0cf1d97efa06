//! kvsup end to end: real `kvsup apply` starting a real supervisor daemon
//! and real kvd nodes on free loopback ports, in temp dirs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::sup::{manifest_text, run_in, Supervised};
use kvstore_testkit::{free_port, wait_until};
use serde_json::Value;
use tempfile::TempDir;

fn roles(status: &Value) -> BTreeMap<String, String> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["role"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn pids(status: &Value) -> Vec<u64> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect()
}

fn alive(pid: u64) -> bool {
    kvsup::process::alive(pid as u32)
}

fn client(c: &Supervised) -> kvclient::Client {
    kvclient::Client::builder()
        .endpoints(c.urls())
        .request_timeout(Duration::from_secs(2))
        .retry_deadline(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// One acknowledged write: its key (also its value), when it was sent and
/// when it was acknowledged.
struct Acked {
    key: String,
    sent: Instant,
    done: Instant,
}

/// Writers setting new keys back to back through retrying clients, for an
/// operation that must not lose writes made while it runs.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    writers: Vec<tokio::task::JoinHandle<(Vec<Acked>, usize)>>,
}

impl Load {
    fn start(c: &Supervised, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let writers = (0..writers)
            .map(|w| {
                let (kv, stop, count) = (client(c), stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let (mut acked, mut failed) = (Vec::new(), 0);
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{i}");
                        let sent = Instant::now();
                        match kv.set(&key, key.clone()).await {
                            Ok(_) => {
                                let done = Instant::now();
                                acked.push(Acked { key, sent, done });
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => failed += 1,
                        }
                        i += 1;
                    }
                    (acked, failed)
                })
            })
            .collect();
        Load {
            stop,
            acked,
            writers,
        }
    }

    /// Waits until `n` more writes than so far are acknowledged.
    async fn more(&self, n: usize) {
        let target = self.acked.load(Ordering::Relaxed) + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::Relaxed) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} writes acknowledged, waiting for {target}",
                self.acked.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the writers: every acknowledged write, and how many failed.
    async fn finish(self) -> (Vec<Acked>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut failed) = (Vec::new(), 0);
        for w in self.writers {
            let (a, f) = w.await.unwrap();
            acked.extend(a);
            failed += f;
        }
        (acked, failed)
    }
}

/// Asserts that acknowledged writes were in flight while the operation
/// `what` ran from `from` to `to`: sent before it ended, acknowledged after
/// it began.
fn assert_overlapped(acked: &[Acked], what: &str, (from, to): (Instant, Instant)) {
    let during = acked
        .iter()
        .filter(|a| a.sent <= to && a.done >= from)
        .count();
    assert!(
        during > 0,
        "no acknowledged write overlapped {what} ({} acknowledged in all)",
        acked.len()
    );
}

#[test]
fn apply_brings_up_a_cluster_reapply_changes_nothing_and_down_stops_it() {
    let tmp = TempDir::new().unwrap();
    let mut c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let st = c.status().unwrap();
    let r = roles(&st);
    assert_eq!(r.values().filter(|r| *r == "primary").count(), 1, "{st:#}");
    assert_eq!(
        r.values().filter(|r| *r == "secondary").count(),
        2,
        "{st:#}"
    );
    assert!(st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["healthy"] == true));

    // The table names the primary and the conditions.
    let (ok, table) = c.kvsup(&["status"]).unwrap();
    assert!(ok.success(), "{table}");
    assert!(table.contains("Ready=true"), "{table}");
    assert!(
        table.contains("primary") && table.contains("secondary"),
        "{table}"
    );

    // Applying the same file again changes nothing: same processes.
    let before = pids(&st);
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(ok.success(), "{out}");
    assert!(out.contains("unchanged"), "{out}");
    let (ok, out) = c.kvsup(&["apply", "--dry-run"]).unwrap();
    assert!(ok.success() && out.contains("unchanged"), "{out}");
    let st = c.wait_ready(Duration::from_secs(10)).unwrap();
    assert_eq!(pids(&st), before);
    assert!(st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["restarts"] == 0));

    // A dry run of a change reports it and changes nothing.
    let edited = std::fs::read_to_string(&c.manifest).unwrap().replace(
        "stateDir: state",
        "stateDir: state\n  healthCheck: {intervalMs: 250}",
    );
    let other = tmp.path().join("edited.yaml");
    std::fs::write(&other, edited).unwrap();
    let (ok, out) = run_in(
        tmp.path(),
        "kvsup",
        &["apply", "--dry-run", "-f", other.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(ok.success() && out.contains("would change"), "{out}");
    assert!(out.contains("healthCheck"), "{out}");
    assert_eq!(c.status().unwrap()["health_check"]["intervalMs"], 200);

    let sup_pid = st["supervisor_pid"].as_u64().unwrap();
    let out = c.down().unwrap();
    assert!(out.contains("exited with status 0"), "{out}");
    for pid in before.iter().chain([&sup_pid]) {
        assert!(!alive(*pid), "pid {pid} still running after down: {out}");
    }
    assert!(c.status().is_err(), "the supervisor still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_is_replaced_restarted_and_rejoins() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let kv = client(&c);
    kv.set("before", "1").await.unwrap();
    let old = c.primary().unwrap();
    let failovers = c.metric("kvsup_failovers_total").unwrap();

    let (ok, out) = c.kvsup(&["kill", &old]).unwrap();
    assert!(ok.success(), "{out}");
    // A new primary takes writes through kvclient (which retries and
    // follows redirects); how fast is measured by benches/failover.rs.
    kv.set("after", "2").await.unwrap();
    let st = c.status().unwrap();
    let new = st["primary"].as_str().unwrap().to_string();
    assert_ne!(new, old, "{st:#}");

    // The killed node is restarted and comes back as a secondary.
    assert!(
        wait_until(Duration::from_secs(30), || {
            c.node_status(&old).is_ok_and(|n| {
                n["healthy"] == true && n["role"] == "secondary" && n["restarts"] == 1
            })
        }),
        "{:#}",
        c.status().unwrap()
    );
    assert_eq!(c.metric("kvsup_failovers_total").unwrap(), failovers + 1.0);
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert!(
        events.contains("failover") && events.contains("restart"),
        "{events}"
    );
    // Nothing acknowledged was lost, and the rejoined node has it all.
    assert_eq!(kv.get_consistent("before").await.unwrap().unwrap(), "1");
    assert_eq!(kv.get_consistent("after").await.unwrap().unwrap(), "2");
    wait_same_digests(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_moves_the_primary_under_load_without_losing_writes() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    let old = c.primary().unwrap();
    let target = ["n0", "n1", "n2"]
        .into_iter()
        .find(|n| *n != old)
        .unwrap()
        .to_string();
    let load = Load::start(&c, 8);
    load.more(50).await;
    let c2 = c.clone();
    let t2 = target.clone();
    let began = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || c2.kvsup(&["promote", &t2]).unwrap())
        .await
        .unwrap();
    let ended = Instant::now();
    assert!(ok.success(), "{out}");
    assert_eq!(c.primary().as_deref(), Some(target.as_str()));
    // Keep writing under the new primary, then stop.
    load.more(50).await;
    let (acked, _) = load.finish().await;
    assert_overlapped(&acked, "the switchover", (began, ended));
    let kv = client(&c);
    let mut lost = Vec::new();
    for a in &acked {
        let k = &a.key;
        if kv.get_consistent(k).await.unwrap().as_deref() != Some(k.as_bytes()) {
            lost.push(k.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert_eq!(c.metric("kvsup_switchovers_total").unwrap(), 1.0);
}

#[test]
fn an_edited_manifest_is_applied_without_a_new_apply() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 1, "").unwrap();
    assert_eq!(c.status().unwrap()["health_check"]["intervalMs"], 200);
    let text = std::fs::read_to_string(&c.manifest).unwrap();
    // Saved the way editors do: a new file renamed over the old one.
    let tmp_file = tmp.path().join(".cluster.yaml.swp");
    std::fs::write(
        &tmp_file,
        text.replace(
            "stateDir: state",
            "stateDir: state\n  healthCheck: {intervalMs: 300, failureThreshold: 4}",
        ),
    )
    .unwrap();
    std::fs::rename(&tmp_file, &c.manifest).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            c.status().is_ok_and(|s| {
                s["health_check"]["intervalMs"] == 300 && s["health_check"]["failureThreshold"] == 4
            })
        }),
        "{:#}",
        c.status().unwrap()
    );
    // A broken edit is not applied, and says why in the events.
    std::fs::write(&c.manifest, text.replace("kind: Cluster", "kind: Clutser")).unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        c.kvsup(&["events"])
            .is_ok_and(|(_, e)| e.contains("not applied") && e.contains("kind"))
    }));
    assert_eq!(c.status().unwrap()["health_check"]["intervalMs"], 300);
    assert!(c.wait_ready(Duration::from_secs(10)).is_ok());
}

#[test]
fn bad_manifests_are_refused_naming_the_field_and_start_nothing() {
    let nodes: Vec<(String, u16)> = (0..3).map(|i| (format!("n{i}"), free_port())).collect();
    let sup_port = free_port();
    let good = manifest_text("bad", &nodes, sup_port, "");
    let p1 = format!("port: {}", nodes[1].1);
    let p2 = format!("port: {}", nodes[2].1);
    let no_nodes: String = good
        .lines()
        .filter(|l| !l.contains("{name: n") && !l.contains("nodes:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cases = [
        (
            "unknown field",
            good.replace("stateDir: state", "stateDir: state\n  replicas: 3"),
            "replicas",
            Some(":6:"),
        ),
        (
            "duplicate port",
            good.replace(&p2, &p1),
            "spec.nodes[2].port",
            Some(":9:"),
        ),
        ("missing nodes", no_nodes, "nodes", None),
        (
            "wrong kind",
            good.replace("kind: Cluster", "kind: Deployment"),
            "kind",
            Some(":2:"),
        ),
    ];
    for (what, text, field, line) in cases {
        let tmp = TempDir::new().unwrap();
        let f = tmp.path().join("m.yaml");
        std::fs::write(&f, &text).unwrap();
        let (st, out) = run_in(
            tmp.path(),
            "kvsup",
            &["apply", "-f", f.to_str().unwrap()],
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(!st.success(), "{what}: accepted\n{text}");
        assert!(out.contains(field), "{what}: {out}");
        if let Some(l) = line {
            assert!(out.contains(l), "{what}: no line {l} in {out}");
        }
        assert!(!tmp.path().join("state").exists(), "{what}: state dir made");
        for p in nodes.iter().map(|n| n.1).chain([sup_port]) {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
                "{what}: something listens on {p}"
            );
        }
    }
}

/// Sends `sig` to the supervisor daemon of `c` (only that process: its
/// nodes are left alone); the node pids and the daemon's pid before it.
fn signal_supervisor(c: &Supervised, sig: nix::sys::signal::Signal) -> (Vec<u64>, u64) {
    let st = c.status().unwrap();
    let sup_pid = st["supervisor_pid"].as_u64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup_pid as i32), sig).unwrap();
    (pids(&st), sup_pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_supervisor_adopts_the_running_nodes() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let kv = client(&c);
    kv.set("k", "v").await.unwrap();
    // The supervisor dies; its nodes keep serving.
    let (before, sup_pid) = signal_supervisor(&c, nix::sys::signal::Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || !alive(sup_pid)));
    kv.set("k2", "v2").await.unwrap();

    // A new apply starts a new supervisor, which adopts them: same pids.
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(ok.success(), "{out}");
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(pids(&st), before, "{st:#}");
    assert_ne!(st["supervisor_pid"].as_u64().unwrap(), sup_pid);
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert_eq!(events.matches("adopt").count(), 3, "{events}");

    // An adopted primary that dies is still failed over and restarted.
    let old = c.primary().unwrap();
    c.kvsup(&["kill", &old]).unwrap();
    kv.set("k3", "v3").await.unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        c.node_status(&old)
            .is_ok_and(|n| n["healthy"] == true && n["role"] == "secondary")
    }));
    assert_ne!(c.primary().unwrap(), old);
    for (k, v) in [("k", "v"), ("k2", "v2"), ("k3", "v3")] {
        assert_eq!(kv.get_consistent(k).await.unwrap().unwrap(), v);
    }
}

/// SIGTERM stops the daemon alone: it ends every task it runs (none has to
/// be aborted), removes its pid file and exits, while its node keeps
/// serving; the next apply adopts the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_and_its_tasks_but_not_the_nodes() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 1, "").unwrap();
    let kv = client(&c);
    kv.set("k", "v").await.unwrap();
    let (before, sup_pid) = signal_supervisor(&c, nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(5), || !alive(sup_pid)),
        "the daemon still runs 5 s after SIGTERM"
    );
    assert!(!c.state_dir.join("kvsup.pid").exists());
    let log = std::fs::read_to_string(c.state_dir.join("kvsup.log")).unwrap();
    for line in [
        "supervisor stopping; nodes keep running",
        "daemon tasks stopped",
        "supervisor stopped",
    ] {
        assert!(log.contains(line), "no {line:?} in the log:\n{log}");
    }
    assert!(!log.contains("aborting"), "{log}");
    assert!(
        before.iter().all(|p| alive(*p)),
        "a node died with the daemon"
    );
    kv.set("k2", "v2").await.unwrap();

    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(ok.success(), "{out}");
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(pids(&st), before, "{st:#}");
    assert_eq!(kv.get("k2").await.unwrap().unwrap(), "v2");
}

#[test]
fn a_crashing_node_is_restarted_with_growing_capped_backoff() {
    let tmp = TempDir::new().unwrap();
    let nodes = vec![("n0".to_string(), free_port())];
    let sup_port = free_port();
    // An invalid flag value: kvd exits with status 2 at once, every time.
    let text = manifest_text(
        "crashy",
        &nodes,
        sup_port,
        "  restart: {backoffInitialMs: 50, backoffMaxMs: 400}\n  kvdArgs: [\"--snapshot-every-mib=0\"]\n",
    );
    let f = tmp.path().join("m.yaml");
    std::fs::write(&f, text).unwrap();
    let mut c = Supervised {
        dir: tmp.path().to_path_buf(),
        manifest: f,
        state_dir: tmp.path().join("state"),
        sup_port,
        nodes,
        down: false,
        tls: false,
    };
    let (ok, out) = c.kvsup(&["apply"]).unwrap();
    assert!(ok.success(), "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || {
            c.node_status("n0")
                .is_ok_and(|n| n["restarts"].as_u64().unwrap_or(0) >= 6)
        }),
        "{:#}",
        c.status().unwrap()
    );
    let n = c.node_status("n0").unwrap();
    assert_eq!(n["last_exit"], "exited with status 2", "{n:#}");
    assert_eq!(n["healthy"], false);
    let st = c.status().unwrap();
    assert_eq!(st["conditions"]["Ready"], false);
    assert_eq!(st["conditions"]["Degraded"], true);
    // Gaps between starts: at least 50, 100, 200, 400, 400 ms.
    let (_, ev) = c.kvsup(&["events", "--json"]).unwrap();
    let ev: Value = serde_json::from_str(&ev).unwrap();
    let starts: Vec<u64> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "spawn" || e["kind"] == "restart")
        .map(|e| e["time_ms"].as_u64().unwrap())
        .collect();
    let expected = [50, 100, 200, 400, 400];
    for (i, w) in starts.windows(2).take(expected.len()).enumerate() {
        assert!(
            w[1] - w[0] >= expected[i],
            "restart {} came {} ms after the previous start (backoff {} ms): {starts:?}",
            i + 1,
            w[1] - w[0],
            expected[i]
        );
    }
    c.down().unwrap();
}

/// Waits until every node shows the same content digest.
async fn wait_same_digests(c: &Supervised) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let digests: Vec<Value> = node_statuses(c)
            .await
            .into_iter()
            .map(|s| s["digest"].clone())
            .collect();
        if digests.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "digests differ: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every node's `/v1/status`.
async fn node_statuses(c: &Supervised) -> Vec<Value> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for u in c.urls() {
        let s: Value = http
            .get(format!("{u}/v1/status"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(s);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_another_mode_switches_the_live_cluster_and_back_losing_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    let load = Load::start(&c, 16);
    load.more(50).await;

    // A second manifest file, same cluster, mode masterless.
    let masterless = tmp.path().join("masterless.yaml");
    let text = std::fs::read_to_string(&c.manifest).unwrap();
    std::fs::write(
        &masterless,
        text.replace("stateDir: state", "stateDir: state\n  mode: masterless"),
    )
    .unwrap();
    let m = masterless.display().to_string();
    let c2 = c.clone();
    let began = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run_in(
            &c2.dir,
            "kvsup",
            &["apply", "-f", &m],
            Duration::from_secs(120),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let there = (began, Instant::now());
    assert!(ok.success() && out.contains("spec.mode"), "{out}");
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(st["mode"], "masterless", "{st:#}");
    assert!(st["primary"].is_null(), "{st:#}");
    for n in node_statuses(&c).await {
        assert_eq!(n["mode"], "masterless", "{n:#}");
    }
    load.more(50).await;

    // And back, by applying the original file again.
    let c2 = c.clone();
    let began = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || c2.kvsup(&["apply"]).unwrap())
        .await
        .unwrap();
    let back = (began, Instant::now());
    assert!(ok.success() && out.contains("spec.mode"), "{out}");
    let st = c.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(st["mode"], "primary-secondary", "{st:#}");
    assert!(st["primary"].is_string(), "{st:#}");
    load.more(50).await;
    let (acked, failed) = load.finish().await;
    assert_overlapped(&acked, "the switch to masterless", there);
    assert_overlapped(&acked, "the switch back", back);

    // Every node ends identical and holds every acknowledged write.
    wait_same_digests(&c).await;
    for url in c.urls() {
        let node = kvclient::Client::new([url.clone()]).unwrap();
        for Acked { key: k, .. } in &acked {
            assert_eq!(
                node.get(k).await.unwrap().as_deref(),
                Some(k.as_bytes()),
                "{k} missing on {url}"
            );
        }
    }
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert_eq!(events.matches("writes paused").count(), 2, "{events}");
    assert_eq!(c.metric("kvsup_mode_switches_total").unwrap(), 2.0);
    eprintln!(
        "mode switch there and back: {} writes acknowledged, {failed} failed",
        acked.len()
    );
}
