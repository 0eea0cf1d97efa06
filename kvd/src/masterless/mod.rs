//! Masterless mode (docs/DESIGN.md §5): every node accepts writes.
//!
//! - [`hlc`]: the hybrid logical clock that stamps every write.
//! - [`crate::storage::lww`] (in storage, which applies it): last-write-wins
//!   merge with tombstones, per-key stamps, anti-entropy buckets and their
//!   digests.
//! - [`rules`]: the decisions (stream positions, what a receiver makes of
//!   a batch, write quorums, stable times) as plain functions.
//! - [`node`]: the runtime: streaming each node's own writes to every peer
//!   from the peer's durable position, write quorums, anti-entropy, tombstone
//!   purging below the global stable time, and the `/internal/ml/*` wire
//!   formats.
//!
//! The storage engine does the logging and applying (`Engine::ingest`,
//! `Engine::rebase`); this module moves bytes between nodes and decides
//! what to ask for.

pub mod hlc;
pub mod node;
pub mod rules;
