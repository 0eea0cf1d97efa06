//! Who may do what: bearer tokens and the roles they carry.
//!
//! The token file (`--auth-file`) names each token by the SHA-256 of its
//! secret, never the secret itself, with the roles it holds: `read` and
//! `write` on key prefixes, `admin` (promote, transfer, mode, pause,
//! debug), `metrics`. This module parses that file and decides each
//! request's [`Action`] against the token's [`Grant`]; it moves no bytes
//! and knows no HTTP. Peers never use tokens: they prove who they are by
//! certificate.
//!
//! Tokens are random secrets of at least 128 bits, so one SHA-256 suffices
//! to store them (a slow password hash buys nothing against a guess of 2^128),
//! and looking a presented token up by its hash compares no secret byte by
//! byte.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::{prefix_end, KeyRange};

/// Largest token file read.
pub const MAX_AUTH_FILE_BYTES: usize = 1 << 20;
/// Most tokens in one file.
pub const MAX_TOKENS: usize = 10_000;
/// Most prefixes of one role of one token.
pub const MAX_PREFIXES: usize = 256;
/// Longest token name (it appears in the audit log).
pub const MAX_NAME_BYTES: usize = 64;
/// Longest prefix: a key's longest.
pub const MAX_PREFIX_BYTES: usize = 1024;

/// What one token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// For the audit log and error messages; never the secret.
    pub name: String,
    read: Vec<Vec<u8>>,
    write: Vec<Vec<u8>>,
    admin: bool,
    metrics: bool,
}

/// One request's need, in the terms the roles speak of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Liveness, readiness, the API description: no token needed.
    Open,
    /// Status: any valid token.
    Status,
    /// A read of one key (GET, HEAD, a transaction's compare or get).
    Read(&'a [u8]),
    /// A read of every key in a range, as one answer (a transaction's range
    /// read): the whole range must be readable.
    ReadAll(&'a KeyRange),
    /// A range page, a watch, search hits: answered filtered to the keys
    /// the token may read ([`Grant::may_read`]); refused only when no key
    /// of the range could be.
    ReadFiltered(&'a KeyRange),
    /// A write of one key (PUT, DELETE, a bulk item, a transaction's put).
    Write(&'a [u8]),
    /// A delete of every key under a prefix: the token must be able to
    /// write every key there could be.
    WritePrefix(&'a [u8]),
    /// Granting, keeping alive or reading a lease: any write role. A
    /// revoke also deletes the lease's keys, each checked as a write.
    Lease,
    /// Promote, transfer, pause and resume, mode switch, debug routes.
    Admin,
    /// `GET /metrics`.
    Metrics,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one the file does not hold: 401 `unauthenticated`.
    Unauthenticated,
    /// A valid token without the role: 403 `permission_denied`, naming
    /// the token and what it lacks.
    Forbidden { token: String, lacks: String },
}

impl Grant {
    /// Whether the token may read `key`.
    pub fn may_read(&self, key: &[u8]) -> bool {
        under_any(&self.read, key)
    }

    pub fn may_write(&self, key: &[u8]) -> bool {
        under_any(&self.write, key)
    }

    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether the token may read every key (reads need no filter).
    pub fn reads_everything(&self) -> bool {
        self.read.iter().any(|p| p.is_empty())
    }

    /// The parts of `range` the token may read, in key order and disjoint:
    /// a filtered read is the union of reads of these.
    pub fn readable_parts(&self, range: &KeyRange) -> Vec<KeyRange> {
        self.read
            .iter()
            .filter_map(|p| intersect(p, range))
            .collect()
    }

    /// Decides `action` for this token.
    pub fn check(&self, action: Action<'_>) -> Result<(), Denied> {
        let allowed = match action {
            Action::Open | Action::Status => true,
            Action::Read(key) => self.may_read(key),
            Action::ReadAll(range) => self.read.iter().any(|p| covers(p, range)),
            Action::ReadFiltered(range) => self.read.iter().any(|p| overlaps(p, range)),
            Action::Write(key) => self.may_write(key),
            Action::WritePrefix(prefix) => self.write.iter().any(|p| prefix.starts_with(p)),
            Action::Lease => !self.write.is_empty(),
            Action::Admin => self.admin,
            Action::Metrics => self.metrics,
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden {
                token: self.name.clone(),
                lacks: lacks(action),
            })
        }
    }
}

/// Decides `action` for the token a request presented (`None`: none, or
/// one the file does not hold).
pub fn decide(grant: Option<&Grant>, action: Action<'_>) -> Result<(), Denied> {
    match (grant, action) {
        (_, Action::Open) => Ok(()),
        (None, _) => Err(Denied::Unauthenticated),
        (Some(g), a) => g.check(a),
    }
}

/// What a refused action needed, in words for the error body.
fn lacks(action: Action<'_>) -> String {
    let key = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    match action {
        Action::Open | Action::Status => "nothing".into(),
        Action::Read(k) => format!("read of key {:?}", key(k)),
        Action::ReadAll(r) | Action::ReadFiltered(r) => format!(
            "read of the range [{:?}, {})",
            key(&r.start),
            r.end
                .as_ref()
                .map_or("the end".into(), |e| format!("{:?}", key(e)))
        ),
        Action::Write(k) => format!("write of key {:?}", key(k)),
        Action::WritePrefix(p) => format!("write of every key under {:?}", key(p)),
        Action::Lease => "a write role (leases)".into(),
        Action::Admin => "the admin role".into(),
        Action::Metrics => "the metrics role".into(),
    }
}

fn under_any(prefixes: &[Vec<u8>], key: &[u8]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p))
}

/// Whether every key of `range` starts with `prefix`.
fn covers(prefix: &[u8], range: &KeyRange) -> bool {
    // Keys under the prefix run from the prefix itself to its end.
    if range.start[..] < prefix[..] {
        return false;
    }
    match (prefix_end(prefix), &range.end) {
        // The empty prefix (or all 0xFF): runs to the end of the key space.
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pe), Some(e)) => e[..] <= pe[..],
    }
}

