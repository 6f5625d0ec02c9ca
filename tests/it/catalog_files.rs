//! The files source end to end: `Catalog::start` with `catalog.files`, a directory of YAML and
//! JSON, and changes picked up while running.

use crate::support::kube_api;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use oci_proxy::catalog::{Catalog, CatalogError, Decision};
use oci_proxy::config::{CatalogConfig, DefaultSecret};
use oci_proxy::Credential;

const MODULE: &str = r#"
apiVersion: operator.kyma-project.io/v1beta2
kind: ModuleTemplate
metadata: {name: template-operator, namespace: kcp-system}
spec:
  descriptor:
    component:
      name: kyma-project.io/module/template-operator
      version: 1.0.0
      repositoryContexts:
        - {baseUrl: "http://reg.localhost:5000/mods", componentNameMapping: urlPath, type: OCIRegistry}
      resources:
        - name: raw-manifest
          access: {type: localBlob, localReference: "sha256:00"}
          labels:
            - name: oci-registry-cred
              value: {team: templates}
---
# a second document in the same file that is not a catalog object
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

const REPO: &str = "mods/component-descriptors/kyma-project.io/module/template-operator";

fn secret_json(password: &str) -> String {
    let cfg = serde_json::json!({"auths": {"http://reg.localhost:5000": {"username": "robot", "password": password}}});
    serde_json::json!({
        "kind": "List", "apiVersion": "v1",
        "items": [{
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "regcred", "namespace": "kcp-system", "labels": {"team": "templates"}},
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(cfg.to_string())}
        }]
    })
    .to_string()
}

fn password(d: &Decision) -> Option<String> {
    match d {
        Decision::Module {
            credential: Credential::Basic { password, .. },
            ..
        } => Some(password.expose().clone()),
        _ => None,
    }
}

/// Waits until `cond` holds, failing the test after a deadline.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces a file atomically, as editors and ConfigMap updates do.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn files_source_publishes_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("module.yaml"), MODULE).unwrap();
    let secret_file = dir.path().join("secrets.json");
    std::fs::write(&secret_file, secret_json("pw-one-7f3a")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not: read").unwrap();

    let cfg = CatalogConfig {
        files: Some(dir.path().to_path_buf()),
        ..CatalogConfig::default()
    };
    let catalog: Arc<Catalog> = Catalog::start(&cfg).await.unwrap();
    assert!(
        catalog.wait_ready(Duration::from_secs(20)).await,
        "files source never synced"
    );

    let d = catalog.decide("reg.localhost:5000", REPO);
    assert_eq!(password(&d).as_deref(), Some("pw-one-7f3a"), "{d:?}");
    let first_id = match &d {
        Decision::Module { credential, .. } => credential.id(),
        _ => unreachable!(),
    };
    let hosts = catalog.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        (hosts[0].host.as_str(), hosts[0].insecure),
        ("reg.localhost:5000", true)
    );
    assert_eq!(
        catalog.decide("reg.localhost:5000", "mods/other"),
        Decision::NotAModule
    );

    // Rotate the password: the next poll republishes and the credential changes.
    replace(&secret_file, &secret_json("pw-two-9c1e"));
    wait_until("the rotated password", || {
        password(&catalog.decide("reg.localhost:5000", REPO)).as_deref() == Some("pw-two-9c1e")
    })
    .await;
    match catalog.decide("reg.localhost:5000", REPO) {
        Decision::Module {
            credential,
            secret,
            module,
        } => {
            assert_ne!(credential.id(), first_id);
            assert_eq!(secret, "kcp-system/regcred");
            assert_eq!(module, "kcp-system/template-operator");
        }
        other => panic!("{other:?}"),
    }

    // Delete the Secret: the module's selector matches nothing, so the request is denied.
    std::fs::remove_file(&secret_file).unwrap();
    wait_until("the denial after deleting the Secret", || {
        matches!(
            catalog.decide("reg.localhost:5000", REPO),
            Decision::Denied { .. }
        )
    })
    .await;
    let text = catalog.explain("reg.localhost:5000", REPO).to_string();
    assert!(
        text.contains("kcp-system/template-operator") && text.contains("team=templates"),
        "{text}"
    );
    assert!(
        !text.contains("pw-two-9c1e") && !text.contains("pw-one-7f3a"),
        "{text}"
    );
}

