//! The supervisor daemon: holds the desired state (the applied manifest) and
//! makes the cluster match it, over and over.
//!
//! Its tasks, each owned by [`Sup`] (spawned with [`Sup::spawn`], stopped
//! by [`Sup::stop`]):
//! - one health checker per node (`/v1/status` at the manifest's interval;
//!   `health.rs`);
//! - one watcher per running process, whose exit is seen at once
//!   (`nodes.rs`);
//! - the reconcile loop: start missing nodes, restart dead ones with capped
//!   backoff, and fail over when the primary has failed (`failover.rs`);
//! - the sampler: the status document once a second into the dashboard's
//!   bounded ring (`crate::dashboard::Samples`).
//! - a rolling change, while one runs: the nodes restarted one at a time
//!   onto new settings, as `crate::plan` plans and orders them
//!   (`rolling.rs`, which also keeps what each node runs);
//! - a node added or removed, while one is: the node started and made a
//!   member, or handed over from, taken out and stopped (`members.rs`).
//!
//! The layers above add the manifest file watcher and the HTTP API the
//! `kvsup` commands talk to (`commands.rs` is what they call; `status.rs`
//! the status document).
//!
//! kvsup decides *when* to elect and *whom* to ask (`crate::election`);
//! safety is kvd's: a promotion only succeeds with a majority of votes
//! (docs/DESIGN.md §4), so a wrong guess here (a primary that was only slow) costs a
//! needless election, never a lost write.

mod backups;
mod commands;
mod failover;
mod health;
mod members;
mod nodes;
pub mod restore;
mod rolling;
mod status;

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::creds::Creds;
use crate::dashboard::{self, Failover, Sample, Samples};
use crate::manifest::{Manifest, ManifestError, NodeSpec};
use crate::metrics::Metrics;

pub use commands::ApplyError;

/// Events kept for `kvsup events`.
const MAX_EVENTS: usize = 1000;

/// How long [`Sup::stop`] waits for a primary move or mode switch under way
/// to finish (a switch abandoned half-way would leave writes paused).
const MOVE_GRACE: Duration = Duration::from_secs(60);

/// How long [`Sup::stop`] waits for the tasks to end once told to, before
/// it aborts them.
const TASK_GRACE: Duration = Duration::from_secs(2);

/// One entry of the `kvsup events` log: a product record of what the
/// supervisor did and saw (each is also logged).
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
    /// Its data dir was lost: the next start is a re-seed (`--rejoin`).
    reseed: bool,
}

#[derive(Default)]
struct Health {
    /// The last check answered.
    ok: bool,
    /// ...and the node's storage takes writes.
    ready: bool,
    failures: u32,
    status: Option<kvproto::status::Status>,
    last_error: Option<String>,
}

pub struct Node {
    pub name: String,
    /// Its entry in the manifest it was added with.
    pub spec: NodeSpec,
    pub port: u16,
    pub url: String,
    /// `runtime: external`: something else runs it; kvsup only talks to it.
    pub external: bool,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    run: Mutex<RunState>,
    health: Mutex<Health>,
    restarts: AtomicU64,
    /// Wakes the node's health checker when its process is started.
    started: tokio::sync::Notify,
    /// Added to a running cluster: its first start on a fresh data dir
    /// is a learner's (`--join`).
    joins: AtomicBool,
    /// Cancelled when it leaves the cluster (or the daemon stops): its
    /// health checker ends.
    gone: CancellationToken,
}

impl Node {
    /// Node `spec` of a cluster whose state is in `state_dir` (`tls`: it
    /// serves https); `cancel` is the daemon's.
    fn new(spec: &NodeSpec, state_dir: &Path, tls: bool, cancel: &CancellationToken) -> Node {
        Node {
            name: spec.name.clone(),
            spec: spec.clone(),
            port: spec.port,
            url: spec.url(tls),
            external: spec.external(),
            data_dir: crate::launch::data_dir(state_dir, &spec.name),
            log: state_dir.join(format!("{}.log", spec.name)),
            pid_file: state_dir.join(format!("{}.pid", spec.name)),
            // An external node counts as running for good: whether it is
            // up is what its health checks say.
            run: Mutex::new(RunState {
                running: spec.external(),
                ..RunState::default()
            }),
            health: Mutex::new(Health::default()),
            restarts: AtomicU64::new(0),
            started: tokio::sync::Notify::new(),
            joins: AtomicBool::new(false),
            gone: cancel.child_token(),
        }
    }

