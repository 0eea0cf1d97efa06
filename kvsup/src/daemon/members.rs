//! Node changes, as `crate::plan` plans them (one node per apply) and
//! `crate::membership` steps them: a node added is started, made a
//! learner, caught up and made a voter (masterless: started, then every
//! node is given the new peer set); a node removed hands the primary over
//! if it leads, leaves the configuration (masterless: every other node is
//! given the set without it), and only then is stopped, its data dir kept.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvproto::admin::{Members, MembersRequest};
use serde_json::{json, Value};

use super::{error_message, nodes::holds_data, rolling::log_tail, Node, Sup};
use crate::election;
use crate::manifest::{Manifest, Mode, NodeSpec};
use crate::membership::{self, Candidate, MemberStep};
use crate::plan::{ChangeKind, ChangeState, ChangeStatus, Plan};

/// How often a node change polls while it waits.
const POLL: Duration = Duration::from_millis(20);

/// The commit wait asked of the primary for one configuration change.
const COMMIT_WAIT_MS: u64 = 10_000;

/// Bound on one request of a node change (the commit wait and a margin).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a removed node is given to learn that it was removed before
/// it is stopped (kvd stops shipping to it within 10 s of its removal).
const LEAVE_WAIT: Duration = Duration::from_secs(12);

/// Why one request of a node change did not do its part.
enum Miss {
    /// Worth another try after a moment (no primary, a change still
    /// committing, a learner still behind, a request that timed out).
    Retry(String),
    /// No retry will do (the node's answer says why).
    Fatal(String),
}

/// The codes a members or peers request may be retried after.
const RETRY_CODES: &[&str] = &[
    "config_change_in_progress",
    "learner_behind",
    "no_primary",
    "commit_timeout",
    "already_member",
    "not_member",
    "not_learner",
    "remove_self",
    "writes_paused",
];

impl Sup {
    /// Refuses an added node kvsup cannot start as a new member: one whose
    /// data dir already holds data (a node of that name was a member
    /// before; kvsup deletes nothing).
    pub(super) fn check_addable(&self, spec: &NodeSpec) -> Result<(), String> {
        let dir = crate::launch::data_dir(&self.state_dir, &spec.name);
        if !spec.external() && holds_data(&dir) {
            return Err(format!(
                "node {}: its data dir {} holds data (a node of this name was a member \
                 before): move it away, then apply again; a new member starts empty",
                spec.name,
                dir.display()
            ));
        }
        Ok(())
    }

    /// Starts the node change `plan`; `old` is the manifest it changes
    /// and the file it came from (the daemon runs the new one already),
    /// put back if it fails.
    pub(super) fn start_node_change(self: &Arc<Self>, old: (Manifest, PathBuf), plan: Plan) {
        let (kind, name) = match &plan {
            Plan::AddNode(spec) => (ChangeKind::AddNode, spec.name.clone()),
            Plan::RemoveNode(name) => (ChangeKind::RemoveNode, name.clone()),
            _ => return,
        };
        self.rollouts.begin(ChangeStatus {
            kind,
            what: plan.lines(),
            step: "starting".into(),
            nodes_done: Vec::new(),
            nodes_left: vec![name],
            state: ChangeState::Running,
            reason: None,
            generation: self.rollouts.target().number,
        });
        self.event(kind.as_str(), None, plan.lines().join("; "));
        self.spawn(self.clone().node_change(old, plan, kind));
    }

