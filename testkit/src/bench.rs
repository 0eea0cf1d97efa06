//! Shared parts of the benchmark programs (`benches/`; feature `bench`):
//! flag value parsers, a lean HTTP load generator (plain, or over TLS with a
//! bearer token) and the PUT requests it sends, a live rate display, helpers
//! to start the comparison servers (etcd, Redis) and to read process figures
//! from `/proc`, and the report plumbing (table, JSON file, the command that
//! reproduces the run).
//!
//! Every server a benchmark starts runs on a free loopback port in a temp dir
//! and is killed, by its own PID, when its handle drops.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::{free_port, http_get, wait_until};
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Command line
//
// Each benchmark declares its flags with clap's derive API; what they share
// is here: the value parsers for counts, and the reproduce command.

/// The exact command that reproduces this run: the user's arguments as
/// given, without the `--bench` that `cargo bench` appends for harness-less
/// targets. The features named are the root package's, which turn on the
/// kit's features of the same names.
pub fn reproduce(bench: &str) -> String {
    let mut features = String::new();
    for (on, name) in [
        (cfg!(feature = "etcd-grpc"), "etcd-grpc"),
        (cfg!(feature = "sqlite-bench"), "sqlite-bench"),
    ] {
        if on {
            features.push_str(" --features ");
            features.push_str(name);
        }
    }
    let mut cmd = format!("cargo build --release && cargo bench{features} --bench {bench}");
    let raw: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a != "--bench")
        .collect();
    if !raw.is_empty() {
        cmd.push_str(" --");
        for a in &raw {
            cmd.push(' ');
            cmd.push_str(&shell_quote(a));
        }
    }
    cmd
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A count such as `0`, `1000`, `10k` or `1M` (k and M suffixes); a clap
/// value parser.
pub fn parse_count(s: &str) -> std::result::Result<u64, String> {
    let not_a_count = || format!("{s:?} is not a count (e.g. 0, 1000, 10k, 1M)");
    let (num, mult) = match s.chars().last().ok_or_else(not_a_count)? {
        'k' | 'K' => (&s[..s.len() - 1], 1_000),
        'm' | 'M' => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| not_a_count())
}

/// A comma-separated list of counts such as `0,1k,100k,1M`; a clap value
/// parser.
pub fn parse_counts(s: &str) -> std::result::Result<Vec<u64>, String> {
    s.split(',').map(|c| parse_count(c.trim())).collect()
}

/// `1000000` -> `1M`, `20000` -> `20k`.
pub fn human_count(n: u64) -> String {
    // Remainders bound first: `is_multiple_of` is newer than the MSRV.
    let (rem_m, rem_k) = (n % 1_000_000, n % 1_000);
    if n >= 1_000_000 && rem_m == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && rem_k == 0 {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------
// Where things live, and the report

/// The workspace root: the parent of the kit's own directory.
pub fn workspace_root() -> PathBuf {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR"));
    kit.parent().unwrap_or(kit).to_path_buf()
}

/// Parent of the benchmarks' temp dirs: `--tmp-dir`, else the system temp
/// dir. It must be on a real disk, not tmpfs, or fsync costs nothing.
pub fn tmp_parent(tmp_dir: Option<&Path>) -> PathBuf {
    tmp_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// Set to `1` to run on tmpfs anyway, with a warning.
const ALLOW_TMPFS_ENV: &str = "KVSTORE_BENCH_ALLOW_TMPFS";

/// Refuses a data dir parent on tmpfs: there fsync and fdatasync return at
/// once, so every durable-write figure (kvd's, etcd's, Redis's
/// `appendfsync always`) would measure memory, not the disk. With
/// `KVSTORE_BENCH_ALLOW_TMPFS=1` it warns loudly instead.
pub fn check_not_tmpfs(dir: &Path) -> Result<()> {
    let st =
        nix::sys::statfs::statfs(dir).with_context(|| format!("statfs of {}", dir.display()))?;
    // TMPFS_MAGIC is 0x01021994 (linux/magic.h).
    if st.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(());
    }
    let what = format!(
        "{} is on tmpfs: fsync costs nothing there, so durable writes would be measured \
         without the disk",
        dir.display()
    );
    if std::env::var(ALLOW_TMPFS_ENV).as_deref() == Ok("1") {
        eprintln!("WARNING: {what}; {ALLOW_TMPFS_ENV}=1 is set, running anyway: the figures mean nothing for durability");
        return Ok(());
    }
    bail!("{what}. Pass --tmp-dir DIR on a real disk (or set {ALLOW_TMPFS_ENV}=1 to run anyway)")
}

/// Writes `bench-results/<name>.json` and returns its path.
pub fn write_results(name: &str, value: &Value) -> Result<PathBuf> {
    let dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Facts about the machine and the moment, stored with every result so a
/// number can be judged later (was a compiler running beside it?).
pub fn environment() -> Value {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "busy_processes": busy_processes(),
        "kvd_binary": crate::bin_dir().join("kvd").display().to_string(),
        "unix_time": SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// Names of heavy processes (compilers, linkers) running now: their CPU use
/// skews numbers on a 2-core machine. Read-only look at `/proc/*/comm`.
pub fn busy_processes() -> Vec<String> {
    let ancestors = ancestors();
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            // The `cargo bench` that runs this benchmark is not a rival.
            let pid = e.file_name().to_string_lossy().parse::<u32>().unwrap_or(0);
            if ancestors.contains(&pid) {
                continue;
            }
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if matches!(
                comm,
                "rustc" | "cc" | "ld" | "cc1" | "clippy-driver" | "rust-lld"
            ) || comm.starts_with("cargo")
            {
                found.push(comm.to_string());
            }
        }
    }
    found.sort();
    found
}

/// PIDs of this process and its ancestors.
fn ancestors() -> Vec<u32> {
    let mut out = vec![std::process::id()];
    let mut pid = std::process::id();
    while pid > 1 && out.len() < 64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The field after the parenthesised name and the state is the ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0);
        if ppid == 0 {
            break;
        }
        out.push(ppid);
        pid = ppid;
    }
    out
}

/// Warns when a compile runs beside the benchmark: on 2 cores it steals the
/// CPU the server and the load generator need.
pub fn warn_if_noisy(stage: &str) -> bool {
    let busy = busy_processes();
    if busy.is_empty() {
        return false;
    }
    eprintln!(
        "warning ({stage}): other heavy processes are running ({}); numbers will be noisy",
        busy.join(", ")
    );
    true
}

