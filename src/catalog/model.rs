//! The Kubernetes objects the catalog understands, parsed from JSON as `kubectl get -o json`
//! gives them (YAML documents are converted to JSON first; the Kubernetes source hands over
//! the same shape): ModuleTemplates (`operator.kyma-project.io` v1beta2, tolerating
//! v1beta1/v1alpha1), ModuleReleaseMetas, Manifests, and pull Secrets
//! (`kubernetes.io/dockerconfigjson`, legacy `kubernetes.io/dockercfg`).
//!
//! Objects are deserialized into typed shapes ([`super::wire`] for the CRDs, `k8s-openapi`'s
//! `Secret` read by the credentials' own [`DockerConfig::from_kubernetes_secret`]), and this
//! module turns them into the catalog's model. Every Lifecycle Manager era must parse:
//! label-era templates with a full descriptor, and current ones (`modulectl` writes
//! `descriptor: {}` or none, and puts `moduleName`, `version`, `info`, `manager`, ... beside
//! it; the OCM component name moves to the ModuleReleaseMeta). The shapes are lenient about
//! unknown and malformed fields; the checks here are strict about what decides credentials: a
//! descriptor that is there but has no usable repository context is an error (the caller
//! skips the object), and a bad `oci-registry-cred` label becomes [`SelectorSpec::Invalid`] so
//! the module is denied rather than silently served with someone else's credentials. Errors
//! never quote a value.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret as K8sSecret;
use k8s_openapi::ByteString;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::creds::{
    DockerConfig, DOCKER_CFG_KEY, DOCKER_CONFIG_JSON_KEY, SECRET_TYPE_DOCKERCFG,
    SECRET_TYPE_DOCKER_CONFIG_JSON,
};
use super::selector::Selector;
use super::wire::{
    Access, Descriptor, Field, Head, Kyma, Label, ManifestSpec, Metadata, ReleaseMetaSpec,
    RepositoryContext, Resource, TemplateSpec,
};
use crate::protocol::grammar::names_registry_host;

/// The descriptor label holding a module's credential selector.
pub(super) const OCI_REGISTRY_CRED_LABEL: &str = "oci-registry-cred";
/// The API group of ModuleTemplates and Manifests.
pub(super) const KYMA_GROUP: &str = "operator.kyma-project.io";
/// OCM's namespace for component descriptors inside a registry base.
pub(super) const COMPONENT_DESCRIPTORS: &str = "component-descriptors";

/// Namespace and name of an object; shown as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an object could not be used. Never contains Secret content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum ModelError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field,
        message: message.into(),
    }
}

/// A registry location: host (`host[:port]`, lower case) and repository path below it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct RepoLocation {
    pub host: String,
    pub repository: String,
    /// The location was written with `http://`: the upstream speaks plain HTTP.
    pub insecure: bool,
}

impl RepoLocation {
    /// A location on this proxy's own address, as clients reach it through the proxy, becomes
    /// the upstream location the proxy routes it to, by the rules every client request
    /// follows: `<proxy host>/<registry>/<path>` (an operator's ModuleTemplate `baseUrl`
    /// through the proxy) is `<registry>/<path>` when `<registry>` is a registry host by the
    /// client rules (see [`names_registry_host`]); any other path (LM ≥ 1.8's
    /// Manifest `repo: <proxy>/modules`) is on `own_upstream` (`default_upstream`). The
    /// upstream's own config decides its scheme. `false` when the location names nothing the
    /// proxy can route (no default upstream): it must be dropped, never turned into a host.
    pub(super) fn unproxy(&mut self, proxy_hosts: &[String], own_upstream: Option<&str>) -> bool {
        if !proxy_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&self.host))
        {
            return true;
        }
        if let Some((registry, rest)) = self.repository.split_once('/') {
            if names_registry_host(registry) && !rest.is_empty() {
                self.host = registry.to_ascii_lowercase();
                self.repository = rest.to_owned();
                self.insecure = false;
                return true;
            }
        }
        match own_upstream {
            Some(u) => {
                self.host = u.to_ascii_lowercase();
                self.insecure = false;
                true
            }
            None => false,
        }
    }
}

impl fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)
    }
}

/// A module's credential selector, and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SelectorSpec {
    /// No selector: the module brings no credentials of its own.
    None,
    Valid {
        selector: Selector,
        origin: String,
    },
    /// A selector that cannot be used; requests for the module's repositories are denied.
    Invalid {
        message: String,
        origin: String,
    },
}

impl SelectorSpec {
    pub(super) fn is_some(&self) -> bool {
        !matches!(self, SelectorSpec::None)
    }
}

/// A local blob layer of the component (stored in the descriptor repository).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LocalBlob {
    pub resource: String,
    pub access_type: String,
    /// `localOciBlob.digest` or `localBlob.localReference`.
    pub digest: String,
    pub media_type: Option<String>,
}

/// An image named by an `ociArtifact`/`ociImage` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ModuleImage {
    pub resource: String,
    pub location: RepoLocation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ModuleTemplate {
    pub id: ObjectRef,
    pub api_version: String,
    /// `spec.moduleName` (current templates), e.g. `template-operator`.
    pub module_name: Option<String>,
    /// OCM component name from the embedded descriptor, e.g.
    /// `kyma-project.io/module/template-operator`; `None` for a current template, whose
    /// component name is in its ModuleReleaseMeta.
    pub component: Option<String>,
    /// `spec.version`, else the descriptor's version.
    pub version: Option<String>,
    /// `<baseUrl>[/<subPath>]/component-descriptors/<component>` from the last repository
    /// context of the embedded descriptor; `None` without one (LM ≥ 1.8 reads it from the
    /// registry under the named Secret's base).
    pub descriptor_repository: Option<RepoLocation>,
    pub selector: SelectorSpec,
    pub local_blobs: Vec<LocalBlob>,
    pub images: Vec<ModuleImage>,
}

