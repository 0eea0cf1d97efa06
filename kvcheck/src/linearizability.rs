//! A linearizability checker for per-key registers (the judge of a chaos
//! run: `kvsup chaos` and the chaos tests).
//!
//! A history is a list of operations, each with the time it was called and
//! the time its answer came back. Keys are independent registers, so each
//! key's sub-history is checked on its own (linearizability is local). For
//! one key this is the Wing–Gong search with Lowe's memoisation, as in
//! Porcupine: walk the events in time order, try to linearize each pending
//! call before the first return that is still outstanding, backtrack when a
//! return is reached whose operation could not be placed, and never revisit
//! a (set of linearized operations, register value) pair.
//!
//! An operation whose outcome is unknown (a write that timed out or lost its
//! connection) may or may not have happened: it gets a return time of
//! "never", so it may be linearized anywhere after its call, or not at all.
//! Written values must be unique, so a read names the write it saw. A bulk
//! write is one write per key it touches (same call and return times); a
//! delete empties the register, and its answer ("was the key there?") is
//! checked too. A compare-and-set writes only if the register holds the
//! value its client read (a conditional write with `If-Match` on the
//! `mod_index` it read: with unique values, the same condition); one
//! refused with 412 says the register held something else.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// What one operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Wrote a unique value id (> 0).
    Write(u64),
    /// Deleted the key; `existed` is the answer's "the key was there"
    /// (`None` when no answer came).
    Delete { existed: Option<bool> },
    /// Read: `None` for "absent", else the value id seen.
    Read(Option<u64>),
    /// Compare-and-set: write `new` if the register holds `expected`
    /// (`None`: absent, `If-None-Match: *`). `ok` is the answer: done,
    /// refused because the register held something else (412), or
    /// `None` when no answer came.
    Cas {
        expected: Option<u64>,
        new: u64,
        ok: Option<bool>,
    },
}

impl Kind {
    /// The register after this operation takes effect on `state`, or
    /// `None` if it cannot take effect there (a read that saw something
    /// else, a delete whose answer contradicts `state`).
    fn step(self, state: Option<u64>) -> Option<Option<u64>> {
        match self {
            Kind::Write(v) => Some(Some(v)),
            Kind::Delete { existed } => {
                existed.is_none_or(|e| e == state.is_some()).then_some(None)
            }
            Kind::Read(seen) => (seen == state).then_some(state),
            // An unanswered one that did not write is the same as one that
            // never happened, which the search allows (`only_unknown_left`),
            // so it is placed only where it writes: fewer choices.
            Kind::Cas { expected, new, ok } => match (ok, state == expected) {
                (Some(true) | None, true) => Some(Some(new)),
                (Some(false), false) => Some(state),
                _ => None,
            },
        }
    }

    /// Whether the operation leaves the register as it was wherever it can
    /// take effect (a read, a refused compare-and-set, a delete that found
    /// nothing). Such an operation, once it can be placed, may be placed
    /// at once: any order that places it later stays valid with it moved
    /// there (it changes no state, and everything that returned before
    /// its call is placed already). Without this, a history with many
    /// concurrent refusals makes the search try every subset of them.
    fn read_only(self) -> bool {
        matches!(
            self,
            Kind::Read(_)
                | Kind::Cas {
                    ok: Some(false),
                    ..
                }
                | Kind::Delete {
                    existed: Some(false)
                }
        )
    }

    /// The value this operation shows the register held before it (a read
    /// of a value, a compare-and-set's expected value).
    fn observed(self) -> Option<u64> {
        match self {
            Kind::Read(seen) => seen,
            Kind::Cas { expected, .. } => expected,
            Kind::Write(_) | Kind::Delete { .. } => None,
        }
    }

    /// Whether the answer shows the register holding a particular state
    /// (a read, a compare-and-set that wrote).
    fn sees_a_state(self) -> bool {
        matches!(self, Kind::Read(_) | Kind::Cas { ok: Some(true), .. })
    }

