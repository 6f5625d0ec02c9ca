//! Ambient identity: credentials the proxy's own workload has without any Secret
//! (`credentials.google`, `credentials.ecr`), each for its `hosts`. Both are opt-in: nothing
//! here runs unless configured.
//!
//! The sources live across config reloads while their config is unchanged, so a reload does
//! not throw away a valid token (see [`Ambient::build`]).

use std::sync::Arc;

use super::ecr::{self, Ecr};
use super::google::{self, GoogleFetcher};
use super::refresh::{Refreshing, SourceError, SourceMetrics};
use super::{Credential, Secret};
use crate::config::{AmbientSourceConfig, CredentialsConfig};
use crate::protocol::key_pattern::HostPattern;

/// A setup error of an ambient source.
#[derive(Debug, thiserror::Error)]
pub enum AmbientSetupError {
    #[error("credentials.google: {0}")]
    Google(#[from] google::GoogleSetupError),
    #[error(transparent)]
    Ecr(#[from] ecr::EcrSetupError),
    #[error("credentials.{key}.hosts: {pattern:?} is not a host pattern")]
    Host { key: &'static str, pattern: String },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

struct GoogleSource {
    config: AmbientSourceConfig,
    hosts: Vec<HostPattern>,
    describe: &'static str,
    token: Refreshing<GoogleFetcher>,
}

struct EcrSource {
    config: AmbientSourceConfig,
    hosts: Vec<HostPattern>,
    ecr: Ecr,
}

/// The configured ambient sources (possibly none).
pub struct Ambient {
    metrics: SourceMetrics,
    google: Option<Arc<GoogleSource>>,
    ecr: Option<Arc<EcrSource>>,
}

impl std::fmt::Debug for Ambient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ambient")
            .field("google", &self.google.as_ref().map(|g| g.describe))
            .field("ecr", &self.ecr.is_some())
            .finish()
    }
}

/// What an ambient source answered for a registry.
pub enum AmbientAnswer {
    Use {
        credential: Credential,
        source: String,
    },
    /// The source applies but has no valid token (e.g. the metadata server is down).
    Unavailable {
        source_name: &'static str,
        error: SourceError,
    },
}

fn patterns(
    source: &'static str,
    config: &AmbientSourceConfig,
    defaults: &[&str],
) -> Result<Vec<HostPattern>, AmbientSetupError> {
    let raw: Vec<String> = match &config.hosts {
        Some(h) => h.clone(),
        None => defaults.iter().map(|s| s.to_string()).collect(),
    };
    raw.iter()
        .map(|p| {
            HostPattern::parse(p).ok_or_else(|| AmbientSetupError::Host {
                key: source,
                pattern: p.clone(),
            })
        })
        .collect()
}

impl Ambient {
    /// No sources (and a metric family registered nowhere).
    pub fn none() -> Ambient {
        Ambient {
            metrics: SourceMetrics::unregistered(),
            google: None,
            ecr: None,
        }
    }

    /// The sources of `config`. With `previous`, its metric family and every source whose
    /// config is unchanged (with its cached token) are kept; otherwise the metric family is
    /// registered in `registry`.
    pub fn build(
        config: &CredentialsConfig,
        previous: Option<&Ambient>,
        registry: &prometheus::Registry,
    ) -> Result<Ambient, AmbientSetupError> {
        let metrics = match previous {
            Some(p) => p.metrics.clone(),
            None => SourceMetrics::register(registry)?,
        };
        let google = match &config.google {
            None => None,
            Some(c) => match previous.and_then(|p| p.google.clone()) {
                Some(g) if g.config == *c => Some(g),
                _ => {
                    let fetcher = GoogleFetcher::from_env()?;
                    let describe = fetcher.describe();
                    tracing::info!(source = describe, "credentials.google enabled");
                    Some(Arc::new(GoogleSource {
                        hosts: patterns("google", c, &google::DEFAULT_HOSTS)?,
                        config: c.clone(),
                        describe,
                        token: Refreshing::new("google", fetcher, metrics.clone()),
                    }))
                }
            },
        };
        let ecr = match &config.ecr {
            None => None,
            Some(c) => match previous.and_then(|p| p.ecr.clone()) {
                Some(e) if e.config == *c => Some(e),
                _ => {
                    tracing::info!(source = "ecr", "credentials.ecr enabled");
                    Some(Arc::new(EcrSource {
                        hosts: patterns("ecr", c, &ecr::DEFAULT_HOSTS)?,
                        config: c.clone(),
                        ecr: Ecr::from_env(metrics.clone())?,
                    }))
                }
            },
        };
        Ok(Ambient {
            metrics,
            google,
            ecr,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.google.is_none() && self.ecr.is_none()
    }

    /// The ambient credential for the upstream known as `registry` (reached at
    /// `endpoint_host`), or `None` when no source applies to either name.
    pub async fn credential(&self, registry: &str, endpoint_host: &str) -> Option<AmbientAnswer> {
        let hit = |hosts: &[HostPattern]| {
            [registry, endpoint_host]
                .into_iter()
                .find_map(|h| hosts.iter().find(|p| p.matches(h)).map(|p| (h, p.clone())))
        };
        if let Some(g) = &self.google {
            if let Some((_, pattern)) = hit(&g.hosts) {
                return Some(match g.token.get().await {
                    Ok(token) => AmbientAnswer::Use {
                        credential: basic(google::USERNAME, token),
                        source: format!(
                            "{} (credentials.google, hosts entry {pattern})",
                            g.describe
                        ),
                    },
                    Err(error) => AmbientAnswer::Unavailable {
                        source_name: g.describe,
                        error,
                    },
                });
            }
        }
        if let Some(e) = &self.ecr {
            if let Some((_, pattern)) = hit(&e.hosts) {
                return Some(match e.ecr.password(&[registry, endpoint_host]).await {
                    Ok(token) => AmbientAnswer::Use {
                        credential: basic(ecr::USERNAME, token),
                        source: format!("ecr (credentials.ecr, hosts entry {pattern})"),
                    },
                    Err(error) => AmbientAnswer::Unavailable {
                        source_name: "ecr",
                        error,
                    },
                });
            }
        }
        None
    }
}

fn basic(username: &str, token: Secret<String>) -> Credential {
    Credential::Basic {
        username: username.to_string(),
        password: token,
    }
}
