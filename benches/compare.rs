//! `compare`: kvd beside etcd and Redis, measured fairly in one run.
//!
//! Systems: kvd single node; kvd 3 nodes (`--sync-replicas 1`, load on the
//! primary); kvd masterless 3 nodes with `--write-quorum 1` and `2` (load
//! spread over the nodes); etcd with 1 and 3 members (JSON gateway, and gRPC
//! with `--features etcd-grpc`; load on the leader); Redis 7 with
//! `appendfsync always`. Operations: PUT of new unique 16-byte keys with
//! 100-byte values, and GET of keys the system holds, at 1, 16, 64 and 256
//! connections.
//!
//! Method. Every system goes through the same closed-loop load generator
//! (the kit's `bench` module: one tokio task per connection, one request in
//! flight each; Redis through its RESP client). A run is made of rounds
//! (3 by default); each round runs every system once, in an order rotated
//! from round to round so that drift on the shared machine hits every
//! system alike, and the medians of the rounds are compared. Within a
//! round, every PUT cell runs on freshly started servers in a fresh data
//! dir, so no PUT cell meets another cell's writes, after a `syncfs` that
//! commits the removal of the last cell's data dirs (on ext4 with `discard`
//! the next fsync would otherwise pay for trimming them); the GET cells then run
//! on the servers of the round's last PUT cell (the most connections), and
//! read random keys among those it wrote and had acknowledged (a masterless
//! cluster first waits until its digests agree). Each round also times the
//! disk itself: a few hundred 150-byte writes, each followed by fdatasync,
//! in kvd single's fresh data dir just before its 1-connection PUT cell
//! (the same disk at nearly the same moment: on a shared machine the cost
//! of an fdatasync swings with other processes' I/O), once appending to a
//! fresh file and once overwriting a region synced beforehand. The cheaper
//! is the disk's floor, and what kvd's 1-connection p50 is held to (on this
//! machine's ext4 an append's fdatasync has measured several times an
//! overwrite's, and kvd's WAL appends have come close to the overwrite's).
//! The temp dir must not be tmpfs (the kit refuses it).
//!
//! Prints the cells (medians) and the verdicts, writes
//! `bench-results/compare.json` and draws throughput against connections
//! (PUT and GET panels) to `benches/compare.png` (`--plot`).
//!
//! `bash benches/setup.sh` installs etcd and Redis; then
//! `cargo build --release && cargo bench --bench compare` (`-- --quick`
//! for about a minute).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use kvstore_testkit::bench::*;
use kvstore_testkit::{start_cluster, Kvd};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "compare",
    about = "kvd (single, 3 nodes, masterless) beside etcd (1 and 3 members) and Redis (appendfsync always): PUT and GET at 1-256 connections, in interleaved rounds on fresh servers.",
    override_usage = "cargo build --release && cargo bench [--features etcd-grpc] --bench compare -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run (~1 min): 1 round of 0.5 s cells
    #[arg(long)]
    quick: bool,
    /// interleaved rounds; medians compared (default 3, quick 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// measured seconds per cell (default 1, quick 0.5)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each cell (default 0.3, quick 0.2)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// connection counts (default 1,16,64,256)
    // `std::vec::Vec`, not `Vec`: one value holding a list, not a repeated flag.
    #[arg(long, value_name = "LIST", value_parser = parse_counts)]
    conns: Option<std::vec::Vec<u64>>,
    /// value size in bytes (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    value_bytes: usize,
    /// load generator runtime: 0 = current-thread, N = N workers (default 2)
    #[arg(long, value_name = "N", default_value_t = 2, hide_default_value = true)]
    client_threads: usize,
    /// systems to run, comma separated (default all): kvd, kvd3, ml1, ml2,
    /// etcd1, etcd3, redis, and with --features etcd-grpc etcd1-grpc, etcd3-grpc
    #[arg(long, value_name = "LIST")]
    only: Option<String>,
    /// extra flags for every kvd node, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// write + fdatasync pairs timed per round (default 300)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 300,
        hide_default_value = true
    )]
    fsync_probes: usize,
    /// where the PNG plot goes (default benches/compare.png)
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// exit non-zero when a target is not met
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// The connection count the ratios are taken at.
const RATIO_CONNS: usize = 64;
/// Bytes of each timed write of the fdatasync probe.
const PROBE_BYTES: usize = 150;

