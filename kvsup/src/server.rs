//! Wiring only: the daemon (`kvsup daemon`, forked by `kvsup apply`) from
//! start to stop. It claims the supervisor port, loads (or makes) the admin
//! token and, with `tls: auto`, the cluster's credentials, builds the [`Sup`], writes the pid file, starts the daemon's
//! tasks and the manifest file watcher, serves the HTTP API, and on
//! `kvsup down` or SIGTERM stops every task before it exits.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::daemon::{restore, Sup};
use crate::manifest::Manifest;

/// Runs the daemon until `kvsup down` (or SIGTERM, which leaves the nodes
/// running for the next daemon to adopt).
pub async fn run(manifest_path: PathBuf, base_dir: PathBuf, kvd: PathBuf) -> Result<()> {
    let manifest = Manifest::load(&manifest_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    manifest
        .checked_state_dir(&base_dir, &manifest_path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let port = manifest.spec.supervisor.port;
    let state_dir = manifest.state_dir(&base_dir);
    // A new cluster from a backup: the file is verified before anything
    // is made, so a bad one stops the daemon having created nothing.
    let restore = restore::plan(&manifest, &base_dir, &state_dir, &kvd);
    if let Some((r, _)) = &restore {
        let line = r
            .check()
            .await
            .with_context(|| format!("spec.restoreFrom {}", r.from.display()))?;
        tracing::info!(file = %r.from.display(), "{line}");
    }
    // Only its owner may look in: it holds tokens and keys.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding the supervisor port 127.0.0.1:{port}"))?;
    // After the port is ours: no other daemon of this state dir runs, so
    // none races this one to make the token and the credentials.
    let token = crate::token_file::load_or_create(&state_dir)?;
    let creds = if manifest.spec.tls_auto() {
        Some(crate::creds::load_or_create(
            &state_dir,
            &manifest.metadata.name,
            &manifest.spec.nodes,
        )?)
    } else {
        None
    };
    let sup = Arc::new(Sup::new(manifest, manifest_path, base_dir, kvd, creds)?);
    let guard = crate::auth::Guard::new(port, &token);
    let pid_file = sup.state_dir.join("kvsup.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    sup.event(
        "start",
        None,
        format!(
            "supervising cluster {:?} from {} (pid {})",
            sup.manifest().metadata.name,
            sup.manifest_path().display(),
            std::process::id()
        ),
    );
    sup.metrics.applies.inc();
    if let Some((r, dirs)) = &restore {
        for (name, dir) in dirs {
            let line = r
                .into_dir(dir)
                .await
                .with_context(|| format!("restoring node {name} from {}", r.from.display()))?;
            sup.event("restore", Some(name), line);
        }
    }
    sup.start();
    sup.spawn(crate::watch::run(sup.clone()));
    let served = serve(&sup, listener, guard).await;
    if !sup.shutting_down() {
        sup.event("stop", None, "supervisor stopping; nodes keep running");
    }
    sup.stop().await;
    let _ = std::fs::remove_file(&pid_file);
    tracing::info!("supervisor stopped");
    served
}

/// Serves the HTTP API until `kvsup down` has answered, or SIGTERM or
/// SIGINT arrives; requests in flight are finished first.
async fn serve(
    sup: &Arc<Sup>,
    listener: tokio::net::TcpListener,
    guard: crate::auth::Guard,
) -> Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let app = crate::http::router(sup.clone(), stop_tx, guard);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = stop_rx.recv() => {}
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        })
        .await
        .context("serving the supervisor API")
}
