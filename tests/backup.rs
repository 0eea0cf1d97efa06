//! Backups end to end (docs/DESIGN.md §3.10, §8): a real 3-node kvsup
//! cluster under 16 writers, `kvsup backup` while they write, a new
//! cluster made from the file with `spec.restoreFrom`, and damaged copies
//! refused by `kvd restore` and by `restoreFrom` with nothing created.
//!
//! "Restored digest == digest at C" is shown by computing the expected
//! digest from the expected contents (every acknowledged write with index
//! <= C) with the definition of §2.4: the XOR over the entries of the
//! fixed-seed hash of `[key_len u16 LE][key][value]`, the function kvd's
//! key space uses (`kvd::storage::keyspace::content_digest`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvstore_testkit::sup::{run_in, Supervised};
use kvstore_testkit::{http_get, wait_until};
use serde_json::Value;
use tempfile::TempDir;

const WRITERS: usize = 16;

/// A key's value: derived from the key, about 1 KiB, so that the nodes
/// take snapshots (every MiB of WAL) while the writers run.
fn value_of(key: &str) -> String {
    format!("{key}:{}", "v".repeat(1000))
}

/// The digest of §2.4 over `contents`.
fn digest(contents: &BTreeMap<String, String>) -> String {
    let d = contents.iter().fold(0u64, |acc, (k, v)| {
        let mut e = Vec::with_capacity(2 + k.len() + v.len());
        e.extend_from_slice(&(k.len() as u16).to_le_bytes());
        e.extend_from_slice(k.as_bytes());
        e.extend_from_slice(v.as_bytes());
        acc ^ kvd::storage::keyspace::content_digest(&e)
    });
    format!("{d:016x}")
}

/// What the writers saw: acknowledged writes with their index, and keys
/// whose write failed (it may or may not have happened).
#[derive(Default)]
struct Seen {
    acked: Vec<(String, u64)>,
    unknown: Vec<String>,
}

fn client(urls: Vec<String>) -> kvclient::Client {
    kvclient::Client::builder()
        .endpoints(urls)
        .request_timeout(Duration::from_secs(5))
        .retry_deadline(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Starts the writers: each sets new keys back to back until `stop`.
fn start_writers(
    rt: &tokio::runtime::Runtime,
    urls: &[String],
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let c = client(urls.to_vec());
            let (stop, seen) = (stop.clone(), seen.clone());
            rt.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w:02}/{i:08}");
                    i += 1;
                    match c.set(&key, value_of(&key)).await {
                        Ok(index) => seen.lock().unwrap().acked.push((key, index)),
                        Err(_) => seen.lock().unwrap().unknown.push(key),
                    }
                }
            })
        })
        .collect()
}

fn acked_count(seen: &Mutex<Seen>) -> usize {
    seen.lock().unwrap().acked.len()
}

/// Every key and value of the cluster, read through a range.
fn contents(rt: &tokio::runtime::Runtime, urls: Vec<String>) -> BTreeMap<String, String> {
    rt.block_on(async move {
        let c = client(urls);
        let mut pager = c.list("").page_size(1000).pager();
        let mut out = BTreeMap::new();
        while let Some(item) = pager.next_item().await.unwrap() {
            let v = String::from_utf8(item.value.unwrap().to_vec()).unwrap();
            out.insert(item.key, v);
        }
        out
    })
}

fn node_status(port: u16) -> Option<Value> {
    let (code, body) = http_get(port, "/v1/status", Duration::from_secs(2)).ok()?;
    (code == 200).then(|| serde_json::from_slice(&body).ok())?
}

/// The index `kvsup backup` printed ("... index C from NODE (ROLE) ...").
fn printed_index(out: &str) -> (u64, String) {
    let rest = out
        .split("index ")
        .nth(1)
        .expect("the output names the index");
    let c = rest.split_whitespace().next().unwrap().parse().unwrap();
    let role = rest
        .split('(')
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or("")
        .to_string();
    (c, role)
}

fn restore_spec(file: &Path) -> String {
    format!("  restoreFrom: {:?}\n", file.display().to_string())
}

