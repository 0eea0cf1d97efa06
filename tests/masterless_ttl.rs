//! Keys that expire in masterless mode (docs/DESIGN.md §2.15, §5.7): keys
//! with TTLs written on each of three nodes (bulks and single PUTs) are
//! never readable after their deadline on any node, disappear from all
//! three, and the digests (content and last-write-wins) agree afterwards.
//! A key rewritten without a TTL on another node before its deadline stays
//! (an `Expire` never removes a newer version); a permanent key rewritten
//! with a TTL goes; `keep_ttl` on another node keeps the deadline it sees.

use std::time::Duration;

use kvstore_testkit::cluster::Cluster;
use kvstore_testkit::masterless::{eventually, get, wait_converged};
use kvstore_testkit::node::{http, try_pipelined_get};
use kvstore_testkit::ttl::{self, now_ms, Expiry};
use rand::{Rng, SeedableRng};

/// A key written with a deadline, and the latest that deadline can be.
struct Expiring {
    key: String,
    node: usize,
    dead_from: u64,
    /// Reads on the writing node answered before this must find it.
    alive_until: u64,
    value: Vec<u8>,
}

const PER_NODE: usize = 300;

/// TTLs of the expiring keys. Long enough that a pass over every key on
/// every node still finds the latest written alive on a loaded machine
/// (the run must check both sides of the deadlines).
const TTL_MS: std::ops::RangeInclusive<u64> = 1500..=4000;

async fn write_expiring(http: &reqwest::Client, urls: &[String]) -> Vec<Expiring> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut out = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        // Most in one bulk, a few as single PUTs.
        let items: Vec<(String, Vec<u8>, Expiry)> = (0..PER_NODE - 10)
            .map(|j| {
                let ttl = rng.gen_range(TTL_MS);
                (
                    format!("mt/n{n}/{j:04}"),
                    format!("b{n}-{j}").into_bytes(),
                    Expiry::Ttl(ttl),
                )
            })
            .collect();
        let t = ttl::timed(ttl::bulk(http, url, &items)).await;
        t.outcome.clone().done("masterless bulk with TTLs");
        for (key, value, e) in items {
            let Expiry::Ttl(ms) = e else { unreachable!() };
            out.push(Expiring {
                key,
                node: n,
                dead_from: t.dead_from(ms),
                alive_until: t.alive_until(ms),
                value,
            });
        }
        for j in PER_NODE - 10..PER_NODE {
            let ms = rng.gen_range(TTL_MS);
            let key = format!("mt/n{n}/{j:04}");
            let value = format!("p{n}-{j}").into_bytes();
            let t = ttl::timed(ttl::put(http, url, &key, &value, Expiry::Ttl(ms))).await;
            t.outcome.clone().done("masterless put with a TTL");
            out.push(Expiring {
                key,
                node: n,
                dead_from: t.dead_from(ms),
                alive_until: t.alive_until(ms),
                value,
            });
        }
    }
    out
}

/// Reads every expiring key on every node until all deadlines passed a
/// second ago; the bad reads.
fn watch_deadlines(ports: &[u16], keys: &[Expiring]) -> (Vec<String>, u64, u64) {
    let paths: Vec<String> = keys.iter().map(|k| format!("/v1/kv/{}", k.key)).collect();
    let last = keys.iter().map(|k| k.dead_from).max().unwrap_or(0);
    let (mut bad, mut dead_checks, mut alive_checks) = (Vec::new(), 0u64, 0u64);
    while now_ms() <= last + 1000 {
        for (n, &port) in ports.iter().enumerate() {
            let t0 = now_ms();
            let answers = try_pipelined_get(port, &paths).expect("pipelined GETs");
            let t1 = now_ms() + 1;
            for (k, (code, body)) in keys.iter().zip(answers) {
                if t0 >= k.dead_from {
                    if code == 200 {
                        bad.push(format!(
                            "n{n}: {} read {} ms after its deadline",
                            k.key,
                            t0 - k.dead_from
                        ));
                    } else {
                        dead_checks += 1;
                    }
                } else if k.node == n && t1 < k.alive_until {
                    if code == 200 && body == k.value {
                        alive_checks += 1;
                    } else {
                        bad.push(format!(
                            "n{n}: {} answered {code} before its deadline",
                            k.key
                        ));
                    }
                }
            }
        }
    }
    (bad, dead_checks, alive_checks)
}

