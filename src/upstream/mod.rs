//! Upstream registries: one [`Upstream`] per registry, holding its HTTP client, the auth scheme
//! it announced, and access to the shared token cache. [`Upstream::send`] performs one
//! authenticated request: it learns the challenge from the first 401, exchanges credentials
//! for a token (cached), and retries once with a fresh token when a cached one is refused.
//!
//! Where requests may go is [`guard`]'s concern: only blob GETs and HEADs follow redirects
//! (registries send blobs to CDNs), through a policy that refuses internal targets; manifests,
//! tags, referrers and token requests never follow one; every name resolves through
//! [`guard::GuardedResolver`]; no `Referer` is ever sent.
//!
//! [`Upstreams::rebuild`] (on a config reload) carries each upstream's client, learned
//! challenge and token cache over to the new config while that upstream's own settings are
//! unchanged, so a reload does not cause a burst of challenge round-trips and token exchanges.

pub(crate) mod challenge;
pub(crate) mod guard;
pub(crate) mod slots;
pub(crate) mod token;

pub(crate) use challenge::Challenge;
pub(crate) use guard::{AddressGuard, Refusal};
pub(crate) use token::{RealmTrust, TokenCache, TokenError, TokenKey};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::header::{ACCEPT, AUTHORIZATION, RANGE, RETRY_AFTER};
use http::{HeaderValue, Method, StatusCode};
use tokio::sync::OwnedSemaphorePermit;
use url::Url;

use crate::config::{Config, UpstreamConfig};
use crate::credentials::Credential;
use crate::metrics::Metrics;
use crate::protocol::Repository;

/// Why an upstream request failed. Mapped to a client error in `crate::error`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} refused the credentials")]
    Unauthorized { upstream: String },
    #[error("upstream {upstream} denied access")]
    Denied { upstream: String },
    #[error("upstream {upstream} has no such content")]
    NotFound { upstream: String },
    #[error("upstream {upstream} is rate limiting requests")]
    TooManyRequests {
        upstream: String,
        retry_after: Option<HeaderValue>,
    },
    #[error("upstream {upstream} answered {status}")]
    Status {
        upstream: String,
        status: StatusCode,
    },
    #[error("upstream {upstream} is unreachable: {message}")]
    Unreachable { upstream: String, message: String },
    /// A redirect or an address the proxy does not follow (see [`guard`]).
    #[error("upstream {upstream} sent the request where the proxy does not follow: {refusal}")]
    Refused { upstream: String, refusal: Refusal },
    /// No upstream slot within `limits.upstream_slot_wait` (the proxy is busy, not the
    /// upstream).
    #[error("proxy busy: {busy} for upstream {upstream}; retry later")]
    Busy { upstream: String, busy: slots::Busy },
    #[error("upstream {upstream} token exchange failed: {source}")]
    Token {
        upstream: String,
        #[source]
        source: Arc<TokenError>,
    },
}

impl UpstreamError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            UpstreamError::Unauthorized { .. } => "unauthorized",
            UpstreamError::Denied { .. } => "denied",
            UpstreamError::NotFound { .. } => "not_found",
            UpstreamError::TooManyRequests { .. } => "rate_limited",
            UpstreamError::Status { .. } => "status",
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::Refused { refusal, .. } => refusal.metric_label(),
            UpstreamError::Token { .. } => "token",
            UpstreamError::Busy { .. } => "busy",
        }
    }

    /// Errors after which a cached copy may be served instead (stale-if-error).
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::TooManyRequests { .. }
            | UpstreamError::Unreachable { .. }
            | UpstreamError::Busy { .. } => true,
            UpstreamError::Status { status, .. } => status.is_server_error(),
            UpstreamError::Token { source, .. } => !source.is_auth_failure(),
            _ => false,
        }
    }
}

/// The auth scheme an upstream announced on its last 401.
#[derive(Clone, Debug, Default)]
enum Scheme {
    /// Not learned yet: the first request goes out without credentials.
    #[default]
    Unknown,
    Basic,
    Bearer {
        realm: Url,
        service: Option<String>,
    },
}

/// What a request to an upstream is for, relative to `/v2/<repository>/`.
#[derive(Clone, Debug)]
pub struct UpstreamRequest<'a> {
    pub method: Method,
    pub repository: &'a Repository,
    /// `manifests/<ref>`, `blobs/<digest>`, `tags/list`, `referrers/<digest>`.
    pub path: String,
    pub query: Option<String>,
    pub accept: Option<&'a str>,
    pub range: Option<&'a HeaderValue>,
}

