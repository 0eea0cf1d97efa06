//! The events a watch streams (docs/DESIGN.md §2.17): every change each
//! applied record made, kept in memory in log order within a byte budget,
//! for watchers to read from any index the node still holds.
//!
//! The state publishes one [`RecordEvents`] per applied record, in log
//! order, from the WAL writer thread; watchers read by index. Nothing here
//! waits on a watcher: a watcher that falls behind what the budget keeps
//! finds its next index gone and is cut off, so a stalled consumer costs
//! the node no memory.

use crate::model::RecordEvents;

/// The node's recent events. (Skeleton: the cache and the readers follow.)
#[derive(Default)]
pub struct WatchHub {}

impl WatchHub {
    pub fn new() -> Self {
        WatchHub {}
    }

    /// Record `events.index` was applied: keep its events. Called for every
    /// applied record in log order (one with no events too).
    pub fn publish(&self, events: RecordEvents) {
        let _ = events;
    }

    /// The state was replaced (a snapshot install, a rebase): nothing before
    /// `next_index` can be served any more.
    pub fn reset(&self, next_index: u64) {
        let _ = next_index;
    }
}
