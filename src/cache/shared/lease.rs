//! Cross-replica single flight: a replica about to fetch a blob upstream first creates the
//! lease object `<prefix>leases/<alg>/<hex>` with a conditional create. Its body is
//! `<expires_ms> <owner>`: the expiry in Unix milliseconds and a random token naming this
//! holding (the old body, just `<expires_ms>`, is still read; it has no owner).
//!
//! A held [`Lease`] renews itself every `lease_ttl / 3` in a background task (GET, and if
//! the owner is still ours, overwrite with a new expiry), so `lease_ttl` means "a lease not
//! renewed for this long is dead", not "the longest fill". Renewal stops when the lease is
//! released or dropped, or when the body no longer names us (taken over or deleted).
//!
//! A replica that finds a live lease waits for the blob to land (HEAD polls with backoff);
//! when the known expiry passes it re-reads the lease: a renewed lease keeps it waiting, an
//! expired one sends it upstream. Every wait is bounded by `lease_wait`.
//!
//! The bound: one upstream GET per digest across replicas while the holder is alive and its
//! fill finishes within `lease_wait`; otherwise at most one more per replica (the local single
//! flight still holds). An expired lease is deleted by whoever finds it; a holder deletes its
//! lease once its upload is done or its fill failed, and only while the body still names it.
//!
//! Races left (no conditional delete in S3): release and renewal read the owner, then
//! delete or overwrite. Between the two, the lease can only change hands if it had expired
//! (no renewal for a whole `lease_ttl`), so the window needs a stalled holder and a replica
//! taking over within the same few milliseconds; the cost is one extra upstream GET.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::metrics::{Op, Renewal, Res, WaitEnd};
use super::{Shared, StoreError};
use crate::protocol::grammar::Digest;

/// First and longest pause between polls while waiting for another replica.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(500);
/// Shortest pause between renewals, whatever the TTL.
const RENEW_MIN: Duration = Duration::from_millis(10);

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A lease object's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Body {
    pub expires_ms: u64,
    /// `None` in the old format (just the expiry).
    pub owner: Option<String>,
}

impl Body {
    /// Parses `<expires_ms> <owner>` or the old `<expires_ms>`; `None` when unreadable (which
    /// replicas and `gc-shared` treat as expired).
    pub(super) fn parse(bytes: &[u8]) -> Option<Body> {
        let s = std::str::from_utf8(bytes).ok()?;
        let mut words = s.split_ascii_whitespace();
        let expires_ms = words.next()?.parse::<u64>().ok()?;
        let owner = words.next().map(str::to_owned);
        if words.next().is_some() {
            return None;
        }
        Some(Body { expires_ms, owner })
    }

    fn render(expires_ms: u64, owner: &str) -> String {
        format!("{expires_ms} {owner}")
    }

    fn is_owned_by(&self, owner: &str) -> bool {
        self.owner.as_deref() == Some(owner)
    }
}

/// A random token of 16 hex digits naming one holding of a lease: a per-process random
/// hasher (std's `RandomState` is seeded from the OS) over the time, the process id and a
/// counter.
fn new_owner() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    std::process::id().hash(&mut h);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Reads a lease: `Ok(None)` when there is none; an unreadable body reads as expired.
async fn read(shared: &Shared, key: &Path) -> Result<Option<Body>, StoreError> {
    match shared.get_small(key, u64::MAX).await {
        Ok((_, b)) => Ok(Some(Body::parse(&b).unwrap_or(Body {
            expires_ms: 0,
            owner: None,
        }))),
        Err(StoreError::Missing) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The renewal task of a held lease; stopping it waits for a renewal in flight.
struct Renewer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A lease this replica holds, renewed in the background while held. Release it with
/// [`Lease::release`]; dropped unreleased, it is released by a spawned task.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    key: Path,
    owner: String,
    renewer: Option<Renewer>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key.as_ref())
            .field("owner", &self.owner)
            .finish()
    }
}

impl Lease {
    fn start(shared: Arc<Shared>, key: Path, owner: String) -> Lease {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(renew(shared.clone(), key.clone(), owner.clone(), stopped));
        Lease {
            shared,
            key,
            owner,
            renewer: Some(Renewer { stop, task }),
        }
    }

    /// Stops renewing, then deletes the lease if its body still names us.
    pub(crate) async fn release(mut self) {
        if let Some(r) = self.renewer.take() {
            finish(self.shared.clone(), self.key.clone(), self.owner.clone(), r).await;
        }
    }

    /// Test only: a dead process. Renewal stops at once and nothing is deleted.
    #[cfg(test)]
    pub(super) fn abandon(mut self) {
        if let Some(r) = self.renewer.take() {
            r.task.abort();
        }
    }

    #[cfg(test)]
    pub(super) fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(r) = self.renewer.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let (shared, key, owner) =
                    (self.shared.clone(), self.key.clone(), self.owner.clone());
                rt.spawn(finish(shared, key, owner, r));
            }
            // No runtime: the renewal task is gone with it; the lease expires.
            Err(_) => r.task.abort(),
        }
    }
}

/// Stops the renewal (a renewal in flight completes first, so it cannot land after the
/// delete), then deletes the lease if it is still ours.
async fn finish(shared: Arc<Shared>, key: Path, owner: String, renewer: Renewer) {
    let Renewer { stop, task } = renewer;
    let _ = stop.send(());
    let _ = task.await;
    match read(&shared, &key).await {
        Ok(Some(b)) if b.is_owned_by(&owner) => shared.delete(&key).await,
        Ok(Some(_)) => tracing::info!(
            key = key.as_ref(),
            "shared lease was taken over by another replica; leaving it"
        ),
        Ok(None) => {}
        // Not renewed any more: it expires within the TTL.
        Err(e) => shared.failed(Op::Lease, &e),
    }
}

