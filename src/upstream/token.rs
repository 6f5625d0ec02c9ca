//! Bearer tokens for upstream registries: where credentials may be sent ([`check_realm`]), one
//! token exchange with a token server ([`fetch_token`], distribution's GET form and the OAuth2
//! POST form), and the per-key token cache with single-flight fetches ([`TokenCache`]).
//!
//! # Credentials never leave the trust boundary
//!
//! * The caller decides with [`check_realm`] whether a realm named by an upstream's challenge may
//!   be used at all, and whether credentials may be sent to it; when they may not, it passes
//!   [`Credential::Anonymous`]. Realms are compared by host **and port**: a realm on another port
//!   of the upstream's host is another service.
//! * [`fetch_token`] itself refuses realms that are not `http(s)`, carry userinfo, or point at a
//!   link-local / cloud metadata / unspecified address, whatever the caller decided.
//! * Redirects: token requests never follow one. The upstream clients are built without a
//!   redirect policy for everything but blob GETs (see `super::guard`), so a 3xx from a token
//!   server comes back as [`TokenError::Rejected`] and neither a password, a refresh token in a
//!   POST body, nor the request itself reaches the redirect's target.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use moka::future::Cache;
use moka::Expiry;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Deserialize;
use url::{Host, Url};

use super::guard::{self, AddressClass, AddressGuard};
use crate::credentials::{Credential, CredentialId, Secret};
use crate::protocol::key_pattern::realm_entry_authority;

/// Largest token response body accepted.
pub(crate) const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Shortest lifetime of a token (token spec: the default and the minimum of `expires_in`).
pub(crate) const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest lifetime believed, whatever the server says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Upper bound of the safety margin subtracted from a token's lifetime.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(30);
/// Timeout of one token request (distribution's client uses 15 s too).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// `client_id` sent in OAuth2 POST requests.
pub(crate) const CLIENT_ID: &str = "oci-proxy";
/// Username that goes with an identity token in Basic auth (docker credential helper convention).
const IDENTITY_TOKEN_USER: &str = "<token>";

/// What a token is cached under: a token is only valid for the realm, service and scopes it
/// was requested for, and only reusable by the same credential. `credential` is a hash over the
/// secret itself (see [`Credential::id`](crate::credentials::Credential::id)), so a rotated
/// password or token never finds a token fetched with the old one, even in a cache that
/// outlives config reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    /// Sorted and de-duplicated (use [`TokenKey::new`]).
    pub scopes: Vec<String>,
    pub credential: CredentialId,
}

impl TokenKey {
    /// Builds a key, sorting and de-duplicating the scopes.
    pub(crate) fn new<S: Into<String>>(
        realm: &Url,
        service: Option<&str>,
        scopes: impl IntoIterator<Item = S>,
        credential: CredentialId,
    ) -> Self {
        let mut scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        scopes.sort();
        scopes.dedup();
        TokenKey {
            realm: realm.as_str().to_owned(),
            service: service.map(str::to_owned),
            scopes,
            credential,
        }
    }
}

/// A bearer token and the instant after which it must not be used.
#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub value: Secret<String>,
    pub expires_at: Instant,
}

impl Token {
    /// Whether the token may still be used now.
    pub(crate) fn is_fresh(&self) -> bool {
        Instant::now() < self.expires_at
    }
}

/// Why no token could be obtained. Messages never contain a secret or a response body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token server answered with a non-success status.
    #[error("token server refused the request with status {status}")]
    Rejected { status: StatusCode },
    /// The realm may not be used (scheme, address, or host rules).
    #[error("token realm not allowed: {0}")]
    BadRealm(String),
    /// The request could not be sent or the response not read.
    #[error("token request failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// The response is not a usable token response.
    #[error("invalid token response: {0}")]
    InvalidResponse(String),
}

impl TokenError {
    /// Whether the token server refused the credentials (401/403): the credential is bad, as
    /// opposed to the server being unreachable or broken.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            TokenError::Rejected { status }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN
        )
    }
}

fn transport(e: reqwest::Error) -> TokenError {
    TokenError::Transport(e.without_url())
}

/// How far a usable realm is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RealmTrust {
    /// Credentials may be sent to the realm.
    WithCredentials,
    /// The realm may be asked for an anonymous token only.
    AnonymousOnly,
}

/// Whether `realm` may be used at all, and whether credentials may be sent to it.
///
/// * Never: a scheme other than http(s), a realm with userinfo, a link-local address
///   (169.254.0.0/16 incl. the metadata address, fe80::/10), the unspecified address, or
///   `fd00:ec2::254`.
/// * Trusted (credentials may go there): the realm's `host:port` equals the upstream's, or is
///   listed in `extra_hosts` (`host:port`, or `host` for the realm scheme's default port), and
///   the realm is not plain http for an https upstream (a downgrade: usable, anonymously).
///   Ports count: a realm on another port of the upstream's host is another service.
/// * Otherwise the realm must pass the address guard ([`AddressGuard::check_target`]: no
///   internal address, no other port of a configured host) and be https; it then gets
///   anonymous requests only.
pub(crate) fn check_realm(
    realm: &Url,
    upstream: &Url,
    extra_hosts: &[String],
    guard: &AddressGuard,
) -> Result<RealmTrust, TokenError> {
    check_realm_target(realm)?;
    let own =
        guard::authority(realm).is_some() && guard::authority(realm) == guard::authority(upstream);
    if own || host_listed(realm, extra_hosts) {
        let downgrade = upstream.scheme() == "https" && realm.scheme() != "https";
        return Ok(if downgrade {
            RealmTrust::AnonymousOnly
        } else {
            RealmTrust::WithCredentials
        });
    }
    guard
        .check_target(realm)
        .map_err(|r| TokenError::BadRealm(r.to_string()))?;
    if realm.scheme() != "https" {
        return Err(TokenError::BadRealm(format!(
            "plain-{} realm {} is neither the upstream nor in token_realm_hosts",
            realm.scheme(),
            guard::authority(realm).unwrap_or_default()
        )));
    }
    Ok(RealmTrust::AnonymousOnly)
}

