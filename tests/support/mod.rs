//! Shared integration-test fixtures. Include from a test file with `mod support;`.
//!
//! Everything talks to 127.0.0.1 on free ports, so tests can run in parallel.
//! Fixtures panic with a descriptive message on failure (they are test code).
//! Processes are killed and reaped when their handle is dropped.
//!
//! # Upstream registry (`registry`)
//! - `Registry::start(RegistryAuth) -> Registry` (async): Debian `docker-registry`
//!   2.8.2 in a temp dir. `RegistryAuth::{Anonymous, Htpasswd { users }, Token(TokenServerInfo)}`
//!   (`RegistryAuth::htpasswd(&[("u", "p")])` is a shorthand). Basic realm: `BASIC_REALM`.
//! - `url()` = `http://127.0.0.1:port`, `host()` = `127.0.0.1:port`, `port()`, `logs()`, `auth()`.
//! - `set_htpasswd(&[("u", "p")])`: live password rotation. distribution 2.8 re-reads the
//!   htpasswd file when its mtime changes (verified in `tests/it/fixtures.rs`), no restart needed.
//! - `restart_with(auth)` (async): same data and port, new auth. `stop()` kills it (to test
//!   an unreachable upstream); `restart_with` brings it back.
//!
//! # Token server (`token_server`)
//! - `TokenServer::start(TokenPolicy) -> TokenServer` (async; an axum task on the current
//!   runtime, aborted on drop): mints ES256 JWTs that distribution verifies. `info()` feeds
//!   `RegistryAuth::Token`; `realm()`. Policy: `TokenPolicy::new()` (holds `ADMIN_USER` /
//!   `ADMIN_PASSWORD`, every action everywhere) `.user(u, p)`, `.public_repo(repo)` (anonymous
//!   pull), `.grant(u, repo, &["pull"])`, `.expires_in(d)`; field `oauth_post` (POST → 404 if false).
//! - Runtime changes: `set_password(u, p)`, `set_expires_in(d)`, `update_policy(|p| ..)`.
//! - Observation: `requests() -> Vec<TokenRequest>`, `requests_for_scope(scope) -> usize`,
//!   `reset_counts()` (call it after seeding: seeding uses the admin user).
//!
//! # Seeding (`seed`)
//! `creds: Option<(&str, &str)>` is a user/password pair used as Basic auth or, on a Bearer
//! challenge, sent to the realm to get a token (`None` = anonymous). Payloads are buffered.
//! - `push_blob`, `push_manifest`, `push_image` (OCI), `push_docker_image` (Docker schema2),
//!   `push_image_as(.., ImageFormat)` → `PushedImage`; `random_bytes(len, seed)`, `sha256_digest`.
//! - `registry_request(base_url, creds, Method, path_or_url, headers, body)` and
//!   `registry_get(base_url, creds, path, headers)` do the same 401 dance for any request
//!   (against a registry or the proxy); `fetch_token`, `parse_challenge`; media type constants.
//!
//! # skopeo (`skopeo`)
//! - `skopeo_copy(src_ref, dest_dir, extra_args) -> Output` (async), `skopeo_copy_to(src_ref,
//!   dest, extra_args)` for any destination (e.g. `oci:<dir>:<tag>`), `assert_success(&out)`,
//!   `DirImage::read(dir)` (manifest digest + blob digests of the `dir:` layout).
//!
//! # The proxy under test
//! - `ProxyProcess::start(config_yaml) -> ProxyProcess` (async): `{listen}` in the YAML becomes
//!   `127.0.0.1:<free port>`, `{dir}` a temp dir owned by the handle (cache root). Runs
//!   `oci-proxy serve --config <file>`, waits for `GET /v2/` = 200 (20 s).
//!   `ProxyProcess::start_with_env(config_yaml, &[("K", "V")])` adds environment variables.
//!   `url()`, `host()`, `dir()`, `logs()`, `stop()`; killed on drop.
//!
//! # Faulty upstream (`faulty`)
//! - `FaultyRegistry::start() -> FaultyRegistry` (async): an in-process anonymous registry on
//!   127.0.0.1:0; `url()`, `host()`. Content: `add_blob(repo, bytes) -> digest`,
//!   `link_blob`/`unlink_blob(repo, digest)`, `add_manifest(repo, tag, media_type, bytes)`,
//!   `remove_tag`. Faults per digest: `set_behaviour(digest, Behaviour::{Correct, WrongBytes,
//!   Truncate, Stall, Steps(n), Status(code)})`, `release(digest, steps)`. Counters:
//!   `gets(path)`, `heads(path)`, `total_requests()` with `faulty::blob_path(repo, digest)`.
//!   `go_down(Down::{Unavailable, Refused})`, `go_up()` (async).
//!
//! # Hostile upstream (`hostile`)
//! - `HostileRegistry::start()` (async): blobs that trickle / announce huge sizes / have no
//!   length (`set_blob(digest, Blob::..)`), endless tag lists (`set_tags(repo, TagPages)`);
//!   `requests(kind)`, `open_bodies()`. `ProxyProcess::pid()` for `/proc/<pid>/status`.
//!
//! # AWS STS with web identity (`sts`)
//! - `AwsIdentity::start(ecr_backend) -> AwsIdentity` (async): a TLS STS on 127.0.0.1 that
//!   answers `AssumeRoleWithWebIdentity` for `sts::ROLE_ARN` and the token in `token_file()`,
//!   and passes ECR calls signed with the credentials it issued on to `ecr_backend` (moto).
//!   `url()`, `ca_bundle()`, `token_file()`, `web_identity_token()`; observation:
//!   `sts_calls()`, `issued()`, `ecr_calls()`. `start_for_role(ecr_backend, arn)` trusts the
//!   token for another role.
//!
//! # Helpers
//! - `wait_until(deadline, what, || async { .. bool })` polls until true or panics.
//! - `free_port()`, `http_client()` (reqwest client without env proxies or redirects).
//! - `tool_present(found, what)`: a test whose tool is missing says so loudly and passes,
//!   unless `CI` is set: then it fails (CI installs every tool).
//! - `token_registry(policy) -> (TokenServer, Registry)` (async); `ADMIN` (the admin
//!   credentials for seeding); `TokenPolicy::puller(user, password, repo)`.
//! - `helpers`: `scrape_metrics(url)`, `metric_sum(text, name, labels)`,
//!   `metric_value(text, series)`, `write_docker_config(path, key, user, password)`;
//!   `ProxyProcess::metrics()` scrapes the proxy under test.

