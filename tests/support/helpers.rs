//! Small HTTP helpers shared by the integration tests: scraping `/metrics`, reading one
//! series out of the Prometheus text, and writing the docker config.json the proxy reads.

use std::path::Path;

use super::http_client;

/// GETs the Prometheus text at `url` (a full `/metrics` URL); panics unless it answers 200.
pub async fn scrape_metrics(url: &str) -> String {
    let resp = http_client().get(url).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), reqwest::StatusCode::OK, "GET {url}");
    resp.text().await.expect("metrics body")
}

/// The sum of the samples of the family `name` whose labels include all of `labels`
/// (0 when there are none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            let all = n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The value of the sample written exactly as `series` (name and label set, e.g.
/// `x_total{result="ok"}`), 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Writes a docker config.json at `path` with one `auth` entry (`user:password`) for `key`.
pub fn write_docker_config(path: &Path, key: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = serde_json::json!({"auths": {key: {"auth": auth}}});
    std::fs::write(path, json.to_string()).expect("write docker config");
}

/// `GET <proxy>/v2/<name>/<what>` as an anonymous client asking for OCI manifests: status and
/// body (empty when the body fails).
pub async fn client_get(proxy: &str, name: &str, what: &str) -> (reqwest::StatusCode, Vec<u8>) {
    let r = http_client()
        .get(format!("{proxy}/v2/{name}/{what}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("request to the proxy");
    let status = r.status();
    (
        status,
        r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

/// Serves `app` on `listener` (HTTP/1 and h2c) until aborted. The connection tasks live in a
/// `JoinSet` owned by this future, so aborting it closes every open connection too (a fixture
/// that "goes down" really drops its clients).
pub async fn serve_router(listener: tokio::net::TcpListener, app: axum::Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}
