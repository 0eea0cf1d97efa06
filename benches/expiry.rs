//! `expiry`: what keys that expire and watches cost writers, measured on
//! release builds of kvd:
//!
//! - **expiry under load**: a kvd holding 1M keys (16-byte keys, 100-byte
//!   values) that all expire at one instant; 64 connections PUT new keys
//!   in one cell before that instant and in another from it on, while the
//!   node removes the keys in `Expire` records of at most 1000 keys: p99
//!   write latency during the expiry vs before (target <= 2x), and how
//!   long the removal took;
//! - **watch fan-out**: 100 watchers on one prefix (raw NDJSON streams,
//!   one thread each) while 16 connections PUT under it; each value
//!   carries its send time, so every event received gives a
//!   write-to-event latency: p50/p99 over all watchers;
//! - **idle watchers**: PUT/s at 64 connections with 100 open watchers on
//!   a prefix nobody writes vs none, interleaved rounds on fresh nodes,
//!   medians compared (target >= 0.9x).
//!
//! `cargo build --release && cargo bench --bench expiry` (`-- --help`;
//! `-- --quick` for a short run).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::Request;
use kvstore_testkit::bench::*;
use kvstore_testkit::ttl::{metric, now_ms};
use kvstore_testkit::watch::{kind, RawWatch};
use kvstore_testkit::Kvd;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "expiry",
    about = "Write latency while 1M keys expire, watch fan-out latency, PUT/s with idle watchers.",
    override_usage = "cargo build --release && cargo bench --bench expiry -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run: 100k keys, 2 s cells, one round
    #[arg(long)]
    quick: bool,
    /// keys that expire at once (default 1M, quick 100k)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    keys: Option<u64>,
    /// measured seconds per cell (default 5, quick 2)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each cell (default 1, quick 0.5)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// interleaved rounds of the idle-watcher comparison (default 3, quick 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// write connections of the expiry and idle-watcher cells (default 64)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_default_value = true
    )]
    conns: usize,
    /// watchers of the fan-out and idle cells (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    watchers: usize,
    /// writers of the fan-out cell (default 16)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        hide_default_value = true
    )]
    fanout_writers: usize,
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
    /// run only these parts, comma separated: expiry, fanout, idle
    #[arg(long, value_name = "LIST", default_value = "expiry,fanout,idle")]
    only: String,
    /// extra kvd flags, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    #[command(flatten)]
    quiet: Quiet,
    /// exit non-zero when a target is missed
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<std::path::PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_IDLE_RATIO: f64 = 0.9;
const BULK_CHUNK: u64 = 10_000;

struct Config {
    keys: u64,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    conns: usize,
    watchers: usize,
    fanout_writers: usize,
    value_bytes: usize,
    client_threads: usize,
    kvd_args: Vec<String>,
    quiet: Quiet,
}

impl Config {
    fn from_cli(cli: &Cli) -> Config {
        let q = cli.quick;
        let secs = |v: Option<f64>, full: f64, quick: f64| {
            Duration::from_secs_f64(v.unwrap_or(if q { quick } else { full }))
        };
        Config {
            keys: cli.keys.unwrap_or(if q { 100_000 } else { 1_000_000 }),
            duration: secs(cli.duration_secs, 5.0, 2.0),
            warmup: secs(cli.warmup_secs, 1.0, 0.5),
            rounds: cli.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
            conns: cli.conns.max(1),
            watchers: cli.watchers,
            fanout_writers: cli.fanout_writers.max(1),
            value_bytes: cli.value_bytes.max(24),
            client_threads: cli.client_threads,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
            quiet: cli.quiet.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "keys": self.keys,
            "duration_secs": self.duration.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "rounds": self.rounds,
            "conns": self.conns,
            "watchers": self.watchers,
            "fanout_writers": self.fanout_writers,
            "value_bytes": self.value_bytes,
            "client_threads": self.client_threads,
            "kvd_args": self.kvd_args,
        })
    }

    fn start_kvd(&self, tmp: &Path) -> Result<(tempfile::TempDir, Kvd)> {
        let dir = tempfile::Builder::new().prefix("kvd-").tempdir_in(tmp)?;
        let args: Vec<&str> = self.kvd_args.iter().map(String::as_str).collect();
        let kvd = Kvd::start(&dir.path().join("data"), &args)?;
        Ok((dir, kvd))
    }

    fn spec(&self, port: u16, conns: usize) -> LoadSpec {
        LoadSpec {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            proto: Proto::Http1,
            conns,
            warmup: self.warmup,
            duration: self.duration,
        }
    }
}

