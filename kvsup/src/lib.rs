//! kvsup: runs a kvstore cluster from a YAML manifest, the way an operator
//! runs a database on Kubernetes (docs/DESIGN.md §8). See ARCHITECTURE.md.
//!
//! Layers, each using only those below it (`tests/layers.rs` holds the
//! table and checks every `crate::` path against it):
//!
//! 1. decisions, no I/O but reading a manifest file: `manifest` (types,
//!    validation, restart backoff), `election` (when to elect,
//!    whom to ask), `membership` (the next step of a node change, from
//!    the configuration in effect), `auth` (the admin token, who may use
//!    the API) and `dashboard` (the web page's files and its charts'
//!    sample rings);
//! 2. effects: `process` (spawn, adopt, signal kvd), `token_file` (the
//!    admin token's file), `creds` (`tls: auto`'s CA, certificates and
//!    tokens), `metrics`, `logging`;
//! 3. plans: `launch` (a node's kvd command line, for the daemon and for
//!    `kvsup render`) and `plan` (what an apply changes: one change or a
//!    refusal);
//! 4. `daemon`: the supervisor's state and tasks (health checks, exit
//!    watchers, reconcile and failover, the commands);
//! 5. interfaces: `http` (the daemon's API), `watch` (the manifest file
//!    watcher), `render` (systemd units and Kubernetes objects of a
//!    manifest) and `chaos` (`kvsup chaos`: a check of the cluster under
//!    faults, through the daemon's API and kvclient);
//! 6. wiring: `server` (the daemon from start to stop) and the `kvsup`
//!    command in `main.rs`.

pub mod auth;
pub mod backup;
pub mod chaos;
pub mod creds;
pub mod daemon;
pub mod dashboard;
pub mod election;
pub mod http;
pub mod launch;
pub mod logging;
pub mod manifest;
pub mod membership;
pub mod metrics;
pub mod plan;
pub mod process;
pub mod render;
pub mod server;
pub mod token_file;
pub mod watch;
