//! Kyma modules end to end: the `oci-proxy` binary with a module catalog (files source and
//! Kubernetes source against the fake API server), in front of Debian's docker-registry with
//! htpasswd and with token auth, pulled anonymously by skopeo and by LM's request sequence.
//!
//! One shared setup per (source, auth) combination: label-era ModuleTemplates modelled on LM's
//! samples, dockerconfigjson Secrets labelled `operator.kyma-project.io/oci-registry-cred` and
//! `managed-by: lifecycle-manager`, and a named default Secret (KLM's current
//! `--oci-registry-cred-secret` mode). Each test walks the same scenarios:
//! 1. anonymous pulls of module repositories get the content (digests match);
//! 2. repositories no module names get no credentials (401, and the upstream never sees them);
//! 3. a module whose selector matches no Secret is denied (403; the body names no module,
//!    selector or Secret, the proxy's log names the module and the selector);
//! 4. two modules on the same registry each get their own Secret's user;
//! 5. rotation of the registry password and the Secret is followed within seconds, and the old
//!    password is not sent afterwards;
//! 6. the default Secret covers every repository under its registry + subpath;
//! 7. `/readyz` is 503 until the catalog synced, then 200;
//! 8. `oci-proxy resolve` explains the decisions without printing a password;
//! 9. the proxy's logs (at debug level) contain no password.
//!
//! Every request the proxy sends to the registry passes a recording forwarder
//! ([`kyma::Gate`]), so the tests see which Basic credentials reached it for which repository.
//! Also here: the README's worked example (`config/dev-catalog-example/`) run end to end, and
//! two `#[ignore]`d tests documenting bugs in src/ (see their doc comments for the fixes).

use crate::support;

use crate::support::kube_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::Value;
use support::kyma::{
    self, docker_secret, lm_pull, module_repository, module_template, CRED_LABEL, KCP_SYSTEM,
};
use support::*;

/// A port-less name for the registry, configured as an upstream with the registry's real
/// endpoint: OCI clients (skopeo, go-containerregistry) cannot put `host:port` into a path.
const ALIAS: &str = "modules.registry.test";

const TMPL_USER: &str = "template-robot";
const TMPL_PW: &str = "tmpl-pw-3f9a1c";
const TMPL_PW_NEW: &str = "tmpl-pw-rotated-77d2e0";
const OTHER_USER: &str = "other-robot";
const OTHER_PW: &str = "other-pw-51b8e4";
const KLM_USER: &str = "klm-robot";
const KLM_PW: &str = "klm-pw-c03d9b";

const TMPL_SECRET: &str = "template-operator-cred";
const OTHER_SECRET: &str = "other-operator-cred";
const DEFAULT_SECRET: &str = "klm-oci-registry";

/// How long a change (Secret, password, API server) may take to show.
const CHANGE_DEADLINE: Duration = Duration::from_secs(15);

/// One module repository on the upstream.
struct Module {
    /// ModuleTemplate name (kcp-system).
    name: &'static str,
    component: &'static str,
    version: &'static str,
    /// Path under the registry (`mods`, or the default Secret's subpath).
    path: &'static str,
    /// Addressed as `127.0.0.1:<port>` (else as [`ALIAS`]).
    by_port: bool,
}

impl Module {
    fn repository(&self) -> String {
        module_repository(self.path, self.component)
    }
    fn scope(&self) -> String {
        format!("repository:{}:pull", self.repository())
    }
}

/// Pulled via the alias with skopeo; selector → Secret `template-operator-cred`.
const TEMPLATE: Module = Module {
    name: "template-operator",
    component: "kyma-project.io/module/template-operator",
    version: "1.0.0",
    path: "mods",
    by_port: false,
};
/// Same registry and path, selector → Secret `other-operator-cred` (another user).
const OTHER: Module = Module {
    name: "other-operator",
    component: "kyma-project.io/module/other-operator",
    version: "2.1.0",
    path: "mods",
    by_port: false,
};
/// baseUrl `http://127.0.0.1:<port>/mods`: a module host not in `upstreams`; selector →
/// `template-operator-cred` (which has an entry for that host too).
const LOCAL: Module = Module {
    name: "local-operator",
    component: "kyma-project.io/module/local-operator",
    version: "0.3.0",
    path: "mods",
    by_port: true,
};
/// Selector matches no Secret.
const ORPHAN: Module = Module {
    name: "orphan-operator",
    component: "kyma-project.io/module/orphan-operator",
    version: "0.1.0",
    path: "mods",
    by_port: true,
};
/// No ModuleTemplate: served by the default Secret (subpath `shared`).
const SHARED: Module = Module {
    name: "shared-operator",
    component: "kyma-project.io/module/shared-operator",
    version: "3.0.0",
    path: "shared",
    by_port: false,
};
/// Another repository under the default Secret's subpath.
const SHARED_TOOL: &str = "shared/tools/helper";
/// A repository on the same registry that nothing names.
const UNRELATED: &str = "team/unrelated";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthKind {
    Htpasswd,
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceKind {
    Files,
    Kubernetes,
}

/// Where the catalog objects live.
enum Source {
    Files(tempfile::TempDir),
    Kubernetes {
        api: kube_api::FakeKubeApi,
        gate: kyma::Gate,
        kubeconfig: PathBuf,
        _dir: tempfile::TempDir,
    },
}

impl Source {
    async fn start(kind: SourceKind) -> Source {
        match kind {
            SourceKind::Files => Source::Files(tempfile::tempdir().expect("catalog dir")),
            SourceKind::Kubernetes => {
                let api = kube_api::FakeKubeApi::start().await;
                let target: SocketAddr = api
                    .url()
                    .trim_start_matches("http://")
                    .parse()
                    .expect("fake API address");
                let gate = kyma::Gate::start(target).await;
                let dir = tempfile::tempdir().expect("kubeconfig dir");
                let kubeconfig = dir.path().join("kubeconfig");
                gate.write_kubeconfig(&kubeconfig);
                Source::Kubernetes {
                    api,
                    gate,
                    kubeconfig,
                    _dir: dir,
                }
            }
        }
    }

    /// Creates or replaces a catalog object.
    fn apply(&self, obj: Value) {
        match self {
            Source::Files(dir) => kyma::write_object_file(dir.path(), &obj),
            Source::Kubernetes { api, .. } => {
                api.apply(obj);
            }
        }
    }

    /// Deletes a catalog object.
    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        match self {
            Source::Files(dir) => {
                let file = format!("{kind}-{namespace}-{name}.yaml").to_ascii_lowercase();
                std::fs::remove_file(dir.path().join(file)).expect("remove object file");
            }
            Source::Kubernetes { api, .. } => {
                assert!(
                    api.delete(kind, namespace, name),
                    "{kind} {namespace}/{name}"
                );
            }
        }
    }

    /// The `catalog:` section of the proxy config.
    fn catalog_yaml(&self) -> String {
        let source = match self {
            Source::Files(dir) => format!("  files: \"{}\"\n", dir.path().display()),
            Source::Kubernetes { .. } => "  kubernetes: {}\n".to_string(),
        };
        format!(
            "catalog:\n{source}  default_secret: {{namespace: {KCP_SYSTEM}, name: {DEFAULT_SECRET}, subpath: shared}}\n"
        )
    }

    fn env(&self) -> Vec<(&str, &str)> {
        let mut env = vec![("OCI_PROXY_LOG", "debug")];
        if let Source::Kubernetes { kubeconfig, .. } = self {
            env.push(("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path")));
        }
        env
    }
}

