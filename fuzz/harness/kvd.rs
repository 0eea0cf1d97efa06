//! What each kvd fuzz target does with one input. The targets in
//! `fuzz/fuzz_targets/` and the corpus replay in `kvd/tests/fuzz_corpus.rs`
//! both include this file, so `cargo test` runs every corpus file through
//! exactly the checks the fuzzer ran.
//!
//! Every function takes arbitrary bytes, as a peer, a disk or an attacker
//! could hand them to kvd, and panics only on a failure: kvd's code
//! panicked (a decoder must answer any input with `Ok` or `Err`), or a
//! decode that succeeded does not give back the bytes it came from when it
//! is encoded again.

// Each fuzz target uses one entry point of this file; the seeds only the
// replay test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use kvd::masterless::node::{decode_frames, decode_stream, encode_stream};
use kvd::model::LogPos;
use kvd::model::{Expiry, KeyMeta, KeyRange, RangeRead, TxnOp};
use kvd::replication::node::{decode_append, encode_append};
use kvd::storage::fs::{Fs, WriteFile};
use kvd::storage::lww::Lww;
use kvd::storage::record::{self, Frame, Limits, Op, Record, Timestamp};
use kvd::storage::snapshot::{self, SnapshotMeta, Source, Versions};
use kvd::storage::wal::{Wal, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_VERSION};
use kvd::storage::State;

// ---------------------------------------------------------------- targets

/// `wal_record`: the WAL record decoder, three ways over the same bytes:
/// as one record payload (past the checksum, which random bytes rarely
/// pass), as a run of frames, and as the body of a WAL segment that
/// recovery opens (torn tail cut, damage refused).
pub fn wal_record(data: &[u8]) {
    payload_round_trip(data);
    scan_frames(data);
    recover_segment(data);
}

/// `snapshot`: the snapshot loader over the `Fs` seam, as this node's own
/// file and as a primary's upload, with and without last-write-wins
/// stamps. A snapshot that loads is written again and must load back to
/// the same contents.
pub fn snapshot(data: &[u8]) {
    let fs = MemFs::default();
    let path = Path::new("/data/snap/00000000000000000001.snap");
    fs.put(path, data.to_vec());
    let limits = Limits::default();
    for source in [Source::Own, Source::Peer(&limits)] {
        let state = State::new();
        if let Ok(meta) = snapshot::load(&fs, path, &state, None, source) {
            rewrite_snapshot(&state, None, meta);
        }
        let (state, lww) = (State::new(), Lww::new());
        if let Ok(meta) = snapshot::load(&fs, path, &state, Some(&lww), source) {
            rewrite_snapshot(&state, Some(&lww), meta);
        }
    }
}

/// `append`: the `/internal/append` body decoder. Its format has one
/// encoding per body, so a body that decodes re-encodes to its own bytes.
pub fn append(data: &[u8]) {
    let Ok(body) = decode_append(data) else {
        return;
    };
    let again = encode_append(
        body.epoch,
        body.prev,
        body.leader_commit,
        &body.leader_url,
        &body.records,
    );
    assert_eq!(again, data, "a decoded append body re-encodes differently");
}

/// `ml_stream`: the `/internal/ml/stream` body decoder, and the frame
/// decoder of a buckets answer. A stream body re-encodes to its own bytes
/// but for the two flags, which decode from any non-zero byte.
pub fn ml_stream(data: &[u8]) {
    if let Ok(body) = decode_stream(data) {
        assert!(
            body.records.iter().all(|r| r.op != Op::Noop),
            "a stream body decoded with a no-op in it"
        );
        let again = encode_stream(
            body.from,
            body.upto,
            body.hlc,
            body.complete,
            body.gap,
            &body.origin,
            &body.records,
        );
        let mut canonical = data.to_vec();
        for flag in [STREAM_COMPLETE_AT, STREAM_GAP_AT] {
            canonical[flag] = u8::from(data[flag] != 0);
        }
        assert_eq!(
            again, canonical,
            "a decoded stream body re-encodes differently"
        );
    }
    if let Ok(records) = decode_frames(data, 0) {
        let mut again = Vec::new();
        for r in &records {
            r.encode_into(&mut again);
        }
        assert_eq!(again, data, "decoded frames re-encode differently");
    }
}

