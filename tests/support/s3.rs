//! An S3-compatible server for tests: moto in server mode (`python3 -m moto.server`, from
//! PyPI `moto[server]`, installed by `scripts/install-s3-tools`) on a free 127.0.0.1 port,
//! killed on drop.
//!
//! - `Moto::start() -> Option<Moto>` (async): `None` (after saying why on stderr) when moto is
//!   not installed, unless `CI` is set: then it panics. Waits until the server answers
//!   (deadline [`MOTO_START_DEADLINE`]).
//! - `create_bucket(name)`, `endpoint()`, `store(bucket)` (an `object_store` client for the
//!   test to look at or corrupt objects), `env()` (the AWS variables to give the proxy),
//!   `requests(method, path_part)` (count of matching lines in moto's request log), `stop()`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};

use super::process::{read_lossy, LoggedChild};
use super::{free_port, http_client, POLL_INTERVAL};

/// How long [`Moto::start`] waits for the server to answer.
pub const MOTO_START_DEADLINE: Duration = Duration::from_secs(60);
pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";
pub const REGION: &str = "us-east-1";

#[derive(Debug)]
pub struct Moto {
    child: Option<LoggedChild>,
    _dir: tempfile::TempDir,
    log: PathBuf,
    port: u16,
}

fn moto_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, flask, werkzeug"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl Moto {
    pub async fn start() -> Option<Moto> {
        if !super::tool_present(
            moto_installed(),
            "moto[server] is not installed (python3 -m moto.server); run scripts/install-s3-tools",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().expect("moto temp dir");
        let log = dir.path().join("moto.log");
        let client = http_client();
        for _attempt in 0..5 {
            let port = free_port();
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .env("PYTHONUNBUFFERED", "1");
            let mut child = LoggedChild::spawn(&mut cmd, &log);
            let end = Instant::now() + MOTO_START_DEADLINE;
            loop {
                if child.exited().is_some() {
                    break; // port race or crash: try another port
                }
                // moto answers its dashboard path once it serves.
                if let Ok(r) = client
                    .get(format!("http://127.0.0.1:{port}/moto-api/"))
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        return Some(Moto {
                            child: Some(child),
                            _dir: dir,
                            log,
                            port,
                        });
                    }
                }
                assert!(
                    Instant::now() < end,
                    "moto did not answer within {MOTO_START_DEADLINE:?}; logs:\n{}",
                    child.logs()
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        panic!("moto could not start on a free port after 5 attempts");
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment the proxy reads its credentials from.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
        ]
    }

    pub fn store(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(REGION)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("object_store client for moto")
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let r = http_client()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .expect("create bucket");
        assert!(r.status().is_success(), "create bucket: {}", r.status());
    }

    /// Lines of moto's request log with this method whose path contains `path_part`.
    pub fn requests(&self, method: &str, path_part: &str) -> usize {
        let logs = self.logs();
        let needle = format!("\"{method} ");
        logs.lines()
            .filter(|l| l.contains(&needle) && l.contains(path_part))
            .count()
    }

    pub fn logs(&self) -> String {
        read_lossy(&self.log)
    }

    /// Kills the server: the port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }
}
