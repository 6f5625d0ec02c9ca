//! Kyma Lifecycle Manager objects and clients for end-to-end module tests.
//!
//! - [`module_template`]: a label-era v1beta2 ModuleTemplate modelled on LM's
//!   `v1beta2_kcp-module-cred-label.yaml` (the `oci-registry-cred` label on the component and on
//!   each `localOciBlob` resource, one repository context `baseUrl`, `urlPath` mapping).
//! - [`docker_secret`]: a `kubernetes.io/dockerconfigjson` Secret labelled as LM's docs require
//!   (`operator.kyma-project.io/oci-registry-cred: <value>` and
//!   `operator.kyma-project.io/managed-by: lifecycle-manager`).
//! - [`module_repository`]: `<path>/component-descriptors/<component>`, where LM pulls from.
//! - [`write_object_file`]: one object per YAML file, replaced atomically (files source).
//! - [`lm_pull`]: the requests go-containerregistry makes for LM (ping, manifest with LM's
//!   Accept list, config and layer blobs), digests verified, against the proxy.
//! - [`resolve`]: runs `oci-proxy resolve --config FILE <repository>`.
//! - [`Gate`]: a TCP forwarder that records the HTTP request heads (and their `Authorization`)
//!   passing through, and refuses connections until opened (an API server not up yet).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::http_client;
use super::seed::sha256_digest;

/// LM's label selecting a module's Secrets (label era).
pub const CRED_LABEL: &str = "operator.kyma-project.io/oci-registry-cred";
/// The label LM's Secret cache required before 2023-12, and the proxy's Kubernetes default.
pub const MANAGED_BY: &str = "operator.kyma-project.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const LIFECYCLE_MANAGER: &str = "lifecycle-manager";
/// LM's control-plane namespace.
pub const KCP_SYSTEM: &str = "kcp-system";
/// The Accept header go-containerregistry sends for manifests (`allManifestMediaTypes`).
pub const GGCR_MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v1+prettyjws, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.index.v1+json";

/// `<path>/component-descriptors/<component>` (OCM `urlPath` mapping).
pub fn module_repository(path: &str, component: &str) -> String {
    let path = path.trim_matches('/');
    if path.is_empty() {
        format!("component-descriptors/{component}")
    } else {
        format!("{path}/component-descriptors/{component}")
    }
}

/// A label-era ModuleTemplate (`operator.kyma-project.io/v1beta2`) in `namespace`.
/// `base_url` is the repository context (e.g. `http://127.0.0.1:5001/mods`), `component`
/// e.g. `kyma-project.io/module/template-operator`; `cred` the `oci-registry-cred` label value
/// `{CRED_LABEL: cred}` on the component and both local blobs (`None`: no label at all).
pub fn module_template(
    namespace: &str,
    name: &str,
    base_url: &str,
    component: &str,
    version: &str,
    cred: Option<&str>,
) -> Value {
    let labels = match cred {
        Some(v) => json!([{"name": "oci-registry-cred", "value": {CRED_LABEL: v}}]),
        None => json!([]),
    };
    let module_name = component.rsplit('/').next().unwrap_or(component);
    let blob = |name: &str, seed: &str, ty: &str| {
        json!({
            "name": name,
            "type": ty,
            "relation": "local",
            "version": version,
            "access": {"type": "localOciBlob", "digest": sha256_digest(format!("{component}/{seed}").as_bytes())},
            "labels": labels,
        })
    };
    json!({
        "apiVersion": "operator.kyma-project.io/v1beta2",
        "kind": "ModuleTemplate",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"operator.kyma-project.io/module-name": module_name},
        },
        "spec": {
            "channel": "regular",
            "data": {
                "apiVersion": "operator.kyma-project.io/v1alpha1",
                "kind": "Sample",
                "metadata": {"name": "sample-yaml"},
                "spec": {"resourceFilePath": "./module-data/yaml"},
            },
            "descriptor": {
                "component": {
                    "componentReferences": [],
                    "labels": labels,
                    "name": component,
                    "provider": "internal",
                    "repositoryContexts": [
                        {"baseUrl": base_url, "componentNameMapping": "urlPath", "type": "ociRegistry"}
                    ],
                    "resources": [
                        blob("config", "config", "yaml"),
                        blob("raw-manifest", "raw-manifest", "helm-chart"),
                    ],
                    "sources": [],
                    "version": version,
                },
                "meta": {"schemaVersion": "v2"},
            },
        },
    })
}