/// A ModuleReleaseMeta (LM ≥ 1.8): which OCM component a module is, and which versions its
/// channels carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ModuleReleaseMeta {
    pub id: ObjectRef,
    pub module_name: Option<String>,
    pub ocm_component_name: Option<String>,
    /// `(channel, version)` pairs.
    pub channels: Vec<(String, String)>,
    /// `spec.mandatory.version`.
    pub mandatory_version: Option<String>,
    pub beta: bool,
    pub internal: bool,
}

impl ModuleReleaseMeta {
    /// Every version it assigns (channels, mandatory), sorted and deduplicated.
    pub(super) fn versions(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .channels
            .iter()
            .map(|(_, v)| v.clone())
            .chain(self.mandatory_version.clone())
            .filter(|v| !v.is_empty())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// One `credSecretSelector`-bearing image spec of a Manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ManifestSource {
    /// `spec.install.source` or `spec.config`.
    pub field: &'static str,
    pub location: RepoLocation,
    pub reference: Option<String>,
    pub selector: SelectorSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Manifest {
    pub id: ObjectRef,
    pub sources: Vec<ManifestSource>,
}

/// A Secret as the keychain sees it.
pub(super) struct PullSecret {
    pub id: ObjectRef,
    pub labels: BTreeMap<String, String>,
    pub secret_type: String,
    /// The registry credentials, for the two pull-secret types; `None` for any other type.
    pub config: Option<DockerConfig>,
}

impl fmt::Debug for PullSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullSecret")
            .field("id", &self.id)
            .field("labels", &self.labels)
            .field("secret_type", &self.secret_type)
            .field(
                "registries",
                &self
                    .config
                    .as_ref()
                    .map(|c| c.auths.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// A parsed catalog object.
#[derive(Debug)]
pub(super) enum Object {
    ModuleTemplate(ModuleTemplate),
    ModuleReleaseMeta(ModuleReleaseMeta),
    Manifest(Manifest),
    Secret(PullSecret),
}

impl Object {
    /// Rewrites every location that names the proxy itself, dropping those that name nothing
    /// routable; see [`RepoLocation::unproxy`].
    pub(super) fn unproxy(&mut self, proxy_hosts: &[String], own_upstream: Option<&str>) {
        if proxy_hosts.is_empty() {
            return;
        }
        match self {
            Object::ModuleTemplate(m) => {
                if let Some(d) = &mut m.descriptor_repository {
                    if !d.unproxy(proxy_hosts, own_upstream) {
                        m.descriptor_repository = None;
                    }
                }
                m.images
                    .retain_mut(|i| i.location.unproxy(proxy_hosts, own_upstream));
            }
            Object::Manifest(m) => {
                m.sources
                    .retain_mut(|s| s.location.unproxy(proxy_hosts, own_upstream));
            }
            Object::ModuleReleaseMeta(_) | Object::Secret(_) => {}
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Object::ModuleTemplate(_) => "ModuleTemplate",
            Object::ModuleReleaseMeta(_) => "ModuleReleaseMeta",
            Object::Manifest(_) => "Manifest",
            Object::Secret(_) => "Secret",
        }
    }

    pub(super) fn id(&self) -> &ObjectRef {
        match self {
            Object::ModuleTemplate(m) => &m.id,
            Object::ModuleReleaseMeta(m) => &m.id,
            Object::Manifest(m) => &m.id,
            Object::Secret(s) => &s.id,
        }
    }
}

/// `Kind namespace/name` of a raw object, for warnings about objects that do not parse.
pub(super) fn describe(v: &Value) -> String {
    let head = Head::deserialize(v).unwrap_or_default();
    let meta = head.metadata.ok().unwrap_or_default();
    format!(
        "{} {}/{}",
        head.kind.as_str().unwrap_or("object"),
        meta.namespace.as_str().unwrap_or("default"),
        meta.name.as_str().unwrap_or("<unnamed>")
    )
}

/// Parses one object. `Ok(None)` for kinds the catalog ignores.
pub(super) fn parse_object(v: &Value) -> Result<Option<Object>, ModelError> {
    // Not an object at all: nothing the catalog reads.
    let head = Head::deserialize(v).unwrap_or_default();
    let kind = head.kind.as_str().unwrap_or_default();
    let api_version = head.api_version.as_str().unwrap_or_default();
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    match (kind, group) {
        ("ModuleTemplate", KYMA_GROUP) => {
            parse_module_template(v, api_version).map(|m| Some(Object::ModuleTemplate(m)))
        }
        ("ModuleReleaseMeta", KYMA_GROUP) => {
            parse_module_release_meta(v).map(|m| Some(Object::ModuleReleaseMeta(m)))
        }
        ("Manifest", KYMA_GROUP) => parse_manifest(v).map(|m| Some(Object::Manifest(m))),
        ("Secret", "") => {
            parse_secret(v, head.metadata.as_ref().ok()).map(|s| Some(Object::Secret(s)))
        }
        _ => Ok(None),
    }
}

/// A Kyma object's typed form. Its metadata and everything outside `spec` cannot fail; a
/// `spec` of the wrong shape is an error that names no value.
fn kyma<S: DeserializeOwned>(v: &Value) -> Result<Kyma<S>, ModelError> {
    Kyma::deserialize(v).map_err(|e| invalid("spec", without_content(&e)))
}

fn object_ref(
    meta: Option<&Metadata>,
    fallback_name: Option<&str>,
) -> Result<ObjectRef, ModelError> {
    let name = meta
        .and_then(|m| m.name.non_empty())
        .or(fallback_name)
        .ok_or(ModelError::Missing("metadata.name"))?;
    let namespace = meta
        .and_then(|m| m.namespace.non_empty())
        .unwrap_or("default");
    Ok(ObjectRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// `http(s)://host/path` → (host lower-cased, path without slashes at either end, insecure).
pub(super) fn split_location(url: &str) -> Result<(String, String, bool), String> {
    let url = url.trim();
    let (rest, insecure) = if let Some(r) = url.strip_prefix("http://") {
        (r, true)
    } else {
        (url.strip_prefix("https://").unwrap_or(url), false)
    };
    let rest = rest.trim_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !names_registry_host(host) {
        return Err(format!("{host:?} is not a registry host"));
    }
    Ok((
        host.to_ascii_lowercase(),
        path.trim_matches('/').to_owned(),
        insecure,
    ))
}

pub(super) fn join_path(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

fn access_type_is(t: &str, names: &[&str]) -> bool {
    let base = t.strip_suffix("/v1").unwrap_or(t);
    names.iter().any(|n| base.eq_ignore_ascii_case(n))
}

/// The value of the first label called `name`; `null` when it has none.
fn find_label<'a>(labels: &'a Field<Vec<Field<Label>>>, name: &str) -> Option<&'a Value> {
    let Field::Valid(labels) = labels else {
        return None;
    };
    labels
        .iter()
        .filter_map(|l| match l {
            Field::Valid(l) => Some(l),
            _ => None,
        })
        .find(|l| l.name.as_str() == Some(name))
        .map(|l| &l.value)
}

fn selector_from_label(value: &Value, origin: String) -> SelectorSpec {
    match Selector::from_label_value(value) {
        Ok(selector) => SelectorSpec::Valid { selector, origin },
        Err(e) => SelectorSpec::Invalid {
            message: e.to_string(),
            origin,
        },
    }
}

/// The parts of a component descriptor the catalog reads, whichever OCM version wrote it.
struct ComponentView<'a> {
    name: Option<&'a str>,
    version: Option<&'a str>,
    labels: &'a Field<Vec<Field<Label>>>,
    repository_contexts: &'a Field<Vec<Field<RepositoryContext>>>,
    resources: &'a Field<Vec<Field<Resource>>>,
}

static NO_RESOURCES: Field<Vec<Field<Resource>>> = Field::Absent;

impl Descriptor {
    /// A descriptor that names a component (v2 `component` or v3alpha1 `metadata`), written
    /// in any shape: `descriptor: {}` (modulectl since 2025-10) names none.
    fn names_component(&self) -> bool {
        self.component.is_present() || self.metadata.is_present()
    }

    fn view(&self) -> Option<ComponentView<'_>> {
        if let Field::Valid(c) = &self.component {
            return Some(ComponentView {
                name: c.name.as_str(),
                version: c.version.as_str(),
                labels: &c.labels,
                repository_contexts: &c.repository_contexts,
                resources: &c.resources,
            });
        }
        let Field::Valid(meta) = &self.metadata else {
            return None;
        };
        Some(ComponentView {
            name: meta.name.as_str(),
            version: meta.version.as_str(),
            labels: &meta.labels,
            repository_contexts: &self.repository_contexts,
            resources: match &self.spec {
                Field::Valid(s) => &s.resources,
                _ => &NO_RESOURCES,
            },
        })
    }
}

fn parse_module_template(v: &Value, api_version: &str) -> Result<ModuleTemplate, ModelError> {
    let object: Kyma<TemplateSpec> = kyma(v)?;
    let id = object_ref(object.metadata.as_ref().ok(), None)?;
    let api_version = api_version.to_owned();
    let spec = object.spec.ok_or(ModelError::Missing("spec"))?;
    let module_name = spec.module_name.filter(|n| !n.is_empty());
    let top_version = spec.version.filter(|n| !n.is_empty());
    // `descriptor: {}` or none: a current template. Only a descriptor that has a component is
    // read, and then strictly.
    let Some(descriptor) = spec.descriptor.0.filter(Descriptor::names_component) else {
        return Ok(ModuleTemplate {
            id,
            api_version,
            module_name,
            component: None,
            version: top_version,
            descriptor_repository: None,
            selector: SelectorSpec::None,
            local_blobs: Vec::new(),
            images: Vec::new(),
        });
    };
    let c = descriptor
        .view()
        .ok_or(ModelError::Missing("spec.descriptor.component"))?;
    let component = c
        .name
        .filter(|n| !n.is_empty())
        .ok_or(ModelError::Missing("spec.descriptor.component.name"))?
        .to_owned();

    // OCM's effective repository context is the last one.
    let ctx = match c.repository_contexts {
        Field::Valid(contexts) => contexts.last(),
        _ => None,
    }
    .ok_or(ModelError::Missing(
        "spec.descriptor.component.repositoryContexts",
    ))?;
    let default_ctx = RepositoryContext::default();
    let ctx = match ctx {
        Field::Valid(ctx) => ctx,
        Field::Absent | Field::Malformed => &default_ctx,
    };
    const CTX: &str = "spec.descriptor.component.repositoryContexts[-1]";
    let ctx_type = ctx.type_.as_str().unwrap_or("OCIRegistry");
    if !access_type_is(ctx_type, &["OCIRegistry"]) {
        return Err(invalid(CTX, format!("unsupported type {ctx_type:?}")));
    }
    let mapping = ctx.component_name_mapping.as_str().unwrap_or("urlPath");
    if mapping != "urlPath" {
        return Err(invalid(
            CTX,
            format!("unsupported componentNameMapping {mapping:?}"),
        ));
    }
    let base_url = ctx.base_url.as_str().ok_or(ModelError::Missing(
        "spec.descriptor.component.repositoryContexts[-1].baseUrl",
    ))?;
    let (host, base_path, insecure) = split_location(base_url).map_err(|m| invalid(CTX, m))?;
    let sub_path = ctx.sub_path.as_str().unwrap_or("");
    let descriptor_repository = RepoLocation {
        host,
        repository: join_path(&[&base_path, sub_path, COMPONENT_DESCRIPTORS, &component]),
        insecure,
    };

    let mut local_blobs = Vec::new();
    let mut images = Vec::new();
    let mut resource_selector: Option<(bool, SelectorSpec)> = None;
    let resources = match c.resources {
        Field::Valid(r) => r.as_slice(),
        _ => &[],
    };
    let default_resource = Resource::default();
    let default_access = Access::default();
    for r in resources {
        let r = match r {
            Field::Valid(r) => r,
            Field::Absent | Field::Malformed => &default_resource,
        };
        let name = r.name.as_str().unwrap_or("<unnamed>");
        let access = match &r.access {
            Field::Valid(a) => a,
            Field::Absent | Field::Malformed => &default_access,
        };
        let atype = access.type_.as_str().unwrap_or("");
        if access_type_is(atype, &["localOciBlob", "localBlob"]) {
            let digest = access
                .digest
                .as_str()
                .or_else(|| access.local_reference.as_str())
                .unwrap_or("");
            local_blobs.push(LocalBlob {
                resource: name.to_owned(),
                access_type: atype.to_owned(),
                digest: digest.to_owned(),
                media_type: access.media_type.as_str().map(str::to_owned),
            });
            if let Some(value) = find_label(&r.labels, OCI_REGISTRY_CRED_LABEL) {
                let spec = selector_from_label(
                    value,
                    format!("label {OCI_REGISTRY_CRED_LABEL} of resource {name}"),
                );
                // KLM takes the install (raw-manifest) layer's selector; else the first one.
                let is_install = name == "raw-manifest";
                match &resource_selector {
                    Some((true, _)) => {}
                    Some((false, prev)) if !is_install => {
                        if !same_selector(prev, &spec) {
                            tracing::warn!(module = %id, resource = name, "resources carry different credential selectors; using the first");
                        }
                    }
                    _ => resource_selector = Some((is_install, spec)),
                }
            }
        } else if access_type_is(atype, &["ociArtifact", "ociImage", "ociRegistry"]) {
            if let Some(image) = access.image_reference.as_str() {
                match image_location(image) {
                    Ok(location) => images.push(ModuleImage {
                        resource: name.to_owned(),
                        location,
                    }),
                    Err(m) => {
                        tracing::warn!(module = %id, resource = name, error = %m, "ignoring unparsable imageReference")
                    }
                }
            }
        }
    }
    let selector = match resource_selector {
        Some((_, s)) => s,
        None => match find_label(c.labels, OCI_REGISTRY_CRED_LABEL) {
            Some(value) => {
                selector_from_label(value, format!("component label {OCI_REGISTRY_CRED_LABEL}"))
            }
            None => SelectorSpec::None,
        },
    };
    Ok(ModuleTemplate {
        id,
        api_version,
        module_name,
        component: Some(component),
        version: top_version.or_else(|| c.version.map(str::to_owned)),
        descriptor_repository: Some(descriptor_repository),
        selector,
        local_blobs,
        images,
    })
}

/// A serde error's category and position, without the offending value (which could be
/// anything an object's author wrote).
fn without_content(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => "a field has the wrong type".to_owned(),
        _ => "not an object".to_owned(),
    }
}

fn parse_module_release_meta(v: &Value) -> Result<ModuleReleaseMeta, ModelError> {
    let object: Kyma<ReleaseMetaSpec> = kyma(v)?;
    let id = object_ref(object.metadata.as_ref().ok(), None)?;
    let spec = object.spec.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    Ok(ModuleReleaseMeta {
        id,
        module_name: non_empty(spec.module_name),
        ocm_component_name: non_empty(spec.ocm_component_name)
            .map(|c| c.trim_matches('/').to_owned()),
        channels: spec
            .channels
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.channel.unwrap_or_default(), c.version.unwrap_or_default()))
            .collect(),
        mandatory_version: non_empty(spec.mandatory.and_then(|m| m.version)),
        beta: spec.beta.unwrap_or(false),
        internal: spec.internal.unwrap_or(false),
    })
}

