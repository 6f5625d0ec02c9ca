//! `oci-proxy import`: seeds the cache from an OCI image layout (as `skopeo copy ...
//! oci:DIR:tag` writes it), so that a proxy in a landscape with no route to its upstream
//! serves images carried in by hand.
//!
//! Imported content must be served exactly as if it had been pulled through the proxy, no
//! more: the layout is stored as a pull of `<upstream>/<repository>` would store it. The name
//! is routed as a client's request for it is ([`crate::routing::resolve`]), the credential
//! chain picks the credential that repository gets, and the grant recorded on every link and
//! tag is the one a pull would record ([`Puller::new`] computes it, as for a request). Every
//! blob is committed through the cache's own fill ([`Cache::import_blob`]) with the upstream
//! as its origin; manifests, links and tags go through the same calls a pull makes. So the
//! read rule holds unchanged: another repository, another grant or another upstream gets no
//! imported content it would not get from pulled content.
//!
//! All or nothing: the whole layout is checked before anything is stored ([`Layout::read`]).
//! Every file under `blobs/` must hash to its name (hashed as it streams, never a whole blob
//! in memory), every manifest reachable from `index.json` must be there with the size its
//! descriptor gives, and so must every blob a manifest names. Only then is anything written;
//! the fill hashes each blob again as it stores it, so a file changed in between is refused
//! too (what was committed before it stays, each piece verified; run the import again).
//!
//! With a shared tier (`cache.backend: s3`) the fills look in the bucket first and upload
//! what they commit, and manifests, links, tags and origins are written to the bucket as a
//! pull writes them; the import waits for those writes before it exits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::cache::{CacheError, UpstreamBody, MAX_MANIFEST_SIZE};
use crate::config::Config;
use crate::protocol::grammar::Hasher;
use crate::protocol::media::{self, Descriptor, ManifestRefs};
use crate::protocol::{Digest, Tag};
use crate::pull::Puller;
use crate::server::App;

/// The annotation that names a manifest's tag in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// How deep image indexes may nest.
const MAX_DEPTH: usize = 8;
/// Read size while hashing a layout file.
const READ_CHUNK: usize = 256 << 10;
/// How long the module catalog may take for its first sync before the import gives up.
const CATALOG_SYNC: Duration = Duration::from_secs(30);

/// Why an import was refused. Nothing is stored for a refusal found while checking the layout.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The layout is not a valid, complete OCI image layout (nothing stored).
    #[error("{0}")]
    Layout(String),
    /// The name cannot be routed or gets no credential (nothing stored).
    #[error("{0}")]
    Route(String),
    /// The proxy could not be assembled from the config (nothing stored).
    #[error("{0}")]
    Setup(String),
    /// Storing failed part way.
    #[error("storing {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: CacheError,
    },
}

fn layout_err(msg: impl Into<String>) -> ImportError {
    ImportError::Layout(msg.into())
}

/// What an import stored.
#[derive(Debug, Default)]
pub struct Summary {
    /// The repository key, `<upstream>/<repository>`.
    pub repository: String,
    pub manifests: usize,
    pub blobs: usize,
    /// Blobs that were in the cache already.
    pub blobs_present: usize,
    /// Bytes of the blobs (all of them, stored now or before).
    pub bytes: u64,
    pub tags: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "imported into {}", self.repository)?;
        writeln!(f, "manifests: {}", self.manifests)?;
        writeln!(
            f,
            "blobs: {} ({} already cached)",
            self.blobs, self.blobs_present
        )?;
        writeln!(f, "bytes: {}", self.bytes)?;
        writeln!(f, "tags: {}", self.tags.join(", "))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

