//! Bad TTLs, leases and watch parameters (docs/DESIGN.md §2.15-§2.17) get
//! a 4xx JSON error with the right code and change nothing: the node's
//! keys and digest (and, for requests refused before they are logged, its
//! last index) are the same before and after. On a masterless node every
//! lease route and `lease=` is 409 `unsupported_in_masterless`.

use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::node::{expect_json_error, fingerprint, get_raw, http, start};
use kvstore_testkit::ttl::{self, Expiry};
use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Ten years in milliseconds: the largest TTL (§2.15).
const MAX_TTL_MS: u64 = 315_360_000_000;

/// One bad request and the codes it may get (more than one where the
/// contract lets a number that does not parse be either `invalid_query`
/// or the field's own code).
struct Case {
    name: String,
    method: Method,
    path: String,
    body: Option<Value>,
    status: u16,
    codes: &'static [&'static str],
    /// Refused before anything is logged: the last index stays too. A
    /// bulk or transaction naming a dead lease is decided at its record,
    /// which may take an index (§2.15: it "changes nothing").
    not_logged: bool,
}

fn case(name: impl Into<String>, method: Method, path: impl Into<String>) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        body: None,
        status: 400,
        codes: &[],
        not_logged: true,
    }
}

impl Case {
    fn wants(mut self, status: u16, codes: &'static [&'static str]) -> Case {
        self.status = status;
        self.codes = codes;
        self
    }

    fn json(mut self, body: Value) -> Case {
        self.body = Some(body);
        self
    }

    fn at_record(mut self) -> Case {
        self.not_logged = false;
        self
    }
}

const BAD_NUMBER: &[&str] = &["invalid_ttl", "invalid_query"];
const INVALID_TTL: &[&str] = &["invalid_ttl"];
const BAD_WATCH_NUMBER: &[&str] = &["invalid_watch", "invalid_query"];
const INVALID_WATCH: &[&str] = &["invalid_watch"];

fn put_cases(unknown_lease: u64) -> Vec<Case> {
    let put = |name: &str, q: &str| case(name, Method::PUT, format!("/v1/kv/bad/put?{q}"));
    vec![
        put("ttl_ms=0", "ttl_ms=0").wants(400, INVALID_TTL),
        put(
            "ttl_ms over ten years",
            &format!("ttl_ms={}", MAX_TTL_MS + 1),
        )
        .wants(400, INVALID_TTL),
        put("ttl_ms=u64::MAX", &format!("ttl_ms={}", u64::MAX)).wants(400, INVALID_TTL),
        put("ttl_ms negative", "ttl_ms=-5").wants(400, BAD_NUMBER),
        put("ttl_ms over u64", "ttl_ms=99999999999999999999999").wants(400, BAD_NUMBER),
        put("ttl_ms not a number", "ttl_ms=abc").wants(400, BAD_NUMBER),
        put("ttl_ms fractional", "ttl_ms=1.5").wants(400, BAD_NUMBER),
        put("ttl_ms empty", "ttl_ms=").wants(400, BAD_NUMBER),
        put("ttl_ms twice", "ttl_ms=1000&ttl_ms=2000").wants(400, &["invalid_query"]),
        put("ttl_ms and keep_ttl", "ttl_ms=1000&keep_ttl=true").wants(400, INVALID_TTL),
        put(
            "ttl_ms and lease",
            &format!("ttl_ms=1000&lease={unknown_lease}"),
        )
        .wants(400, INVALID_TTL),
        put("keep_ttl not a boolean", "keep_ttl=yes").wants(400, &["invalid_query"]),
        put("lease not a number", "lease=abc").wants(400, &["invalid_query", "invalid_ttl"]),
        put("lease nobody holds", &format!("lease={unknown_lease}"))
            .wants(404, &["lease_not_found"])
            .at_record(),
        put("a TTL parameter misspelt", "ttl=1000").wants(400, &["unknown_parameter"]),
    ]
}

