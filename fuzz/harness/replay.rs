//! Replaying fuzz inputs under `cargo test`: shared by
//! `kvd/tests/fuzz_corpus.rs` and `kvsup/tests/fuzz_corpus.rs`.

// Each replay test uses part of this file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fuzz target's checks of one input (see `kvd.rs`, `kvsup.rs` here).
pub type Check = fn(&[u8]);

/// `fuzz/` of the repository, from a crate beside it.
pub fn fuzz_dir(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("../fuzz")
}

/// Files of `dir`, sorted; none if it does not exist.
pub fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` over every file of `corpus/<target>/`, which must hold at
/// least `min_files` (a corpus that moved or went empty would make the
/// replay vacuous), then over every file of `regressions/<target>/`; fails
/// naming each input that panicked.
pub fn replay(fuzz_dir: &Path, target: &str, check: Check, min_files: usize) {
    let corpus = inputs(&fuzz_dir.join("corpus").join(target));
    assert!(
        corpus.len() >= min_files,
        "{target}: {} corpus files, expected at least {min_files}",
        corpus.len()
    );
    let regressions = inputs(&fuzz_dir.join("regressions").join(target));
    let failed: Vec<String> = corpus
        .iter()
        .chain(&regressions)
        .filter(|path| {
            let data = match std::fs::read(path) {
                Ok(data) => data,
                // A fuzzer running beside the tests replaces corpus files
                // as it shrinks them; one gone since the listing is no
                // input any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
                Err(e) => panic!("{}: {e}", path.display()),
            };
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: inputs that fail: {failed:?}");
}

/// Writes `seeds` into `corpus/<target>/seed-<name>`, where a first fuzz
/// run starts from them.
pub fn write_seeds(fuzz_dir: &Path, target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("fuzz/corpus is writable");
    for (name, data) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("fuzz/corpus is writable");
    }
}
