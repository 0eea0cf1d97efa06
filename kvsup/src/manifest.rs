//! The cluster manifest (docs/DESIGN.md §8): typed, validated, with errors that name
//! the field and the line.
//!
//! Parsing is strict: an unknown field anywhere is an error (a typo such as
//! `intervalMS` must not silently fall back to a default), and so is a value
//! of the wrong type. Checks that need the whole document (duplicate ports,
//! a node list that is empty) run after parsing and point at the line of the
//! offending value.

use std::collections::HashSet;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "kvstore/v1";
pub const KIND: &str = "Cluster";

/// Largest manifest file read; a manifest is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Longest restart backoff: five minutes, Kubernetes' cap for a container
/// in a crash loop. A longer one would leave a node down for good.
pub const MAX_BACKOFF_MS: u64 = 300_000;

/// A node may not be called this: the daemon's own files in `stateDir` are
/// `kvsup.pid` and `kvsup.log`, beside each node's `<name>.pid` and
/// `<name>.log`.
const RESERVED_NODE_NAME: &str = "kvsup";

/// Directories that belong to the operating system: a `stateDir` in one
/// of them is refused (kvsup writes logs, pid files and data there).
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
    "/sbin", "/sys", "/usr",
];

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

/// `spec.mode`: the one mode type kvd and `kvclient::admin::switch_mode`
/// use; a manifest names a cluster mode (`single` is refused).
pub use kvproto::Mode;

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
    /// `spec.rollout`: how a rolling change waits for each node.
    #[serde(default)]
    pub rollout: Rollout,
    /// Extra flags for every kvd (e.g. `--sync-replicas`, `--write-quorum`).
    /// Flags that kvsup sets itself are refused.
    #[serde(default)]
    pub kvd_args: Vec<String>,
    /// `auto`: kvsup makes a CA, node certificates and tokens and runs the
    /// cluster over mutual TLS with a token file (`crate::creds` is what
    /// the daemon does with it). Left out: plain HTTP, no tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// A backup file (`kvsup backup`) a new cluster is made from: while no
    /// node has ever started, the daemon verifies it and restores every
    /// node's data dir from it (`kvd restore`) before the first start.
    /// Relative to the directory `kvsup apply` ran in; read only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<PathBuf>,
    /// Scheduled backups by the daemon (`kvsup backup`'s, into `dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSchedule>,
    /// `allowed`: `kvsup chaos` may kill and stop this cluster's nodes and
    /// write its own keys (`chaos/...`) to check it. Left out: it refuses,
    /// so a production cluster is never a chaos run's target by mistake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos: Option<Chaos>,
}

/// `spec.backup`: a backup every `every` (`30s`, `15m`, `1h`, `1d`) into
/// `dir` (relative to the directory `kvsup apply` ran in), keeping the
/// newest `keep`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    pub every: String,
    pub keep: u32,
    pub dir: PathBuf,
}

impl BackupSchedule {
    /// `every` in milliseconds (checked at load).
    pub fn every_ms(&self) -> u64 {
        parse_every(&self.every).unwrap_or(3_600_000)
    }
}

/// A duration of `spec.backup.every`: a positive integer and a unit, `s`,
/// `m`, `h` or `d`; 1 s ..= 30 days.
pub fn parse_every(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 15m, 1h or 1d"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    let ms = n.saturating_mul(unit_ms);
    if !(1_000..=30 * 86_400_000).contains(&ms) {
        return Err(format!("{text:?} is outside 1s ..= 30d"));
    }
    Ok(ms)
}

/// `spec.chaos`: the one value it takes (as `spec.tls`, so that a typo is
/// an error, never a silent "allowed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chaos {
    Allowed,
}

/// `spec.tls`: the one value it takes. Off is the field left out, so that a
/// typo (`tls: on`) is an error, never a cluster without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    Auto,
}

impl Spec {
    /// `spec.tls: auto`.
    pub fn tls_auto(&self) -> bool {
        self.tls == Some(Tls::Auto)
    }

    /// `spec.chaos: allowed`.
    pub fn chaos_allowed(&self) -> bool {
        self.chaos == Some(Chaos::Allowed)
    }
}

fn default_mode() -> Mode {
    Mode::PrimarySecondary
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub port: u16,
    /// The IP or DNS name the node is reached at (its URL's host, and a
    /// name in its certificate). An IP is also what it binds; for a DNS
    /// name it binds every address (`0.0.0.0`). Left out: 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Who runs the node's process: kvsup (`process`, the default) or
    /// something else on its host (`external`: systemd, a StatefulSet),
    /// which kvsup then supervises through the node's API only.
    #[serde(default, skip_serializing_if = "Runtime::is_process")]
    pub runtime: Runtime,
}

/// `spec.nodes[].runtime`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Process,
    External,
}

impl Runtime {
    pub fn is_process(&self) -> bool {
        *self == Runtime::Process
    }
}

/// A node's host when its manifest entry names no `address`.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1";

