//! The HTTP server: accepts connections (HTTP/1.1 and h2c), turns each request into a
//! response via [`handlers`], and shuts down gracefully.
//!
//! There is deliberately no generic middleware stack: each concern sits at one visible place.
//! - header read timeout and header size limits: in the hyper connection builder, because only
//!   hyper sees a slow client before a request exists;
//! - the access log and request metrics: the [`body::Metered`] wrapper around every response,
//!   because only the end of the body knows the bytes sent and the full duration;
//! - the bound on concurrent upstream fetches: in `upstream`, around each upstream request,
//!   because cache hits must never queue behind upstream traffic.

pub mod body;
pub mod handlers;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{Config, LogFormat};
use crate::credentials::chain::CredentialChain;
use crate::metrics::Metrics;
use crate::routing::HostSource;
use crate::upstream::Upstreams;
use body::{Metered, Recorder, RequestRecord};

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

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
/// for up to `shutdown_grace`.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let recorder: Arc<dyn Recorder> = Arc::new(AccessLog {
        metrics: app.metrics.clone(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.limits.header_read_timeout.0)
        .max_buf_size(app.config.limits.max_header_size.0.max(8192) as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(app.config.limits.max_header_size.0.min(u32::MAX as u64) as u32);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let recorder = recorder.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let recorder = recorder.clone();
            async move {
                let started = Instant::now();
                let (resp, record) = handlers::handle(&app, req).await;
                let (parts, body) = resp.into_parts();
                let body = Metered::new(body, record, recorder, started);
                Ok::<_, Infallible>(hyper::Response::from_parts(parts, body))
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = app.config.shutdown_grace.0;
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

/// Sets up `tracing` for the configured log format.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("OCI_PROXY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,reqwest=warn,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
}

impl App {
    /// Wires the proxy from a validated config.
    pub async fn build(config: Config) -> Result<App, BuildError> {
        let metrics = Arc::new(Metrics::new()?);
        let upstreams = Upstreams::new(&config, metrics.clone())?;
        let cache = crate::cache::Cache::open(&config.cache, &metrics.registry).await?;
        let mut keychain = crate::credentials::keychain::Keychain::new();
        if let Some(path) = &config.credentials.docker_config {
            let dc = crate::credentials::dockerconfig::DockerConfig::load(path)?;
            keychain.add(&format!("docker config {}", path.display()), &dc);
        }
        let c = &config.catalog;
        let catalog = if c.kubernetes.is_some() || c.files.is_some() || c.default_secret.is_some() {
            Some(crate::catalog::Catalog::start(c).await?)
        } else {
            None
        };
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
            credentials: CredentialChain::new(keychain, modules),
            hosts,
            metrics,
            ready,
            cache,
            catalog,
        })
    }

    /// What `oci-proxy resolve` prints for a repository path as a client would request it.
    pub async fn explain(&self, name: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let name = name.trim_start_matches('/');
        let target =
            match crate::routing::resolve(&self.upstreams, self.hosts.as_deref(), name, None) {
                Ok(t) => t,
                Err(e) => return format!("repository: {name}\nerror: {}\n", e.message),
            };
        let _ = writeln!(out, "repository: {name}");
        let _ = writeln!(out, "upstream: {}", target.upstream.name);
        let _ = writeln!(out, "endpoint: {}", target.upstream.endpoint);
        let _ = writeln!(out, "upstream repository: {}", target.repository);
        if let Some(catalog) = &self.catalog {
            if !catalog.wait_ready(std::time::Duration::from_secs(30)).await {
                let _ = writeln!(out, "warning: the catalog did not finish its first sync");
            }
            let explanation = catalog.explain(&target.upstream.name, target.repository.as_str());
            let _ = writeln!(out, "{explanation}");
        }
        match self.credentials.choose(
            &target.upstream.name,
            &target.upstream.endpoint_host(),
            target.repository.as_str(),
        ) {
            Ok(c) => {
                let _ = writeln!(out, "credential: {}", c.credential.kind());
                let _ = writeln!(out, "credential source: {}", c.source);
            }
            Err(message) => {
                let _ = writeln!(out, "credential: DENIED");
                let _ = writeln!(out, "reason: {message}");
            }
        }
        out
    }
}