    /// Running, and no check has answered since it was started.
    fn awaiting_first_answer(&self) -> bool {
        let r = self.run.lock();
        r.running && !r.answered
    }
}

pub struct Sup {
    manifest: RwLock<Manifest>,
    /// The file the applied manifest came from; the file watcher follows
    /// its changes.
    manifest_path: tokio::sync::watch::Sender<PathBuf>,
    base_dir: PathBuf,
    pub state_dir: PathBuf,
    kvd: PathBuf,
    /// The nodes, in manifest order; a node change adds or removes one.
    nodes: RwLock<Vec<Arc<Node>>>,
    /// With `tls: auto`: the cluster's CA, certificates and tokens.
    creds: Option<Creds>,
    /// Speaks to the nodes: with `creds`, over https trusting their CA and
    /// with the cluster admin token on every request.
    http: reqwest::Client,
    events: Mutex<VecDeque<Event>>,
    next_event: AtomicU64,
    /// Recent samples and failovers, for the dashboard's charts.
    samples: Mutex<Samples>,
    pub metrics: Metrics,
    wake: tokio::sync::Notify,
    failover_in_progress: AtomicBool,
    switching: AtomicBool,
    /// Held by anything that moves the primary: failover, switchover, mode switch.
    moving: tokio::sync::Mutex<()>,
    /// `kvsup down` is stopping the nodes.
    shutting_down: AtomicBool,
    election: Mutex<ElectionState>,
    /// What each node runs, and the last change (`rolling.rs`).
    rollouts: rolling::Rollouts,
    /// Cancelled when the daemon stops: every task ends at its next wait.
    cancel: CancellationToken,
    /// Every task the daemon runs; joined (or aborted) by [`Sup::stop`].
    tasks: Mutex<JoinSet<()>>,
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
    /// `creds` must be given exactly when the manifest says `tls: auto`.
    pub fn new(
        manifest: Manifest,
        path: PathBuf,
        base_dir: PathBuf,
        kvd: PathBuf,
        creds: Option<Creds>,
    ) -> Result<Sup> {
        anyhow::ensure!(
            manifest.spec.tls_auto() == creds.is_some(),
            "tls: auto needs the cluster's credentials, and only it"
        );
        let state_dir = manifest.state_dir(&base_dir);
        let cancel = CancellationToken::new();
        let nodes = manifest
            .spec
            .nodes
            .iter()
            .map(|n| Arc::new(Node::new(n, &state_dir, creds.is_some(), &cancel)))
            .collect();
        let http = node_client(creds.as_ref())?;
        let rollouts = rolling::Rollouts::new(&manifest, rolling::binary_id_or_unknown(&kvd));
        Ok(Sup {
            manifest: RwLock::new(manifest),
            manifest_path: tokio::sync::watch::Sender::new(path),
            base_dir,
            state_dir,
            kvd,
            nodes: RwLock::new(nodes),
            creds,
            http,
            events: Mutex::new(VecDeque::new()),
            next_event: AtomicU64::new(1),
            samples: Mutex::new(Samples::default()),
            metrics: Metrics::new().context("registering metrics")?,
            wake: tokio::sync::Notify::new(),
            failover_in_progress: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            moving: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            election: Mutex::new(ElectionState::default()),
            rollouts,
            cancel,
            tasks: Mutex::new(JoinSet::new()),
        })
    }

    /// Starts the daemon's own tasks: a health checker per node and the
    /// reconcile loop (which starts the nodes).
    pub fn start(self: &Arc<Self>) {
        for n in &self.nodes() {
            self.spawn(self.clone().health_loop(n.clone()));
        }
        self.spawn(self.clone().reconcile_loop());
        self.spawn(self.clone().sample_loop());
        self.spawn(self.clone().backup_loop());
    }

