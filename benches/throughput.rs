//! `throughput`: durable PUT writes/s and p50/p99 latency of kvd over HTTP at
//! 1, 16 and 64 connections on data dirs pre-populated with 0 .. 1M keys,
//! GET throughput at 64 connections, and the same PUT load against a
//! single-node etcd (JSON gateway and, with `--features etcd-grpc`, gRPC)
//! and Redis with `appendfsync always` (over RESP), all through the same
//! load generator.
//!
//! Method. Each pre-populated size is bulk-loaded once (POST /v1/bulk in
//! chunks) into a template data dir; every measured cell starts kvd on a
//! fresh copy of that template, so each cell begins with exactly the stated
//! number of keys. The load is closed-loop: one tokio task per keep-alive
//! HTTP/1.1 connection (hyper 1), each sending its next request as soon as
//! the previous one is answered, for a fixed time after a warm-up; latencies
//! go into an HdrHistogram. PUTs write new unique 16-byte keys with 100-byte
//! values; GETs read random existing keys.
//!
//! Load generator runtime: server and generator share 2 cores, so the
//! generator must stay lean. Measured on this machine (quiet, 64 conns, 3 s
//! cells, kvd at 0 keys): a current_thread runtime gave 34k PUT/s and 72k
//! GET/s, 1 worker 35-37k and 66-70k, 2 workers 36-44k and 80-86k; the
//! default is therefore a 2-worker runtime (`--client-threads`). Each cell
//! also reports the CPU used by the server, by the generator and by anything
//! else on the machine; a cell disturbed by other work is re-run.
//!
//! The target comparisons (kvd vs etcd, 1M keys vs empty) use the medians of
//! interleaved rounds on fresh servers, not single cells: one 5 s cell
//! varies by +-15% from run to run here, and interleaving spreads drift over
//! every system alike.
//!
//! Run `bash benches/setup.sh` first (installs etcd and Redis), then
//! `cargo build --release && cargo bench --bench throughput` (`-- --help`
//! lists the flags; `-- --quick` is a short run).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::Request;
use kvstore_testkit::bench::*;
use kvstore_testkit::Kvd;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "throughput",
    about = "Durable PUT and GET throughput of kvd over HTTP, beside etcd and Redis.",
    override_usage = "cargo build --release && cargo bench --features etcd-grpc --bench throughput -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run: 1 s cells, sizes 0,10k,1M
    #[arg(long)]
    quick: bool,
    /// measured seconds per cell (default 5, quick 1)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each cell (default 1, quick 0.3)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// pre-populated key counts (default 0,1k,5k,10k,20k,100k,1M)
    // `std::vec::Vec`, not `Vec`: one value holding a list, not a repeated flag.
    #[arg(long, value_name = "LIST", value_parser = parse_counts)]
    sizes: Option<std::vec::Vec<u64>>,
    /// PUT concurrencies (default 1,16,64)
    #[arg(long, value_name = "LIST", value_parser = parse_counts)]
    conns: Option<std::vec::Vec<u64>>,
    /// GET concurrency, also the etcd/Redis comparison's (default 64)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_default_value = true
    )]
    get_conns: usize,
    /// value size in bytes (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    value_bytes: usize,
    /// items per bulk request when pre-populating (default 10000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        hide_default_value = true
    )]
    chunk: u64,
    /// load generator runtime: 0 = current-thread, N = N workers (default 2)
    #[arg(long, value_name = "N", default_value_t = 2, hide_default_value = true)]
    client_threads: usize,
    /// extra kvd flags, space separated (e.g. "--snapshot-every-mib 256")
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// skip the etcd comparison
    #[arg(long)]
    no_etcd: bool,
    /// skip the Redis reference
    #[arg(long)]
    no_redis: bool,
    /// interleaved comparison rounds (kvd, etcd, Redis); medians compared (default 3, quick 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    #[command(flatten)]
    quiet: Quiet,
    /// exit non-zero when a target is missed
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// The throughput targets this benchmark checks.
const TARGET_ETCD_RATIO: f64 = 3.0;
const TARGET_SIZE_RATIO: f64 = 0.90;

fn main() -> ExitCode {
    exit_code("throughput", run())
}

