//! Re-applies the manifest when its file is edited (DESIGN §8).
//!
//! The directory is watched rather than the file: editors save by writing a
//! new file and renaming it over the old one, which a watch on the old
//! inode would miss.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::daemon::Sup;

/// Events within this window are taken as one edit.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches the manifest the daemon currently applies; called again when an
/// apply names another file (the previous watcher is dropped, which ends
/// its task).
pub fn spawn(sup: Arc<Sup>) {
    // Bounded: a burst of file events only needs to wake the loop once.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watched = sup.manifest_path();
    let name = watched.file_name().map(|n| n.to_os_string());
    let name_now = name.clone();
    let dir = watched
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
            if ours && !ev.kind.is_access() {
                let _ = tx.try_send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            sup.event("error", None, format!("cannot watch the manifest: {e}"));
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        sup.event(
            "error",
            None,
            format!("cannot watch {}: {e}", dir.display()),
        );
        return;
    }
    // The daemon keeps the watcher; replacing it drops the old one, whose
    // handler (and so this task's channel) goes with it.
    sup.keep_watcher(watcher);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let path = sup.manifest_path();
            if Some(path.file_name().map(|n| n.to_os_string())) != Some(name_now.clone()) {
                // The daemon moved on to another file; its own watcher runs.
                return;
            }
            let base = sup.base_dir().to_path_buf();
            let unchanged = crate::daemon::load_manifest(&path)
                .await
                .is_ok_and(|m| m == sup.manifest());
            if unchanged {
                continue;
            }
            if let Err(e) = sup.apply(&path, &base, false).await {
                sup.metrics.reconcile_errors.inc();
                sup.event("error", None, format!("edited manifest not applied: {e}"));
            }
        }
    });
}
