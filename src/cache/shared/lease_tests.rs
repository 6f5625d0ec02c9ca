//! Leases between "replicas" (separate `Shared`s over one in-memory store): renewal past the
//! TTL, expiry of a dead holder, owner-checked release, the bounded wait, the old body.

use std::sync::Arc;
use std::time::Duration;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use tokio::time::Instant;

use super::super::metrics::{Renewal, WaitEnd};
use super::super::Shared;
use super::{acquire, now_ms, wait, Acquire, Body, Lease};
use crate::protocol::grammar::Digest;

/// Short, yet long enough that renewal every third of it holds on a loaded machine.
const TTL: Duration = Duration::from_millis(600);
const DEADLINE: Duration = Duration::from_secs(10);

fn replica(store: &Arc<dyn ObjectStore>, lease_wait: Duration) -> Arc<Shared> {
    Shared::new(
        store.clone(),
        "p",
        TTL,
        lease_wait,
        Duration::from_secs(2),
        &prometheus::Registry::new(),
    )
    .unwrap()
}

fn digest() -> Digest {
    Digest::sha256_of(b"some layer")
}

async fn held(s: &Arc<Shared>, d: &Digest) -> Lease {
    match acquire(s, d).await {
        Acquire::Held(l) => l,
        _ => panic!("lease not taken"),
    }
}

async fn busy(s: &Arc<Shared>, d: &Digest) -> u64 {
    match acquire(s, d).await {
        Acquire::Busy { expires_ms } => expires_ms,
        Acquire::Held(_) => panic!("held, expected busy"),
        Acquire::Stale => panic!("stale, expected busy"),
        Acquire::Failed => panic!("failed, expected busy"),
    }
}

async fn body(store: &Arc<dyn ObjectStore>, key: &Path) -> Option<Vec<u8>> {
    match store.get(key).await {
        Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Polls `cond` until it holds, failing after [`DEADLINE`].
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn bodies_parse_in_both_formats() {
    assert_eq!(
        Body::parse(b"1700000000000 0123456789abcdef"),
        Some(Body {
            expires_ms: 1_700_000_000_000,
            owner: Some("0123456789abcdef".into())
        })
    );
    assert_eq!(
        Body::parse(b"1700000000000\n"),
        Some(Body {
            expires_ms: 1_700_000_000_000,
            owner: None
        })
    );
    for bad in [&b""[..], b"soon", b"12 a b", b"-5 x", b"\xff"] {
        assert_eq!(Body::parse(bad), None, "{bad:?}");
    }
    let s = Body::render(42, "abc");
    assert_eq!(
        Body::parse(s.as_bytes()).unwrap().owner.as_deref(),
        Some("abc")
    );
}

#[test]
fn owners_differ() {
    let (a, b) = (super::new_owner(), super::new_owner());
    assert_ne!(a, b);
    assert_eq!(a.len(), 16);
    assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
}

#[tokio::test]
async fn a_lease_held_for_several_ttls_stays_live_and_release_deletes_it() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(&store, DEADLINE), replica(&store, DEADLINE));
    let d = digest();
    let lease = held(&a, &d).await;
    let key = a.lease_key(&d);
    let first = Body::parse(&body(&store, &key).await.unwrap()).unwrap();
    assert_eq!(first.owner.as_deref(), Some(lease.owner()));

    // Measurement window of 4 TTLs: B must find the lease live throughout.
    let window = Instant::now() + TTL * 4;
    while Instant::now() < window {
        let expires_ms = busy(&b, &d).await;
        assert!(expires_ms > now_ms());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewed = Body::parse(&body(&store, &key).await.unwrap()).unwrap();
    assert!(renewed.expires_ms > first.expires_ms);
    assert_eq!(renewed.owner, first.owner);
    assert!(a.metrics.lease_renewal_count(Renewal::Ok) >= 3);

    lease.release().await;
    assert_eq!(body(&store, &key).await, None);
    assert!(matches!(acquire(&b, &d).await, Acquire::Held(_)));
}

#[tokio::test]
async fn a_dead_holders_lease_expires_for_waiters_and_is_taken_over() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(&store, DEADLINE), replica(&store, DEADLINE));
    let d = digest();
    held(&a, &d).await.abandon();
    let expires_ms = busy(&b, &d).await;
    assert_eq!(wait(&b, &d, expires_ms).await, WaitEnd::Expired);
    assert_eq!(b.metrics.lease_wait_count(WaitEnd::Expired), 1);
    assert!(matches!(acquire(&b, &d).await, Acquire::Stale));
    let l = held(&b, &d).await;
    l.release().await;
    assert_eq!(a.metrics.lease_renewal_count(Renewal::Ok), 0);
}

