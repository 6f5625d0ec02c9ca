//! The module catalog: which credential, if any, a module's Secrets supply for a request.
//!
//! Sources (the `files` directory, Kubernetes watches via [`kube`]) each publish their
//! whole object set of ModuleTemplates, ModuleReleaseMetas, Manifests and Secrets. Every
//! publish parses that source's objects ([`model`]), then rebuilds an immutable index over all
//! sources (repository → module → selector → Secrets → keychain) and swaps it in atomically,
//! so a request always sees one consistent snapshot.
//!
//! The rule the catalog exists for: **a module's credentials are injected only into requests
//! for that module's repositories** (its component-descriptor repository, its Manifests'
//! image specs, and with `catalog.image_credentials` the images its `ociArtifact` resources
//! name). Precedence as LM ≥ 1.3.11: the named default Secret (LM's
//! `--oci-registry-cred-secret`) for every repository under its base, module credentials
//! outside it, then the server's own fallbacks. See [`index`] for the trust rules.

pub mod kube;

mod explain;
mod files;
mod index;
mod metrics;
mod model;
mod selector;
mod versions;
mod wire;

/// The credentials API the catalog builds on.
mod creds {
    pub(crate) use crate::credentials::dockerconfig::{
        DockerConfig, DOCKER_CFG_KEY, DOCKER_CONFIG_JSON_KEY, SECRET_TYPE_DOCKERCFG,
        SECRET_TYPE_DOCKER_CONFIG_JSON,
    };
    pub(crate) use crate::credentials::keychain::{Keychain, KeychainMatch};
}

use std::collections::{BTreeMap, BTreeSet, HashSet};

pub use metrics::CatalogMetrics;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::config::{CatalogConfig, DefaultSecret};
use crate::credentials::Credential;

pub use explain::{Explanation, ModuleExplanation, Outcome};
use index::{DefaultState, Index, Verdict};
use model::Object;
pub(crate) use versions::ModuleVersion;

/// Source name of the files source.
pub const SOURCE_FILES: &str = files::SOURCE;
/// Source name of the Kubernetes source.
pub const SOURCE_KUBERNETES: &str = "kubernetes";

/// How often the files source looks for changes.
const FILES_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A registry host that a module (or the default Secret) names; the server adds it as an
/// upstream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleHost {
    /// `host[:port]`, lower case.
    pub host: String,
    /// Some object named it with `http://`. Informational: the scheme is decided per
    /// repository (see `HostSource::lookup_host`), so this never downgrades the whole host.
    pub insecure: bool,
}

