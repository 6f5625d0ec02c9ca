//! Catalog behaviour end to end through the public API: publish objects, decide, explain.

use base64::Engine as _;
use serde_json::{json, Value};

use super::*;

const REG: &str = "europe-west3-docker.pkg.dev";
const LABEL_ERA_REPO: &str =
    "sap-kyma-jellyfish-dev/template-operator/component-descriptors/kyma-project.io/module/template-operator";

/// A Lifecycle Manager sample object from `tests/data/kyma/` (see its README for origins).
pub(super) fn sample(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kyma")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap()
}

fn secret(
    ns: &str,
    name: &str,
    labels: Value,
    registry: &str,
    user: &str,
    password: &str,
) -> Value {
    let cfg = json!({"auths": {registry: {"username": user, "password": password}}}).to_string();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(cfg)}
    })
}

/// A label-era ModuleTemplate on `base_url` with selector `label` (any JSON) and extra resources.
fn module(
    ns: &str,
    name: &str,
    base_url: &str,
    component: &str,
    label: Option<Value>,
    extra: Vec<Value>,
) -> Value {
    let mut raw =
        json!({"name": "raw-manifest", "access": {"type": "localOciBlob", "digest": "sha256:aa"}});
    if let Some(l) = label {
        raw["labels"] = json!([{"name": "oci-registry-cred", "value": l}]);
    }
    let mut resources = vec![raw];
    resources.extend(extra);
    json!({
        "apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"descriptor": {"component": {
            "name": component, "version": "1.0.0",
            "repositoryContexts": [{"baseUrl": base_url, "componentNameMapping": "urlPath", "type": "OCIRegistry"}],
            "resources": resources
        }}}
    })
}

fn basic(d: &Decision) -> (&str, &str, &str) {
    match d {
        Decision::Module {
            module,
            credential: Credential::Basic { username, password },
            ..
        } => (
            module.as_str(),
            username.as_str(),
            password.expose().as_str(),
        ),
        other => panic!("expected module Basic credential, got {other:?}"),
    }
}

/// In the label-era sample's namespace (`default`): selectors match only there.
fn regcred_secret(password: &str) -> Value {
    secret(
        "default",
        "regcred",
        json!({"operator.kyma-project.io/oci-registry-cred": "operator-regcred"}),
        REG,
        "mod-user",
        password,
    )
}

#[test]
fn label_era_sample_gets_its_secret() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            regcred_secret("s3cret"),
            sample("secret-oci-registry-cred-labeled.yaml"),
        ],
    );
    let d = c.decide(REG, LABEL_ERA_REPO);
    assert_eq!(
        basic(&d),
        (
            "default/moduletemplate-template-operator",
            "mod-user",
            "s3cret"
        )
    );
    let Decision::Module { secret, .. } = &d else {
        unreachable!()
    };
    assert_eq!(secret, "default/regcred");
    assert_eq!(
        c.hosts(),
        vec![ModuleHost {
            host: REG.into(),
            insecure: false
        }]
    );
    // Host matching is case-insensitive; surrounding slashes are tolerated.
    assert!(matches!(
        c.decide(
            "Europe-West3-Docker.pkg.dev",
            &format!("/{LABEL_ERA_REPO}/")
        ),
        Decision::Module { .. }
    ));
}

#[test]
fn other_repository_on_the_same_registry_is_not_a_module() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            regcred_secret("p"),
        ],
    );
    assert_eq!(
        c.decide(REG, "sap-kyma-jellyfish-dev/template-operator/other"),
        Decision::NotAModule
    );
    assert_eq!(
        c.decide(REG, &format!("{LABEL_ERA_REPO}/sub")),
        Decision::NotAModule
    );
    assert_eq!(c.decide("ghcr.io", LABEL_ERA_REPO), Decision::NotAModule);
}

