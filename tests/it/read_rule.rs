//! The cache's read rule, played by an attacker: the real proxy binary in front of Debian's
//! `docker-registry` with htpasswd (and a lying upstream), pulled by anonymous clients.
//!
//! - Access ends when its source ends: once the named Secret leaves the (files) catalog, the
//!   repository's cached manifest, tag and blob are no longer served within 5 s, nor after a
//!   restart; while it is there, reads are hits with no upstream request.
//! - Likewise when a label-era module's ModuleTemplate goes (its Secret stays).
//! - `cache.link_ttl`: an older link is confirmed upstream again before the next read.
//! - Cross-upstream confirmation: a lying upstream that answers 200 to every HEAD never gets
//!   another upstream's cached blob, config or tagged manifest; `trust_content_from` opts in.

use crate::support;

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use support::kyma::{self, docker_secret};
use support::liar::LyingRegistry;
use support::{
    http_client, push_image, random_bytes, wait_until, write_docker_config, ProxyProcess,
    PushedImage, Registry, RegistryAuth, ADMIN_PASSWORD, ADMIN_USER,
};

const PRIVATE: &str = "private.test";
const LIAR: &str = "liar.test";
const REPO: &str = "shared/app";
const ROBOT: &str = "robot";
const ROBOT_PW: &str = "robot-pw-9d1e44";
const NS: &str = "kcp-system";
const SECRET: &str = "klm-oci-registry";
const DEADLINE: Duration = Duration::from_secs(20);
/// The bound for "access ends when its source ends".
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

/// `GET <proxy>/v2/<upstream>/<REPO>/<what>`: status and body.
async fn get(proxy: &str, upstream: &str, what: &str) -> (StatusCode, Vec<u8>) {
    get_in(proxy, upstream, REPO, what).await
}

/// `GET <proxy>/v2/<upstream>/<repo>/<what>`: status and body.
async fn get_in(proxy: &str, upstream: &str, repo: &str, what: &str) -> (StatusCode, Vec<u8>) {
    support::client_get(proxy, &format!("{upstream}/{repo}"), what).await
}

/// What an anonymous client pulls: the manifest by tag and by digest, config and layer.
fn pull_paths(img: &PushedImage) -> Vec<(String, Vec<u8>)> {
    img.pull_paths(&random_layer())
}

fn random_layer() -> Vec<u8> {
    random_bytes(30_000, 41)
}

/// Every pull path answers 200 with the right bytes.
async fn pulls_ok(proxy: &str, upstream: &str, img: &PushedImage) -> bool {
    pulls_ok_in(proxy, upstream, REPO, img).await
}

async fn pulls_ok_in(proxy: &str, upstream: &str, repo: &str, img: &PushedImage) -> bool {
    for (what, want) in pull_paths(img) {
        let (st, body) = get_in(proxy, upstream, repo, &what).await;
        if st != StatusCode::OK || body != want {
            return false;
        }
    }
    true
}

/// Requests the registry received for the test repository.
fn upstream_requests(reg: &Registry) -> usize {
    let needle = format!(" /v2/{REPO}/");
    reg.logs().lines().filter(|l| l.contains(&needle)).count()
}

fn upstream_heads(reg: &Registry) -> usize {
    let needle = format!("\"HEAD /v2/{REPO}/");
    reg.logs().lines().filter(|l| l.contains(&needle)).count()
}

async fn private_registry() -> (Registry, PushedImage) {
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (ROBOT, ROBOT_PW),
    ]))
    .await;
    let img = push_image(
        &reg,
        Some((ADMIN_USER, ADMIN_PASSWORD)),
        REPO,
        "v1",
        &[random_layer()],
    )
    .await;
    (reg, img)
}

fn secret_file(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("secret-{NS}-{SECRET}.yaml"))
}

fn write_secret(dir: &Path) {
    kyma::write_object_file(
        dir,
        &docker_secret(NS, SECRET, None, &[(PRIVATE, ROBOT, ROBOT_PW)]),
    );
}

