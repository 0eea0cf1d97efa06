//! The KV API applications build on (docs/DESIGN.md §2.10-§2.13), against
//! real kvd processes: per-key versions and their headers, HEAD, ordered
//! ranges and their pages, conditional writes, transactions, deletes by
//! prefix; bad input that gets a 4xx and changes nothing; and what a
//! masterless node refuses.

use std::collections::BTreeMap;

use base64::Engine as _;
use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::node::{expect_json_error, fingerprint, http, start, status};
use kvstore_testkit::Kvd;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

fn url(kvd: &Kvd, path: &str) -> String {
    format!("{}{path}", kvd.url())
}

/// The JSON body of an answer that must be 200.
async fn ok_json(req: RequestBuilder, what: &str) -> Value {
    let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{what}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"))
}

async fn put(h: &reqwest::Client, kvd: &Kvd, key: &str, value: &str) -> u64 {
    let v = ok_json(
        h.put(url(kvd, &format!("/v1/kv/{key}")))
            .body(value.to_string()),
        key,
    )
    .await;
    v["index"].as_u64().expect("a PUT answers its index")
}

async fn txn(h: &reqwest::Client, kvd: &Kvd, body: Value) -> Value {
    ok_json(h.post(url(kvd, "/v1/txn")).json(&body), &body.to_string()).await
}

/// A key's versions as its headers say them: (mod, create, version, ETag).
fn versions(resp: &Response) -> (u64, u64, u64, String) {
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let number = |name: &str| header(name).parse::<u64>().unwrap();
    (
        number("x-kv-mod-index"),
        number("x-kv-create-index"),
        number("x-kv-version"),
        header("etag"),
    )
}

