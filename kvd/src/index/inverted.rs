//! The inverted index proper: interned terms, posting lists, a doc-id map,
//! and the two rankings (BM25 and TF-IDF cosine) over them.
//!
//! Layout, chosen so that a write costs O(terms of the document) on the WAL
//! thread, and no scan or shift of a long list:
//!
//! - A term is interned once (`term_table` → term id); `lists[term]` is its
//!   posting list `(doc, tf)`, in no particular order, and `df[term]` the
//!   number of live documents holding it.
//! - A document (one key with at least one term) gets a dense doc id.
//!   `docs[doc]` holds its key and its distinct terms with their counts;
//!   `doc_len[doc]` its length in tokens (0: no live document).
//! - A delete does not touch the posting lists: it marks the doc id dead
//!   (`doc_len = 0`), lowers `df` of its terms, and leaves its postings as
//!   stale entries that queries skip. A list whose stale entries outnumber
//!   its live ones is compacted right then (amortised O(1) per delete, and
//!   a query never reads more than twice the live postings). A dead doc id
//!   is reused only once no list names it any more (`refs` counts the stale
//!   postings naming it), so a stale posting can never be mistaken for a
//!   later document.
//! - Every floating-point sum adds the same numbers in the same way on
//!   every node and after every restart, whatever the term ids or the
//!   insertion history there, so equal data gives bit-equal scores: a
//!   document keeps its terms in the order they first appear in its value;
//!   a text query's terms are put in one fixed order (FNV-1a hash of the
//!   term, then the term), and so is a document's when it is the query, which
//!   fixes the order of each BM25 sum and dot product; a document's TF-IDF
//!   norm is summed exactly, in fixed point, so its order does not matter.
//!
//! Ranking formulas (also in ARCHITECTURE.md; the property test
//! `kvd/tests/index_model.rs` checks them against a brute-force version):
//!
//! ```text
//! N      = documents (keys whose value has at least one term)
//! n(t)   = documents containing term t;  f(t,D) = occurrences of t in D
//! |D|    = tokens in D;  avgdl = (sum of |D|) / N
//! BM25:  IDF(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))
//!        score(D,Q) = sum over distinct t in Q of
//!                     IDF(t) * f(t,D) * (k1 + 1) / (f(t,D) + k1 * (1 - b + b * |D| / avgdl))
//!        k1 = 1.2, b = 0.75
//! TF-IDF: idf(t) = ln((1 + N) / (1 + n(t))) + 1
//!        w(t,X) = f(t,X) * idf(t)   (X a document or the query)
//!        cos(Q,D) = sum_t w(t,Q) w(t,D) / (|w(Q)| |w(D)|)
//! ```

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::Mutex;

use super::text::Analyzer;

pub const K1: f64 = 1.2;
pub const B: f64 = 0.75;

