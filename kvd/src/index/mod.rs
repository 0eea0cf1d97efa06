//! Full-text (BM25) and TF-IDF similarity indexes over the values
//! (docs/DESIGN.md §7), kept by `kvd --index`.
//!
//! - [`text`]: from a value to terms (JSON string leaves or UTF-8 text,
//!   UAX #29 words, lowercase, optional English stemming).
//! - [`inverted`]: interned terms, posting lists, the doc-id map, and the
//!   BM25 and cosine rankings, with the exact formulas.
//!
//! The index is told every change of the key space by [`crate::storage::State`]
//! (its `put`/`delete` paths, which local writes, WAL replay, snapshot
//! load and replicated entries all take), on the WAL thread, before the
//! write is acknowledged; a snapshot install rebuilds it from the new
//! contents. Queries take a read lock and run on the HTTP handler's
//! thread; a write holds the write lock only to splice postings: the text
//! is analysed before the lock is taken.

pub mod inverted;
pub mod text;

use parking_lot::{Mutex, RwLock};

use inverted::{Analyzed, Inner, QueryVector};
pub use inverted::{Hit, Page, Stats};
use text::Analyzer;

/// Longest query text, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Most words (tokens) in a query.
pub const MAX_QUERY_TERMS: usize = 64;
/// Largest `limit` / `top_k`.
pub const MAX_LIMIT: usize = 1000;
/// Largest `offset`.
pub const MAX_OFFSET: usize = 10_000;

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query has no words to search for")]
    Empty,
    #[error("the query is {0} bytes; the limit is {MAX_QUERY_BYTES}")]
    TooLong(usize),
    #[error("the query has {0} words; the limit is {MAX_QUERY_TERMS}")]
    TooManyTerms(usize),
}

enum Change {
    Put(Box<str>, Analyzed),
    Delete(Box<str>),
}

/// The index of one node. Shared by the state (writer) and the API (readers).
pub struct Index {
    analyzer: Analyzer,
    inner: RwLock<Inner>,
    /// While a batch is open (a bulk), changes wait here and then go in
    /// under one write lock, so a search sees all of a bulk or none of it.
    staged: Mutex<Option<Vec<Change>>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("stemming", &self.analyzer.stemming())
            .field("stats", &self.stats())
            .finish()
    }
}

fn key_str(key: &[u8]) -> Box<str> {
    String::from_utf8_lossy(key).into()
}

/// Closes a batch opened by [`Index::batch`] when dropped.
pub struct Batch<'a> {
    index: &'a Index,
    opened: bool,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.opened {
            return;
        }
        let Some(changes) = self.index.staged.lock().take() else {
            return;
        };
        let mut inner = self.index.inner.write();
        for c in changes {
            match c {
                Change::Put(k, a) => inner.put(k, &a),
                Change::Delete(k) => inner.delete(&k),
            }
        }
    }
}

impl Index {
    pub fn new(stem: bool) -> Index {
        Index {
            analyzer: Analyzer::new(stem),
            inner: RwLock::new(Inner::default()),
            staged: Mutex::new(None),
        }
    }

    pub fn stemming(&self) -> bool {
        self.analyzer.stemming()
    }

    fn submit(&self, c: Change) {
        {
            let mut staged = self.staged.lock();
            if let Some(v) = staged.as_mut() {
                v.push(c);
                return;
            }
        }
        let mut inner = self.inner.write();
        match c {
            Change::Put(k, a) => inner.put(k, &a),
            Change::Delete(k) => inner.delete(&k),
        }
    }

    /// `key` now holds `value`.
    pub fn put(&self, key: &[u8], value: &[u8]) {
        let analyzed = Analyzed::of_value(&self.analyzer, value);
        self.submit(Change::Put(key_str(key), analyzed));
    }

    /// `key` is gone.
    pub fn delete(&self, key: &[u8]) {
        self.submit(Change::Delete(key_str(key)));
    }

