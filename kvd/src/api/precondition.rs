//! Conditional writes (docs/DESIGN.md §2.12): `If-Match` and
//! `If-None-Match` on `PUT` and `DELETE /v1/kv/{key}`, parsed strictly,
//! and turned into a transaction (the compare, the write, and a `get` of
//! the key when the compare fails) so that the check and the write are one
//! step of the WAL writer.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use kvproto::code;

use super::wire::Current;
use super::ApiError;
use crate::model::{Cmp, Compare, OpResult, Target, Txn, TxnOp, TxnResult};
use crate::node::WriteError;

/// What a conditional write asks of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// `If-Match: "N"`: the key exists with `mod_index` N.
    ModIndex(u64),
    /// `If-Match: *`: the key exists.
    Exists,
    /// `If-None-Match: *`: the key does not exist (not on DELETE).
    Absent,
}

/// The request's precondition headers, parsed: an extractor, so that the
/// headers are read in place (the hot unconditional PUT copies nothing).
/// It refuses nothing itself: a masterless node refuses any precondition,
/// whatever its form (its own ETags are stamps), before it looks at one
/// ([`Condition::check`]).
#[derive(Debug)]
pub struct Condition {
    /// The request has an `If-Match` or `If-None-Match` header.
    present: bool,
    parsed: Result<Option<Precondition>, String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Condition {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Self, std::convert::Infallible> {
        let h = &parts.headers;
        Ok(Condition {
            present: h.contains_key(header::IF_MATCH) || h.contains_key(header::IF_NONE_MATCH),
            parsed: precondition(h, parts.method == Method::DELETE),
        })
    }
}

impl Condition {
    /// The precondition to write under; `masterless`: the node is in
    /// masterless mode, where none can hold (409).
    pub fn check(self, masterless: bool) -> Result<Option<Precondition>, ApiError> {
        if self.present && masterless {
            return Err(WriteError::UnsupportedInMasterless.into());
        }
        self.parsed
            .map_err(|m| ApiError::bad_request(code::INVALID_PRECONDITION, m))
    }
}

fn values<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect()
}

/// The precondition of a request's headers (`delete`: the request is a
/// DELETE), or why the headers are not one of §2.12's forms.
pub fn precondition(headers: &HeaderMap, delete: bool) -> Result<Option<Precondition>, String> {
    parse(
        &values(headers, &header::IF_MATCH),
        &values(headers, &header::IF_NONE_MATCH),
        delete,
    )
}

/// [`precondition`] over the headers' values, each header given as every
/// line it came in.
pub fn parse(
    if_match: &[&[u8]],
    if_none_match: &[&[u8]],
    delete: bool,
) -> Result<Option<Precondition>, String> {
    match (if_match, if_none_match) {
        ([], []) => Ok(None),
        ([m], []) => match m.trim_ascii() {
            b"*" => Ok(Some(Precondition::Exists)),
            tag => mod_index_tag(tag).map(|n| Some(Precondition::ModIndex(n))),
        },
        ([], [n]) if delete => Err(format!(
            "If-None-Match {:?} on DELETE: a delete of an absent key has nothing to do",
            String::from_utf8_lossy(n)
        )),
        ([], [n]) => match n.trim_ascii() {
            b"*" => Ok(Some(Precondition::Absent)),
            other => Err(format!(
                "If-None-Match must be * (create only), got {:?}",
                String::from_utf8_lossy(other)
            )),
        },
        ([_, ..], [_, ..]) => Err("give If-Match or If-None-Match, not both".to_string()),
        _ => Err("If-Match and If-None-Match take one value each, not a list".to_string()),
    }
}

/// `"N"`: a strong tag of a decimal mod_index without leading zeros.
fn mod_index_tag(tag: &[u8]) -> Result<u64, String> {
    let bad = || {
        format!(
            "If-Match must be * or one strong tag \"N\" with N a mod_index (an ETag of this API), got {:?}",
            String::from_utf8_lossy(tag)
        )
    };
    let digits = tag
        .strip_prefix(b"\"")
        .and_then(|t| t.strip_suffix(b"\""))
        .ok_or_else(bad)?;
    let canonical = matches!(digits, [b'0'] | [b'1'..=b'9', ..]);
    if !canonical || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(bad)
}

