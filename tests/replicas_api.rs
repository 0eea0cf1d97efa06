//! Three replicas agree on versions (docs/DESIGN.md §2.10): after a mix
//! of puts, conditional puts and deletes (some refused with 412), bulks,
//! transactions with compares and prefix deletes, sent to every node (a
//! secondary redirects writes to the primary), and once every node has
//! applied the same index: a full range with versions, every sampled
//! key's HEAD and a read-only transaction's reads are the same on every
//! node. Then a secondary is stopped while the primary writes past its
//! snapshot threshold and compacts its WAL, so the secondary catches up by
//! a snapshot install, and they agree again.

use std::time::Duration;

use kvstore_testkit::api::{self, Item, Meta, Outcome, Precondition, RangeQuery};
use kvstore_testkit::{node, start_cluster, wal, Kvd};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tempfile::TempDir;

const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 150;
/// Keys the writers share, so their conditional writes race.
const SHARED_KEYS: usize = 30;

fn shared(k: usize) -> String {
    format!("r/{k}")
}

/// One writer's random mix, each op sent to a random node; counts of
/// (done, refused by their precondition).
async fn mixed_writes(urls: Vec<String>, w: usize) -> (u64, u64) {
    let http = api::client(node::REQUEST_TIMEOUT);
    let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
    let (mut done, mut refused) = (0, 0);
    for i in 0..OPS_PER_WRITER {
        let url = &urls[rng.gen_range(0..urls.len())];
        let key = shared(rng.gen_range(0..SHARED_KEYS));
        let value = format!("{w}-{i}");
        let out = match rng.gen_range(0..8) {
            0 | 1 => api::put_if(&http, url, &key, value.as_bytes(), Precondition::None).await,
            2 => {
                let seen = api::get_versioned(&http, url, &key, true).await.unwrap();
                let pre = seen.map_or(Precondition::IfAbsent, |s| {
                    Precondition::IfMatch(s.meta.mod_index)
                });
                api::put_if(&http, url, &key, value.as_bytes(), pre).await
            }
            3 => api::put_if(&http, url, &key, value.as_bytes(), Precondition::IfAbsent).await,
            4 => api::delete_if(&http, url, &key, Precondition::IfExists).await,
            5 => api::txn(&http, url, &txn_body(&key, &value)).await,
            6 => bulk(&http, url, &format!("b/{w}/{}", i % 10), &value).await,
            _ => {
                let prefix = format!("r/{}", rng.gen_range(1..3));
                api::delete_prefix(&http, url, &prefix).await
            }
        };
        match out {
            Outcome::Done(_) => done += 1,
            Outcome::PreconditionFailed(_) => refused += 1,
            other => panic!("writer {w} op {i}: {other:?}"),
        }
    }
    (done, refused)
}

/// A transaction with a compare that holds about half the time, writes in
/// both branches and reads.
fn txn_body(key: &str, value: &str) -> Value {
    json!({
        "compare": [{"key": key, "target": "version", "op": ">", "value": 1}],
        "success": [
            {"put": {"key": key, "value": value}},
            {"delete": {"key": "r/0"}},
            {"get": {"key": key}},
        ],
        "failure": [
            {"put": {"key": key, "value": {"base64": "AAEC"}}},
            {"range": {"prefix": "r/", "limit": 5}},
        ],
    })
}

async fn bulk(http: &reqwest::Client, url: &str, prefix: &str, value: &str) -> Outcome {
    let items: Vec<Value> = (0..5)
        .map(|j| json!({"key": format!("{prefix}/{j}"), "value": value}))
        .collect();
    let body = json!({ "items": items });
    let url = format!("{url}/v1/bulk");
    let sent = api::send_following(&url, |u| http.post(u).json(&body)).await;
    api::outcome(sent).await
}

