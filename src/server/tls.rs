//! TLS serving: the rustls server config and a certificate resolver that re-reads the
//! certificate and key files when they change.
//!
//! cert-manager (and Kubernetes Secret volumes generally) replace the files in place; the
//! resolver notices on the next handshake, at most every [`CHECK_INTERVAL`], by comparing
//! modification time, length and inode of both files. Established connections are unaffected
//! (their session keys are already negotiated); new handshakes present the new certificate.
//! A pair that fails to load (e.g. the cert was written but the key not yet) is logged once
//! and the previous certificate stays in use until the files change again.
//!
//! The crypto provider is `ring` (the same as reqwest and kube use); aws-lc-rs would need cmake.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;

use crate::config::TlsConfig;

/// How often a handshake may look at the files' metadata.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Loading the certificate or key failed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tls: {path}: {message}")]
    Pem { path: String, message: String },
    #[error("tls: {path} holds no certificate")]
    NoCertificate { path: String },
    #[error("tls: key {key} does not fit certificate {cert}: {message}")]
    Key {
        cert: String,
        key: String,
        message: String,
    },
    #[error("tls: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// What identifies one version of a file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    // `metadata` follows symlinks: a Secret volume's `..data` swap changes the target's inode.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

struct State {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// The stamps of the last load attempt (successful or not).
    seen: (Option<FileStamp>, Option<FileStamp>),
    current: Arc<CertifiedKey>,
    checked: Instant,
}

/// A [`ResolvesServerCert`] that serves the newest loadable certificate/key pair.
pub struct ReloadingCert {
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("ReloadingCert")
            .field("cert", &st.cert_path)
            .field("key", &st.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair named by `cfg`; an error if it cannot be loaded now.
    pub fn load(cfg: &TlsConfig) -> Result<Arc<ReloadingCert>, TlsError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let seen = (stamp(&cfg.cert), stamp(&cfg.key));
        let current = load_pair(&cfg.cert, &cfg.key, &provider)?;
        Ok(Arc::new(ReloadingCert {
            provider,
            state: Mutex::new(State {
                cert_path: cfg.cert.clone(),
                key_path: cfg.key.clone(),
                seen,
                current: Arc::new(current),
                checked: Instant::now(),
            }),
        }))
    }

    /// Switches to other files (a config reload); they must load now, else nothing changes.
    pub fn set_paths(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        {
            let st = self.lock();
            if st.cert_path == cfg.cert && st.key_path == cfg.key {
                return Ok(());
            }
        }
        let seen = (stamp(&cfg.cert), stamp(&cfg.key));
        let loaded = load_pair(&cfg.cert, &cfg.key, &self.provider)?;
        let mut st = self.lock();
        st.cert_path = cfg.cert.clone();
        st.key_path = cfg.key.clone();
        st.seen = seen;
        st.current = Arc::new(loaded);
        st.checked = Instant::now();
        tracing::info!(cert = %cfg.cert.display(), "tls certificate paths changed");
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current pair, re-read first if the files changed and the last check is old enough.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self.lock();
        if st.checked.elapsed() < CHECK_INTERVAL {
            return st.current.clone();
        }
        st.checked = Instant::now();
        let now = (stamp(&st.cert_path), stamp(&st.key_path));
        if now == st.seen {
            return st.current.clone();
        }
        st.seen = now;
        match load_pair(&st.cert_path, &st.key_path, &self.provider) {
            Ok(loaded) => {
                st.current = Arc::new(loaded);
                tracing::info!(cert = %st.cert_path.display(), "tls certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "tls certificate changed but cannot be loaded; keeping the previous one");
            }
        }
        st.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses a PEM certificate chain and a PEM private key and checks that they belong together.
fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: &Path, e: tokio_rustls::rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_pem = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| TlsError::Key {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message: e.to_string(),
    })
}

/// The server config: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, certificates from `certs`.
pub fn server_config(certs: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(certs.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (TlsConfig, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (TlsConfig { cert, key }, ck.cert.der().to_vec())
    }

    fn served(r: &ReloadingCert) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_pair_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, first) = write_pair(dir.path(), "a.test");
        let r = ReloadingCert::load(&cfg).unwrap();
        assert_eq!(served(&r), first);

        // A half-written rotation (a key that does not fit) keeps the old pair.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&cfg.key, other.serialize_pem()).unwrap();
        r.lock().checked -= CHECK_INTERVAL;
        assert_eq!(served(&r), first);

        let (_, second) = write_pair(dir.path(), "a.test");
        // Not yet due: the files are not even looked at.
        assert_eq!(served(&r), first);
        r.lock().checked -= CHECK_INTERVAL;
        assert_eq!(served(&r), second);
    }

    #[test]
    fn errors_name_the_file_and_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, _) = write_pair(dir.path(), "a.test");
        std::fs::write(&cfg.cert, "not pem").unwrap();
        let e = ReloadingCert::load(&cfg).unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        let missing = TlsConfig {
            cert: dir.path().join("missing.crt"),
            key: cfg.key.clone(),
        };
        let e = ReloadingCert::load(&missing).unwrap_err();
        assert!(e.to_string().contains("missing.crt"), "{e}");
    }
}
