//! systemd units for a manifest: one per `runtime: external` node, which
//! runs kvd on that node's host, and one for the supervisor, which runs
//! `kvsup apply --foreground` on its host. Pure: manifest and paths in,
//! unit text out.

use std::path::{Path, PathBuf};

use crate::creds::Layout;
use crate::launch::{self, Start};
use crate::manifest::{Manifest, NodeSpec};

/// Where things are, as absolute paths on the hosts the units run on.
#[derive(Debug, Clone)]
pub struct Paths {
    pub kvd: PathBuf,
    pub kvsup: PathBuf,
    /// The manifest file kvsup's unit applies.
    pub manifest: PathBuf,
    /// `spec.stateDir` resolved against `base_dir`.
    pub state_dir: PathBuf,
    /// Where relative paths of the manifest resolve: kvsup's working
    /// directory, so that it resolves `stateDir` as the render did.
    pub base_dir: PathBuf,
}

/// A unit file: its name and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub text: String,
}

/// The soft and hard `RLIMIT_NOFILE` of a kvd unit. kvd fits its
/// connection pools into the soft limit at start (its default of 1024
/// client connections and the reserve need more than systemd's default
/// soft limit of 1024).
pub const NOFILE: u32 = 65_536;

/// Every unit of `m`: the external nodes' in manifest order, then the
/// supervisor's. A manifest with no external node has nothing for systemd
/// to run but kvsup itself, which `kvsup apply` already does: refused.
pub fn units(m: &Manifest, p: &Paths) -> Result<Vec<Unit>, String> {
    let external: Vec<&NodeSpec> = m.spec.nodes.iter().filter(|n| n.external()).collect();
    if external.is_empty() {
        return Err(format!(
            "cluster {} has no node with runtime: external, so there is no unit to render: add \
             `runtime: external` (and the host's `address`) to each node systemd runs",
            m.metadata.name
        ));
    }
    let mut out: Vec<Unit> = external.iter().map(|n| node_unit(m, n, p)).collect();
    out.push(supervisor_unit(m, p));
    Ok(out)
}

/// The unit's name for node `node` of cluster `cluster`.
pub fn node_unit_name(cluster: &str, node: &str) -> String {
    format!("kvstore-{cluster}-{node}.service")
}

pub fn supervisor_unit_name(cluster: &str) -> String {
    format!("kvsup-{cluster}.service")
}

/// kvd for `node`, with the one command line of [`launch::kvd_args`]. Always
/// [`Start::Join`]: a unit starts the same way at every boot, and a
/// `--role primary` there would let a restarted node claim to lead; kvsup
/// elects the first primary of a fresh cluster instead.
fn node_unit(m: &Manifest, node: &NodeSpec, p: &Paths) -> Unit {
    let data_dir = launch::data_dir(&p.state_dir, &node.name);
    let layout = m
        .spec
        .tls_auto()
        .then(|| Layout::in_state_dir(&p.state_dir));
    let mut argv = vec![p.kvd.display().to_string()];
    argv.extend(launch::kvd_args(
        m,
        node,
        &data_dir,
        Start::Join,
        layout.as_ref(),
    ));
    let cluster = &m.metadata.name;
    let text = format!(
        "[Unit]\n\
         Description=kvstore node {name} of cluster {cluster} ({url})\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={exec}\n\
         Restart=always\n\
         RestartSec=1\n\
         # kvd finishes in-flight requests on SIGTERM; a WAL is fsync'd per write.\n\
         TimeoutStopSec=30\n\
         LimitNOFILE={NOFILE}\n\
         {hardening}\
         ReadWritePaths={rw}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        name = node.name,
        url = node.url(m.spec.tls_auto()),
        exec = exec_line(&argv),
        hardening = HARDENING,
        rw = read_write(&data_dir),
    );
    Unit {
        name: node_unit_name(cluster, &node.name),
        text,
    }
}

