//! The digest-verified cache: blobs (content-addressed files filled once per digest from
//! upstream), manifests by digest, tags, and the repository ↔ digest links that say which
//! repository may read what, under which grant, and where each object's bytes came from
//! (the read rule: [`links`], [`grant`]).
//!
//! The cache knows nothing about HTTP, upstreams or credentials: [`Cache::blob`] is handed a
//! [`FetchFn`] to call on a miss. Submodules: [`store`] (files on disk), [`fill`] (single
//! flight, tee, verify), [`reader`] (streams to clients), [`links`], [`manifests`] (and
//! tags), [`journal`] (their persistence), [`evict`] (size bound), [`metrics`], and
//! [`shared`]: the optional tier on an S3 bucket that replicas share (looked at before
//! upstream on a local miss; fed in the background after each verified local commit).
//!
//! Integrity choices: a blob is committed only after its size and digest matched (fsync, then
//! atomic rename to `<hex>.<size>`). Open rebuilds the index from directory listings only;
//! a background [`scrub`] then drops files whose length differs from the size in their name,
//! and every hit checks the opened file's length too, so a truncated file is never served.
//! Content is hashed again lazily on the first read after a restart: inline for a whole-blob
//! read (the stream ends with an error and the file is dropped on a mismatch), up front for a
//! ranged read.

mod budget;
mod direct;
mod evict;
mod fill;
mod grant;
mod journal;
mod links;
mod manifests;
mod memory;
mod metrics;
mod reader;
mod scrub;
mod shared;
mod store;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use tokio::sync::{mpsc, Notify};

use crate::protocol::grammar::Digest;
use fill::{Fill, LeadGuard, Phase};
use grant::GrantKey;
use links::Links;
use manifests::{Manifests, Tags};
use metrics::{Metrics, Refusal};
use reader::Source;
use store::Store;

pub(crate) use budget::{enforce as enforce_fill_limits, FillLimits};
pub(crate) use grant::Grant;
pub(crate) use links::LinkInfo;
pub(crate) use manifests::{CachedManifest, TagEntry, MAX_MANIFEST_SIZE};
pub(crate) use metrics::FailReason;
pub(crate) use reader::BlobReader;
pub use shared::gc;

/// `stream` of `digest`'s bytes, hashed as it passes: at its end `on_verified` runs when they
/// match; when they do not, the stream ends with an error (a client never sees a clean end of
/// unverified bytes).
///
/// The newest chunk is always held back until the next one arrives, and the last one until
/// the whole body is hashed: hyper stops polling a body once its `Content-Length` bytes are
/// out, so a verdict that came only after the last byte would never be seen, and the client
/// would get a clean end on bytes nobody checked.
pub(crate) fn verify_stream(
    digest: Digest,
    stream: BoxStream<'static, Result<bytes::Bytes, io::Error>>,
    on_verified: Box<dyn FnOnce() + Send>,
) -> BoxStream<'static, Result<bytes::Bytes, io::Error>> {
    use futures_util::StreamExt;
    struct Verify {
        stream: BoxStream<'static, Result<bytes::Bytes, io::Error>>,
        hasher: crate::protocol::grammar::Hasher,
        digest: Digest,
        on_verified: Box<dyn FnOnce() + Send>,
        held: Option<bytes::Bytes>,
    }
    let state = Verify {
        hasher: crate::protocol::grammar::Hasher::new(digest.algorithm()),
        stream,
        digest,
        on_verified,
        held: None,
    };
    futures_util::stream::unfold(Some(state), |v| async move {
        let mut v = v?;
        loop {
            match v.stream.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    v.hasher.update(&chunk);
                    if let Some(prev) = v.held.replace(chunk) {
                        return Some((Ok(prev), Some(v)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    let Verify {
                        hasher,
                        digest,
                        on_verified,
                        held,
                        ..
                    } = v;
                    if !hasher.matches(&digest) {
                        let e = io::Error::other(format!("content does not match {digest}"));
                        return Some((Err(e), None));
                    }
                    on_verified();
                    return held.map(|last| (Ok(last), None));
                }
            }
        }
    })
    .boxed()
}

/// Starts the upstream GET for a blob; called at most once per [`Cache::blob`] call.
pub(crate) type FetchFn =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<UpstreamBody, FetchError>> + Send>;

