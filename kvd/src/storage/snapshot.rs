//! Snapshots: the key space as of some log index, so the WAL before it can go.
//!
//! # File format (version 5; docs/DESIGN.md §3.4), integers little-endian
//!
//! `snap/{last_index:020}.snap`:
//!
//! ```text
//! header  magic b"KVSTSNAP" | version u32 = 5 | reserved u32 = 0
//!         | last_index u64 | last_epoch u64                      (32 bytes)
//! entries key_len u32 | key | value_len u32 | value
//!         | create_index u64 | mod_index u64 | version u64      (versions 3, 4)
//!         | expiry kind u8 | u64                                (version 4)
//!         | ts_ms u64 | logical u32 | node u32 | flags u8       (versions 2 to 4)
//! leases  b"SNAPLEAS" | count u64 | count x (id, ttl_ms, deadline_ms u64)
//!                                                               (versions 4, 5)
//! config  b"SNAPCONF" | present u8 | [index u64 | configuration record body]
//!                                                               (version 5)
//! trailer b"SNAPEND\0" | entry_count u64 | crc u32                (20 bytes)
//! crc = CRC32C of every byte before it; flags bit 0: a tombstone (empty value).
//! ```
//!
//! The lease section is the table as it was at `last_index` (the writer
//! freezes it when it asks for the snapshot), not fuzzy like the entries:
//! lease records replayed after it then decide as they did the first time.
//! An entry's lease need not be in it (granted after `last_index`).
//! The configuration section is the configuration record in effect at
//! `last_index` (docs/DESIGN.md §4.11), if the log had one by then; its
//! body is the WAL record's (`replication::config`). Versions 1 to 4 load
//! with none.
//!
//! kvd writes version 4 in every mode: in key order from the state outside
//! masterless mode (zero stamps, no tombstones), by anti-entropy bucket with
//! stamps and tombstones in it. Versions 1 (no stamps) and 2 (masterless,
//! no versions) are the first release's and still load: their keys get
//! `create_index = mod_index = 0`, `version = 1`. Every version loads in
//! either mode: without stamps in masterless mode every key gets the zero
//! stamp; outside masterless mode tombstones are dropped.
//!
//! Snapshots are *fuzzy*: written one chunk of keys at a time while writes
//! go on, so an entry may already hold the effect of a record after
//! `last_index`. That is sound because every record sets or removes whole
//! keys and the replay rule (`state.rs`) skips a record for a key whose
//! `mod_index` is at or past it: replaying the WAL from `last_index + 1`
//! over such a state ends in exactly the state of the log, versions too.
//!
//! A snapshot is written to a `.tmp` file, fsync'd, renamed into place and
//! the directory fsync'd; only then may WAL segments it covers be deleted.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::expiry::LeaseRow;
use super::fs::Fs;
use super::lww::{Lww, BUCKETS};
use super::record::{validate_key, Limits, Timestamp, MAX_PAYLOAD_BYTES};
use super::state::State;
use super::{Error, MAX_KEY_BYTES};
use crate::model::{Expiry, KeyMeta};

const MAGIC: &[u8; 8] = b"KVSTSNAP";
const END_MAGIC: &[u8; 8] = b"SNAPEND\0";
/// The first release: keys and values only.
const VERSION_PLAIN: u32 = 1;
/// The first release's masterless snapshots: entries carry their stamp and
/// tombstone flag.
const VERSION_LWW: u32 = 2;
/// The second release: versions, stamps and tombstones.
const VERSION_VERSIONED: u32 = 3;
/// The previous release: expiries and the lease section too.
const VERSION_LEASES: u32 = 4;
/// This release, in every mode: the configuration section too.
pub const VERSION: u32 = 5;
const LEASES_MAGIC: &[u8; 8] = b"SNAPLEAS";
const CONFIG_MAGIC: &[u8; 8] = b"SNAPCONF";
const HEADER_BYTES: usize = 32;

/// The versions snapshot keys from before versions existed get.
const UNVERSIONED: KeyMeta = KeyMeta {
    create_index: 0,
    mod_index: 0,
    version: 1,
};

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
    load_from(
        BufReader::with_capacity(1 << 20, f),
        path,
        0,
        state,
        lww,
        source,
    )
}

