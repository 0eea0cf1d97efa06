//! Masterless mode (docs/DESIGN.md §5) with three real kvd processes:
//! writes on every node, last-write-wins by hybrid logical clock,
//! tombstones, catch-up after a crash or a partition, clock faults.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::masterless::{
    check_winners, del, eventually, get, put, wait_converged, Acked, Ts,
};
use kvstore_testkit::node::{http, metrics_at, status_at};
use kvstore_testkit::run_to_exit;
use rand::Rng;

fn masterless(extra: impl Fn(usize) -> Vec<String>) -> Cluster {
    Cluster::start("masterless", extra)
}

fn none(_: usize) -> Vec<String> {
    Vec::new()
}

/// Writers: `tasks` tasks, task t writing to `urls[t % urls.len()]`, until
/// `total` writes were tried, over `keys` keys, a `delete_pct` % of deletes.
/// Every acknowledged write lands in `acked`; returns the failed count.
async fn write_load(
    urls: Vec<String>,
    tasks: usize,
    total: u64,
    keys: u64,
    delete_pct: u32,
    acked: &Acked,
) -> u64 {
    let http = http();
    let tried = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (http, url, tried, failed, acked) = (
            http.clone(),
            urls[t % urls.len()].clone(),
            tried.clone(),
            failed.clone(),
            acked.clone(),
        );
        set.spawn(async move {
            let mut seq = 0u64;
            while tried.fetch_add(1, Ordering::Relaxed) < total {
                let (k, is_del) = {
                    let mut r = rand::thread_rng();
                    (r.gen_range(0..keys), r.gen_range(0..100) < delete_pct)
                };
                let key = format!("k{k}");
                seq += 1;
                let value = format!("t{t}-{seq}");
                let res = if is_del {
                    del(&http, &url, &key).await.map(|ts| (ts, None))
                } else {
                    put(&http, &url, &key, &value)
                        .await
                        .map(|ts| (ts, Some(value)))
                };
                match res {
                    Ok((ts, v)) => acked.record(&key, ts, v),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    failed.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_to_any_node_is_readable_on_the_other_two() {
    let c = masterless(none);
    let http = http();
    let urls = c.urls();
    for i in 0..3 {
        let key = format!("from-n{i}");
        put(&http, &urls[i], &key, &format!("v{i}")).await.unwrap();
        for (j, u) in urls.iter().enumerate() {
            let ok = eventually(Duration::from_secs(10), || async {
                get(&http, u, &key).await.as_deref() == Some(format!("v{i}").as_bytes())
            })
            .await;
            assert!(ok, "n{j} never saw {key} written on n{i}");
        }
    }
    let s = status_at(&http, &urls[0]).await;
    assert_eq!(s["mode"], "masterless", "{s}");
    assert_eq!(s["role"], "peer");
    assert!(Ts::from_json(&s["hlc"]).unwrap().physical_ms > 0, "{s}");
    // Malformed internal traffic is refused and changes nothing.
    let before = status_at(&http, &urls[1]).await;
    for (path, body) in [
        ("/internal/ml/stream", &b"garbage"[..]),
        ("/internal/ml/buckets", &b"{\"buckets\": \"all\"}"[..]),
    ] {
        let r = http
            .post(format!("{}{path}", urls[1]))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let after = status_at(&http, &urls[1]).await;
    assert_eq!(before["last_index"], after["last_index"]);
    assert_eq!(before["digest"], after["digest"]);
    // There is no primary to promote.
    let r = http
        .post(format!("{}/promote_to_primary", urls[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let peers = s["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(
        peers.iter().all(|p| p["acked_index"].as_u64().is_some()),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_writers_on_all_three_nodes_digests_agree_once_the_writes_stop() {
    let c = masterless(none);
    let http = http();
    let acked = Acked::default();
    let failed = write_load(c.urls(), 24, 6000, 2000, 10, &acked).await;
    assert_eq!(failed, 0);
    // How fast is a benchmark's question (printed here); the test asks
    // only that the nodes get there, with a deadline a loaded debug build
    // meets.
    let took = wait_converged(&http, &c.urls(), Duration::from_secs(60)).await;
    let took = took.expect("digests did not agree once the writes stopped");
    eprintln!("digests agreed {took:?} after the writes stopped");
    check_winners(&c.nodes, &acked.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_of_the_same_keys_end_with_the_highest_timestamp_everywhere() {
    let c = masterless(none);
    let http = http();
    let acked = Acked::default();
    // 20 hot keys, 12 writers on three nodes, half of the writes deletes.
    let failed = write_load(c.urls(), 12, 3000, 20, 50, &acked).await;
    assert_eq!(failed, 0);
    wait_converged(&http, &c.urls(), Duration::from_secs(10))
        .await
        .expect("no convergence");
    let acked = acked.snapshot();
    assert_eq!(acked.len(), 20);
    // Both kinds won somewhere, so both a value and a tombstone are
    // checked on every node (each key's winner is a delete with
    // probability 1/2: both kinds are missing with probability 2^-19).
    let deleted = acked.values().filter(|(_, v)| v.is_none()).count();
    assert!(
        deleted > 0 && deleted < acked.len(),
        "{deleted} of {} keys' winners are deletes",
        acked.len()
    );
    check_winners(&c.nodes, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_is_never_undone_by_an_older_put_arriving_later() {
    let c = masterless(none);
    let http = http();
    let urls = c.urls();
    put(&http, &urls[0], "doomed", "first").await.unwrap();
    wait_converged(&http, &urls, Duration::from_secs(10))
        .await
        .unwrap();
    // n2, cut off, takes a put; n0 deletes the key later (a larger stamp).
    c.isolate(2);
    let old_put = put(&http, &urls[2], "doomed", "older put").await.unwrap();
    let moved_on = eventually(Duration::from_secs(10), || async {
        let s = status_at(&http, &urls[0]).await;
        Ts::from_json(&s["hlc"]).unwrap().physical_ms > old_put.physical_ms
    })
    .await;
    assert!(moved_on);
    let delete = del(&http, &urls[0], "doomed").await.unwrap();
    assert!(delete > old_put, "{delete:?} vs {old_put:?}");
    // The older put arrives at n0 and n1 after the heal; the delete wins.
    c.heal();
    wait_converged(&http, &urls, Duration::from_secs(20))
        .await
        .expect("no convergence after the heal");
    for u in &urls {
        assert_eq!(get(&http, u, "doomed").await, None, "{u} resurrected it");
    }
    // Once every node has it (global stable time past it), the tombstone
    // is purged everywhere, and the key stays deleted.
    let purged = eventually(Duration::from_secs(20), || async {
        let mut all = true;
        for u in &urls {
            all &= status_at(&http, u).await["masterless"]["tombstones"] == 0;
        }
        all
    })
    .await;
    assert!(purged, "tombstones were never purged");
    for u in &urls {
        assert_eq!(get(&http, u, "doomed").await, None);
    }
    wait_converged(&http, &urls, Duration::from_secs(10))
        .await
        .unwrap();
}

/// The other two take 50k writes while one node is gone.
/// Killed: it catches up from the others' logs (streams resume at its
/// durable positions). Cut off: the others' WAL segments are small and
/// compacted away meanwhile, so the streams skip a gap and anti-entropy
/// must repair what it held.
async fn one_node_away_during_50k_writes(kill: bool) {
    let mut c = masterless(move |_| {
        if kill {
            vec!["--snapshot-every-mib".into(), "4".into()]
        } else {
            ["--snapshot-every-mib", "1", "--wal-segment-mib", "1"]
                .map(String::from)
                .to_vec()
        }
    });
    let http = http();
    let urls = c.urls();
    let acked = Acked::default();
    write_load(urls.clone(), 16, 2000, 10_000, 5, &acked).await;
    if kill {
        c.nodes[2].kill9().unwrap();
    } else {
        c.isolate(2);
    }
    let failed = write_load(urls[..2].to_vec(), 32, 50_000, 10_000, 5, &acked).await;
    assert_eq!(failed, 0);
    if kill {
        c.nodes[2].restart().unwrap();
    } else {
        c.heal();
    }
    let took = wait_converged(&http, &urls, Duration::from_secs(60))
        .await
        .expect("the returning node did not converge");
    eprintln!("converged {took:?} after the node came back");
    check_winners(&c.nodes, &acked.snapshot());
    let s = status_at(&http, &urls[2]).await;
    if kill {
        // The others' streams resumed from n2's durable positions and
        // reached the end of their logs (anti-entropy may have repaired
        // some keys first, concurrently).
        let caught_up = eventually(Duration::from_secs(10), || async {
            let s = status_at(&http, &urls[2]).await;
            let mut all = true;
            for p in s["peers"].as_array().unwrap() {
                let i: usize = p["node_id"].as_str().unwrap()[1..].parse().unwrap();
                let last = status_at(&http, &urls[i]).await["last_index"].as_u64();
                all &= p["received_through"].as_u64() == last;
            }
            all
        })
        .await;
        assert!(caught_up, "{s}");
    } else {
        let gaps = s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["stream_gap"] == true)
            .count();
        let repaired = s["masterless"]["repaired_versions"].as_u64().unwrap();
        let skipped = s["masterless"]["stream_gaps_total"].as_u64().unwrap();
        eprintln!(
            "n2: {skipped} stream batches across a compaction gap ({gaps} open now), \
             {repaired} versions repaired by anti-entropy"
        );
        assert!(skipped > 0, "the peers' streams never skipped a gap: {s}");
        assert!(repaired > 0, "{s}");
        // Once anti-entropy found n2 equal to the origins, their clocks
        // count again for the stable time.
        let closed = eventually(Duration::from_secs(10), || async {
            let s = status_at(&http, &urls[2]).await;
            s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["stream_gap"] == false)
        })
        .await;
        assert!(closed, "stream gaps never closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_while_the_others_take_50k_writes_converges_when_restarted() {
    one_node_away_during_50k_writes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_while_the_others_take_50k_writes_converges_after_the_heal() {
    one_node_away_during_50k_writes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_faults_never_move_a_clock_back_and_nodes_still_converge() {
    // n1 runs 5 s behind; n2's clock jumps 10 s back mid-run.
    let c = masterless(|i| match i {
        1 => vec![
            "--enable-debug".into(),
            "--clock-offset-ms".into(),
            "-5000".into(),
        ],
        2 => vec!["--enable-debug".into()],
        _ => vec![],
    });
    let http = http();
    let urls = c.urls();
    let acked = Acked::default();
    // Each node's clock, sampled throughout, must never go back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (http, urls, stop) = (http.clone(), urls.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = [Ts::default(); 3];
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (i, u) in urls.iter().enumerate() {
                    let now = Ts::from_json(&status_at(&http, u).await["hlc"]).unwrap();
                    assert!(
                        now >= last[i],
                        "n{i}'s clock went back: {last:?} -> {now:?}"
                    );
                    last[i] = now;
                    samples += 1;
                }
            }
            samples
        })
    };
    // Sequential writers per node: each one's stamps must strictly increase.
    let mut writers = tokio::task::JoinSet::new();
    for (i, u) in urls.iter().enumerate() {
        let (http, u, acked) = (http.clone(), u.clone(), acked.clone());
        writers.spawn(async move {
            let mut prev = Ts::default();
            for seq in 0..400 {
                let key = format!("k{}", seq % 50);
                let value = format!("n{i}-{seq}");
                let ts = put(&http, &u, &key, &value).await.unwrap();
                assert!(ts > prev, "n{i}: stamp {ts:?} after {prev:?}");
                prev = ts;
                acked.record(&key, ts, Some(value));
            }
        });
    }
    // Jump n2 back once the writers are going.
    let jumped = eventually(Duration::from_secs(10), || async {
        status_at(&http, &urls[2]).await["last_index"]
            .as_u64()
            .unwrap()
            > 100
    })
    .await;
    assert!(jumped);
    let before = Ts::from_json(&status_at(&http, &urls[2]).await["hlc"]).unwrap();
    let r = http
        .post(format!("{}/v1/admin/debug/clock", urls[2]))
        .json(&serde_json::json!({"offset_ms": -10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let after = Ts::from_json(&status_at(&http, &urls[2]).await["hlc"]).unwrap();
    assert!(after > before);
    stop.store(true, Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 3);
    wait_converged(&http, &urls, Duration::from_secs(10))
        .await
        .expect("no convergence under clock faults");
    check_winners(&c.nodes, &acked.snapshot());
    // The offset knob is refused without --enable-debug.
    let r = http
        .post(format!("{}/v1/admin/debug/clock", urls[0]))
        .json(&serde_json::json!({"offset_ms": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_quorum_waits_for_peers_durable_copies() {
    let c = masterless(|_| {
        vec![
            "--write-quorum".into(),
            "3".into(),
            "--commit-timeout-ms".into(),
            "2000".into(),
        ]
    });
    let http = http();
    let urls = c.urls();
    put(&http, &urls[0], "q", "all three").await.unwrap();
    // A quorum-3 write is durable on all three before its ack.
    for u in &urls {
        assert_eq!(get(&http, u, "q").await.as_deref(), Some(&b"all three"[..]));
    }
    c.isolate(2);
    let r = http
        .put(format!("{}/v1/kv/q2", urls[0]))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quorum_timeout");
    c.heal();
    wait_converged(&http, &urls, Duration::from_secs(10))
        .await
        .unwrap();
    // Asking for more copies than nodes is refused at start-up.
    let lone = c.dir.join("lone");
    let (code, out) = run_to_exit(
        "kvd",
        &[
            "--mode",
            "masterless",
            "--write-quorum",
            "2",
            "--data-dir",
            lone.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!code.success());
    assert!(out.contains("--write-quorum"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_sender_resumes_its_stream_where_each_peer_holds_it() {
    let mut c = masterless(none);
    let http = http();
    let urls = c.urls();
    put(&http, &urls[0], "warm", "up").await.unwrap();
    wait_converged(&http, &urls, Duration::from_secs(10))
        .await
        .unwrap();
    // n0 takes writes nobody else has seen, then crashes.
    c.isolate(0);
    let acked = Acked::default();
    for i in 0..300 {
        let key = format!("lonely/{i}");
        let ts = put(&http, &urls[0], &key, "n0 only").await.unwrap();
        acked.record(&key, ts, Some("n0 only".into()));
    }
    c.nodes[0].kill9().unwrap();
    c.nodes[0].restart().unwrap();
    c.heal();
    let last0 = status_at(&http, &urls[0]).await["last_index"].as_u64();
    // Each peer's durable position for n0 reaches n0's last index: the
    // restarted sender learned where they were and sent the rest.
    for (i, u) in urls.iter().enumerate().skip(1) {
        let ok = eventually(Duration::from_secs(20), || async {
            let s = status_at(&http, u).await;
            s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node_id"] == "n0" && p["received_through"].as_u64() == last0)
        })
        .await;
        assert!(ok, "n{i} never received n0's stream to {last0:?}");
    }
    wait_converged(&http, &urls, Duration::from_secs(20))
        .await
        .unwrap();
    check_winners(&c.nodes, &acked.snapshot());
}

/// `kvd_wal_appends_per_fsync` of the node at `url`: (sum, count).
async fn merges_per_fsync(http: &reqwest::Client, url: &str) -> (f64, f64) {
    let text = metrics_at(http, url).await;
    let series = |name: &str| kvstore_testkit::raw::metric(&text, name).unwrap_or(0.0);
    (
        series("kvd_wal_appends_per_fsync_sum"),
        series("kvd_wal_appends_per_fsync_count"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_peers_batches_arriving_together_share_one_fsync() {
    // n0 and n1 take writes; n2 merges both streams. A receiver that took
    // one batch at a time (or made each wait for its own fsync) would
    // never cover two origins' batches with one fsync.
    let c = masterless(none);
    let http = http();
    let urls = c.urls();
    let acked = Acked::default();
    let writers = urls[..2].to_vec();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let grouped = loop {
        let failed = write_load(writers.clone(), 32, 3000, 5000, 5, &acked).await;
        assert_eq!(failed, 0);
        let (sum, count) = merges_per_fsync(&http, &urls[2]).await;
        assert!(count > 0.0, "n2 merged nothing");
        if sum > count {
            break Some((sum, count));
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
    };
    let (sum, count) = grouped.expect("no fsync on n2 covered two peers' batches");
    eprintln!("n2: {sum} peer batches under {count} fsyncs");
    wait_converged(&http, &urls, Duration::from_secs(30))
        .await
        .expect("digests did not agree once the writes stopped");
    check_winners(&c.nodes, &acked.snapshot());
}
