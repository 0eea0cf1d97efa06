//! Crash model: the storage engine over a simulated file system that loses
//! power at a chosen moment.
//!
//! On "crash" the simulated disk keeps only what was made durable: file
//! contents as of their last `sync_data`, directory entries as of their
//! directory's last `sync_dir`, plus a random torn prefix of each file's
//! unsynced appended bytes. Over many seeded crash points, recovery must
//! boot every time and hold every acknowledged write; the one write in
//! flight at the crash may or may not survive, but never partially.
//!
//! Simplification: directories themselves are durable once created (the
//! engine creates `wal/` and `snap/` once, at first start).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kvd::storage::fs::{Fs, WriteFile};
use kvd::storage::{Engine, EngineConfig, Op};

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
        Ok(())
    }
}

#[derive(Clone, Default)]
struct SimFs(Arc<Mutex<Disk>>);

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
    fn crash_after(&self, ops: u64) {
        self.0.lock().ops_left = Some(ops);
    }

    /// What a reboot finds: durable entries, synced bytes, and a random torn
    /// prefix of whatever was appended after the last sync.
    fn reboot(&self, rng: &mut StdRng) -> SimFs {
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

fn config() -> EngineConfig {
    let mut cfg = EngineConfig::new("/sim/data");
    // Tiny segments and snapshots so that a short workload crosses segment
    // rolls, snapshots and WAL compaction, and crashes land inside them.
    cfg.segment_max_bytes = 2048;
    cfg.snapshot_every_bytes = 4096;
    cfg.queue_capacity = 64;
    cfg
}

type Model = BTreeMap<Bytes, Bytes>;

fn apply_model(m: &mut Model, op: &Op) {
    match op {
        Op::Put { key, value } => {
            m.insert(key.clone(), value.clone());
        }
        Op::Delete { key } => {
            m.remove(key);
        }
        Op::Bulk { items } => {
            for (k, v) in items {
                m.insert(k.clone(), v.clone());
            }
        }
        Op::Noop => {}
    }
}

fn random_op(rng: &mut StdRng, prefix: &str, seq: u64) -> Op {
    let key = |rng: &mut StdRng| Bytes::from(format!("{prefix}k{}", rng.gen_range(0..12)));
    // The value names the op that wrote it, so a mix-up would be visible.
    let value = |rng: &mut StdRng| {
        let mut v = format!("{prefix}{seq}:").into_bytes();
        v.resize(v.len() + rng.gen_range(0..200), b'x');
        Bytes::from(v)
    };
    match rng.gen_range(0..10) {
        0..=5 => Op::Put {
            key: key(rng),
            value: value(rng),
        },
        6..=7 => Op::Delete { key: key(rng) },
        _ => Op::Bulk {
            items: (0..rng.gen_range(1..6))
                .map(|_| (key(rng), value(rng)))
                .collect(),
        },
    }
}

fn contents(engine: &Engine, prefix: &str) -> Model {
    (0..12)
        .filter_map(|i| {
            let k = Bytes::from(format!("{prefix}k{i}"));
            engine.get(&k).map(|v| (k, v))
        })
        .collect()
}

/// One writer's view: what was acknowledged and what was in flight.
struct Writer {
    prefix: String,
    acked: Model,
    in_flight: Option<Op>,
}

/// Runs `writers` concurrent writers until the disk dies, reboots, recovers.
fn crash_once(seed: u64, writers: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let fs = SimFs::default();
    // A few hundred operations cover start-up, rolls, snapshots, compaction.
    fs.crash_after(rng.gen_range(0..600));
    let ops_per_writer = 120;

    let results: Vec<Writer> = match Engine::open(Arc::new(fs.clone()), config(), None) {
        Err(_) => Vec::new(), // the power failed during the very first start
        Ok((engine, _)) => {
            let engine = Arc::new(engine);
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let engine = engine.clone();
                    let mut rng =
                        StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(w as u64));
                    std::thread::spawn(move || {
                        let mut me = Writer {
                            prefix: format!("w{w}-"),
                            acked: Model::new(),
                            in_flight: None,
                        };
                        for seq in 0..ops_per_writer {
                            let op = random_op(&mut rng, &me.prefix, seq);
                            match engine.write_blocking(op.clone(), true) {
                                Ok(_) => apply_model(&mut me.acked, &op),
                                Err(_) => {
                                    me.in_flight = Some(op);
                                    break;
                                }
                            }
                        }
                        me
                    })
                })
                .collect();
            let out = handles
                .into_iter()
                .map(|h| h.join().expect("writer thread panicked"))
                .collect();
            engine.shutdown();
            out
        }
    };

    let rebooted = fs.reboot(&mut rng);
    let (engine, report) = Engine::open(Arc::new(rebooted.clone()), config(), None)
        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed to boot: {e}"));
    for w in &results {
        let got = contents(&engine, &w.prefix);
        let mut with_in_flight = w.acked.clone();
        if let Some(op) = &w.in_flight {
            apply_model(&mut with_in_flight, op);
        }
        assert!(
            got == w.acked || got == with_in_flight,
            "seed {seed}: writer {} lost acknowledged data or saw a partial write\n\
             recovered: {got:?}\nacknowledged: {:?}\nin flight: {:?}\nreport: {report:?}",
            w.prefix,
            w.acked,
            w.in_flight
        );
    }
    // The recovered engine takes writes and recovers them again.
    engine
        .write_blocking(
            Op::Put {
                key: Bytes::from_static(b"after"),
                value: Bytes::from_static(b"crash"),
            },
            true,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: write after recovery failed: {e}"));
    engine.shutdown();
    drop(engine);
    let (again, _) = Engine::open(Arc::new(rebooted), config(), None)
        .unwrap_or_else(|e| panic!("seed {seed}: second recovery failed: {e}"));
    assert_eq!(
        again.get(b"after"),
        Some(Bytes::from_static(b"crash")),
        "seed {seed}"
    );
}

