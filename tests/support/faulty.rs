//! A deliberately unreliable upstream: an in-process, anonymous OCI registry (axum on
//! 127.0.0.1:0) serving the blobs and manifests a test gives it, with per-digest faults a real
//! registry will not produce: wrong bytes, bodies cut short, stalls and step-by-step bodies
//! the test releases, error statuses, and going down (503 or connection refused).
//!
//! It counts every request by method and path (`/v2/<repo>/blobs/<digest>`), so tests can
//! assert exactly how often the proxy went upstream. Only what a pull needs is served:
//! `GET /v2/`, `GET`/`HEAD` of `/v2/<repo>/blobs/<digest>` and `/v2/<repo>/manifests/<ref>`.
//! A blob is found in a repository only after [`FaultyRegistry::add_blob`] or
//! [`FaultyRegistry::link_blob`] put it there, so cross-repository checks can be answered 404.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, Response, StatusCode, Uri};
use axum::Router;
use futures_util::stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use super::seed::sha256_digest;

/// How the registry answers a GET of one digest (blob or manifest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// The stored bytes.
    Correct,
    /// Bytes of the right length that do not match the digest (every byte inverted).
    WrongBytes,
    /// `Content-Length: N`, then the first `N/2` bytes, then the connection is closed.
    Truncate,
    /// The first half at once, then nothing until [`FaultyRegistry::release`] gives one step;
    /// then the rest.
    Stall,
    /// The body in `n` near-equal chunks, each sent only after one released step.
    Steps(usize),
    /// GET and HEAD answer this status (e.g. 500, 503, 429 with `Retry-After: 1`).
    Status(u16),
}

/// How [`FaultyRegistry::go_down`] makes the registry unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Down {
    /// Every request (also `/v2/`) answers 503; requests are still counted.
    Unavailable,
    /// The listener and every open connection are closed: connections are refused.
    Refused,
}

#[derive(Default)]
struct Inner {
    /// digest → (bytes, media type for manifests).
    content: Mutex<HashMap<String, (Bytes, Option<String>)>>,
    /// (repo, digest) pairs: which repository holds which blob.
    members: Mutex<HashSet<(String, String)>>,
    /// (repo, tag) → manifest digest.
    tags: Mutex<HashMap<(String, String), String>>,
    behaviours: Mutex<HashMap<String, Behaviour>>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// (method, path) → requests received.
    counts: Mutex<HashMap<(String, String), usize>>,
    unavailable: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn gate(&self, digest: &str) -> Arc<Semaphore> {
        lock(&self.gates)
            .entry(digest.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }

    fn behaviour(&self, digest: &str) -> Behaviour {
        lock(&self.behaviours)
            .get(digest)
            .copied()
            .unwrap_or(Behaviour::Correct)
    }
}

/// The running fixture; the server stops when it is dropped.
pub struct FaultyRegistry {
    inner: Arc<Inner>,
    port: u16,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for FaultyRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyRegistry")
            .field("port", &self.port)
            .finish()
    }
}

impl Drop for FaultyRegistry {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
    }
}

/// `/v2/<repo>/blobs/<digest>`: the path the fixture counts a blob request under.
pub fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// `/v2/<repo>/manifests/<reference>`.
pub fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

impl FaultyRegistry {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> FaultyRegistry {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind faulty registry");
        let port = listener.local_addr().expect("faulty registry addr").port();
        let inner = Arc::new(Inner::default());
        let task = tokio::spawn(serve(listener, inner.clone()));
        FaultyRegistry {
            inner,
            port,
            server: Mutex::new(Some(task)),
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stores `bytes` as a blob held by `repo`; returns its `sha256:` digest.
    pub fn add_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        lock(&self.inner.content).insert(digest.clone(), (Bytes::copy_from_slice(bytes), None));
        self.link_blob(repo, &digest);
        digest
    }

    /// Makes an already stored digest visible in `repo` too.
    pub fn link_blob(&self, repo: &str, digest: &str) {
        lock(&self.inner.members).insert((repo.to_string(), digest.to_string()));
    }

    /// Stores a manifest in `repo` under `tag` (and its digest); returns the digest.
    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        lock(&self.inner.content).insert(
            digest.clone(),
            (Bytes::copy_from_slice(bytes), Some(media_type.to_string())),
        );
        self.link_blob(repo, &digest);
        lock(&self.inner.tags).insert((repo.to_string(), tag.to_string()), digest.clone());
        digest
    }

    /// Deletes a tag (the manifest stays reachable by digest).
    pub fn remove_tag(&self, repo: &str, tag: &str) {
        lock(&self.inner.tags).remove(&(repo.to_string(), tag.to_string()));
    }

    /// Sets how GETs of `digest` are answered from now on; resets its released steps.
    pub fn set_behaviour(&self, digest: &str, behaviour: Behaviour) {
        lock(&self.inner.behaviours).insert(digest.to_string(), behaviour);
        lock(&self.inner.gates).insert(digest.to_string(), Arc::new(Semaphore::new(0)));
    }

    /// Lets `steps` more held chunks of `digest` go out ([`Behaviour::Stall`],
    /// [`Behaviour::Steps`]); steps released before a request arrives are kept for it.
    pub fn release(&self, digest: &str, steps: usize) {
        self.inner.gate(digest).add_permits(steps);
    }

    /// GET requests received for exactly `path` (e.g. [`blob_path`]).
    pub fn gets(&self, path: &str) -> usize {
        self.count("GET", path)
    }

