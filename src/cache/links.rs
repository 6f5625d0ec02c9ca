//! Repository ↔ digest links: a repository may read a cached object only if it was shown
//! (by its upstream) to hold it.
//!
//! Lookups are in memory; each new link is appended to `links.jsonl` so the rule holds after
//! a restart. Links are never removed (evicting a blob does not change what a repository
//! was shown to hold), so the journal never needs compaction.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::journal::Journal;
use crate::protocol::grammar::Digest;

#[derive(Serialize, Deserialize)]
struct LinkRecord {
    repo: String,
    digest: String,
}

type Map = HashMap<String, HashSet<Digest>>;

#[derive(Debug)]
pub struct Links {
    map: Arc<RwLock<Map>>,
    journal: Journal,
}

impl Links {
    /// Loads `links.jsonl` under `dir` (blocking).
    pub fn open(dir: &Path) -> io::Result<Links> {
        let (journal, recs) = Journal::open::<LinkRecord>(&dir.join("links.jsonl"))?;
        let mut map = Map::new();
        for r in recs {
            if let Ok(d) = Digest::parse(&r.digest) {
                map.entry(r.repo).or_default().insert(d);
            }
        }
        Ok(Links {
            map: Arc::new(RwLock::new(map)),
            journal,
        })
    }

    pub fn is_linked(&self, repo_key: &str, digest: &Digest) -> bool {
        self.map
            .read()
            .map(|m| m.get(repo_key).is_some_and(|s| s.contains(digest)))
            .unwrap_or(false)
    }

    /// Records a link (in memory at once, then on disk). A disk error is logged: the link
    /// still holds for this process.
    pub async fn link(&self, repo_key: &str, digest: &Digest) {
        if self.is_linked(repo_key, digest) {
            return;
        }
        let map = self.map.clone();
        let (repo, digest) = (repo_key.to_owned(), digest.clone());
        let res = self
            .journal
            .with(move |j| {
                // Insert and append under the journal lock, so the file order matches memory.
                let inserted = map
                    .write()
                    .map_err(|_| io::Error::other("links lock poisoned"))?
                    .entry(repo.clone())
                    .or_default()
                    .insert(digest.clone());
                if inserted {
                    j.append(&LinkRecord {
                        repo,
                        digest: digest.to_string(),
                    })?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(repo = repo_key, error = %e, "cannot persist cache link");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn links_persist() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"x");
        let l = Links::open(dir.path()).unwrap();
        assert!(!l.is_linked("r.io/a", &d));
        l.link("r.io/a", &d).await;
        l.link("r.io/a", &d).await;
        assert!(l.is_linked("r.io/a", &d));
        assert!(!l.is_linked("r.io/b", &d));
        drop(l);
        let l = Links::open(dir.path()).unwrap();
        assert!(l.is_linked("r.io/a", &d));
        assert!(!l.is_linked("r.io/b", &d));
        let text = std::fs::read_to_string(dir.path().join("links.jsonl")).unwrap();
        assert_eq!(
            text.lines().count(),
            1,
            "a repeated link is not appended again"
        );
    }
}
