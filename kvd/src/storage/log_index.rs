//! What the engine remembers about its log in memory, for replication:
//! the epoch of every index (as runs, since epochs change rarely) and a
//! bounded cache of recent records to ship to secondaries without disk reads.
//!
//! Invariants: runs are sorted by start index with strictly increasing
//! epochs; the cache holds a contiguous range of indexes ending at the log's
//! last index.

use std::collections::VecDeque;

use super::record::Record;
use crate::replication::config::{Config, History};
use crate::replication::rules::{LogPos, LogView};

/// Epochs of the log `base_index+1..=last_index`, plus the epoch of
/// `base_index` (the last entry a snapshot covers; 0 for an empty log).
#[derive(Debug, Clone, Default)]
pub struct EpochRuns {
    base_index: u64,
    base_epoch: u64,
    /// `(first index, epoch)` of each run of equal epochs.
    runs: Vec<(u64, u64)>,
    last_index: u64,
    /// The configuration records (docs/DESIGN.md §4.11), from the one the
    /// base carries on.
    configs: History,
}

impl EpochRuns {
    pub fn new(base_index: u64, base_epoch: u64) -> Self {
        EpochRuns {
            base_index,
            base_epoch,
            runs: Vec::new(),
            last_index: base_index,
            configs: History::default(),
        }
    }

    /// The same log view whose base carries the configuration record
    /// `config` (a snapshot's configuration section).
    pub fn with_config(mut self, config: Option<(u64, Config)>) -> Self {
        self.configs = History::new(config);
        self
    }

    /// Records that entry `index` (just pushed) is a configuration record.
    pub fn push_config(&mut self, index: u64, config: Config) {
        debug_assert_eq!(index, self.last_index);
        self.configs.push(index, config);
    }

    /// The newest configuration record of the log, if any.
    pub fn config(&self) -> Option<(u64, &Config)> {
        self.configs.newest()
    }

    /// The configuration record in effect at `index`, if any.
    pub fn config_at(&self, index: u64) -> Option<(u64, Config)> {
        self.configs.at(index).map(|(i, c)| (i, c.clone()))
    }

    /// Records that entry `index` (the next one) has `epoch`.
    pub fn push(&mut self, index: u64, epoch: u64) {
        assert_eq!(
            index,
            self.last_index + 1,
            "log invariant: entries are pushed in order without gaps"
        );
        match self.runs.last() {
            Some(&(_, e)) if e == epoch => {}
            Some(&(_, e)) => {
                assert!(
                    epoch > e,
                    "log invariant: epochs never decrease ({e} then {epoch})"
                );
                self.runs.push((index, epoch));
            }
            None => self.runs.push((index, epoch)),
        }
        self.last_index = index;
    }

    /// Forgets entries before `base_index + 1` (they are in a snapshot and
    /// no longer in the WAL), keeping the base's epoch.
    pub fn compact_to(&mut self, base_index: u64) {
        if base_index <= self.base_index || base_index > self.last_index {
            return;
        }
        if let Some(epoch) = self.epoch_at(base_index) {
            self.base_epoch = epoch;
            self.base_index = base_index;
            let keep_from = self.runs.partition_point(|&(start, _)| start <= base_index);
            // The run holding base_index + 1 may start earlier; keep it.
            let keep_from = keep_from.saturating_sub(1);
            self.runs.drain(..keep_from);
            self.configs.compact_to(base_index);
        }
    }

    /// Forgets entries `from` and after.
    pub fn truncate_from(&mut self, from: u64) {
        assert!(
            from > self.base_index,
            "log invariant: snapshotted entries are never truncated"
        );
        self.runs.retain(|&(start, _)| start < from);
        self.last_index = self.last_index.min(from - 1);
        // A cut configuration reverts to the one before it.
        self.configs.truncate_from(from);
    }
}

impl LogView for EpochRuns {
    fn last(&self) -> LogPos {
        LogPos {
            epoch: self.epoch_at(self.last_index).unwrap_or(0),
            index: self.last_index,
        }
    }

    fn first_index(&self) -> u64 {
        self.base_index + 1
    }

    fn epoch_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_epoch);
        }
        if index < self.base_index || index > self.last_index {
            return None;
        }
        let run = self.runs.partition_point(|&(start, _)| start <= index);
        run.checked_sub(1).map(|r| self.runs[r].1)
    }
}

/// Recent records, newest last, at most `max_bytes` of payload.
#[derive(Debug)]
pub struct LogCache {
    records: VecDeque<Record>,
    bytes: usize,
    max_bytes: usize,
}