/// The upstream-independent part of the realm rules: http(s), no userinfo, a host that is not
/// link-local, metadata or unspecified.
fn check_realm_target(url: &Url) -> Result<(), TokenError> {
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(TokenError::BadRealm(format!(
            "scheme {} is not http(s)",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TokenError::BadRealm("realm carries userinfo".into()));
    }
    let ip = match url.host() {
        None => return Err(TokenError::BadRealm("realm has no host".into())),
        Some(Host::Domain(_)) => return Ok(()),
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
    };
    if guard::classify(ip) == AddressClass::Never {
        return Err(TokenError::BadRealm(format!(
            "address {ip} is link-local, unspecified or a metadata endpoint"
        )));
    }
    Ok(())
}

/// Whether the realm's `host:port` is in `token_realm_hosts`; an entry without a port means
/// the realm scheme's default port.
fn host_listed(realm: &Url, extra_hosts: &[String]) -> bool {
    let Some(want) = guard::authority(realm) else {
        return false;
    };
    let default_port = match realm.scheme() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    extra_hosts
        .iter()
        .filter_map(|entry| realm_entry_authority(entry, default_port))
        .any(|a| a == want)
}

/// One token exchange with the token server at `realm`.
///
/// * [`Credential::Basic`] → `GET realm?service=&scope=..&scope=..&account=<user>` with
///   `Authorization: Basic`; if the GET is refused with 405, `POST grant_type=password`.
///   A Basic credential with an empty username or password is used as anonymous.
/// * [`Credential::Anonymous`] → the same GET without `Authorization` and `account`.
/// * [`Credential::IdentityToken`] → `POST` form `grant_type=refresh_token`,
///   `client_id=oci-proxy`, `refresh_token`, `service`, `scope` (space-joined); on 404, 401,
///   400 or 405 falls back to the GET with Basic `<token>:<identity token>`.
/// * [`Credential::RegistryToken`] → returned as is with a 60 s lifetime, no request.
///
/// The realm's own query parameters are kept. The response must carry `token` or
/// `access_token`; see [`TokenError`] for failures. The caller must have checked the realm
/// with [`check_realm`] and pass [`Credential::Anonymous`] for an `AnonymousOnly` realm.
pub(crate) async fn fetch_token(
    http: &reqwest::Client,
    realm: &Url,
    service: Option<&str>,
    scopes: &[String],
    credential: &Credential,
) -> Result<Token, TokenError> {
    check_realm_target(realm)?;
    let mut realm = realm.clone();
    realm.set_fragment(None);
    let req = Exchange {
        http,
        realm: &realm,
        service: service.filter(|s| !s.is_empty()),
        scopes,
    };
    let result = match credential {
        Credential::RegistryToken(token) => {
            return Ok(Token {
                value: token.clone(),
                expires_at: Instant::now() + MIN_TOKEN_LIFETIME,
            })
        }
        Credential::Anonymous => req.get(None).await,
        Credential::Basic { username, password }
            if username.is_empty() || password.expose().is_empty() =>
        {
            req.get(None).await
        }
        Credential::Basic { username, password } => {
            let basic = BasicAuth {
                username,
                password,
                account: true,
            };
            match req.get(Some(basic)).await {
                Err(TokenError::Rejected { status })
                    if status == StatusCode::METHOD_NOT_ALLOWED =>
                {
                    tracing::debug!(
                        realm_host = realm.host_str(),
                        "token GET refused, trying POST"
                    );
                    req.post(Grant::Password { username, password }).await
                }
                other => other,
            }
        }
        Credential::IdentityToken(token) => match req.post(Grant::RefreshToken(token)).await {
            Err(TokenError::Rejected { status })
                if matches!(status.as_u16(), 400 | 401 | 404 | 405) =>
            {
                tracing::debug!(
                    realm_host = realm.host_str(),
                    status = status.as_u16(),
                    "token POST refused, falling back to GET"
                );
                let basic = BasicAuth {
                    username: IDENTITY_TOKEN_USER,
                    password: token,
                    account: false,
                };
                req.get(Some(basic)).await
            }
            other => other,
        },
    };
    match &result {
        Ok(token) => tracing::debug!(
            realm_host = realm.host_str(),
            credential = credential.kind(),
            valid_for_secs = token
                .expires_at
                .saturating_duration_since(Instant::now())
                .as_secs(),
            "token obtained"
        ),
        Err(e) => tracing::debug!(
            realm_host = realm.host_str(),
            credential = credential.kind(),
            error = %e,
            "token exchange failed"
        ),
    }
    result
}

/// Parameters shared by the requests of one exchange.
struct Exchange<'a> {
    http: &'a reqwest::Client,
    realm: &'a Url,
    service: Option<&'a str>,
    scopes: &'a [String],
}

struct BasicAuth<'a> {
    username: &'a str,
    password: &'a Secret<String>,
    /// Whether to add `account=<username>` to the query.
    account: bool,
}

enum Grant<'a> {
    Password {
        username: &'a str,
        password: &'a Secret<String>,
    },
    RefreshToken(&'a Secret<String>),
}