/// Waits until every node has applied the same index, its last.
async fn wait_applied_alike(http: &reqwest::Client, nodes: &[Kvd]) {
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        last.clear();
        for n in nodes {
            let s = node::status(http, n).await;
            last.push((
                node::field(&s, "applied_index"),
                node::field(&s, "last_index"),
            ));
        }
        if last.windows(2).all(|w| w[0] == w[1]) && last[0].0 == last[0].1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nodes never applied the same index: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every key of a node with its value and versions, paged by 1000.
async fn full_range(http: &reqwest::Client, node: &Kvd) -> Vec<Item> {
    let q = RangeQuery {
        limit: Some(1000),
        ..RangeQuery::default()
    };
    let pages = api::range_all(http, &node.url(), &q, 10_000).await.unwrap();
    pages.into_iter().flat_map(|p| p.items).collect()
}

/// The nodes agree: full ranges, HEAD of the shared keys and every 100th
/// other key, and a read-only transaction's reads on the primary match
/// what every node holds. Returns the number of keys.
async fn assert_replicas_agree(http: &reqwest::Client, nodes: &[Kvd], when: &str) -> usize {
    wait_applied_alike(http, nodes).await;
    let mut ranges = Vec::new();
    for n in nodes {
        ranges.push(full_range(http, n).await);
    }
    for (i, r) in ranges.iter().enumerate().skip(1) {
        let first = r.iter().zip(&ranges[0]).find(|(a, b)| a != b);
        assert!(
            r == &ranges[0],
            "{when}: n{i}'s range differs from n0's ({} vs {} items; first: {first:?})",
            r.len(),
            ranges[0].len()
        );
    }
    let items = &ranges[0];
    assert!(
        items.iter().any(|i| i.meta.version > 1),
        "{when}: no key was rewritten"
    );

    let sample = items
        .iter()
        .enumerate()
        .filter(|(j, i)| i.key.starts_with("r/") || j % 100 == 0);
    for (_, item) in sample {
        for (i, n) in nodes.iter().enumerate() {
            let head = api::head_meta(http, &n.url(), &item.key).await.unwrap();
            assert_eq!(head, Some(item.meta), "{when}: HEAD {} on n{i}", item.key);
        }
    }

    // A read-only transaction on the primary reads what the nodes hold.
    let shared: Vec<&Item> = items.iter().filter(|i| i.key.starts_with("r/")).collect();
    let probe = shared
        .first()
        .map_or("r/none".to_string(), |i| i.key.clone());
    let body = json!({"success": [
        {"range": {"prefix": "r/", "limit": 10_000}},
        {"get": {"key": probe}},
    ]});
    let a = api::txn(http, &nodes[0].url(), &body).await.done(when);
    let read = api::items(&a["results"][0]["range"]["items"]).unwrap();
    assert_eq!(
        read.iter().collect::<Vec<_>>(),
        shared,
        "{when}: the txn's range"
    );
    let got = &a["results"][1]["get"];
    let want = shared.first().map(|i| i.meta);
    let got_meta = (!got.is_null()).then(|| Meta::from_json(got).unwrap());
    assert_eq!(got_meta, want, "{when}: the txn's get of {probe}");
    items.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_ranges_versions_and_txn_reads_also_after_a_snapshot_install() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = start_cluster(
        tmp.path(),
        &["--snapshot-every-mib", "1", "--wal-segment-mib", "1"],
    )
    .unwrap();
    let urls: Vec<String> = nodes.iter().map(Kvd::url).collect();
    let http = api::client(node::REQUEST_TIMEOUT);
    // Until a secondary hears from the primary it answers 503 no_primary.
    for n in &nodes {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !node::status(&http, n).await["primary"].is_string() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} knows no primary",
                n.url()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(mixed_writes(urls.clone(), w)))
        .collect();
    let (mut done, mut refused) = (0, 0);
    for w in writers {
        let (d, r) = w.await.unwrap();
        done += d;
        refused += r;
    }
    eprintln!("replicas_api: {done} writes done, {refused} refused by their precondition");
    assert!(refused > 0, "no precondition was ever refused");
    let keys = assert_replicas_agree(&http, &nodes, "after the mixed writes").await;

    // n2 misses enough for the primary to snapshot and drop the WAL it
    // would need: ~6 MiB of bulks, rewrites and transactions.
    nodes[2].kill9().unwrap();
    let value = "x".repeat(100);
    for round in 0..3 {
        for chunk in 0..20 {
            let items: Vec<Value> = (0..1000)
                .map(|i| json!({"key": format!("s/{chunk}/{i}"), "value": format!("{round}{value}")}))
                .collect();
            let resp = http
                .post(format!("{}/v1/bulk", urls[0]))
                .json(&json!({ "items": items }))
                .send()
                .await
                .unwrap();
            api::outcome(Ok(resp)).await.done("bulk while n2 is down");
        }
        let out = api::txn(&http, &urls[0], &txn_body("r/5", "during")).await;
        out.done("txn while n2 is down");
        api::delete_prefix(&http, &urls[0], &format!("s/{round}/"))
            .await
            .done("prefix delete");
    }
    assert!(
        wal::wait_first_segment_gone(&nodes[0].data_dir, Duration::from_secs(30)),
        "the primary never compacted its WAL"
    );
    nodes[2].restart().unwrap();
    let after = assert_replicas_agree(&http, &nodes, "after the snapshot install").await;
    assert!(
        after > keys,
        "{after} keys after the second phase, {keys} before"
    );
    let s = node::status(&http, &nodes[2]).await;
    assert!(node::field(&s, "snapshot_index") > 0, "{s}");
    assert!(
        nodes[0].log().contains("sending snapshot"),
        "n2 caught up without a snapshot install, so the test proved nothing"
    );
}