struct Config {
    quick: bool,
    duration: Duration,
    warmup: Duration,
    sizes: Vec<u64>,
    conns: Vec<usize>,
    get_conns: usize,
    value_bytes: usize,
    chunk: u64,
    client_threads: usize,
    kvd_args: Vec<String>,
    etcd: bool,
    redis: bool,
    rounds: usize,
    quiet: Quiet,
}

impl Config {
    fn from_cli(cli: &Cli) -> Config {
        let quick = cli.quick;
        let default_sizes: &[u64] = if quick {
            &[0, 10_000, 1_000_000]
        } else {
            &[0, 1_000, 5_000, 10_000, 20_000, 100_000, 1_000_000]
        };
        let mut sizes = cli.sizes.clone().unwrap_or_else(|| default_sizes.to_vec());
        sizes.sort_unstable();
        sizes.dedup();
        let conns = cli
            .conns
            .clone()
            .unwrap_or_else(|| vec![1, 16, 64])
            .into_iter()
            .map(|c| c.max(1) as usize)
            .collect();
        Config {
            quick,
            duration: Duration::from_secs_f64(cli.duration_secs.unwrap_or(if quick {
                1.0
            } else {
                5.0
            })),
            warmup: Duration::from_secs_f64(cli.warmup_secs.unwrap_or(if quick {
                0.3
            } else {
                1.0
            })),
            sizes,
            conns,
            get_conns: cli.get_conns.max(1),
            value_bytes: cli.value_bytes,
            chunk: cli.chunk.max(1),
            client_threads: cli.client_threads,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
            etcd: !cli.no_etcd,
            redis: !cli.no_redis,
            rounds: cli.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
            quiet: cli.quiet.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "duration_secs": self.duration.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "sizes": self.sizes,
            "conns": self.conns,
            "get_conns": self.get_conns,
            "value_bytes": self.value_bytes,
            "bulk_chunk": self.chunk,
            "client_threads": self.client_threads,
            "load_generator": if self.client_threads == 0 {
                "tokio current_thread runtime, hyper 1 HTTP/1.1 keep-alive, one task per connection".to_string()
            } else {
                format!("tokio multi_thread runtime ({} workers), hyper 1 HTTP/1.1 keep-alive, one task per connection", self.client_threads)
            },
            "kvd_args": self.kvd_args,
            "comparison_rounds": self.rounds,
            "max_other_cpu_pct": self.quiet.max_other_cpu,
            "retries": self.quiet.retries,
        })
    }
}

/// One measured cell.
struct Cell {
    system: String,
    keys: Option<u64>,
    op: &'static str,
    conns: usize,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    /// Server CPU time over the cell as a share of one core (%).
    server_cpu: Option<f64>,
    /// The load generator's CPU time over the cell (%).
    client_cpu: Option<f64>,
    /// CPU time of everything else on the machine over the cell (%): other
    /// work competing for the cores makes the cell noisy.
    other_cpu: Option<f64>,
    /// Runs made to get one with little other CPU use (see `Quiet`).
    attempts: usize,
    detail: Value,
}

impl Cell {
    fn to_json(&self) -> Value {
        json!({
            "system": self.system,
            "keys": self.keys,
            "op": self.op,
            "conns": self.conns,
            "ops_per_sec": self.ops_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "server_cpu_pct": self.server_cpu,
            "client_cpu_pct": self.client_cpu,
            "other_cpu_pct": self.other_cpu,
            "attempts": self.attempts,
            "detail": self.detail,
        })
    }

    fn row(&self) -> Vec<String> {
        let pct = |v: Option<f64>| v.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into());
        vec![
            self.system.clone(),
            self.keys.map(human_count).unwrap_or_else(|| "-".into()),
            self.op.to_string(),
            self.conns.to_string(),
            fmt_rate(self.ops_per_sec),
            fmt_ms(self.p50_us),
            fmt_ms(self.p99_us),
            self.errors.to_string(),
            pct(self.server_cpu),
            pct(self.client_cpu),
            pct(self.other_cpu),
            self.attempts.to_string(),
        ]
    }
}

/// A kvd of one cell and its data dir, removed after the node is killed
/// (fields drop in order).
struct Node {
    kvd: Kvd,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Node {
    type Target = Kvd;
    fn deref(&self) -> &Kvd {
        &self.kvd
    }
}

/// What every measurement needs.
struct Ctx<'a> {
    cfg: &'a Config,
    rt: &'a tokio::runtime::Runtime,
    ticker: &'a Ticker,
    tmp: &'a Path,
    value: Bytes,
}

