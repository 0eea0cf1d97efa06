//! JSON shapes of the HTTP API (docs/DESIGN.md §2), shared by the library and CLI.
//!
//! Values are bytes, but JSON has no bytes type: a value travels as a plain
//! string when it is valid UTF-8 (readable in logs and hand-written bulk
//! files) and as `{"base64": "..."}` otherwise. [`WireValue`] is that
//! convention in one place, so the library's bulk encoder, the CLI's `--json`
//! output and its bulk-file reader cannot drift apart.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Current, Error};
use crate::expiry::{Expiry, ExpiryFields, LeaseId};

/// A value as it appears in JSON: a UTF-8 string or `{"base64": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireValue {
    /// The value's bytes are this string's UTF-8.
    Text(String),
    /// Binary value, standard base64 with padding.
    Base64 {
        /// The encoded bytes.
        base64: String,
    },
}

impl WireValue {
    /// Chooses the readable form when it is lossless.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => WireValue::Text(text.to_owned()),
            Err(_) => WireValue::Base64 {
                base64: BASE64.encode(bytes),
            },
        }
    }

    /// The value's bytes; fails only on bad base64. `key` names the item in
    /// the error, since a bulk document may hold thousands.
    pub fn to_bytes(&self, key: &str) -> Result<Bytes, Error> {
        match self {
            WireValue::Text(text) => Ok(Bytes::copy_from_slice(text.as_bytes())),
            WireValue::Base64 { base64 } => {
                BASE64
                    .decode(base64)
                    .map(Bytes::from)
                    .map_err(|err| Error::InvalidValue {
                        key: key.to_owned(),
                        reason: format!("bad base64: {err}"),
                    })
            }
        }
    }
}

/// One item of a bulk write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkItem {
    /// The key (validated by the client before sending).
    pub key: String,
    /// The value.
    pub value: WireValue,
    /// Its deadline or lease, if any (docs/DESIGN.md §2.15).
    #[serde(flatten)]
    pub expiry: ExpiryFields,
}

impl BulkItem {
    /// An item that makes the key permanent; UTF-8 values as strings,
    /// others as base64.
    pub fn new(key: impl Into<String>, value: &[u8]) -> Self {
        BulkItem {
            key: key.into(),
            value: WireValue::from_bytes(value),
            expiry: ExpiryFields::default(),
        }
    }

    /// The same item with a TTL, a lease or keep-TTL; fails on a TTL the
    /// node would refuse.
    pub fn with_expiry(mut self, expiry: Expiry) -> Result<Self, Error> {
        self.expiry = Expiry::fields(Some(expiry))?;
        Ok(self)
    }
}

/// Body of `POST /v1/bulk`: `{"items": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRequest {
    /// Items in order; the server applies all of them or none.
    pub items: Vec<BulkItem>,
}

impl BulkRequest {
    /// Encodes key/value pairs, UTF-8 values as strings and others as base64.
    pub fn from_pairs(items: &[(String, Bytes)]) -> Self {
        BulkRequest {
            items: items
                .iter()
                .map(|(key, value)| BulkItem::new(key.clone(), value))
                .collect(),
        }
    }

    /// Decodes every value; the first bad base64 fails the whole document,
    /// matching the server's all-or-nothing bulk semantics.
    pub fn to_pairs(&self) -> Result<Vec<(String, Bytes)>, Error> {
        self.items
            .iter()
            .map(|item| Ok((item.key.clone(), item.value.to_bytes(&item.key)?)))
            .collect()
    }
}

/// Answer to `PUT /v1/kv/{key}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexResponse {
    pub(crate) index: u64,
}

/// Answer to `DELETE /v1/kv/{key}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    /// Whether the key existed. A delete of an absent key still succeeds (it
    /// is idempotent, so retries are safe) and still gets a log index.
    pub deleted: bool,
    /// Log index of the delete.
    pub index: u64,
}

/// Answer to `POST /v1/bulk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOutcome {
    /// Log index of the single record holding the whole batch.
    pub index: u64,
    /// Number of items written.
    pub count: u64,
}

/// One result of a search or similarity query, best first in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// The matching key.
    pub key: String,
    /// BM25 score (search) or cosine similarity (similar).
    pub score: f64,
}

