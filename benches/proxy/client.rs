//! The load generator: reqwest GETs whose bodies are streamed and discarded (chunks are
//! counted, never copied or hashed), so the client costs one kernel → user copy per byte,
//! the same for the proxy and for the reference server it is compared with.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;

/// A client without env proxies and without a total timeout (a 1 GiB body to 50 clients
/// on 2 cores may take a while); a stalled connection still fails after `READ_TIMEOUT`.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .read_timeout(READ_TIMEOUT)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .build()
        .expect("build bench client")
}

const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One GET: status 200, every byte read and counted (`expect_len` checked), time from
/// sending the request to the last byte.
pub async fn fetch(client: &reqwest::Client, url: &str, expect_len: u64) -> Duration {
    let started = Instant::now();
    let mut resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
    let mut got: u64 = 0;
    while let Some(chunk) = resp
        .chunk()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body failed after {got} bytes: {e}"))
    {
        got += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    assert_eq!(got, expect_len, "GET {url}: body length");
    elapsed
}

/// `n` GETs of `url` started together (each on its own connection and task); the time
/// until the last one finished.
pub async fn fetch_concurrent(
    client: &reqwest::Client,
    url: &str,
    expect_len: u64,
    n: usize,
) -> Duration {
    let started = Instant::now();
    let tasks = (0..n).map(|_| {
        let (client, url) = (client.clone(), url.to_string());
        tokio::spawn(async move { fetch(&client, &url, expect_len).await })
    });
    for r in join_all(tasks).await {
        if let Err(e) = r {
            panic!("concurrent GET failed: {e}");
        }
    }
    started.elapsed()
}

/// MiB/s for `bytes` in `d`.
pub fn mib_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// Median (mean of the middle two for an even count); `NaN` for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
