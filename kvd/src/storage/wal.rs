//! The write-ahead log: an ordered sequence of segment files.
//!
//! # Files
//!
//! `wal/{first_index:020}.wal`, each starting with a 16-byte header
//! (`b"KVSTWAL\0"`, format version u32 LE = 3, reserved u32 = 0) followed by
//! frames as described in [`super::record`]. Segments of earlier releases
//! (version 1: no transactions; version 2: no expiries or leases) are still
//! read, and a record newer than its segment's version is damage; a log
//! whose last segment is older starts a new segment before its first
//! append, so that no segment mixes versions.
//!
//! `wal/next-segment.tmp` is the next segment made in advance: a header and
//! no records, renamed into place when the active segment fills up, so that
//! rolling needs no new file descriptor (the directory is held open too).
//! Recovery ignores it; it is made again after every roll and at start.
//!
//! # Invariants
//!
//! - Record indexes are contiguous across all segments: each record's index
//!   is its predecessor's plus one; a segment's name is its first index.
//! - Only the last segment can hold an incomplete or damaged tail (sealed
//!   segments were fsync'd whole before the next one was created), and such a
//!   tail is only an *unacknowledged* write if no valid record follows it.
//! - After a failed write or fsync the log is poisoned: the kernel may have
//!   dropped the dirty pages, so no later fsync can vouch for them, and every
//!   further append is refused until restart re-reads what is really on disk.
//! - A roll that fails before any byte of a record went to the new segment
//!   (no spare, and creating one failed: say, out of file descriptors)
//!   puts nothing in doubt: that append is refused, the log stays usable,
//!   and the next append tries the roll again.
//! - Once the data dir, `LOCK` or `wal/` is removed or replaced (checked at
//!   every roll and when asked), or the active segment has been unlinked
//!   (checked after every fsync, before anything is acknowledged), the log
//!   refuses appends: they would land in unlinked files that no restart
//!   reads.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fs::{Anchors, DirHandle, Fs, SyncHandle, WriteFile};
use super::health::Health;
use super::record::{self, Frame, Record};
use super::{Error, StorageState};

pub const SEGMENT_MAGIC: &[u8; 8] = b"KVSTWAL\0";
/// The version new segments get.
pub const SEGMENT_VERSION: u32 = 3;
/// The first release's segments: ops 1 to 4 only.
const FIRST_RELEASE_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 16;

fn segment_header() -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h
}

/// A segment header's format version, or what is wrong with it: offset
/// and reason.
fn header_version(header: &[u8]) -> Result<u32, (usize, String)> {
    if &header[..8] != SEGMENT_MAGIC {
        return Err((0, "bad segment magic".into()));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if !(FIRST_RELEASE_VERSION..=SEGMENT_VERSION).contains(&version) {
        return Err((8, format!("unsupported WAL format version {version}")));
    }
    Ok(version)
}

/// Name of the segment made in advance (see the module docs).
pub const SPARE_NAME: &str = "next-segment.tmp";

/// Zeros written ahead of the active segment's last record, at most, so
/// that the appends after them overwrite blocks the file already has.
/// Each extension is one fsync's extra work (its size and blocks go
/// through the journal once, its zeros to the disk); the appends it covers
/// then cost an overwrite in place. Part of one extension is all the disk
/// space it can waste.
pub const WRITE_AHEAD_BYTES: u64 = 1 << 20;

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    if stem.len() != 20 {
        return None;
    }
    stem.parse().ok()
}

#[derive(Debug, Clone)]
struct Segment {
    first_index: u64,
    path: PathBuf,
    /// Size on disk; kept current for the active segment too.
    bytes: u64,
    /// Format version of its header (known once recovery read it).
    version: u32,
}

/// The log, open for appending.
pub struct Wal {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    /// Sorted by first index; the last one is being appended to.
    segments: Vec<Segment>,
    active: Box<dyn WriteFile>,
    /// The active segment file's length: its records, then the zeros
    /// written ahead of them ([`WRITE_AHEAD_BYTES`]).
    file_end: u64,
    segment_max_bytes: u64,
    /// Index the next appended record must carry.
    next_index: u64,
    /// Epoch of the last record in the log (0 when empty).
    last_epoch: u64,
    /// `Ok` until the log must refuse appends (sticky until restart); the
    /// engine's one storage state, shared with its readers.
    health: Arc<Health>,
    /// `wal/` held open, to sync its entries without a new descriptor.
    dir_handle: Option<Box<dyn DirHandle>>,
    /// The next segment, made in advance at [`SPARE_NAME`].
    spare: Option<Box<dyn WriteFile>>,
    /// Paths whose replacement means the data dir was lost.
    anchors: Anchors,
}

/// What recovery found besides the records it replayed.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Bytes cut from the tail of the last segment (an unacknowledged write).
    pub truncated_bytes: u64,
    /// Zeros cut after the last segment's last record: space written ahead
    /// that no record reached (not a torn write).
    pub zeros_cut: u64,
    pub records_replayed: u64,
    pub segments: usize,
}

