//! `search`: query latency of kvd's full-text (BM25) and similarity
//! (TF-IDF) indexes beside SQLite FTS5 on the same corpus and queries, write
//! throughput with and without `--index`, and the index's memory.
//!
//! - **Corpus**: `--docs` documents (default 100k) of 20-200 words (uniform),
//!   words drawn from a Zipf distribution (s = 1) over a vocabulary of
//!   `--vocab` pseudo-words (default 50k; lowercase ASCII letters, so kvd's
//!   and FTS5's tokenizers split them alike). Seeded: every run has the
//!   same corpus and queries.
//! - **Queries**: 1-, 2- and 3-term queries, `--queries` of each (default
//!   300): a random document's words, leaving out the 50 most common words
//!   of the vocabulary (stop words that real queries rarely hold), so query
//!   terms are as frequent as real content words. Top 10.
//!   kvd's search matches documents holding any query term (ranked by terms
//!   matched, then BM25), so SQLite is asked the same: `"a" OR "b" OR "c"`
//!   with `ORDER BY rank LIMIT 10` (FTS5's BM25). FTS5's default (all terms,
//!   implicit AND) is measured too, as context.
//! - **Similarity**: top 10 by TF-IDF cosine for the 3-term query texts, and
//!   "more like this key" for random keys (a whole 20-200 word document as
//!   the query). SQLite has nothing equivalent.
//! - **Latency**: one query at a time. In-process figures: kvd's index
//!   (the `kvd::index::Index` library that kvd runs) and SQLite (rusqlite on
//!   the system libsqlite3, an in-memory database), each timed per query
//!   around the call that produces the 10 hits. Over HTTP: a kvd `--index`
//!   server, one keep-alive connection, request sent to response read. Each
//!   query set runs once unmeasured first (warm caches), then measured.
//! - **Writes**: durable PUT/s at `--conns` connections (default 64) of
//!   corpus documents to random keys of the corpus (overwrites, so the
//!   index removes and adds), on a fresh copy of a data dir holding the whole
//!   corpus, kvd with and without `--index`, `--rounds` interleaved rounds
//!   (default 3) of `--secs` seconds; medians compared (target: with
//!   >= 70% of without).
//! - **Memory**: resident memory of kvd holding the corpus with and without
//!   `--index` (after start-up, which rebuilds the index), and the index's
//!   own estimate (`/v1/status`).
//!
//! SQLite needs `--features sqlite-bench` (rusqlite linked against the
//! system's libsqlite3; `bash benches/setup.sh` installs `libsqlite3-dev`),
//! so everyday builds need neither. Without the feature the program says so
//! and stops, unless `--no-sqlite`.
//!
//! `cargo build --release && cargo bench --features sqlite-bench --bench search`

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper::Request;
use kvstore_testkit::bench::*;
use kvstore_testkit::Kvd;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "search",
    about = "kvd --index query latency beside SQLite FTS5, write throughput with/without --index, index memory.",
    override_usage = "cargo build --release && cargo bench --features sqlite-bench --bench search -- [FLAGS]",
    args_override_self = true
)]
struct Cli {
    /// documents in the corpus (default 100k; k and M suffixes)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    docs: Option<u64>,
    /// queries of each kind (default 300)
    #[arg(long, value_name = "N")]
    queries: Option<usize>,
    /// distinct words in the vocabulary (default 50000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50_000,
        hide_default_value = true
    )]
    vocab: usize,
    /// interleaved write rounds, with and without --index (default 3)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// seconds per write cell (default 5)
    #[arg(long, value_name = "S")]
    secs: Option<u64>,
    /// connections of the write load (default 64)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_default_value = true
    )]
    conns: usize,
    /// skip SQLite (no `--features sqlite-bench` needed)
    #[arg(long)]
    no_sqlite: bool,
    /// 20k documents, 100 queries, 1 round of 3 s
    #[arg(long)]
    quick: bool,
    /// exit non-zero when a target is missed
    #[arg(long)]
    strict: bool,
    /// where data dirs go (must be a real disk, not tmpfs)
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Appended by `cargo bench` to harness-less targets; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