/// Waits until `url` holds `value` under `key`, so that the node's next
/// write of it is stamped after that version.
async fn arrived(http: &reqwest::Client, url: &str, key: &str, value: &[u8]) {
    let ok = eventually(Duration::from_secs(10), || async {
        get(http, url, key).await.as_deref() == Some(value)
    })
    .await;
    assert!(ok, "{key} = {value:?} never reached {url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_keys_written_on_every_node_expire_everywhere_and_the_digests_agree() {
    let c = Cluster::start("masterless", |_| Vec::new());
    let http = http();
    let urls = c.urls();
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.port).collect();
    let base = |n: usize| urls[n].as_str();

    // Rewrites across nodes, before the deadline (stamped after the
    // version with the TTL, so they win):
    for n in 0..3 {
        let other = (n + 1) % 3;
        // TTL on n, then permanent on the next node: stays.
        let over = format!("mt/over/{n}");
        ttl::put(&http, base(n), &over, b"short", Expiry::Ttl(1500))
            .await
            .done("put");
        arrived(&http, base(other), &over, b"short").await;
        ttl::put(&http, base(other), &over, b"forever", Expiry::Never)
            .await
            .done("put");
        // Permanent on n, then a TTL on the next node: goes.
        let late = format!("mt/late/{n}");
        ttl::put(&http, base(n), &late, b"forever", Expiry::Never)
            .await
            .done("put");
        arrived(&http, base(other), &late, b"forever").await;
        ttl::put(&http, base(other), &late, b"short", Expiry::Ttl(1000))
            .await
            .done("put");
    }
    // keep_ttl on another node keeps the deadline that node sees.
    let t = ttl::timed(ttl::put(
        &http,
        base(0),
        "mt/keep",
        b"one",
        Expiry::Ttl(1500),
    ))
    .await;
    t.outcome.clone().done("put");
    let keep_dead_from = t.dead_from(1500);
    arrived(&http, base(1), "mt/keep", b"one").await;
    ttl::put(&http, base(1), "mt/keep", b"two", Expiry::KeepTtl)
        .await
        .done("put keep_ttl");

    let mut keys = write_expiring(&http, &urls).await;
    for n in 0..3 {
        keys.push(Expiring {
            key: format!("mt/late/{n}"),
            node: 99,
            dead_from: now_ms() + 1000,
            alive_until: 0,
            value: Vec::new(),
        });
    }
    keys.push(Expiring {
        key: "mt/keep".into(),
        node: 99,
        dead_from: keep_dead_from,
        alive_until: 0,
        value: Vec::new(),
    });

    let (bad, dead_checks, alive_checks) = tokio::task::spawn_blocking({
        let ports = ports.clone();
        move || watch_deadlines(&ports, &keys)
    })
    .await
    .unwrap();
    eprintln!("{alive_checks} reads before deadlines, {dead_checks} after");
    assert!(
        bad.is_empty(),
        "{} bad reads: {:#?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
    assert!(dead_checks > 0 && alive_checks > 0);

    // Everything past its deadline is removed on every node; the rewrites
    // without a TTL stay; the digests agree.
    let permanent = 3u64;
    let removed = eventually(Duration::from_secs(60), || async {
        ports
            .iter()
            .all(|&p| ttl::status(p).is_ok_and(|s| s["keys"].as_u64() == Some(permanent)))
    })
    .await;
    let counts: Vec<_> = ports
        .iter()
        .map(|&p| ttl::status(p).ok().map(|s| s["keys"].clone()))
        .collect();
    assert!(removed, "keys per node, want {permanent}: {counts:?}");
    for (n, u) in urls.iter().enumerate() {
        for i in 0..3 {
            assert_eq!(
                get(&http, u, &format!("mt/over/{i}")).await.as_deref(),
                Some(&b"forever"[..]),
                "n{n}: a newer write without a TTL was expired"
            );
        }
    }
    assert!(
        wait_converged(&http, &urls, Duration::from_secs(30))
            .await
            .is_some(),
        "the digests differ after the expiries"
    );
    for (n, &p) in ports.iter().enumerate() {
        let expired = ttl::metric(p, "kvd_expired_keys_total");
        assert!(
            expired.is_some_and(|e| e > 0.0),
            "n{n} expired nothing itself: {expired:?}"
        );
    }
}
