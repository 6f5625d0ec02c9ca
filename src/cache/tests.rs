//! Behaviour of [`Cache::blob`] with fake upstreams fed step by step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;

use super::*;
use crate::config::{ByteSize, CacheConfig};

type Item = Result<Bytes, io::Error>;

const DEADLINE: Duration = Duration::from_secs(10);

fn config(dir: &std::path::Path, max_size: Option<u64>) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        max_size: max_size.map(ByteSize),
        ..CacheConfig::default()
    }
}

async fn open(dir: &std::path::Path, max_size: Option<u64>) -> Arc<Cache> {
    Cache::open(&config(dir, max_size), &prometheus::Registry::new())
        .await
        .unwrap()
}

/// A cache without a size bound in a new temp dir (keep the dir alive as long as the cache).
async fn fresh() -> (tempfile::TempDir, Arc<Cache>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None).await;
    (dir, cache)
}

/// The first `n` bytes of the 600 000-byte body the failing-fill tests announce.
fn head(n: usize) -> Bytes {
    Bytes::copy_from_slice(&data(600_000, 2)[..n])
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An upstream whose body the test feeds; counts how often it was fetched.
#[derive(Clone)]
struct Upstream {
    rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<Item>>>>,
    calls: Arc<AtomicUsize>,
    size: Option<u64>,
}

impl Upstream {
    fn new(size: Option<u64>) -> (Upstream, mpsc::UnboundedSender<Item>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let up = Upstream {
            rx: Arc::new(Mutex::new(Some(rx))),
            calls: Arc::new(AtomicUsize::new(0)),
            size,
        };
        (up, tx)
    }

    fn fetch(&self) -> FetchFn {
        let me = self.clone();
        Box::new(move || {
            Box::pin(async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                let rx = me.rx.lock().unwrap().take().expect("body fetched twice");
                let stream: BoxStream<'static, Item> =
                    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
                        .boxed();
                Ok(UpstreamBody {
                    size: me.size,
                    stream,
                })
            })
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A fetch answering `body` at once (with its size).
fn fetch_bytes(body: Vec<u8>, calls: Arc<AtomicUsize>) -> FetchFn {
    Box::new(move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let size = Some(body.len() as u64);
            let chunks: Vec<Item> = body
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Ok(UpstreamBody {
                size,
                stream: stream::iter(chunks).boxed(),
            })
        })
    })
}

/// The caller's own error type, which the cache carries without knowing it.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}")]
struct UpstreamStatus(u16);

fn fetch_fails(status: u16, calls: Arc<AtomicUsize>) -> FetchFn {
    Box::new(move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(FetchError::new(UpstreamStatus(status)))
        })
    })
}

async fn collect(s: BoxStream<'static, Item>) -> Result<Vec<u8>, io::Error> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b?);
    }
    Ok(out)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline passed")
}

/// Waits until `cond` holds, checking every few ms, failing after the deadline.
async fn until(mut cond: impl FnMut() -> bool) {
    within(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Stores `body` as a committed blob.
async fn commit(cache: &Cache, body: &[u8]) -> Digest {
    let d = Digest::sha256_of(body);
    let r = cache
        .blob(&d, fetch_bytes(body.to_vec(), Arc::default()))
        .await
        .unwrap();
    assert_eq!(collect(r.into_stream(None)).await.unwrap(), body);
    until(|| cache.blob_size(&d).is_some()).await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cold_requests_one_fetch_followers_stream_early() {
    let (_dir, cache) = fresh().await;
    let body = data(3 << 20, 1);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));

    let readers = within(futures_util::future::join_all(
        (0..20).map(|_| cache.blob(&d, up.fetch())),
    ))
    .await;
    let readers: Vec<_> = readers.into_iter().map(Result::unwrap).collect();
    assert_eq!(up.calls(), 1);
    let misses = readers
        .iter()
        .filter(|r| r.outcome() == Outcome::Miss)
        .count();
    assert_eq!(misses, 1);
    assert!(readers.iter().all(|r| r.size() == Some(body.len() as u64)));

    // Feed the first MiB only: every reader sees it before the fill is complete.
    tx.send(Ok(Bytes::copy_from_slice(&body[..1 << 20])))
        .unwrap();
    let mut streams: Vec<_> = readers.into_iter().map(|r| r.into_stream(None)).collect();
    let mut got: Vec<Vec<u8>> = Vec::new();
    for s in &mut streams {
        let first = within(s.next()).await.unwrap().unwrap();
        assert!(!first.is_empty());
        assert_eq!(&first[..], &body[..first.len()]);
        got.push(first.to_vec());
    }
    assert_eq!(
        cache.blob_size(&d),
        None,
        "not committed before the body ends"
    );
    for c in body[1 << 20..].chunks(100_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    for (s, mut g) in streams.into_iter().zip(got) {
        g.extend(within(collect(s)).await.unwrap());
        assert!(g == body);
    }
    until(|| cache.blob_size(&d) == Some(body.len() as u64)).await;
    let r = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(r.outcome(), Outcome::Hit);
    assert!(within(collect(r.into_stream(None))).await.unwrap() == body);
    assert_eq!(up.calls(), 1);
}

/// Runs a failing fill with a leader and a follower; both streams must end in Err, nothing
/// is committed, the failure is counted, and the next request fetches again.
async fn failing_fill(size: Option<u64>, feed: Vec<Item>, reason: FailReason) {
    let (dir, cache) = fresh().await;
    let body = data(600_000, 2);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(size);
    let a = cache.blob(&d, up.fetch()).await.unwrap();
    let b = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(
        (a.outcome(), b.outcome()),
        (Outcome::Miss, Outcome::Coalesced)
    );
    let ranged = cache.blob(&d, up.fetch()).await.unwrap();
    for item in feed {
        tx.send(item).unwrap();
    }
    drop(tx);
    assert!(within(collect(a.into_stream(None))).await.is_err());
    assert!(within(collect(b.into_stream(None))).await.is_err());
    // Even a range wholly inside the bytes received is not ended cleanly.
    assert!(within(collect(ranged.into_stream(Some((0, 99)))))
        .await
        .is_err());
    assert_eq!(up.calls(), 1);
    until(|| cache.inner.metrics.failed_count(reason) == 1).await;
    assert_eq!(cache.blob_size(&d), None);
    until(|| cache.inner.lock().inflight.is_empty()).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );

    let calls = Arc::new(AtomicUsize::new(0));
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), calls.clone()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Miss);
    assert!(within(collect(r.into_stream(None))).await.unwrap() == body);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    until(|| cache.blob_size(&d).is_some()).await;
}

