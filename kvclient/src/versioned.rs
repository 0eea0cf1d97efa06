//! Versions and conditional writes (docs/DESIGN.md §2.10, §2.12):
//! [`Client::get_versioned`], [`Client::put_if`], [`Client::delete_if`],
//! and [`Client::delete_prefix`].
//!
//! A conditional write is retried only after failures that wrote nothing
//! (a refused connection, 503 `writes_paused`, a redirect). After a
//! failure whose outcome is unknown (a timeout, a dropped connection, 503
//! `commit_timeout`) the write may have happened, and a retry could then
//! be refused with 412 by the first attempt's own success. So such a
//! failure is returned as it is ([`Error::outcome_unknown`] says so), and
//! a 412 from this client always means "this write did not happen".

use bytes::Bytes;
use kvproto::header;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ETAG, IF_MATCH, IF_NONE_MATCH};
use reqwest::Method;

use crate::client::{decode_success, Call, Client, RawResponse, Retry};
use crate::error::{Error, Result};
use crate::expiry::{Expiry, LeaseId, LEASE_HEADER, TTL_MS_HEADER};
use crate::key::{encode_query_value, path_for_key, validate_key};
use crate::wire::{DeleteOutcome, DeletePrefixOutcome, IndexResponse};
use std::time::Duration;

/// A value with its key's versions, from [`Client::get_versioned`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value's bytes.
    pub value: Bytes,
    /// Log index of the write that created the key (since it last did
    /// not exist).
    pub create_index: u64,
    /// Log index of its last write: what [`Precondition::ModIndex`] names.
    pub mod_index: u64,
    /// Writes since its creation, 1 after the first.
    pub version: u64,
    /// The `ETag` as sent: `"<mod_index>"`, or in masterless mode the
    /// key's last-write-wins stamp.
    pub etag: Option<String>,
    /// The milliseconds the key had left when read (`X-KV-TTL-Ms`, at
    /// least 1), `None` for a permanent key (docs/DESIGN.md §2.15).
    pub ttl_ms: Option<u64>,
    /// The lease the key lives by (`X-KV-Lease`), if any (§2.16).
    pub lease: Option<LeaseId>,
}

/// What must hold of a key for [`Client::put_if`] / [`Client::delete_if`]
/// to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// The key exists and its last write is at this log index (its
    /// `mod_index`): `If-Match: "N"`.
    ModIndex(u64),
    /// The key exists: `If-Match: *`.
    Exists,
    /// The key does not exist (create only): `If-None-Match: *`. Not on a
    /// delete.
    Absent,
}

impl Precondition {
    /// The request header that carries it.
    pub fn header(self) -> (HeaderName, HeaderValue) {
        match self {
            Precondition::ModIndex(n) => (IF_MATCH, quoted(n)),
            Precondition::Exists => (IF_MATCH, HeaderValue::from_static("*")),
            Precondition::Absent => (IF_NONE_MATCH, HeaderValue::from_static("*")),
        }
    }
}

/// How a put writes: a deadline ([`Expiry`]) and a condition
/// ([`Precondition`]), both optional; see [`crate::Client::put`].
///
/// ```
/// use std::time::Duration;
/// use kvclient::{PutOptions, Precondition};
/// let create_for_a_minute = PutOptions::new()
///     .ttl(Duration::from_secs(60))
///     .precondition(Precondition::Absent);
/// assert!(create_for_a_minute.expiry.is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// The key's deadline; `None`: the key is permanent.
    pub expiry: Option<Expiry>,
    /// Write only if this holds (a conditional write, §2.12).
    pub precondition: Option<Precondition>,
}

impl PutOptions {
    /// A plain put: permanent, unconditional.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expires `ttl` after the node takes the write.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.expiry = Some(Expiry::Ttl(ttl));
        self
    }

    /// Lives as long as lease `id`.
    pub fn lease(mut self, id: LeaseId) -> Self {
        self.expiry = Some(Expiry::Lease(id));
        self
    }

    /// Keeps the key's deadline or lease.
    pub fn keep_ttl(mut self) -> Self {
        self.expiry = Some(Expiry::KeepTtl);
        self
    }

    /// Any [`Expiry`], or none.
    pub fn expiry(mut self, expiry: Option<Expiry>) -> Self {
        self.expiry = expiry;
        self
    }

    /// Writes only if `precondition` holds.
    pub fn precondition(mut self, precondition: Precondition) -> Self {
        self.precondition = Some(precondition);
        self
    }
}

fn quoted(n: u64) -> HeaderValue {
    // Invariant: digits between quotes are always a valid header value.
    #[allow(clippy::expect_used)]
    HeaderValue::from_str(&format!("\"{n}\"")).expect("a quoted number is a header value")
}

