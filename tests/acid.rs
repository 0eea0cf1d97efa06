//! Bulk writes are atomic, under concurrency and
//! across SIGKILL.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstore_testkit::node::{self, client, crash_restart, field, http, start, status};
use rand::Rng;
use serde_json::json;
use tempfile::TempDir;
use tokio::task::JoinSet;

const CLIENTS: usize = 8;
const BULKS_PER_CLIENT: usize = 20;
const SHARED_KEYS: usize = 100;

fn shared_key(i: usize) -> String {
    format!("shared/{i:03}")
}

/// Reads all shared keys and returns the set of distinct values seen.
async fn markers(c: &kvclient::Client) -> BTreeSet<Vec<u8>> {
    let mut seen = BTreeSet::new();
    for i in 0..SHARED_KEYS {
        let v = c
            .get(&shared_key(i))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} is missing", shared_key(i)));
        seen.insert(v.to_vec());
    }
    seen
}

/// 8 clients each send 20 bulk sets over the same 100 keys, every bulk
/// writing its own marker to all of them. Bulks are atomic and applied in log
/// order, so afterwards every key holds the marker of one and the same bulk:
/// the one with the highest log index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bulks_over_the_same_keys_leave_one_marker() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let c = client(&kvd);
    // Every key exists before the writers start, so that a key found
    // absent later is a defect, not a key no bulk has reached yet.
    let initial: Vec<(String, Bytes)> = (0..SHARED_KEYS)
        .map(|i| (shared_key(i), Bytes::from("client-initial")))
        .collect();
    c.bulk_set(&initial).await.unwrap();

    let mut writers = JoinSet::new();
    for w in 0..CLIENTS {
        // One client per writer: separate connections, truly concurrent.
        let c = client(&kvd);
        writers.spawn(async move {
            let mut acks = Vec::with_capacity(BULKS_PER_CLIENT);
            for b in 0..BULKS_PER_CLIENT {
                let marker = Bytes::from(format!("client{w}-bulk{b:02}"));
                let items: Vec<(String, Bytes)> = (0..SHARED_KEYS)
                    .map(|i| (shared_key(i), marker.clone()))
                    .collect();
                let outcome = c.bulk_set(&items).await.unwrap();
                assert_eq!(outcome.count, SHARED_KEYS as u64);
                acks.push((outcome.index, marker));
            }
            acks
        });
    }

    // Meanwhile a reader checks that no key ever reads back as absent or
    // as something no writer sent. (Single-key GETs are not a consistent
    // cut across keys, so mixed markers mid-run are legitimate.)
    let reader = {
        let c = client(&kvd);
        tokio::spawn(async move {
            let mut reads = 0u32;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                for i in (0..SHARED_KEYS).step_by(7) {
                    let key = shared_key(i);
                    let v = c.get(&key).await.unwrap();
                    let v = v.unwrap_or_else(|| panic!("{key} read back as absent"));
                    let text = String::from_utf8(v.to_vec()).unwrap();
                    assert!(text.starts_with("client"), "unexpected value {text:?}");
                    reads += 1;
                }
                if c.get("writers-done").await.unwrap().is_some() {
                    break;
                }
            }
            reads
        })
    };

    let mut acks = Vec::new();
    while let Some(r) = writers.join_next().await {
        acks.extend(r.unwrap());
    }
    c.set("writers-done", "1").await.unwrap();
    let reads = reader.await.unwrap();
    assert!(reads > 0, "the concurrent reader never ran");

    assert_eq!(acks.len(), CLIENTS * BULKS_PER_CLIENT);
    let indexes: BTreeSet<u64> = acks.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indexes.len(),
        acks.len(),
        "every bulk is its own log record"
    );
    let (_, last_marker) = acks.iter().max_by_key(|(i, _)| *i).unwrap().clone();

    let seen = markers(&c).await;
    assert_eq!(
        seen.len(),
        1,
        "keys hold different markers: {:?}",
        seen.iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        seen.first().unwrap(),
        &last_marker.to_vec(),
        "the surviving marker is the bulk with the highest log index"
    );

    crash_restart(&mut kvd);
    let after = markers(&c).await;
    assert_eq!(
        after, seen,
        "the same single marker after SIGKILL and restart"
    );
    let s = status(&http(), &kvd).await;
    assert_eq!(field(&s, "keys"), SHARED_KEYS as u64 + 1);
}

const BIG_BULK: usize = 10_000;
const KILL_ROUNDS: usize = 20;

