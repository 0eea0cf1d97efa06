//! The cluster manifest (DESIGN §8): typed, validated, with errors that name
//! the field and the line.
//!
//! Parsing is strict: an unknown field anywhere is an error (a typo such as
//! `intervalMS` must not silently fall back to a default), and so is a value
//! of the wrong type. Checks that need the whole document (duplicate ports,
//! a node list that is empty) run after parsing and point at the line of the
//! offending value.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "kvstore/v1";
pub const KIND: &str = "Cluster";

/// Largest manifest file read; a manifest is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

/// `spec.mode`: the same type `kvclient::admin::switch_mode` takes.
pub use kvclient::admin::Mode;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Pass `--index` to every node (full-text and similarity search).
    #[serde(default)]
    pub index: bool,
    /// Node data, logs, the daemon's pid file and log. Relative paths are
    /// resolved against the directory `kvsup apply` ran in.
    pub state_dir: PathBuf,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default)]
    pub supervisor: Supervisor,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Extra flags for every kvd (e.g. `--sync-replicas`, `--write-quorum`).
    /// Flags that kvsup sets itself are refused.
    #[serde(default)]
    pub kvd_args: Vec<String>,
}

fn default_mode() -> Mode {
    Mode::PrimarySecondary
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Consecutive failed checks after which a node counts as failed (a
    /// process that exited counts as failed at once).
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// Timeout of one check; default max(intervalMs, 500).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn default_interval() -> u64 {
    200
}
fn default_threshold() -> u32 {
    3
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval_ms: default_interval(),
            failure_threshold: default_threshold(),
            timeout_ms: None,
        }
    }
}

