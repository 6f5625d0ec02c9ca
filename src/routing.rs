//! Which upstream and repository a client path names. Only configured upstreams and registry
//! hosts named by the module catalog are ever reachable: the proxy is not an open proxy.
//!
//! A first path segment names a registry only by the rules OCI clients use (docker,
//! go-containerregistry): it contains a dot or a port, or is `localhost`. Anything else
//! (`modules/...`, `library/...`) is a path on the default upstream, whatever a catalog object
//! says. The catalog also decides the scheme per repository: a module's `http://` baseUrl
//! makes that module's repositories plain HTTP, never its host's other repositories.

use std::sync::Arc;

use crate::protocol::grammar::is_registry_host;
pub(crate) use crate::protocol::grammar::names_registry_host;
use crate::protocol::{ErrorCode, OciError, Repository};
use crate::upstream::{Upstream, Upstreams};

/// A repository on an upstream.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub upstream: Arc<Upstream>,
    pub repository: Repository,
}

impl Target {
    /// The key the cache uses for "this repository on this upstream".
    pub(crate) fn repo_key(&self) -> String {
        format!("{}/{}", self.upstream.name, self.repository)
    }
}

/// Extra registry hosts (from the module catalog) that may be routed to.
pub trait HostSource: Send + Sync {
    /// `Some(insecure)` when the host is named by the catalog: whether `repository` on it is
    /// reached over plain HTTP.
    fn lookup_host(&self, host: &str, repository: &str) -> Option<bool>;
}

/// Resolves a validated request name (and containerd's `ns=`) to a target:
/// 1. `ns=<host>` names the upstream and the whole name is the repository;
/// 2. else a first segment naming an upstream (configured, or a module's registry host);
/// 3. else the default upstream; else `NAME_UNKNOWN`.
pub(crate) fn resolve(
    upstreams: &Upstreams,
    hosts: Option<&dyn HostSource>,
    name: &str,
    ns: Option<&str>,
) -> Result<Target, OciError> {
    // Configured upstreams win; a catalog host gets the scheme the catalog gives this
    // repository (`ensure_host` keeps one upstream per host and scheme).
    let find = |host: &str, repository: &str| -> Option<Arc<Upstream>> {
        let catalog = hosts
            .filter(|_| names_registry_host(host))
            .and_then(|h| h.lookup_host(host, repository));
        match catalog {
            Some(insecure) => upstreams.ensure_host(host, insecure),
            None => upstreams.get(host),
        }
    };
    if let Some(ns) = ns {
        let upstream = find(ns, name).ok_or_else(|| unknown_upstream(ns))?;
        return target(upstream, name);
    }
    if let Some((first, rest)) = name.split_once('/') {
        if is_registry_host(first) {
            if let Some(upstream) = find(first, rest) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts_by_the_client_rules() {
        for yes in [
            "reg.io",
            "127.0.0.1:5000",
            "localhost",
            "LOCALHOST",
            "reg:443",
        ] {
            assert!(names_registry_host(yes), "{yes}");
        }
        for no in ["modules", "library", "kyma-project", "", "a..b", "x:y"] {
            assert!(!names_registry_host(no), "{no}");
        }
    }
}
