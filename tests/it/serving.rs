//! Deployability of the server process: TLS (with certificate rotation), HTTP/2 (ALPN and
//! h2c), graceful shutdown on SIGTERM, config reload on SIGHUP and file change, the header
//! read timeout, `/metrics` and the JSON access log. Every proxy started here is checked on
//! drop for leaked passwords and tokens in its log.

use crate::support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::process::LoggedChild;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;

const USER: &str = "serving-user";
const PASSWORD: &str = "serving-secret-pw-4711";

/// Every secret a proxy log must never contain.
fn secrets() -> Vec<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        PASSWORD.to_owned(),
        ADMIN_PASSWORD.to_owned(),
        b64.encode(format!("{USER}:{PASSWORD}")),
        b64.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}")),
        // Every JWT (the token server's tokens) starts with base64url of `{"`.
        "eyJ".to_owned(),
    ]
}

// ---------------------------------------------------------------------------------------------
// A test CA and server certificates.

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "oci-proxy test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1, written to `cert`/`key`
    /// (replaced atomically, like a Secret volume update); returns its DER.
    fn issue(&self, serial: u64, cert: &Path, key: &Path) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "oci-proxy");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &self.cert, &self.key).unwrap();
        write_atomically(key, leaf_key.serialize_pem().as_bytes());
        write_atomically(cert, leaf.pem().as_bytes());
        leaf.der().to_vec()
    }

    /// A reqwest client trusting only this CA.
    fn client(&self, http2_only: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem().as_bytes()).unwrap())
            .timeout(Duration::from_secs(30));
        if http2_only {
            b = b.http2_prior_knowledge();
        }
        b.build().unwrap()
    }

    /// A raw TLS connection to 127.0.0.1:`port` (ALPN `http/1.1`), trusting only this CA.
    async fn connect(&self, port: u16) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn peer_cert(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 GET on a kept-alive connection; returns status and body.
async fn raw_get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response within 10s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = text[..end].to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("content-length");
        if buf.len() >= end + 4 + len {
            let status = head[9..12].parse().unwrap();
            return (status, text[end + 4..end + 4 + len].to_owned());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process.

/// `oci-proxy serve` with a config file the test can rewrite; checks its log for secrets on
/// drop.
struct Proxy {
    dir: tempfile::TempDir,
    port: u16,
    child: LoggedChild,
    tls: bool,
}

impl Proxy {
    /// Starts the proxy with `yaml` (`{listen}` and `{dir}` substituted) and waits until
    /// `/healthz` answers through `client` (which must trust the CA when `tls`).
    async fn start(yaml: &str, tls: bool, client: &reqwest::Client) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let config = dir.path().join("config.yaml");
        for _attempt in 0..5 {
            let port = free_port();
            write_atomically(&config, render(yaml, port, dir.path()).as_bytes());
            let _ = std::fs::remove_file(&log);
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci-proxy"));
            cmd.arg("serve").arg("--config").arg(&config);
            cmd.env("OCI_PROXY_LOG", "info,oci_proxy=debug");
            let mut child = LoggedChild::spawn(&mut cmd, &log);
            let url = format!(
                "{}://127.0.0.1:{port}/healthz",
                if tls { "https" } else { "http" }
            );
            let end = Instant::now() + PROXY_START_DEADLINE;
            loop {
                if let Some(status) = child.exited() {
                    let logs = child.logs();
                    assert!(
                        logs.contains("already in use"),
                        "oci-proxy exited during startup ({status}); logs:\n{logs}"
                    );
                    break;
                }
                if let Ok(r) = client.get(&url).send().await {
                    if r.status() == StatusCode::OK {
                        return Proxy {
                            dir,
                            port,
                            child,
                            tls,
                        };
                    }
                }
                assert!(
                    Instant::now() < end,
                    "oci-proxy did not become healthy; logs:\n{}",
                    child.logs()
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        panic!("oci-proxy could not bind a free port after 5 attempts");
    }

    /// Rewrites the config file (placeholders substituted, same port).
    fn write_config(&self, yaml: &str) {
        let text = render(yaml, self.port, self.dir.path());
        write_atomically(&self.dir.path().join("config.yaml"), text.as_bytes());
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn logs(&self) -> String {
        self.child.logs()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("proxy running").to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }

    async fn wait_for_log(&self, needle: &str, count: usize) {
        wait_until(Duration::from_secs(20), needle, || async {
            self.logs().matches(needle).count() >= count
        })
        .await;
    }

    async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.child.exited() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "proxy did not exit; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

fn render(yaml: &str, port: u16, dir: &Path) -> String {
    yaml.replace("{listen}", &format!("127.0.0.1:{port}"))
        .replace("{dir}", &dir.display().to_string())
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let logs = self.logs();
        for s in secrets() {
            assert!(
                !logs.contains(&s),
                "a secret ({s:.4}…) leaked into the proxy log"
            );
        }
    }
}

fn plain_client() -> reqwest::Client {
    http_client()
}

/// A docker config.json with `user:password` for `key`.
fn docker_config(dir: &Path, key: &str) -> String {
    let path = dir.join("docker-config.json");
    write_docker_config(&path, key, USER, PASSWORD);
    path.display().to_string()
}

fn upstreams_yaml(upstreams: &[(&str, &str)]) -> String {
    let mut y = String::from("upstreams:\n");
    for (name, url) in upstreams {
        y += &format!("  - name: {name}\n    endpoint: {url}\n");
    }
    y
}

fn layers() -> Vec<Vec<u8>> {
    vec![random_bytes(200_000, 11), random_bytes(50_000, 12)]
}

/// `skopeo copy` trusting the CA in `cert_dir` (no `--src-tls-verify=false`).
async fn skopeo_copy_tls(src: &str, cert_dir: &Path, dest: &Path) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("copy")
        .arg("--src-no-creds")
        .arg("--src-cert-dir")
        .arg(cert_dir)
        .arg(format!("docker://{src}"))
        .arg(format!("dir:{}", dest.display()))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("skopeo within 120s")
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// TLS and HTTP/2.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_skopeo_and_negotiates_h2() {
    let reg = Registry::start(RegistryAuth::htpasswd(&[(USER, PASSWORD)])).await;
    let pushed = push_image(&reg, Some((USER, PASSWORD)), "team/app", "v1", &layers()).await;
    let ca = Ca::new();
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("tls.crt"), tmp.path().join("tls.key"));
    ca.issue(1, &cert, &key);
    let dc = docker_config(tmp.path(), "tls.test");
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         tls:\n  cert: {}\n  key: {}\ncredentials:\n  docker_config: {dc}\n{}",
        cert.display(),
        key.display(),
        upstreams_yaml(&[("tls.test", &reg.url())])
    );
    let proxy = Proxy::start(&yaml, true, &ca.client(false)).await;

    // skopeo verifies the proxy against the CA (a cert dir with `ca.crt`).
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::write(cert_dir.path().join("ca.crt"), ca.pem()).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy_tls(
        &format!("{}/tls.test/team/app:v1", proxy.host()),
        cert_dir.path(),
        dest.path(),
    )
    .await;
    assert_success(&out);
    assert_eq!(
        DirImage::read(dest.path()).manifest_digest,
        pushed.manifest_digest
    );

    // Without the CA, skopeo refuses the certificate.
    let empty = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let out = skopeo_copy_tls(
        &format!("{}/tls.test/team/app:v1", proxy.host()),
        empty.path(),
        dest.path(),
    )
    .await;
    assert!(!out.status.success(), "skopeo trusted an unknown CA");

    // ALPN: a client that offers h2 gets h2; one that only speaks HTTP/1.1 gets that.
    let manifest = proxy.url("/v2/tls.test/team/app/manifests/v1");
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let r = ca
        .client(false)
        .get(&manifest)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap(), pushed.manifest);
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), StatusCode::OK);
    // Plain HTTP on the TLS port is not served.
    assert!(plain_client()
        .get(format!("http://{}/healthz", proxy.host()))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_picked_up_without_dropping_connections() {
    let ca = Ca::new();
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("tls.crt"), tmp.path().join("tls.key"));
    let first = ca.issue(1, &cert, &key);
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\ntls:\n  cert: {}\n  key: {}\n",
        cert.display(),
        key.display()
    );
    let proxy = Proxy::start(&yaml, true, &ca.client(false)).await;

    let mut old = ca.connect(proxy.port).await;
    assert_eq!(peer_cert(&old), first);
    assert_eq!(raw_get(&mut old, "/healthz").await, (200, "ok\n".into()));

    let second = ca.issue(2, &cert, &key);
    assert_ne!(first, second);
    wait_until(
        Duration::from_secs(15),
        "a new handshake presenting the rotated certificate",
        || async { peer_cert(&ca.connect(proxy.port).await) == second },
    )
    .await;
    // The connection opened before the rotation still works.
    assert_eq!(raw_get(&mut old, "/healthz").await, (200, "ok\n".into()));
    proxy.wait_for_log("tls certificate reloaded", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_plain_http() {
    let yaml = "listen: \"{listen}\"\ncache:\n  dir: \"{dir}/cache\"\n";
    let proxy = Proxy::start(yaml, false, &plain_client()).await;
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c.get(proxy.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let r = plain_client().get(proxy.url("/v2/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
}

// ---------------------------------------------------------------------------------------------
// Shutdown, reload, limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_large_blob_download_finish_and_refuses_new_connections() {
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let blob = random_bytes(64 << 20, 7);
    let digest = push_blob(&reg, None, "big/app", &blob).await;
    drop(blob);
    let yaml = format!(
        "listen: \"{{listen}}\"\nshutdown_grace: 60s\ncache:\n  dir: \"{{dir}}/cache\"\n{}",
        upstreams_yaml(&[("big.test", &reg.url())])
    );
    let mut proxy = Proxy::start(&yaml, false, &plain_client()).await;

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut resp = client
        .get(proxy.url(&format!("/v2/big.test/big/app/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0usize;
    while got < (1 << 20) {
        let c = resp.chunk().await.unwrap().expect("more body");
        hasher.update(&c);
        got += c.len();
    }

    proxy.signal("-TERM");
    proxy.wait_for_log("shutting down", 1).await;
    // The listener is closed: new connections are refused.
    let refused = tokio::net::TcpStream::connect(proxy.host()).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted after SIGTERM"
    );

    // The stream in flight still completes, read slowly.
    while let Some(c) = resp.chunk().await.unwrap() {
        hasher.update(&c);
        got += c.len();
        if got % (8 << 20) < c.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(got, 64 << 20);
    assert_eq!(
        format!("sha256:{}", hex::encode(hasher.finish())),
        digest,
        "the body is the blob"
    );
    let status = proxy.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit status {status}; logs:\n{}",
        proxy.logs()
    );
    assert!(proxy.logs().contains("stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_file_changes_reload_the_config() {
    let a = Registry::start(RegistryAuth::Anonymous).await;
    let b = Registry::start(RegistryAuth::Anonymous).await;
    let pa = push_image(&a, None, "team/app", "v1", &layers()).await;
    let pb = push_image(&b, None, "team/app", "v1", &layers()).await;
    let base = "listen: \"{listen}\"\ncache:\n  dir: \"{dir}/cache\"\n";
    let only_a = format!("{base}{}", upstreams_yaml(&[("a.test", &a.url())]));
    let proxy = Proxy::start(&only_a, false, &plain_client()).await;
    let client = plain_client();
    let get = |path: String| {
        let client = client.clone();
        let url = proxy.url(&path);
        async move {
            client
                .get(url)
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap()
        }
    };
    let r = get("/v2/a.test/team/app/manifests/v1".into()).await;
    assert_eq!(r.bytes().await.unwrap(), pa.manifest);
    assert_eq!(
        get("/v2/b.test/team/app/manifests/v1".into())
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // A kept-alive connection spans all the reloads below.
    let mut kept = tokio::net::TcpStream::connect(proxy.host()).await.unwrap();
    assert_eq!(raw_get(&mut kept, "/healthz").await.0, 200);

    // A broken config is rejected and the old one keeps serving.
    proxy.write_config(&format!("{only_a}  - name: \"not a host!\"\n"));
    proxy.signal("-HUP");
    proxy.wait_for_log("config reload rejected", 1).await;
    assert!(
        proxy.logs().contains("upstreams[1].name"),
        "the log names the key"
    );
    let r = get("/v2/a.test/team/app/manifests/v1".into()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let m = scrape_metrics(&proxy.url("/metrics")).await;
    assert!(metric_sum(&m, "oci_proxy_config_reloads_total", &[("result", "error")]) >= 1.0);

    // SIGHUP with a new upstream makes it routable.
    let both = format!(
        "{base}{}",
        upstreams_yaml(&[("a.test", &a.url()), ("b.test", &b.url())])
    );
    proxy.write_config(&both);
    proxy.signal("-HUP");
    wait_until(Duration::from_secs(15), "b.test routable", || async {
        get("/v2/b.test/team/app/manifests/v1".into())
            .await
            .status()
            == StatusCode::OK
    })
    .await;
    let r = get("/v2/b.test/team/app/manifests/v1".into()).await;
    assert_eq!(r.bytes().await.unwrap(), pb.manifest);

    // A file change alone (no signal) is noticed too: a.test goes away.
    let only_b = format!("{base}{}", upstreams_yaml(&[("b.test", &b.url())]));
    proxy.write_config(&only_b);
    wait_until(Duration::from_secs(15), "a.test removed", || async {
        get("/v2/a.test/team/app/manifests/v1".into())
            .await
            .status()
            == StatusCode::NOT_FOUND
    })
    .await;
    // The connection opened before the reloads still works.
    assert_eq!(raw_get(&mut kept, "/healthz").await.0, 200);
    // Metrics carried over: the counters were not reset by the reloads.
    // The reload is counted right after the swap: wait for the count, not just the effect.
    wait_until(
        Duration::from_secs(15),
        "two applied reloads counted",
        || async {
            let m = scrape_metrics(&proxy.url("/metrics")).await;
            metric_sum(&m, "oci_proxy_config_reloads_total", &[("result", "ok")]) >= 2.0
        },
    )
    .await;
    let m = scrape_metrics(&proxy.url("/metrics")).await;
    assert!(metric_sum(&m, "oci_proxy_config_reloads_total", &[("result", "error")]) >= 1.0);
    assert!(
        metric_sum(
            &m,
            "oci_proxy_http_requests_total",
            &[("route", "manifest"), ("status", "200")]
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off_after_header_read_timeout() {
    let yaml = "listen: \"{listen}\"\ncache:\n  dir: \"{dir}/cache\"\n\
                limits:\n  header_read_timeout: 1s\n";
    let proxy = Proxy::start(yaml, false, &plain_client()).await;

    // Trickles a header byte every 100ms; the proxy must hang up after about 1s.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(10) {
        if s.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing; that is a hang-up too.
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(!text.contains(" 200 "), "slow request was served: {text}");
            }
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(closed, "the slow client was not disconnected within 10s");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "disconnected after {took:?}, expected about 1s"
    );

    // A client that connects and sends nothing is dropped as well.
    let started = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(proxy.host()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("idle connection closed within 10s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Normal clients are unaffected.
    let r = plain_client().get(proxy.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Observability.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_documented_series_after_a_pull() {
    let (_tokens, reg) = token_registry(TokenPolicy::puller(USER, PASSWORD, "team/app")).await;
    let pushed = push_image(&reg, ADMIN, "team/app", "v1", &layers()).await;
    push_image(&reg, ADMIN, "other/app", "v1", &layers()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dc = docker_config(tmp.path(), "token.test");
    let yaml = format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\n\
         credentials:\n  docker_config: {dc}\n{}",
        upstreams_yaml(&[("token.test", &reg.url())])
    );
    let yaml = trust_registry_realm(&yaml, &reg);
    let proxy = Proxy::start(&yaml, false, &plain_client()).await;

    for i in 0..2 {
        if i == 1 {
            // Clients end at verification and the commits follow: the second copy is all
            // hits once they landed.
            let blobs = (pushed.layer_digests.len() + 1) as f64;
            let metrics = proxy.url("/metrics");
            wait_until(
                Duration::from_secs(10),
                "the first copy's blobs committed",
                || {
                    let metrics = metrics.clone();
                    async move {
                        let text = scrape_metrics(&metrics).await;
                        metric_sum(&text, "oci_proxy_cache_fills_committed_total", &[]) >= blobs
                    }
                },
            )
            .await;
        }
        let dest = tempfile::tempdir().unwrap();
        let out = skopeo_copy(
            &format!("{}/token.test/team/app:v1", proxy.host()),
            dest.path(),
            &["--src-no-creds"],
        )
        .await;
        assert_success(&out);
        assert_eq!(
            DirImage::read(dest.path()).manifest_digest,
            pushed.manifest_digest
        );
    }
    // A repository the credential may not pull: an upstream auth failure.
    let r = plain_client()
        .get(proxy.url("/v2/token.test/other/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert!(
        r.status() == StatusCode::UNAUTHORIZED || r.status() == StatusCode::FORBIDDEN,
        "{}",
        r.status()
    );

    let text = scrape_metrics(&proxy.url("/metrics")).await;
    let has = |name: &str, labels: &[(&str, &str)]| metric_sum(&text, name, labels);
    let blobs = (pushed.layer_digests.len() + 1) as f64;
    assert!(
        has(
            "oci_proxy_http_requests_total",
            &[("route", "manifest"), ("status", "200")]
        ) >= 2.0
    );
    assert!(
        has(
            "oci_proxy_http_requests_total",
            &[("route", "blob"), ("status", "200")]
        ) >= 2.0 * blobs
    );
    assert!(
        has(
            "oci_proxy_http_requests_total",
            &[("route", "manifest"), ("status", r.status().as_str())]
        ) >= 1.0
    );
    assert!(
        has(
            "oci_proxy_http_request_duration_seconds_count",
            &[("route", "blob"), ("status", "200")]
        ) >= 2.0 * blobs
    );
    assert!(
        has(
            "oci_proxy_http_request_duration_seconds_bucket",
            &[("route", "manifest"), ("status", "200"), ("le", "+Inf")]
        ) >= 2.0
    );
    assert!(
        has(
            "oci_proxy_upstream_request_duration_seconds_count",
            &[("upstream", "token.test")]
        ) >= 1.0
    );
    assert!(
        has(
            "oci_proxy_token_fetches_total",
            &[("upstream", "token.test"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(
        has(
            "oci_proxy_upstream_auth_failures_total",
            &[("upstream", "token.test")]
        ) >= 1.0
    );
    assert_eq!(
        has("oci_proxy_cache_requests_total", &[("outcome", "miss")]),
        blobs,
        "{}",
        text.lines()
            .filter(|l| l.contains("cache"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(has("oci_proxy_cache_requests_total", &[("outcome", "hit")]) >= blobs);
    assert_eq!(has("oci_proxy_cache_blobs", &[]), blobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_has_one_access_line_per_request() {
    let reg = Registry::start(RegistryAuth::Anonymous).await;
    let pushed = push_image(&reg, None, "team/app", "v1", &layers()).await;
    let yaml = format!(
        "listen: \"{{listen}}\"\nlog_format: json\ncache:\n  dir: \"{{dir}}/cache\"\n{}",
        upstreams_yaml(&[("json.test", &reg.url())])
    );
    let proxy = Proxy::start(&yaml, false, &plain_client()).await;
    let client = plain_client();
    let manifest = proxy.url("/v2/json.test/team/app/manifests/v1");
    let blob = proxy.url(&format!(
        "/v2/json.test/team/app/blobs/{}",
        pushed.layer_digests[0]
    ));
    let accept = "application/vnd.oci.image.manifest.v1+json";
    for (i, url) in [&manifest, &blob, &blob].into_iter().enumerate() {
        if i == 2 {
            // A fill's client ends at verification; the commit (fsync, rename) follows. Until
            // it lands, another request joins the fill: wait for it, so the next one is a hit.
            let metrics = proxy.url("/metrics");
            wait_until(Duration::from_secs(10), "the blob committed", || async {
                let text = support::scrape_metrics(&metrics).await;
                support::metric_value(&text, "oci_proxy_cache_fills_committed_total") >= 1.0
            })
            .await;
        }
        let r = client
            .get(url)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap();
    }
    let r = client
        .get(proxy.url("/v2/json.test/team/app/manifests/nope"))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let access = |logs: &str| -> Vec<serde_json::Value> {
        logs.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
            })
            .filter(|v| v["target"] == "oci_proxy::access" && v["route"] != "ops")
            .collect()
    };
    wait_until(Duration::from_secs(10), "4 access lines", || async {
        access(&proxy.logs()).len() >= 4
    })
    .await;
    let lines = access(&proxy.logs());
    assert_eq!(lines.len(), 4, "one line per request: {lines:#?}");
    for l in &lines {
        for field in [
            "method",
            "route",
            "repository",
            "status",
            "bytes",
            "duration_ms",
            "cache",
        ] {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
        assert_eq!(l["method"], "GET");
        assert!(
            l["repository"].as_str().unwrap().contains("team/app"),
            "{l}"
        );
    }
    let (m, b1, b2, missing) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    assert_eq!(
        (m["route"].as_str(), m["status"].as_u64()),
        (Some("manifest"), Some(200))
    );
    assert_eq!(m["bytes"].as_u64(), Some(pushed.manifest.len() as u64));
    assert_eq!(m["cache"], "miss");
    assert_eq!(
        (b1["route"].as_str(), b1["cache"].as_str()),
        (Some("blob"), Some("miss"))
    );
    assert_eq!(b1["bytes"].as_u64(), Some(200_000));
    assert_eq!(
        (b2["route"].as_str(), b2["cache"].as_str()),
        (Some("blob"), Some("hit"))
    );
    assert_eq!(missing["status"].as_u64(), Some(404));
    // Every promised byte went out, on a miss and on a hit: the log says so.
    for l in [m, b1, b2, missing] {
        assert_eq!(l["complete"], true, "{l}");
    }
}
