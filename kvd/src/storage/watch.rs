//! The events a watch streams (docs/DESIGN.md §2.17): every change each
//! applied record made, kept in memory in log order within a byte budget,
//! for watchers to read from any index the node still holds.
//!
//! The state publishes one [`RecordEvents`] per applied record, in log
//! order, from the WAL writer thread; watchers read by index. Nothing here
//! waits on a watcher: a watcher that falls behind what the budget keeps
//! finds its next index gone and is cut off, so a stalled consumer costs
//! the node no memory.
//!
//! Indexes need not be contiguous: a record that is logged but changes
//! nothing here (a masterless merge that lost every key, `debug_flaky`)
//! may skip [`WatchHub::publish`]. A missing index inside what is held is
//! such a record, with no events. What cannot be streamed any more is said
//! by [`WatchHub::oldest`] alone: the records evicted, and everything
//! before a [`WatchHub::reset`].
//!
//! A [`Watcher`] is woken only by records with an event in its range: the
//! hub keeps each watcher's range and, per watcher, the first record in it
//! that the watcher has not read. A watcher with none skips straight to
//! the head without looking at a record, so watches of a quiet range cost
//! the write path one range check per record, not a wake-up each.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::model::{KeyRange, RecordEvents};

/// What one event costs the budget besides its key and values.
pub const EVENT_COST: usize = 64;
/// What one record costs the budget besides its events.
pub const RECORD_COST: usize = 64;

/// The budget of a hub made without one (states that never serve watches,
/// such as the one a snapshot is loaded into before it replaces the
/// engine's); the engine sets `--watch-cache-mib` with
/// [`WatchHub::set_budget`].
pub const DEFAULT_BUDGET: usize = 1 << 20;

/// What a record costs the budget (docs/DESIGN.md §2.17: keys, values and
/// previous values, plus [`EVENT_COST`] an event), plus [`RECORD_COST`].
pub fn cost(r: &RecordEvents) -> usize {
    r.events.iter().fold(RECORD_COST, |sum, e| {
        sum + e.key.len()
            + e.value.as_ref().map_or(0, |v| v.len())
            + e.prev.as_ref().map_or(0, |v| v.len())
            + EVENT_COST
    })
}

/// `from` is before the oldest record held: it can no longer be streamed.
/// `oldest` is the first index that can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub oldest: u64,
}

/// Where the hub stands, as waiters see it change: every publish moves
/// `next`, every reset moves `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub generation: u64,
    /// The index after the last record published.
    pub next: u64,
}

/// A reader's place: the next index it reads, within one generation (a
/// [`WatchHub::reset`] ends every cursor made before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    generation: u64,
    next: u64,
}

impl Cursor {
    /// The first record this cursor has not read.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The hub's generation when it was made: a reset since ends it.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// What a reader has not read yet: the bytes (by [`cost`]) and the records
/// held from its next index to the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    pub bytes: u64,
    pub records: usize,
}

struct Held {
    events: Arc<RecordEvents>,
    /// Sum of the costs of the records published before this one in this
    /// generation, so that any lag is one subtraction.
    start: u64,
}

struct Inner {
    budget: usize,
    records: VecDeque<Held>,
    /// Sum of the costs of `records`.
    bytes: usize,
    /// Sum of the costs of every record published in this generation.
    total: u64,
    oldest: u64,
    next: u64,
    generation: u64,
    /// Every open [`Watcher`]'s range and wake-up, by id.
    interests: HashMap<u64, Interest>,
    next_interest: u64,
}

/// What one watcher waits for.
struct Interest {
    range: KeyRange,
    /// The first record at or after the watcher's cursor that may have an
    /// event in its range (`None`: no record published since its cursor
    /// has one). Set by [`WatchHub::publish`], cleared by a read to the
    /// head; both under the hub's lock, so no record slips between.
    first_match: Option<u64>,
    wake: Arc<Notify>,
}

