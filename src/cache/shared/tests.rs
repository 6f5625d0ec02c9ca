//! Two caches (two "replicas", separate dirs) sharing one in-memory object store, and one
//! whose store refuses connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use object_store::memory::InMemory;
use object_store::ObjectStore;
use tokio::sync::oneshot;

use super::metrics::{Op, Res, WaitEnd};
use super::Shared;
use crate::cache::metrics::Tier;
use crate::cache::{Cache, FetchFn, Outcome, UpstreamBody};
use crate::config::CacheConfig;
use crate::protocol::grammar::Digest;

const DEADLINE: Duration = Duration::from_secs(10);

struct Replica {
    cache: Arc<Cache>,
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
}

async fn replica(store: Arc<dyn ObjectStore>) -> Replica {
    bounded_replica(store, None).await
}

/// A replica whose local tier holds at most `local_max_size` bytes.
async fn bounded_replica(store: Arc<dyn ObjectStore>, local_max_size: Option<u64>) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let shared = Shared::new(
        store,
        "/team/",
        Duration::from_secs(5),
        Duration::from_secs(10),
        Duration::from_secs(2),
        &registry,
    )
    .unwrap();
    let cfg = CacheConfig {
        dir: dir.path().to_path_buf(),
        max_size: local_max_size.map(crate::config::ByteSize),
        ..CacheConfig::default()
    };
    let cache = Cache::open_with(&cfg, &registry, Some(shared.clone()))
        .await
        .unwrap();
    Replica {
        cache,
        shared,
        _dir: dir,
    }
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// A fetch answering `body` (after `gate` opens, when given); counts its calls.
fn fetch(body: Vec<u8>, calls: Arc<AtomicUsize>, gate: Option<oneshot::Receiver<()>>) -> FetchFn {
    Box::new(move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if let Some(g) = gate {
                let _ = g.await;
            }
            let size = Some(body.len() as u64);
            let chunks: Vec<Result<Bytes, std::io::Error>> = body
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

async fn read(cache: &Cache, d: &Digest, f: FetchFn) -> (Outcome, Vec<u8>) {
    let r = tokio::time::timeout(DEADLINE, cache.blob(d, f))
        .await
        .expect("deadline")
        .unwrap();
    let outcome = r.outcome();
    let mut s = r.into_stream(None);
    let mut out = Vec::new();
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b.unwrap());
    }
    (outcome, out)
}

async fn wait_for_object(store: &dyn ObjectStore, key: &object_store::path::Path, want: &[u8]) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = store.get(key).await {
            if r.bytes().await.unwrap().as_ref() == want {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never held the blob"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_blob_filled_by_one_replica_is_served_by_another_without_upstream() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(store.clone()).await, replica(store.clone()).await);
    let body = data(200_000, 1);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));

    let (o, got) = read(&a.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!((o, got.len()), (Outcome::Miss, body.len()));
    let key = a.shared.blob_key(&d);
    assert!(key.as_ref().starts_with("team/blobs/sha256/"), "{key}");
    wait_for_object(&*store, &key, &body).await;
    // The lease is gone once the upload is done.
    let lease = a.shared.lease_key(&d);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.head(&lease).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (o, got) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!(got, body);
    assert_eq!(
        o,
        Outcome::Coalesced,
        "a shared fill asks the caller to confirm the repository"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "B never went upstream");
    assert_eq!(b.cache.inner.metrics.tier_count(Tier::Shared), 1);
    assert_eq!(b.cache.inner.metrics.tier_count(Tier::Upstream), 0);
    // Now local on B (once committed: the read may end before the commit).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while b.cache.blob_size(&d).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (o, _) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!(o, Outcome::Hit);
    assert_eq!(b.cache.inner.metrics.tier_count(Tier::Local), 1);
}

#[tokio::test]
async fn a_corrupt_shared_object_is_never_served_and_is_replaced() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = replica(store.clone()).await;
    let body = data(100_000, 2);
    let d = Digest::sha256_of(&body);
    let mut bad = body.clone();
    bad[50_000] ^= 0xff;
    let key = b.shared.blob_key(&d);
    store.put(&key, bad.into()).await.unwrap();

    let calls = Arc::new(AtomicUsize::new(0));
    let (o, got) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!(got, body, "the upstream's bytes, not the bucket's");
    assert_eq!(o, Outcome::Miss);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(b.shared.metrics.corrupt_count(), 1);
    wait_for_object(&*store, &key, &body).await;
}

