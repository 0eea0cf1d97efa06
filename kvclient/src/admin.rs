//! Cluster administration: the live mode switch (docs/DESIGN.md §6) between
//! primary/secondary and masterless, driven from outside (by `kvsup apply`
//! when a manifest's mode differs, by tests and benchmarks).
//!
//! [`switch_mode`] drives every node of a live cluster through kvd's admin
//! endpoints:
//!
//! 1. `GET /v1/status` on every node; if all are already in the target mode
//!    nothing happens.
//! 2. `POST /v1/admin/pause_writes` on every node (each returns once its
//!    in-flight writes have finished). From here on, client writes get 503
//!    `writes_paused` with `Retry-After`, which [`crate::Client`] retries.
//! 3. Poll `/v1/status` until every node shows the same content `digest`
//!    and has applied its whole log (`commit_index == last_index`).
//! 4. `POST /v1/admin/mode` on every node with the same common base:
//!    `base_index` = 1 + the largest last index, `epoch` = 1 + the largest
//!    epoch, `base_ts_ms` = 1 + the largest clock reading, and (to
//!    primary/secondary) the primary's node id.
//! 5. Poll until every node reports the new mode and the same digest, then
//!    `POST /v1/admin/resume_writes` everywhere.
//!
//! On a failure before any node switched, writes are resumed and the
//! cluster is as before. If some nodes switched and others could not,
//! writes stay paused (a mixed-mode cluster must not take writes) and the
//! error says so; calling `switch_mode` again finishes the job, since the
//! per-node step is idempotent.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvproto::admin::ModeRequest;
use kvproto::status::Status;
use serde_json::{json, Value};

use crate::tls::TlsFiles;

/// A cluster's replication mode (the one type kvd, kvsup and clients use).
pub use kvproto::Mode;

/// Why a switch did not complete (the message says where it stopped and
/// whether writes are still paused).
#[derive(Debug, Clone, thiserror::Error)]
#[error("mode switch failed: {0}")]
pub struct SwitchError(pub String);

/// Limits of [`switch_mode`].
#[derive(Debug, Clone)]
pub struct SwitchOptions {
    /// Longest wait for the nodes to become identical (step 3).
    pub converge_timeout: Duration,
    /// Bound on each HTTP request.
    pub request_timeout: Duration,
    /// To primary/secondary: the node id of the new primary (default: the
    /// first node given).
    pub primary: Option<String>,
    /// TLS to the nodes: their CA, and the node certificate that
    /// `/v1/admin/*` needs over TLS (docs/DESIGN.md §12).
    pub tls: TlsFiles,
    /// The admin token, for nodes with a token file (docs/DESIGN.md §2.18).
    pub token: Option<String>,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            converge_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            primary: None,
            tls: TlsFiles::default(),
            token: None,
        }
    }
}

/// One node's content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDigest {
    pub url: String,
    pub node_id: String,
    pub digest: String,
}

/// What [`switch_mode`] did.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    /// Mode before, as the first node reported it (`None`: between two
    /// modes, a switch that stopped half way).
    pub from: Option<Mode>,
    pub to: Mode,
    /// True when every node was already in `to`: nothing was done.
    pub already: bool,
    /// Writes were refused for this long (pause sent to resume answered).
    pub pause: Duration,
    /// Of the pause: waiting for the nodes to become identical.
    pub converge: Duration,
    pub base_index: u64,
    pub epoch: u64,
    /// The primary of `epoch` (to primary/secondary).
    pub primary: Option<String>,
    /// Digests once identical, before the switch.
    pub digests_before: Vec<NodeDigest>,
    /// Digests after the switch (equal to each other and to before).
    pub digests_after: Vec<NodeDigest>,
}

fn lww_digest(s: &Status) -> Option<&str> {
    s.masterless.as_ref().map(|m| m.lww_digest.as_str())
}

fn digest_at(s: &Status, url: &str) -> NodeDigest {
    NodeDigest {
        url: url.to_string(),
        node_id: s.node_id.clone(),
        digest: s.digest.clone(),
    }
}

/// Identical contents everywhere, whole logs applied, writes paused.
fn converged(statuses: &[Status]) -> bool {
    let first = &statuses[0];
    statuses.iter().all(|s| {
        s.digest == first.digest
            && lww_digest(s) == lww_digest(first)
            && s.commit_index == s.last_index
            && s.writes_paused
    })
}

fn max_u64(statuses: &[Status], f: impl Fn(&Status) -> u64) -> u64 {
    statuses.iter().map(f).max().unwrap_or(0)
}

#[derive(Clone)]
struct Admin {
    http: reqwest::Client,
    urls: Vec<String>,
}