/// One upstream registry.
pub struct Upstream {
    /// How clients name it (first path segment, `ns=`), and the host its credentials are for.
    pub name: String,
    pub endpoint: Url,
    pub tag_ttl: Duration,
    /// Client, learned challenge and tokens; shared with the previous config's `Upstream` when
    /// a reload left this upstream's settings unchanged.
    session: Arc<Session>,
    fetch_slots: Arc<slots::Slots>,
    metrics: Arc<Metrics>,
    /// Where requests may go; shared by every upstream and carried across reloads.
    guard: Arc<AddressGuard>,
}

/// The two clients of an upstream; both resolve names through [`guard::GuardedResolver`] and
/// never send `Referer`.
#[derive(Clone)]
struct Clients {
    /// Follows no redirect: manifests, tags, referrers, token requests.
    plain: reqwest::Client,
    /// Follows up to [`MAX_REDIRECTS`] redirects that pass [`AddressGuard::check_target`].
    blob: reqwest::Client,
}

/// Redirect hops followed for a blob.
const MAX_REDIRECTS: usize = 5;

/// What an upstream builds or learns while running: its HTTP client (and connection pool),
/// the auth scheme it announced, and the tokens it handed out. It depends only on
/// [`Settings`], so a reload that leaves those equal carries it over.
struct Session {
    settings: Settings,
    http: Clients,
    scheme: RwLock<Scheme>,
    /// Keyed by realm, service, scopes and the credential's fingerprint ([`Credential::id`],
    /// a hash over the secret itself): a rotated credential never matches a token fetched with
    /// the old one, so keeping this cache across reloads cannot hand out a stale identity.
    tokens: TokenCache,
}

/// Everything an upstream's [`Session`] is built from. `tag_ttl` is not part of it: it only
/// changes how long the server trusts a tag, not how the upstream is talked to.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    /// The upstream's config entry with `tag_ttl` cleared.
    upstream: UpstreamConfig,
    /// The contents of `ca_file` (a rotated CA bundle under the same path is a change).
    ca_pem: Option<Vec<u8>>,
    /// `limits.upstream_timeout`.
    timeout: Duration,
}

/// Token cache entries per upstream.
const TOKENS_PER_UPSTREAM: u64 = 10_000;

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint.as_str())
            .finish()
    }
}

/// A response with the upstream fetch slot it holds until its body is dropped.
pub struct UpstreamResponse {
    pub response: reqwest::Response,
    pub permit: OwnedSemaphorePermit,
}

impl Upstream {
    /// The `host[:port]` of the upstream's endpoint.
    pub fn endpoint_host(&self) -> String {
        host_port(&self.endpoint)
    }

    /// Sends one request, authenticating as `credential`. Returns the response for 2xx, 3xx
    /// and 416; every other status becomes an [`UpstreamError`].
    pub async fn send(
        &self,
        req: &UpstreamRequest<'_>,
        credential: &Credential,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let pool = slots::Pool::of(&req.method, &req.path);
        let permit = self
            .fetch_slots
            .acquire(pool, &self.name, &self.metrics)
            .await
            .map_err(|busy| UpstreamError::Busy {
                upstream: self.name.clone(),
                busy,
            })?;
        let started = Instant::now();
        let result = self.send_authenticated(req, credential).await;
        let outcome = match &result {
            Ok(r) => status_class(r.status()),
            Err(e) => e.metric_label(),
        };
        if let Err(UpstreamError::Refused { refusal, .. }) = &result {
            // The one place a refused redirect or address is logged (and, below, counted).
            tracing::warn!(upstream = %self.name, path = %req.path, reason = %refusal,
                outcome, "upstream redirect or address refused");
        }
        self.metrics
            .upstream_request(&self.name, outcome, started.elapsed());
        result.map(|response| UpstreamResponse { response, permit })
    }

