//! Upstream request slots: two pools, one for blob GETs and one for everything else, each
//! waited on for at most `limits.upstream_slot_wait`.
//!
//! Why two pools: blob fills are long (minutes for a large layer, detached from their client),
//! manifests, HEADs, tag lists and referrers are short. In one pool a handful of slow fills
//! would make every pull wait, whatever upstream it goes to. Token exchanges run inside the
//! slot of the request that needs them, so they inherit its pool. Why a bounded wait: a
//! client waiting forever for a slot holds its connection forever; a `503` with
//! `Retry-After` tells it to come back.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::metrics::{Limit, Metrics};

/// The limits a pool set was built with; a reload that changes them gets fresh pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotLimits {
    blobs: usize,
    requests: usize,
    wait: Duration,
}

impl SlotLimits {
    pub(crate) fn from_config(l: &Limits) -> SlotLimits {
        SlotLimits {
            blobs: l.max_concurrent_upstream_fetches,
            requests: l.max_concurrent_upstream_requests,
            wait: l.upstream_slot_wait.0,
        }
    }
}

/// Which pool a request draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Blobs,
    Requests,
}

impl Pool {
    /// Blob GETs (fills and cold Range GETs) are the long ones.
    pub fn of(method: &Method, path: &str) -> Pool {
        if method == Method::GET && path.starts_with("blobs/") {
            Pool::Blobs
        } else {
            Pool::Requests
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Pool::Blobs => "blob fetch",
            Pool::Requests => "upstream request",
        }
    }
}

/// No slot freed up in time.
#[derive(Debug)]
pub struct Busy {
    pub pool: Pool,
    /// Seconds a client should wait before retrying.
    pub retry_after: u64,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "all {} slots are busy", self.pool.as_str())
    }
}

pub(crate) struct Slots {
    limits: SlotLimits,
    blobs: Arc<Semaphore>,
    requests: Arc<Semaphore>,
}

impl Slots {
    pub(crate) fn new(limits: SlotLimits) -> Slots {
        Slots {
            limits,
            blobs: Arc::new(Semaphore::new(limits.blobs)),
            requests: Arc::new(Semaphore::new(limits.requests)),
        }
    }

    pub(crate) fn limits(&self) -> SlotLimits {
        self.limits
    }

    /// Slots a pool was built with.
    pub(crate) fn size(&self, pool: Pool) -> usize {
        match pool {
            Pool::Blobs => self.limits.blobs,
            Pool::Requests => self.limits.requests,
        }
    }

    /// Free slots in a pool.
    pub(crate) fn available(&self, pool: Pool) -> usize {
        self.pool(pool).available_permits()
    }

    fn pool(&self, pool: Pool) -> &Arc<Semaphore> {
        match pool {
            Pool::Blobs => &self.blobs,
            Pool::Requests => &self.requests,
        }
    }

    /// A slot of `pool`, waiting at most `upstream_slot_wait`. A timeout is logged and
    /// counted here (`limit="upstream_slot_wait"`).
    pub(crate) async fn acquire(
        &self,
        pool: Pool,
        upstream: &str,
        metrics: &Metrics,
    ) -> Result<OwnedSemaphorePermit, Busy> {
        let sem = self.pool(pool).clone();
        match tokio::time::timeout(self.limits.wait, sem.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Closed never happens (pools are not closed); treat it like a timeout.
            Ok(Err(_)) | Err(_) => {
                metrics.limit_hit(Limit::UpstreamSlotWait, upstream);
                Err(Busy {
                    pool,
                    retry_after: self.limits.wait.as_secs().clamp(1, 60),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_gets_are_the_only_long_requests() {
        assert_eq!(Pool::of(&Method::GET, "blobs/sha256:ab"), Pool::Blobs);
        assert_eq!(Pool::of(&Method::HEAD, "blobs/sha256:ab"), Pool::Requests);
        assert_eq!(Pool::of(&Method::GET, "manifests/v1"), Pool::Requests);
        assert_eq!(Pool::of(&Method::GET, "tags/list"), Pool::Requests);
        assert_eq!(
            Pool::of(&Method::GET, "referrers/sha256:ab"),
            Pool::Requests
        );
    }

    #[tokio::test]
    async fn a_full_pool_answers_busy_after_the_wait_and_the_other_pool_is_free() {
        let metrics = Metrics::new().unwrap();
        let slots = Slots::new(SlotLimits {
            blobs: 1,
            requests: 1,
            wait: Duration::from_millis(50),
        });
        let held = slots.acquire(Pool::Blobs, "u", &metrics).await.unwrap();
        let busy = slots.acquire(Pool::Blobs, "u", &metrics).await.unwrap_err();
        assert_eq!((busy.pool, busy.retry_after), (Pool::Blobs, 1));
        assert!(metrics
            .render()
            .contains("oci_proxy_limit_hits_total{limit=\"upstream_slot_wait\"} 1"));
        // Manifests and tags are not behind the blob fill.
        let other = slots.acquire(Pool::Requests, "u", &metrics).await.unwrap();
        drop((held, other));
        assert!(slots.acquire(Pool::Blobs, "u", &metrics).await.is_ok());
    }
}
