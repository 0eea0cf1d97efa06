//! Query parameters, the same way on every route (docs/DESIGN.md §2.3): a
//! route takes exactly the fields of its parameter struct. Any other name
//! is 400 `unknown_parameter` naming it (nothing is silently ignored), a
//! name given twice 400 `invalid_query`, and a value that does not parse
//! (a boolean other than `true`/`false`, a number that is not one) 400
//! `invalid_query`.
//!
//! [`Params<T>`] is the extractor every handler takes, [`NoParams`] the
//! struct of routes without parameters. The names a route takes are read
//! from `T` itself ([`field_names`]), so the list cannot drift from the
//! struct.

use std::collections::HashSet;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use kvproto::code;
use serde::de::{self, DeserializeOwned, Visitor};
use serde::Deserialize;

use super::ApiError;

/// The query of a route that takes no parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A route's query parameters, checked by name before they are parsed.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        if let Some(query) = parts.uri.query() {
            check_names(query, field_names::<T>())?;
        }
        let Query(params) = Query::<T>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad_request(code::INVALID_QUERY, e.body_text()))?;
        Ok(Params(params))
    }
}

/// Every parameter of `query` is one of `allowed`, and none comes twice.
/// Names are decoded as `application/x-www-form-urlencoded` (`+` is a
/// space, then percent-decoding), as the parser of the values does.
pub fn check_names(query: &str, allowed: &[&str]) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw = pair.split_once('=').map_or(pair, |(name, _)| name);
        let name = decode(raw);
        if !allowed.contains(&name.as_str()) {
            let takes = match allowed {
                [] => "no query parameters".to_string(),
                _ => format!("only {}", allowed.join(", ")),
            };
            return Err(ApiError::bad_request(
                code::UNKNOWN_PARAMETER,
                format!("unknown query parameter {name:?}: this route takes {takes}"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(ApiError::bad_request(
                code::INVALID_QUERY,
                format!("query parameter {name:?} is given more than once"),
            ));
        }
    }
    Ok(())
}

fn decode(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The field names of a struct with derived `Deserialize`: the derive
/// hands them to `deserialize_struct`, where [`Introspect`] catches them.
/// Empty for anything else.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names = None;
    // The introspector always fails (it has no data to give); the names
    // are what it was asked for.
    let _ = T::deserialize(Introspect(&mut names));
    names.unwrap_or_default()
}

struct Introspect<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for Introspect<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("field names only"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Two {
        consistent: Option<bool>,
        #[serde(rename = "page_token")]
        token: Option<String>,
    }

    #[test]
    fn field_names_come_from_the_struct() {
        assert_eq!(field_names::<Two>(), ["consistent", "page_token"]);
        assert!(field_names::<NoParams>().is_empty());
        assert!(field_names::<u64>().is_empty());
    }

    fn code_of(query: &str, allowed: &[&str]) -> Option<&'static str> {
        check_names(query, allowed).err().map(|e| e.code)
    }

    #[test]
    fn only_the_routes_names_once_each() {
        let allowed = ["prefix", "limit", "keys_only"];
        for good in [
            "",
            "prefix=a",
            "prefix=a&limit=3",
            "&&limit=1&",
            "keys_only",
            "pre%66ix=a",
        ] {
            assert_eq!(code_of(good, &allowed), None, "{good}");
        }
        for unknown in [
            "ttl_ms=300",
            "prefix=a&Limit=3",
            "=5",
            "prefix+=a",
            "limit%00=1",
        ] {
            assert_eq!(
                code_of(unknown, &allowed),
                Some("unknown_parameter"),
                "{unknown}"
            );
        }
        for twice in [
            "limit=1&limit=2",
            "prefix=a&pre%66ix=b",
            "keys_only&keys_only=true",
        ] {
            assert_eq!(code_of(twice, &allowed), Some("invalid_query"), "{twice}");
        }
        assert_eq!(code_of("x=1", &[]), Some("unknown_parameter"));
    }

    #[test]
    fn the_refusal_names_the_parameter_and_what_the_route_takes() {
        let e = check_names("debug_flaky=0&ttl_ms=300", &["debug_flaky"]).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("\"ttl_ms\""), "{}", e.message);
        assert!(e.message.contains("only debug_flaky"), "{}", e.message);
        let e = check_names("a%20b=1", &[]).unwrap_err();
        assert!(e.message.contains("\"a b\""), "{}", e.message);
        assert!(e.message.contains("no query parameters"), "{}", e.message);
    }
}