#[tokio::test]
async fn default_secret_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({"auths": {"reg.io": {"auth": base64::engine::general_purpose::STANDARD.encode("klm:pw")}}});
    let secret = format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\nmetadata: {{name: oci-cred, namespace: kcp-system}}\nstringData:\n  .dockerconfigjson: '{cfg}'\n"
    );
    std::fs::write(dir.path().join("secret.yml"), secret).unwrap();
    let cfg = CatalogConfig {
        files: Some(dir.path().to_path_buf()),
        default_secret: Some(DefaultSecret {
            namespace: "kcp-system".into(),
            name: "oci-cred".into(),
            subpath: Some("restricted".into()),
        }),
        ..CatalogConfig::default()
    };
    let catalog = Catalog::start(&cfg).await.unwrap();
    assert!(catalog.wait_ready(Duration::from_secs(20)).await);
    match catalog.decide("reg.io", "restricted/component-descriptors/x") {
        Decision::DefaultSecret {
            credential: Credential::Basic { username, .. },
            secret,
        } => assert_eq!(
            (username.as_str(), secret.as_str()),
            ("klm", "kcp-system/oci-cred")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        catalog.decide("reg.io", "elsewhere/x"),
        Decision::NotAModule
    );
}

#[tokio::test]
async fn missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CatalogConfig {
        files: Some(dir.path().join("absent")),
        ..CatalogConfig::default()
    };
    assert!(matches!(
        Catalog::start(&cfg).await,
        Err(CatalogError::FilesDir { .. })
    ));
}

/// Not the files source, but the same end-to-end shape: `Catalog::start_with_client` with
/// `catalog.kubernetes`, against the fake API server, using the real watcher.
mod kubernetes {
    use super::*;
    use oci_proxy::config::KubernetesSource;

    /// A Lifecycle Manager sample object from `tests/data/kyma/`.
    fn sample(name: &str) -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/kyma")
            .join(name);
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn regcred(password: &str) -> serde_json::Value {
        let cfg = serde_json::json!({"auths": {"europe-west3-docker.pkg.dev": {"username": "u", "password": password}}});
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "regcred", "namespace": "kcp-system", "labels": {
                "operator.kyma-project.io/managed-by": "lifecycle-manager",
                "operator.kyma-project.io/oci-registry-cred": "operator-regcred"}},
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(cfg.to_string())}
        })
    }

    #[tokio::test]
    async fn kubernetes_source_feeds_the_catalog() {
        const REG: &str = "europe-west3-docker.pkg.dev";
        const REPO: &str = "sap-kyma-jellyfish-dev/template-operator/component-descriptors/kyma-project.io/module/template-operator";
        let api = kube_api::FakeKubeApi::start().await;
        // LM's sample lives in `default`; here it is where LM keeps templates (kcp-system),
        // the namespace the source watches by default and the Secret's namespace.
        let mut mt = sample("moduletemplate-oci-registry-cred-label.yaml");
        mt["metadata"]["namespace"] = "kcp-system".into();
        api.apply(mt);
        api.apply(regcred("pw-k8s-1"));
        let cfg = CatalogConfig {
            kubernetes: Some(KubernetesSource::default()),
            ..CatalogConfig::default()
        };
        let catalog = Catalog::start_with_client(&cfg, Some(api.client()))
            .await
            .unwrap();
        assert!(
            catalog.wait_ready(Duration::from_secs(20)).await,
            "kubernetes source never synced"
        );
        assert_eq!(
            password(&catalog.decide(REG, REPO)).as_deref(),
            Some("pw-k8s-1")
        );

        api.apply(regcred("pw-k8s-2"));
        wait_until("the rotated Secret", || {
            password(&catalog.decide(REG, REPO)).as_deref() == Some("pw-k8s-2")
        })
        .await;
        assert!(api.delete("Secret", "kcp-system", "regcred"));
        wait_until("the denial", || {
            matches!(catalog.decide(REG, REPO), Decision::Denied { .. })
        })
        .await;
    }
}
