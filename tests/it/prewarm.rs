//! Prewarm end to end: the `oci-proxy` binary with a files catalog in front of Debian's
//! docker-registry (htpasswd), every upstream request passing a recording [`kyma::Gate`].
//!
//! 1. A ModuleReleaseMeta channel moving to a new version makes the proxy fetch that version's
//!    manifest, config and layers with no client request at all; with the registry then
//!    stopped, Lifecycle Manager's (≥ 1.8) request sequence for it is served from the cache.
//! 2. Two modules with their own Secrets (different users): each module's repository is
//!    prewarmed with its own module's user only.
//! 3. A client asking for a blob prewarm is fetching follows that fill (one upstream GET), and
//!    `/readyz` does not wait for prewarm.
//! 4. `oci-proxy prewarm`: a good and a missing reference exit 1 naming the missing one's
//!    reason, the good one is cached (a proxy on that cache serves it with the upstream
//!    stopped); an all-good `--from-file` list exits 0; with the S3 tier, the command exits
//!    only once the bucket has everything.
//! 5. `oci-proxy prewarm` on an image index pulls every child manifest and its blobs.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::kyma::{
    self, docker_secret, lm_pull, module_repository, module_template, write_object_file, KCP_SYSTEM,
};
use support::*;

/// A port-less name for the registry (configured as an upstream with the gate as endpoint).
const ALIAS: &str = "modules.registry.test";
const KLM_USER: &str = "klm-robot";
const KLM_PW: &str = "klm-pw-prewarm-51c0";
const NAMED_SECRET: &str = "private-oci-reg-creds";
const COMPONENT: &str = "kyma-project.io/module/template-operator";
/// LM ≥ 1.8 with `--modules-repository-subpath=modules`.
const CURRENT_REPO: &str = "modules/component-descriptors/kyma-project.io/module/template-operator";

/// How long prewarm may take to show in the metrics.
const DEADLINE: Duration = Duration::from_secs(30);

fn layers(seed: u64) -> Vec<Vec<u8>> {
    vec![random_bytes(40_000, seed), random_bytes(9_000, seed + 100)]
}

/// A current (modulectl) ModuleTemplate: `descriptor: {}`, the component is in the
/// ModuleReleaseMeta.
fn current_template(version: &str) -> Value {
    json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleTemplate",
        "metadata": {"name": format!("template-operator-{version}"), "namespace": KCP_SYSTEM,
            "labels": {"operator.kyma-project.io/module-name": "template-operator"}},
        "spec": {"moduleName": "template-operator", "version": version, "descriptor": {}}})
}

fn release_meta(regular: &str) -> Value {
    json!({"apiVersion": "operator.kyma-project.io/v1beta2", "kind": "ModuleReleaseMeta",
        "metadata": {"name": "template-operator", "namespace": KCP_SYSTEM},
        "spec": {"moduleName": "template-operator", "ocmComponentName": COMPONENT,
            "channels": [{"channel": "regular", "version": regular}]}})
}

async fn metric(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&proxy.metrics().await, name, labels)
}

async fn prewarmed(proxy: &ProxyProcess, n: f64) {
    wait_until(
        DEADLINE,
        &format!("{n} module versions prewarmed"),
        || async {
            metric(
                proxy,
                "oci_proxy_prewarm_versions_total",
                &[("result", "ok")],
            )
            .await
                >= n
        },
    )
    .await;
}

/// Client requests the proxy answered for content (manifests, blobs).
async fn content_requests(proxy: &ProxyProcess) -> f64 {
    let text = proxy.metrics().await;
    ["manifest", "blob"]
        .iter()
        .map(|r| metric_sum(&text, "oci_proxy_http_requests_total", &[("route", r)]))
        .sum()
}

/// Requests for `repo` reached `gate` with `user`'s credentials and no other credentials.
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