/// Registry (+ token server), catalog source and the proxy, with every object in place.
struct World {
    auth: AuthKind,
    tokens: Option<TokenServer>,
    reg: Registry,
    /// Recording forwarder to the registry: the endpoint of the [`ALIAS`] upstream.
    alias_gate: kyma::Gate,
    /// Recording forwarder to the registry: the `127.0.0.1:<port>` that port-addressed
    /// modules name in their baseUrl (a module host that is not in `upstreams`).
    port_gate: kyma::Gate,
    source: Source,
    proxy: ProxyProcess,
    pushed: std::collections::BTreeMap<String, PushedImage>,
}

fn layers(seed: u64) -> Vec<Vec<u8>> {
    vec![random_bytes(40_000, seed), random_bytes(9_000, seed + 100)]
}

/// The registry host a module's baseUrl names (and a client puts first in the path).
fn host_of(port_host: &str, m: &Module) -> String {
    if m.by_port {
        port_host.to_string()
    } else {
        ALIAS.to_string()
    }
}

/// The Secret `template-operator-cred`: entries for the alias and for `http://127.0.0.1:<port>`.
fn template_secret(port_host: &str, password: &str) -> Value {
    let by_port = format!("http://{port_host}");
    docker_secret(
        KCP_SYSTEM,
        TMPL_SECRET,
        Some("template-operator"),
        &[
            (ALIAS, TMPL_USER, password),
            (&by_port, TMPL_USER, password),
        ],
    )
}

/// The module's ModuleTemplate with baseUrl `http://<host>/<path>` and selector `cred`.
fn template_of(port_host: &str, m: &Module, cred: &str) -> Value {
    let base_url = format!("http://{}/{}", host_of(port_host, m), m.path);
    module_template(
        KCP_SYSTEM,
        m.name,
        &base_url,
        m.component,
        m.version,
        Some(cred),
    )
}

impl World {
    /// `<registry host>/<repository>` as a client names it through the proxy.
    fn name_of(&self, m: &Module) -> String {
        format!("{}/{}", host_of(&self.port_gate.host(), m), m.repository())
    }

    fn template_secret(&self, password: &str) -> Value {
        template_secret(&self.port_gate.host(), password)
    }

    /// The gate a module's requests pass.
    fn gate_of(&self, m: &Module) -> &kyma::Gate {
        if m.by_port {
            &self.port_gate
        } else {
            &self.alias_gate
        }
    }

