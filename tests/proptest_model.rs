//! Random sequences of puts, deletes, bulks, conditional puts and deletes,
//! transactions, prefix deletes, paged ranges and restarts (SIGTERM and
//! SIGKILL) against a real kvd, beside a model that keeps every key's
//! versions (docs/DESIGN.md §2.10-§2.13). After every step the node's
//! contents and versions, from a full range and from each key's GET
//! headers, are the model's; after every restart and at the end, so are
//! paged ranges over every prefix, `HEAD` and `count_only`.
//!
//! The model takes a write's `mod_index` from the answer's `index` (the
//! log index of its record), checks that answers' indexes only grow, and
//! computes everything else: which branch a transaction runs, each op's
//! result, the 412's current state, each page and its token. A
//! transaction that puts a key twice writes it once (one record: one
//! version), as the engine counts it.

use std::collections::{BTreeMap, BTreeSet};

use kvstore_testkit::api::{self, Item, Meta, Outcome, Precondition, RangeQuery};
use kvstore_testkit::{node, Kvd};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};
use tempfile::TempDir;

/// A small key space with shared prefixes, so prefix deletes and ranges
/// keep hitting several keys. Some names exercise URL encoding.
const KEYS: [&str; 10] = [
    "a",
    "a/1",
    "a/2",
    "a/b/c",
    "b",
    "b/c",
    "d",
    "e%20f",
    "with space",
    "ünï",
];
/// Prefixes of ranges; all but the first (every key) also of deletes.
const PREFIXES: [&str; 9] = ["", "a", "a/", "a/b", "b", "e", "w", "ü", "zz"];
/// Bounds of `start`/`end` ranges: keys and the gaps between them.
const BOUNDS: [&str; 9] = ["a", "a/2", "a0", "b", "b/d", "d", "f", "ü", "ünï"];

/// How far a page may run before the pager calls it a loop.
const MAX_PAGES: usize = 100;

#[derive(Debug, Clone)]
enum Range {
    Prefix(usize),
    /// Indexes into [`BOUNDS`], `start <= end`.
    Between(Option<usize>, Option<usize>),
}

#[derive(Debug, Clone)]
struct RangeSpec {
    range: Range,
    limit: usize,
    keys_only: bool,
}

impl RangeSpec {
    fn query(&self) -> RangeQuery {
        let bound = |b: Option<usize>| b.map(|i| BOUNDS[i].to_string());
        let mut q = match self.range {
            Range::Prefix(p) => RangeQuery::prefix(PREFIXES[p]),
            Range::Between(s, e) => RangeQuery {
                start: bound(s),
                end: bound(e),
                ..RangeQuery::default()
            },
        };
        q.limit = Some(self.limit);
        q.keys_only = self.keys_only;
        q
    }
}

/// A version number a compare or an `If-Match` is made with, relative to
/// the key's state when the step runs.
#[derive(Debug, Clone, Copy)]
enum Num {
    Current,
    Plus1,
    Minus1,
    Zero,
}

#[derive(Debug, Clone)]
enum TargetSpec {
    ModIndex(Num),
    CreateIndex(Num),
    Version(Num),
    /// `None`: the key's current value.
    Value(Option<Vec<u8>>),
    Exists(bool),
}

#[derive(Debug, Clone)]
struct CompareSpec {
    key: usize,
    target: TargetSpec,
    op: &'static str,
}

#[derive(Debug, Clone)]
enum OpSpec {
    Put(usize, Vec<u8>),
    Delete(usize),
    DeletePrefix(usize),
    Get(usize),
    Range(RangeSpec),
}

#[derive(Debug, Clone, Copy)]
enum Cond {
    MatchCurrent,
    MatchWrong,
    Exists,
    Absent,
}