impl Wal {
    /// Opens the log in `dir`, replaying every record with index greater than
    /// `after_index` (what the snapshot already covers) into `apply`.
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        after_index: u64,
        segment_max_bytes: u64,
        mut apply: impl FnMut(Record),
    ) -> Result<(Wal, RecoveryReport), Error> {
        fs.create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut segments = list_segments(fs.as_ref(), dir)?;
        check_log_start(&segments, after_index)?;
        let mut replay = Replay {
            after_index,
            expected: None,
            last_epoch: 0,
            report: RecoveryReport {
                segments: segments.len(),
                ..RecoveryReport::default()
            },
        };
        let n = segments.len();
        for i in 0..n {
            match replay.segment(fs.as_ref(), &segments[i], i + 1 == n, &mut apply)? {
                Some((bytes, version)) => {
                    (segments[i].bytes, segments[i].version) = (bytes, version)
                }
                None => {
                    // Only the last segment ends this way: it held nothing.
                    let seg = segments
                        .pop()
                        .expect("the segment just replayed is the last one");
                    fs.remove(&seg.path)
                        .and_then(|_| fs.sync_dir(dir))
                        .map_err(|e| {
                            Error::io(format!("removing torn {}", seg.path.display()), e)
                        })?;
                }
            }
        }
        let next_index = after_index + 1;
        if replay.expected.is_some_and(|e| e < next_index) {
            // The snapshot is ahead of the whole log (it was installed from
            // elsewhere): every segment is covered, and keeping them would
            // leave a gap in the indexes, so they go.
            remove_all(fs.as_ref(), dir, &mut segments)?;
        }
        let next_index = replay.expected.unwrap_or(next_index).max(next_index);
        let active = match segments.last() {
            Some(last) => fs
                .open_append(&last.path)
                .map_err(|e| Error::io(format!("opening {}", last.path.display()), e))?,
            None => {
                let (seg, active) = create_segment(fs.as_ref(), dir, next_index)?;
                segments.push(seg);
                active
            }
        };
        let dir_handle = fs
            .open_dir(dir)
            .map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        let file_end = segments.last().map_or(0, |s| s.bytes);
        let mut wal = Wal {
            fs,
            dir: dir.to_path_buf(),
            segments,
            active,
            file_end,
            segment_max_bytes,
            next_index,
            last_epoch: replay.last_epoch,
            health: Arc::new(Health::default()),
            dir_handle,
            spare: None,
            anchors: Anchors::default(),
        };
        // Best effort: without a spare, the first roll creates the segment.
        let _ = wal.prepare_spare();
        Ok((wal, replay.report))
    }

    /// Index the next record must carry.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Index of the oldest record the log still holds (or would hold).
    pub fn first_index(&self) -> u64 {
        self.segments
            .first()
            .map_or(self.next_index, |s| s.first_index)
    }

    /// Drops the whole log and starts afresh at `next_index` (after a
    /// snapshot covering everything before it was installed). Durable before
    /// it returns.
    pub fn reset(&mut self, next_index: u64, last_epoch: u64) -> Result<(), Error> {
        let result: Result<(), Error> = (|| {
            // Newest first, as in `cut`: the log may be longer than the
            // snapshot that replaces it (an uncommitted suffix).
            for seg in self.segments.drain(..).rev() {
                self.fs
                    .remove(&seg.path)
                    .map_err(|e| Error::io(format!("removing {}", seg.path.display()), e))?;
            }
            let (seg, active) = create_segment(self.fs.as_ref(), &self.dir, next_index)?;
            self.file_end = seg.bytes;
            self.segments.push(seg);
            self.active = active;
            Ok(())
        })();
        result.map_err(|e| self.poison(e))?;
        self.next_index = next_index;
        self.last_epoch = last_epoch;
        Ok(())
    }

    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// Whether the log refuses appends (for any reason; see [`Wal::state`]).
    pub fn is_poisoned(&self) -> bool {
        !self.health.is_ok()
    }

    pub fn state(&self) -> StorageState {
        self.health.get()
    }

    /// The storage state, shared: the engine's readers see it change.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The error every append gets in the current state, if any.
    pub fn refusal(&self) -> Option<Error> {
        self.health.refusal()
    }

    /// Refuses every later append: after a failed write or fsync, the
    /// kernel may have dropped pages nobody can name. Returns `e`.
    fn poison(&self, e: Error) -> Error {
        self.health.fail(StorageState::Poisoned, e.to_string());
        e
    }

    /// Watches `anchors` (the data dir, its `LOCK`, `wal/`) from now on.
    pub fn watch(&mut self, anchors: Anchors) {
        self.anchors = anchors;
    }

    /// Checks the watched paths; the first time one is found removed or
    /// replaced, the log stops taking appends and the change is returned.
    pub fn check_anchors(&mut self) -> Option<String> {
        if self.is_poisoned() {
            return None;
        }
        let lost = self.anchors.lost(self.fs.as_ref())?;
        self.health.fail(StorageState::DataDirLost, lost.clone());
        Some(lost)
    }

    /// Makes the next segment in advance, unless there is one. Failure
    /// (out of descriptors, disk full) costs nothing now: the next roll
    /// tries again, and refuses its append if it fails too.
    pub fn prepare_spare(&mut self) -> Result<(), Error> {
        if self.spare.is_some() || self.is_poisoned() {
            return Ok(());
        }
        let path = self.dir.join(SPARE_NAME);
        let io = |e| Error::io(format!("making {} in advance", path.display()), e);
        let mut f = self.fs.create(&path).map_err(io)?;
        f.write_all(&segment_header())
            .and_then(|_| f.sync_data())
            .map_err(io)?;
        self.spare = Some(f);
        Ok(())
    }

    /// Bytes in all segments on disk.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("WAL invariant: there is always an active segment")
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Writes already-framed records (indexes `first..first+count`) to the
    /// active segment. Not durable until [`Wal::sync`] returns.
    pub fn append(
        &mut self,
        first: u64,
        count: u64,
        framed: &[u8],
        last_epoch: u64,
    ) -> Result<(), Error> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        assert_eq!(
            first, self.next_index,
            "WAL invariant: appended records must continue the log contiguously"
        );
        let max = self.segment_max_bytes;
        let active = self.active_mut();
        if active.bytes >= max || active.version < SEGMENT_VERSION {
            self.roll()?;
        }
        self.write_ahead(framed.len() as u64);
        if let Err(e) = self.active.write_all(framed) {
            return Err(self.poison(Error::io("appending to the WAL".into(), e)));
        }
        self.active_mut().bytes += framed.len() as u64;
        self.next_index = first + count;
        self.last_epoch = last_epoch;
        Ok(())
    }

    /// Zeros past the end of an append of `len` bytes when it would pass
    /// the zeros already there, up to [`WRITE_AHEAD_BYTES`] beyond it
    /// (never far past the segment's size limit). The append's own fsync
    /// makes them durable. Best effort: a failure only leaves the appends
    /// after it costing what appends cost (the append's own write reports
    /// a full disk).
    fn write_ahead(&mut self, len: u64) {
        let end = self.active_mut().bytes + len;
        if end <= self.file_end {
            return;
        }
        // Never past the size limit: see `roll`.
        let to = (end + WRITE_AHEAD_BYTES).min(end.max(self.segment_max_bytes));
        if let Ok(true) = self.active.preallocate(end, to) {
            self.file_end = to;
        }
    }

    /// Makes everything appended so far durable (one fdatasync).
    pub fn sync(&mut self) -> Result<(), Error> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let outcome = self.active.sync_data();
        self.sync_end(outcome)
    }

    /// [`Wal::sync`] in two halves, for a caller that runs the fdatasync on
    /// another thread: a handle to sync everything appended so far (`None`:
    /// sync here instead), then [`Wal::sync_end`] with its outcome. Nothing
    /// may be appended in between.
    pub fn sync_handle(&mut self) -> Result<Option<Box<dyn SyncHandle>>, Error> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        Ok(self.active.sync_handle())
    }

    /// Judges an fdatasync's outcome: a failure poisons the log, and so
    /// does a segment found unlinked.
    pub fn sync_end(&mut self, outcome: std::io::Result<()>) -> Result<(), Error> {
        if let Err(e) = outcome {
            return Err(self.poison(Error::io("fsync of the WAL".into(), e)));
        }
        // The fsync of a segment that was unlinked (its data dir deleted)
        // succeeds, but vouches for nothing a restart would read: refuse
        // to acknowledge it. The path checks at each roll and every second
        // catch a data dir moved away, which leaves the segment linked.
        if self.active.is_unlinked() {
            // Name the anchor that went (the data dir, usually) if one did.
            if self.check_anchors().is_none() {
                let lost = format!("{} was removed", self.active_path().display());
                self.health.fail(StorageState::DataDirLost, lost);
            }
            return Err(self
                .refusal()
                .unwrap_or_else(|| Error::DataDirLost(String::new())));
        }
        Ok(())
    }

    fn active_path(&self) -> &Path {
        &self
            .segments
            .last()
            .expect("WAL invariant: there is always an active segment")
            .path
    }

    /// Seals the active segment and starts a new one at `next_index`, from
    /// the spare when there is one. Until the rename, a failure changes
    /// nothing on disk that recovery reads, so it only refuses this append
    /// ([`Error::SegmentUnavailable`]); after it, the new name must be
    /// durable before any record lands in the file, or the log is poisoned.
    fn roll(&mut self) -> Result<(), Error> {
        // Everything in the old segment must be durable before records can
        // land in a newer one: recovery only tolerates a torn *last* segment.
        self.sync()?;
        // Zeros are written ahead only up to the size limit, and a segment
        // is sealed only past it (or holding no zeros, when its version is
        // older): a sealed segment ends at its last record, as recovery
        // requires (and as a release that never wrote ahead expects).
        debug_assert!(
            self.file_end <= self.active_mut().bytes,
            "WAL invariant: a segment is sealed with no zeros after its last record"
        );
        self.check_anchors();
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let unavailable = |e: Error| Error::SegmentUnavailable(e.to_string());
        self.prepare_spare().map_err(unavailable)?;
        let spare = self.dir.join(SPARE_NAME);
        let path = self.dir.join(segment_name(self.next_index));
        self.fs.rename(&spare, &path).map_err(|e| {
            unavailable(Error::io(
                format!("renaming {} into place", spare.display()),
                e,
            ))
        })?;
        self.sync_dir().map_err(|e| self.poison(e))?;
        let active = self
            .spare
            .take()
            .expect("prepare_spare succeeded, so there is a spare");
        if self.active_mut().first_index == self.next_index {
            // An older segment with no records (a first-release one rolled
            // away before its first append): the rename replaced it.
            self.segments.pop();
        }
        self.segments.push(Segment {
            first_index: self.next_index,
            path,
            bytes: SEGMENT_HEADER_BYTES as u64,
            version: SEGMENT_VERSION,
        });
        self.active = active;
        self.file_end = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    /// Makes the entries of `wal/` durable, through the held directory
    /// when there is one.
    fn sync_dir(&self) -> Result<(), Error> {
        match &self.dir_handle {
            Some(d) => d.sync(),
            None => self.fs.sync_dir(&self.dir),
        }
        .map_err(|e| Error::io(format!("fsync of {}", self.dir.display()), e))
    }

    /// Index of the segment holding record `index` (or that would, for
    /// `index == next_index`).
    fn segment_for(&self, index: u64) -> Option<usize> {
        self.segments.iter().rposition(|s| s.first_index <= index)
    }

    /// Scans segment `i` frame by frame, calling `f(record, offset)` until it
    /// returns false.
    fn scan_segment(
        &self,
        i: usize,
        mut f: impl FnMut(Record, usize) -> bool,
    ) -> Result<(), Error> {
        let seg = &self.segments[i];
        let io = |e| Error::io(format!("reading {}", seg.path.display()), e);
        let file = self.fs.open_read(&seg.path).map_err(io)?;
        let mut w = Window::new(file);
        let mut off = SEGMENT_HEADER_BYTES;
        loop {
            w.forget_before(off);
            if !w.fill_frame(off).map_err(io)? {
                return Ok(());
            }
            match record::read_frame(&w.buf, off - w.base) {
                Frame::Valid { payload, next } => {
                    let rec = Record::decode_payload(payload)?;
                    if !f(rec, off) {
                        return Ok(());
                    }
                    off = w.base + next;
                }
                // Recovery already cut any torn tail; what follows the last
                // write is not ours to judge here.
                _ => return Ok(()),
            }
        }
    }

    /// Records with index `from` and after, in order, up to about
    /// `max_bytes` of payload (at least one record when `from` exists).
    /// Reads what has been appended, synced or not: a primary may ship
    /// entries before its own fsync returns.
    pub fn read_from(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, Error> {
        let mut out = Vec::new();
        if from >= self.next_index {
            return Ok(out);
        }
        let Some(mut i) = self.segment_for(from) else {
            return Ok(out);
        };
        let mut bytes = 0usize;
        while i < self.segments.len() && bytes < max_bytes {
            let mut want = from.max(self.segments[i].first_index);
            self.scan_segment(i, |rec, _| {
                if rec.index < want {
                    return true;
                }
                bytes += rec.op.encoded_len();
                want = rec.index + 1;
                out.push(rec);
                bytes < max_bytes
            })?;
            i += 1;
        }
        Ok(out)
    }

    /// Removes every record with index `from` and after: the uncommitted
    /// suffix that a primary's log contradicts. Durable before it returns.
    ///
    /// Later segments go first (newest first), then the segment holding
    /// `from` is cut, so a crash in between leaves a contiguous (longer)
    /// log, never a gap.
    /// Returns the epoch of the new last record, if the log still has one.
    pub fn truncate_from(&mut self, from: u64) -> Result<Option<u64>, Error> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        assert!(
            from <= self.next_index,
            "WAL invariant: cannot truncate from {from}, past the end {}",
            self.next_index
        );
        if from == self.next_index {
            return Ok(Some(self.last_epoch).filter(|_| from > 1));
        }
        let i = self
            .segment_for(from)
            .expect("callers never truncate below the start of the log (committed entries)");
        let mut cut = None;
        let mut prev_epoch = None;
        self.scan_segment(i, |rec, off| {
            if rec.index < from {
                prev_epoch = Some(rec.epoch);
                true
            } else {
                cut = Some(off);
                false
            }
        })?;
        let cut = cut.unwrap_or(SEGMENT_HEADER_BYTES) as u64;
        if prev_epoch.is_none() && i > 0 {
            self.scan_segment(i - 1, |rec, _| {
                prev_epoch = Some(rec.epoch);
                true
            })?;
        }
        let result = self.cut(i, cut);
        result.map_err(|e| self.poison(e))?;
        self.next_index = from;
        self.last_epoch = prev_epoch.unwrap_or(0);
        Ok(prev_epoch)
    }

    fn cut(&mut self, i: usize, cut: u64) -> Result<(), Error> {
        // Newest first: a journaling file system may make each removal
        // durable before the directory fsync, and a crash that kept only
        // some of them must leave a shorter log, not one with a gap.
        for seg in self.segments.drain(i + 1..).rev() {
            self.fs
                .remove(&seg.path)
                .map_err(|e| Error::io(format!("removing {}", seg.path.display()), e))?;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(format!("fsync of {}", self.dir.display()), e))?;
        let seg = &mut self.segments[i];
        self.fs
            .truncate(&seg.path, cut)
            .map_err(|e| Error::io(format!("truncating {}", seg.path.display()), e))?;
        seg.bytes = cut;
        self.file_end = cut;
        self.active = self
            .fs
            .open_append(&seg.path)
            .map_err(|e| Error::io(format!("opening {}", seg.path.display()), e))?;
        Ok(())
    }

    /// Deletes sealed segments whose records all have index <= `upto`
    /// (a durable snapshot covers them). Returns how many were removed.
    pub fn remove_covered(&mut self, upto: u64) -> Result<usize, Error> {
        let mut removed = 0;
        // Segment i is covered when segment i+1 starts at or before upto+1.
        while self.segments.len() >= 2 && self.segments[1].first_index <= upto + 1 {
            let seg = self.segments.remove(0);
            self.fs
                .remove(&seg.path)
                .map_err(|e| Error::io(format!("removing {}", seg.path.display()), e))?;
            removed += 1;
        }
        if removed > 0 {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| Error::io(format!("fsync of {}", self.dir.display()), e))?;
        }
        Ok(removed)
    }
}