/// Whether some key of `range` starts with `prefix`.
fn overlaps(prefix: &[u8], range: &KeyRange) -> bool {
    let after_start = prefix_end(prefix).is_none_or(|pe| range.start[..] < pe[..]);
    let before_end = range
        .end
        .as_ref()
        .is_none_or(|e| prefix < &e[..] && range.start[..] < e[..]);
    // Keys under the prefix run from the prefix itself to its end.
    after_start && before_end
}

/// The keys of `range` under `prefix`, if any.
fn intersect(prefix: &[u8], range: &KeyRange) -> Option<KeyRange> {
    if !overlaps(prefix, range) {
        return None;
    }
    let start = range
        .start
        .clone()
        .max(bytes::Bytes::copy_from_slice(prefix));
    let end = match (prefix_end(prefix), &range.end) {
        (None, e) => e.clone(),
        (Some(pe), None) => Some(bytes::Bytes::from(pe)),
        (Some(pe), Some(e)) => Some(e.clone().min(bytes::Bytes::from(pe))),
    };
    Some(KeyRange { start, end })
}

/// `prefixes` sorted, without any that another covers: disjoint, so the
/// parts of a range under them never count a key twice.
fn disjoint(mut prefixes: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    prefixes.sort();
    prefixes.dedup();
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        // Sorted: a prefix covering `p` is the last one kept, if any.
        if out.last().is_none_or(|q| !p.starts_with(q)) {
            out.push(p);
        }
    }
    out
}

/// The tokens of one `--auth-file`, by the hash of their secret.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Arc<Grant>>,
}

