//! `recovery`: restart time and resident memory of kvd holding 1M keys
//! (16-byte keys, 100-byte values), beside Redis 7 holding the same data.
//!
//! kvd is bulk-loaded (POST /v1/bulk in chunks), then stopped with SIGTERM
//! and with SIGKILL, a few times each, and restarted on the same data dir.
//! Restart time runs from spawning the process to `/health` answering 200;
//! kvd recovers (snapshot + WAL replay) before it binds its port, so a
//! healthy node already holds all its data, which is then checked: the key
//! count and the state digest of `/v1/status` equal those before the stop,
//! and a sample of keys read back with their values. Resident memory is
//! VmRSS from `/proc/PID/status` once it has settled, after the load and
//! after each restart.
//!
//! Redis runs with `appendonly yes`, `appendfsync always`, no RDB, is loaded
//! with the same keys and values through `redis-cli --pipe`, and is measured
//! the same way (restart: spawn to PING answering PONG, after the AOF load).
//!
//! `cargo build --release && cargo bench --bench recovery` (`-- --help`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use kvstore_testkit::bench::*;
use kvstore_testkit::Kvd;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "recovery",
    about = "Restart time and resident memory of kvd with 1M keys, beside Redis.",
    override_usage = "cargo build --release && cargo bench --bench recovery -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// keys to load (default 1M; k and M suffixes)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    keys: Option<u64>,
    /// value size in bytes (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    value_bytes: usize,
    /// items per bulk request (default 10000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        hide_default_value = true
    )]
    chunk: u64,
    /// restarts per stop signal (SIGTERM, SIGKILL) (default 3)
    #[arg(long, value_name = "N")]
    repeats: Option<usize>,
    /// keys read back after each restart (default 2000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2000,
        hide_default_value = true
    )]
    sample: u64,
    /// drop the page cache before each restart (cold start; needs root, machine-wide)
    #[arg(long)]
    drop_caches: bool,
    /// skip the Redis comparison
    #[arg(long)]
    no_redis: bool,
    /// 100k keys, one restart per signal
    #[arg(long)]
    quick: bool,
    /// extra kvd flags, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
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

/// The restart and memory targets this benchmark checks.
const TARGET_RESTART: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    exit_code("recovery", run())
}

/// One line of the report.
struct Phase {
    system: &'static str,
    phase: String,
    secs: f64,
    rss_kib: u64,
    hwm_kib: u64,
    keys: u64,
    extra: Value,
}

impl Phase {
    fn row(&self) -> Vec<String> {
        vec![
            self.system.to_string(),
            self.phase.clone(),
            format!("{:.3}", self.secs),
            fmt_mib(self.rss_kib),
            fmt_mib(self.hwm_kib),
            self.keys.to_string(),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "system": self.system,
            "phase": self.phase,
            "seconds": self.secs,
            "rss_kib": self.rss_kib,
            "peak_rss_kib": self.hwm_kib,
            "keys": self.keys,
            "extra": self.extra,
        })
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let quick = cli.quick;
    let keys: u64 = cli.keys.unwrap_or(if quick { 100_000 } else { 1_000_000 });
    let value_bytes: usize = cli.value_bytes;
    let chunk: u64 = cli.chunk.max(1);
    let repeats: usize = cli.repeats.unwrap_or(if quick { 1 } else { 3 });
    let sample: u64 = cli.sample;
    let drop_caches = cli.drop_caches;
    let kvd_args: Vec<String> = split_flags(cli.kvd_args.as_deref().unwrap_or(""));
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("recovery", cli.tmp_dir.as_deref())?;
    let rt = runtime(0)?;
    let mut phases: Vec<Phase> = Vec::new();

