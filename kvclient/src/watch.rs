//! Watch (docs/DESIGN.md §2.17, §9.1): [`Client::watch`] streams the
//! changes to a key or a range, in log order, and resumes by itself.
//!
//! ```no_run
//! # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
//! use kvclient::{EventKind, WatchRequest};
//! let mut watch = client.watch(WatchRequest::prefix("jobs/").prev_value(true));
//! loop {
//!     let event = watch.next().await?;
//!     if event.kind != EventKind::Progress {
//!         println!("{:?} {} at {}", event.kind, event.key.unwrap_or_default(), event.index);
//!     }
//! }
//! # }
//! ```
//!
//! The stream is NDJSON, one event a line, read incrementally with a
//! bounded line. A connection that breaks, a node that goes away, one
//! silent for three progress intervals, or an error event
//! `watcher_too_slow` or `shutting_down` is left for the next endpoint,
//! with the client's backoff, from where the caller was: after the k-th
//! event of record I, `from_index=I` dropping the first k events of I;
//! after progress P, `from_index=P+1`. So the caller sees every event
//! once, in order. Failures in a row are bounded by the client's retry
//! deadline; `compacted` ends the watch with [`Error::Compacted`].

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::key::{encode_query_value, validate_key};
use crate::range::KeyRange;
use crate::wire::WireValue;
use kvproto::code;

/// `X-KV-Watch-Index`: the node's applied index when the watch started.
pub use kvproto::header::WATCH_INDEX as WATCH_INDEX_HEADER;

/// The progress interval the node uses without `progress_ms` (1 s).
pub const DEFAULT_PROGRESS: Duration = Duration::from_millis(1000);

/// Longest event line taken by default: an event carries a value and its
/// previous value, each up to the node's 4 MiB default, base64 in the
/// worst case (4/3), plus the key and the fields: 2 x 4 MiB x 4/3 is
/// under 11 MiB; the rest is slack for JSON escapes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 << 20;

/// Silent intervals after which a connection is taken for dead: the node
/// sends progress at least every interval.
const SILENT_INTERVALS: u32 = 3;

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchTarget {
    /// One key.
    Key(String),
    /// A prefix or a span of keys.
    Range(KeyRange),
}

/// A watch being built: which keys, from where, with previous values or
/// not. See [`Client::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    /// The keys.
    pub target: WatchTarget,
    /// The first record to stream; `None`: those applied after it starts.
    pub from_index: Option<u64>,
    /// Put, delete and expire events carry the key's previous value.
    pub prev_value: bool,
    /// The node's progress interval (100 ms to 60 s).
    pub progress: Duration,
    /// Longest event line accepted.
    pub max_event_bytes: usize,
    /// How long failures in a row may last before the watch gives up;
    /// `None`: the client's retry deadline.
    pub reconnect_budget: Option<Duration>,
}

impl WatchRequest {
    fn new(target: WatchTarget) -> Self {
        WatchRequest {
            target,
            from_index: None,
            prev_value: false,
            progress: DEFAULT_PROGRESS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            reconnect_budget: None,
        }
    }

    /// One key.
    pub fn key(key: impl Into<String>) -> Self {
        Self::new(WatchTarget::Key(key.into()))
    }

