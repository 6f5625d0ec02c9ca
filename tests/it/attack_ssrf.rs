//! A hostile upstream tries to make the proxy fetch from an "internal" loopback service and
//! hand the answer to an anonymous client: redirects on manifests, tags, referrers and a cold
//! Range GET (to a loopback address and to `localhost`), and token realms on the internal
//! service's port. Every attempt must end in a `502` with an OCI error, be counted, and the
//! internal service's hit counter must stay at 0. A blob redirect to an allowed target (the
//! host and port of another configured upstream, standing in for a CDN) still works, without a
//! `Referer`.

use crate::support;

use crate::support::hostile;

use hostile::{Hostile, Scripted};
use reqwest::StatusCode;
use support::*;

const REPO: &str = "team/app";

struct World {
    up: Hostile,
    internal: Hostile,
    cdn: Hostile,
    proxy: ProxyProcess,
}

/// A hostile upstream `evil.test`, an internal service (not configured anywhere), and a CDN
/// configured as upstream `cdn.test`.
async fn world() -> World {
    let up = Hostile::start().await;
    let internal = Hostile::start().await;
    internal.on(
        "GET",
        "/internal",
        Scripted::new(200).body("internal secret"),
    );
    internal.on("GET", "/", Scripted::new(200).body("internal secret"));
    internal.on("GET", "/token", Scripted::new(200).body(r#"{"token":"t"}"#));
    let cdn = Hostile::start().await;
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         upstreams:\n  - name: evil.test\n    endpoint: {}\n  - name: cdn.test\n    endpoint: {}\n",
        up.url(),
        cdn.url()
    );
    let proxy = ProxyProcess::start(&yaml).await;
    World {
        up,
        internal,
        cdn,
        proxy,
    }
}

impl World {
    fn internal_targets(&self) -> [String; 2] {
        let port = self.internal.port();
        [
            format!("http://127.0.0.1:{port}/internal"),
            format!("http://localhost:{port}/"),
        ]
    }

    async fn get(&self, path: &str, range: Option<&str>) -> reqwest::Response {
        let mut req = http_client().get(format!("{}/v2/evil.test/{REPO}/{path}", self.proxy.url()));
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        req.send().await.unwrap()
    }

    /// Asserts a refused request: 502, OCI `UNAVAILABLE`, a message naming the refusal, no
    /// internal content.
    async fn assert_refused(&self, path: &str, range: Option<&str>) {
        let resp = self.get(path, range).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{path}");
        assert!(resp.headers().get("docker-content-digest").is_none());
        let text = resp.text().await.unwrap();
        assert!(!text.contains("internal secret"), "{path}: {text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{text}");
    }

    async fn refused_count(&self, outcome: &str) -> f64 {
        metric_value(
            &self.proxy.metrics().await,
            "oci_proxy_upstream_requests_total",
            &[("upstream", "evil.test"), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    }
}

/// The value of one series in a Prometheus text exposition.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_on_manifests_tags_and_referrers_are_never_followed() {
    let w = world().await;
    let digest = sha256_digest(b"anything");
    for target in w.internal_targets() {
        for (method, path) in [
            ("HEAD", format!("/v2/{REPO}/manifests/v1")),
            ("GET", format!("/v2/{REPO}/manifests/v1")),
            ("GET", format!("/v2/{REPO}/manifests/{digest}")),
            ("GET", format!("/v2/{REPO}/tags/list")),
            ("GET", format!("/v2/{REPO}/referrers/{digest}")),
        ] {
            w.up.on(method, &path, Scripted::redirect(302, &target));
        }
        for path in [
            "manifests/v1".to_string(),
            format!("manifests/{digest}"),
            "tags/list".to_string(),
            format!("referrers/{digest}"),
        ] {
            w.assert_refused(&path, None).await;
        }
    }
    assert_eq!(w.internal.hits(), 0, "the internal service was reached");
    assert!(w.refused_count("redirect_refused").await >= 8.0);
    let logs = w.proxy.logs();
    assert!(
        logs.contains("upstream redirect or address refused"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_get_redirected_inside_is_refused() {
    let w = world().await;
    let data = random_bytes(5_000, 11);
    let digest = sha256_digest(&data);
    let path = format!("/v2/{REPO}/blobs/{digest}");
    let [loopback, localhost] = w.internal_targets();
    // A literal loopback address: refused by the redirect check.
    w.up.on("GET", &path, Scripted::redirect(302, &loopback));
    w.assert_refused(&format!("blobs/{digest}"), Some("bytes=0-99"))
        .await;
    w.assert_refused(&format!("blobs/{digest}"), None).await;
    // A name that resolves to loopback: refused when connecting.
    w.up.on("GET", &path, Scripted::redirect(307, &localhost));
    w.assert_refused(&format!("blobs/{digest}"), Some("bytes=0-99"))
        .await;
    assert_eq!(w.internal.hits(), 0, "the internal service was reached");
    assert!(w.refused_count("address_refused").await >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_redirect_to_a_configured_host_is_followed_without_referer() {
    let w = world().await;
    let data = random_bytes(20_000, 12);
    let digest = sha256_digest(&data);
    w.cdn.on(
        "GET",
        "/storage/blob",
        Scripted::new(200).body(data.clone()),
    );
    w.up.on(
        "GET",
        &format!("/v2/{REPO}/blobs/{digest}"),
        Scripted::redirect(307, &format!("{}/storage/blob?sig=abc", w.cdn.url())),
    );
    let resp = w.get(&format!("blobs/{digest}"), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());
    let at_cdn = w.cdn.seen();
    assert_eq!(at_cdn.len(), 1);
    assert!(at_cdn[0].headers.get("referer").is_none(), "Referer sent");
    assert!(w
        .up
        .seen()
        .iter()
        .all(|s| s.headers.get("referer").is_none()));
    assert_eq!(w.internal.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_an_internal_port_is_refused() {
    let w = world().await;
    let port = w.internal.port();
    for realm in [
        format!("http://127.0.0.1:{port}/token"),
        format!("https://127.0.0.1:{port}/token"),
        format!("https://localhost:{port}/token"),
    ] {
        w.up.on(
            "GET",
            &format!("/v2/{REPO}/tags/list"),
            Scripted::new(401).header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"{realm}\",service=\"evil\""),
            ),
        );
        w.assert_refused("tags/list", None).await;
    }
    assert_eq!(
        w.internal.hits(),
        0,
        "the internal token endpoint was reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_server_that_redirects_inside_is_not_followed() {
    let w = world().await;
    // The realm is the upstream's own host and port (trusted), but it redirects inside.
    w.up.on(
        "GET",
        &format!("/v2/{REPO}/tags/list"),
        Scripted::new(401).header(
            "WWW-Authenticate",
            &format!("Bearer realm=\"{}/token\",service=\"evil\"", w.up.url()),
        ),
    );
    let [loopback, _] = w.internal_targets();
    w.up.on("GET", "/token", Scripted::redirect(302, &loopback));
    w.assert_refused("tags/list", None).await;
    assert_eq!(w.up.count("GET", "/token"), 1);
    assert_eq!(w.internal.hits(), 0);
}
