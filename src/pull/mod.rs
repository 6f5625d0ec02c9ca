//! The pull-through policy: what a pull of one repository gets, given the upstream and
//! repository it resolved to and the credential that repository is entitled to.
//!
//! It sits between the HTTP layer and the cache because it needs both and belongs to
//! neither. [`crate::server::handlers`] routes a request, resolves target and credential and
//! turns what this module returns into a response; it holds no rule about what may be
//! served. [`crate::cache`] stores and verifies bytes and knows no upstreams, credentials or
//! HTTP. What joins them lives here, one concern per file:
//! - [`manifest`]: by digest (a cached copy is final once the read rule admits it) and by tag
//!   (trusted for the tag TTL, revalidated with an upstream HEAD, served stale when the
//!   upstream fails); every manifest fetched is verified before it is stored or served;
//! - [`blob`]: hits, single-flight fills through the cache, Range requests answered at once
//!   (from the bucket or the upstream) while a background fill verifies the whole blob, and
//!   the verified refetch when cached bytes came from an upstream this one does not trust;
//! - [`tags`]: tag lists (bounded pagination) and referrers, passed through;
//! - [`cached`]: what of a tag's content is in the cache (for `resolve`).
//!
//! The read rule (may this request read cached bytes?) is here too ([`Puller::linked`],
//! [`Puller::admitted`]): the cache keeps the facts (links under a grant, origins), the
//! policy decides with the request's grant and the upstream's `trust_content_from`.
//!
//! Functions return typed outcomes ([`manifest::Manifest`], [`blob::Blob`], ...) or a
//! [`crate::error::Error`]; status codes and headers are the handler's business.

pub(crate) mod blob;
mod cached;
pub(crate) mod manifest;
pub(crate) mod tags;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, Method};

use crate::cache::{Cache, Grant, Outcome};
use crate::config::Config;
use crate::credentials::chain::Chosen;
use crate::credentials::Credential;
use crate::error::{Error, Subject};
use crate::metrics::Metrics;
use crate::protocol::{Digest, Repository};
use crate::routing::Target;
use crate::upstream::{UpstreamRequest, UpstreamResponse};

pub(crate) use cached::cached_state;

pub(crate) const DOCKER_CONTENT_DIGEST: HeaderName =
    HeaderName::from_static("docker-content-digest");

/// Where an answer came from, for the access log: `hit`, `miss`, `coalesced`, `stale`,
/// `shared` (the bucket), `upstream` (not cacheable / passed through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    Hit,
    Miss,
    Coalesced,
    Stale,
    Shared,
    Upstream,
}

impl Served {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Coalesced => "coalesced",
            Served::Stale => "stale",
            Served::Shared => "shared",
            Served::Upstream => "upstream",
        }
    }
}

impl From<Outcome> for Served {
    fn from(o: Outcome) -> Served {
        match o {
            Outcome::Hit => Served::Hit,
            Outcome::Coalesced => Served::Coalesced,
            Outcome::Miss => Served::Miss,
        }
    }
}

/// One pull's context: the target and credential resolved for it, and what the policy reads
/// (the cache, the config's limits and trust, metrics).
pub(crate) struct Puller<'a> {
    pub cache: &'a Arc<Cache>,
    pub config: &'a Config,
    pub metrics: &'a Arc<Metrics>,
    pub target: Target,
    pub credential: Credential,
    /// The read rule's fingerprint of where `credential` came from ([`grant_of`]).
    pub grant: Grant,
}