/// Warns if `target/release/kvd` is older than the kvd sources: `cargo bench`
/// builds the benchmark, not the kvd binary it spawns.
pub fn check_kvd_binary() -> Result<()> {
    let bin = crate::bin_dir().join("kvd");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first (cargo bench builds only the \
             benchmark, not the kvd binary it starts), or set KVSTORE_BIN_DIR",
            bin.display()
        );
    }
    let bin_time = std::fs::metadata(&bin)?.modified()?;
    let src = workspace_root().join("kvd");
    if let Some(newest) = newest_mtime(&src) {
        if newest > bin_time {
            eprintln!(
                "warning: {} is older than the sources in {}; run `cargo build --release`",
                bin.display(),
                src.display()
            );
        }
    }
    Ok(())
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().ok()?.modified().ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// A plain text table, columns padded to their widest cell; columns of
/// numbers are right-aligned, text columns left-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width = vec![0; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..n)
            .map(|i| {
                self.rows.iter().all(|r| {
                    r.get(i).is_none_or(|c| {
                        let c = c.trim_end_matches(['%', 'x']);
                        c == "-" || c.split(" / ").all(|p| p.parse::<f64>().is_ok())
                    })
                })
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, r: &[String]| {
            for (i, c) in r.iter().enumerate().take(n) {
                if i > 0 {
                    out.push_str("  ");
                }
                if !numeric[i] {
                    let _ = write!(out, "{c:<w$}", w = width[i]);
                } else {
                    let _ = write!(out, "{c:>w$}", w = width[i]);
                }
            }
            out.push('\n');
        };
        line(&mut out, &self.header);
        let total: usize = width.iter().sum::<usize>() + 2 * (n - 1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in &self.rows {
            line(&mut out, r);
        }
        out
    }
}

pub fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

pub fn fmt_ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub fn fmt_rate(r: f64) -> String {
    format!("{r:.0}")
}

pub fn fmt_mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

// ---------------------------------------------------------------------------
// Processes

/// VmRSS and VmHWM (peak) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok((
        field("VmRSS:").context("no VmRSS")?,
        field("VmHWM:").unwrap_or(0),
    ))
}

/// VmRSS (and the peak) once two readings 300 ms apart agree within 1%, or
/// after 10 s: a background snapshot or a rehash can briefly move it.
pub fn settled_rss(pid: u32) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rss_kib(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = rss_kib(pid)?;
        let diff = now.0.abs_diff(last.0) as f64;
        if diff <= last.0 as f64 * 0.01 || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// CPU time (user + system) a process has used so far. For `"self"` this
/// includes the children it has reaped (e.g. a finished redis-benchmark).
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut ticks = field(11) + field(12);
    if pid == "self" {
        ticks += field(13) + field(14); // cutime, cstime
    }
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// CPU time the whole machine spent busy (all cores, from `/proc/stat`):
/// with the server's and this process's shares subtracted, what is left
/// is other work competing for the 2 cores.
pub fn machine_busy() -> Duration {
    // cpu user nice system idle iowait irq softirq steal ... Interrupt
    // time is left out: much of it is the loopback traffic of the
    // benchmark itself, charged to no process.
    machine_time(&[0, 1, 2, 7])
}

/// CPU time the whole machine spent idle (idle + iowait, all cores).
pub fn machine_idle() -> Duration {
    machine_time(&[3, 4])
}

/// The sum of the given fields (0: user) of the `cpu` line of `/proc/stat`.
fn machine_time(fields: &[usize]) -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks: u64 = fields.iter().filter_map(|&i| f.get(i)).sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// CPU used over a cell, each as a share of one core (%).
#[derive(Clone, Copy)]
pub struct CpuShare {
    pub server: f64,
    pub client: f64,
    pub other: f64,
    /// Idle share of all cores (200% = both idle): near 0 means the cell
    /// was CPU-bound.
    pub idle: f64,
}

/// Measures CPU time over `f`: the server's, this process's, and the rest
/// of the machine's.
pub fn with_cpu<T>(server_pid: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, CpuShare)> {
    with_cpu_of(&[server_pid.to_string()], f)
}

/// [`with_cpu`] of a system of several server processes (a cluster): their
/// CPU times are summed as the server's.
pub fn with_cpu_of<T>(pids: &[String], f: impl FnOnce() -> Result<T>) -> Result<(T, CpuShare)> {
    let servers = || pids.iter().map(|p| cpu_time(p)).sum::<Duration>();
    let (srv0, me0, all0, idle0) = (servers(), cpu_time("self"), machine_busy(), machine_idle());
    let t0 = Instant::now();
    let out = f()?;
    let wall = t0.elapsed().as_secs_f64();
    let srv = servers().saturating_sub(srv0).as_secs_f64();
    let me = cpu_time("self").saturating_sub(me0).as_secs_f64();
    let all = machine_busy().saturating_sub(all0).as_secs_f64();
    let idle = machine_idle().saturating_sub(idle0).as_secs_f64();
    let pct = |s: f64| s / wall * 100.0;
    Ok((
        out,
        CpuShare {
            server: pct(srv),
            client: pct(me),
            other: pct((all - srv - me).max(0.0)),
            idle: pct(idle),
        },
    ))
}

/// On this shared 2-core machine other work (builds, tests) can take a
/// core in the middle of a cell. A cell during which other processes used
/// more than `max_other_cpu` % of a core is run again, up to `retries`
/// times, and the quietest run is kept; every cell reports its figure.
/// Also the benchmarks' command-line options for it (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct Quiet {
    /// re-run a cell if other processes used more CPU than this (default 25)
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 25.0,
        hide_default_value = true
    )]
    pub max_other_cpu: f64,
    /// re-runs of a noisy cell; the quietest run is kept (default 2)
    #[arg(long, value_name = "N", default_value_t = 2, hide_default_value = true)]
    pub retries: usize,
}

/// Runs `attempt` until it was quiet enough (see [`Quiet`]); returns the
/// quietest run and how many runs were made.
pub fn quietest<T>(
    quiet: &Quiet,
    mut attempt: impl FnMut() -> Result<(T, CpuShare)>,
) -> Result<(T, CpuShare, usize)> {
    let mut best: Option<(T, CpuShare)> = None;
    let mut runs = 0;
    while runs <= quiet.retries {
        runs += 1;
        let (out, cpu) = attempt()?;
        let better = best.as_ref().is_none_or(|(_, b)| cpu.other < b.other);
        if better {
            best = Some((out, cpu));
        }
        if cpu.other <= quiet.max_other_cpu {
            break;
        }
    }
    let (out, cpu) = best.context("at least one run is made")?;
    Ok((out, cpu, runs))
}

/// Microseconds in which some task of the machine waited for I/O so far
/// (`/proc/pressure/io`, "some"), if the kernel reports it. Over a cell it
/// shows disk contention that CPU shares miss: an fsync-bound server waits
/// on its own fsyncs too, so compare cells with each other, not with 0.
pub fn io_stall_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/io").ok()?;
    let some = text.lines().find(|l| l.starts_with("some"))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Total size of the files under `dir`, in bytes.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_bytes(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

/// Copies a directory tree (a stopped kvd's data dir).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Version line of an installed tool, e.g. `etcd --version`.
pub fn tool_version(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// A process this benchmark started; SIGKILLed and reaped on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub log_path: PathBuf,
    pub name: &'static str,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited with {st}; log:\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// SIGTERM and wait up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("{} did not exit within {timeout:?} of SIGTERM", self.name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(name: &'static str, cmd: &mut Command, dir: &Path, port: u16) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning {name} (run benches/setup.sh to install it)"))?;
    Ok(Server {
        child,
        port,
        dir: dir.to_path_buf(),
        log_path,
        name,
    })
}

