//! TTL, leases, locks and watch against real kvd processes (docs/DESIGN.md
//! §2.15-§2.17, §9.1, §9.2): the library's calls, lock contention and
//! fencing tokens, a lock lost behind its holder's back, a watch that
//! resumes across a kvd restart with no gap and no duplicate, and the CLI's
//! `lock` and `watch` as the subprocesses scripts run.

// Test helpers outside #[test] functions unwrap too: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvclient::lock::{Lock, LockOptions};
use kvclient::{
    Client, Error, EventKind, Expiry, PutOptions, Txn, TxnOp, WatchEvent, WatchRequest,
};
use kvstore_testkit::{bin, wait_until, Kvd};
use tempfile::TempDir;

/// Bound for anything that should be quick, on a loaded machine.
const GENEROUS: Duration = Duration::from_secs(30);

fn start(tmp: &TempDir, extra: &[&str]) -> Kvd {
    Kvd::start(&tmp.path().join("n0"), extra).unwrap_or_else(|e| panic!("kvd: {e:#}"))
}

fn client(kvd: &Kvd) -> Client {
    Client::builder()
        .endpoint(kvd.url())
        .request_timeout(Duration::from_secs(5))
        .retry_deadline(GENEROUS)
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn puts_with_a_ttl_a_lease_or_keep_ttl_and_the_lease_calls() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    runtime().block_on(async {
        kv.put(
            "t/long",
            "v",
            PutOptions::new().ttl(Duration::from_secs(600)),
        )
        .await
        .unwrap();
        let v = kv.get_versioned("t/long").await.unwrap().unwrap();
        assert!(
            v.ttl_ms.is_some_and(|ms| (1..=600_000).contains(&ms)),
            "{v:?}"
        );
        assert_eq!(v.lease, None);
        kv.put("t/long", "w", PutOptions::new().keep_ttl())
            .await
            .unwrap();
        assert!(kv
            .get_versioned("t/long")
            .await
            .unwrap()
            .unwrap()
            .ttl_ms
            .is_some());
        kv.set("t/long", "x").await.unwrap();
        assert_eq!(
            kv.get_versioned("t/long").await.unwrap().unwrap().ttl_ms,
            None
        );

        kv.put(
            "t/short",
            "v",
            PutOptions::new().ttl(Duration::from_millis(300)),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + GENEROUS;
        while kv.get("t/short").await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "t/short never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let lease = kv.lease_grant(Duration::from_secs(60)).await.unwrap();
        kv.put("l/a", "1", PutOptions::new().lease(lease))
            .await
            .unwrap();
        Txn::new()
            .success(TxnOp::put_with("l/b", "2", Expiry::Lease(lease)))
            .commit(&kv)
            .await
            .unwrap();
        let v = kv.get_versioned("l/a").await.unwrap().unwrap();
        assert_eq!(v.lease, Some(lease));
        let info = kv.lease_info(lease).await.unwrap().unwrap();
        assert_eq!(
            (info.keys, info.more),
            (vec!["l/a".to_owned(), "l/b".to_owned()], false)
        );
        assert_eq!(kv.lease_keepalive(lease).await.unwrap().id, lease);
        assert_eq!(kv.lease_revoke(lease).await.unwrap(), 2);
        assert_eq!(kv.get("l/a").await.unwrap(), None);
        assert_eq!(kv.lease_info(lease).await.unwrap(), None);
        let err = kv.lease_keepalive(lease).await.unwrap_err();
        assert!(matches!(err, Error::LeaseNotFound { .. }), "{err:?}");
        let err = kv
            .put("l/c", "3", PutOptions::new().lease(lease))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseNotFound { .. }), "{err:?}");
        assert_eq!(kv.get("l/c").await.unwrap(), None, "nothing written");
    });
}

