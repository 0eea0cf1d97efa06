//! The file-system seam of the storage engine.
//!
//! Every byte the engine persists goes through [`Fs`], so a test can swap in
//! a backend that simulates a power cut: it keeps only what was made durable
//! by `sync_data` (file contents) and `sync_dir` (directory entries), plus a
//! torn prefix of the rest. [`RealFs`] is the production backend.
//!
//! Two optional capabilities have defaults that a simulated backend can
//! keep: [`Fs::open_dir`] (a directory held open, so that making its entries
//! durable needs no new file descriptor) and [`Fs::file_id`] (the identity
//! that tells a running engine its data dir was removed or replaced).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A file opened for writing.
pub trait WriteFile: Write + Send {
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Whether the file has no name left (it was unlinked while open): its
    /// data is then durable in a file that no restart will find. An error
    /// reading that counts as "no": only a positive answer stops writes.
    fn is_unlinked(&self) -> bool {
        false
    }
    /// Writes zeros over `[from, to)`, past the write position, without
    /// moving it: later writes there overwrite blocks the file already has,
    /// and on a journaling file system their fdatasync then commits no new
    /// size or block (it costs about what an overwrite in place does, not
    /// what an append does). Says whether it wrote anything; a backend that
    /// gains nothing by it (the simulated ones) keeps this default.
    fn preallocate(&mut self, _from: u64, _to: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// A second handle on the file, to make what was written so far
    /// durable from another thread while this one goes on; `None` where
    /// there is none to give (a backend without one, or out of file
    /// descriptors): the caller then syncs here.
    fn sync_handle(&self) -> Option<Box<dyn SyncHandle>> {
        None
    }
}

/// See [`WriteFile::sync_handle`].
pub trait SyncHandle: Send {
    /// Makes the file's data durable (fdatasync), as [`WriteFile::sync_data`].
    fn sync_data(&self) -> io::Result<()>;
}

/// A directory held open for [`DirHandle::sync`].
pub trait DirHandle: Send {
    /// Makes the directory's entries durable (fsync of the held descriptor).
    fn sync(&self) -> io::Result<()>;
}

/// Identity of a file or directory: a path that later names another
/// identity (or nothing) was removed or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// File-system operations the engine needs, and nothing more.
pub trait Fs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>>;
    /// The whole contents of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_read(path)?.read_to_end(&mut out)?;
        Ok(out)
    }
    /// Creates `path`, truncating it if it exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;
    /// Opens an existing file to write at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;
    /// Cuts `path` to `len` bytes and makes the new length durable.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;

    /// Opens `dir` so that it can be synced later without opening anything:
    /// a process out of file descriptors can still roll its WAL. `None`
    /// where the backend holds nothing (the engine then uses `sync_dir`).
    fn open_dir(&self, _dir: &Path) -> io::Result<Option<Box<dyn DirHandle>>> {
        Ok(None)
    }

    /// Identity of `path`; `None` where the backend has none to give (then
    /// nothing is watched).
    fn file_id(&self, _path: &Path) -> io::Result<Option<FileId>> {
        Ok(None)
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(File);

impl Write for RealFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl WriteFile for RealFile {
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn is_unlinked(&self) -> bool {
        // One fstat of a descriptor already open: cheap beside the fsync.
        self.0.metadata().is_ok_and(|m| m.nlink() == 0)
    }
    fn preallocate(&mut self, from: u64, to: u64) -> io::Result<bool> {
        // Real zeros, not fallocate: an unwritten extent's first write
        // converts it, which is again a journal commit.
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.0.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(to > from)
    }
    fn sync_handle(&self) -> Option<Box<dyn SyncHandle>> {
        // A dup of the descriptor: one open file, so its fdatasync covers
        // every write made through this one before it.
        Some(Box::new(RealSync(self.0.try_clone().ok()?)))
    }
}

struct RealSync(File);

impl SyncHandle for RealSync {
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(path)?))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        // Not O_APPEND: Linux's pwrite on such a descriptor appends too,
        // and `preallocate` writes ahead of the position.
        let mut f = OpenOptions::new().write(true).open(path)?;
        f.seek(SeekFrom::End(0))?;
        Ok(Box::new(RealFile(f)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn open_dir(&self, dir: &Path) -> io::Result<Option<Box<dyn DirHandle>>> {
        Ok(Some(Box::new(RealDir(File::open(dir)?))))
    }

    fn file_id(&self, path: &Path) -> io::Result<Option<FileId>> {
        // stat needs no file descriptor, so the check works when they run out.
        let m = fs::metadata(path)?;
        Ok(Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        }))
    }
}

