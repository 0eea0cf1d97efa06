//! Health checks: one task per node asks it for `/v1/status` and `/ready`
//! every interval (more often while a started node has not answered yet)
//! and records what it saw; the reconcile loop is woken when that changes.

use std::sync::Arc;
use std::time::Duration;

use kvproto::status::Status;
use serde_json::Value;

use super::{error_message, Node, Sup};

/// How often a node that has not answered since it was started is probed,
/// so that a starting cluster is seen (and elects) without waiting for a
/// health interval.
const STARTUP_PROBE: Duration = Duration::from_millis(20);

/// What one check saw of a node that answered.
struct Seen {
    status: Status,
    /// Why its storage refuses writes, if it does.
    not_ready: Option<String>,
}

impl Sup {
    /// Checks `node` every interval until the daemon stops or the node
    /// leaves the cluster.
    pub(super) async fn health_loop(self: Arc<Self>, node: Arc<Node>) {
        while !self.shutting_down() {
            tokio::select! {
                () = self.health_round(&node) => {}
                () = node.gone.cancelled() => return,
            }
        }
    }

    /// One interval of `node`'s checker: a check (or startup probes), then
    /// the rest of the interval.
    async fn health_round(&self, node: &Node) {
        let next = tokio::time::Instant::now() + self.interval();
        if node.awaiting_first_answer() {
            self.probe_until_answer(node, next).await;
        } else {
            self.check(node).await;
        }
        // A start ends the wait: the new process is probed at once.
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = node.started.notified() => {}
        }
    }

    /// One health check of `node`; a failure counts towards
    /// `failureThreshold`.
    pub(super) async fn check(&self, node: &Node) {
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
        let poisoned = status.storage_poisoned;
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
            tracing::debug!(node = %node.name, failures = h.failures, error = h.last_error.as_deref(), "health check failed");
        } else if h.ok {
            h.failures = 0;
        }
        self.metrics
            .node_up
            .with_label_values(&[&node.name])
            .set(i64::from(h.ok && h.ready));
        if before != (h.ok, h.ready) {
            if h.ok && h.ready {
                tracing::info!(node = %node.name, "node is healthy");
            } else {
                tracing::warn!(node = %node.name, error = h.last_error.as_deref(), "node is unhealthy");
            }
            drop(h);
            self.wake.notify_one();
        }
    }

    /// `GET {url}{path}` within `timeout`; `what` names the check in errors.
    async fn get(
        &self,
        url: &str,
        path: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<reqwest::Response, String> {
        self.http
            .get(format!("{url}{path}"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("{what} failed: {e}"))
    }

    async fn fetch_status(&self, url: &str, timeout: Duration) -> Result<Status, String> {
        let resp = self.get(url, "/v1/status", timeout, "status check").await?;
        if !resp.status().is_success() {
            return Err(format!("status check answered {}", resp.status()));
        }
        resp.json::<Status>()
            .await
            .map_err(|e| format!("status check: bad body: {e}"))
    }

    /// `Ok(None)` when `/ready` answers 200, `Ok(Some(why))` when it answers
    /// anything else; `Err` when it does not answer.
    async fn fetch_ready(&self, url: &str, timeout: Duration) -> Result<Option<String>, String> {
        let resp = self.get(url, "/ready", timeout, "readiness check").await?;
        let code = resp.status();
        if code.is_success() {
            return Ok(None);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = error_message(&body).unwrap_or("no reason given");
        Ok(Some(format!("/ready answered {code}: {message}")))
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
}
