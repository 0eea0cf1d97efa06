//! `election`: how soon a fresh or restarted kvsup cluster takes writes
//! when it has to elect a primary first.
//!
//! Method, `--runs` times, each on a new 3-node cluster in its own temp dir
//! (release binaries, the manifest's health settings):
//! 1. fresh: `kvsup apply`, and as soon as it returns (the nodes are
//!    started, not yet checked) `kvsup kill n0` (SIGKILL of the bootstrap
//!    primary; the CLI's start-up is inside the measured time); the clock
//!    runs from the kill to the first write acknowledged through kvclient.
//! 2. restarted: once the cluster is Ready again, `kvsup down`, then
//!    `kvsup apply`, whose nodes all come back as secondaries; the clock
//!    runs from apply's return (and, second figure, from its start) to the
//!    first acknowledged write.
//!
//! Writes are single attempts (no client retries; after an error the next
//! attempt starts at the next node; redirects are followed), 2 ms apart.
//! Target: every run under 1 s in both cases.
//!
//! `cargo build --release && cargo bench --bench election`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use kvstore_testkit::bench::{self, exit_code, reproduce, write_results, Table};
use kvstore_testkit::sup::{single_attempt_client, Supervised};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Time to the first write of a fresh or restarted kvsup cluster that must elect")]
struct Args {
    /// Clusters to time (each: fresh with its primary killed, then restarted).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// healthCheck.intervalMs of the manifest.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// healthCheck.failureThreshold of the manifest.
    #[arg(long, default_value_t = 3)]
    threshold: u32,
    /// Print kvsup's events of every run slower than this.
    #[arg(long, default_value_t = 1000.0)]
    explain_ms: f64,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

const TARGET: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    exit_code("election", run())
}

/// Single-attempt writes until one is acknowledged; the instant it was.
fn first_write(rt: &tokio::runtime::Runtime, urls: &[String], key: &str) -> Result<Instant> {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    rt.block_on(async {
        loop {
            let client = single_attempt_client(urls, attempt, Duration::from_millis(500));
            if client.set(key, "v").await.is_ok() {
                return Ok(Instant::now());
            }
            attempt += 1;
            if Instant::now() > give_up {
                bail!("no write was acknowledged within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

struct Run {
    killed_ms: f64,
    restarted_ms: f64,
    restarted_from_start_ms: f64,
    /// `kvsup events` after each first write, printed for a slow run.
    events: [String; 2],
}

fn one_run(rt: &tokio::runtime::Runtime, spec: &str) -> Result<Run> {
    let tmp = tempfile::TempDir::new()?;
    let mut c = Supervised::prepare(tmp.path(), 3, spec)?;
    let urls = c.urls();
    c.start()?;
    let t0 = Instant::now();
    let (ok, out) = c.kvsup(&["kill", "n0"])?;
    if !ok.success() {
        bail!("kvsup kill n0: {out}");
    }
    let killed = first_write(rt, &urls, "fresh")? - t0;
    let fresh_events = c.kvsup(&["events"])?.1;

    c.wait_ready(Duration::from_secs(60))?;
    c.down()?;
    let started = Instant::now();
    c.start()?;
    let returned = Instant::now();
    let written = first_write(rt, &urls, "restarted")?;
    let restart_events = c.kvsup(&["events"])?.1;
    c.down()?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Run {
        killed_ms: ms(killed),
        restarted_ms: ms(written - returned),
        restarted_from_start_ms: ms(written - started),
        events: [fresh_events, restart_events],
    })
}

fn summary(xs: &[f64]) -> (f64, f64) {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], *s.last().unwrap_or(&0.0))
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    bench::check_kvd_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let spec = format!(
        "  healthCheck: {{intervalMs: {}, failureThreshold: {}}}\n",
        args.interval_ms, args.threshold
    );
    let mut rows = Table::new(&[
        "run",
        "fresh: kill n0 -> write (ms)",
        "restarted: apply returned -> write (ms)",
        "apply started -> write (ms)",
    ]);
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        let r = one_run(&rt, &spec)?;
        rows.row(vec![
            i.to_string(),
            format!("{:.1}", r.killed_ms),
            format!("{:.1}", r.restarted_ms),
            format!("{:.1}", r.restarted_from_start_ms),
        ]);
        runs.push(r);
    }
    let killed: Vec<f64> = runs.iter().map(|r| r.killed_ms).collect();
    let restarted: Vec<f64> = runs.iter().map(|r| r.restarted_ms).collect();
    let from_start: Vec<f64> = runs.iter().map(|r| r.restarted_from_start_ms).collect();
    let (k50, kmax) = summary(&killed);
    let (r50, rmax) = summary(&restarted);
    let (s50, smax) = summary(&from_start);
    let met = |max: f64| {
        if max < TARGET.as_secs_f64() * 1e3 {
            "met"
        } else {
            "MISSED"
        }
    };
    println!("{}", rows.render());
    let slow = args.explain_ms;
    for (i, r) in runs.iter().enumerate() {
        for (what, ms, events) in [
            ("fresh", r.killed_ms, &r.events[0]),
            ("restarted", r.restarted_ms, &r.events[1]),
        ] {
            if ms >= slow {
                println!(
                    "run {} ({what}) took {ms:.1} ms; kvsup events:\n{events}",
                    i + 1
                );
            }
        }
    }
    println!(
        "fresh cluster, bootstrap primary killed right after apply: first write p50 {k50:.1} ms, \
         max {kmax:.1} ms over {} runs (target: every run < 1000 ms: {})",
        killed.len(),
        met(kmax)
    );
    println!(
        "restarted cluster (down, then apply): first write p50 {r50:.1} ms, max {rmax:.1} ms after \
         apply returned (target: every run < 1000 ms: {}); p50 {s50:.1} ms, max {smax:.1} ms \
         after apply started",
        met(rmax)
    );
    println!("reproduce: {}", reproduce("election"));
    let path = write_results(
        "election",
        &json!({
            "fresh_kill_to_write_ms": killed,
            "restart_apply_returned_to_write_ms": restarted,
            "restart_apply_started_to_write_ms": from_start,
            "health_interval_ms": args.interval_ms,
            "failure_threshold": args.threshold,
            "environment": bench::environment(),
            "reproduce": reproduce("election"),
        }),
    )?;
    println!("results: {}", path.display());
    Ok(ExitCode::SUCCESS)
}