const MIN_WORDS: usize = 20;
const MAX_WORDS: usize = 200;
const STOP_WORDS: usize = 50;
const TOP: usize = 10;
const SEED: u64 = 0x5eed_0006;

fn main() -> ExitCode {
    exit_code("search", run())
}

// ---------------------------------------------------------------------------
// Corpus and queries

struct Corpus {
    vocab: Vec<String>,
    docs: Vec<String>,
}

fn key_of(i: usize) -> String {
    format!("d{i:07}")
}

/// Word `i` of the vocabulary: `i` in base 60, one consonant-vowel
/// syllable per digit (distinct for distinct `i`, letters only).
fn pseudo_word(mut i: usize) -> String {
    const C: &[u8] = b"bcdfghklmnprstvz";
    const V: &[u8] = b"aeiou";
    let base = 60; // 12 consonants x 5 vowels
    let mut w = String::new();
    loop {
        let d = i % base;
        w.push(C[d / 5] as char);
        w.push(V[d % 5] as char);
        i /= base;
        if i == 0 {
            break;
        }
    }
    w
}

fn make_corpus(n: usize, vocab: usize) -> Corpus {
    let vocab: Vec<String> = (0..vocab).map(pseudo_word).collect();
    // Zipf (s = 1) cumulative weights over ranks.
    let mut cdf = Vec::with_capacity(vocab.len());
    let mut total = 0.0;
    for r in 0..vocab.len() {
        total += 1.0 / (r as f64 + 1.0);
        cdf.push(total);
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    let docs = (0..n)
        .map(|_| {
            let len = rng.gen_range(MIN_WORDS..=MAX_WORDS);
            let mut d = String::with_capacity(len * 7);
            for j in 0..len {
                let x = rng.gen_range(0.0..total);
                let r = cdf.partition_point(|&c| c < x).min(vocab.len() - 1);
                if j > 0 {
                    d.push(' ');
                }
                d.push_str(&vocab[r]);
            }
            d
        })
        .collect();
    Corpus { vocab, docs }
}

/// `count` queries of `terms` distinct words each, from random documents,
/// leaving out the most common words.
fn make_queries(c: &Corpus, terms: usize, count: usize, rng: &mut StdRng) -> Vec<Vec<String>> {
    let stop: std::collections::HashSet<&str> =
        c.vocab[..STOP_WORDS].iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let doc = &c.docs[rng.gen_range(0..c.docs.len())];
        let words: Vec<&str> = doc.split(' ').filter(|w| !stop.contains(w)).collect();
        let mut q: Vec<String> = Vec::new();
        for _ in 0..50 {
            let w = words[rng.gen_range(0..words.len())];
            if !q.iter().any(|x| x == w) {
                q.push(w.to_string());
            }
            if q.len() == terms {
                break;
            }
        }
        if q.len() == terms {
            out.push(q);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Latency figures

fn ns_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

#[derive(Clone)]
struct Lat {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    n: u64,
}

impl Lat {
    fn of(h: &Histogram<u64>) -> Lat {
        Lat {
            p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
            mean_us: h.mean() / 1000.0,
            n: h.len(),
        }
    }

    fn cell(&self) -> String {
        format!("{:.1} / {:.1}", self.p50_us, self.p99_us)
    }

    fn json(&self) -> Value {
        json!({"p50_us": self.p50_us, "p99_us": self.p99_us, "mean_us": self.mean_us, "queries": self.n})
    }
}

/// Runs `f` over `items` once unmeasured, then once timed per call.
fn time_each<T>(items: &[T], mut f: impl FnMut(&T) -> usize) -> (Lat, usize) {
    for it in items {
        std::hint::black_box(f(it));
    }
    let mut h = ns_hist();
    let mut hits = 0;
    for it in items {
        let t = Instant::now();
        hits += f(it);
        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
    }
    (Lat::of(&h), hits)
}

// ---------------------------------------------------------------------------
// SQLite FTS5 (in-process)

#[cfg(feature = "sqlite-bench")]
mod sqlite {
    use super::*;

    pub struct Fts {
        conn: rusqlite::Connection,
    }

    impl Fts {
        /// An in-memory FTS5 table holding the corpus; the time it took.
        pub fn build(c: &Corpus) -> Result<(Fts, Duration)> {
            let t = Instant::now();
            let mut conn = rusqlite::Connection::open_in_memory()?;
            conn.execute_batch("CREATE VIRTUAL TABLE docs USING fts5(key UNINDEXED, body);")?;
            let tx = conn.transaction()?;
            {
                let mut ins = tx.prepare("INSERT INTO docs(key, body) VALUES (?1, ?2)")?;
                for (i, d) in c.docs.iter().enumerate() {
                    ins.execute(rusqlite::params![key_of(i), d])?;
                }
            }
            tx.commit()?;
            // Merge FTS5's segments, as a loaded, settled index would be.
            conn.execute_batch("INSERT INTO docs(docs) VALUES('optimize');")?;
            Ok((Fts { conn }, t.elapsed()))
        }

        pub fn bytes(&self) -> Result<u64> {
            let pages: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let size: u64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok(pages * size)
        }

        pub fn version() -> String {
            rusqlite::version().to_string()
        }

        /// Top hits of `terms` (OR, or FTS5's implicit AND); how many.
        pub fn query(&self, terms: &[String], or: bool) -> usize {
            let quoted: Vec<String> = terms.iter().map(|t| format!("\"{t}\"")).collect();
            let q = quoted.join(if or { " OR " } else { " " });
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT key, bm25(docs) FROM docs WHERE docs MATCH ?1 ORDER BY rank LIMIT 10",
                )
                .expect("the query statement compiles");
            let rows = stmt
                .query_map([q], |r| Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?)))
                .expect("the query runs");
            rows.filter_map(|r| r.ok()).count()
        }
    }
}

