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
                Start::Join => "secondary",
            };
            args.push("--role".into());
            args.push(role.into());
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
    }
}