/// An upstream response body.
pub struct UpstreamBody {
    /// Content-Length, when the upstream sent one.
    pub size: Option<u64>,
    pub stream: BoxStream<'static, Result<bytes::Bytes, io::Error>>,
}

/// The caller's fetch error, opaque to the cache and handed back intact (shared, not
/// flattened) to every request waiting on the fill, so each maps the very error the fetch
/// met; the caller recovers its type with [`FetchError::downcast_ref`].
#[derive(Clone)]
pub struct FetchError(Arc<dyn std::error::Error + Send + Sync>);

impl FetchError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> FetchError {
        FetchError(Arc::new(error))
    }

    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Debug for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O: {0}")]
    Io(#[from] io::Error),
    #[error("cache metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The upstream fetch failed (for the request that started it and all that joined it).
    #[error(transparent)]
    Fetch(FetchError),
    /// The fill this request joined failed before the request got any bytes; retrying starts
    /// a new fill.
    #[error("the fill of {digest} failed ({}): {message}", reason.as_str())]
    FillFailed {
        digest: Digest,
        reason: FailReason,
        message: String,
    },
    #[error("content does not match digest {0}")]
    DigestMismatch(Digest),
    #[error("invalid media type")]
    InvalidMediaType,
    #[error("manifest of {0} bytes is larger than the 4MiB limit")]
    ManifestTooLarge(usize),
    #[error(transparent)]
    Shared(#[from] shared::SharedError),
}

/// How a blob request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From a committed file.
    Hit,
    /// Following a fill another request started.
    Coalesced,
    /// This request started the fill.
    Miss,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Coalesced => "coalesced",
            Outcome::Miss => "miss",
        }
    }
}

/// A committed blob in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    size: u64,
    last_used: u64,
    /// Hashed since this process opened the cache.
    verified: bool,
    /// Unique per commit/rebuild: a late drop only removes the file it looked at.
    gen: u64,
}

/// The index and the fills in flight, under one lock so a request sees exactly one of
/// "committed", "being filled" or "absent".
#[derive(Default)]
pub(crate) struct State {
    index: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
    inflight: HashMap<Digest, Arc<Fill>>,
    /// The upstream each in-flight fill fetches from (recorded as an origin at commit,
    /// unless the fill was served from the shared tier).
    fill_origins: HashMap<Digest, (Arc<Fill>, String)>,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn insert(&mut self, digest: Digest, size: u64, verified: bool, gen: u64) {
        let last_used = self.tick();
        let e = Entry {
            size,
            last_used,
            verified,
            gen,
        };
        if let Some(old) = self.index.insert(digest, e) {
            self.total -= old.size;
        }
        self.total += size;
    }

    fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        let e = self.index.remove(digest)?;
        self.total -= e.size;
        Some(e)
    }
}

