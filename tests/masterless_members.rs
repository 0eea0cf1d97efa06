//! Adding and removing nodes of a masterless cluster (docs/DESIGN.md §5.9)
//! with real kvd processes: 3 -> 4 -> 3 under concurrent writers, each node
//! told its new peer set through `POST /v1/admin/peers`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::masterless::{check_winners, del, eventually, put, wait_converged, Acked, Ts};
use kvstore_testkit::node::{http, status_at};
use kvstore_testkit::wal::wait_first_segment_gone;
use kvstore_testkit::{free_ports, Kvd};
use rand::Rng;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Small WAL segments and frequent snapshots for n0, so its WAL is
/// compacted before the fourth joins; n1's and n2's WALs keep all their
/// history, puts whose deletes were purged since included (a new node
/// must not take them from a replay).
const COMPACTING: [&str; 4] = ["--snapshot-every-mib", "1", "--wal-segment-mib", "1"];

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Starts masterless node `n{i}` on `ports[i]` with `peers` (ports).
fn start_node(tmp: &TempDir, ports: &[u16], i: usize, peers: &[usize]) -> Kvd {
    let peers: Vec<String> = peers.iter().map(|&j| url(ports[j])).collect();
    let mut args = vec![
        "--mode".to_string(),
        "masterless".into(),
        "--node-id".into(),
        format!("n{i}"),
        "--peers".into(),
        peers.join(","),
    ];
    if i == 0 {
        args.extend(COMPACTING.map(String::from));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Kvd::start_on(ports[i], &tmp.path().join(format!("n{i}")), &args)
        .unwrap_or_else(|e| panic!("n{i} did not start: {e:#}"))
}

/// Writers until `stop`: task t writes to `urls[t % len]`, 15 % deletes,
/// values of ~200 bytes (the WALs fill and compact). Every acknowledged
/// write lands in `acked`; `done` counts them.
fn spawn_writers(
    urls: Vec<String>,
    tasks: usize,
    keys: u64,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
) -> tokio::task::JoinSet<u64> {
    let http = http();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (http, url, acked, stop, done) = (
            http.clone(),
            urls[t % urls.len()].clone(),
            acked.clone(),
            stop.clone(),
            done.clone(),
        );
        set.spawn(async move {
            let mut failed = 0;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (k, is_del) = {
                    let mut r = rand::thread_rng();
                    (r.gen_range(0..keys), r.gen_range(0..100) < 15)
                };
                let key = format!("k{k}");
                seq += 1;
                let value = format!("t{t}-{seq}-{}", "x".repeat(200));
                let res = if is_del {
                    del(&http, &url, &key).await.map(|ts| (ts, None))
                } else {
                    put(&http, &url, &key, &value)
                        .await
                        .map(|ts| (ts, Some(value)))
                };
                match res {
                    Ok((ts, v)) => {
                        acked.record(&key, ts, v);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => failed += 1,
                }
            }
            failed
        });
    }
    set
}

/// Stops the writers; how many writes failed.
async fn stop_writers(stop: &AtomicBool, mut set: tokio::task::JoinSet<u64>) -> u64 {
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        failed += r.unwrap();
    }
    failed
}

/// Waits until `n` more writes were acknowledged.
async fn wait_writes(done: &AtomicU64, n: u64) {
    let target = done.load(Ordering::Relaxed) + n;
    let ok = eventually(Duration::from_secs(60), || async {
        done.load(Ordering::Relaxed) >= target
    })
    .await;
    assert!(ok, "the writers did not make {n} more writes");
}

