//! Credentials without Secrets (`credentials.google`, `credentials.ecr`) against a real
//! token-authenticated `docker-registry` whose token server accepts only what the cloud
//! identity fixtures issued: a loopback GKE metadata server / Google OAuth2 endpoint
//! (`support::google`) and moto's ECR, with static keys or IRSA web identity credentials from a
//! loopback STS (`support::sts`).

use crate::support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::google::GoogleIdentity;
use support::s3::Moto;
use support::sts::{AwsIdentity, ROLE_ARN};
use support::*;

const REPO: &str = "team/app";

/// Registry whose token server lets `user` (with passwords `check` accepts) pull [`REPO`],
/// seeded with one image.
async fn registry_for(
    user: &str,
    check: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (TokenServer, Registry) {
    let policy = TokenPolicy::new()
        .checked_user(user, check)
        .grant(user, REPO, &["pull"]);
    let (tokens, reg) = token_registry(policy).await;
    push_image(&reg, ADMIN, REPO, "v1", &[random_bytes(512, 1)]).await;
    tokens.reset_counts();
    (tokens, reg)
}

fn config(reg: &Registry, credentials: &str) -> String {
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n  tag_ttl: 0s\nupstreams:\n  - name: \"{host}\"\n    endpoint: \"{url}\"\ncredentials:\n{credentials}",
        host = reg.host(),
        url = reg.url(),
    );
    support::trust_registry_realm(&yaml, reg)
}

