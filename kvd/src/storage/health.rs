//! The storage state: whether the engine takes writes, and if not, why.
//! One flag, set by the WAL where a failure happens and read by everyone
//! else (writers before they queue, `/ready`, `/v1/status`).

use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;

use super::{Error, StorageState};

/// The engine's [`StorageState`], readable from any thread; set only by
/// the WAL thread, and never back to `Ok`: the first failure is why.
#[derive(Default)]
pub struct Health {
    state: AtomicU8,
    detail: Mutex<Option<String>>,
}

impl Health {
    pub fn get(&self) -> StorageState {
        StorageState::ALL[usize::from(self.state.load(Ordering::Acquire))]
    }

    pub fn is_ok(&self) -> bool {
        self.get() == StorageState::Ok
    }

    /// What went wrong, once something did.
    pub fn detail(&self) -> Option<String> {
        self.detail.lock().clone()
    }

    /// Records the first failure, and logs it; says whether this call
    /// recorded it (a later failure changes nothing).
    pub fn fail(&self, state: StorageState, detail: String) -> bool {
        if state == StorageState::Ok || !self.is_ok() {
            return false;
        }
        let refusal = match state {
            StorageState::DataDirLost => Error::DataDirLost(detail.clone()),
            _ => Error::Poisoned,
        };
        tracing::error!(
            storage_state = state.as_str(),
            cause = %detail,
            "refusing writes until restart: {refusal}"
        );
        *self.detail.lock() = Some(detail);
        self.state.store(state as u8, Ordering::Release);
        true
    }

    /// The error a write gets now, if any.
    pub fn refusal(&self) -> Option<Error> {
        match self.get() {
            StorageState::Ok => None,
            StorageState::Poisoned => Some(Error::Poisoned),
            StorageState::DataDirLost => {
                Some(Error::DataDirLost(self.detail().unwrap_or_default()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_sticks() {
        let h = Health::default();
        assert!(h.is_ok() && h.refusal().is_none());
        assert!(!h.fail(StorageState::Ok, "nothing".into()));
        assert!(h.fail(StorageState::Poisoned, "fsync failed".into()));
        assert!(!h.fail(StorageState::DataDirLost, "/d was removed".into()));
        assert_eq!(h.get(), StorageState::Poisoned);
        assert_eq!(h.detail().as_deref(), Some("fsync failed"));
        assert!(matches!(h.refusal(), Some(Error::Poisoned)));
    }
}
