//! Locks over leases (docs/DESIGN.md §9.1), with fencing tokens.
//!
//! ```no_run
//! # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
//! use std::time::Duration;
//! use kvclient::lock::{Lock, LockOptions};
//! let guard = Lock::acquire(client, "locks/report", LockOptions::default()).await?;
//! // Hand guard.token() to the resource: it refuses any smaller one.
//! tokio::select! {
//!     _ = guard.lost() => eprintln!("lost the lock: stop using token {}", guard.token()),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => {}
//! }
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Taking the lock: grant a lease of `ttl` (kept alive from then on),
//! then put the key `name` with `If-None-Match: *` attached to it; the
//! answer's index (the key's `mod_index`) is the fencing token, larger for
//! every new holder. While another holds the key, the contender polls it
//! every 100 ms until it is gone (released, or expired with its holder's
//! lease), or until `wait` is spent ([`Error::LockTimeout`]). The create
//! is a conditional write, so after a failure whose outcome is unknown the
//! key is read back: held with our lease, it is ours (token: its
//! `mod_index`).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::expiry::LeaseId;
use crate::versioned::{Precondition, PutOptions};

/// How often a contender looks at a held lock's key, at most.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How a lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    /// The lease's TTL: how long the lock outlives a holder that stopped
    /// (default 10 s; kept alive every `ttl / 3`).
    pub ttl: Duration,
    /// How long to wait for a held lock; `None`: as long as it takes.
    pub wait: Option<Duration>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(10),
            wait: None,
        }
    }
}

/// The lock's entry point.
#[derive(Debug)]
pub struct Lock;

impl Lock {
    /// Takes the lock `name` (a key), waiting as `options` say.
    pub async fn acquire(client: &Client, name: &str, options: LockOptions) -> Result<LockGuard> {
        crate::key::validate_key(name).map_err(|reason| Error::invalid_key(name, reason))?;
        if options.ttl < Duration::from_millis(3) {
            return Err(Error::InvalidRequest(
                "a lock's TTL must be at least 3 ms (it is kept alive every TTL / 3)".into(),
            ));
        }
        let started = Instant::now();
        let deadline = options.wait.map(|w| started + w);
        let mut keeper = Keeper::start(client, options.ttl).await?;
        loop {
            // A lease whose keep-alives failed for a whole TTL may be gone:
            // a lock taken with it would be lost at once.
            if *keeper.lost.borrow() {
                keeper.revoke(client).await;
                keeper = Keeper::start(client, options.ttl).await?;
            }
            match try_create(client, name, keeper.lease).await {
                Ok(Some(token)) => {
                    return Ok(LockGuard {
                        client: client.clone(),
                        name: name.to_owned(),
                        token,
                        keeper: Some(keeper),
                    });
                }
                Ok(None) => {}
                // Our lease went while we waited (its keep-alives failed
                // for a whole TTL): start over with a new one.
                Err(Error::LeaseNotFound { .. }) => {
                    keeper.stop();
                    keeper = Keeper::start(client, options.ttl).await?;
                    continue;
                }
                Err(err) => {
                    keeper.revoke(client).await;
                    return Err(err);
                }
            }
            if let Err(err) = wait_until_free(client, name, deadline).await {
                keeper.revoke(client).await;
                return Err(match err {
                    WaitEnd::Timeout => Error::LockTimeout {
                        name: name.to_owned(),
                        waited: started.elapsed(),
                    },
                    WaitEnd::Failed(err) => err,
                });
            }
        }
    }
}

/// One create-only put attached to `lease`: the token if it took the
/// key, `None` if another holds it. After an outcome-unknown failure, the
/// key is read back: attached to our lease, it is ours.
async fn try_create(client: &Client, name: &str, lease: LeaseId) -> Result<Option<u64>> {
    let value = format!("lease {lease}");
    let options = PutOptions::new()
        .lease(lease)
        .precondition(Precondition::Absent);
    match client.put(name, value, options).await {
        Ok(token) => Ok(Some(token)),
        Err(Error::PreconditionFailed { .. }) => Ok(None),
        Err(err) if err.outcome_unknown() => match client.get_versioned_consistent(name).await? {
            Some(v) if v.lease == Some(lease) => Ok(Some(v.mod_index)),
            _ => Ok(None),
        },
        Err(err) => Err(err),
    }
}

enum WaitEnd {
    Timeout,
    Failed(Error),
}