    /// The keys that start with `prefix` (empty: every key).
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self::new(WatchTarget::Range(KeyRange::prefix(prefix)))
    }

    /// Every key.
    pub fn all() -> Self {
        Self::prefix("")
    }

    /// A range of keys, as [`KeyRange`].
    pub fn range(range: KeyRange) -> Self {
        Self::new(WatchTarget::Range(range))
    }

    /// Streams from record `index` on (1 ..= 2^63).
    pub fn from_index(mut self, index: u64) -> Self {
        self.from_index = Some(index);
        self
    }

    /// With the previous values.
    pub fn prev_value(mut self, on: bool) -> Self {
        self.prev_value = on;
        self
    }

    /// The progress interval (the node takes 100 ms to 60 s).
    pub fn progress(mut self, every: Duration) -> Self {
        self.progress = every;
        self
    }

    /// Longest event line accepted (default [`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// How long failures in a row (no node answering, each reconnect
    /// failing) may last before [`Watch::next`] returns the last of them
    /// (default: the client's retry deadline).
    pub fn reconnect_budget(mut self, budget: Duration) -> Self {
        self.reconnect_budget = Some(budget);
        self
    }

    /// Refuses what the node would (400 `invalid_watch`).
    fn check(&self) -> Result<()> {
        let invalid = |what: String| Err(Error::InvalidRequest(format!("watch: {what}")));
        match &self.target {
            WatchTarget::Key(key) => {
                validate_key(key).map_err(|reason| Error::invalid_key(key, reason))?;
            }
            WatchTarget::Range(range) => range.check()?,
        }
        if self
            .from_index
            .is_some_and(|n| !(1..=1u64 << 63).contains(&n))
        {
            return invalid("from_index is not within 1 ..= 2^63".into());
        }
        let ms = self.progress.as_millis();
        if !(100..=60_000).contains(&ms) {
            return invalid(format!("progress of {ms} ms is not within 100 ..= 60000"));
        }
        if self.max_event_bytes == 0 {
            return invalid("max_event_bytes is 0".into());
        }
        Ok(())
    }

    /// The request's path and query, starting at `position` (or without
    /// `from_index`, before the first connection of a watch that has none).
    fn path(&self, position: Option<Position>) -> String {
        let mut params: Vec<(&str, String)> = match &self.target {
            WatchTarget::Key(key) => vec![("key", key.clone())],
            WatchTarget::Range(range) => range
                .params()
                .into_iter()
                .map(|(name, v)| (name, v.to_owned()))
                .collect(),
        };
        if let Some(p) = position {
            params.push(("from_index", p.from_index.to_string()));
        }
        if self.prev_value {
            params.push(("prev_value", "true".into()));
        }
        params.push(("progress_ms", self.progress.as_millis().to_string()));
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode_query_value(v)))
            .collect();
        format!("/v1/watch?{}", query.join("&"))
    }
}

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted (a delete, a prefix delete, a lease revoked).
    Delete,
    /// The key reached its deadline, or its lease expired.
    Expire,
    /// Every event up to `index` has been sent.
    Progress,
}

/// One event of a watch (§2.17).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// What happened.
    pub kind: EventKind,
    /// The record's log index (for progress: up to where all is sent).
    pub index: u64,
    /// The key (not on progress).
    pub key: Option<String>,
    /// The new value (put).
    pub value: Option<Bytes>,
    /// The value before (with `prev_value`, when the key had one).
    pub prev_value: Option<Bytes>,
    /// The key's versions after a put.
    pub create_index: Option<u64>,
    /// The put's record index.
    pub mod_index: Option<u64>,
    /// Writes since the key's creation.
    pub version: Option<u64>,
    /// The event as the node sent it (a masterless node adds `stamp`).
    pub json: Value,
}

/// An event line as JSON: an event, or an error event.
#[derive(Debug, Deserialize)]
struct EventWire {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<WireValue>,
    #[serde(default)]
    prev_value: Option<WireValue>,
    #[serde(default)]
    create_index: Option<u64>,
    #[serde(default)]
    mod_index: Option<u64>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    resume_index: Option<u64>,
    #[serde(default)]
    oldest_index: Option<u64>,
}

/// One line of the stream, decoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    Event(WatchEvent),
    /// An error event: the node ends the stream.
    Error {
        code: String,
        message: String,
        /// `resume_index`, or for `compacted` the first index held.
        index: Option<u64>,
    },
}

impl WatchEvent {
    /// An event from its JSON (§2.17); `Err` says what is wrong with it.
    /// An error event is not an event: the watch handles those.
    pub fn from_json(json: Value) -> std::result::Result<WatchEvent, String> {
        match parse_json(json)? {
            Line::Event(event) => Ok(event),
            Line::Error { code, .. } => Err(format!("an error event ({code})")),
        }
    }
}

/// Decodes one NDJSON line (without its newline).
pub(crate) fn parse_line(line: &[u8]) -> std::result::Result<Line, String> {
    parse_json(serde_json::from_slice(line).map_err(|e| e.to_string())?)
}

