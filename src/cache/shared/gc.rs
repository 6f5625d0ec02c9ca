//! Eviction for the shared tier (`oci-proxy gc-shared`): bounds the bytes under
//! `<prefix>blobs/` by deleting the least recently modified objects first, and deletes expired
//! leases under `<prefix>leases/`.
//!
//! Policy: replicas never rewrite an object that exists (conditional creates) and reads
//! refresh nothing, so an object's `last_modified` is its first upload: this is FIFO by
//! upload time, not LRU. Manifests and links are left alone (small; a bucket lifecycle rule
//! can expire them). Deleting a blob is always safe: a replica that misses it fetches it
//! upstream again (or serves its local copy), and a read racing with the delete fails over
//! to upstream like any other store error.

use std::fmt;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore};

use super::lease::now_ms;
use super::{normalize_prefix, s3_builder};
use crate::config::{ByteSize, CacheConfig, S3Config};

/// Timeout of each store request the collector makes (list pages, lease reads, deletes).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cache.s3 is not configured: gc-shared needs the shared bucket")]
    NotConfigured,
    #[error("no size bound: pass --max-size or set cache.s3.max_size")]
    NoBound,
    #[error("shared cache store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{count} deletion(s) failed; first: {first}")]
    Deletions { count: usize, first: String },
}

/// What one run is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// The total bytes under `blobs/` must end at or below this.
    pub max_size: u64,
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Leases expiring at or before this (Unix ms) are expired.
    pub now_ms: u64,
}

/// One object the run deleted (or would delete, in a dry run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub key: String,
    pub size: u64,
}

/// What a run found and did.
#[derive(Debug, Default)]
pub struct GcReport {
    pub dry_run: bool,
    pub max_size: u64,
    pub blobs_before: usize,
    pub bytes_before: u64,
    pub deleted_blobs: Vec<Deleted>,
    pub deleted_leases: Vec<Deleted>,
    /// Keys whose deletion failed, with the error (these bytes still count).
    pub failed: Vec<(String, String)>,
}

impl GcReport {
    pub fn deleted_bytes(&self) -> u64 {
        self.deleted_blobs.iter().map(|d| d.size).sum()
    }

    /// Bytes left under `blobs/` (what would be left, in a dry run).
    pub fn bytes_after(&self) -> u64 {
        self.bytes_before.saturating_sub(self.deleted_bytes())
    }

    /// An error when any deletion failed (the report is still worth printing first).
    pub fn into_result(self) -> Result<(), GcError> {
        let count = self.failed.len();
        match self.failed.into_iter().next() {
            None => Ok(()),
            Some((key, e)) => Err(GcError::Deletions {
                count,
                first: format!("{key}: {e}"),
            }),
        }
    }
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        for d in &self.deleted_leases {
            writeln!(f, "{verb} expired lease {}", d.key)?;
        }
        for d in &self.deleted_blobs {
            writeln!(f, "{verb} blob {} {} bytes", d.key, d.size)?;
        }
        for (key, e) in &self.failed {
            writeln!(f, "failed to delete {key}: {e}")?;
        }
        writeln!(
            f,
            "blobs: {} objects, {} bytes before; {verb} {} objects, {} bytes; {} bytes left \
             (bound {} bytes = {}); {verb} {} expired leases{}",
            self.blobs_before,
            self.bytes_before,
            self.deleted_blobs.len(),
            self.deleted_bytes(),
            self.bytes_after(),
            self.max_size,
            ByteSize(self.max_size),
            self.deleted_leases.len(),
            if self.dry_run { " (dry run)" } else { "" },
        )
    }
}

/// A blob object as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobObject {
    pub key: Path,
    pub size: u64,
    /// `last_modified` in Unix ms.
    pub modified_ms: i64,
}

/// The objects to delete, oldest first (ties by key), until the total is at most `max_size`.
pub fn plan(mut objects: Vec<BlobObject>, max_size: u64) -> Vec<BlobObject> {
    let mut total: u64 = objects.iter().map(|o| o.size).sum();
    objects.sort_by(|a, b| {
        a.modified_ms
            .cmp(&b.modified_ms)
            .then_with(|| a.key.as_ref().cmp(b.key.as_ref()))
    });
    let mut out = Vec::new();
    for o in objects {
        if total <= max_size {
            break;
        }
        total = total.saturating_sub(o.size);
        out.push(o);
    }
    out
}

/// The bucket named by `cfg`, credentials from the AWS environment (as the proxy's).
pub fn open_store(cfg: &S3Config) -> Result<Arc<dyn ObjectStore>, GcError> {
    let b = s3_builder(cfg, ClientOptions::new().with_timeout(REQUEST_TIMEOUT));
    Ok(Arc::new(b.build()?))
}

