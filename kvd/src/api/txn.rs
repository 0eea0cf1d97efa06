//! `POST /v1/txn` (docs/DESIGN.md §2.13): the body's shape ([`TxnRequest`],
//! refused as `invalid_json` when it is not that shape), its checks
//! ([`txn_of`]: keys, targets, operators and operands as `invalid_txn`
//! naming the field, `compare[0].target`; the limits as 413), and the
//! answer ([`answer`]).

use std::fmt::Display;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use kvproto::{code, MAX_KEY_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access::Caller;
use super::query::{NoParams, Params};
use super::range::{bounds_error, key_range, limit, BoundsError};
use super::ttl;
use super::wire::{from_object, Clock, JsonItem, JsonValue, Obj};
use super::{
    check_value_size, lease_deadline, read_body, validate_key, with_stamp, ApiError, Limits, Shared,
};
use crate::auth::Action;
use crate::model::{Cmp, Compare, OpResult, RangeRead, Target, Txn, TxnOp, TxnResult, MAX_TXN_OPS};
use crate::node::Written;

/// The body of `POST /v1/txn`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    #[serde(default)]
    compare: Vec<Obj<CompareJson>>,
    #[serde(default)]
    success: Vec<OpJson>,
    #[serde(default)]
    failure: Vec<OpJson>,
}

