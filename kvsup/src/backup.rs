//! `kvsup backup`: which node to back up (a decision over the daemon's
//! status document) and fetching its `GET /v1/admin/snapshot` into a file
//! (docs/DESIGN.md §3.10, §8.3). The file is written as `FILE.tmp`,
//! fsync'd, verified by the caller, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The node a backup is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub url: String,
    pub role: String,
}

/// A healthy secondary (the most up to date one), so that the primary is
/// spared; else the healthy primary (a single node says `primary`); else
/// none. `nodes` is the status document's `nodes` array.
pub fn pick(nodes: &[Value]) -> Option<Source> {
    let healthy = |n: &&Value| n["healthy"].as_bool() == Some(true);
    let with_role = |role: &str| {
        nodes
            .iter()
            .filter(healthy)
            .filter(|n| n["role"].as_str() == Some(role))
            .max_by_key(|n| n["commit_index"].as_u64().unwrap_or(0))
            .map(|n| Source {
                name: n["name"].as_str().unwrap_or("").to_string(),
                url: n["url"].as_str().unwrap_or("").to_string(),
                role: role.to_string(),
            })
    };
    with_role("secondary").or_else(|| with_role("primary"))
}

/// The client to the nodes: under `tls: auto` (`tls` given: the cluster
/// CA's file and the cluster admin token's file, `creds/` of the state
/// dir) over https trusting that CA, with that token.
pub fn client(tls: Option<(&Path, &Path)>) -> Result<(reqwest::Client, Option<String>)> {
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    let mut token = None;
    if let Some((ca, token_file)) = tls {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
        let secret = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the cluster admin token {}", token_file.display()))?;
        token = Some(secret.trim().to_string());
    }
    Ok((b.build().context("building the HTTP client")?, token))
}

/// What was fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The index the node said the backup is exact at.
    pub index: u64,
    pub bytes: u64,
    pub tmp: PathBuf,
}

/// Longest wait for the next chunk of the answer.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// `FILE.tmp` beside `to`.
pub fn tmp_path(to: &Path) -> PathBuf {
    let mut name = to.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    to.with_file_name(name)
}

/// Streams the node's backup into `FILE.tmp` and fsyncs it.
pub async fn fetch(
    http: &reqwest::Client,
    token: Option<&str>,
    node_url: &str,
    to: &Path,
) -> Result<Fetched> {
    let mut req = http.get(format!("{node_url}/v1/admin/snapshot"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut r = tokio::time::timeout(CHUNK_TIMEOUT, req.send())
        .await
        .context("the node did not answer in time")?
        .with_context(|| format!("asking {node_url} for a backup"))?;
    if !r.status().is_success() {
        let code = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let why = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("");
        bail!("{node_url} answered {code}: {why}");
    }
    let index = r
        .headers()
        .get("x-kv-backup-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .context("the answer does not say its index (x-kv-backup-index)")?;
    let tmp = tmp_path(to);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut bytes = 0u64;
    loop {
        let chunk = tokio::time::timeout(CHUNK_TIMEOUT, r.chunk())
            .await
            .context("the backup stalled")?
            .with_context(|| format!("reading the backup from {node_url}"))?;
        let Some(chunk) = chunk else { break };
        f.write_all(&chunk)
            .with_context(|| format!("writing {}", tmp.display()))?;
        bytes += chunk.len() as u64;
    }
    f.sync_all()
        .with_context(|| format!("fsync of {}", tmp.display()))?;
    Ok(Fetched { index, bytes, tmp })
}

/// Moves the verified `FILE.tmp` to `to`, durably.
pub fn commit(tmp: &Path, to: &Path) -> Result<()> {
    std::fs::rename(tmp, to).with_context(|| format!("renaming {}", tmp.display()))?;
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, role: &str, healthy: bool, commit: u64) -> Value {
        json!({"name": name, "url": format!("http://{name}"), "role": role,
               "healthy": healthy, "commit_index": commit})
    }

    #[test]
    fn a_healthy_secondary_is_picked_before_the_primary() {
        let nodes = [
            node("n0", "primary", true, 9),
            node("n1", "secondary", true, 7),
            node("n2", "secondary", true, 8),
        ];
        assert_eq!(pick(&nodes).unwrap().name, "n2");
        let nodes = [
            node("n0", "primary", true, 9),
            node("n1", "down", false, 0),
            node("n2", "secondary", false, 8),
        ];
        let s = pick(&nodes).unwrap();
        assert_eq!((s.name.as_str(), s.role.as_str()), ("n0", "primary"));
        assert!(pick(&[node("n0", "down", false, 0)]).is_none());
    }

    #[test]
    fn the_temp_file_is_beside_the_target() {
        assert_eq!(
            tmp_path(Path::new("/a/b.kvbak")),
            PathBuf::from("/a/b.kvbak.tmp")
        );
        assert_eq!(tmp_path(Path::new("b")), PathBuf::from("b.tmp"));
    }
}