    async fn start(source: SourceKind, auth: AuthKind) -> World {
        let (tokens, reg) = match auth {
            AuthKind::Htpasswd => (
                None,
                Registry::start(RegistryAuth::htpasswd(&[
                    (ADMIN_USER, ADMIN_PASSWORD),
                    (TMPL_USER, TMPL_PW),
                    (OTHER_USER, OTHER_PW),
                    (KLM_USER, KLM_PW),
                ]))
                .await,
            ),
            AuthKind::Token => {
                let policy = TokenPolicy::new()
                    .user(TMPL_USER, TMPL_PW)
                    .user(OTHER_USER, OTHER_PW)
                    .user(KLM_USER, KLM_PW)
                    .grant(TMPL_USER, &TEMPLATE.repository(), &["pull"])
                    .grant(TMPL_USER, &LOCAL.repository(), &["pull"])
                    .grant(OTHER_USER, &OTHER.repository(), &["pull"])
                    .grant(KLM_USER, &SHARED.repository(), &["pull"])
                    .grant(KLM_USER, SHARED_TOOL, &["pull"]);
                let tokens = TokenServer::start(policy).await;
                let reg = Registry::start(RegistryAuth::Token(tokens.info())).await;
                (Some(tokens), reg)
            }
        };
        let admin = Some((ADMIN_USER, ADMIN_PASSWORD));
        let mut pushed = std::collections::BTreeMap::new();
        for (i, m) in [&TEMPLATE, &OTHER, &LOCAL, &ORPHAN, &SHARED]
            .into_iter()
            .enumerate()
        {
            let image =
                push_image(&reg, admin, &m.repository(), m.version, &layers(i as u64)).await;
            pushed.insert(m.repository(), image);
        }
        for (i, repo) in [SHARED_TOOL, UNRELATED].into_iter().enumerate() {
            let image = push_image(&reg, admin, repo, "v1", &layers(10 + i as u64)).await;
            pushed.insert(repo.to_string(), image);
        }

        let reg_addr: SocketAddr = reg.host().parse().expect("registry address");
        let alias_gate = kyma::Gate::forwarder(reg_addr).await;
        let port_gate = kyma::Gate::forwarder(reg_addr).await;
        let source = Source::start(source).await;
        let host = port_gate.host();
        for (m, cred) in [
            (&TEMPLATE, "template-operator"),
            (&OTHER, "other-operator"),
            (&LOCAL, "template-operator"),
            (&ORPHAN, "orphan-operator"),
        ] {
            source.apply(template_of(&host, m, cred));
        }
        source.apply(template_secret(&host, TMPL_PW));
        source.apply(docker_secret(
            KCP_SYSTEM,
            OTHER_SECRET,
            Some("other-operator"),
            &[(ALIAS, OTHER_USER, OTHER_PW)],
        ));
        source.apply(docker_secret(
            KCP_SYSTEM,
            DEFAULT_SECRET,
            None,
            &[(ALIAS, KLM_USER, KLM_PW)],
        ));

        let config = format!(
            "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n  tag_ttl: 0s\n\
             upstreams:\n  - name: {ALIAS}\n    endpoint: {}\ndefault_upstream: {ALIAS}\n{}",
            alias_gate.url(),
            source.catalog_yaml()
        );
        // The token server is another port of the registry's host: a realm to list.
        let config = match &tokens {
            Some(t) => trust_realm(&config, &alias_gate.url(), &t.realm_host()),
            None => config,
        };
        let proxy = ProxyProcess::start_with_env(&config, &source.env()).await;
        World {
            auth,
            tokens,
            reg,
            alias_gate,
            port_gate,
            source,
            proxy,
            pushed,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.proxy.dir().join("config.yaml")
    }

    async fn readyz(&self) -> StatusCode {
        http_client()
            .get(format!("{}/readyz", self.proxy.url()))
            .send()
            .await
            .expect("GET /readyz")
            .status()
    }

    /// GET a manifest through the proxy; (status, OCI error body or Null).
    async fn get_manifest(&self, name: &str, reference: &str) -> (StatusCode, Value) {
        let resp = http_client()
            .get(format!(
                "{}/v2/{name}/manifests/{reference}",
                self.proxy.url()
            ))
            .header("Accept", kyma::GGCR_MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET manifest through the proxy");
        let status = resp.status();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// skopeo copies `<name>:<tag>` through the proxy with no credentials; checks digests.
    async fn skopeo_pull(&self, name: &str, tag: &str, repository: &str) {
        let dest = tempfile::tempdir().expect("skopeo dest");
        let out = skopeo_copy(
            &format!("{}/{name}:{tag}", self.proxy.host()),
            dest.path(),
            &["--src-no-creds"],
        )
        .await;
        assert_success(&out);
        assert_same_image(dest.path(), &self.pushed[repository]);
    }

    /// LM's request sequence for a module through the proxy; checks digests.
    async fn lm_pull_ok(&self, m: &Module) {
        let got = lm_pull(&self.proxy.url(), &self.name_of(m), m.version)
            .await
            .unwrap_or_else(|e| panic!("LM-style pull of {} failed: {e:?}", self.name_of(m)));
        let want = &self.pushed[&m.repository()];
        assert_eq!(got.manifest_digest, want.manifest_digest);
        assert_eq!(got.config_digest, want.config_digest);
        assert_eq!(got.layer_digests, want.layer_digests);
    }

    fn tokens(&self) -> &TokenServer {
        self.tokens.as_ref().expect("token auth")
    }

    /// Token requests asking for `scope`.
    fn token_requests(&self, scope: &str) -> Vec<TokenRequest> {
        self.tokens()
            .requests()
            .into_iter()
            .filter(|r| r.scopes.iter().any(|s| s == scope))
            .collect()
    }

    /// Runs `oci-proxy resolve` for `name`; checks it succeeds, mentions each of `wants` and
    /// prints no secret. Returns the output.
    async fn resolve_contains(&self, name: &str, wants: &[&str]) -> String {
        let (ok, text) = kyma::resolve(&self.config_path(), name, &self.source.env()).await;
        assert!(ok, "oci-proxy resolve {name} failed:\n{text}");
        for s in self.secrets() {
            assert!(!text.contains(&s), "resolve printed a secret:\n{text}");
        }
        for want in wants {
            assert!(
                text.contains(want),
                "resolve {name}: no {want:?} in\n{text}"
            );
        }
        text
    }

    /// Basic users the registry was sent for `m`'s repository.
    fn basic_users(&self, m: &Module) -> std::collections::BTreeSet<String> {
        basic_users(&self.gate_of(m).requests_for(&m.repository()))
    }

    /// Every secret a log must never show: passwords, `user:password` in base64, and the
    /// Secrets' `.dockerconfigjson` payloads.
    fn secrets(&self) -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = Vec::new();
        for (user, pw) in [
            (TMPL_USER, TMPL_PW),
            (TMPL_USER, TMPL_PW_NEW),
            (OTHER_USER, OTHER_PW),
            (KLM_USER, KLM_PW),
            (ADMIN_USER, ADMIN_PASSWORD),
        ] {
            out.push(pw.to_string());
            out.push(b64.encode(format!("{user}:{pw}")));
        }
        for pw in [TMPL_PW, TMPL_PW_NEW] {
            let s = self.template_secret(pw);
            out.push(s["data"][".dockerconfigjson"].as_str().unwrap().to_string());
        }
        out
    }
}

fn assert_same_image(dir: &Path, pushed: &PushedImage) {
    let got = DirImage::read(dir);
    assert_eq!(got.manifest_digest, pushed.manifest_digest);
    let mut want: std::collections::BTreeSet<String> =
        pushed.layer_digests.iter().cloned().collect();
    want.insert(pushed.config_digest.clone());
    assert_eq!(got.blob_digests, want);
}

/// Basic users among `requests`.
fn basic_users(requests: &[kyma::SeenRequest]) -> std::collections::BTreeSet<String> {
    requests
        .iter()
        .filter_map(|r| r.basic().map(|(u, _)| u))
        .collect()
}

fn error_code(body: &Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or("")
}

fn error_message(body: &Value) -> &str {
    body["errors"][0]["message"].as_str().unwrap_or("")
}

/// Scenario 7 for the Kubernetes source: the API server is unreachable at first.
async fn readiness(w: &World) {
    match &w.source {
        Source::Kubernetes { gate, api, .. } => {
            assert_eq!(
                w.readyz().await,
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready before the catalog synced"
            );
            // Not synced: the module's registry host is not routable yet. The name falls to
            // `default_upstream`, where `127.0.0.1:<port>/...` is not a valid repository, so
            // nothing is sent anywhere.
            let (status, body) = w.get_manifest(&w.name_of(&LOCAL), LOCAL.version).await;
            assert_eq!(
                (status, error_code(&body)),
                (StatusCode::BAD_REQUEST, "NAME_INVALID"),
                "{body}"
            );
            assert!(w.port_gate.requests().is_empty() && w.alias_gate.requests().is_empty());
            // The API server drops every connection: counted, and the catalog is not ready.
            wait_until(
                CHANGE_DEADLINE,
                "a failed catalog watch counted",
                || async {
                    let text = w.proxy.metrics().await;
                    metric_sum(&text, "oci_proxy_catalog_watch_errors_total", &[]) >= 1.0
                },
            )
            .await;
            let text = w.proxy.metrics().await;
            assert_eq!(metric_sum(&text, "oci_proxy_catalog_ready", &[]), 0.0);
            gate.open();
            wait_until(
                CHANGE_DEADLINE,
                "/readyz = 200 after the API server came up",
                || async { w.readyz().await == StatusCode::OK },
            )
            .await;
            wait_until(
                CHANGE_DEADLINE,
                "the proxy watches the API server",
                || async { api.request_log().iter().any(|r| r.is_watch()) },
            )
            .await;
        }
        Source::Files(_) => {
            wait_until(CHANGE_DEADLINE, "/readyz = 200 (files source)", || async {
                w.readyz().await == StatusCode::OK
            })
            .await;
        }
    }
    assert_eq!(w.readyz().await, StatusCode::OK);
    // The four ModuleTemplates are in the index, and the catalog says it is ready.
    wait_until(
        CHANGE_DEADLINE,
        "catalog metrics after the sync",
        || async {
            let text = w.proxy.metrics().await;
            metric_sum(&text, "oci_proxy_catalog_ready", &[]) == 1.0
                && metric_sum(&text, "oci_proxy_catalog_modules", &[]) == 4.0
                && metric_sum(&text, "oci_proxy_catalog_secrets", &[]) >= 1.0
        },
    )
    .await;
}

/// Scenarios 1 and 4: anonymous pulls of module repositories, each with its own Secret.
async fn module_pulls(w: &World) {
    w.skopeo_pull(
        &w.name_of(&TEMPLATE),
        TEMPLATE.version,
        &TEMPLATE.repository(),
    )
    .await;
    w.skopeo_pull(&w.name_of(&OTHER), OTHER.version, &OTHER.repository())
        .await;
    w.lm_pull_ok(&LOCAL).await;
    for (m, user) in [
        (&TEMPLATE, TMPL_USER),
        (&OTHER, OTHER_USER),
        (&LOCAL, TMPL_USER),
    ] {
        match w.auth {
            AuthKind::Token => {
                let reqs = w.token_requests(&m.scope());
                assert!(!reqs.is_empty(), "token requested for {}", m.scope());
                assert!(
                    reqs.iter()
                        .all(|r| r.authorized_user.as_deref() == Some(user)
                            && r.basic_password_seen.is_some()
                            && r.status == 200),
                    "{} is fetched only as {user}: {reqs:?}",
                    m.scope()
                );
            }
            AuthKind::Htpasswd => assert_eq!(
                w.basic_users(m).into_iter().collect::<Vec<_>>(),
                vec![user.to_string()],
                "{} is read only as {user}",
                m.repository()
            ),
        }
    }
}

/// Scenario 2: repositories no module names get no credentials. On the port-addressed host
/// (named by a module as `http://`), only that module's own repositories are plain HTTP: any
/// other repository there is asked over https, which the plain-HTTP registry cannot answer
/// (502), and no HTTP request for it ever reaches the registry.
async fn unrelated_repositories(w: &World) {
    let (status, body) = w.get_manifest(&format!("{ALIAS}/{UNRELATED}"), "v1").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "UNAUTHORIZED", "{body}");
    let seen = w.alias_gate.requests_for(UNRELATED);
    assert!(
        !seen.is_empty(),
        "the proxy asked the registry for {UNRELATED}"
    );
    if w.auth == AuthKind::Htpasswd {
        assert!(
            seen.iter().all(|r| r.authorization.is_none()),
            "{UNRELATED} reached the registry with credentials: {seen:?}"
        );
    }
    // The template module's repository too, on a host its baseUrl does not name.
    for repo in [UNRELATED.to_string(), TEMPLATE.repository()] {
        let name = format!("{}/{repo}", w.port_gate.host());
        let (status, body) = w.get_manifest(&name, "v1").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{name}: {body}");
        assert_eq!(error_code(&body), "UNAVAILABLE", "{name}: {body}");
        let seen = w.port_gate.requests_for(&repo);
        assert!(seen.is_empty(), "{name} went out over plain HTTP: {seen:?}");
    }
    if w.auth == AuthKind::Token {
        let reqs = w.token_requests(&format!("repository:{UNRELATED}:pull"));
        assert!(!reqs.is_empty());
        assert!(
            reqs.iter()
                .all(|r| r.authorized_user.is_none() && r.basic_password_seen.is_none()),
            "{reqs:?}"
        );
    }
}

/// Scenario 3: a selector matching no Secret is denied, and the upstream is never asked.
async fn orphan_module_denied(w: &World) {
    let (status, body) = w.get_manifest(&w.name_of(&ORPHAN), ORPHAN.version).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "DENIED", "{body}");
    // The anonymous client learns nothing about the catalog; the operator's log says why.
    let msg = error_message(&body);
    assert!(
        !msg.contains("orphan-operator") && !msg.contains("kcp-system"),
        "the body names no catalog object: {msg}"
    );
    let logs = w.proxy.logs();
    assert!(
        logs.contains("kcp-system/orphan-operator")
            && logs.contains("operator.kyma-project.io/oci-registry-cred=orphan-operator"),
        "the log names the ModuleTemplate and the selector"
    );
    for s in w.secrets() {
        assert!(!msg.contains(&s), "denial message leaks a secret: {msg}");
    }
    assert!(w.port_gate.requests_for(&ORPHAN.repository()).is_empty());
    if w.auth == AuthKind::Token {
        assert_eq!(w.tokens().requests_for_scope(&ORPHAN.scope()), 0);
    }
}

