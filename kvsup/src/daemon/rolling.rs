//! Rolling changes: the nodes restarted one at a time onto new settings
//! (`spec.index`, `spec.kvdArgs`, the kvd binary), as `crate::plan` plans
//! them.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::plan::BinaryId;

/// `path` and the SHA-256 of its content, read in 64 KiB blocks.
pub(crate) fn binary_id(path: &Path) -> Result<BinaryId> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let sum = h.finalize();
    Ok(BinaryId {
        path: path.to_path_buf(),
        sha256: sum.iter().map(|b| format!("{b:02x}")).collect(),
    })
}
