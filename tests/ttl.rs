//! Keys that expire (docs/DESIGN.md §2.15) on a three-node
//! primary/secondary cluster: 10,000 keys with TTLs of 0.5-3 s, written in
//! bulks paced over a few seconds, while one checker thread per node reads
//! every key written so far again and again over pipelined GETs. A secondary
//! is SIGKILLed and restarted, and later the primary is SIGKILLed and a
//! survivor promoted, while keys are alive; neither may change a deadline.
//!
//! Clocks: every node runs on this machine, so the test's wall clock is
//! theirs. The primary reads its clock for a deadline after the bulk was
//! sent and before it was answered, so the deadline is within
//! `[sent + ttl, answered + ttl]`; a read is answered from the node's clock
//! between the read's send and its answer. Hence:
//! - a read sent at or after `answered + ttl` must find the key absent
//!   (never readable after its deadline, on any node);
//! - a read answered before `sent + ttl`, on a node that had applied the
//!   bulk before the read was sent, must find it with its value (no early
//!   expiry).
//!
//! Once every deadline has passed, every key is 404 on every node, and
//! every node removes them all (`keys` and `kvd_keys_with_ttl` reach 0) and
//! ends with the same digest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvstore_testkit::api::{Outcome, Precondition};
use kvstore_testkit::cluster::promote_survivor;
use kvstore_testkit::node::{restart, try_pipelined_get};
use kvstore_testkit::ttl::{self, now_ms, Expiry};
use kvstore_testkit::{start_cluster, wait_until};
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const KEYS: usize = 10_000;
const PER_BULK: usize = 250;
/// Bulks start this far apart, so keys are alive throughout the run.
const PACE: Duration = Duration::from_millis(150);
const TTL_MS: std::ops::RangeInclusive<u64> = 500..=3000;
/// After this bulk a secondary is restarted, after the second the primary
/// killed and a survivor promoted.
const RESTART_AFTER: usize = 10;
const FAILOVER_AFTER: usize = 25;
/// A generous bound for removals to reach every node (a healthy run
/// removes them within about 100 ms of each deadline).
const REMOVAL: Duration = Duration::from_secs(60);

/// One acknowledged key.
#[derive(Clone, Debug)]
struct Written {
    key: String,
    value: Vec<u8>,
    ttl_ms: u64,
    /// When the first attempt of its bulk was sent.
    sent_ms: u64,
    /// When the acknowledged attempt was answered (+1).
    answered_ms: u64,
    /// The acknowledged bulk's index.
    index: u64,
}

fn path(key: &str) -> String {
    format!("/v1/kv/{key}")
}

/// What one node's checker saw.
#[derive(Default, Debug)]
struct Seen {
    /// Reads that had to find the key alive, and did.
    alive_checks: u64,
    /// Reads that had to find the key gone, and did.
    dead_checks: u64,
    /// Sweeps that could not read the node (it was down).
    skipped: u64,
    failures: Vec<String>,
}

/// Checks one sweep's answers against what was written.
fn judge(
    node: usize,
    written: &[Written],
    applied: u64,
    (t0, t1): (u64, u64),
    answers: &[(u16, Vec<u8>)],
    seen: &mut Seen,
) {
    for (w, (code, body)) in written.iter().zip(answers) {
        let dead = t0 >= w.answered_ms + w.ttl_ms;
        let alive = t1 < w.sent_ms + w.ttl_ms && applied >= w.index;
        if dead {
            if *code == 404 {
                seen.dead_checks += 1;
            } else if *code == 200 {
                seen.failures.push(format!(
                    "n{node}: {} read ({code}) {} ms after its latest possible deadline \
                     (read sent at {t0}, deadline <= {})",
                    w.key,
                    t0 - (w.answered_ms + w.ttl_ms),
                    w.answered_ms + w.ttl_ms
                ));
            }
        } else if alive {
            if *code == 200 && *body == w.value {
                seen.alive_checks += 1;
            } else if *code == 200 || *code == 404 {
                seen.failures.push(format!(
                    "n{node}: {} answered {code} {:?} {} ms before its earliest deadline \
                     (applied {applied} >= {})",
                    w.key,
                    String::from_utf8_lossy(body),
                    w.sent_ms + w.ttl_ms - t1,
                    w.index
                ));
            }
        }
    }
}