    async fn send_authenticated(
        &self,
        req: &UpstreamRequest<'_>,
        credential: &Credential,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url_for(req);
        let scope = format!("repository:{}:pull", req.repository);
        let mut used_token: Option<TokenKey> = None;
        for attempt in 0..2 {
            let scheme = self.current_scheme();
            let auth = self
                .authorization(&scheme, &scope, credential, &mut used_token)
                .await?;
            let resp = self.request(req, &url, auth).await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return self.check_status(resp, req);
            }
            // 401: learn (or re-learn) the challenge; drop a refused token; retry once.
            let learned = challenge::pick(&challenge::from_headers(resp.headers()));
            let changed = self.learn(learned);
            if let Some(key) = used_token.take() {
                self.session.tokens.invalidate(&key).await;
            } else if !changed && attempt == 0 && matches!(credential, Credential::Anonymous) {
                // Anonymous and nothing new learned: retrying cannot help.
                break;
            }
            if attempt == 1 {
                break;
            }
            tracing::debug!(upstream = %self.name, "upstream answered 401, retrying with fresh auth");
        }
        Err(UpstreamError::Unauthorized {
            upstream: self.name.clone(),
        })
    }

    fn current_scheme(&self) -> Scheme {
        self.session
            .scheme
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Records the challenge; returns whether the scheme changed.
    fn learn(&self, learned: Option<Challenge>) -> bool {
        let next = match learned {
            Some(Challenge::Basic { .. }) => Scheme::Basic,
            Some(Challenge::Bearer { realm, service, .. }) => match Url::parse(&realm) {
                Ok(realm) => Scheme::Bearer { realm, service },
                Err(_) => return false,
            },
            _ => return false,
        };
        let Ok(mut guard) = self.session.scheme.write() else {
            return false;
        };
        let changed = !same_scheme(&guard, &next);
        *guard = next;
        changed
    }

    async fn authorization(
        &self,
        scheme: &Scheme,
        scope: &str,
        credential: &Credential,
        used_token: &mut Option<TokenKey>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Credential::RegistryToken(t) = credential {
            return Ok(sensitive(&format!("Bearer {}", t.expose())));
        }
        match scheme {
            Scheme::Unknown => Ok(None),
            Scheme::Basic => Ok(match credential {
                Credential::Basic { username, password } => {
                    use base64::Engine as _;
                    let raw = format!("{username}:{}", password.expose());
                    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
                    sensitive(&format!("Basic {b64}"))
                }
                _ => None,
            }),
            Scheme::Bearer { realm, service } => {
                let trust = token::check_realm(
                    realm,
                    &self.endpoint,
                    &self.session.settings.upstream.token_realm_hosts,
                    &self.guard,
                )
                .map_err(|e| self.token_error(e))?;
                let credential = match trust {
                    RealmTrust::WithCredentials => credential.clone(),
                    RealmTrust::AnonymousOnly => {
                        if !matches!(credential, Credential::Anonymous) {
                            tracing::warn!(upstream = %self.name, realm_host = realm.host_str().unwrap_or(""),
                                "token realm is on another host; not sending credentials there");
                        }
                        Credential::Anonymous
                    }
                };
                let key = TokenKey::new(realm, service.as_deref(), [scope], credential.id());
                let http = self.session.http.plain.clone();
                let (realm, service, scopes) = (realm.clone(), service.clone(), key.scopes.clone());
                let metrics = self.metrics.clone();
                let upstream = self.name.clone();
                let token = self
                    .session
                    .tokens
                    .get_or_fetch(key.clone(), move || async move {
                        let r = token::fetch_token(
                            &http,
                            &realm,
                            service.as_deref(),
                            &scopes,
                            &credential,
                        )
                        .await;
                        metrics.token_fetch(&upstream, r.is_ok());
                        r
                    })
                    .await
                    .map_err(|source| UpstreamError::Token {
                        upstream: self.name.clone(),
                        source,
                    })?;
                *used_token = Some(key);
                Ok(sensitive(&format!("Bearer {}", token.value.expose())))
            }
        }
    }

    fn token_error(&self, e: TokenError) -> UpstreamError {
        UpstreamError::Token {
            upstream: self.name.clone(),
            source: Arc::new(e),
        }
    }

    async fn request(
        &self,
        req: &UpstreamRequest<'_>,
        url: &Url,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        // Only blob GETs and HEADs may follow a redirect (to a CDN), through the guarded policy.
        let blob = req.path.starts_with("blobs/")
            && (req.method == Method::GET || req.method == Method::HEAD);
        let http = if blob {
            &self.session.http.blob
        } else {
            &self.session.http.plain
        };
        let mut builder = http.request(req.method.clone(), url.clone());
        if let Some(accept) = req.accept {
            builder = builder.header(ACCEPT, accept);
        }
        if let Some(range) = req.range {
            builder = builder.header(RANGE, range.clone());
        }
        if let Some(auth) = auth {
            builder = builder.header(AUTHORIZATION, auth);
        }
        builder
            .send()
            .await
            .map_err(|e| match guard::find_refusal(&e) {
                Some(refusal) => UpstreamError::Refused {
                    upstream: self.name.clone(),
                    refusal,
                },
                None => self.unreachable(&describe_reqwest_error(&e)),
            })
    }

    fn check_status(
        &self,
        resp: reqwest::Response,
        req: &UpstreamRequest<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let status = resp.status();
        let upstream = self.name.clone();
        match status {
            s if s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE => Ok(resp),
            // A redirect that reaches here was not followed: not a blob request, or no usable
            // Location. It is never passed on to the client.
            s if s.is_redirection() => Err(UpstreamError::Refused {
                upstream,
                refusal: Refusal::NotFollowed {
                    kind: request_kind(req),
                    target: redirect_target(&resp),
                },
            }),
            StatusCode::FORBIDDEN => Err(UpstreamError::Denied { upstream }),
            StatusCode::NOT_FOUND => Err(UpstreamError::NotFound { upstream }),
            StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::TooManyRequests {
                upstream,
                retry_after: resp.headers().get(RETRY_AFTER).cloned(),
            }),
            status => Err(UpstreamError::Status { upstream, status }),
        }
    }

    fn url_for(&self, req: &UpstreamRequest<'_>) -> Url {
        let mut url = self.endpoint.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}/v2/{}/{}", req.repository, req.path));
        url.set_query(req.query.as_deref());
        url
    }

    fn unreachable(&self, message: &str) -> UpstreamError {
        UpstreamError::Unreachable {
            upstream: self.name.clone(),
            message: message.to_owned(),
        }
    }
}

