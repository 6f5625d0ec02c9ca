//! A hostile upstream for the resource-limit tests: an in-process anonymous registry (axum on
//! 127.0.0.1:0) whose blobs trickle, announce absurd sizes or come without a length, and whose
//! tag lists are huge and never end. It counts requests and the blob bodies still open (a
//! body counts as open until the proxy drops the connection), so a test can assert that the
//! proxy both went upstream a bounded number of times and let go of what it started.
//!
//! - `GET /v2/`: 200.
//! - `GET|HEAD /v2/<repo>/manifests/<ref>`: [`HostileRegistry::manifest`] (a small OCI
//!   manifest), for "other requests are not stuck behind blob fills".
//! - `GET /v2/<repo>/blobs/<digest>`: as set by [`HostileRegistry::set_blob`]: a
//!   [`Blob::Trickle`], [`Blob::Unsized`] or [`Blob::Announced`] body.
//! - `GET /v2/<repo>/tags/list`: [`TagPages`]: pages of `page_bytes` bytes of tags, each with a
//!   `Link` to the next, `pages` of them (`usize::MAX`: never ending).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, Response, StatusCode, Uri};
use axum::Router;
use futures_util::stream;
use tokio::net::TcpListener;

use super::seed::sha256_digest;

/// How a blob GET is answered.
#[derive(Clone, Copy, Debug)]
pub enum Blob {
    /// `Content-Length: size`, then `chunk` zero bytes every `every` (until `size`).
    Trickle {
        size: u64,
        chunk: usize,
        every: Duration,
    },
    /// `size` bytes at once, without a `Content-Length` (chunked).
    Unsized { size: usize },
    /// `Content-Length: size` (more than the test's `max_blob_size`), then a trickle.
    Announced { size: u64 },
}

/// A tag list that floods: `pages` pages of about `page_bytes` bytes each.
#[derive(Clone, Copy, Debug)]
pub struct TagPages {
    pub page_bytes: usize,
    pub pages: usize,
}

