//! Metrics of the module catalog: what the current index holds, whether the catalog is
//! ready, and how its sources fare. Registered once per process (with the server's other
//! families) because a config reload may start a new catalog. Labels are bounded: `source`
//! is `files` or `kubernetes`, `resource` one of `moduletemplates`, `modulereleasemetas`,
//! `manifests`, `secrets`.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub struct CatalogMetrics {
    modules: IntGauge,
    secrets: IntGauge,
    skipped: IntGauge,
    empty_selectors: IntGauge,
    ready: IntGauge,
    updates: IntCounterVec,
    watch_errors: IntCounterVec,
}

impl CatalogMetrics {
    pub fn register(registry: &Registry) -> Result<CatalogMetrics, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(CatalogMetrics {
            modules: gauge(
                "oci_proxy_catalog_modules",
                "Modules (ModuleTemplates, ModuleReleaseMetas, Manifest sources) in the catalog's \
                 current index.",
            )?,
            secrets: gauge(
                "oci_proxy_catalog_secrets",
                "dockerconfigjson Secrets in the catalog's current index.",
            )?,
            skipped: gauge(
                "oci_proxy_catalog_skipped_objects",
                "Malformed objects left out of the catalog's current index.",
            )?,
            empty_selectors: gauge(
                "oci_proxy_catalog_empty_selectors",
                "Modules whose credential selector is empty ({}): refused, their repositories are \
                 denied.",
            )?,
            ready: {
                let g = gauge(
                    "oci_proxy_catalog_ready",
                    "1 once every catalog source finished its first full read (also without a \
                     catalog), else 0.",
                )?;
                g.set(1);
                g
            },
            updates: counter(
                "oci_proxy_catalog_updates_total",
                "Object sets published by a catalog source (each rebuilds the index).",
                "source",
            )?,
            watch_errors: counter(
                "oci_proxy_catalog_watch_errors_total",
                "Failed Kubernetes list/watch calls of the catalog (retried with backoff).",
                "resource",
            )?,
        })
    }

    pub(super) fn indexed(
        &self,
        modules: usize,
        secrets: usize,
        skipped: usize,
        empty_selectors: usize,
    ) {
        let set = |g: &IntGauge, n: usize| g.set(i64::try_from(n).unwrap_or(i64::MAX));
        set(&self.modules, modules);
        set(&self.secrets, secrets);
        set(&self.skipped, skipped);
        set(&self.empty_selectors, empty_selectors);
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub(super) fn updated(&self, source: &str) {
        self.updates.with_label_values(&[source]).inc();
    }

    pub fn watch_error(&self, resource: &str) {
        self.watch_errors.with_label_values(&[resource]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_values() {
        let registry = Registry::new();
        let m = CatalogMetrics::register(&registry).unwrap();
        assert_eq!(m.ready.get(), 1, "ready without a catalog");
        m.set_ready(false);
        assert_eq!(m.ready.get(), 0);
        m.indexed(3, 2, 1, 1);
        m.set_ready(true);
        m.updated("kubernetes");
        m.watch_error("secrets");
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .unwrap();
        for line in [
            "oci_proxy_catalog_modules 3",
            "oci_proxy_catalog_secrets 2",
            "oci_proxy_catalog_skipped_objects 1",
            "oci_proxy_catalog_empty_selectors 1",
            "oci_proxy_catalog_ready 1",
            "oci_proxy_catalog_updates_total{source=\"kubernetes\"} 1",
            "oci_proxy_catalog_watch_errors_total{resource=\"secrets\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(
            CatalogMetrics::register(&registry).is_err(),
            "registered once"
        );
    }
}