/// What a request is, for a refusal's message.
fn request_kind(req: &UpstreamRequest<'_>) -> &'static str {
    match req.path.split('/').next() {
        Some("manifests") => "manifests",
        Some("blobs") => "blobs (no usable Location)",
        Some("tags") => "tag lists",
        Some("referrers") => "referrers",
        _ => "this request",
    }
}

/// The `host:port` a redirect points to (for the log; never its path or query).
fn redirect_target(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| resp.url().join(l).ok())
        .and_then(|u| guard::authority(&u))
        .unwrap_or_else(|| "-".into())
}

fn same_scheme(a: &Scheme, b: &Scheme) -> bool {
    match (a, b) {
        (Scheme::Unknown, Scheme::Unknown) | (Scheme::Basic, Scheme::Basic) => true,
        (
            Scheme::Bearer {
                realm: r1,
                service: s1,
            },
            Scheme::Bearer {
                realm: r2,
                service: s2,
            },
        ) => r1 == r2 && s1 == s2,
        _ => false,
    }
}

fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `host[:port]` of a URL, port only when explicit.
pub(crate) fn host_port(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// A message for a transport error that never includes a URL's query (tokens live there in
/// some registries' redirects).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_redirect() {
        "redirect refused"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

/// All upstreams: those in the config, and registry hosts the module catalog adds at run time.
pub struct Upstreams {
    configured: HashMap<String, Arc<Upstream>>,
    dynamic: RwLock<HashMap<String, Arc<Upstream>>>,
    /// Host names that config upstreams are also known by (their endpoint's `host[:port]`).
    default_upstream: Option<String>,
    /// The clients of upstreams without a `ca_file`.
    default_http: Clients,
    /// Where requests may go: every upstream's and token realm's `host:port`.
    guard: Arc<AddressGuard>,
    /// Every configured upstream's `token_realm_hosts`: the realms catalog-added upstreams
    /// (which have no config entry) may send credentials to.
    realm_hosts: Vec<String>,
    /// `limits.upstream_timeout`, which `default_http` was built with.
    timeout: Duration,
    /// One pool of `limits.max_concurrent_upstream_fetches` slots shared by every upstream.
    fetch_slots: Arc<slots::Slots>,
    tag_ttl: Duration,
    metrics: Arc<Metrics>,
}

/// Building an upstream failed (bad CA file, TLS setup).
#[derive(Debug, thiserror::Error)]
#[error("upstream {name}: {message}")]
pub struct UpstreamSetupError {
    pub name: String,
    pub message: String,
}

/// What [`Upstreams::rebuild`] carried over from the previous upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildSummary {
    /// Configured upstreams whose settings were unchanged: client, challenge and tokens kept.
    pub kept: usize,
    /// Configured upstreams whose settings changed: fresh state.
    pub rebuilt: usize,
    /// Configured upstreams that are new.
    pub added: usize,
    /// Configured upstreams that are gone.
    pub removed: usize,
    /// Catalog-added upstreams carried over (those are re-added on demand otherwise).
    pub dynamic_kept: usize,
    /// Whether the slot pools were kept (their limits, see [`slots::SlotLimits`], unchanged).
    pub fetch_pool_kept: bool,
}

