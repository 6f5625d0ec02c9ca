//! The digest-verified blob cache, end to end through `oci-proxy serve`: single flight under
//! concurrency, integrity against corrupt or cut-short upstream bodies, fills that outlive their
//! client, stale-if-error for tags, per-repository access to cached content, eviction under
//! `cache.max_size`, restarts over an existing cache dir, HEAD and Range.
//!
//! Upstreams: Debian's distribution 2.8 where a real registry can show the behaviour, and the
//! in-process `FaultyRegistry` for faults a real registry will not produce (and for exact
//! per-path request counts).

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use support::faulty::{blob_path, manifest_path};
use support::*;

/// The upstream name the proxy knows the faulty fixture (or the real registry) by.
const UP: &str = "up.test";
/// Deadline for every condition a test waits on.
const DEADLINE: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Proxy config with one upstream; `cache_extra` lines go under `cache:` (indented by the
/// caller), `upstream_extra` under the upstream entry. The cache lives in `{dir}/cache` unless
/// `cache_dir` is given.
fn config(
    endpoint: &str,
    cache_dir: Option<&Path>,
    cache_extra: &str,
    upstream_extra: &str,
) -> String {
    let dir = cache_dir.map_or_else(|| "{dir}/cache".to_string(), |p| p.display().to_string());
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{dir}\"\n{cache_extra}upstreams:\n  - name: {UP}\n    endpoint: {endpoint}\n{upstream_extra}"
    )
}

/// Starts a faulty upstream serving `data` as a `team/app` blob that answers GETs as
/// `behaviour` says, and a proxy (default config) in front of it. Returns the upstream, the
/// digest, the proxy, the blob's URL at the proxy and its path at the upstream.
async fn cold_blob(
    data: &[u8],
    behaviour: Behaviour,
) -> (FaultyRegistry, String, ProxyProcess, String, String) {
    let reg = FaultyRegistry::start().await;
    let digest = reg.add_blob("team/app", data);
    reg.set_behaviour(&digest, behaviour);
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let url = blob_url(&proxy, "team/app", &digest);
    let path = blob_path("team/app", &digest);
    (reg, digest, proxy, url, path)
}

fn blob_url(proxy: &ProxyProcess, repo: &str, digest: &str) -> String {
    format!("{}/v2/{UP}/{repo}/blobs/{digest}", proxy.url())
}

/// The proxy's `/metrics` text.
async fn metrics(proxy: &ProxyProcess) -> String {
    proxy.metrics().await
}

async fn cache_metric(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&metrics(proxy).await, name, labels)
}

/// Reads a whole body; the first transport error is returned as such.
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// GETs `url` and returns the status and whole body (panics on a transport error).
async fn get_ok(url: &str) -> (StatusCode, Vec<u8>) {
    let resp = http_client().get(url).send().await.expect("GET");
    let status = resp.status();
    (status, read_body(resp).await.expect("read body"))
}

/// Asserts a request does not deliver `want_len` bytes cleanly: the connection fails before
/// the headers, or an error status, or a 200 whose body read fails or comes up short. Never a
/// clean 200 with a full body.
async fn assert_not_served_cleanly(
    sent: reqwest::Result<reqwest::Response>,
    want_len: usize,
    what: &str,
) {
    let Ok(resp) = sent else {
        return; // closed before the headers were out
    };
    if resp.status() != StatusCode::OK {
        assert!(
            resp.status().is_client_error() || resp.status().is_server_error(),
            "{what}: unexpected status {}",
            resp.status()
        );
        return;
    }
    match read_body(resp).await {
        Err(_) => {}
        Ok(body) => assert!(
            body.len() < want_len,
            "{what}: a clean 200 with {} bytes (want an error or a short body)",
            body.len()
        ),
    }
}

/// `cache/blobs/sha256/<hex[..2]>/<hex>.<size>` (see src/cache/store.rs).
/// Waits until `n` fills committed: a client's clean end comes at verification, before the
/// commit (fsync, rename) that makes the next request a hit.
fn committed_path(cache: &Path, digest: &str, size: usize) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    cache
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(format!("{hex}.{size}"))
}