/// Answer to `GET /v1/search` and `GET /v1/similar`: one page of hits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchPage {
    /// Best first.
    pub hits: Vec<SearchHit>,
    /// Documents that matched at all (shared a term with the query).
    #[serde(default)]
    pub total: u64,
    /// `offset` of the next page, if there is one.
    #[serde(default)]
    pub next_offset: Option<u64>,
}

/// What `GET /v1/similar` compares values against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimilarTo<'a> {
    /// Free text.
    Text(&'a str),
    /// The value of this key ("more like this"; the key itself is left out).
    Key(&'a str),
}

/// `GET /v1/status`, kept as the server's JSON with typed accessors.
///
/// Holding the raw JSON rather than a fixed struct is deliberate: the status
/// document grows with the server (peers, lag, mode-switch state) and a
/// client must neither fail on fields it does not know nor drop them when a
/// tool prints the status. The accessors cover what callers branch on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Status(serde_json::Value);

impl Status {
    /// Wraps a status document.
    pub fn from_json(value: serde_json::Value) -> Self {
        Status(value)
    }

    /// The whole document.
    pub fn as_json(&self) -> &serde_json::Value {
        &self.0
    }

    /// The whole document, owned.
    pub fn into_json(self) -> serde_json::Value {
        self.0
    }

    /// Node id, whether the server sends it as a string or a number.
    pub fn node_id(&self) -> Option<String> {
        match self.0.get("node_id")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// Cluster mode, e.g. `primary-secondary` or `masterless`.
    pub fn mode(&self) -> Option<&str> {
        self.str_field("mode")
    }

    /// This node's role, e.g. `primary` or `secondary`.
    pub fn role(&self) -> Option<&str> {
        self.str_field("role")
    }

    /// Current epoch.
    pub fn epoch(&self) -> Option<u64> {
        self.u64_field("epoch")
    }

    /// Index of the last log entry on this node.
    pub fn last_index(&self) -> Option<u64> {
        self.u64_field("last_index")
    }

    /// Highest committed index known to this node.
    pub fn commit_index(&self) -> Option<u64> {
        self.u64_field("commit_index")
    }

    /// Number of live keys.
    pub fn keys(&self) -> Option<u64> {
        self.u64_field("keys")
    }

    fn str_field(&self, name: &str) -> Option<&str> {
        self.0.get(name)?.as_str()
    }

    fn u64_field(&self, name: &str) -> Option<u64> {
        self.0.get(name)?.as_u64()
    }
}

/// The part of a 412 answer beside its error: `{"current": {...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct PreconditionBody {
    pub(crate) current: Current,
}

/// One key as a range or a transaction's read returns it, with its
/// versions (docs/DESIGN.md §2.10, §2.11). `value` is `None` in a
/// keys-only read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ItemWire", into = "ItemWire")]
pub struct Item {
    /// The key.
    pub key: String,
    /// Its value, unless the read was keys-only.
    pub value: Option<Bytes>,
    /// Log index of the write that created the key.
    pub create_index: u64,
    /// Log index of its last write.
    pub mod_index: u64,
    /// Writes since its creation.
    pub version: u64,
    /// The milliseconds it had left when read, `None` when permanent
    /// (docs/DESIGN.md §2.15).
    pub ttl_ms: Option<u64>,
    /// The lease it lives by, if any.
    pub lease: Option<LeaseId>,
}

/// [`Item`] as JSON: the value as a string or `{"base64"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ItemWire {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<WireValue>,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    mod_index: u64,
    #[serde(default)]
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseId>,
}

impl TryFrom<ItemWire> for Item {
    type Error = String;

    fn try_from(wire: ItemWire) -> Result<Self, String> {
        let value = match &wire.value {
            Some(v) => Some(v.to_bytes(&wire.key).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Item {
            key: wire.key,
            value,
            create_index: wire.create_index,
            mod_index: wire.mod_index,
            version: wire.version,
            ttl_ms: wire.ttl_ms,
            lease: wire.lease,
        })
    }
}

impl From<Item> for ItemWire {
    fn from(item: Item) -> Self {
        ItemWire {
            value: item.value.as_deref().map(WireValue::from_bytes),
            key: item.key,
            create_index: item.create_index,
            mod_index: item.mod_index,
            version: item.version,
            ttl_ms: item.ttl_ms,
            lease: item.lease,
        }
    }
}

/// One page of `GET /v1/kv` (docs/DESIGN.md §2.11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    /// The keys of the page, in byte order.
    pub items: Vec<Item>,
    /// The applied index the page was read at: the page is the state at
    /// that index.
    pub index: u64,
    /// Where the next page starts; `None` at the end of the range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Answer to `GET /v1/kv?count_only=true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct CountAnswer {
    pub(crate) count: u64,
}

