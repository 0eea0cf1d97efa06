//! The client: endpoint choice, primary following, retries, timeouts.
//!
//! Contract of every call:
//! - it is bounded in time: each attempt by the request timeout, the whole
//!   call (attempts, backoff sleeps, redirects) by the retry deadline;
//! - a 307/308 from a secondary moves the client to the primary it names
//!   (`X-KV-Primary`, else `Location`), without spending a retry, and the
//!   client keeps using that primary for later calls until it fails;
//! - connection failures, timeouts and "not now" statuses (429/502/503/504)
//!   are retried with backoff on the next endpoint, honouring `Retry-After`;
//!   everything else is returned at once;
//! - the last error is returned unchanged when the budget runs out, so
//!   [`Error::is_retryable`] still tells what kind of failure it was.
//!
//! Retrying is only sound because every call here is idempotent: a PUT,
//! DELETE or bulk write repeated with the same content leaves the same state
//! (it may get a later log index, which is harmless).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::backoff::Backoff;
use crate::error::{is_retryable_status, Error, Result};
use crate::key::{encode_query_value, path_for_key, validate_key};
use crate::tls::TlsFiles;
use crate::wire::{
    BulkOutcome, BulkRequest, DeleteOutcome, ErrorBody, IndexResponse, PreconditionBody, SearchHit,
    SearchPage, SimilarTo, Status,
};
use kvproto::code::{COMPACTED, KEY_NOT_FOUND, LEASE_NOT_FOUND, PRECONDITION_FAILED};
use kvproto::header::{PRIMARY as PRIMARY_HEADER, RETRY_AFTER_MS as RETRY_AFTER_MS_HEADER};

/// Shortest time worth starting another attempt with.
const MIN_USEFUL_ATTEMPT: Duration = Duration::from_millis(20);

/// Where a kvd listens by default (docs/DESIGN.md §2).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8765";

/// Longest server error message kept in an [`Error::Server`]: errors are
/// printed on one line, and a misbehaving proxy could send a whole page.
const MAX_ERROR_MESSAGE_CHARS: usize = 300;

/// Configures and builds a [`Client`]. Every limit has a default that suits a
/// local three-node cluster; see each setter for why.
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    limits: Limits,
    tls: TlsFiles,
    token: Option<Token>,
}

/// A bearer token; never printed (`Debug` shows only that one is set).
#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The limits a client keeps to; each has a setter on [`ClientBuilder`]
/// that says why its default is what it is.
#[derive(Debug, Clone)]
struct Limits {
    request_timeout: Duration,
    connect_timeout: Duration,
    max_retries: u32,
    retry_deadline: Duration,
    backoff: Backoff,
    max_redirects: u32,
    max_retry_after: Duration,
    max_response_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_retries: 8,
            retry_deadline: Duration::from_secs(15),
            backoff: Backoff::default(),
            max_redirects: 5,
            max_retry_after: Duration::from_secs(5),
            max_response_bytes: 64 << 20,
        }
    }
}

/// One builder method per limit: `$name(value)` sets `limits.$name`.
macro_rules! limit_setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.limits.$name = value;
            self
        }
    )*};
}