#[test]
fn a_backup_under_writes_restores_a_new_cluster_exact_at_its_index() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let d1 = TempDir::new().unwrap();
    let c1 = Supervised::apply(
        d1.path(),
        3,
        "  kvdArgs: [\"--snapshot-every-mib\", \"1\"]\n",
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writers = start_writers(&rt, &c1.urls(), &stop, &seen);
    assert!(
        wait_until(Duration::from_secs(60), || acked_count(&seen) >= 3000),
        "the writers are too slow"
    );
    let file = d1.path().join("cluster.kvbak");
    let (st, out) = c1
        .kvsup(&["backup", "--to", &file.display().to_string()])
        .unwrap();
    assert!(st.success(), "kvsup backup failed: {out}");
    let (c, role) = printed_index(&out);
    let at_backup = acked_count(&seen);
    // Writes go on after the backup, so "nothing after C" means something.
    assert!(wait_until(Duration::from_secs(60), || acked_count(&seen)
        >= at_backup + 1000));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    assert_eq!(
        role, "secondary",
        "a healthy secondary serves the backup: {out}"
    );
    // The header (§3.10): C at byte 16, the snapshot's index S at byte 32.
    let head = std::fs::read(&file).unwrap();
    let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap());
    let (in_file, s_index) = (word(16), word(32));
    assert_eq!(in_file, c);
    assert!(s_index > 0, "the nodes took no snapshot under the writes");
    let bytes = head.len();
    drop(head);
    assert!(!Path::new(&format!("{}.tmp", file.display())).exists());
    let s = seen.lock().unwrap();
    let expected: BTreeMap<String, String> = s
        .acked
        .iter()
        .filter(|(_, i)| *i <= c)
        .map(|(k, _)| (k.clone(), value_of(k)))
        .collect();
    let after = s.acked.iter().filter(|(_, i)| *i > c).count();
    assert!(expected.len() > 1000, "{} writes through C", expected.len());
    assert!(after > 0, "no acknowledged write after C = {c}");
    let unknown: std::collections::BTreeSet<&String> = s.unknown.iter().collect();
    drop(c1);

    let d2 = TempDir::new().unwrap();
    let mut c2 = Supervised::prepare(d2.path(), 3, &restore_spec(&file)).unwrap();
    c2.start().unwrap();
    c2.wait_ready(Duration::from_secs(60)).unwrap();
    let got = contents(&rt, c2.urls());
    // A write that failed may have happened; if it is in, it is in the
    // state at C (with its value), so it counts as C's.
    let mut at_c = expected.clone();
    for k in got.keys() {
        if unknown.contains(k) && !expected.contains_key(k) {
            at_c.insert(k.clone(), value_of(k));
        }
    }
    let missing = at_c.keys().filter(|k| !got.contains_key(*k)).count();
    let extra = got.keys().filter(|k| !at_c.contains_key(*k)).count();
    assert_eq!(
        (missing, extra),
        (0, 0),
        "restored contents differ from the acknowledged writes through C = {c}"
    );
    assert_eq!(got, at_c);
    let want = digest(&at_c);
    c2.wait_converged(Duration::from_secs(30)).unwrap();
    for (name, port) in &c2.nodes {
        let st = node_status(*port).unwrap();
        assert_eq!(st["digest"], want, "{name}'s digest is not the digest at C");
        assert_eq!(st["keys"], at_c.len(), "{name}");
        // The new cluster's log goes on from C.
        assert!(st["applied_index"].as_u64().unwrap() >= c, "{name}: {st}");
        assert!(st["snapshot_index"].as_u64().unwrap() >= c, "{name}: {st}");
    }
    let (_, events) = c2.kvsup(&["events"]).unwrap();
    assert_eq!(events.matches("restore ").count(), 3, "{events}");
    println!(
        "backup at C = {c} (snapshot at {s_index}, {bytes} bytes): {} acknowledged keys \
         through C, {} failed writes in it, {after} acknowledged after it, digest {want}",
        expected.len(),
        at_c.len() - expected.len()
    );
}

/// A backup of a small single-node cluster (fast to make), and `n` bytes
/// of it damaged by `damage`.
fn damaged_copies(dir: &Path) -> (std::path::PathBuf, Vec<(String, std::path::PathBuf)>) {
    let c = Supervised::apply(dir, 1, "").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let k = client(c.urls());
        for i in 0..200 {
            let key = format!("k{i:04}");
            k.set(&key, value_of(&key)).await.unwrap();
        }
    });
    let file = dir.join("good.kvbak");
    let (st, out) = c
        .kvsup(&["backup", "--to", &file.display().to_string()])
        .unwrap();
    assert!(st.success(), "{out}");
    let good = std::fs::read(&file).unwrap();
    let cut = dir.join("truncated.kvbak");
    std::fs::write(&cut, &good[..good.len() * 2 / 3]).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    let flip = dir.join("flipped.kvbak");
    std::fs::write(&flip, &flipped).unwrap();
    (
        file,
        vec![("truncated".into(), cut), ("bit-flipped".into(), flip)],
    )
}

