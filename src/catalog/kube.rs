//! The Kubernetes source of the module catalog.
//!
//! This module owns the watches on the cluster: ModuleTemplates, ModuleReleaseMetas and
//! Manifests (`operator.kyma-project.io/v1beta2`, as [`DynamicObject`]s) and docker-registry
//! Secrets (core/v1, filtered by a label selector on the server and by type here), in the
//! configured namespaces (`kcp-system` by default). The named default Secret is watched on
//! its own, by name (`metadata.name` field selector) in its namespace and whatever its
//! labels: LM's own Secret, created with `kubectl create secret docker-registry`, has none.
//! Each watch feeds a kube-runtime reflector store; after every change (debounced) the
//! full current set of all kinds is handed to a `publish` callback as plain
//! Kubernetes JSON objects, the shape `kubectl get -o json` prints.
//!
//! Secret contents are passed to `publish` (the index needs them) but never logged:
//! errors are summarised without response bodies or decode details.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{DefaultSecret, KubernetesSource};

/// API group of the Kyma operator CRDs.
pub const KYMA_GROUP: &str = "operator.kyma-project.io";
/// API version of the Kyma operator CRDs that is watched.
pub const KYMA_VERSION: &str = "v1beta2";
/// Secret types that carry registry credentials; all other Secrets are dropped.
pub const DOCKER_SECRET_TYPES: [&str; 2] =
    ["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"];

/// How long changes are collected before the full set is published again.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No usable cluster configuration was found.
    #[error(
        "cannot create a Kubernetes client from the in-cluster service account \
         or a kubeconfig (KUBECONFIG or ~/.kube/config): {0}"
    )]
    Client(#[source] kube::Error),
    /// The `catalog.kubernetes` configuration cannot be used.
    #[error("invalid Kubernetes source configuration: {0}")]
    InvalidConfig(String),
}

/// Creates a client with `kube::Client::try_default()`: a kubeconfig (`KUBECONFIG`
/// or `~/.kube/config`) if present, else the in-cluster service account.
pub async fn client() -> Result<kube::Client, KubeSourceError> {
    kube::Client::try_default()
        .await
        .map_err(KubeSourceError::Client)
}

/// The `ApiResource` of ModuleTemplates (`moduletemplates`).
pub fn module_template_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(KYMA_GROUP, KYMA_VERSION, "ModuleTemplate"),
        "moduletemplates",
    )
}

/// The `ApiResource` of Manifests (`manifests`).
pub fn manifest_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(KYMA_GROUP, KYMA_VERSION, "Manifest"),
        "manifests",
    )
}

/// The `ApiResource` of ModuleReleaseMetas (`modulereleasemetas`).
pub fn module_release_meta_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(KYMA_GROUP, KYMA_VERSION, "ModuleReleaseMeta"),
        "modulereleasemetas",
    )
}

/// Whether a Secret of this `type` carries docker registry credentials.
pub fn is_docker_secret_type(secret_type: Option<&str>) -> bool {
    secret_type.is_some_and(|t| DOCKER_SECRET_TYPES.contains(&t))
}

