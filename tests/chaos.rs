//! Chaos: a kvsup-run 3-node cluster takes 16 concurrent clients (puts,
//! deletes, bulks and linearizable reads through kvclient; compare-and-sets,
//! a linearizable read then a PUT with `If-Match` on its ETag, over plain
//! HTTP) while a chaos
//! monkey injects a fault every 5-10 s: SIGKILL, or SIGSTOP then SIGCONT
//! (both through `kvsup kill`), or a forced step-down (a real vote request
//! for the node's epoch + 1 from a candidate that cannot win, which the
//! node must persist, deposing itself if it leads), each aimed at the
//! primary or at a secondary. Every fault must land, and after each the
//! cluster must be Ready and serve writes and reads again. Every operation
//! is recorded; afterwards the history is checked: no acknowledged write
//! lost, every key's history linearizable (`kvstore_testkit::linearizability`),
//! all digests equal.
//!
//! `KVSTORE_CHAOS_SECS` sets the length (default 120; at least one round
//! of every fault runs whatever it says). `KVSTORE_CHAOS_SEED` replays a
//! fault schedule. `KVSTORE_CHAOS_KVD_ARGS` (comma-separated) adds kvd
//! flags; with `--sync-replicas=0` (commit without any secondary) this test
//! fails, which is how its teeth were checked.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvclient::Bytes;
use kvstore_testkit::api::{self, Outcome, Precondition};
use kvstore_testkit::linearizability::{check, Kind, Operation};
use kvstore_testkit::sup::{kvd_args_spec, single_attempt_client, Supervised};
use kvstore_testkit::{env_u64, http_get, http_post_json, is_stopped, wait_until};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tempfile::TempDir;

const CLIENTS: usize = 16;
const KEYS: usize = 32;
/// How long the cluster may take to be Ready and serving again after a
/// fault: generous, since a debug build on a loaded 2-core machine is slow
/// (a healthy run recovers from each fault in under 2 s).
const RECOVERY: Duration = Duration::from_secs(60);
/// Writes, and reads, called after a fault that must succeed before the
/// next fault.
const OPS_AFTER_EACH_FAULT: u64 = 10;
/// Whole-run minimums, far below what a healthy run does (tens of
/// thousands of operations, hundreds of unknown outcomes) yet enough to
/// say that each kind of operation was exercised.
const MIN_WRITES: u64 = 500;
const MIN_READS: u64 = 500;
const MIN_DELETES: u64 = 50;
const MIN_BULKS: u64 = 50;
const MIN_CAS: u64 = 50;
const MIN_UNKNOWN: u64 = 5;

fn client(urls: &[String], first: usize) -> kvclient::Client {
    single_attempt_client(urls, first, Duration::from_secs(1))
}

fn value_id(client: usize, seq: u64) -> u64 {
    (client as u64 + 1) * 1_000_000_000 + seq
}

