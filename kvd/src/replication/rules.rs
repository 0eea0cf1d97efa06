//! The decision rules of replication, as plain functions over state.
//!
//! Nothing here does I/O, blocks, or keeps state between calls: each function
//! takes what a node knows and returns what it must do (and what it must
//! persist before doing it). That keeps the safety argument in one file and
//! lets the tests below enumerate small states exhaustively.
//!
//! # Invariants these rules keep (given a runtime that obeys the decisions)
//!
//! - **Log order.** Epochs never decrease along a log. The entry at index 0
//!   is the empty log's sentinel, epoch 0, present in every log.
//! - **Election safety.** A voter grants each epoch at most once and persists
//!   the grant before answering, so two candidates can never both collect a
//!   majority in one epoch.
//! - **Up-to-date winner.** A vote is granted only to a candidate whose last
//!   entry is at least as up to date as the voter's ([`LogPos`] order). A
//!   committed entry is on a majority, every winning majority overlaps it,
//!   so the winner already holds every committed entry.
//! - **Log matching.** A secondary accepts entries only after the entry just
//!   before them matches the primary's `(index, epoch)`; since one epoch has
//!   one primary, equal `(index, epoch)` means equal prefixes.
//! - **Commit safety.** The commit index never decreases, only counts
//!   durable copies, and only counts entries of the primary's own epoch.
//!   A committed entry is never truncated.

use kvproto::code;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use crate::model::LogPos;

// The majority of a count of voters is membership's arithmetic: it lives
// with the configuration, which the log's types (`model`) name.
pub use super::config::majority;

/// Seeing `seen_epoch` (in any request or response), must a node in
/// `my_epoch` adopt it and, if primary, step down?
///
/// Yes iff it is newer: a newer epoch means another node won an election
/// this node did not take part in as winner, so this node's writes can no
/// longer commit; it persists the new epoch and becomes a secondary.
pub fn should_step_down(my_epoch: u64, seen_epoch: u64) -> bool {
    seen_epoch > my_epoch
}

/// How far above its own epoch a node follows an epoch it sees. Elections
/// raise the epoch one at a time, so no real cluster gets near this; an
/// unbounded jump would let one request carrying 2^64-1 leave an epoch
/// nobody can outbid, after which no node could ever be elected.
pub const MAX_EPOCH_STEP: u64 = 1 << 32;

/// May a node in `my_epoch` act on `seen` (adopt it, vote in it)?
pub fn epoch_in_reach(my_epoch: u64, seen: u64) -> bool {
    seen <= my_epoch.saturating_add(MAX_EPOCH_STEP)
}

// ---------------------------------------------------------------------------
// Leadership
// ---------------------------------------------------------------------------

/// A node's role in its current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// A node's epoch and its role in it, read together (under one lock), so
/// that no decision sees the role from before a step-down and the epoch
/// from after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub epoch: u64,
    pub role: Role,
}

impl Leadership {
    pub fn leads(&self) -> bool {
        self.role == Role::Primary
    }
}

/// The epoch in which a primary sends what it prepared while it was
/// `captured` (entries read from its log, a snapshot, a read barrier's
/// heartbeat), now that it is `now`: the epoch it led when it started,
/// and nothing at all if it no longer leads exactly that epoch. (Raft: a
/// leader speaks only for the term it was elected in; a node deposed while
/// it read its log must not present that log as the new epoch's.)
pub fn send_epoch(captured: Leadership, now: Leadership) -> Option<u64> {
    (captured.leads() && now == captured).then_some(captured.epoch)
}

/// How a node answers a request (append or snapshot) from `sender`, which
/// claims to lead `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderVerdict {
    /// An older epoch: answer `stale_epoch` so the sender steps down.
    Stale,
    /// Too far above ours ([`epoch_in_reach`]): refuse, change nothing.
    OutOfReach,
    /// Our own epoch, which we lead: one of us is wrong; refuse.
    TwoPrimaries,
    /// Our own epoch, whose primary we already know is someone else: each
    /// epoch has at most one primary, so refuse.
    SecondPrimary,
    /// Follow it: persist `epoch` first when `adopt`, then remember the
    /// sender as the primary of `epoch`.
    Follow { adopt: bool },
}

/// Judges a request of `epoch` from `sender`, given this node's
/// leadership and the primary it follows in its epoch (`leader`), if it
/// has heard from one.
pub fn judge_sender(
    me: Leadership,
    leader: Option<&str>,
    epoch: u64,
    sender: &str,
) -> SenderVerdict {
    if epoch < me.epoch {
        SenderVerdict::Stale
    } else if !epoch_in_reach(me.epoch, epoch) {
        SenderVerdict::OutOfReach
    } else if epoch > me.epoch {
        SenderVerdict::Follow { adopt: true }
    } else if me.leads() {
        SenderVerdict::TwoPrimaries
    } else if leader.is_some_and(|l| l != sender) {
        SenderVerdict::SecondPrimary
    } else {
        SenderVerdict::Follow { adopt: false }
    }
}

// ---------------------------------------------------------------------------
// Votes
// ---------------------------------------------------------------------------

/// What a voter knows, as persisted in `meta` (epoch, vote) and its log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VoterState {
    /// Highest epoch this node has seen and persisted.
    pub current_epoch: u64,
    /// Who this node voted for in `current_epoch`, if anyone. Cleared when
    /// the epoch advances without a vote.
    pub voted_for: Option<String>,
    /// Last entry of this node's log.
    pub last: LogPos,
    /// Re-seeded and not caught up yet (`Meta::rejoining`): it grants no
    /// vote, since its log no longer shows what it acknowledged before.
    pub rejoining: bool,
}

/// A candidate asking for a vote in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRequest {
    /// The epoch the candidate wants to lead.
    pub epoch: u64,
    /// The candidate's node id.
    pub candidate: String,
    /// The candidate's last log entry.
    pub last: LogPos,
    /// "Would you grant this?" A pre-vote is answered exactly as the real
    /// vote would be but changes no state, so a promotion that cannot win
    /// (behind a peer, no majority) does not bump anyone's epoch and depose
    /// a healthy primary.
    pub pre_vote: bool,
}

/// Why a vote was granted or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteReason {
    /// A new epoch, and the candidate's log is at least as up to date.
    Granted,
    /// The same candidate asking again for the epoch we already gave it (a
    /// retried request): granting again changes nothing.
    AlreadyGrantedToCandidate,
    /// The requested epoch is older than ours.
    StaleEpoch,
    /// We are already in the requested epoch (voted for someone else, or
    /// learned it from a primary): each epoch is granted at most once.
    EpochTaken,
    /// Our log is more up to date than the candidate's: it may lack a
    /// committed entry, so it must not lead.
    CandidateBehind,
    /// The requested epoch is beyond [`epoch_in_reach`] of ours.
    EpochOutOfReach,
    /// This node lost its data and has not caught up with a primary yet:
    /// an entry committed with its old acknowledgement may be on one other
    /// node only, and this vote could elect a candidate without it.
    Rejoining,
}

impl VoteReason {
    /// A stable snake_case code for responses and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            VoteReason::Granted => "granted",
            VoteReason::AlreadyGrantedToCandidate => "already_granted_to_candidate",
            VoteReason::StaleEpoch => "stale_epoch",
            VoteReason::EpochTaken => "epoch_taken",
            VoteReason::CandidateBehind => "candidate_behind",
            VoteReason::EpochOutOfReach => "epoch_out_of_range",
            VoteReason::Rejoining => "rejoining",
        }
    }
}

/// The answer to a [`VoteRequest`], and what to persist before sending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteDecision {
    pub granted: bool,
    /// `Some(e)`: persist (and fsync) epoch `e` before answering. Set for
    /// every real request with a newer epoch, granted or not (Raft's rule:
    /// a newer epoch is adopted on sight, so the old primary is deposed
    /// everywhere it is seen). Never set for a pre-vote.
    pub new_epoch_to_persist: Option<u64>,
    /// Persist `voted_for = candidate` with the new epoch (in the same
    /// write). When false and `new_epoch_to_persist` is set, persist
    /// `voted_for = None`. Implies `new_epoch_to_persist.is_some()`.
    pub record_vote: bool,
    pub reason: VoteReason,
}

/// Decides a vote (docs/DESIGN.md §4). Grant only if
/// - `req.epoch > my.current_epoch` (but within [`epoch_in_reach`]), or it
///   equals it and we already voted for this same candidate (an idempotent
///   retry); and
/// - the candidate's last entry is at least as up to date as ours.
///
/// A candidate votes for itself through this same function on its own state,
/// so it too persists its new epoch and can never vote twice in one epoch.
///
/// This is stricter than Raft, which also grants an epoch it has adopted
/// without voting: here adopting an epoch (from a refused vote or from a
/// primary) uses it up. That costs nothing, since the next promotion picks
/// a newer epoch, and keeps "each epoch granted at most once" literal.
pub fn decide_vote(my: &VoterState, req: &VoteRequest) -> VoteDecision {
    let newer = req.epoch > my.current_epoch;
    let reason = if req.epoch < my.current_epoch {
        VoteReason::StaleEpoch
    } else if !epoch_in_reach(my.current_epoch, req.epoch) {
        VoteReason::EpochOutOfReach
    } else if !newer && my.voted_for.as_deref() != Some(req.candidate.as_str()) {
        VoteReason::EpochTaken
    } else if !req.last.at_least_as_up_to_date_as(&my.last) {
        VoteReason::CandidateBehind
    } else if my.rejoining {
        VoteReason::Rejoining
    } else if newer {
        VoteReason::Granted
    } else {
        VoteReason::AlreadyGrantedToCandidate
    };
    let granted = matches!(
        reason,
        VoteReason::Granted | VoteReason::AlreadyGrantedToCandidate
    );
    let real_and_newer = newer && !req.pre_vote && reason != VoteReason::EpochOutOfReach;
    VoteDecision {
        granted,
        new_epoch_to_persist: real_and_newer.then_some(req.epoch),
        record_vote: real_and_newer && granted,
        reason,
    }
}

impl VoterState {
    /// The state after persisting `decision` (what the runtime writes to
    /// `meta`). The log position is untouched: votes never change the log.
    pub fn apply_vote(&mut self, req: &VoteRequest, decision: &VoteDecision) {
        debug_assert!(
            !decision.record_vote || decision.new_epoch_to_persist.is_some(),
            "a recorded vote always comes with its new epoch"
        );
        if let Some(epoch) = decision.new_epoch_to_persist {
            debug_assert!(epoch > self.current_epoch, "epochs only move forward");
            self.current_epoch = epoch;
            self.voted_for = decision.record_vote.then(|| req.candidate.clone());
        }
    }
}

// ---------------------------------------------------------------------------
// Promotion
// ---------------------------------------------------------------------------

