//! Proves that kvd's modules depend on each other in one direction only:
//! every `crate::...` path (in `use crate::a::b;`, `use crate::{a, b};`,
//! and paths written out in code) and every `super::...` path of every
//! non-test source file names a module of its own layer or of a layer it
//! may use, per [`ALLOWED`]. Test code (`#[cfg(test)]` items) and comments
//! are left out.
//!
//! The layers, bottom up (ARCHITECTURE.md states the same table):
//!
//! | layer | modules | may use |
//! |---|---|---|
//! | model | `model`, `auth`, `replication::rules`, `replication::config`, `masterless::rules`, `masterless::hlc` | model |
//! | base | `index`, `metrics`, `tasks` | base |
//! | storage | `storage::*` | model, base |
//! | replication | `replication` (the runtime: `replication::node`) | storage, model, base |
//! | masterless | `masterless` (the runtime: `masterless::node`) | storage, model, base |
//! | node | `node::*` | replication, masterless, storage, model, base |
//! | api | `api::*` | node and everything below |
//! | wiring | `server`, `config`, `logging`, the crate root | everything |

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Module path prefix -> layer; the longest matching prefix wins.
const LAYER_OF: &[(&str, &str)] = &[
    ("model", "model"),
    ("auth", "model"),
    ("replication::rules", "model"),
    ("replication::config", "model"),
    ("masterless::rules", "model"),
    ("masterless::hlc", "model"),
    ("index", "base"),
    ("metrics", "base"),
    ("tasks", "base"),
    ("peer_http", "base"),
    ("storage", "storage"),
    ("replication", "replication"),
    ("masterless", "masterless"),
    ("node", "node"),
    ("api", "api"),
    ("server", "wiring"),
    ("config", "wiring"),
    ("logging", "wiring"),
    ("", "wiring"),
];

/// Layer -> the layers its modules may name (its own included).
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &["model"]),
    ("base", &["base"]),
    ("storage", &["storage", "model", "base"]),
    ("replication", &["replication", "storage", "model", "base"]),
    ("masterless", &["masterless", "storage", "model", "base"]),
    (
        "node",
        &[
            "node",
            "replication",
            "masterless",
            "storage",
            "model",
            "base",
        ],
    ),
    (
        "api",
        &[
            "api",
            "node",
            "replication",
            "masterless",
            "storage",
            "model",
            "base",
        ],
    ),
    (
        "wiring",
        &[
            "wiring",
            "api",
            "node",
            "replication",
            "masterless",
            "storage",
            "model",
            "base",
        ],
    ),
];

fn layer_of(module: &[String]) -> &'static str {
    let joined = module.join("::");
    LAYER_OF
        .iter()
        .filter(|(prefix, _)| {
            prefix.is_empty() || joined == *prefix || joined.starts_with(&format!("{prefix}::"))
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, layer)| *layer)
        .expect("the empty prefix matches every module")
}

fn allowed(layer: &str) -> &'static [&'static str] {
    ALLOWED
        .iter()
        .find(|(l, _)| *l == layer)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("layer {layer} has no row in ALLOWED"))
}

/// The module path of a source file under `src/` (`storage/mod.rs` is
/// `storage`, `lib.rs` and `main.rs` the crate root).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// `text` without comments, string literals' contents and `#[cfg(test)]`
/// items (a `use` up to its `;`, anything else up to its matching `}`).
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    let mut text = out;
    while let Some(at) = text.find("#[cfg(test)]") {
        let rest = &text[at..];
        let end = match (rest.find(';'), rest.find('{')) {
            (Some(semi), Some(brace)) if semi < brace => at + semi + 1,
            (_, Some(brace)) => at + matching_brace(rest, brace),
            (Some(semi), None) => at + semi + 1,
            (None, None) => text.len(),
        };
        text.replace_range(at..end, "");
    }
    text
}

/// Offset just past the `}` closing the `{` at `open`.
fn matching_brace(s: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// Expands the body of a `use` tree (`a::{b, c::{d}}`) into paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        let path: Vec<String> = tree
            .split("::")
            .filter(|s| !s.is_empty())
            .map(|s| s.split(" as ").next().unwrap_or(s).to_string())
            .collect();
        return vec![path];
    };
    let prefix: Vec<String> = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let inner = &tree[open + 1..tree.len().saturating_sub(1)];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty() && *p != "self")
        .flat_map(expand)
        .map(|p| prefix.iter().cloned().chain(p).collect())
        .chain(std::iter::once(prefix.clone()))
        .collect()
}

