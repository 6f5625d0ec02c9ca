//! Property tests for the client-facing router: hostile input never panics, every accepted
//! request has a safe, validated name and reference, and routes are canonical (routing the
//! canonical path and query again gives the same route).

use http::{Method, StatusCode};
use oci_proxy::protocol::grammar::{is_name_component, is_registry_host};
use oci_proxy::protocol::{route, ErrorCode, Op, Reference, Route};
use proptest::prelude::*;

const DIGEST: &str = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        4 => Just(Method::HEAD),
        1 => Just(Method::POST),
        1 => Just(Method::PUT),
        1 => Just(Method::PATCH),
        1 => Just(Method::DELETE),
        1 => Just(Method::OPTIONS),
        1 => "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)),
    ]
}

/// Segments that are keywords, valid, almost valid, or hostile.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "a",
            "library",
            "alpine",
            "blobs",
            "manifests",
            "tags",
            "list",
            "referrers",
            "uploads",
            "v2",
            "..",
            ".",
            "",
            "%2e%2e",
            "%2E",
            "%2F",
            "a%2fb",
            "localhost:5001",
            "127.0.0.1:5000",
            "Reg-1.io",
            "registry.example.com",
            "a\\b",
            "a\0b",
            "a\nb",
            "é",
            "\u{202e}",
            "A",
            "a..b",
            "a__b",
            "a___b",
            "-a",
            "a-",
            "_a",
            "v1.0",
            ".INVALID_MANIFEST_NAME",
            "sha256:totallywrong",
            DIGEST,
            "sha512:00",
            "latest",
            "sha256-b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
            "?",
            "#",
            "*",
            "~",
            ":",
            "host:",
            ":80",
        ])
        .prop_map(str::to_owned),
        "[a-z0-9._-]{1,12}",
        "[a-zA-Z0-9.:_%-]{0,12}",
        "\\PC{0,10}",
        "(?s).{0,10}",
        (1usize..400).prop_map(|n| "a".repeat(n)),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(vec![
        "/v2/", "/v2/", "/v2/", "/v2", "/v2//", "/V2/", "/", "", "v2/", "/v2/./", "/v2/../",
    ]);
    let suffix = prop::sample::select(vec![
        "",
        "",
        "/tags/list",
        "/manifests/v1",
        "/blobs/",
        "/blobs/uploads/",
        "/referrers/",
        "/",
        "//",
    ]);
    (prefix, prop::collection::vec(segment(), 0..8), suffix)
        .prop_map(|(p, segs, s)| format!("{p}{}{s}", segs.join("/")))
}

fn query() -> impl Strategy<Value = Option<String>> {
    let pair = (
        prop::sample::select(vec!["ns", "n", "last", "artifactType", "x", "", "n%00"]),
        prop_oneof![
            prop::sample::select(vec![
                "",
                "0",
                "1",
                "-1",
                "10",
                "+5",
                "1e3",
                "99999999999999999999999",
                "docker.io",
                "localhost:5001",
                "a/b",
                "..",
                "%2e%2e",
                "a%26b",
                "a+b",
                "%ff%fe",
                "%00",
            ])
            .prop_map(str::to_owned),
            "\\PC{0,12}",
        ],
    )
        .prop_map(|(k, v)| format!("{k}={v}"));
    prop::option::of(prop::collection::vec(pair, 0..5).prop_map(|ps| ps.join("&")))
}

/// The invariants of an accepted request.
fn check_ok(m: &Method, r: &Route) -> Result<(), TestCaseError> {
    prop_assert!(*m == Method::GET || *m == Method::HEAD);
    prop_assert_eq!(r.head, *m == Method::HEAD);
    if r.op == Op::Ping {
        prop_assert_eq!(r.name.as_str(), "");
    } else {
        let segs: Vec<&str> = r.name.split('/').collect();
        for (i, s) in segs.iter().enumerate() {
            prop_assert!(!s.is_empty() && *s != "." && *s != "..", "segment {:?}", s);
            prop_assert!(!s.contains(['%', '\\', '\0', '?', '#']), "segment {:?}", s);
            let ok = is_name_component(s) || (i == 0 && segs.len() > 1 && is_registry_host(s));
            prop_assert!(ok, "segment {:?} of {:?}", s, r.name);
        }
    }
    if let Some(ns) = &r.ns {
        prop_assert!(is_registry_host(ns));
    }
    let digest = match &r.op {
        Op::Manifest(Reference::Digest(d)) | Op::Blob(d) => Some(d),
        Op::Referrers { digest, .. } => Some(digest),
        _ => None,
    };
    if let Some(d) = digest {
        prop_assert!(!d.hex().is_empty());
        prop_assert!(d
            .hex()
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    }
    if let Op::Manifest(Reference::Tag(t)) = &r.op {
        prop_assert!(!t.as_str().starts_with('.') && !t.as_str().contains('/'));
    }
    // Canonical: routing the canonical form again yields the same route.
    let again = route(m, &r.canonical_path(), r.canonical_query().as_deref());
    prop_assert_eq!(again.as_ref(), Ok(r));
    Ok(())
}

fn check(m: &Method, p: &str, q: Option<&str>) -> Result<(), TestCaseError> {
    match route(m, p, q) {
        Ok(r) => check_ok(m, &r)?,
        Err(e) => {
            let status = e.status();
            prop_assert!(
                [
                    StatusCode::BAD_REQUEST,
                    StatusCode::NOT_FOUND,
                    StatusCode::METHOD_NOT_ALLOWED
                ]
                .contains(&status),
                "{status}"
            );
            let under_v2 = p == "/v2" || p.starts_with("/v2/");
            if under_v2 && *m != Method::GET && *m != Method::HEAD {
                prop_assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
                prop_assert!(e.message.contains("read-only"));
            }
            if !under_v2 {
                prop_assert_eq!(status, StatusCode::NOT_FOUND);
                prop_assert_eq!(e.code, ErrorCode::Unsupported);
            }
            // The JSON body always renders.
            let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
            prop_assert_eq!(&body["errors"][0]["code"], e.code.as_str());
        }
    }
    Ok(())
}

fn name_component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}((\\.|_|__|-{1,2})[a-z0-9]{1,6}){0,2}"
}

