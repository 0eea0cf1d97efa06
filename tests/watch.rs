//! Watch (docs/DESIGN.md §2.17, §9.2) against real processes:
//!
//! - 16 writers (PUTs and bulks) on a kvsup-run three-node cluster whose
//!   primary is SIGKILLed every 10 s, and between those the node serving
//!   the watcher; one `kvclient watch w/ --json` over every endpoint,
//!   which resumes by itself. It must see every acknowledged write exactly
//!   once, with its value, in index order (a bulk's keys in key order, as
//!   one record); nothing that was not attempted; no index twice. After
//!   the run every node streams the same events from the same index;
//! - a watch from an index older than the node holds is 410 `compacted`
//!   with `oldest_index` (`--watch-cache-mib 1`), one from there streams,
//!   and `kvclient watch --from-index 1` exits 2;
//! - a consumer that never reads is cut off (`watcher_too_slow`, its
//!   resume index) while writes go on, and the node's resident memory
//!   grows by no more than its watch cache and a margin.
//!
//! `KVSTORE_WATCH_SECS` sets the length of the first (default 60).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvstore_testkit::api::{self, Outcome, Precondition};
use kvstore_testkit::node::{http, start};
use kvstore_testkit::sup::Supervised;
use kvstore_testkit::ttl::{self, Expiry};
use kvstore_testkit::watch::{index, kind, CliWatch, RawWatch};
use kvstore_testkit::{env_u64, run_to_exit};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

const WRITERS: usize = 16;
const BULK_WRITERS: usize = 4;
const BULK_KEYS: usize = 20;
const T: Duration = Duration::from_secs(30);

/// One acknowledged record: its index and the (key, value) it wrote, in
/// key order.
type Acked = Vec<(u64, Vec<(String, String)>)>;

#[derive(Default)]
struct Record {
    acked: Acked,
    /// Every value any attempt sent (acknowledged or not).
    attempted: HashSet<String>,
    failed: u64,
}

