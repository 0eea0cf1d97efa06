//! The JSON forms of values and keys that several routes share
//! (docs/DESIGN.md §2.3, §2.11, §2.13): bulk items, range pages and
//! transaction bodies all carry a value as a JSON string when its bytes
//! are UTF-8, else as `{"base64": "..."}`, in this one type.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{Item, KeyMeta};

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
/// of a keys-only read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonItem {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<JsonValue>,
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
}

impl From<&Item> for JsonItem {
    fn from(item: &Item) -> JsonItem {
        JsonItem {
            // Keys are UTF-8: every write checked them.
            key: String::from_utf8_lossy(&item.key).into_owned(),
            value: item.value.as_deref().map(JsonValue::from_bytes),
            create_index: item.meta.create_index,
            mod_index: item.meta.mod_index,
            version: item.meta.version,
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
    use crate::model::Expiry;

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
        assert_eq!(
            serde_json::to_value(JsonItem::from(&item)).unwrap(),
            serde_json::json!({"key": "a/1", "create_index": 3, "mod_index": 9, "version": 2})
        );
        let absent = serde_json::to_value(Current::of(None)).unwrap();
        assert_eq!(
            absent,
            serde_json::json!({"exists": false, "create_index": 0, "mod_index": 0, "version": 0})
        );
    }
}