#[test]
fn selector_matching_no_secret_is_denied_naming_template_and_selector() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            sample("secret-oci-registry-cred-labeled.yaml"),
        ],
    );
    let Decision::Denied { message } = c.decide(REG, LABEL_ERA_REPO) else {
        panic!("expected Denied")
    };
    assert!(
        message.contains("ModuleTemplate default/moduletemplate-template-operator"),
        "{message}"
    );
    assert!(
        message.contains("operator.kyma-project.io/oci-registry-cred=operator-regcred"),
        "{message}"
    );
}

#[test]
fn manifest_sample_selects_the_labeled_secret() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            sample("manifest-private-registry-cred-selector.yaml"),
            sample("secret-oci-registry-cred-labeled.yaml"),
        ],
    );
    let repo =
        "kyma-project/template-operator/component-descriptors/kyma-project.io/template-operator";
    // The sample Secret's only registry is test.registry.io: selected, but no keychain key
    // matches github.com, so anonymous (go-containerregistry semantics).
    assert_eq!(
        c.decide("github.com", repo),
        Decision::Module {
            module: "default/kyma-project.io/template-operator".into(),
            credential: Credential::Anonymous,
            secret: String::new(),
        }
    );
}

#[test]
fn empty_selector_matches_nothing_and_json_string_values_work() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            module(
                "ns",
                "everything",
                "reg.io/base",
                "kyma-project.io/module/a",
                Some(json!({})),
                vec![],
            ),
            module(
                "ns",
                "stringy",
                "reg.io/base",
                "kyma-project.io/module/b",
                Some(json!("{\"team\":\"b\"}")),
                vec![],
            ),
            secret("ns", "any", json!({}), "reg.io", "anyone", "pw-any"),
            secret(
                "ns",
                "team-b",
                json!({"team": "b"}),
                "reg.io/base/component-descriptors/kyma-project.io/module/b",
                "bee",
                "pw-b",
            ),
        ],
    );
    // `{}` would select every Secret: it is refused, the module's repositories are denied.
    let a = c.decide(
        "reg.io",
        "base/component-descriptors/kyma-project.io/module/a",
    );
    let Decision::Denied { message } = &a else {
        panic!("{a:?}")
    };
    assert!(message.contains("ns/everything"), "{message}");
    assert!(message.contains("empty credential selector"), "{message}");
    assert!(!message.contains("pw-any"), "{message}");
    let text = c
        .explain(
            "reg.io",
            "base/component-descriptors/kyma-project.io/module/a",
        )
        .to_string();
    assert!(text.contains("matching Secrets: none"), "{text}");
    assert_eq!(c.current().empty_selectors().count(), 1);
    let b = c.decide(
        "reg.io",
        "base/component-descriptors/kyma-project.io/module/b",
    );
    assert_eq!(basic(&b), ("ns/stringy", "bee", "pw-b"));
}

#[test]
fn two_modules_on_one_registry_each_get_their_own_secret() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            module(
                "kcp-system",
                "one",
                "reg.io",
                "kyma-project.io/module/one",
                Some(json!({"m": "one"})),
                vec![],
            ),
            module(
                "kcp-system",
                "two",
                "reg.io",
                "kyma-project.io/module/two",
                Some(json!({"m": "two"})),
                vec![],
            ),
            secret(
                "kcp-system",
                "s-one",
                json!({"m": "one"}),
                "reg.io",
                "user-one",
                "pw-one",
            ),
            secret(
                "kcp-system",
                "s-two",
                json!({"m": "two"}),
                "reg.io",
                "user-two",
                "pw-two",
            ),
        ],
    );
    let one = c.decide("reg.io", "component-descriptors/kyma-project.io/module/one");
    let two = c.decide("reg.io", "component-descriptors/kyma-project.io/module/two");
    assert_eq!(basic(&one), ("kcp-system/one", "user-one", "pw-one"));
    assert_eq!(basic(&two), ("kcp-system/two", "user-two", "pw-two"));
    let Decision::Module { secret, .. } = two else {
        unreachable!()
    };
    assert_eq!(secret, "kcp-system/s-two");
}

