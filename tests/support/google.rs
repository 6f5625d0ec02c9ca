//! A loopback stand-in for Google's identity endpoints, for `credentials.google` tests:
//! - the GCE/GKE metadata server's token path (give the proxy `GCE_METADATA_HOST=host()`):
//!   answers only with `Metadata-Flavor: Google` (403 otherwise, as the real one), issues
//!   random access tokens with a settable lifetime, can stall (`set_stall`) or go down
//!   (`set_down(true)`: 503);
//! - an OAuth2 token endpoint (`token_uri()`) for service-account keys: accepts only a
//!   JWT bearer grant whose RS256 signature verifies with the key made by
//!   [`GoogleIdentity::write_key_file`] and whose `iss`, `aud`, `scope` and `exp` are right.
//!
//! `is_valid(token)` says whether a token was issued here and has not expired: feed it to the
//! registry's token server (`TokenPolicy::checked_user("oauth2accesstoken", ..)`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};

/// One token issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub token: String,
    pub issued: Instant,
    pub expires: Instant,
}

struct Inner {
    lifetime: Mutex<Duration>,
    stall: Mutex<Duration>,
    down: AtomicBool,
    issued: Mutex<Vec<Issued>>,
    metadata_calls: AtomicUsize,
    failed_calls: AtomicUsize,
    jwt_grants: AtomicUsize,
    rejected_grants: AtomicUsize,
    /// RSA public key (PKCS#1 DER) and client email of the key file written.
    key: Mutex<Option<(Vec<u8>, String)>>,
    token_uri: String,
    rng: SystemRandom,
}

pub struct GoogleIdentity {
    inner: Arc<Inner>,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GoogleIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GoogleIdentity {
    /// Serves on 127.0.0.1:0; tokens live `lifetime`.
    pub async fn start(lifetime: Duration) -> GoogleIdentity {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind google identity fixture");
        let port = listener.local_addr().expect("addr").port();
        let inner = Arc::new(Inner {
            lifetime: Mutex::new(lifetime),
            stall: Mutex::new(Duration::ZERO),
            down: AtomicBool::new(false),
            issued: Mutex::new(Vec::new()),
            metadata_calls: AtomicUsize::new(0),
            failed_calls: AtomicUsize::new(0),
            jwt_grants: AtomicUsize::new(0),
            rejected_grants: AtomicUsize::new(0),
            key: Mutex::new(None),
            token_uri: format!("http://127.0.0.1:{port}/token"),
            rng: SystemRandom::new(),
        });
        let app = Router::new()
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/token",
                get(metadata_token),
            )
            .route("/token", post(jwt_grant))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GoogleIdentity { inner, port, task }
    }

    /// `127.0.0.1:<port>`, the value for `GCE_METADATA_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn token_uri(&self) -> String {
        self.inner.token_uri.clone()
    }

    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// Every metadata answer waits this long first.
    pub fn set_stall(&self, d: Duration) {
        *self.inner.stall.lock().unwrap() = d;
    }

    /// Metadata token requests answered (any status).
    pub fn metadata_calls(&self) -> usize {
        self.inner.metadata_calls.load(Ordering::SeqCst)
    }

    /// Metadata token requests answered 503 because the server was down.
    pub fn failed_calls(&self) -> usize {
        self.inner.failed_calls.load(Ordering::SeqCst)
    }

    /// Service-account grants accepted / rejected.
    pub fn jwt_grants(&self) -> (usize, usize) {
        (
            self.inner.jwt_grants.load(Ordering::SeqCst),
            self.inner.rejected_grants.load(Ordering::SeqCst),
        )
    }

    pub fn issued(&self) -> Vec<Issued> {
        self.inner.issued.lock().unwrap().clone()
    }

    /// A check for the registry token server: issued here and not expired.
    pub fn checker(&self) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        let inner = self.inner.clone();
        move |token: &str| {
            let now = Instant::now();
            inner
                .issued
                .lock()
                .unwrap()
                .iter()
                .any(|i| i.token == token && now < i.expires)
        }
    }

    /// Generates an RSA key (with the `openssl` command line) and writes a service-account key
    /// file for it whose `token_uri` is this fixture; returns its path.
    pub fn write_key_file(&self, dir: &Path, client_email: &str) -> PathBuf {
        let pem_path = dir.join("sa-key.pem");
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem_path)
            .output()
            .expect("run openssl genpkey");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        let pem = std::fs::read_to_string(&pem_path).expect("read generated key");
        std::fs::remove_file(&pem_path).expect("remove pem");
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("PEM base64");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key");
        use ring::signature::KeyPair as _;
        *self.inner.key.lock().unwrap() = Some((
            pair.public_key().as_ref().to_vec(),
            client_email.to_string(),
        ));
        let path = dir.join("service-account.json");
        let file = json!({
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "test-key-id",
            "private_key": pem,
            "client_email": client_email,
            "client_id": "1234",
            "token_uri": self.token_uri(),
        });
        std::fs::write(&path, file.to_string()).expect("write key file");
        path
    }
}

impl Inner {
    fn issue(&self) -> Response {
        let mut buf = [0u8; 24];
        self.rng.fill(&mut buf).expect("random");
        let token = format!("ya29.test-{}", hex::encode(buf));
        super::register_secret(&token);
        let lifetime = *self.lifetime.lock().unwrap();
        let now = Instant::now();
        self.issued.lock().unwrap().push(Issued {
            token: token.clone(),
            issued: now,
            expires: now + lifetime,
        });
        Json(json!({
            "access_token": token,
            "expires_in": lifetime.as_secs(),
            "token_type": "Bearer",
        }))
        .into_response()
    }
}

async fn metadata_token(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let stall = *inner.stall.lock().unwrap();
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    inner.metadata_calls.fetch_add(1, Ordering::SeqCst);
    if inner.down.load(Ordering::SeqCst) {
        inner.failed_calls.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, "metadata down").into_response();
    }
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (StatusCode::FORBIDDEN, "missing Metadata-Flavor: Google").into_response();
    }
    inner.issue()
}

async fn jwt_grant(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let ok = verify_grant(&inner, &body);
    if ok {
        inner.jwt_grants.fetch_add(1, Ordering::SeqCst);
        inner.issue()
    } else {
        inner.rejected_grants.fetch_add(1, Ordering::SeqCst);
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response()
    }
}

fn verify_grant(inner: &Inner, body: &[u8]) -> bool {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return false;
    }
    let Some(jwt) = form.get("assertion") else {
        return false;
    };
    let Some((key, email)) = inner.key.lock().unwrap().clone() else {
        return false;
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return false;
    };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).ok();
    let (Some(header), Some(claims), Some(sig)) = (decode(h), decode(c), decode(s)) else {
        return false;
    };
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key);
    if key.verify(format!("{h}.{c}").as_bytes(), &sig).is_err() {
        return false;
    }
    let (Ok(header), Ok(claims)) = (
        serde_json::from_slice::<Value>(&header),
        serde_json::from_slice::<Value>(&claims),
    ) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    header["alg"] == "RS256"
        && header["kid"] == "test-key-id"
        && claims["iss"] == email.as_str()
        && claims["aud"] == inner.token_uri.as_str()
        && claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
        && claims["exp"].as_u64().is_some_and(|e| e > now)
        && claims["iat"].as_u64().is_some_and(|i| i <= now + 5)
}
