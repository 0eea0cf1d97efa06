//! Transactions (docs/DESIGN.md §2.13): a [`Txn`] of compares and two
//! branches of ops, committed as one log record.
//!
//! ```no_run
//! # async fn demo(client: &kvclient::Client) -> kvclient::Result<()> {
//! use kvclient::{Cmp, Target, Txn, TxnOp};
//! let answer = Txn::new()
//!     .compare("stock/apples", Target::Version, Cmp::Gt, 0u64)
//!     .success(TxnOp::put("orders/1", "apples"))
//!     .success(TxnOp::delete("stock/apples"))
//!     .failure(TxnOp::get("stock/apples"))
//!     .commit(client)
//!     .await?;
//! println!("succeeded: {}, at index {}", answer.succeeded, answer.index);
//! # Ok(())
//! # }
//! ```
//!
//! A transaction with compares and writes is retried only after failures
//! that wrote nothing, as a conditional write is (see
//! [`Client::put_if`]); one without compares sets and removes whole keys,
//! so it is retried like any write.

use bytes::Bytes;
use reqwest::Method;

use crate::client::{decode_success, Call, Client, Retry};
use crate::error::{Error, Result};
use crate::expiry::Expiry;
use crate::key::validate_key;
use crate::range::{KeyRange, MAX_PAGE_SIZE};
use crate::wire::{CompareWire, OpWire, RangeOpWire, TxnRequestWire, TxnResponse, WireValue};

/// Most compares and ops in one transaction, all branches together
/// (more is 413 `too_many_ops`).
pub const MAX_TXN_OPS: usize = 128;

/// What a compare looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The key's `mod_index` (an integer operand).
    ModIndex,
    /// The key's `create_index` (an integer operand).
    CreateIndex,
    /// The key's `version` (an integer operand).
    Version,
    /// The key's value (a bytes operand, compared as bytes).
    Value,
    /// Whether the key exists (a boolean operand; `==` and `!=` only).
    Exists,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::ModIndex => "mod_index",
            Target::CreateIndex => "create_index",
            Target::Version => "version",
            Target::Value => "value",
            Target::Exists => "exists",
        }
    }
}

/// A compare's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `>`
    Gt,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Gt => ">",
        }
    }
}

/// What a compare's target is compared to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// For `mod_index`, `create_index`, `version`.
    Int(u64),
    /// For `value`.
    Bytes(Bytes),
    /// For `exists`.
    Bool(bool),
}

impl From<u64> for Operand {
    fn from(n: u64) -> Self {
        Operand::Int(n)
    }
}

impl From<bool> for Operand {
    fn from(b: bool) -> Self {
        Operand::Bool(b)
    }
}

impl From<&str> for Operand {
    fn from(s: &str) -> Self {
        Operand::Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Operand {
    fn from(s: String) -> Self {
        Operand::Bytes(Bytes::from(s))
    }
}

impl From<Bytes> for Operand {
    fn from(b: Bytes) -> Self {
        Operand::Bytes(b)
    }
}

impl From<Vec<u8>> for Operand {
    fn from(b: Vec<u8>) -> Self {
        Operand::Bytes(Bytes::from(b))
    }
}

/// One condition: `key`'s `target` `cmp` `operand`. An absent key has
/// versions 0, does not exist, and no compare of its value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key looked at.
    pub key: String,
    /// What of it.
    pub target: Target,
    /// The operator.
    pub cmp: Cmp,
    /// The right-hand side.
    pub operand: Operand,
}

/// One op of a branch, run in order; a read sees the writes before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Bytes,
        /// Its deadline or lease; `None` makes it permanent (§2.15).
        expiry: Option<Expiry>,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Remove every key under a prefix (not empty).
    DeletePrefix {
        /// The prefix.
        prefix: String,
    },
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Read one page of a range, without a token.
    Range {
        /// The keys.
        range: KeyRange,
        /// Most keys (the node's default is 100).
        limit: Option<u32>,
        /// Items without values.
        keys_only: bool,
    },
}