#[test]
fn oci_artifact_repositories_get_the_module_credentials_only_when_enabled() {
    let image = json!({"name": "manager", "type": "ociArtifact",
        "access": {"type": "ociArtifact", "imageReference": "images.io:5000/prod/manager:1.0@sha256:abcd"}});
    let objects = vec![
        module(
            "ns",
            "m",
            "reg.io",
            "kyma-project.io/module/m",
            Some(json!({"k": "v"})),
            vec![image.clone()],
        ),
        secret(
            "ns",
            "s",
            json!({"k": "v"}),
            "images.io:5000",
            "img-user",
            "pw",
        ),
    ];
    // Default (catalog.image_credentials: false): LM never pulls images with module
    // credentials, and an image reference can name anybody's repository.
    let off = Catalog::new(None);
    off.publish("t", objects);
    assert_eq!(
        off.decide("images.io:5000", "prod/manager"),
        Decision::NotAModule
    );
    assert_eq!(off.current().scheme("images.io:5000", "prod/manager"), None);
    let c = Catalog::new(None);
    c.set_image_credentials(true);
    c.publish(
        "t",
        vec![
            module(
                "ns",
                "m",
                "reg.io",
                "kyma-project.io/module/m",
                Some(json!({"k": "v"})),
                vec![image],
            ),
            secret(
                "ns",
                "s",
                json!({"k": "v"}),
                "images.io:5000",
                "img-user",
                "pw",
            ),
        ],
    );
    assert_eq!(
        basic(&c.decide("images.io:5000", "prod/manager")).1,
        "img-user"
    );
    assert_eq!(
        c.decide("images.io:5000", "prod/other"),
        Decision::NotAModule
    );
    let hosts: Vec<_> = c.hosts().into_iter().map(|h| h.host).collect();
    assert_eq!(hosts, ["images.io:5000", "reg.io"]);
}

#[test]
fn several_modules_naming_one_repository_choose_deterministically() {
    let repo = "component-descriptors/kyma-project.io/module/shared";
    let objects = vec![
        module(
            "zz",
            "later",
            "reg.io",
            "kyma-project.io/module/shared",
            Some(json!({"who": "z"})),
            vec![],
        ),
        module(
            "aa",
            "first",
            "reg.io",
            "kyma-project.io/module/shared",
            Some(json!({"who": "a"})),
            vec![],
        ),
        module(
            "aa",
            "0-no-selector",
            "reg.io",
            "kyma-project.io/module/shared",
            None,
            vec![],
        ),
        secret("aa", "sa", json!({"who": "a"}), "reg.io", "user-a", "pw-a"),
        secret("zz", "sz", json!({"who": "z"}), "reg.io", "user-z", "pw-z"),
    ];
    let c = Catalog::new(None);
    c.publish("t", objects.clone());
    assert_eq!(basic(&c.decide("reg.io", repo)).0, "aa/first");
    let reversed: Vec<_> = objects.into_iter().rev().collect();
    let c2 = Catalog::new(None);
    c2.publish("t", reversed);
    assert_eq!(c.decide("reg.io", repo), c2.decide("reg.io", repo));
    let e = c.explain("reg.io", repo);
    let names: Vec<_> = e
        .modules
        .iter()
        .map(|m| (m.module.as_str(), m.chosen))
        .collect();
    assert_eq!(
        names,
        [
            ("aa/first", true),
            ("zz/later", false),
            ("aa/0-no-selector", false)
        ]
    );
}

#[test]
fn module_without_selector_falls_through() {
    let c = Catalog::new(None);
    c.publish("t", vec![sample("moduletemplate-transferred-current.yaml")]);
    let repo = "sap-kyma-jellyfish-dev/restricted-market/component-descriptors/kyma-project.io/module/template-operator";
    assert_eq!(c.decide(REG, repo), Decision::NotAModule);
    let text = c.explain(REG, repo).to_string();
    assert!(
        text.contains("kcp-system/template-operator-1.0.5"),
        "{text}"
    );
    assert!(text.contains("no credential selector"), "{text}");
}

