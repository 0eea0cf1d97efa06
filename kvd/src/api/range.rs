//! Ordered ranges (docs/DESIGN.md §2.11): `GET /v1/kv` lists a range a
//! page at a time, `DELETE /v1/kv?prefix=P` deletes a prefix in one
//! record. The bounds and the limit are checked here, by the same rules
//! for a range and for a transaction's `range` op ([`key_range`],
//! [`limit`]).

use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use kvproto::{code, MAX_KEY_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access::Caller;
use super::query::Params;
use super::token::{self, TokenError};
use super::wire::{Clock, JsonItem};
use super::{blocking, lease_deadline, ApiError, Shared};
use crate::auth::Action;
use crate::model::{prefix_end, KeyRange, Page, RangeRead};

/// Keys per page when the request says none.
pub const DEFAULT_LIMIT: usize = 100;
/// Most keys per page (and per transaction `range`): the model's limit,
/// which the WAL decoder holds logged range reads to as well.
pub use crate::model::MAX_RANGE_LIMIT as MAX_LIMIT;

/// Why a range's bounds were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("give prefix, or start and end, not both")]
    PrefixAndBounds,
    #[error("start {start:?} is after end {end:?}")]
    StartAfterEnd { start: String, end: String },
    #[error("{0} is over {MAX_KEY_BYTES} bytes (no key is longer)")]
    TooLong(&'static str),
}

/// The keys `prefix`, or `[start, end)`, selects (all three absent: every
/// key; `start` absent: from the first key; `end` absent: to the last).
pub fn key_range(
    prefix: Option<&str>,
    start: Option<&str>,
    end: Option<&str>,
) -> Result<KeyRange, BoundsError> {
    for (name, bound) in [("prefix", prefix), ("start", start), ("end", end)] {
        if bound.is_some_and(|b| b.len() > MAX_KEY_BYTES) {
            return Err(BoundsError::TooLong(name));
        }
    }
    match (prefix, start, end) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(BoundsError::PrefixAndBounds),
        (Some(p), None, None) => Ok(KeyRange {
            start: Bytes::copy_from_slice(p.as_bytes()),
            end: prefix_end(p.as_bytes()).map(Bytes::from),
        }),
        (None, start, end) => {
            let start = start.unwrap_or_default();
            if let Some(end) = end.filter(|e| start > *e) {
                return Err(BoundsError::StartAfterEnd {
                    start: start.to_string(),
                    end: end.to_string(),
                });
            }
            Ok(KeyRange {
                start: Bytes::copy_from_slice(start.as_bytes()),
                end: end.map(|e| Bytes::copy_from_slice(e.as_bytes())),
            })
        }
    }
}

/// A page's limit: [`DEFAULT_LIMIT`] when absent, else 1..=[`MAX_LIMIT`].
pub fn limit(limit: Option<usize>) -> Result<usize, String> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(format!("limit must be within 1..={MAX_LIMIT}, got {n}")),
    }
}

pub fn bounds_error(e: BoundsError) -> ApiError {
    let code = match e {
        BoundsError::PrefixAndBounds => code::INVALID_QUERY,
        BoundsError::StartAfterEnd { .. } | BoundsError::TooLong(_) => code::INVALID_RANGE,
    };
    ApiError::bad_request(code, e.to_string())
}

