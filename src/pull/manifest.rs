//! Manifests: by digest and by tag, each fetched one verified before it is stored or served.
//!
//! By digest a manifest is immutable, so a cached copy is final once the read rule admits it
//! for this repository. By tag the answer changes upstream: a tag is trusted without asking
//! for the upstream's `tag_ttl` (and never longer than `cache.link_ttl`, the read rule's
//! horizon), then revalidated with an upstream HEAD; when the upstream is unreachable, failing
//! or rate limiting, the cached tag is served stale with a `Warning`. How old a tag check is
//! (and that a check time in the future counts as stale) is [`TagEntry::checked_within`]'s
//! rule, the same the cache applies.
//!
//! [`TagEntry::checked_within`]: crate::cache::TagEntry::checked_within

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;

use super::{read_at_most, Call, Puller, Served, DOCKER_CONTENT_DIGEST};
use crate::cache::CachedManifest;
use crate::error::{Error, Subject};
use crate::protocol::{media, Digest, Reference, Tag};
use crate::upstream::{UpstreamError, UpstreamResponse};

/// Largest manifest accepted from an upstream: the cache's bound (distribution's own is 4 MiB).
pub(crate) use crate::cache::MAX_MANIFEST_SIZE;

/// A manifest the proxy can serve, wherever it came from.
#[derive(Clone, Debug)]
pub(crate) struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub len: u64,
    /// The verified bytes; `None` only for a HEAD answered from an upstream HEAD.
    pub bytes: Option<Bytes>,
    pub served: Served,
    /// A `Warning` header value (served stale).
    pub warning: Option<String>,
}

impl Manifest {
    fn cached(digest: Digest, m: CachedManifest, served: Served) -> Manifest {
        Manifest {
            digest,
            len: m.bytes.len() as u64,
            media_type: m.media_type,
            bytes: Some(m.bytes),
            served,
            warning: None,
        }
    }
}