/// Renews the lease every `lease_ttl / 3` until stopped or lost.
async fn renew(shared: Arc<Shared>, key: Path, owner: String, mut stopped: oneshot::Receiver<()>) {
    let period = (shared.lease_ttl / 3).max(RENEW_MIN);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(period) => {}
        }
        match read(&shared, &key).await {
            Ok(Some(b)) if b.is_owned_by(&owner) => {
                let expires = now_ms().saturating_add(ms(shared.lease_ttl));
                let put = shared
                    .timed(shared.store.put_opts(
                        &key,
                        PutPayload::from(Body::render(expires, &owner)),
                        PutOptions {
                            mode: PutMode::Overwrite,
                            ..Default::default()
                        },
                    ))
                    .await;
                match put {
                    Ok(_) => {
                        shared.metrics.lease_renewal(Renewal::Ok);
                        tracing::debug!(
                            key = key.as_ref(),
                            expires_ms = expires,
                            "shared lease renewed"
                        );
                    }
                    Err(e) => {
                        shared.metrics.lease_renewal(Renewal::Error);
                        shared.failed(Op::Lease, &e);
                    }
                }
            }
            Ok(found) => {
                shared.metrics.lease_renewal(Renewal::Lost);
                tracing::info!(
                    key = key.as_ref(),
                    taken_over = found.is_some(),
                    "shared lease lost (expired and deleted or taken over); no longer renewing it"
                );
                return;
            }
            // Try again next period; the lease lives for two more.
            Err(e) => {
                shared.metrics.lease_renewal(Renewal::Error);
                shared.failed(Op::Lease, &e);
            }
        }
    }
}

pub(super) enum Acquire {
    Held(Lease),
    /// Another replica holds a live lease until `expires_ms` (unless it renews it).
    Busy {
        expires_ms: u64,
    },
    /// An expired lease was found and deleted: try again.
    Stale,
    Failed,
}

pub(super) async fn acquire(shared: &Arc<Shared>, digest: &Digest) -> Acquire {
    let key = shared.lease_key(digest);
    let owner = new_owner();
    let expires = now_ms().saturating_add(ms(shared.lease_ttl));
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let put = shared
        .timed(
            shared
                .store
                .put_opts(&key, PutPayload::from(Body::render(expires, &owner)), opts),
        )
        .await;
    match put {
        Ok(_) => {
            shared.metrics.op(Op::Lease, Res::Ok);
            tracing::debug!(%digest, owner, "shared lease taken");
            Acquire::Held(Lease::start(shared.clone(), key, owner))
        }
        Err(StoreError::Exists) => {
            shared.metrics.op(Op::Lease, Res::Exists);
            let expires_ms = match read(shared, &key).await {
                Ok(Some(b)) => b.expires_ms,
                // Released meanwhile.
                Ok(None) => return Acquire::Stale,
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

/// [`wait_until`] with the deadline `lease_wait` from now.
#[cfg(test)]
pub(super) async fn wait(shared: &Arc<Shared>, digest: &Digest, expires_ms: u64) -> WaitEnd {
    wait_until(
        shared,
        digest,
        expires_ms,
        Instant::now() + shared.lease_wait,
    )
    .await
}

/// Waits for another replica's fill of `digest`: until the blob lands, the lease goes away
/// or expires (re-read when `expires_ms` passes: a renewed lease keeps us waiting), the
/// store fails, or `deadline` passes (a fill sets it once, `lease_wait` after its start, for
/// all its waits).
pub(super) async fn wait_until(
    shared: &Arc<Shared>,
    digest: &Digest,
    expires_ms: u64,
    deadline: Instant,
) -> WaitEnd {
    let started = Instant::now();
    let (blob, lease) = (shared.blob_key(digest), shared.lease_key(digest));
    let mut expires_ms = expires_ms;
    let mut pause = POLL_FIRST;
    let gone = || async {
        // The holder may have uploaded and released between the two reads.
        match shared.exists(&blob, Op::HeadBlob).await {
            Some(true) => WaitEnd::Landed,
            Some(false) => WaitEnd::Released,
            None => WaitEnd::Error,
        }
    };
    let end = loop {
        let now = Instant::now();
        if now >= deadline {
            break WaitEnd::TimedOut;
        }
        let to_expiry = expires_ms.saturating_sub(now_ms());
        if to_expiry == 0 {
            match read(shared, &lease).await {
                Ok(Some(b)) if b.expires_ms > now_ms() => {
                    expires_ms = b.expires_ms;
                    continue;
                }
                Ok(Some(_)) => break WaitEnd::Expired,
                Ok(None) => break gone().await,
                Err(e) => {
                    shared.failed(Op::Lease, &e);
                    break WaitEnd::Error;
                }
            }
        }
        let nap = pause
            .min(Duration::from_millis(to_expiry))
            .min(deadline - now);
        tokio::time::sleep(nap).await;
        pause = (pause * 2).min(POLL_MAX);
        match shared.exists(&blob, Op::HeadBlob).await {
            Some(true) => break WaitEnd::Landed,
            Some(false) => {}
            None => break WaitEnd::Error,
        }
        match shared.exists(&lease, Op::Lease).await {
            Some(true) => {}
            Some(false) => break gone().await,
            None => break WaitEnd::Error,
        }
    };
    let waited = started.elapsed();
    tracing::info!(
        %digest,
        result = end.as_str(),
        waited_ms = ms(waited),
        "waited for another replica's fill"
    );
    shared.metrics.lease_wait(end, waited.as_secs_f64());
    end
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
