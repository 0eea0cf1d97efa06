//! The `kvsup status --json` document: the cluster's conditions and one row
//! per node, from what the health checks last saw.

use std::sync::atomic::Ordering;

use kvproto::status::{Peers, Status};
use serde_json::{json, Value};

use super::{Node, Sup};
use crate::election::{self, NodeView};
use crate::manifest::Mode;

/// How far each node is behind, from the statuses the nodes reported.
struct Lags {
    mode: Mode,
    /// The primary's status (primary/secondary): its peers' lag.
    primary_status: Option<Status>,
    /// Every node's status (masterless: each reports its peers' lag).
    statuses: Vec<Status>,
}

impl Lags {
    /// The lag of the node at `url` (`is_primary`: the leader, 0 behind).
    fn of(&self, url: &str, is_primary: bool) -> Option<u64> {
        match self.mode {
            // How far it is behind the most any other node has to send it.
            Mode::Masterless => self
                .statuses
                .iter()
                .filter_map(|s| s.masterless.as_ref())
                .flat_map(|m| &m.peers)
                .filter(|p| p.url == url)
                .map(|p| p.lag_entries)
                .max(),
            Mode::PrimarySecondary if is_primary => Some(0),
            Mode::PrimarySecondary => match &self.primary_status.as_ref()?.peers {
                Peers::Replication(peers) => {
                    peers.iter().find(|p| p.url == url).map(|p| p.lag_entries)
                }
                Peers::Masterless(_) => None,
            },
            Mode::Single => None,
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
                .nodes()
                .iter()
                .filter_map(|n| n.health.lock().status.clone())
                .collect(),
        };
        let nodes: Vec<Value> = self
            .nodes()
            .iter()
            .map(|n| {
                let is_primary = primary.as_deref() == Some(&n.name);
                let mut row = node_row(n, lags.of(&n.url, is_primary));
                row["generation"] = self.rollouts.runs(&n.name).number.into();
                row
            })
            .collect();
        let all_healthy = views.iter().all(NodeView::healthy);
        let failover = self.failover_in_progress.load(Ordering::Acquire);
        let switching = self.switching.load(Ordering::Acquire);
        let has_leader = match m.spec.mode {
            Mode::PrimarySecondary if self.nodes.read().len() > 1 => primary.is_some(),
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
            "config": lags.primary_status.as_ref().and_then(|s| s.config.as_ref()),
            "nodes": nodes,
            "tls": self.creds.as_ref().map(|c| c.layout().describe()),
            "generation": self.rollouts.target().number,
            "change": self.change_json(),
        })
    }
}

/// One node's row: its process, its last check, and what its status said.
fn node_row(n: &Node, lag: Option<u64>) -> Value {
    let r = n.run.lock();
    let h = n.health.lock();
    let st = h.status.as_ref();
    let role = match (h.ok, st) {
        (true, Some(s)) => json!(s.role),
        (true, None) => Value::Null,
        (false, _) => json!("down"),
    };
    json!({
        "name": n.name,
        "url": n.url,
        "pid": r.pid,
        "runtime": if n.external { "external" } else { "process" },
        "running": r.running,
        "role": role,
        "mode": st.map(|s| s.mode.map_or(kvproto::or_switching::SWITCHING, Mode::as_str)),
        "epoch": st.map(|s| s.epoch),
        "last_index": st.map(|s| s.last_index),
        "commit_index": st.map(|s| s.commit_index),
        "keys": st.map(|s| s.keys),
        "digest": st.map(|s| &s.digest),
        "lag": lag,
        "voter": st.and_then(|s| s.voter),
        "healthy": r.running && h.ok && h.ready,
        "ready": h.ready,
        "failures": h.failures,
        "restarts": n.restarts.load(Ordering::Relaxed),
        "last_exit": r.last_exit,
        "last_error": h.last_error,
        "log": n.log,
    })
}
