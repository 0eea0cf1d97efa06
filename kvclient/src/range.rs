//! Ordered ranges (docs/DESIGN.md §2.11): [`Client::list`] and
//! [`Client::range`] build a [`RangeRequest`], which reads one page, counts
//! the range, or becomes a [`Pager`] that follows `next_page_token` to the
//! end.
//!
//! Pages are read at different indexes: a key present throughout the
//! paging is seen exactly once and in order; a key written or deleted
//! meanwhile may or may not be. A token names no node, so paging carries
//! on across a failover.

use std::collections::VecDeque;

use reqwest::Method;

use crate::client::{decode_success, Client};
use crate::error::{Error, Result};
use crate::key::{encode_query_value, MAX_KEY_BYTES};
use crate::wire::{CountAnswer, Item, RangePage};

/// Most keys one page may ask for (`limit`).
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// Which keys a range covers, in byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Every key that starts with this (the empty prefix: every key).
    Prefix(String),
    /// The half-open range `[start, end)`: from the first key when `start`
    /// is `None`, to the last when `end` is.
    Span {
        /// First key included.
        start: Option<String>,
        /// First key excluded.
        end: Option<String>,
    },
}

impl KeyRange {
    /// The keys that start with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        KeyRange::Prefix(prefix.into())
    }

    /// Every key.
    pub fn all() -> Self {
        KeyRange::Prefix(String::new())
    }

    /// The keys `k` with `start <= k < end`.
    pub fn between(start: impl Into<String>, end: impl Into<String>) -> Self {
        KeyRange::Span {
            start: Some(start.into()),
            end: Some(end.into()),
        }
    }

    /// The keys from `start` on.
    pub fn from_key(start: impl Into<String>) -> Self {
        KeyRange::Span {
            start: Some(start.into()),
            end: None,
        }
    }

    /// Refuses what the node would (400 `invalid_range`): a start after
    /// the end, a bound or prefix longer than a key can be.
    pub(crate) fn check(&self) -> Result<()> {
        let too_long = self
            .params()
            .into_iter()
            .find(|(_, v)| v.len() > MAX_KEY_BYTES);
        if let Some((name, bound)) = too_long {
            return Err(Error::InvalidRequest(format!(
                "range {name} is {} bytes, the limit is {MAX_KEY_BYTES}",
                bound.len()
            )));
        }
        match self {
            KeyRange::Span {
                start: Some(start),
                end: Some(end),
            } if start > end => Err(Error::InvalidRequest(format!(
                "range start {start:?} is after its end {end:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// The range's query parameters (`prefix`, or `start` and `end`).
    pub(crate) fn params(&self) -> Vec<(&'static str, &str)> {
        match self {
            KeyRange::Prefix(p) => vec![("prefix", p.as_str())],
            KeyRange::Span { start, end } => [("start", start), ("end", end)]
                .into_iter()
                .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
                .collect(),
        }
    }
}

/// A range read being built: which keys, how many per page, with or
/// without values. Cheap to clone; holds a clone of its [`Client`].
#[derive(Debug, Clone)]
pub struct RangeRequest {
    client: Client,
    range: KeyRange,
    page_size: Option<u32>,
    keys_only: bool,
    consistent: bool,
}

impl Client {
    /// The keys that start with `prefix`, in byte order (the empty prefix:
    /// every key).
    ///
    /// ```no_run
    /// # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
    /// let mut pager = client.list("users/").page_size(1000).pager();
    /// while let Some(item) = pager.next_item().await? {
    ///     println!("{} is at version {}", item.key, item.version);
    /// }
    /// let users = client.list("users/").count().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn list(&self, prefix: impl Into<String>) -> RangeRequest {
        self.range(KeyRange::prefix(prefix))
    }

    /// The keys of `range`, in byte order.
    pub fn range(&self, range: KeyRange) -> RangeRequest {
        RangeRequest {
            client: self.clone(),
            range,
            page_size: None,
            keys_only: false,
            consistent: false,
        }
    }
}

impl RangeRequest {
    /// Keys per page, 1 to [`MAX_PAGE_SIZE`] (the node's default is 100).
    /// A page also ends once its values reach 16 MiB.
    pub fn page_size(mut self, keys: u32) -> Self {
        self.page_size = Some(keys);
        self
    }

    /// Items without values.
    pub fn keys_only(mut self, keys_only: bool) -> Self {
        self.keys_only = keys_only;
        self
    }

    /// Each page read from the primary after it confirms its leadership
    /// (docs/DESIGN.md §4.7).
    pub fn consistent(mut self, consistent: bool) -> Self {
        self.consistent = consistent;
        self
    }

    /// One page: the first, or the one after `page_token` (a previous
    /// page's `next_page_token`).
    pub async fn page(&self, page_token: Option<&str>) -> Result<RangePage> {
        let path = self.path(page_token, false)?;
        let resp = self.client.execute(Method::GET, &path, None).await?;
        decode_success(resp, "range page")
    }

    /// How many keys the range holds (one request, however many).
    pub async fn count(&self) -> Result<u64> {
        let path = self.path(None, true)?;
        let resp = self.client.execute(Method::GET, &path, None).await?;
        let answer: CountAnswer = decode_success(resp, "range count")?;
        Ok(answer.count)
    }

    /// A pager over every page of the range, from the first.
    pub fn pager(self) -> Pager {
        Pager {
            request: self,
            token: None,
            done: false,
            buffered: VecDeque::new(),
        }
    }

    /// `/v1/kv?...` for this request; refuses what the node would.
    pub(crate) fn path(&self, page_token: Option<&str>, count_only: bool) -> Result<String> {
        self.range.check()?;
        let mut params: Vec<(&str, String)> = self
            .range
            .params()
            .into_iter()
            .map(|(name, v)| (name, v.to_owned()))
            .collect();
        // A count reads no page: its size and keys_only do not apply.
        if let Some(size) = self.page_size.filter(|_| !count_only) {
            if !(1..=MAX_PAGE_SIZE).contains(&size) {
                return Err(Error::InvalidRequest(format!(
                    "page size {size} is not within 1..={MAX_PAGE_SIZE}"
                )));
            }
            params.push(("limit", size.to_string()));
        }
        let flags = [
            ("keys_only", self.keys_only && !count_only),
            ("count_only", count_only),
            ("consistent", self.consistent),
        ];
        params.extend(
            flags
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(name, _)| (name, "true".to_owned())),
        );
        if let Some(token) = page_token {
            params.push(("page_token", token.to_owned()));
        }
        let query: Vec<String> = params
            .iter()
            .map(|(name, v)| format!("{name}={}", encode_query_value(v)))
            .collect();
        Ok(format!("/v1/kv?{}", query.join("&")))
    }
}

/// Reads a range page by page, following each page's `next_page_token`
/// until a page has none: [`Pager::next_page`] for whole pages,
/// [`Pager::next_item`] for one key at a time.
#[derive(Debug)]
pub struct Pager {
    request: RangeRequest,
    token: Option<String>,
    done: bool,
    buffered: VecDeque<Item>,
}

impl Pager {
    /// The next page, or `None` after the last. On an error the pager
    /// stays where it was: calling again retries the same page.
    pub async fn next_page(&mut self) -> Result<Option<RangePage>> {
        if self.done {
            return Ok(None);
        }
        let page = self.request.page(self.token.as_deref()).await?;
        if page.items.is_empty() && page.next_page_token.is_some() {
            // A node that named a next page after an empty one would have
            // the pager ask forever.
            return Err(Error::Decode {
                endpoint: self.request.client.current_endpoint(),
                what: "range page",
                reason: "an empty page with a next_page_token".into(),
            });
        }
        self.token.clone_from(&page.next_page_token);
        self.done = self.token.is_none();
        Ok(Some(page))
    }

    /// The next key of the range, or `None` after the last; reads the
    /// next page when the current one is used up.
    pub async fn next_item(&mut self) -> Result<Option<Item>> {
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return Ok(Some(item));
            }
            match self.next_page().await? {
                Some(page) => self.buffered.extend(page.items),
                None => return Ok(None),
            }
        }
    }

    /// The token of the next page to read, `None` before the first page
    /// and after the last: where a pager stopped, to continue later with
    /// [`RangeRequest::page`].
    pub fn page_token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::new(["http://127.0.0.1:1"]).unwrap()
    }

    #[test]
    fn a_prefix_request_names_its_parameters() {
        let req = client().list("users/").page_size(500).keys_only(true);
        assert_eq!(
            req.path(None, false).unwrap(),
            "/v1/kv?prefix=users%2F&limit=500&keys_only=true"
        );
        assert_eq!(
            req.path(Some("AQ-_x"), false).unwrap(),
            "/v1/kv?prefix=users%2F&limit=500&keys_only=true&page_token=AQ-_x"
        );
        assert_eq!(
            client().list("").path(None, true).unwrap(),
            "/v1/kv?prefix=&count_only=true"
        );
    }

    #[test]
    fn a_span_sends_only_the_ends_it_has() {
        let c = client();
        assert_eq!(
            c.range(KeyRange::between("a b", "m&n"))
                .consistent(true)
                .path(None, false)
                .unwrap(),
            "/v1/kv?start=a%20b&end=m%26n&consistent=true"
        );
        assert_eq!(
            c.range(KeyRange::from_key("k")).path(None, false).unwrap(),
            "/v1/kv?start=k"
        );
        let open = KeyRange::Span {
            start: None,
            end: Some("z".into()),
        };
        assert_eq!(c.range(open).path(None, false).unwrap(), "/v1/kv?end=z");
    }

    #[test]
    fn what_the_node_would_refuse_is_refused_before_sending() {
        let c = client();
        let err = c
            .range(KeyRange::between("b", "a"))
            .path(None, false)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(c
            .range(KeyRange::between("a", "a"))
            .path(None, false)
            .is_ok());
        for size in [0, MAX_PAGE_SIZE + 1] {
            let err = c.list("p").page_size(size).path(None, false).unwrap_err();
            assert!(err.to_string().contains("page size"), "{err}");
        }
        assert!(c
            .list("p")
            .page_size(MAX_PAGE_SIZE)
            .path(None, false)
            .is_ok());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        for range in [KeyRange::prefix(long.clone()), KeyRange::from_key(long)] {
            let err = c.range(range).path(None, false).unwrap_err();
            assert!(err.to_string().contains("1025 bytes"), "{err}");
        }
    }

    #[test]
    fn a_count_sends_neither_page_size_nor_keys_only() {
        let req = client()
            .list("p")
            .page_size(5)
            .keys_only(true)
            .consistent(true);
        assert_eq!(
            req.path(None, true).unwrap(),
            "/v1/kv?prefix=p&count_only=true&consistent=true"
        );
    }
}
