//! Google credentials without a Secret (`credentials.google`): the OAuth2 access token of the
//! pod's GKE Workload Identity (the metadata server) or of a service-account key file named by
//! `GOOGLE_APPLICATION_CREDENTIALS`, sent to Artifact Registry / Container Registry as Basic
//! `oauth2accesstoken:<token>` for the registry's token exchange, as go-containerregistry's
//! `google.Keychain` (which Lifecycle Manager uses) does.
//!
//! Which one: `GOOGLE_APPLICATION_CREDENTIALS`, when set, names a `service_account` key file
//! (JWT bearer grant, RS256, to the key's `token_uri`); otherwise the metadata server at
//! `$GCE_METADATA_HOST` (default `169.254.169.254`, as Google's client libraries), path
//! `/computeMetadata/v1/instance/service-accounts/default/token`, header
//! `Metadata-Flavor: Google`. The key file is read once at startup (a broken file is a
//! startup error, not a failure per request).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;

use super::refresh::{Fetch, Fetched, SourceError};
use super::Secret;

/// Google's client libraries' default metadata address (no DNS needed).
pub(crate) const DEFAULT_METADATA_HOST: &str = "169.254.169.254";
/// The token path on the metadata server.
pub(crate) const METADATA_TOKEN_PATH: &str =
    "/computeMetadata/v1/instance/service-accounts/default/token";
/// The OAuth2 scope asked for with a service-account key (what gcloud's credential helper uses).
pub(crate) const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The username Artifact Registry and Container Registry expect with an access token.
pub(crate) const USERNAME: &str = "oauth2accesstoken";
/// Default hosts of `credentials.google.hosts`.
pub(crate) const DEFAULT_HOSTS: [&str; 3] = ["*.pkg.dev", "gcr.io", "*.gcr.io"];

/// Time allowed for one token request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime asked for in a service-account JWT (Google's maximum).
const JWT_LIFETIME: u64 = 3600;

/// How the token is obtained.
pub(crate) enum GoogleFetcher {
    Metadata {
        url: String,
        client: reqwest::Client,
    },
    ServiceAccountKey {
        key: Box<ServiceAccountKey>,
        client: reqwest::Client,
    },
}

/// The parts of a service-account key file this uses.
pub(crate) struct ServiceAccountKey {
    client_email: String,
    private_key_id: Option<String>,
    token_uri: String,
    key: ring::signature::RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GoogleFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GoogleFetcher::Metadata { url, .. } => {
                f.debug_struct("Metadata").field("url", url).finish()
            }
            GoogleFetcher::ServiceAccountKey { key, .. } => key.fmt(f),
        }
    }
}

/// A setup error: the key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("GOOGLE_APPLICATION_CREDENTIALS {path}: {message}")]
pub struct GoogleSetupError {
    path: String,
    message: String,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client_email: Option<String>,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    private_key: Option<Secret<String>>,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Secret<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl GoogleFetcher {
    /// From the environment: the key file of `GOOGLE_APPLICATION_CREDENTIALS`, else the
    /// metadata server of `GCE_METADATA_HOST`.
    pub(crate) fn from_env() -> Result<GoogleFetcher, GoogleSetupError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GoogleSetupError {
                path: String::new(),
                message: format!("http client: {e}"),
            })?;
        match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty()) {
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                let key = Box::new(ServiceAccountKey::load(&path)?);
                Ok(GoogleFetcher::ServiceAccountKey { key, client })
            }
            None => {
                let host = std::env::var("GCE_METADATA_HOST")
                    .ok()
                    .filter(|h| !h.trim().is_empty())
                    .unwrap_or_else(|| DEFAULT_METADATA_HOST.to_string());
                Ok(GoogleFetcher::Metadata {
                    url: format!("http://{}{METADATA_TOKEN_PATH}", host.trim()),
                    client,
                })
            }
        }
    }

    /// How `resolve` and logs name this source.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            GoogleFetcher::Metadata { .. } => "google workload identity",
            GoogleFetcher::ServiceAccountKey { .. } => "google service account key",
        }
    }

    async fn metadata(url: &str, client: &reqwest::Client) -> Result<Fetched, SourceError> {
        let fail = |m: String| SourceError(format!("google metadata server {url}: {m}"));
        let resp = client
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| fail(request_error(&e)))?;
        token_response(resp).await.map_err(fail)
    }

    async fn jwt_grant(
        key: &ServiceAccountKey,
        client: &reqwest::Client,
    ) -> Result<Fetched, SourceError> {
        let fail = |m: String| {
            SourceError(format!(
                "google service account {} token endpoint {}: {m}",
                key.client_email, key.token_uri
            ))
        };
        let assertion = key.assertion().map_err(fail)?;
        let resp = client
            .post(&key.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.expose().as_str()),
            ])
            .send()
            .await
            .map_err(|e| fail(request_error(&e)))?;
        token_response(resp).await.map_err(fail)
    }
}