/// Reads every written key on the node at `port` until `stop`.
fn checker(
    node: usize,
    port: u16,
    written: Arc<Mutex<Vec<Written>>>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let snapshot = written.lock().unwrap().clone();
        if snapshot.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let paths: Vec<String> = snapshot.iter().map(|w| path(&w.key)).collect();
        let applied = ttl::status(port)
            .ok()
            .and_then(|s| s["applied_index"].as_u64());
        let t0 = now_ms();
        let answers = try_pipelined_get(port, &paths);
        let t1 = now_ms() + 1;
        match (applied, answers) {
            (Some(applied), Ok(answers)) => {
                judge(node, &snapshot, applied, (t0, t1), &answers, &mut seen)
            }
            _ => {
                seen.skipped += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    seen
}

/// Sends one bulk until some node acknowledges it, moving to the next
/// node after a failure; the time of its first send and the answer.
async fn write_bulk(
    http: &reqwest::Client,
    urls: &[String],
    first: &mut usize,
    items: &[(String, Vec<u8>, Expiry)],
) -> (u64, ttl::Timed) {
    let sent_ms = now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = ttl::timed(ttl::bulk(http, &urls[*first], items)).await;
        match &t.outcome {
            Outcome::Done(_) => return (sent_ms, t),
            Outcome::NotWritten(e) | Outcome::Unknown(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no node took a bulk within 60 s: {e}"
                );
                *first = (*first + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Outcome::PreconditionFailed(_) => panic!("a bulk has no precondition"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_ttls_expire_on_time_on_every_node_through_a_restart_and_a_failover() {
    let tmp = TempDir::new().unwrap();
    let mut nodes = start_cluster(tmp.path(), &[]).unwrap();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let http = kvstore_testkit::api::client(Duration::from_secs(10));
    // A permanent key, which all of this must leave alone.
    let keep = kvstore_testkit::api::put_if(&http, &urls[0], "keep", b"k", Precondition::None)
        .await
        .index("put keep");
    assert!(keep > 0);

    let written = Arc::new(Mutex::new(Vec::<Written>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let checkers: Vec<_> = (0..3)
        .map(|i| {
            let (w, s, port) = (written.clone(), stop.clone(), ports[i]);
            std::thread::spawn(move || checker(i, port, w, s))
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut first = 0usize;
    let mut primary = 0usize;
    let mut next = tokio::time::Instant::now();
    for b in 0..KEYS / PER_BULK {
        tokio::time::sleep_until(next).await;
        next += PACE;
        let items: Vec<(String, Vec<u8>, Expiry)> = (b * PER_BULK..(b + 1) * PER_BULK)
            .map(|i| {
                let ttl = rng.gen_range(TTL_MS);
                (
                    format!("ttl/{i:05}"),
                    format!("v{i}").into_bytes(),
                    Expiry::Ttl(ttl),
                )
            })
            .collect();
        let (sent_ms, t) = write_bulk(&http, &urls, &mut first, &items).await;
        let index = t.outcome.clone().index("bulk");
        written
            .lock()
            .unwrap()
            .extend(items.into_iter().map(|(key, value, e)| Written {
                key,
                value,
                ttl_ms: match e {
                    Expiry::Ttl(ms) => ms,
                    _ => unreachable!(),
                },
                sent_ms,
                answered_ms: t.answered_ms,
                index,
            }));
        if b + 1 == RESTART_AFTER {
            let secondary = (primary + 2) % 3;
            nodes[secondary].kill9().unwrap();
            restart(&mut nodes[secondary]);
        }
        if b + 1 == FAILOVER_AFTER {
            nodes[primary].kill9().unwrap();
            let survivors: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
            let sp: Vec<u16> = survivors.iter().map(|&i| ports[i]).collect();
            let won =
                tokio::task::spawn_blocking(move || promote_survivor(&sp, Duration::from_secs(60)))
                    .await
                    .unwrap()
                    .unwrap();
            let old = primary;
            primary = survivors[won];
            first = primary;
            restart(&mut nodes[old]);
        }
    }

    // Every deadline passes, and a second after the last one the checkers
    // have had their chance; then one final read of everything.
    let last_dead = written
        .lock()
        .unwrap()
        .iter()
        .map(|w| w.answered_ms + w.ttl_ms)
        .max()
        .unwrap();
    let ok = wait_until(Duration::from_secs(30), || now_ms() > last_dead + 1000);
    assert!(ok, "the clock did not pass the last deadline");
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = checkers.into_iter().map(|c| c.join().unwrap()).collect();
    for (i, s) in seen.iter().enumerate() {
        eprintln!(
            "n{i}: {} alive checks, {} dead checks, {} skipped sweeps, {} failures",
            s.alive_checks,
            s.dead_checks,
            s.skipped,
            s.failures.len()
        );
    }
    let failures: Vec<&String> = seen.iter().flat_map(|s| &s.failures).collect();
    assert!(
        failures.is_empty(),
        "{} bad reads, the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    // The run must have checked both sides of the deadline on every node.
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.alive_checks >= 1000 && s.dead_checks >= 1000,
            "n{i} checked too little: {s:?}"
        );
    }

    let all = written.lock().unwrap().clone();
    assert_eq!(all.len(), KEYS);
    let paths: Vec<String> = all.iter().map(|w| path(&w.key)).collect();
    for (i, &port) in ports.iter().enumerate() {
        let answers = try_pipelined_get(port, &paths).unwrap();
        let live: Vec<&str> = all
            .iter()
            .zip(&answers)
            .filter(|(_, (code, _))| *code != 404)
            .map(|(w, _)| w.key.as_str())
            .collect();
        assert!(
            live.is_empty(),
            "n{i} still answers {} keys: {:?}",
            live.len(),
            &live[..live.len().min(10)]
        );
        let keep = try_pipelined_get(port, &[path("keep")]).unwrap();
        assert_eq!(keep[0], (200, b"k".to_vec()), "n{i} lost the permanent key");
    }
    // Removal: every node is down to the permanent key, with no deadline
    // left, and the same digest.
    let mut last = Vec::new();
    let removed = wait_until(REMOVAL, || {
        last = ports
            .iter()
            .map(|&p| {
                let s = ttl::status(p).ok()?;
                Some((
                    s["keys"].as_u64()?,
                    ttl::metric(p, "kvd_keys_with_ttl"),
                    s["digest"].as_str()?.to_string(),
                ))
            })
            .collect::<Vec<_>>();
        last.iter()
            .all(|x| matches!(x, Some((1, Some(t), _)) if *t == 0.0))
            && last.windows(2).all(|w| w[0] == w[1])
    });
    assert!(
        removed,
        "the nodes did not all remove the expired keys: {last:?}"
    );
    let expired: Vec<Option<f64>> = ports
        .iter()
        .map(|&p| ttl::metric(p, "kvd_expired_keys_total"))
        .collect();
    eprintln!("kvd_expired_keys_total per node: {expired:?}");
    // Every node applied removals (its counter starts at its own start;
    // each was up for some of the deadlines).
    assert!(
        expired.iter().all(|e| e.is_some_and(|n| n > 0.0)),
        "{expired:?}"
    );
}
