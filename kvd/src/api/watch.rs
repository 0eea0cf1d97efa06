//! `GET /v1/watch` (docs/DESIGN.md §2.17): the changes to a range of keys,
//! streamed from the node's watch hub (`storage::watch`) in log order.
//!
//! The handler checks the request and answers with a body fed by one task,
//! which the body owns: when the client goes, hyper drops the body, which
//! aborts the task. The task reads records from its cursor, keeps the
//! events in the range, and sends them through a channel of a few chunks,
//! so a client that stops reading stops the task, never makes it buffer.
//! While it waits to send, the task watches its lag: once the records it
//! has not sent reach half the hub's budget it is cut off
//! (`watcher_too_slow`), while what it would resume from is still held.
//! A stream's last event (an error event) is handed to the body beside the
//! channel, so it arrives even when the channel is full.
//!
//! Parsing the parameters and encoding events are plain functions.

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http_body::Frame;
use kvproto::code;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::access::Caller;
use super::query::Params;
use super::range::{key_range, BoundsError};
use super::serve::{Serving, StreamMark};
use super::wire::JsonValue;
use super::{validate_key, ApiError, Shared};
use crate::auth::Action;
use crate::metrics::WatchMetrics;
use crate::model::{Event, EventKind, KeyRange, RecordEvents, Timestamp};
use crate::storage::watch::{Compacted, Head, WatchHub, Watcher};

use kvproto::header::WATCH_INDEX;
/// `progress_ms` when the request gives none, and its range.
pub const DEFAULT_PROGRESS_MS: u64 = 1000;
pub const PROGRESS_MS: std::ops::RangeInclusive<u64> = 100..=60_000;
/// Largest `from_index`.
pub const MAX_FROM_INDEX: u64 = 1 << 63;
/// Pieces of chunks waiting for the client, per watch, and their size.
const CHANNEL_CHUNKS: usize = 16;
const PIECE_BYTES: usize = 64 << 10;
/// A chunk is sent once it holds this many bytes (or the stream has caught
/// up with the hub).
const CHUNK_BYTES: usize = 16 << 10;
/// What one read of the hub takes at most.
const READ_RECORDS: usize = 64;
const READ_BYTES: usize = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    key: Option<String>,
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    /// Numbers are parsed here, so that a bad one is `invalid_watch`.
    from_index: Option<String>,
    #[serde(default)]
    prev_value: bool,
    progress_ms: Option<String>,
}

/// A checked watch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub range: KeyRange,
    pub from_index: Option<u64>,
    pub prev_value: bool,
    pub progress: Duration,
    /// Events are sent only of keys the caller may read.
    pub caller: Caller,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code::INVALID_WATCH, message)
}

fn number(
    name: &str,
    raw: Option<&str>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let bad = || {
        invalid(format!(
            "{name} must be an integer within {}..={}, got {raw:?}",
            range.start(),
            range.end()
        ))
    };
    let n: u64 = raw.parse().map_err(|_| bad())?;
    range.contains(&n).then_some(Some(n)).ok_or_else(bad)
}

/// The keys `key=K` selects: exactly K (keys hold no NUL, so `[K, K\0)`).
fn one_key(key: &str) -> KeyRange {
    let mut end = key.as_bytes().to_vec();
    end.push(0);
    KeyRange {
        start: Bytes::copy_from_slice(key.as_bytes()),
        end: Some(Bytes::from(end)),
    }
}

/// Checks the parameters of §2.17: every fault is 400 `invalid_watch`.
pub fn parse(p: &WatchParams) -> Result<Spec, ApiError> {
    let range =
        match &p.key {
            Some(_) if p.prefix.is_some() || p.start.is_some() || p.end.is_some() => {
                return Err(invalid("key does not combine with prefix, start or end"))
            }
            Some(k) => {
                validate_key(k).map_err(|m| invalid(format!("key: {m}")))?;
                one_key(k)
            }
            None => key_range(p.prefix.as_deref(), p.start.as_deref(), p.end.as_deref()).map_err(
                |e| match e {
                    BoundsError::PrefixAndBounds => {
                        invalid("prefix does not combine with start or end")
                    }
                    e => invalid(e.to_string()),
                },
            )?,
        };
    let progress = number("progress_ms", p.progress_ms.as_deref(), PROGRESS_MS)?
        .unwrap_or(DEFAULT_PROGRESS_MS);
    Ok(Spec {
        range,
        from_index: number("from_index", p.from_index.as_deref(), 1..=MAX_FROM_INDEX)?,
        prev_value: p.prev_value,
        progress: Duration::from_millis(progress),
        caller: Caller::Anyone,
    })
}

