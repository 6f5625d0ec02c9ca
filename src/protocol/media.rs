//! Manifest media types and `Accept` negotiation.
//!
//! This module owns the list of media types the proxy asks upstreams for and the rule that
//! decides whether a (cached) manifest of some media type may be served to a client, given the
//! client's `Accept` headers. The proxy never converts manifests: it serves the exact stored
//! bytes or refuses with `MANIFEST_UNKNOWN` (the caller's job), as distribution does.
//!
//! It also owns what a manifest references ([`ManifestRefs`]): the child manifests of an
//! index and the blobs of an image, for everything that walks an image without a client
//! (`prewarm`, `import`, `resolve`'s cache report).

use std::collections::BTreeMap;

use serde::Deserialize;

/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (schema 2 "fat manifest").
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest schema 2.
pub(crate) const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Legacy Docker schema 1, signed (JWS).
pub(crate) const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Legacy Docker schema 1, unsigned.
pub(crate) const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Every manifest media type the proxy recognises.
pub(crate) const MANIFEST_TYPES: [&str; 6] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_V1_SIGNED,
    DOCKER_MANIFEST_V1,
];

/// The `Accept` header value the proxy sends upstream for manifests: both index types and both
/// image manifest types. Including Docker schema 2 keeps docker-registry 2.8 from rewriting a
/// schema 2 manifest to schema 1 ("to support old client"), and including both list types
/// keeps it from resolving a tag to the `linux/amd64` entry of a list. The proxy then applies
/// the client's own `Accept` with [`accepts`] before serving.
pub(crate) const UPSTREAM_MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The media type without parameters and surrounding whitespace:
/// `"application/json; charset=utf-8"` → `"application/json"`.
pub(crate) fn essence(media_type: &str) -> &str {
    media_type
        .split_once(';')
        .map_or(media_type, |(t, _)| t)
        .trim()
}

/// Whether a client whose `Accept` header values are `accept_values` accepts `media_type`.
///
/// Every header value is comma-split; parameters (including `q=`) are ignored, as distribution
/// does; comparison is case-insensitive; `*/*` matches everything and `type/*` every subtype
/// of `type`.
///
/// No `Accept` header (or only empty values) accepts everything. RFC 9110 §12.5.1 says a
/// request without `Accept` accepts any media type, and the proxy only ever serves the exact
/// manifest bytes with their true `Content-Type`, so a client that expressed no preference
/// (curl, scripts, simple HTTP libraries) gets the manifest and can inspect its type.
/// distribution is stricter here (it 404s OCI manifests to clients without an OCI `Accept`)
/// only to protect old Docker clients from formats they cannot parse, and those always send
/// an explicit `Accept`, which this function honours.
pub(crate) fn accepts(accept_values: &[&str], media_type: &str) -> bool {
    let wanted = essence(media_type);
    let (w_type, w_sub) = wanted.split_once('/').unwrap_or((wanted, ""));
    let mut any = false;
    for range in accept_values.iter().flat_map(|v| v.split(',')) {
        let range = essence(range);
        if range.is_empty() {
            continue;
        }
        any = true;
        let matched = match range.split_once('/') {
            Some(("*", "*")) => true,
            Some((t, "*")) => t.eq_ignore_ascii_case(w_type),
            Some((t, s)) => t.eq_ignore_ascii_case(w_type) && s.eq_ignore_ascii_case(w_sub),
            None => false,
        };
        if matched {
            return true;
        }
    }
    !any
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
    signatures: Option<serde::de::IgnoredAny>,
}

fn probe(body: &[u8]) -> Option<Probe> {
    serde_json::from_slice(body).ok()
}

/// The manifest's own `mediaType` field, if the body is a JSON object that has a string one.
pub(crate) fn manifest_media_type(body: &[u8]) -> Option<String> {
    probe(body)?.media_type.filter(|t| !t.is_empty())
}

