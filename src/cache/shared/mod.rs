//! The shared tier: an S3-compatible bucket (through `object_store`) that several replicas
//! put behind their local disk caches, so a blob fetched upstream by one replica is filled
//! from the bucket by the others.
//!
//! Layout under the configured prefix (every key content-addressed, written only after the
//! digest was verified, with a conditional create so replicas never overwrite each other):
//! - `blobs/<alg>/<hex>`: blob bytes (multipart above [`SINGLE_PUT_MAX`]: content-addressed
//!   and verified, so a concurrent identical upload is harmless);
//! - `manifests/<alg>/<hex>`: manifest bytes, media type as the object's Content-Type;
//! - `links/<sha256(repo_key)>/<alg>/<hex>`: `<grant> <confirmed_at_ms>`: "this repository
//!   was shown to hold it, under that grant" (overwritten by the newest confirmation; an
//!   empty object, from before grants, never counts);
//! - `origins/<sha256(upstream)>/<alg>/<hex>`: empty; "these verified bytes were fetched from
//!   that upstream" (see [`super::links`]): a blob in the bucket is admitted for an upstream
//!   only with its origin there or in the local journal, else fetched from that upstream;
//! - `grant.key`: the key replicas compute grants with ([`super::grant`]), created once;
//! - `tags/<sha256(repo_key)>/<tag>`: `<digest> <checked_at_ms> <grant>`, the newest
//!   upstream check of a tag by any replica (overwritten, not created);
//! - `leases/<alg>/<hex>`: cross-replica single flight ([`lease`]).
//!
//! Reads are never trusted: a blob is hashed while it is written to the local temp file and
//! committed only if it matches, else counted as corrupt, deleted from the bucket and
//! fetched upstream. Every failure of the store is logged and counted and makes the tier
//! rest for [`REST_AFTER_ERROR`]: the proxy then works as upstream pass-through plus local
//! cache. Uploads run in the background after the local commit, off the client's path.
//!
//! Eviction: not by the proxy itself; `oci-proxy gc-shared` ([`gc`]) bounds `blobs/` (oldest
//! upload first) and deletes expired leases, or a bucket lifecycle rule on the prefix does; a
//! replica that misses an evicted object fetches it upstream again and uploads it anew.

pub mod gc;
mod lease;
mod metrics;

use std::fs::File;
use std::future::Future;
use std::io::{self, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange,
    ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use super::grant::{Grant, GrantKey, KEY_LEN};
use super::links::LinkInfo;
use super::manifests::{TagEntry, MAX_MANIFEST_SIZE};
use super::metrics::FailReason;
use super::store::{read_exact_at, write_chunks};
use crate::config::S3Config;
use crate::protocol::grammar::{Digest, Hasher};
pub use lease::Lease;
use metrics::{Op, Res, SharedMetrics, WaitEnd};

/// Blobs up to this size are uploaded with one conditional PUT; larger ones in parts.
pub const SINGLE_PUT_MAX: u64 = 8 << 20;
/// Multipart part size.
const PART_SIZE: usize = 8 << 20;
/// The slowest upload (bytes per second) that is still waited for; see
/// [`Shared::upload_timeout`].
const MIN_UPLOAD_RATE: u64 = 1 << 20;
/// How long the tier is skipped after an error of the store.
pub const REST_AFTER_ERROR: Duration = Duration::from_secs(5);
/// Rounds of "look in the bucket, else take or wait for the lease" per fill.
const ROUNDS: usize = 3;
/// Blobs up to this size are read from the bucket and verified whole before any client sees
/// a byte, so a corrupt object costs nothing but a detour upstream. Larger ones stream to the
/// fill's readers as they arrive (a client's first byte must not wait for gigabytes); a
/// corrupt one then fails the fill like a bad upstream body (readers never get a clean end
/// of unverified bytes), and the retry goes upstream because the object was deleted.
pub const VERIFY_BEFORE_STREAMING_MAX: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared cache store: {0}")]
    Store(#[from] object_store::Error),
    #[error("shared cache metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// An object-store call's failure, as the tier sees it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    Missing,
    #[error("already exists")]
    Exists,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Other(String),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::Missing,
            object_store::Error::AlreadyExists { .. } => StoreError::Exists,
            other => StoreError::Other(other.to_string()),
        }
    }
}