/// What the catalog supplies for one upstream repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No module names the repository and the default Secret does not cover it (a module
    /// naming it without any credential selector counts as none): the server's own fallbacks
    /// apply.
    NotAModule,
    /// The credential of the module's Secrets for this repository. `Credential::Anonymous`
    /// with an empty `secret` when the selector matched Secrets but no keychain entry matches
    /// the registry (go-containerregistry semantics).
    Module {
        /// `namespace/name` of the ModuleTemplate (or Manifest).
        module: String,
        credential: Credential,
        /// `namespace/name` of the Secret whose entry was used.
        secret: String,
    },
    /// The credential of the named default Secret.
    DefaultSecret {
        credential: Credential,
        secret: String,
    },
    /// The repository belongs to a module whose credentials cannot be used; the request must
    /// fail rather than fall back to other credentials.
    Denied { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog.files: cannot read directory {path}: {source}")]
    FilesDir {
        path: String,
        source: std::io::Error,
    },
    #[error("catalog.files: {path} is not a directory")]
    NotADirectory { path: String },
    #[error("catalog.kubernetes: {0}")]
    Kubernetes(#[from] self::kube::KubeSourceError),
}

/// One source's parsed objects.
#[derive(Default)]
struct SourceSet {
    objects: Vec<Object>,
    skipped: Vec<String>,
}

struct State {
    sources: BTreeMap<String, SourceSet>,
    expected: BTreeSet<String>,
    synced: BTreeSet<String>,
    /// The default Secret's registry base from the last snapshot that had it.
    default_base: Option<index::Base>,
    /// Source tasks that run until the catalog is dropped.
    tasks: Vec<tokio::task::AbortHandle>,
}

/// The module catalog. `Send + Sync`; share it as `Arc<Catalog>`.
pub struct Catalog {
    default_secret: Option<DefaultSecret>,
    metrics: Option<CatalogMetrics>,
    options: RwLock<index::Options>,
    /// `default_upstream`: where a path on the proxy's own address that names no registry goes.
    own_upstream: RwLock<Option<String>>,
    /// Hosts that name this proxy at the start of a ModuleTemplate baseUrl.
    proxy_hosts: RwLock<Vec<String>>,
    state: Mutex<State>,
    index: RwLock<Arc<Index>>,
    ready: watch::Sender<bool>,
    /// Bumped at every index swap, for watchers of module versions (prewarm).
    changes: watch::Sender<u64>,
}

impl Catalog {
    /// Starts the configured sources and returns at once; [`Catalog::is_ready`] turns true
    /// when each has completed its first full read.
    pub async fn start(cfg: &CatalogConfig) -> Result<Arc<Catalog>, CatalogError> {
        Catalog::start_with(cfg, None, None).await
    }

    /// [`Catalog::start`] with a given Kubernetes client for `catalog.kubernetes` (else one
    /// from the kubeconfig or the in-cluster service account).
    pub async fn start_with_client(
        cfg: &CatalogConfig,
        client: Option<::kube::Client>,
    ) -> Result<Arc<Catalog>, CatalogError> {
        Catalog::start_with(cfg, client, None).await
    }

    /// [`Catalog::start_with_client`], reporting to `metrics`.
    pub async fn start_with(
        cfg: &CatalogConfig,
        client: Option<::kube::Client>,
        metrics: Option<CatalogMetrics>,
    ) -> Result<Arc<Catalog>, CatalogError> {
        let catalog = Catalog::with_metrics(cfg.default_secret.clone(), metrics);
        catalog.set_proxy_hosts(cfg.proxy_hosts.clone());
        catalog.set_own_upstream(cfg.own_upstream.clone());
        catalog.set_image_credentials(cfg.image_credentials);
        if let Some(dir) = &cfg.files {
            let path = dir.display().to_string();
            let meta = std::fs::metadata(dir).map_err(|source| CatalogError::FilesDir {
                path: path.clone(),
                source,
            })?;
            if !meta.is_dir() {
                return Err(CatalogError::NotADirectory { path });
            }
            catalog.expect_source(SOURCE_FILES);
            files::spawn(Arc::downgrade(&catalog), dir.clone(), FILES_POLL_INTERVAL);
        }
        if let Some(k8s) = &cfg.kubernetes {
            let client = match client {
                Some(c) => c,
                None => self::kube::client().await?,
            };
            catalog.expect_source(SOURCE_KUBERNETES);
            let (on_publish, on_synced) = (Arc::downgrade(&catalog), Arc::downgrade(&catalog));
            let on_error = catalog.metrics.clone();
            let task = tokio::spawn(self::kube::run(
                client,
                k8s.clone(),
                cfg.default_secret.clone(),
                move |objects| {
                    if let Some(c) = on_publish.upgrade() {
                        c.publish(SOURCE_KUBERNETES, objects);
                    }
                },
                move || {
                    if let Some(c) = on_synced.upgrade() {
                        c.mark_synced(SOURCE_KUBERNETES);
                    }
                },
                move |resource: &str| {
                    if let Some(m) = &on_error {
                        m.watch_error(resource);
                    }
                },
            ));
            let abort = task.abort_handle();
            tokio::spawn(async move {
                match task.await {
                    Ok(Ok(())) => tracing::warn!("Kubernetes catalog source ended"),
                    Ok(Err(e)) => tracing::error!(error = %e, "Kubernetes catalog source failed"),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(error = %e, "Kubernetes catalog source panicked"),
                }
            });
            catalog.lock_state().tasks.push(abort);
        }
        Ok(catalog)
    }

    /// An empty catalog fed only through [`Catalog::publish`] (tests, and the kube source).
    /// Ready at once unless sources are registered with [`Catalog::expect_source`].
    pub fn new(default_secret: Option<DefaultSecret>) -> Arc<Catalog> {
        Catalog::with_metrics(default_secret, None)
    }

    /// [`Catalog::new`], reporting to `metrics`.
    pub fn with_metrics(
        default_secret: Option<DefaultSecret>,
        metrics: Option<CatalogMetrics>,
    ) -> Arc<Catalog> {
        let index = Index::build(
            &[],
            Vec::new(),
            default_secret.as_ref(),
            None,
            index::Options::default(),
        );
        let (ready, _) = watch::channel(true);
        if let Some(m) = &metrics {
            m.indexed(0, 0, 0, 0);
            m.set_ready(true);
        }
        Arc::new(Catalog {
            default_secret,
            metrics,
            options: RwLock::new(index::Options::default()),
            own_upstream: RwLock::new(None),
            proxy_hosts: RwLock::new(Vec::new()),
            state: Mutex::new(State {
                sources: BTreeMap::new(),
                expected: BTreeSet::new(),
                synced: BTreeSet::new(),
                default_base: None,
                tasks: Vec::new(),
            }),
            index: RwLock::new(Arc::new(index)),
            ready,
            changes: watch::channel(0).0,
        })
    }

    /// Sets the hosts under which clients reach this proxy (see `catalog.proxy_hosts`); call it
    /// before publishing.
    pub fn set_proxy_hosts(&self, hosts: Vec<String>) {
        if let Ok(mut h) = self.proxy_hosts.write() {
            *h = hosts;
        }
    }

    /// Sets the upstream that paths on the proxy's own address go to when they name no registry
    /// (`default_upstream`); call it before publishing.
    pub fn set_own_upstream(&self, upstream: Option<String>) {
        if let Ok(mut u) = self.own_upstream.write() {
            *u = upstream;
        }
    }

    /// Whether `ociArtifact` images get their module's credentials (`catalog.image_credentials`);
    /// call it before publishing.
    pub fn set_image_credentials(&self, on: bool) {
        if let Ok(mut o) = self.options.write() {
            o.image_credentials = on;
        }
    }

    /// Registers a source that must [`Catalog::mark_synced`] before the catalog is ready.
    pub fn expect_source(&self, source: &str) {
        let mut st = self.lock_state();
        st.expected.insert(source.to_owned());
        self.update_ready(&st);
    }

    /// A source replaces its whole object set; the index is rebuilt and swapped. Objects of
    /// other kinds are ignored; malformed ones are skipped with a warning.
    pub fn publish(&self, source: &str, objects: Vec<Value>) {
        let mut set = SourceSet::default();
        let proxy_hosts = self
            .proxy_hosts
            .read()
            .map(|h| h.clone())
            .unwrap_or_default();
        let own_upstream = self.own_upstream.read().ok().and_then(|u| u.clone());
        for v in &objects {
            match model::parse_object(v) {
                Ok(Some(mut o)) => {
                    o.unproxy(&proxy_hosts, own_upstream.as_deref());
                    set.objects.push(o)
                }
                Ok(None) => {}
                Err(e) => {
                    let what = model::describe(v);
                    tracing::warn!(source, object = %what, error = %e, "skipping malformed catalog object");
                    set.skipped.push(format!("{what} (from {source}): {e}"));
                }
            }
        }
        let mut st = self.lock_state();
        st.sources.insert(source.to_owned(), set);
        self.rebuild(&mut st);
        if let Some(m) = &self.metrics {
            m.updated(source);
        }
    }

    /// Marks a source as having completed its first full sync.
    pub fn mark_synced(&self, source: &str) {
        let mut st = self.lock_state();
        st.synced.insert(source.to_owned());
        self.update_ready(&st);
    }

    /// All registered sources have synced.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`Catalog::is_ready`], at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// Registry hosts that modules (or the default Secret) name, sorted.
    pub fn hosts(&self) -> Vec<ModuleHost> {
        self.current().hosts.clone()
    }

    /// The credential decision for `<registry_host>/<repository>`.
    pub fn decide(&self, registry_host: &str, repository: &str) -> Decision {
        let index = self.current();
        match index.verdict(registry_host, repository) {
            Verdict::NotAModule { .. } => Decision::NotAModule,
            Verdict::Denied { message } => Decision::Denied { message },
            Verdict::Module { entry, matched } => {
                let (credential, secret) = match matched {
                    Some(m) => (m.credential, m.source),
                    None => (Credential::Anonymous, String::new()),
                };
                Decision::Module {
                    module: entry.id.to_string(),
                    credential,
                    secret,
                }
            }
            Verdict::DefaultSecret { secret, matched } => Decision::DefaultSecret {
                credential: matched.map(|m| m.credential).unwrap_or_default(),
                secret: secret.to_string(),
            },
        }
    }

    /// `Some(insecure)` when the catalog names `host`: whether `repository` on it is reached
    /// over plain HTTP (see `routing::HostSource`).
    pub fn scheme(&self, host: &str, repository: &str) -> Option<bool> {
        self.current().scheme(host, repository)
    }

    /// Everything `oci-proxy resolve` prints about `<registry_host>/<repository>`.
    pub fn explain(&self, registry_host: &str, repository: &str) -> Explanation {
        explain::explain(&self.current(), self.is_ready(), registry_host, repository)
    }

    /// Every module version the catalog names with the repository LM pulls it from; with
    /// `channels_only`, those some ModuleReleaseMeta channel (or mandatory version) points to.
    pub(crate) fn module_versions(&self, channels_only: bool) -> Vec<ModuleVersion> {
        let index = self.current();
        index
            .versions
            .iter()
            .filter(|v| v.channel || !channels_only)
            .cloned()
            .collect()
    }

    /// The module versions LM pulls from `<registry_host>/<repository>`.
    pub(crate) fn versions_of(&self, registry_host: &str, repository: &str) -> Vec<ModuleVersion> {
        let host = index::normalize_host(registry_host);
        let repository = repository.trim_matches('/');
        let index = self.current();
        index
            .versions
            .iter()
            .filter(|v| index::normalize_host(&v.host) == host && v.repository == repository)
            .cloned()
            .collect()
    }

    /// Changes whenever the index is rebuilt.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn current(&self) -> Arc<Index> {
        match self.index.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update_ready(&self, st: &State) {
        let ready = st.expected.is_subset(&st.synced);
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
        if let Some(m) = &self.metrics {
            m.set_ready(ready);
        }
    }

    /// Rebuilds the index from all sources (an object seen in several sources counts once,
    /// from the first source by name) and swaps it in. Called with the state lock held, so
    /// swaps happen in publish order.
    fn rebuild(&self, st: &mut State) {
        let mut seen = HashSet::new();
        let mut objects = Vec::new();
        let mut skipped = Vec::new();
        for set in st.sources.values() {
            for o in &set.objects {
                if seen.insert((o.kind(), o.id().clone())) {
                    objects.push(o);
                }
            }
            skipped.extend(set.skipped.iter().cloned());
        }
        let options = self.options.read().map(|o| *o).unwrap_or_default();
        let index = Index::build(
            &objects,
            skipped,
            self.default_secret.as_ref(),
            st.default_base.clone(),
            options,
        );
        if let DefaultState::Active { base, .. } = &index.default {
            st.default_base = Some(base.clone());
        }
        let mut refused = 0;
        for m in index.empty_selectors() {
            refused += 1;
            tracing::warn!(
                module = %m.describe(),
                "empty credential selector {{}} refused: it matches no Secret, and the module's repositories are denied"
            );
        }
        if let Some(m) = &self.metrics {
            m.indexed(
                index.modules.len(),
                index.secret_count,
                index.skipped.len(),
                refused,
            );
        }
        tracing::debug!(
            objects = objects.len(),
            modules = index.modules.len(),
            repositories = index.repos.len(),
            secrets = index.secret_count,
            skipped = index.skipped.len(),
            "catalog index rebuilt"
        );
        let index = Arc::new(index);
        match self.index.write() {
            Ok(mut g) => *g = index,
            Err(poisoned) => *poisoned.into_inner() = index,
        }
        self.changes.send_modify(|n| *n += 1);
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        for t in &self.lock_state().tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;
