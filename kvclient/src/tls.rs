//! TLS settings shared by the client and the admin client: the CA that a
//! node's server certificate must be signed by, and optionally a client
//! certificate (a node certificate of the cluster CA for `/v1/admin/*`,
//! docs/DESIGN.md §12).
//!
//! No system or bundled roots are trusted: a cluster has its own CA, and
//! trusting the public ones too would let any public certificate for the
//! node's name pass.

use std::path::{Path, PathBuf};

/// Largest PEM file read.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// The TLS files of a client; all empty is plain HTTP (an `https://`
/// endpoint then fails: no CA is trusted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates (PEM) that the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM), sent when the server asks.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    pub key: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{}: larger than {MAX_PEM_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Whether any TLS file is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// `builder` with these files' roots and identity; the message names a
    /// file that cannot be used.
    pub(crate) fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, String> {
        if let Some(ca) = &self.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
                .map_err(|e| format!("{}: not PEM certificates: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: holds no PEM certificate", ca.display()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read(key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    format!(
                        "{} and {}: not a PEM certificate and private key: {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
                builder = builder.identity(identity);
            }
            _ => return Err("a client certificate needs both its cert and key file".into()),
        }
        Ok(builder.tls_built_in_root_certs(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_unusable_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let files = TlsFiles {
            ca: Some(missing.clone()),
            ..TlsFiles::default()
        };
        let e = files.apply(reqwest::Client::builder()).unwrap_err();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        std::fs::write(&missing, b"garbage").unwrap();
        let e = files.apply(reqwest::Client::builder()).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let half = TlsFiles {
            cert: Some(missing),
            ..TlsFiles::default()
        };
        assert!(half.apply(reqwest::Client::builder()).is_err());
    }
}