impl NodeSpec {
    /// The host of the node's URL: its `address`, else 127.0.0.1.
    pub fn host(&self) -> &str {
        self.address.as_deref().unwrap_or(DEFAULT_ADDRESS)
    }

    /// What kvd binds: the address when it is an IP, every IPv4 address
    /// for a DNS name (which kvd cannot bind).
    pub fn bind(&self) -> IpAddr {
        self.host()
            .parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// Whether only this host can reach the node (kvd's protected mode
    /// lets such a node run without TLS and tokens).
    pub fn loopback(&self) -> bool {
        self.bind().is_loopback()
    }

    /// The node's base URL, as peers, kvsup and clients reach it.
    pub fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        match self.host().parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("{scheme}://[{ip}]:{}", self.port),
            _ => format!("{scheme}://{}:{}", self.host(), self.port),
        }
    }

    pub fn external(&self) -> bool {
        self.runtime == Runtime::External
    }
}

/// `spec.healthCheck`; a field left out takes its value from
/// [`HealthCheck::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    pub interval_ms: u64,
    /// Consecutive failed checks after which a node counts as failed (a
    /// process that exited counts as failed at once).
    pub failure_threshold: u32,
    /// Timeout of one check; default max(intervalMs, 500).
    pub timeout_ms: Option<u64>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval_ms: 200,
            failure_threshold: 3,
            timeout_ms: None,
        }
    }
}

impl HealthCheck {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(self.interval_ms.max(500))
    }
}

/// `spec.supervisor`: the daemon's loopback port (default 8700).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Supervisor {
    pub port: u16,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor { port: 8700 }
    }
}

/// `spec.restart`: how long a node that exited waits before it is
/// started again (100 ms doubling to 5 s by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RestartPolicy {
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
        }
    }
}

impl RestartPolicy {
    /// The restart delay after an exit: the initial one after a first exit
    /// or a stable run, else twice the previous one, capped at the maximum.
    pub fn next_backoff_ms(self, prev_ms: u64, stable: bool) -> u64 {
        if stable || prev_ms == 0 {
            self.backoff_initial_ms.min(self.backoff_max_ms)
        } else {
            prev_ms.saturating_mul(2).min(self.backoff_max_ms)
        }
    }
}

/// `spec.rollout`: a rolling change stops at a node that is not healthy
/// and caught up within `readyTimeoutMs` of its stop (default 60 s); a
/// node that has not exited `stopGraceMs` after SIGTERM gets SIGKILL
/// (default 10 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    pub ready_timeout_ms: u64,
    pub stop_grace_ms: u64,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            ready_timeout_ms: 60_000,
            stop_grace_ms: 10_000,
        }
    }
}

/// When a node whose backoff is `backoff_ms` may start again: `now +
/// backoff_ms`, held to [`MAX_BACKOFF_MS`], so that no value can overflow
/// the clock (which would panic the exit watcher and leave the node never
/// restarted).
pub fn restart_at(now: Instant, backoff_ms: u64) -> Instant {
    now + Duration::from_millis(backoff_ms.min(MAX_BACKOFF_MS))
}

/// Flags kvsup sets on every kvd itself; `kvdArgs` may not override them.
const RESERVED_FLAGS: &[&str] = &[
    "--port",
    "--bind",
    "--data-dir",
    "--node-id",
    "--peers",
    "--role",
    "--rejoin",
    "--mode",
    "--advertise-url",
    "--index",
];

/// Flags kvsup sets itself with `tls: auto` (its CA, certificates and token
/// file); without it `kvdArgs` may give them.
const TLS_FLAGS: &[&str] = &["--tls-cert", "--tls-key", "--tls-client-ca", "--auth-file"];

/// A manifest that failed to parse or validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ManifestError {
    pub file: String,
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `spec.nodes[1].port`.
    pub field: String,
    pub message: String,
    /// The message may quote the file's content (a parse or validation
    /// error), not only say why it could not be read.
    pub quotes_content: bool,
}

/// Every field name of a manifest, for [`ManifestError::redacted`].
const FIELD_NAMES: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "spec",
    "mode",
    "index",
    "stateDir",
    "nodes",
    "port",
    "address",
    "runtime",
    "healthCheck",
    "intervalMs",
    "failureThreshold",
    "timeoutMs",
    "tls",
    "supervisor",
    "restart",
    "backoffInitialMs",
    "backoffMaxMs",
    "rollout",
    "readyTimeoutMs",
    "stopGraceMs",
    "kvdArgs",
    "restoreFrom",
    "backup",
    "chaos",
    "every",
    "keep",
    "dir",
];

impl ManifestError {
    fn file_error(file: &str, message: String) -> ManifestError {
        ManifestError {
            file: file.to_string(),
            line: None,
            field: "(file)".into(),
            message,
            quotes_content: false,
        }
    }

