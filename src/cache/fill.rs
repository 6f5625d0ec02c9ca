//! Single-flight fills: one upstream GET per digest feeds the fill's readers, a hasher and a
//! temp file at once; the blob is committed only when size and digest match.
//!
//! The design follows pingora-cache's cache lock: the first miss becomes the writer (a
//! detached task, so it survives its client), every other request for the digest becomes a
//! follower of the [`Fill`]. A [`Guard`] owned by the task publishes [`Phase::Failed`] when the
//! task dies (panic or abort: the future is dropped), so a dead writer never leaves readers
//! hanging; it also takes the fill out of the in-flight map, so the next request starts a new
//! fill.
//!
//! The miss path touches each byte as few times as possible, and its stages overlap: the
//! receive loop only hands the upstream's `Bytes` on (reference-counted, never copied) to
//! - a hasher on its own blocking thread,
//! - a writer on its own blocking thread: with `cache.direct_writes` (the default) it gathers
//!   the bytes into one aligned buffer and writes whole blocks with `O_DIRECT`
//!   ([`super::direct`]: no copy into the page cache, no writeback in the proxy's threads);
//!   otherwise, or where the filesystem refuses `O_DIRECT`, fewer, larger `writev`s with a
//!   background `fdatasync` every [`SYNC_EVERY`] bytes so the final flush is short,
//! - the readers, through [`Recent`]: the newest bytes in memory. The client that started the
//!   fill and followers that keep up take them from there; a follower that lags or joins late
//!   `pread`s the temp file from its offset, and is back on memory once it catches up.
//!
//! Memory is bounded per fill, whatever the clients do: at most [`IN_FLIGHT`] bytes are
//! received but not yet both hashed and taken by the writer (written, or with direct writes
//! copied into its buffers; the receive loop waits for the slower thread), and [`Recent`]
//! holds the last [`RECENT_WINDOW`] bytes plus the ones not yet on disk (at most
//! [`IN_FLIGHT`] plus the direct writer's two buffers): 24 MiB plus one upstream chunk. A
//! stalled reader holds only the chunk it was handed. The direct writer adds its two buffers
//! ([`super::direct::BUFFER`] each); it writes only whole buffers (but the last), so the
//! device sees few, large writes. Those are the sizes of a fill that runs alone or with one
//! other: all fills together are bounded too ([`super::memory`]), so as fills multiply each
//! one's window and write buffers shrink to its share, and their in-flight bytes share one
//! budget.
//!
//! The fill paces itself to its first client (the [`Lead`]), the one it was started for:
//! when that client is half a [`RECENT_WINDOW`] behind, the receive loop waits for it, for at
//! most [`LEAD_PATIENCE`] over the whole fill. Without this, a moment of scheduling on busy
//! cores lets the fill run ahead, the client's next bytes are gone from memory, and it reads
//! the rest back from the temp file (from the device: direct writes leave nothing in the page
//! cache), a chunk at a time, never catching up: measured on a cold 256 MiB fetch, one run in
//! five went at a third of the speed with three times the CPU. A client that stops or reads
//! slowly costs the others at most the patience, once; then the fill goes on without it and
//! it reads the file.
//!
//! The clean end comes before the commit: [`Phase::Verified`] is published as soon as size
//! and digest match, and readers may end cleanly there (their bytes are verified, in memory
//! or in the file). The commit (wait for the writer, fsync, rename) follows, then
//! [`Phase::Complete`]: the fsync is off every client's critical path, and a crash before the
//! rename leaves only a temp file (removed on open), never a complete-looking name.
//!
//! A write error (disk full, read-only dir) turns the fill "uncached": it is counted once,
//! leaves the in-flight map, and the rest of the body goes to the first client only, through
//! a bounded channel ([`Direct`]); followers get an error at the point the readable bytes
//! stop. A write error found only after the whole body arrived costs nothing but the commit.
//!
//! With a shared tier, the fill first asks it ([`super::shared::Shared::before_upstream`]):
//! verified bytes from the bucket are committed like upstream ones (small blobs are verified
//! before readers see them, large ones stream to readers as they arrive, from the file),
//! otherwise the upstream fill commits and then uploads in the background.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::metrics::{FailReason, Tier};
use super::shared::Before;
use super::{FetchError, FetchFn, Inner};
use crate::protocol::grammar::{Digest, Hasher};

/// Bytes a fill keeps in memory behind the newest one, for readers that keep up (see the
/// module docs for the whole bound).
pub(super) const RECENT_WINDOW: u64 = 8 << 20;

