//! `spec.tls: auto`'s credentials, all in `<stateDir>/creds/` (docs/DESIGN.md
//! §8.2): the cluster CA, a certificate and key per node, the cluster's
//! admin and client tokens and kvd's token file holding their hashes.
//!
//! Made once, by the daemon, while it holds the supervisor port (so two
//! daemons never race): every file is written into `creds.new/` (mode 0700,
//! each file created 0600) and that directory is renamed to `creds/`, so a
//! crash leaves either no set or a whole one. A set is never made again: a
//! `creds/` missing any file is an error naming the missing files (a new
//! certificate would not match what clients already trust). A node added
//! to a running cluster gets its certificate from the kept CA key
//! ([`add_node`]). No secret is ever logged.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use crate::manifest::NodeSpec;

/// The directory of the set, under the state dir.
pub const DIR: &str = "creds";

/// A CA outlives every node certificate it signs (10 years, 1 year).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A token's secret: 32 random bytes, 64 hex digits in its file.
const SECRET_BYTES: usize = 32;

/// Largest credential file read (a PEM key or a token).
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The files of a set for `nodes`, and the secrets kvsup itself uses.
#[derive(Clone)]
pub struct Creds {
    pub dir: PathBuf,
    /// The cluster admin token's secret (kvsup's requests to the nodes).
    admin: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds").field("dir", &self.dir).finish()
    }
}

/// Where a set's files are; no file is touched.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn in_state_dir(state_dir: &Path) -> Layout {
        Layout {
            dir: state_dir.join(DIR),
        }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.pem"))
    }
    pub fn key(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.key"))
    }
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("admin.token")
    }
    pub fn client_token(&self) -> PathBuf {
        self.dir.join("client.token")
    }
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.json")
    }

    /// Where a client finds what it needs (`kvsup status`, `kvsup creds`):
    /// paths only, never a secret.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir,
            "ca": self.ca(),
            "client_token_file": self.client_token(),
            "admin_token_file": self.admin_token(),
            "tokens_file": self.tokens(),
        })
    }

    /// File names (in [`Layout::dir`]) of a whole set for `nodes`.
    pub fn names(nodes: &[String]) -> Vec<String> {
        let fixed = [
            "ca.pem",
            "ca.key",
            "admin.token",
            "client.token",
            "tokens.json",
        ];
        let mut v: Vec<String> = fixed.iter().map(|s| (*s).to_string()).collect();
        for n in nodes {
            v.push(format!("{n}.pem"));
            v.push(format!("{n}.key"));
        }
        v
    }
}

impl Creds {
    pub fn layout(&self) -> Layout {
        Layout {
            dir: self.dir.clone(),
        }
    }

    /// The cluster admin token's secret, for an `Authorization` header.
    pub fn admin_secret(&self) -> &str {
        &self.admin
    }
}

/// What to do with a state dir's set.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// No `creds/` yet: make the set.
    Create,
    /// Every file is there: use it.
    Load,
    /// Some are missing: refuse, naming them.
    Missing(Vec<String>),
}

/// `dir_exists`: whether `creds/` exists; `missing`: which of the set's
/// files it lacks.
pub fn plan(dir_exists: bool, missing: Vec<String>) -> Plan {
    match (dir_exists, missing.is_empty()) {
        (false, _) => Plan::Create,
        (true, true) => Plan::Load,
        (true, false) => Plan::Missing(missing),
    }
}

/// The set of `state_dir` for the nodes named `nodes` of cluster
/// `cluster`: loaded, or made if there is none.
pub fn load_or_create(state_dir: &Path, cluster: &str, nodes: &[NodeSpec]) -> Result<Creds> {
    let layout = Layout::in_state_dir(state_dir);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let missing = Layout::names(&names)
        .into_iter()
        .filter(|n| !layout.dir.join(n).exists())
        .collect();
    match plan(layout.dir.exists(), missing) {
        Plan::Create => create(state_dir, cluster, nodes)?,
        Plan::Load => {}
        Plan::Missing(m) => bail!(
            "{} is incomplete: {} missing; restore them, or remove the directory to make a new \
             CA, certificates and tokens (clients must then be given the new CA and token)",
            layout.dir.display(),
            m.join(", ")
        ),
    }
    let admin = read_secret(&layout.admin_token())?;
    read_secret(&layout.client_token())?;
    for key in names.iter().map(|n| layout.key(n)).chain([layout.ca_key()]) {
        check_private(&key)?;
    }
    Ok(Creds {
        dir: layout.dir,
        admin,
    })
}

