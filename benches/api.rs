//! `api`: what versions, the ordered index, ranges and compare-and-set
//! cost, measured in one run of release builds:
//!
//! - **PUT**: durable PUT/s and p50/p99 at 64 connections (100-byte
//!   values, new unique 16-byte keys) of this build's kvd beside a
//!   baseline build's (`--baseline-bin-dir DIR`, e.g. the previous
//!   commit's `target/release`), in interleaved rounds on fresh data dirs
//!   (the order alternating), medians compared (target >= 0.95x); a cell
//!   during which other processes took more than a quarter of a core is
//!   run again (twice at most) and the quietest run kept, as in
//!   `throughput`;
//! - **range scan**: 1M keys (16-byte keys, 100-byte values) paged by 1000
//!   over one keep-alive connection, with values and keys only: keys/s
//!   (the client's JSON parsing included) and each page's latency p50/p99;
//! - **compare-and-set**: 16 clients increment one hot key (GET for the
//!   value and its ETag, PUT of value + 1 with `If-Match`, again on 412):
//!   increments/s, the share of attempts refused with 412, an increment's
//!   p50/p99 (GET and PUT), and the final count checked against the
//!   increments acknowledged;
//! - **memory**: VmRSS of the kvd of the range scan once it settled after
//!   the load, beside Redis 7 holding the same keys and values (loaded
//!   with `redis-cli --pipe`) in the same run (target kvd <= 0.9x Redis).
//!
//! `cargo build --release && cargo bench --bench api -- --baseline-bin-dir DIR`
//! (`-- --help`; `-- --quick` for a short run).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use kvstore_testkit::api::encode_query;
use kvstore_testkit::bench::*;
use kvstore_testkit::Kvd;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "api",
    about = "PUT/s against a baseline build, range scans, compare-and-set and memory vs Redis.",
    override_usage = "cargo build --release && cargo bench --bench api -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run: 2 s PUT cells, one round, 100k keys, 3 s of compare-and-set
    #[arg(long)]
    quick: bool,
    /// the kvd to compare PUT/s with: DIR/kvd (skipped without it)
    #[arg(long, value_name = "DIR")]
    baseline_bin_dir: Option<PathBuf>,
    /// measured seconds per PUT cell (default 5, quick 2)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each PUT cell (default 1, quick 0.5)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// interleaved PUT rounds (default 5, quick 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// PUT connections (default 64)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_default_value = true
    )]
    conns: usize,
    /// keys of the range scan and the memory comparison (default 1M, quick 100k)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    keys: Option<u64>,
    /// keys per range page (default 1000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        hide_default_value = true
    )]
    page: usize,
    /// compare-and-set clients on the hot key (default 16)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        hide_default_value = true
    )]
    cas_clients: usize,
    /// seconds of compare-and-set (default 10, quick 3)
    #[arg(long, value_name = "S")]
    cas_secs: Option<f64>,
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
    /// extra kvd flags for both builds, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// skip the Redis memory comparison
    #[arg(long)]
    no_redis: bool,
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

/// The targets this benchmark checks.
const TARGET_PUT_RATIO: f64 = 0.95;
const TARGET_RSS_RATIO: f64 = 0.9;
const BULK_CHUNK: u64 = 10_000;
const HOT_KEY: &str = "hot";

fn main() -> ExitCode {
    exit_code("api", run())
}

struct Config {
    quick: bool,
    baseline: Option<PathBuf>,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    conns: usize,
    keys: u64,
    page: usize,
    cas_clients: usize,
    cas_time: Duration,
    value_bytes: usize,
    client_threads: usize,
    kvd_args: Vec<String>,
    redis: bool,
    quiet: Quiet,
}