    /// The value this operation writes, if it writes one.
    fn written(self) -> Option<u64> {
        match self {
            Kind::Write(v) | Kind::Cas { new: v, .. } => Some(v),
            Kind::Delete { .. } | Kind::Read(_) => None,
        }
    }

    /// Whether this answer needs the register present (`true`) or absent
    /// (`false`) at some moment an operation of unknown outcome could
    /// explain: a delete that found the key or found nothing, a read of
    /// nothing, a compare-and-set refused (the register held another
    /// value: any write explains that, and a delete does when it expected
    /// a value) or done on an absent key.
    fn needs(self, present: bool) -> bool {
        match self {
            Kind::Read(seen) => !present && seen.is_none(),
            Kind::Delete { existed } => existed == Some(present),
            Kind::Write(_) => false,
            Kind::Cas { expected, ok, .. } => match ok {
                Some(false) => present || expected.is_some(),
                Some(true) => !present && expected.is_none(),
                None => false,
            },
        }
    }
}

/// One entry of a history (a line of a saved history, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub key: String,
    pub kind: Kind,
    /// Nanoseconds since a common start.
    pub call: u64,
    /// When the answer came; `None` if unknown whether it took effect
    /// (only meaningful for writes; failed reads are simply left out).
    pub ret: Option<u64>,
    /// Who issued it (for messages).
    pub client: usize,
}

/// The verdict for a whole history.
#[derive(Debug, Default)]
pub struct Report {
    pub keys: usize,
    pub operations: usize,
    /// Keys whose history is not linearizable, with a reason.
    pub violations: Vec<String>,
    /// Keys whose search hit the step limit (undecided: treated as failure).
    pub undecided: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.undecided.is_empty()
    }
}

/// Search steps allowed per key before giving up (under a second, even in a
/// debug build).
const STEP_LIMIT: u64 = 5_000_000;
/// A long history of one key (a hot counter) gets this many steps per
/// operation if that is more: a history the search walks through without
/// backtracking takes a few steps per operation.
const STEPS_PER_OPERATION: u64 = 64;

/// A pseudo-random 128-bit tag for operation `i` (splitmix64, twice).
fn tag(i: u64) -> u128 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    (u128::from(mix(2 * i)) << 64) | u128::from(mix(2 * i + 1))
}

/// Checks every key's history on its own; a key whose search needs more
/// than [`STEP_LIMIT`] steps (or [`STEPS_PER_OPERATION`] per operation) is
/// reported undecided, which fails the report.
pub fn check(history: &[Operation]) -> Report {
    let mut by_key: HashMap<&str, Vec<&Operation>> = HashMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut report = Report {
        keys: by_key.len(),
        operations: history.len(),
        ..Report::default()
    };
    let mut keys: Vec<_> = by_key.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (key, ops) in keys {
        match check_register(&prune_unknown(&ops)) {
            Verdict::Linearizable => {}
            Verdict::Violation(why) => report.violations.push(format!("{key}: {why}")),
            Verdict::Undecided => report.undecided.push(key.to_string()),
        }
    }
    report
}

