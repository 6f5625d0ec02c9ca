//! Amazon ECR credentials without a Secret (`credentials.ecr`): the AWS default credential chain
//! (environment keys, web identity token file as IRSA sets it, ECS/EKS pod identity, instance
//! profile) signs `ecr:GetAuthorizationToken`; its `authorizationToken` (base64 of
//! `AWS:<password>`) is sent upstream as Basic `AWS:<password>`, as amazon-ecr-credential-helper
//! does. The token lasts 12 h and is refreshed before it expires (see [`super::refresh`]).
//!
//! AWS credentials and SigV4 signing come from the `object_store` crate the S3 cache tier already
//! uses (`AmazonS3Builder::from_env` builds the same default chain; `AwsAuthorizer` signs), so
//! there is no hand-written signing and no second AWS stack in the build.
//!
//! Region: the one in the registry host (`<account>.dkr.ecr.<region>.amazonaws.com`), else
//! `AWS_REGION` / `AWS_DEFAULT_REGION`; one token per region. Endpoint:
//! `AWS_ENDPOINT_URL_ECR`, else `AWS_ENDPOINT_URL`, else `https://api.ecr.<region>.amazonaws.com`
//! (the SDKs' service endpoint override variables). With IRSA, `object_store` exchanges the token
//! at `AWS_ENDPOINT_URL_STS`, else (set here) `AWS_ENDPOINT_URL`, else
//! `https://sts.<AWS_REGION>.amazonaws.com`, over https only. `AWS_CA_BUNDLE` adds trusted CAs
//! for ECR and STS, as in the AWS CLI and SDKs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredentialProvider};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use serde::Deserialize;

use super::refresh::{Fetch, Fetched, Refreshing, SourceError, SourceMetrics};
use super::Secret;

/// Default hosts of `credentials.ecr.hosts`.
pub(crate) const DEFAULT_HOSTS: [&str; 1] = ["*.dkr.ecr.*.amazonaws.com"];
/// The Basic username of an ECR token.
pub(crate) const USERNAME: &str = "AWS";
const TARGET: &str = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A setup error (bad `AWS_*` environment).
#[derive(Debug, thiserror::Error)]
#[error("credentials.ecr: {0}")]
pub struct EcrSetupError(String);

/// What every region's fetcher shares.
struct Shared {
    credentials: AwsCredentialProvider,
    endpoint_override: Option<String>,
    client: reqwest::Client,
}

/// The ECR source: one refreshing token per region.
pub(crate) struct Ecr {
    shared: Arc<Shared>,
    default_region: Option<String>,
    metrics: SourceMetrics,
    regions: Mutex<HashMap<String, Arc<Refreshing<EcrFetcher>>>>,
}

impl std::fmt::Debug for Ecr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ecr")
            .field("endpoint_override", &self.shared.endpoint_override)
            .field("default_region", &self.default_region)
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Ecr {
    /// Builds the credential chain from the environment. Nothing is fetched yet.
    pub(crate) fn from_env(metrics: SourceMetrics) -> Result<Ecr, EcrSetupError> {
        let default_region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION"));
        let endpoint_override = env("AWS_ENDPOINT_URL_ECR").or_else(|| env("AWS_ENDPOINT_URL"));
        let mut options = ClientOptions::new()
            .with_timeout(TIMEOUT)
            .with_connect_timeout(Duration::from_secs(3));
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = env("AWS_CA_BUNDLE") {
            let pem = std::fs::read(&path)
                .map_err(|e| EcrSetupError(format!("AWS_CA_BUNDLE {path}: {e}")))?;
            let bad = |e: String| EcrSetupError(format!("AWS_CA_BUNDLE {path}: {e}"));
            for cert in
                object_store::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?
            {
                options = options.with_root_certificate(cert);
            }
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let mut builder = AmazonS3Builder::from_env()
            // The S3 client is never used: only its credential chain. A bucket is required.
            .with_bucket_name("unused")
            .with_client_options(options)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: TIMEOUT,
            });
        if let Some(r) = &default_region {
            builder = builder.with_region(r);
        }
        if env("AWS_ENDPOINT_URL_STS").is_none() {
            if let Some(e) = env("AWS_ENDPOINT_URL") {
                builder = builder.with_config(object_store::aws::AmazonS3ConfigKey::StsEndpoint, e);
            }
        }
        let s3 = builder
            .build()
            .map_err(|e| EcrSetupError(format!("AWS credential chain: {e}")))?;
        let client = http
            .build()
            .map_err(|e| EcrSetupError(format!("http client: {e}")))?;
        Ok(Ecr {
            shared: Arc::new(Shared {
                credentials: s3.credentials().clone(),
                endpoint_override,
                client,
            }),
            default_region,
            metrics,
            regions: Mutex::new(HashMap::new()),
        })
    }

    /// The `AWS:<password>` token for the registry known by `names` (its name and endpoint
    /// host): the region is the first one found in them, else the default region.
    pub(crate) async fn password(&self, names: &[&str]) -> Result<Secret<String>, SourceError> {
        let host = names.first().copied().unwrap_or_default();
        let region = names
            .iter()
            .find_map(|h| region_of(h))
            .or_else(|| self.default_region.clone())
            .ok_or_else(|| {
                SourceError(format!(
                    "ecr: no region in registry host {host:?} and AWS_REGION is not set"
                ))
            })?;
        let refreshing = {
            let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
            regions
                .entry(region.clone())
                .or_insert_with(|| {
                    Arc::new(Refreshing::new(
                        "ecr",
                        EcrFetcher {
                            shared: self.shared.clone(),
                            region,
                        },
                        self.metrics.clone(),
                    ))
                })
                .clone()
        };
        refreshing.get().await
    }
}