fn catalog_config(gate: &kyma::Gate, catalog: &Path, extra: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         upstreams:\n  - name: {ALIAS}\n    endpoint: {}\ndefault_upstream: {ALIAS}\n\
         catalog:\n  files: \"{}\"\n{extra}",
        gate.url(),
        catalog.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_move_prewarms_the_new_version_which_lm_then_pulls_with_the_upstream_down() {
    let mut reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (KLM_USER, KLM_PW),
    ]))
    .await;
    push_image(&reg, ADMIN, CURRENT_REPO, "1.0.5", &layers(1)).await;
    let v6 = push_image(&reg, ADMIN, CURRENT_REPO, "1.0.6", &layers(2)).await;
    let gate = kyma::Gate::forwarder(reg.host().parse().expect("registry address")).await;
    let catalog = tempfile::tempdir().expect("catalog dir");
    let named = docker_secret(KCP_SYSTEM, NAMED_SECRET, None, &[(ALIAS, KLM_USER, KLM_PW)]);
    write_object_file(catalog.path(), &named);
    write_object_file(catalog.path(), &current_template("1.0.5"));
    write_object_file(catalog.path(), &release_meta("1.0.5"));
    let proxy = ProxyProcess::start(&catalog_config(
        &gate,
        catalog.path(),
        &format!(
            "  default_secret: {{namespace: {KCP_SYSTEM}, name: {NAMED_SECRET}, subpath: modules}}\n\
             \x20 prewarm: {{enabled: true}}\n"
        ),
    ))
    .await;
    // The version the channel points to at start.
    prewarmed(&proxy, 1.0).await;

    // The channel moves: LM will install 1.0.6 at its next reconcile.
    write_object_file(catalog.path(), &current_template("1.0.6"));
    write_object_file(catalog.path(), &release_meta("1.0.6"));
    prewarmed(&proxy, 2.0).await;
    let manifest_path = format!("/v2/{CURRENT_REPO}/manifests/1.0.6");
    assert!(
        gate.requests().iter().any(|r| r.path == manifest_path),
        "prewarm fetched 1.0.6's manifest: {:?}",
        gate.requests()
    );
    // Config + two layers per version, fetched by prewarm, committed; no client asked.
    assert_eq!(
        metric(
            &proxy,
            "oci_proxy_prewarm_blobs_total",
            &[("outcome", "miss")]
        )
        .await,
        6.0
    );
    assert!(metric(&proxy, "oci_proxy_cache_fills_committed_total", &[]).await >= 6.0);
    assert_eq!(content_requests(&proxy).await, 0.0);
    assert_eq!(
        metric(&proxy, "oci_proxy_prewarm_failures_total", &[]).await,
        0.0
    );
    only_user(&gate, CURRENT_REPO, KLM_USER, KLM_PW);
    let logs = proxy.logs();
    assert!(
        logs.contains("prewarm: module version cached") && logs.contains("1.0.6"),
        "one log line per module version:\n{logs}"
    );

    // `resolve` reports both versions as cached.
    let config = proxy.dir().join("config.yaml");
    let (ok, text) = kyma::resolve(&config, &format!("{ALIAS}/{CURRENT_REPO}"), &[]).await;
    assert!(ok, "{text}");
    assert!(
        text.contains("1.0.6 (channel): cached (1 manifests, 3 blobs"),
        "resolve shows the cached version:\n{text}"
    );
    assert!(
        text.contains("1.0.5: cached (1 manifests, 3 blobs"),
        "resolve shows the template-only version:\n{text}"
    );

    // The upstream goes away: LM's sequence for the new version is served from the cache.
    reg.stop();
    let got = lm_pull(&proxy.url(), CURRENT_REPO, "1.0.6")
        .await
        .unwrap_or_else(|e| panic!("LM pull from the cache: {e}"));
    assert_eq!(got.manifest_digest, v6.manifest_digest);
    assert_eq!(got.config_digest, v6.config_digest);
    assert_eq!(got.layer_digests, v6.layer_digests);
}

const A_USER: &str = "alpha-robot";
const A_PW: &str = "alpha-pw-7e21c9";
const B_USER: &str = "beta-robot";
const B_PW: &str = "beta-pw-03f6d8";