/// Requests `METHOD path` the registry answered 200, from its access log (combined log format:
/// `... "GET /v2/... HTTP/1.1" 200 ...`). A 401 challenge before the authenticated retry is not
/// counted.
fn registry_requests(reg: &Registry, method: &str, path: &str) -> usize {
    let needle = format!("\"{method} {path} ");
    reg.logs()
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("\" 200 "))
        .count()
}

/// The cache's families appear in `/metrics` as documented, `oci_proxy_cache_*`: the cache
/// registers them into the server's registry, which adds the `oci_proxy` namespace once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_metrics_have_their_documented_names() {
    let proxy = ProxyProcess::start(&config("http://127.0.0.1:9", None, "", "")).await;
    let text = metrics(&proxy).await;
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    for want in [
        "oci_proxy_cache_fills_started_total",
        "oci_proxy_cache_fills_committed_total",
        "oci_proxy_cache_fills_running",
        "oci_proxy_cache_evictions_total",
        "oci_proxy_cache_size_bytes",
        "oci_proxy_cache_blobs",
    ] {
        assert!(
            names.contains(&want),
            "{want} missing from /metrics:\n{text}"
        );
    }
    assert!(
        !text.contains("oci_proxy_oci_proxy_"),
        "namespace doubled:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Single flight
// ---------------------------------------------------------------------------------------------

/// 20 concurrent cold GETs: one upstream GET; followers stream bytes while the upstream body is
/// still held; all get the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_make_one_upstream_get_and_followers_stream_early() {
    let data = random_bytes(MIB, 11);
    let (reg, digest, proxy, url, _) = cold_blob(&data, Behaviour::Steps(4)).await;
    let client = http_client();

    // All 20 get their headers while the upstream has sent headers only.
    let resps = join_all((0..20).map(|_| client.get(&url).send())).await;
    let mut resps: Vec<reqwest::Response> = resps.into_iter().map(|r| r.expect("send")).collect();
    for r in &resps {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.content_length(), Some(data.len() as u64));
    }
    let path = blob_path("team/app", &digest);
    assert_eq!(reg.gets(&path), 1, "one upstream GET for 20 clients");

    // First quarter out: every client (19 of them followers) receives bytes before the fill
    // can have completed.
    reg.release(&digest, 1);
    let mut got: Vec<Vec<u8>> = Vec::new();
    for r in &mut resps {
        let first = tokio::time::timeout(DEADLINE, r.chunk())
            .await
            .expect("bytes before the upstream body is complete")
            .expect("chunk")
            .expect("not the end of the body");
        assert!(!first.is_empty());
        got.push(first.to_vec());
    }
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_fills_committed_total", &[]),
        0.0
    );
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_requests_total", &[("outcome", "miss")]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "oci_proxy_cache_requests_total",
            &[("outcome", "coalesced")]
        ),
        19.0
    );

    reg.release(&digest, 3);
    for (r, mut body) in resps.into_iter().zip(got) {
        body.extend(read_body(r).await.expect("rest of the body"));
        assert!(body == data, "a client got wrong bytes");
    }
    assert_eq!(reg.gets(&path), 1);
    // The commit follows the clients' clean end (at verification).
    proxy.wait_fills_committed(1.0).await;
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_fills_started_total", &[]),
        1.0
    );
    // Followers of the same repository join on the fill's own upstream 200: no HEADs.
    assert_eq!(
        reg.heads(&path),
        0,
        "same-repository followers need no HEAD"
    );
}

/// The same against distribution 2.8, counting the blob GETs in its access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_against_distribution_make_one_upstream_get() {
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let data = random_bytes(2 * MIB, 12);
    let digest = push_blob(&reg, None, "team/app", &data).await;
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let url = blob_url(&proxy, "team/app", &digest);
    let path = format!("/v2/team/app/blobs/{digest}");
    assert_eq!(registry_requests(&reg, "GET", &path), 0);

    let results = join_all((0..20).map(|_| get_ok(&url))).await;
    for (status, body) in results {
        assert_eq!(status, StatusCode::OK);
        assert!(body == data, "a client got wrong bytes");
    }
    // distribution writes its access log line when the response is done.
    wait_until(DEADLINE, "the registry logged the blob GET", || async {
        registry_requests(&reg, "GET", &path) >= 1
    })
    .await;
    assert_eq!(
        registry_requests(&reg, "GET", &path),
        1,
        "registry log:\n{}",
        reg.logs()
    );
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_fills_started_total", &[]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Integrity
// ---------------------------------------------------------------------------------------------

