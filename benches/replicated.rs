//! `replicated`: durable PUT writes/s and p50/p99 latency of a 3-node kvd
//! cluster on loopback (`--sync-replicas 1`: a write is acknowledged once
//! durable on the primary and one secondary), beside a single kvd node and a
//! 3-member etcd cluster, all driven by the same load generator in the same
//! run; then the failover time (SIGKILL of the primary to the first
//! successful write on the promoted secondary) over several runs.
//!
//! Method. Throughput: interleaved rounds (kvd single, kvd 3-node, etcd
//! 3-member over its JSON gateway and, with `--features etcd-grpc`, over
//! gRPC), each on fresh servers in fresh temp dirs; the medians of the rounds
//! are compared; each etcd front end gets a cluster of its own. The load is
//! the closed-loop generator of the kit's `bench` module (one
//! tokio task per keep-alive connection, new unique 16-byte keys, 100-byte
//! values), aimed at the kvd primary and at the etcd leader (a follower
//! would only forward). Server CPU is the sum over every process of the
//! system (3 for a cluster).
//!
//! Failover: a fresh 3-node cluster, a writer loop (`--failover-writers`
//! tasks, each PUT back to back to the node it currently believes is the
//! primary, redirects not followed). Each run SIGKILLs the primary, reads
//! `/v1/status` of the two survivors, points the writers at the one with the
//! higher `last_index` and POSTs `/promote_to_primary` to it (on 409
//! `behind_peer`, the other one), and measures from the SIGKILL to the
//! completion of the first 2xx PUT, started after the kill, on the new
//! primary. The killed node is restarted (it rejoins as a secondary) and
//! caught up before the next run.
//!
//! Run `bash benches/setup.sh` first (installs etcd), then
//! `cargo build --release && cargo bench --features etcd-grpc --bench replicated`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use indicatif::ProgressBar;
use kvstore_testkit::bench::*;
use kvstore_testkit::{start_cluster, Kvd};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "replicated",
    about = "Durable PUT throughput of a 3-node kvd cluster beside a single kvd and a 3-member etcd; failover time.",
    override_usage = "cargo build --release && cargo bench --features etcd-grpc --bench replicated -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// short run: 1 round of 2 s cells, 3 failover runs
    #[arg(long)]
    quick: bool,
    /// interleaved rounds; medians compared (default 3, quick 1)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// measured seconds per cell (default 5, quick 2)
    #[arg(long, value_name = "S")]
    duration_secs: Option<f64>,
    /// unmeasured warm-up before each cell (default 1, quick 0.5)
    #[arg(long, value_name = "S")]
    warmup_secs: Option<f64>,
    /// connections of the PUT load (default 64)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_default_value = true
    )]
    conns: usize,
    /// value size in bytes (default 100)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        hide_default_value = true
    )]
    value_bytes: usize,
    /// --sync-replicas of the kvd cluster (default 1)
    #[arg(long, value_name = "N", default_value_t = 1, hide_default_value = true)]
    sync_replicas: u32,
    /// load generator runtime: 0 = current-thread, N = N workers (default 2)
    #[arg(long, value_name = "N", default_value_t = 2, hide_default_value = true)]
    client_threads: usize,
    /// extra kvd flags for every node, space separated
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    kvd_args: Option<String>,
    /// failover runs (default 10, quick 3; 0 skips the failover part)
    #[arg(long, value_name = "N")]
    failover_runs: Option<usize>,
    /// concurrent writers during the failover runs (default 16)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        hide_default_value = true
    )]
    failover_writers: usize,
    /// steady writing before each SIGKILL, in ms (default 500)
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        hide_default_value = true
    )]
    failover_settle_ms: u64,
    /// skip the etcd cluster
    #[arg(long)]
    no_etcd: bool,
    /// skip the single kvd node
    #[arg(long)]
    no_single: bool,
    /// exit non-zero when the 2x target is missed
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// The cluster-throughput target this benchmark checks.
const TARGET_ETCD_RATIO: f64 = 2.0;

