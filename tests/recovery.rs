//! Recovery from a torn tail, refusal on mid-log
//! corruption, and snapshots that let old WAL segments go.

use std::time::Duration;

use bytes::Bytes;
use kvstore_testkit::node::{
    self, client, crash_restart, data_dir, field, http, pipelined_get, start, status,
};
use kvstore_testkit::wal::{
    self, frames, payload_index, payload_put_key, segment_path, wal_segments,
};
use kvstore_testkit::{free_port, run_to_exit, wait_until};
use tempfile::TempDir;

#[test]
fn crc32c_helper_matches_the_standard_check_value() {
    // The helper validates frames in the other tests; it must be right.
    assert_eq!(wal::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(
        wal::crc32c_append(wal::crc32c(b"1234"), b"56789"),
        0xE306_9283
    );
}

/// (a) The last WAL record cut in half is an unacknowledged write: kvd cuts
/// it, starts, and serves every earlier record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_record_is_cut_and_earlier_records_served() {
    const N: usize = 20;
    let tmp = TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let mut kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();
    // Sequential writes: one record each.
    for i in 0..N {
        c.set(&format!("k{i:02}"), format!("value {i}"))
            .await
            .unwrap();
    }
    kvd.kill9().unwrap();

    let (_, last_seg) = wal_segments(&dir).pop().expect("a WAL segment");
    let buf = std::fs::read(&last_seg).unwrap();
    let fs = frames(&buf);
    let last = *fs.last().expect("the segment holds records");
    let payload = last.payload(&buf);
    let cut_key = payload_put_key(payload).expect("the last record is a put");
    let cut_index = payload_index(payload);
    assert_eq!(
        cut_key,
        format!("k{:02}", N - 1),
        "the last record is the last write"
    );
    let cut_at = last.offset + (wal::FRAME_HEADER_BYTES + last.len) / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last_seg)
        .unwrap()
        .set_len(cut_at as u64)
        .unwrap();

    node::restart(&mut kvd);
    for i in 0..N - 1 {
        let k = format!("k{i:02}");
        assert_eq!(
            c.get(&k).await.unwrap().as_deref(),
            Some(format!("value {i}").as_bytes()),
            "{k} was before the torn record and must be served"
        );
    }
    assert_eq!(
        c.get(&cut_key).await.unwrap(),
        None,
        "the torn record is gone"
    );
    let s = status(&http, &kvd).await;
    assert_eq!(field(&s, "last_index"), cut_index - 1);
    assert_eq!(field(&s, "keys"), N as u64 - 1);
    assert_eq!(
        std::fs::metadata(&last_seg).unwrap().len(),
        last.offset as u64,
        "recovery truncates the torn bytes off the segment"
    );

    // The log goes on cleanly from the cut: new writes survive a crash too.
    c.set("after-cut", "fresh").await.unwrap();
    crash_restart(&mut kvd);
    assert_eq!(
        c.get("after-cut").await.unwrap().as_deref(),
        Some(&b"fresh"[..])
    );
    assert_eq!(
        c.get("k00").await.unwrap().as_deref(),
        Some(&b"value 0"[..])
    );
    assert_eq!(c.get(&cut_key).await.unwrap(), None);
}

/// Removes every occurrence of `path` from `text`, then says whether `n`
/// appears as a whole number in what is left (so a digit run inside the temp
/// dir's random name cannot count as the offset).
fn mentions_number(text: &str, path: &str, n: usize) -> bool {
    text.replace(path, " ")
        .split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok == n.to_string())
}

