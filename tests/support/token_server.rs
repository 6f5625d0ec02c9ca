//! In-process Docker token server (token.md GET flow and oauth.md POST flow) that
//! mints ES256 JWTs the distribution 2.8 registry accepts (`x5c` header chaining to
//! the self-signed certificate written to `TokenServerInfo::cert_path`).
//!
//! Access rule: the intersection of what was requested and what the policy allows —
//! `ADMIN_USER` gets everything, anyone gets `pull` on public repositories, users get
//! what `TokenPolicy::grant` lists. A subset is not an error; bad credentials are 401.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// User with every action on every repository (and `registry:catalog:*`); for seeding.
pub const ADMIN_USER: &str = "admin";
/// Password of [`ADMIN_USER`] in a fresh [`TokenPolicy`].
pub const ADMIN_PASSWORD: &str = "admin-password";
/// The `service` (JWT `aud`) the server expects and the registry is configured with.
pub const SERVICE: &str = "test-registry";
/// The JWT `iss`.
pub const ISSUER: &str = "test-issuer";

/// What a registry needs to trust this token server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenServerInfo {
    /// `http://127.0.0.1:<port>/token`
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM certificate to use as the registry's `rootcertbundle`.
    pub cert_path: PathBuf,
}

/// Decides whether a password is valid for a user whose passwords are minted elsewhere (a
/// cloud token: `oauth2accesstoken:<access token>`, `AWS:<ecr password>`).
#[derive(Clone)]
pub struct PasswordCheck(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for PasswordCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordCheck")
    }
}

/// Who may do what. Build with [`TokenPolicy::new`] and the builder methods.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// user → password.
    pub users: BTreeMap<String, String>,
    /// user → check, for users whose valid passwords change (checked after `users`).
    pub checked_users: BTreeMap<String, PasswordCheck>,
    /// Repositories anyone (also anonymous) may pull.
    pub public_repos: BTreeSet<String>,
    /// user → repository → allowed actions.
    pub grants: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Token lifetime (`expires_in` and JWT `exp`). Note: distribution accepts
    /// tokens up to 60 s past `exp` (leeway).
    pub expires_in: Duration,
    /// Serve the OAuth2 POST form; when false POST answers 404 (GET fallback tests).
    pub oauth_post: bool,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenPolicy {
    /// Only [`ADMIN_USER`]/[`ADMIN_PASSWORD`], no public repositories, 300 s tokens,
    /// OAuth2 POST enabled.
    pub fn new() -> Self {
        let mut users = BTreeMap::new();
        users.insert(ADMIN_USER.to_string(), ADMIN_PASSWORD.to_string());
        TokenPolicy {
            users,
            checked_users: BTreeMap::new(),
            public_repos: BTreeSet::new(),
            grants: BTreeMap::new(),
            expires_in: Duration::from_secs(300),
            oauth_post: true,
        }
    }

    /// Adds (or replaces) a user.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.insert(name.to_string(), password.to_string());
        self
    }

    /// Adds a user whose passwords `check` accepts (e.g. unexpired cloud tokens).
    pub fn checked_user(
        mut self,
        name: &str,
        check: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checked_users
            .insert(name.to_string(), PasswordCheck(Arc::new(check)));
        self
    }

    /// Lets anyone pull `repo`.
    pub fn public_repo(mut self, repo: &str) -> Self {
        self.public_repos.insert(repo.to_string());
        self
    }

    /// Lets `user` perform `actions` (e.g. `&["pull"]`) on `repo`.
    pub fn grant(mut self, user: &str, repo: &str, actions: &[&str]) -> Self {
        self.grants
            .entry(user.to_string())
            .or_default()
            .entry(repo.to_string())
            .or_default()
            .extend(actions.iter().map(|a| a.to_string()));
        self
    }

    /// The usual test policy: `user`/`password` may pull `repo` (and the admin anything).
    pub fn puller(user: &str, password: &str, repo: &str) -> Self {
        Self::new()
            .user(user, password)
            .grant(user, repo, &["pull"])
    }

    /// Sets the token lifetime.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = d;
        self
    }

    fn allowed(
        &self,
        user: Option<&str>,
        typ: &str,
        name: &str,
        requested: &[String],
    ) -> Vec<String> {
        if user == Some(ADMIN_USER) {
            return requested.to_vec();
        }
        if typ != "repository" {
            return Vec::new();
        }
        let mut allowed = BTreeSet::new();
        if self.public_repos.contains(name) {
            allowed.insert("pull".to_string());
        }
        if let Some(actions) = user
            .and_then(|u| self.grants.get(u))
            .and_then(|m| m.get(name))
        {
            allowed.extend(actions.iter().cloned());
        }
        requested
            .iter()
            .filter(|a| allowed.contains(*a))
            .cloned()
            .collect()
    }
}

