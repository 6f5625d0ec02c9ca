//! The memory all fills together may hold, however many run at once.
//!
//! Why: one fill holds its window of recent bytes, what is in flight to its hasher and writer,
//! and the direct writer's two buffers, about 24 MiB at full size ([`super::fill`]); that is
//! what keeps a single cold pull fast. But anonymous clients choose how many distinct cold
//! blobs are fetched at once (up to `max_concurrent_upstream_fetches`, 64 by default): 20
//! distinct 64 MiB blobs asked at once peaked at 387-470 MiB RSS when every fill had full
//! sizes, and 64 would pass 1.5 GiB. So the three parts are bounded for the whole process, and
//! a fill gets a share of each:
//! - **window**: [`WINDOWS`] split evenly over the fills in flight, between [`MIN_WINDOW`] and
//!   [`super::fill::RECENT_WINDOW`]; a fill trims to its share on its next receive, so the
//!   windows shrink as fills start and grow back as they end;
//! - **in flight**: [`IN_FLIGHT_TOTAL`] bytes received by all fills and not yet hashed and
//!   taken by their writers, on top of each fill's [`super::fill::IN_FLIGHT`] (a fill waits
//!   for both; each is released by that fill's own threads, so no fill waits on another's
//!   clients);
//! - **write buffers**: [`BUFFERS_TOTAL`] bytes of direct-write buffers; a fill takes
//!   full-size ones while the budget lasts, then smaller ones, down to [`MIN_BUFFER`] (outside
//!   the budget, small enough that even every fill at once holds little).
//!
//! Up to two fills at once keep every full size (a single pull is as fast as before); beyond
//! that each fill's memory shrinks: the same 20 distinct blobs peaked at 135-142 MiB RSS
//! (README "Limits").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::fill::RECENT_WINDOW;

/// Recent bytes all fills keep for their readers: two fills get the full window.
pub(super) const WINDOWS: u64 = 2 * RECENT_WINDOW;

/// The smallest window a fill trims to, however many fills run.
pub(super) const MIN_WINDOW: u64 = 512 << 10;

/// Bytes all fills together have received and not yet hashed and handed to their writers.
pub(super) const IN_FLIGHT_TOTAL: usize = 16 << 20;

/// Direct-write buffers of all fills together: two fills get two full-size buffers each.
pub(super) const BUFFERS_TOTAL: usize = 4 * super::direct::BUFFER;

/// Buffer sizes a fill tries, largest first, while [`BUFFERS_TOTAL`] lasts.
const BUFFER_SIZES: [usize; 2] = [super::direct::BUFFER, 1 << 20];

/// The buffer size a fill gets when the budget is spent (outside the budget; a multiple of
/// [`super::direct::ALIGN`]).
pub(super) const MIN_BUFFER: usize = 256 << 10;

/// The process-wide fill memory budget ([`super::Inner`] holds one).
#[derive(Debug)]
pub(crate) struct FillMemory {
    active: AtomicUsize,
    in_flight: Arc<Semaphore>,
    buffers: Arc<Semaphore>,
    /// `oci_proxy_cache_fills_running`.
    running: IntGauge,
}

