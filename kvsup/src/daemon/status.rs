//! The `kvsup status --json` document: the cluster's conditions and one row
//! per node, from what the health checks last saw.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{Node, Sup};
use crate::election::{self, NodeView};
use crate::manifest::Mode;

/// How far each node is behind, from the statuses the nodes reported.
struct Lags {
    mode: Mode,
    /// The primary's status (primary/secondary): its peers' lag.
    primary_status: Option<Value>,
    /// Every node's status (masterless: each reports its peers' lag).
    statuses: Vec<Value>,
}

impl Lags {
    /// The lag of the node at `url` (`is_primary`: the leader, 0 behind).
    fn of(&self, url: &str, is_primary: bool) -> Option<u64> {
        match self.mode {
            // How far it is behind the most any other node has to send it.
            Mode::Masterless => self
                .statuses
                .iter()
                .filter_map(|s| s.pointer("/masterless/peers")?.as_array())
                .flatten()
                .filter(|p| p.get("url").and_then(Value::as_str) == Some(url))
                .filter_map(|p| p.get("lag_entries").and_then(Value::as_u64))
                .max(),
            Mode::PrimarySecondary if is_primary => Some(0),
            Mode::PrimarySecondary => self
                .primary_status
                .as_ref()?
                .get("peers")?
                .as_array()?
                .iter()
                .find(|p| p.get("url").and_then(Value::as_str) == Some(url))?
                .get("lag_entries")?
                .as_u64(),
        }
    }
}

impl Sup {
    /// The `kvsup status --json` document.
    pub fn status(&self) -> Value {
        let m = self.manifest.read().clone();
        let views = self.views();
        let primary = if m.spec.mode == Mode::PrimarySecondary {
            election::leader(&views).map(|v| v.name.clone())
        } else {
            None
        };
        let lags = Lags {
            mode: m.spec.mode,
            primary_status: primary
                .as_deref()
                .and_then(|p| self.node(p))
                .and_then(|n| n.health.lock().status.clone()),
            statuses: self
                .nodes
                .iter()
                .filter_map(|n| n.health.lock().status.clone())
                .collect(),
        };
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                let is_primary = primary.as_deref() == Some(&n.name);
                node_row(n, lags.of(&n.url, is_primary))
            })
            .collect();
        let all_healthy = views.iter().all(NodeView::healthy);
        let failover = self.failover_in_progress.load(Ordering::Acquire);
        let switching = self.switching.load(Ordering::Acquire);
        let has_leader = match m.spec.mode {
            Mode::PrimarySecondary if self.nodes.len() > 1 => primary.is_some(),
            _ => true,
        };
        let epoch = primary
            .as_deref()
            .and_then(|p| views.iter().find(|v| v.name == p))
            .map_or(0, |v| v.epoch);
        json!({
            "cluster": m.metadata.name,
            "mode": m.spec.mode.as_str(),
            "manifest": self.manifest_path(),
            "state_dir": self.state_dir,
            "supervisor_pid": std::process::id(),
            "health_check": m.spec.health_check,
            "conditions": {
                "Ready": all_healthy && has_leader && !failover && !switching,
                "Degraded": !all_healthy || !has_leader,
                "FailoverInProgress": failover,
                "ModeSwitchInProgress": switching,
            },
            "primary": primary,
            "epoch": epoch,
            "nodes": nodes,
        })
    }
}

/// One node's row: its process, its last check, and what its status said.
fn node_row(n: &Node, lag: Option<u64>) -> Value {
    let r = n.run.lock();
    let h = n.health.lock();
    let st = h.status.clone().unwrap_or(Value::Null);
    json!({
        "name": n.name,
        "url": n.url,
        "pid": r.pid,
        "running": r.running,
        "role": if h.ok { st.get("role").cloned().unwrap_or(Value::Null) } else { json!("down") },
        "mode": st.get("mode"),
        "epoch": st.get("epoch"),
        "last_index": st.get("last_index"),
        "commit_index": st.get("commit_index"),
        "keys": st.get("keys"),
        "digest": st.get("digest"),
        "lag": lag,
        "healthy": r.running && h.ok && h.ready,
        "ready": h.ready,
        "failures": h.failures,
        "restarts": n.restarts.load(Ordering::Relaxed),
        "last_exit": r.last_exit,
        "last_error": h.last_error,
        "log": n.log,
    })
}