/// One request the token server received (GET or POST), for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// "GET" or "POST".
    pub method: String,
    /// POST `grant_type`; `None` for GET.
    pub grant_type: Option<String>,
    pub service: Option<String>,
    /// Requested scopes, one entry per scope (POST's space-separated list is split).
    pub scopes: Vec<String>,
    /// GET `account` / POST `username`.
    pub account: Option<String>,
    /// The user whose credentials (or refresh token) were verified; `None` if anonymous or rejected.
    pub authorized_user: Option<String>,
    /// Password presented via Basic auth (GET) or the `password` field (POST).
    pub basic_password_seen: Option<String>,
    /// HTTP status the server answered.
    pub status: u16,
}

struct Inner {
    policy: Mutex<TokenPolicy>,
    requests: Mutex<Vec<TokenRequest>>,
    /// refresh token → user
    refresh_tokens: Mutex<HashMap<String, String>>,
    key: EcdsaKeyPair,
    cert_b64: String,
    rng: SystemRandom,
}

/// A running token server (a task on the current tokio runtime, aborted on drop).
pub struct TokenServer {
    info: TokenServerInfo,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("info", &self.info)
            .finish()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    /// Generates a P-256 key and self-signed certificate, binds 127.0.0.1:0 and serves
    /// `GET /token` and `POST /token`.
    pub async fn start(policy: TokenPolicy) -> TokenServer {
        policy
            .users
            .values()
            .for_each(|p| super::register_secret(p));
        let dir = tempfile::tempdir().expect("token server temp dir");
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generate P-256 key");
        let mut params = rcgen::CertificateParams::new(vec!["token-signer.test".to_string()])
            .expect("cert params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "oci-proxy test token signer");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-sign certificate");
        let cert_path = dir.path().join("token.crt");
        std::fs::write(&cert_path, cert.pem()).expect("write token cert");
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &rng,
        )
        .expect("load PKCS8 key into ring");
        let inner = Arc::new(Inner {
            policy: Mutex::new(policy),
            requests: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
            key,
            cert_b64: STANDARD.encode(cert.der().as_ref()),
            rng,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token server");
        let port = listener.local_addr().expect("token server addr").port();
        let app = Router::new()
            .route("/token", get(get_token).post(post_token))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            // Serve until the task is aborted; an accept error just ends the server.
            let _ = axum::serve(listener, app).await;
        });
        TokenServer {
            info: TokenServerInfo {
                realm: format!("http://127.0.0.1:{port}/token"),
                service: SERVICE.to_string(),
                issuer: ISSUER.to_string(),
                cert_path,
            },
            inner,
            task,
            _dir: dir,
        }
    }

    /// Realm, service, issuer and certificate path for `RegistryAuth::Token`.
    pub fn info(&self) -> TokenServerInfo {
        self.info.clone()
    }

    /// `http://127.0.0.1:<port>/token`
    pub fn realm(&self) -> &str {
        &self.info.realm
    }

    /// `127.0.0.1:<port>`: the `token_realm_hosts` entry that lets the proxy use this server
    /// (it is another port of the registry's host, so another service).
    pub fn realm_host(&self) -> String {
        let rest = self.info.realm.trim_start_matches("http://");
        rest.split('/').next().unwrap_or_default().to_string()
    }

    /// Adds a user or changes their password; takes effect for the next request.
    pub fn set_password(&self, user: &str, password: &str) {
        self.update_policy(|p| {
            p.users.insert(user.to_string(), password.to_string());
        });
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_expires_in(&self, d: Duration) {
        self.update_policy(|p| p.expires_in = d);
    }

    /// Arbitrary policy change, effective for the next request.
    pub fn update_policy(&self, f: impl FnOnce(&mut TokenPolicy)) {
        let mut policy = self.inner.policy.lock().expect("policy lock");
        f(&mut policy);
        policy
            .users
            .values()
            .for_each(|p| super::register_secret(p));
    }

    /// All requests received since start / the last [`TokenServer::reset_counts`].
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.requests.lock().expect("requests lock").clone()
    }

    /// Number of recorded requests that asked for exactly `scope` (among others).
    pub fn requests_for_scope(&self, scope: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.scopes.iter().any(|s| s == scope))
            .count()
    }

    /// Forgets recorded requests (e.g. after seeding with the admin user).
    pub fn reset_counts(&self) {
        self.inner.requests.lock().expect("requests lock").clear();
    }
}

/// Parsed token request, common to GET and POST.
struct Ask {
    service: Option<String>,
    scopes: Vec<String>,
    offline: bool,
}

async fn get_token(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let field = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let ask = Ask {
        service: field("service"),
        scopes: pairs
            .iter()
            .filter(|(n, _)| n == "scope")
            .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(str::to_string))
            .collect(),
        offline: field("offline_token").as_deref() == Some("true"),
    };
    let mut record = TokenRequest {
        method: "GET".to_string(),
        grant_type: None,
        service: ask.service.clone(),
        scopes: ask.scopes.clone(),
        account: field("account"),
        authorized_user: None,
        basic_password_seen: None,
        status: 0,
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let user = match basic {
        None => None,
        Some((user, pass)) => {
            record.basic_password_seen = Some(pass.clone());
            if !inner.check_password(&user, &pass) {
                return inner.finish(record, unauthorized("invalid username or password"));
            }
            Some(user)
        }
    };
    record.authorized_user = user.clone();
    let resp = inner.issue(user.as_deref(), &ask, false);
    inner.finish(record, resp)
}

