//! The reconcile loop: start the nodes that are due, then (primary/secondary
//! with several nodes) let [`election::decide`] say whether to elect, and
//! ask its candidates in turn. The decision is `crate::election`'s; this
//! file gathers its input and sends the requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{error_message, ElectionState, Sup};
use crate::election::{self, Decision, NodeView};
use crate::manifest::Mode;
use kvproto::status::Role;

/// Extra wait before electing when no primary is known and some node does
/// not answer yet (it may come back as the primary).
const NO_PRIMARY_GRACE: Duration = Duration::from_secs(2);

/// Bound on one `POST /promote_to_primary`.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(5);

impl ElectionState {
    /// `name` leads: nothing is amiss any more. Returns since when the
    /// cluster was without one, if it was.
    fn led_by(&mut self, name: &str) -> Option<Instant> {
        self.known_primary = Some(name.to_string());
        self.no_primary_since = None;
        self.last_refusal = None;
        self.primary_down_since.take()
    }
}

impl Sup {
    /// Reconciles until the daemon stops: at once when a node exits or its
    /// health changes, else every interval.
    pub(super) async fn reconcile_loop(self: Arc<Self>) {
        loop {
            self.reconcile().await;
            if self.shutting_down() {
                return;
            }
            let interval = self.interval();
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
                () = self.stopped() => return,
            }
        }
    }

    /// What the health checks last saw of every node, as the election
    /// rules take it.
    pub(super) fn views(&self) -> Vec<NodeView> {
        let threshold = self.manifest.read().spec.health_check.failure_threshold;
        self.nodes()
            .iter()
            .map(|n| {
                let running = n.run.lock().running;
                let h = n.health.lock();
                let st = h.status.as_ref();
                NodeView {
                    name: n.name.clone(),
                    url: n.url.clone(),
                    running,
                    answering: running && h.ok,
                    ready: h.ready,
                    failed: !running || h.failures >= threshold,
                    claims_primary: h.ok && st.map(|s| s.role) == Some(Role::Primary),
                    epoch: st.map_or(0, |s| s.epoch),
                    last: st.map_or((0, 0), |s| (s.last_log_epoch, s.last_index)),
                }
            })
            .collect()
    }

    async fn reconcile(self: &Arc<Self>) {
        if self.shutting_down() || self.cancel.is_cancelled() {
            return;
        }
        self.start_due_nodes();
        self.reseed_lost();
        let mode = self.manifest.read().spec.mode;
        if mode == Mode::PrimarySecondary && self.nodes.read().len() > 1 {
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
        if election::sees_no_node(&views) {
            let mut el = self.election.lock();
            if el.known_primary.is_some() {
                el.no_primary_since = Some(Instant::now());
                drop(el);
                self.report_once(
                    "no node answers the supervisor (is kvsup cut off from them?): electing \
                     nobody until one does"
                        .to_string(),
                );
                return;
            }
        }
        let decision = {
            let mut el = self.election.lock();
            let timing = election::Timing {
                without_leader: el.no_primary_since.map_or(Duration::ZERO, |t| t.elapsed()),
                patience: self.interval().saturating_mul(hc.failure_threshold),
                grace: NO_PRIMARY_GRACE,
            };
            let d = election::decide(&views, el.known_primary.as_deref(), timing);
            if let Decision::Led(p) = &d {
                el.led_by(&p.name);
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
                    self.elected(c, epoch, cause).await;
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

    /// `c` won the election of `epoch`: counted, timed, said, and checked
    /// at once (its new role counts now, not a check later).
    async fn elected(&self, c: &NodeView, epoch: u64, cause: &election::Cause) {
        let took = self.election.lock().led_by(&c.name).map(|t| t.elapsed());
        self.metrics.failovers.inc();
        if let Some(t) = took {
            self.metrics.failover_duration.observe(t.as_secs_f64());
            self.record_failover(&c.name, t);
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
        if let Some(n) = self.node(&c.name) {
            self.check(&n).await;
        }
        self.failover_in_progress.store(false, Ordering::Release);
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
    pub(super) async fn transfer(
        &self,
        primary: &str,
        to: &str,
        timeout: Duration,
    ) -> Result<u64, String> {
        let req = self
            .http
            .post(format!("{primary}/v1/admin/transfer"))
            .json(&json!({"to": to, "timeout_ms": timeout.as_millis() as u64}))
            .timeout(timeout + Duration::from_secs(5));
        Self::epoch_from(req, "transfer").await
    }

    /// Asks the node at `url` to run for primary; its new epoch on success.
    pub(super) async fn promote_once(&self, url: &str) -> Result<u64, String> {
        let req = self
            .http
            .post(format!("{url}/promote_to_primary"))
            .timeout(PROMOTE_TIMEOUT);
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
            Err(error_message(&body)
                .map_or_else(|| format!("{what} answered {code}"), str::to_string))
        }
    }

    /// The cluster gauges (`kvsup_cluster_ready`, `kvsup_primary_epoch`).
    fn publish_conditions(&self) {
        let st = self.status();
        let ready = st["conditions"]["Ready"].as_bool().unwrap_or(false);
        self.metrics.ready.set(i64::from(ready));
        self.metrics
            .primary_epoch
            .set(st["epoch"].as_u64().unwrap_or(0) as i64);
        let config = &st["config"];
        let count = |k: &str| config[k].as_array().map_or(0, |a| a.len() as i64);
        self.metrics
            .config_index
            .set(config["index"].as_u64().unwrap_or(0) as i64);
        self.metrics.config_voters.set(count("voters"));
        self.metrics.config_learners.set(count("learners"));
    }
}