/// A single-node etcd with its data in `dir/data`, on loopback ports.
pub fn start_etcd(dir: &Path) -> Result<Server> {
    let port = free_port();
    let peer = free_port();
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--name", "bench"])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args(["--logger", "zap", "--log-level", "error"]);
    let mut s = spawn_logged("etcd", &mut cmd, dir, port)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        s.check_alive()?;
        if let Ok((200, body)) = http_get(port, "/health", Duration::from_millis(500)) {
            if String::from_utf8_lossy(&body).contains("true") {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            bail!("etcd did not become healthy; log:\n{}", s.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An etcd cluster of `members` members on loopback (data of member `i` in
/// `dir/m{i}`); returns once every member reports healthy (a leader is
/// elected). Members are killed, by their own PIDs, when dropped.
pub fn start_etcd_cluster(dir: &Path, members: usize) -> Result<Vec<Server>> {
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 2 * members {
        ports.insert(free_port());
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    let (client, peer) = ports.split_at(members);
    let initial = (0..members)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("bench-{}-{}", std::process::id(), client[0]);
    let mut servers = Vec::with_capacity(members);
    for i in 0..members {
        let client_url = format!("http://127.0.0.1:{}", client[i]);
        let peer_url = format!("http://127.0.0.1:{}", peer[i]);
        let mdir = dir.join(format!("m{i}"));
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(mdir.join("data"))
            .args(["--name", &format!("m{i}")])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .args(["--logger", "zap", "--log-level", "error"]);
        servers.push(spawn_logged("etcd", &mut cmd, &mdir, client[i])?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut servers {
        loop {
            s.check_alive()?;
            if let Ok((200, body)) = http_get(s.port, "/health", Duration::from_millis(500)) {
                if String::from_utf8_lossy(&body).contains("true") {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("etcd member did not become healthy; log:\n{}", s.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(servers)
}

/// Redis with every write fsync'd before the reply (`appendfsync always`),
/// no RDB snapshots, data in `dir`.
pub fn start_redis(dir: &Path) -> Result<Server> {
    let port = free_port();
    let mut s = spawn_redis(dir, port)?;
    wait_redis(&mut s, Duration::from_secs(30))?;
    Ok(s)
}

/// Spawns redis-server without waiting (the restart timing polls itself).
pub fn spawn_redis(dir: &Path, port: u16) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .args(["--daemonize", "no"]);
    spawn_logged("redis", &mut cmd, dir, port)
}

/// Waits until Redis answers PING with PONG (it answers -LOADING while it
/// replays its AOF).
pub fn wait_redis(s: &mut Server, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        s.check_alive()?;
        if redis_cmd(s.port, "PING").map(|r| r.starts_with("+PONG")) == Ok(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "redis did not answer PING in {timeout:?}; log:\n{}",
                s.log()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends one inline command to Redis and returns the raw reply (first read).
pub fn redis_cmd(port: u16, cmd: &str) -> std::result::Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{cmd}\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Loads the Redis on `port` with keys `0..keys` ([`preload_key`]) and
/// [`value_of`] values through `redis-cli --pipe`; its report.
pub fn redis_load(port: u16, keys: u64, value_bytes: usize, pb: &ProgressBar) -> Result<String> {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running redis-cli --pipe (run benches/setup.sh to install it)")?;
    {
        let mut stdin = std::io::BufWriter::with_capacity(
            1 << 20,
            child.stdin.take().context("redis-cli stdin")?,
        );
        for i in 0..keys {
            let key = preload_key(i);
            let value = value_of(i, value_bytes);
            write!(
                stdin,
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )?;
            if i % 10_000 == 0 {
                pb.set_position(i);
            }
        }
        stdin.flush()?;
    }
    let output = child.wait_with_output()?;
    let pipe_report = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || !pipe_report.contains("errors: 0") {
        bail!(
            "redis-cli --pipe failed: {pipe_report}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(pipe_report)
}

/// The number of keys the Redis on `port` holds.
pub fn redis_dbsize(port: u16) -> Result<u64> {
    let r = redis_cmd(port, "DBSIZE").map_err(anyhow::Error::msg)?;
    r.trim()
        .trim_start_matches(':')
        .parse()
        .with_context(|| format!("DBSIZE answered {r:?}"))
}

/// `INFO <section>` as a JSON object of its `field:value` lines.
pub fn redis_info(port: u16, section: &str) -> Value {
    let raw = redis_cmd(port, &format!("INFO {section}")).unwrap_or_default();
    let mut m = serde_json::Map::new();
    for line in raw.lines() {
        if let Some((k, v)) = line.trim().split_once(':') {
            m.insert(k.to_string(), json!(v));
        }
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------
// HTTP client

pub type Body = Full<Bytes>;

/// One client connection, kept alive across requests.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    /// HTTP/2 (h2c), for gRPC.
    #[cfg(feature = "etcd-grpc")]
    H2(hyper::client::conn::http2::SendRequest<Body>),
    /// Redis, so that it is driven by the same load generator.
    Resp(RespConn),
}

impl Conn {
    /// Opens an HTTP/1.1 connection; its driver runs as a task of the
    /// current runtime.
    pub async fn http1(addr: SocketAddr) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H1(sender))
    }

    /// Opens an HTTP/1.1 connection over TLS with `config` (the server's
    /// certificate must name the address's IP); its driver runs as a task
    /// of the current runtime, as [`Conn::http1`]'s does. The connect and
    /// the handshake together are bounded by [`TLS_HANDSHAKE_TIMEOUT`].
    pub async fn https1(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Conn> {
        let handshake = async {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
        };
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake)
            .await
            .with_context(|| format!("the TLS handshake with {addr} timed out"))?
            .with_context(|| format!("the TLS handshake with {addr}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H1(sender))
    }

    /// Opens a connection of `proto` to `addr`, over TLS if `security`
    /// says so (HTTP/1.1 only).
    pub async fn open(proto: Proto, addr: SocketAddr, security: &Security) -> Result<Conn> {
        match (&security.tls, proto) {
            (None, _) => connect(proto, addr).await,
            (Some(config), Proto::Http1) => Conn::https1(addr, config.clone()).await,
            (Some(_), other) => {
                bail!("the load generator speaks TLS over HTTP/1.1 only, not {other:?}")
            }
        }
    }

    /// Opens a cleartext HTTP/2 connection (what gRPC speaks to etcd).
    #[cfg(feature = "etcd-grpc")]
    pub async fn http2(addr: SocketAddr) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H2(sender))
    }

    /// Sends one request and reads the whole response.
    pub async fn send(&mut self, req: Request<Body>) -> Result<(StatusCode, Bytes)> {
        match self {
            Conn::H1(_) => {
                let (status, _, body) = self.send_parts(req).await?;
                Ok((status, body))
            }
            #[cfg(feature = "etcd-grpc")]
            Conn::H2(s) => {
                s.ready().await?;
                let resp = s.send_request(req).await?;
                let status = resp.status();
                let head_status = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let collected = resp.into_body().collect().await?;
                let trailer_status = collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = collected.to_bytes();
                match trailer_status.or(head_status) {
                    Some(s) if s == "0" => Ok((status, body)),
                    Some(s) => bail!("grpc-status {s}"),
                    None => bail!("no grpc-status in the response"),
                }
            }
            Conn::Resp(r) => {
                // The body is the command (see `resp_request`).
                let cmd = req.into_body().collect().await?.to_bytes();
                match r.call(&cmd).await? {
                    RespReply::Error(e) => bail!("Redis: {e}"),
                    // A GET of a key that should exist: a failure, as kvd's 404 is.
                    RespReply::Nil => Ok((StatusCode::NOT_FOUND, Bytes::new())),
                    RespReply::Simple(b) | RespReply::Bulk(b) => Ok((StatusCode::OK, b)),
                    RespReply::Int(i) => Ok((StatusCode::OK, Bytes::from(i.to_string()))),
                }
            }
        }
    }

    /// [`Conn::send`] over HTTP/1.1 that keeps the answer's headers.
    pub async fn send_parts(
        &mut self,
        req: Request<Body>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
        match self {
            Conn::H1(s) => {
                s.ready().await?;
                let resp = s.send_request(req).await?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok((parts.status, parts.headers, body))
            }
            #[cfg(feature = "etcd-grpc")]
            Conn::H2(_) => bail!("send_parts speaks HTTP/1.1 only"),
            Conn::Resp(_) => bail!("send_parts speaks HTTP/1.1 only"),
        }
    }
}

/// etcd's `KV/Put` as a gRPC request over HTTP/2: the protobuf
/// `PutRequest{key = 1, value = 2}` encoded by hand (two length-delimited
/// fields), behind gRPC's 5-byte message prefix. Hand-rolled so the
/// benchmark needs neither protoc nor a gRPC stack beyond hyper.
#[cfg(feature = "etcd-grpc")]
pub fn grpc_put_request(port: u16, key: &[u8], value: &[u8]) -> Request<Body> {
    let mut msg = Vec::with_capacity(key.len() + value.len() + 8);
    pb_bytes(&mut msg, 1, key);
    pb_bytes(&mut msg, 2, value);
    grpc_request(port, "/etcdserverpb.KV/Put", &msg)
}

/// etcd's `KV/Range` of one key over gRPC: `RangeRequest{key = 1}` (a
/// linearizable read, etcd's default).
#[cfg(feature = "etcd-grpc")]
pub fn grpc_range_request(port: u16, key: &[u8]) -> Request<Body> {
    let mut msg = Vec::with_capacity(key.len() + 4);
    pb_bytes(&mut msg, 1, key);
    grpc_request(port, "/etcdserverpb.KV/Range", &msg)
}

/// A length-delimited protobuf field (wire type 2).
#[cfg(feature = "etcd-grpc")]
fn pb_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    let mut v = bytes.len();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out.extend_from_slice(bytes);
}

/// A unary gRPC call of `path` with protobuf message `msg`.
#[cfg(feature = "etcd-grpc")]
fn grpc_request(port: u16, path: &str, msg: &[u8]) -> Request<Body> {
    let mut framed = Vec::with_capacity(msg.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(msg);
    Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .expect("a request built from valid parts")
}

/// Which connection a load task opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    #[cfg(feature = "etcd-grpc")]
    Http2,
    /// Redis's protocol (see [`resp_request`]).
    Resp,
}

async fn connect(proto: Proto, addr: SocketAddr) -> Result<Conn> {
    match proto {
        Proto::Http1 => Conn::http1(addr).await,
        #[cfg(feature = "etcd-grpc")]
        Proto::Http2 => Conn::http2(addr).await,
        Proto::Resp => Ok(Conn::Resp(RespConn::connect(addr).await?)),
    }
}

/// How long the load generator waits for a TLS connection (the TCP
/// connect and the handshake) to be made.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a load adds to plain HTTP: TLS on every connection, a bearer token
/// on every request. The default is neither, and then the load generator
/// does exactly what it does without it: no wrapper around the requests,
/// no branch in the loop.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// The client's TLS configuration (see `tls::TlsDir::client_config`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The whole `Authorization` header, marked sensitive so that no debug
    /// output shows the secret.
    pub authorization: Option<hyper::header::HeaderValue>,
}

impl Security {
    /// TLS with `tls`, if given, and `Authorization: Bearer <token>`, if
    /// given.
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, token: Option<&str>) -> Result<Security> {
        let authorization = token
            .map(|t| {
                let mut v = hyper::header::HeaderValue::try_from(format!("Bearer {t}"))
                    .context("a bearer token must be a valid header value")?;
                v.set_sensitive(true);
                anyhow::Ok(v)
            })
            .transpose()?;
        Ok(Security { tls, authorization })
    }

    /// `make`, with this security's `Authorization` header added to every
    /// request; `make` itself when there is none.
    pub fn wrap(&self, make: Arc<MakeRequest>) -> Arc<MakeRequest> {
        let Some(header) = self.authorization.clone() else {
            return make;
        };
        Arc::new(move |conn, seq| {
            let mut req = make(conn, seq);
            req.headers_mut()
                .insert(hyper::header::AUTHORIZATION, header.clone());
            req
        })
    }
}

/// A closed-loop load: `conns` connections, each with one request in flight
/// at a time, sent back to back; latencies of requests started after the
/// warm-up and finished before the end are recorded.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Outcome of one load run.
pub struct LoadResult {
    /// Successful requests inside the measured window.
    pub ops: u64,
    /// Failed requests (transport errors or unexpected status), any time.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency in microseconds of the measured successful requests.
    pub hist: Histogram<u64>,
    pub secs: f64,
    /// Requests each connection sent (all answered), in connection order.
    pub sent: Vec<u64>,
}

impl LoadResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    pub fn p50_us(&self) -> u64 {
        self.hist.value_at_quantile(0.50)
    }

    pub fn p99_us(&self) -> u64 {
        self.hist.value_at_quantile(0.99)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ops": self.ops,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.secs,
            "ops_per_sec": self.ops_per_sec(),
            "latency_us": {
                "mean": self.hist.mean(),
                "p50": self.p50_us(),
                "p90": self.hist.value_at_quantile(0.90),
                "p99": self.p99_us(),
                "p999": self.hist.value_at_quantile(0.999),
                "max": self.hist.max(),
            },
        })
    }
}

pub fn new_hist() -> Histogram<u64> {
    // 1 us .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Builds request `seq` of connection `conn`.
pub type MakeRequest = dyn Fn(usize, u64) -> Request<Body> + Send + Sync;

/// Runs a closed-loop load (see [`LoadSpec`]); `live` counts successes as
/// they happen, for a progress display.
pub async fn run_load(
    spec: &LoadSpec,
    make: Arc<MakeRequest>,
    live: Arc<AtomicU64>,
) -> Result<LoadResult> {
    run_load_with(spec, &Security::default(), make, live).await
}

/// [`run_load`] with `security`: every connection (a replaced one too)
/// over its TLS, every request with its token. Connections are opened,
/// handshakes included, before the clock starts.
pub async fn run_load_with(
    spec: &LoadSpec,
    security: &Security,
    make: Arc<MakeRequest>,
    live: Arc<AtomicU64>,
) -> Result<LoadResult> {
    let make = security.wrap(make);
    // Open every connection before the clock starts.
    let mut conns = Vec::with_capacity(spec.conns);
    for _ in 0..spec.conns {
        conns.push(
            Conn::open(spec.proto, spec.addr, security)
                .await
                .with_context(|| format!("connecting to {}", spec.addr))?,
        );
    }
    let start = Instant::now() + spec.warmup;
    let end = start + spec.duration;
    let mut tasks = Vec::with_capacity(spec.conns);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let make = make.clone();
        let live = live.clone();
        let spec = spec.clone();
        let security = security.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let req = make(i, seq);
                seq += 1;
                let outcome = conn.send(req).await;
                let t1 = Instant::now();
                let failure = match outcome {
                    Ok((status, _)) if status.is_success() => None,
                    Ok((status, body)) => Some(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    )),
                    Err(e) => Some(format!("{e:#}")),
                };
                match failure {
                    None => {
                        live.fetch_add(1, Ordering::Relaxed);
                        if t0 >= start && t1 <= end {
                            ops += 1;
                            let us = (t1 - t0).as_micros() as u64;
                            let _ = hist.record(us.max(1));
                        }
                    }
                    Some(msg) => {
                        errors += 1;
                        first_error.get_or_insert(msg);
                        // A broken connection is replaced; give the server a
                        // moment rather than spinning on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if let Ok(c) = Conn::open(spec.proto, spec.addr, &security).await {
                            conn = c;
                        }
                    }
                }
            }
            (hist, ops, errors, first_error, seq)
        }));
    }
    let mut result = LoadResult {
        ops: 0,
        errors: 0,
        first_error: None,
        hist: new_hist(),
        secs: spec.duration.as_secs_f64(),
        sent: Vec::with_capacity(spec.conns),
    };
    for t in tasks {
        let (hist, ops, errors, first_error, sent) = t.await.context("load task panicked")?;
        result.sent.push(sent);
        result.hist.add(&hist).context("merging histograms")?;
        result.ops += ops;
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    Ok(result)
}

/// A tokio runtime for the load generator: `threads == 0` is a
/// current-thread runtime (one OS thread drives every connection), else a
/// multi-thread runtime with that many workers.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

/// Key `i` of a bulk-loaded data set: 16 bytes, `p` + 15 digits.
pub fn preload_key(i: u64) -> String {
    format!("p{i:015}")
}

/// A value of exactly `len` printable bytes, varying with `seed`.
pub fn value_of(seed: u64, len: usize) -> String {
    let mut v = format!("v{seed:016x}-");
    while v.len() < len {
        v.push((b'a' + (v.len() % 26) as u8) as char);
    }
    v.truncate(len);
    v
}

/// Loads keys `from..to` (see [`preload_key`]) with `value_len`-byte values
/// into kvd through `POST /v1/bulk`, `chunk` items per request.
pub async fn bulk_load(
    addr: SocketAddr,
    from: u64,
    to: u64,
    chunk: u64,
    value_len: usize,
    pb: &ProgressBar,
) -> Result<()> {
    let mut conn = Conn::http1(addr).await?;
    let mut i = from;
    while i < to {
        let n = chunk.min(to - i);
        let mut body = String::with_capacity(n as usize * (value_len + 40) + 16);
        body.push_str("{\"items\":[");
        for j in i..i + n {
            if j > i {
                body.push(',');
            }
            let _ = write!(
                body,
                "{{\"key\":\"{}\",\"value\":\"{}\"}}",
                preload_key(j),
                value_of(j, value_len)
            );
        }
        body.push_str("]}");
        post_bulk(&mut conn, Bytes::from(body))
            .await
            .with_context(|| format!("bulk load of keys {i}..{}", i + n))?;
        i += n;
        pb.inc(n);
    }
    Ok(())
}

/// `POST /v1/bulk` of a JSON body over `conn`; an error unless it succeeds.
pub async fn post_bulk(conn: &mut Conn, body: Bytes) -> Result<()> {
    let req = Request::post("/v1/bulk")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let (status, resp) = conn.send(req).await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&resp));
    }
    Ok(())
}

/// `GET /v1/status` of a kvd, parsed.
pub fn kvd_status(port: u16) -> Result<Value> {
    let (code, body) = http_get(port, "/v1/status", Duration::from_secs(10))?;
    if code != 200 {
        bail!("GET /v1/status: HTTP {code}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Number of keys a kvd reports.
pub fn kvd_keys(port: u16) -> Result<u64> {
    kvd_status(port)?["keys"]
        .as_u64()
        .context("/v1/status has no keys field")
}

/// `<name>_sum` and `<name>_count` of a histogram in Prometheus text.
pub fn prom_histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        let metric = format!("{name}{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&metric))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count"))
}

/// Group-commit counters of a kvd, from `/metrics`: fsync'd batches, the
/// records in them, and the seconds spent writing and fsyncing them.
#[derive(Clone, Copy, Debug, Default)]
pub struct WalCounters {
    pub batches: f64,
    pub records: f64,
    pub fsync_secs: f64,
}

pub fn kvd_wal_counters(port: u16) -> WalCounters {
    let text = http_get(port, "/metrics", Duration::from_secs(10))
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let (fsync_secs, batches) = prom_histogram(&text, "kvd_wal_fsync_duration_seconds");
    let (records, _) = prom_histogram(&text, "kvd_wal_batch_records");
    WalCounters {
        batches,
        records,
        fsync_secs,
    }
}

/// Waits until `f` holds, polling; a thin re-export so benches read alike.
pub fn poll(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    wait_until(timeout, f)
}

/// A 64-bit mix (splitmix64): spreads `(conn, seq)` over a key range without
/// per-task RNG state.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `main` of a benchmark program: `run`'s exit code, or its error on
/// stderr, prefixed with the program's name, and failure.
pub fn exit_code(name: &str, run: Result<ExitCode>) -> ExitCode {
    match run {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Extra command-line flags given as one space-separated string (such as
/// `--kvd-args`), one flag or value each.
pub fn split_flags(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------
// Write loads

/// Key written by request `seq` of connection `conn`: 16 bytes.
pub fn write_key(conn: usize, seq: u64) -> String {
    format!("w{conn:03}{seq:012}")
}

/// PUTs of `value` to kvd under new unique keys ([`write_key`]).
pub fn kvd_put_make(value: Bytes) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| {
        Request::put(format!("/v1/kv/{}", write_key(conn, seq)))
            .header("host", "127.0.0.1")
            .body(Full::new(value.clone()))
            .expect("a request built from valid parts")
    })
}

/// PUTs of `value` to etcd through its JSON gateway (`/v3/kv/put`, key and
/// value base64-encoded) under new unique keys ([`write_key`]).
pub fn etcd_gateway_put_make(value: &Bytes) -> Arc<MakeRequest> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let value_b64 = b64.encode(value);
    Arc::new(move |conn, seq| {
        let body = format!(
            "{{\"key\":\"{}\",\"value\":\"{value_b64}\"}}",
            b64.encode(write_key(conn, seq))
        );
        Request::post("/v3/kv/put")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a request built from valid parts")
    })
}

/// PUTs of `value` to the etcd on `port` over gRPC under new unique keys
/// ([`write_key`]).
#[cfg(feature = "etcd-grpc")]
pub fn etcd_grpc_put_make(port: u16, value: Bytes) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| grpc_put_request(port, write_key(conn, seq).as_bytes(), &value))
}

/// Shows the live request rate on the progress bar: a thread that reads
/// `live` (requests answered so far) every 250 ms, after the label `set`.
pub struct Ticker {
    pub live: Arc<AtomicU64>,
    label: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn new(pb: ProgressBar) -> Ticker {
        let live = Arc::new(AtomicU64::new(0));
        let label = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, lb, st) = (live.clone(), label.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !st.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = (Instant::now(), l.load(Ordering::Relaxed));
                let rate = now.1.saturating_sub(last.1) as f64
                    / now.0.duration_since(last.0).as_secs_f64();
                last = now;
                let label = lb.lock().map(|s| s.clone()).unwrap_or_default();
                pb.set_message(format!("{label}  {rate:.0} req/s"));
            }
        });
        Ticker {
            live,
            label,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, label: impl Into<String>) {
        if let Ok(mut l) = self.label.lock() {
            *l = label.into();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every benchmark run begins with: the command that reproduces it
/// (printed), whether compilers were running, the environment, and the
/// run's temp dir under `tmp_parent(tmp_dir)`, named `kv-<bench>-*`.
pub struct RunStart {
    pub command: String,
    pub noisy_start: bool,
    pub env_start: Value,
    pub tmp: tempfile::TempDir,
}

/// Begins the run of benchmark `bench` (see [`RunStart`]), after checking
/// that the kvd binary is fresh.
pub fn start_run(bench: &str, tmp_dir: Option<&Path>) -> Result<RunStart> {
    check_kvd_binary()?;
    let command = reproduce(bench);
    println!("command: {command}");
    let noisy_start = warn_if_noisy("start");
    let env_start = environment();
    let parent = tmp_parent(tmp_dir);
    check_not_tmpfs(&parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("kv-{bench}-"))
        .tempdir_in(parent)?;
    Ok(RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    })
}

/// Writes `bench-results/<bench>.json` and prints where, then the command
/// that reproduces the run.
pub fn report_results(bench: &str, results: &Value, command: &str) -> Result<()> {
    let path = write_results(bench, results)?;
    println!("results: {}", path.display());
    println!("reproduce: {command}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Redis over RESP, through the same load generator

/// Longest reply line or bulk string a Redis connection accepts: the
/// benchmarks' values are a few hundred bytes.
const RESP_MAX_REPLY: usize = 1 << 20;
/// How long one Redis command may take before it counts as failed.
const RESP_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply of Redis's protocol (RESP2), as far as SET and GET need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespReply {
    /// `+OK`
    Simple(Bytes),
    /// `:n`
    Int(i64),
    /// `$n`, then n bytes.
    Bulk(Bytes),
    /// `$-1`: no such key.
    Nil,
    /// `-ERR ...`
    Error(String),
}

/// A command as RESP2 sends it: an array of bulk strings.
pub fn resp_command(args: &[&[u8]]) -> Bytes {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    Bytes::from(out)
}

/// Parses the reply at the start of `buf`: the reply and the bytes it
/// took, or `None` while `buf` holds only part of it.
pub fn parse_resp(buf: &[u8]) -> Result<Option<(RespReply, usize)>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > RESP_MAX_REPLY {
            bail!("a RESP line longer than {RESP_MAX_REPLY} bytes");
        }
        return Ok(None);
    };
    let Some((&kind, rest)) = buf[..eol].split_first() else {
        bail!("an empty RESP line");
    };
    let line = std::str::from_utf8(rest).context("a RESP line that is not UTF-8")?;
    let head = eol + 2;
    let reply = match kind {
        b'+' => RespReply::Simple(Bytes::copy_from_slice(rest)),
        b'-' => RespReply::Error(line.to_string()),
        b':' => RespReply::Int(
            line.parse()
                .with_context(|| format!("RESP integer {line:?}"))?,
        ),
        b'$' => {
            let n: i64 = line
                .parse()
                .with_context(|| format!("RESP bulk length {line:?}"))?;
            let Ok(n) = usize::try_from(n) else {
                return Ok(Some((RespReply::Nil, head)));
            };
            if n > RESP_MAX_REPLY {
                bail!("a RESP bulk string of {n} bytes (limit {RESP_MAX_REPLY})");
            }
            if buf.len() < head + n + 2 {
                return Ok(None);
            }
            if &buf[head + n..head + n + 2] != b"\r\n" {
                bail!("a RESP bulk string not ended by CRLF");
            }
            let bulk = Bytes::copy_from_slice(&buf[head..head + n]);
            return Ok(Some((RespReply::Bulk(bulk), head + n + 2)));
        }
        other => bail!("a RESP reply of type {:?}", other as char),
    };
    Ok(Some((reply, head)))
}