/// Every module path the source of `module` names: `crate::` paths and
/// `use` trees, and `super::` paths resolved from `module`.
fn named_paths(module: &[String], code: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(root) {
            let at = from + i;
            from = at + root.len();
            let b = at.checked_sub(1).map(|i| bytes[i]);
            if b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue;
            }
            // `super` names the parent module (in `a/mod.rs` as in `a.rs`);
            // each further `super::` one more level up.
            let mut base = Vec::new();
            if root == "super::" {
                base = module[..module.len().saturating_sub(1)].to_vec();
                while code[from..].starts_with("super::") {
                    base.pop();
                    from += "super::".len();
                }
            }
            let rest = &code[from..];
            let end = if rest.starts_with('{') {
                matching_brace(rest, 0)
            } else {
                let mut end = 0;
                for (j, c) in rest.char_indices() {
                    if c.is_alphanumeric() || c == '_' || c == ':' {
                        end = j + c.len_utf8();
                    } else if c == '{' && rest[..j].ends_with("::") {
                        end = matching_brace(rest, j);
                        break;
                    } else {
                        break;
                    }
                }
                end
            };
            for p in expand(&rest[..end]) {
                let full: Vec<String> = base.iter().cloned().chain(p).collect();
                if !full.is_empty() {
                    out.insert(full);
                }
            }
        }
    }
    out
}

/// One import that breaks the layer rule, described.
fn violations(module: &[String], source: &str, file: &str) -> Vec<String> {
    let layer = layer_of(module);
    let may = allowed(layer);
    named_paths(module, &strip(source))
        .into_iter()
        .filter_map(|path| {
            let target = layer_of(&path);
            (!may.contains(&target)).then(|| {
                format!(
                    "{file} (layer {layer}) names crate::{} (layer {target}); \
                     {layer} may use only: {}",
                    path.join("::"),
                    may.join(", ")
                )
            })
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading kvd/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_kvd_module_uses_only_its_own_layer_and_those_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    assert!(files.len() > 30, "found only {} source files", files.len());
    let mut broken = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let module = module_of(rel);
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let shown = format!("kvd/src/{}", rel.display());
        broken.extend(violations(&module, &text, &shown));
    }
    assert!(
        broken.is_empty(),
        "imports against the layer rule:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_sees_every_form_of_a_higher_layer_import() {
    let storage = ["storage".to_string(), "wal".to_string()];
    for source in [
        "use crate::api::ApiError;",
        "use crate::{model::Op, node::Node};",
        "use crate::{\n    model::{Op, Record},\n    node::{self, Node},\n};",
        "fn f() { let _ = crate::server::run; }",
        "use super::super::node::Node;",
    ] {
        let found = violations(&storage, source, "x.rs");
        assert!(!found.is_empty(), "{source:?} was not caught");
        for f in &found {
            assert!(
                f.contains("(layer node)")
                    || f.contains("(layer api)")
                    || f.contains("(layer wiring)"),
                "{f}"
            );
            assert!(
                f.contains("storage may use only: storage, model, base"),
                "{f}"
            );
        }
    }
    for fine in [
        "use crate::model::{Op, Record};",
        "use super::fs::Fs; use crate::index::Index;",
        "// use crate::api::ApiError;",
        "#[cfg(test)]\nmod tests {\n    use crate::api::ApiError;\n}",
        "#[cfg(test)]\nuse crate::node::Node;\nuse crate::model::Op;",
    ] {
        assert_eq!(
            violations(&storage, fine, "x.rs"),
            Vec::<String>::new(),
            "{fine:?}"
        );
    }
}

#[test]
fn every_layer_may_use_itself_and_none_uses_one_above_it() {
    let order = [
        "model",
        "base",
        "storage",
        "replication",
        "masterless",
        "node",
        "api",
        "wiring",
    ];
    for (layer, may) in ALLOWED {
        assert!(may.contains(layer), "{layer} may use itself");
        let rank = order.iter().position(|l| l == layer).expect("ranked");
        for used in *may {
            let used_rank = order.iter().position(|l| l == used).expect("ranked");
            assert!(
                used_rank <= rank,
                "{layer} may use {used}, which is above it"
            );
        }
    }
    // The two runtimes sit side by side: neither may use the other.
    assert!(!allowed("replication").contains(&"masterless"));
    assert!(!allowed("masterless").contains(&"replication"));
}
