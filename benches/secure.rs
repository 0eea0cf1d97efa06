//! `secure`: kvd with TLS and tokens beside kvd without, measured in one run.
//!
//! Systems: a single node, and 3 nodes (`--sync-replicas 1`, the load on the
//! primary), each two ways: plain HTTP with no token file, and secured:
//! TLS on the client port (`--tls-cert/--tls-key`), the cluster's CA for
//! client certificates (`--tls-client-ca`), so the 3 nodes replicate over
//! mutual TLS between `https://` peers, and a token file (`--auth-file`)
//! whose one token every request carries (`Authorization: Bearer`). The
//! load's client presents no certificate: the token is what it proves
//! itself with, as an application would. Operation: PUT of new unique
//! 16-byte keys with 100-byte values, at 64 connections (`--conns` for
//! other counts).
//!
//! Method, as `compare`'s: every cell goes through the kit's closed-loop
//! load generator (one tokio task per connection, one request in flight
//! each; over TLS the handshakes are made before the clock starts). A run
//! is made of rounds (3 by default); each round runs every cell once, in
//! an order rotated from round to round, so that drift on the shared
//! machine hits every cell alike, and the medians of the rounds are
//! compared. Every cell runs on freshly started servers in a fresh data
//! dir, after a `syncfs` that commits the removal of the last cell's. A
//! secured cell first checks that it is what it claims: a write without
//! the token must be refused with 401. The temp dir must not be tmpfs
//! (the kit refuses it).
//!
//! The target: secured / plain PUT/s at least 0.8, for the single node and
//! for the 3 nodes, at 64 connections; any error in a cell fails its
//! verdict (64 left out of `--conns` leaves both unmeasured: not met). The
//! ratios at other connection counts are printed beside them, with no
//! target. Prints the cells (medians) and the verdicts, writes
//! `bench-results/secure.json`.
//!
//! `cargo build --release && cargo bench --bench secure` (about 1.5 minutes;
//! `-- --quick` for about 30 s). It installs nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use indicatif::ProgressBar;
use kvstore_testkit::bench::*;
use kvstore_testkit::tls::{self, TlsDir};
use kvstore_testkit::{start_cluster, Kvd};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "secure",
    about = "kvd with TLS (mutual TLS between peers) and bearer tokens beside kvd without: PUT/s of a single node and of 3 nodes, in interleaved rounds on fresh servers.",
    override_usage = "cargo build --release && cargo bench --bench secure -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run (~30 s): 2 rounds of 3 s cells
    #[arg(long)]
    quick: bool,
    /// interleaved rounds; medians compared (default 3, quick 2)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// measured seconds per cell (default 5, quick 3)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each cell (default 1, quick 0.5)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// connection counts, comma separated (default 64; at most 1024 each)
    // `std::vec::Vec`, not `Vec`: one value holding a list, not a repeated flag.
    #[arg(long, value_name = "LIST", value_parser = parse_counts)]
    conns: Option<std::vec::Vec<u64>>,
    /// load generator runtime: 0 = current-thread, N = N workers (default 2)
    #[arg(long, value_name = "N", default_value_t = 2, hide_default_value = true)]
    client_threads: usize,
    /// extra flags for every kvd node, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// exit non-zero when a target is not met
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<std::path::PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// The connection count the product's target names.
const TARGET_CONNS: usize = 64;
/// Secured / plain PUT/s must be at least this.
const TARGET_RATIO: f64 = 0.8;
/// Most connections a cell opens: each is a task and a socket here and a
/// connection slot on the server.
const MAX_CONNS: usize = 1024;
/// Bytes of every value written.
const VALUE_BYTES: usize = 100;

fn main() -> ExitCode {
    exit_code("secure", run())
}

// ---------------------------------------------------------------------------
// Cells

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Single,
    Cluster,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::Single => "kvd single node",
            Topology::Cluster => "kvd 3 nodes (sync 1)",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "3nodes",
        }
    }
}

/// Whether a cell runs plain or with TLS, mutual TLS between peers and a
/// token on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    Plain,
    Secured,
}

impl Guard {
    fn name(self) -> &'static str {
        match self {
            Guard::Plain => "plain HTTP",
            Guard::Secured => "TLS + mTLS peers + token",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Guard::Plain => "plain",
            Guard::Secured => "secured",
        }
    }
}