impl Upstreams {
    /// `(free, total)` slots of an upstream pool, for background work (prewarm) that should
    /// only take a slot clients leave free.
    pub(crate) fn slots(&self, pool: slots::Pool) -> (usize, usize) {
        (
            self.fetch_slots.available(pool),
            self.fetch_slots.size(pool),
        )
    }

    /// Builds every configured upstream with fresh state.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, UpstreamSetupError> {
        Self::assemble(cfg, metrics, None).map(|(u, _)| u)
    }

    /// The upstreams for a reloaded config. An upstream whose settings (its config entry apart
    /// from `tag_ttl`, the contents of its `ca_file`, and `limits.upstream_timeout`) are
    /// unchanged keeps its HTTP client, learned challenge and token cache, so the next pull
    /// pays no new challenge or token exchange; a changed or new one starts fresh; a removed
    /// one is dropped (requests still running on it finish). Catalog-added upstreams are kept
    /// the same way. The fetch pool is kept while its limit is unchanged (in-flight fetches
    /// keep counting against it); a changed limit gets a fresh pool.
    pub fn rebuild(
        &self,
        cfg: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, RebuildSummary), UpstreamSetupError> {
        Self::assemble(cfg, metrics, Some(self))
    }

    fn assemble(
        cfg: &Config,
        metrics: Arc<Metrics>,
        previous: Option<&Upstreams>,
    ) -> Result<(Self, RebuildSummary), UpstreamSetupError> {
        let mut summary = RebuildSummary::default();
        let timeout = cfg.limits.upstream_timeout.0;
        // One guard for the life of the process: kept clients resolve through it, so a reload
        // updates what it allows in place.
        let guard = match previous {
            Some(p) => p.guard.clone(),
            None => AddressGuard::new(),
        };
        let slot_limits = slots::SlotLimits::from_config(&cfg.limits);
        let fetch_slots = match previous {
            Some(p) if p.fetch_slots.limits() == slot_limits => {
                summary.fetch_pool_kept = true;
                p.fetch_slots.clone()
            }
            _ => Arc::new(slots::Slots::new(slot_limits)),
        };
        let default_http = match previous {
            Some(p) if p.timeout == timeout => p.default_http.clone(),
            _ => http_clients(None, timeout, &guard).map_err(|message| UpstreamSetupError {
                name: "default".into(),
                message,
            })?,
        };
        let mut configured = HashMap::new();
        for u in &cfg.upstreams {
            let name = u.name.to_ascii_lowercase();
            let settings = settings_for(u, timeout)?;
            let old = previous.and_then(|p| p.configured.get(&name));
            let session = match old {
                Some(old) if old.session.settings == settings => {
                    summary.kept += 1;
                    old.session.clone()
                }
                _ => {
                    if old.is_some() {
                        summary.rebuilt += 1;
                    } else {
                        summary.added += 1;
                    }
                    Arc::new(new_session(settings, &default_http, &guard)?)
                }
            };
            let up = Upstream {
                name: name.clone(),
                endpoint: u.endpoint().map_err(|e| setup_error(u, e.to_string()))?,
                tag_ttl: u.tag_ttl.unwrap_or(cfg.cache.tag_ttl).0,
                session,
                fetch_slots: fetch_slots.clone(),
                metrics: metrics.clone(),
                guard: guard.clone(),
            };
            configured.insert(name, Arc::new(up));
        }
        let tag_ttl = cfg.cache.tag_ttl.0;
        let mut dynamic = HashMap::new();
        let realm_hosts = all_realm_hosts(&cfg.upstreams);
        if let Some(p) = previous {
            summary.removed = p
                .configured
                .keys()
                .filter(|name| !configured.contains_key(*name))
                .count();
            let old_dynamic = p.dynamic.read().map(|m| m.clone()).unwrap_or_default();
            for (key, old) in old_dynamic {
                if configured.contains_key(&old.name)
                    || old.session.settings.timeout != timeout
                    || old.session.settings.upstream.token_realm_hosts != realm_hosts
                {
                    continue;
                }
                let up = Upstream {
                    name: old.name.clone(),
                    endpoint: old.endpoint.clone(),
                    tag_ttl,
                    session: old.session.clone(),
                    fetch_slots: fetch_slots.clone(),
                    metrics: metrics.clone(),
                    guard: guard.clone(),
                };
                dynamic.insert(key, Arc::new(up));
            }
            summary.dynamic_kept = dynamic.len();
        } else {
            summary.added = configured.len();
        }
        guard.set_allowed(allowed_authorities(
            configured.values().chain(dynamic.values()),
            &cfg.upstreams,
        ));
        let upstreams = Upstreams {
            guard,
            realm_hosts,
            configured,
            dynamic: RwLock::new(dynamic),
            default_upstream: cfg
                .default_upstream
                .as_ref()
                .map(|s| s.to_ascii_lowercase()),
            default_http,
            timeout,
            fetch_slots,
            tag_ttl,
            metrics,
        };
        Ok((upstreams, summary))
    }

    /// A configured upstream by name, or a catalog-added one by host.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        let name = name.to_ascii_lowercase();
        if let Some(u) = self.configured.get(&name) {
            return Some(u.clone());
        }
        self.dynamic.read().ok()?.get(&name).cloned()
    }

    pub fn default_upstream(&self) -> Option<Arc<Upstream>> {
        self.default_upstream.as_ref().and_then(|d| self.get(d))
    }

    /// Adds (once) an upstream for a registry host named by a module: `https://<host>`, or
    /// `http://<host>` for the repositories whose module's baseUrl said so. The two are
    /// separate upstreams with the same name (one module's `http://` never switches another's
    /// repositories on the host to plain HTTP); [`Upstreams::get`] finds only the https one.
    /// Configured upstreams win. `None` when `host` does not make a URL.
    pub fn ensure_host(&self, host: &str, insecure: bool) -> Option<Arc<Upstream>> {
        let name = host.to_ascii_lowercase();
        if let Some(u) = self.configured.get(&name) {
            return Some(u.clone());
        }
        let key = if insecure {
            format!("http://{name}")
        } else {
            name.clone()
        };
        if let Some(u) = self.dynamic.read().ok()?.get(&key) {
            return Some(u.clone());
        }
        let scheme = if insecure { "http" } else { "https" };
        let endpoint = Url::parse(&format!("{scheme}://{host}")).ok()?;
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            return None;
        }
        // A registry the catalog names is trusted like a configured one.
        self.guard.allow(guard::authority(&endpoint)?);
        let settings = Settings {
            upstream: UpstreamConfig {
                name: name.clone(),
                endpoint: Some(endpoint.clone()),
                ca_file: None,
                tag_ttl: None,
                token_realm_hosts: self.realm_hosts.clone(),
                trust_content_from: Vec::new(),
            },
            ca_pem: None,
            timeout: self.timeout,
        };
        let up = Arc::new(Upstream {
            name,
            endpoint,
            tag_ttl: self.tag_ttl,
            session: Arc::new(Session {
                settings,
                http: self.default_http.clone(),
                scheme: RwLock::new(Scheme::Unknown),
                tokens: TokenCache::new(TOKENS_PER_UPSTREAM),
            }),
            fetch_slots: self.fetch_slots.clone(),
            metrics: self.metrics.clone(),
            guard: self.guard.clone(),
        });
        match self.dynamic.write() {
            Ok(mut map) => Some(map.entry(key).or_insert(up).clone()),
            Err(_) => Some(up),
        }
    }
}

