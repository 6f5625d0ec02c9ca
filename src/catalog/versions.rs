//! Which module versions Lifecycle Manager is about to pull, and from where: what
//! `catalog.prewarm` fetches ahead of it and what `oci-proxy resolve` reports as cached or not.
//!
//! LM ≥ 1.8 pulls `<base>/component-descriptors/<ocmComponentName>:<version>` under the named
//! Secret's base for each version a ModuleReleaseMeta channel (or `mandatory`) assigns; older
//! LM pulls the descriptor repository its ModuleTemplate's repository context names, tagged
//! with the template's version. KLM uses the version as the tag as it is (the CRD forbids
//! `+`, so OCM's `+` → `.build-` mapping never applies).

use std::collections::BTreeMap;

use super::index::Base;
use super::model::{join_path, Object, RepoLocation, COMPONENT_DESCRIPTORS};

/// One version of one module at the repository LM pulls it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleVersion {
    /// `ModuleReleaseMeta kcp-system/template-operator` (or the ModuleTemplate), for logs.
    pub(crate) module: String,
    /// Registry `host[:port]` as the catalog names it.
    pub(crate) host: String,
    pub(crate) repository: String,
    pub(crate) version: String,
    /// Some ModuleReleaseMeta channel (or its mandatory version) points to it.
    pub(crate) channel: bool,
}

impl ModuleVersion {
    /// The name a client would request it by through the proxy: `<host>/<repository>`.
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }
}

/// Every module version the objects name, with the repository LM pulls it from; a version
/// with no known repository (no descriptor repository, no named Secret base) is left out.
pub(super) fn module_versions(objects: &[&Object], base: Option<&Base>) -> Vec<ModuleVersion> {
    // (host, repository, version) → entry; a channel entry wins over a template-only one.
    let mut found: BTreeMap<(String, String, String), ModuleVersion> = BTreeMap::new();
    let mut add = |v: ModuleVersion| {
        let key = (v.host.clone(), v.repository.clone(), v.version.clone());
        match found.get_mut(&key) {
            Some(e) if v.channel && !e.channel => *e = v,
            Some(_) => {}
            None => {
                found.insert(key, v);
            }
        }
    };
    let base_repo = |component: &str| {
        base.map(|b| RepoLocation {
            host: b.host.clone(),
            repository: join_path(&[&b.path, COMPONENT_DESCRIPTORS, component]),
            insecure: b.insecure,
        })
    };
    let metas: Vec<_> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ModuleReleaseMeta(r) => Some(r),
            _ => None,
        })
        .collect();
    for r in &metas {
        let channel_versions = r.versions();
        let module = format!("ModuleReleaseMeta {}", r.id);
        if let Some(location) = r.ocm_component_name.as_deref().and_then(base_repo) {
            for version in &channel_versions {
                add(ModuleVersion {
                    module: module.clone(),
                    host: location.host.clone(),
                    repository: location.repository.clone(),
                    version: version.clone(),
                    channel: true,
                });
            }
        }
    }
    for o in objects {
        let Object::ModuleTemplate(t) = o else {
            continue;
        };
        let Some(version) = t.version.clone().filter(|v| !v.is_empty()) else {
            continue;
        };
        let meta = metas.iter().find(|r| {
            r.id.namespace == t.id.namespace
                && r.module_name.is_some()
                && r.module_name == t.module_name
        });
        let location = t.descriptor_repository.clone().or_else(|| {
            meta.and_then(|r| r.ocm_component_name.as_deref())
                .and_then(base_repo)
        });
        let Some(location) = location else {
            continue;
        };
        add(ModuleVersion {
            module: format!("ModuleTemplate {}", t.id),
            host: location.host,
            repository: location.repository,
            channel: meta.is_some_and(|r| r.versions().contains(&version)),
            version,
        });
    }
    found.into_values().collect()
}