impl Puller<'_> {
    /// The manifest `reference` names, for a HEAD (`head`) or a GET; its `bytes` are `Some`
    /// unless `head`.
    pub(crate) async fn manifest(
        &self,
        reference: &Reference,
        head: bool,
    ) -> Result<Manifest, Error> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(d).await,
            Reference::Tag(t) => self.manifest_by_tag(t, head).await,
        }
    }

    /// By digest: a cached copy is final once this repository is linked to it (under this
    /// request's grant, within `cache.link_ttl`) and its bytes came from this upstream (or one
    /// it trusts); bytes from elsewhere are fetched again from this upstream.
    async fn manifest_by_digest(&self, digest: &Digest) -> Result<Manifest, Error> {
        if let Some(m) = self.cache.manifest(digest).await {
            if self.admitted(digest).await {
                if !self.linked(digest).await {
                    self.confirm_in_repository(Subject::Manifest, digest)
                        .await?;
                    self.link(digest).await;
                }
                return Ok(Manifest::cached(digest.clone(), m, Served::Hit));
            }
        }
        self.fetch_and_store(&Reference::Digest(digest.clone()))
            .await
    }

    /// By tag: trusted for the upstream's tag TTL, then revalidated with an upstream HEAD;
    /// served stale (with a `Warning`) when the upstream is unreachable, failing or rate
    /// limiting.
    async fn manifest_by_tag(&self, tag: &Tag, head: bool) -> Result<Manifest, Error> {
        let reference = Reference::Tag(tag.clone());
        let tag = tag.as_str();
        let cache = self.cache;
        let key = self.target.repo_key();
        let ttl = self.target.upstream.tag_ttl;
        let link_ttl = self.config.cache.link_ttl.0;
        // A cached tag counts only as checked under this request's grant (see the read rule).
        let entry = cache
            .tag(&key, tag, ttl)
            .await
            .filter(|e| e.grant == Some(self.grant));
        if let Some(e) = &entry {
            if e.checked_within(ttl) && e.checked_within(link_ttl) && self.admitted(&e.digest).await
            {
                if let Some(m) = cache.manifest(&e.digest).await {
                    return Ok(Manifest::cached(e.digest.clone(), m, Served::Hit));
                }
            }
        }
        match self.head_manifest(&reference).await {
            Ok(Some(found)) => {
                cache.put_tag(&key, tag, &found.digest, self.grant).await;
                if let Some(m) = cache.manifest(&found.digest).await {
                    if self.admitted(&found.digest).await {
                        self.link(&found.digest).await;
                        return Ok(Manifest::cached(found.digest, m, Served::Hit));
                    }
                }
                if head {
                    return Ok(found);
                }
                self.fetch_and_store(&Reference::Digest(found.digest)).await
            }
            Ok(None) => {
                let m = self.fetch_and_store(&reference).await?;
                cache.put_tag(&key, tag, &m.digest, self.grant).await;
                Ok(m)
            }
            Err(Error::Upstream { source, subject }) => {
                if matches!(source, UpstreamError::NotFound { .. }) {
                    cache.remove_tag(&key, tag, self.grant).await;
                } else if source.is_transient() {
                    // Stale only under the same grant and within `cache.link_ttl`.
                    let usable = match &entry {
                        Some(e) => e.checked_within(link_ttl) && self.admitted(&e.digest).await,
                        None => false,
                    };
                    if let Some(e) = entry.as_ref().filter(|_| usable) {
                        if let Some(m) = cache.manifest(&e.digest).await {
                            tracing::warn!(repository = %key, tag, error = %source, "serving a cached tag: upstream failed");
                            let mut stale = Manifest::cached(e.digest.clone(), m, Served::Stale);
                            stale.warning = Some(format!(
                                "299 - \"stale: upstream {} failed ({}); serving the cached tag\"",
                                self.upstream_name(),
                                source.metric_label()
                            ));
                            return Ok(stale);
                        }
                    }
                }
                Err(Error::Upstream { source, subject })
            }
            Err(e) => Err(e),
        }
    }

    /// GETs a manifest upstream (verified), stores it, records this upstream as an origin of
    /// its bytes and links this repository to it.
    async fn fetch_and_store(&self, reference: &Reference) -> Result<Manifest, Error> {
        let m = self.fetch_manifest(reference).await?;
        let bytes = m.bytes.clone().unwrap_or_default();
        if let Err(e) = self
            .cache
            .put_manifest(&m.digest, &m.media_type, bytes)
            .await
        {
            tracing::warn!(digest = %m.digest, error = %e, "manifest not cached");
        } else {
            self.cache.add_origin(&m.digest, self.upstream_name());
            self.link(&m.digest).await;
        }
        Ok(m)
    }

    /// An upstream HEAD (served `upstream`, no bytes); `None` when the upstream's answer lacks
    /// the digest, type or length (the caller then GETs and computes them).
    async fn head_manifest(&self, reference: &Reference) -> Result<Option<Manifest>, Error> {
        let call = Call::head(Subject::Manifest, format!("manifests/{reference}"))
            .accept(media::UPSTREAM_MANIFEST_ACCEPT);
        let resp = self.send(call).await?;
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
        let (Some(digest), Some(media_type), Some(len)) = (digest, media_type, len) else {
            return Ok(None);
        };
        if matches!(reference, Reference::Digest(want) if *want != digest) {
            return Ok(None);
        }
        Ok(Some(Manifest {
            digest,
            media_type,
            len,
            bytes: None,
            served: Served::Upstream,
            warning: None,
        }))
    }

    /// GETs a manifest upstream: at most [`MAX_MANIFEST_SIZE`] bytes that hash to the digest
    /// asked for (by digest) and to the upstream's `Docker-Content-Digest` (when it sends one).
    async fn fetch_manifest(&self, reference: &Reference) -> Result<Manifest, Error> {
        let call = Call::get(Subject::Manifest, format!("manifests/{reference}"))
            .accept(media::UPSTREAM_MANIFEST_ACCEPT);
        let resp = self.send(call).await?;
        let header_type = content_type(resp.response.headers());
        let claimed = resp.response.headers().get(DOCKER_CONTENT_DIGEST).cloned();
        let upstream = self.upstream_name();
        let bytes = read_limited(resp, MAX_MANIFEST_SIZE, upstream).await?;
        // The upstream's own claim must hold too: a body that does not hash to the
        // Docker-Content-Digest it came with is refused (and not cached), by tag as by digest.
        if let Some(claimed) = claimed {
            let claimed = claimed
                .to_str()
                .ok()
                .and_then(|v| Digest::parse(v.trim()).ok())
                .ok_or_else(|| Error::BadUpstreamResponse {
                    upstream: upstream.to_owned(),
                    message: "manifest with an unparseable Docker-Content-Digest".into(),
                })?;
            if !claimed.verify(&bytes) {
                return Err(Error::DigestMismatch {
                    upstream: upstream.to_owned(),
                    digest: claimed.to_string(),
                });
            }
        }
        let digest = match reference {
            Reference::Digest(want) => {
                if !want.verify(&bytes) {
                    return Err(Error::DigestMismatch {
                        upstream: upstream.to_owned(),
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
                upstream: upstream.to_owned(),
                message: "manifest without a media type".into(),
            })?;
        Ok(Manifest {
            digest,
            media_type,
            len: bytes.len() as u64,
            bytes: Some(bytes),
            served: Served::Miss,
            warning: None,
        })
    }
}

/// Reads a small upstream body, refusing more than `limit` bytes.
async fn read_limited(
    resp: UpstreamResponse,
    limit: usize,
    upstream: &str,
) -> Result<Bytes, Error> {
    read_at_most(resp, limit, upstream)
        .await?
        .ok_or_else(|| Error::ManifestTooLarge {
            upstream: upstream.to_owned(),
            limit,
        })
}

/// The media type of a Content-Type header, parameters dropped.
fn content_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_owned())
}