async fn ready(proxy: &ProxyProcess) {
    let url = format!("{}/readyz", proxy.url());
    wait_until(DEADLINE, "the proxy's catalog synced", || {
        let url = url.clone();
        async move {
            http_client()
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;
}

/// None of the pull paths is served; each answer is a client error from the upstream's
/// refusal (never the content).
async fn all_refused(proxy: &str, img: &PushedImage) -> bool {
    all_refused_in(proxy, PRIVATE, REPO, img).await
}

async fn all_refused_in(proxy: &str, upstream: &str, repo: &str, img: &PushedImage) -> bool {
    for (what, want) in pull_paths(img) {
        let (st, body) = get_in(proxy, upstream, repo, &what).await;
        if st == StatusCode::OK {
            return false;
        }
        assert_ne!(body, want, "{what}: content in an error body");
        assert!(
            matches!(st.as_u16(), 401 | 403 | 404),
            "{what}: unexpected {st}"
        );
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_ends_when_the_named_secret_goes_even_after_a_restart_and_returns_with_it() {
    let (reg, img) = private_registry().await;
    let catalog = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_secret(catalog.path());
    let config = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{}\"\n\
         upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n\
         catalog:\n  files: \"{}\"\n  default_secret: {{namespace: {NS}, name: {SECRET}, subpath: shared}}\n",
        cache.path().display(),
        reg.url(),
        catalog.path().display()
    );
    let mut proxy = ProxyProcess::start(&config).await;
    ready(&proxy).await;
    let url = proxy.url();
    assert!(pulls_ok(&url, PRIVATE, &img).await, "{}", proxy.logs());
    proxy.wait_fills_committed(2.0).await; // config and layer

    // Still granted: hits, and the upstream hears nothing more.
    let before = upstream_requests(&reg);
    assert!(pulls_ok(&url, PRIVATE, &img).await);
    assert_eq!(upstream_requests(&reg), before, "cache hits asked upstream");

    // The named Secret goes: within 5 s, nothing cached is served anonymously.
    std::fs::remove_file(secret_file(catalog.path())).unwrap();
    wait_until(REVOKE_DEADLINE, "cached content refused", || {
        all_refused(&url, &img)
    })
    .await;

    // Nor after a restart on the same cache.
    proxy.stop();
    let proxy = ProxyProcess::start(&config).await;
    ready(&proxy).await;
    assert!(all_refused(&proxy.url(), &img).await, "{}", proxy.logs());

    // The Secret comes back: confirmed upstream again, then served.
    write_secret(catalog.path());
    let url = proxy.url();
    wait_until(DEADLINE, "content served again", || {
        pulls_ok(&url, PRIVATE, &img)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_older_than_link_ttl_is_confirmed_upstream_before_the_next_read() {
    let (reg, img) = private_registry().await;
    let docker = tempfile::tempdir().unwrap();
    let docker_config = docker.path().join("config.json");
    write_docker_config(&docker_config, PRIVATE, ROBOT, ROBOT_PW);
    let proxy = ProxyProcess::start(&format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n  link_ttl: 1ms\n\
         upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n\
         credentials:\n  docker_config: \"{}\"\n",
        reg.url(),
        docker_config.display()
    ))
    .await;
    let url = proxy.url();
    let layer = format!("blobs/{}", img.layer_digests[0]);
    let (st, body) = get(&url, PRIVATE, &layer).await;
    assert_eq!((st, body.len()), (StatusCode::OK, random_layer().len()));
    proxy.wait_fills_committed(1.0).await;

    let heads = upstream_heads(&reg);
    let gets = upstream_requests(&reg) - heads;
    let (st, body) = get(&url, PRIVATE, &layer).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, random_layer());
    assert_eq!(
        upstream_heads(&reg),
        heads + 1,
        "the expired link was confirmed"
    );
    assert_eq!(
        upstream_requests(&reg) - upstream_heads(&reg),
        gets,
        "the blob itself came from the cache"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("oci_proxy_cache_read_rule_refusals_total{reason=\"expired\"} 1"),
        "{metrics}"
    );
}

/// Two upstreams on one proxy: the private registry (credentials from the docker config) and
/// a liar that claims every digest. `trust` lists what the liar's entry trusts.
async fn with_liar(
    cache: &Path,
    reg: &Registry,
    liar: &LyingRegistry,
    trust: &str,
) -> ProxyProcess {
    let docker_config = cache.join("docker-config.json");
    write_docker_config(&docker_config, PRIVATE, ROBOT, ROBOT_PW);
    ProxyProcess::start(&format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{}\"\n\
         upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n  - name: {LIAR}\n    endpoint: {}\n{trust}\
         credentials:\n  docker_config: \"{}\"\n",
        cache.join("cache").display(),
        reg.url(),
        liar.url(),
        docker_config.display()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_upstream_gets_nothing_another_upstream_served_unless_trusted() {
    let (reg, img) = private_registry().await;
    let liar = LyingRegistry::start().await;
    liar.claim_tag(&img.manifest_digest, &img.media_type, img.manifest.len());
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = with_liar(dir.path(), &reg, &liar, "").await;
    let url = proxy.url();
    assert!(pulls_ok(&url, PRIVATE, &img).await, "{}", proxy.logs());
    proxy.wait_fills_committed(2.0).await; // config and layer

    for (what, want) in pull_paths(&img) {
        let (st, body) = get(&url, LIAR, &what).await;
        assert_ne!(body, want, "{what}: the liar got the private content");
        assert_eq!(
            st,
            StatusCode::NOT_FOUND,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(
        liar.count("GET") >= 3,
        "the proxy fetched from the liar itself"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("oci_proxy_cache_read_rule_refusals_total{reason=\"origin\"}"),
        "{metrics}"
    );

    // Opt-in: the liar's entry trusts content from the private upstream.
    proxy.stop();
    let proxy = with_liar(
        dir.path(),
        &reg,
        &liar,
        &format!("    trust_content_from: [{PRIVATE}]\n"),
    )
    .await;
    assert!(pulls_ok(&proxy.url(), LIAR, &img).await, "{}", proxy.logs());
}

/// A label-era module (its ModuleTemplate's `oci-registry-cred` selector picks its own Secret,
/// outside any named Secret's base): once the ModuleTemplate goes, its cached content is no
/// longer served anonymously within 5 s, although the Secret is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_ends_when_the_module_goes_although_its_secret_stays() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (ROBOT, ROBOT_PW),
    ]))
    .await;
    let component = "kyma-project.io/module/mod-a";
    let repo = kyma::module_repository("mods", component);
    let img = push_image(
        &reg,
        Some((ADMIN_USER, ADMIN_PASSWORD)),
        &repo,
        "1.0.0",
        &[random_layer()],
    )
    .await;
    let catalog = tempfile::tempdir().unwrap();
    let template = kyma::module_template(
        NS,
        "mod-a-regular",
        &format!("{}/mods", reg.url()),
        component,
        "1.0.0",
        Some("mod-a"),
    );
    kyma::write_object_file(catalog.path(), &template);
    kyma::write_object_file(
        catalog.path(),
        &docker_secret(
            NS,
            "mod-a-cred",
            Some("mod-a"),
            &[(&reg.host(), ROBOT, ROBOT_PW)],
        ),
    );
    // The module names the registry by its address: clients (LM) do too.
    let config = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         catalog:\n  files: \"{}\"\n",
        catalog.path().display()
    );
    let proxy = ProxyProcess::start(&config).await;
    ready(&proxy).await;
    let (url, host) = (proxy.url(), reg.host());
    assert!(
        pulls_ok_in(&url, &host, &repo, &img).await,
        "{}",
        proxy.logs()
    );

    std::fs::remove_file(
        catalog
            .path()
            .join("moduletemplate-kcp-system-mod-a-regular.yaml"),
    )
    .unwrap();
    wait_until(REVOKE_DEADLINE, "cached module content refused", || {
        all_refused_in(&url, &host, &repo, &img)
    })
    .await;
}
