//! The background check after open: every committed file's length against the size recorded
//! in its name at commit (truncated files are dropped), and LRU order seeded from the files'
//! commit times.
//!
//! Open itself only reads directories, so the index is usable at once; until the scrub has
//! reached a file, the length check on every hit's open (`fstat` of the opened file) keeps a
//! truncated file from being served.

use std::sync::Arc;

use super::Inner;

/// Runs the scrub on the blocking pool; entries with `last_used <= untouched` have not been
/// used since open and get their recency from the file's modification time.
pub(super) fn spawn(inner: Arc<Inner>, untouched: u64) {
    tokio::task::spawn_blocking(move || scrub(&inner, untouched));
}

pub(super) fn scrub(inner: &Inner, untouched: u64) {
    let started = std::time::Instant::now();
    let entries: Vec<_> = inner
        .lock()
        .index
        .iter()
        .map(|(d, e)| (d.clone(), *e))
        .collect();
    let mut times = Vec::with_capacity(entries.len());
    let mut dropped = 0usize;
    for (digest, e) in entries {
        match inner.store.stat_blob(&digest, e.size) {
            Ok((len, modified)) if len == e.size => times.push((modified, digest, e.gen)),
            Ok((len, _)) => {
                dropped += 1;
                let why = format!("length {len} but {} recorded at commit", e.size);
                inner.drop_corrupt(&digest, e.gen, &why);
            }
            Err(err) => {
                dropped += 1;
                tracing::warn!(%digest, error = %err, "cached blob file vanished");
                inner.forget_blob(&digest, e.gen);
            }
        }
    }
    times.sort_unstable_by_key(|t| t.0);
    {
        let mut st = inner.lock();
        for (i, (_, digest, gen)) in times.into_iter().enumerate() {
            if let Some(e) = st.index.get_mut(&digest) {
                if e.gen == gen && e.last_used <= untouched {
                    e.last_used = i as u64 + 1;
                }
            }
        }
        inner.metrics.set_totals(st.total, st.index.len());
    }
    tracing::info!(
        dropped,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cache scrub done"
    );
    if inner.max_size.is_some() {
        inner.evict_notify.notify_one();
    }
}