#[tokio::test(flavor = "multi_thread")]
async fn each_module_is_prewarmed_with_its_own_credentials_only() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (A_USER, A_PW),
        (B_USER, B_PW),
    ]))
    .await;
    let modules = [
        (
            "alpha",
            "kyma-project.io/module/alpha",
            "1.2.0",
            A_USER,
            A_PW,
            11,
        ),
        (
            "beta",
            "kyma-project.io/module/beta",
            "0.4.1",
            B_USER,
            B_PW,
            22,
        ),
    ];
    let gate = kyma::Gate::forwarder(reg.host().parse().expect("registry address")).await;
    let catalog = tempfile::tempdir().expect("catalog dir");
    for (name, component, version, user, pw, seed) in modules {
        let repo = module_repository("mods", component);
        push_image(&reg, ADMIN, &repo, version, &layers(seed)).await;
        let secret = docker_secret(
            KCP_SYSTEM,
            &format!("{name}-cred"),
            Some(name),
            &[(ALIAS, user, pw)],
        );
        write_object_file(catalog.path(), &secret);
        let base_url = format!("http://{ALIAS}/mods");
        let template = module_template(KCP_SYSTEM, name, &base_url, component, version, Some(name));
        write_object_file(catalog.path(), &template);
    }
    // Label-era templates have no channels: `all` prewarms every version a template names.
    let proxy = ProxyProcess::start(&catalog_config(
        &gate,
        catalog.path(),
        "  prewarm: {enabled: true, versions: all, concurrency: 2}\n",
    ))
    .await;
    prewarmed(&proxy, 2.0).await;
    assert_eq!(content_requests(&proxy).await, 0.0);
    for (_, component, version, user, pw, _) in modules {
        let repo = module_repository("mods", component);
        only_user(&gate, &repo, user, pw);
        let manifest_path = format!("/v2/{repo}/manifests/{version}");
        assert!(
            gate.requests_for(&repo)
                .iter()
                .any(|r| r.path == manifest_path),
            "{repo}: {:?}",
            gate.requests_for(&repo)
        );
    }
    assert_eq!(
        metric(
            &proxy,
            "oci_proxy_prewarm_blobs_total",
            &[("outcome", "miss")]
        )
        .await,
        6.0
    );
}

const PRIVATE: &str = "private.test";
const ROBOT: &str = "robot";
const ROBOT_PW: &str = "robot-pw-prewarm-88a1";

/// Runs `oci-proxy prewarm --config <config> <args>` with extra environment variables:
/// (exit code, stdout, stderr).
async fn prewarm_cli(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oci-proxy"));
    cmd.arg("prewarm")
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("oci-proxy prewarm finished within 60 s")
        .expect("run oci-proxy prewarm");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_no_secrets(&stdout, "prewarm output");
    assert_no_secrets(&stderr, "prewarm log");
    (out.status.code(), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn prewarm_command_caches_what_it_can_and_names_each_failure() {
    let mut reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (ROBOT, ROBOT_PW),
    ]))
    .await;
    let app = push_image(&reg, ADMIN, "team/app", "v1", &layers(5)).await;
    push_image(&reg, ADMIN, "team/tool", "v2", &layers(6)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let docker_config = dir.path().join("docker-config.json");
    write_docker_config(&docker_config, PRIVATE, ROBOT, ROBOT_PW);
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:5000\ncache:\n  dir: \"{}\"\n\
             upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n\
             credentials:\n  docker_config: \"{}\"\n",
            cache.display(),
            reg.url(),
            docker_config.display()
        ),
    )
    .expect("write config");

    let good = format!("{PRIVATE}/team/app:v1");
    let missing = format!("{PRIVATE}/team/missing:v1");
    let (code, out, err) = prewarm_cli(&config, &[&good, &missing], &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("{good}: ok: 1 manifests, 3 blobs (3 fetched)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{missing}: FAILED (not_found)")),
        "the failure and its reason:\n{out}"
    );
    assert!(out.contains("2/2 references done, 1 failed"), "{out}");

    // A proxy on that cache, with the upstream gone, serves the good one.
    reg.stop();
    {
        let proxy = ProxyProcess::start(&format!(
            "listen: \"{{listen}}\"\ncache:\n  dir: \"{}\"\n\
             upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n\
             credentials:\n  docker_config: \"{}\"\n",
            cache.display(),
            reg.url(),
            docker_config.display()
        ))
        .await;
        let got = lm_pull(&proxy.url(), &format!("{PRIVATE}/team/app"), "v1")
            .await
            .unwrap_or_else(|e| panic!("pull from the prewarmed cache: {e}"));
        assert_eq!(got.manifest_digest, app.manifest_digest);
        assert_eq!(got.layer_digests, app.layer_digests);
        assert_eq!(
            metric(&proxy, "oci_proxy_upstream_requests_total", &[]).await,
            0.0,
            "everything came from the cache"
        );
    }

    // All good, from a list with comments: exit 0; the cached one is not fetched again.
    reg.restart_with(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (ROBOT, ROBOT_PW),
    ]))
    .await;
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!("# demo images\n{good}\n\n{PRIVATE}/team/tool:v2   # the tool\n"),
    )
    .expect("write list");
    let (code, out, err) =
        prewarm_cli(&config, &["--from-file", &list.display().to_string()], &[]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("{good}: ok: 1 manifests, 3 blobs (0 fetched)")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{PRIVATE}/team/tool:v2: ok: 1 manifests, 3 blobs (3 fetched)"
        )),
        "{out}"
    );

    // On a terminal (a pty from util-linux `script`): the display is drawn with cleared lines
    // (redrawn in place), one line per reference and the total; the exit code is the same.
    let script = std::process::Command::new("script")
        .arg("--version")
        .output();
    if tool_present(
        script.is_ok_and(|o| o.status.success()),
        "script (util-linux) is not installed",
    ) {
        let command = format!(
            "{} prewarm --config {} {good}",
            env!("CARGO_BIN_EXE_oci-proxy"),
            config.display()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("script")
                .args(["-qec", &command, "/dev/null"])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("prewarm on a terminal finished within 60 s")
        .expect("run script");
        let screen = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{screen}");
        assert!(
            screen.contains("\x1b[2K"),
            "lines are cleared and redrawn: {screen:?}"
        );
        assert!(
            screen.contains(&format!("{good}: ok: 1 manifests, 3 blobs (0 fetched)")),
            "{screen:?}"
        );
        assert!(
            screen.contains("1/1 references done, 0 failed"),
            "{screen:?}"
        );
        assert_no_secrets(&screen, "prewarm display");
    }
}