fn parse_json(json: Value) -> std::result::Result<Line, String> {
    let wire = EventWire::deserialize(&json).map_err(|e| e.to_string())?;
    if wire.kind == "error" {
        return Ok(Line::Error {
            code: wire.code.unwrap_or_default(),
            message: wire.message.unwrap_or_default(),
            index: wire.oldest_index.or(wire.resume_index),
        });
    }
    let kind = EventKind::deserialize(Value::String(wire.kind.clone()))
        .map_err(|_| format!("unknown event type {:?}", wire.kind))?;
    let index = wire.index.ok_or("an event without an index")?;
    if kind != EventKind::Progress && wire.key.is_none() {
        return Err(format!("a {} event without a key", wire.kind));
    }
    let bytes = |v: Option<WireValue>, key: &str| {
        v.map(|v| v.to_bytes(key).map_err(|e| e.to_string()))
            .transpose()
    };
    let key_name = wire.key.clone().unwrap_or_default();
    Ok(Line::Event(WatchEvent {
        kind,
        index,
        value: bytes(wire.value, &key_name)?,
        prev_value: bytes(wire.prev_value, &key_name)?,
        key: wire.key,
        create_index: wire.create_index,
        mod_index: wire.mod_index,
        version: wire.version,
        json,
    }))
}

/// Where a watch is: the next connection starts at record `from_index`
/// and drops the first `skip` events of it (those already delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) from_index: u64,
    pub(crate) skip: u64,
}

impl Position {
    /// The position after delivering an event of record `index`.
    pub(crate) fn after_event(self, index: u64) -> Position {
        if index == self.from_index {
            Position {
                from_index: index,
                skip: self.skip + 1,
            }
        } else {
            Position {
                from_index: index,
                skip: 1,
            }
        }
    }

    /// The position after progress `index`, or `None` when the progress
    /// is behind what was delivered (nothing to pass on).
    pub(crate) fn after_progress(self, index: u64) -> Option<Position> {
        let next = index.saturating_add(1);
        (next > self.from_index || (next == self.from_index && self.skip == 0)).then_some(
            Position {
                from_index: next,
                skip: 0,
            },
        )
    }
}

/// The resume rule on one connection started at `start`: the first
/// `start.skip` events of record `start.from_index` were delivered before;
/// so were any of an earlier record (which a node never resends, but a
/// stream is checked, not trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipper {
    start: Position,
    seen_at_start: u64,
}

impl Skipper {
    pub(crate) fn new(start: Position) -> Self {
        Skipper {
            start,
            seen_at_start: 0,
        }
    }

    /// Whether an event of record `index` is new to the caller.
    pub(crate) fn admit(&mut self, index: u64) -> bool {
        if index < self.start.from_index {
            return false;
        }
        if index == self.start.from_index {
            self.seen_at_start += 1;
            return self.seen_at_start > self.start.skip;
        }
        true
    }
}

/// One open connection: the body, the bytes of a partial line, and the
/// resume rule it started with.
struct Conn {
    endpoint: String,
    resp: reqwest::Response,
    buf: BytesMut,
    skipper: Skipper,
}

/// A running watch: [`Watch::next`] gives the events one by one.
pub struct Watch {
    client: Client,
    request: WatchRequest,
    /// `None` until the first connection of a watch without `from_index`
    /// learns the node's index.
    position: Option<Position>,
    conn: Option<Conn>,
    endpoint: String,
    /// Failures since the last event, and when the first of them came.
    failures: u32,
    failing_since: Option<Instant>,
    /// Set once the watch ended with an error (returned again after).
    ended: Option<String>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("request", &self.request)
            .field("position", &self.position)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Watches `request`'s keys: a stream of events that resumes by
    /// itself (see the module's documentation). Nothing is sent until the
    /// first [`Watch::next`].
    pub fn watch(&self, request: WatchRequest) -> Watch {
        let position = request.from_index.map(|from_index| Position {
            from_index,
            skip: 0,
        });
        Watch {
            client: self.clone(),
            endpoint: self.stream_endpoint(),
            request,
            position,
            conn: None,
            failures: 0,
            failing_since: None,
            ended: None,
        }
    }
}

impl Watch {
    /// The next event (progress events included). An error ends the
    /// watch: [`Error::Compacted`] (re-read and watch from there), a
    /// request the node refuses, or failures in a row for longer than the
    /// client's retry deadline.
    pub async fn next(&mut self) -> Result<WatchEvent> {
        if let Some(why) = &self.ended {
            return Err(Error::InvalidRequest(format!("the watch has ended: {why}")));
        }
        match self.next_inner().await {
            Ok(event) => Ok(event),
            Err(err) => {
                self.ended = Some(err.to_string());
                self.conn = None;
                Err(err)
            }
        }
    }

