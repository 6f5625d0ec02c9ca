//! A real upstream: Debian's `docker-registry` (distribution 2.8.2) in a temp dir on
//! 127.0.0.1:<free port>, anonymous, htpasswd (bcrypt) or token-authenticated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::process::{read_lossy, LoggedChild};
use super::token_server::TokenServerInfo;
use super::{free_port, http_client, POLL_INTERVAL};

/// Path of the registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "docker-registry";
/// `realm` of the htpasswd Basic challenge.
pub const BASIC_REALM: &str = "basic-realm";
/// How long a (re)start may take before the fixture panics.
pub const REGISTRY_START_DEADLINE: Duration = Duration::from_secs(20);

/// How the registry authenticates clients.
#[derive(Clone, Debug)]
pub enum RegistryAuth {
    /// No auth: everything is allowed.
    Anonymous,
    /// Basic auth against an htpasswd file with these (user, password) pairs.
    Htpasswd { users: Vec<(String, String)> },
    /// Bearer tokens from the given token server.
    Token(TokenServerInfo),
}

impl RegistryAuth {
    /// Shorthand for `RegistryAuth::Htpasswd` from string slices.
    pub fn htpasswd(users: &[(&str, &str)]) -> RegistryAuth {
        RegistryAuth::Htpasswd {
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
        }
    }
}

/// A running `docker-registry serve`, killed on drop.
#[derive(Debug)]
pub struct Registry {
    // Declared first so the process dies before its directory is removed.
    child: Option<LoggedChild>,
    dir: tempfile::TempDir,
    port: u16,
    auth: RegistryAuth,
    /// Pull-through mode: the upstream registry this one mirrors (distribution's proxy).
    remote: Option<String>,
}

/// The chosen port was taken by someone else between `free_port` and bind.
struct PortInUse;

impl Registry {
    /// Starts a registry with `auth` and waits until `GET /v2/` answers 200 or 401.
    pub async fn start(auth: RegistryAuth) -> Registry {
        Registry::start_with(auth, None).await
    }

    /// Starts an anonymous registry in pull-through mode (`proxy.remoteurl`) in front of
    /// `remote` (e.g. `http://127.0.0.1:5000`), with empty storage: distribution's proxy, the
    /// peer the benchmarks compare cold pulls with.
    pub async fn start_pull_through(remote: &str) -> Registry {
        Registry::start_with(RegistryAuth::Anonymous, Some(remote.to_owned())).await
    }

    async fn start_with(auth: RegistryAuth, remote: Option<String>) -> Registry {
        register_passwords(&auth);
        let dir = tempfile::tempdir().expect("registry temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("create registry data dir");
        for _attempt in 0..5 {
            let port = free_port();
            if let Ok(child) = launch(dir.path(), port, &auth, remote.as_deref()).await {
                return Registry {
                    child: Some(child),
                    dir,
                    port,
                    auth,
                    remote,
                };
            }
        }
        panic!("docker-registry could not bind a free port after 5 attempts");
    }

    /// Stops the registry and starts it again on the same port with the same data but
    /// new `auth` (e.g. switch auth modes, or rotate a password with a restart; for a
    /// live htpasswd change see [`Registry::set_htpasswd`]).
    pub async fn restart_with(&mut self, auth: RegistryAuth) {
        register_passwords(&auth);
        self.stop();
        self.auth = auth;
        for _attempt in 0..5 {
            let remote = self.remote.as_deref();
            if let Ok(child) = launch(self.dir.path(), self.port, &self.auth, remote).await {
                self.child = Some(child);
                return;
            }
        }
        panic!("docker-registry could not re-bind port {}", self.port);
    }

    /// Kills the registry (the port then refuses connections). `restart_with` revives it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The auth the registry currently runs with.
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// Everything the registry logged (all runs, including restarts).
    pub fn logs(&self) -> String {
        read_lossy(&log_path(self.dir.path()))
    }

    /// Rewrites the htpasswd file of a running registry (no restart, port stays up).
    /// distribution 2.8 re-reads the file when its mtime changes (checked on each
    /// Basic-authenticated request), so this takes effect with the next request.
    /// Panics unless the registry runs with `RegistryAuth::Htpasswd`.
    pub fn set_htpasswd(&mut self, users: &[(&str, &str)]) {
        users.iter().for_each(|(_, p)| super::register_secret(p));
        assert!(
            matches!(self.auth, RegistryAuth::Htpasswd { .. }),
            "set_htpasswd needs a registry started with RegistryAuth::Htpasswd"
        );
        let auth = RegistryAuth::htpasswd(users);
        let path = self.htpasswd_path();
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let before = mtime(&path);
        if let RegistryAuth::Htpasswd { users } = &auth {
            write_htpasswd(&path, users);
        }
        // File mtimes come from a coarse clock: a rewrite within the same tick would
        // look unchanged to the registry, so make sure the mtime moves.
        if let Some(before) = before.filter(|b| mtime(&path) == Some(*b)) {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(before + Duration::from_secs(1)))
                .expect("bump htpasswd mtime");
        }
        self.auth = auth;
    }

