//! Key rules and how a key travels in a URL.
//!
//! Contract: [`validate_key`] accepts exactly the keys the server accepts
//! (docs/DESIGN.md §2: UTF-8, 1..=1024 bytes, no NUL); [`encode_key`] turns a valid
//! key into a path suffix that the server's wildcard route percent-decodes
//! back to the same key, byte for byte.

use crate::error::{Error, KeyError};

pub use kvproto::MAX_KEY_BYTES;

/// Checks a key against the server's rules (the rule kvd applies, from
/// `kvproto`), so a bad key fails before any network traffic and with the
/// same error whichever node would have seen it.
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    kvproto::validate_key(key.as_bytes()).map_err(|e| match e {
        kvproto::KeyError::Empty => KeyError::Empty,
        kvproto::KeyError::TooLong { len } => KeyError::TooLong { len },
        kvproto::KeyError::ContainsNul { at } => KeyError::ContainsNul { at },
        // A `&str` is UTF-8.
        kvproto::KeyError::NotUtf8 => unreachable!("a &str is UTF-8"),
    })
}

/// Percent-encodes a key for use after `/v1/kv/`.
///
/// Every byte except the RFC 3986 unreserved set (`A-Z a-z 0-9 - . _ ~`) and
/// `/` is encoded. `/` stays literal because keys are often paths
/// (`users/42/name`) and readable URLs help in logs; the server's wildcard
/// route takes the rest of the path either way.
///
/// One exception keeps the mapping exact: URL parsers drop `.` and `..`
/// segments, so a key with such a segment (`a/../b`) gets its `/` encoded as
/// `%2F`, which makes the whole key one segment that no parser touches.
/// A key that *is* `.` or `..` cannot be sent at all; the client's calls
/// refuse it with [`KeyError::DotSegment`].
pub fn encode_key(key: &str) -> String {
    let has_dot_segment = key.split('/').any(|seg| seg == "." || seg == "..");
    let mut out = String::with_capacity(key.len() + key.len() / 2);
    for &b in key.as_bytes() {
        if is_unreserved(b) || (b == b'/' && !has_dot_segment) {
            out.push(char::from(b));
        } else {
            push_pct(&mut out, b);
        }
    }
    out
}

/// Validates a key and returns its request path `/v1/kv/{encoded}`.
pub(crate) fn path_for_key(key: &str) -> Result<String, Error> {
    validate_key(key).map_err(|reason| Error::invalid_key(key, reason))?;
    // Neither form survives URL normalisation, even as %2E (WHATWG treats
    // "%2e" as a dot too), so refuse instead of addressing the wrong key.
    for dots in [".", ".."] {
        if key == dots {
            return Err(Error::invalid_key(key, KeyError::DotSegment(dots)));
        }
    }
    Ok(format!("/v1/kv/{}", encode_key(key)))
}

/// Percent-encodes a query-string value: everything but unreserved bytes, so
/// `&`, `=`, `+` and `#` in search text cannot change the query's meaning.
pub(crate) fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            push_pct(&mut out, b);
        }
    }
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_pct(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0f)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference decoder, standing in for the server's percent-decoding.
    fn decode(s: &str) -> Vec<u8> {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn validation_matches_server_rules() {
        assert_eq!(validate_key(""), Err(KeyError::Empty));
        assert_eq!(validate_key("a"), Ok(()));
        assert_eq!(validate_key(&"x".repeat(MAX_KEY_BYTES)), Ok(()));
        assert_eq!(
            validate_key(&"x".repeat(MAX_KEY_BYTES + 1)),
            Err(KeyError::TooLong { len: 1025 })
        );
        // The limit is in bytes, not characters: 342 three-byte chars = 1026 bytes.
        assert_eq!(
            validate_key(&"€".repeat(342)),
            Err(KeyError::TooLong { len: 1026 })
        );
        assert_eq!(validate_key("ab\0c"), Err(KeyError::ContainsNul { at: 2 }));
        assert_eq!(validate_key("a/b/../c"), Ok(()));
    }

    #[test]
    fn unreserved_and_slash_stay_literal() {
        assert_eq!(encode_key("users/42/name"), "users/42/name");
        assert_eq!(encode_key("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn everything_else_is_encoded() {
        assert_eq!(encode_key("a b"), "a%20b");
        assert_eq!(encode_key("a?b#c"), "a%3Fb%23c");
        assert_eq!(encode_key("100%"), "100%25");
        assert_eq!(encode_key("a+b&c=d"), "a%2Bb%26c%3Dd");
        assert_eq!(encode_key("back\\slash"), "back%5Cslash");
        assert_eq!(encode_key("é"), "%C3%A9");
    }

    #[test]
    fn dot_segments_force_encoded_slashes() {
        assert_eq!(encode_key("a/../b"), "a%2F..%2Fb");
        assert_eq!(encode_key("./x"), ".%2Fx");
        // Dots inside a segment are harmless.
        assert_eq!(encode_key("a/..b/c."), "a/..b/c.");
    }

    #[test]
    fn encoding_round_trips() {
        for key in [
            "plain",
            "with space/and/slash",
            "ünïcödé/🔑",
            "%41 is not A",
            "a/../b",
            "//leading//and//doubled//",
            "\u{1}\u{7f}",
        ] {
            assert_eq!(decode(&encode_key(key)), key.as_bytes(), "{key:?}");
        }
    }

    #[test]
    fn path_for_key_validates_and_refuses_bare_dots() {
        assert_eq!(path_for_key("a b").unwrap(), "/v1/kv/a%20b");
        for bad in ["", ".", "..", "a\0"] {
            let err = path_for_key(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_key", "{bad:?}");
        }
    }

    #[test]
    fn query_values_encode_slash_too() {
        assert_eq!(encode_query_value("a b/c&d=e"), "a%20b%2Fc%26d%3De");
    }

    #[test]
    fn encoded_paths_survive_url_parsing() {
        // The property that matters on the wire: the URL crate reqwest uses
        // must leave the encoded path exactly as we built it.
        for key in ["a/../b", "./x", "x/.", "a b", "q?#", "..a"] {
            let path = path_for_key(key).unwrap();
            let url = reqwest::Url::parse(&format!("http://h:1{path}")).unwrap();
            assert_eq!(url.path(), path, "{key:?}");
        }
    }
}
