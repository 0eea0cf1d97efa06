//! Backups (format version 1; docs/DESIGN.md §3.10): one file, exact at one
//! log index `C`, that `kvd restore` turns into a data dir.
//!
//! ```text
//! header   magic b"KVSTBKUP" | version u32 = 1 | reserved u32 = 0
//!          | index u64 (C) | epoch u64 (of entry C)
//!          | snapshot_index u64 (S) | snapshot_len u64             (48 bytes)
//! snapshot snapshot_len bytes: a snapshot file (§3.4) with last_index S
//! records  C - S WAL frames (§3.3), the entries S+1 ..= C in order
//! trailer  b"BKUPEND\0" | record_count u64 (C - S)
//!          | crc u32: CRC32C of every byte before it                (20 bytes)
//! ```
//!
//! A snapshot is fuzzy (an entry may hold a write after S); replaying the
//! entries S+1..=C over it ends in exactly the state at C (the replay rule,
//! §3.4). The node serving a backup picks C when it starts (its applied
//! index), so the answer's headers can say C before the body is streamed.
//!
//! The writer here only frames and checksums; the verifier reads the whole
//! file once, in order, into a [`State`] (nothing touches a disk), and
//! refuses damage at the byte offset it finds it.

use std::io::{BufReader, Read};
use std::path::Path;

use super::fs::{Fs, RealFs};
use super::record::{self, Frame, Limits, FRAME_HEADER_BYTES};
use super::snapshot::{self, SnapshotMeta, Source, Versions};
use super::state::State;
use super::Error;
use crate::model::Record;

pub const MAGIC: &[u8; 8] = b"KVSTBKUP";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 48;
const END_MAGIC: &[u8; 8] = b"BKUPEND\0";
pub const TRAILER_BYTES: usize = 20;
/// The smallest snapshot: its header, an empty lease section, its trailer.
const MIN_SNAPSHOT_BYTES: u64 = 32 + 16 + 20;
/// A snapshot section longer than this is damage (1 TiB).
const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;
/// More entries after the snapshot than this is damage.
const MAX_RECORDS: u64 = 1 << 32;

