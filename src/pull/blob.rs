//! Blobs: answered from the cache when the read rule admits them for this repository,
//! otherwise filled once per digest through the cache (single flight: concurrent requests of
//! any repository join one upstream GET) with this request's credential.
//!
//! A Range request for a blob not cached locally is answered at once (from the bucket when
//! this repository may read it there, else with an exact upstream `206`) while a background
//! fill lands the whole blob verified; a fill's own bytes are released only once verified.
//! Cached bytes from an upstream this one does not trust are not served: the blob is fetched
//! again from this upstream and hashed as it streams ([`Puller::blob_from_upstream_verified`]).
//!
//! The fetch a fill runs ([`Puller::blob_fetch`]) owns everything it needs, so it outlives
//! the client that started it. Its error is a [`crate::error::Error`], carried through the
//! cache as it is ([`FetchError`]) to every request waiting on the fill: a blob and a
//! manifest that meet the same upstream failure get the same client error and label.

use std::io;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE};
use http::{HeaderValue, StatusCode};

use super::{upstream_stream, Call, Puller, Served};
use crate::cache::{FetchError, FetchFn, Outcome, UpstreamBody};
use crate::error::{Error, Subject};
use crate::protocol::range::{self, ByteRange, RangeSpec};
use crate::protocol::Digest;

/// What a blob request gets: a status (`200`, `206` or `416`), its length and range when
/// known, and the body (`None`: no body, for a HEAD or a `416`).
pub(crate) struct Blob {
    pub served: Served,
    pub status: StatusCode,
    pub len: Option<u64>,
    pub content_range: Option<String>,
    pub body: Option<BoxStream<'static, Result<Bytes, io::Error>>>,
}

impl Blob {
    fn head(served: Served, len: Option<u64>) -> Blob {
        Blob {
            served,
            status: StatusCode::OK,
            len,
            content_range: None,
            body: None,
        }
    }

    fn full(
        served: Served,
        len: Option<u64>,
        body: BoxStream<'static, Result<Bytes, io::Error>>,
    ) -> Blob {
        Blob {
            served,
            status: StatusCode::OK,
            len,
            content_range: None,
            body: Some(body),
        }
    }

    /// Bytes `[start, end]` of a blob of `size` bytes.
    fn partial(
        served: Served,
        (start, end, size): (u64, u64, u64),
        body: BoxStream<'static, Result<Bytes, io::Error>>,
    ) -> Blob {
        Blob {
            served,
            status: StatusCode::PARTIAL_CONTENT,
            len: Some(end - start + 1),
            content_range: Some(range::content_range(start, end, size)),
            body: Some(body),
        }
    }

    fn unsatisfiable(served: Served, size: u64) -> Blob {
        Blob {
            served,
            status: StatusCode::RANGE_NOT_SATISFIABLE,
            len: None,
            content_range: Some(range::unsatisfied_content_range(size)),
            body: None,
        }
    }
}