fn main() -> ExitCode {
    exit_code("compare", run())
}

// ---------------------------------------------------------------------------
// Systems

/// How etcd is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    Gateway,
    #[cfg(feature = "etcd-grpc")]
    Grpc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    KvdSingle,
    KvdCluster,
    Masterless { quorum: u8 },
    Etcd { members: u8, front: Front },
    Redis,
}

impl System {
    fn all() -> Vec<System> {
        let mut v = vec![
            System::KvdSingle,
            System::KvdCluster,
            System::Masterless { quorum: 1 },
            System::Masterless { quorum: 2 },
        ];
        for members in [1, 3] {
            v.push(System::Etcd {
                members,
                front: Front::Gateway,
            });
            #[cfg(feature = "etcd-grpc")]
            v.push(System::Etcd {
                members,
                front: Front::Grpc,
            });
        }
        v.push(System::Redis);
        v
    }

    /// The short name `--only` takes.
    fn id(self) -> String {
        match self {
            System::KvdSingle => "kvd".into(),
            System::KvdCluster => "kvd3".into(),
            System::Masterless { quorum } => format!("ml{quorum}"),
            System::Etcd { members, front } => match front {
                Front::Gateway => format!("etcd{members}"),
                #[cfg(feature = "etcd-grpc")]
                Front::Grpc => format!("etcd{members}-grpc"),
            },
            System::Redis => "redis".into(),
        }
    }

    fn name(self) -> String {
        match self {
            System::KvdSingle => "kvd single node".into(),
            System::KvdCluster => "kvd 3 nodes (sync 1)".into(),
            System::Masterless { quorum } => format!("kvd masterless 3 nodes (wq {quorum})"),
            System::Etcd { members, front } => {
                let what = if members == 1 { "member" } else { "members" };
                let via = match front {
                    Front::Gateway => "JSON gateway",
                    #[cfg(feature = "etcd-grpc")]
                    Front::Grpc => "gRPC",
                };
                format!("etcd {members} {what} ({via})")
            }
            System::Redis => "Redis 7 (appendfsync always)".into(),
        }
    }