    /// The error without anything read from the file: for a requester of
    /// the daemon's API, who may not be allowed to read it (the daemon may
    /// run as another user). The field path stays when it is made of
    /// manifest field names only.
    pub fn redacted(&self) -> String {
        if !self.quotes_content {
            return self.to_string();
        }
        let known = self.field.split('.').all(|part| {
            let name = part.split('[').next().unwrap_or(part);
            FIELD_NAMES.contains(&name)
        });
        format!(
            "{}{}: {}not a valid manifest (`kvsup apply --dry-run -f {}` says why)",
            self.file,
            self.line.map(|l| format!(":{l}")).unwrap_or_default(),
            if known {
                format!("{}: ", self.field)
            } else {
                String::new()
            },
            self.file
        )
    }
}

/// Reads the file at `path` if it is a regular file of at most
/// [`MAX_MANIFEST_BYTES`]. Anything else is refused before a byte is read:
/// `/dev/zero` never ends, and a FIFO blocks its reader until a writer
/// comes (it is opened non-blocking, so not even the open waits).
fn read_manifest_file(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err(format!("not a regular file ({})", file_type(&meta)));
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit for a manifest",
            meta.len()
        ));
    }
    let mut text = String::new();
    // Bounded even if the file grows while it is read.
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!(
            "larger than the {MAX_MANIFEST_BYTES}-byte limit for a manifest"
        ));
    }
    Ok(text)
}

fn file_type(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// `path` with `.` and `..` resolved without the file system (`..` of the
/// root is the root).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            // Not `PathBuf::pop` alone: it would drop a `..` as if it were
            // a name, and at the root leave `/..`, in which the system
            // directory check would not see `/etc` (`/../etc/kvsup`).
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether `dir` (absolute, normalized) may be a state directory: not the
/// root, not a top-level directory (`/home`, `/tmp`, `/var`: kvsup puts
/// its files directly in `stateDir`, so it needs one of its own), not
/// inside a system directory.
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    let depth = dir
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let system = SYSTEM_DIRS.iter().any(|s| dir.starts_with(s));
    if depth < 2 || system {
        return Err(format!(
            "{} is {}; kvsup writes its logs, pid files and the nodes' data there, so \
             give it a directory of its own, such as /var/lib/kvsup/<cluster>",
            dir.display(),
            if depth == 0 {
                "the root directory"
            } else if system {
                "a system directory"
            } else {
                "a top-level directory"
            }
        ));
    }
    Ok(())
}

impl Manifest {
    /// Reads, parses and validates a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let text = read_manifest_file(path).map_err(|m| ManifestError::file_error(&file, m))?;
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
                quotes_content: true,
            }
        })?;
        m.validate(text, file)?;
        Ok(m)
    }

    /// The checks that need the whole document, in the order a reader meets
    /// the fields; the first failure is the one reported.
    fn validate(&self, text: &str, file: &str) -> Result<(), ManifestError> {
        let at = Locator { text, file };
        self.check_header(&at)?;
        let s = &self.spec;
        check_mode(s.mode, &at)?;
        check_state_dir_field(&s.state_dir, &at)?;
        let ports = check_nodes(&s.nodes, &at)?;
        check_supervisor_port(s.supervisor.port, &ports, &at)?;
        check_health_check(&s.health_check, &at)?;
        check_restart(&s.restart, &at)?;
        check_rollout(&s.rollout, &at)?;
        check_kvd_args(&s.kvd_args, s.tls_auto(), &at)?;
        check_restore_from(s, &at)?;
        check_backup(s, &at)?;
        check_exposure(s, &at)
    }

    /// `apiVersion`, `kind` and `metadata.name`.
    fn check_header(&self, at: &Locator) -> Result<(), ManifestError> {
        for (key, value, want) in [
            ("apiVersion", &self.api_version, API_VERSION),
            ("kind", &self.kind, KIND),
        ] {
            if value != want {
                return Err(at.fail(
                    key,
                    key,
                    value,
                    0,
                    format!("must be {want:?}, not {value:?}"),
                ));
            }
        }
        check_name(&self.metadata.name)
            .map_err(|why| at.fail("metadata.name", "name", &self.metadata.name, 0, why))
    }

    /// `stateDir` made absolute against `base` (the directory `kvsup apply`
    /// ran in), `.` and `..` resolved.
    pub fn state_dir(&self, base: &Path) -> PathBuf {
        normalize(&base.join(&self.spec.state_dir))
    }

    /// [`Manifest::state_dir`], refused by [`check_state_dir`] also where a
    /// relative path or a symbolic link leads to the root or a system
    /// directory.
    pub fn checked_state_dir(&self, base: &Path, file: &str) -> Result<PathBuf, ManifestError> {
        let dir = self.state_dir(base);
        let real = resolve_links(&dir);
        check_state_dir(&dir)
            .and_then(|()| check_state_dir(&real))
            .map_err(|message| ManifestError {
                file: file.to_string(),
                line: None,
                field: "spec.stateDir".into(),
                message,
                quotes_content: true,
            })?;
        Ok(dir)
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.spec.nodes.iter().find(|n| n.name == name)
    }
}