impl ClientBuilder {
    /// A builder with default limits and no endpoints.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one endpoint (base URL such as `http://127.0.0.1:8765`; a missing
    /// `http://` is added). Order matters: the first is tried first.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Adds several endpoints, in order.
    pub fn endpoints<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Trusts the CA certificates of this PEM file (and no others) for
    /// `https://` endpoints.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca = Some(path.into());
        self
    }

    /// Presents this client certificate chain and key (PEM files) when a
    /// node asks for one.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls.cert = Some(cert.into());
        self.tls.key = Some(key.into());
        self
    }

    /// Sets every TLS file at once.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = files;
        self
    }

    /// Sends this bearer token (`Authorization: Bearer <token>`) with every
    /// request: a node with a token file asks for one (docs/DESIGN.md §2.18).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into()));
        self
    }

    limit_setters! {
        /// Limit for one attempt, from connecting until the whole response
        /// body has arrived (default 5 s). It is what turns a stopped
        /// (SIGSTOP) node into an error instead of a hang.
        request_timeout: Duration;
        /// Limit for establishing a TCP connection (default 1 s). Shorter
        /// than the request timeout so an unreachable node is skipped
        /// quickly.
        connect_timeout: Duration;
        /// Retries after the first attempt (default 8; 0 disables
        /// retrying). A request the server refused unapplied with a
        /// `Retry-After` (writes paused for a mode switch or handover) is
        /// retried until the deadline without counting, unless this is 0.
        max_retries: u32;
        /// Time budget for a whole call including retries, backoff and
        /// redirects (default 15 s, enough to ride out a failover). No
        /// attempt is started, and no attempt runs, past it.
        retry_deadline: Duration;
        /// Delay policy between retries.
        backoff: Backoff;
        /// Redirects followed in a row before giving up with
        /// [`Error::RedirectLoop`] (default 5). A correct cluster needs one.
        max_redirects: u32;
        /// Cap on a server's `Retry-After` (default 5 s), so a wrong header
        /// cannot park a client for an hour.
        max_retry_after: Duration;
        /// Largest response body accepted (default 64 MiB; kvd's default
        /// value limit is 4 MiB).
        max_response_bytes: u64;
    }

    /// Validates the configuration and builds the client.
    pub fn build(self) -> Result<Client> {
        let mut configured: Vec<String> = Vec::with_capacity(self.endpoints.len());
        for raw in &self.endpoints {
            let url = normalize_endpoint(raw)?;
            // Duplicates would skew rotation towards one node.
            if !configured.contains(&url) {
                configured.push(url);
            }
        }
        if configured.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let limits = self.limits;
        if limits.request_timeout.is_zero() || limits.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "timeouts must be greater than zero".into(),
            ));
        }
        if limits.retry_deadline.is_zero() {
            return Err(Error::InvalidConfig(
                "the retry deadline must be greater than zero".into(),
            ));
        }
        let http = reqwest::Client::builder()
            // Redirects are handled here, because following one means
            // switching the preferred node, and reqwest would follow a 307
            // to anywhere without telling us.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment (HTTP_PROXY) would silently route
            // cluster traffic, loopback included, through it.
            .no_proxy()
            .connect_timeout(limits.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("kvclient/", env!("CARGO_PKG_VERSION")));
        let http = match &self.token {
            Some(token) => http.default_headers(bearer(token)?),
            None => http,
        };
        let http = self
            .tls
            .apply(http)
            .map_err(|err| Error::InvalidConfig(format!("TLS: {err}")))?
            .build()
            .map_err(|err| Error::InvalidConfig(format!("HTTP client: {err}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                endpoints: Endpoints {
                    configured,
                    cursor: Mutex::new(Cursor::default()),
                },
                limits,
            }),
        })
    }
}

/// The `Authorization` header of `token`, marked sensitive (kept out of
/// logs and HTTP/2 compression tables).
pub(crate) fn bearer_headers(
    token: &str,
) -> std::result::Result<reqwest::header::HeaderMap, String> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token is not printable ASCII".to_string())?;
    value.set_sensitive(true);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(headers)
}

fn bearer(token: &Token) -> Result<reqwest::header::HeaderMap> {
    bearer_headers(&token.0).map_err(Error::InvalidConfig)
}

/// A kvstore client over a list of nodes. Cheap to clone; clones share
/// connections and the knowledge of who the primary is.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    endpoints: Endpoints,
    limits: Limits,
}

/// A complete HTTP answer, body read, as returned by [`Client::request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Base URL of the node that answered.
    pub endpoint: String,
    /// Status code (never a redirect or a retryable status: those are handled).
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RawResponse {
    /// `Ok(self)` for 2xx, the server's error otherwise.
    pub fn error_for_status(self) -> Result<Self> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(server_error(&self))
        }
    }
}

/// One request as the retry loop sends it.
pub(crate) struct Call<'a> {
    pub(crate) method: Method,
    /// Path and query, starting with `/`.
    pub(crate) path: &'a str,
    /// The body and its content type.
    pub(crate) body: Option<(Bytes, &'static str)>,
    /// Headers beside the content type (`If-Match`, ...).
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) retry: Retry,
}

/// Which failures a call may be retried after (docs/DESIGN.md §9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Any retryable failure: repeating the request leaves the same state
    /// (reads, plain puts and deletes, bulk writes, transactions without
    /// compares).
    Idempotent,
    /// Only a failure that wrote nothing. A conditional write retried after
    /// an unknown outcome could be refused because its first attempt
    /// succeeded, which would tell the caller the opposite of what
    /// happened; that failure is returned instead
    /// ([`Error::outcome_unknown`]).
    UnlessMaybeWritten,
}

impl Retry {
    /// Whether the loop may try again after `err`.
    pub(crate) fn allows(self, err: &Error) -> bool {
        err.is_retryable() && !(self == Retry::UnlessMaybeWritten && err.outcome_unknown())
    }
}