impl Config {
    fn from_cli(cli: &Cli) -> Result<Config> {
        let q = cli.quick;
        let secs = |v: Option<f64>, full: f64, quick: f64| {
            Duration::from_secs_f64(v.unwrap_or(if q { quick } else { full }))
        };
        let baseline = cli.baseline_bin_dir.as_ref().map(|d| d.join("kvd"));
        if let Some(b) = &baseline {
            if !b.exists() {
                bail!("{} not found (--baseline-bin-dir)", b.display());
            }
        }
        Ok(Config {
            quick: q,
            baseline,
            duration: secs(cli.duration_secs, 5.0, 2.0),
            warmup: secs(cli.warmup_secs, 1.0, 0.5),
            rounds: cli.rounds.unwrap_or(if q { 1 } else { 5 }).max(1),
            conns: cli.conns.max(1),
            keys: cli.keys.unwrap_or(if q { 100_000 } else { 1_000_000 }),
            page: cli.page.max(1),
            cas_clients: cli.cas_clients.max(1),
            cas_time: secs(cli.cas_secs, 10.0, 3.0),
            value_bytes: cli.value_bytes,
            client_threads: cli.client_threads,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
            redis: !cli.no_redis,
            quiet: cli.quiet.clone(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "baseline_kvd": self.baseline.as_ref().map(|b| b.display().to_string()),
            "put_duration_secs": self.duration.as_secs_f64(),
            "put_warmup_secs": self.warmup.as_secs_f64(),
            "put_rounds": self.rounds,
            "put_conns": self.conns,
            "keys": self.keys,
            "key_bytes": 16,
            "value_bytes": self.value_bytes,
            "page": self.page,
            "cas_clients": self.cas_clients,
            "cas_secs": self.cas_time.as_secs_f64(),
            "client_threads": self.client_threads,
            "kvd_args": self.kvd_args,
            "max_other_cpu_pct": self.quiet.max_other_cpu,
            "retries": self.quiet.retries,
        })
    }

    fn args(&self) -> Vec<&str> {
        self.kvd_args.iter().map(String::as_str).collect()
    }
}

/// What every measurement needs.
struct Ctx<'a> {
    cfg: &'a Config,
    rt: &'a tokio::runtime::Runtime,
    ticker: &'a Ticker,
    tmp: &'a Path,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn get(path: &str) -> Result<Request<Body>> {
    Ok(Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------
// PUT/s against the baseline

/// One PUT cell: the quietest of its runs (see [`Quiet`]).
struct PutCell {
    system: &'static str,
    round: usize,
    result: LoadResult,
    cpu: CpuShare,
    runs: usize,
    /// Share of the cell's wall time some task waited for I/O (%).
    io_stall: Option<f64>,
}

impl PutCell {
    fn row(&self) -> Vec<String> {
        vec![
            self.system.to_string(),
            (self.round + 1).to_string(),
            fmt_rate(self.result.ops_per_sec()),
            fmt_ms(self.result.p50_us()),
            fmt_ms(self.result.p99_us()),
            self.result.errors.to_string(),
            format!("{:.0}%", self.cpu.server),
            format!("{:.0}%", self.cpu.other),
            self.io_stall.map_or("-".into(), |p| format!("{p:.0}%")),
            self.runs.to_string(),
        ]
    }
}

const THIS: &str = "this build";
const BASELINE: &str = "baseline";

impl Ctx<'_> {
    /// A PUT cell of the kvd at `program`, each run on a fresh data dir.
    fn put_cell(&self, program: &Path, system: &'static str, round: usize) -> Result<PutCell> {
        self.ticker.set(format!(
            "{system} PUT c={} round {}",
            self.cfg.conns,
            round + 1
        ));
        let make = kvd_put_make(Bytes::from(value_of(42, self.cfg.value_bytes)));
        let ((result, io_stall), cpu, runs) = quietest(&self.cfg.quiet, || {
            let dir = tempfile::Builder::new()
                .prefix("put-")
                .tempdir_in(self.tmp)?;
            let kvd = Kvd::start_program(program, &dir.path().join("data"), &self.cfg.args())?;
            let spec = LoadSpec {
                addr: addr(kvd.port),
                proto: Proto::Http1,
                conns: self.cfg.conns,
                warmup: self.cfg.warmup,
                duration: self.cfg.duration,
            };
            let pid = kvd.pid().context("kvd has a pid")?.to_string();
            let (t0, io0) = (Instant::now(), io_stall_us());
            let (result, cpu) = with_cpu(&pid, || {
                let live = self.ticker.live.clone();
                self.rt.block_on(run_load(&spec, make.clone(), live))
            })?;
            let wall_us = t0.elapsed().as_micros() as f64;
            let stall = io0
                .zip(io_stall_us())
                .map(|(a, b)| b.saturating_sub(a) as f64 / wall_us * 100.0);
            Ok(((result, stall), cpu))
        })?;
        Ok(PutCell {
            system,
            round,
            result,
            cpu,
            runs,
            io_stall,
        })
    }

    /// Interleaved rounds of this build and the baseline, the order
    /// alternating so that drift falls on both alike.
    fn put_rounds(&self, pb: &indicatif::ProgressBar) -> Result<Vec<PutCell>> {
        let this = kvstore_testkit::bin("kvd");
        let mut systems = vec![(this.as_path(), THIS)];
        if let Some(b) = &self.cfg.baseline {
            systems.push((b.as_path(), BASELINE));
        }
        let mut cells = Vec::new();
        for round in 0..self.cfg.rounds {
            if round % 2 == 1 {
                systems.reverse();
            }
            for (program, system) in &systems {
                cells.push(self.put_cell(program, system, round)?);
                pb.inc(1);
            }
            if round % 2 == 1 {
                systems.reverse();
            }
        }
        Ok(cells)
    }
}

fn put_summary(cells: &[PutCell]) -> Value {
    let rates = |system: &str| -> Vec<f64> {
        cells
            .iter()
            .filter(|c| c.system == system)
            .map(|c| c.result.ops_per_sec())
            .collect()
    };
    let (this, base) = (median(rates(THIS)), median(rates(BASELINE)));
    let ratio = this / base;
    json!({
        "this_put_per_sec_median": this,
        "baseline_put_per_sec_median": (!base.is_nan()).then_some(base),
        "ratio": ratio.is_finite().then_some(ratio),
        "target_ratio": TARGET_PUT_RATIO,
        "pass": ratio.is_finite().then_some(ratio >= TARGET_PUT_RATIO),
        "cells": cells.iter().map(|c| json!({
            "system": c.system,
            "round": c.round + 1,
            "result": c.result.to_json(),
            "server_cpu_pct": c.cpu.server,
            "other_cpu_pct": c.cpu.other,
            "runs": c.runs,
            "io_stall_pct": c.io_stall,
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------
// Range scans

/// One pass over every key.
struct Scan {
    keys_only: bool,
    keys: u64,
    pages: u64,
    secs: f64,
    hist: Histogram<u64>,
}

impl Scan {
    fn keys_per_sec(&self) -> f64 {
        self.keys as f64 / self.secs
    }

    fn row(&self) -> Vec<String> {
        vec![
            if self.keys_only {
                "keys only"
            } else {
                "with values"
            }
            .to_string(),
            self.keys.to_string(),
            self.pages.to_string(),
            fmt_rate(self.keys_per_sec()),
            fmt_ms(self.hist.value_at_quantile(0.5)),
            fmt_ms(self.hist.value_at_quantile(0.99)),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "keys_only": self.keys_only,
            "keys": self.keys,
            "pages": self.pages,
            "seconds": self.secs,
            "keys_per_sec": self.keys_per_sec(),
            "page_latency_us": {
                "p50": self.hist.value_at_quantile(0.5),
                "p99": self.hist.value_at_quantile(0.99),
                "max": self.hist.max(),
            },
        })
    }
}

/// Pages through every key of the kvd at `port`, `page` at a time.
async fn scan(port: u16, page: usize, keys_only: bool, expect: u64) -> Result<Scan> {
    let mut conn = Conn::http1(addr(port)).await?;
    let mut hist = new_hist();
    let (mut keys, mut pages, mut token) = (0u64, 0u64, None::<String>);
    let t0 = Instant::now();
    loop {
        let mut path = format!("/v1/kv?limit={page}");
        if keys_only {
            path.push_str("&keys_only=true");
        }
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={}", encode_query(t)));
        }
        let t = Instant::now();
        let (status, body) = conn.send(get(&path)?).await?;
        let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
        if status != StatusCode::OK {
            bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        let v: Value = serde_json::from_slice(&body)?;
        keys += v["count"].as_u64().context("a page without count")?;
        pages += 1;
        match v["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if keys != expect {
        bail!("the scan saw {keys} keys of {expect}");
    }
    Ok(Scan {
        keys_only,
        keys,
        pages,
        secs,
        hist,
    })
}

// ---------------------------------------------------------------------------
// Compare-and-set on one hot key

struct CasClient {
    done: u64,
    refused: u64,
    hist: Histogram<u64>,
}

/// Increments the hot key until `end`: GET (value and ETag), PUT of the
/// value + 1 with `If-Match`; a 412 starts over.
async fn cas_client(port: u16, end: Instant) -> Result<CasClient> {
    let mut conn = Conn::http1(addr(port)).await?;
    let mut out = CasClient {
        done: 0,
        refused: 0,
        hist: new_hist(),
    };
    let path = format!("/v1/kv/{HOT_KEY}");
    while Instant::now() < end {
        let t = Instant::now();
        let (status, headers, body) = conn.send_parts(get(&path)?).await?;
        if status != StatusCode::OK {
            bail!("GET {path}: {status}");
        }
        let etag = headers.get("etag").context("no ETag")?.clone();
        let n: u64 = std::str::from_utf8(&body)?.parse()?;
        let put = Request::put(&path)
            .header("host", "127.0.0.1")
            .header("if-match", etag)
            .body(Full::new(Bytes::from((n + 1).to_string())))?;
        match conn.send(put).await? {
            (StatusCode::OK, _) => {
                out.done += 1;
                let _ = out.hist.record((t.elapsed().as_micros() as u64).max(1));
            }
            (StatusCode::PRECONDITION_FAILED, _) => out.refused += 1,
            (s, b) => bail!("PUT {path}: {s}: {}", String::from_utf8_lossy(&b)),
        }
    }
    Ok(out)
}

/// The hot key's count.
async fn hot_count(port: u16) -> Result<u64> {
    let mut conn = Conn::http1(addr(port)).await?;
    let (status, body) = conn.send(get(&format!("/v1/kv/{HOT_KEY}"))?).await?;
    if status != StatusCode::OK {
        bail!("GET {HOT_KEY}: {status}");
    }
    Ok(std::str::from_utf8(&body)?.parse()?)
}

impl Ctx<'_> {
    /// Compare-and-set increments on a fresh kvd; checks that the final
    /// count is exactly the increments acknowledged.
    fn cas(&self) -> Result<Value> {
        self.ticker
            .set(format!("compare-and-set, {} clients", self.cfg.cas_clients));
        let dir = tempfile::Builder::new()
            .prefix("cas-")
            .tempdir_in(self.tmp)?;
        let kvd = Kvd::start(&dir.path().join("data"), &self.cfg.args())?;
        let port = kvd.port;
        let clients = self.cfg.cas_clients;
        let secs = self.cfg.cas_time.as_secs_f64();
        let (all, count) = self.rt.block_on(async move {
            let mut conn = Conn::http1(addr(port)).await?;
            let init = Request::put(format!("/v1/kv/{HOT_KEY}"))
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::from("0")))?;
            conn.send(init).await?;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let tasks: Vec<_> = (0..clients)
                .map(|_| tokio::spawn(cas_client(port, end)))
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await??);
            }
            anyhow::Ok((all, hot_count(port).await?))
        })?;
        let done: u64 = all.iter().map(|c| c.done).sum();
        let refused: u64 = all.iter().map(|c| c.refused).sum();
        let mut hist = new_hist();
        for c in &all {
            hist.add(&c.hist)?;
        }
        if count != done {
            bail!("the hot key counts {count}, but {done} increments were acknowledged");
        }
        Ok(json!({
            "clients": clients,
            "seconds": secs,
            "increments": done,
            "refused_412": refused,
            "increments_per_sec": done as f64 / secs,
            "attempts_per_sec": (done + refused) as f64 / secs,
            "refused_share": refused as f64 / (done + refused).max(1) as f64,
            "increment_latency_us": {
                "p50": hist.value_at_quantile(0.5),
                "p99": hist.value_at_quantile(0.99),
            },
            "final_count": count,
        }))
    }
}

// ---------------------------------------------------------------------------
// Memory beside Redis

impl Ctx<'_> {
    /// A kvd loaded with `keys` keys (the scan's and the memory's data).
    fn loaded_kvd(&self) -> Result<(Kvd, tempfile::TempDir, f64)> {
        let dir = tempfile::Builder::new()
            .prefix("scan-")
            .tempdir_in(self.tmp)?;
        let kvd = Kvd::start(&dir.path().join("data"), &self.cfg.args())?;
        self.ticker
            .set(format!("loading {} keys", human_count(self.cfg.keys)));
        let pb = indicatif::ProgressBar::hidden();
        let t = Instant::now();
        let (port, keys, vb) = (kvd.port, self.cfg.keys, self.cfg.value_bytes);
        self.rt
            .block_on(bulk_load(addr(port), 0, keys, BULK_CHUNK, vb, &pb))?;
        let secs = t.elapsed().as_secs_f64();
        if kvd_keys(port)? != keys {
            bail!("kvd does not hold the {keys} keys loaded");
        }
        Ok((kvd, dir, secs))
    }

    /// Redis loaded with the same data, its settled VmRSS and details.
    fn redis_rss(&self) -> Result<(u64, Value)> {
        self.ticker.set("loading Redis");
        let mut redis = start_redis(&self.tmp.join("redis"))?;
        let pb = indicatif::ProgressBar::hidden();
        let pipe = redis_load(redis.port, self.cfg.keys, self.cfg.value_bytes, &pb)?;
        let dbsize = redis_dbsize(redis.port)?;
        if dbsize != self.cfg.keys {
            bail!("Redis holds {dbsize} keys of {}", self.cfg.keys);
        }
        let (rss, hwm) = settled_rss(redis.pid())?;
        let detail = json!({
            "version": tool_version("redis-server", "--version"),
            "rss_kib": rss,
            "peak_rss_kib": hwm,
            "pipe": pipe,
            "info_memory": redis_info(redis.port, "memory"),
        });
        redis.terminate(Duration::from_secs(30))?;
        Ok((rss, detail))
    }
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
    } = start_run("api", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;
    let systems = 1 + u64::from(cfg.baseline.is_some());
    let steps = cfg.rounds as u64 * systems + 4 + u64::from(cfg.redis);
    let pb = bar(steps, "api {bar:30} {pos}/{len} {msg}");
    let ticker = Ticker::new(pb.clone());
    let ctx = Ctx {
        cfg: &cfg,
        rt: &rt,
        ticker: &ticker,
        tmp: tmp.path(),
    };

    let puts = ctx.put_rounds(&pb)?;
    let (kvd, _dir, load_secs) = ctx.loaded_kvd()?;
    pb.inc(1);
    let (kvd_rss, kvd_hwm) = settled_rss(kvd.pid().context("kvd has a pid")?)?;
    let mut scans = Vec::new();
    for keys_only in [false, true] {
        ticker.set(format!("range scan, keys_only={keys_only}"));
        scans.push(rt.block_on(scan(kvd.port, cfg.page, keys_only, cfg.keys))?);
        pb.inc(1);
    }
    let kvd_rss_after_scans = settled_rss(kvd.pid().context("kvd has a pid")?)?.0;
    drop(kvd);
    let redis = if cfg.redis {
        let r = ctx.redis_rss()?;
        pb.inc(1);
        Some(r)
    } else {
        None
    };
    let cas = ctx.cas()?;
    pb.inc(1);
    drop(ticker);
    pb.finish_and_clear();
    let noisy = noisy_start || warn_if_noisy("end");

    let memory = json!({
        "kvd_rss_kib": kvd_rss,
        "kvd_peak_rss_kib": kvd_hwm,
        "kvd_rss_after_scans_kib": kvd_rss_after_scans,
        "kvd_load_seconds": load_secs,
        "redis": redis.as_ref().map(|r| r.1.clone()),
        "ratio": redis.as_ref().map(|r| kvd_rss as f64 / r.0 as f64),
        "target_ratio": TARGET_RSS_RATIO,
        "pass": redis.as_ref().map(|r| (kvd_rss as f64 / r.0 as f64) <= TARGET_RSS_RATIO),
    });
    let put = put_summary(&puts);
    print_report(&cfg, &puts, &put, &scans, &cas, &memory);
    if noisy {
        println!("note: compilers were running during the run; the figures are noisy");
    }
    let failed = [&put["pass"], &memory["pass"]].iter().any(|p| **p == false);
    let results = json!({
        "bench": "api",
        "command": command,
        "environment": env_start,
        "noisy": noisy,
        "config": cfg.to_json(),
        "put": put,
        "range_scan": scans.iter().map(Scan::to_json).collect::<Vec<_>>(),
        "cas": cas,
        "memory": memory,
    });
    report_results("api", &results, &command)?;
    Ok(if failed && cli.strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(
    cfg: &Config,
    puts: &[PutCell],
    put: &Value,
    scans: &[Scan],
    cas: &Value,
    mem: &Value,
) {
    let mut t = Table::new(&[
        "kvd",
        "round",
        "PUT/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "kvd CPU",
        "other CPU",
        "IO stall",
        "runs",
    ]);
    for c in puts {
        t.row(c.row());
    }
    println!(
        "\nPUT, {} connections, {}-byte values, new keys:",
        cfg.conns, cfg.value_bytes
    );
    print!("{}", t.render());
    match put["ratio"].as_f64() {
        Some(r) => println!(
            "median: this build {} PUT/s, baseline {} PUT/s: {r:.3}x  (target >= {TARGET_PUT_RATIO}x) {}",
            fmt_rate(put["this_put_per_sec_median"].as_f64().unwrap_or(0.0)),
            fmt_rate(put["baseline_put_per_sec_median"].as_f64().unwrap_or(0.0)),
            pass(r >= TARGET_PUT_RATIO)
        ),
        None => println!("no baseline (--baseline-bin-dir): no ratio"),
    }

    let mut t = Table::new(&[
        "range scan",
        "keys",
        "pages",
        "keys/s",
        "page p50 ms",
        "page p99 ms",
    ]);
    for s in scans {
        t.row(s.row());
    }
    println!("\nRange scan by {} over one connection:", cfg.page);
    print!("{}", t.render());

    println!(
        "\ncompare-and-set, {} clients on one key: {} increments/s, {} attempts/s, {:.1}% refused (412), \
         increment p50 {} ms p99 {} ms; final count = increments acknowledged ({})",
        cas["clients"],
        fmt_rate(cas["increments_per_sec"].as_f64().unwrap_or(0.0)),
        fmt_rate(cas["attempts_per_sec"].as_f64().unwrap_or(0.0)),
        cas["refused_share"].as_f64().unwrap_or(0.0) * 100.0,
        fmt_ms(cas["increment_latency_us"]["p50"].as_u64().unwrap_or(0)),
        fmt_ms(cas["increment_latency_us"]["p99"].as_u64().unwrap_or(0)),
        cas["final_count"],
    );

    let kvd = mem["kvd_rss_kib"].as_u64().unwrap_or(0);
    match (mem["redis"]["rss_kib"].as_u64(), mem["ratio"].as_f64()) {
        (Some(r), Some(ratio)) => println!(
            "\nRSS with {} keys: kvd {} MiB, Redis {} MiB: {ratio:.3}x  (target <= {TARGET_RSS_RATIO}x) {}",
            human_count(cfg.keys),
            fmt_mib(kvd),
            fmt_mib(r),
            pass(ratio <= TARGET_RSS_RATIO)
        ),
        _ => println!("\nRSS with {} keys: kvd {} MiB (no Redis)", human_count(cfg.keys), fmt_mib(kvd)),
    }
}
