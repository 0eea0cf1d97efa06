//! `GET /v1/search` and `GET /v1/similar` (docs/DESIGN.md §2, §7), over the node's
//! own index: like other reads, served locally on every node.
//!
//! - `/v1/search?q=TEXT[&limit=N][&offset=M]`: BM25. Documents holding
//!   more of the query's distinct terms come first, then higher score,
//!   then key ascending.
//! - `/v1/similar?q=TEXT` or `/v1/similar?key=K` (more like `K`'s value,
//!   `K` itself left out), `[&top_k=N]` (alias `limit`) `[&offset=M]`:
//!   TF-IDF cosine similarity, then key ascending.
//!
//! Answer: `{"hits": [{"key", "score"}], "total": T, "offset": M,
//! "next_offset": M' | null}`, where `total` counts every document that
//! matched (shared a term) and `next_offset` is where the next page
//! starts, if there is one.
//!
//! Refused with 400: no `--index` (`index_disabled`), a query with no
//! words (`empty_query`), longer than 1024 bytes or 64 words
//! (`query_too_long`), `limit`/`top_k` outside 1..=1000 (`invalid_limit`),
//! `offset` over 10000 (`invalid_offset`), both or neither of `q` and `key`
//! (`invalid_query`). `key=` of a key that does not exist: 404.

use kvproto::code;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::access::Caller;
use super::query::Params;
use super::{validate_key, ApiError, AppState};
use crate::auth::Action;
use crate::index::{self, Index, Page, QueryError};
use crate::model::KeyRange;

const DEFAULT_LIMIT: usize = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchParams {
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SimilarParams {
    q: Option<String>,
    key: Option<String>,
    top_k: Option<usize>,
    limit: Option<usize>,
    offset: Option<usize>,
}

fn index_of(st: &AppState) -> Result<Arc<Index>, ApiError> {
    st.engine.state().index().cloned().ok_or_else(|| {
        ApiError::bad_request(
            code::INDEX_DISABLED,
            "search is off on this node: start kvd with --index to use /v1/search and /v1/similar",
        )
    })
}

fn page_bounds(limit: Option<usize>, offset: Option<usize>) -> Result<(usize, usize), ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > index::MAX_LIMIT {
        return Err(ApiError::bad_request(
            code::INVALID_LIMIT,
            format!(
                "limit/top_k must be within 1..={}, got {limit}",
                index::MAX_LIMIT
            ),
        ));
    }
    let offset = offset.unwrap_or(0);
    if offset > index::MAX_OFFSET {
        return Err(ApiError::bad_request(
            code::INVALID_OFFSET,
            format!("offset must be at most {}, got {offset}", index::MAX_OFFSET),
        ));
    }
    Ok((limit, offset))
}

fn query_error(e: QueryError) -> ApiError {
    let code = match e {
        QueryError::Empty => code::EMPTY_QUERY,
        QueryError::TooLong(_) | QueryError::TooManyTerms(_) => code::QUERY_TOO_LONG,
    };
    ApiError::bad_request(code, e.to_string())
}

/// The part of the ranking a query reads: the page asked for, or for a
/// caller whose reads are filtered, the whole ranking a page can reach,
/// which [`narrow`] then filters and pages.
fn window(caller: &Caller, offset: usize, limit: usize) -> (usize, usize) {
    match caller.filter() {
        None => (offset, limit),
        Some(_) => (0, index::MAX_OFFSET + index::MAX_LIMIT),
    }
}

/// The page at `offset` of the ranking of the keys the caller may read
/// (`total` counts those, within the reach of a page).
fn narrow(caller: &Caller, page: Page, offset: usize, limit: usize) -> Page {
    let Some(g) = caller.filter() else {
        return page;
    };
    let readable: Vec<_> = page
        .hits
        .into_iter()
        .filter(|h| g.may_read(h.key.as_bytes()))
        .collect();
    Page {
        total: readable.len(),
        hits: readable.into_iter().skip(offset).take(limit).collect(),
    }
}

fn answer(page: Page, offset: usize) -> Response {
    let end = offset + page.hits.len();
    let next = (page.total > end && !page.hits.is_empty()).then_some(end);
    let hits: Vec<_> = page
        .hits
        .into_iter()
        .map(|h| json!({"key": h.key, "score": h.score}))
        .collect();
    Json(json!({
        "hits": hits,
        "total": page.total,
        "offset": offset,
        "next_offset": next,
    }))
    .into_response()
}

/// Runs one query, timing it into the index's histogram (by `kind`) when
/// it is answered.
fn timed<T>(
    st: &AppState,
    kind: &str,
    query: impl FnOnce() -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let answer = query()?;
    st.metrics
        .index
        .query_duration_seconds
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    Ok(answer)
}

pub(super) async fn search(
    State(st): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Params(p): Params<SearchParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    caller.check(Action::ReadFiltered(&KeyRange::prefix(b"")))?;
    let ix = index_of(&st)?;
    let (limit, offset) = page_bounds(p.limit, p.offset)?;
    let q = p.q.unwrap_or_default();
    let (from, n) = window(&caller, offset, limit);
    let page = timed(&st, "search", || {
        ix.search(&q, from, n).map_err(query_error)
    })?;
    Ok(answer(narrow(&caller, page, offset, limit), offset))
}

pub(super) async fn similar(
    State(st): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Params(p): Params<SimilarParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    caller.check(Action::ReadFiltered(&KeyRange::prefix(b"")))?;
    if let Some(key) = &p.key {
        // More like a key is a read of it.
        caller.check(Action::Read(key.as_bytes()))?;
    }
    let ix = index_of(&st)?;
    if p.top_k.is_some() && p.limit.is_some() {
        return Err(ApiError::bad_request(
            code::INVALID_QUERY,
            "give top_k or limit, not both",
        ));
    }
    let (limit, offset) = page_bounds(p.top_k.or(p.limit), p.offset)?;
    let (from, n) = window(&caller, offset, limit);
    let page = timed(&st, "similar", || match (p.q, p.key) {
        (Some(q), None) => ix.similar_text(&q, from, n).map_err(query_error),
        (None, Some(key)) => {
            validate_key(&key).map_err(|m| ApiError::bad_request(code::INVALID_KEY, m))?;
            match ix.similar_key(&key, from, n) {
                Some(page) => Ok(page),
                // Present but without text: nothing is like it.
                None if st.engine.get(key.as_bytes()).is_some() => Ok(Page::default()),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    code::KEY_NOT_FOUND,
                    format!("key {key:?} not found"),
                )),
            }
        }
        _ => Err(ApiError::bad_request(
            code::INVALID_QUERY,
            "give exactly one of q (text) and key (more like this key's value)",
        )),
    })?;
    Ok(answer(narrow(&caller, page, offset, limit), offset))
}