pub(crate) struct Inner {
    store: Store,
    state: Mutex<State>,
    metrics: Metrics,
    links: Links,
    grant_key: GrantKey,
    manifests: Manifests,
    tags: Tags,
    max_size: Option<u64>,
    /// The tier replicas share, when `cache.backend` is `s3`.
    shared: Option<Arc<shared::Shared>>,
    evict_notify: Arc<Notify>,
    ids: AtomicU64,
    /// `cache.direct_writes`: fills write their temp file with `O_DIRECT` ([`direct`]).
    direct_writes: bool,
    /// Large page-cache reads of hits alive at once ([`reader::LARGE_CHUNKS`]).
    large_reads: Arc<tokio::sync::Semaphore>,
    /// What all fills together hold in memory ([`memory`]).
    fill_memory: Arc<memory::FillMemory>,
    /// Tests: writes fail once the temp file would exceed this many bytes.
    #[cfg(test)]
    fault: Mutex<Option<u64>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the eviction task see the cache is gone.
        self.evict_notify.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the cache; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes `fill` out of the in-flight map (if it is still the one there).
    pub(crate) fn forget_fill(&self, fill: &Arc<Fill>) {
        let mut st = self.lock();
        if st
            .inflight
            .get(&fill.digest)
            .is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            st.inflight.remove(&fill.digest);
        }
        if st
            .fill_origins
            .get(&fill.digest)
            .is_some_and(|(f, _)| Arc::ptr_eq(f, fill))
        {
            st.fill_origins.remove(&fill.digest);
        }
    }

    /// Bytes on disk besides blobs that count toward `cache.max_size`: manifest files and the
    /// links and tags journals. Blocking (two `stat`s).
    pub(crate) fn metadata_bytes(&self) -> u64 {
        let journals: u64 = ["links.jsonl", "tags.jsonl"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.store.root().join(f)).ok())
            .map(|m| m.len())
            .sum();
        self.manifests.disk_bytes() + journals
    }

    /// Records a committed fill: indexed and out of flight in one step.
    /// Indexes a committed fill and records its origin. The returned task appends the origin
    /// to the journal: await it before readers hear of the commit, so a process killed right
    /// after a client got its last byte still knows where the blob came from.
    pub(crate) fn committed(
        &self,
        fill: &Arc<Fill>,
        size: u64,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        let gen = self.next_id();
        let mut journaled = None;
        {
            let mut st = self.lock();
            st.insert(fill.digest.clone(), size, true, gen);
            if st
                .inflight
                .get(&fill.digest)
                .is_some_and(|f| Arc::ptr_eq(f, fill))
            {
                st.inflight.remove(&fill.digest);
            }
            let origin = match st.fill_origins.remove(&fill.digest) {
                Some((f, upstream)) if Arc::ptr_eq(&f, fill) => Some(upstream),
                Some(other) => {
                    st.fill_origins.insert(fill.digest.clone(), other);
                    None
                }
                None => None,
            };
            self.metrics.set_totals(st.total, st.index.len());
            // Verified bytes from that upstream (not from the bucket): its origin.
            if let Some(upstream) = origin.filter(|_| !fill.from_shared.load(Ordering::Acquire)) {
                journaled = self.links.add_origin(&fill.digest, &upstream);
                if let Some(s) = &self.shared {
                    s.put_origin(&upstream, &fill.digest);
                }
            }
        }
        self.metrics.fill_committed(&fill.digest, size);
        if self.max_size.is_some() {
            self.evict_notify.notify_one();
        }
        journaled
    }

    /// Forgets a blob whose file is gone (only the version `gen` refers to).
    pub(crate) fn forget_blob(&self, digest: &Digest, gen: u64) {
        let mut st = self.lock();
        if st.index.get(digest).is_some_and(|e| e.gen == gen) {
            st.remove(digest);
            self.metrics.set_totals(st.total, st.index.len());
        }
    }

    pub(crate) fn mark_verified(&self, digest: &Digest, gen: u64) {
        if let Some(e) = self.lock().index.get_mut(digest).filter(|e| e.gen == gen) {
            e.verified = true;
        }
    }

    /// Drops a committed blob found corrupt (only the version `gen` refers to).
    pub(crate) fn drop_corrupt(&self, digest: &Digest, gen: u64, detail: &str) {
        let mut st = self.lock();
        if st.index.get(digest).is_some_and(|e| e.gen == gen) {
            if let Some(e) = st.remove(digest) {
                let _ = self.store.remove_blob(digest, e.size);
            }
            self.metrics.set_totals(st.total, st.index.len());
        }
        drop(st);
        self.metrics.corrupt(digest, detail);
    }

    /// Test fault injection: an error if writing up to `upto` bytes should fail.
    #[cfg(test)]
    pub(crate) fn fault_before(&self, upto: u64) -> io::Result<()> {
        match *self.fault.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(limit) if upto > limit || (upto == 0 && limit == 0) => {
                Err(io::Error::other("injected write error"))
            }
            _ => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline]
    pub(crate) fn fault_before(&self, _upto: u64) -> io::Result<()> {
        Ok(())
    }
}

/// The cache. `Send + Sync`, shared as `Arc<Cache>`.
pub struct Cache {
    inner: Arc<Inner>,
}

/// How many times [`Cache::blob`] re-looks when a fill it joined lost its file.
const ATTEMPTS: usize = 3;

/// How long a command that fills the cache and exits (`prewarm`, `import`) waits at the end
/// for its uploads to the S3 tier.
pub(crate) const SHARED_SETTLE_WAIT: Duration = Duration::from_secs(600);

enum Step {
    Hit(Entry),
    Follow(Arc<Fill>),
    Lead(Arc<Fill>, mpsc::Receiver<fill::Direct>),
}