    /// Carries out the change and records how it ended.
    async fn node_change(self: Arc<Self>, old: (Manifest, PathBuf), plan: Plan, kind: ChangeKind) {
        let (old, old_path) = old;
        let started = Instant::now();
        let result = tokio::select! {
            r = self.carry_out(&plan) => r,
            () = self.stopped() => Err("the supervisor stopped".to_string()),
        };
        let label = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .changes
            .with_label_values(&[kind.as_str(), label])
            .inc();
        match result {
            Ok(()) => {
                self.rollouts.update(|c| {
                    c.state = ChangeState::Done;
                    c.step = "done".into();
                    c.nodes_done = std::mem::take(&mut c.nodes_left);
                });
                self.event(
                    kind.as_str(),
                    None,
                    format!(
                        "{} done ({} ms)",
                        plan.lines().join("; "),
                        started.elapsed().as_millis()
                    ),
                );
            }
            Err(why) => {
                if !self.cancel.is_cancelled() {
                    self.undo(&plan, &old).await;
                    *self.manifest.write() = old;
                    self.manifest_path.send_replace(old_path);
                }
                self.rollouts.update(|c| {
                    c.state = ChangeState::Failed;
                    c.reason = Some(why.clone());
                });
                self.event(
                    "error",
                    None,
                    format!(
                        "{} failed: {why}; the cluster is back on its previous node list \
                         (apply the manifest again to retry)",
                        plan.lines().join("; ")
                    ),
                );
            }
        }
        self.wake.notify_one();
    }

    async fn carry_out(self: &Arc<Self>, plan: &Plan) -> Result<(), String> {
        match plan {
            Plan::AddNode(spec) => self.add_node(spec).await,
            Plan::RemoveNode(name) => self.remove_node(name).await,
            Plan::Settings(_) | Plan::Rolling { .. } => Ok(()),
        }
    }

    fn step(&self, what: String) {
        tracing::info!(step = %what, "node change");
        self.rollouts.update(|c| c.step = what);
    }

    fn mode(&self) -> Mode {
        self.manifest.read().spec.mode
    }

    /// Starts node `spec` (its place in the list the manifest's), waits
    /// until it is healthy, and makes it a member.
    async fn add_node(self: &Arc<Self>, spec: &NodeSpec) -> Result<(), String> {
        let ps = self.mode() == Mode::PrimarySecondary;
        if self.creds.is_some() {
            self.step(format!("making {}'s certificate", spec.name));
            let (dir, cluster) = (self.state_dir.clone(), self.manifest().metadata.name);
            let node = spec.clone();
            tokio::task::spawn_blocking(move || crate::creds::add_node(&dir, &cluster, &node))
                .await
                .map_err(|e| format!("making {}'s certificate: {e}", spec.name))?
                .map_err(|e| format!("making {}'s certificate: {e:#}", spec.name))?;
        }
        let node = Arc::new(Node::new(
            spec,
            &self.state_dir,
            self.creds.is_some(),
            &self.cancel,
        ));
        node.joins.store(ps, Ordering::Release);
        self.rollouts.add(&node.name);
        {
            let at = self
                .manifest
                .read()
                .spec
                .nodes
                .iter()
                .position(|n| n.name == spec.name);
            let mut nodes = self.nodes.write();
            let at = at.unwrap_or(nodes.len()).min(nodes.len());
            nodes.insert(at, node.clone());
        }
        self.spawn(self.clone().health_loop(node.clone()));
        self.wake.notify_one();
        self.step(format!("starting {}", node.name));
        let deadline = Instant::now() + self.ready_timeout();
        self.until_healthy(&node, deadline).await?;
        if ps {
            return self.join_configuration(&node).await;
        }
        self.step(format!("giving every node the peer set with {}", node.name));
        self.tell_peers(&self.urls()).await?;
        self.step(format!("{} catching up", node.name));
        self.until_caught_up(&node, Instant::now() + self.ready_timeout())
            .await
            .map(|_| ())
    }

