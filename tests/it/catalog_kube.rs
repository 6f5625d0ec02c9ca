//! The Kubernetes catalog source against a fake API server, with the real kube client
//! over HTTP: initial list and sync, label/type/namespace filtering, live changes,
//! 410 re-lists, bookmarks, missing CRDs, and `client()` from a kubeconfig.

use crate::support::kube_api;

use std::time::Duration;

use base64::Engine as _;
use kube_api::{FakeKubeApi, LoggedRequest, Res};
use oci_proxy::catalog::kube as source;
use oci_proxy::config::{DefaultSecret, KubernetesSource};
use serde_json::{json, Value};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(20);
const MANAGED_BY: &str = "operator.kyma-project.io/managed-by";

fn module_template(ns: &str, name: &str, version: &str) -> Value {
    json!({
        "apiVersion": "operator.kyma-project.io/v1beta2",
        "kind": "ModuleTemplate",
        "metadata": {"namespace": ns, "name": name, "labels": {"operator.kyma-project.io/module-name": "template-operator"}},
        "spec": {"moduleName": "template-operator", "version": version, "descriptor": {"component": {"name": "kyma-project.io/module/template-operator"}}},
    })
}

fn manifest(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "operator.kyma-project.io/v1beta2",
        "kind": "Manifest",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"install": {"name": "raw-manifest", "source": {"repo": "registry.example/component-descriptors", "name": "kyma-project.io/module/template-operator", "ref": "sha256:00", "type": "oci-ref", "credSecretSelector": {"matchLabels": {"operator.kyma-project.io/oci-registry-cred": "operator-regcred"}}}}},
    })
}

fn secret(ns: &str, name: &str, ty: &str, labels: Value, password: &str) -> Value {
    let config = json!({"auths": {"registry.example": {"username": "user", "password": password}}});
    let b64 = base64::engine::general_purpose::STANDARD.encode(config.to_string());
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "type": ty,
        "data": {".dockerconfigjson": b64},
    })
}

fn managed_secret(ns: &str, name: &str, password: &str) -> Value {
    secret(
        ns,
        name,
        "kubernetes.io/dockerconfigjson",
        json!({MANAGED_BY: "lifecycle-manager", "operator.kyma-project.io/oci-registry-cred": "operator-regcred"}),
        password,
    )
}

/// The password inside a published Secret's `.dockerconfigjson`.
fn password_of(obj: &Value) -> Option<String> {
    let b64 = obj["data"][".dockerconfigjson"].as_str()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let config: Value = serde_json::from_slice(&raw).ok()?;
    config["auths"]["registry.example"]["password"]
        .as_str()
        .map(str::to_string)
}

