//! Request path → operation: the client-facing URL grammar of the read-only proxy.
//!
//! This module owns the decision of which endpoint a request addresses and whether its path and
//! query are valid. It is a pure function of the method, the raw (undecoded) path and the raw
//! query; it never does I/O.
//!
//! Rules, in the order they are applied:
//!
//! 1. Paths outside `/v2` → 404 `UNSUPPORTED` "no such endpoint".
//! 2. Any method other than GET/HEAD under `/v2` → 405 `UNSUPPORTED` (the proxy is read-only),
//!    whatever the rest of the path looks like: push, upload and delete requests are refused
//!    before their paths are parsed.
//! 3. `/v2` and `/v2/` → [`Op::Ping`].
//! 4. The rest is parsed from the right, because a repository name may itself contain segments
//!    named `blobs`, `manifests` or `tags`: `<name>/tags/list`, or
//!    `<name>/{manifests,blobs,referrers}/<reference>`. Upload paths
//!    (`<name>/blobs/uploads[/...]`) answer 405 `UNSUPPORTED` even for GET: upload status is a
//!    push-side endpoint the proxy does not offer at all. Anything else → 404.
//! 5. The name is validated segment by segment (see [`validate_name`]); invalid → 400
//!    `NAME_INVALID`. The path is never percent-decoded, so `%2e%2e`, empty segments, `.`, `..`,
//!    backslashes and control characters simply fail the name grammar.
//! 6. The reference: manifests take a tag or a digest (a non-tag → 404 `MANIFEST_UNKNOWN`, as
//!    distribution's router does; a malformed digest → 400 `DIGEST_INVALID`); blobs and
//!    referrers take a digest only (400 `DIGEST_INVALID`).
//! 7. The query (`application/x-www-form-urlencoded`): `ns` (any op, a registry host, else 400
//!    `NAME_INVALID`), `n` and `last` (tags only; `n` a non-negative decimal integer, else 400
//!    `PAGINATION_NUMBER_INVALID`), `artifactType` (referrers only). Empty values count as absent;
//!    for a repeated parameter the first occurrence wins; unknown parameters are ignored.

use http::{Method, StatusCode};

use super::error::{ErrorCode, OciError};
use super::grammar::{
    is_name_component, is_registry_host, truncate, Digest, Reference, MAX_NAME_LEN,
};

/// What the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `GET|HEAD /v2/`
    Ping,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    Manifest(Reference),
    /// `GET|HEAD /v2/<name>/blobs/<digest>`
    Blob(Digest),
    /// `GET /v2/<name>/tags/list[?n=&last=]`
    Tags {
        n: Option<usize>,
        last: Option<String>,
    },
    /// `GET /v2/<name>/referrers/<digest>[?artifactType=]`
    Referrers {
        digest: Digest,
        artifact_type: Option<String>,
    },
}

/// A routed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub op: Op,
    /// True for HEAD.
    pub head: bool,
    /// Everything between `/v2/` and the endpoint keyword, validated: each segment is a name
    /// component, except that the first may be a registry host (`host[:port]`). Empty for Ping.
    pub name: String,
    /// containerd's `ns=` query parameter, validated as a registry host.
    pub ns: Option<String>,
}

impl Route {
    /// The canonical request path for this route, e.g. `/v2/library/alpine/manifests/3.20`.
    /// Routing it again (with [`Route::canonical_query`]) yields an equal `Route`.
    pub fn canonical_path(&self) -> String {
        match &self.op {
            Op::Ping => "/v2/".to_owned(),
            Op::Manifest(r) => format!("/v2/{}/manifests/{r}", self.name),
            Op::Blob(d) => format!("/v2/{}/blobs/{d}", self.name),
            Op::Tags { .. } => format!("/v2/{}/tags/list", self.name),
            Op::Referrers { digest, .. } => format!("/v2/{}/referrers/{digest}", self.name),
        }
    }

