//! The JSON forms of values and keys that several routes share
//! (docs/DESIGN.md §2.3, §2.11, §2.13): bulk items, range pages and
//! transaction bodies all carry a value as a JSON string when its bytes
//! are UTF-8, else as `{"base64": "..."}`, in this one type.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{Expiry, Item, KeyMeta};

/// A value as JSON carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JsonValue {
    /// The value is this string's UTF-8.
    Text(String),
    /// Any bytes, standard base64.
    Binary(Obj<Base64Value>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base64Value {
    pub base64: String,
}

impl JsonValue {
    /// The readable form when it is lossless, else base64.
    pub fn from_bytes(bytes: &[u8]) -> JsonValue {
        match std::str::from_utf8(bytes) {
            Ok(text) => JsonValue::Text(text.to_string()),
            Err(_) => JsonValue::Binary(Obj(Base64Value {
                base64: BASE64.encode(bytes),
            })),
        }
    }

    /// The value's bytes, or why its base64 does not decode.
    pub fn into_bytes(self) -> Result<Bytes, String> {
        match self {
            JsonValue::Text(s) => Ok(Bytes::from(s.into_bytes())),
            JsonValue::Binary(Obj(b)) => BASE64
                .decode(b.base64.as_bytes())
                .map(Bytes::from)
                .map_err(|e| format!("value is not valid base64: {e}")),
        }
    }
}

/// A JSON object of `T`'s fields, and only that: serde's derived structs
/// also take an array of their fields in order, which no body holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Obj<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = serde_json::Map::deserialize(d)?;
        T::deserialize(serde_json::Value::Object(fields))
            .map(Obj)
            .map_err(D::Error::custom)
    }
}

/// Parses a body that must be a JSON object. (serde's derived structs
/// also take an array of their fields in order, which no route's body is.)
pub fn from_object<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    match raw.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(raw).map_err(|e| e.to_string()),
        _ => Err("the body is not a JSON object".to_string()),
    }
}

/// One key of a range page or a transaction's `get`: `value` is left out
/// of a keys-only read, `ttl_ms` and `lease` of a key without a deadline
/// (docs/DESIGN.md §2.15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonItem {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<JsonValue>,
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

/// What a key's time left is counted from: this node's wall clock (Unix
/// ms), and the deadline of each live lease.
pub struct Clock<'a> {
    pub now_ms: u64,
    pub lease_deadline: &'a dyn Fn(u64) -> Option<u64>,
}

impl Clock<'_> {
    /// `(ttl_ms, lease)` of a key with `expiry`: the milliseconds to its
    /// deadline or its lease's, at least 1 (a read shows only keys still
    /// alive, and 0 would read as "no TTL"), and the lease's id.
    pub fn left(&self, expiry: Expiry) -> (Option<u64>, Option<u64>) {
        match expiry {
            Expiry::At(deadline) => (Some(remaining_ms(deadline, self.now_ms)), None),
            Expiry::Lease(id) => {
                // A lease gone since the read: its keys go with it.
                let deadline = (self.lease_deadline)(id).unwrap_or(self.now_ms);
                (Some(remaining_ms(deadline, self.now_ms)), Some(id))
            }
            Expiry::Never | Expiry::Keep => (None, None),
        }
    }
}

/// Milliseconds from `now_ms` to `deadline_ms`, at least 1.
pub fn remaining_ms(deadline_ms: u64, now_ms: u64) -> u64 {
    deadline_ms.saturating_sub(now_ms).max(1)
}

impl JsonItem {
    pub fn new(item: &Item, clock: &Clock) -> JsonItem {
        let (ttl_ms, lease) = clock.left(item.expiry);
        JsonItem {
            // Keys are UTF-8: every write checked them.
            key: String::from_utf8_lossy(&item.key).into_owned(),
            value: item.value.as_deref().map(JsonValue::from_bytes),
            create_index: item.meta.create_index,
            mod_index: item.meta.mod_index,
            version: item.meta.version,
            ttl_ms,
            lease,
        }
    }
}

/// A key's state as a refused conditional write reports it (§2.12): an
/// absent key has versions 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Current {
    pub exists: bool,
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
}

