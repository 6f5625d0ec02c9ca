//! The HTTP server: accepts connections (plain HTTP/1.1 and h2c, or TLS with ALPN `h2` and
//! `http/1.1`), turns each request into a response via [`handlers`], and shuts down gracefully.
//!
//! There is deliberately no generic middleware stack: each concern sits at one visible place.
//! - TLS: in the accept loop ([`serve`]), with the certificate from [`tls::ReloadingCert`],
//!   because the handshake happens before HTTP exists; its duration is bounded by
//!   `header_read_timeout` like the rest of a request head;
//! - header size limits: in the hyper connection builder; the header read timeout: a wait for
//!   the first byte here, then [`guard::Guarded`] (for HTTP/1 and HTTP/2 alike);
//! - which config serves a request: the service reads [`reload::Live`] once per request, so a
//!   reload applies to new requests while running ones finish with the `App` they began with;
//! - the access log and request metrics: the [`body::Metered`] wrapper around every response,
//!   because only the end of the body knows the bytes sent and the full duration;
//! - the bound on open connections (`limits.max_connections`): in the accept loop, which
//!   closes a connection beyond it at once (queueing would let a flood hold the backlog);
//! - write, idle and HTTP/2 request-head timeouts: in [`guard::Guarded`] around the socket,
//!   because hyper has none of them for HTTP/2 and no write timeout at all; HTTP/2 streams
//!   per connection and send buffers: in the hyper connection builder;
//! - the bound on concurrent upstream fetches: in `upstream`, around each upstream request,
//!   because cache hits must never queue behind upstream traffic.

pub(crate) mod body;
mod catalog_adapters;
pub(crate) mod guard;
pub(crate) mod handlers;
pub mod reload;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Limits, LogFormat};
use crate::credentials::chain::CredentialChain;
use crate::metrics::Metrics;
use crate::routing::HostSource;
use crate::upstream::Upstreams;
use body::{Metered, Recorder, RequestRecord};
use reload::Live;

/// Everything a request handler needs, shared by all connections.
pub struct App {
    pub config: Config,
    pub upstreams: Upstreams,
    pub credentials: CredentialChain,
    pub hosts: Option<Arc<dyn HostSource>>,
    pub metrics: Arc<Metrics>,
    /// Readiness beyond "config loaded": e.g. the catalog's first full sync.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    pub cache: Arc<crate::cache::Cache>,
    /// The module catalog, when one is configured.
    pub catalog: Option<Arc<crate::catalog::Catalog>>,
    /// The catalog's metric families, registered once per process (a reload may start a new
    /// catalog that reports into them).
    catalog_metrics: crate::catalog::CatalogMetrics,
}

/// Logs and counts each request once (see [`body::Metered`]).
struct AccessLog {
    metrics: Arc<Metrics>,
}

impl Recorder for AccessLog {
    fn record(
        &self,
        rec: &RequestRecord,
        bytes: u64,
        elapsed: std::time::Duration,
        complete: bool,
    ) {
        self.metrics.request(rec.route, rec.status, elapsed, bytes);
        tracing::info!(
            target: "oci_proxy::access",
            method = %rec.method,
            route = rec.route,
            repository = %rec.repository,
            status = rec.status,
            bytes,
            duration_ms = elapsed.as_millis() as u64,
            cache = rec.cache,
            error = rec.error.unwrap_or(""),
            complete,
            "request"
        );
    }
}

/// Which protocols a connection may speak.
#[derive(Clone, Copy)]
enum Protocols {
    /// Plain TCP: HTTP/1.1, or h2c with prior knowledge (detected from the preface).
    Detect,
    /// TLS with ALPN `h2`.
    H2,
    /// TLS without ALPN `h2`.
    H1,
}

/// Largest HTTP/2 send buffer per stream (hyper's default is about 400 KiB).
const H2_SEND_BUF: usize = 64 << 10;

