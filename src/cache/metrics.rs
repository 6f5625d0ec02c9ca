//! The cache's Prometheus metrics and the one place each cache event is logged and counted.
//!
//! Labels are bounded: `outcome` is one of hit/miss/coalesced, `reason` one of [`FailReason`].

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::protocol::grammar::Digest;

/// Why a fill did not commit. Bounded: one label value per variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The bytes did not hash to the digest, or were longer than announced.
    DigestMismatch,
    /// The body ended before the announced size (or was empty/short of the digest).
    ShortBody,
    /// The upstream answered with an error or the body stream failed.
    UpstreamError,
    /// The temp file could not be written; the fill went on uncached for its first client.
    WriteError,
    /// The fill task died (panicked or was aborted) before finishing.
    Aborted,
    /// A read from the shared tier broke off after bytes were streamed to readers.
    StoreError,
    /// The fill ran past `limits.fill_deadline`.
    Deadline,
    /// The upstream body was slower than `limits.fill_min_rate`.
    TooSlow,
    /// The body passed `limits.max_blob_size`.
    TooLarge,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::DigestMismatch => "digest_mismatch",
            FailReason::ShortBody => "short_body",
            FailReason::UpstreamError => "upstream_error",
            FailReason::WriteError => "write_error",
            FailReason::Aborted => "aborted",
            FailReason::StoreError => "store_error",
            FailReason::Deadline => "deadline",
            FailReason::TooSlow => "too_slow",
            FailReason::TooLarge => "too_large",
        }
    }
}

/// Where the bytes of a blob request came from: a committed local file, or (for the request
/// that started a fill) the shared tier or the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tier {
    Local,
    Shared,
    Upstream,
}

impl Tier {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Shared => "shared",
            Tier::Upstream => "upstream",
        }
    }
}

/// Why the read rule sent a request upstream instead of serving cached content at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No link of the repository to the object.
    NoLink,
    /// A link under another grant (the credential source changed or went away).
    Grant,
    /// A link older than `cache.link_ttl`.
    Expired,
    /// The cached bytes came from an upstream this one does not vouch for.
    Origin,
}

impl Refusal {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::NoLink => "no_link",
            Refusal::Grant => "grant",
            Refusal::Expired => "expired",
            Refusal::Origin => "origin",
        }
    }
}