impl Puller<'_> {
    /// A blob for a HEAD (`head`) or a GET with the client's `Range` header, if any.
    pub(crate) async fn blob(
        &self,
        digest: &Digest,
        range_header: Option<&HeaderValue>,
        head: bool,
    ) -> Result<Blob, Error> {
        let cache = self.cache;
        let origin = self.upstream_name();
        let admitted = self.admitted(digest).await;
        let readable = admitted && self.linked(digest).await;
        let cached_size = cache.blob_size(digest);
        if head {
            // Known to this repository: the size from the local tier, else from the bucket.
            let known = match cached_size {
                Some(size) if readable => Some((size, Served::Hit)),
                None if readable => cache
                    .shared_blob_size(digest)
                    .await
                    .map(|s| (s, Served::Shared)),
                _ => None,
            };
            return match known {
                Some((size, served)) => Ok(Blob::head(served, Some(size))),
                // Cold or not yet linked: an upstream HEAD only, never a download.
                None => {
                    let len = self.blob_upstream_head(digest).await?;
                    if cached_size.is_some() {
                        self.link(digest).await;
                    }
                    Ok(Blob::head(Served::Upstream, len))
                }
            };
        }
        if cached_size.is_some() && !admitted {
            // Cached bytes from another upstream: this upstream's word does not admit them.
            return self.blob_from_upstream_verified(digest).await;
        }
        // Confirmed upstream by this request: not asked again below, however short link_ttl is.
        let mut confirmed = false;
        if cached_size.is_some() && !readable {
            self.confirm_in_repository(Subject::Blob, digest).await?;
            self.link(digest).await;
            confirmed = true;
        }
        if let Some(range) = range_header.filter(|_| cached_size.is_none()) {
            // A range of a blob not cached locally: the client gets its range at once, from
            // the bucket (a ranged GET) when this repository may read the blob there, else
            // from the upstream (a fill's bytes are released only once the whole blob is
            // verified), while a background fill lands the whole blob in the cache once.
            let (cache_owned, fetch, digest_owned) =
                (cache.clone(), self.blob_fetch(digest), digest.clone());
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
                    if let Some(blob) = self.shared_range(digest, range).await {
                        return Ok(blob);
                    }
                }
                if let Some(blob) = self.upstream_range(digest, spec).await? {
                    return Ok(blob);
                }
            }
        }
        let reader = cache
            .blob_from(digest, Some(origin), self.blob_fetch(digest))
            .await?;
        match reader.outcome() {
            // The fetch through this repository succeeded: it holds the blob.
            Outcome::Miss => self.link(digest).await,
            // Checked again here, not with the values from before: another repository's fill
            // (maybe from another upstream, or from the bucket) may have committed in between.
            Outcome::Coalesced | Outcome::Hit => {
                if !self.admitted(digest).await {
                    drop(reader);
                    return self.blob_from_upstream_verified(digest).await;
                }
                if !confirmed && !self.linked(digest).await {
                    self.confirm_in_repository(Subject::Blob, digest).await?;
                    self.link(digest).await;
                }
            }
        }
        let served = Served::from(reader.outcome());
        let Some(size) = reader.size() else {
            // Unknown length (no Content-Length upstream): the whole body, chunked.
            return Ok(Blob::full(served, None, reader.into_stream(None)));
        };
        let range_header = range_header.and_then(|v| v.to_str().ok());
        Ok(match range::parse_range(range_header, size) {
            ByteRange::Full => Blob::full(served, Some(size), reader.into_stream(None)),
            ByteRange::Partial { start, end } => Blob::partial(
                served,
                (start, end, size),
                reader.into_stream(Some((start, end))),
            ),
            ByteRange::Unsatisfiable => Blob::unsatisfiable(served, size),
        })
    }

    /// A HEAD of a cold blob, answered by an upstream HEAD (no body, so nothing to verify):
    /// the length it states.
    async fn blob_upstream_head(&self, digest: &Digest) -> Result<Option<u64>, Error> {
        let resp = self
            .send(Call::head(Subject::Blob, format!("blobs/{digest}")))
            .await?;
        // The header, not content_length(): for a HEAD reqwest reports the (empty) body's length.
        Ok(resp
            .response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// A range of a cold blob straight from the upstream, while the background fill verifies
    /// the whole blob. Passed through only when the upstream answers `206` with a
    /// `Content-Range` that is exactly `spec` resolved against the size it states, and a
    /// matching `Content-Length`; `None` otherwise (the caller serves the range from the
    /// verified fill instead).
    async fn upstream_range(
        &self,
        digest: &Digest,
        spec: RangeSpec,
    ) -> Result<Option<Blob>, Error> {
        let Ok(header) = HeaderValue::from_str(&spec.to_string()) else {
            return Ok(None);
        };
        let call = Call::get(Subject::Blob, format!("blobs/{digest}")).range(&header);
        let resp = self.send(call).await?;
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
                let body = upstream_stream(resp);
                Ok(Some(Blob::partial(
                    Served::Upstream,
                    (start, end, size),
                    body,
                )))
            }
            _ => {
                tracing::warn!(upstream = %self.upstream_name(), %digest, range = %spec,
                    status = status.as_u16(), "upstream did not answer the range asked; serving it from the verified blob");
                Ok(None)
            }
        }
    }

    /// A Range request answered from the shared tier: `None` when the bucket cannot serve it
    /// (or the header asks for no valid range: the caller passes it upstream as it is).
    async fn shared_range(&self, digest: &Digest, range: &HeaderValue) -> Option<Blob> {
        let size = self.cache.shared_blob_size(digest).await?;
        match range::parse_range(range.to_str().ok(), size) {
            ByteRange::Full => None,
            ByteRange::Partial { start, end } => {
                let body = self.cache.shared_blob_range(digest, start, end).await?;
                Some(Blob::partial(Served::Shared, (start, end, size), body))
            }
            ByteRange::Unsatisfiable => Some(Blob::unsatisfiable(Served::Shared, size)),
        }
    }

    /// A blob whose cached bytes came from another upstream: fetched again from this one, the
    /// whole blob (a `Range` is ignored, as HTTP allows), hashed as it streams. A mismatch ends
    /// the body with an error, never cleanly; a match records this upstream as an origin and
    /// links the repository, so the next request is a cache hit.
    async fn blob_from_upstream_verified(&self, digest: &Digest) -> Result<Blob, Error> {
        let resp = self
            .send(Call::get(Subject::Blob, format!("blobs/{digest}")))
            .await?;
        if resp.response.status() != StatusCode::OK {
            return Err(Error::BadUpstreamResponse {
                upstream: self.upstream_name().to_owned(),
                message: format!("unexpected status {}", resp.response.status()),
            });
        }
        let len = resp.response.content_length();
        let (cache, upstream, key, grant) = (
            self.cache.clone(),
            self.upstream_name().to_owned(),
            self.target.repo_key(),
            self.grant,
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
        Ok(Blob::full(Served::Upstream, len, stream))
    }

    /// The fetch the cache runs on a miss: a full upstream GET with this request's
    /// credential, detached from the client (it owns everything it needs).
    fn blob_fetch(&self, digest: &Digest) -> FetchFn {
        let upstream = self.target.upstream.clone();
        let repository = self.target.repository.clone();
        let credential = self.credential.clone();
        let grant = self.grant;
        let call = Call::get(Subject::Blob, format!("blobs/{digest}"));
        let (cache, key, digest) = (self.cache.clone(), self.target.repo_key(), digest.clone());
        let l = &self.config.limits;
        let limits = crate::cache::FillLimits {
            deadline: l.fill_deadline.0,
            min_rate: l.fill_min_rate.0,
            window: l.fill_rate_window.0,
            max_size: l.max_blob_size.map(|m| m.0),
        };
        let metrics = self.metrics.clone();
        Box::new(move || {
            Box::pin(async move {
                match upstream.send(&call.request(&repository), &credential).await {
                    Ok(resp) if resp.response.status() == StatusCode::OK => {
                        let size = resp.response.content_length();
                        if let Some(max) =
                            limits.max_size.filter(|max| size.is_some_and(|s| s > *max))
                        {
                            // Refused before reading the body (dropping it closes the connection).
                            metrics.limit_hit(
                                crate::metrics::Limit::MaxBlobSize,
                                upstream.name.as_str(),
                            );
                            return Err(FetchError::new(Error::BlobTooLarge(format!(
                                "blob is {} bytes, more than limits.max_blob_size ({max} bytes)",
                                size.unwrap_or_default()
                            ))));
                        }
                        // The upstream just showed this repository holds the blob: link it
                        // now, so requests of the same repository that join this fill need
                        // no HEAD.
                        cache.link(&key, &digest, grant).await;
                        Ok(UpstreamBody {
                            size,
                            stream: crate::cache::enforce_fill_limits(
                                upstream_stream(resp),
                                limits,
                            ),
                        })
                    }
                    Ok(resp) => Err(FetchError::new(Error::BadUpstreamResponse {
                        upstream: upstream.name.clone(),
                        message: format!("unexpected status {}", resp.response.status()),
                    })),
                    Err(source) => Err(FetchError::new(Error::Upstream {
                        subject: Subject::Blob,
                        source,
                    })),
                }
            })
        })
    }
}
