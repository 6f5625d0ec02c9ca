//! The configuration file: typed, defaulted, validated once at load.
//!
//! Every struct denies unknown keys; [`Config::load`] reports errors with the key path
//! (`upstreams[1].endpoint: ...`), and [`Config::validate`] checks what serde cannot.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use url::Url;

/// The embedded default: a laptop mirror of the big public registries.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/local-mirror.yaml");

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub log_format: LogFormat,
    /// How long in-flight responses may run after SIGTERM.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Upstream for `/v2/<repo>` paths that name no upstream.
    #[serde(default)]
    pub default_upstream: Option<String>,
    #[serde(default)]
    pub credentials: CredentialsConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Bounds on what clients and upstreams can make the proxy hold: connections, upstream slots,
/// fill time, tag list pages, blob size. Each limit that bites is logged and counted once
/// (`oci_proxy_limit_hits_total{limit}`, or a fill failure reason); see README "Limits".
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Upstream blob GETs (cache fills and cold Range GETs) running at once, across all
    /// clients.
    pub max_concurrent_upstream_fetches: usize,
    /// Other upstream requests (manifests, HEADs, tag lists, referrers, with their token
    /// exchanges) running at once: a separate pool, so they never wait behind blob fills.
    pub max_concurrent_upstream_requests: usize,
    /// Longest wait for a free upstream slot; then the client gets `503` with `Retry-After`.
    pub upstream_slot_wait: Duration,
    /// Longest time one blob fill may take, start to end.
    pub fill_deadline: Duration,
    /// Slowest upstream body a fill accepts (bytes per second), averaged over
    /// `fill_rate_window`; a slower fill is abandoned. `0` turns the check off.
    pub fill_min_rate: ByteSize,
    /// The window `fill_min_rate` is measured over.
    pub fill_rate_window: Duration,
    /// Largest blob fetched and served; larger ones are refused before fetching when the
    /// upstream announces the size, else the fill is aborted when it passes the limit.
    pub max_blob_size: Option<ByteSize>,
    /// Client connections open at once; connections beyond it are closed at once.
    pub max_connections: usize,
    /// Longest a client may leave a response unread (no write progress) before the
    /// connection is closed.
    pub write_timeout: Duration,
    /// Longest a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Upstream tag list pages fetched for one client request.
    pub max_tag_pages: usize,
    /// Upstream tag list bytes read for one client request (all pages together).
    pub max_tag_list_size: ByteSize,
    /// Time allowed for a client to send its request headers.
    pub header_read_timeout: Duration,
    /// Time allowed for an upstream to answer with headers, and the longest pause allowed
    /// between two reads of an upstream body (a stalled fill fails after it).
    pub upstream_timeout: Duration,
    /// Longest request head accepted, in bytes.
    pub max_header_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_upstream_fetches: 64,
            max_concurrent_upstream_requests: 64,
            upstream_slot_wait: Duration::from_secs(10),
            fill_deadline: Duration::from_secs(3600),
            fill_min_rate: ByteSize(16 << 10),
            fill_rate_window: Duration::from_secs(60),
            max_blob_size: None,
            max_connections: 4096,
            write_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            max_concurrent_streams: 100,
            max_tag_pages: 10,
            max_tag_list_size: ByteSize(16 << 20),
            header_read_timeout: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(60),
            max_header_size: ByteSize(64 * 1024),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Upper bound for the (local) blob store; least recently used blobs are evicted beyond
    /// it. `local_max_size` is an alias that names the local tier when a shared tier is
    /// configured (setting both is an error: a duplicate key).
    #[serde(alias = "local_max_size")]
    pub max_size: Option<ByteSize>,
    /// How long a tag → digest mapping is trusted before it is revalidated upstream.
    pub tag_ttl: Duration,
    /// How long an upstream's confirmation that a repository holds a cached object counts;
    /// an older link is re-confirmed upstream (a HEAD with the repository's current
    /// credentials) before the cached object is served again.
    pub link_ttl: Duration,
    /// `disk` (local only) or `s3` (local disk in front of a bucket shared by replicas).
    pub backend: CacheBackend,
    /// The shared bucket; required when `backend: s3`.
    pub s3: Option<S3Config>,
    /// Write fills' temp files with `O_DIRECT` (no copy into the page cache) where the
    /// filesystem takes it; `false`: buffered writes with a background `fdatasync`.
    pub direct_writes: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    #[default]
    Disk,
    S3,
}

