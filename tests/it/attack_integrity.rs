//! A lying upstream against the rule "a clean end always means verified bytes": Range answers
//! that are not the range asked (a 200 with wrong bytes, a 206 for another range), Range
//! headers that must never go upstream (garbage, several ranges), and manifests whose body does
//! not hash to the upstream's own `Docker-Content-Digest`. Each test asserts what the client
//! receives: the verified bytes, or an error; never a clean 200/206 carrying wrong bytes, and
//! never `Docker-Content-Digest` or a long `Cache-Control` on unverified bytes.

use crate::support;

use crate::support::hostile;

use hostile::{Hostile, Scripted};
use reqwest::StatusCode;
use support::*;

const REPO: &str = "team/app";
const SIZE: usize = 11_000;

/// A proxy in front of `up` as upstream `lying.test`.
async fn proxy_for(up: &Hostile) -> ProxyProcess {
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         upstreams:\n  - name: lying.test\n    endpoint: {}\n",
        up.url()
    );
    ProxyProcess::start(&yaml).await
}

/// A blob the upstream serves correctly in full, and its path.
fn serve_blob(up: &Hostile, seed: u64) -> (Vec<u8>, String, String) {
    let data = random_bytes(SIZE, seed);
    let digest = sha256_digest(&data);
    let path = format!("/v2/{REPO}/blobs/{digest}");
    up.on("GET", &path, Scripted::new(200).body(data.clone()));
    up.on(
        "HEAD",
        &path,
        Scripted::new(200).header("Content-Length", &SIZE.to_string()),
    );
    (data, digest, path)
}

fn inverted(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| !b).collect()
}

async fn get(proxy: &ProxyProcess, path: &str, range: &str) -> reqwest::Response {
    http_client()
        .get(format!("{}/v2/lying.test/{REPO}/{path}", proxy.url()))
        .header("Range", range)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}; proxy log:\n{}", proxy.logs()))
}

/// Asserts a blob answer carries exactly the verified bytes for `range` of `data`: a 206 with
/// the right `Content-Range`, or a 200 of the whole blob.
async fn assert_verified(resp: reqwest::Response, data: &[u8], start: usize, end: usize) {
    let status = resp.status();
    let content_range = resp
        .headers()
        .get("content-range")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.bytes().await.unwrap();
    match status {
        StatusCode::PARTIAL_CONTENT => {
            assert_eq!(
                content_range.as_deref(),
                Some(format!("bytes {start}-{end}/{}", data.len()).as_str())
            );
            assert!(body.as_ref() == &data[start..=end], "206 with wrong bytes");
        }
        StatusCode::OK => assert!(body.as_ref() == data, "200 with wrong bytes"),
        other => panic!("unexpected status {other}"),
    }
}

/// `bytes=0-` answered with a 200 of 11 000 wrong bytes: the client gets the verified blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_wrong_bytes_for_a_range_is_not_passed_through() {
    let up = Hostile::start().await;
    let (data, digest, path) = serve_blob(&up, 1);
    up.on_range(&path, Scripted::new(200).body(inverted(&data)));
    let proxy = proxy_for(&up).await;

    let resp = get(&proxy, &format!("blobs/{digest}"), "bytes=0-").await;
    assert_verified(resp, &data, 0, SIZE - 1).await;
    // A later range is served from the cache, verified.
    let resp = get(&proxy, &format!("blobs/{digest}"), "bytes=10-19").await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_verified(resp, &data, 10, 19).await;
}

/// A 206 for another range than asked (and wrong bytes): the client gets its own range,
/// verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_for_another_range_is_not_passed_through() {
    let up = Hostile::start().await;
    let (data, digest, path) = serve_blob(&up, 2);
    up.on_range(
        &path,
        Scripted::new(206)
            .header("Content-Range", &format!("bytes 0-99/{SIZE}"))
            .body(inverted(&data[..100])),
    );
    let proxy = proxy_for(&up).await;

    let resp = get(&proxy, &format!("blobs/{digest}"), "bytes=100-199").await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_verified(resp, &data, 100, 199).await;
}

/// A 206 with an unparseable or multi-part `Content-Range`: not passed through either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_with_a_bad_content_range_is_not_passed_through() {
    for (seed, content_range) in [(3, "bytes 100-199/*"), (4, "garbage"), (5, "bytes 100-199")] {
        let up = Hostile::start().await;
        let (data, digest, path) = serve_blob(&up, seed);
        up.on_range(
            &path,
            Scripted::new(206)
                .header("Content-Range", content_range)
                .body(inverted(&data[100..200])),
        );
        let proxy = proxy_for(&up).await;
        let resp = get(&proxy, &format!("blobs/{digest}"), "bytes=100-199").await;
        assert_verified(resp, &data, 100, 199).await;
    }
}

/// Garbage and multi-range headers never go upstream: the whole verified blob comes back with
/// 200 (RFC 9110 lets a server ignore such a Range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_range_headers_are_answered_from_the_verified_blob() {
    for (seed, range) in [(6, "garbage"), (7, "bytes=0-1,5-6"), (8, "bytes=5-2")] {
        let up = Hostile::start().await;
        let (data, digest, path) = serve_blob(&up, seed);
        up.on_range(&path, Scripted::new(200).body(inverted(&data)));
        let proxy = proxy_for(&up).await;
        let resp = get(&proxy, &format!("blobs/{digest}"), range).await;
        assert_eq!(resp.status(), StatusCode::OK, "{range}");
        assert_verified(resp, &data, 0, SIZE - 1).await;
        assert_eq!(up.range_requests(&path), 0, "{range} went upstream");
    }
}

