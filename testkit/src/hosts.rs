//! Test hosts: each is a network namespace with its own address on one
//! bridge, so a cluster's nodes run as they would on separate machines and
//! a partition is a link that goes down, not a proxy that drops bytes.
//!
//! Layout for set `k` (claimed by creating namespace `kvh<k>-sw` first, so
//! tests running at once never share one):
//!
//! - `kvh<k>-sw` holds the bridge `br0`; every host's cable plugs in there;
//! - `kvh<k>-<host>` is a host: `lo` up and `eth0` with 10.213.k.(i+1)/24;
//! - the test process itself (the root namespace) has a leg on the bridge,
//!   `kvh<k>r` with 10.213.k.254/24, so its clients reach every host;
//!
//! [`Hosts::cut`] takes a host's port on the bridge down, which cuts the host
//! off from everyone (the test's leg included): to act on the far side of a
//! cut, run a command in the host with [`Hosts::command`]. On drop, every
//! process started here is SIGKILLed by its pid and every namespace and link
//! is deleted; a set left by a test process that died is swept by the next
//! claim of its number. Creating the namespaces needs root; without it
//! [`Hosts::create`] fails saying so (the tests then fail, never pass).
// Test harness code, run inside tests: a poisoned lock (a panicked test
// thread) or a value that is not ours fails the test, as a panic should.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where each claimed set records the pid of the test process that owns it.
const OWNERS: &str = "/run/kvstore-test-hosts";

/// How often the service thread looks for exited processes, and how long
/// it waits before starting one again (`RestartSec=1` of the rendered
/// units).
const SERVICE_POLL: Duration = Duration::from_millis(20);
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Runs `ip ARGS`; an error carries its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {} (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process runs as root (`/proc/self/status`, effective uid).
fn effective_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A started process that should keep running: restarted after it exits,
/// as systemd does with `Restart=always`, until it is stopped for good.
struct Service {
    host: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Restarts, and when the one due after an exit may happen.
    restarts: u64,
    exited_at: Option<std::time::Instant>,
    enabled: bool,
}

pub struct Hosts {
    k: u8,
    names: Vec<String>,
    services: Arc<Mutex<HashMap<String, Service>>>,
    /// Plain processes started with [`Hosts::spawn`]: killed on drop.
    spawned: Mutex<Vec<Child>>,
    stop: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl Hosts {
    /// A namespace per name in `hosts` (at most 250), each with its address,
    /// all on one bridge with a leg for the test process.
    pub fn create(hosts: &[&str]) -> Result<Hosts> {
        anyhow::ensure!(hosts.len() <= 250, "at most 250 hosts");
        if !effective_root() {
            bail!(
                "test hosts are network namespaces, which need root (ip netns add); \
                 run the tests as root"
            );
        }
        std::fs::create_dir_all(OWNERS).with_context(|| format!("creating {OWNERS}"))?;
        let k = claim()?;
        let mut h = Hosts {
            k,
            names: hosts.iter().map(|s| (*s).to_string()).collect(),
            services: Arc::default(),
            spawned: Mutex::default(),
            stop: Arc::new(AtomicBool::new(false)),
            monitor: None,
        };
        // From here on, a failure still removes what was made (drop).
        h.wire().context("wiring the test hosts")?;
        h.monitor = Some(h.start_monitor());
        Ok(h)
    }

    fn switch(&self) -> String {
        format!("kvh{}-sw", self.k)
    }

    /// The namespace of `host`.
    pub fn netns(&self, host: &str) -> String {
        format!("kvh{}-{host}", self.k)
    }

    fn index(&self, host: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == host)
            .unwrap_or_else(|| panic!("no test host {host:?}"))
    }

    /// The address of `host`.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.k, self.index(host) as u8 + 1)
    }

    fn wire(&self) -> Result<()> {
        let sw = self.switch();
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, name) in self.names.iter().enumerate() {
            let ns = self.netns(name);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ])?;
            let cidr = format!("{}/24", self.addr(name));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
        }
        let leg = format!("kvh{}r", self.k);
        ip(&[
            "link", "add", &leg, "type", "veth", "peer", "name", "test", "netns", &sw,
        ])?;
        let cidr = format!("{}/24", Ipv4Addr::new(10, 213, self.k, 254));
        ip(&["addr", "add", &cidr, "dev", &leg])?;
        ip(&["link", "set", &leg, "up"])?;
        ip(&["-n", &sw, "link", "set", "test", "master", "br0"])?;
        ip(&["-n", &sw, "link", "set", "test", "up"])
    }

    /// Cuts `host` off: its port on the bridge goes down, so nothing it
    /// sends arrives and nothing reaches it (its own loopback still works).
    pub fn cut(&self, host: &str) -> Result<()> {
        let port = format!("p{}", self.index(host));
        ip(&["-n", &self.switch(), "link", "set", &port, "down"])
    }

    /// Plugs `host` back in.
    pub fn heal(&self, host: &str) -> Result<()> {
        let port = format!("p{}", self.index(host));
        ip(&["-n", &self.switch(), "link", "set", &port, "up"])
    }

    /// `program ARGS` to be run inside `host` (`ip netns exec`, which
    /// execs it: the child's pid is the program's).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns(host)]).arg(program);
        c.stdin(Stdio::null());
        c
    }

    /// Starts `argv` in `host` with its output appended to `log`; it is
    /// SIGKILLed when the hosts are dropped.
    pub fn spawn(&self, host: &str, argv: &[String], log: &Path) -> Result<u32> {
        let child = start(self, host, argv, log)?;
        let pid = child.id();
        self.spawned.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Runs `argv` in `host` as a service called `name`: started now and
    /// again after every exit (as systemd's `Restart=always`), until
    /// [`Hosts::disable`].
    pub fn service(&self, name: &str, host: &str, argv: &[String], log: &Path) -> Result<u32> {
        let child = start(self, host, argv, log)?;
        let pid = child.id();
        self.services.lock().unwrap().insert(
            name.to_string(),
            Service {
                host: host.to_string(),
                argv: argv.to_vec(),
                log: log.to_path_buf(),
                child: Some(child),
                restarts: 0,
                exited_at: None,
                enabled: true,
            },
        );
        Ok(pid)
    }

    /// The pid of service `name` while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let s = self.services.lock().unwrap();
        s.get(name)?.child.as_ref().map(Child::id)
    }

    /// How often service `name` was started again after an exit.
    pub fn restarts(&self, name: &str) -> u64 {
        self.services
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |s| s.restarts)
    }

    /// Sends `sig` to service `name`'s process (by the pid we started).
    pub fn signal(&self, name: &str, sig: nix::sys::signal::Signal) -> Result<u32> {
        let pid = self
            .pid(name)
            .with_context(|| format!("service {name} is not running"))?;
        let raw = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(raw, sig).with_context(|| format!("{sig} to {name} ({pid})"))?;
        Ok(pid)
    }

    /// Stops restarting service `name` and kills its process.
    pub fn disable(&self, name: &str) {
        let child = {
            let mut s = self.services.lock().unwrap();
            s.get_mut(name).and_then(|s| {
                s.enabled = false;
                s.child.take()
            })
        };
        if let Some(c) = child {
            kill_and_reap(c);
        }
    }

    fn start_monitor(&self) -> std::thread::JoinHandle<()> {
        let services = self.services.clone();
        let stop = self.stop.clone();
        let k = self.k;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(SERVICE_POLL);
                let mut all = services.lock().unwrap();
                for s in all.values_mut() {
                    tend(k, s);
                }
            }
        })
    }
}