impl LogCache {
    pub fn new(max_bytes: usize) -> Self {
        LogCache {
            records: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn push(&mut self, rec: Record) {
        if let Some(last) = self.records.back() {
            if rec.index != last.index + 1 {
                // Not contiguous (a snapshot install, say): start over.
                self.records.clear();
                self.bytes = 0;
            }
        }
        self.bytes += rec.op.encoded_len();
        self.records.push_back(rec);
        while self.bytes > self.max_bytes && self.records.len() > 1 {
            if let Some(old) = self.records.pop_front() {
                self.bytes -= old.op.encoded_len();
            }
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    pub fn truncate_from(&mut self, from: u64) {
        while self.records.back().is_some_and(|r| r.index >= from) {
            if let Some(r) = self.records.pop_back() {
                self.bytes -= r.op.encoded_len();
            }
        }
    }

    /// Records from `from` on, up to about `max_bytes`; `None` if `from` is
    /// older than the cache (read the WAL instead).
    pub fn get_from(&self, from: u64, max_bytes: usize) -> Option<Vec<Record>> {
        let first = self.records.front().map(|r| r.index)?;
        if from < first {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.iter().skip((from - first) as usize) {
            if !out.is_empty() && bytes + r.op.encoded_len() > max_bytes {
                break;
            }
            bytes += r.op.encoded_len();
            out.push(r.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::{Op, Timestamp};

    #[test]
    fn epoch_runs_answer_every_index() {
        let mut r = EpochRuns::new(10, 2);
        for (i, e) in [(11, 2), (12, 3), (13, 3), (14, 5)] {
            r.push(i, e);
        }
        let got: Vec<_> = (9..=15).map(|i| r.epoch_at(i)).collect();
        assert_eq!(
            got,
            vec![None, Some(2), Some(2), Some(3), Some(3), Some(5), None]
        );
        assert_eq!(
            r.last(),
            LogPos {
                epoch: 5,
                index: 14
            }
        );
        r.truncate_from(13);
        assert_eq!(
            r.last(),
            LogPos {
                epoch: 3,
                index: 12
            }
        );
        assert_eq!(r.epoch_at(13), None);
        r.push(13, 7);
        assert_eq!(r.epoch_at(13), Some(7));
        r.truncate_from(11);
        assert_eq!(
            r.last(),
            LogPos {
                epoch: 2,
                index: 10
            }
        );
    }

    #[test]
    fn a_cut_configuration_reverts_and_compaction_keeps_the_base_one() {
        use crate::replication::config::Config;
        let c = |n: u16| Config {
            voters: vec![format!("http://127.0.0.1:{n}")],
            learners: vec![],
        };
        let mut r = EpochRuns::new(10, 2).with_config(Some((4, c(1))));
        for i in 11..=20 {
            r.push(i, 2);
        }
        r.push_config(20, c(2));
        r.push(21, 3);
        r.push_config(21, c(3));
        assert_eq!(r.config().map(|(i, _)| i), Some(21));
        // A deposed primary's configuration, cut: the one before it.
        r.truncate_from(21);
        assert_eq!(r.config(), Some((20, &c(2))));
        assert_eq!(r.config_at(15), Some((4, c(1))));
        r.truncate_from(15);
        assert_eq!(r.config(), Some((4, &c(1))), "the snapshot's");
        for i in 15..=30 {
            r.push(i, 3);
        }
        r.push_config(30, c(5));
        r.compact_to(25);
        assert_eq!(r.config_at(25), Some((4, c(1))), "still the base's");
        r.compact_to(30);
        assert_eq!(r.config_at(30), Some((30, c(5))));
    }

    #[test]
    fn cache_is_bounded_and_contiguous() {
        let rec = |index| Record {
            index,
            epoch: 1,
            ts: Timestamp::default(),
            op: Op::Noop,
        };
        let per = rec(1).op.encoded_len();
        let mut c = LogCache::new(per * 5);
        for i in 1..=8 {
            c.push(rec(i));
        }
        assert!(c.get_from(3, usize::MAX).is_none(), "evicted");
        let got = c.get_from(5, usize::MAX).unwrap();
        assert_eq!(
            got.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![5, 6, 7, 8]
        );
        assert_eq!(c.get_from(4, per * 2).unwrap().len(), 2);
        c.truncate_from(7);
        assert_eq!(c.get_from(4, usize::MAX).unwrap().len(), 3);
        assert!(c.get_from(9, usize::MAX).unwrap().is_empty());
    }
}
