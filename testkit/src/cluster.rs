//! Three-node clusters on loopback: `n0` bootstraps as primary, `n1` and
//! `n2` as secondaries, each knowing the others' URLs. Either linked
//! directly ([`start_cluster`]) or through a [`LinkProxy`] per direction of
//! each link, which a test can cut to partition the nodes ([`Cluster`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use tempfile::TempDir;

use crate::{free_ports, Kvd, LinkProxy};

/// The flags every node of a three-node cluster starts with: its id
/// (`n{i}`), its peers' URLs (`peer_url(j)` for the two others) and its
/// boot role.
fn node_flags(i: usize, peer_url: impl Fn(usize) -> String) -> Vec<String> {
    let peers: Vec<String> = (0..3).filter(|&j| j != i).map(peer_url).collect();
    let role = if i == 0 { "primary" } else { "secondary" };
    vec![
        "--node-id".into(),
        format!("n{i}"),
        "--peers".into(),
        peers.join(","),
        "--role".into(),
        role.into(),
    ]
}

/// Starts node `i` of a cluster on `port` with data dir `dir/n{i}`.
fn start_node(dir: &Path, i: usize, port: u16, flags: &[String]) -> Result<Kvd> {
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    Kvd::start_on(port, &dir.join(format!("n{i}")), &args)
}

/// Three replicated nodes on loopback, each knowing the others' URLs:
/// `n0` bootstraps as primary, `n1` and `n2` as secondaries, with data dirs
/// `dir/n0` .. `dir/n2` and `extra` flags on each.
pub fn start_cluster(dir: &Path, extra: &[&str]) -> Result<Vec<Kvd>> {
    let ports = free_ports(3);
    (0..3)
        .map(|i| {
            let mut flags = node_flags(i, |j| format!("http://127.0.0.1:{}", ports[j]));
            flags.extend(extra.iter().map(|s| s.to_string()));
            start_node(dir, i, ports[i], &flags)
        })
        .collect()
}

/// Three kvd nodes with data dirs `dir/n0` .. `dir/n2`; node i reaches node
/// j through `links[i][j]`.
pub struct Cluster {
    pub nodes: Vec<Kvd>,
    pub links: Vec<Vec<Option<LinkProxy>>>,
    /// Holds the nodes' data dirs and logs.
    pub dir: PathBuf,
    /// The temp dir `dir` is, when the cluster made its own; removed last.
    tmp: Option<TempDir>,
}

impl Cluster {
    /// `mode` is `masterless` or `primary-secondary` (n0 bootstraps as
    /// primary); `extra(i)` adds flags for node i. In a temp dir of its own;
    /// panics if a node does not start.
    pub fn start(mode: &str, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        Cluster::start_with(|i| {
            let mut flags = vec!["--mode".to_string(), mode.to_string()];
            flags.extend(extra(i));
            flags
        })
    }

    /// [`Cluster::start`] without a `--mode` flag: node i gets `flags(i)`
    /// besides its id, peers and role.
    pub fn start_with(flags: impl Fn(usize) -> Vec<String>) -> Cluster {
        let tmp = TempDir::new().expect("creating the cluster's temp dir");
        let mut c = Cluster::start_in(tmp.path(), flags)
            .unwrap_or_else(|e| panic!("the cluster failed to start: {e:#}"));
        c.tmp = Some(tmp);
        c
    }

    /// A cluster in `dir` (created if missing), node i with `flags(i)`
    /// besides its id, peers and role.
    pub fn start_in(dir: &Path, flags: impl Fn(usize) -> Vec<String>) -> Result<Cluster> {
        // Each node's log goes beside its data dir.
        std::fs::create_dir_all(dir)?;
        let ports = free_ports(3);
        let mut links: Vec<Vec<Option<LinkProxy>>> = Vec::new();
        for i in 0..3 {
            let row = (0..3)
                .map(|j| (i != j).then(|| LinkProxy::start(ports[j])).transpose())
                .collect::<Result<_>>()?;
            links.push(row);
        }
        let nodes = (0..3)
            .map(|i| {
                let mut all = node_flags(i, |j| link(&links, i, j).url());
                all.extend(flags(i));
                start_node(dir, i, ports[i], &all)
            })
            .collect::<Result<_>>()?;
        Ok(Cluster {
            nodes,
            links,
            dir: dir.to_path_buf(),
            tmp: None,
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// The proxy that carries node `i`'s connections to node `j`.
    pub fn link(&self, i: usize, j: usize) -> &LinkProxy {
        link(&self.links, i, j)
    }

    /// Cuts node `i` off from the other two, both directions.
    pub fn isolate(&self, i: usize) {
        for j in 0..3 {
            if j != i {
                self.link(i, j).cut();
                self.link(j, i).cut();
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

fn link(links: &[Vec<Option<LinkProxy>>], i: usize, j: usize) -> &LinkProxy {
    links[i][j]
        .as_ref()
        .unwrap_or_else(|| panic!("no link from n{i} to itself"))
}

/// After the primary died: promotes one of the nodes on `ports` through
/// `/promote_to_primary`, the most up-to-date first (by `last_index`, as
/// kvsup would), trying again while the refusals are the ones a moment
/// of lag or a slow vote explains (`behind_peer`, `no_majority`,
/// `not_enough_votes`), until `timeout`. Returns the position in `ports`
/// of the node that became primary.
pub fn promote_survivor(ports: &[u16], timeout: std::time::Duration) -> Result<usize> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + timeout;
    let mut refusals = Vec::new();
    loop {
        let mut order: Vec<(u64, usize)> = ports
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let last = crate::http_get(p, "/v1/status", Duration::from_secs(5))
                    .ok()
                    .and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|s| s["last_index"].as_u64())
                    .unwrap_or(0);
                (last, i)
            })
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        for (_, i) in order {
            let answer = crate::http_post_json(
                ports[i],
                "/promote_to_primary",
                &serde_json::json!({}),
                Duration::from_secs(10),
            );
            let (code, body) = match answer {
                Ok(a) => a,
                Err(e) => {
                    refusals.push(format!("{e:#}"));
                    continue;
                }
            };
            if code == 200 {
                return Ok(i);
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let why = v["error"]["code"].as_str().unwrap_or_default().to_string();
            if !["behind_peer", "no_majority", "not_enough_votes"].contains(&why.as_str()) {
                anyhow::bail!("promotion refused for good: {code} {v}");
            }
            refusals.push(why);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("nobody could be promoted in {timeout:?}: {refusals:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