/// Bytes received but not yet both hashed and taken by the writer: the receive loop waits
/// beyond this.
pub(super) const IN_FLIGHT: usize = 8 << 20;

/// The most a fill holds in memory beyond the chunk being received (see the module docs):
/// the window, what is in flight, and the direct writer's two buffers, not yet on disk.
#[cfg(test)]
pub(super) const MEMORY_BOUND: u64 =
    RECENT_WINDOW + IN_FLIGHT as u64 + 2 * super::direct::BUFFER as u64;

/// The longest a fill waits, over its whole life, for its first client to keep up.
pub(super) const LEAD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Write-behind (buffered writes only): the writer starts a background `fdatasync` every
/// this many bytes, so the commit's fsync has little left to flush.
pub(super) const SYNC_EVERY: u64 = 32 << 20;

/// The receive loop hands on what the upstream has ready in batches of up to this many bytes
/// (plus one chunk).
pub(super) const RECEIVE_BATCH: u64 = 1 << 20;

/// The writer gathers up to this many queued bytes into one `writev`.
const WRITE_BATCH: u64 = 4 << 20;

/// Where a fill is. Readers watch it.
#[derive(Clone, Debug)]
pub(crate) enum Phase {
    /// Waiting for the upstream's response headers.
    Fetching,
    /// Bytes `[0, written)` can be read: the newest in memory ([`Fill::recent`]), the rest in
    /// the temp file.
    Streaming { size: Option<u64>, written: u64 },
    /// A write failed: readers can have `[0, written)`; the rest of the body (and the
    /// verdict) goes to the first client only, by its [`Direct`] channel. Final for followers.
    Uncached { size: Option<u64>, written: u64 },
    /// All `size` bytes arrived and match the digest: readers may end cleanly. They are in the
    /// temp file or still in memory; the commit (fsync, rename) is under way.
    Verified { size: u64 },
    /// All `size` bytes are verified and the commit is over (committed, unless a write, the
    /// final fsync or the rename failed: the bytes are still good for readers holding the
    /// fill).
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
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Complete { .. } | Phase::Failed { .. } | Phase::Uncached { .. }
        )
    }
}

/// What an uncached fill sends its first client.
#[derive(Debug)]
pub(super) enum Direct {
    Data(Bytes),
    /// The body was complete and verified.
    End,
    Failed(String),
}

/// The newest bytes of a fill, in memory: `[start, end)`, as the upstream's chunks. Every byte
/// before `start` is in the temp file; chunks leave only once they are on disk, so a reader
/// finds any byte the fill announced either here or in the file.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    start: u64,
    end: u64,
    chunks: VecDeque<(u64, Bytes)>,
}

impl Recent {
    fn push(&mut self, b: Bytes) {
        let at = self.end;
        self.end += b.len() as u64;
        self.chunks.push_back((at, b));
    }

