//! Live configuration: the current [`App`] behind a lock that each new request reads once, and
//! the [`Reloader`] that replaces it on SIGHUP or when the config file changes on disk.
//!
//! A reload loads and validates the file, builds a new `App` (reusing the metrics registry and
//! the open cache, and the catalog when its config is unchanged), then swaps it in. Requests
//! already running keep the `App` they started with, so no connection or stream is dropped.
//! An invalid config is logged and counted, and the old one stays.
//!
//! Keys that only take effect at start (a reload keeps their running values and warns):
//! `listen`, `log_format`, switching `tls` on or off, and every `cache` key but `tag_ttl`
//! (`cache.dir`, `cache.max_size` (alias `local_max_size`), `cache.backend`, `cache.s3`,
//! `cache.direct_writes`; the open
//! cache is reused and reads them only when it opens). `cache.s3.max_size` is pinned silently:
//! only `oci-proxy gc-shared` reads it.
//! Everything else is live, including `tls.cert`/`tls.key` paths, `cache.tag_ttl`, `limits`
//! (for new connections; a changed `max_concurrent_upstream_fetches` gets a fresh pool, an
//! unchanged one keeps its pool), `shutdown_grace`, upstreams, credentials and the catalog.
//! Upstreams whose own settings are unchanged keep their client, learned challenge and
//! tokens (see `Upstreams::rebuild`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::tls::{ReloadingCert, TlsError};
use super::{App, BuildError};
use crate::config::{Config, ConfigError};

/// How long a reload waits for a newly started catalog's first sync before swapping anyway.
const CATALOG_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The `App` serving new requests.
pub struct Live {
    app: RwLock<Arc<App>>,
}

impl Live {
    pub fn new(app: App) -> Arc<Live> {
        Arc::new(Live {
            app: RwLock::new(Arc::new(app)),
        })
    }

    /// The current app; callers hold it for one request.
    pub fn current(&self) -> Arc<App> {
        self.app.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, app: Arc<App>) {
        *self.app.write().unwrap_or_else(|p| p.into_inner()) = app;
    }
}

/// A reload that was rejected; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Re-reads the config file and swaps in a new [`App`].
pub struct Reloader {
    pub live: Arc<Live>,
    pub path: PathBuf,
    /// `serve --listen`, which overrides the file's `listen` at every load.
    pub listen_override: Option<SocketAddr>,
    /// The TLS certificate resolver, when serving TLS.
    pub tls: Option<Arc<ReloadingCert>>,
}

impl Reloader {
    /// Loads, validates and applies the config file once.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let mut cfg = Config::load(&self.path)?;
        if let Some(listen) = self.listen_override {
            cfg.listen = listen;
        }
        let old = self.live.current();
        for key in pin_restart_only(&old.config, &mut cfg) {
            tracing::warn!(
                key,
                "config change needs a restart; keeping the running value"
            );
        }
        if old.config == cfg {
            tracing::info!("config reload: no change");
            return Ok(());
        }
        let tls = cfg.tls.clone();
        let new = old.rebuild(cfg).await?;
        // Last fallible step, so a rejected reload never leaves new certificate paths behind.
        if let (Some(certs), Some(tls)) = (&self.tls, &tls) {
            certs.set_paths(tls)?;
        }
        if let Some(catalog) = &new.catalog {
            let reused = old
                .catalog
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, catalog));
            if !reused && !catalog.wait_ready(CATALOG_SYNC_WAIT).await {
                tracing::warn!(
                    "config reload: the new catalog has not synced yet; applying anyway"
                );
            }
        }
        self.live.replace(Arc::new(new));
        Ok(())
    }

    /// Reloads on SIGHUP and whenever the file's modification time, size or inode changes (polled
    /// every `poll`). SIGHUP is hooked before this returns, so from then on it can no longer
    /// terminate the process. The task runs until aborted.
    pub fn spawn(self, poll: Duration) -> tokio::task::JoinHandle<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
                None
            }
        };
        tokio::spawn(self.run(hup, poll))
    }

    async fn run(self, mut hup: Option<tokio::signal::unix::Signal>, poll: Duration) {
        let mut seen = file_stamp(&self.path);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cause = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
                _ = tick.tick() => {
                    if file_stamp(&self.path) == seen {
                        continue;
                    }
                    "file changed"
                }
            };
            seen = file_stamp(&self.path);
            let metrics = self.live.current().metrics.clone();
            match self.reload().await {
                Ok(()) => {
                    metrics.config_reload(true);
                    tracing::info!(cause, path = %self.path.display(), "config reloaded");
                }
                Err(e) => {
                    metrics.config_reload(false);
                    tracing::error!(cause, path = %self.path.display(), error = %e, "config reload rejected; keeping the running config");
                }
            }
        }
    }
}