#[derive(Debug, Clone)]
enum Step {
    Set(usize, Vec<u8>),
    Delete(usize),
    /// Distinct keys: the API does not define duplicates within one bulk.
    Bulk(BTreeMap<usize, Vec<u8>>),
    CondPut(usize, Vec<u8>, Cond),
    /// Never [`Cond::Absent`]: DELETE takes no `If-None-Match`.
    CondDelete(usize, Cond),
    DeletePrefix(usize),
    Txn {
        compare: Vec<CompareSpec>,
        success: Vec<OpSpec>,
        failure: Vec<OpSpec>,
    },
    Range(RangeSpec),
    /// SIGKILL (`kill`) or SIGTERM, then start again on the same data dir.
    Restart {
        kill: bool,
    },
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Text, including the empty value.
        "[a-z0-9 ]{0,12}".prop_map(String::into_bytes),
        // Arbitrary bytes: JSON bodies carry these as base64.
        vec(any::<u8>(), 0..12),
    ]
}

fn key() -> impl Strategy<Value = usize> {
    0..KEYS.len()
}

fn range_spec() -> impl Strategy<Value = RangeSpec> {
    let bound = proptest::option::of(0..BOUNDS.len());
    let range = prop_oneof![
        (0..PREFIXES.len()).prop_map(Range::Prefix),
        (bound.clone(), bound).prop_map(|(s, e)| match (s, e) {
            (Some(s), Some(e)) if BOUNDS[s] > BOUNDS[e] => Range::Between(Some(e), Some(s)),
            _ => Range::Between(s, e),
        }),
    ];
    (range, 1..=4usize, any::<bool>()).prop_map(|(range, limit, keys_only)| RangeSpec {
        range,
        limit,
        keys_only,
    })
}

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        3 => Just(Num::Current),
        1 => Just(Num::Plus1),
        1 => Just(Num::Minus1),
        1 => Just(Num::Zero),
    ]
}

fn compare() -> impl Strategy<Value = CompareSpec> {
    let ordered = prop_oneof![Just("=="), Just("!="), Just("<"), Just(">")];
    let equality = prop_oneof![Just("=="), Just("!=")];
    let target_op = prop_oneof![
        (num(), ordered.clone()).prop_map(|(n, op)| (TargetSpec::ModIndex(n), op)),
        (num(), ordered.clone()).prop_map(|(n, op)| (TargetSpec::CreateIndex(n), op)),
        (num(), ordered.clone()).prop_map(|(n, op)| (TargetSpec::Version(n), op)),
        (proptest::option::of(value()), ordered).prop_map(|(v, op)| (TargetSpec::Value(v), op)),
        (any::<bool>(), equality).prop_map(|(e, op)| (TargetSpec::Exists(e), op)),
    ];
    (key(), target_op).prop_map(|(key, (target, op))| CompareSpec { key, target, op })
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        3 => (key(), value()).prop_map(|(k, v)| OpSpec::Put(k, v)),
        2 => key().prop_map(OpSpec::Delete),
        1 => (1..PREFIXES.len()).prop_map(OpSpec::DeletePrefix),
        2 => key().prop_map(OpSpec::Get),
        1 => range_spec().prop_map(OpSpec::Range),
    ]
}