fn round_items(prefix: &str) -> Vec<serde_json::Value> {
    (0..BIG_BULK)
        .map(|i| json!({"key": format!("{prefix}/{i:05}"), "value": format!("{prefix}-value-{i}")}))
        .collect()
}

/// Counts how many of a round's keys exist, checking every one (and its
/// value when present).
async fn count_present(port: u16, prefix: &str) -> usize {
    let paths: Vec<String> = (0..BIG_BULK)
        .map(|i| format!("/v1/kv/{prefix}/{i:05}"))
        .collect();
    let answers = tokio::task::spawn_blocking(move || node::pipelined_get(port, &paths))
        .await
        .unwrap();
    let mut present = 0;
    for (i, (status, body)) in answers.into_iter().enumerate() {
        match status {
            200 => {
                assert_eq!(
                    body,
                    format!("{prefix}-value-{i}").as_bytes(),
                    "{prefix}/{i:05} has a wrong value"
                );
                present += 1;
            }
            404 => {}
            s => panic!("GET {prefix}/{i:05} answered {s}"),
        }
    }
    present
}

/// A 10,000-key bulk with SIGKILL sent while it is in flight, 20 times:
/// after each restart its keys are all present or all absent, and present
/// whenever the bulk was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_interrupted_by_sigkill_is_all_or_nothing() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let http = http();
    let url = kvd.url();

    // Calibrate: how long does one big bulk take here? Kill delays are drawn
    // from zero up to it, so rounds land before the record is durable, between
    // its fsync and the reply, and (sometimes) after the reply.
    let calibration = serde_json::to_vec(&json!({"items": round_items("cal")})).unwrap();
    let started = Instant::now();
    let resp = http
        .post(format!("{url}/v1/bulk"))
        .header("content-type", "application/json")
        .body(calibration)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "calibration bulk failed");
    let bulk_time = started.elapsed();
    assert_eq!(count_present(kvd.port, "cal").await, BIG_BULK);
    let mut expected_keys = BIG_BULK as u64;

    let (mut all_present, mut all_absent, mut acked, mut mid_bulk) = (0, 0, 0, 0);
    let mut rng = rand::thread_rng();
    for round in 0..KILL_ROUNDS {
        let prefix = format!("round{round:02}");
        let body = serde_json::to_vec(&json!({"items": round_items(&prefix)})).unwrap();
        let max_delay_us = (bulk_time.as_micros() as u64).max(1_000);
        let delay = Duration::from_micros(rng.gen_range(0..=max_delay_us));

        let sender = {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                http.post(format!("{url}/v1/bulk"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        };
        // A deliberate random delay: the point is to crash at an arbitrary
        // moment of the write, not to wait for anything.
        tokio::time::sleep(delay).await;
        kvd.kill9().unwrap();
        let answer = sender.await.unwrap();
        let acknowledged = matches!(answer, Ok(200));
        // A connect error: the kill came before the request reached kvd.
        let reached = !matches!(&answer, Err(e) if e.is_connect());
        node::restart(&mut kvd);

        let present = count_present(kvd.port, &prefix).await;
        assert!(
            present == 0 || present == BIG_BULK,
            "round {round} (kill after {delay:?}): {present} of {BIG_BULK} keys present; \
             a bulk must be all or nothing"
        );
        if acknowledged {
            acked += 1;
            assert_eq!(
                present, BIG_BULK,
                "round {round}: the bulk was acknowledged, so every key must survive"
            );
        }
        if present == BIG_BULK {
            all_present += 1;
            expected_keys += BIG_BULK as u64;
        } else {
            all_absent += 1;
        }
        // The kill landed while the bulk was in kvd's hands: before it was
        // durable (nothing survives), or after that but before the reply.
        if reached && !acknowledged {
            mid_bulk += 1;
        }
        let s = status(&http, &kvd).await;
        assert_eq!(
            field(&s, "keys"),
            expected_keys,
            "round {round}: key count after restart"
        );
    }
    println!(
        "bulk of {BIG_BULK} keys (takes ~{bulk_time:?}), SIGKILL in flight x{KILL_ROUNDS}: \
         {all_present} rounds all present ({acked} acknowledged before the kill), \
         {all_absent} rounds all absent, {mid_bulk} kills while kvd held the bulk"
    );
    assert!(
        mid_bulk > 0,
        "no kill landed while kvd held the bulk (every round acknowledged or never \
         sent), so all-or-nothing was not tested"
    );
}
