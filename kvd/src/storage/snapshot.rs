//! Snapshots: the key space as of some log index, so the WAL before it can go.
//!
//! # File format (version 1), integers little-endian
//!
//! `snap/{last_index:020}.snap`:
//!
//! ```text
//! header  magic b"KVSTSNAP" | version u32 = 1 | reserved u32 = 0
//!         | last_index u64 | last_epoch u64                      (32 bytes)
//! entries key_len u32 | key | value_len u32 | value               (repeated)
//! trailer b"SNAPEND\0" | entry_count u64 | crc u32                (20 bytes)
//! crc = CRC32C of every byte before it.
//! ```
//!
//! Version 2 (masterless mode) is the same with a version of 2 and, after
//! each entry's value, its last-write-wins stamp and a flag:
//! `ts_ms u64 | logical u32 | node u32 | flags u8` (flags bit 0: a
//! tombstone, whose value is empty). Both versions load in either mode: a
//! version 1 snapshot in masterless mode stamps every key with the zero
//! timestamp; a version 2 one in primary/secondary mode drops tombstones.
//!
//! Snapshots are *fuzzy*: written one shard at a time while writes go on, so
//! a shard may already hold effects of records after `last_index`. That is
//! sound because every record overwrites whole keys: replaying the WAL from
//! `last_index + 1` over such a state ends in exactly the state of the log.
//!
//! A snapshot is written to a `.tmp` file, fsync'd, renamed into place and
//! the directory fsync'd; only then may WAL segments it covers be deleted.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::fs::Fs;
use super::lww::{Lww, BUCKETS};
use super::record::{validate_key, Limits, Op, Timestamp, MAX_PAYLOAD_BYTES};
use super::state::State;
use super::{Error, MAX_KEY_BYTES};
use bytes::Bytes;

const MAGIC: &[u8; 8] = b"KVSTSNAP";
const END_MAGIC: &[u8; 8] = b"SNAPEND\0";
const VERSION: u32 = 1;
/// Masterless snapshots: entries carry their timestamp and tombstones.
const VERSION_LWW: u32 = 2;
const HEADER_BYTES: usize = 32;

pub fn snapshot_name(last_index: u64) -> String {
    format!("{last_index:020}.snap")
}

fn parse_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".snap")?;
    (stem.len() == 20).then(|| stem.parse().ok()).flatten()
}