/// Every metric family of the cache.
#[derive(Clone)]
pub(super) struct Metrics {
    requests: IntCounterVec,
    served_bytes: IntCounterVec,
    read_back_bytes: IntCounter,
    tiers: IntCounterVec,
    fills_started: IntCounter,
    fills_committed: IntCounter,
    fills_failed: IntCounterVec,
    fills_running: IntGauge,
    evictions: IntCounter,
    evicted_bytes: IntCounter,
    corrupt: IntCounter,
    size_bytes: IntGauge,
    blobs: IntGauge,
    refusals: IntCounterVec,
    metadata_bytes: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Creates the families and registers them into `registry`.
    pub(super) fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
            requests: counter_vec(
                registry,
                "oci_proxy_cache_requests_total",
                "Blob requests by cache outcome (hit, miss, coalesced).",
                "outcome",
            )?,
            served_bytes: counter_vec(
                registry,
                "oci_proxy_cache_served_bytes_total",
                "Bytes streamed to clients out of cache files, by outcome of the request.",
                "outcome",
            )?,
            read_back_bytes: counter(
                registry,
                "oci_proxy_cache_read_back_bytes_total",
                "Bytes readers of a fill in progress read back from its temp file (they joined \
                 late or fell behind the bytes in memory).",
            )?,
            tiers: counter_vec(
                registry,
                "oci_proxy_cache_tier_total",
                "Blob requests served from a local file (tier local), and fills sourced from the \
                 shared store (shared) or the upstream (upstream).",
                "tier",
            )?,
            fills_started: counter(
                registry,
                "oci_proxy_cache_fills_started_total",
                "Upstream fills started.",
            )?,
            fills_committed: counter(
                registry,
                "oci_proxy_cache_fills_committed_total",
                "Fills verified and committed to the cache.",
            )?,
            fills_failed: counter_vec(
                registry,
                "oci_proxy_cache_fills_failed_total",
                "Fills that did not commit, by reason.",
                "reason",
            )?,
            fills_running: gauge(
                registry,
                "oci_proxy_cache_fills_running",
                "Fills receiving from upstream now; beyond two, each keeps a share of the memory \
                 all fills may hold (windows, in-flight bytes, write buffers).",
            )?,
            evictions: counter(
                registry,
                "oci_proxy_cache_evictions_total",
                "Blobs evicted to stay under cache.max_size.",
            )?,
            evicted_bytes: counter(
                registry,
                "oci_proxy_cache_evicted_bytes_total",
                "Bytes evicted to stay under cache.max_size.",
            )?,
            corrupt: counter(
                registry,
                "oci_proxy_cache_corrupt_blobs_total",
                "Committed blob files found truncated or corrupt and dropped.",
            )?,
            size_bytes: gauge(
                registry,
                "oci_proxy_cache_size_bytes",
                "Bytes held by committed blobs.",
            )?,
            blobs: gauge(registry, "oci_proxy_cache_blobs", "Committed blobs held.")?,
            refusals: counter_vec(
                registry,
                "oci_proxy_cache_read_rule_refusals_total",
                "Cached objects not served without asking upstream, by reason (no_link, grant, \
                 expired, origin); each led to an upstream confirmation or fetch.",
                "reason",
            )?,
            metadata_bytes: gauge(
                registry,
                "oci_proxy_cache_metadata_bytes",
                "Bytes of manifests and journals on disk (counted toward cache.max_size; \
                 updated when eviction runs).",
            )?,
        })
    }

    pub(super) fn request(&self, outcome: super::Outcome, digest: &Digest) {
        tracing::debug!(%digest, outcome = outcome.as_str(), "cache request");
        self.requests.with_label_values(&[outcome.as_str()]).inc();
        if outcome == super::Outcome::Hit {
            self.tier(Tier::Local);
        }
    }

    pub(super) fn tier(&self, tier: Tier) {
        self.tiers.with_label_values(&[tier.as_str()]).inc();
    }

    pub(super) fn served(&self, outcome: super::Outcome, bytes: u64) {
        self.served_bytes
            .with_label_values(&[outcome.as_str()])
            .inc_by(bytes);
    }

    /// The gauge of fills running, kept by [`super::memory::FillMemory`].
    pub(super) fn fills_running(&self) -> IntGauge {
        self.fills_running.clone()
    }

    pub(super) fn read_back(&self, bytes: u64) {
        self.read_back_bytes.inc_by(bytes);
    }

    #[cfg(test)]
    pub(super) fn read_back_count(&self) -> u64 {
        self.read_back_bytes.get()
    }

    pub(super) fn fill_started(&self, digest: &Digest) {
        tracing::debug!(%digest, "cache fill started");
        self.fills_started.inc();
    }

    pub(super) fn fill_committed(&self, digest: &Digest, size: u64) {
        tracing::info!(%digest, size, "cache fill committed");
        self.fills_committed.inc();
    }

    pub(super) fn fill_failed(&self, digest: &Digest, reason: FailReason, detail: &str) {
        tracing::warn!(%digest, reason = reason.as_str(), detail, "cache fill failed");
        self.fills_failed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub(super) fn evicted(&self, digest: &Digest, size: u64) {
        tracing::debug!(%digest, size, "cache blob evicted");
        self.evictions.inc();
        self.evicted_bytes.inc_by(size);
    }

    pub(super) fn corrupt(&self, digest: &Digest, detail: &str) {
        tracing::warn!(%digest, detail, "cached blob is corrupt; dropped");
        self.corrupt.inc();
    }

    pub(super) fn refused(&self, digest: &Digest, repository: &str, reason: Refusal) {
        tracing::debug!(%digest, repository, reason = reason.as_str(), "read rule: asking upstream");
        self.refusals.with_label_values(&[reason.as_str()]).inc();
    }

    /// Publishes the committed totals.
    pub(super) fn set_metadata(&self, bytes: u64) {
        self.metadata_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub(super) fn set_totals(&self, bytes: u64, blobs: usize) {
        self.size_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
    }

    #[cfg(test)]
    pub(super) fn failed_count(&self, reason: FailReason) -> u64 {
        self.fills_failed
            .with_label_values(&[reason.as_str()])
            .get()
    }

    #[cfg(test)]
    pub(super) fn tier_count(&self, tier: Tier) -> u64 {
        self.tiers.with_label_values(&[tier.as_str()]).get()
    }

    #[cfg(test)]
    pub(super) fn evictions_count(&self) -> u64 {
        self.evictions.get()
    }
}