impl Cache {
    /// Opens (creating) the cache under `cfg.dir`: rebuilds the index from disk, removes
    /// leftover temp files, drops truncated files; registers metrics; spawns eviction when
    /// `cfg.max_size` is set.
    pub async fn open(
        cfg: &crate::config::CacheConfig,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Cache>, CacheError> {
        let shared = match (&cfg.backend, &cfg.s3) {
            (crate::config::CacheBackend::S3, Some(s3)) => {
                Some(shared::Shared::open_s3(s3, registry)?)
            }
            _ => None,
        };
        Cache::open_with(cfg, registry, shared).await
    }

    /// [`Cache::open`] with the shared tier given.
    pub(crate) async fn open_with(
        cfg: &crate::config::CacheConfig,
        registry: &prometheus::Registry,
        shared: Option<Arc<shared::Shared>>,
    ) -> Result<Arc<Cache>, CacheError> {
        let started = Instant::now();
        let metrics = Metrics::register(registry)?;
        let store = Store::new(&cfg.dir);
        let s2 = store.clone();
        let (rebuilt, links, tags, local_key) = tokio::task::spawn_blocking(move || {
            s2.create_dirs()?;
            let r = s2.rebuild()?;
            let links = Links::open(s2.root(), links::DEFAULT_MAX_LINKS)?;
            let tags = Tags::open(s2.root())?;
            let key = GrantKey::load_or_create(s2.root())?;
            Ok::<_, io::Error>((r, links, tags, key))
        })
        .await
        .map_err(io::Error::other)??;
        // With a shared tier, the bucket's key, so that replicas agree on grants (and links
        // recorded by one count for the others); the local one when the bucket cannot say.
        let grant_key = match &shared {
            Some(s) => s.grant_key().await.unwrap_or_else(|| {
                tracing::warn!(
                    "shared grant key unavailable: links in the bucket will not count here"
                );
                local_key
            }),
            None => local_key,
        };
        let manifests = Manifests::new(&cfg.dir)?;

        let mut state = State::default();
        let ids = AtomicU64::new(1);
        state.index.reserve(rebuilt.blobs.len());
        let mut duplicates = Vec::new();
        for f in rebuilt.blobs {
            if state.index.contains_key(&f.digest) {
                duplicates.push(f); // one file per digest; the scrub would not see this one
                continue;
            }
            let gen = ids.fetch_add(1, Ordering::Relaxed);
            state.insert(f.digest, f.size, false, gen);
        }
        for f in &duplicates {
            metrics.corrupt(&f.digest, "duplicate file");
            let _ = store.remove_blob(&f.digest, f.size);
        }
        let untouched = state.clock;
        for (digest, why) in &rebuilt.dropped {
            match digest {
                Some(d) => metrics.corrupt(d, why),
                None => tracing::warn!(
                    detail = why.as_str(),
                    "removed stray file from the cache dir"
                ),
            }
        }
        metrics.set_totals(state.total, state.index.len());
        tracing::info!(
            dir = %cfg.dir.display(),
            blobs = state.index.len(),
            bytes = state.total,
            dropped = rebuilt.dropped.len(),
            temp_removed = rebuilt.temp_removed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cache opened"
        );
        let notify = Arc::new(Notify::new());
        let fill_memory = Arc::new(memory::FillMemory::new(metrics.fills_running()));
        let inner = Arc::new(Inner {
            store,
            state: Mutex::new(state),
            metrics,
            links,
            grant_key,
            manifests,
            tags,
            max_size: cfg.max_size.map(|s| s.0),
            shared,
            evict_notify: notify.clone(),
            ids,
            direct_writes: cfg.direct_writes,
            large_reads: Arc::new(tokio::sync::Semaphore::new(reader::LARGE_CHUNKS)),
            fill_memory,
            #[cfg(test)]
            fault: Mutex::new(None),
        });
        if inner.max_size.is_some() {
            // The scrub nudges eviction when it has ordered the blobs by age.
            evict::spawn(Arc::downgrade(&inner), notify.clone());
        }
        scrub::spawn(inner.clone(), untouched);
        Ok(Arc::new(Cache { inner }))
    }

    /// Waits (at most `timeout`, e.g. [`SHARED_SETTLE_WAIT`]) for the shared tier's background writes started so far
    /// (uploads of committed blobs, manifests, links, tags, origins) to finish, for a process
    /// that exits after filling the cache (`prewarm`, `import`); whether they did. Without a
    /// shared tier there is nothing to wait for.
    pub(crate) async fn settle(&self, timeout: Duration) -> bool {
        match &self.inner.shared {
            Some(s) => tokio::time::timeout(timeout, s.flush()).await.is_ok(),
            None => true,
        }
    }

    /// Size of a committed blob, if cached.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.inner.lock().index.get(digest).map(|e| e.size)
    }

