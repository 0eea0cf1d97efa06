//! `kvsup chaos`: a Jepsen-style check of the user's own cluster. The
//! clients and the judge are kvcheck's (the ones the chaos tests use): 16
//! clients write and read through kvclient while faults go in through the
//! running supervisor's API (`/v1/kill`: SIGKILL, or SIGSTOP then SIGCONT,
//! of the primary or of a secondary, or the primary killed while every
//! secondary is stopped); after each fault the run waits until the cluster
//! is Ready and serves writes and reads again. Then a final read of every
//! key, the acknowledged writes lost, the history's linearizability check
//! and equal digests on every node; the history is saved as JSON lines.
//!
//! The decisions (whether a manifest may be a target, the fault schedule,
//! the verdict and its report) are pure functions, tested below; [`run`]
//! moves the bytes.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvcheck::clients::{self, Clients, Endpoints, Progress, Workload};
use kvcheck::faults::{self, Schedule};
use kvcheck::linearizability::{self, Operation};
use rand::Rng;
use serde_json::{json, Value};

use crate::manifest::{Manifest, Mode};

/// A run that must not start: the command exits 2 with this message, having
/// changed nothing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A run that found lost writes, violations or a cluster that did not
/// recover: the report is printed, the command exits 1.
#[derive(Debug, thiserror::Error)]
#[error("the chaos run failed: {0}")]
pub struct Failed(pub String);

/// What `kvsup chaos` was asked to do (its flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// How long to inject faults: 90s, 2m, 1h (at least one round of
    /// every chosen fault runs whatever it says).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub duration: Duration,
    /// SIGKILL the primary or a secondary (restarted by the supervisor).
    #[arg(long)]
    pub kill: bool,
    /// SIGSTOP the primary or a secondary for 1-3 s, then SIGCONT. With
    /// --kill too: also the primary killed while every secondary is
    /// stopped.
    #[arg(long)]
    pub stop: bool,
    /// Cut a node off from its peers (not supported on one host yet:
    /// refused).
    #[arg(long)]
    pub partition: bool,
    /// Where to save the history, as JSON lines (default:
    /// `<stateDir>/chaos/history-<unix-ms>.jsonl`).
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Seed of the fault schedule and the clients' operations (default:
    /// random; printed, to repeat a run).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL; the supervisor restarts the node (and fails a primary over).
    Kill,
    /// SIGSTOP, a pause of 1-3 s, SIGCONT: a node that hangs, then wakes.
    Stop,
    /// SIGSTOP every secondary, 1-2 s, SIGKILL the primary, SIGCONT the
    /// secondaries: a primary that lost its replicas, then crashed. A
    /// cluster that acknowledges writes no secondary holds loses them here
    /// (with both `--kill` and `--stop`; always aimed at the primary).
    KillAlone,
}

/// Why a manifest may not be a chaos run's target, or `None` if it may.
pub fn refusal(m: &Manifest, o: &Options) -> Option<String> {
    if !m.spec.chaos_allowed() {
        return Some(format!(
            "cluster {:?} does not allow chaos runs: they kill its nodes and write keys under \
             chaos/; add `chaos: allowed` to its spec to allow them",
            m.metadata.name
        ));
    }
    if m.spec.mode == Mode::Masterless {
        return Some(
            "spec.mode is masterless: its last-write-wins replicas are not linearizable, and \
             the check is a linearizability check (for primary-secondary clusters)"
                .into(),
        );
    }
    if o.partition {
        return Some(
            "--partition is not supported: the nodes of a kvsup cluster share one host, so a \
             partition needs the nodes' own help, which kvd does not offer yet; use --kill \
             and --stop"
                .into(),
        );
    }
    if !o.kill && !o.stop {
        return Some("no fault chosen: pass --kill, --stop or both".into());
    }
    if m.spec.nodes.len() < 3 {
        return Some(format!(
            "the cluster has {} node(s): a fault needs 3 or more to be survived",
            m.spec.nodes.len()
        ));
    }
    None
}

/// `90s`, `2m`, `1h`, `1500ms`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a duration is a number and a unit (90s, 2m, 1h)"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{s:?}: the unit is ms, s, m or h")),
    };
    if ms == 0 {
        return Err("the duration must be more than 0".into());
    }
    Ok(Duration::from_millis(ms))
}

/// Every chosen (fault, aimed at the primary?) pair: a run of one cycle or
/// more hits the primary and a secondary with each.
pub fn cycle(o: &Options) -> Vec<(Fault, bool)> {
    let chosen: Vec<Fault> = [(Fault::Kill, o.kill), (Fault::Stop, o.stop)]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect();
    let mut all = faults::at_both(&chosen);
    if o.kill && o.stop {
        all.push((Fault::KillAlone, true));
    }
    all
}