/// The fixed order of terms (see the module docs): FNV-1a of the bytes,
/// then the bytes. The same on every node, build and release.
pub fn order_key(t: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hash of a term for hash tables (not for ordering: that is
/// [`order_key`]'s job).
fn term_hash(t: &str) -> u64 {
    const H: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7465_726d_7321);
    H.hash_one(t)
}

/// Compares two terms in the fixed order.
pub fn term_order(a: (u64, &str), b: (u64, &str)) -> Ordering {
    a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

/// A value's terms: distinct terms, in the order they first appear, with
/// their counts, and the total number of tokens. Made outside any lock.
#[derive(Debug, Default, Clone)]
pub struct Analyzed {
    arena: String,
    /// `(term_hash, start, end, tf)` into `arena`, distinct.
    terms: Vec<(u64, usize, usize, u32)>,
    len: u64,
}

impl Analyzed {
    pub fn of_value(analyzer: &Analyzer, value: &[u8]) -> Analyzed {
        let mut a = Analyzed {
            arena: String::with_capacity(value.len().min(1 << 16)),
            terms: Vec::with_capacity((value.len() / 8).min(1 << 14)),
            len: 0,
        };
        // Distinct terms through a small hash table of indexes into
        // `a.terms`, so repeated words cost one probe, not a sort entry.
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            seen.clear();
            a.fill(analyzer, value, &mut seen);
            if seen.capacity() > 1 << 16 {
                *seen = HashTable::new();
            }
        });
        a
    }

    fn fill(&mut self, analyzer: &Analyzer, value: &[u8], seen: &mut HashTable<u32>) {
        let a = self;
        analyzer.value_terms(value, &mut |t| {
            a.len += 1;
            let k = term_hash(t);
            let h = k;
            let (arena, terms) = (&mut a.arena, &mut a.terms);
            match seen.find(h, |&i| {
                let e = &terms[i as usize];
                e.0 == k && &arena[e.1..e.2] == t
            }) {
                Some(&i) => terms[i as usize].3 += 1,
                None => {
                    let start = arena.len();
                    arena.push_str(t);
                    let i = u32::try_from(terms.len()).expect("fewer than 2^32 distinct terms");
                    terms.push((k, start, arena.len(), 1));
                    seen.insert_unique(h, i, |&j| terms[j as usize].0);
                }
            }
        });
    }

    /// Distinct terms and their counts.
    pub fn terms(&self) -> impl Iterator<Item = (&str, u32)> {
        self.terms
            .iter()
            .map(|&(_, s, e, tf)| (&self.arena[s..e], tf))
    }

    /// Like [`Analyzed::terms`], with each term's hash.
    fn keyed_terms(&self) -> impl Iterator<Item = (u64, &str, u32)> {
        self.terms
            .iter()
            .map(|&(k, s, e, tf)| (k, &self.arena[s..e], tf))
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct Posting {
    doc: u32,
    tf: u32,
}

/// Bytes of a term kept in its hash-table slot: interning a term that short
/// compares it there, without a trip to the term's own allocation.
const INLINE: usize = 11;

/// A slot of the term table: the term id and the term's first bytes.
#[derive(Debug, Clone, Copy)]
struct TermSlot {
    id: u32,
    /// The term's length, or `u8::MAX` if longer than [`INLINE`].
    len: u8,
    head: [u8; INLINE],
}

impl TermSlot {
    fn new_packed(id: u32, p: &Packed) -> TermSlot {
        TermSlot {
            id,
            len: p.len,
            head: p.head,
        }
    }

    /// Whether this slot holds `t` (packed as `p`): fixed-size compares for
    /// short terms, the term itself only for long ones.
    fn is(&self, p: &Packed, t: &str, names: &[Box<str>]) -> bool {
        self.len == p.len
            && self.head == p.head
            && (p.len != u8::MAX || *names[self.id as usize] == *t)
    }
}

/// A term's length and first bytes, as a [`TermSlot`] keeps them.
struct Packed {
    len: u8,
    head: [u8; INLINE],
}

impl Packed {
    fn of(t: &str) -> Packed {
        let mut head = [0; INLINE];
        for (h, b) in head.iter_mut().zip(t.bytes()) {
            *h = b;
        }
        Packed {
            len: if t.len() <= INLINE {
                t.len() as u8
            } else {
                u8::MAX
            },
            head,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct DocTerm {
    term: u32,
    tf: u32,
}

#[derive(Debug)]
struct Doc {
    key: Box<str>,
    /// Distinct terms, in the order they first appear in the value (sums
    /// over them are exact, or sorted first: see [`fixed`] and `doc_vector`).
    terms: Box<[DocTerm]>,
    /// TF-IDF norm cached for index generation `norm_gen` (IDF moves with
    /// every write, so a norm is good only for the generation it was
    /// computed in). Written by concurrent readers, who all compute the
    /// same value for the same generation.
    norm: AtomicU64,
    norm_gen: AtomicU64,
    /// `sqrt(sum of tf^2)`: a floor of the TF-IDF norm (every idf >= 1).
    tf_norm: f64,
}

/// One result: a key and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub key: String,
    pub score: f64,
}

/// A page of results and the number of documents that matched at all.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub hits: Vec<Hit>,
    pub total: usize,
}

/// Figures for `/v1/status` and metrics.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub documents: u64,
    pub terms: u64,
    pub postings: u64,
    pub memory_bytes: u64,
}

/// The index contents. Mutated only by the WAL thread (under the write
/// lock of [`super::Index`]); queried under the read lock.
pub struct Inner {
    hasher: foldhash::fast::FixedState,
    term_table: HashTable<TermSlot>,
    term_names: Vec<Box<str>>,
    lists: Vec<Vec<Posting>>,
    /// Live documents holding each term (`lists[t]` may hold more: stale).
    df: Vec<u32>,
    free_terms: Vec<u32>,
    docs: Vec<Option<Doc>>,
    /// `|D|` by doc id, dense, for the queries' inner loops; 0 = no live
    /// document (free, or dead with stale postings left).
    doc_len: Vec<u32>,
    /// For a dead doc id: stale postings that still name it.
    refs: Vec<u32>,
    free_docs: Vec<u32>,
    key_table: HashTable<u32>,
    n_docs: u64,
    total_len: u64,
    postings: u64,
    stale: u64,
    key_bytes: u64,
    term_bytes: u64,
    /// Bumped by every change; TF-IDF caches are keyed by it.
    gen: u64,
    /// `idf(t)` for every term id, for one generation.
    idf_cache: Mutex<Option<(u64, Arc<Vec<f64>>)>>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            hasher: foldhash::fast::FixedState::with_seed(0x696e_6465_7821),
            term_table: HashTable::new(),
            term_names: Vec::new(),
            lists: Vec::new(),
            df: Vec::new(),
            free_terms: Vec::new(),
            docs: Vec::new(),
            doc_len: Vec::new(),
            refs: Vec::new(),
            free_docs: Vec::new(),
            key_table: HashTable::new(),
            n_docs: 0,
            total_len: 0,
            postings: 0,
            stale: 0,
            key_bytes: 0,
            term_bytes: 0,
            gen: 0,
            idf_cache: Mutex::new(None),
        }
    }
}

