//! From a value to index terms (docs/DESIGN.md §7): the text of a value, Unicode
//! word segmentation, lowercasing, and optional English stemming.
//!
//! - Text of a value: if it parses as JSON, its string leaves (object keys
//!   are not text, numbers and booleans are not text); otherwise, if it is
//!   UTF-8, the whole value; otherwise nothing. Each JSON string is
//!   segmented on its own, so words never join across two leaves.
//! - Words are UAX #29 word segments that contain a letter or digit (what
//!   `unicode_segmentation::UnicodeSegmentation::unicode_words` yields), so
//!   `can't`, `3.14` and `snake_case` are one word each.
//! - Lowercase by Unicode rules (`str::to_lowercase`), then, with stemming
//!   on, the Snowball English stemmer.
//! - A term longer than [`MAX_TERM_BYTES`] after all that is dropped: no
//!   query a person types looks for it, and it would cost memory.
//!
//! ASCII text (nearly all of it, and all of the hot path) takes a
//! hand-written scanner that implements the UAX #29 word rules restricted to
//! ASCII (WB5-WB13b) and lowercases in place; everything else goes through
//! `unicode-segmentation`. A unit test checks the two agree on random ASCII
//! strings built from the characters the rules single out.

use unicode_segmentation::UnicodeSegmentation;

/// Longest term kept, in bytes.
pub const MAX_TERM_BYTES: usize = 128;

/// Turns text into terms. Cheap to share; holds the stemmer if stemming is on.
pub struct Analyzer {
    stemmer: Option<rust_stemmers::Stemmer>,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analyzer")
            .field("stemming", &self.stemmer.is_some())
            .finish()
    }
}

impl Analyzer {
    pub fn new(stem: bool) -> Analyzer {
        Analyzer {
            stemmer: stem
                .then(|| rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English)),
        }
    }

    pub fn stemming(&self) -> bool {
        self.stemmer.is_some()
    }

    /// Calls `f` with every term of a stored value, in text order.
    pub fn value_terms(&self, value: &[u8], f: &mut dyn FnMut(&str)) {
        for_each_text(value, &mut |text| self.text_terms(text, f));
    }

    /// Calls `f` with every term of `text` (a query, or one piece of a
    /// value's text), in order.
    pub fn text_terms(&self, text: &str, f: &mut dyn FnMut(&str)) {
        let mut emit = |word: &str| match &self.stemmer {
            Some(s) => {
                let stemmed = s.stem(word);
                if stemmed.len() <= MAX_TERM_BYTES && !stemmed.is_empty() {
                    f(&stemmed);
                }
            }
            None => {
                if word.len() <= MAX_TERM_BYTES {
                    f(word);
                }
            }
        };
        if text.is_ascii() {
            let bytes = text.as_bytes();
            let mut lower = String::new();
            ascii_words(bytes, |start, end| {
                let word = &text[start..end];
                if word.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower.clear();
                    lower.push_str(word);
                    lower.make_ascii_lowercase();
                    emit(&lower);
                } else {
                    emit(word);
                }
            });
        } else {
            for word in text.unicode_words() {
                if word.chars().any(char::is_uppercase) {
                    emit(&word.to_lowercase());
                } else {
                    emit(word);
                }
            }
        }
    }
}

/// Calls `f` with each piece of text in `value` (see the module docs).
pub fn for_each_text(value: &[u8], f: &mut dyn FnMut(&str)) {
    if looks_like_json(value) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(value) {
            string_leaves(&v, f);
            return;
        }
    }
    if let Ok(s) = std::str::from_utf8(value) {
        f(s);
    }
}

/// Whether `value` can possibly be JSON: a cheap test that keeps ordinary
/// prose away from the JSON parser.
fn looks_like_json(value: &[u8]) -> bool {
    let first = value
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    matches!(
        first,
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n')
    )
}

fn string_leaves(v: &serde_json::Value, f: &mut dyn FnMut(&str)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| string_leaves(x, f)),
        serde_json::Value::Object(o) => o.values().for_each(|x| string_leaves(x, f)),
        _ => {}
    }
}

