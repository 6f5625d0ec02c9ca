//! Which credential a request to an upstream repository carries, in order:
//! the module catalog (a module's Secret, or the named default Secret) ▸ the operator's docker
//! config ▸ anonymous. A module's credentials only ever apply to that module's repositories;
//! the catalog decides that, this chain only asks it.

use std::sync::{Arc, RwLock};

use super::keychain::Keychain;
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

pub struct CredentialChain {
    docker_config: RwLock<Arc<Keychain>>,
    modules: Option<Arc<dyn ModuleCredentials>>,
}

impl CredentialChain {
    pub fn new(docker_config: Keychain, modules: Option<Arc<dyn ModuleCredentials>>) -> Self {
        CredentialChain {
            docker_config: RwLock::new(Arc::new(docker_config)),
            modules,
        }
    }

    /// Replaces the docker config keychain (after the file changed).
    pub fn set_docker_config(&self, keychain: Keychain) {
        if let Ok(mut k) = self.docker_config.write() {
            *k = Arc::new(keychain);
        }
    }

    /// Picks the credential for `repository` on the upstream known to clients as `registry`
    /// (and reached at `endpoint_host`). `Err` carries the message of a module denial.
    pub fn choose(
        &self,
        registry: &str,
        endpoint_host: &str,
        repository: &str,
    ) -> Result<Chosen, String> {
        if let Some(modules) = &self.modules {
            match modules.decide(registry, repository) {
                ModuleDecision::Use { credential, source } => {
                    return Ok(Chosen { credential, source })
                }
                ModuleDecision::Denied(message) => return Err(message),
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
        Ok(Chosen {
            credential: Credential::Anonymous,
            source: "no credentials (anonymous)".into(),
        })
    }
}
