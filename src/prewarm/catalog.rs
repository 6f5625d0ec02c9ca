//! Background prewarm in a serving proxy: watches the module catalog and fetches each module
//! version that appears (a channel moving to a new version, or with `versions: all` a new
//! ModuleTemplate) before Lifecycle Manager asks for it.
//!
//! A version is queued once; it is fetched again only after it failed (at the next catalog
//! change) or after it left the catalog and came back. At most `catalog.prewarm.concurrency` versions run at once, each one upstream
//! request at a time and only while clients leave half of the pool free ([`Share::Spare`]),
//! so prewarm never takes the slots client requests need. Each job takes the app current when
//! it starts, so a reload's credentials and upstreams apply.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::engine::{self, Job, Share};
use super::PrewarmMetrics;
use crate::catalog::ModuleVersion;
use crate::config::PrewarmVersions;
use crate::protocol::{Reference, Tag};
use crate::server::reload::Live;

/// How often the loop looks at the live config when nothing changed in the catalog (a reload
/// may turn prewarm on, or start a new catalog).
const CONFIG_CHECK: Duration = Duration::from_secs(2);

type Key = (String, String, String);

fn key(v: &ModuleVersion) -> Key {
    (v.host.clone(), v.repository.clone(), v.version.clone())
}

/// Starts background prewarm; it follows the live config (nothing happens while
/// `catalog.prewarm.enabled` is false). Its metric families are registered at once, so
/// `/metrics` shows them whether prewarm is on or not.
pub fn spawn(live: Arc<Live>) -> Result<tokio::task::JoinHandle<()>, prometheus::Error> {
    let metrics = PrewarmMetrics::register(&live.current().metrics.registry)?;
    Ok(tokio::spawn(run(live, metrics)))
}

async fn run(live: Arc<Live>, metrics: PrewarmMetrics) {
    // Queued, running or done; a failed version leaves it to be tried again.
    let taken: Arc<Mutex<HashSet<Key>>> = Arc::default();
    let mut slots: Option<(usize, Arc<Semaphore>)> = None;
    loop {
        let app = live.current();
        let cfg = app.config.catalog.prewarm.clone();
        let catalog = app.catalog.clone().filter(|_| cfg.enabled);
        let Some(catalog) = catalog else {
            drop(app);
            tokio::time::sleep(CONFIG_CHECK).await;
            continue;
        };
        let mut changes = catalog.changes();
        changes.mark_unchanged();
        if catalog.is_ready() {
            let sem = match &slots {
                Some((n, s)) if *n == cfg.concurrency => s.clone(),
                _ => {
                    let s = Arc::new(Semaphore::new(cfg.concurrency));
                    slots = Some((cfg.concurrency, s.clone()));
                    s
                }
            };
            let channels_only = cfg.versions == PrewarmVersions::Channels;
            let versions = catalog.module_versions(channels_only);
            // A version that left the catalog is forgotten: should it come back (its content
            // evicted meanwhile), it is fetched again.
            let current: HashSet<Key> = versions.iter().map(key).collect();
            taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|k| current.contains(k));
            for v in versions {
                let fresh = taken
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key(&v));
                if fresh {
                    metrics.queued();
                    tokio::spawn(prewarm_version(
                        live.clone(),
                        metrics.clone(),
                        sem.clone(),
                        taken.clone(),
                        v,
                    ));
                }
            }
        }
        drop(app);
        let _ = tokio::time::timeout(CONFIG_CHECK, changes.changed()).await;
    }
}

async fn prewarm_version(
    live: Arc<Live>,
    metrics: PrewarmMetrics,
    sem: Arc<Semaphore>,
    taken: Arc<Mutex<HashSet<Key>>>,
    v: ModuleVersion,
) {
    let permit = sem.acquire_owned().await;
    let app = live.current();
    metrics.dequeued();
    let Ok(_permit) = permit else {
        return;
    };
    let Some(tag) = Tag::parse(&v.version) else {
        let report = engine::Report {
            label: format!("{}:{}", v.name(), v.version),
            failure: Some(engine::Failure {
                reason: "invalid_reference",
                message: format!("version {:?} is not a tag", v.version),
            }),
            ..engine::Report::default()
        };
        // Not retried: the version string will not become a tag.
        metrics.finished(&v.module, &report);
        return;
    };
    let job = Job {
        name: v.name(),
        reference: Reference::Tag(tag),
    };
    let report = engine::run(&app, &metrics, &job, Share::Spare, &|_| {}).await;
    metrics.finished(&v.module, &report);
    if report.failure.is_some() {
        taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(&v));
    }
}
