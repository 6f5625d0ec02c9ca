//! The catalog as the app sees it: [`ModuleCredentials`] for the credential chain and
//! [`HostSource`] for routing. Thin mappings of [`Catalog::decide`] and [`Catalog::scheme`],
//! here where the app is assembled so that the catalog depends on neither routing nor the
//! upstreams behind it.

use crate::catalog::{Catalog, Decision};
use crate::credentials::chain::{ModuleCredentials, ModuleDecision};
use crate::routing::HostSource;

impl ModuleCredentials for Catalog {
    fn decide(&self, registry_host: &str, repository: &str) -> ModuleDecision {
        match Catalog::decide(self, registry_host, repository) {
            Decision::NotAModule => ModuleDecision::NotAModule,
            Decision::Denied { message } => ModuleDecision::Denied(message),
            Decision::Module {
                module,
                credential,
                secret,
            } => {
                let source = if secret.is_empty() {
                    format!("module {module} (no keychain entry matches: anonymous)")
                } else {
                    format!("module {module}, Secret {secret}")
                };
                ModuleDecision::Use { credential, source }
            }
            Decision::DefaultSecret { credential, secret } => ModuleDecision::Use {
                credential,
                source: format!("default Secret {secret}"),
            },
        }
    }
}

impl HostSource for Catalog {
    fn lookup_host(&self, host: &str, repository: &str) -> Option<bool> {
        Catalog::scheme(self, host, repository)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn maps_decisions_and_hosts() {
        let c = Catalog::new(None);
        c.publish(
            "t",
            vec![json!({
                "apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"descriptor": {"component": {
                    "name": "kyma-project.io/module/m",
                    "labels": [{"name": "oci-registry-cred", "value": {"k": "v"}}],
                    "repositoryContexts": [{"baseUrl": "http://Reg.Localhost:5000", "type": "OCIRegistry"}]
                }}}
            })],
        );
        let chain: &dyn ModuleCredentials = c.as_ref();
        let repo = "component-descriptors/kyma-project.io/module/m";
        assert!(
            matches!(chain.decide("reg.localhost:5000", repo), ModuleDecision::Denied(m) if m.contains("ns/m"))
        );
        assert!(matches!(
            chain.decide("reg.localhost:5000", "other"),
            ModuleDecision::NotAModule
        ));
        let hosts: &dyn HostSource = c.as_ref();
        assert_eq!(hosts.lookup_host("REG.localhost:5000", repo), Some(true));
        // The module's http:// is for its own repositories only.
        assert_eq!(
            hosts.lookup_host("reg.localhost:5000", "other"),
            Some(false)
        );
        assert_eq!(hosts.lookup_host("ghcr.io", repo), None);
    }
}