/// Scenario 6: the default Secret covers its registry + subpath.
async fn default_secret(w: &World) {
    w.lm_pull_ok(&SHARED).await;
    // LM as deploy/ runs it: --oci-registry-host=<proxy>, subpath unchanged, so the path names
    // no registry and `default_upstream` routes it.
    let got = lm_pull(&w.proxy.url(), &SHARED.repository(), SHARED.version)
        .await
        .unwrap_or_else(|e| panic!("LM-style pull via default_upstream: {e:?}"));
    assert_eq!(
        got.manifest_digest,
        w.pushed[&SHARED.repository()].manifest_digest
    );
    w.skopeo_pull(&format!("{ALIAS}/{SHARED_TOOL}"), "v1", SHARED_TOOL)
        .await;
    for repo in [SHARED.repository(), SHARED_TOOL.to_string()] {
        match w.auth {
            AuthKind::Token => {
                let reqs = w.token_requests(&format!("repository:{repo}:pull"));
                assert!(
                    !reqs.is_empty()
                        && reqs
                            .iter()
                            .all(|r| r.authorized_user.as_deref() == Some(KLM_USER)),
                    "{repo} only as {KLM_USER}: {reqs:?}"
                );
            }
            AuthKind::Htpasswd => assert_eq!(
                basic_users(&w.alias_gate.requests_for(&repo))
                    .into_iter()
                    .collect::<Vec<_>>(),
                vec![KLM_USER.to_string()],
                "{repo}"
            ),
        }
    }
}

/// Scenario 8: `oci-proxy resolve` names module, selector, Secret and credential kind.
async fn resolve_explains(w: &World) {
    let cases: [(String, &[&str]); 4] = [
        (
            w.name_of(&TEMPLATE),
            &[
                "ModuleTemplate kcp-system/template-operator",
                "operator.kyma-project.io/oci-registry-cred=template-operator",
                "kcp-system/template-operator-cred",
                "credential: basic",
            ],
        ),
        (
            w.name_of(&OTHER),
            &[
                "ModuleTemplate kcp-system/other-operator",
                "kcp-system/other-operator-cred",
                "credential: basic",
            ],
        ),
        (
            format!("{ALIAS}/{SHARED_TOOL}"),
            &[
                "default Secret kcp-system/klm-oci-registry",
                "credential: basic",
            ],
        ),
        (
            format!("{ALIAS}/{UNRELATED}"),
            &[
                "modules: none name this repository",
                "credential: anonymous",
            ],
        ),
    ];
    for (name, wants) in &cases {
        w.resolve_contains(name, wants).await;
    }
}