/// How events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object a line.
    Ndjson,
    /// Server-Sent Events: `event:` and `data:` lines and a blank line.
    Sse,
}

impl Format {
    pub fn of(headers: &HeaderMap) -> Format {
        let sse = headers.get_all(header::ACCEPT).iter().any(|v| {
            v.as_bytes()
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        });
        if sse {
            Format::Sse
        } else {
            Format::Ndjson
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Sse => "text/event-stream",
        }
    }

    /// Appends one event of type `kind` to `out`.
    pub fn frame(self, out: &mut Vec<u8>, kind: &str, json: &impl Serialize) {
        if self == Format::Sse {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(kind.as_bytes());
            out.extend_from_slice(b"\ndata: ");
        }
        // Serializing these types cannot fail: no maps with non-string keys.
        let _ = serde_json::to_writer(&mut *out, json);
        out.extend_from_slice(match self {
            Format::Ndjson => b"\n",
            Format::Sse => b"\n\n",
        });
    }
}

/// A put, delete or expire event as JSON (§2.17).
#[derive(Debug, Serialize)]
pub struct JsonEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub index: u64,
    pub key: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<JsonValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mod_index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_value: Option<JsonValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Timestamp>,
}

fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
        EventKind::Expire => "expire",
    }
}

/// Event `e` of record `index`: `stamp` on a masterless node, `prev_value`
/// only when asked for and the key had one.
pub fn json_event<'a>(
    e: &'a Event,
    index: u64,
    stamp: Option<Timestamp>,
    prev_value: bool,
) -> JsonEvent<'a> {
    let put = e.kind == EventKind::Put;
    JsonEvent {
        kind: kind_name(e.kind),
        index,
        // Keys are UTF-8: every write checked them.
        key: String::from_utf8_lossy(&e.key),
        value: e
            .value
            .as_deref()
            .filter(|_| put)
            .map(JsonValue::from_bytes),
        create_index: put.then_some(e.meta.create_index),
        mod_index: put.then_some(e.meta.mod_index),
        version: put.then_some(e.meta.version),
        prev_value: e
            .prev
            .as_deref()
            .filter(|_| prev_value)
            .map(JsonValue::from_bytes),
        stamp,
    }
}

#[derive(Debug, Serialize)]
struct Progress {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
}

#[derive(Debug, Serialize)]
struct ErrorEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
    resume_index: u64,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client went: nothing more to say.
    Gone,
    ShuttingDown,
    /// Cut off: its unsent records reached half the budget.
    TooSlow,
    /// A reset (or eviction) took the records it was reading.
    Compacted(u64),
}

/// The error event a stream ends with, and the reason it is counted
/// under, if any; `unsent` is the first record not sent whole.
fn last_event(end: End, unsent: u64) -> Option<(&'static str, String, u64)> {
    match end {
        End::Gone => None,
        End::ShuttingDown => Some((
            code::SHUTTING_DOWN,
            "the node is shutting down; resume on another node or after its restart".into(),
            unsent,
        )),
        End::TooSlow => Some((
            code::WATCHER_TOO_SLOW,
            "the events not yet sent to this watch reached half of --watch-cache-mib; \
             resume from resume_index"
                .into(),
            unsent,
        )),
        End::Compacted(next) => Some((
            code::COMPACTED,
            "the node's state was replaced (a snapshot install or a mode switch); \
             re-read with a range and watch from its index + 1"
                .into(),
            next,
        )),
    }
}