/// Snapshots present in `dir`, newest first; leftover temp files removed.
pub fn list(fs: &dyn Fs, dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    fs.create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut out = Vec::new();
    for name in fs
        .list(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
    {
        if name.ends_with(".tmp") {
            // An unfinished snapshot from before a crash; never trusted.
            let _ = fs.remove(&dir.join(&name));
        } else if let Some(i) = parse_name(&name) {
            out.push((i, dir.join(name)));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Header fields of a loaded snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub last_index: u64,
    pub last_epoch: u64,
}

/// A reader that checksums what passes through it.
struct CrcReader<R> {
    inner: R,
    crc: u32,
    pos: u64,
}

impl<R: Read> CrcReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Where a snapshot being loaded comes from, which says how it is checked.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// This node's own `snap/`: written by us, checked for damage only.
    Own,
    /// A primary's upload: every key and value must also be one a client
    /// write could carry under `limits` (an invalid key could never be read
    /// or deleted again).
    Peer(&'a Limits),
}

/// Loads the snapshot at `path` into `state` (which must be empty), and
/// into `lww` in masterless mode.
// One of the fuzzed decoders (`fuzz/`): its code is kept exactly as fuzzed,
// one pass in the order of the format, rather than split into steps.
#[allow(clippy::too_many_lines)]
pub fn load(
    fs: &dyn Fs,
    path: &Path,
    state: &State,
    lww: Option<&Lww>,
    source: Source<'_>,
) -> Result<SnapshotMeta, Error> {
    let max_value_bytes = match source {
        Source::Own => MAX_PAYLOAD_BYTES,
        Source::Peer(limits) => limits.max_value_bytes,
    };
    let f = fs
        .open_read(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, f),
        crc: 0,
        pos: 0,
    };
    let corrupt = |offset: u64, reason: String| Error::Corruption {
        file: path.to_path_buf(),
        offset,
        reason,
    };
    let short = |pos: u64, e: std::io::Error| corrupt(pos, format!("snapshot ends early: {e}"));

    let mut header = [0u8; HEADER_BYTES];
    r.exact(&mut header).map_err(|e| short(0, e))?;
    if &header[..8] != MAGIC {
        return Err(corrupt(0, "bad snapshot magic".into()));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION && version != VERSION_LWW {
        return Err(corrupt(
            8,
            format!("unsupported snapshot version {version}"),
        ));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[16..24]);
    let last_index = u64::from_le_bytes(word);
    word.copy_from_slice(&header[24..32]);
    let last_epoch = u64::from_le_bytes(word);

    let mut count = 0u64;
    let mut key = Vec::new();
    loop {
        let at = r.pos;
        let mut tag = [0u8; 4];
        r.exact(&mut tag).map_err(|e| short(at, e))?;
        if &tag == b"SNAP" {
            // Keys are at most MAX_KEY_BYTES long, so a key length can never
            // spell "SNAP" (0x50414e53): this is the trailer.
            let mut rest = [0u8; 4];
            r.exact(&mut rest).map_err(|e| short(at, e))?;
            if &rest != b"END\0" {
                return Err(corrupt(at, "bad snapshot trailer marker".into()));
            }
            let n = r.u64().map_err(|e| short(at, e))?;
            let expect_crc = r.crc;
            let mut c = [0u8; 4];
            r.inner.read_exact(&mut c).map_err(|e| short(at, e))?;
            if u32::from_le_bytes(c) != expect_crc {
                return Err(corrupt(at, "snapshot checksum mismatch".into()));
            }
            if n != count {
                return Err(corrupt(
                    at,
                    format!("trailer says {n} entries, found {count}"),
                ));
            }
            let mut extra = [0u8; 1];
            if r.inner.read(&mut extra).map_err(|e| short(at, e))? != 0 {
                return Err(corrupt(at + 20, "bytes after snapshot trailer".into()));
            }
            break;
        }
        let klen = u32::from_le_bytes(tag) as usize;
        if klen == 0 || klen > MAX_KEY_BYTES {
            return Err(corrupt(at, format!("implausible key length {klen}")));
        }
        key.clear();
        key.resize(klen, 0);
        r.exact(&mut key).map_err(|e| short(at, e))?;
        if let Source::Peer(_) = source {
            validate_key(&key).map_err(|why| corrupt(at, why))?;
        }
        let vlen = r.u32().map_err(|e| short(at, e))? as usize;
        if vlen > max_value_bytes {
            return Err(corrupt(
                at,
                format!("value length {vlen} is over the limit of {max_value_bytes}"),
            ));
        }
        let mut value = vec![0u8; vlen];
        r.exact(&mut value).map_err(|e| short(at, e))?;
        let (ts, tombstone) = if version == VERSION_LWW {
            let physical_ms = r.u64().map_err(|e| short(at, e))?;
            let logical = r.u32().map_err(|e| short(at, e))?;
            let node = r.u32().map_err(|e| short(at, e))?;
            let mut flags = [0u8; 1];
            r.exact(&mut flags).map_err(|e| short(at, e))?;
            let ts = Timestamp {
                physical_ms,
                logical,
                node,
            };
            (ts, flags[0] & 1 == 1)
        } else {
            (Timestamp::default(), false)
        };
        let key = Bytes::copy_from_slice(&key);
        let op = if tombstone {
            Op::Delete { key }
        } else {
            Op::Put {
                key,
                value: Bytes::from(value),
            }
        };
        match lww {
            Some(lww) => {
                lww.apply(state, ts, &op);
            }
            None if tombstone => {}
            None => {
                state.apply(&op);
            }
        }
        count += 1;
    }
    Ok(SnapshotMeta {
        last_index,
        last_epoch,
    })
}

/// Writes a snapshot of `state` covering the log through `meta.last_index`
/// and makes it durable; with `lww` (masterless mode) in version 2, with
/// stamps and tombstones. Returns its path and size in bytes.
pub fn write(
    fs: &dyn Fs,
    dir: &Path,
    state: &State,
    lww: Option<&Lww>,
    meta: SnapshotMeta,
) -> Result<(PathBuf, u64), Error> {
    let final_path = dir.join(snapshot_name(meta.last_index));
    let tmp_path = dir.join(format!("{}.tmp", snapshot_name(meta.last_index)));
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp_path.display()), e);
    let mut f = fs.create(&tmp_path).map_err(|e| io("creating", e))?;

    let mut crc = 0u32;
    let mut size = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(MAGIC);
    let version = if lww.is_some() { VERSION_LWW } else { VERSION };
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&meta.last_index.to_le_bytes());
    buf.extend_from_slice(&meta.last_epoch.to_le_bytes());
    let mut count = 0u64;
    let mut flush = |buf: &mut Vec<u8>, f: &mut Box<dyn super::fs::WriteFile>| {
        crc = crc32c::crc32c_append(crc, buf);
        size += buf.len() as u64;
        let r = f.write_all(buf);
        buf.clear();
        r
    };
    if let Some(lww) = lww {
        for b in 0..BUCKETS {
            for v in lww.bucket(state, b) {
                let value = v.value.as_deref().unwrap_or_default();
                buf.extend_from_slice(&(v.key.len() as u32).to_le_bytes());
                buf.extend_from_slice(&v.key);
                buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
                buf.extend_from_slice(value);
                buf.extend_from_slice(&v.ts.physical_ms.to_le_bytes());
                buf.extend_from_slice(&v.ts.logical.to_le_bytes());
                buf.extend_from_slice(&v.ts.node.to_le_bytes());
                buf.push(u8::from(v.value.is_none()));
                count += 1;
            }
            if buf.len() >= 1 << 20 {
                flush(&mut buf, &mut f).map_err(|e| io("writing", e))?;
            }
        }
    }
    for shard in (0..state.shard_count()).filter(|_| lww.is_none()) {
        // Copy the shard out under its read lock, write it with no lock held.
        state.for_each_in_shard(shard, |k, v| {
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
            count += 1;
        });
        if buf.len() >= 1 << 20 {
            flush(&mut buf, &mut f).map_err(|e| io("writing", e))?;
        }
    }
    buf.extend_from_slice(END_MAGIC);
    buf.extend_from_slice(&count.to_le_bytes());
    flush(&mut buf, &mut f).map_err(|e| io("writing", e))?;
    f.write_all(&crc.to_le_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| io("finishing", e))?;
    size += 4;
    drop(f);
    fs.rename(&tmp_path, &final_path)
        .map_err(|e| io("renaming", e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io(format!("fsync of {}", dir.display()), e))?;
    Ok((final_path, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::RealFs;

    fn ts(ms: u64) -> Timestamp {
        Timestamp {
            physical_ms: ms,
            logical: 1,
            node: 7,
        }
    }

    #[test]
    fn a_masterless_snapshot_keeps_stamps_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (state, lww) = (State::new(), Lww::new());
        lww.apply(
            &state,
            ts(5),
            &Op::Put {
                key: Bytes::from_static(b"live"),
                value: Bytes::from_static(b"v"),
            },
        );
        lww.apply(
            &state,
            ts(6),
            &Op::Delete {
                key: Bytes::from_static(b"gone"),
            },
        );
        let meta = SnapshotMeta {
            last_index: 9,
            last_epoch: 2,
        };
        let (path, _) = write(&RealFs, dir.path(), &state, Some(&lww), meta).unwrap();

        let (s2, l2) = (State::new(), Lww::new());
        assert_eq!(
            load(&RealFs, &path, &s2, Some(&l2), Source::Own).unwrap(),
            meta
        );
        assert_eq!(s2.get(b"live").as_deref(), Some(&b"v"[..]));
        assert_eq!(
            l2.entry(b"live").map(|e| (e.ts, e.tombstone)),
            Some((ts(5), false))
        );
        assert_eq!(
            l2.entry(b"gone").map(|e| (e.ts, e.tombstone)),
            Some((ts(6), true))
        );
        assert_eq!(l2.digests(), lww.digests());
        // An older put of the deleted key still loses after the reload.
        l2.apply(
            &s2,
            ts(4),
            &Op::Put {
                key: Bytes::from_static(b"gone"),
                value: Bytes::from_static(b"old"),
            },
        );
        assert_eq!(s2.get(b"gone"), None);

        // Loaded without stamps (primary/secondary), tombstones are dropped.
        let s3 = State::new();
        load(&RealFs, &path, &s3, None, Source::Own).unwrap();
        assert_eq!(s3.len(), 1);
        assert_eq!(s3.digest(), state.digest());
    }
}