/// The manifest's media type: its `mediaType` field, or else a guess from its structure for
/// manifests that omit it (schema 1 with or without `signatures`; schema 2 with `manifests` is
/// an OCI index, with `config` an OCI manifest). For when the upstream `Content-Type` is
/// missing or generic.
pub(crate) fn infer_manifest_media_type(body: &[u8]) -> Option<String> {
    let p = probe(body)?;
    if let Some(t) = p.media_type.filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let guess = match p.schema_version? {
        1 if p.signatures.is_some() => DOCKER_MANIFEST_V1_SIGNED,
        1 => DOCKER_MANIFEST_V1,
        2 if p.manifests.is_some() => OCI_INDEX,
        2 if p.config.is_some() => OCI_MANIFEST,
        _ => return None,
    };
    Some(guess.to_owned())
}

/// Whether `media_type` (parameters ignored, case-insensitive) is a manifest media type.
pub(crate) fn is_manifest_type(media_type: &str) -> bool {
    let t = essence(media_type);
    MANIFEST_TYPES.iter().any(|m| m.eq_ignore_ascii_case(t))
}

/// Whether `media_type` is an index (OCI index or Docker manifest list).
pub(crate) fn is_index_type(media_type: &str) -> bool {
    let t = essence(media_type);
    t.eq_ignore_ascii_case(OCI_INDEX) || t.eq_ignore_ascii_case(DOCKER_MANIFEST_LIST)
}

/// A content descriptor (OCI image spec), as far as the proxy reads one.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    /// Non-distributable content lives at these URLs; a client never asks the registry for it.
    #[serde(default)]
    pub(crate) urls: Vec<String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// What an image index or manifest references (OCI or Docker schema 2; schema 1's
/// `fsLayers`): child manifests, config and layers.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManifestRefs {
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
    #[serde(default)]
    pub(crate) config: Option<Descriptor>,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
    /// Docker schema 1.
    #[serde(default)]
    fs_layers: Vec<FsLayer>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FsLayer {
    blob_sum: String,
}