#[tokio::test]
async fn concurrent_cold_fills_on_two_replicas_go_upstream_once() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(store.clone()).await, replica(store.clone()).await);
    let body = data(300_000, 3);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));
    let (open, gate) = oneshot::channel();

    // A takes the lease and blocks upstream until the gate opens.
    let a_cache = a.cache.clone();
    let (d2, body2, calls2) = (d.clone(), body.clone(), calls.clone());
    let a_task =
        tokio::spawn(async move { read(&a_cache, &d2, fetch(body2, calls2, Some(gate))).await });
    let lease = a.shared.lease_key(&d);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.head(&lease).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never took the lease"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b_cache = b.cache.clone();
    let (d3, body3, calls3) = (d.clone(), body.clone(), calls.clone());
    let b_task = tokio::spawn(async move { read(&b_cache, &d3, fetch(body3, calls3, None)).await });
    let _ = open.send(());

    let (oa, got_a) = a_task.await.unwrap();
    let (ob, got_b) = b_task.await.unwrap();
    assert_eq!((oa, ob), (Outcome::Miss, Outcome::Coalesced));
    assert_eq!((got_a.len(), got_b.len()), (body.len(), body.len()));
    assert_eq!(got_b, body);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one upstream GET across replicas"
    );
    assert_eq!(b.shared.metrics.lease_wait_count(WaitEnd::Landed), 1);
}

#[tokio::test]
async fn manifests_and_links_cross_replicas() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(store.clone()).await, replica(store.clone()).await);
    let m = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let d = Digest::sha256_of(&m);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    a.cache.put_manifest(&d, mt, m.clone()).await.unwrap();
    // Replicas share the grant key through the bucket.
    let g = a
        .cache
        .grant(&[b"module m, Secret kcp-system/s", b"u", b"p"]);
    assert_eq!(
        g,
        b.cache
            .grant(&[b"module m, Secret kcp-system/s", b"u", b"p"])
    );
    a.cache.link("r.io/team/app", &d, g).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store
        .head(&a.shared.link_key("r.io/team/app", &d))
        .await
        .is_err()
        || store.head(&a.shared.manifest_key(&d)).await.is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "never uploaded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let got = b.cache.manifest(&d).await.expect("from the shared tier");
    assert_eq!((got.media_type.as_str(), got.bytes), (mt, m));
    let day = Duration::from_secs(86_400);
    let other = b.cache.grant(&[b"no credentials (anonymous)"]);
    assert!(
        !b.cache.is_linked("r.io/team/app", &d, other, day).await,
        "another grant"
    );
    assert!(b.cache.is_linked("r.io/team/app", &d, g, day).await);
    let gets = b.shared.metrics.op_count(Op::HeadLink, Res::Ok);
    assert!(
        b.cache.is_linked("r.io/team/app", &d, g, day).await,
        "kept locally"
    );
    assert_eq!(b.shared.metrics.op_count(Op::HeadLink, Res::Ok), gets);
    assert!(!b.cache.is_linked("r.io/team/other", &d, g, day).await);

    // Origins travel too: B admits the bytes for the upstream A fetched them from only.
    a.cache.add_origin(&d, "a.io");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.head(&a.shared.origin_key("a.io", &d)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "origin never uploaded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(b.cache.admits(&d, &["a.io"]).await);
    assert!(!b.cache.admits(&d, &["liar.io"]).await);
}

