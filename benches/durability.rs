//! `durability`: no acknowledged write is lost across SIGKILLs.
//!
//! 16 writer tasks PUT unique keys back to back and record every write kvd
//! acknowledged (key and value). A killer SIGKILLs kvd at random moments
//! (every 100-600 ms of uptime by default) and restarts it on the same data
//! dir and port. A writer whose request fails (connection refused or reset,
//! timeout, 5xx) does not know whether the write happened, so it retries the
//! same key with the same value until it is acknowledged: an unacknowledged
//! write may or may not exist, an acknowledged one must. After the cycles
//! (50 by default) the writers stop, kvd is SIGKILLed once more so every
//! acknowledged write has been through a crash, and every acknowledged key is
//! read back and compared with its value. kvd runs with 1 MiB snapshot and
//! WAL segment sizes by default so that kills also hit snapshots, segment
//! rolls and WAL truncation.
//!
//! Exits non-zero if any acknowledged key is missing or has another value.
//! `cargo build --release && cargo bench --bench durability` (`-- --help`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use kvstore_testkit::bench::*;
use kvstore_testkit::Kvd;
use rand::Rng;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "durability",
    about = "SIGKILL kvd at random moments under write load; check no acknowledged write is lost.",
    override_usage = "cargo build --release && cargo bench --bench durability -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// kill-restart cycles under load (default 50)
    #[arg(long, value_name = "N")]
    cycles: Option<u64>,
    /// concurrent writer tasks, one connection each (default 16)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        hide_default_value = true
    )]
    writers: usize,
    /// shortest time kvd serves before a kill (default 100)
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 100,
        hide_default_value = true
    )]
    min_uptime_ms: u64,
    /// longest time kvd serves before a kill (default 600)
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 600,
        hide_default_value = true
    )]
    max_uptime_ms: u64,
    /// value size in bytes (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    value_bytes: usize,
    /// kvd flags (default "--snapshot-every-mib 1 --wal-segment-mib 1"; "" for kvd's defaults)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// 10 cycles instead of 50 (too few for the durability bar)
    #[arg(long)]
    quick: bool,
    /// where the data dir goes (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// Bound on one request, so a writer never hangs on a dead connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent readers during verification.
const VERIFY_CONNS: usize = 16;

fn main() -> ExitCode {
    exit_code("durability", run())
}

/// Counters shared by the writers and the progress display.
#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    /// Failed attempts whose outcome is unknown (retried with the same value).
    ambiguous: AtomicU64,
    /// Attempts refused before the write could start (connection refused).
    refused: AtomicU64,
}

