//! Proves the shared fixtures in `tests/support` against the real distribution 2.8.2
//! registry, skopeo and the in-process token server (no proxy involved).

use crate::support;

use std::time::Duration;

use reqwest::StatusCode;
use support::registry::BASIC_REALM;
use support::seed::OCI_MANIFEST;
use support::token_server::{parse_scope, rfc3339, SERVICE};
use support::*;

const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.index.v1+json";

fn www_authenticate(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn get_manifest(
    base: &str,
    creds: Option<(&str, &str)>,
    repo: &str,
    reference: &str,
) -> reqwest::Response {
    registry_get(
        base,
        creds,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("accept", ACCEPT_ALL)],
    )
    .await
}

fn expected_blobs(image: &PushedImage) -> std::collections::BTreeSet<String> {
    let mut blobs: std::collections::BTreeSet<String> =
        image.layer_digests.iter().cloned().collect();
    blobs.insert(image.config_digest.clone());
    blobs
}

#[test]
fn pure_helpers() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(
        parse_scope("repository(plugin):host:5000/a/b:pull,push"),
        Some((
            "repository".to_string(),
            "host:5000/a/b".to_string(),
            vec!["pull".to_string(), "push".to_string()]
        ))
    );
    assert_eq!(parse_scope("nonsense"), None);
    let (scheme, params) = parse_challenge(
        r#"Bearer realm="http://x/token",service="svc",scope="repository:a/b:pull,push",error="insufficient_scope""#,
    );
    assert_eq!(scheme, "bearer");
    assert_eq!(params["realm"], "http://x/token");
    assert_eq!(params["service"], "svc");
    assert_eq!(params["scope"], "repository:a/b:pull,push");
    assert_eq!(params["error"], "insufficient_scope");
    assert_eq!(random_bytes(100, 7), random_bytes(100, 7));
    assert_ne!(random_bytes(100, 7), random_bytes(100, 8));
    assert_eq!(random_bytes(13, 1).len(), 13);
}

#[tokio::test]
async fn wait_until_polls_until_true() {
    let mut calls = 0;
    wait_until(Duration::from_secs(5), "third call", || {
        calls += 1;
        let done = calls >= 3;
        async move { done }
    })
    .await;
    assert_eq!(calls, 3);
}

#[tokio::test]
#[should_panic(expected = "timed out after 50ms waiting for never")]
async fn wait_until_panics_at_deadline() {
    wait_until(Duration::from_millis(50), "never", || async { false }).await;
}

#[tokio::test]
async fn htpasswd_registry_basic_auth_push_and_skopeo_pull() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[("alice", "wonderland")])).await;
    let creds = Some(("alice", "wonderland"));

    let anon = http_client()
        .get(format!("{}/v2/", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        www_authenticate(&anon),
        format!("Basic realm=\"{BASIC_REALM}\"")
    );
    assert_eq!(
        registry_get(&reg.url(), creds, "/v2/", &[]).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        registry_get(&reg.url(), Some(("alice", "wrong")), "/v2/", &[])
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );

    let layers = vec![random_bytes(3000, 1), random_bytes(70_000, 2)];
    let image = push_image(&reg, creds, "team/app", "v1", &layers).await;
    assert_eq!(image.media_type, OCI_MANIFEST);
    assert_eq!(image.manifest_digest, sha256_digest(&image.manifest));
    let resp = get_manifest(&reg.url(), creds, "team/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        image.manifest.as_slice()
    );

    let dest = tempfile::tempdir().unwrap();
    let src = format!("{}/team/app:v1", reg.host());
    let out = skopeo_copy(&src, dest.path(), &["--src-creds", "alice:wonderland"]).await;
    assert_success(&out);
    let dir = DirImage::read(dest.path());
    assert_eq!(dir.manifest_digest, image.manifest_digest);
    assert_eq!(dir.blob_digests, expected_blobs(&image));

    let denied = tempfile::tempdir().unwrap();
    let out = skopeo_copy(&src, denied.path(), &[]).await;
    assert!(!out.status.success(), "skopeo without creds must fail");
}