/// Scenario 5: the registry password and the Secret change; pulls follow within seconds and
/// the old password is not sent any more.
async fn rotation(w: &mut World) {
    match w.auth {
        AuthKind::Htpasswd => {
            w.reg.set_htpasswd(&[
                (ADMIN_USER, ADMIN_PASSWORD),
                (TMPL_USER, TMPL_PW_NEW),
                (OTHER_USER, OTHER_PW),
                (KLM_USER, KLM_PW),
            ]);
            // The proxy still holds the old password: the registry refuses it, while the
            // other module (another Secret) is unaffected.
            let (status, body) = w
                .get_manifest(&w.name_of(&TEMPLATE), TEMPLATE.version)
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
            w.lm_pull_ok(&OTHER).await;
            w.source.apply(w.template_secret(TMPL_PW_NEW));
            wait_until(
                CHANGE_DEADLINE,
                "a pull with the rotated Secret",
                || async {
                    w.get_manifest(&w.name_of(&TEMPLATE), TEMPLATE.version)
                        .await
                        .0
                        == StatusCode::OK
                },
            )
            .await;
            let marks = (w.alias_gate.requests().len(), w.port_gate.requests().len());
            w.skopeo_pull(
                &w.name_of(&TEMPLATE),
                TEMPLATE.version,
                &TEMPLATE.repository(),
            )
            .await;
            w.lm_pull_ok(&LOCAL).await;
            let after: Vec<_> = w.alias_gate.requests()[marks.0..]
                .iter()
                .chain(&w.port_gate.requests()[marks.1..])
                .filter_map(kyma::SeenRequest::basic)
                .filter(|(user, _)| user == TMPL_USER)
                .collect();
            assert!(!after.is_empty());
            assert!(
                after.iter().all(|(_, pw)| pw == TMPL_PW_NEW),
                "only the new password after the rotation"
            );
        }
        AuthKind::Token => {
            w.tokens().set_password(TMPL_USER, TMPL_PW_NEW);
            let mark = w.tokens().requests().len();
            w.source.apply(w.template_secret(TMPL_PW_NEW));
            let new_password_sent = || {
                w.tokens().requests()[mark..]
                    .iter()
                    .any(|r| r.basic_password_seen.as_deref() == Some(TMPL_PW_NEW))
            };
            // The proxy's cached token (from the old password) stays valid, so pulls keep
            // working; the rotated Secret shows once a new token is fetched with it.
            wait_until(
                CHANGE_DEADLINE,
                "a token fetched with the new password",
                || async {
                    w.get_manifest(&w.name_of(&TEMPLATE), TEMPLATE.version)
                        .await
                        .0
                        == StatusCode::OK
                        && new_password_sent()
                },
            )
            .await;
            let first_new = mark
                + w.tokens().requests()[mark..]
                    .iter()
                    .position(|r| r.basic_password_seen.as_deref() == Some(TMPL_PW_NEW))
                    .expect("a request with the new password");
            w.skopeo_pull(
                &w.name_of(&TEMPLATE),
                TEMPLATE.version,
                &TEMPLATE.repository(),
            )
            .await;
            w.lm_pull_ok(&LOCAL).await;
            w.lm_pull_ok(&OTHER).await;
            let after = &w.tokens().requests()[first_new..];
            assert!(
                after
                    .iter()
                    .all(|r| r.basic_password_seen.as_deref() != Some(TMPL_PW)),
                "the old password was sent after the rotation: {after:?}"
            );
            let local: Vec<_> = after
                .iter()
                .filter(|r| r.scopes.contains(&LOCAL.scope()))
                .collect();
            assert!(
                !local.is_empty()
                    && local
                        .iter()
                        .all(|r| r.basic_password_seen.as_deref() == Some(TMPL_PW_NEW)),
                "a new token for the local module, with the new password: {after:?}"
            );
        }
    }
}

/// Scenario 9: nothing secret in the proxy's logs.
fn logs_are_clean(w: &World) {
    let logs = w.proxy.logs();
    assert!(
        logs.contains("credential chosen"),
        "debug logs are on (so the check means something)"
    );
    for s in w.secrets() {
        if let Some(line) = logs.lines().find(|l| l.contains(&s)) {
            panic!("proxy log line contains a secret: {line}");
        }
    }
}

