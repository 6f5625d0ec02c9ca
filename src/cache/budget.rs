//! The time, rate and size budget of one fill's upstream body.
//!
//! A fill runs detached from its clients (so a dropped pull still completes the cache), which
//! means nothing but this budget ends a fill whose upstream trickles bytes: without it, a few
//! clients that ask for slow blobs and disconnect hold every upstream blob slot for good. The
//! budget is a stream adapter around the upstream body: it ends the body with an error that
//! names the limit ([`LimitExceeded`]), and [`super::fill`] turns that into a fill failure
//! reason (`deadline`, `too_slow`, `too_large`), which is where it is logged and counted.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::time::Instant;

use super::metrics::FailReason;

/// The budget of one fill (from `config.limits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FillLimits {
    /// Longest time from the upstream's response headers to the end of the body.
    pub deadline: Duration,
    /// Bytes per second the body must average over each `window`; 0: no minimum.
    pub min_rate: u64,
    pub window: Duration,
    /// Largest body accepted.
    pub max_size: Option<u64>,
}

/// Why a budget ended a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitExceeded {
    #[error("fill not done within limits.fill_deadline ({0:?})")]
    Deadline(Duration),
    #[error("upstream sent {got} bytes in {window:?}, less than limits.fill_min_rate {min_rate} bytes/s")]
    TooSlow {
        got: u64,
        window: Duration,
        min_rate: u64,
    },
    #[error("blob larger than limits.max_blob_size ({0} bytes)")]
    TooLarge(u64),
}

impl LimitExceeded {
    pub(crate) fn reason(self) -> FailReason {
        match self {
            LimitExceeded::Deadline(_) => FailReason::Deadline,
            LimitExceeded::TooSlow { .. } => FailReason::TooSlow,
            LimitExceeded::TooLarge(_) => FailReason::TooLarge,
        }
    }

    /// The limit behind a body error, if a budget ended the body.
    pub(crate) fn of(e: &io::Error) -> Option<LimitExceeded> {
        e.get_ref()?.downcast_ref::<LimitExceeded>().copied()
    }
}

struct State {
    inner: BoxStream<'static, io::Result<Bytes>>,
    limits: FillLimits,
    deadline: Instant,
    window_start: Instant,
    window_bytes: u64,
    total: u64,
    done: bool,
}

impl State {
    fn fail(mut self, e: LimitExceeded) -> Option<(io::Result<Bytes>, State)> {
        self.done = true;
        Some((Err(io::Error::other(e)), self))
    }

    /// Checks a window that is over; starts the next one.
    fn window_over(&mut self, now: Instant) -> Result<(), LimitExceeded> {
        let window = self.limits.window;
        let needed = (self.limits.min_rate as u128 * window.as_millis() / 1000) as u64;
        if self.limits.min_rate > 0 && self.window_bytes < needed {
            return Err(LimitExceeded::TooSlow {
                got: self.window_bytes,
                window,
                min_rate: self.limits.min_rate,
            });
        }
        self.window_start = now;
        self.window_bytes = 0;
        Ok(())
    }
}

/// `body` ending with a [`LimitExceeded`] error when it breaks `limits`. Clock starts now.
pub(crate) fn enforce(
    body: BoxStream<'static, io::Result<Bytes>>,
    limits: FillLimits,
) -> BoxStream<'static, io::Result<Bytes>> {
    let now = Instant::now();
    let state = State {
        inner: body,
        limits,
        deadline: now + limits.deadline,
        window_start: now,
        window_bytes: 0,
        total: 0,
        done: false,
    };
    stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let now = Instant::now();
            if now >= st.deadline {
                let d = st.limits.deadline;
                return st.fail(LimitExceeded::Deadline(d));
            }
            let window_end = st.window_start + st.limits.window;
            if now >= window_end {
                if let Err(e) = st.window_over(now) {
                    return st.fail(e);
                }
                continue;
            }
            tokio::select! {
                item = st.inner.next() => {
                    return match item {
                        None => None,
                        Some(Ok(b)) => {
                            st.total += b.len() as u64;
                            st.window_bytes += b.len() as u64;
                            match st.limits.max_size {
                                Some(max) if st.total > max => st.fail(LimitExceeded::TooLarge(max)),
                                _ => Some((Ok(b), st)),
                            }
                        }
                        Some(Err(e)) => Some((Err(e), st)),
                    };
                }
                _ = tokio::time::sleep_until(window_end.min(st.deadline)) => {}
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, short windows (no paused clock in this crate's tokio features).
    fn limits() -> FillLimits {
        FillLimits {
            deadline: Duration::from_secs(30),
            min_rate: 10_000,
            window: Duration::from_millis(200),
            max_size: Some(50_000),
        }
    }

    /// A body that sends `chunk` bytes every `every`, `n` times.
    fn trickle(chunk: usize, every: Duration, n: usize) -> BoxStream<'static, io::Result<Bytes>> {
        stream::iter(0..n)
            .then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok(Bytes::from(vec![0u8; chunk]))
            })
            .boxed()
    }

    async fn run(
        body: BoxStream<'static, io::Result<Bytes>>,
        l: FillLimits,
    ) -> (u64, Option<LimitExceeded>) {
        let mut s = enforce(body, l);
        let mut got = 0;
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => got += b.len() as u64,
                Err(e) => return (got, LimitExceeded::of(&e)),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn a_body_well_above_the_minimum_rate_passes() {
        // 1000 bytes per 10 ms = 100 kB/s, ten times the minimum, for ~400 ms.
        let l = FillLimits {
            max_size: None,
            ..limits()
        };
        let (got, err) = run(trickle(1000, Duration::from_millis(10), 40), l).await;
        assert_eq!((got, err), (40_000, None));
    }

    #[tokio::test]
    async fn a_trickle_below_the_rate_is_cut() {
        // 10 bytes per 10 ms = 1 kB/s, a tenth of the minimum.
        let (got, err) = run(trickle(10, Duration::from_millis(10), 100_000), limits()).await;
        assert!(
            matches!(err, Some(LimitExceeded::TooSlow { .. })),
            "{err:?}"
        );
        assert!(got < 2_000, "{got}");
    }

    #[tokio::test]
    async fn a_silent_body_is_cut_after_one_window() {
        let (got, err) = run(stream::pending().boxed(), limits()).await;
        assert!(
            matches!(err, Some(LimitExceeded::TooSlow { got: 0, .. })),
            "{err:?}"
        );
        assert_eq!(got, 0);
    }

    #[tokio::test]
    async fn the_deadline_cuts_a_body_fast_enough_for_the_rate() {
        let l = FillLimits {
            deadline: Duration::from_millis(300),
            max_size: None,
            ..limits()
        };
        let (got, err) = run(trickle(1000, Duration::from_millis(10), 100_000), l).await;
        assert_eq!(
            err,
            Some(LimitExceeded::Deadline(Duration::from_millis(300)))
        );
        assert!(got > 0 && got < 100_000_000, "{got}");
    }

    #[tokio::test]
    async fn a_body_past_max_size_is_cut() {
        let (got, err) = run(trickle(20_000, Duration::from_millis(1), 10), limits()).await;
        assert_eq!(err, Some(LimitExceeded::TooLarge(50_000)));
        assert_eq!(got, 40_000);
    }

    #[tokio::test]
    async fn errors_of_the_body_pass_through_unchanged() {
        let body = stream::iter([Err(io::Error::other("boom"))]).boxed();
        let mut s = enforce(body, limits());
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(LimitExceeded::of(&e), None);
    }
}