/// What the shared tier did for a fill before any upstream request.
#[derive(Debug)]
pub enum Before {
    /// `size` verified bytes are in the fill's temp file: commit them.
    Filled(u64),
    /// Go upstream (the temp file is empty); holding the lease when `Some`.
    Upstream(Option<Lease>),
    /// A read streamed to the fill's readers broke off or did not verify: fail the fill.
    Failed(FailReason, String),
}

enum Read {
    Filled(u64),
    Missing,
    Corrupt(String),
    Failed,
}

/// Told of the bytes a streamed bucket read put in the temp file: `(size, written)`.
pub type Announce<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

pub struct Shared {
    store: Arc<dyn ObjectStore>,
    /// Empty or ending in `/`.
    prefix: String,
    lease_ttl: Duration,
    lease_wait: Duration,
    op_timeout: Duration,
    metrics: SharedMetrics,
    resting_until: Mutex<Option<Instant>>,
    /// Background writes (uploads, tags, links, origins) in flight, so that a process that
    /// exits after its work (`oci-proxy prewarm`) can wait for them ([`Shared::settle`]).
    background: Arc<InFlight>,
}

/// A count of background tasks, with a wake-up when it drops to zero.
#[derive(Default)]
struct InFlight {
    n: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One background task counted in [`InFlight`] until dropped.
struct Counted(Arc<InFlight>);

impl InFlight {
    fn start(self: &Arc<Self>) -> Counted {
        self.n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Counted(self.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// The bucket `cfg` names, as both the proxy and `gc-shared` reach it:
/// `AmazonS3Builder::from_env()` (credentials and defaults from the AWS environment
/// variables), then the config's keys override; `client` adds the caller's timeouts.
pub(crate) fn s3_builder(cfg: &S3Config, client: ClientOptions) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&cfg.bucket)
        .with_allow_http(cfg.allow_http)
        .with_client_options(
            client
                .with_connect_timeout(cfg.connect_timeout.0)
                .with_allow_http(cfg.allow_http),
        );
    if let Some(e) = &cfg.endpoint {
        b = b.with_endpoint(e.as_str().trim_end_matches('/'));
    }
    if let Some(r) = &cfg.region {
        b = b.with_region(r);
    }
    b
}

impl Shared {
    /// The S3 tier: `AmazonS3Builder::from_env()` (credentials and defaults from the AWS
    /// environment variables), then the config's keys override.
    pub fn open_s3(
        cfg: &S3Config,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Shared>, SharedError> {
        // Blob bodies may take long; small calls are bounded by `op_timeout`, blob reads by an
        // idle timeout between chunks.
        let client = ClientOptions::new().with_timeout_disabled();
        let b = s3_builder(cfg, client).with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 1,
            retry_timeout: cfg.op_timeout.0,
        });
        let store = b.build()?;
        tracing::info!(
            bucket = cfg.bucket.as_str(),
            prefix = cfg.prefix.as_str(),
            endpoint = cfg.endpoint.as_ref().map(|u| u.as_str()).unwrap_or("aws"),
            "shared cache tier on S3"
        );
        Shared::new(
            Arc::new(store),
            &cfg.prefix,
            cfg.lease_ttl.0,
            cfg.lease_wait.0,
            cfg.op_timeout.0,
            registry,
        )
    }

    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        lease_ttl: Duration,
        lease_wait: Duration,
        op_timeout: Duration,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Shared>, SharedError> {
        Ok(Arc::new(Shared {
            store,
            prefix: normalize_prefix(prefix),
            lease_ttl,
            lease_wait,
            op_timeout,
            metrics: SharedMetrics::register(registry)?,
            resting_until: Mutex::new(None),
            background: Arc::default(),
        }))
    }

