//! One handler per operation. Each resolves the target and credential, then answers from the
//! upstream (and, once it exists, the cache), streaming bodies through.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{
    ACCEPT, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LINK,
    RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;

use super::body::{self, Body, RequestRecord};
use super::App;
use crate::cache::{CacheError, CachedManifest, FetchError, FetchFn, Grant, Outcome, UpstreamBody};
use crate::credentials::chain::Chosen;
use crate::credentials::Credential;
use crate::error::{Error, Subject};
use crate::protocol::range::{self, ByteRange};
use crate::protocol::{media, tags, Digest, OciError, Op, Reference, Route};
use crate::routing::{self, Target};
use crate::upstream::{UpstreamError, UpstreamRequest, UpstreamResponse};

/// Largest manifest accepted from an upstream (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");
const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// How the cache answered, carried from a handler to the access log in the response's
/// extensions: `hit`, `miss`, `coalesced`, `stale`, `upstream` (not cacheable / passed through).
#[derive(Clone, Copy, Debug)]
pub struct CacheStatus(pub &'static str);

fn with_cache_status(mut resp: Response<Body>, status: &'static str) -> Response<Body> {
    resp.extensions_mut().insert(CacheStatus(status));
    resp
}

/// Answers one request; never fails: errors become OCI error responses.
pub async fn handle(app: &App, req: Request<Incoming>) -> (Response<Body>, RequestRecord) {
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

/// The per-request context once target and credential are known.
struct Ctx<'a> {
    app: &'a App,
    headers: &'a HeaderMap,
    target: Target,
    credential: Credential,
    /// The read rule's fingerprint of where `credential` came from ([`grant_of`]).
    grant: Grant,
    head: bool,
}

impl Ctx<'_> {
    /// Whether the upstream showed, under this request's grant and within `cache.link_ttl`,
    /// that this repository holds `digest`.
    async fn linked(&self, digest: &Digest) -> bool {
        let ttl = self.app.config.cache.link_ttl.0;
        let key = self.target.repo_key();
        self.app
            .cache
            .is_linked(&key, digest, self.grant, ttl)
            .await
    }

    /// Whether this upstream's confirmation admits the cached bytes of `digest`: fetched from
    /// it, or from an upstream it lists in `trust_content_from`.
    async fn admitted(&self, digest: &Digest) -> bool {
        let me = self.target.upstream.name.as_str();
        let mut upstreams = vec![me];
        if let Some(u) = self.app.config.upstreams.iter().find(|u| u.name == me) {
            upstreams.extend(u.trust_content_from.iter().map(String::as_str));
        }
        self.app.cache.admits(digest, &upstreams).await
    }

    async fn link(&self, digest: &Digest) {
        let key = self.target.repo_key();
        self.app.cache.link(&key, digest, self.grant).await;
    }

    async fn send(
        &self,
        method: Method,
        path: String,
        query: Option<String>,
        accept: Option<&str>,
        range: Option<&HeaderValue>,
        subject: Subject,
    ) -> Result<UpstreamResponse, Error> {
        let req = UpstreamRequest {
            method,
            repository: &self.target.repository,
            path,
            query,
            accept,
            range,
        };
        self.target
            .upstream
            .send(&req, &self.credential)
            .await
            .map_err(Error::upstream(subject))
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
    let target = routing::resolve(
        &app.upstreams,
        app.hosts.as_deref(),
        &route.name,
        route.ns.as_deref(),
    )?;
    rec.repository = target.repo_key();
    let chosen = app
        .credentials
        .choose(
            &target.upstream.name,
            &target.upstream.endpoint_host(),
            target.repository.as_str(),
        )
        .await
        .map_err(|e| {
            if let crate::credentials::chain::ChooseError::Denied(reason) = &e {
                // The only place the catalog's reason is told; the client's body names none of it.
                tracing::warn!(repository = %rec.repository, reason = %reason, "credentials denied");
            }
            Error::from(e)
        })?;
    tracing::debug!(repository = %rec.repository, credential = chosen.credential.kind(), source = %chosen.source, "credential chosen");
    let grant = grant_of(&app.cache, &chosen);
    let ctx = Ctx {
        app,
        headers,
        target,
        credential: chosen.credential,
        grant,
        head: route.head,
    };
    match &route.op {
        Op::Ping => unreachable_ping(),
        Op::Manifest(reference) => manifest(&ctx, reference).await,
        Op::Blob(digest) => blob(&ctx, digest).await,
        Op::Tags { n, last } => {
            let q = tags::Query {
                n: *n,
                last: last.as_deref(),
                ns: route.ns.as_deref(),
                truncated: false,
            };
            tag_list(&ctx, &route.name, q).await
        }
        Op::Referrers {
            digest,
            artifact_type,
        } => referrers(&ctx, digest, artifact_type.as_deref()).await,
    }
}

/// The grant of a chosen credential: its source (which module/Secret/docker-config entry, or
/// none) and its identity. The secret parts go only into the cache's keyed hash.
fn grant_of(cache: &crate::cache::Cache, chosen: &Chosen) -> Grant {
    let (user, secret): (&str, &str) = match &chosen.credential {
        Credential::Anonymous => ("", ""),
        Credential::Basic { username, password } => (username, password.expose()),
        Credential::IdentityToken(t) | Credential::RegistryToken(t) => ("", t.expose()),
    };
    cache.grant(&[
        chosen.source.as_bytes(),
        chosen.credential.kind().as_bytes(),
        user.as_bytes(),
        secret.as_bytes(),
    ])
}

fn unreachable_ping() -> Result<Response<Body>, Error> {
    Ok(json_response(
        StatusCode::OK,
        Bytes::from_static(b"{}"),
        false,
    ))
}

/// A manifest as fetched from upstream, verified.
struct Manifest {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

async fn manifest(ctx: &Ctx<'_>, reference: &Reference) -> Result<Response<Body>, Error> {
    let accept: Vec<&str> = ctx
        .headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let found = match reference {
        Reference::Digest(d) => manifest_by_digest(ctx, d).await?,
        Reference::Tag(t) => manifest_by_tag(ctx, t).await?,
    };
    check_accept(&accept, &found.media_type)?;
    let mut resp = if ctx.head {
        manifest_response(&found.digest, &found.media_type, found.len, None)
    } else {
        let bytes = match found.bytes {
            Some(b) => b,
            None => {
                fetch_and_store(ctx, &Reference::Digest(found.digest.clone()))
                    .await?
                    .bytes
            }
        };
        manifest_response(
            &found.digest,
            &found.media_type,
            bytes.len() as u64,
            Some(bytes),
        )
    };
    if let Some(w) = found.warning.and_then(|w| HeaderValue::from_str(&w).ok()) {
        resp.headers_mut().insert(http::header::WARNING, w);
    }
    Ok(with_cache_status(resp, found.cache))
}

/// A manifest as the handler serves it; `bytes` is `None` only for a HEAD answered from an
/// upstream HEAD.
struct Found {
    cache: &'static str,
    digest: Digest,
    media_type: String,
    len: u64,
    bytes: Option<Bytes>,
    warning: Option<String>,
}

impl Found {
    /// A manifest served from the cache.
    fn cached(digest: Digest, m: CachedManifest, cache: &'static str) -> Found {
        Found {
            cache,
            len: m.bytes.len() as u64,
            digest,
            media_type: m.media_type,
            bytes: Some(m.bytes),
            warning: None,
        }
    }
}

impl From<Manifest> for Found {
    fn from(m: Manifest) -> Found {
        Found {
            cache: "miss",
            len: m.bytes.len() as u64,
            digest: m.digest,
            media_type: m.media_type,
            bytes: Some(m.bytes),
            warning: None,
        }
    }
}

/// By digest: immutable, so a cached copy is final once this repository is linked to it
/// (under this request's grant, within `cache.link_ttl`) and its bytes came from this
/// upstream (or one it trusts); bytes from elsewhere are fetched again from this upstream.
async fn manifest_by_digest(ctx: &Ctx<'_>, digest: &Digest) -> Result<Found, Error> {
    let cache = &ctx.app.cache;
    if let Some(m) = cache.manifest(digest).await {
        if ctx.admitted(digest).await {
            if !ctx.linked(digest).await {
                confirm_in_repository(ctx, &format!("manifests/{digest}"), Subject::Manifest)
                    .await?;
                ctx.link(digest).await;
            }
            return Ok(Found::cached(digest.clone(), m, "hit"));
        }
    }
    Ok(fetch_and_store(ctx, &Reference::Digest(digest.clone()))
        .await?
        .into())
}

/// By tag: trusted for the upstream's tag TTL, then revalidated with an upstream HEAD; served
/// stale (with a `Warning`) when the upstream is unreachable, failing or rate limiting.
async fn manifest_by_tag(ctx: &Ctx<'_>, tag: &crate::protocol::Tag) -> Result<Found, Error> {
    let reference = Reference::Tag(tag.clone());
    let tag = tag.as_str();
    let cache = &ctx.app.cache;
    let key = ctx.target.repo_key();
    let ttl = ctx.target.upstream.tag_ttl;
    let link_ttl = ctx.app.config.cache.link_ttl.0;
    // A cached tag counts only as checked under this request's grant (see the read rule).
    let entry = cache
        .tag(&key, tag, ttl)
        .await
        .filter(|e| e.grant == Some(ctx.grant));
    if let Some(e) = &entry {
        let age = e.checked_at.elapsed().unwrap_or_default();
        if age < ttl && age < link_ttl && ctx.admitted(&e.digest).await {
            if let Some(m) = cache.manifest(&e.digest).await {
                return Ok(Found::cached(e.digest.clone(), m, "hit"));
            }
        }
    }
    match head_manifest(ctx, &reference).await {
        Ok(Some((digest, media_type, len))) => {
            cache.put_tag(&key, tag, &digest, ctx.grant).await;
            if let Some(m) = cache.manifest(&digest).await {
                if ctx.admitted(&digest).await {
                    ctx.link(&digest).await;
                    return Ok(Found::cached(digest, m, "hit"));
                }
            }
            if ctx.head {
                return Ok(Found {
                    cache: "upstream",
                    digest,
                    media_type,
                    len,
                    bytes: None,
                    warning: None,
                });
            }
            Ok(fetch_and_store(ctx, &Reference::Digest(digest))
                .await?
                .into())
        }
        Ok(None) => {
            let m = fetch_and_store(ctx, &reference).await?;
            cache.put_tag(&key, tag, &m.digest, ctx.grant).await;
            Ok(m.into())
        }
        Err(Error::Upstream { source, subject }) => {
            if matches!(source, crate::upstream::UpstreamError::NotFound { .. }) {
                cache.remove_tag(&key, tag, ctx.grant).await;
            } else if source.is_transient() {
                // Stale only under the same grant and within `cache.link_ttl`.
                let usable = match &entry {
                    Some(e) => {
                        e.checked_at.elapsed().unwrap_or_default() < link_ttl
                            && ctx.admitted(&e.digest).await
                    }
                    None => false,
                };
                if let Some(e) = entry.as_ref().filter(|_| usable) {
                    if let Some(m) = cache.manifest(&e.digest).await {
                        tracing::warn!(repository = %key, tag, error = %source, "serving a cached tag: upstream failed");
                        let mut found = Found::cached(e.digest.clone(), m, "stale");
                        found.warning = Some(format!(
                            "299 - \"stale: upstream {} failed ({}); serving the cached tag\"",
                            ctx.target.upstream.name,
                            source.metric_label()
                        ));
                        return Ok(found);
                    }
                }
            }
            Err(Error::Upstream { source, subject })
        }
        Err(e) => Err(e),
    }
}

/// GETs a manifest upstream (verified), stores it, records this upstream as an origin of its
/// bytes and links this repository to it.
async fn fetch_and_store(ctx: &Ctx<'_>, reference: &Reference) -> Result<Manifest, Error> {
    let m = fetch_manifest(ctx, reference).await?;
    let cache = &ctx.app.cache;
    if let Err(e) = cache
        .put_manifest(&m.digest, &m.media_type, m.bytes.clone())
        .await
    {
        tracing::warn!(digest = %m.digest, error = %e, "manifest not cached");
    } else {
        cache.add_origin(&m.digest, &ctx.target.upstream.name);
        ctx.link(&m.digest).await;
    }
    Ok(m)
}

/// Asks the upstream, with this repository's credentials, whether the repository holds an
/// object the cache has from another repository.
async fn confirm_in_repository(ctx: &Ctx<'_>, path: &str, subject: Subject) -> Result<(), Error> {
    let accept = (subject == Subject::Manifest).then_some(media::UPSTREAM_MANIFEST_ACCEPT);
    ctx.send(Method::HEAD, path.to_owned(), None, accept, None, subject)
        .await
        .map(drop)
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

/// An upstream HEAD; `None` when the upstream's answer lacks the digest, type or length
/// (the caller then GETs and computes them).
async fn head_manifest(
    ctx: &Ctx<'_>,
    reference: &Reference,
) -> Result<Option<(Digest, String, u64)>, Error> {
    let resp = ctx
        .send(
            Method::HEAD,
            format!("manifests/{reference}"),
            None,
            Some(media::UPSTREAM_MANIFEST_ACCEPT),
            None,
            Subject::Manifest,
        )
        .await?;
    let h = resp.response.headers();
    let digest = h
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let media_type = content_type(h);
    let len = h
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    Ok(match (digest, media_type, len) {
        (Some(d), Some(t), Some(l)) => {
            if let Reference::Digest(want) = reference {
                if &d != want {
                    return Ok(None);
                }
            }
            Some((d, t, l))
        }
        _ => None,
    })
}

async fn fetch_manifest(ctx: &Ctx<'_>, reference: &Reference) -> Result<Manifest, Error> {
    let resp = ctx
        .send(
            Method::GET,
            format!("manifests/{reference}"),
            None,
            Some(media::UPSTREAM_MANIFEST_ACCEPT),
            None,
            Subject::Manifest,
        )
        .await?;
    let header_type = content_type(resp.response.headers());
    let claimed = resp.response.headers().get(DOCKER_CONTENT_DIGEST).cloned();
    let upstream = &ctx.target.upstream.name;
    let bytes = read_limited(resp, MAX_MANIFEST_SIZE, upstream).await?;
    // The upstream's own claim must hold too: a body that does not hash to the
    // Docker-Content-Digest it came with is refused (and not cached), by tag as by digest.
    if let Some(claimed) = claimed {
        let claimed = claimed
            .to_str()
            .ok()
            .and_then(|v| Digest::parse(v.trim()).ok())
            .ok_or_else(|| Error::BadUpstreamResponse {
                upstream: upstream.clone(),
                message: "manifest with an unparseable Docker-Content-Digest".into(),
            })?;
        if !claimed.verify(&bytes) {
            return Err(Error::DigestMismatch {
                upstream: upstream.clone(),
                digest: claimed.to_string(),
            });
        }
    }
    let digest = match reference {
        Reference::Digest(want) => {
            if !want.verify(&bytes) {
                return Err(Error::DigestMismatch {
                    upstream: upstream.clone(),
                    digest: want.to_string(),
                });
            }
            want.clone()
        }
        Reference::Tag(_) => Digest::sha256_of(&bytes),
    };
    let media_type = header_type
        .filter(|t| media::is_manifest_type(t))
        .or_else(|| media::manifest_media_type(&bytes))
        .ok_or_else(|| Error::BadUpstreamResponse {
            upstream: upstream.clone(),
            message: "manifest without a media type".into(),
        })?;
    Ok(Manifest {
        digest,
        media_type,
        bytes,
    })
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

async fn blob(ctx: &Ctx<'_>, digest: &Digest) -> Result<Response<Body>, Error> {
    let cache = &ctx.app.cache;
    let origin = ctx.target.upstream.name.as_str();
    let admitted = ctx.admitted(digest).await;
    let readable = admitted && ctx.linked(digest).await;
    let cached_size = cache.blob_size(digest);
    if ctx.head {
        // Known to this repository: the size from the local tier, else from the bucket.
        let known = match cached_size {
            Some(size) if readable => Some((size, "hit")),
            None if readable => cache.shared_blob_size(digest).await.map(|s| (s, "shared")),
            _ => None,
        };
        return match known {
            Some((size, status)) => Ok(with_cache_status(
                blob_response(digest, StatusCode::OK, Some(size), None, body::empty()),
                status,
            )),
            // Cold or not yet linked: an upstream HEAD only, never a download.
            None => {
                let resp = blob_upstream_head(ctx, digest).await?;
                if cached_size.is_some() && resp.status().is_success() {
                    ctx.link(digest).await;
                }
                Ok(with_cache_status(resp, "upstream"))
            }
        };
    }
    if cached_size.is_some() && !admitted {
        // Cached bytes from another upstream: this upstream's word does not admit them.
        return blob_from_upstream_verified(ctx, digest).await;
    }
    // Confirmed upstream by this request: not asked again below, however short link_ttl is.
    let mut confirmed = false;
    if cached_size.is_some() && !readable {
        confirm_in_repository(ctx, &format!("blobs/{digest}"), Subject::Blob).await?;
        ctx.link(digest).await;
        confirmed = true;
    }
    if cached_size.is_none() {
        if let Some(range) = ctx.headers.get(RANGE) {
            // A range of a blob not cached locally: the client gets its range at once, from
            // the bucket (a ranged GET) when this repository may read the blob there, else
            // from the upstream (a fill's bytes are released only once the whole blob is
            // verified), while a background fill lands the whole blob in the cache once.
            let (cache_owned, fetch, digest_owned) =
                (cache.clone(), blob_fetch(ctx, digest), digest.clone());
            let origin_owned = origin.to_owned();
            tokio::spawn(async move {
                let res = cache_owned
                    .blob_from(&digest_owned, Some(&origin_owned), fetch)
                    .await;
                if let Err(e) = res {
                    tracing::debug!(digest = %digest_owned, error = %e, "background fill for a range request failed");
                }
            });
            // Only one well-formed range goes upstream, and only an exact answer to it comes
            // back; anything else (no usable range, a 200, another range) is served below
            // from the verified fill.
            if let Some(spec) = range::parse_range_unknown_size(range.to_str().ok()) {
                if readable {
                    if let Some(resp) = shared_range(cache, digest, range).await {
                        return Ok(with_cache_status(resp, "shared"));
                    }
                }
                if let Some(resp) = upstream_range(ctx, digest, spec).await? {
                    return Ok(with_cache_status(resp, "upstream"));
                }
            }
        }
    }
    let reader = cache
        .blob_from(digest, Some(origin), blob_fetch(ctx, digest))
        .await
        .map_err(|e| cache_error(e, &ctx.target.upstream.name))?;
    match reader.outcome() {
        // The fetch through this repository succeeded: it holds the blob.
        Outcome::Miss => ctx.link(digest).await,
        // Checked again here, not with the values from before: another repository's fill
        // (maybe from another upstream, or from the bucket) may have committed in between.
        Outcome::Coalesced | Outcome::Hit => {
            if !ctx.admitted(digest).await {
                drop(reader);
                return blob_from_upstream_verified(ctx, digest).await;
            }
            if !confirmed && !ctx.linked(digest).await {
                confirm_in_repository(ctx, &format!("blobs/{digest}"), Subject::Blob).await?;
                ctx.link(digest).await;
            }
        }
    }
    let outcome = reader.outcome().as_str();
    let range_header = ctx.headers.get(RANGE).and_then(|v| v.to_str().ok());
    let Some(size) = reader.size() else {
        // Unknown length (no Content-Length upstream): the whole body, chunked.
        let body = body::stream(reader.into_stream(None));
        return Ok(with_cache_status(
            blob_response(digest, StatusCode::OK, None, None, body),
            outcome,
        ));
    };
    let resp = match range::parse_range(range_header, size) {
        ByteRange::Full => blob_response(
            digest,
            StatusCode::OK,
            Some(size),
            None,
            body::stream(reader.into_stream(None)),
        ),
        ByteRange::Partial { start, end } => blob_response(
            digest,
            StatusCode::PARTIAL_CONTENT,
            Some(end - start + 1),
            Some(range::content_range(start, end, size)),
            body::stream(reader.into_stream(Some((start, end)))),
        ),
        ByteRange::Unsatisfiable => blob_response(
            digest,
            StatusCode::RANGE_NOT_SATISFIABLE,
            None,
            Some(range::unsatisfied_content_range(size)),
            body::empty(),
        ),
    };
    Ok(with_cache_status(resp, outcome))
}

/// A blob whose cached bytes came from another upstream: fetched again from this one, the
/// whole blob (a `Range` is ignored, as HTTP allows), hashed as it streams. A mismatch ends
/// the body with an error, never cleanly; a match records this upstream as an origin and
/// links the repository, so the next request is a cache hit.
async fn blob_from_upstream_verified(
    ctx: &Ctx<'_>,
    digest: &Digest,
) -> Result<Response<Body>, Error> {
    let resp = ctx
        .send(
            Method::GET,
            format!("blobs/{digest}"),
            None,
            None,
            None,
            Subject::Blob,
        )
        .await?;
    if resp.response.status() != StatusCode::OK {
        return Err(Error::BadUpstreamResponse {
            upstream: ctx.target.upstream.name.clone(),
            message: format!("unexpected status {}", resp.response.status()),
        });
    }
    let len = resp.response.content_length();
    let (cache, upstream, key, grant) = (
        ctx.app.cache.clone(),
        ctx.target.upstream.name.clone(),
        ctx.target.repo_key(),
        ctx.grant,
    );
    let d = digest.clone();
    let stream = crate::cache::verify_stream(
        digest.clone(),
        upstream_stream(resp),
        Box::new(move || {
            cache.add_origin(&d, &upstream);
            tokio::spawn(async move { cache.link(&key, &d, grant).await });
        }),
    );
    let resp = blob_response(digest, StatusCode::OK, len, None, body::stream(stream));
    Ok(with_cache_status(resp, "upstream"))
}

/// A Range request answered from the shared tier: `None` when the bucket cannot serve it (or
/// the header asks for no valid range: the caller passes it upstream as it is).
async fn shared_range(
    cache: &crate::cache::Cache,
    digest: &Digest,
    range: &HeaderValue,
) -> Option<Response<Body>> {
    let size = cache.shared_blob_size(digest).await?;
    match range::parse_range(range.to_str().ok(), size) {
        ByteRange::Full => None,
        ByteRange::Partial { start, end } => {
            let body = cache.shared_blob_range(digest, start, end).await?;
            Some(blob_response(
                digest,
                StatusCode::PARTIAL_CONTENT,
                Some(end - start + 1),
                Some(range::content_range(start, end, size)),
                body::stream(body),
            ))
        }
        ByteRange::Unsatisfiable => Some(blob_response(
            digest,
            StatusCode::RANGE_NOT_SATISFIABLE,
            None,
            Some(range::unsatisfied_content_range(size)),
            body::empty(),
        )),
    }
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

/// The fetch the cache runs on a miss: a full upstream GET with this request's credential,
/// detached from the client (it owns everything it needs).
fn blob_fetch(ctx: &Ctx<'_>, digest: &Digest) -> FetchFn {
    let upstream = ctx.target.upstream.clone();
    let repository = ctx.target.repository.clone();
    let credential = ctx.credential.clone();
    let grant = ctx.grant;
    let path = format!("blobs/{digest}");
    let (cache, key, digest) = (ctx.app.cache.clone(), ctx.target.repo_key(), digest.clone());
    let l = &ctx.app.config.limits;
    let limits = crate::cache::FillLimits {
        deadline: l.fill_deadline.0,
        min_rate: l.fill_min_rate.0,
        window: l.fill_rate_window.0,
        max_size: l.max_blob_size.map(|m| m.0),
    };
    let metrics = ctx.app.metrics.clone();
    Box::new(move || {
        Box::pin(async move {
            let req = UpstreamRequest {
                method: Method::GET,
                repository: &repository,
                path,
                query: None,
                accept: None,
                range: None,
            };
            match upstream.send(&req, &credential).await {
                Ok(resp) if resp.response.status() == StatusCode::OK => {
                    let size = resp.response.content_length();
                    if let Some(max) = limits.max_size.filter(|max| size.is_some_and(|s| s > *max))
                    {
                        // Refused before reading the body (dropping it closes the connection).
                        metrics
                            .limit_hit(crate::metrics::Limit::MaxBlobSize, upstream.name.as_str());
                        return Err(FetchError::new(
                            413,
                            format!(
                                "blob is {} bytes, more than limits.max_blob_size ({max} bytes)",
                                size.unwrap_or_default()
                            ),
                        ));
                    }
                    // The upstream just showed this repository holds the blob: link it now, so
                    // requests of the same repository that join this fill need no HEAD.
                    cache.link(&key, &digest, grant).await;
                    Ok(UpstreamBody {
                        size,
                        stream: crate::cache::enforce_fill_limits(upstream_stream(resp), limits),
                    })
                }
                Ok(resp) => Err(FetchError::new(
                    502,
                    format!("unexpected status {}", resp.response.status()),
                )),
                Err(e) => {
                    let retry_after = match &e {
                        UpstreamError::TooManyRequests { retry_after, .. } => retry_after
                            .as_ref()
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                        UpstreamError::Busy { busy, .. } => Some(busy.retry_after.to_string()),
                        _ => None,
                    };
                    Err(FetchError::new(upstream_error_status(&e), e.to_string())
                        .with_retry_after(retry_after))
                }
            }
        })
    })
}

/// The HTTP-ish status the cache carries for an upstream failure, mapped back by
/// [`cache_error`].
fn upstream_error_status(e: &UpstreamError) -> u16 {
    match e {
        UpstreamError::NotFound { .. } => 404,
        UpstreamError::Unauthorized { .. } => 401,
        UpstreamError::Token { source, .. } if source.is_auth_failure() => 401,
        UpstreamError::Denied { .. } => 403,
        UpstreamError::TooManyRequests { .. } => 429,
        UpstreamError::Busy { .. } => 503,
        UpstreamError::Status { status, .. } => status.as_u16(),
        _ => 502,
    }
}

fn cache_error(e: CacheError, upstream: &str) -> Error {
    let upstream = upstream.to_owned();
    match e {
        // `limits.max_blob_size`: the proxy refuses, not the upstream.
        CacheError::Fetch(f) if f.status() == 413 => Error::BlobTooLarge(f.message().to_owned()),
        CacheError::Fetch(f) => {
            let source = match f.status() {
                404 => UpstreamError::NotFound { upstream },
                401 => UpstreamError::Unauthorized { upstream },
                403 => UpstreamError::Denied { upstream },
                429 => UpstreamError::TooManyRequests {
                    upstream,
                    retry_after: f.retry_after().and_then(|v| HeaderValue::from_str(v).ok()),
                },
                // Only a slot wait carries a Retry-After with a 503 (see `blob_fetch`).
                503 if f.retry_after().is_some() => UpstreamError::Busy {
                    upstream,
                    busy: crate::upstream::slots::Busy {
                        pool: crate::upstream::slots::Pool::Blobs,
                        retry_after: f.retry_after().and_then(|v| v.parse().ok()).unwrap_or(1),
                    },
                },
                s if s != 502 => UpstreamError::Status {
                    upstream,
                    status: StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
                },
                _ => UpstreamError::Unreachable {
                    upstream,
                    message: f.message().to_owned(),
                },
            };
            Error::Upstream {
                subject: Subject::Blob,
                source,
            }
        }
        other => Error::Cache(other),
    }
}

/// A HEAD of a cold blob, answered by an upstream HEAD (no body, so nothing to verify).
async fn blob_upstream_head(ctx: &Ctx<'_>, digest: &Digest) -> Result<Response<Body>, Error> {
    let resp = ctx
        .send(
            Method::HEAD,
            format!("blobs/{digest}"),
            None,
            None,
            None,
            Subject::Blob,
        )
        .await?;
    // The header, not content_length(): for a HEAD reqwest reports the (empty) body's length.
    let len = resp
        .response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok(blob_response(
        digest,
        StatusCode::OK,
        len,
        None,
        body::empty(),
    ))
}

/// A range of a cold blob straight from the upstream, while the background fill verifies the
/// whole blob. Passed through only when the upstream answers `206` with a `Content-Range` that
/// is exactly `spec` resolved against the size it states, and a matching `Content-Length`;
/// `None` otherwise (the caller serves the range from the verified fill instead).
async fn upstream_range(
    ctx: &Ctx<'_>,
    digest: &Digest,
    spec: range::RangeSpec,
) -> Result<Option<Response<Body>>, Error> {
    let Ok(header) = HeaderValue::from_str(&spec.to_string()) else {
        return Ok(None);
    };
    let resp = ctx
        .send(
            Method::GET,
            format!("blobs/{digest}"),
            None,
            None,
            Some(&header),
            Subject::Blob,
        )
        .await?;
    let h = resp.response.headers();
    let status = resp.response.status();
    let content_range = h
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(range::parse_content_range);
    let len = h
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match content_range {
        Some((start, end, size))
            if status == StatusCode::PARTIAL_CONTENT
                && spec.resolve(size) == (ByteRange::Partial { start, end })
                && len == Some(end - start + 1) =>
        {
            Ok(Some(blob_response(
                digest,
                StatusCode::PARTIAL_CONTENT,
                len,
                Some(range::content_range(start, end, size)),
                body::stream(upstream_stream(resp)),
            )))
        }
        _ => {
            tracing::warn!(upstream = %ctx.target.upstream.name, %digest, range = %spec,
                status = status.as_u16(), "upstream did not answer the range asked; serving it from the verified blob");
            Ok(None)
        }
    }
}

/// The upstream body as a stream, holding the upstream fetch slot until it ends.
pub fn upstream_stream(
    resp: UpstreamResponse,
) -> futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>> {
    let UpstreamResponse { response, permit } = resp;
    let permit = Arc::new(permit);
    response
        .bytes_stream()
        .map(move |r| {
            let _slot = &permit;
            r.map_err(std::io::Error::other)
        })
        .boxed()
}

/// Lists tags: upstream pages, at most `limits.max_tag_pages` of them and
/// `limits.max_tag_list_size` bytes in all, the client's `n` and `last` passed along; stops as
/// soon as it has more than `n` tags. A list cut by a limit is logged and counted, and its
/// page links on after its last tag (see [`tags::page`]).
async fn tag_list(
    ctx: &Ctx<'_>,
    name: &str,
    mut q: tags::Query<'_>,
) -> Result<Response<Body>, Error> {
    let upstream = &ctx.target.upstream.name;
    let limits = &ctx.app.config.limits;
    let mut budget = usize::try_from(limits.max_tag_list_size.0).unwrap_or(usize::MAX);
    let mut all = Vec::new();
    let mut query = {
        let mut first = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = q.n {
            first.append_pair("n", &n.to_string());
        }
        if let Some(last) = q.last {
            first.append_pair("last", last);
        }
        Some(first.finish()).filter(|s| !s.is_empty())
    };
    for page in 1.. {
        let resp = ctx
            .send(
                Method::GET,
                "tags/list".into(),
                query.clone(),
                None,
                None,
                Subject::Tags,
            )
            .await?;
        let next = resp
            .response
            .headers()
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link_query)
            .filter(|next| Some(next) != query.as_ref());
        let Some(bytes) = read_tag_page(resp, budget, upstream).await? else {
            if page == 1 {
                return Err(Error::BadUpstreamResponse {
                    upstream: upstream.clone(),
                    message: format!(
                        "tag list page larger than limits.max_tag_list_size ({})",
                        limits.max_tag_list_size
                    ),
                });
            }
            q.truncated = true;
            break;
        };
        budget -= bytes.len();
        let page_tags: tags::TagList =
            serde_json::from_slice(&bytes).map_err(|e| Error::BadUpstreamResponse {
                upstream: upstream.clone(),
                message: format!("invalid tag list: {e}"),
            })?;
        drop(bytes);
        all.extend(page_tags.tags);
        let Some(next) = next else { break };
        let wanted = q.n.is_some_and(|n| {
            all.iter()
                .filter(|t| q.last.is_none_or(|last| t.as_str() > last))
                .count()
                > n
        });
        if wanted {
            break;
        }
        if page >= limits.max_tag_pages {
            q.truncated = true;
            break;
        }
        query = Some(next);
    }
    if q.truncated {
        let detail = format!(
            "{upstream}/{}: {} tags read",
            ctx.target.repository,
            all.len()
        );
        ctx.app
            .metrics
            .limit_hit(crate::metrics::Limit::TagList, &detail);
    }
    let (page, link) = tags::page(name, all, &q);
    let json = serde_json::to_vec(&page).unwrap_or_default();
    let mut resp = json_response(StatusCode::OK, Bytes::from(json), ctx.head);
    if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(LINK, link);
    }
    Ok(resp)
}

/// One upstream tag list page, or `None` when it is larger than `budget` bytes (not read
/// further).
async fn read_tag_page(
    resp: UpstreamResponse,
    budget: usize,
    upstream: &str,
) -> Result<Option<Bytes>, Error> {
    if resp
        .response
        .content_length()
        .is_some_and(|len| len > budget as u64)
    {
        return Ok(None);
    }
    let mut stream = resp.response.bytes_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::BadUpstreamResponse {
            upstream: upstream.to_owned(),
            message: format!("body interrupted: {}", e.without_url()),
        })?;
        if buf.len() + chunk.len() > budget {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

/// The query of a `Link: <...?last=x&n=y>; rel="next"` header.
fn next_link_query(link: &str) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = link[start..].find('>')? + start;
    if !link[end..].contains("next") {
        return None;
    }
    let target = &link[start..end];
    target.split_once('?').map(|(_, q)| q.to_owned())
}

async fn referrers(
    ctx: &Ctx<'_>,
    digest: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response<Body>, Error> {
    let query = artifact_type.map(|t| {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("artifactType", t)
            .finish()
    });
    let resp = ctx
        .send(
            Method::GET,
            format!("referrers/{digest}"),
            query,
            None,
            None,
            Subject::Referrers,
        )
        .await?;
    let mut b = Response::builder().status(resp.response.status());
    for h in [CONTENT_TYPE, CONTENT_LENGTH, LINK, OCI_FILTERS_APPLIED] {
        if let Some(v) = resp.response.headers().get(&h) {
            b = b.header(h, v.clone());
        }
    }
    let body = if ctx.head {
        body::empty()
    } else {
        body::stream(upstream_stream(resp))
    };
    Ok(b.body(body).unwrap_or_else(|_| internal_error()))
}

/// Reads a small upstream body, refusing more than `limit` bytes.
async fn read_limited(
    resp: UpstreamResponse,
    limit: usize,
    upstream: &str,
) -> Result<Bytes, Error> {
    if let Some(len) = resp.response.content_length() {
        if len > limit as u64 {
            return Err(Error::ManifestTooLarge {
                upstream: upstream.to_owned(),
                limit,
            });
        }
    }
    let mut stream = resp.response.bytes_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::BadUpstreamResponse {
            upstream: upstream.to_owned(),
            message: format!("body interrupted: {}", e.without_url()),
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(Error::ManifestTooLarge {
                upstream: upstream.to_owned(),
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The media type of a Content-Type header, parameters dropped.
fn content_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_owned())
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
pub fn error_response(e: &OciError, head: bool) -> Response<Body> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_query() {
        assert_eq!(
            next_link_query("</v2/a/tags/list?last=b&n=2>; rel=\"next\"").as_deref(),
            Some("last=b&n=2")
        );
        assert_eq!(
            next_link_query("</v2/a/tags/list?last=b>; rel=\"prev\""),
            None
        );
        assert_eq!(next_link_query("garbage"), None);
    }
}
