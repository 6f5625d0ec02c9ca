//! The HTTP layer of a pull: routing, the operational endpoints (`/healthz`, `/readyz`,
//! `/metrics`), resolving target and credential, and building responses (headers, bodies,
//! OCI errors).
//!
//! What a pull may be served (the read rule, tag freshness, stale-if-error, fills, Range
//! passthrough, verification) is not decided here but in [`crate::pull`], which returns typed
//! outcomes this module turns into responses; that keeps every policy rule testable without
//! HTTP, and this module free of rules.

use bytes::Bytes;
use http::header::{
    ACCEPT, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LINK,
    RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;

use super::body::{self, Body, RequestRecord};
use super::App;
use crate::error::Error;
use crate::protocol::{media, tags, Digest, OciError, Op, Reference, Route};
use crate::pull::{upstream_stream, Puller, DOCKER_CONTENT_DIGEST};
use crate::routing;
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");
const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// How the cache answered, carried from a handler to the access log in the response's
/// extensions: `hit`, `miss`, `coalesced`, `stale`, `upstream` (not cacheable / passed through).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheStatus(pub &'static str);

fn with_cache_status(mut resp: Response<Body>, status: &'static str) -> Response<Body> {
    resp.extensions_mut().insert(CacheStatus(status));
    resp
}

/// Answers one request; never fails: errors become OCI error responses.
pub(crate) async fn handle(app: &App, req: Request<Incoming>) -> (Response<Body>, RequestRecord) {
    let method = req.method().clone();
    let mut rec = RequestRecord {
        method: method.to_string(),
        route: "other",
        cache: "-",
        ..Default::default()
    };
    let path = req.uri().path().to_owned();
    if let Some(resp) = operational(app, &method, &path) {
        rec.route = "ops";
        rec.status = resp.status().as_u16();
        return (resp, rec);
    }
    let head = method == Method::HEAD;
    let routed = crate::protocol::route(&method, &path, req.uri().query());
    let mut resp = match routed {
        Err(e) => {
            rec.error = Some("bad_request");
            error_response(&e, head)
        }
        Ok(route) => {
            rec.route = route_class(&route.op);
            let result = dispatch(app, req.headers(), &route, &mut rec).await;
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    rec.error = Some(e.metric_label());
                    tracing::debug!(repository = %rec.repository, error = %e, "request failed");
                    error_response(&e.to_oci(), head)
                }
            };
            if let Some(ns) = route
                .ns
                .as_deref()
                .and_then(|ns| HeaderValue::from_str(ns).ok())
            {
                resp.headers_mut().insert(OCI_NAMESPACE, ns);
            }
            resp
        }
    };
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    if let Some(CacheStatus(c)) = resp.extensions().get::<CacheStatus>() {
        rec.cache = c;
    }
    rec.status = resp.status().as_u16();
    (resp, rec)
}

/// `/healthz`, `/readyz`, `/metrics`.
fn operational(app: &App, method: &Method, path: &str) -> Option<Response<Body>> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, ctype)
            .body(body::full(body))
            .ok()
    };
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if (app.ready)() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: catalog not synced\n".into(),
            "text/plain",
        ),
        "/metrics" => text(
            StatusCode::OK,
            app.metrics.render(),
            "text/plain; version=0.0.4",
        ),
        _ => None,
    }
}

fn route_class(op: &Op) -> &'static str {
    match op {
        Op::Ping => "ping",
        Op::Manifest(_) => "manifest",
        Op::Blob(_) => "blob",
        Op::Tags { .. } => "tags",
        Op::Referrers { .. } => "referrers",
    }
}