    /// HEAD requests received for exactly `path`.
    pub fn heads(&self, path: &str) -> usize {
        self.count("HEAD", path)
    }

    /// Requests with `method` received for `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.inner.counts)
            .get(&(method.to_string(), path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Makes the registry unavailable (see [`Down`]).
    pub fn go_down(&self, how: Down) {
        match how {
            Down::Unavailable => *lock(&self.inner.unavailable) = true,
            Down::Refused => {
                if let Some(task) = lock(&self.server).take() {
                    // Dropping the accept loop drops its listener and its connection tasks.
                    task.abort();
                }
            }
        }
    }

    /// Serves normally again (re-binding the same port after [`Down::Refused`]).
    pub async fn go_up(&self) {
        *lock(&self.inner.unavailable) = false;
        let running = lock(&self.server)
            .as_ref()
            .is_some_and(|t| !t.is_finished());
        if running {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            // The aborted task releases the port once it has been dropped; retry until then.
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(super::POLL_INTERVAL).await;
                }
                Err(e) => panic!("re-bind faulty registry port {}: {e}", self.port),
            }
        };
        let task = tokio::spawn(serve(listener, self.inner.clone()));
        *lock(&self.server) = Some(task);
    }
}

/// Serves this fixture's handler on `listener` until aborted ([`super::serve_router`]).
async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    super::serve_router(listener, Router::new().fallback(handle).with_state(inner)).await
}

fn error(status: StatusCode, code: &str) -> Response<Body> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"faulty fixture"}}]}}"#);
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// What a path names.
enum Target {
    Ping,
    Blob { repo: String, digest: String },
    Manifest { repo: String, reference: String },
}

fn parse(path: &str) -> Option<Target> {
    if path == "/v2/" || path == "/v2" {
        return Some(Target::Ping);
    }
    let rest = path.strip_prefix("/v2/")?;
    for (kind, is_blob) in [("/blobs/", true), ("/manifests/", false)] {
        if let Some(i) = rest.rfind(kind) {
            let repo = rest[..i].to_string();
            let last = rest[i + kind.len()..].to_string();
            return Some(if is_blob {
                Target::Blob { repo, digest: last }
            } else {
                Target::Manifest {
                    repo,
                    reference: last,
                }
            });
        }
    }
    None
}

async fn handle(State(inner): State<Arc<Inner>>, method: Method, uri: Uri) -> Response<Body> {
    let path = uri.path().to_string();
    *lock(&inner.counts)
        .entry((method.to_string(), path.clone()))
        .or_insert(0) += 1;
    if *lock(&inner.unavailable) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE");
    }
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    }
    let head = method == Method::HEAD;
    let (digest, not_found) = match parse(&path) {
        None => return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        Some(Target::Ping) => {
            let mut resp = Response::new(Body::from("{}"));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return resp;
        }
        Some(Target::Blob { repo, digest }) => {
            let member = lock(&inner.members).contains(&(repo, digest.clone()));
            (member.then_some(digest), "BLOB_UNKNOWN")
        }
        Some(Target::Manifest { repo, reference }) => {
            let digest = if reference.contains(':') {
                lock(&inner.members)
                    .contains(&(repo, reference.clone()))
                    .then_some(reference)
            } else {
                lock(&inner.tags).get(&(repo, reference)).cloned()
            };
            (digest, "MANIFEST_UNKNOWN")
        }
    };
    let found = digest.and_then(|d| lock(&inner.content).get(&d).cloned().map(|c| (d, c)));
    let Some((digest, (bytes, media_type))) = found else {
        return error(StatusCode::NOT_FOUND, not_found);
    };
    let behaviour = inner.behaviour(&digest);
    if let Behaviour::Status(code) = behaviour {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "FAULT");
    }
    let body = if head {
        Body::empty()
    } else {
        body_for(&inner, &digest, bytes.clone(), behaviour)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let ctype = media_type.unwrap_or_else(|| "application/octet-stream".into());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&ctype).expect("media type header"),
    );
    h.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest).expect("digest header"),
    );
    resp
}

/// The GET body for `behaviour`: a producer task feeds a channel, so held chunks wait on the
/// digest's gate and a client that goes away just ends the task.
fn body_for(inner: &Inner, digest: &str, bytes: Bytes, behaviour: Behaviour) -> Body {
    let len = bytes.len();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let gate = inner.gate(digest);
    let plan: Vec<(Bytes, bool)> = match behaviour {
        Behaviour::Correct | Behaviour::Status(_) => vec![(bytes, false)],
        Behaviour::WrongBytes => {
            let wrong: Vec<u8> = bytes.iter().map(|b| !b).collect();
            vec![(Bytes::from(wrong), false)]
        }
        Behaviour::Truncate => vec![(bytes.slice(..len / 2), false)],
        Behaviour::Stall => vec![
            (bytes.slice(..len / 2), false),
            (bytes.slice(len / 2..), true),
        ],
        Behaviour::Steps(n) => {
            let n = n.max(1);
            (0..n)
                .map(|i| (bytes.slice(len * i / n..len * (i + 1) / n), true))
                .collect()
        }
    };
    let truncate = behaviour == Behaviour::Truncate;
    tokio::spawn(async move {
        for (chunk, held) in plan {
            if held {
                match gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
            }
            if tx.send(Ok(chunk)).await.is_err() {
                return; // client gone
            }
        }
        if truncate {
            // An error mid-body makes hyper close the connection short of Content-Length.
            let _ = tx
                .send(Err(std::io::Error::other("faulty: truncated body")))
                .await;
        }
    });
    let s = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(s)
}
