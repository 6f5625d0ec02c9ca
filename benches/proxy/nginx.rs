//! The reference file server: Debian's nginx (sendfile on) in a temp prefix on
//! 127.0.0.1:<free port>, one process in the foreground, killed on drop. The same nginx also
//! relays a registry under `/relay/` (`proxy_pass`, no buffering to disk, 1 MiB buffers): the
//! least work a proxy in user space does for a byte, the reference of the cold rows' ceiling.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::process::LoggedChild;
use crate::support::{free_port, POLL_INTERVAL};

/// Path of the nginx binary (Debian package `nginx`).
pub const NGINX_BIN: &str = "nginx";
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A running nginx serving a temp root, killed on drop.
pub struct Nginx {
    // Declared first so the process dies before its directory is removed.
    child: LoggedChild,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// Starts nginx serving the files in `root` (read-only) with sendfile and relaying
    /// `relay_to` (`host:port`) under `/relay/`, and waits until `GET /<probe>` answers 200.
    pub async fn start(root: &Path, probe: &str, relay_to: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("nginx temp dir");
        for _attempt in 0..5 {
            let port = free_port();
            let conf = config(dir.path(), root, port, relay_to);
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let error_log = dir.path().join("error.log");
            let mut cmd = Command::new(NGINX_BIN);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&error_log);
            let mut child = LoggedChild::spawn(&mut cmd, &dir.path().join("stdout.log"));
            let url = format!("http://127.0.0.1:{port}/{probe}");
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            let end = Instant::now() + START_DEADLINE;
            loop {
                if let Some(status) = child.exited() {
                    let logs = std::fs::read_to_string(&error_log).unwrap_or_default();
                    if logs.contains("Address already in use") {
                        break; // port race: try another
                    }
                    panic!("nginx exited during startup ({status}): {logs}");
                }
                // HEAD: the probe file may be large.
                if let Ok(resp) = client.head(&url).send().await {
                    if resp.status() == reqwest::StatusCode::OK {
                        return Nginx {
                            child,
                            _dir: dir,
                            port,
                        };
                    }
                }
                if Instant::now() >= end {
                    panic!("nginx did not serve {url} within {START_DEADLINE:?}");
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        panic!("nginx could not bind a free port after 5 attempts");
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>/relay`: the relayed registry's root.
    pub fn relay_url(&self) -> String {
        format!("{}/relay", self.url())
    }

    /// OS process id (the single nginx process: `master_process off`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// One foreground process (`master_process off`), so it stays as the user that started it
/// and dies with its handle; sendfile for the body, no access log. The relay streams: each
/// read of up to 1 MiB from the registry is written to the client before the next.
fn config(prefix: &Path, root: &Path, port: u16, relay_to: &str) -> String {
    let p = prefix.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
        location /relay/ {{
            proxy_pass http://{relay_to}/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 1m;
            proxy_buffers 4 1m;
            proxy_busy_buffers_size 2m;
        }}
    }}
}}
",
        root = root.display()
    )
}