    /// Waits until `node` runs and is healthy; why not, with its log's
    /// last lines, at `deadline`.
    async fn until_healthy(&self, node: &Node, deadline: Instant) -> Result<(), String> {
        loop {
            let running = node.run.lock().running;
            let (ok, why) = {
                let h = node.health.lock();
                (running && h.ok && h.ready, h.last_error.clone())
            };
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = node
                    .run
                    .lock()
                    .last_exit
                    .clone()
                    .map(|e| format!("its process {e}"))
                    .or(why)
                    .unwrap_or_else(|| "not answering".into());
                return Err(format!(
                    "{} not healthy within {:?}: {why} (its log ends: {})",
                    node.name,
                    self.ready_timeout(),
                    log_tail(&node.log)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Primary/secondary: a learner, caught up, then a voter, one
    /// committed configuration change at a time (kvd refuses to promote a
    /// learner that is behind, so the promotion is retried until it has
    /// caught up).
    async fn join_configuration(&self, node: &Node) -> Result<(), String> {
        let deadline = Instant::now() + self.ready_timeout();
        self.configure(&node.url, deadline, |m| {
            let step = membership::add_step(&node.url, m);
            match step {
                MemberStep::AddLearner => self.step(format!("adding {} as a learner", node.name)),
                MemberStep::Promote => self.step(format!(
                    "{} catching up, to be promoted to voter",
                    node.name
                )),
                _ => {}
            }
            step
        })
        .await
        .map_err(|e| format!("adding {}: {e}", node.name))
    }

    /// Asks the primary for the configuration changes of node `url` that
    /// `next` calls for, reading the configuration before each, until
    /// `next` says done.
    async fn configure(
        &self,
        url: &str,
        deadline: Instant,
        mut next: impl FnMut(&Members) -> MemberStep,
    ) -> Result<(), String> {
        let mut last = String::from("no attempt made");
        while Instant::now() < deadline {
            if self.shutting_down() {
                return Err("kvsup down is stopping the nodes".into());
            }
            let attempt = match self.primary_members().await {
                Ok((primary, m)) => {
                    let step = next(&m);
                    match step.request(url) {
                        Some(req) => self.ask_members(&primary, &req).await,
                        None if step == MemberStep::Done => return Ok(()),
                        None => Err(Miss::Retry(format!(
                            "configuration {} not committed yet",
                            m.index
                        ))),
                    }
                }
                Err(e) => Err(Miss::Retry(e)),
            };
            match attempt {
                Ok(()) => {}
                Err(Miss::Retry(why)) => last = why,
                Err(Miss::Fatal(why)) => return Err(why),
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!("not done in time: {last}"))
    }

    /// The primary's URL and its configuration in effect.
    async fn primary_members(&self) -> Result<(String, Members), String> {
        let views = self.views();
        let url = election::leader(&views)
            .map(|v| v.url.clone())
            .ok_or("no primary")?;
        let m = self
            .get_json(&url, "/v1/admin/members", REQUEST_TIMEOUT, "members")
            .await?;
        Ok((url, m))
    }

    /// One configuration change, asked of the primary at `url`.
    async fn ask_members(&self, url: &str, req: &MembersRequest) -> Result<(), Miss> {
        let mut body = serde_json::to_value(req).unwrap_or(Value::Null);
        body["timeout_ms"] = json!(COMMIT_WAIT_MS);
        self.post(url, "/v1/admin/members", &body).await.map(|_| ())
    }

    /// `POST {url}{path}` with `body`: the answer, or why not (worth a
    /// retry, or refused).
    async fn post(&self, url: &str, path: &str, body: &Value) -> Result<Value, Miss> {
        let resp = self
            .http
            .post(format!("{url}{path}"))
            .json(body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| Miss::Retry(format!("{path} on {url}: {e}")))?;
        let code = resp.status();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if code.is_success() {
            return Ok(answer);
        }
        let kind = answer
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("");
        let why = format!(
            "{path} on {url} answered {code} {kind}: {}",
            error_message(&answer).unwrap_or("no reason given")
        );
        if code.is_redirection() || code.is_server_error() || RETRY_CODES.contains(&kind) {
            Err(Miss::Retry(why))
        } else {
            Err(Miss::Fatal(why))
        }
    }

    /// Masterless: gives each node of `urls` the peer set of all the
    /// others, retrying each until the ready timeout.
    async fn tell_peers(&self, urls: &[String]) -> Result<(), String> {
        let deadline = Instant::now() + self.ready_timeout();
        for (me, peers) in membership::peer_sets(urls) {
            let body = json!({ "peers": peers });
            loop {
                match self.post(&me, "/v1/admin/peers", &body).await {
                    Ok(_) => break,
                    Err(Miss::Fatal(why)) => return Err(why),
                    Err(Miss::Retry(why)) if Instant::now() >= deadline => {
                        return Err(format!("not done in time: {why}"))
                    }
                    Err(Miss::Retry(_)) => tokio::time::sleep(POLL).await,
                }
            }
        }
        Ok(())
    }

    /// The URLs of the nodes now, in list order.
    fn urls(&self) -> Vec<String> {
        self.nodes().iter().map(|n| n.url.clone()).collect()
    }

    /// Takes node `name` out of the cluster, then stops it.
    async fn remove_node(self: &Arc<Self>, name: &str) -> Result<(), String> {
        let node = self
            .node(name)
            .ok_or_else(|| format!("no node named {name}"))?;
        if self.mode() == Mode::PrimarySecondary {
            self.leave_configuration(&node).await?;
        } else {
            let rest: Vec<String> = self
                .nodes()
                .iter()
                .filter(|n| n.name != name)
                .map(|n| n.url.clone())
                .collect();
            self.drain(&node, &rest).await?;
            self.step(format!(
                "giving every other node the peer set without {name}"
            ));
            self.tell_peers(&rest).await?;
        }
        self.retire(&node).await;
        Ok(())
    }

    /// Masterless: stops `node` taking writes and waits until each of
    /// `rest` holds everything it logged, so that a write only it held is
    /// not lost with it.
    async fn drain(&self, node: &Node, rest: &[String]) -> Result<(), String> {
        self.step(format!("pausing writes on {}", node.name));
        let answer = match self
            .post(&node.url, "/v1/admin/pause_writes", &json!({}))
            .await
        {
            Ok(a) => a,
            Err(Miss::Retry(why) | Miss::Fatal(why)) => return Err(why),
        };
        let last = answer["last_index"].as_u64().unwrap_or(0);
        self.step(format!(
            "waiting for the others to hold {}'s log up to {last}",
            node.name
        ));
        let deadline = Instant::now() + self.ready_timeout();
        let mut behind = String::from("no status yet");
        while Instant::now() < deadline {
            match self.status_of(&node.url).await {
                Ok(st) => {
                    let peers = st.masterless.map(|m| m.peers).unwrap_or_default();
                    let lagging: Vec<&String> = rest
                        .iter()
                        .filter(|u| {
                            !peers
                                .iter()
                                .any(|p| &p.url == *u && p.acked_index.unwrap_or(0) >= last)
                        })
                        .collect();
                    if lagging.is_empty() {
                        return Ok(());
                    }
                    behind = format!("{lagging:?} behind index {last}");
                }
                Err(e) => behind = e,
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!(
            "{}'s writes did not reach the others in time: {behind}",
            node.name
        ))
    }

    /// Primary/secondary: hands the primary over if `node` leads, takes
    /// it out of the configuration, and gives it a moment to learn that.
    async fn leave_configuration(self: &Arc<Self>, node: &Node) -> Result<(), String> {
        let deadline = Instant::now() + self.ready_timeout();
        loop {
            let views = self.views();
            if election::leader(&views).is_some_and(|v| v.name == node.name) {
                self.hand_over(&node.name, deadline).await?;
            }
            self.step(format!("removing {} from the configuration", node.name));
            let done = self
                .configure(&node.url, deadline, |m| {
                    // Led by the node itself meanwhile: hand over first.
                    let leads = self
                        .views()
                        .iter()
                        .any(|v| v.name == node.name && v.claims_primary);
                    if leads {
                        MemberStep::Done
                    } else {
                        membership::remove_step(&node.url, m)
                    }
                })
                .await;
            done.map_err(|e| format!("removing {}: {e}", node.name))?;
            // Done, or stopped because the node leads again: read afresh.
            if let Ok((_, m)) = self.primary_members().await {
                if membership::remove_step(&node.url, &m) == MemberStep::Done {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{} not removed in time", node.name));
            }
            tokio::time::sleep(POLL).await;
        }
        self.step(format!("waiting for {} to learn it was removed", node.name));
        let until = Instant::now() + LEAVE_WAIT;
        while Instant::now() < until {
            match self.status_of(&node.url).await {
                Ok(st) if st.voter == Some(false) => break,
                Err(_) => break,
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
        Ok(())
    }

    /// A planned switchover away from `name`, to the first healthy voter.
    async fn hand_over(self: &Arc<Self>, name: &str, deadline: Instant) -> Result<(), String> {
        let candidates: Vec<Candidate> = self
            .nodes()
            .iter()
            .map(|n| {
                let running = n.run.lock().running;
                let h = n.health.lock();
                Candidate {
                    name: n.name.clone(),
                    healthy: running && h.ok && h.ready,
                    voter: h.status.as_ref().and_then(|s| s.voter).unwrap_or(true),
                }
            })
            .collect();
        let to = membership::handover_target(name, &candidates)
            .ok_or_else(|| format!("{name} leads and no healthy voter can take over"))?
            .to_string();
        self.step(format!("switchover from {name} to {to}"));
        self.event(
            "remove_node",
            Some(&to),
            format!("planned switchover to this node, so that {name} can leave"),
        );
        let left = deadline.saturating_duration_since(Instant::now());
        self.promote(&to, left)
            .await
            .map(|_| ())
            .map_err(|e| format!("switchover to {to} failed: {e:#}"))
    }

    /// Drops `node` from the daemon (no more checks or restarts) and stops
    /// its process; its data dir is kept.
    async fn retire(&self, node: &Node) {
        self.nodes.write().retain(|n| n.name != node.name);
        node.gone.cancel();
        self.rollouts.forget(&node.name);
        self.step(format!("stopping {}", node.name));
        let stopped = if node.external {
            Ok(())
        } else {
            self.stop_process(node).await
        };
        let _ = self.metrics.node_up.remove_label_values(&[&node.name]);
        match stopped {
            Ok(()) => self.event(
                "remove_node",
                Some(&node.name),
                format!(
                    "left the cluster and {}; its data dir {} is kept",
                    if node.external {
                        "is left running (runtime: external)"
                    } else {
                        "was stopped"
                    },
                    node.data_dir.display()
                ),
            ),
            Err(why) => self.event(
                "error",
                Some(&node.name),
                format!("left the cluster, but stopping it failed: {why}"),
            ),
        }
    }

    /// After a failed change: an added node taken out again and stopped
    /// (best effort), a masterless peer set put back.
    async fn undo(self: &Arc<Self>, plan: &Plan, old: &Manifest) {
        let tls = self.creds.is_some();
        let old_urls: Vec<String> = old.spec.nodes.iter().map(|n| n.url(tls)).collect();
        let ps = self.mode() == Mode::PrimarySecondary;
        match plan {
            Plan::AddNode(spec) => {
                let Some(node) = self.node(&spec.name) else {
                    return;
                };
                if ps {
                    let deadline = Instant::now() + self.ready_timeout();
                    let undone = self
                        .configure(&node.url, deadline, |m| {
                            membership::remove_step(&node.url, m)
                        })
                        .await;
                    if let Err(e) = undone {
                        self.event(
                            "error",
                            Some(&spec.name),
                            format!("could not take it out of the configuration again: {e}"),
                        );
                    }
                } else {
                    let _ = self.tell_peers(&old_urls).await;
                }
                self.retire(&node).await;
            }
            Plan::RemoveNode(name) if !ps => {
                let _ = self.tell_peers(&old_urls).await;
                if let Some(node) = self.node(name) {
                    let _ = self
                        .post(&node.url, "/v1/admin/resume_writes", &json!({}))
                        .await;
                }
            }
            _ => {}
        }
    }
}