/// The segments in `dir`, sorted by first index (sizes not known yet).
fn list_segments(fs: &dyn Fs, dir: &Path) -> Result<Vec<Segment>, Error> {
    let mut segments: Vec<Segment> = fs
        .list(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        .into_iter()
        .filter_map(|name| {
            parse_segment_name(&name).map(|first_index| Segment {
                first_index,
                path: dir.join(name),
                bytes: 0,
                version: 0,
            })
        })
        .collect();
    segments.sort_by_key(|s| s.first_index);
    Ok(segments)
}

/// The log must start no later than right after what the snapshot covers.
fn check_log_start(segments: &[Segment], after_index: u64) -> Result<(), Error> {
    match segments.first() {
        Some(first) if first.first_index > after_index + 1 => Err(Error::Corruption {
            file: first.path.clone(),
            offset: 0,
            reason: format!(
                "log starts at index {} but the snapshot only covers up to {after_index}: \
                 records in between are missing",
                first.first_index
            ),
        }),
        _ => Ok(()),
    }
}

/// Removes every segment (all covered by a newer snapshot), durably.
fn remove_all(fs: &dyn Fs, dir: &Path, segments: &mut Vec<Segment>) -> Result<(), Error> {
    for seg in segments.drain(..) {
        fs.remove(&seg.path)
            .map_err(|e| Error::io(format!("removing {}", seg.path.display()), e))?;
    }
    fs.sync_dir(dir)
        .map_err(|e| Error::io(format!("fsync of {}", dir.display()), e))
}

/// Damage in `seg` at `offset`.
fn corrupt(seg: &Segment, offset: usize, reason: String) -> Error {
    Error::Corruption {
        file: seg.path.clone(),
        offset: offset as u64,
        reason,
    }
}

/// A failure to read `seg`.
fn read_error(seg: &Segment) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("reading {}", seg.path.display()), e)
}

