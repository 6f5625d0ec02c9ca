//! The pull-through proxy core against real distribution 2.8 upstreams (htpasswd and token
//! auth), with skopeo and reqwest as clients.

use crate::support;

use crate::support::hostile;

use std::path::Path;
use std::time::Duration;

use hostile::{Hostile, Scripted};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::*;

const USER: &str = "alice";
const PASSWORD: &str = "alice-secret-pw";

/// Writes a docker config.json with one entry and returns its path.
fn docker_config(dir: &Path, key: &str, user: &str, password: &str) -> String {
    let path = dir.join(format!("{}-config.json", key.replace([':', '/'], "_")));
    write_docker_config(&path, key, user, password);
    path.display().to_string()
}

/// Starts a proxy whose only upstream `name` is `reg`, with `USER`/`password` for it in a
/// docker config (the returned temp dir holds that file and must outlive the proxy).
async fn proxy_with_user(
    name: &str,
    reg: &Registry,
    password: &str,
) -> (ProxyProcess, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dc = docker_config(tmp.path(), name, USER, password);
    let config = trust_registry_realm(&proxy_config(&[(name, &reg.url())], Some(&dc)), reg);
    let proxy = ProxyProcess::start(&config).await;
    (proxy, tmp)
}

fn proxy_config(upstreams: &[(&str, &str)], docker_config: Option<&str>) -> String {
    let mut yaml =
        String::from("listen: \"{listen}\"\ncache:\n  dir: \"{dir}/cache\"\nupstreams:\n");
    for (name, endpoint) in upstreams {
        yaml += &format!("  - name: {name}\n    endpoint: {endpoint}\n");
    }
    if let Some(dc) = docker_config {
        yaml += &format!("credentials:\n  docker_config: \"{dc}\"\n");
    }
    yaml
}