impl Exchange<'_> {
    /// The GET form (token.md).
    async fn get(&self, auth: Option<BasicAuth<'_>>) -> Result<Token, TokenError> {
        let mut url = self.realm.clone();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = self.service {
            pairs.push(("service", service));
        }
        pairs.extend(self.scopes.iter().map(|s| ("scope", s.as_str())));
        if let Some(a) = auth.as_ref().filter(|a| a.account) {
            pairs.push(("account", a.username));
        }
        if !pairs.is_empty() {
            // Appends to the realm's own query, which is kept as is.
            url.query_pairs_mut().extend_pairs(pairs);
        }
        let mut request = self.http.get(url).timeout(REQUEST_TIMEOUT);
        if let Some(a) = auth {
            // `basic_auth` marks the header sensitive; reqwest strips it on cross-host redirects.
            request = request.basic_auth(a.username, Some(a.password.expose()));
        }
        read_token(request.send().await.map_err(transport)?).await
    }

    /// The OAuth2 POST form (oauth.md).
    async fn post(&self, grant: Grant<'_>) -> Result<Token, TokenError> {
        // The serializer is not Send: keep it out of the await below.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            match grant {
                Grant::Password { username, password } => {
                    form.append_pair("grant_type", "password")
                        .append_pair("username", username)
                        .append_pair("password", password.expose());
                }
                Grant::RefreshToken(token) => {
                    form.append_pair("grant_type", "refresh_token")
                        .append_pair("refresh_token", token.expose());
                }
            }
            form.append_pair("client_id", CLIENT_ID);
            if let Some(service) = self.service {
                form.append_pair("service", service);
            }
            if !self.scopes.is_empty() {
                form.append_pair("scope", &self.scopes.join(" "));
            }
            Bytes::from(form.finish())
        };
        let len = body.len();
        // A one-shot stream: reqwest cannot clone it, so a 307/308 is never followed with the
        // secret form (see the module documentation).
        let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
        let request = self
            .http
            .post(self.realm.clone())
            .timeout(REQUEST_TIMEOUT)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        read_token(request.send().await.map_err(transport)?).await
    }
}

/// Reads a token response: success status, at most [`MAX_TOKEN_RESPONSE_BYTES`] of body.
async fn read_token(response: reqwest::Response) -> Result<Token, TokenError> {
    let received = Instant::now();
    let status = response.status();
    if !status.is_success() {
        return Err(TokenError::Rejected { status });
    }
    let too_large = || {
        TokenError::InvalidResponse(format!("body larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"))
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_TOKEN_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    parse_token_response(&body, received)
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// Turns a token response into a [`Token`].
///
/// The lifetime is `expires_in` (default and minimum 60 s, at most a day) counted from
/// `received`, the moment the response arrived, minus a safety margin of 10% (at most 30 s).
/// `issued_at` is deliberately ignored: it is the token server's wall clock, and any skew
/// between that clock and ours would stretch or shrink the lifetime arbitrarily, whereas the
/// server issued the token no later than we received it, so counting from receipt on our own
/// monotonic clock can only end early, never late (the margin absorbs the network delay).
fn parse_token_response(body: &[u8], received: Instant) -> Result<Token, TokenError> {
    // serde_json's messages can quote the offending input, which may be the token itself:
    // report only the position.
    let parsed: TokenResponse = serde_json::from_slice(body).map_err(|e| {
        TokenError::InvalidResponse(format!(
            "not a token JSON object (line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    let value = [parsed.access_token, parsed.token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or_else(|| {
            TokenError::InvalidResponse("neither `token` nor `access_token` is set".into())
        })?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::InvalidResponse(
            "token contains characters not allowed in an Authorization header".into(),
        ));
    }
    let lifetime = parsed
        .expires_in
        .as_ref()
        .and_then(expires_in_secs)
        .map_or(MIN_TOKEN_LIFETIME, Duration::from_secs)
        .clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME);
    let margin = (lifetime / 10).min(MAX_SAFETY_MARGIN);
    let expires_at = received
        .checked_add(lifetime - margin)
        .ok_or_else(|| TokenError::InvalidResponse("lifetime overflows the clock".into()))?;
    Ok(Token {
        value: Secret::new(value),
        expires_at,
    })
}

/// `expires_in` as whole seconds: a number (fractions dropped, negatives as 0) or a numeric
/// string; anything else counts as absent.
fn expires_in_secs(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i.max(0) as u64))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.max(0.0) as u64)
            }),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Tokens cached per [`TokenKey`] until their expiry; concurrent callers for one key share one
/// fetch. Failed fetches are not cached. Cloning shares the cache.
#[derive(Clone)]
pub(crate) struct TokenCache {
    inner: Cache<TokenKey, Token>,
    fetches: Arc<AtomicU64>,
}

/// Each entry lives until its token's `expires_at`.
struct UntilExpiry;

impl Expiry<TokenKey, Token> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        value: &Token,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &TokenKey,
        value: &Token,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(updated_at))
    }
}

impl TokenCache {
    /// A cache holding at most `max_entries` tokens.
    pub(crate) fn new(max_entries: u64) -> Self {
        Self::with_inner(
            Cache::builder()
                .max_capacity(max_entries)
                .expire_after(UntilExpiry)
                .build(),
        )
    }