/// Offsets of the `complete` and `gap` bytes of a stream body (format in
/// `kvd::masterless::node`).
const STREAM_COMPLETE_AT: usize = 40;
const STREAM_GAP_AT: usize = 41;

// ---------------------------------------------------------------- checks

/// A payload that decodes is exactly what encoding its record gives, and
/// framed again it reads back as a valid frame.
fn payload_round_trip(payload: &[u8]) {
    let Ok(rec) = Record::decode_payload(payload) else {
        return;
    };
    assert_eq!(
        rec.op.encoded_len(),
        payload.len(),
        "encoded_len disagrees with a decoded payload"
    );
    let mut framed = Vec::new();
    rec.encode_into(&mut framed);
    assert_eq!(
        &framed[record::FRAME_HEADER_BYTES..],
        payload,
        "a decoded payload re-encodes differently"
    );
    match record::read_frame(&framed, 0) {
        Frame::Valid { payload: p, next } => {
            assert_eq!((p, next), (payload, framed.len()));
        }
        other => panic!("a frame just encoded reads back as {other:?}"),
    }
}

/// Reads frames from the start of `buf` as the WAL does, until one is
/// incomplete or bad.
fn scan_frames(buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        let Frame::Valid { payload, next } = record::read_frame(buf, off) else {
            return;
        };
        assert!(
            next > off && next <= buf.len(),
            "frame at {off} ends at {next}"
        );
        if let Ok(rec) = Record::decode_payload(payload) {
            // Recovery's test for "a valid record follows" must see it.
            assert!(
                record::valid_record_at(buf, off, rec.index),
                "valid_record_at misses the valid record at {off}"
            );
        }
        payload_round_trip(payload);
        off = next;
    }
}

/// Opens a WAL whose one segment holds `body` after a valid header. A log
/// that opens holds consecutive indexes from 1, and opening it again (the
/// next restart) finds the same records and nothing left to cut.
fn recover_segment(body: &[u8]) {
    let fs = MemFs::default();
    let dir = Path::new("/data/wal");
    let mut segment = Vec::with_capacity(SEGMENT_HEADER_BYTES + body.len());
    segment.extend_from_slice(SEGMENT_MAGIC);
    segment.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    segment.resize(SEGMENT_HEADER_BYTES, 0);
    segment.extend_from_slice(body);
    fs.put(&dir.join("00000000000000000001.wal"), segment);

    let Ok((first, report)) = open_wal(&fs, dir) else {
        return;
    };
    for (i, rec) in first.iter().enumerate() {
        assert_eq!(rec.index, i as u64 + 1, "recovery replayed out of order");
    }
    assert!(report.truncated_bytes <= body.len() as u64);
    let (second, report) = open_wal(&fs, dir).expect("a log that opened once opens again");
    assert_eq!(second, first, "a second recovery replays other records");
    assert_eq!(report.truncated_bytes, 0, "a second recovery cuts again");
}

fn open_wal(
    fs: &MemFs,
    dir: &Path,
) -> Result<(Vec<Record>, kvd::storage::wal::RecoveryReport), kvd::storage::Error> {
    let mut replayed = Vec::new();
    let (_wal, report) = Wal::open(Arc::new(fs.clone()), dir, 0, 64 << 20, |r| replayed.push(r))?;
    Ok((replayed, report))
}

/// Writes what a snapshot load gave and loads it back: same header, same
/// contents, same stamps.
fn rewrite_snapshot(state: &State, lww: Option<&Lww>, meta: SnapshotMeta) {
    let fs = MemFs::default();
    let config = state.loaded_config();
    let (path, size) = snapshot::write(
        &fs,
        Path::new("/out/snap"),
        state,
        lww,
        meta,
        Versions::Kept,
        config.as_ref(),
    )
    .expect("a snapshot write to memory cannot fail");
    assert_eq!(Some(size), fs.get(&path).map(|b| b.len() as u64));
    let (state2, lww2) = (State::new(), Lww::new());
    let meta2 = snapshot::load(&fs, &path, &state2, lww.map(|_| &lww2), Source::Own)
        .expect("a snapshot just written loads");
    assert_eq!(state2.loaded_config(), config, "the configuration section");
    assert_eq!(meta2, meta);
    assert_eq!(
        (state2.len(), state2.digest()),
        (state.len(), state.digest()),
        "a rewritten snapshot loads other contents"
    );
    assert_eq!(
        versions(&state2),
        versions(state),
        "a rewrite changed versions"
    );
    if let Some(lww) = lww {
        assert_eq!(lww2.digests(), lww.digests(), "stamps changed in a rewrite");
        assert_eq!(lww2.tombstones(), lww.tombstones());
    }
}

