//! `oci-proxy import`: an OCI image layout written by skopeo from a real `docker-registry`
//! (htpasswd), imported as `<upstream>/<repository>`, then pulled anonymously through the real
//! proxy binary.
//!
//! - With the upstream stopped, the proxy serves the imported image (manifest by tag and by
//!   digest, config, layer; and a whole `skopeo copy` through it) byte for byte: links and
//!   tags carry the grant a pull with the configured credential records, origins the
//!   upstream.
//! - One flipped byte in a blob file, or a blob a manifest names missing: exit 1 naming the
//!   digest, and nothing stored (no blob, manifest, link or tag; the proxy never serves it).
//! - With a shared tier, the import waits for its writes to the bucket: a replica with an
//!   empty cache dir on the same bucket serves the image with the upstream stopped.
//! - The read rule holds: imported as repository A, nothing is served as repository B on the
//!   same upstream (the upstream says B does not hold it), as for pulled content.
//!
//! skopeo (and moto for the shared tier) are required; without them these tests say why and
//! pass, unless `CI` is set.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reqwest::StatusCode;
use support::s3::Moto;
use support::*;

const UPSTREAM: &str = "private.test";
const REPO: &str = "team/app";
const ROBOT: &str = "robot";
const ROBOT_PW: &str = "robot-pw-3c8a51";

fn skopeo_installed() -> bool {
    if Command::new("skopeo").arg("--version").output().is_ok() {
        return true;
    }
    let msg = "skopeo is not installed: skipping the import test";
    eprintln!("{msg}");
    assert!(
        std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
        "{msg} (CI is set, so this fails)"
    );
    false
}

fn layer() -> Vec<u8> {
    random_bytes(200_000, 1313)
}

/// A private registry holding `team/app:v1`, the layout skopeo writes from it, and the config
/// (cache dir, the upstream, a docker config with the robot's credentials) the import and the
/// proxy share.
struct Setup {
    reg: Registry,
    img: PushedImage,
    layout: PathBuf,
    cache: PathBuf,
    /// With `{listen}` for [`ProxyProcess::start`].
    config_yaml: String,
    config_file: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    setup_with("").await
}

/// [`setup`] with more keys under `cache:` (each line indented by two spaces).
async fn setup_with(cache_keys: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryAuth::htpasswd(&[
        (ADMIN_USER, ADMIN_PASSWORD),
        (ROBOT, ROBOT_PW),
    ]))
    .await;
    let img = push_image(&reg, ADMIN, REPO, "v1", &[layer()]).await;
    let layout = dir.path().join("layout");
    let creds = format!("{ROBOT}:{ROBOT_PW}");
    let out = skopeo_copy_to(
        &format!("{}/{REPO}:v1", reg.host()),
        &format!("oci:{}:v1", layout.display()),
        // The pushed layer is an uncompressed tar: keep it (and so every digest) as it is.
        &[
            "--src-creds",
            &creds,
            "--dest-oci-accept-uncompressed-layers",
            "--preserve-digests",
        ],
    )
    .await;
    assert_success(&out);
    let docker_config = dir.path().join("docker-config.json");
    write_docker_config(&docker_config, UPSTREAM, ROBOT, ROBOT_PW);
    let cache = dir.path().join("cache");
    let config_yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{}\"\n{cache_keys}\
         upstreams:\n  - name: {UPSTREAM}\n    endpoint: {}\n\
         credentials:\n  docker_config: \"{}\"\n",
        cache.display(),
        reg.url(),
        docker_config.display()
    );
    let config_file = dir.path().join("import.yaml");
    std::fs::write(
        &config_file,
        config_yaml.replace("{listen}", "127.0.0.1:5000"),
    )
    .unwrap();
    Setup {
        reg,
        img,
        layout,
        cache,
        config_yaml,
        config_file,
        _dir: dir,
    }
}

fn import(config: &Path, layout: &Path, name: &str) -> Output {
    import_with_env(config, layout, name, &[])
}