impl FillMemory {
    /// The whole budget free; `running` shows the fills in flight.
    pub(super) fn new(running: IntGauge) -> FillMemory {
        FillMemory {
            active: AtomicUsize::new(0),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_TOTAL)),
            buffers: Arc::new(Semaphore::new(BUFFERS_TOTAL)),
            running,
        }
    }

    /// Counts a fill in flight until the returned guard drops.
    pub(super) fn join(self: &Arc<FillMemory>) -> Active {
        let n = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        self.running.set(i64::try_from(n).unwrap_or(i64::MAX));
        Active(self.clone())
    }

    /// Fills in flight now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The window each fill keeps now: its share of [`WINDOWS`].
    pub(super) fn window(&self) -> u64 {
        let fills = self.active().max(1) as u64;
        (WINDOWS / fills).clamp(MIN_WINDOW, RECENT_WINDOW)
    }

    /// The process-wide in-flight budget, in bytes.
    pub(super) fn in_flight(&self) -> &Arc<Semaphore> {
        &self.in_flight
    }

    /// Bytes of the in-flight budget free now.
    #[cfg(test)]
    pub(crate) fn in_flight_free(&self) -> usize {
        self.in_flight.available_permits()
    }

    /// Bytes of the write-buffer budget free now.
    #[cfg(test)]
    pub(crate) fn buffers_free(&self) -> usize {
        self.buffers.available_permits()
    }

    /// The size of a fill's two write buffers, at most `want`: the largest that the budget
    /// has room for now, with the permit that holds it (none for [`MIN_BUFFER`], or for a
    /// `want` as small).
    pub(super) fn buffers(&self, want: usize) -> (usize, Option<OwnedSemaphorePermit>) {
        if want <= MIN_BUFFER {
            return (want, None);
        }
        for size in BUFFER_SIZES.into_iter().map(|s| s.min(want)) {
            let Ok(bytes) = u32::try_from(2 * size) else {
                continue;
            };
            if let Ok(p) = self.buffers.clone().try_acquire_many_owned(bytes) {
                return (size, Some(p));
            }
        }
        (MIN_BUFFER, None)
    }
}

/// A fill in flight, counted in [`FillMemory`] until dropped.
#[derive(Debug)]
pub(super) struct Active(Arc<FillMemory>);

impl Drop for Active {
    fn drop(&mut self) {
        let n = self
            .0
            .active
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        self.0.running.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unregistered() -> FillMemory {
        FillMemory::new(IntGauge::new("fills_running", "test").expect("a valid gauge"))
    }

    #[test]
    fn windows_shrink_as_fills_start_and_grow_back_as_they_end() {
        let mem = Arc::new(unregistered());
        assert_eq!(mem.window(), RECENT_WINDOW);
        let first: Vec<Active> = (0..2).map(|_| mem.join()).collect();
        assert_eq!(
            mem.window(),
            RECENT_WINDOW,
            "two fills keep the full window"
        );
        let third = mem.join();
        assert_eq!(mem.window(), WINDOWS / 3);
        assert_eq!(mem.running.get(), 3);
        // 64 fills (the default `max_concurrent_upstream_fetches`) keep 32 MiB in all.
        let more: Vec<Active> = (0..61).map(|_| mem.join()).collect();
        assert_eq!(mem.window(), MIN_WINDOW);
        assert_eq!(mem.active() as u64 * mem.window(), 32 << 20);
        drop(more);
        drop(third);
        assert_eq!(mem.window(), RECENT_WINDOW);
        drop(first);
        assert_eq!(mem.active(), 0);
        assert_eq!(mem.running.get(), 0);
    }

    #[test]
    fn write_buffers_shrink_once_the_budget_is_spent_and_come_back_when_released() {
        let mem = unregistered();
        let full = super::super::direct::BUFFER;
        let mut held = Vec::new();
        for _ in 0..2 {
            let (size, permit) = mem.buffers(full);
            assert_eq!(size, full);
            held.push(permit.expect("within the budget"));
        }
        // The budget is spent: the next fill gets the smallest buffers, outside it.
        let (size, permit) = mem.buffers(full);
        assert_eq!(size, MIN_BUFFER);
        assert!(permit.is_none());
        drop(held.pop());
        // Room for 2 x 4 MiB again.
        let (size, permit) = mem.buffers(full);
        assert_eq!(size, full);
        assert!(permit.is_some());
        // A small blob asks for small buffers, and below the floor takes none of the budget.
        assert_eq!(mem.buffers(64 << 10).0, 64 << 10);
        assert!(mem.buffers(64 << 10).1.is_none());
        drop(permit);
        drop(held);
        assert_eq!(mem.buffers_free(), BUFFERS_TOTAL);
    }
}