impl Current {
    pub fn of(meta: Option<&KeyMeta>) -> Current {
        let m = meta.copied().unwrap_or_default();
        Current {
            exists: meta.is_some(),
            create_index: m.create_index,
            mod_index: m.mod_index,
            version: m.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_round_trip_in_the_shorter_faithful_form() {
        for bytes in [&b"hello"[..], b"", b"\x00\xff\xfe", "caf\u{e9}".as_bytes()] {
            let v = JsonValue::from_bytes(bytes);
            let json = serde_json::to_string(&v).unwrap();
            let back: JsonValue = serde_json::from_str(&json).unwrap();
            assert_eq!(back.into_bytes().unwrap(), bytes, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&JsonValue::from_bytes(b"x")).unwrap(),
            r#""x""#
        );
        assert_eq!(
            serde_json::to_string(&JsonValue::from_bytes(b"\xff")).unwrap(),
            r#"{"base64":"/w=="}"#
        );
    }

    #[test]
    fn a_bad_value_form_is_refused() {
        assert!(serde_json::from_str::<JsonValue>(r#"{"base64": "AA", "x": 1}"#).is_err());
        assert!(serde_json::from_str::<JsonValue>("3").is_err());
        assert!(serde_json::from_str::<JsonValue>(r#"["AA=="]"#).is_err());
        let bad: JsonValue = serde_json::from_str(r#"{"base64": "not base64!"}"#).unwrap();
        assert!(bad.into_bytes().is_err());
    }

    #[test]
    fn a_body_is_an_object() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Body {
            #[serde(default)]
            items: Vec<u8>,
        }
        assert!(from_object::<Body>(b" \n{\"items\": [1]}").is_ok());
        for bad in [&b"[[1]]"[..], b"[]", b"", b"  ", b"null", b"1"] {
            assert!(
                from_object::<Body>(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(serde_json::from_str::<Vec<Obj<Body>>>(r#"[{"items": [1]}]"#).is_ok());
        assert!(serde_json::from_str::<Vec<Obj<Body>>>("[[[1]]]").is_err());
    }

    const NO_LEASES: &dyn Fn(u64) -> Option<u64> = &|_| None;

    #[test]
    fn items_say_the_time_left_and_the_lease() {
        let leases = |id: u64| (id == 4).then_some(10_500);
        let clock = Clock {
            now_ms: 10_000,
            lease_deadline: &leases,
        };
        let item = |expiry| Item {
            key: Bytes::from_static(b"k"),
            value: Some(Bytes::from_static(b"v")),
            meta: KeyMeta::default(),
            expiry,
        };
        let json = |expiry| serde_json::to_value(JsonItem::new(&item(expiry), &clock)).unwrap();
        assert_eq!(json(Expiry::At(12_345))["ttl_ms"], 2_345);
        assert!(json(Expiry::At(12_345)).get("lease").is_none());
        // Read just before its deadline passed: still alive, so at least 1.
        assert_eq!(json(Expiry::At(10_000))["ttl_ms"], 1);
        assert_eq!(json(Expiry::At(9_000))["ttl_ms"], 1);
        let on_lease = json(Expiry::Lease(4));
        assert_eq!(
            (&on_lease["ttl_ms"], &on_lease["lease"]),
            (&json!(500), &json!(4))
        );
        let gone = json(Expiry::Lease(5));
        assert_eq!((&gone["ttl_ms"], &gone["lease"]), (&json!(1), &json!(5)));
        for plain in [Expiry::Never, Expiry::Keep] {
            let v = json(plain);
            assert!(v.get("ttl_ms").is_none() && v.get("lease").is_none(), "{v}");
        }
    }

    #[test]
    fn items_leave_out_the_value_of_a_keys_only_read() {
        let meta = KeyMeta {
            create_index: 3,
            mod_index: 9,
            version: 2,
        };
        let item = Item {
            key: Bytes::from_static(b"a/1"),
            value: None,
            meta,
            expiry: Expiry::Never,
        };
        let clock = Clock {
            now_ms: 0,
            lease_deadline: NO_LEASES,
        };
        assert_eq!(
            serde_json::to_value(JsonItem::new(&item, &clock)).unwrap(),
            serde_json::json!({"key": "a/1", "create_index": 3, "mod_index": 9, "version": 2})
        );
        let absent = serde_json::to_value(Current::of(None)).unwrap();
        assert_eq!(
            absent,
            serde_json::json!({"exists": false, "create_index": 0, "mod_index": 0, "version": 0})
        );
    }
}
