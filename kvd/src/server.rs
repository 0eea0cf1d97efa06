//! Runs a node: lock the data dir, recover the engine, serve HTTP until
//! SIGTERM/SIGINT, then shut down gracefully.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kvproto::Mode;
use nix::fcntl::{Flock, FlockArg};

use crate::api::access::Access;
use crate::api::tls::NodeTls;
use crate::api::{self, AppState, Limits};
use crate::config::{BootRole, Config};
use crate::index::Index;
use crate::masterless::hlc::{node_tag, WallClock};
use crate::metrics::Metrics;
use crate::node::{ClusterSettings, Node, Runtime};
use crate::storage::{record, Engine, EngineConfig, Meta, MetaStore, RealFs, StorageState};
use crate::tasks::Tasks;

/// How often the data dir's identity is checked, besides at every WAL
/// segment roll: the longest a node goes on acknowledging writes into a
/// deleted data dir.
const DATA_DIR_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Holds the data dir's `LOCK` for the life of the process: the kernel
/// drops an flock when the process dies, so a crash never leaves it stuck.
/// Also holds a claim on the data dir's path (see [`claim_path`]).
pub struct DataDirLock {
    _lock: Flock<File>,
    _path_claim: UnixListener,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
        let path_claim = claim_path(data_dir)?;
        let path = data_dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, errno)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "data dir {} is in use by another kvd{} ({errno}); \
                     only one kvd may use a data dir at a time",
                    data_dir.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    }
                );
            }
        };
        // The pid is only a hint for the error message above.
        lock.set_len(0)?;
        lock.rewind()?;
        write!(lock, "{}", std::process::id())?;
        Ok(DataDirLock {
            _lock: lock,
            _path_claim: path_claim,
        })
    }
}

/// Claims the data dir's path for this process, as a name in Linux's
/// abstract socket namespace. The flock on `LOCK` stops a second kvd only
/// while that file is still in the data dir: after an `rm -rf` of a running
/// node's dir, a new kvd would create a fresh `LOCK` and get it, while the
/// first still serves. Nothing on disk can remove this claim, and the
/// kernel drops it when the process dies, as it does the flock.
fn claim_path(data_dir: &Path) -> Result<UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;

    let canonical = data_dir
        .canonicalize()
        .with_context(|| format!("resolving data dir {}", data_dir.display()))?;
    let name = format!(
        "kvd-data-dir-{:016x}",
        fnv1a(canonical.as_os_str().as_bytes())
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "data dir {} is in use by another kvd that is still running, although the \
             directory may have been removed or replaced under it; only one kvd may use a \
             data dir at a time: stop the other one first",
            data_dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("claiming data dir {}", data_dir.display())),
    }
}

/// FNV-1a, 64 bits: stable across releases, so that kvd versions agree on
/// a data dir's claim.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Asks the engine every [`DATA_DIR_CHECK_INTERVAL`] whether its data dir
/// is still there, until it is not (the engine then refuses writes and
/// says why) or the engine is gone.
fn watch_data_dir(engine: &Arc<Engine>, tasks: &Tasks) {
    let engine = Arc::downgrade(engine);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(DATA_DIR_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            if !matches!(engine.check_data_dir().await, Ok(StorageState::Ok)) {
                return;
            }
        }
    });
}