const KVD_SINGLE: &str = "kvd single node";
const KVD_CLUSTER: &str = "kvd 3 nodes (sync 1)";
const ETCD_GATEWAY: &str = "etcd 3 members (JSON gateway)";
const ETCD_GRPC: &str = "etcd 3 members (gRPC)";

fn main() -> ExitCode {
    exit_code("replicated", run())
}

struct Config {
    quick: bool,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    conns: usize,
    value_bytes: usize,
    sync_replicas: u32,
    client_threads: usize,
    kvd_args: Vec<String>,
    failover_runs: usize,
    failover_writers: usize,
    failover_settle: Duration,
    etcd: bool,
    single: bool,
}

impl Config {
    fn from_cli(cli: &Cli) -> Config {
        let quick = cli.quick;
        let pick = |v: Option<f64>, normal: f64, short: f64| {
            Duration::from_secs_f64(v.unwrap_or(if quick { short } else { normal }))
        };
        Config {
            quick,
            rounds: cli.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
            duration: pick(cli.duration_secs, 5.0, 2.0),
            warmup: pick(cli.warmup_secs, 1.0, 0.5),
            conns: cli.conns.max(1),
            value_bytes: cli.value_bytes,
            sync_replicas: cli.sync_replicas,
            client_threads: cli.client_threads,
            kvd_args: split_flags(cli.kvd_args.as_deref().unwrap_or("")),
            failover_runs: cli.failover_runs.unwrap_or(if quick { 3 } else { 10 }),
            failover_writers: cli.failover_writers.max(1),
            failover_settle: Duration::from_millis(cli.failover_settle_ms),
            etcd: !cli.no_etcd,
            single: !cli.no_single,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "duration_secs": self.duration.as_secs_f64(),
            "warmup_secs": self.warmup.as_secs_f64(),
            "conns": self.conns,
            "value_bytes": self.value_bytes,
            "sync_replicas": self.sync_replicas,
            "client_threads": self.client_threads,
            "load_generator": if self.client_threads == 0 {
                "tokio current_thread runtime, hyper 1 keep-alive, one task per connection".to_string()
            } else {
                format!("tokio multi_thread runtime ({} workers), hyper 1 keep-alive, one task per connection", self.client_threads)
            },
            "kvd_args": self.kvd_args,
            "failover_runs": self.failover_runs,
            "failover_writers": self.failover_writers,
            "failover_settle_ms": self.failover_settle.as_millis() as u64,
            "etcd": self.etcd,
            "single": self.single,
        })
    }

    /// Flags of every node of a kvd cluster (after the per-node ones).
    fn cluster_args(&self) -> Vec<String> {
        let mut v = vec![
            "--sync-replicas".to_string(),
            self.sync_replicas.to_string(),
        ];
        v.extend(self.kvd_args.iter().cloned());
        v
    }
}

/// One measured cell.
struct Cell {
    system: String,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    /// CPU of every server process of the system, summed (% of one core).
    server_cpu: f64,
    client_cpu: f64,
    other_cpu: f64,
    detail: Value,
}

impl Cell {
    fn to_json(&self) -> Value {
        json!({
            "system": self.system,
            "ops_per_sec": self.ops_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "errors": self.errors,
            "server_cpu_pct": self.server_cpu,
            "client_cpu_pct": self.client_cpu,
            "other_cpu_pct": self.other_cpu,
            "detail": self.detail,
        })
    }

    fn row(&self, round: &str) -> Vec<String> {
        vec![
            round.to_string(),
            self.system.clone(),
            fmt_rate(self.ops_per_sec),
            fmt_ms(self.p50_us),
            fmt_ms(self.p99_us),
            self.errors.to_string(),
            format!("{:.0}%", self.server_cpu),
            format!("{:.0}%", self.client_cpu),
            format!("{:.0}%", self.other_cpu),
        ]
    }
}