    /// The canonical, form-urlencoded query for this route (`ns`, `n`, `last`, `artifactType`),
    /// or `None` when the route carries no query parameters.
    pub fn canonical_query(&self) -> Option<String> {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        let mut any = false;
        if let Some(ns) = &self.ns {
            q.append_pair("ns", ns);
            any = true;
        }
        match &self.op {
            Op::Tags { n, last } => {
                if let Some(n) = n {
                    q.append_pair("n", &n.to_string());
                    any = true;
                }
                if let Some(last) = last {
                    q.append_pair("last", last);
                    any = true;
                }
            }
            Op::Referrers {
                artifact_type: Some(t),
                ..
            } => {
                q.append_pair("artifactType", t);
                any = true;
            }
            _ => {}
        }
        any.then(|| q.finish())
    }
}

/// The endpoint keywords that precede the last path segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Manifests,
    Blobs,
    Referrers,
    Tags,
}

/// Routes a request. `path` is the raw request path (not percent-decoded), `query` the raw
/// query string without the `?`.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, OciError> {
    let rest = match path.strip_prefix("/v2") {
        Some("") => "",
        Some(r) if r.starts_with('/') => &r[1..],
        _ => return Err(no_such_endpoint()),
    };
    let head = if method == Method::GET {
        false
    } else if method == Method::HEAD {
        true
    } else {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            format!("method {method} is not supported: this proxy is read-only"),
        ));
    };
    if rest.is_empty() {
        return Ok(Route {
            op: Op::Ping,
            head,
            name: String::new(),
            ns: Params::parse(query)?.ns,
        });
    }

    let (name, endpoint, last_segment) = split_endpoint(rest)?;
    validate_name(name)?;
    // The reference before the query, so a bad reference is reported whatever the query says.
    let target = match endpoint {
        Endpoint::Manifests => match Reference::parse(last_segment)? {
            Some(r) => Target::Manifest(r),
            None => {
                return Err(OciError::new(
                    ErrorCode::ManifestUnknown,
                    format!("invalid manifest reference {:?}", truncate(last_segment)),
                ))
            }
        },
        Endpoint::Blobs => Target::Blob(Digest::parse(last_segment)?),
        Endpoint::Referrers => Target::Referrers(Digest::parse(last_segment)?),
        Endpoint::Tags => Target::Tags,
    };
    let params = Params::parse(query)?;
    let op = match target {
        Target::Manifest(r) => Op::Manifest(r),
        Target::Blob(d) => Op::Blob(d),
        Target::Referrers(digest) => Op::Referrers {
            digest,
            artifact_type: params.artifact_type,
        },
        Target::Tags => Op::Tags {
            n: params.n()?,
            last: params.last,
        },
    };
    Ok(Route {
        op,
        head,
        name: name.to_owned(),
        ns: params.ns,
    })
}

/// The parsed last segment, before the query is applied.
enum Target {
    Manifest(Reference),
    Blob(Digest),
    Referrers(Digest),
    Tags,
}

/// Splits `<name>/<keyword>/<last>` (the part after `/v2/`) from the right.
fn split_endpoint(rest: &str) -> Result<(&str, Endpoint, &str), OciError> {
    let (before_last, last) = rest.rsplit_once('/').ok_or_else(no_such_endpoint)?;
    let (name, keyword) = before_last.rsplit_once('/').unwrap_or(("", before_last));
    let endpoint = match keyword {
        "manifests" => Endpoint::Manifests,
        "blobs" if last == "uploads" => return Err(uploads_unsupported()),
        "blobs" => Endpoint::Blobs,
        "referrers" => Endpoint::Referrers,
        "tags" if last == "list" => Endpoint::Tags,
        "uploads" if name == "blobs" || name.ends_with("/blobs") => {
            return Err(uploads_unsupported())
        }
        _ => return Err(no_such_endpoint()),
    };
    Ok((name, endpoint, last))
}

