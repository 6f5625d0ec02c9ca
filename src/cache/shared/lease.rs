//! Cross-replica single flight: a replica about to fetch a blob upstream first creates the
//! lease object `<prefix>leases/<alg>/<hex>` with a conditional create; its body is the
//! expiry (Unix milliseconds). A replica that finds a live lease waits for the blob to land
//! (HEAD polls with backoff, bounded by the expiry) instead of fetching it too.
//!
//! The bound: within the lease TTL, one upstream GET per digest across replicas; past it (a
//! slow or dead holder), at most one more per replica (the local single flight still holds).
//! An expired lease is deleted by whoever finds it; a holder deletes its lease once its
//! upload is done or its fill failed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};

use super::metrics::{Op, Res, WaitEnd};
use super::{Shared, StoreError};
use crate::protocol::grammar::Digest;

/// First and longest pause between polls while waiting for another replica.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(500);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A lease this replica holds. Release it with [`Lease::release`]; dropped unreleased, it
/// is deleted by a spawned task.
pub struct Lease {
    shared: Arc<Shared>,
    key: Path,
    armed: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key.as_ref())
            .finish()
    }
}

impl Lease {
    pub async fn release(mut self) {
        self.armed = false;
        self.shared.delete(&self.key).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (shared, key) = (self.shared.clone(), self.key.clone());
            rt.spawn(async move { shared.delete(&key).await });
        }
    }
}

pub enum Acquire {
    Held(Lease),
    /// Another replica holds a live lease until `expires_ms`.
    Busy {
        expires_ms: u64,
    },
    /// An expired lease was found and deleted: try again.
    Stale,
    Failed,
}

pub async fn acquire(shared: &Arc<Shared>, digest: &Digest) -> Acquire {
    let key = shared.lease_key(digest);
    let ttl_ms = u64::try_from(shared.lease_ttl.as_millis()).unwrap_or(u64::MAX);
    let expires = now_ms().saturating_add(ttl_ms);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let put = shared
        .timed(
            shared
                .store
                .put_opts(&key, PutPayload::from(expires.to_string()), opts),
        )
        .await;
    match put {
        Ok(_) => {
            shared.metrics.op(Op::Lease, Res::Ok);
            tracing::debug!(%digest, "shared lease taken");
            Acquire::Held(Lease {
                shared: shared.clone(),
                key,
                armed: true,
            })
        }
        Err(StoreError::Exists) => {
            shared.metrics.op(Op::Lease, Res::Exists);
            let body = match shared.timed(shared.store.get(&key)).await {
                Ok(r) => shared.timed(r.bytes()).await,
                Err(e) => Err(e),
            };
            let expires_ms = match body {
                Ok(b) => std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0),
                // Released meanwhile.
                Err(StoreError::Missing) => return Acquire::Stale,
                Err(e) => {
                    shared.failed(Op::Lease, &e);
                    return Acquire::Failed;
                }
            };
            if expires_ms <= now_ms() {
                tracing::info!(%digest, "deleting an expired shared lease");
                shared.delete(&key).await;
                return Acquire::Stale;
            }
            Acquire::Busy { expires_ms }
        }
        Err(e) => {
            shared.failed(Op::Lease, &e);
            Acquire::Failed
        }
    }
}

/// Waits for another replica's fill of `digest`: until the blob lands, the lease goes away
/// or expires (`expires_ms`), or the store fails.
pub async fn wait(shared: &Arc<Shared>, digest: &Digest, expires_ms: u64) -> WaitEnd {
    let started = Instant::now();
    let (blob, lease) = (shared.blob_key(digest), shared.lease_key(digest));
    let mut pause = POLL_FIRST;
    let end = loop {
        let left = expires_ms.saturating_sub(now_ms());
        if left == 0 {
            break WaitEnd::Expired;
        }
        tokio::time::sleep(pause.min(Duration::from_millis(left))).await;
        pause = (pause * 2).min(POLL_MAX);
        match shared.exists(&blob, Op::HeadBlob).await {
            Some(true) => break WaitEnd::Landed,
            Some(false) => {}
            None => break WaitEnd::Error,
        }
        match shared.exists(&lease, Op::Lease).await {
            Some(true) => {}
            Some(false) => {
                // The holder may have uploaded and released between the two HEADs.
                break match shared.exists(&blob, Op::HeadBlob).await {
                    Some(true) => WaitEnd::Landed,
                    Some(false) => WaitEnd::Released,
                    None => WaitEnd::Error,
                };
            }
            None => break WaitEnd::Error,
        }
    };
    let waited = started.elapsed();
    tracing::info!(
        %digest,
        result = end.as_str(),
        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        "waited for another replica's fill"
    );
    shared.metrics.lease_wait(end, waited.as_secs_f64());
    end
}