impl TxnOp {
    /// A put that makes the key permanent.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            expiry: None,
        }
    }

    /// A put with a TTL, a lease or keep-TTL (docs/DESIGN.md §2.15).
    pub fn put_with(key: impl Into<String>, value: impl Into<Bytes>, expiry: Expiry) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            expiry: Some(expiry),
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }

    /// A delete of every key under `prefix`.
    pub fn delete_prefix(prefix: impl Into<String>) -> Self {
        TxnOp::DeletePrefix {
            prefix: prefix.into(),
        }
    }

    /// A read of a key.
    pub fn get(key: impl Into<String>) -> Self {
        TxnOp::Get { key: key.into() }
    }

    /// A read of the first 100 keys of `range`, with values.
    pub fn range(range: KeyRange) -> Self {
        TxnOp::Range {
            range,
            limit: None,
            keys_only: false,
        }
    }

    fn writes(&self) -> bool {
        matches!(
            self,
            TxnOp::Put { .. } | TxnOp::Delete { .. } | TxnOp::DeletePrefix { .. }
        )
    }

    /// The op's JSON; `at` names it in errors (`success[2]`).
    fn to_wire(&self, at: &str) -> Result<OpWire> {
        let key_at = |key: &str, field: &str| checked_key(key, &format!("{at}.{field}"));
        Ok(match self {
            TxnOp::Put { key, value, expiry } => OpWire::Put {
                key: key_at(key, "put.key")?,
                value: WireValue::from_bytes(value),
                expiry: Expiry::fields(*expiry)
                    .map_err(|err| invalid(at, &format!("put: {err}")))?,
            },
            TxnOp::Delete { key } => OpWire::Delete {
                key: key_at(key, "delete.key")?,
            },
            TxnOp::DeletePrefix { prefix } if prefix.is_empty() => {
                return Err(invalid(at, "delete_prefix.prefix is empty"));
            }
            TxnOp::DeletePrefix { prefix } => OpWire::DeletePrefix {
                prefix: key_at(prefix, "delete_prefix.prefix")?,
            },
            TxnOp::Get { key } => OpWire::Get {
                key: key_at(key, "get.key")?,
            },
            TxnOp::Range {
                range,
                limit,
                keys_only,
            } => OpWire::Range(range_wire(range, *limit, *keys_only, at)?),
        })
    }
}

fn range_wire(
    range: &KeyRange,
    limit: Option<u32>,
    keys_only: bool,
    at: &str,
) -> Result<RangeOpWire> {
    range
        .check()
        .map_err(|err| invalid(at, &format!("range: {err}")))?;
    if limit.is_some_and(|n| !(1..=MAX_PAGE_SIZE).contains(&n)) {
        return Err(invalid(
            at,
            &format!("range.limit is not within 1..={MAX_PAGE_SIZE}"),
        ));
    }
    let (prefix, start, end) = match range {
        KeyRange::Prefix(p) => (Some(p.clone()), None, None),
        KeyRange::Span { start, end } => (None, start.clone(), end.clone()),
    };
    Ok(RangeOpWire {
        prefix,
        start,
        end,
        limit,
        keys_only,
    })
}

fn invalid(at: &str, what: &str) -> Error {
    Error::InvalidRequest(format!("transaction {at}: {what}"))
}

fn checked_key(key: &str, at: &str) -> Result<String> {
    validate_key(key)
        .map_err(|reason| Error::InvalidRequest(format!("transaction {at}: {reason}")))?;
    Ok(key.to_owned())
}