fn cond(on_delete: bool) -> impl Strategy<Value = Cond> {
    let absent = if on_delete {
        Cond::Exists
    } else {
        Cond::Absent
    };
    prop_oneof![
        3 => Just(Cond::MatchCurrent),
        1 => Just(Cond::MatchWrong),
        1 => Just(Cond::Exists),
        1 => Just(absent),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let txn = (
        vec(compare(), 0..3),
        vec(op_spec(), 0..4),
        vec(op_spec(), 0..3),
    )
        .prop_map(|(compare, success, failure)| Step::Txn {
            compare,
            success,
            failure,
        });
    prop_oneof![
        3 => (key(), value()).prop_map(|(k, v)| Step::Set(k, v)),
        1 => key().prop_map(Step::Delete),
        1 => btree_map(key(), value(), 1..=4).prop_map(Step::Bulk),
        3 => (key(), value(), cond(false)).prop_map(|(k, v, c)| Step::CondPut(k, v, c)),
        2 => (key(), cond(true)).prop_map(|(k, c)| Step::CondDelete(k, c)),
        1 => (1..PREFIXES.len()).prop_map(Step::DeletePrefix),
        4 => txn,
        2 => range_spec().prop_map(Step::Range),
        1 => any::<bool>().prop_map(|kill| Step::Restart { kill }),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    meta: Meta,
}

/// What the node must hold: every key's value and versions, and the
/// highest index any answer named.
#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<String, Entry>,
    index: u64,
    /// The keys the record at `index` wrote so far: a transaction that
    /// writes a key twice counts one write of it.
    written: BTreeSet<String>,
}

impl Model {
    fn meta(&self, key: &str) -> Option<Meta> {
        self.keys.get(key).map(|e| e.meta)
    }

    fn item(&self, key: &str, keys_only: bool) -> Option<Item> {
        self.keys.get(key).map(|e| Item {
            key: key.to_string(),
            value: (!keys_only).then(|| e.value.clone()),
            meta: e.meta,
        })
    }

    /// An answer's index: after every index seen so far.
    fn advance(&mut self, index: u64, what: &str) -> Result<u64, TestCaseError> {
        prop_assert!(
            index > self.index,
            "{}: index {} not after {}",
            what,
            index,
            self.index
        );
        self.index = index;
        self.written.clear();
        Ok(index)
    }

    fn put(&mut self, key: &str, value: &[u8], index: u64) {
        let rewrite = !self.written.insert(key.to_string());
        let meta = match self.meta(key) {
            Some(m) if rewrite => m,
            Some(m) => Meta {
                mod_index: index,
                version: m.version + 1,
                ..m
            },
            None => Meta {
                create_index: index,
                mod_index: index,
                version: 1,
            },
        };
        let value = value.to_vec();
        self.keys.insert(key.to_string(), Entry { value, meta });
    }

    fn delete(&mut self, key: &str) -> bool {
        self.keys.remove(key).is_some()
    }

    fn delete_prefix(&mut self, prefix: &str) -> u64 {
        let before = self.keys.len();
        self.keys.retain(|k, _| !k.starts_with(prefix));
        (before - self.keys.len()) as u64
    }

    /// Every item of the range, in order.
    fn range(&self, q: &RangeQuery) -> Vec<Item> {
        let inside = |k: &str| match &q.prefix {
            Some(p) => k.starts_with(p.as_str()),
            None => {
                q.start.as_deref().is_none_or(|s| k >= s) && q.end.as_deref().is_none_or(|e| k < e)
            }
        };
        self.keys
            .keys()
            .filter(|k| inside(k))
            .filter_map(|k| self.item(k, q.keys_only))
            .collect()
    }

    fn num(&self, key: &str, field: fn(&Meta) -> u64, n: Num) -> u64 {
        let cur = self.meta(key).map_or(0, |m| field(&m));
        match n {
            Num::Current => cur,
            Num::Plus1 => cur + 1,
            Num::Minus1 => cur.saturating_sub(1),
            Num::Zero => 0,
        }
    }

    /// The compare as JSON, and whether it holds now.
    fn compare(&self, c: &CompareSpec) -> (Value, bool) {
        let key = KEYS[c.key];
        let current = self.keys.get(key);
        let test = |ord: std::cmp::Ordering| match c.op {
            "==" => ord.is_eq(),
            "!=" => ord.is_ne(),
            "<" => ord.is_lt(),
            _ => ord.is_gt(),
        };
        let meta = current.map(|e| e.meta).unwrap_or_default();
        let numeric = |field: fn(&Meta) -> u64, n: Num| {
            let operand = self.num(key, field, n);
            (json!(operand), test(field(&meta).cmp(&operand)))
        };
        let (operand, holds) = match &c.target {
            TargetSpec::ModIndex(n) => numeric(|m| m.mod_index, *n),
            TargetSpec::CreateIndex(n) => numeric(|m| m.create_index, *n),
            TargetSpec::Version(n) => numeric(|m| m.version, *n),
            TargetSpec::Value(v) => {
                let operand = v
                    .clone()
                    .unwrap_or_else(|| current.map(|e| e.value.clone()).unwrap_or_default());
                let holds = current.is_some_and(|e| test(e.value.cmp(&operand)));
                (api::encode_value(&operand), holds)
            }
            TargetSpec::Exists(e) => (json!(e), test(current.is_some().cmp(e))),
        };
        let target = match c.target {
            TargetSpec::ModIndex(_) => "mod_index",
            TargetSpec::CreateIndex(_) => "create_index",
            TargetSpec::Version(_) => "version",
            TargetSpec::Value(_) => "value",
            TargetSpec::Exists(_) => "exists",
        };
        let body = json!({"key": key, "target": target, "op": c.op, "value": operand});
        (body, holds)
    }

    /// Applies one op of a transaction's branch at `index` and returns
    /// the result the answer must carry.
    fn txn_op(&mut self, op: &OpSpec, index: u64) -> Value {
        match op {
            OpSpec::Put(k, v) => {
                self.put(KEYS[*k], v, index);
                json!({"put": {"mod_index": index}})
            }
            OpSpec::Delete(k) => json!({"delete": {"deleted": self.delete(KEYS[*k])}}),
            OpSpec::DeletePrefix(p) => {
                json!({"delete_prefix": {"deleted": self.delete_prefix(PREFIXES[*p])}})
            }
            OpSpec::Get(k) => json!({"get": self.item(KEYS[*k], false).map(|i| item_json(&i))}),
            OpSpec::Range(r) => {
                let all = self.range(&r.query());
                let items: Vec<Value> = all.iter().take(r.limit).map(item_json).collect();
                json!({"range": {"items": items, "more": all.len() > r.limit}})
            }
        }
    }

    fn precondition(&self, key: &str, c: Cond) -> (Precondition, bool) {
        let meta = self.meta(key);
        let mod_index = meta.map_or(0, |m| m.mod_index);
        match c {
            Cond::MatchCurrent => (Precondition::IfMatch(mod_index), meta.is_some()),
            Cond::MatchWrong => (Precondition::IfMatch(mod_index + 1), false),
            Cond::Exists => (Precondition::IfExists, meta.is_some()),
            Cond::Absent => (Precondition::IfAbsent, meta.is_none()),
        }
    }
}

/// An item as the API writes it (for comparing whole results).
fn item_json(i: &Item) -> Value {
    let mut v = json!({
        "key": i.key,
        "create_index": i.meta.create_index,
        "mod_index": i.meta.mod_index,
        "version": i.meta.version,
    });
    if let Some(value) = &i.value {
        v["value"] = api::encode_value(value);
    }
    v
}

fn op_json(op: &OpSpec) -> Value {
    match op {
        OpSpec::Put(k, v) => json!({"put": {"key": KEYS[*k], "value": api::encode_value(v)}}),
        OpSpec::Delete(k) => json!({"delete": {"key": KEYS[*k]}}),
        OpSpec::DeletePrefix(p) => json!({"delete_prefix": {"prefix": PREFIXES[*p]}}),
        OpSpec::Get(k) => json!({"get": {"key": KEYS[*k]}}),
        OpSpec::Range(r) => r.query().txn_op(),
    }
}

/// A result list with its items normalised (values decoded), so that a
/// value's encoding (text or base64) does not count, only its bytes.
fn normalise(results: &Value) -> Result<Vec<Value>, TestCaseError> {
    let fail = |e: anyhow::Error| TestCaseError::fail(format!("{e:#}: {results}"));
    let list = results.as_array().cloned().unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    for mut r in list {
        if r["get"].is_object() {
            r["get"] = item_json(&Item::from_json(&r["get"]).map_err(fail)?);
        }
        if r["range"].is_object() {
            let items = api::items(&r["range"]["items"]).map_err(fail)?;
            r["range"]["items"] = items.iter().map(item_json).collect();
        }
        out.push(r);
    }
    Ok(out)
}

struct Run {
    kvd: Kvd,
    http: reqwest::Client,
    model: Model,
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

impl Run {
    fn url(&self) -> String {
        self.kvd.url()
    }

    async fn step(&mut self, n: usize, step: &Step) -> Result<(), TestCaseError> {
        let what = format!("step {n} {step:?}");
        let (http, url) = (self.http.clone(), self.url());
        match step {
            Step::Set(k, v) => {
                let i = api::put_if(&http, &url, KEYS[*k], v, Precondition::None).await;
                let index = self.model.advance(i.index(&what), &what)?;
                self.model.put(KEYS[*k], v, index);
            }
            Step::Delete(k) => {
                let a = api::delete_if(&http, &url, KEYS[*k], Precondition::None).await;
                let a = a.done(&what);
                self.model
                    .advance(a["index"].as_u64().unwrap_or(0), &what)?;
                let existed = self.model.delete(KEYS[*k]);
                prop_assert_eq!(&a["deleted"], &json!(existed), "{}", what);
            }
            Step::Bulk(items) => self.bulk(items, &what).await?,
            Step::CondPut(k, v, c) => self.cond_write(KEYS[*k], Some(v), *c, &what).await?,
            Step::CondDelete(k, c) => self.cond_write(KEYS[*k], None, *c, &what).await?,
            Step::DeletePrefix(p) => {
                let a = api::delete_prefix(&http, &url, PREFIXES[*p])
                    .await
                    .done(&what);
                self.model
                    .advance(a["index"].as_u64().unwrap_or(0), &what)?;
                let deleted = self.model.delete_prefix(PREFIXES[*p]);
                prop_assert_eq!(&a["deleted"], &json!(deleted), "{}", what);
            }
            Step::Txn {
                compare,
                success,
                failure,
            } => self.txn(compare, success, failure, &what).await?,
            Step::Range(r) => self.check_range(&r.query(), &what).await?,
            Step::Restart { kill } => {
                if *kill {
                    self.kvd.kill9().map_err(fail)?;
                } else {
                    let exit = self.kvd.terminate().map_err(fail)?;
                    prop_assert!(exit.success(), "SIGTERM exit status {}", exit);
                }
                node::restart(&mut self.kvd);
                // Connections pooled to the old process are dead.
                self.http = api::client(node::REQUEST_TIMEOUT);
                self.check_thoroughly(&format!("after {what}")).await?;
            }
        }
        self.check(&format!("after {what}")).await
    }

    async fn bulk(
        &mut self,
        items: &BTreeMap<usize, Vec<u8>>,
        what: &str,
    ) -> Result<(), TestCaseError> {
        let body: Vec<Value> = items
            .iter()
            .map(|(k, v)| json!({"key": KEYS[*k], "value": api::encode_value(v)}))
            .collect();
        let resp = self
            .http
            .post(format!("{}/v1/bulk", self.url()))
            .json(&json!({ "items": body }))
            .send()
            .await
            .map_err(fail)?;
        let a = api::outcome(Ok(resp)).await.done(what);
        let index = self.model.advance(a["index"].as_u64().unwrap_or(0), what)?;
        for (k, v) in items {
            self.model.put(KEYS[*k], v, index);
        }
        Ok(())
    }

    /// A PUT (`value`) or DELETE under a precondition: done when the model
    /// says it holds, else 412 with the model's current state.
    async fn cond_write(
        &mut self,
        key: &str,
        value: Option<&Vec<u8>>,
        c: Cond,
        what: &str,
    ) -> Result<(), TestCaseError> {
        let (pre, holds) = self.model.precondition(key, c);
        let (http, url) = (&self.http, self.kvd.url());
        let out = match value {
            Some(v) => api::put_if(http, &url, key, v, pre).await,
            None => api::delete_if(http, &url, key, pre).await,
        };
        if !holds {
            let current = self.model.meta(key);
            prop_assert_eq!(out, Outcome::PreconditionFailed(current), "{}", what);
            return Ok(());
        }
        let a = out.done(what);
        let index = self.model.advance(a["index"].as_u64().unwrap_or(0), what)?;
        match value {
            Some(v) => self.model.put(key, v, index),
            None => {
                prop_assert!(self.model.delete(key), "{}", what);
                prop_assert_eq!(&a["deleted"], &json!(true), "{}", what);
            }
        }
        Ok(())
    }

    async fn txn(
        &mut self,
        compare: &[CompareSpec],
        success: &[OpSpec],
        failure: &[OpSpec],
        what: &str,
    ) -> Result<(), TestCaseError> {
        let compares: Vec<(Value, bool)> = compare.iter().map(|c| self.model.compare(c)).collect();
        let succeeded = compares.iter().all(|(_, h)| *h);
        let body = json!({
            "compare": compares.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let a = api::txn(&self.http, &self.url(), &body).await.done(what);
        let index = self.model.advance(a["index"].as_u64().unwrap_or(0), what)?;
        prop_assert_eq!(&a["succeeded"], &json!(succeeded), "{}: {}", what, body);
        let branch = if succeeded { success } else { failure };
        let want: Vec<Value> = branch
            .iter()
            .map(|op| self.model.txn_op(op, index))
            .collect();
        let got = normalise(&a["results"])?;
        prop_assert_eq!(got, want, "{}: {}", what, body);
        Ok(())
    }

    /// Pages through `q` to the end: the pages are the model's range cut
    /// into `limit`-sized pieces, a token on every page but the last, and
    /// indexes that never go back and are at least the model's.
    async fn check_range(&self, q: &RangeQuery, what: &str) -> Result<(), TestCaseError> {
        let pages = api::range_all(&self.http, &self.url(), q, MAX_PAGES)
            .await
            .map_err(fail)?;
        let want = self.model.range(q);
        let limit = q.limit.unwrap_or(100);
        let mut chunks: Vec<&[Item]> = want.chunks(limit).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        prop_assert_eq!(pages.len(), chunks.len(), "{}: pages of {:?}", what, q);
        let mut index = self.model.index;
        for (i, (page, chunk)) in pages.iter().zip(&chunks).enumerate() {
            prop_assert_eq!(&page.items[..], *chunk, "{}: page {} of {:?}", what, i, q);
            let last = i + 1 == chunks.len();
            prop_assert_eq!(page.next_page_token.is_none(), last, "{}: page {}", what, i);
            prop_assert!(
                page.index >= index,
                "{}: page {} at {}",
                what,
                i,
                page.index
            );
            index = page.index;
        }
        Ok(())
    }

    /// After every step: a full range (contents and versions) and every
    /// key's GET (value and version headers).
    async fn check(&self, what: &str) -> Result<(), TestCaseError> {
        let all = RangeQuery {
            limit: Some(1000),
            ..RangeQuery::default()
        };
        self.check_range(&all, what).await?;
        for key in KEYS {
            let got = api::get_versioned(&self.http, &self.url(), key, false)
                .await
                .map_err(fail)?;
            let want = self.model.keys.get(key);
            prop_assert_eq!(
                got.as_ref().map(|g| &g.value),
                want.map(|e| &e.value),
                "{}: {}",
                what,
                key
            );
            prop_assert_eq!(
                got.map(|g| g.meta),
                want.map(|e| e.meta),
                "{}: {}",
                what,
                key
            );
        }
        Ok(())
    }

    /// After a restart and at the end: [`Run::check`], then HEAD of every
    /// key, the status's key count, every prefix paged by 2 (with and without
    /// values) and counted.
    async fn check_thoroughly(&self, what: &str) -> Result<(), TestCaseError> {
        self.check(what).await?;
        let s = node::status(&self.http, &self.kvd).await;
        prop_assert_eq!(
            node::field(&s, "keys"),
            self.model.keys.len() as u64,
            "{}",
            what
        );
        for key in KEYS {
            let got = api::head_meta(&self.http, &self.url(), key)
                .await
                .map_err(fail)?;
            prop_assert_eq!(got, self.model.meta(key), "{}: HEAD {}", what, key);
        }
        for prefix in PREFIXES {
            for keys_only in [false, true] {
                let q = RangeQuery {
                    limit: Some(2),
                    keys_only,
                    ..RangeQuery::prefix(prefix)
                };
                self.check_range(&q, what).await?;
            }
            let q = RangeQuery::prefix(prefix);
            let (count, _) = api::range_count(&self.http, &self.url(), &q)
                .await
                .map_err(fail)?;
            prop_assert_eq!(
                count,
                self.model.range(&q).len() as u64,
                "{}: count {:?}",
                what,
                q
            );
        }
        Ok(())
    }
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let tmp = TempDir::new().unwrap();
    let mut run = Run {
        kvd: node::start(&tmp, &[]),
        http: api::client(node::REQUEST_TIMEOUT),
        model: Model::default(),
    };
    for (n, step) in steps.iter().enumerate() {
        run.step(n, step).await?;
    }
    run.check_thoroughly("at the end").await
}

proptest! {
    // Each case starts real processes; a couple of dozen keep the test
    // under a minute in a debug build while still mixing every operation
    // with both kinds of restart.
    #![proptest_config(ProptestConfig {
        cases: 32,
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_a_model_with_versions(steps in vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(steps))?;
    }
}
