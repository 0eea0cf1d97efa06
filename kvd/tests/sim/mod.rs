//! The crash models' test kit: a simulated disk that loses power at a
//! chosen moment, and the key-value workload the models run over it.
//!
//! On "crash" the simulated disk keeps what was made durable: file
//! contents as of their last `sync_data`, directory entries as of their
//! directory's last `sync_dir`. Of each directory's changes since then
//! (creations, renames, removals) it keeps some prefix, in order: a
//! journaling file system may commit them before anyone asks, never out of
//! order. Of the bytes appended to a file after its last sync, it keeps a
//! torn tail the way real disks and file systems leave one after a power
//! cut: a prefix of the real bytes, and after it possibly a stretch of
//! zeros (the file's size reached the disk, its data did not) or of garbage
//! (stale blocks), never longer than what was appended. Whatever follows
//! the torn tail is lost.
//!
//! Simplification: directories themselves are durable once created (the
//! engine creates `wal/` and `snap/` once, at first start).

// Each crash-model test crate uses part of this kit.
#![allow(dead_code)]

pub mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::Rng;

use kvd::storage::fs::{Fs, SyncHandle, WriteFile};

#[derive(Clone, Default)]
struct Inode {
    data: Vec<u8>,
    /// Contents as of the last sync_data.
    synced: Vec<u8>,
}

/// A change to a directory's entries that no `sync_dir` has covered yet.
#[derive(Clone, Debug)]
enum DirOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
}

#[derive(Default)]
struct Disk {
    inodes: Vec<Inode>,
    current: BTreeMap<PathBuf, usize>,
    durable: BTreeMap<PathBuf, usize>,
    /// Per directory, its changes since its last sync_dir, in order.
    unsynced: BTreeMap<PathBuf, Vec<DirOp>>,
    dirs: BTreeSet<PathBuf>,
    /// Mutating operations so far.
    ops: u64,
    /// Mutating operations left before the power fails (None: never).
    ops_left: Option<u64>,
    crashed: bool,
    /// Fail the next sync_data with EIO (then behave again).
    fail_next_sync: bool,
    /// Every sync_data waits while this is set (an fsync that takes as long
    /// as a test needs), counted in `syncs_held`.
    hold_syncs: bool,
    syncs_held: usize,
}

impl Disk {
    /// Counts one mutating operation; fails it and everything after the crash.
    fn tick(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        if let Some(n) = self.ops_left.as_mut() {
            if *n == 0 {
                self.crashed = true;
                return Err(io::Error::other("simulated power loss"));
            }
            *n -= 1;
        }
        self.ops += 1;
        Ok(())
    }

    fn log(&mut self, path: &Path, op: DirOp) {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.unsynced.entry(dir).or_default().push(op);
    }
}

/// The simulated file system (cheap to clone: clones share one disk).
#[derive(Clone, Default)]
pub struct SimFs(Arc<Mutex<Disk>>);