/// Watches ModuleTemplates, ModuleReleaseMetas, Manifests (operator.kyma-project.io/v1beta2)
/// and Secrets (core/v1, filtered by `cfg.secret_label_selector`; only types
/// `kubernetes.io/dockerconfigjson` and `kubernetes.io/dockercfg` are kept) in each of
/// `cfg.namespaces` (all namespaces for an empty list), plus `default_secret` by name in its
/// namespace, with kube-runtime watchers and reflector stores.
///
/// Once every watch finished its initial list, the full set is published and `synced`
/// is called (once). After that every change is published, debounced by 200 ms, as the
/// FULL current set of objects of all three kinds (sorted by kind, namespace, name).
/// Watch errors are logged and retried with kube's default backoff; a 410 Gone re-lists.
/// A resource the server does not serve (404 on list, e.g. a missing CRD) is logged and
/// treated as an empty set; it keeps being retried, so a CRD installed later shows up.
///
/// Runs until the watches end (they normally never do); returns an error only for an
/// unusable configuration.
pub async fn run(
    client: kube::Client,
    cfg: KubernetesSource,
    default_secret: Option<DefaultSecret>,
    publish: impl Fn(Vec<Value>) + Send + Sync + 'static,
    synced: impl Fn() + Send + Sync + 'static,
    watch_failed: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), KubeSourceError> {
    let namespaces = namespaces(&cfg)?;
    let selector = cfg.secret_label_selector.trim().to_string();

    let mut stores = Stores::default();
    let mut streams: Vec<BoxStream<'static, (usize, Outcome)>> = Vec::new();
    let mut labels: Vec<WatchLabel> = Vec::new();

    for ns in &namespaces {
        for ar in [
            module_template_resource(),
            module_release_meta_resource(),
            manifest_resource(),
        ] {
            let api: Api<DynamicObject> = match ns {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            let writer = Writer::<DynamicObject>::new(ar.clone());
            stores.dynamic.push((ar.clone(), writer.as_reader()));
            let idx = labels.len();
            labels.push(WatchLabel {
                resource: ar.plural.clone(),
                namespace: ns.clone(),
            });
            let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
            streams.push(drive(idx, events, writer, |_| true));
        }

        let api: Api<Secret> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let writer = Writer::<Secret>::default();
        stores.secrets.push(writer.as_reader());
        let idx = labels.len();
        labels.push(WatchLabel {
            resource: "secrets".into(),
            namespace: ns.clone(),
        });
        let mut wc = watcher::Config::default();
        if !selector.is_empty() {
            wc = wc.labels(&selector);
        }
        let events = watcher::watcher(api, wc).default_backoff();
        streams.push(drive(idx, events, writer, |s: &Secret| {
            is_docker_secret_type(s.type_.as_deref())
        }));
    }

    if let Some(ds) = &default_secret {
        // By name, whatever its labels and whichever namespaces are watched otherwise.
        let api: Api<Secret> = Api::namespaced(client.clone(), &ds.namespace);
        let writer = Writer::<Secret>::default();
        stores.secrets.push(writer.as_reader());
        let idx = labels.len();
        labels.push(WatchLabel {
            resource: "secrets".into(),
            namespace: Some(ds.namespace.clone()),
        });
        let wc = watcher::Config::default().fields(&format!("metadata.name={}", ds.name));
        let events = watcher::watcher(api, wc).default_backoff();
        streams.push(drive(idx, events, writer, |s: &Secret| {
            is_docker_secret_type(s.type_.as_deref())
        }));
    }

    let mut events = stream::select_all(streams);
    let mut ready = vec![false; labels.len()];
    let mut all_synced = false;
    let mut publish_at: Option<Instant> = None;

    loop {
        let debounce: Pin<Box<dyn Future<Output = ()> + Send>> = match publish_at {
            Some(at) => Box::pin(tokio::time::sleep_until(at)),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            item = events.next() => {
                let Some((idx, outcome)) = item else {
                    tracing::warn!("all Kubernetes watches ended");
                    return Ok(());
                };
                let label = &labels[idx];
                let changed = match outcome {
                    Outcome::Quiet => false,
                    Outcome::Changed => true,
                    Outcome::Listed => {
                        ready[idx] = true;
                        true
                    }
                    Outcome::NotServed(summary) => {
                        if ready[idx] {
                            tracing::debug!(
                                resource = %label.resource,
                                error = %summary,
                                "resource still not served"
                            );
                        } else {
                            tracing::warn!(
                                resource = %label.resource,
                                namespace = label.namespace.as_deref().unwrap_or("*"),
                                error = %summary,
                                "resource is not served (CRD missing?), treating it as empty"
                            );
                        }
                        ready[idx] = true;
                        true
                    }
                    Outcome::Failed(summary) => {
                        watch_failed(&label.resource);
                        tracing::warn!(
                            resource = %label.resource,
                            namespace = label.namespace.as_deref().unwrap_or("*"),
                            error = %summary,
                            "Kubernetes watch failed, retrying with backoff"
                        );
                        false
                    }
                };
                if !all_synced && ready.iter().all(|r| *r) {
                    all_synced = true;
                    publish_at = None;
                    let objects = stores.snapshot();
                    tracing::info!(objects = objects.len(), "Kubernetes source synced");
                    publish(objects);
                    synced();
                } else if all_synced && changed && publish_at.is_none() {
                    publish_at = Some(Instant::now() + DEBOUNCE);
                }
            }
            () = debounce => {
                publish_at = None;
                let objects = stores.snapshot();
                tracing::debug!(objects = objects.len(), "publishing Kubernetes objects");
                publish(objects);
            }
        }
    }
}

/// `None` = all namespaces, else each configured namespace once.
fn namespaces(cfg: &KubernetesSource) -> Result<Vec<Option<String>>, KubeSourceError> {
    if cfg.namespaces.is_empty() {
        return Ok(vec![None]);
    }
    let mut seen = BTreeSet::new();
    for ns in &cfg.namespaces {
        let ns = ns.trim();
        if ns.is_empty() {
            return Err(KubeSourceError::InvalidConfig(
                "catalog.kubernetes.namespaces contains an empty name".into(),
            ));
        }
        seen.insert(ns.to_string());
    }
    Ok(seen.into_iter().map(Some).collect())
}

/// What one watch stream item meant for the published set.
#[derive(Debug)]
enum Outcome {
    /// Nothing visible changed (e.g. an object buffered during a (re-)list).
    Quiet,
    /// The store changed.
    Changed,
    /// A (re-)list completed; the store holds its result.
    Listed,
    /// The server does not serve the resource; the store was emptied.
    NotServed(String),
    /// A watch error; the watcher retries after a backoff.
    Failed(String),
}

/// Which watch an outcome belongs to (for logs).
struct WatchLabel {
    resource: String,
    namespace: Option<String>,
}

/// Applies a watcher's events to its reflector store, dropping objects `keep` rejects,
/// and reduces each event to an [`Outcome`].
fn drive<K, S>(
    idx: usize,
    events: S,
    mut writer: Writer<K>,
    keep: fn(&K) -> bool,
) -> BoxStream<'static, (usize, Outcome)>
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    events
        .map(move |item| {
            let outcome = match item {
                Ok(Event::Apply(obj)) if !keep(&obj) => {
                    // It may have been kept before (type is immutable, but be safe).
                    writer.apply_watcher_event(&Event::Delete(obj));
                    Outcome::Changed
                }
                Ok(Event::InitApply(obj)) if !keep(&obj) => Outcome::Quiet,
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    match event {
                        Event::Apply(_) | Event::Delete(_) => Outcome::Changed,
                        Event::Init | Event::InitApply(_) => Outcome::Quiet,
                        Event::InitDone => Outcome::Listed,
                    }
                }
                Err(err) if is_not_found(&err) => {
                    writer.apply_watcher_event(&Event::Init);
                    writer.apply_watcher_event(&Event::InitDone);
                    Outcome::NotServed(summarize(&err))
                }
                Err(err) => Outcome::Failed(summarize(&err)),
            };
            (idx, outcome)
        })
        .boxed()
}

