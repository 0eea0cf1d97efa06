//! Replication safety at the edges: peer requests that a correct primary
//! never sends (a second primary for an epoch, an epoch out of reach,
//! entries no client could write, a snapshot beyond its sender's log) are
//! refused with a 4xx and change nothing, and snapshot uploads are
//! streamed to disk with a size limit and a timeout, leaving no temp file
//! behind when refused. The forged requests use kvd's own wire encoders.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use kvd::model::{Expiry, KeyMeta};
use kvd::replication::node::encode_append;
use kvd::replication::rules::LogPos;
use kvd::storage::snapshot::{self, SnapshotMeta, Versions};
use kvd::storage::{Op, RealFs, Record, State, Timestamp};
use kvstore_testkit::node::{expect_json_error, http, key_url, status};
use kvstore_testkit::{free_port, start_cluster, Kvd};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a secondary writes an incoming snapshot before checking it.
const INCOMING: &str = "snapshot-incoming.tmp";

/// Three nodes on loopback; n0 bootstraps as primary.
fn cluster(tmp: &TempDir, extra: &[&str]) -> Vec<Kvd> {
    start_cluster(tmp.path(), extra).unwrap()
}

/// A secondary whose peers never answer: only the test talks to it.
fn lone_secondary(tmp: &TempDir, extra: &[&str]) -> Kvd {
    let peers = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let mut args = vec!["--node-id", "n1", "--peers", &peers, "--role", "secondary"];
    args.extend_from_slice(extra);
    Kvd::start(&tmp.path().join("n1"), &args).unwrap()
}

/// What a refused request must leave as it was.
fn view(s: &Value) -> Value {
    json!({
        "epoch": s["epoch"], "role": s["role"], "primary": s["primary"],
        "last_index": s["last_index"], "last_log_epoch": s["last_log_epoch"],
        "commit_index": s["commit_index"], "applied_index": s["applied_index"],
        "snapshot_index": s["snapshot_index"], "keys": s["keys"], "digest": s["digest"],
    })
}

fn u(s: &Value, name: &str) -> u64 {
    s[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {s}"))
}

/// The last entry of a node's log, from its status.
fn last_pos(s: &Value) -> LogPos {
    LogPos::new(u(s, "last_log_epoch"), u(s, "last_index"))
}

async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `key` through the primary n0 and waits until every node has
/// applied it and follows n0: the cluster is healthy and quiet.
async fn write_and_settle(http: &reqwest::Client, nodes: &[Kvd], key: &str) {
    let resp = http
        .put(key_url(&nodes[0], key))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "PUT {key} on the primary");
    let index = u(&resp.json::<Value>().await.unwrap(), "index");
    for n in nodes {
        eventually(&format!("{} applies {key}", n.url()), || async {
            let s = status(http, n).await;
            u(&s, "applied_index") >= index && s["primary"] == nodes[0].url()
        })
        .await;
    }
}

fn put_rec(index: u64, epoch: u64, key: &[u8], value: &[u8]) -> Record {
    Record {
        index,
        epoch,
        ts: Timestamp::default(),
        op: Op::Put {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            expiry: Expiry::Never,
        },
    }
}

async fn append(
    http: &reqwest::Client,
    to: &Kvd,
    epoch: u64,
    prev: LogPos,
    commit: u64,
    leader: &str,
    records: &[Record],
) -> reqwest::Response {
    http.post(format!("{}/internal/append", to.url()))
        .body(encode_append(epoch, prev, commit, leader, records))
        .send()
        .await
        .unwrap()
}