    /// Where a new connection would start: `from_index` and how many of
    /// its events it drops. `None` before a watch without `from_index`
    /// has connected.
    pub fn resume_point(&self) -> Option<(u64, u64)> {
        self.position.map(|p| (p.from_index, p.skip))
    }

    /// The node the watch reads from (or will try next).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn next_inner(&mut self) -> Result<WatchEvent> {
        self.request.check()?;
        loop {
            if self.conn.is_none() {
                if let Err(err) = self.connect().await {
                    self.failed(err).await?;
                    continue;
                }
            }
            match self.read_line().await {
                Ok(Some(line)) => match self.take(&line)? {
                    Step::Deliver(event) => {
                        self.failures = 0;
                        self.failing_since = None;
                        return Ok(event);
                    }
                    Step::Skip => {}
                    Step::Resume(err) => self.failed(err).await?,
                },
                // The node ended the stream: resume, as after any failure
                // (a node that keeps ending it must not be hammered).
                Ok(None) => {
                    let endpoint = self.endpoint.clone();
                    self.failed(Error::StreamEnded { endpoint }).await?;
                }
                Err(err) => self.failed(err).await?,
            }
        }
    }

    /// Opens a connection at the current position.
    async fn connect(&mut self) -> Result<()> {
        let path = self.request.path(self.position);
        let resp = self
            .client
            .open_stream(&self.endpoint, &path, "application/x-ndjson")
            .await?;
        if self.position.is_none() {
            let index = resp
                .headers()
                .get(WATCH_INDEX_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| Error::Decode {
                    endpoint: self.endpoint.clone(),
                    what: "watch answer",
                    reason: format!("no {WATCH_INDEX_HEADER} header"),
                })?;
            self.position = Some(Position {
                from_index: index.saturating_add(1),
                skip: 0,
            });
        }
        let start = self.position.unwrap_or(Position {
            from_index: 1,
            skip: 0,
        });
        self.conn = Some(Conn {
            endpoint: self.endpoint.clone(),
            resp,
            buf: BytesMut::new(),
            skipper: Skipper::new(start),
        });
        Ok(())
    }

    /// After a failure: the error again if it is final, or the budget of
    /// failures in a row is spent; else a backoff sleep and the next
    /// endpoint.
    async fn failed(&mut self, err: Error) -> Result<()> {
        self.conn = None;
        if !resumable(&err) {
            return Err(err);
        }
        let (backoff, deadline) = self.client.reconnect_policy();
        let budget = self.request.reconnect_budget.unwrap_or(deadline);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= budget {
            return Err(err);
        }
        let delay = err
            .retry_after()
            .unwrap_or_else(|| backoff.delay(self.failures))
            .min(Duration::from_secs(5));
        self.failures = self.failures.saturating_add(1);
        self.endpoint = self.client.stream_failed(&self.endpoint);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// The next complete line of the open connection, `None` at its end.
    async fn read_line(&mut self) -> Result<Option<Bytes>> {
        let silence = self.request.progress * SILENT_INTERVALS;
        let max = self.request.max_event_bytes;
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(at) = conn.buf.iter().position(|b| *b == b'\n') {
                let mut line = conn.buf.split_to(at + 1);
                line.truncate(at);
                if line.last() == Some(&b'\r') {
                    line.truncate(at - 1);
                }
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line.freeze()));
            }
            if conn.buf.len() > max {
                return Err(Error::ResponseTooLarge {
                    endpoint: conn.endpoint.clone(),
                    limit_bytes: u64::try_from(max).unwrap_or(u64::MAX),
                });
            }
            let chunk = match tokio::time::timeout(silence, conn.resp.chunk()).await {
                Err(_) => {
                    return Err(Error::Stalled {
                        endpoint: conn.endpoint.clone(),
                        silence,
                    })
                }
                Ok(chunk) => {
                    chunk.map_err(|err| Error::from_reqwest(&conn.endpoint, silence, err))?
                }
            };
            match chunk {
                Some(chunk) => conn.buf.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }

    /// Handles one line: the event to pass on, one to skip (already
    /// delivered), or an error event after which the watch resumes.
    fn take(&mut self, line: &[u8]) -> Result<Step> {
        let endpoint = self.endpoint.clone();
        let parsed = parse_line(line).map_err(|reason| Error::Decode {
            endpoint: endpoint.clone(),
            what: "watch event",
            reason,
        })?;
        let Some(position) = self.position else {
            return Ok(Step::Skip);
        };
        let event = match parsed {
            Line::Error { code, index, .. } if code == code::COMPACTED => {
                return Err(Error::Compacted {
                    endpoint,
                    oldest_index: index.unwrap_or(0),
                });
            }
            // Resume from our own position: it is exact, whatever the
            // node's resume_index says. At once: the node is well, the
            // reader was slow.
            Line::Error { code, .. } if code == code::WATCHER_TOO_SLOW => {
                self.conn = None;
                return Ok(Step::Skip);
            }
            // The node is going: elsewhere, after the backoff.
            Line::Error { code, message, .. } if code == code::SHUTTING_DOWN => {
                return Ok(Step::Resume(Error::Server {
                    endpoint,
                    status: 503,
                    code,
                    message,
                    retry_after: None,
                }));
            }
            Line::Error { code, message, .. } => {
                return Err(Error::Server {
                    endpoint,
                    status: 200,
                    code,
                    message,
                    retry_after: None,
                });
            }
            Line::Event(event) => event,
        };
        if event.kind == EventKind::Progress {
            return Ok(match position.after_progress(event.index) {
                Some(next) => {
                    self.position = Some(next);
                    Step::Deliver(event)
                }
                None => Step::Skip,
            });
        }
        let admitted = self
            .conn
            .as_mut()
            .is_some_and(|conn| conn.skipper.admit(event.index));
        if !admitted {
            return Ok(Step::Skip);
        }
        self.position = Some(position.after_event(event.index));
        Ok(Step::Deliver(event))
    }
}

