//! Fuzz target `wal_record`: see `harness::wal_record` for what it checks.
#![no_main]

#[path = "../harness/kvd.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::wal_record(data));
