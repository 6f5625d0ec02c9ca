//! A token from an ambient identity source (GKE metadata server, a Google service-account key,
//! ECR's `GetAuthorizationToken`), kept fresh for every request of the process.
//!
//! Why one shared piece: the sources differ only in how a token is fetched; the rules around it
//! are the same and easy to get wrong one source at a time:
//! - a token is refreshed *before* it expires (at half its lifetime, at most 5 minutes early),
//!   so requests never carry a token about to lapse;
//! - one fetch at a time (single flight): concurrent requests that need a token wait for the
//!   same fetch and share its result, success or failure, instead of stampeding the source;
//! - during a source outage the cached token keeps serving until its own expiry; a refresh is
//!   retried at most once per [`FAILURE_BACKOFF`], and only requests that have no valid token
//!   get the error;
//! - the token is a [`Secret`]: never logged, and `Debug` shows no token.
//!
//! Every fetch is logged and counted here, in [`Refreshing::fetch_now`] (metric
//! `oci_proxy_credential_source_fetches_total{source, result}`).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};

use super::Secret;

/// Longest a token is refreshed ahead of its expiry (tokens shorter than twice this are
/// refreshed at half their lifetime).
pub(crate) const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// Safety margin at the end of a token's lifetime (clock skew, time in flight): a tenth of the
/// lifetime, at most this.
pub(crate) const MAX_EXPIRY_SKEW: Duration = Duration::from_secs(10);
/// After a failed fetch, the source is not asked again for this long; requests in between get
/// the cached token (if still valid) or the same error.
pub(crate) const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// A token as a source returned it.
pub(crate) struct Fetched {
    pub token: Secret<String>,
    /// Lifetime from now; `None` when the source gave none or an expiry in the past: then the
    /// token serves the request that fetched it and is not cached.
    pub expires_in: Option<Duration>,
}

/// Why a source gave no token. The message names the source and the failure, never a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// How a source fetches a token.
pub(crate) trait Fetch: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<Fetched, SourceError>> + Send;
}

/// `oci_proxy_credential_source_fetches_total{source, result}`; `source` is one of the fixed
/// source labels (`google`, `ecr`), `result` is `ok` or `error`.
#[derive(Clone, Debug)]
pub(crate) struct SourceMetrics {
    fetches: IntCounterVec,
}

impl SourceMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<SourceMetrics, prometheus::Error> {
        let fetches = IntCounterVec::new(
            Opts::new(
                "oci_proxy_credential_source_fetches_total",
                "Token fetches from ambient identity sources (GKE metadata server, Google \
                 service-account key, ECR) by source and result (ok, error).",
            ),
            &["source", "result"],
        )?;
        registry.register(Box::new(fetches.clone()))?;
        Ok(SourceMetrics { fetches })
    }

    /// A family not registered anywhere (tests, `resolve`).
    pub(crate) fn unregistered() -> SourceMetrics {
        SourceMetrics {
            fetches: IntCounterVec::new(
                Opts::new("unregistered", "unregistered"),
                &["source", "result"],
            )
            .unwrap_or_else(|_| unreachable!("static metric definition is valid")),
        }
    }

    fn count(&self, source: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.fetches.with_label_values(&[source, result]).inc();
    }
}

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

struct Cached {
    token: Secret<String>,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    /// When the last fetch failed, and why; cleared by a success.
    last_failure: Option<(Instant, SourceError)>,
    /// Fetches finished so far: a request that waited for a flight knows whether one ran.
    fetches: u64,
}

/// A token kept fresh from one source; see the module docs.
pub(crate) struct Refreshing<F> {
    /// The metric label and log field naming the source (`google`, `ecr`).
    source: &'static str,
    fetcher: F,
    state: Mutex<State>,
    flight: tokio::sync::Mutex<()>,
    metrics: SourceMetrics,
    clock: Clock,
}

impl<F> Refreshing<F> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<F> std::fmt::Debug for Refreshing<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.lock().cached.is_some();
        f.debug_struct("Refreshing")
            .field("source", &self.source)
            .field("token_cached", &cached)
            .finish_non_exhaustive()
    }
}

impl<F: Fetch> Refreshing<F> {
    pub(crate) fn new(source: &'static str, fetcher: F, metrics: SourceMetrics) -> Self {
        Self::with_clock(source, fetcher, metrics, Arc::new(Instant::now))
    }

    fn with_clock(source: &'static str, fetcher: F, metrics: SourceMetrics, clock: Clock) -> Self {
        Refreshing {
            source,
            fetcher,
            state: Mutex::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
            metrics,
            clock,
        }
    }