/// One Redis connection: a command out, its reply in, one at a time like
/// the load's HTTP connections.
pub struct RespConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RespConn {
    pub async fn connect(addr: SocketAddr) -> Result<RespConn> {
        let stream = tokio::time::timeout(RESP_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .context("connecting to Redis timed out")??;
        stream.set_nodelay(true)?;
        Ok(RespConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `cmd` (see [`resp_command`]) and reads its reply.
    pub async fn call(&mut self, cmd: &[u8]) -> Result<RespReply> {
        tokio::time::timeout(RESP_TIMEOUT, self.exchange(cmd))
            .await
            .context("Redis did not answer in time")?
    }

    async fn exchange(&mut self, cmd: &[u8]) -> Result<RespReply> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(cmd).await?;
        self.buf.clear();
        loop {
            if let Some((reply, used)) = parse_resp(&self.buf)? {
                if used != self.buf.len() {
                    bail!("Redis sent more than the one reply asked for");
                }
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("Redis closed the connection");
            }
        }
    }
}

/// A request for a [`Proto::Resp`] connection: its body is the Redis
/// command; method and URI are not sent. The load generator builds every
/// request through one [`MakeRequest`] type, so Redis's commands travel in
/// the same envelope as HTTP's.
pub fn resp_request(cmd: Bytes) -> Request<Body> {
    Request::post("/")
        .body(Full::new(cmd))
        .expect("a request built from valid parts")
}

/// `SET` of `value` to Redis under new unique keys ([`write_key`]).
pub fn redis_set_make(value: Bytes) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| {
        resp_request(resp_command(&[
            b"SET",
            write_key(conn, seq).as_bytes(),
            &value,
        ]))
    })
}