struct RealDir(File);

impl DirHandle for RealDir {
    fn sync(&self) -> io::Result<()> {
        self.0.sync_all()
    }
}

/// The paths a running engine depends on (data dir, `LOCK`, `wal/`) with
/// their identities at start. Once one is removed or replaced (`rm -rf` of
/// the data dir under a running node), appends and fsyncs still succeed on
/// the unlinked files, but no restart will ever read them, and another kvd
/// could take the path: the engine must stop taking writes.
///
/// Identities are `(device, inode)`, and a freed inode's number can go to
/// the next file created; but `LOCK` (held by the server's flock) and
/// `wal/` (held by the WAL) stay open while the engine runs, so their
/// numbers cannot come back under a new file meanwhile.
#[derive(Debug, Default)]
pub struct Anchors {
    paths: Vec<(PathBuf, FileId)>,
}

impl Anchors {
    /// Records the identity of each of `paths` that has one now; missing
    /// paths (an engine run without a `LOCK`) and backends without
    /// identities are not watched.
    pub fn record(fs: &dyn Fs, paths: &[PathBuf]) -> Anchors {
        let paths = paths
            .iter()
            .filter_map(|p| match fs.file_id(p) {
                Ok(Some(id)) => Some((p.clone(), id)),
                _ => None,
            })
            .collect();
        Anchors { paths }
    }

    /// The first watched path that no longer names what it did at start,
    /// described, or `None` while all are in place.
    pub fn lost(&self, fs: &dyn Fs) -> Option<String> {
        self.paths.iter().find_map(|(path, id)| {
            anchor_change(*id, fs.file_id(path)).map(|why| format!("{} {why}", path.display()))
        })
    }
}

/// What happened to an anchored path, from its identity then and its stat
/// now. An error other than "not there" (EACCES, EIO) proves nothing, and
/// refusing writes forever on it would be worse than checking again.
pub fn anchor_change(then: FileId, now: io::Result<Option<FileId>>) -> Option<&'static str> {
    match now {
        Ok(Some(id)) if id == then => None,
        Ok(Some(_)) => Some("was replaced by another file"),
        Ok(None) => None,
        Err(e) if is_gone(&e) => Some("was removed"),
        Err(_) => None,
    }
}

fn is_gone(e: &io::Error) -> bool {
    // ENOTDIR: a parent directory was replaced by a file.
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: FileId = FileId { dev: 1, ino: 7 };

    #[test]
    fn an_anchor_is_lost_only_when_removed_or_replaced() {
        assert_eq!(anchor_change(A, Ok(Some(A))), None);
        assert_eq!(
            anchor_change(A, Ok(Some(FileId { dev: 1, ino: 8 }))),
            Some("was replaced by another file")
        );
        let gone = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(anchor_change(A, Err(gone)), Some("was removed"));
        let not_dir = io::Error::from(io::ErrorKind::NotADirectory);
        assert_eq!(anchor_change(A, Err(not_dir)), Some("was removed"));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(anchor_change(A, Err(denied)), None, "inconclusive");
    }

    #[test]
    fn removing_or_replacing_the_data_dir_is_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        fs::create_dir_all(data.join("wal")).unwrap();
        fs::write(data.join("LOCK"), b"1").unwrap();
        let watched = [data.clone(), data.join("LOCK"), data.join("wal")];
        let anchors = Anchors::record(&RealFs, &watched);
        assert_eq!(anchors.lost(&RealFs), None);

        // Held open, as the server's flock holds it: its inode number
        // cannot go to the new file.
        let _held = File::open(data.join("LOCK")).unwrap();
        fs::remove_file(data.join("LOCK")).unwrap();
        fs::write(data.join("LOCK"), b"2").unwrap();
        let lost = anchors.lost(&RealFs).expect("a replaced LOCK is seen");
        assert!(lost.contains("LOCK") && lost.contains("replaced"), "{lost}");

        fs::remove_dir_all(&data).unwrap();
        let lost = anchors.lost(&RealFs).expect("a removed data dir is seen");
        assert!(lost.ends_with("data was removed"), "{lost}");
    }
}