fn bulk_cases(unknown_lease: u64) -> Vec<Case> {
    let bulk = |name: &str, bad: Value| {
        let good = |i: u32| json!({"key": format!("bad/bulk/{i}"), "value": "v", "ttl_ms": 60000});
        case(name, Method::POST, "/v1/bulk").json(json!({"items": [good(0), bad, good(1)]}))
    };
    let item = |extra: Value| {
        let mut o = json!({"key": "bad/bulk/x", "value": "v"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            o[k] = v;
        }
        o
    };
    const SHAPE: &[&str] = &[
        "invalid_ttl",
        "invalid_item",
        "invalid_bulk",
        "invalid_json",
    ];
    vec![
        bulk("bulk ttl_ms 0", item(json!({"ttl_ms": 0}))).wants(400, SHAPE),
        bulk(
            "bulk ttl_ms over ten years",
            item(json!({"ttl_ms": MAX_TTL_MS + 1})),
        )
        .wants(400, SHAPE),
        bulk("bulk ttl_ms negative", item(json!({"ttl_ms": -1}))).wants(400, SHAPE),
        bulk("bulk ttl_ms a string", item(json!({"ttl_ms": "1000"}))).wants(400, SHAPE),
        bulk("bulk ttl_ms fractional", item(json!({"ttl_ms": 1.5}))).wants(400, SHAPE),
        bulk("bulk ttl_ms 1e30", item(json!({"ttl_ms": 1e30}))).wants(400, SHAPE),
        bulk(
            "bulk ttl_ms and keep_ttl",
            item(json!({"ttl_ms": 1000, "keep_ttl": true})),
        )
        .wants(400, SHAPE),
        bulk(
            "bulk ttl_ms and lease",
            item(json!({"ttl_ms": 1000, "lease": unknown_lease})),
        )
        .wants(400, SHAPE),
        bulk("bulk keep_ttl not a boolean", item(json!({"keep_ttl": 1}))).wants(400, SHAPE),
        bulk("bulk lease a string", item(json!({"lease": "7"}))).wants(400, SHAPE),
        bulk(
            "bulk lease nobody holds",
            item(json!({"lease": unknown_lease})),
        )
        .wants(404, &["lease_not_found"])
        .at_record(),
    ]
}

fn txn_cases(unknown_lease: u64) -> Vec<Case> {
    let txn = |name: &str, put: Value| {
        case(name, Method::POST, "/v1/txn").json(json!({
            "success": [{"put": {"key": "bad/txn/a", "value": "a", "ttl_ms": 60000}},
                        {"put": put}]
        }))
    };
    let put = |extra: Value| {
        let mut o = json!({"key": "bad/txn/b", "value": "b"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            o[k] = v;
        }
        o
    };
    const SHAPE: &[&str] = &["invalid_ttl", "invalid_txn", "invalid_json"];
    vec![
        txn("txn put ttl_ms 0", put(json!({"ttl_ms": 0}))).wants(400, SHAPE),
        txn(
            "txn put ttl_ms huge",
            put(json!({"ttl_ms": MAX_TTL_MS + 1})),
        )
        .wants(400, SHAPE),
        txn("txn put ttl_ms a string", put(json!({"ttl_ms": "x"}))).wants(400, SHAPE),
        txn(
            "txn put lease and keep_ttl",
            put(json!({"lease": unknown_lease, "keep_ttl": true})),
        )
        .wants(400, SHAPE),
        txn(
            "txn put lease nobody holds",
            put(json!({"lease": unknown_lease})),
        )
        .wants(404, &["lease_not_found"])
        .at_record(),
    ]
}

fn lease_cases(unknown_lease: u64) -> Vec<Case> {
    let grant = |name: &str, body: Value| case(name, Method::POST, "/v1/leases").json(body);
    const SHAPE: &[&str] = &["invalid_ttl", "invalid_json"];
    vec![
        grant("grant ttl_ms 0", json!({"ttl_ms": 0})).wants(400, INVALID_TTL),
        grant("grant ttl_ms huge", json!({"ttl_ms": MAX_TTL_MS + 1})).wants(400, INVALID_TTL),
        grant("grant ttl_ms negative", json!({"ttl_ms": -1})).wants(400, SHAPE),
        grant("grant ttl_ms a string", json!({"ttl_ms": "1000"})).wants(400, SHAPE),
        grant("grant without ttl_ms", json!({})).wants(400, SHAPE),
        grant(
            "grant with an unknown field",
            json!({"ttl_ms": 1000, "id": 5}),
        )
        .wants(400, &["invalid_json"]),
        grant("grant body an array", json!([1000])).wants(400, &["invalid_json"]),
        case(
            "grant with a parameter",
            Method::POST,
            "/v1/leases?ttl_ms=1000",
        )
        .json(json!({"ttl_ms": 1000}))
        .wants(400, &["unknown_parameter"]),
        case(
            "keep-alive of a lease nobody holds",
            Method::POST,
            format!("/v1/leases/{unknown_lease}/keepalive"),
        )
        .wants(404, &["lease_not_found"])
        .at_record(),
        case(
            "revoke of a lease nobody holds",
            Method::DELETE,
            format!("/v1/leases/{unknown_lease}"),
        )
        .wants(404, &["lease_not_found"])
        .at_record(),
        case(
            "show a lease nobody holds",
            Method::GET,
            format!("/v1/leases/{unknown_lease}"),
        )
        .wants(404, &["lease_not_found"]),
        case("lease id not a number", Method::GET, "/v1/leases/abc").wants(
            400,
            &[
                "invalid_query",
                "invalid_ttl",
                "lease_not_found",
                "not_found",
            ],
        ),
        case(
            "keep-alive with a parameter",
            Method::POST,
            format!("/v1/leases/{unknown_lease}/keepalive?ttl_ms=5"),
        )
        .wants(400, &["unknown_parameter"]),
    ]
}

fn watch_cases(last_index: u64) -> Vec<Case> {
    let watch = |name: &str, q: String| case(name, Method::GET, format!("/v1/watch?{q}"));
    let long = "k".repeat(1025);
    vec![
        watch("key with prefix", "key=a&prefix=a".into()).wants(400, INVALID_WATCH),
        watch("key with start", "key=a&start=a".into()).wants(400, INVALID_WATCH),
        watch("key with end", "key=a&end=b".into()).wants(400, INVALID_WATCH),
        watch("prefix with start/end", "prefix=a&start=a&end=b".into()).wants(400, INVALID_WATCH),
        watch("start after end", "start=b&end=a".into()).wants(400, INVALID_WATCH),
        watch("empty key", "key=".into()).wants(400, INVALID_WATCH),
        watch("key over 1024 bytes", format!("key={long}")).wants(400, INVALID_WATCH),
        watch("key with a NUL", "key=a%00b".into()).wants(400, INVALID_WATCH),
        watch("prefix over 1024 bytes", format!("prefix={long}")).wants(400, INVALID_WATCH),
        watch("from_index=0", "from_index=0".into()).wants(400, INVALID_WATCH),
        watch("from_index=abc", "from_index=abc".into()).wants(400, BAD_WATCH_NUMBER),
        watch("from_index negative", "from_index=-1".into()).wants(400, BAD_WATCH_NUMBER),
        watch(
            "from_index over 2^63",
            format!("from_index={}", (1u64 << 63) + 1),
        )
        .wants(400, INVALID_WATCH),
        watch(
            "from_index in the future",
            format!("from_index={}", last_index + 2),
        )
        .wants(400, &["future_index"]),
        watch("progress_ms below 100", "progress_ms=99".into()).wants(400, INVALID_WATCH),
        watch("progress_ms over 60000", "progress_ms=60001".into()).wants(400, INVALID_WATCH),
        watch("progress_ms=abc", "progress_ms=abc".into()).wants(400, BAD_WATCH_NUMBER),
        watch("prev_value not a boolean", "prev_value=yes".into()).wants(400, &["invalid_query"]),
        watch("prefix given twice", "prefix=a&prefix=b".into()).wants(400, &["invalid_query"]),
        watch("unknown parameter", "prefix=a&since=3".into()).wants(400, &["unknown_parameter"]),
    ]
}

/// Sends one case and checks its answer and that nothing changed.
async fn check(http: &reqwest::Client, kvd: &kvstore_testkit::Kvd, c: &Case) {
    let before = fingerprint(http, kvd).await;
    let mut req = http.request(c.method.clone(), format!("{}{}", kvd.url(), c.path));
    if let Some(b) = &c.body {
        req = req.json(b);
    } else if c.method == Method::PUT {
        req = req.body("value");
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let (status, code) = expect_json_error(resp, &c.name).await;
    assert_eq!(status, c.status, "{}: status (code {code})", c.name);
    assert!(
        c.codes.contains(&code.as_str()),
        "{}: code {code}, want one of {:?}",
        c.name,
        c.codes
    );
    let after = fingerprint(http, kvd).await;
    if c.not_logged {
        assert_eq!(before, after, "{}: the node changed", c.name);
    } else {
        assert_eq!(
            (before.1, &before.2),
            (after.1, &after.2),
            "{}: keys or digest changed",
            c.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ttls_leases_and_watch_parameters_are_refused_and_change_nothing() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let http = http();
    let base = kvd.url();
    // Some state that a wrong acceptance could change: a permanent key, a
    // key with a TTL, a live lease with a key.
    ttl::put(&http, &base, "bad/keep", b"k", Expiry::Never)
        .await
        .done("put");
    ttl::put(&http, &base, "bad/ttl", b"t", Expiry::Ttl(3_600_000))
        .await
        .done("put with ttl");
    let lease = ttl::lease_grant(&http, &base, 3_600_000).await.unwrap();
    ttl::put(&http, &base, "bad/leased", b"l", Expiry::Lease(lease))
        .await
        .done("put with lease");
    // An id no lease has: far past any index this test reaches.
    let unknown = 1_000_000_000;

    let mut cases = put_cases(unknown);
    cases.extend(bulk_cases(unknown));
    cases.extend(txn_cases(unknown));
    cases.extend(lease_cases(unknown));
    for c in &cases {
        check(&http, &kvd, c).await;
    }
    // Some of those took an index: the future starts after them.
    let last = fingerprint(&http, &kvd).await.0;
    for c in &watch_cases(last) {
        check(&http, &kvd, c).await;
    }
    // The keys the refused writes named are absent, the others as before.
    for k in [
        "bad/put",
        "bad/bulk/0",
        "bad/bulk/1",
        "bad/bulk/x",
        "bad/txn/a",
        "bad/txn/b",
    ] {
        assert_eq!(get_raw(&http, &kvd, k).await, None, "{k} was written");
    }
    assert_eq!(
        get_raw(&http, &kvd, "bad/ttl").await.as_deref(),
        Some(&b"t"[..])
    );
    assert_eq!(
        get_raw(&http, &kvd, "bad/leased").await.as_deref(),
        Some(&b"l"[..])
    );
    let (code, info) = ttl::lease_info(&http, &base, lease).await.unwrap();
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["keys"], json!(["bad/leased"]), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_409_on_a_masterless_node_and_change_nothing() {
    let c = Cluster::start("masterless", |_| Vec::new());
    let http = http();
    let kvd = &c.nodes[0];
    let cases = vec![
        case("put with a lease", Method::PUT, "/v1/kv/ml/a?lease=1"),
        case("grant", Method::POST, "/v1/leases").json(json!({"ttl_ms": 1000})),
        case("keep-alive", Method::POST, "/v1/leases/1/keepalive"),
        case("revoke", Method::DELETE, "/v1/leases/1"),
        case("show", Method::GET, "/v1/leases/1"),
        case("bulk item with a lease", Method::POST, "/v1/bulk")
            .json(json!({"items": [{"key": "ml/b", "value": "v", "lease": 1}]})),
    ];
    for mut c in cases {
        c = c.wants(409, &["unsupported_in_masterless"]);
        check(&http, kvd, &c).await;
    }
    // A TTL is fine there; a bad one is refused as on any node.
    check(
        &http,
        kvd,
        &case("ttl_ms=0", Method::PUT, "/v1/kv/ml/c?ttl_ms=0").wants(400, INVALID_TTL),
    )
    .await;
    ttl::put(&http, &kvd.url(), "ml/d", b"d", Expiry::Ttl(3_600_000))
        .await
        .done("masterless put with ttl");
}
