//! The read rule's records: repository ↔ digest links and the origins of cached content.
//!
//! - A **link** says "the upstream showed, under [`Grant`] `grant`, at time `at`, that this
//!   repository holds this digest". It counts for a read only with the grant the request gets
//!   now and while younger than `cache.link_ttl` (the server checks both); otherwise the
//!   server confirms upstream again and records a fresh link.
//! - An **origin** says "these verified bytes were fetched from upstream U". An upstream's
//!   confirmation admits only content whose origins include it (or an upstream it trusts), so
//!   a lying upstream that answers every HEAD with 200 gets nothing another upstream served.
//!   Origins are recorded only after the bytes were verified, and only grow: an upstream that
//!   once served bytes matching a digest does hold that content.
//!
//! Lookups are in memory; each change is appended to `links.jsonl` so the rule holds after a
//! restart. Records written before grants existed carry none and never count (the link is
//! confirmed again once). The journal is rewritten from memory when it holds more than twice
//! the live records (plus a slack of [`COMPACT_SLACK`]). Memory and disk are bounded by
//! `max_links` links and as many origins: at the bound the least recently confirmed tenth is
//! dropped, which costs only an upstream HEAD (a link) or a fetch (an origin) later.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::grant::Grant;
use super::journal::{Journal, JournalFile};
use super::manifests::to_ms;
use crate::protocol::grammar::Digest;

/// Default bound on links (and, separately, on origins) held.
pub(super) const DEFAULT_MAX_LINKS: usize = 1 << 20;
/// Dead journal lines tolerated beyond the live ones before a rewrite.
pub(super) const COMPACT_SLACK: u64 = 1024;

/// One journal line: a link (`repo` set) or an origin (`origin` set).
#[derive(Serialize, Deserialize, Default)]
struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    at: u64,
}

/// A link as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub grant: Grant,
    pub at: SystemTime,
}

#[derive(Default)]
struct Maps {
    links: HashMap<(String, Digest), LinkInfo>,
    /// Upstream names the digest was fetched from, with when it was last recorded.
    origins: HashMap<Digest, Vec<(String, SystemTime)>>,
    origin_count: usize,
}

impl Maps {
    fn live(&self) -> u64 {
        (self.links.len() + self.origin_count) as u64
    }

    fn snapshot(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .links
            .iter()
            .map(|((repo, digest), l)| Record {
                repo: Some(repo.clone()),
                digest: digest.to_string(),
                grant: Some(l.grant.to_hex()),
                at: to_ms(l.at),
                ..Default::default()
            })
            .collect();
        for (digest, us) in &self.origins {
            for (u, at) in us {
                out.push(Record {
                    origin: Some(u.clone()),
                    digest: digest.to_string(),
                    at: to_ms(*at),
                    ..Default::default()
                });
            }
        }
        out
    }