/// The S3-compatible bucket replicas share. Credentials come from the usual AWS environment
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...); the keys
/// here override what the environment says about bucket, endpoint and region.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix for everything the proxy writes (e.g. `oci-proxy/`); empty by default.
    #[serde(default)]
    pub prefix: String,
    /// For S3-compatible stores (MinIO, Ceph, moto); AWS itself when absent.
    #[serde(default)]
    pub endpoint: Option<Url>,
    #[serde(default)]
    pub region: Option<String>,
    /// Allows an `http://` endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// A fill lease not renewed for this long is dead (its holder renews it every third of
    /// this while filling); then another replica may fetch the blob upstream.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// The longest a replica waits for another replica's fill (however often that one renews
    /// its lease) before fetching upstream itself.
    #[serde(default = "default_lease_wait")]
    pub lease_wait: Duration,
    /// Connect timeout for the object store (kept small: an unreachable store must not
    /// delay clients).
    #[serde(default = "default_s3_connect_timeout")]
    pub connect_timeout: Duration,
    /// Timeout of small object-store requests (HEAD, leases, links, manifests).
    #[serde(default = "default_s3_op_timeout")]
    pub op_timeout: Duration,
    /// Bound on the bytes under `<prefix>blobs/` that `oci-proxy gc-shared` enforces (least
    /// recently uploaded first); no bound (and no eviction by the proxy) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
}