/// `oci-proxy gc-shared`: the bucket of `cache.s3`, bounded by `max_size` or else
/// `cache.s3.max_size`.
pub async fn run(
    cache: &CacheConfig,
    max_size: Option<ByteSize>,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let s3 = cache.s3.as_ref().ok_or(GcError::NotConfigured)?;
    let bound = max_size.or(s3.max_size).ok_or(GcError::NoBound)?;
    let store = open_store(s3)?;
    tracing::info!(
        bucket = s3.bucket.as_str(),
        prefix = s3.prefix.as_str(),
        max_size = bound.0,
        dry_run,
        "collecting the shared cache"
    );
    collect(
        store.as_ref(),
        &s3.prefix,
        GcOptions {
            max_size: bound.0,
            dry_run,
            now_ms: now_ms(),
        },
    )
    .await
}

/// Deletes expired leases, then the oldest blobs until `<prefix>blobs/` holds at most
/// `opts.max_size` bytes. A failed listing is an error; failed deletions are reported.
pub async fn collect(
    store: &dyn ObjectStore,
    prefix: &str,
    opts: GcOptions,
) -> Result<GcReport, GcError> {
    let prefix = normalize_prefix(prefix);
    let mut report = GcReport {
        dry_run: opts.dry_run,
        max_size: opts.max_size,
        ..Default::default()
    };

    let leases: Vec<_> = store
        .list(Some(&Path::from(format!("{prefix}leases"))))
        .try_collect()
        .await?;
    for meta in leases {
        let body = match store.get(&meta.location).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let expires_ms = match body {
            // Unreadable as a number: expired, as replicas read it.
            Ok(b) => super::lease::Body::parse(&b).map_or(0, |b| b.expires_ms),
            Err(object_store::Error::NotFound { .. }) => continue, // released meanwhile
            Err(e) => return Err(e.into()),
        };
        if expires_ms > opts.now_ms {
            continue;
        }
        let d = Deleted {
            key: meta.location.to_string(),
            size: meta.size,
        };
        if delete(store, &meta.location, opts.dry_run, &mut report).await {
            report.deleted_leases.push(d);
        }
    }

    let blobs: Vec<BlobObject> = store
        .list(Some(&Path::from(format!("{prefix}blobs"))))
        .map_ok(|m| BlobObject {
            key: m.location,
            size: m.size,
            modified_ms: m.last_modified.timestamp_millis(),
        })
        .try_collect()
        .await?;
    report.blobs_before = blobs.len();
    report.bytes_before = blobs.iter().map(|o| o.size).sum();
    for o in plan(blobs, opts.max_size) {
        if delete(store, &o.key, opts.dry_run, &mut report).await {
            tracing::debug!(
                key = o.key.as_ref(),
                size = o.size,
                dry_run = opts.dry_run,
                "evicted"
            );
            report.deleted_blobs.push(Deleted {
                key: o.key.to_string(),
                size: o.size,
            });
        }
    }
    Ok(report)
}