#[test]
fn a_contender_waits_for_the_holder_and_gets_a_larger_token() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    runtime().block_on(async {
        let opts = LockOptions {
            ttl: Duration::from_secs(3),
            wait: None,
        };
        let first = Lock::acquire(&kv, "locks/a", opts).await.unwrap();
        let held = kv.get_versioned("locks/a").await.unwrap().unwrap();
        assert_eq!(
            (held.mod_index, held.lease),
            (first.token(), Some(first.lease()))
        );
        let err = Lock::acquire(
            &kv,
            "locks/a",
            LockOptions {
                wait: Some(Duration::from_millis(300)),
                ..opts
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::LockTimeout { .. }), "{err:?}");

        let other = kv.clone();
        let second = tokio::spawn(async move {
            Lock::acquire(
                &other,
                "locks/a",
                LockOptions {
                    wait: Some(GENEROUS),
                    ..opts
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second took a held lock");
        let first_token = first.token();
        first.release().await.unwrap();
        let second = second.await.unwrap().unwrap();
        assert!(
            second.token() > first_token,
            "{} <= {first_token}",
            second.token()
        );
        second.release().await.unwrap();
        assert_eq!(
            kv.get("locks/a").await.unwrap(),
            None,
            "release deletes the key"
        );
    });
}

#[test]
fn lost_fires_when_the_lease_is_revoked_behind_the_holders_back() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    runtime().block_on(async {
        let opts = LockOptions {
            ttl: Duration::from_millis(900),
            wait: None,
        };
        let guard = Lock::acquire(&kv, "locks/b", opts).await.unwrap();
        assert!(!guard.is_lost());
        kv.lease_revoke(guard.lease()).await.unwrap();
        tokio::time::timeout(GENEROUS, guard.lost())
            .await
            .expect("lost() never fired");
        assert!(guard.is_lost());
    });
}

/// The next `n` events that are not progress, within [`GENEROUS`] (progress
/// events keep coming: the bound is on the whole wait).
async fn changes(watch: &mut kvclient::Watch, n: usize) -> Vec<WatchEvent> {
    let deadline = tokio::time::Instant::now() + GENEROUS;
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} events in time: {out:?}", out.len()))
            .unwrap();
        if event.kind != EventKind::Progress {
            out.push(event);
        }
    }
    out
}

#[test]
fn watch_streams_puts_deletes_and_expiries_in_order() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    runtime().block_on(async {
        let first = kv.set("w/a", "1").await.unwrap();
        kv.put(
            "w/b",
            "2",
            PutOptions::new().ttl(Duration::from_millis(300)),
        )
        .await
        .unwrap();
        kv.delete("w/a").await.unwrap();
        kv.set("other", "x").await.unwrap();
        let mut watch = kv.watch(
            WatchRequest::prefix("w/")
                .from_index(first)
                .prev_value(true),
        );
        let events = changes(&mut watch, 4).await;
        let seen: Vec<(EventKind, &str)> = events
            .iter()
            .map(|e| (e.kind, e.key.as_deref().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                (EventKind::Put, "w/a"),
                (EventKind::Put, "w/b"),
                (EventKind::Delete, "w/a"),
                (EventKind::Expire, "w/b"),
            ]
        );
        assert_eq!(events[0].index, first);
        assert_eq!(events[0].value.as_deref(), Some(&b"1"[..]));
        assert_eq!(events[2].prev_value.as_deref(), Some(&b"1"[..]));
    });
}

#[test]
fn watch_resumes_across_a_restart_with_no_gap_and_no_duplicate() {
    let tmp = TempDir::new().unwrap();
    let mut kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    let rt = runtime();
    let start_index = rt.block_on(kv.set("r/0", "0")).unwrap();
    let mut watch = kv.watch(
        WatchRequest::prefix("r/")
            .from_index(start_index)
            .progress(Duration::from_millis(200))
            .reconnect_budget(Duration::from_secs(60)),
    );
    let mut got = rt.block_on(async {
        let mut got = changes(&mut watch, 1).await;
        // One bulk: one record with three events, so the break can fall
        // inside a record.
        kv.bulk_set(&[
            ("r/1".into(), "1".into()),
            ("r/2".into(), "2".into()),
            ("r/3".into(), "3".into()),
        ])
        .await
        .unwrap();
        got.extend(changes(&mut watch, 2).await);
        got
    });
    kvd.terminate().unwrap();
    kvd.restart().unwrap();
    rt.block_on(async {
        for i in 4..7 {
            kv.set(&format!("r/{i}"), i.to_string()).await.unwrap();
        }
        got.extend(changes(&mut watch, 4).await);
    });
    let keys: Vec<String> = got.iter().map(|e| e.key.clone().unwrap()).collect();
    let want: Vec<String> = (0..7).map(|i| format!("r/{i}")).collect();
    assert_eq!(keys, want);
}

