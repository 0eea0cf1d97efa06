//! Chaos across test hosts: the secured three-host cluster of
//! `tests/hosts.rs` (nodes run from their rendered systemd units in their
//! own network namespaces, kvsup in a fourth) takes the chaos test's 16
//! clients (`testkit::chaos`, over TLS with the client token) while a
//! monkey injects a fault every 3-6 s: SIGKILL of a node's process (its
//! service starts it again), SIGSTOP then SIGCONT 1-3 s later, or its
//! host's link down for 1-5 s, each aimed at the primary or a secondary.
//! After each, the cluster must be Ready and serve writes and reads again.
//! Afterwards: no acknowledged write lost, every key's history
//! linearizable, all digests equal.
//!
//! `KVSTORE_HOSTS_CHAOS_SECS` sets the length (default 90; one round of
//! every fault runs whatever it says), `KVSTORE_CHAOS_SEED` replays a
//! schedule, `KVSTORE_CHAOS_KVD_ARGS` (comma-separated) adds kvd flags:
//! with `--sync-replicas=0` (commit without any secondary) it fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::chaos::{
    aim, at_both, final_reads, lost_writes, Clients, Progress, Schedule, MIN_READS, MIN_UNKNOWN,
    MIN_WRITES, OPS_AFTER_EACH_FAULT, RECOVERY,
};
use kvstore_testkit::host_cluster::HostCluster;
use kvstore_testkit::linearizability::check;
use kvstore_testkit::sup::kvd_args_spec;
use kvstore_testkit::{env_u64, is_stopped, wait_until};
use nix::sys::signal::Signal;
use rand::Rng;
use tempfile::TempDir;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Partition,
}

#[derive(Debug, Default)]
struct Log {
    faults: Vec<String>,
    problems: Vec<String>,
    partitions: u64,
    primary_faults: u64,
}

struct Monkey {
    c: Arc<HostCluster>,
    progress: Arc<Progress>,
    start: Instant,
    rt: tokio::runtime::Handle,
    log: Log,
}

impl Monkey {
    fn run(mut self, secs: u64, seed: u64) -> Log {
        let faults = at_both(&[Fault::Kill, Fault::Stop, Fault::Partition]);
        let mut schedule = Schedule::new(faults, 3_000..=6_000, Duration::from_secs(secs), seed);
        while let Some((pause, fault, at_primary)) = schedule.next(self.start.elapsed()) {
            // The fault rate, not a wait for anything: the clients run.
            std::thread::sleep(pause);
            self.round(fault, at_primary, schedule.rng());
            if !self.log.problems.is_empty() {
                break;
            }
        }
        self.log
    }

    fn problem(&mut self, what: String) {
        eprintln!("hosts chaos: PROBLEM at {:?}: {what}", self.start.elapsed());
        self.log.problems.push(what);
    }

    fn round(&mut self, fault: Fault, at_primary: bool, rng: &mut impl Rng) {
        let primary = self.rt.block_on(self.c.primary());
        let node = aim(&self.c.nodes, primary.as_deref(), at_primary, rng)
            .expect("three hosts")
            .to_string();
        let was_primary = primary.as_deref() == Some(node.as_str());
        self.log.primary_faults += u64::from(was_primary);
        let what = format!(
            "{:>6.1?} {fault:?} {node} (primary: {was_primary})",
            self.start.elapsed()
        );
        eprintln!("hosts chaos: {what}");
        self.log.faults.push(what.clone());
        let landed = match fault {
            Fault::Kill => self.c.hosts.signal(&node, Signal::SIGKILL).map(|_| ()),
            Fault::Stop => self.stop_and_continue(&node, rng),
            Fault::Partition => self.partition(&node, rng),
        };
        if let Err(e) = landed {
            self.problem(format!("{what}: did not land: {e:#}"));
        }
        self.wait_recovered(&what);
    }

    fn stop_and_continue(&mut self, node: &str, rng: &mut impl Rng) -> anyhow::Result<()> {
        let pid = self.c.hosts.signal(node, Signal::SIGSTOP)?;
        let stopped = wait_until(Duration::from_secs(10), || is_stopped(pid));
        // How long the node stays frozen is the fault itself.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_000..3_000)));
        self.c.hosts.signal(node, Signal::SIGCONT)?;
        anyhow::ensure!(stopped, "pid {pid} never showed as stopped");
        Ok(())
    }