/// One service's turn of the monitor: reap an exit, restart when due.
fn tend(k: u8, s: &mut Service) {
    if let Some(c) = &mut s.child {
        if matches!(c.try_wait(), Ok(Some(_))) {
            s.child = None;
            s.exited_at = Some(std::time::Instant::now());
        }
        return;
    }
    let due = s.exited_at.is_some_and(|t| t.elapsed() >= RESTART_AFTER);
    if s.enabled && due {
        let ns = format!("kvh{k}-{}", s.host);
        if let Ok(c) = start_in(&ns, &s.argv, &s.log) {
            s.child = Some(c);
            s.restarts += 1;
            s.exited_at = None;
        }
    }
}

fn start(h: &Hosts, host: &str, argv: &[String], log: &Path) -> Result<Child> {
    start_in(&h.netns(host), argv, log)
}

fn start_in(ns: &str, argv: &[String], log: &Path) -> Result<Child> {
    let (program, args) = argv.split_first().context("an empty command line")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {program} in {ns}"))
}

fn kill_and_reap(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Claims a free set number: the first whose switch namespace this process
/// creates. A set whose owner died is swept and then claimed.
fn claim() -> Result<u8> {
    let me = std::process::id();
    let start = (me % 200) as u8;
    for step in 0..250u16 {
        let k = ((u16::from(start) + step) % 250 + 1) as u8;
        let owner = Path::new(OWNERS).join(k.to_string());
        let sw = format!("kvh{k}-sw");
        if ip(&["netns", "add", &sw]).is_ok() {
            std::fs::write(&owner, format!("{me}\n"))?;
            return Ok(k);
        }
        let held = std::fs::read_to_string(&owner)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .is_some_and(alive);
        if !held {
            sweep(k);
            if ip(&["netns", "add", &sw]).is_ok() {
                std::fs::write(&owner, format!("{me}\n"))?;
                return Ok(k);
            }
        }
    }
    bail!("no free test-host set (kvh1..kvh250 all in use)")
}

/// Deletes every namespace and the root leg of set `k`.
fn sweep(k: u8) {
    let prefix = format!("kvh{k}-");
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    let _ = ip(&["link", "del", &format!("kvh{k}r")]);
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        for (_, s) in self.services.lock().unwrap().drain() {
            if let Some(c) = s.child {
                kill_and_reap(c);
            }
        }
        for c in self.spawned.lock().unwrap().drain(..) {
            kill_and_reap(c);
        }
        sweep(self.k);
        let _ = std::fs::remove_file(Path::new(OWNERS).join(self.k.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaches(addr: Ipv4Addr, port: u16) -> bool {
        let to = std::net::SocketAddr::from((addr, port));
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()
    }

    /// The test process reaches a server in a host until the host is cut
    /// off, and again once it is healed; dropping the set kills the server
    /// and leaves no namespace behind.
    #[test]
    fn a_host_is_reachable_until_cut_off_and_leaves_nothing_behind() {
        let tmp = tempfile::TempDir::new().unwrap();
        let h = Hosts::create(&["a", "b"]).unwrap();
        let b = h.addr("b");
        let argv: Vec<String> = [
            "python3",
            "-m",
            "http.server",
            "--bind",
            &b.to_string(),
            "8080",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pid = h.spawn("b", &argv, &tmp.path().join("b.log")).unwrap();
        assert!(crate::wait_until(Duration::from_secs(20), || reaches(
            b, 8080
        )));
        h.cut("b").unwrap();
        assert!(!reaches(b, 8080), "a cut-off host still answered");
        h.heal("b").unwrap();
        assert!(crate::wait_until(Duration::from_secs(20), || reaches(
            b, 8080
        )));
        let ns = h.netns("a");
        drop(h);
        assert!(!Path::new("/run/netns").join(ns).exists());
        assert!(crate::wait_until(Duration::from_secs(5), || !alive(pid)));
    }
}
