//! The expiry of a write (docs/DESIGN.md §2.15, §2.16): `ttl_ms`, `lease`
//! or `keep_ttl`, at most one, as a PUT's query parameters or the fields of
//! a bulk item or a transaction put. Parsed here, by one set of rules, into
//! a [`WriteTtl`]; the deadline is fixed by [`WriteTtl::expiry`] against the
//! wall clock of the node that takes the write.
//!
//! Every malformed value (not a number, negative, zero, over ten years, a
//! lease id of 0) and every pair is 400 `invalid_ttl`, whatever carried it,
//! so a client has one code for "the expiry is wrong".

use super::ApiError;
use crate::model::{Expiry, MAX_TTL_MS};
use kvproto::code;

/// What a write asks for its key's expiry, before the clock is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteTtl {
    /// None of the three: the key becomes permanent.
    #[default]
    Never,
    /// `ttl_ms=N`: a deadline N ms from now.
    Ttl(u64),
    /// `lease=ID`.
    Lease(u64),
    /// `keep_ttl=true`.
    Keep,
}

impl WriteTtl {
    /// The model's expiry, the deadline counted from `now_ms` (this node's
    /// wall clock), saturating.
    pub fn expiry(self, now_ms: u64) -> Expiry {
        match self {
            WriteTtl::Never => Expiry::Never,
            WriteTtl::Ttl(ms) => Expiry::At(now_ms.saturating_add(ms)),
            WriteTtl::Lease(id) => Expiry::Lease(id),
            WriteTtl::Keep => Expiry::Keep,
        }
    }

    pub fn is_lease(self) -> bool {
        matches!(self, WriteTtl::Lease(_))
    }
}

/// 400 `invalid_ttl` about `what` (a parameter or a field's path; empty:
/// the request as a whole).
pub fn invalid(what: &str, why: impl std::fmt::Display) -> ApiError {
    let message = match what {
        "" => why.to_string(),
        _ => format!("{what}: {why}"),
    };
    ApiError::bad_request(code::INVALID_TTL, message)
}

/// A TTL in ms: a decimal integer in 1 ..= [`MAX_TTL_MS`].
pub fn ttl_ms(text: &str) -> Result<u64, String> {
    match decimal(text) {
        Some(n @ 1..=MAX_TTL_MS) => Ok(n),
        _ => Err(format!(
            "a TTL is an integer of milliseconds in 1..={MAX_TTL_MS} (ten years), got {text:?}"
        )),
    }
}

/// A lease id: a decimal integer of at least 1 (a grant's log index).
pub fn lease_id(text: &str) -> Result<u64, String> {
    match decimal(text) {
        Some(n @ 1..) => Ok(n),
        _ => Err(format!(
            "a lease id is a positive integer (the index of its grant), got {text:?}"
        )),
    }
}

/// ASCII digits only (no sign, no space, no fraction) that fit a u64.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The one of the three given, or why not: `ttl` and `lease` as parsed,
/// `keep` whether `keep_ttl` is true (false is as absent). `path` names the
/// object that carries them in errors (empty for the query).
fn choose(
    path: &str,
    ttl: Option<Result<u64, String>>,
    lease: Option<Result<u64, String>>,
    keep: bool,
) -> Result<WriteTtl, ApiError> {
    let given = usize::from(ttl.is_some()) + usize::from(lease.is_some()) + usize::from(keep);
    if given > 1 {
        return Err(invalid(
            path,
            "give at most one of ttl_ms, lease and keep_ttl",
        ));
    }
    let field = |name: &str| match path {
        "" => name.to_string(),
        _ => format!("{path}.{name}"),
    };
    Ok(match (ttl, lease) {
        (Some(t), _) => WriteTtl::Ttl(t.map_err(|m| invalid(&field("ttl_ms"), m))?),
        (_, Some(l)) => WriteTtl::Lease(l.map_err(|m| invalid(&field("lease"), m))?),
        _ if keep => WriteTtl::Keep,
        _ => WriteTtl::Never,
    })
}

/// The expiry parameters of `PUT /v1/kv/{key}`, as the query carries them
/// (the numbers as text, so that any malformed one is `invalid_ttl`).
pub fn from_query(
    ttl_ms_text: Option<&str>,
    lease_text: Option<&str>,
    keep_ttl: bool,
) -> Result<WriteTtl, ApiError> {
    choose(
        "",
        ttl_ms_text.map(ttl_ms),
        lease_text.map(lease_id),
        keep_ttl,
    )
}

/// The expiry fields of a bulk item or a transaction put (`path` names
/// it: `items[3]`, `success[0].put`). The numbers come as any JSON, so
/// that a string or a fraction is `invalid_ttl` too, not a shape error.
pub fn from_json(
    path: &str,
    ttl_ms_field: Option<&serde_json::Value>,
    lease_field: Option<&serde_json::Value>,
    keep_ttl: bool,
) -> Result<WriteTtl, ApiError> {
    choose(
        path,
        ttl_ms_field.map(|v| json_number(v, ttl_ms)),
        lease_field.map(|v| json_number(v, lease_id)),
        keep_ttl,
    )
}

/// Deserializes an optional field so that `null` is a value (which the
/// rules then refuse) rather than absence: `"lease": null` is not a lease.
pub fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    <serde_json::Value as serde::Deserialize>::deserialize(d).map(Some)
}

