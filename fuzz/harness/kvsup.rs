//! What the kvsup fuzz target does with one input. The target in
//! `fuzz/fuzz_targets/manifest.rs` and the corpus replay in
//! `kvsup/tests/fuzz_corpus.rs` both include this file, so `cargo test`
//! runs every corpus file through exactly the checks the fuzzer ran.

// The fuzz target uses the entry point; the seeds only the replay test.
#![allow(dead_code)]

use std::path::{Component, Path};

use kvsup::manifest::Manifest;
use kvsup::plan::{plan, BinaryId, Plan};

/// `manifest`: parses and validates a manifest as `kvsup apply` does
/// (`Manifest::load` reads the file as UTF-8 first, so other bytes never
/// reach the parser). An error must print, redacted or not; a manifest
/// that passes must survive a JSON round trip, be planned as no change
/// when applied over itself, and give an absolute state directory with no
/// `.` or `..` in it.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let m = match Manifest::parse(text, "fuzz.yaml") {
        Ok(m) => m,
        Err(e) => {
            let (full, redacted) = (e.to_string(), e.redacted());
            assert!(full.starts_with("fuzz.yaml"), "{full}");
            assert!(redacted.starts_with("fuzz.yaml"), "{redacted}");
            return;
        }
    };
    let json = serde_json::to_string(&m).expect("a manifest serializes");
    let back: Manifest = serde_json::from_str(&json).expect("a serialized manifest parses");
    assert_eq!(back, m, "a manifest changed in a JSON round trip");
    let kvd = BinaryId {
        path: "/usr/local/bin/kvd".into(),
        sha256: "0".repeat(64),
    };
    assert_eq!(
        plan(&m, &kvd, &m, &kvd, None),
        Ok(Plan::Settings(Vec::new())),
        "applying a manifest over itself changes something"
    );
    for n in &m.spec.nodes {
        assert!(m.node(&n.name).is_some(), "node {} not found", n.name);
    }
    // `.` and `..` resolved: the path is what the system checks judged.
    let dir = m.state_dir(Path::new("/srv/kvsup"));
    assert!(
        dir.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "state dir {} is not normalized",
        dir.display()
    );
}

/// Well-formed manifests: where the fuzzer starts (written into
/// `fuzz/corpus/manifest/` by the replay test's `write_seed_corpus`), and
/// what the replay test checks the parser accepts, so that the checks
/// after a successful parse are really reached.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("single", include_str!("../../manifests/single.yaml").into()),
        (
            "primary-2sec",
            include_str!("../../manifests/primary-2sec.yaml").into(),
        ),
        (
            "masterless",
            include_str!("../../manifests/masterless.yaml").into(),
        ),
        ("every-field", EVERY_FIELD.into()),
    ]
}

/// A manifest that sets every field, in block style.
const EVERY_FIELD: &str = "\
apiVersion: kvstore/v1
kind: Cluster
metadata:
  name: full-0
spec:
  mode: masterless
  index: false
  stateDir: /var/lib/kvsup/full-0
  nodes:
    - name: a
      port: 9001
    - name: b-2
      port: 9002
  healthCheck:
    intervalMs: 50
    failureThreshold: 5
    timeoutMs: 800
  supervisor:
    port: 9000
  restart:
    backoffInitialMs: 10
    backoffMaxMs: 300000
  rollout:
    readyTimeoutMs: 30000
    stopGraceMs: 5000
  kvdArgs: [\"--write-quorum=2\", \"--max-value-bytes\", \"1024\"]
";
