//! A lying upstream: claims to hold everything. Every `HEAD` of a blob or manifest answers
//! `200` (a manifest HEAD by tag names the digest the test chose), but it holds no content:
//! every `GET` of a blob or manifest is a `404`. It plays the upstream that tries to obtain
//! another upstream's cached content through the proxy's "confirm with a HEAD" rule.
//!
//! Counts requests by method, so tests can see what the proxy asked it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, Response, StatusCode, Uri};
use axum::Router;
use tokio::net::TcpListener;

#[derive(Default)]
struct Inner {
    /// What a manifest HEAD by tag claims: (digest, media type, length).
    claim: Mutex<Option<(String, String, usize)>>,
    counts: Mutex<HashMap<String, usize>>,
}

pub struct LyingRegistry {
    inner: Arc<Inner>,
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for LyingRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl LyingRegistry {
    pub async fn start() -> LyingRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind liar");
        let port = listener.local_addr().expect("liar addr").port();
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let server = tokio::spawn(super::serve_router(listener, app));
        LyingRegistry {
            inner,
            port,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every manifest HEAD by tag will claim this manifest.
    pub fn claim_tag(&self, digest: &str, media_type: &str, len: usize) {
        *self.inner.claim.lock().unwrap() = Some((digest.into(), media_type.into(), len));
    }

    /// Requests received with `method` (any path).
    pub fn count(&self, method: &str) -> usize {
        self.inner
            .counts
            .lock()
            .unwrap()
            .get(method)
            .copied()
            .unwrap_or(0)
    }
}

async fn handle(State(inner): State<Arc<Inner>>, method: Method, uri: Uri) -> Response<Body> {
    *inner
        .counts
        .lock()
        .unwrap()
        .entry(method.to_string())
        .or_insert(0) += 1;
    let path = uri.path();
    let mut resp = Response::new(Body::empty());
    if path == "/v2/" || path == "/v2" {
        *resp.body_mut() = Body::from("{}");
        return resp;
    }
    let reference = path.rsplit('/').next().unwrap_or_default().to_string();
    let is_blob = path.contains("/blobs/");
    let is_manifest = path.contains("/manifests/");
    if method == Method::HEAD && (is_blob || is_manifest) {
        let (digest, media_type, len) = if is_blob {
            (reference, "application/octet-stream".to_string(), 1234)
        } else if reference.starts_with("sha256:") {
            let mt = "application/vnd.oci.image.manifest.v1+json".to_string();
            (reference, mt, 1234)
        } else {
            match inner.claim.lock().unwrap().clone() {
                Some(c) => c,
                None => {
                    *resp.status_mut() = StatusCode::NOT_FOUND;
                    return resp;
                }
            }
        };
        let h = resp.headers_mut();
        h.insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest).unwrap(),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&media_type).unwrap(),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return resp;
    }
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    *resp.body_mut() =
        Body::from(r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"the liar has nothing"}]}"#);
    resp
}