/// `kvd restore --from FILE --data-dir TARGET`, run in `dir`.
fn kvd_restore(
    dir: &std::path::Path,
    file: &std::path::Path,
    target: &std::path::Path,
) -> (std::process::ExitStatus, String) {
    let (from, to) = (file.display().to_string(), target.display().to_string());
    let args = [
        "restore",
        "--from",
        from.as_str(),
        "--data-dir",
        to.as_str(),
    ];
    run_in(dir, "kvd", &args, Duration::from_secs(60)).unwrap()
}

#[test]
fn damaged_backups_are_refused_naming_the_offset_and_nothing_is_created() {
    let d = TempDir::new().unwrap();
    let (good, bad) = damaged_copies(d.path());
    let target = d.path().join("restored");
    for (what, file) in &bad {
        let (st, out) = kvd_restore(d.path(), file, &target);
        assert!(!st.success(), "a {what} backup was restored: {out}");
        assert!(out.contains("at offset"), "{what}: {out}");
        assert!(!target.exists(), "{what}: the data dir was created");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("restore"))
            .collect();
        assert!(left.is_empty(), "{what}: left {left:?}");

        let dn = TempDir::new().unwrap();
        let mut c = Supervised::prepare(dn.path(), 3, &restore_spec(file)).unwrap();
        let started = c.start();
        let err = format!(
            "{:#}",
            started.expect_err("restoreFrom took a damaged file")
        );
        assert!(err.contains("at offset"), "{what}: {err}");
        for (name, _) in &c.nodes {
            let data = c.state_dir.join(name).join("data");
            assert!(!data.exists(), "{what}: {} was created", data.display());
        }
    }
    // The good copy restores, and a data dir that holds anything is refused.
    let (st, out) = kvd_restore(d.path(), &good, &target);
    assert!(st.success(), "{out}");
    assert!(out.contains("200 keys"), "{out}");
    let (st, out) = kvd_restore(d.path(), &good, &target);
    assert!(!st.success() && out.contains("not empty"), "{out}");
}

#[test]
fn a_tls_cluster_is_backed_up_with_its_ca_and_admin_token() {
    let d = TempDir::new().unwrap();
    let c = Supervised::apply(d.path(), 2, "  tls: auto\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = kvclient::Client::builder()
        .endpoints(c.urls())
        .tls(kvclient::TlsFiles {
            ca: Some(c.creds_dir().join("ca.pem")),
            ..Default::default()
        })
        .token(c.cluster_token("client").unwrap())
        .retry_deadline(Duration::from_secs(20))
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..50 {
            k.set(&format!("t{i}"), "x").await.unwrap();
        }
    });
    let file = d.path().join("tls.kvbak");
    let (st, out) = c
        .kvsup(&["backup", "--to", &file.display().to_string()])
        .unwrap();
    assert!(st.success(), "{out}");
    let (index, role) = printed_index(&out);
    // A secondary's backup is exact at what it has applied, which may
    // trail the last acknowledged write by a heartbeat.
    assert!(index > 0 && index <= 50, "{out}");
    assert_eq!(role, "secondary", "{out}");
    assert!(
        out.contains(&format!("verified: index {index} ({index} keys")),
        "{out}"
    );
}

#[test]
fn scheduled_backups_are_taken_verified_and_the_newest_kept() {
    let d = TempDir::new().unwrap();
    let c = Supervised::apply(d.path(), 2, "  backup: {every: 1s, keep: 2, dir: bk}\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let k = client(c.urls());
        for i in 0..20 {
            k.set(&format!("s{i}"), "x").await.unwrap();
        }
    });
    let ok = wait_until(Duration::from_secs(30), || {
        c.metric("kvsup_backups_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= 3.0
    });
    assert!(ok, "{}", c.metrics().unwrap_or_default());
    assert!(c.metric("kvsup_last_backup_index").unwrap() >= 1.0);
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(d.path().join("bk"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "kvbak"))
        .collect();
    assert!(!files.is_empty() && files.len() <= 2, "{files:?}");
    for f in &files {
        let (st, out) = run_in(
            d.path(),
            "kvd",
            &["restore", "--check", "--from", &f.display().to_string()],
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(st.success(), "{}: {out}", f.display());
    }
    let (_, events) = c.kvsup(&["events"]).unwrap();
    assert!(events.contains("backup"), "{events}");
}