/// Where a failed check points: the manifest's text (to find the line of
/// the offending value) and the file's name.
struct Locator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Locator<'_> {
    /// The error for `field`, at the line of the `nth` `key: value` of the
    /// text (see [`find_line`]).
    fn fail(
        &self,
        field: &str,
        key: &str,
        value: &str,
        nth: usize,
        message: String,
    ) -> ManifestError {
        ManifestError {
            file: self.file.to_string(),
            line: find_line(self.text, key, value, nth),
            field: field.to_string(),
            message,
            quotes_content: true,
        }
    }
}

/// A cluster runs primary/secondary or masterless: `single` is what a kvd
/// without peers is, not a mode a manifest can ask for.
fn check_mode(mode: Mode, at: &Locator) -> Result<(), ManifestError> {
    if mode.is_cluster() {
        return Ok(());
    }
    Err(at.fail(
        "spec.mode",
        "mode",
        mode.as_str(),
        0,
        format!("must be primary-secondary or masterless, not {mode}"),
    ))
}

fn check_state_dir_field(dir: &Path, at: &Locator) -> Result<(), ManifestError> {
    if dir.as_os_str().is_empty() {
        return Err(at.fail(
            "spec.stateDir",
            "stateDir",
            "",
            0,
            "must not be empty".into(),
        ));
    }
    if dir.is_absolute() {
        check_state_dir(&normalize(dir))
            .map_err(|why| at.fail("spec.stateDir", "stateDir", "", 0, why))?;
    }
    Ok(())
}

/// Most nodes a manifest may list.
const MAX_NODES: usize = 7;

/// The node list: 1 to [`MAX_NODES`] nodes, valid and distinct names,
/// valid addresses, and no two nodes on one address and port. Returns the
/// ports of the nodes on loopback (the supervisor, which binds 127.0.0.1,
/// may not take one).
fn check_nodes(nodes: &[NodeSpec], at: &Locator) -> Result<HashSet<u16>, ManifestError> {
    if nodes.is_empty() {
        return Err(at.fail(
            "spec.nodes",
            "nodes",
            "",
            0,
            "at least one node is required".into(),
        ));
    }
    if nodes.len() > MAX_NODES {
        return Err(at.fail(
            "spec.nodes",
            "nodes",
            "",
            0,
            format!("{} nodes; kvsup runs at most {MAX_NODES}", nodes.len()),
        ));
    }
    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        check_node_name(i, &n.name, &mut names, at)?;
        if let Some(a) = &n.address {
            check_address(a).map_err(|why| {
                at.fail(&format!("spec.nodes[{i}].address"), "address", a, 0, why)
            })?;
        }
        let field = format!("spec.nodes[{i}].port");
        let port = n.port.to_string();
        if n.port == 0 {
            return Err(at.fail(&field, "port", &port, 0, "must be 1..=65535".into()));
        }
        if !endpoints.insert((n.host().to_string(), n.port)) {
            return Err(at.fail(
                &field,
                "port",
                &port,
                1,
                format!("duplicate port {} on {}", n.port, n.host()),
            ));
        }
    }
    Ok(nodes
        .iter()
        .filter(|n| n.loopback())
        .map(|n| n.port)
        .collect())
}

/// An `address`: an IP, or a DNS name (RFC 1123 labels, at most 253
/// characters).
fn check_address(a: &str) -> Result<(), String> {
    if a.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if a.len() <= 253 && a.split('.').all(label_ok) {
        return Ok(());
    }
    Err(format!(
        "{a:?} is neither an IP address nor a DNS name (labels of letters, digits and '-')"
    ))
}

/// kvd's protected mode, said at apply rather than by a node that will not
/// start: a node reachable from other hosts needs `tls: auto` (TLS and
/// tokens), or `--insecure` in `kvdArgs` to run it open on purpose.
/// `restoreFrom`: a path, and only for nodes kvsup runs (it restores a
/// data dir on this host, never on an external node's).
fn check_restore_from(s: &Spec, at: &Locator) -> Result<(), ManifestError> {
    let Some(path) = &s.restore_from else {
        return Ok(());
    };
    let shown = path.display().to_string();
    if path.as_os_str().is_empty() {
        return Err(at.fail(
            "spec.restoreFrom",
            "restoreFrom",
            "",
            0,
            "must name a backup file".into(),
        ));
    }
    if let Some((i, _)) = s.nodes.iter().enumerate().find(|(_, n)| n.external()) {
        return Err(at.fail(
            "spec.restoreFrom",
            "restoreFrom",
            &shown,
            0,
            format!(
                "node {i} is external: kvsup restores only the data dirs of nodes it runs \
                 (restore an external node with kvd restore on its host)"
            ),
        ));
    }
    Ok(())
}

/// `backup`: a valid period, 1 ..= 1000 kept, a directory named.
fn check_backup(s: &Spec, at: &Locator) -> Result<(), ManifestError> {
    let Some(b) = &s.backup else {
        return Ok(());
    };
    parse_every(&b.every).map_err(|why| at.fail("spec.backup.every", "every", &b.every, 0, why))?;
    if !(1..=1000).contains(&b.keep) {
        let v = b.keep.to_string();
        return Err(at.fail("spec.backup.keep", "keep", &v, 0, "must be 1..=1000".into()));
    }
    if b.dir.as_os_str().is_empty() {
        return Err(at.fail(
            "spec.backup.dir",
            "dir",
            "",
            0,
            "must name a directory".into(),
        ));
    }
    Ok(())
}

