//! Primary/secondary replication: log shipping with
//! majority commit, reads on every node, redirects from secondaries.

use std::time::Duration;

use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::{http_get, is_stopped, node, start_cluster, wait_until, Kvd, Sig};
use serde_json::Value;
use tempfile::TempDir;

/// Three nodes on loopback: n0 bootstraps as primary.
fn cluster(tmp: &TempDir) -> Vec<Kvd> {
    cluster_with(tmp, &[])
}

fn cluster_with(tmp: &TempDir, extra: &[&str]) -> Vec<Kvd> {
    start_cluster(tmp.path(), extra).unwrap()
}

async fn status(http: &reqwest::Client, node: &Kvd) -> Value {
    node::status_at(http, &node.url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_reach_every_node_and_digests_match() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp);
    let http = node::http();
    let client = kvclient::Client::new([nodes[0].url()]).unwrap();

    let writers: Vec<_> = (0..16)
        .map(|w| {
            let c = client.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    c.set(&format!("w{w}/k{i}"), format!("v{w}-{i}"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    client
        .bulk_set(&[
            ("bulk/a".to_string(), "1".into()),
            ("bulk/b".to_string(), "2".into()),
        ])
        .await
        .unwrap();

    // Every acknowledged write is readable on both secondaries.
    for node in &nodes[1..] {
        let c = kvclient::Client::new([node.url()]).unwrap();
        for w in 0..16 {
            for i in 0..25 {
                let key = format!("w{w}/k{i}");
                let want = format!("v{w}-{i}");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let got = c.get(&key).await.unwrap();
                    if got.as_deref() == Some(want.as_bytes()) {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{key} on {}: {got:?}",
                        node.url()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    // Once writes stop, all three digests are equal.
    let mut digests = Vec::new();
    for node in &nodes {
        let s = status(&http, node).await;
        digests.push(s["digest"].as_str().unwrap().to_string());
        assert_eq!(s["keys"], 16 * 25 + 2, "{s}");
    }
    assert!(digests.windows(2).all(|d| d[0] == d[1]), "{digests:?}");

    let p = status(&http, &nodes[0]).await;
    assert_eq!(p["role"], "primary");
    assert_eq!(p["mode"], "primary-secondary");
    assert_eq!(p["peers"].as_array().unwrap().len(), 2);
    let s = status(&http, &nodes[1]).await;
    assert_eq!(s["role"], "secondary");
    assert_eq!(s["primary"], nodes[0].url());
}

#[tokio::test]
async fn a_secondary_redirects_writes_and_the_client_follows() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp);

    // The secondary learns the primary from its first append (heartbeat).
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(nodes[1].port, "/v1/status", Duration::from_secs(1))
            .ok()
            .and_then(|(_, b)| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["primary"] == nodes[0].url().as_str())
    }));
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // A write with a query (a route takes only its own parameters, so an
    // invented one would be refused before the redirect).
    let resp = no_follow
        .delete(format!("{}/v1/kv?prefix=redirected", nodes[1].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(resp.headers()["x-kv-primary"], nodes[0].url().as_str());
    assert_eq!(
        resp.headers()["location"],
        format!("{}/v1/kv?prefix=redirected", nodes[0].url()).as_str()
    );

    let via_secondary = kvclient::Client::new([nodes[1].url()]).unwrap();
    via_secondary
        .set("followed", "yes".to_string())
        .await
        .unwrap();
    let on_primary = kvclient::Client::new([nodes[0].url()]).unwrap();
    assert_eq!(
        on_primary.get("followed").await.unwrap().as_deref(),
        Some(&b"yes"[..])
    );
}

#[tokio::test]
async fn malformed_or_misdirected_replication_traffic_is_refused() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp);
    let http = node::http();
    let before = status(&http, &nodes[1]).await;

    let resp = http
        .post(format!("{}/internal/append", nodes[1].url()))
        .body("not an append")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_append");
    let after = status(&http, &nodes[1]).await;
    assert_eq!(before["epoch"], after["epoch"]);

    // A single node takes no replication traffic.
    let single = Kvd::start(&tmp.path().join("single"), &[]).unwrap();
    let resp = http
        .post(format!("{}/internal/append", single.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

async fn promote(http: &reqwest::Client, node: &Kvd) -> (u16, Value) {
    let resp = http
        .post(format!("{}/promote_to_primary", node.url()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_secondary_takes_over_and_the_old_primary_rejoins() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster(&tmp);
    let http = node::http();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let client = kvclient::Client::builder()
        .endpoints(urls.clone())
        .build()
        .unwrap();
    for i in 0..100 {
        client
            .set(&format!("before/{i}"), format!("b{i}"))
            .await
            .unwrap();
    }

    nodes[0].kill9().unwrap();
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["epoch"], 2);

    for i in 0..100 {
        client
            .set(&format!("after/{i}"), format!("a{i}"))
            .await
            .unwrap();
    }
    let n1 = kvclient::Client::new([nodes[1].url()]).unwrap();
    for (prefix, v) in [("before", "b"), ("after", "a")] {
        for i in 0..100 {
            let got = n1.get(&format!("{prefix}/{i}")).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(format!("{v}{i}").as_bytes()),
                "{prefix}/{i}"
            );
        }
    }

    // The old primary comes back as a secondary of epoch 2 and converges.
    nodes[0].restart().unwrap();
    wait_rejoined(&http, &nodes, 2).await;
    let s = futures_status(&http, &nodes).await;
    assert_eq!(s[1]["role"], "primary");
    assert_eq!(s[0]["keys"], 200);
}

async fn futures_status(http: &reqwest::Client, nodes: &[Kvd]) -> Vec<Value> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(status(http, n).await);
    }
    out
}

/// What an old primary answered one direct write: a status code, or the
/// error that left the write without an answer.
#[derive(Debug, Clone)]
struct Answer {
    key: String,
    sent: tokio::time::Instant,
    answered: tokio::time::Instant,
    outcome: Result<u16, String>,
}

impl Answer {
    /// A refusal that wrote nothing: a redirect to the new primary, a
    /// stale-epoch conflict, or "cannot commit now".
    fn is_refusal(&self) -> bool {
        matches!(self.outcome, Ok(307 | 409 | 503))
    }
}

/// Writers that PUT straight at one node (following no redirects) until
/// stopped, recording every answer: a deposed primary must never
/// acknowledge (200), and the answers show that requests did reach it.
struct DirectWriters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests started so far.
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answers: std::sync::Arc<std::sync::Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DirectWriters {
    const WRITERS: usize = 4;

    fn start(url: String, prefix: &str) -> DirectWriters {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let no_follow = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(node::REQUEST_TIMEOUT)
            .build()
            .unwrap();
        let tasks = (0..Self::WRITERS)
            .map(|w| {
                let (no_follow, stop, url) = (no_follow.clone(), stop.clone(), url.clone());
                let (sent, answers) = (sent.clone(), answers.clone());
                let prefix = format!("{prefix}/{w}");
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("{prefix}/{i}");
                        i += 1;
                        let at = tokio::time::Instant::now();
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let outcome = no_follow
                            .put(format!("{url}/v1/kv/{key}"))
                            .body("x")
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .map_err(|e| e.to_string());
                        answers.lock().unwrap().push(Answer {
                            key,
                            sent: at,
                            answered: tokio::time::Instant::now(),
                            outcome,
                        });
                        // Pacing, so that four writers do not saturate a
                        // debug build on a small machine.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        DirectWriters {
            stop,
            sent,
            answers,
            tasks,
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// Waits (generously) until `cond` holds for the answers so far.
    async fn wait_for(&self, what: &str, cond: impl Fn(&[Answer]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !cond(&self.answers()) {
            let answers = self.answers();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: never happened; {} answers, the last: {:?}",
                answers.len(),
                &answers[answers.len().saturating_sub(3)..]
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writers; every answer, after checking that none was an
    /// acknowledgement or anything but a refusal or a lost connection.
    async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        let acked: Vec<&String> = answers
            .iter()
            .filter(|a| a.outcome == Ok(200))
            .map(|a| &a.key)
            .collect();
        assert!(acked.is_empty(), "the old primary acknowledged {acked:?}");
        let odd: Vec<&Answer> = answers
            .iter()
            .filter(|a| a.outcome.is_ok() && !a.is_refusal())
            .collect();
        assert!(odd.is_empty(), "unexpected answers: {odd:?}");
        answers
    }
}

/// Waits until every node has the same digest and epoch `epoch`, and node
/// 0 is a secondary again.
async fn wait_rejoined(http: &reqwest::Client, nodes: &[Kvd], epoch: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = futures_status(http, nodes).await;
        if s.iter()
            .all(|x| x["digest"] == s[0]["digest"] && x["epoch"] == epoch)
            && s[0]["role"] == "secondary"
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn promotion_without_a_majority_or_peers_is_refused_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster(&tmp);
    let http = node::http();
    nodes[0].kill9().unwrap();
    nodes[2].kill9().unwrap();
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "no_majority");
    let s = status(&http, &nodes[1]).await;
    assert_eq!(s["epoch"], 1, "a refused promotion must not bump the epoch");
    assert_eq!(s["role"], "secondary");

    let single = Kvd::start(&tmp.path().join("single"), &[]).unwrap();
    let (code, body) = promote(&http, &single).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "no_peers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_reads_need_the_primary_and_a_majority() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster(&tmp);
    let http = node::http();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let client = kvclient::Client::new([nodes[0].url()]).unwrap();
    client.set("c", "1".to_string()).await.unwrap();
    assert_eq!(
        client.get_consistent("c").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );

    assert!(wait_until(Duration::from_secs(10), || {
        http_get(nodes[1].port, "/v1/status", Duration::from_secs(1))
            .ok()
            .and_then(|(_, b)| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["primary"] == nodes[0].url().as_str())
    }));
    let resp = no_follow
        .get(format!("{}/v1/kv/c?consistent=true", nodes[1].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        307,
        "a secondary sends consistent reads to the primary"
    );

    let metrics = http
        .get(format!("{}/metrics", nodes[0].url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "kvd_replication_lag_entries{{peer=\"{}\"}}",
            nodes[1].url()
        )),
        "{metrics}"
    );

    // Without a majority the primary cannot prove it still leads.
    nodes[1].kill9().unwrap();
    nodes[2].kill9().unwrap();
    let resp = http
        .get(format!("{}/v1/kv/c?consistent=true", nodes[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // A plain read is still served locally.
    let resp = http
        .get(format!("{}/v1/kv/c", nodes[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_primary_acknowledges_nothing_after_it_wakes() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster_with(&tmp, &["--commit-timeout-ms", "1500"]);
    let http = node::http();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let client = kvclient::Client::builder().endpoints(urls).build().unwrap();
    for i in 0..50 {
        client
            .set(&format!("before/{i}"), format!("b{i}"))
            .await
            .unwrap();
    }

    // Both secondaries hold everything first, so that n1 is as up to date
    // as n2 and may win (a write commits once ONE secondary has it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (
            status(&http, &nodes[1]).await,
            status(&http, &nodes[2]).await,
        );
        if a["last_index"] == b["last_index"] && a["last_index"] != serde_json::json!(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a} {b}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes[0].signal(Sig::SIGSTOP).unwrap();
    let n0_pid = nodes[0].pid().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || is_stopped(n0_pid)),
        "n0 never showed as stopped"
    );
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 200, "{body}");
    let c12 = kvclient::Client::new([nodes[1].url(), nodes[2].url()]).unwrap();
    for i in 0..50 {
        c12.set(&format!("after/{i}"), format!("a{i}"))
            .await
            .unwrap();
    }

    // Writers aim straight at the old primary (no redirects followed) from
    // before it wakes until the cluster has converged: every writer has a
    // request waiting in the stopped node's socket when it wakes.
    let writers = DirectWriters::start(nodes[0].url(), "stale");
    while writers.sent() < DirectWriters::WRITERS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let woke = tokio::time::Instant::now();
    nodes[0].signal(Sig::SIGCONT).unwrap();
    wait_rejoined(&http, &nodes, 2).await;
    // A request sent while n0 was stopped reached it and was refused once
    // it woke, believing itself primary of epoch 1.
    writers
        .wait_for("a refusal of a request held across the wake", |answers| {
            answers.iter().any(|a| a.sent < woke && a.is_refusal())
        })
        .await;
    writers.stop().await;
    let n0 = kvclient::Client::new([nodes[0].url()]).unwrap();
    for (prefix, v) in [("before", "b"), ("after", "a")] {
        for i in 0..50 {
            let got = n0.get(&format!("{prefix}/{i}")).await.unwrap();
            assert_eq!(got.as_deref(), Some(format!("{v}{i}").as_bytes()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_a_node_behind_a_reachable_peer_is_refused() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster(&tmp);
    let http = node::http();
    // n2 misses writes that n0 and n1 commit, then n0 dies: n2 can only
    // catch up from n1, so it stays behind n1 until n1 leads.
    nodes[2].signal(Sig::SIGSTOP).unwrap();
    let client = kvclient::Client::new([nodes[0].url()]).unwrap();
    for i in 0..20 {
        client.set(&format!("k{i}"), "v".to_string()).await.unwrap();
    }
    nodes[0].kill9().unwrap();
    nodes[2].signal(Sig::SIGCONT).unwrap();

    let before = status(&http, &nodes[2]).await;
    let (code, body) = promote(&http, &nodes[2]).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "behind_peer", "{body}");
    let after = status(&http, &nodes[2]).await;
    assert_eq!(
        before["epoch"], after["epoch"],
        "a refused promotion changes nothing"
    );
    assert_eq!(after["role"], "secondary");
    // The up-to-date one wins, and then brings n2 up to date.
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 200, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (
            status(&http, &nodes[1]).await,
            status(&http, &nodes[2]).await,
        );
        if a["digest"] == b["digest"] && b["keys"] == 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 never caught up: {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_failovers_under_16_writers_lose_no_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster_with(&tmp, &["--commit-timeout-ms", "2000"]);
    let http = node::http();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let c = kvclient::Client::builder()
                .endpoints(urls.clone())
                .retry_deadline(Duration::from_secs(20))
                .build()
                .unwrap();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (key, value) = (format!("w{w}/{i}"), format!("{w}-{i}"));
                    i += 1;
                    // An error leaves the outcome unknown; only acks count.
                    if c.set(&key, value.clone()).await.is_ok() {
                        acked.lock().unwrap().push((key, value));
                    }
                }
            })
        })
        .collect();

    // Each primary acknowledges writes before it is killed (and the last
    // one before the writers stop): every failover is tested under load.
    let acked_grows = |round: usize| {
        let acked = acked.clone();
        let from = acked.lock().unwrap().len();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while acked.lock().unwrap().len() < from + 20 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: no writes acknowledged by the new primary"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let mut primary = 0usize;
    for round in 0..10 {
        acked_grows(round).await;
        nodes[primary].kill9().unwrap();
        // Promote the most up-to-date survivor (the other would be refused).
        let others: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
        let mut lasts = Vec::new();
        for &i in &others {
            lasts.push((
                status(&http, &nodes[i]).await["last_index"]
                    .as_u64()
                    .unwrap(),
                i,
            ));
        }
        lasts.sort();
        lasts.reverse();
        // The statuses can be a moment old (the dead primary's last appends
        // may still land): if the election names the other node as more
        // up to date, promote that one, as the supervisor would.
        // On a loaded machine a vote can also miss its majority (a peer's
        // answer came after the deadline): try again, as kvsup does.
        let mut next = None;
        let mut refusals = Vec::new();
        'attempts: for _ in 0..20 {
            for &(_, i) in &lasts {
                let (code, body) = promote(&http, &nodes[i]).await;
                if code == 200 {
                    next = Some(i);
                    break 'attempts;
                }
                let why = body["error"]["code"].as_str().unwrap_or("").to_string();
                assert!(
                    ["behind_peer", "no_majority", "not_enough_votes"].contains(&why.as_str()),
                    "round {round}: {body}"
                );
                refusals.push(body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next =
            next.unwrap_or_else(|| panic!("round {round}: nobody could be promoted: {refusals:?}"));
        nodes[primary].restart().unwrap();
        primary = next;
    }
    acked_grows(10).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few writes went through: {}",
        acked.len()
    );
    let on_primary = kvclient::Client::new([nodes[primary].url()]).unwrap();
    for (k, v) in &acked {
        let got = on_primary.get(k).await.unwrap();
        assert_eq!(got.as_deref(), Some(v.as_bytes()), "acknowledged {k} lost");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = futures_status(&http, &nodes).await;
        if s.iter().all(|x| x["digest"] == s[0]["digest"]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} acknowledged writes across 10 failovers, none lost",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_from_a_stale_epoch_gets_409_and_changes_nothing() {
    use kvd::replication::node::encode_append;
    use kvd::replication::rules::LogPos;

    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp);
    let http = node::http();
    // A planned switchover: n1 wins epoch 2 while n0 is alive.
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 200, "{body}");
    // Let n2 take the new primary's no-op, so nothing else moves its log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let (p, s) = (
            status(&http, &nodes[1]).await,
            status(&http, &nodes[2]).await,
        );
        // The new primary's no-op (index 1) is there and committed.
        if s["epoch"] == 2 && s["last_index"] == 1 && p["last_index"] == 1 && s["commit_index"] == 1
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 never caught up: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let record = kvd::storage::Record {
        index: 1,
        epoch: 1,
        ts: kvd::storage::Timestamp::default(),
        op: kvd::storage::Op::Noop,
    };
    let stale = encode_append(1, LogPos::ZERO, 0, &nodes[0].url(), &[record]);
    let resp = http
        .post(format!("{}/internal/append", nodes[2].url()))
        .body(stale)
        .send()
        .await
        .unwrap();
    let code = resp.status();
    let epoch_header = resp.headers().get("x-kv-epoch").cloned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code, 409, "{body}");
    assert_eq!(epoch_header.unwrap(), "2");
    assert_eq!(body["error"]["code"], "stale_epoch");
    let after = status(&http, &nodes[2]).await;
    assert_eq!(before["last_index"], after["last_index"]);
    assert_eq!(after["epoch"], 2);
    // The old primary stepped down when it saw the new epoch.
    let old = status(&http, &nodes[0]).await;
    assert_eq!(old["role"], "secondary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_behind_the_primarys_wal_catches_up_by_snapshot() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster_with(
        &tmp,
        &["--snapshot-every-mib", "4", "--wal-segment-mib", "1"],
    );
    let http = node::http();
    nodes[2].kill9().unwrap();

    // 200k writes (20 bulks of 10k keys, 100-byte values) while n2 is down:
    // several snapshots, and the WAL segments n2 would need are deleted.
    let client = kvclient::Client::new([nodes[0].url()]).unwrap();
    let value = kvclient::Bytes::from("x".repeat(100));
    for chunk in 0..20 {
        let items: Vec<(String, kvclient::Bytes)> = (0..10_000)
            .map(|i| (format!("k{chunk}/{i}"), value.clone()))
            .collect();
        client.bulk_set(&items).await.unwrap();
    }
    for i in 0..50 {
        client
            .set(&format!("tail/{i}"), "t".to_string())
            .await
            .unwrap();
    }
    let first_segment = nodes[0]
        .data_dir
        .join("wal")
        .join("00000000000000000001.wal");
    assert!(
        wait_until(Duration::from_secs(20), || !first_segment.exists()),
        "the primary never compacted its WAL"
    );

    nodes[2].restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = futures_status(&http, &nodes).await;
        if s.iter().all(|x| x["digest"] == s[0]["digest"]) && s[2]["keys"] == 200_050 {
            assert!(s[2]["snapshot_index"].as_u64().unwrap() > 0, "{}", s[2]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no catch-up: {:?}",
            s[2]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it follows the log again afterwards.
    client
        .set("after-install", "yes".to_string())
        .await
        .unwrap();
    let n2 = kvclient::Client::new([nodes[2].url()]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while n2.get("after-install").await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 stopped following"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        nodes[0].log().contains("sending snapshot"),
        "n2 caught up without a snapshot install, so the test proved nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_acknowledges_nothing_and_rejoins_after_the_heal() {
    // Every link goes through a proxy the test can cut.
    let c = Cluster::start_with(|_| vec!["--commit-timeout-ms".into(), "1500".into()]);
    let nodes = &c.nodes;
    let http = node::http();
    let n0 = kvclient::Client::new([nodes[0].url()]).unwrap();
    for i in 0..50 {
        n0.set(&format!("before/{i}"), format!("b{i}"))
            .await
            .unwrap();
    }

    // Cut n0 off from both secondaries, both directions.
    c.isolate(0);
    let writers = DirectWriters::start(nodes[0].url(), "cut");

    // The majority side elects n1 and takes writes.
    let (code, body) = promote(&http, &nodes[1]).await;
    assert_eq!(code, 200, "{body}");
    let majority = kvclient::Client::new([nodes[1].url(), nodes[2].url()]).unwrap();
    for i in 0..50 {
        majority
            .set(&format!("after/{i}"), format!("a{i}"))
            .await
            .unwrap();
    }
    // Writes reached n0 and were refused while it was cut off, and it has
    // not heard of epoch 2 (the cut held).
    writers
        .wait_for("a refusal while cut off", |answers| {
            answers.iter().any(Answer::is_refusal)
        })
        .await;
    let cut_off = status(&http, &nodes[0]).await;
    assert_eq!(cut_off["epoch"], 1, "n0 was not cut off: {cut_off}");
    let healed = tokio::time::Instant::now();

    // Heal: n0 sees epoch 2, steps down, drops its unacknowledged suffix
    // and converges.
    c.heal();
    wait_rejoined(&http, nodes, 2).await;
    let answers = writers.stop().await;
    let refused_while_cut = answers
        .iter()
        .filter(|a| a.answered < healed && a.is_refusal())
        .count();
    eprintln!(
        "n0 answered {} writes, {refused_while_cut} refusals while cut off",
        answers.len()
    );
    for (prefix, v) in [("before", "b"), ("after", "a")] {
        for i in 0..50 {
            let got = n0.get(&format!("{prefix}/{i}")).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(format!("{v}{i}").as_bytes()),
                "{prefix}/{i}"
            );
        }
    }
    drop(c);
}