/// Runs the node until a shutdown signal.
pub async fn run(cfg: Config) -> Result<()> {
    // Before the data dir is touched.
    if let Some(why) = unprotected(&cfg) {
        bail!("{why}");
    }
    let _lock = DataDirLock::acquire(&cfg.data_dir)?;
    check_flags(&cfg)?;
    // Before anything starts: a token file that does not parse is a refusal.
    let access = match &cfg.auth_file {
        Some(path) => Some(Arc::new(Access::load(path).map_err(anyhow::Error::msg)?)),
        None => None,
    };
    let tls = tls_setup(&cfg)?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let store = MetaStore::new(Arc::new(RealFs), &cfg.data_dir);
    let (meta, fresh) = load_meta(&cfg, &store)?;
    let wall = WallClock::new(cfg.clock_offset_ms);
    let engine = open_engine(&cfg, &meta, &wall, metrics.clone()).await?;
    let tasks = Tasks::new();
    watch_data_dir(&engine, &tasks);
    let node = Arc::new(start_node(&cfg, &engine, &meta, fresh, store, wall)?);

    let addr = SocketAddr::new(cfg.bind, cfg.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let budget = connection_budget(&cfg)?;
    tracing::info!(node = %meta.node_id, "{}", budget.describe(cfg.max_connections));
    let connections = metrics.connections.clone();
    let mut state = AppState::new(
        node.clone(),
        metrics,
        limits(&cfg),
        cfg.enable_debug,
        cfg.data_dir.display().to_string(),
    );
    reload_on_sighup(access.clone(), tls.as_ref().map(|(t, _)| t.clone()), &tasks);
    state.access = access;
    let state = Arc::new(state);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(node = %meta.node_id, mode = %meta.mode, "serving on {scheme}://{addr}");
    let serve_cfg = api::serve::ServeConfig {
        budget,
        timeouts: api::serve::Timeouts {
            idle: Duration::from_millis(cfg.idle_timeout_ms),
            header: Duration::from_millis(cfg.header_timeout_ms),
        },
        metrics: connections,
        tls: tls.map(|(_, acceptor)| acceptor),
    };
    api::serve::serve(listener, api::router(state), serve_cfg, shutdown_signal()).await;

    // In-flight requests have finished: the runtime's and our own tasks
    // stop, then the writer drains its queue (each write fsync'd before its
    // reply) and stops.
    node.stop().await;
    tasks.stop().await;
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .context("engine shutdown panicked")?;
    tracing::info!(node = %meta.node_id, "shut down cleanly");
    Ok(())
}

/// Reads the TLS files, if TLS is on: the node's TLS (which SIGHUP reads
/// again) and the server's acceptor, and with a client CA, mutual TLS for
/// the peer client. A file that cannot be used stops the start, named with
/// the reason.
fn tls_setup(cfg: &Config) -> Result<Option<(Arc<NodeTls>, tokio_rustls::TlsAcceptor)>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let files = api::tls::TlsFiles {
        cert,
        key,
        client_ca: cfg.tls_client_ca.as_deref(),
    };
    let tls = NodeTls::load(files).context("TLS file unusable")?;
    if let Some(peers) = tls.peer_client_config() {
        crate::peer_http::use_tls(peers);
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    Ok(Some((tls, acceptor)))
}

/// Protected mode (as Redis has it): a node that listens beyond loopback
/// must prove who clients and peers are, by TLS and tokens, unless the
/// operator says the network is trusted (`--insecure`). The reason, if it
/// must not start.
fn unprotected(cfg: &Config) -> Option<String> {
    let tls = cfg.tls_cert.is_some();
    let tokens = cfg.auth_file.is_some();
    if cfg.bind.is_loopback() || cfg.insecure || (tls && tokens) {
        return None;
    }
    let missing = match (tls, tokens) {
        (false, false) => "TLS (--tls-cert, --tls-key) and tokens (--auth-file)",
        (false, true) => "TLS (--tls-cert, --tls-key)",
        _ => "tokens (--auth-file)",
    };
    Some(format!(
        "refusing to listen on {} without {missing}: anyone who reaches the port could read          and write every key, post replication traffic and run the admin routes. Give them,          bind a loopback address (--bind 127.0.0.1), or pass --insecure if everyone on this          network may do all that",
        cfg.bind
    ))
}

/// Refuses flag combinations that cannot work, before anything starts.
fn check_flags(cfg: &Config) -> Result<()> {
    if let Some(n) = cfg.sync_replicas {
        if n > cfg.peers.len() && !cfg.peers.is_empty() {
            bail!(
                "--sync-replicas {n} needs at least that many --peers (got {})",
                cfg.peers.len()
            );
        }
    }
    if cfg.write_quorum as usize > cfg.peers.len() + 1 {
        bail!(
            "--write-quorum {} needs at least {} --peers (got {})",
            cfg.write_quorum,
            cfg.write_quorum - 1,
            cfg.peers.len()
        );
    }
    if cfg.tls_cert.is_some() && !cfg.peers.is_empty() {
        // Peers authenticate each other by certificate: without the CA
        // there is none to check, and nothing could reach /internal/*.
        if cfg.tls_client_ca.is_none() {
            bail!("--peers with --tls-cert needs --tls-client-ca (peers use mutual TLS)");
        }
        if let Some(p) = cfg.peers.iter().find(|p| !p.starts_with("https://")) {
            bail!("--peers {p}: with TLS on, peer URLs are https://");
        }
    }
    if cfg.clock_offset_ms != 0 && !cfg.enable_debug {
        bail!("--clock-offset-ms is a debug knob; it needs --enable-debug");
    }
    if cfg.rejoin && (cfg.peers.is_empty() || cfg.mode != Mode::PrimarySecondary) {
        bail!(
            "--rejoin is for a primary/secondary cluster node (--peers, --mode primary-secondary)"
        );
    }
    if cfg.join && (cfg.peers.is_empty() || cfg.mode != Mode::PrimarySecondary) {
        bail!("--join is for a primary/secondary cluster node (--peers, --mode primary-secondary)");
    }
    if cfg.join && cfg.rejoin {
        bail!("--join is for a node new to the cluster: not with --rejoin");
    }
    if cfg.rejoin && cfg.role == BootRole::Primary {
        bail!("--rejoin with --role primary: a node that lost its data cannot bootstrap a cluster");
    }
    Ok(())
}

/// Reads (or creates) `meta`, with the mode the node runs in: a node
/// without peers is single; a cluster node's persisted mode wins over
/// `--mode`, since a live switch changes it. Says whether it was created.
fn load_meta(cfg: &Config, store: &MetaStore) -> Result<(Meta, bool)> {
    let replicated = !cfg.peers.is_empty();
    let mode = if replicated { cfg.mode } else { Mode::Single };
    let (mut meta, fresh) = store.load_or_init(&cfg.node_id, mode)?;
    match (cfg.rejoin, fresh) {
        (true, true) => {
            // Durable before the node answers anyone: a crash before it has
            // caught up must not bring it back as an ordinary voter.
            meta.rejoining = true;
            store.store(&meta)?;
            tracing::info!(data_dir = %cfg.data_dir.display(), "rejoining with a fresh data dir: no votes until caught up");
        }
        (true, false) if !meta.rejoining => tracing::warn!(
            data_dir = %cfg.data_dir.display(),
            "--rejoin ignored: the data dir has history"
        ),
        _ => {}
    }
    match (cfg.join, fresh) {
        (true, true) => {
            // Durable before the node answers anyone: a restart without
            // --join must not take `--peers` as a configuration of voters
            // that includes it.
            meta.joined = true;
            store.store(&meta)?;
        }
        (true, false) if !meta.joined => tracing::warn!(
            data_dir = %cfg.data_dir.display(),
            "--join ignored: the data dir has history"
        ),
        _ => {}
    }
    meta.mode = match meta.mode {
        m if replicated && m.is_cluster() => {
            if m != cfg.mode {
                tracing::warn!(
                    data_dir = %cfg.data_dir.display(),
                    mode = %m,
                    flag = %cfg.mode,
                    "the data dir is in another mode than --mode (switched live); ignoring --mode"
                );
            }
            m
        }
        _ => mode,
    };
    Ok((meta, fresh))
}

/// The engine's settings from the flags and `meta`.
fn engine_config(cfg: &Config, meta: &Meta, wall: &WallClock) -> EngineConfig {
    let mut ecfg = EngineConfig::new(&cfg.data_dir);
    ecfg.segment_max_bytes = cfg.wal_segment_mib << 20;
    ecfg.snapshot_every_bytes = cfg.snapshot_every_mib << 20;
    ecfg.queue_capacity = cfg.write_queue;
    ecfg.epoch = meta.epoch;
    ecfg.policy = meta.mode.into();
    ecfg.node_tag = node_tag(&meta.node_id);
    ecfg.wall = wall.clone();
    ecfg.index = cfg.index.then(|| Arc::new(Index::new(cfg.index_stem)));
    ecfg.limits = record::Limits {
        max_value_bytes: cfg.max_value_bytes,
        max_bulk_items: cfg.max_bulk_items,
    };
    ecfg.max_clock_offset_ms = cfg.max_clock_offset_ms;
    ecfg.max_data_bytes =
        (cfg.max_memory_mib > 0).then(|| cfg.max_memory_mib.saturating_mul(1 << 20));
    ecfg.max_leases = cfg.max_leases;
    ecfg.watch_cache_bytes = usize::try_from(cfg.watch_cache_mib << 20).unwrap_or(usize::MAX);
    ecfg
}

/// Recovers the data dir (off the async threads) and says what it found.
async fn open_engine(
    cfg: &Config,
    meta: &Meta,
    wall: &WallClock,
    metrics: Arc<Metrics>,
) -> Result<Arc<Engine>> {
    let ecfg = engine_config(cfg, meta, wall);
    let (engine, report) =
        tokio::task::spawn_blocking(move || Engine::open(Arc::new(RealFs), ecfg, Some(metrics)))
            .await
            .context("recovery task panicked")?
            .with_context(|| format!("recovering data dir {}", cfg.data_dir.display()))?;
    tracing::info!(
        node = %meta.node_id,
        data_dir = %cfg.data_dir.display(),
        keys = report.keys,
        seconds = report.duration.as_secs_f64(),
        snapshot_index = report.snapshot_index,
        records_replayed = report.records_replayed,
        torn_bytes_cut = report.truncated_bytes,
        written_ahead_zeros_cut = report.zeros_cut,
        "recovered the data dir"
    );
    Ok(Arc::new(engine))
}

/// The node, with the runtime of its mode started. A fresh data dir takes
/// its role from `--role`; a restarted node trusts its persisted epoch and
/// log and waits to be promoted.
fn start_node(
    cfg: &Config,
    engine: &Arc<Engine>,
    meta: &Meta,
    fresh: bool,
    store: MetaStore,
    wall: WallClock,
) -> Result<Node> {
    let cluster = meta.mode.is_cluster().then(|| ClusterSettings {
        node_id: meta.node_id.clone(),
        advertise_url: cfg.advertise_url.clone().unwrap_or_else(|| {
            let scheme = if cfg.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}:{}", cfg.bind, cfg.port)
        }),
        peers: cfg.peers.clone(),
        sync_replicas: cfg.sync_replicas,
        join: meta.joined,
        write_quorum: cfg.write_quorum as usize,
        data_dir: cfg.data_dir.clone(),
        meta: store,
    });
    let runtime = match &cluster {
        Some(c) => {
            // A joining node is a learner: it never bootstraps a cluster,
            // whatever --role says (its default is primary).
            let primary = fresh && cfg.role == BootRole::Primary && !meta.joined;
            Runtime::start(engine, c, meta, primary, None)?
        }
        None => Runtime::Single,
    };
    let commit_timeout = Duration::from_millis(cfg.commit_timeout_ms);
    Ok(Node::new(
        engine.clone(),
        meta,
        cluster,
        runtime,
        wall,
        commit_timeout,
    ))
}