pub mod faulty;
pub mod flood;
pub mod google;
pub mod helpers;
pub mod hostile;
pub mod kube_api;
pub mod kyma;
pub mod liar;
pub mod process;
pub mod registry;
pub mod s3;
pub mod seed;
pub mod skopeo;
pub mod sts;
pub mod token_server;

pub use faulty::{Behaviour, Down, FaultyRegistry};
pub use helpers::{
    client_get, metric_sum, metric_value, scrape_metrics, serve_router, write_docker_config,
};
pub use registry::{Registry, RegistryAuth};
pub use seed::{
    parse_challenge, push_blob, push_docker_image, push_image, push_manifest, random_bytes,
    registry_get, registry_request, sha256_digest, PushedImage,
};
pub use skopeo::{assert_success, skopeo_copy, skopeo_copy_to, DirImage};
pub use token_server::{TokenPolicy, TokenRequest, TokenServer, ADMIN_PASSWORD, ADMIN_USER};

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use process::LoggedChild;

/// Whether a tool a test needs is here (`found`). Without it the test is skipped with a loud
/// line on stderr naming `what` is missing and how to install it, unless `CI` is set: there
/// every tool is installed by `scripts/test`, so a missing one fails the test (a broken install
/// step must not pass as a skip).
pub fn tool_present(found: bool, what: &str) -> bool {
    if found {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    assert!(!ci, "{what} (CI is set, so this fails)");
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!!!! SKIPPED: {what}\n").as_bytes(),
    );
    false
}

/// Every password the fixtures hand to an upstream (htpasswd users, token server users), so
/// that every proxy log of the whole test run is checked for them.
static TEST_SECRETS: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Registers a secret that must never appear in a proxy log (short strings are skipped: they
/// would match ordinary log text).
pub fn register_secret(secret: &str) {
    if secret.len() >= 8 {
        if let Ok(mut s) = TEST_SECRETS.lock() {
            s.insert(secret.to_string());
        }
    }
}

/// Panics if `log` contains a registered secret or a JWT (every test token is one).
pub fn assert_no_secrets(log: &str, what: &str) {
    let secrets = TEST_SECRETS.lock().map(|s| s.clone()).unwrap_or_default();
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "{what} contains a test password"
        );
    }
    assert!(!log.contains("eyJ"), "{what} contains a JWT");
}

/// Adds `token_realm_hosts: ["<realm_host>"]` to the upstream whose `endpoint:` line (indented
/// four spaces, as every test config writes it, quoted or not) is `endpoint`.
pub fn trust_realm(yaml: &str, endpoint: &str, realm_host: &str) -> String {
    let plain = format!("    endpoint: {endpoint}\n");
    let quoted = format!("    endpoint: \"{endpoint}\"\n");
    let line = if yaml.contains(&plain) { plain } else { quoted };
    assert!(yaml.contains(&line), "no upstream with endpoint {endpoint}");
    yaml.replace(
        &line,
        &format!("{line}    token_realm_hosts: [\"{realm_host}\"]\n"),
    )
}

/// [`trust_realm`] for `reg`'s token server when it uses token auth; `yaml` unchanged
/// otherwise.
pub fn trust_registry_realm(yaml: &str, reg: &Registry) -> String {
    match reg.auth() {
        RegistryAuth::Token(info) => {
            let host = info.realm.trim_start_matches("http://");
            trust_realm(yaml, &reg.url(), host.split('/').next().unwrap_or_default())
        }
        _ => yaml.to_string(),
    }
}

