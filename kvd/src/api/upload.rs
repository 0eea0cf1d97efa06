//! Snapshot uploads (`POST /internal/snapshot`): streamed to a file as
//! they arrive, never held in memory, with a size limit and timeouts, and
//! removed unless installed.

use kvproto::code;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::http::StatusCode;
use http_body_util::BodyExt;

use super::ApiError;
use crate::storage::fs::{Fs, WriteFile};

/// Bytes gathered before one write: few syscalls, bounded memory.
const WRITE_CHUNK: usize = 1 << 20;

/// A file of the engine's file system that is removed when this is
/// dropped: an upload that is refused, fails, or is abandoned (the sender
/// goes away and the handler is dropped) leaves nothing behind. One that
/// was installed has been renamed away already.
pub struct TempFile {
    fs: Arc<dyn Fs>,
    path: PathBuf,
}

impl TempFile {
    pub fn new(fs: Arc<dyn Fs>, path: PathBuf) -> TempFile {
        TempFile { fs, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = self.fs.remove(&self.path);
    }
}

/// How big and how slow an upload may be.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_bytes: u64,
    /// Longest wait for the next piece of the body.
    pub idle: Duration,
    /// Longest the whole body may take.
    pub total: Duration,
}

/// Streams `body` into the new file `tmp` and fsyncs it; returns its
/// size. 413 `snapshot_too_large` as soon as a declared length or the
/// bytes received pass `max_bytes`; 408 when a piece takes longer than
/// `idle` or the whole longer than `total`. The caller owns the file (a
/// [`TempFile`]) whatever the outcome.
pub async fn receive(body: Body, tmp: &TempFile, limits: &UploadLimits) -> Result<u64, ApiError> {
    let too_large = || {
        ApiError::too_large(
            code::SNAPSHOT_TOO_LARGE,
            format!(
                "the snapshot exceeds the limit of {} bytes (--max-snapshot-mib)",
                limits.max_bytes
            ),
        )
    };
    if body.size_hint().lower() > limits.max_bytes {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + limits.total;
    let mut body = body;
    let mut file = tmp.fs.create(&tmp.path).map_err(write_failed)?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK);
    let mut received = 0u64;
    loop {
        let wait = deadline.min(tokio::time::Instant::now() + limits.idle);
        let frame = tokio::time::timeout_at(wait, body.frame())
            .await
            .map_err(|_| timed_out(limits))?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|_| {
            ApiError::bad_request(code::BAD_BODY, "could not read the snapshot body")
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received = received.saturating_add(data.len() as u64);
        if received > limits.max_bytes {
            return Err(too_large());
        }
        buf.extend_from_slice(&data);
        if buf.len() >= WRITE_CHUNK {
            (file, buf) = write_out(file, buf, false).await?;
        }
    }
    write_out(file, buf, true).await?;
    Ok(received)
}

/// Appends `buf` to `file` off the async threads (and fsyncs if `sync`);
/// hands both back, `buf` emptied.
async fn write_out(
    mut file: Box<dyn WriteFile>,
    mut buf: Vec<u8>,
    sync: bool,
) -> Result<(Box<dyn WriteFile>, Vec<u8>), ApiError> {
    tokio::task::spawn_blocking(move || {
        file.write_all(&buf)?;
        if sync {
            file.sync_data()?;
        }
        buf.clear();
        Ok((file, buf))
    })
    .await
    .map_err(|e| write_failed(std::io::Error::other(e)))?
    .map_err(write_failed)
}

fn write_failed(e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::SNAPSHOT_WRITE_FAILED,
        format!("could not write the incoming snapshot: {e}"),
    )
}

fn timed_out(limits: &UploadLimits) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        code::REQUEST_TIMEOUT,
        format!(
            "the snapshot did not arrive in time (each piece within {:?}, all within {:?})",
            limits.idle, limits.total
        ),
    )
}