impl<'a> Puller<'a> {
    pub(crate) fn new(
        cache: &'a Arc<Cache>,
        config: &'a Config,
        metrics: &'a Arc<Metrics>,
        target: Target,
        chosen: Chosen,
    ) -> Puller<'a> {
        let grant = grant_of(cache, &chosen);
        Puller {
            cache,
            config,
            metrics,
            target,
            credential: chosen.credential,
            grant,
        }
    }

    fn upstream_name(&self) -> &str {
        &self.target.upstream.name
    }

    /// Whether the upstream showed, under this request's grant and within `cache.link_ttl`,
    /// that this repository holds `digest`.
    async fn linked(&self, digest: &Digest) -> bool {
        let ttl = self.config.cache.link_ttl.0;
        let key = self.target.repo_key();
        self.cache.is_linked(&key, digest, self.grant, ttl).await
    }

    /// Whether this upstream's confirmation admits the cached bytes of `digest`: fetched from
    /// it, or from an upstream it lists in `trust_content_from`.
    async fn admitted(&self, digest: &Digest) -> bool {
        let me = self.upstream_name();
        let mut upstreams = vec![me];
        if let Some(u) = self.config.upstreams.iter().find(|u| u.name == me) {
            upstreams.extend(u.trust_content_from.iter().map(String::as_str));
        }
        self.cache.admits(digest, &upstreams).await
    }

    async fn link(&self, digest: &Digest) {
        let key = self.target.repo_key();
        self.cache.link(&key, digest, self.grant).await;
    }

    /// Sends `call` upstream with this pull's repository and credential.
    async fn send(&self, call: Call<'_>) -> Result<UpstreamResponse, Error> {
        let subject = call.subject;
        self.target
            .upstream
            .send(&call.request(&self.target.repository), &self.credential)
            .await
            .map_err(Error::upstream(subject))
    }

    /// Asks the upstream, with this repository's credentials, whether the repository holds an
    /// object the cache has from another repository.
    async fn confirm_in_repository(&self, subject: Subject, digest: &Digest) -> Result<(), Error> {
        let call = match subject {
            Subject::Manifest => Call::head(subject, format!("manifests/{digest}"))
                .accept(crate::protocol::media::UPSTREAM_MANIFEST_ACCEPT),
            _ => Call::head(subject, format!("blobs/{digest}")),
        };
        self.send(call).await.map(drop)
    }
}

/// One upstream request of a pull, built by name instead of by position; the repository and
/// credential are the pull's own.
pub(crate) struct Call<'a> {
    method: Method,
    subject: Subject,
    path: String,
    query: Option<String>,
    accept: Option<&'a str>,
    range: Option<&'a HeaderValue>,
}

impl<'a> Call<'a> {
    /// A GET of `path` (`manifests/<ref>`, `blobs/<digest>`, ...); `subject` names what a
    /// "not found" means.
    pub(crate) fn get(subject: Subject, path: impl Into<String>) -> Call<'a> {
        Call {
            method: Method::GET,
            subject,
            path: path.into(),
            query: None,
            accept: None,
            range: None,
        }
    }

    pub(crate) fn head(subject: Subject, path: impl Into<String>) -> Call<'a> {
        Call {
            method: Method::HEAD,
            ..Call::get(subject, path)
        }
    }

    pub(crate) fn query(self, query: Option<String>) -> Call<'a> {
        Call { query, ..self }
    }

    pub(crate) fn accept(self, accept: &'a str) -> Call<'a> {
        Call {
            accept: Some(accept),
            ..self
        }
    }

    pub(crate) fn range(self, range: &'a HeaderValue) -> Call<'a> {
        Call {
            range: Some(range),
            ..self
        }
    }

    fn request<'r>(&'r self, repository: &'r Repository) -> UpstreamRequest<'r> {
        UpstreamRequest {
            method: self.method.clone(),
            repository,
            path: self.path.clone(),
            query: self.query.clone(),
            accept: self.accept,
            range: self.range,
        }
    }
}

/// The grant of a chosen credential: its source (which module/Secret/docker-config entry, or
/// none) and its identity. The secret parts go only into the cache's keyed hash.
fn grant_of(cache: &Cache, chosen: &Chosen) -> Grant {
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

/// The upstream body as a stream, holding the upstream fetch slot until it ends.
pub(crate) fn upstream_stream(
    resp: UpstreamResponse,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
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

/// A small upstream body, or `None` when it is larger than `limit` bytes (not read further).
async fn read_at_most(
    resp: UpstreamResponse,
    limit: usize,
    upstream: &str,
) -> Result<Option<Bytes>, Error> {
    if resp
        .response
        .content_length()
        .is_some_and(|len| len > limit as u64)
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
        if buf.len() + chunk.len() > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}
