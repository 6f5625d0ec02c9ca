//! Running `skopeo copy docker://… dir:…` (or `oci:…`) as an independent client, and reading what
//! landed in the `dir:` layout (`manifest.json`, `version`, blobs named by hex digest).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use super::seed::sha256_digest;

/// Upper bound for one `skopeo copy`.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `skopeo --insecure-policy copy --src-tls-verify=false <extra_args…>
/// docker://<src_ref> dir:<dest_dir>` and returns its output (check `status`).
/// `src_ref` is e.g. `127.0.0.1:5000/repo:tag`; pass `--src-creds user:pass` in `extra_args`.
/// Async so an in-process token server on the same runtime keeps answering.
pub async fn skopeo_copy(src_ref: &str, dest_dir: &Path, extra_args: &[&str]) -> Output {
    skopeo_copy_to(src_ref, &format!("dir:{}", dest_dir.display()), extra_args).await
}

/// [`skopeo_copy`] to any destination, e.g. `oci:<dir>:<tag>` (an OCI image layout).
pub async fn skopeo_copy_to(src_ref: &str, dest: &str, extra_args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        .args(extra_args)
        .arg(format!("docker://{src_ref}"))
        .arg(dest)
        .kill_on_drop(true);
    match tokio::time::timeout(SKOPEO_TIMEOUT, cmd.output()).await {
        Ok(output) => output.expect("run skopeo"),
        Err(_) => panic!("skopeo copy {src_ref} did not finish within {SKOPEO_TIMEOUT:?}"),
    }
}

/// Panics with skopeo's stderr unless it succeeded.
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "skopeo failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The contents of a skopeo `dir:` destination.
#[derive(Clone, Debug)]
pub struct DirImage {
    /// `sha256:` digest of `manifest.json`.
    pub manifest_digest: String,
    /// Digests (`sha256:<hex>`) of the blob files, from their names.
    pub blob_digests: BTreeSet<String>,
}

impl DirImage {
    /// Reads `dir`; also checks each blob file's content matches its name.
    pub fn read(dir: &Path) -> DirImage {
        let manifest = std::fs::read(dir.join("manifest.json")).expect("read manifest.json");
        let mut blob_digests = BTreeSet::new();
        for entry in std::fs::read_dir(dir).expect("read skopeo dir") {
            let entry = entry.expect("dir entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = match name.split_once('-') {
                _ if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    format!("sha256:{name}")
                }
                Some((algo, hex)) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    format!("{algo}:{hex}")
                }
                _ => continue, // manifest.json, version, signatures
            };
            if digest.starts_with("sha256:") {
                let bytes = std::fs::read(entry.path()).expect("read blob file");
                assert_eq!(sha256_digest(&bytes), digest, "blob file {name} content");
            }
            blob_digests.insert(digest);
        }
        DirImage {
            manifest_digest: sha256_digest(&manifest),
            blob_digests,
        }
    }
}