/// The pauses before faults, in milliseconds: the fault rate. A short run
/// gets shorter pauses, so that it still takes a fault of every kind.
pub fn pauses_ms(duration: Duration, faults_per_cycle: usize) -> RangeInclusive<u64> {
    let per = duration.as_millis() as u64 / (faults_per_cycle.max(1) as u64 * 2);
    let top = per.clamp(1_000, 10_000);
    top / 2..=top
}

/// Operations acknowledged, by kind (reads: linearizable reads that
/// answered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub puts: u64,
    pub deletes: u64,
    pub bulks: u64,
    pub cas: u64,
    pub reads: u64,
    pub unknown: u64,
    pub refused: u64,
    pub failures: BTreeMap<String, u64>,
}

impl Counts {
    pub fn of(p: &Progress) -> Counts {
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            puts: n(&p.puts),
            deletes: n(&p.deletes),
            bulks: n(&p.bulks),
            cas: n(&p.cas),
            reads: n(&p.reads),
            unknown: n(&p.unknown),
            refused: n(&p.refused),
            failures: p
                .failures
                .lock()
                .map(|f| f.clone())
                .unwrap_or_else(|e| e.into_inner().clone()),
        }
    }
}

/// Everything a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub elapsed: Duration,
    pub faults: Vec<String>,
    /// Faults that did not land, or after which the cluster did not
    /// recover; replicas that did not converge once the clients stopped.
    pub problems: Vec<String>,
    pub counts: Counts,
    pub operations: usize,
    pub keys: usize,
    pub lost: Vec<String>,
    pub violations: Vec<String>,
    pub undecided: Vec<String>,
    pub history: Option<PathBuf>,
}

/// How many lost writes and violations the report lists in full.
const SHOWN: usize = 10;
/// A violation's witness is cut to this many characters in the report (the
/// history file has everything).
const WITNESS_CHARS: usize = 600;

impl Report {
    /// Whether the run passes: nothing lost, nothing non-linearizable, and
    /// every fault landed and was recovered from.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.violations.is_empty() && self.problems.is_empty()
    }

    /// One line of why it failed (for the exit message).
    pub fn failure(&self) -> String {
        format!(
            "{} acknowledged write(s) lost, {} linearizability violation(s), {} fault \
             problem(s)",
            self.lost.len(),
            self.violations.len(),
            self.problems.len()
        )
    }

    /// The report as printed.
    pub fn render(&self) -> String {
        let c = &self.counts;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "chaos run: {:.1?}, seed {} (--seed {} repeats the schedule)",
            self.elapsed, self.seed, self.seed
        ));
        line(format!("faults: {}", self.faults.len()));
        for f in &self.faults {
            line(format!("  {f}"));
        }
        line(format!(
            "operations: {} puts, {} deletes, {} bulks, {} compare-and-sets, {} linearizable \
             reads acknowledged; {} writes of unknown outcome; {} refused having written \
             nothing",
            c.puts, c.deletes, c.bulks, c.cas, c.reads, c.unknown, c.refused
        ));
        if !c.failures.is_empty() {
            let f: Vec<String> = c.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
            line(format!("failed writes by code: {}", f.join(", ")));
        }
        line(format!(
            "history: {} operations on {} keys{}",
            self.operations,
            self.keys,
            self.history
                .as_ref()
                .map_or(String::new(), |p| format!(", saved to {}", p.display()))
        ));
        line(format!("acknowledged writes lost: {}", self.lost.len()));
        for l in self.lost.iter().take(SHOWN) {
            line(format!("  {l}"));
        }
        line(format!(
            "linearizability violations: {}",
            self.violations.len()
        ));
        for v in self.violations.iter().take(SHOWN) {
            line(format!("  {}", cut(v, WITNESS_CHARS)));
        }
        let more = |n: usize| n.saturating_sub(SHOWN);
        if more(self.lost.len()) + more(self.violations.len()) > 0 {
            line("  ... (the rest: in the history file, checked again the same way)".into());
        }
        line(format!(
            "undecided keys: {}{}",
            self.undecided.len(),
            if self.undecided.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.undecided.join(", "))
            }
        ));
        for p in &self.problems {
            line(format!("problem: {p}"));
        }
        line(format!(
            "verdict: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        ));
        out
    }
}

fn cut(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((at, _)) => format!("{} ...", &s[..at]),
        None => s.to_string(),
    }
}

