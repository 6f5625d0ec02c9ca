//! The cache's disk fills up under a running proxy: a real, size-limited filesystem (a 1 MiB
//! tmpfs, mounted by the test as root) behind `cache.dir`, a real distribution upstream. A
//! blob larger than the disk is still served whole and correct; the write error is counted
//! once per fill; nothing partial is committed, so the next request goes upstream again.
//!
//! Mounting needs root (CI runs as root); elsewhere the test prints why and passes.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use support::*;

const REPO: &str = "team/app";

/// A tmpfs mounted for the test; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot mount a tmpfs here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn upstream_gets(reg: &Registry, digest: &str) -> usize {
    let path = format!("\"GET /v2/{REPO}/blobs/{digest} ");
    reg.logs().lines().filter(|l| l.contains(&path)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_still_serves_the_blob_and_commits_nothing() {
    let Some(disk) = Tmpfs::mount("1m") else {
        return;
    };
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let blob = random_bytes(3 << 20, 77);
    let digest = push_blob(&reg, None, REPO, &blob).await;
    let cache_dir: PathBuf = disk.path().join("cache");
    let proxy = ProxyProcess::start(&format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{}\"\nupstreams:\n  - name: up.test\n    \
         endpoint: {}\n",
        cache_dir.display(),
        reg.url()
    ))
    .await;
    let url = format!("{}/v2/up.test/{REPO}/blobs/{digest}", proxy.url());

    for attempt in 1..=2 {
        let resp = http_client().get(&url).send().await.expect("GET blob");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.bytes().await.expect("the whole body, cleanly");
        assert!(
            body.len() == blob.len(),
            "attempt {attempt}: {} bytes",
            body.len()
        );
        assert_eq!(sha256_digest(&body), digest, "attempt {attempt}");
        // Nothing was committed, so every request is a new fill from upstream.
        assert_eq!(upstream_gets(&reg, &digest), attempt);
        let text = proxy.metrics().await;
        let failed = metric_sum(
            &text,
            "oci_proxy_cache_fills_failed_total",
            &[("reason", "write_error")],
        );
        assert_eq!(failed, attempt as f64, "one write error counted per fill");
        assert_eq!(metric_sum(&text, "oci_proxy_cache_blobs", &[]), 0.0);
    }
    // No temp file or partial blob left behind to fill the disk for good.
    let mut leftovers = walk(&cache_dir.join("tmp"));
    leftovers.extend(walk(&cache_dir.join("blobs")));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(proxy);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