/// `GetAuthorizationToken` in one region.
pub(crate) struct EcrFetcher {
    shared: Arc<Shared>,
    region: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationResponse {
    #[serde(default)]
    authorization_data: Vec<AuthorizationData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationData {
    authorization_token: Secret<String>,
    /// Seconds since the epoch (AWS JSON 1.1 timestamp).
    #[serde(default)]
    expires_at: Option<f64>,
}

#[derive(Deserialize)]
struct AwsErrorBody {
    #[serde(rename = "__type", default)]
    kind: Option<String>,
    #[serde(alias = "Message", default)]
    message: Option<String>,
}

impl EcrFetcher {
    fn endpoint(&self) -> String {
        match &self.shared.endpoint_override {
            Some(e) => e.trim_end_matches('/').to_string(),
            None if self.region.starts_with("cn-") => {
                format!("https://api.ecr.{}.amazonaws.com.cn", self.region)
            }
            None => format!("https://api.ecr.{}.amazonaws.com", self.region),
        }
    }
}

impl Fetch for EcrFetcher {
    async fn fetch(&self) -> Result<Fetched, SourceError> {
        let endpoint = self.endpoint();
        let fail = |m: String| SourceError(format!("ecr GetAuthorizationToken at {endpoint}: {m}"));
        let credential = self
            .shared
            .credentials
            .get_credential()
            .await
            .map_err(|e| fail(format!("no AWS credentials: {}", credential_failure(&e))))?;
        let body = Bytes::from_static(b"{}");
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("{endpoint}/"))
            .header(http::header::CONTENT_TYPE, "application/x-amz-json-1.1")
            .header("x-amz-target", TARGET)
            .body(object_store::client::HttpRequestBody::from(body.clone()))
            .map_err(|e| fail(format!("bad endpoint: {e}")))?;
        AwsAuthorizer::new(&credential, "ecr", &self.region).authorize(&mut req, None);
        let mut headers = req.headers().clone();
        // reqwest sets Host from the URL (the same value that was signed).
        headers.remove(http::header::HOST);
        let resp = self
            .shared
            .client
            .post(format!("{endpoint}/"))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                fail(if e.is_timeout() {
                    "timed out".into()
                } else if e.is_connect() {
                    "unreachable".into()
                } else {
                    e.without_url().to_string()
                })
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| fail(format!("reading the answer: {}", e.without_url())))?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<AwsErrorBody>(&bytes)
                .ok()
                .map(|b| {
                    let kind = b.kind.unwrap_or_default();
                    let kind = kind.rsplit('#').next().unwrap_or_default().to_string();
                    let msg: String = b.message.unwrap_or_default().chars().take(300).collect();
                    format!(": {kind} {msg}")
                })
                .unwrap_or_default();
            return Err(fail(format!("answered {status}{detail}")));
        }
        let parsed: AuthorizationResponse = serde_json::from_slice(&bytes)
            .map_err(|_| fail("answered no valid authorization data".into()))?;
        let data = parsed
            .authorization_data
            .into_iter()
            .next()
            .ok_or_else(|| fail("answered no authorization data".into()))?;
        let password = decode_token(data.authorization_token.expose())
            .ok_or_else(|| fail("authorizationToken is not base64 of AWS:<password>".into()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let expires_in = data
            .expires_at
            .filter(|at| *at > now)
            .map(|at| Duration::from_secs_f64(at - now));
        Ok(Fetched {
            token: password,
            expires_in,
        })
    }
}

/// Longest reason from the credential chain put into an error.
const MAX_REASON: usize = 300;

/// Why the AWS credential chain gave nothing, for logs and error bodies: where STS answered
/// with an error document, its `Code` and `Message` instead of the whole XML, bounded in
/// length. (`object_store` already redacts the STS request URL, which holds the web identity
/// token.)
fn credential_failure(e: &object_store::Error) -> String {
    let text = e.to_string();
    let text = text.strip_prefix("Generic S3 error: ").unwrap_or(&text);
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&format!("</{name}>"))?;
        Some(text[start..start + len].trim().to_string())
    };
    let reason = match (text.find('<'), element("Code")) {
        (Some(xml), Some(code)) => {
            let message = element("Message").unwrap_or_default();
            let before = text[..xml].trim_end().trim_end_matches(':');
            format!("{before}: {code}: {message}")
        }
        _ => text.to_string(),
    };
    reason.chars().take(MAX_REASON).collect()
}