#[tokio::test]
async fn an_unreachable_store_degrades_to_upstream() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again: connections are refused
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("b")
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        .build()
        .unwrap();
    let r = replica(Arc::new(s3)).await;
    let body = data(10_000, 4);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));
    let (o, got) = read(&r.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!((o, got), (Outcome::Miss, body));
    // The first failure was reading the shared grant key at open (a local key is used).
    assert_eq!(r.shared.metrics.op_count(Op::GrantKey, Res::Error), 1);
    // Resting: the misses do not even try.
    let body2 = data(10_000, 5);
    let d2 = Digest::sha256_of(&body2);
    let (_, got) = read(&r.cache, &d2, fetch(body2.clone(), calls.clone(), None)).await;
    assert_eq!(got, body2);
    assert_eq!(r.shared.metrics.op_count(Op::GetBlob, Res::Skipped), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An in-memory store whose blob GETs hand out 64KiB chunks and stop after `pause_after`
/// bytes until the gate opens (a slow bucket, so a test can look at a read mid-way).
#[derive(Debug)]
struct Gated {
    inner: InMemory,
    pause_after: usize,
    gate: tokio::sync::watch::Sender<bool>,
    /// Blob uploads never answer (a bucket that accepts the connection and stalls).
    stall_blob_puts: bool,
}

impl Gated {
    /// An empty store whose blob reads stop after `pause_after` bytes until the gate opens.
    fn paused_after(pause_after: usize) -> Arc<Gated> {
        let (gate, _) = tokio::sync::watch::channel(false);
        Arc::new(Gated {
            inner: InMemory::new(),
            pause_after,
            gate,
            stall_blob_puts: false,
        })
    }

    /// An empty store whose blob uploads (single or multipart) never answer.
    fn stalling_blob_puts() -> Arc<Gated> {
        let (gate, _) = tokio::sync::watch::channel(false);
        Arc::new(Gated {
            inner: InMemory::new(),
            pause_after: usize::MAX,
            gate,
            stall_blob_puts: true,
        })
    }

    fn stalls(&self, location: &object_store::path::Path) -> bool {
        self.stall_blob_puts && location.as_ref().contains("/blobs/")
    }
}

impl std::fmt::Display for Gated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gated({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Gated {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if self.stalls(location) {
            std::future::pending::<()>().await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        if self.stalls(location) {
            std::future::pending::<()>().await;
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        let r = self.inner.get_opts(location, options).await?;
        if !location.as_ref().contains("/blobs/") {
            return Ok(r);
        }
        let (meta, range, attributes) = (r.meta.clone(), r.range.clone(), r.attributes.clone());
        let all = r.bytes().await?;
        let (pause_after, open) = (self.pause_after, self.gate.subscribe());
        let chunks: Vec<Bytes> = all.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
        let body = stream::iter(chunks.into_iter().scan(0usize, |pos, c| {
            let at = *pos;
            *pos += c.len();
            Some((at, c))
        }))
        .then(move |(at, c)| {
            let mut open = open.clone();
            async move {
                if at >= pause_after {
                    let _ = open.wait_for(|o| *o).await;
                }
                Ok(c)
            }
        })
        .boxed();
        Ok(object_store::GetResult {
            payload: object_store::GetResultPayload::Stream(body),
            meta,
            range,
            attributes,
        })
    }

    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
    {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[tokio::test]
async fn a_large_blob_streams_from_the_bucket_before_it_is_all_read() {
    let gated = Gated::paused_after(1 << 20);
    let b = replica(gated.clone()).await;
    let body = data(super::VERIFY_BEFORE_STREAMING_MAX as usize + (1 << 20), 6);
    let d = Digest::sha256_of(&body);
    gated
        .put(&b.shared.blob_key(&d), body.clone().into())
        .await
        .unwrap();

    let calls = Arc::new(AtomicUsize::new(0));
    // The bucket holds back all but the first MiB: a reader still gets bytes.
    let r = tokio::time::timeout(
        DEADLINE,
        b.cache.blob(&d, fetch(body.clone(), calls.clone(), None)),
    )
    .await
    .expect("the reader starts before the bucket read ends")
    .unwrap();
    assert_eq!(r.outcome(), Outcome::Coalesced);
    assert_eq!(r.size(), Some(body.len() as u64));
    let mut s = r.into_stream(None);
    let first = tokio::time::timeout(DEADLINE, s.next())
        .await
        .expect("first bytes while the bucket read is paused")
        .unwrap()
        .unwrap();
    assert_eq!(first.as_ref(), &body[..first.len()]);

    gated.gate.send_replace(true);
    let mut got = first.to_vec();
    while let Some(c) = tokio::time::timeout(DEADLINE, s.next()).await.unwrap() {
        got.extend_from_slice(&c.unwrap());
    }
    assert!(got == body, "the whole blob, in order");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never upstream");
    assert_eq!(b.cache.inner.metrics.tier_count(Tier::Shared), 1);
    // The read ends at verification; the commit follows.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while b.cache.blob_size(&d).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (o, _) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!(o, Outcome::Hit, "committed after verification");
}

#[tokio::test]
async fn a_large_corrupt_object_cuts_the_stream_and_the_retry_goes_upstream() {
    // The bucket pauses after 1 MiB, so the reader is handed out (streaming) before the
    // corruption near the end can be found.
    let gated = Gated::paused_after(1 << 20);
    let b = replica(gated.clone()).await;
    let (body, d, key) = put_corrupt_large(&*gated, &b, 7).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let r = open_blob(&b.cache, &d, &body, &calls).await;
    gated.gate.send_replace(true);
    let (got, ended) = drain(r.into_stream(None)).await;
    assert!(ended.is_err(), "a corrupt body never ends cleanly");
    assert!(got < body.len(), "the last bytes are held back: {got}");
    assert_eq!(b.shared.metrics.corrupt_count(), 1);
    assert!(
        gated.head(&key).await.is_err(),
        "the corrupt object is deleted"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let (o, got) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert!(got == body);
    assert_eq!(o, Outcome::Miss);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the retry went upstream");
}

/// Puts a blob above the verify-first size with one byte flipped near its end into the
/// bucket: `(the right bytes, their digest, the object's key)`.
async fn put_corrupt_large(
    store: &dyn ObjectStore,
    r: &Replica,
    seed: u8,
) -> (Vec<u8>, Digest, object_store::path::Path) {
    let body = data(super::VERIFY_BEFORE_STREAMING_MAX as usize + 4096, seed);
    let d = Digest::sha256_of(&body);
    let mut bad = body.clone();
    bad[body.len() - 10] ^= 0x01;
    let key = r.shared.blob_key(&d);
    store.put(&key, bad.into()).await.unwrap();
    (body, d, key)
}

/// A reader of `d` from `cache`, whose upstream would answer `body` (counting in `calls`).
async fn open_blob(
    cache: &Cache,
    d: &Digest,
    body: &[u8],
    calls: &Arc<AtomicUsize>,
) -> crate::cache::BlobReader {
    let f = fetch(body.to_vec(), calls.clone(), None);
    tokio::time::timeout(DEADLINE, cache.blob(d, f))
        .await
        .expect("deadline")
        .unwrap()
}

/// Reads a stream to its end: the bytes seen, and how it ended.
async fn drain(
    mut s: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
) -> (usize, std::io::Result<()>) {
    let mut got = 0usize;
    loop {
        match tokio::time::timeout(DEADLINE, s.next()).await.unwrap() {
            Some(Ok(c)) => got += c.len(),
            Some(Err(e)) => return (got, Err(e)),
            None => return (got, Ok(())),
        }
    }
}

#[tokio::test]
async fn a_large_corrupt_object_read_at_full_speed_never_ends_cleanly() {
    // Without a pause the fill may find the corruption before or after the request got its
    // reader: before, the request starts a new fill with its fetch handed back (upstream,
    // correct bytes); after, its stream is cut. Either way no clean end on wrong bytes.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = replica(store.clone()).await;
    let (body, d, _) = put_corrupt_large(&*store, &b, 9).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let r = open_blob(&b.cache, &d, &body, &calls).await;
    let outcome = r.outcome();
    let mut s = r.into_stream(None);
    let mut got = Vec::new();
    let ended = loop {
        match tokio::time::timeout(DEADLINE, s.next()).await.unwrap() {
            Some(Ok(c)) => got.extend_from_slice(&c),
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    eprintln!("ended cleanly: {}", ended.is_ok());
    match ended {
        Ok(()) => {
            assert!(got == body, "a clean end carries the right bytes");
            assert_eq!((outcome, calls.load(Ordering::SeqCst)), (Outcome::Miss, 1));
        }
        Err(_) => assert_eq!(calls.load(Ordering::SeqCst), 0),
    }
    assert_eq!(b.shared.metrics.corrupt_count(), 1);
    let (_, got) = read(&b.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert!(got == body);
}

#[tokio::test]
async fn sizes_and_ranges_come_from_the_bucket() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = replica(store.clone()).await;
    let body = data(300_000, 8);
    let d = Digest::sha256_of(&body);
    assert_eq!(b.cache.shared_blob_size(&d).await, None);
    assert!(b.cache.shared_blob_range(&d, 0, 9).await.is_none());
    store
        .put(&b.shared.blob_key(&d), body.clone().into())
        .await
        .unwrap();

    assert_eq!(b.cache.shared_blob_size(&d).await, Some(300_000));
    let mut s = b.cache.shared_blob_range(&d, 1000, 200_999).await.unwrap();
    let mut got = Vec::new();
    while let Some(c) = s.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert!(got == body[1000..201_000]);
    assert_eq!(b.shared.metrics.op_count(Op::GetRange, Res::Ok), 1);
    assert_eq!(b.shared.metrics.op_count(Op::GetRange, Res::Miss), 1);
    assert_eq!(b.cache.blob_size(&d), None, "a range read commits nothing");
}

#[tokio::test]
async fn tags_checked_by_one_replica_are_seen_by_another_and_removed_with_it() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(store.clone()).await, replica(store.clone()).await);
    let (repo, ttl) = ("r.io/team/app", Duration::from_secs(60));
    let d = Digest::sha256_of(b"a manifest");
    assert!(b.cache.tag(repo, "v1", ttl).await.is_none());

    let g = a.cache.grant(&[b"g"]);
    a.cache.put_tag(repo, "v1", &d, g).await;
    let key = a.shared.tag_key(repo, "v1");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.head(&key).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "tag never uploaded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from_a = a.cache.tag(repo, "v1", ttl).await.unwrap();
    let seen = b.cache.tag(repo, "v1", ttl).await.expect("from the bucket");
    assert_eq!(seen.digest, d);
    assert_eq!(seen.grant, Some(g), "the grant travels with the tag");
    // A's check time travels with it, to the millisecond: B's TTL counts from A's check.
    let skew = match from_a.checked_at.duration_since(seen.checked_at) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(skew < Duration::from_millis(50), "{skew:?}");
    // Kept locally: a fresh entry needs no bucket read.
    let gets = b.shared.metrics.op_count(Op::GetTag, Res::Ok);
    assert_eq!(b.cache.tag(repo, "v1", ttl).await.unwrap().digest, d);
    assert_eq!(b.shared.metrics.op_count(Op::GetTag, Res::Ok), gets);

    // The upstream said 404 on A: the bucket forgets the tag too.
    a.cache.remove_tag(repo, "v1", g).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.head(&key).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "tag never deleted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c = replica(store.clone()).await;
    assert!(c.cache.tag(repo, "v1", ttl).await.is_none());
}

#[tokio::test]
async fn a_bounded_local_tier_evicts_and_refills_from_the_bucket_not_upstream() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let r = bounded_replica(store.clone(), Some(250_000)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| data(100_000, 20 + i)).collect();
    let digests: Vec<Digest> = bodies.iter().map(|b| Digest::sha256_of(b)).collect();
    for (b, d) in bodies.iter().zip(&digests) {
        let (o, got) = read(&r.cache, d, fetch(b.clone(), calls.clone(), None)).await;
        assert_eq!((o, got.len()), (Outcome::Miss, b.len()));
        wait_for_object(&*store, &r.shared.blob_key(d), b).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // 300 000 bytes against a 250 000 bound: the least recently used goes.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while r.cache.blob_size(&digests[0]).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "nothing evicted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(r.cache.size_bytes() <= 250_000);

    let (o, got) = read(
        &r.cache,
        &digests[0],
        fetch(bodies[0].clone(), calls.clone(), None),
    )
    .await;
    assert!(got == bodies[0]);
    assert_eq!(o, Outcome::Coalesced, "filled from the bucket");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "no upstream GET for the evicted blob"
    );
    assert_eq!(r.cache.inner.metrics.tier_count(Tier::Shared), 1);
}

/// A stalled upload ends (bounded by `op_timeout` plus the bytes at the minimum upload rate)
/// and releases its fill lease: without the bound the lease is renewed for as long as the
/// upload hangs, and every other replica's miss on that digest waits `lease_wait`.
#[tokio::test]
async fn a_stalled_upload_ends_and_releases_its_lease() {
    let a = replica(Gated::stalling_blob_puts()).await;
    let body = data(100 << 10, 9);
    let d = Digest::sha256_of(&body);
    let calls = Arc::new(AtomicUsize::new(0));
    let (_, got) = read(&a.cache, &d, fetch(body.clone(), calls.clone(), None)).await;
    assert_eq!(got, body, "the client is served while the upload stalls");

    let lease_key = a.shared.lease_key(&d);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let released = matches!(
            a.shared.store.get(&lease_key).await,
            Err(object_store::Error::NotFound { .. })
        );
        if released && a.shared.metrics.op_count(Op::PutBlob, Res::Error) == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled upload never ended (lease still held: {})",
            !released
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
