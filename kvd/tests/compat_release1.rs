//! A data dir of the first release opens: the fixtures under
//! `kvd/tests/fixtures/release1-*` were written by that release's kvd
//! (`make-release1.sh` says how, and which writes): a format 1 snapshot
//! (single node) or format 2 (masterless, with tombstones), then WAL format
//! 1 records after it. This release's kvd, run on a copy, must show every
//! key with its value; keys the snapshot holds get versions 0/0/1, keys the
//! WAL wrote after it real indexes. A write then goes into a new segment in
//! this release's format, and a restart reads both.
//!
//! Runs the real binary on a free port.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod compat;

use compat::{opens_and_keeps_every_key_and_version, Fixture, Shown};

fn release1(name: &'static str) -> Fixture {
    Fixture {
        name,
        expected: expected(),
        gone: &["b", "gone", "filler", "pad", "k/3"],
        segment: ("00000000000000000023.wal", 1),
        next_index: 30,
    }
}

/// What the first release's writes leave, read by this one (indexes in
/// `make-release1.sh`; the snapshot is at 22).
fn expected() -> Vec<Shown> {
    let shown = |k: &str, v: &[u8], versions| (k.to_string(), v.to_vec(), versions);
    vec![
        shown("a", b"3", [0, 24, 2]),
        shown("bin", b"\x00\xff\x01\x80", [0, 0, 1]),
        shown("bin2", b"\xff\xfe", [28, 28, 1]),
        shown("dir/with space", "é".as_bytes(), [0, 0, 1]),
        shown("k/1", b"one", [0, 0, 1]),
        shown("k/2", b"TWO", [0, 28, 2]),
        shown("k/4", b"four", [28, 28, 1]),
        shown("new", b"fresher", [26, 27, 2]),
    ]
}

#[test]
fn a_single_nodes_data_dir_of_the_first_release_opens_with_its_versions() {
    opens_and_keeps_every_key_and_version(&release1("release1-single"), &[]);
}

#[test]
fn a_masterless_data_dir_of_the_first_release_opens_with_its_versions() {
    // A peer that never answers: the node takes writes alone (quorum 1).
    let args = ["--mode", "masterless", "--peers", "http://127.0.0.1:9"];
    opens_and_keeps_every_key_and_version(&release1("release1-masterless"), &args);
}
