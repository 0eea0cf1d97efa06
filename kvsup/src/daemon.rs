//! The supervisor daemon: holds the desired state (the applied manifest) and
//! makes the cluster match it, over and over.
//!
//! Tasks:
//! - one health checker per node (`/v1/status` at the manifest's interval);
//! - one watcher per running process (its exit is seen at once);
//! - the reconcile loop: start missing nodes, restart dead ones with capped
//!   backoff, and fail over when the primary has failed;
//! - the file watcher (re-applies the manifest when it is edited);
//! - the HTTP API the `kvsup` commands talk to.
//!
//! kvsup decides *when* to elect and *whom* to ask; safety is kvd's: a
//! promotion only succeeds with a majority of votes (DESIGN §4), so a wrong
//! guess here (a primary that was only slow) costs a needless election,
//! never a lost write.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::{json, Value};

use crate::election::{self, Decision, NodeView};
use crate::manifest::{Manifest, ManifestError, Mode, RestartPolicy};
use crate::metrics::Metrics;
use crate::process::{self, Handle, Launch};

/// Events kept for `kvsup events`.
const MAX_EVENTS: usize = 1000;

/// A node runs this long before an exit resets its restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Extra wait before electing when no primary is known and some node does
/// not answer yet (it may come back as the primary).
const NO_PRIMARY_GRACE: Duration = Duration::from_secs(2);

/// How often a node that has not answered since it was started is probed,
/// so that a starting cluster is seen (and elects) without waiting for a
/// health interval.
const STARTUP_PROBE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: u64,
    pub time_ms: u64,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

#[derive(Default)]
struct RunState {
    pid: Option<u32>,
    running: bool,
    /// A status check has answered since the process was started.
    answered: bool,
    started_at: Option<Instant>,
    exited_at: Option<Instant>,
    last_exit: Option<String>,
    spawned_once: bool,
    next_start: Option<Instant>,
    backoff_ms: u64,
}

#[derive(Default)]
struct Health {
    /// The last check answered.
    ok: bool,
    /// ...and the node's storage takes writes.
    ready: bool,
    failures: u32,
    status: Option<Value>,
    last_error: Option<String>,
}

pub struct Node {
    pub name: String,
    pub port: u16,
    pub url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    run: Mutex<RunState>,
    health: Mutex<Health>,
    restarts: AtomicU64,
    /// Wakes the node's health checker when its process is started.
    started: tokio::sync::Notify,
}

impl Node {
    /// Running, and no check has answered since it was started.
    fn awaiting_first_answer(&self) -> bool {
        let r = self.run.lock();
        r.running && !r.answered
    }
}

/// What one check saw of a node that answered.
struct Seen {
    status: Value,
    /// Why its storage refuses writes, if it does.
    not_ready: Option<String>,
}

pub struct Sup {
    manifest: RwLock<Manifest>,
    manifest_path: Mutex<PathBuf>,
    base_dir: PathBuf,
    pub state_dir: PathBuf,
    kvd: PathBuf,
    pub nodes: Vec<Arc<Node>>,
    http: reqwest::Client,
    events: Mutex<VecDeque<Event>>,
    next_event: AtomicU64,
    pub metrics: Metrics,
    wake: tokio::sync::Notify,
    failover_in_progress: AtomicBool,
    switching: AtomicBool,
    /// Held by anything that moves the primary: failover, switchover, mode switch.
    moving: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    election: Mutex<ElectionState>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

#[derive(Default)]
struct ElectionState {
    known_primary: Option<String>,
    primary_down_since: Option<Instant>,
    /// Since when no healthy primary has been seen.
    no_primary_since: Option<Instant>,
    last_refusal: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Sup {
    pub fn new(manifest: Manifest, path: PathBuf, base_dir: PathBuf, kvd: PathBuf) -> Result<Sup> {
        let state_dir = manifest.state_dir(&base_dir);
        let nodes = manifest
            .spec
            .nodes
            .iter()
            .map(|n| {
                let dir = state_dir.join(&n.name);
                Arc::new(Node {
                    name: n.name.clone(),
                    port: n.port,
                    url: format!("http://127.0.0.1:{}", n.port),
                    data_dir: dir.join("data"),
                    log: state_dir.join(format!("{}.log", n.name)),
                    pid_file: state_dir.join(format!("{}.pid", n.name)),
                    run: Mutex::new(RunState::default()),
                    health: Mutex::new(Health::default()),
                    restarts: AtomicU64::new(0),
                    started: tokio::sync::Notify::new(),
                })
            })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_max_idle_per_host(4)
            .build()
            .context("building the HTTP client")?;
        Ok(Sup {
            manifest: RwLock::new(manifest),
            manifest_path: Mutex::new(path),
            base_dir,
            state_dir,
            kvd,
            nodes,
            http,
            events: Mutex::new(VecDeque::new()),
            next_event: AtomicU64::new(1),
            metrics: Metrics::new().context("registering metrics")?,
            wake: tokio::sync::Notify::new(),
            failover_in_progress: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            moving: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            election: Mutex::new(ElectionState::default()),
            watcher: Mutex::new(None),
        })
    }

    /// Holds the manifest file watcher (dropping the previous one).
    pub fn keep_watcher(&self, w: notify::RecommendedWatcher) {
        *self.watcher.lock() = Some(w);
    }

    pub fn manifest(&self) -> Manifest {
        self.manifest.read().clone()
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.manifest_path.lock().clone()
    }

    pub fn event(&self, kind: &str, node: Option<&str>, message: impl Into<String>) {
        let e = Event {
            id: self.next_event.fetch_add(1, Ordering::Relaxed),
            time_ms: now_ms(),
            kind: kind.to_string(),
            node: node.map(str::to_string),
            message: message.into(),
        };
        eprintln!(
            "kvsup: [{}] {}{}",
            e.kind,
            e.node
                .as_deref()
                .map(|n| format!("{n}: "))
                .unwrap_or_default(),
            e.message
        );
        let mut q = self.events.lock();
        if q.len() == MAX_EVENTS {
            q.pop_front();
        }
        q.push_back(e);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().iter().cloned().collect()
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name).cloned()
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.manifest.read().spec.health_check.interval_ms)
    }