/// What one line means for the caller.
enum Step {
    Deliver(WatchEvent),
    Skip,
    Resume(Error),
}

/// Whether a watch goes on after `err` (on another node, later): what a
/// connection, a node or an index not yet there explains; not a request
/// the node refuses, nor compaction.
fn resumable(err: &Error) -> bool {
    match err {
        Error::Server { code, .. }
            if code == code::FUTURE_INDEX || code == code::TOO_MANY_WATCHERS =>
        {
            true
        }
        Error::Server { status, .. } => crate::error::is_retryable_status(*status),
        other => other.is_retryable(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(from_index: u64, skip: u64) -> Position {
        Position { from_index, skip }
    }

    #[test]
    fn events_parse_as_documented() {
        let put = parse_line(br#"{"type": "put", "index": 12, "key": "a/1", "value": "x", "create_index": 3, "mod_index": 12, "version": 2}"#).unwrap();
        let Line::Event(put) = put else {
            panic!("{put:?}")
        };
        assert_eq!((put.kind, put.index), (EventKind::Put, 12));
        assert_eq!(put.key.as_deref(), Some("a/1"));
        assert_eq!(put.value.as_deref(), Some(&b"x"[..]));
        assert_eq!(
            (put.create_index, put.mod_index, put.version),
            (Some(3), Some(12), Some(2))
        );
        let Ok(Line::Event(expire)) = parse_line(
            br#"{"type": "expire", "index": 20, "key": "a/2", "prev_value": {"base64": "/wA="}}"#,
        ) else {
            panic!()
        };
        assert_eq!(expire.kind, EventKind::Expire);
        assert_eq!(expire.prev_value.as_deref(), Some(&[0xff, 0][..]));
        assert_eq!(expire.value, None);
        let Ok(Line::Event(progress)) = parse_line(br#"{"type": "progress", "index": 25}"#) else {
            panic!()
        };
        assert_eq!(
            (progress.kind, progress.index, progress.key),
            (EventKind::Progress, 25, None)
        );
        assert_eq!(
            parse_line(br#"{"type": "error", "code": "watcher_too_slow", "message": "m", "resume_index": 26}"#).unwrap(),
            Line::Error { code: "watcher_too_slow".into(), message: "m".into(), index: Some(26) }
        );
        assert_eq!(
            parse_line(
                br#"{"type": "error", "code": "compacted", "message": "m", "oldest_index": 40}"#
            )
            .unwrap(),
            Line::Error {
                code: "compacted".into(),
                message: "m".into(),
                index: Some(40)
            }
        );
        // A masterless node's stamp is kept in the event's JSON.
        let Ok(Line::Event(stamped)) = parse_line(br#"{"type": "delete", "index": 3, "key": "k", "stamp": {"physical_ms": 1, "logical": 0, "node": 2}}"#) else {
            panic!()
        };
        assert_eq!(stamped.json["stamp"]["node"], 2);
        for bad in [
            &br#"{"type": "put", "key": "k"}"#[..],
            br#"{"type": "put", "index": 1}"#,
            br#"{"type": "rename", "index": 1, "key": "k"}"#,
            br#"{"index": 1}"#,
            b"not json",
            br#"{"type": "put", "index": 1, "key": "k", "value": {"base64": "!"}}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_position_moves_with_each_event_and_progress() {
        let p = pos(10, 0);
        let p = p.after_event(10);
        assert_eq!(p, pos(10, 1));
        let p = p.after_event(10);
        assert_eq!(p, pos(10, 2));
        let p = p.after_event(14);
        assert_eq!(p, pos(14, 1));
        assert_eq!(p.after_progress(14), Some(pos(15, 0)));
        assert_eq!(p.after_progress(13), None, "behind what was delivered");
        assert_eq!(pos(15, 0).after_progress(14), Some(pos(15, 0)));
        assert_eq!(pos(15, 0).after_progress(20), Some(pos(21, 0)));
    }

    /// The events a resumed connection delivers, given where the last
    /// one left off: (index of each event in stream order) -> delivered.
    fn delivered(start: Position, stream: &[u64]) -> Vec<u64> {
        let mut skipper = Skipper::new(start);
        stream
            .iter()
            .copied()
            .filter(|i| skipper.admit(*i))
            .collect()
    }

    #[test]
    fn a_resume_drops_exactly_the_events_seen_of_its_first_record() {
        // Record 7 made three events; two were seen before the break.
        assert_eq!(delivered(pos(7, 2), &[7, 7, 7, 8, 9]), [7, 8, 9]);
        // All three seen: nothing of 7 again.
        assert_eq!(delivered(pos(7, 3), &[7, 7, 7, 8]), [8]);
        // After a progress: from the next record, nothing dropped.
        assert_eq!(delivered(pos(8, 0), &[8, 8, 9]), [8, 8, 9]);
        // A node that sends an earlier record is not believed.
        assert_eq!(delivered(pos(8, 0), &[6, 7, 8]), [8]);
        // Record 7 has fewer events now than were seen (cannot happen on
        // one log; still nothing is delivered twice).
        assert_eq!(delivered(pos(7, 3), &[7, 9]), [9]);
    }

    #[test]
    fn a_break_anywhere_loses_and_repeats_nothing() {
        // The log: each record's events, in order.
        let log: Vec<u64> = vec![3, 3, 3, 4, 6, 6, 7];
        for cut in 0..=log.len() {
            let mut p = pos(3, 0);
            let mut got = Vec::new();
            let mut first = Skipper::new(p);
            for &i in &log[..cut] {
                if first.admit(i) {
                    got.push(i);
                    p = p.after_event(i);
                }
            }
            // Reconnect: the node streams from p.from_index on.
            let rest: Vec<u64> = log.iter().copied().filter(|i| *i >= p.from_index).collect();
            got.extend(delivered(p, &rest));
            assert_eq!(got, log, "cut after {cut} events");
        }
    }

    #[test]
    fn the_path_names_the_target_and_the_position() {
        let req = WatchRequest::prefix("a/b c").prev_value(true);
        assert_eq!(
            req.path(None),
            "/v1/watch?prefix=a%2Fb%20c&prev_value=true&progress_ms=1000"
        );
        assert_eq!(
            WatchRequest::key("k").path(Some(pos(9, 2))),
            "/v1/watch?key=k&from_index=9&progress_ms=1000"
        );
        assert_eq!(
            WatchRequest::range(KeyRange::between("a", "m"))
                .progress(Duration::from_millis(250))
                .path(None),
            "/v1/watch?start=a&end=m&progress_ms=250"
        );
    }

    #[test]
    fn bad_requests_are_refused_before_sending() {
        assert!(WatchRequest::key("").check().is_err());
        assert!(WatchRequest::all().from_index(0).check().is_err());
        assert!(WatchRequest::all()
            .progress(Duration::from_millis(50))
            .check()
            .is_err());
        assert!(WatchRequest::range(KeyRange::between("b", "a"))
            .check()
            .is_err());
        assert!(WatchRequest::all().from_index(1).check().is_ok());
    }
}