impl Interest {
    fn matches(&self, r: &RecordEvents) -> bool {
        r.events.iter().any(|e| self.range.contains(&e.key))
    }
}

impl Inner {
    /// The position in `records` of the first record at or after `index`.
    fn position(&self, index: u64) -> usize {
        self.records.partition_point(|h| h.events.index < index)
    }

    fn lag(&self, from: u64) -> Lag {
        let at = self.position(from);
        match self.records.get(at) {
            Some(first) => Lag {
                bytes: self.total - first.start,
                records: self.records.len() - at,
            },
            None => Lag::default(),
        }
    }

    fn evict(&mut self) {
        // The newest record stays, however large: a record over the budget
        // is still streamed to those who keep up.
        while self.bytes > self.budget && self.records.len() > 1 {
            let Some(old) = self.records.pop_front() else {
                break;
            };
            self.bytes -= cost(&old.events);
            self.oldest = old.events.index + 1;
        }
    }

    /// The records from `cursor` on (see [`WatchHub::read`]).
    fn read(
        &self,
        cursor: &mut Cursor,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<RecordEvents>>, Compacted> {
        if cursor.generation != self.generation || cursor.next < self.oldest {
            return Err(Compacted {
                oldest: self.oldest,
            });
        }
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for held in self.records.range(self.position(cursor.next)..) {
            if out.len() >= max_records.max(1) || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            bytes += cost(&held.events);
            out.push(held.events.clone());
        }
        cursor.next = match out.last() {
            Some(last) if last.index + 1 < self.next => last.index + 1,
            _ => cursor.next.max(self.next),
        };
        Ok(out)
    }

    /// Marks every watcher with an event in `r` and no earlier mark; the
    /// wake-ups of those newly marked.
    fn mark(&mut self, r: &RecordEvents) -> Vec<Arc<Notify>> {
        let mut woken = Vec::new();
        for interest in self.interests.values_mut() {
            if interest.first_match.is_none() && interest.matches(r) {
                interest.first_match = Some(r.index);
                woken.push(interest.wake.clone());
            }
        }
        woken
    }
}

/// The node's recent events.
pub struct WatchHub {
    inner: Mutex<Inner>,
    head: watch::Sender<Head>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    /// An empty hub of [`DEFAULT_BUDGET`] whose first record is index 1.
    pub fn new() -> Self {
        let head = Head {
            generation: 0,
            next: 1,
        };
        WatchHub {
            inner: Mutex::new(Inner {
                budget: DEFAULT_BUDGET,
                records: VecDeque::new(),
                bytes: 0,
                total: 0,
                oldest: 1,
                next: 1,
                generation: 0,
                interests: HashMap::new(),
                next_interest: 0,
            }),
            head: watch::Sender::new(head),
        }
    }

    /// Keeps at most about `bytes` of events from now on (at least the
    /// newest record).
    pub fn set_budget(&self, bytes: usize) {
        let mut inner = self.inner.lock();
        inner.budget = bytes;
        inner.evict();
    }

    pub fn budget(&self) -> usize {
        self.inner.lock().budget
    }

    /// Record `events.index` was applied: keep its events. Called for every
    /// applied record in log order (one with no events too). A record at or
    /// before the last one published is not in log order and is dropped.
    pub fn publish(&self, events: RecordEvents) {
        let (head, woken) = {
            let mut inner = self.inner.lock();
            if events.index < inner.next {
                return;
            }
            let woken = inner.mark(&events);
            let c = cost(&events);
            inner.next = events.index + 1;
            let start = inner.total;
            inner.total += c as u64;
            inner.bytes += c;
            inner.records.push_back(Held {
                events: Arc::new(events),
                start,
            });
            inner.evict();
            let head = Head {
                generation: inner.generation,
                next: inner.next,
            };
            (head, woken)
        };
        // A permit is kept for a watcher not waiting yet: none is missed.
        woken.iter().for_each(|w| w.notify_one());
        self.head.send_replace(head);
    }