/// One `auths` entry of a dockerconfigjson: registry key, user, password.
pub type Auth<'a> = (&'a str, &'a str, &'a str);

/// The `.dockerconfigjson` payload for `auths` (username, password and `auth`, as
/// `kubectl create secret docker-registry` writes it).
pub fn docker_config_json(auths: &[Auth<'_>]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let map: serde_json::Map<String, Value> = auths
        .iter()
        .map(|(key, user, password)| {
            (
                key.to_string(),
                json!({"username": user, "password": password, "auth": b64.encode(format!("{user}:{password}"))}),
            )
        })
        .collect();
    json!({ "auths": map }).to_string()
}

/// A `kubernetes.io/dockerconfigjson` Secret labelled `managed-by: lifecycle-manager` and,
/// with `cred`, `CRED_LABEL: cred`.
pub fn docker_secret(namespace: &str, name: &str, cred: Option<&str>, auths: &[Auth<'_>]) -> Value {
    let mut labels = BTreeMap::new();
    labels.insert(MANAGED_BY.to_string(), LIFECYCLE_MANAGER.to_string());
    if let Some(v) = cred {
        labels.insert(CRED_LABEL.to_string(), v.to_string());
    }
    let data = base64::engine::general_purpose::STANDARD.encode(docker_config_json(auths));
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {".dockerconfigjson": data},
    })
}

/// Writes `obj` as YAML to `<dir>/<kind>-<namespace>-<name>.yaml`, replacing an earlier
/// version atomically (temp file + rename, as ConfigMap volumes and editors do). The file's
/// mtime is guaranteed to differ from the replaced file's, so a poller sees the change.
pub fn write_object_file(dir: &Path, obj: &Value) {
    let str_of = |v: &Value| {
        v.as_str()
            .expect("object field is a string")
            .to_ascii_lowercase()
    };
    let file = format!(
        "{}-{}-{}.yaml",
        str_of(&obj["kind"]),
        str_of(&obj["metadata"]["namespace"]),
        str_of(&obj["metadata"]["name"])
    );
    let path = dir.join(file);
    let tmp = dir.join(".writing.tmp");
    let before = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    std::fs::write(&tmp, serde_yaml::to_string(obj).expect("serialize object")).expect("write");
    if let Some(before) = before {
        let now = std::fs::metadata(&tmp).and_then(|m| m.modified()).ok();
        if now.is_some_and(|n| n <= before) {
            std::fs::File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.set_modified(before + Duration::from_secs(1)))
                .expect("bump mtime");
        }
    }
    std::fs::rename(&tmp, &path).expect("rename object file");
}

/// What [`lm_pull`] fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmPulled {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

/// Why [`lm_pull`] failed: the status and OCI error body of the failing request.
#[derive(Clone, Debug)]
pub struct LmPullError {
    pub what: String,
    pub status: u16,
    pub body: Value,
}

impl std::fmt::Display for LmPullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.what, self.status, self.body)
    }
}

