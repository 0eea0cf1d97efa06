//! `kvd --index`, end to end against real processes.
//!
//! - Set, overwrite, delete and bulk show in search results as
//!   soon as the write is acknowledged; every node of a 3-node cluster
//!   answers the same queries identically (after replicated writes, a
//!   snapshot install and a restart), and so does a single node after
//!   SIGKILL and SIGTERM restarts (snapshot load plus WAL replay).
//! - Without `--index`, and for empty or oversized queries and
//!   bad paging, a 400 with a JSON error body.
//! - `kvclient search` / `similar` (library and CLI), index metrics and
//!   status figures.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use kvclient::{Bytes, SimilarTo};
use kvstore_testkit::node::{self, expect_json_error, http, status};
use kvstore_testkit::{bin, start_cluster, wait_until, Kvd};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

const WORDS: [&str; 24] = [
    "river", "stone", "maple", "copper", "lantern", "harbor", "violet", "thunder", "meadow",
    "falcon", "ember", "glacier", "orchid", "canyon", "willow", "quartz", "saffron", "tundra",
    "beacon", "cobalt", "juniper", "marble", "nectar", "pebble",
];

/// A value of `n` words drawn with a skew (early words common).
fn text(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| WORDS[(rng.gen_range(0.0f64..1.0).powi(2) * WORDS.len() as f64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

fn keys(page: &[kvclient::SearchHit]) -> Vec<&str> {
    page.iter().map(|h| h.key.as_str()).collect()
}

async fn get_json(http: &reqwest::Client, url: String) -> (u16, Value) {
    let resp = http.get(&url).send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap())
}

/// The queries compared across nodes and restarts, as URL paths.
fn probe_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for q in [
        "river",
        "pebble",
        "river stone",
        "maple copper lantern",
        "thunder+nothingthere",
    ] {
        paths.push(format!("/v1/search?q={q}&limit=50"));
        paths.push(format!("/v1/search?q={q}&limit=7&offset=5"));
        paths.push(format!("/v1/similar?q={q}&top_k=20"));
    }
    for k in ["doc/1", "doc/17", "bulk/3", "bulk/40"] {
        paths.push(format!("/v1/similar?key={k}&top_k=15"));
    }
    paths
}

/// Every probe's answer (status and body) from one node.
async fn answers(http: &reqwest::Client, node: &Kvd) -> Vec<(u16, Value)> {
    let mut out = Vec::new();
    for p in probe_paths() {
        out.push(get_json(http, format!("{}{p}", node.url())).await);
    }
    out
}

/// Writes a corpus through `c`: 60 sets, 20 overwrites, 10 deletes and a
/// bulk of 50 (some JSON, some binary); returns the live keys.
async fn write_corpus(c: &kvclient::Client, seed: u64) -> BTreeSet<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live = BTreeSet::new();
    for i in 0..60 {
        let n = rng.gen_range(3..30);
        c.set(&format!("doc/{i}"), text(&mut rng, n)).await.unwrap();
        live.insert(format!("doc/{i}"));
    }
    for _ in 0..20 {
        let i = rng.gen_range(0..60);
        let n = rng.gen_range(3..30);
        c.set(&format!("doc/{i}"), text(&mut rng, n)).await.unwrap();
    }
    for i in (0..60).step_by(6) {
        c.delete(&format!("doc/{i}")).await.unwrap();
        live.remove(&format!("doc/{i}"));
    }
    let items: Vec<(String, Bytes)> = (0..50)
        .map(|i| {
            let n = rng.gen_range(3..30);
            let v = match i % 5 {
                0 => serde_json::json!({"title": text(&mut rng, 3), "body": text(&mut rng, n)})
                    .to_string(),
                _ => text(&mut rng, n),
            };
            (format!("bulk/{i}"), Bytes::from(v))
        })
        .chain([("bin".to_string(), Bytes::from_static(&[0xff, 0x00, 0xfe]))])
        .collect();
    for (k, _) in &items {
        live.insert(k.clone());
    }
    c.bulk_set(&items).await.unwrap();
    live
}

/// Asserts that `search q` on `c` returns exactly `want` (as a set).
async fn assert_found(c: &kvclient::Client, q: &str, want: &[&str]) {
    let hits = c.search(q, 100).await.unwrap();
    let got: BTreeSet<&str> = keys(&hits).into_iter().collect();
    let want: BTreeSet<&str> = want.iter().copied().collect();
    assert_eq!(got, want, "search {q:?}: {hits:?}");
}