async fn read_versions(h: &reqwest::Client, kvd: &Kvd, key: &str) -> (u64, u64, u64, String) {
    let resp = h
        .get(url(kvd, &format!("/v1/kv/{key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET {key}");
    versions(&resp)
}

#[tokio::test]
async fn every_write_moves_the_versions_and_head_answers_the_headers() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let h = http();
    let first = put(&h, &kvd, "v", "one").await;
    assert_eq!(
        read_versions(&h, &kvd, "v").await,
        (first, first, 1, format!("\"{first}\""))
    );
    let second = put(&h, &kvd, "v", "two!").await;
    assert_eq!(
        read_versions(&h, &kvd, "v").await,
        (second, first, 2, format!("\"{second}\""))
    );

    let head = h.head(url(&kvd, "/v1/kv/v")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(versions(&head), (second, first, 2, format!("\"{second}\"")));
    assert_eq!(head.headers()["content-length"], "4", "the GET's length");
    assert!(head.bytes().await.unwrap().is_empty(), "HEAD has no body");

    let deleted = ok_json(h.delete(url(&kvd, "/v1/kv/v")), "delete").await;
    assert_eq!(deleted["deleted"], true);
    let gone = h.head(url(&kvd, "/v1/kv/v")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(gone.headers().get("etag").is_none());
    assert!(
        gone.bytes().await.unwrap().is_empty(),
        "a 404 to HEAD has no body"
    );
    let (code, err) = expect_json_error(
        h.get(url(&kvd, "/v1/kv/v")).send().await.unwrap(),
        "GET of a deleted key",
    )
    .await;
    assert_eq!((code, err.as_str()), (404, "key_not_found"));

    // Written again, it starts over.
    let again = put(&h, &kvd, "v", "three").await;
    assert_eq!(
        read_versions(&h, &kvd, "v").await,
        (again, again, 1, format!("\"{again}\""))
    );
    // A restart derives the same numbers from the log.
    let mut kvd = kvd;
    kvstore_testkit::node::crash_restart(&mut kvd);
    // A new client: the old one's pooled connection died with the process.
    let h = http();
    assert_eq!(
        read_versions(&h, &kvd, "v").await,
        (again, again, 1, format!("\"{again}\""))
    );
}

/// Keys `r/000` .. of the range tests, with one binary value among them.
async fn fill(h: &reqwest::Client, kvd: &Kvd, n: usize) -> BTreeMap<String, Value> {
    let mut items: Vec<Value> = (0..n)
        .map(|i| json!({"key": format!("r/{i:03}"), "value": format!("value {i}")}))
        .collect();
    items[1]["value"] = json!({"base64": "AP8="});
    for other in ["q/1", "r", "s/1", "r0"] {
        items.push(json!({"key": other, "value": "outside"}));
    }
    ok_json(
        h.post(url(kvd, "/v1/bulk"))
            .json(&json!({ "items": items })),
        "bulk",
    )
    .await;
    items
        .into_iter()
        .filter(|i| i["key"].as_str().unwrap().starts_with("r/"))
        .map(|i| (i["key"].as_str().unwrap().to_string(), i["value"].clone()))
        .collect()
}

fn keys_of(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_string())
        .collect()
}

/// Pages through `query` with `limit`, checking each page; every key seen.
async fn page_through(h: &reqwest::Client, kvd: &Kvd, query: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q = format!("/v1/kv?{query}&limit={limit}");
        if let Some(t) = &token {
            q.push_str(&format!("&page_token={t}"));
        }
        let page = ok_json(h.get(url(kvd, &q)), &q).await;
        let got = page["items"].as_array().unwrap();
        assert_eq!(
            page["count"].as_u64().unwrap() as usize,
            got.len(),
            "{page}"
        );
        assert!(got.len() <= limit);
        items.extend(got.iter().cloned());
        match page.get("next_page_token") {
            Some(t) => token = Some(t.as_str().unwrap().to_string()),
            None => return items,
        }
        assert!(items.len() <= 10_000, "paging does not end");
    }
}

#[tokio::test]
async fn ranges_list_keys_in_order_a_page_at_a_time() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let h = http();
    let want = fill(&h, &kvd, 250).await;
    let last_index = status(&h, &kvd).await["last_index"].as_u64().unwrap();

    let first = ok_json(h.get(url(&kvd, "/v1/kv?prefix=r/")), "a prefix").await;
    assert_eq!(
        keys_of(&first),
        want.keys().take(100).cloned().collect::<Vec<_>>(),
        "default limit 100"
    );
    assert!(
        first["index"].as_u64().unwrap() >= last_index,
        "{}",
        first["index"]
    );
    let item = &first["items"][0];
    assert_eq!(item["value"], "value 0");
    assert_eq!(item["version"], 1);
    assert_eq!(item["mod_index"], item["create_index"]);
    assert_eq!(
        first["items"][1]["value"],
        json!({"base64": "AP8="}),
        "binary values as base64"
    );

    // Paged to the end: every key once, in order.
    for limit in [1, 7, 250, 10_000] {
        let all = page_through(&h, &kvd, "prefix=r/", limit).await;
        let got: BTreeMap<String, Value> = all
            .iter()
            .map(|i| (i["key"].as_str().unwrap().to_string(), i["value"].clone()))
            .collect();
        assert_eq!(got, want, "limit {limit}");
        let order: Vec<&str> = all.iter().map(|i| i["key"].as_str().unwrap()).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "limit {limit}: out of order"
        );
    }

    let half_open = ok_json(
        h.get(url(&kvd, "/v1/kv?start=r/010&end=r/013")),
        "start/end",
    )
    .await;
    assert_eq!(keys_of(&half_open), ["r/010", "r/011", "r/012"]);
    assert!(half_open.get("next_page_token").is_none());
    let everything = page_through(&h, &kvd, "start=", 100).await;
    assert_eq!(everything.len(), 254, "every key, from the first");
    let up_to = ok_json(h.get(url(&kvd, "/v1/kv?end=r/000")), "end only").await;
    assert_eq!(keys_of(&up_to), ["q/1", "r"]);

    let bare = ok_json(
        h.get(url(&kvd, "/v1/kv?prefix=r/&limit=3&keys_only=true")),
        "keys_only",
    )
    .await;
    for i in bare["items"].as_array().unwrap() {
        assert!(i.get("value").is_none(), "{i}");
        assert_eq!(i["version"], 1);
    }
    let counted = ok_json(
        h.get(url(&kvd, "/v1/kv?prefix=r/&count_only=true")),
        "count_only",
    )
    .await;
    assert_eq!(counted["count"], 250);
    assert!(counted.get("items").is_none());
    let token = bare["next_page_token"].as_str().unwrap();
    let rest = ok_json(
        h.get(url(
            &kvd,
            &format!("/v1/kv?prefix=r/&count_only=true&page_token={token}"),
        )),
        "count of the rest",
    )
    .await;
    assert_eq!(rest["count"], 247);
    // A token does not depend on limit or keys_only.
    let next = ok_json(
        h.get(url(
            &kvd,
            &format!("/v1/kv?prefix=r/&limit=2&page_token={token}"),
        )),
        "continued",
    )
    .await;
    assert_eq!(keys_of(&next), ["r/003", "r/004"]);
    let consistent = ok_json(
        h.get(url(&kvd, "/v1/kv?prefix=r/00&consistent=true")),
        "consistent",
    )
    .await;
    assert_eq!(consistent["count"], 10);
}