fn default_secret(subpath: Option<&str>) -> Option<DefaultSecret> {
    Some(DefaultSecret {
        namespace: "kcp-system".into(),
        name: "private-oci-reg-creds".into(),
        subpath: subpath.map(str::to_owned),
    })
}

/// The Secret [`default_secret`] names, unlabelled, with `user`/`password` for `registry`.
fn the_default_secret(registry: &str, user: &str, password: &str) -> Value {
    secret(
        "kcp-system",
        "private-oci-reg-creds",
        json!({}),
        registry,
        user,
        password,
    )
}

#[test]
fn default_secret_covers_its_registry_and_subpath() {
    let c = Catalog::new(default_secret(Some("/modules/")));
    let ds = the_default_secret("http://private-oci-reg.localhost:5000", "klm", "pw-default");
    c.publish("t", vec![ds.clone()]);
    let d = c.decide(
        "private-oci-reg.localhost:5000",
        "modules/component-descriptors/kyma-project.io/module/x",
    );
    let Decision::DefaultSecret {
        credential,
        secret: used,
    } = &d
    else {
        panic!("{d:?}")
    };
    assert_eq!(used, "kcp-system/private-oci-reg-creds");
    assert!(matches!(credential, Credential::Basic { username, .. } if username == "klm"));
    assert!(matches!(
        c.decide("private-oci-reg.localhost:5000", "modules"),
        Decision::DefaultSecret { .. }
    ));
    assert_eq!(
        c.decide("private-oci-reg.localhost:5000", "modulesx/a"),
        Decision::NotAModule
    );
    assert_eq!(
        c.decide("private-oci-reg.localhost:5000", "other/a"),
        Decision::NotAModule
    );
    assert_eq!(c.decide("other.io", "modules/a"), Decision::NotAModule);
    assert_eq!(
        c.hosts(),
        vec![ModuleHost {
            host: "private-oci-reg.localhost:5000".into(),
            insecure: true
        }]
    );

    // As LM ≥ 1.3.11: under the named Secret's base the named Secret wins over a module's
    // selector; outside the base the module's selector decides.
    c.publish(
        "t",
        vec![
            ds,
            module(
                "ns",
                "m",
                "http://private-oci-reg.localhost:5000/modules",
                "kyma-project.io/module/m",
                Some(json!({"k": "v"})),
                vec![],
            ),
            module(
                "ns",
                "outside",
                "http://private-oci-reg.localhost:5000/elsewhere",
                "kyma-project.io/module/o",
                Some(json!({"k": "v"})),
                vec![],
            ),
            secret(
                "ns",
                "mod",
                json!({"k": "v"}),
                "private-oci-reg.localhost:5000",
                "module-user",
                "pw-m",
            ),
        ],
    );
    let d = c.decide(
        "private-oci-reg.localhost:5000",
        "modules/component-descriptors/kyma-project.io/module/m",
    );
    assert!(
        matches!(&d, Decision::DefaultSecret { credential: Credential::Basic { username, .. }, .. } if username == "klm"),
        "{d:?}"
    );
    let d = c.decide(
        "private-oci-reg.localhost:5000",
        "elsewhere/component-descriptors/kyma-project.io/module/o",
    );
    assert_eq!(basic(&d), ("ns/outside", "module-user", "pw-m"));

    // Without subpath every repository of the registry is covered.
    let c = Catalog::new(default_secret(None));
    c.publish("t", vec![the_default_secret("reg.io", "u", "p")]);
    assert!(matches!(
        c.decide("reg.io", "anything/at/all"),
        Decision::DefaultSecret { .. }
    ));
}