/// Every key's versions, in order.
fn versions(state: &State) -> Vec<(Vec<u8>, KeyMeta)> {
    let mut out = Vec::new();
    state.for_each(|k, _, m| out.push((k.to_vec(), m)));
    out
}

// ---------------------------------------------------------------- memory Fs

/// A file system in memory, with inodes so that a file renamed while open
/// (the WAL's spare segment) keeps taking writes. Nothing is ever lost:
/// these targets test decoding, not crashes.
#[derive(Clone, Default)]
pub struct MemFs {
    disk: Arc<Mutex<Disk>>,
}

#[derive(Default)]
struct Disk {
    names: BTreeMap<PathBuf, usize>,
    inodes: Vec<Vec<u8>>,
}

impl MemFs {
    pub fn put(&self, path: &Path, bytes: Vec<u8>) {
        let mut d = self.lock();
        d.inodes.push(bytes);
        let id = d.inodes.len() - 1;
        d.names.insert(path.to_path_buf(), id);
    }

    pub fn get(&self, path: &Path) -> Option<Vec<u8>> {
        let d = self.lock();
        d.names.get(path).map(|&id| d.inodes[id].clone())
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        // A panic while locked is already the failure being reported.
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn id(&self, path: &Path) -> io::Result<usize> {
        self.lock()
            .names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
}

struct MemFile {
    fs: MemFs,
    id: usize,
}

impl Write for MemFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.fs.lock().inodes[self.id].extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WriteFile for MemFile {
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Fs for MemFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let d = self.lock();
        Ok(d.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        let id = self.id(path)?;
        Ok(Box::new(Cursor::new(self.lock().inodes[id].clone())))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        self.put(path, Vec::new());
        let id = self.id(path)?;
        Ok(Box::new(MemFile {
            fs: self.clone(),
            id,
        }))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let id = self.id(path)?;
        Ok(Box::new(MemFile {
            fs: self.clone(),
            id,
        }))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let id = self.id(path)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.lock().inodes[id].truncate(len);
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let id = self.id(from)?;
        let mut d = self.lock();
        d.names.remove(from);
        d.names.insert(to.to_path_buf(), id);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.id(path)?;
        self.lock().names.remove(path);
        Ok(())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------- seeds

/// Well-formed inputs of each target, named: where the fuzzer starts
/// (written into `fuzz/corpus/<target>/` by the replay test's
/// `write_seed_corpus`), and what the replay test checks every decoder
/// accepts, so that the round-trip checks above are really reached.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "wal_record" => wal_seeds(),
        "snapshot" => snapshot_seeds(),
        "append" => vec![
            ("heartbeat", append_body(&[])),
            ("entries", append_body(&sample_records())),
        ],
        "ml_stream" => {
            let writes: Vec<Record> = sample_records()
                .into_iter()
                .filter(|r| r.op != Op::Noop)
                .collect();
            let mut buckets = Vec::new();
            for r in &writes {
                record::encode(0, 0, r.ts, &r.op, &mut buckets);
            }
            vec![
                ("idle", stream_body(&[])),
                ("writes", stream_body(&writes)),
                ("buckets-answer", buckets),
            ]
        }
        other => panic!("no fuzz target {other}"),
    }
}

fn sample_records() -> Vec<Record> {
    let ts = |ms: u64, logical: u32| Timestamp {
        physical_ms: 1_700_000_000_000 + ms,
        logical,
        node: 7,
    };
    let b = Bytes::from_static;
    let ops = [
        Op::Noop,
        Op::Put {
            key: b(b"user:1"),
            value: b(b"{\"name\": \"ada\"}\0\xff"),
            expiry: Expiry::Never,
        },
        Op::Bulk {
            items: vec![
                (b(b"a"), b(b"1"), Expiry::Never),
                (b(b"b"), Bytes::new(), Expiry::Never),
            ],
        },
        Op::Delete { key: b(b"user:1") },
        Op::Txn {
            ops: vec![
                TxnOp::Put {
                    key: b(b"t/1"),
                    value: b(b"\x00v"),
                    expiry: Expiry::Never,
                },
                TxnOp::Get { key: b(b"t/1") },
                TxnOp::DeletePrefix { prefix: b(b"t/") },
                TxnOp::Delete { key: b(b"a") },
                TxnOp::Range(RangeRead {
                    range: KeyRange {
                        start: b(b"a"),
                        end: Some(b(b"u")),
                    },
                    limit: 100,
                    keys_only: true,
                }),
                TxnOp::Range(RangeRead {
                    range: KeyRange::prefix(b""),
                    limit: 10_000,
                    keys_only: false,
                }),
            ],
        },
        Op::LeaseGrant { ttl_ms: 5_000 },
        Op::Put {
            key: b(b"session/1"),
            value: b(b"alive"),
            expiry: Expiry::Lease(9),
        },
        Op::Bulk {
            items: vec![
                (b(b"c/1"), b(b"x"), Expiry::At(1_700_000_060_000)),
                (b(b"c/2"), b(b"y"), Expiry::Never),
            ],
        },
        Op::Txn {
            ops: vec![TxnOp::Put {
                key: b(b"c/1"),
                value: b(b"z"),
                expiry: Expiry::Keep,
            }],
        },
        Op::LeaseKeepAlive { id: 9 },
        Op::Expire {
            keys: vec![(b(b"c/1"), 12)],
        },
        Op::LeaseRevoke {
            id: 9,
            expired: true,
        },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            index: i as u64 + 1,
            epoch: 1 + i as u64 / 2,
            ts: ts(i as u64, i as u32),
            op,
        })
        .collect()
}

fn frames(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        r.encode_into(&mut out);
    }
    out
}