fn parse_id(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// What the clients got done so far: the run's size, and the monkey's
/// evidence that the cluster serves again after a fault.
#[derive(Default)]
struct Progress {
    puts: AtomicU64,
    deletes: AtomicU64,
    bulks: AtomicU64,
    /// Compare-and-sets that wrote (the 412s are in `failures`).
    cas: AtomicU64,
    reads: AtomicU64,
    /// Writes (of any kind) whose outcome is unknown.
    unknown: AtomicU64,
    /// Writes refused with an answer that says nothing was written (left
    /// out of the history: they cannot have happened).
    refused: AtomicU64,
    /// Why writes failed, by kvclient error code (refused ones included).
    failures: Mutex<BTreeMap<String, u64>>,
    since_fault: Mutex<SinceFault>,
}

/// Successful operations called after `from` (ns since the start): ones
/// already in flight when a fault landed do not count as recovery.
#[derive(Default)]
struct SinceFault {
    from: u64,
    writes: u64,
    reads: u64,
}

impl Progress {
    /// Records a failed write; says whether its outcome is unknown.
    fn failed(&self, e: &kvclient::Error) -> bool {
        let wrote_nothing = e.was_not_applied() || matches!(e, kvclient::Error::Connect { .. });
        self.count_failure(e.code(), wrote_nothing)
    }

    /// Records a failed write by its code; says whether its outcome is
    /// unknown.
    fn count_failure(&self, code: &str, wrote_nothing: bool) -> bool {
        *self
            .failures
            .lock()
            .unwrap()
            .entry(code.to_string())
            .or_default() += 1;
        let counter = if wrote_nothing {
            &self.refused
        } else {
            &self.unknown
        };
        counter.fetch_add(1, Ordering::Relaxed);
        !wrote_nothing
    }

    fn succeeded(&self, call: u64, read: bool) {
        let mut s = self.since_fault.lock().unwrap();
        if call >= s.from {
            *(if read { &mut s.reads } else { &mut s.writes }) += 1;
        }
    }

    fn count_from(&self, from: u64) {
        *self.since_fault.lock().unwrap() = SinceFault {
            from,
            ..SinceFault::default()
        };
    }

    /// (writes, reads) since [`Progress::count_from`].
    fn since_fault(&self) -> (u64, u64) {
        let s = self.since_fault.lock().unwrap();
        (s.writes, s.reads)
    }
}

/// One client operation before it is sent.
enum Planned {
    Put(String),
    Delete(String),
    /// Distinct keys, all set to the same (per key unique) value.
    Bulk(Vec<String>),
    Read(String),
    /// A linearizable read, then a write conditional on its ETag.
    Cas(String),
}

impl Planned {
    /// 30% puts, 10% compare-and-sets, 10% deletes, 10% bulks of 2-4
    /// keys, 40% reads.
    fn random(rng: &mut rand::rngs::StdRng) -> Planned {
        let key = |rng: &mut rand::rngs::StdRng| format!("k{}", rng.gen_range(0..KEYS));
        match rng.gen_range(0..10) {
            0..=2 => Planned::Put(key(rng)),
            3 => Planned::Cas(key(rng)),
            4 => Planned::Delete(key(rng)),
            5 => {
                let n = rng.gen_range(2..=4);
                let keys = rand::seq::index::sample(rng, KEYS, n);
                Planned::Bulk(keys.iter().map(|k| format!("k{k}")).collect())
            }
            _ => Planned::Read(key(rng)),
        }
    }
}

/// Sends one planned operation (one attempt) and returns the history
/// entries it adds: one per key written, none for a failed read (it
/// observed nothing) or for a write refused with an answer that says
/// nothing was written. Any other failed write is "outcome unknown"
/// (`ret: None`).
async fn attempt(
    kv: &kvclient::Client,
    planned: Planned,
    value: u64,
    client: usize,
    start: Instant,
    progress: &Progress,
) -> (bool, Vec<Operation>) {
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let call = ns(Instant::now());
    let op = |key: String, kind: Kind, ret: Option<u64>| Operation {
        key,
        kind,
        call,
        ret,
        client,
    };
    // What a write's answer means for the history: `Some(ret)` if it may
    // have happened (`ret` None: outcome unknown), None if it cannot have.
    let outcome = |answer: Result<(), &kvclient::Error>| match answer {
        Ok(()) => Some(Some(ns(Instant::now()))),
        Err(e) => progress.failed(e).then_some(None),
    };
    let (ok, ops, counter) = match planned {
        Planned::Put(key) => {
            let answer = kv.set(&key, value.to_string()).await;
            let ops = outcome(answer.as_ref().map(|_| ()))
                .map(|ret| op(key, Kind::Write(value), ret))
                .into_iter()
                .collect();
            (answer.is_ok(), ops, &progress.puts)
        }
        Planned::Delete(key) => {
            let answer = kv.delete(&key).await;
            let existed = answer.as_ref().ok().map(|a| a.deleted);
            let ops = outcome(answer.as_ref().map(|_| ()))
                .map(|ret| op(key, Kind::Delete { existed }, ret))
                .into_iter()
                .collect();
            (answer.is_ok(), ops, &progress.deletes)
        }
        Planned::Bulk(keys) => {
            let items: Vec<(String, Bytes)> = keys
                .iter()
                .map(|k| (k.clone(), Bytes::from(value.to_string())))
                .collect();
            let answer = kv.bulk_set(&items).await;
            let ops = match outcome(answer.as_ref().map(|_| ())) {
                Some(ret) => keys
                    .into_iter()
                    .map(|k| op(k, Kind::Write(value), ret))
                    .collect(),
                None => Vec::new(),
            };
            (answer.is_ok(), ops, &progress.bulks)
        }
        Planned::Read(key) => match kv.get_consistent(&key).await {
            Ok(v) => {
                let read = Kind::Read(v.map(|b| parse_id(&b)));
                let ops = vec![op(key, read, Some(ns(Instant::now())))];
                (true, ops, &progress.reads)
            }
            Err(_) => return (false, Vec::new()),
        },
        Planned::Cas(_) => unreachable!("compare-and-sets go through attempt_cas"),
    };
    if ok {
        counter.fetch_add(1, Ordering::Relaxed);
        progress.succeeded(call, matches!(ops[0].kind, Kind::Read(_)));
    }
    (ok, ops)
}

/// A compare-and-set of `key` to `value` on the node at `url` (one
/// attempt, following a redirect to the primary): a linearizable read of
/// the value and its ETag, then a PUT with `If-Match` on it (with
/// `If-None-Match: *` if the key was absent). Returns what [`attempt`]
/// does: the read, and the write unless it cannot have happened.
async fn attempt_cas(
    url: &str,
    key: String,
    value: u64,
    client: usize,
    start: Instant,
    progress: &Progress,
) -> (bool, Vec<Operation>) {
    let http = api::client(Duration::from_secs(1));
    let ns = || start.elapsed().as_nanos() as u64;
    let op = |kind: Kind, call: u64, ret: Option<u64>| Operation {
        key: key.clone(),
        kind,
        call,
        ret,
        client,
    };
    let call = ns();
    let Ok(read) = api::get_versioned(&http, url, &key, true).await else {
        return (false, Vec::new());
    };
    let seen = read.as_ref().map(|r| parse_id(&r.value));
    let mut ops = vec![op(Kind::Read(seen), call, Some(ns()))];
    progress.reads.fetch_add(1, Ordering::Relaxed);
    progress.succeeded(call, true);
    let pre = read.map_or(Precondition::IfAbsent, |r| {
        Precondition::IfMatch(r.meta.mod_index)
    });
    let call = ns();
    let ok = match api::put_if(&http, url, &key, value.to_string().as_bytes(), pre).await {
        Outcome::Done(_) => Some(true),
        Outcome::PreconditionFailed(_) => Some(false),
        Outcome::NotWritten(code) => {
            progress.count_failure(short(&code), true);
            return (false, ops);
        }
        Outcome::Unknown(why) => {
            progress.count_failure(short(&why), false);
            None
        }
    };
    let ret = ok.map(|_| ns());
    if ok == Some(true) {
        progress.cas.fetch_add(1, Ordering::Relaxed);
        progress.succeeded(call, false);
    } else if ok == Some(false) {
        progress.count_failure("precondition_failed", true);
    }
    let kind = Kind::Cas {
        expected: seen,
        new: value,
        ok,
    };
    ops.push(op(kind, call, ret));
    (ok.is_some(), ops)
}

/// A failure's description without the parts that differ between
/// attempts (URLs), to count failures by kind.
fn short(why: &str) -> &str {
    why.split(" (").next().unwrap_or(why)
}

async fn worker(
    id: usize,
    urls: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Vec<Operation> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    let mut endpoint = id;
    let mut kv = client(&urls, endpoint);
    let mut history = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = value_id(id, seq);
        let (ok, ops) = match Planned::random(&mut rng) {
            Planned::Cas(key) => {
                let url = &urls[endpoint % urls.len()];
                attempt_cas(url, key, value, id, start, &progress).await
            }
            planned => attempt(&kv, planned, value, id, start, &progress).await,
        };
        history.extend(ops);
        if !ok {
            // Move on to the next node, after a short backoff.
            endpoint += 1;
            kv = client(&urls, endpoint);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    history
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    StepDown,
}

/// Faults times targets (the primary, or a secondary).
const FAULT_KINDS: usize = 6;

/// Every (fault, aimed at the primary?) pair, in a random order: a run of
/// one cycle or more has hit the primary with each fault.
fn cycle(rng: &mut impl Rng) -> Vec<(Fault, bool)> {
    let mut all: Vec<(Fault, bool)> = [Fault::Kill, Fault::Stop, Fault::StepDown]
        .into_iter()
        .flat_map(|f| [(f, true), (f, false)])
        .collect();
    all.shuffle(rng);
    all
}

/// What the monkey did, and everything that went wrong.
#[derive(Debug, Default)]
struct MonkeyLog {
    faults: Vec<String>,
    problems: Vec<String>,
    /// SIGKILLs per node.
    kills: HashMap<String, u64>,
    primary_kills: u64,
    step_downs: u64,
}

struct Monkey {
    c: Arc<Supervised>,
    progress: Arc<Progress>,
    start: Instant,
    log: MonkeyLog,
}

impl Monkey {
    fn run(mut self, secs: u64, seed: u64) -> MonkeyLog {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut schedule = Vec::new();
        let mut round = 0;
        loop {
            // The pause is the fault rate, not a wait for anything: the
            // clients run meanwhile.
            let pause = Duration::from_millis(rng.gen_range(5_000..10_000));
            let first_cycle_done = round >= FAULT_KINDS;
            if first_cycle_done && self.start.elapsed() + pause >= Duration::from_secs(secs) {
                break;
            }
            std::thread::sleep(pause);
            if schedule.is_empty() {
                schedule = cycle(&mut rng);
            }
            let (fault, at_primary) = schedule.pop().unwrap();
            self.round(fault, at_primary, &mut rng);
            round += 1;
            if !self.log.problems.is_empty() {
                // The test has failed; more faults would only bury the
                // first problem and make it slower.
                break;
            }
        }
        self.log
    }

    fn problem(&mut self, what: String) {
        eprintln!("chaos: PROBLEM at {:?}: {what}", self.start.elapsed());
        self.log.problems.push(what);
    }

    fn round(&mut self, fault: Fault, at_primary: bool, rng: &mut impl Rng) {
        let primary = self.c.primary();
        let node = match (&primary, at_primary) {
            (Some(p), true) => p.clone(),
            (p, _) => {
                let others: Vec<String> = self
                    .c
                    .nodes
                    .iter()
                    .map(|(n, _)| n.clone())
                    .filter(|n| Some(n) != p.as_ref())
                    .collect();
                others.choose(rng).unwrap().clone()
            }
        };
        let was_primary = primary.as_deref() == Some(node.as_str());
        let what = format!(
            "{:>6.1?} {fault:?} {node} (primary: {was_primary})",
            self.start.elapsed()
        );
        eprintln!("chaos: {what}");
        self.log.faults.push(what.clone());
        let restarts_before = self.restarts(&node);
        let landed = match fault {
            Fault::Kill => self.kill(&node, was_primary),
            Fault::Stop => self.stop_and_continue(&node, rng),
            Fault::StepDown => self.step_down(&node),
        };
        if let Err(e) = landed {
            self.problem(format!("{what}: did not land: {e:#}"));
        }
        self.wait_recovered(&what, fault, &node, restarts_before);
    }

    fn restarts(&self, node: &str) -> u64 {
        self.c.restarts(node)
    }

    fn pid(&self, node: &str) -> anyhow::Result<u32> {
        let s = self.c.node_status(node)?;
        let pid = s["pid"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no pid: {s}"))?;
        Ok(u32::try_from(pid)?)
    }

    fn kvsup_kill(&self, node: &str, signal: &str) -> anyhow::Result<()> {
        self.c.signal(node, signal)
    }

    fn kill(&mut self, node: &str, was_primary: bool) -> anyhow::Result<()> {
        self.kvsup_kill(node, "KILL")?;
        *self.log.kills.entry(node.to_string()).or_default() += 1;
        self.log.primary_kills += u64::from(was_primary);
        Ok(())
    }

    fn stop_and_continue(&mut self, node: &str, rng: &mut impl Rng) -> anyhow::Result<()> {
        let pid = self.pid(node)?;
        self.kvsup_kill(node, "STOP")?;
        let stopped = wait_until(Duration::from_secs(10), || is_stopped(pid));
        // How long the node stays frozen is the fault itself.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_000..3_000)));
        self.kvsup_kill(node, "CONT")?;
        anyhow::ensure!(stopped, "pid {pid} never showed as stopped");
        anyhow::ensure!(
            wait_until(Duration::from_secs(10), || !is_stopped(pid)),
            "pid {pid} still stopped after SIGCONT"
        );
        Ok(())
    }

    /// A vote request for the node's epoch + 1 from a candidate with an
    /// empty log: refused, but the node must adopt the epoch (persisting it)
    /// and, if it leads, step down.
    fn step_down(&mut self, node: &str) -> anyhow::Result<()> {
        let port = self.c.nodes.iter().find(|(n, _)| n == node).unwrap().1;
        let (code, body) = http_get(port, "/v1/status", Duration::from_secs(5))?;
        anyhow::ensure!(code == 200, "status answered {code}");
        let status: Value = serde_json::from_slice(&body)?;
        let epoch = status["epoch"].as_u64().unwrap_or_default() + 1;
        let vote = json!({"epoch": epoch, "candidate": "chaos",
                          "last": {"epoch": 0, "index": 0}, "pre_vote": false});
        let (code, body) = http_post_json(port, "/internal/vote", &vote, Duration::from_secs(5))?;
        let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
        anyhow::ensure!(code == 200, "vote answered {code}: {answer}");
        anyhow::ensure!(
            answer["epoch"].as_u64() >= Some(epoch) && answer["granted"] == false,
            "the node did not take epoch {epoch}, or granted it: {answer}"
        );
        self.log.step_downs += 1;
        Ok(())
    }

    /// Waits until the cluster is Ready, a killed node was restarted, and
    /// the clients got writes and reads through again.
    fn wait_recovered(&mut self, what: &str, fault: Fault, node: &str, restarts_before: u64) {
        let began = Instant::now();
        self.progress
            .count_from(began.duration_since(self.start).as_nanos() as u64);
        let mut last = String::new();
        let ok = wait_until(RECOVERY, || {
            let ready = self
                .c
                .status()
                .is_ok_and(|s| s["conditions"]["Ready"] == true);
            let restarted = fault != Fault::Kill || self.restarts(node) > restarts_before;
            let (w, r) = self.progress.since_fault();
            last = format!("ready {ready}, restarted {restarted}, {w} writes, {r} reads");
            ready && restarted && w >= OPS_AFTER_EACH_FAULT && r >= OPS_AFTER_EACH_FAULT
        });
        if ok {
            eprintln!("chaos:        recovered in {:?}", began.elapsed());
        } else {
            let status = self.c.status().unwrap_or_default();
            self.problem(format!(
                "{what}: no recovery within {RECOVERY:?} ({last}); kvsup status: {status}"
            ));
        }
    }
}

/// A linearizable read of every key (retrying, since the run is over),
/// recorded in `history`; the values read.
async fn final_reads(
    urls: &[String],
    start: Instant,
    history: &mut Vec<Operation>,
) -> HashMap<String, Option<u64>> {
    let kv = kvclient::Client::builder()
        .endpoints(urls.to_vec())
        .request_timeout(Duration::from_secs(2))
        .retry_deadline(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut finals = HashMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let call = start.elapsed().as_nanos() as u64;
        let v = kv.get_consistent(&key).await.unwrap().map(|b| parse_id(&b));
        finals.insert(key.clone(), v);
        history.push(Operation {
            key,
            kind: Kind::Read(v),
            call,
            ret: Some(start.elapsed().as_nanos() as u64),
            client: usize::MAX,
        });
    }
    finals
}

/// Acknowledged writes and deletes whose effect the final state cannot
/// show: the key's final value (or absence) comes only from operations
/// that ended before this one began, so none of them can be ordered after
/// it.
fn lost_writes(history: &[Operation], finals: &HashMap<String, Option<u64>>) -> Vec<String> {
    let effect = |k: Kind| match k {
        Kind::Write(v)
        | Kind::Cas {
            new: v,
            ok: Some(true) | None,
            ..
        } => Some(Some(v)),
        Kind::Delete { .. } => Some(None),
        Kind::Read(_)
        | Kind::Cas {
            ok: Some(false), ..
        } => None,
    };
    // For each (key, state), the latest return of an operation leaving the
    // key in that state (an unknown outcome has no bound).
    let mut latest: HashMap<(&str, Option<u64>), u64> = HashMap::new();
    for o in history {
        if let Some(state) = effect(o.kind) {
            let l = latest.entry((o.key.as_str(), state)).or_default();
            *l = (*l).max(o.ret.unwrap_or(u64::MAX));
        }
    }
    history
        .iter()
        .filter(|o| o.ret.is_some() && effect(o.kind).is_some())
        .filter(|o| {
            let fin = finals[&o.key];
            latest
                .get(&(o.key.as_str(), fin))
                .is_none_or(|&l| l < o.call)
        })
        .map(|o| format!("{}: {:?} (final {:?})", o.key, o.kind, finals[&o.key]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kills_stops_and_step_downs_lose_no_acknowledged_write_and_stay_linearizable() {
    let secs = env_u64("KVSTORE_CHAOS_SECS", 120);
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(
        Supervised::apply(tmp.path(), 3, &kvd_args_spec("KVSTORE_CHAOS_KVD_ARGS")).unwrap(),
    );
    let urls = c.urls();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let w = worker(i, urls.clone(), start, stop.clone(), progress.clone());
            tokio::spawn(w)
        })
        .collect();

    // The chaos monkey, on its own thread (it runs the kvsup CLI).
    let seed = std::env::var("KVSTORE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("chaos: seed {seed} (KVSTORE_CHAOS_SEED to repeat the fault schedule)");
    let monkey = Monkey {
        c: c.clone(),
        progress: progress.clone(),
        start,
        log: MonkeyLog::default(),
    };
    let monkey = std::thread::spawn(move || monkey.run(secs, seed));
    let chaos = tokio::task::spawn_blocking(move || monkey.join().unwrap())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for w in workers {
        history.extend(w.await.unwrap());
    }
    // Once the cluster is Ready again, a final linearizable read of every
    // key, after everything else. (After a problem it may never be: the
    // history so far is still checked, and the test fails on the problem.)
    let mut finals = HashMap::new();
    if chaos.problems.is_empty() {
        c.wait_ready(RECOVERY).unwrap();
        finals = final_reads(&urls, start, &mut history).await;
    }
    let lost = if finals.is_empty() {
        Vec::new()
    } else {
        lost_writes(&history, &finals)
    };
    let checking = Instant::now();
    let report = check(&history);
    eprintln!("chaos: history checked in {:?}", checking.elapsed());
    let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (puts, deletes, bulks) = (
        count(&progress.puts),
        count(&progress.deletes),
        count(&progress.bulks),
    );
    let (reads, unknown) = (count(&progress.reads), count(&progress.unknown));
    let cas = count(&progress.cas);
    let refused = count(&progress.refused);
    let failures = progress.failures.lock().unwrap().clone();
    let failovers = c.metric("kvsup_failovers_total").unwrap();
    let restarts: HashMap<String, u64> = c.status().unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["restarts"].as_u64().unwrap(),
            )
        })
        .collect();
    eprintln!(
        "chaos: {:?}, {} faults ({} step-downs, {} kills of the primary); acknowledged: \
         {puts} puts, {deletes} deletes, {bulks} bulks, {cas} compare-and-sets; {unknown} writes of unknown outcome, \
         {refused} refused having written nothing (failed writes by code: {failures:?}); \
         {reads} linearizable reads; {} keys; lost: {}; violations: {}; undecided: {}; \
         failovers {failovers}; restarts {restarts:?}; kills {:?}; problems: {}",
        start.elapsed(),
        chaos.faults.len(),
        chaos.step_downs,
        chaos.primary_kills,
        report.keys,
        lost.len(),
        report.violations.len(),
        report.undecided.len(),
        chaos.kills,
        chaos.problems.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(report.ok(), "not linearizable: {report:#?}");
    assert!(
        chaos.problems.is_empty(),
        "faults that did not land or were not recovered from: {:#?}",
        chaos.problems
    );

    // The faults happened, and did what they are for.
    assert!(
        chaos.primary_kills >= 1 && chaos.step_downs >= 2,
        "{chaos:#?}"
    );
    assert!(
        failovers >= chaos.primary_kills as f64,
        "{failovers} failovers after {} kills of the primary",
        chaos.primary_kills
    );
    for (node, kills) in &chaos.kills {
        assert!(
            restarts[node] >= *kills,
            "{node}: {} restarts after {kills} kills",
            restarts[node]
        );
    }
    // And enough of every operation took part to judge anything.
    for (what, n, min) in [
        (
            "acknowledged writes",
            puts + deletes + bulks + cas,
            MIN_WRITES,
        ),
        ("acknowledged deletes", deletes, MIN_DELETES),
        ("acknowledged bulks", bulks, MIN_BULKS),
        ("acknowledged compare-and-sets", cas, MIN_CAS),
        ("linearizable reads", reads, MIN_READS),
        ("writes of unknown outcome", unknown, MIN_UNKNOWN),
    ] {
        assert!(n >= min, "too few {what} ({n} < {min}) to judge anything");
    }

    // All nodes converge to the same contents.
    c.wait_converged(Duration::from_secs(30)).unwrap();
}