const S3_UPSTREAM: &str = "shared.test";
const BUCKET: &str = "prewarm-cache";

fn s3_config(cache_dir: &str, reg: &Registry, moto: &support::s3::Moto) -> String {
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{cache_dir}\"\n  backend: s3\n  s3:\n    \
         bucket: {BUCKET}\n    endpoint: {}\n    region: us-east-1\n    allow_http: true\n\
         upstreams:\n  - name: {S3_UPSTREAM}\n    endpoint: {}\n",
        moto.endpoint(),
        reg.url()
    )
}

/// With the S3 tier configured, the command exits only once the bucket has everything: a
/// replica with an empty local disk serves the image with the upstream stopped.
#[tokio::test(flavor = "multi_thread")]
async fn prewarm_command_fills_the_shared_tier() {
    let Some(moto) = support::s3::Moto::start().await else {
        return;
    };
    moto.create_bucket(BUCKET).await;
    let mut reg = Registry::start(RegistryAuth::Anonymous).await;
    let image = push_image(&reg, None, "team/app", "v1", &layers(9)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yaml");
    let cli_cache = dir.path().join("cli-cache").display().to_string();
    // The command serves nothing: its `listen` is never bound.
    let cli_config = s3_config(&cli_cache, &reg, &moto).replace("{listen}", "127.0.0.1:5000");
    std::fs::write(&config, cli_config).expect("write config");
    let reference = format!("{S3_UPSTREAM}/team/app:v1");
    let (code, out, err) = prewarm_cli(&config, &[&reference], &moto.env()).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");

    reg.stop();
    let replica =
        ProxyProcess::start_with_env(&s3_config("{dir}/cache", &reg, &moto), &moto.env()).await;
    let got = lm_pull(&replica.url(), &format!("{S3_UPSTREAM}/team/app"), "v1")
        .await
        .unwrap_or_else(|e| panic!("pull from the prewarmed bucket: {e}"));
    assert_eq!(got.manifest_digest, image.manifest_digest);
    assert_eq!(got.layer_digests, image.layer_digests);
    assert_eq!(
        metric(
            &replica,
            "oci_proxy_cache_tier_total",
            &[("tier", "shared")]
        )
        .await,
        3.0,
        "config and layers came from the bucket"
    );
}

/// A client asking for a blob that prewarm is fetching follows that fill: one upstream GET, and
/// the client gets the verified bytes when they arrive. `/readyz` is 200 meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_follows_the_fill_prewarm_started() {
    use support::seed::{OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
    let upstream = FaultyRegistry::start().await;
    let host = upstream.url().trim_start_matches("http://").to_owned();
    let repo = module_repository("mods", "kyma-project.io/module/slow");
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = random_bytes(300_000, 77);
    let config_digest = upstream.add_blob(&repo, &config);
    let layer_digest = upstream.add_blob(&repo, &layer);
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len()}]});
    upstream.add_manifest(
        &repo,
        "2.0.0",
        OCI_MANIFEST,
        manifest.to_string().as_bytes(),
    );
    // The layer's first half goes out, the rest waits for a release.
    upstream.set_behaviour(&layer_digest, Behaviour::Stall);
    let catalog = tempfile::tempdir().expect("catalog dir");
    let template = module_template(
        KCP_SYSTEM,
        "slow",
        &format!("http://{host}/mods"),
        "kyma-project.io/module/slow",
        "2.0.0",
        None,
    );
    write_object_file(catalog.path(), &template);
    let proxy = ProxyProcess::start(&format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         catalog:\n  files: \"{}\"\n  prewarm: {{enabled: true, versions: all}}\n",
        catalog.path().display()
    ))
    .await;
    let layer_path = faulty::blob_path(&repo, &layer_digest);
    wait_until(DEADLINE, "prewarm's fill of the layer started", || async {
        upstream.gets(&layer_path) == 1
    })
    .await;

    // Readiness never waits for prewarm.
    let ready = http_client()
        .get(format!("{}/readyz", proxy.url()))
        .send()
        .await
        .expect("GET /readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);

    let url = format!("{}/v2/{host}/{repo}/blobs/{layer_digest}", proxy.url());
    let client = tokio::spawn(async move {
        let resp = http_client().get(url).send().await.expect("blob request");
        (resp.status(), resp.bytes().await.expect("blob body"))
    });
    wait_until(DEADLINE, "the client joined prewarm's fill", || async {
        metric(
            &proxy,
            "oci_proxy_cache_requests_total",
            &[("outcome", "coalesced")],
        )
        .await
            >= 1.0
    })
    .await;
    upstream.release(&layer_digest, 1);
    let (status, body) = client.await.expect("client task");
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(sha256_digest(&body), layer_digest);
    prewarmed(&proxy, 1.0).await;
    assert_eq!(upstream.gets(&layer_path), 1, "one upstream GET for both");
    assert_eq!(
        metric(
            &proxy,
            "oci_proxy_prewarm_blobs_total",
            &[("outcome", "miss")]
        )
        .await,
        2.0,
        "prewarm fetched the config and the layer"
    );
}