/// Deletes `key` (not in a dry run); false, with the failure recorded, when that failed.
/// Gone already (another collector, a replica's corrupt-object delete) counts as deleted.
async fn delete(store: &dyn ObjectStore, key: &Path, dry_run: bool, report: &mut GcReport) -> bool {
    if dry_run {
        return true;
    }
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => true,
        Err(e) => {
            tracing::warn!(key = key.as_ref(), error = %e, "cannot delete");
            report.failed.push((key.to_string(), e.to_string()));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    fn obj(key: &str, size: u64, modified_ms: i64) -> BlobObject {
        BlobObject {
            key: Path::from(key),
            size,
            modified_ms,
        }
    }

    fn keys(v: &[BlobObject]) -> Vec<&str> {
        v.iter().map(|o| o.key.as_ref()).collect()
    }

    #[test]
    fn plan_deletes_oldest_first_until_at_or_under_the_bound() {
        let objects = vec![
            obj("b/new", 10, 300),
            obj("b/old", 10, 100),
            obj("b/mid", 10, 200),
        ];
        assert!(
            plan(objects.clone(), 30).is_empty(),
            "at the bound: nothing"
        );
        assert_eq!(keys(&plan(objects.clone(), 29)), ["b/old"]);
        assert_eq!(keys(&plan(objects.clone(), 10)), ["b/old", "b/mid"]);
        assert_eq!(keys(&plan(objects.clone(), 0)), ["b/old", "b/mid", "b/new"]);
        // Equal times: by key, so runs are deterministic.
        let tied = vec![obj("b/z", 5, 1), obj("b/a", 5, 1)];
        assert_eq!(keys(&plan(tied, 5)), ["b/a"]);
    }

    #[test]
    fn plan_stops_as_soon_as_a_large_old_object_makes_room() {
        let objects = vec![obj("b/big", 100, 1), obj("b/s1", 1, 2), obj("b/s2", 1, 3)];
        assert_eq!(keys(&plan(objects, 50)), ["b/big"]);
    }

    async fn put(store: &InMemory, key: &str, body: Vec<u8>) {
        store
            .put(&Path::from(key), PutPayload::from(body))
            .await
            .unwrap();
    }

    async fn listed(store: &InMemory, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = store
            .list(Some(&Path::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    }

    /// Blobs `p/blobs/sha256/{1,2,3}` (100 bytes each, uploaded in that order), a manifest,
    /// a link, live and expired leases (in the current `<expires_ms> <owner>` format and the
    /// old bare one), and an object of another prefix.
    async fn seeded(now: u64) -> InMemory {
        let s = InMemory::new();
        for k in ["1", "2", "3"] {
            put(&s, &format!("p/blobs/sha256/{k}"), vec![7; 100]).await;
        }
        put(&s, "p/manifests/sha256/m", vec![1; 10]).await;
        put(&s, "p/links/r/sha256/1", vec![]).await;
        put(
            &s,
            "p/leases/sha256/live",
            (now + 1000).to_string().into_bytes(),
        )
        .await;
        put(
            &s,
            "p/leases/sha256/dead",
            (now - 1).to_string().into_bytes(),
        )
        .await;
        put(
            &s,
            "p/leases/sha256/owned",
            format!("{} 0123456789abcdef", now + 1000).into_bytes(),
        )
        .await;
        put(
            &s,
            "p/leases/sha256/owned-dead",
            format!("{} 0123456789abcdef", now - 1).into_bytes(),
        )
        .await;
        put(&s, "p/leases/sha256/junk", b"not a time".to_vec()).await;
        put(&s, "other/blobs/sha256/x", vec![7; 1000]).await;
        s
    }

    #[tokio::test]
    async fn collect_evicts_the_oldest_blobs_and_expired_leases_only() {
        let now = 1_000_000;
        let s = seeded(now).await;
        let opts = GcOptions {
            max_size: 150,
            dry_run: false,
            now_ms: now,
        };
        let r = collect(&s, "p/", opts).await.unwrap();
        assert_eq!((r.blobs_before, r.bytes_before), (3, 300));
        assert_eq!(
            r.deleted_blobs,
            [
                Deleted {
                    key: "p/blobs/sha256/1".into(),
                    size: 100
                },
                Deleted {
                    key: "p/blobs/sha256/2".into(),
                    size: 100
                }
            ]
        );
        assert_eq!(r.bytes_after(), 100);
        assert!(r.failed.is_empty());
        assert_eq!(listed(&s, "p/blobs").await, ["p/blobs/sha256/3"]);
        assert_eq!(
            listed(&s, "p/leases").await,
            ["p/leases/sha256/live", "p/leases/sha256/owned"]
        );
        let mut gone: Vec<_> = r.deleted_leases.iter().map(|d| d.key.as_str()).collect();
        gone.sort();
        assert_eq!(
            gone,
            [
                "p/leases/sha256/dead",
                "p/leases/sha256/junk",
                "p/leases/sha256/owned-dead"
            ]
        );
        // Other kinds and other prefixes are untouched.
        assert_eq!(listed(&s, "p/manifests").await.len(), 1);
        assert_eq!(listed(&s, "p/links").await.len(), 1);
        assert_eq!(listed(&s, "other").await.len(), 1);

        let text = r.to_string();
        assert!(
            text.contains("deleted blob p/blobs/sha256/1 100 bytes"),
            "{text}"
        );
        assert!(
            text.contains("deleted expired lease p/leases/sha256/dead"),
            "{text}"
        );
        assert!(text.contains("300 bytes before"), "{text}");
        assert!(text.contains("100 bytes left"), "{text}");
        r.into_result().unwrap();

        // A second run finds nothing to do.
        let again = collect(&s, "p", opts).await.unwrap();
        assert!(again.deleted_blobs.is_empty() && again.deleted_leases.is_empty());
        assert_eq!(again.bytes_before, 100);
    }

    #[tokio::test]
    async fn a_dry_run_reports_the_same_plan_and_deletes_nothing() {
        let now = 1_000_000;
        let s = seeded(now).await;
        let opts = GcOptions {
            max_size: 150,
            dry_run: true,
            now_ms: now,
        };
        let r = collect(&s, "p/", opts).await.unwrap();
        assert_eq!(r.deleted_blobs.len(), 2);
        assert_eq!(r.deleted_leases.len(), 3);
        assert!(r.to_string().contains("would delete blob p/blobs/sha256/1"));
        assert!(r.to_string().contains("(dry run)"));
        assert_eq!(listed(&s, "p/blobs").await.len(), 3);
        assert_eq!(listed(&s, "p/leases").await.len(), 5);
    }

    #[tokio::test]
    async fn an_empty_prefix_collects_the_whole_bucket_layout() {
        let s = InMemory::new();
        put(&s, "blobs/sha256/a", vec![0; 10]).await;
        put(&s, "blobs/sha256/b", vec![0; 10]).await;
        let r = collect(
            &s,
            "",
            GcOptions {
                max_size: 0,
                dry_run: false,
                now_ms: 0,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.deleted_bytes(), 20);
        assert!(listed(&s, "blobs").await.is_empty());
    }

    #[tokio::test]
    async fn run_needs_the_s3_section_and_a_bound() {
        let cache = CacheConfig::default();
        assert!(matches!(
            run(&cache, Some(ByteSize(1)), true).await,
            Err(GcError::NotConfigured)
        ));
        let cfg =
            crate::config::Config::parse("cache:\n  backend: s3\n  s3:\n    bucket: b\n").unwrap();
        assert!(matches!(
            run(&cfg.cache, None, true).await,
            Err(GcError::NoBound)
        ));
    }
}