/// Wrong bytes of the right length: the client never gets a clean 200, nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_bytes_are_neither_served_cleanly_nor_cached() {
    let data = random_bytes(600_000, 21);
    let (reg, _, proxy, url, path) = cold_blob(&data, Behaviour::WrongBytes).await;

    let sent = http_client().get(&url).send().await;
    assert_not_served_cleanly(sent, data.len(), "wrong bytes").await;
    wait_until(DEADLINE, "the failed fill is counted", || async {
        cache_metric(
            &proxy,
            "oci_proxy_cache_fills_failed_total",
            &[("reason", "digest_mismatch")],
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(
        cache_metric(&proxy, "oci_proxy_cache_fills_committed_total", &[]).await,
        0.0
    );

    // Nothing was kept: the next request goes upstream again (and fails the same way).
    let sent = http_client().get(&url).send().await;
    assert_not_served_cleanly(sent, data.len(), "wrong bytes again").await;
    assert_eq!(reg.gets(&path), 2);
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(
            &m,
            "oci_proxy_cache_fills_failed_total",
            &[("reason", "digest_mismatch")]
        ),
        2.0
    );
    assert_eq!(metric_sum(&m, "oci_proxy_cache_blobs", &[]), 0.0);
}

/// A body cut short: not served cleanly, not cached; once the upstream is healthy the next
/// request fills cleanly and the one after is a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_body_is_not_cached_and_a_clean_refill_is() {
    let data = random_bytes(800_000, 31);
    let (reg, digest, proxy, url, path) = cold_blob(&data, Behaviour::Truncate).await;

    let sent = http_client().get(&url).send().await;
    assert_not_served_cleanly(sent, data.len(), "truncated").await;
    wait_until(DEADLINE, "the failed fill is counted", || async {
        cache_metric(&proxy, "oci_proxy_cache_fills_failed_total", &[]).await == 1.0
    })
    .await;
    assert_eq!(
        cache_metric(&proxy, "oci_proxy_cache_blobs", &[]).await,
        0.0
    );

    reg.set_behaviour(&digest, Behaviour::Correct);
    let (status, body) = get_ok(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    assert_eq!(reg.gets(&path), 2);
    proxy.wait_fills_committed(1.0).await;
    for _ in 0..3 {
        let (status, body) = get_ok(&url).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == data);
    }
    assert_eq!(reg.gets(&path), 2, "served from cache after the clean fill");
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_fills_committed_total", &[]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_requests_total", &[("outcome", "hit")]),
        3.0
    );
}