/// Open watches: the `--max-watchers` slots and the `kvd_watchers` gauge.
pub struct Watchers {
    slots: Arc<Semaphore>,
    metrics: WatchMetrics,
}

/// One open watch, until dropped.
struct Admitted {
    _slot: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Watchers {
    pub fn new(max: usize, metrics: &WatchMetrics) -> Watchers {
        Watchers {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            metrics: metrics.clone(),
        }
    }

    fn admit(&self) -> Result<Admitted, ApiError> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::TOO_MANY_WATCHERS,
                "as many watches are open as --max-watchers allows; retry shortly",
            )
            .retry_after(1)
        })?;
        self.metrics.watchers.inc();
        Ok(Admitted {
            _slot: slot,
            gauge: self.metrics.watchers.clone(),
        })
    }
}

/// `GET /v1/watch`.
pub async fn watch(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    Params(p): Params<WatchParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    let mut spec = parse(&p)?;
    caller.check(Action::ReadFiltered(&spec.range))?;
    spec.caller = caller;
    let hub = st.engine.watch().clone();
    let applied = st.engine.state().applied_index();
    if let Some(from) = spec.from_index {
        let last = st.engine.last_log_pos().index;
        if from > last.saturating_add(1) {
            return Err(ApiError::bad_request(
                code::FUTURE_INDEX,
                format!("from_index {from} is past the node's last log index {last} + 1"),
            ));
        }
    }
    let watcher = hub
        .watch(spec.range.clone(), spec.from_index)
        .map_err(compacted)?;
    let admitted = st.watchers.admit()?;
    let format = Format::of(req.headers());
    let body = open(
        Setup {
            hub,
            watcher,
            spec,
            format,
            stamps: st.engine.is_masterless(),
            serving: req.extensions().get::<Serving>().cloned(),
            metrics: st.metrics.watch.clone(),
        },
        admitted,
    );
    let mut resp = Body::new(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(WATCH_INDEX, HeaderValue::from(applied));
    Ok(resp)
}

/// What a stream needs to start.
struct Setup {
    hub: Arc<WatchHub>,
    watcher: Watcher,
    spec: Spec,
    format: Format,
    /// Masterless: events carry their record's stamp.
    stamps: bool,
    serving: Option<Serving>,
    metrics: WatchMetrics,
}

/// Starts a stream's task; the body owns it.
fn open(s: Setup, admitted: Admitted) -> WatchBody {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let last = Arc::new(Mutex::new(None));
    let stream = Stream {
        head: s.hub.subscribe(),
        half_budget: (s.hub.budget() / 2) as u64,
        unsent: s.watcher.cursor().next(),
        hub: s.hub,
        watcher: s.watcher,
        spec: s.spec,
        format: s.format,
        stamps: s.stamps,
        tx,
        last: last.clone(),
        serving: s.serving.clone(),
        metrics: s.metrics,
        buf: Vec::new(),
        buf_events: 0,
        rest: Bytes::new(),
    };
    WatchBody {
        rx,
        last,
        task: tokio::spawn(stream.run()),
        _mark: s.serving.map(|s| s.stream()),
        _admitted: admitted,
    }
}

/// 410 `compacted` with `oldest_index` beside the error.
fn compacted(c: Compacted) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        code::COMPACTED,
        format!(
            "the node holds events from index {} on; re-read with a range and watch from its index + 1",
            c.oldest
        ),
    )
    .with_field("oldest_index", serde_json::json!(c.oldest))
}

/// The response body: the task's chunks, then its last event.
struct WatchBody {
    rx: mpsc::Receiver<Bytes>,
    last: Arc<Mutex<Option<Bytes>>>,
    task: tokio::task::JoinHandle<()>,
    _mark: Option<StreamMark>,
    _admitted: Admitted,
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            // The task has ended; it left its last event before it did.
            Poll::Ready(None) => Poll::Ready(self.last.lock().take().map(|b| Ok(Frame::data(b)))),
        }
    }
}