fn setup_error(u: &UpstreamConfig, message: String) -> UpstreamSetupError {
    UpstreamSetupError {
        name: u.name.clone(),
        message,
    }
}

/// The settings of a configured upstream; reads its `ca_file`.
fn settings_for(u: &UpstreamConfig, timeout: Duration) -> Result<Settings, UpstreamSetupError> {
    let ca_pem =
        match &u.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                setup_error(u, format!("cannot read ca_file {}: {e}", path.display()))
            })?),
            None => None,
        };
    let mut upstream = u.clone();
    upstream.tag_ttl = None;
    Ok(Settings {
        upstream,
        ca_pem,
        timeout,
    })
}

/// Every configured upstream's `token_realm_hosts`, de-duplicated, in config order.
fn all_realm_hosts(configured: &[UpstreamConfig]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in configured.iter().flat_map(|u| &u.token_realm_hosts) {
        if !out.contains(entry) {
            out.push(entry.clone());
        }
    }
    out
}

/// The `host:port` of every upstream endpoint and every configured token realm host (a bare
/// realm host stands for both its http and https default ports).
fn allowed_authorities<'a>(
    upstreams: impl Iterator<Item = &'a Arc<Upstream>>,
    configured: &[UpstreamConfig],
) -> Vec<String> {
    let mut out: Vec<String> = upstreams
        .filter_map(|u| guard::authority(&u.endpoint))
        .collect();
    for entry in configured.iter().flat_map(|u| &u.token_realm_hosts) {
        for port in [443, 80] {
            out.extend(crate::protocol::key_pattern::realm_entry_authority(
                entry,
                Some(port),
            ));
        }
    }
    out
}

