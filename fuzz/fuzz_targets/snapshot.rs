//! Fuzz target `snapshot`: see `harness::snapshot` for what it checks.
#![no_main]

#[path = "../harness/kvd.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::snapshot(data));