async fn run(source: SourceKind, auth: AuthKind) {
    let mut w = World::start(source, auth).await;
    readiness(&w).await;
    if let Some(t) = &w.tokens {
        t.reset_counts(); // seeding used the admin user
    }
    module_pulls(&w).await;
    unrelated_repositories(&w).await;
    orphan_module_denied(&w).await;
    default_secret(&w).await;
    resolve_explains(&w).await;
    rotation(&mut w).await;
    logs_are_clean(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_source_htpasswd_upstream() {
    run(SourceKind::Files, AuthKind::Htpasswd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_source_token_upstream() {
    run(SourceKind::Files, AuthKind::Token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_htpasswd_upstream() {
    run(SourceKind::Kubernetes, AuthKind::Htpasswd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_token_upstream() {
    run(SourceKind::Kubernetes, AuthKind::Token).await;
}

/// `oci-proxy resolve` for a module registry host that is not in `upstreams` (a ModuleTemplate
/// with `baseUrl: http://127.0.0.1:<port>/mods`) routes it as requests are routed: `resolve`
/// waits for the catalog's first sync before it resolves, so the module's host is known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_routes_module_hosts_not_in_upstreams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = dir.path().join("catalog");
    std::fs::create_dir(&catalog).expect("catalog dir");
    let host = format!("127.0.0.1:{}", free_port());
    kyma::write_object_file(&catalog, &template_of(&host, &LOCAL, "template-operator"));
    kyma::write_object_file(&catalog, &template_secret(&host, TMPL_PW));
    let config = dir.path().join("oci-proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "cache:\n  dir: \"{}\"\ncatalog:\n  files: \"{}\"\n",
            dir.path().join("cache").display(),
            catalog.display()
        ),
    )
    .expect("write config");
    let name = format!("{host}/{}", LOCAL.repository());
    let (ok, text) = kyma::resolve(&config, &name, &[]).await;
    assert!(ok, "{text}");
    for want in [
        "ModuleTemplate kcp-system/local-operator",
        "kcp-system/template-operator-cred",
        &format!("endpoint: http://{host}"),
        "credential: basic",
    ] {
        assert!(
            text.contains(want),
            "resolve {name}: no {want:?} in\n{text}"
        );
    }
    assert!(!text.contains(TMPL_PW), "{text}");
}

/// Label-era LM pulls from `<baseUrl>/component-descriptors/<component>`, so to send LM through
/// the proxy the ModuleTemplate's baseUrl must name the proxy: `http://<proxy>/<registry
/// host>/<path>` (or `http://<proxy>/<path>` with `default_upstream`). LM then asks the proxy
/// for `/v2/<registry host>/<path>/component-descriptors/<component>/...`, and the proxy must
/// give that repository the module's credentials.
///
/// The catalog knows the proxy's own addresses (`catalog.proxy_hosts`, by default the `listen`
/// address): a baseUrl on one of them is not a module registry (no request loop through the
/// proxy itself); the module claims the client's full request name, and its Secret's `auths`
/// key is resolved against the real upstream host, as LM's docs require.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_prefixed_base_url_gets_module_credentials() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (TMPL_USER, TMPL_PW),
    ]))
    .await;
    let pushed = push_image(
        &reg,
        Some((ADMIN_USER, ADMIN_PASSWORD)),
        &TEMPLATE.repository(),
        TEMPLATE.version,
        &layers(1),
    )
    .await;
    let catalog = tempfile::tempdir().expect("catalog dir");
    kyma::write_object_file(
        catalog.path(),
        &docker_secret(
            KCP_SYSTEM,
            TMPL_SECRET,
            Some("template-operator"),
            &[(ALIAS, TMPL_USER, TMPL_PW)],
        ),
    );
    let proxy = ProxyProcess::start(&format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         upstreams:\n  - name: {ALIAS}\n    endpoint: {}\ncatalog:\n  files: \"{}\"\n",
        reg.url(),
        catalog.path().display()
    ))
    .await;
    // What an operator writes so that LM pulls through the proxy.
    let base_url = format!("http://{}/{ALIAS}/{}", proxy.host(), TEMPLATE.path);
    kyma::write_object_file(
        catalog.path(),
        &module_template(
            KCP_SYSTEM,
            TEMPLATE.name,
            &base_url,
            TEMPLATE.component,
            TEMPLATE.version,
            Some("template-operator"),
        ),
    );
    // LM's pull reference: <baseUrl>/component-descriptors/<component>:<version>, i.e. the
    // proxy sees /v2/<ALIAS>/mods/component-descriptors/<component>/manifests/<version>.
    let name = format!("{ALIAS}/{}", TEMPLATE.repository());
    let mut last = None;
    let deadline = std::time::Instant::now() + CHANGE_DEADLINE;
    while std::time::Instant::now() < deadline {
        match lm_pull(&proxy.url(), &name, TEMPLATE.version).await {
            Ok(got) => {
                assert_eq!(got.manifest_digest, pushed.manifest_digest);
                return;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    panic!("LM-style pull through a proxy-prefixed baseUrl never succeeded: {last:?}");
}

/// The worked example of the README (config/dev-catalog-example/), run as written except for
/// ports and directories: its ModuleTemplate and both Secrets give skopeo the module and a
/// repository under the default Secret's subpath.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_catalog_example_works() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev-catalog-example");
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        ("module-reader", "dev-only-module-password"),
        ("klm-reader", "dev-only-klm-password"),
    ]))
    .await;
    let admin = Some((ADMIN_USER, ADMIN_PASSWORD));
    let module_repo = module_repository("modules", "kyma-project.io/module/template-operator");
    let module = push_image(&reg, admin, &module_repo, "1.0.0", &layers(7)).await;
    let restricted_repo = module_repository("restricted", "kyma-project.io/module/btp-operator");
    let restricted = push_image(&reg, admin, &restricted_repo, "2.0.0", &layers(8)).await;

    let catalog = tempfile::tempdir().expect("catalog dir");
    let mut config = None;
    for entry in std::fs::read_dir(&example).expect("read the example directory") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read example file");
        if path.file_name().is_some_and(|n| n == "oci-proxy.yaml") {
            config = Some(text);
        } else {
            std::fs::write(catalog.path().join(path.file_name().unwrap()), text).unwrap();
        }
    }
    let mut config = config.expect("oci-proxy.yaml in the example");
    let dir = catalog.path().display().to_string();
    for (from, to) in [
        ("listen: 127.0.0.1:5000", "listen: \"{listen}\"".to_string()),
        ("dir: ./oci-proxy-cache", "dir: \"{dir}/cache\"".to_string()),
        (
            "endpoint: http://127.0.0.1:5001",
            format!("endpoint: {}", reg.url()),
        ),
        (
            "files: config/dev-catalog-example",
            format!("files: \"{dir}\""),
        ),
    ] {
        assert!(config.contains(from), "the example config has {from:?}");
        config = config.replace(from, &to);
    }
    let proxy = ProxyProcess::start(&config).await;
    for (name, tag, pushed) in [
        (&module_repo, "1.0.0", &module),
        (&restricted_repo, "2.0.0", &restricted),
    ] {
        let dest = tempfile::tempdir().expect("skopeo dest");
        let out = skopeo_copy(
            &format!("{}/private-oci-reg.localhost/{name}:{tag}", proxy.host()),
            dest.path(),
            &["--src-no-creds"],
        )
        .await;
        assert_success(&out);
        assert_same_image(dest.path(), pushed);
    }
    let logs = proxy.logs();
    assert!(!logs.contains("dev-only-"), "{logs}");
}

// -------------------------------------------------------------------------------------------
// Current LM (≥ 1.8) as a sidecar, a migrated landscape, and the trust model's attacks, each
// through the files source and the Kubernetes source.

const NAMED_SECRET: &str = "private-oci-reg-creds";
const TEAM_USER: &str = "team-robot";
const TEAM_PW: &str = "team-pw-9e41aa";
/// The repository LM ≥ 1.8 pulls: `<subpath>/component-descriptors/<ocmComponentName>`.
const CURRENT_REPO: &str = "modules/component-descriptors/kyma-project.io/module/template-operator";
/// A label-era template's repository under the named Secret's base (its label matches nothing).
const MIGRATED_REPO: &str = "modules/component-descriptors/kyma-project.io/module/migrated";
/// `tenant`'s template borrowing a kcp-system Secret by label.
const TENANT_REPO: &str = "team/component-descriptors/kyma-project.io/module/tenant";
/// A template with `oci-registry-cred: {}`.
const EMPTY_REPO: &str = "team/component-descriptors/kyma-project.io/module/empty";
/// The legitimate team module, which also names [`FOREIGN_IMAGE`] as an ociArtifact.
const TEAM_REPO: &str = "team/component-descriptors/kyma-project.io/module/team";
const FOREIGN_IMAGE: &str = "private/app";
/// On the port-addressed host: the victim module (https baseUrl) and the attacker (http://).
const VICTIM_REPO: &str = "secure/component-descriptors/kyma-project.io/module/victim";

/// LM's sample objects (`tests/data/kyma/current-lm-sidecar.yaml`) by kind.
fn current_lm_sample(kind: &str) -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kyma/current-lm-sidecar.yaml");
    let text = std::fs::read_to_string(path).expect("sample");
    let found = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .find(|v: &Value| v["kind"] == kind);
    found.unwrap_or_else(|| panic!("no {kind} in the sample"))
}