/// A fresh session: nothing learned, no tokens.
fn new_session(
    settings: Settings,
    default_http: &Clients,
    guard: &Arc<AddressGuard>,
) -> Result<Session, UpstreamSetupError> {
    let http = match &settings.ca_pem {
        Some(pem) => http_clients(Some(pem), settings.timeout, guard)
            .map_err(|m| setup_error(&settings.upstream, m))?,
        None => default_http.clone(),
    };
    Ok(Session {
        settings,
        http,
        scheme: RwLock::new(Scheme::Unknown),
        tokens: TokenCache::new(TOKENS_PER_UPSTREAM),
    })
}

/// The plain and the blob client (see [`Clients`]).
fn http_clients(
    ca_pem: Option<&[u8]>,
    timeout: Duration,
    guard: &Arc<AddressGuard>,
) -> Result<Clients, String> {
    let g = guard.clone();
    let blob_policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(Refusal::TooManyRedirects);
        }
        match g.check_target(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    });
    Ok(Clients {
        plain: http_client(ca_pem, timeout, guard, reqwest::redirect::Policy::none())?,
        blob: http_client(ca_pem, timeout, guard, blob_policy)?,
    })
}

fn http_client(
    ca_pem: Option<&[u8]>,
    timeout: Duration,
    guard: &Arc<AddressGuard>,
    redirect: reqwest::redirect::Policy,
) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .redirect(redirect)
        .referer(false)
        .dns_resolver(Arc::new(guard::GuardedResolver::new(guard.clone())))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(timeout)
        .user_agent(concat!("oci-proxy/", env!("CARGO_PKG_VERSION")))
        .http1_only();
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("invalid CA bundle: {e}"))?;
        if certs.is_empty() {
            return Err("CA bundle holds no certificate".into());
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::token::Token;
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new().unwrap())
    }

    fn config(yaml: &str) -> Config {
        Config::parse(yaml).unwrap()
    }

    const TWO: &str = "upstreams:\n  - name: a.test\n    endpoint: http://127.0.0.1:1\n  \
                       - name: b.test\n    endpoint: http://127.0.0.1:2\n";

    fn same_session(a: &Upstreams, b: &Upstreams, name: &str) -> bool {
        Arc::ptr_eq(&a.get(name).unwrap().session, &b.get(name).unwrap().session)
    }

    #[test]
    fn an_unrelated_change_keeps_every_session_and_the_pool() {
        let m = metrics();
        let old = Upstreams::new(&config(TWO), m.clone()).unwrap();
        old.get("a.test").unwrap().learn(Some(Challenge::Basic {
            realm: Some("r".into()),
        }));
        let cfg = config(&format!("cache:\n  tag_ttl: 5m\n{TWO}"));
        let (new, s) = old.rebuild(&cfg, m).unwrap();
        assert_eq!(
            s,
            RebuildSummary {
                kept: 2,
                fetch_pool_kept: true,
                ..Default::default()
            }
        );
        assert!(same_session(&old, &new, "a.test") && same_session(&old, &new, "b.test"));
        assert!(matches!(
            new.get("a.test").unwrap().current_scheme(),
            Scheme::Basic
        ));
        assert!(Arc::ptr_eq(&old.fetch_slots, &new.fetch_slots));
        // The kept upstream still takes the new tag_ttl.
        assert_eq!(new.get("a.test").unwrap().tag_ttl, Duration::from_secs(300));
    }

    #[test]
    fn changed_added_and_removed_upstreams() {
        let m = metrics();
        let old = Upstreams::new(&config(TWO), m.clone()).unwrap();
        let cfg = config(
            "upstreams:\n  - name: a.test\n    endpoint: http://127.0.0.1:1\n    \
             token_realm_hosts: [auth.test]\n  - name: c.test\n    endpoint: http://127.0.0.1:3\n",
        );
        let (new, s) = old.rebuild(&cfg, m).unwrap();
        assert_eq!((s.kept, s.rebuilt, s.added, s.removed), (0, 1, 1, 1));
        assert!(!same_session(&old, &new, "a.test"));
        assert!(new.get("b.test").is_none());
        assert!(matches!(
            new.get("a.test").unwrap().current_scheme(),
            Scheme::Unknown
        ));
    }

    #[test]
    fn a_changed_timeout_or_fetch_limit_starts_fresh() {
        let m = metrics();
        let old = Upstreams::new(&config(TWO), m.clone()).unwrap();
        let cfg = config(&format!("limits:\n  upstream_timeout: 61s\n{TWO}"));
        let (new, s) = old.rebuild(&cfg, m.clone()).unwrap();
        assert_eq!((s.kept, s.rebuilt), (0, 2));
        assert!(s.fetch_pool_kept);
        assert!(!same_session(&old, &new, "b.test"));

        let cfg = config(&format!(
            "limits:\n  max_concurrent_upstream_fetches: 3\n{TWO}"
        ));
        let (new, s) = old.rebuild(&cfg, m).unwrap();
        assert_eq!(s.kept, 2, "the pool is not part of an upstream's session");
        assert!(!s.fetch_pool_kept);
        assert!(!Arc::ptr_eq(&old.fetch_slots, &new.fetch_slots));
        assert_eq!(new.fetch_slots.available(slots::Pool::Blobs), 3);
        assert!(Arc::ptr_eq(
            &new.get("a.test").unwrap().fetch_slots,
            &new.fetch_slots
        ));
    }

    #[test]
    fn a_rotated_ca_bundle_under_the_same_path_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let pem = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.self_signed(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
        };
        std::fs::write(&ca, pem("one")).unwrap();
        let yaml = format!(
            "upstreams:\n  - name: a.test\n    endpoint: https://127.0.0.1:1\n    ca_file: {}\n",
            ca.display()
        );
        let m = metrics();
        let old = Upstreams::new(&config(&yaml), m.clone()).unwrap();
        let (same, s) = old.rebuild(&config(&yaml), m.clone()).unwrap();
        assert_eq!(s.kept, 1);
        assert!(same_session(&old, &same, "a.test"));
        std::fs::write(&ca, pem("two")).unwrap();
        let (new, s) = old.rebuild(&config(&yaml), m.clone()).unwrap();
        assert_eq!(s.rebuilt, 1);
        assert!(!same_session(&old, &new, "a.test"));
        // An unreadable bundle rejects the reload.
        std::fs::remove_file(&ca).unwrap();
        assert!(old.rebuild(&config(&yaml), m).is_err());
    }

    #[test]
    fn catalog_hosts_are_kept_unless_now_configured() {
        let m = metrics();
        let old = Upstreams::new(&config(TWO), m.clone()).unwrap();
        let x = old.ensure_host("x.test", false).unwrap();
        old.ensure_host("c.test", true).unwrap();
        let cfg = config(&format!("{TWO}  - name: c.test\n"));
        let (new, s) = old.rebuild(&cfg, m).unwrap();
        assert_eq!(s.dynamic_kept, 1);
        assert!(Arc::ptr_eq(&new.get("x.test").unwrap().session, &x.session));
        assert_eq!(
            new.get("c.test").unwrap().endpoint.as_str(),
            "https://c.test/"
        );
    }

    #[tokio::test]
    async fn a_kept_session_keeps_its_tokens() {
        let m = metrics();
        let old = Upstreams::new(&config(TWO), m.clone()).unwrap();
        let key = TokenKey::new(
            &Url::parse("http://127.0.0.1:9/token").unwrap(),
            None,
            ["repository:r:pull"],
            Credential::Anonymous.id(),
        );
        let token = || async {
            Ok(Token {
                value: crate::credentials::secret::Secret::new("t".to_owned()),
                expires_at: std::time::Instant::now() + Duration::from_secs(300),
            })
        };
        let a = old.get("a.test").unwrap();
        a.session
            .tokens
            .get_or_fetch(key.clone(), token)
            .await
            .unwrap();
        let (new, _) = old.rebuild(&config(TWO), m).unwrap();
        let fetched = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fetched.clone();
        new.get("a.test")
            .unwrap()
            .session
            .tokens
            .get_or_fetch(key, move || {
                f.store(true, std::sync::atomic::Ordering::SeqCst);
                token()
            })
            .await
            .unwrap();
        assert!(!fetched.load(std::sync::atomic::Ordering::SeqCst));
    }
}