    /// Drops the oldest chunks beyond `window` (at most [`RECENT_WINDOW`]) that are on disk.
    fn trim(&mut self, on_disk: u64, window: u64) {
        while self.held() > window {
            match self.chunks.front() {
                Some((at, b)) if at + b.len() as u64 <= on_disk => {
                    self.start = at + b.len() as u64;
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Bytes held.
    pub(crate) fn held(&self) -> u64 {
        self.end - self.start
    }
}

/// Where the fill's first client is, so that the fill can wait for it.
#[derive(Debug)]
pub(crate) struct Lead {
    /// Offset of the next byte it reads.
    pos: AtomicU64,
    /// No client is being waited for: none yet, or its reader is gone.
    gone: AtomicBool,
    moved: tokio::sync::Notify,
    /// Times the fill started waiting for it.
    waits: AtomicU64,
}

impl Lead {
    /// Times the fill waited for its first client.
    #[cfg(test)]
    pub(crate) fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

impl Default for Lead {
    fn default() -> Lead {
        Lead {
            pos: AtomicU64::new(0),
            gone: AtomicBool::new(true),
            moved: tokio::sync::Notify::new(),
            waits: AtomicU64::new(0),
        }
    }
}

/// Held by the first client's reader: tells the fill how far it read; dropped (the client is
/// done, or gone), lets the fill go on without it.
pub(crate) struct LeadGuard(Arc<Fill>);

impl LeadGuard {
    pub(crate) fn new(fill: Arc<Fill>, pos: u64) -> LeadGuard {
        fill.lead.pos.store(pos, Ordering::Release);
        fill.lead.gone.store(false, Ordering::Release);
        LeadGuard(fill)
    }

    /// The client has every byte before `pos`.
    pub(crate) fn at(&self, pos: u64) {
        self.0.lead.pos.store(pos, Ordering::Release);
        self.0.lead.moved.notify_one();
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        self.0.lead.gone.store(true, Ordering::Release);
        self.0.lead.moved.notify_one();
    }
}

impl std::fmt::Debug for LeadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeadGuard")
    }
}

/// Waits while the first client is more than half the fill's `window` behind `end` (the
/// bytes announced), as long as `spent` (the fill's waiting so far) stays under
/// [`LEAD_PATIENCE`].
async fn wait_for_lead(lead: &Lead, end: u64, window: u64, spent: &mut std::time::Duration) {
    loop {
        let behind = end.saturating_sub(lead.pos.load(Ordering::Acquire));
        if lead.gone.load(Ordering::Acquire) || behind <= window / 2 || *spent >= LEAD_PATIENCE {
            return;
        }
        lead.waits.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let _ = tokio::time::timeout(LEAD_PATIENCE - *spent, lead.moved.notified()).await;
        *spent += started.elapsed();
    }
}

/// One fill in flight, shared by the writer task and its readers.
#[derive(Debug)]
pub(crate) struct Fill {
    pub digest: Digest,
    pub temp: PathBuf,
    pub phase: watch::Sender<Phase>,
    /// The temp file, once created; readers `pread` it (the fd survives rename and unlink).
    pub file: OnceLock<Arc<File>>,
    /// The newest bytes, for readers that keep up.
    pub recent: Mutex<Recent>,
    /// The first client, which the fill waits for.
    pub lead: Lead,
    /// Bytes the writer put in the temp file (upstream fills).
    pub on_disk: AtomicU64,
    /// The bytes came from the shared tier (set before the phase leaves `Fetching`).
    pub from_shared: AtomicBool,
    /// The upstream fetch, handed back when the fill failed in the shared tier without
    /// calling it, so the request that started the fill can start another one.
    pub unused_fetch: UnusedFetch,
    #[cfg(test)]
    pub abort: OnceLock<tokio::task::AbortHandle>,
    /// Tests: while true, the writer thread waits before each write.
    #[cfg(test)]
    pub hold_writes: (Mutex<bool>, std::sync::Condvar),
}

impl Fill {
    pub(crate) fn new(digest: Digest, temp: PathBuf) -> Fill {
        Fill {
            digest,
            temp,
            phase: watch::Sender::new(Phase::Fetching),
            file: OnceLock::new(),
            recent: Mutex::new(Recent::default()),
            lead: Lead::default(),
            on_disk: AtomicU64::new(0),
            from_shared: AtomicBool::new(false),
            unused_fetch: UnusedFetch::default(),
            #[cfg(test)]
            abort: OnceLock::new(),
            #[cfg(test)]
            hold_writes: Default::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held in memory now.
    #[cfg(test)]
    pub(crate) fn recent_held(&self) -> u64 {
        self.recent().held()
    }

    /// The bytes from `pos` (before `end`) when they are in memory: `Ok` with a slice of one
    /// upstream chunk (no copy). Otherwise `Err(upto)`: read `[pos, upto)` from the temp file.
    /// `pos < end`, and `end` within what the phase announced.
    pub(crate) fn bytes_at(&self, pos: u64, end: u64) -> Result<Bytes, u64> {
        let r = self.recent();
        if pos < r.start {
            return Err(r.start.min(end));
        }
        if pos >= r.end {
            return Err(end);
        }
        // `start <= pos < end`: the chunk holding `pos` is there, the first at or before it.
        let i = r
            .chunks
            .partition_point(|(at, _)| *at <= pos)
            .saturating_sub(1);
        let Some((at, b)) = r.chunks.get(i) else {
            return Err(end);
        };
        let lo = (pos - at) as usize;
        let hi = (end.min(at + b.len() as u64) - at) as usize;
        Ok(b.slice(lo..hi))
    }

    #[cfg(test)]
    fn wait_writes_allowed(&self) {
        let (held, cv) = &self.hold_writes;
        let mut g = held.lock().unwrap_or_else(|p| p.into_inner());
        while *g {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Tests: holds (or lets go of) the writer thread before its next write.
    #[cfg(test)]
    pub(crate) fn hold_writes(&self, hold: bool) {
        let (held, cv) = &self.hold_writes;
        *held.lock().unwrap_or_else(|p| p.into_inner()) = hold;
        cv.notify_all();
    }
}

/// A fill's fetch that it never called (see [`Fill::unused_fetch`]).
#[derive(Default)]
pub(crate) struct UnusedFetch(Mutex<Option<FetchFn>>);

impl UnusedFetch {
    fn put(&self, f: FetchFn) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    pub(crate) fn take(&self) -> Option<FetchFn> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for UnusedFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnusedFetch")
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
        let verified = match *self.fill.phase.borrow() {
            Phase::Verified { size } => Some(size),
            ref p if p.is_terminal() => return self.cleanup(),
            _ => None,
        };
        match verified {
            // Ended during the commit: the bytes readers have are verified; nothing is kept.
            Some(size) => {
                if !self.counted {
                    self.counted = true;
                    let msg = "fill task ended before its commit";
                    self.inner
                        .metrics
                        .fill_failed(&self.fill.digest, FailReason::Aborted, msg);
                }
                self.fill.phase.send_replace(Phase::Complete { size });
            }
            None => self.fail(FailReason::Aborted, "fill task ended early".into(), None),
        }
        self.cleanup();
    }
}

impl Guard {
    fn cleanup(&self) {
        self.inner.forget_fill(&self.fill);
        let _ = std::fs::remove_file(&self.fill.temp);
    }
}

/// Runs a fill to its end. Spawned detached by [`super::Cache::blob`].
pub(super) async fn run(
    inner: Arc<Inner>,
    fill: Arc<Fill>,
    fetch: FetchFn,
    leader: mpsc::Sender<Direct>,
) {
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
                fill.phase.send_replace(Phase::Verified { size });
                commit(&inner, &fill, &mut g, f, size, None).await;
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

    // The three stages: a hasher and a writer on their own threads, readers from memory.
    // Memory: this fill's own bounds, and its share of what all fills may hold.
    let budget = InFlight {
        fill: Arc::new(Semaphore::new(IN_FLIGHT)),
        all: inner.fill_memory.in_flight().clone(),
    };
    let _active = inner.fill_memory.join();
    let (hash_tx, hash_rx) = std::sync::mpsc::channel::<Arc<Batch>>();
    let alg = digest.algorithm();
    let hashing = tokio::task::spawn_blocking(move || {
        let mut h = Hasher::new(alg);
        while let Ok(b) = hash_rx.recv() {
            for c in &b.chunks {
                h.update(c);
            }
        }
        h
    });
    let mut writer = match (&file, cached) {
        (Some(f), true) => Some(Writer::spawn(&inner, &fill, f, size)),
        _ => None,
    };

    let mut received: u64 = 0;
    let mut waited = std::time::Duration::ZERO;
    let mut stream = body.stream.fuse();
    while let Some(first) = stream.next().await {
        // What is ready now, up to RECEIVE_BATCH bytes, goes on as one batch.
        let mut data = Vec::new();
        let mut n: u64 = 0;
        let mut upstream_err = None;
        let mut item = Some(first);
        while let Some(it) = item.take() {
            match it {
                Ok(b) => {
                    n += b.len() as u64;
                    if !b.is_empty() {
                        data.push(b);
                    }
                }
                Err(e) => {
                    upstream_err = Some(e);
                    break;
                }
            }
            if n < RECEIVE_BATCH {
                item = stream.next().now_or_never().flatten();
            }
        }
        if let Some(limit) = size.filter(|s| received + n > *s) {
            let msg = format!("body longer than its Content-Length {limit}");
            let _ = leader.send(Direct::Failed(msg.clone())).await;
            g.fail(FailReason::DigestMismatch, msg, None);
            return;
        }
        if n > 0 {
            // Wait while the slower of hasher and writer is IN_FLIGHT bytes behind, or all
            // fills together IN_FLIGHT_TOTAL.
            let Some(permits) = budget.acquire(n).await else {
                return; // never closed; the guard fails the fill
            };
            let b = Arc::new(Batch {
                chunks: data,
                _permits: permits,
            });
            // A dead hasher is found at the end.
            let _ = hash_tx.send(b.clone());
            // From here on only the hasher and the writer hold the batch (and its share of
            // the in-flight budgets): the waits below, on the first client or its channel,
            // hold none of it, so no other fill waits on this fill's client.
            let chunks = b.chunks.clone();
            let sent = match (&writer, cached) {
                (Some(w), true) => w.tx.send(b).is_ok(),
                _ => {
                    drop(b);
                    false
                }
            };
            if cached {
                if sent {
                    let on_disk = fill.on_disk.load(Ordering::Acquire);
                    {
                        let mut r = fill.recent();
                        for c in &chunks {
                            r.push(c.clone());
                        }
                        r.trim(on_disk, inner.fill_memory.window());
                    }
                    fill.phase.send_modify(|p| {
                        if let Phase::Streaming { written, .. } = p {
                            *written = received + n;
                        }
                    });
                    let window = inner.fill_memory.window();
                    wait_for_lead(&fill.lead, received + n, window, &mut waited).await;
                } else {
                    // The writer stopped on an error: counted once; readers keep what was
                    // announced, the first client the rest of the body.
                    let e = match writer.take() {
                        Some(w) => w.finish().await.err(),
                        None => None,
                    };
                    let e = e.unwrap_or_else(|| io::Error::other("cache writer stopped"));
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
            if !cached {
                for c in chunks {
                    if leader.send(Direct::Data(c)).await.is_err() {
                        g.fail(FailReason::WriteError, "first client gone".into(), None);
                        return;
                    }
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
    drop(hash_tx);
    let matches = match hashing.await {
        Ok(h) => h.matches(&digest),
        Err(e) => {
            let msg = format!("hashing task failed: {e}");
            let _ = leader.send(Direct::Failed(msg.clone())).await;
            g.fail(FailReason::Aborted, msg, None);
            return;
        }
    };
    if !matches {
        let msg = format!("{received} bytes do not match the digest");
        let _ = leader.send(Direct::Failed(msg.clone())).await;
        g.fail(FailReason::DigestMismatch, msg, None);
        return;
    }
    let (Some(w), Some(f), true) = (writer, &file, cached) else {
        let _ = leader.send(Direct::End).await;
        return;
    };
    // Readers may end now; the commit follows off their critical path.
    fill.phase.send_replace(Phase::Verified { size: received });
    match w.finish().await {
        Ok(n) if n == received => {
            let upload = inner.shared.clone().map(|s| (s, lease.take()));
            commit(&inner, &fill, &mut g, f, received, upload).await;
        }
        res => {
            let e = res
                .err()
                .map_or_else(|| "short write".to_string(), |e| e.to_string());
            // The bytes are verified (readers have them from memory and file); none kept.
            g.counted = true;
            inner
                .metrics
                .fill_failed(&digest, FailReason::WriteError, &e);
            inner.forget_fill(&fill);
            fill.phase.send_replace(Phase::Complete { size: received });
        }
    }
}

/// Chunks received together, shared by the hasher, the writer and [`Recent`]; holds its
/// share of [`IN_FLIGHT`] and of [`super::memory::IN_FLIGHT_TOTAL`] until both threads are
/// done with it.
struct Batch {
    chunks: Vec<Bytes>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The in-flight bounds a fill's batches take their bytes from: its own, then all fills'.
/// Always in that order, and each is given back by the fill's own threads, so a fill never
/// waits on another fill's clients.
struct InFlight {
    fill: Arc<Semaphore>,
    all: Arc<Semaphore>,
}

impl InFlight {
    /// Permits for a batch of `n` bytes; `None` only if a semaphore was closed (never).
    async fn acquire(&self, n: u64) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = n.min(IN_FLIGHT as u64) as u32;
        let all = n.min(super::memory::IN_FLIGHT_TOTAL as u64) as u32;
        let a = self.fill.clone().acquire_many_owned(own).await.ok()?;
        let b = self.all.clone().acquire_many_owned(all).await.ok()?;
        Some((a, b))
    }
}

/// The writer thread of a fill: appends batches to the temp file, gathering what is queued
/// into one `writev`, and keeps the page cache flushing behind it.
struct Writer {
    tx: std::sync::mpsc::Sender<Arc<Batch>>,
    task: tokio::task::JoinHandle<io::Result<u64>>,
}

impl Writer {
    /// `size`: the body's, when announced (the direct writer's buffers need no more).
    fn spawn(inner: &Arc<Inner>, fill: &Arc<Fill>, file: &Arc<File>, size: Option<u64>) -> Writer {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Batch>>();
        let (inner, fill, file) = (inner.clone(), fill.clone(), file.clone());
        let task = tokio::task::spawn_blocking(move || write_loop(&inner, &fill, &file, size, &rx));
        Writer { tx, task }
    }

    /// Lets the writer drain its queue; the bytes it wrote, or its error.
    async fn finish(self) -> io::Result<u64> {
        drop(self.tx);
        self.task.await.map_err(io::Error::other)?
    }
}

fn write_loop(
    inner: &Inner,
    fill_handle: &Arc<Fill>,
    file: &Arc<File>,
    size: Option<u64>,
    rx: &std::sync::mpsc::Receiver<Arc<Batch>>,
) -> io::Result<u64> {
    let fill: &Fill = fill_handle;
    let mut total: u64 = 0;
    // Direct writes where the filesystem takes them; the buffered path below otherwise. The
    // buffers' share of the fills' memory budget is held until the writer is done.
    let (mut direct, _buffers) = if inner.direct_writes {
        let f = fill_handle.clone();
        let progress = Box::new(move |n| f.on_disk.store(n, Ordering::Release));
        let (cap, permit) = inner.fill_memory.buffers(super::direct::buffer_for(size));
        let d = super::direct::DirectWriter::open(&fill.temp, file.clone(), progress, cap);
        let permit = if d.is_some() { permit } else { None };
        (d, permit)
    } else {
        (None, None)
    };
    let mut behind = WriteBehind::new(file.clone());
    while let Ok(first) = rx.recv() {
        let mut n: u64 = first.chunks.iter().map(|c| c.len() as u64).sum();
        let mut group = vec![first];
        while n < WRITE_BATCH {
            match rx.try_recv() {
                Ok(b) => {
                    n += b.chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                    group.push(b);
                }
                Err(_) => break,
            }
        }
        #[cfg(test)]
        fill.wait_writes_allowed();
        inner.fault_before(total + n)?;
        total += n;
        if let Some(d) = direct.as_mut() {
            for c in group.iter().flat_map(|b| b.chunks.iter()) {
                d.append(c)?;
            }
            // The bytes are in the writer's buffers, which go out whole (few, large direct
            // writes): the group's share of IN_FLIGHT is released now.
            drop(group);
            continue;
        }
        let mut slices: Vec<IoSlice<'_>> = group
            .iter()
            .flat_map(|b| b.chunks.iter().map(|c| IoSlice::new(c)))
            .collect();
        super::store::write_slices(file, &mut slices)?;
        fill.on_disk.store(total, Ordering::Release);
        behind.wrote(total)?;
    }
    if let Some(d) = direct {
        let n = d.finish(file)?;
        fill.on_disk.store(n, Ordering::Release);
        return Ok(n);
    }
    behind.finish()?;
    Ok(total)
}

/// A background `fdatasync` every [`SYNC_EVERY`] bytes (one at a time), so dirty pages are
/// flushed while the fill goes on rather than all at its commit. Its error fails the fill:
/// after a failed fsync the kernel may have dropped the pages, and a later fsync may not say so.
struct WriteBehind {
    file: Arc<File>,
    synced_upto: u64,
    running: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl WriteBehind {
    fn new(file: Arc<File>) -> WriteBehind {
        WriteBehind {
            file,
            synced_upto: 0,
            running: None,
        }
    }

    fn wrote(&mut self, total: u64) -> io::Result<()> {
        if total - self.synced_upto < SYNC_EVERY {
            return Ok(());
        }
        if let Some(t) = &self.running {
            if !t.is_finished() {
                return Ok(());
            }
            self.join()?;
        }
        let f = self.file.clone();
        let spawned = std::thread::Builder::new()
            .name("oci-proxy-sync".into())
            .spawn(move || f.sync_data());
        // Without a thread, the commit's fsync does it all.
        if let Ok(t) = spawned {
            self.running = Some(t);
            self.synced_upto = total;
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<()> {
        match self.running.take().map(|t| t.join()) {
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(io::Error::other("write-behind sync panicked")),
            None => Ok(()),
        }
    }

    fn finish(mut self) -> io::Result<()> {
        self.join()
    }
}
/// Commits `size` verified bytes in the fill's temp file; whether they were kept. A kept blob
/// is handed to `upload` (the shared tier, with the fill's lease) before the fill is
/// [`Phase::Complete`], so whoever waits for that also finds the upload under way.
async fn commit(
    inner: &Arc<Inner>,
    fill: &Arc<Fill>,
    g: &mut Guard,
    f: &Arc<File>,
    size: u64,
    upload: Option<(Arc<super::shared::Shared>, Option<super::shared::Lease>)>,
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
            if let Some((shared, lease)) = upload {
                shared.upload_blob(fill.digest.clone(), f.clone(), size, lease);
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