async fn header_put(
    h: &reqwest::Client,
    kvd: &Kvd,
    key: &str,
    header: (&str, &str),
    value: &str,
) -> Response {
    h.put(url(kvd, &format!("/v1/kv/{key}")))
        .header(header.0, header.1)
        .body(value.to_string())
        .send()
        .await
        .unwrap()
}

/// A 412's body and ETag, after checking its shape.
async fn precondition_failed(resp: Response) -> (Value, Option<String>) {
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    (body["current"].clone(), etag)
}

async fn value_of(h: &reqwest::Client, kvd: &Kvd, key: &str) -> Option<String> {
    kvstore_testkit::node::get_raw(h, kvd, key)
        .await
        .map(|v| String::from_utf8(v).unwrap())
}

#[tokio::test]
async fn conditional_writes_happen_only_when_their_condition_holds() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let h = http();

    let created = header_put(&h, &kvd, "c", ("if-none-match", "*"), "first").await;
    assert_eq!(created.status(), StatusCode::OK);
    let first: Value = created.json().await.unwrap();
    let first = first["index"].as_u64().unwrap();

    let before = fingerprint(&h, &kvd).await;
    let (current, etag) =
        precondition_failed(header_put(&h, &kvd, "c", ("if-none-match", "*"), "again").await).await;
    assert_eq!(
        current,
        json!({"exists": true, "create_index": first, "mod_index": first, "version": 1})
    );
    assert_eq!(etag, Some(format!("\"{first}\"")));
    let stale = format!("\"{}\"", first + 100);
    let (current, _) =
        precondition_failed(header_put(&h, &kvd, "c", ("if-match", &stale), "x").await).await;
    assert_eq!(current["mod_index"], first);
    // A refused conditional write is still one record (its read), but it
    // changes no key.
    let after = fingerprint(&h, &kvd).await;
    assert_eq!(
        (after.1, after.2),
        (before.1, before.2),
        "a refused write changes nothing"
    );
    assert_eq!(value_of(&h, &kvd, "c").await.as_deref(), Some("first"));

    let matched = header_put(
        &h,
        &kvd,
        "c",
        ("if-match", &format!("\"{first}\"")),
        "second",
    )
    .await;
    assert_eq!(matched.status(), StatusCode::OK);
    let second: Value = matched.json().await.unwrap();
    let second = second["index"].as_u64().unwrap();
    assert_eq!(
        read_versions(&h, &kvd, "c").await,
        (second, first, 2, format!("\"{second}\""))
    );
    let any = header_put(&h, &kvd, "c", ("if-match", "*"), "third").await;
    assert_eq!(any.status(), StatusCode::OK);

    let (absent, etag) =
        precondition_failed(header_put(&h, &kvd, "nope", ("if-match", "*"), "x").await).await;
    assert_eq!(
        absent,
        json!({"exists": false, "create_index": 0, "mod_index": 0, "version": 0})
    );
    assert_eq!(etag, None);
    assert_eq!(value_of(&h, &kvd, "nope").await, None);

    // DELETE with If-Match: a stale tag refuses, the current one deletes.
    let (_, _, _, tag) = read_versions(&h, &kvd, "c").await;
    let refused = h
        .delete(url(&kvd, "/v1/kv/c"))
        .header("if-match", stale.as_str())
        .send()
        .await
        .unwrap();
    precondition_failed(refused).await;
    assert_eq!(value_of(&h, &kvd, "c").await.as_deref(), Some("third"));
    let gone = ok_json(
        h.delete(url(&kvd, "/v1/kv/c"))
            .header("if-match", tag.as_str()),
        "delete",
    )
    .await;
    assert_eq!(gone["deleted"], true);
    assert_eq!(value_of(&h, &kvd, "c").await, None);
}

