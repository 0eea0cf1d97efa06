//! When kvsup elects a new primary, and whom it asks first: pure functions
//! over what the health checks last saw (no I/O, no clock), tested below.
//! The daemon gathers the [`NodeView`]s, calls [`decide`] and sends the
//! promotion requests.
//!
//! "No healthy primary in the newest epoch" is the one failure: whether the
//! primary died, froze, lost its disk, stepped down after seeing a higher
//! epoch, or never existed (a restarted cluster). The causes differ only in
//! how long kvsup waits before electing: not at all when it knows there is
//! nothing to wait for (the process exited, the storage refuses writes,
//! every node answers and none leads), the patience (`intervalMs x
//! failureThreshold`) when the primary may come back, and the patience
//! plus a grace when kvsup does not know who should be leading.
//!
//! Safety is kvd's, not this module's: a promotion succeeds only with a
//! majority of votes (docs/DESIGN.md §4), so a wrong decision here costs an election
//! or a delay, never an acknowledged write.

use std::fmt;
use std::time::Duration;

/// What the supervisor knows of one node at a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub url: String,
    /// Its process is alive.
    pub running: bool,
    /// Its last status check answered.
    pub answering: bool,
    /// Its storage takes writes (`/ready` 200, `storage_poisoned` false).
    pub ready: bool,
    /// It failed `failureThreshold` checks in a row, or is not running.
    pub failed: bool,
    /// It says it is primary (possibly of an epoch that has moved on).
    pub claims_primary: bool,
    pub epoch: u64,
    /// `(last_log_epoch, last_index)`: the most up to date wins a vote.
    pub last: (u64, u64),
}

impl NodeView {
    /// Fit to take writes, or to vote (a vote is persisted before it is
    /// granted, so a node whose storage fails cannot give one).
    pub fn healthy(&self) -> bool {
        self.running && self.answering && self.ready
    }
}

/// How long the cluster has been without a leader, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Since the last reconcile that saw a leader.
    pub without_leader: Duration,
    /// How long a primary that may come back is given (`intervalMs x
    /// failureThreshold`).
    pub patience: Duration,
    /// Added to the patience when no primary is known: one may be starting.
    pub grace: Duration,
}

/// Why an election is due (said in the failover event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The primary's process exited.
    Exited(String),
    /// The primary answers, but its storage refuses writes.
    StorageFailed(String),
    /// The primary has not answered its health checks.
    Unresponsive(String),
    /// The primary answers but leads no epoch any more (it stepped down, or
    /// a newer epoch exists), and nobody took over.
    SteppedDown(String),
    /// No primary is known and every node answers without leading (a
    /// restarted cluster, whose nodes all come back as secondaries).
    NoPrimaryAnywhere,
    /// No primary is known, and none appeared within the patience and grace.
    NoPrimarySeen,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Exited(p) => write!(f, "the primary {p} exited"),
            Cause::StorageFailed(p) => write!(f, "the primary {p}'s storage refuses writes"),
            Cause::Unresponsive(p) => write!(f, "the primary {p} failed its health checks"),
            Cause::SteppedDown(p) => write!(f, "{p} answers but leads no current epoch"),
            Cause::NoPrimaryAnywhere => write!(f, "every node answers and none is primary"),
            Cause::NoPrimarySeen => write!(f, "no primary appeared"),
        }
    }
}

/// What the reconcile loop should do about the primary.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// A healthy primary leads the newest epoch.
    Led(&'a NodeView),
    /// No leader, but not yet time to elect.
    Wait,
    /// Ask the candidates to run, in this order, until one wins.
    Elect {
        cause: Cause,
        candidates: Vec<&'a NodeView>,
    },
    /// An election is due but cannot be won: too few nodes can vote, or
    /// none can run.
    Stuck {
        cause: Cause,
        healthy: usize,
        needed: usize,
    },
}

/// Votes needed to win in a cluster of `n` nodes.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The healthy primary of the newest epoch any answering node knows. A
/// primary of an older epoch has been deposed, whether it knows yet or not.
pub fn leader(views: &[NodeView]) -> Option<&NodeView> {
    let newest = views
        .iter()
        .filter(|v| v.answering)
        .map(|v| v.epoch)
        .max()?;
    views
        .iter()
        .find(|v| v.healthy() && v.claims_primary && v.epoch == newest)
}

/// No node answers at all. Then the likeliest fault is kvsup's own (its
/// host cut off, its network down), not every node's at once: kvsup elects
/// nobody, and the wait for a leader starts over when a node answers again,
/// so that the primary has its whole patience to be seen before anyone is
/// asked to replace it. A primary that really died with its peers' links
/// is then replaced one patience after kvsup sees the others again.
/// (Nodes kvsup runs itself and saw exit are not a network fault: an exit
/// is a cause of its own.)
/// (Only nodes that failed their checks count: a node still starting has
/// not answered yet either.)
pub fn sees_no_node(views: &[NodeView]) -> bool {
    views.iter().all(|v| v.running && !v.answering && v.failed)
}