/// The backup header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// C: the index the backup is exact at.
    pub index: u64,
    /// The epoch of entry C.
    pub epoch: u64,
    /// S: the embedded snapshot's `last_index`.
    pub snapshot_index: u64,
    pub snapshot_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b[32..40].copy_from_slice(&self.snapshot_index.to_le_bytes());
        b[40..48].copy_from_slice(&self.snapshot_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header: `Err((offset, reason))`.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, (u64, String)> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        if &b[..8] != MAGIC {
            return Err((0, "not a kvstore backup (bad magic)".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err((8, format!("unsupported backup version {version}")));
        }
        if u32_at(12) != 0 {
            return Err((12, "reserved header field is not 0".into()));
        }
        let h = Header {
            index: u64_at(16),
            epoch: u64_at(24),
            snapshot_index: u64_at(32),
            snapshot_len: u64_at(40),
        };
        if h.snapshot_index > h.index {
            return Err((
                32,
                format!(
                    "snapshot index {} is past index {}",
                    h.snapshot_index, h.index
                ),
            ));
        }
        if h.index - h.snapshot_index > MAX_RECORDS {
            return Err((
                16,
                format!("implausible record count {}", h.index - h.snapshot_index),
            ));
        }
        if !(MIN_SNAPSHOT_BYTES..=MAX_SNAPSHOT_BYTES).contains(&h.snapshot_len) {
            return Err((
                40,
                format!("implausible snapshot length {}", h.snapshot_len),
            ));
        }
        Ok(h)
    }

    /// How many entries follow the snapshot.
    pub fn records(&self) -> u64 {
        self.index - self.snapshot_index
    }
}

/// The snapshot section of a node that has no snapshot yet: empty, at 0
/// (its log then starts at index 1).
pub fn empty_snapshot() -> Vec<u8> {
    let mut b = Vec::with_capacity(MIN_SNAPSHOT_BYTES as usize);
    b.extend_from_slice(b"KVSTSNAP");
    b.extend_from_slice(&snapshot::VERSION.to_le_bytes());
    b.extend_from_slice(&[0u8; 4 + 8 + 8]);
    b.extend_from_slice(b"SNAPLEAS");
    b.extend_from_slice(&0u64.to_le_bytes());
    // No configuration (version 5's section, its flag 0).
    b.extend_from_slice(b"SNAPCONF");
    b.push(0);
    b.extend_from_slice(b"SNAPEND\0");
    b.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Frames a backup as it is streamed: the header, the snapshot's bytes,
/// the entries, the trailer, checking that each part is what the header
/// promised. It sees every byte once, to checksum it.
#[derive(Debug)]
pub struct Writer {
    header: Header,
    crc: u32,
    snapshot_seen: u64,
    next_index: u64,
}

impl Writer {
    /// The writer and the header's bytes (the first to send).
    pub fn new(header: Header) -> (Writer, [u8; HEADER_BYTES]) {
        let bytes = header.encode();
        let w = Writer {
            header,
            crc: crc32c::crc32c(&bytes),
            snapshot_seen: 0,
            next_index: header.snapshot_index + 1,
        };
        (w, bytes)
    }

    /// The next bytes of the snapshot file.
    pub fn snapshot_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.snapshot_seen += chunk.len() as u64;
        if self.snapshot_seen > self.header.snapshot_len {
            return Err("the snapshot grew while it was read".into());
        }
        self.crc = crc32c::crc32c_append(self.crc, chunk);
        Ok(())
    }

    /// The first index still to send.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Whether every entry through C is framed.
    pub fn records_done(&self) -> bool {
        self.next_index > self.header.index
    }

    /// Frames the entries of `recs` that come next, up to C, into `out`;
    /// entries before the next one are skipped, a gap is an error.
    pub fn records(&mut self, recs: &[Record], out: &mut Vec<u8>) -> Result<(), String> {
        if self.snapshot_seen != self.header.snapshot_len {
            return Err("entries before the whole snapshot".into());
        }
        let start = out.len();
        for r in recs {
            if r.index < self.next_index {
                continue;
            }
            if self.records_done() {
                break;
            }
            if r.index != self.next_index {
                return Err(format!(
                    "the log has entry {} where {} belongs (compacted under the backup?)",
                    r.index, self.next_index
                ));
            }
            r.encode_into(out);
            self.next_index += 1;
        }
        self.crc = crc32c::crc32c_append(self.crc, &out[start..]);
        Ok(())
    }

    /// The trailer's bytes (the last to send).
    pub fn finish(self) -> Result<[u8; TRAILER_BYTES], String> {
        if self.snapshot_seen != self.header.snapshot_len || !self.records_done() {
            return Err("the backup is not complete".into());
        }
        let mut t = [0u8; TRAILER_BYTES];
        t[..8].copy_from_slice(END_MAGIC);
        t[8..16].copy_from_slice(&self.header.records().to_le_bytes());
        let crc = crc32c::crc32c_append(self.crc, &t[..16]);
        t[16..].copy_from_slice(&crc.to_le_bytes());
        Ok(t)
    }
}

/// A reader that checksums and counts what passes through it.
struct Summing<R> {
    inner: R,
    crc: u32,
    pos: u64,
}

impl<R: Read> Read for Summing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// A verified backup: its header and the state at its index.
pub struct Verified {
    pub header: Header,
    pub state: State,
    /// The file's length.
    pub bytes: u64,
}

/// Reads the backup at `path` whole: header, snapshot (its checksum, every
/// key and value one a client could write under `limits`), each entry
/// (frame checksum, decoding, contiguous indexes, epochs that never go
/// back, the client rules), the trailer and its checksum of the whole
/// file, and nothing after it. Builds the state at C in memory only.
pub fn verify(path: &Path, limits: &Limits) -> Result<Verified, Error> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    verify_from(BufReader::with_capacity(1 << 20, f), path, limits)
}

