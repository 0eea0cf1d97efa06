//! Fuzz target `ml_stream`: see `harness::ml_stream` for what it checks.
#![no_main]

#[path = "../harness/kvd.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ml_stream(data));