impl Precondition {
    /// The compares that hold exactly when the precondition does.
    pub fn compares(self, key: &Bytes) -> Vec<Compare> {
        let on = |target, cmp| Compare {
            key: key.clone(),
            target,
            cmp,
        };
        match self {
            // An absent key has mod_index 0 too: "exists" tells them apart.
            Precondition::ModIndex(n) => vec![
                on(Target::Exists(true), Cmp::Eq),
                on(Target::ModIndex(n), Cmp::Eq),
            ],
            Precondition::Exists => vec![on(Target::Exists(true), Cmp::Eq)],
            Precondition::Absent => vec![on(Target::Exists(false), Cmp::Eq)],
        }
    }
}

/// The transaction of a conditional `write` of `key`: when the
/// precondition fails, a `get` of the key says what it is now.
pub fn conditional_txn(key: Bytes, pre: Precondition, write: TxnOp) -> Txn {
    Txn {
        compare: pre.compares(&key),
        success: vec![write],
        failure: vec![TxnOp::Get { key }],
    }
}

/// 412 `precondition_failed` from the failure branch's answer, with the
/// key's current state in the body and its ETag.
pub fn failed(result: &TxnResult) -> ApiError {
    let meta = match result.results.first() {
        Some(OpResult::Get(Some(item))) => Some(item.meta),
        _ => None,
    };
    let current = Current::of(meta.as_ref());
    let message = match meta {
        Some(m) => format!(
            "the key's mod_index is {}: the write did not happen",
            m.mod_index
        ),
        None => "the key does not exist: the write did not happen".to_string(),
    };
    let e = ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        code::PRECONDITION_FAILED,
        message,
    )
    .with_field("current", serde_json::json!(current));
    match meta {
        Some(m) => e.with_header("etag", etag(m.mod_index)),
        None => e,
    }
}