/// [`verify`] of the bytes `reader` yields (`path` names them in errors).
pub fn verify_from(reader: impl Read, path: &Path, limits: &Limits) -> Result<Verified, Error> {
    let corrupt = |offset: u64, reason: String| Error::Corruption {
        file: path.to_path_buf(),
        offset,
        reason,
    };
    let short =
        |offset: u64, what: &str| corrupt(offset, format!("the backup ends early, in {what}"));
    let mut r = Summing {
        inner: reader,
        crc: 0,
        pos: 0,
    };
    let mut hb = [0u8; HEADER_BYTES];
    r.read_exact(&mut hb).map_err(|_| short(0, "its header"))?;
    let header = Header::decode(&hb).map_err(|(o, why)| corrupt(o, why))?;
    let state = State::new();
    let meta = snapshot::load_from(
        Read::take(&mut r, header.snapshot_len),
        path,
        HEADER_BYTES as u64,
        &state,
        None,
        Source::Peer(limits),
    )?;
    if r.pos != HEADER_BYTES as u64 + header.snapshot_len {
        return Err(short(r.pos, "the snapshot"));
    }
    if meta.last_index != header.snapshot_index {
        return Err(corrupt(
            HEADER_BYTES as u64 + 16,
            format!(
                "the snapshot covers index {}, the header says {}",
                meta.last_index, header.snapshot_index
            ),
        ));
    }
    let epoch = entries(&mut r, &header, meta.last_epoch, &state, limits, &corrupt)?;
    if epoch != header.epoch {
        return Err(corrupt(
            24,
            format!(
                "the header says epoch {}, entry {} has {epoch}",
                header.epoch, header.index
            ),
        ));
    }
    trailer(&mut r, &header, &corrupt)?;
    nothing_after(&state, header.index, &corrupt)?;
    Ok(Verified {
        header,
        state,
        // The checksum itself is read past the summing.
        bytes: r.pos + 4,
    })
}