    /// A valid token: the cached one, or a fresh one. `Err` only when no valid token exists
    /// and the source failed.
    pub(crate) async fn get(&self) -> Result<Secret<String>, SourceError> {
        let now = (self.clock)();
        let (stale, seen) = {
            let st = self.lock();
            let backing_off = st
                .last_failure
                .as_ref()
                .is_some_and(|(at, _)| now < *at + FAILURE_BACKOFF);
            match &st.cached {
                Some(c) if now < c.expires_at => {
                    if now < c.refresh_at || backing_off {
                        return Ok(c.token.clone());
                    }
                    (Some(c.token.clone()), st.fetches)
                }
                _ => {
                    if let (true, Some((_, e))) = (backing_off, &st.last_failure) {
                        return Err(e.clone());
                    }
                    (None, st.fetches)
                }
            }
        };
        if let Some(stale) = stale {
            // Due for refresh but still valid: refresh unless someone else already is, and
            // keep serving the cached token whatever happens.
            let Ok(_flight) = self.flight.try_lock() else {
                return Ok(stale);
            };
            if self.lock().fetches != seen {
                return Ok(self.current().unwrap_or(stale));
            }
            return Ok(self.fetch_now().await.unwrap_or(stale));
        }
        let _flight = self.flight.lock().await;
        {
            let st = self.lock();
            if let Some(c) = st.cached.as_ref().filter(|c| (self.clock)() < c.expires_at) {
                return Ok(c.token.clone());
            }
            if st.fetches != seen {
                // The flight we waited for failed (or gave an uncacheable token): share its
                // failure rather than asking the source again at once.
                if let Some((_, e)) = &st.last_failure {
                    return Err(e.clone());
                }
            }
        }
        self.fetch_now().await
    }

    /// The cached token if still valid.
    fn current(&self) -> Option<Secret<String>> {
        let now = (self.clock)();
        let st = self.lock();
        st.cached
            .as_ref()
            .filter(|c| now < c.expires_at)
            .map(|c| c.token.clone())
    }

