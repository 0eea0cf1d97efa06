//! `hosts`: failover and healing across test hosts (network namespaces,
//! `testkit::hosts`; needs root), on the secured cluster of
//! `tests/hosts.rs`: three kvd nodes run from their rendered systemd units
//! in their own hosts, kvsup in a fourth, default health checks.
//!
//! 1. `--runs` times: SIGKILL of the primary's process (its service starts
//!    it again), then single writes through kvclient, rotating over the
//!    nodes, until one is acknowledged: the time from the kill to that
//!    acknowledgement (target: every run under 1 s). The killed node must
//!    answer again, and the cluster be Ready, before the next run.
//! 2. `--heals` times on a masterless cluster: one host's link down for
//!    `--cut-secs` while both sides take writes, then up: the time from
//!    the heal until every node has the same digest (target: under 5 s).
//!
//! `cargo build --release && cargo bench --bench hosts`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use kvstore_testkit::bench::{self, exit_code, reproduce, write_results, Table};
use kvstore_testkit::host_cluster::HostCluster;
use nix::sys::signal::Signal;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Failover and healing of a cluster across network-namespace hosts")]
struct Args {
    /// Kills of the primary to time.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Masterless cut-and-heal rounds to time.
    #[arg(long, default_value_t = 2)]
    heals: usize,
    /// How long a masterless host stays cut off.
    #[arg(long, default_value_t = 30)]
    cut_secs: u64,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    exit_code("hosts", run())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (p50, max) of `times`.
fn spread(times: &[Duration]) -> (Duration, Duration) {
    let mut s = times.to_vec();
    s.sort();
    (s[s.len() / 2], *s.last().unwrap_or(&Duration::ZERO))
}

async fn failovers(runs: usize) -> Result<(Table, Vec<Duration>)> {
    let tmp = tempfile::TempDir::new()?;
    let c = HostCluster::start(tmp.path(), 3, "primary-secondary", "")?;
    let to = c.endpoints()?;
    let mut rows = Table::new(&["run", "killed", "new primary", "write ok after (ms)"]);
    let mut times = Vec::new();
    for run in 1..=runs {
        let old = c.primary().await.unwrap_or_default();
        let t0 = Instant::now();
        c.hosts.signal(&old, Signal::SIGKILL)?;
        let mut i = 0;
        let took = loop {
            if to
                .single_attempt(i)
                .set("after", run.to_string())
                .await
                .is_ok()
            {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no write acknowledged within 60 s of killing {old}");
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let new = c.primary().await.unwrap_or_default();
        rows.row(vec![
            run.to_string(),
            old.clone(),
            new,
            format!("{:.1}", ms(took)),
        ]);
        times.push(took);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Back as a secondary, or elected again (it may be the most up to
        // date once restarted).
        while c.node_status(&old).await.is_err() {
            if Instant::now() > deadline {
                bail!("{old} did not come back");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.wait_ready(Duration::from_secs(60))?;
    }
    Ok((rows, times))
}

async fn heals(rounds: usize, cut: Duration) -> Result<(Table, Vec<Duration>)> {
    let tmp = tempfile::TempDir::new()?;
    let c = HostCluster::start(tmp.path(), 3, "masterless", "")?;
    let mut to = c.endpoints()?;
    let mut rows = Table::new(&[
        "round",
        "cut off",
        "writes (others / it)",
        "equal after (ms)",
    ]);
    let mut times = Vec::new();
    for round in 1..=rounds {
        let off = c.nodes[round % c.nodes.len()].clone();
        to.urls = c.urls().into_iter().filter(|u| *u != c.url(&off)).collect();
        let kv = to.single_attempt(0);
        c.hosts.cut(&off)?;
        let began = Instant::now();
        let (mut near, mut far) = (0u64, 0u64);
        while began.elapsed() < cut {
            let k = format!("r{round}-{near}");
            near += u64::from(kv.set(&k, "x").await.is_ok());
            if near % 50 == 0 {
                let url = c.url(&off);
                let key = format!("far{round}-{far}");
                let (st, _) = c.kvclient_in(&off, &url, &["set", &key, "y"])?;
                far += u64::from(st.success());
            }
        }
        c.hosts.heal(&off)?;
        let healed = Instant::now();
        c.converged(Duration::from_secs(120)).await?;
        let took = healed.elapsed();
        rows.row(vec![
            round.to_string(),
            off,
            format!("{near} / {far}"),
            format!("{:.1}", ms(took)),
        ]);
        times.push(took);
    }
    Ok((rows, times))
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    bench::check_kvd_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (frows, ftimes) = rt.block_on(failovers(args.runs))?;
    let (hrows, htimes) = rt.block_on(heals(args.heals, Duration::from_secs(args.cut_secs)))?;
    let (fp50, fmax) = spread(&ftimes);
    let (hp50, hmax) = spread(&htimes);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("{}", frows.render());
    println!(
        "across hosts, write acknowledged after SIGKILL of the primary: p50 {:.1} ms, max {:.1} ms \
         over {} runs (target: every run < 1000 ms: {})",
        ms(fp50),
        ms(fmax),
        ftimes.len(),
        verdict(fmax < Duration::from_secs(1))
    );
    println!("{}", hrows.render());
    println!(
        "masterless, a host cut off {} s: digests equal after the heal in p50 {:.1} ms, max {:.1} ms \
         over {} rounds (target: < 5000 ms: {})",
        args.cut_secs,
        ms(hp50),
        ms(hmax),
        htimes.len(),
        verdict(hmax < Duration::from_secs(5))
    );
    println!("reproduce: {}", reproduce("hosts"));
    let path = write_results(
        "hosts",
        &json!({
            "failover_runs_ms": ftimes.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
            "failover_p50_ms": ms(fp50),
            "failover_max_ms": ms(fmax),
            "heal_cut_secs": args.cut_secs,
            "heal_runs_ms": htimes.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
            "environment": bench::environment(),
            "reproduce": reproduce("hosts"),
        }),
    )?;
    println!("results: {}", path.display());
    Ok(ExitCode::SUCCESS)
}