    fn is_etcd(self) -> bool {
        matches!(self, System::Etcd { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "PUT",
            Op::Get => "GET",
        }
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
    value_bytes: usize,
    client_threads: usize,
    systems: Vec<System>,
    kvd_args: Vec<String>,
    fsync_probes: usize,
    plot: PathBuf,
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
            .unwrap_or_else(|| vec![1, 16, 64, 256])
            .into_iter()
            .map(|c| c.max(1) as usize)
            .collect();
        conns.sort_unstable();
        conns.dedup();
        Ok(Config {
            quick,
            rounds: cli.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
            duration: secs(cli.duration_secs, 1.0, 0.5),
            warmup: secs(cli.warmup_secs, 0.3, 0.2),
            conns,
            value_bytes: cli.value_bytes,
            client_threads: cli.client_threads,
            systems: pick_systems(cli.only.as_deref())?,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
            fsync_probes: cli.fsync_probes.max(1),
            plot: cli
                .plot
                .clone()
                .unwrap_or_else(|| workspace_root().join("benches").join("compare.png")),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "duration_secs": self.duration.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "conns": self.conns,
            "value_bytes": self.value_bytes,
            "client_threads": self.client_threads,
            "systems": self.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "kvd_args": self.kvd_args,
            "fsync_probes_per_round": self.fsync_probes,
            "fsync_probe_bytes": PROBE_BYTES,
            "ratio_conns": RATIO_CONNS,
        })
    }
}

/// The systems `--only` names (all when it is absent), in their usual order.
fn pick_systems(only: Option<&str>) -> Result<Vec<System>> {
    let all = System::all();
    let Some(only) = only else {
        return Ok(all);
    };
    let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
    for w in &wanted {
        if !all.iter().any(|s| s.id() == *w) {
            let ids: Vec<String> = all.iter().map(|s| s.id()).collect();
            bail!("--only: unknown system {w:?} (known: {})", ids.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| wanted.contains(&s.id().as_str()))
        .collect())
}

/// Refuses to start when a comparison server is not installed, saying
/// which and how to install it: the program installs nothing itself.
fn check_tools(systems: &[System]) -> Result<()> {
    let present = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok();
    let mut missing = Vec::new();
    if systems.iter().any(|s| s.is_etcd()) && !present("etcd") {
        missing.push("etcd (Debian packages etcd-server and etcd-client)");
    }
    if systems.contains(&System::Redis) && !present("redis-server") {
        missing.push("redis-server (Debian packages redis-server and redis-tools)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "not installed: {}. Run `bash benches/setup.sh` (it installs them with apt-get), \
         or leave those systems out with --only",
        missing.join("; ")
    )
}

// ---------------------------------------------------------------------------
// Servers

/// The processes of one running system.
enum Handles {
    Kvd(Vec<Kvd>),
    Other(Vec<Server>),
}

/// A system's servers, started and ready for load. Dropping it kills them
/// (by their own PIDs), then removes their data dir: fields drop in order.
struct Running {
    _handles: Handles,
    /// Ports the load goes to: the primary or leader, or every masterless
    /// node.
    targets: Vec<u16>,
    /// Every server process, for the CPU figures.
    pids: Vec<String>,
    /// Spawn to ready for load.
    started_in: Duration,
    dir: tempfile::TempDir,
}

/// What every measurement needs.
struct Ctx<'a> {
    cfg: &'a Config,
    rt: &'a tokio::runtime::Runtime,
    ticker: &'a Ticker,
    pb: &'a ProgressBar,
    http: reqwest::Client,
    tmp: &'a Path,
    value: Bytes,
}

impl Ctx<'_> {
    /// Starts `sys` fresh, in a new data dir, and waits until it takes
    /// writes (kvd) or is healthy with a leader (etcd) or answers (Redis).
    fn start(&self, sys: System) -> Result<Running> {
        self.ticker.set(format!("starting {}", sys.name()));
        // The last cell's servers and data dirs are gone: commit that first.
        settle_disk(self.tmp)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", sys.id()))
            .tempdir_in(self.tmp)?;
        let t0 = Instant::now();
        let kvd_args: Vec<&str> = self.cfg.kvd_args.iter().map(String::as_str).collect();
        let (handles, targets) = match sys {
            System::KvdSingle => {
                let node = Kvd::start(&dir.path().join("data"), &kvd_args)?;
                let port = node.port;
                (Handles::Kvd(vec![node]), vec![port])
            }
            System::KvdCluster | System::Masterless { .. } => {
                self.start_kvd_cluster(sys, dir.path(), &kvd_args)?
            }
            System::Etcd { members, .. } => {
                let servers = if members == 1 {
                    vec![start_etcd(dir.path())?]
                } else {
                    start_etcd_cluster(dir.path(), members.into())?
                };
                let leader = self.rt.block_on(etcd_leader(&self.http, &servers))?;
                (Handles::Other(servers), vec![leader])
            }
            System::Redis => {
                let redis = start_redis(dir.path())?;
                let port = redis.port;
                (Handles::Other(vec![redis]), vec![port])
            }
        };
        let pids = match &handles {
            Handles::Kvd(nodes) => nodes
                .iter()
                .filter_map(|n| n.pid().map(|p| p.to_string()))
                .collect(),
            Handles::Other(servers) => servers.iter().map(|s| s.pid().to_string()).collect(),
        };
        Ok(Running {
            _handles: handles,
            targets,
            pids,
            started_in: t0.elapsed(),
            dir,
        })
    }

    /// A 3-node kvd cluster linked directly on loopback: primary/secondary
    /// (the load on the primary, n0) or masterless (the load on all three).
    fn start_kvd_cluster(
        &self,
        sys: System,
        dir: &Path,
        kvd_args: &[&str],
    ) -> Result<(Handles, Vec<u16>)> {
        let quorum;
        let mut args: Vec<&str> = match sys {
            System::Masterless { quorum: q } => {
                quorum = q.to_string();
                vec!["--mode", "masterless", "--write-quorum", &quorum]
            }
            _ => vec!["--sync-replicas", "1"],
        };
        args.extend_from_slice(kvd_args);
        let nodes = start_cluster(dir, &args)?;
        let targets: Vec<u16> = match sys {
            System::Masterless { .. } => nodes.iter().map(|n| n.port).collect(),
            _ => vec![nodes[0].port],
        };
        for &port in &targets {
            self.rt.block_on(await_writable(&self.http, port))?;
        }
        Ok((Handles::Kvd(nodes), targets))
    }

    /// The protocol and requests of `op` against `sys`, whose load goes to
    /// `port` first; GETs read `keys`.
    fn requests(
        &self,
        sys: System,
        op: Op,
        port: u16,
        keys: &Arc<WrittenKeys>,
    ) -> (Proto, Arc<MakeRequest>) {
        let _ = port; // only gRPC names the port in its requests
        match (sys, op) {
            (System::Redis, Op::Put) => (Proto::Resp, redis_set_make(self.value.clone())),
            (System::Redis, Op::Get) => (Proto::Resp, redis_get_make(keys.clone())),
            (System::Etcd { front, .. }, op) => match (front, op) {
                (Front::Gateway, Op::Put) => (Proto::Http1, etcd_gateway_put_make(&self.value)),
                (Front::Gateway, Op::Get) => (Proto::Http1, etcd_gateway_get_make(keys.clone())),
                #[cfg(feature = "etcd-grpc")]
                (Front::Grpc, Op::Put) => {
                    (Proto::Http2, etcd_grpc_put_make(port, self.value.clone()))
                }
                #[cfg(feature = "etcd-grpc")]
                (Front::Grpc, Op::Get) => (Proto::Http2, etcd_grpc_get_make(port, keys.clone())),
            },
            (_, Op::Put) => (Proto::Http1, kvd_put_make(self.value.clone())),
            (_, Op::Get) => (Proto::Http1, kvd_get_make(keys.clone())),
        }
    }

    /// One cell: `op` at `conns` connections on `run`.
    fn measure(
        &self,
        round: usize,
        sys: System,
        op: Op,
        conns: usize,
        run: &Running,
        keys: &Arc<WrittenKeys>,
    ) -> Result<(Cell, LoadResult)> {
        self.ticker.set(format!(
            "round {} {} {} c={conns}",
            round + 1,
            sys.name(),
            op.name()
        ));
        let (proto, make) = self.requests(sys, op, run.targets[0], keys);
        let spec = LoadSpec {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, run.targets[0])),
            proto,
            conns,
            warmup: self.cfg.warmup,
            duration: self.cfg.duration,
        };
        // kvd's own WAL figures, to set beside the disk probe.
        let wal0 = (sys == System::KvdSingle).then(|| kvd_wal_counters(run.targets[0]));
        let (res, cpu) = with_cpu_of(&run.pids, || {
            self.rt.block_on(run_load_spread(
                &spec,
                &run.targets,
                make,
                self.ticker.live.clone(),
            ))
        })?;
        self.pb.inc(1);
        let wal_fsync_mean_us = wal0.map(|w0| {
            let w1 = kvd_wal_counters(run.targets[0]);
            (w1.fsync_secs - w0.fsync_secs) / (w1.batches - w0.batches).max(1.0) * 1e6
        });
        let cell = Cell {
            round,
            system: sys,
            op,
            conns,
            ops_per_sec: res.ops_per_sec(),
            p50_us: res.p50_us(),
            p99_us: res.p99_us(),
            errors: res.errors,
            first_error: res.first_error.clone(),
            cpu,
            started_in: run.started_in,
            keys_read: (op == Op::Get).then(|| keys.count()),
            wal_fsync_mean_us,
        };
        Ok((cell, res))
    }

    /// Every cell of `sys` in one round: each PUT cell on fresh servers,
    /// then the GET cells on the servers of the last PUT cell. Before kvd
    /// single's 1-connection PUT cell, the disk's own write + fdatasync is
    /// timed in that node's data dir: the same disk at the same moment.
    fn system_round(
        &self,
        round: usize,
        sys: System,
        probes: &mut Vec<Probe>,
    ) -> Result<Vec<Cell>> {
        let mut cells = Vec::new();
        let none = Arc::new(WrittenKeys::default());
        let mut last: Option<(Running, Vec<u64>)> = None;
        for &conns in &self.cfg.conns {
            // The previous cell's servers go before the next start: an idle
            // cluster still ticks.
            drop(last.take());
            let run = self.start(sys)?;
            if sys == System::KvdSingle && conns == 1 {
                self.ticker
                    .set(format!("round {}: write + fdatasync probe", round + 1));
                let data = run.dir.path().join("data");
                let n = self.cfg.fsync_probes;
                probes.push(Probe {
                    append: fdatasync_probe(&data, ProbeWrite::Append, n, PROBE_BYTES)?,
                    overwrite: fdatasync_probe(&data, ProbeWrite::Overwrite, n, PROBE_BYTES)?,
                });
            }
            let (cell, res) = self.measure(round, sys, Op::Put, conns, &run, &none)?;
            cells.push(cell);
            last = Some((run, res.sent));
        }
        let Some((run, sent)) = last else {
            return Ok(cells);
        };
        if matches!(sys, System::Masterless { .. }) {
            // Each node must hold every key before it is asked for them.
            self.ticker
                .set(format!("{}: waiting for equal digests", sys.name()));
            wait_digests_equal(&run.targets, Duration::from_secs(60))?;
        }
        let keys = Arc::new(WrittenKeys::from_sent(&sent));
        for &conns in &self.cfg.conns {
            cells.push(self.measure(round, sys, Op::Get, conns, &run, &keys)?.0);
        }
        Ok(cells)
    }
}