/// Median of one system's cells over the rounds.
fn median_cell(cells: &[&Cell]) -> Option<Cell> {
    let first = cells.first()?;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rates: Vec<f64> = cells.iter().map(|c| c.ops_per_sec).collect();
    Some(Cell {
        system: first.system.clone(),
        ops_per_sec: med(rates.clone()),
        p50_us: med(cells.iter().map(|c| c.p50_us as f64).collect()) as u64,
        p99_us: med(cells.iter().map(|c| c.p99_us as f64).collect()) as u64,
        errors: cells.iter().map(|c| c.errors).sum(),
        server_cpu: med(cells.iter().map(|c| c.server_cpu).collect()),
        client_cpu: med(cells.iter().map(|c| c.client_cpu).collect()),
        other_cpu: med(cells.iter().map(|c| c.other_cpu).collect()),
        detail: json!({
            "rounds": cells.len(),
            "ops_per_sec_each": rates,
            "p99_us_each": cells.iter().map(|c| c.p99_us).collect::<Vec<_>>(),
            "ops_per_sec_min": rates.iter().copied().min_by(f64::total_cmp),
            "ops_per_sec_max": rates.iter().copied().max_by(f64::total_cmp),
        }),
    })
}

/// A 3-node kvd cluster linked directly on loopback (n0 the primary), in
/// `dir` (created: the nodes' logs go beside their data dirs).
fn start_kvd_cluster(dir: &Path, flags: &[String]) -> Result<Vec<Kvd>> {
    std::fs::create_dir_all(dir)?;
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_cluster(dir, &args)
}

struct Ctx<'a> {
    cfg: &'a Config,
    rt: &'a tokio::runtime::Runtime,
    ticker: &'a Ticker,
    http: reqwest::Client,
    value: Bytes,
}

