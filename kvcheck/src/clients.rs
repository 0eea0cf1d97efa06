//! A chaos run's clients and their verdict: 16 clients run puts, deletes,
//! bulks, linearizable reads and compare-and-sets (a linearizable read,
//! then a put conditional on the `mod_index` it read), all through
//! kvclient, each call one attempt recorded in a history; then a final
//! read of every key, the acknowledged writes the final state cannot show,
//! and the history's check (`crate::linearizability`). The faults are the
//! caller's (`kvsup chaos` through the supervisor; the tests their own).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvclient::Bytes;
use rand::{Rng, SeedableRng};

use crate::linearizability::{Kind, Operation};

/// A lock whose holder panicked still guards plain counters: they stay
/// usable (a count may be one short), which beats losing the run.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How one client reaches the cluster: the nodes, and what to send with
/// every request (the CA to trust and a token, on a secured cluster).
#[derive(Clone)]
pub struct Endpoints {
    pub urls: Vec<String>,
    pub tls: Option<kvclient::TlsFiles>,
    pub token: Option<String>,
}

impl Endpoints {
    /// A plain-HTTP cluster without tokens.
    pub fn plain(urls: Vec<String>) -> Endpoints {
        Endpoints {
            urls,
            tls: None,
            token: None,
        }
    }

    /// Whether a client can be made at all (the CA file readable, the
    /// URLs valid): checked once before the clients start, since they
    /// make theirs as they go.
    pub fn validate(&self) -> Result<(), kvclient::Error> {
        self.builder(&self.urls).build().map(|_| ())
    }

    /// A kvclient builder over `urls` with this cluster's TLS and token.
    pub fn builder(&self, urls: &[String]) -> kvclient::ClientBuilder {
        let mut b = kvclient::Client::builder().endpoints(urls.to_vec());
        if let Some(t) = &self.tls {
            b = b.tls(t.clone());
        }
        if let Some(t) = &self.token {
            b = b.token(t.clone());
        }
        b
    }

    /// A client that makes exactly one attempt per call, starting at
    /// endpoint `first`: no retry, so every attempt is one entry of the
    /// history (a redirect to the primary is followed; it is not a retry).
    pub fn single_attempt(&self, first: usize) -> kvclient::Client {
        let mut order = self.urls.clone();
        let n = order.len().max(1);
        order.rotate_left(first % n);
        self.builder(&order)
            .request_timeout(ATTEMPT_TIMEOUT)
            .max_retries(0)
            .build()
            .expect("a configuration that `Endpoints::validate` accepted")
    }
}

/// One attempt's bound: a node that does not answer within it is left
/// for the next one.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the clients do besides reaching the cluster: the key names (a
/// prefix keeps a run on a user's cluster off the user's keys and off
/// other runs') and the seed of their operation mix.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// Prepended to `k0`..`k31`.
    pub key_prefix: String,
    /// Client `i` draws its operations from `seed * CLIENTS + i`.
    pub seed: u64,
}

impl Workload {
    /// Key number `n`.
    pub fn key(&self, n: usize) -> String {
        format!("{}k{n}", self.key_prefix)
    }
}

/// The clients of one run, started by [`Clients::spawn`].
pub struct Clients {
    pub start: Instant,
    pub progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Operation>>>,
}

impl Clients {
    /// Starts [`CLIENTS`] clients against `to`, keys `k0`..`k31`, seed 0.
    pub fn spawn(to: &Endpoints) -> Clients {
        Clients::spawn_with(to, &Workload::default())
    }

    /// Starts [`CLIENTS`] clients against `to` doing `work`.
    pub fn spawn_with(to: &Endpoints, work: &Workload) -> Clients {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let to = Arc::new(to.clone());
        let work = Arc::new(work.clone());
        let workers = (0..CLIENTS)
            .map(|i| {
                let ctx = (to.clone(), work.clone());
                let w = worker(i, ctx, start, stop.clone(), progress.clone());
                tokio::spawn(w)
            })
            .collect();
        Clients {
            start,
            progress,
            stop,
            workers,
        }
    }

    /// Stops the clients; their whole history.
    pub async fn finish(self) -> Vec<Operation> {
        self.stop.store(true, Ordering::Relaxed);
        let mut history = Vec::new();
        for w in self.workers {
            history.extend(w.await.expect("a chaos client panicked"));
        }
        history
    }
}

