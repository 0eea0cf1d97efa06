//! What the `kvsup` commands ask of the daemon (through the HTTP API, and
//! the file watcher for `apply`): apply a manifest (with a live mode switch
//! when its mode differs), kill a node, a planned switchover, and `down`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvclient::admin;
use nix::sys::signal::Signal;

use super::{load_manifest, Node, Sup};
use crate::election::{self, NodeView};
use crate::manifest::Mode;
use crate::plan::{self, NodeSettings, Plan};
use crate::process;

/// How long the nodes stopped with SIGKILL by `down` are given to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// How often the commands poll while they wait.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("change refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl Sup {
    /// Applies a manifest read from `path` (by `kvsup apply` or the file
    /// watcher), with the kvd binary `kvd` (`kvsup apply --kvd`; left out:
    /// the binary the nodes run, read again, so that one replaced in place
    /// counts). Returns the plan's lines once its change has started (a
    /// rolling change goes on after: `kvsup status` follows it); with
    /// `dry_run`, changes nothing.
    pub async fn apply(
        self: &Arc<Self>,
        path: &Path,
        base_dir: &Path,
        kvd: Option<&Path>,
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
        // One apply plans at a time, from the state the last one left.
        let _applying = self.rollouts.applying.lock().await;
        let old = self.manifest();
        let running_kvd = self.rollouts.target().settings.kvd;
        let binaries = &self.rollouts.binaries;
        let new_kvd = match kvd {
            Some(k) => binaries
                .id(k)
                .await
                .map_err(|e| ApplyError::Invalid(format!("--kvd: {e:#}")))?,
            None => binaries
                .id(&running_kvd.path)
                .await
                .unwrap_or_else(|_| running_kvd.clone()),
        };
        let change = self.rollouts.change();
        let planned = plan::plan(&old, &running_kvd, &new, &new_kvd, change.as_ref())
            .map_err(|r| ApplyError::Refused(r.to_string()))?;
        let changes = planned.lines();
        if dry_run {
            return Ok(changes);
        }
        if let Plan::AddNode(spec) = &planned {
            self.check_addable(spec).map_err(ApplyError::Refused)?;
        }
        if new.spec.mode != old.spec.mode {
            self.switch_mode(new.spec.mode)
                .await
                .map_err(|e| ApplyError::Failed(format!("mode switch failed: {e:#}")))?;
        }
        *self.manifest.write() = new.clone();
        let old_path = self.manifest_path();
        // The file watcher follows the path when it moves.
        self.manifest_path.send_if_modified(|p| {
            let moved = *p != path;
            if moved {
                *p = path.to_path_buf();
            }
            moved
        });
        match &planned {
            Plan::Rolling { what, .. } => {
                self.start_rolling(NodeSettings::of(&new, &new_kvd), what.clone());
            }
            Plan::AddNode(_) | Plan::RemoveNode(_) => {
                self.start_node_change((old.clone(), old_path), planned.clone());
            }
            Plan::Settings(_) => {}
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

    /// Live mode switch (docs/DESIGN.md §6) through [`kvclient::admin::switch_mode`]:
    /// writes pause on every node until all hold identical contents, every
    /// node changes mode, writes resume. No failover or switchover runs
    /// meanwhile (they take the same lock).
    async fn switch_mode(self: &Arc<Self>, to: Mode) -> Result<()> {
        if self.nodes.read().len() < 2 {
            bail!("a single node has no replication mode to switch");
        }
        let _moving = self.moving.lock().await;
        let urls: Vec<String> = self.nodes().iter().map(|n| n.url.clone()).collect();
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
            tls: kvclient::TlsFiles {
                ca: self.creds.as_ref().map(|c| c.layout().ca()),
                ..Default::default()
            },
            token: self.creds.as_ref().map(|c| c.admin_secret().to_string()),
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
        self.event("mode", None, switched_message(to, &report));
        for n in &self.nodes() {
            self.check(n).await;
        }
        Ok(())
    }

    pub fn kill(&self, name: &str, sig: Signal) -> Result<u32> {
        let node = self
            .node(name)
            .with_context(|| format!("no node named {name:?}"))?;
        if node.external {
            bail!("{name} has runtime: external: kvsup does not run it, so it sends it no signal");
        }
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
        if self.manifest.read().spec.mode != Mode::PrimarySecondary || self.nodes.read().len() < 2 {
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
                    for n in &self.nodes() {
                        self.check(n).await;
                    }
                    return Ok(epoch);
                }
                Err(e) => last_err = e,
            }
            tokio::time::sleep(POLL).await;
        }
        bail!("could not promote {name} within {deadline:?}: {last_err}")
    }

    /// Stops every node gracefully (SIGTERM; SIGKILL after `grace`).
    pub async fn down(self: &Arc<Self>, grace: Duration) -> Vec<String> {
        self.shutting_down.store(true, Ordering::Release);
        self.event("down", None, "stopping all nodes");
        for n in &self.nodes() {
            if let Some(pid) = n.run.lock().pid {
                let _ = process::signal(pid, Signal::SIGTERM);
                // A stopped process handles SIGTERM only once continued.
                let _ = process::signal(pid, Signal::SIGCONT);
            }
        }
        self.until_all_exited(grace).await;
        let mut report = Vec::new();
        for n in &self.nodes() {
            if n.external {
                report.push(format!("{}: runtime external, left running", n.name));
                continue;
            }
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
        self.until_all_exited(REAP_GRACE).await;
        report
    }

    /// Waits until no node runs, for at most `limit`.
    async fn until_all_exited(&self, limit: Duration) {
        let until = Instant::now() + limit;
        let runs = |n: &Arc<Node>| !n.external && n.run.lock().running;
        while Instant::now() < until && self.nodes().iter().any(runs) {
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The event that ends a mode switch to `to`.
fn switched_message(to: Mode, report: &admin::SwitchReport) -> String {
    if report.already {
        return format!("every node was already {}", to.as_str());
    }
    let digest = report
        .digests_after
        .first()
        .map_or_else(String::new, |d| d.digest.clone());
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
}
