//! Size-bounded LRU eviction of committed blobs, in a background task.
//!
//! Each commit nudges the task; it evicts least-recently-used blobs until the committed total
//! is at most `cache.max_size`. Recency is a logical clock bumped on each hit; after a restart
//! it starts from the files' commit times (access order is not persisted). Files are unlinked
//! under the index lock, one at a time, so a new fill of the same digest cannot be unlinked by
//! mistake; a client already reading an evicted blob keeps its open file descriptor (Linux
//! keeps an unlinked inode alive while it is open), so it is never cut short. A lock poisoned
//! by a panic elsewhere does not stop eviction, as it does not stop the rest of the cache.

use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use super::Inner;

/// Runs eviction each time `notify` fires, until the cache is dropped.
pub fn spawn(inner: Weak<Inner>, notify: Arc<Notify>) {
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
pub fn evict_to_limit(inner: &Inner) {
    let Some(max) = inner.max_size else { return };
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