fn same_selector(a: &SelectorSpec, b: &SelectorSpec) -> bool {
    match (a, b) {
        (SelectorSpec::Valid { selector: x, .. }, SelectorSpec::Valid { selector: y, .. }) => {
            x == y
        }
        (SelectorSpec::Invalid { message: x, .. }, SelectorSpec::Invalid { message: y, .. }) => {
            x == y
        }
        _ => false,
    }
}

/// `host/repo[:tag][@digest]` → location with tag and digest stripped. A reference without a
/// registry host is on Docker Hub (`library/` added to one-segment names).
pub(super) fn image_location(reference: &str) -> Result<RepoLocation, String> {
    let without_digest = reference
        .split_once('@')
        .map(|(r, _)| r)
        .unwrap_or(reference);
    let without_tag = match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    };
    let (first, rest) = without_tag.split_once('/').unwrap_or(("", without_tag));
    let is_host = first.contains('.') || first.contains(':') || first == "localhost";
    let (host, repository) = if is_host {
        (first.to_ascii_lowercase(), rest.to_owned())
    } else if first.is_empty() {
        ("docker.io".to_owned(), format!("library/{rest}"))
    } else {
        ("docker.io".to_owned(), without_tag.to_owned())
    };
    if crate::protocol::grammar::Repository::parse(&repository).is_err() {
        return Err(format!("{repository:?} is not a repository name"));
    }
    Ok(RepoLocation {
        host,
        repository,
        insecure: false,
    })
}

