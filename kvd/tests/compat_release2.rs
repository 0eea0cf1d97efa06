//! A data dir of the second release opens: the fixtures under
//! `kvd/tests/fixtures/release2-*` were written by that release's kvd
//! (`make-release2.sh` says how, and which writes): a format 3 snapshot
//! (versions; masterless: stamps and tombstones too), then WAL format 2
//! records after it, transactions among them. This release's kvd, run on
//! a copy, must list every key with the value and versions that release
//! listed itself (`listing.json`, saved by the script before it stopped
//! the node). A write then goes into a new segment in this release's
//! format, and a restart reads both.
//!
//! Runs the real binary on a free port.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod compat;

use compat::{opens_and_keeps_every_key_and_version, shown_items, Fixture};

/// The fixture `name`, with what its own release listed.
fn release2(name: &'static str) -> Fixture {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("listing.json");
    let page: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    Fixture {
        name,
        expected: shown_items(&page),
        gone: &["b", "gone", "filler", "pad", "k/1", "k/2", "k/3", "k/4"],
        segment: ("00000000000000000023.wal", 2),
        next_index: 32,
    }
}

#[test]
fn a_single_nodes_data_dir_of_the_second_release_opens_with_its_versions() {
    opens_and_keeps_every_key_and_version(&release2("release2-single"), &[]);
}

#[test]
fn a_masterless_data_dir_of_the_second_release_opens_with_its_versions() {
    // A peer that never answers: the node takes writes alone (quorum 1).
    let args = ["--mode", "masterless", "--peers", "http://127.0.0.1:9"];
    opens_and_keeps_every_key_and_version(&release2("release2-masterless"), &args);
}