async fn get_status(http: reqwest::Client, url: String) -> Result<Status, SwitchError> {
    let resp = http
        .get(format!("{url}/v1/status"))
        .send()
        .await
        .map_err(|e| SwitchError(format!("{url}: status: {e}")))?;
    if !resp.status().is_success() {
        return Err(SwitchError(format!(
            "{url}: status answered {}",
            resp.status()
        )));
    }
    resp.json()
        .await
        .map_err(|e| SwitchError(format!("{url}: status: {e}")))
}

async fn post(
    http: reqwest::Client,
    url: String,
    path: &'static str,
    body: Value,
) -> Result<Value, SwitchError> {
    let resp = http
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| SwitchError(format!("{url}{path}: {e}")))?;
    let code = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !code.is_success() {
        return Err(SwitchError(format!("{url}{path}: {code}: {v}")));
    }
    Ok(v)
}

/// Runs one request per node index at once; results in index order.
async fn on_nodes<T, F, Fut>(idx: &[usize], f: F) -> Vec<Result<T, SwitchError>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, SwitchError>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (k, &i) in idx.iter().enumerate() {
        let fut = f(i);
        set.spawn(async move { (k, fut.await) });
    }
    let mut out: Vec<Option<Result<T, SwitchError>>> = idx.iter().map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((k, r)) => out[k] = Some(r),
            Err(e) => {
                // A panicked or cancelled task: count it as a failure of
                // whichever slot is still empty.
                if let Some(slot) = out.iter_mut().find(|o| o.is_none()) {
                    *slot = Some(Err(SwitchError(format!("request task failed: {e}"))));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(SwitchError("request task lost".into()))))
        .collect()
}

/// The base every node switches with (step 4): the same on every node.
struct Base {
    base_index: u64,
    epoch: u64,
    /// To primary/secondary: the new primary's node id.
    primary: Option<String>,
    /// The `POST /v1/admin/mode` body.
    request: ModeRequest,
}

