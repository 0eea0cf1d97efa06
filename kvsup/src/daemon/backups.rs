//! `spec.backup`: the daemon takes a backup every `every` into `dir`,
//! exactly as `kvsup backup` does (a healthy secondary, else the primary;
//! `FILE.tmp`, fsync, `kvd restore --check`, rename), and keeps the newest
//! `keep`. Each backup is an event and counts in `kvsup_backups_total`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::restore::Restore;
use super::Sup;

/// The file names of a cluster's scheduled backups: `<cluster>-<unix
/// ms, 16 digits>-<index>.kvbak`, so that name order is time order.
pub fn file_name(cluster: &str, unix_ms: u64, index: u64) -> String {
    format!("{cluster}-{unix_ms:016}-{index}.kvbak")
}

/// Which of the names in a backup dir go, keeping the newest `keep` of
/// this cluster's (other files are never touched).
pub fn to_remove(cluster: &str, names: &[String], keep: usize) -> Vec<String> {
    let prefix = format!("{cluster}-");
    let mut ours: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".kvbak"))
        .filter(|n| {
            let rest = &n[prefix.len()..];
            rest.len() > 17
                && rest[..16].bytes().all(|b| b.is_ascii_digit())
                && &rest[16..17] == "-"
        })
        .collect();
    ours.sort();
    let drop = ours.len().saturating_sub(keep);
    ours.into_iter().take(drop).cloned().collect()
}

impl Sup {
    /// Runs until the daemon stops; reads `spec.backup` at every turn, so
    /// an applied manifest changes the schedule.
    pub(super) async fn backup_loop(self: Arc<Self>) {
        loop {
            // Without a schedule, look again in a second (an apply may add one).
            let every = self.manifest().spec.backup.map(|b| b.every_ms());
            let wait = every.unwrap_or(1_000);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                () = self.stopped() => return,
            }
            if every.is_none() || self.manifest().spec.backup.is_none() {
                continue;
            }
            match self.backup_once().await {
                Ok((index, line)) => {
                    self.metrics.backups.with_label_values(&["ok"]).inc();
                    self.metrics
                        .last_backup_index
                        .set(i64::try_from(index).unwrap_or(i64::MAX));
                    self.event("backup", None, line);
                }
                Err(e) => {
                    self.metrics.backups.with_label_values(&["failed"]).inc();
                    self.event("error", None, format!("scheduled backup failed: {e:#}"));
                }
            }
        }
    }

    async fn backup_once(&self) -> Result<(u64, String)> {
        let m = self.manifest();
        let Some(b) = m.spec.backup.clone() else {
            anyhow::bail!("no spec.backup");
        };
        let dir = self.base_dir.join(&b.dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let status = self.status();
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let src = crate::backup::pick(&nodes).context("no healthy node to back up")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The index is known only from the answer: fetched under a
        // provisional name, named once verified.
        let provisional = dir.join(format!(".{}", file_name(&m.metadata.name, now, 0)));
        // `self.http` carries the CA and the admin token under `tls: auto`.
        let f = crate::backup::fetch(&self.http, None, &src.url, &provisional).await;
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(crate::backup::tmp_path(&provisional));
                return Err(e);
            }
        };
        let check = Restore {
            kvd: self.kvd.clone(),
            from: f.tmp.clone(),
        };
        let verified = check.check().await;
        let line = match verified {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&f.tmp);
                return Err(e.context("the fetched backup is refused"));
            }
        };
        let to = dir.join(file_name(&m.metadata.name, now, f.index));
        crate::backup::commit(&f.tmp, &to)?;
        remove_old(&dir, &m.metadata.name, b.keep as usize);
        Ok((
            f.index,
            format!(
                "index {} from {} ({}), {} bytes, to {} ({line})",
                f.index,
                src.name,
                src.role,
                f.bytes,
                to.display()
            ),
        ))
    }
}

/// Removes this cluster's backups in `dir` beyond the newest `keep`.
fn remove_old(dir: &Path, cluster: &str, keep: usize) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for n in to_remove(cluster, &names, keep) {
        let p: PathBuf = dir.join(&n);
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(file = %p.display(), error = %e, "cannot remove an old backup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_backups_of_the_cluster_are_kept() {
        let names: Vec<String> = [
            file_name("demo", 3, 30),
            file_name("demo", 1, 10),
            file_name("demo", 2, 20),
            file_name("other", 0, 5),
            "demo-notes.txt".to_string(),
            format!(".{}.tmp", file_name("demo", 4, 0)),
        ]
        .into_iter()
        .collect();
        assert_eq!(to_remove("demo", &names, 2), vec![file_name("demo", 1, 10)]);
        assert!(to_remove("demo", &names, 3).is_empty());
        assert_eq!(to_remove("demo", &names, 1).len(), 2);
    }
}