impl S3Config {
    fn validate(&self, problems: &mut Problems) {
        let s3 = self;
        if s3.bucket.is_empty() {
            problems.add("cache.s3.bucket", "must not be empty");
        }
        if let Some(e) = &s3.endpoint {
            if !matches!(e.scheme(), "http" | "https") || e.host_str().is_none() {
                problems.add(
                    "cache.s3.endpoint",
                    "must be an http:// or https:// URL with a host",
                );
            }
            if e.scheme() == "http" && !s3.allow_http {
                problems.add(
                    "cache.s3.endpoint",
                    "is http:// but cache.s3.allow_http is false",
                );
            }
        }
        if s3.lease_ttl.0.is_zero() {
            problems.add("cache.s3.lease_ttl", "must be more than 0");
        }
        if s3.lease_wait.0.is_zero() {
            problems.add("cache.s3.lease_wait", "must be more than 0");
        }
        if s3.max_size.is_some_and(|m| m.0 == 0) {
            problems.add("cache.s3.max_size", "must be more than 0");
        }
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_lease_wait() -> Duration {
    Duration::from_secs(120)
}

fn default_s3_connect_timeout() -> Duration {
    Duration(std::time::Duration::from_millis(1000))
}

fn default_s3_op_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("./oci-proxy-cache"),
            max_size: None,
            tag_ttl: Duration::from_secs(60),
            link_ttl: Duration::from_secs(24 * 3600),
            backend: CacheBackend::Disk,
            s3: None,
            direct_writes: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// How clients name the upstream: first path segment, or containerd's `ns=`.
    pub name: String,
    /// Base URL; default `https://<name>`. `http://` is allowed.
    #[serde(default)]
    pub endpoint: Option<Url>,
    /// Extra CA certificates (PEM) to trust for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Overrides `cache.tag_ttl` for this upstream.
    #[serde(default)]
    pub tag_ttl: Option<Duration>,
    /// Hosts besides the upstream's own that may receive credentials as a token realm
    /// (e.g. `auth.docker.io` for Docker Hub).
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    /// Other upstreams whose cached content this upstream's confirmation admits. By default
    /// an upstream's `HEAD 200` only admits content fetched from that same upstream; content
    /// from elsewhere is fetched (and verified) again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_content_from: Vec<String>,
}

impl UpstreamConfig {
    /// The endpoint, defaulted to `https://<name>`.
    pub fn endpoint(&self) -> Result<Url, url::ParseError> {
        match &self.endpoint {
            Some(u) => Ok(u.clone()),
            None => Url::parse(&format!("https://{}", self.name)),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// A docker `config.json` (dockerconfigjson format) with the operator's own credentials.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Google OAuth2 access tokens (GKE Workload Identity via the metadata server, or the
    /// service-account key named by `GOOGLE_APPLICATION_CREDENTIALS`); opt-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub google: Option<AmbientSourceConfig>,
    /// Amazon ECR tokens from the AWS default credential chain (env, IRSA, instance profile);
    /// opt-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr: Option<AmbientSourceConfig>,
}

/// An ambient credential source (`credentials.google`, `credentials.ecr`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmbientSourceConfig {
    /// Registry host patterns it serves, as docker config keys (`*.pkg.dev`, `host:port`);
    /// absent means the source's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Watch ModuleTemplates, Manifests and Secrets in a Kubernetes cluster.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSource>,
    /// Read ModuleTemplates, Manifests and Secrets from YAML files in a directory.
    #[serde(default)]
    pub files: Option<PathBuf>,
    /// Named-Secret mode: one dockerconfigjson Secret for every repository of its registry.
    #[serde(default)]
    pub default_secret: Option<DefaultSecret>,
    /// Host names under which Lifecycle Manager reaches this proxy, as written at the start of
    /// a ModuleTemplate `baseUrl` (`<proxy host>/<registry>/<path>`), e.g.
    /// `oci-proxy.kcp-system.svc`. The listen address, and `localhost:<port>` when listening
    /// on loopback, are always included.
    #[serde(default)]
    pub proxy_hosts: Vec<String>,
    /// Whether the images a module's `ociArtifact` resources name get the module's
    /// credentials. Off by default: Lifecycle Manager itself never pulls images with module
    /// credentials, and an image reference can name any repository.
    #[serde(default)]
    pub image_credentials: bool,
    /// Fetch the module versions Lifecycle Manager is about to install into the cache before
    /// it asks (see `crate::prewarm`). Off by default.
    #[serde(default)]
    pub prewarm: PrewarmConfig,
    /// The top-level `default_upstream`, filled in by the server (not a config key): a
    /// repository that LM reaches on the proxy's own address under a path that names no
    /// registry host is on this upstream, as for any other client.
    #[serde(skip)]
    pub own_upstream: Option<String>,
}

/// `catalog.prewarm`: which module versions are fetched ahead of Lifecycle Manager, and how
/// many at once.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrewarmConfig {
    pub enabled: bool,
    /// Module versions fetched at once (each one blob at a time).
    pub concurrency: usize,
    pub versions: PrewarmVersions,
}

impl Default for PrewarmConfig {
    fn default() -> Self {
        PrewarmConfig {
            enabled: false,
            concurrency: 2,
            versions: PrewarmVersions::Channels,
        }
    }
}

/// Which module versions `catalog.prewarm` fetches.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrewarmVersions {
    /// The versions some ModuleReleaseMeta channel (or its mandatory version) points to: what
    /// Lifecycle Manager installs.
    #[default]
    Channels,
    /// Every version a ModuleTemplate names.
    All,
}

/// Most module versions `catalog.prewarm` may fetch at once.
pub(crate) const MAX_PREWARM_CONCURRENCY: usize = 32;

impl CatalogConfig {
    /// Equal apart from `prewarm`, which the running catalog does not read (a reload that
    /// changes only `prewarm` keeps the catalog and its synced index).
    pub(crate) fn same_catalog(&self, other: &CatalogConfig) -> bool {
        let mut mine = self.clone();
        mine.prewarm = other.prewarm.clone();
        mine == *other
    }

