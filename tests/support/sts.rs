//! A loopback stand-in for AWS STS with IRSA (web identity) credentials, for `credentials.ecr`
//! tests, in front of moto's ECR.
//!
//! Why not moto's STS: `object_store` sends `AssumeRoleWithWebIdentity` unsigned, over https
//! only, with its parameters in the query string and an empty body. moto's server picks the
//! service of such a request from the `Host` header (`sts.*.amazonaws.com`) or a form body,
//! and a loopback endpoint has neither, so moto answers as S3.
//!
//! [`AwsIdentity::start`] serves TLS on 127.0.0.1 with a certificate from a fresh test CA
//! (`ca_bundle()`, the value for `AWS_CA_BUNDLE`) and writes a web identity token file
//! (`token_file()`, for `AWS_WEB_IDENTITY_TOKEN_FILE`) holding a random token. Give the proxy
//! `url()` as its STS and ECR endpoint.
//! - STS: `Action=AssumeRoleWithWebIdentity` (query or form body) succeeds only for
//!   [`ROLE_ARN`] and the token in the file (403 `AccessDenied` / 400 `InvalidIdentityToken`
//!   otherwise), and answers with fresh temporary credentials (`ASIA…` key id, secret key,
//!   session token) that expire after `DurationSeconds`. Every call is recorded
//!   (`sts_calls()`), every credential issued too (`issued()`).
//! - Everything else is ECR: answered with 403 `UnrecognizedClientException` unless it is
//!   SigV4-signed for service `ecr` with a key id issued here and carries that key's session
//!   token (`x-amz-security-token`); otherwise forwarded to moto (which accepts anything).
//!   Recorded in `ecr_calls()`.
//!
//! The web identity token and every secret key and session token are registered with
//! [`super::register_secret`], so every proxy log is checked for them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use ring::rand::{SecureRandom, SystemRandom};
use tokio_rustls::rustls;

use super::{http_client, register_secret};

/// The role the token file's identity may assume.
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/oci-proxy-puller";

/// One `AssumeRoleWithWebIdentity` call.
#[derive(Clone, Debug)]
pub struct StsCall {
    pub role_arn: String,
    pub web_identity_token: String,
    /// Whether the call came without a SigV4 `Authorization` header (as it must: the web
    /// identity token is the only credential).
    pub unsigned: bool,
    pub accepted: bool,
}

/// Temporary credentials issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

/// One ECR call.
#[derive(Clone, Debug)]
pub struct EcrCall {
    pub target: Option<String>,
    /// Key id and service of the SigV4 credential scope.
    pub access_key_id: Option<String>,
    pub service: Option<String>,
    pub security_token: Option<String>,
    /// What the caller got.
    pub status: u16,
}

struct Inner {
    role_arn: String,
    web_identity_token: String,
    ecr_backend: String,
    client: reqwest::Client,
    rng: SystemRandom,
    sts_calls: Mutex<Vec<StsCall>>,
    issued: Mutex<Vec<Issued>>,
    ecr_calls: Mutex<Vec<EcrCall>>,
}

pub struct AwsIdentity {
    inner: Arc<Inner>,
    port: u16,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Drop for AwsIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_hex(rng: &SystemRandom, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill(&mut b).expect("random bytes");
    hex::encode(b)
}

impl AwsIdentity {
    /// Serves on 127.0.0.1:0 (TLS); ECR calls go on to `ecr_backend` (moto's endpoint).
    pub async fn start(ecr_backend: &str) -> AwsIdentity {
        Self::start_for_role(ecr_backend, ROLE_ARN).await
    }

    /// [`AwsIdentity::start`] trusting the token only for `role_arn`.
    pub async fn start_for_role(ecr_backend: &str, role_arn: &str) -> AwsIdentity {
        let rng = SystemRandom::new();
        let web_identity_token = format!("k8s-sa-token-{}", random_hex(&rng, 24));
        register_secret(&web_identity_token);
        let dir = tempfile::tempdir().expect("aws identity temp dir");
        std::fs::write(dir.path().join("token"), &web_identity_token).expect("write token file");

        let (ca_pem, server_config) = tls_config();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write CA bundle");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind aws identity fixture");
        let port = listener.local_addr().expect("addr").port();
        let inner = Arc::new(Inner {
            role_arn: role_arn.to_string(),
            web_identity_token,
            ecr_backend: ecr_backend.trim_end_matches('/').to_string(),
            client: http_client(),
            rng,
            sts_calls: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            ecr_calls: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        AwsIdentity {
            inner,
            port,
            task,
            dir,
        }
    }

    /// `https://127.0.0.1:<port>`: the STS and ECR endpoint.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The PEM file of the CA that issued the server certificate (`AWS_CA_BUNDLE`).
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The projected service account token file (`AWS_WEB_IDENTITY_TOKEN_FILE`).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    pub fn web_identity_token(&self) -> String {
        self.inner.web_identity_token.clone()
    }

    pub fn sts_calls(&self) -> Vec<StsCall> {
        self.inner.sts_calls.lock().unwrap().clone()
    }

    pub fn issued(&self) -> Vec<Issued> {
        self.inner.issued.lock().unwrap().clone()
    }

    pub fn ecr_calls(&self) -> Vec<EcrCall> {
        self.inner.ecr_calls.lock().unwrap().clone()
    }
}

/// A fresh CA (its PEM) and a server config with a leaf for 127.0.0.1 and `localhost`.
fn tls_config() -> (String, rustls::ServerConfig) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "oci-proxy test AWS CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = params.self_signed(&ca_key).expect("CA cert");

    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sts.test");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = params
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf cert");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server cert");
    (ca.pem(), config)
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        params.extend(url::form_urlencoded::parse(&body).into_owned());
    }
    if params.get("Action").map(String::as_str) == Some("AssumeRoleWithWebIdentity") {
        assume_role_with_web_identity(&inner, &headers, &params)
    } else {
        ecr(&inner, method, uri, headers, body).await
    }
}

