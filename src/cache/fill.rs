//! Single-flight fills: one upstream GET per digest feeds a temp file, hashing as bytes pass;
//! the blob is committed only when size and digest match.
//!
//! The design follows pingora-cache's cache lock: the first miss becomes the writer (a
//! detached task, so it survives its client), every other request for the digest becomes a
//! follower of the [`Fill`], reading the growing temp file through a shared file handle as
//! [`Phase::Streaming`] announces new bytes. A [`Guard`] owned by the task publishes
//! [`Phase::Failed`] when the task dies (panic or abort: the future is dropped), so a dead
//! writer never leaves readers hanging; it also takes the fill out of the in-flight map, so
//! the next request starts a new fill.
//!
//! A write error (disk full, read-only dir) turns the fill "uncached": it is counted once,
//! leaves the in-flight map, and the rest of the body goes to the first client only, through
//! a bounded channel ([`Direct`]); followers get an error at the point the file stops.
//!
//! With a shared tier, the fill first asks it ([`super::shared::Shared::before_upstream`]):
//! verified bytes from the bucket are committed like upstream ones (small blobs are verified
//! before readers see them, large ones stream to readers as they arrive), otherwise the
//! upstream fill commits and then uploads in the background.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::metrics::{FailReason, Tier};
use super::shared::Before;
use super::{FetchError, FetchFn, Inner};
use crate::protocol::grammar::{Algorithm, Digest};

/// Where a fill is. Readers watch it.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the upstream's response headers.
    Fetching,
    /// Bytes `[0, written)` are in the temp file.
    Streaming { size: Option<u64>, written: u64 },
    /// A write failed: the file stops at `written`; the rest of the body (and the verdict)
    /// goes to the first client only, by its [`Direct`] channel. Final for followers.
    Uncached { size: Option<u64>, written: u64 },
    /// All `size` bytes are in the file and verified (committed, unless the final fsync or
    /// rename failed: the bytes are still good for readers holding the file).
    Complete { size: u64 },
    /// The fill ended without a verified blob.
    Failed {
        reason: FailReason,
        message: String,
        /// The upstream's error when the fetch itself failed (so callers can map it back).
        fetch: Option<FetchError>,
    },
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Complete { .. } | Phase::Failed { .. } | Phase::Uncached { .. }
        )
    }
}

/// What an uncached fill sends its first client.
#[derive(Debug)]
pub enum Direct {
    Data(Bytes),
    /// The body was complete and verified.
    End,
    Failed(String),
}

/// One fill in flight, shared by the writer task and its readers.
#[derive(Debug)]
pub struct Fill {
    pub digest: Digest,
    pub temp: PathBuf,
    pub phase: watch::Sender<Phase>,
    /// The temp file, once created; readers `pread` it (the fd survives rename and unlink).
    pub file: OnceLock<Arc<File>>,
    /// The bytes came from the shared tier (set before the phase leaves `Fetching`).
    pub from_shared: AtomicBool,
    /// The upstream fetch, handed back when the fill failed in the shared tier without
    /// calling it, so the request that started the fill can start another one.
    pub unused_fetch: UnusedFetch,
    #[cfg(test)]
    pub abort: OnceLock<tokio::task::AbortHandle>,
}

impl Fill {
    pub fn new(digest: Digest, temp: PathBuf) -> Fill {
        Fill {
            digest,
            temp,
            phase: watch::Sender::new(Phase::Fetching),
            file: OnceLock::new(),
            from_shared: AtomicBool::new(false),
            unused_fetch: UnusedFetch::default(),
            #[cfg(test)]
            abort: OnceLock::new(),
        }
    }
}

/// A fill's fetch that it never called (see [`Fill::unused_fetch`]).
#[derive(Default)]
pub struct UnusedFetch(Mutex<Option<FetchFn>>);

impl UnusedFetch {
    fn put(&self, f: FetchFn) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    pub fn take(&self) -> Option<FetchFn> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for UnusedFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnusedFetch")
    }
}

/// sha256 or sha512, as the digest asks.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    pub fn matches(self, digest: &Digest) -> bool {
        use sha2::Digest as _;
        let raw = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        Digest::from_raw(digest.algorithm(), &raw) == *digest
    }
}

