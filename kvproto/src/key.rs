//! Which keys a node accepts (docs/DESIGN.md §2): UTF-8, 1 to [`MAX_KEY_BYTES`]
//! bytes, no NUL. The same rule holds a client's key and every key a peer
//! sends.

use std::fmt;

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong { len: usize },
    ContainsNul { at: usize },
    NotUtf8,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("key is empty"),
            KeyError::TooLong { len } => {
                write!(f, "key is {len} bytes; the limit is {MAX_KEY_BYTES}")
            }
            KeyError::ContainsNul { .. } => f.write_str("key contains a NUL byte"),
            KeyError::NotUtf8 => f.write_str("key is not UTF-8"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Checks `key` against the rule above.
pub fn validate_key(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong { len: key.len() });
    }
    if let Some(at) = key.iter().position(|&b| b == 0) {
        return Err(KeyError::ContainsNul { at });
    }
    if std::str::from_utf8(key).is_err() {
        return Err(KeyError::NotUtf8);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_utf8_of_1_to_1024_bytes_without_nul() {
        assert_eq!(validate_key(b""), Err(KeyError::Empty));
        assert_eq!(validate_key(&[b'a'; MAX_KEY_BYTES]), Ok(()));
        assert_eq!(
            validate_key(&[b'a'; MAX_KEY_BYTES + 1]),
            Err(KeyError::TooLong { len: 1025 })
        );
        assert_eq!(validate_key(b"a\0b"), Err(KeyError::ContainsNul { at: 1 }));
        assert_eq!(validate_key(b"\xff"), Err(KeyError::NotUtf8));
        assert_eq!(validate_key("users/42/naïve".as_bytes()), Ok(()));
        assert_eq!(
            KeyError::TooLong { len: 1025 }.to_string(),
            "key is 1025 bytes; the limit is 1024"
        );
    }
}