/// Leaves out the operations of unknown outcome that could explain
/// nothing: they may not have happened, so leaving them out is one of the
/// orders the search would try anyway, and keeping them makes it try every
/// subset of them, which is what makes it explode. A write explains only a
/// later read of its value (values are unique), a later compare-and-set
/// that expected it, or a later answer that needs the key present (a
/// delete that found it, a refused compare-and-set); a delete explains
/// only a later "absent" (a read of nothing, a delete that found nothing,
/// a refused compare-and-set that expected a value). One after whose call
/// no such answer came explains nothing.
///
/// Where nothing overwrites the key after a write's call (no other write
/// or delete), a write whose value nobody saw can only have taken effect
/// at a point after which every answer is a refused compare-and-set:
/// any read, or any compare-and-set that wrote, would have seen its value.
/// It explains a refusal then only if no such answer was called after
/// the refusal returned (that answer would come after the write too).
fn prune_unknown<'a>(ops: &[&'a Operation]) -> Vec<&'a Operation> {
    let observed: HashSet<u64> = ops.iter().filter_map(|o| o.kind.observed()).collect();
    // The last return of an answer that needs the key present, or absent.
    let last_return = |present: bool| {
        ops.iter()
            .filter(|o| o.kind.needs(present))
            .filter_map(|o| o.ret)
            .max()
    };
    let (last_present, last_absent) = (last_return(true), last_return(false));
    let explains = |last: Option<u64>, o: &Operation| last.is_some_and(|r| r >= o.call);
    let overwrites = Overwrites::of(ops);
    // The last call of an answer that saw the register hold a value.
    let last_seen = ops
        .iter()
        .filter(|o| o.ret.is_some() && o.kind.sees_a_state())
        .map(|o| o.call)
        .max()
        .unwrap_or(0);
    let last_late_refusal = ops
        .iter()
        .filter(|o| {
            matches!(
                o.kind,
                Kind::Cas {
                    ok: Some(false),
                    ..
                }
            )
        })
        .filter_map(|o| o.ret)
        .filter(|&r| r >= last_seen)
        .max();
    ops.iter()
        .copied()
        .filter(|o| match (o.kind, o.ret) {
            (Kind::Write(v) | Kind::Cas { new: v, .. }, None) => {
                observed.contains(&v)
                    || if overwrites.after(o) {
                        explains(last_present, o)
                    } else {
                        explains(last_late_refusal, o)
                    }
            }
            (Kind::Delete { .. }, None) => explains(last_absent, o),
            _ => true,
        })
        .collect()
}

/// The writes and deletes of a key's history: the last return of one with
/// an answer, and how many have none.
struct Overwrites {
    last_return: Option<u64>,
    unknown: usize,
}

impl Overwrites {
    fn of(ops: &[&Operation]) -> Overwrites {
        let all = || {
            ops.iter()
                .filter(|o| matches!(o.kind, Kind::Write(_) | Kind::Delete { .. }))
        };
        Overwrites {
            last_return: all().filter_map(|o| o.ret).max(),
            unknown: all().filter(|o| o.ret.is_none()).count(),
        }
    }

    /// Whether a write or delete other than `o` may come after `o`'s call.
    fn after(&self, o: &Operation) -> bool {
        let own = usize::from(o.ret.is_none() && matches!(o.kind, Kind::Write(_)));
        self.unknown > own || self.last_return.is_some_and(|r| r >= o.call)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    Violation(String),
    Undecided,
}

const NIL: usize = usize::MAX;

struct Event {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    partner: usize,
    prev: usize,
    next: usize,
}

fn check_register(ops: &[&Operation]) -> Verdict {
    if let Some(violation) = read_of_an_unwritten_value(ops) {
        return violation;
    }
    search(ops, event_list(ops))
}

/// A read of a value nobody wrote can never be explained (nor a
/// compare-and-set that expected one).
fn read_of_an_unwritten_value(ops: &[&Operation]) -> Option<Verdict> {
    let written: HashSet<u64> = ops.iter().filter_map(|o| o.kind.written()).collect();
    for o in ops {
        if let Some(v) = o.kind.observed() {
            if !written.contains(&v) {
                return Some(Verdict::Violation(format!(
                    "client {}'s {:?} saw value {v}, which no operation wrote",
                    o.client, o.kind
                )));
            }
        }
    }
    None
}

/// The calls and returns of `ops` as a doubly linked list in time order,
/// each call knowing its return; index 0 is the list head (a sentinel).
fn event_list(ops: &[&Operation]) -> Vec<Event> {
    // Events in time order; at equal times calls come first (operations
    // touching at an instant are concurrent, not ordered).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.call, 0, i));
        order.push((o.ret.unwrap_or(u64::MAX), 1, i));
    }
    order.sort_unstable();
    let mut ev: Vec<Event> = Vec::with_capacity(order.len() + 1);
    ev.push(Event {
        op: NIL,
        is_call: false,
        partner: NIL,
        prev: NIL,
        next: 1,
    });
    let mut ret_at = vec![NIL; ops.len()];
    for (pos, &(_, kind, op)) in order.iter().enumerate() {
        let idx = pos + 1;
        ev.push(Event {
            op,
            is_call: kind == 0,
            partner: NIL,
            prev: idx - 1,
            next: if pos + 1 < order.len() { idx + 1 } else { NIL },
        });
        if kind == 1 {
            ret_at[op] = idx;
        }
    }
    if order.is_empty() {
        ev[0].next = NIL;
    }
    for e in ev.iter_mut().skip(1) {
        if e.is_call {
            e.partner = ret_at[e.op];
        }
    }
    ev
}