// ---------------------------------------------------------------------------
// Read loads

/// The keys a write load created: for each `(c, n)`, connection `c` wrote
/// `write_key(c, 0..n)`.
#[derive(Debug, Clone, Default)]
pub struct WrittenKeys {
    conns: Vec<(usize, u64)>,
}

impl WrittenKeys {
    /// From [`LoadResult::sent`] of a load of [`write_key`]s: connection
    /// `i` sent `sent[i]` writes (all answered; with errors, some keys may
    /// be missing, and reading them counts as an error again).
    pub fn from_sent(sent: &[u64]) -> WrittenKeys {
        WrittenKeys {
            conns: sent
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(c, &n)| (c, n))
                .collect(),
        }
    }

    pub fn count(&self) -> u64 {
        self.conns.iter().map(|(_, n)| n).sum()
    }

    /// The key that `h` (a well-mixed number, e.g. from [`mix64`]) picks.
    /// With no keys at all, a key nobody wrote: reading it fails, visibly.
    pub fn pick(&self, h: u64) -> String {
        if self.conns.is_empty() {
            return write_key(0, 0);
        }
        let (c, n) = self.conns[(h % self.conns.len() as u64) as usize];
        write_key(c, (h >> 20) % n)
    }

    /// The key request `seq` of connection `conn` reads.
    fn for_request(&self, conn: usize, seq: u64) -> String {
        self.pick(mix64(((conn as u64) << 40) ^ seq))
    }
}