fn wal_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let records = sample_records();
    let log = frames(&records);
    let put = frames(&records[1..2]);
    let mut torn = log.clone();
    torn.truncate(log.len() - 3);
    let mut damaged = log.clone();
    damaged[put.len() + 12] ^= 0x40;
    vec![
        ("payload", put[record::FRAME_HEADER_BYTES..].to_vec()),
        ("log", log),
        ("torn-tail", torn),
        ("damaged-middle", damaged),
    ]
}

fn snapshot_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let meta = SnapshotMeta {
        last_index: 4,
        last_epoch: 2,
    };
    let written = |state: &State, lww: Option<&Lww>| {
        let fs = MemFs::default();
        let (path, _) =
            snapshot::write(&fs, Path::new("/s"), state, lww, meta, Versions::Kept, None)
                .expect("a snapshot write to memory cannot fail");
        fs.get(&path).expect("the snapshot just written")
    };
    let (state, lww) = (State::new(), Lww::new());
    for r in sample_records() {
        lww.apply(&state, r.index, r.ts, &r.op, false);
    }
    let plain = State::new();
    for r in sample_records() {
        plain.apply(r.index, r.ts, &r.op, false);
    }
    vec![
        ("empty", written(&State::new(), None)),
        ("plain", written(&plain, None)),
        ("stamped", written(&state, Some(&lww))),
    ]
}

fn append_body(records: &[Record]) -> Vec<u8> {
    let prev = LogPos {
        epoch: 1,
        index: records.first().map_or(4, |r| r.index - 1),
    };
    encode_append(2, prev, 3, "http://127.0.0.1:8765", records)
}

fn stream_body(records: &[Record]) -> Vec<u8> {
    let hlc = Timestamp {
        physical_ms: 1_700_000_000_009,
        logical: 0,
        node: 7,
    };
    let from = records.first().map_or(5, |r| r.index);
    let upto = records.last().map_or(4, |r| r.index);
    encode_stream(from, upto, hlc, true, false, "n1", records)
}