/// A transaction being built: if every compare holds (none: always), the
/// `success` ops run, else the `failure` ops, as one log record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// The conditions.
    pub compare: Vec<Compare>,
    /// Run when every compare holds.
    pub success: Vec<TxnOp>,
    /// Run otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds a condition: `key`'s `target` `cmp` `operand`.
    pub fn compare(
        mut self,
        key: impl Into<String>,
        target: Target,
        cmp: Cmp,
        operand: impl Into<Operand>,
    ) -> Self {
        self.compare.push(Compare {
            key: key.into(),
            target,
            cmp,
            operand: operand.into(),
        });
        self
    }

    /// Adds an op to the `success` branch.
    pub fn success(mut self, op: TxnOp) -> Self {
        self.success.push(op);
        self
    }

    /// Adds an op to the `failure` branch.
    pub fn failure(mut self, op: TxnOp) -> Self {
        self.failure.push(op);
        self
    }

    /// Sends the transaction (see [`Client::txn`]).
    pub async fn commit(&self, client: &Client) -> Result<TxnResponse> {
        client.txn(self).await
    }

    /// The body of `POST /v1/txn`, after the checks the node would make
    /// (keys, operands that fit their targets, the op limit); an error
    /// names the part at fault (`compare[0]`, `success[2].put.key`).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let wire = self.to_wire()?;
        serde_json::to_value(wire).map_err(|err| Error::InvalidRequest(err.to_string()))
    }

    /// Whether a retry after an unknown outcome could see the first
    /// attempt's writes through its compares.
    fn conditional(&self) -> bool {
        !self.compare.is_empty() && self.success.iter().chain(&self.failure).any(TxnOp::writes)
    }

    fn to_wire(&self) -> Result<TxnRequestWire> {
        let total = self.compare.len() + self.success.len() + self.failure.len();
        if total > MAX_TXN_OPS {
            return Err(Error::InvalidRequest(format!(
                "transaction has {total} compares and ops, the limit is {MAX_TXN_OPS}"
            )));
        }
        let ops = |branch: &[TxnOp], name: &str| -> Result<Vec<OpWire>> {
            branch
                .iter()
                .enumerate()
                .map(|(i, op)| op.to_wire(&format!("{name}[{i}]")))
                .collect()
        };
        Ok(TxnRequestWire {
            compare: self
                .compare
                .iter()
                .enumerate()
                .map(|(i, c)| compare_wire(c, &format!("compare[{i}]")))
                .collect::<Result<_>>()?,
            success: ops(&self.success, "success")?,
            failure: ops(&self.failure, "failure")?,
        })
    }
}

/// A compare's JSON, if its operand fits its target.
fn compare_wire(c: &Compare, at: &str) -> Result<CompareWire> {
    use serde_json::Value;
    let value = match (c.target, &c.operand) {
        (Target::ModIndex | Target::CreateIndex | Target::Version, Operand::Int(n)) => {
            Value::from(*n)
        }
        (Target::Value, Operand::Bytes(b)) => serde_json::to_value(WireValue::from_bytes(b))
            .map_err(|err| invalid(at, &err.to_string()))?,
        (Target::Exists, Operand::Bool(b)) if matches!(c.cmp, Cmp::Eq | Cmp::Ne) => Value::Bool(*b),
        (Target::Exists, Operand::Bool(_)) => {
            return Err(invalid(at, "exists takes only == and !="));
        }
        (target, operand) => {
            return Err(invalid(
                at,
                &format!("{} cannot be compared to {operand:?}", target.name()),
            ));
        }
    };
    Ok(CompareWire {
        key: checked_key(&c.key, &format!("{at}.key"))?,
        target: c.target.name(),
        op: c.cmp.symbol(),
        value,
    })
}

impl Client {
    /// Commits `txn` as one log record and returns which branch ran and
    /// each of its ops' results. Nothing is sent if the transaction breaks
    /// a rule the node checks ([`Txn::to_json`]). Masterless nodes refuse
    /// a transaction with compares (409 `unsupported_in_masterless`).
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse> {
        let body = txn.to_json()?;
        self.txn_json(&body, txn.conditional()).await
    }