#[test]
fn deleted_default_secret_denies_what_it_covered() {
    let c = Catalog::new(default_secret(None));
    assert_eq!(c.decide("reg.io", "a"), Decision::NotAModule);
    c.publish("t", vec![the_default_secret("reg.io", "u", "p")]);
    assert!(matches!(
        c.decide("reg.io", "a"),
        Decision::DefaultSecret { .. }
    ));
    c.publish("t", vec![]);
    let Decision::Denied { message } = c.decide("reg.io", "a") else {
        panic!()
    };
    assert!(
        message.contains("kcp-system/private-oci-reg-creds"),
        "{message}"
    );
    assert_eq!(c.decide("other.io", "a"), Decision::NotAModule);
}

#[test]
fn rotating_a_secret_changes_the_credential_and_deleting_it_denies() {
    let c = Catalog::new(None);
    let mt = sample("moduletemplate-oci-registry-cred-label.yaml");
    c.publish("t", vec![mt.clone(), regcred_secret("old-password")]);
    let before = c.decide(REG, LABEL_ERA_REPO);
    c.publish("t", vec![mt.clone(), regcred_secret("new-password")]);
    let after = c.decide(REG, LABEL_ERA_REPO);
    assert_eq!(basic(&after).2, "new-password");
    let id = |d: &Decision| match d {
        Decision::Module { credential, .. } => credential.id(),
        _ => unreachable!(),
    };
    assert_ne!(id(&before), id(&after));
    c.publish("t", vec![mt]);
    assert!(matches!(
        c.decide(REG, LABEL_ERA_REPO),
        Decision::Denied { .. }
    ));
}

#[test]
fn sources_are_merged_and_replaced_independently() {
    let c = Catalog::new(None);
    c.publish(
        "a",
        vec![sample("moduletemplate-oci-registry-cred-label.yaml")],
    );
    c.publish("b", vec![regcred_secret("pw")]);
    assert!(matches!(
        c.decide(REG, LABEL_ERA_REPO),
        Decision::Module { .. }
    ));
    c.publish("a", vec![]);
    assert_eq!(c.decide(REG, LABEL_ERA_REPO), Decision::NotAModule);
}

#[test]
fn malformed_objects_are_skipped_not_fatal() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate", "metadata": {"name": "broken"},
                "spec": {"descriptor": {"component": {"name": "kyma-project.io/module/b"}}}}),
            // Current templates are modules, not malformed objects.
            json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate", "metadata": {"name": "current"},
                "spec": {"moduleName": "x", "version": "1.0.0", "descriptor": {}, "info": {"repository": "r"},
                    "manager": {"name": "m", "group": "apps"}, "associatedResources": [{"group": "g"}], "futureField": 1}}),
            json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate", "metadata": {"name": "none"},
                "spec": {"moduleName": "y", "version": "2.0.0"}}),
            json!(42),
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            regcred_secret("pw"),
        ],
    );
    assert!(matches!(
        c.decide(REG, LABEL_ERA_REPO),
        Decision::Module { .. }
    ));
    let e = c.explain(REG, LABEL_ERA_REPO);
    assert_eq!(e.skipped_objects.len(), 1, "{:?}", e.skipped_objects);
    assert!(e.skipped_objects[0].contains("ModuleTemplate default/broken"));
}

#[test]
fn invalid_selector_label_is_denied() {
    // The named Secret covers another registry: outside its base the selector decides.
    let c = Catalog::new(default_secret(None));
    c.publish(
        "t",
        vec![
            module(
                "ns",
                "bad",
                "reg.io",
                "kyma-project.io/module/bad",
                Some(json!("not-json")),
                vec![],
            ),
            the_default_secret("other.io", "u", "p"),
        ],
    );
    let Decision::Denied { message } =
        c.decide("reg.io", "component-descriptors/kyma-project.io/module/bad")
    else {
        panic!()
    };
    assert!(message.contains("ModuleTemplate ns/bad"), "{message}");
}

