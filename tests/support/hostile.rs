//! A scripted HTTP server that plays a hostile upstream, a CDN, or an "internal" service the
//! proxy must never reach: every answer is set by the test per method and path (a 302 to
//! anywhere, a 206 with a lying `Content-Range`, a manifest with a false
//! `Docker-Content-Digest`, a 401 naming any token realm), and every request is recorded with
//! its headers, so a test can assert that a service was never hit or that no `Referer` arrived.
//!
//! Unscripted requests: `GET /v2/` answers `200 {}`, anything else `404` with an OCI error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use axum::Router;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Scripted {
    pub fn new(status: u16) -> Scripted {
        Scripted {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A redirect to `location`.
    pub fn redirect(status: u16, location: &str) -> Scripted {
        Scripted::new(status).header("Location", location)
    }

    pub fn header(mut self, name: &str, value: &str) -> Scripted {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Scripted {
        self.body = body.into();
        self
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Inner {
    /// (method, path, only with a Range header) → answer.
    scripts: Mutex<HashMap<(String, String, bool), Scripted>>,
    seen: Mutex<Vec<Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running server; it stops when dropped.
pub struct Hostile {
    inner: Arc<Inner>,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    /// Binds 127.0.0.1:0 and serves scripted answers.
    pub async fn start() -> Hostile {
        let inner = Arc::new(Inner::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hostile server");
        let port = listener.local_addr().expect("hostile addr").port();
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hostile { inner, port, task }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Answers `method path` (path without query) with `answer`.
    pub fn on(&self, method: &str, path: &str, answer: Scripted) {
        lock(&self.inner.scripts).insert((method.to_string(), path.to_string(), false), answer);
    }

    /// Answers a `GET path` that carries a `Range` header with `answer` (others as [`on`]).
    pub fn on_range(&self, path: &str, answer: Scripted) {
        lock(&self.inner.scripts).insert(("GET".to_string(), path.to_string(), true), answer);
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner.seen).clone()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        lock(&self.inner.seen).len()
    }

    /// Requests to `path` (any method) that carried a `Range` header.
    pub fn range_requests(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path == path && s.headers.contains_key("range"))
            .count()
    }

    /// Requests to `path` with `method`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count()
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let path = uri.path().to_string();
    let ranged = headers.contains_key("range");
    lock(&inner.seen).push(Seen {
        method: method.to_string(),
        path: path.clone(),
        headers,
    });
    let scripted = {
        let scripts = lock(&inner.scripts);
        let m = method.to_string();
        let by_range = ranged
            .then(|| scripts.get(&(m.clone(), path.clone(), true)))
            .flatten();
        by_range
            .or_else(|| scripts.get(&(m, path.clone(), false)))
            .cloned()
    };
    let answer = match scripted {
        Some(s) => s,
        None if path == "/v2/" => Scripted::new(200)
            .header("Content-Type", "application/json")
            .body("{}"),
        None => Scripted::new(404)
            .header("Content-Type", "application/json")
            .body(r#"{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}"#),
    };
    let mut b = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    let mut has_length = false;
    for (k, v) in &answer.headers {
        has_length |= k.eq_ignore_ascii_case("content-length");
        b = b.header(k.as_str(), v.as_str());
    }
    if !has_length && method != Method::HEAD {
        b = b.header("Content-Length", answer.body.len());
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(answer.body)
    };
    b.body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