/// Decides for one reconcile, given the primary kvsup last knew (or
/// started as the bootstrap primary of a fresh cluster).
pub fn decide<'a>(views: &'a [NodeView], known: Option<&str>, t: Timing) -> Decision<'a> {
    if let Some(l) = leader(views) {
        return Decision::Led(l);
    }
    let Some(cause) = cause(views, known, t) else {
        return Decision::Wait;
    };
    let healthy = views.iter().filter(|v| v.healthy()).count();
    let needed = majority(views.len());
    let candidates = candidates(views);
    if healthy < needed || candidates.is_empty() {
        return Decision::Stuck {
            cause,
            healthy,
            needed,
        };
    }
    Decision::Elect { cause, candidates }
}

/// Why to elect now, if it is time.
fn cause(views: &[NodeView], known: Option<&str>, t: Timing) -> Option<Cause> {
    let patient = t.without_leader >= t.patience;
    match known.and_then(|k| views.iter().find(|v| v.name == k)) {
        Some(k) if !k.running => Some(Cause::Exited(k.name.clone())),
        Some(k) if k.answering && !k.ready => Some(Cause::StorageFailed(k.name.clone())),
        Some(k) if k.answering => patient.then(|| Cause::SteppedDown(k.name.clone())),
        // One slow answer is not a failure: it takes `failureThreshold`
        // failed checks in a row as well as the patience.
        Some(k) => (k.failed && patient).then(|| Cause::Unresponsive(k.name.clone())),
        None if views.iter().all(|v| v.running && v.answering) => Some(Cause::NoPrimaryAnywhere),
        None => {
            let waited = t.without_leader >= t.patience.saturating_add(t.grace);
            waited.then_some(Cause::NoPrimarySeen)
        }
    }
}

