//! `failover`: how long a kvsup-run cluster is without a writable primary
//! after `kvsup kill <primary>` (SIGKILL), with the manifest's health
//! settings.
//!
//! Method: `kvsup apply` of a 3-node manifest (release binaries), then
//! `--runs` times: wait until the cluster is Ready, write once, start the
//! clock, run `kvsup kill <primary>` (the CLI's own start-up is inside the
//! measured time), then try single writes through kvclient (no client
//! retries; on an error the next attempt starts at the next node, redirects
//! are followed) until one is acknowledged; the clock stops at that
//! acknowledgement. The killed node is restarted by kvsup and must rejoin as
//! a secondary before the next run. Reported: every run, p50 and max, and
//! kvsup's own `kvsup_failover_duration_seconds` (failure seen to new
//! primary elected).
//!
//! `cargo build --release && cargo bench --bench failover`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use kvstore_testkit::bench::{self, exit_code, reproduce, write_results, Table};
use kvstore_testkit::sup::{single_attempt_client, Supervised};
use kvstore_testkit::wait_until;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Failover time of a kvsup cluster after SIGKILL of the primary")]
struct Args {
    /// Kills of the primary to time.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// healthCheck.intervalMs of the manifest.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// healthCheck.failureThreshold of the manifest.
    #[arg(long, default_value_t = 3)]
    threshold: u32,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    exit_code("failover", run())
}

fn client(urls: &[String], first: usize) -> kvclient::Client {
    single_attempt_client(urls, first, Duration::from_millis(500))
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    bench::check_kvd_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = tempfile::TempDir::new()?;
    let spec = format!(
        "  healthCheck: {{intervalMs: {}, failureThreshold: {}}}\n",
        args.interval_ms, args.threshold
    );
    let c = Supervised::apply(tmp.path(), 3, &spec)?;
    let urls = c.urls();
    let mut times = Vec::new();
    let mut rows = Table::new(&["run", "killed", "new primary", "write ok after (ms)"]);
    for run in 1..=args.runs {
        c.wait_ready(Duration::from_secs(60))?;
        let old = c.primary().unwrap_or_default();
        // Retried: a node that just rejoined may not know the primary yet.
        let warm = kvclient::Client::builder()
            .endpoints(urls.clone())
            .retry_deadline(Duration::from_secs(30))
            .max_retries(1000)
            .build()?;
        rt.block_on(warm.set("warm", "up"))?;
        let t0 = Instant::now();
        let (ok, out) = c.kvsup(&["kill", &old])?;
        if !ok.success() {
            bail!("kvsup kill {old}: {out}");
        }
        let mut attempt = 0;
        let took = rt.block_on(async {
            loop {
                if client(&urls, attempt)
                    .set("after", run.to_string())
                    .await
                    .is_ok()
                {
                    return t0.elapsed();
                }
                attempt += 1;
                if t0.elapsed() > Duration::from_secs(60) {
                    return Duration::MAX;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        if took == Duration::MAX {
            bail!("no write was acknowledged within 60 s of killing {old}");
        }
        let new = c.primary().unwrap_or_default();
        rows.row(vec![
            run.to_string(),
            old.clone(),
            new,
            format!("{:.1}", took.as_secs_f64() * 1e3),
        ]);
        times.push(took);
        // The killed node must come back as a secondary first.
        let back = wait_until(Duration::from_secs(60), || {
            c.node_status(&old)
                .is_ok_and(|n| n["healthy"] == true && n["role"] == "secondary")
        });
        if !back {
            bail!("{old} did not rejoin as a secondary");
        }
    }
    let mut sorted = times.clone();
    sorted.sort();
    let p50 = sorted[sorted.len() / 2];
    let max = *sorted.last().unwrap_or(&Duration::ZERO);
    let sup_sum = c.metric("kvsup_failover_duration_seconds_sum")?;
    let sup_count = c.metric("kvsup_failover_duration_seconds_count")?;
    println!("{}", rows.render());
    println!(
        "write accepted by a new primary after SIGKILL of the old: p50 {:.1} ms, max {:.1} ms \
         over {} runs (targets: p50 < 1000 ms, every run < 3000 ms: {})",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        times.len(),
        if p50 < Duration::from_secs(1) && max < Duration::from_secs(3) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "kvsup's own failover duration (failure seen -> primary elected): mean {:.1} ms over {} failovers",
        if sup_count > 0.0 { sup_sum / sup_count * 1e3 } else { 0.0 },
        sup_count
    );
    println!("reproduce: {}", reproduce("failover"));
    let path = write_results(
        "failover",
        &json!({
            "runs_ms": times.iter().map(|t| t.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "p50_ms": p50.as_secs_f64() * 1e3,
            "max_ms": max.as_secs_f64() * 1e3,
            "health_interval_ms": args.interval_ms,
            "failure_threshold": args.threshold,
            "kvsup_failover_mean_ms": if sup_count > 0.0 { sup_sum / sup_count * 1e3 } else { 0.0 },
            "environment": bench::environment(),
            "reproduce": reproduce("failover"),
        }),
    )?;
    println!("results: {}", path.display());
    Ok(ExitCode::SUCCESS)
}