fn import_with_env(config: &Path, layout: &Path, name: &str, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
        .envs(env.iter().copied())
        .arg("import")
        .arg("--config")
        .arg(config)
        .arg(layout)
        .arg("--as")
        .arg(name)
        .env("OCI_PROXY_LOG", "warn")
        .output()
        .expect("run oci-proxy import")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `GET <proxy>/v2/<name>/<what>` anonymously: status and body.
async fn get(proxy: &str, name: &str, what: &str) -> (StatusCode, Vec<u8>) {
    client_get(proxy, name, what).await
}

/// What a client pulls: the manifest by tag and by digest, config and layer, with their bytes.
fn pull_paths(img: &PushedImage) -> Vec<(String, Vec<u8>)> {
    img.pull_paths(&layer())
}

/// The layout's file for `digest` (`sha256:<hex>`).
fn blob_file(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(alg).join(hex)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_layout_is_served_with_the_upstream_stopped() {
    if !skopeo_installed() {
        return;
    }
    let mut s = setup().await;
    let name = format!("{UPSTREAM}/{REPO}");
    let out = import(&s.config_file, &s.layout, &name);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let summary = text(&out.stdout);
    let bytes = s.img.config.len() + layer().len();
    for line in [
        "manifests: 1".to_string(),
        "blobs: 2 (0 already cached)".to_string(),
        format!("bytes: {bytes}"),
        "tags: v1".to_string(),
    ] {
        assert!(summary.contains(&line), "{line:?} in:\n{summary}");
    }

    s.reg.stop();
    let proxy = ProxyProcess::start(&s.config_yaml).await;
    let url = proxy.url();
    for (what, want) in pull_paths(&s.img) {
        let (st, body) = get(&url, &name, &what).await;
        assert_eq!(st, StatusCode::OK, "{what}: {}", text(&body));
        assert!(body == want, "{what}: the bytes differ from the upstream's");
    }

    // A real client pulls the whole image through the proxy.
    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy(&format!("{}/{name}:v1", proxy.host()), dest.path(), &[]).await;
    assert_success(&out);
    let pulled = DirImage::read(dest.path());
    assert_eq!(pulled.manifest_digest, s.img.manifest_digest);
    let want: std::collections::BTreeSet<String> = [s.img.config_digest.clone()]
        .into_iter()
        .chain(s.img.layer_digests.iter().cloned())
        .collect();
    assert_eq!(pulled.blob_digests, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_with_a_bad_or_missing_blob_is_refused_and_nothing_is_stored() {
    if !skopeo_installed() {
        return;
    }
    let mut s = setup().await;
    let name = format!("{UPSTREAM}/{REPO}");

    // One flipped byte in the layer.
    let flipped = s._dir.path().join("flipped");
    copy_dir(&s.layout, &flipped);
    let layer_digest = &s.img.layer_digests[0];
    let file = blob_file(&flipped, layer_digest);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let out = import(&s.config_file, &flipped, &name);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "blob {layer_digest}: content does not match its digest"
        )),
        "{err}"
    );

    // The config blob the manifest names is gone.
    let missing = s._dir.path().join("missing");
    copy_dir(&s.layout, &missing);
    std::fs::remove_file(blob_file(&missing, &s.img.config_digest)).unwrap();
    let out = import(&s.config_file, &missing, &name);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "manifest {} names {}, which is missing from the layout",
            s.img.manifest_digest, s.img.config_digest
        )),
        "{err}"
    );

    // Nothing stored: no blob, manifest, link or tag (the cache dir was not even opened).
    let stored = files_under(&s.cache);
    assert!(stored.is_empty(), "stored: {stored:?}");

    // And a proxy on that cache, with the upstream stopped, serves none of it.
    s.reg.stop();
    let proxy = ProxyProcess::start(&s.config_yaml).await;
    let url = proxy.url();
    for (what, want) in pull_paths(&s.img) {
        let (st, body) = get(&url, &name, &what).await;
        assert!(body != want, "{what}: content served");
        assert!(
            matches!(st.as_u16(), 404 | 502),
            "{what}: unexpected {st}: {}",
            text(&body)
        );
    }
    let cached: Vec<_> = files_under(&s.cache.join("blobs"));
    assert!(cached.is_empty(), "blobs in the cache: {cached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_content_is_not_served_as_another_repository_on_the_same_upstream() {
    if !skopeo_installed() {
        return;
    }
    let s = setup().await;
    let out = import(&s.config_file, &s.layout, &format!("{UPSTREAM}/{REPO}"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));

    let blob_gets = || {
        let needle = format!("\"GET /v2/{REPO}/blobs/");
        s.reg.logs().lines().filter(|l| l.contains(&needle)).count()
    };
    let gets_before = blob_gets();
    let proxy = ProxyProcess::start(&s.config_yaml).await;
    let url = proxy.url();

    // Another repository on the same upstream: the upstream is asked (with the same
    // credential) and says it does not hold the content; nothing imported is served.
    let other = format!("{UPSTREAM}/other/app");
    for (what, want) in pull_paths(&s.img) {
        let (st, body) = get(&url, &other, &what).await;
        assert!(body != want, "{what}: content in the answer for {other}");
        assert!(
            matches!(st.as_u16(), 401 | 403 | 404),
            "{what}: unexpected {st}: {}",
            text(&body)
        );
    }

    // The imported repository is served, from the cache: no blob is fetched upstream.
    let name = format!("{UPSTREAM}/{REPO}");
    for (what, want) in pull_paths(&s.img) {
        let (st, body) = get(&url, &name, &what).await;
        assert_eq!(st, StatusCode::OK, "{what}: {}", text(&body));
        assert!(body == want, "{what}: the bytes differ");
    }
    assert_eq!(blob_gets(), gets_before, "a blob was fetched upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_tier_another_replica_serves_the_import_with_the_upstream_stopped() {
    if !skopeo_installed() {
        return;
    }
    let Some(moto) = Moto::start().await else {
        return;
    };
    let bucket = "oci-import";
    moto.create_bucket(bucket).await;
    let keys = format!(
        "  backend: s3\n  s3:\n    bucket: {bucket}\n    endpoint: {}\n    \
         region: us-east-1\n    allow_http: true\n",
        moto.endpoint()
    );
    let mut s = setup_with(&keys).await;
    let name = format!("{UPSTREAM}/{REPO}");
    let out = import_with_env(&s.config_file, &s.layout, &name, &moto.env());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));

    // A replica with its own, empty cache dir: everything comes from the bucket.
    s.reg.stop();
    let replica = s
        .config_yaml
        .replace(&s.cache.display().to_string(), "{dir}/cache");
    let proxy = ProxyProcess::start_with_env(&replica, &moto.env()).await;
    let url = proxy.url();
    for (what, want) in pull_paths(&s.img) {
        let (st, body) = get(&url, &name, &what).await;
        assert_eq!(st, StatusCode::OK, "{what}: {}", text(&body));
        assert!(body == want, "{what}: the bytes differ from the upstream's");
    }
}