impl Fetch for GoogleFetcher {
    async fn fetch(&self) -> Result<Fetched, SourceError> {
        match self {
            GoogleFetcher::Metadata { url, client } => Self::metadata(url, client).await,
            GoogleFetcher::ServiceAccountKey { key, client } => Self::jwt_grant(key, client).await,
        }
    }
}

/// A transport error without the URL's query (there is none with secrets, but keep it short).
fn request_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "unreachable".to_string()
    } else {
        e.to_string()
    }
}

/// An OAuth2 token response: `access_token` and `expires_in`. The body of an error response is
/// not repeated (it is not ours to log); the status is.
async fn token_response(resp: reqwest::Response) -> Result<Fetched, String> {
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {}", request_error(&e)))?;
    let t: TokenResponse =
        serde_json::from_slice(&body).map_err(|_| "answered no valid token JSON".to_string())?;
    if t.access_token.expose().is_empty() {
        return Err("answered an empty access_token".into());
    }
    Ok(Fetched {
        token: t.access_token,
        expires_in: t.expires_in.map(Duration::from_secs),
    })
}

impl ServiceAccountKey {
    pub(crate) fn load(path: &std::path::Path) -> Result<ServiceAccountKey, GoogleSetupError> {
        let err = |message: String| GoogleSetupError {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let file: KeyFile =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("not a key file: {e}")))?;
        if file.kind != "service_account" {
            return Err(err(format!(
                "credential type {:?} is not supported (only \"service_account\"; on GKE leave \
                 GOOGLE_APPLICATION_CREDENTIALS unset to use Workload Identity)",
                file.kind
            )));
        }
        let client_email = file
            .client_email
            .ok_or_else(|| err("client_email is missing".into()))?;
        let token_uri = file
            .token_uri
            .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into());
        let pem = file
            .private_key
            .ok_or_else(|| err("private_key is missing".into()))?;
        let der = pem_pkcs8(pem.expose())
            .ok_or_else(|| err("private_key is not a PEM \"PRIVATE KEY\" (PKCS#8)".into()))?;
        let key = ring::signature::RsaKeyPair::from_pkcs8(der.expose())
            .map_err(|e| err(format!("private_key is not a usable RSA key: {e}")))?;
        Ok(ServiceAccountKey {
            client_email,
            private_key_id: file.private_key_id,
            token_uri,
            key,
        })
    }

    /// The signed JWT of the bearer grant (RFC 7523).
    fn assertion(&self) -> Result<Secret<String>, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "system clock before 1970".to_string())?
            .as_secs();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = serde_json::Value::String(kid.clone());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + JWT_LIFETIME,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the JWT failed".to_string())?;
        Ok(Secret::new(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(sig)
        )))
    }
}

/// The DER bytes of the first `-----BEGIN PRIVATE KEY-----` block.
fn pem_pkcs8(pem: &str) -> Option<Secret<Vec<u8>>> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let len = pem[start..].find(END)?;
    let b64: String = pem[start..start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(b64).ok().map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks() {
        let der =
            pem_pkcs8("junk\n-----BEGIN PRIVATE KEY-----\nAAEC\nAw==\n-----END PRIVATE KEY-----\n")
                .unwrap();
        assert_eq!(der.expose(), &[0, 1, 2, 3]);
        assert!(
            pem_pkcs8("-----BEGIN RSA PRIVATE KEY-----\nAAEC\n-----END RSA PRIVATE KEY-----")
                .is_none()
        );
        assert!(pem_pkcs8("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----").is_none());
    }

    #[test]
    fn key_file_errors_are_precise_and_secret_free() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: serde_json::Value| {
            let p = dir.path().join(name);
            std::fs::write(&p, v.to_string()).unwrap();
            p
        };
        let user = write(
            "user.json",
            serde_json::json!({"type": "authorized_user", "refresh_token": "rt-secret-123"}),
        );
        let e = ServiceAccountKey::load(&user).unwrap_err().to_string();
        assert!(e.contains("\"authorized_user\" is not supported"), "{e}");
        let bad = write(
            "bad.json",
            serde_json::json!({"type": "service_account", "client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"}),
        );
        let e = ServiceAccountKey::load(&bad).unwrap_err().to_string();
        assert!(e.contains("not a usable RSA key"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
        let e = ServiceAccountKey::load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
    }
}