/// A client that goes away mid-blob does not abort the fill: it commits, and the next request
/// is a hit without a new upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_blob_does_not_abort_the_fill() {
    let data = random_bytes(MIB, 41);
    let (reg, digest, proxy, url, path) = cold_blob(&data, Behaviour::Steps(4)).await;

    let mut resp = http_client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    reg.release(&digest, 1);
    let first = tokio::time::timeout(DEADLINE, resp.chunk())
        .await
        .expect("first bytes")
        .expect("chunk")
        .expect("not the end");
    assert!(!first.is_empty());
    drop(resp); // the client disconnects with 3/4 of the blob still upstream

    reg.release(&digest, 3);
    wait_until(DEADLINE, "the fill commits without its client", || async {
        cache_metric(&proxy, "oci_proxy_cache_fills_committed_total", &[]).await == 1.0
    })
    .await;
    let (status, body) = get_ok(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    assert_eq!(reg.gets(&path), 1, "no second upstream GET");
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_requests_total", &[("outcome", "hit")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_fills_failed_total", &[]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Tags: stale-if-error
// ---------------------------------------------------------------------------------------------

async fn get_manifest(proxy: &ProxyProcess, repo: &str, reference: &str) -> reqwest::Response {
    http_client()
        .get(format!(
            "{}/v2/{UP}/{repo}/manifests/{reference}",
            proxy.url()
        ))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest")
}

/// distribution 2.8: a cached tag is served (with a `Warning`) while the upstream is down; once
/// the tag is deleted upstream, its 404 is authoritative and the tag is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_is_served_while_upstream_is_down_and_upstream_404_wins() {
    let mut reg = Registry::start(RegistryAuth::Anonymous).await;
    let pushed = push_image(&reg, None, "team/app", "v1", &[random_bytes(1000, 51)]).await;
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "    tag_ttl: 0s\n")).await;

    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("warning").is_none());
    assert_eq!(
        resp.bytes().await.expect("body").as_ref(),
        pushed.manifest.as_slice()
    );

    reg.stop();
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK, "stale-if-error");
    let warning = resp.headers()["warning"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(warning.starts_with("299 "), "Warning: {warning}");
    assert_eq!(
        resp.headers()["docker-content-digest"],
        pushed.manifest_digest.as_str()
    );
    assert_eq!(
        resp.bytes().await.expect("body").as_ref(),
        pushed.manifest.as_slice()
    );

    // Back up, with the manifest (and so its tag) deleted: the 404 is the answer.
    reg.restart_with(RegistryAuth::Anonymous).await;
    let del = registry_request(
        &reg.url(),
        None,
        Method::DELETE,
        &format!("/v2/team/app/manifests/{}", pushed.manifest_digest),
        &[],
        None,
    )
    .await;
    assert_eq!(del.status(), StatusCode::ACCEPTED);
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // The deleted tag was forgotten: another outage does not bring it back.
    reg.stop();
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

/// The faulty upstream: 503 and 429 on revalidation also serve the cached tag with a
/// `Warning`; a removed tag (404) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_is_served_on_upstream_503_and_429() {
    let reg = FaultyRegistry::start().await;
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let digest = reg.add_manifest("team/app", "v1", OCI_MANIFEST, manifest);
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "  tag_ttl: 0s\n", "")).await;
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("warning").is_none());

    reg.go_down(Down::Unavailable);
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("warning").is_some(), "Warning on 503");
    assert_eq!(
        resp.bytes().await.expect("body").as_ref(),
        manifest.as_slice()
    );
    reg.go_up().await;

    reg.set_behaviour(&digest, Behaviour::Status(429));
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("warning").is_some(), "Warning on 429");
    reg.set_behaviour(&digest, Behaviour::Correct);

    let heads = reg.heads(&manifest_path("team/app", "v1"));
    assert_eq!(
        heads, 3,
        "tag_ttl 0s: every request revalidated with a HEAD"
    );
    reg.remove_tag("team/app", "v1");
    let resp = get_manifest(&proxy, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // By digest it is immutable and still served from the cache.
    let resp = get_manifest(&proxy, "team/app", &digest).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Repository isolation
// ---------------------------------------------------------------------------------------------

/// A blob cached through `private/a` is served for `other/b` only once the upstream confirms
/// `other/b` holds it (a HEAD), and then without a second GET; also while the fill is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob_is_served_to_another_repository_only_after_upstream_confirms() {
    let reg = FaultyRegistry::start().await;
    let data = random_bytes(500_000, 61);
    let digest = reg.add_blob("private/a", &data);
    reg.set_behaviour(&digest, Behaviour::Steps(2));
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let (path_a, path_b) = (
        blob_path("private/a", &digest),
        blob_path("other/b", &digest),
    );

    // While private/a's fill is streaming, other/b may not follow it.
    let resp_a = http_client()
        .get(blob_url(&proxy, "private/a", &digest))
        .send()
        .await
        .expect("send");
    assert_eq!(resp_a.status(), StatusCode::OK);
    let resp_b = http_client()
        .get(blob_url(&proxy, "other/b", &digest))
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp_b.status(),
        StatusCode::NOT_FOUND,
        "coalesced into another repo's fill"
    );
    reg.release(&digest, 2);
    assert!(read_body(resp_a).await.expect("body") == data);

    // Committed now; other/b still may not read it, by GET or HEAD.
    let (status, _) = get_ok(&blob_url(&proxy, "other/b", &digest)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let resp = http_client()
        .head(blob_url(&proxy, "other/b", &digest))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(reg.gets(&path_b), 0);
    assert!(
        reg.heads(&path_b) >= 3,
        "each refusal was the upstream's answer"
    );

    // The upstream now has it in other/b: served from the cache after one HEAD.
    reg.link_blob("other/b", &digest);
    let heads_before = reg.heads(&path_b);
    let (status, body) = get_ok(&blob_url(&proxy, "other/b", &digest)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    assert_eq!(reg.heads(&path_b), heads_before + 1);
    let (status, _) = get_ok(&blob_url(&proxy, "other/b", &digest)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reg.heads(&path_b),
        heads_before + 1,
        "linked: no more HEADs"
    );
    assert_eq!(reg.gets(&path_b), 0, "never downloaded again");
    assert_eq!(reg.gets(&path_a), 1);
}

// ---------------------------------------------------------------------------------------------
// Eviction
// ---------------------------------------------------------------------------------------------

/// With `max_size` 16 MiB: a 12 MiB blob and five 1 MiB blobs exceed it; the least recently used
/// (the big one, while a client is still downloading it) is evicted and the size comes back under
/// the limit; the open download still completes with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_bounds_the_size_and_open_downloads_of_evicted_blobs_complete() {
    let reg = FaultyRegistry::start().await;
    let big = random_bytes(12 * MIB, 71);
    let big_digest = reg.add_blob("team/app", &big);
    let smalls: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let b = random_bytes(MIB, 72 + i);
            (reg.add_blob("team/app", &b), b)
        })
        .collect();
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "  max_size: 16MiB\n", "")).await;
    let cache_dir = proxy.dir().join("cache");
    let max = 16.0 * MIB as f64;

    let (status, body) = get_ok(&blob_url(&proxy, "team/app", &big_digest)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == big);
    proxy.wait_fills_committed(1.0).await;
    // A slow client: a hit on the big blob, one chunk read, then nothing for a while.
    let mut slow = http_client()
        .get(blob_url(&proxy, "team/app", &big_digest))
        .send()
        .await
        .expect("send");
    assert_eq!(slow.status(), StatusCode::OK);
    let mut slow_body = slow.chunk().await.expect("chunk").expect("bytes").to_vec();

    for (digest, bytes) in &smalls {
        let (status, body) = get_ok(&blob_url(&proxy, "team/app", digest)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(&body == bytes);
    }
    let big_file = committed_path(&cache_dir, &big_digest, big.len());
    wait_until(
        DEADLINE,
        "eviction to bring the cache under max_size",
        || async {
            let m = metrics(&proxy).await;
            metric_sum(&m, "oci_proxy_cache_evictions_total", &[]) > 0.0
                && metric_sum(&m, "oci_proxy_cache_size_bytes", &[]) <= max
        },
    )
    .await;
    assert!(!big_file.exists(), "the LRU blob (the big one) was evicted");
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(&m, "oci_proxy_cache_size_bytes", &[]),
        5.0 * MIB as f64
    );
    assert_eq!(metric_sum(&m, "oci_proxy_cache_blobs", &[]), 5.0);
    let served_hit = metric_sum(
        &m,
        "oci_proxy_cache_served_bytes_total",
        &[("outcome", "hit")],
    );
    // The open download had not read the whole file when it was unlinked: the rest comes from
    // the unlinked file through the descriptor it holds.
    assert!(
        served_hit < big.len() as f64,
        "the slow download already had all {served_hit} bytes out of the file"
    );

    slow_body.extend(read_body(slow).await.expect("the open download completes"));
    assert!(
        slow_body == big,
        "the evicted blob's open download got wrong bytes"
    );
    // The small blobs are still hits.
    let (status, _) = get_ok(&blob_url(&proxy, "team/app", &smalls[4].0)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reg.gets(&blob_path("team/app", &smalls[4].0)), 1);
}