    // kvd: load.
    let data_dir = tmp.path().join("kvd");
    let args: Vec<&str> = kvd_args.iter().map(String::as_str).collect();
    let mut kvd = Kvd::start(&data_dir, &args)?;
    let pb = bar(
        keys,
        "kvd load {bar:40} {human_pos}/{human_len} keys {per_sec}",
    );
    let t0 = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, kvd.port));
    rt.block_on(bulk_load(addr, 0, keys, chunk, value_bytes, &pb))?;
    let load_secs = t0.elapsed().as_secs_f64();
    pb.finish();
    let status = kvd_status(kvd.port)?;
    let digest = status["digest"].clone();
    let loaded = status["keys"].as_u64().unwrap_or(0);
    if loaded != keys {
        bail!("kvd reports {loaded} keys after loading {keys}");
    }
    let (rss, hwm) = settled_rss(kvd.pid().context("kvd has a pid")?)?;
    phases.push(Phase {
        system: "kvd",
        phase: format!("load (bulk, {chunk}/request)"),
        secs: load_secs,
        rss_kib: rss,
        hwm_kib: hwm,
        keys: loaded,
        extra: json!({ "status": status }),
    });

    // kvd: restarts.
    let total = 2 * repeats as u64;
    let pb = bar(total, "kvd restarts {bar:30} {pos}/{len} {msg}");
    let mut restart_secs: Vec<f64> = Vec::new();
    for round in 0..repeats {
        for sig in ["SIGTERM", "SIGKILL"] {
            let t_stop = Instant::now();
            if sig == "SIGTERM" {
                let st = kvd.terminate()?;
                if !st.success() {
                    bail!("kvd exited with {st} on SIGTERM; log:\n{}", kvd.log());
                }
            } else {
                kvd.kill9()?;
            }
            let stop_secs = t_stop.elapsed().as_secs_f64();
            if drop_caches {
                drop_page_cache()?;
            }
            let t = Instant::now();
            kvd.restart()?;
            let secs = t.elapsed().as_secs_f64();
            restart_secs.push(secs);
            pb.inc(1);
            pb.set_message(format!("{sig}: {secs:.3} s"));

            // Everything is there: same count, same digest, sample reads.
            let status = kvd_status(kvd.port)?;
            if status["keys"].as_u64() != Some(keys) || status["digest"] != digest {
                bail!(
                    "after {sig} and restart kvd reports keys={} digest={}, expected {keys} and {digest}",
                    status["keys"],
                    status["digest"]
                );
            }
            rt.block_on(check_sample(addr, keys, sample, value_bytes))?;
            let (rss, hwm) = settled_rss(kvd.pid().context("kvd has a pid")?)?;
            phases.push(Phase {
                system: "kvd",
                phase: format!("restart after {sig} #{}", round + 1),
                secs,
                rss_kib: rss,
                hwm_kib: hwm,
                keys,
                extra: json!({
                    "stop_seconds": stop_secs,
                    "kvd_log_recovery": last_recovery_line(&kvd.log()),
                    "status": status,
                    "cold_cache": drop_caches,
                }),
            });
        }
    }
    pb.finish_with_message("done");
    let kvd_disk = dir_bytes(&data_dir);
    drop(kvd);

    // Redis: the same data.
    let mut redis_version = None;
    if !cli.no_redis {
        redis_version = tool_version("redis-server", "--version");
        phases.extend(redis_phases(&tmp.path().join("redis"), keys, value_bytes)?);
    }
    let noisy_end = warn_if_noisy("end");

    // Report.
    let mut t = Table::new(&["system", "phase", "seconds", "RSS MiB", "peak MiB", "keys"]);
    for p in &phases {
        t.row(p.row());
    }
    println!();
    println!(
        "recovery: {} keys, 16-byte keys, {value_bytes}-byte values; kvd data dir {:.1} MiB on disk",
        human_count(keys),
        kvd_disk as f64 / 1048576.0
    );
    print!("{}", t.render());

    restart_secs.sort_by(f64::total_cmp);
    let worst = restart_secs.last().copied().unwrap_or(f64::NAN);
    let median = restart_secs
        .get(restart_secs.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let restart_ok = worst < TARGET_RESTART.as_secs_f64();
    println!();
    println!(
        "kvd restart with {} keys: median {median:.3} s, worst {worst:.3} s  (target < {:.0} s) {}",
        human_count(keys),
        TARGET_RESTART.as_secs_f64(),
        pass(restart_ok)
    );
    let mut summary = json!({
        "restart_median_seconds": median,
        "restart_worst_seconds": worst,
        "restart_target_seconds": TARGET_RESTART.as_secs_f64(),
        "restart_pass": restart_ok,
        "kvd_disk_bytes": kvd_disk,
    });
    let mut failed = !restart_ok;

    let kvd_load = phases
        .iter()
        .find(|p| p.system == "kvd" && p.phase.starts_with("load"));
    let kvd_restart_rss = phases
        .iter()
        .filter(|p| p.system == "kvd" && p.phase.starts_with("restart"))
        .map(|p| p.rss_kib)
        .max();
    let redis_load = phases
        .iter()
        .find(|p| p.system == "redis" && p.phase.starts_with("load"));
    let redis_restart = phases
        .iter()
        .find(|p| p.system == "redis" && p.phase.starts_with("restart"));
    if let (Some(k), Some(r), Some(kr), Some(rr)) =
        (kvd_load, redis_load, kvd_restart_rss, redis_restart)
    {
        // Judged both after loading and after restarting: each store's
        // memory differs between the two (allocator state, rebuilt tables).
        let ok = k.rss_kib <= r.rss_kib && kr <= rr.rss_kib;
        failed |= !ok;
        println!(
            "RSS after load: kvd {} MiB vs Redis {} MiB ({:.2}x); after restart: kvd {} MiB vs Redis {} MiB ({:.2}x)  (target kvd <= Redis) {}",
            fmt_mib(k.rss_kib),
            fmt_mib(r.rss_kib),
            k.rss_kib as f64 / r.rss_kib as f64,
            fmt_mib(kr),
            fmt_mib(rr.rss_kib),
            kr as f64 / rr.rss_kib as f64,
            pass(ok)
        );
        summary["kvd_rss_after_load_kib"] = json!(k.rss_kib);
        summary["redis_rss_after_load_kib"] = json!(r.rss_kib);
        summary["kvd_rss_after_restart_kib"] = json!(kr);
        summary["redis_rss_after_restart_kib"] = json!(rr.rss_kib);
        summary["rss_pass"] = json!(ok);
        summary["bytes_per_key_kvd"] = json!(k.rss_kib as f64 * 1024.0 / keys as f64);
        summary["bytes_per_key_redis"] = json!(r.rss_kib as f64 * 1024.0 / keys as f64);
    }
    if noisy_start || noisy_end {
        println!("note: compilers were running during the run; the timings are noisy");
    }

    let results = json!({
        "bench": "recovery",
        "command": command,
        "environment": env_start,
        "noisy": noisy_start || noisy_end,
        "config": {
            "keys": keys,
            "key_bytes": 16,
            "value_bytes": value_bytes,
            "bulk_chunk": chunk,
            "repeats": repeats,
            "cold_cache": drop_caches,
            "kvd_args": kvd_args,
        },
        "versions": { "redis": redis_version },
        "phases": phases.iter().map(Phase::to_json).collect::<Vec<_>>(),
        "summary": summary,
    });
    report_results("recovery", &results, &command)?;
    Ok(if failed && cli.strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The kvd log line that reports what recovery did and how long it took.
fn last_recovery_line(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.contains("recovered"))
        .map(str::to_string)
}

fn drop_page_cache() -> Result<()> {
    // Dirty pages first, or they stay cached.
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Reads `n` evenly spread keys and checks their values.
async fn check_sample(addr: SocketAddr, keys: u64, n: u64, value_bytes: usize) -> Result<()> {
    let mut conn = Conn::http1(addr).await?;
    let n = n.min(keys);
    for j in 0..n {
        let i = mix64(j) % keys;
        let req = Request::get(format!("/v1/kv/{}", preload_key(i)))
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))?;
        let (status, body) = conn.send(req).await?;
        if status != StatusCode::OK || body != value_of(i, value_bytes).as_bytes() {
            bail!(
                "key {} after restart: HTTP {status}, {} bytes",
                preload_key(i),
                body.len()
            );
        }
    }
    Ok(())
}

