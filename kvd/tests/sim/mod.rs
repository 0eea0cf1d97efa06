//! The crash models' test kit: a simulated disk that loses power at a
//! chosen moment, and the key-value workload the models run over it.
//!
//! On "crash" the simulated disk keeps only what was made durable: file
//! contents as of their last `sync_data`, directory entries as of their
//! directory's last `sync_dir`, plus a random torn prefix of each file's
//! unsynced appended bytes.
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

use kvd::storage::fs::{Fs, WriteFile};

#[derive(Clone, Default)]
struct Inode {
    data: Vec<u8>,
    /// Contents as of the last sync_data.
    synced: Vec<u8>,
}

#[derive(Default)]
struct Disk {
    inodes: Vec<Inode>,
    current: BTreeMap<PathBuf, usize>,
    durable: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    /// Mutating operations so far.
    ops: u64,
    /// Mutating operations left before the power fails (None: never).
    ops_left: Option<u64>,
    crashed: bool,
    /// Fail the next sync_data with EIO (then behave again).
    fail_next_sync: bool,
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
        let mut d = self.disk.lock();
        d.tick()?;
        if std::mem::take(&mut d.fail_next_sync) {
            return Err(io::Error::other("simulated EIO from fdatasync"));
        }
        let ino = &mut d.inodes[self.ino];
        ino.synced = ino.data.clone();
        Ok(())
    }
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
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut d = self.0.lock();
        d.tick()?;
        d.current.remove(path).ok_or_else(|| not_found(path))?;
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
        Ok(())
    }
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
    pub fn fail_next_sync(&self) {
        self.0.lock().fail_next_sync = true;
    }

    /// The current contents of `path`, as a reader of the file sees them.
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_read(path)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// What a reboot finds: durable entries, synced bytes, and a random torn
    /// prefix of whatever was appended after the last sync.
    pub fn reboot(&self, rng: &mut StdRng) -> SimFs {
        let d = self.0.lock();
        let mut disk = Disk {
            dirs: d.dirs.clone(),
            ..Disk::default()
        };
        let mut remap = BTreeMap::new();
        for (path, &ino) in &d.durable {
            let new_ino = *remap.entry(ino).or_insert_with(|| {
                let node = &d.inodes[ino];
                let mut data = node.synced.clone();
                if node.data.len() > node.synced.len() && node.data.starts_with(&node.synced) {
                    let extra = &node.data[node.synced.len()..];
                    let keep = rng.gen_range(0..=extra.len());
                    data.extend_from_slice(&extra[..keep]);
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
        SimFs(Arc::new(Mutex::new(disk)))
    }
}
