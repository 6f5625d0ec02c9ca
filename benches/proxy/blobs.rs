//! Benchmark payloads: large pseudo-random files generated straight to disk (never held in
//! memory), hashed as they are written, and pushed to a registry with a streaming upload.

use std::io::Write;
use std::path::{Path, PathBuf};

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};

/// Write granularity of [`generate`].
const GEN_CHUNK: usize = 1 << 20;

/// A blob on disk: its path, length and `sha256:` digest.
#[derive(Clone, Debug)]
pub struct BlobFile {
    pub path: PathBuf,
    pub len: u64,
    pub digest: String,
}

/// Writes `len` deterministic pseudo-random bytes (splitmix64 from `seed`) to `dir/name`,
/// 1 MiB at a time, hashing as it goes.
pub fn generate(dir: &Path, name: &str, len: u64, seed: u64) -> BlobFile {
    let path = dir.join(name);
    let file =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = std::io::BufWriter::with_capacity(GEN_CHUNK, file);
    let mut hasher = Sha256::new();
    let mut state = seed;
    let mut buf = vec![0u8; GEN_CHUNK];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let n = (left as usize).min(GEN_CHUNK);
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).expect("write generated blob");
        left -= n as u64;
    }
    out.flush().expect("flush generated blob");
    BlobFile {
        path,
        len,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
    }
}

/// Uploads `blob` to an anonymous registry at `base_url` as a blob of `repo`: POST
/// `uploads/`, then one monolithic PUT whose body streams from the file (constant memory).
pub async fn push_streaming(base_url: &str, repo: &str, blob: &BlobFile) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build upload client");
    let start = client
        .post(format!("{base_url}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    let status = start.status();
    let location = start
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(location) = location.filter(|_| status == StatusCode::ACCEPTED) else {
        panic!("starting upload to {repo}: {status}");
    };
    let location = if location.starts_with('/') {
        format!("{base_url}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let encoded: String = url::form_urlencoded::byte_serialize(blob.digest.as_bytes()).collect();
    let file = tokio::fs::File::open(&blob.path)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", blob.path.display()));
    let put = client
        .put(format!("{location}{sep}digest={encoded}"))
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, blob.len)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .expect("upload blob");
    let status = put.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "finishing upload of {} to {repo}: {}",
        blob.digest,
        put.text().await.unwrap_or_default()
    );
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
