//! `GET /v1/admin/snapshot`: a backup of this node, exact at its applied
//! index C (docs/DESIGN.md §3.10), streamed: the newest snapshot file as it
//! is on disk, then the log entries after it through C, framed and
//! checksummed by [`storage::backup::Writer`]. Never whole in memory: a
//! chunk of the snapshot or one read of entries at a time.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use kvproto::code::{self, BACKUP_UNAVAILABLE, BACKUP_UNSUPPORTED};
use tokio::sync::mpsc;

use super::query::{NoParams, Params};
use super::{blocking, ApiError, Shared};
use crate::storage::backup::{self, Header, Writer};
use crate::storage::Engine;

/// The answer's header naming C.
pub const BACKUP_INDEX: &str = "x-kv-backup-index";
/// The epoch of entry C.
pub const BACKUP_EPOCH: &str = "x-kv-backup-epoch";
/// The embedded snapshot's index S.
pub const BACKUP_SNAPSHOT_INDEX: &str = "x-kv-backup-snapshot-index";

/// Bytes of the snapshot read per chunk, and of entries per read.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks buffered between the producer and the connection.
const CHANNEL_CHUNKS: usize = 4;
/// Tries to open the newest snapshot while a newer one replaces it.
const OPEN_TRIES: usize = 5;

/// Where the backup's snapshot section comes from.
enum Snapshot {
    /// The node has none: an empty one at index 0.
    Empty(Vec<u8>),
    /// The newest snapshot file, opened (a newer snapshot may remove its
    /// name; the open file stays readable).
    File(std::fs::File),
}

/// What the backup is made of, fixed before the answer starts.
struct Source {
    header: Header,
    snapshot: Snapshot,
}

/// Opens the newest snapshot and picks C, the applied index once it is
/// open (a snapshot covers only applied entries, so C >= S, and it was
/// complete before C was read, so it holds nothing after C).
fn open_source(engine: &Engine) -> Result<Source, ApiError> {
    let unavailable = |why: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, BACKUP_UNAVAILABLE, why)
            .with_header("retry-after", "1".into())
    };
    for _ in 0..OPEN_TRIES {
        let (snapshot, s_index, s_epoch, len) = match engine.latest_snapshot() {
            None => {
                let b = backup::empty_snapshot();
                let len = b.len() as u64;
                (Snapshot::Empty(b), 0, 0, len)
            }
            // Read directly, not through the `Fs` seam: only the open
            // file's length is needed besides its bytes, and a read cannot
            // change what a crash leaves.
            Some((path, index)) => match open_snapshot(&path) {
                Ok((f, epoch, len)) => (Snapshot::File(f), index, epoch, len),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        code::STORAGE_ERROR,
                        format!("reading {}: {e}", path.display()),
                    ))
                }
            },
        };
        let c = engine.state().applied_index().max(s_index);
        if c > s_index && engine.first_log_index() > s_index + 1 {
            // A newer snapshot compacted the log after ours: take that one.
            continue;
        }
        let epoch = if c == s_index {
            s_epoch
        } else {
            engine
                .epoch_at(c)
                .ok_or_else(|| unavailable(format!("the epoch of entry {c} is unknown")))?
        };
        let header = Header {
            index: c,
            epoch,
            snapshot_index: s_index,
            snapshot_len: len,
        };
        return Ok(Source { header, snapshot });
    }
    Err(unavailable(
        "snapshots kept replacing each other; retry".into(),
    ))
}

/// The snapshot file, its header's epoch and its length; positioned at 0.
fn open_snapshot(path: &std::path::Path) -> std::io::Result<(std::fs::File, u64, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut head = [0u8; 32];
    f.read_exact(&mut head)?;
    f.seek(SeekFrom::Start(0))?;
    let mut w = [0u8; 8];
    w.copy_from_slice(&head[24..32]);
    Ok((f, u64::from_le_bytes(w), len))
}

/// `GET /v1/admin/snapshot`.
pub async fn snapshot(State(st): State<Shared>, _: Params<NoParams>) -> Result<Response, ApiError> {
    if st.engine.is_masterless() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            BACKUP_UNSUPPORTED,
            "a masterless node cannot be backed up (its log merges peers' writes); \
             switch the cluster to primary-secondary first",
        ));
    }
    let engine = st.engine.clone();
    let source = blocking(move || open_source(&engine)).await??;
    let h = source.header;
    tracing::info!(
        target: "kvd::audit",
        index = h.index,
        snapshot_index = h.snapshot_index,
        snapshot_bytes = h.snapshot_len,
        "backup started"
    );
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let task = tokio::spawn(produce(st.engine.clone(), source, tx));
    let mut resp = Body::new(BackupBody { rx, task }).into_response();
    let hs = resp.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    hs.insert(BACKUP_INDEX, HeaderValue::from(h.index));
    hs.insert(BACKUP_EPOCH, HeaderValue::from(h.epoch));
    hs.insert(BACKUP_SNAPSHOT_INDEX, HeaderValue::from(h.snapshot_index));
    Ok(resp)
}

type Chunk = Result<Bytes, std::io::Error>;

/// Streams the backup into `tx`; on a failure it sends the error, which
/// aborts the answer (the client sees a cut body, never a short backup
/// that looks whole).
async fn produce(engine: Arc<Engine>, source: Source, tx: mpsc::Sender<Chunk>) {
    if let Err(e) = stream(&engine, source, &tx).await {
        tracing::warn!(error = %e, "backup failed");
        let _ = tx.send(Err(std::io::Error::other(e))).await;
    }
}

async fn stream(engine: &Engine, source: Source, tx: &mpsc::Sender<Chunk>) -> Result<(), String> {
    let gone = || "the client went away".to_string();
    let (mut w, head) = Writer::new(source.header);
    tx.send(Ok(Bytes::copy_from_slice(&head)))
        .await
        .map_err(|_| gone())?;
    match source.snapshot {
        Snapshot::Empty(b) => {
            w.snapshot_chunk(&b)?;
            tx.send(Ok(b.into())).await.map_err(|_| gone())?;
        }
        Snapshot::File(mut f) => loop {
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; CHUNK_BYTES];
                let n = f.read(&mut buf);
                (f, buf, n)
            })
            .await
            .map_err(|e| e.to_string())?;
            let (back, mut buf, n) = read;
            f = back;
            let n = n.map_err(|e| format!("reading the snapshot: {e}"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            w.snapshot_chunk(&buf)?;
            tx.send(Ok(buf.into())).await.map_err(|_| gone())?;
        },
    }
    while !w.records_done() {
        let from = w.next_index();
        let recs = engine
            .entries_from(from, CHUNK_BYTES)
            .await
            .map_err(|e| format!("reading entries from {from}: {e}"))?;
        if recs.is_empty() {
            return Err(format!("the log no longer holds entry {from}"));
        }
        let mut out = Vec::new();
        w.records(&recs, &mut out)?;
        tx.send(Ok(out.into())).await.map_err(|_| gone())?;
    }
    let trailer = w.finish()?;
    tx.send(Ok(Bytes::copy_from_slice(&trailer)))
        .await
        .map_err(|_| gone())?;
    Ok(())
}

/// The answer's body: the producer's chunks; it owns the producer.
struct BackupBody {
    rx: mpsc::Receiver<Chunk>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BackupBody {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl http_body::Body for BackupBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|c| c.map(Frame::data)))
    }
}