/// The token server's admin user and password, as the seeding helpers take them.
pub const ADMIN: Option<(&str, &str)> = Some((ADMIN_USER, ADMIN_PASSWORD));

/// A token server enforcing `policy` and a distribution registry that trusts its tokens.
pub async fn token_registry(policy: TokenPolicy) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(policy).await;
    let reg = Registry::start(RegistryAuth::Token(tokens.info())).await;
    (tokens, reg)
}

/// Interval between polls of [`wait_until`] and the process launchers.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns true; panics with `what` after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picked it). Callers that
/// bind it in another process must handle the rare race (the launchers here retry).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A reqwest client for talking to local fixtures: ignores `*_PROXY` variables,
/// never follows redirects, 30 s timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

/// How long [`ProxyProcess::start`] waits for the proxy to answer `GET /v2/`.
pub const PROXY_START_DEADLINE: Duration = Duration::from_secs(20);

/// The `oci-proxy` binary running `serve --config <file>`, killed on drop.
#[derive(Debug)]
pub struct ProxyProcess {
    dir: tempfile::TempDir,
    port: u16,
    child: LoggedChild,
}

/// Every proxy's log is checked for credentials when its handle goes away.
impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_secrets(&self.logs(), "a proxy log");
        }
    }
}

impl ProxyProcess {
    /// Writes `config_yaml` to a temp file, replacing `{listen}` with `127.0.0.1:<free port>`
    /// and `{dir}` with a temp directory owned by the returned handle, spawns the proxy
    /// (output to a log file; `RUST_LOG` defaults to `info,oci_proxy=debug`) and waits until
    /// `GET /v2/` answers 200. Retries with a new port if the listen port was taken.
    /// The config must contain `{listen}` (otherwise the port is unknown).
    pub async fn start(config_yaml: &str) -> ProxyProcess {
        Self::start_with_env(config_yaml, &[]).await
    }

    /// [`ProxyProcess::start`] with extra environment variables for the proxy process
    /// (e.g. `DOCKER_CONFIG`, `RUST_LOG`).
    pub async fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> ProxyProcess {
        assert!(
            config_yaml.contains("{listen}"),
            "proxy config must contain the {{listen}} placeholder"
        );
        let dir = tempfile::tempdir().expect("create proxy temp dir");
        let config_path = dir.path().join("config.yaml");
        let log_path = dir.path().join("proxy.log");
        let client = http_client();
        for _attempt in 0..5 {
            let port = free_port();
            let yaml = config_yaml
                .replace("{listen}", &format!("127.0.0.1:{port}"))
                .replace("{dir}", &dir.path().display().to_string());
            std::fs::write(&config_path, yaml).expect("write proxy config");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci-proxy"));
            cmd.arg("serve").arg("--config").arg(&config_path);
            if std::env::var_os("OCI_PROXY_LOG").is_none() {
                cmd.env("OCI_PROXY_LOG", "info,oci_proxy=debug");
            }
            cmd.envs(env.iter().copied());
            let mut child = LoggedChild::spawn(&mut cmd, &log_path);
            let url = format!("http://127.0.0.1:{port}/v2/");
            let end = Instant::now() + PROXY_START_DEADLINE;
            loop {
                if let Some(status) = child.exited() {
                    let logs = child.logs();
                    if logs.to_ascii_lowercase().contains("already in use") {
                        break; // port race: try another port
                    }
                    panic!("oci-proxy exited during startup ({status}); logs:\n{logs}");
                }
                if let Ok(resp) = client.get(&url).send().await {
                    if resp.status() == reqwest::StatusCode::OK && child.exited().is_none() {
                        return ProxyProcess { dir, port, child };
                    }
                }
                if Instant::now() >= end {
                    let logs = child.logs();
                    panic!(
                        "oci-proxy did not answer GET /v2/ with 200 within \
                         {PROXY_START_DEADLINE:?}; logs:\n{logs}"
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        panic!("oci-proxy could not bind a free port after 5 attempts");
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The temp directory substituted for `{dir}`.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Everything the proxy wrote to stdout/stderr so far.
    pub fn logs(&self) -> String {
        self.child.logs()
    }

    /// The proxy's `/metrics` text (asserts a 200).
    pub async fn metrics(&self) -> String {
        scrape_metrics(&format!("{}/metrics", self.url())).await
    }

    /// Waits until `n` cache fills have committed. A client's clean end comes at verification,
    /// before the commit (fsync, rename): a test that wants a hit after a miss waits for this.
    pub async fn wait_fills_committed(&self, n: f64) {
        wait_until(Duration::from_secs(30), "the fills commit", || async {
            metric_sum(
                &self.metrics().await,
                "oci_proxy_cache_fills_committed_total",
                &[],
            ) >= n
        })
        .await;
    }

    /// The proxy's process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the proxy is running")
    }

    /// Kills the proxy now (also happens on drop).
    pub fn stop(&mut self) {
        self.child.kill();
    }
}