thread_local! {
    /// The distinct-term table of [`Analyzed::of_value`], reused.
    static SEEN: RefCell<HashTable<u32>> = const { RefCell::new(HashTable::new()) };

    /// Per-thread accumulators for queries, reused so a query allocates
    /// nothing proportional to the corpus.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    acc: Vec<f64>,
    matched: Vec<u32>,
    touched: Vec<u32>,
}

impl Scratch {
    fn prepare(&mut self, docs: usize) {
        if self.acc.len() < docs {
            self.acc.resize(docs, 0.0);
            self.matched.resize(docs, 0);
        }
    }

    fn add(&mut self, doc: u32, x: f64) {
        let d = doc as usize;
        if self.matched[d] == 0 {
            self.touched.push(doc);
        }
        self.acc[d] += x;
        self.matched[d] += 1;
    }

    fn reset(&mut self) {
        for &d in &self.touched {
            self.acc[d as usize] = 0.0;
            self.matched[d as usize] = 0;
        }
        self.touched.clear();
    }
}

/// Ranking order: more matched query terms first, then higher score, then
/// key ascending (so equal scores come out the same on every node).
/// "Less" ranks first; a max-heap of these keeps the worst on top.
struct Ranked<'a> {
    matched: u32,
    score: f64,
    key: &'a str,
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .matched
            .cmp(&self.matched)
            .then_with(|| other.score.total_cmp(&self.score))
            .then_with(|| self.key.cmp(other.key))
    }
}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked<'_> {}

/// A candidate's score bound, ordered by the bound (for a max-heap).
struct Bound(f64, u32);

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bound {}

/// Keeps the best `want` of what it is offered.
struct TopK<'a> {
    want: usize,
    heap: BinaryHeap<Ranked<'a>>,
}

impl<'a> TopK<'a> {
    fn new(want: usize) -> Self {
        TopK {
            want,
            heap: BinaryHeap::with_capacity(want.min(1 << 16) + 1),
        }
    }

    fn offer(&mut self, r: Ranked<'a>) {
        if self.want == 0 {
            return;
        }
        if self.heap.len() < self.want {
            self.heap.push(r);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if r < *worst {
                *worst = r;
            }
        }
    }

    /// The score a newcomer must reach to enter, once full.
    fn bar(&self) -> Option<f64> {
        if self.heap.len() < self.want {
            return None;
        }
        self.heap.peek().map(|r| r.score)
    }

    fn page(self, offset: usize, total: usize) -> Page {
        Page {
            hits: self
                .heap
                .into_sorted_vec()
                .into_iter()
                .skip(offset)
                .map(|r| Hit {
                    key: r.key.to_string(),
                    score: r.score,
                })
                .collect(),
            total,
        }
    }
}

/// 2^40, the unit of [`fixed`].
const FIXED_ONE: f64 = (1u64 << 40) as f64;