/// Answer to `DELETE /v1/kv?prefix=P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePrefixOutcome {
    /// Keys deleted (0 when none was under the prefix).
    pub deleted: u64,
    /// Log index of the one record that deleted them.
    pub index: u64,
}

/// Body of `POST /v1/txn` (docs/DESIGN.md §2.13).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct TxnRequestWire {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) compare: Vec<CompareWire>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) success: Vec<OpWire>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) failure: Vec<OpWire>,
}

/// One compare: `{"key", "target", "op", "value"}`; `value` is an integer,
/// a string or `{"base64"}`, or a boolean, as the target wants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CompareWire {
    pub(crate) key: String,
    pub(crate) target: &'static str,
    pub(crate) op: &'static str,
    pub(crate) value: serde_json::Value,
}

/// One op, externally tagged: `{"put": {"key", "value"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OpWire {
    Put {
        key: String,
        value: WireValue,
        #[serde(flatten)]
        expiry: ExpiryFields,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
    Range(RangeOpWire),
}

/// A transaction's range read: §2.11's selection, one page, no token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RangeOpWire {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) end: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limit: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) keys_only: bool,
}

/// What one op of the branch that ran returned, in the branch's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// A put: the key's new `mod_index` (the transaction's index).
    Put {
        /// The record's log index.
        mod_index: u64,
    },
    /// A delete: whether the key existed.
    Delete {
        /// Whether there was a key to delete.
        deleted: bool,
    },
    /// A prefix delete: how many keys it removed.
    DeletePrefix {
        /// Keys removed.
        deleted: u64,
    },
    /// A get: the key, or `None` when it does not exist.
    Get(Option<Item>),
    /// A range read: one page, without a token.
    Range {
        /// The keys, in byte order.
        items: Vec<Item>,
        /// Whether the range holds keys after these.
        more: bool,
    },
}

/// Answer to `POST /v1/txn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether every compare held, so the `success` branch ran (else the
    /// `failure` branch did).
    pub succeeded: bool,
    /// The log index of the transaction's one record.
    pub index: u64,
    /// One result per op of the branch that ran.
    pub results: Vec<OpResult>,
}

/// Every error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