pub const CLIENTS: usize = 16;
pub const KEYS: usize = 32;
/// How long the cluster may take to be Ready and serving again after a
/// fault: generous, since a debug build on a loaded 2-core machine is slow
/// (a healthy run recovers from each fault in under 2 s).
pub const RECOVERY: Duration = Duration::from_secs(60);
/// Writes, and reads, called after a fault that must succeed before the
/// next fault.
pub const OPS_AFTER_EACH_FAULT: u64 = 10;
/// Whole-run minimums, far below what a healthy run does (tens of
/// thousands of operations, hundreds of unknown outcomes) yet enough to
/// say that each kind of operation was exercised.
pub const MIN_WRITES: u64 = 500;
pub const MIN_READS: u64 = 500;
pub const MIN_DELETES: u64 = 50;
pub const MIN_BULKS: u64 = 50;
pub const MIN_CAS: u64 = 50;
pub const MIN_UNKNOWN: u64 = 5;

pub fn value_id(client: usize, seq: u64) -> u64 {
    (client as u64 + 1) * 1_000_000_000 + seq
}

/// The value id a read saw; 0 (never written: ids start at 1e9) for a
/// value no client of this run wrote, so that the check reports it.
pub fn parse_id(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What the clients got done so far: the run's size, and the monkey's
/// evidence that the cluster serves again after a fault.
#[derive(Default)]
pub struct Progress {
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub bulks: AtomicU64,
    /// Compare-and-sets that wrote (the 412s are in `failures`).
    pub cas: AtomicU64,
    pub reads: AtomicU64,
    /// Writes (of any kind) whose outcome is unknown.
    pub unknown: AtomicU64,
    /// Writes refused with an answer that says nothing was written (left
    /// out of the history: they cannot have happened).
    pub refused: AtomicU64,
    /// Why writes failed, by kvclient error code (refused ones included).
    pub failures: Mutex<BTreeMap<String, u64>>,
    since_fault: Mutex<SinceFault>,
}

/// Successful operations called after `from` (ns since the start): ones
/// already in flight when a fault landed do not count as recovery.
#[derive(Default)]
struct SinceFault {
    from: u64,
    writes: u64,
    reads: u64,
}

impl Progress {
    /// Records a failed write; says whether its outcome is unknown.
    fn failed(&self, e: &kvclient::Error) -> bool {
        let wrote_nothing = e.was_not_applied() || matches!(e, kvclient::Error::Connect { .. });
        self.count_failure(e.code(), wrote_nothing)
    }

    /// Records a failed write by its code; says whether its outcome is
    /// unknown.
    fn count_failure(&self, code: &str, wrote_nothing: bool) -> bool {
        *lock(&self.failures).entry(code.to_string()).or_default() += 1;
        let counter = if wrote_nothing {
            &self.refused
        } else {
            &self.unknown
        };
        counter.fetch_add(1, Ordering::Relaxed);
        !wrote_nothing
    }

    fn succeeded(&self, call: u64, read: bool) {
        let mut s = lock(&self.since_fault);
        if call >= s.from {
            *(if read { &mut s.reads } else { &mut s.writes }) += 1;
        }
    }

    pub fn count_from(&self, from: u64) {
        *lock(&self.since_fault) = SinceFault {
            from,
            ..SinceFault::default()
        };
    }

    /// (writes, reads) since [`Progress::count_from`].
    pub fn since_fault(&self) -> (u64, u64) {
        let s = lock(&self.since_fault);
        (s.writes, s.reads)
    }
}

/// One client operation before it is sent.
enum Planned {
    Put(String),
    Delete(String),
    /// Distinct keys, all set to the same (per key unique) value.
    Bulk(Vec<String>),
    Read(String),
    /// A linearizable read, then a write conditional on its ETag.
    Cas(String),
}

impl Planned {
    /// 30% puts, 10% compare-and-sets, 10% deletes, 10% bulks of 2-4
    /// keys, 40% reads.
    fn random(rng: &mut rand::rngs::StdRng, work: &Workload) -> Planned {
        let key = |rng: &mut rand::rngs::StdRng| work.key(rng.gen_range(0..KEYS));
        match rng.gen_range(0..10) {
            0..=2 => Planned::Put(key(rng)),
            3 => Planned::Cas(key(rng)),
            4 => Planned::Delete(key(rng)),
            5 => {
                let n = rng.gen_range(2..=4);
                let keys = rand::seq::index::sample(rng, KEYS, n);
                Planned::Bulk(keys.iter().map(|k| work.key(k)).collect())
            }
            _ => Planned::Read(key(rng)),
        }
    }
}

/// Sends one planned operation (one attempt) and returns the history
/// entries it adds: one per key written, none for a failed read (it
/// observed nothing) or for a write refused with an answer that says
/// nothing was written. Any other failed write is "outcome unknown"
/// (`ret: None`).
async fn attempt(
    kv: &kvclient::Client,
    planned: Planned,
    value: u64,
    client: usize,
    start: Instant,
    progress: &Progress,
) -> (bool, Vec<Operation>) {
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let call = ns(Instant::now());
    let op = |key: String, kind: Kind, ret: Option<u64>| Operation {
        key,
        kind,
        call,
        ret,
        client,
    };
    // What a write's answer means for the history: `Some(ret)` if it may
    // have happened (`ret` None: outcome unknown), None if it cannot have.
    let outcome = |answer: Result<(), &kvclient::Error>| match answer {
        Ok(()) => Some(Some(ns(Instant::now()))),
        Err(e) => progress.failed(e).then_some(None),
    };
    let (ok, ops, counter) = match planned {
        Planned::Put(key) => {
            let answer = kv.set(&key, value.to_string()).await;
            let ops = outcome(answer.as_ref().map(|_| ()))
                .map(|ret| op(key, Kind::Write(value), ret))
                .into_iter()
                .collect();
            (answer.is_ok(), ops, &progress.puts)
        }
        Planned::Delete(key) => {
            let answer = kv.delete(&key).await;
            let existed = answer.as_ref().ok().map(|a| a.deleted);
            let ops = outcome(answer.as_ref().map(|_| ()))
                .map(|ret| op(key, Kind::Delete { existed }, ret))
                .into_iter()
                .collect();
            (answer.is_ok(), ops, &progress.deletes)
        }
        Planned::Bulk(keys) => {
            let items: Vec<(String, Bytes)> = keys
                .iter()
                .map(|k| (k.clone(), Bytes::from(value.to_string())))
                .collect();
            let answer = kv.bulk_set(&items).await;
            let ops = match outcome(answer.as_ref().map(|_| ())) {
                Some(ret) => keys
                    .into_iter()
                    .map(|k| op(k, Kind::Write(value), ret))
                    .collect(),
                None => Vec::new(),
            };
            (answer.is_ok(), ops, &progress.bulks)
        }
        Planned::Read(key) => match kv.get_consistent(&key).await {
            Ok(v) => {
                let read = Kind::Read(v.map(|b| parse_id(&b)));
                let ops = vec![op(key, read, Some(ns(Instant::now())))];
                (true, ops, &progress.reads)
            }
            Err(_) => return (false, Vec::new()),
        },
        Planned::Cas(_) => unreachable!("compare-and-sets go through attempt_cas"),
    };
    if ok {
        counter.fetch_add(1, Ordering::Relaxed);
        progress.succeeded(call, matches!(ops[0].kind, Kind::Read(_)));
    }
    (ok, ops)
}

/// A compare-and-set of `key` to `value` (one attempt each, following a
/// redirect to the primary): a linearizable read of the value and its
/// `mod_index`, then a put conditional on it (on the key's absence if it
/// was absent). Returns what [`attempt`] does: the read, and the write
/// unless it cannot have happened.
async fn attempt_cas(
    kv: &kvclient::Client,
    key: String,
    value: u64,
    client: usize,
    start: Instant,
    progress: &Progress,
) -> (bool, Vec<Operation>) {
    let ns = || start.elapsed().as_nanos() as u64;
    let op = |kind: Kind, call: u64, ret: Option<u64>| Operation {
        key: key.clone(),
        kind,
        call,
        ret,
        client,
    };
    let call = ns();
    let Ok(read) = kv.get_versioned_consistent(&key).await else {
        return (false, Vec::new());
    };
    let seen = read.as_ref().map(|r| parse_id(&r.value));
    let mut ops = vec![op(Kind::Read(seen), call, Some(ns()))];
    progress.reads.fetch_add(1, Ordering::Relaxed);
    progress.succeeded(call, true);
    let pre = read.map_or(kvclient::Precondition::Absent, |r| {
        kvclient::Precondition::ModIndex(r.mod_index)
    });
    let call = ns();
    let ok = match kv.put_if(&key, value.to_string(), pre).await {
        Ok(_) => Some(true),
        // A 412 from kvclient always means "not written" (it never
        // retries a conditional write whose outcome is unknown).
        Err(kvclient::Error::PreconditionFailed { .. }) => Some(false),
        Err(e) => {
            if !progress.failed(&e) {
                return (false, ops);
            }
            None
        }
    };
    let ret = ok.map(|_| ns());
    if ok == Some(true) {
        progress.cas.fetch_add(1, Ordering::Relaxed);
        progress.succeeded(call, false);
    } else if ok == Some(false) {
        progress.count_failure("precondition_failed", true);
    }
    let kind = Kind::Cas {
        expected: seen,
        new: value,
        ok,
    };
    ops.push(op(kind, call, ret));
    (ok.is_some(), ops)
}

async fn worker(
    id: usize,
    (to, work): (Arc<Endpoints>, Arc<Workload>),
    start: Instant,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Vec<Operation> {
    let seed = work
        .seed
        .wrapping_mul(CLIENTS as u64)
        .wrapping_add(id as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut endpoint = id;
    let mut kv = to.single_attempt(endpoint);
    let mut history = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = value_id(id, seq);
        let (ok, ops) = match Planned::random(&mut rng, &work) {
            Planned::Cas(key) => attempt_cas(&kv, key, value, id, start, &progress).await,
            planned => attempt(&kv, planned, value, id, start, &progress).await,
        };
        history.extend(ops);
        if !ok {
            // Move on to the next node, after a short backoff.
            endpoint += 1;
            kv = to.single_attempt(endpoint);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    history
}

/// A linearizable read of every key of `work` (retrying, since the run is
/// over), recorded in `history`; the values read. `retry` bounds the
/// retries of each key's read.
pub async fn final_reads(
    to: &Endpoints,
    work: &Workload,
    retry: Duration,
    start: Instant,
    history: &mut Vec<Operation>,
) -> Result<HashMap<String, Option<u64>>, kvclient::Error> {
    let kv = to
        .builder(&to.urls)
        .request_timeout(Duration::from_secs(2))
        .retry_deadline(retry)
        .build()?;
    let mut finals = HashMap::new();
    for k in 0..KEYS {
        let key = work.key(k);
        let call = start.elapsed().as_nanos() as u64;
        let v = kv.get_consistent(&key).await?.map(|b| parse_id(&b));
        finals.insert(key.clone(), v);
        history.push(Operation {
            key,
            kind: Kind::Read(v),
            call,
            ret: Some(start.elapsed().as_nanos() as u64),
            client: usize::MAX,
        });
    }
    Ok(finals)
}

/// Acknowledged writes and deletes whose effect the final state cannot
/// show: the key's final value (or absence) comes only from operations
/// that ended before this one began, so none of them can be ordered after
/// it.
pub fn lost_writes(history: &[Operation], finals: &HashMap<String, Option<u64>>) -> Vec<String> {
    let effect = |k: Kind| match k {
        Kind::Write(v)
        | Kind::Cas {
            new: v,
            ok: Some(true) | None,
            ..
        } => Some(Some(v)),
        Kind::Delete { .. } => Some(None),
        Kind::Read(_)
        | Kind::Cas {
            ok: Some(false), ..
        } => None,
    };
    // For each (key, state), the latest return of an operation leaving the
    // key in that state (an unknown outcome has no bound).
    let mut latest: HashMap<(&str, Option<u64>), u64> = HashMap::new();
    for o in history {
        if let Some(state) = effect(o.kind) {
            let l = latest.entry((o.key.as_str(), state)).or_default();
            *l = (*l).max(o.ret.unwrap_or(u64::MAX));
        }
    }
    history
        .iter()
        .filter(|o| o.ret.is_some() && effect(o.kind).is_some())
        .filter(|o| {
            let fin = finals.get(&o.key).copied().flatten();
            latest
                .get(&(o.key.as_str(), fin))
                .is_none_or(|&l| l < o.call)
        })
        .map(|o| {
            let fin = finals.get(&o.key).copied().flatten();
            format!("{}: {:?} (final {fin:?})", o.key, o.kind)
        })
        .collect()
}
