//! Compare-and-set under faults: a kvsup-run 3-node cluster, 16 clients
//! incrementing one counter (a linearizable read of the value and its
//! ETag, then a PUT of the value + 1 with `If-Match` on that ETag, again
//! on 412 or on any failure) while kvsup SIGKILLs the primary every 5-10 s
//! (`kvsup kill`). Each written value is unique
//! (`<count>:<client>:<seq>`), so "the key still has the `mod_index` I
//! read" is "the register still holds the value I read", and every
//! operation goes into the linearizability checker as a read or a
//! compare-and-set (`kvstore_testkit::linearizability`).
//!
//! At the end, once the cluster is Ready: the counter's count (a
//! linearizable read) is at least the increments acknowledged and at most
//! those plus the attempts whose outcome is unknown (a timeout, a lost
//! connection, 503 `commit_timeout`): none lost, none doubled. The history
//! must be linearizable and every replica's digest equal.
//!
//! `KVSTORE_CAS_SECS` sets the length (default 60; at least two kills run
//! whatever it says). `KVSTORE_CAS_KVD_ARGS` (comma-separated) adds kvd
//! flags.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::api::{self, Outcome, Precondition};
use kvstore_testkit::linearizability::{check, Kind, Operation};
use kvstore_testkit::sup::{kvd_args_spec, Supervised};
use kvstore_testkit::{env_u64, wait_until};
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const CLIENTS: usize = 16;
const KEY: &str = "counter";
/// One attempt's bound: a write to a killed primary must not hang a client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the cluster may take to be Ready and counting again after a
/// kill: generous for a debug build on a loaded 2-core machine (a healthy
/// run recovers in well under 2 s).
const RECOVERY: Duration = Duration::from_secs(60);
/// Increments called after a kill that must be acknowledged before the
/// next kill.
const INCREMENTS_AFTER_EACH_KILL: u64 = 5;
/// Far below what a healthy run does (thousands of increments, hundreds of
/// refusals), yet enough to say the counter was contended.
const MIN_ACKED: u64 = 200;
const MIN_REFUSED: u64 = 100;
const MIN_KILLS: u64 = 2;

/// A counter value: the count, and the write's id for the checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counter {
    count: u64,
    id: u64,
}

impl Counter {
    fn new(count: u64, client: usize, seq: u64) -> Counter {
        Counter {
            count,
            id: (client as u64 + 1) * 1_000_000_000 + seq,
        }
    }

    fn text(self) -> String {
        let (client, seq) = (self.id / 1_000_000_000 - 1, self.id % 1_000_000_000);
        format!("{}:{client}:{seq}", self.count)
    }

    fn parse(v: &[u8]) -> Counter {
        let text = std::str::from_utf8(v).expect("a counter is text");
        let f: Vec<u64> = text.split(':').map(|x| x.parse().unwrap()).collect();
        assert_eq!(f.len(), 3, "not a counter: {text:?}");
        Counter::new(f[0], f[1] as usize, f[2])
    }
}

/// What the clients got done, for the summary and for the monkey's
/// evidence that the cluster counts again after a kill.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    refused: AtomicU64,
    unknown: AtomicU64,
    not_written: AtomicU64,
    failed_reads: AtomicU64,
    /// Acknowledged increments called after `since` (ns from the start).
    acked_since: AtomicU64,
    since: AtomicU64,
}

