//! Rolling changes: the nodes restarted one at a time onto new settings
//! (`spec.index`, `spec.kvdArgs`, the kvd binary), as `crate::plan` plans
//! them and `plan::next_step` orders them. The daemon keeps what each node
//! runs (its settings generation), so that a node restarted for any other
//! reason keeps its own settings until the change reaches it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Node, Sup};
use crate::election;
use crate::manifest::{Manifest, Mode};
use crate::plan::{self, BinaryId, ChangeKind, ChangeState, ChangeStatus, NodeSettings, RollStep};
use crate::process;

/// How often the rolling change polls while it waits.
const POLL: Duration = Duration::from_millis(20);

/// Bound on one status request of the rolling change.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of a node's log read for the event of a node that did not come back.
const LOG_TAIL_BYTES: u64 = 2048;

/// Lines of that tail the event quotes.
const LOG_TAIL_LINES: usize = 5;

/// A settings generation: a number and the settings it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Generation {
    pub number: u64,
    pub settings: NodeSettings,
}

/// What the nodes run and the last change (`kvsup status`'s `"change"`).
pub(super) struct Rollouts {
    inner: Mutex<Inner>,
    /// Held while an apply plans and starts its change, so that two
    /// applies never plan from the same state.
    pub(super) applying: tokio::sync::Mutex<()>,
    /// The checksums of the kvd binaries applies named.
    pub(super) binaries: BinaryIds,
}