/// Hardening that kvd and kvsup keep working under: they need the network,
/// their own files, fsync and flock, nothing privileged. `ProtectSystem=full`
/// (not `strict`) leaves the rest of the disk writable, so a state dir
/// anywhere outside `/usr`, `/boot` and `/etc` works; no `ProtectHome`, as a
/// state dir may live in a home directory; no `PrivateTmp`, which would
/// hide a state dir under `/tmp` (kvd uses no temporary files).
const HARDENING: &str = "NoNewPrivileges=yes\n\
                         ProtectSystem=full\n\
                         ProtectKernelTunables=yes\n\
                         ProtectKernelModules=yes\n\
                         ProtectControlGroups=yes\n\
                         RestrictSUIDSGID=yes\n\
                         LockPersonality=yes\n";

/// The supervisor: `kvsup apply --foreground` on the manifest, in the
/// directory the render resolved `stateDir` against. It writes its admin
/// token and pid file to the state dir and logs to the journal.
fn supervisor_unit(m: &Manifest, p: &Paths) -> Unit {
    let argv: Vec<String> = vec![
        p.kvsup.display().to_string(),
        "apply".into(),
        "--foreground".into(),
        "-f".into(),
        p.manifest.display().to_string(),
        "--kvd".into(),
        p.kvd.display().to_string(),
    ];
    let cluster = &m.metadata.name;
    let after: Vec<String> = m
        .spec
        .nodes
        .iter()
        .filter(|n| n.external())
        .map(|n| node_unit_name(cluster, &n.name))
        .collect();
    let text = format!(
        "[Unit]\n\
         Description=kvstore supervisor of cluster {cluster} (API on 127.0.0.1:{port})\n\
         After=network-online.target {after}\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         WorkingDirectory={wd}\n\
         ExecStart={exec}\n\
         # Nodes kvsup runs itself (runtime: process) outlive a restart of the\n\
         # daemon, which adopts them, as outside systemd.\n\
         KillMode=process\n\
         Restart=always\n\
         RestartSec=1\n\
         {hardening}\
         ReadWritePaths={rw}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        port = m.spec.supervisor.port,
        after = after.join(" "),
        wd = quote(&p.base_dir.display().to_string()),
        exec = exec_line(&argv),
        hardening = HARDENING,
        rw = read_write(&p.state_dir),
    );
    Unit {
        name: supervisor_unit_name(cluster),
        text,
    }
}

/// A `ReadWritePaths=` entry that a missing directory does not fail (the
/// `-` prefix): on a node's first start kvd makes its data dir itself.
fn read_write(dir: &Path) -> String {
    quote(&format!("-{}", dir.display()))
}