/// The life of a key as search sees it, on a node's every acknowledged
/// write: found, moved, dropped, found again by bulk.
async fn check_visibility_after_each_ack(c: &kvclient::Client) {
    c.set("life", "the amber falcon".to_string()).await.unwrap();
    assert_found(c, "amber", &["life"]).await;
    c.set("life", "a silver heron".to_string()).await.unwrap();
    assert_found(c, "amber", &[]).await;
    assert_found(c, "heron", &["life"]).await;
    c.delete("life").await.unwrap();
    assert_found(c, "heron", &[]).await;
    c.bulk_set(&[
        ("life".to_string(), Bytes::from("amber heron")),
        (
            "life2".to_string(),
            Bytes::from(r#"{"a": ["amber"], "n": 1}"#),
        ),
    ])
    .await
    .unwrap();
    assert_found(c, "amber", &["life", "life2"]).await;
    // More matched terms rank first.
    let hits = c.search("amber heron", 10).await.unwrap();
    assert_eq!(keys(&hits), ["life", "life2"]);
    // A value without text leaves the index.
    c.set("life2", Bytes::from_static(&[0xff, 0xfe]))
        .await
        .unwrap();
    assert_found(c, "amber", &["life"]).await;
    c.delete("life").await.unwrap();
    c.delete("life2").await.unwrap();
    assert_found(c, "amber", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_shows_every_acknowledged_write_and_keeps_results_across_restarts() {
    let tmp = TempDir::new().unwrap();
    // Small snapshots, so the restarts below load a snapshot *and* replay WAL.
    let mut kvd = node::start(
        &tmp,
        &[
            "--index",
            "--snapshot-every-mib",
            "1",
            "--wal-segment-mib",
            "1",
        ],
    );
    let c = node::client(&kvd);
    let h = http();
    check_visibility_after_each_ack(&c).await;
    let live = write_corpus(&c, 1).await;

    // Paging: pages of 7 put together are the one long answer.
    let all = c.search_page("river stone", 1000, 0).await.unwrap();
    assert!(all.hits.len() > 20, "{all:?}");
    assert_eq!(all.total as usize, all.hits.len());
    assert_eq!(all.next_offset, None);
    let mut paged = Vec::new();
    let mut offset = Some(0);
    while let Some(o) = offset {
        let p = c.search_page("river stone", 7, o as usize).await.unwrap();
        paged.extend(p.hits);
        offset = p.next_offset;
    }
    assert_eq!(paged, all.hits);
    // Documents with both words first, then by score, then by key.
    let mut ranked = Vec::new();
    for hit in &all.hits {
        let v = c.get(&hit.key).await.unwrap().unwrap();
        let v = String::from_utf8_lossy(&v).into_owned();
        let matched = ["river", "stone"]
            .iter()
            .filter(|w| v.split(|ch: char| !ch.is_alphanumeric()).any(|x| x == **w))
            .count();
        ranked.push((matched, hit.score, hit.key.clone()));
    }
    for w in ranked.windows(2) {
        let ((m0, s0, k0), (m1, s1, k1)) = (&w[0], &w[1]);
        assert!(
            m0 > m1 || (m0 == m1 && (s0 > s1 || (s0 == s1 && k0 < k1))),
            "order: {w:?}"
        );
    }
    assert!(
        ranked[0].0 == 2 && ranked.last().unwrap().0 == 1,
        "{ranked:?}"
    );

    // "More like this key" leaves the key out; by text it finds it first.
    let value = String::from_utf8(c.get("doc/1").await.unwrap().unwrap().to_vec()).unwrap();
    let like = c.similar_to_key("doc/1", 10).await.unwrap();
    assert!(
        !like.is_empty() && !keys(&like).contains(&"doc/1"),
        "{like:?}"
    );
    let by_text = c.similar(&value, 11).await.unwrap();
    assert_eq!(by_text[0].key, "doc/1");
    assert!((by_text[0].score - 1.0).abs() < 1e-9, "{by_text:?}");
    let p = c
        .similar_page(SimilarTo::Key("doc/1"), 10, 0)
        .await
        .unwrap();
    assert_eq!(p.hits, like);

    // Status and metrics carry the index figures.
    let s = status(&h, &kvd).await;
    let docs = live.len() as u64 - 1; // "bin" has no text
    assert_eq!(s["index"]["documents"], docs, "{s}");
    assert!(s["index"]["terms"].as_u64().unwrap() >= WORDS.len() as u64);
    assert!(s["index"]["memory_bytes"].as_u64().unwrap() > 0);
    let metrics = h
        .get(format!("{}/metrics", kvd.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("kvd_index_documents {docs}\n")),
        "{metrics}"
    );
    assert!(metrics.contains("kvd_index_query_duration_seconds_count{kind=\"search\"}"));
    assert!(metrics.contains("kvd_index_query_duration_seconds_count{kind=\"similar\"}"));

    // Enough bytes for a snapshot, then more writes after it.
    let big: Vec<(String, Bytes)> = (0..1500)
        .map(|i| {
            (
                format!("fill/{i}"),
                Bytes::from(format!("filler {}", "x ".repeat(400))),
            )
        })
        .collect();
    c.bulk_set(&big).await.unwrap();
    let live2 = write_corpus(&c, 2).await;
    assert_eq!(live, live2);
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_dir(
            kvd.data_dir.join("snap")
        )
        .map(|d| d.count() > 0)
        .unwrap_or(false)),
        "no snapshot was written"
    );
    c.set("doc/1", "after the snapshot river".to_string())
        .await
        .unwrap();
    let before = answers(&h, &kvd).await;
    assert!(before.iter().all(|(code, _)| *code == 200), "{before:?}");

    node::crash_restart(&mut kvd);
    assert_eq!(answers(&h, &kvd).await, before, "after SIGKILL");
    kvd.terminate().unwrap();
    node::restart(&mut kvd);
    assert_eq!(answers(&h, &kvd).await, before, "after SIGTERM");
    check_visibility_after_each_ack(&node::client(&kvd)).await;
}

fn cluster(tmp: &TempDir, extra: &[&str]) -> Vec<Kvd> {
    start_cluster(tmp.path(), extra).unwrap()
}

/// Waits until every node has applied everything the first one has.
async fn wait_applied(h: &reqwest::Client, nodes: &[Kvd]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = Vec::new();
        for n in nodes {
            s.push(status(h, n).await);
        }
        let last = &s[0]["last_index"];
        if s.iter()
            .all(|x| &x["applied_index"] == last && x["digest"] == s[0]["digest"])
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_give_the_same_answers_after_replication_snapshot_install_and_restart() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = cluster(
        &tmp,
        &[
            "--index",
            "--snapshot-every-mib",
            "1",
            "--wal-segment-mib",
            "1",
        ],
    );
    let h = http();
    let c = kvclient::Client::new([nodes[0].url()]).unwrap();
    // n2 misses everything below and must catch up by snapshot install.
    nodes[2].kill9().unwrap();

    check_visibility_after_each_ack(&c).await;
    write_corpus(&c, 3).await;
    let corpus_end = node::field(&status(&h, &nodes[0]).await, "last_index");
    for round in 0..4 {
        let big: Vec<(String, Bytes)> = (0..1000)
            .map(|i| {
                let v = format!("filler round{round} {}", "x ".repeat(400));
                (format!("fill/{i}"), Bytes::from(v))
            })
            .collect();
        c.bulk_set(&big).await.unwrap();
    }
    let first_segment = nodes[0]
        .data_dir
        .join("wal")
        .join("00000000000000000001.wal");
    assert!(
        wait_until(Duration::from_secs(30), || !first_segment.exists()),
        "the primary never compacted its WAL"
    );
    node::restart(&mut nodes[2]);
    // Changes after the install go in incrementally on n2's rebuilt index.
    c.set("doc/17", "maple maple river".to_string())
        .await
        .unwrap();
    c.delete("bulk/40").await.unwrap();
    c.set("bulk/40", "copper lantern".to_string())
        .await
        .unwrap();
    wait_applied(&h, &nodes).await;
    // The corpus reached n2 inside the snapshot, not as log entries.
    let s2 = status(&h, &nodes[2]).await;
    assert!(node::field(&s2, "snapshot_index") > corpus_end, "{s2}");

    let want = answers(&h, &nodes[0]).await;
    assert!(want.iter().all(|(code, _)| *code == 200), "{want:?}");
    assert!(want
        .iter()
        .all(|(_, v)| !v["hits"].as_array().unwrap().is_empty()));
    for n in &nodes[1..] {
        assert_eq!(answers(&h, n).await, want, "node {}", n.url());
    }
    let statuses: Vec<Value> = futures_statuses(&h, &nodes).await;
    for field in ["documents", "terms", "postings"] {
        assert!(
            statuses
                .iter()
                .all(|s| s["index"][field] == statuses[0]["index"][field]),
            "{field}: {statuses:?}"
        );
    }

    // A secondary restarted (WAL replay, then commit from the primary)
    // answers the same again.
    nodes[1].kill9().unwrap();
    node::restart(&mut nodes[1]);
    c.set("after-restart", "river".to_string()).await.unwrap();
    wait_applied(&h, &nodes).await;
    let want = answers(&h, &nodes[0]).await;
    for n in &nodes[1..] {
        assert_eq!(answers(&h, n).await, want, "node {}", n.url());
    }
}

async fn futures_statuses(h: &reqwest::Client, nodes: &[Kvd]) -> Vec<Value> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(status(h, n).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_a_node_without_index_get_400() {
    let h = http();
    let plain_dir = TempDir::new().unwrap();
    let plain = node::start(&plain_dir, &[]);
    for path in [
        "/v1/search?q=river",
        "/v1/similar?q=river",
        "/v1/similar?key=a",
    ] {
        let resp = h
            .get(format!("{}{path}", plain.url()))
            .send()
            .await
            .unwrap();
        let (code, err) = expect_json_error(resp, path).await;
        assert_eq!((code, err.as_str()), (400, "index_disabled"), "{path}");
    }
    let st = status(&h, &plain).await;
    assert!(st["index"].is_null(), "{st}");

    let tmp = TempDir::new().unwrap();
    let kvd = node::start(&tmp, &["--index"]);
    let c = node::client(&kvd);
    c.set("a", "river stone".to_string()).await.unwrap();
    c.set("raw", Bytes::from_static(&[0xff])).await.unwrap();
    let long = "r".repeat(1025);
    let many = "w ".repeat(65);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v1/search".into(), 400, "empty_query"),
        ("/v1/search?q=".into(), 400, "empty_query"),
        ("/v1/search?q=%20%21%3F".into(), 400, "empty_query"),
        (format!("/v1/search?q={long}"), 400, "query_too_long"),
        (
            format!("/v1/search?q={}", many.trim()),
            400,
            "query_too_long",
        ),
        ("/v1/search?q=river&limit=0".into(), 400, "invalid_limit"),
        ("/v1/search?q=river&limit=1001".into(), 400, "invalid_limit"),
        ("/v1/search?q=river&limit=ten".into(), 400, "invalid_query"),
        (
            "/v1/search?q=river&offset=10001".into(),
            400,
            "invalid_offset",
        ),
        ("/v1/similar".into(), 400, "invalid_query"),
        ("/v1/similar?q=".into(), 400, "empty_query"),
        (format!("/v1/similar?q={long}"), 400, "query_too_long"),
        ("/v1/similar?q=river&key=a".into(), 400, "invalid_query"),
        ("/v1/similar?q=river&top_k=0".into(), 400, "invalid_limit"),
        (
            "/v1/similar?q=river&top_k=5&limit=5".into(),
            400,
            "invalid_query",
        ),
        ("/v1/similar?key=".into(), 400, "invalid_key"),
        ("/v1/similar?key=nope".into(), 404, "key_not_found"),
    ];
    for (path, want_code, want_err) in cases {
        let resp = h.get(format!("{}{path}", kvd.url())).send().await.unwrap();
        let (code, err) = expect_json_error(resp, &path).await;
        assert_eq!((code, err.as_str()), (want_code, want_err), "{path}");
    }
    // At the limits exactly: fine.
    let words = "river ".repeat(64);
    for path in [
        format!("/v1/search?q={}&limit=1000&offset=10000", words.trim()),
        format!("/v1/search?q={}x", "abcdefghijklmno ".repeat(64).trim_end()),
        "/v1/similar?key=raw".to_string(),
    ] {
        let (code, v) = get_json(&h, format!("{}{path}", kvd.url())).await;
        assert_eq!(code, 200, "{path}: {v}");
    }
    // The client library reports the server's refusal.
    let err = c.search("", 10).await.unwrap_err();
    assert!(err.to_string().contains("empty_query"), "{err}");
}

#[test]
fn kvclient_cli_search_and_similar() {
    let tmp = TempDir::new().unwrap();
    let kvd = node::start(&tmp, &["--index"]);
    let cli = |args: &[&str]| {
        Command::new(bin("kvclient"))
            .env_remove("KV_ENDPOINTS")
            .args(["--endpoints", &kvd.url(), "--timeout-ms", "30000"])
            .args(args)
            .output()
            .unwrap()
    };
    for (k, v) in [
        ("a", "red fox"),
        ("b", "red fox jumps"),
        ("c", "blue whale"),
    ] {
        assert!(cli(&["set", k, v]).status.success());
    }
    let out = cli(&["search", "red fox"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].ends_with("  a") && lines[1].ends_with("  b"),
        "{text}"
    );

    let out = cli(&["--json", "search", "red", "--limit", "1", "--offset", "1"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hits"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["total"], 2);
    assert!(v["next_offset"].is_null());

    let out = cli(&["--json", "similar", "--key", "a", "--top-k", "5"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hits"][0]["key"], "b", "{v}");
    assert_eq!(v["hits"].as_array().unwrap().len(), 1, "{v}");

    let out = cli(&["--json", "similar", "blue whale"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hits"][0]["key"], "c", "{v}");

    // Errors: one line, exit 2 (server refused) or 1 (missing key).
    let out = cli(&["search", "!!"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("kvclient: ") && err.contains("empty_query"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
    let out = cli(&["similar", "--key", "zzz"]);
    assert!(!out.status.success());
    let out = cli(&["similar"]);
    assert!(!out.status.success(), "similar needs QUERY or --key");
}
