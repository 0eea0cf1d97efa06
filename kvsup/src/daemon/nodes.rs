//! Node processes: the kvd command line a node gets, starting (or adopting)
//! it, the task that watches for its exit, and the restart backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Node, RunState, Sup};
use crate::launch::{kvd_args, start_kind, Start, StartFacts};
use crate::manifest::{restart_at, Mode, RestartPolicy};
use crate::process::{self, Handle, Launch};

/// A node runs this long before an exit resets its restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How often an adopted process (not our child, so not waitable) is polled.
const ADOPTED_POLL: Duration = Duration::from_millis(50);

impl RunState {
    /// Schedules the next start after the policy's backoff (`stable`: the
    /// last run was long enough to start the backoff over).
    fn back_off(&mut self, now: Instant, policy: RestartPolicy, stable: bool) {
        self.backoff_ms = policy.next_backoff_ms(self.backoff_ms, stable);
        self.next_start = Some(restart_at(now, self.backoff_ms));
    }
}

impl Sup {
    /// Starts every node that is not running once its backoff has passed.
    pub(super) fn start_due_nodes(self: &Arc<Self>) {
        let now = Instant::now();
        for node in &self.nodes() {
            if node.gone.is_cancelled() {
                continue;
            }
            let due = {
                let r = node.run.lock();
                !r.running && r.next_start.is_none_or(|t| now >= t)
            };
            if !due {
                continue;
            }
            if let Err(e) = self.start_node(node) {
                self.metrics.reconcile_errors.inc();
                self.event("error", Some(&node.name), format!("cannot start: {e:#}"));
                let policy = self.manifest.read().spec.restart;
                node.run.lock().back_off(now, policy, false);
            }
        }
    }

    /// Whether `node` starts as the primary that bootstraps a brand-new
    /// cluster: the first node, while no node has a `meta` file yet. Any
    /// node with history comes back as a secondary, and the reconcile loop
    /// elects a primary if none is left.
    fn bootstraps(&self, node: &Node) -> bool {
        let ps = self.manifest.read().spec.mode == Mode::PrimarySecondary;
        // kvsup sees the data dirs of the nodes it runs only; with an
        // external node, nothing is started as the leader and the reconcile
        // loop elects one once every node answers.
        let ours = self.nodes().iter().all(|n| !n.external);
        let fresh = ours
            && self
                .nodes()
                .iter()
                .all(|n| !n.data_dir.join("meta").exists());
        let first = self.nodes().first().is_some_and(|n| n.name == node.name);
        ps && self.nodes.read().len() > 1 && fresh && first
    }

    /// The command line of `node`: the manifest's, with the settings the
    /// node runs (`rolling.rs`), which a rolling change moves one node at
    /// a time.
    fn launch_for(&self, node: &Node, start: Start) -> Launch {
        let runs = self.rollouts.runs(&node.name).settings;
        let mut m = self.manifest.read().clone();
        m.spec.index = runs.index;
        m.spec.kvd_args = runs.kvd_args;
        let layout = self.creds.as_ref().map(crate::creds::Creds::layout);
        Launch {
            kvd: runs.kvd.path,
            args: kvd_args(&m, &node.spec, &node.data_dir, start, layout.as_ref()),
            log: node.log.clone(),
            pid_file: node.pid_file.clone(),
        }
    }

    /// Starts (or adopts) `node` and a task that watches for its exit.
    fn start_node(self: &Arc<Self>, node: &Arc<Node>) -> Result<()> {
        let handle = self.launch_or_adopt(node)?;
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
        // What the last status said was the previous process's (a re-seed
        // must not act on the old one's `data_dir_lost`).
        node.health.lock().status = None;
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
        self.spawn(self.clone().watch_exit(node.clone(), handle));
        Ok(())
    }