/// [`load`] from `reader`, which must end where the snapshot ends: a
/// snapshot inside a larger file (a backup, docs/DESIGN.md §3.10) is read
/// through a reader limited to its length. `base` is the snapshot's offset
/// in `path`, so every error names the byte of that file.
pub fn load_from<R: Read>(
    reader: R,
    path: &Path,
    base: u64,
    state: &State,
    lww: Option<&Lww>,
    source: Source<'_>,
) -> Result<SnapshotMeta, Error> {
    let mut l = Loader {
        r: CrcReader {
            inner: reader,
            crc: 0,
            pos: 0,
        },
        path,
        base,
        source,
        max_value_bytes: match source {
            Source::Own => MAX_PAYLOAD_BYTES,
            Source::Peer(limits) => limits.max_value_bytes,
        },
        version: 0,
        last_index: 0,
        key: Vec::new(),
        value: Vec::new(),
    };
    let meta = l.header()?;
    state.skip_to(meta.last_index);
    let mut count = 0u64;
    let mut leases_read = false;
    let mut config_read = false;
    loop {
        let at = l.r.pos;
        let mut tag = [0u8; 4];
        l.r.exact(&mut tag).map_err(|e| l.short(at, e))?;
        if &tag == b"SNAP" {
            // Keys are at most MAX_KEY_BYTES long, so a key length can never
            // spell "SNAP" (0x50414e53): the lease section or the trailer.
            let mut rest = [0u8; 4];
            l.r.exact(&mut rest).map_err(|e| l.short(at, e))?;
            if &rest == b"LEAS" && l.version >= VERSION_LEASES && !leases_read {
                for row in l.leases(at)? {
                    state.load_lease(row);
                }
                leases_read = true;
                continue;
            }
            if &rest == b"CONF" && l.version >= VERSION && leases_read && !config_read {
                state.load_config(l.config(at)?);
                config_read = true;
                continue;
            }
            if l.version >= VERSION_LEASES && !leases_read {
                return Err(l.corrupt(at, "no lease section before the trailer".into()));
            }
            if l.version >= VERSION && !config_read {
                return Err(l.corrupt(at, "no configuration section before the trailer".into()));
            }
            l.trailer(at, &rest, count)?;
            return Ok(meta);
        }
        let e = l.entry(at, u32::from_le_bytes(tag) as usize)?;
        let live = (!e.tombstone).then_some((&l.value[..], e.meta, e.expiry));
        match (lww, live) {
            (Some(lww), live) => lww.load(state, &l.key, e.ts, live),
            (None, Some((value, meta, expiry))) => state.load_expiring(&l.key, value, meta, expiry),
            (None, None) => {}
        }
        count += 1;
    }
}

/// What an entry holds besides its key and value.
struct Loaded {
    meta: KeyMeta,
    expiry: Expiry,
    ts: Timestamp,
    tombstone: bool,
}

/// A snapshot being read by [`load`].
struct Loader<'a, R> {
    r: CrcReader<R>,
    path: &'a Path,
    /// Where the snapshot starts in `path` (0 for a snapshot file).
    base: u64,
    source: Source<'a>,
    max_value_bytes: usize,
    /// The header's format version.
    version: u32,
    /// The header's last index.
    last_index: u64,
    /// The current entry's key and value (their buffers are reused).
    key: Vec<u8>,
    value: Vec<u8>,
}