    /// Whether any catalog source or the named default Secret is configured.
    pub fn is_configured(&self) -> bool {
        self.kubernetes.is_some() || self.files.is_some() || self.default_secret.is_some()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSource {
    /// Namespaces to watch (ModuleTemplates, ModuleReleaseMetas, Manifests, Secrets):
    /// `[kcp-system]`, where Lifecycle Manager keeps them, by default. An explicit empty list
    /// means all namespaces.
    pub namespaces: Vec<String>,
    /// Only Secrets matching this label selector are watched.
    pub secret_label_selector: String,
}

impl Default for KubernetesSource {
    fn default() -> Self {
        KubernetesSource {
            namespaces: vec!["kcp-system".into()],
            secret_label_selector: "operator.kyma-project.io/managed-by=lifecycle-manager".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DefaultSecret {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub subpath: Option<String>,
}

/// A configuration error, naming the key path where it can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Every problem found, one per line, each `key.path: what is wrong`.
    #[error("{0}")]
    Invalid(Problems),
}

/// One wrong key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// The problems validation found, in the order of the file's keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let (path, message) = (path.into(), message.into());
        // serde_yaml's messages may start with the key path already; say it once.
        let message = message
            .strip_prefix(&format!("{path}: "))
            .map(str::to_owned)
            .unwrap_or(message);
        self.0.push(Problem { path, message });
    }

    fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self))
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", p.path, p.message)?;
        }
        Ok(())
    }
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    let mut problems = Problems::default();
    problems.add(path, message);
    ConfigError::Invalid(problems)
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// The embedded default, with the user's docker config filled in when one exists.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        let mut cfg = Config::parse(EMBEDDED_DEFAULT)?;
        if cfg.credentials.docker_config.is_none() {
            cfg.credentials.docker_config = default_docker_config();
        }
        Ok(cfg)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "config".into() } else { path };
            invalid(path, e.into_inner().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: references between keys, URL schemes, non-zero limits.
    /// Reports every problem, not just the first (as vector's `validate` does).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = |k: &str| format!("upstreams[{i}].{k}");
            if !crate::protocol::grammar::is_registry_host(&u.name) {
                problems.add(
                    at("name"),
                    format!("{:?} is not a registry host name", u.name),
                );
            }
            if !names.insert(u.name.to_ascii_lowercase()) {
                problems.add(at("name"), format!("duplicate upstream {:?}", u.name));
            }
            let endpoint = match u.endpoint() {
                Ok(e) => e,
                Err(e) => {
                    problems.add(at("endpoint"), e.to_string());
                    continue;
                }
            };
            if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
                problems.add(
                    at("endpoint"),
                    "must be an http:// or https:// URL with a host",
                );
            }
            if endpoint.query().is_some() || endpoint.fragment().is_some() {
                problems.add(at("endpoint"), "must not have a query or fragment");
            }
            if !endpoint.username().is_empty() || endpoint.password().is_some() {
                // Says where, never what: the value is a password.
                problems.add(
                    at("endpoint"),
                    "must not carry user:password@ (put credentials in credentials.docker_config \
                     or a module Secret)",
                );
            }
            for (j, entry) in u.token_realm_hosts.iter().enumerate() {
                if crate::protocol::key_pattern::realm_entry_authority(entry, Some(443)).is_none()
                    || entry.contains(['/', '@', '?', '#'])
                {
                    problems.add(
                        at(&format!("token_realm_hosts[{j}]")),
                        "must be a host or host:port (no scheme, path or userinfo)",
                    );
                }
            }
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            for t in &u.trust_content_from {
                if !names.contains(&t.to_ascii_lowercase()) {
                    problems.add(
                        format!("upstreams[{i}].trust_content_from"),
                        format!("{t:?} is not one of upstreams[].name"),
                    );
                }
            }
        }
        if self.cache.link_ttl.0.is_zero() {
            problems.add("cache.link_ttl", "must be more than 0");
        }
        if let Some(d) = &self.default_upstream {
            if !names.contains(&d.to_ascii_lowercase()) {
                problems.add(
                    "default_upstream",
                    format!("{d:?} is not one of upstreams[].name"),
                );
            }
        }
        if self.limits.max_concurrent_upstream_fetches == 0 {
            problems.add(
                "limits.max_concurrent_upstream_fetches",
                "must be at least 1",
            );
        }
        self.limits.validate(&mut problems);
        if self.limits.max_header_size.0 < 1024 {
            problems.add("limits.max_header_size", "must be at least 1KiB");
        }
        if self.cache.backend == CacheBackend::S3 {
            match &self.cache.s3 {
                None => problems.add("cache.s3", "required when cache.backend is s3"),
                Some(s3) => s3.validate(&mut problems),
            }
        }
        for (key, source) in [
            ("google", &self.credentials.google),
            ("ecr", &self.credentials.ecr),
        ] {
            let Some(hosts) = source.as_ref().and_then(|s| s.hosts.as_ref()) else {
                continue;
            };
            if hosts.is_empty() {
                problems.add(
                    format!("credentials.{key}.hosts"),
                    "must list at least one host (leave it out for the defaults)",
                );
            }
            for (i, h) in hosts.iter().enumerate() {
                if crate::protocol::key_pattern::HostPattern::parse(h).is_none() {
                    problems.add(
                        format!("credentials.{key}.hosts[{i}]"),
                        format!(
                            "{h:?} is not a host pattern (host[:port], globs per label, no path)"
                        ),
                    );
                }
            }
        }
        if let Some(ds) = &self.catalog.default_secret {
            if ds.name.is_empty() || ds.namespace.is_empty() {
                problems.add("catalog.default_secret", "namespace and name are required");
            }
            if ds.name.contains([',', '=', '!']) {
                problems.add("catalog.default_secret.name", "is not a Secret name");
            }
        }
        let prewarm = &self.catalog.prewarm;
        if prewarm.concurrency == 0 || prewarm.concurrency > MAX_PREWARM_CONCURRENCY {
            problems.add(
                "catalog.prewarm.concurrency",
                format!("must be between 1 and {MAX_PREWARM_CONCURRENCY}"),
            );
        }
        if prewarm.enabled && self.catalog.kubernetes.is_none() && self.catalog.files.is_none() {
            problems.add(
                "catalog.prewarm.enabled",
                "needs a catalog source (catalog.kubernetes or catalog.files)",
            );
        }
        if let Some(k) = &self.catalog.kubernetes {
            if k.namespaces.iter().any(|n| n.trim().is_empty()) {
                problems.add("catalog.kubernetes.namespaces", "contains an empty name");
            }
        }
        problems.into_result()
    }

    /// The config as YAML with secrets redacted (there are none inline: files are referenced).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