/// What one writer leaves behind: every acknowledged (key, value).
type Acked = Vec<(String, Bytes)>;

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let quick = cli.quick;
    let cycles: u64 = cli.cycles.unwrap_or(if quick { 10 } else { 50 });
    let writers: usize = cli.writers.max(1);
    let min_up: u64 = cli.min_uptime_ms;
    let max_up: u64 = cli.max_uptime_ms.max(min_up + 1);
    let value_bytes: usize = cli.value_bytes;
    // Small snapshot and segment sizes by default, so that kills also land
    // during snapshot writes, segment rolls and WAL truncation, not only
    // during appends.
    let kvd_args: Vec<String> = split_flags(
        cli.kvd_args
            .as_deref()
            .unwrap_or("--snapshot-every-mib 1 --wal-segment-mib 1"),
    );
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("durability", cli.tmp_dir.as_deref())?;
    let data_dir = tmp.path().join("data");
    let args: Vec<&str> = kvd_args.iter().map(String::as_str).collect();
    let mut kvd = Kvd::start(&data_dir, &args)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, kvd.port));

    // Writers run on their own runtime thread; the killer is this thread.
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let rt = runtime(1)?;
    let handles: Vec<_> = (0..writers)
        .map(|w| rt.spawn(writer(w, addr, value_bytes, stop.clone(), counters.clone())))
        .collect();

    let pb = bar(cycles, "kill-restart {bar:30} {pos}/{len} cycles {msg}");
    let started = Instant::now();
    let mut restart_ms: Vec<f64> = Vec::new();
    let mut acked_per_cycle: Vec<u64> = Vec::new();
    let mut rng = rand::thread_rng();
    let mut last_acked = 0;
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.gen_range(min_up..=max_up)));
        // Every cycle should crash a node that was taking writes: on a busy
        // machine writers can need longer than the uptime to reconnect.
        poll(Duration::from_secs(5), || {
            counters.acked.load(Ordering::Relaxed) > last_acked
        });
        kvd.kill9()?;
        let acked = counters.acked.load(Ordering::Relaxed);
        acked_per_cycle.push(acked - last_acked);
        last_acked = acked;
        let t0 = Instant::now();
        kvd.restart().context("restarting kvd after SIGKILL")?;
        restart_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        pb.inc(1);
        pb.set_message(format!(
            "{acked} acked, last restart {:.0} ms",
            restart_ms.last().copied().unwrap_or(0.0)
        ));
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Stop the writers (each finishes its request in flight), then crash the
    // node once more so that every acknowledged write has survived a SIGKILL.
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<Acked> = Vec::with_capacity(writers);
    for h in handles {
        acked.push(rt.block_on(h).context("writer task panicked")?);
    }
    kvd.kill9()?;
    kvd.restart().context("final restart after SIGKILL")?;
    pb.finish_with_message("writers stopped; final SIGKILL and restart done");

    // Verify every acknowledged write.
    let total: u64 = acked.iter().map(|a| a.len() as u64).sum();
    let vpb = bar(total, "verify {bar:40} {human_pos}/{human_len} keys {msg}");
    let all: Arc<Vec<(String, Bytes)>> = Arc::new(acked.into_iter().flatten().collect());
    let (lost, wrong, examples) = rt.block_on(verify(addr, all.clone(), vpb.clone()))?;
    vpb.finish_with_message("done");
    let kvd_keys = kvd_keys(kvd.port)?;
    let noisy_end = warn_if_noisy("end");

    restart_ms.sort_by(f64::total_cmp);
    let mut per_cycle = acked_per_cycle.clone();
    per_cycle.sort_unstable();
    let pick = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let ambiguous = counters.ambiguous.load(Ordering::Relaxed);
    let refused = counters.refused.load(Ordering::Relaxed);
    // Each writer has at most one write in doubt at a time, so kvd can hold
    // at most `writers` keys beyond the acknowledged ones.
    let phantom = kvd_keys > total + writers as u64;
    let ok = lost == 0 && wrong == 0 && !phantom;

    let mut t = Table::new(&["durability", "value"]);
    t.row(vec![
        "kill-restart cycles under load".into(),
        cycles.to_string(),
    ]);
    t.row(vec!["final SIGKILL before verifying".into(), "1".into()]);
    t.row(vec!["writers".into(), writers.to_string()]);
    t.row(vec!["load time (s)".into(), format!("{load_secs:.1}")]);
    t.row(vec!["acknowledged writes".into(), total.to_string()]);
    t.row(vec![
        "cycles in which writes were acknowledged".into(),
        acked_per_cycle
            .iter()
            .filter(|&&n| n > 0)
            .count()
            .to_string(),
    ]);
    t.row(vec![
        "acked per cycle min / median".into(),
        format!(
            "{} / {}",
            per_cycle.first().copied().unwrap_or(0),
            per_cycle.get(per_cycle.len() / 2).copied().unwrap_or(0)
        ),
    ]);
    t.row(vec![
        "failed attempts, outcome unknown (retried)".into(),
        ambiguous.to_string(),
    ]);
    t.row(vec![
        "attempts refused while kvd was down".into(),
        refused.to_string(),
    ]);
    t.row(vec![
        "restart ms p50 / max".into(),
        format!(
            "{:.0} / {:.0}",
            pick(&restart_ms, 0.5),
            pick(&restart_ms, 1.0)
        ),
    ]);
    t.row(vec![
        "keys kvd holds at the end".into(),
        kvd_keys.to_string(),
    ]);
    t.row(vec!["acknowledged keys LOST".into(), lost.to_string()]);
    t.row(vec![
        "acknowledged keys with a WRONG value".into(),
        wrong.to_string(),
    ]);
    println!();
    print!("{}", t.render());
    for e in &examples {
        println!("  {e}");
    }
    if phantom {
        println!(
            "kvd holds {kvd_keys} keys but only {total} were acknowledged (+ at most {writers} in doubt)"
        );
    }
    println!(
        "result: {} ({lost} lost, {wrong} wrong, {cycles} cycles)",
        pass(ok)
    );
    if noisy_start || noisy_end {
        println!("note: compilers were running during the run");
    }

    let results = json!({
        "bench": "durability",
        "command": command,
        "environment": env_start,
        "noisy": noisy_start || noisy_end,
        "config": {
            "cycles": cycles,
            "writers": writers,
            "uptime_ms": [min_up, max_up],
            "value_bytes": value_bytes,
            "kvd_args": kvd_args,
        },
        "cycles_run": cycles,
        "final_kill": true,
        "load_seconds": load_secs,
        "acknowledged": total,
        "acked_per_cycle": acked_per_cycle,
        "ambiguous_attempts": ambiguous,
        "refused_attempts": refused,
        "restart_ms": restart_ms,
        "kvd_keys_at_end": kvd_keys,
        "lost": lost,
        "wrong_value": wrong,
        "examples": examples,
        "pass": ok,
    });
    report_results("durability", &results, &command)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes keys `d<w>-<seq>` until told to stop; returns the acknowledged