/// (b) One flipped bit in an early record, with good records after it, is
/// damage to acknowledged data: kvd must refuse to start and say where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_an_early_record_refuses_to_start_naming_file_and_offset() {
    let tmp = TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let mut kvd = start(&tmp, &[]);
    let c = client(&kvd);
    for i in 0..10 {
        c.set(&format!("k{i}"), format!("value {i}")).await.unwrap();
    }
    assert!(kvd.terminate().unwrap().success());

    let (first, seg) = wal_segments(&dir).into_iter().next().expect("a segment");
    assert_eq!(seg, segment_path(&dir, first));
    let original = std::fs::read(&seg).unwrap();
    let fs = frames(&original);
    assert!(fs.len() >= 10, "one record per write");
    let victim = fs[1];
    let byte = victim.offset + wal::FRAME_HEADER_BYTES + victim.len / 2;
    let mut damaged = original.clone();
    damaged[byte] ^= 0x10;
    std::fs::write(&seg, &damaged).unwrap();

    let port = free_port().to_string();
    let dir_s = dir.to_str().unwrap();
    let (exit, out) = run_to_exit(
        "kvd",
        &["--port", &port, "--data-dir", dir_s],
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        !exit.success(),
        "kvd must refuse a corrupt WAL; output:\n{out}"
    );
    let seg_s = seg.display().to_string();
    assert!(
        out.contains(&seg_s),
        "the error must name the damaged file {seg_s}; output:\n{out}"
    );
    assert!(
        mentions_number(&out, &seg_s, victim.offset) || mentions_number(&out, &seg_s, byte),
        "the error must give the offset of the damaged record ({}) or byte ({byte}); \
         output:\n{out}",
        victim.offset
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        damaged,
        "a refused start must not truncate or rewrite acknowledged data"
    );

    // Undo the damage: the node starts and every write is there, so the
    // refusal was about that bit and nothing else.
    std::fs::write(&seg, &original).unwrap();
    node::restart(&mut kvd);
    for i in 0..10 {
        assert_eq!(
            c.get(&format!("k{i}")).await.unwrap().as_deref(),
            Some(format!("value {i}").as_bytes())
        );
    }
}

fn snapshot_value(i: usize) -> Bytes {
    // 1 KiB, distinct per key, so a mixed-up key would not pass the check.
    let mut v = format!("{i:08}|").repeat(1024 / 9 + 1).into_bytes();
    v.truncate(1024);
    Bytes::from(v)
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("snap"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default()
}

/// (c) Enough writes to take several snapshots: the old WAL segments go, and
/// a restart (from snapshot plus WAL suffix) still returns every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_remove_old_segments_and_restart_returns_every_key() {
    const KEYS: usize = 6 * 1024; // 6 MiB of 1 KiB values
    const PER_BULK: usize = 64;
    let tmp = TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let mut kvd = start(
        &tmp,
        &["--snapshot-every-mib", "1", "--wal-segment-mib", "1"],
    );
    let c = client(&kvd);
    let http = http();

    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(PER_BULK) {
        let items: Vec<(String, Bytes)> = chunk
            .iter()
            .map(|&i| (format!("snap/{i:05}"), snapshot_value(i)))
            .collect();
        c.bulk_set(&items).await.unwrap();
    }
    let first_segment = segment_path(&dir, 1);
    let gone = wait_until(Duration::from_secs(60), || {
        !first_segment.exists() && !snapshot_files(&dir).is_empty()
    });
    let segs: Vec<u64> = wal_segments(&dir).into_iter().map(|(f, _)| f).collect();
    assert!(
        gone,
        "after ~6 MiB of writes with --snapshot-every-mib 1, the first WAL segment \
         must be deleted and a snapshot exist; segments {segs:?}, snapshots {:?}; log:\n{}",
        snapshot_files(&dir),
        kvd.log()
    );
    let s = status(&http, &kvd).await;
    assert!(field(&s, "snapshot_index") > 0, "status: {s}");
    assert!(
        segs.len() < 6,
        "segments covered by snapshots are deleted, but {} remain: {segs:?}",
        segs.len()
    );

    crash_restart(&mut kvd);
    let paths: Vec<String> = (0..KEYS).map(|i| format!("/v1/kv/snap/{i:05}")).collect();
    let port = kvd.port;
    let answers = tokio::task::spawn_blocking(move || pipelined_get(port, &paths))
        .await
        .unwrap();
    for (i, (code, body)) in answers.into_iter().enumerate() {
        assert_eq!(code, 200, "snap/{i:05} missing after restart");
        assert!(body == snapshot_value(i), "snap/{i:05} has a wrong value");
    }
    let s = status(&http, &kvd).await;
    assert_eq!(field(&s, "keys"), KEYS as u64);
    assert!(
        field(&s, "snapshot_index") > 0,
        "the restart loaded a snapshot: {s}"
    );
}