fn check_exposure(s: &Spec, at: &Locator) -> Result<(), ManifestError> {
    let open = s.kvd_args.iter().any(|a| a == "--insecure");
    if s.tls_auto() || open {
        return Ok(());
    }
    match s.nodes.iter().enumerate().find(|(_, n)| !n.loopback()) {
        None => Ok(()),
        Some((i, n)) => Err(at.fail(
            &format!("spec.nodes[{i}].address"),
            "address",
            n.host(),
            0,
            format!(
                "{} is reachable from other hosts: set spec.tls: auto (TLS and tokens), or \
                 add --insecure to spec.kvdArgs to serve it without them",
                n.host()
            ),
        )),
    }
}

/// The name of node `i`: valid, not the daemon's own, not taken by an
/// earlier node (those are in `names`, which this one joins).
fn check_node_name<'a>(
    i: usize,
    name: &'a str,
    names: &mut HashSet<&'a str>,
    at: &Locator,
) -> Result<(), ManifestError> {
    let field = format!("spec.nodes[{i}].name");
    check_name(name).map_err(|why| at.fail(&field, "name", name, 0, why))?;
    if name == RESERVED_NODE_NAME {
        return Err(at.fail(
            &field,
            "name",
            name,
            0,
            format!(
                "{RESERVED_NODE_NAME:?} is reserved: the supervisor's own pid file and \
                 log are {RESERVED_NODE_NAME}.pid and {RESERVED_NODE_NAME}.log"
            ),
        ));
    }
    if !names.insert(name) {
        return Err(at.fail(
            &field,
            "name",
            name,
            1,
            format!("duplicate node name {name:?}"),
        ));
    }
    Ok(())
}

fn check_supervisor_port(
    port: u16,
    node_ports: &HashSet<u16>,
    at: &Locator,
) -> Result<(), ManifestError> {
    if port != 0 && !node_ports.contains(&port) {
        return Ok(());
    }
    Err(at.fail(
        "spec.supervisor.port",
        "port",
        &port.to_string(),
        // Equal to a node's port, whose `port: N` comes first in the text.
        if port == 0 { 0 } else { 1 },
        format!("{port} is not usable for the supervisor (0, or a node's port)"),
    ))
}

fn check_health_check(hc: &HealthCheck, at: &Locator) -> Result<(), ManifestError> {
    let in_range = |key: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
        if range.contains(&value) {
            return Ok(());
        }
        Err(at.fail(
            &format!("spec.healthCheck.{key}"),
            key,
            &value.to_string(),
            0,
            format!("must be {}..={}", range.start(), range.end()),
        ))
    };
    in_range("intervalMs", hc.interval_ms, 10..=60_000)?;
    in_range("failureThreshold", u64::from(hc.failure_threshold), 1..=100)?;
    match hc.timeout_ms {
        Some(t) => in_range("timeoutMs", t, 10..=60_000),
        None => Ok(()),
    }
}

fn check_restart(r: &RestartPolicy, at: &Locator) -> Result<(), ManifestError> {
    if r.backoff_initial_ms == 0
        || r.backoff_max_ms < r.backoff_initial_ms
        || r.backoff_max_ms > MAX_BACKOFF_MS
    {
        return Err(at.fail(
            "spec.restart",
            "restart",
            "",
            0,
            format!("need 0 < backoffInitialMs <= backoffMaxMs <= {MAX_BACKOFF_MS}"),
        ));
    }
    Ok(())
}

fn check_rollout(r: &Rollout, at: &Locator) -> Result<(), ManifestError> {
    for (key, value, range) in [
        ("readyTimeoutMs", r.ready_timeout_ms, 1_000..=3_600_000),
        ("stopGraceMs", r.stop_grace_ms, 100..=600_000),
    ] {
        if !range.contains(&value) {
            return Err(at.fail(
                &format!("spec.rollout.{key}"),
                key,
                &value.to_string(),
                0,
                format!("must be {}..={} (milliseconds)", range.start(), range.end()),
            ));
        }
    }
    Ok(())
}

fn check_kvd_args(args: &[String], tls: bool, at: &Locator) -> Result<(), ManifestError> {
    for a in args {
        let flag = a.split('=').next().unwrap_or(a);
        if RESERVED_FLAGS.contains(&flag) || (tls && TLS_FLAGS.contains(&flag)) {
            return Err(at.fail(
                "spec.kvdArgs",
                "kvdArgs",
                "",
                0,
                format!("{flag} is set by kvsup from the manifest and may not be given here"),
            ));
        }
    }
    Ok(())
}

