//! Proves that kvsup's modules depend one way: every `crate::x` path in a
//! source file (outside comments and `#[cfg(test)]` code) names a module of
//! a lower layer than the file's own, and every module is in a layer.
//! The layers are those of `src/lib.rs`'s docs and ARCHITECTURE.md.

use std::path::{Path, PathBuf};

/// kvsup's layers, bottom first. A module may use the modules of the
/// layers below its own, never its own layer's or a higher one's.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "decisions",
        &["manifest", "election", "membership", "auth", "dashboard"],
    ),
    (
        "effects",
        &[
            "process",
            "token_file",
            "creds",
            "metrics",
            "logging",
            "backup",
        ],
    ),
    ("plans", &["launch", "plan"]),
    ("daemon", &["daemon"]),
    ("interfaces", &["http", "watch", "render", "chaos"]),
    ("wiring", &["server"]),
];

/// The crate roots (`lib.rs` declares the modules, `main.rs` is the
/// command): above every layer, so they are not checked.
const ROOTS: &[&str] = &["lib", "main"];

/// `(index, name)` of the layer of `module`.
fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (_, modules))| modules.contains(&module))
        .map(|(i, (name, _))| (i, *name))
}

/// The top-level module a source file belongs to: `daemon/health.rs` and
/// `daemon/mod.rs` are both `daemon`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let first = rel.components().next().map_or_else(String::new, |c| {
        c.as_os_str().to_string_lossy().into_owned()
    });
    first.trim_end_matches(".rs").to_string()
}

/// `text` without comments and without everything from its first
/// `#[cfg(test)]` on (test modules close kvsup's files).
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named by the `crate::` paths of `code`, including
/// those in groups (`use crate::{daemon::Sup, manifest::Mode};`).
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `kvcrate::`, not a path of this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(group_heads(group));
        } else {
            out.push(ident(rest).to_string());
        }
    }
    out
}

/// The first identifier of each item of a `{...}` group (`group` starts
/// after the brace).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_item = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item = true,
            c if at_item && !c.is_whitespace() => {
                heads.push(ident(&group[i..]).to_string());
                at_item = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every way `files` (path, text) break the layer rule, one line each.
fn violations(src: &Path, files: &[(PathBuf, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in files {
        let module = module_of(src, path);
        // Named from the crate's directory: `src/daemon/health.rs`.
        let file = path
            .strip_prefix(src.parent().unwrap_or(src))
            .unwrap_or(path);
        if ROOTS.contains(&module.as_str()) {
            continue;
        }
        let Some((rank, layer)) = layer_of(&module) else {
            out.push(format!(
                "{}: module `{module}` is in no layer; add it to LAYERS (and to the docs)",
                file.display()
            ));
            continue;
        };
        for used in crate_paths(&code_of(text)) {
            if used == module || used == "self" {
                continue;
            }
            match layer_of(&used) {
                Some((r, _)) if r < rank => {}
                Some((_, used_layer)) => out.push(format!(
                    "{}: `{module}` ({layer}) uses crate::{used} ({used_layer}); \
                     a module may use only the layers below its own",
                    file.display()
                )),
                None => out.push(format!(
                    "{}: `{module}` ({layer}) uses crate::{used}, which is in no layer",
                    file.display()
                )),
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            out.push((p, text));
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() >= 10, "found only {} files", files.len());
    let bad = violations(&src, &files);
    assert!(bad.is_empty(), "layer rule broken:\n{}", bad.join("\n"));
}

#[test]
fn a_use_of_a_higher_layer_or_of_no_layer_is_caught() {
    let src = Path::new("/k/src");
    let file = |name: &str, text: &str| (src.join(name), text.to_string());
    let files = [
        file("manifest.rs", "use crate::daemon::Sup;\n"),
        file("http.rs", "use crate::{manifest::Mode, watch};\n"),
        file("daemon/health.rs", "fn f() { crate::server::run(); }\n"),
        file("extra.rs", "\n"),
        // Allowed: lower layers, comments, tests, the crate roots.
        file(
            "watch.rs",
            "use crate::daemon::{self, Sup};\n// crate::server\n#[cfg(test)]\nuse crate::server;\n",
        ),
        file("main.rs", "use kvsup::server;\n"),
    ];
    let bad = violations(src, &files);
    let expect = [
        "src/manifest.rs: `manifest` (decisions) uses crate::daemon (daemon); \
         a module may use only the layers below its own",
        "src/http.rs: `http` (interfaces) uses crate::watch (interfaces); \
         a module may use only the layers below its own",
        "src/daemon/health.rs: `daemon` (daemon) uses crate::server (wiring); \
         a module may use only the layers below its own",
        "src/extra.rs: module `extra` is in no layer; add it to LAYERS (and to the docs)",
    ];
    assert_eq!(bad, expect);
}