    fn key(&self, rest: &str) -> Path {
        Path::from(format!("{}{rest}", self.prefix))
    }

    pub fn blob_key(&self, d: &Digest) -> Path {
        self.key(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    pub fn manifest_key(&self, d: &Digest) -> Path {
        self.key(&format!("manifests/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    pub fn lease_key(&self, d: &Digest) -> Path {
        self.key(&format!("leases/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    /// `tags/<sha256(repo_key)>/<tag>`: body `<digest> <checked_at_ms>`; overwritten by every
    /// replica that checks the tag upstream (tags move; the newest check wins).
    pub fn tag_key(&self, repo_key: &str, tag: &str) -> Path {
        let repo = Digest::sha256_of(repo_key.as_bytes());
        self.key(&format!("tags/{}/{tag}", repo.hex()))
    }

    pub fn link_key(&self, repo_key: &str, d: &Digest) -> Path {
        let repo = Digest::sha256_of(repo_key.as_bytes());
        self.key(&format!(
            "links/{}/{}/{}",
            repo.hex(),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    pub fn origin_key(&self, upstream: &str, d: &Digest) -> Path {
        let u = Digest::sha256_of(upstream.as_bytes());
        self.key(&format!(
            "origins/{}/{}/{}",
            u.hex(),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    /// The grant key replicas share: read from the bucket, or created there (a conditional
    /// create, so concurrent replicas end up with the same one). `None` when the store cannot
    /// say now: the caller then uses a local key, and links from the bucket do not count.
    pub async fn grant_key(&self) -> Option<GrantKey> {
        let key = self.key("grant.key");
        for _ in 0..2 {
            match self.get_small(&key, KEY_LEN as u64).await {
                Ok((_, b)) => {
                    self.metrics.op(Op::GrantKey, Res::Ok);
                    return GrantKey::from_bytes(&b).or_else(|| {
                        tracing::warn!("the shared grant.key is not a 32-byte key; ignored");
                        None
                    });
                }
                Err(StoreError::Missing) => {}
                Err(e) => {
                    self.failed(Op::GrantKey, &e);
                    return None;
                }
            }
            let fresh = GrantKey::random().ok()?;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            let body = PutPayload::from(Bytes::copy_from_slice(fresh.bytes()));
            match self.timed(self.store.put_opts(&key, body, opts)).await {
                Ok(_) => {
                    self.metrics.op(Op::GrantKey, Res::Ok);
                    return Some(fresh);
                }
                Err(StoreError::Exists) => continue, // another replica won: read theirs
                Err(e) => {
                    self.failed(Op::GrantKey, &e);
                    return None;
                }
            }
        }
        None
    }

    /// Whether the tier is in use (not resting after an error).
    fn available(&self) -> bool {
        let mut r = self.resting_until.lock().unwrap_or_else(|p| p.into_inner());
        match *r {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *r = None;
                tracing::info!("retrying the shared cache store");
                true
            }
            None => true,
        }
    }

    /// Counts and logs a failed call and rests the tier.
    fn failed(&self, op: Op, e: &StoreError) {
        self.metrics.op(op, Res::Error);
        tracing::warn!(
            op = op.as_str(),
            error = %e,
            rest_s = REST_AFTER_ERROR.as_secs(),
            "shared cache store failed; using upstream and the local cache only for a while"
        );
        *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + REST_AFTER_ERROR);
    }

    /// The tier's one call pattern: while it rests after an error the call is not made and
    /// counts as skipped; else `call` runs and its outcome is counted once: a value as `Ok`,
    /// a missing object as a miss, a lost create race as `Exists`, any other error rests the
    /// tier ([`Shared::failed`]). The value, on success only.
    async fn counted<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        if !self.available() {
            self.metrics.op(op, Res::Skipped);
            return None;
        }
        self.count(op, call.await)
    }

    /// [`Shared::counted`] for a write that nobody waits for: skipped now while the tier
    /// rests, else `call(shared)` runs in the background and its outcome is counted there.
    fn counted_in_background<F>(self: &Arc<Self>, op: Op, call: impl FnOnce(Arc<Shared>) -> F)
    where
        F: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        if !self.available() {
            self.metrics.op(op, Res::Skipped);
            return;
        }
        let (me, call) = (self.clone(), call(self.clone()));
        let counted = self.background.start();
        tokio::spawn(async move {
            me.count(op, call.await);
            drop(counted);
        });
    }

    fn count<T>(&self, op: Op, outcome: Result<T, StoreError>) -> Option<T> {
        match outcome {
            Ok(v) => {
                self.metrics.op(op, Res::Ok);
                Some(v)
            }
            Err(StoreError::Missing) => {
                self.metrics.op(op, Res::Miss);
                None
            }
            Err(StoreError::Exists) => {
                self.metrics.op(op, Res::Exists);
                None
            }
            Err(e) => {
                self.failed(op, &e);
                None
            }
        }
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        self.bounded(self.op_timeout, f).await
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    /// GETs a small object whole (at most `max` bytes, else an error), with its
    /// Content-Type; each call bounded by `op_timeout`.
    async fn get_small(&self, key: &Path, max: u64) -> Result<(Option<String>, Bytes), StoreError> {
        let r = self.timed(self.store.get(key)).await?;
        if r.meta.size > max {
            let size = r.meta.size;
            return Err(StoreError::Other(format!(
                "{key}: {size} bytes, more than {max}"
            )));
        }
        let media_type = r
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_owned());
        Ok((media_type, self.timed(r.bytes()).await?))
    }

    /// HEAD: `None` when the store failed.
    async fn exists(&self, key: &Path, op: Op) -> Option<bool> {
        match self.timed(self.store.head(key)).await {
            Ok(_) => Some(true),
            Err(StoreError::Missing) => Some(false),
            Err(e) => {
                self.failed(op, &e);
                None
            }
        }
    }

    async fn delete(&self, key: &Path) {
        match self.timed(self.store.delete(key)).await {
            Ok(()) | Err(StoreError::Missing) => {}
            Err(e) => tracing::warn!(key = key.as_ref(), error = %e, "shared cache delete failed"),
        }
    }

    /// Before a fill goes upstream: fills `file` from the bucket when the blob is there (and
    /// matches its digest), else takes the lease, or waits for the replica holding it. A read
    /// of a blob above [`VERIFY_BEFORE_STREAMING_MAX`] reports its progress to `announce`.
    pub async fn before_upstream(
        self: &Arc<Self>,
        digest: &Digest,
        file: &Arc<File>,
        announce: Announce<'_>,
    ) -> Before {
        if !self.available() {
            self.metrics.op(Op::GetBlob, Res::Skipped);
            return Before::Upstream(None);
        }
        // However many rounds wait for another replica, together at most `lease_wait`.
        let wait_deadline = Instant::now() + self.lease_wait;
        for _ in 0..ROUNDS {
            let streamed = AtomicBool::new(false);
            let tell = |size: u64, written: u64| {
                streamed.store(true, Ordering::Relaxed);
                announce(size, written);
            };
            let read = self.read_into(digest, file, &tell).await;
            let streamed = streamed.load(Ordering::Relaxed);
            match read {
                Read::Filled(n) => return Before::Filled(n),
                Read::Missing => {}
                Read::Corrupt(detail) => {
                    self.metrics.corrupt();
                    tracing::warn!(%digest, detail, "shared cache object is corrupt; deleted, fetching upstream");
                    self.delete(&self.blob_key(digest)).await;
                    if streamed {
                        let msg = format!("shared cache object is corrupt: {detail}");
                        return Before::Failed(FailReason::DigestMismatch, msg);
                    }
                    if reset(file).await.is_err() {
                        return Before::Upstream(None);
                    }
                }
                Read::Failed if streamed => {
                    let msg = "reading the shared cache store broke off".to_owned();
                    return Before::Failed(FailReason::StoreError, msg);
                }
                Read::Failed => {
                    // The file may hold part of a read; a fill needs it empty.
                    let _ = reset(file).await;
                    return Before::Upstream(None);
                }
            }
            match lease::acquire(self, digest).await {
                lease::Acquire::Held(l) => {
                    // The blob may have landed between the GET and the lease.
                    match self.exists(&self.blob_key(digest), Op::HeadBlob).await {
                        Some(true) => l.release().await,
                        Some(false) => return Before::Upstream(Some(l)),
                        None => return Before::Upstream(Some(l)),
                    }
                }
                lease::Acquire::Busy { expires_ms } => {
                    match lease::wait_until(self, digest, expires_ms, wait_deadline).await {
                        WaitEnd::Landed | WaitEnd::Released => {}
                        WaitEnd::Expired | WaitEnd::TimedOut | WaitEnd::Error => {
                            return Before::Upstream(None)
                        }
                    }
                }
                lease::Acquire::Stale => {}
                lease::Acquire::Failed => return Before::Upstream(None),
            }
        }
        Before::Upstream(None)
    }

    /// GETs the blob into `file` (from its start), hashing as bytes arrive; above
    /// [`VERIFY_BEFORE_STREAMING_MAX`], tells `announce` of every write. (`object_store` resumes
    /// a body that breaks off with a ranged GET from where it stopped, once.)
    async fn read_into(&self, digest: &Digest, file: &Arc<File>, announce: Announce<'_>) -> Read {
        let res = match self.timed(self.store.get(&self.blob_key(digest))).await {
            Ok(r) => r,
            Err(StoreError::Missing) => {
                self.metrics.op(Op::GetBlob, Res::Miss);
                return Read::Missing;
            }
            Err(e) => {
                self.failed(Op::GetBlob, &e);
                return Read::Failed;
            }
        };
        let size = res.meta.size;
        // Readers are told only of bytes in the file: a read that fails before its first
        // write can still go upstream within the same fill.
        let stream_it = size > VERIFY_BEFORE_STREAMING_MAX;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut written: u64 = 0;
        let mut chunks = res.into_stream().ready_chunks(64);
        loop {
            let batch = match tokio::time::timeout(self.op_timeout, chunks.next()).await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(_) => {
                    self.failed(Op::GetBlob, &StoreError::Timeout(self.op_timeout));
                    return Read::Failed;
                }
            };
            let mut data: Vec<Bytes> = Vec::with_capacity(batch.len());
            for item in batch {
                match item {
                    Ok(b) => data.push(b),
                    Err(e) => {
                        self.failed(Op::GetBlob, &StoreError::from(e));
                        return Read::Failed;
                    }
                }
            }
            let n: u64 = data.iter().map(|b| b.len() as u64).sum();
            if written + n > size {
                return Read::Corrupt(format!("body longer than its {size} bytes"));
            }
            for b in &data {
                hasher.update(b);
            }
            let f = file.clone();
            let w = tokio::task::spawn_blocking(move || write_chunks(&f, &data))
                .await
                .map_err(io::Error::other)
                .and_then(|r| r);
            if let Err(e) = w {
                tracing::warn!(%digest, error = %e, "cannot write a shared blob to the local cache");
                return Read::Failed;
            }
            written += n;
            if stream_it {
                announce(size, written);
            }
        }
        if written != size {
            return Read::Corrupt(format!("{written} of {size} bytes"));
        }
        if !hasher.matches(digest) {
            return Read::Corrupt(format!("{written} bytes do not match the digest"));
        }
        self.metrics.op(Op::GetBlob, Res::Ok);
        self.metrics.read(written);
        tracing::info!(%digest, size = written, "filled from the shared cache store");
        Read::Filled(written)
    }

    /// Size of the blob's object in the bucket (a HEAD); `None` when it is not there or the
    /// store cannot say now.
    pub async fn blob_size(&self, digest: &Digest) -> Option<u64> {
        let key = self.blob_key(digest);
        let meta = self
            .counted(Op::HeadBlob, self.timed(self.store.head(&key)))
            .await?;
        Some(meta.size)
    }

    /// Bytes `[start, end]` (inclusive) of the blob's object with one ranged GET, streamed as
    /// they arrive. `None` when the store cannot start the read (nothing was sent yet: the
    /// caller goes upstream); a failure later ends the stream with an `Err`, and a body longer
    /// or shorter than the range too. A range cannot be checked against the digest on its
    /// own: the caller starts a whole-blob fill, which verifies the object (and deletes it
    /// when corrupt) as it lands in the local tier.
    pub async fn get_range(
        self: &Arc<Self>,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Option<BoxStream<'static, io::Result<Bytes>>> {
        if !self.available() {
            self.metrics.op(Op::GetRange, Res::Skipped);
            return None;
        }
        let want = end.checked_add(1)?.checked_sub(start)?;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(start..end + 1)),
            ..Default::default()
        };
        let key = self.blob_key(digest);
        let get = async {
            let r = self.timed(self.store.get_opts(&key, opts)).await?;
            if r.range != (start..end + 1) {
                return Err(StoreError::Other(format!(
                    "asked for bytes {start}-{end}, got {:?}",
                    r.range
                )));
            }
            Ok(r)
        };
        let res = self.counted(Op::GetRange, get).await?;
        struct St {
            body: BoxStream<'static, object_store::Result<Bytes>>,
            got: u64,
            shared: Arc<Shared>,
        }
        let st = St {
            body: res.into_stream(),
            got: 0,
            shared: self.clone(),
        };
        let body = stream::unfold(Some(st), move |st| async move {
            let mut st = st?;
            let timeout = st.shared.op_timeout;
            let fail = |st: &St, e: StoreError| {
                st.shared.failed(Op::GetRange, &e);
                Some((Err(io::Error::other(e.to_string())), None))
            };
            match tokio::time::timeout(timeout, st.body.next()).await {
                Err(_) => fail(&st, StoreError::Timeout(timeout)),
                Ok(Some(Err(e))) => fail(&st, StoreError::from(e)),
                Ok(Some(Ok(b))) if st.got + b.len() as u64 > want => fail(
                    &st,
                    StoreError::Other("ranged body longer than asked".into()),
                ),
                Ok(Some(Ok(b))) => {
                    st.got += b.len() as u64;
                    st.shared.metrics.read(b.len() as u64);
                    Some((Ok(b), Some(st)))
                }
                Ok(None) if st.got < want => {
                    let e = format!("ranged body ended after {} of {want} bytes", st.got);
                    fail(&st, StoreError::Other(e))
                }
                Ok(None) => None,
            }
        });
        Some(body.boxed())
    }

    /// Uploads a committed, verified blob in the background (reading the open file, which
    /// survives rename and eviction), then releases `lease`.
    pub fn upload_blob(
        self: &Arc<Self>,
        digest: Digest,
        file: Arc<File>,
        size: u64,
        lease: Option<Lease>,
    ) {
        let me = self.clone();
        let counted = self.background.start();
        tokio::spawn(async move {
            me.put_blob(&digest, &file, size).await;
            if let Some(l) = lease {
                l.release().await;
            }
            drop(counted);
        });
    }

    /// Waits (at most `timeout`) until no background write is in flight; whether none is.
    pub(crate) async fn settle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.background.idle.notified();
                if self.background.n.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    async fn put_blob(&self, digest: &Digest, file: &Arc<File>, size: u64) {
        if !self.available() {
            self.metrics.op(Op::PutBlob, Res::Skipped);
            return;
        }
        let key = self.blob_key(digest);
        match self.exists(&key, Op::HeadBlob).await {
            Some(true) => {
                self.metrics.op(Op::PutBlob, Res::Exists);
                return;
            }
            Some(false) => {}
            None => return,
        }
        let res = if size <= SINGLE_PUT_MAX {
            self.put_small(&key, file, size).await
        } else {
            self.put_parts(&key, file, size).await
        };
        match res {
            Ok(()) => {
                self.metrics.op(Op::PutBlob, Res::Ok);
                self.metrics.uploaded(size);
                tracing::info!(%digest, size, "uploaded to the shared cache store");
            }
            Err(StoreError::Exists) => self.metrics.op(Op::PutBlob, Res::Exists),
            Err(e) => self.failed(Op::PutBlob, &e),
        }
    }

    async fn read_part(file: &Arc<File>, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let f = file.clone();
        tokio::task::spawn_blocking(move || read_exact_at(&f, offset, len))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| StoreError::Other(format!("reading the cached file: {e}")))
    }

    async fn put_small(&self, key: &Path, file: &Arc<File>, size: u64) -> Result<(), StoreError> {
        let len = usize::try_from(size).map_err(|e| StoreError::Other(e.to_string()))?;
        let bytes = Self::read_part(file, 0, len).await?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = self.store.put_opts(key, PutPayload::from(bytes), opts);
        self.bounded(self.upload_timeout(size), put)
            .await
            .map(|_| ())
    }

    async fn put_parts(&self, key: &Path, file: &Arc<File>, size: u64) -> Result<(), StoreError> {
        let upload = self.timed(self.store.put_multipart(key)).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        // Two parts may be in flight: waiting for room is waiting for at most two part uploads.
        let part_timeout = self.upload_timeout(2 * PART_SIZE as u64);
        let mut offset = 0u64;
        while offset < size {
            let len = usize::try_from((size - offset).min(PART_SIZE as u64)).unwrap_or(PART_SIZE);
            let part = match Self::read_part(file, offset, len).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e);
                }
            };
            if let Err(e) = self.bounded(part_timeout, w.wait_for_capacity(2)).await {
                let _ = w.abort().await;
                return Err(e);
            }
            w.put(part);
            offset += len as u64;
        }
        self.bounded(part_timeout, w.finish()).await.map(|_| ())
    }

    /// How long one upload call may take for `len` bytes: `op_timeout` plus the time the
    /// bytes need at [`MIN_UPLOAD_RATE`]. A stalled upload must end: its fill lease is renewed
    /// until the upload returns, and every other replica's miss on that digest waits for it.
    fn upload_timeout(&self, len: u64) -> Duration {
        self.op_timeout + Duration::from_secs(len.div_ceil(MIN_UPLOAD_RATE))
    }

    /// A verified manifest from the bucket: `(media type, bytes)`.
    pub async fn get_manifest(&self, digest: &Digest) -> Option<(String, Bytes)> {
        if !self.available() {
            self.metrics.op(Op::GetManifest, Res::Skipped);
            return None;
        }
        let key = self.manifest_key(digest);
        match self.get_small(&key, MAX_MANIFEST_SIZE as u64).await {
            Ok((Some(mt), bytes)) if digest.verify(&bytes) => {
                self.metrics.op(Op::GetManifest, Res::Ok);
                Some((mt, bytes))
            }
            Ok(_) => {
                self.metrics.corrupt();
                tracing::warn!(%digest, "shared manifest object is corrupt; deleted");
                self.delete(&self.manifest_key(digest)).await;
                None
            }
            Err(StoreError::Missing) => {
                self.metrics.op(Op::GetManifest, Res::Miss);
                None
            }
            Err(e) => {
                self.failed(Op::GetManifest, &e);
                None
            }
        }
    }

    /// Uploads a verified manifest in the background.
    pub fn put_manifest(self: &Arc<Self>, digest: &Digest, media_type: &str, bytes: Bytes) {
        let key = self.manifest_key(digest);
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::ContentType,
            AttributeValue::from(media_type.to_owned()),
        );
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..Default::default()
        };
        self.counted_in_background(Op::PutManifest, |me| async move {
            me.timed(me.store.put_opts(&key, PutPayload::from(bytes), opts))
                .await
                .map(|_| ())
        });
    }