fn parse_manifest(v: &Value) -> Result<Manifest, ModelError> {
    let object: Kyma<ManifestSpec> = kyma(v)?;
    let meta = object.metadata.as_ref().ok();
    let annotation = |key: &str| {
        meta.and_then(|m| match &m.annotations {
            Field::Valid(a) => a.get(key).and_then(Field::as_str),
            _ => None,
        })
    };
    let fallback = annotation("operator.kyma-project.io/ocm-component-name")
        .or_else(|| annotation("operator.kyma-project.io/fqdn"));
    let id = object_ref(meta, fallback)?;
    let spec = object.spec.ok_or(ModelError::Missing("spec"))?;
    let install = spec.install.ok().and_then(|i| i.source.0);
    let mut sources = Vec::new();
    for (field, src) in [
        ("spec.install.source", install),
        ("spec.config", spec.config.0),
    ] {
        let Some(src) = src else { continue };
        let (Some(repo), Some(name)) = (src.repo.as_str(), src.name.as_str()) else {
            continue;
        };
        let (host, path, insecure) = split_location(repo).map_err(|m| invalid(field, m))?;
        let selector = match &src.cred_secret_selector {
            Value::Null => SelectorSpec::None,
            sel => match Selector::from_label_selector(sel) {
                Ok(selector) => SelectorSpec::Valid {
                    selector,
                    origin: format!("{field}.credSecretSelector"),
                },
                Err(e) => SelectorSpec::Invalid {
                    message: e.to_string(),
                    origin: format!("{field}.credSecretSelector"),
                },
            },
        };
        // LM ≤ 1.7 wrote `repo` ending in `/component-descriptors`; LM ≥ 1.8 writes the
        // registry base and pulls `<repo>/component-descriptors/<name>`.
        let repository = if path.rsplit('/').next() == Some(COMPONENT_DESCRIPTORS) {
            join_path(&[&path, name])
        } else {
            join_path(&[&path, COMPONENT_DESCRIPTORS, name])
        };
        sources.push(ManifestSource {
            field,
            location: RepoLocation {
                host,
                repository,
                insecure,
            },
            reference: src.reference.as_str().map(str::to_owned),
            selector,
        });
    }
    Ok(Manifest { id, sources })
}

