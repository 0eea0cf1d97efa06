//! The kvd fuzz corpora, replayed: every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` goes through the same checks the fuzz
//! target runs (`fuzz/harness/kvd.rs`), so a decoder change that would
//! crash on an input the fuzzer once found, or stop round-tripping one,
//! fails plain `cargo test`, with no fuzzer installed. The seeds are
//! well-formed inputs each decoder must accept, which proves the
//! round-trip checks are reached rather than skipped by an early error.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

#[path = "../../fuzz/harness/kvd.rs"]
mod harness;
#[path = "../../fuzz/harness/replay.rs"]
mod replay;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kvd::masterless::node::{decode_frames, decode_stream};
use kvd::replication::node::decode_append;
use kvd::storage::record::{self, Frame, Limits, Record};
use kvd::storage::snapshot::{self, Source};
use kvd::storage::State;

const TARGETS: [(&str, replay::Check); 4] = [
    ("wal_record", harness::wal_record),
    ("snapshot", harness::snapshot),
    ("append", harness::append),
    ("ml_stream", harness::ml_stream),
];

fn fuzz_dir() -> PathBuf {
    replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn corpora_and_regressions_replay_without_a_failure() {
    for (target, check) in TARGETS {
        replay::replay(&fuzz_dir(), target, check, 10);
    }
}

#[test]
fn seeds_pass_their_target() {
    for (target, check) in TARGETS {
        let seeds = harness::seeds(target);
        assert!(!seeds.is_empty(), "{target}");
        for (_, data) in seeds {
            check(&data);
        }
    }
}

#[test]
fn wal_seeds_are_a_log_and_its_faults() {
    let seeds: HashMap<_, _> = harness::seeds("wal_record").into_iter().collect();
    assert!(Record::decode_payload(&seeds["payload"]).is_ok());
    for (name, valid) in [("log", 12), ("torn-tail", 11), ("damaged-middle", 1)] {
        let buf = &seeds[name];
        let (mut off, mut n) = (0, 0);
        while let Frame::Valid { payload, next } = record::read_frame(buf, off) {
            Record::decode_payload(payload).unwrap();
            (off, n) = (next, n + 1);
        }
        assert_eq!(n, valid, "{name}: valid frames before the fault");
    }
}

#[test]
fn snapshot_seeds_load_as_own_and_from_a_peer() {
    let fs = harness::MemFs::default();
    let path = Path::new("/s.snap");
    for (name, data) in harness::seeds("snapshot") {
        fs.put(path, data);
        for source in [Source::Own, Source::Peer(&Limits::default())] {
            let meta = snapshot::load(&fs, path, &State::new(), None, source);
            assert_eq!(meta.unwrap().last_index, 4, "{name}");
        }
    }
}

#[test]
fn wire_seeds_decode() {
    for (name, data) in harness::seeds("append") {
        assert!(decode_append(&data).is_ok(), "append seed {name}");
    }
    for (name, data) in harness::seeds("ml_stream") {
        let ok = if name == "buckets-answer" {
            decode_frames(&data, 0).is_ok()
        } else {
            decode_stream(&data).is_ok()
        };
        assert!(ok, "ml_stream seed {name}");
    }
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<name>`, where a fuzz
/// run starts from them: `cargo test -p kvd --test fuzz_corpus --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files into fuzz/corpus; run by hand before a first fuzz run"]
fn write_seed_corpus() {
    for (target, _) in TARGETS {
        replay::write_seeds(&fuzz_dir(), target, harness::seeds(target));
    }
}