// ---------------------------------------------------------------------------------------------
// Restart
// ---------------------------------------------------------------------------------------------

/// A new proxy on an existing cache dir with the upstream down: committed blobs are served,
/// temp files are gone, a truncated or altered committed file is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_committed_blobs_and_never_serves_damaged_files() {
    let reg = FaultyRegistry::start().await;
    let good = random_bytes(700_000, 81);
    let short = random_bytes(500_000, 82);
    let flipped = random_bytes(300_000, 83);
    let [good_d, short_d, flipped_d] =
        [&good, &short, &flipped].map(|b| reg.add_blob("team/app", b));
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    let cfg = config(&reg.url(), Some(&cache), "", "");

    let mut first = ProxyProcess::start(&cfg).await;
    for (d, b) in [(&good_d, &good), (&short_d, &short), (&flipped_d, &flipped)] {
        let (status, body) = get_ok(&blob_url(&first, "team/app", d)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(&body == b);
    }
    first.wait_fills_committed(3.0).await;
    first.stop();

    // Damage the cache while no proxy runs.
    let stray = cache.join("tmp").join(format!(
        "{}.4242.part",
        good_d.trim_start_matches("sha256:")
    ));
    std::fs::write(&stray, b"half a blob").expect("write stray temp file");
    let short_file = committed_path(&cache, &short_d, short.len());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short_file)
        .expect("open committed file")
        .set_len(short.len() as u64 / 2)
        .expect("truncate");
    let flipped_file = committed_path(&cache, &flipped_d, flipped.len());
    let mut raw = std::fs::read(&flipped_file).expect("read committed file");
    raw[1234] ^= 0x55;
    std::fs::write(&flipped_file, raw).expect("rewrite committed file");
    reg.go_down(Down::Refused);

    let second = ProxyProcess::start(&cfg).await;
    assert!(!stray.exists(), "temp files are removed on open");
    let (status, body) = get_ok(&blob_url(&second, "team/app", &good_d)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == good, "committed blob served after restart");

    let sent = http_client()
        .get(blob_url(&second, "team/app", &short_d))
        .send()
        .await;
    assert_not_served_cleanly(sent, short.len(), "truncated committed file").await;
    let sent = http_client()
        .get(blob_url(&second, "team/app", &flipped_d))
        .send()
        .await;
    assert_not_served_cleanly(sent, flipped.len(), "altered committed file").await;
    wait_until(DEADLINE, "both damaged files dropped", || async {
        !short_file.exists() && !flipped_file.exists()
    })
    .await;
    assert_eq!(
        cache_metric(&second, "oci_proxy_cache_corrupt_blobs_total", &[]).await,
        2.0
    );

    // With the upstream back, they are fetched and verified again.
    reg.go_up().await;
    for (d, b) in [(&short_d, &short), (&flipped_d, &flipped)] {
        let (status, body) = get_ok(&blob_url(&second, "team/app", d)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(&body == b);
        assert_eq!(reg.gets(&blob_path("team/app", d)), 2);
    }
    assert_eq!(reg.gets(&blob_path("team/app", &good_d)), 1);
}

