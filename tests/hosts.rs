//! A secured cluster across test hosts (network namespaces, `testkit::hosts`):
//! three kvd nodes run from the systemd units `kvsup render systemd` wrote,
//! each in its own host on its own address, and kvsup in a fourth host
//! supervising them as `runtime: external` nodes over mutual TLS with
//! tokens. Partitions are links taken down.
//!
//! - A SIGKILLed primary is failed over and writes are acknowledged again
//!   (how fast: `benches/hosts.rs`); a primary whose host is cut off
//!   acknowledges nothing while the majority elects and takes writes, and
//!   after the heal it steps down and the nodes converge.
//! - kvsup cut off from every node elects nobody, the nodes keep serving,
//!   and on its return it adopts the primary it finds.
//! - Masterless: a host cut off while both sides take writes converges
//!   after the heal (`KVSTORE_HOSTS_CUT_SECS`, default 30).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvstore_testkit::chaos::Endpoints;
use kvstore_testkit::env_u64;
use kvstore_testkit::host_cluster::{HostCluster, SUP_HOST};
use nix::sys::signal::Signal;
use tempfile::TempDir;

/// A writer that keeps setting keys `<prefix><n>` through a retrying
/// client until stopped; what was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(to: &Endpoints, prefix: &str) -> Writer {
        let kv = to
            .builder(&to.urls)
            .request_timeout(Duration::from_secs(1))
            .retry_deadline(Duration::from_secs(5))
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, a, prefix) = (stop.clone(), acked.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let (k, v) = (format!("{prefix}{n}"), format!("v{n}"));
                if kv.set(&k, v.clone()).await.is_ok() {
                    a.lock().unwrap().insert(k, v);
                }
            }
        });
        Writer { stop, acked, task }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Polls `cond` every 50 ms for at most `timeout`.