#[tokio::test]
async fn wrong_bytes_are_not_committed() {
    let wrong = data(600_000, 3);
    failing_fill(
        Some(600_000),
        vec![Ok(Bytes::from(wrong))],
        FailReason::DigestMismatch,
    )
    .await;
}

#[tokio::test]
async fn truncated_body_with_known_size() {
    failing_fill(
        Some(600_000),
        vec![Ok(head(400_000))],
        FailReason::ShortBody,
    )
    .await;
}

#[tokio::test]
async fn truncated_body_with_unknown_size() {
    failing_fill(None, vec![Ok(head(400_000))], FailReason::DigestMismatch).await;
}

#[tokio::test]
async fn longer_body_than_announced() {
    let body = data(600_000, 2);
    let mut long = body.clone();
    long.extend_from_slice(b"extra");
    failing_fill(
        Some(600_000),
        vec![Ok(Bytes::from(long))],
        FailReason::DigestMismatch,
    )
    .await;
}

#[tokio::test]
async fn upstream_error_mid_body() {
    let chunks = vec![Ok(head(300_000)), Err(io::Error::other("connection reset"))];
    failing_fill(Some(600_000), chunks, FailReason::UpstreamError).await;
}

#[tokio::test]
async fn fetch_error_reaches_every_waiter_and_is_not_cached() {
    let (_dir, cache) = fresh().await;
    let d = Digest::sha256_of(b"missing");
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, b) = tokio::join!(
        cache.blob(&d, fetch_fails(404, calls.clone())),
        cache.blob(&d, fetch_fails(404, calls.clone()))
    );
    for r in [a, b] {
        match r {
            Err(CacheError::Fetch(e)) => {
                assert_eq!(e.downcast_ref::<UpstreamStatus>().map(|u| u.0), Some(404))
            }
            _ => panic!("expected the upstream error"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(cache
        .blob(&d, fetch_fails(404, calls.clone()))
        .await
        .is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fill_goes_on_when_its_client_leaves() {
    let (_dir, cache) = fresh().await;
    let body = data(2 << 20, 4);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let r = cache.blob(&d, up.fetch()).await.unwrap();
    tx.send(Ok(Bytes::copy_from_slice(&body[..1000]))).unwrap();
    let mut s = r.into_stream(None);
    assert_eq!(&within(s.next()).await.unwrap().unwrap()[..], &body[..1000]);
    drop(s);
    tx.send(Ok(Bytes::copy_from_slice(&body[1000..]))).unwrap();
    drop(tx);
    until(|| cache.blob_size(&d) == Some(body.len() as u64)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_writer_fails_readers_promptly_and_next_request_refills() {
    let (_dir, cache) = fresh().await;
    let body = data(1 << 20, 5);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let a = cache.blob(&d, up.fetch()).await.unwrap();
    let b = cache.blob(&d, up.fetch()).await.unwrap();
    tx.send(Ok(Bytes::copy_from_slice(&body[..5000]))).unwrap();
    let (sa, sb) = (a.into_stream(None), b.into_stream(None));
    let fill = cache.inner.lock().inflight.get(&d).cloned().unwrap();
    fill.abort.get().unwrap().abort();
    // The body never ends (tx is alive): only the dead writer can end these streams.
    assert!(within(collect(sa)).await.is_err());
    assert!(within(collect(sb)).await.is_err());
    until(|| cache.inner.metrics.failed_count(FailReason::Aborted) == 1).await;
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), Arc::default()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Miss);
    assert!(within(collect(r.into_stream(None))).await.unwrap() == body);
    drop(tx);
}

#[tokio::test]
async fn ranges_on_hit_and_on_fill() {
    let (_dir, cache) = fresh().await;
    let body = data(3 << 20, 6);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let whole = cache.blob(&d, up.fetch()).await.unwrap();
    let r1 = cache.blob(&d, up.fetch()).await.unwrap();
    let r2 = cache.blob(&d, up.fetch()).await.unwrap();
    let s1 = tokio::spawn(collect(r1.into_stream(Some((10, 99)))));
    let s2 = tokio::spawn(collect(r2.into_stream(Some((2 << 20, (3 << 20) - 1)))));
    for c in body.chunks(70_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    assert_eq!(within(s1).await.unwrap().unwrap(), &body[10..100]);
    assert!(within(s2).await.unwrap().unwrap() == body[2 << 20..]);
    assert!(within(collect(whole.into_stream(None))).await.unwrap() == body);
    until(|| cache.blob_size(&d).is_some()).await;

    let hit = |range| {
        let cache = cache.clone();
        let d = d.clone();
        async move {
            let r = cache
                .blob(&d, fetch_fails(500, Arc::default()))
                .await
                .unwrap();
            assert_eq!(r.outcome(), Outcome::Hit);
            collect(r.into_stream(range)).await
        }
    };
    assert_eq!(hit(Some((5, 5))).await.unwrap(), &body[5..6]);
    assert!(hit(Some((1000, 1_500_000))).await.unwrap() == body[1000..1_500_001]);
    let last = body.len() as u64 - 1;
    assert!(hit(Some((last, last))).await.unwrap() == body[body.len() - 1..]);
    assert!(hit(Some((0, last + 1))).await.is_err());
    assert!(hit(Some((9, 8))).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_bounds_size_and_never_cuts_an_open_reader() {
    let dir = tempfile::tempdir().unwrap();
    let blob = 3 << 20;
    let max = 4 * blob as u64;
    let cache = open(dir.path(), Some(max)).await;
    let first = data(blob, 100);
    let d0 = commit(&cache, &first).await;
    // Open a hit reader and read one chunk.
    let r = cache
        .blob(&d0, fetch_fails(500, Arc::default()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Hit);
    let mut s = r.into_stream(None);
    let mut got = within(s.next()).await.unwrap().unwrap().to_vec();
    for i in 0..8 {
        commit(&cache, &data(blob, i)).await;
    }
    until(|| cache.size_bytes() <= max).await;
    assert!(cache.blob_count() <= 4);
    assert!(cache.inner.metrics.evictions_count() >= 5);
    assert_eq!(cache.blob_size(&d0), None, "the oldest blob was evicted");
    let files: u64 = walk(&dir.path().join("blobs"));
    assert!(files <= max, "{files} bytes on disk");
    got.extend(within(collect(s)).await.unwrap());
    assert!(got == first, "the open reader got every byte");
}

#[tokio::test]
async fn eviction_goes_on_after_a_panic_poisoned_the_index_lock() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), Some(2 * 1000)).await;
    let a = commit(&cache, &data(1000, 1)).await;
    let inner = cache.inner.clone();
    let panicked = std::thread::spawn(move || {
        let _held = inner.state.lock();
        panic!("a panic while holding the index lock");
    })
    .join();
    assert!(panicked.is_err());
    assert!(cache.inner.state.is_poisoned());
    commit(&cache, &data(1000, 2)).await;
    commit(&cache, &data(1000, 3)).await;
    until(|| cache.size_bytes() <= 2000).await;
    assert_eq!(cache.blob_size(&a), None, "the oldest blob was evicted");
    assert_eq!(cache.blob_count(), 2);
}

fn walk(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_journals_count_toward_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let max = 40_000u64;
    let cache = open(dir.path(), Some(max)).await;
    for i in 0..4 {
        commit(&cache, &data(9_000, i)).await;
    }
    assert_eq!(cache.blob_count(), 4);
    // A flood of distinct manifests (about 1 KB each): 30 KB, three times their share.
    let mt = "application/vnd.oci.image.manifest.v1+json";
    for i in 0..30 {
        let m = Bytes::from(format!(
            "{{\"schemaVersion\":2,\"n\":{i},\"pad\":\"{}\"}}",
            "x".repeat(950)
        ));
        cache
            .put_manifest(&Digest::sha256_of(&m), mt, m)
            .await
            .unwrap();
    }
    let on_disk = |dir: &std::path::Path| {
        let journals: u64 = ["links.jsonl", "tags.jsonl"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        walk(&dir.join("blobs")) + walk(&dir.join("manifests")) + journals
    };
    // After the last nudge, eviction leaves both bounds holding.
    until(|| on_disk(dir.path()) <= max && walk(&dir.path().join("manifests")) <= max / 4).await;
    assert!(
        cache.blob_count() < 4,
        "a blob made room for the manifests' share"
    );
}

#[tokio::test]
async fn recently_used_blobs_survive_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), Some(3 * 1000)).await;
    let a = commit(&cache, &data(1000, 1)).await;
    let _b = commit(&cache, &data(1000, 2)).await;
    let c = commit(&cache, &data(1000, 3)).await;
    // Touch a, then add d: b is the least recently used.
    let r = cache
        .blob(&a, fetch_fails(500, Arc::default()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Hit);
    let d = commit(&cache, &data(1000, 4)).await;
    until(|| cache.size_bytes() <= 3000).await;
    assert!(cache.blob_size(&a).is_some());
    assert!(cache.blob_size(&c).is_some());
    assert!(cache.blob_size(&d).is_some());
    assert_eq!(cache.blob_count(), 3);
}

#[tokio::test]
async fn restart_keeps_blobs_links_manifests_tags_and_removes_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let body = data(700_000, 7);
    let manifest = Bytes::from_static(b"{\"schemaVersion\":2}");
    let md = Digest::sha256_of(&manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let d = {
        let cache = open(dir.path(), None).await;
        let g = cache.grant(&[b"source", b"user", b"secret"]);
        let d = commit(&cache, &body).await;
        cache.link("r.io/team/app", &d, g).await;
        cache.put_manifest(&md, mt, manifest.clone()).await.unwrap();
        cache.put_tag("r.io/team/app", "v1", &md, g).await;
        cache.put_tag("r.io/team/app", "old", &md, g).await;
        cache.remove_tag("r.io/team/app", "old", g).await;
        assert!(matches!(
            cache.put_manifest(&d, mt, manifest.clone()).await,
            Err(CacheError::DigestMismatch(_))
        ));
        d
    };
    // A fill interrupted by a crash leaves a temp file.
    std::fs::write(
        dir.path().join("tmp").join(format!("{}.9.part", d.hex())),
        b"junk",
    )
    .unwrap();

    let cache = open(dir.path(), None).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(cache.blob_size(&d), Some(body.len() as u64));
    // The grant key persists with the cache: the same source has the same grant.
    let g = cache.grant(&[b"source", b"user", b"secret"]);
    let other = cache.grant(&[b"source", b"user", b"rotated"]);
    let day = Duration::from_secs(86_400);
    assert!(cache.is_linked("r.io/team/app", &d, g, day).await);
    assert!(!cache.is_linked("r.io/team/app", &d, other, day).await);
    assert!(
        !cache
            .is_linked("r.io/team/app", &d, g, Duration::ZERO)
            .await
    );
    assert!(!cache.is_linked("r.io/other", &d, g, day).await);
    let m = cache.manifest(&md).await.unwrap();
    assert_eq!((m.media_type.as_str(), &m.bytes), (mt, &manifest));
    assert_eq!(
        cache
            .tag("r.io/team/app", "v1", Duration::from_secs(60))
            .await
            .unwrap()
            .digest,
        md
    );
    assert!(cache
        .tag("r.io/team/app", "old", Duration::from_secs(60))
        .await
        .is_none());
    assert!(cache.manifest(&d).await.is_none());
    let calls = Arc::new(AtomicUsize::new(0));
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), calls.clone()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Hit);
    assert!(collect(r.into_stream(None)).await.unwrap() == body);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn corrupt_or_truncated_committed_files_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (data(2_500_000, 8), data(1000, 9), data(3000, 10));
    let (da, db, dc) = {
        let cache = open(dir.path(), None).await;
        (
            commit(&cache, &a).await,
            commit(&cache, &b).await,
            commit(&cache, &c).await,
        )
    };
    let store = Store::new(dir.path());
    // a: one byte flipped near the end (same length); c: flipped, read by range; b: truncated.
    for (d, len) in [(&da, a.len()), (&dc, c.len())] {
        let p = store.blob_path(d, len as u64);
        let mut raw = std::fs::read(&p).unwrap();
        raw[len - 2] ^= 0xff;
        std::fs::write(&p, raw).unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(store.blob_path(&db, b.len() as u64))
        .unwrap()
        .set_len(500)
        .unwrap();

    let cache = open(dir.path(), None).await;
    // Never served, whether or not the scrub got to it yet.
    let calls = Arc::new(AtomicUsize::new(0));
    let r = cache
        .blob(&db, fetch_bytes(b.clone(), calls.clone()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Miss);
    assert!(collect(r.into_stream(None)).await.unwrap() == b);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.blob_size(&da), Some(a.len() as u64));
    let r = cache
        .blob(&da, fetch_fails(500, Arc::default()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Hit);
    assert!(
        collect(r.into_stream(None)).await.is_err(),
        "corrupt bytes end in Err"
    );
    assert_eq!(cache.blob_size(&da), None);
    assert!(!store.blob_path(&da, a.len() as u64).exists());
    let r = cache
        .blob(&dc, fetch_fails(500, Arc::default()))
        .await
        .unwrap();
    assert!(collect(r.into_stream(Some((0, 9)))).await.is_err());
    assert_eq!(cache.blob_size(&dc), None);
    // Refilled from upstream.
    let calls = Arc::new(AtomicUsize::new(0));
    let r = cache
        .blob(&da, fetch_bytes(a.clone(), calls.clone()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Miss);
    assert!(collect(r.into_stream(None)).await.unwrap() == a);
    // A good blob read once after restart is verified, then read by range without rehashing.
    until(|| cache.blob_size(&da).is_some()).await;
}

#[tokio::test]
async fn unwritable_cache_still_serves_the_first_client() {
    let (_dir, cache) = fresh().await;
    *cache.inner.fault.lock().unwrap() = Some(0);
    let body = data(1_500_000, 11);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), calls.clone()))
        .await
        .unwrap();
    assert_eq!(r.outcome(), Outcome::Miss);
    assert!(within(collect(r.into_stream(None))).await.unwrap() == body);
    assert_eq!(cache.blob_size(&d), None);
    assert_eq!(cache.inner.metrics.failed_count(FailReason::WriteError), 1);
    // A range from the first client of an uncached fill.
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), calls.clone()))
        .await
        .unwrap();
    assert!(
        within(collect(r.into_stream(Some((1_000_000, 1_000_009)))))
            .await
            .unwrap()
            == body[1_000_000..1_000_010]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An uncached fill whose first client stops reading waits on that client alone: what it
/// received is held by its hasher only until hashed, never by the wait, so the in-flight
/// budget all fills share is whole again while the fill still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_first_client_holds_none_of_the_shared_in_flight_budget() {
    let (_dir, cache) = fresh().await;
    *cache.inner.fault.lock().unwrap() = Some(0);
    let body = data(3 * MIB, 14);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let leader = cache.blob(&d, up.fetch()).await.unwrap();
    for c in body.chunks(100_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    // The leader reads nothing yet: the fill fills its channel and waits on it.
    let full = |r: &reader::BlobReader| match &r.source {
        reader::Source::Fill {
            direct: Some(rx), ..
        } => rx.len() == rx.max_capacity(),
        _ => false,
    };
    until(|| full(&leader)).await;
    let mem = cache.inner.fill_memory.clone();
    until(|| mem.in_flight_free() == super::memory::IN_FLIGHT_TOTAL).await;
    assert_eq!(mem.active(), 1, "the fill is still running");
    assert!(within(collect(leader.into_stream(None))).await.unwrap() == body);
    until(|| mem.active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_error_mid_fill_keeps_the_first_client_whole() {
    let (_dir, cache) = fresh().await;
    *cache.inner.fault.lock().unwrap() = Some(200_000);
    let body = data(1_000_000, 12);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let leader = cache.blob(&d, up.fetch()).await.unwrap();
    let follower = cache.blob(&d, up.fetch()).await.unwrap();
    let (sl, sf) = (
        tokio::spawn(collect(leader.into_stream(None))),
        tokio::spawn(collect(follower.into_stream(None))),
    );
    for c in body.chunks(50_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    assert!(within(sl).await.unwrap().unwrap() == body);
    // The follower errs where the readable bytes stop, unless the whole body was already in
    // memory when the write failed: then it has every (verified) byte. Never a short clean end.
    if let Ok(got) = within(sf).await.unwrap() {
        assert!(got == body, "a follower's clean end has the whole body");
    }
    until(|| cache.inner.metrics.failed_count(FailReason::WriteError) == 1).await;
    assert_eq!(cache.blob_size(&d), None);
    // Once writes work again, the next request caches it.
    *cache.inner.fault.lock().unwrap() = None;
    commit(&cache, &body).await;
}

#[tokio::test]
async fn sha512_blobs() {
    use sha2::Digest as _;
    let (dir, cache) = fresh().await;
    let body = data(10_000, 13);
    let d = Digest::from_raw(
        crate::protocol::grammar::Algorithm::Sha512,
        &sha2::Sha512::digest(&body),
    );
    let r = cache
        .blob(&d, fetch_bytes(body.clone(), Arc::default()))
        .await
        .unwrap();
    assert!(collect(r.into_stream(None)).await.unwrap() == body);
    until(|| cache.blob_size(&d).is_some()).await;
    drop(cache);
    let cache = open(dir.path(), None).await;
    assert_eq!(cache.blob_size(&d), Some(10_000));
}

/// Index rebuild time for 100 000 blobs. Run with
/// `cargo test --release --lib cache::tests::rebuild_100k -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn rebuild_100k() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    store.create_dirs().unwrap();
    for i in 0u32..100_000 {
        let body = i.to_le_bytes();
        let d = Digest::sha256_of(&body);
        let p = store.blob_path(&d, 4);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let r = store.rebuild().unwrap();
        println!(
            "directory scan of {} blobs: {:?}",
            r.blobs.len(),
            t.elapsed()
        );
    }
    let t = std::time::Instant::now();
    let cache = open(dir.path(), None).await;
    let elapsed = t.elapsed();
    assert_eq!(cache.blob_count(), 100_000);
    println!("rebuilt the index of 100000 blobs in {elapsed:?}");
}

#[tokio::test]
async fn scrub_drops_truncated_files_after_open() {
    let dir = tempfile::tempdir().unwrap();
    let b = data(1000, 14);
    let db = commit(&*open(dir.path(), None).await, &b).await;
    std::fs::File::options()
        .write(true)
        .open(Store::new(dir.path()).blob_path(&db, 1000))
        .unwrap()
        .set_len(10)
        .unwrap();
    let cache = open(dir.path(), None).await;
    until(|| cache.blob_size(&db).is_none()).await;
    assert_eq!(cache.blob_count(), 0);
}

#[test]
fn cache_and_reader_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Cache>();
    send::<BlobReader>();
}

const MIB: usize = 1 << 20;

/// The fill in flight for `d`.
fn fill_of(cache: &Cache, d: &Digest) -> Arc<fill::Fill> {
    cache
        .inner
        .lock()
        .inflight
        .get(d)
        .cloned()
        .expect("a fill in flight")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_bytes_before_the_disk_and_end_at_verification_not_commit() {
    let (dir, cache) = fresh().await;
    let body = data(3 * MIB, 21);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let leader = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(leader.outcome(), Outcome::Miss);
    let fill = fill_of(&cache, &d);
    fill.hold_writes(true);
    // Lets the writer go however the test ends (the runtime waits for its thread).
    struct Release(Arc<fill::Fill>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_writes(false);
        }
    }
    let release = Release(fill.clone());
    for c in body.chunks(100_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    // The writer has not written a byte, yet the leader ends cleanly with the whole body.
    assert!(within(collect(leader.into_stream(None))).await.unwrap() == body);
    assert!(matches!(*fill.phase.borrow(), fill::Phase::Verified { .. }));
    assert_eq!(fill.on_disk.load(Ordering::SeqCst), 0);
    assert_eq!(fill.file.get().unwrap().metadata().unwrap().len(), 0);
    assert_eq!(cache.blob_size(&d), None, "not committed yet");
    // A follower joining now is served from memory too.
    let follower = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(follower.outcome(), Outcome::Coalesced);
    assert!(within(collect(follower.into_stream(None))).await.unwrap() == body);

    drop(release);
    until(|| cache.blob_size(&d) == Some(body.len() as u64)).await;
    assert!(matches!(*fill.phase.borrow(), fill::Phase::Complete { .. }));
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    let hit = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(hit.outcome(), Outcome::Hit);
    assert!(within(collect(hit.into_stream(None))).await.unwrap() == body);
    assert_eq!(up.calls(), 1);
}

/// Feeds `fed` (24 MiB) to a fill of `digest_of`'s digest: a leader reads along; a follower
/// joins once the first bytes left memory (so it starts on the file). Returns both results.
async fn late_follower(
    digest_of: &[u8],
    fed: &[u8],
) -> (
    Arc<Cache>,
    tempfile::TempDir,
    Result<Vec<u8>, io::Error>,
    Result<Vec<u8>, io::Error>,
) {
    let (dir, cache) = fresh().await;
    let d = Digest::sha256_of(digest_of);
    let (up, tx) = Upstream::new(Some(fed.len() as u64));
    let leader = cache.blob(&d, up.fetch()).await.unwrap();
    let fill = fill_of(&cache, &d);
    let leader = tokio::spawn(collect(leader.into_stream(None)));
    let first = 20 * MIB;
    for c in fed[..first].chunks(MIB) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    until(|| fill.on_disk.load(Ordering::SeqCst) == first as u64).await;
    // The next chunk trims what is on disk beyond the window.
    tx.send(Ok(Bytes::copy_from_slice(&fed[first..first + MIB])))
        .unwrap();
    until(|| fill.bytes_at(0, 1).is_err()).await;
    let held = fill.recent_held();
    assert!(
        held <= fill::MEMORY_BOUND + MIB as u64,
        "{held} bytes held in memory"
    );
    let follower = cache.blob(&d, up.fetch()).await.unwrap();
    assert_eq!(follower.outcome(), Outcome::Coalesced);
    let follower = tokio::spawn(collect(follower.into_stream(None)));
    for c in fed[first + MIB..].chunks(MIB) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    let l = within(leader).await.unwrap();
    let f = within(follower).await.unwrap();
    assert_eq!(up.calls(), 1);
    (cache, dir, l, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_joins_late_reads_the_file_and_gets_every_byte() {
    let body = data(24 * MIB, 22);
    let (cache, _dir, leader, follower) = late_follower(&body, &body).await;
    assert!(leader.unwrap() == body);
    assert!(follower.unwrap() == body);
    until(|| cache.blob_size(&Digest::sha256_of(&body)).is_some()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_ends_no_reader_cleanly_from_memory_or_file() {
    let body = data(24 * MIB, 23);
    let wrong = data(24 * MIB, 24);
    let (cache, dir, leader, follower) = late_follower(&body, &wrong).await;
    assert!(leader.is_err(), "the leader (from memory) errs");
    assert!(follower.is_err(), "the follower (from the file) errs");
    until(|| cache.inner.metrics.failed_count(FailReason::DigestMismatch) == 1).await;
    assert_eq!(cache.blob_size(&Digest::sha256_of(&body)), None);
    until(|| std::fs::read_dir(dir.path().join("tmp")).unwrap().count() == 0).await;
}

/// The first client pauses while the upstream sends 40 MiB: the fill stops half a window
/// ahead of it and waits, so when it reads on, every byte comes from memory (nothing is read
/// back from the temp file) and the blob commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_waits_for_its_first_client_so_it_never_reads_back_from_disk() {
    let (_dir, cache) = fresh().await;
    let body = data(40 * MIB, 31);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let leader = cache.blob(&d, up.fetch()).await.unwrap();
    let fill = fill_of(&cache, &d);
    let mut leader = leader.into_stream(None);
    for c in body.chunks(MIB) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    until(|| fill.lead.waits() > 0).await;
    let announced = match &*fill.phase.borrow() {
        Phase::Streaming { written, .. } => *written,
        p => panic!("the fill went on without its first client: {p:?}"),
    };
    assert!(
        announced <= fill::RECENT_WINDOW / 2 + 2 * MIB as u64,
        "the fill ran {announced} bytes ahead of its first client"
    );
    let mut got = Vec::new();
    while let Some(c) = within(leader.next()).await {
        got.extend_from_slice(&c.unwrap());
    }
    assert!(got == body);
    assert_eq!(cache.inner.metrics.read_back_count(), 0, "bytes read back");
    until(|| cache.blob_size(&d).is_some()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_no_more_than_the_memory_bound_and_the_fill_commits() {
    let (_dir, cache) = fresh().await;
    let body = data(40 * MIB, 25);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let stalled = cache.blob(&d, up.fetch()).await.unwrap();
    let mut stalled = stalled.into_stream(None);
    let fill = fill_of(&cache, &d);
    tx.send(Ok(Bytes::copy_from_slice(&body[..MIB]))).unwrap();
    let first = within(stalled.next()).await.unwrap().unwrap();
    // The reader takes one chunk, then stops reading while the whole body goes through.
    let bound = fill::MEMORY_BOUND + MIB as u64;
    let mut most = 0;
    for c in body[MIB..].chunks(MIB) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
        most = most.max(fill.recent_held());
    }
    drop(tx);
    until(|| {
        most = most.max(fill.recent_held());
        cache.blob_size(&d).is_some()
    })
    .await;
    assert!(most <= bound, "{most} bytes held in memory, bound {bound}");
    assert!(fill.recent_held() <= fill::RECENT_WINDOW + MIB as u64);
    // The fill waited for it (its first client) only so long; the stalled reader resumes
    // (from the file) and gets every byte.
    assert!(fill.lead.waits() > 0);
    let mut got = first.to_vec();
    got.extend(within(collect(stalled)).await.unwrap());
    assert!(got == body);
    assert!(cache.inner.metrics.read_back_count() > 0);
}

/// 16 distinct cold blobs fetched at once (what anonymous clients can ask for): each fill
/// trims its window to its share of what all fills may keep, and every budget is whole again
/// once they end. With the full window per fill, 16 fills kept 8 MiB each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_at_once_share_one_memory_budget() {
    const FILLS: usize = 16;
    let (_dir, cache) = fresh().await;
    let mem = cache.inner.fill_memory.clone();
    let mut fills = Vec::new();
    for i in 0..FILLS {
        let body = data(9 * MIB, 40 + i as u8);
        let d = Digest::sha256_of(&body);
        let (up, tx) = Upstream::new(Some(body.len() as u64));
        // Nobody reads: no first client to wait for.
        drop(cache.blob(&d, up.fetch()).await.unwrap());
        fills.push((fill_of(&cache, &d), body, tx, up, d));
    }
    for (_, body, tx, ..) in &fills {
        for c in body[..8 * MIB].chunks(MIB) {
            tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
        }
    }
    for (f, ..) in &fills {
        until(|| f.on_disk.load(Ordering::SeqCst) == 8 * MIB as u64).await;
    }
    assert_eq!(mem.active(), FILLS);
    let window = mem.window();
    assert!(window <= fill::RECENT_WINDOW / 4, "window {window}");
    // Each fill's next chunk trims it to its share: the 8 MiB on disk leave memory.
    for (_, body, tx, ..) in &fills {
        tx.send(Ok(Bytes::copy_from_slice(&body[8 * MIB..])))
            .unwrap();
    }
    for (f, ..) in &fills {
        let announced =
            |p: &Phase| matches!(p, Phase::Streaming { written, .. } if *written == 9 * MIB as u64);
        until(|| announced(&f.phase.borrow())).await;
        let held = f.recent_held();
        assert!(
            held <= window + MIB as u64,
            "a fill keeps {held} bytes, its share {window}"
        );
    }
    for (f, _, tx, up, d) in fills {
        drop(tx);
        until(|| cache.blob_size(&d) == Some(9 * MIB as u64)).await;
        assert_eq!(up.calls(), 1);
        drop(f);
    }
    until(|| mem.active() == 0).await;
    assert_eq!(mem.in_flight_free(), super::memory::IN_FLIGHT_TOTAL);
    assert_eq!(mem.buffers_free(), super::memory::BUFFERS_TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_readers_make_one_fetch_and_all_get_the_blob() {
    let (_dir, cache) = fresh().await;
    let body = data(5 * MIB, 26);
    let d = Digest::sha256_of(&body);
    let (up, tx) = Upstream::new(Some(body.len() as u64));
    let readers = within(futures_util::future::join_all(
        (0..50).map(|_| cache.blob(&d, up.fetch())),
    ))
    .await;
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|r| tokio::spawn(collect(r.unwrap().into_stream(None))))
        .collect();
    for c in body.chunks(300_000) {
        tx.send(Ok(Bytes::copy_from_slice(c))).unwrap();
    }
    drop(tx);
    for t in tasks {
        assert!(within(t).await.unwrap().unwrap() == body);
    }
    assert_eq!(up.calls(), 1);
    until(|| cache.blob_size(&d).is_some()).await;
}

/// Both ways of writing a fill (`cache.direct_writes` on and off) commit exactly the body: an
/// odd size that crosses the direct writer's buffer and ends in a partial block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_buffered_writes_commit_the_exact_bytes() {
    for direct_writes in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            direct_writes,
            ..config(dir.path(), None)
        };
        let cache = Cache::open(&cfg, &prometheus::Registry::new())
            .await
            .unwrap();
        let body = data(super::direct::BUFFER + 3 * MIB + 1234, 27);
        let d = commit(&cache, &body).await;
        let path = cache.inner.store.blob_path(&d, body.len() as u64);
        assert!(
            std::fs::read(&path).unwrap() == body,
            "committed file, direct_writes: {direct_writes}"
        );
        let hit = cache
            .blob(&d, fetch_fails(500, Arc::default()))
            .await
            .unwrap();
        assert_eq!(hit.outcome(), Outcome::Hit);
        assert!(within(collect(hit.into_stream(None))).await.unwrap() == body);
    }
}

/// [`verify_stream`] gives its last chunk only after the verdict: a consumer that stops as
/// soon as it has the `Content-Length` bytes (as hyper does) never gets all the bytes of a
/// body that does not match, and `on_verified` runs before the last byte of one that does.
#[tokio::test]
async fn verify_stream_holds_back_its_last_chunk_until_the_verdict() {
    let body: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    let chunks = |data: &[u8]| -> BoxStream<'static, Item> {
        let parts: Vec<Item> = data
            .chunks(7_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        stream::iter(parts).boxed()
    };
    // Reads until `len` bytes are in, without polling for the end.
    async fn take_len(mut s: BoxStream<'static, Item>, len: usize) -> Result<Vec<u8>, io::Error> {
        let mut got = Vec::new();
        while got.len() < len {
            match s.next().await {
                Some(Ok(b)) => got.extend_from_slice(&b),
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(got)
    }

    let right = Digest::sha256_of(&body);
    let verified = Arc::new(AtomicUsize::new(0));
    let v = verified.clone();
    let s = verify_stream(
        right,
        chunks(&body),
        Box::new(move || {
            v.fetch_add(1, Ordering::SeqCst);
        }),
    );
    assert_eq!(take_len(s, body.len()).await.unwrap(), body);
    assert_eq!(
        verified.load(Ordering::SeqCst),
        1,
        "verified before the last byte"
    );

    let mut lying = body.clone();
    lying[29_999] ^= 0xff;
    let s = verify_stream(Digest::sha256_of(&body), chunks(&lying), Box::new(|| {}));
    let got = take_len(s, body.len()).await;
    assert!(got.is_err(), "a clean end on bytes that do not match");
}

/// Hits read the page cache in large chunks while the process-wide budget lasts: readers that
/// hold their chunk (stalled clients) use it up, the next reader gets small chunks, and a
/// large chunk returns to the budget when it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_read_large_chunks_only_within_the_budget() {
    let (_dir, cache) = fresh().await;
    let body = data(4 * MIB, 32);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));
    let first = cache
        .blob(&d, fetch_bytes(body.clone(), calls))
        .await
        .unwrap();
    assert!(within(collect(first.into_stream(None))).await.unwrap() == body);
    until(|| cache.blob_size(&d).is_some()).await;
    let unused = || -> FetchFn { Box::new(|| panic!("a hit fetched upstream")) };
    // One whole read puts the file in the page cache.
    let warm = cache.blob(&d, unused()).await.unwrap();
    assert!(within(collect(warm.into_stream(None))).await.unwrap() == body);

    let mut held = Vec::new();
    for _ in 0..reader::LARGE_CHUNKS {
        let hit = cache.blob(&d, unused()).await.unwrap();
        let mut s = hit.into_stream(None);
        let chunk = within(s.next()).await.unwrap().unwrap();
        assert_eq!(chunk.len(), reader::LARGE_CHUNK, "within the budget");
        held.push((s, chunk));
    }
    let hit = cache.blob(&d, unused()).await.unwrap();
    let mut over = hit.into_stream(None);
    let chunk = within(over.next()).await.unwrap().unwrap();
    assert_eq!(chunk.len(), reader::CHUNK, "the budget is used up");
    drop(held.pop());
    let chunk = within(over.next()).await.unwrap().unwrap();
    assert_eq!(
        chunk.len(),
        reader::LARGE_CHUNK,
        "a dropped chunk returned to the budget"
    );
}