// ---------------------------------------------------------------------------
// kvd over HTTP

struct Http {
    rt: tokio::runtime::Runtime,
    conn: Conn,
}

impl Http {
    fn new(port: u16) -> Result<Http> {
        let rt = runtime(0)?;
        let conn = rt.block_on(Conn::http1(SocketAddr::from((Ipv4Addr::LOCALHOST, port))))?;
        Ok(Http { rt, conn })
    }

    /// GET `path`; the number of hits in the answer.
    fn hits(&mut self, path: &str) -> Result<usize> {
        let req = Request::get(path)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))?;
        let (status, body) = self.rt.block_on(self.conn.send(req))?;
        if !status.is_success() {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: Value = serde_json::from_slice(&body)?;
        Ok(v["hits"].as_array().map_or(0, Vec::len))
    }
}

fn search_path(terms: &[String]) -> String {
    format!("/v1/search?q={}&limit={TOP}", terms.join("+"))
}

fn similar_path(terms: &[String]) -> String {
    format!("/v1/similar?q={}&top_k={TOP}", terms.join("+"))
}

fn similar_key_path(i: usize) -> String {
    format!("/v1/similar?key={}&top_k={TOP}", key_of(i))
}

/// Loads the corpus into a kvd without an index, then stops it: the
/// template data dir every later server starts from a copy of.
fn make_template(c: &Corpus, dir: &Path) -> Result<Duration> {
    let t = Instant::now();
    let mut kvd = Kvd::start(dir, &[])?;
    let rt = runtime(0)?;
    rt.block_on(async {
        let mut conn = Conn::http1(SocketAddr::from((Ipv4Addr::LOCALHOST, kvd.port))).await?;
        for (chunk_no, chunk) in c.docs.chunks(2000).enumerate() {
            let items: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(j, d)| json!({"key": key_of(chunk_no * 2000 + j), "value": d}))
                .collect();
            let body = serde_json::to_vec(&json!({ "items": items }))?;
            post_bulk(&mut conn, Bytes::from(body))
                .await
                .context("bulk load")?;
        }
        anyhow::Ok(())
    })?;
    kvd.terminate()?;
    Ok(t.elapsed())
}

/// Starts kvd on a fresh copy of the template; the time to `/health`.
fn start_copy(template: &Path, dir: &Path, args: &[&str]) -> Result<(Kvd, Duration)> {
    copy_dir(template, dir)?;
    let t = Instant::now();
    let kvd = Kvd::start(dir, args)?;
    Ok((kvd, t.elapsed()))
}

