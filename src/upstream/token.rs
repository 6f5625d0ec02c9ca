//! Bearer tokens for upstream registries: where credentials may be sent ([`check_realm`]), one
//! token exchange with a token server ([`fetch_token`], distribution's GET form and the OAuth2
//! POST form), and the per-key token cache with single-flight fetches ([`TokenCache`]).
//!
//! # Credentials never leave the trust boundary
//!
//! * The caller decides with [`check_realm`] whether a realm named by an upstream's challenge may
//!   receive credentials at all; when it may not, it passes [`Credential::Anonymous`].
//! * [`fetch_token`] itself refuses realms that are not `http(s)`, carry userinfo, or point at a
//!   link-local / cloud metadata address, whatever the caller decided.
//! * Redirects: reqwest (0.12, `src/redirect.rs` `remove_sensitive_headers`) drops
//!   `Authorization` whenever a redirect changes host or port, so Basic credentials on a GET
//!   never follow a redirect to another host. A POST carries its secret (password or refresh
//!   token) in the *body*, which tower-http's redirect layer re-sends on 307/308 when it can
//!   clone it; the form is therefore sent as a one-shot *stream* body, which reqwest cannot
//!   clone (`Body::try_clone` → `None`), so a 307/308 answer to a POST is never followed and
//!   comes back as [`TokenError::Rejected`]. (301/302/303 turn the POST into a body-less GET.)
//! * Clients used for token exchange should be built with [`redirect_policy`], which also stops
//!   redirects to non-http(s) schemes and forbidden addresses.

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

use crate::credentials::{Credential, CredentialId, Secret};

/// Largest token response body accepted.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Shortest lifetime of a token (token spec: the default and the minimum of `expires_in`).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest lifetime believed, whatever the server says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Upper bound of the safety margin subtracted from a token's lifetime.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(30);
/// Timeout of one token request (distribution's client uses 15 s too).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Redirect hops followed by [`redirect_policy`].
const MAX_REDIRECTS: usize = 5;
/// `client_id` sent in OAuth2 POST requests.
pub const CLIENT_ID: &str = "oci-proxy";
/// Username that goes with an identity token in Basic auth (docker credential helper convention).
const IDENTITY_TOKEN_USER: &str = "<token>";

/// What a token is cached under: a token is only valid for the realm, service and scopes it
/// was requested for, and only reusable by the same credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    /// Sorted and de-duplicated (use [`TokenKey::new`]).
    pub scopes: Vec<String>,
    pub credential: CredentialId,
}

impl TokenKey {
    /// Builds a key, sorting and de-duplicating the scopes.
    pub fn new<S: Into<String>>(
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
pub struct Token {
    pub value: Secret<String>,
    pub expires_at: Instant,
}

impl Token {
    /// Whether the token may still be used now.
    pub fn is_fresh(&self) -> bool {
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
pub enum RealmTrust {
    /// Credentials may be sent to the realm.
    WithCredentials,
    /// The realm may be asked for an anonymous token only.
    AnonymousOnly,
}

/// Whether `realm` may be used at all, and whether credentials may be sent to it.
///
/// * Never: a scheme other than http(s), a realm with userinfo, a link-local address
///   (169.254.0.0/16, fe80::/10), the unspecified address, or the metadata address
///   `fd00:ec2::254`.
/// * Usable: `https`, or any scheme when the realm host equals the upstream host (plain-http
///   test upstreams); an `http` realm on another host is refused.
/// * Credentials: only when the realm host equals the upstream host or is listed in
///   `extra_hosts` (`host` or `host:port`, e.g. `auth.docker.io`), and never over plain http
///   when the upstream itself is https (a downgrade).
///
/// Hosts are compared by name, ports ignored (a registry's token server often listens on
/// another port of the same host). DNS names are not resolved.
pub fn check_realm(
    realm: &Url,
    upstream: &Url,
    extra_hosts: &[String],
) -> Result<RealmTrust, TokenError> {
    check_realm_target(realm)?;
    let same_host = realm.host().is_some() && realm.host() == upstream.host();
    if realm.scheme() != "https" && !same_host {
        return Err(TokenError::BadRealm(format!(
            "plain-{} realm on host {} other than the upstream's",
            realm.scheme(),
            realm.host_str().unwrap_or_default()
        )));
    }
    let downgrade = upstream.scheme() == "https" && realm.scheme() != "https";
    if (same_host || host_listed(realm, extra_hosts)) && !downgrade {
        Ok(RealmTrust::WithCredentials)
    } else {
        Ok(RealmTrust::AnonymousOnly)
    }
}

/// The upstream-independent part of the realm rules: http(s), no userinfo, a host that is not
/// forbidden.
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
    if forbidden_ip(ip) {
        return Err(TokenError::BadRealm(format!(
            "address {ip} is link-local, unspecified or a metadata endpoint"
        )));
    }
    Ok(())
}

/// Link-local (incl. 169.254.169.254), unspecified, and the EC2 IPv6 metadata address;
/// IPv4-mapped IPv6 addresses are judged as their IPv4 address.
fn forbidden_ip(ip: IpAddr) -> bool {
    const EC2_METADATA_V6: [u16; 8] = [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254];
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_ip(IpAddr::V4(v4)),
            None => {
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.is_unspecified()
                    || v6.segments() == EC2_METADATA_V6
            }
        },
    }
}

fn host_listed(realm: &Url, extra_hosts: &[String]) -> bool {
    let Some(host) = realm.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let with_port = realm.port_or_known_default().map(|p| format!("{host}:{p}"));
    extra_hosts.iter().any(|entry| {
        let entry = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        entry == host || entry == bare || with_port.as_deref() == Some(entry.as_str())
    })
}

/// The redirect policy for clients that talk to token servers: at most 5 hops; a redirect to a
/// non-http(s) scheme, a URL with userinfo, or a forbidden address (see [`check_realm`]) is
/// not followed (the 3xx response is returned and becomes [`TokenError::Rejected`]).
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if check_realm_target(attempt.url()).is_err() {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
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
pub async fn fetch_token(
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
pub struct TokenCache {
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
    pub fn new(max_entries: u64) -> Self {
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
    pub async fn get_or_fetch<F, Fut>(
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
    pub async fn invalidate(&self, key: &TokenKey) {
        self.inner.invalidate(key).await;
    }

    /// How many fetches actually ran.
    pub fn fetches(&self) -> u64 {
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