/// Why a promotion is refused; the body of the 409 answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A single node has nobody to elect it; it is primary by configuration.
    #[error("no peers are configured: there is nobody to hold an election with")]
    NoPeers,
    /// Promoting this node could lose entries only `peer` holds.
    #[error(
        "peer {peer} is more up to date (last epoch {}, index {}) than this node \
         (last epoch {}, index {}); promote {peer} instead",
        .peer_last.epoch, .peer_last.index, .my_last.epoch, .my_last.index
    )]
    BehindPeer {
        peer: String,
        peer_last: LogPos,
        my_last: LogPos,
    },
    /// Too few nodes answered to ever collect a majority.
    #[error("only {reachable} of the {needed} nodes needed for a majority are reachable")]
    NoMajority { reachable: usize, needed: usize },
    /// Enough nodes answered but too few granted (another promotion raced
    /// this one, or a peer had already seen the epoch).
    #[error("only {granted} of the {needed} votes needed were granted")]
    NotEnoughVotes { granted: usize, needed: usize },
    /// This node was re-seeded after losing its data and has not caught
    /// up with a primary yet (it may lack entries it acknowledged).
    #[error(
        "this node was re-seeded after losing its data and has not caught up with a \
         primary yet: it may lack entries it had acknowledged"
    )]
    Rejoining,
    /// The votes were won, but meanwhile this node saw a newer epoch (or
    /// another primary of the one it ran for): it does not lead.
    #[error("the election for epoch {ran_for} was overtaken: this node is now in epoch {now}")]
    Overtaken { ran_for: u64, now: u64 },
    /// This node is not a voter of its configuration in effect (a
    /// learner, a removed node, a `--join` node without a configuration
    /// yet): it may not lead (docs/DESIGN.md §4.11).
    #[error("this node is not a voter of its configuration: a learner cannot be promoted")]
    Learner,
}

impl Refusal {
    /// The snake_case `error.code` of the 409 body.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoPeers => code::NO_PEERS,
            Refusal::BehindPeer { .. } => code::BEHIND_PEER,
            Refusal::NoMajority { .. } => code::NO_MAJORITY,
            Refusal::NotEnoughVotes { .. } => code::NOT_ENOUGH_VOTES,
            Refusal::Overtaken { .. } => code::OVERTAKEN,
            Refusal::Rejoining => code::REJOINING,
            Refusal::Learner => code::LEARNER,
        }
    }
}

/// A peer's answer to a status probe, as used by [`promotion_precheck`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub epoch: u64,
    pub last: LogPos,
}

/// A peer's answer to a vote request, as used by [`tally`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteReply {
    Granted,
    /// Refused; the peer's epoch and last entry say why.
    Refused {
        epoch: u64,
        last: LogPos,
    },
    /// No answer (down, partitioned, timed out).
    Unreachable,
}

/// The result of counting votes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionOutcome {
    Won,
    Lost(Refusal),
}

/// Among `candidates`, the most up-to-date one, ties to the smaller name.
fn most_up_to_date<'a>(
    candidates: impl Iterator<Item = (&'a str, LogPos)>,
) -> Option<(&'a str, LogPos)> {
    candidates.max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
}

/// Before touching any state, may this node start a promotion?
///
/// `peers` lists every other cluster member with its status, `None` when it
/// did not answer. Refuses when a reachable peer's log is more up to date
/// (promoting us could lose its entries, and it would refuse our vote
/// anyway; the refusal names the most up-to-date such peer), or when fewer
/// than a majority (us included) are reachable. Otherwise returns the epoch
/// to run for: one past every epoch in sight, so no reachable peer has
/// already used it.
pub fn promotion_precheck(
    my_epoch: u64,
    my_last: LogPos,
    peers: &[(&str, Option<PeerStatus>)],
    cluster_size: usize,
) -> Result<u64, Refusal> {
    debug_assert!(peers.len() < cluster_size.max(1), "peers exclude this node");
    if cluster_size <= 1 || peers.is_empty() {
        return Err(Refusal::NoPeers);
    }
    let reachable = peers.iter().filter_map(|(name, s)| s.map(|s| (*name, s)));
    let ahead = reachable
        .clone()
        .map(|(name, s)| (name, s.last))
        .filter(|(_, last)| *last > my_last);
    if let Some((peer, peer_last)) = most_up_to_date(ahead) {
        return Err(Refusal::BehindPeer {
            peer: peer.to_owned(),
            peer_last,
            my_last,
        });
    }
    let needed = majority(cluster_size);
    let count = 1 + reachable.clone().count();
    if count < needed {
        return Err(Refusal::NoMajority {
            reachable: count,
            needed,
        });
    }
    // Saturating: an epoch of u64::MAX cannot be outbid; the vote at it is
    // then refused as "epoch taken" rather than wrapping to 0.
    let highest = reachable.map(|(_, s)| s.epoch).fold(my_epoch, u64::max);
    Ok(highest.saturating_add(1))
}

/// Counts the replies to a vote (or pre-vote) round by candidate `my_last`.
///
/// The candidate's own vote counts: it wins with `majority(cluster_size)`
/// grants including itself. On a loss the reason prefers the most useful
/// explanation: a more up-to-date peer (promote that one instead), then too
/// few reachable, then too few grants.
pub fn tally(
    my_last: LogPos,
    replies: &[(&str, VoteReply)],
    cluster_size: usize,
) -> ElectionOutcome {
    debug_assert!(
        replies.len() < cluster_size.max(1),
        "replies exclude the candidate"
    );
    let needed = majority(cluster_size);
    let granted = 1 + replies
        .iter()
        .filter(|(_, r)| *r == VoteReply::Granted)
        .count();
    if granted >= needed {
        return ElectionOutcome::Won;
    }
    let ahead = replies.iter().filter_map(|(name, r)| match r {
        VoteReply::Refused { last, .. } if *last > my_last => Some((*name, *last)),
        _ => None,
    });
    if let Some((peer, peer_last)) = most_up_to_date(ahead) {
        return ElectionOutcome::Lost(Refusal::BehindPeer {
            peer: peer.to_owned(),
            peer_last,
            my_last,
        });
    }
    let reachable = 1 + replies
        .iter()
        .filter(|(_, r)| *r != VoteReply::Unreachable)
        .count();
    if reachable < needed {
        return ElectionOutcome::Lost(Refusal::NoMajority { reachable, needed });
    }
    ElectionOutcome::Lost(Refusal::NotEnoughVotes { granted, needed })
}

/// The supervisor's failover choice: the most up-to-date reachable node
/// (`None` = unreachable), ties broken by the smaller name so every
/// supervisor run picks the same one. `None` when nobody is reachable.
///
/// The most up-to-date node is the one every other node will vote for; any
/// other choice would be refused by it (or would lose its entries).
pub fn pick_promotion_candidate<'a>(nodes: &[(&'a str, Option<LogPos>)]) -> Option<&'a str> {
    most_up_to_date(
        nodes
            .iter()
            .filter_map(|(name, last)| last.map(|l| (*name, l))),
    )
    .map(|(name, _)| name)
}

// ---------------------------------------------------------------------------
// Commit index (primary)
// ---------------------------------------------------------------------------

/// The primary's commit index: the highest index `N` such that
/// - `N <= my_durable_index` (durable on the primary itself),
/// - at least `sync_replicas` peers have `match_index >= N` (durable there;
///   `sync_replicas = 0` is async and commits at the primary's own
///   durability),
/// - the entry at `N` is from `current_epoch` (Raft's rule: an older-epoch
///   entry on a majority can still be overwritten by a newer primary that
///   lacks it, so it commits only indirectly, under a current-epoch entry;
///   a new primary's no-op is what makes that happen promptly),
///
/// and never below `old_commit`. `epoch_of(i)` is the epoch of entry `i`
/// (`None` if it is only in a snapshot, hence already committed).
///
/// Only the `sync_replicas`-th highest match index needs checking: epochs
/// never decrease along the log, so if that entry is older than the current
/// epoch, every lower one is too. If `sync_replicas` exceeds the number of
/// peers nothing new can commit (a configuration error the caller should
/// have refused).
pub fn commit_index(
    current_epoch: u64,
    my_durable_index: u64,
    peer_match_indexes: &[u64],
    epoch_of: impl Fn(u64) -> Option<u64>,
    old_commit: u64,
    sync_replicas: usize,
) -> u64 {
    let replicated = if sync_replicas == 0 {
        u64::MAX
    } else {
        if sync_replicas > peer_match_indexes.len() {
            return old_commit;
        }
        let mut sorted = peer_match_indexes.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted[sync_replicas - 1]
    };
    commit_at(
        current_epoch,
        replicated.min(my_durable_index),
        epoch_of,
        old_commit,
    )
}

/// The commit index once `n` is known durable on the quorum (by a fixed
/// count, [`commit_index`], or by a majority of the voters,
/// `config::replicated_by_voters`): `n` if its entry is of the primary's
/// own epoch (the rule [`commit_index`] explains), else `old_commit`;
/// never below `old_commit`.
pub fn commit_at(
    current_epoch: u64,
    n: u64,
    epoch_of: impl Fn(u64) -> Option<u64>,
    old_commit: u64,
) -> u64 {
    if n <= old_commit {
        return old_commit;
    }
    // Only an entry of the primary's own epoch commits by counting. (A
    // primary deposed while it counted may already hold a newer primary's
    // entries; those are not its to commit, and this refuses them too.)
    if epoch_of(n) == Some(current_epoch) {
        n
    } else {
        old_commit
    }
}

// ---------------------------------------------------------------------------
// Log matching (secondary) and catch-up (primary)
// ---------------------------------------------------------------------------

/// A read-only view of a node's log, enough for the matching rules.
///
/// Entries `first_index()..=last().index` are held. Entries before
/// `first_index()` are in the snapshot, whose last included entry keeps its
/// epoch: `epoch_at(first_index() - 1)` is `Some`. Index 0 is the sentinel
/// with epoch 0. `epoch_at` is `None` outside `first_index()-1..=last`.
pub trait LogView {
    /// The last entry ([`LogPos::ZERO`] for an empty log, the snapshot's
    /// last entry when only a snapshot is held).
    fn last(&self) -> LogPos;
    /// The first index held as a log entry (>= 1).
    fn first_index(&self) -> u64;
    /// The epoch of entry `index`, when known (see the trait docs).
    fn epoch_at(&self, index: u64) -> Option<u64>;
}

/// Smallest `i` in `lo..=hi` with `pred(i)`, for `pred` false-then-true.
fn partition_point(mut lo: u64, mut hi: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    // Invariant: the answer, if any, lies in lo..=hi, and pred(hi) is
    // checked before we return it.
    if lo > hi || !pred(hi) {
        return None;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// The last index of `epoch` in `log`, if the log holds any entry of it.
/// Binary search: epochs never decrease along a log.
fn last_index_of_epoch(log: &impl LogView, epoch: u64) -> Option<u64> {
    let lo = log.first_index().saturating_sub(1);
    let hi = log.last().index;
    let after = partition_point(lo, hi, |i| log.epoch_at(i).unwrap_or(0) > epoch)
        .unwrap_or(hi.saturating_add(1));
    let i = after.checked_sub(1)?;
    (i >= lo && log.epoch_at(i) == Some(epoch)).then_some(i)
}

/// An append from the primary, as the rules see it (the records' payloads
/// are the runtime's business).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendRequest<'a> {
    /// The sender's epoch.
    pub epoch: u64,
    /// The entry just before `entries` in the sender's log.
    pub prev: LogPos,
    /// Positions of the entries sent, contiguous from `prev.index + 1`.
    pub entries: &'a [LogPos],
    /// The sender's commit index.
    pub leader_commit: u64,
}

/// Where the secondary's log stops agreeing with `prev`, so the primary can
/// back up a whole epoch per round trip instead of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictHint {
    /// The epoch our log has at `prev.index`; `None` if our log is shorter.
    pub conflict_epoch: Option<u64>,
    /// The first index of `conflict_epoch` in our log, or our last index
    /// plus one if our log is shorter. Never at or below our commit index:
    /// everything committed matches, so backing up further is wasted.
    pub first_index: u64,
}

