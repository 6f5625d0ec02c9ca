//! Manifests by digest (immutable once verified) and tags → digest with the time they were
//! last checked upstream.
//!
//! Manifests are small (at most [`MAX_MANIFEST_SIZE`]): each is one file
//! `manifests/<alg>/<hex>` holding the media type, a newline, then the exact bytes; a
//! byte-weighted in-memory cache sits in front. A file read from disk is re-verified against
//! its digest (cheap at this size), so a corrupt file is dropped, never served.
//!
//! Tags live in memory and in the journal `tags.jsonl` (compacted when it grows to more than
//! twice its live entries). Each records the [`Grant`] under which the upstream answered.
//! How old a check is counts here, in one rule ([`TagEntry::checked_within`]), for the cache
//! and for the pull policy (`crate::pull::manifest`), which trusts a tag without asking
//! upstream within the tag TTL and only for a request with the same grant (see
//! [`super::links`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::grant::Grant;
use super::journal::Journal;
use super::store::write_atomic;
use super::CacheError;
use crate::protocol::grammar::Digest;

/// Largest manifest accepted (distribution's limit).
pub(crate) const MAX_MANIFEST_SIZE: usize = 4 << 20;
/// Bytes of manifests held in memory.
const MEMORY_BUDGET: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub checked_at: SystemTime,
    /// The grant of the request whose upstream check this is; `None` (a record from before
    /// grants, or unreadable) never matches a request.
    pub grant: Option<Grant>,
}

impl TagEntry {
    /// Whether the upstream check is less than `ttl` old. A `checked_at` in the future (the
    /// clock went backwards since) counts as stale: the tag is checked again rather than
    /// trusted for a time nobody can tell.
    pub fn checked_within(&self, ttl: Duration) -> bool {
        self.checked_at.elapsed().is_ok_and(|age| age < ttl)
    }
}

pub(super) struct Manifests {
    dir: PathBuf,
    mem: moka::future::Cache<Digest, CachedManifest>,
    /// Bytes of manifest files on disk (counted toward `cache.max_size`; exact after each
    /// [`Manifests::evict_oldest`], an upper estimate in between).
    disk: AtomicU64,
}

/// The manifest files under `dir`: (modified, path, length). Blocking.
fn manifest_files(dir: &Path) -> Vec<(SystemTime, PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(algs) = std::fs::read_dir(dir) else {
        return out;
    };
    for alg in algs.flatten() {
        let Ok(files) = std::fs::read_dir(alg.path()) else {
            continue;
        };
        for f in files.flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    let modified = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((modified, f.path(), m.len()));
                }
            }
        }
    }
    out
}