    fn apply(&mut self, r: Record) {
        let Ok(digest) = Digest::parse(&r.digest) else {
            return;
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(r.at);
        if let Some(repo) = r.repo {
            match r.grant.as_deref().and_then(Grant::from_hex) {
                Some(grant) => {
                    self.links.insert((repo, digest), LinkInfo { grant, at });
                }
                // A record from before grants: it never counts, so it is not kept.
                None => {
                    self.links.remove(&(repo, digest));
                }
            }
        } else if let Some(u) = r.origin {
            self.add_origin(digest, u, at);
        }
    }

    /// Whether the origin is new.
    fn add_origin(&mut self, digest: Digest, upstream: String, at: SystemTime) -> bool {
        let list = self.origins.entry(digest).or_default();
        match list.iter_mut().find(|(u, _)| *u == upstream) {
            Some(e) => {
                e.1 = e.1.max(at);
                false
            }
            None => {
                list.push((upstream, at));
                self.origin_count += 1;
                true
            }
        }
    }

    /// Drops the least recently confirmed links (and origins) down to nine tenths of `max`
    /// when there are more than `max`; returns how many went.
    fn bound(&mut self, max: usize) -> usize {
        let keep = max - max / 10;
        let mut dropped = 0;
        if self.links.len() > max {
            let mut by_age: Vec<(SystemTime, (String, Digest))> =
                self.links.iter().map(|(k, l)| (l.at, k.clone())).collect();
            by_age.sort_unstable_by_key(|(at, _)| *at);
            let cut = self.links.len() - keep;
            for (_, k) in by_age.into_iter().take(cut) {
                self.links.remove(&k);
            }
            dropped += cut;
        }
        if self.origin_count > max {
            let mut by_age: Vec<(SystemTime, Digest, String)> = self
                .origins
                .iter()
                .flat_map(|(d, l)| l.iter().map(|(u, at)| (*at, d.clone(), u.clone())))
                .collect();
            by_age.sort_unstable_by_key(|(at, _, _)| *at);
            let cut = self.origin_count - keep;
            for (_, d, u) in by_age.into_iter().take(cut) {
                if let Some(list) = self.origins.get_mut(&d) {
                    list.retain(|(x, _)| *x != u);
                    if list.is_empty() {
                        self.origins.remove(&d);
                    }
                }
            }
            self.origin_count -= cut;
            dropped += cut;
        }
        dropped
    }
}

#[derive(Clone)]
pub(super) struct Links {
    maps: Arc<Mutex<Maps>>,
    journal: Journal,
    max: usize,
}

impl Links {
    /// Loads `links.jsonl` under `dir` (blocking), bounded by `max` links and origins.
    pub(super) fn open(dir: &Path, max: usize) -> io::Result<Links> {
        let (journal, recs) = Journal::open::<Record>(&dir.join("links.jsonl"))?;
        let mut maps = Maps::default();
        for r in recs {
            maps.apply(r);
        }
        maps.bound(max.max(1));
        Ok(Links {
            maps: Arc::new(Mutex::new(maps)),
            journal,
            max: max.max(1),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link of `repo_key` to `digest`, if recorded (any grant, any age).
    pub(super) fn get(&self, repo_key: &str, digest: &Digest) -> Option<LinkInfo> {
        self.maps()
            .links
            .get(&(repo_key.to_owned(), digest.clone()))
            .copied()
    }

    /// Whether `digest` was fetched (and verified) from `upstream`.
    pub(super) fn has_origin(&self, digest: &Digest, upstream: &str) -> bool {
        self.maps()
            .origins
            .get(digest)
            .is_some_and(|l| l.iter().any(|(u, _)| u == upstream))
    }

    /// Records (or refreshes) a link under `grant`, confirmed at `at`; whether the record
    /// changed (a refresh within a second under the same grant does not).
    pub(super) async fn link(
        &self,
        repo_key: &str,
        digest: &Digest,
        grant: Grant,
        at: SystemTime,
    ) -> bool {
        let rec = Record {
            repo: Some(repo_key.to_owned()),
            digest: digest.to_string(),
            grant: Some(grant.to_hex()),
            at: to_ms(at),
            ..Default::default()
        };
        let key = (repo_key.to_owned(), digest.clone());
        let info = LinkInfo { grant, at };
        self.write(rec, move |m| {
            let old = m.links.insert(key, info);
            // A refresh within the same second changes nothing worth a line.
            !old.is_some_and(|o| {
                o.grant == grant && at.duration_since(o.at).unwrap_or_default().as_secs() < 1
            })
        })
        .await
    }

    /// Records that `digest`'s verified bytes came from `upstream`: in memory at once, on
    /// disk in the background (callable outside async code, on a runtime). The handle of
    /// the background write, when there is one.
    pub(super) fn add_origin(
        &self,
        digest: &Digest,
        upstream: &str,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        if self.has_origin(digest, upstream) {
            return None;
        }
        let now = SystemTime::now();
        let rec = Record {
            origin: Some(upstream.to_owned()),
            digest: digest.to_string(),
            at: to_ms(now),
            ..Default::default()
        };
        let changed = self
            .maps()
            .add_origin(digest.clone(), upstream.to_owned(), now);
        let me = self.clone();
        changed.then(|| tokio::spawn(async move { me.write(rec, |_| true).await }))
    }

    /// Applies `change` in memory and appends `rec` (when `change` says it changed
    /// something), under the journal lock so the file order matches memory; bounds and
    /// compacts. A disk error is logged: the change still holds for this process.
    async fn write<F>(&self, rec: Record, change: F) -> bool
    where
        F: FnOnce(&mut Maps) -> bool + Send + 'static,
    {
        let (maps, max) = (self.maps.clone(), self.max);
        let res = self
            .journal
            .with(move |j| {
                let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
                if !change(&mut m) {
                    return Ok(false);
                }
                let dropped = m.bound(max);
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        max,
                        "cache links at their bound: the least recently confirmed were dropped"
                    );
                }
                append_or_compact(j, &m, &rec).map(|()| true)
            })
            .await;
        res.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot persist a cache link");
            true
        })
    }

    /// Live links and origins.
    #[cfg(test)]
    pub(super) fn len(&self) -> (usize, usize) {
        let m = self.maps();
        (m.links.len(), m.origin_count)
    }
}

