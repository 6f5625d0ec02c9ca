//! Deployment artefacts: the config examples, the kustomize overlays in `deploy/`, the Dockerfile.
//!
//! - Every `config/*.yaml` and every `deploy/**/config.yaml` passes `oci-proxy check-config`.
//! - Each overlay's `config.yaml` (the source of its ConfigMap) equals its `config/` example.
//! - Every overlay renders with `kubectl kustomize` (or `kustomize build`) and validates
//!   offline against the Kubernetes JSON schemas with `kubernetes-validate --strict`.
//!   cert-manager resources have no schema there; they are checked structurally here instead
//!   (API version, issuer references, the Secret and DNS names the proxy relies on). The
//!   sidecar overlay's partial Deployment is merged into a stand-in of Lifecycle Manager's
//!   Deployment first, as server-side apply would, and the result is validated.
//! - Semantic properties: least-privilege RBAC, non-root containers with a read-only root
//!   filesystem, probes on /healthz and /readyz, ports and mounts that line up with the config,
//!   the sidecar on 127.0.0.1 over plain HTTP.
//!
//! `scripts/install-deploy-tools` installs the two tools. Without them the rendering tests
//! print why and pass, unless `CI` is set: then they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support::tool_present;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// Kubernetes version the manifests are validated against: old enough for the clusters Kyma's
/// control plane runs on, new enough for every API used (policy/v1, autoscaling/v2).
const KUBERNETES_VERSION: &str = "1.30.0";

/// The overlays, each with the config example its ConfigMap carries.
const OVERLAYS: &[(&str, &str)] = &[
    ("in-cluster", "config/in-cluster.yaml"),
    ("sidecar", "config/sidecar.yaml"),
    ("scaled", "config/scaled.yaml"),
];

const NAMESPACE: &str = "kcp-system";
const PROXY_CONTAINER: &str = "oci-proxy";
const LM_DEPLOYMENT: &str = "klm-controller-manager";

/// A stand-in for Lifecycle Manager's Deployment as its kustomize build renders it (name
/// prefix `klm-`, the component label, a `manager` container): the sidecar patch is merged
/// into it to get a whole object to validate, and to catch name clashes with LM's own.
const LM_STAND_IN: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: klm-controller-manager
  namespace: kcp-system
  labels:
    app.kubernetes.io/component: lifecycle-manager.kyma-project.io
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/component: lifecycle-manager.kyma-project.io
  template:
    metadata:
      labels:
        app.kubernetes.io/component: lifecycle-manager.kyma-project.io
    spec:
      serviceAccountName: klm-controller-manager
      terminationGracePeriodSeconds: 10
      securityContext:
        runAsNonRoot: true
      containers:
        - name: manager
          image: lifecycle-manager:stand-in
          command: ["/manager"]
          ports:
            - name: listener
              containerPort: 8082
            - name: metrics
              containerPort: 8080
          volumeMounts:
            - name: cert
              mountPath: /tmp/k8s-webhook-server/serving-certs
              readOnly: true
      volumes:
        - name: cert
          secret:
            secretName: klm-webhook-server-cert
"#;

// ---------------------------------------------------------------------------------------------
// Paths, YAML helpers

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn kind(v: &Value) -> &str {
    s(v, "kind")
}

fn name(v: &Value) -> &str {
    s(&v["metadata"], "name")
}

fn id(v: &Value) -> String {
    format!("{}/{}", kind(v), name(v))
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| {
            panic!(
                "no {k}/{n} in {:?}",
                docs.iter().map(id).collect::<Vec<_>>()
            )
        })
}

fn of_kind<'a>(docs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| kind(d) == k)
}

fn container<'a>(deployment: &'a Value, n: &str) -> &'a Value {
    seq(&deployment["spec"]["template"]["spec"]["containers"])
        .iter()
        .find(|c| s(c, "name") == n)
        .unwrap_or_else(|| panic!("{} has no container {n}", id(deployment)))
}

