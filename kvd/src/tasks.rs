//! Background tasks that a component owns: spawned into one set and
//! stopped together, so that none outlives the runtime that started it
//! (a mode switch or a shutdown stops them and waits until they are gone).

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinSet;

/// A set of tasks, stopped by [`Tasks::stop`] (or aborted when dropped).
#[derive(Default)]
pub struct Tasks {
    set: parking_lot::Mutex<JoinSet<()>>,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` until it returns or the set is stopped.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.set.lock();
        // Forget tasks that have ended, so a long-lived set stays small.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Runs `task` on a handle of `owner` (a runtime's tasks each hold it
    /// alive until they are stopped).
    pub fn spawn_on<T, F, Fut>(&self, owner: &Arc<T>, task: F)
    where
        F: FnOnce(Arc<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(task(owner.clone()));
    }

    /// Runs `task(owner, i)` for every `i` in `0..n`: one task per peer.
    pub fn spawn_each<T, F, Fut>(&self, owner: &Arc<T>, n: usize, task: F)
    where
        F: Fn(Arc<T>, usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for i in 0..n {
            self.spawn(task(owner.clone(), i));
        }
    }

    /// Cancels every task at its next await point and waits until all have
    /// ended. Later [`Tasks::spawn`]s start a fresh set.
    pub async fn stop(&self) {
        let mut set = std::mem::take(&mut *self.set.lock());
        set.abort_all();
        while set.join_next().await.is_some() {}
    }

    /// Tasks spawned and not yet known to have ended.
    pub fn len(&self) -> usize {
        self.set.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn stop_ends_every_task_before_it_returns() {
        let tasks = Tasks::new();
        let finished = Arc::new(AtomicBool::new(false));
        for _ in 0..3 {
            let finished = finished.clone();
            tasks.spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                finished.store(true, Ordering::SeqCst);
            });
        }
        assert_eq!(tasks.len(), 3);
        tasks.stop().await;
        assert!(tasks.is_empty());
        assert!(!finished.load(Ordering::SeqCst), "the tasks were cancelled");
    }
}
