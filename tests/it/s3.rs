//! Two oci-proxy replicas (separate cache dirs) sharing one bucket on a real S3-compatible
//! server (moto, see `tests/support/s3.rs`) in front of a real distribution registry.
//! Upstream GETs are counted in the registry's access log.
//!
//! Without moto installed these tests print why and pass, unless `CI` is set: then they fail.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectStore;
use reqwest::StatusCode;
use support::s3::Moto;
use support::{
    assert_success, http_client, metric_value, push_image, random_bytes, skopeo_copy, wait_until,
    DirImage, ProxyProcess, PushedImage, Registry, RegistryAuth,
};

const UPSTREAM: &str = "shared.test";
const REPO: &str = "team/app";
const BUCKET: &str = "oci-cache";
const PREFIX: &str = "replicas/";
const DEADLINE: Duration = Duration::from_secs(20);

fn config(reg: &Registry, moto: &Moto) -> String {
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n  backend: s3\n  s3:\n    \
         bucket: {BUCKET}\n    prefix: {PREFIX}\n    endpoint: {}\n    region: us-east-1\n    \
         allow_http: true\n    lease_ttl: 30s\nupstreams:\n  - name: {UPSTREAM}\n    endpoint: {}\n",
        moto.endpoint(),
        reg.url()
    )
}

struct Setup {
    moto: Moto,
    reg: Registry,
    image: PushedImage,
    a: ProxyProcess,
    b: ProxyProcess,
}

async fn setup() -> Option<Setup> {
    let moto = Moto::start().await?;
    moto.create_bucket(BUCKET).await;
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let layers = vec![random_bytes(1_500_000, 11), random_bytes(200_000, 12)];
    let image = push_image(&reg, None, REPO, "v1", &layers).await;
    let cfg = config(&reg, &moto);
    let a = ProxyProcess::start_with_env(&cfg, &moto.env()).await;
    let b = ProxyProcess::start_with_env(&cfg, &moto.env()).await;
    Some(Setup {
        moto,
        reg,
        image,
        a,
        b,
    })
}

/// Upstream GETs of `/v2/team/app/<kind>/<digest>` in the registry's access log.
fn upstream_gets(reg: &Registry, kind: &str, digest: &str) -> usize {
    let path = format!("/v2/{REPO}/{kind}/{digest}");
    reg.logs()
        .lines()
        .filter(|l| l.contains(&format!("\"GET {path} ")) || l.contains(&format!("\"GET {path}\"")))
        .count()
}

async fn get_blob(proxy: &ProxyProcess, digest: &str) -> (StatusCode, Bytes) {
    let r = http_client()
        .get(format!(
            "{}/v2/{UPSTREAM}/{REPO}/blobs/{digest}",
            proxy.url()
        ))
        .send()
        .await
        .expect("blob request");
    let status = r.status();
    (status, r.bytes().await.expect("blob body"))
}

fn sha256(b: &[u8]) -> String {
    support::sha256_digest(b)
}

fn blob_key(digest: &str) -> Path {
    let hex = digest.trim_start_matches("sha256:");
    Path::from(format!("{PREFIX}blobs/sha256/{hex}"))
}

async fn wait_for_object(moto: &Moto, key: &Path) {
    let store = moto.store(BUCKET);
    wait_until(DEADLINE, &format!("{key} in the bucket"), || {
        let store = &store;
        async move { store.head(key).await.is_ok() }
    })
    .await;
}

/// The proxy's sample written exactly as `name_and_labels`, 0 when absent.
async fn metric(proxy: &ProxyProcess, name_and_labels: &str) -> f64 {
    metric_value(&proxy.metrics().await, name_and_labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_pulled_through_one_replica_is_served_by_the_other_without_an_upstream_get() {
    let Some(s) = setup().await else { return };
    let layer = s.image.layer_digests[0].clone();

    let (st, body) = get_blob(&s.a, &layer).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body), layer);
    wait_for_object(&s.moto, &blob_key(&layer)).await;
    assert_eq!(upstream_gets(&s.reg, "blobs", &layer), 1);

    let (st, body) = get_blob(&s.b, &layer).await;
    assert_eq!(st, StatusCode::OK, "{}", s.b.logs());
    assert_eq!(sha256(&body), layer);
    assert_eq!(
        upstream_gets(&s.reg, "blobs", &layer),
        1,
        "replica B filled from the bucket"
    );
    assert_eq!(
        metric(&s.b, "oci_proxy_cache_tier_total{tier=\"shared\"}").await,
        1.0
    );

    // A manifest by digest, too: stored verified in the bucket by A, read from it by B.
    let md = s.image.manifest_digest.clone();
    let url = |p: &ProxyProcess| format!("{}/v2/{UPSTREAM}/{REPO}/manifests/{md}", p.url());
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let r = http_client()
        .get(url(&s.a))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mkey = Path::from(format!(
        "{PREFIX}manifests/sha256/{}",
        md.trim_start_matches("sha256:")
    ));
    wait_for_object(&s.moto, &mkey).await;
    let r = http_client()
        .get(url(&s.b))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        s.image.manifest.as_slice()
    );
    assert_eq!(upstream_gets(&s.reg, "manifests", &md), 1);
}

