#![allow(dead_code)]
//! TEMPORARY private stand-in for `crate::credentials::{dockerconfig, keychain}` while those
//! modules are written on another branch. Same names and signatures as the agreed API, with a
//! simplified version of go-containerregistry's rules. Deleted once the real modules land.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;

use crate::credentials::{Credential, Secret};

#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("invalid docker config: {0}")]
    Invalid(String),
    #[error("expected exactly one registry in auths, found {0}")]
    NotSingle(usize),
}

pub struct AuthEntry {
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub identity_token: Option<Secret<String>>,
    pub registry_token: Option<Secret<String>>,
}

impl AuthEntry {
    pub fn credential(&self) -> Credential {
        if let Some(t) = &self.registry_token {
            return Credential::RegistryToken(t.clone());
        }
        if let Some(t) = &self.identity_token {
            return Credential::IdentityToken(t.clone());
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Credential::Basic {
                username: u.clone(),
                password: p.clone(),
            },
            _ => Credential::Anonymous,
        }
    }

    fn from_value(v: &Value) -> Result<AuthEntry, DockerConfigError> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let mut username = s("username").map(str::to_owned);
        let mut password = s("password").map(|p| Secret::new(p.to_owned()));
        if let Some(auth) = s("auth") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .map_err(|_| DockerConfigError::Invalid("auth is not base64".into()))?;
            let text = String::from_utf8(raw)
                .map_err(|_| DockerConfigError::Invalid("auth is not UTF-8".into()))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| DockerConfigError::Invalid("auth is not user:password".into()))?;
            username = Some(u.to_owned());
            password = Some(Secret::new(p.to_owned()));
        }
        Ok(AuthEntry {
            username,
            password,
            identity_token: s("identitytoken").map(|t| Secret::new(t.to_owned())),
            registry_token: s("registrytoken").map(|t| Secret::new(t.to_owned())),
        })
    }
}

pub struct DockerConfig {
    pub auths: BTreeMap<String, AuthEntry>,
}

impl DockerConfig {
    pub fn from_dockerconfigjson(bytes: &[u8]) -> Result<Self, DockerConfigError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|_| DockerConfigError::Invalid("not JSON".into()))?;
        Self::from_map(v.get("auths").unwrap_or(&Value::Null))
    }

    pub fn from_dockercfg(bytes: &[u8]) -> Result<Self, DockerConfigError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|_| DockerConfigError::Invalid("not JSON".into()))?;
        Self::from_map(&v)
    }

    fn from_map(v: &Value) -> Result<Self, DockerConfigError> {
        let mut auths = BTreeMap::new();
        if let Some(map) = v.as_object() {
            for (k, e) in map {
                auths.insert(k.clone(), AuthEntry::from_value(e)?);
            }
        } else if !v.is_null() {
            return Err(DockerConfigError::Invalid("auths is not an object".into()));
        }
        Ok(DockerConfig { auths })
    }

    pub fn single_registry(&self) -> Result<RegistryBase, DockerConfigError> {
        if self.auths.len() != 1 {
            return Err(DockerConfigError::NotSingle(self.auths.len()));
        }
        let key = self
            .auths
            .keys()
            .next()
            .map(String::as_str)
            .unwrap_or_default();
        let insecure = key.starts_with("http://");
        let rest = key
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        Ok(RegistryBase {
            host: host.to_owned(),
            path: path.trim_matches('/').to_owned(),
            insecure,
        })
    }
}

pub struct RegistryBase {
    pub host: String,
    pub path: String,
    pub insecure: bool,
}

#[derive(Default)]
pub struct Keychain {
    entries: Vec<(String, String, Credential)>,
}

impl Keychain {
    pub fn new() -> Self {
        Keychain::default()
    }

    pub fn add(&mut self, source: &str, config: &DockerConfig) {
        for (k, e) in &config.auths {
            let key = k
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            let key = key
                .trim_end_matches('/')
                .replace("/v1", "")
                .replace("/v2", "");
            self.entries.push((key, source.to_owned(), e.credential()));
        }
        self.entries.sort_by(|a, b| b.0.cmp(&a.0));
    }

    pub fn resolve(&self, registry: &str, repository: &str) -> Option<KeychainMatch> {
        let target = format!("{registry}/{repository}");
        self.entries
            .iter()
            .find(|(k, _, _)| {
                let (host, path) = k.split_once('/').unwrap_or((k, ""));
                host.eq_ignore_ascii_case(registry) && repository.starts_with(path)
                    || target.starts_with(k.as_str()) && k.contains('/')
            })
            .map(|(k, s, c)| KeychainMatch {
                key: k.clone(),
                source: s.clone(),
                credential: c.clone(),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

pub struct KeychainMatch {
    pub key: String,
    pub source: String,
    pub credential: Credential,
}
