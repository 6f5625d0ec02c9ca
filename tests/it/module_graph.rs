//! The crate's top-level modules import each other without cycles, so each can be read, tested
//! and changed from the bottom up (a cycle like `upstream → metrics → catalog → routing →
//! upstream` once made the catalog drag the whole server into its unit tests).
//!
//! The graph is read from the source: every `crate::<module>` path (in `use` lines and inline,
//! `use crate::{a, b}` included) in a file under `src/<module>/` or `src/<module>.rs` is an
//! edge `<module> → <other>`. Comments are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a line names through `crate::`.
fn imported(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        // `$crate::` in macros is the crate too; `foo_crate::` is not.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        out.push(ident(&group[j..]).to_owned());
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest).to_owned());
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a path");
        let module = first.strip_suffix(".rs").unwrap_or(first);
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is readable");
        let deps = graph.entry(module.to_owned()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or_default();
            for m in imported(code) {
                if m != module {
                    deps.insert(m);
                }
            }
        }
    }
    graph
}

/// One cycle of `graph`, if it has any (depth-first search for a back edge).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_parser_reads_every_import_form() {
    assert_eq!(imported("use crate::config::Limits;"), ["config"]);
    assert_eq!(
        imported("use crate::{cache::Cache, protocol::{A, B}, self};"),
        ["cache", "protocol"]
    );
    assert_eq!(
        imported("    if !crate::protocol::grammar::x(&crate::routing::y) {"),
        ["protocol", "routing"]
    );
    assert!(imported("use other_crate::x;").is_empty());
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

fn graph(edges: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in edges {
        g.entry((*a).to_owned())
            .or_default()
            .insert((*b).to_owned());
    }
    g
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let graph = module_graph();
    // The graph is really read: the server assembles the app from the catalog and routing.
    for dep in ["catalog", "routing", "cache"] {
        assert!(graph["server"].contains(dep), "server -> {dep}: {graph:?}");
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
    // Config validation and the code applying a rule share it through `protocol`, below both.
    for forbidden in ["credentials", "upstream", "server", "cache"] {
        assert!(
            !graph["config"].contains(forbidden),
            "config -> {forbidden}"
        );
    }
    // The catalog is a leaf below the server: it names neither routing nor what routing uses.
    for forbidden in ["routing", "upstream", "server", "metrics"] {
        assert!(
            !graph["catalog"].contains(forbidden),
            "catalog -> {forbidden}"
        );
    }
}