/// A Secret through `k8s-openapi`'s type and the credentials' own parser
/// ([`DockerConfig::from_kubernetes_secret`]). Before it is typed, the Secret is cut down to
/// the one key its type carries registry credentials in (nothing else of it is kept), and that
/// key's base64 is decoded here: leniently about whitespace (files wrap long lines), and with
/// an error that names the key, never the content.
fn parse_secret(v: &Value, meta: Option<&Metadata>) -> Result<PullSecret, ModelError> {
    let id = object_ref(meta, None)?;
    let head = SecretHead::deserialize(v).unwrap_or_default();
    let secret_type = head.type_.ok().unwrap_or_else(|| "Opaque".to_owned());
    let key = match secret_type.as_str() {
        SECRET_TYPE_DOCKER_CONFIG_JSON => Some(DOCKER_CONFIG_JSON_KEY),
        SECRET_TYPE_DOCKERCFG => Some(DOCKER_CFG_KEY),
        _ => None,
    };
    let (mut data, mut string_data) = (None, None);
    if let Some(key) = key {
        // `stringData` (plain) wins over `data` (base64), as the API server merges them.
        match (head.string_data.get(key), head.data.get(key)) {
            (Some(Field::Valid(plain)), _) => {
                string_data = Some(BTreeMap::from([(key.to_owned(), plain.clone())]));
            }
            (_, Some(Field::Valid(b64))) => {
                let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(cleaned)
                    .map_err(|_| invalid("data", format!("{key} is not valid base64")))?;
                data = Some(BTreeMap::from([(key.to_owned(), ByteString(bytes))]));
            }
            (_, Some(Field::Malformed)) => {
                return Err(invalid("data", format!("{key} is not a string")));
            }
            _ => {}
        }
    }
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("data");
        m.remove("stringData");
    }
    let mut secret =
        K8sSecret::deserialize(&v).map_err(|e| invalid("metadata", without_content(&e)))?;
    secret.data = data;
    secret.string_data = string_data;
    let config = DockerConfig::from_kubernetes_secret(&secret)
        .map_err(|e| invalid("data", format!("{}: {e}", key.unwrap_or_default())))?;
    Ok(PullSecret {
        id,
        labels: secret.metadata.labels.unwrap_or_default(),
        secret_type,
        config,
    })
}