/// The request limits of the API, from the flags.
fn limits(cfg: &Config) -> Limits {
    Limits {
        max_value_bytes: cfg.max_value_bytes,
        max_bulk_bytes: cfg.max_bulk_bytes,
        max_bulk_items: cfg.max_bulk_items,
        max_inflight_requests: cfg.max_inflight_requests,
        body_timeout: Duration::from_millis(cfg.body_timeout_ms),
        max_snapshot_bytes: cfg.max_snapshot_mib.saturating_mul(1 << 20),
        max_inflight_body_bytes: cfg.max_inflight_body_bytes,
        max_watchers: usize::try_from(cfg.max_watchers).unwrap_or(usize::MAX),
    }
}

/// The connection pools' sizes, fitted to the descriptors this process
/// may open (`api::listener`).
fn connection_budget(cfg: &Config) -> Result<api::listener::Budget> {
    let (nofile, open) = api::listener::descriptor_usage().context("reading RLIMIT_NOFILE")?;
    api::listener::connection_budget(nofile, open, cfg.max_connections, cfg.reserved_connections)
        .map_err(anyhow::Error::msg)
}

/// Reads the token file and the TLS files again at each SIGHUP; a file that
/// cannot be used leaves what it would replace as it was, and the log says
/// why.
fn reload_on_sighup(access: Option<Arc<Access>>, tls: Option<Arc<NodeTls>>, tasks: &Tasks) {
    use tokio::signal::unix::{signal, SignalKind};
    if access.is_none() && tls.is_none() {
        return;
    }
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; the token and TLS files are read only at start");
            return;
        }
    };
    tasks.spawn(async move {
        while hup.recv().await.is_some() {
            if let Some(access) = &access {
                match access.reload() {
                    Ok(n) => tracing::info!(tokens = n, file = %access.path().display(), "token file read again"),
                    Err(e) => tracing::error!(error = %e, "token file not taken; the tokens before it stay in force"),
                }
            }
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS files read again; new connections use them"),
                    Err(e) => tracing::error!(error = %e, "TLS files not taken; the certificate and CA before them stay in force"),
                }
            }
        }
    });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("kvd").chain(args.iter().copied()))
    }

    #[test]
    fn only_loopback_serves_without_tls_and_tokens_unless_insecure() {
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let auth = ["--auth-file", "t.json"];
        assert_eq!(unprotected(&cfg(&[])), None);
        assert_eq!(unprotected(&cfg(&["--bind", "127.0.0.2"])), None);
        assert_eq!(unprotected(&cfg(&["--bind", "::1"])), None);
        let open = unprotected(&cfg(&["--bind", "0.0.0.0"])).expect("refused");
        assert!(
            open.contains("0.0.0.0") && open.contains("--insecure"),
            "{open}"
        );
        assert!(
            open.contains("TLS") && open.contains("--auth-file"),
            "{open}"
        );
        let only_tls: Vec<&str> = ["--bind", "10.0.0.1"].iter().chain(&tls).copied().collect();
        let why = unprotected(&cfg(&only_tls)).expect("refused");
        assert!(
            why.contains("tokens (--auth-file)") && !why.contains("--tls-cert"),
            "{why}"
        );
        let only_auth: Vec<&str> = ["--bind", "::"].iter().chain(&auth).copied().collect();
        let why = unprotected(&cfg(&only_auth)).expect("refused");
        assert!(
            why.contains("TLS (--tls-cert") && !why.contains("--auth-file"),
            "{why}"
        );
        let both: Vec<&str> = ["--bind", "0.0.0.0"]
            .iter()
            .chain(&tls)
            .chain(&auth)
            .copied()
            .collect();
        assert_eq!(unprotected(&cfg(&both)), None);
        assert_eq!(
            unprotected(&cfg(&["--bind", "0.0.0.0", "--insecure"])),
            None
        );
    }
}