/// GETs `url`, asserts the status and the OCI error code, and returns the error body.
async fn expect_error(url: &str, status: StatusCode, code: &str) -> Value {
    let resp = http_client().get(url).send().await.unwrap();
    assert_eq!(resp.status(), status, "{url}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], code, "{url}");
    body
}

fn layers() -> Vec<Vec<u8>> {
    vec![
        random_bytes(300_000, 1),
        random_bytes(70_000, 2),
        random_bytes(1_500_000, 3),
    ]
}

async fn copy_through(
    proxy: &ProxyProcess,
    reference: &str,
) -> (std::process::Output, tempfile::TempDir) {
    let dest = tempfile::tempdir().expect("tempdir");
    let out = skopeo_copy(
        &format!("{}/{reference}", proxy.host()),
        dest.path(),
        &["--src-no-creds"],
    )
    .await;
    (out, dest)
}

fn assert_same_image(dir: &Path, pushed: &PushedImage) {
    let got = DirImage::read(dir);
    assert_eq!(got.manifest_digest, pushed.manifest_digest);
    let mut want: std::collections::BTreeSet<String> =
        pushed.layer_digests.iter().cloned().collect();
    want.insert(pushed.config_digest.clone());
    assert_eq!(got.blob_digests, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_htpasswd_upstream() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[(USER, PASSWORD)])).await;
    let pushed = push_image(&reg, Some((USER, PASSWORD)), "team/app", "v1", &layers()).await;
    let (proxy, _dc) = proxy_with_user("basic.test", &reg, PASSWORD).await;

    let (out, dest) = copy_through(&proxy, "basic.test/team/app:v1").await;
    assert_success(&out);
    assert_same_image(dest.path(), &pushed);
    // By digest too.
    let (out, dest) = copy_through(
        &proxy,
        &format!("basic.test/team/app@{}", pushed.manifest_digest),
    )
    .await;
    assert_success(&out);
    assert_same_image(dest.path(), &pushed);
    assert!(
        !proxy.logs().contains(PASSWORD),
        "password leaked into the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_basic_credentials_are_unauthorized() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[(USER, PASSWORD)])).await;
    push_image(&reg, Some((USER, PASSWORD)), "team/app", "v1", &layers()).await;
    let (proxy, _dc) = proxy_with_user("basic.test", &reg, "not-the-password").await;

    let body = expect_error(
        &format!("{}/v2/basic.test/team/app/manifests/v1", proxy.url()),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("basic.test"),
        "message names the upstream: {msg}"
    );
    assert!(!msg.contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_upstream_private_and_public_pulls_with_one_token_per_scope() {
    let (tokens, reg) = token_registry(
        TokenPolicy::puller(USER, PASSWORD, "private/app").public_repo("public/app"),
    )
    .await;
    let private = push_image(&reg, ADMIN, "private/app", "v1", &layers()).await;
    let public = push_image(&reg, ADMIN, "public/app", "v1", &layers()).await;
    let (proxy, _dc) = proxy_with_user("token.test", &reg, PASSWORD).await;
    tokens.reset_counts();

    let (out, dest) = copy_through(&proxy, "token.test/private/app:v1").await;
    assert_success(&out);
    assert_same_image(dest.path(), &private);
    let scope = "repository:private/app:pull";
    assert_eq!(
        tokens.requests_for_scope(scope),
        1,
        "one token exchange for a whole image: {:?}",
        tokens.requests()
    );
    assert!(tokens
        .requests()
        .iter()
        .all(|r| r.authorized_user.as_deref() == Some(USER)));

    let (out, dest) = copy_through(&proxy, "token.test/public/app:v1").await;
    assert_success(&out);
    assert_same_image(dest.path(), &public);
    assert_eq!(tokens.requests_for_scope("repository:public/app:pull"), 1);
    assert!(!proxy.logs().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_public_pull_and_denied_private_pull() {
    let (tokens, reg) = token_registry(
        TokenPolicy::puller(USER, PASSWORD, "private/app").public_repo("public/app"),
    )
    .await;
    let public = push_image(&reg, ADMIN, "public/app", "v1", &layers()).await;
    push_image(&reg, ADMIN, "private/app", "v1", &layers()).await;
    // No docker config: the proxy is anonymous upstream.
    let config = trust_registry_realm(&proxy_config(&[("token.test", &reg.url())], None), &reg);
    let proxy = ProxyProcess::start(&config).await;
    tokens.reset_counts();

    let (out, dest) = copy_through(&proxy, "token.test/public/app:v1").await;
    assert_success(&out);
    assert_same_image(dest.path(), &public);
    assert!(
        tokens
            .requests()
            .iter()
            .all(|r| r.authorized_user.is_none()),
        "anonymous token requests only"
    );

    expect_error(
        &format!("{}/v2/token.test/private/app/manifests/v1", proxy.url()),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_credentials_are_unauthorized() {
    let (_tokens, reg) = token_registry(TokenPolicy::puller(USER, PASSWORD, "private/app")).await;
    push_image(&reg, ADMIN, "private/app", "v1", &layers()).await;
    let (proxy, _dc) = proxy_with_user("token.test", &reg, "wrong-password").await;

    expect_error(
        &format!("{}/v2/token.test/private/app/manifests/v1", proxy.url()),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
}

/// A cached token the registry no longer accepts (its signing key was rotated) is dropped and
/// exactly one new token is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_is_refreshed_once() {
    let policy = || TokenPolicy::puller(USER, PASSWORD, "private/app");
    let old_tokens = TokenServer::start(policy()).await;
    let mut reg = Registry::start(RegistryAuth::Token(old_tokens.info())).await;
    let pushed = push_image(&reg, ADMIN, "private/app", "v1", &layers()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dc = docker_config(tmp.path(), "token.test", USER, PASSWORD);
    // tag_ttl 0s: every tag request revalidates upstream, so the second request needs a token.
    // The token server is replaced on another port below: both are trusted realms.
    let new_tokens = TokenServer::start(policy()).await;
    let config = proxy_config(&[("token.test", &reg.url())], Some(&dc))
        .replace("cache:\n", "cache:\n  tag_ttl: 0s\n")
        .replace(
            &format!("    endpoint: {}\n", reg.url()),
            &format!(
                "    endpoint: {}\n    token_realm_hosts: [\"{}\", \"{}\"]\n",
                reg.url(),
                old_tokens.realm_host(),
                new_tokens.realm_host()
            ),
        );
    let proxy = ProxyProcess::start(&config).await;
    let url = format!("{}/v2/token.test/private/app/manifests/v1", proxy.url());
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let get_manifest = || async {
        http_client()
            .get(&url)
            .header("Accept", accept)
            .send()
            .await
            .unwrap()
    };
    let resp = get_manifest().await;
    assert_eq!(resp.status(), StatusCode::OK);

    // New token server, new key: every token the proxy holds is now refused.
    reg.restart_with(RegistryAuth::Token(new_tokens.info()))
        .await;
    let resp = get_manifest().await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        pushed.manifest.as_slice()
    );
    assert_eq!(
        new_tokens.requests_for_scope("repository:private/app:pull"),
        1
    );
    // And the fresh token is cached from now on.
    let resp = get_manifest().await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        new_tokens.requests_for_scope("repository:private/app:pull"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_range_tags_and_errors() {
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let pushed = push_image(&reg, None, "team/app", "v3", &layers()).await;
    for tag in ["v1", "v2", "v4", "v5"] {
        push_manifest(
            &reg,
            None,
            "team/app",
            tag,
            &pushed.media_type,
            &pushed.manifest,
        )
        .await;
    }
    let proxy = ProxyProcess::start(&format!(
        "{}default_upstream: plain.test\n",
        proxy_config(&[("plain.test", &reg.url())], None)
    ))
    .await;
    let client = http_client();
    let base = format!("{}/v2/plain.test/team/app", proxy.url());

    // HEAD manifest by tag: all the headers, no body.
    let resp = client
        .head(format!("{base}/manifests/v1"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["docker-content-digest"], pushed.manifest_digest.as_str());
    assert_eq!(h["content-type"], pushed.media_type.as_str());
    assert_eq!(
        h["content-length"],
        pushed.manifest.len().to_string().as_str()
    );
    assert_eq!(
        h["etag"],
        format!("\"{}\"", pushed.manifest_digest).as_str()
    );
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
    // The default upstream serves paths that name none.
    let resp = client
        .get(format!("{}/v2/team/app/manifests/v2", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        pushed.manifest.as_slice()
    );
    // An Accept list without the manifest's type: 404 like distribution.
    let resp = client
        .get(format!("{base}/manifests/v1"))
        .header(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Blobs: HEAD, Range 206, 416.
    let layer = &pushed.layer_digests[0];
    let resp = client
        .head(format!("{base}/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "300000");
    assert_eq!(resp.headers()["docker-content-digest"], layer.as_str());
    let resp = client
        .get(format!("{base}/blobs/{layer}"))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-range"], "bytes 100-199/300000");
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        &random_bytes(300_000, 1)[100..200]
    );
    let resp = client
        .get(format!("{base}/blobs/{layer}"))
        .header("Range", "bytes=300000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // Tags: distribution 2.8 ignores n/last, the proxy paginates.
    let page = |q: &str| {
        let client = client.clone();
        let url = format!("{base}/tags/list{q}");
        async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let link = resp
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = resp.json().await.unwrap();
            (body, link)
        }
    };
    let (body, link) = page("?n=2").await;
    assert_eq!(body["name"], "plain.test/team/app");
    assert_eq!(body["tags"], serde_json::json!(["v1", "v2"]));
    assert_eq!(
        link.as_deref(),
        Some("</v2/plain.test/team/app/tags/list?last=v2&n=2>; rel=\"next\"")
    );
    let (body, link) = page("?n=2&last=v2").await;
    assert_eq!(body["tags"], serde_json::json!(["v3", "v4"]));
    assert!(link.is_some());
    let (body, link) = page("?n=2&last=v4").await;
    assert_eq!(body["tags"], serde_json::json!(["v5"]));
    assert_eq!(link, None);
    let (body, link) = page("?n=0").await;
    assert_eq!(body["tags"], serde_json::json!([]));
    assert_eq!(link, None);
    let (body, _) = page("").await;
    assert_eq!(
        body["tags"],
        serde_json::json!(["v1", "v2", "v3", "v4", "v5"])
    );

    // Writes are refused; bad input gets precise codes.
    for (method, path) in [
        (Method::PUT, format!("{base}/manifests/v9")),
        (Method::POST, format!("{base}/blobs/uploads/")),
        (Method::DELETE, format!("{base}/blobs/{layer}")),
        (Method::PATCH, format!("{base}/blobs/uploads/abc")),
    ] {
        let resp = client.request(method.clone(), path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    }
    let code_of = |path: String| {
        let client = client.clone();
        async move {
            let resp = client.get(path).send().await.unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                body["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    assert_eq!(
        code_of(format!("{base}/manifests/.INVALID_MANIFEST_NAME")).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(
        code_of(format!("{base}/manifests/sha256:totallywrong")).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    assert_eq!(
        code_of(format!("{base}/blobs/sha256:abc")).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    assert_eq!(
        code_of(format!("{}/v2/Bad/Name/manifests/v1", proxy.url())).await,
        (StatusCode::BAD_REQUEST, "NAME_INVALID".into())
    );
    assert_eq!(
        code_of(format!("{base}/manifests/nope")).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    let missing = sha256_digest(b"hello world");
    assert_eq!(
        code_of(format!("{base}/blobs/{missing}")).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );
    // Referrers: distribution has no API, so the 404 stays a 404.
    let resp = client
        .get(format!("{base}/referrers/{}", pushed.manifest_digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // containerd's ns= routes to the upstream named by it.
    let resp = client
        .get(format!(
            "{}/v2/team/app/manifests/v1?ns=plain.test",
            proxy.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["oci-namespace"], "plain.test");
    // An unknown ns is not contacted.
    let resp = client
        .get(format!(
            "{}/v2/team/app/manifests/v1?ns=elsewhere.example",
            proxy.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_bad_gateway() {
    let port = free_port();
    let proxy = ProxyProcess::start(&proxy_config(
        &[("down.test", &format!("http://127.0.0.1:{port}"))],
        None,
    ))
    .await;
    let body = expect_error(
        &format!("{}/v2/down.test/team/app/manifests/v1", proxy.url()),
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
    )
    .await;
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("down.test"));
}

/// The status, OCI error code and access-log error label a client gets for `GET /v2/{path}`
/// through a proxy that logs JSON and has served nothing else on `route`.
async fn failure_seen(
    proxy: &ProxyProcess,
    path: &str,
    route: &str,
) -> (StatusCode, String, String) {
    let resp = http_client()
        .get(format!("{}/v2/{path}", proxy.url()))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    let code = body["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let access = || {
        proxy
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "oci_proxy::access" && v["route"] == route)
    };
    wait_until(Duration::from_secs(10), "the access line", || async {
        access().is_some()
    })
    .await;
    let label = access().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, label)
}

/// A blob's upstream fetch runs inside a cache fill, a manifest's does not; the same upstream
/// failure must still reach the client as the same error: status, OCI code and the label in
/// the access log (a token refusal once became `unauthorized` for blobs only, an upstream 502
/// `unreachable`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_and_a_manifest_get_the_same_error_for_the_same_upstream_failure() {
    let digest = sha256_digest(b"never pushed");
    // Wrong password against a token-auth upstream: the token server refuses.
    let (_tokens, reg) = token_registry(TokenPolicy::puller(USER, PASSWORD, "team/app")).await;
    let tmp = tempfile::tempdir().unwrap();
    let dc = docker_config(tmp.path(), "token.test", USER, "not-the-password");
    let token_cfg = trust_registry_realm(
        &proxy_config(&[("token.test", &reg.url())], Some(&dc)),
        &reg,
    );
    // An upstream answering 502 to both.
    let bad = Hostile::start().await;
    for kind in ["manifests", "blobs"] {
        bad.on(
            "GET",
            &format!("/v2/team/app/{kind}/{digest}"),
            Scripted::new(502),
        );
    }
    let cases = [
        (
            "token.test",
            token_cfg,
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "token"),
        ),
        (
            "bad.test",
            proxy_config(&[("bad.test", &bad.url())], None),
            (StatusCode::BAD_GATEWAY, "UNAVAILABLE", "status"),
        ),
        (
            "down.test",
            proxy_config(
                &[("down.test", &format!("http://127.0.0.1:{}", free_port()))],
                None,
            ),
            (StatusCode::BAD_GATEWAY, "UNAVAILABLE", "unreachable"),
        ),
    ];
    for (name, config, (status, code, label)) in cases {
        let proxy = ProxyProcess::start(&format!("log_format: json\n{config}")).await;
        let base = format!("{name}/team/app");
        let manifest =
            failure_seen(&proxy, &format!("{base}/manifests/{digest}"), "manifest").await;
        let blob = failure_seen(&proxy, &format!("{base}/blobs/{digest}"), "blob").await;
        let want = (status, code.to_owned(), label.to_owned());
        assert_eq!(manifest, want, "{name}: manifest");
        assert_eq!(blob, want, "{name}: blob");
    }
}