    /// The state was replaced (a snapshot install, a rebase): nothing before
    /// `next_index` can be served any more, and every cursor made before
    /// this ends ([`WatchHub::read`] answers [`Compacted`]).
    pub fn reset(&self, next_index: u64) {
        let (head, woken) = {
            let mut inner = self.inner.lock();
            inner.records.clear();
            inner.bytes = 0;
            inner.total = 0;
            inner.oldest = next_index;
            inner.next = next_index;
            inner.generation += 1;
            let woken: Vec<_> = inner.interests.values().map(|i| i.wake.clone()).collect();
            let head = Head {
                generation: inner.generation,
                next: inner.next,
            };
            (head, woken)
        };
        // Every watcher learns that it has ended.
        woken.iter().for_each(|w| w.notify_one());
        self.head.send_replace(head);
    }

    /// How many resets there have been: a cursor of an older generation is
    /// ended.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// The first index that can be streamed (nothing held yet: the next).
    pub fn oldest(&self) -> u64 {
        self.inner.lock().oldest
    }

    /// The last index published (0: none).
    pub fn last(&self) -> u64 {
        self.inner.lock().next - 1
    }

    /// Bytes (by [`cost`]) held now.
    pub fn held_bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// A cursor at `from`, which may be ahead of what is published (it
    /// waits), or [`Compacted`] when `from` is no longer held.
    pub fn cursor(&self, from: u64) -> Result<Cursor, Compacted> {
        let inner = self.inner.lock();
        if from < inner.oldest {
            return Err(Compacted {
                oldest: inner.oldest,
            });
        }
        Ok(Cursor {
            generation: inner.generation,
            next: from,
        })
    }

    /// The records from `cursor` on, at most `max_records` of them and
    /// fewer once their costs reach `max_bytes` (at least one), and moves
    /// the cursor past them (past the head, when it reads to the head).
    /// [`Compacted`] once the cursor's next record is gone, or a reset came
    /// after it was made.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<RecordEvents>>, Compacted> {
        self.inner.lock().read(cursor, max_records, max_bytes)
    }

    /// What is held from index `from` to the head, or [`Compacted`] when
    /// `from` is no longer held.
    pub fn lag(&self, from: u64) -> Result<Lag, Compacted> {
        let inner = self.inner.lock();
        if from < inner.oldest {
            return Err(Compacted {
                oldest: inner.oldest,
            });
        }
        Ok(inner.lag(from))
    }

    /// A watcher of `range` from index `from` (`None`: from the next record
    /// published), or [`Compacted`] when `from` is no longer held.
    pub fn watch(
        self: &Arc<Self>,
        range: KeyRange,
        from: Option<u64>,
    ) -> Result<Watcher, Compacted> {
        let mut inner = self.inner.lock();
        let from = from.unwrap_or(inner.next);
        if from < inner.oldest {
            return Err(Compacted {
                oldest: inner.oldest,
            });
        }
        let id = inner.next_interest;
        inner.next_interest += 1;
        let wake = Arc::new(Notify::new());
        let interest = Interest {
            range,
            // History to read: looked at once, by the first read.
            first_match: (from < inner.next).then_some(from),
            wake: wake.clone(),
        };
        inner.interests.insert(id, interest);
        Ok(Watcher {
            hub: self.clone(),
            id,
            cursor: Cursor {
                generation: inner.generation,
                next: from,
            },
            wake,
        })
    }

    /// Open watchers.
    pub fn watchers(&self) -> usize {
        self.inner.lock().interests.len()
    }

    /// Follows the head, which every publish and every reset moves.
    pub fn subscribe(&self) -> watch::Receiver<Head> {
        self.head.subscribe()
    }
}

/// A cursor over the records with events in one range, woken only by
/// those; it leaves the hub when dropped.
pub struct Watcher {
    hub: Arc<WatchHub>,
    id: u64,
    cursor: Cursor,
    wake: Arc<Notify>,
}

