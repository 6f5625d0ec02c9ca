//! Seeding a registry over its HTTP API (monolithic blob upload, manifest PUT), with
//! just enough auth handling: on a 401, Basic credentials are sent as Basic, or used
//! at the Bearer challenge's realm to get a token. Small payloads only (buffered).

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;

use super::http_client;
use super::registry::Registry;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Media types used by [`push_image_as`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// OCI image manifest, OCI config, uncompressed OCI layers.
    Oci,
    /// Docker schema2 manifest, container config, `rootfs.diff.tar.gzip` layers
    /// (the bytes are what you pass; nothing checks they are gzip).
    Docker,
}

/// What [`push_image`] stored.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub tag: String,
    /// `sha256:<hex>` of `manifest`.
    pub manifest_digest: String,
    /// Exact manifest bytes as pushed.
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub config_digest: String,
    pub config: Vec<u8>,
    pub layer_digests: Vec<String>,
}

impl PushedImage {
    /// What a client pulls of the image, as `(path under /v2/<name>/, bytes)`: the manifest by
    /// tag and by digest, the config and the first layer (`layer`, its bytes).
    pub fn pull_paths(&self, layer: &[u8]) -> Vec<(String, Vec<u8>)> {
        vec![
            (format!("manifests/{}", self.tag), self.manifest.clone()),
            (
                format!("manifests/{}", self.manifest_digest),
                self.manifest.clone(),
            ),
            (format!("blobs/{}", self.config_digest), self.config.clone()),
            (format!("blobs/{}", self.layer_digests[0]), layer.to_vec()),
        ]
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic pseudo-random filler (splitmix64): same `(len, seed)` → same bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Parses one challenge (`Scheme k=v, k="v"`) into lowercase scheme and lowercase keys.
/// Deliberately simple: one challenge per header line.
pub fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
    let value = value.trim();
    let (scheme, mut rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            val.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key, val);
        rest = remaining;
    }
    (scheme.to_ascii_lowercase(), params)
}