async fn post_peers(http: &reqwest::Client, node: &str, body: &[u8]) -> (u16, Value) {
    let r = http
        .post(format!("{node}/v1/admin/peers"))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Gives `node` the peer set `peers` (ports); the answer.
async fn set_peers(http: &reqwest::Client, node: &str, peers: &[String]) -> Value {
    let body = serde_json::to_vec(&json!({ "peers": peers })).unwrap();
    let (code, answer) = post_peers(http, node, &body).await;
    assert_eq!(code, 200, "{node}: {answer}");
    answer
}

async fn get_peers(http: &reqwest::Client, node: &str) -> Value {
    let r = http
        .get(format!("{node}/v1/admin/peers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["peers"].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn ml(s: &Value, field: &str) -> u64 {
    s["masterless"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {s}"))
}

/// Every peer `node` lists, by URL, with its status entry.
async fn peer_entries(http: &reqwest::Client, node: &str) -> Vec<Value> {
    status_at(http, node).await["masterless"]["peers"]
        .as_array()
        .unwrap()
        .clone()
}

/// Whether every node of `urls` streams to every other one in full (its
/// entry for the peer acknowledges this node's last index) and holds every
/// other one's stream with no gap open.
async fn streams_complete(http: &reqwest::Client, urls: &[String]) -> bool {
    for u in urls {
        let s = status_at(http, u).await;
        let last = s["last_index"].as_u64();
        let peers = s["masterless"]["peers"].as_array().unwrap();
        if peers.len() != urls.len() - 1 {
            return false;
        }
        for p in peers {
            if p["acked_index"].as_u64() != last || p["stream_gap"] != false {
                return false;
            }
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_masterless_cluster_grows_to_four_and_shrinks_to_three_under_writers() {
    let tmp = TempDir::new().unwrap();
    let ports = free_ports(4);
    let http = http();
    let mut nodes: Vec<Kvd> = (0..3)
        .map(|i| {
            let peers: Vec<usize> = (0..3).filter(|&j| j != i).collect();
            start_node(&tmp, &ports, i, &peers)
        })
        .collect();
    let urls: Vec<String> = ports.iter().map(|&p| url(p)).collect();
    let three = urls[..3].to_vec();

    // 16 writers over the three until a WAL has been compacted.
    let acked = Acked::default();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers = spawn_writers(three.clone(), 16, 3000, &acked, &stop, &done);
    let n0_dir = nodes[0].data_dir.clone();
    let compacted = tokio::task::spawn_blocking(move || {
        wait_first_segment_gone(&n0_dir, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert!(compacted, "n0's first WAL segment was never compacted");
    let purged_before_join = ml(&status_at(&http, &urls[0]).await, "purged_tombstones");
    eprintln!(
        "{} writes acknowledged before the join; n0 purged {purged_before_join} tombstones",
        done.load(Ordering::Relaxed)
    );

    // Bad bodies: each refused, nothing changed.
    let before = get_peers(&http, &urls[0]).await;
    let too_many: Vec<String> = (1..=65).map(|p| format!("http://127.0.0.1:{p}")).collect();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"peers\": [], \"extra\": 1}".to_vec(), "invalid_peers"),
        (b"{\"peers\": \"http://a:1\"}".to_vec(), "invalid_peers"),
        (b"{}".to_vec(), "invalid_peers"),
        (b"{\"peers\": [\"nope\"]}".to_vec(), "invalid_peers"),
        (b"{\"peers\": [\"http://a:1/x\"]}".to_vec(), "invalid_peers"),
        (
            serde_json::to_vec(&json!({ "peers": [urls[1], urls[0]] })).unwrap(),
            "invalid_peers",
        ),
        (
            serde_json::to_vec(&json!({ "peers": [urls[1], urls[1]] })).unwrap(),
            "invalid_peers",
        ),
        (
            serde_json::to_vec(&json!({ "peers": too_many })).unwrap(),
            "invalid_peers",
        ),
        (b"not json".to_vec(), "invalid_json"),
    ];
    for (body, code) in &bad {
        let (status, answer) = post_peers(&http, &urls[0], body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(*code)),
            "{}: {answer}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(get_peers(&http, &urls[0]).await, before);
    assert_eq!(peer_entries(&http, &urls[0]).await.len(), 2);
    // The same set again changes nothing.
    let same = set_peers(&http, &urls[0], &strings(&before)).await;
    assert_eq!(same["added"], json!([]));
    assert_eq!(same["removed"], json!([]));

    // A fourth node on a fresh data dir, knowing the three; then each of
    // the three is given the set with it, while the writers go on.
    let joined = Instant::now();
    nodes.push(start_node(&tmp, &ports, 3, &[0, 1, 2]));
    for i in 0..3 {
        let peers: Vec<String> = (0..4)
            .filter(|&j| j != i)
            .map(|j| urls[j].clone())
            .collect();
        let answer = set_peers(&http, &urls[i], &peers).await;
        assert_eq!(answer["added"], json!([urls[3]]), "n{i}: {answer}");
        assert_eq!(answer["removed"], json!([]), "n{i}: {answer}");
        assert_eq!(strings(&get_peers(&http, &urls[i]).await), peers);
    }
    wait_writes(&done, 3000).await;
    let failed = stop_writers(&stop, writers).await;
    assert_eq!(failed, 0, "writes failed during the join");
    let took = wait_converged(&http, &urls, Duration::from_secs(90))
        .await
        .expect("the fourth node did not converge");
    eprintln!(
        "four nodes converged {took:?} after the writers stopped ({:?} after the join)",
        joined.elapsed()
    );
    let complete = eventually(Duration::from_secs(30), || streams_complete(&http, &urls)).await;
    assert!(
        complete,
        "streams to and from the fourth are not complete: {:?}",
        peer_entries(&http, &urls[3]).await
    );
    let s3 = status_at(&http, &urls[3]).await;
    eprintln!(
        "n3: {} stream batches started past a sender's history, {} versions pulled by anti-entropy",
        ml(&s3, "stream_gaps_total"),
        ml(&s3, "repaired_versions")
    );
    // One gap per sender: each started past its history.
    assert!(ml(&s3, "stream_gaps_total") >= 3, "{s3}");
    assert!(ml(&s3, "repaired_versions") > 0, "{s3}");
    check_winners(&nodes, &acked.snapshot());
    let metrics = kvstore_testkit::node::metrics_at(&http, &urls[3]).await;
    assert!(metrics.contains("\nkvd_ml_peers 3\n"), "{metrics}");

    // n1 dies while still in everyone's set: deletes leave tombstones that
    // nobody may purge (n1 never receives them).
    nodes[1].kill9().unwrap();
    let rest: Vec<String> = [0, 2, 3].iter().map(|&i| urls[i].clone()).collect();
    let mut last_delete = Ts::default();
    for k in 0..200 {
        let key = format!("gone{k}");
        let node = &rest[k % 3];
        put(&http, node, &key, "v").await.unwrap();
        let ts = del(&http, node, &key).await.unwrap();
        acked.record(&key, ts, None);
        last_delete = last_delete.max(ts);
    }
    let mut purged = Vec::new();
    for u in &rest {
        purged.push(ml(&status_at(&http, u).await, "purged_tombstones"));
    }
    // Long enough that, with n1 alive, the global stable time would have
    // passed the deletes: every clock 2 s past them.
    let passed = eventually(Duration::from_secs(20), || async {
        let mut all = true;
        for u in &rest {
            let hlc = Ts::from_json(&status_at(&http, u).await["hlc"]).unwrap();
            all &= hlc.physical_ms > last_delete.physical_ms + 2000;
        }
        all
    })
    .await;
    assert!(passed);
    for (u, before) in rest.iter().zip(&purged) {
        let s = status_at(&http, u).await;
        assert_eq!(
            ml(&s, "purged_tombstones"),
            *before,
            "{u} purged with n1 dead: {s}"
        );
        let gst = Ts::from_json(&s["masterless"]["global_stable_time"]).unwrap();
        assert!(gst < last_delete, "{u}: {s}");
        assert!(ml(&s, "tombstones") >= 200, "{u}: {s}");
    }
    eprintln!("with n1 dead in the set, no node purged for 2 s past the deletes");

    // n1 leaves the set: purges resume, writes go on.
    for &i in &[0usize, 2, 3] {
        let peers: Vec<String> = [0usize, 2, 3]
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| urls[j].clone())
            .collect();
        let answer = set_peers(&http, &urls[i], &peers).await;
        assert_eq!(answer["removed"], json!([urls[1]]), "n{i}: {answer}");
        assert_eq!(answer["added"], json!([]), "n{i}: {answer}");
        let listed: Vec<String> = peer_entries(&http, &urls[i])
            .await
            .iter()
            .map(|p| p["url"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, peers, "n{i}'s status");
    }
    let removed = Instant::now();
    let resumed = eventually(Duration::from_secs(30), || async {
        let mut all = true;
        for (u, before) in rest.iter().zip(&purged) {
            let s = status_at(&http, u).await;
            all &= ml(&s, "purged_tombstones") >= before + 200;
        }
        all
    })
    .await;
    assert!(resumed, "purges did not resume once n1 left the set");
    eprintln!(
        "purges resumed {:?} after n1 left the set",
        removed.elapsed()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(rest.clone(), 16, 3000, &acked, &stop, &done);
    wait_writes(&done, 2000).await;
    let failed = stop_writers(&stop, writers).await;
    assert_eq!(failed, 0, "writes failed after the removal");
    wait_converged(&http, &rest, Duration::from_secs(60))
        .await
        .expect("the three did not converge after the removal");
    let winners = acked.snapshot();
    for i in [0, 2, 3] {
        check_winners(std::slice::from_ref(&nodes[i]), &winners);
    }
    let metrics = http
        .get(format!("{}/metrics", urls[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("\nkvd_ml_peers 2\n"), "{metrics}");
    assert!(
        !metrics.contains(&urls[1]),
        "a stale gauge names n1: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_another_mode_refuses_a_peer_set() {
    let tmp = TempDir::new().unwrap();
    let node = Kvd::start(&tmp.path().join("single"), &[]).unwrap();
    let http = http();
    let (code, answer) = post_peers(&http, &node.url(), b"{\"peers\": []}").await;
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (409, Some("not_masterless"))
    );
    // A malformed body is 400 on any node: it is judged before the mode.
    let (code, answer) = post_peers(&http, &node.url(), b"{\"peers\": [\"x\"]}").await;
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (400, Some("invalid_peers"))
    );
    let r = http
        .get(format!("{}/v1/admin/peers", node.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}
