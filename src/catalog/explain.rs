//! What `oci-proxy resolve` prints: why the catalog decides what it decides for a repository.
//! Names objects (namespace/name), selectors, keychain keys and credential kinds; never any
//! Secret content.

use std::fmt;

use super::index::{DefaultState, Index, Verdict};
use super::model::SelectorSpec;

/// One module that names the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleExplanation {
    /// `ModuleTemplate` or `Manifest`.
    pub kind: String,
    /// `namespace/name`.
    pub module: String,
    /// The module's name (`spec.moduleName`), when known.
    pub module_name: Option<String>,
    /// The versions it offers (template version, ModuleReleaseMeta channels, Manifest ref).
    pub versions: Vec<String>,
    /// How it names the repository (e.g. `component descriptor repository`).
    pub via: String,
    /// The selector in Kubernetes syntax, or why there is none / it is unusable.
    pub selector: String,
    /// Where the selector was found.
    pub selector_origin: Option<String>,
    /// Secrets the selector matches (`namespace/name`, with a note when one contributes nothing).
    pub secrets: Vec<String>,
    /// This module's credentials decide the request.
    pub chosen: bool,
}

/// The decision, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    NotAModule {
        reason: String,
    },
    Module {
        module: String,
        secret: Option<String>,
        keychain_key: Option<String>,
        credential_kind: &'static str,
        credential_id: String,
    },
    DefaultSecret {
        secret: String,
        keychain_key: Option<String>,
        credential_kind: &'static str,
        credential_id: String,
    },
    Denied {
        message: String,
    },
}

/// Everything the catalog knows about one repository. `Display` renders it for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub registry_host: String,
    pub repository: String,
    /// All configured sources have completed a first sync.
    pub ready: bool,
    pub modules: Vec<ModuleExplanation>,
    /// The default Secret's state, when configured.
    pub default_secret: Option<String>,
    pub outcome: Outcome,
    /// Objects skipped as malformed in the current snapshot.
    pub skipped_objects: Vec<String>,
}