/// What [`parse_secret`] reads before the Secret is typed.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct SecretHead {
    #[serde(rename = "type")]
    type_: Field<String>,
    data: BTreeMap<String, Field<String>>,
    string_data: BTreeMap<String, Field<String>>,
}

#[cfg(test)]
mod unproxy_tests {
    use super::*;

    #[test]
    fn locations_through_the_proxy_name_the_upstream() {
        let hosts = vec!["localhost:5000".to_string()];
        let mut l = RepoLocation {
            host: "localhost:5000".into(),
            repository: "reg.example.com/mods/component-descriptors/c".into(),
            insecure: true,
        };
        assert!(l.unproxy(&hosts, None));
        assert_eq!(l.host, "reg.example.com");
        assert_eq!(l.repository, "mods/component-descriptors/c");
        assert!(!l.insecure);
        let mut other = RepoLocation {
            host: "reg.example.com".into(),
            repository: "mods/x".into(),
            insecure: false,
        };
        let before = other.clone();
        assert!(other.unproxy(&hosts, None));
        assert_eq!(other, before);
        // LM ≥ 1.8 writes `repo: <proxy>/modules`: `modules` is a path on the default
        // upstream, never a registry host; without a default upstream it names nothing.
        let lm = RepoLocation {
            host: "localhost:5000".into(),
            repository: "modules/component-descriptors/kyma-project.io/module/x".into(),
            insecure: true,
        };
        let mut l = lm.clone();
        assert!(l.unproxy(&hosts, Some("Private.Registry.Test")));
        assert_eq!(l.host, "private.registry.test");
        assert_eq!(l.repository, lm.repository);
        assert!(!l.insecure);
        assert!(!lm.clone().unproxy(&hosts, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::catalog::tests::sample;

    fn module(v: &Value) -> ModuleTemplate {
        match parse_object(v).unwrap() {
            Some(Object::ModuleTemplate(m)) => m,
            other => panic!("not a ModuleTemplate: {other:?}"),
        }
    }

    #[test]
    fn label_era_module_template() {
        let m = module(&sample("moduletemplate-oci-registry-cred-label.yaml"));
        assert_eq!(m.id.to_string(), "default/moduletemplate-template-operator");
        assert_eq!(
            m.component.as_deref().unwrap(),
            "kyma-project.io/module/template-operator"
        );
        assert_eq!(m.version.as_deref(), Some("v1.6.0"));
        assert_eq!(
            m.descriptor_repository.as_ref().unwrap().host,
            "europe-west3-docker.pkg.dev"
        );
        assert_eq!(
            m.descriptor_repository.as_ref().unwrap().repository,
            "sap-kyma-jellyfish-dev/template-operator/component-descriptors/kyma-project.io/module/template-operator"
        );
        assert!(!m.descriptor_repository.as_ref().unwrap().insecure);
        let SelectorSpec::Valid { selector, origin } = &m.selector else {
            panic!("{:?}", m.selector)
        };
        assert_eq!(
            selector.to_string(),
            "operator.kyma-project.io/oci-registry-cred=operator-regcred"
        );
        assert_eq!(origin, "label oci-registry-cred of resource raw-manifest");
        let digests: Vec<_> = m
            .local_blobs
            .iter()
            .map(|b| (b.resource.as_str(), b.digest.as_str()))
            .collect();
        assert_eq!(
            digests,
            [
                (
                    "config",
                    "sha256:db86408caca4c94250d8291aa79655b84146f9cc45e0da49f05a52b3722d74a0"
                ),
                (
                    "raw-manifest",
                    "sha256:8f01a545b7f53f91dd9f0bb7b74b30dfa2e571dae8d38fd0f56af66f809378fd"
                ),
            ]
        );
        assert!(m.images.is_empty());
    }

    #[test]
    fn current_module_template_uses_last_context_and_images() {
        let m = module(&sample("moduletemplate-transferred-current.yaml"));
        assert_eq!(m.id.to_string(), "kcp-system/template-operator-1.0.5");
        assert_eq!(
            m.descriptor_repository.as_ref().unwrap().to_string(),
            "europe-west3-docker.pkg.dev/sap-kyma-jellyfish-dev/restricted-market/component-descriptors/kyma-project.io/module/template-operator"
        );
        assert_eq!(m.selector, SelectorSpec::None);
        let blobs: Vec<_> = m.local_blobs.iter().map(|b| b.digest.as_str()).collect();
        assert_eq!(
            blobs,
            [
                "sha256:6c84d645777c6bc22c319c5220a429f92b323d3a9496c00956f07ee23d12e2ab",
                "sha256:e7560ba17168c3ea1f8ad00039d8899aefb2de9f42464b1cc722d5a76bc36698",
                "sha256:40e5276a429d2603aac0c9df64dc6517634421e0d2eb4f0bc69ad778280912d3",
            ]
        );
        assert_eq!(
            m.local_blobs[0].media_type.as_deref(),
            Some("application/x-tar")
        );
        let images: Vec<_> = m.images.iter().map(|i| i.location.to_string()).collect();
        assert_eq!(
            images,
            [
                "europe-west3-docker.pkg.dev/sap-kyma-jellyfish-dev/restricted-market/kyma-project/prod/keda-manager",
                "europe-west3-docker.pkg.dev/sap-kyma-jellyfish-dev/restricted-market/kyma-project/prod/telemetry-manager",
                "europe-west3-docker.pkg.dev/sap-kyma-jellyfish-dev/restricted-market/kyma-project/prod/template-operator",
            ]
        );
    }

    #[test]
    fn manifest_sample() {
        let Some(Object::Manifest(m)) =
            parse_object(&sample("manifest-private-registry-cred-selector.yaml")).unwrap()
        else {
            panic!("not a Manifest")
        };
        assert_eq!(
            m.id.to_string(),
            "default/kyma-project.io/template-operator"
        );
        assert_eq!(m.sources.len(), 2);
        let install = &m.sources[0];
        assert_eq!(install.field, "spec.install.source");
        assert_eq!(install.location.host, "github.com");
        assert_eq!(
            install.location.repository,
            "kyma-project/template-operator/component-descriptors/kyma-project.io/template-operator"
        );
        assert_eq!(
            install.reference.as_deref(),
            Some("sha256:8f01a545b7f53f91dd9f0bb7b74b30dfa2e571dae8d38fd0f56af66f809378fd")
        );
        let SelectorSpec::Valid { selector, .. } = &install.selector else {
            panic!()
        };
        assert_eq!(
            selector.to_string(),
            "operator.kyma-project.io/oci-registry-cred=test-operator"
        );
        assert_eq!(m.sources[1].field, "spec.config");
    }

    #[test]
    fn secret_sample() {
        let Some(Object::Secret(s)) =
            parse_object(&sample("secret-oci-registry-cred-labeled.yaml")).unwrap()
        else {
            panic!("not a Secret")
        };
        assert_eq!(s.id.to_string(), "default/oci-registry-cred");
        assert_eq!(
            s.labels["operator.kyma-project.io/oci-registry-cred"],
            "test-operator"
        );
        let cfg = s.config.as_ref().unwrap();
        assert_eq!(cfg.auths.keys().collect::<Vec<_>>(), ["test.registry.io"]);
        assert_eq!(cfg.auths["test.registry.io"].credential().kind(), "basic");
        assert!(!format!("{s:?}").contains("test_pass"));
    }

    #[test]
    fn secret_string_data_dockercfg_and_other_types() {
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a", "namespace": "ns"},
            "type": "kubernetes.io/dockercfg",
            "stringData": {".dockercfg": "{\"r.io\":{\"username\":\"u\",\"password\":\"p\"}}"}});
        let Some(Object::Secret(s)) = parse_object(&s).unwrap() else {
            panic!()
        };
        assert!(s.config.unwrap().auths.contains_key("r.io"));
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}, "type": "Opaque",
            "data": {"x": "eA=="}});
        let Some(Object::Secret(s)) = parse_object(&s).unwrap() else {
            panic!()
        };
        assert!(s.config.is_none());
        assert_eq!(s.id.namespace, "default");
        let bad = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"},
            "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": "!!!"}});
        let e = parse_object(&bad).unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
    }

    #[test]
    fn json_string_label_http_base_and_component_label_fallback() {
        let v = json!({
            "apiVersion": "operator.kyma-project.io/v1beta1", "kind": "ModuleTemplate",
            "metadata": {"name": "m", "namespace": "kcp-system"},
            "spec": {"target": "remote", "descriptor": {"component": {
                "name": "kyma-project.io/module/x", "version": "1.0.0",
                "labels": [{"name": "oci-registry-cred", "value": "{\"team\":\"x\"}"}],
                "repositoryContexts": [{"baseUrl": "http://reg.localhost:5000/", "type": "ociRegistry"}],
                "resources": [{"name": "raw-manifest", "access": {"type": "localBlob/v1", "localReference": "sha256:00"}}],
                "someFutureField": 1
            }}}
        });
        let m = module(&v);
        assert_eq!(
            m.descriptor_repository.as_ref().unwrap().host,
            "reg.localhost:5000"
        );
        assert!(m.descriptor_repository.as_ref().unwrap().insecure);
        assert_eq!(
            m.descriptor_repository.as_ref().unwrap().repository,
            "component-descriptors/kyma-project.io/module/x"
        );
        let SelectorSpec::Valid { selector, origin } = &m.selector else {
            panic!()
        };
        assert_eq!(selector.to_string(), "team=x");
        assert_eq!(origin, "component label oci-registry-cred");
    }

    #[test]
    fn malformed_objects_are_errors_not_panics() {
        let no_ctx = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
            "metadata": {"name": "m"}, "spec": {"descriptor": {"component": {"name": "c"}}}});
        assert!(parse_object(&no_ctx).is_err());
        let no_name = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate", "spec": {}});
        assert_eq!(
            parse_object(&no_name).unwrap_err(),
            ModelError::Missing("metadata.name")
        );
        let bad_label = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
            "metadata": {"name": "m"}, "spec": {"descriptor": {"component": {"name": "c",
            "repositoryContexts": [{"baseUrl": "r.io"}],
            "resources": [{"name": "raw-manifest", "labels": [{"name": "oci-registry-cred", "value": "nope"}],
                "access": {"type": "localOciBlob", "digest": "sha256:00"}}]}}}});
        assert!(matches!(
            module(&bad_label).selector,
            SelectorSpec::Invalid { .. }
        ));
        assert!(
            parse_object(&json!({"kind": "ConfigMap", "apiVersion": "v1"}))
                .unwrap()
                .is_none()
        );
        assert!(parse_object(&json!("string")).unwrap().is_none());
    }

    #[test]
    fn v3alpha1_descriptor_and_a_string_embedded_descriptor() {
        let descriptor = json!({
            "meta": {"schemaVersion": "v3alpha1"},
            "metadata": {"name": "kyma-project.io/module/y", "version": "2.0.0",
                "labels": [{"name": "oci-registry-cred", "value": {"team": "y"}}]},
            "repositoryContexts": [{"baseUrl": "reg.io/base", "type": "OCIRegistry", "subPath": "sub"}],
            "spec": {"resources": [{"name": "raw-manifest",
                "access": {"type": "localOciBlob", "digest": "sha256:01", "mediaType": "application/x-tar"}}]}
        });
        for embedded in [descriptor.clone(), Value::String(descriptor.to_string())] {
            let m = module(&json!({"apiVersion": "operator.kyma-project.io/v1beta2",
                "kind": "ModuleTemplate", "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"descriptor": embedded}}));
            assert_eq!(m.component.as_deref(), Some("kyma-project.io/module/y"));
            assert_eq!(m.version.as_deref(), Some("2.0.0"));
            assert_eq!(
                m.descriptor_repository.unwrap().to_string(),
                "reg.io/base/sub/component-descriptors/kyma-project.io/module/y"
            );
            assert_eq!(m.local_blobs[0].digest, "sha256:01");
            let SelectorSpec::Valid { selector, .. } = &m.selector else {
                panic!("{:?}", m.selector)
            };
            assert_eq!(selector.to_string(), "team=y");
        }
    }

    #[test]
    fn fields_of_the_wrong_shape_count_as_absent_where_they_decide_nothing() {
        // A label that is not an object, a resource without access, a numeric mediaType:
        // ignored one by one; the credential label beside them still counts.
        let m = module(&json!({"apiVersion": "operator.kyma-project.io/v1beta2",
        "kind": "ModuleTemplate", "metadata": {"name": "m", "namespace": 7},
        "spec": {"moduleName": "x", "info": {"future": true}, "descriptor": {"component": {
            "name": "c", "repositoryContexts": ["junk", {"baseUrl": "r.io"}],
            "labels": ["junk", {"name": "oci-registry-cred", "value": "{\"k\":\"v\"}"}],
            "resources": ["junk", {"name": "n"},
                {"name": "raw-manifest", "access": {"type": "localBlob", "localReference": "sha256:02", "mediaType": 1}}]
        }}}}));
        assert_eq!(m.id.to_string(), "default/m");
        assert_eq!(m.module_name.as_deref(), Some("x"));
        assert_eq!(m.descriptor_repository.unwrap().host, "r.io");
        assert_eq!(m.local_blobs.len(), 1);
        assert_eq!(m.local_blobs[0].digest, "sha256:02");
        assert_eq!(m.local_blobs[0].media_type, None);
        assert!(matches!(m.selector, SelectorSpec::Valid { .. }));
        // The last repository context decides: one that is not an object has no baseUrl.
        let last_junk = json!({"apiVersion": "operator.kyma-project.io/v1beta2",
            "kind": "ModuleTemplate", "metadata": {"name": "m"},
            "spec": {"descriptor": {"component": {"name": "c",
                "repositoryContexts": [{"baseUrl": "r.io"}, "junk"]}}}});
        assert_eq!(
            parse_object(&last_junk).unwrap_err(),
            ModelError::Missing("spec.descriptor.component.repositoryContexts[-1].baseUrl")
        );
        // A typed spec field of the wrong type is an error that quotes nothing.
        let bad_spec = json!({"apiVersion": "operator.kyma-project.io/v1beta2",
            "kind": "ModuleTemplate", "metadata": {"name": "m"},
            "spec": {"moduleName": ["s3cr3t-looking"]}});
        let e = parse_object(&bad_spec).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn secrets_keep_only_their_credential_key_and_errors_quote_nothing() {
        let cfg = base64::engine::general_purpose::STANDARD
            .encode(r#"{"auths":{"r.io":{"username":"u","password":"hunter2"}}}"#);
        // Wrapped base64 (as in a file), another key that is not base64, stringData winning.
        let wrapped = format!("{}\n  {}", &cfg[..10], &cfg[10..]);
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a", "labels": {"l": "v"}},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": wrapped, "other": "!!!"}});
        let Some(Object::Secret(s)) = parse_object(&s).unwrap() else {
            panic!()
        };
        assert_eq!(s.labels["l"], "v");
        assert!(s.config.unwrap().auths.contains_key("r.io"));
        let both = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": 5},
            "stringData": {".dockerconfigjson": "{\"auths\":{\"s.io\":{}}}"}});
        let Some(Object::Secret(s)) = parse_object(&both).unwrap() else {
            panic!()
        };
        assert!(s.config.unwrap().auths.contains_key("s.io"));
        // Errors name the key, never the content.
        for bad in [
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"},
                "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": "hunter2!"}}),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": "{\"auths\": \"hunter2\"}"}}),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a", "labels": {"l": ["hunter2"]}},
                "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": cfg}}),
        ] {
            let e = parse_object(&bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = parse_object(
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"},
            "type": "kubernetes.io/dockercfg", "data": {".dockercfg": ["x"]}}),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "data: .dockercfg is not a string");
    }

    #[test]
    fn image_references() {
        let l = image_location("reg.io:5000/a/b:1.0@sha256:abcd").unwrap();
        assert_eq!(
            (l.host.as_str(), l.repository.as_str()),
            ("reg.io:5000", "a/b")
        );
        let l = image_location("nginx:1.25").unwrap();
        assert_eq!(
            (l.host.as_str(), l.repository.as_str()),
            ("docker.io", "library/nginx")
        );
        let l = image_location("bitnami/redis").unwrap();
        assert_eq!(
            (l.host.as_str(), l.repository.as_str()),
            ("docker.io", "bitnami/redis")
        );
        assert!(image_location("reg.io/UPPER").is_err());
    }
}