/// A verified manifest, ready to store.
struct LayoutManifest {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// A verified OCI image layout: what to store, in the order to store it.
pub(crate) struct Layout {
    dir: PathBuf,
    /// Children before the indexes that name them.
    manifests: Vec<LayoutManifest>,
    /// Blobs manifests name, with their sizes.
    blobs: BTreeMap<Digest, u64>,
    tags: BTreeMap<String, Digest>,
}

impl Layout {
    /// Reads and checks the layout in `dir` (blocking): every file under `blobs/` hashes to its
    /// name, and everything `index.json` reaches is there with the size it is given.
    pub(crate) fn read(dir: &Path) -> Result<Layout, ImportError> {
        let marker = std::fs::read(dir.join("oci-layout"))
            .map_err(|e| layout_err(format!("{}/oci-layout: {e}", dir.display())))?;
        let marker: LayoutMarker = serde_json::from_slice(&marker)
            .map_err(|e| layout_err(format!("{}/oci-layout: {e}", dir.display())))?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(layout_err(format!(
                "{}/oci-layout: unsupported imageLayoutVersion {:?}",
                dir.display(),
                marker.image_layout_version
            )));
        }
        let files = hash_blob_files(dir)?;
        let index_path = dir.join("index.json");
        let index = read_small(&index_path)?;
        let index = ManifestRefs::parse(&index)
            .map_err(|e| layout_err(format!("{}: {e}", index_path.display())))?;
        let mut walk = Walk {
            dir,
            files: &files,
            manifests: Vec::new(),
            seen: HashSet::new(),
            blobs: BTreeMap::new(),
        };
        let mut tags = BTreeMap::new();
        for d in &index.manifests {
            let digest = walk.manifest(d, "index.json", 0)?;
            if let Some(name) = d.annotations.get(REF_NAME) {
                let tag = tag_of(name).ok_or_else(|| {
                    layout_err(format!(
                        "index.json: {REF_NAME} {name:?} of {digest} is not a valid tag"
                    ))
                })?;
                if let Some(other) = tags.insert(tag.clone(), digest.clone()) {
                    if other != digest {
                        return Err(layout_err(format!(
                            "index.json: tag {tag} names both {other} and {digest}"
                        )));
                    }
                }
            }
        }
        if walk.manifests.is_empty() {
            return Err(layout_err("index.json names no manifest"));
        }
        Ok(Layout {
            dir: dir.to_owned(),
            manifests: walk.manifests,
            blobs: walk.blobs,
            tags,
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        blob_path(&self.dir, d)
    }
}

fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join(d.algorithm().as_str()).join(d.hex())
}

/// The tag an `org.opencontainers.image.ref.name` gives: the whole value (what skopeo
/// writes), or the part after the last `:` of a full reference (`name:tag`).
fn tag_of(name: &str) -> Option<String> {
    if let Some(t) = Tag::parse(name) {
        return Some(t.as_str().to_owned());
    }
    let (repo, tag) = name.rsplit_once(':')?;
    if repo.is_empty() || tag.contains('/') {
        return None;
    }
    Tag::parse(tag).map(|t| t.as_str().to_owned())
}

/// Hashes every file under `blobs/<algorithm>/` as it streams; its digest and size. A file
/// not named by a digest, or whose content does not match its name, refuses the layout.
fn hash_blob_files(dir: &Path) -> Result<HashMap<Digest, u64>, ImportError> {
    let blobs = dir.join("blobs");
    let mut out = HashMap::new();
    let algs =
        std::fs::read_dir(&blobs).map_err(|e| layout_err(format!("{}: {e}", blobs.display())))?;
    for alg in algs {
        let alg = alg.map_err(|e| layout_err(format!("{}: {e}", blobs.display())))?;
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        let files = std::fs::read_dir(alg.path())
            .map_err(|e| layout_err(format!("{}: {e}", alg.path().display())))?;
        for f in files {
            let f = f.map_err(|e| layout_err(format!("{}: {e}", alg.path().display())))?;
            let path = f.path();
            let name = format!("{alg_name}:{}", f.file_name().to_string_lossy());
            let digest = Digest::parse(&name)
                .map_err(|_| layout_err(format!("{}: not named by a digest", path.display())))?;
            let size = hash_file(&path, &digest)?;
            out.insert(digest, size);
        }
    }
    Ok(out)
}

/// Streams `path` through a hasher: its size when it matches `digest`.
fn hash_file(path: &Path, digest: &Digest) -> Result<u64, ImportError> {
    let io_err = |e: std::io::Error| layout_err(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Hasher::new(digest.algorithm());
    let mut buf = vec![0u8; READ_CHUNK];
    let mut size: u64 = 0;
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    if !hasher.matches(digest) {
        return Err(layout_err(format!(
            "blob {digest}: content does not match its digest ({})",
            path.display()
        )));
    }
    Ok(size)
}

/// Reads a manifest-sized file, refusing one larger than [`MAX_MANIFEST_SIZE`].
fn read_small(path: &Path) -> Result<Vec<u8>, ImportError> {
    let io_err = |e: std::io::Error| layout_err(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() > MAX_MANIFEST_SIZE {
        return Err(layout_err(format!(
            "{}: larger than the {MAX_MANIFEST_SIZE}-byte manifest limit",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The walk from `index.json` through indexes to manifests and their blobs.
struct Walk<'a> {
    dir: &'a Path,
    files: &'a HashMap<Digest, u64>,
    manifests: Vec<LayoutManifest>,
    /// Manifests visited.
    seen: HashSet<Digest>,
    blobs: BTreeMap<Digest, u64>,
}

impl Walk<'_> {
    /// Checks the manifest `d` (named by `parent`) and everything it names; its digest.
    fn manifest(
        &mut self,
        d: &Descriptor,
        parent: &str,
        depth: usize,
    ) -> Result<Digest, ImportError> {
        let digest = self.present(d, parent)?;
        if self.seen.contains(&digest) {
            return Ok(digest);
        }
        if depth > MAX_DEPTH {
            return Err(layout_err(format!(
                "{digest}: image indexes nested more than {MAX_DEPTH} deep"
            )));
        }
        let bytes = Bytes::from(read_small(&blob_path(self.dir, &digest))?);
        // Hashed again as read: the bytes stored are the bytes checked.
        if !digest.verify(&bytes) || bytes.len() as u64 != d.size {
            return Err(layout_err(format!(
                "manifest {digest}: content does not match its digest"
            )));
        }
        let media_type = d
            .media_type
            .clone()
            .filter(|t| media::is_manifest_type(t))
            .or_else(|| media::infer_manifest_media_type(&bytes))
            .filter(|t| media::is_manifest_type(t))
            .ok_or_else(|| {
                layout_err(format!(
                    "{parent} names {digest} as a manifest, but it has no manifest media type"
                ))
            })?;
        let doc = ManifestRefs::parse(&bytes)
            .map_err(|e| layout_err(format!("manifest {digest}: {e}")))?;
        let me = format!("manifest {digest}");
        if media::is_index_type(&media_type) {
            for child in &doc.manifests {
                self.manifest(child, &me, depth + 1)?;
            }
        } else {
            for blob in doc.config.iter().chain(&doc.layers) {
                let b = self.present(blob, &me)?;
                self.blobs.insert(b, blob.size);
            }
        }
        self.seen.insert(digest.clone());
        self.manifests.push(LayoutManifest {
            digest: digest.clone(),
            media_type,
            bytes,
        });
        Ok(digest)
    }

    /// The digest of `d`, whose file must be in the layout with the size `d` gives.
    fn present(&self, d: &Descriptor, parent: &str) -> Result<Digest, ImportError> {
        let digest = Digest::parse(&d.digest)
            .map_err(|_| layout_err(format!("{parent} names an invalid digest {:?}", d.digest)))?;
        match self.files.get(&digest) {
            None => Err(layout_err(format!(
                "{parent} names {digest}, which is missing from the layout"
            ))),
            Some(&size) if size != d.size => Err(layout_err(format!(
                "{parent} gives {digest} a size of {} bytes, but its file has {size}",
                d.size
            ))),
            Some(_) => Ok(digest),
        }
    }
}

/// `oci-proxy import`: checks the layout in `dir`, then stores it as pulled through `name`
/// (`<upstream>/<repository>`, as a client would request it) into the cache `config` names.
pub async fn run(config: Config, dir: &Path, name: &str) -> Result<Summary, ImportError> {
    // The client's routing of the name, with a client's validation of it.
    let route = crate::protocol::route(&http::Method::GET, &format!("/v2/{name}/tags/list"), None)
        .map_err(|e| ImportError::Route(format!("--as {name}: {}", e.message)))?;
    let layout = {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || Layout::read(&dir))
            .await
            .map_err(|e| ImportError::Setup(format!("layout check failed: {e}")))??
    };
    let total: u64 = layout.blobs.values().sum();
    if let Some(max) = config.cache.max_size {
        if total > max.0 {
            return Err(ImportError::Layout(format!(
                "the layout's {total} bytes of blobs exceed cache.max_size ({max})"
            )));
        }
    }
    let app = App::build(config)
        .await
        .map_err(|e| ImportError::Setup(e.to_string()))?;
    if let Some(catalog) = &app.catalog {
        if !catalog.wait_ready(CATALOG_SYNC).await {
            return Err(ImportError::Route(
                "the module catalog did not finish its first sync: the credential a pull \
                 gets is not known yet"
                    .into(),
            ));
        }
    }
    // The same routing and credential choice as a client's pull of the name.
    let mut repo_key = String::new();
    let puller = crate::server::handlers::puller_for(&app, &route.name, None, &mut repo_key)
        .await
        .map_err(|e| ImportError::Route(format!("--as {name}: {e}")))?;
    let summary = store(&puller, &layout).await?;
    if !app.cache.settle(crate::cache::SHARED_SETTLE_WAIT).await {
        return Err(ImportError::Setup(
            "uploads to the shared cache tier still running at exit".into(),
        ));
    }
    Ok(summary)
}

/// Stores a checked layout through `puller`'s repository, grant and upstream: blobs, then
/// manifests (children first), then tags, each linked as a pull links it.
async fn store(puller: &Puller<'_>, layout: &Layout) -> Result<Summary, ImportError> {
    let cache = puller.cache;
    let upstream = puller.target.upstream.name.clone();
    let key = puller.target.repo_key();
    let mut summary = Summary {
        repository: key.clone(),
        ..Summary::default()
    };
    let store_err = |what: String| move |source| ImportError::Store { what, source };
    for (digest, &size) in &layout.blobs {
        let path = layout.blob_path(digest);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| store_err(format!("blob {digest}"))(CacheError::Io(e)))?;
        let body = UpstreamBody {
            size: Some(size),
            stream: tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK).boxed(),
        };
        let stored = cache
            .import_blob(digest, &upstream, body)
            .await
            .map_err(store_err(format!("blob {digest}")))?;
        cache.link(&key, digest, puller.grant).await;
        summary.blobs += 1;
        summary.blobs_present += usize::from(!stored);
        summary.bytes += size;
    }
    for m in &layout.manifests {
        cache
            .put_manifest(&m.digest, &m.media_type, m.bytes.clone())
            .await
            .map_err(store_err(format!("manifest {}", m.digest)))?;
        cache.add_origin_journaled(&m.digest, &upstream).await;
        cache.link(&key, &m.digest, puller.grant).await;
        summary.manifests += 1;
    }
    for (tag, digest) in &layout.tags {
        cache.put_tag(&key, tag, digest, puller.grant).await;
        summary.tags.push(tag.clone());
    }
    tracing::info!(
        repository = %key,
        manifests = summary.manifests,
        blobs = summary.blobs,
        bytes = summary.bytes,
        tags = summary.tags.len(),
        "imported an OCI image layout"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_become_tags() {
        assert_eq!(tag_of("v1.2").as_deref(), Some("v1.2"));
        assert_eq!(
            tag_of("registry.example:5000/app:v1").as_deref(),
            Some("v1")
        );
        assert_eq!(tag_of("registry.example:5000/app"), None);
        assert_eq!(tag_of("not a tag"), None);
    }

    /// Writes `bytes` as a blob of the layout in `dir`; its descriptor JSON.
    fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let d = Digest::sha256_of(bytes);
        let path = blob_path(dir, &d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": bytes.len()})
    }

    /// A layout whose `index.json` tags an image index (two platform manifests sharing a
    /// layer) as `v2`; the index's descriptor.
    fn index_layout(dir: &Path) -> serde_json::Value {
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layer = blob(
            dir,
            "application/vnd.oci.image.layer.v1.tar",
            b"shared layer",
        );
        let mut children = Vec::new();
        for arch in ["amd64", "arm64"] {
            let config = blob(
                dir,
                "application/vnd.oci.image.config.v1+json",
                format!("{{\"architecture\":\"{arch}\"}}").as_bytes(),
            );
            let m = serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": config, "layers": [layer]});
            children.push(blob(dir, media::OCI_MANIFEST, m.to_string().as_bytes()));
        }
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX,
            "manifests": children});
        let mut d = blob(dir, media::OCI_INDEX, index.to_string().as_bytes());
        d["annotations"] = serde_json::json!({REF_NAME: "v2"});
        d
    }

    fn write_index(dir: &Path, manifests: &[serde_json::Value]) {
        let top = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        std::fs::write(dir.join("index.json"), top.to_string()).unwrap();
    }

    #[test]
    fn an_image_index_brings_its_children_first_and_their_blobs_once() {
        let dir = tempfile::tempdir().unwrap();
        let top = index_layout(dir.path());
        write_index(dir.path(), std::slice::from_ref(&top));
        let l = Layout::read(dir.path()).unwrap();
        assert_eq!(l.manifests.len(), 3);
        let index = Digest::parse(top["digest"].as_str().unwrap()).unwrap();
        assert_eq!(l.manifests[2].digest, index, "the index after its children");
        assert_eq!(l.manifests[2].media_type, media::OCI_INDEX);
        assert_eq!(l.blobs.len(), 3, "two configs and one shared layer");
        assert_eq!(l.tags.get("v2"), Some(&index));
    }

    #[test]
    fn a_wrong_size_a_bad_tag_or_a_foreign_file_refuses_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut top = index_layout(dir.path());
        top["size"] = serde_json::json!(top["size"].as_u64().unwrap() + 1);
        write_index(dir.path(), std::slice::from_ref(&top));
        let e = Layout::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains("index.json gives sha256:"), "{e}");
        assert!(e.contains("but its file has"), "{e}");

        let mut top = index_layout(dir.path());
        top["annotations"] = serde_json::json!({REF_NAME: "no spaces allowed"});
        write_index(dir.path(), std::slice::from_ref(&top));
        let e = Layout::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains("is not a valid tag"), "{e}");

        let top = index_layout(dir.path());
        write_index(dir.path(), std::slice::from_ref(&top));
        std::fs::write(dir.path().join("blobs/sha256/notes.txt"), b"hi").unwrap();
        let e = Layout::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains("notes.txt: not named by a digest"), "{e}");
    }
}
