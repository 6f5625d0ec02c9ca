//! The proxy's own Prometheus metric families, and the registry every part registers into
//! (the cache and the module catalog register their own families there, so this module
//! depends on neither). Labels are bounded: route classes, status classes, upstream names
//! (from config and the module catalog), outcomes.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    response_bytes: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_seconds: HistogramVec,
    token_fetches: IntCounterVec,
    auth_failures: IntCounterVec,
    config_reloads: IntCounterVec,
    limit_hits: IntCounterVec,
}

/// A limit of `config.limits` that refused or cut something off. Bounded: one label value per
/// variant. Fill limits (deadline, minimum rate, blob size mid-fill) are fill failure reasons
/// of the cache instead (`oci_proxy_cache_fill_failures_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// No upstream slot within `upstream_slot_wait` (the client got 503).
    UpstreamSlotWait,
    /// A connection beyond `max_connections` was closed.
    MaxConnections,
    /// A client left a response unread for `write_timeout`.
    WriteTimeout,
    /// A connection stayed idle for `idle_timeout`.
    IdleTimeout,
    /// A request head (HTTP/1 or HTTP/2) was not complete within `header_read_timeout`.
    HeaderReadTimeout,
    /// A tag list was cut at `max_tag_pages` or `max_tag_list_size`.
    TagList,
    /// A blob larger than `max_blob_size` was refused before fetching.
    MaxBlobSize,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::UpstreamSlotWait => "upstream_slot_wait",
            Limit::MaxConnections => "max_connections",
            Limit::WriteTimeout => "write_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::TagList => "tag_list",
            Limit::MaxBlobSize => "max_blob_size",
        }
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        // No registry prefix: the cache registers fully named `oci_proxy_cache_*` families
        // into the same registry, so every family spells out its `oci_proxy_` prefix.
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "oci_proxy_http_requests_total",
                "Client requests by route class and status.",
            ),
            &["route", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "oci_proxy_http_request_duration_seconds",
                "Time to the end of the response body, by route class and status.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "status"],
        )?;
        let response_bytes = IntCounterVec::new(
            Opts::new(
                "oci_proxy_http_response_bytes_total",
                "Body bytes sent to clients, by route class.",
            ),
            &["route"],
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "oci_proxy_upstream_requests_total",
                "Requests to upstreams by upstream and outcome.",
            ),
            &["upstream", "outcome"],
        )?;
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "oci_proxy_upstream_request_duration_seconds",
                "Time to upstream response headers, by upstream and outcome.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream", "outcome"],
        )?;
        let token_fetches = IntCounterVec::new(
            Opts::new(
                "oci_proxy_token_fetches_total",
                "Token exchanges with upstream token servers.",
            ),
            &["upstream", "result"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "oci_proxy_upstream_auth_failures_total",
                "Requests refused by an upstream for lack of valid credentials.",
            ),
            &["upstream"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "oci_proxy_config_reloads_total",
                "Config reloads (SIGHUP or file change) by result (ok, error).",
            ),
            &["result"],
        )?;
        let limit_hits = IntCounterVec::new(
            Opts::new(
                "oci_proxy_limit_hits_total",
                "Requests or connections refused or cut off by a configured limit.",
            ),
            &["limit"],
        )?;
        for c in [
            &limit_hits,
            &config_reloads,
            &requests,
            &response_bytes,
            &upstream_requests,
            &token_fetches,
            &auth_failures,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(upstream_seconds.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            response_bytes,
            upstream_requests,
            upstream_seconds,
            token_fetches,
            auth_failures,
            config_reloads,
            limit_hits,
        })
    }

    pub fn request(&self, route: &str, status: u16, elapsed: Duration, bytes: u64) {
        let status = status.to_string();
        self.requests.with_label_values(&[route, &status]).inc();
        self.request_seconds
            .with_label_values(&[route, &status])
            .observe(elapsed.as_secs_f64());
        self.response_bytes
            .with_label_values(&[route])
            .inc_by(bytes);
    }

    pub fn upstream_request(&self, upstream: &str, outcome: &str, elapsed: Duration) {
        self.upstream_requests
            .with_label_values(&[upstream, outcome])
            .inc();
        self.upstream_seconds
            .with_label_values(&[upstream, outcome])
            .observe(elapsed.as_secs_f64());
        if outcome == "unauthorized" || outcome == "denied" {
            self.auth_failures.with_label_values(&[upstream]).inc();
        }
    }

    pub fn token_fetch(&self, upstream: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.token_fetches
            .with_label_values(&[upstream, result])
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// The one place a limit that bit is logged and counted. `detail` names what was limited
    /// (an upstream, a peer address, a repository); never a credential.
    pub fn limit_hit(&self, limit: Limit, detail: &str) {
        // Connection-level limits fire per connection (a flood would flood the log): debug;
        // the counter carries the rate.
        match limit {
            Limit::WriteTimeout
            | Limit::IdleTimeout
            | Limit::HeaderReadTimeout
            | Limit::MaxConnections => {
                tracing::debug!(limit = limit.as_str(), detail, "limit reached")
            }
            _ => tracing::warn!(limit = limit.as_str(), detail, "limit reached"),
        }
        self.limit_hits.with_label_values(&[limit.as_str()]).inc();
    }

    /// The text exposition of every registered family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_one_oci_proxy_prefix() {
        let m = Metrics::new().unwrap();
        m.request("blob", 200, Duration::from_millis(3), 10);
        m.upstream_request("u", "ok", Duration::from_millis(3));
        m.token_fetch("u", true);
        m.config_reload(true);
        let text = m.render();
        assert!(text.contains("oci_proxy_http_requests_total{route=\"blob\",status=\"200\"} 1"));
        for family in m.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("oci_proxy_"), "{name}");
            assert!(!name.starts_with("oci_proxy_oci_proxy"), "{name}");
        }
    }
}