/// A writer: PUTs (or bulks of `BULK_KEYS` keys) under `w/{t}/` until
/// `stop`, moving to the next node after a failure.
async fn writer(t: usize, urls: Vec<String>, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let http = api::client(Duration::from_secs(2));
    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
    let mut first = t % urls.len();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let items: Vec<(String, String)> = if t < BULK_WRITERS {
            let mut keys: Vec<usize> =
                rand::seq::index::sample(&mut rng, 200, BULK_KEYS).into_vec();
            keys.sort_unstable();
            keys.iter()
                .map(|k| (format!("w/{t:02}/{k:03}"), format!("{t}-{seq}-{k}")))
                .collect()
        } else {
            let k = rng.gen_range(0..50);
            vec![(format!("w/{t:02}/{k:03}"), format!("{t}-{seq}"))]
        };
        rec.lock()
            .unwrap()
            .attempted
            .extend(items.iter().map(|(_, v)| v.clone()));
        let url = &urls[first];
        let outcome = if items.len() == 1 {
            api::put_if(
                &http,
                url,
                &items[0].0,
                items[0].1.as_bytes(),
                Precondition::None,
            )
            .await
        } else {
            let b: Vec<(String, Vec<u8>, Expiry)> = items
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes(), Expiry::Never))
                .collect();
            ttl::bulk(&http, url, &b).await
        };
        match outcome {
            Outcome::Done(v) => {
                let i = v["index"].as_u64().expect("an index");
                rec.lock().unwrap().acked.push((i, items));
            }
            _ => {
                rec.lock().unwrap().failed += 1;
                first = (first + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The data events (put, delete, expire) of a list of events.
fn data_events(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| matches!(kind(e), "put" | "delete" | "expire"))
        .collect()
}

/// Checks a watcher's events against the acknowledged writes.
fn check_events(events: &[Value], rec: &Record) {
    let unparsed: Vec<&Value> = events.iter().filter(|e| kind(e) == "unparsed").collect();
    assert!(unparsed.is_empty(), "lines that are not JSON: {unparsed:?}");
    let data = data_events(events);
    // Indexes never go back, and within a record keys go up: so no event
    // repeats.
    for w in data.windows(2) {
        let (a, b) = (w[0], w[1]);
        let ordered =
            index(a) < index(b) || (index(a) == index(b) && a["key"].as_str() < b["key"].as_str());
        assert!(ordered, "events out of order or repeated: {a} then {b}");
    }
    let mut progress = 0;
    for e in events.iter().filter(|e| kind(e) == "progress") {
        assert!(index(e) >= progress, "progress went back: {e}");
        progress = index(e);
    }
    // Every event is of something a writer attempted.
    for e in &data {
        assert_eq!(kind(e), "put", "only puts were written: {e}");
        let v = e["value"].as_str().unwrap_or_default();
        assert!(rec.attempted.contains(v), "an event nobody wrote: {e}");
    }
    // Every acknowledged record's events, exactly, in its key order.
    let mut by_index: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    for e in &data {
        by_index.entry(index(e)).or_default().push((
            e["key"].as_str().unwrap_or_default().to_string(),
            e["value"].as_str().unwrap_or_default().to_string(),
        ));
    }
    let mut missing = Vec::new();
    for (i, items) in &rec.acked {
        match by_index.get(i) {
            Some(got) if got == items => {}
            got => missing.push(format!("index {i}: wrote {items:?}, streamed {got:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged records not streamed exactly: {:#?}",
        missing.len(),
        rec.acked.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The node serving the watcher: the one whose `kvd_watchers` is 1.
fn watcher_node(c: &Supervised) -> Option<String> {
    c.nodes
        .iter()
        .find(|(_, p)| ttl::metric(*p, "kvd_watchers").is_some_and(|n| n >= 1.0))
        .map(|(n, _)| n.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resuming_watcher_sees_every_acknowledged_write_once_in_order_through_primary_kills() {
    let secs = env_u64("KVSTORE_WATCH_SECS", 60);
    let tmp = TempDir::new().unwrap();
    // The last check streams the whole run again from every node, so each
    // must still hold all of it: a minute of these writers is some 40 MiB
    // of events, past the default cache, and a snapshot would start a
    // restarted node's cache after it (a 410 there is right, not a fault).
    let held = "  kvdArgs: [\"--watch-cache-mib=1024\", \"--snapshot-every-mib=4096\"]\n";
    let c = Arc::new(Supervised::apply(tmp.path(), 3, held).unwrap());
    let urls = c.urls();
    let http = api::client(Duration::from_secs(10));
    let primary = c.url(&c.primary().expect("a primary"));
    let start_index = api::put_if(&http, &primary, "w/start", b"s", Precondition::None)
        .await
        .index("the first write");
    let from = start_index.to_string();
    let mut watcher = CliWatch::spawn(
        &urls,
        &["w/", "--from-index", &from],
        &tmp.path().join("watch.err"),
    )
    .unwrap();
    let started = watcher.wait_for(T, |ev| ev.iter().any(|e| kind(e) == "put"));
    assert!(
        started,
        "the watcher streamed nothing: {}",
        watcher.stderr()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut first = Record::default();
    first.attempted.insert("s".into());
    first
        .acked
        .push((start_index, vec![("w/start".into(), "s".into())]));
    let rec = Arc::new(Mutex::new(first));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| tokio::spawn(writer(t, urls.clone(), stop.clone(), rec.clone())))
        .collect();
    // The monkey: every 5 s, the primary (at 10 s, 20 s, ...) or the node
    // serving the watcher (at 5 s, 15 s, ...), SIGKILLed through kvsup,
    // which restarts it; the cluster must be Ready again before the next.
    let monkey = {
        let c = c.clone();
        tokio::task::spawn_blocking(move || {
            let begin = Instant::now();
            let mut kills = Vec::new();
            let mut n = 1;
            while begin.elapsed() < Duration::from_secs(secs) {
                let at = Duration::from_secs(5 * n);
                if at >= Duration::from_secs(secs) {
                    break;
                }
                std::thread::sleep(at.saturating_sub(begin.elapsed()));
                let target = if n % 2 == 0 {
                    c.primary()
                } else {
                    watcher_node(&c)
                };
                if let Some(node) = target {
                    let restarts = c.restarts(&node);
                    c.signal(&node, "KILL").unwrap();
                    // Recovered: kvsup restarted it and the cluster is Ready.
                    let back = kvstore_testkit::wait_until(Duration::from_secs(60), || {
                        c.restarts(&node) > restarts
                            && c.status().is_ok_and(|s| s["conditions"]["Ready"] == true)
                    });
                    assert!(back, "no recovery after the kill of {node}");
                    kills.push((n, node));
                }
                n += 1;
            }
            kills
        })
    };
    let kills = monkey.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let rec = Arc::try_unwrap(rec).ok().unwrap().into_inner().unwrap();
    let last = rec.acked.iter().map(|(i, _)| *i).max().unwrap_or(0);
    eprintln!(
        "kills {kills:?}; {} records acknowledged (last index {last}), {} attempts failed",
        rec.acked.len(),
        rec.failed
    );
    assert!(kills.len() >= 2, "too few faults landed: {kills:?}");
    assert!(rec.acked.len() >= 100, "too few writes went through");
    let caught_up = watcher.wait_for(Duration::from_secs(60), |ev| {
        ev.iter().any(|e| kind(e) == "progress" && index(e) >= last)
    });
    assert!(
        caught_up,
        "the watcher did not reach index {last}; it exited {:?}; stderr: {}",
        watcher.try_exit(),
        watcher.stderr()
    );
    assert_eq!(
        watcher.try_exit(),
        None,
        "the watcher gave up: {}",
        watcher.stderr()
    );
    check_events(&watcher.events, &rec);

    // Every node streams the same events from the same index.
    c.wait_converged(Duration::from_secs(60)).unwrap();
    let cli: Vec<&Value> = data_events(&watcher.events)
        .into_iter()
        .filter(|e| index(e) <= last)
        .collect();
    for (name, port) in &c.nodes {
        let q = format!("prefix=w%2F&from_index={start_index}");
        let mut w = RawWatch::open(*port, &q, &[], T).unwrap();
        if w.status != 200 {
            let status = w.status;
            panic!("{name}: {status} {:?}", w.error_body(T).ok());
        }
        let got = w
            .events_until(T, |e| kind(e) == "progress" && index(e) >= last)
            .unwrap();
        let got: Vec<&Value> = data_events(&got)
            .into_iter()
            .filter(|e| index(e) <= last)
            .collect();
        assert_eq!(
            got.len(),
            cli.len(),
            "{name} streams another number of events"
        );
        for (a, b) in got.iter().zip(&cli) {
            assert_eq!(
                (index(a), &a["key"], &a["value"]),
                (index(b), &b["key"], &b["value"]),
                "{name} streams another event"
            );
        }
    }
}

/// Writes `count` values of `size` bytes under `prefix`, over `keys` keys,
/// in bulks of at most 256 KiB.
async fn write_bytes(base: &str, prefix: &str, keys: usize, count: usize, size: usize) {
    let http = api::client(Duration::from_secs(60));
    let value = vec![b'x'; size];
    // Many records: a cache drops whole records, oldest first.
    let per_bulk = (256 << 10) / size.max(1);
    let mut i = 0;
    while i < count {
        let items: Vec<(String, Vec<u8>, Expiry)> = (i..count.min(i + per_bulk.max(1)))
            .map(|j| {
                (
                    format!("{prefix}{:04}", j % keys),
                    value.clone(),
                    Expiry::Never,
                )
            })
            .collect();
        i += items.len();
        ttl::bulk(&http, base, &items).await.done("bulk");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_index_is_410_with_the_oldest_index() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", "1"]);
    // 3 MiB of events through a 1 MiB cache.
    write_bytes(&kvd.url(), "c/", 100, 300, 10 * 1024).await;
    let mut w = RawWatch::open(kvd.port, "from_index=1", &[], T).unwrap();
    assert_eq!(w.status, 410);
    let body = w.error_body(T).unwrap();
    assert_eq!(body["error"]["code"], "compacted", "{body}");
    let oldest = body["oldest_index"].as_u64().unwrap_or(0);
    assert!(oldest > 1, "{body}");
    let last = ttl::status(kvd.port).unwrap()["last_index"]
        .as_u64()
        .unwrap();
    assert!(oldest <= last, "oldest {oldest} past the last index {last}");

    // From the oldest index held, the history streams, in order.
    let q = format!("from_index={oldest}");
    let mut w = RawWatch::open(kvd.port, &q, &[], T).unwrap();
    assert_eq!(w.status, 200);
    let events = w
        .events_until(T, |e| kind(e) == "progress" && index(e) >= last)
        .unwrap();
    let data = data_events(&events);
    assert_eq!(
        data.first().map(|e| index(e)),
        Some(oldest),
        "{:?}",
        data.first()
    );
    assert!(data.windows(2).all(|p| index(p[0]) <= index(p[1])));

    let (st, out) = run_to_exit(
        "kvclient",
        &["--endpoints", &kvd.url(), "watch", "--from-index", "1"],
        T,
    )
    .unwrap();
    assert_eq!(st.code(), Some(2), "{out}");
    assert!(
        out.contains(&oldest.to_string()),
        "the oldest index is not named: {out}"
    );
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_cut_off_and_the_node_memory_stays_bounded() {
    const CACHE_MIB: u64 = 4;
    const VALUE: usize = 256 * 1024;
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--watch-cache-mib", &CACHE_MIB.to_string()]);
    let pid = kvd.pid().unwrap();
    // Warm up: the cache fills, the allocator reaches its working set.
    write_bytes(&kvd.url(), "s/", 8, 80, VALUE).await;
    let before = vm_rss_kib(pid);

    // A watcher that reads its head and then nothing, while 40 MiB of
    // events for it are written.
    let mut stalled = RawWatch::open(kvd.port, "prefix=s%2F", &[], T).unwrap();
    assert_eq!(stalled.status, 200);
    write_bytes(&kvd.url(), "s/", 8, 160, VALUE).await;
    let cut = kvstore_testkit::wait_until(Duration::from_secs(30), || {
        ttl::metric(
            kvd.port,
            "kvd_watchers_cut_total{reason=\"watcher_too_slow\"}",
        ) == Some(1.0)
    });
    let after = vm_rss_kib(pid);
    eprintln!("VmRSS {before} KiB before the stalled watcher, {after} KiB after 40 MiB of events");
    assert!(cut, "the stalled watcher was not cut off");
    let margin_kib = (CACHE_MIB + 24) * 1024;
    assert!(
        after <= before + margin_kib,
        "VmRSS grew by {} KiB with a stalled watcher (allowed {margin_kib})",
        after.saturating_sub(before)
    );

    // Reading again, it finds what the node had written before the cut,
    // then the end. The error event is there if it fitted in the socket's
    // buffers before the node gave up on the connection (a reader that
    // never reads cannot be sent anything more); if there, it is
    // `watcher_too_slow` with the first record not sent, and nothing
    // follows it.
    let mut events = Vec::new();
    let end = loop {
        match stalled.next_event(T) {
            Ok(Some(e)) => events.push(e),
            Ok(None) => break "end of stream".to_string(),
            Err(e) => break format!("{e:#}"),
        }
    };
    eprintln!(
        "the stalled watcher then read {} events, last {:?}, then: {end}",
        events.len(),
        events.last().map(|e| kind(e).to_string())
    );
    assert!(!end.contains("timed out"), "the stream did not end: {end}");
    if let Some(pos) = events.iter().position(|e| kind(e) == "error") {
        let e = &events[pos];
        assert_eq!(e["code"], "watcher_too_slow", "{e}");
        assert!(e["resume_index"].as_u64().is_some_and(|i| i > 0), "{e}");
        assert_eq!(pos, events.len() - 1, "events after the error event");
    }
    assert!(kvstore_testkit::wait_until(Duration::from_secs(10), || {
        ttl::metric(kvd.port, "kvd_watchers") == Some(0.0)
    }));
    // The node still serves.
    let http = http();
    assert!(kvstore_testkit::node::get_raw(&http, &kvd, "s/0000")
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_node_dies_in_the_middle_of_a_record_resumes_without_gap_or_duplicate() {
    // One record far larger than the sockets' buffers, so that the node
    // dies with most of its events unsent; the cache holds it whole.
    const KEYS: usize = 40_000;
    const VALUE: usize = 500;
    let tmp = TempDir::new().unwrap();
    let mut nodes =
        kvstore_testkit::start_cluster(tmp.path(), &["--watch-cache-mib", "256"]).unwrap();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let http = api::client(Duration::from_secs(60));
    let first = api::put_if(&http, &urls[0], "m/0start", b"s", Precondition::None)
        .await
        .index("first write");
    // The watcher starts on a secondary, n1.
    let order = vec![urls[1].clone(), urls[0].clone(), urls[2].clone()];
    let from = first.to_string();
    let mut watcher = CliWatch::spawn(
        &order,
        &["m/", "--from-index", &from],
        &tmp.path().join("w.err"),
    )
    .unwrap();
    assert!(watcher.wait_for(T, |ev| ev.iter().any(|e| kind(e) == "put")));

    let value = "v".repeat(VALUE);
    let items: Vec<(String, Vec<u8>, Expiry)> = (0..KEYS)
        .map(|i| {
            (
                format!("m/{i:06}"),
                value.clone().into_bytes(),
                Expiry::Never,
            )
        })
        .collect();
    let big = ttl::bulk(&http, &urls[0], &items)
        .await
        .index("the big bulk");
    let of_record = |ev: &[Value]| ev.iter().filter(|e| index_of(e) == big).count();
    let started = watcher.wait_for(Duration::from_secs(60), |ev| of_record(ev) >= 100);
    assert!(
        started,
        "the record's events did not come: {}",
        watcher.stderr()
    );
    let seen_at_kill = of_record(&watcher.events);
    nodes[1].kill9().unwrap();
    let done = watcher.wait_for(Duration::from_secs(120), |ev| {
        ev.iter().any(|e| kind(e) == "progress" && index(e) >= big)
    });
    eprintln!("n1 killed after {seen_at_kill} of {KEYS} events of record {big}");
    assert!(
        done,
        "the watcher did not get past the record: {}",
        watcher.stderr()
    );
    let got: Vec<&str> = watcher
        .events
        .iter()
        .filter(|e| index_of(e) == big)
        .map(|e| e["key"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        got.len(),
        KEYS,
        "events of the record: {} (want {KEYS})",
        got.len()
    );
    let want: Vec<&str> = items.iter().map(|(k, _, _)| k.as_str()).collect();
    assert!(
        got == want,
        "the record's events are not its keys once each, in order"
    );
    check_events(
        &watcher.events,
        &Record {
            acked: vec![
                (first, vec![("m/0start".into(), "s".into())]),
                (
                    big,
                    items
                        .iter()
                        .map(|(k, _, _)| (k.clone(), value.clone()))
                        .collect(),
                ),
            ],
            attempted: ["s".to_string(), value.clone()].into_iter().collect(),
            failed: 0,
        },
    );
}

/// A data event's index (0 for progress and errors).
fn index_of(e: &Value) -> u64 {
    if matches!(kind(e), "put" | "delete" | "expire") {
        index(e)
    } else {
        0
    }
}