impl Admin {
    fn new<S: AsRef<str>>(nodes: &[S], opts: &SwitchOptions) -> Result<Admin, SwitchError> {
        if nodes.is_empty() {
            return Err(SwitchError("no nodes given".into()));
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(opts.request_timeout)
            .connect_timeout(Duration::from_secs(1));
        let http = match &opts.token {
            Some(t) => http.default_headers(crate::client::bearer_headers(t).map_err(SwitchError)?),
            None => http,
        };
        let http = opts
            .tls
            .apply(http)
            .map_err(|e| SwitchError(format!("TLS: {e}")))?
            .build()
            .map_err(|e| SwitchError(e.to_string()))?;
        Ok(Admin {
            http,
            urls: nodes
                .iter()
                .map(|u| u.as_ref().trim_end_matches('/').to_string())
                .collect(),
        })
    }

    fn all(&self) -> Vec<usize> {
        (0..self.urls.len()).collect()
    }

    async fn statuses(&self) -> Result<Vec<Status>, SwitchError> {
        on_nodes(&self.all(), |i| {
            get_status(self.http.clone(), self.urls[i].clone())
        })
        .await
        .into_iter()
        .collect()
    }

    async fn post_to(
        &self,
        idx: &[usize],
        path: &'static str,
        body: &Value,
    ) -> Vec<Result<Value, SwitchError>> {
        on_nodes(idx, |i| {
            post(self.http.clone(), self.urls[i].clone(), path, body.clone())
        })
        .await
    }

    async fn resume(&self) -> Result<(), SwitchError> {
        for r in self
            .post_to(&self.all(), "/v1/admin/resume_writes", &json!({}))
            .await
        {
            r?;
        }
        Ok(())
    }

    /// Resumes writes (best effort) and fails with `why`, saying so.
    async fn give_up(&self, why: String) -> SwitchError {
        let _ = self.resume().await;
        SwitchError(format!("{why}; writes resumed"))
    }

    fn digests(&self, statuses: &[Status]) -> Vec<NodeDigest> {
        self.urls
            .iter()
            .zip(statuses)
            .map(|(u, s)| digest_at(s, u))
            .collect()
    }

    /// Step 2: writes paused on every node, or on none.
    async fn pause(&self) -> Result<(), SwitchError> {
        let paused = self
            .post_to(&self.all(), "/v1/admin/pause_writes", &json!({}))
            .await;
        match paused.into_iter().find_map(Result::err) {
            Some(e) => Err(self.give_up(format!("pausing writes: {}", e.0)).await),
            None => Ok(()),
        }
    }

    /// Step 3: polls until every node holds the same contents with its
    /// whole log applied (unanswered polls are retried until `timeout`).
    async fn await_identical(&self, timeout: Duration) -> Result<Vec<Status>, SwitchError> {
        let started = Instant::now();
        loop {
            let statuses = match self.statuses().await {
                Ok(s) => s,
                Err(_) if started.elapsed() < timeout => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => return Err(self.give_up(e.0).await),
            };
            if converged(&statuses) {
                return Ok(statuses);
            }
            if started.elapsed() >= timeout {
                let ds: Vec<_> = statuses
                    .iter()
                    .map(|s| format!("{}={}", json!(s.node_id), json!(s.digest)))
                    .collect();
                let why = format!(
                    "the nodes did not become identical within {timeout:?} ({})",
                    ds.join(", ")
                );
                return Err(self.give_up(why).await);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Step 4's base: `base_index` 1 past the largest last index, `epoch`
    /// 1 past the largest epoch, the clock 1 ms past the largest reading
    /// (else now), and to primary/secondary the primary (the option, else
    /// the first node) with its URL.
    async fn common_base(
        &self,
        statuses: &[Status],
        to: Mode,
        opts: &SwitchOptions,
    ) -> Result<Base, SwitchError> {
        let base_index = max_u64(statuses, |s| s.last_index) + 1;
        let epoch = max_u64(statuses, |s| s.epoch) + 1;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let clock = max_u64(statuses, |s| s.hlc.physical_ms);
        let base_ts_ms = if clock == 0 { now_ms } else { clock + 1 };
        let primary = match to {
            Mode::Masterless | Mode::Single => None,
            Mode::PrimarySecondary => Some(match &opts.primary {
                Some(p) => p.clone(),
                None => statuses[0].node_id.clone(),
            }),
        };
        let primary_url = primary.as_ref().and_then(|p| {
            statuses
                .iter()
                .position(|s| s.node_id == *p)
                .map(|i| self.urls[i].clone())
        });
        if let (Some(p), None) = (&primary, &primary_url) {
            return Err(self.give_up(format!("no node is named {p:?}")).await);
        }
        let request = ModeRequest {
            base_ts_ms,
            primary: primary.clone(),
            primary_url,
            ..ModeRequest::new(to, base_index, epoch)
        };
        Ok(Base {
            base_index,
            epoch,
            primary,
            request,
        })
    }

    /// Step 4: `POST /v1/admin/mode` on every node, up to three rounds
    /// for the ones that failed. If none switched, writes resume; if only
    /// some did, they stay paused.
    async fn switch_every_node(&self, base: &Base) -> Result<(), SwitchError> {
        let mut switched = vec![false; self.urls.len()];
        let mut last_err = None;
        for _attempt in 0..3 {
            let todo: Vec<usize> = (0..self.urls.len()).filter(|&i| !switched[i]).collect();
            if todo.is_empty() {
                break;
            }
            let body = serde_json::to_value(&base.request).unwrap_or_default();
            let results = self.post_to(&todo, "/v1/admin/mode", &body).await;
            for (i, r) in todo.into_iter().zip(results) {
                match r {
                    Ok(_) => switched[i] = true,
                    Err(e) => last_err = Some(e),
                }
            }
        }
        if switched.iter().all(|s| *s) {
            return Ok(());
        }
        let e = last_err.map(|e| e.0).unwrap_or_default();
        if switched.iter().all(|s| !s) {
            return Err(self.give_up(format!("no node switched ({e})")).await);
        }
        Err(SwitchError(format!(
            "only some nodes switched ({e}); writes stay paused: run the switch again"
        )))
    }

    /// Step 5's wait: every node in `to` with the same contents, within
    /// twice `timeout` of `paused_at`.
    async fn await_new_mode(
        &self,
        to: Mode,
        paused_at: Instant,
        timeout: Duration,
    ) -> Result<Vec<Status>, SwitchError> {
        loop {
            let statuses = self.statuses().await?;
            let first = &statuses[0];
            if statuses
                .iter()
                .all(|s| s.mode == Some(to) && s.digest == first.digest)
            {
                return Ok(statuses);
            }
            if paused_at.elapsed() >= timeout * 2 {
                return Err(SwitchError(
                    "nodes switched but do not agree; writes stay paused".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Switches the live cluster at `nodes` (base URLs of every node) to mode
/// `to`; see the module docs for the steps and what happens on failure.
pub async fn switch_mode<S: AsRef<str>>(
    nodes: &[S],
    to: Mode,
    opts: &SwitchOptions,
) -> Result<SwitchReport, SwitchError> {
    if !to.is_cluster() {
        return Err(SwitchError(format!(
            "{to} is not a cluster mode (primary-secondary or masterless)"
        )));
    }
    let admin = Admin::new(nodes, opts)?;

    // 1. Where are we?
    let before = admin.statuses().await?;
    let from = before[0].mode;
    if before.iter().all(|s| s.mode == Some(to)) {
        let digests = admin.digests(&before);
        return Ok(SwitchReport {
            from,
            to,
            already: true,
            pause: Duration::ZERO,
            converge: Duration::ZERO,
            base_index: 0,
            epoch: max_u64(&before, |s| s.epoch),
            primary: None,
            digests_before: digests.clone(),
            digests_after: digests,
        });
    }

    // 2. Pause writes everywhere.
    let paused_at = Instant::now();
    admin.pause().await?;

    // 3. Wait for identical contents.
    let converge_started = Instant::now();
    let statuses = admin.await_identical(opts.converge_timeout).await?;
    let converge = converge_started.elapsed();
    let digests_before = admin.digests(&statuses);

    // 4. The common base, and the switch on every node.
    let base = admin.common_base(&statuses, to, opts).await?;
    admin.switch_every_node(&base).await?;

    // 5. Every node in the new mode with the same contents, then resume.
    let after = admin
        .await_new_mode(to, paused_at, opts.converge_timeout)
        .await?;
    admin.resume().await?;
    Ok(SwitchReport {
        from,
        to,
        already: false,
        pause: paused_at.elapsed(),
        converge,
        base_index: base.base_index,
        epoch: base.epoch,
        primary: base.primary,
        digests_before,
        digests_after: admin.digests(&after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status body as kvd writes it, with `patch`'s fields replaced.
    fn status(patch: Value) -> Status {
        let ts = json!({"physical_ms": 1_700_000_000_000_u64, "logical": 2, "node": 0});
        let mut v = json!({
            "applied_index": 10, "commit_index": 10, "data_dir": "d", "digest": "00ab",
            "epoch": 7, "hlc": ts, "keys": 1, "last_index": 10, "last_log_epoch": 7,
            "memory": {"data_set_bytes": 0, "max_bytes": null}, "mode": "masterless",
            "node_id": "n1", "peers": [], "role": "peer", "snapshot_index": 0,
            "storage_poisoned": false, "storage_state": "ok", "uptime_seconds": 1,
            "version": "0", "wal_bytes": 0, "wal_segments": 1, "writes_paused": true,
        });
        for (k, x) in patch.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_switch_reads_kvds_typed_status() {
        let s = status(json!({"masterless": {
            "clock_offset_ms": 0, "global_stable_time": {"physical_ms": 0, "logical": 0, "node": 0},
            "lww_digest": "ff00", "peers": [], "purged_tombstones": 0, "repaired_versions": 0,
            "stable_time": {"physical_ms": 0, "logical": 0, "node": 0}, "stream_gaps_total": 0,
            "tombstones": 0, "write_quorum": 1,
        }}));
        assert_eq!(s.mode, Some(Mode::Masterless));
        assert_eq!(lww_digest(&s), Some("ff00"));
        assert_eq!(
            max_u64(std::slice::from_ref(&s), |s| s.hlc.physical_ms),
            1_700_000_000_000
        );
        assert_eq!(digest_at(&s, "http://n").digest, "00ab");
        assert_eq!(status(json!({"mode": "switching"})).mode, None);
    }

    #[test]
    fn converged_needs_equal_digests_applied_logs_and_paused_writes() {
        let base = status(json!({}));
        assert!(converged(&[base.clone(), base.clone()]));
        let lww = |d: &str| {
            let mut s = base.clone();
            let mut m = status(json!({"masterless": {
                "clock_offset_ms": 0, "global_stable_time": {"physical_ms": 0, "logical": 0, "node": 0},
                "lww_digest": d, "peers": [], "purged_tombstones": 0, "repaired_versions": 0,
                "stable_time": {"physical_ms": 0, "logical": 0, "node": 0}, "stream_gaps_total": 0,
                "tombstones": 0, "write_quorum": 1,
            }}));
            s.masterless = m.masterless.take();
            s
        };
        for other in [
            status(json!({"digest": "b"})),
            status(json!({"commit_index": 4})),
            status(json!({"writes_paused": false})),
            lww("x"),
        ] {
            assert!(!converged(&[base.clone(), other]));
        }
    }

    #[tokio::test]
    async fn a_switch_to_single_is_refused_before_any_request() {
        let err = switch_mode(
            &["http://127.0.0.1:9"],
            Mode::Single,
            &SwitchOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(err.0.contains("not a cluster mode"), "{err}");
    }
}