impl Ctx<'_> {
    fn spec(&self, port: u16, proto: Proto, conns: usize) -> LoadSpec {
        LoadSpec {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            proto,
            conns,
            warmup: self.cfg.warmup,
            duration: self.cfg.duration,
        }
    }

    fn template(&self, size: u64) -> PathBuf {
        self.tmp.join(format!("tpl-{size}"))
    }

    /// A PUT cell on a fresh copy of the `size`-key template. Returns the
    /// node (still running, for a GET cell), the cell and how many requests
    /// each connection sent (all answered: those keys exist).
    fn kvd_put(&self, size: u64, conns: usize, system: &str) -> Result<(Node, Cell, Vec<u64>)> {
        self.ticker
            .set(format!("{system} {} keys PUT c={conns}", human_count(size)));
        let args: Vec<&str> = self.cfg.kvd_args.iter().map(String::as_str).collect();
        let ((node, res, wal), cpu, attempts) = quietest(&self.cfg.quiet, || {
            // Each attempt starts from its own fresh copy of the template.
            let dir = tempfile::Builder::new()
                .prefix("cell-")
                .tempdir_in(self.tmp)?;
            copy_dir(&self.template(size), dir.path())?;
            let node = Node {
                kvd: Kvd::start(dir.path(), &args)?,
                _dir: dir,
            };
            let pid = node.pid().context("kvd has a pid")?.to_string();
            let make = kvd_put_make(self.value.clone());
            let wal0 = kvd_wal_counters(node.port);
            let t0 = Instant::now();
            let spec = self.spec(node.port, Proto::Http1, conns);
            let (res, cpu) = measured(self.rt, &spec, make, self.ticker, &pid)?;
            let wall = t0.elapsed().as_secs_f64();
            let wal1 = kvd_wal_counters(node.port);
            Ok(((node, res, wal_view(wal0, wal1, wall)), cpu))
        })?;
        let spec = self.spec(node.port, Proto::Http1, conns);
        let mut cell = cell_of(system, Some(size), "PUT", &spec, &res, cpu, attempts);
        cell.detail["group_commit"] = wal;
        Ok((node, cell, res.sent))
    }

    /// A GET cell on `node`, reading random existing keys: pre-populated
    /// ones, or at size 0 those the PUT cell wrote (`sent` per connection).
    fn kvd_get(&self, node: &Node, size: u64, conns: usize, sent: Vec<u64>) -> Result<Cell> {
        self.ticker
            .set(format!("kvd {} keys GET c={conns}", human_count(size)));
        let pid = node.pid().context("kvd has a pid")?.to_string();
        let spec = self.spec(node.port, Proto::Http1, conns);
        let sent = Arc::new(sent);
        let make: Arc<MakeRequest> = Arc::new(move |conn, seq| {
            let h = mix64(((conn as u64) << 40) ^ seq);
            let key = if size > 0 || sent.is_empty() {
                preload_key(h % size.max(1))
            } else {
                let c = (h % sent.len() as u64) as usize;
                write_key(c, (h >> 16) % sent[c].max(1))
            };
            Request::get(format!("/v1/kv/{key}"))
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::new()))
                .expect("a request built from valid parts")
        });
        let (res, cpu, attempts) = quietest(&self.cfg.quiet, || {
            measured(self.rt, &spec, make.clone(), self.ticker, &pid)
        })?;
        Ok(cell_of(
            "kvd",
            Some(size),
            "GET",
            &spec,
            &res,
            cpu,
            attempts,
        ))
    }

    /// PUT cells against single-node etcd: through its JSON gateway and
    /// (with the `etcd-grpc` feature) through gRPC.
    fn etcd_puts(&self, dir: &Path) -> Result<Vec<Cell>> {
        // Pushed to with `--features etcd-grpc`.
        #[allow(unused_mut)]
        let mut cells = vec![self.fresh_server_put(dir, ETCD_GATEWAY)?];
        #[cfg(feature = "etcd-grpc")]
        cells.push(self.fresh_server_put(dir, ETCD_GRPC)?);
        Ok(cells)
    }

    /// A PUT cell of new unique keys at the comparison concurrency against
    /// `system` (an etcd front end, or Redis with `appendfsync always`
    /// over RESP), through the same load generator as kvd's. Every attempt
    /// starts its server fresh in a dir of its own under `dir`: a re-run on
    /// a server that took the last run's writes would start bigger.
    fn fresh_server_put(&self, dir: &Path, system: &str) -> Result<Cell> {
        let conns = self.cfg.get_conns;
        self.ticker.set(format!("{system} PUT c={conns}"));
        std::fs::create_dir_all(dir)?;
        let ((res, spec), cpu, attempts) = quietest(&self.cfg.quiet, || {
            let tmp = tempfile::Builder::new().prefix("server-").tempdir_in(dir)?;
            let server = if system == REDIS {
                start_redis(tmp.path())?
            } else {
                start_etcd(tmp.path())?
            };
            let (proto, make) = match system {
                REDIS => (Proto::Resp, redis_set_make(self.value.clone())),
                #[cfg(feature = "etcd-grpc")]
                ETCD_GRPC => (
                    Proto::Http2,
                    etcd_grpc_put_make(server.port, self.value.clone()),
                ),
                _ => (Proto::Http1, etcd_gateway_put_make(&self.value)),
            };
            let spec = self.spec(server.port, proto, conns);
            let pid = server.pid().to_string();
            let (res, cpu) = measured(self.rt, &spec, make, self.ticker, &pid)?;
            Ok(((res, spec), cpu))
        })?;
        let op = if system == REDIS { "SET" } else { "PUT" };
        Ok(cell_of(system, None, op, &spec, &res, cpu, attempts))
    }
}