/// An image index: the command pulls every child manifest and the blobs of each.
#[tokio::test(flavor = "multi_thread")]
async fn prewarm_command_follows_an_index_to_its_children() {
    use support::seed::OCI_MANIFEST;
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let amd64 = push_image(&reg, None, "team/multi", "amd64", &layers(31)).await;
    let arm64 = push_image(&reg, None, "team/multi", "arm64", &layers(32)).await;
    let child = |image: &PushedImage, arch: &str| {
        json!({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
            "size": image.manifest.len(), "platform": {"architecture": arch, "os": "linux"}})
    };
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [child(&amd64, "amd64"), child(&arm64, "arm64")]});
    push_manifest(
        &reg,
        None,
        "team/multi",
        "v1",
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:5000\ncache:\n  dir: \"{}\"\n\
             upstreams:\n  - name: {PRIVATE}\n    endpoint: {}\n",
            dir.path().join("cache").display(),
            reg.url()
        ),
    )
    .expect("write config");
    let reference = format!("{PRIVATE}/team/multi:v1");
    let (code, out, err) = prewarm_cli(&config, &[&reference], &[]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!(
            "{reference}: ok: 3 manifests, 6 blobs (6 fetched)"
        )),
        "the index, both children, their configs and layers:\n{out}"
    );
}
