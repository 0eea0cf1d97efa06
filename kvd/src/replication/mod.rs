//! Primary/secondary replication (docs/DESIGN.md §4): Raft's log rules, with
//! elections started from outside (`POST /promote_to_primary`, or `kvsup`).
//!
//! # Contract
//!
//! - Every log entry has `(index, epoch)`. Epochs never decrease along a log,
//!   and index 0 is the empty log's sentinel with epoch 0.
//! - A node persists (fsync) its current epoch and its vote before it acts on
//!   them or answers anyone, and grants each epoch at most once, so at most
//!   one node can win a given epoch.
//! - Only the primary of the current epoch appends client writes. An entry is
//!   committed when it is durable on the primary and on `--sync-replicas`
//!   secondaries (a majority by default) AND it, or a later entry of the
//!   primary's own epoch, was counted so: older-epoch entries are never
//!   committed by counting replicas, only through a newer entry.
//! - A secondary never truncates a committed entry; it truncates only an
//!   uncommitted suffix that conflicts with the primary's log.
//! - Anyone who sees a higher epoch than its own adopts it and, if it was a
//!   primary, steps down: a deposed primary can never acknowledge a write.
//!
//! # Promotion, step by step
//!
//! 1. [`rules::promotion_precheck`] over the peers' reported status: refuse
//!    (409) when a reachable peer is more up to date or no majority is
//!    reachable. Nothing has changed yet.
//! 2. A pre-vote round ([`rules::VoteRequest::pre_vote`]), counted with
//!    [`rules::tally`]: peers answer "would you grant?" without changing
//!    state, so a promotion that would fail leaves the cluster untouched.
//! 3. The candidate votes for itself through [`rules::decide_vote`] on its
//!    own state and persists the new epoch, then runs the real vote round and
//!    tallies it again.
//! 4. Won: become primary, append a no-op in the new epoch (which is what
//!    lets older entries commit), and replicate.
//!
//! # Code map
//!
//! - [`rules`]: every decision (votes, tally, commit index, log matching,
//!   back-up and snapshot choice, step-down, failover candidate) as a plain
//!   function over state, without I/O. The runtime around it moves bytes,
//!   persists what a decision says to persist, and nothing else.

pub mod config;
pub mod node;
pub mod rules;