const KVD_ROUND: &str = "kvd";
const ETCD_GATEWAY: &str = "etcd (JSON gateway)";
const ETCD_GRPC: &str = "etcd (gRPC)";
const REDIS: &str = "redis (aof always)";

/// Median of the cells of one system in the comparison rounds, as a cell.
fn median_cell(cells: &[&Cell]) -> Option<Cell> {
    let first = cells.first()?;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut by_rate: Vec<&&Cell> = cells.iter().collect();
    by_rate.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    Some(Cell {
        system: first.system.clone(),
        keys: first.keys,
        op: first.op,
        conns: first.conns,
        ops_per_sec: med(cells.iter().map(|c| c.ops_per_sec).collect()),
        p50_us: med(cells.iter().map(|c| c.p50_us as f64).collect()) as u64,
        p99_us: med(cells.iter().map(|c| c.p99_us as f64).collect()) as u64,
        errors: cells.iter().map(|c| c.errors).sum(),
        server_cpu: Some(med(cells.iter().filter_map(|c| c.server_cpu).collect())),
        client_cpu: cells
            .iter()
            .filter_map(|c| c.client_cpu)
            .max_by(f64::total_cmp)
            .map(|_| med(cells.iter().filter_map(|c| c.client_cpu).collect())),
        other_cpu: Some(med(cells.iter().filter_map(|c| c.other_cpu).collect())),
        attempts: cells.iter().map(|c| c.attempts).sum(),
        detail: json!({
            "rounds": cells.len(),
            "ops_per_sec_each": cells.iter().map(|c| c.ops_per_sec).collect::<Vec<_>>(),
            "p99_us_each": cells.iter().map(|c| c.p99_us).collect::<Vec<_>>(),
            "ops_per_sec_min": by_rate.first().map(|c| c.ops_per_sec),
            "ops_per_sec_max": by_rate.last().map(|c| c.ops_per_sec),
        }),
    })
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::from_cli(&cli);
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("throughput", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;
    let kvd_args: Vec<&str> = cfg.kvd_args.iter().map(String::as_str).collect();

    // Phase 1: one template data dir per size, loaded incrementally.
    let max_size = cfg.sizes.last().copied().unwrap_or(0);
    let min_size = cfg.sizes.first().copied().unwrap_or(0);
    let pb = bar(
        max_size,
        "pre-populate {bar:40} {human_pos}/{human_len} keys {per_sec} {msg}",
    );
    let load_dir = tmp.path().join("load");
    let mut loader = Kvd::start(&load_dir, &kvd_args).context("starting kvd to pre-populate")?;
    let load_started = Instant::now();
    let mut loaded = 0;
    for &size in &cfg.sizes {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, loader.port));
        rt.block_on(bulk_load(
            addr,
            loaded,
            size,
            cfg.chunk,
            cfg.value_bytes,
            &pb,
        ))?;
        loaded = size;
        let keys = kvd_keys(loader.port)?;
        if keys != size {
            bail!("after pre-populating, kvd reports {keys} keys, expected {size}");
        }
        // A clean stop, so the template is a data dir as an operator leaves it.
        let st = loader.terminate()?;
        if !st.success() {
            bail!("kvd exited with {st} on SIGTERM; log:\n{}", loader.log());
        }
        copy_dir(&load_dir, &tmp.path().join(format!("tpl-{size}")))?;
        if size != max_size {
            loader.restart()?;
        }
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    pb.finish_with_message(format!("done in {load_secs:.1}s"));
    drop(loader);

    // Phase 2: kvd at every size and concurrency.
    let per_round = 1
        + usize::from(max_size != min_size)
        + if cfg.etcd {
            1 + usize::from(cfg!(feature = "etcd-grpc"))
        } else {
            0
        }
        + usize::from(cfg.redis);
    let n_cells = cfg.sizes.len() * (cfg.conns.len() + 1) + cfg.rounds * per_round;
    let pb = bar(n_cells as u64, "measure {bar:30} {pos}/{len} {msg}");
    let ticker = Ticker::new(pb.clone());
    let ctx = Ctx {
        cfg: &cfg,
        rt: &rt,
        ticker: &ticker,
        tmp: tmp.path(),
        value: Bytes::from(value_of(42, cfg.value_bytes)),
    };
    let mut cells: Vec<Cell> = Vec::new();
    for &size in &cfg.sizes {
        let mut put_conns = cfg.conns.clone();
        // GET runs on the node of the PUT cell with the GET concurrency, so
        // that node must exist; at size 0 GET reads the keys that PUT wrote.
        if !put_conns.contains(&cfg.get_conns) {
            put_conns.push(cfg.get_conns);
        }
        for &conns in &put_conns {
            let (node, cell, sent) = ctx.kvd_put(size, conns, "kvd")?;
            if cfg.conns.contains(&conns) {
                cells.push(cell);
                pb.inc(1);
            }
            if conns == cfg.get_conns {
                cells.push(ctx.kvd_get(&node, size, conns, sent)?);
                pb.inc(1);
            }
        }
    }

    // Phase 3: the comparisons at the GET concurrency, in interleaved
    // rounds (kvd empty, kvd largest, etcd, Redis, again...), each on fresh
    // servers: drifting background load then hits every system alike, and
    // the medians are compared.
    let (etcd_version, redis_version) = (
        cfg.etcd
            .then(|| tool_version("etcd", "--version"))
            .flatten(),
        cfg.redis
            .then(|| tool_version("redis-server", "--version"))
            .flatten(),
    );
    let mut round_cells: Vec<Cell> = Vec::new();
    for round in 0..cfg.rounds {
        let (_, cell, _) = ctx.kvd_put(min_size, cfg.get_conns, KVD_ROUND)?;
        round_cells.push(cell);
        pb.inc(1);
        if max_size != min_size {
            let (_, cell, _) = ctx.kvd_put(max_size, cfg.get_conns, KVD_ROUND)?;
            round_cells.push(cell);
            pb.inc(1);
        }
        if cfg.etcd {
            for cell in ctx.etcd_puts(&tmp.path().join(format!("etcd-{round}")))? {
                round_cells.push(cell);
                pb.inc(1);
            }
        }
        if cfg.redis {
            round_cells
                .push(ctx.fresh_server_put(&tmp.path().join(format!("redis-{round}")), REDIS)?);
            pb.inc(1);
        }
    }
    drop(ticker);
    pb.finish_with_message("done");
    let noisy_end = warn_if_noisy("end");

    // Report.
    let header = [
        "system",
        "keys",
        "op",
        "conns",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU",
        "loadgen CPU",
        "other CPU",
        "runs",
    ];
    let mut table = Table::new(&header);
    for c in &cells {
        table.row(c.row());
    }
    println!();
    println!(
        "throughput: {} B values, {:.1} s per cell after {:.1} s warm-up, load generator {}",
        cfg.value_bytes,
        cfg.duration.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        if cfg.client_threads == 0 {
            "current_thread".to_string()
        } else {
            format!("{} workers", cfg.client_threads)
        }
    );
    print!("{}", table.render());

    let c = cfg.get_conns;
    let pick = |system: &str, keys: Option<u64>| {
        let v: Vec<&Cell> = round_cells
            .iter()
            .filter(|x| x.system == system && x.keys == keys)
            .collect();
        median_cell(&v)
    };
    let kvd0 = pick(KVD_ROUND, Some(min_size));
    let kvd_max = (max_size != min_size)
        .then(|| pick(KVD_ROUND, Some(max_size)))
        .flatten();
    let etcd: Vec<Cell> = [ETCD_GATEWAY, ETCD_GRPC]
        .iter()
        .filter_map(|s| pick(s, None))
        .collect();
    let redis = pick(REDIS, None);
    let mut cmp_header = header.to_vec();
    cmp_header.push("ops/s range");
    let mut cmp = Table::new(&cmp_header);
    for x in kvd0.iter().chain(&kvd_max).chain(&etcd).chain(&redis) {
        let mut row = x.row();
        row.push(
            match (
                x.detail["ops_per_sec_min"].as_f64(),
                x.detail["ops_per_sec_max"].as_f64(),
            ) {
                (Some(lo), Some(hi)) => format!("{lo:.0}-{hi:.0}"),
                _ => "-".into(),
            },
        );
        cmp.row(row);
    }
    println!();
    println!(
        "comparison at {c} connections: median of {} interleaved rounds, fresh servers each round",
        cfg.rounds
    );
    print!("{}", cmp.render());

    // The stricter comparison: the better of etcd's two front ends.
    let etcd_best = etcd
        .iter()
        .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    let mut summary = serde_json::Map::new();
    let mut failed = false;
    println!();
    if let (Some(k), Some(e)) = (&kvd0, etcd_best) {
        let ratio = k.ops_per_sec / e.ops_per_sec;
        // Errors in either side's cells (every round) fail each verdict.
        let errors = k.errors + e.errors;
        let rate = Verdict {
            claim: format!(
                "kvd/etcd PUT/s c={c} ({} keys vs the better etcd, {})",
                human_count(min_size),
                e.system
            ),
            value: Some(ratio),
            target: Target::AtLeast(TARGET_ETCD_RATIO),
            errors,
            detail: format!("{:.0} vs {:.0} PUT/s", k.ops_per_sec, e.ops_per_sec),
        };
        let p99 = Verdict {
            claim: format!("p99 PUT c={c}, kvd / etcd"),
            value: Some(k.p99_us as f64 / e.p99_us.max(1) as f64),
            target: Target::AtMost(1.0),
            errors,
            detail: format!("{} ms vs {} ms", fmt_ms(k.p99_us), fmt_ms(e.p99_us)),
        };
        let (ok, p99_ok) = (rate.met(), p99.met());
        failed |= !ok || !p99_ok;
        println!("{}", rate.line());
        for x in &etcd {
            println!(
                "  kvd / {}: {:.2}x",
                x.system,
                k.ops_per_sec / x.ops_per_sec
            );
        }
        println!("{}", p99.line());
        summary.insert("kvd_over_etcd".into(), json!(ratio));
        summary.insert("kvd_over_etcd_target".into(), json!(TARGET_ETCD_RATIO));
        summary.insert("kvd_over_etcd_pass".into(), json!(ok));
        summary.insert("etcd_compared".into(), json!(e.system));
        summary.insert("kvd_p99_us".into(), json!(k.p99_us));
        summary.insert("etcd_p99_us".into(), json!(e.p99_us));
        summary.insert("p99_pass".into(), json!(p99_ok));
        summary.insert("errors".into(), json!(errors));
    }
    if let (Some(k), Some(r)) = (&kvd0, &redis) {
        let ratio = k.ops_per_sec / r.ops_per_sec;
        println!(
            "kvd/Redis (appendfsync always) c={c}: {ratio:.2}x, p99 {} ms vs {} ms, errors {} and {}  (reference)",
            fmt_ms(k.p99_us),
            fmt_ms(r.p99_us),
            k.errors,
            r.errors
        );
        summary.insert("kvd_over_redis".into(), json!(ratio));
    }
    if let (Some(k0), Some(km)) = (&kvd0, &kvd_max) {
        let ratio = km.ops_per_sec / k0.ops_per_sec;
        let verdict = Verdict {
            claim: format!(
                "PUT/s c={c} with {} keys / with {} keys",
                human_count(max_size),
                human_count(min_size)
            ),
            value: Some(ratio),
            target: Target::AtLeast(TARGET_SIZE_RATIO),
            errors: km.errors + k0.errors,
            detail: format!("{:.0} vs {:.0} PUT/s", km.ops_per_sec, k0.ops_per_sec),
        };
        let ok = verdict.met();
        failed |= !ok;
        println!("{}", verdict.line());
        let mut per_conns = serde_json::Map::new();
        let find = |keys: u64, conns: usize| {
            cells.iter().find(|x| {
                x.system == "kvd" && x.keys == Some(keys) && x.op == "PUT" && x.conns == conns
            })
        };
        for &cc in &cfg.conns {
            if let (Some(a), Some(b)) = (find(min_size, cc), find(max_size, cc)) {
                per_conns.insert(cc.to_string(), json!(b.ops_per_sec / a.ops_per_sec));
            }
        }
        summary.insert("largest_over_empty".into(), json!(ratio));
        summary.insert(
            "largest_over_empty_single_cells_by_conns".into(),
            Value::Object(per_conns),
        );
        summary.insert("largest_over_empty_pass".into(), json!(ok));
    }
    if noisy_start || noisy_end {
        println!("note: compilers were running during the run; the numbers are noisy");
    }

    let results = json!({
        "bench": "throughput",
        "command": command,
        "config": cfg.to_json(),
        "environment": env_start,
        "noisy": noisy_start || noisy_end,
        "prepopulate_seconds": load_secs,
        "versions": {
            "etcd": etcd_version,
            "redis": redis_version,
        },
        "cells": cells.iter().map(Cell::to_json).collect::<Vec<_>>(),
        "comparison_rounds": round_cells.iter().map(Cell::to_json).collect::<Vec<_>>(),
        "comparison_medians": kvd0.iter().chain(&kvd_max).chain(&etcd).chain(&redis)
            .map(Cell::to_json).collect::<Vec<_>>(),
        "summary": summary,
    });
    report_results("throughput", &results, &command)?;
    Ok(if failed && cli.strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs one load, measuring CPU use over it.
fn measured(
    rt: &tokio::runtime::Runtime,
    spec: &LoadSpec,
    make: Arc<MakeRequest>,
    ticker: &Ticker,
    server_pid: &str,
) -> Result<(LoadResult, CpuShare)> {
    with_cpu(server_pid, || {
        rt.block_on(run_load(spec, make, ticker.live.clone()))
    })
}

fn cell_of(
    system: &str,
    keys: Option<u64>,
    op: &'static str,
    spec: &LoadSpec,
    res: &LoadResult,
    cpu: CpuShare,
    attempts: usize,
) -> Cell {
    Cell {
        system: system.to_string(),
        keys,
        op,
        conns: spec.conns,
        ops_per_sec: res.ops_per_sec(),
        p50_us: res.p50_us(),
        p99_us: res.p99_us(),
        errors: res.errors,
        server_cpu: Some(cpu.server),
        client_cpu: Some(cpu.client),
        other_cpu: Some(cpu.other),
        attempts,
        detail: {
            let mut d = res.to_json();
            d["machine_idle_pct"] = json!(cpu.idle);
            d
        },
    }
}

/// What kvd's group commit did over a cell (warm-up included): how many
/// records one fdatasync covered, how long a batch's write + fdatasync
/// took, and the share of the time the WAL thread spent in them.
fn wal_view(before: WalCounters, after: WalCounters, wall_secs: f64) -> Value {
    let batches = after.batches - before.batches;
    let records = after.records - before.records;
    let fsync = after.fsync_secs - before.fsync_secs;
    json!({
        "batches": batches,
        "records_per_batch": if batches > 0.0 { records / batches } else { 0.0 },
        "fsync_ms_mean": if batches > 0.0 { fsync / batches * 1000.0 } else { 0.0 },
        "fsync_busy_pct": fsync / wall_secs * 100.0,
    })
}
