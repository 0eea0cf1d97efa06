//! Fuzz target `append`: see `harness::append` for what it checks.
#![no_main]

#[path = "../harness/kvd.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::append(data));
