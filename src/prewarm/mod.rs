//! Prewarm: content fetched into the cache before anyone asks for it.
//!
//! Lifecycle Manager installs a module version by pulling its component descriptor repository
//! (`<base>/component-descriptors/<component>:<version>`: the manifest, its config and every
//! layer, which are the OCM descriptor blob and the module's local blobs). The first reconcile
//! after a release otherwise waits on the upstream; the module catalog already says which
//! versions are coming, so the proxy can fetch them first:
//! - [`catalog`]: in a serving proxy with `catalog.prewarm.enabled`, watches the catalog and
//!   fetches each module version a ModuleReleaseMeta channel points to (`versions: channels`)
//!   or every ModuleTemplate names (`versions: all`), in the background, bounded, yielding
//!   upstream slots to clients;
//! - [`cli`]: `oci-proxy prewarm --config FILE <reference>...` pulls images or module
//!   versions into the cache (local, or the S3 tier when configured) and exits;
//! - [`engine`]: one reference → manifest(s) and blobs, through exactly the path a client pull
//!   takes (routing, credential choice, read rule, verification, single flight), so a module's
//!   credentials only ever go to that module's repositories, and a client asking for a blob
//!   being prewarmed follows the same fill;
//! - [`progress`]: the CLI's display; [`metrics`]: counts and the per-version log line.
//!
//! `/readyz` never waits for prewarm.

mod catalog;
pub(crate) mod engine;
pub(crate) mod metrics;
pub(crate) mod progress;

use std::sync::Arc;

use futures_util::StreamExt;

pub(crate) use metrics::PrewarmMetrics;

use crate::config::Config;
use crate::server::{App, BuildError};
use engine::{Failure, Job, Report, Share};
use progress::Progress;

pub use catalog::spawn;

/// How long the CLI waits for the catalog's first sync before pulling anyway.
const CATALOG_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// References from a `--from-file` list: one per line; blank lines and `#` comments (whole
/// line or after the reference) are ignored.
pub fn references_from_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `oci-proxy prewarm`: pulls each reference through the configured upstreams and credentials
/// into the cache, showing progress on stdout. `Ok(true)` when every reference was cached.
pub async fn cli(config: Config, references: Vec<String>) -> Result<bool, BuildError> {
    let concurrency = config.catalog.prewarm.concurrency.max(1);
    let app = Arc::new(App::build(config).await?);
    let metrics = PrewarmMetrics::register(&app.metrics.registry)?;
    if let Some(catalog) = &app.catalog {
        if !catalog.wait_ready(CATALOG_SYNC_WAIT).await {
            tracing::warn!(
                "the catalog did not finish its first sync; module repositories may be unknown"
            );
        }
    }
    let progress = Arc::new(Progress::new(references.clone()));
    let ticker = progress.is_terminal().then(|| {
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                p.redraw();
                tokio::time::sleep(progress::REDRAW).await;
            }
        })
    });
    let reports: Vec<Report> = futures_util::stream::iter(references.into_iter().enumerate())
        .map(|(i, reference)| {
            let (app, progress, metrics) = (app.clone(), progress.clone(), metrics.clone());
            async move {
                progress.start(i);
                let report = match Job::parse(&reference) {
                    Ok(job) => {
                        let p = progress.clone();
                        engine::run(&app, &metrics, &job, Share::All, &move |n| p.bytes(n)).await
                    }
                    Err(message) => Report {
                        label: reference.clone(),
                        failure: Some(Failure {
                            reason: "invalid_reference",
                            message,
                        }),
                        ..Report::default()
                    },
                };
                metrics.finished("-", &report);
                let failed = report.failure.is_some();
                progress.finish(i, report.clone());
                (failed, report)
            }
        })
        .buffer_unordered(concurrency)
        .map(|(_, r)| r)
        .collect()
        .await;
    if let Some(t) = ticker {
        t.abort();
    }
    progress.done();
    // The S3 tier is fed after each local commit, in the background: let it finish.
    if !app.cache.settle(crate::cache::SHARED_SETTLE_WAIT).await {
        tracing::warn!("uploads to the shared cache tier still running at exit");
        return Ok(false);
    }
    Ok(reports.iter().all(|r| r.failure.is_none()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_skip_comments_and_blank_lines() {
        let refs = super::references_from_list(
            "# images for the demo\nghcr.io/org/app:v1\n\n  quay.io/x/y@sha256:00  # pinned\n#gone:1\n",
        );
        assert_eq!(refs, ["ghcr.io/org/app:v1", "quay.io/x/y@sha256:00"]);
    }
}
