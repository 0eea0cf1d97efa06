//! Page tokens of range reads (docs/DESIGN.md §2.11): where the next page
//! starts, bound to the range it belongs to, under a checksum.
//!
//! A token is base64url (no padding) of
//!
//! ```text
//! 0   1   version u8 = 1
//! 1   8   digest u64 of the range (start, end)
//! 9   n   the last key of the page it follows (1..=1024 bytes)
//! 9+n 8   checksum u64 of every byte before it
//! ```
//!
//! Both hashes are fixed-seed, so every node of a release makes and takes
//! the same tokens. The checksum catches a token edited by hand or cut
//! short; the digest a token given with another range (a different
//! `prefix`, `start` or `end`). Neither is a secret: a token is opaque, not
//! signed, and a forged one can only ask for keys of its own range.

use std::hash::{BuildHasher, Hasher};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;

use crate::model::KeyRange;

const VERSION: u8 = 1;
const DIGEST_SEED: u64 = 0x6b76_5f72_616e_6765;
const CHECKSUM_SEED: u64 = 0x6b76_5f74_6f6b_656e;
/// Version, digest and checksum.
const FIXED_BYTES: usize = 1 + 8 + 8;
/// The longest token string a 1024-byte key makes (base64 of 1041 bytes).
const MAX_CHARS: usize = (FIXED_BYTES + kvproto::MAX_KEY_BYTES).div_ceil(3) * 4;

/// Why a token was refused (its message says it to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the page token does not decode (it is not one this API gave out)")]
    Malformed,
    #[error("the page token fails its checksum (it was changed or cut short)")]
    Checksum,
    #[error("the page token belongs to another range (a different prefix, start or end)")]
    OtherRange,
}

fn range_digest(range: &KeyRange) -> u64 {
    let mut h = foldhash::quality::FixedState::with_seed(DIGEST_SEED).build_hasher();
    h.write_usize(range.start.len());
    h.write(&range.start);
    match &range.end {
        Some(end) => {
            h.write_u8(1);
            h.write_usize(end.len());
            h.write(end);
        }
        None => h.write_u8(0),
    }
    h.finish()
}

fn checksum(bytes: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(CHECKSUM_SEED).hash_one(bytes)
}

/// The token of the page of `range` that ends at `last_key`.
pub fn encode(range: &KeyRange, last_key: &[u8]) -> String {
    let mut raw = Vec::with_capacity(FIXED_BYTES + last_key.len());
    raw.push(VERSION);
    raw.extend_from_slice(&range_digest(range).to_le_bytes());
    raw.extend_from_slice(last_key);
    let sum = checksum(&raw);
    raw.extend_from_slice(&sum.to_le_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The last key of the page `token` follows, if it is a token of `range`.
pub fn decode(range: &KeyRange, token: &str) -> Result<Bytes, TokenError> {
    if token.len() > MAX_CHARS {
        return Err(TokenError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| TokenError::Malformed)?;
    if raw.len() <= FIXED_BYTES {
        return Err(TokenError::Malformed);
    }
    let (body, sum) = raw.split_at(raw.len() - 8);
    if sum != checksum(body).to_le_bytes() {
        return Err(TokenError::Checksum);
    }
    let (version, rest) = body.split_at(1);
    let (digest, key) = rest.split_at(8);
    if version != [VERSION] || key.len() > kvproto::MAX_KEY_BYTES {
        return Err(TokenError::Malformed);
    }
    if digest != range_digest(range).to_le_bytes() || !range.contains(key) {
        return Err(TokenError::OtherRange);
    }
    Ok(Bytes::copy_from_slice(key))
}

/// The part of `range` after `last_key`: keys hold no NUL, so the first
/// key after `k` in byte order is at least `k` followed by a 0 byte.
pub fn after(range: &KeyRange, last_key: &[u8]) -> KeyRange {
    let mut start = Vec::with_capacity(last_key.len() + 1);
    start.extend_from_slice(last_key);
    start.push(0);
    KeyRange {
        start: Bytes::from(start),
        end: range.end.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: Option<&str>) -> KeyRange {
        KeyRange {
            start: Bytes::copy_from_slice(start.as_bytes()),
            end: end.map(|e| Bytes::copy_from_slice(e.as_bytes())),
        }
    }

    #[test]
    fn a_token_round_trips() {
        let long = "k".repeat(kvproto::MAX_KEY_BYTES);
        for (r, key) in [
            (KeyRange::prefix(b"users/"), "users/42"),
            (KeyRange::prefix(b""), "a"),
            (range("a", Some("m")), "b\u{e9}"),
            (range("", None), long.as_str()),
        ] {
            let t = encode(&r, key.as_bytes());
            assert!(t.len() <= MAX_CHARS, "{} chars", t.len());
            assert!(t
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(decode(&r, &t).unwrap(), key.as_bytes(), "{r:?}");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let r = KeyRange::prefix(b"p/");
        let t = encode(&r, b"p/key");
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[i] ^= 1 << bit;
                let got = decode(&r, &URL_SAFE_NO_PAD.encode(&bad));
                assert!(got.is_err(), "byte {i} bit {bit}");
            }
        }
        // The same for the characters of the text form.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in 0..t.len() {
            for &c in alphabet.iter().filter(|&&c| c != t.as_bytes()[i]) {
                let mut bad = t.clone().into_bytes();
                bad[i] = c;
                let bad = String::from_utf8(bad).unwrap();
                assert!(decode(&r, &bad).is_err(), "char {i} -> {}", c as char);
            }
        }
    }

    #[test]
    fn a_token_of_another_range_is_refused() {
        let t = encode(&KeyRange::prefix(b"a/"), b"a/1");
        for other in [
            KeyRange::prefix(b"a"),
            KeyRange::prefix(b"b/"),
            range("a/", None),
            range("a/", Some("a/2")),
            KeyRange::prefix(b""),
        ] {
            assert_eq!(decode(&other, &t), Err(TokenError::OtherRange), "{other:?}");
        }
        // The same range however it is spelled.
        assert!(decode(&range("a/", Some("a0")), &t).is_ok());
    }

    #[test]
    fn garbage_is_refused() {
        let r = KeyRange::prefix(b"");
        let long = "A".repeat(MAX_CHARS + 4);
        for bad in [
            "",
            "A",
            "!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "a b",
            "AQ==",
            &long,
        ] {
            assert!(decode(&r, bad).is_err(), "{bad:?}");
        }
        // A well-formed token whose key is outside its own range cannot
        // come from a page of it.
        let mut raw = vec![VERSION];
        raw.extend_from_slice(&range_digest(&KeyRange::prefix(b"a/")).to_le_bytes());
        raw.extend_from_slice(b"b");
        let sum = checksum(&raw);
        raw.extend_from_slice(&sum.to_le_bytes());
        let forged = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            decode(&KeyRange::prefix(b"a/"), &forged),
            Err(TokenError::OtherRange)
        );
    }

    #[test]
    fn the_rest_of_a_range_starts_right_after_the_last_key() {
        let r = range("a", Some("z"));
        let rest = after(&r, b"m");
        assert!(!rest.contains(b"m"));
        assert!(rest.contains(b"m\x01"));
        assert!(rest.contains(b"ma"));
        assert!(rest.contains(b"n"));
        assert!(!rest.contains(b"z"));
    }
}
