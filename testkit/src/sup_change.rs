//! Helpers for tests that change a running supervised cluster through
//! `kvsup apply`: writers that record what was acknowledged, waiting for
//! a change to end, and checks that nothing acknowledged was lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sup::{run_in, Supervised};
use crate::{http_get, wait_until};

pub fn client(c: &Supervised) -> kvclient::Client {
    kvclient::Client::builder()
        .endpoints(c.urls())
        .request_timeout(Duration::from_secs(2))
        .retry_deadline(Duration::from_secs(20))
        .build()
        .expect("a client of the cluster's URLs")
}

/// What one writer saw: the keys acknowledged, the failures, and the
/// longest time between two acknowledgements (or from its start to the
/// first).
pub struct Written {
    pub acked: Vec<String>,
    pub failed: usize,
    pub longest_pause: Duration,
}

/// 16 writers (or `writers`) setting new keys back to back through
/// retrying clients, each recording what was acknowledged.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    writers: Vec<tokio::task::JoinHandle<Written>>,
}

impl Load {
    pub fn start(c: &Supervised, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let writers = (0..writers)
            .map(|w| {
                let (kv, stop, count) = (client(c), stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut out = Written {
                        acked: Vec::new(),
                        failed: 0,
                        longest_pause: Duration::ZERO,
                    };
                    let mut last = Instant::now();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{i}");
                        match kv.set(&key, key.clone()).await {
                            Ok(_) => {
                                out.longest_pause = out.longest_pause.max(last.elapsed());
                                last = Instant::now();
                                out.acked.push(key);
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => out.failed += 1,
                        }
                        i += 1;
                    }
                    out
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
    pub async fn more(&self, n: usize) {
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

    /// Stops the writers: every acknowledged key, the failures, and the
    /// longest pause any writer saw.
    pub async fn finish(self) -> (Vec<String>, usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut failed, mut pause) = (Vec::new(), 0, Duration::ZERO);
        for w in self.writers {
            let r = w.await.expect("a writer panicked");
            acked.extend(r.acked);
            failed += r.failed;
            pause = pause.max(r.longest_pause);
        }
        (acked, failed, pause)
    }
}

/// `kvsup ARGS` in the cluster's directory, off the runtime's threads.
pub async fn kvsup(c: &Arc<Supervised>, args: &[&str]) -> (bool, String) {
    let c = c.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (st, out) =
            run_in(&c.dir, "kvsup", &a, Duration::from_secs(120)).expect("running kvsup");
        (st.success(), out)
    })
    .await
    .expect("the kvsup task panicked")
}

/// Writes `text` as manifest `name` beside the cluster's and returns its path.
pub fn manifest(c: &Supervised, name: &str, text: &str) -> String {
    let p = c.dir.join(name);
    std::fs::write(&p, text).expect("writing a manifest");
    p.display().to_string()
}

/// The cluster's manifest with `extra` added to `spec:`.
pub fn with_spec(c: &Supervised, extra: &str) -> String {
    let text = std::fs::read_to_string(&c.manifest).expect("reading the cluster's manifest");
    format!("{text}{extra}")
}

/// Polls the status until the change is no longer running; its document.
pub fn wait_change_over(c: &Supervised, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let over = wait_until(timeout, || match c.status() {
        Ok(s) => {
            let running = s["change"]["state"] == "running";
            last = s;
            !last["change"].is_null() && !running
        }
        Err(_) => false,
    });
    assert!(over, "the change did not end within {timeout:?}: {last:#}");
    last
}

/// `(name, pid)` of every node in the status.
pub fn node_pids(st: &Value) -> Vec<(String, u64)> {
    st["nodes"]
        .as_array()
        .expect("the status lists its nodes")
        .iter()
        .map(|n| {
            (
                n["name"]
                    .as_str()
                    .expect("a node row has a name")
                    .to_string(),
                n["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Waits until every node reports the same digest (in either mode).
pub fn wait_same_digests(c: &Supervised) {
    let ports = node_ports(c);
    let mut last = Vec::new();
    let same = wait_until(Duration::from_secs(30), || {
        last = ports
            .iter()
            .map(|p| {
                let (code, body) = http_get(*p, "/v1/status", Duration::from_secs(2)).ok()?;
                let s: Value = (code == 200).then(|| serde_json::from_slice(&body).ok())??;
                Some(s["digest"].clone())
            })
            .collect();
        last.iter().all(Option::is_some) && last.windows(2).all(|w| w[0] == w[1])
    });
    assert!(same, "the nodes' digests differ: {last:?}");
}

/// Every node holds every acknowledged key, and all hold the same.
pub async fn assert_nothing_lost(c: &Supervised, acked: &[String]) {
    wait_same_digests(c);
    for url in node_urls(c) {
        let node = kvclient::Client::new([url.clone()]).expect("a client of one node");
        for k in acked {
            assert_eq!(
                node.get(k)
                    .await
                    .expect("reading an acknowledged key")
                    .as_deref(),
                Some(k.as_bytes()),
                "{k} missing on {url}"
            );
        }
    }
}

pub fn events(c: &Supervised) -> String {
    c.kvsup(&["events"]).expect("kvsup events").1
}

/// The nodes' URLs as the supervisor's status lists them now (after a
/// node change, not those the cluster started with).
pub fn node_urls(c: &Supervised) -> Vec<String> {
    let st = c.status().expect("the supervisor's status");
    st["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["url"].as_str().map(str::to_string))
        .collect()
}

/// The ports of [`node_urls`].
pub fn node_ports(c: &Supervised) -> Vec<u16> {
    node_urls(c)
        .iter()
        .filter_map(|u| u.rsplit(':').next()?.parse().ok())
        .collect()
}
