//! The manifest fuzz corpus, replayed: every file of
//! `fuzz/corpus/manifest/` and `fuzz/regressions/manifest/` goes through
//! the same checks the fuzz target runs (`fuzz/harness/kvsup.rs`), so a
//! parser change that would crash on an input the fuzzer once found fails
//! plain `cargo test`, with no fuzzer installed. The seeds are manifests
//! the parser must accept, which proves the checks after a successful
//! parse are reached.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

#[path = "../../fuzz/harness/kvsup.rs"]
mod harness;
#[path = "../../fuzz/harness/replay.rs"]
mod replay;

use std::path::PathBuf;

use kvsup::manifest::Manifest;

fn fuzz_dir() -> PathBuf {
    replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn corpus_and_regressions_replay_without_a_failure() {
    replay::replay(&fuzz_dir(), "manifest", harness::manifest, 10);
}

/// `stateDir: /../etc/kvsup` is `/etc/kvsup`. It once passed validation:
/// `..` of the root normalized to `/..`, in which the system directory
/// check did not see `/etc`.
#[test]
fn a_state_dir_climbing_out_of_the_root_is_still_checked() {
    let path = fuzz_dir().join("regressions/manifest/state-dir-above-the-root.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let e = Manifest::parse(&text, "m").unwrap_err();
    assert_eq!(e.field, "spec.stateDir", "{e}");
    assert!(
        e.message.contains("/etc/kvsup is a system directory"),
        "{e}"
    );
}

#[test]
fn seeds_parse_and_pass_the_target() {
    for (name, data) in harness::seeds() {
        let text = std::str::from_utf8(&data).unwrap();
        assert!(Manifest::parse(text, "seed").is_ok(), "seed {name}");
        harness::manifest(&data);
    }
}

/// Writes the seeds into `fuzz/corpus/manifest/seed-<name>`, where a fuzz
/// run starts from them: `cargo test -p kvsup --test fuzz_corpus --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files into fuzz/corpus; run by hand before a first fuzz run"]
fn write_seed_corpus() {
    replay::write_seeds(&fuzz_dir(), "manifest", harness::seeds());
}
