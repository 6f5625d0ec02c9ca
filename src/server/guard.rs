//! Per-connection time limits below HTTP: a client that stops reading, sits idle, or never
//! finishes a request head (HTTP/1 or HTTP/2) is disconnected.
//!
//! Why at the socket: hyper has no write timeout and no idle timeout, and its header read
//! timeout covers HTTP/1 only. An HTTP/2 connection that sends just the preface, or a HEADERS
//! frame without its end, never reaches a service, so only the transport sees it. [`Guarded`]
//! wraps the TCP stream (under TLS, when there is TLS) and knows from [`Activity`] whether a
//! request is in flight on the connection:
//! - while a write is pending (the client does not read), for at most `write_timeout`;
//! - with no request in flight: once bytes arrive, a request must start within
//!   `header_read_timeout`; with no bytes, the connection may stay `idle_timeout`.
//!
//! A limit that bites is logged and counted by [`Metrics::limit_hit`], and the connection
//! ends with a `TimedOut` error (hyper then closes the socket).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Limit, Metrics};

/// Requests in flight on one connection; wakes the reader when the last one ends, so the
/// idle clock starts then.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Requests started so far: a change means the connection's clocks start over.
    started: AtomicUsize,
    reader: AtomicWaker,
}

impl Activity {
    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// One request in flight (see [`Activity::begin`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// The limits a connection runs with.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    pub write: Duration,
}

/// A transport with the connection's time limits.
pub struct Guarded<I> {
    io: I,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    /// When the connection last had no request in flight (None while one is).
    idle_since: Option<Instant>,
    /// When the first bytes of the next request arrived.
    partial_since: Option<Instant>,
    /// [`Activity::started`] when the clocks above were last reset.
    seen_started: usize,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<I> Guarded<I> {
    pub fn new(
        io: I,
        activity: Arc<Activity>,
        timeouts: Timeouts,
        metrics: Arc<Metrics>,
        peer: SocketAddr,
    ) -> Self {
        let now = Instant::now();
        Guarded {
            io,
            activity,
            timeouts,
            metrics,
            peer,
            idle_since: Some(now),
            partial_since: None,
            seen_started: 0,
            read_timer: Box::pin(tokio::time::sleep_until(now + timeouts.idle)),
            write_timer: None,
        }
    }

    fn timed_out(&self, limit: Limit) -> io::Error {
        self.metrics.limit_hit(limit, &self.peer.to_string());
        io::Error::new(io::ErrorKind::TimedOut, limit.as_str())
    }

    /// Starts the clocks over when a request started since they were set.
    fn sync(&mut self) {
        let started = self.activity.started.load(Ordering::Acquire);
        if started != self.seen_started {
            self.seen_started = started;
            self.idle_since = None;
            self.partial_since = None;
        }
    }

    /// The read side is waiting: check the idle / request-head deadline.
    fn poll_read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.activity.reader.register(cx.waker());
        self.sync();
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.idle_since = None;
            self.partial_since = None;
            return Poll::Pending;
        }
        let now = Instant::now();
        let idle_since = *self.idle_since.get_or_insert(now);
        let (deadline, limit) = match self.partial_since {
            Some(t) => (t + self.timeouts.header_read, Limit::HeaderReadTimeout),
            None => (idle_since + self.timeouts.idle, Limit::IdleTimeout),
        };
        if self.read_timer.deadline() != deadline {
            self.read_timer.as_mut().reset(deadline);
        }
        match self.read_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.timed_out(limit)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A write is pending: check the write deadline. Ready means the client stopped reading.
    fn poll_write_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let write = self.timeouts.write;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(write)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.timed_out(Limit::WriteTimeout)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => match self.poll_write_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            ready => {
                self.write_timer = None;
                ready
            }
        }
    }
}

use std::future::Future as _;

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.sync();
                let idle = this.activity.in_flight.load(Ordering::Acquire) == 0;
                if buf.filled().len() > before && idle && this.partial_since.is_none() {
                    this.partial_since = Some(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_read_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.wrote(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.wrote(cx, r)
    }
}
