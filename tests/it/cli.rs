//! The command line: the embedded default serves, `check-config` names the key path of an
//! error and exits 1.

use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
}

#[test]
fn check_config_reports_the_key_path_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: 127.0.0.1:5000\nupstreams:\n  - name: a.example\n    endpoint: ftp://a.example\n",
    )
    .unwrap();
    let out = bin().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstreams[0].endpoint"), "{err}");

    // Every problem, each on its own line with its key path.
    std::fs::write(
        &bad,
        "default_upstream: x.io\nlimits:\n  max_connections: 0\ncache:\n  link_ttl: 0s\n",
    )
    .unwrap();
    let out = bin().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "error: cache.link_ttl: must be more than 0",
            "error: default_upstream: \"x.io\" is not one of upstreams[].name",
            "error: limits.max_connections: must be more than 0",
        ]
    );

    std::fs::write(&bad, "cache:\n  dir: /x\n  colour: red\n").unwrap();
    let out = bin().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `colour`"));

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "listen: 127.0.0.1:5000\ncache:\n  max_size: 1GiB\n").unwrap();
    let out = bin().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("max_size: 1GiB"), "{printed}");
    assert!(
        printed.contains("tag_ttl: 1m"),
        "defaults are printed: {printed}"
    );
}

/// `oci-proxy serve` without a config runs the embedded laptop mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_config_runs_the_embedded_default() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = bin()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env_remove("DOCKER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = http_client();
    wait_until(
        Duration::from_secs(20),
        "the embedded default answers /v2/",
        || {
            let client = client.clone();
            let url = url.clone();
            async move {
                matches!(client.get(format!("{url}/v2/")).send().await, Ok(r) if r.status() == 200)
            }
        },
    )
    .await;
    let ready = client.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The cache lives in ./oci-proxy-cache of the working directory.
    assert!(home.path().join("oci-proxy-cache").is_dir());
    // Nothing but the configured public registries is routable: an unknown ns is refused
    // without contacting anything.
    let resp = client
        .get(format!(
            "{url}/v2/team/app/manifests/v1?ns=registry.invalid"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The exec-probe helper: 0 for a live endpoint, 1 for a closed port.
    let probe = bin()
        .args(["probe", "--url", &format!("{url}/readyz")])
        .output()
        .unwrap();
    assert!(probe.status.success(), "{probe:?}");
    let _ = child.kill();
    let _ = child.wait();
    let dead = bin()
        .args([
            "probe",
            "--url",
            &format!("{url}/healthz"),
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(dead.status.code(), Some(1));
}