/// `x` (finite, >= 1, < 2^73) in units of 2^-40, truncated: integer sums
/// of these are exact and so do not depend on the order of the terms,
/// which a document's list does not keep. The truncation loses at most
/// 2^-40 of each term relative, far below what the ranking needs.
fn fixed(x: f64) -> u128 {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
    let mantissa = u128::from((bits & ((1u64 << 52) - 1)) | (1u64 << 52));
    let shift = exp + 40;
    if shift >= 0 {
        mantissa << shift.min(127)
    } else {
        mantissa >> (-shift).min(127)
    }
}

/// BM25's IDF.
pub fn bm25_idf(n_docs: f64, df: f64) -> f64 {
    (1.0 + (n_docs - df + 0.5) / (df + 0.5)).ln()
}

/// TF-IDF's IDF.
pub fn tfidf_idf(n_docs: f64, df: f64) -> f64 {
    ((1.0 + n_docs) / (1.0 + df)).ln() + 1.0
}

/// A similarity query: distinct terms in the fixed order with their counts;
/// `None` for a term no document has.
pub struct QueryVector {
    pub terms: Vec<(Option<u32>, u32)>,
    /// A document to leave out of the results (the `key=` of "more like this").
    pub exclude: Option<u32>,
}

impl Inner {
    fn hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    pub fn term_id(&self, t: &str) -> Option<u32> {
        let h = term_hash(t);
        let p = Packed::of(t);
        self.term_table
            .find(h, |slot| slot.is(&p, t, &self.term_names))
            .map(|slot| slot.id)
    }

    fn doc_id(&self, key: &str) -> Option<u32> {
        let h = self.hash(key);
        let docs = &self.docs;
        self.key_table
            .find(h, |&d| {
                docs[d as usize].as_ref().is_some_and(|x| &*x.key == key)
            })
            .copied()
    }

    /// The id of term `t` (whose [`term_hash`] is `h`), made if new.
    fn intern(&mut self, h: u64, t: &str) -> u32 {
        let p = Packed::of(t);
        if let Some(slot) = self
            .term_table
            .find(h, |slot| slot.is(&p, t, &self.term_names))
        {
            return slot.id;
        }
        let id = match self.free_terms.pop() {
            Some(id) => {
                self.term_names[id as usize] = t.into();
                id
            }
            None => {
                let id = u32::try_from(self.term_names.len()).expect("fewer than 2^32 terms");
                self.term_names.push(t.into());
                self.lists.push(Vec::new());
                self.df.push(0);
                id
            }
        };
        self.term_bytes += t.len() as u64;
        let names = &self.term_names;
        self.term_table
            .insert_unique(h, TermSlot::new_packed(id, &p), |slot| {
                term_hash(&names[slot.id as usize])
            });
        id
    }

    /// Drops term `id` (no live document holds it, its list is empty).
    fn forget_term(&mut self, id: u32) {
        let h = term_hash(&self.term_names[id as usize]);
        if let Ok(e) = self.term_table.find_entry(h, |slot| slot.id == id) {
            e.remove();
        }
        self.term_bytes -= self.term_names[id as usize].len() as u64;
        self.term_names[id as usize] = Box::from("");
        self.lists[id as usize] = Vec::new();
        self.free_terms.push(id);
    }

    /// Removes the stale postings of `lists[t]`; doc ids no list names any
    /// more become free.
    fn compact(&mut self, t: u32) {
        let (doc_len, refs, free_docs) = (&self.doc_len, &mut self.refs, &mut self.free_docs);
        let list = &mut self.lists[t as usize];
        let before = list.len();
        list.retain(|p| {
            let live = doc_len[p.doc as usize] != 0;
            if !live {
                let r = &mut refs[p.doc as usize];
                *r -= 1;
                if *r == 0 {
                    free_docs.push(p.doc);
                }
            }
            live
        });
        self.stale -= (before - list.len()) as u64;
        if list.capacity() > 16 && list.capacity() > 4 * list.len() {
            list.shrink_to(2 * list.len());
        }
        if self.df[t as usize] == 0 {
            self.forget_term(t);
        }
    }