/// Upstream requests of any method for `/v2/team/app/blobs/<digest>`.
fn upstream_blob_requests(reg: &Registry, digest: &str) -> usize {
    let path = format!("/v2/{REPO}/blobs/{digest}");
    reg.logs()
        .lines()
        .filter(|l| l.contains(&format!(" {path} ")) || l.contains(&format!(" {path}\"")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_and_ranges_of_a_blob_only_in_the_bucket_are_answered_from_the_bucket() {
    let Some(s) = setup().await else { return };
    let layer = s.image.layer_digests[0].clone();
    let (st, body) = get_blob(&s.a, &layer).await;
    assert_eq!(st, StatusCode::OK);
    wait_for_object(&s.moto, &blob_key(&layer)).await;
    // A's link of the repository to the blob, which B needs to answer without upstream.
    let repo = sha256(format!("{UPSTREAM}/{REPO}").as_bytes());
    let link = Path::from(format!(
        "{PREFIX}links/{}/sha256/{}",
        repo.trim_start_matches("sha256:"),
        layer.trim_start_matches("sha256:")
    ));
    wait_for_object(&s.moto, &link).await;
    let before = upstream_blob_requests(&s.reg, &layer);
    let url = format!("{}/v2/{UPSTREAM}/{REPO}/blobs/{layer}", s.b.url());

    let r = http_client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", s.b.logs());
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        body.len().to_string()
    );
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        layer
    );

    let r = http_client()
        .get(&url)
        .header("range", "bytes=1000-200999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 1000-200999/{}", body.len())
    );
    assert_eq!(r.bytes().await.unwrap(), body.slice(1000..201_000));

    let r = http_client()
        .get(&url)
        .header("range", format!("bytes={}-", body.len() + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{}", body.len())
    );

    assert_eq!(
        upstream_blob_requests(&s.reg, &layer),
        before,
        "no upstream HEAD or GET for B; B:\n{}",
        s.b.logs()
    );
    assert!(
        metric(
            &s.b,
            "oci_proxy_cache_shared_ops_total{op=\"get_range\",result=\"ok\"}"
        )
        .await
            >= 1.0
    );
    // The range requests also started a verified fill from the bucket: B now has it locally.
    let (b, layer2) = (&s.b, &layer);
    wait_until(
        DEADLINE,
        "B filled the blob from the bucket",
        || async move {
            metric(b, "oci_proxy_cache_tier_total{tier=\"shared\"}").await >= 2.0
                && get_blob(b, layer2).await.0 == StatusCode::OK
        },
    )
    .await;
    assert_eq!(upstream_blob_requests(&s.reg, &layer), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_through_both_replicas_cause_one_upstream_get() {
    let Some(s) = setup().await else { return };
    let layer = s.image.layer_digests[0].clone();
    let ((sa, ba), (sb, bb)) = tokio::join!(get_blob(&s.a, &layer), get_blob(&s.b, &layer));
    assert_eq!((sa, sb), (StatusCode::OK, StatusCode::OK));
    assert_eq!(sha256(&ba), layer);
    assert_eq!(sha256(&bb), layer);
    assert_eq!(
        upstream_gets(&s.reg, "blobs", &layer),
        1,
        "one upstream GET across replicas; A:\n{}\nB:\n{}",
        s.a.logs(),
        s.b.logs()
    );
    // One replica went upstream, the other filled from the bucket (after waiting on the
    // lease, unless the first was done before the second looked).
    let tier = |t: &'static str| format!("oci_proxy_cache_tier_total{{tier=\"{t}\"}}");
    let shared = metric(&s.a, &tier("shared")).await + metric(&s.b, &tier("shared")).await;
    let upstream = metric(&s.a, &tier("upstream")).await + metric(&s.b, &tier("upstream")).await;
    assert_eq!((shared, upstream), (1.0, 1.0));
    let waits = |p: &'static str| format!("oci_proxy_cache_lease_waits_total{{result=\"{p}\"}}");
    let landed = metric(&s.a, &waits("landed")).await + metric(&s.b, &waits("landed")).await;
    eprintln!("lease waits that ended with the blob landing: {landed}");
    for l in s.a.logs().lines().chain(s.b.logs().lines()) {
        if l.contains("waited for another replica") {
            eprintln!("{l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_object_in_the_bucket_is_never_served() {
    let Some(s) = setup().await else { return };
    let layer = s.image.layer_digests[1].clone();
    let (st, _) = get_blob(&s.a, &layer).await;
    assert_eq!(st, StatusCode::OK);
    let key = blob_key(&layer);
    wait_for_object(&s.moto, &key).await;

    // Same length, one byte flipped, written through the S3 API.
    let store = s.moto.store(BUCKET);
    let mut bad = store
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bad[1000] ^= 0x5a;
    store.put(&key, bad.into()).await.unwrap();

    let (st, body) = get_blob(&s.b, &layer).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        sha256(&body),
        layer,
        "B served the upstream's bytes, not the bucket's"
    );
    assert_eq!(upstream_gets(&s.reg, "blobs", &layer), 2);
    assert_eq!(
        metric(&s.b, "oci_proxy_cache_shared_corrupt_total").await,
        1.0
    );
    // B repaired the object after its verified upstream fill.
    let (store, key, layer) = (&store, &key, &layer);
    wait_until(DEADLINE, "the bucket object repaired", || async move {
        match store.get(key).await {
            Ok(r) => r.bytes().await.is_ok_and(|b| sha256(&b) == *layer),
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_going_away_degrades_to_upstream_pass_through() {
    let Some(mut s) = setup().await else { return };
    let layer = s.image.layer_digests[0].clone();
    let (st, _) = get_blob(&s.a, &layer).await;
    assert_eq!(st, StatusCode::OK);
    wait_for_object(&s.moto, &blob_key(&layer)).await;

    s.moto.stop();
    // B misses locally, cannot reach the bucket: upstream.
    let (st, body) = get_blob(&s.b, &layer).await;
    assert_eq!(st, StatusCode::OK, "{}", s.b.logs());
    assert_eq!(sha256(&body), layer);
    assert_eq!(upstream_gets(&s.reg, "blobs", &layer), 2);
    // A still serves its local copy, and the other layer from upstream.
    let (st, body) = get_blob(&s.a, &layer).await;
    assert_eq!((st, sha256(&body)), (StatusCode::OK, layer.clone()));
    let other = s.image.layer_digests[1].clone();
    let (st, body) = get_blob(&s.a, &other).await;
    assert_eq!((st, sha256(&body)), (StatusCode::OK, other));
    let md = s.image.manifest_digest.clone();
    let r = http_client()
        .get(format!("{}/v2/{UPSTREAM}/{REPO}/manifests/{md}", s.b.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The first shared operation that fails (a link or origin lookup or the blob read, depending on
    // what B tried first) is counted; after it the tier is skipped for a while.
    let mut errors = 0.0;
    for op in [
        "head_link",
        "head_origin",
        "get_blob",
        "lease",
        "get_manifest",
    ] {
        let series = format!("oci_proxy_cache_shared_ops_total{{op=\"{op}\",result=\"error\"}}");
        errors += metric(&s.b, &series).await;
    }
    assert!(errors >= 1.0, "no shared-store error was counted");
}

/// Runs `oci-proxy gc-shared --config <the proxy's config> <args>` with moto's credentials.
async fn gc_shared(proxy: &ProxyProcess, moto: &Moto, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
        .arg("gc-shared")
        .arg("--config")
        .arg(proxy.dir().join("config.yaml"))
        .args(args)
        .envs(moto.env())
        .output()
        .await
        .expect("run oci-proxy gc-shared");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sizes of the objects under `<PREFIX>blobs/`, by key.
async fn bucket_blobs(moto: &Moto) -> Vec<(String, u64)> {
    use futures_util::TryStreamExt;
    let store = moto.store(BUCKET);
    let mut v: Vec<(String, u64)> = store
        .list(Some(&Path::from(format!("{PREFIX}blobs"))))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .expect("list blobs");
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_shared_evicts_the_oldest_blobs_down_to_the_bound_and_the_proxies_still_serve() {
    let Some(s) = setup().await else { return };
    let (big, small) = (
        s.image.layer_digests[0].clone(),
        s.image.layer_digests[1].clone(),
    );
    // Two pulls through A; the big layer is uploaded (and so last modified) first.
    for layer in [&big, &small] {
        let (st, _) = get_blob(&s.a, layer).await;
        assert_eq!(st, StatusCode::OK);
        wait_for_object(&s.moto, &blob_key(layer)).await;
    }
    let before = bucket_blobs(&s.moto).await;
    let total: u64 = before.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 1_700_000, "{before:?}");
    let bound: u64 = 300_000;

    // A dry run names the big blob and deletes nothing.
    let (ok, out, err) = gc_shared(&s.a, &s.moto, &["--max-size", "300000", "--dry-run"]).await;
    assert!(ok, "gc-shared --dry-run failed:\n{out}\n{err}");
    let big_key = blob_key(&big).to_string();
    assert!(
        out.contains(&format!("would delete blob {big_key} 1500000 bytes")),
        "{out}"
    );
    assert_eq!(bucket_blobs(&s.moto).await, before);

    let (ok, out, err) = gc_shared(&s.a, &s.moto, &["--max-size", "300000"]).await;
    assert!(ok, "gc-shared failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!("deleted blob {big_key} 1500000 bytes")),
        "{out}"
    );
    assert!(out.contains("1700000 bytes before"), "{out}");
    assert!(!out.contains(support::s3::SECRET_KEY) && !err.contains(support::s3::SECRET_KEY));
    let after = bucket_blobs(&s.moto).await;
    let left: u64 = after.iter().map(|(_, n)| n).sum();
    assert!(left <= bound, "{left} bytes left: {after:?}");
    assert!(after.iter().all(|(k, _)| *k != big_key), "{after:?}");

    // A serves the evicted blob from its local cache, B (local miss, bucket miss) from
    // upstream.
    let (st, body) = get_blob(&s.a, &big).await;
    assert_eq!((st, sha256(&body)), (StatusCode::OK, big.clone()));
    assert_eq!(upstream_gets(&s.reg, "blobs", &big), 1);
    let (st, body) = get_blob(&s.b, &big).await;
    assert_eq!(st, StatusCode::OK, "{}", s.b.logs());
    assert_eq!(sha256(&body), big);
    assert_eq!(upstream_gets(&s.reg, "blobs", &big), 2);
    // ... and uploads it again.
    wait_for_object(&s.moto, &blob_key(&big)).await;
}

/// A blob above the single-PUT size goes to the bucket as a multipart upload, and the other
/// replica streams it out of the bucket (above the verify-first size) with no upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_goes_up_in_parts_and_streams_to_the_other_replica() {
    let Some(s) = setup().await else { return };
    let big = random_bytes(12 << 20, 13);
    let digest = support::push_blob(&s.reg, None, REPO, &big).await;

    let (st, body) = get_blob(&s.a, &digest).await;
    assert_eq!(st, StatusCode::OK);
    assert!(body == big, "A served the upstream's bytes");
    wait_for_object(&s.moto, &blob_key(&digest)).await;
    let store = s.moto.store(BUCKET);
    let meta = store.head(&blob_key(&digest)).await.unwrap();
    assert_eq!(meta.size, big.len() as u64);
    let multipart = meta.e_tag.as_deref().is_some_and(|t| t.contains('-'));
    assert!(
        multipart,
        "an S3 multipart ETag ends in -<parts>: {:?}",
        meta.e_tag
    );

    let (st, body) = get_blob(&s.b, &digest).await;
    assert_eq!(st, StatusCode::OK, "{}", s.b.logs());
    assert!(body == big, "B served the bucket's bytes");
    assert_eq!(upstream_gets(&s.reg, "blobs", &digest), 1);
    assert_eq!(
        metric(&s.b, "oci_proxy_cache_tier_total{tier=\"shared\"}").await,
        1.0
    );
}

/// A real client: skopeo copies the image through replica A, then through replica B (a fresh
/// local disk, as after a restart): B takes every blob and the manifest from the bucket, and
/// asks the upstream only for the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_a_second_replica_from_the_bucket() {
    let Some(s) = setup().await else { return };
    let image = format!("{UPSTREAM}/{REPO}:v1");
    let mut digests: Vec<String> = s.image.layer_digests.clone();
    digests.push(s.image.config_digest.clone());

    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("{}/{image}", s.a.host()),
        dest.path(),
        &["--src-no-creds"],
    )
    .await;
    assert_success(&out);
    for d in &digests {
        wait_for_object(&s.moto, &blob_key(d)).await;
    }
    let md = &s.image.manifest_digest;
    let mkey = Path::from(format!(
        "{PREFIX}manifests/sha256/{}",
        md.trim_start_matches("sha256:")
    ));
    wait_for_object(&s.moto, &mkey).await;

    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("{}/{image}", s.b.host()),
        dest.path(),
        &["--src-no-creds"],
    )
    .await;
    assert_success(&out);
    let got = DirImage::read(dest.path());
    assert_eq!(&got.manifest_digest, md);
    assert_eq!(got.blob_digests, digests.iter().cloned().collect());
    for d in &digests {
        assert_eq!(upstream_gets(&s.reg, "blobs", d), 1, "{d}: only A's GET");
    }
    assert_eq!(
        upstream_gets(&s.reg, "manifests", md),
        1,
        "only A's GET by digest"
    );
    assert_eq!(
        metric(&s.b, "oci_proxy_cache_tier_total{tier=\"upstream\"}").await,
        0.0,
        "B filled nothing from upstream"
    );
}

/// Tags are shared too: replica B serves a tag A checked (within the tag TTL) without asking
/// the upstream, and a replica started with an empty disk while the upstream is down still
/// serves the tag, its manifest and its blobs from the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_come_from_the_bucket_even_for_a_new_replica_while_the_upstream_is_down() {
    let Some(mut s) = setup().await else { return };
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let by_tag = |p: &ProxyProcess| format!("{}/v2/{UPSTREAM}/{REPO}/manifests/v1", p.url());
    let get = |url: String| async move {
        let r = http_client()
            .get(url)
            .header("accept", accept)
            .send()
            .await
            .expect("manifest request");
        (r.status(), r.bytes().await.expect("manifest body"))
    };
    let tag_requests = |reg: &Registry| {
        let path = format!(" /v2/{REPO}/manifests/v1 ");
        reg.logs().lines().filter(|l| l.contains(&path)).count()
    };

    let (st, body) = get(by_tag(&s.a)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.as_ref(), s.image.manifest.as_slice());
    let repo = sha256(format!("{UPSTREAM}/{REPO}").as_bytes());
    let tag_key = Path::from(format!(
        "{PREFIX}tags/{}/v1",
        repo.trim_start_matches("sha256:")
    ));
    wait_for_object(&s.moto, &tag_key).await;
    let md = s.image.manifest_digest.clone();
    wait_for_object(
        &s.moto,
        &Path::from(format!(
            "{PREFIX}manifests/sha256/{}",
            md.trim_start_matches("sha256:")
        )),
    )
    .await;
    for d in &s.image.layer_digests {
        let (st, _) = get_blob(&s.a, d).await;
        assert_eq!(st, StatusCode::OK);
        wait_for_object(&s.moto, &blob_key(d)).await;
    }

    let before = tag_requests(&s.reg);
    let (st, body) = get(by_tag(&s.b)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.as_ref(), s.image.manifest.as_slice());
    assert_eq!(
        tag_requests(&s.reg),
        before,
        "B did not ask the upstream about v1"
    );

    s.reg.stop();
    let c = ProxyProcess::start_with_env(&config(&s.reg, &s.moto), &s.moto.env()).await;
    let (st, body) = get(by_tag(&c)).await;
    assert_eq!(st, StatusCode::OK, "{}", c.logs());
    assert_eq!(body.as_ref(), s.image.manifest.as_slice());
    for d in &s.image.layer_digests {
        let (st, body) = get_blob(&c, d).await;
        assert_eq!(st, StatusCode::OK, "{d}: {}", c.logs());
        assert_eq!(&sha256(&body), d);
    }
}