/// One watch's task.
struct Stream {
    hub: Arc<WatchHub>,
    head: watch::Receiver<Head>,
    watcher: Watcher,
    spec: Spec,
    format: Format,
    stamps: bool,
    tx: mpsc::Sender<Bytes>,
    last: Arc<Mutex<Option<Bytes>>>,
    serving: Option<Serving>,
    metrics: WatchMetrics,
    half_budget: u64,
    /// The first record whose events are not all sent.
    unsent: u64,
    /// Encoded events not sent yet, and how many.
    buf: Vec<u8>,
    buf_events: u64,
    /// What [`Stream::send`] has not sent yet of its chunk.
    rest: Bytes,
}

impl Stream {
    async fn run(mut self) {
        let end = self.stream().await;
        if let End::TooSlow | End::Compacted(_) = end {
            let reason = match end {
                End::TooSlow => code::WATCHER_TOO_SLOW,
                _ => code::COMPACTED,
            };
            self.metrics
                .watchers_cut_total
                .with_label_values(&[reason])
                .inc();
        }
        if let Some((code, message, resume_index)) = last_event(end, self.unsent) {
            // The events it was sending, whole, then the error event.
            let mut out = self.rest.to_vec();
            let event = ErrorEvent {
                kind: "error",
                code,
                message: &message,
                resume_index,
            };
            self.format.frame(&mut out, "error", &event);
            *self.last.lock() = Some(Bytes::from(out));
        }
    }

    /// Streams until the client goes or the stream is cut.
    async fn stream(&mut self) -> End {
        let mut progressed = false;
        let mut idle_at = Instant::now() + self.spec.progress;
        loop {
            let sent = match self.catch_up().await {
                Ok(sent) => sent,
                Err(end) => return end,
            };
            if sent {
                idle_at = Instant::now() + self.spec.progress;
            }
            // Once the history is sent, and after each idle period.
            if !progressed || Instant::now() >= idle_at {
                if let Err(end) = self.progress().await {
                    return end;
                }
                progressed = true;
                idle_at = Instant::now() + self.spec.progress;
            }
            let stop = stopped(self.serving.as_ref());
            tokio::select! {
                biased;
                _ = stop => return End::ShuttingDown,
                _ = self.tx.closed() => return End::Gone,
                _ = self.watcher.changed() => {}
                _ = tokio::time::sleep_until(idle_at) => {}
            }
        }
    }

    /// Sends every event held from the cursor on; whether it sent any.
    async fn catch_up(&mut self) -> Result<bool, End> {
        let mut sent = false;
        loop {
            let records = self
                .watcher
                .read(READ_RECORDS, READ_BYTES)
                // Generations only grow: the same one now means the same
                // one at the read, which then failed for an eviction.
                .map_err(
                    |c| match self.hub.generation() == self.watcher.cursor().generation() {
                        true => End::TooSlow,
                        false => End::Compacted(c.oldest),
                    },
                )?;
            if records.is_empty() {
                break;
            }
            for r in records {
                sent |= self.encode(&r).await?;
            }
        }
        // Every record before the cursor is now encoded.
        sent |= self.buf_events > 0;
        self.flush(self.watcher.cursor().next()).await?;
        Ok(sent)
    }

    /// Encodes record `r`'s events in the range, sending full chunks.
    async fn encode(&mut self, r: &RecordEvents) -> Result<bool, End> {
        let mut sent = false;
        let stamp = self.stamps.then_some(r.ts);
        for e in &r.events {
            if !self.spec.range.contains(&e.key) || !self.spec.caller.may_read(&e.key) {
                continue;
            }
            let json = json_event(e, r.index, stamp, self.spec.prev_value);
            self.format.frame(&mut self.buf, json.kind, &json);
            self.buf_events += 1;
            if self.buf.len() >= CHUNK_BYTES {
                // Record r is not all sent yet.
                self.flush(r.index).await?;
                sent = true;
            }
        }
        Ok(sent)
    }

