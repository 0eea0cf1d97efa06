//! Versions, ordered ranges, conditional writes and transactions
//! (docs/DESIGN.md §2.10-§2.13) over plain HTTP, for the end-to-end tests
//! and the benchmarks: the version headers of a read, a write that follows
//! a secondary's 307 to the primary and says what its answer means for
//! the data (done, refused by its precondition, not written, unknown), a
//! range pager and a transaction call. The tests speak the wire contract
//! here rather than through kvclient, so they check the contract itself.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use reqwest::{header::HeaderMap, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};

/// A secondary redirects to the primary, which may have just lost its role
/// and redirect again; more hops than this is a loop.
const MAX_HOPS: usize = 4;

/// A key's versions (docs/DESIGN.md §2.10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Meta {
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
}

impl Meta {
    /// The three numbers from a JSON object that carries them (a range
    /// item, a txn's get, a 412's `current`).
    pub fn from_json(v: &Value) -> Result<Meta> {
        let n = |name: &str| {
            v[name]
                .as_u64()
                .with_context(|| format!("no {name} in {v}"))
        };
        Ok(Meta {
            create_index: n("create_index")?,
            mod_index: n("mod_index")?,
            version: n("version")?,
        })
    }

    /// The numbers of a GET or HEAD answer's headers, checked against its
    /// `ETag` (`"<mod_index>"`).
    pub fn from_headers(h: &HeaderMap) -> Result<Meta> {
        let n = |name: &str| -> Result<u64> {
            let v = h.get(name).with_context(|| format!("no {name} header"))?;
            Ok(v.to_str()?.parse()?)
        };
        let meta = Meta {
            create_index: n("x-kv-create-index")?,
            mod_index: n("x-kv-mod-index")?,
            version: n("x-kv-version")?,
        };
        let etag = h.get("etag").context("no ETag header")?.to_str()?;
        if etag != format!("\"{}\"", meta.mod_index) {
            bail!("ETag {etag} is not the mod_index {}", meta.mod_index);
        }
        Ok(meta)
    }
}

/// A client for these helpers: no proxy, no automatic redirects (they
/// follow 307s themselves, so a test knows what each hop answered), and a
/// timeout per request.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .expect("building a reqwest client")
}

/// A value as bulk items, txn puts and range items carry it: a JSON
/// string when the bytes are UTF-8, else `{"base64": ...}`.
pub fn encode_value(v: &[u8]) -> Value {
    match std::str::from_utf8(v) {
        Ok(s) => json!(s),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(v) }),
    }
}

/// The bytes of a value in [`encode_value`]'s form.
pub fn decode_value(v: &Value) -> Result<Vec<u8>> {
    if let Some(s) = v.as_str() {
        return Ok(s.as_bytes().to_vec());
    }
    let b64 = v["base64"]
        .as_str()
        .with_context(|| format!("not a value: {v}"))?;
    Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
}

/// Percent-encodes a query parameter's value: every byte but the
/// unreserved ones, so neither `+`, `&` nor `%` in a key is misread.
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL of a key on the node at `base`.
pub fn key_url(base: &str, key: &str) -> String {
    format!("{base}/v1/kv/{}", kvclient::encode_key(key))
}

/// Sends the request `make` builds for `url`, following 307s to their
/// `Location` (the same path and query on the primary).
pub async fn send_following(
    url: &str,
    make: impl Fn(&str) -> RequestBuilder,
) -> reqwest::Result<Response> {
    let mut url = url.to_string();
    for _ in 0..MAX_HOPS {
        let resp = make(&url).send().await?;
        let next = resp.headers().get("location").and_then(|l| l.to_str().ok());
        match next {
            Some(l) if resp.status() == StatusCode::TEMPORARY_REDIRECT => url = l.to_string(),
            _ => return Ok(resp),
        }
    }
    make(&url).send().await
}

/// A write's precondition (docs/DESIGN.md §2.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: "N"`: the key exists with `mod_index` N.
    IfMatch(u64),
    /// `If-Match: *`: the key exists.
    IfExists,
    /// `If-None-Match: *`: the key does not exist.
    IfAbsent,
}

impl Precondition {
    fn apply(self, req: RequestBuilder) -> RequestBuilder {
        match self {
            Precondition::None => req,
            Precondition::IfMatch(n) => req.header("if-match", format!("\"{n}\"")),
            Precondition::IfExists => req.header("if-match", "*"),
            Precondition::IfAbsent => req.header("if-none-match", "*"),
        }
    }
}

/// What a write's answer (or its absence) says about the data.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// 200, with the answer's body.
    Done(Value),
    /// 412: nothing written; the key's state when the condition was
    /// checked (`None`: absent).
    PreconditionFailed(Option<Meta>),
    /// An answer that says nothing was written (a 4xx, or a 503 of the
    /// kinds in docs/DESIGN.md §2.7 marked "no"), or no connection at all:
    /// the code or the error.
    NotWritten(String),
    /// No answer, or one that leaves the write open (a timeout, a lost
    /// connection, 503 `commit_timeout`): it may or may not have happened.
    Unknown(String),
}