    /// Where the htpasswd file lives (written at each (re)start with `Htpasswd` auth).
    pub fn htpasswd_path(&self) -> PathBuf {
        htpasswd_path(self.dir.path())
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("registry.log")
}

fn htpasswd_path(dir: &Path) -> PathBuf {
    dir.join("htpasswd")
}

/// Writes an htpasswd file with bcrypt entries (cost 4: fast, and accepted by Go's bcrypt).
pub fn write_htpasswd(path: &Path, users: &[(String, String)]) {
    let mut text = String::new();
    for (user, pass) in users {
        let hash = bcrypt::hash(pass, 4).expect("bcrypt hash");
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(path, text).expect("write htpasswd");
}

fn write_config(dir: &Path, port: u16, auth: &RegistryAuth, remote: Option<&str>) -> PathBuf {
    let mut config = json!({
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": dir.join("data")},
            "delete": {"enabled": true},
            "maintenance": {"uploadpurging": {"enabled": false}},
        },
        "http": {"addr": format!("127.0.0.1:{port}"), "secret": "fixture-http-secret"},
    });
    if let Some(remote) = remote {
        config["proxy"] = json!({"remoteurl": remote});
    }
    match auth {
        RegistryAuth::Anonymous => {}
        RegistryAuth::Htpasswd { users } => {
            let path = htpasswd_path(dir);
            write_htpasswd(&path, users);
            config["auth"] = json!({"htpasswd": {"realm": BASIC_REALM, "path": path}});
        }
        RegistryAuth::Token(info) => {
            config["auth"] = json!({"token": {
                "realm": info.realm,
                "service": info.service,
                "issuer": info.issuer,
                "rootcertbundle": info.cert_path,
            }});
        }
    }
    let path = dir.join("config.yml");
    let yaml = serde_yaml::to_string(&config).expect("serialize registry config");
    std::fs::write(&path, yaml).expect("write registry config");
    path
}

/// Writes config, spawns the registry on `port` and waits until it is ours and serving.
async fn launch(
    dir: &Path,
    port: u16,
    auth: &RegistryAuth,
    remote: Option<&str>,
) -> Result<LoggedChild, PortInUse> {
    let config = write_config(dir, port, auth, remote);
    let log = log_path(dir);
    // Logs accumulate across restarts: only look at what this run writes.
    let offset = std::fs::metadata(&log)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let run_logs = || {
        read_lossy(&log)
            .get(offset..)
            .unwrap_or_default()
            .to_string()
    };
    let mut child = LoggedChild::spawn(Command::new(REGISTRY_BIN).arg("serve").arg(&config), &log);
    let listening = format!("listening on 127.0.0.1:{port}");
    let ping = format!("http://127.0.0.1:{port}/v2/");
    let client = http_client();
    let end = Instant::now() + REGISTRY_START_DEADLINE;
    loop {
        if let Some(status) = child.exited() {
            let logs = run_logs();
            if logs.contains("address already in use") {
                return Err(PortInUse);
            }
            panic!("docker-registry exited during startup ({status}); logs:\n{logs}");
        }
        // "listening on" proves the port is bound by our process, not by a neighbour.
        if run_logs().contains(&listening) {
            if let Ok(resp) = client.get(&ping).send().await {
                let code = resp.status().as_u16();
                if code == 200 || code == 401 {
                    return Ok(child);
                }
            }
        }
        if Instant::now() >= end {
            panic!(
                "docker-registry not ready within {REGISTRY_START_DEADLINE:?}; logs:\n{}",
                run_logs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Records the passwords of `auth` so that every proxy log is checked for them.
fn register_passwords(auth: &RegistryAuth) {
    if let RegistryAuth::Htpasswd { users } = auth {
        users.iter().for_each(|(_, p)| super::register_secret(p));
    }
}