#[test]
fn a_single_writer_survives_1000_crash_points() {
    for seed in 0..1000 {
        crash_once(seed, 1);
    }
}

#[test]
fn concurrent_writers_with_group_commit_survive_300_crash_points() {
    for seed in 10_000..10_300 {
        crash_once(seed, 4);
    }
}

#[test]
fn a_failed_fsync_poisons_the_wal_until_restart() {
    let fs = SimFs::default();
    let (engine, _) = Engine::open(Arc::new(fs.clone()), config(), None).unwrap();
    let put = |v: &'static [u8]| Op::Put {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(v),
    };
    engine.write_blocking(put(b"1"), true).unwrap();
    fs.0.lock().fail_next_sync = true;
    assert!(engine.write_blocking(put(b"2"), true).is_err());
    // The disk works again, but the engine must not trust it: the kernel may
    // have dropped the pages of the failed write.
    let err = engine.write_blocking(put(b"3"), true).unwrap_err();
    assert!(matches!(err, kvd::storage::Error::Poisoned), "got {err}");
    assert!(engine.is_poisoned());
    assert_eq!(engine.get(b"k"), Some(Bytes::from_static(b"1")));
    engine.shutdown();
    drop(engine);
    let (engine, _) = Engine::open(Arc::new(fs), config(), None).unwrap();
    assert!(!engine.is_poisoned());
    engine.write_blocking(put(b"4"), true).unwrap();
}

/// A crash at any point of `truncate_from` leaves a log that boots and is
/// contiguous: the records before the cut, plus possibly some of the
/// doomed suffix (which the primary will cut again), never a gap.
#[test]
fn truncating_a_suffix_survives_a_crash_at_every_step() {
    use kvd::storage::record::{Record, Timestamp};
    use kvd::storage::wal::Wal;

    let dir = Path::new("/sim/data/wal");
    let record = |index: u64| Record {
        index,
        epoch: 1,
        ts: Timestamp::default(),
        op: Op::Put {
            key: Bytes::from(format!("k{index}")),
            value: Bytes::from(vec![b'v'; 60]),
        },
    };
    for crash_at in 0..40 {
        let fs = SimFs::default();
        let (mut wal, _) = Wal::open(Arc::new(fs.clone()), dir, 0, 400, |_| {}).unwrap();
        for i in 1..=30 {
            let mut buf = Vec::new();
            record(i).encode_into(&mut buf);
            wal.append(i, 1, &buf, 1).unwrap();
            wal.sync().unwrap();
        }
        fs.crash_after(crash_at);
        let finished = wal.truncate_from(12).is_ok();
        drop(wal);

        let mut rng = StdRng::seed_from_u64(crash_at);
        let rebooted = fs.reboot(&mut rng);
        let mut seen = Vec::new();
        let (wal, _) = Wal::open(Arc::new(rebooted), dir, 0, 400, |r| seen.push(r.index))
            .unwrap_or_else(|e| panic!("crash at op {crash_at}: the log does not boot: {e}"));
        assert!(
            seen.iter().enumerate().all(|(n, &i)| i == n as u64 + 1),
            "crash at op {crash_at}: gap in the log: {seen:?}"
        );
        assert!(
            seen.len() >= 11,
            "crash at op {crash_at}: lost entries before the cut"
        );
        if finished {
            assert_eq!(seen.len(), 11, "a finished truncation must be durable");
        }
        assert_eq!(wal.next_index(), seen.len() as u64 + 1);
    }
}