/// Healthy nodes that do not claim to lead (a deposed primary would
/// answer a promotion with its old epoch), most up to date first.
fn candidates(views: &[NodeView]) -> Vec<&NodeView> {
    let mut c: Vec<&NodeView> = views
        .iter()
        .filter(|v| v.healthy() && !v.claims_primary)
        .collect();
    c.sort_by(|a, b| b.last.cmp(&a.last).then_with(|| a.name.cmp(&b.name)));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            url: format!("http://{name}"),
            running: true,
            answering: true,
            ready: true,
            failed: false,
            claims_primary: false,
            epoch: 1,
            last: (1, 10),
        }
    }

    fn primary(name: &str) -> NodeView {
        NodeView {
            claims_primary: true,
            ..node(name)
        }
    }

    fn dead(v: NodeView) -> NodeView {
        NodeView {
            running: false,
            answering: false,
            failed: true,
            ..v
        }
    }

    const PATIENCE: Duration = Duration::from_millis(600);
    const GRACE: Duration = Duration::from_secs(2);

    fn after(ms: u64) -> Timing {
        Timing {
            without_leader: Duration::from_millis(ms),
            patience: PATIENCE,
            grace: GRACE,
        }
    }

    #[test]
    fn a_supervisor_that_sees_no_node_knows_it_may_be_the_one_cut_off() {
        let cut = |v: NodeView| NodeView {
            answering: false,
            failed: true,
            ..v
        };
        let all_cut = [cut(primary("a")), cut(node("b")), cut(node("c"))];
        assert!(sees_no_node(&all_cut));
        let one_seen = [cut(primary("a")), node("b"), cut(node("c"))];
        assert!(!sees_no_node(&one_seen));
        let exited = [dead(primary("a")), cut(node("b")), cut(node("c"))];
        assert!(!sees_no_node(&exited));
        let starting = |v: NodeView| NodeView {
            answering: false,
            ..v
        };
        let start = [starting(primary("a")), starting(node("b")), cut(node("c"))];
        assert!(!sees_no_node(&start));
    }

    fn elected<'a>(d: &'a Decision<'a>) -> Option<(&'a str, &'a Cause)> {
        match d {
            Decision::Elect { cause, candidates } => Some((candidates[0].name.as_str(), cause)),
            _ => None,
        }
    }

    #[test]
    fn a_healthy_primary_of_the_newest_epoch_leads() {
        let v = [primary("a"), node("b"), node("c")];
        assert_eq!(decide(&v, Some("a"), after(0)), Decision::Led(&v[0]));
        // kvsup may not know it yet (a restarted supervisor).
        assert_eq!(decide(&v, None, after(0)), Decision::Led(&v[0]));
    }

    #[test]
    fn a_primary_whose_process_exited_is_replaced_at_once() {
        let v = [dead(primary("a")), node("b"), node("c")];
        let d = decide(&v, Some("a"), after(0));
        assert_eq!(elected(&d), Some(("b", &Cause::Exited("a".into()))));
    }

    #[test]
    fn a_primary_whose_storage_fails_is_replaced_at_once() {
        let mut a = primary("a");
        a.ready = false;
        let v = [a, node("b"), node("c")];
        assert_eq!(leader(&v), None);
        let d = decide(&v, Some("a"), after(0));
        assert_eq!(elected(&d), Some(("b", &Cause::StorageFailed("a".into()))));
        // And a secondary whose storage fails is no candidate.
        let mut b = node("b");
        b.ready = false;
        let v = [dead(primary("a")), b, node("c"), node("d"), node("e")];
        assert_eq!(elected(&decide(&v, Some("a"), after(0))).unwrap().0, "c");
    }

    #[test]
    fn a_primary_that_stepped_down_is_replaced_after_the_patience() {
        // It saw a vote for epoch 6 that nobody won: it is a secondary now.
        let mut a = node("a");
        a.epoch = 6;
        let v = [a, node("b"), node("c")];
        assert_eq!(decide(&v, Some("a"), after(100)), Decision::Wait);
        let d = decide(&v, Some("a"), after(600));
        // It is a candidate as good as any (same log); names break the tie.
        assert_eq!(elected(&d), Some(("a", &Cause::SteppedDown("a".into()))));
    }

    #[test]
    fn a_primary_of_an_older_epoch_does_not_lead() {
        let mut b = node("b");
        b.epoch = 7;
        let v = [primary("a"), b, node("c")];
        assert_eq!(leader(&v), None);
        assert_eq!(decide(&v, Some("a"), after(100)), Decision::Wait);
        let d = decide(&v, Some("a"), after(600));
        // The deposed primary is not asked (it would answer with its epoch).
        assert_eq!(elected(&d), Some(("b", &Cause::SteppedDown("a".into()))));
        // Among primaries, the newest epoch's one leads.
        let mut c = primary("c");
        c.epoch = 7;
        let v = [primary("a"), node("b"), c];
        assert_eq!(leader(&v).map(|l| l.name.as_str()), Some("c"));
    }

    #[test]
    fn an_unresponsive_primary_needs_failed_checks_and_the_patience() {
        let mut a = primary("a");
        a.answering = false;
        let v = [a.clone(), node("b"), node("c")];
        // Not answering once or twice is not failing.
        assert_eq!(decide(&v, Some("a"), after(5_000)), Decision::Wait);
        a.failed = true;
        let v = [a, node("b"), node("c")];
        assert_eq!(decide(&v, Some("a"), after(100)), Decision::Wait);
        let d = decide(&v, Some("a"), after(600));
        assert_eq!(elected(&d), Some(("b", &Cause::Unresponsive("a".into()))));
    }

    #[test]
    fn a_restarted_cluster_elects_once_every_node_answers() {
        let v = [node("a"), node("b"), node("c")];
        let d = decide(&v, None, after(0));
        assert_eq!(elected(&d), Some(("a", &Cause::NoPrimaryAnywhere)));
        // While one is still starting, one of them may come back as
        // primary (a restarted supervisor adopting a running cluster): wait.
        let mut c = node("c");
        c.answering = false;
        let v = [node("a"), node("b"), c];
        assert_eq!(decide(&v, None, after(2_000)), Decision::Wait);
        let d = decide(&v, None, after(2_600));
        assert_eq!(elected(&d), Some(("a", &Cause::NoPrimarySeen)));
    }

    #[test]
    fn a_bootstrap_primary_still_starting_is_waited_for() {
        let mut a = primary("a");
        a.answering = false;
        let v = [a, node("b"), node("c")];
        assert_eq!(decide(&v, Some("a"), after(10_000)), Decision::Wait);
    }

    #[test]
    fn candidates_are_the_most_up_to_date_first() {
        let mut b = node("b");
        b.last = (1, 9);
        let mut c = node("c");
        c.last = (2, 3);
        let v = [dead(primary("a")), b, c, node("d"), node("e")];
        let Decision::Elect { candidates, .. } = decide(&v, Some("a"), after(0)) else {
            panic!("no election");
        };
        let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["c", "d", "e", "b"]);
    }

    #[test]
    fn no_election_without_a_majority_able_to_vote() {
        let v = [dead(primary("a")), node("b"), dead(node("c"))];
        let d = decide(&v, Some("a"), after(0));
        assert_eq!(
            d,
            Decision::Stuck {
                cause: Cause::Exited("a".into()),
                healthy: 1,
                needed: 2
            }
        );
        // A failed disk cannot vote either.
        let mut c = node("c");
        c.ready = false;
        let v = [dead(primary("a")), node("b"), c];
        assert!(matches!(
            decide(&v, Some("a"), after(0)),
            Decision::Stuck { healthy: 1, .. }
        ));
    }

    #[test]
    fn timing_sums_saturate() {
        let t = Timing {
            without_leader: Duration::MAX,
            patience: Duration::MAX,
            grace: GRACE,
        };
        let mut c = node("c");
        c.answering = false;
        let v = [node("a"), node("b"), c];
        assert!(elected(&decide(&v, None, t)).is_some());
    }
}
