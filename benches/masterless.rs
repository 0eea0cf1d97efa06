//! Masterless mode benchmark:
//!
//! 1. durable PUT/s and p50/p99 of a 3-node masterless cluster at 64
//!    connections spread over the three nodes, 100-byte values, with
//!    `--write-quorum 1` and `2`, and how long after the load stops the
//!    nodes' digests agree;
//! 2. convergence time after a partition: one node cut off (per-link TCP
//!    proxies) for 60 s while the other two take writes, then healed; time
//!    from the heal until every digest is equal;
//! 3. the mode switch's write pause: primary/secondary -> masterless -> and
//!    back, under 16 kvclient writers, several times; the pause reported by
//!    `kvclient::admin::switch_mode` and the longest write the writers saw.
//!
//! `cargo build --release && cargo bench --bench masterless` (`-- --quick`
//! for a shorter run).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use clap::Parser;
use kvclient::admin::{switch_mode, Mode, SwitchOptions};
use kvstore_testkit::bench::*;
use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::Kvd;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "masterless",
    about = "Masterless kvd: PUT/s with write quorum 1 and 2, convergence after a partition, mode-switch pause."
)]
struct Cli {
    /// Shorter run (~1 min): 3 s cells, a 10 s partition, 2 switch cycles.
    #[arg(long)]
    quick: bool,
    /// Seconds per throughput cell.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Connections, spread evenly over the three nodes.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Seconds one node stays cut off.
    #[arg(long)]
    partition_secs: Option<f64>,
    /// Mode-switch cycles (each: to masterless and back).
    #[arg(long)]
    switch_cycles: Option<usize>,
    /// Parent of the run's temp dir (a real disk, not tmpfs).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    exit_code("masterless", run())
}

/// A cluster in `dir` whose links the benchmark can cut; `mode` is
/// `masterless` or `primary-secondary`, `extra` flags go to every node.
fn start_cluster(dir: &Path, mode: &str, extra: &[&str]) -> Result<Cluster> {
    Cluster::start_in(dir, |_| {
        let mut flags = vec!["--mode".to_string(), mode.to_string()];
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    })
}

/// Polls until every digest of `c` is equal; how long that took.
fn wait_converged(c: &Cluster, timeout: Duration) -> Result<Duration> {
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.port).collect();
    wait_digests_equal(&ports, timeout)
}