/// What one cell measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CellKind {
    topology: Topology,
    guard: Guard,
    conns: usize,
}

impl CellKind {
    fn label(&self) -> String {
        format!(
            "{} {} c={}",
            self.topology.name(),
            self.guard.name(),
            self.conns
        )
    }
}

// ---------------------------------------------------------------------------
// Configuration

struct Config {
    quick: bool,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    conns: Vec<usize>,
    client_threads: usize,
    kvd_args: Vec<String>,
}

impl Config {
    fn from_cli(cli: &Cli) -> Result<Config> {
        let quick = cli.quick;
        let secs = |v: Option<f64>, normal: f64, short: f64| {
            Duration::from_secs_f64(v.unwrap_or(if quick { short } else { normal }))
        };
        let mut conns: Vec<usize> = cli
            .conns
            .clone()
            .unwrap_or_else(|| vec![TARGET_CONNS as u64])
            .into_iter()
            .map(|c| c.max(1) as usize)
            .collect();
        if let Some(&c) = conns.iter().find(|&&c| c > MAX_CONNS) {
            bail!("--conns: {c} is over the limit of {MAX_CONNS}");
        }
        conns.sort_unstable();
        conns.dedup();
        Ok(Config {
            quick,
            rounds: cli.rounds.unwrap_or(if quick { 2 } else { 3 }).max(1),
            duration: secs(cli.duration_secs, 5.0, 3.0),
            warmup: secs(cli.warmup_secs, 1.0, 0.5),
            conns,
            client_threads: cli.client_threads,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
        })
    }

    /// Every cell of a round, in the first round's order: for each
    /// connection count, the single node then the 3 nodes, each plain then
    /// secured.
    fn cells(&self) -> Vec<CellKind> {
        let mut out = Vec::new();
        for &conns in &self.conns {
            for topology in [Topology::Single, Topology::Cluster] {
                for guard in [Guard::Plain, Guard::Secured] {
                    out.push(CellKind {
                        topology,
                        guard,
                        conns,
                    });
                }
            }
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "duration_secs": self.duration.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "conns": self.conns,
            "value_bytes": VALUE_BYTES,
            "client_threads": self.client_threads,
            "kvd_args": self.kvd_args,
            "target_conns": TARGET_CONNS,
            "target_ratio": TARGET_RATIO,
        })
    }
}

// ---------------------------------------------------------------------------
// Servers

/// A cell's servers, started and taking writes. Dropping it kills them (by
/// their own PIDs), then removes their data dir: fields drop in order.
struct Running {
    _nodes: Vec<Kvd>,
    /// Where the load goes: the node, or the primary.
    target: SocketAddr,
    /// Every server process, for the CPU figures.
    pids: Vec<String>,
    /// How the load reaches `target`.
    security: Security,
    /// Spawn (certificates included) to the first acknowledged write.
    started_in: Duration,
    _dir: tempfile::TempDir,
}

/// What every measurement needs.
struct Ctx<'a> {
    cfg: &'a Config,
    rt: &'a tokio::runtime::Runtime,
    ticker: &'a Ticker,
    pb: &'a ProgressBar,
    tmp: &'a Path,
    value: Bytes,
    /// The secret of the token the secured cells' load carries; random for
    /// each run, and never written anywhere but in the requests.
    token: String,
}

