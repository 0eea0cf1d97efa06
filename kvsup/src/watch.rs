//! Re-applies the manifest when its file is edited (docs/DESIGN.md §8).
//!
//! The directory is watched rather than the file: editors save by writing a
//! new file and renaming it over the old one, which a watch on the old
//! inode would miss. One task follows the file the daemon currently
//! applies: when an apply names another file, it watches that one instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::daemon::{self, Sup};

/// Events within this window are taken as one edit.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Follows the manifest file until the daemon stops (run it with
/// [`Sup::spawn`]).
pub async fn run(sup: Arc<Sup>) {
    let mut paths = sup.watch_manifest_path();
    loop {
        let path = paths.borrow_and_update().clone();
        // Replaced when the path changes: the old watcher, dropped, ends
        // its events.
        let mut edits = Edits::watch(&sup, &path);
        loop {
            tokio::select! {
                biased;
                () = sup.stopped() => return,
                changed = paths.changed() => match changed {
                    Ok(()) => break,
                    Err(_) => return,
                },
                () = Edits::next(&mut edits) => reapply(&sup, &path).await,
            }
        }
    }
}

/// The edits of one watched file.
struct Edits {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::Receiver<()>,
}

impl Edits {
    /// Watches the directory of `path` for events that name its file;
    /// `None` (said in an event) when the watch cannot be set up.
    fn watch(sup: &Sup, path: &Path) -> Option<Edits> {
        // Bounded: a burst of file events only needs to wake the task once.
        let (tx, rx) = mpsc::channel::<()>(1);
        let name = path.file_name().map(|n| n.to_os_string());
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
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
                return None;
            }
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            sup.event(
                "error",
                None,
                format!("cannot watch {}: {e}", dir.display()),
            );
            return None;
        }
        Some(Edits {
            _watcher: watcher,
            rx,
        })
    }

    /// Resolves at the next edit (events within [`DEBOUNCE`] are one);
    /// never, when the file is not watched.
    async fn next(edits: &mut Option<Edits>) {
        let Some(e) = edits else {
            return std::future::pending().await;
        };
        if e.rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
        while e.rx.try_recv().is_ok() {}
    }
}

/// Applies the edited file at `path`, unless it holds what is applied.
async fn reapply(sup: &Arc<Sup>, path: &Path) {
    if sup.manifest_path() != path {
        // An apply named another file meanwhile; that one is followed now.
        return;
    }
    let unchanged = daemon::load_manifest(path)
        .await
        .is_ok_and(|m| m == sup.manifest());
    if unchanged {
        return;
    }
    let base = sup.base_dir().to_path_buf();
    if let Err(e) = sup.apply(path, &base, None, false).await {
        sup.metrics.reconcile_errors.inc();
        sup.event("error", None, format!("edited manifest not applied: {e}"));
    }
}