    /// Sets `key`'s document to `doc` (no terms: the key has no document).
    pub fn put(&mut self, key: Box<str>, doc: &Analyzed) {
        self.delete(&key);
        if doc.is_empty() {
            return;
        }
        let d = match self.free_docs.pop() {
            Some(d) => d,
            None => {
                let d = u32::try_from(self.docs.len()).expect("fewer than 2^32 documents");
                self.docs.push(None);
                self.doc_len.push(0);
                self.refs.push(0);
                d
            }
        };
        // Three passes rather than one: the lists' tails are scattered over
        // the heap, and loads that do not depend on each other (pass 2)
        // let the CPU wait for many cache misses at once, where the pushes
        // of a single pass would wait for them one by one.
        let mut terms: Vec<DocTerm> = doc
            .keyed_terms()
            .map(|(key, t, tf)| DocTerm {
                term: self.intern(key, t),
                tf,
            })
            .collect();
        let mut warm = 0u32;
        for dt in &terms {
            warm ^= self.lists[dt.term as usize].last().map_or(0, |p| p.doc);
            warm ^= self.df[dt.term as usize];
        }
        std::hint::black_box(warm);
        for dt in &mut terms {
            self.lists[dt.term as usize].push(Posting { doc: d, tf: dt.tf });
            self.df[dt.term as usize] += 1;
        }
        let tf_norm = terms
            .iter()
            .map(|t| f64::from(t.tf) * f64::from(t.tf))
            .sum::<f64>()
            .sqrt();
        self.postings += terms.len() as u64;
        self.n_docs += 1;
        self.total_len += doc.len;
        self.key_bytes += key.len() as u64;
        // A document has at least one token, so a live length is never 0.
        self.doc_len[d as usize] = u32::try_from(doc.len).unwrap_or(u32::MAX).max(1);
        let h = self.hash(&key);
        self.docs[d as usize] = Some(Doc {
            key,
            terms: terms.into_boxed_slice(),
            norm: AtomicU64::new(0),
            norm_gen: AtomicU64::new(u64::MAX),
            tf_norm,
        });
        let (docs, hasher) = (&self.docs, &self.hasher);
        self.key_table.insert_unique(h, d, |&x| {
            hasher.hash_one(docs[x as usize].as_ref().map_or("", |doc| &*doc.key))
        });
        self.gen += 1;
    }

    /// Drops `key`'s document, if it has one.
    pub fn delete(&mut self, key: &str) {
        let h = self.hash(key);
        let docs = &self.docs;
        let Ok(entry) = self.key_table.find_entry(h, |&d| {
            docs[d as usize].as_ref().is_some_and(|x| &*x.key == key)
        }) else {
            return;
        };
        let (d, _) = entry.remove();
        let Some(doc) = self.docs[d as usize].take() else {
            return;
        };
        let len = self.doc_len[d as usize];
        self.doc_len[d as usize] = 0;
        self.refs[d as usize] = doc.terms.len() as u32;
        self.stale += doc.terms.len() as u64;
        for dt in doc.terms.iter() {
            let t = dt.term as usize;
            self.df[t] -= 1;
            let stale = self.lists[t].len() - self.df[t] as usize;
            if stale > self.df[t] as usize {
                self.compact(dt.term);
            }
        }
        // (If every list holding it was compacted in the loop, `compact`
        // already freed the doc id.)
        self.postings -= doc.terms.len() as u64;
        self.n_docs -= 1;
        self.total_len -= u64::from(len).min(self.total_len);
        self.key_bytes -= doc.key.len() as u64;
        self.gen += 1;
    }

    pub fn stats(&self) -> Stats {
        use std::mem::size_of;
        let mem = self.docs.capacity() * size_of::<Option<Doc>>()
            + (self.doc_len.capacity() + self.refs.capacity() + self.df.capacity()) * 4
            + self.free_docs.capacity() * 4
            + self.key_table.capacity() * 5
            + self.term_table.capacity() * (size_of::<TermSlot>() + 1)
            + self.term_names.capacity() * size_of::<Box<str>>()
            + self.lists.capacity() * size_of::<Vec<Posting>>()
            + self.free_terms.capacity() * 4;
        let lists: usize = self
            .lists
            .iter()
            .map(|l| l.capacity() * size_of::<Posting>())
            .sum();
        Stats {
            documents: self.n_docs,
            terms: self.term_table.len() as u64,
            postings: self.postings,
            memory_bytes: mem as u64
                + lists as u64
                + self.postings * size_of::<DocTerm>() as u64
                + self.key_bytes
                + self.term_bytes,
        }
    }

