//! kvstore test kit: starts real `kvd` and `kvsup` processes for the
//! end-to-end tests (`tests/`), the benchmarks (`benches/`) and any crate's
//! own tests.
//!
//! Each node gets a free loopback port and a data dir the caller owns
//! (usually inside a `tempfile::TempDir`). Only the processes started here
//! are ever signalled, by PID; a node still running when its handle drops is
//! SIGKILLed and reaped.
//!
//! This file holds the processes and the plain HTTP of the kit; the modules
//! add, each for its own kind of test:
//! - [`api`]: versions, ranges, conditional writes and transactions over
//!   plain HTTP (a write that follows 307s, a range pager, a txn call);
//! - [`node`]: one node in a temp dir, its HTTP API through `reqwest` and
//!   `kvclient`, error bodies, pipelined GETs;
//! - [`cluster`]: three nodes, linked directly or through cuttable proxies;
//! - [`masterless`]: stamped writes, convergence and last-write-wins checks;
//! - [`sup`]: clusters run by a real `kvsup`;
//! - [`ttl`]: writes with deadlines and the window they lie in, leases,
//!   one `/metrics` sample;
//! - [`watch`]: watch streams over a raw socket, and `kvclient watch`;
//! - [`wal`]: the WAL's on-disk format, to damage it precisely;
//! - [`raw`]: HTTP/1.1 byte by byte over a `TcpStream`;
//! - [`tls`]: a CA and certificates, TLS nodes and a mutual-TLS cluster;
//! - [`chaos`], [`linearizability`]: the chaos tests' clients and their judge,
//!   re-exported from `kvcheck` (the product's: `kvsup chaos` runs them);
//! - `bench` (feature `bench`): the benchmark programs' load generator,
//!   comparison servers and reports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use nix::sys::signal::Signal as Sig;

pub mod api;
#[cfg(feature = "bench")]
pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod host_cluster;
pub mod hosts;
pub mod linearizability;
pub mod masterless;
pub mod node;
pub mod raw;
pub mod sup;
pub mod sup_change;
pub mod tls;
pub mod ttl;
pub mod wal;
pub mod watch;

pub use cluster::start_cluster;

/// Directory with the workspace's built binaries (`kvd`, `kvclient`, ...).
///
/// `KVSTORE_BIN_DIR` overrides; otherwise it is the profile directory of the
/// running test or bench executable (`target/<profile>/`), where
/// `cargo build` put the binaries of the same profile.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVSTORE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the current executable has a path");
    let mut dir = exe
        .parent()
        .expect("an executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, with a clear message if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`, \
         with --release for benchmarks) or set KVSTORE_BIN_DIR",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding an ephemeral port");
    l.local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// `n` distinct loopback ports that were free a moment ago.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < n {
        ports.insert(free_port());
    }
    ports.into_iter().collect()
}

/// A number from the environment variable `name` (a test's length, its
/// size), or `default` when it is unset or not a number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Minimal blocking HTTP/1.1 GET over loopback: (status, body). Used for
/// readiness polling so the kit works inside and outside async runtimes.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    http_request(port, "GET", path, &[], None, timeout)
}

/// [`http_get`] with extra request headers (e.g. `Authorization`).
pub fn http_get_with(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    http_request(port, "GET", path, headers, None, timeout)
}

/// [`http_get`]'s POST of a JSON body.
pub fn http_post_json(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    http_request(
        port,
        "POST",
        path,
        &[],
        Some(&serde_json::to_vec(body)?),
        timeout,
    )
}

fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    json_body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = json_body.unwrap_or_default();
    let mut extra = match json_body {
        Some(b) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ),
        None => String::new(),
    };
    for (name, value) in headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    // The port belongs in Host (RFC 9110 §7.2); kvsup refuses a Host
    // without it.
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}\r\n"
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// A whole HTTP/1.1 answer as read to the end of its connection:
/// (status, body), a chunked body decoded.
pub(crate) fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    let mut body = raw[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line_end])?.trim(), 16)?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Whether process `pid` is stopped (SIGSTOP), from the state letter in
/// `/proc/<pid>/stat`: the positive sign that a stop landed, where a
/// request that gets no answer could have many causes.
pub fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses, so the
    // state is the first field after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "T")
}