    /// Asks the source (the caller holds the flight lock), records, logs and counts the outcome.
    async fn fetch_now(&self) -> Result<Secret<String>, SourceError> {
        let result = self.fetcher.fetch().await;
        let now = (self.clock)();
        let mut st = self.lock();
        st.fetches += 1;
        self.metrics.count(self.source, result.is_ok());
        match result {
            Ok(f) => {
                st.last_failure = None;
                match f.expires_in.filter(|l| !l.is_zero()) {
                    Some(lifetime) => {
                        let ahead = (lifetime / 2).min(MAX_REFRESH_AHEAD);
                        let skew = (lifetime / 10).min(MAX_EXPIRY_SKEW);
                        tracing::debug!(
                            source = self.source,
                            lifetime_s = lifetime.as_secs(),
                            "credential source: token fetched"
                        );
                        st.cached = Some(Cached {
                            token: f.token.clone(),
                            refresh_at: now + lifetime - ahead,
                            expires_at: now + lifetime - skew,
                        });
                    }
                    None => {
                        tracing::warn!(
                            source = self.source,
                            "credential source: token has no future expiry; used once, not cached"
                        );
                    }
                }
                Ok(f.token)
            }
            Err(e) => {
                let serving_cached = st.cached.as_ref().is_some_and(|c| now < c.expires_at);
                tracing::warn!(
                    source = self.source,
                    error = %e,
                    serving_cached,
                    "credential source: token fetch failed"
                );
                st.last_failure = Some((now, e.clone()));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A source whose answers the test scripts; counts calls; can hold a fetch until released.
    struct Scripted {
        calls: AtomicUsize,
        answer: Mutex<Result<Option<Duration>, String>>,
        gate: tokio::sync::Semaphore,
    }

    impl Scripted {
        fn new(lifetime: Option<Duration>) -> Arc<Scripted> {
            Arc::new(Scripted {
                calls: AtomicUsize::new(0),
                answer: Mutex::new(Ok(lifetime)),
                gate: tokio::sync::Semaphore::new(1_000_000),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn set(&self, a: Result<Option<Duration>, String>) {
            *self.answer.lock().unwrap() = a;
        }
    }

    impl Fetch for Arc<Scripted> {
        async fn fetch(&self) -> Result<Fetched, SourceError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let _permit = self.gate.acquire().await;
            let answer = self.answer.lock().unwrap().clone();
            answer
                .map(|expires_in| Fetched {
                    token: Secret::new(format!("token-{n}")),
                    expires_in,
                })
                .map_err(SourceError)
        }
    }

    struct ManualClock(Mutex<Instant>);
    impl ManualClock {
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    fn setup(
        lifetime: Option<Duration>,
    ) -> (Arc<Scripted>, Arc<ManualClock>, Refreshing<Arc<Scripted>>) {
        let src = Scripted::new(lifetime);
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let c = clock.clone();
        let r = Refreshing::with_clock(
            "test",
            src.clone(),
            SourceMetrics::unregistered(),
            Arc::new(move || *c.0.lock().unwrap()),
        );
        (src, clock, r)
    }

    fn tok(r: Result<Secret<String>, SourceError>) -> String {
        r.map(|s| s.expose().clone())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn caches_then_refreshes_before_expiry() {
        let (src, clock, r) = setup(Some(HOUR));
        assert_eq!(tok(r.get().await), "token-1");
        clock.advance(HOUR - MAX_REFRESH_AHEAD - Duration::from_secs(1));
        assert_eq!(tok(r.get().await), "token-1");
        assert_eq!(src.calls(), 1);
        // inside the refresh window, well before expiry: a new token
        clock.advance(Duration::from_secs(2));
        assert_eq!(tok(r.get().await), "token-2");
        assert_eq!(src.calls(), 2);
        // short tokens are refreshed at half their lifetime
        let (src, clock, r) = setup(Some(Duration::from_secs(60)));
        assert_eq!(tok(r.get().await), "token-1");
        clock.advance(Duration::from_secs(29));
        assert_eq!(tok(r.get().await), "token-1");
        clock.advance(Duration::from_secs(2));
        assert_eq!(tok(r.get().await), "token-2");
        assert_eq!(src.calls(), 2);
    }

    #[tokio::test]
    async fn outage_serves_cached_until_expiry_then_errors() {
        let (src, clock, r) = setup(Some(HOUR));
        assert_eq!(tok(r.get().await), "token-1");
        src.set(Err("metadata server down".into()));
        clock.advance(HOUR - MAX_REFRESH_AHEAD + Duration::from_secs(1));
        // refresh fails: the cached token still serves
        assert_eq!(tok(r.get().await), "token-1");
        assert_eq!(src.calls(), 2);
        // within the backoff the source is not asked again
        assert_eq!(tok(r.get().await), "token-1");
        assert_eq!(src.calls(), 2);
        // past the backoff, asked again, still down, still cached
        clock.advance(FAILURE_BACKOFF);
        assert_eq!(tok(r.get().await), "token-1");
        assert_eq!(src.calls(), 3);
        // past the (skewed) expiry: the error
        clock.advance(MAX_REFRESH_AHEAD);
        assert_eq!(tok(r.get().await), "error: metadata server down");
        // source back: a new token at once after the backoff
        src.set(Ok(Some(HOUR)));
        clock.advance(FAILURE_BACKOFF);
        assert_eq!(tok(r.get().await), "token-5");
    }

    #[tokio::test]
    async fn expiry_keeps_a_safety_margin() {
        let (src, clock, r) = setup(Some(Duration::from_secs(100)));
        assert_eq!(tok(r.get().await), "token-1");
        src.set(Err("down".into()));
        // a 100 s token is kept through an outage until 90 s (skew: a tenth, at most 10 s)
        clock.advance(Duration::from_secs(89));
        assert_eq!(tok(r.get().await), "token-1");
        clock.advance(Duration::from_secs(2));
        assert_eq!(tok(r.get().await), "error: down");
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_fetch_and_its_failure() {
        let (src, _clock, r) = setup(Some(HOUR));
        let r = Arc::new(r);
        let permits = src.gate.available_permits();
        let held = src.gate.acquire_many(permits as u32).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { tok(r.get().await) })
            })
            .collect();
        // wait until the single fetch is in flight, then let it finish
        while src.calls() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            assert_eq!(t.await.unwrap(), "token-1");
        }
        assert_eq!(src.calls(), 1);

        let (src, _clock, r) = setup(Some(HOUR));
        src.set(Err("down".into()));
        let r = Arc::new(r);
        let held = src.gate.acquire_many(permits as u32).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { tok(r.get().await) })
            })
            .collect();
        while src.calls() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            assert_eq!(t.await.unwrap(), "error: down");
        }
        assert_eq!(src.calls(), 1, "waiters share the failed flight");
    }

    #[tokio::test]
    async fn token_without_future_expiry_is_used_once() {
        let (src, _clock, r) = setup(None);
        assert_eq!(tok(r.get().await), "token-1");
        assert_eq!(tok(r.get().await), "token-2");
        assert_eq!(src.calls(), 2);
    }

    #[tokio::test]
    async fn debug_shows_no_token() {
        let (_src, _clock, r) = setup(Some(HOUR));
        let t = r.get().await.unwrap();
        let dbg = format!("{r:?} {t:?}");
        assert!(!dbg.contains("token-1"), "{dbg}");
        assert!(dbg.contains("token_cached: true"), "{dbg}");
    }
}