    fn partition(&mut self, node: &str, rng: &mut impl Rng) -> anyhow::Result<()> {
        self.c.hosts.cut(node)?;
        // How long the host stays cut off is the fault itself.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_000..5_000)));
        self.c.hosts.heal(node)?;
        self.log.partitions += 1;
        Ok(())
    }

    /// Waits until the cluster is Ready and the clients got writes and
    /// reads through again.
    fn wait_recovered(&mut self, what: &str) {
        let began = Instant::now();
        self.progress
            .count_from(began.duration_since(self.start).as_nanos() as u64);
        let mut last = String::new();
        let ok = wait_until(RECOVERY, || {
            let ready = self
                .c
                .status()
                .is_ok_and(|s| s["conditions"]["Ready"] == true);
            let (w, r) = self.progress.since_fault();
            last = format!("ready {ready}, {w} writes, {r} reads");
            ready && w >= OPS_AFTER_EACH_FAULT && r >= OPS_AFTER_EACH_FAULT
        });
        if ok {
            eprintln!("hosts chaos:        recovered in {:?}", began.elapsed());
        } else {
            let status = self.c.status().unwrap_or_default();
            self.problem(format!(
                "{what}: no recovery within {RECOVERY:?} ({last}); kvsup status: {status}"
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_across_hosts_with_partitions_loses_no_acknowledged_write_and_stays_linearizable() {
    let secs = env_u64("KVSTORE_HOSTS_CHAOS_SECS", 90);
    let tmp = TempDir::new().unwrap();
    let extra = kvd_args_spec("KVSTORE_CHAOS_KVD_ARGS");
    let c = Arc::new(HostCluster::start(tmp.path(), 3, "primary-secondary", &extra).unwrap());
    let to = c.endpoints().unwrap();
    let clients = Clients::spawn(&to);
    let (start, progress) = (clients.start, clients.progress.clone());
    let seed = std::env::var("KVSTORE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("hosts chaos: seed {seed} (KVSTORE_CHAOS_SEED to repeat the fault schedule)");
    let monkey = Monkey {
        c: c.clone(),
        progress: progress.clone(),
        start,
        rt: tokio::runtime::Handle::current(),
        log: Log::default(),
    };
    let chaos = tokio::task::spawn_blocking(move || monkey.run(secs, seed))
        .await
        .unwrap();
    let mut history = clients.finish().await;
    let mut finals = std::collections::HashMap::new();
    if chaos.problems.is_empty() {
        let c2 = c.clone();
        tokio::task::spawn_blocking(move || c2.wait_ready(RECOVERY))
            .await
            .unwrap()
            .unwrap();
        finals = final_reads(&to, start, &mut history).await;
    }
    let lost = if finals.is_empty() {
        Vec::new()
    } else {
        lost_writes(&history, &finals)
    };
    let report = check(&history);
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let writes = n(&progress.puts) + n(&progress.deletes) + n(&progress.bulks) + n(&progress.cas);
    let (reads, unknown) = (n(&progress.reads), n(&progress.unknown));
    let failures = progress.failures.lock().unwrap().clone();
    eprintln!(
        "hosts chaos: {:?}, {} faults ({} partitions, {} at the primary); acknowledged {writes} \
         writes, {unknown} of unknown outcome, {reads} linearizable reads (failed writes by \
         code: {failures:?}); {} keys; lost: {}; violations: {}; undecided: {}; problems: {}",
        start.elapsed(),
        chaos.faults.len(),
        chaos.partitions,
        chaos.primary_faults,
        report.keys,
        lost.len(),
        report.violations.len(),
        report.undecided.len(),
        chaos.problems.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(report.ok(), "not linearizable: {report:#?}");
    assert!(chaos.problems.is_empty(), "{:#?}", chaos.problems);
    assert!(
        chaos.partitions >= 2 && chaos.primary_faults >= 3,
        "{chaos:#?}"
    );
    for (what, got, min) in [
        ("acknowledged writes", writes, MIN_WRITES),
        ("linearizable reads", reads, MIN_READS),
        ("writes of unknown outcome", unknown, MIN_UNKNOWN),
    ] {
        assert!(
            got >= min,
            "too few {what} ({got} < {min}) to judge anything"
        );
    }
    c.converged(Duration::from_secs(30)).await.unwrap();
}