impl Ctx<'_> {
    /// Starts the servers of `kind` fresh, in a new data dir, and waits
    /// until they take writes.
    fn start(&self, kind: CellKind) -> Result<Running> {
        self.ticker.set(format!("starting {}", kind.label()));
        // The last cell's servers and data dirs are gone: commit that first.
        settle_disk(self.tmp)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-{}-", kind.topology.id(), kind.guard.id()))
            .tempdir_in(self.tmp)?;
        let t0 = Instant::now();
        let mut args: Vec<String> = match kind.topology {
            Topology::Single => Vec::new(),
            Topology::Cluster => vec!["--sync-replicas".into(), "1".into()],
        };
        let (nodes, security) = match kind.guard {
            Guard::Plain => {
                args.extend(self.cfg.kvd_args.iter().cloned());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let nodes = match kind.topology {
                    Topology::Single => vec![Kvd::start(&dir.path().join("data"), &args)?],
                    Topology::Cluster => start_cluster(dir.path(), &args)?,
                };
                (nodes, Security::default())
            }
            Guard::Secured => self.start_secured(kind.topology, dir.path(), args)?,
        };
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, nodes[0].port));
        self.rt.block_on(await_writable_with(target, &security))?;
        if kind.guard == Guard::Secured {
            self.rt.block_on(check_token_required(target, &security))?;
        }
        Ok(Running {
            pids: nodes
                .iter()
                .filter_map(|n| n.pid().map(|p| p.to_string()))
                .collect(),
            _nodes: nodes,
            target,
            security,
            started_in: t0.elapsed(),
            _dir: dir,
        })
    }

    /// The secured servers of `topology` in `dir`, with `args` first:
    /// certificates of a fresh CA, the token file, TLS nodes (3 of them
    /// peers over mutual TLS); and how the load reaches them.
    fn start_secured(
        &self,
        topology: Topology,
        dir: &Path,
        mut args: Vec<String>,
    ) -> Result<(Vec<Kvd>, Security)> {
        let auth_file = dir.join("tokens.json");
        std::fs::write(&auth_file, token_file(&self.token))
            .with_context(|| format!("writing {}", auth_file.display()))?;
        args.extend(["--auth-file".to_string(), auth_file.display().to_string()]);
        args.extend(self.cfg.kvd_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (certs, nodes) = match topology {
            Topology::Single => {
                let certs = TlsDir::create(&dir.join("tls"), &["n0"])?;
                let node = tls::start_node(&certs, "n0", &dir.join("data"), &args)?;
                (certs, vec![node])
            }
            Topology::Cluster => tls::start_cluster(dir, &args)?,
        };
        let security = Security::new(Some(certs.client_config(None)?), Some(&self.token))?;
        Ok((nodes, security))
    }

    /// One cell on fresh servers.
    fn measure(&self, round: usize, kind: CellKind) -> Result<Cell> {
        let run = self.start(kind)?;
        self.ticker
            .set(format!("round {} {}", round + 1, kind.label()));
        let spec = LoadSpec {
            addr: run.target,
            proto: Proto::Http1,
            conns: kind.conns,
            warmup: self.cfg.warmup,
            duration: self.cfg.duration,
        };
        let make = kvd_put_make(self.value.clone());
        let (res, cpu) = with_cpu_of(&run.pids, || {
            self.rt.block_on(run_load_with(
                &spec,
                &run.security,
                make,
                self.ticker.live.clone(),
            ))
        })?;
        self.pb.inc(1);
        Ok(Cell {
            round,
            kind,
            ops_per_sec: res.ops_per_sec(),
            p50_us: res.p50_us(),
            p99_us: res.p99_us(),
            errors: res.errors,
            first_error: res.first_error,
            cpu,
            started_in: run.started_in,
        })
    }
}

/// A token file of one token, `bench`, that may read and write every key
/// (an application's token: no admin or metrics role). It holds the
/// secret's hash only.
fn token_file(secret: &str) -> String {
    json!({"tokens": [{
        "name": "bench",
        "sha256": kvd::auth::token_hash(secret),
        "read": [""],
        "write": [""],
    }]})
    .to_string()
}