/// Polls `name` until it is gone, at most every [`POLL_INTERVAL`].
async fn wait_until_free(
    client: &Client,
    name: &str,
    deadline: Option<Instant>,
) -> std::result::Result<(), WaitEnd> {
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(WaitEnd::Timeout);
        }
        let nap = match deadline {
            Some(d) => POLL_INTERVAL.min(d.saturating_duration_since(Instant::now())),
            None => POLL_INTERVAL,
        };
        tokio::time::sleep(nap).await;
        match client.get(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            // A node that is down for a moment does not end the wait.
            Err(err) if err.is_retryable() => {}
            Err(err) => return Err(WaitEnd::Failed(err)),
        }
    }
}

/// The lease and the task that keeps it alive; the task stops when this
/// is dropped.
#[derive(Debug)]
struct Keeper {
    lease: LeaseId,
    task: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl Keeper {
    async fn start(client: &Client, ttl: Duration) -> Result<Keeper> {
        let lease = client.lease_grant(ttl).await?;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive(client.clone(), lease, ttl, tx));
        Ok(Keeper {
            lease,
            task,
            lost: rx,
        })
    }

    fn stop(&self) {
        self.task.abort();
    }

    /// Stops keeping the lease and revokes it, ignoring failures: an
    /// unrevoked lease expires within its TTL.
    async fn revoke(&self, client: &Client) {
        self.stop();
        let _ = client.lease_revoke(self.lease).await;
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the keep-alive loop decides after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeepAlive {
    /// Keep going.
    Alive,
    /// The lease is gone, or may be: the lock is lost.
    Lost,
}

/// The keep-alive rule as a pure function: lost when the node says the
/// lease is gone, or when no keep-alive sent within the last `ttl`
/// succeeded (the lease's deadline is at most `ttl` after the last
/// successful one was sent).
pub(crate) fn judge(lease_gone: bool, since_last_success: Duration, ttl: Duration) -> KeepAlive {
    if lease_gone || since_last_success >= ttl {
        KeepAlive::Lost
    } else {
        KeepAlive::Alive
    }
}

async fn keep_alive(client: Client, lease: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        // Bounded by what is left of the lease: an answer after that is
        // no use.
        let left = ttl
            .saturating_sub(last_ok.elapsed())
            .max(Duration::from_millis(1));
        let outcome = tokio::time::timeout(left, client.lease_keepalive(lease)).await;
        let gone = matches!(outcome, Ok(Err(Error::LeaseNotFound { .. })));
        if matches!(outcome, Ok(Ok(_))) {
            last_ok = sent;
        }
        if judge(gone, last_ok.elapsed(), ttl) == KeepAlive::Lost {
            let _ = lost.send(true);
            return;
        }
    }
}

/// A held lock. Dropping it stops the keep-alives and revokes the lease
/// in the background (best effort: without a runtime, or if that fails,
/// the lease expires within its TTL); [`LockGuard::release`] revokes it
/// and says whether that worked.
#[derive(Debug)]
pub struct LockGuard {
    client: Client,
    name: String,
    token: u64,
    keeper: Option<Keeper>,
}

impl LockGuard {
    /// The fencing token: the key's `mod_index`, larger for every holder.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.name
    }

    /// The lease the key is attached to.
    pub fn lease(&self) -> LeaseId {
        self.keeper.as_ref().map_or(0, |k| k.lease)
    }

    /// Whether the lock is known lost.
    pub fn is_lost(&self) -> bool {
        self.keeper.as_ref().is_none_or(|k| *k.lost.borrow())
    }

    /// Completes when the lock is lost: a keep-alive found the lease gone,
    /// or none succeeded for a whole TTL. The holder must stop using the
    /// token then.
    pub async fn lost(&self) {
        let Some(keeper) = &self.keeper else {
            return;
        };
        let mut rx = keeper.lost.clone();
        // An error means the keep-alive task ended without saying lost
        // (aborted): nothing keeps the lease alive any more.
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Releases the lock: stops the keep-alives and revokes the lease,
    /// which deletes the key. A lease already gone is no error.
    pub async fn release(mut self) -> Result<()> {
        let Some(keeper) = self.keeper.take() else {
            return Ok(());
        };
        keeper.stop();
        match self.client.lease_revoke(keeper.lease).await {
            Ok(_) | Err(Error::LeaseNotFound { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(keeper) = self.keeper.take() else {
            return;
        };
        keeper.stop();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let lease = keeper.lease;
            runtime.spawn(async move {
                let _ = client.lease_revoke(lease).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_lost_when_its_lease_is_gone_or_unrenewed_for_a_ttl() {
        let ttl = Duration::from_secs(9);
        assert_eq!(judge(false, Duration::from_secs(3), ttl), KeepAlive::Alive);
        assert_eq!(
            judge(false, Duration::from_millis(8_999), ttl),
            KeepAlive::Alive
        );
        assert_eq!(judge(false, ttl, ttl), KeepAlive::Lost);
        assert_eq!(judge(true, Duration::ZERO, ttl), KeepAlive::Lost);
    }
}