#[derive(Default)]
struct Inner {
    blobs: Mutex<HashMap<String, Blob>>,
    tags: Mutex<HashMap<String, TagPages>>,
    /// (method, kind) → requests; kind is `blob`, `manifest`, `tags` or `other`.
    counts: Mutex<HashMap<(String, &'static str), usize>>,
    open_bodies: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running fixture; the server and every connection stop when it is dropped.
pub struct HostileRegistry {
    inner: Arc<Inner>,
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The manifest every repository serves for every reference.
pub const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

impl HostileRegistry {
    pub async fn start() -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hostile registry");
        let port = listener.local_addr().expect("hostile registry addr").port();
        let inner = Arc::new(Inner::default());
        let server = tokio::spawn(serve(listener, inner.clone()));
        HostileRegistry {
            inner,
            port,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How GETs of `digest` (in any repository) are answered.
    pub fn set_blob(&self, digest: &str, blob: Blob) {
        lock(&self.inner.blobs).insert(digest.to_owned(), blob);
    }

    /// How `GET /v2/<repo>/tags/list` is answered.
    pub fn set_tags(&self, repo: &str, pages: TagPages) {
        lock(&self.inner.tags).insert(repo.to_owned(), pages);
    }

    /// Requests received of a kind (`blob`, `manifest`, `tags`), any method.
    pub fn requests(&self, kind: &str) -> usize {
        lock(&self.inner.counts)
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// Blob bodies being sent right now (the proxy has not closed their connection).
    pub fn open_bodies(&self) -> usize {
        self.inner.open_bodies.load(Ordering::SeqCst)
    }
}

/// Counts a body as open while it exists.
struct OpenBody(Arc<AtomicUsize>);

impl OpenBody {
    fn new(n: &Arc<AtomicUsize>) -> OpenBody {
        n.fetch_add(1, Ordering::SeqCst);
        OpenBody(n.clone())
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves this fixture's handler on `listener` until aborted ([`super::serve_router`]).
async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    super::serve_router(listener, Router::new().fallback(handle).with_state(inner)).await
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}

async fn handle(State(inner): State<Arc<Inner>>, method: Method, uri: Uri) -> Response<Body> {
    let path = uri.path().to_owned();
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    let kind = if rest.contains("/blobs/") {
        "blob"
    } else if rest.contains("/manifests/") {
        "manifest"
    } else if rest.ends_with("/tags/list") {
        "tags"
    } else {
        "other"
    };
    *lock(&inner.counts)
        .entry((method.to_string(), kind))
        .or_insert(0) += 1;
    match kind {
        "other" if rest.is_empty() => status(StatusCode::OK),
        "manifest" => {
            let mut r = if method == Method::HEAD {
                Response::new(Body::empty())
            } else {
                Response::new(Body::from(MANIFEST))
            };
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(MANIFEST_TYPE),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(MANIFEST.len()));
            if let Ok(v) = HeaderValue::from_str(&sha256_digest(MANIFEST.as_bytes())) {
                h.insert("docker-content-digest", v);
            }
            r
        }
        "blob" => {
            let digest = rest.rsplit('/').next().unwrap_or("");
            let blob = lock(&inner.blobs).get(digest).copied();
            match blob {
                Some(b) if method == Method::GET => blob_response(b, &inner.open_bodies),
                Some(_) => status(StatusCode::OK),
                None => status(StatusCode::NOT_FOUND),
            }
        }
        "tags" => {
            let repo = rest.trim_end_matches("/tags/list");
            let pages = lock(&inner.tags).get(repo).copied();
            match pages {
                Some(p) => tag_page(repo, p, uri.query()),
                None => status(StatusCode::NOT_FOUND),
            }
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

fn trickle(open: &Arc<AtomicUsize>, size: u64, chunk: usize, every: Duration) -> Body {
    let guard = OpenBody::new(open);
    let s = stream::unfold((0u64, guard), move |(sent, guard)| async move {
        if sent >= size {
            return None;
        }
        tokio::time::sleep(every).await;
        let n = (chunk as u64).min(size - sent) as usize;
        Some((
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; n])),
            (sent + n as u64, guard),
        ))
    });
    Body::from_stream(s)
}

fn blob_response(b: Blob, open: &Arc<AtomicUsize>) -> Response<Body> {
    let (body, len) = match b {
        Blob::Trickle { size, chunk, every } => (trickle(open, size, chunk, every), Some(size)),
        Blob::Announced { size } => (
            trickle(open, size, 16, Duration::from_millis(100)),
            Some(size),
        ),
        Blob::Unsized { size } => {
            let guard = OpenBody::new(open);
            let chunks = (0..size.div_ceil(65536)).map(move |i| {
                let _ = &guard;
                let n = 65536.min(size - i * 65536);
                Ok::<_, std::io::Error>(Bytes::from(vec![1u8; n]))
            });
            (
                Body::from_stream(stream::iter(chunks.collect::<Vec<_>>())),
                None,
            )
        }
    };
    let mut r = Response::new(body);
    if let Some(len) = len {
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// Page `k` (from `?page=k`, 0 without) of a flooding tag list.
fn tag_page(repo: &str, p: TagPages, query: Option<&str>) -> Response<Body> {
    let page: usize = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("page=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Tags of 40 bytes, unique per page, sorted within and across pages.
    let per_page = p.page_bytes / 43;
    let tags: Vec<String> = (0..per_page)
        .map(|i| format!("p{page:06}-{i:08}-{}", "x".repeat(23)))
        .collect();
    let body = serde_json::json!({ "name": repo, "tags": tags }).to_string();
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if page + 1 < p.pages {
        let link = format!("</v2/{repo}/tags/list?page={}>; rel=\"next\"", page + 1);
        if let Ok(v) = HeaderValue::from_str(&link) {
            r.headers_mut().insert(header::LINK, v);
        }
    }
    r
}