    /// The kvd a previous daemon left running on `node`'s data dir, else a
    /// new one.
    fn launch_or_adopt(&self, node: &Node) -> Result<Handle> {
        // The data dir is kvd's (it creates it); kvsup never writes there.
        if let Some(pid) = process::adoptable(&node.pid_file, &node.data_dir) {
            self.event(
                "adopt",
                Some(&node.name),
                format!("found kvd pid {pid} already running; supervising it"),
            );
            return Ok(Handle::Adopted(pid));
        }
        let bootstraps = self.bootstraps(node);
        let reseed = std::mem::take(&mut node.run.lock().reseed);
        let ps = self.manifest.read().spec.mode == Mode::PrimarySecondary;
        let start = start_kind(StartFacts {
            bootstraps,
            reseed,
            joins: node.joins.load(Ordering::Acquire),
            primary_secondary: ps,
            holds_data: holds_data(&node.data_dir),
        });
        let child = process::spawn(&self.launch_for(node, start))?;
        if bootstraps {
            // kvsup knows who leads a fresh cluster before it answers: its
            // exit is then a failover like any other, not a wait for a
            // primary that may still appear.
            let mut el = self.election.lock();
            el.known_primary = Some(node.name.clone());
            el.no_primary_since = None;
        }
        Ok(Handle::Child(child))
    }

    /// Re-seeds each node of ours whose data dir is gone (kvd says
    /// `data_dir_lost`): it is stopped, and started again on a fresh data
    /// dir, as a secondary that the primary catches up (its log, or a
    /// snapshot) and that votes again once it has caught up. kvsup deletes
    /// nothing: kvd makes the fresh dir, and a dir that holds data again
    /// by then is started as it is.
    pub(super) fn reseed_lost(&self) {
        for node in self.nodes().iter().filter(|n| !n.external) {
            let lost = node
                .health
                .lock()
                .status
                .as_ref()
                .is_some_and(|s| s.storage_state == kvproto::status::StorageState::DataDirLost);
            let pid = {
                let mut r = node.run.lock();
                // `answered`: the status is this process's, not the one
                // of the run before a re-seed.
                if !lost || r.reseed || !r.running || !r.answered {
                    continue;
                }
                r.reseed = true;
                r.pid
            };
            self.metrics.reseeds.inc();
            self.event(
                "reseed",
                Some(&node.name),
                format!(
                    "its data dir {} is gone: stopping it to start it again on a fresh one",
                    node.data_dir.display()
                ),
            );
            if let Some(pid) = pid {
                let _ = process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Waits for the process of `node` to exit. A daemon that stops first
    /// leaves it running (the next daemon adopts it).
    async fn watch_exit(self: Arc<Self>, node: Arc<Node>, mut handle: Handle) {
        tokio::select! {
            how = handle.wait(ADOPTED_POLL) => self.on_exit(&node, how),
            () = self.stopped() => {}
        }
    }

    fn on_exit(&self, node: &Node, how: String) {
        let policy = self.manifest.read().spec.restart;
        {
            let mut r = node.run.lock();
            let now = Instant::now();
            let stable = r.started_at.is_some_and(|t| now - t >= STABLE_AFTER);
            r.back_off(now, policy, stable);
            r.running = false;
            r.pid = None;
            r.exited_at = Some(now);
            r.last_exit = Some(how.clone());
        }
        {
            let mut h = node.health.lock();
            h.ok = false;
            h.ready = false;
            h.last_error = Some(format!("process {how}"));
        }
        self.metrics.node_up.with_label_values(&[&node.name]).set(0);
        if !self.shutting_down() {
            let _ = std::fs::remove_file(&node.pid_file);
            self.event("exit", Some(&node.name), how);
        }
        self.wake.notify_one();
    }
}

/// Whether `dir` holds a node's data (its `meta` or its WAL): such a dir
/// is never treated as fresh.
pub(super) fn holds_data(dir: &std::path::Path) -> bool {
    dir.join("meta").exists() || dir.join("wal").exists()
}