/// What tells that a file is unchanged without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    mtime_ns: i128,
    dev: u64,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(FileStamp {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// [`binary_id`] of each path, kept while the file's size, modification
/// time and inode stay the same: hashing a debug build of kvd takes
/// seconds, which every apply would otherwise spend (on a blocking
/// thread, so that the health checks go on meanwhile).
#[derive(Default)]
pub(super) struct BinaryIds(Mutex<HashMap<std::path::PathBuf, (FileStamp, BinaryId)>>);

impl BinaryIds {
    pub(super) async fn id(&self, path: &Path) -> Result<BinaryId> {
        let stamp = FileStamp::of(path)?;
        if let Some((s, id)) = self.0.lock().get(path) {
            if *s == stamp {
                return Ok(id.clone());
            }
        }
        let owned = path.to_path_buf();
        let id = tokio::task::spawn_blocking(move || binary_id(&owned))
            .await
            .context("hashing the kvd binary")??;
        // Keyed by the stamp taken before reading: a file changed while
        // it was read has another stamp by the next apply, and is read again.
        self.0
            .lock()
            .insert(path.to_path_buf(), (stamp, id.clone()));
        Ok(id)
    }
}

struct Inner {
    /// What the manifest asks of every node now.
    target: Generation,
    /// What each node runs (as last started); a node missing here runs
    /// the target.
    runs: HashMap<String, Generation>,
    change: Option<ChangeStatus>,
}

impl Rollouts {
    /// Every node of `m` on generation 1: `m`'s settings with `kvd`.
    pub(super) fn new(m: &Manifest, kvd: BinaryId) -> Rollouts {
        let target = Generation {
            number: 1,
            settings: NodeSettings::of(m, &kvd),
        };
        Rollouts {
            inner: Mutex::new(Inner {
                runs: m
                    .spec
                    .nodes
                    .iter()
                    .map(|n| (n.name.clone(), target.clone()))
                    .collect(),
                target,
                change: None,
            }),
            applying: tokio::sync::Mutex::new(()),
            binaries: BinaryIds::default(),
        }
    }

    pub(super) fn target(&self) -> Generation {
        self.inner.lock().target.clone()
    }

    /// What node `name` runs.
    pub(super) fn runs(&self, name: &str) -> Generation {
        let i = self.inner.lock();
        i.runs.get(name).unwrap_or(&i.target).clone()
    }

    pub(super) fn change(&self) -> Option<ChangeStatus> {
        self.inner.lock().change.clone()
    }

    fn set_runs(&self, name: &str, g: Generation) {
        self.inner.lock().runs.insert(name.to_string(), g);
    }

    /// A node added: it runs the target.
    pub(super) fn add(&self, name: &str) {
        let mut i = self.inner.lock();
        let t = i.target.clone();
        i.runs.insert(name.to_string(), t);
    }

    /// A node removed: nothing is kept of it.
    pub(super) fn forget(&self, name: &str) {
        self.inner.lock().runs.remove(name);
    }

    /// Makes `change` the last change (it starts running).
    pub(super) fn begin(&self, change: ChangeStatus) {
        self.inner.lock().change = Some(change);
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut ChangeStatus)) {
        if let Some(c) = self.inner.lock().change.as_mut() {
            f(c);
        }
    }

    /// The nodes (of `names`) not on the target.
    fn left(&self, names: &[String]) -> Vec<String> {
        let i = self.inner.lock();
        names
            .iter()
            .filter(|n| i.runs.get(*n).is_some_and(|g| g.number != i.target.number))
            .cloned()
            .collect()
    }
}

/// `path` and the SHA-256 of its content, read in 64 KiB blocks.
pub(crate) fn binary_id(path: &Path) -> Result<BinaryId> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let sum = h.finalize();
    Ok(BinaryId {
        path: path.to_path_buf(),
        sha256: sum.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// [`binary_id`], or the path with an unknown checksum when it cannot be
/// read (a cluster of external nodes needs no kvd here).
pub(super) fn binary_id_or_unknown(path: &Path) -> BinaryId {
    binary_id(path).unwrap_or_else(|_| BinaryId {
        path: path.to_path_buf(),
        sha256: "unknown".into(),
    })
}

/// The last lines of `log`, for an event.
pub(super) fn log_tail(log: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(log)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        f.take(LOG_TAIL_BYTES).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = read().unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join(" | ")
}

impl Sup {
    /// Starts the rolling change to `target` (settings of manifest `new`
    /// and its binary); `what` is the plan's lines. The same settings as
    /// the target already (a stopped change applied again) resume it.
    pub(super) fn start_rolling(self: &Arc<Self>, target: NodeSettings, what: Vec<String>) {
        let names: Vec<String> = self.nodes().iter().map(|n| n.name.clone()).collect();
        let generation = {
            let mut i = self.rollouts.inner.lock();
            if i.target.settings != target {
                i.target = Generation {
                    number: i.target.number + 1,
                    settings: target,
                };
            }
            let t = i.target.clone();
            // A node that runs these settings already (a stopped change
            // undone) is on the target as it is.
            for g in i.runs.values_mut() {
                if g.settings == t.settings {
                    g.number = t.number;
                }
            }
            let number = t.number;
            let done: Vec<String> = names
                .iter()
                .filter(|n| i.runs.get(*n).is_none_or(|g| g.number == number))
                .cloned()
                .collect();
            let left: Vec<String> = names
                .iter()
                .filter(|n| !done.contains(n))
                .cloned()
                .collect();
            i.change = Some(ChangeStatus {
                kind: ChangeKind::Rolling,
                what: what.clone(),
                step: "starting".into(),
                nodes_done: done,
                nodes_left: left,
                state: ChangeState::Running,
                reason: None,
                generation: number,
            });
            number
        };
        self.event(
            "rolling",
            None,
            format!(
                "rolling change to generation {generation}, one node at a time: {}",
                what.join("; ")
            ),
        );
        self.spawn(self.clone().roll(generation));
    }

    /// Runs the rolling change to the end, and records how it ended.
    async fn roll(self: Arc<Self>, generation: u64) {
        let started = Instant::now();
        let result = tokio::select! {
            r = self.roll_nodes() => r,
            () = self.stopped() => Err("the supervisor stopped".to_string()),
        };
        let names: Vec<String> = self.nodes().iter().map(|n| n.name.clone()).collect();
        let left = self.rollouts.left(&names);
        let (state, label) = match &result {
            Ok(()) => (ChangeState::Done, "ok"),
            Err(_) => (ChangeState::Failed, "failed"),
        };
        self.rollouts.update(|c| {
            c.state = state;
            c.reason = result.as_ref().err().cloned();
            c.nodes_left = left.clone();
            if state == ChangeState::Done {
                c.step = "done".into();
            }
        });
        self.metrics
            .changes
            .with_label_values(&[ChangeKind::Rolling.as_str(), label])
            .inc();
        match result {
            Ok(()) => self.event(
                "rolling",
                None,
                format!(
                    "every node runs generation {generation} ({} ms)",
                    started.elapsed().as_millis()
                ),
            ),
            Err(why) => self.event(
                "error",
                None,
                format!(
                    "rolling change to generation {generation} stopped: {why}; {} not on it \
                     (apply the same manifest again to resume)",
                    if left.is_empty() {
                        "no node".to_string()
                    } else {
                        left.join(", ")
                    }
                ),
            ),
        }
    }

    /// The steps of `plan::next_step` until it says done, each bounded.
    async fn roll_nodes(self: &Arc<Self>) -> Result<(), String> {
        let timeout = self.ready_timeout();
        let mut waiting_since: Option<Instant> = None;
        loop {
            if self.shutting_down() {
                return Err("kvsup down is stopping the nodes".into());
            }
            let step = self.next_roll_step();
            if !matches!(step, RollStep::Wait(_)) {
                waiting_since = None;
            }
            match step {
                RollStep::Done => return Ok(()),
                RollStep::Wait(why) => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > timeout {
                        return Err(format!("waited {timeout:?}: {why}"));
                    }
                    self.rollouts.update(|c| c.step = format!("waiting: {why}"));
                    tokio::time::sleep(POLL).await;
                }
                RollStep::Switchover(to) => {
                    self.rollouts
                        .update(|c| c.step = format!("switchover to {to}"));
                    self.event(
                        "rolling",
                        Some(&to),
                        "planned switchover to this updated secondary, so that the old \
                         primary can be restarted",
                    );
                    self.promote(&to, timeout)
                        .await
                        .map_err(|e| format!("switchover to {to} failed: {e:#}"))?;
                }
                RollStep::Restart(name) => {
                    let node = self
                        .node(&name)
                        .ok_or_else(|| format!("no node named {name}"))?;
                    self.restart_onto_target(&node).await?;
                }
            }
        }
    }

    pub(super) fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.manifest.read().spec.rollout.ready_timeout_ms)
    }

    fn next_roll_step(&self) -> RollStep {
        let mode = self.manifest.read().spec.mode;
        let views = self.views();
        let primary = election::leader(&views).map(|v| v.name.clone());
        let target = self.rollouts.target().number;
        let nodes: Vec<plan::RollNode> = self
            .nodes()
            .iter()
            .map(|n| plan::RollNode {
                name: n.name.clone(),
                updated: self.rollouts.runs(&n.name).number == target,
                healthy: views.iter().any(|v| v.name == n.name && v.healthy()),
                external: n.external,
            })
            .collect();
        plan::next_step(mode, primary.as_deref(), &nodes)
    }

    /// Restarts `node` onto the target settings and waits until it is
    /// healthy and caught up. If it is not within the ready timeout, it is
    /// started again on the settings it ran before and the change stops.
    async fn restart_onto_target(self: &Arc<Self>, node: &Arc<Node>) -> Result<(), String> {
        let timeout = self.ready_timeout();
        let name = node.name.clone();
        // At most one node down: the others must be healthy first.
        self.rollouts
            .update(|c| c.step = format!("waiting for every node but {name} to be healthy"));
        self.until_others_healthy(&name, timeout).await?;
        let before = self.rollouts.runs(&name);
        let target = self.rollouts.target();
        self.rollouts
            .update(|c| c.step = format!("restarting {name}"));
        self.event(
            "rolling",
            Some(&name),
            format!(
                "restarting onto generation {} ({})",
                target.number,
                before.settings.changes_to(&target.settings).join("; ")
            ),
        );
        self.rollouts.set_runs(&name, target.clone());
        let started = Instant::now();
        self.stop_and_start(node).await?;
        match self.until_caught_up(node, started + timeout).await {
            Ok(pid) => {
                self.rollouts.update(|c| {
                    c.nodes_done.push(name.clone());
                    c.nodes_left.retain(|n| *n != name);
                });
                self.event(
                    "rolling",
                    Some(&name),
                    format!(
                        "runs generation {} (pid {pid}): healthy and caught up {} ms after \
                         its stop",
                        target.number,
                        started.elapsed().as_millis()
                    ),
                );
                Ok(())
            }
            Err(why) => {
                let tail = log_tail(&node.log);
                let reason = format!(
                    "{name} did not come back on generation {} within {timeout:?}: {why}{}",
                    target.number,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(" (its log ends: {tail})")
                    }
                );
                self.event("error", Some(&name), reason.clone());
                self.rollouts.update(|c| {
                    c.step = format!("starting {name} again on generation {}", before.number)
                });
                self.rollouts.set_runs(&name, before.clone());
                self.stop_and_start(node).await?;
                match self.until_caught_up(node, Instant::now() + timeout).await {
                    Ok(pid) => self.event(
                        "rolling",
                        Some(&name),
                        format!("back on generation {} (pid {pid}), healthy", before.number),
                    ),
                    Err(e) => self.event(
                        "error",
                        Some(&name),
                        format!("not healthy again on generation {}: {e}", before.number),
                    ),
                }
                Err(reason)
            }
        }
    }

    /// Waits until every node but `name` is healthy.
    pub(super) async fn until_others_healthy(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let until = Instant::now() + timeout;
        loop {
            let sick: Vec<String> = self
                .views()
                .into_iter()
                .filter(|v| v.name != name && !v.healthy())
                .map(|v| v.name)
                .collect();
            if sick.is_empty() {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "{} not healthy within {timeout:?}: a rolling change restarts a node only \
                     while the others are up",
                    sick.join(", ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops `node`'s process (see [`Sup::stop_process`]) and has the
    /// reconcile loop start it at once, on the settings [`Rollouts::runs`]
    /// gives it.
    async fn stop_and_start(&self, node: &Node) -> Result<(), String> {
        self.stop_process(node).await?;
        {
            // A planned stop: no backoff before the start.
            let mut r = node.run.lock();
            if !r.running {
                r.next_start = None;
                r.backoff_ms = 0;
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Stops `node`'s process: SIGTERM, SIGKILL after the rollout's stop
    /// grace; an error if it still runs after another grace.
    pub(super) async fn stop_process(&self, node: &Node) -> Result<(), String> {
        let grace = Duration::from_millis(self.manifest.read().spec.rollout.stop_grace_ms);
        let pid = node.run.lock().pid;
        if let Some(pid) = pid {
            let _ = process::signal(pid, Signal::SIGTERM);
            // A stopped process handles SIGTERM only once continued.
            let _ = process::signal(pid, Signal::SIGCONT);
            let until = Instant::now() + grace;
            while self.still_runs(node, pid) && Instant::now() < until {
                tokio::time::sleep(POLL).await;
            }
            if self.still_runs(node, pid) {
                self.event(
                    "kill",
                    Some(&node.name),
                    format!("pid {pid} still runs {grace:?} after SIGTERM: SIGKILL"),
                );
                let _ = process::signal(pid, Signal::SIGKILL);
                let until = Instant::now() + grace;
                while self.still_runs(node, pid) && Instant::now() < until {
                    tokio::time::sleep(POLL).await;
                }
                if self.still_runs(node, pid) {
                    return Err(format!("{} (pid {pid}) does not exit", node.name));
                }
            }
        }
        Ok(())
    }

    fn still_runs(&self, node: &Node, pid: u32) -> bool {
        let r = node.run.lock();
        r.running && r.pid == Some(pid)
    }

    /// Waits until `node` runs, is healthy, and holds what the cluster had
    /// committed when it first answered: primary/secondary, its applied
    /// index reaches the primary's commit index; masterless, every other
    /// node has had its entries up to then acknowledged by it. Its pid.
    pub(super) async fn until_caught_up(&self, node: &Node, until: Instant) -> Result<u32, String> {
        let mut goal: Option<Goal> = None;
        let mut last = String::from("not started yet");
        while Instant::now() < until {
            if self.shutting_down() {
                return Err("kvsup down is stopping the nodes".into());
            }
            let (running, pid) = {
                let r = node.run.lock();
                (r.running, r.pid)
            };
            let healthy = {
                let h = node.health.lock();
                h.ok && h.ready
            };
            if !running {
                last = node
                    .run
                    .lock()
                    .last_exit
                    .clone()
                    .map_or_else(|| "not running".into(), |e| format!("its process {e}"));
                goal = None;
            } else if !healthy {
                last = node
                    .health
                    .lock()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not answering yet".into());
            } else {
                match &goal {
                    None => match self.goal_for(node).await {
                        Ok(g) => goal = Some(g),
                        Err(e) => last = e,
                    },
                    Some(g) => match self.reached(node, g).await {
                        Ok(true) => return Ok(pid.unwrap_or(0)),
                        Ok(false) => last = format!("catching up ({})", g.describe()),
                        Err(e) => last = e,
                    },
                }
            }
            tokio::time::sleep(POLL).await;
        }
        Err(last)
    }

    pub(super) async fn status_of(&self, url: &str) -> Result<kvproto::status::Status, String> {
        self.get_json(url, "/v1/status", STATUS_TIMEOUT, "status")
            .await
    }

    /// `GET {url}{path}` within `timeout`, its JSON body; `what` names it
    /// in errors.
    pub(super) async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        path: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<T, String> {
        let resp = self
            .http
            .get(format!("{url}{path}"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("{what} of {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{what} of {url} answered {}", resp.status()));
        }
        resp.json()
            .await
            .map_err(|e| format!("{what} of {url}: bad body: {e}"))
    }

    /// What `node` must reach, taken now (after it answered).
    async fn goal_for(&self, node: &Node) -> Result<Goal, String> {
        let mode = self.manifest.read().spec.mode;
        if self.nodes.read().len() < 2 {
            return Ok(Goal::Alone);
        }
        if mode == Mode::PrimarySecondary {
            let views = self.views();
            let primary = election::leader(&views)
                .map(|v| v.url.clone())
                .ok_or("no primary to catch up with")?;
            let st = self.status_of(&primary).await?;
            return Ok(Goal::Applied(st.commit_index));
        }
        let mut marks = Vec::new();
        for other in self.nodes().iter().filter(|n| n.name != node.name) {
            let st = self.status_of(&other.url).await?;
            marks.push((other.url.clone(), st.last_index));
        }
        Ok(Goal::Acked(marks))
    }

    async fn reached(&self, node: &Node, goal: &Goal) -> Result<bool, String> {
        match goal {
            Goal::Alone => Ok(true),
            Goal::Applied(i) => Ok(self.status_of(&node.url).await?.applied_index >= *i),
            Goal::Acked(marks) => {
                for (url, mark) in marks {
                    let st = self.status_of(url).await?;
                    let acked = st
                        .masterless
                        .as_ref()
                        .and_then(|m| m.peers.iter().find(|p| p.url == node.url))
                        .and_then(|p| p.acked_index)
                        .unwrap_or(0);
                    if acked < *mark {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// `kvsup status`'s `"change"`.
    pub(super) fn change_json(&self) -> Value {
        self.rollouts.change().map_or(Value::Null, |c| {
            serde_json::to_value(c).unwrap_or(Value::Null)
        })
    }
}

/// What a restarted node must reach to count as caught up.
enum Goal {
    /// The only node.
    Alone,
    /// Its applied index at least this (the primary's commit index).
    Applied(u64),
    /// Each other node (URL) has had its log up to this index acknowledged
    /// by it.
    Acked(Vec<(String, u64)>),
}

impl Goal {
    fn describe(&self) -> String {
        match self {
            Goal::Alone => "alone".into(),
            Goal::Applied(i) => format!("to the primary's commit index {i}"),
            Goal::Acked(m) => format!("to the peers' indexes {m:?}"),
        }
    }
}