/// Recovery's progress through the segments, in order.
struct Replay {
    /// Records up to here are in the snapshot: checked, not applied.
    after_index: u64,
    /// The index the next record must carry, once one has been seen.
    expected: Option<u64>,
    last_epoch: u64,
    report: RecoveryReport,
}

impl Replay {
    /// Replays one segment: its valid length and format version, or `None`
    /// for a last segment whose header never became durable (it held
    /// nothing).
    fn segment(
        &mut self,
        fs: &dyn Fs,
        seg: &Segment,
        is_last: bool,
        apply: &mut impl FnMut(Record),
    ) -> Result<Option<(u64, u32)>, Error> {
        let file = fs.open_read(&seg.path).map_err(read_error(seg))?;
        let mut w = Window::new(file);
        let Some(version) = self.header(&mut w, seg, is_last)? else {
            return Ok(None);
        };
        match self.expected {
            Some(e) if e != seg.first_index => {
                return Err(corrupt(
                    seg,
                    0,
                    format!(
                        "segment should start at index {e} but is named for {}",
                        seg.first_index
                    ),
                ))
            }
            _ => self.expected = Some(seg.first_index),
        }
        let bytes = self.frames(fs, &mut w, seg, version, is_last, apply)?;
        Ok(Some((bytes, version)))
    }