#[tokio::test]
async fn anonymous_registry_docker_image_survives_stop_and_restart() {
    let mut reg = Registry::start(RegistryAuth::Anonymous).await;
    let image = push_docker_image(&reg, None, "lib/tool", "1.0", &[random_bytes(500, 3)]).await;
    let resp = get_manifest(&reg.url(), None, "lib/tool", "1.0").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        resp.headers()["docker-content-digest"],
        image.manifest_digest.as_str()
    );

    reg.stop();
    let down = http_client().get(format!("{}/v2/", reg.url())).send().await;
    assert!(down.is_err(), "stopped registry must refuse connections");

    let url_before = reg.url();
    reg.restart_with(RegistryAuth::Anonymous).await;
    assert_eq!(reg.url(), url_before);
    assert_blob(
        &reg.url(),
        None,
        "lib/tool",
        &image.layer_digests[0],
        &random_bytes(500, 3),
    )
    .await;
}

/// distribution's own pull-through mode, the benchmark's peer: a blob it never held comes
/// from the upstream (which logs the GET) and is served whole; its port is its own.
#[tokio::test]
async fn pull_through_registry_fetches_from_its_upstream() {
    let upstream = Registry::start(RegistryAuth::Anonymous).await;
    let body = random_bytes(300_000, 4);
    let image = push_image(
        &upstream,
        None,
        "lib/peer",
        "1",
        std::slice::from_ref(&body),
    )
    .await;
    let peer = Registry::start_pull_through(&upstream.url()).await;
    assert_ne!(peer.port(), upstream.port());
    let digest = &image.layer_digests[0];
    assert_blob(&peer.url(), None, "lib/peer", digest, &body).await;
    // The upstream logs a request once it completes, which may be after the peer's client
    // got its last byte.
    let fetched = format!("\"GET /v2/lib/peer/blobs/{digest} ");
    wait_until(Duration::from_secs(10), "the peer's upstream GET", || {
        let seen = upstream.logs().lines().any(|l| l.contains(&fetched));
        async move { seen }
    })
    .await;
}

/// GETs blob `digest` of `repo` at `url` with `creds`; asserts a 200 with exactly `want`.
async fn assert_blob(
    url: &str,
    creds: Option<(&str, &str)>,
    repo: &str,
    digest: &str,
    want: &[u8],
) {
    let blob = registry_get(url, creds, &format!("/v2/{repo}/blobs/{digest}"), &[]).await;
    assert_eq!(blob.status(), StatusCode::OK);
    assert_eq!(blob.bytes().await.unwrap().to_vec(), want);
}

async fn basic_status(url: &str, creds: Option<(&str, &str)>) -> StatusCode {
    registry_get(url, creds, "/v2/", &[]).await.status()
}