impl HealthCheck {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(self.interval_ms.max(500))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supervisor {
    #[serde(default = "default_sup_port")]
    pub port: u16,
}

fn default_sup_port() -> u16 {
    8700
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            port: default_sup_port(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestartPolicy {
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

fn default_backoff_initial() -> u64 {
    100
}
fn default_backoff_max() -> u64 {
    5_000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial_ms: default_backoff_initial(),
            backoff_max_ms: default_backoff_max(),
        }
    }
}

/// Flags kvsup sets on every kvd itself; `kvdArgs` may not override them.
const RESERVED_FLAGS: &[&str] = &[
    "--port",
    "--bind",
    "--data-dir",
    "--node-id",
    "--peers",
    "--role",
    "--mode",
    "--advertise-url",
    "--index",
];

/// A manifest that failed to parse or validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ManifestError {
    pub file: String,
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `spec.nodes[1].port`.
    pub field: String,
    pub message: String,
}

impl Manifest {
    /// Reads, parses and validates a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let err = |message: String| ManifestError {
            file: file.clone(),
            line: None,
            field: "(file)".into(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(err(format!(
                "{} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit for a manifest",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        Manifest::parse(&text, &file)
    }

    /// Parses and validates manifest text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            let full = e.to_string();
            // serde_yaml_ng says "spec.nodes[0]: unknown field `x`, ... at line
            // N column M"; split off the path and the position, which we
            // print in our own format.
            let msg = match full.rfind(" at line ") {
                Some(i) => full[..i].to_string(),
                None => full,
            };
            let (field, message) = match msg.split_once(": ") {
                Some((f, rest)) if !f.contains(' ') => (f.to_string(), rest.to_string()),
                _ => ("(document)".to_string(), msg),
            };
            ManifestError {
                file: file.to_string(),
                line,
                field,
                message,
            }
        })?;
        m.validate(text, file)?;
        Ok(m)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ManifestError> {
        let fail = |field: &str, key: &str, value: &str, nth: usize, message: String| {
            Err(ManifestError {
                file: file.to_string(),
                line: find_line(text, key, value, nth),
                field: field.to_string(),
                message,
            })
        };
        if self.api_version != API_VERSION {
            return fail(
                "apiVersion",
                "apiVersion",
                &self.api_version,
                0,
                format!("must be {API_VERSION:?}, not {:?}", self.api_version),
            );
        }
        if self.kind != KIND {
            return fail(
                "kind",
                "kind",
                &self.kind,
                0,
                format!("must be {KIND:?}, not {:?}", self.kind),
            );
        }
        if let Err(why) = check_name(&self.metadata.name) {
            return fail("metadata.name", "name", &self.metadata.name, 0, why);
        }
        let s = &self.spec;
        if s.state_dir.as_os_str().is_empty() {
            return fail(
                "spec.stateDir",
                "stateDir",
                "",
                0,
                "must not be empty".into(),
            );
        }
        if s.nodes.is_empty() {
            return fail(
                "spec.nodes",
                "nodes",
                "",
                0,
                "at least one node is required".into(),
            );
        }
        if s.nodes.len() > 7 {
            return fail(
                "spec.nodes",
                "nodes",
                "",
                0,
                format!("{} nodes; kvsup runs at most 7", s.nodes.len()),
            );
        }
        let mut names = HashSet::new();
        let mut ports = HashSet::new();
        for (i, n) in s.nodes.iter().enumerate() {
            if let Err(why) = check_name(&n.name) {
                return fail(&format!("spec.nodes[{i}].name"), "name", &n.name, 0, why);
            }
            if !names.insert(n.name.as_str()) {
                return fail(
                    &format!("spec.nodes[{i}].name"),
                    "name",
                    &n.name,
                    1,
                    format!("duplicate node name {:?}", n.name),
                );
            }
            let port = n.port.to_string();
            if n.port == 0 {
                return fail(
                    &format!("spec.nodes[{i}].port"),
                    "port",
                    &port,
                    0,
                    "must be 1..=65535".into(),
                );
            }
            if !ports.insert(n.port) {
                return fail(
                    &format!("spec.nodes[{i}].port"),
                    "port",
                    &port,
                    1,
                    format!("duplicate port {}", n.port),
                );
            }
        }
        if ports.contains(&s.supervisor.port) || s.supervisor.port == 0 {
            let port = s.supervisor.port.to_string();
            return fail(
                "spec.supervisor.port",
                "port",
                &port,
                if s.supervisor.port == 0 { 0 } else { 1 },
                format!(
                    "{} is not usable for the supervisor (0, or a node's port)",
                    s.supervisor.port
                ),
            );
        }
        let hc = &s.health_check;
        if !(10..=60_000).contains(&hc.interval_ms) {
            return fail(
                "spec.healthCheck.intervalMs",
                "intervalMs",
                &hc.interval_ms.to_string(),
                0,
                "must be 10..=60000".into(),
            );
        }
        if !(1..=100).contains(&hc.failure_threshold) {
            return fail(
                "spec.healthCheck.failureThreshold",
                "failureThreshold",
                &hc.failure_threshold.to_string(),
                0,
                "must be 1..=100".into(),
            );
        }
        if let Some(t) = hc.timeout_ms {
            if !(10..=60_000).contains(&t) {
                return fail(
                    "spec.healthCheck.timeoutMs",
                    "timeoutMs",
                    &t.to_string(),
                    0,
                    "must be 10..=60000".into(),
                );
            }
        }
        let r = &s.restart;
        if r.backoff_initial_ms == 0 || r.backoff_max_ms < r.backoff_initial_ms {
            return fail(
                "spec.restart",
                "restart",
                "",
                0,
                "need 0 < backoffInitialMs <= backoffMaxMs".into(),
            );
        }
        for a in &s.kvd_args {
            let flag = a.split('=').next().unwrap_or(a);
            if RESERVED_FLAGS.contains(&flag) {
                return fail(
                    "spec.kvdArgs",
                    "kvdArgs",
                    "",
                    0,
                    format!("{flag} is set by kvsup from the manifest and may not be given here"),
                );
            }
        }
        Ok(())
    }

    /// `stateDir` made absolute against `base` (the directory `kvsup apply` ran in).
    pub fn state_dir(&self, base: &Path) -> PathBuf {
        if self.spec.state_dir.is_absolute() {
            self.spec.state_dir.clone()
        } else {
            base.join(&self.spec.state_dir)
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.spec.nodes.iter().find(|n| n.name == name)
    }

    /// What applying `new` over `self` (the running manifest) changes, one
    /// human line each; `Err` lists changes a running cluster cannot take.
    pub fn diff(&self, new: &Manifest) -> Result<Vec<String>, String> {
        let (a, b) = (&self.spec, &new.spec);
        let mut refused = Vec::new();
        if self.metadata.name != new.metadata.name {
            refused.push(format!(
                "metadata.name {:?} -> {:?}: this supervisor runs cluster {:?}",
                self.metadata.name, new.metadata.name, self.metadata.name
            ));
        }
        if a.nodes != b.nodes {
            refused.push(
                "spec.nodes: changing the node set of a running cluster is not supported \
                 (kvsup down, then apply)"
                    .to_string(),
            );
        }
        if a.state_dir != b.state_dir {
            refused.push("spec.stateDir: cannot change on a running cluster".into());
        }
        if a.supervisor != b.supervisor {
            refused.push("spec.supervisor.port: cannot change on a running cluster".into());
        }
        if a.index != b.index || a.kvd_args != b.kvd_args {
            refused.push(
                "spec.index / spec.kvdArgs: node flags of a running cluster cannot change \
                 (kvsup down, then apply)"
                    .into(),
            );
        }
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        let mut changes = Vec::new();
        if a.mode != b.mode {
            changes.push(format!(
                "spec.mode: {} -> {} (live mode switch)",
                a.mode.as_str(),
                b.mode.as_str()
            ));
        }
        if a.health_check != b.health_check {
            changes.push(format!(
                "spec.healthCheck: {:?} -> {:?}",
                a.health_check, b.health_check
            ));
        }
        if a.restart != b.restart {
            changes.push(format!("spec.restart: {:?} -> {:?}", a.restart, b.restart));
        }
        Ok(changes)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
        ))
    }
}

/// 1-based line of the `nth` (0-based) occurrence of `key: value` in block
/// or flow style; with an empty `value`, of `key:`. Best effort: `None`
/// when the text is laid out in a way this does not recognise.
fn find_line(text: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(pos) = rest.find(key) {
            let before_ok = pos == 0
                || !rest.as_bytes()[pos - 1].is_ascii_alphanumeric()
                    && rest.as_bytes()[pos - 1] != b'_';
            let after = &rest[pos + key.len()..];
            rest = after;
            let Some(after) = after.trim_start().strip_prefix(':') else {
                continue;
            };
            if !before_ok {
                continue;
            }
            let v = after
                .trim_start()
                .trim_start_matches(['"', '\''])
                .split([',', '}', '"', '\'', ' ', '#'])
                .next()
                .unwrap_or("");
            if value.is_empty() || v == value {
                if seen == nth {
                    return Some(i + 1);
                }
                seen += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: kvstore/v1
kind: Cluster
metadata: {name: demo}
spec:
  mode: primary-secondary
  stateDir: .kvsup/demo
  nodes:
    - {name: n0, port: 8765}
    - {name: n1, port: 8766}
    - {name: n2, port: 8767}
  healthCheck: {intervalMs: 200, failureThreshold: 3}
  supervisor: {port: 8700}
";

    #[test]
    fn parses_the_design_example() {
        let m = Manifest::parse(GOOD, "m.yaml").unwrap();
        assert_eq!(m.spec.nodes.len(), 3);
        assert_eq!(m.spec.health_check.interval_ms, 200);
        assert_eq!(m.spec.supervisor.port, 8700);
        assert_eq!(m.spec.mode, Mode::PrimarySecondary);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let bad = GOOD.replace("failureThreshold: 3", "failureTreshold: 3");
        let e = Manifest::parse(&bad, "m.yaml").unwrap_err();
        assert_eq!(e.line, Some(11), "{e}");
        assert!(e.message.contains("failureTreshold"), "{e}");
        assert!(e.field.contains("healthCheck"), "{e}");
    }

    #[test]
    fn duplicate_port_points_at_the_second_one() {
        let bad = GOOD.replace("port: 8767", "port: 8766");
        let e = Manifest::parse(&bad, "m.yaml").unwrap_err();
        assert_eq!(e.field, "spec.nodes[2].port", "{e}");
        assert_eq!(e.line, Some(10), "{e}");
    }

    #[test]
    fn wrong_kind_missing_nodes_and_bad_values() {
        let e = Manifest::parse(&GOOD.replace("kind: Cluster", "kind: Pod"), "m").unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("kind", Some(2)), "{e}");
        let no_nodes = GOOD
            .lines()
            .filter(|l| !l.contains("{name: n") && !l.contains("nodes:"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = Manifest::parse(&no_nodes, "m").unwrap_err();
        assert!(e.message.contains("nodes"), "{e}");
        let e = Manifest::parse(&GOOD.replace("mode: primary-secondary", "mode: raft"), "m")
            .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let e = Manifest::parse(&GOOD.replace("port: 8766", "port: 99999"), "m").unwrap_err();
        assert_eq!(e.line, Some(9), "{e}");
    }

    #[test]
    fn diff_refuses_node_changes_and_lists_live_ones() {
        let a = Manifest::parse(GOOD, "m").unwrap();
        let b = Manifest::parse(&GOOD.replace("intervalMs: 200", "intervalMs: 500"), "m").unwrap();
        assert_eq!(a.diff(&a).unwrap(), Vec::<String>::new());
        assert_eq!(a.diff(&b).unwrap().len(), 1);
        let c = Manifest::parse(&GOOD.replace("port: 8767", "port: 8768"), "m").unwrap();
        assert!(a.diff(&c).is_err());
    }
}
