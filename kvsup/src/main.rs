//! The `kvsup` command: `apply` starts (or updates) a cluster's supervisor
//! daemon; the other commands talk to the running daemon over loopback HTTP,
//! sending the admin token the daemon keeps in its state dir.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use kvsup::logging::{self, LogFormat};
use kvsup::manifest::Manifest;

/// `println!` that returns an error instead of panicking when stdout is
/// gone; a closed pipe (`kvsup status | head -1`) becomes [`StdoutClosed`].
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(stdout_error)?
    };
}

/// The reader of stdout went away: the command ends quietly, with success,
/// as a pipeline's producer should.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct StdoutClosed;

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// kvsup: the kvstore supervisor. Declare a cluster in a YAML manifest;
/// kvsup starts its nodes, health-checks them, restarts dead ones and
/// promotes a new primary when the primary fails.
#[derive(Parser, Debug)]
#[command(name = "kvsup", version)]
struct Cli {
    /// Supervisor to talk to (default: from -f's manifest, else
    /// http://127.0.0.1:8700).
    #[arg(long, env = "KVSUP_URL", global = true)]
    supervisor: Option<String>,

    /// Manifest whose supervisor to talk to (for commands other than apply);
    /// its admin token is read from `<stateDir>/admin.token`, `stateDir`
    /// resolved as `apply` resolves it (against the current directory).
    #[arg(short = 'f', long = "file", global = true)]
    file: Option<PathBuf>,

    /// File holding the supervisor's admin token (default: `admin.token` in
    /// the state dir of -f's manifest).
    #[arg(long, env = "KVSUP_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,