impl Watcher {
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// As [`WatchHub::read`], but a record with no event in the range may
    /// be skipped unread, and is when no record after the cursor has one:
    /// the cursor then moves to the head, however far behind it was.
    /// [`Compacted`] once a record in the range is gone before it was read.
    pub fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<RecordEvents>>, Compacted> {
        let mut inner = self.hub.inner.lock();
        let first_match = inner.interests.get(&self.id).and_then(|i| i.first_match);
        if self.cursor.generation == inner.generation {
            match first_match {
                None => {
                    self.cursor.next = self.cursor.next.max(inner.next);
                    return Ok(Vec::new());
                }
                Some(m) => self.cursor.next = self.cursor.next.max(m),
            }
        }
        let out = inner.read(&mut self.cursor, max_records, max_bytes)?;
        let rest = (self.cursor.next < inner.next).then_some(self.cursor.next);
        if let Some(i) = inner.interests.get_mut(&self.id) {
            i.first_match = rest;
        }
        Ok(out)
    }

    /// Resolves once a record in the range is published after the last
    /// read, or a reset ends this watcher (and, rarely, for nothing: a
    /// read then finds nothing). Cancel-safe.
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.hub.inner.lock().interests.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, EventKind, KeyMeta};
    use bytes::Bytes;

    fn put(key: &str, value: &str) -> Event {
        Event {
            kind: EventKind::Put,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            prev: None,
            meta: KeyMeta::default(),
        }
    }

    fn record(index: u64, events: Vec<Event>) -> RecordEvents {
        RecordEvents {
            index,
            ts: Default::default(),
            events,
        }
    }

    fn indexes(records: &[Arc<RecordEvents>]) -> Vec<u64> {
        records.iter().map(|r| r.index).collect()
    }

    #[test]
    fn the_cost_counts_keys_values_and_a_fixed_part() {
        let mut e = put("ab", "xyz");
        e.prev = Some(Bytes::from_static(b"1234"));
        assert_eq!(cost(&record(1, vec![])), RECORD_COST);
        assert_eq!(
            cost(&record(1, vec![e, put("k", "")])),
            RECORD_COST + (2 + 3 + 4 + EVENT_COST) + (1 + EVENT_COST)
        );
    }

    #[test]
    fn records_are_read_in_log_order_from_any_index_held() {
        let hub = WatchHub::new();
        assert_eq!((hub.oldest(), hub.last()), (1, 0));
        for i in 1..=5 {
            hub.publish(record(i, vec![put("k", "v")]));
        }
        assert_eq!((hub.oldest(), hub.last()), (1, 5));
        let mut c = hub.cursor(3).unwrap();
        assert_eq!(
            indexes(&hub.read(&mut c, 100, usize::MAX).unwrap()),
            [3, 4, 5]
        );
        assert_eq!(c.next(), 6);
        assert!(hub.read(&mut c, 100, usize::MAX).unwrap().is_empty());
        let mut c = hub.cursor(1).unwrap();
        assert_eq!(indexes(&hub.read(&mut c, 2, usize::MAX).unwrap()), [1, 2]);
        assert_eq!(c.next(), 3);
        assert_eq!(indexes(&hub.read(&mut c, 100, 1).unwrap()), [3], "bytes");
    }

    #[test]
    fn missing_indexes_are_records_without_events() {
        let hub = WatchHub::new();
        hub.publish(record(1, vec![]));
        hub.publish(record(4, vec![put("k", "v")]));
        let mut c = hub.cursor(2).unwrap();
        assert_eq!(indexes(&hub.read(&mut c, 10, usize::MAX).unwrap()), [4]);
        let mut c = hub.cursor(5).unwrap();
        assert!(hub.read(&mut c, 10, usize::MAX).unwrap().is_empty());
        assert_eq!(c.next(), 5);
        hub.publish(record(3, vec![]));
        assert_eq!(hub.last(), 4, "out of order: dropped");
    }

    #[test]
    fn a_cursor_ahead_of_the_head_waits_there() {
        let hub = WatchHub::new();
        hub.publish(record(1, vec![]));
        let mut c = hub.cursor(4).unwrap();
        assert!(hub.read(&mut c, 10, usize::MAX).unwrap().is_empty());
        assert_eq!(c.next(), 4, "never moves back");
        hub.publish(record(2, vec![]));
        hub.publish(record(3, vec![]));
        hub.publish(record(4, vec![]));
        assert_eq!(indexes(&hub.read(&mut c, 10, usize::MAX).unwrap()), [4]);
    }

    #[test]
    fn the_oldest_records_go_first_to_keep_the_budget() {
        let hub = WatchHub::new();
        let one = cost(&record(1, vec![put("k", "v")]));
        hub.set_budget(3 * one);
        for i in 1..=10 {
            hub.publish(record(i, vec![put("k", "v")]));
            assert!(hub.held_bytes() <= 3 * one);
        }
        assert_eq!((hub.oldest(), hub.last()), (8, 10));
        assert_eq!(hub.cursor(7), Err(Compacted { oldest: 8 }));
        let mut c = hub.cursor(8).unwrap();
        assert_eq!(
            indexes(&hub.read(&mut c, 10, usize::MAX).unwrap()),
            [8, 9, 10]
        );
    }

    #[test]
    fn a_reader_left_behind_by_eviction_is_told_where_the_hub_starts() {
        let hub = WatchHub::new();
        let one = cost(&record(1, vec![put("k", "v")]));
        hub.set_budget(2 * one);
        hub.publish(record(1, vec![put("k", "v")]));
        let mut c = hub.cursor(1).unwrap();
        for i in 2..=4 {
            hub.publish(record(i, vec![put("k", "v")]));
        }
        assert_eq!(
            hub.read(&mut c, 10, usize::MAX),
            Err(Compacted { oldest: 3 })
        );
        assert_eq!(hub.lag(1), Err(Compacted { oldest: 3 }));
    }

    #[test]
    fn a_record_over_the_budget_is_kept_until_the_next() {
        let hub = WatchHub::new();
        hub.set_budget(10);
        hub.publish(record(1, vec![put("k", &"x".repeat(100))]));
        assert_eq!((hub.oldest(), hub.last()), (1, 1));
        hub.publish(record(2, vec![]));
        assert_eq!((hub.oldest(), hub.last()), (2, 2));
        assert!(hub.held_bytes() <= RECORD_COST);
    }

    #[test]
    fn a_reset_ends_every_cursor_and_starts_at_its_index() {
        let hub = WatchHub::new();
        for i in 1..=3 {
            hub.publish(record(i, vec![put("k", "v")]));
        }
        let mut behind = hub.cursor(2).unwrap();
        let mut ahead = hub.cursor(50).unwrap();
        hub.reset(40);
        assert_eq!((hub.oldest(), hub.last()), (40, 39));
        assert_eq!(
            hub.read(&mut behind, 10, usize::MAX),
            Err(Compacted { oldest: 40 })
        );
        assert_eq!(
            hub.read(&mut ahead, 10, usize::MAX),
            Err(Compacted { oldest: 40 })
        );
        assert_eq!(hub.cursor(39), Err(Compacted { oldest: 40 }));
        hub.publish(record(40, vec![]));
        let mut c = hub.cursor(40).unwrap();
        assert_eq!(indexes(&hub.read(&mut c, 10, usize::MAX).unwrap()), [40]);
    }

    #[test]
    fn lag_is_what_is_held_from_an_index_to_the_head() {
        let hub = WatchHub::new();
        let one = cost(&record(1, vec![put("k", "v")])) as u64;
        for i in 1..=4 {
            hub.publish(record(i, vec![put("k", "v")]));
        }
        assert_eq!(
            hub.lag(1),
            Ok(Lag {
                bytes: 4 * one,
                records: 4
            })
        );
        assert_eq!(
            hub.lag(3),
            Ok(Lag {
                bytes: 2 * one,
                records: 2
            })
        );
        assert_eq!(hub.lag(5), Ok(Lag::default()));
        assert_eq!(hub.lag(9), Ok(Lag::default()));
        hub.set_budget(2 * one as usize);
        assert_eq!(
            hub.lag(3),
            Ok(Lag {
                bytes: 2 * one,
                records: 2
            }),
            "after eviction"
        );
    }

    fn range(prefix: &str) -> KeyRange {
        KeyRange::prefix(prefix.as_bytes())
    }

    async fn woken(w: &Watcher) -> bool {
        tokio::time::timeout(std::time::Duration::from_millis(50), w.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_watcher_wakes_only_for_records_in_its_range_and_skips_the_rest() {
        let hub = Arc::new(WatchHub::new());
        let mut w = hub.watch(range("a/"), None).unwrap();
        assert_eq!(hub.watchers(), 1);
        hub.publish(record(1, vec![put("b/1", "x")]));
        hub.publish(record(2, vec![]));
        assert!(!woken(&w).await, "nothing in a/ yet");
        let none = w.read(READ, BYTES).unwrap();
        assert!(none.is_empty());
        assert_eq!(w.cursor().next(), 3, "skipped to the head unread");
        hub.publish(record(3, vec![put("b/2", "x")]));
        hub.publish(record(4, vec![put("b/3", "x"), put("a/1", "y")]));
        hub.publish(record(5, vec![put("a/2", "y")]));
        assert!(woken(&w).await, "4 is in a/");
        assert_eq!(indexes(&w.read(READ, BYTES).unwrap()), vec![4, 5]);
        assert_eq!(w.cursor().next(), 6);
        drop(w);
        assert_eq!(hub.watchers(), 0, "a dropped watcher leaves the hub");
    }

    #[test]
    fn a_watcher_reads_its_history_first_in_as_many_reads_as_it_takes() {
        let hub = Arc::new(WatchHub::new());
        hub.publish(record(1, vec![put("a/1", "x")]));
        hub.publish(record(2, vec![put("b/1", "x")]));
        hub.publish(record(3, vec![put("a/2", "x")]));
        let mut w = hub.watch(range("a/"), Some(1)).unwrap();
        assert_eq!(indexes(&w.read(1, BYTES).unwrap()), vec![1]);
        assert_eq!(indexes(&w.read(2, BYTES).unwrap()), vec![2, 3]);
        assert!(w.read(READ, BYTES).unwrap().is_empty());
        assert_eq!(w.cursor().next(), 4);
        assert!(
            hub.watch(range("a/"), Some(0)).is_err(),
            "0 is before the oldest"
        );
    }

    #[test]
    fn eviction_ends_a_watcher_only_when_it_took_a_record_in_its_range() {
        let hub = Arc::new(WatchHub::new());
        hub.set_budget(2 * cost(&record(0, vec![put("b/1", "x")])));
        let mut quiet = hub.watch(range("a/"), None).unwrap();
        let mut behind = hub.watch(range("b/"), None).unwrap();
        for i in 1..=10 {
            hub.publish(record(i, vec![put("b/1", "x")]));
        }
        assert!(hub.oldest() > 1);
        assert!(quiet.read(READ, BYTES).unwrap().is_empty());
        assert_eq!(quiet.cursor().next(), 11, "nothing of a/ was evicted");
        assert_eq!(
            behind.read(READ, BYTES),
            Err(Compacted {
                oldest: hub.oldest()
            })
        );
    }

    #[tokio::test]
    async fn a_reset_wakes_and_ends_every_watcher() {
        let hub = Arc::new(WatchHub::new());
        let mut w = hub.watch(range("a/"), None).unwrap();
        hub.reset(10);
        assert!(woken(&w).await);
        assert_eq!(w.read(READ, BYTES), Err(Compacted { oldest: 10 }));
    }

    const READ: usize = 64;
    const BYTES: usize = 1 << 20;
}