/// A running (or stopped) kvd process that this kit started.
pub struct Kvd {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// The kvd binary this node runs.
    program: PathBuf,
    args: Vec<String>,
    /// Set for a node that serves TLS: how its readiness is checked, and
    /// that its URL is `https://`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Kvd {
    /// Starts kvd on a free port with `data_dir` and `extra` flags, and waits
    /// until it answers `/health`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<Kvd> {
        Kvd::start_program(&bin("kvd"), data_dir, extra)
    }

    /// [`Kvd::start`] of another kvd binary (a benchmark's baseline build).
    pub fn start_program(program: &Path, data_dir: &Path, extra: &[&str]) -> Result<Kvd> {
        let mut last_err = None;
        // A port found free can be taken before kvd binds it; try a few.
        for _ in 0..5 {
            let mut node = Kvd::new(program, free_port(), data_dir, extra);
            match node.spawn_and_wait() {
                Ok(()) => return Ok(node),
                Err(e) => {
                    if !node.log().contains("binding") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("kvd did not start")))
    }

    fn new(program: &Path, port: u16, data_dir: &Path, extra: &[&str]) -> Kvd {
        Kvd {
            child: None,
            port,
            data_dir: data_dir.to_path_buf(),
            log_path: PathBuf::new(),
            program: program.to_path_buf(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            tls: None,
        }
    }

    /// Starts kvd on a given `port` (for clusters, whose nodes must know
    /// each other's URLs before they start) and waits for `/health`.
    pub fn start_on(port: u16, data_dir: &Path, extra: &[&str]) -> Result<Kvd> {
        let mut node = Kvd::new(&bin("kvd"), port, data_dir, extra);
        node.spawn_and_wait()?;
        Ok(node)
    }

    /// [`Kvd::start_on`] of a node whose `extra` flags turn TLS on; its
    /// readiness is checked over TLS with `tls` (see [`tls`]).
    pub fn start_tls_on(
        port: u16,
        data_dir: &Path,
        extra: &[&str],
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Kvd> {
        let mut node = Kvd::new(&bin("kvd"), port, data_dir, extra);
        node.tls = Some(tls);
        node.spawn_and_wait()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        let parent = self.data_dir.parent().unwrap_or(Path::new("."));
        self.log_path = parent.join(format!("kvd-{}.log", self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let child = Command::new(&self.program)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning kvd")?;
        self.child = Some(child);
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(60))
    }

    /// Waits until `/health` answers 200, failing early if kvd exits.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "kvd exited with {status} during start-up; log:\n{}",
                    self.log()
                );
            }
            let timeout = Duration::from_millis(500);
            let health = match &self.tls {
                None => http_get(self.port, "/health", timeout),
                Some(tls) => tls::https_get(tls, self.port, "/health", timeout),
            };
            if matches!(health, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "kvd did not become healthy in {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node's log so far (stdout and stderr of every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `sig` to this node's process (and only it).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid().context("kvd is not running")?;
        kill(Pid::from_raw(pid as i32), sig).context("signalling kvd")?;
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit()
    }

    /// SIGTERM, then wait for the graceful exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit()
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("kvd is not running")?;
        Ok(child.wait()?)
    }

    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("kvd is not running"),
        }
    }

    /// Starts the node again with the same port, data dir and flags.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("kvd is still running; stop it first");
        }
        self.spawn_and_wait()
    }

    /// Starts the node again as [`Kvd::restart`] does, with flag `flag`
    /// (one that takes no value) left out from now on.
    pub fn restart_without(&mut self, flag: &str) -> Result<()> {
        self.args.retain(|a| a != flag);
        self.restart()
    }
}

impl Drop for Kvd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a binary of the workspace to completion (for "refuses to start"
/// checks): exit status and combined output.
pub fn run_to_exit(name: &str, args: &[&str], timeout: Duration) -> Result<(ExitStatus, String)> {
    run_to_exit_in(None, name, args, timeout)
}

/// [`run_to_exit`], run in directory `dir` if given.
pub fn run_to_exit_in(
    dir: Option<&Path>,
    name: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<(ExitStatus, String)> {
    let mut cmd = Command::new(bin(name));
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(args);
    run_command(cmd, timeout).with_context(|| format!("running {name}"))
}

/// Runs `cmd` to completion within `timeout` (killed after it): exit
/// status and combined output (stdout, then stderr).
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<(ExitStatus, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read while it runs: a child whose output fills the pipe would block.
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = out.join().unwrap_or_default();
    text.push_str(&err.join().unwrap_or_default());
    Ok((status, text))
}

/// A TCP proxy on a loopback port for one network link, which a test can
/// cut and heal: cut drops every open connection and refuses new ones, as a
/// partition would. Threads end when the proxy is dropped.
pub struct LinkProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LinkProxy {
    /// Forwards connections on a fresh loopback port to `target_port`.
    pub fn start(target_port: u16) -> Result<LinkProxy> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let (cut2, stop2, open2) = (cut.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                if cut2.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target_port)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    if let Ok(mut open) = open2.lock() {
                        open.push(c2);
                        open.push(s2);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(LinkProxy {
            port,
            cut,
            open,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Partition: drop open connections, refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            for s in open.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Heal the partition.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}