fn valid_media_type(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

impl Manifests {
    pub(super) fn new(root: &Path) -> io::Result<Manifests> {
        let dir = root.join("manifests");
        std::fs::create_dir_all(&dir)?;
        let mem = moka::future::Cache::builder()
            .max_capacity(MEMORY_BUDGET)
            .weigher(|_k: &Digest, v: &CachedManifest| {
                u32::try_from(v.bytes.len() + v.media_type.len()).unwrap_or(u32::MAX)
            })
            .build();
        let disk = manifest_files(&dir).iter().map(|f| f.2).sum();
        Ok(Manifests {
            dir,
            mem,
            disk: AtomicU64::new(disk),
        })
    }

    /// Bytes of manifest files on disk.
    pub(super) fn disk_bytes(&self) -> u64 {
        self.disk.load(Ordering::Relaxed)
    }

    /// Removes the oldest manifest files until at most `cap` bytes remain; returns the files
    /// removed. Blocking. A removed manifest is fetched again from upstream when asked for
    /// (its copy in memory, if any, stays valid: manifests are immutable).
    pub(super) fn evict_oldest(&self, cap: u64) -> usize {
        let mut files = manifest_files(&self.dir);
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        files.sort_unstable_by_key(|f| f.0);
        let mut removed = 0;
        for (_, path, len) in files {
            if total <= cap {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                removed += 1;
            }
        }
        self.disk.store(total, Ordering::Relaxed);
        removed
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    pub(super) async fn get(&self, digest: &Digest) -> Option<CachedManifest> {
        if let Some(m) = self.mem.get(digest).await {
            return Some(m);
        }
        let path = self.path(digest);
        let raw = match tokio::fs::read(&path).await {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read cached manifest");
                return None;
            }
        };
        let parsed = raw.iter().position(|&b| b == b'\n').and_then(|nl| {
            let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
            let body = &raw[nl + 1..];
            (valid_media_type(&media_type) && digest.verify(body)).then(|| CachedManifest {
                media_type,
                bytes: Bytes::copy_from_slice(body),
            })
        });
        match parsed {
            Some(m) => {
                self.mem.insert(digest.clone(), m.clone()).await;
                Some(m)
            }
            None => {
                tracing::warn!(%digest, "cached manifest file is corrupt; dropped");
                let _ = tokio::fs::remove_file(&path).await;
                None
            }
        }
    }

    pub(super) async fn put(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(CacheError::ManifestTooLarge(bytes.len()));
        }
        if !valid_media_type(media_type) {
            return Err(CacheError::InvalidMediaType);
        }
        if !digest.verify(&bytes) {
            return Err(CacheError::DigestMismatch(digest.clone()));
        }
        if self.get(digest).await.is_some() {
            return Ok(()); // immutable: the first verified copy stays
        }
        let mut file = Vec::with_capacity(media_type.len() + 1 + bytes.len());
        file.extend_from_slice(media_type.as_bytes());
        file.push(b'\n');
        file.extend_from_slice(&bytes);
        let path = self.path(digest);
        let len = file.len() as u64;
        tokio::task::spawn_blocking(move || write_atomic(&path, &file))
            .await
            .map_err(io::Error::other)??;
        self.disk.fetch_add(len, Ordering::Relaxed);
        let m = CachedManifest {
            media_type: media_type.to_owned(),
            bytes,
        };
        self.mem.insert(digest.clone(), m).await;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct TagRecord {
    repo: String,
    tag: String,
    /// `None` records a removal.
    digest: Option<String>,
    /// Milliseconds since the Unix epoch.
    at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<String>,
}

type TagMap = HashMap<(String, String), TagEntry>;

pub(super) struct Tags {
    map: Arc<Mutex<TagMap>>,
    journal: Journal,
}

pub(super) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn snapshot(map: &TagMap) -> Vec<TagRecord> {
    map.iter()
        .map(|((repo, tag), e)| TagRecord {
            repo: repo.clone(),
            tag: tag.clone(),
            digest: Some(e.digest.to_string()),
            at: to_ms(e.checked_at),
            grant: e.grant.map(Grant::to_hex),
        })
        .collect()
}

impl Tags {
    /// Loads `tags.jsonl` under `dir` (blocking), compacting it.
    pub(super) fn open(dir: &Path) -> io::Result<Tags> {
        let (journal, recs) = Journal::open::<TagRecord>(&dir.join("tags.jsonl"))?;
        let mut map = TagMap::new();
        for r in recs {
            let key = (r.repo, r.tag);
            match r.digest.map(|d| Digest::parse(&d)) {
                Some(Ok(digest)) => {
                    let checked_at = SystemTime::UNIX_EPOCH + Duration::from_millis(r.at);
                    let grant = r.grant.as_deref().and_then(Grant::from_hex);
                    map.insert(
                        key,
                        TagEntry {
                            digest,
                            checked_at,
                            grant,
                        },
                    );
                }
                Some(Err(_)) => {}
                None => {
                    map.remove(&key);
                }
            }
        }
        Ok(Tags {
            map: Arc::new(Mutex::new(map)),
            journal,
        })
    }

    pub(super) fn get(&self, repo_key: &str, tag: &str) -> Option<TagEntry> {
        let map = self.map.lock().ok()?;
        map.get(&(repo_key.to_owned(), tag.to_owned())).cloned()
    }

    /// Sets (or removes, with `None`) a tag in memory and appends it to the journal.
    pub(super) async fn set(
        &self,
        repo_key: &str,
        tag: &str,
        digest: Option<&Digest>,
        grant: Grant,
    ) {
        self.set_at(repo_key, tag, digest, Some(grant), SystemTime::now())
            .await
    }

    /// [`Tags::set`] with the time the tag was checked upstream (by another replica).
    pub(super) async fn set_at(
        &self,
        repo_key: &str,
        tag: &str,
        digest: Option<&Digest>,
        grant: Option<Grant>,
        now: SystemTime,
    ) {
        let map = self.map.clone();
        let key = (repo_key.to_owned(), tag.to_owned());
        let digest = digest.cloned();
        let res = self
            .journal
            .with(move |j| {
                let mut m = map
                    .lock()
                    .map_err(|_| io::Error::other("tags lock poisoned"))?;
                let rec = TagRecord {
                    repo: key.0.clone(),
                    tag: key.1.clone(),
                    digest: digest.as_ref().map(|d| d.to_string()),
                    at: to_ms(now),
                    grant: grant.map(Grant::to_hex),
                };
                match digest {
                    Some(digest) => {
                        m.insert(
                            key,
                            TagEntry {
                                digest,
                                checked_at: now,
                                grant,
                            },
                        );
                    }
                    None => {
                        if m.remove(&key).is_none() {
                            return Ok(());
                        }
                    }
                }
                if j.lines() > 2 * m.len() as u64 + 1024 {
                    j.rewrite(snapshot(&m))
                } else {
                    j.append(&rec)
                }
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(repo = repo_key, tag, error = %e, "cannot persist cached tag");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_checked_in_the_future_is_stale() {
        let entry = |checked_at| TagEntry {
            digest: Digest::sha256_of(b"m"),
            checked_at,
            grant: None,
        };
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        assert!(entry(now - Duration::from_secs(1)).checked_within(ttl));
        assert!(!entry(now - Duration::from_secs(61)).checked_within(ttl));
        // The clock went backwards: not trusted for the TTL from a time yet to come.
        assert!(!entry(now + Duration::from_secs(30)).checked_within(ttl));
        assert!(!entry(now + Duration::from_secs(3600)).checked_within(ttl));
    }

    #[tokio::test]
    async fn manifests_verify_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifests::new(dir.path()).unwrap();
        let body = Bytes::from_static(b"{\"schemaVersion\":2}");
        let d = Digest::sha256_of(&body);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let wrong = Digest::sha256_of(b"other");
        assert!(matches!(
            m.put(&wrong, mt, body.clone()).await,
            Err(CacheError::DigestMismatch(_))
        ));
        assert!(m.get(&wrong).await.is_none());
        assert!(m.put(&d, "bad\ntype", body.clone()).await.is_err());
        m.put(&d, mt, body.clone()).await.unwrap();
        let m2 = Manifests::new(dir.path()).unwrap();
        let got = m2.get(&d).await.unwrap();
        assert_eq!(got.media_type, mt);
        assert_eq!(got.bytes, body);

        // A corrupted file is dropped, not served.
        let path = m2.path(&d);
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, raw).unwrap();
        let m3 = Manifests::new(dir.path()).unwrap();
        assert!(m3.get(&d).await.is_none());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn tags_persist_refresh_remove_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        let d1 = Digest::sha256_of(b"1");
        let d2 = Digest::sha256_of(b"2");
        let g = crate::cache::grant::GrantKey::random()
            .unwrap()
            .grant(&[b"g"]);
        let t = Tags::open(dir.path()).unwrap();
        t.set("r.io/a", "v1", Some(&d1), g).await;
        let first = t.get("r.io/a", "v1").unwrap();
        t.set("r.io/a", "v1", Some(&d2), g).await;
        t.set("r.io/a", "gone", Some(&d2), g).await;
        t.set("r.io/a", "gone", None, g).await;
        let e = t.get("r.io/a", "v1").unwrap();
        assert_eq!(e.digest, d2);
        assert!(e.checked_at >= first.checked_at);
        drop(t);
        let t = Tags::open(dir.path()).unwrap();
        assert_eq!(t.get("r.io/a", "v1").unwrap().digest, d2);
        assert_eq!(
            t.get("r.io/a", "v1").unwrap().grant,
            Some(g),
            "the grant persists"
        );
        assert!(t.get("r.io/a", "gone").is_none());
        assert!(t.get("r.io/b", "v1").is_none());
        for _ in 0..1100 {
            t.set("r.io/a", "v1", Some(&d1), g).await;
        }
        let lines = std::fs::read_to_string(dir.path().join("tags.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 1100, "journal compacted, {lines} lines");
        drop(t);
        let t = Tags::open(dir.path()).unwrap();
        assert_eq!(t.get("r.io/a", "v1").unwrap().digest, d1);
    }
}