    /// Checks a segment's header: its version, or `None` for a last
    /// segment whose header never became durable (its bytes count as cut).
    fn header(
        &mut self,
        w: &mut Window,
        seg: &Segment,
        is_last: bool,
    ) -> Result<Option<u32>, Error> {
        if !w.fill_to(SEGMENT_HEADER_BYTES).map_err(read_error(seg))? {
            if is_last {
                // Created but its header never became durable.
                self.report.truncated_bytes += w.end() as u64;
                return Ok(None);
            }
            return Err(corrupt(seg, 0, "segment shorter than its header".into()));
        }
        let (offset, reason) = match header_version(&w.buf[..SEGMENT_HEADER_BYTES]) {
            Ok(version) => return Ok(Some(version)),
            Err(problem) => problem,
        };
        // A header is written alone and fsync'd before any record goes in,
        // so a last segment that is nothing but a bad header is one whose
        // header never became durable while its directory entry did (a
        // journaling file system may commit that first). It held nothing.
        if is_last
            && !w
                .fill_to(SEGMENT_HEADER_BYTES + 1)
                .map_err(read_error(seg))?
        {
            self.report.truncated_bytes += w.end() as u64;
            return Ok(None);
        }
        Err(corrupt(seg, offset, reason))
    }

    /// Replays the frames after a good header; the segment's valid length
    /// (a torn tail of the last segment is cut off the file).
    fn frames(
        &mut self,
        fs: &dyn Fs,
        w: &mut Window,
        seg: &Segment,
        version: u32,
        is_last: bool,
        apply: &mut impl FnMut(Record),
    ) -> Result<u64, Error> {
        // Frames are read through a window holding about one frame, so
        // replay needs memory for a record, not for a whole segment.
        let mut off = SEGMENT_HEADER_BYTES;
        loop {
            w.forget_before(off);
            if !w.fill_frame(off).map_err(read_error(seg))? {
                return Ok(off as u64); // clean end of the segment
            }
            let want = self.expected.unwrap_or(seg.first_index);
            let reason = match record::read_frame(&w.buf, off - w.base) {
                Frame::Valid { payload, next } => {
                    let rec = Record::decode_payload(payload)
                        .map_err(|e| corrupt(seg, off, format!("undecodable record: {e}")))?;
                    if rec.index != want {
                        return Err(corrupt(
                            seg,
                            off,
                            format!("record has index {} where {want} was expected", rec.index),
                        ));
                    }
                    if rec.op.min_segment_version() > version {
                        return Err(corrupt(
                            seg,
                            off,
                            format!(
                                "a record of WAL format {} in a version {version} segment",
                                rec.op.min_segment_version()
                            ),
                        ));
                    }
                    self.last_epoch = rec.epoch;
                    self.expected = Some(want + 1);
                    if rec.index > self.after_index {
                        apply(rec);
                        self.report.records_replayed += 1;
                    }
                    off = w.base + next;
                    continue;
                }
                Frame::Bad { reason } => reason,
                _ => "record runs past the end of the file".to_string(),
            };
            check_torn_tail(w, seg, off, want, is_last, &reason)?;
            // A torn tail: the write it held was never acknowledged. Or
            // nothing but zeros: space written ahead, which the next
            // append writes ahead again.
            let cut = (w.end() - off) as u64;
            if w.buf[off - w.base..].iter().all(|&b| b == 0) {
                self.report.zeros_cut += cut;
            } else {
                self.report.truncated_bytes += cut;
            }
            fs.truncate(&seg.path, off as u64).map_err(|e| {
                Error::io(format!("truncating torn tail of {}", seg.path.display()), e)
            })?;
            return Ok(off as u64);
        }
    }
}

/// A bad frame at `off` (record `want` expected there) is a torn tail only
/// at the end of the last segment: a valid record after it, or a sealed
/// segment, makes it damage to acknowledged data.
fn check_torn_tail(
    w: &mut Window,
    seg: &Segment,
    off: usize,
    want: u64,
    is_last: bool,
    reason: &str,
) -> Result<(), Error> {
    // Rare path: look at everything after the bad frame.
    w.fill_to(usize::MAX).map_err(read_error(seg))?;
    let rel = off - w.base;
    let later = (rel + 1..w.buf.len()).find(|&o| record::valid_record_at(&w.buf, o, want));
    if let Some(o) = later {
        return Err(corrupt(
            seg,
            off,
            format!(
                "{reason}; a valid record follows at offset {}, \
                 so this is damage to acknowledged data, not a torn write",
                w.base + o
            ),
        ));
    }
    if !is_last {
        return Err(corrupt(
            seg,
            off,
            format!("{reason} in a sealed (non-final) segment"),
        ));
    }
    Ok(())
}