fn is_not_found(err: &watcher::Error) -> bool {
    matches!(
        err,
        watcher::Error::InitialListFailed(kube::Error::Api(resp)) if resp.code == 404
    )
}

/// A log-safe description of a watcher error: status codes, reasons and server messages,
/// connection errors, but never decode details (they could quote Secret data).
fn summarize(err: &watcher::Error) -> String {
    fn client(stage: &str, err: &kube::Error) -> String {
        match err {
            kube::Error::Api(resp) => {
                format!("{stage}: {} {} ({})", resp.code, resp.reason, resp.message)
            }
            kube::Error::SerdeError(_) => format!("{stage}: response could not be decoded"),
            other => format!("{stage}: {other}"),
        }
    }
    match err {
        watcher::Error::InitialListFailed(e) => client("list", e),
        watcher::Error::WatchStartFailed(e) => client("watch start", e),
        watcher::Error::WatchFailed(e) => client("watch", e),
        watcher::Error::WatchError(resp) => format!(
            "watch event: {} {} ({})",
            resp.code, resp.reason, resp.message
        ),
        watcher::Error::NoResourceVersion => "object without metadata.resourceVersion".into(),
    }
}

/// The reflector stores of all watches.
#[derive(Default)]
struct Stores {
    dynamic: Vec<(ApiResource, Store<DynamicObject>)>,
    secrets: Vec<Store<Secret>>,
}

