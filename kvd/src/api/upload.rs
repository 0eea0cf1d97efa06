//! Snapshot uploads (`POST /internal/snapshot`): streamed to a file as
//! they arrive, never held in memory, with a size limit and timeouts, and
//! removed unless installed.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::http::StatusCode;
use http_body_util::BodyExt;

use super::ApiError;

/// Bytes gathered before one write: few syscalls, bounded memory.
const WRITE_CHUNK: usize = 1 << 20;

/// A file that is removed when this is dropped: an upload that is refused,
/// fails, or is abandoned (the sender goes away and the handler is
/// dropped) leaves nothing behind. One that was installed has been renamed
/// away already.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(path: PathBuf) -> TempFile {
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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

/// Streams `body` into a new file at `path` and fsyncs it; returns its
/// size. 413 `snapshot_too_large` as soon as a declared length or the
/// bytes received pass `max_bytes`; 408 when a piece takes longer than
/// `idle` or the whole longer than `total`. The caller owns the file (a
/// [`TempFile`]) whatever the outcome.
pub async fn receive(body: Body, path: &Path, limits: &UploadLimits) -> Result<u64, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "snapshot_too_large",
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
    let mut file = File::create(path).map_err(write_failed)?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK);
    let mut received = 0u64;
    loop {
        let wait = deadline.min(tokio::time::Instant::now() + limits.idle);
        let frame = tokio::time::timeout_at(wait, body.frame())
            .await
            .map_err(|_| timed_out(limits))?;
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|_| ApiError::bad_request("bad_body", "could not read the snapshot body"))?;
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
    mut file: File,
    mut buf: Vec<u8>,
    sync: bool,
) -> Result<(File, Vec<u8>), ApiError> {
    tokio::task::spawn_blocking(move || {
        file.write_all(&buf)?;
        if sync {
            file.sync_all()?;
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
        "snapshot_write_failed",
        format!("could not write the incoming snapshot: {e}"),
    )
}

fn timed_out(limits: &UploadLimits) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the snapshot did not arrive in time (each piece within {:?}, all within {:?})",
            limits.idle, limits.total
        ),
    )
}
