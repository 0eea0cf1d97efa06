//! On random corpora built by random puts,
//! overwrites, deletes, bulks and snapshot installs (through
//! `State::apply` and `State::replace_with`, the hooks kvd uses), BM25
//! scores and rankings and TF-IDF similarity top-k equal a brute-force
//! computation written here from the formulas in ARCHITECTURE.md, within
//! 1e-9 relative.
//!
//! The brute force shares only the analyzer (text → terms) with the index;
//! the analyzer has its own tests in `kvd/src/index/text.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use kvd::index::text::Analyzer;
use kvd::index::{Hit, Index, Page};
use kvd::model::Expiry;
use kvd::storage::{Op, State};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const KEYS: usize = 24;
const WORDS: [&str; 14] = [
    "alpha", "beta", "gamma", "delta", "Alpha", "fox", "dog", "cat", "red", "blue", "x1", "it's",
    "3.14", "zeta",
];
const TOL: f64 = 1e-9;

fn key(i: usize) -> String {
    format!("k{i:02}")
}

fn text() -> impl Strategy<Value = String> {
    vec(prop::sample::select(&WORDS[..]), 0..12).prop_map(|w| w.join(" "))
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => text().prop_map(String::into_bytes),
        // JSON: only string leaves count.
        1 => (text(), text()).prop_map(|(a, b)| {
            serde_json::json!({"title": a, "n": 7, "tags": [b, true]})
                .to_string()
                .into_bytes()
        }),
        // No text at all.
        1 => vec(128u8..=255, 0..6),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Put(usize, Vec<u8>),
    Delete(usize),
    Bulk(BTreeMap<usize, Vec<u8>>),
    /// Install a snapshot of the current contents (rebuilds the index).
    Install,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..KEYS, value()).prop_map(|(k, v)| Step::Put(k, v)),
        3 => (0..KEYS).prop_map(Step::Delete),
        2 => btree_map(0..KEYS, value(), 1..6).prop_map(Step::Bulk),
        1 => Just(Step::Install),
    ]
}

fn query() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            6 => prop::sample::select(&WORDS[..]).prop_map(str::to_string),
            1 => Just("unknownword".to_string()),
        ],
        1..5,
    )
    .prop_map(|w| w.join(" "))
}

