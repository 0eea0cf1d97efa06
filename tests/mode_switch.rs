//! Live mode switch (docs/DESIGN.md §6) of three real kvd processes under
//! 16 writers, driven through `kvclient::admin::switch_mode`:
//! primary/secondary -> masterless -> primary/secondary, no acknowledged
//! write lost, identical digests after each switch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvclient::admin::{switch_mode, Mode, SwitchOptions, SwitchReport};
use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::masterless::{self, check_winners, eventually, wait_converged, Acked, Ts};
use kvstore_testkit::node::{http, status_at};

struct Writers {
    stop: Arc<AtomicBool>,
    acked: Acked,
    count: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    set: tokio::task::JoinSet<()>,
}

impl Writers {
    /// 16 writers through kvclient over every node, unique keys and values.
    fn start(urls: &[String]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Acked::default();
        let count = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut set = tokio::task::JoinSet::new();
        for t in 0..16 {
            // Each writer starts at a different node.
            let mut order = urls.to_vec();
            order.rotate_left(t % urls.len());
            let client = kvclient::Client::builder()
                .endpoints(order)
                .request_timeout(Duration::from_secs(10))
                .retry_deadline(Duration::from_secs(30))
                .build()
                .unwrap();
            let (stop, acked, count, errors) =
                (stop.clone(), acked.clone(), count.clone(), errors.clone());
            set.spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let key = format!("w{t}-{seq}");
                    let value = format!("v{t}-{seq}");
                    let t0 = std::time::Instant::now();
                    let res = client.set(&key, value.clone()).await;
                    if t0.elapsed() > Duration::from_millis(500) {
                        eprintln!(
                            "slow write {key}: {:?} ({:?})",
                            t0.elapsed(),
                            res.as_ref().err()
                        );
                    }
                    match res {
                        Ok(_) => {
                            acked.record(&key, Ts::default(), Some(value));
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(format!("{key}: {e}")),
                    }
                }
            });
        }
        Writers {
            stop,
            acked,
            count,
            errors,
            set,
        }
    }

    async fn wait_for_more(&self, n: u64) {
        let target = self.count.load(Ordering::Relaxed) + n;
        let ok = eventually(Duration::from_secs(60), || async {
            self.count.load(Ordering::Relaxed) >= target
        })
        .await;
        assert!(
            ok,
            "writers made no progress: {:?}",
            self.errors.lock().unwrap()
        );
    }

    async fn stop(mut self) -> (Acked, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        while self.set.join_next().await.is_some() {}
        let errors = self.errors.lock().unwrap().clone();
        (self.acked, errors)
    }
}

fn check_report(r: &SwitchReport, to: Mode) {
    assert!(!r.already);
    assert_eq!(r.to, to);
    assert_eq!(r.digests_before.len(), 3);
    let d0 = &r.digests_before[0].digest;
    assert!(r.digests_before.iter().all(|d| &d.digest == d0), "{r:?}");
    assert!(r.digests_after.iter().all(|d| &d.digest == d0), "{r:?}");
    eprintln!(
        "switch {} -> {}: writes paused {:?} (of which {:?} waiting for identical contents), \
         base index {}, epoch {}",
        r.from.map_or("switching", Mode::as_str),
        r.to,
        r.pause,
        r.converge,
        r.base_index,
        r.epoch
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_to_masterless_and_back_under_16_writers_loses_no_acknowledged_write() {
    let mut c = Cluster::start("primary-secondary", |_| Vec::new());
    let urls = c.urls();
    let http = http();
    let opts = SwitchOptions::default();
    let writers = Writers::start(&urls);
    writers.wait_for_more(300).await;

    let r = switch_mode(&urls, Mode::Masterless, &opts).await.unwrap();
    check_report(&r, Mode::Masterless);
    assert_eq!(r.from, Some(Mode::PrimarySecondary));
    for u in &urls {
        assert_eq!(status_at(&http, u).await["mode"], "masterless");
    }
    // Writes flow again, now on every node.
    writers.wait_for_more(300).await;

    let r = switch_mode(&urls, Mode::PrimarySecondary, &opts)
        .await
        .unwrap();
    check_report(&r, Mode::PrimarySecondary);
    assert_eq!(r.primary.as_deref(), Some("n0"));
    let s0 = status_at(&http, &urls[0]).await;
    assert_eq!(s0["mode"], "primary-secondary");
    assert_eq!(s0["role"], "primary");
    assert_eq!(s0["epoch"].as_u64(), Some(r.epoch));
    writers.wait_for_more(300).await;

    let (acked, errors) = writers.stop().await;
    assert!(errors.is_empty(), "writes failed: {errors:?}");
    wait_converged(&http, &urls, Duration::from_secs(20))
        .await
        .expect("no convergence after the switches");
    let acked = acked.snapshot();
    eprintln!(
        "{} acknowledged writes, all checked on every node",
        acked.len()
    );
    check_winners(&c.nodes, &acked);

    // Log matching holds in the new epoch: a crashed secondary restarts in
    // primary/secondary mode (persisted) and catches up.
    c.nodes[2].kill9().unwrap();
    let client = kvclient::Client::new(urls.clone()).unwrap();
    for i in 0..100 {
        client.set(&format!("after-crash/{i}"), "x").await.unwrap();
    }
    c.nodes[2].restart().unwrap();
    assert_eq!(
        status_at(&http, &urls[2]).await["mode"],
        "primary-secondary"
    );
    wait_converged(&http, &urls, Duration::from_secs(20))
        .await
        .expect("the restarted secondary did not catch up");
    check_winners(&c.nodes, &acked);

    // Switching to the mode the cluster is in changes nothing.
    let r = switch_mode(&urls, Mode::PrimarySecondary, &opts)
        .await
        .unwrap();
    assert!(r.already);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mode_endpoint_needs_paused_writes_and_valid_input() {
    let c = Cluster::start("masterless", |_| Vec::new());
    let http = http();
    let u = &c.urls()[0];
    let body = serde_json::json!({"mode": "primary-secondary", "base_index": 100, "epoch": 9, "primary": "n0"});
    let r = http
        .post(format!("{u}/v1/admin/mode"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "writes_not_paused");
    masterless::put(&http, u, "before", "pause").await.unwrap();
    // Paused: writes get 503 with Retry-After; a bad mode gets 400.
    let r = http
        .post(format!("{u}/v1/admin/pause_writes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(format!("{u}/v1/kv/k"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let r = http
        .post(format!("{u}/v1/admin/mode"))
        .json(&serde_json::json!({"mode": "sideways", "base_index": 1, "epoch": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // To primary/secondary without naming the primary: 400.
    let r = http
        .post(format!("{u}/v1/admin/mode"))
        .json(&serde_json::json!({"mode": "primary-secondary", "base_index": 1, "epoch": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A base behind the log is refused and changes nothing.
    let s = status_at(&http, u).await;
    assert!(s["last_index"].as_u64().unwrap() >= 1);
    let r = http
        .post(format!("{u}/v1/admin/mode"))
        .json(&serde_json::json!({"mode": "primary-secondary", "base_index": 0, "epoch": 9, "primary": "n0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "not_quiescent");
    let s2 = status_at(&http, u).await;
    assert_eq!(s2["mode"], "masterless");
    assert_eq!(s["digest"], s2["digest"]);
    assert_eq!(s["last_index"], s2["last_index"]);
    let r = http
        .post(format!("{u}/v1/admin/resume_writes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