// ---------------------------------------------------------------------------
// Cells and medians

/// One round's timing of the disk itself (see [`ProbeWrite`]).
struct Probe {
    append: Histogram<u64>,
    overwrite: Histogram<u64>,
}

/// One measured cell of one round.
struct Cell {
    round: usize,
    system: System,
    op: Op,
    conns: usize,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    first_error: Option<String>,
    cpu: CpuShare,
    /// How long the cell's servers took to start.
    started_in: Duration,
    /// For GET: how many keys the reads were spread over.
    keys_read: Option<u64>,
    /// kvd single: the mean write + fdatasync of its WAL batches over the
    /// cell (warm-up included), from its `/metrics`.
    wal_fsync_mean_us: Option<f64>,
}

impl Cell {
    fn to_json(&self) -> Value {
        json!({
            "round": self.round + 1,
            "system": self.system.name(),
            "op": self.op.name(),
            "conns": self.conns,
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
            "keys_read": self.keys_read,
            "kvd_wal_fsync_mean_us": self.wal_fsync_mean_us,
        })
    }
}

/// The median over the rounds of one system, operation and connection
/// count; errors are summed over the rounds.
struct Median {
    system: System,
    op: Op,
    conns: usize,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    server_cpu: f64,
    other_cpu: f64,
    each: Vec<f64>,
    first_error: Option<String>,
}

