//! The immutable catalog index, rebuilt from a snapshot of all sources' objects:
//! (registry host, repository) → claiming module(s) → selector → matching Secrets → keychain,
//! plus the named default Secret (LM's `--oci-registry-cred-secret`).
//!
//! [`Index::verdict`] is the one place the precedence rules live, as LM ≥ 1.3.11 has them: a
//! repository under the named Secret's base gets the named Secret; outside it, the claiming
//! module's own selector decides; else nothing (the server falls back further).
//!
//! The trust rules live in [`Index::build`]: a selector matches Secrets only in the namespace
//! of the object carrying it; an empty selector matches nothing (it would lend every Secret
//! to whoever wrote it); `ociArtifact` images are claimed only with `image_credentials`; and
//! each claim keeps its own scheme, so one module's `http://` baseUrl concerns only its own
//! repositories.

use std::collections::{BTreeMap, HashMap};

use super::creds::{Keychain, KeychainMatch};
use super::model::{
    Object, ObjectRef, PullSecret, RepoLocation, SelectorSpec, COMPONENT_DESCRIPTORS,
};
use super::ModuleHost;
use crate::config::DefaultSecret;

/// A Secret a module's selector matched, as explain shows it (never its content).
pub(super) struct SecretSummary {
    pub id: ObjectRef,
    /// Set when the Secret contributes no credentials (wrong type, empty auths).
    pub note: Option<String>,
}

/// One credential-bearing owner of repositories: a ModuleTemplate, or one image spec of a
/// Manifest.
pub(super) struct ModuleEntry {
    pub kind: &'static str,
    pub id: ObjectRef,
    /// The module's name (`spec.moduleName`), when known.
    pub module_name: Option<String>,
    /// The versions it offers (template version, ModuleReleaseMeta channels).
    pub versions: Vec<String>,
    pub selector: SelectorSpec,
    pub secrets: Vec<SecretSummary>,
    pub keychain: Keychain,
}

impl ModuleEntry {
    /// `ModuleReleaseMeta kcp-system/x (module x, versions 1.0.5)`, for messages.
    pub(super) fn describe(&self) -> String {
        let mut extra = Vec::new();
        if let Some(n) = &self.module_name {
            extra.push(format!("module {n}"));
        }
        if !self.versions.is_empty() {
            extra.push(format!("versions {}", self.versions.join(", ")));
        }
        if extra.is_empty() {
            format!("{} {}", self.kind, self.id)
        } else {
            format!("{} {} ({})", self.kind, self.id, extra.join(", "))
        }
    }

    /// The selector is `{}`: refused, it matches nothing.
    pub(super) fn empty_selector(&self) -> bool {
        matches!(&self.selector, SelectorSpec::Valid { selector, .. } if selector.is_everything())
    }
}

/// A module naming a repository, and how.
pub(super) struct Claim {
    pub module: usize,
    pub via: String,
    /// The module named it with `http://`.
    pub insecure: bool,
}

/// Build options from the config.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Options {
    /// `catalog.image_credentials`.
    pub image_credentials: bool,
}

/// Registry base of the default Secret: its single `auths` registry plus the subpath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Base {
    pub host: String,
    pub path: String,
    pub insecure: bool,
}

impl Base {
    fn covers(&self, host: &str, repository: &str) -> bool {
        normalize_host(&self.host) == host
            && (self.path.is_empty()
                || repository == self.path
                || repository
                    .strip_prefix(self.path.as_str())
                    .is_some_and(|r| r.starts_with('/')))
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.insecure { "http://" } else { "" };
        if self.path.is_empty() {
            write!(f, "{scheme}{}/*", self.host)
        } else {
            write!(f, "{scheme}{}/{}/*", self.host, self.path)
        }
    }
}

pub(super) enum DefaultState {
    Unconfigured,
    Active {
        secret: ObjectRef,
        base: Base,
        keychain: Keychain,
    },
    /// Configured but unusable now. With a base known from an earlier snapshot, requests under
    /// it are denied (KLM: "no auth secret found") instead of falling through.
    Unavailable {
        secret: ObjectRef,
        last_base: Option<Base>,
        reason: String,
    },
}

