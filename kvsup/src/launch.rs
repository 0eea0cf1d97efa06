//! The kvd command line of a node, decided from the manifest alone: what
//! kvsup runs for a `runtime: process` node, and what `kvsup render` writes
//! into a unit or a pod for a `runtime: external` one, so that both start
//! the same kvd.

use std::path::{Path, PathBuf};

use crate::creds::Layout;
use crate::manifest::{Manifest, Mode, NodeSpec};

/// Where node `name` keeps its data, under the cluster's state dir (on the
/// node's own host for an external node).
pub fn data_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(name).join("data")
}

/// How a node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first node of a brand-new primary/secondary cluster: it leads.
    Bootstrap,
    /// Anything else: a secondary (or a masterless peer) until elected.
    Join,
    /// A node added to a running primary/secondary cluster, on a fresh
    /// data dir: a learner outside the configuration until the primary
    /// adds it (kvd's `--join`).
    Learner,
    /// A node of a primary/secondary cluster whose data was lost, started
    /// on a fresh data dir: a secondary that neither votes nor runs until
    /// it has caught up (kvd's `--rejoin`).
    Rejoin,
}

/// What decides how a node starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartFacts {
    /// The first node of a brand-new cluster kvsup runs alone.
    pub bootstraps: bool,
    /// Its data dir was lost.
    pub reseed: bool,
    /// It was added to the running cluster.
    pub joins: bool,
    pub primary_secondary: bool,
    /// Its data dir holds data now.
    pub holds_data: bool,
}

/// How a node starts. A dir that holds data is started as it is, never as
/// a fresh rejoin or join (kvsup deletes nothing: a dir put back, or
/// replaced by another with data, keeps it; kvd remembers a join).
pub fn start_kind(f: StartFacts) -> Start {
    let fresh_ps = f.primary_secondary && !f.holds_data;
    if f.bootstraps {
        Start::Bootstrap
    } else if fresh_ps && f.joins {
        Start::Learner
    } else if fresh_ps && f.reseed {
        Start::Rejoin
    } else {
        Start::Join
    }
}

/// kvd's flags for `node` of manifest `m`; `creds` is the credentials'
/// layout when the manifest says `tls: auto`.
pub fn kvd_args(
    m: &Manifest,
    node: &NodeSpec,
    data_dir: &Path,
    start: Start,
    creds: Option<&Layout>,
) -> Vec<String> {
    let tls = creds.is_some();
    let mut args = vec![
        "--port".to_string(),
        node.port.to_string(),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
        "--node-id".to_string(),
        node.name.clone(),
        "--advertise-url".to_string(),
        node.url(tls),
    ];
    if node.address.is_some() {
        args.push("--bind".into());
        args.push(node.bind().to_string());
    }
    let peers: Vec<String> = m
        .spec
        .nodes
        .iter()
        .filter(|n| n.name != node.name)
        .map(|n| n.url(tls))
        .collect();
    if !peers.is_empty() {
        args.push("--peers".into());
        args.push(peers.join(","));
        args.push("--mode".into());
        args.push(m.spec.mode.as_str().into());
        if m.spec.mode == Mode::PrimarySecondary {
            let role = match start {
                Start::Bootstrap => "primary",
                Start::Join | Start::Rejoin | Start::Learner => "secondary",
            };
            args.push("--role".into());
            args.push(role.into());
            match start {
                Start::Rejoin => args.push("--rejoin".into()),
                Start::Learner => args.push("--join".into()),
                Start::Bootstrap | Start::Join => {}
            }
        }
    }
    if m.spec.index {
        args.push("--index".into());
    }
    if let Some(l) = creds {
        args.extend(tls_args(l, &node.name));
    }
    args.extend(m.spec.kvd_args.iter().cloned());
    args
}