struct SimFile {
    disk: Arc<Mutex<Disk>>,
    ino: usize,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut d = self.disk.lock();
        d.tick()?;
        d.inodes[self.ino].data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WriteFile for SimFile {
    fn sync_data(&mut self) -> io::Result<()> {
        sync_inode(&self.disk, self.ino)
    }
    fn sync_handle(&self) -> Option<Box<dyn SyncHandle>> {
        Some(Box::new(SimSync {
            disk: self.disk.clone(),
            ino: self.ino,
        }))
    }
}

/// A second handle on a file, synced from the engine's fsync thread.
struct SimSync {
    disk: Arc<Mutex<Disk>>,
    ino: usize,
}

impl SyncHandle for SimSync {
    fn sync_data(&self) -> io::Result<()> {
        sync_inode(&self.disk, self.ino)
    }
}

fn sync_inode(disk: &Mutex<Disk>, ino: usize) -> io::Result<()> {
    let mut d = disk.lock();
    if d.hold_syncs {
        d.syncs_held += 1;
        while d.hold_syncs {
            drop(d);
            std::thread::sleep(std::time::Duration::from_millis(1));
            d = disk.lock();
        }
        d.syncs_held -= 1;
    }
    d.tick()?;
    if std::mem::take(&mut d.fail_next_sync) {
        return Err(io::Error::other("simulated EIO from fdatasync"));
    }
    let ino = &mut d.inodes[ino];
    ino.synced = ino.data.clone();
    Ok(())
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.0.lock().dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let d = self.0.lock();
        Ok(d.current
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        let d = self.0.lock();
        let ino = *d.current.get(path).ok_or_else(|| not_found(path))?;
        Ok(Box::new(Cursor::new(d.inodes[ino].data.clone())))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let mut d = self.0.lock();
        d.tick()?;
        d.inodes.push(Inode::default());
        let ino = d.inodes.len() - 1;
        d.current.insert(path.to_path_buf(), ino);
        d.log(path, DirOp::Link(path.to_path_buf(), ino));
        Ok(Box::new(SimFile {
            disk: self.0.clone(),
            ino,
        }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let d = self.0.lock();
        let ino = *d.current.get(path).ok_or_else(|| not_found(path))?;
        Ok(Box::new(SimFile {
            disk: self.0.clone(),
            ino,
        }))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut d = self.0.lock();
        d.tick()?;
        let ino = *d.current.get(path).ok_or_else(|| not_found(path))?;
        let i = &mut d.inodes[ino];
        i.data.truncate(len as usize);
        i.synced = i.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.0.lock();
        d.tick()?;
        let ino = d.current.remove(from).ok_or_else(|| not_found(from))?;
        d.current.insert(to.to_path_buf(), ino);
        d.log(from, DirOp::Unlink(from.to_path_buf()));
        d.log(to, DirOp::Link(to.to_path_buf(), ino));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut d = self.0.lock();
        d.tick()?;
        d.current.remove(path).ok_or_else(|| not_found(path))?;
        d.log(path, DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut d = self.0.lock();
        d.tick()?;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let current: Vec<(PathBuf, usize)> = d
            .current
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        d.durable.retain(|p, _| !in_dir(p));
        d.durable.extend(current);
        d.unsynced.remove(dir);
        Ok(())
    }
}

/// What a reboot left past the synced bytes of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Only a prefix of the real bytes.
    None,
    /// The real prefix, then zeros.
    Zeros,
    /// The real prefix, then random bytes.
    Garbage,
}

/// The torn tail a reboot left on one file.
#[derive(Debug, Clone)]
pub struct TornTail {
    pub path: PathBuf,
    /// Bytes appended after the last sync.
    pub unsynced: usize,
    /// Of those, the real ones that survived.
    pub kept: usize,
    /// Zeros or garbage after them.
    pub fill: Fill,
    pub filled: usize,
}

impl SimFs {
    /// The power fails at the `ops`-th mutating operation from now (0: the
    /// next one).
    pub fn crash_after(&self, ops: u64) {
        self.0.lock().ops_left = Some(ops);
    }

    /// Whether the power failed.
    pub fn crashed(&self) -> bool {
        self.0.lock().crashed
    }

    /// Mutating operations that have succeeded so far.
    pub fn ops(&self) -> u64 {
        self.0.lock().ops
    }

    /// The next sync_data fails with EIO (the disk works again after it).
    /// Holds every fsync from now on until called with `false`.
    pub fn hold_syncs(&self, hold: bool) {
        self.0.lock().hold_syncs = hold;
    }

    /// How many fsyncs are being held now.
    pub fn syncs_held(&self) -> usize {
        self.0.lock().syncs_held
    }

    pub fn fail_next_sync(&self) {
        self.0.lock().fail_next_sync = true;
    }

    /// The current contents of `path`, as a reader of the file sees them.
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_read(path)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// What a reboot finds: durable entries and some prefix of each
    /// directory's later changes, synced bytes, and a torn tail of whatever
    /// was appended after the last sync (see the module doc). Also says
    /// which torn tails it left.
    pub fn reboot(&self, rng: &mut StdRng) -> (SimFs, Vec<TornTail>) {
        let d = self.0.lock();
        let mut disk = Disk {
            dirs: d.dirs.clone(),
            ..Disk::default()
        };
        let mut entries = d.durable.clone();
        for ops in d.unsynced.values() {
            for op in &ops[..rng.gen_range(0..=ops.len())] {
                match op {
                    DirOp::Link(path, ino) => entries.insert(path.clone(), *ino),
                    DirOp::Unlink(path) => entries.remove(path),
                };
            }
        }
        let mut tails = Vec::new();
        let mut remap = BTreeMap::new();
        for (path, &ino) in &entries {
            let new_ino = *remap.entry(ino).or_insert_with(|| {
                let node = &d.inodes[ino];
                let mut data = node.synced.clone();
                if node.data.len() > node.synced.len() && node.data.starts_with(&node.synced) {
                    let tail = torn_tail(rng, path, &node.data[node.synced.len()..]);
                    data.extend_from_slice(&tail.0);
                    tails.push(tail.1);
                }
                disk.inodes.push(Inode {
                    data: data.clone(),
                    synced: data,
                });
                disk.inodes.len() - 1
            });
            disk.current.insert(path.clone(), new_ino);
            disk.durable.insert(path.clone(), new_ino);
        }
        (SimFs(Arc::new(Mutex::new(disk))), tails)
    }
}

/// The bytes a power cut leaves of `unsynced`, appended after a file's last
/// sync: a real prefix, then (maybe) zeros or garbage up to at most the
/// appended length.
fn torn_tail(rng: &mut StdRng, path: &Path, unsynced: &[u8]) -> (Vec<u8>, TornTail) {
    let kept = rng.gen_range(0..=unsynced.len());
    let fill = match rng.gen_range(0..3) {
        0 => Fill::None,
        1 => Fill::Zeros,
        _ => Fill::Garbage,
    };
    let filled = match fill {
        Fill::None => 0,
        _ => rng.gen_range(0..=unsynced.len() - kept),
    };
    let mut bytes = unsynced[..kept].to_vec();
    match fill {
        Fill::None => {}
        Fill::Zeros => bytes.resize(kept + filled, 0),
        Fill::Garbage => bytes.extend((0..filled).map(|_| rng.gen::<u8>())),
    }
    let tail = TornTail {
        path: path.to_path_buf(),
        unsynced: unsynced.len(),
        kept,
        fill,
        filled,
    };
    (bytes, tail)
}

/// Runs crash points `once(seed)` from seed `first` on until at least
/// `runs` have run and each kind of torn tail reached the WAL `n` times,
/// then checks that it did. With writer threads, how much is unsynced at
/// the crash, and so which tails a run leaves, depends on timing: a loaded
/// machine leaves fewer, and gets more runs (at most ten times `runs`)
/// rather than a verdict on too little evidence.
pub fn crash_points(first: u64, runs: u64, n: u64, mut once: impl FnMut(u64) -> Vec<TornTail>) {
    let mut tally = TailTally::default();
    for seed in first..first + 10 * runs {
        tally.add(&once(seed));
        if seed + 1 >= first + runs && tally.each_at_least(n) {
            break;
        }
    }
    tally.assert_each_at_least(n);
}

/// How many torn tails of each kind reached WAL segments, over many reboots:
/// evidence that recovery really met zeros and garbage, not only prefixes.
#[derive(Debug, Default)]
pub struct TailTally {
    pub prefix_only: u64,
    pub zeros: u64,
    pub garbage: u64,
}

impl TailTally {
    pub fn add(&mut self, tails: &[TornTail]) {
        let in_wal = |t: &&TornTail| t.path.extension().is_some_and(|e| e == "wal");
        for t in tails.iter().filter(in_wal) {
            match t.fill {
                _ if t.filled == 0 => self.prefix_only += 1,
                Fill::None => self.prefix_only += 1,
                Fill::Zeros => self.zeros += 1,
                Fill::Garbage => self.garbage += 1,
            }
        }
    }

    /// Whether each kind of tail reached the WAL at least `n` times.
    pub fn each_at_least(&self, n: u64) -> bool {
        self.prefix_only >= n && self.zeros >= n && self.garbage >= n
    }

    /// Panics unless each kind of tail reached the WAL at least `n` times.
    pub fn assert_each_at_least(&self, n: u64) {
        assert!(
            self.prefix_only >= n && self.zeros >= n && self.garbage >= n,
            "too few torn WAL tails of some kind to prove anything: {self:?}"
        );
    }
}