/// Owned by the fill task: on drop (normal end, panic or abort) makes sure the fill is
/// terminal, out of the in-flight map, and its temp file gone.
struct Guard {
    inner: Arc<Inner>,
    fill: Arc<Fill>,
    /// Whether a failure was already counted (a write error is counted once per fill).
    counted: bool,
}

impl Guard {
    fn fail(&mut self, reason: FailReason, message: String, fetch: Option<FetchError>) {
        if !self.counted {
            self.counted = true;
            self.inner
                .metrics
                .fill_failed(&self.fill.digest, reason, &message);
        }
        self.inner.forget_fill(&self.fill);
        // An uncached fill reports to its first client by channel; followers already stop.
        self.fill.phase.send_if_modified(|p| {
            if matches!(p, Phase::Uncached { .. }) {
                return false;
            }
            *p = Phase::Failed {
                reason,
                message,
                fetch,
            };
            true
        });
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.fill.phase.borrow().is_terminal() {
            self.fail(FailReason::Aborted, "fill task ended early".into(), None);
        }
        self.inner.forget_fill(&self.fill);
        let _ = std::fs::remove_file(&self.fill.temp);
    }
}

/// Runs a fill to its end. Spawned detached by [`super::Cache::blob`].
pub async fn run(inner: Arc<Inner>, fill: Arc<Fill>, fetch: FetchFn, leader: mpsc::Sender<Direct>) {
    let mut g = Guard {
        inner: inner.clone(),
        fill: fill.clone(),
        counted: false,
    };
    inner.metrics.fill_started(&fill.digest);
    let digest = fill.digest.clone();

    let created = {
        let (store, temp) = (inner.store.clone(), fill.temp.clone());
        let fault = inner.fault_before(0);
        tokio::task::spawn_blocking(move || fault.and_then(|()| store.create_temp(&temp)))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
    };
    let file = match created {
        Ok(f) => {
            let f = Arc::new(f);
            let _ = fill.file.set(f.clone());
            Some(f)
        }
        Err(e) => {
            g.counted = true;
            inner
                .metrics
                .fill_failed(&digest, FailReason::WriteError, &e.to_string());
            None
        }
    };

    let mut lease = None;
    if let (Some(shared), Some(f)) = (inner.shared.clone(), &file) {
        // A large blob read from the bucket streams to readers like an upstream body; they
        // learn it came from the bucket first (see `Cache::join`).
        let announce = |size: u64, written: u64| {
            fill.from_shared.store(true, Ordering::Release);
            fill.phase.send_replace(Phase::Streaming {
                size: Some(size),
                written,
            });
        };
        match shared.before_upstream(&digest, f, &announce).await {
            Before::Filled(size) => {
                fill.from_shared.store(true, Ordering::Release);
                inner.metrics.tier(Tier::Shared);
                commit(&inner, &fill, &mut g, f, size).await;
                return;
            }
            Before::Failed(reason, message) => {
                inner.metrics.tier(Tier::Shared);
                fill.unused_fetch.put(fetch);
                let _ = leader.send(Direct::Failed(message.clone())).await;
                g.fail(reason, message, None);
                return;
            }
            Before::Upstream(l) => lease = l,
        }
    }
    inner.metrics.tier(Tier::Upstream);

    let body = match fetch().await {
        Ok(b) => b,
        Err(e) => {
            let _ = leader.send(Direct::Failed(e.to_string())).await;
            g.fail(FailReason::UpstreamError, e.to_string(), Some(e));
            return;
        }
    };
    let size = body.size;
    let mut cached = file.is_some();
    if !cached {
        inner.forget_fill(&fill);
    }
    fill.phase.send_replace(if cached {
        Phase::Streaming { size, written: 0 }
    } else {
        Phase::Uncached { size, written: 0 }
    });

    let mut hasher = Hasher::new(digest.algorithm());
    let mut received: u64 = 0;
    let mut chunks = body.stream.ready_chunks(64);
    while let Some(batch) = chunks.next().await {
        let mut data = Vec::with_capacity(batch.len());
        let mut upstream_err = None;
        for item in batch {
            match item {
                Ok(b) if !b.is_empty() => data.push(b),
                Ok(_) => {}
                Err(e) => {
                    upstream_err = Some(e);
                    break;
                }
            }
        }
        let n: u64 = data.iter().map(|b| b.len() as u64).sum();
        if let Some(limit) = size.filter(|s| received + n > *s) {
            let msg = format!("body longer than its Content-Length {limit}");
            let _ = leader.send(Direct::Failed(msg.clone())).await;
            g.fail(FailReason::DigestMismatch, msg, None);
            return;
        }
        // Hashing and writing a batch both run on the blocking pool, in one call.
        let target = if cached { file.clone() } else { None };
        let fault = inner.fault_before(received + n);
        let mut h = hasher;
        let done = tokio::task::spawn_blocking(move || {
            for b in &data {
                h.update(b);
            }
            let wrote = target.map(|f| fault.and_then(|()| super::store::write_chunks(&f, &data)));
            (h, data, wrote)
        })
        .await;
        let (h, data, wrote) = match done {
            Ok(done) => done,
            Err(e) => {
                let msg = format!("hashing task failed: {e}");
                let _ = leader.send(Direct::Failed(msg.clone())).await;
                g.fail(FailReason::Aborted, msg, None);
                return;
            }
        };
        hasher = h;
        if let Some(write) = wrote {
            match write {
                Ok(()) => {
                    fill.phase.send_modify(|p| {
                        if let Phase::Streaming { written, .. } = p {
                            *written = received + n;
                        }
                    });
                }
                Err(e) => {
                    // Counted once; the first client keeps streaming from upstream.
                    cached = false;
                    g.counted = true;
                    inner
                        .metrics
                        .fill_failed(&digest, FailReason::WriteError, &e.to_string());
                    inner.forget_fill(&fill);
                    fill.phase.send_replace(Phase::Uncached {
                        size,
                        written: received,
                    });
                }
            }
        }
        if !cached {
            for b in data {
                if leader.send(Direct::Data(b)).await.is_err() {
                    g.fail(FailReason::WriteError, "first client gone".into(), None);
                    return;
                }
            }
        }
        received += n;
        if let Some(e) = upstream_err {
            // A fill budget (deadline, minimum rate, size) ends the body with its own reason.
            let (reason, msg) = match super::budget::LimitExceeded::of(&e) {
                Some(limit) => (limit.reason(), e.to_string()),
                None => (
                    FailReason::UpstreamError,
                    format!("upstream body failed: {e}"),
                ),
            };
            let _ = leader.send(Direct::Failed(msg.clone())).await;
            g.fail(reason, msg, None);
            return;
        }
    }

    if let Some(s) = size.filter(|s| received < *s) {
        let msg = format!("body ended after {received} of {s} bytes");
        let _ = leader.send(Direct::Failed(msg.clone())).await;
        g.fail(FailReason::ShortBody, msg, None);
        return;
    }
    if !hasher.matches(&digest) {
        let msg = format!("{received} bytes do not match the digest");
        let _ = leader.send(Direct::Failed(msg.clone())).await;
        g.fail(FailReason::DigestMismatch, msg, None);
        return;
    }
    match (cached, &file) {
        (true, Some(f)) => {
            if commit(&inner, &fill, &mut g, f, received).await {
                if let Some(shared) = &inner.shared {
                    shared.upload_blob(digest, f.clone(), received, lease.take());
                }
            }
        }
        _ => {
            let _ = leader.send(Direct::End).await;
        }
    }
}

/// Commits `size` verified bytes in the fill's temp file; whether they were kept.
async fn commit(
    inner: &Arc<Inner>,
    fill: &Arc<Fill>,
    g: &mut Guard,
    f: &Arc<File>,
    size: u64,
) -> bool {
    let (store, f2, temp, d) = (
        inner.store.clone(),
        f.clone(),
        fill.temp.clone(),
        fill.digest.clone(),
    );
    let res = tokio::task::spawn_blocking(move || store.commit(&f2, &temp, &d, size))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
    match res {
        Ok(()) => {
            if let Some(journaled) = inner.committed(fill, size) {
                let _ = journaled.await;
            }
            fill.phase.send_replace(Phase::Complete { size });
            true
        }
        Err(e) => {
            // The bytes are verified: readers holding the file finish; nothing is kept.
            g.counted = true;
            inner
                .metrics
                .fill_failed(&fill.digest, FailReason::WriteError, &e.to_string());
            inner.forget_fill(fill);
            fill.phase.send_replace(Phase::Complete { size });
            false
        }
    }
}