/// Validates a repository name as it appears in a client path: `/`-separated name components,
/// of which the first may instead be a registry host (`host[:port]`) when more segments follow.
/// The length limit is distribution's 255 characters for the repository part, plus the host
/// prefix when the first segment is a registry host (itself at most 253 characters).
pub(crate) fn validate_name(name: &str) -> Result<(), OciError> {
    let invalid = || {
        OciError::new(
            ErrorCode::NameInvalid,
            format!("invalid repository name {:?}", truncate(name)),
        )
    };
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    let rest_ok = |r: &str| r.len() <= MAX_NAME_LEN && r.split('/').all(is_name_component);
    let ok = match rest {
        // A single segment must be a repository component (a bare host is no repository).
        None => name.len() <= MAX_NAME_LEN && is_name_component(first),
        Some(r) if is_registry_host(first) => rest_ok(r),
        Some(_) => rest_ok(name),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// The query parameters the router understands.
#[derive(Default)]
struct Params {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Self, OciError> {
        let mut p = Params::default();
        let Some(query) = query else {
            return Ok(p);
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if v.is_empty() {
                continue;
            }
            let slot = match k.as_ref() {
                "ns" => &mut p.ns,
                "n" => &mut p.n,
                "last" => &mut p.last,
                "artifactType" => &mut p.artifact_type,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v.into_owned());
            }
        }
        if let Some(ns) = &p.ns {
            if !is_registry_host(ns) {
                return Err(OciError::new(
                    ErrorCode::NameInvalid,
                    format!("invalid ns parameter {:?}", truncate(ns)),
                ));
            }
        }
        Ok(p)
    }

    /// `n` as a non-negative decimal integer that fits in `usize`.
    fn n(&self) -> Result<Option<usize>, OciError> {
        let Some(n) = &self.n else {
            return Ok(None);
        };
        if !n.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad_n(n));
        }
        n.parse().map(Some).map_err(|_| bad_n(n))
    }
}

fn bad_n(n: &str) -> OciError {
    OciError::new(
        ErrorCode::PaginationNumberInvalid,
        format!("invalid pagination number n={:?}", truncate(n)),
    )
}

fn no_such_endpoint() -> OciError {
    OciError::new(ErrorCode::Unsupported, "no such endpoint").with_status(StatusCode::NOT_FOUND)
}