    /// Groups the changes until the returned guard drops into one step that
    /// queries see whole. Nested batches join the outer one.
    pub fn batch(&self) -> Batch<'_> {
        let mut staged = self.staged.lock();
        let opened = staged.is_none();
        if opened {
            *staged = Some(Vec::new());
        }
        Batch {
            index: self,
            opened,
        }
    }

    /// Replaces the contents with the entries `fill` feeds in (a snapshot
    /// install). Built aside, then swapped in, so queries wait only for the swap.
    pub fn rebuild(&self, fill: impl FnOnce(&mut dyn FnMut(&[u8], &[u8]))) {
        let mut fresh = Inner::default();
        fill(&mut |k, v| {
            let a = Analyzed::of_value(&self.analyzer, v);
            fresh.put(key_str(k), &a);
        });
        *self.inner.write() = fresh;
    }

    pub fn stats(&self) -> Stats {
        self.inner.read().stats()
    }

    /// A query's distinct terms in the fixed order, within the limits.
    fn query_terms(&self, q: &str) -> Result<Vec<(String, u32)>, QueryError> {
        if q.len() > MAX_QUERY_BYTES {
            return Err(QueryError::TooLong(q.len()));
        }
        let mut words = Vec::new();
        self.analyzer
            .text_terms(q, &mut |t| words.push(t.to_string()));
        if words.is_empty() {
            return Err(QueryError::Empty);
        }
        if words.len() > MAX_QUERY_TERMS {
            return Err(QueryError::TooManyTerms(words.len()));
        }
        // The fixed term order, as documents keep theirs (see `inverted`).
        words.sort_by(|a, b| {
            inverted::term_order((inverted::order_key(a), a), (inverted::order_key(b), b))
        });
        let mut terms: Vec<(String, u32)> = Vec::with_capacity(words.len());
        for w in words {
            match terms.last_mut() {
                Some((last, n)) if *last == w => *n += 1,
                _ => terms.push((w, 1)),
            }
        }
        Ok(terms)
    }

    /// BM25 full-text search: documents with more of the query's distinct
    /// terms first, then by score, then by key; `limit` hits after `offset`.
    pub fn search(&self, q: &str, offset: usize, limit: usize) -> Result<Page, QueryError> {
        let terms = self.query_terms(q)?;
        let terms: Vec<&str> = terms.iter().map(|(t, _)| t.as_str()).collect();
        Ok(self.inner.read().bm25(&terms, offset, limit))
    }

    /// TF-IDF cosine similarity to the text `q`.
    pub fn similar_text(&self, q: &str, offset: usize, limit: usize) -> Result<Page, QueryError> {
        let terms = self.query_terms(q)?;
        let inner = self.inner.read();
        let q = QueryVector {
            terms: terms.iter().map(|(t, n)| (inner.term_id(t), *n)).collect(),
            exclude: None,
        };
        Ok(inner.similar(&q, offset, limit))
    }

    /// TF-IDF cosine similarity to `key`'s value ("more like this"),
    /// leaving `key` itself out; `None` if `key` has no document (absent,
    /// or no text).
    pub fn similar_key(&self, key: &str, offset: usize, limit: usize) -> Option<Page> {
        let inner = self.inner.read();
        let q = inner.doc_vector(key)?;
        Some(inner.similar(&q, offset, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(p: &Page) -> Vec<&str> {
        p.hits.iter().map(|h| h.key.as_str()).collect()
    }

    #[test]
    fn put_overwrite_delete_and_batches() {
        let ix = Index::new(false);
        ix.put(b"a", b"the quick brown fox");
        ix.put(b"b", b"the lazy dog");
        ix.put(b"c", b"quick quick dog");
        assert_eq!(keys(&ix.search("quick", 0, 10).unwrap()), ["c", "a"]);
        // More matched terms rank first.
        assert_eq!(
            keys(&ix.search("quick dog", 0, 10).unwrap()),
            ["c", "b", "a"]
        );
        ix.put(b"c", b"nothing here");
        assert_eq!(keys(&ix.search("quick", 0, 10).unwrap()), ["a"]);
        ix.delete(b"a");
        assert!(ix.search("quick", 0, 10).unwrap().hits.is_empty());
        {
            let _b = ix.batch();
            ix.put(b"x", b"quick");
            ix.put(b"y", b"quick");
            assert!(ix.search("quick", 0, 10).unwrap().hits.is_empty());
        }
        assert_eq!(keys(&ix.search("quick", 0, 10).unwrap()), ["x", "y"]);
        assert_eq!(keys(&ix.search("quick", 1, 10).unwrap()), ["y"]);
        let s = ix.stats();
        assert_eq!(s.documents, 4);
        assert_eq!(ix.search("", 0, 10), Err(QueryError::Empty));
        assert_eq!(ix.search("!!", 0, 10), Err(QueryError::Empty));
        assert!(matches!(
            ix.search(&"a ".repeat(65), 0, 10),
            Err(QueryError::TooManyTerms(65))
        ));
        assert!(matches!(
            ix.search(&"a".repeat(1025), 0, 10),
            Err(QueryError::TooLong(1025))
        ));
    }

    /// Equal contents give bit-equal scores, whatever the history (and so
    /// the term ids and doc ids) that led there.
    #[test]
    fn equal_data_gives_bit_equal_answers_whatever_the_history() {
        let docs: Vec<(String, String)> = (0..300)
            .map(|i| {
                let words: Vec<String> = (0..(5 + i % 23))
                    .map(|j| format!("w{}", (i * 7 + j * j * 13) % 97))
                    .collect();
                (format!("k{i}"), words.join(" "))
            })
            .collect();
        let a = Index::new(false);
        for (k, v) in &docs {
            a.put(k.as_bytes(), v.as_bytes());
        }
        let b = Index::new(false);
        for i in 0..200 {
            b.put(
                format!("junk{i}").as_bytes(),
                format!("z{i} w{}", 96 - i % 97).as_bytes(),
            );
        }
        for (k, v) in docs.iter().rev() {
            b.put(k.as_bytes(), b"placeholder words");
            b.put(k.as_bytes(), v.as_bytes());
        }
        for i in 0..200 {
            b.delete(format!("junk{i}").as_bytes());
        }
        for q in ["w1", "w3 w50 w7", "w10 w20 w30 w40 w50 w60 w70"] {
            assert_eq!(a.search(q, 0, 1000), b.search(q, 0, 1000), "{q}");
            assert_eq!(
                a.similar_text(q, 0, 1000),
                b.similar_text(q, 0, 1000),
                "{q}"
            );
        }
        for (k, _) in docs.iter().step_by(17) {
            assert_eq!(a.similar_key(k, 0, 1000), b.similar_key(k, 0, 1000), "{k}");
        }
    }

    #[test]
    fn similar_by_text_and_key() {
        let ix = Index::new(false);
        ix.put(b"a", b"red apple pie");
        ix.put(b"b", b"red apple");
        ix.put(b"c", b"green pear");
        let p = ix.similar_key("a", 0, 10).unwrap();
        assert_eq!(keys(&p), ["b"]);
        assert!(ix.similar_key("nope", 0, 10).is_none());
        let p = ix.similar_text("red apple", 0, 10).unwrap();
        assert_eq!(keys(&p), ["b", "a"]);
        assert!((p.hits[0].score - 1.0).abs() < 1e-12);
    }
}
