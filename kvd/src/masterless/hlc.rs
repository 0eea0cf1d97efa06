//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! A timestamp is `(physical_ms, logical, node)`. The clock is:
//! - strictly increasing on each node: every [`Hlc::now`] is greater than
//!   every earlier `now` and every timestamp passed to [`Hlc::observe`];
//! - robust to the wall clock stepping back: `physical_ms` never decreases,
//!   the logical counter carries the order until the wall clock catches up;
//! - close to the wall clock: `physical_ms` is the largest wall time seen.
//!
//! The wall clock is read through [`WallClock`], which adds an injectable
//! offset (`--clock-offset-ms`, the debug endpoint `/v1/admin/debug/clock`)
//! so tests can put a node's clock behind or jump it backwards.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::Timestamp;

/// The system clock in milliseconds, plus a test-only offset.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    offset_ms: Arc<AtomicI64>,
}

impl WallClock {
    pub fn new(offset_ms: i64) -> Self {
        WallClock {
            offset_ms: Arc::new(AtomicI64::new(offset_ms)),
        }
    }

    pub fn now_ms(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        wall.saturating_add(self.offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves the offset (a jump of the node's wall clock, either way).
    pub fn set_offset_ms(&self, ms: i64) {
        self.offset_ms.store(ms, Ordering::Relaxed);
    }
}

/// The clock state of one node. Not thread-safe by itself: the WAL writer
/// thread owns it (it stamps every local write and sees every remote one).
#[derive(Debug, Clone)]
pub struct Hlc {
    last: Timestamp,
}

impl Hlc {
    pub fn new(node: u32) -> Self {
        Hlc {
            last: Timestamp {
                physical_ms: 0,
                logical: 0,
                node,
            },
        }
    }

    /// The last timestamp issued or observed (with this node's id).
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// A new timestamp for a local event at wall time `wall_ms`.
    pub fn now(&mut self, wall_ms: u64) -> Timestamp {
        if wall_ms > self.last.physical_ms {
            self.last.physical_ms = wall_ms;
            self.last.logical = 0;
        } else {
            self.bump();
        }
        self.last
    }

    /// Advances past a received timestamp `seen` (wall time `wall_ms`):
    /// every later [`Hlc::now`] is greater than `seen`.
    pub fn observe(&mut self, seen: Timestamp, wall_ms: u64) {
        let old = self.last.physical_ms;
        let pm = old.max(seen.physical_ms).max(wall_ms);
        if pm == old && pm == seen.physical_ms {
            self.last.logical = self.last.logical.max(seen.logical);
            self.bump();
        } else if pm == old {
            self.bump();
        } else if pm == seen.physical_ms {
            self.last.physical_ms = pm;
            self.last.logical = seen.logical;
            self.bump();
        } else {
            self.last.physical_ms = pm;
            self.last.logical = 0;
        }
    }

    /// Logical + 1; on the (theoretical) overflow the physical part moves
    /// one millisecond ahead instead, which keeps the order strict. The
    /// physical part saturates rather than wrapping to 0: it stays within
    /// [`within_offset`] of a wall clock, nowhere near 2^64.
    fn bump(&mut self) {
        match self.last.logical.checked_add(1) {
            Some(l) => self.last.logical = l,
            None => {
                self.last.physical_ms = self.last.physical_ms.saturating_add(1);
                self.last.logical = 0;
            }
        }
    }
}

/// Whether a stamp from elsewhere is at most `max_offset_ms` ahead of the
/// local wall time `wall_ms` (CockroachDB's maximum clock offset). Stamps
/// behind are always fine: the clock never goes back for them. One far
/// ahead would win every later write to its key until the wall clock
/// caught up, so peers' records stamped so are refused; bounding every
/// stamp a node observes also bounds its own clock.
pub fn within_offset(seen: Timestamp, wall_ms: u64, max_offset_ms: u64) -> bool {
    seen.physical_ms <= wall_ms.saturating_add(max_offset_ms)
}

/// A node's id in timestamps: a fixed hash of its name (equal on every
/// node and release), never 0 (0 is the mode switch's common base stamp).
pub fn node_tag(node_id: &str) -> u32 {
    use std::hash::BuildHasher;
    let h = foldhash::quality::FixedState::with_seed(0x686c_635f_6e6f_6465).hash_one(node_id);
    let tag = (h ^ (h >> 32)) as u32;
    tag.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_when_the_wall_clock_steps_back() {
        let mut c = Hlc::new(7);
        let mut prev = c.now(1_000);
        for wall in [1_000, 999, 500, 0, 1_001, 1_001, 2, 5_000] {
            let t = c.now(wall);
            assert!(t > prev, "{t:?} after {prev:?}");
            prev = t;
        }
    }

    #[test]
    fn observe_moves_past_remote_stamps() {
        let mut c = Hlc::new(1);
        let remote = Timestamp {
            physical_ms: 10_000,
            logical: 5,
            node: 2,
        };
        c.observe(remote, 100);
        let t = c.now(100);
        assert!((t.physical_ms, t.logical) > (remote.physical_ms, remote.logical));
        // Equal physical parts on both sides.
        let mut d = Hlc::new(3);
        d.now(10_000);
        d.observe(remote, 10_000);
        assert!(d.now(10_000) > remote);
    }

    #[test]
    fn the_clock_never_wraps_to_zero() {
        let mut c = Hlc::new(1);
        let top = Timestamp {
            physical_ms: u64::MAX,
            logical: u32::MAX,
            node: 2,
        };
        c.observe(top, 1_000);
        assert_eq!(c.last().physical_ms, u64::MAX);
        assert_eq!(c.now(1_000).physical_ms, u64::MAX);
    }

    #[test]
    fn stamps_more_than_the_offset_ahead_are_out_of_range() {
        let at = |ms| Timestamp {
            physical_ms: ms,
            logical: u32::MAX,
            node: 9,
        };
        let wall = 1_700_000_000_000;
        assert!(within_offset(at(0), wall, 500));
        assert!(within_offset(at(wall - 10_000), wall, 500));
        assert!(within_offset(at(wall + 500), wall, 500));
        assert!(!within_offset(at(wall + 501), wall, 500));
        assert!(!within_offset(at(u64::MAX), wall, 500));
        assert!(within_offset(at(u64::MAX), u64::MAX - 1, 500), "saturates");
    }

    #[test]
    fn tags_are_never_zero_and_differ_for_usual_names() {
        let tags: Vec<u32> = ["n0", "n1", "n2"].iter().map(|n| node_tag(n)).collect();
        assert!(tags.iter().all(|t| *t != 0));
        assert_ne!(tags[0], tags[1]);
        assert_ne!(tags[1], tags[2]);
        assert_ne!(tags[0], tags[2]);
    }
}
