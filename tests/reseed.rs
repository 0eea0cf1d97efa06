//! A node whose data dir is deleted while it runs: kvd says
//! `data_dir_lost` and refuses writes; kvsup re-seeds it (stops it, starts
//! it on a fresh data dir with `--rejoin`: a secondary that the primary
//! catches up, and that votes again only once it holds the primary's
//! commit index), and it rejoins as the same member. Under 16 writers, for
//! a secondary and then for the primary: 0 acknowledged writes lost, equal
//! digests. (A data dir that holds data is never started as fresh:
//! `launch::start_kind`'s unit tests.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvstore_testkit::sup::Supervised;
use kvstore_testkit::wait_until;
use serde_json::Value;
use tempfile::TempDir;

const WRITERS: usize = 16;

struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(urls: &[String]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = (0..WRITERS)
            .map(|w| {
                let kv = kvclient::Client::builder()
                    .endpoints(urls.to_vec())
                    .request_timeout(Duration::from_secs(1))
                    .retry_deadline(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let (stop, acked) = (stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (k, v) = (format!("w{w}-{n}"), format!("v{n}"));
                        if kv.set(&k, v.clone()).await.is_ok() {
                            acked.lock().unwrap().insert(k, v);
                        }
                    }
                })
            })
            .collect();
        Writers { stop, acked, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

fn events(c: &Supervised) -> Vec<Value> {
    let (_, body) = c.sup_get("/v1/events").unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["events"].as_array().cloned().unwrap_or_default()
}

fn reseeds_of(c: &Supervised, node: &str) -> usize {
    events(c)
        .iter()
        .filter(|e| e["kind"] == "reseed" && e["node"] == node)
        .count()
}

/// Deletes `node`'s data dir under the running kvd, then waits until kvsup
/// has re-seeded it, the node is healthy and caught up (not rejoining),
/// and the writers got on with at least 200 more writes.
fn lose_and_reseed(c: &Supervised, w: &Writers, node: &str) {
    let before = reseeds_of(c, node);
    let dir = c.state_dir.join(node).join("data");
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("reseed: deleted {}", dir.display());
    let reseeded = wait_until(Duration::from_secs(30), || reseeds_of(c, node) > before);
    assert!(reseeded, "kvsup did not re-seed {node}: {:#?}", events(c));
    let mut last = Value::Null;
    let back = wait_until(Duration::from_secs(60), || {
        c.node_status(node).is_ok_and(|s| {
            let ok = s["healthy"] == true;
            last = s;
            ok
        }) && kvstore_testkit::http_get(port(c, node), "/v1/status", Duration::from_secs(2))
            .ok()
            .and_then(|(code, body)| (code == 200).then_some(body))
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["rejoining"] == false && s["storage_state"] == "ok")
    });
    assert!(back, "{node} did not rejoin: {last:#}");
    let at = w.count();
    assert!(
        wait_until(Duration::from_secs(30), || w.count() >= at + 200),
        "writes stopped after {node} was re-seeded"
    );
    assert!(dir.join("meta").exists(), "{node} has no data dir again");
}

fn port(c: &Supervised, node: &str) -> u16 {
    c.nodes.iter().find(|(n, _)| n == node).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_data_dir_is_deleted_is_reseeded_and_rejoins_losing_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, "").unwrap());
    let w = Writers::start(&c.urls());
    assert!(wait_until(Duration::from_secs(30), || w.count() >= 500));

    let primary = c.primary().unwrap();
    let secondary = c
        .nodes
        .iter()
        .map(|(n, _)| n.clone())
        .find(|n| *n != primary)
        .unwrap();
    let c2 = c.clone();
    let w = tokio::task::spawn_blocking(move || {
        lose_and_reseed(&c2, &w, &secondary);
        let primary = c2.primary().unwrap();
        lose_and_reseed(&c2, &w, &primary);
        w
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(c.state_dir.join(format!("{primary}.log"))).unwrap();
    assert!(
        log.contains("rejoining with a fresh data dir"),
        "{primary} was not started with --rejoin"
    );

    let acked = w.finish().await;
    eprintln!("reseed: {} writes acknowledged", acked.len());
    let c4 = c.clone();
    tokio::task::spawn_blocking(move || c4.wait_converged(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let kv = kvclient::Client::builder()
        .endpoints(c.urls())
        .retry_deadline(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut lost = Vec::new();
    for (k, v) in &acked {
        if kv.get_consistent(k).await.unwrap().as_deref() != Some(v.as_bytes()) {
            lost.push(k.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
}