    /// Sends a transaction body as it is (docs/DESIGN.md §2.13), for tools
    /// that hold the JSON already (the CLI's `txn`); the node checks it.
    /// `conditional`: whether it has compares and writes, which decides
    /// the retries as for [`Client::txn`] (when unsure, say `true`).
    pub async fn txn_json(
        &self,
        body: &serde_json::Value,
        conditional: bool,
    ) -> Result<TxnResponse> {
        let bytes =
            serde_json::to_vec(body).map_err(|err| Error::InvalidRequest(err.to_string()))?;
        let resp = self
            .send(Call {
                method: Method::POST,
                path: "/v1/txn",
                body: Some((Bytes::from(bytes), "application/json")),
                headers: Vec::new(),
                retry: if conditional {
                    Retry::UnlessMaybeWritten
                } else {
                    Retry::Idempotent
                },
            })
            .await?;
        decode_success(resp, "transaction answer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Item, OpResult};
    use serde_json::json;

    #[test]
    fn the_builder_writes_the_documented_body() {
        let txn = Txn::new()
            .compare("a", Target::ModIndex, Cmp::Eq, 9u64)
            .compare("a", Target::Value, Cmp::Ne, "old")
            .compare("b", Target::Value, Cmp::Lt, vec![0xff, 0x00])
            .compare("c", Target::Exists, Cmp::Eq, false)
            .success(TxnOp::put("a", "new"))
            .success(TxnOp::put("bin", vec![0u8, 0xff]))
            .success(TxnOp::get("b"))
            .success(TxnOp::delete_prefix("tmp/"))
            .failure(TxnOp::delete("a"))
            .failure(TxnOp::Range {
                range: KeyRange::between("a", "m"),
                limit: Some(10),
                keys_only: true,
            })
            .failure(TxnOp::range(KeyRange::prefix("p/")));
        assert_eq!(
            txn.to_json().unwrap(),
            json!({
                "compare": [
                    {"key": "a", "target": "mod_index", "op": "==", "value": 9},
                    {"key": "a", "target": "value", "op": "!=", "value": "old"},
                    {"key": "b", "target": "value", "op": "<", "value": {"base64": "/wA="}},
                    {"key": "c", "target": "exists", "op": "==", "value": false},
                ],
                "success": [
                    {"put": {"key": "a", "value": "new"}},
                    {"put": {"key": "bin", "value": {"base64": "AP8="}}},
                    {"get": {"key": "b"}},
                    {"delete_prefix": {"prefix": "tmp/"}},
                ],
                "failure": [
                    {"delete": {"key": "a"}},
                    {"range": {"start": "a", "end": "m", "limit": 10, "keys_only": true}},
                    {"range": {"prefix": "p/"}},
                ],
            })
        );
        assert!(txn.conditional());
    }

    #[test]
    fn puts_carry_their_expiry() {
        let txn = Txn::new()
            .success(TxnOp::put_with("a", "1", Expiry::ttl_ms(250)))
            .success(TxnOp::put_with("b", "2", Expiry::Lease(12)))
            .success(TxnOp::put_with("c", "3", Expiry::KeepTtl));
        assert_eq!(
            txn.to_json().unwrap(),
            json!({"success": [
                {"put": {"key": "a", "value": "1", "ttl_ms": 250}},
                {"put": {"key": "b", "value": "2", "lease": 12}},
                {"put": {"key": "c", "value": "3", "keep_ttl": true}},
            ]})
        );
        let err = Txn::new()
            .success(TxnOp::put_with("a", "1", Expiry::ttl_ms(0)))
            .to_json()
            .unwrap_err();
        assert!(err.to_string().contains("success[0]"), "{err}");
    }

    #[test]
    fn an_empty_transaction_is_an_empty_object() {
        assert_eq!(Txn::new().to_json().unwrap(), json!({}));
        let reads = Txn::new()
            .compare("a", Target::Version, Cmp::Gt, 0u64)
            .success(TxnOp::get("a"));
        assert!(!reads.conditional(), "compares without writes");
        assert!(!Txn::new().success(TxnOp::put("a", "v")).conditional());
    }

    #[test]
    fn mismatched_operands_and_bad_keys_are_named() {
        let cases = [
            (
                Txn::new().compare("a", Target::Version, Cmp::Eq, "x"),
                "compare[0]",
            ),
            (
                Txn::new().compare("a", Target::Value, Cmp::Eq, 1u64),
                "compare[0]",
            ),
            (
                Txn::new()
                    .compare("a", Target::Exists, Cmp::Eq, true)
                    .compare("a", Target::Exists, Cmp::Lt, true),
                "compare[1]: exists takes only",
            ),
            (
                Txn::new().compare("", Target::Exists, Cmp::Eq, true),
                "compare[0].key",
            ),
            (
                Txn::new()
                    .success(TxnOp::get("ok"))
                    .success(TxnOp::put("a\0b", "v")),
                "success[1].put.key",
            ),
            (
                Txn::new().failure(TxnOp::delete_prefix("")),
                "failure[0]: delete_prefix.prefix is empty",
            ),
            (
                Txn::new().success(TxnOp::range(KeyRange::between("z", "a"))),
                "success[0]: range",
            ),
            (
                Txn::new().success(TxnOp::Range {
                    range: KeyRange::all(),
                    limit: Some(0),
                    keys_only: false,
                }),
                "success[0]: range.limit",
            ),
        ];
        for (txn, needle) in cases {
            let err = txn.to_json().unwrap_err();
            assert_eq!(err.code(), "invalid_request");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn the_op_limit_counts_compares_and_both_branches() {
        let mut txn = Txn::new().compare("k", Target::Exists, Cmp::Eq, true);
        for i in 0..MAX_TXN_OPS - 1 {
            txn = if i % 2 == 0 {
                txn.success(TxnOp::get("k"))
            } else {
                txn.failure(TxnOp::get("k"))
            };
        }
        assert!(txn.to_json().is_ok());
        let err = txn.success(TxnOp::get("k")).to_json().unwrap_err();
        assert!(err.to_string().contains("129"), "{err}");
    }

    #[test]
    fn answers_decode_every_result() {
        let answer: TxnResponse = serde_json::from_value(json!({
            "succeeded": true, "index": 12,
            "results": [
                {"put": {"mod_index": 12}},
                {"delete": {"deleted": true}},
                {"delete_prefix": {"deleted": 3}},
                {"get": {"key": "b", "value": {"base64": "AP8="}, "create_index": 2, "mod_index": 5, "version": 3}},
                {"get": null},
                {"range": {"items": [{"key": "a", "create_index": 1, "mod_index": 1, "version": 1}], "more": true}},
            ]
        }))
        .unwrap();
        let item = |key: &str, value: Option<&'static [u8]>, c, m, v| Item {
            key: key.into(),
            value: value.map(Bytes::from_static),
            create_index: c,
            mod_index: m,
            version: v,
            ttl_ms: None,
            lease: None,
        };
        assert_eq!(
            answer,
            TxnResponse {
                succeeded: true,
                index: 12,
                results: vec![
                    OpResult::Put { mod_index: 12 },
                    OpResult::Delete { deleted: true },
                    OpResult::DeletePrefix { deleted: 3 },
                    OpResult::Get(Some(item("b", Some(&[0, 0xff]), 2, 5, 3))),
                    OpResult::Get(None),
                    OpResult::Range {
                        items: vec![item("a", None, 1, 1, 1)],
                        more: true
                    },
                ],
            }
        );
        // And back: the answer prints as the node sent it.
        let back = serde_json::to_value(&answer).unwrap();
        assert_eq!(
            back["results"][3]["get"]["value"],
            json!({"base64": "AP8="})
        );
        assert_eq!(back["results"][4], json!({"get": null}));
    }

    #[test]
    fn bad_base64_in_an_answer_fails_the_decode() {
        let err = serde_json::from_value::<TxnResponse>(json!({
            "succeeded": true, "index": 1,
            "results": [{"get": {"key": "b", "value": {"base64": "!!"}, "create_index": 1, "mod_index": 1, "version": 1}}]
        }))
        .unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }
}