impl Limits {
    fn validate(&self, problems: &mut Problems) {
        let l = self;
        for (key, zero) in [
            (
                "max_concurrent_upstream_requests",
                l.max_concurrent_upstream_requests == 0,
            ),
            ("max_connections", l.max_connections == 0),
            ("max_concurrent_streams", l.max_concurrent_streams == 0),
            ("max_tag_pages", l.max_tag_pages == 0),
            ("max_tag_list_size", l.max_tag_list_size.0 == 0),
            ("max_blob_size", l.max_blob_size.is_some_and(|m| m.0 == 0)),
            ("upstream_slot_wait", l.upstream_slot_wait.0.is_zero()),
            ("fill_deadline", l.fill_deadline.0.is_zero()),
            ("fill_rate_window", l.fill_rate_window.0.is_zero()),
            ("write_timeout", l.write_timeout.0.is_zero()),
            ("idle_timeout", l.idle_timeout.0.is_zero()),
            ("header_read_timeout", l.header_read_timeout.0.is_zero()),
        ] {
            if zero {
                problems.add(format!("limits.{key}"), "must be more than 0");
            }
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, if the file exists.
pub fn default_docker_config() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// A duration written `500ms`, `60s`, `5m`, `2h` or `1d`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 60s, 5m, 500ms"))?;
        let ms = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unit must be ms, s, m, h or d"
                ))
            }
        };
        n.checked_mul(ms)
            .map(|ms| Duration(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size written `512MiB`, `20GiB`, `1GB` or a plain byte count.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 512MiB, 20GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unit must be B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(cfg.default_upstream.as_deref(), Some("docker.io"));
        assert!(cfg.upstreams.iter().any(|u| u.name == "ghcr.io"));
    }

    #[test]
    fn units() {
        assert_eq!("60s".parse::<Duration>().unwrap(), Duration::from_secs(60));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::from_secs(300));
        assert_eq!("250ms".parse::<Duration>().unwrap().0.as_millis(), 250);
        assert!("5 minutes".parse::<Duration>().is_err());
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("20GiB".parse::<ByteSize>().unwrap().to_string(), "20GiB");
        assert!("20 potatoes".parse::<ByteSize>().is_err());
        assert_eq!("5m".parse::<Duration>().unwrap().to_string(), "5m");
    }

    #[test]
    fn s3_max_size_is_optional_and_positive() {
        let base = "cache:\n  backend: s3\n  s3:\n    bucket: b\n";
        let cfg = Config::parse(base).unwrap();
        assert_eq!(cfg.cache.s3.unwrap().max_size, None);
        let cfg = Config::parse(&format!("{base}    max_size: 100GiB\n")).unwrap();
        let s3 = cfg.cache.s3.as_ref().unwrap();
        assert_eq!(s3.max_size, Some(ByteSize(100 << 30)));
        assert!(
            cfg.to_yaml().contains("max_size: 100GiB"),
            "{}",
            cfg.to_yaml()
        );
        let e = Config::parse(&format!("{base}    max_size: 0\n")).unwrap_err();
        assert!(e.to_string().starts_with("cache.s3.max_size"), "{e}");
        let e = Config::parse(&format!("{base}    max_size: lots\n")).unwrap_err();
        assert!(e.to_string().contains("max_size"), "{e}");
    }

    #[test]
    fn s3_lease_keys() {
        let base = "cache:\n  backend: s3\n  s3:\n    bucket: b\n";
        let cfg =
            Config::parse(&format!("{base}    lease_ttl: 10s\n    lease_wait: 5m\n")).unwrap();
        let s3 = cfg.cache.s3.as_ref().unwrap();
        assert_eq!(
            (s3.lease_ttl, s3.lease_wait),
            (Duration::from_secs(10), Duration::from_secs(300))
        );
        assert!(cfg.to_yaml().contains("lease_wait: "), "{}", cfg.to_yaml());
        let s3 = Config::parse(base).unwrap().cache.s3.unwrap();
        assert_eq!(
            (s3.lease_ttl, s3.lease_wait),
            (Duration::from_secs(30), Duration::from_secs(120))
        );
        let e = Config::parse(&format!("{base}    lease_wait: 0s\n")).unwrap_err();
        assert_eq!(e.to_string(), "cache.s3.lease_wait: must be more than 0");
        let e = Config::parse(&format!("{base}    lease_ttl: 0s\n")).unwrap_err();
        assert_eq!(e.to_string(), "cache.s3.lease_ttl: must be more than 0");
        let e = Config::parse(&format!("{base}    lease_wait: forever\n")).unwrap_err();
        assert!(e.to_string().contains("lease_wait"), "{e}");
    }

    #[test]
    fn cache_backend_keys() {
        let cfg = Config::parse("cache:\n  dir: /x\n  max_size: 1GiB\n").unwrap();
        assert_eq!(cfg.cache.backend, CacheBackend::Disk);
        assert_eq!(cfg.cache.max_size, Some(ByteSize(1 << 30)));
        let cfg = Config::parse(
            "cache:\n  dir: /x\n  local_max_size: 2GiB\n  backend: s3\n  s3:\n    bucket: b\n    \
             prefix: p/\n    endpoint: http://127.0.0.1:9000\n    region: us-east-1\n    \
             allow_http: true\n",
        )
        .unwrap();
        assert_eq!(cfg.cache.backend, CacheBackend::S3);
        assert_eq!(cfg.cache.max_size, Some(ByteSize(2 << 30)));
        let s3 = cfg.cache.s3.unwrap();
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("b", "p/"));
        assert_eq!(s3.lease_ttl, Duration::from_secs(30));
        assert_eq!(s3.lease_wait, Duration::from_secs(120));

        let e = Config::parse("cache:\n  backend: s3\n").unwrap_err();
        assert_eq!(e.to_string(), "cache.s3: required when cache.backend is s3");
        let e = Config::parse("cache:\n  backend: s3\n  s3:\n    prefix: p\n").unwrap_err();
        assert!(e.to_string().contains("bucket"), "{e}");
        let e = Config::parse("cache:\n  backend: s3\n  s3:\n    bucket: b\n    colour: red\n")
            .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Config::parse(
            "cache:\n  backend: s3\n  s3:\n    bucket: b\n    endpoint: http://127.0.0.1:1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("allow_http"), "{e}");
        let e = Config::parse("cache:\n  max_size: 1GiB\n  local_max_size: 1GiB\n").unwrap_err();
        assert!(e.to_string().contains("duplicate field `max_size`"), "{e}");
        let e = Config::parse("cache:\n  backend: gcs\n").unwrap_err();
        assert!(e.to_string().starts_with("cache.backend"), "{e}");
    }

    #[test]
    fn prewarm_defaults_and_bounds() {
        let cfg = Config::parse("catalog:\n  kubernetes: {}\n").unwrap();
        assert_eq!(cfg.catalog.prewarm, PrewarmConfig::default());
        assert!(!cfg.catalog.prewarm.enabled);
        assert_eq!(cfg.catalog.prewarm.concurrency, 2);
        assert_eq!(cfg.catalog.prewarm.versions, PrewarmVersions::Channels);
        let cfg = Config::parse(
            "catalog:\n  files: .\n  prewarm: {enabled: true, concurrency: 4, versions: all}\n",
        )
        .unwrap();
        assert_eq!(cfg.catalog.prewarm.versions, PrewarmVersions::All);
        let e = Config::parse("catalog:\n  prewarm: {enabled: true, concurrency: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("catalog.prewarm.concurrency"), "{e}");
        assert!(e.contains("catalog.prewarm.enabled"), "{e}");
        assert!(Config::parse("catalog:\n  prewarm: {versions: some}\n").is_err());
        assert!(Config::parse("catalog:\n  prewarm: {eager: true}\n").is_err());
    }

    #[test]
    fn catalog_trust_defaults() {
        let cfg = Config::parse("catalog:\n  kubernetes: {}\n").unwrap();
        let k = cfg.catalog.kubernetes.as_ref().unwrap();
        assert_eq!(k.namespaces, ["kcp-system"]);
        assert!(!cfg.catalog.image_credentials);
        let cfg =
            Config::parse("catalog:\n  image_credentials: true\n  kubernetes: {namespaces: []}\n")
                .unwrap();
        assert!(cfg.catalog.image_credentials);
        assert!(cfg.catalog.kubernetes.unwrap().namespaces.is_empty());
        let e = Config::parse("catalog:\n  kubernetes: {namespaces: [\" \"]}\n").unwrap_err();
        assert!(
            e.to_string().starts_with("catalog.kubernetes.namespaces:"),
            "{e}"
        );
        let e = Config::parse("catalog:\n  default_secret: {namespace: a, name: \"x,y\"}\n")
            .unwrap_err();
        assert!(
            e.to_string().starts_with("catalog.default_secret.name:"),
            "{e}"
        );
        assert!(
            Config::parse("catalog:\n  own_upstream: x\n").is_err(),
            "not a config key"
        );
    }

    #[test]
    fn read_rule_keys() {
        let c = Config::parse("cache:\n  dir: /x\n").unwrap();
        assert_eq!(c.cache.link_ttl, Duration::from_secs(24 * 3600));
        let e = Config::parse("cache:\n  link_ttl: 0s\n").unwrap_err();
        assert_eq!(e.to_string(), "cache.link_ttl: must be more than 0");
        let c = Config::parse(
            "upstreams:\n  - name: a.io\n  - name: b.io\n    trust_content_from: [a.io]\n",
        )
        .unwrap();
        assert_eq!(c.upstreams[1].trust_content_from, vec!["a.io".to_string()]);
        let e = Config::parse("upstreams:\n  - name: b.io\n    trust_content_from: [c.io]\n")
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("upstreams[0].trust_content_from: \"c.io\""),
            "{e}"
        );
    }

    #[test]
    fn limits_have_safe_defaults_and_refuse_zero() {
        let l = Config::parse("{}").unwrap().limits;
        assert_eq!(l.max_tag_pages, 10);
        assert_eq!(l.fill_min_rate, ByteSize(16 << 10));
        assert_eq!(l.max_blob_size, None);
        let cfg = Config::parse("limits:\n  max_blob_size: 1GiB\n  write_timeout: 5s\n").unwrap();
        assert_eq!(cfg.limits.max_blob_size, Some(ByteSize(1 << 30)));
        assert_eq!(cfg.limits.write_timeout, Duration::from_secs(5));
        for key in [
            "max_connections: 0",
            "idle_timeout: 0s",
            "max_tag_pages: 0",
            "max_blob_size: 0",
        ] {
            let e = Config::parse(&format!("limits:\n  {key}\n")).unwrap_err();
            let name = key.split(':').next().unwrap();
            assert_eq!(e.to_string(), format!("limits.{name}: must be more than 0"));
        }
        // fill_min_rate 0 turns the check off.
        assert!(Config::parse("limits:\n  fill_min_rate: 0\n").is_ok());
    }

    #[test]
    fn validation_reports_every_problem_each_with_its_key_path_once() {
        let e = Config::parse(
            "default_upstream: nowhere.io\nupstreams:\n  - name: a.io\n    endpoint: ftp://x\n\
             \x20 - name: b.io\n    trust_content_from: [c.io]\nlimits:\n  max_connections: 0\n\
             cache:\n  link_ttl: 0s\n  backend: s3\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e.lines().collect::<Vec<_>>(),
            [
                "upstreams[0].endpoint: must be an http:// or https:// URL with a host",
                "upstreams[1].trust_content_from: \"c.io\" is not one of upstreams[].name",
                "cache.link_ttl: must be more than 0",
                "default_upstream: \"nowhere.io\" is not one of upstreams[].name",
                "limits.max_connections: must be more than 0",
                "cache.s3: required when cache.backend is s3",
            ]
        );
        // A value serde refuses: its key path said once, not twice.
        let e = Config::parse("listen: nope\n").unwrap_err().to_string();
        assert!(e.starts_with("listen: "), "{e}");
        assert!(!e.starts_with("listen: listen"), "{e}");
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = Config::parse(
            "upstreams:\n  - name: a.io\n    endpoint: http://bob:hunter2@127.0.0.1:5000\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("upstreams[0].endpoint") && e.contains("user:password@"),
            "{e}"
        );
        assert!(!e.contains("hunter2") && !e.contains("bob"), "{e}");
        for bad in ["a/b", "u@h", "h:port", "[::1"] {
            let yaml = format!("upstreams:\n  - name: a.io\n    token_realm_hosts: [\"{bad}\"]\n");
            let e = Config::parse(&yaml).unwrap_err().to_string();
            assert!(e.contains("token_realm_hosts[0]"), "{bad}: {e}");
        }
        Config::parse("upstreams:\n  - name: a.io\n    token_realm_hosts: [a.io, \"a.io:8443\", \"[::1]:5000\"]\n")
            .unwrap();
        let e = Config::parse("upstreams:\n  - name: a.io\n    endpoint: ftp://x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "upstreams[0].endpoint: must be an http:// or https:// URL with a host"
        );
        let e = Config::parse("cache:\n  dir: /x\n  colour: red\n").unwrap_err();
        assert!(e.to_string().starts_with("cache"), "{e}");
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = Config::parse("cache:\n  tag_ttl: soon\n").unwrap_err();
        assert!(
            e.to_string().starts_with("cache.tag_ttl: ")
                && e.to_string().contains("invalid duration"),
            "{e}"
        );
        let e = Config::parse("default_upstream: nowhere.io\n").unwrap_err();
        assert!(e.to_string().starts_with("default_upstream:"), "{e}");
    }
}
