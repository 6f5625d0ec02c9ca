//! Which credential a request to an upstream repository carries, in order:
//! the module catalog (a module's Secret, or the named default Secret) ▸ the operator's docker
//! config ▸ the ambient identity (`credentials.google`, `credentials.ecr`) for its hosts ▸
//! anonymous. A module's credentials only ever apply to that module's repositories;
//! the catalog decides that, this chain only asks it.
//!
//! The ambient identity comes last among credentials, as in Lifecycle Manager's multi-keychain
//! where a Secret that gives credentials wins: a Secret or a docker config entry is something
//! an operator wrote for that registry on purpose, the ambient identity is what the pod happens
//! to have. For a module repository whose module has no Secret (or whose Secret has no entry
//! for the registry) the catalog answers anonymous, and the ambient identity applies; the
//! docker config still does not (the catalog's rules are unchanged). Ambient credentials serve
//! module repositories and configured upstreams only: a repository on a host known only from
//! the catalog that no module owns never gets the proxy's own identity.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use super::ambient::{Ambient, AmbientAnswer};
use super::keychain::Keychain;
use super::refresh::SourceError;
use super::Credential;

/// What the module catalog says about a repository.
#[derive(Clone, Debug)]
pub enum ModuleDecision {
    /// The catalog has no credential for this repository.
    NotAModule,
    /// Use this credential; `source` explains where it came from (no secret content).
    Use {
        credential: Credential,
        source: String,
    },
    /// The repository belongs to a module that cannot get credentials (e.g. its selector
    /// matches no Secret): the request is refused with this message.
    Denied(String),
}

/// Implemented by the module catalog.
pub trait ModuleCredentials: Send + Sync {
    fn decide(&self, registry_host: &str, repository: &str) -> ModuleDecision;
}

/// The chosen credential and a description of its origin for logs and `resolve`.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub credential: Credential,
    pub source: String,
}

/// Why no credential could be chosen.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChooseError {
    /// The catalog refuses (e.g. the module's selector matches no Secret).
    #[error("{0}")]
    Denied(String),
    /// The ambient identity applies but its source has no valid token.
    #[error("no credentials from {source_name}: {error}")]
    Unavailable {
        source_name: &'static str,
        error: SourceError,
    },
}

pub struct CredentialChain {
    docker_config: RwLock<Arc<Keychain>>,
    modules: Option<Arc<dyn ModuleCredentials>>,
    ambient: Arc<Ambient>,
    /// Lower-cased names of the configured upstreams (ambient credentials serve these and
    /// module repositories only).
    configured: HashSet<String>,
}

impl CredentialChain {
    pub fn new(docker_config: Keychain, modules: Option<Arc<dyn ModuleCredentials>>) -> Self {
        CredentialChain {
            docker_config: RwLock::new(Arc::new(docker_config)),
            modules,
            ambient: Arc::new(Ambient::none()),
            configured: HashSet::new(),
        }
    }

    /// Adds the ambient sources, for module repositories and the `configured` upstreams.
    pub fn with_ambient(
        mut self,
        ambient: Arc<Ambient>,
        configured: impl IntoIterator<Item = String>,
    ) -> Self {
        self.ambient = ambient;
        self.configured = configured
            .into_iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        self
    }

    /// The ambient sources (carried over by a config reload).
    pub fn ambient(&self) -> &Arc<Ambient> {
        &self.ambient
    }

    /// Picks the credential for `repository` on the upstream known to clients as `registry`
    /// (and reached at `endpoint_host`).
    pub async fn choose(
        &self,
        registry: &str,
        endpoint_host: &str,
        repository: &str,
    ) -> Result<Chosen, ChooseError> {
        if let Some(modules) = &self.modules {
            match modules.decide(registry, repository) {
                ModuleDecision::Use { credential, source } => {
                    if credential == Credential::Anonymous {
                        // No Secret gives credentials: the ambient identity may.
                        if let Some(c) = self.ambient_for(registry, endpoint_host).await? {
                            return Ok(c);
                        }
                    }
                    return Ok(Chosen { credential, source });
                }
                ModuleDecision::Denied(message) => return Err(ChooseError::Denied(message)),
                ModuleDecision::NotAModule => {}
            }
        }
        let keychain = self
            .docker_config
            .read()
            .map(|k| k.clone())
            .unwrap_or_default();
        for host in [registry, endpoint_host] {
            if let Some(m) = keychain.resolve(host, repository) {
                return Ok(Chosen {
                    credential: m.credential,
                    source: format!("{} entry {:?}", m.source, m.key),
                });
            }
        }
        if self.configured.contains(&registry.to_ascii_lowercase()) {
            if let Some(c) = self.ambient_for(registry, endpoint_host).await? {
                return Ok(c);
            }
        }
        Ok(Chosen {
            credential: Credential::Anonymous,
            source: "no credentials (anonymous)".into(),
        })
    }

    async fn ambient_for(
        &self,
        registry: &str,
        endpoint_host: &str,
    ) -> Result<Option<Chosen>, ChooseError> {
        if self.ambient.is_empty() {
            return Ok(None);
        }
        match self.ambient.credential(registry, endpoint_host).await {
            None => Ok(None),
            Some(AmbientAnswer::Use { credential, source }) => {
                Ok(Some(Chosen { credential, source }))
            }
            Some(AmbientAnswer::Unavailable { source_name, error }) => {
                Err(ChooseError::Unavailable { source_name, error })
            }
        }
    }
}
