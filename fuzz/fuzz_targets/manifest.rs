//! Fuzz target `manifest`: see `harness::manifest` for what it checks.
#![no_main]

#[path = "../harness/kvsup.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::manifest(data));