/// A connection builder with the configured limits.
fn conn_builder(limits: &Limits, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder = match protocols {
        Protocols::Detect => builder,
        Protocols::H2 => builder.http2_only(),
        Protocols::H1 => builder.http1_only(),
    };
    builder
        .http1()
        .timer(TokioTimer::new())
        // Not hyper's: it also runs while a keep-alive connection waits for its next request,
        // which would make `idle_timeout` unreachable; [`guard::Guarded`] enforces both.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_size.0.max(8192) as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_size.0.min(u32::MAX as u64) as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Per stream: what a stream that the client does not read can hold in memory.
        .max_send_buf_size(H2_SEND_BUF);
    builder
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
/// for up to `shutdown_grace`. With `tls`, every connection is TLS.
pub async fn serve(
    live: Arc<Live>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let recorder: Arc<dyn Recorder> = Arc::new(AccessLog {
        metrics: live.current().metrics.clone(),
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let app = live.current();
        if open.load(Ordering::Acquire) >= app.config.limits.max_connections {
            app.metrics
                .limit_hit(crate::metrics::Limit::MaxConnections, &peer.to_string());
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            open: OpenConn::new(open.clone()),
            live: live.clone(),
            recorder: recorder.clone(),
            watcher: graceful.watcher(),
            peer,
        };
        tokio::spawn(conn.run(stream, tls.clone()));
    }
    // New connections are refused from here on.
    drop(listener);
    let grace = live.current().config.shutdown_grace.0;
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: waiting for in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
    Ok(())
}

/// Counts a connection as open until dropped.
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(open: Arc<AtomicUsize>) -> OpenConn {
        open.fetch_add(1, Ordering::AcqRel);
        OpenConn(open)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accepted connection.
struct Conn {
    open: OpenConn,
    live: Arc<Live>,
    recorder: Arc<dyn Recorder>,
    watcher: Watcher,
    peer: SocketAddr,
}

impl Conn {
    async fn run(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        // Limits as configured when the connection arrived.
        let app = self.live.current();
        let limits = app.config.limits.clone();
        let head_timeout = limits.header_read_timeout.0;
        let activity = Arc::new(guard::Activity::default());
        let timeouts = guard::Timeouts {
            header_read: head_timeout,
            idle: limits.idle_timeout.0,
            write: limits.write_timeout.0,
        };
        let Some(tls) = tls else {
            // Protocol detection waits for bytes before hyper's header timer starts.
            if tokio::time::timeout(head_timeout, stream.peek(&mut [0u8; 1]))
                .await
                .is_err()
            {
                app.metrics.limit_hit(
                    crate::metrics::Limit::HeaderReadTimeout,
                    &self.peer.to_string(),
                );
                return;
            }
            let stream = guard::Guarded::new(
                stream,
                activity.clone(),
                timeouts,
                app.metrics.clone(),
                self.peer,
            );
            return self
                .serve(stream, activity, conn_builder(&limits, Protocols::Detect))
                .await;
        };
        let stream = guard::Guarded::new(
            stream,
            activity.clone(),
            timeouts,
            app.metrics.clone(),
            self.peer,
        );
        let stream = match tokio::time::timeout(head_timeout, tls.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                app.metrics.limit_hit(
                    crate::metrics::Limit::HeaderReadTimeout,
                    &self.peer.to_string(),
                );
                return;
            }
        };
        let protocols = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocols::H2,
            _ => Protocols::H1,
        };
        self.serve(stream, activity, conn_builder(&limits, protocols))
            .await
    }

    async fn serve<I>(
        self,
        io: I,
        activity: Arc<guard::Activity>,
        builder: auto::Builder<TokioExecutor>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            open: _open,
            live,
            recorder,
            watcher,
            peer,
        } = self;
        let service = service_fn(move |req: Request<Incoming>| {
            let app = live.current();
            let recorder = recorder.clone();
            // In flight from here until the response body is dropped.
            let in_flight = activity.begin();
            async move {
                let started = Instant::now();
                let (resp, record) = handlers::handle(&app, req).await;
                let (parts, body) = resp.into_parts();
                let length = parts
                    .headers
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let body = guard::track(body, in_flight);
                let body = Metered::new(body, length, record, recorder, started);
                Ok::<_, Infallible>(hyper::Response::from_parts(parts, body))
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Sets up `tracing` for the configured log format.
pub fn init_logging(format: LogFormat) {
    init_logging_at(format, "info,hyper=warn,reqwest=warn,kube=warn")
}

/// [`init_logging`] with another filter when `OCI_PROXY_LOG` is not set (`oci-proxy prewarm`
/// on a terminal, whose display already says what the log would).
pub fn init_logging_at(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("OCI_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a person: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The `host:port` names a client on this machine may use for the proxy itself: a
/// ModuleTemplate `baseUrl` starting with one of them names the upstream behind the proxy.
fn own_hosts(listen: std::net::SocketAddr) -> Vec<String> {
    let port = listen.port();
    let mut hosts = vec![listen.to_string()];
    if listen.ip().is_loopback() || listen.ip().is_unspecified() {
        hosts.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}")]);
    }
    hosts
}

/// Building the app from a config failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamSetupError),
    #[error("credentials.docker_config: {0}")]
    DockerConfig(#[from] crate::credentials::dockerconfig::DockerConfigError),
    #[error("cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Ambient(#[from] crate::credentials::ambient::AmbientSetupError),
}

impl App {
    /// Wires the proxy from a validated config.
    pub async fn build(config: Config) -> Result<App, BuildError> {
        App::assemble(config, None).await
    }

    /// The app for a reloaded config. Carries over the metrics registry, the open cache (a
    /// cache is opened once per process, so every `cache` key but `tag_ttl` needs a restart),
    /// the catalog when `catalog` is unchanged, and each upstream's client, learned challenge
    /// and tokens while its settings are unchanged (see [`Upstreams::rebuild`]). Everything
    /// else is built anew.
    pub async fn rebuild(&self, config: Config) -> Result<App, BuildError> {
        App::assemble(config, Some(self)).await
    }

    async fn assemble(config: Config, previous: Option<&App>) -> Result<App, BuildError> {
        let (metrics, catalog_metrics) = match previous {
            Some(p) => (p.metrics.clone(), p.catalog_metrics.clone()),
            None => {
                let metrics = Arc::new(Metrics::new()?);
                let catalog = crate::catalog::CatalogMetrics::register(&metrics.registry)?;
                (metrics, catalog)
            }
        };
        let upstreams = match previous {
            Some(p) => {
                let (upstreams, s) = p.upstreams.rebuild(&config, metrics.clone())?;
                tracing::info!(
                    kept = s.kept,
                    rebuilt = s.rebuilt,
                    added = s.added,
                    removed = s.removed,
                    catalog_hosts_kept = s.dynamic_kept,
                    fetch_pool_kept = s.fetch_pool_kept,
                    "config reload: upstreams"
                );
                upstreams
            }
            None => Upstreams::new(&config, metrics.clone())?,
        };
        let cache = match previous {
            Some(p) => p.cache.clone(),
            None => crate::cache::Cache::open(&config.cache, &metrics.registry).await?,
        };
        let mut keychain = crate::credentials::keychain::Keychain::new();
        if let Some(path) = &config.credentials.docker_config {
            let dc = crate::credentials::dockerconfig::DockerConfig::load(path)?;
            keychain.add(&format!("docker config {}", path.display()), &dc);
        }
        let catalog = match previous {
            Some(p)
                if p.config.catalog.same_catalog(&config.catalog)
                    && p.config.listen == config.listen
                    && p.config.default_upstream == config.default_upstream =>
            {
                p.catalog.clone()
            }
            _ if config.catalog.is_configured() => {
                let mut c = config.catalog.clone();
                c.proxy_hosts.extend(own_hosts(config.listen));
                c.own_upstream = config.default_upstream.clone();
                let m = Some(catalog_metrics.clone());
                Some(crate::catalog::Catalog::start_with(&c, None, m).await?)
            }
            _ => None,
        };
        let ambient = Arc::new(crate::credentials::ambient::Ambient::build(
            &config.credentials,
            previous.map(|p| p.credentials.ambient().as_ref()),
            &metrics.registry,
        )?);
        let configured: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
        let modules = catalog
            .clone()
            .map(|c| c as Arc<dyn crate::credentials::chain::ModuleCredentials>);
        let hosts = catalog.clone().map(|c| c as Arc<dyn HostSource>);
        let ready: Box<dyn Fn() -> bool + Send + Sync> = match catalog.clone() {
            Some(c) => Box::new(move || c.is_ready()),
            None => Box::new(|| true),
        };
        Ok(App {
            config,
            upstreams,
            credentials: CredentialChain::new(keychain, modules).with_ambient(ambient, configured),
            hosts,
            metrics,
            ready,
            cache,
            catalog,
            catalog_metrics,
        })
    }

    /// The credential `target`'s repository is entitled to (the credential chain's choice).
    pub(crate) async fn choose_credential(
        &self,
        target: &crate::routing::Target,
    ) -> Result<crate::credentials::chain::Chosen, crate::credentials::chain::ChooseError> {
        self.credentials
            .choose(
                &target.upstream.name,
                &target.upstream.endpoint_host(),
                target.repository.as_str(),
            )
            .await
    }

    /// What `oci-proxy resolve` prints for a repository path as a client would request it.
    pub async fn explain(&self, name: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let name = name.trim_start_matches('/');
        // Module hosts are routable only once the catalog knows them.
        let synced = match &self.catalog {
            Some(catalog) => catalog.wait_ready(std::time::Duration::from_secs(30)).await,
            None => true,
        };
        if !synced {
            let _ = writeln!(out, "warning: the catalog did not finish its first sync");
        }
        let target =
            match crate::routing::resolve(&self.upstreams, self.hosts.as_deref(), name, None) {
                Ok(t) => t,
                Err(e) => return format!("{out}repository: {name}\nerror: {}\n", e.message),
            };
        let _ = writeln!(out, "repository: {name}");
        let _ = writeln!(out, "upstream: {}", target.upstream.name);
        let _ = writeln!(out, "endpoint: {}", target.upstream.endpoint);
        let _ = writeln!(out, "upstream repository: {}", target.repository);
        if let Some(catalog) = &self.catalog {
            let explanation = catalog.explain(&target.upstream.name, target.repository.as_str());
            let _ = writeln!(out, "{explanation}");
            let versions = catalog.versions_of(&target.upstream.name, target.repository.as_str());
            if !versions.is_empty() {
                let _ = writeln!(out, "module versions (content in the cache):");
            }
            for v in versions {
                let state = crate::pull::cached_state(&self.cache, &target, &v.version).await;
                let channel = if v.channel { " (channel)" } else { "" };
                let _ = writeln!(out, "  {}{channel}: {state}", v.version);
            }
        }
        match self.choose_credential(&target).await {
            Ok(c) => {
                let _ = writeln!(out, "credential: {}", c.credential.kind());
                let _ = writeln!(out, "credential id: {}", c.credential.id());
                let _ = writeln!(out, "credential source: {}", c.source);
            }
            Err(crate::credentials::chain::ChooseError::Denied(message)) => {
                let _ = writeln!(out, "credential: DENIED");
                let _ = writeln!(out, "reason: {message}");
            }
            Err(e) => {
                let _ = writeln!(out, "credential: UNAVAILABLE");
                let _ = writeln!(out, "reason: {e}");
            }
        }
        out
    }
}