    // ---------------------------------------------------------------- spawn

    /// Whether `node` starts as the primary that bootstraps a brand-new
    /// cluster: the first node, while no node has a `meta` file yet. Any
    /// node with history comes back as a secondary, and the reconcile loop
    /// elects a primary if none is left.
    fn bootstraps(&self, node: &Node) -> bool {
        let ps = self.manifest.read().spec.mode == Mode::PrimarySecondary;
        let fresh = self.nodes.iter().all(|n| !n.data_dir.join("meta").exists());
        let first = self.nodes.first().is_some_and(|n| n.name == node.name);
        ps && self.nodes.len() > 1 && fresh && first
    }

    fn launch_for(&self, node: &Node, bootstraps: bool) -> Launch {
        let m = self.manifest.read();
        let mut args = vec![
            "--port".to_string(),
            node.port.to_string(),
            "--data-dir".to_string(),
            node.data_dir.display().to_string(),
            "--node-id".to_string(),
            node.name.clone(),
            "--advertise-url".to_string(),
            node.url.clone(),
        ];
        if self.nodes.len() > 1 {
            let peers: Vec<&str> = self
                .nodes
                .iter()
                .filter(|n| n.name != node.name)
                .map(|n| n.url.as_str())
                .collect();
            args.push("--peers".into());
            args.push(peers.join(","));
            match m.spec.mode {
                Mode::PrimarySecondary => {
                    args.push("--mode".into());
                    args.push("primary-secondary".into());
                    args.push("--role".into());
                    args.push(if bootstraps { "primary" } else { "secondary" }.into());
                }
                Mode::Masterless => {
                    args.push("--mode".into());
                    args.push("masterless".into());
                }
            }
        }
        if m.spec.index {
            args.push("--index".into());
        }
        args.extend(m.spec.kvd_args.iter().cloned());
        Launch {
            kvd: self.kvd.clone(),
            args,
            log: node.log.clone(),
            pid_file: node.pid_file.clone(),
        }
    }