/// A sliding view of a segment file: `buf` holds file bytes from offset
/// `base` on. Keeps about one frame in memory during replay.
struct Window {
    file: Box<dyn Read + Send>,
    buf: Vec<u8>,
    base: usize,
    eof: bool,
}

impl Window {
    fn new(file: Box<dyn Read + Send>) -> Self {
        Window {
            file,
            buf: Vec::new(),
            base: 0,
            eof: false,
        }
    }

    /// File offset just past the bytes read so far.
    fn end(&self) -> usize {
        self.base + self.buf.len()
    }

    /// Reads until the window reaches file offset `end` or the file ends;
    /// says whether it reached `end`.
    fn fill_to(&mut self, end: usize) -> std::io::Result<bool> {
        while self.end() < end && !self.eof {
            // Reading in 1 MiB steps bounds what a corrupt length can make us
            // allocate to what the file really holds.
            let step = (end - self.end()).min(1 << 20) as u64;
            let n = (&mut self.file).take(step).read_to_end(&mut self.buf)?;
            self.eof = n == 0;
        }
        Ok(self.end() >= end)
    }

    /// Loads the whole frame at `off` if the file has it (as far as its
    /// length field says). False only at a clean end of file.
    fn fill_frame(&mut self, off: usize) -> std::io::Result<bool> {
        let header_end = off + record::FRAME_HEADER_BYTES;
        if !self.fill_to(header_end)? {
            return Ok(self.end() > off);
        }
        let rel = off - self.base;
        let len = u32::from_le_bytes([
            self.buf[rel],
            self.buf[rel + 1],
            self.buf[rel + 2],
            self.buf[rel + 3],
        ]) as usize;
        if len <= record::MAX_PAYLOAD_BYTES {
            self.fill_to(header_end + len)?;
        }
        Ok(true)
    }

    /// Drops bytes before `off` once enough have piled up.
    fn forget_before(&mut self, off: usize) {
        let rel = off - self.base;
        if rel >= 4 << 20 {
            self.buf.drain(..rel);
            self.base = off;
        }
    }
}

