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
//! `KVSTORE_CHAOS_SECS` sets the length (default 75; at least one round
//! of every fault runs whatever it says). `KVSTORE_CHAOS_SEED` replays a
//! fault schedule. `KVSTORE_CHAOS_KVD_ARGS` (comma-separated) adds kvd
//! flags; with `--sync-replicas=0` (commit without any secondary) this test
//! fails, which is how its teeth were checked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::chaos::{
    aim, at_both, final_reads, lost_writes, Clients, Endpoints, Progress, Schedule, MIN_BULKS,
    MIN_CAS, MIN_DELETES, MIN_READS, MIN_UNKNOWN, MIN_WRITES, OPS_AFTER_EACH_FAULT, RECOVERY,
};
use kvstore_testkit::linearizability::check;
use kvstore_testkit::sup::{kvd_args_spec, Supervised};
use kvstore_testkit::{env_u64, http_get, http_post_json, is_stopped, wait_until};
use rand::Rng;
use serde_json::{json, Value};
use tempfile::TempDir;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    StepDown,
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
        let faults = at_both(&[Fault::Kill, Fault::Stop, Fault::StepDown]);
        let mut schedule = Schedule::new(faults, 5_000..=10_000, Duration::from_secs(secs), seed);
        while let Some((pause, fault, at_primary)) = schedule.next(self.start.elapsed()) {
            // The pause is the fault rate, not a wait for anything: the
            // clients run meanwhile.
            std::thread::sleep(pause);
            self.round(fault, at_primary, schedule.rng());
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
        let names: Vec<String> = self.c.nodes.iter().map(|(n, _)| n.clone()).collect();
        let node = aim(&names, primary.as_deref(), at_primary, rng)
            .expect("three nodes")
            .to_string();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kills_stops_and_step_downs_lose_no_acknowledged_write_and_stay_linearizable() {
    let secs = env_u64("KVSTORE_CHAOS_SECS", 75);
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(
        Supervised::apply(tmp.path(), 3, &kvd_args_spec("KVSTORE_CHAOS_KVD_ARGS")).unwrap(),
    );
    let urls = c.urls();
    let to = Endpoints::plain(urls.clone());
    let clients = Clients::spawn(&to);
    let (start, progress) = (clients.start, clients.progress.clone());

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
    let mut history = clients.finish().await;
    // Once the cluster is Ready again, a final linearizable read of every
    // key, after everything else. (After a problem it may never be: the
    // history so far is still checked, and the test fails on the problem.)
    let mut finals = HashMap::new();
    if chaos.problems.is_empty() {
        c.wait_ready(RECOVERY).unwrap();
        finals = final_reads(&to, start, &mut history).await;
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