    /// The tag as another replica last checked it upstream; `None` when absent, unreadable
    /// or the store cannot say now.
    pub async fn get_tag(&self, repo_key: &str, tag: &str) -> Option<TagEntry> {
        let key = self.tag_key(repo_key, tag);
        let (_, b) = self.counted(Op::GetTag, self.get_small(&key, 1024)).await?;
        let parsed = std::str::from_utf8(&b).ok().and_then(|s| {
            let mut it = s.split_whitespace();
            let digest = Digest::parse(it.next()?).ok()?;
            let ms = it.next()?.parse::<u64>().ok()?;
            Some(TagEntry {
                digest,
                checked_at: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                grant: it.next().and_then(Grant::from_hex),
            })
        });
        if parsed.is_none() {
            tracing::warn!(
                repository = repo_key,
                tag,
                "unreadable shared tag object; ignored"
            );
        }
        parsed
    }

    /// Records (or, with `None`, deletes: the upstream said 404) a tag in the bucket, in the
    /// background.
    pub fn put_tag(
        self: &Arc<Self>,
        repo_key: &str,
        tag: &str,
        digest: Option<&Digest>,
        grant: Grant,
    ) {
        let key = self.tag_key(repo_key, tag);
        let now = super::manifests::to_ms(SystemTime::now());
        let body = digest.map(|d| format!("{d} {now} {}", grant.to_hex()));
        self.counted_in_background(Op::PutTag, |me| async move {
            match body {
                Some(body) => me
                    .timed(me.store.put(&key, PutPayload::from(body)))
                    .await
                    .map(|_| ()),
                None => match me.timed(me.store.delete(&key)).await {
                    Err(StoreError::Missing) => Ok(()),
                    r => r,
                },
            }
        });
    }