/// Word_Break classes of the ASCII characters that matter (UAX #29).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wb {
    /// ALetter: A-Z, a-z.
    Letter,
    /// Numeric: 0-9.
    Digit,
    /// ExtendNumLet: `_`.
    Under,
    /// MidLetter: `:`.
    MidLetter,
    /// MidNumLet and Single_Quote: `.` and `'`.
    MidNumLet,
    /// MidNum: `,` and `;`.
    MidNum,
    Other,
}

fn wb(b: u8) -> Wb {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Wb::Letter,
        b'0'..=b'9' => Wb::Digit,
        b'_' => Wb::Under,
        b':' => Wb::MidLetter,
        b'.' | b'\'' => Wb::MidNumLet,
        b',' | b';' => Wb::MidNum,
        _ => Wb::Other,
    }
}

/// UAX #29 words of ASCII text, as byte ranges: runs of letters, digits and
/// `_` (WB5, WB8-WB10, WB13a/b), joined across one `:`, `.` or `'` between
/// letters (WB6/7) and one `,`, `;`, `.` or `'` between digits (WB11/12);
/// segments without a letter or digit (`__`) are not words.
pub fn ascii_words(s: &[u8], mut f: impl FnMut(usize, usize)) {
    let n = s.len();
    let mut i = 0;
    while i < n {
        let c = wb(s[i]);
        if !matches!(c, Wb::Letter | Wb::Digit | Wb::Under) {
            i += 1;
            continue;
        }
        let start = i;
        let mut alnum = c != Wb::Under;
        let mut prev = c;
        i += 1;
        while i < n {
            let c = wb(s[i]);
            match c {
                Wb::Letter | Wb::Digit | Wb::Under => {
                    alnum |= c != Wb::Under;
                    prev = c;
                    i += 1;
                }
                Wb::MidLetter | Wb::MidNumLet | Wb::MidNum if i + 1 < n => {
                    let next = wb(s[i + 1]);
                    let letters = prev == Wb::Letter && next == Wb::Letter && c != Wb::MidNum;
                    let digits = prev == Wb::Digit && next == Wb::Digit && c != Wb::MidLetter;
                    if !(letters || digits) {
                        break;
                    }
                    prev = next;
                    i += 2;
                }
                _ => break,
            }
        }
        if alnum {
            f(start, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn terms(a: &Analyzer, value: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        a.value_terms(value, &mut |t| out.push(t.to_string()));
        out
    }

    fn ascii(s: &str) -> Vec<&str> {
        let mut out = Vec::new();
        ascii_words(s.as_bytes(), |a, b| out.push(&s[a..b]));
        out
    }

    #[test]
    fn words_lowercase_and_json_leaves() {
        let a = Analyzer::new(false);
        assert_eq!(
            terms(&a, b"Hello, World! It's 3.14 o'clock; snake_case"),
            ["hello", "world", "it's", "3.14", "o'clock", "snake_case"]
        );
        assert_eq!(
            terms(
                &a,
                br#"{"title": "Red Fox", "n": 3, "tags": ["Quick", {"x": "brown"}], "ok": true}"#
            ),
            // serde_json walks object members in key order.
            ["quick", "brown", "red", "fox"]
        );
        // Valid JSON without strings has no text; a JSON-looking prefix of prose is prose.
        assert!(terms(&a, b"42").is_empty());
        assert_eq!(terms(&a, b"true story"), ["true", "story"]);
        assert!(terms(&a, &[0xff, 0xfe, b'a']).is_empty());
        assert_eq!(
            terms(&a, "Straße ÉTÉ über".as_bytes()),
            ["straße", "été", "über"]
        );
        let long = "x".repeat(MAX_TERM_BYTES + 1);
        assert_eq!(terms(&a, format!("a {long} b").as_bytes()), ["a", "b"]);
    }

    #[test]
    fn stemming_is_optional() {
        let a = Analyzer::new(true);
        assert_eq!(terms(&a, b"Running runs"), ["run", "run"]);
        assert_eq!(terms(&Analyzer::new(false), b"Running"), ["running"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The ASCII fast path segments exactly as `unicode-segmentation`.
        #[test]
        fn ascii_scanner_matches_uax29(s in "[aZ09_.':,; \"\\-\r\n\t!]{0,24}") {
            let want: Vec<&str> = s.unicode_words().collect();
            prop_assert_eq!(ascii(&s), want);
        }
    }
}