#[test]
fn explain_names_objects_and_never_secret_content() {
    let c = Catalog::new(default_secret(None));
    c.publish(
        "t",
        vec![
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            regcred_secret("hunter2-password"),
            the_default_secret("other.io", "u", "default-password"),
        ],
    );
    let e = c.explain(REG, LABEL_ERA_REPO);
    let text = e.to_string();
    for needle in [
        "ModuleTemplate default/moduletemplate-template-operator [chosen]",
        "operator.kyma-project.io/oci-registry-cred=operator-regcred",
        "label oci-registry-cred of resource raw-manifest",
        "default/regcred",
        "basic",
        "kcp-system/private-oci-reg-creds",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for secret_part in ["hunter2-password", "default-password", "bW9kLXVzZXI"] {
        assert!(!text.contains(secret_part), "{text}");
        assert!(!format!("{e:?}").contains(secret_part));
    }
    let Outcome::Module {
        credential_kind,
        secret,
        ..
    } = &e.outcome
    else {
        panic!()
    };
    assert_eq!(
        (*credential_kind, secret.as_deref()),
        ("basic", Some("default/regcred"))
    );

    let denied = Catalog::new(None);
    denied.publish(
        "t",
        vec![sample("moduletemplate-oci-registry-cred-label.yaml")],
    );
    let text = denied.explain(REG, LABEL_ERA_REPO).to_string();
    assert!(
        text.contains("matching Secrets: none") && text.contains("denied"),
        "{text}"
    );
}

#[test]
fn readiness_waits_for_expected_sources() {
    let c = Catalog::new(None);
    assert!(c.is_ready());
    c.expect_source("a");
    c.expect_source("b");
    assert!(!c.is_ready());
    c.mark_synced("a");
    assert!(!c.is_ready());
    c.mark_synced("b");
    assert!(c.is_ready());
}

#[tokio::test]
async fn wait_ready_returns_when_synced() {
    let c = Catalog::new(None);
    c.expect_source("x");
    assert!(!c.wait_ready(Duration::from_millis(10)).await);
    let c2 = Arc::clone(&c);
    tokio::spawn(async move { c2.mark_synced("x") });
    assert!(c.wait_ready(Duration::from_secs(10)).await);
}

#[test]
fn catalog_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Catalog>();
    check::<Arc<Catalog>>();
}

/// Current LM (≥ 1.8) as a sidecar: the unlabelled named Secret, a `descriptor: {}` template,
/// a ModuleReleaseMeta, and the Manifest LM writes with `repo: <proxy>/modules`.
#[test]
fn current_lm_objects_are_a_module_under_the_named_secret() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/kyma/current-lm-sidecar.yaml"),
    )
    .unwrap();
    let objects = files::parse_documents(&text, false, "t");
    let manifest: Vec<Value> = objects
        .iter()
        .filter(|o| o["kind"] != "Manifest")
        .cloned()
        .collect();
    const UPSTREAM: &str = "private-oci-reg.localhost:5000";
    let repo = "modules/component-descriptors/kyma-project.io/module/template-operator";
    for objects in [manifest, objects] {
        let c = Catalog::new(default_secret(Some("modules")));
        c.set_proxy_hosts(vec!["127.0.0.1:5000".into()]);
        c.set_own_upstream(Some(UPSTREAM.into()));
        c.publish("t", objects);
        assert!(c.current().skipped.is_empty(), "{:?}", c.current().skipped);
        let d = c.decide(UPSTREAM, repo);
        assert!(
            matches!(&d, Decision::DefaultSecret { credential: Credential::Basic { username, .. }, .. } if username == "myuser"),
            "{d:?}"
        );
        // `modules` never becomes a registry host.
        assert_eq!(
            c.current().scheme("modules", "component-descriptors/x"),
            None
        );
        let hosts: Vec<_> = c.hosts().into_iter().map(|h| h.host).collect();
        assert_eq!(hosts, [UPSTREAM]);
        let text = c.explain(UPSTREAM, repo).to_string();
        assert!(
            text.contains("ModuleReleaseMeta kcp-system/template-operator"),
            "{text}"
        );
        assert!(text.contains("module name: template-operator"), "{text}");
        assert!(text.contains("versions: 1.0.5"), "{text}");
        assert!(
            text.contains("decision: default Secret kcp-system/private-oci-reg-creds"),
            "{text}"
        );
        assert!(!text.contains("mypass"), "{text}");
    }
    // The named Secret gone: DENIED naming the module, its versions and the Secret.
    let c = Catalog::new(default_secret(Some("modules")));
    c.set_own_upstream(Some(UPSTREAM.into()));
    let with_secret = files::parse_documents(&text, false, "t");
    c.publish("t", with_secret.clone());
    let without: Vec<Value> = with_secret
        .into_iter()
        .filter(|o| o["kind"] != "Secret")
        .collect();
    c.publish("t", without);
    let Decision::Denied { message } = c.decide(UPSTREAM, repo) else {
        panic!()
    };
    for part in [
        "template-operator",
        "1.0.5",
        "kcp-system/private-oci-reg-creds",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
}