#[tokio::test]
async fn transactions_run_one_branch_and_their_reads_see_earlier_writes() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let h = http();
    let a = put(&h, &kvd, "a", "1").await;
    put(&h, &kvd, "tmp/x", "x").await;
    put(&h, &kvd, "tmp/y", "y").await;

    let won = txn(
        &h,
        &kvd,
        json!({
            "compare": [
                {"key": "a", "target": "mod_index", "op": "==", "value": a},
                {"key": "a", "target": "value", "op": "==", "value": "1"},
                {"key": "b", "target": "exists", "op": "==", "value": false},
            ],
            "success": [
                {"put": {"key": "a", "value": "2"}},
                {"put": {"key": "b", "value": {"base64": "/w=="}}},
                {"get": {"key": "a"}},
                {"delete_prefix": {"prefix": "tmp/"}},
                {"range": {"prefix": "", "keys_only": true}},
                {"delete": {"key": "missing"}},
                {"get": {"key": "missing"}},
            ],
            "failure": [{"put": {"key": "failure", "value": "ran"}}],
        }),
    )
    .await;
    assert_eq!(won["succeeded"], true, "{won}");
    let index = won["index"].as_u64().unwrap();
    let r = &won["results"];
    assert_eq!(r[0], json!({"put": {"mod_index": index}}));
    assert_eq!(
        r[2]["get"]["value"], "2",
        "a read sees the writes before it"
    );
    assert_eq!(r[2]["get"]["version"], 2);
    assert_eq!(r[3], json!({"delete_prefix": {"deleted": 2}}));
    let listed: Vec<&str> = r[4]["range"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["a", "b"], "{}", r[4]);
    assert_eq!(r[4]["range"]["more"], false);
    assert_eq!(r[5], json!({"delete": {"deleted": false}}));
    assert_eq!(r[6], json!({"get": null}));
    assert_eq!(
        value_of(&h, &kvd, "failure").await,
        None,
        "only one branch runs"
    );
    assert_eq!(
        kvstore_testkit::node::get_raw(&h, &kvd, "b").await,
        Some(vec![0xff])
    );
    assert_eq!(value_of(&h, &kvd, "tmp/x").await, None);

    // The same compares again fail (a moved on): the failure branch runs.
    let lost = txn(
        &h,
        &kvd,
        json!({
            "compare": [{"key": "a", "target": "mod_index", "op": "==", "value": a}],
            "success": [{"put": {"key": "a", "value": "never"}}],
            "failure": [{"get": {"key": "a"}}, {"put": {"key": "failure", "value": "ran"}}],
        }),
    )
    .await;
    assert_eq!(lost["succeeded"], false);
    assert_eq!(lost["results"][0]["get"]["mod_index"], index);
    assert_eq!(value_of(&h, &kvd, "a").await.as_deref(), Some("2"));
    assert_eq!(value_of(&h, &kvd, "failure").await.as_deref(), Some("ran"));

    // No compares: success; an empty transaction is still one record.
    let empty = txn(&h, &kvd, json!({})).await;
    assert_eq!(
        (empty["succeeded"].clone(), empty["results"].clone()),
        (json!(true), json!([]))
    );
    assert!(empty["index"].as_u64().unwrap() > lost["index"].as_u64().unwrap());

    // The prefix shortcut.
    for k in ["p/1", "p/2", "p/3", "pq"] {
        put(&h, &kvd, k, "v").await;
    }
    let deleted = ok_json(h.delete(url(&kvd, "/v1/kv?prefix=p/")), "delete by prefix").await;
    assert_eq!(deleted["deleted"], 3, "{deleted}");
    assert!(deleted["index"].as_u64().is_some());
    assert_eq!(value_of(&h, &kvd, "pq").await.as_deref(), Some("v"));
    assert_eq!(value_of(&h, &kvd, "p/2").await, None);
}