/// `base64("AWS:<password>")` → `<password>`.
fn decode_token(token: &str) -> Option<Secret<String>> {
    let raw = Secret::new(STANDARD.decode(token.trim()).ok()?);
    let text = std::str::from_utf8(raw.expose()).ok()?;
    let (user, password) = text.split_once(':')?;
    (user == USERNAME && !password.is_empty()).then(|| Secret::new(password.to_string()))
}

/// The region of `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]` (port ignored).
pub(crate) fn region_of(host: &str) -> Option<String> {
    let host = host.split(':').next()?.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let i = labels
        .iter()
        .position(|l| *l == "ecr" || *l == "ecr-fips")?;
    if i < 2 || labels[i - 1] != "dkr" {
        return None;
    }
    let region = labels.get(i + 1)?;
    let rest = &labels[i + 2..];
    (matches!(rest, ["amazonaws", "com"] | ["amazonaws", "com", "cn"]) && !region.is_empty())
        .then(|| region.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_from_hosts() {
        assert_eq!(
            region_of("123456789012.dkr.ecr.eu-central-1.amazonaws.com").as_deref(),
            Some("eu-central-1")
        );
        assert_eq!(
            region_of("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn:443").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(
            region_of("1.dkr.ecr-fips.us-east-1.amazonaws.com").as_deref(),
            Some("us-east-1")
        );
        assert_eq!(region_of("127.0.0.1:5000"), None);
        assert_eq!(region_of("ecr.example.com"), None);
        assert_eq!(region_of("1.dkr.ecr.us-east-1.example.com"), None);
    }

    #[test]
    fn credential_failures_are_short() {
        let sts = object_store::Error::Generic {
            store: "S3",
            source: "Error performing POST REDACTED in 5ms - Server returned non-2xx status \
                     code: 403 Forbidden: <ErrorResponse><Error><Type>Sender</Type>\
                     <Code>AccessDenied</Code><Message>Not authorized to perform \
                     sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>"
                .into(),
        };
        assert_eq!(
            credential_failure(&sts),
            "Error performing POST REDACTED in 5ms - Server returned non-2xx status code: 403 \
             Forbidden: AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity"
        );
        let long = object_store::Error::Generic {
            store: "S3",
            source: "x".repeat(5000).into(),
        };
        assert_eq!(credential_failure(&long).len(), MAX_REASON);
        let file = object_store::Error::Generic {
            store: "S3",
            source: "Failed to read token file '/nope': No such file".into(),
        };
        assert_eq!(
            credential_failure(&file),
            "Failed to read token file '/nope': No such file"
        );
    }

    #[test]
    fn token_decoding() {
        let t = STANDARD.encode("AWS:pw-secret-1");
        assert_eq!(decode_token(&t).unwrap().expose(), "pw-secret-1");
        assert!(decode_token(&STANDARD.encode("root:pw")).is_none());
        assert!(decode_token(&STANDARD.encode("AWS:")).is_none());
        assert!(decode_token("%%%").is_none());
    }
}