impl DefaultState {
    pub(super) fn base(&self) -> Option<&Base> {
        match self {
            DefaultState::Unconfigured => None,
            DefaultState::Active { base, .. } => Some(base),
            DefaultState::Unavailable { last_base, .. } => last_base.as_ref(),
        }
    }
}

pub(super) struct Index {
    pub modules: Vec<ModuleEntry>,
    pub repos: HashMap<(String, String), Vec<Claim>>,
    pub default: DefaultState,
    pub hosts: Vec<ModuleHost>,
    /// Objects skipped as malformed: `Kind ns/name (source): reason`.
    pub skipped: Vec<String>,
    pub secret_count: usize,
    /// Module versions and where LM pulls them (see [`super::versions`]).
    pub versions: Vec<super::versions::ModuleVersion>,
}

/// The versions of the ModuleTemplates of `module_name` in `namespace`, with the release
/// meta's own.
fn module_versions(
    objects: &[&Object],
    namespace: &str,
    module_name: &str,
    mut v: Vec<String>,
) -> Vec<String> {
    for o in objects {
        if let Object::ModuleTemplate(t) = o {
            if t.id.namespace == namespace && t.module_name.as_deref() == Some(module_name) {
                v.extend(t.version.clone());
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// The outcome for one repository, borrowing from the index.
pub(super) enum Verdict<'a> {
    NotAModule {
        reason: String,
    },
    Module {
        entry: &'a ModuleEntry,
        matched: Option<KeychainMatch>,
    },
    DefaultSecret {
        secret: &'a ObjectRef,
        matched: Option<KeychainMatch>,
    },
    Denied {
        message: String,
    },
}

/// Host as used for index keys: lower case, Docker Hub aliases folded to `docker.io`.
pub(super) fn normalize_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => h,
    }
}

fn join_path(a: &str, b: &str) -> String {
    [a.trim_matches('/'), b.trim_matches('/')]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

impl Index {
    /// Builds the index. `objects` must hold at most one object per kind and id.
    pub(super) fn build(
        objects: &[&Object],
        skipped: Vec<String>,
        default_secret: Option<&DefaultSecret>,
        last_base: Option<Base>,
        options: Options,
    ) -> Index {
        let mut secrets: Vec<&PullSecret> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Secret(s) => Some(s),
                _ => None,
            })
            .collect();
        secrets.sort_by(|a, b| a.id.cmp(&b.id));
        let default = default_state(default_secret, &secrets, last_base);

        let mut modules = Vec::new();
        let mut claims: Vec<(RepoLocation, Claim)> = Vec::new();
        let mut add = |kind,
                       id: &ObjectRef,
                       module_name: Option<String>,
                       versions: Vec<String>,
                       selector: &SelectorSpec,
                       repos: Vec<(RepoLocation, String)>| {
            let module = modules.len();
            let mut entry = module_entry(kind, id, selector, &secrets);
            entry.module_name = module_name;
            entry.versions = versions;
            modules.push(entry);
            for (location, via) in repos {
                let insecure = location.insecure;
                claims.push((
                    location,
                    Claim {
                        module,
                        via,
                        insecure,
                    },
                ));
            }
        };
        for o in objects {
            match o {
                Object::ModuleTemplate(m) => {
                    let mut repos = Vec::new();
                    if let Some(d) = &m.descriptor_repository {
                        repos.push((d.clone(), "component descriptor repository".to_owned()));
                    }
                    if options.image_credentials {
                        for i in &m.images {
                            repos.push((
                                i.location.clone(),
                                format!("ociArtifact resource {}", i.resource),
                            ));
                        }
                    }
                    add(
                        "ModuleTemplate",
                        &m.id,
                        m.module_name.clone(),
                        m.version.iter().cloned().collect(),
                        &m.selector,
                        repos,
                    );
                }
                Object::ModuleReleaseMeta(r) => {
                    // LM ≥ 1.8 pulls `<registry>[/<subpath>]/component-descriptors/<component>`
                    // with the named Secret: under its base by construction.
                    let mut repos = Vec::new();
                    if let (Some(component), Some(base)) = (&r.ocm_component_name, default.base()) {
                        repos.push((
                            RepoLocation {
                                host: base.host.clone(),
                                repository: join_path(
                                    &join_path(&base.path, COMPONENT_DESCRIPTORS),
                                    component,
                                ),
                                insecure: base.insecure,
                            },
                            format!("ocmComponentName {component} under the default Secret's base"),
                        ));
                    }
                    let versions = match &r.module_name {
                        Some(n) => module_versions(objects, &r.id.namespace, n, r.versions()),
                        None => r.versions(),
                    };
                    add(
                        "ModuleReleaseMeta",
                        &r.id,
                        r.module_name.clone(),
                        versions,
                        &SelectorSpec::None,
                        repos,
                    );
                }
                Object::Manifest(m) => {
                    for s in &m.sources {
                        add(
                            "Manifest",
                            &m.id,
                            None,
                            s.reference.iter().cloned().collect(),
                            &s.selector,
                            vec![(s.location.clone(), s.field.to_owned())],
                        );
                    }
                }
                Object::Secret(_) => {}
            }
        }

        let mut host_flags: BTreeMap<String, bool> = BTreeMap::new();
        let mut repos: HashMap<(String, String), Vec<Claim>> = HashMap::new();
        for (location, claim) in claims {
            *host_flags.entry(location.host.clone()).or_default() |= location.insecure;
            repos
                .entry((normalize_host(&location.host), location.repository))
                .or_default()
                .push(claim);
        }
        // Preference: a module with a selector, then by namespace/name, kind, and how it names it.
        for list in repos.values_mut() {
            list.sort_by(|a, b| {
                let (ma, mb) = (&modules[a.module], &modules[b.module]);
                (!ma.selector.is_some(), &ma.id, ma.kind, &a.via).cmp(&(
                    !mb.selector.is_some(),
                    &mb.id,
                    mb.kind,
                    &b.via,
                ))
            });
            list.dedup_by(|a, b| a.module == b.module);
        }

        if let Some(base) = default.base() {
            *host_flags.entry(base.host.clone()).or_default() |= base.insecure;
        }
        let hosts = host_flags
            .into_iter()
            .map(|(host, insecure)| ModuleHost { host, insecure })
            .collect();

        let versions = super::versions::module_versions(objects, default.base());
        Index {
            modules,
            repos,
            default,
            hosts,
            skipped,
            secret_count: secrets.len(),
            versions,
        }
    }

    /// `Some(insecure)` when the catalog names `host`: plain HTTP for `repository` only when
    /// the Secret or module that decides it named the registry with `http://`.
    pub(super) fn scheme(&self, host: &str, repository: &str) -> Option<bool> {
        let wanted = normalize_host(host);
        if !self.hosts.iter().any(|h| normalize_host(&h.host) == wanted) {
            return None;
        }
        let repository = repository.trim_matches('/');
        if let Some(base) = self
            .default
            .base()
            .filter(|b| b.covers(&wanted, repository))
        {
            return Some(base.insecure);
        }
        Some(
            self.claims(host, repository)
                .first()
                .is_some_and(|c| c.insecure),
        )
    }

    pub(super) fn claims(&self, host: &str, repository: &str) -> &[Claim] {
        self.repos
            .get(&(
                normalize_host(host),
                repository.trim_matches('/').to_owned(),
            ))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub(super) fn verdict(&self, host: &str, repository: &str) -> Verdict<'_> {
        let repository = repository.trim_matches('/');
        let keychain_host = host.trim().to_ascii_lowercase();
        let host_key = normalize_host(host);
        let claims = self.claims(host, repository);
        // 1. Under the named Secret's base the named Secret decides (LM ≥ 1.3.11 ignores labels).
        match &self.default {
            DefaultState::Active {
                secret,
                base,
                keychain,
            } if base.covers(&host_key, repository) => {
                return Verdict::DefaultSecret {
                    secret,
                    matched: keychain.resolve(&keychain_host, repository),
                }
            }
            DefaultState::Unavailable {
                secret,
                last_base: Some(base),
                reason,
            } if base.covers(&host_key, repository) => {
                let modules: Vec<String> = claims
                    .iter()
                    .map(|c| self.modules[c.module].describe())
                    .collect();
                let prefix = if modules.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", modules.join("; "))
                };
                return Verdict::Denied {
                    message: format!("{prefix}default Secret {secret}: {reason}"),
                };
            }
            _ => {}
        }
        // 2. Outside it, the claiming module's own selector.
        if let Some(first) = claims.first() {
            let entry = &self.modules[first.module];
            match &entry.selector {
                SelectorSpec::Invalid { message, origin } => {
                    return Verdict::Denied {
                        message: format!(
                            "{}: unusable credential selector ({origin}): {message}",
                            entry.describe()
                        ),
                    }
                }
                SelectorSpec::Valid { .. } if entry.empty_selector() => {
                    return Verdict::Denied {
                        message: format!(
                            "{}: empty credential selector {{}} matches no Secret (it would select every Secret)",
                            entry.describe()
                        ),
                    }
                }
                SelectorSpec::Valid { selector, .. } if entry.secrets.is_empty() => {
                    return Verdict::Denied {
                        message: format!(
                            "{}: credential selector {selector} matches no Secret in namespace {}",
                            entry.describe(),
                            entry.id.namespace
                        ),
                    }
                }
                SelectorSpec::Valid { .. } => {
                    return Verdict::Module {
                        entry,
                        matched: entry.keychain.resolve(&keychain_host, repository),
                    }
                }
                SelectorSpec::None => {}
            }
        }
        let reason = match claims.first() {
            Some(c) => {
                format!(
                    "{} names it but has no credential selector, and the default Secret does not cover it",
                    self.modules[c.module].describe()
                )
            }
            None => "no module names this repository, and the default Secret does not cover it"
                .to_owned(),
        };
        Verdict::NotAModule { reason }
    }

    /// Modules whose selector is `{}` (refused).
    pub(super) fn empty_selectors(&self) -> impl Iterator<Item = &ModuleEntry> {
        self.modules.iter().filter(|m| m.empty_selector())
    }
}

