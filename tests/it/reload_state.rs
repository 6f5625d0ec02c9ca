//! What a config reload keeps: an upstream whose own settings did not change keeps its learned
//! challenge and its tokens, so pulls after a reload cost no new token exchange; an upstream
//! whose settings changed starts fresh.

use crate::support;

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use support::*;

const USER: &str = "reload-user";
const PASSWORD: &str = "reload-secret-pw-2207";
const SCOPE: &str = "repository:team/app:pull";
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

fn layers() -> Vec<Vec<u8>> {
    vec![random_bytes(4096, 1), random_bytes(8192, 2)]
}

/// A docker config.json with `user:password` for `registry`.
fn docker_config(dir: &Path, registry: &str) -> std::path::PathBuf {
    let path = dir.join("docker-config.json");
    write_docker_config(&path, registry, USER, PASSWORD);
    path
}

/// The proxy config: `token.test` at `endpoint`, then the upstream entries in `more`.
fn config(proxy: &str, dir: &str, dc: &Path, endpoint: &str, more: &str) -> String {
    format!(
        "listen: \"{proxy}\"\ncache:\n  dir: \"{dir}/cache\"\n\
         credentials:\n  docker_config: \"{}\"\n\
         upstreams:\n  - name: token.test\n    endpoint: \"{endpoint}\"\n{more}",
        dc.display()
    )
}

/// Replaces the running proxy's config file atomically (the proxy notices the change).
fn write_config(proxy: &ProxyProcess, yaml: &str) {
    let path = proxy.dir().join("config.yaml");
    let tmp = proxy.dir().join("config.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// The value of `oci_proxy_config_reloads_total{result="ok"}`, 0 when absent.
async fn reloads_ok(proxy: &ProxyProcess) -> f64 {
    metric_value(
        &proxy.metrics().await,
        "oci_proxy_config_reloads_total{result=\"ok\"}",
    )
}

async fn wait_for_reloads(proxy: &ProxyProcess, n: f64) {
    wait_until(RELOAD_DEADLINE, &format!("{n} applied reloads"), || async {
        reloads_ok(proxy).await >= n
    })
    .await;
}

/// `log` without ANSI colour sequences.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn get_ok(client: &reqwest::Client, proxy: &ProxyProcess, path: &str) -> Vec<u8> {
    let r = client
        .get(format!("{}/v2/token.test/team/app/{path}", proxy.url()))
        .header("accept", support::seed::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_tokens_of_unchanged_upstreams() {
    register_secret(PASSWORD);
    let (tokens, reg) = token_registry(TokenPolicy::puller(USER, PASSWORD, "team/app")).await;
    let other = Registry::start(RegistryAuth::Anonymous).await;
    let image = push_image(&reg, ADMIN, "team/app", "v1", &layers()).await;
    let creds = tempfile::tempdir().unwrap();
    let dc = docker_config(creds.path(), "token.test");
    let start = trust_registry_realm(&config("{listen}", "{dir}", &dc, &reg.url(), ""), &reg);
    let proxy = ProxyProcess::start(&start).await;
    let (host, dir) = (proxy.host(), proxy.dir().display().to_string());
    let client = http_client();
    tokens.reset_counts();

    assert_eq!(
        get_ok(&client, &proxy, "manifests/v1").await,
        image.manifest
    );
    assert_eq!(
        tokens.requests_for_scope(SCOPE),
        1,
        "{:?}",
        tokens.requests()
    );

    // An unrelated change: another upstream and a new tag_ttl.
    let second = format!("  - name: other.test\n    endpoint: \"{}\"\n", other.url());
    let tag_ttl = "  tag_ttl: 2m\n";
    let yaml = trust_registry_realm(&config(&host, &dir, &dc, &reg.url(), &second), &reg)
        .replace("cache:\n", &format!("cache:\n{tag_ttl}"));
    write_config(&proxy, &yaml);
    wait_for_reloads(&proxy, 1.0).await;
    // Content not pulled before: it goes upstream, with the token from before the reload.
    let config_blob = get_ok(&client, &proxy, &format!("blobs/{}", image.config_digest)).await;
    assert_eq!(config_blob, image.config);
    assert_eq!(
        tokens.requests_for_scope(SCOPE),
        1,
        "no new token exchange after the reload: {:?}",
        tokens.requests()
    );
    let logs = plain(&proxy.logs());
    assert!(
        logs.contains("kept=1 rebuilt=0 added=1 removed=0"),
        "the reload logs what it kept; logs:\n{logs}"
    );

    // The upstream's own settings change (its client's timeout): fresh state, a new token.
    let yaml = yaml.replace(
        "credentials:",
        "limits:\n  upstream_timeout: 61s\ncredentials:",
    );
    write_config(&proxy, &yaml);
    wait_for_reloads(&proxy, 2.0).await;
    let layer = get_ok(
        &client,
        &proxy,
        &format!("blobs/{}", image.layer_digests[0]),
    )
    .await;
    assert_eq!(sha256_digest(&layer), image.layer_digests[0]);
    assert_eq!(
        tokens.requests_for_scope(SCOPE),
        2,
        "a rebuilt upstream exchanges again: {:?}",
        tokens.requests()
    );
    assert!(tokens
        .requests()
        .iter()
        .all(|r| r.authorized_user.as_deref() == Some(USER)));
}