async fn post_token(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let ask = Ask {
        service: field("service"),
        scopes: field("scope")
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        offline: field("access_type").as_deref() == Some("offline"),
    };
    let mut record = TokenRequest {
        method: "POST".to_string(),
        grant_type: field("grant_type"),
        service: ask.service.clone(),
        scopes: ask.scopes.clone(),
        account: field("username"),
        authorized_user: None,
        basic_password_seen: field("password"),
        status: 0,
    };
    if !inner.policy.lock().expect("policy lock").oauth_post {
        return inner.finish(record, StatusCode::NOT_FOUND.into_response());
    }
    let user = match record.grant_type.as_deref() {
        Some("password") => {
            let (Some(user), Some(pass)) = (field("username"), field("password")) else {
                return inner.finish(record, bad_request("invalid_request"));
            };
            if !inner.check_password(&user, &pass) {
                return inner.finish(record, unauthorized("invalid username or password"));
            }
            user
        }
        Some("refresh_token") => {
            let known = field("refresh_token").and_then(|t| {
                inner
                    .refresh_tokens
                    .lock()
                    .expect("refresh lock")
                    .get(&t)
                    .cloned()
            });
            let still_exists = |u: &String| {
                inner
                    .policy
                    .lock()
                    .expect("policy lock")
                    .users
                    .contains_key(u)
            };
            match known {
                Some(user) if still_exists(&user) => user,
                _ => return inner.finish(record, unauthorized("invalid refresh token")),
            }
        }
        _ => return inner.finish(record, bad_request("unsupported_grant_type")),
    };
    record.authorized_user = Some(user.clone());
    let resp = inner.issue(Some(&user), &ask, true);
    inner.finish(record, resp)
}

impl Inner {
    fn check_password(&self, user: &str, pass: &str) -> bool {
        let policy = self.policy.lock().expect("policy lock").clone();
        if let Some(p) = policy.users.get(user) {
            return p == pass;
        }
        policy.checked_users.get(user).is_some_and(|c| (c.0)(pass))
    }

    fn finish(&self, mut record: TokenRequest, resp: Response) -> Response {
        record.status = resp.status().as_u16();
        self.requests.lock().expect("requests lock").push(record);
        resp
    }

    fn random_hex(&self, len: usize) -> String {
        let mut buf = vec![0u8; len];
        self.rng.fill(&mut buf).expect("system random");
        hex::encode(buf)
    }

    /// Mints a token for `user` (None = anonymous) covering the allowed part of `ask`.
    fn issue(&self, user: Option<&str>, ask: &Ask, oauth: bool) -> Response {
        if ask.service.as_deref() != Some(SERVICE) {
            return bad_request("invalid or missing service");
        }
        let policy = self.policy.lock().expect("policy lock").clone();
        let mut access = Vec::new();
        for scope in &ask.scopes {
            let Some((typ, name, actions)) = parse_scope(scope) else {
                continue;
            };
            let granted = policy.allowed(user, &typ, &name, &actions);
            if !granted.is_empty() {
                access.push(json!({"type": typ, "name": name, "actions": granted}));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after epoch")
            .as_secs();
        let expires_in = policy.expires_in.as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.cert_b64]});
        let claims = json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": now + expires_in,
            "nbf": now.saturating_sub(5),
            "iat": now,
            "jti": self.random_hex(16),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ES256 sign");
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        let mut body = json!({
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": rfc3339(now),
        });
        if oauth {
            body["scope"] = Value::String(ask.scopes.join(" "));
        } else {
            body["token"] = Value::String(token);
        }
        if let (true, Some(user)) = (ask.offline, user) {
            let refresh = self.random_hex(32);
            self.refresh_tokens
                .lock()
                .expect("refresh lock")
                .insert(refresh.clone(), user.to_string());
            body["refresh_token"] = Value::String(refresh);
        }
        (StatusCode::OK, Json(body)).into_response()
    }
}

/// `type:name:actions` → (type without resource class, name, actions). The name may
/// contain a `:` (registry port), so type splits on the first and actions on the last `:`.
pub fn parse_scope(scope: &str) -> Option<(String, String, Vec<String>)> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let typ = typ.split('(').next().unwrap_or(typ);
    let actions = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    Some((typ.to_string(), name.to_string(), actions))
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(rest.trim()).ok()?).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

fn unauthorized(msg: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"token\"")],
        Json(json!({"errors": [{"code": "UNAUTHORIZED", "message": msg}]})),
    )
        .into_response()
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response()
}

/// Seconds since the epoch as RFC 3339 UTC (`2006-01-02T15:04:05Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
