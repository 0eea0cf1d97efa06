//! kvd: the kvstore node daemon.
//!
//! Its modules form layers, each using only those below it (the test
//! `tests/layers.rs` holds the table and checks every import):
//!
//! - [`model`]: the types every layer shares (`Op`, `Record`, `Timestamp`,
//!   `LogPos`) and the pure rules (`replication::rules`,
//!   `masterless::rules`, `masterless::hlc`, [`auth`]: who may do what).
//! - [`index`], [`metrics`], [`tasks`], [`peer_http`]: the search index,
//!   the Prometheus metrics, owned background tasks, the client to peers.
//! - [`storage`]: WAL, in-memory state, snapshots, `meta`, recovery.
//! - [`replication`], [`masterless`]: the runtime of each cluster mode.
//! - [`node`]: the node's mode and runtime, the write path, the mode switch.
//! - [`api`]: the HTTP API (docs/DESIGN.md §2), thin handlers; the only place that
//!   chooses status codes.
//! - [`server`], [`config`], [`logging`], [`restore`]: the wiring: flags,
//!   the log subscriber (`KVD_LOG`, `--log-format`), running a node,
//!   `kvd restore`.

pub mod api;
pub mod auth;
pub mod config;
pub mod index;
pub mod logging;
pub mod masterless;
pub mod metrics;
pub mod model;
pub mod node;
pub mod peer_http;
pub mod replication;
pub mod restore;
pub mod server;
pub mod storage;
pub mod tasks;