impl Client {
    /// Starts a builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// A client with default limits over the given endpoints.
    pub fn new<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::builder().endpoints(endpoints).build()
    }

    /// The configured endpoints, normalised (scheme added, trailing `/` cut).
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints.configured
    }

    /// The endpoint the next call will try first: the primary learned from a
    /// redirect, else the current configured endpoint.
    pub fn current_endpoint(&self) -> String {
        self.inner.endpoints.current()
    }

    /// The value of `key`, or `None` when the node answers 404 `key_not_found`.
    ///
    /// Reads are served by whichever node is asked (docs/DESIGN.md §4), so on a
    /// secondary this may lag the primary; see [`Client::get_consistent`].
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.get_inner(path_for_key(key)?).await
    }

    /// A linearizable read: `?consistent=true` makes the primary confirm its
    /// epoch with a majority before answering. A secondary redirects such a
    /// read to the primary, which this client follows.
    pub async fn get_consistent(&self, key: &str) -> Result<Option<Bytes>> {
        self.get_inner(format!("{}?consistent=true", path_for_key(key)?))
            .await
    }

    async fn get_inner(&self, path: String) -> Result<Option<Bytes>> {
        Ok(self.get_answer(&path).await?.map(|resp| resp.body))
    }

    /// The 200 answer to a GET of a key, or `None` for 404 `key_not_found`.
    pub(crate) async fn get_answer(&self, path: &str) -> Result<Option<RawResponse>> {
        let resp = self.execute(Method::GET, path, None).await?;
        match resp.status {
            // Only the server's own "no such key" means absent; any other 404
            // (say, a wrong base URL) is an error, not an empty answer.
            StatusCode::NOT_FOUND => match server_error(&resp) {
                Error::Server { code, .. } if code == KEY_NOT_FOUND => Ok(None),
                other => Err(other),
            },
            status if status.is_success() => Ok(Some(resp)),
            _ => Err(server_error(&resp)),
        }
    }

    /// Stores `value` under `key`; returns the write's log index once the
    /// server reports it durable (and committed, in a cluster).
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<u64> {
        let path = path_for_key(key)?;
        let body = (value.into(), "application/octet-stream");
        let resp = self.execute(Method::PUT, &path, Some(body)).await?;
        let index: IndexResponse = decode_success(resp, "set response")?;
        Ok(index.index)
    }

    /// Deletes `key`. Deleting an absent key is not an error: the outcome
    /// says whether anything was there.
    pub async fn delete(&self, key: &str) -> Result<DeleteOutcome> {
        let path = path_for_key(key)?;
        let resp = self.execute(Method::DELETE, &path, None).await?;
        decode_success(resp, "delete response")
    }

    /// Writes all items atomically: after the call, or after a crash, either
    /// every item is visible or none is. UTF-8 values travel as JSON strings,
    /// others as base64. Every key is validated before anything is sent.
    pub async fn bulk_set(&self, items: &[(String, Bytes)]) -> Result<BulkOutcome> {
        self.bulk(&BulkRequest::from_pairs(items)).await
    }

    /// Writes a bulk document as it is, items with a TTL, a lease or
    /// keep-TTL too ([`crate::BulkItem::with_expiry`], docs/DESIGN.md
    /// §2.15), atomically as [`Client::bulk_set`]. A lease that is not
    /// alive is [`Error::LeaseNotFound`] and nothing is written.
    pub async fn bulk(&self, request: &BulkRequest) -> Result<BulkOutcome> {
        for item in &request.items {
            validate_key(&item.key).map_err(|reason| Error::invalid_key(&item.key, reason))?;
            let set = [
                item.expiry.ttl_ms.is_some(),
                item.expiry.lease.is_some(),
                item.expiry.keep_ttl,
            ];
            if set.iter().filter(|s| **s).count() > 1 {
                return Err(Error::InvalidRequest(format!(
                    "bulk item {:?} has more than one of ttl_ms, lease and keep_ttl",
                    item.key
                )));
            }
            if let Some(ms) = item.expiry.ttl_ms {
                crate::expiry::ttl_millis(Duration::from_millis(ms))?;
            }
        }
        // Invariant: serialising strings and a Vec into memory cannot fail
        // (serde_json fails only on I/O errors and non-string map keys).
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(request).expect("bulk request serialises");
        let body = (Bytes::from(json), "application/json");
        let resp = self.execute(Method::POST, "/v1/bulk", Some(body)).await?;
        decode_success(resp, "bulk response")
    }

    /// The answering node's status document (`GET /v1/status`).
    pub async fn status(&self) -> Result<Status> {
        let resp = self.execute(Method::GET, "/v1/status", None).await?;
        decode_success(resp, "status")
    }

    /// Full-text search (server started with `--index`), best hit first.
    pub async fn search(&self, query: &str, limit: usize) -> Result<Vec<SearchHit>> {
        Ok(self.search_page(query, limit, 0).await?.hits)
    }

    /// One page of a full-text search: `limit` hits after the best `offset`.
    pub async fn search_page(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<SearchPage> {
        let path = format!(
            "/v1/search?q={}&limit={limit}&offset={offset}",
            encode_query_value(query)
        );
        let resp = self.execute(Method::GET, &path, None).await?;
        decode_success(resp, "search response")
    }

    /// TF-IDF cosine similarity to `query` (server started with `--index`),
    /// best first.
    pub async fn similar(&self, query: &str, top_k: usize) -> Result<Vec<SearchHit>> {
        Ok(self
            .similar_page(SimilarTo::Text(query), top_k, 0)
            .await?
            .hits)
    }

    /// Keys whose values are most like `key`'s value, best first (`key`
    /// itself left out).
    pub async fn similar_to_key(&self, key: &str, top_k: usize) -> Result<Vec<SearchHit>> {
        Ok(self.similar_page(SimilarTo::Key(key), top_k, 0).await?.hits)
    }

    /// One page of a similarity query: `top_k` hits after the best `offset`.
    pub async fn similar_page(
        &self,
        to: SimilarTo<'_>,
        top_k: usize,
        offset: usize,
    ) -> Result<SearchPage> {
        let target = match to {
            SimilarTo::Text(q) => format!("q={}", encode_query_value(q)),
            SimilarTo::Key(k) => {
                validate_key(k).map_err(|reason| Error::invalid_key(k, reason))?;
                format!("key={}", encode_query_value(k))
            }
        };
        let path = format!("/v1/similar?{target}&top_k={top_k}&offset={offset}");
        let resp = self.execute(Method::GET, &path, None).await?;
        decode_success(resp, "similar response")
    }

    /// Any request, with the same primary following, retries and limits as
    /// the typed calls. For endpoints this crate has no method for (admin,
    /// debug parameters such as `?debug_flaky=`). Only use it for idempotent
    /// requests: it may be sent more than once. Error statuses other than the
    /// retryable ones are returned as a response; see
    /// [`RawResponse::error_for_status`].
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        content_type: Option<&'static str>,
    ) -> Result<RawResponse> {
        let path = if path_and_query.starts_with('/') {
            path_and_query.to_owned()
        } else {
            format!("/{path_and_query}")
        };
        let body = body.map(|b| (b, content_type.unwrap_or("application/octet-stream")));
        self.execute(method, &path, body).await
    }

    /// The retry/redirect loop for an idempotent request without extra
    /// headers (every call but the conditional ones).
    pub(crate) async fn execute(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<RawResponse> {
        self.send(Call {
            method,
            path,
            body,
            headers: Vec::new(),
            retry: Retry::Idempotent,
        })
        .await
    }

    /// The retry/redirect loop shared by every call. Returns the first answer
    /// that is neither a redirect nor a retryable status.
    pub(crate) async fn send(&self, call: Call<'_>) -> Result<RawResponse> {
        let inner = &*self.inner;
        let deadline = Instant::now() + inner.limits.retry_deadline;
        let mut target = inner.endpoints.current();
        let mut retries: u32 = 0;
        // Redirects in a row since the last failure. Reset on retry, because
        // during a failover "redirect to the old primary, which is down" is
        // legitimately repeated and is bounded by the retry budget instead.
        let mut hops: u32 = 0;
        let mut last_err: Option<Error> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // The floor keeps reqwest from being handed a zero timeout when a
            // redirect arrives just as the budget ends; such an attempt simply
            // times out.
            let timeout = inner
                .limits
                .request_timeout
                .min(remaining)
                .max(Duration::from_millis(1));
            let outcome = self.attempt(&target, &call, timeout).await;
            let (err, hint) = match outcome {
                Ok(resp) if is_redirect(resp.status) => {
                    hops += 1;
                    match redirect_target(&resp.headers, call.path) {
                        Some(next) if hops > inner.limits.max_redirects => {
                            return Err(Error::RedirectLoop { hops, last: next });
                        }
                        Some(next) => {
                            inner.endpoints.follow(&next);
                            target = next;
                            continue;
                        }
                        None => (
                            Error::NoPrimary {
                                endpoint: resp.endpoint,
                                status: resp.status.as_u16(),
                            },
                            None,
                        ),
                    }
                }
                Ok(resp) if is_retryable_status(resp.status.as_u16()) => {
                    let hint = primary_hint(&resp.headers);
                    (server_error(&resp), hint)
                }
                Ok(resp) => return Ok(resp),
                Err(err) => (err, None),
            };
            if !call.retry.allows(&err) {
                return Err(err);
            }
            // An attempt cut short by the call's deadline that times out
            // says less than the failure before it (a refused connection,
            // the server's 503): report that one.
            if matches!(err, Error::Timeout { .. }) && timeout < inner.limits.request_timeout {
                return Err(last_err.unwrap_or(err));
            }
            let Some(delay) = self.retry_delay(&err, retries, deadline) else {
                return Err(err);
            };
            retries += 1;
            hops = 0;
            target = inner.endpoints.failed(&target, hint);
            last_err = Some(err);
            tokio::time::sleep(delay).await;
        }
    }

    /// Opens a streaming GET (a watch) on `endpoint`: the answer's head
    /// within the request timeout, the body left to the caller, who bounds
    /// its reads. An error status is read (bounded) into its error.
    pub(crate) async fn open_stream(
        &self,
        endpoint: &str,
        path: &str,
        accept: &'static str,
    ) -> Result<reqwest::Response> {
        let limits = &self.inner.limits;
        let url = format!("{endpoint}{path}");
        let send = self
            .inner
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, accept)
            .send();
        let resp = match tokio::time::timeout(limits.request_timeout, send).await {
            Err(_) => {
                return Err(Error::Stalled {
                    endpoint: endpoint.to_owned(),
                    silence: limits.request_timeout,
                })
            }
            Ok(sent) => {
                sent.map_err(|err| Error::from_reqwest(endpoint, limits.request_timeout, err))?
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        // An error body is one small JSON object; a few KiB tell it all.
        let mut body = BytesMut::new();
        let mut resp = resp;
        while body.len() < 64 << 10 {
            match tokio::time::timeout(limits.request_timeout, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        Err(server_error(&RawResponse {
            endpoint: endpoint.to_owned(),
            status,
            headers,
            body: body.freeze(),
        }))
    }

    /// The endpoint to open a stream on first.
    pub(crate) fn stream_endpoint(&self) -> String {
        self.inner.endpoints.current()
    }

    /// Records that a stream on `endpoint` failed; the next to try.
    pub(crate) fn stream_failed(&self, endpoint: &str) -> String {
        self.inner.endpoints.failed(endpoint, None)
    }

    /// The backoff delay before reconnect `retry` and the budget for
    /// failures in a row (the retry deadline).
    pub(crate) fn reconnect_policy(&self) -> (Backoff, Duration) {
        (self.inner.limits.backoff, self.inner.limits.retry_deadline)
    }

    /// How long to wait before retrying after `err`, or `None` when the
    /// budget does not allow another attempt.
    fn retry_delay(&self, err: &Error, retries: u32, deadline: Instant) -> Option<Duration> {
        let limits = &self.inner.limits;
        // A server that refused the request outright and said when to come
        // back (writes paused for a mode switch or a handover, no primary
        // yet) is retried until the deadline: nothing was written, so this
        // cannot apply a write twice. Everything else, including a commit
        // timeout (the write may still commit), counts against
        // `max_retries`, and `max_retries(0)` means no retry at all.
        let paused = err.retry_after().is_some() && err.was_not_applied();
        if retries >= limits.max_retries && !(paused && limits.max_retries > 0) {
            return None;
        }
        let delay = match err.retry_after() {
            Some(asked) => asked.min(limits.max_retry_after),
            None => limits.backoff.delay(retries),
        };
        // An attempt with almost no time left can only time out, and its
        // Timeout would hide the real reason (say, the server's 503).
        if Instant::now() + delay + MIN_USEFUL_ATTEMPT >= deadline {
            return None;
        }
        Some(delay)
    }

    /// One HTTP exchange with one node, body included, within `timeout`.
    async fn attempt(
        &self,
        endpoint: &str,
        call: &Call<'_>,
        timeout: Duration,
    ) -> Result<RawResponse> {
        let url = format!("{endpoint}{}", call.path);
        let mut req = self
            .inner
            .http
            .request(call.method.clone(), url)
            .timeout(timeout);
        if let Some((bytes, content_type)) = &call.body {
            req = req.header(CONTENT_TYPE, *content_type).body(bytes.clone());
        }
        for (name, value) in &call.headers {
            req = req.header(name, value);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|err| Error::from_reqwest(endpoint, timeout, err))?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let limit = self.inner.limits.max_response_bytes;
        if resp.content_length().is_some_and(|len| len > limit) {
            return Err(Error::ResponseTooLarge {
                endpoint: endpoint.to_owned(),
                limit_bytes: limit,
            });
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|err| Error::from_reqwest(endpoint, timeout, err))?
        {
            // u64 from usize cannot fail on supported (<= 64-bit) targets.
            let len = u64::try_from(buf.len() + chunk.len()).unwrap_or(u64::MAX);
            if len > limit {
                return Err(Error::ResponseTooLarge {
                    endpoint: endpoint.to_owned(),
                    limit_bytes: limit,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(RawResponse {
            endpoint: endpoint.to_owned(),
            status,
            headers,
            body: buf.freeze(),
        })
    }
}

/// Which node to ask next. Shared by all clones of a client; the lock is
/// never held across an await.
#[derive(Debug)]
struct Endpoints {
    /// Invariant: non-empty (checked in [`ClientBuilder::build`]).
    configured: Vec<String>,
    cursor: Mutex<Cursor>,
}

#[derive(Debug, Default)]
struct Cursor {
    /// Index into `configured` of the node to try when no primary is known.
    /// Invariant: `< configured.len()`.
    next: usize,
    /// The primary learned from a redirect; preferred until it fails. It may
    /// be a URL that is not among the configured endpoints.
    primary: Option<String>,
}

impl Endpoints {
    fn lock(&self) -> MutexGuard<'_, Cursor> {
        // The cursor is two plain fields that are never left half-updated, so
        // a panic elsewhere while holding the lock cannot corrupt it.
        self.cursor.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> String {
        let cursor = self.lock();
        self.pick(&cursor)
    }

    fn pick(&self, cursor: &Cursor) -> String {
        match &cursor.primary {
            Some(primary) => primary.clone(),
            None => self.configured[cursor.next % self.configured.len()].clone(),
        }
    }

    fn follow(&self, primary: &str) {
        self.lock().primary = Some(primary.to_owned());
    }

    /// Records that `endpoint` failed and returns the next node to try: the
    /// primary named by the failing node if it named one, else the next
    /// configured endpoint.
    fn failed(&self, endpoint: &str, hint: Option<String>) -> String {
        let mut cursor = self.lock();
        if cursor.primary.as_deref() == Some(endpoint) {
            cursor.primary = None;
        }
        // Only advance when the failed node is the current one: a concurrent
        // call may already have moved on, and advancing again would skip a
        // healthy node.
        if self.configured[cursor.next] == endpoint {
            cursor.next = (cursor.next + 1) % self.configured.len();
        }
        if let Some(hint) = hint.filter(|h| h != endpoint) {
            cursor.primary = Some(hint);
        }
        self.pick(&cursor)
    }
}

/// Turns a user- or server-supplied base URL into the canonical form used to
/// build request URLs: `http://host:port[/prefix]`, no trailing slash.
pub(crate) fn normalize_endpoint(raw: &str) -> Result<String> {
    let invalid = |reason: &str| Error::InvalidEndpoint {
        url: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|err| invalid(&err.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid("only http:// and https:// endpoints are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a base URL cannot have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn is_redirect(status: StatusCode) -> bool {
    // Only the redirects that keep method and body: a 301/302/303 would turn
    // a PUT into a GET, which is never what a kvd means.
    status == StatusCode::TEMPORARY_REDIRECT || status == StatusCode::PERMANENT_REDIRECT
}

/// The primary named by `X-KV-Primary`, if it is a usable base URL.
fn primary_hint(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(PRIMARY_HEADER)?.to_str().ok()?.trim();
    if value.is_empty() {
        return None;
    }
    normalize_endpoint(value).ok()
}

/// Where a redirect points, as a base URL. `X-KV-Primary` wins because it is
/// exactly a base URL; `Location` is a full request URL, from which the
/// request path is cut (or, if it was rewritten, the origin is kept).
fn redirect_target(headers: &HeaderMap, path: &str) -> Option<String> {
    if let Some(primary) = primary_hint(headers) {
        return Some(primary);
    }
    let location = headers.get(LOCATION)?.to_str().ok()?.trim();
    // A relative Location names no other node.
    let url = reqwest::Url::parse(location).ok()?;
    if let Some(base) = url.as_str().strip_suffix(path) {
        if let Ok(base) = normalize_endpoint(base) {
            return Some(base);
        }
    }
    normalize_endpoint(&url.origin().ascii_serialization()).ok()
}

/// Reads kvd's `X-KV-Retry-After-Ms`, else `Retry-After` in its
/// delta-seconds form (what kvd sends). The HTTP-date form is ignored:
/// backoff takes over.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get(RETRY_AFTER_MS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let secs = value.parse::<f64>().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Builds the error for a non-success answer from its JSON error body, or
/// from the status and a body prefix when the body is not one.
pub(crate) fn server_error(resp: &RawResponse) -> Error {
    let status = resp.status.as_u16();
    let fallback_message = || {
        let text = String::from_utf8_lossy(&resp.body);
        let text = one_line(&text);
        if text.is_empty() {
            resp.status
                .canonical_reason()
                .unwrap_or("unknown status")
                .to_owned()
        } else {
            text
        }
    };
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&resp.body) {
        Ok(body) => {
            let code = if body.error.code.is_empty() {
                format!("http_{status}")
            } else {
                body.error.code
            };
            let message = one_line(&body.error.message);
            let message = if message.is_empty() {
                fallback_message()
            } else {
                message
            };
            (code, message)
        }
        Err(_) => (format!("http_{status}"), fallback_message()),
    };
    if status == 404 && code == LEASE_NOT_FOUND {
        return Error::LeaseNotFound {
            endpoint: resp.endpoint.clone(),
            message,
        };
    }
    if status == 410 && code == COMPACTED {
        // The oldest index held rides beside the error (§2.17).
        let oldest_index = serde_json::from_slice::<serde_json::Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("oldest_index").and_then(serde_json::Value::as_u64))
            .unwrap_or(0);
        return Error::Compacted {
            endpoint: resp.endpoint.clone(),
            oldest_index,
        };
    }
    if status == 412 && code == PRECONDITION_FAILED {
        // The key's state rides beside the error (docs/DESIGN.md §2.12);
        // a 412 without it is still a failed precondition, of a key whose
        // state the node did not say, so it is the plain server error.
        if let Ok(body) = serde_json::from_slice::<PreconditionBody>(&resp.body) {
            return Error::PreconditionFailed {
                endpoint: resp.endpoint.clone(),
                message,
                current: body.current,
            };
        }
    }
    Error::Server {
        endpoint: resp.endpoint.clone(),
        status,
        code,
        message,
        retry_after: parse_retry_after(&resp.headers),
    }
}

/// Collapses whitespace (newlines included) and caps the length, because
/// errors are printed as one line.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.chars().count() > MAX_ERROR_MESSAGE_CHARS {
        out = out.chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
        out.push_str("...");
    }
    out
}

/// Decodes a 2xx JSON body, or turns an error status into an error.
pub(crate) fn decode_success<T: DeserializeOwned>(
    resp: RawResponse,
    what: &'static str,
) -> Result<T> {
    let resp = resp.error_for_status()?;
    serde_json::from_slice(&resp.body).map_err(|err| Error::Decode {
        endpoint: resp.endpoint,
        what,
        reason: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn endpoints_are_normalised() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:8765").unwrap(),
            "http://127.0.0.1:8765"
        );
        assert_eq!(
            normalize_endpoint(" http://Node0:8765/ ").unwrap(),
            "http://node0:8765"
        );
        assert_eq!(
            normalize_endpoint("http://h:1/prefix/").unwrap(),
            "http://h:1/prefix"
        );
        for bad in ["", "ws://h:1", "http://", "http://h:1/?x=1", "ftp://h"] {
            let err = normalize_endpoint(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_endpoint", "{bad:?}");
        }
    }

    #[test]
    fn redirect_prefers_primary_header() {
        let h = headers(&[
            ("x-kv-primary", "http://127.0.0.1:8766"),
            ("location", "http://127.0.0.1:9999/v1/kv/a"),
        ]);
        assert_eq!(
            redirect_target(&h, "/v1/kv/a").as_deref(),
            Some("http://127.0.0.1:8766")
        );
    }

    #[test]
    fn redirect_falls_back_to_location() {
        let h = headers(&[("location", "http://10.0.0.2:8766/kv/v1/kv/a%20b")]);
        assert_eq!(
            redirect_target(&h, "/v1/kv/a%20b").as_deref(),
            Some("http://10.0.0.2:8766/kv"),
            "the path prefix before the request path is kept"
        );
        let h = headers(&[("location", "http://10.0.0.2:8766/v1/kv/rewritten")]);
        assert_eq!(
            redirect_target(&h, "/v1/kv/a%20b").as_deref(),
            Some("http://10.0.0.2:8766"),
            "a rewritten path falls back to the origin"
        );
        let h = headers(&[("x-kv-primary", ""), ("location", "/v1/kv/a")]);
        assert_eq!(redirect_target(&h, "/v1/kv/a"), None);
        assert_eq!(redirect_target(&HeaderMap::new(), "/v1/kv/a"), None);
    }

    #[test]
    fn retry_after_seconds() {
        let parse = |v: &'static str| parse_retry_after(&headers(&[("retry-after", v)]));
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse("0.25"), Some(Duration::from_millis(250)));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(&HeaderMap::new()), None);
    }

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            endpoint: "http://n0".into(),
            status: StatusCode::from_u16(status).unwrap(),
            headers: headers(&[("retry-after", "1")]),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn server_errors_decode_json_body() {
        let err = server_error(&raw(
            413,
            r#"{"error":{"code":"value_too_large","message":"value is 5 MiB,\nlimit 4 MiB"}}"#,
        ));
        assert_eq!(err.code(), "value_too_large");
        assert_eq!(err.status(), Some(413));
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "http://n0 answered 413: value is 5 MiB, limit 4 MiB (value_too_large)"
        );
    }

    #[test]
    fn server_errors_survive_non_json_bodies() {
        let err = server_error(&raw(503, "paused\n"));
        assert_eq!(err.code(), "http_503");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
        assert!(err.to_string().contains("paused"));
        let err = server_error(&raw(502, ""));
        assert!(err.to_string().contains("Bad Gateway"), "{err}");
        let long = server_error(&raw(500, &"x".repeat(5000)));
        assert!(long.to_string().len() < 400);
    }

    #[test]
    fn a_412_with_the_keys_state_is_a_failed_precondition() {
        let err = server_error(&raw(
            412,
            r#"{"error":{"code":"precondition_failed","message":"mod_index is 9"},
               "current":{"exists":true,"create_index":3,"mod_index":9,"version":2}}"#,
        ));
        match &err {
            Error::PreconditionFailed {
                endpoint,
                message,
                current,
            } => {
                assert_eq!(
                    (endpoint.as_str(), message.as_str()),
                    ("http://n0", "mod_index is 9")
                );
                assert_eq!(
                    (current.exists, current.mod_index, current.version),
                    (true, 9, 2)
                );
            }
            other => panic!("{other:?}"),
        }
        let absent = server_error(&raw(
            412,
            r#"{"error":{"code":"precondition_failed","message":"exists"},"current":{"exists":false}}"#,
        ));
        assert!(
            matches!(absent, Error::PreconditionFailed { current, .. } if !current.exists),
            "{absent:?}"
        );
        // Without the state it is the plain server error, code and all.
        let bare = server_error(&raw(
            412,
            r#"{"error":{"code":"precondition_failed","message":"m"}}"#,
        ));
        assert!(
            matches!(bare, Error::Server { status: 412, .. }),
            "{bare:?}"
        );
        assert_eq!(bare.code(), "precondition_failed");
    }

    #[test]
    fn a_dead_lease_and_a_compacted_watch_are_typed_errors() {
        let err = server_error(&raw(
            404,
            r#"{"error":{"code":"lease_not_found","message":"lease 7 is not alive"}}"#,
        ));
        assert!(
            matches!(&err, Error::LeaseNotFound { message, .. } if message == "lease 7 is not alive"),
            "{err:?}"
        );
        assert_eq!((err.code(), err.status()), ("lease_not_found", Some(404)));
        assert!(!err.is_retryable() && !err.outcome_unknown());
        let err = server_error(&raw(
            410,
            r#"{"error":{"code":"compacted","message":"m"},"oldest_index":40}"#,
        ));
        assert!(
            matches!(
                err,
                Error::Compacted {
                    oldest_index: 40,
                    ..
                }
            ),
            "{err:?}"
        );
        // Any other 404 stays what it was.
        let err = server_error(&raw(404, r#"{"error":{"code":"not_found","message":"m"}}"#));
        assert!(matches!(err, Error::Server { status: 404, .. }), "{err:?}");
    }

    #[test]
    fn a_conditional_call_is_not_retried_after_an_unknown_outcome() {
        let unknown = server_error(&raw(
            503,
            r#"{"error":{"code":"commit_timeout","message":"m"}}"#,
        ));
        let unwritten = server_error(&raw(
            503,
            r#"{"error":{"code":"writes_paused","message":"m"}}"#,
        ));
        assert!(Retry::Idempotent.allows(&unknown));
        assert!(!Retry::UnlessMaybeWritten.allows(&unknown));
        assert!(Retry::Idempotent.allows(&unwritten));
        assert!(Retry::UnlessMaybeWritten.allows(&unwritten));
        let refused = server_error(&raw(
            400,
            r#"{"error":{"code":"invalid_txn","message":"m"}}"#,
        ));
        assert!(!Retry::Idempotent.allows(&refused));
    }

    fn endpoints(n: usize) -> Endpoints {
        Endpoints {
            configured: (0..n).map(|i| format!("http://n{i}")).collect(),
            cursor: Mutex::new(Cursor::default()),
        }
    }

    #[test]
    fn failures_rotate_through_configured_endpoints() {
        let e = endpoints(3);
        assert_eq!(e.current(), "http://n0");
        assert_eq!(e.failed("http://n0", None), "http://n1");
        assert_eq!(e.failed("http://n1", None), "http://n2");
        assert_eq!(e.failed("http://n2", None), "http://n0");
        // A stale failure report (another call already moved on) must not
        // skip the healthy current node.
        assert_eq!(e.failed("http://n2", None), "http://n0");
    }

    #[test]
    fn learned_primary_is_preferred_until_it_fails() {
        let e = endpoints(2);
        e.follow("http://p");
        assert_eq!(e.current(), "http://p");
        assert_eq!(e.failed("http://n0", None), "http://p");
        assert_eq!(e.failed("http://p", None), "http://n1");
        assert_eq!(
            e.failed("http://n1", Some("http://q".into())),
            "http://q",
            "a failing node that names the primary sends us there"
        );
    }
}