fn b(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

/// The corpus as the brute force sees it: each document's tokens.
struct Corpus {
    docs: BTreeMap<String, Vec<String>>,
    /// Documents holding each term.
    df: HashMap<String, f64>,
}

impl Corpus {
    fn new(model: &BTreeMap<String, Vec<u8>>, an: &Analyzer) -> Corpus {
        let mut docs = BTreeMap::new();
        for (k, v) in model {
            let mut toks = Vec::new();
            an.value_terms(v, &mut |t| toks.push(t.to_string()));
            if !toks.is_empty() {
                docs.insert(k.clone(), toks);
            }
        }
        let mut df = HashMap::new();
        for toks in docs.values() {
            for t in toks.iter().collect::<BTreeSet<_>>() {
                *df.entry(t.clone()).or_insert(0.0) += 1.0;
            }
        }
        Corpus { docs, df }
    }

    fn n(&self) -> f64 {
        self.docs.len() as f64
    }

    fn df(&self, t: &str) -> f64 {
        self.df.get(t).copied().unwrap_or(0.0)
    }

    fn tf(doc: &[String], t: &str) -> f64 {
        doc.iter().filter(|x| *x == t).count() as f64
    }

    /// (matched distinct query terms, BM25 score) of every document that
    /// holds a query term.
    fn bm25(&self, q: &[String]) -> Vec<(String, u32, f64)> {
        let terms: BTreeSet<&String> = q.iter().collect();
        let n = self.n();
        let avgdl = self.docs.values().map(|d| d.len() as f64).sum::<f64>() / n;
        let (k1, b) = (1.2, 0.75);
        let mut out = Vec::new();
        for (k, d) in &self.docs {
            let mut score = 0.0;
            let mut matched = 0;
            for t in &terms {
                let f = Self::tf(d, t);
                if f == 0.0 {
                    continue;
                }
                let nt = self.df(t);
                let idf = (1.0 + (n - nt + 0.5) / (nt + 0.5)).ln();
                score += idf * f * (k1 + 1.0) / (f + k1 * (1.0 - b + b * d.len() as f64 / avgdl));
                matched += 1;
            }
            if matched > 0 {
                out.push((k.clone(), matched, score));
            }
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
        out
    }

    fn weights(&self, toks: &[String]) -> HashMap<String, f64> {
        let n = self.n();
        let mut w = HashMap::new();
        for t in toks {
            *w.entry(t.clone()).or_insert(0.0) += 1.0;
        }
        for (t, x) in w.iter_mut() {
            *x *= ((1.0 + n) / (1.0 + self.df(t))).ln() + 1.0;
        }
        w
    }

    /// Cosine similarity of every document sharing a term with `q`.
    fn cosine(&self, q: &[String], exclude: Option<&str>) -> Vec<(String, u32, f64)> {
        let wq = self.weights(q);
        let nq = wq.values().map(|x| x * x).sum::<f64>().sqrt();
        let mut out = Vec::new();
        for (k, d) in &self.docs {
            if Some(k.as_str()) == exclude {
                continue;
            }
            let wd = self.weights(d);
            let dot: f64 = wq
                .iter()
                .filter_map(|(t, x)| wd.get(t).map(|y| x * y))
                .sum();
            if dot > 0.0 {
                let nd = wd.values().map(|x| x * x).sum::<f64>().sqrt();
                out.push((k.clone(), 0, (dot / (nq * nd)).min(1.0)));
            }
        }
        out.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        out
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// `got` is `want[offset..offset+limit]`: same scores within TOL, same
/// keys except where the brute force itself has a near-tie (scores within
/// TOL) that rounding may order either way.
fn check_page(
    what: &str,
    got: &Page,
    want: &[(String, u32, f64)],
    offset: usize,
    limit: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.total, want.len(), "{}: total", what);
    let expect: Vec<_> = want.iter().skip(offset).take(limit).collect();
    prop_assert_eq!(
        got.hits.len(),
        expect.len(),
        "{}: {:?} vs {:?}",
        what,
        got,
        expect
    );
    let by_key: HashMap<&str, (u32, f64)> = want
        .iter()
        .map(|(k, m, s)| (k.as_str(), (*m, *s)))
        .collect();
    for (i, (Hit { key, score }, (wk, wm, ws))) in got.hits.iter().zip(&expect).enumerate() {
        let Some(&(m, s)) = by_key.get(key.as_str()) else {
            return Err(TestCaseError::fail(format!(
                "{what}: {key} should not match"
            )));
        };
        prop_assert!(
            close(*score, s),
            "{}: {} scored {} vs brute {}",
            what,
            key,
            score,
            s
        );
        if key != wk {
            prop_assert!(
                m == *wm && close(s, *ws),
                "{}: position {}: {} ({}, {}) where brute force has {} ({}, {})",
                what,
                i,
                key,
                m,
                s,
                wk,
                wm,
                ws
            );
        }
    }
    Ok(())
}

fn run(steps: Vec<Step>, queries: Vec<String>, stem: bool) -> Result<(), TestCaseError> {
    let index = Arc::new(Index::new(stem));
    let state = State::with_index(Some(index.clone()));
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let an = Analyzer::new(stem);
    for (i, s) in steps.into_iter().enumerate() {
        // Queries between writes too: similarity then works from norms
        // cached some writes ago (bounds), which must not change results.
        if i % 4 == 3 {
            let corpus = Corpus::new(&model, &an);
            let q = &queries[i % queries.len()];
            let mut toks = Vec::new();
            an.text_terms(q, &mut |t| toks.push(t.to_string()));
            let got = index.similar_text(q, 0, 3).unwrap();
            check_page(
                &format!("similar {q:?} at step {i}"),
                &got,
                &corpus.cosine(&toks, None),
                0,
                3,
            )?;
            if let Some(k) = corpus.docs.keys().nth(i % 5) {
                let want = corpus.cosine(&corpus.docs[k], Some(k));
                let got = index.similar_key(k, 0, 2).unwrap();
                check_page(&format!("similar key={k} at step {i}"), &got, &want, 0, 2)?;
            }
        }
        match s {
            Step::Put(k, v) => {
                apply(
                    &state,
                    &Op::Put {
                        key: b(key(k).as_bytes()),
                        value: b(&v),
                        expiry: Expiry::Never,
                    },
                );
                model.insert(key(k), v);
            }
            Step::Delete(k) => {
                apply(
                    &state,
                    &Op::Delete {
                        key: b(key(k).as_bytes()),
                    },
                );
                model.remove(&key(k));
            }
            Step::Bulk(items) => {
                let items = items
                    .into_iter()
                    .map(|(k, v)| {
                        model.insert(key(k), v.clone());
                        (b(key(k).as_bytes()), b(&v), Expiry::Never)
                    })
                    .collect();
                apply(&state, &Op::Bulk { items });
            }
            Step::Install => {
                let fresh = state.empty_like();
                for (k, v) in &model {
                    apply(
                        &fresh,
                        &Op::Put {
                            key: b(k.as_bytes()),
                            value: b(v),
                            expiry: Expiry::Never,
                        },
                    );
                }
                state.replace_with(fresh);
            }
        }
    }
    let corpus = Corpus::new(&model, &an);
    let stats = index.stats();
    prop_assert_eq!(stats.documents, corpus.docs.len() as u64);
    let vocab: BTreeSet<&String> = corpus.docs.values().flatten().collect();
    prop_assert_eq!(stats.terms, vocab.len() as u64);

    for q in &queries {
        let mut toks = Vec::new();
        an.text_terms(q, &mut |t| toks.push(t.to_string()));
        let want = corpus.bm25(&toks);
        for (offset, limit) in [(0, 1000), (0, 3), (2, 4)] {
            let got = index.search(q, offset, limit).unwrap();
            check_page(&format!("search {q:?}"), &got, &want, offset, limit)?;
        }
        let want = corpus.cosine(&toks, None);
        for (offset, limit) in [(0, 1000), (0, 5), (1, 3)] {
            let got = index.similar_text(q, offset, limit).unwrap();
            check_page(&format!("similar {q:?}"), &got, &want, offset, limit)?;
        }
    }
    for (k, toks) in &corpus.docs {
        let want = corpus.cosine(toks, Some(k));
        let got = index.similar_key(k, 0, 10).unwrap();
        check_page(&format!("similar key={k}"), &got, &want, 0, 10)?;
    }
    for k in model.keys().filter(|k| !corpus.docs.contains_key(*k)) {
        prop_assert!(index.similar_key(k, 0, 10).is_none());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn bm25_and_similarity_equal_brute_force(
        steps in vec(step(), 1..60),
        queries in vec(query(), 1..6),
    ) {
        run(steps, queries, false)?;
    }

    #[test]
    fn the_same_holds_with_stemming(
        steps in vec(step(), 1..40),
        queries in vec(query(), 1..4),
    ) {
        run(steps, queries, true)?;
    }
}

/// Applies `op` as the state's next record.
fn apply(state: &State, op: &Op) {
    state.apply(state.applied_index() + 1, Default::default(), op, false);
}

/// A larger corpus, where long posting lists see many deletes and moves.
#[test]
fn churn_on_a_larger_corpus() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let vocab: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    let index = Arc::new(Index::new(false));
    let state = State::with_index(Some(index.clone()));
    let mut model = BTreeMap::new();
    for _ in 0..6000 {
        let k = format!("k{}", rng.gen_range(0..800));
        if rng.gen_bool(0.2) {
            apply(
                &state,
                &Op::Delete {
                    key: b(k.as_bytes()),
                },
            );
            model.remove(&k);
        } else {
            let n = rng.gen_range(1..40);
            // Skewed: low word numbers are common, as in prose.
            let words: Vec<&str> = (0..n)
                .map(|_| vocab[(rng.gen_range(0.0f64..1.0).powi(3) * 300.0) as usize].as_str())
                .collect();
            let v = words.join(" ").into_bytes();
            apply(
                &state,
                &Op::Put {
                    key: b(k.as_bytes()),
                    value: b(&v),
                    expiry: Expiry::Never,
                },
            );
            model.insert(k, v);
        }
    }
    let an = Analyzer::new(false);
    let corpus = Corpus::new(&model, &an);
    for q in ["w0", "w1 w250", "w3 w7 w299", "w0 w1 w2 w3"] {
        let toks: Vec<String> = q.split(' ').map(str::to_string).collect();
        check_page(
            q,
            &index.search(q, 0, 20).unwrap(),
            &corpus.bm25(&toks),
            0,
            20,
        )
        .unwrap();
        check_page(
            q,
            &index.similar_text(q, 0, 20).unwrap(),
            &corpus.cosine(&toks, None),
            0,
            20,
        )
        .unwrap();
    }
    for k in corpus.docs.keys().take(20) {
        let want = corpus.cosine(&corpus.docs[k], Some(k));
        check_page(k, &index.similar_key(k, 0, 10).unwrap(), &want, 0, 10).unwrap();
    }
}