    /// BM25 over `terms` (distinct, in the fixed order): the best
    /// `offset + limit`, ranked by matched terms, score, key.
    pub fn bm25(&self, terms: &[&str], offset: usize, limit: usize) -> Page {
        if self.n_docs == 0 {
            return Page::default();
        }
        let n = self.n_docs as f64;
        let avgdl = self.total_len as f64 / n;
        let lists: Vec<(f64, &[Posting])> = terms
            .iter()
            .filter_map(|t| self.term_id(t))
            .map(|id| {
                let df = f64::from(self.df[id as usize]);
                (bm25_idf(n, df), self.lists[id as usize].as_slice())
            })
            .collect();
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.prepare(self.docs.len());
            // Length normalisation K(D) = k1 * (1 - b + b |D| / avgdl).
            let k_base = K1 * (1.0 - B);
            let k_len = K1 * B / avgdl;
            for (idf, list) in &lists {
                for p in list.iter() {
                    let dl = self.doc_len[p.doc as usize];
                    if dl == 0 {
                        continue; // stale
                    }
                    let tf = f64::from(p.tf);
                    let x = idf * (tf * (K1 + 1.0)) / (tf + (k_base + k_len * f64::from(dl)));
                    s.add(p.doc, x);
                }
            }
            let mut top = TopK::new(offset.saturating_add(limit));
            for &d in &s.touched {
                if let Some(doc) = &self.docs[d as usize] {
                    top.offer(Ranked {
                        matched: s.matched[d as usize],
                        score: s.acc[d as usize],
                        key: &doc.key,
                    });
                }
            }
            let total = s.touched.len();
            s.reset();
            top.page(offset, total)
        })
    }

    /// The query vector of `key`'s document, if it has one.
    pub fn doc_vector(&self, key: &str) -> Option<QueryVector> {
        let d = self.doc_id(key)?;
        let doc = self.docs[d as usize].as_ref()?;
        // Into the fixed order, so the dot products add up alike everywhere.
        let mut terms: Vec<(u64, &str, DocTerm)> = doc
            .terms
            .iter()
            .map(|t| {
                let name = &*self.term_names[t.term as usize];
                (order_key(name), name, *t)
            })
            .collect();
        terms.sort_unstable_by(|a, b| term_order((a.0, a.1), (b.0, b.1)));
        Some(QueryVector {
            terms: terms
                .into_iter()
                .map(|(_, _, t)| (Some(t.term), t.tf))
                .collect(),
            exclude: Some(d),
        })
    }

    /// `idf(t)` for every term id, for the current generation.
    fn idf_table(&self) -> Arc<Vec<f64>> {
        let mut cache = self.idf_cache.lock();
        if let Some((gen, table)) = &*cache {
            if *gen == self.gen {
                return table.clone();
            }
        }
        let n = self.n_docs as f64;
        let table: Arc<Vec<f64>> = Arc::new(
            self.df
                .iter()
                .map(|&df| tfidf_idf(n, f64::from(df)))
                .collect(),
        );
        *cache = Some((self.gen, table.clone()));
        table
    }

    /// `|w(D)|` if it is cached for the current generation.
    fn cached_norm(&self, doc: &Doc) -> Option<f64> {
        (doc.norm_gen.load(AtomicOrdering::Acquire) == self.gen)
            .then(|| f64::from_bits(doc.norm.load(AtomicOrdering::Relaxed)))
    }

    /// A lower bound of `|w(D)|` now, from what never changes and what
    /// was cached: every idf is at least 1, so `|w(D)| >= |tf(D)|`; and if
    /// the norm was computed `W` changes ago, each idf of the document's
    /// terms has moved since by at most
    /// `delta = ln(1 + W / (1 + N_min)) + ln(1 + W / 2)` (N moved by at most
    /// W, and each of its terms' document frequency, at least 1 then and
    /// now, by at most W), so `|w(D)| >= old - delta * |tf(D)|`.
    fn norm_floor(&self, doc: &Doc) -> f64 {
        let tf_norm = doc.tf_norm;
        let then = doc.norm_gen.load(AtomicOrdering::Acquire);
        if then == u64::MAX || then > self.gen {
            return tf_norm;
        }
        let old = f64::from_bits(doc.norm.load(AtomicOrdering::Relaxed));
        let w = (self.gen - then) as f64;
        let n_min = (self.n_docs as f64 - w).max(0.0);
        let delta = (1.0 + w / (1.0 + n_min)).ln() + (1.0 + w / 2.0).ln();
        // Slack for the rounding in `old` and here.
        (old - delta * tf_norm).max(tf_norm) * (1.0 - 1e-12)
    }

    /// `|w(D)|` for the current generation, cached in the document.
    fn doc_norm(&self, doc: &Doc, idf: &mut Option<Arc<Vec<f64>>>) -> f64 {
        if doc.norm_gen.load(AtomicOrdering::Acquire) == self.gen {
            return f64::from_bits(doc.norm.load(AtomicOrdering::Relaxed));
        }
        let table = idf.get_or_insert_with(|| self.idf_table());
        // An exact fixed-point sum: the same bits whatever the order of
        // the document's terms (see `fixed`).
        let mut sum: u128 = 0;
        for t in doc.terms.iter() {
            let w = f64::from(t.tf) * table[t.term as usize];
            sum += fixed(w * w);
        }
        let norm = (sum as f64 / FIXED_ONE).sqrt();
        doc.norm.store(norm.to_bits(), AtomicOrdering::Relaxed);
        doc.norm_gen.store(self.gen, AtomicOrdering::Release);
        norm
    }

    /// TF-IDF cosine similarity: the best `offset + limit` documents that
    /// share a term with the query, by score then key.
    pub fn similar(&self, q: &QueryVector, offset: usize, limit: usize) -> Page {
        if self.n_docs == 0 {
            return Page::default();
        }
        let n = self.n_docs as f64;
        let mut q_norm = 0.0;
        let mut lists: Vec<(f64, &[Posting])> = Vec::with_capacity(q.terms.len());
        for &(id, qtf) in &q.terms {
            let (df, list) = match id {
                Some(id) => (self.df[id as usize], self.lists[id as usize].as_slice()),
                None => (0, &[][..]),
            };
            let idf = tfidf_idf(n, f64::from(df));
            let wq = f64::from(qtf) * idf;
            q_norm += wq * wq;
            if df > 0 {
                // w(t,Q) * w(t,D) = (qtf * idf) * (tf * idf)
                lists.push((wq * idf, list));
            }
        }
        let q_norm = q_norm.sqrt();
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.prepare(self.docs.len());
            for (wq_idf, list) in &lists {
                for p in list.iter() {
                    if self.doc_len[p.doc as usize] != 0 {
                        s.add(p.doc, wq_idf * f64::from(p.tf));
                    }
                }
            }
            let mut idf = None;
            let mut top = TopK::new(offset.saturating_add(limit));
            let mut total = 0;
            // Documents whose norm is known for this generation are scored
            // at once; the others get an upper bound from a lower bound on
            // their norm (`norm_floor`) and are scored, best bound first,
            // only while their bound can still beat the current top: the
            // first similarity query after a write then computes a few
            // norms, not one per candidate.
            let mut pending: Vec<Bound> = Vec::new();
            for &d in &s.touched {
                if Some(d) == q.exclude {
                    continue;
                }
                let Some(doc) = &self.docs[d as usize] else {
                    continue;
                };
                total += 1;
                let dot = s.acc[d as usize];
                match self.cached_norm(doc) {
                    Some(norm) => top.offer(Ranked {
                        matched: 0,
                        score: (dot / (q_norm * norm)).min(1.0),
                        key: &doc.key,
                    }),
                    None => {
                        // Rounding slack: the bound must not fall below the
                        // score computed from the exact norm.
                        let bound = dot / (q_norm * self.norm_floor(doc)) * (1.0 + 1e-9);
                        pending.push(Bound(bound, d));
                    }
                }
            }
            // A heap, not a sort: usually only the first few come out.
            let mut pending = BinaryHeap::from(pending);
            while let Some(Bound(bound, d)) = pending.pop() {
                if top.bar().is_some_and(|bar| bound < bar) {
                    break;
                }
                let Some(doc) = &self.docs[d as usize] else {
                    continue;
                };
                let norm = self.doc_norm(doc, &mut idf);
                top.offer(Ranked {
                    matched: 0,
                    score: (s.acc[d as usize] / (q_norm * norm)).min(1.0),
                    key: &doc.key,
                });
            }
            s.reset();
            top.page(offset, total)
        })
    }
}