    /// Takes a [`Sample`] of the status every [`dashboard::SAMPLE_EVERY_MS`]
    /// until the daemon stops.
    async fn sample_loop(self: Arc<Self>) {
        let every = Duration::from_millis(dashboard::SAMPLE_EVERY_MS);
        loop {
            let s = Sample::from_status(now_ms(), &self.status());
            self.samples.lock().push(s);
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.stopped() => return,
            }
        }
    }

    /// The `/v1/samples` document.
    pub fn samples(&self) -> Value {
        self.samples.lock().to_json()
    }

    /// Records a failover's duration for the dashboard.
    fn record_failover(&self, node: &str, took: Duration) {
        self.samples.lock().failover(Failover {
            t_ms: now_ms(),
            node: node.to_string(),
            ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        });
    }

    /// Runs `task` as one of the daemon's tasks, so that [`Sup::stop`]
    /// ends it. Once the daemon is stopping, nothing new starts.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut tasks = self.tasks.lock();
        // Finished tasks (an exit watcher per node start) are reaped here,
        // so that a node in a crash loop does not grow the set.
        while let Some(done) = tasks.try_join_next() {
            log_task_end(done);
        }
        if !self.cancel.is_cancelled() {
            tasks.spawn(task);
        }
    }

    /// Resolves once the daemon has begun to stop.
    pub async fn stopped(&self) {
        self.cancel.cancelled().await;
    }

    /// Stops every task: first waits (at most [`MOVE_GRACE`]) for a primary
    /// move or mode switch under way, then tells the tasks to end and gives
    /// them [`TASK_GRACE`] before aborting the rest. The nodes are not
    /// touched: after a SIGTERM they keep running for the next daemon.
    pub async fn stop(&self) {
        let moving = tokio::time::timeout(MOVE_GRACE, self.moving.lock()).await;
        if moving.is_err() {
            tracing::warn!("a primary move or mode switch still runs; stopping anyway");
        }
        self.cancel.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        let count = tasks.len();
        let joined = tokio::time::timeout(TASK_GRACE, async {
            while let Some(done) = tasks.join_next().await {
                log_task_end(done);
            }
        })
        .await;
        let aborted = tasks.len();
        if joined.is_err() {
            tracing::warn!(
                tasks = aborted,
                "tasks did not end within {TASK_GRACE:?}; aborting them"
            );
            tasks.shutdown().await;
        }
        tracing::info!(tasks = count, aborted, "daemon tasks stopped");
    }

    pub fn manifest(&self) -> Manifest {
        self.manifest.read().clone()
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.manifest_path.borrow().clone()
    }

    /// Follows [`Sup::manifest_path`]: changed when an apply names another
    /// file.
    pub fn watch_manifest_path(&self) -> tokio::sync::watch::Receiver<PathBuf> {
        self.manifest_path.subscribe()
    }

    /// Records an event for `kvsup events` and logs it.
    pub fn event(&self, kind: &str, node: Option<&str>, message: impl Into<String>) {
        let e = Event {
            id: self.next_event.fetch_add(1, Ordering::Relaxed),
            time_ms: now_ms(),
            kind: kind.to_string(),
            node: node.map(str::to_string),
            message: message.into(),
        };
        log_event(&e);
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
        self.nodes.read().iter().find(|n| n.name == name).cloned()
    }

    /// The nodes now, in manifest order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().clone()
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.manifest.read().spec.health_check.interval_ms)
    }

    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// `kvsup down` has begun (set by [`Sup::down`]).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// The client kvsup speaks to its nodes with. With `creds` it trusts only
/// the cluster CA and sends the cluster admin token (marked sensitive, so
/// no debug output shows it); it needs no client certificate, as kvd lets
/// the admin token open the operator's routes (docs/DESIGN.md §12).
fn node_client(creds: Option<&Creds>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_max_idle_per_host(4);
    if let Some(c) = creds {
        let ca = c.layout().ca();
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        let mut auth =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", c.admin_secret()))
                .context("the admin token is not a header value")?;
        auth.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .default_headers(headers);
    }
    b.build().context("building the HTTP client")
}

/// An event at the level its kind calls for: failures are warnings or
/// errors, the rest is information.
fn log_event(e: &Event) {
    let node = e.node.as_deref();
    match e.kind.as_str() {
        "error" => tracing::error!(kind = %e.kind, node, "{}", e.message),
        "exit" | "kill" | "failover" => tracing::warn!(kind = %e.kind, node, "{}", e.message),
        _ => tracing::info!(kind = %e.kind, node, "{}", e.message),
    }
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a daemon task panicked");
        }
    }
}

/// The message of a kvd error body `{"error": {"message": ...}}`.
fn error_message(body: &Value) -> Option<&str> {
    body.pointer("/error/message").and_then(Value::as_str)
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