impl Outcome {
    /// The body of a 200, or a panic that names `what` and the outcome.
    pub fn done(self, what: &str) -> Value {
        match self {
            Outcome::Done(v) => v,
            other => panic!("{what}: expected 200, got {other:?}"),
        }
    }

    /// The `index` of a 200's body.
    pub fn index(self, what: &str) -> u64 {
        let v = self.done(what);
        v["index"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no index in {v}"))
    }
}

/// 503 codes that mean the write was refused before it was logged, or was
/// logged and then dropped by a newer primary: nothing of it remains.
fn wrote_nothing(code: &str) -> bool {
    use kvproto::code;
    code::NOT_APPLIED.contains(&code)
        || [
            code::WRITE_SUPERSEDED,
            code::MEMORY_FULL,
            code::STORAGE_UNAVAILABLE,
            code::DATA_DIR_LOST,
            code::WAL_UNAVAILABLE,
        ]
        .contains(&code)
}

/// Classifies a write's answer (see [`Outcome`]).
pub async fn outcome(sent: reqwest::Result<Response>) -> Outcome {
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::NotWritten(format!("connect: {e}")),
        Err(e) => return Outcome::Unknown(format!("{e}")),
    };
    let status = resp.status();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) if status.is_success() => return Outcome::Unknown(format!("body: {e}")),
        Err(_) => Default::default(),
    };
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
    match status.as_u16() {
        200 => Outcome::Done(v),
        412 => {
            let current = &v["current"];
            let meta = (current["exists"] == true).then(|| Meta::from_json(current));
            match meta.transpose() {
                Ok(m) => Outcome::PreconditionFailed(m),
                Err(e) => Outcome::Unknown(format!("412 without a valid current: {e:#}")),
            }
        }
        // Still redirected after every hop: no node took it.
        307 => Outcome::NotWritten(format!("redirected {MAX_HOPS} times")),
        400..=499 => Outcome::NotWritten(format!("{status} {code}: {v}")),
        _ if wrote_nothing(&code) => Outcome::NotWritten(code),
        _ => Outcome::Unknown(format!("{status} {code}")),
    }
}

/// `PUT /v1/kv/{key}` with a precondition, following redirects.
pub async fn put_if(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    value: &[u8],
    pre: Precondition,
) -> Outcome {
    let body = value.to_vec();
    let sent = send_following(&key_url(base, key), |url| {
        pre.apply(http.put(url).body(body.clone()))
    })
    .await;
    outcome(sent).await
}

/// `DELETE /v1/kv/{key}` with a precondition, following redirects.
pub async fn delete_if(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    pre: Precondition,
) -> Outcome {
    let sent = send_following(&key_url(base, key), |url| pre.apply(http.delete(url))).await;
    outcome(sent).await
}

/// `DELETE /v1/kv?prefix=P`, following redirects.
pub async fn delete_prefix(http: &reqwest::Client, base: &str, prefix: &str) -> Outcome {
    let url = format!("{base}/v1/kv?prefix={}", encode_query(prefix));
    outcome(send_following(&url, |u| http.delete(u)).await).await
}

/// `POST /v1/txn` of `body`, following redirects.
pub async fn txn(http: &reqwest::Client, base: &str, body: &Value) -> Outcome {
    let url = format!("{base}/v1/txn");
    outcome(send_following(&url, |u| http.post(u).json(body)).await).await
}

/// A key's value and versions as a GET answers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub meta: Meta,
}

/// `GET /v1/kv/{key}` (`consistent=true` if asked, following the
/// redirect to the primary): `None` on 404, an error on any other failure.
pub async fn get_versioned(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    consistent: bool,
) -> Result<Option<Versioned>> {
    let mut url = key_url(base, key);
    if consistent {
        url.push_str("?consistent=true");
    }
    let resp = send_following(&url, |u| http.get(u)).await?;
    match resp.status() {
        StatusCode::OK => {
            let meta = Meta::from_headers(resp.headers())?;
            let value = resp.bytes().await?.to_vec();
            Ok(Some(Versioned { value, meta }))
        }
        StatusCode::NOT_FOUND => Ok(None),
        s => bail!(
            "GET {key:?}: {s}: {}",
            resp.text().await.unwrap_or_default()
        ),
    }
}

/// `HEAD /v1/kv/{key}`: the versions, `None` on 404.
pub async fn head_meta(http: &reqwest::Client, base: &str, key: &str) -> Result<Option<Meta>> {
    let resp = http.head(key_url(base, key)).send().await?;
    match resp.status() {
        StatusCode::OK => Ok(Some(Meta::from_headers(resp.headers())?)),
        StatusCode::NOT_FOUND => Ok(None),
        s => bail!("HEAD {key:?}: {s}"),
    }
}

/// Which keys a range read covers (docs/DESIGN.md §2.11).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeQuery {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub limit: Option<usize>,
    pub keys_only: bool,
}

impl RangeQuery {
    pub fn prefix(p: &str) -> RangeQuery {
        RangeQuery {
            prefix: Some(p.to_string()),
            ..RangeQuery::default()
        }
    }