    /// The link a replica recorded for `repo_key` and `digest` (the newest confirmation).
    pub async fn get_link(&self, repo_key: &str, digest: &Digest) -> Option<LinkInfo> {
        let key = self.link_key(repo_key, digest);
        let (_, b) = self
            .counted(Op::HeadLink, self.get_small(&key, 256))
            .await?;
        let s = std::str::from_utf8(&b).ok()?;
        let (g, at) = s.trim().split_once(' ')?;
        Some(LinkInfo {
            grant: Grant::from_hex(g)?,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(at.parse().ok()?),
        })
    }

    /// Records a link in the bucket (overwriting an older one), in the background.
    pub fn put_link(self: &Arc<Self>, repo_key: &str, digest: &Digest, link: LinkInfo) {
        let key = self.link_key(repo_key, digest);
        let body = format!(
            "{} {}",
            link.grant.to_hex(),
            super::manifests::to_ms(link.at)
        );
        self.counted_in_background(Op::PutLink, |me| async move {
            me.timed(me.store.put(&key, PutPayload::from(body)))
                .await
                .map(|_| ())
        });
    }

    /// Whether a replica recorded that `digest` was fetched from `upstream`.
    pub async fn has_origin(&self, upstream: &str, digest: &Digest) -> bool {
        let key = self.origin_key(upstream, digest);
        self.counted(Op::HeadOrigin, self.timed(self.store.head(&key)))
            .await
            .is_some()
    }

    /// Records an origin in the bucket, in the background.
    pub fn put_origin(self: &Arc<Self>, upstream: &str, digest: &Digest) {
        let key = self.origin_key(upstream, digest);
        self.counted_in_background(Op::PutOrigin, |me| async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            me.timed(me.store.put_opts(&key, PutPayload::new(), opts))
                .await
                .map(|_| ())
        });
    }
}

/// Empties a fill's temp file after a shared read that will not be committed.
async fn reset(file: &Arc<File>) -> io::Result<()> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || {
        f.set_len(0)?;
        (&*f).seek(SeekFrom::Start(0)).map(|_| ())
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests;