fn token_error(e: TokenError) -> ApiError {
    ApiError::bad_request(code::INVALID_PAGE_TOKEN, e.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeParams {
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    limit: Option<usize>,
    page_token: Option<String>,
    #[serde(default)]
    keys_only: bool,
    #[serde(default)]
    count_only: bool,
    #[serde(default)]
    consistent: bool,
}

/// A page as `GET /v1/kv` answers it.
#[derive(Debug, Serialize)]
struct PageAnswer {
    items: Vec<JsonItem>,
    count: usize,
    index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

/// The answer to a page of `range` (the token continues `range`, whatever
/// part of it this page was read from); `clock` counts its keys' TTLs.
/// Only the items `keep` says the caller may read are answered; the token
/// continues after the last key read, kept or not.
fn page_answer(
    range: &KeyRange,
    page: &Page,
    clock: &Clock,
    keep: impl Fn(&[u8]) -> bool,
) -> PageAnswer {
    let next_page_token = match page.items.last() {
        Some(last) if page.more => Some(token::encode(range, &last.key)),
        _ => None,
    };
    let items: Vec<JsonItem> = page
        .items
        .iter()
        .filter(|i| keep(&i.key))
        .map(|i| JsonItem::new(i, clock))
        .collect();
    PageAnswer {
        count: items.len(),
        items,
        index: page.index,
        next_page_token,
    }
}

/// What of `rest` a caller's read covers: for a token, from the first of
/// its readable parts to the end of the last (`None`: none of it), so a
/// single readable prefix is read exactly; with several, what lies between
/// them is read and left out of the page.
fn readable_span(caller: &Caller, rest: &KeyRange) -> Option<KeyRange> {
    let Caller::Token(g) = caller else {
        return Some(rest.clone());
    };
    let parts = g.readable_parts(rest);
    let (first, last) = (parts.first()?, parts.last()?);
    Some(KeyRange {
        start: first.start.clone(),
        end: last.end.clone(),
    })
}

/// The number of keys of `rest` the caller may read: for a token, the sum
/// of the counts of its readable parts (each read at its own index; the
/// answer names the last).
async fn count(st: &Shared, caller: &Caller, rest: KeyRange) -> Result<Response, ApiError> {
    let parts = match caller {
        Caller::Anyone => vec![rest],
        Caller::Token(g) => g.readable_parts(&rest),
    };
    let (mut total, mut at) = (0, st.engine.state().applied_index());
    for part in parts {
        let engine = st.engine.clone();
        let (n, index) = blocking(move || engine.count(&part)).await?;
        total += n;
        at = index;
    }
    Ok(Json(json!({"count": total, "index": at})).into_response())
}

/// `GET /v1/kv`: one page of a range, or its count.
pub async fn list(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    Params(p): Params<RangeParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    let range = key_range(p.prefix.as_deref(), p.start.as_deref(), p.end.as_deref())
        .map_err(bounds_error)?;
    caller.check(Action::ReadFiltered(&range))?;
    let limit = limit(p.limit).map_err(|m| ApiError::bad_request(code::INVALID_LIMIT, m))?;
    let rest = match &p.page_token {
        Some(t) => token::after(&range, &token::decode(&range, t).map_err(token_error)?),
        None => range.clone(),
    };
    st.read_barrier(&uri, p.consistent).await?;
    if p.count_only {
        return count(&st, &caller, rest).await;
    }
    let engine = st.engine.clone();
    let page = match readable_span(&caller, &rest) {
        Some(span) => {
            let read = RangeRead {
                range: span,
                limit,
                keys_only: p.keys_only,
            };
            blocking(move || engine.range(&read)).await?
        }
        None => Page {
            items: Vec::new(),
            more: false,
            index: engine.state().applied_index(),
        },
    };
    let leases = lease_deadline(&st.engine);
    let clock = Clock {
        now_ms: st.engine.wall_ms(),
        lease_deadline: &leases,
    };
    let answer = page_answer(&range, &page, &clock, |k| caller.may_read(k));
    Ok(Json(answer).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use crate::model::{Item, KeyMeta};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn bounds() {
        assert_eq!(key_range(None, None, None), Ok(KeyRange::prefix(b"")));
        assert_eq!(
            key_range(Some("a/"), None, None),
            Ok(KeyRange::prefix(b"a/"))
        );
        assert_eq!(
            key_range(None, Some("a"), Some("c")),
            Ok(KeyRange {
                start: b("a"),
                end: Some(b("c"))
            })
        );
        assert_eq!(
            key_range(None, None, Some("c")),
            Ok(KeyRange {
                start: b(""),
                end: Some(b("c"))
            })
        );
        assert!(
            key_range(None, Some("b"), Some("b")).is_ok(),
            "empty is fine"
        );
        assert_eq!(
            key_range(Some("a"), Some("a"), None),
            Err(BoundsError::PrefixAndBounds)
        );
        assert_eq!(
            key_range(Some("a"), None, Some("b")),
            Err(BoundsError::PrefixAndBounds)
        );
        assert!(matches!(
            key_range(None, Some("b"), Some("a")),
            Err(BoundsError::StartAfterEnd { .. })
        ));
        assert!(matches!(
            key_range(None, Some("ab"), Some("a")),
            Err(BoundsError::StartAfterEnd { .. })
        ));
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            key_range(None, None, Some(&long)),
            Err(BoundsError::TooLong("end"))
        );
        assert!(key_range(Some(&long[1..]), None, None).is_ok());
    }

    #[test]
    fn limits() {
        assert_eq!(limit(None), Ok(DEFAULT_LIMIT));
        assert_eq!(limit(Some(1)), Ok(1));
        assert_eq!(limit(Some(MAX_LIMIT)), Ok(MAX_LIMIT));
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }

    fn page(keys: &[&str], more: bool) -> Page {
        Page {
            items: keys
                .iter()
                .map(|k| Item {
                    key: b(k),
                    value: Some(Bytes::from_static(b"\xff")),
                    meta: KeyMeta::default(),
                    expiry: Expiry::Never,
                })
                .collect(),
            more,
            index: 7,
        }
    }

    #[test]
    fn a_page_has_a_token_exactly_when_the_range_goes_on() {
        let r = KeyRange::prefix(b"k");
        let no_leases = |_| None;
        let clock = Clock {
            now_ms: 0,
            lease_deadline: &no_leases,
        };
        let page_answer = |r: &KeyRange, p: &Page| page_answer(r, p, &clock, |_| true);
        let last = page_answer(&r, &page(&["k1", "k2"], false));
        assert_eq!(last.next_page_token, None);
        assert_eq!((last.count, last.index), (2, 7));
        let more = page_answer(&r, &page(&["k1", "k2"], true));
        let t = more.next_page_token.expect("a token");
        assert_eq!(token::decode(&r, &t).unwrap(), b("k2"));
        let json = serde_json::to_value(&more.items[0]).unwrap();
        assert_eq!(json["value"]["base64"], "/w==");
        assert!(page_answer(&r, &page(&[], false)).next_page_token.is_none());
    }
}