/// Creates a segment whose directory entry and header are durable.
fn create_segment(
    fs: &dyn Fs,
    dir: &Path,
    first_index: u64,
) -> Result<(Segment, Box<dyn WriteFile>), Error> {
    let path = dir.join(segment_name(first_index));
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let mut f = fs.create(&path).map_err(|e| io("creating", e))?;
    f.write_all(&segment_header())
        .and_then(|_| f.sync_data())
        .map_err(|e| io("writing header of", e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io(format!("fsync of {}", dir.display()), e))?;
    let seg = Segment {
        first_index,
        path,
        bytes: SEGMENT_HEADER_BYTES as u64,
        version: SEGMENT_VERSION,
    };
    Ok((seg, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use crate::storage::fs::RealFs;
    use crate::storage::record::{Op, Timestamp};
    use bytes::Bytes;

    fn put(index: u64, epoch: u64) -> Record {
        Record {
            index,
            epoch,
            ts: Timestamp::default(),
            op: Op::Put {
                key: Bytes::from(format!("k{index}")),
                value: Bytes::from(vec![b'v'; 40]),
                expiry: Expiry::Never,
            },
        }
    }

    fn append(wal: &mut Wal, recs: &[Record]) {
        let mut buf = Vec::new();
        for r in recs {
            r.encode_into(&mut buf);
        }
        let last = recs.last().expect("non-empty");
        wal.append(recs[0].index, recs.len() as u64, &buf, last.epoch)
            .unwrap();
        wal.sync().unwrap();
    }

    fn open(dir: &Path) -> (Wal, Vec<Record>) {
        let mut seen = Vec::new();
        let (wal, _) = Wal::open(Arc::new(RealFs), dir, 0, 512, |r| seen.push(r)).unwrap();
        (wal, seen)
    }

    #[test]
    fn read_from_spans_segments_and_respects_the_byte_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(tmp.path());
        for i in 1..=100 {
            append(&mut wal, &[put(i, 1)]);
        }
        assert!(wal.segment_count() > 5, "small segments roll often");
        let all = wal.read_from(1, usize::MAX).unwrap();
        assert_eq!(
            all.iter().map(|r| r.index).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<_>>()
        );
        let some = wal.read_from(37, 200).unwrap();
        assert_eq!(some[0].index, 37);
        assert!(!some.is_empty() && some.len() < 10);
        assert!(some.windows(2).all(|w| w[1].index == w[0].index + 1));
        assert!(wal.read_from(101, 1000).unwrap().is_empty());
    }

    #[test]
    fn truncate_from_drops_the_suffix_durably_and_the_log_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(tmp.path());
        for i in 1..=60 {
            append(&mut wal, &[put(i, if i <= 30 { 1 } else { 2 })]);
        }
        let segments_before = wal.segment_count();
        assert_eq!(wal.truncate_from(25).unwrap(), Some(1));
        assert_eq!(wal.next_index(), 25);
        assert_eq!(wal.last_epoch(), 1);
        assert!(wal.segment_count() < segments_before);
        // The new primary's entries take the freed indexes.
        for i in 25..=40 {
            append(&mut wal, &[put(i, 3)]);
        }
        drop(wal);
        let (wal, seen) = open(tmp.path());
        assert_eq!(seen.len(), 40);
        assert!(seen
            .iter()
            .enumerate()
            .all(|(n, r)| r.index == n as u64 + 1));
        assert!(seen[..24].iter().all(|r| r.epoch == 1));
        assert!(seen[24..].iter().all(|r| r.epoch == 3));
        assert_eq!(wal.next_index(), 41);
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        v.sort();
        v
    }

    fn open_with(dir: &Path, segment_max: u64) -> (Wal, Vec<Record>, RecoveryReport) {
        let mut seen = Vec::new();
        let (wal, report) =
            Wal::open(Arc::new(RealFs), dir, 0, segment_max, |r| seen.push(r)).unwrap();
        (wal, seen, report)
    }

    #[test]
    fn appends_write_zeros_ahead_which_recovery_cuts_as_no_torn_write() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = open_with(tmp.path(), 64 << 20);
        for i in 1..=10 {
            append(&mut wal, &[put(i, 1)]);
        }
        let bytes = wal.total_bytes();
        let path = segment_files(tmp.path()).pop().unwrap();
        assert!(
            file_len(&path) > bytes,
            "zeros written ahead of the records"
        );
        assert!(file_len(&path) <= bytes + WRITE_AHEAD_BYTES);
        drop(wal);
        let (mut wal, seen, report) = open_with(tmp.path(), 64 << 20);
        assert_eq!(seen.len(), 10);
        assert_eq!(
            report.truncated_bytes, 0,
            "zeros ahead are not a torn write"
        );
        assert!(report.zeros_cut > 0);
        assert_eq!(file_len(&path), bytes, "cut back to the last record");
        for i in 11..=20 {
            append(&mut wal, &[put(i, 1)]);
        }
        drop(wal);
        let (_, seen, report) = open_with(tmp.path(), 64 << 20);
        assert_eq!(
            seen.iter().map(|r| r.index).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        assert_eq!(report.truncated_bytes, 0);
    }

    #[test]
    fn a_torn_write_into_the_zeros_ahead_is_cut_as_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = open_with(tmp.path(), 64 << 20);
        for i in 1..=5 {
            append(&mut wal, &[put(i, 1)]);
        }
        let bytes = wal.total_bytes();
        drop(wal);
        // Half of record 6 reached the disk, the zeros after it stayed.
        let mut frame = Vec::new();
        put(6, 1).encode_into(&mut frame);
        let path = segment_files(tmp.path()).pop().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &frame[..frame.len() / 2], bytes).unwrap();
        let (_, seen, report) = open_with(tmp.path(), 64 << 20);
        assert_eq!(seen.len(), 5);
        assert_eq!(file_len(&path), bytes);
        assert!(report.truncated_bytes > (frame.len() / 2) as u64);
        assert_eq!(report.zeros_cut, 0);
    }

    #[test]
    fn a_sealed_segment_ends_at_its_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = open_with(tmp.path(), 4096);
        for i in 1..=200 {
            append(&mut wal, &[put(i, 1)]);
        }
        let files = segment_files(tmp.path());
        assert!(files.len() > 2);
        let last = files.last().unwrap().clone();
        assert!(
            file_len(&last) > wal.segments.last().unwrap().bytes,
            "zeros ahead"
        );
        for (seg, path) in wal.segments.iter().zip(&files) {
            if *path != last {
                assert_eq!(
                    file_len(path),
                    seg.bytes,
                    "{} was sealed with zeros",
                    path.display()
                );
            }
        }
        drop(wal);
        let (_, seen, report) = open_with(tmp.path(), 4096);
        assert_eq!(seen.len(), 200);
        assert_eq!(report.truncated_bytes, 0);
    }

    /// The real file system, except that `create` fails while `fail` is set
    /// (as it does with EMFILE when the process is out of descriptors).
    #[derive(Default)]
    struct NoCreateFs {
        fail: std::sync::atomic::AtomicBool,
    }

    impl Fs for NoCreateFs {
        fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
            RealFs.create_dir_all(dir)
        }
        fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
            RealFs.list(dir)
        }
        fn open_read(&self, path: &Path) -> std::io::Result<Box<dyn Read + Send>> {
            RealFs.open_read(path)
        }
        fn create(&self, path: &Path) -> std::io::Result<Box<dyn WriteFile>> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::other("Too many open files (simulated)"));
            }
            RealFs.create(path)
        }
        fn open_append(&self, path: &Path) -> std::io::Result<Box<dyn WriteFile>> {
            RealFs.open_append(path)
        }
        fn truncate(&self, path: &Path, len: u64) -> std::io::Result<()> {
            RealFs.truncate(path, len)
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            RealFs.rename(from, to)
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            RealFs.remove(path)
        }
        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            RealFs.sync_dir(dir)
        }
        fn open_dir(&self, dir: &Path) -> std::io::Result<Option<Box<dyn DirHandle>>> {
            RealFs.open_dir(dir)
        }
    }

    fn try_append(wal: &mut Wal, rec: &Record) -> Result<(), Error> {
        let mut buf = Vec::new();
        rec.encode_into(&mut buf);
        wal.append(rec.index, 1, &buf, rec.epoch)?;
        wal.sync()
    }

    /// Appends records from `wal.next_index()` until one needs a roll.
    fn fill_active_segment(wal: &mut Wal) {
        let segments = wal.segment_count();
        while wal.segments[segments - 1].bytes < wal.segment_max_bytes {
            let next = wal.next_index();
            try_append(wal, &put(next, 1)).unwrap();
            assert_eq!(wal.segment_count(), segments, "no roll yet");
        }
    }

    #[test]
    fn a_roll_that_cannot_create_a_segment_refuses_only_its_append() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Arc::new(NoCreateFs::default());
        let (mut wal, _) = Wal::open(fs.clone(), tmp.path(), 0, 512, |_| {}).unwrap();
        fill_active_segment(&mut wal);
        // No file can be created from here on; the spare made at start
        // still lets the first roll through.
        fs.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let next = wal.next_index();
        try_append(&mut wal, &put(next, 1)).expect("the spare needs no new file");
        assert_eq!(wal.segment_count(), 2);
        assert!(wal.prepare_spare().is_err(), "no new spare meanwhile");
        fill_active_segment(&mut wal);

        let refused = wal.next_index();
        let err = try_append(&mut wal, &put(refused, 1)).unwrap_err();
        assert!(matches!(err, Error::SegmentUnavailable(_)), "got {err}");
        assert!(!wal.is_poisoned(), "nothing was in doubt");
        assert_eq!(
            wal.next_index(),
            refused,
            "the refused record is not in the log"
        );
        let err = try_append(&mut wal, &put(refused, 1)).unwrap_err();
        assert!(matches!(err, Error::SegmentUnavailable(_)), "still: {err}");

        // Files can be made again: the same append now rolls and lands.
        fs.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        try_append(&mut wal, &put(refused, 1)).unwrap();
        assert_eq!(wal.segment_count(), 3);
        try_append(&mut wal, &put(refused + 1, 1)).unwrap();
        drop(wal);
        let (wal, seen) = open(tmp.path());
        assert_eq!(
            seen.iter().map(|r| r.index).collect::<Vec<_>>(),
            (1..=refused + 1).collect::<Vec<_>>()
        );
        assert_eq!(wal.segment_count(), 3, "the spare is not a segment");
    }

    #[test]
    fn a_roll_after_the_data_dir_was_removed_refuses_every_later_append() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let dir = data.join("wal");
        let (mut wal, _) = Wal::open(Arc::new(RealFs), &dir, 0, 512, |_| {}).unwrap();
        wal.watch(Anchors::record(&RealFs, &[data.clone(), dir.clone()]));
        fill_active_segment(&mut wal);
        std::fs::remove_dir_all(&data).unwrap();

        let next = wal.next_index();
        let err = try_append(&mut wal, &put(next, 1)).unwrap_err();
        assert!(
            matches!(&err, Error::DataDirLost(why) if why.ends_with("data was removed")),
            "got {err}"
        );
        assert_eq!(wal.state(), StorageState::DataDirLost);
        assert!(wal.sync().is_err() && wal.truncate_from(next).is_err());
        assert!(matches!(
            try_append(&mut wal, &put(next, 1)),
            Err(Error::DataDirLost(_))
        ));
    }

    /// A segment in the first release's format holding `recs`.
    fn first_release_segment(dir: &Path, recs: &[Record]) -> PathBuf {
        old_segment(dir, FIRST_RELEASE_VERSION, recs)
    }

    /// A segment of format `version` holding `recs`.
    fn old_segment(dir: &Path, version: u32, recs: &[Record]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let mut bytes = segment_header().to_vec();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        for r in recs {
            r.encode_into(&mut bytes);
        }
        let path = dir.join(segment_name(recs.first().map_or(1, |r| r.index)));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn version_of(path: &Path) -> u32 {
        let b = std::fs::read(path).unwrap();
        u32::from_le_bytes([b[8], b[9], b[10], b[11]])
    }

    #[test]
    fn a_first_release_segment_is_read_and_the_next_append_starts_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let old = first_release_segment(&dir, &[put(1, 1), put(2, 1)]);
        let (mut wal, seen) = open(&dir);
        assert_eq!(seen, vec![put(1, 1), put(2, 1)]);
        append(&mut wal, &[put(3, 1)]);
        assert_eq!(wal.segment_count(), 2, "the version 1 segment was sealed");
        assert_eq!(version_of(&old), FIRST_RELEASE_VERSION);
        assert_eq!(version_of(&dir.join(segment_name(3))), SEGMENT_VERSION);
        drop(wal);
        assert_eq!(open(&dir).1.len(), 3);

        // One with no records is replaced by the new one, under its name.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let empty = first_release_segment(&dir, &[]);
        let (mut wal, _) = open(&dir);
        append(&mut wal, &[put(1, 1)]);
        assert_eq!(wal.segment_count(), 1);
        assert_eq!(version_of(&empty), SEGMENT_VERSION);
        drop(wal);
        assert_eq!(open(&dir).1, vec![put(1, 1)]);
    }

    #[test]
    fn a_transaction_in_a_first_release_segment_is_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let txn = Record {
            op: Op::Txn { ops: vec![] },
            ..put(2, 1)
        };
        first_release_segment(&dir, &[put(1, 1), txn, put(3, 1)]);
        let err = Wal::open(Arc::new(RealFs), &dir, 0, 512, |_| {})
            .err()
            .unwrap();
        assert!(err.to_string().contains("version 1 segment"), "{err}");
    }

    #[test]
    fn a_version_2_segment_is_read_rolled_and_may_not_hold_expiries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let txn = Record {
            op: Op::Txn { ops: vec![] },
            ..put(2, 1)
        };
        let old = old_segment(&dir, 2, &[put(1, 1), txn.clone()]);
        let (mut wal, seen) = open(&dir);
        assert_eq!(seen, vec![put(1, 1), txn]);
        let lease = Record {
            op: Op::LeaseGrant { ttl_ms: 500 },
            ..put(3, 1)
        };
        append(&mut wal, std::slice::from_ref(&lease));
        assert_eq!(wal.segment_count(), 2, "the version 2 segment was sealed");
        assert_eq!(version_of(&old), 2);
        drop(wal);
        assert_eq!(open(&dir).1.last(), Some(&lease));

        for op in [
            Op::LeaseGrant { ttl_ms: 500 },
            Op::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::new(),
                expiry: Expiry::At(7),
            },
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("wal");
            old_segment(&dir, 2, &[put(1, 1), Record { op, ..put(2, 1) }]);
            let err = Wal::open(Arc::new(RealFs), &dir, 0, 512, |_| {})
                .err()
                .unwrap();
            assert!(
                err.to_string().contains("format 3 in a version 2 segment"),
                "{err}"
            );
        }
    }

    #[test]
    fn truncate_at_a_segment_start_and_to_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(tmp.path());
        for i in 1..=40 {
            append(&mut wal, &[put(i, 1)]);
        }
        let second_start = wal.segments[1].first_index;
        assert_eq!(wal.truncate_from(second_start).unwrap(), Some(1));
        assert_eq!(wal.next_index(), second_start);
        assert_eq!(wal.truncate_from(1).unwrap(), None);
        assert_eq!(wal.next_index(), 1);
        append(&mut wal, &[put(1, 5)]);
        drop(wal);
        let (_, seen) = open(tmp.path());
        assert_eq!(seen, vec![put(1, 5)]);
    }
}