async fn dispatch(
    app: &App,
    headers: &HeaderMap,
    route: &Route,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, Error> {
    if route.op == Op::Ping {
        return Ok(json_response(
            StatusCode::OK,
            Bytes::from_static(b"{}"),
            route.head,
        ));
    }
    let puller = puller_for(app, &route.name, route.ns.as_deref(), &mut rec.repository).await?;
    let head = route.head;
    match &route.op {
        Op::Ping => unreachable_ping(),
        Op::Manifest(reference) => manifest(&puller, headers, reference, head).await,
        Op::Blob(digest) => {
            let blob = puller.blob(digest, headers.get(RANGE), head).await?;
            Ok(with_cache_status(
                blob_response(
                    digest,
                    blob.status,
                    blob.len,
                    blob.content_range,
                    match blob.body {
                        Some(s) => body::stream(s),
                        None => body::empty(),
                    },
                ),
                blob.served.as_str(),
            ))
        }
        Op::Tags { n, last } => {
            let q = tags::Query {
                n: *n,
                last: last.as_deref(),
                ns: route.ns.as_deref(),
                truncated: false,
            };
            let page = puller.tag_list(&route.name, q).await?;
            let json = serde_json::to_vec(&page.list).unwrap_or_default();
            let mut resp = json_response(StatusCode::OK, Bytes::from(json), head);
            if let Some(link) = page.link.and_then(|l| HeaderValue::from_str(&l).ok()) {
                resp.headers_mut().insert(LINK, link);
            }
            Ok(resp)
        }
        Op::Referrers {
            digest,
            artifact_type,
        } => {
            let resp = puller.referrers(digest, artifact_type.as_deref()).await?;
            Ok(referrers_response(resp, head))
        }
    }
}

/// The one way from a repository name (as a client requests it, with containerd's `ns=`) to a
/// [`Puller`]: routing to a target, then the credential that repository is entitled to (module
/// catalog, docker config, ambient identity, anonymous). Client requests and prewarm both go
/// through here, so they get the same upstream, credential and grant. `repo_key` is set to the
/// target's cache key as soon as routing succeeds (for the access log, even on a later error).
pub(crate) async fn puller_for<'a>(
    app: &'a App,
    name: &str,
    ns: Option<&str>,
    repo_key: &mut String,
) -> Result<Puller<'a>, Error> {
    let target = routing::resolve(&app.upstreams, app.hosts.as_deref(), name, ns)?;
    *repo_key = target.repo_key();
    let chosen = app.choose_credential(&target).await.map_err(|e| {
        if let crate::credentials::chain::ChooseError::Denied(reason) = &e {
            // The only place the catalog's reason is told; the client's body names none of it.
            tracing::warn!(repository = %repo_key, reason = %reason, "credentials denied");
        }
        Error::from(e)
    })?;
    tracing::debug!(repository = %repo_key, credential = chosen.credential.kind(), source = %chosen.source, "credential chosen");
    Ok(Puller::new(
        &app.cache,
        &app.config,
        &app.metrics,
        target,
        chosen,
    ))
}

fn unreachable_ping() -> Result<Response<Body>, Error> {
    Ok(json_response(
        StatusCode::OK,
        Bytes::from_static(b"{}"),
        false,
    ))
}

async fn manifest(
    puller: &Puller<'_>,
    headers: &HeaderMap,
    reference: &Reference,
    head: bool,
) -> Result<Response<Body>, Error> {
    let accept: Vec<&str> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let found = puller.manifest(reference, head).await?;
    check_accept(&accept, &found.media_type)?;
    let body = if head { None } else { found.bytes };
    let len = body.as_ref().map_or(found.len, |b| b.len() as u64);
    let mut resp = manifest_response(&found.digest, &found.media_type, len, body);
    if let Some(w) = found.warning.and_then(|w| HeaderValue::from_str(&w).ok()) {
        resp.headers_mut().insert(http::header::WARNING, w);
    }
    Ok(with_cache_status(resp, found.served.as_str()))
}

fn check_accept(accept: &[&str], media_type: &str) -> Result<(), Error> {
    if media::accepts(accept, media_type) {
        Ok(())
    } else {
        Err(Error::NotAcceptable {
            media_type: media_type.to_owned(),
        })
    }
}

fn manifest_response(
    digest: &Digest,
    media_type: &str,
    len: u64,
    body: Option<Bytes>,
) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_LENGTH, len)
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(ETAG, format!("\"{digest}\""));
    if let Ok(v) = HeaderValue::from_str(media_type) {
        b = b.header(CONTENT_TYPE, v);
    }
    let body = match body {
        Some(bytes) => body::full(bytes),
        None => body::empty(),
    };
    b.body(body).unwrap_or_else(|_| internal_error())
}

fn blob_response(
    digest: &Digest,
    status: StatusCode,
    len: Option<u64>,
    content_range: Option<String>,
    body: Body,
) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(ETAG, format!("\"{digest}\""))
        .header(ACCEPT_RANGES, "bytes")
        .header(CACHE_CONTROL, "max-age=31536000")
        .header(CONTENT_TYPE, "application/octet-stream");
    if let Some(len) = len {
        b = b.header(CONTENT_LENGTH, len);
    }
    if let Some(cr) = content_range {
        b = b.header(CONTENT_RANGE, cr);
    }
    b.body(body).unwrap_or_else(|_| internal_error())
}

/// The upstream's referrers answer, passed through: its status, content headers and body.
fn referrers_response(resp: crate::upstream::UpstreamResponse, head: bool) -> Response<Body> {
    let mut b = Response::builder().status(resp.response.status());
    for h in [CONTENT_TYPE, CONTENT_LENGTH, LINK, OCI_FILTERS_APPLIED] {
        if let Some(v) = resp.response.headers().get(&h) {
            b = b.header(h, v.clone());
        }
    }
    let body = if head {
        body::empty()
    } else {
        body::stream(upstream_stream(resp))
    };
    b.body(body).unwrap_or_else(|_| internal_error())
}

fn json_response(status: StatusCode, json: Bytes, head: bool) -> Response<Body> {
    let len = json.len();
    let body = if head {
        body::empty()
    } else {
        body::full(json)
    };
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_else(|_| internal_error())
}

/// The OCI error body (none for HEAD), with `Retry-After` when known.
pub(crate) fn error_response(e: &OciError, head: bool) -> Response<Body> {
    let mut resp = json_response(e.status(), Bytes::from(e.body()), head);
    if let Some(ra) = &e.retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, ra.clone());
    }
    resp
}

fn internal_error() -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}
