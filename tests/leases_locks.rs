//! Leases and locks (docs/DESIGN.md §2.16, §9.1, §9.2) against real nodes:
//!
//! - revoking a lease deletes all of its keys at once: readers on every
//!   node of a cluster, one range read at a time, see all of them or none;
//! - a lease that is not kept alive expires with its keys on every node,
//!   and a keep-alive after that is 404;
//! - `kvclient lock NAME --ttl-ms 1500 -- CMD`, two contenders at a time,
//!   200 rounds, the holder (kvclient and CMD) SIGKILLed, or only its
//!   kvclient SIGKILLed (CMD lives on with a stale token), or both
//!   SIGSTOPped and continued once the next holder holds. CMD does fenced
//!   writes (a transaction that puts the resource only if the lock key's
//!   `mod_index` is its token). The accepted writes, in index order, have
//!   tokens that never go back and each is its holder's; every holder's
//!   first write is accepted; the stale holders' writes are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvstore_testkit::api::{self, RangeQuery};
use kvstore_testkit::node::start;
use kvstore_testkit::ttl::{self, now_ms, Expiry};
use kvstore_testkit::{bin, env_u64, is_stopped, start_cluster, wait_until, Sig};
use serde_json::Value;
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_deletes_all_of_a_leases_keys_at_once_on_every_node() {
    const KEYS: usize = 200;
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let http = api::client(Duration::from_secs(10));
    for round in 0..5 {
        let prefix = format!("rv/{round}/");
        let lease = ttl::lease_grant(&http, &urls[0], 600_000).await.unwrap();
        let items: Vec<(String, Vec<u8>, Expiry)> = (0..KEYS)
            .map(|i| {
                (
                    format!("{prefix}{i:03}"),
                    b"v".to_vec(),
                    Expiry::Lease(lease),
                )
            })
            .collect();
        ttl::bulk(&http, &urls[0], &items)
            .await
            .done("bulk on a lease");
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = urls
            .iter()
            .map(|u| {
                let (http, u, stop, prefix) =
                    (http.clone(), u.clone(), stop.clone(), prefix.clone());
                tokio::spawn(async move {
                    let q = RangeQuery {
                        limit: Some(1000),
                        ..RangeQuery::prefix(&prefix)
                    };
                    let mut counts = Vec::new();
                    // Until stopped, and then until the revoke shows here.
                    loop {
                        let page = api::range_page(&http, &u, &q, None).await.unwrap();
                        let n = page.items.len();
                        if counts.last() != Some(&n) {
                            counts.push(n);
                        }
                        if stop.load(Ordering::Relaxed) && n == 0 {
                            return counts;
                        }
                    }
                })
            })
            .collect();
        // Let the readers see the keys on the primary first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (code, body) = ttl::lease_revoke(&http, &urls[0], lease).await.unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["deleted"], KEYS, "{body}");
        stop.store(true, Ordering::Relaxed);
        for (i, r) in readers.into_iter().enumerate() {
            let counts = tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .unwrap_or_else(|_| panic!("n{i} never showed the revoke"))
                .unwrap();
            assert!(
                counts.iter().all(|&c| c == 0 || c == KEYS),
                "round {round}, n{i} saw part of the lease's keys: {counts:?}"
            );
            if i == 0 {
                assert_eq!(counts, vec![KEYS, 0], "round {round} on the primary");
            }
        }
        let (code, _) = ttl::lease_info(&http, &urls[0], lease).await.unwrap();
        assert_eq!(code, 404, "a revoked lease is gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_kept_alive_expires_with_its_keys_on_every_node() {
    const TTL: u64 = 1500;
    let tmp = TempDir::new().unwrap();
    let nodes = start_cluster(tmp.path(), &[]).unwrap();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let http = api::client(Duration::from_secs(10));
    let grant = ttl::timed(async {
        let id = ttl::lease_grant(&http, &urls[0], TTL).await.unwrap();
        api::Outcome::Done(serde_json::json!({ "id": id }))
    })
    .await;
    let lease = grant.outcome.clone().done("grant")["id"].as_u64().unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("lk/{i:02}")).collect();
    for k in &keys {
        ttl::put(&http, &urls[0], k, b"v", Expiry::Lease(lease))
            .await
            .done("put on a lease");
    }
    let resp = http
        .get(api::key_url(&urls[0], &keys[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-kv-lease")
            .and_then(|v| v.to_str().ok()),
        Some(lease.to_string().as_str())
    );
    let left: u64 = resp.headers()["x-kv-ttl-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=TTL).contains(&left), "X-KV-TTL-Ms {left}");
    let (code, info) = ttl::lease_info(&http, &urls[0], lease).await.unwrap();
    assert_eq!(code, 200, "{info}");
    assert_eq!(
        info["keys"].as_array().map(Vec::len),
        Some(keys.len()),
        "{info}"
    );

    // Kept alive past the grant's deadline, the keys live on.
    let mut last_keepalive = grant.clone();
    while now_ms() < grant.dead_from(TTL) + 500 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        last_keepalive = ttl::timed(async {
            let (code, body) = ttl::lease_keepalive(&http, &urls[0], lease).await.unwrap();
            assert_eq!(code, 200, "keep-alive: {body}");
            api::Outcome::Done(body)
        })
        .await;
    }
    let paths: Vec<String> = keys.iter().map(|k| format!("/v1/kv/{k}")).collect();
    let t1 = now_ms() + 100;
    let got = kvstore_testkit::node::try_pipelined_get(nodes[0].port, &paths).unwrap();
    if t1 < last_keepalive.alive_until(TTL) {
        assert!(
            got.iter().all(|(c, _)| *c == 200),
            "kept alive but gone: {got:?}"
        );
    }

    // Then left alone, it expires with its keys everywhere.
    let dead_from = last_keepalive.dead_from(TTL);
    assert!(wait_until(Duration::from_secs(30), || now_ms() >= dead_from));
    for (i, n) in nodes.iter().enumerate() {
        let got = kvstore_testkit::node::try_pipelined_get(n.port, &paths).unwrap();
        assert!(
            got.iter().all(|(c, _)| *c == 404),
            "n{i} reads a key of an expired lease: {got:?}"
        );
    }
    let (code, body) = ttl::lease_keepalive(&http, &urls[0], lease).await.unwrap();
    assert_eq!(code, 404, "a keep-alive after the deadline: {body}");
    assert_eq!(body["error"]["code"], "lease_not_found");
    let gone = wait_until(Duration::from_secs(30), || {
        nodes.iter().all(|n| {
            ttl::status(n.port).is_ok_and(|s| s["keys"] == 0)
                && ttl::metric(n.port, "kvd_leases") == Some(0.0)
        })
    });
    assert!(
        gone,
        "the lease and its keys were not removed on every node"
    );
    for u in &urls {
        let (code, _) = ttl::lease_info(&http, u, lease).await.unwrap();
        assert_eq!(code, 404, "{u} still shows the lease");
    }
}

/// CMD of a contender: one fenced write, then it says it holds (the
/// token in `ID.ready`) and waits for `ID.go`, then two more fenced
/// writes. Each write's answer goes on a line of `writes`:
/// `ID TOKEN SEQ ANSWER-JSON`.
const SCRIPT: &str = r#"
echo $$ > "$DIR/$ID.cmdpid"
w() {
  body='{"compare":[{"key":"'"$KV_LOCK_KEY"'","target":"mod_index","op":"==","value":'"$KV_LOCK_TOKEN"'}],"success":[{"put":{"key":"res","value":"'"$KV_LOCK_TOKEN-$ID-$1"'"}},{"get":{"key":"'"$KV_LOCK_KEY"'"}}]}'
  out=$(printf '%s' "$body" | "$KVC" --endpoints "$EP" --timeout-ms 10000 --json txn - | tr -d '\n')
  printf '%s %s %s %s\n' "$ID" "$KV_LOCK_TOKEN" "$1" "$out" >> "$DIR/writes"
}
w 1
echo "$KV_LOCK_TOKEN" > "$DIR/$ID.ready"
while [ ! -e "$DIR/$ID.go" ]; do sleep 0.01; done
w 2
w 3
"#;

/// What is done to a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// None: it is let go and releases the lock.
    Release,
    /// SIGKILL of kvclient and CMD.
    KillBoth,
    /// SIGKILL of kvclient; CMD goes on with its token once the next
    /// holder holds.
    KillClient,
    /// SIGSTOP of both, SIGCONT once the next holder holds.
    Stop,
}

const FAULTS: [Fault; 4] = [
    Fault::Release,
    Fault::KillBoth,
    Fault::KillClient,
    Fault::Stop,
];

/// One `kvclient lock` process and its CMD.
struct Contender {
    id: String,
    child: Child,
    dir: PathBuf,
}

impl Contender {
    fn spawn(dir: &Path, id: String, endpoint: &str) -> Contender {
        let out = std::fs::File::create(dir.join(format!("{id}.out"))).unwrap();
        let child = Command::new(bin("kvclient"))
            .env_remove("KV_ENDPOINTS")
            .env("DIR", dir)
            .env("ID", &id)
            .env("KVC", bin("kvclient"))
            .env("EP", endpoint)
            .args(["--endpoints", endpoint, "--timeout-ms", "30000"])
            // A lease that a keep-alive can miss by a second: on a loaded
            // machine (two cores, the whole suite running) a 500 ms one
            // was lost by a live holder, which is safe but ended a round
            // with nobody holding.
            .args(["lock", "lk", "--ttl-ms", "1500", "--wait-ms", "60000", "--"])
            .args(["sh", "-c", SCRIPT])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning kvclient lock");
        Contender {
            id,
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}.{suffix}", self.id))
    }

    /// Its token once it holds the lock and did its first write.
    fn ready(&self) -> Option<u64> {
        std::fs::read_to_string(self.file("ready"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn cmd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.file("cmdpid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn go(&self) {
        std::fs::write(self.file("go"), b"").unwrap();
    }

    fn signal_cmd(&self, sig: Sig) {
        if let Some(pid) = self.cmd_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    fn signal_client(&self, sig: Sig) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.file("out")).unwrap_or_default()
    }

    /// Waits for kvclient to exit; its exit code.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut code = None;
        let ok = wait_until(timeout, || match self.child.try_wait() {
            Ok(Some(st)) => {
                code = Some(st.code().unwrap_or(-1));
                true
            }
            _ => false,
        });
        assert!(ok, "{} did not exit: {}", self.id, self.output());
        code
    }
}

/// Every process of the test, killed if it panics half-way.
#[derive(Default)]
struct Reaper(Vec<Contender>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            c.signal_cmd(Sig::SIGKILL);
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// One line of `writes`.
#[derive(Debug)]
struct Write {
    id: String,
    token: u64,
    seq: u64,
    /// `Some(index)` when the transaction's compare held.
    accepted: Option<u64>,
    /// What the transaction read of the lock key (its `mod_index`).
    lock_mod_index: Option<u64>,
}

fn parse_writes(text: &str) -> Vec<Write> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let id = parts.next()?.to_string();
            let token = parts.next()?.parse().ok()?;
            let seq = parts.next()?.parse().ok()?;
            let answer: Value =
                serde_json::from_str(parts.next().unwrap_or("")).unwrap_or_default();
            let accepted = (answer["succeeded"] == true)
                .then(|| answer["index"].as_u64())
                .flatten();
            let lock_mod_index = answer["results"][1]["get"]["mod_index"].as_u64();
            Some(Write {
                id,
                token,
                seq,
                accepted,
                lock_mod_index,
            })
        })
        .collect()
}

/// Checks the fenced writes; (accepted, refused).
fn check_writes(writes: &[Write], holders: &BTreeMap<u64, String>) -> (usize, usize) {
    let mut accepted: Vec<&Write> = writes.iter().filter(|w| w.accepted.is_some()).collect();
    accepted.sort_by_key(|w| w.accepted);
    for w in &accepted {
        assert_eq!(
            w.lock_mod_index,
            Some(w.token),
            "an accepted write's token is not the lock key's mod_index: {w:?}"
        );
        assert_eq!(
            holders.get(&w.token),
            Some(&w.id),
            "an accepted write by a contender that never held its token: {w:?}"
        );
    }
    for pair in accepted.windows(2) {
        assert!(
            pair[0].token <= pair[1].token,
            "two holders' writes interleave: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    for (token, id) in holders {
        assert!(
            accepted
                .iter()
                .any(|w| w.token == *token && w.seq == 1 && &w.id == id),
            "holder {id} (token {token}) had its first write refused"
        );
    }
    (accepted.len(), writes.len() - accepted.len())
}

#[test]
fn two_lock_contenders_under_kills_and_stops_never_both_hold() {
    let rounds = env_u64("KVSTORE_LOCK_ROUNDS", 200) as usize;
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let dir = tmp.path().join("lock");
    std::fs::create_dir_all(&dir).unwrap();
    let url = kvd.url();
    let mut procs = Reaper::default();
    let mut live: Vec<usize> = Vec::new();
    let mut pending: Vec<(usize, Fault)> = Vec::new();
    let mut holders: BTreeMap<u64, String> = BTreeMap::new();
    let mut exits: BTreeMap<String, Vec<Option<i32>>> = BTreeMap::new();
    let mut next_id = 0;
    for round in 0..rounds {
        while live.len() < 2 {
            procs
                .0
                .push(Contender::spawn(&dir, format!("c{next_id}"), &url));
            next_id += 1;
            live.push(procs.0.len() - 1);
        }
        let mut holder = None;
        let held = wait_until(Duration::from_secs(60), || {
            holder = live.iter().copied().find(|&i| procs.0[i].ready().is_some());
            holder.is_some()
        });
        assert!(
            held,
            "round {round}: nobody took the lock; {}",
            live.iter()
                .map(|&i| procs.0[i].output())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let h = holder.unwrap();
        let token = procs.0[h].ready().unwrap();
        if let Some((&last, _)) = holders.last_key_value() {
            assert!(token > last, "round {round}: token {token} after {last}");
        }
        holders.insert(token, procs.0[h].id.clone());
        // The previous victims act with their stale tokens now, while
        // this holder holds.
        for (v, fault) in pending.drain(..) {
            if fault == Fault::Stop {
                procs.0[v].signal_client(Sig::SIGCONT);
                procs.0[v].signal_cmd(Sig::SIGCONT);
            }
            procs.0[v].go();
        }
        let fault = FAULTS[round % FAULTS.len()];
        let c = &mut procs.0[h];
        match fault {
            Fault::Release => {
                c.go();
                let code = c.wait(Duration::from_secs(30));
                assert_eq!(code, Some(0), "a released holder: {}", c.output());
            }
            Fault::KillBoth => {
                c.signal_client(Sig::SIGKILL);
                c.signal_cmd(Sig::SIGKILL);
                c.wait(Duration::from_secs(30));
            }
            Fault::KillClient => {
                c.signal_client(Sig::SIGKILL);
                c.wait(Duration::from_secs(30));
                pending.push((h, fault));
            }
            Fault::Stop => {
                c.signal_client(Sig::SIGSTOP);
                c.signal_cmd(Sig::SIGSTOP);
                let pid = c.child.id();
                assert!(
                    wait_until(Duration::from_secs(10), || is_stopped(pid)),
                    "SIGSTOP did not land"
                );
                pending.push((h, fault));
            }
        }
        live.retain(|&i| i != h);
    }
    // The last victims act, and everybody ends.
    for (v, fault) in pending.drain(..) {
        if fault == Fault::Stop {
            procs.0[v].signal_client(Sig::SIGCONT);
            procs.0[v].signal_cmd(Sig::SIGCONT);
        }
        procs.0[v].go();
    }
    for &i in &live {
        procs.0[i].go();
    }
    for c in &mut procs.0 {
        let code = match c.child.try_wait() {
            Ok(Some(st)) => st.code(),
            _ => c.wait(Duration::from_secs(60)),
        };
        exits.entry(format!("{code:?}")).or_default().push(code);
    }
    // Orphaned CMDs (their kvclient was killed) end by themselves.
    let orphans_done = wait_until(Duration::from_secs(60), || {
        procs.0.iter().all(|c| {
            c.cmd_pid()
                .is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists() || is_zombie(p))
        })
    });
    assert!(orphans_done, "some CMDs never finished");

    // The contenders still waiting at the end took the lock in turn when
    // let go: holders too.
    let rounds_held = holders.len();
    for c in &procs.0 {
        if let Some(token) = c.ready() {
            holders.entry(token).or_insert_with(|| c.id.clone());
        }
    }
    let text = std::fs::read_to_string(dir.join("writes")).unwrap();
    let writes = parse_writes(&text);
    let (accepted, refused) = check_writes(&writes, &holders);
    let counts: BTreeMap<_, _> = exits.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    eprintln!(
        "{rounds} rounds, {} holders in all, {accepted} fenced writes accepted, {refused} refused; \
         kvclient exits: {counts:?}",
        holders.len()
    );
    assert_eq!(rounds_held, rounds);
    // Every orphaned CMD wrote twice with its stale token after the next
    // holder took the lock: refused.
    let orphans = (0..rounds)
        .filter(|r| FAULTS[r % FAULTS.len()] == Fault::KillClient)
        .count();
    assert!(
        refused >= orphans,
        "{refused} refused writes, fewer than the {orphans} orphans' stale ones"
    );
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