fn main() -> ExitCode {
    exit_code("expiry", run())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------
// Expiry under load

/// Bulk-loads keys `from..to` with the deadline `deadline_ms` (each bulk's
/// `ttl_ms` is what is left until it).
async fn load_expiring(
    port: u16,
    from: u64,
    to: u64,
    deadline_ms: u64,
    value_len: usize,
) -> Result<()> {
    let mut conn = Conn::http1(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let mut i = from;
    while i < to {
        let n = BULK_CHUNK.min(to - i);
        let ttl = deadline_ms.checked_sub(now_ms()).filter(|t| *t > 0);
        let ttl = ttl.context("the keys' deadline passed while loading them")?;
        let items: Vec<Value> = (i..i + n)
            .map(|j| json!({"key": preload_key(j), "value": value_of(j, value_len), "ttl_ms": ttl}))
            .collect();
        post_bulk(
            &mut conn,
            Bytes::from(json!({ "items": items }).to_string()),
        )
        .await?;
        i += n;
    }
    Ok(())
}

/// Polls `kvd_expired_keys_total` until it reaches `n` or `stop`: when
/// the first key and the last were removed (since `t0`).
fn watch_removals(
    port: u16,
    n: u64,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> (Option<Duration>, Option<Duration>, f64) {
    let (mut first, mut last, mut seen) = (None, None, 0.0);
    while !stop.load(Ordering::Relaxed) {
        seen = metric(port, "kvd_expired_keys_total").unwrap_or(0.0);
        if seen > 0.0 && first.is_none() {
            first = Some(t0.elapsed());
        }
        if seen >= n as f64 {
            last = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (first, last, seen)
}

fn expiry(cfg: &Config, rt: &tokio::runtime::Runtime, tmp: &Path, pb: &Ticker) -> Result<Value> {
    let (_dir, kvd) = cfg.start_kvd(tmp)?;
    let port = kvd.port;
    // A probe of 2% of the keys, which expire an hour later, gives the load
    // rate; the rest then all expire at one instant past the load and the
    // cell before it.
    pb.set("expiry: loading");
    let probe = (cfg.keys / 50).max(1000).min(cfg.keys);
    let t = Instant::now();
    rt.block_on(load_expiring(
        port,
        0,
        probe,
        now_ms() + 3_600_000,
        cfg.value_bytes,
    ))?;
    let rate = probe as f64 / t.elapsed().as_secs_f64();
    let rest = cfg.keys - probe;
    let load_est = Duration::from_secs_f64(rest as f64 / rate * 1.5 + 1.0);
    let cell = cfg.warmup + cfg.duration;
    let deadline = now_ms() + (load_est + cell + Duration::from_secs(2)).as_millis() as u64;
    rt.block_on(load_expiring(
        port,
        probe,
        cfg.keys,
        deadline,
        cfg.value_bytes,
    ))?;
    if now_ms() + cell.as_millis() as u64 + 500 > deadline {
        bail!("loading took longer than estimated; the cell before the expiry would overlap it");
    }
    let make = kvd_put_make(Bytes::from(value_of(42, cfg.value_bytes)));
    pb.set("expiry: writes before the deadline");
    let before = rt.block_on(run_load(
        &cfg.spec(port, cfg.conns),
        make.clone(),
        pb.live.clone(),
    ))?;
    // The second cell's measured part starts at the deadline.
    let start_at = deadline.saturating_sub(cfg.warmup.as_millis() as u64);
    while now_ms() < start_at {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now() + cfg.warmup;
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || watch_removals(port, rest, stop, t0))
    };
    pb.set("expiry: writes during the expiry");
    let during = rt.block_on(run_load(&cfg.spec(port, cfg.conns), make, pb.live.clone()))?;
    let wait = Instant::now() + Duration::from_secs(120);
    while !poller.is_finished() && Instant::now() < wait {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let (first, last, removed) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let ratio = during.p99_us() as f64 / before.p99_us().max(1) as f64;
    Ok(json!({
        "keys_expiring": rest,
        "load_keys_per_sec": rate,
        "before": before.to_json(),
        "during": during.to_json(),
        "p99_ratio": ratio,
        "target_p99_ratio": TARGET_P99_RATIO,
        "pass": ratio <= TARGET_P99_RATIO,
        "first_removal_after_deadline_ms": first.map(|d| d.as_secs_f64() * 1000.0),
        "all_removed_after_deadline_ms": last.map(|d| d.as_secs_f64() * 1000.0),
        "removed": removed,
    }))
}

// ---------------------------------------------------------------------------
// Watch fan-out

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// PUTs under `f/` whose value starts with the send time (µs).
fn fanout_make(value_len: usize) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| {
        let mut v = format!("{:020}-", unix_us());
        v.push_str(&"x".repeat(value_len.saturating_sub(v.len())));
        Request::put(format!("/v1/kv/f/{conn:03}/{:03}", seq % 100))
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from(v)))
            .expect("a request built from valid parts")
    })
}

/// One watcher: reads events until `stop`, recording each put's latency
/// (µs) from its value's send time if sent after `from_us`.
fn fanout_watcher(
    port: u16,
    stop: Arc<AtomicBool>,
    from_us: u64,
) -> Result<(hdrhistogram::Histogram<u64>, u64, Option<String>)> {
    let mut w = RawWatch::open(
        port,
        "prefix=f%2F&progress_ms=100",
        &[],
        Duration::from_secs(10),
    )?;
    if w.status != 200 {
        bail!("watch answered {}", w.status);
    }
    let mut hist = new_hist();
    let (mut n, mut error) = (0u64, None);
    while !stop.load(Ordering::Relaxed) {
        let Some(e) = w.next_event(Duration::from_secs(10))? else {
            break;
        };
        match kind(&e) {
            "put" => {
                let now = unix_us();
                let sent: u64 = e["value"]
                    .as_str()
                    .and_then(|v| v.get(..20)?.parse().ok())
                    .unwrap_or(0);
                if sent >= from_us {
                    let _ = hist.record(now.saturating_sub(sent).max(1));
                    n += 1;
                }
            }
            "error" => {
                error = Some(e.to_string());
                break;
            }
            _ => {}
        }
    }
    Ok((hist, n, error))
}

fn fanout(cfg: &Config, rt: &tokio::runtime::Runtime, tmp: &Path, pb: &Ticker) -> Result<Value> {
    let (_dir, kvd) = cfg.start_kvd(tmp)?;
    let port = kvd.port;
    pb.set("fan-out: opening watchers");
    let stop = Arc::new(AtomicBool::new(false));
    // Events of writes sent after the warm-up count; the watchers open
    // within it.
    let from_us = unix_us() + cfg.warmup.max(Duration::from_secs(1)).as_micros() as u64;
    let watchers: Vec<_> = (0..cfg.watchers)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || fanout_watcher(port, stop, from_us))
        })
        .collect();
    let open = poll(Duration::from_secs(30), || {
        metric(port, "kvd_watchers").unwrap_or(0.0) >= cfg.watchers as f64
    });
    if !open {
        bail!("the watchers did not all open");
    }
    pb.set("fan-out: writing");
    let mut spec = cfg.spec(port, cfg.fanout_writers);
    spec.warmup = Duration::from_micros(from_us.saturating_sub(unix_us()));
    let load = rt.block_on(run_load(
        &spec,
        fanout_make(cfg.value_bytes),
        pb.live.clone(),
    ))?;
    // The last events arrive, then the watchers stop at their next
    // progress event.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut hist = new_hist();
    let (mut min_n, mut max_n, mut errors) = (u64::MAX, 0, Vec::new());
    for w in watchers {
        match w
            .join()
            .map_err(|_| anyhow::anyhow!("a watcher panicked"))?
        {
            Ok((h, n, err)) => {
                hist.add(&h).context("merging histograms")?;
                min_n = min_n.min(n);
                max_n = max_n.max(n);
                errors.extend(err);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    Ok(json!({
        "watchers": cfg.watchers,
        "writers": cfg.fanout_writers,
        "writes": load.to_json(),
        "events_received": hist.len(),
        "events_per_watcher_min": min_n,
        "events_per_watcher_max": max_n,
        "watcher_errors": errors,
        "latency_us": {
            "p50": hist.value_at_quantile(0.5),
            "p99": hist.value_at_quantile(0.99),
            "max": hist.max(),
        },
    }))
}

// ---------------------------------------------------------------------------
// PUT/s with idle watchers

fn idle_cell(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    tmp: &Path,
    pb: &Ticker,
    watchers: usize,
) -> Result<(LoadResult, CpuShare, usize)> {
    let make = kvd_put_make(Bytes::from(value_of(42, cfg.value_bytes)));
    quietest(&cfg.quiet, || {
        let (_dir, kvd) = cfg.start_kvd(tmp)?;
        let idle: Vec<RawWatch> = (0..watchers)
            .map(|_| RawWatch::open(kvd.port, "prefix=idle%2F", &[], Duration::from_secs(10)))
            .collect::<Result<_>>()?;
        if idle.iter().any(|w| w.status != 200) {
            bail!("an idle watch was refused");
        }
        pb.set(format!("PUT with {watchers} idle watchers"));
        let pid = kvd.pid().context("kvd has a pid")?.to_string();
        let spec = cfg.spec(kvd.port, cfg.conns);
        let out = with_cpu(&pid, || {
            rt.block_on(run_load(&spec, make.clone(), pb.live.clone()))
        });
        drop(idle);
        out
    })
}

fn idle(cfg: &Config, rt: &tokio::runtime::Runtime, tmp: &Path, pb: &Ticker) -> Result<Value> {
    let mut rows = Vec::new();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        let mut order = [0, cfg.watchers];
        if round % 2 == 1 {
            order.reverse();
        }
        for w in order {
            let (r, cpu, runs) = idle_cell(cfg, rt, tmp, pb, w)?;
            if w == 0 {
                without.push(r.ops_per_sec());
            } else {
                with.push(r.ops_per_sec());
            }
            rows.push(json!({
                "round": round + 1, "watchers": w, "result": r.to_json(),
                "kvd_cpu_pct": cpu.server, "other_cpu_pct": cpu.other, "runs": runs,
            }));
        }
    }
    let ratio = median(with.clone()) / median(without.clone());
    Ok(json!({
        "cells": rows,
        "with_watchers_put_per_sec_median": median(with),
        "without_put_per_sec_median": median(without),
        "ratio": ratio,
        "target_ratio": TARGET_IDLE_RATIO,
        "pass": ratio >= TARGET_IDLE_RATIO,
    }))
}

// ---------------------------------------------------------------------------

fn print_report(cfg: &Config, exp: &Value, fan: &Value, idle: &Value) {
    let ms = |v: &Value| fmt_ms(v.as_u64().unwrap_or(0));
    if !exp.is_null() {
        let mut t = Table::new(&["cell", "PUT/s", "p50 ms", "p99 ms", "errors"]);
        for (name, c) in [
            ("before the deadline", &exp["before"]),
            ("during the expiry", &exp["during"]),
        ] {
            t.row(vec![
                name.to_string(),
                fmt_rate(c["ops_per_sec"].as_f64().unwrap_or(0.0)),
                ms(&c["latency_us"]["p50"]),
                ms(&c["latency_us"]["p99"]),
                c["errors"].to_string(),
            ]);
        }
        println!(
            "\nExpiry of {} keys at one instant, {} connections writing new keys:",
            human_count(exp["keys_expiring"].as_u64().unwrap_or(0)),
            cfg.conns
        );
        print!("{}", t.render());
        let r = exp["p99_ratio"].as_f64().unwrap_or(f64::NAN);
        println!(
            "p99 during / before: {r:.2}x (target <= {TARGET_P99_RATIO}x) {}; removal: first {} ms, all {} ms after the deadline ({} removed)",
            pass(r <= TARGET_P99_RATIO),
            exp["first_removal_after_deadline_ms"].as_f64().map_or("-".into(), |v| format!("{v:.0}")),
            exp["all_removed_after_deadline_ms"].as_f64().map_or("not within the wait".into(), |v| format!("{v:.0}")),
            exp["removed"],
        );
    }
    if !fan.is_null() {
        println!(
            "\nWatch fan-out: {} watchers, {} writers: {} PUT/s, {} events received; \
             write-to-event p50 {} ms, p99 {} ms, max {} ms; events per watcher {}..{}; errors {}",
            fan["watchers"],
            fan["writers"],
            fmt_rate(fan["writes"]["ops_per_sec"].as_f64().unwrap_or(0.0)),
            fan["events_received"],
            ms(&fan["latency_us"]["p50"]),
            ms(&fan["latency_us"]["p99"]),
            ms(&fan["latency_us"]["max"]),
            fan["events_per_watcher_min"],
            fan["events_per_watcher_max"],
            fan["watcher_errors"],
        );
    }
    if !idle.is_null() {
        let mut t = Table::new(&[
            "round",
            "watchers",
            "PUT/s",
            "p50 ms",
            "p99 ms",
            "kvd CPU",
            "other CPU",
            "runs",
        ]);
        for c in idle["cells"].as_array().into_iter().flatten() {
            let r = &c["result"];
            t.row(vec![
                c["round"].to_string(),
                c["watchers"].to_string(),
                fmt_rate(r["ops_per_sec"].as_f64().unwrap_or(0.0)),
                ms(&r["latency_us"]["p50"]),
                ms(&r["latency_us"]["p99"]),
                format!("{:.0}%", c["kvd_cpu_pct"].as_f64().unwrap_or(0.0)),
                format!("{:.0}%", c["other_cpu_pct"].as_f64().unwrap_or(0.0)),
                c["runs"].to_string(),
            ]);
        }
        println!(
            "\nPUT/s at {} connections with idle watchers (a prefix nobody writes) and without:",
            cfg.conns
        );
        print!("{}", t.render());
        let r = idle["ratio"].as_f64().unwrap_or(f64::NAN);
        println!(
            "median with / without: {r:.3}x (target >= {TARGET_IDLE_RATIO}x) {}",
            pass(r >= TARGET_IDLE_RATIO)
        );
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::from_cli(&cli);
    let parts: Vec<&str> = cli.only.split(',').map(str::trim).collect();
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("expiry", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;
    let steps = parts.len() as u64;
    let pb = bar(steps, "{bar:30} {pos}/{len} {msg}");
    let ticker = Ticker::new(pb.clone());
    let mut results = [Value::Null, Value::Null, Value::Null];
    for (i, name) in ["expiry", "fanout", "idle"].iter().enumerate() {
        if !parts.contains(name) {
            continue;
        }
        results[i] = match i {
            0 => expiry(&cfg, &rt, tmp.path(), &ticker)?,
            1 => fanout(&cfg, &rt, tmp.path(), &ticker)?,
            _ => idle(&cfg, &rt, tmp.path(), &ticker)?,
        };
        pb.inc(1);
    }
    drop(ticker);
    pb.finish_and_clear();
    let noisy = noisy_start || warn_if_noisy("end");
    let [exp, fan, idl] = results;
    print_report(&cfg, &exp, &fan, &idl);
    if noisy {
        println!("note: compilers were running during the run; the figures are noisy");
    }
    let failed = [&exp["pass"], &idl["pass"]].iter().any(|p| **p == false);
    let results = json!({
        "bench": "expiry",
        "command": command,
        "environment": env_start,
        "noisy": noisy,
        "config": cfg.to_json(),
        "expiry": exp,
        "fanout": fan,
        "idle_watchers": idl,
    });
    report_results("expiry", &results, &command)?;
    Ok(if failed && cli.strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
