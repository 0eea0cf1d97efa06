//! Helpers for the masterless and mode-switch tests (their clusters are
//! [`crate::cluster::Cluster`]s): writes that report their timestamps,
//! convergence checks, and the check that every node holds the winner of
//! last-write-wins for every key.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::node::pipelined_get;
use crate::Kvd;

/// A hybrid-logical-clock stamp as kvd reports it; ordered like kvd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ts {
    pub physical_ms: u64,
    pub logical: u64,
    pub node: u64,
}

impl Ts {
    pub fn from_json(v: &Value) -> Option<Ts> {
        Some(Ts {
            physical_ms: v["physical_ms"].as_u64()?,
            logical: v["logical"].as_u64()?,
            node: v["node"].as_u64()?,
        })
    }
}

/// Every node's content digest (None for an unreachable node).
pub async fn digests(http: &reqwest::Client, urls: &[String]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for u in urls {
        let d = match http.get(format!("{u}/v1/status")).send().await {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|s| s["digest"].as_str().map(str::to_string)),
            Err(_) => None,
        };
        out.push(d);
    }
    out
}

/// Polls until every node shows the same digest (and the same
/// last-write-wins digest in masterless mode); how long it took.
pub async fn wait_converged(
    http: &reqwest::Client,
    urls: &[String],
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let mut ds = Vec::new();
        for u in urls {
            let s = match http.get(format!("{u}/v1/status")).send().await {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            };
            ds.push(s.map(|s| {
                (
                    s["digest"].as_str().unwrap_or_default().to_string(),
                    s["masterless"]["lww_digest"].as_str().map(str::to_string),
                )
            }));
        }
        if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            eprintln!("digests still differ after {timeout:?}: {ds:?}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls an async condition until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// PUT; the stamp of the acknowledged write, or the error status.
pub async fn put(http: &reqwest::Client, url: &str, key: &str, value: &str) -> Result<Ts, String> {
    stamped(
        http.put(format!("{url}/v1/kv/{key}"))
            .body(value.to_string()),
    )
    .await
}

/// DELETE; the stamp of the acknowledged delete, or the error status.
pub async fn del(http: &reqwest::Client, url: &str, key: &str) -> Result<Ts, String> {
    stamped(http.delete(format!("{url}/v1/kv/{key}"))).await
}

/// Sends a write; the `ts` of its answer, or the error status and body.
async fn stamped(request: reqwest::RequestBuilder) -> Result<Ts, String> {
    let r = request.send().await.map_err(|e| e.to_string())?;
    let code = r.status();
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    if !code.is_success() {
        return Err(format!("{code}: {body}"));
    }
    Ts::from_json(&body["ts"]).ok_or_else(|| format!("no ts in {body}"))
}

pub async fn get(http: &reqwest::Client, url: &str, key: &str) -> Option<Vec<u8>> {
    let r = http.get(format!("{url}/v1/kv/{key}")).send().await.unwrap();
    match r.status().as_u16() {
        200 => Some(r.bytes().await.unwrap().to_vec()),
        404 => None,
        s => panic!("GET {key} on {url}: {s}"),
    }
}

/// The acknowledged writes of a run, per key: the one with the highest
/// stamp wins (`None` value: a delete).
#[derive(Clone, Default)]
pub struct Acked(pub Arc<Mutex<Winners>>);

/// Key -> (stamp, value or `None` for a delete) of the winning write.
pub type Winners = HashMap<String, (Ts, Option<String>)>;

impl Acked {
    pub fn record(&self, key: &str, ts: Ts, value: Option<String>) {
        let mut m = self.0.lock().unwrap();
        let e = m.entry(key.to_string()).or_insert((ts, value.clone()));
        if ts > e.0 {
            *e = (ts, value);
        }
    }

    pub fn snapshot(&self) -> Winners {
        self.0.lock().unwrap().clone()
    }
}

/// Checks that every node holds, for every key, the value of the
/// acknowledged write with the highest stamp (pipelined GETs).
pub fn check_winners(nodes: &[Kvd], acked: &Winners) {
    let keys: Vec<&String> = acked.keys().collect();
    let paths: Vec<String> = keys.iter().map(|k| format!("/v1/kv/{k}")).collect();
    for n in nodes {
        for chunk in keys.chunks(5000).zip(paths.chunks(5000)) {
            let answers = pipelined_get(n.port, chunk.1);
            for (k, (code, body)) in chunk.0.iter().zip(answers) {
                let (ts, want) = &acked[*k];
                match want {
                    Some(v) => assert!(
                        code == 200 && body == v.as_bytes(),
                        "node {} key {k}: want {v:?} (ts {ts:?}), got {code} {:?}",
                        n.url(),
                        String::from_utf8_lossy(&body)
                    ),
                    None => assert_eq!(
                        code,
                        404,
                        "node {} key {k}: deleted at {ts:?} but got {:?}",
                        n.url(),
                        String::from_utf8_lossy(&body)
                    ),
                }
            }
        }
    }
}