/// What the secondary does with an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendDecision {
    /// `Some(e)`: the sender is in a newer epoch; persist `e` (with no vote)
    /// before acting or answering, and follow the sender as primary.
    pub new_epoch_to_persist: Option<u64>,
    pub outcome: AppendOutcome,
}

/// The answer part of an [`AppendDecision`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The sender's epoch is older than ours: it is deposed. Answer with our
    /// epoch so it steps down ([`should_step_down`]).
    Stale { my_epoch: u64 },
    /// Our log does not hold `prev`: nothing changes; answer with the hint.
    Mismatch(ConflictHint),
    /// `prev` matches. In order: truncate our log from `truncate_from`
    /// (inclusive) if set, append `entries[append_from..]`, make them
    /// durable, then answer `match_index` and apply up to `commit`.
    Accept {
        /// Our first entry that conflicts with the sender's (same index,
        /// other epoch); it and everything after it go. Always above our
        /// commit index.
        truncate_from: Option<u64>,
        /// Entries before this position are already in our log (same index
        /// and epoch), and are not rewritten: a delayed duplicate append
        /// must not cut entries a later append added.
        append_from: usize,
        /// The last index known to match the sender's log:
        /// `prev.index + entries.len()`. Not our last index, which may hold
        /// an unchecked suffix beyond it.
        match_index: u64,
        /// Our new commit index: `max(old, min(leader_commit, match_index))`.
        commit: u64,
    },
}

/// Why an append cannot be processed at all. Neither changes any state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The request breaks the log's shape (a 400 for `/internal`).
    #[error("malformed append: {0}")]
    Malformed(&'static str),
    /// The sender disagrees with an entry we have committed. Committed
    /// entries are on every later primary, so this is a safety bug (or a
    /// stranger's data dir); refuse rather than truncate committed data.
    #[error("append conflicts with committed entry {index} (commit index {commit})")]
    ConflictsWithCommitted { index: u64, commit: u64 },
}

fn validate_append(req: &AppendRequest<'_>) -> Result<(), AppendError> {
    let bad = |why| Err(AppendError::Malformed(why));
    if req.epoch == 0 {
        return bad("epoch must be at least 1");
    }
    if (req.prev.index == 0) != (req.prev.epoch == 0) {
        return bad("only index 0 has epoch 0");
    }
    if req.prev.epoch > req.epoch {
        return bad("prev entry is newer than the request's epoch");
    }
    let mut expect = req.prev;
    for e in req.entries {
        match expect.index.checked_add(1) {
            Some(i) if i == e.index => {}
            _ => return bad("entries are not contiguous after prev"),
        }
        if e.epoch < expect.epoch.max(1) {
            return bad("entry epochs decrease");
        }
        if e.epoch > req.epoch {
            return bad("entry is newer than the request's epoch");
        }
        expect = *e;
    }
    Ok(())
}

/// The secondary's rules for an append (docs/DESIGN.md §4, Raft's AppendEntries).
///
/// `my_epoch` and `my_commit` are this node's persisted epoch and commit
/// index; `my_commit <= log.last().index`. A primary receiving an append in
/// its own epoch is a safety bug (one primary per epoch); the runtime calls
/// this on a primary only to learn that a newer epoch deposes it.
///
/// - Malformed requests are refused before anything else: no state changes.
/// - An older epoch is answered [`AppendOutcome::Stale`].
/// - A newer epoch is adopted ([`AppendDecision::new_epoch_to_persist`]),
///   whatever the rest of the outcome.
/// - `prev` matches if our log has it, or if `prev.index <= my_commit`
///   (committed entries are the same on every node, and may already be in
///   our snapshot).
/// - Entries already present are skipped; the first conflicting one marks
///   where our uncommitted suffix is cut. A conflict at or below our commit
///   index is [`AppendError::ConflictsWithCommitted`].
pub fn check_append(
    log: &impl LogView,
    my_epoch: u64,
    my_commit: u64,
    req: &AppendRequest<'_>,
) -> Result<AppendDecision, AppendError> {
    validate_append(req)?;
    let last = log.last();
    debug_assert!(
        my_commit <= last.index,
        "commit index {my_commit} beyond last index {}",
        last.index
    );
    if req.epoch < my_epoch {
        return Ok(AppendDecision {
            new_epoch_to_persist: None,
            outcome: AppendOutcome::Stale { my_epoch },
        });
    }
    let new_epoch_to_persist = should_step_down(my_epoch, req.epoch).then_some(req.epoch);
    let decided = |outcome| {
        Ok(AppendDecision {
            new_epoch_to_persist,
            outcome,
        })
    };

    let prev_epoch = log.epoch_at(req.prev.index);
    if req.prev.index <= my_commit {
        if prev_epoch.is_some_and(|e| e != req.prev.epoch) {
            return Err(AppendError::ConflictsWithCommitted {
                index: req.prev.index,
                commit: my_commit,
            });
        }
    } else if prev_epoch != Some(req.prev.epoch) {
        // Here prev.index > my_commit >= first_index - 1, so `prev_epoch` is
        // known iff our log reaches prev.index.
        let floor = (my_commit + 1).max(log.first_index());
        let hint = match prev_epoch.filter(|_| req.prev.index <= last.index) {
            Some(t) => ConflictHint {
                conflict_epoch: Some(t),
                first_index: partition_point(floor, req.prev.index, |i| {
                    log.epoch_at(i).unwrap_or(0) >= t
                })
                .unwrap_or(req.prev.index),
            },
            None => ConflictHint {
                conflict_epoch: None,
                first_index: (last.index + 1).clamp(floor, req.prev.index),
            },
        };
        return decided(AppendOutcome::Mismatch(hint));
    }

    let mut truncate_from = None;
    let mut append_from = req.entries.len();
    for (pos, e) in req.entries.iter().enumerate() {
        let have = log.epoch_at(e.index);
        if e.index <= my_commit {
            if have.is_some_and(|h| h != e.epoch) {
                return Err(AppendError::ConflictsWithCommitted {
                    index: e.index,
                    commit: my_commit,
                });
            }
            continue;
        }
        if e.index <= last.index {
            if have == Some(e.epoch) {
                continue;
            }
            truncate_from = Some(e.index);
        }
        append_from = pos;
        break;
    }
    // The loop skips every index <= my_commit, so a cut is always above it;
    // cutting a committed entry would lose an acknowledged write.
    assert!(
        truncate_from.is_none_or(|t| t > my_commit),
        "truncation at {truncate_from:?} would cut committed entries (commit {my_commit})"
    );
    let match_index = req.prev.index + req.entries.len() as u64;
    decided(AppendOutcome::Accept {
        truncate_from,
        append_from,
        match_index,
        commit: my_commit.max(req.leader_commit.min(match_index)),
    })
}

/// What the primary sends a peer next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Send entries from `next_index` (with `prev` = the entry before it).
    Append { next_index: u64 },
    /// The peer needs entries our WAL no longer has: send the snapshot.
    InstallSnapshot,
}

/// Whether the primary can send from `next_index`, or must install a
/// snapshot first: appending needs the epoch of entry `next_index - 1`,
/// known only from `first_index() - 1` on. `next_index` is capped at our
/// last index + 1.
pub fn catch_up_from(log: &impl LogView, next_index: u64) -> CatchUp {
    if next_index < log.first_index() {
        CatchUp::InstallSnapshot
    } else {
        CatchUp::Append {
            next_index: next_index.min(log.last().index + 1),
        }
    }
}

/// The primary's next step after a peer rejected an append whose prev was at
/// `rejected_prev_index`, with `hint`.
///
/// If we hold entries of the peer's conflicting epoch, resume just after our
/// last one (our logs may agree up to there); otherwise skip the peer's
/// whole conflicting epoch (or jump to its end if it is shorter). The new
/// next index is always at most `rejected_prev_index`, so every rejection
/// backs up at least one entry and catch-up terminates (prev index 0 always
/// matches).
pub fn next_index_after_reject(
    log: &impl LogView,
    rejected_prev_index: u64,
    hint: &ConflictHint,
) -> CatchUp {
    let next = hint
        .conflict_epoch
        .and_then(|t| last_index_of_epoch(log, t))
        .map_or(hint.first_index, |i| i + 1);
    catch_up_from(log, next.min(rejected_prev_index).max(1))
}

/// Why a secondary refuses a snapshot before installing anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRefusal {
    #[error(
        "the snapshot ends at (epoch {}, index {}), beyond its sender's log, which ends at \
         (epoch {}, index {}) in epoch {epoch}",
        .snapshot.epoch, .snapshot.index, .sender_last.epoch, .sender_last.index
    )]
    AheadOfSender {
        snapshot: LogPos,
        sender_last: LogPos,
        epoch: u64,
    },
    #[error("a snapshot at (epoch {}, index {}) is not a position of any log", .0.epoch, .0.index)]
    Malformed(LogPos),
}

impl SnapshotRefusal {
    /// The snake_case `error.code` of the 400 answer.
    pub fn code(&self) -> &'static str {
        match self {
            SnapshotRefusal::AheadOfSender { .. } => code::SNAPSHOT_AHEAD_OF_SENDER,
            SnapshotRefusal::Malformed(_) => code::INVALID_SNAPSHOT,
        }
    }
}

/// Checks a snapshot whose last entry is `snapshot` against what its
/// sender, a primary of `epoch` whose log ends at `sender_last`, can hold:
/// a primary snapshots only its own log, so nothing in it is newer than
/// that log's end, which is never newer than the primary's epoch. A
/// snapshot past its sender's log would make the receiver skip entries it
/// never got and report a match index it does not hold.
pub fn check_snapshot(
    epoch: u64,
    sender_last: LogPos,
    snapshot: LogPos,
) -> Result<(), SnapshotRefusal> {
    // Index 0 is the empty log; a snapshot at u64::MAX leaves no index for
    // the next entry.
    if snapshot.index == 0 || snapshot.epoch == 0 || snapshot.index == u64::MAX {
        return Err(SnapshotRefusal::Malformed(snapshot));
    }
    let within = sender_last.epoch <= epoch
        && snapshot.epoch <= sender_last.epoch
        && snapshot.index <= sender_last.index;
    if within {
        Ok(())
    } else {
        Err(SnapshotRefusal::AheadOfSender {
            snapshot,
            sender_last,
            epoch,
        })
    }
}

// ---------------------------------------------------------------------------
// Pipelined shipping (primary) and answers after a group fsync (secondary)
// ---------------------------------------------------------------------------

/// Appends a primary keeps in flight to one peer at most: enough that the
/// next append travels while the peer fsyncs the last ones (which it then
/// covers with one fsync), few enough that a refusal, which throws the rest
/// of the window away, wastes little.
pub const MAX_APPENDS_IN_FLIGHT: usize = 4;