fn valid_name() -> impl Strategy<Value = String> {
    let keyword_or_component = prop_oneof![
        3 => name_component(),
        1 => prop::sample::select(vec!["blobs", "manifests", "tags", "list", "referrers", "uploads"])
            .prop_map(str::to_owned),
    ];
    let host = prop::option::of(prop::sample::select(vec![
        "localhost:5001",
        "127.0.0.1:5000",
        "Registry-1.Example.com",
        "docker.io",
    ]));
    (host, prop::collection::vec(keyword_or_component, 1..5)).prop_map(|(h, segs)| {
        let name = segs.join("/");
        match h {
            Some(h) => format!("{h}/{name}"),
            None => name,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn structured_hostile_requests(m in method(), p in path(), q in query()) {
        check(&m, &p, q.as_deref())?;
    }

    #[test]
    fn arbitrary_strings(m in method(), p in "\\PC{0,80}", q in prop::option::of("\\PC{0,40}")) {
        check(&m, &p, q.as_deref())?;
        check(&m, &format!("/v2/{p}"), q.as_deref())?;
    }

    #[test]
    fn arbitrary_bytes(m in method(), p in prop::collection::vec(any::<u8>(), 0..120),
                       q in prop::collection::vec(any::<u8>(), 0..60)) {
        let p = String::from_utf8_lossy(&p);
        let q = String::from_utf8_lossy(&q);
        check(&m, &p, Some(&q))?;
        check(&m, &format!("/v2/{p}"), Some(&q))?;
    }

    #[test]
    fn valid_requests_route_as_expected(
        name in valid_name(),
        head in any::<bool>(),
        tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}",
        which in 0u8..4,
        n in prop::option::of(0usize..1000),
    ) {
        let m = if head { Method::HEAD } else { Method::GET };
        let (p, q) = match which {
            0 => (format!("/v2/{name}/manifests/{tag}"), None),
            1 => (format!("/v2/{name}/blobs/{DIGEST}"), None),
            2 => (format!("/v2/{name}/referrers/{DIGEST}"), None),
            _ => (format!("/v2/{name}/tags/list"), n.map(|n| format!("n={n}"))),
        };
        let r = route(&m, &p, q.as_deref());
        prop_assert!(r.is_ok(), "{} {:?}: {:?}", p, q, r);
        let r = r.unwrap();
        prop_assert_eq!(&r.name, &name);
        match (which, &r.op) {
            (0, Op::Manifest(Reference::Tag(t))) => prop_assert_eq!(t.as_str(), tag.as_str()),
            (1, Op::Blob(d)) => prop_assert_eq!(d.to_string(), DIGEST),
            (2, Op::Referrers { digest, artifact_type: None }) => {
                prop_assert_eq!(digest.to_string(), DIGEST)
            }
            (3, Op::Tags { n: got, last: None }) => prop_assert_eq!(*got, n),
            (w, op) => prop_assert!(false, "case {} routed to {:?}", w, op),
        }
        check_ok(&m, &r)?;
        // Every write method is refused on the same path.
        for w in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let e = route(&w, &p, q.as_deref()).unwrap_err();
            prop_assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    #[test]
    fn upload_paths_are_never_routed(name in valid_name(), uuid in "[a-zA-Z0-9-]{0,36}", m in method()) {
        for p in [format!("/v2/{name}/blobs/uploads/{uuid}"), format!("/v2/{name}/blobs/uploads")] {
            let e = route(&m, &p, Some("digest=sha256:00&mount=x")).unwrap_err();
            prop_assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED, "{} {}", m, p);
        }
    }
}