/// `GET /v2/<registry>/<REPO>/tags/list` through the proxy (always goes upstream).
async fn tags(proxy: &ProxyProcess, reg: &Registry) -> (u16, Value) {
    let resp = http_client()
        .get(format!(
            "{}/v2/{}/{REPO}/tags/list",
            proxy.url(),
            reg.host()
        ))
        .send()
        .await
        .expect("proxy answers");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The passwords the token server accepted for `user`, in order, deduplicated.
fn passwords_seen(tokens: &TokenServer, user: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in tokens.requests() {
        if r.authorized_user.as_deref() == Some(user) {
            let p = r.basic_password_seen.unwrap_or_default();
            if out.last() != Some(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// `oci-proxy resolve` (async: the fixtures run on this test's runtime).
async fn resolve(config_yaml: &str, reg: &Registry, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("c");
    let yaml = config_yaml
        .replace("{listen}", "127.0.0.1:0")
        .replace("{dir}", &cache.display().to_string());
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
        .arg("resolve")
        .arg("--config")
        .arg(&path)
        .arg(format!("{}/{REPO}", reg.host()))
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run resolve");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_no_secrets(&text, "resolve output");
    text
}

#[tokio::test]
async fn workload_identity_token_is_used_and_refreshed_before_expiry() {
    let google = GoogleIdentity::start(Duration::from_secs(6)).await;
    let (tokens, reg) = registry_for("oauth2accesstoken", google.checker()).await;
    let yaml = config(
        &reg,
        &format!("  google:\n    hosts: [\"{}\"]\n", reg.host()),
    );
    let env = [("GCE_METADATA_HOST", google.host())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let explained = resolve(&yaml, &reg, &env).await;
    assert!(
        explained.contains("credential source: google workload identity"),
        "{explained}"
    );

    let proxy = ProxyProcess::start_with_env(&yaml, &env).await;
    let (status, body) = tags(&proxy, &reg).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tags"], serde_json::json!(["v1"]));
    let issued = google.issued();
    // (`resolve` above fetched a token of its own.)
    let count = issued.len();
    let first = issued.last().expect("a token was issued").clone();
    assert_eq!(
        passwords_seen(&tokens, "oauth2accesstoken").last(),
        Some(&first.token)
    );

    // Keep pulling until the proxy fetched a second token; every pull must succeed (the
    // token server refuses an expired token), and the refresh must precede the expiry.
    let mut pulls = 0;
    wait_until(Duration::from_secs(30), "a refreshed token", || {
        pulls += 1;
        let proxy = &proxy;
        let reg = &reg;
        let google = &google;
        async move {
            let (status, body) = tags(proxy, reg).await;
            assert_eq!(status, 200, "pull {pulls}: {body}");
            google.issued().len() > count
        }
    })
    .await;
    let second = google.issued()[count].clone();
    assert!(second.issued < first.expires, "refreshed before expiry");
    let (status, _) = tags(&proxy, &reg).await;
    assert_eq!(status, 200);
    let seen = passwords_seen(&tokens, "oauth2accesstoken");
    assert!(
        seen.contains(&second.token),
        "the new token is used upstream"
    );
    assert!(
        tokens
            .requests()
            .iter()
            .all(|r| r.status == 200 || r.authorized_user.is_none()),
        "no token exchange was refused: {:?}",
        tokens
            .requests()
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>()
    );
    let m = proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "oci_proxy_credential_source_fetches_total",
            &[("source", "google"), ("result", "ok")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_metadata_call() {
    let google = GoogleIdentity::start(Duration::from_secs(3600)).await;
    // A slow metadata server: every request below arrives while the first fetch is running.
    google.set_stall(Duration::from_millis(1500));
    let (_tokens, reg) = registry_for("oauth2accesstoken", google.checker()).await;
    let yaml = config(
        &reg,
        &format!("  google:\n    hosts: [\"{}\"]\n", reg.host()),
    );
    let proxy = ProxyProcess::start_with_env(&yaml, &[("GCE_METADATA_HOST", &google.host())]).await;
    let pulls: Vec<_> = (0..8).map(|_| tags(&proxy, &reg)).collect();
    for (status, body) in futures_util::future::join_all(pulls).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        google.metadata_calls(),
        1,
        "one metadata call for all requests"
    );
}

#[tokio::test]
async fn metadata_outage_serves_cached_token_until_expiry_then_unavailable() {
    let google = GoogleIdentity::start(Duration::from_secs(6)).await;
    let (_tokens, reg) = registry_for("oauth2accesstoken", google.checker()).await;
    let yaml = config(
        &reg,
        &format!("  google:\n    hosts: [\"{}\"]\n", reg.host()),
    );
    let proxy = ProxyProcess::start_with_env(&yaml, &[("GCE_METADATA_HOST", &google.host())]).await;
    assert_eq!(tags(&proxy, &reg).await.0, 200);
    let token = google.issued()[0].clone();
    google.set_down(true);

    // Pull until the proxy refuses. Pulls after a failed refresh must still succeed (cached
    // token), and the refusal must come only once the token is (about to be) expired.
    let mut served_during_outage = 0;
    let mut refusal: Option<Value> = None;
    let end = Instant::now() + Duration::from_secs(30);
    while refusal.is_none() {
        assert!(Instant::now() < end, "no UNAVAILABLE within 30s");
        let failed_before = google.failed_calls();
        let (status, body) = tags(&proxy, &reg).await;
        match status {
            200 if failed_before > 0 => served_during_outage += 1,
            200 => {}
            503 => {
                let left = token.expires.saturating_duration_since(Instant::now());
                assert!(
                    left <= Duration::from_secs(1),
                    "refused with {left:?} of validity left"
                );
                refusal = Some(body);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        served_during_outage > 0,
        "the cached token served during the outage"
    );
    let body = refusal.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("google workload identity") && message.contains("metadata server"),
        "{message}"
    );
    let m = proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "oci_proxy_credential_source_fetches_total",
            &[("source", "google"), ("result", "error")]
        ) >= 1.0
    );

    // Back up: served again with a new token.
    google.set_down(false);
    wait_until(
        Duration::from_secs(10),
        "pulls after the outage",
        || async { tags(&proxy, &reg).await.0 == 200 },
    )
    .await;
    assert!(google.issued().len() >= 2);
}

#[tokio::test]
async fn service_account_key_file_is_exchanged_with_a_signed_jwt() {
    let google = GoogleIdentity::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = google.write_key_file(dir.path(), "puller@test-project.iam.gserviceaccount.com");
    let (tokens, reg) = registry_for("oauth2accesstoken", google.checker()).await;
    let yaml = config(
        &reg,
        &format!("  google:\n    hosts: [\"{}\"]\n", reg.host()),
    );
    let key = key.display().to_string();
    // The metadata server is there but must not be used when a key file is given.
    let env = [
        ("GOOGLE_APPLICATION_CREDENTIALS", key.as_str()),
        ("GCE_METADATA_HOST", &google.host()),
    ];
    let explained = resolve(&yaml, &reg, &env).await;
    assert!(
        explained.contains("credential source: google service account key"),
        "{explained}"
    );
    let proxy = ProxyProcess::start_with_env(&yaml, &env).await;
    let (status, body) = tags(&proxy, &reg).await;
    assert_eq!(status, 200, "{body}");
    let (accepted, rejected) = google.jwt_grants();
    assert!(
        accepted >= 1 && rejected == 0,
        "grants {accepted}/{rejected}"
    );
    assert_eq!(google.metadata_calls(), 0);
    let issued = google.issued();
    assert_eq!(
        passwords_seen(&tokens, "oauth2accesstoken").last(),
        issued.last().map(|i| &i.token)
    );
    assert!(!proxy.logs().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn docker_config_entry_wins_over_the_ambient_identity() {
    let google = GoogleIdentity::start(Duration::from_secs(3600)).await;
    let check = google.checker();
    let policy = TokenPolicy::new()
        .checked_user("oauth2accesstoken", check)
        .grant("oauth2accesstoken", REPO, &["pull"])
        .user("operator", "operator-password-1")
        .grant("operator", REPO, &["pull"]);
    let (tokens, reg) = token_registry(policy).await;
    push_image(&reg, ADMIN, REPO, "v1", &[random_bytes(256, 2)]).await;
    tokens.reset_counts();
    let dir = tempfile::tempdir().unwrap();
    let dc = dir.path().join("config.json");
    write_docker_config(&dc, &reg.host(), "operator", "operator-password-1");
    let yaml = config(
        &reg,
        &format!(
            "  docker_config: \"{}\"\n  google:\n    hosts: [\"{}\"]\n",
            dc.display(),
            reg.host()
        ),
    );
    let proxy = ProxyProcess::start_with_env(&yaml, &[("GCE_METADATA_HOST", &google.host())]).await;
    assert_eq!(tags(&proxy, &reg).await.0, 200);
    assert_eq!(
        google.metadata_calls(),
        0,
        "the ambient identity was not asked"
    );
    assert_eq!(passwords_seen(&tokens, "operator"), ["operator-password-1"]);
}

/// moto's ECR answers `GetAuthorizationToken` with base64 of this (its fixed account).
const MOTO_ECR_PASSWORD: &str = "123456789012-auth-token";

#[tokio::test]
async fn ecr_token_from_static_credentials() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (tokens, reg) = registry_for("AWS", |p| p == MOTO_ECR_PASSWORD).await;
    let yaml = config(&reg, &format!("  ecr:\n    hosts: [\"{}\"]\n", reg.host()));
    let endpoint = moto.endpoint();
    let mut env = moto.env();
    env.push(("AWS_ENDPOINT_URL_ECR", endpoint.as_str()));
    let explained = resolve(&yaml, &reg, &env).await;
    assert!(explained.contains("credential source: ecr"), "{explained}");
    let before = moto.requests("POST", "/");
    let proxy = ProxyProcess::start_with_env(&yaml, &env).await;
    let (status, body) = tags(&proxy, &reg).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(passwords_seen(&tokens, "AWS"), [MOTO_ECR_PASSWORD]);
    assert!(
        moto.requests("POST", "/") > before,
        "GetAuthorizationToken went to moto"
    );
    assert!(!proxy.logs().contains(MOTO_ECR_PASSWORD));

    // ECR down: a clear UNAVAILABLE (moto's token carries an expiry in the past, so nothing
    // is cached to fall back on).
    let mut moto = moto;
    moto.stop();
    let (status, body) = tags(&proxy, &reg).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ecr GetAuthorizationToken"), "{message}");
}

/// IRSA: only `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` (plus loopback endpoints and
/// their CA). The proxy exchanges the token at STS once, signs every `GetAuthorizationToken`
/// with the temporary credentials (moto's ECR token is already expired, so each pull asks
/// again), and logs neither the token nor the temporary keys.
#[tokio::test]
async fn ecr_token_from_web_identity_credentials() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let aws = AwsIdentity::start(&moto.endpoint()).await;
    let (tokens, reg) = registry_for("AWS", |p| p == MOTO_ECR_PASSWORD).await;
    let yaml = config(&reg, &format!("  ecr:\n    hosts: [\"{}\"]\n", reg.host()));
    let url = aws.url();
    let token_file = aws.token_file().display().to_string();
    let ca = aws.ca_bundle().display().to_string();
    let identity = [
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.as_str()),
        ("AWS_ROLE_ARN", ROLE_ARN),
        ("AWS_REGION", "us-east-1"),
        ("AWS_CA_BUNDLE", ca.as_str()),
    ];

    // `resolve` with the one endpoint variable for all services.
    let mut env = identity.to_vec();
    env.push(("AWS_ENDPOINT_URL", url.as_str()));
    let explained = resolve(&yaml, &reg, &env).await;
    assert!(explained.contains("credential source: ecr"), "{explained}");
    assert!(!explained.contains("UNAVAILABLE"), "{explained}");
    let sts_before = aws.sts_calls().len();
    let ecr_before = aws.ecr_calls().len();
    assert!(
        sts_before >= 1 && ecr_before >= 1,
        "resolve used STS and ECR"
    );

    // The proxy with the per-service variables.
    let mut env = identity.to_vec();
    env.push(("AWS_ENDPOINT_URL_STS", url.as_str()));
    env.push(("AWS_ENDPOINT_URL_ECR", url.as_str()));
    let proxy = ProxyProcess::start_with_env(&yaml, &env).await;
    const PULLS: usize = 3;
    for i in 0..PULLS {
        let (status, body) = tags(&proxy, &reg).await;
        assert_eq!(status, 200, "pull {i}: {body}");
        assert_eq!(body["tags"], serde_json::json!(["v1"]));
    }

    let sts = aws.sts_calls();
    let sts = &sts[sts_before..];
    assert_eq!(sts.len(), 1, "one STS exchange for {PULLS} pulls: {sts:?}");
    assert_eq!(sts[0].role_arn, ROLE_ARN);
    assert_eq!(sts[0].web_identity_token, aws.web_identity_token());
    assert!(sts[0].unsigned && sts[0].accepted, "{:?}", sts[0]);
    let issued = aws.issued().last().expect("credentials issued").clone();

    let ecr = aws.ecr_calls();
    let ecr = &ecr[ecr_before..];
    assert!(ecr.len() >= PULLS, "an ECR call per pull: {ecr:?}");
    for call in ecr {
        assert_eq!(call.status, 200, "{call:?}");
        assert_eq!(
            call.target.as_deref(),
            Some("AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken")
        );
        assert_eq!(call.service.as_deref(), Some("ecr"));
        assert_eq!(
            call.access_key_id.as_ref(),
            Some(&issued.access_key_id),
            "signed with the STS credentials"
        );
        assert_eq!(call.security_token.as_ref(), Some(&issued.session_token));
    }
    assert_eq!(passwords_seen(&tokens, "AWS"), [MOTO_ECR_PASSWORD]);

    let logs = proxy.logs();
    for secret in [
        aws.web_identity_token(),
        issued.secret_access_key.clone(),
        issued.session_token.clone(),
        MOTO_ECR_PASSWORD.to_string(),
    ] {
        assert!(!logs.contains(&secret), "the proxy log holds a secret");
    }
    let m = proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "oci_proxy_credential_source_fetches_total",
            &[("source", "ecr"), ("result", "ok")]
        ) >= PULLS as f64
    );
}

/// STS refuses the role: clients get `UNAVAILABLE` naming ECR, ECR is never called unsigned or
/// with other credentials, and the web identity token appears nowhere.
#[tokio::test]
async fn ecr_web_identity_refused_by_sts_is_unavailable() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let aws =
        AwsIdentity::start_for_role(&moto.endpoint(), "arn:aws:iam::123456789012:role/other").await;
    let (tokens, reg) = registry_for("AWS", |p| p == MOTO_ECR_PASSWORD).await;
    let yaml = config(&reg, &format!("  ecr:\n    hosts: [\"{}\"]\n", reg.host()));
    let url = aws.url();
    let token_file = aws.token_file().display().to_string();
    let ca = aws.ca_bundle().display().to_string();
    let env = [
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.as_str()),
        ("AWS_ROLE_ARN", ROLE_ARN),
        ("AWS_REGION", "us-east-1"),
        ("AWS_CA_BUNDLE", ca.as_str()),
        ("AWS_ENDPOINT_URL", url.as_str()),
    ];
    let proxy = ProxyProcess::start_with_env(&yaml, &env).await;
    let resp = http_client()
        .get(format!(
            "{}/v2/{}/{REPO}/tags/list",
            proxy.url(),
            reg.host()
        ))
        .send()
        .await
        .expect("proxy answers");
    assert_eq!(resp.status().as_u16(), 503);
    let text = resp.text().await.unwrap_or_default();
    assert!(!text.contains(&aws.web_identity_token()), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ecr GetAuthorizationToken")
            && message
                .contains("AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity"),
        "{message}"
    );
    assert!(
        !message.contains("<ErrorResponse"),
        "STS's XML, not its reason: {message}"
    );

    let sts = aws.sts_calls();
    assert!(!sts.is_empty(), "STS was asked");
    assert!(sts.iter().all(|c| c.role_arn == ROLE_ARN && !c.accepted));
    assert!(aws.issued().is_empty());
    assert!(aws.ecr_calls().is_empty(), "{:?}", aws.ecr_calls());
    assert!(passwords_seen(&tokens, "AWS").is_empty());
    assert!(!proxy.logs().contains(&aws.web_identity_token()));
}