/// Payload bytes in flight to one peer at most (two full appends): bounds
/// what a slow peer ties up in memory and on the wire.
pub const MAX_BYTES_IN_FLIGHT: usize = 8 << 20;

/// What a primary's shipper to one peer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendDecision {
    /// Send the entries it has after the last one sent.
    Entries,
    /// Send an empty append: the peer learns the commit index, and that
    /// this node still leads.
    Heartbeat,
    /// Wait for an answer, new entries, or the heartbeat interval.
    Wait,
}

/// The shipper's next step, given what it has in flight (`appends`
/// requests of `bytes` payload), whether entries past the last one sent
/// exist, how long since it last sent, and whether the commit index moved
/// since. While `probing` (after a refusal, until an accept) one append
/// at a time, as without a pipeline. Heartbeats go only when nothing is in flight: an append in
/// flight already carries the commit index and the leadership.
pub fn next_send(
    appends: usize,
    bytes: usize,
    probing: bool,
    has_entries: bool,
    idle_for: Duration,
    heartbeat: Duration,
    commit_moved: bool,
) -> SendDecision {
    if !has_room(appends, bytes, probing) {
        return SendDecision::Wait;
    }
    if has_entries {
        return SendDecision::Entries;
    }
    if appends == 0 && (idle_for >= heartbeat || commit_moved) {
        return SendDecision::Heartbeat;
    }
    SendDecision::Wait
}

/// Whether the window to a peer with `appends` appends of `bytes` payload
/// in flight takes another (while `probing`, only when nothing is in
/// flight).
pub fn has_room(appends: usize, bytes: usize, probing: bool) -> bool {
    let max_appends = if probing { 1 } else { MAX_APPENDS_IN_FLIGHT };
    appends < max_appends && bytes < MAX_BYTES_IN_FLIGHT
}

/// What the primary does with the answer to the oldest append in flight
/// (answers are taken in the order their appends were sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineStep {
    /// The peer holds our log through `match_index`: never more than the
    /// append, sent after `prev_index`, carried.
    Acked { match_index: u64 },
    /// Anything but an accept (mismatch, stale epoch, no answer): the
    /// answers still in flight are ignored and shipping resumes, one
    /// append at a time, from the last acknowledged match index.
    Drain,
}

/// The step for an append of `sent` entries after `prev_index`, answered
/// `accepted` (`Some(match index)` for an accept, else `None`).
pub fn pipeline_step(prev_index: u64, sent: u64, accepted: Option<u64>) -> PipelineStep {
    match accepted {
        Some(m) => PipelineStep::Acked {
            match_index: m.min(prev_index.saturating_add(sent)),
        },
        None => PipelineStep::Drain,
    }
}

/// Secondary: whether an append after `prev_index` is next in line, given
/// how far appends of its epoch were handed to the WAL writer
/// (`handed_end`) and the end of the written log: its predecessor is in,
/// or it does not start past the log.
pub fn in_order(prev_index: u64, handed_end: u64, written_last: u64) -> bool {
    prev_index <= handed_end.max(written_last)
}

/// A secondary's answer to an append once the fsync covering it is done.
/// If this node entered a newer epoch than the append's meanwhile (a vote
/// it cast, a newer primary's append), that step may have read a log
/// without these entries (a vote counts only the durable log), so an
/// accept could let the old primary count entries the new one lacks: it
/// becomes a stale answer instead, and the old primary steps down.
pub fn answer_after_fsync(outcome: AppendOutcome, req_epoch: u64, my_epoch: u64) -> AppendOutcome {
    match outcome {
        AppendOutcome::Accept { .. } if my_epoch > req_epoch => AppendOutcome::Stale { my_epoch },
        other => other,
    }
}

