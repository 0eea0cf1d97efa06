//! `spec.restoreFrom`: a new cluster made from a backup. Before the first
//! start, the file is verified once (`kvd restore --check`) and then every
//! node's data dir is made from it (`kvd restore`), so all nodes begin
//! identical, exact at the backup's index. kvd writes the data dirs; kvsup
//! only runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What a node's data dir holds, as far as a restore cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    /// Missing or empty.
    Empty,
    /// Something, but no `meta`: no kvd has run on it (a restored dir).
    Unstarted,
    /// A `meta`: a node has run here.
    Started,
}

/// Which nodes (by position) to restore: none without a file or once any
/// node has run (the cluster is not new); else every empty one, so that a
/// daemon that stopped half-way restores the rest and never starts a node
/// empty beside restored ones.
pub fn to_restore(restore_from: bool, dirs: &[DirState]) -> Vec<usize> {
    if !restore_from || dirs.contains(&DirState::Started) {
        return Vec::new();
    }
    dirs.iter()
        .enumerate()
        .filter(|(_, d)| **d == DirState::Empty)
        .map(|(i, _)| i)
        .collect()
}

/// The state of `dir` on disk.
pub fn dir_state(dir: &Path) -> DirState {
    if dir.join("meta").exists() {
        return DirState::Started;
    }
    match std::fs::read_dir(dir).map(|mut e| e.next().is_some()) {
        Ok(true) => DirState::Unstarted,
        _ => DirState::Empty,
    }
}

/// A restore of one file into several data dirs.
pub struct Restore {
    pub kvd: PathBuf,
    pub from: PathBuf,
}

/// Longest a `kvd restore` may run.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Restore {
    /// `kvd restore --check`: the file is whole and sound (else the error
    /// names the byte offset). Returns kvd's line.
    pub async fn check(&self) -> Result<String> {
        self.kvd_restore(&["--check".into()]).await
    }

    /// `kvd restore` into `data_dir`. Returns kvd's line.
    pub async fn into_dir(&self, data_dir: &Path) -> Result<String> {
        self.kvd_restore(&["--data-dir".into(), data_dir.display().to_string()])
            .await
    }

    async fn kvd_restore(&self, extra: &[String]) -> Result<String> {
        let mut args = vec![
            "restore".to_string(),
            "--from".into(),
            self.from.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let kvd = self.kvd.clone();
        let run = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&kvd)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
                .with_context(|| format!("running {} restore", kvd.display()))
        });
        let out = tokio::time::timeout(RESTORE_TIMEOUT, run)
            .await
            .context("kvd restore did not finish in time")?
            .context("kvd restore task")??;
        let said = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        if !out.status.success() {
            bail!("{}", said(&out.stderr));
        }
        Ok(said(&out.stdout))
    }
}

/// With `spec.restoreFrom`, the restore and the nodes (name, data dir) it
/// goes into: none once any node has run (`daemon::to_restore`).
pub fn plan(
    manifest: &crate::manifest::Manifest,
    base_dir: &std::path::Path,
    state_dir: &std::path::Path,
    kvd: &std::path::Path,
) -> Option<(Restore, Vec<(String, PathBuf)>)> {
    let from = manifest.spec.restore_from.as_ref()?;
    let dirs: Vec<(String, PathBuf)> = manifest
        .spec
        .nodes
        .iter()
        .map(|n| (n.name.clone(), crate::launch::data_dir(state_dir, &n.name)))
        .collect();
    let states: Vec<_> = dirs.iter().map(|(_, d)| dir_state(d)).collect();
    let todo = to_restore(true, &states);
    if todo.is_empty() {
        tracing::info!("spec.restoreFrom: the cluster has data already; not restoring");
        return None;
    }
    let r = Restore {
        kvd: kvd.to_path_buf(),
        from: base_dir.join(from),
    };
    Some((r, todo.into_iter().map(|i| dirs[i].clone()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DirState::*;

    #[test]
    fn only_a_new_cluster_is_restored_and_then_every_empty_node() {
        assert!(to_restore(false, &[Empty, Empty]).is_empty());
        assert_eq!(to_restore(true, &[Empty, Empty, Empty]), vec![0, 1, 2]);
        // A daemon that stopped after restoring n0 restores the others.
        assert_eq!(to_restore(true, &[Unstarted, Empty, Empty]), vec![1, 2]);
        assert!(to_restore(true, &[Unstarted, Unstarted]).is_empty());
        // Once any node has run, the cluster has a history of its own.
        assert!(to_restore(true, &[Started, Empty, Empty]).is_empty());
    }

    #[test]
    fn a_dir_is_started_once_it_has_meta() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        assert_eq!(dir_state(&d), Empty);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(dir_state(&d), Empty);
        std::fs::create_dir(d.join("snap")).unwrap();
        assert_eq!(dir_state(&d), Unstarted);
        std::fs::write(d.join("meta"), "{}").unwrap();
        assert_eq!(dir_state(&d), Started);
    }
}
