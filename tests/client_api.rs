//! The kvclient library's versions, ranges, conditional writes and
//! transactions against real kvd processes (docs/DESIGN.md §2.10-§2.13):
//! versions through puts and deletes, a range paged across many pages, a
//! compare-and-swap retry loop from several tasks, a transaction's two
//! branches, prefix deletes, what the client refuses before sending, and
//! in a cluster, conditional writes sent to a secondary and a page token
//! continued on another node.
//!
//! Which failures a conditional write is retried after needs a stopped
//! node; that test is in tests/client.rs with the other stopped-node tests.

use std::collections::BTreeSet;

use bytes::Bytes;
use kvclient::{
    Client, Cmp, Error, KeyRange, OpResult, Precondition, Target, Txn, TxnOp, Versioned,
};
use kvstore_testkit::masterless::eventually;
use kvstore_testkit::node::{client, fingerprint, http, start, REQUEST_TIMEOUT};
use kvstore_testkit::start_cluster;
use serde_json::json;
use tempfile::TempDir;

fn versions(v: &Versioned) -> (u64, u64, u64) {
    (v.create_index, v.mod_index, v.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_follow_puts_and_start_over_after_a_delete() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);

    assert_eq!(c.get_versioned("k").await.unwrap(), None);
    let first = c.set("k", "one").await.unwrap();
    let second = c.set("k", "two").await.unwrap();
    let v = c.get_versioned("k").await.unwrap().expect("k exists");
    assert_eq!(versions(&v), (first, second, 2));
    assert_eq!(v.value, Bytes::from_static(b"two"));
    assert_eq!(v.etag.as_deref(), Some(format!("\"{second}\"").as_str()));
    assert_eq!(c.get_versioned_consistent("k").await.unwrap(), Some(v));

    c.delete("k").await.unwrap();
    let third = c.set("k", "again").await.unwrap();
    let v = c.get_versioned("k").await.unwrap().expect("k exists");
    assert_eq!(
        versions(&v),
        (third, third, 1),
        "a delete forgets the versions"
    );
    // A bulk write is one index for all its keys.
    let bulk = c
        .bulk_set(&[
            ("k".to_owned(), Bytes::from_static(b"3")),
            ("new".to_owned(), Bytes::from_static(b"1")),
        ])
        .await
        .unwrap();
    let k = c.get_versioned("k").await.unwrap().unwrap();
    let new = c.get_versioned("new").await.unwrap().unwrap();
    assert_eq!(versions(&k), (third, bulk.index, 2));
    assert_eq!(versions(&new), (bulk.index, bulk.index, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_paged_across_several_pages_in_order() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let keys: Vec<String> = (0..1000).map(|i| format!("p/{i:04}")).collect();
    let items: Vec<(String, Bytes)> = keys
        .iter()
        .map(|k| (k.clone(), Bytes::from(format!("v{k}"))))
        .collect();
    let bulk = c.bulk_set(&items).await.unwrap();
    let outside = ["o", "p", "p0", "q/1"].map(|k| (k.to_owned(), Bytes::from_static(b"x")));
    c.bulk_set(&outside).await.unwrap();

    let mut pager = c.list("p/").page_size(64).pager();
    let (mut pages, mut seen) = (0, Vec::new());
    while let Some(page) = pager.next_page().await.unwrap() {
        pages += 1;
        assert!(page.items.len() <= 64);
        assert!(
            page.index > bulk.index,
            "read after both bulks: {}",
            page.index
        );
        assert_eq!(
            page.next_page_token.is_some(),
            seen.len() + page.items.len() < 1000
        );
        for item in page.items {
            assert_eq!(
                item.value.as_deref(),
                Some(format!("v{}", item.key).as_bytes())
            );
            assert_eq!(
                (item.create_index, item.mod_index, item.version),
                (bulk.index, bulk.index, 1)
            );
            seen.push(item.key);
        }
    }
    assert_eq!(pages, 16, "1000 keys in pages of 64");
    assert_eq!(seen, keys, "every key once, in byte order");
    assert!(
        pager.next_page().await.unwrap().is_none(),
        "the pager stays at the end"
    );

    // One key at a time, keys only, the node's default page size.
    let mut pager = c.list("p/").keys_only(true).pager();
    let mut one_by_one = Vec::new();
    while let Some(item) = pager.next_item().await.unwrap() {
        assert_eq!(item.value, None);
        one_by_one.push(item.key);
    }
    assert_eq!(one_by_one, keys);

    let span = c.range(KeyRange::between("p/0100", "p/0200")).page_size(30);
    assert_eq!(span.count().await.unwrap(), 100);
    let page = span.page(None).await.unwrap();
    assert_eq!(page.items.len(), 30);
    let token = page.next_page_token.expect("more after 30 of 100");
    let next = span.page(Some(&token)).await.unwrap();
    assert_eq!(
        next.items[0].key, "p/0130",
        "the token continues after the last key"
    );
    assert_eq!(c.list("p/").count().await.unwrap(), 1000);
    assert_eq!(c.range(KeyRange::all()).count().await.unwrap(), 1004);
    let tail = c
        .range(KeyRange::from_key("p/0999"))
        .page(None)
        .await
        .unwrap();
    let tail: Vec<&str> = tail.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(tail, ["p/0999", "p0", "q/1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_write_only_when_their_precondition_holds() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();

    let created = c.put_if("lock", "me", Precondition::Absent).await.unwrap();
    let before = fingerprint(&http, &kvd).await;
    let err = c
        .put_if("lock", "you", Precondition::Absent)
        .await
        .unwrap_err();
    match &err {
        Error::PreconditionFailed {
            current, endpoint, ..
        } => {
            assert_eq!(endpoint, &kvd.url());
            assert!(current.exists);
            assert_eq!(
                (current.create_index, current.mod_index, current.version),
                (created, created, 1)
            );
        }
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
    assert_eq!(
        (err.status(), err.code(), err.is_retryable()),
        (Some(412), "precondition_failed", false)
    );
    assert!(!err.outcome_unknown());
    // Refused, it is still one record (its read takes an index), but no key
    // changed.
    let after = fingerprint(&http, &kvd).await;
    assert_eq!(
        (after.1, &after.2),
        (before.1, &before.2),
        "a failed precondition writes nothing"
    );

    let moved = c
        .put_if("lock", "mine", Precondition::ModIndex(created))
        .await
        .unwrap();
    let stale = c
        .put_if("lock", "again", Precondition::ModIndex(created))
        .await
        .unwrap_err();
    assert!(
        matches!(&stale, Error::PreconditionFailed { current, .. } if current.mod_index == moved),
        "{stale:?}"
    );
    c.put_if("lock", "still mine", Precondition::Exists)
        .await
        .unwrap();
    let absent = c
        .put_if("nobody", "x", Precondition::Exists)
        .await
        .unwrap_err();
    assert!(
        matches!(&absent, Error::PreconditionFailed { current, .. } if !current.exists),
        "{absent:?}"
    );

    let v = c.get_versioned("lock").await.unwrap().unwrap();
    assert!(c
        .delete_if("lock", Precondition::ModIndex(moved))
        .await
        .is_err());
    let deleted = c
        .delete_if("lock", Precondition::ModIndex(v.mod_index))
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(c.get("lock").await.unwrap(), None);
    let before = fingerprint(&http, &kvd).await;
    let err = c.delete_if("lock", Precondition::Absent).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert_eq!(fingerprint(&http, &kvd).await, before, "nothing was sent");
}

/// One compare-and-swap increment of `key`: read, write over what was read,
/// start over when another writer came first.
async fn increment(c: &Client, key: &str) -> u64 {
    let mut conflicts = 0;
    loop {
        let (n, pre) = match c.get_versioned(key).await.unwrap() {
            Some(v) => {
                let n: u64 = std::str::from_utf8(&v.value).unwrap().parse().unwrap();
                (n, Precondition::ModIndex(v.mod_index))
            }
            None => (0, Precondition::Absent),
        };
        match c.put_if(key, (n + 1).to_string(), pre).await {
            Ok(_) => return conflicts,
            Err(Error::PreconditionFailed { current, .. }) => {
                assert!(current.exists, "keys are only ever created here");
                conflicts += 1;
            }
            Err(other) => panic!("increment failed: {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_retry_loop_from_many_tasks_loses_and_doubles_no_increment() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let (tasks, each) = (8, 12);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..each {
                    conflicts += increment(&c, "counter").await;
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for handle in handles {
        conflicts += handle.await.unwrap();
    }
    let v = c.get_versioned("counter").await.unwrap().unwrap();
    assert_eq!(
        v.value,
        Bytes::from((tasks * each).to_string()),
        "{conflicts} conflicts"
    );
    assert_eq!(v.version, tasks * each, "one write per increment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_runs_one_branch_and_its_reads_see_its_writes() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let a = c.set("a", "old").await.unwrap();
    c.set("b", vec![0u8, 0xff]).await.unwrap();
    c.bulk_set(&["t/1", "t/2", "t/3"].map(|k| (k.to_owned(), Bytes::from_static(b"x"))))
        .await
        .unwrap();

    let swap = |expected: u64| {
        Txn::new()
            .compare("a", Target::ModIndex, Cmp::Eq, expected)
            .compare("b", Target::Exists, Cmp::Eq, true)
            .success(TxnOp::put("a", "new"))
            .success(TxnOp::delete_prefix("t/"))
            .success(TxnOp::get("a"))
            .success(TxnOp::get("b"))
            .success(TxnOp::get("t/1"))
            .success(TxnOp::range(KeyRange::prefix("")))
            .failure(TxnOp::get("a"))
    };
    let answer = swap(a).commit(&c).await.unwrap();
    assert!(answer.succeeded);
    let r = &answer.results;
    assert_eq!(
        r[0],
        OpResult::Put {
            mod_index: answer.index
        }
    );
    assert_eq!(r[1], OpResult::DeletePrefix { deleted: 3 });
    let OpResult::Get(Some(got_a)) = &r[2] else {
        panic!("{r:?}")
    };
    assert_eq!(
        got_a.value.as_deref(),
        Some(&b"new"[..]),
        "a read sees the put before it"
    );
    assert_eq!((got_a.mod_index, got_a.version), (answer.index, 2));
    let OpResult::Get(Some(got_b)) = &r[3] else {
        panic!("{r:?}")
    };
    assert_eq!(
        got_b.value.as_deref(),
        Some(&[0u8, 0xff][..]),
        "binary values decode"
    );
    assert_eq!(r[4], OpResult::Get(None), "deleted by the op before");
    let OpResult::Range { items, more } = &r[5] else {
        panic!("{r:?}")
    };
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!((keys, *more), (vec!["a", "b"], false));

    // The same compare again fails: the failure branch runs, nothing changes.
    let before = fingerprint(&http(), &kvd).await;
    let answer = swap(a).commit(&c).await.unwrap();
    assert!(!answer.succeeded);
    let [OpResult::Get(Some(current))] = &answer.results[..] else {
        panic!("{:?}", answer.results)
    };
    assert_eq!(current.value.as_deref(), Some(&b"new"[..]));
    let after = fingerprint(&http(), &kvd).await;
    assert_eq!(
        (after.1, &after.2),
        (before.1, &before.2),
        "the same keys and values"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_removes_exactly_that_prefix_in_one_record() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let keys = ["a", "a/1", "a/2", "a/2/x", "a0", "b/1"];
    c.bulk_set(&keys.map(|k| (k.to_owned(), Bytes::from_static(b"v"))))
        .await
        .unwrap();
    let last = c.status().await.unwrap().last_index().unwrap();
    let outcome = c.delete_prefix("a/").await.unwrap();
    assert_eq!((outcome.deleted, outcome.index), (3, last + 1));
    let mut pager = c.range(KeyRange::all()).pager();
    let mut left = BTreeSet::new();
    while let Some(item) = pager.next_item().await.unwrap() {
        left.insert(item.key);
    }
    assert_eq!(left, BTreeSet::from(["a", "a0", "b/1"].map(String::from)));
    assert_eq!(c.delete_prefix("a/").await.unwrap().deleted, 0);
    let err = c.delete_prefix("").await.unwrap_err();
    assert_eq!(err.code(), "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_node_would_refuse_is_refused_before_sending() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    c.set("k", "v").await.unwrap();
    let http = http();
    let before = fingerprint(&http, &kvd).await;

    let too_many = (0..129).fold(Txn::new(), |t, _| t.success(TxnOp::get("k")));
    let refusals = [
        c.txn(&too_many).await.unwrap_err(),
        c.txn(&Txn::new().compare("k", Target::Version, Cmp::Eq, "one"))
            .await
            .unwrap_err(),
        c.txn(&Txn::new().success(TxnOp::put("", "v")))
            .await
            .unwrap_err(),
        c.list("k").page_size(0).page(None).await.unwrap_err(),
        c.range(KeyRange::between("z", "a"))
            .count()
            .await
            .unwrap_err(),
    ];
    for err in refusals {
        assert_eq!(err.code(), "invalid_request", "{err}");
        assert_eq!(err.endpoint(), None, "no node was involved: {err}");
    }
    assert_eq!(fingerprint(&http, &kvd).await, before);

    // The node's own checks, through the raw body.
    let ops: Vec<_> = (0..129).map(|_| json!({"get": {"key": "k"}})).collect();
    let err = c
        .txn_json(&json!({"success": ops}), false)
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(413), "too_many_ops"));
    let bad = json!({"compare": [{"key": "k", "target": "colour", "op": "==", "value": 1}]});
    let err = c.txn_json(&bad, true).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(400), "invalid_txn"));
    assert!(err.to_string().contains("compare[0]"), "{err}");
    assert_eq!(fingerprint(&http, &kvd).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_conditional_writes_reach_the_primary_and_any_node_continues_a_page() {
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let on = |i: usize| {
        Client::builder()
            .endpoint(urls[i].clone())
            .request_timeout(REQUEST_TIMEOUT)
            .retry_deadline(REQUEST_TIMEOUT)
            .build()
            .unwrap()
    };
    // Sent to a secondary: redirected to the primary, checked and written there.
    let secondary = on(1);
    let created = secondary
        .put_if("c", "1", Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(
        secondary.current_endpoint(),
        urls[0],
        "it followed the primary"
    );
    let err = secondary
        .put_if("c", "2", Precondition::Absent)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PreconditionFailed { .. }), "{err:?}");
    let answer = Txn::new()
        .compare("c", Target::ModIndex, Cmp::Eq, created)
        .success(TxnOp::put("c", "2"))
        .commit(&on(2))
        .await
        .unwrap();
    assert!(answer.succeeded);

    let items: Vec<(String, Bytes)> = (0..50)
        .map(|i| (format!("r/{i:02}"), Bytes::from_static(b"v")))
        .collect();
    on(0).bulk_set(&items).await.unwrap();
    for i in 1..3 {
        let replica = on(i);
        let caught_up = eventually(REQUEST_TIMEOUT, || async {
            replica.list("r/").count().await.is_ok_and(|n| n == 50)
        })
        .await;
        assert!(caught_up, "n{i} holds the bulk");
    }
    // The first page from n0, the rest from n1 and n2 in turn.
    let first = on(0).list("r/").page_size(20).page(None).await.unwrap();
    let mut token = first.next_page_token.clone();
    let mut seen: Vec<String> = first.items.into_iter().map(|i| i.key).collect();
    let mut turn = 1;
    while let Some(t) = token {
        let page = on(turn)
            .list("r/")
            .page_size(20)
            .page(Some(&t))
            .await
            .unwrap();
        seen.extend(page.items.into_iter().map(|i| i.key));
        token = page.next_page_token;
        turn = turn % 2 + 1;
    }
    assert_eq!(seen, items.into_iter().map(|(k, _)| k).collect::<Vec<_>>());
}