    /// How the daemon writes its log (`<stateDir>/kvsup.log`): text, or
    /// JSON lines. The filter is the KVSUP_LOG environment variable
    /// (e.g. `debug`, `kvsup=debug,reqwest=warn`; default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "KVSUP_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make the cluster match the manifest: start the supervisor daemon and
    /// its nodes if none runs, else hand the manifest to the running daemon.
    /// Applying the same file again changes nothing. One change per apply:
    /// settings taken at once, a rolling change of kvdArgs, index or the
    /// kvd binary (the nodes restarted one at a time; `kvsup status`
    /// follows it), or a refusal saying what to do. The daemon then
    /// watches the file and re-applies it when it is edited.
    Apply {
        /// kvd binary to run (default: the kvd beside this kvsup). On a
        /// running cluster: a rolling change onto this binary (default: the
        /// one the nodes run, read again, so that one replaced in place
        /// rolls too).
        #[arg(long)]
        kvd: Option<PathBuf>,
        /// Print the plan (what would change), change nothing.
        #[arg(long, conflicts_with = "foreground")]
        dry_run: bool,
        /// Run the supervisor in this process instead of forking it, logging
        /// to stderr, until SIGTERM or `kvsup down` (for a systemd unit or a
        /// container). Its state dir and API are those of a forked one.
        #[arg(long)]
        foreground: bool,
    },
    /// Nodes (role, epoch, commit index, lag, health, restarts) and the
    /// cluster's conditions (Ready, Degraded, FailoverInProgress).
    Status {
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a node's process (chaos testing). A killed node is
    /// restarted by the supervisor; a killed primary is failed over.
    Kill {
        node: String,
        /// KILL, TERM, STOP or CONT.
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    /// Planned switchover: wait until NODE has everything the primary has,
    /// then make it primary. No acknowledged write is lost.
    Promote {
        node: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Stop every node gracefully (SIGTERM) and the supervisor daemon.
    Down,
    /// Back the cluster up into FILE: from a healthy secondary (else the
    /// primary), exact at one index; written as FILE.tmp, fsync'd,
    /// verified (`kvd restore --check`), then renamed. `spec.restoreFrom`
    /// makes a new cluster from it.
    Backup {
        /// The backup file to write.
        #[arg(long)]
        to: PathBuf,
        /// kvd binary that verifies it (default: the kvd beside this kvsup).
        #[arg(long)]
        kvd: Option<PathBuf>,
    },
    /// Where a `tls: auto` cluster's CA and client token are (read from the
    /// `-f` manifest; no daemon needed).
    Creds {
        #[arg(long)]
        json: bool,
    },
    /// Print the URL of the supervisor's web dashboard (nodes, conditions,
    /// events, live charts), with the admin token in its fragment: the
    /// browser keeps a fragment to itself, so the token is never sent in a
    /// URL or logged. Opens nothing. The link is the token: keep it private.
    Dashboard,
    /// Failovers, restarts, kills and applies, oldest first.
    Events {
        #[arg(long)]
        json: bool,
    },
    /// Write the files another system runs the cluster with: systemd units
    /// for nodes on hosts, or Kubernetes objects.
    Render {
        #[command(subcommand)]
        target: RenderTarget,
    },
    /// A Jepsen-style check of the cluster: 16 clients write and read
    /// while nodes are killed or stopped through the supervisor; then
    /// acknowledged writes lost and linearizability violations are
    /// reported, and the history saved. Needs `spec.chaos: allowed` (exit
    /// 2 otherwise); exit 0 only when nothing was lost or violated.
    Chaos(kvsup::chaos::Options),
    /// Run the supervisor daemon in the foreground (`apply` starts it).
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        base_dir: PathBuf,
        #[arg(long)]
        kvd: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum RenderTarget {
    /// A unit per `runtime: external` node (kvd on its host) and one for
    /// the supervisor; with `tls: auto` the credentials are made (or loaded)
    /// first, and which files each host needs is printed.
    Systemd {
        /// Directory to write the units into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// kvd on the nodes' hosts (default: the kvd beside this kvsup).
        #[arg(long)]
        kvd: Option<PathBuf>,
        /// kvsup on the supervisor's host (default: this kvsup).
        #[arg(long)]
        kvsup: Option<PathBuf>,
    },
    /// One YAML stream: a headless Service, a StatefulSet of the nodes, a
    /// PodDisruptionBudget, the credentials' Secrets, the manifest's
    /// ConfigMap and kvsup's Deployment. It holds private keys: a file is
    /// written with mode 0600.
    Kubernetes {
        /// File to write, or - for stdout.
        #[arg(long, default_value = "-")]
        out: PathBuf,
        /// Namespace of every object (and of the nodes' addresses).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Image holding /usr/local/bin/kvd, /usr/local/bin/kvsup and /bin/sh.
        #[arg(long, default_value = "kvstore:latest")]
        image: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format) {
        eprintln!("kvsup: {e:#}");
        return ExitCode::FAILURE;
    }
    // The daemon's stderr is its log (`apply` shows its tail when it exits
    // at once); a command says what failed on one line.
    let daemon = matches!(cli.cmd, Cmd::Daemon { .. });
    let fail = |e: anyhow::Error| {
        if daemon {
            tracing::error!(error = %format_args!("{e:#}"), "the supervisor daemon failed");
        } else {
            eprintln!("kvsup: {e:#}");
        }
        ExitCode::FAILURE
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        // A chaos run that may not start changed nothing: a usage error.
        Err(e) if e.is::<kvsup::chaos::Refused>() => {
            eprintln!("kvsup: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => fail(e),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let file = cli.file.clone();
    match cli.cmd {
        Cmd::Apply {
            kvd, foreground, ..
        } if foreground => {
            let file = file.context("apply needs -f MANIFEST")?;
            apply_foreground(&file, kvd).await
        }
        Cmd::Apply { kvd, dry_run, .. } => {
            let file = file.context("apply needs -f MANIFEST")?;
            apply(&file, cli.token_file, kvd, dry_run, cli.log_format).await
        }
        Cmd::Render { target } => {
            let file = file.context("render needs -f MANIFEST")?;
            match target {
                RenderTarget::Systemd { out, kvd, kvsup } => {
                    render_systemd(&file, &out, kvd, kvsup)
                }
                RenderTarget::Kubernetes {
                    out,
                    namespace,
                    image,
                } => render_kubernetes(&file, &out, namespace, image),
            }
        }
        Cmd::Daemon { base_dir, kvd } => {
            let file = file.context("daemon needs -f MANIFEST")?;
            kvsup::server::run(file, base_dir, kvd).await
        }
        Cmd::Creds { json } => creds(&file.context("creds needs -f MANIFEST")?, json),
        Cmd::Dashboard => {
            let url = supervisor_url(cli.supervisor.as_deref(), file.as_deref())?;
            let file = token_file(cli.token_file, file.as_deref(), &url)?;
            let token = kvsup::token_file::read(&file)
                .context("cannot read the supervisor's admin token")?;
            say!("{url}/#token={}", token.to_hex());
            Ok(())
        }
        Cmd::Chaos(options) => {
            let Some(file) = file else {
                return Err(kvsup::chaos::Refused("chaos needs -f MANIFEST".into()).into());
            };
            chaos(&file, cli.supervisor.as_deref(), cli.token_file, options).await
        }
        cmd => {
            let url = supervisor_url(cli.supervisor.as_deref(), file.as_deref())?;
            let token_file = token_file(cli.token_file, file.as_deref(), &url)?;
            talk(&Api::new(&url)?.with_token(&token_file)?, cmd).await
        }
    }
}

/// The commands that talk to a running daemon.
async fn talk(c: &Api, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Status { json } => show(c, "/v1/status", json, print_status).await?,
        Cmd::Kill { node, signal } => {
            let r = c
                .post("/v1/kill", json!({"node": node, "signal": signal}), 10)
                .await?;
            say!(
                "sent {} to {node} (pid {})",
                r["signal"].as_str().unwrap_or("?"),
                r["pid"]
            );
        }
        Cmd::Promote { node, timeout_ms } => {
            let r = c
                .post(
                    "/v1/promote",
                    json!({"node": node, "timeout_ms": timeout_ms}),
                    timeout_ms / 1000 + 10,
                )
                .await?;
            say!("{node} is primary of epoch {}", r["epoch"]);
        }
        Cmd::Down => down(c).await?,
        Cmd::Backup { to, kvd } => backup(c, &to, kvd).await?,
        Cmd::Events { json } => show(c, "/v1/events", json, print_events).await?,
        Cmd::Apply { .. }
        | Cmd::Daemon { .. }
        | Cmd::Creds { .. }
        | Cmd::Render { .. }
        | Cmd::Dashboard
        | Cmd::Chaos(_) => {
            unreachable!("handled by run")
        }
    }
    Ok(())
}

/// Fetch attempts of `kvsup backup` (a backup cut short, say by a
/// snapshot that compacted the log under it, is taken again).
const BACKUP_TRIES: usize = 3;

/// `kvsup backup`: the source node from the daemon's status, the file from
/// the node, verified before it takes its name.
async fn backup(c: &Api, to: &Path, kvd: Option<PathBuf>) -> Result<()> {
    use kvsup::daemon::restore::Restore;
    let st = c.get("/v1/status").await?;
    let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
    let src = kvsup::backup::pick(&nodes).context("no healthy node to back up")?;
    let creds = match (&st["tls"], st["state_dir"].as_str()) {
        (Value::Object(_), Some(dir)) => Some(kvsup::creds::Layout::in_state_dir(Path::new(dir))),
        _ => None,
    };
    let files = creds.as_ref().map(|l| (l.ca(), l.admin_token()));
    let (http, token) =
        kvsup::backup::client(files.as_ref().map(|(ca, t)| (ca.as_path(), t.as_path())))?;
    let kvd = kvd.map_or_else(kvd_beside_kvsup, Ok)?;
    let mut last = None;
    for _ in 0..BACKUP_TRIES {
        let tried = async {
            let f = kvsup::backup::fetch(&http, token.as_deref(), &src.url, to).await?;
            let check = Restore {
                kvd: kvd.clone(),
                from: f.tmp.clone(),
            };
            let line = check
                .check()
                .await
                .context("the fetched backup is refused")?;
            kvsup::backup::commit(&f.tmp, to)?;
            anyhow::Ok((f, line))
        }
        .await;
        match tried {
            Ok((f, line)) => {
                say!(
                    "backup of cluster {}: index {} from {} ({}), {} bytes, to {} ({line})",
                    st["cluster"].as_str().unwrap_or("?"),
                    f.index,
                    src.name,
                    src.role,
                    f.bytes,
                    to.display()
                );
                return Ok(());
            }
            Err(e) => {
                let _ = std::fs::remove_file(kvsup::backup::tmp_path(to));
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}

/// GETs `path` from the daemon and prints it: the JSON document, or
/// `table` of it.
async fn show(c: &Api, path: &str, json: bool, table: fn(&Value) -> Result<()>) -> Result<()> {
    let v = c.get(path).await?;
    if json {
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table(&v)?;
    }
    Ok(())
}

fn print_events(r: &Value) -> Result<()> {
    for e in r["events"].as_array().into_iter().flatten() {
        say!(
            "{}  {:<9} {:<4} {}",
            clock(e["time_ms"].as_u64().unwrap_or(0)),
            e["kind"].as_str().unwrap_or(""),
            e["node"].as_str().unwrap_or("-"),
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn supervisor_url(flag: Option<&str>, file: Option<&Path>) -> Result<String> {
    if let Some(u) = flag {
        return Ok(u.trim_end_matches('/').to_string());
    }
    if let Some(f) = file {
        let m = Manifest::load(f).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(format!("http://127.0.0.1:{}", m.spec.supervisor.port));
    }
    Ok("http://127.0.0.1:8700".into())
}

/// Where the admin token of the supervisor at `url` is: `--token-file`,
/// else `admin.token` in the state dir of the `-f` manifest.
fn token_file(flag: Option<PathBuf>, manifest: Option<&Path>, url: &str) -> Result<PathBuf> {
    if let Some(f) = flag {
        return Ok(f);
    }
    let Some(f) = manifest else {
        bail!(
            "the supervisor at {url} needs its admin token: pass -f MANIFEST (the token is \
             <stateDir>/admin.token) or --token-file FILE"
        );
    };
    let m = Manifest::load(f).map_err(|e| anyhow::anyhow!("{e}"))?;
    let base = std::env::current_dir().context("reading the current directory")?;
    let dir = m
        .checked_state_dir(&base, &f.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(kvsup::token_file::path_in(&dir))
}

/// A small client for the daemon's API; every call has a timeout.
#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
    /// `Authorization`'s value and the file it came from; `None` only for
    /// the probe of `/health`.
    auth: Option<(String, PathBuf)>,
}

impl Api {
    fn new(base: &str) -> Result<Api> {
        Ok(Api {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            auth: None,
        })
    }

    /// This client, sending the token in `file`.
    fn with_token(&self, file: &Path) -> Result<Api> {
        // The error names the file.
        let token =
            kvsup::token_file::read(file).context("cannot read the supervisor's admin token")?;
        Ok(Api {
            auth: Some((format!("Bearer {}", token.to_hex()), file.to_path_buf())),
            ..self.clone()
        })
    }

    /// Whether a supervisor answers on the port (`/health` needs no token).
    async fn healthy(&self) -> bool {
        let r = self
            .http
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        r.is_ok_and(|r| r.status().is_success())
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .authorized(self.http.get(format!("{}{path}", self.base)))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("no kvsup supervisor answering at {}", self.base))?;
        self.decode(r).await
    }

    async fn post(&self, path: &str, body: Value, timeout_s: u64) -> Result<Value> {
        let r = self
            .authorized(self.http.post(format!("{}{path}", self.base)))
            .json(&body)
            .timeout(Duration::from_secs(timeout_s))
            .send()
            .await
            .with_context(|| format!("no kvsup supervisor answering at {}", self.base))?;
        self.decode(r).await
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((value, _)) => req.header(reqwest::header::AUTHORIZATION, value),
            None => req,
        }
    }

    async fn decode(&self, r: reqwest::Response) -> Result<Value> {
        let code = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if code.is_success() {
            return Ok(body);
        }
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map_or_else(|| format!("supervisor answered {code}"), str::to_string);
        match (&self.auth, code) {
            (Some((_, file)), reqwest::StatusCode::UNAUTHORIZED) => bail!(
                "the supervisor at {} refused the admin token from {} (is it another cluster's \
                 supervisor?): {message}",
                self.base,
                file.display()
            ),
            _ => bail!("{message}"),
        }
    }
}

/// What `kvsup apply` works with: the manifest, where its file is, where
/// apply runs (relative `stateDir`s resolve against it), and the daemon's
/// state dir, URL and token file.
struct Applying {
    manifest: Manifest,
    /// The file as given, for the messages.
    file: PathBuf,
    /// The file, absolute, for the daemon.
    path: PathBuf,
    base: PathBuf,
    state_dir: PathBuf,
    url: String,
    token_file: PathBuf,
}

/// `kvsup apply`: validates the manifest here (as the user, with the full
/// message), then hands it to the daemon that answers on its port, or
/// starts one.
async fn apply(
    file: &Path,
    token_file: Option<PathBuf>,
    kvd: Option<PathBuf>,
    dry_run: bool,
    log: LogFormat,
) -> Result<()> {
    let manifest = Manifest::load(file).map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let path =
        std::fs::canonicalize(file).with_context(|| format!("resolving {}", file.display()))?;
    let base = std::env::current_dir().context("reading the current directory")?;
    let state_dir = manifest
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let url = format!("http://127.0.0.1:{}", manifest.spec.supervisor.port);
    let token_file = token_file.unwrap_or_else(|| kvsup::token_file::path_in(&state_dir));
    let a = Applying {
        manifest,
        file: file.to_path_buf(),
        path,
        base,
        state_dir,
        url,
        token_file,
    };
    let probe = Api::new(&a.url)?;
    if probe.healthy().await {
        let api = probe.with_token(&a.token_file)?;
        let st = api.get("/v1/status").await?;
        return apply_to_running(&api, &st, &a, kvd.as_deref(), dry_run).await;
    }
    let kvd = match kvd {
        Some(k) => k,
        None => kvd_beside_kvsup()?,
    };
    if dry_run {
        let name = &a.manifest.metadata.name;
        say!(
            "cluster {name}: would start the supervisor on {} (state in {}) and nodes:",
            a.url,
            a.state_dir.display()
        );
        for n in &a.manifest.spec.nodes {
            say!("  {} on http://127.0.0.1:{}", n.name, n.port);
        }
        return Ok(());
    }
    // A new cluster from a backup: a damaged file is refused here, before
    // the daemon or anything of the cluster is made (the daemon checks
    // again before it restores).
    if let Some((r, _)) = kvsup::daemon::restore::plan(&a.manifest, &a.base, &a.state_dir, &kvd) {
        r.check()
            .await
            .with_context(|| format!("spec.restoreFrom {}", r.from.display()))?;
    }
    let child = start_daemon(&a, &kvd, log)?;
    wait_until_started(&probe, child, &a).await
}

/// The `kvd` in this kvsup's directory.
fn kvd_beside_kvsup() -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("locating kvsup")?
        .with_file_name("kvd"))
}

/// `kvsup apply --foreground`: the daemon `apply` would fork, run here.
async fn apply_foreground(file: &Path, kvd: Option<PathBuf>) -> Result<()> {
    let manifest = Manifest::load(file).map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let path =
        std::fs::canonicalize(file).with_context(|| format!("resolving {}", file.display()))?;
    let base = std::env::current_dir().context("reading the current directory")?;
    manifest
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let kvd = match kvd {
        Some(k) => k,
        None => kvd_beside_kvsup()?,
    };
    // Only nodes kvsup runs itself need the binary.
    if manifest.spec.nodes.iter().any(|n| !n.external()) && !kvd.exists() {
        bail!(
            "kvd not found at {} (build it, or pass --kvd PATH)",
            kvd.display()
        );
    }
    kvsup::server::run(path, base, kvd).await
}

/// `kvsup render systemd`: the units into `out`, after making (or
/// loading) the credentials they name; then what goes to which host.
fn render_systemd(
    file: &Path,
    out: &Path,
    kvd: Option<PathBuf>,
    kvsup_bin: Option<PathBuf>,
) -> Result<()> {
    use kvsup::render::{self, systemd};
    let m = Manifest::load(file).map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let base = std::env::current_dir().context("reading the current directory")?;
    let state_dir = m
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let kvd = render::absolute(&kvd.map_or_else(kvd_beside_kvsup, Ok)?, "kvd")?;
    let kvsup_bin = match kvsup_bin {
        Some(k) => k,
        None => std::env::current_exe().context("locating kvsup")?,
    };
    let p = systemd::Paths {
        kvd,
        kvsup: render::absolute(&kvsup_bin, "kvsup")?,
        manifest: render::absolute(file, "manifest")?,
        state_dir,
        base_dir: base,
    };
    // Refused before anything is made or written.
    let units = systemd::units(&m, &p).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    render::ensure_creds(&m, &p.state_dir)?;
    for path in render::write_units(out, &units)? {
        say!("wrote {}", path.display());
    }
    say!("copy to each host, at the same paths:");
    for line in render::copy_plan(&m, &p, out) {
        say!("  {line}");
    }
    Ok(())
}

/// `kvsup render kubernetes`: every object as one YAML stream.
fn render_kubernetes(file: &Path, out: &Path, namespace: String, image: String) -> Result<()> {
    use kvsup::render::{self, kubernetes};
    let m = Manifest::load(file).map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    let base = std::env::current_dir().context("reading the current directory")?;
    let state_dir = m
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    // Refused before the credentials are made.
    kubernetes::check_nodes(&m, &namespace)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let creds = match render::ensure_creds(&m, &state_dir)? {
        Some(layout) => Some(render::read_creds(&m, &layout)?),
        None => None,
    };
    let o = kubernetes::Options { namespace, image };
    let objects =
        kubernetes::objects(&m, &o, creds.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let yaml = kubernetes::to_yaml(&objects).map_err(|e| anyhow::anyhow!("{e}"))?;
    if out == Path::new("-") {
        std::io::stdout()
            .lock()
            .write_all(yaml.as_bytes())
            .map_err(stdout_error)?;
    } else {
        render::write_private(out, &yaml)?;
        eprintln!("wrote {} ({} objects)", out.display(), objects.len());
    }
    Ok(())
}

/// Hands the manifest to the daemon already running (which `st` is the
/// status of) and says what changed.
async fn apply_to_running(
    api: &Api,
    st: &Value,
    a: &Applying,
    kvd: Option<&Path>,
    dry_run: bool,
) -> Result<()> {
    let name = &a.manifest.metadata.name;
    if st["cluster"].as_str() != Some(name) {
        bail!(
            "the supervisor at {} runs cluster {}, not {name:?}",
            a.url,
            st["cluster"]
        );
    }
    // The daemon may run in another directory: the binary goes absolute.
    let kvd = kvd
        .map(|k| std::fs::canonicalize(k).with_context(|| format!("--kvd {}", k.display())))
        .transpose()?;
    let r = api
        .post(
            "/v1/apply",
            json!({"path": a.path, "base_dir": a.base, "dry_run": dry_run, "kvd": kvd}),
            120,
        )
        .await?;
    let changes: Vec<&str> = r["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    match (dry_run, changes.is_empty()) {
        (_, true) => say!("cluster {name}: unchanged"),
        (true, false) => say!("cluster {name}: would change:\n  {}", changes.join("\n  ")),
        (false, false) => say!("cluster {name}: configured:\n  {}", changes.join("\n  ")),
    }
    Ok(())
}

/// Forks `kvsup daemon` for the manifest: its own process group (a Ctrl-C
/// meant for this command does not reach it), output to
/// `<stateDir>/kvsup.log`. Refused while a daemon that does not answer
/// still owns the state dir.
fn start_daemon(a: &Applying, kvd: &Path, log: LogFormat) -> Result<std::process::Child> {
    if !kvd.exists() {
        bail!(
            "kvd not found at {} (build it, or pass --kvd PATH)",
            kvd.display()
        );
    }
    let kvd = std::fs::canonicalize(kvd)?;
    if let Some(pid) = read_pid(&a.state_dir.join("kvsup.pid")) {
        if kvsup::process::alive(pid) {
            bail!(
                "a kvsup daemon (pid {pid}) owns {} but does not answer on {}",
                a.state_dir.display(),
                a.url
            );
        }
    }
    // Only its owner may look in: it holds tokens (and keys, with TLS).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let log_path = a.state_dir.join("kvsup.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    std::process::Command::new(std::env::current_exe()?)
        .arg("daemon")
        .arg("-f")
        .arg(&a.path)
        .arg("--base-dir")
        .arg(&a.base)
        .arg("--kvd")
        .arg(&kvd)
        .arg("--log-format")
        .arg(log.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file))
        .process_group(0)
        .spawn()
        .context("starting the supervisor daemon")
}

/// How long `apply` waits for a new daemon to start every node.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the new daemon answers and has started every node (or seen
/// it exit at once: its log says why), then says where things are. If the
/// daemon exits first, the tail of its log is the error. The daemon makes
/// its token before it answers, so the token is read once `probe` gets an
/// answer.
async fn wait_until_started(
    probe: &Api,
    mut child: std::process::Child,
    a: &Applying,
) -> Result<()> {
    let mut api = None;
    let log_path = a.state_dir.join("kvsup.log");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "the supervisor daemon exited ({status}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if api.is_none() && probe.healthy().await {
            api = Some(probe.with_token(&a.token_file)?);
        }
        let status = match &api {
            Some(api) => api.get("/v1/status").await.ok(),
            None => None,
        };
        if let Some(st) = status {
            let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
            // An external node is not the daemon's to start: it counts as
            // started at once.
            let started = |n: &Value| {
                n["runtime"] == "external" || !n["pid"].is_null() || !n["last_exit"].is_null()
            };
            if nodes.iter().all(started) {
                return print_started(a, child.id(), &nodes);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the supervisor did not start the nodes within 30 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_started(a: &Applying, pid: u32, nodes: &[Value]) -> Result<()> {
    say!(
        "cluster {}: supervisor started on {} (pid {pid}), state in {}",
        a.manifest.metadata.name,
        a.url,
        a.state_dir.display()
    );
    for n in nodes {
        let how = match n["pid"].as_u64() {
            Some(pid) => format!("pid {pid}"),
            None if n["runtime"] == "external" => "runtime external: run where it lives".into(),
            None => format!(
                "{} (will be restarted; see {})",
                n["last_exit"].as_str().unwrap_or("exited"),
                n["log"].as_str().unwrap_or("its log")
            ),
        };
        say!(
            "  {} {} {how}",
            n["name"].as_str().unwrap_or(""),
            n["url"].as_str().unwrap_or(""),
        );
    }
    say!(
        "run `kvsup status -f {}` to watch it become Ready",
        a.file.display()
    );
    Ok(())
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

async fn down(c: &Api) -> Result<()> {
    let r = c.post("/v1/down", json!({}), 60).await?;
    for line in r["stopped"].as_array().into_iter().flatten() {
        say!("{}", line.as_str().unwrap_or(""));
    }
    if let Some(pid) = r["supervisor_pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        while kvsup::process::alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if kvsup::process::alive(pid) {
            bail!("the supervisor (pid {pid}) did not exit");
        }
    }
    say!("supervisor stopped");
    Ok(())
}

/// `kvsup chaos`: the run, then its report on stdout; a failed verdict is
/// an error (exit 1) after the report.
async fn chaos(
    file: &Path,
    supervisor: Option<&str>,
    token_flag: Option<PathBuf>,
    options: kvsup::chaos::Options,
) -> Result<()> {
    let manifest = Manifest::load(file).map_err(|e| anyhow::anyhow!("invalid manifest: {e}"))?;
    // Refused before anything else is read, so a refusal touches nothing.
    if let Some(why) = kvsup::chaos::refusal(&manifest, &options) {
        return Err(kvsup::chaos::Refused(why).into());
    }
    let base = std::env::current_dir().context("reading the current directory")?;
    let state_dir = manifest
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = supervisor_url(supervisor, Some(file))?;
    let admin_token_file = token_file(token_flag, Some(file), &url)?;
    let target = kvsup::chaos::Target {
        manifest,
        state_dir,
        supervisor: url,
        admin_token_file,
    };
    let report = kvsup::chaos::run(target, options).await?;
    say!("{}", report.render().trim_end());
    if !report.passed() {
        return Err(kvsup::chaos::Failed(report.failure()).into());
    }
    Ok(())
}

/// `kvsup creds`: the paths of the manifest's credentials.
fn creds(file: &Path, json: bool) -> Result<()> {
    let m = Manifest::load(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !m.spec.tls_auto() {
        bail!(
            "{}: the cluster has no credentials: its spec.tls is not auto",
            file.display()
        );
    }
    let base = std::env::current_dir().context("reading the current directory")?;
    let dir = m
        .checked_state_dir(&base, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let d = kvsup::creds::Layout::in_state_dir(&dir).describe();
    if json {
        say!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print_creds(&d)?;
    }
    Ok(())
}

fn print_creds(d: &Value) -> Result<()> {
    let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
    say!("CA           {}", s("ca"));
    say!("CLIENT TOKEN {}", s("client_token_file"));
    say!("ADMIN TOKEN  {}", s("admin_token_file"));
    say!("TOKEN FILE   {}", s("tokens_file"));
    Ok(())
}

fn print_status(st: &Value) -> Result<()> {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    say!(
        "CLUSTER {}  MODE {}  PRIMARY {}  EPOCH {}",
        s(&st["cluster"]),
        s(&st["mode"]),
        s(&st["primary"]),
        s(&st["epoch"])
    );
    let c = &st["conditions"];
    say!(
        "CONDITIONS Ready={} Degraded={} FailoverInProgress={}",
        s(&c["Ready"]),
        s(&c["Degraded"]),
        s(&c["FailoverInProgress"])
    );
    if let Some(line) = change_line(&st["change"]) {
        say!("{line}");
    }
    if let Some(line) = config_line(&st["config"]) {
        say!("{line}");
    }
    say!(
        "{:<6} {:<24} {:>8} {:<10} {:>6} {:>8} {:>6} {:<9} {:>8}",
        "NAME",
        "URL",
        "PID",
        "ROLE",
        "EPOCH",
        "COMMIT",
        "LAG",
        "HEALTH",
        "RESTARTS"
    );
    for n in st["nodes"].as_array().into_iter().flatten() {
        say!(
            "{:<6} {:<24} {:>8} {:<10} {:>6} {:>8} {:>6} {:<9} {:>8}",
            s(&n["name"]),
            s(&n["url"]),
            s(&n["pid"]),
            // A secondary outside the voters: a node being added.
            if n["voter"] == Value::Bool(false) && n["role"] == "secondary" {
                "learner".to_string()
            } else {
                s(&n["role"])
            },
            s(&n["epoch"]),
            s(&n["commit_index"]),
            s(&n["lag"]),
            if n["healthy"].as_bool() == Some(true) {
                "healthy"
            } else {
                "unhealthy"
            },
            s(&n["restarts"])
        );
    }
    if st["tls"].is_object() {
        print_creds(&st["tls"])?;
    }
    Ok(())
}

/// The status's last change in one line (`None` when none ran): its
/// kind, state and step, the nodes done and left, and why it failed.
fn change_line(c: &Value) -> Option<String> {
    let names = |v: &Value| {
        let list: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if list.is_empty() {
            "-".to_string()
        } else {
            list.join(",")
        }
    };
    let obj = c.as_object()?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("-");
    let mut line = format!(
        "CHANGE {} generation {} {}: {} (done {}, left {})",
        text("kind"),
        obj.get("generation")
            .map_or_else(|| "-".into(), Value::to_string),
        text("state"),
        text("step"),
        names(&c["nodes_done"]),
        names(&c["nodes_left"])
    );
    if let Some(why) = obj.get("reason").and_then(Value::as_str) {
        line.push_str(&format!(": {why}"));
    }
    Some(line)
}

/// The primary's configuration in one line (`None` outside
/// primary/secondary mode, or with no primary).
fn config_line(c: &Value) -> Option<String> {
    let obj = c.as_object()?;
    let count = |k: &str| obj.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    Some(format!(
        "CONFIG index {} ({}): {} voters, {} learners",
        obj.get("index")
            .map_or_else(|| "-".into(), Value::to_string),
        if obj.get("committed") == Some(&Value::Bool(true)) {
            "committed"
        } else {
            "not committed yet"
        },
        count("voters"),
        count("learners")
    ))
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}