/// `dir` with its longest existing ancestor's symbolic links resolved.
fn resolve_links(dir: &Path) -> PathBuf {
    for ancestor in dir.ancestors() {
        if let Ok(real) = ancestor.canonicalize() {
            let rest = dir.strip_prefix(ancestor).unwrap_or(Path::new(""));
            return normalize(&real.join(rest));
        }
    }
    dir.to_path_buf()
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
    fn chaos_takes_allowed_only() {
        assert!(!Manifest::parse(GOOD, "m").unwrap().spec.chaos_allowed());
        let m = Manifest::parse(&format!("{GOOD}  chaos: allowed\n"), "m").unwrap();
        assert!(m.spec.chaos_allowed());
        for bad in ["on", "true", "yes", "\"\""] {
            let e = Manifest::parse(&format!("{GOOD}  chaos: {bad}\n"), "m").unwrap_err();
            assert!(
                e.field.contains("chaos") && e.message.contains("allowed"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tls_takes_auto_only_and_reserves_its_flags() {
        assert!(!Manifest::parse(GOOD, "m").unwrap().spec.tls_auto());
        let auto = format!("{GOOD}  tls: auto\n");
        let m = Manifest::parse(&auto, "m").unwrap();
        assert!(m.spec.tls_auto());
        for bad in ["on", "true", "off", "\"\""] {
            let e = Manifest::parse(&format!("{GOOD}  tls: {bad}\n"), "m").unwrap_err();
            assert_eq!(e.line, Some(13), "{bad}: {e}");
            assert!(e.field.contains("tls") && e.message.contains("auto"), "{e}");
        }
        let flag = format!("{GOOD}  tls: auto\n  kvdArgs: [\"--auth-file=x\"]\n");
        let e = Manifest::parse(&flag, "m").unwrap_err();
        assert!(e.message.contains("--auth-file"), "{e}");
        let plain = format!("{GOOD}  kvdArgs: [\"--auth-file=x\"]\n");
        assert!(Manifest::parse(&plain, "m").is_ok());
    }

    #[test]
    fn restore_from_names_a_file_for_nodes_kvsup_runs() {
        let m = Manifest::parse(&format!("{GOOD}  restoreFrom: backups/b.kvbak\n"), "m").unwrap();
        assert_eq!(
            m.spec.restore_from.as_deref(),
            Some(Path::new("backups/b.kvbak"))
        );
        assert!(Manifest::parse(GOOD, "m")
            .unwrap()
            .spec
            .restore_from
            .is_none());
        let e = Manifest::parse(&format!("{GOOD}  restoreFrom: \"\"\n"), "m").unwrap_err();
        assert_eq!(e.field, "spec.restoreFrom", "{e}");
        let external = GOOD.replace(
            "{name: n0, port: 8765}",
            "{name: n0, port: 8765, runtime: external}",
        );
        let e = Manifest::parse(&format!("{external}  restoreFrom: b\n"), "m").unwrap_err();
        assert_eq!(e.field, "spec.restoreFrom", "{e}");
        assert!(e.message.contains("external"), "{e}");
    }

    #[test]
    fn a_backup_schedule_has_a_period_a_count_and_a_dir() {
        assert_eq!(parse_every("30s"), Ok(30_000));
        assert_eq!(parse_every("15m"), Ok(900_000));
        assert_eq!(parse_every("1h"), Ok(3_600_000));
        assert_eq!(parse_every("2d"), Ok(172_800_000));
        for bad in ["", "h", "1", "1w", "0s", "31d", "-1h", "1.5h"] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
        let ok = format!("{GOOD}  backup: {{every: 1h, keep: 24, dir: backups}}\n");
        let m = Manifest::parse(&ok, "m").unwrap();
        let b = m.spec.backup.unwrap();
        assert_eq!((b.every_ms(), b.keep), (3_600_000, 24));
        let e = Manifest::parse(&ok.replace("1h", "1y"), "m").unwrap_err();
        assert_eq!(e.field, "spec.backup.every", "{e}");
        let e = Manifest::parse(&ok.replace("keep: 24", "keep: 0"), "m").unwrap_err();
        assert_eq!(e.field, "spec.backup.keep", "{e}");
    }

    #[test]
    fn nodes_on_hosts_name_their_address_and_runtime() {
        let hosts = GOOD
            .replace(
                "{name: n0, port: 8765}",
                "{name: n0, port: 8765, address: 10.1.0.1, runtime: external}",
            )
            .replace(
                "{name: n1, port: 8766}",
                "{name: n1, port: 8765, address: \"fd00::7\"}",
            )
            .replace(
                "{name: n2, port: 8767}",
                "{name: n2, port: 8765, address: kv-2.kv.svc}",
            );
        let e = Manifest::parse(&hosts, "m").unwrap_err();
        assert_eq!(e.field, "spec.nodes[0].address", "{e}");
        assert!(
            e.message.contains("tls: auto") && e.message.contains("--insecure"),
            "{e}"
        );
        let m = Manifest::parse(&format!("{hosts}  tls: auto\n"), "m").unwrap();
        let n = &m.spec.nodes;
        assert!(n[0].external() && !n[1].external());
        assert_eq!(n[0].url(true), "https://10.1.0.1:8765");
        assert_eq!(n[1].url(true), "https://[fd00::7]:8765");
        assert_eq!(n[2].url(false), "http://kv-2.kv.svc:8765");
        assert_eq!(n[2].bind().to_string(), "0.0.0.0");
        let open = format!("{hosts}  kvdArgs: [\"--insecure\"]\n");
        assert!(Manifest::parse(&open, "m").is_ok());
        // One port on two hosts is fine; twice on one host is not.
        let twice = hosts.replace("address: kv-2.kv.svc", "address: 10.1.0.1");
        let e = Manifest::parse(&format!("{twice}  tls: auto\n"), "m").unwrap_err();
        assert_eq!(e.field, "spec.nodes[2].port", "{e}");
        for bad in ["-x.y", "a..b", "a_b.c", "x:80"] {
            let t = hosts.replace("kv-2.kv.svc", bad);
            let e = Manifest::parse(&format!("{t}  tls: auto\n"), "m").unwrap_err();
            assert_eq!(e.field, "spec.nodes[2].address", "{bad}: {e}");
        }
        let e = Manifest::parse(&hosts.replace("runtime: external", "runtime: systemd"), "m")
            .unwrap_err();
        assert!(e.message.contains("external"), "{e}");
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
        let e = Manifest::parse(
            &GOOD.replace("mode: primary-secondary", "mode: single"),
            "m",
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("spec.mode", Some(5)), "{e}");
        let e = Manifest::parse(&GOOD.replace("port: 8766", "port: 99999"), "m").unwrap_err();
        assert_eq!(e.line, Some(9), "{e}");
    }

    #[test]
    fn a_node_may_not_take_the_daemons_file_names() {
        let bad = GOOD.replace("name: n1,", "name: kvsup,");
        let e = Manifest::parse(&bad, "m").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("spec.nodes[1].name", Some(9)),
            "{e}"
        );
    }

    #[test]
    fn state_dirs_of_the_system_are_refused() {
        for dir in [
            "/",
            "/etc",
            "/etc/kvsup",
            "/usr/lib/x",
            "/home",
            "/tmp",
            "/proc/1",
        ] {
            let bad = GOOD.replace("stateDir: .kvsup/demo", &format!("stateDir: {dir}"));
            let e = Manifest::parse(&bad, "m").unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.line),
                ("spec.stateDir", Some(6)),
                "{dir}: {e}"
            );
        }
        for dir in [
            "/var/lib/kvsup/demo",
            "/tmp/demo",
            "/srv/kv",
            "/home/ada/kv",
        ] {
            assert_eq!(check_state_dir(Path::new(dir)), Ok(()), "{dir}");
        }
        // Relative paths are checked once resolved against where apply runs.
        let m = Manifest::parse(&GOOD.replace(".kvsup/demo", "../../.."), "m").unwrap();
        let e = m.checked_state_dir(Path::new("/srv/kv"), "m").unwrap_err();
        assert_eq!(e.field, "spec.stateDir", "{e}");
        assert!(e.message.contains("the root directory"), "{e}");
        let m = Manifest::parse(GOOD, "m").unwrap();
        assert_eq!(
            m.checked_state_dir(Path::new("/srv/kv/../kv2"), "m"),
            Ok(PathBuf::from("/srv/kv2/.kvsup/demo"))
        );
    }

    #[test]
    fn normalize_resolves_dots_without_the_file_system() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(normalize(Path::new("/a/../../..")), Path::new("/"));
        assert_eq!(normalize(Path::new("a/../../b")), Path::new("../b"));
        assert_eq!(normalize(Path::new("/a/../..")), Path::new("/"));
        assert_eq!(normalize(Path::new("/../etc/kv")), Path::new("/etc/kv"));
        assert_eq!(normalize(Path::new("../../b")), Path::new("../../b"));
    }

    #[test]
    fn restart_backoff_is_bounded() {
        let with = |r: &str| GOOD.replace("supervisor:", &format!("restart: {r}\n  supervisor:"));
        for r in [
            format!("{{backoffInitialMs: {m}, backoffMaxMs: {m}}}", m = u64::MAX),
            "{backoffMaxMs: 300001}".to_string(),
            "{backoffInitialMs: 0}".to_string(),
            "{backoffInitialMs: 600, backoffMaxMs: 500}".to_string(),
        ] {
            let e = Manifest::parse(&with(&r), "m").unwrap_err();
            assert_eq!(e.field, "spec.restart", "{r}: {e}");
        }
        let m = Manifest::parse(&with("{backoffInitialMs: 1, backoffMaxMs: 300000}"), "m");
        assert_eq!(m.unwrap().spec.restart.backoff_max_ms, MAX_BACKOFF_MS);
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::TempDir::new().unwrap();
        let big = dir.path().join("big.yaml");
        // Sparse: no need to write a megabyte.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_MANIFEST_BYTES + 1)
            .unwrap();
        let cases = [
            (dir.path().to_path_buf(), "not a regular file (a directory)"),
            (
                PathBuf::from("/dev/null"),
                "not a regular file (a character device)",
            ),
            (big, "larger than the"),
            (dir.path().join("absent.yaml"), "cannot open"),
        ];
        for (path, why) in cases {
            let e = Manifest::load(&path).unwrap_err();
            assert!(e.message.contains(why), "{}: {e}", path.display());
            assert!(!e.quotes_content, "{e}");
        }
        let ok = dir.path().join("m.yaml");
        std::fs::write(&ok, GOOD).unwrap();
        assert!(Manifest::load(&ok).is_ok());
    }

    #[test]
    fn redacted_errors_repeat_nothing_from_the_file() {
        for (text, field) in [
            ("hunter2", None),
            ("hunter2: 1", None),
            (&*GOOD.replace("kvstore/v1", "hunter2"), Some("apiVersion")),
            (
                &*GOOD.replace("kind: Cluster", "kind: hunter2"),
                Some("kind"),
            ),
            (
                &*GOOD.replace("port: 8766", "port: hunter2"),
                Some("spec.nodes[1].port"),
            ),
            (
                &*GOOD.replace("mode: primary-secondary", "mode: hunter2"),
                Some("spec.mode"),
            ),
        ] {
            let e = Manifest::parse(text, "/x/m.yaml").unwrap_err();
            assert!(
                e.to_string().contains("hunter2"),
                "the full error says why: {e}"
            );
            let r = e.redacted();
            assert!(!r.contains("hunter2"), "{r}");
            assert!(r.starts_with("/x/m.yaml"), "{r}");
            if let Some(f) = field {
                assert!(r.contains(&format!(": {f}: ")), "{r}");
            }
        }
        // What is not from the file stays.
        let e = Manifest::load(Path::new("/dev/null")).unwrap_err();
        assert_eq!(e.redacted(), e.to_string());
    }

    #[test]
    fn field_names_cover_every_field() {
        fn keys(v: &serde_yaml_ng::Value, out: &mut Vec<String>) {
            match v {
                serde_yaml_ng::Value::Mapping(m) => {
                    for (k, v) in m {
                        out.push(k.as_str().unwrap_or_default().to_string());
                        keys(v, out);
                    }
                }
                serde_yaml_ng::Value::Sequence(s) => s.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let mut m = Manifest::parse(GOOD, "m").unwrap();
        m.spec.health_check.timeout_ms = Some(500);
        m.spec.kvd_args = vec!["--sync-replicas=1".into()];
        // Every optional field set, so that each is serialized and named.
        m.spec.tls = Some(Tls::Auto);
        m.spec.chaos = Some(Chaos::Allowed);
        m.spec.restore_from = Some("b.kvbak".into());
        m.spec.backup = Some(BackupSchedule {
            every: "1h".into(),
            keep: 2,
            dir: "b".into(),
        });
        m.spec.nodes[0].address = Some("10.0.0.1".into());
        m.spec.nodes[0].runtime = Runtime::External;
        let mut all = Vec::new();
        keys(&serde_yaml_ng::to_value(&m).unwrap(), &mut all);
        for k in all {
            assert!(
                FIELD_NAMES.contains(&k.as_str()),
                "{k} is not in FIELD_NAMES"
            );
        }
    }

    #[test]
    fn restart_backoff_doubles_up_to_its_cap_and_never_overflows() {
        let policy = RestartPolicy {
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
        };
        let mut b = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            b = policy.next_backoff_ms(b, false);
            seen.push(b);
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(policy.next_backoff_ms(5_000, true), 100);
        let huge = RestartPolicy {
            backoff_initial_ms: u64::MAX,
            backoff_max_ms: u64::MAX,
        };
        assert_eq!(huge.next_backoff_ms(u64::MAX, false), u64::MAX);
        let now = Instant::now();
        let at = restart_at(now, u64::MAX);
        assert_eq!(at - now, Duration::from_millis(MAX_BACKOFF_MS));
    }

    #[test]
    fn rollout_ready_timeout_is_bounded() {
        assert_eq!(
            Manifest::parse(GOOD, "m")
                .unwrap()
                .spec
                .rollout
                .ready_timeout_ms,
            60_000
        );
        let ok = format!("{GOOD}  rollout: {{readyTimeoutMs: 5000}}\n");
        assert_eq!(
            Manifest::parse(&ok, "m")
                .unwrap()
                .spec
                .rollout
                .ready_timeout_ms,
            5_000
        );
        for bad in ["999", "3600001"] {
            let t = format!("{GOOD}  rollout: {{readyTimeoutMs: %s}}\n");
            let e = Manifest::parse(&t.replace("%s", bad), "m").unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.line),
                ("spec.rollout.readyTimeoutMs", Some(13)),
                "{e}"
            );
        }
        let e =
            Manifest::parse(&format!("{GOOD}  rollout: {{stopGraceMs: 99}}\n"), "m").unwrap_err();
        assert_eq!(e.field, "spec.rollout.stopGraceMs", "{e}");
    }
}