impl Stores {
    /// All current objects as Kubernetes JSON, sorted by (kind, namespace, name).
    fn snapshot(&self) -> Vec<Value> {
        let mut keyed: Vec<((String, String, String), Value)> = Vec::new();
        for (ar, store) in &self.dynamic {
            for obj in store.state() {
                let mut obj = DynamicObject::clone(&obj);
                if obj.types.is_none() {
                    obj.types = Some(TypeMeta {
                        api_version: ar.api_version.clone(),
                        kind: ar.kind.clone(),
                    });
                }
                push_json(&mut keyed, &ar.kind, &obj.metadata, &obj);
            }
        }
        for store in &self.secrets {
            for secret in store.state() {
                if is_docker_secret_type(secret.type_.as_deref()) {
                    push_json(
                        &mut keyed,
                        <Secret as k8s_openapi::Resource>::KIND,
                        &secret.metadata,
                        &*secret,
                    );
                }
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        // The named Secret may be in two stores (its own watch and the labelled one).
        keyed.dedup_by(|a, b| a.0 == b.0);
        keyed.into_iter().map(|(_, v)| v).collect()
    }
}

fn push_json<T: serde::Serialize>(
    out: &mut Vec<((String, String, String), Value)>,
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    obj: &T,
) {
    let key = (
        kind.to_string(),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    match serde_json::to_value(obj) {
        Ok(value) => out.push((key, value)),
        // Serializing in-memory objects does not fail in practice; never log content.
        Err(_) => tracing::warn!(
            kind,
            namespace = %key.1,
            name = %key.2,
            "object could not be serialized, skipped"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn docker_secret_types_are_kept_and_others_dropped() {
        assert!(is_docker_secret_type(Some(
            "kubernetes.io/dockerconfigjson"
        )));
        assert!(is_docker_secret_type(Some("kubernetes.io/dockercfg")));
        assert!(!is_docker_secret_type(Some("Opaque")));
        assert!(!is_docker_secret_type(None));
    }

    #[test]
    fn namespaces_default_to_kcp_system_and_are_deduplicated() {
        let mut cfg = KubernetesSource::default();
        assert_eq!(namespaces(&cfg).ok(), Some(vec![Some("kcp-system".into())]));
        cfg.namespaces = Vec::new();
        assert_eq!(namespaces(&cfg).ok(), Some(vec![None]));
        cfg.namespaces = vec!["b".into(), "a".into(), "b".into()];
        assert_eq!(
            namespaces(&cfg).ok(),
            Some(vec![Some("a".into()), Some("b".into())])
        );
        cfg.namespaces = vec![" ".into()];
        assert!(matches!(
            namespaces(&cfg),
            Err(KubeSourceError::InvalidConfig(_))
        ));
    }

    #[test]
    fn resources_have_the_kyma_plurals() {
        let mt = module_template_resource();
        assert_eq!(mt.api_version, "operator.kyma-project.io/v1beta2");
        assert_eq!(mt.plural, "moduletemplates");
        assert_eq!(manifest_resource().plural, "manifests");
        assert_eq!(module_release_meta_resource().plural, "modulereleasemetas");
    }

    #[test]
    fn decode_errors_are_summarised_without_detail() {
        let serde_err = serde_json::from_str::<Value>("{\"data\":\"c2VjcmV0").unwrap_err();
        let err = watcher::Error::WatchFailed(kube::Error::SerdeError(serde_err));
        assert_eq!(summarize(&err), "watch: response could not be decoded");
    }

    #[tokio::test]
    async fn snapshot_adds_type_meta_and_filters_secret_types() {
        let mut stores = Stores::default();
        let ar = module_template_resource();
        let mut mt_writer = Writer::<DynamicObject>::new(ar.clone());
        stores.dynamic.push((ar, mt_writer.as_reader()));
        let mut mt = DynamicObject {
            types: None,
            metadata: Default::default(),
            data: serde_json::json!({"spec": {"version": "1.0.0"}}),
        };
        mt.metadata.name = Some("mt".into());
        mt.metadata.namespace = Some("kcp-system".into());
        mt_writer.apply_watcher_event(&Event::Apply(mt));

        let mut s_writer = Writer::<Secret>::default();
        stores.secrets.push(s_writer.as_reader());
        for (name, ty) in [
            ("reg", "kubernetes.io/dockerconfigjson"),
            ("opaque", "Opaque"),
        ] {
            let mut s = Secret {
                type_: Some(ty.into()),
                ..Default::default()
            };
            s.metadata.name = Some(name.into());
            s.metadata.namespace = Some("kcp-system".into());
            s.data = Some([(".dockerconfigjson".into(), ByteString(b"{}".to_vec()))].into());
            s_writer.apply_watcher_event(&Event::Apply(s));
        }

        let snap = stores.snapshot();
        assert_eq!(snap.len(), 2, "{snap:?}");
        assert_eq!(snap[0]["kind"], "ModuleTemplate");
        assert_eq!(snap[0]["apiVersion"], "operator.kyma-project.io/v1beta2");
        assert_eq!(snap[0]["spec"]["version"], "1.0.0");
        assert_eq!(snap[1]["kind"], "Secret");
        assert_eq!(snap[1]["apiVersion"], "v1");
        assert_eq!(snap[1]["metadata"]["name"], "reg");
        assert_eq!(snap[1]["data"][".dockerconfigjson"], "e30=");
    }
}