impl Median {
    fn of(cells: &[&Cell]) -> Option<Median> {
        let first = cells.first()?;
        let med = |f: fn(&Cell) -> f64| median(cells.iter().map(|c| f(c)).collect());
        Some(Median {
            system: first.system,
            op: first.op,
            conns: first.conns,
            ops_per_sec: med(|c| c.ops_per_sec),
            p50_us: med(|c| c.p50_us as f64),
            p99_us: med(|c| c.p99_us as f64),
            errors: cells.iter().map(|c| c.errors).sum(),
            server_cpu: med(|c| c.cpu.server),
            other_cpu: med(|c| c.cpu.other),
            each: cells.iter().map(|c| c.ops_per_sec).collect(),
            first_error: cells.iter().find_map(|c| c.first_error.clone()),
        })
    }

    fn row(&self) -> Vec<String> {
        let lo = self.each.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.each.iter().copied().fold(0.0, f64::max);
        vec![
            self.system.name(),
            self.op.name().to_string(),
            self.conns.to_string(),
            fmt_rate(self.ops_per_sec),
            fmt_ms(self.p50_us as u64),
            fmt_ms(self.p99_us as u64),
            self.errors.to_string(),
            format!("{lo:.0}-{hi:.0}"),
            format!("{:.0}%", self.server_cpu),
            format!("{:.0}%", self.other_cpu),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "system": self.system.name(),
            "id": self.system.id(),
            "op": self.op.name(),
            "conns": self.conns,
            "ops_per_sec": self.ops_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "first_error": self.first_error,
            "server_cpu_pct": self.server_cpu,
            "other_cpu_pct": self.other_cpu,
            "ops_per_sec_each_round": self.each,
        })
    }
}