    /// The query string (without `?`), with `extra` parameters after it.
    pub fn query(&self, extra: &[(&str, &str)]) -> String {
        let limit = self.limit.map(|l| l.to_string());
        let params = [
            ("prefix", self.prefix.as_deref()),
            ("start", self.start.as_deref()),
            ("end", self.end.as_deref()),
            ("limit", limit.as_deref()),
            ("keys_only", self.keys_only.then_some("true")),
        ];
        let all = params
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .chain(extra.iter().copied());
        all.map(|(k, v)| format!("{k}={}", encode_query(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The same range as a transaction's `range` op.
    pub fn txn_op(&self) -> Value {
        let mut op = serde_json::Map::new();
        for (k, v) in [
            ("prefix", &self.prefix),
            ("start", &self.start),
            ("end", &self.end),
        ] {
            if let Some(v) = v {
                op.insert(k.into(), json!(v));
            }
        }
        if let Some(l) = self.limit {
            op.insert("limit".into(), json!(l));
        }
        op.insert("keys_only".into(), json!(self.keys_only));
        json!({ "range": op })
    }
}

/// One key of a range page or a txn's read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    /// `None` for a keys-only read.
    pub value: Option<Vec<u8>>,
    pub meta: Meta,
}

impl Item {
    pub fn from_json(v: &Value) -> Result<Item> {
        let key = v["key"]
            .as_str()
            .with_context(|| format!("no key in {v}"))?;
        let value = match v.get("value") {
            None => None,
            Some(x) => Some(decode_value(x)?),
        };
        Ok(Item {
            key: key.to_string(),
            value,
            meta: Meta::from_json(v)?,
        })
    }
}

/// The items of a JSON array of range items.
pub fn items(v: &Value) -> Result<Vec<Item>> {
    v.as_array()
        .with_context(|| format!("not a list of items: {v}"))?
        .iter()
        .map(Item::from_json)
        .collect()
}

/// One page of `GET /v1/kv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageAnswer {
    pub items: Vec<Item>,
    /// The applied index the page was read at.
    pub index: u64,
    pub next_page_token: Option<String>,
}

/// `GET /v1/kv` of `q` on the node at `base`, from `token` if given.
pub async fn range_page(
    http: &reqwest::Client,
    base: &str,
    q: &RangeQuery,
    token: Option<&str>,
) -> Result<PageAnswer> {
    let extra: Vec<(&str, &str)> = token.map(|t| ("page_token", t)).into_iter().collect();
    let url = format!("{base}/v1/kv?{}", q.query(&extra));
    let resp = http.get(&url).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.with_context(|| format!("GET {url}"))?;
    if status != StatusCode::OK {
        bail!("GET {url}: {status}: {v}");
    }
    let items = items(&v["items"])?;
    if v["count"].as_u64() != Some(items.len() as u64) {
        bail!("GET {url}: count is not the number of items: {v}");
    }
    Ok(PageAnswer {
        items,
        index: v["index"]
            .as_u64()
            .with_context(|| format!("no index: {v}"))?,
        next_page_token: v["next_page_token"].as_str().map(str::to_string),
    })
}

/// Every page of `q`, following `next_page_token` to the end (at most
/// `max_pages`, past which the range is taken to loop).
pub async fn range_all(
    http: &reqwest::Client,
    base: &str,
    q: &RangeQuery,
    max_pages: usize,
) -> Result<Vec<PageAnswer>> {
    let mut pages: Vec<PageAnswer> = Vec::new();
    loop {
        let token = pages.last().and_then(|p| p.next_page_token.as_deref());
        let page = range_page(http, base, q, token).await?;
        let more = page.next_page_token.is_some();
        pages.push(page);
        if !more {
            return Ok(pages);
        }
        if pages.len() >= max_pages {
            bail!("{q:?}: more than {max_pages} pages");
        }
    }
}

/// `GET /v1/kv?...&count_only=true`: (count, index).
pub async fn range_count(http: &reqwest::Client, base: &str, q: &RangeQuery) -> Result<(u64, u64)> {
    let url = format!("{base}/v1/kv?{}", q.query(&[("count_only", "true")]));
    let resp = http.get(&url).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    if status != StatusCode::OK {
        bail!("GET {url}: {status}: {v}");
    }
    let n = |f: &str| v[f].as_u64().with_context(|| format!("no {f}: {v}"));
    Ok((n("count")?, n("index")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_as_text_or_base64() {
        for v in [&b"plain"[..], b"", &[0xff, 0, 1]] {
            assert_eq!(decode_value(&encode_value(v)).unwrap(), v);
        }
        assert_eq!(encode_value(&[0xff]), json!({"base64": "/w=="}));
    }

    #[test]
    fn query_values_are_fully_escaped() {
        assert_eq!(encode_query("a b+c/%ü"), "a%20b%2Bc%2F%25%C3%BC");
        let q = RangeQuery {
            start: Some("a".into()),
            end: Some("b".into()),
            limit: Some(3),
            keys_only: true,
            ..RangeQuery::default()
        };
        assert_eq!(
            q.query(&[("page_token", "x=")]),
            "start=a&end=b&limit=3&keys_only=true&page_token=x%3D"
        );
    }
}
