//! Prewarm's metrics and its per-module-version log line, in one place: whatever reports a
//! finished module version (or blob) here is logged and counted together. Registered once per
//! process with the server's other families (a reload keeps them). Labels are bounded:
//! `outcome` is `hit`, `miss`, `coalesced`, `shared` or `upstream` (how the cache answered),
//! `result` is `ok` or `failed`, `reason` one of the error labels (`not_found`, `unauthorized`,
//! `denied`, `digest_mismatch`, ..., plus prewarm's own `invalid_reference`,
//! `too_many_manifests`, `body_interrupted`, `not_committed`).

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use super::engine::Report;
use crate::pull::Served;

#[derive(Clone, Debug)]
pub(crate) struct PrewarmMetrics {
    blobs: IntCounterVec,
    bytes: IntCounterVec,
    versions: IntCounterVec,
    failures: IntCounterVec,
    queue: IntGauge,
}

impl PrewarmMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<PrewarmMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let queue = IntGauge::new(
            "oci_proxy_prewarm_queue_length",
            "Module versions waiting for a prewarm slot (catalog.prewarm.concurrency).",
        )?;
        registry.register(Box::new(queue.clone()))?;
        Ok(PrewarmMetrics {
            blobs: counter(
                "oci_proxy_prewarm_blobs_total",
                "Blobs (configs and layers) prewarm read through the cache, by how the cache \
                 answered (miss: fetched upstream by prewarm).",
                "outcome",
            )?,
            bytes: counter(
                "oci_proxy_prewarm_bytes_total",
                "Bytes of the blobs prewarm read through the cache, by how the cache answered.",
                "outcome",
            )?,
            versions: counter(
                "oci_proxy_prewarm_versions_total",
                "Module versions (or references) prewarm finished, by result.",
                "result",
            )?,
            failures: counter(
                "oci_proxy_prewarm_failures_total",
                "Module versions (or references) prewarm could not fetch, by reason.",
                "reason",
            )?,
            queue,
        })
    }

    /// One blob read to its end (and committed) through the cache.
    pub(crate) fn blob(&self, served: Served, bytes: u64) {
        self.blobs.with_label_values(&[served.as_str()]).inc();
        self.bytes
            .with_label_values(&[served.as_str()])
            .inc_by(bytes);
    }

    pub(crate) fn queued(&self) {
        self.queue.inc();
    }

    pub(crate) fn dequeued(&self) {
        self.queue.dec();
    }

    /// One module version (or CLI reference) done: its log line and its counts.
    pub(crate) fn finished(&self, module: &str, report: &Report) {
        match &report.failure {
            None => {
                tracing::info!(
                    module,
                    reference = %report.label,
                    manifests = report.manifests,
                    blobs = report.blobs,
                    fetched = report.fetched,
                    bytes = report.bytes,
                    "prewarm: module version cached"
                );
                self.versions.with_label_values(&["ok"]).inc();
            }
            Some(f) => {
                tracing::warn!(
                    module,
                    reference = %report.label,
                    reason = f.reason,
                    error = %f.message,
                    "prewarm: module version not cached"
                );
                self.versions.with_label_values(&["failed"]).inc();
                self.failures.with_label_values(&[f.reason]).inc();
            }
        }
    }
}