/// A secret of 128 random bits, in hex, as tokens should be.
fn random_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Refuses a secured cell whose server takes a write without the token:
/// its figures would not be those of a node that checks one.
async fn check_token_required(addr: SocketAddr, security: &Security) -> Result<()> {
    let tls_only = Security {
        authorization: None,
        ..security.clone()
    };
    let attempt = async {
        let mut conn = Conn::open(Proto::Http1, addr, &tls_only).await?;
        conn.send(kvd_put_make(Bytes::from_static(b"x"))(0, 1))
            .await
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("a write without a token got no answer in 5 s")??;
    if status.as_u16() != 401 {
        bail!(
            "a write without a token was answered HTTP {status}, not 401: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Cells and medians

/// One measured cell of one round.
struct Cell {
    round: usize,
    kind: CellKind,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    first_error: Option<String>,
    cpu: CpuShare,
    started_in: Duration,
}

impl Cell {
    fn to_json(&self) -> Value {
        json!({
            "round": self.round + 1,
            "system": self.kind.topology.name(),
            "security": self.kind.guard.name(),
            "conns": self.kind.conns,
            "ops_per_sec": self.ops_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "first_error": self.first_error,
            "server_cpu_pct": self.cpu.server,
            "loadgen_cpu_pct": self.cpu.client,
            "other_cpu_pct": self.cpu.other,
            "machine_idle_pct": self.cpu.idle,
            "servers_started_ms": self.started_in.as_secs_f64() * 1000.0,
        })
    }
}

/// The median over the rounds of one cell kind; errors are summed.
struct Median {
    kind: CellKind,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    server_cpu: f64,
    client_cpu: f64,
    other_cpu: f64,
    each: Vec<f64>,
    first_error: Option<String>,
}

impl Median {
    fn of(kind: CellKind, cells: &[Cell]) -> Option<Median> {
        let of: Vec<&Cell> = cells.iter().filter(|c| c.kind == kind).collect();
        if of.is_empty() {
            return None;
        }
        let med = |f: fn(&Cell) -> f64| median(of.iter().map(|c| f(c)).collect());
        Some(Median {
            kind,
            ops_per_sec: med(|c| c.ops_per_sec),
            p50_us: med(|c| c.p50_us as f64),
            p99_us: med(|c| c.p99_us as f64),
            errors: of.iter().map(|c| c.errors).sum(),
            server_cpu: med(|c| c.cpu.server),
            client_cpu: med(|c| c.cpu.client),
            other_cpu: med(|c| c.cpu.other),
            each: of.iter().map(|c| c.ops_per_sec).collect(),
            first_error: of.iter().find_map(|c| c.first_error.clone()),
        })
    }

    fn row(&self) -> Vec<String> {
        let lo = self.each.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.each.iter().copied().fold(0.0, f64::max);
        vec![
            self.kind.topology.name().to_string(),
            self.kind.guard.name().to_string(),
            self.kind.conns.to_string(),
            fmt_rate(self.ops_per_sec),
            fmt_ms(self.p50_us as u64),
            fmt_ms(self.p99_us as u64),
            self.errors.to_string(),
            format!("{lo:.0}-{hi:.0}"),
            format!("{:.0}%", self.server_cpu),
            format!("{:.0}%", self.client_cpu),
            format!("{:.0}%", self.other_cpu),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "system": self.kind.topology.name(),
            "security": self.kind.guard.name(),
            "conns": self.kind.conns,
            "ops_per_sec": self.ops_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "first_error": self.first_error,
            "server_cpu_pct": self.server_cpu,
            "loadgen_cpu_pct": self.client_cpu,
            "other_cpu_pct": self.other_cpu,
            "ops_per_sec_each_round": self.each,
        })
    }
}

/// Secured / plain PUT/s of `topology` at `conns`, as a verdict against
/// [`TARGET_RATIO`]; errors of both cells count.
fn verdict(ms: &[Median], topology: Topology, conns: usize) -> Verdict {
    let find = |guard| {
        ms.iter().find(|m| {
            m.kind
                == CellKind {
                    topology,
                    guard,
                    conns,
                }
        })
    };
    let (secured, plain) = (find(Guard::Secured), find(Guard::Plain));
    Verdict {
        claim: format!(
            "{}: TLS + tokens / plain, PUT/s at {conns} conns",
            topology.name()
        ),
        value: secured
            .zip(plain)
            .map(|(s, p)| s.ops_per_sec / p.ops_per_sec),
        target: Target::AtLeast(TARGET_RATIO),
        errors: [secured, plain].iter().flatten().map(|m| m.errors).sum(),
        detail: secured
            .zip(plain)
            .map(|(s, p)| format!("{:.0} vs {:.0} PUT/s", s.ops_per_sec, p.ops_per_sec))
            .unwrap_or_default(),
    }
}

/// A verdict's line, PASS or NOT met first.
fn verdict_line(v: &Verdict) -> String {
    let value = v
        .value
        .map(|x| format!("{x:.2}"))
        .unwrap_or_else(|| "not measured".into());
    let met = if v.met() { "PASS   " } else { "NOT met" };
    format!(
        "{met}  {}: {value} (target >= {TARGET_RATIO}, errors {}); {}",
        v.claim, v.errors, v.detail
    )
}

// ---------------------------------------------------------------------------
// The run

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::from_cli(&cli)?;
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("secure", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;
    let kinds = cfg.cells();
    let pb = bar(
        (cfg.rounds * kinds.len()) as u64,
        "secure {bar:30} {pos}/{len} {elapsed} {msg}",
    );
    let ticker = Ticker::new(pb.clone());
    let ctx = Ctx {
        cfg: &cfg,
        rt: &rt,
        ticker: &ticker,
        pb: &pb,
        tmp: tmp.path(),
        value: Bytes::from(value_of(42, VALUE_BYTES)),
        token: random_secret(),
    };
    let started = Instant::now();
    let mut cells = Vec::new();
    for round in 0..cfg.rounds {
        let mut order = kinds.clone();
        let turn = round % order.len().max(1);
        order.rotate_left(turn);
        for kind in order {
            cells.push(ctx.measure(round, kind)?);
        }
    }
    drop(ticker);
    pb.finish_with_message("done");
    let run_secs = started.elapsed().as_secs_f64();
    let noisy = warn_if_noisy("end") || noisy_start;
    let ms: Vec<Median> = kinds
        .iter()
        .filter_map(|&k| Median::of(k, &cells))
        .collect();
    let topologies = [Topology::Single, Topology::Cluster];
    // The target names 64 connections: those are the verdicts, measured
    // or not; the ratios at other counts are for the reader.
    let verdicts: Vec<Verdict> = topologies.map(|t| verdict(&ms, t, TARGET_CONNS)).to_vec();
    let others: Vec<Verdict> = cfg
        .conns
        .iter()
        .filter(|&&c| c != TARGET_CONNS)
        .flat_map(|&c| topologies.map(|t| verdict(&ms, t, c)))
        .collect();
    print_report(&cfg, &ms, &verdicts, &others, run_secs, noisy);
    let results = json!({
        "bench": "secure",
        "command": command,
        "config": cfg.to_json(),
        "environment": env_start,
        "noisy": noisy,
        "run_seconds": run_secs,
        "cells": cells.iter().map(Cell::to_json).collect::<Vec<_>>(),
        "medians": ms.iter().map(Median::to_json).collect::<Vec<_>>(),
        "verdicts": verdicts.iter().map(Verdict::to_json).collect::<Vec<_>>(),
        "ratios_at_other_conns": others.iter().map(|v| json!({
            "claim": v.claim,
            "value": v.value,
            "errors": v.errors,
            "detail": v.detail,
        })).collect::<Vec<_>>(),
    });
    report_results("secure", &results, &command)?;
    let all_met = verdicts.iter().all(Verdict::met);
    Ok(if cli.strict && !all_met {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(
    cfg: &Config,
    ms: &[Median],
    verdicts: &[Verdict],
    others: &[Verdict],
    run_secs: f64,
    noisy: bool,
) {
    let mut table = Table::new(&[
        "system",
        "security",
        "conns",
        "PUT/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "PUT/s range",
        "server CPU",
        "loadgen CPU",
        "other CPU",
    ]);
    for m in ms {
        table.row(m.row());
    }
    println!();
    println!(
        "secure: PUT of new keys, {VALUE_BYTES} B values, {:.1} s cells after {:.1} s warm-up, median of {} interleaved rounds, fresh servers for every cell ({run_secs:.0} s in all)",
        cfg.duration.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    print!("{}", table.render());
    for m in ms.iter().filter(|m| m.errors > 0) {
        println!(
            "errors: {}: {} ({})",
            m.kind.label(),
            m.errors,
            m.first_error.as_deref().unwrap_or("-")
        );
    }
    println!();
    for v in verdicts {
        println!("{}", verdict_line(v));
    }
    for v in others {
        let value = v.value.map(|x| format!("{x:.2}")).unwrap_or_default();
        println!(
            "(no target) {}: {value} (errors {}); {}",
            v.claim, v.errors, v.detail
        );
    }
    let met = verdicts.iter().filter(|v| v.met()).count();
    println!("{met} of {} targets met", verdicts.len());
    if noisy {
        println!("note: compilers were running during the run; the numbers are noisy");
    }
}
