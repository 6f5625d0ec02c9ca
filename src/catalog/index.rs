//! The immutable catalog index, rebuilt from a snapshot of all sources' objects:
//! (registry host, repository) → claiming module(s) → selector → matching Secrets → keychain,
//! plus the named default Secret (KLM's `--oci-registry-cred-secret` mode).
//!
//! [`Index::verdict`] is the one place the precedence rules live: the module's own credentials,
//! else the default Secret, else nothing (the server falls back further).

use std::collections::{BTreeMap, HashMap};

use super::creds::{Keychain, KeychainMatch};
use super::model::{Object, ObjectRef, PullSecret, RepoLocation, SelectorSpec};
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
    pub selector: SelectorSpec,
    pub secrets: Vec<SecretSummary>,
    pub keychain: Keychain,
}

/// A module naming a repository, and how.
pub(super) struct Claim {
    pub module: usize,
    pub via: String,
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
    pub fn base(&self) -> Option<&Base> {
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
    pub fn build(
        objects: &[&Object],
        skipped: Vec<String>,
        default_secret: Option<&DefaultSecret>,
        last_base: Option<Base>,
    ) -> Index {
        let mut secrets: Vec<&PullSecret> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Secret(s) => Some(s),
                _ => None,
            })
            .collect();
        secrets.sort_by(|a, b| a.id.cmp(&b.id));

        let mut modules = Vec::new();
        let mut claims: Vec<(RepoLocation, Claim)> = Vec::new();
        let mut add =
            |kind, id: &ObjectRef, selector: &SelectorSpec, repos: Vec<(RepoLocation, String)>| {
                let module = modules.len();
                modules.push(module_entry(kind, id, selector, &secrets));
                for (location, via) in repos {
                    claims.push((location, Claim { module, via }));
                }
            };
        for o in objects {
            match o {
                Object::ModuleTemplate(m) => {
                    let mut repos = vec![(
                        m.descriptor_repository.clone(),
                        "component descriptor repository".to_owned(),
                    )];
                    for i in &m.images {
                        repos.push((
                            i.location.clone(),
                            format!("ociArtifact resource {}", i.resource),
                        ));
                    }
                    add("ModuleTemplate", &m.id, &m.selector, repos);
                }
                Object::Manifest(m) => {
                    for s in &m.sources {
                        add(
                            "Manifest",
                            &m.id,
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

        let default = default_state(default_secret, &secrets, last_base);
        if let Some(base) = default.base() {
            *host_flags.entry(base.host.clone()).or_default() |= base.insecure;
        }
        let hosts = host_flags
            .into_iter()
            .map(|(host, insecure)| ModuleHost { host, insecure })
            .collect();

        Index {
            modules,
            repos,
            default,
            hosts,
            skipped,
            secret_count: secrets.len(),
        }
    }

    pub fn claims(&self, host: &str, repository: &str) -> &[Claim] {
        self.repos
            .get(&(
                normalize_host(host),
                repository.trim_matches('/').to_owned(),
            ))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn verdict(&self, host: &str, repository: &str) -> Verdict<'_> {
        let repository = repository.trim_matches('/');
        let keychain_host = host.trim().to_ascii_lowercase();
        let claims = self.claims(host, repository);
        if let Some(first) = claims.first() {
            let entry = &self.modules[first.module];
            match &entry.selector {
                SelectorSpec::Invalid { message, origin } => {
                    return Verdict::Denied {
                        message: format!(
                            "{} {}: unusable credential selector ({origin}): {message}",
                            entry.kind, entry.id
                        ),
                    }
                }
                SelectorSpec::Valid { selector, .. } if entry.secrets.is_empty() => {
                    return Verdict::Denied {
                        message: format!(
                            "{} {}: credential selector {selector} matches no Secret",
                            entry.kind, entry.id
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
        let host_key = normalize_host(host);
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
                return Verdict::Denied {
                    message: format!("default Secret {secret}: {reason}"),
                }
            }
            _ => {}
        }
        let reason = match claims.first() {
            Some(c) => {
                let e = &self.modules[c.module];
                format!(
                    "{} {} names it but has no credential selector, and the default Secret does not cover it",
                    e.kind, e.id
                )
            }
            None => "no module names this repository, and the default Secret does not cover it"
                .to_owned(),
        };
        Verdict::NotAModule { reason }
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
    if let SelectorSpec::Valid { selector: sel, .. } = selector {
        for s in secrets.iter().filter(|s| sel.matches(&s.labels)) {
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