fn uploads_unsupported() -> OciError {
    OciError::new(
        ErrorCode::Unsupported,
        "blob uploads are not supported: this proxy is read-only",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";

    fn get(path: &str) -> Result<Route, OciError> {
        route(&Method::GET, path, None)
    }

    fn getq(path: &str, q: &str) -> Result<Route, OciError> {
        route(&Method::GET, path, Some(q))
    }

    fn err(r: Result<Route, OciError>) -> (ErrorCode, StatusCode) {
        let e = r.expect_err("expected an error");
        (e.code, e.status())
    }

    fn digest() -> Digest {
        Digest::parse(D).unwrap()
    }

    #[test]
    fn ping() {
        for p in ["/v2", "/v2/"] {
            let r = get(p).unwrap();
            assert_eq!(r.op, Op::Ping);
            assert_eq!(r.name, "");
            assert!(!r.head);
            assert!(route(&Method::HEAD, p, None).unwrap().head);
            assert_eq!(
                err(route(&Method::POST, p, None)),
                (ErrorCode::Unsupported, StatusCode::METHOD_NOT_ALLOWED)
            );
        }
        let r = getq("/v2/", "ns=docker.io").unwrap();
        assert_eq!(r.ns.as_deref(), Some("docker.io"));
    }

    #[test]
    fn manifests() {
        let r = get("/v2/library/alpine/manifests/3.20").unwrap();
        assert_eq!(r.name, "library/alpine");
        assert_eq!(
            r.op,
            Op::Manifest(Reference::Tag(crate::protocol::Tag::parse("3.20").unwrap()))
        );
        let r = route(&Method::HEAD, &format!("/v2/a/manifests/{D}"), None).unwrap();
        assert!(r.head);
        assert_eq!(r.op, Op::Manifest(Reference::Digest(digest())));
    }

    #[test]
    fn invalid_manifest_reference_is_404() {
        for p in [
            "/v2/a/manifests/.INVALID_MANIFEST_NAME",
            "/v2/a/manifests/",
            "/v2/a/manifests/%2e%2e",
            "/v2/a/manifests/..",
            "/v2/a/manifests/a%20b",
        ] {
            assert_eq!(
                err(get(p)),
                (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
                "{p}"
            );
        }
        let long = format!("/v2/a/manifests/{}", "a".repeat(129));
        assert_eq!(err(get(&long)).0, ErrorCode::ManifestUnknown);
    }

    #[test]
    fn invalid_digests_are_400() {
        for p in [
            "/v2/a/manifests/sha256:totallywrong",
            "/v2/a/manifests/sha256:baddigeststring",
            "/v2/a/blobs/sha256:totallywrong",
            "/v2/a/blobs/notadigest",
            "/v2/a/blobs/",
            "/v2/a/referrers/sha256:abc",
            "/v2/a/referrers/latest",
        ] {
            assert_eq!(
                err(get(p)),
                (ErrorCode::DigestInvalid, StatusCode::BAD_REQUEST),
                "{p}"
            );
        }
        let upper = format!(
            "/v2/a/blobs/{}",
            D.to_uppercase().replace("SHA256", "sha256")
        );
        assert_eq!(err(get(&upper)).0, ErrorCode::DigestInvalid);
    }

    #[test]
    fn blobs_and_referrers() {
        let r = get(&format!("/v2/team/app/blobs/{D}")).unwrap();
        assert_eq!(r.op, Op::Blob(digest()));
        assert_eq!(r.name, "team/app");
        let r = getq(
            &format!("/v2/team/app/referrers/{D}"),
            "artifactType=application%2Fvnd.example%2Bjson&artifactType=second",
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Referrers {
                digest: digest(),
                artifact_type: Some("application/vnd.example+json".into())
            }
        );
        assert!(
            route(&Method::HEAD, &format!("/v2/a/referrers/{D}"), None)
                .unwrap()
                .head
        );
    }

    #[test]
    fn names_with_keyword_segments() {
        let r = get("/v2/a/blobs/manifests/manifests/v1").unwrap();
        assert_eq!(r.name, "a/blobs/manifests");
        assert!(matches!(r.op, Op::Manifest(_)));
        let r = get(&format!("/v2/manifests/blobs/{D}")).unwrap();
        assert_eq!(r.name, "manifests");
        assert_eq!(r.op, Op::Blob(digest()));
        let r = get("/v2/tags/list/tags/list").unwrap();
        assert_eq!(r.name, "tags/list");
        assert!(matches!(r.op, Op::Tags { .. }));
        let r = get("/v2/a/tags/manifests/list").unwrap();
        assert_eq!(r.name, "a/tags");
        assert!(matches!(r.op, Op::Manifest(_)));
        let r = get(&format!("/v2/referrers/referrers/referrers/{D}")).unwrap();
        assert_eq!(r.name, "referrers/referrers");
        let r = get("/v2/a/blobs/uploads/manifests/v1").unwrap();
        assert_eq!(r.name, "a/blobs/uploads");
    }

    #[test]
    fn host_prefixed_names() {
        let r = get("/v2/localhost:5001/team/app/manifests/v1").unwrap();
        assert_eq!(r.name, "localhost:5001/team/app");
        let r = get("/v2/Registry-1.Example.com/lib/x/tags/list").unwrap();
        assert_eq!(r.name, "Registry-1.Example.com/lib/x");
        let r = get("/v2/127.0.0.1:5000/x/manifests/v1").unwrap();
        assert_eq!(r.name, "127.0.0.1:5000/x");
        // A host alone is not a repository, and only the first segment may be a host.
        for p in [
            "/v2/localhost:5001/manifests/v1",
            "/v2/a/localhost:5001/manifests/v1",
            "/v2/a/Upper/manifests/v1",
            "/v2/host:123456/x/manifests/v1",
            "/v2/-bad.io/x/manifests/v1",
        ] {
            assert_eq!(
                err(get(p)),
                (ErrorCode::NameInvalid, StatusCode::BAD_REQUEST),
                "{p}"
            );
        }
    }

    #[test]
    fn hostile_names_are_invalid() {
        for p in [
            "/v2//a/manifests/v1",
            "/v2/a//b/manifests/v1",
            "/v2/a/./b/manifests/v1",
            "/v2/a/../b/manifests/v1",
            "/v2/../manifests/v1",
            "/v2/./manifests/v1",
            "/v2/%2e%2e/a/manifests/v1",
            "/v2/a%2fb/manifests/v1",
            "/v2/a\\b/manifests/v1",
            "/v2/a\0b/manifests/v1",
            "/v2/a\nb/manifests/v1",
            "/v2/ä/manifests/v1",
            "/v2/A/manifests/v1",
            "/v2/manifests/v1",
            "/v2/a b/blobs/sha256:00",
        ] {
            assert_eq!(
                err(get(p)),
                (ErrorCode::NameInvalid, StatusCode::BAD_REQUEST),
                "{p:?}"
            );
        }
    }

    #[test]
    fn name_length_limits() {
        let n255 = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(n255.len(), 255);
        assert!(get(&format!("/v2/{n255}/manifests/v1")).is_ok());
        let n256 = format!("{n255}c");
        assert_eq!(
            err(get(&format!("/v2/{n256}/manifests/v1"))).0,
            ErrorCode::NameInvalid
        );
        // A host prefix comes on top of the 255 characters of the repository part.
        let host = format!("{}.io:5000", "h".repeat(60));
        assert!(get(&format!("/v2/{host}/{n255}/manifests/v1")).is_ok());
        assert_eq!(
            err(get(&format!("/v2/{host}/{n256}/manifests/v1"))).0,
            ErrorCode::NameInvalid
        );
    }

    #[test]
    fn tags() {
        let r = get("/v2/a/b/tags/list").unwrap();
        assert_eq!(
            r.op,
            Op::Tags {
                n: None,
                last: None
            }
        );
        let r = getq("/v2/a/b/tags/list", "n=10&last=v1%2B2&foo=bar").unwrap();
        assert_eq!(
            r.op,
            Op::Tags {
                n: Some(10),
                last: Some("v1+2".into())
            }
        );
        let r = getq("/v2/a/tags/list", "n=0&last=").unwrap();
        assert_eq!(
            r.op,
            Op::Tags {
                n: Some(0),
                last: None
            }
        );
        assert!(route(&Method::HEAD, "/v2/a/tags/list", None).unwrap().head);
        for q in [
            "n=-1",
            "n=abc",
            "n=1.5",
            "n=+3",
            "n=99999999999999999999999999",
        ] {
            assert_eq!(
                err(getq("/v2/a/tags/list", q)),
                (ErrorCode::PaginationNumberInvalid, StatusCode::BAD_REQUEST),
                "{q}"
            );
        }
        // n is only interpreted on the tags endpoint.
        assert!(getq("/v2/a/manifests/v1", "n=abc").is_ok());
        assert_eq!(err(get("/v2/a/tags/other")).1, StatusCode::NOT_FOUND);
        assert_eq!(err(get("/v2/a/tags/list/")).1, StatusCode::NOT_FOUND);
    }

    #[test]
    fn ns_parameter() {
        let r = getq("/v2/library/alpine/manifests/3", "ns=docker.io").unwrap();
        assert_eq!(r.ns.as_deref(), Some("docker.io"));
        let r = getq("/v2/x/manifests/3", "ns=localhost%3A5001&ns=other.io").unwrap();
        assert_eq!(r.ns.as_deref(), Some("localhost:5001"));
        for q in ["ns=a/b", "ns=..", "ns=a%00", "ns=-x.io"] {
            assert_eq!(
                err(getq("/v2/x/manifests/3", q)),
                (ErrorCode::NameInvalid, StatusCode::BAD_REQUEST),
                "{q}"
            );
        }
    }

    #[test]
    fn write_methods_are_405_read_only() {
        let paths = [
            "/v2/a/blobs/uploads/".to_owned(),
            "/v2/a/blobs/uploads".to_owned(),
            "/v2/a/blobs/uploads/0b5d-uuid".to_owned(),
            "/v2/a/blobs/uploads/0b5d-uuid?digest=x".to_owned(),
            "/v2/a/manifests/v1".to_owned(),
            format!("/v2/a/blobs/{D}"),
            "/v2/a/tags/list".to_owned(),
            "/v2/_catalog".to_owned(),
            "/v2/INVALID//x".to_owned(),
        ];
        for m in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
            Method::from_bytes(b"FOO").unwrap(),
        ] {
            for p in &paths {
                let e = route(&m, p, Some("mount=x&from=y")).unwrap_err();
                assert_eq!(e.code, ErrorCode::Unsupported, "{m} {p}");
                assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED, "{m} {p}");
                assert!(e.message.contains("read-only"), "{}", e.message);
            }
        }
    }

    #[test]
    fn get_on_upload_paths_is_405() {
        for p in [
            "/v2/a/blobs/uploads/",
            "/v2/a/blobs/uploads",
            "/v2/a/b/blobs/uploads/uuid",
            "/v2/blobs/uploads/uuid",
        ] {
            let e = get(p).unwrap_err();
            assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED, "{p}");
            assert!(e.message.contains("read-only"));
        }
    }

    #[test]
    fn unknown_paths_are_404() {
        for p in [
            "/",
            "/v1/",
            "/v2x",
            "/v2x/a/manifests/v1",
            "/v3/a/manifests/v1",
            "/v2/_catalog",
            "/v2/a",
            "/v2/a/b",
            "/v2/a/tags",
            "/v2/a/unknown/v1",
            "/v2//",
            "",
        ] {
            let e = get(p).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unsupported, "{p}");
            assert_eq!(e.status(), StatusCode::NOT_FOUND, "{p}");
        }
        // Path errors come before query errors.
        assert_eq!(
            err(getq("/v2/a/blobs/bad", "ns=a/b")).0,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            err(getq("/v2/A/tags/list", "n=x")).0,
            ErrorCode::NameInvalid
        );
        // An unknown endpoint is 404 even with an invalid query.
        assert_eq!(
            getq("/v2/_catalog", "ns=a/b&n=x").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        // Outside /v2 the path is not the proxy's, whatever the method.
        assert_eq!(
            route(&Method::DELETE, "/metrics", None)
                .unwrap_err()
                .status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn canonical_round_trip() {
        for (m, p, q) in [
            (Method::GET, "/v2", None),
            (
                Method::HEAD,
                "/v2/localhost:5001/a/manifests/v1",
                Some("ns=x.io"),
            ),
            (
                Method::GET,
                "/v2/a/tags/list",
                Some("last=a+b%26c&n=3&zzz=1"),
            ),
            (
                Method::GET,
                &format!("/v2/a/referrers/{D}") as &str,
                Some("artifactType=a%2Fb"),
            ),
        ] {
            let r = route(&m, p, q).unwrap();
            let again = route(&m, &r.canonical_path(), r.canonical_query().as_deref()).unwrap();
            assert_eq!(r, again);
        }
        let r = getq("/v2/a/tags/list", "last=a b&n=3").unwrap();
        assert_eq!(r.canonical_query().as_deref(), Some("n=3&last=a+b"));
        assert_eq!(get("/v2/a/manifests/v1").unwrap().canonical_query(), None);
    }
}