fn basic_value(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Gets a Bearer token from `realm` for `service`/`scope` (scope may be a space-separated
/// list), with Basic `creds` if given. `None` if the token server refuses.
pub async fn fetch_token(
    realm: &str,
    service: Option<&str>,
    scope: Option<&str>,
    creds: Option<(&str, &str)>,
) -> Option<String> {
    let mut url = url::Url::parse(realm).expect("token realm is a URL");
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = service {
            q.append_pair("service", service);
        }
        for s in scope
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
        {
            q.append_pair("scope", s);
        }
        if let Some((user, _)) = creds {
            q.append_pair("account", user);
        }
    }
    let mut req = http_client().get(url);
    if let Some((user, pass)) = creds {
        req = req.header(AUTHORIZATION, basic_value(user, pass));
    }
    let resp = req.send().await.expect("token request");
    if !resp.status().is_success() {
        return None;
    }
    let body: serde_json::Value = resp.json().await.expect("token response JSON");
    body.get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

/// Sends a request to `base_url` + `path` (or to `path` if it is an absolute URL). On a 401
/// with credentials or a Bearer challenge, authenticates once and retries: Basic → `creds` as
/// Basic; Bearer → token from the realm (anonymous if `creds` is `None`). Returns the final
/// response (the 401 itself if authentication was impossible or refused).
pub async fn registry_request(
    base_url: &str,
    creds: Option<(&str, &str)>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Response {
    let url = if path.starts_with("http://") || path.starts_with("https://") {
        path.to_string()
    } else {
        format!("{base_url}{path}")
    };
    let mut header_map = HeaderMap::new();
    for (k, v) in headers {
        header_map.append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let client = http_client();
    let send = |auth: Option<String>| {
        let mut req = client
            .request(method.clone(), &url)
            .headers(header_map.clone());
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        if let Some(body) = &body {
            req = req.body(body.clone());
        }
        req.send()
    };
    let first = send(None).await.expect("registry request");
    if first.status() != StatusCode::UNAUTHORIZED {
        return first;
    }
    let Some(challenge) = first
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return first;
    };
    let (scheme, params) = parse_challenge(challenge);
    let auth = match (scheme.as_str(), creds) {
        ("basic", Some((user, pass))) => basic_value(user, pass),
        ("bearer", _) => {
            let Some(realm) = params.get("realm") else {
                return first;
            };
            let token = fetch_token(
                realm,
                params.get("service").map(String::as_str),
                params.get("scope").map(String::as_str),
                creds,
            )
            .await;
            match token {
                Some(token) => format!("Bearer {token}"),
                None => return first,
            }
        }
        _ => return first,
    };
    send(Some(auth))
        .await
        .expect("registry request (authenticated)")
}

/// `GET base_url + path` with the 401 handling of [`registry_request`].
pub async fn registry_get(
    base_url: &str,
    creds: Option<(&str, &str)>,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    registry_request(base_url, creds, Method::GET, path, headers, None).await
}

/// Uploads `bytes` as a blob of `repo` (monolithic: POST uploads/ → PUT Location?digest=).
/// Returns its `sha256:` digest. Panics unless the registry answers 202 then 201.
pub async fn push_blob(
    reg: &Registry,
    creds: Option<(&str, &str)>,
    repo: &str,
    bytes: &[u8],
) -> String {
    let digest = sha256_digest(bytes);
    let base = reg.url();
    let start = registry_request(
        &base,
        creds,
        Method::POST,
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        None,
    )
    .await;
    let status = start.status();
    let location = start
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(location) = location.filter(|_| status == StatusCode::ACCEPTED) else {
        panic!(
            "starting upload to {repo}: {status} {}",
            start.text().await.unwrap_or_default()
        );
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let encoded: String = url::form_urlencoded::byte_serialize(digest.as_bytes()).collect();
    let put_url = format!("{location}{sep}digest={encoded}");
    let len = bytes.len().to_string();
    let put = registry_request(
        &base,
        creds,
        Method::PUT,
        &put_url,
        &[
            ("content-type", "application/octet-stream"),
            ("content-length", &len),
        ],
        Some(bytes.to_vec()),
    )
    .await;
    let status = put.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "finishing upload of {digest} to {repo}: {}",
        put.text().await.unwrap_or_default()
    );
    digest
}

/// PUTs `bytes` as manifest `reference` (tag or digest) of `repo` with `media_type`.
/// Returns the digest (checked against the registry's `Docker-Content-Digest`).
pub async fn push_manifest(
    reg: &Registry,
    creds: Option<(&str, &str)>,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    let digest = sha256_digest(bytes);
    let resp = registry_request(
        &reg.url(),
        creds,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("content-type", media_type)],
        Some(bytes.to_vec()),
    )
    .await;
    let status = resp.status();
    let returned = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(
        status,
        StatusCode::CREATED,
        "pushing manifest {repo}:{reference}: {}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(
        returned.as_deref(),
        Some(digest.as_str()),
        "Docker-Content-Digest"
    );
    digest
}

/// Pushes an OCI image (config + `layers`) and tags it `tag`.
pub async fn push_image(
    reg: &Registry,
    creds: Option<(&str, &str)>,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
) -> PushedImage {
    push_image_as(reg, creds, repo, tag, layers, ImageFormat::Oci).await
}

/// Pushes a Docker schema2 image (config + `layers`) and tags it `tag`.
pub async fn push_docker_image(
    reg: &Registry,
    creds: Option<(&str, &str)>,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
) -> PushedImage {
    push_image_as(reg, creds, repo, tag, layers, ImageFormat::Docker).await
}

/// Pushes config + `layers` and a manifest of `format` referencing them, tagged `tag`.
pub async fn push_image_as(
    reg: &Registry,
    creds: Option<(&str, &str)>,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
    format: ImageFormat,
) -> PushedImage {
    let (manifest_type, config_type, layer_type) = match format {
        ImageFormat::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
        ImageFormat::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
    };
    let mut layer_digests = Vec::new();
    for layer in layers {
        layer_digests.push(push_blob(reg, creds, repo, layer).await);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"fixture.repo": repo, "fixture.tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    }))
    .expect("serialize config");
    let config_digest = push_blob(reg, creds, repo, &config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
        "layers": layers.iter().zip(&layer_digests).map(|(l, d)| json!({
            "mediaType": layer_type, "digest": d, "size": l.len(),
        })).collect::<Vec<_>>(),
    }))
    .expect("serialize manifest");
    let manifest_digest = push_manifest(reg, creds, repo, tag, manifest_type, &manifest).await;
    PushedImage {
        tag: tag.to_string(),
        manifest_digest,
        manifest,
        media_type: manifest_type.to_string(),
        config_digest,
        config,
        layer_digests,
    }
}