/// ones. Each key is retried with its value until acknowledged.
async fn writer(
    w: usize,
    addr: SocketAddr,
    value_bytes: usize,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Acked {
    let mut acked = Acked::new();
    let mut conn: Option<Conn> = None;
    let mut seq = 0u64;
    let mut pending: Option<(String, Bytes)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (key, value) = pending
            .get_or_insert_with(|| {
                let key = format!("d{w:02}-{seq:010}");
                let value = Bytes::from(value_of(mix64(((w as u64) << 40) ^ seq), value_bytes));
                (key, value)
            })
            .clone();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::http1(addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    // kvd is down (killed, or recovering before it binds).
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let req = Request::put(format!("/v1/kv/{key}"))
            .header("host", "127.0.0.1")
            .body(Full::new(value.clone()))
            .expect("a request built from valid parts");
        match tokio::time::timeout(REQUEST_TIMEOUT, c.send(req)).await {
            Ok(Ok((StatusCode::OK, _))) => {
                acked.push((key, value));
                counters.acked.fetch_add(1, Ordering::Relaxed);
                pending = None;
                seq += 1;
            }
            Ok(Ok((_status, _))) => {
                // An error answer (e.g. 503 while shutting down): the write
                // may not have happened; retry it.
                counters.ambiguous.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Err(_)) | Err(_) => {
                counters.ambiguous.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
    acked
}

/// Reads back every acknowledged key: (lost, wrong value, a few examples).
async fn verify(
    addr: SocketAddr,
    all: Arc<Vec<(String, Bytes)>>,
    pb: indicatif::ProgressBar,
) -> Result<(u64, u64, Vec<String>)> {
    let mut tasks = Vec::new();
    for t in 0..VERIFY_CONNS {
        let all = all.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::http1(addr).await?;
            let (mut lost, mut wrong, mut examples) = (0u64, 0u64, Vec::new());
            for (key, value) in all.iter().skip(t).step_by(VERIFY_CONNS) {
                let mut attempt = 0;
                let (status, body) = loop {
                    let req = Request::get(format!("/v1/kv/{key}"))
                        .header("host", "127.0.0.1")
                        .body(Full::new(Bytes::new()))
                        .expect("a request built from valid parts");
                    match tokio::time::timeout(REQUEST_TIMEOUT, conn.send(req)).await {
                        Ok(Ok(r)) => break r,
                        _ if attempt < 3 => {
                            attempt += 1;
                            conn = Conn::http1(addr).await?;
                        }
                        Ok(Err(e)) => return Err(e.context(format!("reading {key}"))),
                        Err(_) => bail!("reading {key} timed out"),
                    }
                };
                match status {
                    StatusCode::OK if body == *value => {}
                    StatusCode::OK => {
                        wrong += 1;
                        if examples.len() < 5 {
                            examples.push(format!("{key}: value differs ({} bytes)", body.len()));
                        }
                    }
                    StatusCode::NOT_FOUND => {
                        lost += 1;
                        if examples.len() < 5 {
                            examples.push(format!("{key}: missing"));
                        }
                    }
                    s => bail!("reading {key}: unexpected HTTP {s}"),
                }
                pb.inc(1);
            }
            Ok::<_, anyhow::Error>((lost, wrong, examples))
        }));
    }
    let (mut lost, mut wrong, mut examples) = (0, 0, Vec::new());
    for t in tasks {
        let (l, w, e) = t.await.context("verify task panicked")??;
        lost += l;
        wrong += w;
        examples.extend(e);
    }
    examples.truncate(10);
    Ok((lost, wrong, examples))
}