/// `GET /v1/kv/<key>` of random keys of `keys` from kvd.
pub fn kvd_get_make(keys: Arc<WrittenKeys>) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| {
        Request::get(format!("/v1/kv/{}", keys.for_request(conn, seq)))
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .expect("a request built from valid parts")
    })
}

/// Reads of random keys of `keys` from etcd's JSON gateway
/// (`/v3/kv/range`, linearizable as etcd's reads are by default).
pub fn etcd_gateway_get_make(keys: Arc<WrittenKeys>) -> Arc<MakeRequest> {
    let b64 = base64::engine::general_purpose::STANDARD;
    Arc::new(move |conn, seq| {
        let body = format!(
            "{{\"key\":\"{}\"}}",
            b64.encode(keys.for_request(conn, seq))
        );
        Request::post("/v3/kv/range")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a request built from valid parts")
    })
}

/// Reads of random keys of `keys` from the etcd on `port` over gRPC.
#[cfg(feature = "etcd-grpc")]
pub fn etcd_grpc_get_make(port: u16, keys: Arc<WrittenKeys>) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| grpc_range_request(port, keys.for_request(conn, seq).as_bytes()))
}

/// `GET` of random keys of `keys` from Redis.
pub fn redis_get_make(keys: Arc<WrittenKeys>) -> Arc<MakeRequest> {
    Arc::new(move |conn, seq| {
        resp_request(resp_command(&[
            b"GET",
            keys.for_request(conn, seq).as_bytes(),
        ]))
    })
}