/// A snapshot file (kvd's own writer) at `(epoch, index)` holding `items`.
fn snapshot_bytes(dir: &Path, index: u64, epoch: u64, items: &[(&[u8], &[u8])]) -> Vec<u8> {
    let state = State::new();
    // Every key last written at the snapshot's index, as a primary's
    // snapshot may hold them (none past what its log will send).
    let versions = KeyMeta {
        create_index: index,
        mod_index: index,
        version: 1,
    };
    for (k, v) in items {
        state.load(k, v, versions);
    }
    std::fs::create_dir_all(dir).unwrap();
    let meta = SnapshotMeta {
        last_index: index,
        last_epoch: epoch,
    };
    let (path, _) =
        snapshot::write(&RealFs, dir, &state, None, meta, Versions::Kept, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(path).unwrap();
    bytes
}

/// `POST /internal/snapshot` as a sender at `epoch` whose log ends at
/// `sender_last`.
async fn send_snapshot(
    http: &reqwest::Client,
    to: &Kvd,
    epoch: u64,
    leader: &str,
    sender_last: LogPos,
    body: Vec<u8>,
) -> reqwest::Response {
    http.post(format!("{}/internal/snapshot", to.url()))
        .query(&snapshot_query(epoch, leader, sender_last))
        .body(body)
        .send()
        .await
        .unwrap()
}

fn snapshot_query(epoch: u64, leader: &str, last: LogPos) -> [(&'static str, String); 4] {
    [
        ("epoch", epoch.to_string()),
        ("leader", leader.to_string()),
        ("last_index", last.index.to_string()),
        ("last_epoch", last.epoch.to_string()),
    ]
}

fn incoming(node: &Kvd) -> PathBuf {
    node.data_dir.join(INCOMING)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_refuses_a_second_primary_for_its_epoch() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp, &[]);
    let http = http();
    write_and_settle(&http, &nodes, "before").await;
    let before = status(&http, &nodes[1]).await;
    let (epoch, last) = (u(&before, "epoch"), last_pos(&before));

    // Another node claims n0's epoch as its own (what a primary deposed
    // between reading its log and sending would do) and sends an entry.
    let impostor = format!("http://127.0.0.1:{}", free_port());
    let entry = put_rec(last.index + 1, epoch, b"impostor", b"x");
    let resp = append(
        &http,
        &nodes[1],
        epoch,
        last,
        last.index + 1,
        &impostor,
        &[entry],
    )
    .await;
    let (code, err) = expect_json_error(resp, "an append from a second primary").await;
    assert_eq!((code, err.as_str()), (409, "epoch_has_primary"));
    assert_eq!(
        view(&status(&http, &nodes[1]).await),
        view(&before),
        "the refused append changed the secondary"
    );
    // The same from its snapshot side.
    let snap = snapshot_bytes(
        &tmp.path().join("s"),
        last.index + 5,
        epoch,
        &[(b"k", b"v")],
    );
    let resp = send_snapshot(&http, &nodes[1], epoch, &impostor, last, snap).await;
    let (code, err) = expect_json_error(resp, "a snapshot from a second primary").await;
    assert_eq!((code, err.as_str()), (409, "epoch_has_primary"));
    assert_eq!(view(&status(&http, &nodes[1]).await), view(&before));
    // The real primary is still followed.
    write_and_settle(&http, &nodes, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_out_of_reach_are_refused_and_the_cluster_still_elects() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp, &[]);
    let http = http();
    write_and_settle(&http, &nodes, "before").await;
    let (b1, b2) = (
        status(&http, &nodes[1]).await,
        status(&http, &nodes[2]).await,
    );

    // An epoch of 2^64-1 could never be outbid: no node could be elected
    // again.
    let resp = append(
        &http,
        &nodes[1],
        u64::MAX,
        LogPos::ZERO,
        0,
        &nodes[0].url(),
        &[],
    )
    .await;
    let (code, err) = expect_json_error(resp, "an append in epoch 2^64-1").await;
    assert_eq!((code, err.as_str()), (400, "epoch_out_of_range"));
    let vote = json!({
        "epoch": u64::MAX,
        "candidate": "n1",
        "last": {"epoch": u64::MAX, "index": u64::MAX},
        "pre_vote": false,
    });
    let resp = http
        .post(format!("{}/internal/vote", nodes[2].url()))
        .json(&vote)
        .send()
        .await
        .unwrap();
    let (code, err) = expect_json_error(resp, "a vote in epoch 2^64-1").await;
    assert_eq!((code, err.as_str()), (400, "epoch_out_of_range"));
    let resp = send_snapshot(
        &http,
        &nodes[1],
        u64::MAX,
        &nodes[0].url(),
        LogPos::new(u64::MAX, u64::MAX),
        b"whatever".to_vec(),
    )
    .await;
    let (code, err) = expect_json_error(resp, "a snapshot in epoch 2^64-1").await;
    assert_eq!((code, err.as_str()), (400, "epoch_out_of_range"));
    assert_eq!(view(&status(&http, &nodes[1]).await), view(&b1));
    assert_eq!(view(&status(&http, &nodes[2]).await), view(&b2));

    write_and_settle(&http, &nodes, "still-led-by-n0").await;
    let resp = http
        .post(format!("{}/promote_to_primary", nodes[1].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "promoting n1");
    let won: Value = resp.json().await.unwrap();
    assert_eq!(won["epoch"], u(&b1, "epoch") + 1, "{won}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_entries_are_validated_like_client_writes() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp, &["--max-value-bytes", "1024"]);
    let http = http();
    write_and_settle(&http, &nodes, "before").await;
    let before = status(&http, &nodes[1]).await;
    let (epoch, last) = (u(&before, "epoch"), last_pos(&before));

    let long_key = vec![b'k'; 1025];
    let big_value = vec![b'v'; 1025];
    let bad_bulk = Op::Bulk {
        items: vec![
            (
                Bytes::from_static(b"bulk-ok"),
                Bytes::from_static(b"v"),
                Expiry::Never,
            ),
            (
                Bytes::from_static(b"bulk\0bad"),
                Bytes::from_static(b"v"),
                Expiry::Never,
            ),
        ],
    };
    let cases: Vec<(&str, Op)> = vec![
        ("a NUL in the key", put_rec(0, 0, b"a\0b", b"v").op),
        (
            "a key that is not UTF-8",
            put_rec(0, 0, b"\xff\xfe", b"v").op,
        ),
        ("an empty key", put_rec(0, 0, b"", b"v").op),
        ("a key over 1024 bytes", put_rec(0, 0, &long_key, b"v").op),
        (
            "a value over --max-value-bytes",
            put_rec(0, 0, b"big", &big_value).op,
        ),
        ("a bulk item with a NUL key", bad_bulk),
        (
            "a delete of a key that is not UTF-8",
            Op::Delete {
                key: Bytes::from_static(b"\xc3"),
            },
        ),
    ];
    for (what, bad) in cases {
        // A good entry first: the whole append must be refused.
        let good = put_rec(last.index + 1, epoch, b"good", b"v");
        let bad = Record {
            index: last.index + 2,
            epoch,
            ts: Timestamp::default(),
            op: bad,
        };
        let resp = append(
            &http,
            &nodes[1],
            epoch,
            last,
            last.index + 2,
            &nodes[0].url(),
            &[good, bad],
        )
        .await;
        let (code, err) = expect_json_error(resp, what).await;
        assert_eq!((code, err.as_str()), (400, "invalid_entry"), "{what}");
        assert_eq!(
            view(&status(&http, &nodes[1]).await),
            view(&before),
            "{what}: the refused append changed the secondary"
        );
    }
    write_and_settle(&http, &nodes, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_checked_against_its_sender_before_anything_changes() {
    let tmp = TempDir::new().unwrap();
    let nodes = cluster(&tmp, &[]);
    let http = http();
    write_and_settle(&http, &nodes, "before").await;
    let before = status(&http, &nodes[1]).await;
    let p = status(&http, &nodes[0]).await;
    let (epoch, sender_last) = (u(&p, "epoch"), last_pos(&p));
    let dir = tmp.path().join("snaps");
    let primary = nodes[0].url();

    // Beyond the sender's own log: installing it would skip entries the
    // node never got, and report a match index it does not hold.
    let ahead = snapshot_bytes(&dir, sender_last.index + 1000, epoch, &[(b"k", b"v")]);
    let resp = send_snapshot(&http, &nodes[1], epoch, &primary, sender_last, ahead).await;
    let (code, err) = expect_json_error(resp, "a snapshot beyond its sender's log").await;
    assert_eq!((code, err.as_str()), (400, "snapshot_ahead_of_sender"));
    // Of an epoch newer than its sender's.
    let newer = snapshot_bytes(&dir, sender_last.index, epoch + 1, &[(b"k", b"v")]);
    let resp = send_snapshot(&http, &nodes[1], epoch, &primary, sender_last, newer).await;
    let (code, err) = expect_json_error(resp, "a snapshot newer than its sender").await;
    assert_eq!((code, err.as_str()), (400, "snapshot_ahead_of_sender"));
    // Holding a key no client could write.
    let bad_key = snapshot_bytes(&dir, sender_last.index + 1, epoch, &[(b"a\0b", b"v")]);
    let sender = LogPos::new(epoch, sender_last.index + 1);
    let resp = send_snapshot(&http, &nodes[1], epoch, &primary, sender, bad_key).await;
    let (code, err) = expect_json_error(resp, "a snapshot with a NUL in a key").await;
    assert_eq!((code, err.as_str()), (400, "invalid_snapshot"));
    // Damaged, from a sender of a newer epoch: neither that epoch nor the
    // sender's URL may stick.
    let stranger = format!("http://127.0.0.1:{}", free_port());
    let newer_sender = LogPos::new(epoch + 1, sender_last.index + 1);
    let resp = send_snapshot(
        &http,
        &nodes[1],
        epoch + 1,
        &stranger,
        newer_sender,
        b"not a snapshot".to_vec(),
    )
    .await;
    let (code, err) = expect_json_error(resp, "a damaged snapshot").await;
    assert_eq!((code, err.as_str()), (400, "invalid_snapshot"));

    assert_eq!(view(&status(&http, &nodes[1]).await), view(&before));
    assert!(
        !incoming(&nodes[1]).exists(),
        "a refused snapshot left {INCOMING}"
    );
    write_and_settle(&http, &nodes, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_snapshot_leaves_no_temp_file_and_a_good_one_installs() {
    let tmp = TempDir::new().unwrap();
    let node = lone_secondary(&tmp, &[]);
    let http = http();
    let leader = format!("http://127.0.0.1:{}", free_port());
    let sender = LogPos::new(1, 40);
    let resp = send_snapshot(&http, &node, 1, &leader, sender, vec![0u8; 1 << 20]).await;
    let (code, err) = expect_json_error(resp, "a snapshot of zeros").await;
    assert_eq!((code, err.as_str()), (400, "invalid_snapshot"));
    assert!(
        !incoming(&node).exists(),
        "a refused snapshot left {INCOMING} behind"
    );

    let good = snapshot_bytes(&tmp.path().join("s"), 40, 1, &[(b"a", b"1"), (b"b", b"2")]);
    let resp = send_snapshot(&http, &node, 1, &leader, sender, good).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["last_index"], 40);
    let s = status(&http, &node).await;
    assert_eq!(
        (u(&s, "snapshot_index"), u(&s, "last_index"), u(&s, "keys")),
        (40, 40, 2)
    );
    assert_eq!(s["primary"], leader.as_str());
    assert!(!incoming(&node).exists());
}

/// An HTTP/1.1 request head for a snapshot upload over a raw socket.
fn upload_head(node: &Kvd, leader: &str, sender: LogPos, framing: &str) -> String {
    let q: Vec<String> = snapshot_query(1, leader, sender)
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(':', "%3A").replace('/', "%2F")))
        .collect();
    format!(
        "POST /internal/snapshot?{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{framing}\r\n\r\n",
        q.join("&"),
        node.port
    )
}

/// Reads one HTTP response: (status, body as JSON).
async fn read_response(sock: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, Value) {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|len| raw.len() >= end + 4 + len) {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no response within 60 s");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]);
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        serde_json::from_slice(&raw[end + 4..]).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_upload_is_written_to_disk_as_it_arrives() {
    let tmp = TempDir::new().unwrap();
    let node = lone_secondary(&tmp, &[]);
    let leader = format!("http://127.0.0.1:{}", free_port());
    let value = vec![b'x'; 256 << 10];
    let items: Vec<(String, &[u8])> = (0..16).map(|i| (format!("k{i}"), &value[..])).collect();
    let items: Vec<(&[u8], &[u8])> = items.iter().map(|(k, v)| (k.as_bytes(), *v)).collect();
    let snap = snapshot_bytes(&tmp.path().join("s"), 7, 1, &items);
    let half = snap.len() / 2;
    assert!(half > 1 << 20);

    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .unwrap();
    let head = upload_head(
        &node,
        &leader,
        LogPos::new(1, 7),
        &format!("Content-Length: {}", snap.len()),
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&snap[..half]).await.unwrap();
    // With half of the body sent and the rest held back, the first MiB
    // must already be on disk rather than in memory.
    eventually("the first half of the upload reaches the disk", || async {
        std::fs::metadata(incoming(&node)).is_ok_and(|m| m.len() >= 1 << 20)
    })
    .await;
    sock.write_all(&snap[half..]).await.unwrap();
    let (code, body) = read_response(&mut sock).await;
    assert_eq!((code, &body["last_index"]), (200, &json!(7)), "{body}");
    assert!(!incoming(&node).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_uploads_too_big_or_stalled_are_cut_and_cleaned_up() {
    let tmp = TempDir::new().unwrap();
    let node = lone_secondary(
        &tmp,
        &["--max-snapshot-mib", "1", "--body-timeout-ms", "1000"],
    );
    let leader = format!("http://127.0.0.1:{}", free_port());
    let sender = LogPos::new(1, 7);
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", node.port));

    // A declared length over the limit: refused before the body is read.
    let mut sock = connect().await.unwrap();
    let head = upload_head(&node, &leader, sender, "Content-Length: 2097152");
    sock.write_all(head.as_bytes()).await.unwrap();
    let (code, body) = read_response(&mut sock).await;
    assert_eq!(
        (code, &body["error"]["code"]),
        (413, &json!("snapshot_too_large"))
    );

    // No declared length: cut once more than the limit has arrived. The
    // answer is read while the chunks go out, since the node may answer
    // and close before the last ones.
    let mut sock = connect().await.unwrap();
    let head = upload_head(&node, &leader, sender, "Transfer-Encoding: chunked");
    sock.write_all(head.as_bytes()).await.unwrap();
    let (mut rx, mut tx) = sock.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 64 << 10];
        for _ in 0..24 {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            if tx.write_all(&frame).await.is_err() {
                break;
            }
        }
        tx
    });
    let (code, body) = read_response(&mut rx).await;
    drop(writer.await.unwrap());
    assert_eq!(
        (code, &body["error"]["code"]),
        (413, &json!("snapshot_too_large"))
    );
    assert!(
        !incoming(&node).exists(),
        "an oversized upload left {INCOMING}"
    );

    // A sender that stalls mid-body is cut after --body-timeout-ms.
    let mut sock = connect().await.unwrap();
    let head = upload_head(&node, &leader, sender, "Content-Length: 524288");
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&vec![0u8; 100 << 10]).await.unwrap();
    let (code, body) = read_response(&mut sock).await;
    assert_eq!(
        (code, &body["error"]["code"]),
        (408, &json!("request_timeout"))
    );
    assert!(
        !incoming(&node).exists(),
        "a stalled upload left {INCOMING}"
    );
    let s = status(&http(), &node).await;
    assert_eq!((u(&s, "last_index"), u(&s, "keys")), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoining_node_neither_votes_nor_runs_until_it_holds_the_primarys_commit_index() {
    let tmp = TempDir::new().unwrap();
    let mut node = lone_secondary(&tmp, &["--rejoin"]);
    let http = http();
    let vote = |epoch: u64, last: LogPos| json!({"epoch": epoch, "candidate": "n2", "last": last, "pre_vote": false});
    let vote_url = format!("{}/internal/vote", node.url());
    let ask = |body: Value| {
        let req = http.post(&vote_url).json(&body);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let s = status(&http, &node).await;
    assert_eq!(s["rejoining"], true, "{s}");
    let epoch = u(&s, "epoch");

    // It may not run...
    let resp = http
        .post(format!("{}/promote_to_primary", node.url()))
        .send()
        .await
        .unwrap();
    let (code, err) = expect_json_error(resp, "promoting a rejoining node").await;
    assert_eq!((code, err.as_str()), (409, "rejoining"));
    // ...nor vote, even for a candidate as up to date as it is; the epoch
    // is still taken up (an old primary is deposed where it is seen).
    let answer = ask(vote(epoch + 1, LogPos::new(epoch, 5))).await;
    assert_eq!(answer["granted"], false, "{answer}");
    assert_eq!(answer["reason"], "rejoining", "{answer}");
    assert_eq!(answer["epoch"], epoch + 1, "{answer}");

    // A restart before it has caught up keeps it rejoining.
    node.kill9().unwrap();
    node.restart().unwrap();
    assert_eq!(status(&http, &node).await["rejoining"], true);

    // The primary of epoch + 1, whose commit index is 5, catches it up in
    // two appends: after 1..=3 it still lacks committed entries; after
    // 4..=5 it holds them all, and votes again.
    let recs: Vec<Record> = (1..=3)
        .map(|i| put_rec(i, epoch + 1, format!("k{i}").as_bytes(), b"v"))
        .collect();
    let leader = format!("http://127.0.0.1:{}", free_port());
    let resp = append(&http, &node, epoch + 1, LogPos::ZERO, 5, &leader, &recs).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(status(&http, &node).await["rejoining"], true);
    let more: Vec<Record> = (4..=5)
        .map(|i| put_rec(i, epoch + 1, format!("k{i}").as_bytes(), b"v"))
        .collect();
    let prev = LogPos::new(epoch + 1, 3);
    let resp = append(&http, &node, epoch + 1, prev, 5, &leader, &more).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(status(&http, &node).await["rejoining"], false);
    let answer = ask(vote(epoch + 2, LogPos::new(epoch + 1, 5))).await;
    assert_eq!(answer["granted"], true, "{answer}");

    // --rejoin on a data dir with history changes nothing.
    node.kill9().unwrap();
    node.restart().unwrap();
    assert_eq!(status(&http, &node).await["rejoining"], false);
}