/// Appends `rec`, or rewrites the journal from `m` when dead lines dominate.
fn append_or_compact(j: &mut JournalFile, m: &Maps, rec: &Record) -> io::Result<()> {
    if j.lines() + 1 > 2 * m.live() + COMPACT_SLACK {
        j.rewrite(m.snapshot())
    } else {
        j.append(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::grant::GrantKey;

    fn lines(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("links.jsonl"))
            .unwrap()
            .lines()
            .count()
    }

    #[tokio::test]
    async fn links_keep_grant_and_time_and_origins_persist() {
        let dir = tempfile::tempdir().unwrap();
        let key = GrantKey::random().unwrap();
        let (g1, g2) = (key.grant(&[b"one"]), key.grant(&[b"two"]));
        let d = Digest::sha256_of(b"x");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let l = Links::open(dir.path(), 100).unwrap();
        assert!(l.get("r.io/a", &d).is_none());
        l.link("r.io/a", &d, g1, t0).await;
        l.link("r.io/a", &d, g1, t0).await;
        assert_eq!(
            lines(dir.path()),
            1,
            "an unchanged link is not appended again"
        );
        l.link("r.io/a", &d, g2, t0 + Duration::from_secs(5)).await;
        l.add_origin(&d, "a.io").unwrap().await.unwrap();
        assert!(l.add_origin(&d, "a.io").is_none(), "known already");
        assert!(l.has_origin(&d, "a.io"));
        assert!(!l.has_origin(&d, "b.io"));
        drop(l);
        let l = Links::open(dir.path(), 100).unwrap();
        let got = l.get("r.io/a", &d).unwrap();
        assert_eq!(got.grant, g2, "the newest record wins");
        assert_eq!(got.at, t0 + Duration::from_secs(5));
        assert!(l.get("r.io/b", &d).is_none());
        assert!(l.has_origin(&d, "a.io"));
        assert!(!l.has_origin(&d, "b.io"));
    }

    #[tokio::test]
    async fn records_without_a_grant_never_count() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"x");
        std::fs::write(
            dir.path().join("links.jsonl"),
            format!("{{\"repo\":\"r.io/a\",\"digest\":\"{d}\"}}\n"),
        )
        .unwrap();
        let l = Links::open(dir.path(), 100).unwrap();
        assert!(l.get("r.io/a", &d).is_none());
    }

    #[tokio::test]
    async fn journal_is_compacted_when_dead_records_dominate() {
        let dir = tempfile::tempdir().unwrap();
        let key = GrantKey::random().unwrap();
        let d = Digest::sha256_of(b"x");
        let l = Links::open(dir.path(), 100).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let n = 3 * COMPACT_SLACK;
        for i in 0..n {
            // Alternating grants: every record replaces the last one.
            let g = key.grant(&[&[(i % 2) as u8]]);
            l.link("r.io/a", &d, g, t0 + Duration::from_secs(i)).await;
        }
        let count = lines(dir.path()) as u64;
        assert!(
            count <= 2 + COMPACT_SLACK,
            "{count} lines for 1 live link after {n} writes"
        );
        drop(l);
        let l = Links::open(dir.path(), 100).unwrap();
        let last = l.get("r.io/a", &d).unwrap();
        assert_eq!(last.grant, key.grant(&[&[((n - 1) % 2) as u8]]));
        assert_eq!(last.at, t0 + Duration::from_secs(n - 1));
    }

    #[tokio::test]
    async fn links_and_origins_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let g = GrantKey::random().unwrap().grant(&[b"g"]);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let l = Links::open(dir.path(), 20).unwrap();
        let digests: Vec<Digest> = (0..30u32)
            .map(|i| Digest::sha256_of(&i.to_be_bytes()))
            .collect();
        for (i, d) in digests.iter().enumerate() {
            l.link("r.io/a", d, g, t0 + Duration::from_secs(i as u64))
                .await;
            l.add_origin(d, "a.io").unwrap().await.unwrap();
        }
        let (links, origins) = l.len();
        assert!(
            links <= 20 && origins <= 20,
            "{links} links, {origins} origins"
        );
        assert!(l.get("r.io/a", &digests[29]).is_some(), "the newest stays");
        assert!(l.get("r.io/a", &digests[0]).is_none(), "the oldest went");
        assert!(l.has_origin(&digests[29], "a.io"));
        drop(l);
        let l = Links::open(dir.path(), 20).unwrap();
        assert!(l.len().0 <= 20 && l.len().1 <= 20);
        assert!(l.get("r.io/a", &digests[29]).is_some());
    }
}