    /// A blob for a client: committed → [`Outcome::Hit`]; being filled →
    /// [`Outcome::Coalesced`] (follows the fill as bytes arrive); otherwise
    /// [`Outcome::Miss`]: `fetch` is called once, by a detached fill task that goes on if the
    /// client goes away. Returns once the upstream answered (its error is
    /// [`CacheError::Fetch`], for every request waiting on that fill).
    pub async fn blob(&self, digest: &Digest, fetch: FetchFn) -> Result<BlobReader, CacheError> {
        self.blob_from(digest, None, fetch).await
    }

    /// [`Cache::blob`] whose `fetch` GETs from upstream `origin`: recorded as the blob's
    /// origin when that fill commits (see [`Cache::admits`]).
    pub async fn blob_from(
        &self,
        digest: &Digest,
        origin: Option<&str>,
        fetch: FetchFn,
    ) -> Result<BlobReader, CacheError> {
        let mut fetch = Some(fetch);
        let mut last_err = None;
        for _ in 0..ATTEMPTS {
            let step = {
                let mut st = self.inner.lock();
                let tick = st.tick();
                if let Some(e) = st.index.get_mut(digest) {
                    e.last_used = tick;
                    Step::Hit(*e)
                } else if let Some(f) = st.inflight.get(digest) {
                    Step::Follow(f.clone())
                } else {
                    let id = self.inner.next_id();
                    let f = Arc::new(Fill::new(
                        digest.clone(),
                        self.inner.store.temp_path(digest, id),
                    ));
                    st.inflight.insert(digest.clone(), f.clone());
                    if let Some(o) = origin {
                        st.fill_origins
                            .insert(digest.clone(), (f.clone(), o.to_owned()));
                    }
                    let (tx, rx) = mpsc::channel(8);
                    // `fetch` is only consumed here; a leader loops only when its fill handed
                    // the fetch back unused.
                    let Some(fetch) = fetch.take() else {
                        st.inflight.remove(digest);
                        break;
                    };
                    let task = tokio::spawn(fill::run(self.inner.clone(), f.clone(), fetch, tx));
                    #[cfg(test)]
                    let _ = f.abort.set(task.abort_handle());
                    drop(task);
                    Step::Lead(f, rx)
                }
            };
            match step {
                Step::Hit(e) => match self.open_hit(digest, e).await {
                    Some(r) => return Ok(r),
                    None => continue,
                },
                Step::Follow(f) => match self.join(f, None, Outcome::Coalesced).await {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => continue,
                    Err(e @ CacheError::FillFailed { .. }) => {
                        last_err = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Step::Lead(f, rx) => match self.join(f.clone(), Some(rx), Outcome::Miss).await {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => continue,
                    // The fill failed in the shared tier before this request got a byte, and
                    // handed the fetch back: start another fill (the bad object is gone).
                    Err(e @ CacheError::FillFailed { .. }) => match f.unused_fetch.take() {
                        Some(back) => {
                            fetch = Some(back);
                            last_err = Some(e);
                            continue;
                        }
                        None => return Err(e),
                    },
                    Err(e) => return Err(e),
                },
            }
        }
        Err(last_err.unwrap_or_else(|| CacheError::FillFailed {
            digest: digest.clone(),
            reason: FailReason::WriteError,
            message: "the cache could not follow a fill of this blob; retry".into(),
        }))
    }

    /// Stores a blob from a local copy (`oci-proxy import`) as if a fill from upstream
    /// `origin` had fetched it: the same fill (hash, write, fsync, rename; the bucket first
    /// and an upload after, with a shared tier), then `origin` recorded. Returns once the
    /// blob is committed: `Ok(true)` when this call stored it, `Ok(false)` when it was
    /// already cached. A body that does not match `digest` and `body.size` is refused
    /// ([`CacheError::FillFailed`]) and nothing is kept.
    pub async fn import_blob(
        &self,
        digest: &Digest,
        origin: &str,
        body: UpstreamBody,
    ) -> Result<bool, CacheError> {
        use futures_util::FutureExt;
        let size = body.size;
        let fetch: FetchFn = Box::new(move || async move { Ok(body) }.boxed());
        let reader = self.blob_from(digest, Some(origin), fetch).await?;
        let stored = match reader.source {
            Source::File { .. } => false,
            Source::Fill {
                fill, direct, lead, ..
            } => {
                // Nobody reads this fill: its direct channel must not hold up the task, nor
                // may the fill wait for a reader.
                drop((direct, lead));
                let mut rx = fill.phase.subscribe();
                let end = rx.wait_for(Phase::is_terminal).await.map(|p| p.clone());
                match end {
                    Ok(Phase::Complete { .. }) => true,
                    Ok(Phase::Failed {
                        reason, message, ..
                    }) => {
                        return Err(CacheError::FillFailed {
                            digest: digest.clone(),
                            reason,
                            message,
                        })
                    }
                    _ => {
                        return Err(CacheError::FillFailed {
                            digest: digest.clone(),
                            reason: FailReason::WriteError,
                            message: "the blob could not be written to the cache".into(),
                        })
                    }
                }
            }
        };
        // `Complete` also ends a fill whose commit failed: only the index says it is kept.
        match self.blob_size(digest) {
            Some(s) if size.is_none_or(|want| want == s) => {}
            _ => {
                return Err(CacheError::FillFailed {
                    digest: digest.clone(),
                    reason: FailReason::WriteError,
                    message: "the blob was verified but not committed to the cache".into(),
                })
            }
        }
        // Also for a blob already cached: these verified bytes are what `origin` serves.
        self.add_origin_journaled(digest, origin).await;
        Ok(stored)
    }

    /// Opens a committed file; `None` if it vanished (evicted) or is truncated (dropped).
    async fn open_hit(&self, digest: &Digest, e: Entry) -> Option<BlobReader> {
        let path = self.inner.store.blob_path(digest, e.size);
        let opened = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(path)?;
            let len = f.metadata()?.len();
            Ok::<_, io::Error>((f, len))
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match opened {
            Ok((f, len)) if len == e.size => {
                self.inner.metrics.request(Outcome::Hit, digest);
                Some(BlobReader {
                    inner: self.inner.clone(),
                    digest: digest.clone(),
                    outcome: Outcome::Hit,
                    size: Some(e.size),
                    source: Source::File {
                        file: Arc::new(f),
                        unverified: (!e.verified).then_some(e.gen),
                    },
                })
            }
            Ok((_, len)) => {
                let why = format!("length {len} but {} recorded at commit", e.size);
                self.inner.drop_corrupt(digest, e.gen, &why);
                None
            }
            Err(err) => {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(%digest, error = %err, "cannot open cached blob");
                }
                self.inner.forget_blob(digest, e.gen);
                None
            }
        }
    }

    /// Waits for a fill to answer, then builds a reader on it. `Ok(None)`: this follower
    /// cannot follow (the fill lost its file), look again.
    async fn join(
        &self,
        fill: Arc<Fill>,
        direct: Option<mpsc::Receiver<fill::Direct>>,
        outcome: Outcome,
    ) -> Result<Option<BlobReader>, CacheError> {
        let mut rx = fill.phase.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::Fetching))
            .await
            .map(|p| p.clone())
            .unwrap_or(Phase::Failed {
                reason: FailReason::Aborted,
                message: "fill vanished".into(),
                fetch: None,
            });
        let size = match phase {
            Phase::Fetching => None,
            Phase::Streaming { size, .. } => size,
            Phase::Verified { size } | Phase::Complete { size } => Some(size),
            Phase::Uncached { size, .. } if direct.is_some() => size,
            Phase::Uncached { .. } => return Ok(None),
            Phase::Failed { fetch: Some(e), .. } => return Err(CacheError::Fetch(e)),
            Phase::Failed {
                reason, message, ..
            } => {
                return Err(CacheError::FillFailed {
                    digest: fill.digest.clone(),
                    reason,
                    message,
                })
            }
        };
        // Filled from the shared tier, not through this request's repository: report it as
        // coalesced, so the caller confirms the repository holds the blob before serving it.
        let outcome = match outcome {
            Outcome::Miss if fill.from_shared.load(Ordering::Acquire) => Outcome::Coalesced,
            o => o,
        };
        self.inner.metrics.request(outcome, &fill.digest);
        Ok(Some(BlobReader {
            inner: self.inner.clone(),
            digest: fill.digest.clone(),
            outcome,
            size,
            source: Source::Fill {
                lead: direct.as_ref().map(|_| LeadGuard::new(fill.clone(), 0)),
                fill,
                direct,
            },
        }))
    }

    /// Size of a blob only the shared tier holds (a HEAD of its object); `None` without a
    /// shared tier, or when the bucket does not have it (or cannot say now).
    pub async fn shared_blob_size(&self, digest: &Digest) -> Option<u64> {
        self.inner.shared.as_ref()?.blob_size(digest).await
    }

    /// Bytes `[start, end]` of a blob from the shared tier, with a ranged GET, streamed as they
    /// arrive; `None` when the tier cannot serve them (go upstream). These bytes are not
    /// verified on their own (a range cannot be): start a whole fill beside them, which
    /// verifies the object and deletes it if corrupt.
    pub async fn shared_blob_range(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Option<BoxStream<'static, io::Result<bytes::Bytes>>> {
        let body = self
            .inner
            .shared
            .as_ref()?
            .get_range(digest, start, end)
            .await?;
        self.inner.metrics.tier(metrics::Tier::Shared);
        Some(body)
    }

    /// The grant of a credential source (see [`grant`]): `parts` name the source and the
    /// credential's identity; only a keyed hash of them is kept.
    pub fn grant(&self, parts: &[&[u8]]) -> Grant {
        self.inner.grant_key.grant(parts)
    }

    /// Whether `repo_key` was shown to hold `digest` under `grant` less than `ttl` ago:
    /// locally, else (then kept locally) as another replica recorded it in the shared tier.
    pub async fn is_linked(
        &self,
        repo_key: &str,
        digest: &Digest,
        grant: Grant,
        ttl: Duration,
    ) -> bool {
        let counts =
            |l: &LinkInfo| l.grant == grant && l.at.elapsed().map_or(true, |age| age < ttl);
        let local = self.inner.links.get(repo_key, digest);
        if local.as_ref().is_some_and(counts) {
            return true;
        }
        if let Some(s) = &self.inner.shared {
            if let Some(l) = s.get_link(repo_key, digest).await.filter(counts) {
                self.inner.links.link(repo_key, digest, l.grant, l.at).await;
                return true;
            }
        }
        let reason = match local {
            None => Refusal::NoLink,
            Some(l) if l.grant != grant => Refusal::Grant,
            Some(_) => Refusal::Expired,
        };
        self.inner.metrics.refused(digest, repo_key, reason);
        false
    }

    /// Records that the upstream showed, under `grant`, that `repo_key` holds `digest`
    /// (now); persisted (and in the shared tier).
    pub async fn link(&self, repo_key: &str, digest: &Digest, grant: Grant) {
        let at = std::time::SystemTime::now();
        let changed = self.inner.links.link(repo_key, digest, grant, at).await;
        if let (true, Some(s)) = (changed, &self.inner.shared) {
            s.put_link(repo_key, digest, LinkInfo { grant, at });
        }
    }

    /// Whether `digest`'s cached bytes may answer for one of `upstreams`: they were fetched
    /// (verified) from one of them, by this replica, by a fill in flight now, or by another
    /// replica (the shared tier's origin records).
    pub async fn admits(&self, digest: &Digest, upstreams: &[&str]) -> bool {
        let Some(first) = upstreams.first() else {
            return false;
        };
        if upstreams
            .iter()
            .any(|u| self.inner.links.has_origin(digest, u))
        {
            return true;
        }
        let in_flight = self
            .inner
            .lock()
            .fill_origins
            .get(digest)
            .is_some_and(|(f, o)| {
                !f.from_shared.load(Ordering::Acquire) && upstreams.contains(&o.as_str())
            });
        if in_flight {
            return true;
        }
        if let Some(s) = &self.inner.shared {
            for u in upstreams {
                if s.has_origin(u, digest).await {
                    self.inner.links.add_origin(digest, u);
                    return true;
                }
            }
        }
        self.inner.metrics.refused(digest, first, Refusal::Origin);
        false
    }

    /// Records that `digest`'s verified bytes came from `upstream` (and in the shared tier).
    pub fn add_origin(&self, digest: &Digest, upstream: &str) {
        drop(self.origin_journaled(digest, upstream));
    }

    /// [`Cache::add_origin`], returning once the record is in the journal (for a process
    /// that exits right after, `oci-proxy import`).
    pub async fn add_origin_journaled(&self, digest: &Digest, upstream: &str) {
        if let Some(journaled) = self.origin_journaled(digest, upstream) {
            let _ = journaled.await;
        }
    }

    fn origin_journaled(
        &self,
        digest: &Digest,
        upstream: &str,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        let journaled = self.inner.links.add_origin(digest, upstream)?;
        if let Some(s) = &self.inner.shared {
            s.put_origin(upstream, digest);
        }
        Some(journaled)
    }

    /// A cached manifest by digest (on a local miss, a verified copy from the shared tier).
    pub async fn manifest(&self, digest: &Digest) -> Option<CachedManifest> {
        if let Some(m) = self.inner.manifests.get(digest).await {
            return Some(m);
        }
        let (media_type, bytes) = self.inner.shared.as_ref()?.get_manifest(digest).await?;
        if let Err(e) = self
            .inner
            .manifests
            .put(digest, &media_type, bytes.clone())
            .await
        {
            tracing::warn!(%digest, error = %e, "cannot keep a shared manifest locally");
        }
        Some(CachedManifest { media_type, bytes })
    }

    /// Stores a manifest after verifying `bytes` against `digest`; immutable once stored.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: bytes::Bytes,
    ) -> Result<(), CacheError> {
        self.inner
            .manifests
            .put(digest, media_type, bytes.clone())
            .await?;
        if self.inner.max_size.is_some() {
            // Manifests count toward `cache.max_size` too.
            self.inner.evict_notify.notify_one();
        }
        if let Some(s) = &self.inner.shared {
            s.put_manifest(digest, media_type, bytes);
        }
        Ok(())
    }

    /// The digest a tag pointed to when last checked upstream.
    /// When this replica's entry is missing or older than `ttl`, the shared tier's is taken
    /// if it was checked more recently (and kept locally with its check time).
    pub async fn tag(&self, repo_key: &str, tag: &str, ttl: Duration) -> Option<TagEntry> {
        let local = self.inner.tags.get(repo_key, tag);
        if local.as_ref().is_some_and(|e| e.checked_within(ttl)) {
            return local;
        }
        let Some(shared) = &self.inner.shared else {
            return local;
        };
        match (shared.get_tag(repo_key, tag).await, local) {
            (Some(s), Some(l)) if s.checked_at <= l.checked_at => Some(l),
            (Some(s), _) => {
                let tags = &self.inner.tags;
                tags.set_at(repo_key, tag, Some(&s.digest), s.grant, s.checked_at)
                    .await;
                Some(s)
            }
            (None, local) => local,
        }
    }

    /// Sets a tag and refreshes its `checked_at`, as checked upstream under `grant`;
    /// persisted (and in the shared tier).
    pub async fn put_tag(&self, repo_key: &str, tag: &str, digest: &Digest, grant: Grant) {
        self.inner
            .tags
            .set(repo_key, tag, Some(digest), grant)
            .await;
        if let Some(s) = &self.inner.shared {
            s.put_tag(repo_key, tag, Some(digest), grant);
        }
    }

    /// Forgets a tag the upstream no longer has (here and in the shared tier).
    pub async fn remove_tag(&self, repo_key: &str, tag: &str, grant: Grant) {
        self.inner.tags.set(repo_key, tag, None, grant).await;
        if let Some(s) = &self.inner.shared {
            s.put_tag(repo_key, tag, None, grant);
        }
    }

    /// Bytes held by committed blobs.
    pub fn size_bytes(&self) -> u64 {
        self.inner.lock().total
    }

    /// Committed blobs held.
    pub fn blob_count(&self) -> usize {
        self.inner.lock().index.len()
    }
}
