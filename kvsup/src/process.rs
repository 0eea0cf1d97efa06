//! Starting, watching and signalling kvd processes.
//!
//! A node the daemon spawned is its child: its exit is seen the moment it
//! happens (`wait`). A node found running when the daemon starts (its
//! previous daemon died) is adopted through its pid file and watched by
//! polling, so a restarted supervisor never starts a second kvd on a data
//! dir that is still in use.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How a running node is held.
pub enum Handle {
    Child(Child),
    Adopted(u32),
}

impl Handle {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Handle::Child(c) => c.id(),
            Handle::Adopted(p) => Some(*p),
        }
    }

    /// Resolves when the process has exited; the text says how.
    pub async fn wait(&mut self, poll: Duration) -> String {
        match self {
            Handle::Child(c) => match c.wait().await {
                Ok(st) => describe_exit(st),
                Err(e) => format!("wait failed: {e}"),
            },
            Handle::Adopted(pid) => {
                while alive(*pid) {
                    tokio::time::sleep(poll).await;
                }
                "exited (adopted process; status unknown)".to_string()
            }
        }
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!(
            "killed by {}",
            Signal::try_from(s).map_or_else(|_| format!("signal {s}"), |s| s.to_string())
        ),
        _ => "exited".to_string(),
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if kill(Pid::from_raw(p), None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); its state letter in /proc says Z. A
    // killed multi-threaded process shows its leader as Z while its other
    // threads still exit (holding its files and sockets): it is gone only
    // when no thread is left besides the leader.
    let zombie = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z"),
        Err(_) => return false,
    };
    if !zombie {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|threads| threads.count() > 1)
}

pub fn signal(pid: u32, sig: Signal) -> Result<()> {
    let p = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(p), sig).with_context(|| format!("sending {sig} to pid {pid}"))
}

/// The pid in `pid_file` if that process is alive and is a kvd serving
/// `data_dir` (checked through /proc, so a recycled pid is not adopted).
pub fn adoptable(pid_file: &Path, data_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if !alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_kvd = args
        .first()
        .is_some_and(|a| a.ends_with(b"/kvd") || *a == b"kvd");
    let dir = data_dir.as_os_str().as_encoded_bytes();
    let same_dir = args
        .windows(2)
        .any(|w| w[0] == b"--data-dir" && w[1] == dir);
    (is_kvd && same_dir).then_some(pid)
}

/// What to run for one node.
pub struct Launch {
    pub kvd: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

/// Spawns kvd with stdout and stderr appended to the node's log, and
/// records its pid. The child gets its own process group, so a Ctrl-C
/// meant for a foreground `kvsup` never reaches the nodes.
pub fn spawn(l: &Launch) -> Result<Child> {
    if let Some(dir) = l.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&l.log)
        .with_context(|| format!("opening {}", l.log.display()))?;
    let err = log.try_clone().context("duplicating the log handle")?;
    let child = Command::new(&l.kvd)
        .args(&l.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("starting {}", l.kvd.display()))?;
    if let Some(pid) = child.id() {
        std::fs::write(&l.pid_file, format!("{pid}\n"))
            .with_context(|| format!("writing {}", l.pid_file.display()))?;
    }
    Ok(child)
}