/// `kind/namespace/name` of every object in a snapshot.
fn ids(snapshot: &[Value]) -> Vec<String> {
    snapshot
        .iter()
        .map(|o| {
            format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["namespace"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn find<'a>(snapshot: &'a [Value], id: &str) -> Option<&'a Value> {
    snapshot
        .iter()
        .find(|o| ids(std::slice::from_ref(o))[0] == id)
}

/// The source running against a fake API server, with its published state observable.
struct Harness {
    api: FakeKubeApi,
    /// (number of publishes, last published set)
    published: watch::Receiver<(usize, Vec<Value>)>,
    /// (number of `synced` calls, publishes seen at the first `synced` call)
    synced: watch::Receiver<(usize, usize)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    async fn start(api: FakeKubeApi, cfg: KubernetesSource) -> Harness {
        Harness::start_with(api, cfg, None).await
    }

    /// [`Harness::start`] with a named default Secret.
    async fn start_with(
        api: FakeKubeApi,
        cfg: KubernetesSource,
        default_secret: Option<DefaultSecret>,
    ) -> Harness {
        let (pub_tx, published) = watch::channel((0usize, Vec::new()));
        let (sync_tx, synced) = watch::channel((0usize, 0usize));
        let pub_tx = std::sync::Arc::new(pub_tx);
        let pub_count = pub_tx.clone();
        let client = api.client();
        let task = tokio::spawn(async move {
            let result = source::run(
                client,
                cfg,
                default_secret,
                move |objects| pub_tx.send_modify(|(n, set)| (*n, *set) = (*n + 1, objects)),
                move || {
                    let publishes = pub_count.borrow().0;
                    sync_tx.send_modify(|(n, at)| {
                        if *n == 0 {
                            *at = publishes;
                        }
                        *n += 1;
                    });
                },
                |_resource: &str| {},
            )
            .await;
            panic!("source::run returned: {result:?}");
        });
        Harness {
            api,
            published,
            synced,
            task,
        }
    }

    async fn wait_synced(&mut self) {
        tokio::time::timeout(DEADLINE, self.synced.wait_for(|(n, _)| *n >= 1))
            .await
            .expect("synced within the deadline")
            .expect("synced channel open");
    }

    /// Waits until the last published set satisfies `pred`, returning it.
    async fn wait_published(&mut self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let found = {
            let wait = self.published.wait_for(|(n, set)| *n > 0 && pred(set));
            match tokio::time::timeout(DEADLINE, wait).await {
                Ok(Ok(guard)) => Some(guard.1.clone()),
                _ => None,
            }
        };
        match found {
            Some(set) => set,
            None => panic!(
                "not published within the deadline: {what}; last set: {:?}",
                ids(&self.published.borrow().1)
            ),
        }
    }

    async fn wait_open_watches(&self, n: usize) {
        self.api.wait_for_open_watches(n, DEADLINE).await;
    }

    fn current(&self) -> Vec<Value> {
        self.published.borrow().1.clone()
    }
}

fn requests_for(log: &[LoggedRequest], res: Res) -> Vec<LoggedRequest> {
    log.iter()
        .filter(|r| r.resource() == Some(res))
        .cloned()
        .collect()
}

#[tokio::test]
async fn initial_list_publishes_all_kinds_then_syncs_once() {
    let api = FakeKubeApi::start().await;
    api.apply(module_template(
        "kcp-system",
        "template-operator-1.0.0",
        "1.0.0",
    ));
    api.apply(manifest("kcp-system", "manifest-a"));
    api.apply(manifest("kyma-system", "outside-kcp-system"));
    api.apply(managed_secret("kcp-system", "regcred", "s3cret"));
    // The default namespaces are [kcp-system], where LM keeps its objects.
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;

    let (synced_calls, publishes_before_sync) = *h.synced.borrow();
    assert_eq!(synced_calls, 1);
    assert!(
        publishes_before_sync >= 1,
        "the full set is published before synced()"
    );
    let set = h.current();
    assert_eq!(
        ids(&set),
        vec![
            "Manifest/kcp-system/manifest-a",
            "ModuleTemplate/kcp-system/template-operator-1.0.0",
            "Secret/kcp-system/regcred",
        ]
    );
    let mt = find(&set, "ModuleTemplate/kcp-system/template-operator-1.0.0").expect("mt");
    assert_eq!(mt["apiVersion"], "operator.kyma-project.io/v1beta2");
    assert_eq!(mt["spec"]["version"], "1.0.0");
    let m = find(&set, "Manifest/kcp-system/manifest-a").expect("manifest");
    assert_eq!(
        m["spec"]["install"]["source"]["credSecretSelector"]["matchLabels"]
            ["operator.kyma-project.io/oci-registry-cred"],
        "operator-regcred"
    );
    let s = find(&set, "Secret/kcp-system/regcred").expect("secret");
    assert_eq!(s["apiVersion"], "v1");
    assert_eq!(s["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(s["metadata"]["labels"][MANAGED_BY], "lifecycle-manager");
    assert_eq!(password_of(s).as_deref(), Some("s3cret"));
}

#[tokio::test]
async fn secrets_are_filtered_by_the_default_label_selector_on_the_server() {
    let api = FakeKubeApi::start().await;
    api.apply(managed_secret("kcp-system", "managed", "a"));
    api.apply(secret(
        "kcp-system",
        "unmanaged",
        "kubernetes.io/dockerconfigjson",
        json!({"operator.kyma-project.io/oci-registry-cred": "operator-regcred"}),
        "b",
    ));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    assert_eq!(ids(&h.current()), vec!["Secret/kcp-system/managed"]);

    // A change to the unmanaged Secret is never published; a later managed change is.
    h.api.apply(secret(
        "kcp-system",
        "unmanaged",
        "kubernetes.io/dockerconfigjson",
        json!({"other": "label"}),
        "c",
    ));
    h.api.apply(managed_secret("kcp-system", "managed-2", "d"));
    let set = h
        .wait_published("managed-2", |s| {
            find(s, "Secret/kcp-system/managed-2").is_some()
        })
        .await;
    assert!(find(&set, "Secret/kcp-system/unmanaged").is_none());

    // The selector travels with every Secret list and watch request, and only there.
    h.wait_open_watches(4).await;
    let log = h.api.request_log();
    let secrets = requests_for(&log, Res::Secrets);
    assert!(secrets.iter().any(|r| !r.is_watch()), "a list: {secrets:?}");
    assert!(
        secrets.iter().any(LoggedRequest::is_watch),
        "a watch: {secrets:?}"
    );
    for r in &secrets {
        assert_eq!(
            r.param("labelSelector"),
            Some("operator.kyma-project.io/managed-by=lifecycle-manager"),
            "{r:?}"
        );
    }
    for r in requests_for(&log, Res::ModuleTemplates) {
        assert_eq!(r.param("labelSelector"), None, "{r:?}");
    }
}

#[tokio::test]
async fn an_empty_selector_watches_every_docker_secret() {
    let api = FakeKubeApi::start().await;
    api.apply(secret(
        "kcp-system",
        "unlabelled",
        "kubernetes.io/dockercfg",
        json!({}),
        "x",
    ));
    let cfg = KubernetesSource {
        secret_label_selector: String::new(),
        ..KubernetesSource::default()
    };
    let mut h = Harness::start(api, cfg).await;
    h.wait_synced().await;
    assert_eq!(ids(&h.current()), vec!["Secret/kcp-system/unlabelled"]);
    let log = h.api.request_log();
    assert!(requests_for(&log, Res::Secrets)
        .iter()
        .all(|r| r.param("labelSelector").is_none()));
}

#[tokio::test]
async fn secrets_of_other_types_are_ignored() {
    let api = FakeKubeApi::start().await;
    let labels = json!({MANAGED_BY: "lifecycle-manager"});
    api.apply(secret(
        "kcp-system",
        "opaque",
        "Opaque",
        labels.clone(),
        "o",
    ));
    api.apply(secret(
        "kcp-system",
        "tls",
        "kubernetes.io/tls",
        labels.clone(),
        "t",
    ));
    api.apply(secret(
        "kcp-system",
        "cfg",
        "kubernetes.io/dockercfg",
        labels.clone(),
        "c",
    ));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    assert_eq!(ids(&h.current()), vec!["Secret/kcp-system/cfg"]);

    // Live: another Opaque one stays out, a dockerconfigjson one comes in.
    h.api.apply(secret(
        "kcp-system",
        "opaque-2",
        "Opaque",
        labels.clone(),
        "o2",
    ));
    h.api.apply(managed_secret("kcp-system", "json", "j"));
    let set = h
        .wait_published("json secret", |s| {
            find(s, "Secret/kcp-system/json").is_some()
        })
        .await;
    assert_eq!(
        ids(&set),
        vec!["Secret/kcp-system/cfg", "Secret/kcp-system/json"]
    );
}

#[tokio::test]
async fn namespaces_restrict_what_is_watched() {
    let api = FakeKubeApi::start().await;
    api.apply(module_template("kcp-system", "mt-in", "1.0.0"));
    api.apply(module_template("default", "mt-out", "1.0.0"));
    api.apply(manifest("kyma-system", "manifest-in"));
    api.apply(manifest("default", "manifest-out"));
    api.apply(managed_secret("kcp-system", "secret-in", "a"));
    api.apply(managed_secret("default", "secret-out", "b"));
    let cfg = KubernetesSource {
        namespaces: vec!["kcp-system".into(), "kyma-system".into()],
        ..KubernetesSource::default()
    };
    let mut h = Harness::start(api, cfg).await;
    h.wait_synced().await;
    assert_eq!(
        ids(&h.current()),
        vec![
            "Manifest/kyma-system/manifest-in",
            "ModuleTemplate/kcp-system/mt-in",
            "Secret/kcp-system/secret-in",
        ]
    );

    // Live changes outside the namespaces are not seen; inside they are.
    h.api.apply(managed_secret("default", "secret-out-2", "c"));
    h.api
        .apply(module_template("kyma-system", "mt-in-2", "2.0.0"));
    let set = h
        .wait_published("mt-in-2", |s| {
            find(s, "ModuleTemplate/kyma-system/mt-in-2").is_some()
        })
        .await;
    assert!(find(&set, "Secret/default/secret-out-2").is_none());

    let log = h.api.request_log();
    assert!(!log.is_empty());
    for r in &log {
        assert!(
            r.path.contains("/namespaces/kcp-system/")
                || r.path.contains("/namespaces/kyma-system/"),
            "no cluster-wide request: {r:?}"
        );
    }
}

#[tokio::test]
async fn applies_modifications_and_deletions_are_published() {
    let api = FakeKubeApi::start().await;
    api.apply(module_template("kcp-system", "mt", "1.0.0"));
    api.apply(managed_secret("kcp-system", "regcred", "old"));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    assert_eq!(ids(&h.current()).len(), 2);

    h.api.apply(manifest("kcp-system", "new-manifest"));
    h.wait_published("added manifest", |s| {
        find(s, "Manifest/kcp-system/new-manifest").is_some()
    })
    .await;

    h.api
        .apply(managed_secret("kcp-system", "regcred", "rotated"));
    h.wait_published("rotated password", |s| {
        find(s, "Secret/kcp-system/regcred")
            .and_then(password_of)
            .as_deref()
            == Some("rotated")
    })
    .await;

    h.api.apply(module_template("kcp-system", "mt", "1.1.0"));
    h.wait_published("modified template", |s| {
        find(s, "ModuleTemplate/kcp-system/mt").map(|o| o["spec"]["version"].clone())
            == Some(json!("1.1.0"))
    })
    .await;

    assert!(h.api.delete("ModuleTemplate", "kcp-system", "mt"));
    h.wait_published("deleted template", |s| {
        find(s, "ModuleTemplate/kcp-system/mt").is_none()
    })
    .await;

    // Losing the selector label is a deletion for this watch.
    h.api.apply(secret(
        "kcp-system",
        "regcred",
        "kubernetes.io/dockerconfigjson",
        json!({}),
        "rotated",
    ));
    let set = h
        .wait_published("unlabelled secret gone", |s| {
            find(s, "Secret/kcp-system/regcred").is_none()
        })
        .await;
    assert_eq!(ids(&set), vec!["Manifest/kcp-system/new-manifest"]);
    assert_eq!(h.synced.borrow().0, 1, "synced() is called once");
}

#[tokio::test]
async fn a_burst_of_changes_is_published_as_fewer_full_sets() {
    let api = FakeKubeApi::start().await;
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    let before = h.published.borrow().0;
    for i in 0..20 {
        h.api
            .apply(module_template("kcp-system", &format!("mt-{i}"), "1.0.0"));
    }
    let set = h
        .wait_published("all 20 templates", |s| s.len() == 20)
        .await;
    assert_eq!(ids(&set).len(), 20);
    let publishes = h.published.borrow().0 - before;
    assert!(
        (1..20).contains(&publishes),
        "20 changes were debounced into {publishes} publishes"
    );
}

#[tokio::test]
async fn a_410_gone_forces_a_relist_and_the_state_converges() {
    let api = FakeKubeApi::start().await;
    api.apply(module_template("kcp-system", "mt", "1.0.0"));
    api.apply(managed_secret("kcp-system", "regcred", "v1"));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    h.wait_open_watches(4).await;
    let lists_before = requests_for(&h.api.request_log(), Res::Secrets)
        .iter()
        .filter(|r| !r.is_watch())
        .count();

    // Changes whose events are lost: only a re-list can reveal them.
    h.api
        .apply_quietly(managed_secret("kcp-system", "regcred", "v2"));
    h.api
        .apply_quietly(managed_secret("kcp-system", "regcred-2", "w"));
    h.api
        .apply_quietly(module_template("kcp-system", "mt", "2.0.0"));
    h.api.expire_watches();

    let set = h
        .wait_published("converged after re-list", |s| {
            find(s, "Secret/kcp-system/regcred")
                .and_then(password_of)
                .as_deref()
                == Some("v2")
                && find(s, "Secret/kcp-system/regcred-2").is_some()
                && find(s, "ModuleTemplate/kcp-system/mt").map(|o| o["spec"]["version"].clone())
                    == Some(json!("2.0.0"))
        })
        .await;
    assert_eq!(ids(&set).len(), 3);
    let lists_after = requests_for(&h.api.request_log(), Res::Secrets)
        .iter()
        .filter(|r| !r.is_watch())
        .count();
    assert!(lists_after > lists_before, "the Secrets were re-listed");

    // Watching resumes after the re-list.
    h.api.apply(manifest("kcp-system", "after-relist"));
    h.wait_published("event after re-list", |s| {
        find(s, "Manifest/kcp-system/after-relist").is_some()
    })
    .await;
    assert_eq!(
        h.synced.borrow().0,
        1,
        "a re-list does not call synced() again"
    );
}

#[tokio::test]
async fn bookmarks_do_not_disturb_the_watch() {
    let api = FakeKubeApi::start().await;
    api.apply(managed_secret("kcp-system", "regcred", "a"));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    h.wait_open_watches(4).await;

    let log = h.api.request_log();
    let watches: Vec<_> = log.iter().filter(|r| r.is_watch()).collect();
    assert!(!watches.is_empty());
    for w in &watches {
        assert_eq!(w.param("allowWatchBookmarks"), Some("true"), "{w:?}");
        assert!(w.param("resourceVersion").is_some(), "{w:?}");
    }

    let watch_requests = |h: &Harness| h.api.request_log().iter().filter(|r| r.is_watch()).count();
    let watches_before = watch_requests(&h);
    assert_eq!(h.api.send_bookmarks(), 4);
    // Bookmarks move the watch's resource version past changes of other kinds.
    h.api.apply(module_template("kcp-system", "mt", "1.0.0"));
    assert_eq!(h.api.send_bookmarks(), 4);
    h.api.apply(managed_secret("kcp-system", "regcred", "b"));
    let set = h
        .wait_published("changes after bookmarks", |s| {
            find(s, "Secret/kcp-system/regcred")
                .and_then(password_of)
                .as_deref()
                == Some("b")
                && find(s, "ModuleTemplate/kcp-system/mt").is_some()
        })
        .await;
    assert_eq!(ids(&set).len(), 2);
    assert_eq!(watch_requests(&h), watches_before, "no watch was restarted");
}

#[tokio::test]
async fn a_missing_crd_counts_as_empty_and_is_picked_up_later() {
    let api = FakeKubeApi::start().await;
    api.set_served("Manifest", false);
    api.apply(module_template("kcp-system", "mt", "1.0.0"));
    api.apply(managed_secret("kcp-system", "regcred", "a"));
    let mut h = Harness::start(api, KubernetesSource::default()).await;
    h.wait_synced().await;
    assert_eq!(
        ids(&h.current()),
        vec!["ModuleTemplate/kcp-system/mt", "Secret/kcp-system/regcred"]
    );

    // The CRD gets installed: the retried list finds it.
    h.api.apply(manifest("kcp-system", "late"));
    h.api.set_served("Manifest", true);
    h.wait_published("manifest after CRD install", |s| {
        find(s, "Manifest/kcp-system/late").is_some()
    })
    .await;
}

#[tokio::test]
async fn fake_paginates_lists_like_the_api_server() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ListParams};

    let api = FakeKubeApi::start().await;
    for i in 0..5 {
        api.apply(managed_secret("kcp-system", &format!("s{i}"), "p"));
    }
    let secrets: Api<Secret> = Api::namespaced(api.client(), "kcp-system");
    let mut names = Vec::new();
    let mut lp = ListParams::default()
        .limit(2)
        .labels(&format!("{MANAGED_BY}=lifecycle-manager"));
    let mut pages = 0;
    loop {
        let page = secrets.list(&lp).await.expect("list");
        pages += 1;
        names.extend(page.items.iter().filter_map(|s| s.metadata.name.clone()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, vec!["s0", "s1", "s2", "s3", "s4"]);
}

/// `client()` reads KUBECONFIG. The environment is process-wide, so the check runs in a
/// child process of this test binary with KUBECONFIG set only there.
#[tokio::test]
async fn client_uses_the_kubeconfig_from_the_environment() {
    if let Ok(expected) = std::env::var("OCI_PROXY_KUBE_CHILD_EXPECT") {
        let client = source::client().await.expect("client from KUBECONFIG");
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(client, "kcp-system");
        let list = secrets.list(&Default::default()).await.expect("list");
        let names: Vec<_> = list
            .items
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names, vec![expected]);
        return;
    }
    let api = FakeKubeApi::start().await;
    api.apply(managed_secret("kcp-system", "via-kubeconfig", "p"));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let exe = std::env::current_exe().expect("test binary");
    let child = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "catalog_kube::client_uses_the_kubeconfig_from_the_environment",
            "--test-threads=1",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("OCI_PROXY_KUBE_CHILD_EXPECT", "via-kubeconfig")
        .output();
    let out = tokio::time::timeout(DEADLINE, child)
        .await
        .expect("child finished")
        .expect("child ran");
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(
        api.request_log()
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/kcp-system/secrets"),
        "the child talked to the fake"
    );
}

#[tokio::test]
async fn client_without_any_configuration_fails_clearly() {
    // Only meaningful where no kubeconfig or in-cluster environment is present.
    if std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists())
    {
        return;
    }
    let Err(err) = source::client().await else {
        panic!("a client without any configuration");
    };
    assert!(err.to_string().contains("kubeconfig"), "{err}");
}

/// LM's own named Secret has no labels (`kubectl create secret docker-registry`): it is
/// watched by name in its namespace, whatever the label selector and the watched namespaces.
#[tokio::test]
async fn the_named_secret_is_watched_by_name_whatever_its_labels() {
    let api = FakeKubeApi::start().await;
    api.apply(secret(
        "kcp-system",
        "private-oci-reg-creds",
        "kubernetes.io/dockerconfigjson",
        json!({}),
        "named",
    ));
    api.apply(secret(
        "kcp-system",
        "unlabelled-other",
        "kubernetes.io/dockerconfigjson",
        json!({}),
        "other",
    ));
    api.apply(json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleReleaseMeta",
        "metadata": {"name": "template-operator", "namespace": "kcp-system"},
        "spec": {"moduleName": "template-operator", "ocmComponentName": "kyma-project.io/module/template-operator",
            "channels": [{"channel": "regular", "version": "1.0.5"}]}}));
    let ds = DefaultSecret {
        namespace: "kcp-system".into(),
        name: "private-oci-reg-creds".into(),
        subpath: None,
    };
    let mut h = Harness::start_with(api, KubernetesSource::default(), Some(ds)).await;
    h.wait_synced().await;
    assert_eq!(
        ids(&h.current()),
        vec![
            "ModuleReleaseMeta/kcp-system/template-operator",
            "Secret/kcp-system/private-oci-reg-creds",
        ]
    );
    assert_eq!(
        password_of(find(&h.current(), "Secret/kcp-system/private-oci-reg-creds").unwrap())
            .as_deref(),
        Some("named")
    );
    // Rotation is followed; the request names the Secret by field selector, without labels.
    h.api.apply(secret(
        "kcp-system",
        "private-oci-reg-creds",
        "kubernetes.io/dockerconfigjson",
        json!({}),
        "rotated",
    ));
    h.wait_published("rotated named Secret", |s| {
        find(s, "Secret/kcp-system/private-oci-reg-creds")
            .and_then(password_of)
            .as_deref()
            == Some("rotated")
    })
    .await;
    let log = h.api.request_log();
    let by_name: Vec<_> = requests_for(&log, Res::Secrets)
        .into_iter()
        .filter(|r| r.param("fieldSelector") == Some("metadata.name=private-oci-reg-creds"))
        .collect();
    assert!(!by_name.is_empty(), "{log:?}");
    for r in &by_name {
        assert_eq!(r.param("labelSelector"), None, "{r:?}");
        assert_eq!(r.path, "/api/v1/namespaces/kcp-system/secrets", "{r:?}");
    }
    // Deleting it is published too.
    assert!(h
        .api
        .delete("Secret", "kcp-system", "private-oci-reg-creds"));
    h.wait_published("deleted named Secret", |s| {
        find(s, "Secret/kcp-system/private-oci-reg-creds").is_none()
    })
    .await;
}