/// The ETag of a key outside masterless mode: its quoted mod_index.
pub fn etag(mod_index: u64) -> String {
    format!("\"{mod_index}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Expiry;
    use crate::model::{Item, KeyMeta};

    fn put(if_match: &[&str], if_none_match: &[&str]) -> Result<Option<Precondition>, String> {
        let m: Vec<&[u8]> = if_match.iter().map(|s| s.as_bytes()).collect();
        let n: Vec<&[u8]> = if_none_match.iter().map(|s| s.as_bytes()).collect();
        parse(&m, &n, false)
    }

    #[test]
    fn the_good_forms() {
        assert_eq!(put(&[], &[]), Ok(None));
        assert_eq!(put(&["\"9\""], &[]), Ok(Some(Precondition::ModIndex(9))));
        assert_eq!(put(&["\"0\""], &[]), Ok(Some(Precondition::ModIndex(0))));
        assert_eq!(
            put(&[" \"18446744073709551615\" "], &[]),
            Ok(Some(Precondition::ModIndex(u64::MAX)))
        );
        assert_eq!(put(&["*"], &[]), Ok(Some(Precondition::Exists)));
        assert_eq!(put(&[], &["*"]), Ok(Some(Precondition::Absent)));
        assert_eq!(
            parse(&[b"\"4\""], &[], true),
            Ok(Some(Precondition::ModIndex(4)))
        );
        assert_eq!(parse(&[b"*"], &[], true), Ok(Some(Precondition::Exists)));
    }

    #[test]
    fn every_malformed_form_is_refused() {
        for tag in [
            "W/\"9\"",
            "\"9\", \"10\"",
            "9",
            "\"abc\"",
            "\"\"",
            "\"",
            "",
            "\"-1\"",
            "\"+1\"",
            "\"09\"",
            "\"1 \"",
            "\"18446744073709551616\"",
            "\"1.2.3\"",
            "'9'",
            "**",
            "* ,\"1\"",
        ] {
            assert!(put(&[tag], &[]).is_err(), "If-Match: {tag}");
        }
        for tag in ["\"9\"", "W/\"9\"", "", "**", "*, *"] {
            assert!(put(&[], &[tag]).is_err(), "If-None-Match: {tag}");
        }
        assert!(put(&["*"], &["*"]).is_err(), "both");
        assert!(put(&["\"1\"", "\"2\""], &[]).is_err(), "two If-Match lines");
        assert!(put(&[], &["*", "*"]).is_err(), "two If-None-Match lines");
        assert!(
            parse(&[], &[b"*"], true).is_err(),
            "If-None-Match on DELETE"
        );
    }

    fn item(meta: KeyMeta) -> Item {
        Item {
            key: Bytes::from_static(b"k"),
            value: Some(Bytes::from_static(b"v")),
            meta,
            expiry: Expiry::Never,
        }
    }

    #[test]
    fn the_compares_hold_exactly_when_the_precondition_does() {
        let key = Bytes::from_static(b"k");
        let present = KeyMeta {
            create_index: 2,
            mod_index: 5,
            version: 3,
        };
        let legacy = KeyMeta::default();
        let holds = |pre: Precondition, cur: Option<&KeyMeta>| {
            pre.compares(&key)
                .iter()
                .all(|c| c.holds(cur.map(|m| (m, &b"v"[..]))))
        };
        assert!(holds(Precondition::ModIndex(5), Some(&present)));
        assert!(!holds(Precondition::ModIndex(4), Some(&present)));
        assert!(!holds(Precondition::ModIndex(0), None));
        assert!(holds(Precondition::ModIndex(0), Some(&legacy)));
        assert!(holds(Precondition::Exists, Some(&present)));
        assert!(!holds(Precondition::Exists, None));
        assert!(holds(Precondition::Absent, None));
        assert!(!holds(Precondition::Absent, Some(&present)));
        let txn = conditional_txn(key.clone(), Precondition::Absent, TxnOp::Delete { key });
        assert!(matches!(txn.failure[..], [TxnOp::Get { .. }]));
    }

    #[test]
    fn a_masterless_node_refuses_any_precondition_first() {
        let c = |present, parsed| Condition { present, parsed };
        let refused = c(true, Err("a stamp tag".to_string()))
            .check(true)
            .unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (409, "unsupported_in_masterless")
        );
        let refused = c(true, Ok(Some(Precondition::Exists)))
            .check(true)
            .unwrap_err();
        assert_eq!(refused.code, "unsupported_in_masterless");
        assert_eq!(c(false, Ok(None)).check(true).unwrap(), None);
        let malformed = c(true, Err("W/".to_string())).check(false).unwrap_err();
        assert_eq!(
            (malformed.status.as_u16(), malformed.code),
            (400, "invalid_precondition")
        );
        assert_eq!(
            c(true, Ok(Some(Precondition::Absent)))
                .check(false)
                .unwrap(),
            Some(Precondition::Absent)
        );
    }

    #[test]
    fn a_failed_precondition_says_the_current_state() {
        let meta = KeyMeta {
            create_index: 3,
            mod_index: 9,
            version: 2,
        };
        let e = failed(&TxnResult {
            succeeded: false,
            results: vec![OpResult::Get(Some(item(meta)))],
        });
        assert_eq!(e.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(e.code, "precondition_failed");
        assert_eq!(
            e.fields,
            vec![(
                "current",
                serde_json::json!({"exists": true, "create_index": 3, "mod_index": 9, "version": 2})
            )]
        );
        assert!(e.headers.iter().any(|(n, v)| n == "etag" && v == "\"9\""));
        let absent = failed(&TxnResult {
            succeeded: false,
            results: vec![OpResult::Get(None)],
        });
        assert_eq!(absent.fields[0].1["exists"], false);
        assert!(absent.headers.is_empty());
    }
}