pub(super) fn explain(index: &Index, ready: bool, host: &str, repository: &str) -> Explanation {
    let verdict = index.verdict(host, repository);
    let chosen_module = match &verdict {
        Verdict::Module { entry, .. } => Some((entry.kind, entry.id.clone())),
        _ => None,
    };
    let modules = index
        .claims(host, repository)
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let e = &index.modules[c.module];
            let (selector, selector_origin) = match &e.selector {
                SelectorSpec::None => ("none".to_owned(), None),
                SelectorSpec::Valid { selector, origin } => {
                    (selector.to_string(), Some(origin.clone()))
                }
                SelectorSpec::Invalid { message, origin } => {
                    (format!("unusable: {message}"), Some(origin.clone()))
                }
            };
            ModuleExplanation {
                kind: e.kind.to_owned(),
                module: e.id.to_string(),
                module_name: e.module_name.clone(),
                versions: e.versions.clone(),
                via: c.via.clone(),
                selector,
                selector_origin,
                secrets: e
                    .secrets
                    .iter()
                    .map(|s| match &s.note {
                        Some(n) => format!("{} ({n})", s.id),
                        None => s.id.to_string(),
                    })
                    .collect(),
                chosen: i == 0
                    && chosen_module
                        .as_ref()
                        .is_some_and(|(k, id)| *k == e.kind && *id == e.id),
            }
        })
        .collect();
    let default_secret = match &index.default {
        DefaultState::Unconfigured => None,
        DefaultState::Active { secret, base, .. } => Some(format!("{secret}, covering {base}")),
        DefaultState::Unavailable {
            secret,
            last_base,
            reason,
        } => Some(match last_base {
            Some(b) => format!("{secret}: {reason} (last covered {b})"),
            None => format!("{secret}: {reason}"),
        }),
    };
    let outcome = match verdict {
        Verdict::NotAModule { reason } => Outcome::NotAModule { reason },
        Verdict::Denied { message } => Outcome::Denied { message },
        Verdict::Module { entry, matched } => {
            let credential = matched
                .as_ref()
                .map(|m| m.credential.clone())
                .unwrap_or_default();
            Outcome::Module {
                module: format!("{} {}", entry.kind, entry.id),
                secret: matched.as_ref().map(|m| m.source.clone()),
                keychain_key: matched.map(|m| m.key),
                credential_kind: credential.kind(),
                credential_id: credential.id().to_string(),
            }
        }
        Verdict::DefaultSecret { secret, matched } => {
            let credential = matched
                .as_ref()
                .map(|m| m.credential.clone())
                .unwrap_or_default();
            Outcome::DefaultSecret {
                secret: secret.to_string(),
                keychain_key: matched.map(|m| m.key),
                credential_kind: credential.kind(),
                credential_id: credential.id().to_string(),
            }
        }
    };
    Explanation {
        registry_host: host.to_owned(),
        repository: repository.trim_matches('/').to_owned(),
        ready,
        modules,
        default_secret,
        outcome,
        skipped_objects: index.skipped.clone(),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "repository: {}/{}", self.registry_host, self.repository)?;
        if !self.ready {
            writeln!(
                f,
                "warning: the catalog has not completed its first sync; this may change"
            )?;
        }
        if self.modules.is_empty() {
            writeln!(f, "modules: none name this repository")?;
        }
        for m in &self.modules {
            let mark = if m.chosen { " [chosen]" } else { "" };
            writeln!(f, "module: {} {}{mark}", m.kind, m.module)?;
            if let Some(n) = &m.module_name {
                writeln!(f, "  module name: {n}")?;
            }
            if !m.versions.is_empty() {
                writeln!(f, "  versions: {}", m.versions.join(", "))?;
            }
            writeln!(f, "  names it as: {}", m.via)?;
            match &m.selector_origin {
                Some(o) => writeln!(f, "  selector: {} (from {o})", m.selector)?,
                None => writeln!(f, "  selector: {}", m.selector)?,
            }
            if m.selector_origin.is_some() {
                if m.secrets.is_empty() {
                    writeln!(f, "  matching Secrets: none")?;
                } else {
                    writeln!(f, "  matching Secrets: {}", m.secrets.join(", "))?;
                }
            }
        }
        match &self.default_secret {
            Some(d) => writeln!(f, "default Secret: {d}")?,
            None => writeln!(f, "default Secret: not configured")?,
        }
        match &self.outcome {
            Outcome::NotAModule { reason } => writeln!(
                f,
                "decision: not a module repository ({reason}); the server's own credentials apply"
            )?,
            Outcome::Denied { message } => writeln!(f, "decision: denied: {message}")?,
            Outcome::Module {
                module,
                secret,
                keychain_key,
                credential_kind,
                credential_id,
            } => {
                writeln!(f, "decision: module credentials of {module}")?;
                match (secret, keychain_key) {
                    (Some(s), Some(k)) => writeln!(f, "  keychain entry: {k} from Secret {s}")?,
                    _ => writeln!(f, "  keychain entry: none matches this registry (anonymous, as go-containerregistry does)")?,
                }
                writeln!(f, "  credential: {credential_kind} (id {credential_id})")?;
            }
            Outcome::DefaultSecret {
                secret,
                keychain_key,
                credential_kind,
                credential_id,
            } => {
                writeln!(f, "decision: default Secret {secret}")?;
                match keychain_key {
                    Some(k) => writeln!(f, "  keychain entry: {k}")?,
                    None => writeln!(f, "  keychain entry: none matches (anonymous)")?,
                }
                writeln!(f, "  credential: {credential_kind} (id {credential_id})")?;
            }
        }
        for s in &self.skipped_objects {
            writeln!(f, "skipped malformed object: {s}")?;
        }
        Ok(())
    }
}
