//! Another build of oci-proxy run beside this one (`OCI_PROXY_BENCH_BASELINE=<binary>`), so a
//! change is measured against the code before it in the same run, alternating, on the same
//! (shared, noisy) machine: absolute numbers move with the load, the ratio much less.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The baseline binary, when asked for.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("OCI_PROXY_BENCH_BASELINE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A running baseline proxy with its own empty cache, killed on drop.
pub struct Baseline {
    _dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Baseline {
    /// Starts `bin serve` with `config_yaml` (`{listen}` and `{dir}` filled in) and waits
    /// until `GET /v2/` answers.
    pub async fn start(bin: &std::path::Path, config_yaml: &str) -> Baseline {
        let dir = tempfile::tempdir().expect("baseline temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let yaml = config_yaml
            .replace("{listen}", &format!("127.0.0.1:{port}"))
            .replace("{dir}", &dir.path().display().to_string());
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).expect("write baseline config");
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("OCI_PROXY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the baseline oci-proxy");
        let b = Baseline {
            _dir: dir,
            child,
            port,
        };
        let http = reqwest::Client::new();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = http
                .get(format!("{}/v2/", b.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return b;
            }
            assert!(Instant::now() < end, "the baseline oci-proxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
