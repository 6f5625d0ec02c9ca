//! What of a tag's content is in the cache, as `oci-proxy resolve` reports it for a module
//! version: the tag as last checked upstream, its manifest(s), and every config and layer blob.

use std::collections::HashSet;

use crate::cache::Cache;
use crate::protocol::media::ManifestRefs;
use crate::protocol::Digest;
use crate::routing::Target;

/// At most this many manifests are walked under one tag (an index and its children).
const MAX_WALKED_MANIFESTS: usize = 256;

/// Whether `version`'s content is in the cache for `target`'s repository, as `oci-proxy
/// resolve` prints it: the tag as last checked upstream, its manifest(s), and every config and
/// layer blob. Presence only: whether a request may read it is the read rule's business (its
/// grant and link), checked when it asks.
pub(crate) async fn cached_state(cache: &Cache, target: &Target, version: &str) -> String {
    let Some(entry) = cache
        .tag(&target.repo_key(), version, target.upstream.tag_ttl)
        .await
    else {
        return "not cached (tag never fetched)".to_owned();
    };
    let mut pending = vec![entry.digest.clone()];
    let (mut manifests, mut blobs, mut present, mut bytes) = (0usize, 0usize, 0usize, 0u64);
    let mut seen = HashSet::new();
    while let Some(digest) = pending.pop() {
        if manifests >= MAX_WALKED_MANIFESTS {
            break;
        }
        let Some(m) = cache.manifest(&digest).await else {
            return format!("not cached (manifest {digest} missing)");
        };
        manifests += 1;
        let Ok(doc) = ManifestRefs::parse(&m.bytes) else {
            continue;
        };
        for child in &doc.manifests {
            if let (true, Ok(d)) = (
                seen.insert(child.digest.clone()),
                Digest::parse(&child.digest),
            ) {
                pending.push(d);
            }
        }
        for b in doc.blob_digests() {
            if !seen.insert(b.to_owned()) {
                continue;
            }
            blobs += 1;
            if let Some(size) = Digest::parse(b).ok().and_then(|d| cache.blob_size(&d)) {
                present += 1;
                bytes += size;
            }
        }
    }
    let short = &entry.digest.hex()[..12.min(entry.digest.hex().len())];
    if present == blobs {
        format!("cached ({manifests} manifests, {blobs} blobs, {bytes} bytes; sha256:{short}…)")
    } else {
        format!("partly cached ({present} of {blobs} blobs; sha256:{short}…)")
    }
}