/// A compare as it comes: target, operator and operand are checked by
/// [`txn_of`], which can name the field that is wrong.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareJson {
    key: String,
    target: String,
    op: String,
    value: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OpJson {
    Put(Obj<PutJson>),
    Delete(Obj<KeyJson>),
    DeletePrefix(Obj<PrefixJson>),
    Get(Obj<KeyJson>),
    Range(Obj<RangeJson>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutJson {
    key: String,
    value: JsonValue,
    #[serde(default, deserialize_with = "ttl::present")]
    ttl_ms: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "ttl::present")]
    lease: Option<serde_json::Value>,
    #[serde(default)]
    keep_ttl: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyJson {
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefixJson {
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeJson {
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    keys_only: bool,
}

/// 400 `invalid_txn` about the field at `path`.
fn invalid(path: &str, why: impl Display) -> ApiError {
    ApiError::bad_request(code::INVALID_TXN, format!("{path}: {why}"))
}

fn key_of(path: &str, key: String) -> Result<Bytes, ApiError> {
    validate_key(&key).map_err(|m| invalid(path, m))?;
    Ok(Bytes::from(key.into_bytes()))
}

fn value_of(path: &str, value: JsonValue, limits: &Limits) -> Result<Bytes, ApiError> {
    let bytes = value.into_bytes().map_err(|m| invalid(path, m))?;
    check_value_size(path, &bytes, limits)?;
    Ok(bytes)
}

/// A transaction's body, parsed ([`TxnRequest`]) and checked ([`txn_of`]);
/// `now_ms`: this node's wall clock, that puts' `ttl_ms` count from.
pub fn parse(raw: &[u8], limits: &Limits, now_ms: u64) -> Result<Txn, ApiError> {
    let req: TxnRequest = from_object(raw).map_err(|e| {
        ApiError::bad_request(
            code::INVALID_JSON,
            format!("the body is not a transaction {{\"compare\", \"success\", \"failure\"}}: {e}"),
        )
    })?;
    txn_of(req, limits, now_ms)
}

/// Checks a transaction's body and turns it into the model's [`Txn`].
pub fn txn_of(req: TxnRequest, limits: &Limits, now_ms: u64) -> Result<Txn, ApiError> {
    let total = req.compare.len() + req.success.len() + req.failure.len();
    if total > MAX_TXN_OPS {
        return Err(ApiError::too_large(
            code::TOO_MANY_OPS,
            format!("the transaction has {total} compares and ops; the limit is {MAX_TXN_OPS}"),
        ));
    }
    let compare = req
        .compare
        .into_iter()
        .enumerate()
        .map(|(i, Obj(c))| compare_of(&format!("compare[{i}]"), c, limits))
        .collect::<Result<_, _>>()?;
    let branch = |name: &str, ops: Vec<OpJson>| -> Result<Vec<TxnOp>, ApiError> {
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| op_of(&format!("{name}[{i}]"), op, limits, now_ms))
            .collect()
    };
    Ok(Txn {
        compare,
        success: branch("success", req.success)?,
        failure: branch("failure", req.failure)?,
    })
}

fn cmp_of(path: &str, op: &str) -> Result<Cmp, ApiError> {
    match op {
        "==" => Ok(Cmp::Eq),
        "!=" => Ok(Cmp::Ne),
        "<" => Ok(Cmp::Lt),
        ">" => Ok(Cmp::Gt),
        _ => Err(invalid(
            &format!("{path}.op"),
            format!("unknown operator {op:?}; one of ==, !=, <, >"),
        )),
    }
}

fn compare_of(path: &str, c: CompareJson, limits: &Limits) -> Result<Compare, ApiError> {
    let key = key_of(&format!("{path}.key"), c.key)?;
    let cmp = cmp_of(path, &c.op)?;
    let operand = format!("{path}.value");
    let number = |v: &serde_json::Value| {
        v.as_u64().ok_or_else(|| {
            invalid(
                &operand,
                format!("{} compares with a non-negative integer, got {v}", c.target),
            )
        })
    };
    let target = match c.target.as_str() {
        "mod_index" => Target::ModIndex(number(&c.value)?),
        "create_index" => Target::CreateIndex(number(&c.value)?),
        "version" => Target::Version(number(&c.value)?),
        "value" => {
            let v: JsonValue = serde_json::from_value(c.value)
                .map_err(|_| invalid(&operand, "a value is a string or {\"base64\": \"...\"}"))?;
            Target::Value(value_of(&operand, v, limits)?)
        }
        "exists" => {
            if !matches!(cmp, Cmp::Eq | Cmp::Ne) {
                return Err(invalid(
                    &format!("{path}.op"),
                    "exists compares with == or != only",
                ));
            }
            let e = c.value.as_bool().ok_or_else(|| {
                invalid(
                    &operand,
                    format!("exists compares with true or false, got {}", c.value),
                )
            })?;
            Target::Exists(e)
        }
        other => {
            return Err(invalid(
                &format!("{path}.target"),
                format!(
                "unknown target {other:?}; one of mod_index, create_index, version, value, exists"
            ),
            ))
        }
    };
    Ok(Compare { key, target, cmp })
}

fn op_of(path: &str, op: OpJson, limits: &Limits, now_ms: u64) -> Result<TxnOp, ApiError> {
    Ok(match op {
        OpJson::Put(Obj(p)) => {
            let at = format!("{path}.put");
            let expiry = ttl::from_json(&at, p.ttl_ms.as_ref(), p.lease.as_ref(), p.keep_ttl)?;
            TxnOp::Put {
                key: key_of(&format!("{at}.key"), p.key)?,
                value: value_of(&format!("{at}.value"), p.value, limits)?,
                expiry: expiry.expiry(now_ms),
            }
        }
        OpJson::Delete(Obj(d)) => TxnOp::Delete {
            key: key_of(&format!("{path}.delete.key"), d.key)?,
        },
        OpJson::DeletePrefix(Obj(d)) => {
            let at = format!("{path}.delete_prefix.prefix");
            if d.prefix.is_empty() || d.prefix.len() > MAX_KEY_BYTES {
                return Err(invalid(
                    &at,
                    format!("a prefix is 1 to {MAX_KEY_BYTES} bytes"),
                ));
            }
            TxnOp::DeletePrefix {
                prefix: Bytes::from(d.prefix.into_bytes()),
            }
        }
        OpJson::Get(Obj(g)) => TxnOp::Get {
            key: key_of(&format!("{path}.get.key"), g.key)?,
        },
        OpJson::Range(Obj(r)) => TxnOp::Range(RangeRead {
            range: key_range(r.prefix.as_deref(), r.start.as_deref(), r.end.as_deref())
                .map_err(|e| invalid(&format!("{path}.range"), e))?,
            limit: limit(r.limit).map_err(|m| invalid(&format!("{path}.range.limit"), m))?,
            keys_only: r.keys_only,
        }),
    })
}

/// One op's result, as the answer carries it (`{"put": {"mod_index": N}}`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum ResultJson {
    Put { mod_index: u64 },
    Delete { deleted: bool },
    DeletePrefix { deleted: u64 },
    Get(Option<JsonItem>),
    Range { items: Vec<JsonItem>, more: bool },
}

impl ResultJson {
    fn new(r: &OpResult, clock: &Clock) -> ResultJson {
        match r {
            OpResult::Put { mod_index } => ResultJson::Put {
                mod_index: *mod_index,
            },
            OpResult::Delete { deleted } => ResultJson::Delete { deleted: *deleted },
            OpResult::DeletePrefix { deleted } => ResultJson::DeletePrefix { deleted: *deleted },
            OpResult::Get(item) => ResultJson::Get(item.as_ref().map(|i| JsonItem::new(i, clock))),
            OpResult::Range { items, more } => ResultJson::Range {
                items: items.iter().map(|i| JsonItem::new(i, clock)).collect(),
                more: *more,
            },
        }
    }
}

/// What the engine said a transaction did: every transaction it answers
/// carries its result.
pub fn results(w: &Written) -> Result<&TxnResult, ApiError> {
    w.outcome.txn.as_ref().ok_or_else(|| unexpected(None))
}

/// 500: the engine answered a transaction with something else.
pub fn unexpected(got: Option<&OpResult>) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::INTERNAL,
        format!("the engine answered a transaction with {got:?}"),
    )
}