/// One request that must be refused, and how.
struct Bad {
    name: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    /// A word the message must hold (the parameter or field it names).
    names: Option<&'static str>,
}

fn bad(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    status: u16,
    code: &'static str,
) -> Bad {
    Bad {
        name,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: None,
        status,
        code,
        names: None,
    }
}

impl Bad {
    fn header(mut self, name: &'static str, value: &str) -> Bad {
        self.headers.push((name, value.to_string()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Bad {
        self.body = Some(body.into());
        self
    }

    fn naming(mut self, word: &'static str) -> Bad {
        self.names = Some(word);
        self
    }
}

fn bad_txn(name: &'static str, body: Value, status: u16, code: &'static str) -> Bad {
    bad(name, Method::POST, "/v1/txn", status, code).body(body.to_string())
}

fn unknown(name: &'static str, method: Method, path: &str) -> Bad {
    bad(name, method, path, 400, "unknown_parameter")
}

/// The refusals of the API's new surface and of unknown parameters
/// everywhere; `tampered` and `foreign` are page tokens gone wrong.
fn bad_requests(tampered: &str, foreign: &str) -> Vec<Bad> {
    let gets = vec![json!({"get": {"key": "a"}}); 128];
    let puts: Vec<Value> = (0..129)
        .map(|i| json!({"put": {"key": format!("t/{i}"), "value": "v"}}))
        .collect();
    vec![
        bad("txn not JSON", Method::POST, "/v1/txn", 400, "invalid_json").body("{\"compare\": ["),
        bad_txn("txn an array", json!([]), 400, "invalid_json"),
        bad_txn("txn unknown field", json!({"success": [], "sucess": []}), 400, "invalid_json"),
        bad_txn("txn unknown op", json!({"success": [{"upsert": {"key": "t/a"}}]}), 400, "invalid_json"),
        bad_txn("txn 129 ops", json!({"success": puts}), 413, "too_many_ops"),
        bad_txn(
            "txn 129 compares and ops",
            json!({"compare": [{"key": "a", "target": "version", "op": ">", "value": 0}], "failure": gets}),
            413,
            "too_many_ops",
        ),
        bad_txn(
            "unknown compare target",
            json!({"compare": [{"key": "a", "target": "size", "op": "==", "value": 1}], "success": [{"put": {"key": "t/a", "value": "v"}}]}),
            400,
            "invalid_txn",
        )
        .naming("compare[0].target"),
        bad_txn(
            "bad key in a txn",
            json!({"success": [{"put": {"key": "t/ok", "value": "v"}}, {"delete": {"key": "t/b"}}, {"put": {"key": "", "value": "v"}}]}),
            400,
            "invalid_txn",
        )
        .naming("success[2].put.key"),
        bad_txn(
            "exists with <",
            json!({"compare": [{"key": "a", "target": "exists", "op": "<", "value": true}]}),
            400,
            "invalid_txn",
        ),
        bad_txn(
            "txn value over the limit",
            json!({"success": [{"put": {"key": "t/big", "value": "v".repeat(1025)}}]}),
            413,
            "value_too_large",
        ),
        bad(
            "txn body over the bulk limit",
            Method::POST,
            "/v1/txn",
            413,
            "value_too_large",
        )
        .body(json!({"success": [{"put": {"key": "t/x", "value": "v".repeat(70_000)}}]}).to_string()),
        bad("tampered page token", Method::GET, format!("/v1/kv?prefix=r/&page_token={tampered}"), 400, "invalid_page_token"),
        bad("foreign page token", Method::GET, format!("/v1/kv?prefix=s/&page_token={foreign}"), 400, "invalid_page_token"),
        bad("garbage page token", Method::GET, "/v1/kv?page_token=!!", 400, "invalid_page_token"),
        bad("limit 0", Method::GET, "/v1/kv?limit=0", 400, "invalid_limit"),
        bad("limit 10001", Method::GET, "/v1/kv?limit=10001", 400, "invalid_limit"),
        bad("limit not a number", Method::GET, "/v1/kv?limit=ten", 400, "invalid_query"),
        bad("start after end", Method::GET, "/v1/kv?start=b&end=a", 400, "invalid_range"),
        bad("prefix with start", Method::GET, "/v1/kv?prefix=a&start=a", 400, "invalid_query"),
        bad("keys_only not a bool", Method::GET, "/v1/kv?keys_only=1", 400, "invalid_query"),
        bad("consistent not a bool", Method::GET, "/v1/kv/a?consistent=yes", 400, "invalid_query"),
        bad("repeated parameter", Method::GET, "/v1/kv?limit=1&limit=2", 400, "invalid_query"),
        bad("delete without a prefix", Method::DELETE, "/v1/kv", 400, "invalid_query"),
        bad("delete with an empty prefix", Method::DELETE, "/v1/kv?prefix=", 400, "invalid_query"),
        bad("PUT on /v1/kv", Method::PUT, "/v1/kv", 400, "invalid_key"),
        bad("If-Match weak", Method::PUT, "/v1/kv/a", 400, "invalid_precondition").header("if-match", "W/\"1\"").body("x"),
        bad("If-Match unquoted", Method::PUT, "/v1/kv/a", 400, "invalid_precondition").header("if-match", "1").body("x"),
        bad("If-Match not a number", Method::PUT, "/v1/kv/a", 400, "invalid_precondition").header("if-match", "\"abc\"").body("x"),
        bad("If-Match a list", Method::DELETE, "/v1/kv/a", 400, "invalid_precondition").header("if-match", "\"1\", \"2\""),
        bad("If-None-Match a tag", Method::PUT, "/v1/kv/t/new", 400, "invalid_precondition").header("if-none-match", "\"1\"").body("x"),
        bad("If-None-Match on DELETE", Method::DELETE, "/v1/kv/a", 400, "invalid_precondition").header("if-none-match", "*"),
        bad("both preconditions", Method::PUT, "/v1/kv/a", 400, "invalid_precondition")
            .header("if-match", "*")
            .header("if-none-match", "*")
            .body("x"),
        unknown("PUT with a misspelt ttl", Method::PUT, "/v1/kv/t/ttl?ttl=300").body("v").naming("\"ttl\""),
        unknown("GET with an unknown parameter", Method::GET, "/v1/kv/a?x=1").naming("\"x\""),
        unknown("DELETE with debug_flaky", Method::DELETE, "/v1/kv/a?debug_flaky=0").naming("debug_flaky"),
        unknown("range with sort", Method::GET, "/v1/kv?prefix=r/&sort=desc").naming("sort"),
        unknown("delete by prefix with recurse", Method::DELETE, "/v1/kv?prefix=r/&recurse=true").naming("recurse"),
        unknown("txn with dry_run", Method::POST, "/v1/txn?dry_run=true").body("{}").naming("dry_run"),
        unknown("bulk with ttl_ms", Method::POST, "/v1/bulk?ttl_ms=1")
            .body(json!({"items": [{"key": "t/bulk", "value": "v"}]}).to_string())
            .naming("ttl_ms"),
        unknown("status with verbose", Method::GET, "/v1/status?verbose=1"),
        unknown("health with a parameter", Method::GET, "/health?deep"),
        unknown("ready with a parameter", Method::GET, "/ready?x=1"),
        unknown("metrics with format", Method::GET, "/metrics?format=json"),
        unknown("openapi with a parameter", Method::GET, "/openapi.json?v=3"),
        unknown("search with an unknown parameter", Method::GET, "/v1/search?q=a&fuzzy=1"),
        unknown("pause_writes with a parameter", Method::POST, "/v1/admin/pause_writes?now=1"),
        unknown("promote with a parameter", Method::POST, "/v1/admin/promote?force=1"),
        unknown("append with a parameter", Method::POST, "/internal/append?x=1"),
        unknown("ml digest with a parameter", Method::GET, "/internal/ml/digest?x=1"),
    ]
}

async fn send(h: &reqwest::Client, kvd: &Kvd, b: &Bad) -> Response {
    let mut req = h.request(b.method.clone(), url(kvd, &b.path));
    for (name, value) in &b.headers {
        req = req.header(*name, value.as_str());
    }
    if let Some(body) = &b.body {
        req = req.body(body.clone());
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", b.name))
}

/// Flips one character in the middle of a token to another of the
/// alphabet.
fn tamper(token: &str) -> String {
    let mut t = token.as_bytes().to_vec();
    let i = t.len() / 2;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).unwrap()
}

#[tokio::test]
async fn bad_input_gets_a_4xx_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(
        &tmp,
        &["--max-value-bytes", "1024", "--max-bulk-bytes", "65536"],
    );
    let h = http();
    fill(&h, &kvd, 5).await;
    put(&h, &kvd, "a", "1").await;
    let page = ok_json(h.get(url(&kvd, "/v1/kv?prefix=r/&limit=2")), "a page").await;
    let token = page["next_page_token"]
        .as_str()
        .expect("a token")
        .to_string();
    assert!(base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&token)
        .is_ok());

    let before = fingerprint(&h, &kvd).await;
    for b in bad_requests(&tamper(&token), &token) {
        let resp = send(&h, &kvd, &b).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", b.name));
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (b.status, Some(b.code)),
            "{}: {text}",
            b.name
        );
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{}: {text}", b.name);
        if let Some(word) = b.names {
            assert!(
                message.contains(word),
                "{}: the message names {word}: {message}",
                b.name
            );
        }
        assert_eq!(
            fingerprint(&h, &kvd).await,
            before,
            "{} changed the store",
            b.name
        );
    }
    let s = status(&h, &kvd).await;
    assert_eq!(
        s["writes_paused"], false,
        "a refused pause_writes paused nothing"
    );
    assert_eq!(value_of(&h, &kvd, "t/ttl").await, None);
}

