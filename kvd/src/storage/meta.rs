//! Node metadata (`meta`, JSON, format version 1): the node's id, its
//! current epoch and its vote in that epoch, and its mode.
//!
//! ```text
//! {"format_version": 1, "node_id": "n0", "epoch": 3,
//!  "mode": "single" | "primary-secondary" | "masterless",
//!  "voted_for": "n1" | null}
//! ```
//!
//! A node persists a newer epoch, and its vote, here before it acts on
//! them or answers anyone (docs/DESIGN.md §4): [`MetaStore::store`] returns only once
//! the new contents are durable (temp file, fsync, rename, directory
//! fsync), through the [`Fs`] seam, so the crash model covers it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvproto::Mode;
use serde::{Deserialize, Serialize};

use super::fs::Fs;
use super::Error;

/// The format this kvd reads and writes.
pub const META_FORMAT_VERSION: u32 = 1;

/// The contents of `meta`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub format_version: u32,
    pub node_id: String,
    pub epoch: u64,
    pub mode: Mode,
    /// Whom this node voted for in `epoch` (each epoch is granted once).
    #[serde(default)]
    pub voted_for: Option<String>,
    /// Re-seeded after its data was lost (`--rejoin`), and not yet caught
    /// up with a primary's commit index: it may have acknowledged entries
    /// it no longer holds, so it neither votes nor runs until it holds
    /// them again (docs/DESIGN.md §4.10). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejoining: bool,
    /// Started fresh with `--join`: not in the bootstrap configuration, so
    /// until its log holds a configuration it stays a learner of an
    /// unknown one, whatever a later start's flags say (docs/DESIGN.md
    /// §4.11). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined: bool,
}

/// Reads and replaces a data dir's `meta`.
#[derive(Clone)]
pub struct MetaStore {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
}

impl MetaStore {
    /// The `meta` of the data dir `dir`.
    pub fn new(fs: Arc<dyn Fs>, dir: impl Into<PathBuf>) -> MetaStore {
        MetaStore {
            fs,
            dir: dir.into(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("meta")
    }

    /// Reads `meta`, or creates it durably for a fresh data dir (epoch 1,
    /// no vote); says which (`true`: created).
    pub fn load_or_init(&self, node_id: &str, mode: Mode) -> Result<(Meta, bool), Error> {
        let path = self.path();
        match self.fs.read(&path) {
            Ok(raw) => Ok((parse(&path, &raw)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = Meta {
                    format_version: META_FORMAT_VERSION,
                    node_id: node_id.to_string(),
                    epoch: 1,
                    mode,
                    voted_for: None,
                    rejoining: false,
                    joined: false,
                };
                self.store(&meta)?;
                Ok((meta, true))
            }
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Replaces `meta` atomically and durably: temp file, fsync, rename,
    /// directory fsync.
    pub fn store(&self, meta: &Meta) -> Result<(), Error> {
        let tmp = self.dir.join("meta.tmp");
        let path = self.path();
        let raw = serde_json::to_vec_pretty(meta).map_err(|e| Error::Decode(e.to_string()))?;
        let io = |what: &str, p: &Path| {
            let context = format!("{what} {}", p.display());
            move |e| Error::io(context, e)
        };
        let mut f = self.fs.create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&raw).map_err(io("writing", &tmp))?;
        f.sync_data().map_err(io("fsync of", &tmp))?;
        drop(f);
        self.fs.rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(io("fsync of", &self.dir))
    }
}

fn parse(path: &Path, raw: &[u8]) -> Result<Meta, Error> {
    let corrupt = |reason: String| Error::Corruption {
        file: path.to_path_buf(),
        offset: 0,
        reason,
    };
    let meta: Meta =
        serde_json::from_slice(raw).map_err(|e| corrupt(format!("corrupt node metadata: {e}")))?;
    if meta.format_version != META_FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {}; this kvd reads version {META_FORMAT_VERSION}",
            meta.format_version
        )));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::RealFs;

    #[test]
    fn meta_is_created_once_then_read_back_with_its_vote() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(Arc::new(RealFs), dir.path());
        let (mut meta, fresh) = store.load_or_init("n0", Mode::PrimarySecondary).unwrap();
        assert!(fresh);
        assert_eq!((meta.epoch, meta.voted_for.as_deref()), (1, None));
        meta.epoch = 7;
        meta.voted_for = Some("n2".into());
        store.store(&meta).unwrap();
        let (back, fresh) = store.load_or_init("other", Mode::Single).unwrap();
        assert!(!fresh);
        assert_eq!(back, meta);
        let raw = std::fs::read_to_string(dir.path().join("meta")).unwrap();
        assert!(raw.contains("\"mode\": \"primary-secondary\""), "{raw}");
    }

    #[test]
    fn a_damaged_or_newer_meta_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(Arc::new(RealFs), dir.path());
        std::fs::write(dir.path().join("meta"), b"{not json").unwrap();
        assert!(store
            .load_or_init("n0", Mode::Single)
            .unwrap_err()
            .is_corruption());
        std::fs::write(
            dir.path().join("meta"),
            br#"{"format_version":2,"node_id":"n0","epoch":1,"mode":"single"}"#,
        )
        .unwrap();
        let e = store.load_or_init("n0", Mode::Single).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
    }
}