/// `{"succeeded", "index", "results"}`; `clock` counts the read keys' TTLs.
pub fn answer(w: &Written, clock: &Clock) -> Result<serde_json::Value, ApiError> {
    let r = results(w)?;
    let results: Vec<ResultJson> = r
        .results
        .iter()
        .map(|r| ResultJson::new(r, clock))
        .collect();
    Ok(json!({"succeeded": r.succeeded, "index": w.index, "results": results}))
}

/// `POST /v1/txn`.
pub async fn txn(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    st.check_primary(&uri)?;
    let raw = read_body(&st, body, st.limits.max_bulk_bytes, "transaction body").await?;
    let txn = parse(&raw, &st.limits, st.engine.wall_ms())?;
    caller.check_txn(&txn)?;
    let w = st.node.write_txn(txn).await?;
    let leases = lease_deadline(&st.engine);
    let clock = Clock {
        now_ms: st.engine.wall_ms(),
        lease_deadline: &leases,
    };
    Ok(Json(answer(&w, &clock)?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixParams {
    prefix: Option<String>,
}

/// `DELETE /v1/kv?prefix=P`: every key under `P`, in one record.
pub async fn delete_prefix(
    State(st): State<Shared>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    Params(p): Params<PrefixParams>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&st, caller)?;
    let prefix = p.prefix.filter(|p| !p.is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            code::INVALID_QUERY,
            "DELETE /v1/kv deletes a prefix: it needs ?prefix=P, not empty",
        )
    })?;
    if prefix.len() > MAX_KEY_BYTES {
        return Err(bounds_error(BoundsError::TooLong("prefix")));
    }
    caller.check(Action::WritePrefix(prefix.as_bytes()))?;
    st.check_primary(&uri)?;
    let txn = Txn {
        success: vec![TxnOp::DeletePrefix {
            prefix: Bytes::from(prefix.into_bytes()),
        }],
        ..Txn::default()
    };
    let w = st.node.write_txn(txn).await?;
    let deleted = match results(&w)?.results.first() {
        Some(OpResult::DeletePrefix { deleted }) => *deleted,
        other => return Err(unexpected(other)),
    };
    let body = json!({"deleted": deleted, "index": w.index});
    Ok(Json(with_stamp(body, w.stamp)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Expiry, Item, KeyMeta, KeyRange};
    use crate::storage::ApplyOutcome;

    fn limits() -> Limits {
        Limits {
            max_value_bytes: 8,
            max_bulk_bytes: 1 << 20,
            max_bulk_items: 100,
            max_inflight_requests: 10,
            body_timeout: std::time::Duration::from_secs(1),
            max_snapshot_bytes: 1 << 20,
            max_inflight_body_bytes: 1 << 20,
            max_watchers: 10,
        }
    }

    /// The wall clock the tests' puts count their TTLs from.
    const NOW: u64 = 1_000_000;

    fn parse(body: serde_json::Value) -> Result<Txn, ApiError> {
        super::parse(body.to_string().as_bytes(), &limits(), NOW)
    }

    fn refusal(body: serde_json::Value) -> (u16, &'static str, String) {
        let e = parse(body).expect_err("refused");
        (e.status.as_u16(), e.code, e.message)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_full_transaction_becomes_the_models() {
        let t = parse(json!({
            "compare": [
                {"key": "a", "target": "mod_index", "op": "==", "value": 9},
                {"key": "a", "target": "value", "op": "<", "value": {"base64": "/w=="}},
                {"key": "b", "target": "exists", "op": "!=", "value": true},
            ],
            "success": [
                {"put": {"key": "a", "value": "new"}},
                {"delete_prefix": {"prefix": "tmp/"}},
                {"range": {"prefix": "a", "keys_only": true}},
            ],
            "failure": [{"get": {"key": "a"}}, {"delete": {"key": "b"}}],
        }))
        .unwrap();
        assert_eq!(t.compare.len(), 3);
        assert_eq!(t.compare[0].target, Target::ModIndex(9));
        assert_eq!(
            t.compare[1].target,
            Target::Value(Bytes::from_static(b"\xff"))
        );
        assert_eq!(
            (t.compare[2].target.clone(), t.compare[2].cmp),
            (Target::Exists(true), Cmp::Ne)
        );
        assert_eq!(
            t.success[0],
            TxnOp::Put {
                key: b("a"),
                value: b("new"),
                expiry: Expiry::Never,
            }
        );
        assert_eq!(
            t.success[2],
            TxnOp::Range(RangeRead {
                range: KeyRange::prefix(b"a"),
                limit: 100,
                keys_only: true,
            })
        );
        assert_eq!(
            t.failure,
            vec![TxnOp::Get { key: b("a") }, TxnOp::Delete { key: b("b") }]
        );
        assert_eq!(parse(json!({})).unwrap(), Txn::default());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                json!({"compare": [{"key": "a", "target": "size", "op": "==", "value": 1}]}),
                "compare[0].target",
            ),
            (
                json!({"compare": [{"key": "a", "target": "version", "op": "=", "value": 1}]}),
                "compare[0].op",
            ),
            (
                json!({"compare": [{"key": "a", "target": "version", "op": "==", "value": -1}]}),
                "compare[0].value",
            ),
            (
                json!({"compare": [{"key": "a", "target": "version", "op": "==", "value": "1"}]}),
                "compare[0].value",
            ),
            (
                json!({"compare": [{"key": "a", "target": "exists", "op": "<", "value": true}]}),
                "compare[0].op",
            ),
            (
                json!({"compare": [{"key": "a", "target": "exists", "op": "==", "value": 1}]}),
                "compare[0].value",
            ),
            (
                json!({"compare": [{"key": "a", "target": "value", "op": "==", "value": 1}]}),
                "compare[0].value",
            ),
            (
                json!({"compare": [{"key": "", "target": "version", "op": "==", "value": 1}]}),
                "compare[0].key",
            ),
            (
                json!({"success": [{"get": {"key": "a"}}, {"get": {"key": "a"}}, {"put": {"key": "a\u{0}b", "value": "x"}}]}),
                "success[2].put.key",
            ),
            (
                json!({"failure": [{"put": {"key": "a", "value": {"base64": "!!"}}}]}),
                "failure[0].put.value",
            ),
            (
                json!({"success": [{"delete": {"key": ""}}]}),
                "success[0].delete.key",
            ),
            (
                json!({"success": [{"delete_prefix": {"prefix": ""}}]}),
                "success[0].delete_prefix.prefix",
            ),
            (
                json!({"success": [{"range": {"start": "b", "end": "a"}}]}),
                "success[0].range",
            ),
            (
                json!({"success": [{"range": {"prefix": "b", "end": "a"}}]}),
                "success[0].range",
            ),
            (
                json!({"success": [{"range": {"limit": 0}}]}),
                "success[0].range.limit",
            ),
            (
                json!({"success": [{"range": {"limit": 10001}}]}),
                "success[0].range.limit",
            ),
        ];
        for (body, path) in cases {
            let (status, code, message) = refusal(body.clone());
            assert_eq!((status, code), (400, "invalid_txn"), "{body}");
            assert!(
                message.starts_with(&format!("{path}:")),
                "{body}: {message}"
            );
        }
    }

    #[test]
    fn not_the_shape_is_invalid_json() {
        for body in [
            json!({"compare": [], "succes": []}),
            json!({"success": [{"puts": {"key": "a", "value": "x"}}]}),
            json!({"success": [{"put": {"key": "a", "value": "x", "ttl": 1}}]}),
            json!({"success": [{"put": {"key": "a", "value": "x", "keep_ttl": "yes"}}]}),
            json!({"success": [{"put": {"key": "a"}}]}),
            json!({"success": [{"put": {"key": "a", "value": "x"}, "get": {"key": "a"}}]}),
            json!({"compare": [{"key": "a", "target": "version", "op": "=="}]}),
            json!({"success": {"put": {"key": "a", "value": "x"}}}),
            json!({"success": [{"put": ["a", "x"]}]}),
            json!({"compare": [["a", "version", "==", 1]]}),
            json!({"success": [{"range": []}]}),
            json!([]),
        ] {
            let (status, code, _) = refusal(body.clone());
            assert_eq!((status, code), (400, "invalid_json"), "{body}");
        }
    }

    #[test]
    fn puts_carry_their_expiry() {
        let t = parse(json!({
            "success": [
                {"put": {"key": "a", "value": "x", "ttl_ms": 500}},
                {"put": {"key": "b", "value": "x", "lease": 7}},
                {"put": {"key": "c", "value": "x", "keep_ttl": true}},
                {"put": {"key": "d", "value": "x", "keep_ttl": false}},
            ],
        }))
        .unwrap();
        let expiries: Vec<Expiry> = t
            .success
            .iter()
            .map(|op| match op {
                TxnOp::Put { expiry, .. } => *expiry,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            expiries,
            [
                Expiry::At(NOW + 500),
                Expiry::Lease(7),
                Expiry::Keep,
                Expiry::Never
            ]
        );
        for (put, path) in [
            (
                json!({"key": "a", "value": "x", "ttl_ms": 0}),
                "failure[0].put.ttl_ms",
            ),
            (
                json!({"key": "a", "value": "x", "ttl_ms": "5"}),
                "failure[0].put.ttl_ms",
            ),
            (
                json!({"key": "a", "value": "x", "lease": -1}),
                "failure[0].put.lease",
            ),
            (
                json!({"key": "a", "value": "x", "ttl_ms": 5, "keep_ttl": true}),
                "failure[0].put",
            ),
        ] {
            let (status, code, message) = refusal(json!({"failure": [{"put": put}]}));
            assert_eq!((status, code), (400, "invalid_ttl"), "{put}");
            assert!(message.starts_with(&format!("{path}:")), "{put}: {message}");
        }
    }

    #[test]
    fn the_limits() {
        let get = json!({"get": {"key": "a"}});
        let ops = |n: usize| vec![get.clone(); n];
        assert!(parse(json!({"success": ops(128)})).is_ok());
        let compare = json!({"key": "a", "target": "version", "op": "==", "value": 0});
        assert!(
            parse(json!({"compare": [compare], "success": ops(64), "failure": ops(63)})).is_ok()
        );
        for body in [
            json!({"success": ops(129)}),
            json!({"compare": [compare], "success": ops(64), "failure": ops(64)}),
        ] {
            assert_eq!(refusal(body).1, "too_many_ops");
        }
        let (status, code, message) =
            refusal(json!({"success": [{"put": {"key": "a", "value": "123456789"}}]}));
        assert_eq!((status, code), (413, "value_too_large"));
        assert!(message.starts_with("success[0].put.value:"), "{message}");
        assert!(parse(json!({"success": [{"put": {"key": "a", "value": "12345678"}}]})).is_ok());
    }

    #[test]
    fn the_answer_carries_every_result() {
        let item = Item {
            key: b("a"),
            value: Some(b("v")),
            meta: KeyMeta {
                create_index: 1,
                mod_index: 2,
                version: 2,
            },
            expiry: Expiry::Never,
        };
        let w = Written {
            index: 5,
            outcome: ApplyOutcome {
                deleted: false,
                txn: Some(TxnResult {
                    succeeded: false,
                    results: vec![
                        OpResult::Put { mod_index: 5 },
                        OpResult::Delete { deleted: true },
                        OpResult::DeletePrefix { deleted: 3 },
                        OpResult::Get(Some(item.clone())),
                        OpResult::Get(None),
                        OpResult::Range {
                            items: vec![item],
                            more: true,
                        },
                    ],
                }),
                ..ApplyOutcome::default()
            },
            stamp: None,
        };
        let no_leases = |_| None;
        let clock = Clock {
            now_ms: 0,
            lease_deadline: &no_leases,
        };
        let one =
            json!({"key": "a", "value": "v", "create_index": 1, "mod_index": 2, "version": 2});
        assert_eq!(
            answer(&w, &clock).unwrap(),
            json!({"succeeded": false, "index": 5, "results": [
                {"put": {"mod_index": 5}},
                {"delete": {"deleted": true}},
                {"delete_prefix": {"deleted": 3}},
                {"get": one},
                {"get": null},
                {"range": {"items": [one], "more": true}},
            ]})
        );
        let bare = Written {
            index: 1,
            outcome: ApplyOutcome::default(),
            stamp: None,
        };
        assert_eq!(
            answer(&bare, &clock).unwrap_err().status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