impl Ctx<'_> {
    fn spec(&self, port: u16, proto: Proto) -> LoadSpec {
        LoadSpec {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            proto,
            conns: self.cfg.conns,
            warmup: self.cfg.warmup,
            duration: self.cfg.duration,
        }
    }

    fn measure(
        &self,
        system: &str,
        spec: &LoadSpec,
        make: Arc<MakeRequest>,
        pids: &[String],
    ) -> Result<Cell> {
        self.ticker.set(format!("{system} PUT c={}", spec.conns));
        let (res, cpu) = with_cpu_of(pids, || {
            self.rt
                .block_on(run_load(spec, make, self.ticker.live.clone()))
        })?;
        Ok(Cell {
            system: system.to_string(),
            ops_per_sec: res.ops_per_sec(),
            p50_us: res.p50_us(),
            p99_us: res.p99_us(),
            errors: res.errors,
            server_cpu: cpu.server,
            client_cpu: cpu.client,
            other_cpu: cpu.other,
            detail: res.to_json(),
        })
    }

    fn kvd_single(&self, dir: &Path) -> Result<Cell> {
        self.ticker.set(format!("starting {KVD_SINGLE}"));
        let args: Vec<&str> = self.cfg.kvd_args.iter().map(String::as_str).collect();
        std::fs::create_dir_all(dir)?;
        let node = Kvd::start(&dir.join("data"), &args)?;
        let pid = node.pid().context("kvd has a pid")?.to_string();
        self.measure(
            KVD_SINGLE,
            &self.spec(node.port, Proto::Http1),
            kvd_put_make(self.value.clone()),
            &[pid],
        )
    }

    fn kvd_cluster(&self, dir: &Path) -> Result<Cell> {
        self.ticker.set(format!("starting {KVD_CLUSTER}"));
        let nodes = start_kvd_cluster(dir, &self.cfg.cluster_args())?;
        self.rt
            .block_on(await_writable(&self.http, nodes[0].port))?;
        let pids: Vec<String> = nodes
            .iter()
            .filter_map(|n| n.pid().map(|p| p.to_string()))
            .collect();
        let mut cell = self.measure(
            KVD_CLUSTER,
            &self.spec(nodes[0].port, Proto::Http1),
            kvd_put_make(self.value.clone()),
            &pids,
        )?;
        // Every node should hold the writes: show how far each got.
        let statuses: Vec<Value> = nodes
            .iter()
            .map(|n| kvd_status(n.port).unwrap_or(Value::Null))
            .collect();
        cell.detail["nodes_after"] = json!(statuses
            .iter()
            .map(|s| json!({
                "role": s["role"],
                "last_index": s["last_index"],
                "commit_index": s["commit_index"],
            }))
            .collect::<Vec<_>>());
        Ok(cell)
    }

    /// One cell per etcd front end, each on a fresh 3-member cluster of
    /// its own: a cluster that took the other front end's writes would
    /// start the second cell with a bigger database and log.
    fn etcd_cluster(&self, dir: &Path) -> Result<Vec<Cell>> {
        // Pushed to with `--features etcd-grpc`.
        #[allow(unused_mut)]
        let mut cells = vec![self.etcd_cell(&dir.join("gateway"), ETCD_GATEWAY)?];
        #[cfg(feature = "etcd-grpc")]
        cells.push(self.etcd_cell(&dir.join("grpc"), ETCD_GRPC)?);
        Ok(cells)
    }

    fn etcd_cell(&self, dir: &Path, system: &str) -> Result<Cell> {
        self.ticker.set("starting etcd 3 members");
        let members = start_etcd_cluster(dir, 3)?;
        let leader = self.rt.block_on(etcd_leader(&self.http, &members))?;
        let pids: Vec<String> = members.iter().map(|m| m.pid().to_string()).collect();
        let (spec, make) = match system {
            #[cfg(feature = "etcd-grpc")]
            ETCD_GRPC => (
                self.spec(leader, Proto::Http2),
                etcd_grpc_put_make(leader, self.value.clone()),
            ),
            _ => (
                self.spec(leader, Proto::Http1),
                etcd_gateway_put_make(&self.value),
            ),
        };
        let mut cell = self.measure(system, &spec, make, &pids)?;
        cell.detail["leader_port"] = json!(leader);
        Ok(cell)
    }
}

// ---------------------------------------------------------------------------
// Failover