#[tokio::test]
async fn htpasswd_rotation_live_and_by_restart() {
    let mut reg = Registry::start(RegistryAuth::htpasswd(&[("alice", "first")])).await;
    let first = Some(("alice", "first"));
    let second = Some(("alice", "second"));
    let third = Some(("alice", "third"));
    let image = push_image(&reg, first, "rot/app", "v1", &[random_bytes(100, 4)]).await;

    // distribution 2.8 re-reads htpasswd when its mtime changes: no restart needed.
    reg.set_htpasswd(&[("alice", "second")]);
    assert_eq!(
        basic_status(&reg.url(), first).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(basic_status(&reg.url(), second).await, StatusCode::OK);

    // A restart with new auth keeps data and port.
    let url_before = reg.url();
    reg.restart_with(RegistryAuth::htpasswd(&[("alice", "third")]))
        .await;
    assert_eq!(reg.url(), url_before);
    assert_eq!(
        basic_status(&reg.url(), second).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(basic_status(&reg.url(), third).await, StatusCode::OK);
    let resp = get_manifest(&reg.url(), third, "rot/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        image.manifest.as_slice()
    );
    assert_eq!(reg.logs().matches("listening on").count(), 2);
}

#[tokio::test]
async fn token_registry_get_flow_scopes_and_counters() {
    let tokens = TokenServer::start(
        TokenPolicy::new()
            .public_repo("pub/app")
            .user("bob", "builder")
            .grant("bob", "priv/app", &["pull"]),
    )
    .await;
    let reg = Registry::start(RegistryAuth::Token(tokens.info())).await;
    let admin = ADMIN;
    let bob = Some(("bob", "builder"));
    let public = push_image(&reg, admin, "pub/app", "v1", &[random_bytes(1000, 5)]).await;
    let private = push_image(&reg, admin, "priv/app", "v1", &[random_bytes(2000, 6)]).await;
    push_image(&reg, admin, "priv/other", "v1", &[random_bytes(10, 7)]).await;
    assert!(tokens
        .requests()
        .iter()
        .all(|r| r.authorized_user.as_deref() == Some(ADMIN_USER) && r.status == 200));
    tokens.reset_counts();

    let anon = http_client()
        .get(format!("{}/v2/", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        www_authenticate(&anon),
        format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", tokens.realm())
    );

    // Anonymous pull of a public repository through the token flow.
    let resp = get_manifest(&reg.url(), None, "pub/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        public.manifest.as_slice()
    );

    // A private repository: anonymous gets an empty token (200), the registry says 401.
    let resp = get_manifest(&reg.url(), None, "priv/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(www_authenticate(&resp).contains("error=\"insufficient_scope\""));
    // bob's credentials work; the JWT's access claim is honoured by distribution.
    let resp = get_manifest(&reg.url(), bob, "priv/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        private.manifest.as_slice()
    );
    assert_blob(
        &reg.url(),
        bob,
        "priv/app",
        &private.layer_digests[0],
        &random_bytes(2000, 6),
    )
    .await;
    // bob has no grant for priv/other: a subset (nothing) is granted, not an error.
    let resp = get_manifest(&reg.url(), bob, "priv/other", "v1").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Wrong password: the token server itself answers 401.
    let resp = get_manifest(&reg.url(), Some(("bob", "nope")), "priv/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let reqs = tokens.requests();
    assert_eq!(reqs.len(), 6, "{reqs:#?}");
    assert_eq!(tokens.requests_for_scope("repository:pub/app:pull"), 1);
    assert_eq!(tokens.requests_for_scope("repository:priv/app:pull"), 4);
    assert_eq!(tokens.requests_for_scope("repository:priv/other:pull"), 1);
    let anon_priv = &reqs[1];
    assert_eq!(anon_priv.method, "GET");
    assert_eq!(anon_priv.service.as_deref(), Some(SERVICE));
    assert_eq!(
        (anon_priv.authorized_user.as_deref(), anon_priv.status),
        (None, 200)
    );
    assert_eq!(anon_priv.basic_password_seen, None);
    assert_eq!(reqs[2].account.as_deref(), Some("bob"));
    assert_eq!(reqs[2].authorized_user.as_deref(), Some("bob"));
    assert_eq!(reqs[2].basic_password_seen.as_deref(), Some("builder"));
    let bad = reqs.last().unwrap();
    assert_eq!((bad.status, bad.authorized_user.as_deref()), (401, None));
    assert_eq!(bad.basic_password_seen.as_deref(), Some("nope"));

    // A real client (skopeo) pulls the private image through the token flow.
    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("{}/priv/app:v1", reg.host()),
        dest.path(),
        &["--src-creds", "bob:builder"],
    )
    .await;
    assert_success(&out);
    let dir = DirImage::read(dest.path());
    assert_eq!(dir.manifest_digest, private.manifest_digest);
    assert_eq!(dir.blob_digests, expected_blobs(&private));
    assert!(tokens
        .requests()
        .iter()
        .skip(6)
        .any(|r| r.authorized_user.as_deref() == Some("bob") && r.status == 200));

    // Password rotation on the token server: the old one stops working at once.
    tokens.reset_counts();
    tokens.set_password("bob", "rotated");
    let resp = get_manifest(&reg.url(), bob, "priv/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = get_manifest(&reg.url(), Some(("bob", "rotated")), "priv/app", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: Vec<_> = tokens
        .requests()
        .into_iter()
        .map(|r| (r.basic_password_seen, r.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some("builder".to_string()), 401),
            (Some("rotated".to_string()), 200)
        ]
    );
}

#[tokio::test]
async fn token_server_oauth_post_refresh_and_expiry() {
    let tokens = TokenServer::start(
        TokenPolicy::new()
            .user("carol", "secret")
            .grant("carol", "priv/app", &["pull"])
            .expires_in(Duration::from_secs(120)),
    )
    .await;
    let reg = Registry::start(RegistryAuth::Token(tokens.info())).await;
    let image = push_image(&reg, ADMIN, "priv/app", "v1", &[random_bytes(64, 9)]).await;
    tokens.reset_counts();
    let client = http_client();
    let post = |form: Vec<(&'static str, String)>| {
        let client = client.clone();
        let realm = tokens.realm().to_string();
        async move { client.post(realm).form(&form).send().await.unwrap() }
    };
    let scope = "repository:priv/app:pull repository:priv/app:push".to_string();

    let resp = post(vec![
        ("grant_type", "password".into()),
        ("username", "carol".into()),
        ("password", "secret".into()),
        ("service", SERVICE.into()),
        ("client_id", "fixtures".into()),
        ("access_type", "offline".into()),
        ("scope", scope.clone()),
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 120);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    let access = body["access_token"].as_str().unwrap().to_string();
    let refresh = body["refresh_token"].as_str().unwrap().to_string();
    let with_bearer = |token: String| {
        let client = client.clone();
        let url = format!("{}/v2/priv/app/manifests/v1", reg.url());
        async move {
            client
                .get(url)
                .header("accept", OCI_MANIFEST)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    let resp = with_bearer(access).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        image.manifest.as_slice()
    );

    tokens.set_expires_in(Duration::from_secs(90));
    let resp = post(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", refresh.clone()),
        ("service", SERVICE.into()),
        ("client_id", "fixtures".into()),
        ("scope", "repository:priv/app:pull".into()),
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 90);
    assert_eq!(body["scope"], "repository:priv/app:pull");
    let resp = with_bearer(body["access_token"].as_str().unwrap().to_string()).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let resp = post(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", "not-issued".into()),
        ("service", SERVICE.into()),
        ("client_id", "fixtures".into()),
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = post(vec![
        ("grant_type", "password".into()),
        ("username", "carol".into()),
        ("password", "wrong".into()),
        ("service", SERVICE.into()),
        ("client_id", "fixtures".into()),
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    tokens.update_policy(|p| p.oauth_post = false);
    let resp = post(vec![("grant_type", "refresh_token".into())]).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let grants: Vec<_> = tokens
        .requests()
        .into_iter()
        .map(|r| (r.method, r.grant_type, r.authorized_user, r.status))
        .collect();
    let carol = Some("carol".to_string());
    let pw = Some("password".to_string());
    let rt = Some("refresh_token".to_string());
    let post_m = "POST".to_string();
    assert_eq!(
        grants,
        vec![
            (post_m.clone(), pw.clone(), carol.clone(), 200),
            (post_m.clone(), rt.clone(), carol, 200),
            (post_m.clone(), rt.clone(), None, 401),
            (post_m.clone(), pw, None, 401),
            (post_m, rt, None, 404),
        ]
    );
}