/// Loads Redis with the same keys and values, then restarts it once.
fn redis_phases(dir: &Path, keys: u64, value_bytes: usize) -> Result<Vec<Phase>> {
    let mut out = Vec::new();
    let mut redis = start_redis(dir)?;
    let pb = bar(
        keys,
        "redis load {bar:40} {human_pos}/{human_len} keys {per_sec}",
    );
    let t0 = Instant::now();
    let pipe_report = redis_load(redis.port, keys, value_bytes, &pb)?;
    let load_secs = t0.elapsed().as_secs_f64();
    pb.finish();
    let dbsize = redis_dbsize(redis.port)?;
    if dbsize != keys {
        bail!("redis holds {dbsize} keys after loading {keys}");
    }
    let (rss, hwm) = settled_rss(redis.pid())?;
    out.push(Phase {
        system: "redis",
        phase: "load (redis-cli --pipe)".into(),
        secs: load_secs,
        rss_kib: rss,
        hwm_kib: hwm,
        keys: dbsize,
        extra: json!({
            "pipe": pipe_report,
            "info_memory": redis_info(redis.port, "memory"),
        }),
    });

    // Restart: SIGTERM, then time from spawn to PONG (Redis answers -LOADING
    // while it replays the AOF).
    let port = redis.port;
    redis.terminate(Duration::from_secs(60))?;
    drop(redis);
    let t = Instant::now();
    let mut redis = spawn_redis(dir, port)?;
    wait_redis(&mut redis, Duration::from_secs(120))?;
    let secs = t.elapsed().as_secs_f64();
    let dbsize = redis_dbsize(port)?;
    if dbsize != keys {
        bail!("redis holds {dbsize} keys after restart, expected {keys}");
    }
    let (rss, hwm) = settled_rss(redis.pid())?;
    out.push(Phase {
        system: "redis",
        phase: "restart after SIGTERM (AOF load)".into(),
        secs,
        rss_kib: rss,
        hwm_kib: hwm,
        keys: dbsize,
        extra: json!({ "info_memory": redis_info(port, "memory") }),
    });
    Ok(out)
}
