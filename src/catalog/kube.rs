//! STUB: the Kubernetes source (watchers for ModuleTemplates, Manifests and Secrets).