// ---------------------------------------------------------------------------------------------
// HEAD and Range
// ---------------------------------------------------------------------------------------------

/// HEAD on a cold blob: one upstream HEAD, no download, the upstream's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_cold_blob_is_one_upstream_head_and_no_get() {
    let data = random_bytes(400_000, 91);
    let (reg, digest, proxy, _, _) = cold_blob(&data, Behaviour::Correct).await;
    let resp = http_client()
        .head(blob_url(&proxy, "team/app", &digest))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    let path = blob_path("team/app", &digest);
    assert_eq!(reg.heads(&path), 1);
    assert_eq!(reg.gets(&path), 0);
    assert_eq!(
        cache_metric(&proxy, "oci_proxy_cache_fills_started_total", &[]).await,
        0.0
    );
}

/// Range on a hit: 206 with Content-Range, from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_a_hit_is_a_206_from_the_cache() {
    let data = random_bytes(3 * MIB, 101);
    let (reg, digest, proxy, url, _) = cold_blob(&data, Behaviour::Correct).await;
    let (status, body) = get_ok(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    proxy.wait_fills_committed(1.0).await;

    let n = data.len();
    for (range, start, end) in [
        ("bytes=1000-1999".to_string(), 1000, 1999),
        (format!("bytes={}-", n - 10), n - 10, n - 1),
        ("bytes=-5".to_string(), n - 5, n - 1),
        (
            format!("bytes={}-{}", MIB - 3, 2 * MIB + 2),
            MIB - 3,
            2 * MIB + 2,
        ),
    ] {
        let resp = http_client()
            .get(&url)
            .header("Range", &range)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/{n}").as_str()
        );
        let body = read_body(resp).await.expect("body");
        assert!(body == data[start..=end], "{range}: wrong bytes");
    }
    assert_eq!(reg.gets(&blob_path("team/app", &digest)), 1);
    assert_eq!(
        cache_metric(
            &proxy,
            "oci_proxy_cache_requests_total",
            &[("outcome", "hit")]
        )
        .await,
        4.0
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream errors and stalls on blob fills
// ---------------------------------------------------------------------------------------------

/// Error statuses on a blob fill reach the client as OCI errors and are not cached: the next
/// request goes upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_statuses_on_a_fill_are_passed_on_and_not_cached() {
    let data = random_bytes(200_000, 111);
    let (reg, digest, proxy, url, path) = cold_blob(&data, Behaviour::Correct).await;

    for (upstream, want, code) in [
        (500, StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
        (503, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        (429, StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
    ] {
        reg.set_behaviour(&digest, Behaviour::Status(upstream));
        let resp = http_client().get(&url).send().await.expect("send");
        assert_eq!(resp.status(), want, "upstream {upstream}");
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["errors"][0]["code"], code, "upstream {upstream}");
    }
    assert_eq!(reg.gets(&path), 3, "errors are not cached");
    reg.set_behaviour(&digest, Behaviour::Correct);
    let (status, body) = get_ok(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    // The commit follows the client's clean end (at verification).
    proxy.wait_fills_committed(1.0).await;
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_sum(
            &m,
            "oci_proxy_cache_fills_failed_total",
            &[("reason", "upstream_error")]
        ),
        3.0
    );
}

/// A 429 on a blob fill keeps the upstream's `Retry-After`, as it does for manifests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_on_a_blob_fill_keeps_retry_after() {
    let reg = FaultyRegistry::start().await;
    let digest = reg.add_blob("team/app", &random_bytes(1000, 121));
    reg.set_behaviour(&digest, Behaviour::Status(429));
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let resp = http_client()
        .get(blob_url(&proxy, "team/app", &digest))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "the fixture sends Retry-After: 1"
    );
}

