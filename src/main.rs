//! The `oci-proxy` command line: `serve`, `check-config`, `resolve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

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
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
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
            runtime()?.block_on(serve(cfg))
        }
        Command::Resolve { config, repository } => {
            let cfg = Config::load(&config)?;
            runtime()?.block_on(async move {
                let app = App::build(cfg).await?;
                print!("{}", app.explain(&repository).await);
                Ok(())
            })
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(cfg: Config) -> Result<()> {
    let listen = cfg.listen;
    let app = Arc::new(App::build(cfg).await?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "oci-proxy listening");
    server::serve(app, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
