//! `kvsup chaos` against a kvsup-run 3-node cluster: with kills and stops
//! it reports nothing lost and nothing violated (exit 0) and saves its
//! history; on a cluster that commits without any secondary
//! (`--sync-replicas=0`) it finds violations (exit 1); on a cluster whose
//! manifest does not say `chaos: allowed` it refuses (exit 2) and changes
//! nothing; `--partition` is refused.
//!
//! `KVSTORE_KVSUP_CHAOS_SECS` sets the first run's length (default 60).
//! `KVSTORE_CHAOS_KVD_ARGS` (comma-separated) adds kvd flags to it: with
//! `--sync-replicas=0` it fails.

use std::collections::HashMap;
use std::time::Duration;

use kvstore_testkit::linearizability::{Kind, Operation};
use kvstore_testkit::sup::{kvd_args_spec, Supervised};
use kvstore_testkit::{env_u64, run_to_exit_in};
use tempfile::TempDir;

/// The number after `label` on a line of the report.
fn number_after(report: &str, label: &str) -> Option<u64> {
    let line = report.lines().find(|l| l.starts_with(label))?;
    line[label.len()..].split_whitespace().next()?.parse().ok()
}

fn pids(c: &Supervised) -> HashMap<String, (u64, u64)> {
    c.status().unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["name"].as_str().unwrap().to_string();
            let pid = n["pid"].as_u64().unwrap_or(0);
            (name, (pid, n["restarts"].as_u64().unwrap_or(0)))
        })
        .collect()
}

#[test]
fn kvsup_chaos_with_kills_and_stops_reports_nothing_lost_and_nothing_violated() {
    let secs = env_u64("KVSTORE_KVSUP_CHAOS_SECS", 60);
    let tmp = TempDir::new().unwrap();
    let extra = format!(
        "  chaos: allowed\n{}",
        kvd_args_spec("KVSTORE_CHAOS_KVD_ARGS")
    );
    let c = Supervised::apply(tmp.path(), 3, &extra).unwrap();
    let history = tmp.path().join("history.jsonl");
    let (duration, history_arg) = (format!("{secs}s"), history.display().to_string());
    let args = [
        "chaos",
        "-f",
        "cluster.yaml",
        "--duration",
        &duration,
        "--kill",
        "--stop",
        "--history",
        &history_arg,
    ];
    // The run, the recoveries and the check, with room to spare.
    let timeout = Duration::from_secs(secs + 600);
    let (status, out) = run_to_exit_in(Some(tmp.path()), "kvsup", &args, timeout).unwrap();
    eprintln!("{out}");
    assert_eq!(
        number_after(&out, "acknowledged writes lost:"),
        Some(0),
        "{out}"
    );
    assert_eq!(
        number_after(&out, "linearizability violations:"),
        Some(0),
        "{out}"
    );
    assert!(out.contains("verdict: PASS"), "{out}");
    assert_eq!(status.code(), Some(0), "{out}");

    // Every chosen fault hit the primary and a secondary.
    let faults = number_after(&out, "faults:").unwrap();
    assert!(faults >= 4, "{out}");
    for fault in ["Kill", "Stop"] {
        for role in ["(primary)", "(secondary)"] {
            assert!(
                out.lines().any(|l| l.contains(fault) && l.contains(role)),
                "no {fault} of a {role}: {out}"
            );
        }
    }
    assert!(out.contains("KillAlone"), "no primary killed alone: {out}");
    // The supervisor restarted the killed nodes.
    let restarts: u64 = pids(&c).values().map(|(_, r)| r).sum();
    assert!(restarts >= 2, "{restarts} restarts: {out}");

    // The history is saved, one operation a line, on the run's own keys,
    // and holds every kind of operation.
    let text = std::fs::read_to_string(&history).unwrap();
    let ops: Vec<Operation> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(ops.len() > 1_000, "{} operations", ops.len());
    assert!(ops.iter().all(|o| o.key.starts_with("chaos/")));
    let has = |f: fn(&Kind) -> bool| ops.iter().any(|o| f(&o.kind));
    assert!(has(|k| matches!(k, Kind::Write(_))));
    assert!(has(|k| matches!(k, Kind::Delete { .. })));
    assert!(has(|k| matches!(k, Kind::Read(Some(_)))));
    assert!(has(|k| matches!(k, Kind::Cas { ok: Some(true), .. })));
    assert!(ops.iter().any(|o| o.ret.is_none()), "no unknown outcome");
    c.wait_converged(Duration::from_secs(30)).unwrap();
}

/// A primary that acknowledges writes no secondary holds loses them when
/// it is killed alone (its secondaries stopped): reads after the failover
/// miss values that were read or acknowledged before it.
#[test]
fn kvsup_chaos_finds_what_a_cluster_without_synchronous_replicas_loses() {
    let tmp = TempDir::new().unwrap();
    let extra = "  chaos: allowed\n  kvdArgs: [\"--sync-replicas=0\"]\n";
    let _c = Supervised::apply(tmp.path(), 3, extra).unwrap();
    let args = [
        "chaos",
        "-f",
        "cluster.yaml",
        "--duration",
        "40s",
        "--kill",
        "--stop",
    ];
    let t = Duration::from_secs(600);
    let (status, out) = run_to_exit_in(Some(tmp.path()), "kvsup", &args, t).unwrap();
    eprintln!("{out}");
    assert!(out.contains("KillAlone"), "{out}");
    let lost = number_after(&out, "acknowledged writes lost:").unwrap();
    let violations = number_after(&out, "linearizability violations:").unwrap();
    assert!(lost + violations > 0, "{out}");
    assert!(out.contains("verdict: FAIL"), "{out}");
    assert_eq!(status.code(), Some(1), "{out}");
}

#[test]
fn kvsup_chaos_refuses_a_cluster_that_does_not_allow_it_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let before = pids(&c);
    let events = c.sup_get("/v1/events").unwrap();
    let args = ["chaos", "-f", "cluster.yaml", "--duration", "5s", "--kill"];
    let t = Duration::from_secs(60);
    let (status, out) = run_to_exit_in(Some(tmp.path()), "kvsup", &args, t).unwrap();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("chaos: allowed"), "{out}");

    // A partition is refused too, on a cluster that allows chaos (the same
    // cluster, named by a manifest that allows it).
    let allowed = std::fs::read_to_string(&c.manifest).unwrap() + "  chaos: allowed\n";
    std::fs::write(tmp.path().join("allowed.yaml"), allowed).unwrap();
    let args = ["chaos", "-f", "allowed.yaml", "--partition", "--kill"];
    let (status, out) = run_to_exit_in(Some(tmp.path()), "kvsup", &args, t).unwrap();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("--partition is not supported"), "{out}");

    // Nothing was killed or restarted, the supervisor logged nothing new,
    // no history was written.
    assert_eq!(pids(&c), before);
    assert_eq!(c.sup_get("/v1/events").unwrap(), events);
    assert!(!c.state_dir.join("chaos").exists());
    c.wait_ready(Duration::from_secs(10)).unwrap();
}