/// An upstream body that stalls does not hold the digest forever: the fill fails once the
/// upstream read times out (`limits.upstream_timeout`), its clients get an error, and the next
/// request starts a new fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_body_fails_the_fill_and_frees_the_digest() {
    let reg = FaultyRegistry::start().await;
    let data = random_bytes(600_000, 131);
    let digest = reg.add_blob("team/app", &data);
    reg.set_behaviour(&digest, Behaviour::Stall);
    let cfg = format!(
        "limits:\n  upstream_timeout: 1s\n{}",
        config(&reg.url(), None, "", "")
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let url = blob_url(&proxy, "team/app", &digest);

    let sent = http_client().get(&url).send().await;
    assert_not_served_cleanly(sent, data.len(), "stalled upstream").await;
    assert_eq!(
        cache_metric(
            &proxy,
            "oci_proxy_cache_fills_failed_total",
            &[("reason", "upstream_error")]
        )
        .await,
        1.0
    );
    reg.set_behaviour(&digest, Behaviour::Correct);
    let (status, body) = get_ok(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    assert_eq!(reg.gets(&blob_path("team/app", &digest)), 2);
}

/// The same rule against distribution 2.8 with token auth: the proxy's user may pull
/// `private/a` only. A blob cached through `private/a` is refused for `other/b` (the registry
/// refuses the confirming HEAD) until the user is granted `other/b`; then it is served from the
/// cache with a HEAD and no GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob_needs_the_users_access_to_the_other_repository_on_distribution() {
    const USER: &str = "alice";
    const PASSWORD: &str = "alice-secret-pw";
    let (tokens, reg) = token_registry(TokenPolicy::puller(USER, PASSWORD, "private/a")).await;
    let admin = ADMIN;
    let data = random_bytes(300_000, 141);
    let digest = push_blob(&reg, admin, "private/a", &data).await;
    push_blob(&reg, admin, "other/b", &data).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let docker_config = dir.path().join("config.json");
    write_docker_config(&docker_config, UP, USER, PASSWORD);
    let cfg = format!(
        "{}credentials:\n  docker_config: \"{}\"\n",
        config(&reg.url(), None, "", ""),
        docker_config.display()
    );
    let proxy = ProxyProcess::start(&trust_registry_realm(&cfg, &reg)).await;
    let path_b = format!("/v2/other/b/blobs/{digest}");

    let (status, body) = get_ok(&blob_url(&proxy, "private/a", &digest)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    let resp = http_client()
        .get(blob_url(&proxy, "other/b", &digest))
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "no access to other/b"
    );

    tokens.update_policy(|p| {
        p.grants
            .entry(USER.to_string())
            .or_default()
            .insert("other/b".to_string(), ["pull".to_string()].into());
    });
    let (status, body) = get_ok(&blob_url(&proxy, "other/b", &digest)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    wait_until(
        DEADLINE,
        "the registry logged the confirming HEAD",
        || async { registry_requests(&reg, "HEAD", &path_b) >= 1 },
    )
    .await;
    assert_eq!(
        registry_requests(&reg, "GET", &path_b),
        0,
        "served from the cache, never downloaded for other/b"
    );
    assert_eq!(
        registry_requests(&reg, "GET", &format!("/v2/private/a/blobs/{digest}")),
        1
    );
}

/// A Range request for a blob not cached yet is answered from the upstream with the same
/// Range at once, while one background fill lands the whole blob; later requests are hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_a_cold_blob_is_prompt_and_the_whole_blob_is_cached_once() {
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let data = random_bytes(3 * MIB, 141);
    let digest = push_blob(&reg, None, "team/app", &data).await;
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let url = blob_url(&proxy, "team/app", &digest);
    let resp = http_client()
        .get(&url)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1999/{}", 3 * MIB).as_str()
    );
    assert_eq!(
        resp.bytes().await.expect("body").as_ref(),
        &data[1000..2000]
    );
    wait_until(DEADLINE, "the background fill commits", || {
        let proxy = &proxy;
        async move {
            let m = metrics(proxy).await;
            metric_sum(&m, "oci_proxy_cache_fills_committed_total", &[]) == 1.0
        }
    })
    .await;
    let path = format!("/v2/team/app/blobs/{digest}");
    // One full GET for the fill (the ranged GET is answered 206, not counted as 200).
    assert_eq!(registry_requests(&reg, "GET", &path), 1);
    let resp = http_client()
        .get(&url)
        .header("Range", "bytes=5-9")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &data[5..10]);
    assert_eq!(
        registry_requests(&reg, "GET", &path),
        1,
        "the second range is a hit"
    );
}

/// A manifest fetched by digest is verified before it is served or cached: an upstream that
/// serves other bytes for the digest gets a 502, and nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_with_wrong_bytes_for_its_digest_is_refused() {
    let reg = FaultyRegistry::start().await;
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let digest = reg.add_manifest("team/app", "v1", OCI_MANIFEST, manifest);
    reg.set_behaviour(&digest, Behaviour::WrongBytes);
    let proxy = ProxyProcess::start(&config(&reg.url(), None, "", "")).await;
    let resp = get_manifest(&proxy, "team/app", &digest).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = resp.json().await.expect("json error body");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("does not match digest"), "{message}");
    // Nothing was cached: once the upstream serves the right bytes they are fetched again.
    reg.set_behaviour(&digest, Behaviour::Correct);
    let resp = get_manifest(&proxy, "team/app", &digest).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &manifest[..]);
    assert_eq!(reg.gets(&manifest_path("team/app", &digest)), 2);
}
