//! `kvd restore`: a data dir from a backup (docs/DESIGN.md §3.10). The
//! whole file is verified before anything is created; the data dir is then
//! written beside its place and renamed into it (`storage::backup`).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::config::RestoreArgs;
use crate::storage::backup;
use crate::storage::record::Limits;

/// What a restore did, for its one line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub index: u64,
    pub keys: u64,
    pub digest: u64,
    pub bytes: u64,
}

impl Summary {
    pub fn line(&self, data_dir: Option<&Path>) -> String {
        let what = match data_dir {
            Some(d) => format!("restored {}", d.display()),
            None => "verified".to_string(),
        };
        format!(
            "{what}: index {} ({} keys, digest {:016x}, {} bytes of backup)",
            self.index, self.keys, self.digest, self.bytes
        )
    }
}

/// Refuses a data dir that holds anything: a restore never mixes with, or
/// replaces, a node's data.
fn check_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty: a restore makes a new data dir (remove it, or pick another)",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{} exists and is not a directory", dir.display())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Runs `kvd restore`.
pub fn run(args: &RestoreArgs) -> Result<Summary> {
    if let Some(d) = &args.data_dir {
        check_target(d)?;
    }
    let limits = Limits {
        max_value_bytes: args.max_value_bytes,
        max_bulk_items: args.max_bulk_items,
    };
    let v = backup::verify(&args.from, &limits).context("the backup is refused")?;
    let summary = Summary {
        index: v.header.index,
        keys: v.state.len(),
        digest: v.state.digest(),
        bytes: v.bytes,
    };
    if let (Some(d), false) = (&args.data_dir, args.check) {
        // Checked again: another process may have filled it meanwhile.
        check_target(d)?;
        backup::write_data_dir(&v, d).with_context(|| format!("writing {}", d.display()))?;
    }
    Ok(summary)
}