#[test]
fn a_watch_from_an_index_no_longer_held_ends_compacted() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", "1"]);
    let kv = client(&kvd);
    runtime().block_on(async {
        let big = vec![b'x'; 300 << 10];
        for i in 0..8 {
            kv.set(&format!("c/{i}"), big.clone()).await.unwrap();
        }
        let mut watch = kv.watch(WatchRequest::prefix("c/").from_index(1));
        let err = watch.next().await.unwrap_err();
        assert!(
            matches!(err, Error::Compacted { oldest_index, .. } if oldest_index > 1),
            "{err:?}"
        );
    });
}

fn kvclient_cmd(kvd: &Kvd) -> Command {
    let mut cmd = Command::new(bin("kvclient"));
    cmd.env_remove("KV_ENDPOINTS")
        .arg("--endpoints")
        .arg(kvd.url());
    cmd
}

#[test]
fn cli_lock_runs_the_command_with_its_token_and_exits_with_its_status() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let out = tmp.path().join("env");
    let script = format!(
        "echo \"$KV_LOCK_KEY $KV_LOCK_TOKEN $KV_LOCK_LEASE\" > {}; exit 7",
        out.display()
    );
    let status = kvclient_cmd(&kvd)
        .args([
            "lock",
            "locks/cli",
            "--ttl-ms",
            "3000",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    let env = std::fs::read_to_string(&out).unwrap();
    let fields: Vec<&str> = env.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{env:?}");
    assert_eq!(fields[0], "locks/cli");
    assert!(fields[1].parse::<u64>().unwrap() > 0);
    let kv = client(&kvd);
    assert_eq!(
        runtime().block_on(kv.get("locks/cli")).unwrap(),
        None,
        "released when the command exited"
    );

    // Held by someone else: not taken within --wait-ms is exit 5.
    let rt = runtime();
    let guard = rt
        .block_on(Lock::acquire(&kv, "locks/cli", LockOptions::default()))
        .unwrap();
    let output = kvclient_cmd(&kvd)
        .args(["lock", "locks/cli", "--wait-ms", "200", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("kvclient: "));
    rt.block_on(guard.release()).unwrap();
}

#[test]
fn cli_lock_stops_the_command_and_exits_4_when_the_lock_is_lost() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let out = tmp.path().join("lease");
    let script = format!("echo $KV_LOCK_LEASE > {}; exec sleep 60", out.display());
    let mut child = kvclient_cmd(&kvd)
        .args([
            "lock",
            "locks/lost",
            "--ttl-ms",
            "900",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    assert!(
        wait_until(GENEROUS, || std::fs::read_to_string(&out)
            .is_ok_and(|s| s.ends_with('\n'))),
        "the command never started"
    );
    let lease: u64 = std::fs::read_to_string(&out)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    runtime()
        .block_on(client(&kvd).lease_revoke(lease))
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < GENEROUS, "kvclient lock did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(4));
}

#[test]
fn cli_watch_prints_each_event_as_it_happens() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let kv = client(&kvd);
    let rt = runtime();
    let mut child = kvclient_cmd(&kvd)
        .args(["watch", "p/", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first progress says the watch is open; later writes are seen.
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["type"], "progress", "{first}");
    rt.block_on(kv.set("p/1", "one")).unwrap();
    rt.block_on(kv.delete("p/1")).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if line["type"] != "progress" {
            seen.push((line["type"].clone(), line["key"].clone()));
        }
    }
    assert_eq!(
        seen,
        [
            (serde_json::json!("put"), serde_json::json!("p/1")),
            (serde_json::json!("delete"), serde_json::json!("p/1")),
        ]
    );
    let _ = child.kill();
    let _ = child.wait();
}
