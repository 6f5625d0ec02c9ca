//! The `oci-proxy` command line: `serve`, `check-config`, `resolve`, `prewarm`, `import`,
//! `probe`, `gc-shared`.
//!
//! `serve` wires the process around [`server::serve`]: the listener, TLS, the config reloader
//! (SIGHUP and file changes) and SIGTERM/SIGINT as the graceful shutdown trigger.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use oci_proxy::config::Config;
use oci_proxy::server::{self, App};

#[derive(Parser)]
#[command(
    name = "oci-proxy",
    version,
    about = "Authenticating OCI pull-through proxy with a digest-verified cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. Without --config it runs the embedded default: a local mirror on
    /// 127.0.0.1:5000 with a disk cache in ./oci-proxy-cache.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and print its resolved form (secrets redacted).
    CheckConfig { file: PathBuf },
    /// Explain which upstream and credential a repository (as a client requests it) gets.
    Resolve {
        #[arg(long)]
        config: PathBuf,
        repository: String,
    },
    /// Pull images or module versions (`host[:port]/repo:tag` or `...@sha256:...`) through the
    /// configured upstreams and credentials into the cache, then exit; exit 1 when any failed.
    Prewarm {
        #[arg(long)]
        config: PathBuf,
        /// A file with one reference per line (`#` starts a comment).
        #[arg(long)]
        from_file: Option<PathBuf>,
        references: Vec<String>,
    },
    /// Health check for exec probes (the sidecar listens on 127.0.0.1, which kubelet HTTP
    /// probes cannot reach): GET the URL, exit 0 on a 2xx answer, 1 otherwise.
    Probe {
        /// e.g. http://127.0.0.1:5000/readyz
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "2s")]
        timeout: oci_proxy::config::Duration,
    },
    /// Evict from the shared S3 cache: delete the oldest blobs until `<prefix>blobs/` holds at
    /// most the bound, and expired leases. Prints every deleted key and size, then totals.
    GcShared {
        #[arg(long)]
        config: PathBuf,
        /// The bound (e.g. 200GiB); defaults to `cache.s3.max_size`.
        #[arg(long)]
        max_size: Option<oci_proxy::config::ByteSize>,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Seed the cache from an OCI image layout (e.g. `skopeo copy docker://... oci:DIR:tag`)
    /// as if it had been pulled through `--as <upstream>/<repository>`. Every blob is
    /// verified first; a bad layout stores nothing and exits 1. Run it while no proxy uses
    /// the cache dir.
    Import {
        #[arg(long)]
        config: PathBuf,
        /// The OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
        layout: PathBuf,
        /// The repository as a client would pull it through the proxy, e.g.
        /// `registry.example.com/team/app`.
        #[arg(long = "as", value_name = "UPSTREAM/REPOSITORY")]
        name: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            // A config with several problems says each on its own line.
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            print!("{}", cfg.to_yaml());
            Ok(())
        }
        Command::Serve { config, listen } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::embedded_default()?,
            };
            if let Some(listen) = listen {
                cfg.listen = listen;
            }
            server::init_logging(cfg.log_format);
            runtime()?.block_on(serve(cfg, config, listen))
        }
        Command::Resolve { config, repository } => {
            let cfg = Config::load(&config)?;
            runtime()?.block_on(async move {
                let app = App::build(cfg).await?;
                print!("{}", app.explain(&repository).await);
                Ok(())
            })
        }
        Command::Prewarm {
            config,
            from_file,
            mut references,
        } => {
            let cfg = Config::load(&config)?;
            // On a terminal the progress display says per reference what the log would.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                server::init_logging_at(cfg.log_format, "error");
            } else {
                server::init_logging(cfg.log_format);
            }
            if let Some(list) = from_file {
                let text = std::fs::read_to_string(&list)
                    .with_context(|| format!("cannot read {}", list.display()))?;
                references.extend(oci_proxy::prewarm::references_from_list(&text));
            }
            anyhow::ensure!(
                !references.is_empty(),
                "no references given (arguments or --from-file)"
            );
            let all_cached = runtime()?.block_on(oci_proxy::prewarm::cli(cfg, references))?;
            anyhow::ensure!(all_cached, "some references were not cached (see above)");
            Ok(())
        }
        Command::Probe { url, timeout } => runtime()?.block_on(async move {
            let client = reqwest::Client::builder()
                .timeout(timeout.0)
                .no_proxy()
                .build()
                .context("cannot build the HTTP client")?;
            let resp = client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("{url}: no answer"))?;
            anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
            Ok(())
        }),
        Command::GcShared {
            config,
            max_size,
            dry_run,
        } => {
            let cfg = Config::load(&config)?;
            server::init_logging(cfg.log_format);
            let report = runtime()?.block_on(oci_proxy::gc::run(&cfg.cache, max_size, dry_run))?;
            print!("{report}");
            Ok(report.into_result()?)
        }
        Command::Import {
            config,
            layout,
            name,
        } => {
            let cfg = Config::load(&config)?;
            server::init_logging(cfg.log_format);
            let summary = runtime()?.block_on(oci_proxy::import::run(cfg, &layout, &name))?;
            print!("{summary}");
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Keeps freed heap memory for reuse instead of returning it to the kernel at once.
///
/// Why: a miss receives the upstream body in buffers of up to ~400 KiB (hyper's read buffer),
/// and the cache holds each one for a while (the readers' window, the hasher, the writer), so
/// hyper allocates a fresh one for every read. glibc's defaults give the freed ones back
/// (`madvise`/`munmap` once the free top of a heap passes about twice the largest freed block),
/// and the kernel zero-fills every page again when the next `recv` writes into it: a profile of
/// a cold 256 MiB fetch had about 9% of the proxy's CPU in those page faults. With blocks below
/// 16 MiB kept off `mmap` and up to 64 MiB of free heap kept per arena, the same pages are
/// reused: measured 10-20% less CPU per byte on a cold fetch (`docs/benchmarks.md`). Retained
/// memory stays within the peak the process already reached.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 16 << 20;
    const TRIM_THRESHOLD: libc::c_int = 64 << 20;
    // SAFETY: mallopt only sets glibc's malloc parameters (it takes the arena locks itself);
    // it is called before the runtime starts its threads, and fails by returning 0, which
    // leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// How often the config file's metadata is checked for changes.
const CONFIG_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve(
    cfg: Config,
    config_path: Option<PathBuf>,
    listen_override: Option<SocketAddr>,
) -> Result<()> {
    let listen = cfg.listen;
    let certs = match &cfg.tls {
        Some(tls) => Some(server::tls::ReloadingCert::load(tls)?),
        None => None,
    };
    let acceptor = match &certs {
        Some(c) => Some(tokio_rustls::TlsAcceptor::from(server::tls::server_config(
            c.clone(),
        )?)),
        None => None,
    };
    let live = server::reload::Live::new(App::build(cfg).await?);
    // Follows the live config: idle unless `catalog.prewarm.enabled`.
    let prewarm = oci_proxy::prewarm::spawn(live.clone())?;
    // The embedded default has no file to reload.
    let reloader = config_path.map(|path| {
        server::reload::Reloader {
            live: live.clone(),
            path,
            listen_override,
            tls: certs.clone(),
        }
        .spawn(CONFIG_POLL_INTERVAL)
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    tracing::info!(listen = %local, tls = acceptor.is_some(), "oci-proxy listening");
    server::serve(live, listener, acceptor, shutdown).await?;
    if let Some(r) = reloader {
        r.abort();
    }
    prewarm.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed before this returns, so a
/// SIGTERM right after "listening" already shuts down gracefully.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
