//! kvd: the kvstore node daemon.
//!
//! - [`storage`]: WAL, in-memory state, snapshots, recovery.
//! - [`index`]: full-text (BM25) and TF-IDF similarity indexes (`--index`).
//! - [`api`]: the HTTP API (DESIGN §2), thin handlers over the engine.
//! - [`metrics`]: Prometheus metrics.
//! - [`config`]: command-line configuration.
//! - [`logging`]: the log subscriber (`KVD_LOG`, `--log-format`).
//! - [`server`]: wires the parts together and runs a node.

pub mod api;
pub mod config;
pub mod index;
pub mod logging;
pub mod masterless;
pub mod metrics;
pub mod model;
pub mod node;
pub mod replication;
pub mod server;
pub mod storage;
pub mod tasks;
