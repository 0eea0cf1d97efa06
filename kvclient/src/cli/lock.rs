//! `kvclient lock NAME -- CMD...` (docs/DESIGN.md §9.2): runs CMD while
//! holding the lock, and ends it when the lock is lost.
//!
//! CMD gets `KV_LOCK_KEY`, `KV_LOCK_TOKEN` (the fencing token) and
//! `KV_LOCK_LEASE`. It runs as a child of kvclient, waited for on a
//! blocking thread; kvclient meanwhile watches the lock and its own
//! signals. Lost: SIGTERM to CMD, SIGKILL 5 s later, exit 4. SIGTERM or
//! SIGINT to kvclient: passed on to CMD, and once CMD exits the lock is
//! released and kvclient exits with CMD's status.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::Context;
use kvclient::lock::{Lock, LockGuard, LockOptions};
use kvclient::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

/// How long CMD has between SIGTERM and SIGKILL once the lock is lost.
pub const KILL_AFTER: Duration = Duration::from_secs(5);

/// A timer that is not armed (a year: far, and no Instant overflow).
const NEVER: Duration = Duration::from_secs(365 * 86_400);

/// How the locked command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// CMD exited on its own (or after a signal kvclient got and passed
    /// on) with this status, the lock held throughout.
    Exited(u8),
    /// The lock was lost while CMD ran; CMD was stopped.
    Lost,
    /// SIGTERM or SIGINT came before the lock was taken; CMD never ran.
    /// The status a shell reports for that signal.
    Interrupted(u8),
}

/// What [`run`] may fail with before CMD runs.
#[derive(Debug)]
pub enum Error {
    /// Taking the lock failed (`LockTimeout` among others).
    Client(kvclient::Error),
    /// CMD could not be started, or signals could not be set up.
    Local(anyhow::Error),
}

/// Takes the lock, runs `cmd` under it, releases it.
pub async fn run(
    client: &Client,
    name: &str,
    options: LockOptions,
    cmd: &[String],
) -> Result<Outcome, Error> {
    let Some((program, args)) = cmd.split_first() else {
        return Err(Error::Local(anyhow::anyhow!(
            "lock needs a command after --"
        )));
    };
    // Set up before the lock is taken: a signal that comes after must not
    // kill kvclient and leave the lock to expire.
    let mut term = signal(SignalKind::terminate())
        .context("catching SIGTERM")
        .map_err(Error::Local)?;
    let mut int = signal(SignalKind::interrupt())
        .context("catching SIGINT")
        .map_err(Error::Local)?;
    // A signal while waiting ends the wait (a lease already granted
    // expires within its TTL).
    let guard = tokio::select! {
        taken = Lock::acquire(client, name, options) => taken.map_err(Error::Client)?,
        _ = term.recv() => return Ok(Outcome::Interrupted(128 + 15)),
        _ = int.recv() => return Ok(Outcome::Interrupted(128 + 2)),
    };
    let child = Command::new(program)
        .args(args)
        .env("KV_LOCK_KEY", name)
        .env("KV_LOCK_TOKEN", guard.token().to_string())
        .env("KV_LOCK_LEASE", guard.lease().to_string())
        .spawn()
        .with_context(|| format!("starting {program:?}"));
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            let _ = guard.release().await;
            return Err(Error::Local(err));
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let mut exited = tokio::task::spawn_blocking(move || child.wait());
    let mut lost = false;
    let kill_timer = tokio::time::sleep(NEVER);
    tokio::pin!(kill_timer);
    let status = loop {
        tokio::select! {
            status = &mut exited => break status,
            () = guard.lost(), if !lost => {
                lost = true;
                let _ = kill(pid, Signal::SIGTERM);
                kill_timer.as_mut().reset(tokio::time::Instant::now() + KILL_AFTER);
            }
            () = &mut kill_timer, if lost => {
                let _ = kill(pid, Signal::SIGKILL);
                kill_timer.as_mut().reset(tokio::time::Instant::now() + NEVER);
            }
            _ = term.recv() => { let _ = kill(pid, Signal::SIGTERM); }
            _ = int.recv() => { let _ = kill(pid, Signal::SIGINT); }
        }
    };
    let status = status
        .context("waiting for the command")
        .and_then(|s| s.context("waiting for the command"));
    finish(guard, lost, status).await
}

async fn finish(
    guard: LockGuard,
    lost: bool,
    status: anyhow::Result<ExitStatus>,
) -> Result<Outcome, Error> {
    if lost {
        return Ok(Outcome::Lost);
    }
    // A release that fails leaves the lease to expire within its TTL; CMD's
    // status is still the answer.
    let _ = guard.release().await;
    Ok(Outcome::Exited(exit_code(status.map_err(Error::Local)?)))
}

/// CMD's status as an exit code: its own, or 128 + the signal that ended
/// it, as a shell reports it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses_map_as_a_shell_reports_them() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143, "SIGTERM");
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137, "SIGKILL");
    }
}