impl<R: Read> Loader<'_, R> {
    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::Corruption {
            file: self.path.to_path_buf(),
            offset: self.base + offset,
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
        if !(VERSION_PLAIN..=VERSION).contains(&version) {
            return Err(self.corrupt(8, format!("unsupported snapshot version {version}")));
        }
        self.version = version;
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[16..24]);
        let last_index = u64::from_le_bytes(word);
        word.copy_from_slice(&header[24..32]);
        let last_epoch = u64::from_le_bytes(word);
        self.last_index = last_index;
        Ok(SnapshotMeta {
            last_index,
            last_epoch,
        })
    }

    /// The lease section at `at` (its marker already read): the count, then
    /// the rows, each lease at most once.
    fn leases(&mut self, at: u64) -> Result<Vec<LeaseRow>, Error> {
        let n = self.r.u64().map_err(|e| self.short(at, e))?;
        let mut rows = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for _ in 0..n {
            let mut word = || self.r.u64().map_err(|e| self.short(at, e));
            let row = (word()?, word()?, word()?);
            if !ids.insert(row.0) {
                return Err(self.corrupt(at, format!("lease {} appears twice", row.0)));
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// The configuration section at `at` (its marker already read): a
    /// flag, then the record's index and body if set.
    fn config(
        &mut self,
        at: u64,
    ) -> Result<Option<(u64, crate::replication::config::Config)>, Error> {
        let mut flag = [0u8; 1];
        self.r.exact(&mut flag).map_err(|e| self.short(at, e))?;
        match flag[0] {
            0 => return Ok(None),
            1 => {}
            f => return Err(self.corrupt(at, format!("configuration flag {f} is not 0 or 1"))),
        }
        let index = self.r.u64().map_err(|e| self.short(at, e))?;
        // The body is at most 64 members of a 2-byte length, a role and
        // a URL; its count comes first.
        let mut head = [0u8; 2];
        self.r.exact(&mut head).map_err(|e| self.short(at, e))?;
        let count = usize::from(u16::from_le_bytes(head));
        if count == 0 || count > crate::replication::config::MAX_MEMBERS {
            return Err(self.corrupt(at, format!("configuration member count {count}")));
        }
        let mut body = head.to_vec();
        for _ in 0..count {
            let mut m = [0u8; 3];
            self.r.exact(&mut m).map_err(|e| self.short(at, e))?;
            let len = usize::from(u16::from_le_bytes([m[1], m[2]]));
            if len > crate::replication::config::MAX_URL_BYTES {
                return Err(self.corrupt(at, format!("member URL of {len} bytes")));
            }
            let mut url = vec![0u8; len];
            self.r.exact(&mut url).map_err(|e| self.short(at, e))?;
            body.extend_from_slice(&m);
            body.extend_from_slice(&url);
        }
        let config =
            crate::replication::config::Config::decode(&mut kvproto::bytes::Reader::new(&body))
                .map_err(|e| self.corrupt(at, e))?;
        if index > self.last_index {
            return Err(self.corrupt(
                at,
                format!("configuration index {index} is past the snapshot"),
            ));
        }
        Ok(Some((index, config)))
    }

    /// The trailer at `at` ("SNAP" and `rest` already read): the rest of
    /// its marker, the entry count, the checksum of everything before it,
    /// and then the end of the file.
    fn trailer(&mut self, at: u64, rest: &[u8; 4], count: u64) -> Result<(), Error> {
        if rest != b"END\0" {
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
    /// read), into `self.key` and `self.value`; its versions and stamp.
    fn entry(&mut self, at: u64, klen: usize) -> Result<Loaded, Error> {
        if klen == 0 || klen > MAX_KEY_BYTES {
            return Err(self.corrupt(at, format!("implausible key length {klen}")));
        }
        self.key.resize(klen, 0);
        let mut key = std::mem::take(&mut self.key);
        let read = self.r.exact(&mut key);
        self.key = key;
        read.map_err(|e| self.short(at, e))?;
        if let Source::Peer(_) = self.source {
            validate_key(&self.key).map_err(|why| self.corrupt(at, why))?;
        }
        let vlen = self.r.u32().map_err(|e| self.short(at, e))? as usize;
        if vlen > self.max_value_bytes {
            let max = self.max_value_bytes;
            return Err(self.corrupt(
                at,
                format!("value length {vlen} is over the limit of {max}"),
            ));
        }
        self.value.resize(vlen, 0);
        let mut value = std::mem::take(&mut self.value);
        let read = self.r.exact(&mut value);
        self.value = value;
        read.map_err(|e| self.short(at, e))?;
        let meta = match self.version {
            VERSION_VERSIONED.. => self.versions(at)?,
            _ => UNVERSIONED,
        };
        let expiry = match self.version {
            VERSION_LEASES.. => self.expiry(at)?,
            _ => Expiry::Never,
        };
        let (ts, tombstone) = if self.version >= VERSION_LWW {
            self.stamp(at)?
        } else {
            (Timestamp::default(), false)
        };
        if !tombstone && (meta.version == 0 || meta.create_index > meta.mod_index) {
            return Err(self.corrupt(at, format!("implausible versions {meta:?}")));
        }
        Ok(Loaded {
            meta,
            expiry,
            ts,
            tombstone,
        })
    }

    /// A version-4 entry's expiry: kind 0 (never, u64 = 0), 1 (a deadline)
    /// or 2 (a lease).
    fn expiry(&mut self, at: u64) -> Result<Expiry, Error> {
        let mut kind = [0u8; 1];
        self.r.exact(&mut kind).map_err(|e| self.short(at, e))?;
        let n = self.r.u64().map_err(|e| self.short(at, e))?;
        match (kind[0], n) {
            (0, 0) => Ok(Expiry::Never),
            (1, d) => Ok(Expiry::At(d)),
            (2, id) => Ok(Expiry::Lease(id)),
            (k, n) => Err(self.corrupt(at, format!("bad expiry (kind {k}, {n})"))),
        }
    }

    /// A version-3 or -4 entry's versions.
    fn versions(&mut self, at: u64) -> Result<KeyMeta, Error> {
        let mut word = || self.r.u64().map_err(|e| self.short(at, e));
        Ok(KeyMeta {
            create_index: word()?,
            mod_index: word()?,
            version: word()?,
        })
    }

    /// A version-2 to -4 entry's stamp and flags (bit 0: tombstone).
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

/// Which versions a snapshot's keys are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// Each key's own.
    Kept,
    /// Every key `create_index = mod_index = last_index`, `version = 1`:
    /// the mode switch's rebase (docs/DESIGN.md §6.1).
    Rebased,
}

/// Appends one version-4 entry.
fn put_entry(
    buf: &mut Vec<u8>,
    key: &[u8],
    value: &[u8],
    (meta, expiry): (KeyMeta, Expiry),
    ts: Timestamp,
    tombstone: bool,
) {
    let len = |n: usize| u32::try_from(n).expect("keys and values are far below 4 GiB");
    buf.extend_from_slice(&len(key.len()).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&len(value.len()).to_le_bytes());
    buf.extend_from_slice(value);
    for n in [meta.create_index, meta.mod_index, meta.version] {
        buf.extend_from_slice(&n.to_le_bytes());
    }
    let (kind, n) = match expiry {
        Expiry::Never | Expiry::Keep => (0u8, 0u64),
        Expiry::At(d) => (1, d),
        Expiry::Lease(id) => (2, id),
    };
    buf.push(kind);
    buf.extend_from_slice(&n.to_le_bytes());
    buf.extend_from_slice(&ts.physical_ms.to_le_bytes());
    buf.extend_from_slice(&ts.logical.to_le_bytes());
    buf.extend_from_slice(&ts.node.to_le_bytes());
    buf.push(u8::from(tombstone));
}

/// The snapshot file being written: its bytes go through `buf`, and every
/// byte is counted into the checksum on its way out.
struct Out {
    f: Box<dyn super::fs::WriteFile>,
    buf: Vec<u8>,
    crc: u32,
    size: u64,
    count: u64,
}

impl Out {
    fn flush(&mut self) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, &self.buf);
        self.size += self.buf.len() as u64;
        let r = self.f.write_all(&self.buf);
        self.buf.clear();
        r
    }

    fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }
}

/// Writes the entries of a snapshot: with `lww` (masterless mode) bucket by
/// bucket, stamps and tombstones included, each bucket read consistently
/// with its values; else in key order, one chunk of the state per read
/// lock, and the file written with no lock held.
fn write_entries(
    out: &mut Out,
    state: &State,
    lww: Option<&Lww>,
    versions: impl Fn(KeyMeta) -> KeyMeta,
) -> std::io::Result<()> {
    if let Some(lww) = lww {
        for b in 0..BUCKETS {
            for v in lww.bucket(state, b) {
                let value = v.value.as_deref().unwrap_or_default();
                let meta = if v.value.is_some() {
                    (versions(v.meta), v.expiry)
                } else {
                    (KeyMeta::default(), Expiry::Never)
                };
                put_entry(&mut out.buf, &v.key, value, meta, v.ts, v.value.is_none());
                out.count += 1;
            }
            out.flush_if_full()?;
        }
        return Ok(());
    }
    let mut cursor = None;
    loop {
        let next = state.chunk(cursor.as_deref(), 1 << 20, |k, v, m, x| {
            let meta = (versions(m), x);
            put_entry(&mut out.buf, k, v, meta, Timestamp::default(), false);
            out.count += 1;
        });
        out.flush_if_full()?;
        match next {
            Some(after) => cursor = Some(after),
            None => return Ok(()),
        }
    }
}

/// Writes a snapshot of `state` covering the log through `meta.last_index`
/// and makes it durable (version 4; with `lww`, masterless mode, with
/// stamps and tombstones; the leases of [`State::lease_rows`]). Returns its
/// path and size in bytes.
pub fn write(
    fs: &dyn Fs,
    dir: &Path,
    state: &State,
    lww: Option<&Lww>,
    meta: SnapshotMeta,
    versions: Versions,
    config: Option<&(u64, crate::replication::config::Config)>,
) -> Result<(PathBuf, u64), Error> {
    let final_path = dir.join(snapshot_name(meta.last_index));
    let tmp_path = dir.join(format!("{}.tmp", snapshot_name(meta.last_index)));
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp_path.display()), e);
    let f = fs.create(&tmp_path).map_err(|e| io("creating", e))?;
    let mut out = Out {
        f,
        buf: Vec::with_capacity(2 << 20),
        crc: 0,
        size: 0,
        count: 0,
    };
    out.buf.extend_from_slice(MAGIC);
    out.buf.extend_from_slice(&VERSION.to_le_bytes());
    out.buf.extend_from_slice(&0u32.to_le_bytes());
    out.buf.extend_from_slice(&meta.last_index.to_le_bytes());
    out.buf.extend_from_slice(&meta.last_epoch.to_le_bytes());
    let base = meta.last_index;
    let versions = |m: KeyMeta| match versions {
        Versions::Kept => m,
        Versions::Rebased => KeyMeta {
            create_index: base,
            mod_index: base,
            version: 1,
        },
    };
    write_entries(&mut out, state, lww, versions).map_err(|e| io("writing", e))?;
    let leases = state.lease_rows(meta.last_index);
    out.buf.extend_from_slice(LEASES_MAGIC);
    out.buf
        .extend_from_slice(&(leases.len() as u64).to_le_bytes());
    for (id, ttl_ms, deadline_ms) in leases {
        for n in [id, ttl_ms, deadline_ms] {
            out.buf.extend_from_slice(&n.to_le_bytes());
        }
    }
    out.buf.extend_from_slice(CONFIG_MAGIC);
    match config {
        None => out.buf.push(0),
        Some((index, config)) => {
            out.buf.push(1);
            out.buf.extend_from_slice(&index.to_le_bytes());
            config.encode(&mut out.buf);
        }
    }
    out.buf.extend_from_slice(END_MAGIC);
    let count = out.count;
    out.buf.extend_from_slice(&count.to_le_bytes());
    out.flush().map_err(|e| io("writing", e))?;
    let Out {
        mut f, crc, size, ..
    } = out;
    f.write_all(&crc.to_le_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| io("finishing", e))?;
    drop(f);
    fs.rename(&tmp_path, &final_path)
        .map_err(|e| io("renaming", e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io(format!("fsync of {}", dir.display()), e))?;
    Ok((final_path, size + 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use crate::model::Op;
    use crate::storage::fs::RealFs;
    use bytes::Bytes;

    fn ts(ms: u64) -> Timestamp {
        Timestamp {
            physical_ms: ms,
            logical: 1,
            node: 7,
        }
    }

    fn put(k: &'static str, v: &'static str) -> Op {
        Op::Put {
            key: Bytes::from_static(k.as_bytes()),
            value: Bytes::from_static(v.as_bytes()),
            expiry: Expiry::Never,
        }
    }

    const META: SnapshotMeta = SnapshotMeta {
        last_index: 9,
        last_epoch: 2,
    };

    #[test]
    fn a_masterless_snapshot_keeps_stamps_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (state, lww) = (State::new(), Lww::new());
        lww.apply(&state, 1, ts(5), &put("live", "v"), false);
        let gone = Op::Delete {
            key: Bytes::from_static(b"gone"),
        };
        lww.apply(&state, 2, ts(6), &gone, false);
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            Some(&lww),
            META,
            Versions::Kept,
            None,
        )
        .unwrap();

        let (s2, l2) = (State::new(), Lww::new());
        assert_eq!(
            load(&RealFs, &path, &s2, Some(&l2), Source::Own).unwrap(),
            META
        );
        assert_eq!(
            s2.get_versioned(b"live", 0),
            state.get_versioned(b"live", 0)
        );
        assert_eq!(s2.applied_index(), 9);
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
        l2.apply(&s2, 10, ts(4), &put("gone", "old"), false);
        assert_eq!(s2.get(b"gone", 0), None);

        // Loaded without stamps (primary/secondary), tombstones are dropped.
        let s3 = State::new();
        load(&RealFs, &path, &s3, None, Source::Own).unwrap();
        assert_eq!(s3.len(), 1);
        assert_eq!(s3.digest(), state.digest());
    }

    #[test]
    fn versions_survive_a_snapshot_and_a_rebase_resets_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new();
        for (i, op) in [put("a", "1"), put("b", "2"), put("a", "3")]
            .iter()
            .enumerate()
        {
            state.apply(i as u64 + 1, Timestamp::default(), op, false);
        }
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            None,
            META,
            Versions::Kept,
            None,
        )
        .unwrap();
        let s2 = State::new();
        load(&RealFs, &path, &s2, None, Source::Own).unwrap();
        for k in [b"a", b"b"] {
            assert_eq!(s2.get_versioned(k, 0), state.get_versioned(k, 0));
        }
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            None,
            META,
            Versions::Rebased,
            None,
        )
        .unwrap();
        let s3 = State::new();
        load(&RealFs, &path, &s3, None, Source::Own).unwrap();
        let base = KeyMeta {
            create_index: 9,
            mod_index: 9,
            version: 1,
        };
        assert_eq!(
            s3.get_versioned(b"a", 0),
            Some((Bytes::from_static(b"3"), base))
        );
    }

    /// A snapshot of the first release: version 1, or 2 with stamps.
    fn first_release(version: u32, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&META.last_index.to_le_bytes());
        out.extend_from_slice(&META.last_epoch.to_le_bytes());
        for (k, v) in entries {
            for part in [k, v] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part);
            }
            if version == VERSION_LWW {
                out.extend_from_slice(&[0; 16]);
                out.push(0);
            }
        }
        out.extend_from_slice(END_MAGIC);
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn first_release_snapshots_load_with_versions_0_0_1() {
        let dir = tempfile::tempdir().unwrap();
        for version in [VERSION_PLAIN, VERSION_LWW] {
            let path = dir.path().join(snapshot_name(version.into()));
            std::fs::write(&path, first_release(version, &[(b"k", b"v"), (b"j", b"")])).unwrap();
            let s = State::new();
            assert_eq!(load(&RealFs, &path, &s, None, Source::Own).unwrap(), META);
            assert_eq!(
                s.get_versioned(b"k", 0),
                Some((Bytes::from_static(b"v"), UNVERSIONED))
            );
            assert_eq!(s.len(), 2);
        }
    }

    #[test]
    fn expiries_and_the_frozen_lease_table_survive_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new();
        let with = |k: &'static str, x| Op::Put {
            key: Bytes::from_static(k.as_bytes()),
            value: Bytes::from_static(b"v"),
            expiry: x,
        };
        state.apply(1, ts(1000), &Op::LeaseGrant { ttl_ms: 500 }, false);
        state.apply(2, ts(1000), &with("l", Expiry::Lease(1)), false);
        state.apply(3, ts(1000), &with("t", Expiry::At(9000)), false);
        state.apply(4, ts(1000), &with("n", Expiry::Never), false);
        state.freeze_leases(4);
        // After the freeze: not in this snapshot's lease section.
        state.apply(5, ts(1000), &Op::LeaseGrant { ttl_ms: 700 }, false);
        let meta = SnapshotMeta {
            last_index: 4,
            last_epoch: 1,
        };
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            None,
            meta,
            Versions::Kept,
            None,
        )
        .unwrap();
        let s2 = State::new();
        load(&RealFs, &path, &s2, None, Source::Own).unwrap();
        for k in [&b"l"[..], b"t", b"n"] {
            assert_eq!(s2.get_raw(k), state.get_raw(k));
        }
        assert_eq!(s2.keys_with_ttl(), 2);
        assert_eq!(
            s2.lease(1, 10, 1000).map(|(l, _)| (l.deadline_ms, l.keys)),
            Some((1500, vec![Bytes::from_static(b"l")]))
        );
        assert_eq!(s2.lease_count(), 1, "the table as frozen at 4");
    }

    #[test]
    fn a_version_4_snapshot_without_its_lease_section_or_with_a_bad_expiry_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new();
        let op = Op::Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::new(),
            expiry: Expiry::At(5),
        };
        state.apply(1, ts(1), &op, false);
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            None,
            META,
            Versions::Kept,
            None,
        )
        .unwrap();
        let good = std::fs::read(&path).unwrap();
        let rewrite = |bytes: &[u8]| {
            // A valid checksum over the changed bytes: only the layout is wrong.
            let body = &bytes[..bytes.len() - 4];
            let mut out = body.to_vec();
            out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            std::fs::write(&path, out).unwrap();
            load(&RealFs, &path, &State::new(), None, Source::Own)
        };
        assert!(rewrite(&good).is_ok());
        // The expiry kind of the one entry (after key, value and versions).
        let kind_at = HEADER_BYTES + 4 + 1 + 4 + 24;
        assert_eq!(good[kind_at], 1);
        let mut bad = good.clone();
        bad[kind_at] = 3;
        assert!(matches!(rewrite(&bad), Err(Error::Corruption { .. })));
        // Without the lease section (16 bytes: marker and a zero count),
        // which comes before the configuration section (9 bytes: marker
        // and an unset flag).
        let at = good.len() - 20 - 9 - 16;
        assert_eq!(&good[at..at + 8], LEASES_MAGIC);
        let mut cut = good[..at].to_vec();
        cut.extend_from_slice(&good[at + 16..]);
        assert!(matches!(rewrite(&cut), Err(Error::Corruption { .. })));
    }

    #[test]
    fn the_configuration_section_round_trips_and_older_versions_load_without_one() {
        use crate::replication::config::Config;
        let dir = tempfile::tempdir().unwrap();
        let state = State::new();
        let config = Config {
            voters: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            learners: vec!["http://127.0.0.1:3".into()],
        };
        let meta = SnapshotMeta {
            last_index: 9,
            last_epoch: 2,
        };
        let entry = (7, config.clone());
        let (path, _) = write(
            &RealFs,
            dir.path(),
            &state,
            None,
            meta,
            Versions::Kept,
            Some(&entry),
        )
        .unwrap();
        let s2 = State::new();
        load(&RealFs, &path, &s2, None, Source::Own).unwrap();
        assert_eq!(s2.loaded_config(), Some(entry));
        let good = std::fs::read(&path).unwrap();
        let rewrite = |bytes: &[u8]| {
            let body = &bytes[..bytes.len() - 4];
            let mut out = body.to_vec();
            out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            std::fs::write(&path, &out).unwrap();
            let s = State::new();
            load(&RealFs, &path, &s, None, Source::Own).map(|_| s.loaded_config())
        };
        let section = 8 + 1 + 8 + config.encoded_len();
        let at = good.len() - 20 - section;
        assert_eq!(&good[at..at + 8], CONFIG_MAGIC);
        // Version 5 without the section is damage; version 4 without it
        // loads with none.
        let mut cut = good[..at].to_vec();
        cut.extend_from_slice(&good[at + section..]);
        assert!(matches!(rewrite(&cut), Err(Error::Corruption { .. })));
        cut[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(rewrite(&cut).unwrap(), None);
        // A version 4 snapshot holding one is damage too.
        let mut old = good.clone();
        old[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(rewrite(&old), Err(Error::Corruption { .. })));
        // An index past the snapshot, a bad flag, a bad body.
        let mut past = good.clone();
        past[at + 9..at + 17].copy_from_slice(&10u64.to_le_bytes());
        assert!(matches!(rewrite(&past), Err(Error::Corruption { .. })));
        let mut flag = good.clone();
        flag[at + 8] = 2;
        assert!(matches!(rewrite(&flag), Err(Error::Corruption { .. })));
        let mut role = good.clone();
        role[at + 17 + 2] = 9;
        assert!(matches!(rewrite(&role), Err(Error::Corruption { .. })));
    }
}