/// A vote decided on the log read before its epoch was persisted, checked
/// again against the durable log `now`, read after: entries that became
/// durable in between (an append accepted just before) may put the
/// candidate behind, and then the answer says so.
pub fn confirm_grant(
    granted: bool,
    reason: VoteReason,
    candidate: LogPos,
    now: LogPos,
) -> (bool, VoteReason) {
    match granted && !candidate.at_least_as_up_to_date_as(&now) {
        true => (false, VoteReason::CandidateBehind),
        false => (granted, reason),
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use super::*;

    // ------------------------------------------------------------------
    // A log for tests: a snapshot position plus the epochs after it.
    // ------------------------------------------------------------------

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct TestLog {
        snap: LogPos,
        /// Epochs of entries snap.index+1, snap.index+2, ...
        epochs: Vec<u64>,
    }

    impl TestLog {
        fn new(epochs: &[u64]) -> TestLog {
            TestLog {
                snap: LogPos::ZERO,
                epochs: epochs.to_vec(),
            }
        }

        /// Moves entries up to `index` into the "snapshot".
        fn compacted(&self, index: u64) -> TestLog {
            assert!(index >= self.snap.index && index <= self.last().index);
            let k = (index - self.snap.index) as usize;
            TestLog {
                snap: LogPos::new(self.epoch_at(index).unwrap(), index),
                epochs: self.epochs[k..].to_vec(),
            }
        }

        fn truncate_from(&mut self, index: u64) {
            assert!(index > self.snap.index, "cannot cut into the snapshot");
            self.epochs.truncate((index - self.snap.index - 1) as usize);
        }

        fn push(&mut self, e: LogPos) {
            assert_eq!(e.index, self.last().index + 1, "appends are contiguous");
            self.epochs.push(e.epoch);
        }

        fn positions(&self, from: u64, to: u64) -> Vec<LogPos> {
            (from..=to)
                .map(|i| LogPos::new(self.epoch_at(i).unwrap(), i))
                .collect()
        }
    }

    impl LogView for TestLog {
        fn last(&self) -> LogPos {
            match self.epochs.last() {
                Some(&e) => LogPos::new(e, self.snap.index + self.epochs.len() as u64),
                None => self.snap,
            }
        }
        fn first_index(&self) -> u64 {
            self.snap.index + 1
        }
        fn epoch_at(&self, index: u64) -> Option<u64> {
            match index.cmp(&self.snap.index) {
                Ordering::Less => None,
                Ordering::Equal => Some(self.snap.epoch),
                Ordering::Greater => self
                    .epochs
                    .get((index - self.snap.index - 1) as usize)
                    .copied(),
            }
        }
    }

    /// Every non-decreasing epoch sequence of length 0..=max_len over
    /// 1..=max_epoch.
    fn all_logs(max_len: usize, max_epoch: u64) -> Vec<Vec<u64>> {
        let mut out = vec![vec![]];
        let mut frontier = vec![vec![]];
        for _ in 0..max_len {
            let mut next = vec![];
            for log in &frontier {
                let from = log.last().copied().unwrap_or(1);
                for e in from..=max_epoch {
                    let mut l: Vec<u64> = log.clone();
                    l.push(e);
                    next.push(l);
                }
            }
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    fn p(epoch: u64, index: u64) -> LogPos {
        LogPos::new(epoch, index)
    }

    // ------------------------------------------------------------------
    // LogPos, majority, step-down
    // ------------------------------------------------------------------

    #[test]
    fn logpos_order_is_epoch_then_index() {
        // (a, b, a at least as up to date as b)
        let cases = [
            (p(0, 0), p(0, 0), true),
            (p(1, 1), p(0, 0), true),
            (p(0, 0), p(1, 1), false),
            (p(2, 1), p(1, 9), true), // newer epoch wins even when shorter
            (p(1, 9), p(2, 1), false),
            (p(2, 5), p(2, 4), true),
            (p(2, 4), p(2, 5), false),
            (p(3, 7), p(3, 7), true),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.at_least_as_up_to_date_as(&b), want, "{a:?} vs {b:?}");
        }
        for a in positions(3, 3) {
            for b in positions(3, 3) {
                let by_def = a.epoch > b.epoch || (a.epoch == b.epoch && a.index >= b.index);
                assert_eq!(a.at_least_as_up_to_date_as(&b), by_def, "{a:?} vs {b:?}");
            }
        }
    }

    fn positions(max_epoch: u64, max_index: u64) -> Vec<LogPos> {
        let mut v = vec![LogPos::ZERO];
        for e in 1..=max_epoch {
            for i in 1..=max_index {
                v.push(p(e, i));
            }
        }
        v
    }

    #[test]
    fn majority_of_cluster_sizes() {
        for (n, m) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)] {
            assert_eq!(majority(n), m, "cluster of {n}");
            // Any two majorities intersect.
            assert!(2 * majority(n) > n);
        }
    }

    #[test]
    fn step_down_only_on_a_newer_epoch() {
        for my in 0..5 {
            for seen in 0..5 {
                assert_eq!(should_step_down(my, seen), seen > my, "my {my} seen {seen}");
            }
        }
    }

    // ------------------------------------------------------------------
    // Votes
    // ------------------------------------------------------------------

    fn voter(epoch: u64, voted_for: Option<&str>, last: LogPos) -> VoterState {
        VoterState {
            current_epoch: epoch,
            voted_for: voted_for.map(str::to_owned),
            last,
            rejoining: false,
        }
    }

    #[test]
    fn a_rejoining_node_grants_no_vote_but_still_takes_up_a_newer_epoch() {
        let mut v = voter(3, None, LogPos::new(3, 10));
        v.rejoining = true;
        let d = decide_vote(&v, &ask(4, "b", LogPos::new(3, 12), false));
        assert!(!d.granted);
        assert_eq!(d.reason, VoteReason::Rejoining);
        // The epoch is still adopted on sight (an old primary is deposed),
        // with no vote recorded in it.
        assert_eq!(d.new_epoch_to_persist, Some(4));
        assert!(!d.record_vote);
        // A candidate behind it is refused for that reason first; once
        // caught up, the same request is granted.
        let behind = decide_vote(&v, &ask(4, "b", LogPos::new(3, 9), false));
        assert_eq!(behind.reason, VoteReason::CandidateBehind);
        v.rejoining = false;
        assert!(decide_vote(&v, &ask(4, "b", LogPos::new(3, 12), false)).granted);
    }

    fn ask(epoch: u64, candidate: &str, last: LogPos, pre_vote: bool) -> VoteRequest {
        VoteRequest {
            epoch,
            candidate: candidate.to_owned(),
            last,
            pre_vote,
        }
    }

    #[test]
    fn vote_table() {
        use VoteReason::*;
        let (yes, no) = (true, false);
        // (voter, request, granted, epoch to persist, record vote, reason)
        #[rustfmt::skip]
        let cases = [
            (voter(1, None, p(1, 5)), ask(2, "a", p(1, 5), no), yes, Some(2), yes, Granted),
            (voter(1, None, p(1, 5)), ask(2, "a", p(1, 6), no), yes, Some(2), yes, Granted),
            (voter(1, None, p(1, 5)), ask(2, "a", p(2, 1), no), yes, Some(2), yes, Granted),
            // Behind: refused, but the newer epoch is still adopted.
            (voter(1, None, p(1, 5)), ask(2, "a", p(1, 4), no), no, Some(2), no, CandidateBehind),
            (voter(1, None, p(2, 1)), ask(3, "a", p(1, 9), no), no, Some(3), no, CandidateBehind),
            // Same epoch: only an idempotent retry by the same candidate.
            (voter(2, Some("a"), p(1, 5)), ask(2, "a", p(1, 5), no), yes, None, no, AlreadyGrantedToCandidate),
            (voter(2, Some("a"), p(1, 5)), ask(2, "b", p(1, 9), no), no, None, no, EpochTaken),
            (voter(2, None, p(1, 5)), ask(2, "b", p(1, 9), no), no, None, no, EpochTaken),
            (voter(3, None, p(1, 5)), ask(2, "b", p(1, 9), no), no, None, no, StaleEpoch),
            (voter(3, Some("b"), p(1, 5)), ask(2, "b", p(1, 9), no), no, None, no, StaleEpoch),
            // Pre-votes answer the same but persist nothing.
            (voter(1, None, p(1, 5)), ask(2, "a", p(1, 5), yes), yes, None, no, Granted),
            (voter(1, None, p(1, 5)), ask(2, "a", p(1, 4), yes), no, None, no, CandidateBehind),
            (voter(2, None, p(1, 5)), ask(2, "a", p(1, 5), yes), no, None, no, EpochTaken),
        ];
        for (my, req, granted, new_epoch_to_persist, record_vote, reason) in cases {
            let want = VoteDecision {
                granted,
                new_epoch_to_persist,
                record_vote,
                reason,
            };
            assert_eq!(decide_vote(&my, &req), want, "{my:?} {req:?}");
        }
    }

    #[test]
    fn vote_rules_hold_for_every_small_state() {
        let names = [None, Some("a"), Some("b")];
        let lasts = positions(2, 2);
        for cur in 0..=3 {
            for voted in names {
                for &my_last in &lasts {
                    let my = voter(cur, voted, my_last);
                    for epoch in 0..=3 {
                        for cand in ["a", "b", "c"] {
                            for &last in &lasts {
                                for pre_vote in [false, true] {
                                    let req = ask(epoch, cand, last, pre_vote);
                                    let d = decide_vote(&my, &req);
                                    let epoch_ok =
                                        epoch > cur || (epoch == cur && voted == Some(cand));
                                    assert_eq!(
                                        d.granted,
                                        epoch_ok && last >= my_last,
                                        "{my:?} {req:?}"
                                    );
                                    assert_eq!(
                                        d.new_epoch_to_persist,
                                        (!pre_vote && epoch > cur).then_some(epoch),
                                        "{my:?} {req:?}"
                                    );
                                    assert_eq!(
                                        d.record_vote,
                                        !pre_vote && epoch > cur && d.granted
                                    );
                                    assert!(!d.reason.as_str().is_empty());
                                    let mut after = my.clone();
                                    after.apply_vote(&req, &d);
                                    if pre_vote {
                                        assert_eq!(after, my, "a pre-vote never changes state");
                                    }
                                    assert!(after.current_epoch >= my.current_epoch);
                                    assert_eq!(after.last, my.last, "votes never touch the log");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Three voters, every interleaving of up to four vote deliveries among
    /// candidates a, b, c in epochs 1 and 2: no epoch ever has two winners,
    /// each voter grants an epoch to at most one candidate, and every grant
    /// goes to a candidate at least as up to date as the voter.
    #[test]
    fn at_most_one_winner_per_epoch_under_every_interleaving() {
        let names = ["a", "b", "c"];
        let lasts = [p(1, 2), p(1, 3), p(2, 1)];
        let mut requests = vec![];
        for (c, cand) in names.iter().enumerate() {
            for epoch in 1..=2 {
                requests.push((c, ask(epoch, cand, lasts[c], false)));
            }
        }
        // An event: deliver request r to voter v.
        let events: Vec<(usize, usize)> = (0..requests.len())
            .flat_map(|r| (0..3).map(move |v| (r, v)))
            .collect();
        let start: Vec<VoterState> = (0..3).map(|i| voter(0, None, lasts[i])).collect();

        fn explore(
            voters: &[VoterState],
            grants: &[(usize, u64, usize)], // (voter, epoch, candidate)
            depth: usize,
            requests: &[(usize, VoteRequest)],
            events: &[(usize, usize)],
        ) {
            for epoch in 1..=2 {
                let winners: Vec<usize> = (0..3)
                    .filter(|&c| {
                        grants
                            .iter()
                            .filter(|g| g.1 == epoch && g.2 == c)
                            .map(|g| g.0)
                            .collect::<std::collections::BTreeSet<_>>()
                            .len()
                            >= majority(3)
                    })
                    .collect();
                assert!(
                    winners.len() <= 1,
                    "epoch {epoch} has winners {winners:?}: {grants:?}"
                );
            }
            if depth == 0 {
                return;
            }
            for &(r, v) in events {
                let (c, req) = &requests[r];
                let d = decide_vote(&voters[v], req);
                let mut next = voters.to_vec();
                next[v].apply_vote(req, &d);
                let mut g = grants.to_vec();
                if d.granted {
                    assert!(req.last >= voters[v].last);
                    assert!(
                        !grants
                            .iter()
                            .any(|x| x.0 == v && x.1 == req.epoch && x.2 != *c),
                        "voter {v} granted epoch {} twice",
                        req.epoch
                    );
                    g.push((v, req.epoch, *c));
                }
                explore(&next, &g, depth - 1, requests, events);
            }
        }
        explore(&start, &[], 4, &requests, &events);
    }

    // ------------------------------------------------------------------
    // Promotion
    // ------------------------------------------------------------------

    // Table rows: what each peer (or node) said.
    type Peers<'a> = &'a [(&'a str, Option<PeerStatus>)];
    type Replies<'a> = &'a [(&'a str, VoteReply)];
    type Nodes<'a> = &'a [(&'a str, Option<LogPos>)];

    fn st(epoch: u64, last: LogPos) -> Option<PeerStatus> {
        Some(PeerStatus { epoch, last })
    }

    // ------------------------------------------------------------------
    // Leadership, senders, epoch bounds, snapshot offers
    // ------------------------------------------------------------------

    fn lead(epoch: u64) -> Leadership {
        Leadership {
            epoch,
            role: Role::Primary,
        }
    }

    fn follow(epoch: u64) -> Leadership {
        Leadership {
            epoch,
            role: Role::Secondary,
        }
    }

    #[test]
    fn a_primary_deposed_while_it_read_its_log_sends_nothing() {
        // The interleaving: role checked as primary of 3, entries read (an
        // await), meanwhile epoch 4 seen and stepped down, then the send.
        assert_eq!(send_epoch(lead(3), follow(4)), None);
        // Re-elected meanwhile: the round was prepared for epoch 3's log.
        assert_eq!(send_epoch(lead(3), lead(5)), None);
        assert_eq!(send_epoch(lead(3), follow(3)), None);
        assert_eq!(send_epoch(follow(3), follow(3)), None);
        assert_eq!(send_epoch(lead(3), lead(3)), Some(3));
        let all: Vec<Leadership> = (0..4).flat_map(|e| [lead(e), follow(e)]).collect();
        for &captured in &all {
            for &now in &all {
                match send_epoch(captured, now) {
                    Some(e) => {
                        assert!(captured.leads() && now == captured, "{captured:?} {now:?}");
                        assert_eq!(e, captured.epoch, "sent in an epoch it did not lead");
                    }
                    None => assert!(!captured.leads() || now != captured),
                }
            }
        }
    }

    #[test]
    fn epochs_in_reach_are_bounded_above_only() {
        assert!(epoch_in_reach(5, 0));
        assert!(epoch_in_reach(5, 5 + MAX_EPOCH_STEP));
        assert!(!epoch_in_reach(5, 6 + MAX_EPOCH_STEP));
        assert!(!epoch_in_reach(1, u64::MAX));
        assert!(
            epoch_in_reach(u64::MAX - 1, u64::MAX),
            "saturates, never wraps"
        );
    }

    #[test]
    fn a_node_follows_at_most_one_primary_per_epoch() {
        use SenderVerdict::*;
        let far = 3 + MAX_EPOCH_STEP + 1;
        #[rustfmt::skip]
        let cases = [
            (follow(3), None, 2, "a", Stale),
            (lead(3), None, 2, "a", Stale),
            (follow(3), None, far, "a", OutOfReach),
            (follow(3), Some("a"), u64::MAX, "a", OutOfReach),
            (follow(3), Some("a"), 4, "b", Follow { adopt: true }),
            (lead(3), Some("me"), 4, "b", Follow { adopt: true }),
            (follow(3), None, 3, "a", Follow { adopt: false }),
            (follow(3), Some("a"), 3, "a", Follow { adopt: false }),
            (follow(3), Some("a"), 3, "b", SecondPrimary),
            (lead(3), Some("me"), 3, "b", TwoPrimaries),
        ];
        for (me, leader, epoch, sender, want) in cases {
            assert_eq!(
                judge_sender(me, leader, epoch, sender),
                want,
                "{me:?} {leader:?} {epoch} {sender}"
            );
        }
    }

    #[test]
    fn votes_beyond_reach_are_refused_and_persist_nothing() {
        for pre_vote in [false, true] {
            for epoch in [2 + MAX_EPOCH_STEP, u64::MAX] {
                let d = decide_vote(
                    &voter(1, None, p(1, 5)),
                    &ask(epoch, "a", p(9, 9), pre_vote),
                );
                assert_eq!(d.reason, VoteReason::EpochOutOfReach);
                assert!(!d.granted && !d.record_vote);
                assert_eq!(d.new_epoch_to_persist, None);
            }
            let d = decide_vote(
                &voter(1, None, p(1, 5)),
                &ask(1 + MAX_EPOCH_STEP, "a", p(1, 5), pre_vote),
            );
            assert!(d.granted, "the largest step in reach is granted");
        }
    }

    #[test]
    fn snapshots_beyond_their_senders_log_are_refused() {
        #[rustfmt::skip]
        let cases = [
            // (sender epoch, sender's last entry, snapshot, accepted)
            (3, p(3, 10), p(3, 10), true),
            (3, p(3, 10), p(2, 7), true),
            (4, p(3, 10), p(3, 10), true),
            (3, p(3, 10), p(3, 11), false),
            (3, p(3, 10), p(4, 10), false),
            (3, p(4, 10), p(3, 10), false),
            (3, p(3, 10), p(0, 0), false),
            (3, p(3, 10), p(3, 0), false),
            (u64::MAX, p(u64::MAX, u64::MAX), p(3, u64::MAX), false),
        ];
        for (epoch, sender_last, snap, ok) in cases {
            assert_eq!(
                check_snapshot(epoch, sender_last, snap).is_ok(),
                ok,
                "{epoch} {sender_last:?} {snap:?}"
            );
        }
    }

    #[test]
    fn precheck_table() {
        let me = p(2, 10);
        let behind = |peer: &str, peer_last| {
            Err(Refusal::BehindPeer {
                peer: peer.into(),
                peer_last,
                my_last: me,
            })
        };
        let no_majority = |reachable, needed| Err(Refusal::NoMajority { reachable, needed });
        #[rustfmt::skip]
        let cases: &[(Peers, usize, Result<u64, Refusal>)] = &[
            (&[("b", st(2, p(2, 10))), ("c", st(2, p(2, 9)))], 3, Ok(3)),
            (&[("b", st(5, p(2, 8))), ("c", None)], 3, Ok(6)),
            (&[("b", None), ("c", None)], 3, no_majority(1, 2)),
            (&[("b", st(2, p(2, 11))), ("c", st(2, p(2, 9)))], 3, behind("b", p(2, 11))),
            // A newer last epoch beats a longer log.
            (&[("b", st(3, p(3, 1))), ("c", st(2, p(2, 12)))], 3, behind("b", p(3, 1))),
            // Ties between peers ahead go to the smaller name.
            (&[("c", st(2, p(2, 12))), ("b", st(2, p(2, 12)))], 3, behind("b", p(2, 12))),
            // Behind a peer is reported even when a majority is missing.
            (&[("b", st(2, p(2, 11))), ("c", None), ("d", None), ("e", None)], 5, behind("b", p(2, 11))),
            (&[("b", st(2, p(2, 1))), ("c", None), ("d", None), ("e", None)], 5, no_majority(2, 3)),
            (&[], 1, Err(Refusal::NoPeers)),
        ];
        for (peers, size, want) in cases {
            assert_eq!(&promotion_precheck(2, me, peers, *size), want, "{peers:?}");
        }
        // The epoch saturates rather than wrapping to 0.
        let peers = [("b", st(1, p(1, 1)))];
        assert_eq!(promotion_precheck(u64::MAX, me, &peers, 2), Ok(u64::MAX));
    }

    #[test]
    fn refusals_carry_409_codes_and_messages() {
        let behind = Refusal::BehindPeer {
            peer: "n1".into(),
            peer_last: p(2, 11),
            my_last: p(2, 10),
        };
        let no_majority = Refusal::NoMajority {
            reachable: 1,
            needed: 2,
        };
        let contested = Refusal::NotEnoughVotes {
            granted: 1,
            needed: 2,
        };
        #[rustfmt::skip]
        let cases = [
            (behind, "behind_peer", "peer n1 is more up to date (last epoch 2, index 11)"),
            (no_majority, "no_majority", "only 1 of the 2 nodes"),
            (contested, "not_enough_votes", "only 1 of the 2 votes"),
            (Refusal::NoPeers, "no_peers", "no peers are configured"),
        ];
        for (r, code, message) in cases {
            assert_eq!(r.code(), code);
            assert!(r.to_string().contains(message), "{r}");
        }
    }

    #[test]
    fn tally_table() {
        use VoteReply::*;
        let me = p(2, 10);
        let refused = |last| Refused { epoch: 3, last };
        let lost = ElectionOutcome::Lost;
        let behind_b = lost(Refusal::BehindPeer {
            peer: "b".into(),
            peer_last: p(2, 11),
            my_last: me,
        });
        #[rustfmt::skip]
        let cases: &[(Replies, usize, ElectionOutcome)] = &[
            (&[("b", Granted), ("c", Unreachable)], 3, ElectionOutcome::Won),
            // Won is won, even if a refusing peer is ahead (its extra entries are uncommitted).
            (&[("b", Granted), ("c", refused(p(2, 11)))], 3, ElectionOutcome::Won),
            (&[("b", Unreachable), ("c", Unreachable)], 3, lost(Refusal::NoMajority { reachable: 1, needed: 2 })),
            (&[("b", refused(p(2, 11))), ("c", Unreachable)], 3, behind_b),
            (&[("b", refused(p(2, 9))), ("c", refused(p(2, 10)))], 3, lost(Refusal::NotEnoughVotes { granted: 1, needed: 2 })),
            (&[("b", Granted), ("c", Unreachable), ("d", Unreachable), ("e", Unreachable)], 5, lost(Refusal::NoMajority { reachable: 2, needed: 3 })),
            (&[("b", Granted), ("c", Granted), ("d", Unreachable), ("e", Unreachable)], 5, ElectionOutcome::Won),
            (&[], 1, ElectionOutcome::Won),
        ];
        for (replies, size, want) in cases {
            assert_eq!(&tally(me, replies, *size), want, "{replies:?}");
        }
    }

    /// Every combination of replies from two or four peers: the candidate
    /// wins exactly when grants (itself included) reach a majority, and a
    /// loss names the right reason.
    #[test]
    fn tally_every_reply_combination() {
        let me = p(2, 10);
        let kinds = [
            VoteReply::Granted,
            VoteReply::Unreachable,
            VoteReply::Refused {
                epoch: 3,
                last: p(2, 9),
            },
            VoteReply::Refused {
                epoch: 3,
                last: p(3, 1),
            },
        ];
        let names = ["b", "c", "d", "e"];
        for peers in [2usize, 4] {
            for code in 0..kinds.len().pow(peers as u32) {
                let replies: Vec<(&str, VoteReply)> = (0..peers)
                    .map(|i| {
                        (
                            names[i],
                            kinds[code / kinds.len().pow(i as u32) % kinds.len()],
                        )
                    })
                    .collect();
                let granted = 1 + replies.iter().filter(|r| r.1 == VoteReply::Granted).count();
                let reachable = 1 + replies
                    .iter()
                    .filter(|r| r.1 != VoteReply::Unreachable)
                    .count();
                let ahead = replies.iter().find(|r| r.1 == kinds[3]).map(|r| r.0);
                let want = if granted >= majority(peers + 1) {
                    ElectionOutcome::Won
                } else if let Some(peer) = ahead {
                    ElectionOutcome::Lost(Refusal::BehindPeer {
                        peer: peer.into(),
                        peer_last: p(3, 1),
                        my_last: me,
                    })
                } else if reachable < majority(peers + 1) {
                    ElectionOutcome::Lost(Refusal::NoMajority {
                        reachable,
                        needed: majority(peers + 1),
                    })
                } else {
                    ElectionOutcome::Lost(Refusal::NotEnoughVotes {
                        granted,
                        needed: majority(peers + 1),
                    })
                };
                assert_eq!(tally(me, &replies, peers + 1), want, "{replies:?}");
            }
        }
    }

    #[test]
    fn failover_picks_the_most_up_to_date_reachable_node() {
        #[rustfmt::skip]
        let cases: &[(Nodes, Option<&str>)] = &[
            (&[], None),
            (&[("n1", None), ("n2", None)], None),
            (&[("n1", Some(p(2, 5))), ("n2", Some(p(2, 7)))], Some("n2")),
            (&[("n1", Some(p(3, 1))), ("n2", Some(p(2, 7)))], Some("n1")),
            (&[("n1", None), ("n2", Some(p(2, 7))), ("n0", Some(p(2, 6)))], Some("n2")),
            (&[("n3", None), ("n2", Some(p(2, 7))), ("n1", None)], Some("n2")),
            // Ties: the smaller name, whatever the input order.
            (&[("n2", Some(p(2, 7))), ("n1", Some(p(2, 7)))], Some("n1")),
            (&[("n1", Some(p(2, 7))), ("n2", Some(p(2, 7)))], Some("n1")),
        ];
        for (nodes, want) in cases {
            assert_eq!(&pick_promotion_candidate(nodes), want, "{nodes:?}");
        }
    }

    /// The supervisor's choice passes the node's own precheck whenever a
    /// majority is reachable, for every small combination of positions.
    #[test]
    fn picked_candidate_passes_precheck() {
        let options = [None, Some(p(1, 1)), Some(p(1, 2)), Some(p(2, 1))];
        let names = ["n0", "n1", "n2"];
        for a in options {
            for b in options {
                for c in options {
                    let nodes = [(names[0], a), (names[1], b), (names[2], c)];
                    let Some(pick) = pick_promotion_candidate(&nodes) else {
                        assert!(nodes.iter().all(|n| n.1.is_none()));
                        continue;
                    };
                    let me = nodes
                        .iter()
                        .find(|n| n.0 == pick)
                        .and_then(|n| n.1)
                        .unwrap();
                    let peers: Vec<(&str, Option<PeerStatus>)> = nodes
                        .iter()
                        .filter(|n| n.0 != pick)
                        .map(|n| {
                            (
                                n.0,
                                n.1.map(|last| PeerStatus {
                                    epoch: last.epoch,
                                    last,
                                }),
                            )
                        })
                        .collect();
                    let reachable = nodes.iter().filter(|n| n.1.is_some()).count();
                    let got = promotion_precheck(me.epoch, me, &peers, 3);
                    if reachable >= 2 {
                        assert!(got.is_ok(), "{nodes:?}: {got:?}");
                    } else {
                        assert_eq!(
                            got,
                            Err(Refusal::NoMajority {
                                reachable: 1,
                                needed: 2
                            })
                        );
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------
    // Commit index
    // ------------------------------------------------------------------

    /// The definition, checked index by index.
    fn commit_by_definition(
        epoch: u64,
        durable: u64,
        peers: &[u64],
        log: &[u64],
        old: u64,
        sync: usize,
    ) -> u64 {
        (old + 1..=durable)
            .filter(|&n| peers.iter().filter(|&&m| m >= n).count() >= sync)
            .filter(|&n| log[n as usize - 1] == epoch)
            .max()
            .unwrap_or(old)
    }

    #[test]
    fn commit_index_table() {
        let log = [1, 1, 2, 2, 3, 3]; // epochs of entries 1..=6
        let of = |i: u64| log.get((i as usize).wrapping_sub(1)).copied();
        // (durable, peers, old, sync, want), all in epoch 3
        #[rustfmt::skip]
        let cases: &[(u64, &[u64], u64, usize, u64)] = &[
            (6, &[6, 0], 0, 1, 6),
            (6, &[5, 4], 0, 1, 5),
            (6, &[4, 3], 2, 1, 2), // entry 4 is from epoch 2: counting copies never commits it
            (6, &[6, 5], 0, 2, 5),
            (4, &[6, 6], 0, 1, 0), // the primary's own fsync reached only 4 (epoch 2)
            (5, &[6, 6], 0, 1, 5), // ... and now 5, which commits 3 and 4 with it
            (6, &[0, 0], 0, 0, 6), // async: the primary's own durability
            (4, &[0, 0], 1, 0, 1),
            (6, &[6, 6], 0, 3, 0), // more sync replicas than peers: nothing commits
            (6, &[6, 6], 6, 1, 6),
            (6, &[3, 2], 5, 1, 5), // never decreases
            (6, &[], 0, 0, 6),
        ];
        for &(durable, peers, old, sync, want) in cases {
            let got = commit_index(3, durable, peers, of, old, sync);
            assert_eq!(got, want, "{durable} {peers:?} {old} {sync}");
        }
    }

    /// Every small log, durable index, pair of peer match indexes, old
    /// commit and sync count: equal to the definition.
    #[test]
    fn commit_index_matches_definition_exhaustively() {
        for log in all_logs(4, 3) {
            let Some(&epoch) = log.last() else { continue };
            let len = log.len() as u64;
            let of = |i: u64| (i >= 1).then(|| log.get(i as usize - 1).copied()).flatten();
            for durable in 0..=len {
                for m1 in 0..=len {
                    for m2 in 0..=len {
                        for old in 0..=durable {
                            for sync in 0..=3 {
                                let got = commit_index(epoch, durable, &[m1, m2], of, old, sync);
                                let want = commit_by_definition(
                                    epoch,
                                    durable,
                                    &[m1, m2],
                                    &log,
                                    old,
                                    sync,
                                );
                                assert_eq!(got, want, "{log:?} durable {durable} peers {m1},{m2} old {old} sync {sync}");
                            }
                        }
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------
    // Log matching
    // ------------------------------------------------------------------

    fn append<'a>(
        epoch: u64,
        prev: LogPos,
        entries: &'a [LogPos],
        leader_commit: u64,
    ) -> AppendRequest<'a> {
        AppendRequest {
            epoch,
            prev,
            entries,
            leader_commit,
        }
    }

    fn accept(
        truncate_from: Option<u64>,
        append_from: usize,
        match_index: u64,
        commit: u64,
    ) -> AppendOutcome {
        AppendOutcome::Accept {
            truncate_from,
            append_from,
            match_index,
            commit,
        }
    }

    fn hint(conflict_epoch: Option<u64>, first_index: u64) -> AppendOutcome {
        AppendOutcome::Mismatch(ConflictHint {
            conflict_epoch,
            first_index,
        })
    }

    #[test]
    fn append_table() {
        let log = TestLog::new(&[1, 1, 2, 2, 2]); // (index, epoch): (1,1) (2,1) (3,2) (4,2) (5,2)
        let new = [p(2, 6), p(2, 7)];
        let dup = [p(2, 3), p(2, 4)];
        let conflict = [p(2, 3), p(3, 4), p(3, 5)];
        let below_commit = [p(1, 2), p(2, 3)];
        let stale = AppendOutcome::Stale { my_epoch: 3 };
        // (my epoch, my commit, request, epoch to persist, outcome)
        #[rustfmt::skip]
        let cases = [
            // Plain append at the end; commit follows the leader.
            (2, 2, append(2, p(2, 5), &new, 7), None, accept(None, 0, 7, 7)),
            // Commit is capped by the last entry this request proved.
            (2, 2, append(2, p(2, 5), &[], 9), None, accept(None, 0, 5, 5)),
            (2, 2, append(2, p(2, 3), &[], 9), None, accept(None, 0, 3, 3)),
            // A newer epoch is adopted.
            (2, 2, append(3, p(2, 5), &new, 6), Some(3), accept(None, 0, 7, 6)),
            // A stale sender learns our epoch.
            (3, 2, append(2, p(2, 5), &new, 7), None, stale),
            // Duplicates: nothing to cut or write; commit never shrinks.
            (2, 2, append(2, p(1, 2), &dup, 4), None, accept(None, 2, 4, 4)),
            (2, 4, append(2, p(1, 2), &dup, 1), None, accept(None, 2, 4, 4)),
            // Conflict: cut the uncommitted suffix from the first conflict.
            (3, 2, append(3, p(1, 2), &conflict, 2), None, accept(Some(4), 1, 5, 2)),
            // Entries at or below our commit are skipped.
            (2, 2, append(2, p(1, 1), &below_commit, 3), None, accept(None, 2, 3, 3)),
            // Mismatch, we are shorter: resume after our last entry.
            (2, 2, append(2, p(2, 8), &[], 8), None, hint(None, 6)),
            // Mismatch, other epoch at prev: the start of our epoch 2 ...
            (3, 2, append(3, p(3, 5), &[], 8), None, hint(Some(2), 3)),
            // ... but never at or below our commit.
            (3, 3, append(3, p(3, 5), &[], 8), None, hint(Some(2), 4)),
            // A newer epoch is adopted even on a mismatch.
            (2, 2, append(4, p(4, 9), &[], 9), Some(4), hint(None, 6)),
        ];
        for (my_epoch, my_commit, req, new_epoch_to_persist, outcome) in cases {
            let got = check_append(&log, my_epoch, my_commit, &req);
            let want = AppendDecision {
                new_epoch_to_persist,
                outcome,
            };
            assert_eq!(got, Ok(want), "epoch {my_epoch} commit {my_commit} {req:?}");
        }
    }

    #[test]
    fn malformed_appends_are_refused_before_anything_else() {
        let log = TestLog::new(&[1, 1]);
        let (e3_3, e1_4, e1_3, e1_0) = ([p(3, 3)], [p(1, 4)], [p(1, 3)], [p(1, 0)]);
        #[rustfmt::skip]
        let cases = [
            (append(0, p(0, 0), &[], 0), "epoch must be at least 1"),
            (append(1, p(0, 3), &[], 0), "only index 0 has epoch 0"),
            (append(1, p(1, 0), &[], 0), "only index 0 has epoch 0"),
            (append(1, p(2, 2), &[], 0), "prev entry is newer than the request's epoch"),
            (append(2, p(1, 2), &e1_4, 0), "entries are not contiguous after prev"),
            (append(2, p(2, 2), &e1_3, 0), "entry epochs decrease"),
            (append(2, p(1, 2), &e3_3, 0), "entry is newer than the request's epoch"),
            (append(2, p(1, u64::MAX), &e1_0, 0), "entries are not contiguous after prev"),
        ];
        for (req, why) in cases {
            // Even from a newer epoch than ours: nothing is adopted.
            let got = check_append(&log, 1, 0, &req);
            assert_eq!(got, Err(AppendError::Malformed(why)), "{req:?}");
        }
    }

    #[test]
    fn conflicts_with_committed_entries_are_errors_not_truncations() {
        let log = TestLog::new(&[1, 1, 2]);
        let conflict = Err(AppendError::ConflictsWithCommitted {
            index: 2,
            commit: 2,
        });
        let e = [p(2, 2), p(2, 3)];
        assert_eq!(
            check_append(&log, 2, 2, &append(3, p(1, 1), &e, 3)),
            conflict
        );
        assert_eq!(
            check_append(&log, 2, 2, &append(3, p(2, 2), &[], 3)),
            conflict
        );
        // Inside the snapshot the epoch is unknown: committed, so it matches.
        let snap = log.compacted(2);
        let e = [p(1, 2), p(2, 3), p(3, 4)];
        let got = check_append(&snap, 2, 2, &append(3, p(1, 1), &e, 4));
        assert_eq!(got.map(|d| d.outcome), Ok(accept(None, 2, 4, 4)));
    }

    #[test]
    fn primary_backs_up_by_epoch_and_asks_for_a_snapshot_when_needed() {
        let leader = TestLog::new(&[1, 1, 3, 3, 4, 4]);
        let h = |conflict_epoch, first_index| ConflictHint {
            conflict_epoch,
            first_index,
        };
        let send = |next_index| CatchUp::Append { next_index };
        // (rejected prev, hint, next)
        #[rustfmt::skip]
        let cases = [
            (6, h(None, 3), send(3)),
            (6, h(Some(2), 3), send(3)), // we have no epoch 2: skip the peer's
            (6, h(Some(3), 3), send(5)), // just after our last epoch-3 entry
            (4, h(Some(3), 3), send(4)), // always at least one back
            (6, h(Some(1), 1), send(3)),
            (1, h(None, 0), send(1)),
        ];
        for (prev, hint, want) in cases {
            assert_eq!(
                next_index_after_reject(&leader, prev, &hint),
                want,
                "{prev} {hint:?}"
            );
        }
        let compacted = leader.compacted(3);
        let snapshot = CatchUp::InstallSnapshot;
        assert_eq!(
            next_index_after_reject(&compacted, 6, &h(Some(2), 3)),
            snapshot
        );
        assert_eq!(next_index_after_reject(&compacted, 6, &h(None, 4)), send(4));
        assert_eq!(catch_up_from(&compacted, 3), snapshot);
        assert_eq!(catch_up_from(&compacted, 99), send(7));
    }

    #[test]
    fn last_index_of_epoch_by_binary_search() {
        let log = TestLog::new(&[1, 1, 3, 3, 3, 5]);
        #[rustfmt::skip]
        let cases = [(0, Some(0)), (1, Some(2)), (2, None), (3, Some(5)), (4, None), (5, Some(6)), (6, None)];
        for (epoch, want) in cases {
            assert_eq!(last_index_of_epoch(&log, epoch), want, "epoch {epoch}");
        }
        let c = log.compacted(4);
        for (epoch, want) in [(1, None), (3, Some(5)), (5, Some(6))] {
            assert_eq!(last_index_of_epoch(&c, epoch), want, "epoch {epoch}");
        }
        assert_eq!(last_index_of_epoch(&TestLog::new(&[]), 0), Some(0));
    }

    /// Runs the primary's catch-up loop against a follower until it accepts,
    /// checking every rule on the way, then checks the logs are equal.
    /// Returns the number of round trips.
    fn replicate(
        leader: &TestLog,
        leader_commit: u64,
        follower: &mut TestLog,
        f_epoch: &mut u64,
        f_commit: &mut u64,
    ) -> usize {
        let epoch = leader.last().epoch;
        let mut next = leader.last().index + 1;
        let bound = leader.last().index as usize + 3;
        for round in 1..=bound {
            next = match catch_up_from(leader, next) {
                CatchUp::InstallSnapshot => {
                    *follower = TestLog {
                        snap: LogPos::new(leader.snap.epoch, leader.snap.index),
                        epochs: vec![],
                    };
                    *f_commit = (*f_commit).max(leader.snap.index);
                    *f_epoch = (*f_epoch).max(epoch);
                    leader.first_index()
                }
                CatchUp::Append { next_index } => next_index,
            };
            let prev = LogPos::new(leader.epoch_at(next - 1).unwrap(), next - 1);
            let entries = leader.positions(next, leader.last().index);
            let req = append(epoch, prev, &entries, leader_commit);
            let before = (follower.clone(), *f_commit);
            let d = check_append(follower, *f_epoch, *f_commit, &req)
                .unwrap_or_else(|e| panic!("{e}: {follower:?} {req:?}"));
            if let Some(e) = d.new_epoch_to_persist {
                assert!(e > *f_epoch);
                *f_epoch = e;
            }
            match d.outcome {
                AppendOutcome::Stale { .. } => panic!("leader epoch {epoch} is never stale here"),
                AppendOutcome::Mismatch(h) => {
                    assert!(h.first_index > *f_commit, "hint below commit: {h:?}");
                    let after = next_index_after_reject(leader, prev.index, &h);
                    if let CatchUp::Append { next_index } = after {
                        assert!(next_index < next, "no progress: {next} -> {next_index}");
                    }
                    next = match after {
                        CatchUp::Append { next_index } => next_index,
                        CatchUp::InstallSnapshot => 0,
                    };
                }
                AppendOutcome::Accept {
                    truncate_from,
                    append_from,
                    match_index,
                    commit,
                } => {
                    if let Some(t) = truncate_from {
                        assert!(t > *f_commit, "cut at {t} with commit {f_commit}");
                        follower.truncate_from(t);
                    }
                    for &e in &entries[append_from..] {
                        follower.push(e);
                    }
                    assert_eq!(match_index, leader.last().index);
                    assert!(commit >= *f_commit && commit <= match_index);
                    assert!(commit >= before.1, "commit went back");
                    *f_commit = commit;
                    assert_eq!(follower.last(), leader.last(), "{follower:?} vs {leader:?}");
                    let lo = follower.snap.index.max(leader.snap.index);
                    for i in lo..=leader.last().index {
                        assert_eq!(follower.epoch_at(i), leader.epoch_at(i), "index {i}");
                    }
                    return round;
                }
            }
        }
        panic!("no convergence in {bound} rounds: {leader:?} {follower:?}");
    }

    /// Could these two logs coexist in a Raft cluster whose current primary
    /// holds `leader` (ending with its no-op), with `commit` entries of the
    /// follower committed?
    fn plausible(leader: &[u64], follower: &[u64], commit: usize) -> bool {
        let Some(&epoch) = leader.last() else {
            return false;
        };
        let common = leader
            .iter()
            .zip(follower)
            .take_while(|(a, b)| a == b)
            .count();
        // Log matching: an equal (index, epoch) means an equal prefix.
        let matching = leader
            .iter()
            .zip(follower)
            .enumerate()
            .all(|(i, (a, b))| a != b || i < common);
        // The primary made every entry of its own epoch.
        let own = follower
            .iter()
            .enumerate()
            .all(|(i, &e)| e != epoch || leader.get(i) == Some(&e));
        matching && own && follower.iter().all(|&e| e <= epoch) && commit <= common
    }

    /// Every plausible pair of small logs, commit indexes and snapshot
    /// points: catch-up converges to the leader's log within a bounded
    /// number of rounds, never cuts committed entries, never lowers the
    /// commit index; afterwards, replaying any older (delayed) append
    /// changes nothing.
    #[test]
    fn catch_up_converges_for_every_small_pair_of_logs() {
        let logs = all_logs(4, 3);
        let mut runs = 0;
        for l in &logs {
            for f in &logs {
                for f_commit in 0..=f.len() {
                    if !plausible(l, f, f_commit) {
                        continue;
                    }
                    for l_commit in 0..=l.len() {
                        for l_snap in [0, l_commit] {
                            for f_snap in [0, f_commit] {
                                for f_epoch in
                                    [f.last().copied().unwrap_or(0), *l.last().unwrap_or(&0)]
                                {
                                    let leader = TestLog::new(l).compacted(l_snap as u64);
                                    let mut follower = TestLog::new(f).compacted(f_snap as u64);
                                    let (mut fe, mut fc) = (f_epoch, f_commit as u64);
                                    let rounds = replicate(
                                        &leader,
                                        l_commit as u64,
                                        &mut follower,
                                        &mut fe,
                                        &mut fc,
                                    );
                                    assert!(rounds <= l.len() + 2);
                                    runs += 1;
                                    replay_old_appends(&leader, &follower, fe, fc);
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(runs > 10_000, "only {runs} runs");
    }

    /// Once a follower equals the leader, every append the leader could
    /// have sent earlier is a no-op: no cut, nothing written, commit kept.
    fn replay_old_appends(leader: &TestLog, follower: &TestLog, f_epoch: u64, f_commit: u64) {
        let last = leader.last().index;
        for from in leader.first_index()..=last + 1 {
            for to in from.saturating_sub(1)..=last {
                let prev = LogPos::new(leader.epoch_at(from - 1).unwrap(), from - 1);
                let entries = leader.positions(from, to);
                let req = append(leader.last().epoch, prev, &entries, 0);
                let d = check_append(follower, f_epoch, f_commit, &req).unwrap();
                assert_eq!(d.new_epoch_to_persist, None);
                match d.outcome {
                    AppendOutcome::Accept {
                        truncate_from,
                        append_from,
                        commit,
                        ..
                    } => {
                        assert_eq!(truncate_from, None, "{req:?}");
                        assert_eq!(append_from, entries.len(), "{req:?}");
                        assert_eq!(commit, f_commit);
                    }
                    other => panic!("{other:?} for {req:?}"),
                }
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A log of `len` entries with non-decreasing epochs in 1..=max.
        fn log_strategy(max_len: usize) -> impl Strategy<Value = Vec<u64>> {
            proptest::collection::vec(0u64..3, 1..max_len).prop_map(|steps| {
                let mut e = 1;
                steps
                    .into_iter()
                    .map(|s| {
                        e += u64::from(s == 0);
                        e
                    })
                    .collect()
            })
        }

        proptest! {
            /// Under any sequence of peer progress reports, the commit index
            /// never decreases, never exceeds what enough nodes hold, and
            /// never lands on an entry of an older epoch.
            #[test]
            fn commit_index_is_monotone_and_current_epoch_only(
                log in log_strategy(40),
                updates in proptest::collection::vec((0usize..3, 0u64..50), 1..40),
                sync in 0usize..4,
            ) {
                let epoch = *log.last().unwrap();
                let len = log.len() as u64;
                let of = |i: u64| (i >= 1).then(|| log.get(i as usize - 1).copied()).flatten();
                let mut peers = [0u64; 2];
                let mut durable = 0;
                let mut commit = 0;
                for (who, to) in updates {
                    let to = to.min(len);
                    // Progress only moves forward; "who == 2" is the primary's fsync.
                    if who == 2 { durable = durable.max(to) } else { peers[who] = peers[who].max(to) }
                    let next = commit_index(epoch, durable, &peers, of, commit, sync);
                    prop_assert!(next >= commit);
                    if next > commit {
                        prop_assert_eq!(of(next), Some(epoch));
                        prop_assert!(next <= durable);
                        prop_assert!(peers.iter().filter(|&&m| m >= next).count() >= sync);
                    }
                    prop_assert_eq!(next, commit_by_definition(epoch, durable, &peers, &log, commit, sync));
                    commit = next;
                }
            }

            /// Longer logs than the exhaustive test: a follower that shares a
            /// prefix with the leader and then diverged in other epochs
            /// converges, with its commit kept.
            #[test]
            fn catch_up_converges_on_longer_logs(
                prefix in log_strategy(30),
                f_extra in proptest::collection::vec(0u64..2, 0..20),
                l_extra in proptest::collection::vec(0u64..2, 0..20),
                commit_frac in 0.0f64..=1.0,
                snap_frac in 0.0f64..=1.0,
            ) {
                let base = *prefix.last().unwrap();
                // The follower's divergent suffix uses odd epochs above the
                // prefix, the leader's even ones, and the leader ends with
                // its own (highest) epoch: a plausible history.
                let mut f = prefix.clone();
                let mut e = base * 2 + 1;
                for s in f_extra { e += 2 * s; f.push(e); }
                let mut l = prefix.clone();
                let mut e = base * 2 + 2;
                for s in l_extra { e += 2 * s; l.push(e); }
                l.push(e.max(f.last().copied().unwrap_or(0) + 1));
                let f_commit = (prefix.len() as f64 * commit_frac) as u64;
                let l_commit = (l.len() as f64 * commit_frac) as u64;
                let leader = TestLog::new(&l).compacted((l_commit as f64 * snap_frac) as u64);
                let mut follower = TestLog::new(&f).compacted((f_commit as f64 * snap_frac) as u64);
                let (mut fe, mut fc) = (*f.last().unwrap(), f_commit);
                replicate(&leader, l_commit, &mut follower, &mut fe, &mut fc);
                prop_assert!(fc >= f_commit);
                prop_assert_eq!(fe, *l.last().unwrap());
            }
        }
    }

    #[test]
    fn the_window_bounds_appends_and_bytes_and_heartbeats_only_when_empty() {
        let hb = Duration::from_millis(50);
        let (short, long) = (Duration::from_millis(1), Duration::from_millis(60));
        let send = |appends, bytes, probing, has| {
            next_send(appends, bytes, probing, has, short, hb, false)
        };
        assert_eq!(send(0, 0, false, true), SendDecision::Entries);
        assert_eq!(
            send(MAX_APPENDS_IN_FLIGHT - 1, 0, false, true),
            SendDecision::Entries
        );
        assert_eq!(
            send(MAX_APPENDS_IN_FLIGHT, 0, false, true),
            SendDecision::Wait
        );
        assert_eq!(
            send(1, MAX_BYTES_IN_FLIGHT, false, true),
            SendDecision::Wait
        );
        assert_eq!(
            send(1, MAX_BYTES_IN_FLIGHT - 1, false, true),
            SendDecision::Entries
        );
        // After a refusal: one at a time.
        assert_eq!(send(0, 0, true, true), SendDecision::Entries);
        assert_eq!(send(1, 0, true, true), SendDecision::Wait);
        // Idle: a heartbeat after the interval, or at once to carry a moved
        // commit index; never while an append is in flight.
        assert_eq!(send(0, 0, false, false), SendDecision::Wait);
        assert_eq!(
            next_send(0, 0, false, false, long, hb, false),
            SendDecision::Heartbeat
        );
        assert_eq!(
            next_send(0, 0, false, false, short, hb, true),
            SendDecision::Heartbeat
        );
        assert_eq!(
            next_send(1, 10, false, false, long, hb, true),
            SendDecision::Wait
        );
    }

    #[test]
    fn a_pipelined_ack_never_counts_more_than_sent_and_anything_else_drains() {
        assert_eq!(
            pipeline_step(10, 5, Some(15)),
            PipelineStep::Acked { match_index: 15 }
        );
        // A peer claiming more than it was sent holds only what it was sent.
        assert_eq!(
            pipeline_step(10, 5, Some(99)),
            PipelineStep::Acked { match_index: 15 }
        );
        assert_eq!(
            pipeline_step(10, 0, Some(10)),
            PipelineStep::Acked { match_index: 10 }
        );
        assert_eq!(
            pipeline_step(u64::MAX - 1, 5, Some(u64::MAX)),
            PipelineStep::Acked {
                match_index: u64::MAX
            }
        );
        assert_eq!(pipeline_step(10, 5, None), PipelineStep::Drain);
    }

    #[test]
    fn an_append_waits_only_when_it_starts_past_everything_handed_over() {
        // Its predecessor (ending at 10) is in: go.
        assert!(in_order(10, 10, 4));
        assert!(in_order(7, 10, 4));
        // The log itself already reaches it (a restart, a new epoch).
        assert!(in_order(10, 0, 12));
        // It overtook the append ending at 10.
        assert!(!in_order(11, 10, 4));
        assert!(!in_order(20, 0, 12));
        // Read barriers and first probes start at 0.
        assert!(in_order(0, 0, 0));
    }

    #[test]
    fn a_grant_is_withdrawn_as_candidate_behind_when_the_log_grew_meanwhile() {
        let (c, shorter, longer) = (LogPos::new(3, 10), LogPos::new(3, 9), LogPos::new(3, 11));
        assert_eq!(
            confirm_grant(true, VoteReason::Granted, c, shorter),
            (true, VoteReason::Granted)
        );
        assert_eq!(
            confirm_grant(true, VoteReason::Granted, c, longer),
            (false, VoteReason::CandidateBehind)
        );
        assert_eq!(
            confirm_grant(false, VoteReason::EpochTaken, c, longer),
            (false, VoteReason::EpochTaken),
            "a refusal keeps its own reason"
        );
    }

    #[test]
    fn an_accept_after_a_newer_epoch_was_entered_turns_stale() {
        let accept = AppendOutcome::Accept {
            truncate_from: None,
            append_from: 0,
            match_index: 7,
            commit: 3,
        };
        assert_eq!(answer_after_fsync(accept.clone(), 4, 4), accept);
        assert_eq!(
            answer_after_fsync(accept, 4, 5),
            AppendOutcome::Stale { my_epoch: 5 }
        );
        let mismatch = AppendOutcome::Mismatch(ConflictHint {
            conflict_epoch: None,
            first_index: 2,
        });
        assert_eq!(answer_after_fsync(mismatch.clone(), 4, 5), mismatch);
    }
}