fn xml(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "text/xml")], body).into_response()
}

fn sts_error(status: StatusCode, code: &str, message: &str) -> Response {
    xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>\
             <Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
             <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
        ),
    )
}

fn assume_role_with_web_identity(
    inner: &Inner,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Response {
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    let role_arn = get("RoleArn");
    let web_identity_token = get("WebIdentityToken");
    let session_name = get("RoleSessionName");
    let duration: u64 = params
        .get("DurationSeconds")
        .and_then(|d| d.parse().ok())
        .unwrap_or(3600);
    let token_ok = web_identity_token == inner.web_identity_token;
    let role_ok = role_arn == inner.role_arn;
    let accepted = token_ok && role_ok && !session_name.is_empty();
    inner.sts_calls.lock().unwrap().push(StsCall {
        role_arn,
        web_identity_token,
        unsigned: !headers.contains_key("authorization"),
        accepted,
    });
    if !token_ok {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "InvalidIdentityToken",
            "Couldn't retrieve verification key from your identity provider",
        );
    }
    if !accepted {
        return sts_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        );
    }
    let issued = Issued {
        access_key_id: format!("ASIA{}", random_hex(&inner.rng, 8).to_uppercase()),
        secret_access_key: format!("sts-secret-{}", random_hex(&inner.rng, 20)),
        session_token: format!("sts-session-{}", random_hex(&inner.rng, 32)),
    };
    register_secret(&issued.secret_access_key);
    register_secret(&issued.session_token);
    inner.issued.lock().unwrap().push(issued.clone());
    let expiration = rfc3339(SystemTime::now() + Duration::from_secs(duration));
    let account = "123456789012";
    let role_name = ROLE_ARN.rsplit('/').next().unwrap_or_default();
    xml(
        StatusCode::OK,
        format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <AssumeRoleWithWebIdentityResult>\
             <SubjectFromWebIdentityToken>system:serviceaccount:kyma-system:oci-proxy</SubjectFromWebIdentityToken>\
             <Audience>sts.amazonaws.com</Audience>\
             <AssumedRoleUser><Arn>arn:aws:sts::{account}:assumed-role/{role_name}/{session_name}</Arn>\
             <AssumedRoleId>AROATEST0000000000000:{session_name}</AssumedRoleId></AssumedRoleUser>\
             <Credentials><SessionToken>{}</SessionToken><SecretAccessKey>{}</SecretAccessKey>\
             <Expiration>{expiration}</Expiration><AccessKeyId>{}</AccessKeyId></Credentials>\
             <Provider>arn:aws:iam::{account}:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/TEST</Provider>\
             </AssumeRoleWithWebIdentityResult>\
             <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000001</RequestId></ResponseMetadata>\
             </AssumeRoleWithWebIdentityResponse>",
            issued.session_token, issued.secret_access_key, issued.access_key_id
        ),
    )
}

/// `AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/<service>/aws4_request, ...` → key, service.
fn credential_scope(headers: &HeaderMap) -> (Option<String>, Option<String>) {
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return (None, None);
    };
    let Some(scope) = auth
        .split([' ', ','])
        .find_map(|p| p.strip_prefix("Credential="))
    else {
        return (None, None);
    };
    let parts: Vec<&str> = scope.split('/').collect();
    match parts.as_slice() {
        [key, _date, _region, service, "aws4_request"] => {
            (Some(key.to_string()), Some(service.to_string()))
        }
        _ => (None, None),
    }
}

async fn ecr(inner: &Inner, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let (access_key_id, service) = credential_scope(&headers);
    let security_token = headers
        .get("x-amz-security-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let known = inner.issued.lock().unwrap().iter().any(|i| {
        Some(&i.access_key_id) == access_key_id.as_ref()
            && Some(&i.session_token) == security_token.as_ref()
    });
    let response = if !known || service.as_deref() != Some("ecr") {
        (
            StatusCode::FORBIDDEN,
            [("content-type", "application/x-amz-json-1.1")],
            r#"{"__type":"UnrecognizedClientException","message":"The security token included in the request is invalid."}"#,
        )
            .into_response()
    } else {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = inner
            .client
            .request(method, format!("{}{path}", inner.ecr_backend))
            .body(body);
        for (name, value) in &headers {
            if name.as_str().starts_with("x-amz-")
                || name == "authorization"
                || name == "content-type"
            {
                req = req.header(name, value);
            }
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status();
                let content_type = r.headers().get("content-type").cloned();
                let bytes = r.bytes().await.unwrap_or_default();
                let mut resp = (status, bytes).into_response();
                if let Some(ct) = content_type {
                    resp.headers_mut().insert("content-type", ct);
                }
                resp
            }
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    };
    inner.ecr_calls.lock().unwrap().push(EcrCall {
        target,
        access_key_id,
        service,
        security_token,
        status: response.status().as_u16(),
    });
    response
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), as STS writes `Expiration`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