/// How the run reaches the cluster and its supervisor.
pub struct Target {
    pub manifest: Manifest,
    pub state_dir: PathBuf,
    pub supervisor: String,
    pub admin_token_file: PathBuf,
}

/// How long the cluster may take to be Ready and serving after a fault.
const RECOVERY: Duration = clients::RECOVERY;
/// Every call to the supervisor's API has this bound.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The supervisor's API, with the admin token.
struct Supervisor {
    base: String,
    http: reqwest::Client,
    auth: String,
}

impl Supervisor {
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let r = req
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .timeout(API_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("no kvsup supervisor answering at {}", self.base))?;
        let code = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !code.is_success() {
            let msg = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            bail!("the supervisor answered {code}: {msg}");
        }
        Ok(body)
    }

    async fn status(&self) -> Result<Value> {
        self.call(self.http.get(format!("{}/v1/status", self.base)))
            .await
    }

    async fn signal(&self, node: &str, signal: &str) -> Result<()> {
        let body = json!({"node": node, "signal": signal});
        let req = self.http.post(format!("{}/v1/kill", self.base)).json(&body);
        self.call(req).await.map(|_| ())
    }
}

fn ready(status: &Value) -> bool {
    status["conditions"]["Ready"] == true
}

fn restarts(status: &Value, node: &str) -> u64 {
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .and_then(|n| n["restarts"].as_u64())
        .unwrap_or(0)
}