/// kvd's flags for node `name` of a `tls: auto` cluster: its certificate,
/// the CA for clients and peers, and the token file.
fn tls_args(l: &Layout, name: &str) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    vec![
        "--tls-cert".into(),
        path(l.cert(name)),
        "--tls-key".into(),
        path(l.key(name)),
        "--tls-client-ca".into(),
        path(l.ca()),
        "--auth-file".into(),
        path(l.tokens()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        let text = format!(
            "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {{name: t}}\nspec:\n  \
             stateDir: /srv/kv/t\n  nodes:\n    \
             - {{name: a, port: 7001, address: 10.9.0.1, runtime: external}}\n    \
             - {{name: b, port: 7001, address: 10.9.0.2}}\n{extra}"
        );
        Manifest::parse(&text, "m").unwrap()
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).map(String::as_str)
    }

    #[test]
    fn a_node_on_a_host_binds_and_advertises_its_address_and_names_its_peers() {
        let m = manifest("  tls: auto\n  kvdArgs: [\"--sync-replicas=1\"]\n");
        let layout = Layout::in_state_dir(Path::new("/srv/kv/t"));
        let a = &m.spec.nodes[0];
        let args = kvd_args(
            &m,
            a,
            &data_dir(Path::new("/srv/kv/t"), "a"),
            Start::Join,
            Some(&layout),
        );
        assert_eq!(flag(&args, "--bind"), Some("10.9.0.1"));
        assert_eq!(
            flag(&args, "--advertise-url"),
            Some("https://10.9.0.1:7001")
        );
        assert_eq!(flag(&args, "--peers"), Some("https://10.9.0.2:7001"));
        assert_eq!(flag(&args, "--role"), Some("secondary"));
        assert_eq!(flag(&args, "--data-dir"), Some("/srv/kv/t/a/data"));
        assert_eq!(flag(&args, "--tls-cert"), Some("/srv/kv/t/creds/a.pem"));
        assert_eq!(args.last().map(String::as_str), Some("--sync-replicas=1"));
    }

    fn kind(bootstraps: bool, reseed: bool, joins: bool, ps: bool, holds_data: bool) -> Start {
        start_kind(StartFacts {
            bootstraps,
            reseed,
            joins,
            primary_secondary: ps,
            holds_data,
        })
    }

    #[test]
    fn only_a_lost_data_dir_that_is_still_empty_starts_a_rejoin() {
        assert_eq!(kind(false, true, false, true, false), Start::Rejoin);
        assert_eq!(kind(false, true, false, true, true), Start::Join);
        assert_eq!(kind(false, true, false, false, false), Start::Join);
        assert_eq!(kind(false, false, false, true, false), Start::Join);
        assert_eq!(kind(true, false, false, true, false), Start::Bootstrap);
    }

    #[test]
    fn only_an_added_node_on_a_fresh_data_dir_starts_as_a_learner() {
        assert_eq!(kind(false, false, true, true, false), Start::Learner);
        // Restarted after its first start: kvd remembers the join.
        assert_eq!(kind(false, false, true, true, true), Start::Join);
        // Masterless has no configuration to join.
        assert_eq!(kind(false, false, true, false, false), Start::Join);
        // An added node whose fresh dir is lost again still only joins.
        assert_eq!(kind(false, true, true, true, false), Start::Learner);
    }

    #[test]
    fn a_learner_joins_as_a_secondary() {
        let text = "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {name: t}\nspec:\n  \
                    stateDir: /srv/kv/t\n  nodes: [{name: a, port: 7001}, {name: b, port: 7002}]\n";
        let m = Manifest::parse(text, "m").unwrap();
        let args = kvd_args(&m, &m.spec.nodes[1], Path::new("/d"), Start::Learner, None);
        assert_eq!(flag(&args, "--role"), Some("secondary"));
        assert!(args.iter().any(|a| a == "--join"));
        assert!(!args.iter().any(|a| a == "--rejoin"));
    }

    #[test]
    fn a_loopback_node_keeps_the_default_bind_and_only_a_bootstrap_leads() {
        let text = "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {name: t}\nspec:\n  \
                    stateDir: /srv/kv/t\n  nodes: [{name: a, port: 7001}, {name: b, port: 7002}]\n";
        let m = Manifest::parse(text, "m").unwrap();
        let a = &m.spec.nodes[0];
        let boot = kvd_args(&m, a, Path::new("/d"), Start::Bootstrap, None);
        assert_eq!(flag(&boot, "--bind"), None);
        assert_eq!(flag(&boot, "--role"), Some("primary"));
        assert_eq!(flag(&boot, "--peers"), Some("http://127.0.0.1:7002"));
        assert_eq!(flag(&boot, "--tls-cert"), None);
        let again = kvd_args(&m, a, Path::new("/d"), Start::Rejoin, None);
        assert_eq!(flag(&again, "--role"), Some("secondary"));
        assert!(again.iter().any(|a| a == "--rejoin"));
        assert!(!boot.iter().any(|a| a == "--rejoin"));
    }
}
