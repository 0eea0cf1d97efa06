//! `kvsup render`: a manifest as files another system runs: systemd units
//! for nodes on hosts (`systemd`), or Kubernetes objects (`kubernetes`).
//! Both submodules are pure (manifest and paths in, text out); this module
//! does their few effects: making or loading the credentials of a
//! `tls: auto` manifest, reading them, and writing the output.

pub mod kubernetes;
pub mod systemd;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use crate::creds::{self, Layout};
use crate::manifest::Manifest;

/// The credentials of `m` in `state_dir`, made if there are none yet (as
/// the daemon would at its first start), so that what is rendered names
/// files that exist. `None` without `tls: auto`.
pub fn ensure_creds(m: &Manifest, state_dir: &Path) -> Result<Option<Layout>> {
    if !m.spec.tls_auto() {
        return Ok(None);
    }
    // Only its owner may look in, as `kvsup apply` makes it: it holds keys.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let c = creds::load_or_create(state_dir, &m.metadata.name, &m.spec.nodes)?;
    Ok(Some(c.layout()))
}

/// Every file of the set, by name, for the Secrets.
pub fn read_creds(m: &Manifest, layout: &Layout) -> Result<BTreeMap<String, String>> {
    let names: Vec<String> = m.spec.nodes.iter().map(|n| n.name.clone()).collect();
    Layout::names(&names)
        .into_iter()
        .map(|name| {
            let path = layout.dir.join(&name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok((name, text))
        })
        .collect()
}

/// Writes `units` into `dir` (made if missing); returns their paths.
pub fn write_units(dir: &Path, units: &[systemd::Unit]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    units
        .iter()
        .map(|u| {
            let path = dir.join(&u.name);
            std::fs::write(&path, &u.text)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// Writes `text` to a new or truncated file of mode 0600: rendered
/// Kubernetes objects hold the cluster's private keys.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// What the operator copies where, one line each, for `kvsup render
/// systemd` to print: each node's host its own files, kvsup's host the
/// whole credentials directory and the manifest.
pub fn copy_plan(m: &Manifest, p: &systemd::Paths, unit_dir: &Path) -> Vec<String> {
    let cluster = &m.metadata.name;
    let mut out = Vec::new();
    for (node, host, files) in systemd::host_files(m, &p.state_dir) {
        let unit = unit_dir.join(systemd::node_unit_name(cluster, &node));
        let mut what = vec![unit.display().to_string(), p.kvd.display().to_string()];
        if m.spec.tls_auto() {
            what.extend(files.iter().map(|f| f.display().to_string()));
        }
        out.push(format!("host {host} (node {node}): {}", what.join(" ")));
    }
    let unit = unit_dir.join(systemd::supervisor_unit_name(cluster));
    let mut what = vec![
        unit.display().to_string(),
        p.kvsup.display().to_string(),
        p.kvd.display().to_string(),
        p.manifest.display().to_string(),
    ];
    if m.spec.tls_auto() {
        what.push(format!(
            "{}/",
            Layout::in_state_dir(&p.state_dir).dir.display()
        ));
    }
    out.push(format!("kvsup's host: {}", what.join(" ")));
    out
}

/// `p` as an absolute path: as given when absolute (it names a file on the
/// hosts the output runs on), else resolved here.
pub fn absolute(p: &Path, what: &str) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    std::fs::canonicalize(p).map_err(|e| {
        anyhow!(
            "{what} {}: {e} (give an absolute path for a file of another host)",
            p.display()
        )
    })
}
