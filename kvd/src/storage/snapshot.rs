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
/// into `lww` in masterless mode: one pass in the order of the format
/// (header, entries, trailer), refusing damage at the offset it is found.
pub fn load(
    fs: &dyn Fs,
    path: &Path,
    state: &State,
    lww: Option<&Lww>,
    source: Source<'_>,
) -> Result<SnapshotMeta, Error> {
    let f = fs
        .open_read(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut l = Loader {
        r: CrcReader {
            inner: BufReader::with_capacity(1 << 20, f),
            crc: 0,
            pos: 0,
        },
        path,
        source,
        max_value_bytes: match source {
            Source::Own => MAX_PAYLOAD_BYTES,
            Source::Peer(limits) => limits.max_value_bytes,
        },
        version: 0,
        key: Vec::new(),
    };
    let meta = l.header()?;
    let mut count = 0u64;
    loop {
        let at = l.r.pos;
        let mut tag = [0u8; 4];
        l.r.exact(&mut tag).map_err(|e| l.short(at, e))?;
        if &tag == b"SNAP" {
            // Keys are at most MAX_KEY_BYTES long, so a key length can never
            // spell "SNAP" (0x50414e53): this is the trailer.
            l.trailer(at, count)?;
            return Ok(meta);
        }
        let (ts, op) = l.entry(at, u32::from_le_bytes(tag) as usize)?;
        match lww {
            Some(lww) => {
                lww.apply(state, ts, &op);
            }
            None if matches!(op, Op::Delete { .. }) => {}
            None => {
                state.apply(&op);
            }
        }
        count += 1;
    }
}

/// A snapshot being read by [`load`].
struct Loader<'a, R> {
    r: CrcReader<R>,
    path: &'a Path,
    source: Source<'a>,
    max_value_bytes: usize,
    /// The header's format version.
    version: u32,
    /// The current entry's key (its buffer is reused).
    key: Vec<u8>,
}

impl<R: Read> Loader<'_, R> {
    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::Corruption {
            file: self.path.to_path_buf(),
            offset,
            reason,
        }
    }

    fn short(&self, pos: u64, e: std::io::Error) -> Error {
        self.corrupt(pos, format!("snapshot ends early: {e}"))
    }

    /// The header: magic, a version this build reads, the position covered.
    fn header(&mut self) -> Result<SnapshotMeta, Error> {
        let mut header = [0u8; HEADER_BYTES];
        self.r.exact(&mut header).map_err(|e| self.short(0, e))?;
        if &header[..8] != MAGIC {
            return Err(self.corrupt(0, "bad snapshot magic".into()));
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != VERSION && version != VERSION_LWW {
            return Err(self.corrupt(8, format!("unsupported snapshot version {version}")));
        }
        self.version = version;
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[16..24]);
        let last_index = u64::from_le_bytes(word);
        word.copy_from_slice(&header[24..32]);
        let last_epoch = u64::from_le_bytes(word);
        Ok(SnapshotMeta {
            last_index,
            last_epoch,
        })
    }

    /// The trailer at `at` ("SNAP" already read): the rest of its marker,
    /// the entry count, the checksum of everything before it, and then the
    /// end of the file.
    fn trailer(&mut self, at: u64, count: u64) -> Result<(), Error> {
        let mut rest = [0u8; 4];
        self.r.exact(&mut rest).map_err(|e| self.short(at, e))?;
        if &rest != b"END\0" {
            return Err(self.corrupt(at, "bad snapshot trailer marker".into()));
        }
        let n = self.r.u64().map_err(|e| self.short(at, e))?;
        let expect_crc = self.r.crc;
        let mut c = [0u8; 4];
        self.r
            .inner
            .read_exact(&mut c)
            .map_err(|e| self.short(at, e))?;
        if u32::from_le_bytes(c) != expect_crc {
            return Err(self.corrupt(at, "snapshot checksum mismatch".into()));
        }
        if n != count {
            return Err(self.corrupt(at, format!("trailer says {n} entries, found {count}")));
        }
        let mut extra = [0u8; 1];
        if self
            .r
            .inner
            .read(&mut extra)
            .map_err(|e| self.short(at, e))?
            != 0
        {
            return Err(self.corrupt(at + 20, "bytes after snapshot trailer".into()));
        }
        Ok(())
    }

    /// The entry at `at` whose key is `klen` bytes (the length already
    /// read): its stamp and what it does (a tombstone is a delete).
    fn entry(&mut self, at: u64, klen: usize) -> Result<(Timestamp, Op), Error> {
        if klen == 0 || klen > MAX_KEY_BYTES {
            return Err(self.corrupt(at, format!("implausible key length {klen}")));
        }
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        key.resize(klen, 0);
        self.r.exact(&mut key).map_err(|e| self.short(at, e))?;
        if let Source::Peer(_) = self.source {
            validate_key(&key).map_err(|why| self.corrupt(at, why))?;
        }
        let vlen = self.r.u32().map_err(|e| self.short(at, e))? as usize;
        if vlen > self.max_value_bytes {
            let max = self.max_value_bytes;
            return Err(self.corrupt(
                at,
                format!("value length {vlen} is over the limit of {max}"),
            ));
        }
        let mut value = vec![0u8; vlen];
        self.r.exact(&mut value).map_err(|e| self.short(at, e))?;
        let (ts, tombstone) = if self.version == VERSION_LWW {
            self.stamp(at)?
        } else {
            (Timestamp::default(), false)
        };
        let k = Bytes::copy_from_slice(&key);
        self.key = key;
        let op = if tombstone {
            Op::Delete { key: k }
        } else {
            Op::Put {
                key: k,
                value: Bytes::from(value),
            }
        };
        Ok((ts, op))
    }

    /// A version-2 entry's stamp and flags (bit 0: tombstone).
    fn stamp(&mut self, at: u64) -> Result<(Timestamp, bool), Error> {
        let physical_ms = self.r.u64().map_err(|e| self.short(at, e))?;
        let logical = self.r.u32().map_err(|e| self.short(at, e))?;
        let node = self.r.u32().map_err(|e| self.short(at, e))?;
        let mut flags = [0u8; 1];
        self.r.exact(&mut flags).map_err(|e| self.short(at, e))?;
        let ts = Timestamp {
            physical_ms,
            logical,
            node,
        };
        Ok((ts, flags[0] & 1 == 1))
    }
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