/// A label-era template whose label matches no Secret, with the named Secret covering its
/// repository: the named Secret, as LM ≥ 1.3.11 does.
#[test]
fn migrated_landscape_uses_the_named_secret_despite_a_stale_label() {
    let c = Catalog::new(default_secret(Some("sap-kyma-jellyfish-dev")));
    c.publish(
        "t",
        vec![
            sample("moduletemplate-oci-registry-cred-label.yaml"),
            the_default_secret(REG, "klm", "pw"),
        ],
    );
    assert!(matches!(
        c.decide(REG, LABEL_ERA_REPO),
        Decision::DefaultSecret { .. }
    ));
}

#[test]
fn selectors_match_secrets_only_in_their_own_namespace() {
    let c = Catalog::new(None);
    c.publish(
        "t",
        vec![
            module(
                "tenant",
                "m",
                "reg.io",
                "kyma-project.io/module/m",
                Some(json!({"k": "v"})),
                vec![],
            ),
            secret(
                "kcp-system",
                "s",
                json!({"k": "v"}),
                "reg.io",
                "u",
                "pw-kcp",
            ),
        ],
    );
    let Decision::Denied { message } =
        c.decide("reg.io", "component-descriptors/kyma-project.io/module/m")
    else {
        panic!()
    };
    assert!(
        message.contains("matches no Secret in namespace tenant"),
        "{message}"
    );
    assert!(!message.contains("kcp-system/s"), "{message}");
}

/// One module's `http://` baseUrl makes only its own repositories plain HTTP: not another
/// module's on the same host, not the named Secret's base.
#[test]
fn http_base_url_applies_to_its_own_module_only() {
    let c = Catalog::new(default_secret(Some("base")));
    c.publish(
        "t",
        vec![
            the_default_secret("reg.io", "klm", "pw"),
            module(
                "ns",
                "plain",
                "http://reg.io/a",
                "kyma-project.io/module/p",
                Some(json!({"k": "v"})),
                vec![],
            ),
            module(
                "ns",
                "tls",
                "https://reg.io/b",
                "kyma-project.io/module/t",
                Some(json!({"k": "v"})),
                vec![],
            ),
            module(
                "ns",
                "sneaky",
                "http://reg.io/base",
                "kyma-project.io/module/s",
                Some(json!({"k": "v"})),
                vec![],
            ),
            secret("ns", "s", json!({"k": "v"}), "reg.io", "u", "p"),
        ],
    );
    let idx = c.current();
    assert_eq!(
        idx.scheme("reg.io", "a/component-descriptors/kyma-project.io/module/p"),
        Some(true)
    );
    assert_eq!(
        idx.scheme("reg.io", "b/component-descriptors/kyma-project.io/module/t"),
        Some(false)
    );
    assert_eq!(
        idx.scheme(
            "reg.io",
            "base/component-descriptors/kyma-project.io/module/s"
        ),
        Some(false)
    );
    assert_eq!(idx.scheme("reg.io", "unclaimed/x"), Some(false));
}