impl Tokens {
    /// Parses a token file; the error names the entry and field at fault.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        if text.len() > MAX_AUTH_FILE_BYTES {
            return Err(format!(
                "{} bytes, more than the {MAX_AUTH_FILE_BYTES} a token file may hold",
                text.len()
            ));
        }
        let file: FileShape = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if file.tokens.len() > MAX_TOKENS {
            return Err(format!(
                "{} tokens, more than the {MAX_TOKENS} a file may hold",
                file.tokens.len()
            ));
        }
        let mut by_hash = HashMap::with_capacity(file.tokens.len());
        let mut names = HashSet::new();
        for (i, entry) in file.tokens.into_iter().enumerate() {
            let name = entry.name.clone();
            let at = |what: String| format!("tokens[{i}] ({name:?}): {what}");
            let hash = entry.checked_hash().map_err(at)?;
            if !names.insert(entry.name.clone()) {
                return Err(at("a second token of this name".into()));
            }
            let grant = entry.grant().map_err(at)?;
            if by_hash.insert(hash, Arc::new(grant)).is_some() {
                return Err(at("the same sha256 as an earlier token".into()));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// The grant of a presented secret, if the file holds it.
    pub fn identify(&self, secret: &str) -> Option<&Arc<Grant>> {
        self.by_hash.get(&digest(secret))
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The hex SHA-256 of a token's secret, as the token file holds it.
pub fn token_hash(secret: &str) -> String {
    digest(secret).iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    sha256: String,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    metrics: bool,
}

impl Entry {
    fn checked_hash(&self) -> Result<[u8; 32], String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_BYTES
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(format!(
                "name must be 1 to {MAX_NAME_BYTES} of A-Z a-z 0-9 . _ -"
            ));
        }
        parse_hex32(&self.sha256)
            .ok_or_else(|| "sha256 must be 64 hex digits (the token's SHA-256)".into())
    }

    fn grant(self) -> Result<Grant, String> {
        let prefixes = |role: &str, list: Vec<String>| -> Result<Vec<Vec<u8>>, String> {
            if list.len() > MAX_PREFIXES {
                return Err(format!("{role}: more than {MAX_PREFIXES} prefixes"));
            }
            list.into_iter()
                .map(|p| {
                    if p.len() > MAX_PREFIX_BYTES || p.contains('\0') {
                        Err(format!(
                            "{role}: prefix {p:?} is longer than a key or holds a NUL"
                        ))
                    } else {
                        Ok(p.into_bytes())
                    }
                })
                .collect()
        };
        Ok(Grant {
            read: disjoint(prefixes("read", self.read)?),
            write: disjoint(prefixes("write", self.write)?),
            admin: self.admin,
            metrics: self.metrics,
            name: self.name,
        })
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn file(entries: &str) -> String {
        format!(r#"{{"tokens": [{entries}]}}"#)
    }

    fn entry(name: &str, secret: &str, roles: &str) -> String {
        format!(
            r#"{{"name": "{name}", "sha256": "{}"{roles}}}"#,
            token_hash(secret)
        )
    }

    fn range(start: &str, end: Option<&str>) -> KeyRange {
        KeyRange {
            start: Bytes::copy_from_slice(start.as_bytes()),
            end: end.map(|e| Bytes::copy_from_slice(e.as_bytes())),
        }
    }

    fn app() -> Grant {
        let text = file(&entry(
            "app",
            "s3cret",
            r#", "read": ["app/", "shared/"], "write": ["app/"]"#,
        ));
        let tokens = Tokens::parse(&text).unwrap();
        tokens.identify("s3cret").unwrap().as_ref().clone()
    }

    #[test]
    fn a_secret_is_known_by_its_hash_only() {
        let text = file(&entry("app", "s3cret", ""));
        assert!(!text.contains("s3cret"));
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.identify("s3cret").unwrap().name, "app");
        assert!(tokens.identify("s3cret ").is_none());
        assert!(tokens.identify("").is_none());
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keys_are_read_and_written_only_under_the_roles_prefixes() {
        let g = app();
        assert_eq!(g.check(Action::Read(b"app/x")), Ok(()));
        assert_eq!(g.check(Action::Read(b"shared/y")), Ok(()));
        assert!(g.check(Action::Read(b"other/z")).is_err());
        assert!(g.check(Action::Read(b"app")).is_err(), "the prefix is app/");
        assert_eq!(g.check(Action::Write(b"app/x")), Ok(()));
        assert!(g.check(Action::Write(b"shared/y")).is_err());
        assert!(g.check(Action::Admin).is_err());
        assert!(g.check(Action::Metrics).is_err());
        assert_eq!(g.check(Action::Lease), Ok(()));
        assert_eq!(g.check(Action::Status), Ok(()));
    }

    #[test]
    fn a_prefix_delete_needs_write_of_every_key_it_could_remove() {
        let g = app();
        assert_eq!(g.check(Action::WritePrefix(b"app/")), Ok(()));
        assert_eq!(g.check(Action::WritePrefix(b"app/sub/")), Ok(()));
        assert!(g.check(Action::WritePrefix(b"app")).is_err(), "app2/ too");
        assert!(g.check(Action::WritePrefix(b"")).is_err());
    }

    #[test]
    fn ranges_are_whole_when_covered_and_filtered_when_they_overlap() {
        let g = app();
        let inside = range("app/a", Some("app/b"));
        let whole_prefix = range("app/", Some("app0"));
        let across = range("a", Some("b"));
        let elsewhere = range("b", Some("c"));
        let to_the_end = range("app/", None);
        assert_eq!(g.check(Action::ReadAll(&inside)), Ok(()));
        assert_eq!(g.check(Action::ReadAll(&whole_prefix)), Ok(()));
        assert!(g.check(Action::ReadAll(&across)).is_err());
        assert!(g.check(Action::ReadAll(&to_the_end)).is_err());
        assert_eq!(g.check(Action::ReadFiltered(&across)), Ok(()));
        assert_eq!(g.check(Action::ReadFiltered(&to_the_end)), Ok(()));
        assert!(g.check(Action::ReadFiltered(&elsewhere)).is_err());
        // A range ending exactly where the prefix starts holds none of it.
        assert!(g
            .check(Action::ReadFiltered(&range("a", Some("app/"))))
            .is_err());
        assert_eq!(
            g.check(Action::ReadFiltered(&range("a", Some("app/\0")))),
            Ok(())
        );
    }

    #[test]
    fn the_empty_prefix_is_every_key() {
        let text = file(&entry(
            "ops",
            "t",
            r#", "read": [""], "write": [""], "admin": true, "metrics": true"#,
        ));
        let tokens = Tokens::parse(&text).unwrap();
        let g = tokens.identify("t").unwrap();
        let all = range("", None);
        assert_eq!(g.check(Action::ReadAll(&all)), Ok(()));
        assert_eq!(g.check(Action::WritePrefix(b"")), Ok(()));
        assert_eq!(g.check(Action::Admin), Ok(()));
        assert_eq!(g.check(Action::Metrics), Ok(()));
        assert!(g.is_admin());
    }

    #[test]
    fn no_token_is_401_and_a_missing_role_403_naming_the_token() {
        let g = app();
        assert_eq!(decide(None, Action::Open), Ok(()));
        assert_eq!(decide(None, Action::Status), Err(Denied::Unauthenticated));
        assert_eq!(
            decide(None, Action::Read(b"app/x")),
            Err(Denied::Unauthenticated)
        );
        match decide(Some(&g), Action::Admin) {
            Err(Denied::Forbidden { token, lacks }) => {
                assert_eq!(token, "app");
                assert_eq!(lacks, "the admin role");
            }
            other => panic!("{other:?}"),
        }
        match decide(Some(&g), Action::Write(b"other/k")) {
            Err(Denied::Forbidden { lacks, .. }) => assert!(lacks.contains("other/k")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_entry_and_field() {
        let bad = |text: &str, says: &str| {
            let e = Tokens::parse(text).unwrap_err();
            assert!(e.contains(says), "{e:?} does not say {says:?}");
        };
        bad("", "EOF");
        bad(r#"{"tokens": [], "x": 1}"#, "unknown field");
        bad(
            &file(r#"{"name": "a", "sha256": "00", "read": []}"#),
            "tokens[0] (\"a\"): sha256 must be 64 hex",
        );
        bad(
            &file(&format!(
                r#"{{"name": "a", "sha256": "{}"}}"#,
                "zz".repeat(32)
            )),
            "64 hex",
        );
        bad(&file(&entry("", "s", "")), "name must be");
        bad(&file(&entry("a b", "s", "")), "name must be");
        bad(
            &file(&format!("{},{}", entry("a", "s", ""), entry("a", "t", ""))),
            "tokens[1] (\"a\"): a second token of this name",
        );
        bad(
            &file(&format!("{},{}", entry("a", "s", ""), entry("b", "s", ""))),
            "the same sha256",
        );
        bad(&file(&entry("a", "s", r#", "roles": 1"#)), "unknown field");
        bad(&file(&entry("a", "s", r#", "read": ["x\u0000"]"#)), "NUL");
        let many: Vec<String> = (0..=MAX_PREFIXES).map(|i| format!("\"p{i}\"")).collect();
        bad(
            &file(&entry(
                "a",
                "s",
                &format!(r#", "write": [{}]"#, many.join(",")),
            )),
            "write: more than",
        );
        bad(&" ".repeat(MAX_AUTH_FILE_BYTES + 1), "more than");
    }

    /// Every key of at most four letters over `abc` and a letter below and
    /// one above them (the ranges and prefixes are made of `abc` only).
    fn keys() -> Vec<Vec<u8>> {
        let mut all = vec![Vec::new()];
        let mut level = vec![Vec::new()];
        for _ in 0..4 {
            level = level
                .iter()
                .flat_map(|k: &Vec<u8>| {
                    b"0abcd".iter().map(move |c| [k.as_slice(), &[*c]].concat())
                })
                .collect();
            all.extend(level.iter().cloned());
        }
        all.retain(|k| !k.is_empty());
        all
    }

    proptest::proptest! {
        /// `covers` and `overlaps` against every key there is (short ones).
        #[test]
        fn whole_and_filtered_ranges_agree_with_every_key(
            prefix in "[abc]{0,2}",
            start in "[abc]{0,3}",
            end in proptest::option::of("[abc]{0,3}"),
        ) {
            let r = range(&start, end.as_deref());
            let inside: Vec<Vec<u8>> = keys()
                .into_iter()
                .filter(|k| r.contains(k))
                .collect();
            let under = |k: &Vec<u8>| k.starts_with(prefix.as_bytes());
            // `covers` may say no for an empty range; never yes wrongly.
            if covers(prefix.as_bytes(), &r) {
                proptest::prop_assert!(inside.iter().all(under));
            } else {
                proptest::prop_assert!(inside.is_empty() || !inside.iter().all(under) || end.is_none());
            }
            proptest::prop_assert_eq!(overlaps(prefix.as_bytes(), &r), inside.iter().any(under));
        }

        /// A filtered read's parts hold exactly the readable keys of the
        /// range, each once.
        #[test]
        fn readable_parts_hold_each_readable_key_of_the_range_once(
            read in proptest::collection::vec("[abc]{0,2}", 0..4),
            start in "[abc]{0,3}",
            end in proptest::option::of("[abc]{0,3}"),
        ) {
            let g = Grant {
                name: "t".into(),
                read: disjoint(read.iter().map(|p| p.as_bytes().to_vec()).collect()),
                write: Vec::new(),
                admin: false,
                metrics: false,
            };
            let r = range(&start, end.as_deref());
            let parts = g.readable_parts(&r);
            for k in keys() {
                let want = r.contains(&k) && read.iter().any(|p| k.starts_with(p.as_bytes()));
                let held = parts.iter().filter(|p| p.contains(&k)).count();
                proptest::prop_assert_eq!(held, usize::from(want), "key {:?}", k);
                proptest::prop_assert_eq!(g.may_read(&k), read.iter().any(|p| k.starts_with(p.as_bytes())));
            }
        }
    }

    #[test]
    fn an_empty_file_holds_no_token() {
        let tokens = Tokens::parse(r#"{"tokens": []}"#).unwrap();
        assert!(tokens.is_empty());
        assert_eq!(tokens.len(), 0);
    }
}