// ---------------------------------------------------------------------------
// Loads over several nodes, and clusters

/// `conns` connections split over `n` servers as evenly as possible, the
/// first servers taking one more.
pub fn split_conns(conns: usize, n: usize) -> Vec<usize> {
    let n = n.max(1);
    (0..n)
        .map(|i| conns / n + usize::from(i < conns % n))
        .collect()
}

impl LoadResult {
    /// A result with nothing in it yet, of a `secs`-second window.
    pub fn empty(secs: f64) -> LoadResult {
        LoadResult {
            ops: 0,
            errors: 0,
            first_error: None,
            hist: new_hist(),
            secs,
            sent: Vec::new(),
        }
    }

    /// Adds the figures of `other`, a load run beside this one in the same
    /// window; its connections come after this one's in `sent`.
    pub fn absorb(&mut self, other: LoadResult) -> Result<()> {
        self.ops += other.ops;
        self.errors += other.errors;
        self.hist.add(&other.hist).context("merging histograms")?;
        self.sent.extend(other.sent);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

/// A closed-loop load spread over several servers (a masterless
/// cluster's nodes): `spec.conns` split by [`split_conns`] over `ports`
/// (`spec.addr` is replaced by each). Connection numbers are global, so
/// `make` sees each connection once (write keys stay distinct and 16
/// bytes) and the merged [`LoadResult::sent`] is in that order.
pub async fn run_load_spread(
    spec: &LoadSpec,
    ports: &[u16],
    make: Arc<MakeRequest>,
    live: Arc<AtomicU64>,
) -> Result<LoadResult> {
    let mut tasks = Vec::new();
    let mut first_conn = 0;
    for (&port, conns) in ports.iter().zip(split_conns(spec.conns, ports.len())) {
        if conns == 0 {
            continue;
        }
        let spec = LoadSpec {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            conns,
            ..spec.clone()
        };
        let (make, live) = (make.clone(), live.clone());
        let offset = first_conn;
        first_conn += conns;
        let shifted: Arc<MakeRequest> = Arc::new(move |conn, seq| make(offset + conn, seq));
        tasks.push(tokio::spawn(
            async move { run_load(&spec, shifted, live).await },
        ));
    }
    let mut total = LoadResult::empty(spec.duration.as_secs_f64());
    for t in tasks {
        total.absorb(t.await.context("load task panicked")??)?;
    }
    Ok(total)
}

/// PUTs one key to the kvd on `port` until it is acknowledged, for up to
/// 30 s (a primary commits once a secondary has joined).
pub async fn await_writable(http: &reqwest::Client, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http
            .put(format!("http://127.0.0.1:{port}/v1/kv/ready-probe"))
            .body("x")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    bail!("kvd on port {port} never acknowledged a write: {other:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`await_writable`] through the load generator's own connection, with
/// `security` (TLS, token): PUTs one key to `addr` until it is
/// acknowledged, for up to 30 s, each try bounded by 5 s.
pub async fn await_writable_with(addr: SocketAddr, security: &Security) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let make = security.wrap(kvd_put_make(Bytes::from_static(b"x")));
    loop {
        let attempt = async {
            let mut conn = Conn::open(Proto::Http1, addr, security).await?;
            conn.send(make(0, 0)).await
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), attempt).await;
        match outcome {
            Ok(Ok((status, _))) if status.is_success() => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    let why = match other {
                        Ok(Ok((status, body))) => {
                            format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
                        }
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(_) => "timed out".into(),
                    };
                    bail!("kvd at {addr} never acknowledged a write: {why}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client port of the etcd leader among `members` (from
/// `/v3/maintenance/status`), within 30 s.
pub async fn etcd_leader(http: &reqwest::Client, members: &[Server]) -> Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for m in members {
            let st: Value = match http
                .post(format!("http://127.0.0.1:{}/v3/maintenance/status", m.port))
                .body("{}")
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => continue,
            };
            let me = &st["header"]["member_id"];
            if !me.is_null() && *me == st["leader"] {
                return Ok(m.port);
            }
        }
        if Instant::now() > deadline {
            bail!("no etcd member reports itself as the leader");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the kvd nodes on `ports` report the same digest; how long
/// that took, or an error after `timeout`.
pub fn wait_digests_equal(ports: &[u16], timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let ds: Vec<Option<String>> = ports
            .iter()
            .map(|&p| {
                kvd_status(p)
                    .ok()
                    .and_then(|s| s["digest"].as_str().map(str::to_string))
            })
            .collect();
        if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("digests still differ after {timeout:?}: {ds:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// The disk's own cost

/// Commits every pending change of the file system that holds `dir`
/// (`syncfs`). Removing a stopped server's data dir frees its blocks, and
/// with the `discard` mount option the next journal commit trims them all:
/// whatever fsyncs first after a removal pays for it. A cell started after
/// this begins on a settled disk, whichever system went before it.
pub fn settle_disk(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(d.as_raw_fd()).with_context(|| format!("syncfs of {}", dir.display()))?;
    Ok(())
}

/// How [`fdatasync_probe`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeWrite {
    /// To the end of a fresh file, as a log appends (each fdatasync then
    /// also makes the new size durable: a journal commit on ext4).
    Append,
    /// Over a region written and synced beforehand (fdatasync flushes the
    /// data alone): the cheapest durable small write the disk offers.
    Overwrite,
}

/// What a durable small write costs this disk: `n` times, a `bytes`-byte
/// write to a file in `dir` (see [`ProbeWrite`]) and an fdatasync of it,
/// each timed (µs). No database can acknowledge a durable write on one
/// connection much faster than the cheaper of the two.
pub fn fdatasync_probe(
    dir: &Path,
    how: ProbeWrite,
    n: usize,
    bytes: usize,
) -> Result<Histogram<u64>> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    if how == ProbeWrite::Overwrite {
        f.write_all(&vec![0u8; n * bytes])?;
        f.sync_all()?;
    }
    let record = value_of(7, bytes);
    let mut hist = new_hist();
    for i in 0..n {
        let t0 = Instant::now();
        match how {
            ProbeWrite::Append => f.write_all(record.as_bytes())?,
            ProbeWrite::Overwrite => f.write_all_at(record.as_bytes(), (i * bytes) as u64)?,
        }
        f.sync_data()?;
        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(hist)
}

/// The median of `v` (the upper one of an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Verdicts

/// Which side of its target a figure must be on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

/// A target check: a measured figure (a ratio, usually) against its
/// target. Any error in the cells the figure was computed from fails it,
/// however good the figure: a fast system that drops requests is not fast.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What is compared, e.g. "kvd 3-node / kvd single, PUT/s at 64 conns".
    pub claim: String,
    /// None when a cell it needs was not measured.
    pub value: Option<f64>,
    pub target: Target,
    /// Errors in the cells the figure comes from (every round).
    pub errors: u64,
    /// The figures behind the value, for the reader.
    pub detail: String,
}

impl Verdict {
    pub fn met(&self) -> bool {
        let on_target = match (self.value, self.target) {
            (Some(v), Target::AtLeast(t)) => v >= t,
            (Some(v), Target::AtMost(t)) => v <= t,
            (None, _) => false,
        };
        on_target && self.errors == 0
    }

    /// One line: the claim, the figure, the target, the errors and
    /// whether it was met.
    pub fn line(&self) -> String {
        let target = match self.target {
            Target::AtLeast(t) => format!(">= {t}"),
            Target::AtMost(t) => format!("<= {t}"),
        };
        let value = self
            .value
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "not measured".into());
        let met = if self.met() { "met" } else { "NOT met" };
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!("; {}", self.detail)
        };
        format!(
            "{}: {value} (target {target}, errors {}): {met}{detail}",
            self.claim, self.errors
        )
    }

    pub fn to_json(&self) -> Value {
        let (kind, target) = match self.target {
            Target::AtLeast(t) => ("at_least", t),
            Target::AtMost(t) => ("at_most", t),
        };
        json!({
            "claim": self.claim,
            "value": self.value,
            "target": target,
            "target_kind": kind,
            "errors": self.errors,
            "met": self.met(),
            "detail": self.detail,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resp_command_is_an_array_of_bulk_strings() {
        let c = resp_command(&[b"SET", b"k", b"value"]);
        assert_eq!(&c[..], b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n");
    }

    #[test]
    fn parse_resp_reads_each_reply_kind() {
        let one = |b: &[u8]| parse_resp(b).unwrap().unwrap();
        assert_eq!(one(b"+OK\r\n"), (RespReply::Simple(Bytes::from("OK")), 5));
        assert_eq!(one(b":42\r\n"), (RespReply::Int(42), 5));
        assert_eq!(one(b"$-1\r\n"), (RespReply::Nil, 5));
        assert_eq!(
            one(b"$3\r\nabc\r\n"),
            (RespReply::Bulk(Bytes::from("abc")), 9)
        );
        assert_eq!(one(b"$0\r\n\r\n"), (RespReply::Bulk(Bytes::new()), 6));
        assert_eq!(
            one(b"-ERR wrong\r\n"),
            (RespReply::Error("ERR wrong".into()), 12)
        );
    }

    #[test]
    fn parse_resp_waits_for_the_rest_of_a_reply() {
        for partial in [
            &b""[..],
            b"+O",
            b"+OK\r",
            b"$3\r\n",
            b"$3\r\nab",
            b"$3\r\nabc\r",
        ] {
            assert_eq!(parse_resp(partial).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn parse_resp_refuses_what_it_does_not_know() {
        assert!(parse_resp(b"*1\r\n").is_err());
        assert!(parse_resp(b"$3\r\nabcd\r\n").is_err());
        assert!(parse_resp(b":x\r\n").is_err());
        let huge = format!("${}\r\n", RESP_MAX_REPLY + 1);
        assert!(parse_resp(huge.as_bytes()).is_err());
        assert!(parse_resp(&vec![b'+'; RESP_MAX_REPLY + 1]).is_err());
    }

    #[test]
    fn written_keys_pick_only_keys_that_were_written() {
        let keys = WrittenKeys::from_sent(&[3, 0, 2]);
        assert_eq!(keys.count(), 5);
        let written: Vec<String> = [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
            .iter()
            .map(|&(c, s)| write_key(c, s))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for seq in 0..1000 {
            let k = keys.for_request(1, seq);
            assert!(written.contains(&k), "{k} was never written");
            seen.insert(k);
        }
        assert_eq!(seen.len(), written.len(), "every written key is read");
        assert_eq!(WrittenKeys::default().pick(5), write_key(0, 0));
    }

    #[test]
    fn split_conns_spreads_evenly_and_loses_none() {
        assert_eq!(split_conns(64, 3), vec![22, 21, 21]);
        assert_eq!(split_conns(1, 3), vec![1, 0, 0]);
        assert_eq!(split_conns(256, 3).iter().sum::<usize>(), 256);
        assert_eq!(split_conns(5, 0), vec![5]);
    }

    #[test]
    fn a_verdict_needs_its_target_no_errors_and_a_figure() {
        let v = |value, target, errors| Verdict {
            claim: "x".into(),
            value,
            target,
            errors,
            detail: String::new(),
        };
        assert!(v(Some(0.7), Target::AtLeast(0.7), 0).met());
        assert!(!v(Some(0.69), Target::AtLeast(0.7), 0).met());
        assert!(v(Some(1.3), Target::AtMost(1.3), 0).met());
        assert!(!v(Some(1.31), Target::AtMost(1.3), 0).met());
        assert!(
            !v(Some(5.0), Target::AtLeast(0.7), 1).met(),
            "errors fail it"
        );
        assert!(
            !v(None, Target::AtLeast(0.7), 0).met(),
            "unmeasured fails it"
        );
        assert!(v(Some(5.0), Target::AtLeast(0.7), 2)
            .line()
            .contains("errors 2): NOT met"));
    }

    #[test]
    fn security_adds_its_token_to_every_request_and_nothing_without_one() {
        let make = kvd_put_make(Bytes::from_static(b"v"));
        let plain = Security::default().wrap(make.clone());
        assert!(
            Arc::ptr_eq(&plain, &make),
            "without a token the requests are not wrapped"
        );
        assert!(plain(0, 0).headers().get("authorization").is_none());
        let secured = Security::new(None, Some("s3cret")).unwrap();
        let wrapped = secured.wrap(make);
        for seq in 0..3 {
            let req = wrapped(1, seq);
            let auth = req.headers().get("authorization").unwrap();
            assert_eq!(auth, "Bearer s3cret");
            assert!(auth.is_sensitive(), "the secret stays out of debug output");
            assert_eq!(req.uri().path(), format!("/v1/kv/{}", write_key(1, seq)));
        }
        assert!(!format!("{secured:?}").contains("s3cret"));
        assert!(Security::new(None, Some("bad\ntoken")).is_err());
    }

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(Vec::new()).is_nan());
    }
}