/// The medians of every system, operation and connection count measured.
fn medians(cfg: &Config, cells: &[Cell]) -> Vec<Median> {
    let mut out = Vec::new();
    for &sys in &cfg.systems {
        for op in [Op::Put, Op::Get] {
            for &conns in &cfg.conns {
                let of: Vec<&Cell> = cells
                    .iter()
                    .filter(|c| c.system == sys && c.op == op && c.conns == conns)
                    .collect();
                out.extend(Median::of(&of));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Verdicts

fn find(ms: &[Median], sys: System, op: Op, conns: usize) -> Option<&Median> {
    ms.iter()
        .find(|m| m.system == sys && m.op == op && m.conns == conns)
}

/// `a / b` of PUT or GET rates at [`RATIO_CONNS`], as a verdict.
fn rate_ratio(claim: &str, a: Option<&Median>, b: Option<&Median>, target: Target) -> Verdict {
    let value = a.zip(b).map(|(a, b)| a.ops_per_sec / b.ops_per_sec);
    let detail = a
        .zip(b)
        .map(|(a, b)| {
            format!(
                "{:.0} vs {:.0} ops/s ({} vs {})",
                a.ops_per_sec,
                b.ops_per_sec,
                a.system.name(),
                b.system.name()
            )
        })
        .unwrap_or_default();
    Verdict {
        claim: claim.to_string(),
        value,
        target,
        errors: [a, b].iter().flatten().map(|m| m.errors).sum(),
        detail,
    }
}

/// The better (higher PUT/s at [`RATIO_CONNS`]) of etcd's front ends with
/// `members` members: the stricter comparison.
fn best_etcd(ms: &[Median], members: u8) -> Option<&Median> {
    ms.iter()
        .filter(|m| {
            matches!(m.system, System::Etcd { members: n, .. } if n == members)
                && m.op == Op::Put
                && m.conns == RATIO_CONNS
        })
        .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec))
}

/// The comparisons the product asks for, each met or not.
fn verdicts(ms: &[Median], fsync_p50_us: f64) -> Vec<Verdict> {
    let c = RATIO_CONNS;
    let kvd = |op| find(ms, System::KvdSingle, op, c);
    let kvd3 = find(ms, System::KvdCluster, Op::Put, c);
    let etcd3 = best_etcd(ms, 3);
    let redis = |op| find(ms, System::Redis, op, c);
    let ml2 = find(ms, System::Masterless { quorum: 2 }, Op::Put, c);
    let mut v = vec![
        rate_ratio(
            &format!("kvd 3-node / kvd single, PUT/s at {c} conns"),
            kvd3,
            kvd(Op::Put),
            Target::AtLeast(0.7),
        ),
        rate_ratio(
            &format!("kvd 3-node / etcd 3-member (the better front end), PUT/s at {c} conns"),
            kvd3,
            etcd3,
            Target::AtLeast(4.0),
        ),
    ];
    v.push(Verdict {
        claim: format!("kvd 3-node p99 / etcd 3-member p99, PUT at {c} conns"),
        value: kvd3.zip(etcd3).map(|(k, e)| k.p99_us / e.p99_us),
        target: Target::AtMost(1.0),
        errors: [kvd3, etcd3].iter().flatten().map(|m| m.errors).sum(),
        detail: kvd3
            .zip(etcd3)
            .map(|(k, e)| {
                format!(
                    "{} ms vs {} ms",
                    fmt_ms(k.p99_us as u64),
                    fmt_ms(e.p99_us as u64)
                )
            })
            .unwrap_or_default(),
    });
    v.push(rate_ratio(
        &format!("kvd single PUT / Redis SET (appendfsync always), at {c} conns"),
        kvd(Op::Put),
        redis(Op::Put),
        Target::AtLeast(1.0),
    ));
    v.push(rate_ratio(
        &format!("kvd single GET / Redis GET, at {c} conns"),
        kvd(Op::Get),
        redis(Op::Get),
        Target::AtLeast(1.0),
    ));
    let one = find(ms, System::KvdSingle, Op::Put, 1);
    v.push(Verdict {
        claim: "kvd single PUT p50 at 1 conn / the disk's write + fdatasync p50 (the cheaper of append and overwrite)".into(),
        value: one
            .filter(|_| fsync_p50_us.is_finite())
            .map(|k| k.p50_us / fsync_p50_us),
        target: Target::AtMost(1.3),
        errors: one.map(|m| m.errors).unwrap_or(0),
        detail: one
            .map(|k| {
                format!(
                    "{} ms vs {} ms",
                    fmt_ms(k.p50_us as u64),
                    fmt_ms(fsync_p50_us as u64)
                )
            })
            .unwrap_or_default(),
    });
    v.push(rate_ratio(
        &format!("kvd masterless wq 2 / kvd 3-node, PUT/s at {c} conns"),
        ml2,
        kvd3,
        Target::AtLeast(0.8),
    ));
    v
}

// ---------------------------------------------------------------------------
// The plot

/// Line colours, one per system in [`System::all`]'s order: kvd in blues
/// and greens, etcd in reds and oranges, Redis in purple.
fn colour(sys: System) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match sys {
        System::KvdSingle => RGBColor(31, 119, 180),
        System::KvdCluster => RGBColor(44, 160, 44),
        System::Masterless { quorum: 1 } => RGBColor(23, 190, 207),
        System::Masterless { .. } => RGBColor(0, 90, 60),
        System::Etcd { members: 1, front } => match front {
            Front::Gateway => RGBColor(255, 127, 14),
            #[cfg(feature = "etcd-grpc")]
            Front::Grpc => RGBColor(188, 189, 34),
        },
        System::Etcd { front, .. } => match front {
            Front::Gateway => RGBColor(214, 39, 40),
            #[cfg(feature = "etcd-grpc")]
            Front::Grpc => RGBColor(140, 86, 75),
        },
        System::Redis => RGBColor(148, 103, 189),
    }
}

/// plotters' errors carry the backend's error type; the message is enough.
fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Throughput against connections, one line per system: PUT on the left,
/// GET on the right, in one PNG.
fn draw_plot(path: &Path, cfg: &Config, ms: &[Median]) -> Result<()> {
    use plotters::prelude::*;
    // Text is drawn with a font a crate ships: no system fonts needed.
    // Monospaced, because ab_glyph lays text out without kerning.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| anyhow!("the plot's font does not load"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(750);
    for (area, op) in [(left, Op::Put), (right, Op::Get)] {
        draw_panel(&area, cfg, ms, op)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn draw_panel<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    cfg: &Config,
    ms: &[Median],
    op: Op,
) -> Result<()> {
    use plotters::prelude::*;
    let ymax = ms
        .iter()
        .filter(|m| m.op == op)
        .map(|m| m.ops_per_sec)
        .fold(1.0, f64::max)
        * 1.1;
    // x is log2(connections) on a linear axis, so that the ticks fall on
    // powers of two (1, 2, 4 .. 256), the measured counts among them.
    let lo = (*cfg.conns.first().unwrap_or(&1) as f64).log2().floor();
    let hi = (*cfg.conns.last().unwrap_or(&256) as f64)
        .log2()
        .ceil()
        .max(lo + 1.0);
    let title = format!(
        "{} ops/s (median of {} rounds) by connections",
        op.name(),
        cfg.rounds
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .build_cartesian_2d(lo..hi, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("ops/s")
        .x_labels((hi - lo) as usize + 1)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    for &sys in &cfg.systems {
        let pts: Vec<(f64, f64)> = ms
            .iter()
            .filter(|m| m.system == sys && m.op == op)
            .map(|m| ((m.conns as f64).log2(), m.ops_per_sec))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let style = colour(sys).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(plot_err)?
            .label(sys.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour(sys).filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The run

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::from_cli(&cli)?;
    check_tools(&cfg.systems)?;
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("compare", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;
    let n_cells = cfg.rounds * cfg.systems.len() * cfg.conns.len() * 2;
    let pb = bar(
        n_cells as u64,
        "compare {bar:30} {pos}/{len} {elapsed} {msg}",
    );
    let ticker = Ticker::new(pb.clone());
    let ctx = Ctx {
        cfg: &cfg,
        rt: &rt,
        ticker: &ticker,
        pb: &pb,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?,
        tmp: tmp.path(),
        value: Bytes::from(value_of(42, cfg.value_bytes)),
    };
    let started = Instant::now();
    let mut cells = Vec::new();
    let mut probes = Vec::new();
    for round in 0..cfg.rounds {
        let mut order = cfg.systems.clone();
        let turn = round % order.len().max(1);
        order.rotate_left(turn);
        for sys in order {
            cells.extend(ctx.system_round(round, sys, &mut probes)?);
        }
    }
    drop(ticker);
    pb.finish_with_message("done");
    let run_secs = started.elapsed().as_secs_f64();
    let noisy_end = warn_if_noisy("end");
    report(
        &cfg,
        &cli,
        &cells,
        &probes,
        run_secs,
        noisy_start || noisy_end,
        env_start,
        &command,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Config,
    cli: &Cli,
    cells: &[Cell],
    probes: &[Probe],
    run_secs: f64,
    noisy: bool,
    env_start: Value,
    command: &str,
) -> Result<ExitCode> {
    let ms = medians(cfg, cells);
    let mut table = Table::new(&[
        "system",
        "op",
        "conns",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "ops/s range",
        "server CPU",
        "other CPU",
    ]);
    for m in &ms {
        table.row(m.row());
    }
    println!();
    println!(
        "compare: {} B values, {:.1} s cells after {:.1} s warm-up, median of {} interleaved rounds, fresh servers for every PUT cell ({run_secs:.0} s in all)",
        cfg.value_bytes,
        cfg.duration.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    print!("{}", table.render());
    for m in ms.iter().filter(|m| m.errors > 0) {
        println!(
            "errors: {} {} c={}: {} ({})",
            m.system.name(),
            m.op.name(),
            m.conns,
            m.errors,
            m.first_error.as_deref().unwrap_or("-")
        );
    }
    let p50s = |f: fn(&Probe) -> &Histogram<u64>| -> Vec<f64> {
        probes
            .iter()
            .map(|p| f(p).value_at_quantile(0.5) as f64)
            .collect()
    };
    let (append_p50, overwrite_p50) = (p50s(|p| &p.append), p50s(|p| &p.overwrite));
    let (append, overwrite) = (median(append_p50.clone()), median(overwrite_p50.clone()));
    // The verdict takes the cheaper: the disk's floor for a durable write.
    let fsync_p50 = append.min(overwrite);
    if !probes.is_empty() {
        println!(
            "\nthe disk, {PROBE_BYTES}-byte writes + fdatasync in kvd single's data dir just before its 1-connection cell (median of {} rounds of {}): append p50 {} ms, overwrite in place p50 {} ms",
            probes.len(),
            cfg.fsync_probes,
            fmt_ms(append as u64),
            fmt_ms(overwrite as u64),
        );
    }
    let wal_means: Vec<f64> = cells
        .iter()
        .filter(|c| c.system == System::KvdSingle && c.op == Op::Put && c.conns == 1)
        .filter_map(|c| c.wal_fsync_mean_us)
        .collect();
    if !wal_means.is_empty() {
        println!(
            "kvd single's own WAL write + fdatasync over its 1-connection cell (from /metrics): mean {} ms (median of {} rounds)",
            fmt_ms(median(wal_means) as u64),
            probes.len()
        );
    }
    let vs = verdicts(&ms, fsync_p50);
    println!();
    for v in &vs {
        println!("{}", v.line());
    }
    let met = vs.iter().filter(|v| v.met()).count();
    println!("{met} of {} targets met", vs.len());
    if noisy {
        println!("note: compilers were running during the run; the numbers are noisy");
    }
    let plotted = match draw_plot(&cfg.plot, cfg, &ms) {
        Ok(()) => {
            println!("plot: {}", cfg.plot.display());
            Some(cfg.plot.display().to_string())
        }
        Err(e) => {
            eprintln!("warning: no plot: {e:#}");
            None
        }
    };
    let results = json!({
        "bench": "compare",
        "command": command,
        "config": cfg.to_json(),
        "environment": env_start,
        "noisy": noisy,
        "run_seconds": run_secs,
        "versions": {
            "etcd": tool_version("etcd", "--version"),
            "redis": tool_version("redis-server", "--version"),
        },
        "fdatasync_probe": {
            "bytes": PROBE_BYTES,
            "append_p50_us_each_round": append_p50,
            "overwrite_p50_us_each_round": overwrite_p50,
            "append_p99_us_each_round": probes.iter().map(|p| p.append.value_at_quantile(0.99)).collect::<Vec<_>>(),
            "overwrite_p99_us_each_round": probes.iter().map(|p| p.overwrite.value_at_quantile(0.99)).collect::<Vec<_>>(),
            "p50_us_compared": fsync_p50,
        },
        "cells": cells.iter().map(Cell::to_json).collect::<Vec<_>>(),
        "medians": ms.iter().map(Median::to_json).collect::<Vec<_>>(),
        "verdicts": vs.iter().map(Verdict::to_json).collect::<Vec<_>>(),
        "plot": plotted,
    });
    report_results("compare", &results, command)?;
    Ok(if cli.strict && met < vs.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
