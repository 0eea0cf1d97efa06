//! The primary's fsync thread: the WAL writer hands it the fdatasync of a
//! client batch and, while it runs, applies the commits that arrive (a
//! peer's acknowledgement of an earlier batch), which would otherwise wait
//! for the fsync to return. The writer appends nothing meanwhile: one
//! fsync at a time, and the log is exactly as when it began.
//!
//! The thread is started on first use, owned by the writer and joined when
//! the writer is dropped.

use std::io;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;

use super::fs::SyncHandle;
use super::Cmd;

/// The outcome of the fsync in flight, once it has one.
#[derive(Default)]
pub(super) struct Outcome {
    slot: Mutex<Option<io::Result<()>>>,
    ready: Condvar,
}

impl Outcome {
    /// The outcome, if the fsync has returned (taken: asked once).
    pub fn take(&self) -> Option<io::Result<()>> {
        self.slot.lock().take()
    }

    /// Waits for the outcome.
    pub fn wait(&self) -> io::Result<()> {
        let mut slot = self.slot.lock();
        loop {
            if let Some(outcome) = slot.take() {
                return outcome;
            }
            self.ready.wait(&mut slot);
        }
    }

    fn put(&self, outcome: io::Result<()>) {
        *self.slot.lock() = Some(outcome);
        self.ready.notify_one();
    }
}

pub(super) struct Syncer {
    jobs: Option<std_mpsc::SyncSender<Box<dyn SyncHandle>>>,
    pub outcome: Arc<Outcome>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread. After each fsync it stores the outcome, then
    /// wakes the writer with [`Cmd::Synced`] through `wake` (held weakly,
    /// so that shutdown still closes the queue; never waiting for room in
    /// it: a full queue wakes the writer anyway, and it looks at the
    /// outcome before each wait).
    pub fn start(wake: mpsc::WeakSender<Cmd>) -> io::Result<Syncer> {
        let (jobs, rx) = std_mpsc::sync_channel::<Box<dyn SyncHandle>>(1);
        let outcome = Arc::new(Outcome::default());
        let out = outcome.clone();
        let thread = std::thread::Builder::new()
            .name("kvd-fsync".into())
            .spawn(move || {
                while let Ok(handle) = rx.recv() {
                    out.put(handle.sync_data());
                    if let Some(tx) = wake.upgrade() {
                        let _ = tx.try_send(Cmd::Synced);
                    }
                }
            })?;
        Ok(Syncer {
            jobs: Some(jobs),
            outcome,
            thread: Some(thread),
        })
    }

    /// Starts an fsync through `handle`; gives it back if the thread is
    /// gone (the caller then syncs itself).
    pub fn submit(&self, handle: Box<dyn SyncHandle>) -> Result<(), Box<dyn SyncHandle>> {
        match &self.jobs {
            Some(jobs) => jobs.send(handle).map_err(|e| e.0),
            None => Err(handle),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the fsync it runs, if any.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