/// The clients' view of the cluster: every node's URL, with the CA and the
/// client token of `tls: auto`.
fn endpoints(m: &Manifest, state_dir: &Path) -> Result<Endpoints> {
    let tls = m.spec.tls_auto();
    let urls = m.spec.nodes.iter().map(|n| n.url(tls)).collect();
    let mut to = Endpoints::plain(urls);
    if tls {
        let layout = crate::creds::Layout::in_state_dir(state_dir);
        let token = std::fs::read_to_string(layout.client_token())
            .with_context(|| format!("reading {}", layout.client_token().display()))?;
        to.token = Some(token.trim().to_string());
        to.tls = Some(kvclient::TlsFiles {
            ca: Some(layout.ca()),
            cert: None,
            key: None,
        });
    }
    to.validate().context("the cluster's client settings")?;
    Ok(to)
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Runs the check; the report, whatever it says (the caller prints it and
/// decides the exit code). A [`Refused`] error means nothing was touched.
pub async fn run(t: Target, o: Options) -> Result<Report> {
    if let Some(why) = refusal(&t.manifest, &o) {
        return Err(Refused(why).into());
    }
    let token = crate::token_file::read(&t.admin_token_file)
        .context("cannot read the supervisor's admin token")?;
    let sup = Supervisor {
        base: t.supervisor.clone(),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()?,
        auth: format!("Bearer {}", token.to_hex()),
    };
    let status = sup.status().await?;
    if !ready(&status) {
        bail!("the cluster is not Ready (kvsup status): a chaos run starts from a healthy one");
    }
    let to = endpoints(&t.manifest, &t.state_dir)?;
    let seed = o.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let run_id = unix_ms();
    let history_file = o.history.clone().unwrap_or_else(|| {
        t.state_dir
            .join("chaos")
            .join(format!("history-{run_id}.jsonl"))
    });
    let work = Workload {
        key_prefix: format!("chaos/{run_id}/"),
        seed,
    };
    eprintln!(
        "kvsup chaos: {:?} of faults on {} (seed {seed}, keys {}k0..k{})",
        o.duration,
        t.manifest.metadata.name,
        work.key_prefix,
        clients::KEYS - 1
    );

    let clients = Clients::spawn_with(&to, &work);
    let (start, progress) = (clients.start, clients.progress.clone());
    let mut report = Report {
        seed,
        ..Report::default()
    };
    monkey(&sup, &o, seed, start, &progress, &mut report).await;
    let mut history = clients.finish().await;

    // The final reads come after everything else, from a Ready cluster.
    // After a problem it may never be: the history so far is still checked.
    let finals = if report.problems.is_empty() {
        wait_ready(&sup, RECOVERY).await?;
        let finals = clients::final_reads(&to, &work, RECOVERY, start, &mut history).await?;
        if let Err(e) = converged(&to, CONVERGE).await {
            report.problems.push(e);
        }
        Some(finals)
    } else {
        None
    };
    report.lost = finals.map_or_else(Vec::new, |f| clients::lost_writes(&history, &f));
    report.counts = Counts::of(&progress);
    report.elapsed = start.elapsed();
    save(&history_file, &history)?;
    report.history = Some(history_file);
    let checked = tokio::task::spawn_blocking(move || linearizability::check(&history))
        .await
        .context("the check panicked")?;
    report.operations = checked.operations;
    report.keys = checked.keys;
    report.violations = checked.violations;
    report.undecided = checked.undecided;
    Ok(report)
}

/// How long the replicas may take to hold the same contents once the
/// clients stop.
const CONVERGE: Duration = Duration::from_secs(30);

/// Waits until every node reports the same digest and commit index (once
/// writes stop, replicas converge; ones that do not have diverged, which
/// the history of one client's view may not show).
async fn converged(to: &Endpoints, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = Vec::new();
    loop {
        last.clear();
        for url in &to.urls {
            let one = to
                .builder(std::slice::from_ref(url))
                .request_timeout(Duration::from_secs(2))
                .max_retries(0)
                .build();
            let seen = match one {
                Ok(kv) => kv.status().await.ok(),
                Err(_) => None,
            };
            last.push(seen.map(|s| (s.as_json()["digest"].to_string(), s.commit_index())));
        }
        if last.iter().all(Option::is_some) && last.windows(2).all(|w| w[0] == w[1]) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let shown: Vec<String> = to
                .urls
                .iter()
                .zip(&last)
                .map(|(u, s)| match s {
                    Some((d, c)) => format!("{u}: digest {d} at commit {c:?}"),
                    None => format!("{u}: no status"),
                })
                .collect();
            return Err(format!(
                "the replicas did not converge within {within:?} of the last write: {}",
                shown.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_ready(sup: &Supervisor, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if sup.status().await.is_ok_and(|s| ready(&s)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the cluster was not Ready within {within:?} after the last fault");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn save(path: &Path, history: &[Operation]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    kvcheck::history::write(&mut out, history)
        .with_context(|| format!("writing {}", path.display()))
}

/// Injects faults until the run's time is up (at least one cycle of every
/// chosen fault), each followed by a wait for recovery; stops at the first
/// problem (more faults would only bury it).
async fn monkey(
    sup: &Supervisor,
    o: &Options,
    seed: u64,
    start: Instant,
    progress: &Progress,
    report: &mut Report,
) {
    let faults = cycle(o);
    let pauses = pauses_ms(o.duration, faults.len());
    let mut schedule = Schedule::new(faults, pauses, o.duration, seed);
    while let Some((wait, fault, at_primary)) = schedule.next(start.elapsed()) {
        // The pause is the fault rate, not a wait for anything.
        tokio::time::sleep(wait).await;
        let rng = schedule.rng();
        if let Err(e) = fault_round(sup, fault, at_primary, start, progress, rng, report).await {
            let what = report.faults.last().cloned().unwrap_or_default();
            report.problems.push(format!("{what}: {e:#}"));
            break;
        }
    }
}

async fn fault_round(
    sup: &Supervisor,
    fault: Fault,
    at_primary: bool,
    start: Instant,
    progress: &Progress,
    rng: &mut impl Rng,
    report: &mut Report,
) -> Result<()> {
    let status = sup.status().await?;
    let primary = status["primary"].as_str().map(str::to_string);
    let names: Vec<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    let Some(node) = faults::aim(&names, primary.as_deref(), at_primary, rng) else {
        bail!("no node to aim at (status: {status})")
    };
    let node = node.to_string();
    let was_primary = primary.as_deref() == Some(node.as_str());
    let role = if was_primary { "primary" } else { "secondary" };
    let what = format!("{:>6.1?} {fault:?} {node} ({role})", start.elapsed());
    eprintln!("kvsup chaos: {what}");
    report.faults.push(what);
    let restarts_before = restarts(&status, &node);
    match fault {
        Fault::Kill => sup.signal(&node, "KILL").await?,
        Fault::KillAlone => {
            let others: Vec<&String> = names.iter().filter(|n| **n != node).collect();
            for n in &others {
                sup.signal(n, "STOP").await?;
            }
            // The time the primary is alone is how much it may acknowledge.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..2_000))).await;
            let killed = sup.signal(&node, "KILL").await;
            // Woken whatever happened: a frozen cluster helps no one.
            for n in &others {
                sup.signal(n, "CONT").await?;
            }
            killed?;
        }
        Fault::Stop => {
            sup.signal(&node, "STOP").await?;
            // How long the node stays frozen is the fault itself.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..3_000))).await;
            sup.signal(&node, "CONT").await?;
        }
    }
    // Recovered: Ready, a killed node restarted, and writes and reads
    // called after this point answered.
    let began = Instant::now();
    progress.count_from(began.duration_since(start).as_nanos() as u64);
    let mut last = String::new();
    while began.elapsed() < RECOVERY {
        let s = sup.status().await.unwrap_or_default();
        let killed = matches!(fault, Fault::Kill | Fault::KillAlone);
        let restarted = !killed || restarts(&s, &node) > restarts_before;
        let (w, r) = progress.since_fault();
        let enough = clients::OPS_AFTER_EACH_FAULT;
        if ready(&s) && restarted && w >= enough && r >= enough {
            eprintln!("kvsup chaos:        recovered in {:.1?}", began.elapsed());
            return Ok(());
        }
        last = format!(
            "ready {}, restarted {restarted}, {w} writes, {r} reads",
            ready(&s)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no recovery within {RECOVERY:?} ({last})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "\
apiVersion: kvstore/v1
kind: Cluster
metadata: {name: demo}
spec:
  stateDir: .kvsup/demo
  nodes:
    - {name: n0, port: 8765}
    - {name: n1, port: 8766}
    - {name: n2, port: 8767}
";

    fn opts() -> Options {
        Options {
            duration: Duration::from_secs(120),
            kill: true,
            stop: true,
            partition: false,
            history: None,
            seed: Some(1),
        }
    }

    fn manifest(extra: &str) -> Manifest {
        Manifest::parse(&format!("{M}{extra}"), "m").expect("a valid manifest")
    }

    #[test]
    fn only_a_cluster_that_allows_chaos_is_a_target() {
        let why = refusal(&manifest(""), &opts()).expect("refused");
        assert!(why.contains("chaos: allowed"), "{why}");
        assert_eq!(refusal(&manifest("  chaos: allowed\n"), &opts()), None);
        let masterless = manifest("  chaos: allowed\n  mode: masterless\n");
        assert!(refusal(&masterless, &opts()).is_some_and(|w| w.contains("masterless")));
    }

    #[test]
    fn a_partition_or_no_fault_is_refused() {
        let m = manifest("  chaos: allowed\n");
        let partition = Options {
            partition: true,
            ..opts()
        };
        assert!(refusal(&m, &partition).is_some_and(|w| w.contains("--partition")));
        let none = Options {
            kill: false,
            stop: false,
            ..opts()
        };
        assert!(refusal(&m, &none).is_some_and(|w| w.contains("--kill")));
    }

    #[test]
    fn a_cycle_aims_each_chosen_fault_at_the_primary_and_a_secondary() {
        let mut c = cycle(&opts());
        c.sort_by_key(|(f, p)| (*f as u8, *p));
        assert_eq!(
            c,
            [
                (Fault::Kill, false),
                (Fault::Kill, true),
                (Fault::Stop, false),
                (Fault::Stop, true),
                (Fault::KillAlone, true)
            ]
        );
        let kill_only = Options {
            stop: false,
            ..opts()
        };
        assert!(cycle(&kill_only).iter().all(|(f, _)| *f == Fault::Kill));
        let stop_only = Options {
            kill: false,
            ..opts()
        };
        assert_eq!(cycle(&stop_only).len(), 2);
    }

    #[test]
    fn pauses_fit_the_run() {
        assert_eq!(pauses_ms(Duration::from_secs(3600), 4), 5_000..=10_000);
        assert_eq!(pauses_ms(Duration::from_secs(20), 4), 1_250..=2_500);
        assert_eq!(pauses_ms(Duration::from_secs(1), 4), 500..=1_000);
    }

    #[test]
    fn the_verdict_needs_nothing_lost_nothing_violated_every_fault_recovered() {
        let ok = Report::default();
        assert!(ok.passed());
        assert!(ok.render().contains("verdict: PASS"));
        for bad in [
            Report {
                lost: vec!["k1: Write(5) (final None)".into()],
                ..Report::default()
            },
            Report {
                violations: vec!["k2: a read of 9 ...".into()],
                ..Report::default()
            },
            Report {
                problems: vec!["Kill n0: no recovery".into()],
                ..Report::default()
            },
        ] {
            assert!(!bad.passed());
            assert!(bad.render().contains("verdict: FAIL"), "{}", bad.render());
        }
        // Undecided keys are reported but are no failure.
        let undecided = Report {
            undecided: vec!["k3".into()],
            ..Report::default()
        };
        assert!(undecided.passed());
        assert!(undecided.render().contains("undecided keys: 1 (k3)"));
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "m", "2d", "-1s", "0s", "1.5m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_long_witness_is_cut() {
        let r = Report {
            violations: vec![format!("k1: {}", "x".repeat(5_000))],
            ..Report::default()
        };
        let text = r.render();
        assert!(text.contains("linearizability violations: 1"));
        assert!(text.len() < 2_000, "{}", text.len());
    }
}