/// The entries S+1..=C at the reader's position, applied to `state` in
/// order; returns the epoch of the last (the snapshot's without any).
fn entries<R: Read>(
    r: &mut Summing<R>,
    header: &Header,
    snapshot_epoch: u64,
    state: &State,
    limits: &Limits,
    corrupt: &impl Fn(u64, String) -> Error,
) -> Result<u64, Error> {
    let short =
        |offset: u64, what: &str| corrupt(offset, format!("the backup ends early, in {what}"));
    let mut epoch = snapshot_epoch;
    let mut frame = Vec::new();
    for index in header.snapshot_index + 1..=header.index {
        let at = r.pos;
        frame.resize(FRAME_HEADER_BYTES, 0);
        r.read_exact(&mut frame)
            .map_err(|_| short(at, &format!("entry {index}")))?;
        if let Frame::Bad { reason } = record::read_frame(&frame, 0) {
            return Err(corrupt(at, format!("entry {index}: {reason}")));
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        frame.resize(FRAME_HEADER_BYTES + len, 0);
        r.read_exact(&mut frame[FRAME_HEADER_BYTES..])
            .map_err(|_| short(at, &format!("entry {index}")))?;
        let payload = match record::read_frame(&frame, 0) {
            Frame::Valid { payload, .. } => payload,
            Frame::Bad { reason } => return Err(corrupt(at, format!("entry {index}: {reason}"))),
            Frame::Incomplete => return Err(short(at, &format!("entry {index}"))),
        };
        let rec = Record::decode_payload(payload)
            .map_err(|e| corrupt(at, format!("entry {index}: {e}")))?;
        if rec.index != index {
            return Err(corrupt(
                at,
                format!("entry {} where entry {index} belongs", rec.index),
            ));
        }
        if rec.epoch < epoch {
            return Err(corrupt(
                at,
                format!("entry {index} has epoch {} after epoch {epoch}", rec.epoch),
            ));
        }
        record::validate_op(&rec.op, limits)
            .map_err(|e| corrupt(at, format!("entry {index}: {e}")))?;
        state.apply(rec.index, rec.ts, &rec.op, false);
        epoch = rec.epoch;
    }
    Ok(epoch)
}

/// Refuses a state holding a write after `index`.
fn nothing_after(
    state: &State,
    index: u64,
    corrupt: &impl Fn(u64, String) -> Error,
) -> Result<(), Error> {
    // The snapshot was complete before C was chosen, so nothing in the
    // state may be newer than C.
    let mut newer = None;
    state.for_each(|key, _, m| {
        if m.mod_index > index && newer.is_none() {
            newer = Some((String::from_utf8_lossy(key).into_owned(), m.mod_index));
        }
    });
    if let Some((key, at)) = newer {
        return Err(corrupt(
            HEADER_BYTES as u64,
            format!(
                "the snapshot holds key {key:?} written at {at}, after index {}",
                index
            ),
        ));
    }
    Ok(())
}

/// The trailer at the reader's position: marker, count, the checksum of
/// everything before it, then the end of the file.
fn trailer<R: Read>(
    r: &mut Summing<R>,
    header: &Header,
    corrupt: &impl Fn(u64, String) -> Error,
) -> Result<(), Error> {
    let at = r.pos;
    let mut t = [0u8; 16];
    r.read_exact(&mut t)
        .map_err(|_| corrupt(at, "the backup ends early, in its trailer".into()))?;
    if &t[..8] != END_MAGIC {
        return Err(corrupt(
            at,
            "bad trailer marker (more entries than the header says?)".into(),
        ));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&t[8..16]);
    let count = u64::from_le_bytes(w);
    if count != header.records() {
        return Err(corrupt(
            at + 8,
            format!(
                "the trailer counts {count} entries, the header {}",
                header.records()
            ),
        ));
    }
    let computed = r.crc;
    let mut c = [0u8; 4];
    r.inner
        .read_exact(&mut c)
        .map_err(|_| corrupt(at + 16, "the backup ends early, in its checksum".into()))?;
    let stored = u32::from_le_bytes(c);
    if stored != computed {
        return Err(corrupt(
            at + 16,
            format!("backup checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    let mut extra = [0u8; 1];
    let n = r
        .inner
        .read(&mut extra)
        .map_err(|e| corrupt(at + 20, format!("reading after the trailer: {e}")))?;
    if n != 0 {
        return Err(corrupt(at + 20, "bytes after the trailer".into()));
    }
    Ok(())
}

/// Makes `data_dir` (which must not exist, or be empty) a data dir holding
/// exactly the verified state: one snapshot at C under `snap/`, no WAL and
/// no `meta`, so a kvd started on it begins there like a fresh node (and a
/// cluster's first node bootstraps epoch 1 at C + 1). The snapshot says
/// epoch 1 for C: a restored data dir starts a new cluster's history, so no
/// epoch of the old one can meet the new cluster's. Written in a temp dir
/// beside it, fsync'd, then renamed into place and the parent fsync'd.
pub fn write_data_dir(v: &Verified, data_dir: &Path) -> Result<(), Error> {
    let fs = RealFs;
    let io = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |e| Error::io(context, e)
    };
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let tmp = parent.join(format!(".{name}.restore.tmp"));
    if tmp.exists() {
        // What a restore that crashed left; never a data dir kvd uses.
        std::fs::remove_dir_all(&tmp).map_err(io("removing", &tmp))?;
    }
    let snap = tmp.join("snap");
    fs.create_dir_all(&snap).map_err(io("creating", &snap))?;
    if v.header.index > 0 {
        let meta = SnapshotMeta {
            last_index: v.header.index,
            last_epoch: 1,
        };
        snapshot::write(&fs, &snap, &v.state, None, meta, Versions::Kept, None)?;
    }
    fs.sync_dir(&snap).map_err(io("fsync of", &snap))?;
    fs.sync_dir(&tmp).map_err(io("fsync of", &tmp))?;
    if data_dir.exists() {
        // Empty (the caller checked): rename cannot replace a directory
        // that holds anything, and this one holds nothing.
        std::fs::remove_dir(data_dir).map_err(io("removing the empty", data_dir))?;
    }
    fs.rename(&tmp, data_dir).map_err(io("renaming", &tmp))?;
    fs.sync_dir(&parent).map_err(io("fsync of", &parent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Expiry, Op, Timestamp};

    fn put(index: u64, epoch: u64, key: &str, value: &str) -> Record {
        Record {
            index,
            epoch,
            ts: Timestamp {
                physical_ms: 1_700_000_000_000 + index,
                logical: 0,
                node: 1,
            },
            op: Op::Put {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                expiry: Expiry::Never,
            },
        }
    }

    /// A whole backup: an empty snapshot and entries 1..=n (epoch 1, then
    /// 2 from entry 3 on).
    fn backup(n: u64) -> Vec<u8> {
        let snap = empty_snapshot();
        let recs: Vec<Record> = (1..=n)
            .map(|i| {
                put(
                    i,
                    if i >= 3 { 2 } else { 1 },
                    &format!("k{}", i % 4),
                    &format!("v{i}"),
                )
            })
            .collect();
        let header = Header {
            index: n,
            epoch: recs.last().map_or(0, |r| r.epoch),
            snapshot_index: 0,
            snapshot_len: snap.len() as u64,
        };
        let (mut w, h) = Writer::new(header);
        let mut out = h.to_vec();
        w.snapshot_chunk(&snap).unwrap();
        out.extend_from_slice(&snap);
        // Entries arrive in batches that overlap, as shipping reads do.
        w.records(&recs[..recs.len().min(3)], &mut out).unwrap();
        w.records(&recs, &mut out).unwrap();
        assert!(w.records_done());
        out.extend_from_slice(&w.finish().unwrap());
        out
    }

    fn check(bytes: &[u8]) -> Result<Verified, Error> {
        verify_from(bytes, Path::new("b"), &Limits::default())
    }

    fn offset_of(e: Error) -> u64 {
        match e {
            Error::Corruption { offset, .. } => offset,
            e => panic!("not a corruption: {e}"),
        }
    }

    #[test]
    fn a_backup_reads_back_exact_at_its_index() {
        let b = backup(10);
        let v = check(&b).unwrap();
        assert_eq!(v.header.index, 10);
        assert_eq!(v.header.epoch, 2);
        assert_eq!(v.bytes, b.len() as u64);
        assert_eq!(v.state.len(), 4);
        assert_eq!(v.state.applied_index(), 10);
        assert_eq!(v.state.get(b"k2", 0).unwrap().as_ref(), b"v10");
        let replayed = State::new();
        for i in 1..=10 {
            let r = put(i, 1, &format!("k{}", i % 4), &format!("v{i}"));
            replayed.apply(r.index, r.ts, &r.op, false);
        }
        assert_eq!(v.state.digest(), replayed.digest());
        assert_ne!(v.state.digest(), 0);
    }

    #[test]
    fn every_truncation_is_refused_at_an_offset_inside_the_file() {
        let b = backup(6);
        for len in 0..b.len() {
            let e = check(&b[..len])
                .err()
                .unwrap_or_else(|| panic!("{len} bytes passed"));
            let at = offset_of(e);
            assert!(at <= len as u64, "cut at {len}, refused at {at}");
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let b = backup(5);
        for byte in 0..b.len() {
            for bit in [0u8, 3, 7] {
                let mut c = b.clone();
                c[byte] ^= 1 << bit;
                let e = check(&c)
                    .err()
                    .unwrap_or_else(|| panic!("flip {byte}.{bit} passed"));
                assert!(offset_of(e) < b.len() as u64);
            }
        }
    }

    #[test]
    fn extra_bytes_and_wrong_counts_are_refused() {
        let mut b = backup(4);
        b.push(0);
        assert_eq!(offset_of(check(&b).err().unwrap()), b.len() as u64 - 1);
        let mut h = Header::decode(&backup(4)[..48].try_into().unwrap()).unwrap();
        h.index = 3;
        assert!(Header::decode(&h.encode()).is_ok());
        h.snapshot_index = 5;
        assert_eq!(Header::decode(&h.encode()).unwrap_err().0, 32);
    }

    #[test]
    fn the_writer_refuses_gaps_and_incomplete_backups() {
        let snap = empty_snapshot();
        let h = Header {
            index: 3,
            epoch: 1,
            snapshot_index: 0,
            snapshot_len: snap.len() as u64,
        };
        let (mut w, _) = Writer::new(h);
        let mut out = Vec::new();
        assert!(
            w.records(&[put(1, 1, "a", "b")], &mut out).is_err(),
            "snapshot first"
        );
        w.snapshot_chunk(&snap).unwrap();
        assert!(w.snapshot_chunk(b"x").is_err());
        let (mut w, _) = Writer::new(h);
        w.snapshot_chunk(&snap).unwrap();
        assert!(w.records(&[put(2, 1, "a", "b")], &mut out).is_err(), "gap");
        w.records(&[put(1, 1, "a", "b")], &mut out).unwrap();
        assert!(w.finish().is_err());
    }

    #[test]
    fn a_restored_data_dir_holds_one_snapshot_at_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let v = check(&backup(7)).unwrap();
        let dir = tmp.path().join("d");
        write_data_dir(&v, &dir).unwrap();
        let names = std::fs::read_dir(dir.join("snap")).unwrap().count();
        assert_eq!(names, 1);
        let state = State::new();
        let meta = snapshot::load(
            &RealFs,
            &dir.join("snap").join(snapshot::snapshot_name(7)),
            &state,
            None,
            Source::Own,
        )
        .unwrap();
        assert_eq!(meta.last_index, 7);
        assert_eq!(state.digest(), v.state.digest());
        assert!(!tmp.path().join(".d.restore.tmp").exists());
    }
}