/// A command line as systemd reads `ExecStart=`: arguments separated by
/// spaces, each quoted only when it must be.
pub fn exec_line(argv: &[String]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// One argument by systemd's rules: as is when it holds nothing systemd
/// would read specially, else in double quotes with `\` and `"` escaped by
/// a backslash, control characters as C escapes, and `$` and `%` (variable
/// expansion and specifiers, both done inside quotes too) doubled.
pub fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg != ";"
        && arg
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"\"'\\$%".contains(c));
    if plain {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("$$"),
            '%' => out.push_str("%%"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What each host needs of a `tls: auto` cluster's credentials: for each
/// external node (name, host), its certificate and key, the CA certificate
/// and the token file, at the same paths as here. kvsup's host needs the
/// whole directory (the daemon checks the whole set when it loads it).
pub fn host_files(m: &Manifest, state_dir: &Path) -> Vec<(String, String, Vec<PathBuf>)> {
    let l = Layout::in_state_dir(state_dir);
    m.spec
        .nodes
        .iter()
        .filter(|n| n.external())
        .map(|n| {
            let files = vec![l.cert(&n.name), l.key(&n.name), l.ca(), l.tokens()];
            (n.name.clone(), n.host().to_string(), files)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        let text = format!(
            "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {{name: t}}\nspec:\n  \
             stateDir: /srv/kv/t\n  nodes:\n    \
             - {{name: a, port: 7001, address: 10.9.0.1, runtime: external}}\n    \
             - {{name: b, port: 7001, address: 10.9.0.2, runtime: external}}\n    \
             - {{name: c, port: 7001, address: 10.9.0.3}}\n{extra}"
        );
        Manifest::parse(&text, "m").unwrap()
    }

    fn paths() -> Paths {
        Paths {
            kvd: "/opt/kv/bin/kvd".into(),
            kvsup: "/opt/kv/bin/kvsup".into(),
            manifest: "/etc/kv/t.yaml".into(),
            state_dir: "/srv/kv/t".into(),
            base_dir: "/".into(),
        }
    }

    fn line<'a>(unit: &'a Unit, key: &str) -> &'a str {
        unit.text
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap_or_else(|| panic!("{key} not in\n{}", unit.text))
    }

    #[test]
    fn each_external_node_gets_a_unit_running_its_kvd_line_as_a_secondary() {
        let m = manifest("  tls: auto\n  kvdArgs: [\"--sync-replicas=1\"]\n");
        let u = units(&m, &paths()).unwrap();
        let names: Vec<&str> = u.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "kvstore-t-a.service",
                "kvstore-t-b.service",
                "kvsup-t.service"
            ]
        );
        let layout = Layout::in_state_dir(Path::new("/srv/kv/t"));
        let data = launch::data_dir(Path::new("/srv/kv/t"), "a");
        let args = launch::kvd_args(&m, &m.spec.nodes[0], &data, Start::Join, Some(&layout));
        assert_eq!(
            line(&u[0], "ExecStart"),
            format!("/opt/kv/bin/kvd {}", args.join(" "))
        );
        assert!(line(&u[0], "ExecStart").contains("--role secondary"));
        assert!(!u.iter().any(|u| u.text.contains("--role primary")));
        assert_eq!(line(&u[0], "ReadWritePaths"), "-/srv/kv/t/a/data");
        assert_eq!(line(&u[0], "Restart"), "always");
        assert_eq!(line(&u[0], "LimitNOFILE"), "65536");
        assert_eq!(line(&u[0], "WantedBy"), "multi-user.target");
        assert_eq!(
            line(&u[2], "ExecStart"),
            "/opt/kv/bin/kvsup apply --foreground -f /etc/kv/t.yaml --kvd /opt/kv/bin/kvd"
        );
        assert!(line(&u[2], "After").contains("kvstore-t-b.service"));
        assert_eq!(line(&u[2], "KillMode"), "process");
    }

    #[test]
    fn a_manifest_without_an_external_node_is_refused() {
        let mut m = manifest("  tls: auto\n");
        for n in &mut m.spec.nodes {
            n.runtime = Default::default();
        }
        let e = units(&m, &paths()).unwrap_err();
        assert!(e.contains("runtime: external"), "{e}");
    }

    #[test]
    fn arguments_are_quoted_only_when_systemd_would_read_them_specially() {
        assert_eq!(quote("--port"), "--port");
        assert_eq!(quote("/srv/kv/a/data"), "/srv/kv/a/data");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote(";"), "\";\"");
        assert_eq!(quote("50%"), "\"50%%\"");
        assert_eq!(quote("$HOME"), "\"$$HOME\"");
        assert_eq!(quote("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(quote("it's"), "\"it's\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn each_host_is_told_its_own_key_and_the_shared_files() {
        let m = manifest("  tls: auto\n");
        let f = host_files(&m, Path::new("/srv/kv/t"));
        assert_eq!(f.len(), 2);
        assert_eq!((f[1].0.as_str(), f[1].1.as_str()), ("b", "10.9.0.2"));
        let names: Vec<String> = f[1].2.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "/srv/kv/t/creds/b.pem",
                "/srv/kv/t/creds/b.key",
                "/srv/kv/t/creds/ca.pem",
                "/srv/kv/t/creds/tokens.json"
            ]
        );
    }
}