async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Single attempts, rotating over the nodes, until one write is
/// acknowledged; how long that took.
async fn first_ack(to: &Endpoints, key: &str, timeout: Duration) -> Option<Duration> {
    let began = Instant::now();
    let mut i = 0;
    while began.elapsed() < timeout {
        if to.single_attempt(i).set(key, "x").await.is_ok() {
            return Some(began.elapsed());
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A client that retries for up to 30 s.
fn patient(to: &Endpoints) -> kvclient::Client {
    to.builder(&to.urls)
        .retry_deadline(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Every acknowledged write reads back with its value (linearizably with
/// `consistent`; masterless nodes answer from what they hold).
async fn all_present(to: &Endpoints, acked: &BTreeMap<String, String>, consistent: bool) {
    let kv = patient(to);
    let mut lost = Vec::new();
    for (k, v) in acked {
        let got = if consistent {
            kv.get_consistent(k).await
        } else {
            kv.get(k).await
        }
        .unwrap();
        if got.as_deref() != Some(v.as_bytes()) {
            lost.push(k.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
}

fn failovers(c: &HostCluster) -> usize {
    let events = c.events().unwrap();
    events.iter().filter(|e| e["kind"] == "failover").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_hosts_a_killed_primary_fails_over_and_a_cut_off_one_acknowledges_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = HostCluster::start(tmp.path(), 3, "primary-secondary", "").unwrap();
    let to = c.endpoints().unwrap();
    let writer = Writer::start(&to, "w");

    // SIGKILL of the primary's process (its service starts it again, as
    // systemd would, a second later).
    let p = c.primary().await.expect("a primary");
    let epoch = c.node_status(&p).await.unwrap()["epoch"].as_u64().unwrap();
    c.hosts.signal(&p, Signal::SIGKILL).unwrap();
    let took = first_ack(&to, "after-kill", Duration::from_secs(30)).await;
    eprintln!("hosts: {p} SIGKILLed; first acknowledged write after {took:?}");
    assert!(took.is_some(), "no write acknowledged after the kill");
    assert!(c.wait_ready(Duration::from_secs(60)).is_ok());
    let p2 = c.primary().await.expect("a new primary");
    let now = c.node_status(&p2).await.unwrap()["epoch"].as_u64().unwrap();
    assert!(
        now > epoch,
        "no new epoch after the kill ({p2} leads epoch {now})"
    );
    assert!(c.hosts.restarts(&p) >= 1, "{p} was not restarted");
    // The killed node is back, as a secondary unless it was elected again
    // (it may be the most up to date once restarted).
    let rejoined = eventually(Duration::from_secs(60), || async {
        c.node_status(&p)
            .await
            .is_ok_and(|s| s["epoch"].as_u64() >= Some(now))
    })
    .await;
    let log = std::fs::read_to_string(tmp.path().join(format!("{p}.log"))).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    assert!(rejoined, "{p} did not rejoin; its log ends: {tail:#?}");
    eprintln!("hosts: {p2} leads epoch {now} (was {p} in epoch {epoch}); {p} rejoined");

    // The primary's host cut off: it acknowledges nothing, the others elect.
    let before = c.node_status(&p2).await.unwrap()["epoch"].as_u64().unwrap();
    c.hosts.cut(&p2).unwrap();
    let url = c.url(&p2);
    let mut far_acks = 0;
    for i in 0..5 {
        let key = format!("far-{i}");
        let args = ["--retries", "0", "--timeout-ms", "1500", "set", &key, "x"];
        let (st, out) = c.kvclient_in(&p2, &url, &args).unwrap();
        eprintln!(
            "hosts: write to the cut-off {p2} from its own host: {st}: {}",
            out.trim()
        );
        far_acks += usize::from(st.success());
    }
    let took = first_ack(&to, "majority", Duration::from_secs(30)).await;
    eprintln!("hosts: {p2} cut off; majority side acknowledged a write after {took:?}");
    assert_eq!(far_acks, 0, "the cut-off primary acknowledged writes");
    assert!(took.is_some(), "the majority side took no write");
    let p3 = c.primary().await.expect("a primary on the majority side");
    assert_ne!(p3, p2);

    // Healed: the old primary learns the newer epoch and steps down.
    c.hosts.heal(&p2).unwrap();
    let stepped = eventually(Duration::from_secs(30), || async {
        c.node_status(&p2).await.is_ok_and(|s| {
            s["role"] == "secondary" && s["epoch"].as_u64().is_some_and(|e| e > before)
        })
    })
    .await;
    assert!(stepped, "{p2} did not step down after the heal");
    let acked = writer.finish().await;
    eprintln!("hosts: {} writes acknowledged in all", acked.len());
    let digest = c.converged(Duration::from_secs(30)).await.unwrap();
    eprintln!("hosts: converged, digest {digest}");
    all_present(&to, &acked, true).await;
    // What the cut-off primary took was never committed: it is gone.
    let kv = patient(&to);
    for i in 0..5 {
        let far = kv.get_consistent(&format!("far-{i}")).await.unwrap();
        assert_eq!(far, None, "far-{i} survived the heal");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_hosts_a_cut_off_supervisor_elects_nobody_and_adopts_what_it_finds() {
    let tmp = TempDir::new().unwrap();
    let c = HostCluster::start(tmp.path(), 3, "primary-secondary", "").unwrap();
    let to = c.endpoints().unwrap();
    let p = c.primary().await.expect("a primary");
    let epoch = c.node_status(&p).await.unwrap()["epoch"].clone();
    let elections = failovers(&c);
    let writer = Writer::start(&to, "w");

    c.hosts.cut(SUP_HOST).unwrap();
    let cut_at = writer.count();
    // kvsup sees every node fail...
    let blind = kvstore_testkit::wait_until(Duration::from_secs(30), || {
        c.status().is_ok_and(|s| {
            s["nodes"]
                .as_array()
                .is_some_and(|ns| ns.iter().all(|n| n["healthy"] == false))
        })
    });
    assert!(blind, "kvsup still saw the nodes through the cut");
    // ...while the nodes keep serving: writes go on being acknowledged.
    let served = eventually(Duration::from_secs(30), || async {
        writer.count() >= cut_at + 200
    })
    .await;
    assert!(served, "the nodes stopped serving while kvsup was cut off");
    // The cut lasts a few patiences (200 ms x 3) longer: the fault itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.hosts.heal(SUP_HOST).unwrap();

    let status = c.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(status["primary"], p.as_str(), "{status:#}");
    assert_eq!(c.node_status(&p).await.unwrap()["epoch"], epoch);
    assert_eq!(
        failovers(&c),
        elections,
        "kvsup elected while cut off or after"
    );
    let events = c.events().unwrap();
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("no node answers"))),
        "kvsup did not say it saw no node: {events:#?}"
    );
    let acked = writer.finish().await;
    c.converged(Duration::from_secs(30)).await.unwrap();
    all_present(&to, &acked, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_hosts_a_masterless_host_cut_off_converges_after_the_heal() {
    let secs = env_u64("KVSTORE_HOSTS_CUT_SECS", 30);
    let tmp = TempDir::new().unwrap();
    let c = HostCluster::start(tmp.path(), 3, "masterless", "").unwrap();
    let mut to = c.endpoints().unwrap();
    let off = "n2";
    to.urls.retain(|u| *u != c.url(off));
    let writer = Writer::start(&to, "w");
    c.hosts.cut(off).unwrap();
    // The cut-off host takes writes of its own, through its own node.
    let url = c.url(off);
    let began = Instant::now();
    let mut far = BTreeMap::new();
    let mut n = 0;
    while began.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let (k, v) = (format!("far-{n}"), format!("v{n}"));
        let (st, out) = c.kvclient_in(off, &url, &["set", &k, &v]).unwrap();
        assert!(
            st.success(),
            "masterless {off} refused a local write: {out}"
        );
        far.insert(k, v);
    }
    let mut acked = writer.finish().await;
    eprintln!(
        "hosts: {off} cut off {:?}: {} writes on the majority side, {} on {off}",
        began.elapsed(),
        acked.len(),
        far.len()
    );
    assert!(acked.len() >= 100 && !far.is_empty());
    c.hosts.heal(off).unwrap();
    let healed = Instant::now();
    let digest = c.converged(Duration::from_secs(60)).await.unwrap();
    eprintln!(
        "hosts: converged {:?} after the heal, digest {digest}",
        healed.elapsed()
    );
    acked.extend(far);
    // Equal digests: what one node holds, every node holds.
    all_present(&to, &acked, false).await;
}
