//! The files source: every `*.yaml`/`*.yml`/`*.json` file in one directory (multi-document
//! YAML, `kind: List` expanded), published as one object set and re-published whenever a file
//! appears, disappears or changes. Polling the files' sizes and mtimes is simple and works for
//! ConfigMap-mounted directories whose symlinks are swapped atomically.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use serde::Deserialize as _;
use serde_json::Value;

use super::Catalog;

/// The source name the files source publishes under.
pub(super) const SOURCE: &str = "files";

/// Upper bound on documents per file, guarding against a parser that keeps yielding errors.
const MAX_DOCUMENTS: usize = 100_000;

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn is_catalog_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    !hidden && matches!(ext.as_deref(), Some("yaml" | "yml" | "json"))
}

/// The catalog files in `dir`, sorted, with size and mtime (symlinks followed).
fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !is_catalog_file(&path) {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => out.push((path, m.len(), m.modified().ok())),
            Ok(_) => {}
            // Vanished between listing and stat, or a dangling symlink: not part of the set.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Parses a file's text into objects: JSON for `.json`, else multi-document YAML.
pub(super) fn parse_documents(text: &str, json: bool, origin: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    if json {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => docs.push(v),
            Err(e) => tracing::warn!(file = origin, error = %e, "skipping unparsable JSON file"),
        }
    } else {
        for (i, doc) in serde_yaml::Deserializer::from_str(text)
            .enumerate()
            .take(MAX_DOCUMENTS)
        {
            match Value::deserialize(doc) {
                Ok(v) => docs.push(v),
                Err(e) => {
                    tracing::warn!(file = origin, document = i, error = %e, "skipping unparsable YAML document");
                }
            }
        }
    }
    let mut out = Vec::new();
    for d in docs {
        expand_into(d, &mut out);
    }
    out
}

/// Adds an object, or a `kind: List`'s items, skipping empty documents.
fn expand_into(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Null => {}
        Value::Object(mut m)
            if m.get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k.ends_with("List"))
                && m.get("items").is_some_and(Value::is_array) =>
        {
            if let Some(Value::Array(items)) = m.remove("items") {
                for item in items {
                    expand_into(item, out);
                }
            }
        }
        other => out.push(other),
    }
}

/// Reads every catalog file in `dir`. A file that cannot be read or parsed is skipped with a
/// warning; only a directory that cannot be listed is an error.
pub(super) fn read_objects(dir: &Path) -> io::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (path, _, _) in fingerprint(dir)? {
        let origin = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let json = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("json"));
                out.extend(parse_documents(&text, json, &origin));
            }
            Err(e) => {
                tracing::warn!(file = %origin, error = %e, "skipping unreadable catalog file")
            }
        }
    }
    Ok(out)
}

/// Runs the source until the catalog is dropped: publishes the directory's objects at once
/// (then marks the source synced) and again after every change seen by polling.
pub(super) fn spawn(catalog: Weak<Catalog>, dir: PathBuf, interval: Duration) {
    tokio::spawn(async move {
        let mut last: Option<Fingerprint> = None;
        loop {
            let d = dir.clone();
            let scanned = tokio::task::spawn_blocking(move || {
                let fp = fingerprint(&d)?;
                Ok::<_, io::Error>((fp, d))
            })
            .await;
            match scanned {
                Ok(Ok((fp, d))) if last.as_ref() != Some(&fp) => {
                    // Read after taking the fingerprint: a change during the read shows next round.
                    match tokio::task::spawn_blocking(move || read_objects(&d)).await {
                        Ok(Ok(objects)) => {
                            let Some(c) = catalog.upgrade() else { return };
                            tracing::info!(dir = %dir.display(), objects = objects.len(), "catalog files read");
                            c.publish(SOURCE, objects);
                            c.mark_synced(SOURCE);
                            last = Some(fp);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot read catalog directory")
                        }
                        Err(e) => tracing::warn!(error = %e, "catalog files task failed"),
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot list catalog directory")
                }
                Err(e) => tracing::warn!(error = %e, "catalog files task failed"),
            }
            tokio::time::sleep(interval).await;
            if catalog.strong_count() == 0 {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists() {
        let text = "a: 1\n---\n---\nkind: List\nitems:\n  - {kind: X, n: 1}\n  - {kind: X, n: 2}\n";
        let docs = parse_documents(text, false, "t");
        assert_eq!(docs.len(), 3, "{docs:?}");
        assert_eq!(docs[2]["n"], 2);
        let docs = parse_documents(
            "{\"kind\":\"SecretList\",\"items\":[{\"kind\":\"Secret\"}]}",
            true,
            "t",
        );
        assert_eq!(docs, vec![serde_json::json!({"kind": "Secret"})]);
    }

    #[test]
    fn bad_documents_are_skipped() {
        let docs = parse_documents("a: 1\n---\n{1: 2}\n---\nb: 2\n", false, "t");
        assert!(docs.contains(&serde_json::json!({"a": 1})), "{docs:?}");
        assert!(parse_documents("{not json", true, "t").is_empty());
    }

    #[test]
    fn reads_only_catalog_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: A\n").unwrap();
        std::fs::write(dir.path().join("b.JSON"), "{\"kind\": \"B\"}").unwrap();
        std::fs::write(dir.path().join("c.txt"), "kind: C\n").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "kind: D\n").unwrap();
        let objs = read_objects(dir.path()).unwrap();
        let kinds: Vec<_> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["A", "B"]);
        assert!(read_objects(&dir.path().join("missing")).is_err());
    }
}
