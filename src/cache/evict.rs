//! Size-bounded LRU eviction of committed blobs, in a background task.
//!
//! Each commit (of a blob or a manifest) nudges the task; it evicts least-recently-used blobs
//! until blobs, manifests and the links/tags journals together take at most `cache.max_size`.
//! Manifests may use at most a quarter of it ([`MANIFEST_SHARE`]): beyond that the oldest
//! manifest files go first, so a client that asks for many distinct manifests cannot push
//! every blob out. The journals are not evicted (they hold the read rule); they only shrink
//! the room left for blobs. Recency is a logical clock bumped on each hit; after a restart
//! it starts from the files' commit times (access order is not persisted). Files are unlinked
//! under the index lock, one at a time, so a new fill of the same digest cannot be unlinked by
//! mistake; a client already reading an evicted blob keeps its open file descriptor (Linux
//! keeps an unlinked inode alive while it is open), so it is never cut short. A lock poisoned
//! by a panic elsewhere does not stop eviction, as it does not stop the rest of the cache.

use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use super::Inner;

/// The share of `cache.max_size` manifests may take (1/4).
pub(super) const MANIFEST_SHARE: u64 = 4;

/// Runs eviction each time `notify` fires, until the cache is dropped.
pub(super) fn spawn(inner: Weak<Inner>, notify: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            notify.notified().await;
            let Some(inner) = inner.upgrade() else { break };
            let res = tokio::task::spawn_blocking(move || evict_to_limit(&inner)).await;
            if let Err(e) = res {
                tracing::error!(error = %e, "cache eviction task failed");
            }
        }
    });
}

/// Evicts LRU blobs until the committed total fits `max_size`. Blocking.
pub(super) fn evict_to_limit(inner: &Inner) {
    let Some(limit) = inner.max_size else { return };
    let manifest_cap = limit / MANIFEST_SHARE;
    if inner.manifests.disk_bytes() > manifest_cap {
        let removed = inner.manifests.evict_oldest(manifest_cap);
        if removed > 0 {
            tracing::info!(removed, cap = manifest_cap, "cache manifests evicted");
        }
    }
    let metadata = inner.metadata_bytes();
    inner.metrics.set_metadata(metadata);
    // What is left for blobs.
    let max = limit.saturating_sub(metadata);
    loop {
        // Pick victims under the lock (one sort), then remove them one lock hold each,
        // skipping any blob used since it was picked.
        let victims = {
            let st = inner.lock();
            if st.total <= max {
                return;
            }
            let mut all: Vec<_> = st
                .index
                .iter()
                .map(|(d, e)| (e.last_used, d.clone(), *e))
                .collect();
            all.sort_unstable_by_key(|v| v.0);
            let mut excess = st.total - max;
            let mut victims = Vec::new();
            for (_, d, e) in all {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(e.size);
                victims.push((d, e));
            }
            victims
        };
        if victims.is_empty() {
            return;
        }
        for (digest, picked) in victims {
            let mut st = inner.lock();
            if st.total <= max {
                return;
            }
            if st.index.get(&digest) != Some(&picked) {
                continue;
            }
            st.remove(&digest);
            if let Err(e) = inner.store.remove_blob(&digest, picked.size) {
                tracing::warn!(%digest, error = %e, "cannot remove evicted blob");
            }
            inner.metrics.evicted(&digest, picked.size);
            inner.metrics.set_totals(st.total, st.index.len());
        }
    }
}