#[tokio::test]
async fn openapi_is_served_as_json() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let resp = http().get(url(&kvd, "/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let spec: Value = resp.json().await.unwrap();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{spec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masterless_refuses_compares_and_serves_ranges_and_stamps() {
    let cluster = Cluster::start("masterless", |_| Vec::new());
    let n0 = &cluster.nodes[0];
    let h = http();
    let written = ok_json(h.put(url(n0, "/v1/kv/m/a")).body("1"), "a masterless PUT").await;
    let ts = &written["ts"];
    let (_, _, version, etag) = read_versions(&h, n0, "m/a").await;
    assert_eq!(version, 1);
    assert_eq!(
        etag,
        format!("\"{}.{}.{}\"", ts["physical_ms"], ts["logical"], ts["node"])
    );

    // Only keys and digest: a masterless node's log also takes its peers'
    // writes.
    let keys_and_digest = |f: (u64, u64, String)| (f.1, f.2);
    let before = keys_and_digest(fingerprint(&h, n0).await);
    let refused = [
        h.put(url(n0, "/v1/kv/m/a"))
            .header("if-match", etag.as_str())
            .body("2"),
        h.put(url(n0, "/v1/kv/m/new"))
            .header("if-none-match", "*")
            .body("2"),
        h.delete(url(n0, "/v1/kv/m/a")).header("if-match", "*"),
        h.post(url(n0, "/v1/txn")).json(&json!({
            "compare": [{"key": "m/a", "target": "exists", "op": "==", "value": true}],
            "success": [{"put": {"key": "m/a", "value": "2"}}],
        })),
    ];
    for (i, req) in refused.into_iter().enumerate() {
        let resp = req.send().await.unwrap();
        let (code, err) = expect_json_error(resp, &format!("compare {i}")).await;
        assert_eq!(
            (code, err.as_str()),
            (409, "unsupported_in_masterless"),
            "request {i}"
        );
    }
    assert_eq!(
        keys_and_digest(fingerprint(&h, n0).await),
        before,
        "a refused compare writes nothing"
    );
    assert_eq!(value_of(&h, n0, "m/a").await.as_deref(), Some("1"));

    let plain = txn(
        &h,
        n0,
        json!({"success": [{"put": {"key": "m/b", "value": "2"}}, {"get": {"key": "m/a"}}]}),
    )
    .await;
    assert_eq!(plain["succeeded"], true, "{plain}");
    let page = ok_json(h.get(url(n0, "/v1/kv?prefix=m/")), "a masterless range").await;
    assert_eq!(keys_of(&page), ["m/a", "m/b"]);
}
