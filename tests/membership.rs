//! Membership changes in primary/secondary mode (docs/DESIGN.md §4.11):
//! learners join with `--join`, catch up (by snapshot and by the log), are
//! promoted; commits and elections count the voters of the configuration
//! in effect, never learners; members are removed one at a time; every
//! refusal changes nothing. Real kvd processes on loopback.

use std::time::Duration;

use kvstore_testkit::{node, start_cluster, Kvd, Sig};
use serde_json::{json, Value};
use tempfile::TempDir;

/// Small segments and snapshots, so that a few MiB compact the WAL and a
/// new learner needs a snapshot; a short commit timeout, so that a write
/// without a quorum answers 503 quickly.
const FLAGS: &[&str] = &[
    "--snapshot-every-mib",
    "1",
    "--wal-segment-mib",
    "1",
    "--commit-timeout-ms",
    "1500",
];

const PATIENCE: Duration = Duration::from_secs(30);

fn http() -> reqwest::Client {
    node::http()
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Starts a node that joins the cluster of `peers` (fresh data dir).
fn join(tmp: &TempDir, name: &str, peers: &[String]) -> Kvd {
    // No --role: a joining node boots as a secondary whatever it says.
    let mut args = vec!["--node-id", name, "--join", "--peers"];
    let peers = peers.join(",");
    args.push(&peers);
    args.extend_from_slice(FLAGS);
    Kvd::start(&tmp.path().join(name), &args).unwrap()
}

/// `POST /promote_to_primary` on `url`: its status and body.
async fn promote_to_primary(url: &str) -> (u16, Value) {
    let resp = http()
        .post(format!("{url}/promote_to_primary"))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn members(url: &str) -> Value {
    let resp = http()
        .get(format!("{url}/v1/admin/members"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET members of {url}");
    resp.json().await.unwrap()
}

/// `POST /v1/admin/members` at `url`: status code and body.
async fn change(url: &str, body: Value) -> (u16, Value) {
    let resp = no_redirects()
        .post(format!("{url}/v1/admin/members"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

async fn status(url: &str) -> Value {
    node::status_at(&http(), url).await
}

/// PUT `key` at `url` (the primary): the status code.
async fn put(url: &str, key: &str, value: &str) -> u16 {
    let resp = no_redirects()
        .put(format!("{url}/v1/kv/{key}"))
        .body(value.to_string())
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

/// Polls `cond` every 20 ms until it holds, or panics after `PATIENCE`.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A deadline `PATIENCE` from now for a polling loop.
struct Deadline(tokio::time::Instant);

impl Deadline {
    fn new() -> Deadline {
        Deadline(tokio::time::Instant::now() + PATIENCE)
    }

    /// Panics once past the deadline, else waits a poll interval.
    async fn tick(&self, what: &str) {
        assert!(tokio::time::Instant::now() < self.0, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds `url` as a learner at `primary`, waits until it holds the
/// primary's commit index, then promotes it (retrying `learner_behind`
/// while it catches up, as an operator would).
async fn add_and_promote(primary: &str, url: &str) {
    add_learner(primary, url).await;
    promote(primary, url).await;
}

async fn add_learner(primary: &str, url: &str) {
    let (s, body) = change(primary, json!({ "add_learner": url })).await;
    assert_eq!(s, 200, "add_learner {url}: {body}");
    assert!(body["learners"].as_array().unwrap().contains(&json!(url)));
    assert_eq!(body["committed"], true, "{body}");
}

/// Waits until the node at `url` holds everything the primary has.
async fn caught_up(primary: &str, url: &str) {
    let d = Deadline::new();
    loop {
        let want = status(primary).await["last_index"].as_u64().unwrap();
        if status(url).await["last_index"].as_u64().unwrap() >= want {
            return;
        }
        d.tick(&format!("{url} catching up")).await;
    }
}

async fn promote(primary: &str, url: &str) {
    let d = Deadline::new();
    let last = loop {
        let (s, b) = change(primary, json!({ "promote": url })).await;
        if s == 200 {
            break b;
        }
        assert_eq!(code(&b), "learner_behind", "promote {url}: {s} {b}");
        d.tick(&format!("promoting {url}")).await;
    };
    assert!(
        last["voters"].as_array().unwrap().contains(&json!(url)),
        "{last}"
    );
}

/// Writes `n` values of `size` bytes at `primary` under `prefix`.
async fn fill(primary: &str, prefix: &str, n: usize, size: usize) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let value = format!("{i}-{}", "x".repeat(size));
        assert_eq!(put(primary, &key, &value).await, 200, "{key}");
        acked.push((key, value));
    }
    acked
}

/// Every acknowledged write reads back on every node of `urls`, and their
/// digests agree once replication settles.
async fn check_reads_and_digests(urls: &[String], acked: &[(String, String)]) {
    for url in urls {
        let c = kvclient::Client::new([url.clone()]).unwrap();
        for (k, v) in acked {
            let d = Deadline::new();
            while c.get(k).await.unwrap().as_deref() != Some(v.as_bytes()) {
                d.tick(&format!("{k} on {url}")).await;
            }
        }
    }
    eventually("equal digests", || async {
        let mut d = Vec::new();
        for u in urls {
            d.push(status(u).await["digest"].clone());
        }
        d.windows(2).all(|w| w[0] == w[1])
    })
    .await;
}

/// The primary's configuration index and last index (what a refusal must
/// leave as it was).
async fn marks(url: &str) -> (u64, u64) {
    let s = status(url).await;
    (
        s["config"]["index"].as_u64().unwrap(),
        s["last_index"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_then_shrink_to_three_and_commit_follows_the_voters() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let p = urls[0].clone();
    let m = members(&p).await;
    assert_eq!(m["index"], 0, "bootstrap configuration: {m}");
    assert_eq!(m["voters"].as_array().unwrap().len(), 3);

    // Enough to snapshot and compact the primary's WAL: a learner that
    // joins now needs the snapshot first, then the log.
    let mut acked = fill(&p, "big/", 40, 100_000).await;
    eventually("a snapshot on the primary", || async {
        status(&p).await["snapshot_index"].as_u64().unwrap() > 0
    })
    .await;
    acked.extend(fill(&p, "more/", 20, 100_000).await);

    // A writer runs throughout the growth.
    let writer = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200 {
                let (k, v) = (format!("during/{i}"), format!("v{i}"));
                if put(&p, &k, &v).await == 200 {
                    acked.push((k, v));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    let n3 = join(&tmp, "n3", &urls);
    let n4 = join(&tmp, "n4", &urls);
    let s3 = status(&n3.url()).await;
    assert_eq!(s3["voter"], false, "a --join node is a learner: {s3}");
    add_learner(&p, &n3.url()).await;
    add_learner(&p, &n4.url()).await;
    acked.extend(writer.await.unwrap());
    caught_up(&p, &n3.url()).await;
    caught_up(&p, &n4.url()).await;
    // Two learners hold every write, but only the 3 voters count: with
    // both voter secondaries stopped, nothing commits.
    nodes[1].signal(Sig::SIGSTOP).unwrap();
    nodes[2].signal(Sig::SIGSTOP).unwrap();
    assert_eq!(put(&p, "learners-only", "x").await, 503);
    nodes[1].signal(Sig::SIGCONT).unwrap();
    nodes[2].signal(Sig::SIGCONT).unwrap();
    promote(&p, &n3.url()).await;
    promote(&p, &n4.url()).await;
    let sent_snapshot = nodes[0]
        .log()
        .lines()
        .any(|l| l.contains("sending snapshot") && l.contains(&n3.url()));
    assert!(sent_snapshot, "n3 caught up by a snapshot first");
    println!(
        "n3 snapshot_index {}, last_index {}",
        status(&n3.url()).await["snapshot_index"],
        status(&n3.url()).await["last_index"]
    );
    let all: Vec<String> = urls.iter().cloned().chain([n3.url(), n4.url()]).collect();
    for u in &all {
        eventually(&format!("5 voters on {u}"), || async {
            let m = members(u).await;
            m["voters"].as_array().unwrap().len() == 5 && m["committed"] == true
        })
        .await;
    }
    assert_eq!(status(&n4.url()).await["voter"], true);

    // 5 voters: 3 needed. Two secondaries stopped: writes still commit.
    nodes[1].signal(Sig::SIGSTOP).unwrap();
    nodes[2].signal(Sig::SIGSTOP).unwrap();
    acked.extend(fill(&p, "two-down/", 5, 10).await);
    // A third: no majority of the 5, not acknowledged.
    n3.signal(Sig::SIGSTOP).unwrap();
    let resp = no_redirects()
        .put(format!("{p}/v1/kv/three-down"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "commit_timeout", "{body}");
    for n in [&nodes[1], &nodes[2], &n3] {
        n.signal(Sig::SIGCONT).unwrap();
    }
    acked.extend(fill(&p, "back/", 5, 10).await);

    // Hand the lead to n1, then remove the old primary and n2.
    let resp = http()
        .post(format!("{p}/v1/admin/transfer"))
        .json(&json!({ "to": urls[1], "timeout_ms": 10_000 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let q = urls[1].clone();
    for gone in [&urls[0], &urls[2]] {
        // The new primary's no-op must commit first.
        let d = Deadline::new();
        loop {
            let (s, b) = change(&q, json!({ "remove": gone })).await;
            if s == 200 {
                break;
            }
            assert_eq!(
                code(&b),
                "config_change_in_progress",
                "remove {gone}: {s} {b}"
            );
            d.tick(&format!("removing {gone}")).await;
        }
    }
    let m = members(&q).await;
    assert_eq!(m["voters"].as_array().unwrap().len(), 3, "{m}");
    assert!(m["learners"].as_array().unwrap().is_empty(), "{m}");
    // The removed old primary learns it is no voter, and may not lead.
    eventually("n0 knows it was removed", || async {
        status(&urls[0]).await["voter"] == false
    })
    .await;
    let (answer, body) = promote_to_primary(&urls[0]).await;
    assert_eq!((answer, code(&body)), (409, "learner"), "{body}");

    // Voters n1, n3, n4: 2 of 3 needed.
    n3.signal(Sig::SIGSTOP).unwrap();
    acked.extend(fill(&q, "of-three/", 5, 10).await);
    n4.signal(Sig::SIGSTOP).unwrap();
    assert_eq!(put(&q, "lonely", "x").await, 503);
    n3.signal(Sig::SIGCONT).unwrap();
    n4.signal(Sig::SIGCONT).unwrap();
    acked.extend(fill(&q, "after/", 5, 10).await);

    let left = vec![urls[1].clone(), n3.url(), n4.url()];
    check_reads_and_digests(&left, &acked).await;
    println!("{} acknowledged writes read back on {left:?}", acked.len());
    for n in nodes.iter_mut() {
        let _ = n.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_never_makes_a_commit() {
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let p = urls[0].clone();
    // Two learners: counted as voters, they would make 3 of 5 with the
    // primary.
    let n3 = join(&tmp, "n3", &urls);
    let n4 = join(&tmp, "n4", &urls);
    add_learner(&p, &n3.url()).await;
    add_learner(&p, &n4.url()).await;
    fill(&p, "k", 3, 10).await;
    nodes[1].signal(Sig::SIGSTOP).unwrap();
    nodes[2].signal(Sig::SIGSTOP).unwrap();
    assert_eq!(put(&p, "held-by-the-learner", "x").await, 503);
    let last = status(&p).await["last_index"].as_u64().unwrap();
    for n in [&n3, &n4] {
        eventually("the learners hold the write", || async {
            status(&n.url()).await["last_index"].as_u64().unwrap() >= last
        })
        .await;
    }
    let s = status(&p).await;
    assert!(
        s["commit_index"].as_u64().unwrap() < last,
        "the learner's acknowledgement committed it: {s}"
    );
    nodes[1].signal(Sig::SIGCONT).unwrap();
    nodes[2].signal(Sig::SIGCONT).unwrap();
    eventually("it commits once the voters are back", || async {
        status(&p).await["commit_index"].as_u64().unwrap() >= last
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_count_the_voters_of_the_configuration() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let p = urls[0].clone();
    let n3 = join(&tmp, "n3", &urls);
    let n4 = join(&tmp, "n4", &urls);
    add_and_promote(&p, &n3.url()).await;
    add_and_promote(&p, &n4.url()).await;
    fill(&p, "k", 3, 10).await;
    for u in [&n3.url(), &n4.url()] {
        eventually("the configuration committed there", || async {
            members(u).await["voters"].as_array().unwrap().len() == 5
        })
        .await;
    }
    // The primary dies; only n1 and n2 are reachable: 2 of 5.
    nodes[0].kill9().unwrap();
    n3.signal(Sig::SIGSTOP).unwrap();
    n4.signal(Sig::SIGSTOP).unwrap();
    let (answer, body) = promote_to_primary(&urls[1]).await;
    assert_eq!((answer, code(&body)), (409, "no_majority"), "{body}");
    // With n3 back, 3 of 5.
    n3.signal(Sig::SIGCONT).unwrap();
    let (answer, body) = promote_to_primary(&urls[1]).await;
    assert_eq!(answer, 200, "{body}");
    n4.signal(Sig::SIGCONT).unwrap();
    assert_eq!(put(&urls[1], "after", "x").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_configuration_of_the_log() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let p = urls[0].clone();
    let mut n3 = join(&tmp, "n3", &urls);
    add_and_promote(&p, &n3.url()).await;
    fill(&p, "k", 3, 10).await;
    let want = members(&p).await;
    assert_eq!(want["voters"].as_array().unwrap().len(), 4);
    for u in urls.iter().chain([&n3.url()]) {
        eventually("the configuration committed everywhere", || async {
            let m = members(u).await;
            m["index"] == want["index"] && m["committed"] == true
        })
        .await;
    }
    for n in nodes.iter_mut().chain([&mut n3]) {
        n.terminate().unwrap();
        n.restart().unwrap();
    }
    for u in urls.iter().chain([&n3.url()]) {
        let m = members(u).await;
        assert_eq!(m["index"], want["index"], "{u}: {m}");
        assert_eq!(m["voters"], want["voters"], "{u}: {m}");
    }
    assert_eq!(
        status(&n3.url()).await["voter"],
        true,
        "a promoted learner stays a voter"
    );
    // The restarted cluster elects a primary among its 4 voters.
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).chain([n3.port]).collect();
    let at = kvstore_testkit::cluster::promote_survivor(&ports, PATIENCE).unwrap();
    let primary = if at == 3 { n3.url() } else { urls[at].clone() };
    assert_eq!(put(&primary, "after-restart", "x").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let p = urls[0].clone();
    fill(&p, "k", 2, 10).await;
    // An unreachable learner: it never catches up.
    let ghost = format!("http://127.0.0.1:{}", kvstore_testkit::free_port());
    let (s, b) = change(&p, json!({ "add_learner": ghost })).await;
    assert_eq!(s, 200, "{b}");
    let before = marks(&p).await;
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!("not an object"), 400, "invalid_member"),
        (json!({}), 400, "invalid_member"),
        (
            json!({ "add_learner": "http://a:1", "remove": "http://a:1" }),
            400,
            "invalid_member",
        ),
        (
            json!({ "add_learner": "http://a:1", "colour": "red" }),
            400,
            "invalid_member",
        ),
        (json!({ "add_learner": "a:1" }), 400, "invalid_member"),
        (
            json!({ "add_learner": "http://a:1/path" }),
            400,
            "invalid_member",
        ),
        (json!({ "add_learner": urls[1] }), 409, "already_member"),
        (
            json!({ "promote": "http://127.0.0.1:1" }),
            409,
            "not_member",
        ),
        (json!({ "remove": "http://127.0.0.1:1" }), 409, "not_member"),
        (json!({ "promote": urls[1] }), 409, "not_learner"),
        (json!({ "promote": ghost }), 409, "learner_behind"),
        (json!({ "remove": p }), 409, "remove_self"),
    ];
    for (body, want_status, want_code) in &cases {
        let (s, b) = change(&p, body.clone()).await;
        assert_eq!((s, code(&b)), (*want_status, *want_code), "{body}: {b}");
        assert_eq!(marks(&p).await, before, "{body} changed something");
    }
    // A secondary points at the primary.
    let (s, b) = change(&urls[1], json!({ "remove": ghost })).await;
    assert_eq!((s, code(&b)), (307, "not_primary"), "{b}");
    assert_eq!(marks(&p).await, before);

    // No quorum: the change times out (503), in effect but uncommitted;
    // the next change is refused until it commits.
    nodes[1].signal(Sig::SIGSTOP).unwrap();
    nodes[2].signal(Sig::SIGSTOP).unwrap();
    let (s, b) = change(&p, json!({ "remove": ghost, "timeout_ms": 300 })).await;
    assert_eq!((s, code(&b)), (503, "commit_timeout"), "{b}");
    let m = members(&p).await;
    assert_eq!(m["committed"], false, "{m}");
    assert!(
        m["learners"].as_array().unwrap().is_empty(),
        "in effect: {m}"
    );
    let pending = marks(&p).await;
    let (s, b) = change(&p, json!({ "add_learner": ghost })).await;
    assert_eq!((s, code(&b)), (409, "config_change_in_progress"), "{b}");
    assert_eq!(marks(&p).await, pending);
    nodes[1].signal(Sig::SIGCONT).unwrap();
    nodes[2].signal(Sig::SIGCONT).unwrap();
    eventually("the removal commits", || async {
        members(&p).await["committed"] == true
    })
    .await;

    // A fixed quorum refuses every change.
    let fixed_tmp = TempDir::new().unwrap();
    let mut flags = FLAGS.to_vec();
    flags.extend(["--sync-replicas", "1"]);
    let fixed = start_cluster(fixed_tmp.path(), &flags).unwrap();
    let f = fixed[0].url();
    fill(&f, "k", 1, 1).await;
    let before = marks(&f).await;
    let (s, b) = change(&f, json!({ "add_learner": ghost })).await;
    assert_eq!((s, code(&b)), (409, "fixed_quorum"), "{b}");
    assert_eq!(marks(&f).await, before);

    // A single node has no configuration to change.
    let single = Kvd::start(&fixed_tmp.path().join("single"), &[]).unwrap();
    let (s, b) = change(&single.url(), json!({ "add_learner": ghost })).await;
    assert_eq!((s, code(&b)), (409, "no_peers"), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_stays_a_learner_when_restarted_without_join() {
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), FLAGS).unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let mut n3 = join(&tmp, "n3", &urls);
    // Restarted before anyone added it, and without the flag: its data dir
    // remembers the join, so `--peers` is not taken as a configuration of
    // voters that includes it.
    n3.terminate().unwrap();
    n3.restart_without("--join").unwrap();
    let s = status(&n3.url()).await;
    assert_eq!(s["voter"], false, "{s}");
    let m = members(&n3.url()).await;
    assert!(m["voters"].as_array().unwrap().is_empty(), "{m}");
    let (answer, body) = promote_to_primary(&n3.url()).await;
    assert_eq!((answer, code(&body)), (409, "learner"), "{body}");
    // Added and promoted, it is a voter like any other.
    add_and_promote(&urls[0], &n3.url()).await;
    assert_eq!(status(&n3.url()).await["voter"], true);
}