/// Writes of new unique keys on several nodes at once: `conns` split
/// evenly, results merged.
fn load_on(
    rt: &tokio::runtime::Runtime,
    nodes: &[&Kvd],
    conns: usize,
    duration: Duration,
    value: Bytes,
    ticker: &Ticker,
) -> Result<LoadResult> {
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let spec = LoadSpec {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, ports[0])),
        proto: Proto::Http1,
        conns,
        warmup: Duration::from_millis(500),
        duration,
    };
    rt.block_on(run_load_spread(
        &spec,
        &ports,
        kvd_put_make(value),
        ticker.live.clone(),
    ))
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("masterless", cli.tmp_dir.as_deref())?;
    let quick = cli.quick;
    let duration =
        Duration::from_secs_f64(cli.duration_secs.unwrap_or(if quick { 3.0 } else { 10.0 }));
    let partition =
        Duration::from_secs_f64(
            cli.partition_secs
                .unwrap_or(if quick { 10.0 } else { 60.0 }),
        );
    let cycles = cli.switch_cycles.unwrap_or(if quick { 2 } else { 5 });
    let value = Bytes::from(value_of(7, cli.value_bytes));
    let rt = runtime(2)?;
    let pb = bar(0, "{spinner} {elapsed_precise} {msg}");
    let ticker = Ticker::new(pb.clone());
    let mut results = json!({"environment": env_start, "noisy_start": noisy_start});

    // 1. Throughput at write quorum 1 and 2.
    let mut table = Table::new(&[
        "write quorum",
        "conns",
        "PUT/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "digests equal after",
    ]);
    let mut cells = Vec::new();
    for quorum in ["1", "2"] {
        ticker.set(format!("masterless --write-quorum {quorum}"));
        let dir = tmp.path().join(format!("q{quorum}"));
        let c = start_cluster(&dir, "masterless", &["--write-quorum", quorum])?;
        let refs: Vec<&Kvd> = c.nodes.iter().collect();
        let r = load_on(&rt, &refs, cli.conns, duration, value.clone(), &ticker)?;
        let conv = wait_converged(&c, Duration::from_secs(60))?;
        table.row(vec![
            quorum.to_string(),
            cli.conns.to_string(),
            fmt_rate(r.ops_per_sec()),
            fmt_ms(r.p50_us()),
            fmt_ms(r.p99_us()),
            r.errors.to_string(),
            format!("{:.0} ms", conv.as_secs_f64() * 1e3),
        ]);
        cells.push(json!({"write_quorum": quorum, "load": r.to_json(),
                          "converged_after_ms": conv.as_secs_f64() * 1e3}));
    }
    results["throughput"] = json!(cells);

    // 2. Convergence after a partition of one node.
    ticker.set(format!("n2 cut off for {partition:?}"));
    let c = start_cluster(&tmp.path().join("partition"), "masterless", &[])?;
    c.isolate(2);
    let refs: Vec<&Kvd> = c.nodes[..2].iter().collect();
    let r = load_on(&rt, &refs, 32, partition, value.clone(), &ticker)?;
    let behind = kvd_status(c.nodes[0].port)?["keys"].as_u64().unwrap_or(0)
        - kvd_status(c.nodes[2].port)?["keys"].as_u64().unwrap_or(0);
    ticker.set("healed; waiting for equal digests");
    let healed = Instant::now();
    c.heal();
    let conv = wait_converged(&c, Duration::from_secs(600))?;
    drop(c);
    let mut ptable = Table::new(&[
        "partition s",
        "writes while cut off",
        "keys behind at heal",
        "converged after heal",
    ]);
    let writes = r.sent.iter().sum::<u64>();
    ptable.row(vec![
        format!("{:.0}", partition.as_secs_f64()),
        writes.to_string(),
        behind.to_string(),
        format!("{:.0} ms", conv.as_secs_f64() * 1e3),
    ]);
    results["partition"] = json!({"seconds": partition.as_secs_f64(), "writes": writes,
        "keys_behind": behind, "converged_after_ms": conv.as_secs_f64() * 1e3,
        "heal_to_check_ms": healed.elapsed().as_secs_f64() * 1e3});

    // 3. Mode switch pause under 16 writers.
    ticker.set("mode switches under 16 writers");
    let c = start_cluster(&tmp.path().join("switch"), "primary-secondary", &[])?;
    let urls = c.urls();
    let (pauses, max_write_ms, errors, acked) = rt.block_on(switch_cycles(&urls, cycles))?;
    drop(c);
    let mut stable = Table::new(&["switch", "pause ms", "of which converging ms"]);
    for (name, p, conv) in &pauses {
        stable.row(vec![
            name.clone(),
            format!("{:.1}", p.as_secs_f64() * 1e3),
            format!("{:.1}", conv.as_secs_f64() * 1e3),
        ]);
    }
    let worst = pauses.iter().map(|p| p.1).max().unwrap_or_default();
    results["mode_switch"] = json!({
        "switches": pauses.iter().map(|(n, p, c)| json!({"switch": n,
            "pause_ms": p.as_secs_f64() * 1e3, "converge_ms": c.as_secs_f64() * 1e3})).collect::<Vec<_>>(),
        "worst_pause_ms": worst.as_secs_f64() * 1e3,
        "target_ms": 1000,
        "longest_client_write_ms": max_write_ms,
        "writer_errors": errors,
        "acknowledged_writes": acked,
    });
    drop(ticker);
    pb.finish_and_clear();

    println!("\nMasterless throughput, 100-byte values, connections spread over 3 nodes:");
    print!("{}", table.render());
    println!("\nConvergence after one node is cut off while the other two take writes:");
    print!("{}", ptable.render());
    println!("\nMode switch under 16 kvclient writers:");
    print!("{}", stable.render());
    let verdict = Verdict {
        claim: "worst write pause of a mode switch, ms".into(),
        value: Some(worst.as_secs_f64() * 1e3),
        target: Target::AtMost(1000.0),
        errors,
        detail: format!(
            "longest write seen by a client {max_write_ms} ms; {acked} acknowledged writes"
        ),
    };
    println!("{}", verdict.line());
    let throughput_errors: u64 = cells
        .iter()
        .filter_map(|c| c["load"]["errors"].as_u64())
        .sum();
    if throughput_errors > 0 {
        println!("throughput cells: {throughput_errors} errors");
    }
    report_results("masterless", &results, &command)?;
    Ok(if errors == 0 && throughput_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

type Pauses = Vec<(String, Duration, Duration)>;

/// Runs `cycles` switches there and back under 16 writers.
async fn switch_cycles(urls: &[String], cycles: usize) -> Result<(Pauses, u64, u64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    // Only writes started after the warm-up count for the longest write (a
    // fresh cluster's secondaries answer 503 no_primary with Retry-After: 1
    // until the primary's first append reaches them).
    let measuring = Arc::new(AtomicBool::new(false));
    let max_ms = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for t in 0..16 {
        let mut order = urls.to_vec();
        order.rotate_left(t % urls.len());
        let client = kvclient::Client::builder()
            .endpoints(order)
            .retry_deadline(Duration::from_secs(30))
            .build()?;
        let (stop, max_ms, errors, acked, measuring) = (
            stop.clone(),
            max_ms.clone(),
            errors.clone(),
            acked.clone(),
            measuring.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let t0 = Instant::now();
                let measured = measuring.load(Ordering::Relaxed);
                match client.set(&format!("s{t}-{seq}"), "x".repeat(100)).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            max_ms.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let opts = SwitchOptions::default();
    let mut pauses = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    for _ in 0..cycles {
        for to in [Mode::Masterless, Mode::PrimarySecondary] {
            let r = switch_mode(urls, to, &opts).await?;
            if r.digests_after
                .iter()
                .any(|d| d.digest != r.digests_before[0].digest)
            {
                bail!("digests differ after switching to {to}: {r:?}");
            }
            pauses.push((format!("-> {to}"), r.pause, r.converge));
            // Let the writers run in the new mode for a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    Ok((
        pauses,
        max_ms.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
    ))
}