/// A lease grant's `ttl_ms` field (`path` names it).
pub fn ttl_field(path: &str, v: &serde_json::Value) -> Result<u64, ApiError> {
    json_number(v, ttl_ms).map_err(|m| invalid(path, m))
}

/// A JSON integer checked by `rule` (a string, a fraction or a negative
/// number fails it like any other malformed text).
fn json_number(
    v: &serde_json::Value,
    rule: fn(&str) -> Result<u64, String>,
) -> Result<u64, String> {
    match v {
        serde_json::Value::Number(n) => rule(&n.to_string()),
        other => rule(&other.to_string()).map_err(|m| format!("{m}; it must be a JSON number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(ttl: Option<&str>, lease: Option<&str>, keep: bool) -> Result<WriteTtl, &'static str> {
        from_query(ttl, lease, keep).map_err(|e| {
            assert_eq!(e.status.as_u16(), 400);
            e.code
        })
    }

    #[test]
    fn one_of_the_three_from_the_query() {
        assert_eq!(query(None, None, false), Ok(WriteTtl::Never));
        assert_eq!(query(Some("1"), None, false), Ok(WriteTtl::Ttl(1)));
        assert_eq!(
            query(Some("315360000000"), None, false),
            Ok(WriteTtl::Ttl(MAX_TTL_MS))
        );
        assert_eq!(query(Some("0042"), None, false), Ok(WriteTtl::Ttl(42)));
        assert_eq!(query(None, Some("7"), false), Ok(WriteTtl::Lease(7)));
        assert_eq!(query(None, None, true), Ok(WriteTtl::Keep));
    }

    #[test]
    fn every_bad_ttl_or_pair_is_invalid_ttl() {
        for bad in [
            "0",
            "-1",
            "+5",
            "315360000001",
            "18446744073709551616",
            "99999999999999999999999",
            "1.5",
            "1e3",
            "abc",
            "",
            " 5",
        ] {
            assert_eq!(query(Some(bad), None, false), Err("invalid_ttl"), "{bad:?}");
        }
        for bad in ["0", "-3", "x", "", "18446744073709551616"] {
            assert_eq!(query(None, Some(bad), false), Err("invalid_ttl"), "{bad:?}");
        }
        assert_eq!(query(Some("5"), Some("1"), false), Err("invalid_ttl"));
        assert_eq!(query(Some("5"), None, true), Err("invalid_ttl"));
        assert_eq!(query(None, Some("1"), true), Err("invalid_ttl"));
        assert_eq!(query(Some("5"), Some("1"), true), Err("invalid_ttl"));
        // A pair is refused even when one of them is malformed.
        assert_eq!(query(Some("0"), Some("1"), false), Err("invalid_ttl"));
    }

    fn fields(v: serde_json::Value) -> Result<WriteTtl, String> {
        let keep = v.get("keep_ttl").and_then(|k| k.as_bool()).unwrap_or(false);
        from_json("items[2]", v.get("ttl_ms"), v.get("lease"), keep).map_err(|e| {
            assert_eq!(e.code, "invalid_ttl");
            e.message
        })
    }

    #[test]
    fn the_json_fields_follow_the_same_rules_and_name_the_field() {
        assert_eq!(fields(json!({})), Ok(WriteTtl::Never));
        assert_eq!(fields(json!({"ttl_ms": 500})), Ok(WriteTtl::Ttl(500)));
        assert_eq!(fields(json!({"lease": 9})), Ok(WriteTtl::Lease(9)));
        assert_eq!(fields(json!({"keep_ttl": true})), Ok(WriteTtl::Keep));
        assert_eq!(
            fields(json!({"keep_ttl": false, "ttl_ms": 5})),
            Ok(WriteTtl::Ttl(5))
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("500"),
            json!({"ms": 5}),
            json!(true),
            json!(1e30),
            json!(315360000001u64),
        ] {
            let m = fields(json!({"ttl_ms": bad})).unwrap_err();
            assert!(m.starts_with("items[2].ttl_ms:"), "{bad}: {m}");
        }
        for bad in [json!(0), json!("3"), json!(-2)] {
            let m = fields(json!({"lease": bad})).unwrap_err();
            assert!(m.starts_with("items[2].lease:"), "{bad}: {m}");
        }
        let m = fields(json!({"ttl_ms": 5, "lease": 1})).unwrap_err();
        assert!(m.starts_with("items[2]:"), "{m}");
        assert!(fields(json!({"lease": 1, "keep_ttl": true})).is_err());
    }

    #[test]
    fn the_deadline_is_counted_from_the_clock_and_saturates() {
        assert_eq!(WriteTtl::Ttl(500).expiry(1_000), Expiry::At(1_500));
        assert_eq!(
            WriteTtl::Ttl(MAX_TTL_MS).expiry(u64::MAX - 1),
            Expiry::At(u64::MAX)
        );
        assert_eq!(WriteTtl::Never.expiry(5), Expiry::Never);
        assert_eq!(WriteTtl::Lease(3).expiry(5), Expiry::Lease(3));
        assert_eq!(WriteTtl::Keep.expiry(5), Expiry::Keep);
    }
}