/// The Wing–Gong search over the event list `ev` of `ops`.
fn search(ops: &[&Operation], mut ev: Vec<Event>) -> Verdict {
    // The set of linearized operations is kept as a 128-bit XOR of random
    // per-operation tags: the memo key costs no allocation, and two
    // different sets collide with probability about 2^-128 per pair.
    let tags: Vec<u128> = (0..ops.len() as u64).map(tag).collect();
    let mut linearized: u128 = 0;
    let mut state: Option<u64> = None;
    let mut cache: HashSet<(u128, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut entry = ev[0].next;
    let mut steps = 0u64;
    let step_limit = STEP_LIMIT.max(STEPS_PER_OPERATION * ops.len() as u64);
    let mut deepest = 0usize;
    // The return event at which the deepest explainable prefix got stuck:
    // where the history stops making sense.
    let mut stuck_at = NIL;

    // Operations with an answer still to place: once none is left, the
    // rest (of unknown outcome) may simply not have happened.
    let mut answered_left = ops.iter().filter(|o| o.ret.is_some()).count();

    while answered_left > 0 {
        steps += 1;
        if steps > step_limit {
            return Verdict::Undecided;
        }
        if entry == NIL {
            // Cannot happen: every call has a return event after it.
            return Verdict::Violation("internal: ran off the event list".into());
        }
        let e = &ev[entry];
        if e.is_call {
            if let Some(ns) = ops[e.op].kind.step(state) {
                let bits = linearized ^ tags[e.op];
                if cache.insert((bits, ns)) {
                    stack.push((entry, state));
                    deepest = deepest.max(stack.len());
                    state = ns;
                    linearized = bits;
                    answered_left -= usize::from(ops[e.op].ret.is_some());
                    let partner = e.partner;
                    unlink(&mut ev, entry);
                    unlink(&mut ev, partner);
                    entry = ev[0].next;
                    continue;
                }
            }
            entry = ev[entry].next;
        } else {
            // An operation returned before we could place it: undo the
            // latest choice and try the next candidate after it. A
            // read-only operation was placed as soon as it could be, which
            // is never worse than later ([`Kind::read_only`]): its place
            // has no alternative, so the choice before it is undone too.
            if stack.len() >= deepest {
                stuck_at = ev[entry].op;
            }
            loop {
                let Some((call, prev_state)) = stack.pop() else {
                    let stuck = if stuck_at == NIL {
                        ev[entry].op
                    } else {
                        stuck_at
                    };
                    return violation(ops, ops[stuck], deepest);
                };
                state = prev_state;
                let op = ev[call].op;
                linearized ^= tags[op];
                answered_left += usize::from(ops[op].ret.is_some());
                let partner = ev[call].partner;
                relink(&mut ev, partner);
                relink(&mut ev, call);
                entry = ev[call].next;
                if !ops[op].kind.read_only() {
                    break;
                }
            }
        }
    }
    Verdict::Linearizable
}

fn violation(ops: &[&Operation], op: &Operation, deepest: usize) -> Verdict {
    Verdict::Violation(format!(
        "after the longest explainable prefix ({deepest} operations), no order \
         explains client {}'s {:?} (called at {} ns, returned at {:?}); \
         around it: {}",
        op.client,
        op.kind,
        op.call,
        op.ret,
        neighbourhood(ops, op)
    ))
}

fn unlink(ev: &mut [Event], i: usize) {
    let (p, n) = (ev[i].prev, ev[i].next);
    ev[p].next = n;
    if n != NIL {
        ev[n].prev = p;
    }
}
fn relink(ev: &mut [Event], i: usize) {
    let (p, n) = (ev[i].prev, ev[i].next);
    ev[p].next = i;
    if n != NIL {
        ev[n].prev = i;
    }
}

/// What a reader of a violation needs: the operations concurrent with
/// `op`, and the last few that ended before it began, in call order.
fn neighbourhood(ops: &[&Operation], op: &Operation) -> String {
    let ends = |o: &Operation| o.ret.unwrap_or(u64::MAX);
    let mut before: Vec<&Operation> = ops.iter().copied().filter(|o| ends(o) < op.call).collect();
    before.sort_by_key(|o| ends(o));
    let mut shown: Vec<&Operation> = before.into_iter().rev().take(5).collect();
    shown.extend(
        ops.iter()
            .copied()
            .filter(|o| ends(o) >= op.call && o.call <= ends(op)),
    );
    shown.sort_by_key(|o| o.call);
    // One of unknown outcome overlaps everything after its call.
    let more = shown.len().saturating_sub(NEIGHBOURS_SHOWN);
    shown.truncate(NEIGHBOURS_SHOWN);
    let line = |o: &&Operation| {
        let ret = o.ret.map_or("unknown".to_string(), |r| r.to_string());
        format!("[client {} {:?} {}..{ret}]", o.client, o.kind, o.call)
    };
    let mut text = shown.iter().map(line).collect::<Vec<_>>().join(" ");
    if more > 0 {
        text.push_str(&format!(" ... and {more} more"));
    }
    text
}

/// How many operations a violation's message shows around it.
const NEIGHBOURS_SHOWN: usize = 40;

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: Kind, call: u64, ret: Option<u64>) -> Operation {
        Operation {
            key: "k".into(),
            kind,
            call,
            ret,
            client,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, Kind::Read(None), 0, Some(1)),
            op(0, Kind::Write(1), 2, Some(3)),
            op(1, Kind::Read(Some(1)), 4, Some(5)),
            op(0, Kind::Write(2), 6, Some(7)),
            op(1, Kind::Read(Some(2)), 8, Some(9)),
        ];
        assert!(check(&h).ok());
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_a_violation() {
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(0, Kind::Write(2), 2, Some(3)),
            op(1, Kind::Read(Some(1)), 4, Some(5)),
        ];
        let r = check(&h);
        assert_eq!(r.violations.len(), 1, "{r:?}");
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(1, Kind::Read(None), 2, Some(3)),
        ];
        assert!(!check(&h).ok());
    }

    #[test]
    fn concurrent_operations_may_go_either_way() {
        let h = vec![
            op(0, Kind::Write(1), 0, Some(10)),
            op(1, Kind::Read(Some(1)), 1, Some(2)),
            op(2, Kind::Read(None), 3, Some(4)),
        ];
        // Read(None) after a read that saw 1, both inside the write: no.
        assert!(!check(&h).ok());
        let h = vec![
            op(0, Kind::Write(1), 0, Some(10)),
            op(2, Kind::Read(None), 1, Some(2)),
            op(1, Kind::Read(Some(1)), 3, Some(4)),
        ];
        assert!(check(&h).ok());
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_happen() {
        let seen = vec![
            op(0, Kind::Write(1), 0, None),
            op(1, Kind::Read(Some(1)), 50, Some(60)),
        ];
        assert!(check(&seen).ok());
        let unseen = vec![
            op(0, Kind::Write(1), 0, None),
            op(1, Kind::Read(None), 50, Some(60)),
        ];
        assert!(check(&unseen).ok());
        // But once seen it cannot be unseen.
        let flicker = vec![
            op(0, Kind::Write(1), 0, None),
            op(1, Kind::Read(Some(1)), 50, Some(60)),
            op(1, Kind::Read(None), 70, Some(80)),
        ];
        assert!(!check(&flicker).ok());
    }

    fn delete(existed: Option<bool>) -> Kind {
        Kind::Delete { existed }
    }

    #[test]
    fn a_delete_empties_the_register() {
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(0, delete(Some(true)), 2, Some(3)),
            op(1, Kind::Read(None), 4, Some(5)),
        ];
        assert!(check(&h).ok());
        // The key comes back after an acknowledged delete: a violation.
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(0, delete(Some(true)), 2, Some(3)),
            op(1, Kind::Read(Some(1)), 4, Some(5)),
        ];
        assert_eq!(check(&h).violations.len(), 1);
    }

    #[test]
    fn a_deletes_answer_must_match_the_register() {
        // "Nothing was there" right after an acknowledged write.
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(1, delete(Some(false)), 2, Some(3)),
        ];
        assert!(!check(&h).ok());
        // "Something was there" on a key never written.
        let h = vec![op(0, delete(Some(true)), 0, Some(1))];
        assert!(!check(&h).ok());
        // Concurrent with the write, either answer has an order.
        for existed in [true, false] {
            let h = vec![
                op(0, Kind::Write(1), 0, Some(10)),
                op(1, delete(Some(existed)), 1, Some(2)),
                op(2, Kind::Read(None), 11, Some(12)),
            ];
            let r = check(&h);
            assert_eq!(r.ok(), existed, "existed: {existed}: {r:?}");
        }
    }

    #[test]
    fn deletes_of_unknown_outcome_may_or_may_not_happen() {
        let acked = op(0, Kind::Write(1), 0, Some(1));
        let unknown = op(0, delete(None), 2, None);
        for seen in [None, Some(1)] {
            let h = vec![
                acked.clone(),
                unknown.clone(),
                op(1, Kind::Read(seen), 50, Some(60)),
            ];
            assert!(check(&h).ok(), "{seen:?}");
        }
        // A write nobody read can still be what a delete found.
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(0, delete(Some(true)), 2, Some(3)),
            op(1, Kind::Write(2), 4, None),
            op(0, delete(Some(true)), 50, Some(60)),
        ];
        assert!(check(&h).ok());
        // Once it took effect, the old value cannot come back.
        let flicker = vec![
            acked,
            unknown,
            op(1, Kind::Read(None), 50, Some(60)),
            op(1, Kind::Read(Some(1)), 70, Some(80)),
        ];
        assert!(!check(&flicker).ok());
    }

    /// 20 concurrent writes, then two reads after all of them returned that
    /// see different values: not linearizable, but refuting it means
    /// trying every subset of the writes (about 10^7 search states, twice
    /// the step limit; under a second in a debug build).
    fn history_needing_an_exhaustive_search() -> Vec<Operation> {
        let mut h: Vec<Operation> = (1..=20)
            .map(|v| op(v as usize, Kind::Write(v), 0, Some(1000)))
            .collect();
        h.push(op(0, Kind::Read(Some(1)), 1001, Some(1002)));
        h.push(op(0, Kind::Read(Some(2)), 1003, Some(1004)));
        h
    }

    #[test]
    fn a_search_past_its_step_limit_is_undecided_and_fails_the_check() {
        let r = check(&history_needing_an_exhaustive_search());
        assert_eq!(r.undecided, ["k"], "{r:?}");
        assert!(r.violations.is_empty(), "{r:?}");
        assert!(!r.ok(), "an undecided key must fail the check");
        // The same shape, small enough to search fully, is a violation.
        let mut small = history_needing_an_exhaustive_search();
        small.retain(|o| !matches!(o.kind, Kind::Write(v) if v > 4));
        let r = check(&small);
        assert_eq!(r.violations.len(), 1, "{r:?}");
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let h = vec![op(0, Kind::Read(Some(9)), 0, Some(1))];
        assert!(!check(&h).ok());
    }

    #[test]
    fn many_concurrent_clients_stay_fast() {
        // 16 clients, 2000 overlapping operations on one key, all consistent
        // with writes taking effect at their call times.
        let mut h = Vec::new();
        let mut last = None;
        for i in 0..2000u64 {
            let t = i * 10;
            if i % 3 == 0 {
                h.push(op((i % 16) as usize, Kind::Write(i + 1), t, Some(t + 35)));
                last = Some(i + 1);
            } else {
                h.push(op((i % 16) as usize, Kind::Read(last), t + 1, Some(t + 30)));
            }
        }
        let r = check(&h);
        assert!(r.ok(), "{r:?}");
    }

    #[test]
    fn many_writes_of_unknown_outcome_do_not_blow_up_the_search() {
        // 16 clients, 3000 operations, every tenth write's outcome unknown
        // (a kill); the unknown ones are never read. Without pruning, each
        // subset of them would be a new search state.
        let mut h = Vec::new();
        let mut last = None;
        for i in 0..3000u64 {
            let t = i * 10;
            if i % 2 == 0 {
                let unknown = i % 20 == 0;
                h.push(op(
                    (i % 16) as usize,
                    Kind::Write(i + 1),
                    t,
                    (!unknown).then_some(t + 35),
                ));
                if !unknown {
                    last = Some(i + 1);
                }
            } else {
                h.push(op(
                    (i % 16) as usize,
                    Kind::Read(last),
                    t + 40,
                    Some(t + 45),
                ));
            }
        }
        let r = check(&h);
        assert!(r.ok(), "{r:?}");
    }
    fn cas(expected: Option<u64>, new: u64, ok: Option<bool>) -> Kind {
        Kind::Cas { expected, new, ok }
    }

    #[test]
    fn compare_and_set_increments_in_turn_are_linearizable() {
        let h = vec![
            op(0, cas(None, 1, Some(true)), 0, Some(1)),
            op(1, Kind::Read(Some(1)), 2, Some(3)),
            op(1, cas(Some(1), 2, Some(true)), 4, Some(5)),
            // Refused: the register held 2, not 1.
            op(0, cas(Some(1), 3, Some(false)), 6, Some(7)),
            op(0, cas(Some(2), 4, Some(true)), 8, Some(9)),
            op(1, Kind::Read(Some(4)), 10, Some(11)),
        ];
        let r = check(&h);
        assert!(r.ok(), "{r:?}");
        // Two racing from the same value: one wins, the other is refused.
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(1, cas(Some(1), 2, Some(true)), 2, Some(10)),
            op(2, cas(Some(1), 3, Some(false)), 3, Some(9)),
            op(0, Kind::Read(Some(2)), 11, Some(12)),
        ];
        assert!(check(&h).ok());
    }

    #[test]
    fn two_compare_and_sets_from_one_value_cannot_both_win() {
        // A lost update: both read 1 and both were told they wrote.
        for (call_b, ret_b) in [(4, 5), (1, 3)] {
            let h = vec![
                op(0, Kind::Write(1), 0, Some(1)),
                op(1, cas(Some(1), 2, Some(true)), 2, Some(3)),
                op(2, cas(Some(1), 3, Some(true)), call_b, Some(ret_b)),
            ];
            let r = check(&h);
            assert_eq!(r.violations.len(), 1, "{r:?}");
        }
    }

    #[test]
    fn a_refusal_while_the_register_held_the_expected_value_is_a_violation() {
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(1, cas(Some(1), 2, Some(false)), 2, Some(3)),
            op(0, Kind::Read(Some(1)), 4, Some(5)),
        ];
        assert!(!check(&h).ok());
        // If-None-Match: * refused on a key nobody wrote.
        let h = vec![op(1, cas(None, 2, Some(false)), 0, Some(1))];
        assert!(!check(&h).ok());
        // An unanswered write that explains the refusal makes it fine.
        let h = vec![
            op(0, Kind::Write(1), 0, Some(1)),
            op(2, Kind::Write(7), 2, None),
            op(1, cas(Some(1), 2, Some(false)), 3, Some(4)),
        ];
        assert!(check(&h).ok());
    }

    #[test]
    fn compare_and_sets_of_unknown_outcome_may_or_may_not_happen() {
        let start = op(0, Kind::Write(1), 0, Some(1));
        let lost = op(1, cas(Some(1), 2, None), 2, None);
        // Not happened: the next one still finds 1.
        let h = vec![
            start.clone(),
            lost.clone(),
            op(2, cas(Some(1), 3, Some(true)), 50, Some(60)),
        ];
        assert!(check(&h).ok());
        // Happened: the next one expected its value.
        let h = vec![
            start.clone(),
            lost.clone(),
            op(2, cas(Some(2), 3, Some(true)), 50, Some(60)),
        ];
        assert!(check(&h).ok());
        // Happened and not: its value, then the value before it again.
        let h = vec![
            start,
            lost,
            op(2, Kind::Read(Some(2)), 50, Some(60)),
            op(2, Kind::Read(Some(1)), 70, Some(80)),
        ];
        assert!(!check(&h).ok());
    }

    #[test]
    fn a_contended_counter_with_unknown_outcomes_stays_fast() {
        // 16 clients increment one counter: each round every client tries
        // from the value of the round before; one wins, one's answer is
        // lost (and it did not happen), the rest are refused.
        let mut h = Vec::new();
        let mut value = None;
        let mut id = 0;
        for round in 0..1500u64 {
            let t = round * 100;
            id += 100;
            let winner = (round % 16) as usize;
            for c in 0..16usize {
                let ok = match c {
                    c if c == winner => Some(true),
                    c if c == (winner + 1) % 16 => None,
                    _ => Some(false),
                };
                let ret = ok.map(|_| t + 50 + c as u64);
                h.push(op(c, cas(value, id + c as u64, ok), t + c as u64, ret));
            }
            value = Some(id + winner as u64);
            h.push(op(0, Kind::Read(value), t + 80, Some(t + 90)));
        }
        let r = check(&h);
        assert!(r.ok(), "{r:?}");
        // A second winner in one round (a doubled increment) is found.
        let i = h
            .iter()
            .position(|o| {
                o.call >= 15_000
                    && matches!(
                        o.kind,
                        Kind::Cas {
                            ok: Some(false),
                            ..
                        }
                    )
            })
            .unwrap();
        if let Kind::Cas { ok, .. } = &mut h[i].kind {
            *ok = Some(true);
        }
        let r = check(&h);
        assert_eq!(r.violations.len(), 1, "{:?}", r.undecided);
    }

    #[test]
    fn an_unseen_compare_and_set_of_unknown_outcome_still_explains_a_last_refusal() {
        let h = vec![
            op(0, cas(None, 1, Some(true)), 0, Some(1)),
            op(1, cas(Some(1), 2, None), 2, None),
            op(2, cas(Some(1), 3, Some(false)), 3, Some(4)),
        ];
        let r = check(&h);
        assert!(r.ok(), "{r:?}");
        // But not when a later read still sees the value it replaced.
        let mut h = h;
        h.push(op(0, Kind::Read(Some(1)), 5, Some(6)));
        assert!(!check(&h).ok());
    }
}