impl ManifestRefs {
    pub(crate) fn parse(body: &[u8]) -> Result<ManifestRefs, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The blobs a client pulls from the registry for this manifest: the config and every
    /// distributable layer (schema 1: every `blobSum`).
    pub(crate) fn blob_digests(&self) -> Vec<&str> {
        self.config
            .iter()
            .chain(&self.layers)
            .filter(|d| d.urls.is_empty())
            .map(|d| d.digest.as_str())
            .chain(self.fs_layers.iter().map(|l| l.blob_sum.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

    #[test]
    fn upstream_accept_lists_the_four_modern_types() {
        let listed: Vec<&str> = UPSTREAM_MANIFEST_ACCEPT.split(',').map(str::trim).collect();
        assert_eq!(
            listed,
            [
                OCI_INDEX,
                OCI_MANIFEST,
                DOCKER_MANIFEST_LIST,
                DOCKER_MANIFEST_V2
            ]
        );
        for t in MANIFEST_TYPES {
            let modern = t != DOCKER_MANIFEST_V1 && t != DOCKER_MANIFEST_V1_SIGNED;
            assert_eq!(accepts(&[UPSTREAM_MANIFEST_ACCEPT], t), modern, "{t}");
        }
    }

    #[test]
    fn absent_or_empty_accept_accepts_everything() {
        assert!(accepts(&[], OCI_MANIFEST));
        assert!(accepts(&[""], OCI_INDEX));
        assert!(accepts(&[" , ", ""], DOCKER_MANIFEST_V1_SIGNED));
    }

    #[test]
    fn exact_match_across_values_and_commas() {
        // conformance v1.1.1
        assert!(accepts(&[OCI_MANIFEST], OCI_MANIFEST));
        assert!(!accepts(&[OCI_MANIFEST], OCI_INDEX));
        // several header values, one type each (new conformance)
        assert!(accepts(&[OCI_INDEX, OCI_MANIFEST], OCI_MANIFEST));
        // ggcr image fetch: no index types
        let ggcr = [DOCKER_MANIFEST_V2, OCI_MANIFEST];
        assert!(!accepts(&ggcr, DOCKER_MANIFEST_LIST));
        assert!(accepts(&ggcr, DOCKER_MANIFEST_V2));
        assert!(accepts(&[CONTAINERD], OCI_INDEX));
    }

    #[test]
    fn parameters_case_and_wildcards() {
        assert!(accepts(
            &["application/vnd.oci.image.manifest.v1+json; q=0.5"],
            OCI_MANIFEST
        ));
        assert!(accepts(
            &["Application/VND.OCI.Image.Manifest.v1+JSON"],
            OCI_MANIFEST
        ));
        assert!(accepts(
            &[OCI_MANIFEST],
            "application/vnd.oci.image.manifest.v1+json; x=y"
        ));
        assert!(accepts(&["*/*"], DOCKER_MANIFEST_V1));
        assert!(accepts(&["text/plain, */*;q=0.1"], OCI_INDEX));
        assert!(accepts(&["application/*"], OCI_INDEX));
        assert!(!accepts(&["text/*"], OCI_INDEX));
        assert!(!accepts(&["application/json"], OCI_INDEX));
        assert!(!accepts(&["garbage"], OCI_INDEX));
        assert!(!accepts(&["*"], OCI_INDEX));
    }

    #[test]
    fn media_type_from_body() {
        let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert_eq!(
            manifest_media_type(body.as_bytes()).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(manifest_media_type(br#"{"schemaVersion":2}"#), None);
        assert_eq!(manifest_media_type(br#"{"mediaType":5}"#), None);
        assert_eq!(manifest_media_type(br#"{"mediaType":""}"#), None);
        assert_eq!(manifest_media_type(b"not json"), None);
        assert_eq!(manifest_media_type(b"[1,2]"), None);
        assert_eq!(manifest_media_type(b""), None);
    }

    #[test]
    fn inferred_media_type() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (br#"{"schemaVersion":2,"config":{},"layers":[]}"#, Some(OCI_MANIFEST)),
            (br#"{"schemaVersion":2,"manifests":[]}"#, Some(OCI_INDEX)),
            (br#"{"schemaVersion":1,"name":"a","signatures":[]}"#, Some(DOCKER_MANIFEST_V1_SIGNED)),
            (br#"{"schemaVersion":1,"name":"a"}"#, Some(DOCKER_MANIFEST_V1)),
            (br#"{"schemaVersion":3}"#, None),
            (
                br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{}}"#,
                Some(DOCKER_MANIFEST_V2),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(infer_manifest_media_type(body).as_deref(), want);
        }
    }

    #[test]
    fn manifest_types() {
        for t in MANIFEST_TYPES {
            assert!(is_manifest_type(t), "{t}");
        }
        assert!(is_manifest_type(
            "application/vnd.oci.image.index.v1+json; charset=utf-8"
        ));
        assert!(!is_manifest_type("application/octet-stream"));
        assert!(!is_manifest_type("application/json"));
        assert!(!is_manifest_type(""));
        assert!(is_index_type(DOCKER_MANIFEST_LIST));
        assert!(is_index_type(OCI_INDEX));
        assert!(!is_index_type(OCI_MANIFEST));
        assert_eq!(
            essence(" application/json ; charset=utf-8"),
            "application/json"
        );
    }

    #[test]
    fn blobs_are_config_and_distributable_layers() {
        let doc = ManifestRefs::parse(
            br#"{"config":{"digest":"c","size":1},"layers":[{"digest":"l1","size":1},{"digest":"f","size":1,"urls":["https://x"]},{"digest":"l2","size":1}]}"#,
        )
        .unwrap();
        assert_eq!(doc.blob_digests(), ["c", "l1", "l2"]);
        let v1 = ManifestRefs::parse(br#"{"fsLayers":[{"blobSum":"a"},{"blobSum":"b"}]}"#).unwrap();
        assert_eq!(v1.blob_digests(), ["a", "b"]);
    }
}