/// One client: read, compare-and-set, record both; until `stop`.
async fn client(
    id: usize,
    urls: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Vec<Operation> {
    let http = api::client(REQUEST_TIMEOUT);
    let ns = || start.elapsed().as_nanos() as u64;
    let mut history = Vec::new();
    let mut endpoint = id;
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let url = &urls[endpoint % urls.len()];
        let call = ns();
        let read = match api::get_versioned(&http, url, KEY, true).await {
            Ok(r) => r,
            Err(_) => {
                progress.failed_reads.fetch_add(1, Ordering::Relaxed);
                endpoint += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let seen = read.as_ref().map(|r| Counter::parse(&r.value));
        history.push(op(id, Kind::Read(seen.map(|c| c.id)), call, Some(ns())));

        seq += 1;
        let next = Counter::new(seen.map_or(0, |c| c.count) + 1, id, seq);
        let pre = read.map_or(Precondition::IfAbsent, |r| {
            Precondition::IfMatch(r.meta.mod_index)
        });
        let call = ns();
        let out = api::put_if(&http, url, KEY, next.text().as_bytes(), pre).await;
        let ok = match out {
            Outcome::Done(_) => {
                progress.acked.fetch_add(1, Ordering::Relaxed);
                if call >= progress.since.load(Ordering::Relaxed) {
                    progress.acked_since.fetch_add(1, Ordering::Relaxed);
                }
                Some(true)
            }
            Outcome::PreconditionFailed(_) => {
                progress.refused.fetch_add(1, Ordering::Relaxed);
                Some(false)
            }
            Outcome::NotWritten(_) => {
                // It cannot have happened: left out of the history.
                progress.not_written.fetch_add(1, Ordering::Relaxed);
                endpoint += 1;
                continue;
            }
            Outcome::Unknown(_) => {
                progress.unknown.fetch_add(1, Ordering::Relaxed);
                endpoint += 1;
                None
            }
        };
        let ret = ok.map(|_| ns());
        let kind = Kind::Cas {
            expected: seen.map(|c| c.id),
            new: next.id,
            ok,
        };
        history.push(op(id, kind, call, ret));
    }
    history
}

fn op(client: usize, kind: Kind, call: u64, ret: Option<u64>) -> Operation {
    Operation {
        key: KEY.to_string(),
        kind,
        call,
        ret,
        client,
    }
}

/// Kills the primary through kvsup every 5-10 s until `secs` have passed
/// (at least [`MIN_KILLS`] times), waiting after each kill until the
/// cluster is Ready, the node restarted and increments acknowledged
/// again. The kills; an error names the kill that did not recover.
fn monkey(c: &Supervised, secs: u64, start: Instant, progress: &Progress) -> anyhow::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(secs);
    let mut kills = 0;
    loop {
        // The pause is the fault rate, not a wait for anything.
        let pause = Duration::from_millis(rng.gen_range(5_000..10_000));
        if kills >= MIN_KILLS && start.elapsed() + pause >= Duration::from_secs(secs) {
            return Ok(kills);
        }
        std::thread::sleep(pause);
        let primary = c
            .primary()
            .ok_or_else(|| anyhow::anyhow!("no primary to kill"))?;
        let restarts = c.restarts(&primary);
        eprintln!("cas: {:>6.1?} SIGKILL {primary}", start.elapsed());
        progress.acked_since.store(0, Ordering::Relaxed);
        let from = start.elapsed().as_nanos() as u64;
        progress.since.store(from, Ordering::Relaxed);
        c.signal(&primary, "KILL")?;
        kills += 1;
        let began = Instant::now();
        let recovered = wait_until(RECOVERY, || {
            let ready = c.status().is_ok_and(|s| s["conditions"]["Ready"] == true);
            let acked = progress.acked_since.load(Ordering::Relaxed);
            ready && c.restarts(&primary) > restarts && acked >= INCREMENTS_AFTER_EACH_KILL
        });
        anyhow::ensure!(
            recovered,
            "no recovery within {RECOVERY:?} of killing {primary}: status {:?}",
            c.status().ok()
        );
        eprintln!("cas:        recovered in {:?}", began.elapsed());
    }
}

/// A linearizable read of the counter once the run is over (retrying:
/// the cluster may still be settling), recorded in `history`.
async fn final_read(urls: &[String], start: Instant, history: &mut Vec<Operation>) -> u64 {
    let http = api::client(REQUEST_TIMEOUT);
    let deadline = Instant::now() + RECOVERY;
    for attempt in 0.. {
        let url = &urls[attempt % urls.len()];
        let call = start.elapsed().as_nanos() as u64;
        match api::get_versioned(&http, url, KEY, true).await {
            Ok(v) => {
                let seen = v.map(|r| Counter::parse(&r.value));
                let ret = Some(start.elapsed().as_nanos() as u64);
                history.push(op(usize::MAX, Kind::Read(seen.map(|c| c.id)), call, ret));
                return seen.map_or(0, |c| c.count);
            }
            Err(e) if Instant::now() > deadline => panic!("the final read failed: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    unreachable!("the loop returns or panics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_increments_under_primary_kills_are_neither_lost_nor_doubled() {
    let secs = env_u64("KVSTORE_CAS_SECS", 60);
    let tmp = TempDir::new().unwrap();
    let c =
        Arc::new(Supervised::apply(tmp.path(), 3, &kvd_args_spec("KVSTORE_CAS_KVD_ARGS")).unwrap());
    let (urls, start) = (c.urls(), Instant::now());
    let (stop, progress) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Progress::default()),
    );
    let run = |i| client(i, urls.clone(), start, stop.clone(), progress.clone());
    let clients: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(run(i))).collect();
    let (c2, p2) = (c.clone(), progress.clone());
    let kills = tokio::task::spawn_blocking(move || monkey(&c2, secs, start, &p2))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for w in clients {
        history.extend(w.await.unwrap());
    }
    let kills = kills.unwrap();
    c.wait_ready(RECOVERY).unwrap();
    let count = final_read(&urls, start, &mut history).await;

    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (acked, unknown, refused) = (
        n(&progress.acked),
        n(&progress.unknown),
        n(&progress.refused),
    );
    let checking = Instant::now();
    let report = check(&history);
    eprintln!(
        "cas: {:?}, {kills} kills of the primary; final count {count}; {acked} increments \
         acknowledged, {unknown} of unknown outcome, {refused} refused with 412, {} not written, \
         {} failed reads; {} operations checked in {:?}: violations {}, undecided {}",
        start.elapsed(),
        n(&progress.not_written),
        n(&progress.failed_reads),
        report.operations,
        checking.elapsed(),
        report.violations.len(),
        report.undecided.len(),
    );
    assert!(
        count >= acked,
        "lost increments: count {count} < {acked} acknowledged"
    );
    assert!(
        count <= acked + unknown,
        "doubled increments: count {count} > {acked} acknowledged + {unknown} unknown"
    );
    assert!(report.ok(), "not linearizable: {report:#?}");
    assert!(kills >= MIN_KILLS, "{kills} kills");
    let failovers = c.metric("kvsup_failovers_total").unwrap();
    assert!(
        failovers >= kills as f64,
        "{failovers} failovers after {kills} kills of the primary"
    );
    for (what, got, min) in [
        ("acknowledged increments", acked, MIN_ACKED),
        ("refusals (412)", refused, MIN_REFUSED),
    ] {
        assert!(
            got >= min,
            "too few {what} ({got} < {min}) to judge anything"
        );
    }
    c.wait_converged(Duration::from_secs(30)).unwrap();
}