/// Makes the whole set in `creds.new/` and renames it to `creds/`.
fn create(state_dir: &Path, cluster: &str, nodes: &[NodeSpec]) -> Result<()> {
    let tmp = Layout {
        dir: state_dir.join(format!("{DIR}.new")),
    };
    if tmp.dir.exists() {
        // A set never finished (a crash while making it): nothing used it.
        std::fs::remove_dir_all(&tmp.dir)
            .with_context(|| format!("removing {}", tmp.dir.display()))?;
    }
    DirBuilder::new()
        .mode(0o700)
        .create(&tmp.dir)
        .with_context(|| format!("creating {}", tmp.dir.display()))?;
    write_set(&tmp, cluster, nodes)?;
    let dir = state_dir.join(DIR);
    std::fs::rename(&tmp.dir, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    tracing::info!(dir = %dir.display(), "made the cluster CA, node certificates and tokens");
    Ok(())
}

fn write_set(at: &Layout, cluster: &str, nodes: &[NodeSpec]) -> Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().context("making the CA key")?;
    let ca = ca_params(cluster, now)?
        .self_signed(&ca_key)
        .context("signing the CA")?;
    write_private(&at.ca(), ca.pem().as_bytes())?;
    write_private(&at.ca_key(), ca_key.serialize_pem().as_bytes())?;
    for spec in nodes {
        let (cert, key) = node_cert(spec, &ca, &ca_key, now)?;
        write_private(&at.cert(&spec.name), cert.as_bytes())?;
        write_private(&at.key(&spec.name), key.as_bytes())?;
    }
    let admin = new_secret()?;
    let client = new_secret()?;
    write_private(&at.admin_token(), format!("{admin}\n").as_bytes())?;
    write_private(&at.client_token(), format!("{client}\n").as_bytes())?;
    write_private(&at.tokens(), token_file_json(&admin, &client).as_bytes())
}

/// The cluster CA's certificate parameters, valid from `now`: the same
/// subject for a cluster name whenever they are made, so that a CA
/// certificate made again from the kept key issues certificates that
/// chain to the one the nodes trust.
fn ca_params(cluster: &str, now: time::OffsetDateTime) -> Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("kvsup cluster {cluster} CA"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now;
    ca.not_after = now + CA_VALIDITY;
    Ok(ca)
}

/// A certificate and key (PEM) for node `spec`, signed by `ca`.
fn node_cert(
    spec: &NodeSpec,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    now: time::OffsetDateTime,
) -> Result<(String, String)> {
    let node = spec.name.as_str();
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, node);
    p.subject_alt_names = host_names(spec.address.as_deref())?;
    let uri = format!("kvd://node/{node}");
    p.subject_alt_names.push(SanType::URI(uri.try_into()?));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now;
    p.not_after = now + NODE_VALIDITY;
    let key = KeyPair::generate().context("making a node key")?;
    let cert = p
        .signed_by(&key, ca, ca_key)
        .with_context(|| format!("signing {node}'s certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes a certificate and key for node `spec`, added to the running
/// cluster `cluster` of `state_dir`, with the kept CA key; one left from
/// an earlier member of that name is replaced (the node starts anew). Each
/// file is written beside its place and renamed over it.
pub fn add_node(state_dir: &Path, cluster: &str, spec: &NodeSpec) -> Result<()> {
    let at = Layout::in_state_dir(state_dir);
    check_private(&at.ca_key())?;
    let pem = std::fs::read_to_string(at.ca_key())
        .with_context(|| format!("reading {}", at.ca_key().display()))?;
    let ca_key = KeyPair::from_pem(&pem)
        .with_context(|| format!("{}: not a PEM private key", at.ca_key().display()))?;
    let now = time::OffsetDateTime::now_utc();
    let ca = ca_params(cluster, now)?
        .self_signed(&ca_key)
        .context("making the CA certificate again")?;
    let (cert, key) = node_cert(spec, &ca, &ca_key, now)?;
    for (path, bytes) in [(at.cert(&spec.name), cert), (at.key(&spec.name), key)] {
        let tmp = path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, bytes.as_bytes())?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    }
    File::open(&at.dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", at.dir.display()))
}

/// The names a node's certificate vouches for: `localhost` and 127.0.0.1
/// (a node without an `address` listens there, and a local client may
/// always use them), and its `address`, an IP or a DNS name.
fn host_names(address: Option<&str>) -> Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    match address.map(|a| (a, a.parse::<IpAddr>())) {
        None => {}
        Some((_, Ok(ip))) if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) => {}
        Some((_, Ok(ip))) => sans.push(SanType::IpAddress(ip)),
        Some(("localhost", Err(_))) => {}
        Some((name, Err(_))) => sans.push(SanType::DnsName(name.try_into()?)),
    }
    Ok(sans)
}

