//! One reference → its manifest(s) and blobs in the cache, through the same path a client pull
//! takes ([`crate::server::handlers::puller_for`], then [`crate::pull::Puller`]): routing,
//! credential choice, the read rule, verification, single flight and links are exactly those
//! of a client request, so a client asking for a blob being prewarmed follows that fill.
//!
//! A blob is read to its end (its body ends cleanly only once the fill verified it), then
//! prewarm waits for the commit, so that "done" means "a hit for the next request".

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;

use super::metrics::PrewarmMetrics;
use crate::error::Error;
use crate::protocol::media::{self, ManifestRefs};
use crate::protocol::{Digest, Reference, Tag};
use crate::pull::{Puller, Served};
use crate::server::App;
use crate::upstream::slots::Pool;

/// Most manifests one reference may lead to (an index and its children): an upstream cannot
/// make prewarm walk without end.
const MAX_MANIFESTS: usize = 256;
/// How deep indexes may nest.
const MAX_DEPTH: usize = 2;
/// How long a verified blob may take to be committed before prewarm calls it not cached.
const COMMIT_WAIT: Duration = Duration::from_secs(60);
/// How often background prewarm looks again for a free upstream slot.
const SLOT_POLL: Duration = Duration::from_millis(100);

/// What to prewarm: a repository name as a client requests it (`host[:port]/repo`, or a path
/// that goes to `default_upstream`) and a tag or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) name: String,
    pub(crate) reference: Reference,
}

impl Job {
    /// `host[:port]/repo[:tag]` or `host[:port]/repo@sha256:...` (no tag: `latest`).
    pub(crate) fn parse(s: &str) -> Result<Job, String> {
        let s = s.trim();
        let (name, reference) = match s.split_once('@') {
            Some((name, digest)) => {
                let d = Digest::parse(digest).map_err(|e| e.message.clone())?;
                (name, Reference::Digest(d))
            }
            None => {
                let slash = s.rfind('/').map_or(0, |i| i + 1);
                match s[slash..].rfind(':') {
                    Some(colon) => {
                        let tag = &s[slash + colon + 1..];
                        let tag = Tag::parse(tag).ok_or_else(|| format!("invalid tag {tag:?}"))?;
                        (&s[..slash + colon], Reference::Tag(tag))
                    }
                    None => (s, Reference::Tag(Tag::parse("latest").ok_or("latest")?)),
                }
            }
        };
        if name.is_empty() || name.starts_with('/') || name.ends_with('/') {
            return Err(format!("invalid repository {name:?}"));
        }
        Ok(Job {
            name: name.to_owned(),
            reference,
        })
    }

    pub(crate) fn label(&self) -> String {
        match &self.reference {
            Reference::Tag(t) => format!("{}:{t}", self.name),
            Reference::Digest(d) => format!("{}@{d}", self.name),
        }
    }
}

/// Why a reference was not cached: a bounded reason (the metric label) and a message that
/// names upstreams, never credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            reason: e.metric_label(),
            message: e.to_string(),
        }
    }
}

/// What one reference came to.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    pub(crate) label: String,
    pub(crate) manifests: usize,
    pub(crate) blobs: usize,
    /// Blobs this prewarm fetched upstream (cache misses).
    pub(crate) fetched: usize,
    pub(crate) bytes: u64,
    pub(crate) failure: Option<Failure>,
}

/// Whether prewarm may take any free upstream slot (the CLI, which serves no clients) or only
/// from the half of each pool clients leave free (background prewarm in a serving proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    All,
    Spare,
}

/// Prewarms `job` into `app`'s cache. `on_bytes` hears of every chunk read (progress display).
pub(crate) async fn run(
    app: &App,
    metrics: &PrewarmMetrics,
    job: &Job,
    share: Share,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Report {
    let mut walk = Walk {
        app,
        metrics,
        share,
        on_bytes,
        report: Report {
            label: job.label(),
            ..Report::default()
        },
        seen: HashSet::new(),
    };
    let mut repo_key = String::new();
    let result =
        match crate::server::handlers::puller_for(app, &job.name, None, &mut repo_key).await {
            Ok(puller) => walk.manifest(&puller, &job.reference, 0).await,
            Err(e) => Err(e.into()),
        };
    walk.report.failure = result.err();
    walk.report
}

/// Whether background prewarm may take one of `free` slots of a pool of `total`: only while
/// clients leave more than half of it free (or all of it, for a pool of one), so client
/// requests arriving meanwhile always find a slot first.
fn spare(free: usize, total: usize) -> bool {
    free == total || free * 2 > total
}

struct Walk<'a> {
    app: &'a App,
    metrics: &'a PrewarmMetrics,
    share: Share,
    on_bytes: &'a (dyn Fn(u64) + Send + Sync),
    report: Report,
    /// Digests already done for this reference (children of an index share blobs).
    seen: HashSet<String>,
}