/// Reads the versions of a `GET`/`HEAD` answer's headers; `Err` names the
/// header that is missing or not a number.
pub(crate) fn versioned_from(resp: RawResponse) -> Result<Versioned> {
    let number = |name: &'static str| header_u64(&resp.headers, name);
    let versions = (|| {
        Ok::<_, String>((
            number(header::CREATE_INDEX)?,
            number(header::MOD_INDEX)?,
            number(header::VERSION)?,
        ))
    })();
    let (create_index, mod_index, version) = versions.map_err(|reason| Error::Decode {
        endpoint: resp.endpoint.clone(),
        what: "versioned read",
        reason,
    })?;
    let etag = resp
        .headers
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let optional = |name: &'static str| {
        resp.headers
            .contains_key(name)
            .then(|| number(name))
            .transpose()
    };
    let (ttl_ms, lease) =
        (|| Ok::<_, String>((optional(TTL_MS_HEADER)?, optional(LEASE_HEADER)?)))().map_err(
            |reason| Error::Decode {
                endpoint: resp.endpoint.clone(),
                what: "versioned read",
                reason,
            },
        )?;
    Ok(Versioned {
        value: resp.body,
        create_index,
        mod_index,
        version,
        etag,
        ttl_ms,
        lease,
    })
}

fn header_u64(headers: &HeaderMap, name: &'static str) -> Result<u64, String> {
    let value = headers
        .get(name)
        .ok_or_else(|| format!("no {name} header"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{name} is not a number: {value:?}"))
}

impl Client {
    /// The value of `key` with its versions (from the answer's headers),
    /// or `None` when the node answers 404 `key_not_found`. As
    /// [`Client::get`], a secondary may lag; see
    /// [`Client::get_versioned_consistent`].
    pub async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>> {
        let path = path_for_key(key)?;
        self.get_answer(&path)
            .await?
            .map(versioned_from)
            .transpose()
    }

    /// [`Client::get_versioned`] as a linearizable read (`consistent=true`,
    /// docs/DESIGN.md §4.7): the start of a compare-and-swap that should
    /// not begin from a stale secondary.
    pub async fn get_versioned_consistent(&self, key: &str) -> Result<Option<Versioned>> {
        let path = format!("{}?consistent=true", path_for_key(key)?);
        self.get_answer(&path)
            .await?
            .map(versioned_from)
            .transpose()
    }

    /// Stores `value` under `key` only if `precondition` holds; returns
    /// the write's log index (the key's new `mod_index`).
    ///
    /// A failed precondition is [`Error::PreconditionFailed`] with the
    /// key's current state; nothing was written. A failure after which the
    /// write may or may not have happened is returned without a retry
    /// ([`Error::outcome_unknown`]); to learn which, read the key back
    /// (a value that names its writer makes that read decisive). Masterless
    /// nodes refuse conditional writes (409 `unsupported_in_masterless`).
    ///
    /// A compare-and-swap loop:
    ///
    /// ```no_run
    /// # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
    /// use kvclient::{Error, Precondition};
    /// loop {
    ///     let (n, pre) = match client.get_versioned_consistent("counter").await? {
    ///         Some(v) => {
    ///             let n: u64 = String::from_utf8_lossy(&v.value).parse().unwrap_or(0);
    ///             (n, Precondition::ModIndex(v.mod_index))
    ///         }
    ///         None => (0, Precondition::Absent),
    ///     };
    ///     match client.put_if("counter", (n + 1).to_string(), pre).await {
    ///         Ok(_) => break,
    ///         // Another writer came first; nothing was written: read again.
    ///         Err(Error::PreconditionFailed { .. }) => continue,
    ///         // Maybe written, maybe not: the caller decides (read back).
    ///         Err(err) => return Err(err),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_if(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        precondition: Precondition,
    ) -> Result<u64> {
        self.put(key, value, PutOptions::new().precondition(precondition))
            .await
    }

    /// Stores `value` under `key` as `options` say: with a TTL, a lease or
    /// keep-TTL (docs/DESIGN.md §2.15; none makes the key permanent), and
    /// only if a [`Precondition`] holds. Returns the write's log index.
    /// A lease that is not alive is [`Error::LeaseNotFound`], nothing
    /// written; a conditional put fails and retries as [`Client::put_if`],
    /// a plain one as [`Client::set`].
    ///
    /// ```no_run
    /// # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
    /// use std::time::Duration;
    /// use kvclient::PutOptions;
    /// client
    ///     .put("sessions/9", "ada", PutOptions::new().ttl(Duration::from_secs(30)))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        options: PutOptions,
    ) -> Result<u64> {
        let mut path = path_for_key(key)?;
        if let Some(expiry) = options.expiry {
            path = format!("{path}?{}", expiry.query()?);
        }
        let (headers, retry) = match options.precondition {
            Some(pre) => (vec![pre.header()], Retry::UnlessMaybeWritten),
            None => (Vec::new(), Retry::Idempotent),
        };
        let resp = self
            .send(Call {
                method: Method::PUT,
                path: &path,
                body: Some((value.into(), "application/octet-stream")),
                headers,
                retry,
            })
            .await?;
        let index: IndexResponse = decode_success(resp, "set response")?;
        Ok(index.index)
    }

    /// Deletes `key` only if `precondition` holds ([`Precondition::Absent`]
    /// makes no sense on a delete and is refused before sending). Failures
    /// as [`Client::put_if`].
    pub async fn delete_if(&self, key: &str, precondition: Precondition) -> Result<DeleteOutcome> {
        let path = path_for_key(key)?;
        if precondition == Precondition::Absent {
            return Err(Error::InvalidRequest(
                "a delete cannot require that the key be absent".into(),
            ));
        }
        let resp = self
            .send(Call {
                method: Method::DELETE,
                path: &path,
                body: None,
                headers: vec![precondition.header()],
                retry: Retry::UnlessMaybeWritten,
            })
            .await?;
        decode_success(resp, "delete response")
    }

    /// Deletes every key that starts with `prefix`, atomically (one log
    /// record). An empty prefix is refused before sending: it would
    /// delete every key.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<DeletePrefixOutcome> {
        if prefix.is_empty() {
            return Err(Error::InvalidRequest(
                "the prefix to delete is empty (that would delete every key)".into(),
            ));
        }
        // A prefix of a valid key is a valid key; anything else could match
        // no key, and is refused as a key would be.
        validate_key(prefix).map_err(|reason| Error::invalid_key(prefix, reason))?;
        let path = format!("/v1/kv?prefix={}", encode_query_value(prefix));
        let resp = self.execute(Method::DELETE, &path, None).await?;
        decode_success(resp, "delete prefix response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn preconditions_become_their_headers() {
        let (name, value) = Precondition::ModIndex(42).header();
        assert_eq!((name, value.to_str().unwrap()), (IF_MATCH, "\"42\""));
        let (name, value) = Precondition::Exists.header();
        assert_eq!((name, value.to_str().unwrap()), (IF_MATCH, "*"));
        let (name, value) = Precondition::Absent.header();
        assert_eq!((name, value.to_str().unwrap()), (IF_NONE_MATCH, "*"));
        let (_, value) = Precondition::ModIndex(u64::MAX).header();
        assert_eq!(value.to_str().unwrap(), "\"18446744073709551615\"");
    }

    fn answer(headers: &[(&'static str, &'static str)]) -> RawResponse {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        RawResponse {
            endpoint: "http://n0".into(),
            status: StatusCode::OK,
            headers: map,
            body: Bytes::from_static(b"v"),
        }
    }

    #[test]
    fn versions_come_from_the_headers() {
        let v = versioned_from(answer(&[
            ("etag", "\"9\""),
            ("x-kv-mod-index", "9"),
            ("x-kv-create-index", "3"),
            ("x-kv-version", "2"),
        ]))
        .unwrap();
        assert_eq!(
            v,
            Versioned {
                value: Bytes::from_static(b"v"),
                create_index: 3,
                mod_index: 9,
                version: 2,
                etag: Some("\"9\"".into()),
                ttl_ms: None,
                lease: None,
            }
        );
    }

    #[test]
    fn the_time_left_and_the_lease_come_from_their_headers() {
        let versions = [
            ("x-kv-mod-index", "9"),
            ("x-kv-create-index", "3"),
            ("x-kv-version", "2"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = versions.to_vec();
            all.extend_from_slice(extra);
            versioned_from(answer(&all))
        };
        let v = with(&[("x-kv-ttl-ms", "1500"), ("x-kv-lease", "77")]).unwrap();
        assert_eq!((v.ttl_ms, v.lease), (Some(1500), Some(77)));
        let v = with(&[("x-kv-ttl-ms", "1")]).unwrap();
        assert_eq!((v.ttl_ms, v.lease), (Some(1), None));
        let err = with(&[("x-kv-lease", "soon")]).unwrap_err();
        assert!(err.to_string().contains("x-kv-lease"), "{err}");
    }

    #[test]
    fn a_missing_or_bad_version_header_is_a_decode_error() {
        let err =
            versioned_from(answer(&[("x-kv-mod-index", "9"), ("x-kv-version", "2")])).unwrap_err();
        assert_eq!(err.code(), "decode");
        assert!(err.to_string().contains("x-kv-create-index"), "{err}");
        let err = versioned_from(answer(&[
            ("x-kv-mod-index", "nine"),
            ("x-kv-create-index", "3"),
            ("x-kv-version", "2"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("x-kv-mod-index"), "{err}");
    }
}