/// The inside of [`ErrorBody`]; both fields default so that a server error
/// missing one still yields the other.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ErrorDetail {
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bulk_encodes_utf8_as_string_and_binary_as_base64() {
        let items = vec![
            ("a".to_owned(), Bytes::from_static(b"hello")),
            ("b".to_owned(), Bytes::from_static(&[0xff, 0x00, 0x01])),
            ("c".to_owned(), Bytes::new()),
        ];
        let body = serde_json::to_value(BulkRequest::from_pairs(&items)).unwrap();
        assert_eq!(
            body,
            json!({"items": [
                {"key": "a", "value": "hello"},
                {"key": "b", "value": {"base64": "/wAB"}},
                {"key": "c", "value": ""},
            ]})
        );
    }

    #[test]
    fn bulk_round_trips_through_json() {
        let items = vec![
            (
                "text".to_owned(),
                Bytes::from_static("ünï\0code".as_bytes()),
            ),
            ("bin".to_owned(), Bytes::from_static(&[0xc3, 0x28, 0x80])),
        ];
        let text = serde_json::to_string(&BulkRequest::from_pairs(&items)).unwrap();
        let back: BulkRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_pairs().unwrap(), items);
    }

    #[test]
    fn bulk_items_carry_their_expiry_fields() {
        let body = BulkRequest {
            items: vec![
                BulkItem::new("a", b"1")
                    .with_expiry(Expiry::ttl_ms(500))
                    .unwrap(),
                BulkItem::new("b", b"2")
                    .with_expiry(Expiry::Lease(9))
                    .unwrap(),
                BulkItem::new("c", b"3")
                    .with_expiry(Expiry::KeepTtl)
                    .unwrap(),
                BulkItem::new("d", b"4"),
            ],
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"items": [
                {"key": "a", "value": "1", "ttl_ms": 500},
                {"key": "b", "value": "2", "lease": 9},
                {"key": "c", "value": "3", "keep_ttl": true},
                {"key": "d", "value": "4"},
            ]})
        );
        let back: BulkRequest =
            serde_json::from_value(serde_json::to_value(&body).unwrap()).unwrap();
        assert_eq!(back, body);
        assert!(BulkItem::new("e", b"")
            .with_expiry(Expiry::ttl_ms(0))
            .is_err());
    }

    #[test]
    fn range_items_report_their_deadline_and_lease() {
        let item: Item = serde_json::from_value(json!(
            {"key": "k", "value": "v", "create_index": 1, "mod_index": 2, "version": 2, "ttl_ms": 900, "lease": 5}
        ))
        .unwrap();
        assert_eq!((item.ttl_ms, item.lease), (Some(900), Some(5)));
        let permanent: Item = serde_json::from_value(
            json!({"key": "k", "create_index": 1, "mod_index": 1, "version": 1}),
        )
        .unwrap();
        assert_eq!((permanent.ttl_ms, permanent.lease), (None, None));
        assert_eq!(
            serde_json::to_value(&item).unwrap(),
            json!({"key": "k", "value": "v", "create_index": 1, "mod_index": 2, "version": 2, "ttl_ms": 900, "lease": 5})
        );
    }

    #[test]
    fn bad_base64_names_the_key() {
        let doc: BulkRequest =
            serde_json::from_value(json!({"items": [{"key": "k1", "value": {"base64": "!!"}}]}))
                .unwrap();
        let err = doc.to_pairs().unwrap_err();
        assert_eq!(err.code(), "invalid_value");
        assert!(err.to_string().contains("k1"), "{err}");
    }

    #[test]
    fn status_accessors_tolerate_shapes() {
        let status = Status::from_json(json!({
            "node_id": 2, "mode": "masterless", "role": "peer", "epoch": 7,
            "last_index": 10, "commit_index": 9, "keys": 3, "peers": []
        }));
        assert_eq!(status.node_id().as_deref(), Some("2"));
        assert_eq!(status.mode(), Some("masterless"));
        assert_eq!(status.role(), Some("peer"));
        assert_eq!(status.epoch(), Some(7));
        assert_eq!(status.last_index(), Some(10));
        assert_eq!(status.commit_index(), Some(9));
        assert_eq!(status.keys(), Some(3));
        let sparse = Status::from_json(json!({"node_id": "n0"}));
        assert_eq!(sparse.node_id().as_deref(), Some("n0"));
        assert_eq!(sparse.epoch(), None);
    }

    #[test]
    fn a_range_page_decodes_text_binary_and_keys_only_items() {
        let page: RangePage = serde_json::from_value(json!({
            "items": [
                {"key": "a/1", "value": "x", "create_index": 3, "mod_index": 9, "version": 2},
                {"key": "a/2", "value": {"base64": "/wA="}, "create_index": 4, "mod_index": 4, "version": 1},
                {"key": "a/3", "create_index": 5, "mod_index": 5, "version": 1},
            ],
            "count": 3, "index": 42, "next_page_token": "AQ",
        }))
        .unwrap();
        assert_eq!(page.index, 42);
        assert_eq!(page.next_page_token.as_deref(), Some("AQ"));
        let values: Vec<Option<&[u8]>> = page.items.iter().map(|i| i.value.as_deref()).collect();
        assert_eq!(values, [Some(&b"x"[..]), Some(&[0xff, 0][..]), None]);
        assert_eq!(
            (
                page.items[0].create_index,
                page.items[0].mod_index,
                page.items[0].version
            ),
            (3, 9, 2)
        );
        let last: RangePage =
            serde_json::from_value(json!({"items": [], "count": 0, "index": 7})).unwrap();
        assert_eq!(last.next_page_token, None);
        // An item prints in the same shape: the CLI's --json lines.
        assert_eq!(
            serde_json::to_value(&page.items[1]).unwrap(),
            json!({"key": "a/2", "value": {"base64": "/wA="}, "create_index": 4, "mod_index": 4, "version": 1})
        );
    }

    #[test]
    fn error_body_parses_with_missing_fields() {
        let body: ErrorBody = serde_json::from_str(r#"{"error":{"code":"key_too_long"}}"#).unwrap();
        assert_eq!(body.error.code, "key_too_long");
        assert_eq!(body.error.message, "");
    }
}
