//! Which upstream and repository a client path names. Only configured upstreams and registry
//! hosts named by the module catalog are ever reachable: the proxy is not an open proxy.

use std::sync::Arc;

use crate::protocol::grammar::is_registry_host;
use crate::protocol::{ErrorCode, OciError, Repository};
use crate::upstream::{Upstream, Upstreams};

/// A repository on an upstream.
#[derive(Clone, Debug)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub repository: Repository,
}

impl Target {
    /// The key the cache uses for "this repository on this upstream".
    pub fn repo_key(&self) -> String {
        format!("{}/{}", self.upstream.name, self.repository)
    }
}

/// Extra registry hosts (from the module catalog) that may be routed to.
pub trait HostSource: Send + Sync {
    /// `Some(insecure)` when the host is named by a module.
    fn lookup_host(&self, host: &str) -> Option<bool>;
}

/// Resolves a validated request name (and containerd's `ns=`) to a target:
/// 1. `ns=<host>` names the upstream and the whole name is the repository;
/// 2. else a first segment naming an upstream (configured, or a module's registry host);
/// 3. else the default upstream; else `NAME_UNKNOWN`.
pub fn resolve(
    upstreams: &Upstreams,
    hosts: Option<&dyn HostSource>,
    name: &str,
    ns: Option<&str>,
) -> Result<Target, OciError> {
    let find = |host: &str| -> Option<Arc<Upstream>> {
        upstreams.get(host).or_else(|| {
            let insecure = hosts?.lookup_host(host)?;
            upstreams.ensure_host(host, insecure)
        })
    };
    if let Some(ns) = ns {
        let upstream = find(ns).ok_or_else(|| unknown_upstream(ns))?;
        return target(upstream, name);
    }
    if let Some((first, rest)) = name.split_once('/') {
        if is_registry_host(first) {
            if let Some(upstream) = find(first) {
                return target(upstream, rest);
            }
        }
    }
    match upstreams.default_upstream() {
        Some(upstream) => target(upstream, name),
        None => Err(unknown_upstream(name.split('/').next().unwrap_or(name))),
    }
}

fn target(upstream: Arc<Upstream>, repository: &str) -> Result<Target, OciError> {
    // Docker Hub's official images live under library/.
    let repository = if is_docker_hub(&upstream.name) && !repository.contains('/') {
        Repository::parse(&format!("library/{repository}"))?
    } else {
        Repository::parse(repository)?
    };
    Ok(Target {
        upstream,
        repository,
    })
}

fn is_docker_hub(name: &str) -> bool {
    matches!(
        name,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

fn unknown_upstream(host: &str) -> OciError {
    OciError::new(
        ErrorCode::NameUnknown,
        format!(
            "{:?} is not a configured upstream or a module registry, and no default upstream is set",
            crate::protocol::grammar::truncate(host)
        ),
    )
}