#[tokio::test]
async fn release_and_renewal_leave_a_lease_another_owner_took_over() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = replica(&store, DEADLINE);
    let d = digest();
    let lease = held(&a, &d).await;
    let key = a.lease_key(&d);
    let foreign = format!("{} ffffffffffffffff", now_ms() + 60_000).into_bytes();
    store
        .put(&key, PutPayload::from(foreign.clone()))
        .await
        .unwrap();
    until("renewal notices the takeover", || async {
        a.metrics.lease_renewal_count(Renewal::Lost) == 1
    })
    .await;
    assert_eq!(
        body(&store, &key).await,
        Some(foreign.clone()),
        "not renewed over"
    );
    lease.release().await;
    assert_eq!(body(&store, &key).await, Some(foreign), "not deleted");
}

#[tokio::test]
async fn a_dropped_lease_is_released_by_a_spawned_task() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = replica(&store, DEADLINE);
    let d = digest();
    let key = a.lease_key(&d);
    drop(held(&a, &d).await);
    until("the dropped lease is deleted", || async {
        body(&store, &key).await.is_none()
    })
    .await;
}

#[tokio::test]
async fn a_wait_longer_than_lease_wait_times_out_although_the_lease_is_renewed() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let lease_wait = TTL * 3;
    let (a, b) = (replica(&store, DEADLINE), replica(&store, lease_wait));
    let d = digest();
    let lease = held(&a, &d).await;
    let expires_ms = busy(&b, &d).await;
    let started = Instant::now();
    assert_eq!(wait(&b, &d, expires_ms).await, WaitEnd::TimedOut);
    let waited = started.elapsed();
    assert!(waited >= lease_wait, "{waited:?}");
    assert!(waited < DEADLINE, "{waited:?}");
    assert_eq!(b.metrics.lease_wait_count(WaitEnd::TimedOut), 1);
    lease.release().await;
}

#[tokio::test]
async fn a_wait_ends_released_when_the_holder_releases() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(&store, DEADLINE), replica(&store, DEADLINE));
    let d = digest();
    let lease = held(&a, &d).await;
    let expires_ms = busy(&b, &d).await;
    let (b2, d2) = (b.clone(), d.clone());
    let waiter = tokio::spawn(async move { wait(&b2, &d2, expires_ms).await });
    // Past the first expiry: the waiter re-read the renewed lease and kept waiting.
    tokio::time::sleep(TTL * 2).await;
    assert!(!waiter.is_finished());
    lease.release().await;
    let end = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, WaitEnd::Released);
}

#[tokio::test]
async fn a_wait_ends_landed_when_the_blob_appears() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (a, b) = (replica(&store, DEADLINE), replica(&store, DEADLINE));
    let d = digest();
    let lease = held(&a, &d).await;
    let expires_ms = busy(&b, &d).await;
    let (b2, d2) = (b.clone(), d.clone());
    let waiter = tokio::spawn(async move { wait(&b2, &d2, expires_ms).await });
    store
        .put(&a.blob_key(&d), PutPayload::from_static(b"some layer"))
        .await
        .unwrap();
    let end = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, WaitEnd::Landed);
    lease.release().await;
    assert_eq!(body(&store, &a.lease_key(&d)).await, None);
}

#[tokio::test]
async fn an_old_format_lease_is_understood() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = replica(&store, DEADLINE);
    let d = digest();
    let key = b.lease_key(&d);
    let live = now_ms() + 60_000;
    store
        .put(&key, PutPayload::from(live.to_string()))
        .await
        .unwrap();
    assert_eq!(busy(&b, &d).await, live);

    let dead = now_ms() + TTL.as_millis() as u64;
    store
        .put(&key, PutPayload::from(dead.to_string()))
        .await
        .unwrap();
    assert_eq!(wait(&b, &d, dead).await, WaitEnd::Expired);
    assert!(matches!(acquire(&b, &d).await, Acquire::Stale));
    assert_eq!(body(&store, &key).await, None);
}
