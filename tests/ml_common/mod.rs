//! Helpers for the masterless and mode-switch tests: three-node clusters
//! whose links go through cuttable proxies, writes that report their
//! timestamps, convergence checks.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvstore::{free_port, Kvd, LinkProxy};
use serde_json::Value;
use tempfile::TempDir;

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

/// Three kvd nodes; node i reaches node j through `links[i][j]`.
pub struct Cluster {
    pub nodes: Vec<Kvd>,
    pub links: Vec<Vec<Option<LinkProxy>>>,
    pub tmp: TempDir,
}

impl Cluster {
    /// `mode` is `masterless` or `primary-secondary` (n0 bootstraps as
    /// primary); `extra(i)` adds flags for node i.
    pub fn start(mode: &str, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let tmp = TempDir::new().unwrap();
        let mut ports = BTreeSet::new();
        while ports.len() < 3 {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let links: Vec<Vec<Option<LinkProxy>>> = (0..3)
            .map(|i| {
                (0..3)
                    .map(|j| (i != j).then(|| LinkProxy::start(ports[j]).unwrap()))
                    .collect()
            })
            .collect();
        let nodes = (0..3)
            .map(|i| {
                let peers: Vec<String> = (0..3)
                    .filter(|&j| j != i)
                    .map(|j| links[i][j].as_ref().unwrap().url())
                    .collect();
                let mut args: Vec<String> = vec![
                    "--node-id".into(),
                    format!("n{i}"),
                    "--peers".into(),
                    peers.join(","),
                    "--mode".into(),
                    mode.into(),
                    "--role".into(),
                    if i == 0 { "primary" } else { "secondary" }.into(),
                ];
                args.extend(extra(i));
                let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                Kvd::start_on(ports[i], &tmp.path().join(format!("n{i}")), &args).unwrap()
            })
            .collect();
        Cluster { nodes, links, tmp }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Cuts node `i` off from the other two, both directions.
    pub fn isolate(&self, i: usize) {
        for j in 0..3 {
            if j != i {
                self.links[i][j].as_ref().unwrap().cut();
                self.links[j][i].as_ref().unwrap().cut();
            }
        }
    }

    pub fn heal(&self) {
        for row in &self.links {
            for l in row.iter().flatten() {
                l.heal();
            }
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

pub async fn status(http: &reqwest::Client, url: &str) -> Value {
    http.get(format!("{url}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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
    let r = http
        .put(format!("{url}/v1/kv/{key}"))
        .body(value.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = r.status();
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    if !code.is_success() {
        return Err(format!("{code}: {body}"));
    }
    Ts::from_json(&body["ts"]).ok_or_else(|| format!("no ts in {body}"))
}

pub async fn del(http: &reqwest::Client, url: &str, key: &str) -> Result<Ts, String> {
    let r = http
        .delete(format!("{url}/v1/kv/{key}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
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

/// GETs many paths over one pipelined HTTP/1.1 connection.
pub fn pipelined_get(port: u16, paths: &[String]) -> Vec<(u16, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let requests: Vec<u8> = paths
        .iter()
        .flat_map(|p| format!("GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes())
        .collect();
    let sender = std::thread::spawn(move || writer.write_all(&requests));
    let mut reader = BufReader::new(stream);
    let mut out = Vec::with_capacity(paths.len());
    let mut line = String::new();
    for _ in paths {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        out.push((status, body));
    }
    sender.join().unwrap().unwrap();
    out
}
