//! A range over 1M keys, paged by 1,000 while 16 writers insert and
//! delete other keys that sort between them (docs/DESIGN.md §2.11): every
//! loaded key is seen exactly once, the keys of all pages together are in
//! strictly ascending order, and each page's `index` is at least the one
//! before it. The writers' keys (`k/0000042/w3`) sort right after a loaded
//! key (`k/0000042`) and before the next, so they keep landing inside the
//! page being read and at page boundaries.
//!
//! `KVSTORE_RANGE_KEYS` changes the number of loaded keys (default 1M).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_testkit::api::{self, Precondition, RangeQuery};
use kvstore_testkit::{env_u64, node};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tempfile::TempDir;

const WRITERS: usize = 16;
const PAGE: usize = 1000;
const BULK: u64 = 10_000;
/// Keys each writer keeps at once.
const LIVE_PER_WRITER: usize = 64;

fn key(i: u64) -> String {
    format!("k/{i:07}")
}

/// The index of a loaded key, `None` for a writer's.
fn loaded_index(key: &str) -> Option<u64> {
    let digits = key.strip_prefix("k/")?;
    (digits.len() == 7).then(|| digits.parse().ok())?
}

async fn load(http: &reqwest::Client, url: &str, n: u64) {
    let mut from = 0;
    while from < n {
        let to = (from + BULK).min(n);
        let items: Vec<_> = (from..to)
            .map(|i| json!({"key": key(i), "value": format!("v{i}")}))
            .collect();
        let resp = http
            .post(format!("{url}/v1/bulk"))
            .json(&json!({ "items": items }))
            .send()
            .await
            .unwrap();
        api::outcome(Ok(resp)).await.done("bulk load");
        from = to;
    }
}

/// Puts keys between the loaded ones until `stop`, deleting its oldest
/// once it holds [`LIVE_PER_WRITER`]: the pages keep meeting keys that
/// come and go. Counts its writes in `writes`.
async fn writer(w: usize, url: String, n: u64, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let http = api::client(node::REQUEST_TIMEOUT);
    let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
    let mut live = std::collections::VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let k = format!("{}/w{w}", key(rng.gen_range(0..n)));
        api::put_if(&http, &url, &k, b"w", Precondition::None)
            .await
            .done("writer put");
        live.push_back(k);
        if live.len() > LIVE_PER_WRITER {
            let old = live.pop_front().unwrap_or_default();
            api::delete_if(&http, &url, &old, Precondition::None)
                .await
                .done("writer delete");
            writes.fetch_add(1, Ordering::Relaxed);
        }
        writes.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_over_a_million_keys_sees_each_once_in_order_while_others_change() {
    let n = env_u64("KVSTORE_RANGE_KEYS", 1_000_000);
    let tmp = TempDir::new().unwrap();
    let kvd = node::start(&tmp, &[]);
    let url = kvd.url();
    let http = api::client(node::REQUEST_TIMEOUT);

    let t = Instant::now();
    load(&http, &url, n).await;
    let load_time = t.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, url.clone(), n, stop.clone(), writes.clone())))
        .collect();
    // The writers are under way before the first page.
    let started = Instant::now();
    while writes.load(Ordering::Relaxed) < (WRITERS * LIVE_PER_WRITER) as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writers do not write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let t = Instant::now();
    let writes_before = writes.load(Ordering::Relaxed);
    let q = RangeQuery {
        limit: Some(PAGE),
        ..RangeQuery::prefix("k/")
    };
    let mut seen = vec![false; n as usize];
    let (mut last_key, mut last_index, mut token) = (String::new(), 0, None::<String>);
    let (mut pages, mut writer_keys) = (0u64, 0u64);
    loop {
        let page = api::range_page(&http, &url, &q, token.as_deref())
            .await
            .unwrap();
        pages += 1;
        assert!(
            page.index >= last_index,
            "page {pages} read at {} after a page at {last_index}",
            page.index
        );
        last_index = page.index;
        let more = page.next_page_token.is_some();
        assert!(
            page.items.len() == PAGE || !more,
            "page {pages} has {} items and a token",
            page.items.len()
        );
        for item in page.items {
            assert!(
                item.key > last_key,
                "{:?} after {last_key:?} (page {pages})",
                item.key
            );
            match loaded_index(&item.key) {
                Some(i) => {
                    assert!(!seen[i as usize], "{} seen twice", item.key);
                    seen[i as usize] = true;
                    assert_eq!(
                        item.value,
                        Some(format!("v{i}").into_bytes()),
                        "{}",
                        item.key
                    );
                }
                None => writer_keys += 1,
            }
            last_key = item.key;
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let page_time = t.elapsed();
    let writes_during = writes.load(Ordering::Relaxed) - writes_before;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let missing: Vec<String> = (0..n)
        .filter(|&i| !seen[i as usize])
        .map(key)
        .take(10)
        .collect();
    eprintln!(
        "ranges_big: loaded {n} keys in {load_time:?}; paged them in {page_time:?} \
         ({pages} pages, {:.0} keys/s) while the writers made {writes_during} writes; \
         {writer_keys} writers' keys seen; {} missing",
        n as f64 / page_time.as_secs_f64(),
        seen.iter().filter(|s| !**s).count(),
    );
    assert!(missing.is_empty(), "loaded keys never seen: {missing:?}...");
    assert!(pages >= n / PAGE as u64, "{pages} pages for {n} keys");
    // Writes landed throughout the paging, not only before or after it.
    assert!(
        writes_during >= pages,
        "only {writes_during} writes during {pages} pages"
    );
}
