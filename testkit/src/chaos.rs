//! The chaos tests' clients, which are the product's (`kvsup chaos` runs
//! the same): see [`kvcheck::clients`], and the fault schedule,
//! [`kvcheck::faults`]. What a fault does is each test's own (kills and
//! stops through kvsup on loopback; kills, stops and cut links across test
//! hosts).

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use kvcheck::clients::{
    lost_writes, parse_id, value_id, Clients, Endpoints, Progress, Workload, CLIENTS, KEYS,
    MIN_BULKS, MIN_CAS, MIN_DELETES, MIN_READS, MIN_UNKNOWN, MIN_WRITES, OPS_AFTER_EACH_FAULT,
    RECOVERY,
};
pub use kvcheck::faults::{aim, at_both, Schedule};
use kvcheck::linearizability::Operation;

/// A linearizable read of every key `k0`..`k31` (retrying for up to 30 s,
/// since the run is over), recorded in `history`; the values read. A
/// cluster that cannot answer fails the test.
pub async fn final_reads(
    to: &Endpoints,
    start: Instant,
    history: &mut Vec<Operation>,
) -> HashMap<String, Option<u64>> {
    let work = Workload::default();
    kvcheck::clients::final_reads(to, &work, Duration::from_secs(30), start, history)
        .await
        .expect("the final reads of a recovered cluster")
}