/// kvd's `--auth-file` for the two tokens (docs/DESIGN.md §2.18): `admin`
/// may do everything, `client` read and write every key.
pub fn token_file_json(admin: &str, client: &str) -> String {
    let doc = serde_json::json!({"tokens": [
        {"name": "admin", "sha256": sha256_hex(admin), "read": [""], "write": [""],
         "admin": true, "metrics": true},
        {"name": "client", "sha256": sha256_hex(client), "read": [""], "write": [""]},
    ]});
    format!("{doc:#}\n")
}

pub fn sha256_hex(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn new_secret() -> Result<String> {
    let mut b = [0u8; SECRET_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(hex(&b))
}

/// Creates `path` with mode 0600 (never chmod-ed later) and syncs it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Refuses a secret's file that others may read or write (as ssh does).
fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "permissions {mode:04o} for {} are too open: it holds a secret of the cluster; run \
             `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// The secret in a token file: 64 hex digits and a newline.
fn read_secret(path: &Path) -> Result<String> {
    check_private(path)?;
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    let secret = text.trim();
    if secret.len() != 2 * SECRET_BYTES || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} does not hold a token (64 hex digits)", path.display());
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_made_when_absent_used_when_whole_and_refused_when_partial() {
        assert_eq!(plan(false, vec![]), Plan::Create);
        assert_eq!(plan(true, vec![]), Plan::Load);
        assert_eq!(
            plan(true, vec!["n1.key".into()]),
            Plan::Missing(vec!["n1.key".into()])
        );
    }

    #[test]
    fn the_token_file_holds_hashes_not_secrets() {
        let json = token_file_json("aa", "bb");
        assert!(
            !json.contains("\"aa\"") && !json.contains("\"bb\""),
            "{json}"
        );
        // printf %s aa | sha256sum
        assert!(json.contains("961b6dd3ede3cb8ecbaacbd68de040cd78eb2ed5889130cceb4c49268ea4d506"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["tokens"][0]["admin"], true);
        assert_eq!(v["tokens"][1].get("admin"), None);
    }

    #[test]
    fn an_added_node_gets_a_certificate_of_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str| NodeSpec {
            name: name.into(),
            port: 1,
            address: None,
            runtime: Default::default(),
        };
        load_or_create(dir.path(), "demo", &[spec("n0")]).unwrap();
        add_node(dir.path(), "demo", &spec("n5")).unwrap();
        let at = Layout::in_state_dir(dir.path());
        let ca_pem = std::fs::read(at.ca()).unwrap();
        let leaf_pem = std::fs::read(at.cert("n5")).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let ca = CertificateDer::from_pem_slice(&ca_pem).unwrap();
        let leaf = CertificateDer::from_pem_slice(&leaf_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the added node's certificate chains to the cluster CA");
        // Made again, it replaces the old files; the set still loads.
        add_node(dir.path(), "demo", &spec("n5")).unwrap();
        check_private(&at.key("n5")).unwrap();
    }

    #[test]
    fn a_certificate_names_the_address_of_its_node() {
        let names = |a| format!("{:?}", host_names(a).unwrap());
        assert_eq!(names(None), names(Some("127.0.0.1")));
        assert!(names(Some("10.9.0.3")).contains("10.9.0.3"));
        assert!(names(Some("kv-1.kv.default.svc")).contains("kv-1.kv.default.svc"));
        assert_eq!(host_names(Some("fd00::1")).unwrap().len(), 3);
    }

    #[test]
    fn a_set_is_kept_and_a_partial_one_names_what_is_missing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::TempDir::new().unwrap();
        let spec = |name: &str| NodeSpec {
            name: name.into(),
            port: 1,
            address: None,
            runtime: Default::default(),
        };
        let nodes = vec![spec("n0"), spec("n1")];
        let first = load_or_create(dir.path(), "demo", &nodes).unwrap();
        let l = first.layout();
        for name in Layout::names(&["n0".to_string(), "n1".to_string()]) {
            let mode = std::fs::metadata(l.dir.join(&name)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        let mode = std::fs::metadata(&l.dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let ca = std::fs::read(l.ca()).unwrap();
        let again = load_or_create(dir.path(), "demo", &nodes).unwrap();
        assert_eq!(again.admin_secret(), first.admin_secret());
        assert_eq!(std::fs::read(l.ca()).unwrap(), ca);
        std::fs::remove_file(l.key("n1")).unwrap();
        let e = load_or_create(dir.path(), "demo", &nodes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n1.key") && !e.contains("n0.key"), "{e}");
        std::fs::write(l.key("n1"), "x").unwrap();
        std::fs::set_permissions(l.key("n1"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(dir.path(), "demo", &nodes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0644"), "{e}");
    }
}