impl Walk<'_> {
    /// Waits until this prewarm may take a slot of `pool`.
    async fn slot(&self, pool: Pool) {
        if self.share == Share::All {
            return;
        }
        loop {
            let (free, total) = self.app.upstreams.slots(pool);
            if spare(free, total) {
                return;
            }
            tokio::time::sleep(SLOT_POLL).await;
        }
    }

    async fn manifest(
        &mut self,
        puller: &Puller<'_>,
        reference: &Reference,
        depth: usize,
    ) -> Result<(), Failure> {
        if self.report.manifests >= MAX_MANIFESTS {
            return Err(Failure {
                reason: "too_many_manifests",
                message: format!("more than {MAX_MANIFESTS} manifests under one reference"),
            });
        }
        self.slot(Pool::Requests).await;
        let m = puller.manifest(reference, false).await?;
        self.report.manifests += 1;
        let Some(bytes) = m.bytes else {
            return Ok(());
        };
        let doc = ManifestRefs::parse(&bytes).map_err(|e| Failure {
            reason: "bad_upstream_response",
            message: format!("manifest {} is not a manifest: {e}", m.digest),
        })?;
        if media::is_index_type(&m.media_type) || !doc.manifests.is_empty() {
            if depth >= MAX_DEPTH {
                return Err(Failure {
                    reason: "too_many_manifests",
                    message: format!("indexes nested deeper than {MAX_DEPTH}"),
                });
            }
            for child in &doc.manifests {
                if !self.seen.insert(child.digest.clone()) {
                    continue;
                }
                let d = Digest::parse(&child.digest).map_err(|e| Failure {
                    reason: "bad_upstream_response",
                    message: format!("index {}: {}", m.digest, e.message),
                })?;
                Box::pin(self.manifest(puller, &Reference::Digest(d), depth + 1)).await?;
            }
        }
        for digest in doc.blob_digests() {
            if !self.seen.insert(digest.to_owned()) {
                continue;
            }
            let d = Digest::parse(digest).map_err(|e| Failure {
                reason: "bad_upstream_response",
                message: format!("manifest {}: {}", m.digest, e.message),
            })?;
            self.blob(puller, &d).await?;
        }
        Ok(())
    }

    async fn blob(&mut self, puller: &Puller<'_>, digest: &Digest) -> Result<(), Failure> {
        self.slot(Pool::Blobs).await;
        let blob = puller.blob(digest, None, false).await?;
        let mut read = 0u64;
        if let Some(mut body) = blob.body {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Failure {
                    reason: "body_interrupted",
                    message: format!("blob {digest}: {e}"),
                })?;
                read += chunk.len() as u64;
                (self.on_bytes)(chunk.len() as u64);
            }
        }
        // The body ended cleanly: verified. "Cached" needs the commit that follows.
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        while self.app.cache.blob_size(digest).is_none() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Failure {
                    reason: "not_committed",
                    message: format!("blob {digest} was verified but not committed to the cache"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.report.blobs += 1;
        self.report.bytes += read;
        if blob.served == Served::Miss {
            self.report.fetched += 1;
        }
        self.metrics.blob(blob.served, read);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_writes_them() {
        let j = Job::parse("reg.example:5000/team/app:v1").unwrap();
        assert_eq!(j.name, "reg.example:5000/team/app");
        assert_eq!(j.reference, Reference::Tag(Tag::parse("v1").unwrap()));
        let j = Job::parse("reg.example:5000/team/app").unwrap();
        assert_eq!(j.name, "reg.example:5000/team/app");
        assert_eq!(j.label(), "reg.example:5000/team/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let j = Job::parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(j.name, "ghcr.io/org/app");
        assert_eq!(j.reference, Reference::Digest(Digest::parse(&d).unwrap()));
        assert!(Job::parse("ghcr.io/org/app@sha256:zz").is_err());
        assert!(Job::parse("ghcr.io/org/app:bad tag").is_err());
        assert!(Job::parse(":v1").is_err());
    }

    #[test]
    fn background_prewarm_leaves_half_of_each_pool_to_clients() {
        assert!(spare(64, 64));
        assert!(spare(33, 64));
        assert!(!spare(32, 64));
        assert!(!spare(0, 64));
        assert!(spare(1, 1));
        assert!(!spare(0, 1));
        assert!(!spare(1, 2));
    }
}