    async fn progress(&mut self) -> Result<(), End> {
        let index = self.watcher.cursor().next().saturating_sub(1);
        let event = Progress {
            kind: "progress",
            index,
        };
        self.format.frame(&mut self.buf, "progress", &event);
        self.flush(self.watcher.cursor().next()).await
    }

    /// Sends what is encoded; then every record before `unsent` is sent.
    async fn flush(&mut self, unsent: u64) -> Result<(), End> {
        if !self.buf.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut self.buf));
            // Counted as handed over: once begun, a chunk goes out whole
            // (what is left of it precedes the last event).
            self.metrics.events_sent_total.inc_by(self.buf_events);
            self.buf_events = 0;
            self.send(chunk).await?;
        }
        self.unsent = self.unsent.max(unsent);
        Ok(())
    }

    /// Sends `chunk` in pieces of at most [`PIECE_BYTES`]: the channel then
    /// holds about one chunk's memory, however large its events. What is
    /// left of it when the stream ends stays in `rest`, to go out before
    /// the last event.
    async fn send(&mut self, chunk: Bytes) -> Result<(), End> {
        self.rest = chunk;
        while !self.rest.is_empty() {
            let piece = self.rest.slice(..self.rest.len().min(PIECE_BYTES));
            self.send_piece(piece.clone()).await?;
            let _ = self.rest.split_to(piece.len());
        }
        Ok(())
    }

    /// Waits for room in the channel, and while it waits, for the hub to
    /// leave this stream too far behind.
    async fn send_piece(&mut self, piece: Bytes) -> Result<(), End> {
        loop {
            let stop = stopped(self.serving.as_ref());
            tokio::select! {
                biased;
                _ = stop => return Err(End::ShuttingDown),
                permit = self.tx.reserve() => {
                    permit.map_err(|_| End::Gone)?.send(piece);
                    return Ok(());
                }
                changed = self.head.changed() => {
                    changed.map_err(|_| End::Gone)?;
                    self.check_lag()?;
                }
            }
        }
    }

    /// Cut off once the records not sent reach half the budget (more than
    /// the one being sent: a record larger than that alone is streamed).
    /// Checked only while the stream waits for its client: one that keeps
    /// up reads any history the hub holds, however long.
    fn check_lag(&self) -> Result<(), End> {
        if self.hub.generation() != self.watcher.cursor().generation() {
            // A reset, not slowness, took its records.
            return Err(End::Compacted(self.hub.oldest()));
        }
        match self.hub.lag(self.unsent) {
            Err(_) => Err(End::TooSlow),
            Ok(lag) if lag.bytes >= self.half_budget && lag.records > 1 => Err(End::TooSlow),
            Ok(_) => Ok(()),
        }
    }
}