/// A Secret as `kubectl create secret docker-registry` writes it: no labels at all.
fn unlabelled_secret(name: &str, auths: &[kyma::Auth<'_>]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(kyma::docker_config_json(auths));
    serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": KCP_SYSTEM}, "data": {".dockerconfigjson": b64}})
}

/// A label-era template with `oci-registry-cred` set to `label` (any JSON) and extra resources.
fn template_with_label(
    ns: &str,
    name: &str,
    base_url: &str,
    label: Value,
    extra: Vec<Value>,
) -> Value {
    let component = format!("kyma-project.io/module/{name}");
    let mut t = module_template(ns, name, base_url, &component, "1.0.0", Some("x"));
    let labels = serde_json::json!([{"name": "oci-registry-cred", "value": label}]);
    let c = &mut t["spec"]["descriptor"]["component"];
    c["labels"] = labels.clone();
    for r in c["resources"].as_array_mut().expect("resources") {
        r["labels"] = labels.clone();
    }
    c["resources"]
        .as_array_mut()
        .expect("resources")
        .extend(extra);
    t
}

struct CurrentWorld {
    source: Source,
    gate: kyma::Gate,
    port_gate: kyma::Gate,
    proxy: ProxyProcess,
    pushed: std::collections::BTreeMap<String, PushedImage>,
    _reg: Registry,
}

impl CurrentWorld {
    async fn start(kind: SourceKind) -> CurrentWorld {
        let reg = Registry::start(RegistryAuth::htpasswd(&[
            (ADMIN_USER, ADMIN_PASSWORD),
            (KLM_USER, KLM_PW),
            (TEAM_USER, TEAM_PW),
        ]))
        .await;
        let admin = Some((ADMIN_USER, ADMIN_PASSWORD));
        let mut pushed = std::collections::BTreeMap::new();
        for (i, repo) in [
            CURRENT_REPO,
            MIGRATED_REPO,
            TENANT_REPO,
            EMPTY_REPO,
            TEAM_REPO,
            FOREIGN_IMAGE,
            VICTIM_REPO,
        ]
        .into_iter()
        .enumerate()
        {
            // config blob, descriptor blob, raw-manifest blob
            let tag = if repo == CURRENT_REPO {
                "1.0.5"
            } else {
                "1.0.0"
            };
            pushed.insert(
                repo.to_string(),
                push_image(&reg, admin, repo, tag, &layers(40 + i as u64)).await,
            );
        }
        let reg_addr: SocketAddr = reg.host().parse().expect("registry address");
        let gate = kyma::Gate::forwarder(reg_addr).await;
        let port_gate = kyma::Gate::forwarder(reg_addr).await;
        let port_host = port_gate.host();
        let source = Source::start(kind).await;

        // Current LM: the unlabelled named Secret, a `descriptor: {}` template, a ModuleReleaseMeta.
        source.apply(unlabelled_secret(
            NAMED_SECRET,
            &[(ALIAS, KLM_USER, KLM_PW)],
        ));
        source.apply(current_lm_sample("ModuleTemplate"));
        source.apply(current_lm_sample("ModuleReleaseMeta"));
        // Migrated: a label-era template under the base whose label matches no Secret.
        source.apply(template_with_label(
            KCP_SYSTEM,
            "migrated",
            &format!("http://{ALIAS}/modules"),
            serde_json::json!({CRED_LABEL: "gone"}),
            vec![],
        ));
        // The team's Secret in kcp-system, for the team module (and for borrowers to try).
        source.apply(docker_secret(
            KCP_SYSTEM,
            "team-cred",
            Some("team"),
            &[
                (ALIAS, TEAM_USER, TEAM_PW),
                (&port_host, TEAM_USER, TEAM_PW),
            ],
        ));
        // Attack: another namespace's template selecting kcp-system's team Secret.
        source.apply(template_with_label(
            "tenant",
            "tenant",
            &format!("http://{ALIAS}/team"),
            serde_json::json!({CRED_LABEL: "team"}),
            vec![],
        ));
        // Attack: `{}`.
        source.apply(template_with_label(
            KCP_SYSTEM,
            "empty",
            &format!("http://{ALIAS}/team"),
            serde_json::json!({}),
            vec![],
        ));
        // Attack: the legitimate team module names somebody else's image as an ociArtifact.
        let image = serde_json::json!({"name": "app", "type": "ociArtifact", "relation": "external",
            "access": {"type": "ociArtifact", "imageReference": format!("{ALIAS}/{FOREIGN_IMAGE}:1.0.0")}});
        source.apply(template_with_label(
            KCP_SYSTEM,
            "team",
            &format!("http://{ALIAS}/team"),
            serde_json::json!({CRED_LABEL: "team"}),
            vec![image],
        ));
        // Attack: an http:// baseUrl on the host where the victim module is https.
        source.apply(template_with_label(
            KCP_SYSTEM,
            "victim",
            &format!("{port_host}/secure"),
            serde_json::json!({CRED_LABEL: "team"}),
            vec![],
        ));
        source.apply(template_with_label(
            KCP_SYSTEM,
            "downgrader",
            &format!("http://{port_host}/x"),
            serde_json::json!({CRED_LABEL: "team"}),
            vec![],
        ));

        let catalog = match &source {
            Source::Files(dir) => format!("  files: \"{}\"\n", dir.path().display()),
            Source::Kubernetes { .. } => "  kubernetes: {}\n".to_string(),
        };
        let config = format!(
            "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n  tag_ttl: 0s\n\
             upstreams:\n  - name: {ALIAS}\n    endpoint: {}\ndefault_upstream: {ALIAS}\n\
             catalog:\n{catalog}  default_secret: {{namespace: {KCP_SYSTEM}, name: {NAMED_SECRET}, subpath: modules}}\n",
            gate.url(),
        );
        let proxy = ProxyProcess::start_with_env(&config, &source.env()).await;
        if let Source::Kubernetes { gate, .. } = &source {
            gate.open();
        }
        wait_until(CHANGE_DEADLINE, "/readyz 200", || async {
            http_client()
                .get(format!("{}/readyz", proxy.url()))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
        CurrentWorld {
            source,
            gate,
            port_gate,
            proxy,
            pushed,
            _reg: reg,
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.proxy.metrics().await, series)
    }

    /// LM ≥ 1.8's sequence for the current module; checks digests and that every request
    /// reached the registry with the named Secret's user.
    async fn lm_pull_current(&self) {
        let got = lm_pull(&self.proxy.url(), CURRENT_REPO, "1.0.5")
            .await
            .unwrap_or_else(|e| panic!("LM pull of {CURRENT_REPO}: {e:?}"));
        let want = &self.pushed[CURRENT_REPO];
        assert_eq!(got.manifest_digest, want.manifest_digest);
        assert_eq!(got.layer_digests, want.layer_digests);
        Self::only_user(&self.gate, CURRENT_REPO, KLM_USER, KLM_PW);
    }

    async fn get_manifest(&self, name: &str, reference: &str) -> (StatusCode, Value) {
        let resp = http_client()
            .get(format!(
                "{}/v2/{name}/manifests/{reference}",
                self.proxy.url()
            ))
            .header("Accept", kyma::GGCR_MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET manifest through the proxy");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn resolve(&self, name: &str, wants: &[&str]) {
        let config = self.proxy.dir().join("config.yaml");
        let (ok, text) = kyma::resolve(&config, name, &self.source.env()).await;
        assert!(ok, "resolve {name}:\n{text}");
        for w in wants {
            assert!(text.contains(w), "resolve {name}: no {w:?} in\n{text}");
        }
        for pw in [KLM_PW, TEAM_PW] {
            assert!(!text.contains(pw), "resolve printed a password:\n{text}");
        }
    }

    /// Requests for `repo` reached `gate` with `user`'s credentials (after the anonymous
    /// challenge probe), and with no other credentials.
    fn only_user(gate: &kyma::Gate, repo: &str, user: &str, password: &str) {
        let seen = gate.requests_for(repo);
        let want = Some((user.to_string(), password.to_string()));
        assert!(seen.iter().any(|r| r.basic() == want), "{repo}: {seen:?}");
        assert!(
            seen.iter()
                .all(|r| r.authorization.is_none() || r.basic() == want),
            "{repo}: {seen:?}"
        );
    }

    /// No request for `repo` reached `gate` with credentials.
    fn no_credentials(gate: &kyma::Gate, repo: &str) {
        let seen = gate.requests_for(repo);
        assert!(
            seen.iter().all(|r| r.authorization.is_none()),
            "{repo}: {seen:?}"
        );
    }
}

async fn current_lm_and_attacks(kind: SourceKind) {
    let w = CurrentWorld::start(kind).await;

    // Current LM before the Manifest exists; a current control plane has no skipped objects.
    w.lm_pull_current().await;
    assert_eq!(w.metric("oci_proxy_catalog_skipped_objects").await, 0.0);
    w.resolve(
        CURRENT_REPO,
        &[
            "ModuleReleaseMeta kcp-system/template-operator",
            "module name: template-operator",
            "versions: 1.0.5",
            &format!("decision: default Secret {KCP_SYSTEM}/{NAMED_SECRET}"),
            "credential: basic",
        ],
    )
    .await;

    // The Manifest LM then writes (repo on the proxy's own address, no /component-descriptors).
    let mut manifest = current_lm_sample("Manifest");
    manifest["spec"]["install"]["source"]["repo"] = format!("{}/modules", w.proxy.host()).into();
    manifest["spec"]["install"]["source"]["ref"] =
        w.pushed[CURRENT_REPO].manifest_digest.clone().into();
    let modules_before = w.metric("oci_proxy_catalog_modules").await;
    w.source.apply(manifest);
    wait_until(CHANGE_DEADLINE, "the Manifest in the catalog", || async {
        w.metric("oci_proxy_catalog_modules").await > modules_before
    })
    .await;
    w.lm_pull_current().await;
    assert_eq!(w.metric("oci_proxy_catalog_skipped_objects").await, 0.0);
    // `modules` did not become a registry: its paths still go to the default upstream.
    w.resolve(
        CURRENT_REPO,
        &[
            &format!("upstream: {ALIAS}"),
            "Manifest kcp-system/kyma-sample-template-operator",
        ],
    )
    .await;

    // Migrated landscape: the stale label is ignored under the named Secret's base.
    let (status, body) = w.get_manifest(MIGRATED_REPO, "1.0.0").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    CurrentWorld::only_user(&w.gate, MIGRATED_REPO, KLM_USER, KLM_PW);

    // Another namespace's template cannot borrow kcp-system's Secret.
    let (status, body) = w
        .get_manifest(&format!("{ALIAS}/{TENANT_REPO}"), "1.0.0")
        .await;
    match kind {
        // Not read at all (namespaces: [kcp-system]): no module, anonymous.
        SourceKind::Kubernetes => assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}"),
        // Read, but its selector matches only Secrets of its own namespace.
        SourceKind::Files => {
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
            assert_eq!(error_code(&body), "DENIED", "{body}");
            w.resolve(
                &format!("{ALIAS}/{TENANT_REPO}"),
                &["matches no Secret in namespace tenant"],
            )
            .await;
        }
    }
    CurrentWorld::no_credentials(&w.gate, TENANT_REPO);

    // `{}` matches nothing: DENIED, reported by metric and resolve, the registry never asked.
    let (status, body) = w
        .get_manifest(&format!("{ALIAS}/{EMPTY_REPO}"), "1.0.0")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "DENIED", "{body}");
    assert!(w.gate.requests_for(EMPTY_REPO).is_empty());
    assert_eq!(w.metric("oci_proxy_catalog_empty_selectors").await, 1.0);
    w.resolve(
        &format!("{ALIAS}/{EMPTY_REPO}"),
        &["empty credential selector"],
    )
    .await;

    // The team module gets its Secret; the image it names elsewhere does not.
    let (status, body) = w
        .get_manifest(&format!("{ALIAS}/{TEAM_REPO}"), "1.0.0")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(w
        .gate
        .requests_for(TEAM_REPO)
        .iter()
        .any(|r| r.basic() == Some((TEAM_USER.into(), TEAM_PW.into()))));
    let (status, body) = w
        .get_manifest(&format!("{ALIAS}/{FOREIGN_IMAGE}"), "1.0.0")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    CurrentWorld::no_credentials(&w.gate, FOREIGN_IMAGE);
    w.resolve(
        &format!("{ALIAS}/{FOREIGN_IMAGE}"),
        &["not a module repository"],
    )
    .await;

    // http:// downgrade: the attacker's baseUrl does not make the victim's repository plain
    // HTTP; its credentials never travel in clear (https to a plain-HTTP registry fails).
    let victim = format!("{}/{VICTIM_REPO}", w.port_gate.host());
    let (status, body) = w.get_manifest(&victim, "1.0.0").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        w.port_gate.requests_for(VICTIM_REPO).is_empty(),
        "{:?}",
        w.port_gate.requests_for(VICTIM_REPO)
    );
    w.resolve(
        &victim,
        &[&format!("endpoint: https://{}", w.port_gate.host())],
    )
    .await;

    // Access ends when its source ends: the named Secret goes, and within 5 s LM's request
    // sequence gets nothing the Secret had fetched into the cache.
    w.lm_pull_current().await;
    w.source.delete("Secret", KCP_SYSTEM, NAMED_SECRET);
    let proxy = w.proxy.url();
    wait_until(
        Duration::from_secs(5),
        "cached module content refused",
        || {
            let proxy = proxy.clone();
            async move { lm_pull(&proxy, CURRENT_REPO, "1.0.5").await.is_err() }
        },
    )
    .await;

    // A label-era module's ModuleTemplate goes while its Secret stays: within 5 s its cached
    // manifests (by tag and by digest) are no longer served anonymously.
    let team = format!("{ALIAS}/{TEAM_REPO}");
    let digest = w.pushed[TEAM_REPO].manifest_digest.clone();
    for reference in ["1.0.0", digest.as_str()] {
        let (status, body) = w.get_manifest(&team, reference).await;
        assert_eq!(status, StatusCode::OK, "{reference}: {body}");
    }
    w.source.delete("ModuleTemplate", KCP_SYSTEM, "team");
    wait_until(
        Duration::from_secs(5),
        "the team module's cached content refused",
        || async {
            let mut refused = true;
            for reference in ["1.0.0", digest.as_str()] {
                refused &= w.get_manifest(&team, reference).await.0 != StatusCode::OK;
            }
            refused
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_lm_and_attacks_files_source() {
    current_lm_and_attacks(SourceKind::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_lm_and_attacks_kubernetes_source() {
    current_lm_and_attacks(SourceKind::Kubernetes).await;
}
