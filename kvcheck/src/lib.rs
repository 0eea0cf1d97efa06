//! kvcheck: kvstore's Jepsen-style check, for the product (`kvsup chaos`)
//! and the end-to-end tests alike.
//!
//! - [`clients`]: 16 concurrent clients (puts, deletes, bulks,
//!   linearizable reads, compare-and-sets through kvclient, one attempt
//!   per call) that record a history; the final reads; the acknowledged
//!   writes the final state cannot show;
//! - [`linearizability`]: the per-key linearizability checker that judges
//!   the history;
//! - [`history`]: a history as JSON lines, one operation a line;
//! - [`faults`]: the fault schedule (which fault next, aimed where, and
//!   when the run is over).
//!
//! What a fault does is the caller's: this crate drives clients, plans
//! faults and judges.

pub mod clients;
pub mod faults;
pub mod history;
pub mod linearizability;
