//! Cluster administration: the live mode switch (DESIGN §6) between
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

use serde_json::{json, Value};

/// A cluster's replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    PrimarySecondary,
    Masterless,
}

impl Mode {
    /// The name kvd and manifests use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::PrimarySecondary => "primary-secondary",
            Mode::Masterless => "masterless",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = SwitchError;
    fn from_str(s: &str) -> Result<Mode, SwitchError> {
        match s {
            "primary-secondary" => Ok(Mode::PrimarySecondary),
            "masterless" => Ok(Mode::Masterless),
            other => Err(SwitchError(format!(
                "unknown mode {other:?} (primary-secondary or masterless)"
            ))),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            converge_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            primary: None,
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
    /// Mode before (as the first node reported it).
    pub from: String,
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

#[derive(Clone)]
struct Admin {
    http: reqwest::Client,
    urls: Vec<String>,
}

async fn get_status(http: reqwest::Client, url: String) -> Result<Value, SwitchError> {
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
async fn on_nodes<F, Fut>(idx: &[usize], f: F) -> Vec<Result<Value, SwitchError>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Value, SwitchError>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (k, &i) in idx.iter().enumerate() {
        let fut = f(i);
        set.spawn(async move { (k, fut.await) });
    }
    let mut out: Vec<Option<Result<Value, SwitchError>>> = idx.iter().map(|_| None).collect();
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

impl Admin {
    fn all(&self) -> Vec<usize> {
        (0..self.urls.len()).collect()
    }

    async fn statuses(&self) -> Result<Vec<Value>, SwitchError> {
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
}

fn digest_of(url: &str, s: &Value) -> NodeDigest {
    NodeDigest {
        url: url.to_string(),
        node_id: s["node_id"].as_str().unwrap_or_default().to_string(),
        digest: s["digest"].as_str().unwrap_or_default().to_string(),
    }
}

/// Identical contents everywhere, whole logs applied.
fn converged(statuses: &[Value]) -> bool {
    let first = &statuses[0];
    statuses.iter().all(|s| {
        s["digest"] == first["digest"]
            && s["masterless"]["lww_digest"] == first["masterless"]["lww_digest"]
            && s["commit_index"] == s["last_index"]
            && s["writes_paused"] == true
    })
}

fn max_u64(statuses: &[Value], f: impl Fn(&Value) -> Option<u64>) -> u64 {
    statuses.iter().filter_map(f).max().unwrap_or(0)
}

/// Switches the live cluster at `nodes` (base URLs of every node) to mode
/// `to`; see the module docs for the steps and what happens on failure.
pub async fn switch_mode<S: AsRef<str>>(
    nodes: &[S],
    to: Mode,
    opts: &SwitchOptions,
) -> Result<SwitchReport, SwitchError> {
    if nodes.is_empty() {
        return Err(SwitchError("no nodes given".into()));
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(opts.request_timeout)
        .connect_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| SwitchError(e.to_string()))?;
    let admin = Admin {
        http,
        urls: nodes
            .iter()
            .map(|u| u.as_ref().trim_end_matches('/').to_string())
            .collect(),
    };

    // 1. Where are we?
    let before = admin.statuses().await?;
    let from = before[0]["mode"].as_str().unwrap_or_default().to_string();
    if before.iter().all(|s| s["mode"] == to.as_str()) {
        let digests: Vec<_> = admin
            .urls
            .iter()
            .zip(&before)
            .map(|(u, s)| digest_of(u, s))
            .collect();
        return Ok(SwitchReport {
            from,
            to,
            already: true,
            pause: Duration::ZERO,
            converge: Duration::ZERO,
            base_index: 0,
            epoch: max_u64(&before, |s| s["epoch"].as_u64()),
            primary: None,
            digests_before: digests.clone(),
            digests_after: digests,
        });
    }

    // 2. Pause writes everywhere.
    let paused_at = Instant::now();
    let paused = admin
        .post_to(&admin.all(), "/v1/admin/pause_writes", &json!({}))
        .await;
    if let Some(Err(e)) = paused.into_iter().find(|r| r.is_err()) {
        let _ = admin.resume().await;
        return Err(SwitchError(format!(
            "pausing writes: {}; writes resumed",
            e.0
        )));
    }

    // 3. Wait for identical contents.
    let converge_started = Instant::now();
    let statuses = loop {
        let statuses = match admin.statuses().await {
            Ok(s) => s,
            Err(e) if converge_started.elapsed() < opts.converge_timeout => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                let _ = admin.resume().await;
                return Err(SwitchError(format!("{}; writes resumed", e.0)));
            }
        };
        if converged(&statuses) {
            break statuses;
        }
        if converge_started.elapsed() >= opts.converge_timeout {
            let _ = admin.resume().await;
            let ds: Vec<_> = statuses
                .iter()
                .map(|s| format!("{}={}", s["node_id"], s["digest"]))
                .collect();
            return Err(SwitchError(format!(
                "the nodes did not become identical within {:?} ({}); writes resumed",
                opts.converge_timeout,
                ds.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let converge = converge_started.elapsed();
    let digests_before: Vec<_> = admin
        .urls
        .iter()
        .zip(&statuses)
        .map(|(u, s)| digest_of(u, s))
        .collect();

    // 4. The common base, and the switch on every node.
    let base_index = max_u64(&statuses, |s| s["last_index"].as_u64()) + 1;
    let epoch = max_u64(&statuses, |s| s["epoch"].as_u64()) + 1;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let clock = max_u64(&statuses, |s| s["hlc"]["physical_ms"].as_u64());
    let base_ts_ms = if clock == 0 { now_ms } else { clock + 1 };
    let primary = match to {
        Mode::Masterless => None,
        Mode::PrimarySecondary => Some(match &opts.primary {
            Some(p) => p.clone(),
            None => statuses[0]["node_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }),
    };
    let primary_url = primary.as_ref().and_then(|p| {
        statuses
            .iter()
            .position(|s| s["node_id"] == p.as_str())
            .map(|i| admin.urls[i].clone())
    });
    if let (Some(p), None) = (&primary, &primary_url) {
        let _ = admin.resume().await;
        return Err(SwitchError(format!(
            "no node is named {p:?}; writes resumed"
        )));
    }
    let req = json!({
        "mode": to.as_str(),
        "base_index": base_index,
        "epoch": epoch,
        "base_ts_ms": base_ts_ms,
        "primary": primary,
        "primary_url": primary_url,
    });
    let mut switched = vec![false; admin.urls.len()];
    let mut last_err = None;
    for _attempt in 0..3 {
        let todo: Vec<usize> = (0..admin.urls.len()).filter(|&i| !switched[i]).collect();
        if todo.is_empty() {
            break;
        }
        let results = admin.post_to(&todo, "/v1/admin/mode", &req).await;
        for (i, r) in todo.into_iter().zip(results) {
            match r {
                Ok(_) => switched[i] = true,
                Err(e) => last_err = Some(e),
            }
        }
    }
    if switched.iter().any(|s| !s) {
        let e = last_err.map(|e| e.0).unwrap_or_default();
        if switched.iter().all(|s| !s) {
            let _ = admin.resume().await;
            return Err(SwitchError(format!(
                "no node switched ({e}); writes resumed"
            )));
        }
        return Err(SwitchError(format!(
            "only some nodes switched ({e}); writes stay paused: run the switch again"
        )));
    }

    // 5. Every node in the new mode with the same contents, then resume.
    let after = loop {
        let statuses = admin.statuses().await?;
        let first = &statuses[0];
        if statuses
            .iter()
            .all(|s| s["mode"] == to.as_str() && s["digest"] == first["digest"])
        {
            break statuses;
        }
        if paused_at.elapsed() >= opts.converge_timeout * 2 {
            return Err(SwitchError(
                "nodes switched but do not agree; writes stay paused".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    admin.resume().await?;
    let pause = paused_at.elapsed();
    let digests_after = admin
        .urls
        .iter()
        .zip(&after)
        .map(|(u, s)| digest_of(u, s))
        .collect();
    Ok(SwitchReport {
        from,
        to,
        already: false,
        pause,
        converge,
        base_index,
        epoch,
        primary,
        digests_before,
        digests_after,
    })
}