/// What the writer loop shares with the failover driver.
struct Writers {
    /// Port the writers send to (the node believed to be the primary).
    target: AtomicU16,
    /// Set by the driver at the SIGKILL: (new primary's port, kill instant).
    armed: Mutex<Option<(u16, Instant)>>,
    /// Completion of the first 2xx PUT on the armed port started after the
    /// kill.
    first_ok: Mutex<Option<Instant>>,
    acked: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

async fn writer(w: Arc<Writers>, id: usize, value: Bytes, live: Arc<AtomicU64>) {
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(h) => h,
        Err(_) => return,
    };
    let mut seq = 0u64;
    while !w.stop.load(Ordering::Relaxed) {
        let port = w.target.load(Ordering::Relaxed);
        let key = format!("f{id:03}{seq:012}");
        seq += 1;
        let t0 = Instant::now();
        let ok = matches!(
            http.put(format!("http://127.0.0.1:{port}/v1/kv/{key}"))
                .body(value.clone())
                .send()
                .await,
            Ok(r) if r.status().is_success()
        );
        let t1 = Instant::now();
        if ok {
            w.acked.fetch_add(1, Ordering::Relaxed);
            live.fetch_add(1, Ordering::Relaxed);
            let armed = w.armed.lock().map(|a| *a).unwrap_or(None);
            if let Some((p, killed)) = armed {
                if p == port && t0 >= killed {
                    if let Ok(mut f) = w.first_ok.lock() {
                        if f.is_none_or(|f| t1 < f) {
                            *f = Some(t1);
                        }
                    }
                }
            }
        } else {
            w.failed.fetch_add(1, Ordering::Relaxed);
            // A dead node refuses at once, a secondary answers 307: do
            // not spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

struct FailoverRun {
    killed: String,
    promoted: String,
    /// SIGKILL to the first successful write on the new primary.
    failover: Duration,
    /// SIGKILL to the 200 answer of /promote_to_primary.
    promote_done: Duration,
    refusals: Vec<Value>,
    epoch: u64,
    rejoin: Duration,
}

impl FailoverRun {
    fn to_json(&self) -> Value {
        json!({
            "killed": self.killed,
            "promoted": self.promoted,
            "failover_ms": self.failover.as_secs_f64() * 1000.0,
            "kill_to_promote_answer_ms": self.promote_done.as_secs_f64() * 1000.0,
            "refusals": self.refusals,
            "epoch": self.epoch,
            "rejoin_ms": self.rejoin.as_secs_f64() * 1000.0,
        })
    }
}

async fn status_of(http: &reqwest::Client, port: u16) -> Result<Value> {
    Ok(http
        .get(format!("http://127.0.0.1:{port}/v1/status"))
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .json()
        .await?)
}

async fn promote(http: &reqwest::Client, port: u16) -> Result<(u16, Value)> {
    let r = http
        .post(format!("http://127.0.0.1:{port}/promote_to_primary"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let code = r.status().as_u16();
    Ok((code, r.json().await.unwrap_or(Value::Null)))
}

/// Promotes the most up-to-date of `survivors` (by `last_index`; on 409
/// `behind_peer` the other). Points the writers at each candidate before
/// asking it. Returns the promoted index, the epoch and the refusals.
async fn promote_best(
    http: &reqwest::Client,
    w: &Writers,
    nodes: &[Kvd],
    survivors: &[usize],
    killed_at: Instant,
) -> Result<(usize, u64, Vec<Value>)> {
    let mut refusals = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut order = Vec::new();
        for &i in survivors {
            let last = status_of(http, nodes[i].port).await.ok().and_then(|s| {
                Some((
                    s["last_epoch"].as_u64().unwrap_or(0),
                    s["last_index"].as_u64()?,
                ))
            });
            order.push((last.unwrap_or((0, 0)), i));
        }
        order.sort();
        order.reverse();
        for &(_, i) in &order {
            let port = nodes[i].port;
            w.target.store(port, Ordering::Relaxed);
            if let Ok(mut a) = w.armed.lock() {
                *a = Some((port, killed_at));
            }
            let (code, body) = promote(http, port).await?;
            if code == 200 {
                let epoch = body["epoch"].as_u64().unwrap_or(0);
                return Ok((i, epoch, refusals));
            }
            refusals.push(json!({"node": nodes[i].url(), "status": code, "body": body}));
        }
        if Instant::now() > deadline {
            bail!("nobody could be promoted: {refusals:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the restarted node `i` is a secondary of `epoch` holding
/// everything the primary had committed when it came back.
fn await_rejoin(
    rt: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    nodes: &[Kvd],
    i: usize,
    primary: usize,
    epoch: u64,
) -> Result<()> {
    let target = rt
        .block_on(status_of(http, nodes[primary].port))?
        .get("commit_index")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = rt.block_on(status_of(http, nodes[i].port)) {
            if s["role"] == "secondary"
                && s["epoch"].as_u64() == Some(epoch)
                && s["last_index"].as_u64().unwrap_or(0) >= target
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("restarted {} did not rejoin: {s}", nodes[i].url());
            }
        } else if Instant::now() > deadline {
            bail!("restarted {} does not answer /v1/status", nodes[i].url());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn failover(
    ctx: &Ctx,
    dir: &Path,
    pb: &ProgressBar,
) -> Result<(Vec<FailoverRun>, u64, u64, Vec<Value>)> {
    let cfg = ctx.cfg;
    let (rt, http) = (ctx.rt, &ctx.http);
    ctx.ticker.set("failover: starting cluster");
    let mut nodes = start_kvd_cluster(dir, &cfg.cluster_args())?;
    rt.block_on(await_writable(http, nodes[0].port))?;
    let w = Arc::new(Writers {
        target: AtomicU16::new(nodes[0].port),
        armed: Mutex::new(None),
        first_ok: Mutex::new(None),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..cfg.failover_writers)
        .map(|id| {
            rt.spawn(writer(
                w.clone(),
                id,
                ctx.value.clone(),
                ctx.ticker.live.clone(),
            ))
        })
        .collect();

    let mut runs = Vec::new();
    let mut primary = 0usize;
    let outcome = (|| -> Result<()> {
        for run in 0..cfg.failover_runs {
            ctx.ticker.set(format!("failover run {}", run + 1));
            // Steady writing on the current primary first.
            let before = w.acked.load(Ordering::Relaxed);
            std::thread::sleep(cfg.failover_settle);
            if w.acked.load(Ordering::Relaxed) == before {
                bail!(
                    "run {}: no write acknowledged by primary {} before the kill",
                    run + 1,
                    nodes[primary].url()
                );
            }
            if let Ok(mut f) = w.first_ok.lock() {
                *f = None;
            }
            let killed_at = Instant::now();
            if let Ok(mut a) = w.armed.lock() {
                // Nothing counts until a candidate is named.
                *a = Some((0, killed_at));
            }
            nodes[primary].kill9()?;
            let survivors: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
            let (next, epoch, refusals) =
                rt.block_on(promote_best(http, &w, &nodes, &survivors, killed_at))?;
            let promote_done = killed_at.elapsed();
            let deadline = Instant::now() + Duration::from_secs(30);
            let first = loop {
                if let Some(t) = w.first_ok.lock().ok().and_then(|f| *f) {
                    break t;
                }
                if Instant::now() > deadline {
                    bail!(
                        "run {}: no write succeeded on the new primary {} within 30 s",
                        run + 1,
                        nodes[next].url()
                    );
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            if let Ok(mut a) = w.armed.lock() {
                *a = None;
            }
            let failover = first.duration_since(killed_at);
            ctx.ticker.set(format!(
                "failover run {}: {:.0} ms; restarting {}",
                run + 1,
                failover.as_secs_f64() * 1000.0,
                nodes[primary].url()
            ));
            let r0 = Instant::now();
            nodes[primary].restart()?;
            await_rejoin(rt, http, &nodes, primary, next, epoch)?;
            runs.push(FailoverRun {
                killed: nodes[primary].url(),
                promoted: nodes[next].url(),
                failover,
                promote_done,
                refusals,
                epoch,
                rejoin: r0.elapsed(),
            });
            primary = next;
            pb.inc(1);
        }
        Ok(())
    })();
    w.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = rt.block_on(t);
    }
    outcome?;
    // Once writing stops, all three digests should agree.
    let deadline = Instant::now() + Duration::from_secs(30);
    let finals = loop {
        let s: Vec<Value> = nodes
            .iter()
            .map(|n| rt.block_on(status_of(http, n.port)).unwrap_or(Value::Null))
            .collect();
        if s.iter().all(|x| x["digest"] == s[0]["digest"]) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((
        runs,
        w.acked.load(Ordering::Relaxed),
        w.failed.load(Ordering::Relaxed),
        finals,
    ))
}

fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::from_cli(&cli);
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("replicated", cli.tmp_dir.as_deref())?;
    let rt = runtime(cfg.client_threads)?;

    let per_round = usize::from(cfg.single)
        + 1
        + if cfg.etcd {
            1 + usize::from(cfg!(feature = "etcd-grpc"))
        } else {
            0
        };
    let pb = bar(
        (cfg.rounds * per_round + cfg.failover_runs) as u64,
        "replicated {bar:30} {pos}/{len} {msg}",
    );
    let ticker = Ticker::new(pb.clone());
    let ctx = Ctx {
        cfg: &cfg,
        rt: &rt,
        ticker: &ticker,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?,
        value: Bytes::from(value_of(42, cfg.value_bytes)),
    };
    let etcd_version = cfg
        .etcd
        .then(|| tool_version("etcd", "--version"))
        .flatten();

    // Interleaved rounds, fresh servers each time.
    let mut cells: Vec<(usize, Cell)> = Vec::new();
    for round in 0..cfg.rounds {
        let rdir = tmp.path().join(format!("round-{round}"));
        if cfg.single {
            cells.push((round, ctx.kvd_single(&rdir.join("single"))?));
            pb.inc(1);
        }
        cells.push((round, ctx.kvd_cluster(&rdir.join("cluster"))?));
        pb.inc(1);
        if cfg.etcd {
            for c in ctx.etcd_cluster(&rdir.join("etcd"))? {
                cells.push((round, c));
                pb.inc(1);
            }
        }
    }

    let fo = if cfg.failover_runs > 0 {
        Some(failover(&ctx, &tmp.path().join("failover"), &pb)?)
    } else {
        None
    };
    drop(ticker);
    pb.finish_with_message("done");
    let noisy_end = warn_if_noisy("end");

    // Report.
    let header = [
        "round",
        "system",
        "PUT/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU",
        "loadgen CPU",
        "other CPU",
    ];
    let mut table = Table::new(&header);
    for (round, c) in &cells {
        table.row(c.row(&(round + 1).to_string()));
    }
    let pick = |system: &str| {
        let v: Vec<&Cell> = cells
            .iter()
            .filter(|(_, c)| c.system == system)
            .map(|(_, c)| c)
            .collect();
        median_cell(&v)
    };
    let medians: Vec<Cell> = [KVD_SINGLE, KVD_CLUSTER, ETCD_GATEWAY, ETCD_GRPC]
        .iter()
        .filter_map(|s| pick(s))
        .collect();
    for m in &medians {
        table.row(m.row("median"));
    }
    println!();
    println!(
        "replicated: durable PUT, {} connections, {} B values, {:.1} s per cell after {:.1} s warm-up, {} interleaved rounds; server CPU summed over the system's processes",
        cfg.conns,
        cfg.value_bytes,
        cfg.duration.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.rounds
    );
    print!("{}", table.render());

    let mut summary = serde_json::Map::new();
    let mut failed = false;
    println!();
    let find = |s: &str| medians.iter().find(|m| m.system == s);
    let etcd_best = medians
        .iter()
        .filter(|m| m.system == ETCD_GATEWAY || m.system == ETCD_GRPC)
        .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    if let (Some(k), Some(e)) = (find(KVD_CLUSTER), etcd_best) {
        let ratio = k.ops_per_sec / e.ops_per_sec;
        // Errors of either side's cells (every round) fail the verdict.
        let verdict = Verdict {
            claim: format!(
                "kvd 3-node / etcd 3-member PUT/s c={} (medians, vs the better etcd front end, {})",
                cfg.conns, e.system
            ),
            value: Some(ratio),
            target: Target::AtLeast(TARGET_ETCD_RATIO),
            errors: k.errors + e.errors,
            detail: format!("{:.0} vs {:.0} PUT/s", k.ops_per_sec, e.ops_per_sec),
        };
        let ok = verdict.met();
        failed |= !ok;
        println!("{}", verdict.line());
        for m in medians.iter().filter(|m| m.system.starts_with("etcd")) {
            println!(
                "  kvd 3-node / {}: {:.2}x; p99 {} ms vs {} ms",
                m.system,
                k.ops_per_sec / m.ops_per_sec,
                fmt_ms(k.p99_us),
                fmt_ms(m.p99_us)
            );
        }
        summary.insert("kvd_cluster_over_etcd_cluster".into(), json!(ratio));
        summary.insert("target".into(), json!(TARGET_ETCD_RATIO));
        summary.insert("pass".into(), json!(ok));
        summary.insert("errors".into(), json!(verdict.errors));
        summary.insert("etcd_compared".into(), json!(e.system));
    }
    if let (Some(k), Some(s)) = (find(KVD_CLUSTER), find(KVD_SINGLE)) {
        let ratio = k.ops_per_sec / s.ops_per_sec;
        println!(
            "kvd 3-node / kvd single node: {:.0}% of the single node's PUT/s; p99 {} ms vs {} ms",
            ratio * 100.0,
            fmt_ms(k.p99_us),
            fmt_ms(s.p99_us)
        );
        summary.insert("kvd_cluster_over_single".into(), json!(ratio));
    }

    let mut failover_json = Value::Null;
    if let Some((runs, acked, failed_writes, finals)) = &fo {
        let mut times: Vec<Duration> = runs.iter().map(|r| r.failover).collect();
        times.sort();
        let (p50, max) = (quantile_ms(&times, 0.5), quantile_ms(&times, 1.0));
        let mut promote: Vec<Duration> = runs.iter().map(|r| r.promote_done).collect();
        promote.sort();
        let mut ft = Table::new(&[
            "run",
            "killed",
            "promoted",
            "epoch",
            "refused",
            "promote answered ms",
            "first write ms",
            "rejoin ms",
        ]);
        for (i, r) in runs.iter().enumerate() {
            ft.row(vec![
                (i + 1).to_string(),
                r.killed.clone(),
                r.promoted.clone(),
                r.epoch.to_string(),
                r.refusals.len().to_string(),
                format!("{:.1}", r.promote_done.as_secs_f64() * 1000.0),
                format!("{:.1}", r.failover.as_secs_f64() * 1000.0),
                format!("{:.0}", r.rejoin.as_secs_f64() * 1000.0),
            ]);
        }
        let digests_equal = finals.iter().all(|x| x["digest"] == finals[0]["digest"]);
        println!();
        println!(
            "failover: {} writers, SIGKILL of the primary -> first successful write on the promoted secondary, {} runs",
            cfg.failover_writers,
            runs.len()
        );
        print!("{}", ft.render());
        println!(
            "failover time: p50 {p50:.1} ms, max {max:.1} ms  (SIGKILL -> promote answered: p50 {:.1} ms); {acked} writes acknowledged, {failed_writes} failed or redirected; final digests equal: {digests_equal}",
            quantile_ms(&promote, 0.5)
        );
        failover_json = json!({
            "writers": cfg.failover_writers,
            "p50_ms": p50,
            "max_ms": max,
            "kill_to_promote_answer_p50_ms": quantile_ms(&promote, 0.5),
            "runs": runs.iter().map(FailoverRun::to_json).collect::<Vec<_>>(),
            "writes_acknowledged": acked,
            "writes_failed_or_redirected": failed_writes,
            "final_digests_equal": digests_equal,
            "final_status": finals,
        });
        summary.insert("failover_p50_ms".into(), json!(p50));
        summary.insert("failover_max_ms".into(), json!(max));
    }
    if noisy_start || noisy_end {
        println!("note: compilers were running during the run; the numbers are noisy");
    }

    let results = json!({
        "bench": "replicated",
        "command": command,
        "config": cfg.to_json(),
        "environment": env_start,
        "noisy": noisy_start || noisy_end,
        "versions": { "etcd": etcd_version },
        "rounds": cells.iter().map(|(r, c)| {
            let mut v = c.to_json();
            v["round"] = json!(r + 1);
            v
        }).collect::<Vec<_>>(),
        "medians": medians.iter().map(Cell::to_json).collect::<Vec<_>>(),
        "failover": failover_json,
        "summary": summary,
    });
    report_results("replicated", &results, &command)?;
    Ok(if failed && cli.strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