/// Resolves once the server shuts down; never without a server.
async fn stopped(serving: Option<&Serving>) {
    match serving {
        Some(s) => s.stopped().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeyMeta;

    fn params(query: &str) -> WatchParams {
        let uri: axum::http::Uri = format!("/v1/watch?{query}").parse().unwrap();
        axum::extract::Query::<WatchParams>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    fn spec(query: &str) -> Result<Spec, &'static str> {
        parse(&params(query)).map_err(|e| e.code)
    }

    #[test]
    fn the_range_is_one_key_a_prefix_bounds_or_everything() {
        let all = spec("").unwrap();
        assert_eq!(all.range, KeyRange::prefix(b""));
        assert_eq!((all.from_index, all.prev_value), (None, false));
        assert_eq!(all.progress, Duration::from_millis(DEFAULT_PROGRESS_MS));
        let one = spec("key=a/1").unwrap().range;
        assert!(one.contains(b"a/1"));
        assert!(!one.contains(b"a/10") && !one.contains(b"a/") && !one.contains(b"a/2"));
        let p = spec("prefix=a/").unwrap().range;
        assert!(p.contains(b"a/1") && !p.contains(b"b"));
        let r = spec("start=b&end=d").unwrap().range;
        assert!(r.contains(b"b") && r.contains(b"c") && !r.contains(b"d") && !r.contains(b"a"));
        assert!(spec("end=d").unwrap().range.contains(b"a"));
        let s = spec("from_index=7&prev_value=true&progress_ms=100").unwrap();
        assert_eq!((s.from_index, s.prev_value), (Some(7), true));
        assert_eq!(s.progress, Duration::from_millis(100));
        assert_eq!(
            spec(&format!("from_index={MAX_FROM_INDEX}"))
                .unwrap()
                .from_index,
            Some(1 << 63)
        );
        assert_eq!(
            spec("progress_ms=60000").unwrap().progress,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn every_bad_watch_is_invalid_watch() {
        let long = "k".repeat(1025);
        for bad in [
            "key=a&prefix=a",
            "key=a&start=a",
            "key=a&end=b",
            "prefix=a&start=a",
            "prefix=a&end=b",
            "start=b&end=a",
            "key=",
            &format!("key={long}"),
            &format!("prefix={long}"),
            &format!("end={long}"),
            "from_index=0",
            "from_index=9223372036854775809",
            "from_index=-1",
            "from_index=x",
            "from_index=",
            "progress_ms=99",
            "progress_ms=60001",
            "progress_ms=1.5",
        ] {
            assert_eq!(spec(bad), Err(code::INVALID_WATCH), "{bad}");
        }
    }

    #[test]
    fn sse_only_when_accept_asks_for_it() {
        let mut h = HeaderMap::new();
        assert_eq!(Format::of(&h), Format::Ndjson);
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(Format::of(&h), Format::Ndjson);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html, Text/Event-Stream;q=0.9"),
        );
        assert_eq!(Format::of(&h), Format::Sse);
    }

    fn event(kind: EventKind, value: Option<&'static [u8]>, prev: Option<&'static [u8]>) -> Event {
        Event {
            kind,
            key: Bytes::from_static(b"a/1"),
            value: value.map(Bytes::from_static),
            prev: prev.map(Bytes::from_static),
            meta: if kind == EventKind::Put {
                KeyMeta {
                    create_index: 3,
                    mod_index: 12,
                    version: 2,
                }
            } else {
                KeyMeta::default()
            },
        }
    }

    fn json(e: &Event, stamp: Option<Timestamp>, prev: bool) -> serde_json::Value {
        serde_json::to_value(json_event(e, 12, stamp, prev)).unwrap()
    }

    #[test]
    fn events_are_encoded_as_the_design_shows() {
        use serde_json::json as j;
        let put = event(EventKind::Put, Some(b"x"), Some(b"\xff"));
        assert_eq!(
            json(&put, None, false),
            j!({"type": "put", "index": 12, "key": "a/1", "value": "x",
                "create_index": 3, "mod_index": 12, "version": 2})
        );
        assert_eq!(json(&put, None, true)["prev_value"], j!({"base64": "/w=="}));
        let del = event(EventKind::Delete, None, Some(b"y"));
        assert_eq!(
            json(&del, None, false),
            j!({"type": "delete", "index": 12, "key": "a/1"})
        );
        assert_eq!(
            json(&del, None, true),
            j!({"type": "delete", "index": 12, "key": "a/1", "prev_value": "y"})
        );
        let exp = event(EventKind::Expire, None, None);
        assert_eq!(
            json(&exp, None, true),
            j!({"type": "expire", "index": 12, "key": "a/1"})
        );
        let ts = Timestamp {
            physical_ms: 5,
            logical: 1,
            node: 2,
        };
        assert_eq!(
            json(&del, Some(ts), false)["stamp"],
            j!({"physical_ms": 5, "logical": 1, "node": 2})
        );
    }

    #[test]
    fn frames_are_lines_or_server_sent_events() {
        let p = Progress {
            kind: "progress",
            index: 25,
        };
        let mut out = Vec::new();
        Format::Ndjson.frame(&mut out, "progress", &p);
        assert_eq!(out, b"{\"type\":\"progress\",\"index\":25}\n");
        let mut out = Vec::new();
        Format::Sse.frame(&mut out, "progress", &p);
        assert_eq!(
            out,
            b"event: progress\ndata: {\"type\":\"progress\",\"index\":25}\n\n"
        );
    }

    /// The body's next line of NDJSON, or `None` at its end.
    async fn next_line(body: &mut WatchBody, pending: &mut Vec<u8>) -> Option<serde_json::Value> {
        use http_body_util::BodyExt;
        loop {
            if let Some(at) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .expect("a frame in time")?;
            pending.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
    }

    fn record(index: u64, keys: &[&'static str]) -> RecordEvents {
        RecordEvents {
            index,
            ts: Timestamp::default(),
            events: keys
                .iter()
                .map(|k| Event {
                    key: Bytes::from_static(k.as_bytes()),
                    ..event(EventKind::Put, Some(b"v"), None)
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_stream_sends_its_range_then_ends_at_a_reset_and_with_its_body() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let watchers = Watchers::new(2, &metrics.watch);
        let hub = Arc::new(WatchHub::new());
        hub.publish(record(1, &["a/1", "b/1"]));
        hub.publish(record(2, &[]));
        hub.publish(record(3, &["a/2"]));
        let setup = |from, progress_ms| {
            let spec = spec(&format!("prefix=a/&progress_ms={progress_ms}")).unwrap();
            Setup {
                hub: hub.clone(),
                watcher: hub.watch(spec.range.clone(), Some(from)).unwrap(),
                spec,
                format: Format::Ndjson,
                stamps: false,
                serving: None,
                metrics: metrics.watch.clone(),
            }
        };
        let mut body = open(setup(1, 100), watchers.admit().unwrap());
        assert_eq!(metrics.watch.watchers.get(), 1);
        let mut pending = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let e = next_line(&mut body, &mut pending).await.unwrap();
            seen.push((
                e["type"].as_str().unwrap().to_string(),
                e["index"].as_u64().unwrap(),
            ));
        }
        let want = [("put", 1), ("put", 3), ("progress", 3)];
        assert_eq!(seen, want.map(|(t, i)| (t.to_string(), i)));
        hub.publish(record(4, &["a/3"]));
        assert_eq!(
            next_line(&mut body, &mut pending).await.unwrap()["index"],
            4
        );
        hub.reset(40);
        let e = next_line(&mut body, &mut pending).await.unwrap();
        assert_eq!(
            (&e["type"], &e["code"], &e["resume_index"]),
            (&"error".into(), &"compacted".into(), &40.into())
        );
        assert!(
            next_line(&mut body, &mut pending).await.is_none(),
            "it ends there"
        );
        let cut = metrics
            .watch
            .watchers_cut_total
            .with_label_values(&["compacted"]);
        assert_eq!(cut.get(), 1);
        drop(body);
        assert_eq!(metrics.watch.watchers.get(), 0);
        assert_eq!(metrics.watch.events_sent_total.get(), 3);

        // A body dropped while its task waits (here for a minute) takes
        // the task with it.
        hub.publish(record(40, &[]));
        let mut body = open(setup(40, 60_000), watchers.admit().unwrap());
        assert_eq!(
            next_line(&mut body, &mut pending).await.unwrap()["type"],
            "progress"
        );
        let other = watchers.admit().unwrap();
        assert!(watchers.admit().is_err(), "both slots taken");
        drop(other);
        drop(body);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&hub) > 1 {
            assert!(Instant::now() < deadline, "the task outlived its body");
            tokio::task::yield_now().await;
        }
        assert!(watchers.admit().is_ok());
    }

    #[test]
    fn a_stream_ends_with_an_error_event_unless_the_client_went() {
        assert_eq!(last_event(End::Gone, 5), None);
        let (code, _, at) = last_event(End::TooSlow, 5).unwrap();
        assert_eq!((code, at), (code::WATCHER_TOO_SLOW, 5));
        let (code, _, at) = last_event(End::Compacted(40), 5).unwrap();
        assert_eq!((code, at), (code::COMPACTED, 40));
        let (code, _, at) = last_event(End::ShuttingDown, 5).unwrap();
        assert_eq!((code, at), (code::SHUTTING_DOWN, 5));
    }
}