/// Pulls `<name>:<reference>` from the proxy at `proxy_url` the way go-containerregistry does
/// for LM, anonymously: `GET /v2/`, the manifest with ggcr's Accept list, then the config and
/// every layer blob. Checks each blob's sha256 against its digest.
pub async fn lm_pull(
    proxy_url: &str,
    name: &str,
    reference: &str,
) -> Result<LmPulled, LmPullError> {
    let client = http_client();
    let fail = |what: String, status: u16, bytes: &[u8]| LmPullError {
        what,
        status,
        body: serde_json::from_slice(bytes).unwrap_or(Value::Null),
    };
    let ping = client
        .get(format!("{proxy_url}/v2/"))
        .send()
        .await
        .expect("ping proxy");
    assert_eq!(ping.status().as_u16(), 200, "GET /v2/ of the proxy");
    let url = format!("{proxy_url}/v2/{name}/manifests/{reference}");
    let resp = client
        .get(&url)
        .header("Accept", GGCR_MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("manifest body");
    if status != 200 {
        return Err(fail(url, status, &bytes));
    }
    let manifest: Value = serde_json::from_slice(&bytes).expect("manifest is JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("manifest has a config")
        .to_string();
    let layer_digests: Vec<String> = manifest["layers"]
        .as_array()
        .expect("manifest has layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_string())
        .collect();
    for digest in std::iter::once(&config_digest).chain(&layer_digests) {
        let url = format!("{proxy_url}/v2/{name}/blobs/{digest}");
        let resp = client.get(&url).send().await.expect("GET blob");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("blob body");
        if status != 200 {
            return Err(fail(url, status, &body));
        }
        assert_eq!(&sha256_digest(&body), digest, "content of {url}");
    }
    Ok(LmPulled {
        manifest_digest: sha256_digest(&bytes),
        config_digest,
        layer_digests,
    })
}

/// Runs `oci-proxy resolve --config <config> <repository>` with extra environment variables
/// (e.g. `KUBECONFIG`); returns (success, stdout + stderr). Async, so in-process fixtures
/// (fake API server, token server) keep serving.
pub async fn resolve(config: &Path, repository: &str, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oci-proxy"));
    cmd.arg("resolve")
        .arg("--config")
        .arg(config)
        .arg(repository)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("oci-proxy resolve finished within 60 s")
        .expect("run oci-proxy resolve");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One HTTP request head a [`Gate`] forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Request target as sent (path and query).
    pub path: String,
    /// The `Authorization` header, verbatim.
    pub authorization: Option<String>,
}

impl SeenRequest {
    /// (user, password) of a Basic `Authorization` header.
    pub fn basic(&self) -> Option<(String, String)> {
        let b64 = self.authorization.as_deref()?.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }
}

type Seen = Arc<std::sync::Mutex<Vec<SeenRequest>>>;

/// A TCP forwarder on 127.0.0.1:<free port> to `target` that records the HTTP/1.1 request
/// heads passing through (method, path, `Authorization`), so tests can see exactly which
/// credentials reached an upstream. Closed, it accepts and immediately drops every
/// connection (an API server that is not up yet); open, it forwards byte for byte.
/// Stops when dropped.
pub struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    /// Starts a closed gate forwarding to `target` (e.g. `127.0.0.1:8443`).
    pub async fn start(target: SocketAddr) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        let open = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let (flag, record) = (open.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let record = record.clone();
                conns.spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        forward(inbound, outbound, record).await;
                    }
                });
            }
        });
        Gate {
            addr,
            open,
            seen,
            task,
        }
    }

    /// An open gate: a recording forwarder to `target`.
    pub async fn forwarder(target: SocketAddr) -> Gate {
        let gate = Gate::start(target).await;
        gate.open();
        gate
    }

    /// From now on, connections are forwarded.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request head forwarded so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Forwarded requests whose path starts with `/v2/<repository>/`.
    pub fn requests_for(&self, repository: &str) -> Vec<SeenRequest> {
        let prefix = format!("/v2/{repository}/");
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with(&prefix))
            .collect()
    }

    /// Writes a kubeconfig whose current context points at this gate.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gated\n  cluster:\n    server: {}\n\
             contexts:\n- name: gated\n  context:\n    cluster: gated\n    user: gated\n\
             current-context: gated\nusers:\n- name: gated\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }
}

/// Copies both directions; parses the client's bytes as a sequence of HTTP/1.1 requests
/// (heads, then `Content-Length` bodies) and records each head.
async fn forward(inbound: tokio::net::TcpStream, outbound: tokio::net::TcpStream, seen: Seen) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut client_rd, mut client_wr) = inbound.into_split();
    let (mut server_rd, mut server_wr) = outbound.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut skip_body = 0usize;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match client_rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if server_wr.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        pending.extend_from_slice(&chunk[..n]);
        loop {
            if skip_body > 0 {
                let k = skip_body.min(pending.len());
                pending.drain(..k);
                skip_body -= k;
                if skip_body > 0 {
                    break;
                }
            }
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut parts = lines.next().unwrap_or_default().split(' ');
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let mut authorization = None;
            for line in lines {
                if let Some((name, value)) = line.split_once(':') {
                    let value = value.trim().to_string();
                    if name.eq_ignore_ascii_case("authorization") {
                        authorization = Some(value);
                    } else if name.eq_ignore_ascii_case("content-length") {
                        skip_body = value.parse().unwrap_or(0);
                    }
                }
            }
            seen.lock().expect("seen lock").push(SeenRequest {
                method,
                path,
                authorization,
            });
        }
    }
    let _ = server_wr.shutdown().await;
    let _ = down.await;
}