    /// Starts (or adopts) `node` and a task that watches for its exit.
    fn start_node(self: &Arc<Self>, node: &Arc<Node>) -> Result<()> {
        // The data dir is kvd's (it creates it); kvsup never writes there.
        let handle = match process::adoptable(&node.pid_file, &node.data_dir) {
            Some(pid) => {
                self.event(
                    "adopt",
                    Some(&node.name),
                    format!("found kvd pid {pid} already running; supervising it"),
                );
                Handle::Adopted(pid)
            }
            None => {
                let bootstraps = self.bootstraps(node);
                let child = process::spawn(&self.launch_for(node, bootstraps))?;
                if bootstraps {
                    // kvsup knows who leads a fresh cluster before it
                    // answers: its exit is then a failover like any other,
                    // not a wait for a primary that may still appear.
                    let mut el = self.election.lock();
                    el.known_primary = Some(node.name.clone());
                    el.no_primary_since = None;
                }
                Handle::Child(child)
            }
        };
        let pid = handle.pid();
        let restart = {
            let mut r = node.run.lock();
            let restart = r.spawned_once;
            r.pid = pid;
            r.running = true;
            r.answered = false;
            r.started_at = Some(Instant::now());
            r.spawned_once = true;
            r.next_start = None;
            restart
        };
        node.started.notify_one();
        if restart {
            node.restarts.fetch_add(1, Ordering::Relaxed);
            self.metrics.restarts.with_label_values(&[&node.name]).inc();
        }
        if matches!(handle, Handle::Child(_)) {
            self.event(
                if restart { "restart" } else { "spawn" },
                Some(&node.name),
                format!("started kvd pid {} on {}", pid.unwrap_or(0), node.url),
            );
        }
        let sup = self.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let mut handle = handle;
            let how = handle.wait(Duration::from_millis(50)).await;
            sup.on_exit(&node, how);
        });
        Ok(())
    }

    fn on_exit(&self, node: &Node, how: String) {
        let policy = self.manifest.read().spec.restart;
        {
            let mut r = node.run.lock();
            let now = Instant::now();
            let stable = r.started_at.is_some_and(|t| now - t >= STABLE_AFTER);
            r.backoff_ms = next_backoff_ms(r.backoff_ms, stable, policy);
            r.running = false;
            r.pid = None;
            r.exited_at = Some(now);
            r.next_start = Some(after_ms(now, r.backoff_ms));
            r.last_exit = Some(how.clone());
        }
        {
            let mut h = node.health.lock();
            h.ok = false;
            h.ready = false;
            h.last_error = Some(format!("process {how}"));
        }
        self.metrics.node_up.with_label_values(&[&node.name]).set(0);
        if !self.shutting_down.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&node.pid_file);
            self.event("exit", Some(&node.name), how);
        }
        self.wake.notify_one();
    }

    // --------------------------------------------------------------- health

    /// One health check of `node`; a failure counts towards
    /// `failureThreshold`.
    async fn check(&self, node: &Node) {
        let result = self.look(node).await;
        self.record(node, result);
    }

    /// What `node` answers now: its status, and whether its storage takes
    /// writes (`/ready`, and the status's `storage_poisoned`: a node whose
    /// WAL failed still answers `/health` and `/v1/status` with 200).
    async fn look(&self, node: &Node) -> Result<Seen, String> {
        if !node.run.lock().running {
            return Err("not running".to_string());
        }
        let timeout = Duration::from_millis(self.manifest.read().spec.health_check.timeout_ms());
        // Both at once: a check costs one round trip.
        let (status, ready) = tokio::join!(
            self.fetch_status(&node.url, timeout),
            self.fetch_ready(&node.url, timeout)
        );
        let status = status?;
        let poisoned = status.get("storage_poisoned").and_then(Value::as_bool) == Some(true);
        let not_ready = match ready? {
            Some(why) => Some(why),
            None => poisoned.then(|| "its status says storage_poisoned".to_string()),
        };
        Ok(Seen { status, not_ready })
    }

    fn record(&self, node: &Node, result: Result<Seen, String>) {
        let running = {
            let mut r = node.run.lock();
            r.answered |= result.is_ok();
            r.running
        };
        let mut h = node.health.lock();
        let before = (h.ok, h.ready);
        let failed = match result {
            Ok(seen) => {
                h.ok = true;
                h.ready = seen.not_ready.is_none();
                h.status = Some(seen.status);
                h.last_error = seen
                    .not_ready
                    .map(|why| format!("storage refuses writes: {why}"));
                !h.ready
            }
            Err(e) => {
                h.ok = false;
                h.ready = false;
                h.last_error = Some(e);
                running
            }
        };
        if failed {
            h.failures = h.failures.saturating_add(1);
            self.metrics
                .health_check_failures
                .with_label_values(&[&node.name])
                .inc();
        } else if h.ok {
            h.failures = 0;
        }
        self.metrics
            .node_up
            .with_label_values(&[&node.name])
            .set(i64::from(h.ok && h.ready));
        if before != (h.ok, h.ready) {
            drop(h);
            self.wake.notify_one();
        }
    }

    async fn fetch_status(&self, url: &str, timeout: Duration) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("{url}/v1/status"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("status check failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status check answered {}", resp.status()));
        }
        resp.json::<Value>()
            .await
            .map_err(|e| format!("status check: bad body: {e}"))
    }

    /// `Ok(None)` when `/ready` answers 200, `Ok(Some(why))` when it answers
    /// anything else; `Err` when it does not answer.
    async fn fetch_ready(&self, url: &str, timeout: Duration) -> Result<Option<String>, String> {
        let resp = self
            .http
            .get(format!("{url}/ready"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("readiness check failed: {e}"))?;
        let code = resp.status();
        if code.is_success() {
            return Ok(None);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        Ok(Some(format!("/ready answered {code}: {message}")))
    }

    fn health_loop(self: &Arc<Self>, node: Arc<Node>) {
        let sup = self.clone();
        tokio::spawn(async move {
            while !sup.shutting_down.load(Ordering::Acquire) {
                let next = tokio::time::Instant::now() + sup.interval();
                if node.awaiting_first_answer() {
                    sup.probe_until_answer(&node, next).await;
                } else {
                    sup.check(&node).await;
                }
                // A start ends the wait: the new process is probed at once.
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = node.started.notified() => {}
                }
            }
        });
    }

    /// Probes a node that has not answered since it was started, every
    /// [`STARTUP_PROBE`] until it answers or `until` (the end of this
    /// interval). Only the last probe is recorded, so a starting node
    /// fails at most one check per interval, like any other.
    async fn probe_until_answer(&self, node: &Node, until: tokio::time::Instant) {
        loop {
            let result = self.look(node).await;
            if result.is_ok() || tokio::time::Instant::now() + STARTUP_PROBE >= until {
                self.record(node, result);
                return;
            }
            tokio::time::sleep(STARTUP_PROBE).await;
        }
    }

    // ------------------------------------------------------------ reconcile

    fn views(&self) -> Vec<NodeView> {
        let threshold = self.manifest.read().spec.health_check.failure_threshold;
        self.nodes
            .iter()
            .map(|n| {
                let running = n.run.lock().running;
                let h = n.health.lock();
                let st = h.status.as_ref();
                let num = |k: &str| {
                    st.and_then(|s| s.get(k))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                NodeView {
                    name: n.name.clone(),
                    url: n.url.clone(),
                    running,
                    answering: running && h.ok,
                    ready: h.ready,
                    failed: !running || h.failures >= threshold,
                    claims_primary: h.ok
                        && st.and_then(|s| s.get("role")).and_then(Value::as_str)
                            == Some("primary"),
                    epoch: num("epoch"),
                    last: (num("last_log_epoch"), num("last_index")),
                }
            })
            .collect()
    }

    async fn reconcile(self: &Arc<Self>) {
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        for node in &self.nodes {
            let due = {
                let r = node.run.lock();
                !r.running && r.next_start.is_none_or(|t| now >= t)
            };
            if due {
                if let Err(e) = self.start_node(node) {
                    self.metrics.reconcile_errors.inc();
                    self.event("error", Some(&node.name), format!("cannot start: {e:#}"));
                    let policy = self.manifest.read().spec.restart;
                    let mut r = node.run.lock();
                    r.backoff_ms = next_backoff_ms(r.backoff_ms, false, policy);
                    r.next_start = Some(after_ms(now, r.backoff_ms));
                }
            }
        }
        let mode = self.manifest.read().spec.mode;
        if mode == Mode::PrimarySecondary && self.nodes.len() > 1 {
            // Failover waits while a switchover or mode switch holds the lock.
            if let Ok(_guard) = self.moving.try_lock() {
                self.failover_step().await;
            }
        }
        self.publish_conditions();
    }

    async fn failover_step(self: &Arc<Self>) {
        let views = self.views();
        let hc = self.manifest.read().spec.health_check;
        let decision = {
            let mut el = self.election.lock();
            let timing = election::Timing {
                without_leader: el.no_primary_since.map_or(Duration::ZERO, |t| t.elapsed()),
                patience: self.interval().saturating_mul(hc.failure_threshold),
                grace: NO_PRIMARY_GRACE,
            };
            let d = election::decide(&views, el.known_primary.as_deref(), timing);
            if let Decision::Led(p) = &d {
                el.known_primary = Some(p.name.clone());
                el.primary_down_since = None;
                el.no_primary_since = None;
                el.last_refusal = None;
                self.failover_in_progress.store(false, Ordering::Release);
                return;
            }
            let now = Instant::now();
            el.no_primary_since.get_or_insert(now);
            el.primary_down_since.get_or_insert(now);
            d
        };
        match decision {
            Decision::Led(_) | Decision::Wait => {}
            Decision::Stuck {
                cause,
                healthy,
                needed,
            } => self.report_once(format!(
                "cannot elect a primary ({cause}): {healthy} of {} nodes are healthy, \
                 {needed} needed to win a vote",
                views.len()
            )),
            Decision::Elect { cause, candidates } => self.elect(&cause, &candidates).await,
        }
    }

    /// Asks each candidate in turn to run for primary until one wins.
    async fn elect(self: &Arc<Self>, cause: &election::Cause, candidates: &[&NodeView]) {
        self.failover_in_progress.store(true, Ordering::Release);
        let mut refusals = Vec::new();
        for c in candidates {
            match self.promote_once(&c.url).await {
                Ok(epoch) => {
                    let took = {
                        let mut el = self.election.lock();
                        let since = el.primary_down_since.take();
                        el.known_primary = Some(c.name.clone());
                        el.no_primary_since = None;
                        el.last_refusal = None;
                        since.map(|t| t.elapsed())
                    };
                    self.metrics.failovers.inc();
                    if let Some(t) = took {
                        self.metrics.failover_duration.observe(t.as_secs_f64());
                    }
                    self.event(
                        "failover",
                        Some(&c.name),
                        format!(
                            "promoted to primary of epoch {epoch} ({cause}{})",
                            took.map(|t| format!("; {} ms without a primary", t.as_millis()))
                                .unwrap_or_default()
                        ),
                    );
                    // Take the new role into account at once, not a check later.
                    if let Some(n) = self.node(&c.name) {
                        self.check(&n).await;
                    }
                    self.failover_in_progress.store(false, Ordering::Release);
                    return;
                }
                Err(e) => refusals.push(format!("{}: {e}", c.name)),
            }
        }
        self.report_once(format!(
            "no node could be promoted ({cause}): {}",
            refusals.join("; ")
        ));
    }

    /// Counts a failed election step and says why, once per distinct reason
    /// (the loop retries every interval).
    fn report_once(&self, why: String) {
        self.metrics.reconcile_errors.inc();
        let mut el = self.election.lock();
        if el.last_refusal.as_deref() != Some(&why) {
            el.last_refusal = Some(why.clone());
            drop(el);
            self.event("error", None, why);
        }
    }

    /// Asks the primary at `primary` to hand over to `to`; the new epoch.
    async fn transfer(&self, primary: &str, to: &str, timeout: Duration) -> Result<u64, String> {
        let req = self
            .http
            .post(format!("{primary}/v1/admin/transfer"))
            .json(&json!({"to": to, "timeout_ms": timeout.as_millis() as u64}))
            .timeout(timeout + Duration::from_secs(5));
        Self::epoch_from(req, "transfer").await
    }

    /// Asks the node at `url` to run for primary; its new epoch on success.
    async fn promote_once(&self, url: &str) -> Result<u64, String> {
        let req = self
            .http
            .post(format!("{url}/promote_to_primary"))
            .timeout(Duration::from_secs(5));
        Self::epoch_from(req, "promotion").await
    }

    /// Sends a request answered by `{"epoch": N}`, or by an error body
    /// whose message is returned.
    async fn epoch_from(req: reqwest::RequestBuilder, what: &str) -> Result<u64, String> {
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{what} request failed: {e}"))?;
        let code = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if code.is_success() {
            Ok(body.get("epoch").and_then(Value::as_u64).unwrap_or(0))
        } else {
            Err(body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map_or_else(|| format!("{what} answered {code}"), str::to_string))
        }
    }

    fn publish_conditions(&self) {
        let st = self.status();
        let ready = st["conditions"]["Ready"].as_bool().unwrap_or(false);
        self.metrics.ready.set(i64::from(ready));
        self.metrics
            .primary_epoch
            .set(st["epoch"].as_u64().unwrap_or(0) as i64);
    }

    fn reconcile_loop(self: &Arc<Self>) {
        let sup = self.clone();
        tokio::spawn(async move {
            loop {
                sup.reconcile().await;
                if sup.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                // Wake on a node's exit or a health change, or at the interval.
                let interval = sup.interval();
                tokio::select! {
                    _ = sup.wake.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    // --------------------------------------------------------------- status

    /// The `kvsup status --json` document.
    pub fn status(&self) -> Value {
        let m = self.manifest.read().clone();
        let views = self.views();
        let primary = if m.spec.mode == Mode::PrimarySecondary {
            election::leader(&views).map(|v| v.name.clone())
        } else {
            None
        };
        let primary_status = primary
            .as_deref()
            .and_then(|p| self.node(p))
            .and_then(|n| n.health.lock().status.clone());
        let lag_of = |url: &str| -> Option<u64> {
            let peers = primary_status.as_ref()?.get("peers")?.as_array()?;
            peers
                .iter()
                .find(|p| p.get("url").and_then(Value::as_str) == Some(url))?
                .get("lag_entries")?
                .as_u64()
        };
        // Masterless: how far the node at `url` is behind the most any
        // other node has to send it (each node reports its peers' lag).
        let statuses: Vec<Value> = self
            .nodes
            .iter()
            .filter_map(|n| n.health.lock().status.clone())
            .collect();
        let masterless_lag = |url: &str| -> Option<u64> {
            statuses
                .iter()
                .filter_map(|s| s.pointer("/masterless/peers")?.as_array())
                .flatten()
                .filter(|p| p.get("url").and_then(Value::as_str) == Some(url))
                .filter_map(|p| p.get("lag_entries").and_then(Value::as_u64))
                .max()
        };
        let all_healthy = views.iter().all(NodeView::healthy);
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                let r = n.run.lock();
                let h = n.health.lock();
                let st = h.status.clone().unwrap_or(Value::Null);
                let is_primary = primary.as_deref() == Some(&n.name);
                json!({
                    "name": n.name,
                    "url": n.url,
                    "pid": r.pid,
                    "running": r.running,
                    "role": if h.ok { st.get("role").cloned().unwrap_or(Value::Null) } else { json!("down") },
                    "mode": st.get("mode"),
                    "epoch": st.get("epoch"),
                    "last_index": st.get("last_index"),
                    "commit_index": st.get("commit_index"),
                    "keys": st.get("keys"),
                    "digest": st.get("digest"),
                    "lag": if m.spec.mode == Mode::Masterless {
                        masterless_lag(&n.url)
                    } else if is_primary {
                        Some(0)
                    } else {
                        lag_of(&n.url)
                    },
                    "healthy": r.running && h.ok && h.ready,
                    "ready": h.ready,
                    "failures": h.failures,
                    "restarts": n.restarts.load(Ordering::Relaxed),
                    "last_exit": r.last_exit,
                    "last_error": h.last_error,
                    "log": n.log,
                })
            })
            .collect();
        let failover = self.failover_in_progress.load(Ordering::Acquire);
        let switching = self.switching.load(Ordering::Acquire);
        let has_leader = match m.spec.mode {
            Mode::PrimarySecondary if self.nodes.len() > 1 => primary.is_some(),
            _ => true,
        };
        let epoch = primary
            .as_deref()
            .and_then(|p| views.iter().find(|v| v.name == p))
            .map_or(0, |v| v.epoch);
        json!({
            "cluster": m.metadata.name,
            "mode": m.spec.mode.as_str(),
            "manifest": self.manifest_path(),
            "state_dir": self.state_dir,
            "supervisor_pid": std::process::id(),
            "health_check": m.spec.health_check,
            "conditions": {
                "Ready": all_healthy && has_leader && !failover && !switching,
                "Degraded": !all_healthy || !has_leader,
                "FailoverInProgress": failover,
                "ModeSwitchInProgress": switching,
            },
            "primary": primary,
            "epoch": epoch,
            "nodes": nodes,
        })
    }

    // ------------------------------------------------------------- commands

    /// Applies a manifest read from `path` (by `kvsup apply` or the file
    /// watcher). Returns the list of changes; with `dry_run`, changes nothing.
    pub async fn apply(
        self: &Arc<Self>,
        path: &Path,
        base_dir: &Path,
        dry_run: bool,
    ) -> Result<Vec<String>, ApplyError> {
        // The requester may not be allowed to read `path` (the daemon may
        // run as another user): its content is never repeated back.
        let new = load_manifest(path)
            .await
            .map_err(|e| ApplyError::Invalid(e.redacted()))?;
        if new.state_dir(base_dir) != self.state_dir {
            return Err(ApplyError::Refused(format!(
                "spec.stateDir resolves to {}, but this supervisor runs in {}",
                new.state_dir(base_dir).display(),
                self.state_dir.display()
            )));
        }
        let old = self.manifest();
        let changes = old.diff(&new).map_err(ApplyError::Refused)?;
        if dry_run {
            return Ok(changes);
        }
        if new.spec.mode != old.spec.mode {
            self.switch_mode(new.spec.mode)
                .await
                .map_err(|e| ApplyError::Failed(format!("mode switch failed: {e:#}")))?;
        }
        *self.manifest.write() = new;
        let moved = {
            let mut p = self.manifest_path.lock();
            let moved = *p != path;
            *p = path.to_path_buf();
            moved
        };
        if moved {
            crate::watch::spawn(self.clone());
        }
        self.metrics.applies.inc();
        self.event(
            "apply",
            None,
            if changes.is_empty() {
                format!("{} applied; no changes", path.display())
            } else {
                format!("{} applied: {}", path.display(), changes.join("; "))
            },
        );
        self.wake.notify_one();
        Ok(changes)
    }

    /// Live mode switch (DESIGN §6) through [`kvclient::admin::switch_mode`]:
    /// writes pause on every node until all hold identical contents, every
    /// node changes mode, writes resume. No failover or switchover runs
    /// meanwhile (they take the same lock).
    async fn switch_mode(self: &Arc<Self>, to: Mode) -> Result<()> {
        use kvclient::admin;
        if self.nodes.len() < 2 {
            bail!("a single node has no replication mode to switch");
        }
        let _moving = self.moving.lock().await;
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url.clone()).collect();
        // Back to primary/secondary: the first healthy node leads.
        let primary = (to == Mode::PrimarySecondary)
            .then(|| {
                self.views()
                    .into_iter()
                    .find(NodeView::healthy)
                    .map(|v| v.name)
            })
            .flatten();
        let opts = admin::SwitchOptions {
            primary,
            ..admin::SwitchOptions::default()
        };
        self.switching.store(true, Ordering::Release);
        self.event(
            "mode",
            None,
            format!("switching to {}: pausing writes on every node", to.as_str()),
        );
        let result = admin::switch_mode(&urls, to, &opts).await;
        self.switching.store(false, Ordering::Release);
        let report = result.map_err(|e| {
            self.metrics.reconcile_errors.inc();
            self.event("error", None, e.to_string());
            anyhow::anyhow!(e)
        })?;
        self.metrics.mode_switches.inc();
        self.metrics
            .mode_switch_pause
            .observe(report.pause.as_secs_f64());
        {
            let mut el = self.election.lock();
            el.known_primary = report.primary.clone();
            el.primary_down_since = None;
            el.no_primary_since = None;
        }
        let digest = report
            .digests_after
            .first()
            .map_or_else(String::new, |d| d.digest.clone());
        self.event(
            "mode",
            None,
            if report.already {
                format!("every node was already {}", to.as_str())
            } else {
                format!(
                    "now {}: writes paused {} ms (identical after {} ms), digest {digest} on every node{}",
                    to.as_str(),
                    report.pause.as_millis(),
                    report.converge.as_millis(),
                    report
                        .primary
                        .as_deref()
                        .map(|p| format!(", primary {p} of epoch {}", report.epoch))
                        .unwrap_or_default()
                )
            },
        );
        for n in &self.nodes {
            self.check(n).await;
        }
        Ok(())
    }

    pub fn kill(&self, name: &str, sig: Signal) -> Result<u32> {
        let node = self
            .node(name)
            .with_context(|| format!("no node named {name:?}"))?;
        let pid = node
            .run
            .lock()
            .pid
            .with_context(|| format!("{name} is not running"))?;
        process::signal(pid, sig)?;
        self.event(
            "kill",
            Some(name),
            format!("sent {sig} to pid {pid} (kvsup kill)"),
        );
        Ok(pid)
    }

    /// Planned switchover: the primary stops taking writes, waits until
    /// `name` holds everything it has, then has it run for primary (kvd's
    /// `/v1/admin/transfer`). The old primary steps down when it sees the
    /// new epoch; writes it had not committed are answered with an error
    /// (never acknowledged), so no acknowledged write is lost.
    pub async fn promote(self: &Arc<Self>, name: &str, deadline: Duration) -> Result<u64> {
        let target = self
            .node(name)
            .with_context(|| format!("no node named {name:?}"))?;
        if self.manifest.read().spec.mode != Mode::PrimarySecondary || self.nodes.len() < 2 {
            bail!("promote needs a primary/secondary cluster of 2 or more nodes");
        }
        let _guard = self.moving.lock().await;
        let until = Instant::now() + deadline;
        let mut last_err = String::from("no attempt made");
        while Instant::now() < until {
            let views = self.views();
            let primary = election::leader(&views).map(|v| (v.name.clone(), v.url.clone()));
            if primary.as_ref().is_some_and(|(p, _)| p == name) {
                return Ok(views.iter().find(|v| v.name == name).map_or(0, |v| v.epoch));
            }
            let remaining = until.saturating_duration_since(Instant::now());
            let attempt = match &primary {
                // The primary pauses writes, waits for the target to hold
                // its whole log, then has it run (kvd's leadership transfer).
                Some((_, purl)) => self.transfer(purl, &target.url, remaining).await,
                // No primary: the vote itself checks who is most up to date.
                None => self.promote_once(&target.url).await,
            };
            match attempt {
                Ok(epoch) => {
                    self.metrics.switchovers.inc();
                    self.election.lock().known_primary = Some(name.to_string());
                    self.event(
                        "promote",
                        Some(name),
                        format!("planned switchover: primary of epoch {epoch}"),
                    );
                    for n in &self.nodes {
                        self.check(n).await;
                    }
                    return Ok(epoch);
                }
                Err(e) => last_err = e,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("could not promote {name} within {deadline:?}: {last_err}")
    }

    /// Stops every node gracefully (SIGTERM; SIGKILL after `grace`).
    pub async fn down(self: &Arc<Self>, grace: Duration) -> Vec<String> {
        self.shutting_down.store(true, Ordering::Release);
        self.event("down", None, "stopping all nodes");
        for n in &self.nodes {
            if let Some(pid) = n.run.lock().pid {
                let _ = process::signal(pid, Signal::SIGTERM);
                // A stopped process handles SIGTERM only once continued.
                let _ = process::signal(pid, Signal::SIGCONT);
            }
        }
        let until = Instant::now() + grace;
        while Instant::now() < until && self.nodes.iter().any(|n| n.run.lock().running) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut report = Vec::new();
        for n in &self.nodes {
            let (running, pid, exit) = {
                let r = n.run.lock();
                (r.running, r.pid, r.last_exit.clone())
            };
            if running {
                if let Some(pid) = pid {
                    let _ = process::signal(pid, Signal::SIGKILL);
                }
                report.push(format!("{}: killed after {grace:?}", n.name));
            } else {
                report.push(format!(
                    "{}: {}",
                    n.name,
                    exit.unwrap_or_else(|| "not running".into())
                ));
            }
            let _ = std::fs::remove_file(&n.pid_file);
        }
        // Wait for the SIGKILLed ones to be reaped too.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && self.nodes.iter().any(|n| n.run.lock().running) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report
    }

    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }
}

/// [`Manifest::load`] on a blocking thread, so that a slow file system
/// never holds up a runtime worker (health checks and failover run there).
pub async fn load_manifest(path: &Path) -> Result<Manifest, ManifestError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || Manifest::load(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(ManifestError {
                file: path.display().to_string(),
                line: None,
                field: "(file)".into(),
                message: format!("reading it failed: {e}"),
                quotes_content: false,
            })
        })
}

/// The restart delay after an exit: the initial one after a first exit or
/// a stable run, else twice the previous one, capped at the maximum.
pub fn next_backoff_ms(prev_ms: u64, stable: bool, policy: RestartPolicy) -> u64 {
    if stable || prev_ms == 0 {
        policy.backoff_initial_ms.min(policy.backoff_max_ms)
    } else {
        prev_ms.saturating_mul(2).min(policy.backoff_max_ms)
    }
}

/// `now + ms`, with `ms` held to the manifest's limit, so that no value
/// can overflow the clock (which would panic the exit watcher and leave the
/// node never restarted).
fn after_ms(now: Instant, ms: u64) -> Instant {
    now + Duration::from_millis(ms.min(crate::manifest::MAX_BACKOFF_MS))
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("change refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// Runs the daemon until `kvsup down` (or SIGTERM, which leaves the nodes
/// running for the next daemon to adopt).
pub async fn run(manifest_path: PathBuf, base_dir: PathBuf, kvd: PathBuf) -> Result<()> {
    let manifest = Manifest::load(&manifest_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    manifest
        .checked_state_dir(&base_dir, &manifest_path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let port = manifest.spec.supervisor.port;
    let sup = Arc::new(Sup::new(manifest, manifest_path, base_dir, kvd)?);
    std::fs::create_dir_all(&sup.state_dir)
        .with_context(|| format!("creating {}", sup.state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding the supervisor port 127.0.0.1:{port}"))?;
    let pid_file = sup.state_dir.join("kvsup.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    sup.event(
        "start",
        None,
        format!(
            "supervising cluster {:?} from {} (pid {})",
            sup.manifest().metadata.name,
            sup.manifest_path().display(),
            std::process::id()
        ),
    );
    sup.metrics.applies.inc();
    for n in &sup.nodes {
        sup.health_loop(n.clone());
    }
    sup.reconcile_loop();
    crate::watch::spawn(sup.clone());
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let app = crate::http::router(sup.clone(), stop_tx);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            _ = stop_rx.recv() => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    serve.await.context("serving the supervisor API")?;
    if !sup.shutting_down.load(Ordering::Acquire) {
        sup.event("stop", None, "supervisor stopping; nodes keep running");
    }
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_up_to_its_cap_and_never_overflows() {
        let policy = RestartPolicy {
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
        };
        let mut b = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            b = next_backoff_ms(b, false, policy);
            seen.push(b);
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(next_backoff_ms(5_000, true, policy), 100);
        let huge = RestartPolicy {
            backoff_initial_ms: u64::MAX,
            backoff_max_ms: u64::MAX,
        };
        assert_eq!(next_backoff_ms(u64::MAX, false, huge), u64::MAX);
        let now = Instant::now();
        let at = after_ms(now, u64::MAX);
        assert_eq!(
            at - now,
            Duration::from_millis(crate::manifest::MAX_BACKOFF_MS)
        );
    }
}
