//! kvsup: runs a kvstore cluster from a YAML manifest, the way an operator
//! runs a database on Kubernetes (DESIGN §8). See ARCHITECTURE.md.

pub mod daemon;
pub mod election;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod process;
pub mod watch;
