//! The admin token's file, `<stateDir>/admin.token`: made once by the
//! daemon, mode 0600 from its creation, and read by the `kvsup` commands.
//! Like ssh with a private key, the daemon refuses a token file that
//! anyone but its owner may read or write.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::auth::AdminToken;

pub const FILE_NAME: &str = "admin.token";

/// More than a token and its newline; a bigger file is not ours.
const MAX_FILE_BYTES: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// `source` is the cause in the error chain (`{:#}` shows it).
    #[error("{path}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "permissions {mode:04o} for {path} are too open: it holds kvsup's admin token, which \
         only its owner may read; run `chmod 600 {path}`",
        path = path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {me}); it must be this user's own \
         file",
        path = path.display()
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path} does not hold a kvsup admin token (64 hex digits); remove it and the daemon \
         makes a new one",
        path = path.display()
    )]
    Malformed { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenFileError + '_ {
    move |source| TokenFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The daemon's token for `state_dir`: the one in its file, or a new one
/// written there if there is no file yet. Call it only while holding the
/// supervisor port, so that two daemons never race to make it.
pub fn load_or_create(state_dir: &Path) -> Result<AdminToken, TokenFileError> {
    let path = path_in(state_dir);
    match open_private(&path) {
        Ok(f) => parse(&path, f),
        Err(TokenFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            create(state_dir, &path)
        }
        Err(e) => Err(e),
    }
}

/// The token in `path`, for a command that talks to the daemon.
pub fn read(path: &Path) -> Result<AdminToken, TokenFileError> {
    let f = File::open(path).map_err(io(path))?;
    parse(path, f)
}

/// Opens an existing token file, refusing one that is not a regular file of
/// this user's that only this user may read and write. A symbolic link is
/// not followed: the file must be the daemon's own.
fn open_private(path: &Path) -> Result<File, TokenFileError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(io(path))?;
    let meta = f.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(TokenFileError::Malformed {
            path: path.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(TokenFileError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(TokenFileError::TooOpen {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(f)
}

fn parse(path: &Path, f: File) -> Result<AdminToken, TokenFileError> {
    let mut text = String::new();
    f.take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => TokenFileError::Malformed {
                path: path.to_path_buf(),
            },
            _ => io(path)(e),
        })?;
    AdminToken::parse_hex(&text).ok_or_else(|| TokenFileError::Malformed {
        path: path.to_path_buf(),
    })
}

/// Writes a new token to a temporary file created with mode 0600 (never
/// chmod-ed later, so it is never readable by others even for an instant),
/// syncs it and renames it into place: a crash leaves either no token file
/// or a whole one.
fn create(state_dir: &Path, path: &Path) -> Result<AdminToken, TokenFileError> {
    let token = AdminToken::from_bytes(random_bytes().map_err(io(Path::new("/dev/urandom")))?);
    let tmp = state_dir.join(format!("{FILE_NAME}.new"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(format!("{}\n", token.to_hex()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(state_dir))?;
    Ok(token)
}

fn random_bytes() -> std::io::Result<[u8; AdminToken::LEN]> {
    let mut b = [0u8; AdminToken::LEN];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_is_made_once_with_mode_0600_and_kept() {
        let dir = tempfile::TempDir::new().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let meta = std::fs::metadata(path_in(dir.path())).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        assert_eq!(read(&path_in(dir.path())).unwrap(), first);
        let other = tempfile::TempDir::new().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), first);
    }

    #[test]
    fn an_open_or_malformed_token_file_is_refused_naming_it() {
        let dir = tempfile::TempDir::new().unwrap();
        load_or_create(dir.path()).unwrap();
        let p = path_in(dir.path());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("0640") && e.contains(&p.display().to_string()) && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "not a token\n").unwrap();
        let e = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, TokenFileError::Malformed { .. }), "{e}");
    }
}