#[test]
fn module_release_meta_sample_parses() {
    let Some(model::Object::ModuleReleaseMeta(m)) =
        model::parse_object(&sample("modulereleasemeta-template-operator.yaml")).unwrap()
    else {
        panic!()
    };
    assert_eq!(m.module_name.as_deref(), Some("template-operator"));
    assert_eq!(
        m.ocm_component_name.as_deref(),
        Some("kyma-project.io/module/template-operator")
    );
    assert_eq!(m.versions(), ["1.0.4", "1.0.5"]);
    assert!(!m.beta && !m.internal);
    // Lenient about what it does not read, strict about types it does.
    let odd = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleReleaseMeta",
        "metadata": {"name": "x", "namespace": "kcp-system"},
        "spec": {"moduleName": "x", "mandatory": {"version": "1.0.0"}, "kymaSelector": {}, "future": 1}});
    let Some(model::Object::ModuleReleaseMeta(m)) = model::parse_object(&odd).unwrap() else {
        panic!()
    };
    assert_eq!(m.versions(), ["1.0.0"]);
    let bad = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleReleaseMeta",
        "metadata": {"name": "x"}, "spec": {"channels": "secret-ish"}});
    let e = model::parse_object(&bad).unwrap_err().to_string();
    assert!(!e.contains("secret-ish"), "{e}");
}

/// Prewarm's list: channel versions under the named Secret's base (LM ≥ 1.8), template-only
/// versions with `all`, label-era templates at their own descriptor repository.
#[test]
fn module_versions_are_where_lm_pulls_them() {
    let c = Catalog::new(default_secret(Some("modules")));
    let template = |version: &str| {
        json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
            "metadata": {"name": format!("template-operator-{version}"), "namespace": "kcp-system"},
            "spec": {"moduleName": "template-operator", "version": version, "descriptor": {}}})
    };
    let meta = json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleReleaseMeta",
        "metadata": {"name": "template-operator", "namespace": "kcp-system"},
        "spec": {"moduleName": "template-operator",
            "ocmComponentName": "kyma-project.io/module/template-operator",
            "channels": [{"channel": "regular", "version": "1.0.6"}, {"channel": "fast", "version": "1.1.0"}]}});
    c.publish(
        "t",
        vec![
            the_default_secret("http://private-oci-reg.localhost:5000", "klm", "pw-default"),
            template("1.0.5"),
            template("1.0.6"),
            meta,
            module(
                "kcp-system",
                "legacy",
                "reg.example.com/mods",
                "kyma-project.io/module/legacy",
                None,
                vec![],
            ),
        ],
    );
    let repo = "modules/component-descriptors/kyma-project.io/module/template-operator";
    let seen = |channels_only| {
        c.module_versions(channels_only)
            .into_iter()
            .map(|v| (v.name(), v.version, v.channel))
            .collect::<Vec<_>>()
    };
    let host = "private-oci-reg.localhost:5000";
    let name = format!("{host}/{repo}");
    assert_eq!(
        seen(true),
        [
            (name.clone(), "1.0.6".to_owned(), true),
            (name.clone(), "1.1.0".to_owned(), true)
        ]
    );
    let all = seen(false);
    assert!(
        all.contains(&(name.clone(), "1.0.5".to_owned(), false)),
        "{all:?}"
    );
    assert!(
        all.contains(&(
            "reg.example.com/mods/component-descriptors/kyma-project.io/module/legacy".to_owned(),
            "1.0.0".to_owned(),
            false
        )),
        "{all:?}"
    );
    assert_eq!(all.len(), 4, "{all:?}");
    let of = c.versions_of(host, repo);
    assert_eq!(of.len(), 3, "{of:?}");
}