/// Modification time, size and inode of the file (symlinks followed, so a ConfigMap volume's
/// `..data` swap counts as a change).
fn file_stamp(path: &std::path::Path) -> Option<(Option<SystemTime>, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

/// Sets the keys that only take effect at start back to their running values; returns the
/// names of those that differed.
fn pin_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.listen != running.listen {
        new.listen = running.listen;
        changed.push("listen");
    }
    if new.log_format != running.log_format {
        new.log_format = running.log_format;
        changed.push("log_format");
    }
    if new.cache.dir != running.cache.dir {
        new.cache.dir = running.cache.dir.clone();
        changed.push("cache.dir");
    }
    // The open cache is reused across reloads, and it reads every `cache` key but `tag_ttl`
    // only when it opens (`Cache::open`).
    let (old_cache, new_cache) = (&running.cache, &mut new.cache);
    // `local_max_size` is an alias of `max_size` (serde): a respelling is no change.
    if new_cache.max_size != old_cache.max_size {
        new_cache.max_size = old_cache.max_size;
        changed.push("cache.max_size");
    }
    if new_cache.backend != old_cache.backend {
        new_cache.backend = old_cache.backend;
        changed.push("cache.backend");
    }
    if new_cache.direct_writes != old_cache.direct_writes {
        new_cache.direct_writes = old_cache.direct_writes;
        changed.push("cache.direct_writes");
    }
    if new_cache.s3 != old_cache.s3 {
        // `cache.s3.max_size` is read by `gc-shared`, never by the server: no restart needed.
        let serving_part = |s: &Option<crate::config::S3Config>| {
            s.clone().map(|mut s| {
                s.max_size = None;
                s
            })
        };
        if serving_part(&new_cache.s3) != serving_part(&old_cache.s3) {
            changed.push("cache.s3");
        }
        new_cache.s3 = old_cache.s3.clone();
    }
    if new.tls.is_some() != running.tls.is_some() {
        new.tls = running.tls.clone();
        changed.push("tls");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_keep_their_running_values() {
        let running = Config::parse("listen: 127.0.0.1:5000\ncache:\n  dir: /a\n").unwrap();
        let mut new = Config::parse(
            "listen: 127.0.0.1:6000\nlog_format: json\ncache:\n  dir: /b\n  tag_ttl: 5m\n\
             tls:\n  cert: c\n  key: k\n",
        )
        .unwrap();
        let changed = pin_restart_only(&running, &mut new);
        assert_eq!(changed, ["listen", "log_format", "cache.dir", "tls"]);
        assert_eq!(new.listen, running.listen);
        assert_eq!(new.cache.dir, running.cache.dir);
        assert!(new.tls.is_none());
        // Live keys are kept.
        assert_eq!(new.cache.tag_ttl, crate::config::Duration::from_secs(300));
    }

    #[test]
    fn cache_keys_read_at_open_are_pinned() {
        let running = Config::parse("cache:\n  dir: /a\n  max_size: 10GiB\n").unwrap();
        let mut new = Config::parse(
            "cache:\n  dir: /a\n  local_max_size: 20GiB\n  tag_ttl: 5m\n  backend: s3\n\
             \x20 direct_writes: false\n  s3:\n    bucket: b\n",
        )
        .unwrap();
        let changed = pin_restart_only(&running, &mut new);
        assert_eq!(
            changed,
            [
                "cache.max_size",
                "cache.backend",
                "cache.direct_writes",
                "cache.s3"
            ]
        );
        let mut expected = running.cache.clone();
        expected.tag_ttl = crate::config::Duration::from_secs(300);
        assert_eq!(new.cache, expected, "only tag_ttl is live");
    }

    #[test]
    fn a_respelled_cache_bound_or_a_gc_only_key_needs_no_restart() {
        let running = Config::parse(
            "cache:\n  max_size: 10GiB\n  backend: s3\n  s3:\n    bucket: b\n    max_size: 1TiB\n",
        )
        .unwrap();
        let mut new = Config::parse(
            "cache:\n  local_max_size: 10GiB\n  backend: s3\n  s3:\n    bucket: b\n    max_size: 2TiB\n",
        )
        .unwrap();
        assert!(pin_restart_only(&running, &mut new).is_empty());
        // Pinned all the same, so an otherwise unchanged config compares equal (no rebuild).
        assert_eq!(new, running);

        // A changed bucket is a change.
        let mut new = Config::parse(
            "cache:\n  max_size: 10GiB\n  backend: s3\n  s3:\n    bucket: c\n    max_size: 1TiB\n",
        )
        .unwrap();
        assert_eq!(pin_restart_only(&running, &mut new), ["cache.s3"]);
        assert_eq!(new, running);
    }

    #[test]
    fn tls_paths_are_live() {
        let running = Config::parse("tls:\n  cert: a\n  key: b\n").unwrap();
        let mut new = Config::parse("tls:\n  cert: c\n  key: d\n").unwrap();
        assert!(pin_restart_only(&running, &mut new).is_empty());
        assert_eq!(new.tls.map(|t| t.cert), Some(PathBuf::from("c")));
    }
}