fn module_entry(
    kind: &'static str,
    id: &ObjectRef,
    selector: &SelectorSpec,
    secrets: &[&PullSecret],
) -> ModuleEntry {
    let mut keychain = Keychain::new();
    let mut matched = Vec::new();
    // Only Secrets in the module's own namespace, and never all of them for `{}`.
    if let SelectorSpec::Valid { selector: sel, .. } = selector {
        let usable = !sel.is_everything();
        for s in secrets
            .iter()
            .filter(|s| usable && s.id.namespace == id.namespace && sel.matches(&s.labels))
        {
            let note = match &s.config {
                Some(cfg) if !cfg.auths.is_empty() => {
                    keychain.add(&s.id.to_string(), cfg);
                    None
                }
                Some(_) => Some("no registries in its auths".to_owned()),
                None => Some(format!("type {}: no registry credentials", s.secret_type)),
            };
            matched.push(SecretSummary {
                id: s.id.clone(),
                note,
            });
        }
    }
    ModuleEntry {
        kind,
        id: id.clone(),
        module_name: None,
        versions: Vec::new(),
        selector: selector.clone(),
        secrets: matched,
        keychain,
    }
}

fn default_state(
    cfg: Option<&DefaultSecret>,
    secrets: &[&PullSecret],
    last_base: Option<Base>,
) -> DefaultState {
    let Some(cfg) = cfg else {
        return DefaultState::Unconfigured;
    };
    let id = ObjectRef {
        namespace: cfg.namespace.clone(),
        name: cfg.name.clone(),
    };
    let unavailable = |reason: String| DefaultState::Unavailable {
        secret: id.clone(),
        last_base: last_base.clone(),
        reason,
    };
    let Some(secret) = secrets.iter().find(|s| s.id == id) else {
        return unavailable("Secret not found".to_owned());
    };
    let Some(config) = &secret.config else {
        return unavailable(format!(
            "type {} is not a docker registry Secret",
            secret.secret_type
        ));
    };
    match config.single_registry() {
        Ok(reg) => {
            let base = Base {
                host: reg.host.to_ascii_lowercase(),
                path: join_path(&reg.path, cfg.subpath.as_deref().unwrap_or("")),
                insecure: reg.insecure,
            };
            let mut keychain = Keychain::new();
            keychain.add(&id.to_string(), config);
            DefaultState::Active {
                secret: id,
                base,
                keychain,
            }
        }
        Err(e) => unavailable(e.to_string()),
    }
}
