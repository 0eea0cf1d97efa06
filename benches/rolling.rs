//! `rolling`: the longest write pause 16 writers see while kvsup rolls a
//! `kvdArgs` change over a 3-node primary/secondary cluster.
//!
//! Method: `kvsup apply` of a 3-node manifest (release binaries), then 16
//! writers setting new keys back to back through retrying kvclients, and
//! `--runs` times: apply a manifest whose `kvdArgs` differs from the last
//! (`--max-bulk-items=<100000 + run>`, harmless), wait until `kvsup
//! status` says the change is done, and take the longest time any writer
//! went between two acknowledged writes during the run. Each run restarts
//! every node once and moves the primary once (a planned switchover).
//! Reported: every run (pause, time to roll), p50 and max of the pauses
//! (target: max at most 1000 ms).
//!
//! `cargo build --release && cargo bench --bench rolling`

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use kvstore_testkit::bench::{self, exit_code, reproduce, write_results, Table};
use kvstore_testkit::sup::{run_in, Supervised};
use kvstore_testkit::wait_until;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Longest write pause of 16 writers during a kvsup rolling change")]
struct Args {
    /// Rolling changes to time.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Writers throughout.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    exit_code("rolling", run())
}

/// Milliseconds since `origin` of each writer's last acknowledgement, and
/// the longest gap seen since the last reset, in microseconds.
struct Pauses {
    last_ack_us: Vec<AtomicU64>,
    longest_us: AtomicU64,
}

impl Pauses {
    fn ack(&self, w: usize, now_us: u64) {
        let prev = self.last_ack_us[w].swap(now_us, Ordering::Relaxed);
        self.longest_us
            .fetch_max(now_us.saturating_sub(prev), Ordering::Relaxed);
    }

    /// The longest pause since the last call (including the pause under
    /// way of a writer that has not been acknowledged since).
    fn take(&self, now_us: u64) -> Duration {
        let open = self
            .last_ack_us
            .iter()
            .map(|a| now_us.saturating_sub(a.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        Duration::from_micros(self.longest_us.swap(0, Ordering::Relaxed).max(open))
    }
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    bench::check_kvd_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = tempfile::TempDir::new()?;
    let c = Supervised::apply(tmp.path(), 3, "")?;
    let base = std::fs::read_to_string(&c.manifest)?;
    let origin = Instant::now();
    let now_us = move || u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
    let pauses = Arc::new(Pauses {
        last_ack_us: (0..args.writers)
            .map(|_| AtomicU64::new(now_us()))
            .collect(),
        longest_us: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let kv = kvclient::Client::builder()
            .endpoints(c.urls())
            .request_timeout(Duration::from_secs(2))
            .retry_deadline(Duration::from_secs(20))
            .build()?;
        let (stop, pauses, acked) = (stop.clone(), pauses.clone(), acked.clone());
        writers.push(rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                if kv.set(&key, key.clone()).await.is_ok() {
                    pauses.ack(w, now_us());
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let mut rows = Table::new(&["run", "rolled in (ms)", "longest write pause (ms)"]);
    let mut pause_list = Vec::new();
    for run in 1..=args.runs {
        c.wait_ready(Duration::from_secs(60))?;
        let path = tmp.path().join(format!("run{run}.yaml"));
        std::fs::write(
            &path,
            format!(
                "{base}  kvdArgs: [\"--max-bulk-items={}\"]\n",
                100_000 + run
            ),
        )?;
        pauses.take(now_us());
        let t0 = Instant::now();
        let p = path.display().to_string();
        let (st, out) = run_in(
            &c.dir,
            "kvsup",
            &["apply", "-f", &p],
            Duration::from_secs(120),
        )?;
        if !st.success() {
            bail!("kvsup apply {p}: {out}");
        }
        let mut last = serde_json::Value::Null;
        let over = wait_until(Duration::from_secs(300), || match c.status() {
            Ok(s) => {
                let done = s["change"]["state"] != "running";
                last = s;
                done
            }
            Err(_) => false,
        });
        if !over || last["change"]["state"] != "done" {
            bail!("run {run}: the rolling change did not finish: {last:#}");
        }
        let took = t0.elapsed();
        let pause = pauses.take(now_us());
        rows.row(vec![
            run.to_string(),
            format!("{:.0}", took.as_secs_f64() * 1e3),
            format!("{:.1}", pause.as_secs_f64() * 1e3),
        ]);
        pause_list.push(pause);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = rt.block_on(w);
    }
    let mut sorted = pause_list.clone();
    sorted.sort();
    let p50 = sorted[sorted.len() / 2];
    let max = *sorted.last().unwrap_or(&Duration::ZERO);
    println!("{}", rows.render());
    println!(
        "longest write pause of {} writers per rolling change: p50 {:.1} ms, max {:.1} ms over {} \
         runs, {} writes acknowledged (target: max <= 1000 ms: {})",
        args.writers,
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        pause_list.len(),
        acked.load(Ordering::Relaxed),
        if max <= Duration::from_secs(1) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!("reproduce: {}", reproduce("rolling"));
    let path = write_results(
        "rolling",
        &json!({
            "pauses_ms": pause_list.iter().map(|t| t.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "p50_ms": p50.as_secs_f64() * 1e3,
            "max_ms": max.as_secs_f64() * 1e3,
            "writers": args.writers,
            "environment": bench::environment(),
            "reproduce": reproduce("rolling"),
        }),
    )?;
    println!("results: {}", path.display());
    Ok(ExitCode::SUCCESS)
}