/// An upstream that lies on every GET: a Range request ends in an error, never in a clean
/// answer with the wrong bytes, and no error carries `Docker-Content-Digest` or a long
/// `Cache-Control`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_always_lies_gets_no_clean_answer_through() {
    let up = Hostile::start().await;
    let (data, digest, path) = serve_blob(&up, 9);
    up.on("GET", &path, Scripted::new(200).body(inverted(&data)));
    let proxy = proxy_for(&up).await;
    for range in ["bytes=0-", "bytes=0-99", "garbage"] {
        let url = format!("{}/v2/lying.test/{REPO}/blobs/{digest}", proxy.url());
        let Ok(resp) = http_client().get(url).header("Range", range).send().await else {
            // Cut before the head was out: no answer at all, which is not a clean one.
            continue;
        };
        let status = resp.status();
        let h = resp.headers().clone();
        let body = resp.bytes().await;
        let clean = matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT)
            && body.as_ref().is_ok_and(|b| !b.is_empty());
        assert!(!clean, "{range}: a clean {status} from a lying upstream");
        if !status.is_success() {
            assert!(h.get("docker-content-digest").is_none(), "{range}");
            assert!(
                h.get("cache-control")
                    .is_none_or(|v| !v.to_str().unwrap().contains("31536000")),
                "{range}"
            );
        }
    }
}

/// A blob cached from one upstream, asked through another that lies about it: the proxy
/// fetches it again from the liar, hashed as it streams (the cached bytes are not the liar's
/// to hand out), and the client never gets a clean end on the liar's bytes, although they
/// come with a `Content-Length` (a verdict after the last byte would be too late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_cached_from_another_upstream_is_not_a_clean_answer_from_a_liar() {
    let (good, liar) = (Hostile::start().await, Hostile::start().await);
    let (data, digest, path) = serve_blob(&good, 10);
    serve_blob(&liar, 10);
    liar.on("GET", &path, Scripted::new(200).body(inverted(&data)));
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         upstreams:\n  - name: good.test\n    endpoint: {}\n  - name: lying.test\n    endpoint: {}\n",
        good.url(),
        liar.url()
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let url = |upstream: &str| format!("{}/v2/{upstream}/{REPO}/blobs/{digest}", proxy.url());
    let resp = http_client().get(url("good.test")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap().as_ref() == data);
    proxy.wait_fills_committed(1.0).await;

    for _ in 0..3 {
        let Ok(resp) = http_client().get(url("lying.test")).send().await else {
            continue; // no answer at all is not a clean one
        };
        let status = resp.status();
        let body = resp.bytes().await;
        assert!(
            !(status.is_success() && body.is_ok()),
            "a clean {status} with the liar's bytes"
        );
    }
    assert!(liar.count("GET", &path) >= 1, "the liar was asked");
    // The cached bytes still serve the upstream they came from.
    let resp = http_client().get(url("good.test")).send().await.unwrap();
    assert!(resp.bytes().await.unwrap().as_ref() == data);
}

/// A manifest whose body does not hash to the upstream's `Docker-Content-Digest` is refused,
/// by tag and by digest, and nothing is cached: the next request asks the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_docker_content_digest_is_refused() {
    let up = Hostile::start().await;
    let real = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let lie = real.to_vec();
    let claimed = sha256_digest(b"some other manifest");
    let body_digest = sha256_digest(&lie);
    let media = "application/vnd.oci.image.manifest.v1+json";
    let answer = Scripted::new(200)
        .header("Content-Type", media)
        .header("Docker-Content-Digest", &claimed)
        .body(lie);
    // The tag's HEAD names no digest, so the proxy GETs by tag.
    up.on(
        "HEAD",
        &format!("/v2/{REPO}/manifests/v1"),
        Scripted::new(200).header("Content-Type", media),
    );
    up.on("GET", &format!("/v2/{REPO}/manifests/v1"), answer.clone());
    up.on(
        "GET",
        &format!("/v2/{REPO}/manifests/{body_digest}"),
        answer.clone(),
    );
    let proxy = proxy_for(&up).await;

    for reference in ["v1", body_digest.as_str(), "v1"] {
        let resp = http_client()
            .get(format!(
                "{}/v2/lying.test/{REPO}/manifests/{reference}",
                proxy.url()
            ))
            .header("Accept", media)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{reference}");
        assert!(resp.headers().get("docker-content-digest").is_none());
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
        let msg = body["errors"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains("does not match digest") && msg.contains(&claimed),
            "{msg}"
        );
    }
    // Not cached: every request went upstream.
    assert_eq!(up.count("GET", &format!("/v2/{REPO}/manifests/v1")), 2);
    assert_eq!(
        up.count("GET", &format!("/v2/{REPO}/manifests/{body_digest}")),
        1
    );
}