fn strs(v: &Value) -> BTreeSet<String> {
    seq(v)
        .iter()
        .map(|x| x.as_str().unwrap_or("<not a string>").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tools

struct Tools {
    /// argv prefix that renders a kustomization directory given as the last argument.
    render: Vec<String>,
    /// argv prefix of kubernetes-validate.
    validate: Vec<String>,
}

fn runs(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn find_tools() -> Result<Tools, String> {
    let render = if runs(&["kubectl", "kustomize", "--help"]) {
        vec!["kubectl".into(), "kustomize".into()]
    } else if runs(&["kustomize", "version"]) {
        vec!["kustomize".into(), "build".into()]
    } else {
        return Err("neither `kubectl kustomize` nor `kustomize` runs".into());
    };
    let validate = if runs(&["kubernetes-validate", "--version"]) {
        vec!["kubernetes-validate".into()]
    } else if runs(&["python3", "-m", "kubernetes_validate", "--version"]) {
        vec!["python3".into(), "-m".into(), "kubernetes_validate".into()]
    } else {
        return Err("kubernetes-validate (PyPI) is not installed".into());
    };
    Ok(Tools { render, validate })
}

/// The tools, or `None` after saying loudly why the test is skipped. Under CI, missing tools
/// fail the test instead.
fn tools(test: &str) -> Option<&'static Tools> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(find_tools) {
        Ok(t) => Some(t),
        Err(why) => {
            tool_present(
                false,
                &format!("{test}: {why}; scripts/install-deploy-tools installs kubectl and kubernetes-validate"),
            );
            None
        }
    }
}

fn run(argv: &[String], extra: &[&str]) -> Output {
    Command::new(&argv[0])
        .args(&argv[1..])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
}

/// The rendered documents of `deploy/<dir>`, rendered once per test binary.
fn rendered(test: &str, dir: &str) -> Option<&'static [Value]> {
    static RENDERED: OnceLock<BTreeMap<String, Result<Vec<Value>, String>>> = OnceLock::new();
    let tools = tools(test)?;
    let all = RENDERED.get_or_init(|| {
        let dirs = ["base"].into_iter().chain(OVERLAYS.iter().map(|(o, _)| *o));
        dirs.map(|d| {
            let rel = if d == "base" {
                "deploy/base".to_owned()
            } else {
                format!("deploy/overlays/{d}")
            };
            let path = root().join(&rel);
            let out = run(&tools.render, &[path.to_str().expect("utf-8 path")]);
            let result = if out.status.success() {
                Ok(parse_docs(&String::from_utf8_lossy(&out.stdout)))
            } else {
                Err(format!(
                    "rendering {rel} failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            };
            (d.to_owned(), result)
        })
        .collect()
    });
    match &all[dir] {
        Ok(docs) => Some(docs),
        Err(e) => panic!("{e}"),
    }
}

/// Runs kubernetes-validate (strict: unknown fields are errors) on the documents.
fn validate_schemas(tools: &Tools, label: &str, docs: &[Value]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{label}.yaml"));
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("serialise")))
        .collect();
    std::fs::write(&file, text).expect("write rendered manifests");
    let out = run(
        &tools.validate,
        &[
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            file.to_str().expect("utf-8 path"),
        ],
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{label}: schema validation failed:\n{report}"
    );
    // Every document sent has a schema: a missing one would be a silent pass.
    assert!(
        !report.contains("Couldn't find schema"),
        "{label}: unvalidated kinds:\n{report}"
    );
    let passed = report.matches(" passed for resource ").count();
    assert_eq!(
        passed,
        docs.len(),
        "{label}: not every document was validated:\n{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// Config examples

fn config_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root().join("config")).expect("config/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.file_name().is_some_and(|n| n == "config.yaml") {
                out.push(path);
            }
        }
    }
    walk(&root().join("deploy"), &mut files);
    files.sort();
    files
}