    fn with_inner(inner: Cache<TokenKey, Token>) -> Self {
        TokenCache {
            inner,
            fetches: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The cached token for `key`, or the result of `fetch` (run at most once across all
    /// concurrent callers for `key`; they all receive its result). An expired token is never
    /// returned: the expiry is checked on read as well as by the cache's timer.
    pub(crate) async fn get_or_fetch<F, Fut>(
        &self,
        key: TokenKey,
        fetch: F,
    ) -> Result<Token, Arc<TokenError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, TokenError>>,
    {
        if let Some(token) = self.inner.get(&key).await {
            if token.is_fresh() {
                return Ok(token);
            }
            self.inner.invalidate(&key).await;
        }
        let fetches = &self.fetches;
        let token = self
            .inner
            .try_get_with(key.clone(), async move {
                fetches.fetch_add(1, Ordering::Relaxed);
                fetch().await
            })
            .await?;
        if token.is_fresh() {
            Ok(token)
        } else {
            // Only possible when a fetch returned a token that was already expired.
            self.inner.invalidate(&key).await;
            Err(Arc::new(TokenError::InvalidResponse(
                "token expired before it could be used".into(),
            )))
        }
    }

    /// Drops the token for `key` (e.g. after the upstream rejected it).
    pub(crate) async fn invalidate(&self, key: &TokenKey) {
        self.inner.invalidate(key).await;
    }

    /// How many fetches actually ran.
    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.inner.entry_count())
            .field("fetches", &self.fetches())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;
    use http::header::{AUTHORIZATION, LOCATION};

    // ---------------------------------------------------------------- token server fixture

    #[derive(Clone, Debug, Default)]
    struct Seen {
        method: String,
        path: String,
        query: Vec<(String, String)>,
        basic: Option<(String, String)>,
        form: Vec<(String, String)>,
    }

    impl Seen {
        fn query_values(&self, name: &str) -> Vec<&str> {
            values(&self.query, name)
        }
        fn form_value(&self, name: &str) -> Option<&str> {
            values(&self.form, name).first().copied()
        }
    }

    fn values<'a>(pairs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[derive(Clone)]
    struct Fixture {
        seen: Arc<Mutex<Vec<Seen>>>,
        /// Where `/redirect` points.
        other: Option<SocketAddr>,
    }

    struct Server {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Server {
        fn url(&self, path: &str) -> Url {
            Url::parse(&format!("http://{}{path}", self.addr)).unwrap()
        }
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    async fn start(other: Option<SocketAddr>) -> Server {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fixture = Fixture {
            seen: seen.clone(),
            other,
        };
        let app = axum::Router::new().fallback(handle).with_state(fixture);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { addr, seen }
    }

    fn decode_basic(v: &http::HeaderValue) -> Option<(String, String)> {
        let b64 = v.to_str().ok()?.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        Some((u.to_owned(), p.to_owned()))
    }

    fn json(body: &str) -> Response {
        ([(CONTENT_TYPE, "application/json")], body.to_owned()).into_response()
    }

    fn status(s: StatusCode) -> Response {
        s.into_response()
    }

    async fn handle(State(fx): State<Fixture>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let parse = |b: &[u8]| -> Vec<(String, String)> {
            url::form_urlencoded::parse(b).into_owned().collect()
        };
        let seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parse(parts.uri.query().unwrap_or("").as_bytes()),
            basic: parts.headers.get(AUTHORIZATION).and_then(decode_basic),
            form: if parts.method == http::Method::POST {
                parse(&body)
            } else {
                Vec::new()
            },
        };
        fx.seen.lock().unwrap().push(seen.clone());
        let basic = seen.basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", "/token") => match basic {
                None => json(r#"{"access_token":"tok-anon"}"#),
                Some(("alice", "s3cret")) => json(r#"{"token":"tok-basic","expires_in":300}"#),
                Some(_) => status(StatusCode::UNAUTHORIZED),
            },
            ("POST", "/token") => {
                if seen.form_value("grant_type") == Some("refresh_token")
                    && seen.form_value("refresh_token") == Some("refresh-1")
                {
                    json(r#"{"access_token":"tok-refresh","scope":"x","expires_in":120}"#)
                } else {
                    status(StatusCode::UNAUTHORIZED)
                }
            }
            ("POST", "/get-only") => status(StatusCode::NOT_FOUND),
            ("GET", "/get-only") => match basic {
                Some(("<token>", "refresh-1")) => json(r#"{"token":"tok-fallback"}"#),
                _ => status(StatusCode::UNAUTHORIZED),
            },
            ("GET", "/post-only") => status(StatusCode::METHOD_NOT_ALLOWED),
            ("POST", "/post-only") => {
                if seen.form_value("grant_type") == Some("password")
                    && seen.form_value("username") == Some("alice")
                    && seen.form_value("password") == Some("s3cret")
                {
                    json(r#"{"access_token":"tok-password","expires_in":60}"#)
                } else {
                    status(StatusCode::UNAUTHORIZED)
                }
            }
            ("GET", "/forbidden") => status(StatusCode::FORBIDDEN),
            ("GET", "/big") => json(&format!(
                r#"{{"token":"t","pad":"{}"}}"#,
                "x".repeat(MAX_TOKEN_RESPONSE_BYTES)
            )),
            ("GET", "/big-stream") => {
                let chunk = Bytes::from(vec![b' '; 8 * 1024]);
                let chunks = (0..9).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                Body::from_stream(futures_util::stream::iter(chunks)).into_response()
            }
            ("GET", "/bad-token") => json(r#"{"token":"has space"}"#),
            ("GET", "/not-json") => json(r#"{"token":"leaky-secret""#),
            (_, "/redirect") => {
                let other = fx.other.expect("fixture without redirect target");
                let q = parts
                    .uri
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(LOCATION, format!("http://{other}/record{q}"))],
                )
                    .into_response()
            }
            (_, "/redirect-metadata") => (
                StatusCode::TEMPORARY_REDIRECT,
                [(LOCATION, "http://169.254.169.254/latest/meta-data")],
            )
                .into_response(),
            (_, "/record") => json(r#"{"token":"tok-record"}"#),
            _ => status(StatusCode::NOT_FOUND),
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn basic(user: &str, pass: &str) -> Credential {
        Credential::Basic {
            username: user.into(),
            password: Secret::new(pass.into()),
        }
    }

    /// The user and password the fixture's token endpoints accept.
    fn alice() -> Credential {
        basic("alice", "s3cret")
    }

    /// The identity token the fixture's refresh grant accepts.
    fn refresh_1() -> Credential {
        Credential::IdentityToken(Secret::new("refresh-1".into()))
    }

    /// [`fetch_token`] with the test client against `path` on `srv`.
    async fn fetch_at(
        srv: &Server,
        path: &str,
        service: Option<&str>,
        scopes: &[String],
        credential: &Credential,
    ) -> Result<Token, TokenError> {
        fetch_token(&client(), &srv.url(path), service, scopes, credential).await
    }

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// Asserts the token expires `secs` after a moment between `before` and now.
    fn assert_lifetime(token: &Token, before: Instant, secs: u64) {
        let d = Duration::from_secs(secs);
        assert!(
            token.expires_at >= before + d && token.expires_at <= Instant::now() + d,
            "expected a lifetime of {secs}s"
        );
    }

    // ---------------------------------------------------------------- fetch_token

    #[tokio::test]
    async fn basic_get_sends_service_scopes_account_and_authorization() {
        let srv = start(None).await;
        let before = Instant::now();
        let token = fetch_at(
            &srv,
            "/token",
            Some("svc"),
            &scopes(&["repository:a/b:pull", "repository:c/d:pull"]),
            &alice(),
        )
        .await
        .unwrap();
        assert_eq!(token.value.expose(), "tok-basic");
        // 300 s minus a 30 s margin.
        assert_lifetime(&token, before, 270);
        let seen = srv.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].query_values("service"), ["svc"]);
        assert_eq!(
            seen[0].query_values("scope"),
            ["repository:a/b:pull", "repository:c/d:pull"]
        );
        assert_eq!(seen[0].query_values("account"), ["alice"]);
        assert_eq!(seen[0].basic, Some(("alice".into(), "s3cret".into())));
    }

    #[tokio::test]
    async fn anonymous_get_has_no_credentials_and_defaults_to_60s() {
        let srv = start(None).await;
        let before = Instant::now();
        let token = fetch_at(
            &srv,
            "/token",
            Some("svc"),
            &scopes(&["repository:a/b:pull"]),
            &Credential::Anonymous,
        )
        .await
        .unwrap();
        assert_eq!(token.value.expose(), "tok-anon");
        // Missing expires_in → 60 s, minus 10%.
        assert_lifetime(&token, before, 54);
        let seen = srv.seen();
        assert_eq!(seen[0].basic, None);
        assert!(seen[0].query_values("account").is_empty());
    }

    #[tokio::test]
    async fn basic_with_empty_password_is_anonymous() {
        let srv = start(None).await;
        let token = fetch_at(&srv, "/token", None, &[], &basic("alice", ""))
            .await
            .unwrap();
        assert_eq!(token.value.expose(), "tok-anon");
        assert_eq!(srv.seen()[0].basic, None);
    }

    #[tokio::test]
    async fn identity_token_posts_a_refresh_grant() {
        let srv = start(None).await;
        let before = Instant::now();
        let token = fetch_at(
            &srv,
            "/token",
            Some("svc"),
            &scopes(&["repository:a/b:pull", "repository:c/d:pull"]),
            &refresh_1(),
        )
        .await
        .unwrap();
        assert_eq!(token.value.expose(), "tok-refresh");
        assert_lifetime(&token, before, 108);
        let seen = srv.seen();
        assert_eq!(seen.len(), 1);
        let post = &seen[0];
        assert_eq!(post.method, "POST");
        assert_eq!(post.form_value("grant_type"), Some("refresh_token"));
        assert_eq!(post.form_value("client_id"), Some(CLIENT_ID));
        assert_eq!(post.form_value("refresh_token"), Some("refresh-1"));
        assert_eq!(post.form_value("service"), Some("svc"));
        assert_eq!(
            post.form_value("scope"),
            Some("repository:a/b:pull repository:c/d:pull")
        );
        assert_eq!(post.basic, None);
    }

    #[tokio::test]
    async fn identity_token_falls_back_to_get_when_post_is_404() {
        let srv = start(None).await;
        let token = fetch_at(
            &srv,
            "/get-only",
            Some("svc"),
            &scopes(&["repository:a/b:pull"]),
            &refresh_1(),
        )
        .await
        .unwrap();
        assert_eq!(token.value.expose(), "tok-fallback");
        let seen = srv.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[1].method, "GET");
        assert_eq!(seen[1].basic, Some(("<token>".into(), "refresh-1".into())));
        assert!(seen[1].query_values("account").is_empty());
        assert_eq!(seen[1].query_values("scope"), ["repository:a/b:pull"]);
    }

    #[tokio::test]
    async fn basic_falls_back_to_password_post_when_get_is_405() {
        let srv = start(None).await;
        let token = fetch_at(&srv, "/post-only", Some("svc"), &[], &alice())
            .await
            .unwrap();
        assert_eq!(token.value.expose(), "tok-password");
        let seen = srv.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].method, "POST");
        assert_eq!(seen[1].form_value("grant_type"), Some("password"));
        assert_eq!(seen[1].form_value("client_id"), Some(CLIENT_ID));
        assert_eq!(seen[1].form_value("service"), Some("svc"));
        assert_eq!(seen[1].form_value("scope"), None);
    }

    #[tokio::test]
    async fn bad_credentials_are_an_auth_failure_without_the_secret() {
        let srv = start(None).await;
        let err = fetch_at(&srv, "/token", None, &[], &basic("alice", "wrong-pw"))
            .await
            .unwrap_err();
        assert!(err.is_auth_failure(), "{err}");
        assert!(
            matches!(err, TokenError::Rejected { status } if status == StatusCode::UNAUTHORIZED)
        );
        assert!(!format!("{err} {err:?}").contains("wrong-pw"));

        let err = fetch_at(&srv, "/forbidden", None, &[], &Credential::Anonymous)
            .await
            .unwrap_err();
        assert!(err.is_auth_failure());
        let err = fetch_at(&srv, "/nowhere", None, &[], &Credential::Anonymous)
            .await
            .unwrap_err();
        assert!(!err.is_auth_failure());
    }

    #[tokio::test]
    async fn oversized_bodies_are_rejected() {
        let srv = start(None).await;
        for path in ["/big", "/big-stream"] {
            let err = fetch_at(&srv, path, None, &[], &Credential::Anonymous)
                .await
                .unwrap_err();
            assert!(
                matches!(err, TokenError::InvalidResponse(ref m) if m.contains("larger")),
                "{path}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn unusable_responses_are_invalid_and_do_not_echo_the_body() {
        let srv = start(None).await;
        for path in ["/bad-token", "/not-json"] {
            let err = fetch_at(&srv, path, None, &[], &Credential::Anonymous)
                .await
                .unwrap_err();
            assert!(
                matches!(err, TokenError::InvalidResponse(_)),
                "{path}: {err}"
            );
            let text = format!("{err} {err:?}");
            assert!(!text.contains("leaky-secret") && !text.contains("has space"));
        }
    }

    #[tokio::test]
    async fn realm_query_parameters_are_kept() {
        let srv = start(None).await;
        let mut realm = srv.url("/token");
        realm.set_query(Some("tenant=t1&scope=realm-scope"));
        realm.set_fragment(Some("frag"));
        fetch_token(
            &client(),
            &realm,
            Some("svc"),
            &scopes(&["repository:a/b:pull"]),
            &Credential::Anonymous,
        )
        .await
        .unwrap();
        let seen = srv.seen();
        assert_eq!(seen[0].query_values("tenant"), ["t1"]);
        assert_eq!(
            seen[0].query_values("scope"),
            ["realm-scope", "repository:a/b:pull"]
        );
        assert_eq!(seen[0].query_values("service"), ["svc"]);
    }

    #[tokio::test]
    async fn registry_token_is_used_as_is_without_a_request() {
        let srv = start(None).await;
        let before = Instant::now();
        let token = fetch_at(
            &srv,
            "/token",
            None,
            &[],
            &Credential::RegistryToken(Secret::new("ready".into())),
        )
        .await
        .unwrap();
        assert_eq!(token.value.expose(), "ready");
        assert_lifetime(&token, before, 60);
        assert!(srv.seen().is_empty());
    }

    #[tokio::test]
    async fn token_requests_never_follow_redirects() {
        let other = start(None).await;
        let srv = start(Some(other.addr)).await;
        // Neither the GET with Basic nor the POST with a refresh token in its body follows.
        for credential in [alice(), refresh_1(), Credential::Anonymous] {
            let err = fetch_at(&srv, "/redirect", Some("svc"), &[], &credential)
                .await
                .unwrap_err();
            assert!(
                matches!(err, TokenError::Rejected { status } if status.is_redirection()),
                "{err}"
            );
        }
        assert_eq!(
            other.seen().len(),
            0,
            "nothing may reach the redirect target"
        );
        let err = fetch_at(
            &srv,
            "/redirect-metadata",
            None,
            &[],
            &Credential::Anonymous,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, TokenError::Rejected { status } if status == StatusCode::TEMPORARY_REDIRECT),
            "{err}"
        );
    }

    #[tokio::test]
    async fn forbidden_realms_are_refused_before_any_request() {
        for realm in [
            "http://169.254.169.254/token",
            "https://[fd00:ec2::254]/token",
            "ftp://127.0.0.1/token",
            "https://user:pw@127.0.0.1/token",
        ] {
            let err = fetch_token(&client(), &Url::parse(realm).unwrap(), None, &[], &alice())
                .await
                .unwrap_err();
            assert!(matches!(err, TokenError::BadRealm(_)), "{realm}: {err}");
            assert!(!err.to_string().contains("pw@"));
        }
    }

    // ---------------------------------------------------------------- response parsing

    #[test]
    fn lifetime_rules() {
        let now = Instant::now();
        let life = |body: &str| {
            parse_token_response(body.as_bytes(), now)
                .unwrap()
                .expires_at
                .duration_since(now)
                .as_secs()
        };
        assert_eq!(life(r#"{"token":"t"}"#), 54);
        assert_eq!(life(r#"{"token":"t","expires_in":10}"#), 54);
        assert_eq!(life(r#"{"token":"t","expires_in":-5}"#), 54);
        assert_eq!(life(r#"{"token":"t","expires_in":"bogus"}"#), 54);
        assert_eq!(life(r#"{"token":"t","expires_in":100}"#), 90);
        assert_eq!(life(r#"{"token":"t","expires_in":"100"}"#), 90);
        assert_eq!(life(r#"{"token":"t","expires_in":100.9}"#), 90);
        assert_eq!(life(r#"{"token":"t","expires_in":3600}"#), 3570);
        assert_eq!(life(r#"{"token":"t","expires_in":1e300}"#), 86370);
        // issued_at is ignored, however far off it is.
        assert_eq!(
            life(r#"{"token":"t","expires_in":300,"issued_at":"2001-01-01T00:00:00Z"}"#),
            270
        );
    }

    #[test]
    fn token_field_choice() {
        let now = Instant::now();
        let value = |body: &str| {
            parse_token_response(body.as_bytes(), now).map(|t| t.value.expose().clone())
        };
        assert_eq!(value(r#"{"token":"a"}"#).unwrap(), "a");
        assert_eq!(value(r#"{"access_token":"b"}"#).unwrap(), "b");
        assert_eq!(value(r#"{"token":"a","access_token":"b"}"#).unwrap(), "b");
        assert_eq!(value(r#"{"token":"a","access_token":""}"#).unwrap(), "a");
        assert!(value(r#"{"token":"","access_token":null}"#).is_err());
        assert!(value(r#"{}"#).is_err());
        assert!(value(r#"[]"#).is_err());
        assert!(value("{\"token\":\"a\\nb\"}").is_err());
    }

    // ---------------------------------------------------------------- realm trust

    fn trust(realm: &str, upstream: &str, extra: &[&str]) -> Result<RealmTrust, TokenError> {
        trust_with(realm, upstream, extra, &[])
    }

    /// [`check_realm`] with `allowed` authorities in the address guard (other upstreams).
    fn trust_with(
        realm: &str,
        upstream: &str,
        extra: &[&str],
        allowed: &[&str],
    ) -> Result<RealmTrust, TokenError> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let guard = AddressGuard::new();
        guard.set_allowed(allowed.iter().map(|s| s.to_string()));
        check_realm(
            &Url::parse(realm).unwrap(),
            &Url::parse(upstream).unwrap(),
            &extra,
            &guard,
        )
    }

    #[test]
    fn realm_rules() {
        use RealmTrust::*;
        let hub = "https://registry-1.docker.io";
        // Same host and port (any scheme for a plain-http upstream).
        assert_eq!(
            trust("https://ghcr.io/token", "https://ghcr.io", &[]).unwrap(),
            WithCredentials
        );
        assert_eq!(
            trust("https://ghcr.io:443/token", "https://ghcr.io", &[]).unwrap(),
            WithCredentials
        );
        assert_eq!(
            trust("http://127.0.0.1:5000/token", "http://127.0.0.1:5000", &[]).unwrap(),
            WithCredentials
        );
        // Another port of the upstream's host is another service: on a loopback address it
        // is refused, on a public name it is a foreign https realm (anonymous only).
        assert!(matches!(
            trust("http://127.0.0.1:5002/token", "http://127.0.0.1:5000", &[]),
            Err(TokenError::BadRealm(_))
        ));
        assert_eq!(
            trust("https://ghcr.io:8443/token", "https://ghcr.io", &[]).unwrap(),
            AnonymousOnly
        );
        // ... unless listed with its port.
        assert_eq!(
            trust(
                "http://127.0.0.1:5002/token",
                "http://127.0.0.1:5000",
                &["127.0.0.1:5002"]
            )
            .unwrap(),
            WithCredentials
        );
        assert!(trust(
            "http://127.0.0.1:5002/token",
            "http://127.0.0.1:5000",
            &["127.0.0.1:5003", "127.0.0.1"]
        )
        .is_err());
        // Allow-list, case-insensitive; a bare host means the realm scheme's default port.
        assert_eq!(
            trust("https://auth.docker.io/token", hub, &["auth.docker.io"]).unwrap(),
            WithCredentials
        );
        assert_eq!(
            trust("https://auth.docker.io/token", hub, &["Auth.Docker.IO"]).unwrap(),
            WithCredentials
        );
        assert_eq!(
            trust("https://auth.docker.io/token", hub, &["auth.docker.io:443"]).unwrap(),
            WithCredentials
        );
        for extra in [&["auth.docker.io:443"][..], &["auth.docker.io"][..]] {
            assert_eq!(
                trust("https://auth.docker.io:8443/token", hub, extra).unwrap(),
                AnonymousOnly
            );
        }
        // https on another host: anonymous only.
        assert_eq!(
            trust("https://auth.docker.io/token", hub, &[]).unwrap(),
            AnonymousOnly
        );
        assert_eq!(
            trust("https://evil.example/token", hub, &["auth.docker.io"]).unwrap(),
            AnonymousOnly
        );
        // Plain http on the https upstream's host is port 80: another service, refused; a
        // listed plain-http realm for an https upstream is a downgrade: no credentials.
        assert!(trust("http://ghcr.io/token", "https://ghcr.io", &[]).is_err());
        assert_eq!(
            trust(
                "http://auth.ghcr.io/token",
                "https://ghcr.io",
                &["auth.ghcr.io:80"]
            )
            .unwrap(),
            AnonymousOnly
        );
        // Plain http on another host: unusable unless listed.
        assert!(matches!(
            trust("http://auth.docker.io/token", hub, &[]),
            Err(TokenError::BadRealm(_))
        ));
        assert!(trust("http://127.0.0.2:5002/token", "http://127.0.0.1:5000", &[]).is_err());
        // Internal addresses and names: refused unless they are an allowed authority.
        for realm in [
            "https://10.0.0.1/token",
            "https://127.0.0.1:9999/token",
            "https://[::1]/token",
            "https://100.64.0.1/token",
            "https://[fd12::1]/token",
            "https://localhost/token",
        ] {
            assert!(
                matches!(trust(realm, hub, &[]), Err(TokenError::BadRealm(_))),
                "{realm}"
            );
        }
        assert_eq!(
            trust_with("https://10.0.0.1/token", hub, &[], &["10.0.0.1:443"]).unwrap(),
            AnonymousOnly
        );
        // Never: metadata / link-local / unspecified / odd schemes / userinfo, even on the
        // upstream's own host or the allow-list.
        for realm in [
            "https://169.254.169.254/latest",
            "http://169.254.169.254/latest",
            "https://[fd00:ec2::254]/latest",
            "https://[fe80::1]/token",
            "https://[febf::1]/token",
            "https://[::ffff:169.254.1.1]/token",
            "https://0.0.0.0/token",
            "ftp://ghcr.io/token",
            "file:///etc/passwd",
            "https://u:p@ghcr.io/token",
        ] {
            for upstream in [
                "https://ghcr.io",
                "http://169.254.169.254",
                "https://[fd00:ec2::254]",
            ] {
                assert!(
                    matches!(
                        trust(realm, upstream, &["169.254.169.254"]),
                        Err(TokenError::BadRealm(_))
                    ),
                    "{realm} for {upstream}"
                );
            }
        }
    }

    // ---------------------------------------------------------------- cache

    fn key(credential: &Credential) -> TokenKey {
        TokenKey::new(
            &Url::parse("https://auth.example/token").unwrap(),
            Some("svc"),
            [
                "repository:b:pull",
                "repository:a:pull",
                "repository:b:pull",
            ],
            credential.id(),
        )
    }

    fn token(value: &str, valid_for: Duration) -> Token {
        Token {
            value: Secret::new(value.into()),
            expires_at: Instant::now() + valid_for,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Gets `k` from `cache`; a miss mints `value` valid for `valid_for` at fetch time.
    async fn cached(cache: &TokenCache, k: &TokenKey, value: &str, valid_for: Duration) -> Token {
        cache
            .get_or_fetch(k.clone(), || async move { Ok(token(value, valid_for)) })
            .await
            .unwrap()
    }

    /// Polls `cond` until it holds, failing the test after 10 s.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn key_scopes_are_sorted_and_deduplicated() {
        assert_eq!(
            key(&Credential::Anonymous).scopes,
            ["repository:a:pull", "repository:b:pull"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_fetch() {
        let cache = TokenCache::new(100);
        let ran = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(21));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, ran, release, start) =
                (cache.clone(), ran.clone(), release.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                cache
                    .get_or_fetch(key(&Credential::Anonymous), || async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        // Hold the fetch open until the test lets it finish.
                        let _permit = release.acquire().await;
                        Ok(token("shared", HOUR))
                    })
                    .await
            }));
        }
        start.wait().await;
        wait_for("the first fetch to start", || {
            ran.load(Ordering::SeqCst) == 1
        })
        .await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        release.add_permits(100);
        for task in tasks {
            let got = task.await.unwrap().unwrap();
            assert_eq!(got.value.expose(), "shared");
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(cache.fetches(), 1);
    }

    #[tokio::test]
    async fn different_credentials_get_different_entries() {
        let cache = TokenCache::new(100);
        let a = cached(&cache, &key(&basic("u", "p1")), "a", HOUR).await;
        let b = cached(&cache, &key(&basic("u", "p2")), "b", HOUR).await;
        let a2 = cached(&cache, &key(&basic("u", "p1")), "a-again", HOUR).await;
        assert_eq!(
            (
                a.value.expose().as_str(),
                b.value.expose().as_str(),
                a2.value.expose().as_str()
            ),
            ("a", "b", "a")
        );
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test]
    async fn invalidate_forces_a_new_fetch() {
        let cache = TokenCache::new(100);
        let k = key(&Credential::Anonymous);
        cached(&cache, &k, "one", HOUR).await;
        cache.invalidate(&k).await;
        let t = cached(&cache, &k, "two", HOUR).await;
        assert_eq!(t.value.expose(), "two");
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test]
    async fn expired_token_is_refetched() {
        let cache = TokenCache::new(100);
        let k = key(&Credential::Anonymous);
        let first = cached(&cache, &k, "short", Duration::from_millis(100)).await;
        let expires_at = first.expires_at;
        wait_for("the token to expire", || Instant::now() >= expires_at).await;
        let second = cached(&cache, &k, "long", HOUR).await;
        assert_eq!(second.value.expose(), "long");
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test]
    async fn expiry_is_checked_on_read_not_only_by_the_timer() {
        // A cache without any expiry policy: only the read-side check protects us.
        let cache = TokenCache::with_inner(Cache::builder().max_capacity(10).build());
        let k = key(&Credential::Anonymous);
        let mut stale = token("stale", HOUR);
        stale.expires_at = Instant::now();
        cache.inner.insert(k.clone(), stale).await;
        let t = cached(&cache, &k, "fresh", HOUR).await;
        assert_eq!(t.value.expose(), "fresh");
        assert_eq!(cache.fetches(), 1);
    }

    #[tokio::test]
    async fn already_expired_fetch_result_is_not_returned_or_kept() {
        let cache = TokenCache::new(100);
        let k = key(&Credential::Anonymous);
        let err = cache
            .get_or_fetch(k.clone(), || async {
                let mut t = token("dead", HOUR);
                t.expires_at = Instant::now();
                Ok(t)
            })
            .await
            .unwrap_err();
        assert!(matches!(*err, TokenError::InvalidResponse(_)));
        let t = cached(&cache, &k, "alive", HOUR).await;
        assert_eq!(t.value.expose(), "alive");
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let cache = TokenCache::new(100);
        let k = key(&Credential::Anonymous);
        let err = cache
            .get_or_fetch(k.clone(), || async {
                Err(TokenError::Rejected {
                    status: StatusCode::UNAUTHORIZED,
                })
            })
            .await
            .unwrap_err();
        assert!(err.is_auth_failure());
        let t = cached(&cache, &k, "ok", HOUR).await;
        assert_eq!(t.value.expose(), "ok");
        assert_eq!(cache.fetches(), 2);
    }
}