/// Resident memory once it stops moving (the allocator settles).
fn settled_rss_kib(pid: u32) -> Result<u64> {
    let mut last = rss_kib(pid)?.0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = rss_kib(pid)?.0;
        if now.abs_diff(last) < 256 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn put_docs_make(c: &Corpus) -> Arc<MakeRequest> {
    let docs: Vec<Bytes> = c.docs.iter().map(|d| Bytes::from(d.clone())).collect();
    let n = docs.len() as u64;
    Arc::new(move |conn, seq| {
        let x = mix64(((conn as u64) << 40) ^ seq);
        Request::put(format!("/v1/kv/{}", key_of((x % n) as usize)))
            .header("host", "127.0.0.1")
            .body(Full::new(docs[((x >> 20) % n) as usize].clone()))
            .expect("a request built from valid parts")
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    if !cli.no_sqlite && !cfg!(feature = "sqlite-bench") {
        bail!(
            "the SQLite FTS5 comparison needs `--features sqlite-bench` (and libsqlite3-dev: \
             bash benches/setup.sh); or pass --no-sqlite"
        );
    }
    let n_docs = cli.docs.unwrap_or(if cli.quick { 20_000 } else { 100_000 }) as usize;
    let n_queries = cli.queries.unwrap_or(if cli.quick { 100 } else { 300 });
    let rounds = cli.rounds.unwrap_or(if cli.quick { 1 } else { 3 }).max(1);
    let secs = cli.secs.unwrap_or(if cli.quick { 3 } else { 5 });
    let RunStart {
        command,
        noisy_start,
        env_start,
        tmp,
    } = start_run("search", cli.tmp_dir.as_deref())?;

    let pb = bar(8, "{bar:30} {pos}/{len} {msg}");
    pb.set_message("corpus");
    let corpus = make_corpus(n_docs, cli.vocab);
    let words: usize = corpus.docs.iter().map(|d| d.split(' ').count()).sum();
    let corpus_bytes: usize = corpus.docs.iter().map(String::len).sum();
    let mut rng = StdRng::seed_from_u64(SEED + 1);
    let q1 = make_queries(&corpus, 1, n_queries, &mut rng);
    let q2 = make_queries(&corpus, 2, n_queries, &mut rng);
    let q3 = make_queries(&corpus, 3, n_queries, &mut rng);
    let like_keys: Vec<usize> = (0..n_queries).map(|_| rng.gen_range(0..n_docs)).collect();
    pb.inc(1);

    // kvd's index, in process.
    pb.set_message("kvd index (in-process)");
    let index = kvd::index::Index::new(false);
    let t = Instant::now();
    for (i, d) in corpus.docs.iter().enumerate() {
        index.put(key_of(i).as_bytes(), d.as_bytes());
    }
    let index_build = t.elapsed();
    let index_stats = index.stats();
    let t = Instant::now();
    let first_similar = index
        .similar_key(&key_of(like_keys[0]), 0, TOP)
        .map_or(0, |p| p.hits.len());
    let first_similar_time = t.elapsed();
    let search = |q: &Vec<String>| {
        index
            .search(&q.join(" "), 0, TOP)
            .map_or(0, |p| p.hits.len())
    };
    let (lib1, _) = time_each(&q1, search);
    let (lib2, _) = time_each(&q2, search);
    let (lib3, hits3) = time_each(&q3, search);
    let (lib_sim_text, _) = time_each(&q3, |q| {
        index
            .similar_text(&q.join(" "), 0, TOP)
            .map_or(0, |p| p.hits.len())
    });
    let (lib_sim_key, _) = time_each(&like_keys, |&i| {
        index
            .similar_key(&key_of(i), 0, TOP)
            .map_or(0, |p| p.hits.len())
    });
    drop(index);
    pb.inc(1);

    // SQLite FTS5, in process.
    pb.set_message("SQLite FTS5 (in-process)");
    #[allow(unused_mut)]
    let mut sqlite_json = json!(null);
    #[allow(unused_mut)]
    let mut sql: Option<[Lat; 6]> = None;
    #[cfg(feature = "sqlite-bench")]
    if !cli.no_sqlite {
        let (fts, build) = sqlite::Fts::build(&corpus)?;
        let (s1, _) = time_each(&q1, |q| fts.query(q, true));
        let (s2, _) = time_each(&q2, |q| fts.query(q, true));
        let (s3, _) = time_each(&q3, |q| fts.query(q, true));
        let (a1, _) = time_each(&q1, |q| fts.query(q, false));
        let (a2, _) = time_each(&q2, |q| fts.query(q, false));
        let (a3, _) = time_each(&q3, |q| fts.query(q, false));
        sqlite_json = json!({
            "version": sqlite::Fts::version(),
            "build_seconds": build.as_secs_f64(),
            "database_bytes": fts.bytes()?,
            "or": {"1": s1.json(), "2": s2.json(), "3": s3.json()},
            "and": {"1": a1.json(), "2": a2.json(), "3": a3.json()},
        });
        sql = Some([s1, s2, s3, a1, a2, a3]);
    }
    pb.inc(1);

    // The template data dir, and kvd over HTTP.
    pb.set_message("template data dir");
    let template = tmp.path().join("template");
    let template_load = make_template(&corpus, &template)?;
    pb.inc(1);
    pb.set_message("kvd over HTTP");
    let (plain, plain_start) = start_copy(&template, &tmp.path().join("plain"), &[])?;
    let plain_rss = settled_rss_kib(plain.pid().context("kvd pid")?)?;
    drop(plain);
    let (indexed, indexed_start) =
        start_copy(&template, &tmp.path().join("indexed"), &["--index"])?;
    let indexed_rss = settled_rss_kib(indexed.pid().context("kvd pid")?)?;
    let status = kvd_status(indexed.port)?;
    let mut http = Http::new(indexed.port)?;
    // Same answers over HTTP as in process (a sanity check of the setup).
    let mut http_hits3 = 0;
    for q in &q3 {
        http_hits3 += http.hits(&search_path(q))?;
    }
    if http_hits3 != hits3 {
        bail!("kvd over HTTP found {http_hits3} hits for the 3-term queries, in process {hits3}");
    }
    let mut http_time = |paths: Vec<String>| -> Result<Lat> {
        let mut err = None;
        let (lat, _) = time_each(&paths, |p| match http.hits(p) {
            Ok(n) => n,
            Err(e) => {
                err.get_or_insert(e);
                0
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(lat),
        }
    };
    let h1 = http_time(q1.iter().map(|q| search_path(q)).collect())?;
    let h2 = http_time(q2.iter().map(|q| search_path(q)).collect())?;
    let h3 = http_time(q3.iter().map(|q| search_path(q)).collect())?;
    let h_sim_text = http_time(q3.iter().map(|q| similar_path(q)).collect())?;
    let h_sim_key = http_time(like_keys.iter().map(|&i| similar_key_path(i)).collect())?;
    drop(http);
    drop(indexed);
    pb.inc(1);

    // Write throughput, interleaved rounds.
    pb.set_message("writes");
    let rt = runtime(2)?;
    let ticker = Ticker::new(pb.clone());
    let make = put_docs_make(&corpus);
    let mut cells: Vec<(bool, LoadResult)> = Vec::new();
    // kvd's CPU time per write (us), by cell: what the index costs, less
    // exposed to the machine's noise than the rate.
    let mut cpu_per_write: Vec<(bool, f64)> = Vec::new();
    for r in 0..rounds {
        for with_index in [false, true] {
            let label = if with_index {
                "with --index"
            } else {
                "without"
            };
            ticker.set(format!("writes round {}/{rounds} {label}", r + 1));
            let dir = tmp.path().join(format!("w{r}-{with_index}"));
            let args: &[&str] = if with_index { &["--index"] } else { &[] };
            let (mut kvd, _) = start_copy(&template, &dir, args)?;
            let spec = LoadSpec {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, kvd.port)),
                proto: Proto::Http1,
                conns: cli.conns,
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(secs),
            };
            let pid = kvd.pid().context("kvd pid")?.to_string();
            let cpu0 = cpu_time(&pid);
            let res = rt.block_on(run_load(&spec, make.clone(), ticker.live.clone()))?;
            let cpu = cpu_time(&pid).saturating_sub(cpu0);
            let sent: u64 = res.sent.iter().sum();
            cpu_per_write.push((with_index, cpu.as_secs_f64() * 1e6 / sent.max(1) as f64));
            if res.errors > 0 {
                bail!(
                    "{} write errors ({label}): {}",
                    res.errors,
                    res.first_error.unwrap_or_default()
                );
            }
            kvd.terminate()?;
            std::fs::remove_dir_all(&dir).ok();
            cells.push((with_index, res));
        }
    }
    drop(ticker);
    pb.inc(3);
    pb.finish_and_clear();
    let noisy_end = warn_if_noisy("end");

    let med = |w: bool, f: &dyn Fn(&LoadResult) -> f64| {
        median(cells.iter().filter(|c| c.0 == w).map(|c| f(&c.1)).collect())
    };
    let put_plain = med(false, &|r| r.ops_per_sec());
    let put_index = med(true, &|r| r.ops_per_sec());
    let write_ratio = put_index / put_plain;
    let cpu_med = |w: bool| {
        median(
            cpu_per_write
                .iter()
                .filter(|c| c.0 == w)
                .map(|c| c.1)
                .collect(),
        )
    };
    let (cpu_plain, cpu_index) = (cpu_med(false), cpu_med(true));

    // Report.
    println!(
        "\ncorpus: {} documents, {} words ({} MiB of text), vocabulary {}, top {TOP}, \
         {n_queries} queries per kind",
        human_count(n_docs as u64),
        words,
        corpus_bytes >> 20,
        cli.vocab
    );
    let mut t = Table::new(&[
        "query (p50 / p99 us)",
        "kvd HTTP",
        "kvd index in-process",
        "SQLite FTS5 OR",
        "SQLite FTS5 AND",
        "kvd in-proc <= SQLite OR p50",
        "kvd HTTP <= SQLite OR p50",
    ]);
    let mut targets_met = true;
    type Row<'a> = (&'a str, &'a Lat, &'a Lat, Option<(&'a Lat, &'a Lat)>);
    let rows: [Row; 5] = [
        ("1 term", &h1, &lib1, sql.as_ref().map(|s| (&s[0], &s[3]))),
        ("2 terms", &h2, &lib2, sql.as_ref().map(|s| (&s[1], &s[4]))),
        ("3 terms", &h3, &lib3, sql.as_ref().map(|s| (&s[2], &s[5]))),
        (
            "similar top-10, 3-term text",
            &h_sim_text,
            &lib_sim_text,
            None,
        ),
        ("similar top-10, by key", &h_sim_key, &lib_sim_key, None),
    ];
    for (name, h, l, s) in rows {
        let (or, and, lib_ok, http_ok) = match s {
            Some((or, and)) => {
                let lib_ok = l.p50_us <= or.p50_us;
                let http_ok = h.p50_us <= or.p50_us;
                targets_met &= lib_ok;
                (
                    or.cell(),
                    and.cell(),
                    pass(lib_ok).to_string(),
                    pass(http_ok).to_string(),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        t.row(vec![
            name.into(),
            h.cell(),
            l.cell(),
            or,
            and,
            lib_ok,
            http_ok,
        ]);
    }
    print!("{}", t.render());

    let mut w = Table::new(&[
        "writes",
        "PUT/s (median)",
        "p50 ms",
        "p99 ms",
        "kvd CPU us/write",
        "rounds",
    ]);
    for (with_index, name) in [(false, "kvd"), (true, "kvd --index")] {
        w.row(vec![
            name.into(),
            fmt_rate(med(with_index, &|r| r.ops_per_sec())),
            format!("{:.2}", med(with_index, &|r| r.p50_us() as f64) / 1000.0),
            format!("{:.2}", med(with_index, &|r| r.p99_us() as f64) / 1000.0),
            format!("{:.1}", cpu_med(with_index)),
            rounds.to_string(),
        ]);
    }
    print!("\n{}", w.render());
    let write_ok = write_ratio >= 0.7;
    targets_met &= write_ok;
    println!(
        "with --index / without = {:.0}% (target 70%): {}",
        write_ratio * 100.0,
        pass(write_ok)
    );

    let est = status["index"]["memory_bytes"].as_u64().unwrap_or(0);
    let mut m = String::new();
    let _ = writeln!(
        m,
        "\nmemory: kvd RSS {} MiB with --index, {} MiB without (index: +{} MiB; its own estimate {} MiB: \
         {} documents, {} terms, {} postings)",
        fmt_mib(indexed_rss),
        fmt_mib(plain_rss),
        fmt_mib(indexed_rss.saturating_sub(plain_rss)),
        fmt_mib(est >> 10),
        index_stats.documents,
        index_stats.terms,
        index_stats.postings,
    );
    let _ = writeln!(
        m,
        "build: in-process index {:.2} s ({:.0} docs/s on one thread); kvd start-up {:.2} s with \
         --index (rebuild), {:.2} s without; first similarity query after a change {:.1} ms \
         (later ones reuse cached norms)",
        index_build.as_secs_f64(),
        n_docs as f64 / index_build.as_secs_f64(),
        indexed_start.as_secs_f64(),
        plain_start.as_secs_f64(),
        first_similar_time.as_secs_f64() * 1000.0,
    );
    if !sqlite_json.is_null() {
        let _ = writeln!(
            m,
            "SQLite {}: FTS5 table built in {:.2} s, {} MiB in memory",
            sqlite_json["version"].as_str().unwrap_or("?"),
            sqlite_json["build_seconds"].as_f64().unwrap_or(0.0),
            sqlite_json["database_bytes"].as_u64().unwrap_or(0) >> 20
        );
    }
    print!("{m}");
    let _ = first_similar;

    let lat = |l: &Lat| l.json();
    let results = json!({
        "bench": "search",
        "command": command,
        "corpus": {
            "documents": n_docs, "words": words, "bytes": corpus_bytes, "vocabulary": cli.vocab,
            "min_words": MIN_WORDS, "max_words": MAX_WORDS, "zipf_s": 1.0, "seed": SEED,
            "queries_per_kind": n_queries, "stop_words_skipped": STOP_WORDS, "top": TOP,
        },
        "kvd_http": {"1": lat(&h1), "2": lat(&h2), "3": lat(&h3),
                     "similar_text": lat(&h_sim_text), "similar_key": lat(&h_sim_key)},
        "kvd_in_process": {"1": lat(&lib1), "2": lat(&lib2), "3": lat(&lib3),
                           "similar_text": lat(&lib_sim_text), "similar_key": lat(&lib_sim_key),
                           "build_seconds": index_build.as_secs_f64(),
                           "first_similar_ms": first_similar_time.as_secs_f64() * 1000.0},
        "sqlite_fts5": sqlite_json,
        "writes": {
            "conns": cli.conns, "seconds": secs, "rounds": rounds,
            "without_index": cells.iter().filter(|c| !c.0).map(|c| c.1.to_json()).collect::<Vec<_>>(),
            "with_index": cells.iter().filter(|c| c.0).map(|c| c.1.to_json()).collect::<Vec<_>>(),
            "median_put_per_sec": {"without_index": put_plain, "with_index": put_index},
            "ratio": write_ratio,
            "kvd_cpu_us_per_write": {"without_index": cpu_plain, "with_index": cpu_index},
        },
        "memory": {
            "kvd_rss_kib_with_index": indexed_rss, "kvd_rss_kib_without_index": plain_rss,
            "index_estimate_bytes": est, "index": status["index"],
        },
        "startup_seconds": {"with_index": indexed_start.as_secs_f64(), "without_index": plain_start.as_secs_f64()},
        "template_load_seconds": template_load.as_secs_f64(),
        "targets_met": targets_met,
        "noisy": noisy_start || noisy_end,
        "environment": {"start": env_start, "end": environment()},
    });
    report_results("search", &results, &command)?;
    Ok(if cli.strict && !targets_met {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