#[test]
fn every_config_example_passes_check_config() {
    let files = config_files();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(root())
                .expect("under root")
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "config/in-cluster.yaml",
        "config/sidecar.yaml",
        "config/dev-catalog.yaml",
        "config/scaled.yaml",
        "deploy/docker/config.yaml",
        "deploy/overlays/in-cluster/config.yaml",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    let mut failures = Vec::new();
    for file in &files {
        let out = Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
            .arg("check-config")
            .arg(file)
            .output()
            .expect("run oci-proxy check-config");
        if !out.status.success() {
            failures.push(format!(
                "{}: exit {:?}\n{}",
                file.display(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "check-config rejected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn overlay_configs_are_copies_of_the_config_examples() {
    for (overlay, example) in OVERLAYS {
        let copy = format!("deploy/overlays/{overlay}/config.yaml");
        assert!(
            read(&copy) == read(example),
            "{copy} differs from {example}; edit {example}, then `cp {example} {copy}`"
        );
    }
}

fn config_of(example: &str) -> Value {
    serde_yaml::from_str(&read(example)).expect("config example parses")
}

fn listen_of(cfg: &Value) -> SocketAddr {
    s(cfg, "listen")
        .parse()
        .expect("listen is a socket address")
}

// ---------------------------------------------------------------------------------------------
// Rendering and schemas

/// Merges `patch` into `base` like server-side apply / a strategic merge does for the fields
/// the sidecar patch uses: maps recursively, `containers` and `volumes` by name (a name already
/// in `base` is a clash, since the patch must only add), other lists replaced.
fn merge(base: &mut Value, patch: &Value, key: &str) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, pv) in p {
                let ks = k.as_str().unwrap_or("");
                match b.get_mut(k) {
                    Some(bv) => merge(bv, pv, ks),
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p)) if key == "containers" || key == "volumes" => {
            for item in p {
                let n = s(item, "name");
                assert!(
                    !b.iter().any(|x| s(x, "name") == n),
                    "the sidecar patch's {key} entry {n:?} clashes with Lifecycle Manager's"
                );
                b.push(item.clone());
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// The sidecar's partial Deployment merged into the Lifecycle Manager stand-in.
fn merged_lm_deployment(docs: &[Value]) -> Value {
    let patch = find(docs, "Deployment", LM_DEPLOYMENT);
    let mut lm: Value = serde_yaml::from_str(LM_STAND_IN).expect("stand-in parses");
    merge(&mut lm, patch, "");
    lm
}

/// cert-manager resources have no schema in kubernetes-validate: check what oci-proxy relies on.
fn check_cert_manager(label: &str, docs: &[&Value]) -> BTreeMap<String, Value> {
    let issuers: BTreeSet<&str> = docs
        .iter()
        .filter(|d| kind(d) == "Issuer")
        .map(|d| name(d))
        .collect();
    let mut certificate_secrets = BTreeMap::new();
    for d in docs {
        assert_eq!(
            s(d, "apiVersion"),
            "cert-manager.io/v1",
            "{label}: {}",
            id(d)
        );
        let known = BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]);
        for k in d.as_mapping().map(Mapping::keys).into_iter().flatten() {
            assert!(
                known.contains(k.as_str().unwrap_or("")),
                "{label}: {} has {k:?}",
                id(d)
            );
        }
        assert_eq!(
            s(&d["metadata"], "namespace"),
            NAMESPACE,
            "{label}: {}",
            id(d)
        );
        match kind(d) {
            "Issuer" => {
                let spec = d["spec"].as_mapping().expect("Issuer spec");
                assert_eq!(
                    spec.len(),
                    1,
                    "{label}: {} must have exactly one issuer type",
                    id(d)
                );
                let ty = spec.keys().next().and_then(Value::as_str).unwrap_or("");
                assert!(
                    ["selfSigned", "ca"].contains(&ty),
                    "{label}: {} type {ty}",
                    id(d)
                );
                if ty == "ca" {
                    let secret = s(&d["spec"]["ca"], "secretName");
                    assert!(
                        docs.iter()
                            .any(|c| kind(c) == "Certificate"
                                && s(&c["spec"], "secretName") == secret),
                        "{label}: CA issuer {} uses Secret {secret}, which no Certificate issues",
                        id(d)
                    );
                }
            }
            "Certificate" => {
                let spec = &d["spec"];
                let issuer = &spec["issuerRef"];
                assert_eq!(s(issuer, "kind"), "Issuer", "{label}: {}", id(d));
                assert!(
                    issuers.contains(s(issuer, "name")),
                    "{label}: {} names a missing issuer",
                    id(d)
                );
                assert!(
                    !s(spec, "secretName").is_empty(),
                    "{label}: {} has no secretName",
                    id(d)
                );
                certificate_secrets.insert(s(spec, "secretName").to_owned(), spec.clone());
            }
            other => panic!("{label}: unexpected cert-manager kind {other}"),
        }
    }
    certificate_secrets
}

#[test]
fn overlays_render_and_pass_kubernetes_schema_validation() {
    let test = "overlays_render_and_pass_kubernetes_schema_validation";
    let Some(tools) = tools(test) else { return };
    let started = std::time::Instant::now();
    for dir in ["base"].into_iter().chain(OVERLAYS.iter().map(|(o, _)| *o)) {
        let Some(docs) = rendered(test, dir) else {
            return;
        };
        assert!(!docs.is_empty(), "{dir} renders nothing");
        let (cert_manager, native): (Vec<&Value>, Vec<&Value>) = docs
            .iter()
            .partition(|d| s(d, "apiVersion").starts_with("cert-manager.io/"));
        let mut native: Vec<Value> = native.into_iter().cloned().collect();
        if dir == "sidecar" {
            // The partial Deployment is not a whole object; validate what applying it yields.
            for d in native.iter_mut() {
                if kind(d) == "Deployment" && name(d) == LM_DEPLOYMENT {
                    *d = merged_lm_deployment(docs);
                }
            }
        }
        validate_schemas(tools, dir, &native);
        check_cert_manager(dir, &cert_manager);
        // Namespaced resources all land in kcp-system; no Namespace object is created.
        for d in &native {
            let cluster_scoped =
                ["ClusterRole", "ClusterRoleBinding", "Namespace"].contains(&kind(d));
            assert!(kind(d) != "Namespace", "{dir}: must not create a Namespace");
            if !cluster_scoped {
                assert_eq!(
                    s(&d["metadata"], "namespace"),
                    NAMESPACE,
                    "{dir}: {}",
                    id(d)
                );
            }
        }
    }
    eprintln!(
        "rendering and schema validation took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Semantics

#[test]
fn cluster_role_grants_only_read_on_moduletemplates_manifests_and_secrets() {
    let test = "cluster_role_grants_only_read_on_moduletemplates_manifests_and_secrets";
    let expected: BTreeSet<(String, String)> = [
        ("operator.kyma-project.io", "moduletemplates"),
        ("operator.kyma-project.io", "modulereleasemetas"),
        ("operator.kyma-project.io", "manifests"),
        ("", "secrets"),
    ]
    .iter()
    .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
    .collect();
    for (overlay, _) in OVERLAYS {
        let Some(docs) = rendered(test, overlay) else {
            return;
        };
        assert!(
            of_kind(docs, "Role").next().is_none(),
            "{overlay}: unexpected Role"
        );
        let roles: Vec<&Value> = of_kind(docs, "ClusterRole").collect();
        assert_eq!(roles.len(), 1, "{overlay}: exactly one ClusterRole");
        let role = roles[0];
        assert!(
            role.get("aggregationRule").is_none(),
            "{overlay}: no aggregation"
        );
        let mut granted = BTreeSet::new();
        for rule in seq(&role["rules"]) {
            let keys: BTreeSet<String> = rule
                .as_mapping()
                .expect("rule")
                .keys()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            assert_eq!(
                keys,
                set(&["apiGroups", "resources", "verbs"]),
                "{overlay}: rule keys"
            );
            assert_eq!(
                strs(&rule["verbs"]),
                set(&["get", "list", "watch"]),
                "{overlay}: verbs"
            );
            for g in strs(&rule["apiGroups"]) {
                for r in strs(&rule["resources"]) {
                    assert!(
                        granted.insert((g.clone(), r.clone())),
                        "{overlay}: {g}/{r} granted twice"
                    );
                }
            }
        }
        assert_eq!(granted, expected, "{overlay}: resources granted");

        // Bound in kcp-system only (a RoleBinding of the ClusterRole): no cluster-wide reads.
        assert!(
            of_kind(docs, "ClusterRoleBinding").next().is_none(),
            "{overlay}: a ClusterRoleBinding grants every namespace's Secrets"
        );
        let bindings: Vec<&Value> = of_kind(docs, "RoleBinding").collect();
        assert_eq!(bindings.len(), 1, "{overlay}: exactly one RoleBinding");
        let binding = bindings[0];
        assert_eq!(s(&binding["metadata"], "namespace"), NAMESPACE);
        assert_eq!(s(&binding["roleRef"], "kind"), "ClusterRole");
        assert_eq!(
            s(&binding["roleRef"], "name"),
            name(role),
            "{overlay}: binding names the role"
        );
        let subjects = seq(&binding["subjects"]);
        assert_eq!(subjects.len(), 1, "{overlay}: one subject");
        let subject = &subjects[0];
        assert_eq!(s(subject, "kind"), "ServiceAccount");
        assert_eq!(s(subject, "namespace"), NAMESPACE);
        // The subject is the account the proxy's pod runs as.
        let deployment = of_kind(docs, "Deployment").next().expect("a Deployment");
        let account = s(
            &deployment["spec"]["template"]["spec"],
            "serviceAccountName",
        );
        if *overlay == "sidecar" {
            assert_eq!(
                s(subject, "name"),
                LM_DEPLOYMENT,
                "sidecar binds LM's account"
            );
            assert_eq!(
                account, "",
                "the sidecar patch must not change LM's account"
            );
        } else {
            assert_eq!(
                s(subject, "name"),
                account,
                "{overlay}: binding subject is the pod's account"
            );
            find(docs, "ServiceAccount", account);
        }
    }
}

fn assert_hardened(label: &str, pod_spec: &Value, c: &Value) {
    let sc = &c["securityContext"];
    let pod_sc = &pod_spec["securityContext"];
    let effective = |k: &str| {
        if sc[k].is_null() {
            pod_sc[k].clone()
        } else {
            sc[k].clone()
        }
    };
    assert_eq!(
        effective("runAsNonRoot").as_bool(),
        Some(true),
        "{label}: runAsNonRoot"
    );
    assert_eq!(
        effective("runAsUser").as_u64(),
        Some(65532),
        "{label}: runAsUser"
    );
    assert_eq!(
        sc["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{label}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{label}: allowPrivilegeEscalation"
    );
    assert_ne!(
        sc["privileged"].as_bool(),
        Some(true),
        "{label}: privileged"
    );
    assert_eq!(
        strs(&sc["capabilities"]["drop"]),
        set(&["ALL"]),
        "{label}: capabilities.drop"
    );
    assert!(
        sc["capabilities"]["add"].is_null(),
        "{label}: capabilities.add"
    );
    assert_eq!(
        s(&effective("seccompProfile"), "type"),
        "RuntimeDefault",
        "{label}: seccomp"
    );
    let resources = &c["resources"];
    assert!(
        !resources["requests"]["memory"].is_null(),
        "{label}: memory request"
    );
    assert!(
        !resources["limits"]["memory"].is_null(),
        "{label}: memory limit"
    );
    let image = s(c, "image");
    assert!(
        !image.is_empty() && !image.ends_with(":latest"),
        "{label}: pinned image, got {image:?}"
    );
}

#[test]
fn containers_run_as_non_root_with_read_only_root_filesystem() {
    let test = "containers_run_as_non_root_with_read_only_root_filesystem";
    for (overlay, _) in OVERLAYS {
        let Some(docs) = rendered(test, overlay) else {
            return;
        };
        for d in of_kind(docs, "Deployment") {
            let pod = &d["spec"]["template"]["spec"];
            let containers = seq(&pod["containers"]);
            assert!(
                !containers.is_empty(),
                "{overlay}: {} has containers",
                id(d)
            );
            // The sidecar patch carries only oci-proxy's container; the others are LM's.
            for c in containers.iter().chain(seq(&pod["initContainers"])) {
                assert_hardened(&format!("{overlay} {} {}", id(d), s(c, "name")), pod, c);
            }
            if name(d) != LM_DEPLOYMENT {
                assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
                assert_eq!(
                    s(&pod["securityContext"]["seccompProfile"], "type"),
                    "RuntimeDefault"
                );
                assert_ne!(pod["hostNetwork"].as_bool(), Some(true));
            }
        }
    }
}

/// The container port a probe, Service or NetworkPolicy `port` (name or number) refers to.
fn resolve_port(c: &Value, port: &Value) -> u16 {
    let ports = seq(&c["ports"]);
    let found = match port {
        Value::String(n) => ports.iter().find(|p| s(p, "name") == n),
        Value::Number(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_u64() == n.as_u64()),
        _ => None,
    };
    let found = found
        .unwrap_or_else(|| panic!("port {port:?} is not a container port of {}", s(c, "name")));
    u16::try_from(found["containerPort"].as_u64().expect("containerPort")).expect("port fits u16")
}

fn rendered_config<'a>(docs: &'a [Value], pod: &Value) -> (&'a Value, Value) {
    // The ConfigMap the proxy's config.yaml comes from, however the volume is built.
    let mut names = Vec::new();
    for v in seq(&pod["volumes"]) {
        if let Some(n) = v["configMap"]["name"].as_str() {
            names.push(n.to_owned());
        }
        for src in seq(&v["projected"]["sources"]) {
            if let Some(n) = src["configMap"]["name"].as_str() {
                names.push(n.to_owned());
            }
        }
    }
    assert_eq!(names.len(), 1, "one ConfigMap volume source, got {names:?}");
    let cm = find(docs, "ConfigMap", &names[0]);
    let text = cm["data"]["config.yaml"]
        .as_str()
        .expect("ConfigMap has config.yaml");
    (cm, serde_yaml::from_str(text).expect("config parses"))
}

#[test]
fn rendered_configmaps_carry_the_config_examples() {
    let test = "rendered_configmaps_carry_the_config_examples";
    for (overlay, example) in OVERLAYS {
        let Some(docs) = rendered(test, overlay) else {
            return;
        };
        let d = of_kind(docs, "Deployment").next().expect("a Deployment");
        let (cm, _) = rendered_config(docs, &d["spec"]["template"]["spec"]);
        assert_eq!(
            cm["data"]["config.yaml"].as_str(),
            Some(read(example).as_str()),
            "{overlay}: the ConfigMap differs from {example}"
        );
        assert!(
            name(cm).contains("config-"),
            "{overlay}: generated (hashed) ConfigMap name"
        );
    }
}

#[test]
fn standalone_overlays_probe_healthz_and_readyz_on_the_configured_port() {
    let test = "standalone_overlays_probe_healthz_and_readyz_on_the_configured_port";
    for (overlay, example) in OVERLAYS.iter().filter(|(o, _)| *o != "sidecar") {
        let Some(docs) = rendered(test, overlay) else {
            return;
        };
        let cfg = config_of(example);
        let listen = listen_of(&cfg);
        assert!(
            listen.ip().is_unspecified(),
            "{overlay}: must listen on all pod addresses"
        );
        let tls = !cfg["tls"].is_null();
        assert!(tls, "{overlay}: in-cluster endpoints serve TLS");
        let d = find(docs, "Deployment", "oci-proxy");
        let c = container(d, PROXY_CONTAINER);
        let names: Vec<&str> = seq(&c["ports"]).iter().map(|p| s(p, "name")).collect();
        assert_eq!(names, ["registry"], "{overlay}: one named port");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(s(get, "path"), path, "{overlay}: {probe} path");
            assert_eq!(
                resolve_port(c, &get["port"]),
                listen.port(),
                "{overlay}: {probe} port"
            );
            assert_eq!(
                s(get, "scheme"),
                if tls { "HTTPS" } else { "HTTP" },
                "{overlay}: {probe} scheme"
            );
        }
        // The Service and the NetworkPolicy reach the same port.
        let svc = find(docs, "Service", "oci-proxy");
        let svc_ports = seq(&svc["spec"]["ports"]);
        assert_eq!(svc_ports.len(), 1, "{overlay}: one Service port");
        assert_eq!(resolve_port(c, &svc_ports[0]["targetPort"]), listen.port());
        assert_eq!(
            svc_ports[0]["port"].as_u64(),
            Some(443),
            "{overlay}: https on 443"
        );
        let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_mapping().expect("selector") {
            assert_eq!(
                &pod_labels[k.as_str().expect("key")],
                v,
                "{overlay}: Service selects the pods"
            );
        }
        let np = find(docs, "NetworkPolicy", "oci-proxy");
        assert_eq!(strs(&np["spec"]["policyTypes"]), set(&["Ingress"]));
        let rules = seq(&np["spec"]["ingress"]);
        assert_eq!(rules.len(), 1, "{overlay}: one ingress rule");
        let from = seq(&rules[0]["from"]);
        assert_eq!(from.len(), 1, "{overlay}: one peer");
        assert!(from[0]["namespaceSelector"].is_null() && from[0]["ipBlock"].is_null());
        assert_eq!(
            s(
                &from[0]["podSelector"]["matchLabels"],
                "app.kubernetes.io/component"
            ),
            "lifecycle-manager.kyma-project.io",
            "{overlay}: only Lifecycle Manager's pods"
        );
        let np_ports = seq(&rules[0]["ports"]);
        assert_eq!(np_ports.len(), 1);
        assert_eq!(resolve_port(c, &np_ports[0]["port"]), listen.port());
        for (k, v) in np["spec"]["podSelector"]["matchLabels"]
            .as_mapping()
            .expect("podSelector")
        {
            assert_eq!(
                &pod_labels[k.as_str().expect("key")],
                v,
                "{overlay}: policy selects the pods"
            );
        }
        let pdb = find(docs, "PodDisruptionBudget", "oci-proxy");
        assert_eq!(
            pdb["spec"]["selector"], d["spec"]["selector"],
            "{overlay}: PDB selects the pods"
        );
    }
}

#[test]
fn mounts_line_up_with_the_config() {
    let test = "mounts_line_up_with_the_config";
    for (overlay, example) in OVERLAYS {
        let Some(docs) = rendered(test, overlay) else {
            return;
        };
        let cfg = config_of(example);
        let d = if *overlay == "sidecar" {
            merged_lm_deployment(docs)
        } else {
            find(docs, "Deployment", "oci-proxy").clone()
        };
        let pod = &d["spec"]["template"]["spec"];
        let c = container(&d, PROXY_CONTAINER);
        let (_, rendered_cfg) = rendered_config(docs, pod);
        assert_eq!(rendered_cfg, cfg, "{overlay}: rendered config");

        let args = strs(&c["args"]);
        assert!(args.contains("serve"), "{overlay}: runs serve");
        let volumes: BTreeMap<&str, &Value> = seq(&pod["volumes"])
            .iter()
            .map(|v| (s(v, "name"), v))
            .collect();
        let mounts: Vec<(&str, &Value, bool)> = seq(&c["volumeMounts"])
            .iter()
            .map(|m| {
                let v = volumes
                    .get(s(m, "name"))
                    .unwrap_or_else(|| panic!("{overlay}: no volume {}", s(m, "name")));
                (s(m, "mountPath"), *v, m["readOnly"].as_bool() == Some(true))
            })
            .collect();
        let mount_of = |path: &str| {
            mounts
                .iter()
                .filter(|(mp, _, _)| Path::new(path).starts_with(mp))
                .max_by_key(|(mp, _, _)| mp.len())
                .unwrap_or_else(|| panic!("{overlay}: {path} is on no volume (read-only root)"))
        };

        // The config file path in the arguments is the ConfigMap's config.yaml.
        let seq_args = seq(&c["args"]);
        let pos = seq_args
            .iter()
            .position(|a| a.as_str() == Some("--config"))
            .expect("--config");
        let config_path = seq_args[pos + 1].as_str().expect("config path");
        assert_eq!(config_path, "/etc/oci-proxy/config.yaml");
        let (mp, v, ro) = mount_of(config_path);
        assert!(ro, "{overlay}: config mounted read-only");
        let rel = Path::new(config_path)
            .strip_prefix(mp)
            .expect("under mount")
            .to_str()
            .expect("utf-8");
        let items: Vec<&Value> = seq(&v["configMap"]["items"])
            .iter()
            .chain(
                seq(&v["projected"]["sources"])
                    .iter()
                    .flat_map(|s| seq(&s["configMap"]["items"])),
            )
            .collect();
        assert!(items
            .iter()
            .any(|i| s(i, "path") == rel && s(i, "key") == "config.yaml"));

        // The cache directory is a size-limited emptyDir, writable.
        let cache_dir = s(&cfg["cache"], "dir");
        let (mp, v, ro) = mount_of(cache_dir);
        assert_eq!(*mp, cache_dir, "{overlay}: the cache has its own volume");
        assert!(!ro, "{overlay}: cache writable");
        let limit = s(&v["emptyDir"], "sizeLimit");
        let limit_gib: u64 = limit
            .strip_suffix("Gi")
            .and_then(|n| n.parse().ok())
            .expect("sizeLimit in Gi");
        let max = s(&cfg["cache"], "max_size");
        let max_gib: u64 = max
            .strip_suffix("GiB")
            .and_then(|n| n.parse().ok())
            .expect("max_size in GiB");
        assert!(
            max_gib < limit_gib,
            "{overlay}: cache.max_size {max} must stay below sizeLimit {limit}"
        );

        // TLS files come from the certificate Secret, under the config mount.
        if !cfg["tls"].is_null() {
            let secrets = check_cert_manager(
                overlay,
                &docs
                    .iter()
                    .filter(|d| s(d, "apiVersion").starts_with("cert-manager.io/"))
                    .collect::<Vec<_>>(),
            );
            for (field, key) in [("cert", "tls.crt"), ("key", "tls.key")] {
                let path = s(&cfg["tls"], field);
                let (mp, v, ro) = mount_of(path);
                assert!(ro, "{overlay}: TLS mounted read-only");
                let rel = Path::new(path)
                    .strip_prefix(mp)
                    .expect("under mount")
                    .to_str()
                    .expect("utf-8");
                let source = seq(&v["projected"]["sources"])
                    .iter()
                    .find(|src| {
                        seq(&src["secret"]["items"])
                            .iter()
                            .any(|i| s(i, "path") == rel && s(i, "key") == key)
                    })
                    .unwrap_or_else(|| panic!("{overlay}: nothing provides {path}"));
                let secret = s(&source["secret"], "name");
                let cert = secrets
                    .get(secret)
                    .unwrap_or_else(|| panic!("{overlay}: no Certificate issues {secret}"));
                let dns = strs(&cert["dnsNames"]);
                assert!(
                    dns.contains(&format!("oci-proxy.{NAMESPACE}.svc")),
                    "{overlay}: {dns:?}"
                );
            }
        }
    }
}

#[test]
fn sidecar_joins_lifecycle_manager_on_loopback_over_plain_http() {
    let test = "sidecar_joins_lifecycle_manager_on_loopback_over_plain_http";
    let Some(docs) = rendered(test, "sidecar") else {
        return;
    };
    let cfg = config_of("config/sidecar.yaml");
    let listen = listen_of(&cfg);
    assert_eq!(
        listen,
        SocketAddr::from(([127, 0, 0, 1], 5000)),
        "sidecar listen"
    );
    assert!(
        cfg["tls"].is_null(),
        "sidecar speaks plain HTTP (LM accepts it for 127.0.0.1)"
    );

    // Only what joins LM's pod, plus config and RBAC: no standalone proxy.
    let kinds: BTreeSet<String> = docs.iter().map(id).collect();
    let expected: BTreeSet<String> = [
        "ClusterRole/oci-proxy-catalog-reader".to_owned(),
        "RoleBinding/oci-proxy-catalog-reader-lifecycle-manager".to_owned(),
        format!("Deployment/{LM_DEPLOYMENT}"),
    ]
    .into_iter()
    .collect();
    let without_cm: BTreeSet<String> = kinds
        .iter()
        .filter(|k| !k.starts_with("ConfigMap/"))
        .cloned()
        .collect();
    assert_eq!(without_cm, expected, "sidecar overlay resources");
    assert_eq!(kinds.len(), expected.len() + 1, "one ConfigMap");

    let patch = find(docs, "Deployment", LM_DEPLOYMENT);
    assert_eq!(s(&patch["metadata"], "namespace"), NAMESPACE);
    // The patch adds a container and volumes and touches nothing else of LM's Deployment.
    let spec_keys: Vec<&str> = patch["spec"]
        .as_mapping()
        .expect("spec")
        .keys()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(spec_keys, ["template"]);
    let pod_keys: BTreeSet<String> = patch["spec"]["template"]["spec"]
        .as_mapping()
        .expect("pod spec")
        .keys()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    assert_eq!(pod_keys, set(&["containers", "volumes"]));
    let containers = seq(&patch["spec"]["template"]["spec"]["containers"]);
    assert_eq!(containers.len(), 1);
    assert_eq!(s(&containers[0], "name"), PROXY_CONTAINER);
    for v in seq(&patch["spec"]["template"]["spec"]["volumes"]) {
        assert!(
            s(v, "name").starts_with("oci-proxy-"),
            "volume names are prefixed: {}",
            s(v, "name")
        );
    }
    // Kubelet HTTP probes target the pod IP, which a loopback listener does not serve: the
    // sidecar's probes are `oci-proxy probe` exec probes against 127.0.0.1.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let p = &containers[0][probe];
        assert!(
            p["httpGet"].is_null(),
            "sidecar {probe} could never succeed over HTTP"
        );
        let command: Vec<&str> = seq(&p["exec"]["command"])
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            command,
            [
                "oci-proxy",
                "probe",
                "--url",
                &format!("http://127.0.0.1:5000{path}")
            ],
            "sidecar {probe}"
        );
    }

    // Merged into LM's pod: port and names stay unique.
    let merged = merged_lm_deployment(docs);
    let (mut numbers, mut names) = (BTreeSet::new(), BTreeSet::new());
    for c in seq(&merged["spec"]["template"]["spec"]["containers"]) {
        for p in seq(&c["ports"]) {
            assert!(
                numbers.insert(p["containerPort"].as_u64()),
                "port clash in LM's pod: {p:?}"
            );
            assert!(
                names.insert(s(p, "name").to_owned()),
                "port name clash in LM's pod: {p:?}"
            );
        }
    }
    assert!(
        numbers.contains(&Some(u64::from(listen.port()))),
        "the listen port is declared"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

#[test]
fn dockerfile_runs_unprivileged_with_the_documented_paths() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |l: &str| lines.contains(&l);
    for l in [
        "USER 65532:65532",
        "EXPOSE 5000",
        "VOLUME [\"/var/cache/oci-proxy\"]",
        "ENTRYPOINT [\"oci-proxy\"]",
        "CMD [\"serve\", \"--config\", \"/etc/oci-proxy/config.yaml\"]",
    ] {
        assert!(has(l), "Dockerfile lacks `{l}`");
    }
    let froms: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert_eq!(froms.len(), 2, "builder and runtime stages");
    assert!(
        froms[0].contains("bookworm"),
        "builder on bookworm: {}",
        froms[0]
    );
    assert!(
        froms[1].contains("debian12") || froms[1].contains("bookworm"),
        "runtime: {}",
        froms[1]
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
    // Files copied from the build context exist and are not excluded by .dockerignore.
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        let src = parts[parts.len() - 2];
        assert!(root().join(src).exists(), "COPY source {src} missing");
        assert!(
            !ignored.iter().any(|i| src
                .trim_start_matches("./")
                .starts_with(i.trim_end_matches('/'))
                && src != "."),
            "COPY source {src} is excluded by .dockerignore"
        );
    }
    for must in ["target/", ".git"] {
        assert!(ignored.contains(&must), ".dockerignore lacks {must}");
    }
}
