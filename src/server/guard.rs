//! Per-connection time limits below HTTP: a client that stops reading, sits idle, or never
//! finishes a request head (HTTP/1 or HTTP/2) is disconnected.
//!
//! Why at the socket: hyper has no write timeout and no idle timeout, and its header read
//! timeout covers HTTP/1 only. An HTTP/2 connection that sends just the preface, or a HEADERS
//! frame without its end, never reaches a service, so only the transport sees it. [`Guarded`]
//! wraps the TCP stream (under TLS, when there is TLS) and knows from [`Activity`] whether a
//! request is in flight on the connection:
//! - while a write is pending (the client does not read), for at most `write_timeout`;
//! - while a response body chunk handed to hyper is not taken back up for `write_timeout`
//!   (an HTTP/2 client that keeps the socket busy but grants one stream no window): the body
//!   wrapper from [`track`] notes when it delivered a chunk and when hyper polled it again;
//! - with no request in flight: once bytes arrive, a request must start within
//!   `header_read_timeout`; with no bytes, the connection may stay `idle_timeout`.
//!
//! A limit that bites is logged and counted by [`Metrics::limit_hit`], and the connection
//! ends with a `TimedOut` error (hyper then closes the socket).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Limit, Metrics};

/// Requests in flight on one connection; wakes the reader when the last one ends, so the
/// idle clock starts then.
#[derive(Default)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    /// Requests started so far: a change means the connection's clocks start over.
    started: AtomicUsize,
    reader: AtomicWaker,
    /// Request id → when its body handed hyper a chunk that hyper has not come back for.
    delivered: Mutex<HashMap<u64, Instant>>,
    ids: AtomicU64,
}

impl Activity {
    /// Marks a request in flight until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlight {
            activity: self.clone(),
            id: self.ids.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn delivered(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest chunk still waiting for the client, if any.
    fn oldest_delivery(&self) -> Option<Instant> {
        self.delivered().values().min().copied()
    }
}

/// One request in flight (see [`Activity::begin`]).
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    id: u64,
}

impl InFlight {
    /// The body handed hyper a chunk.
    fn delivered(&self) {
        self.activity.delivered().insert(self.id, Instant::now());
        // The read side arms the timer for it.
        self.activity.reader.wake();
    }

    /// Hyper polled the body again: the last chunk went out.
    fn taken(&self) {
        self.activity.delivered().remove(&self.id);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.taken();
        if self.activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.reader.wake();
        }
    }
}

/// `body`, in flight on its connection until dropped, reporting each chunk it delivers.
pub(crate) fn track(
    body: crate::server::body::Body,
    in_flight: InFlight,
) -> crate::server::body::Body {
    // The response head is handed over: hyper polls the body next, unless the client's flow
    // control window is closed.
    if !body.is_end_stream() {
        in_flight.delivered();
    }
    Tracked {
        inner: body,
        in_flight,
    }
    .boxed_unsync()
}

struct Tracked {
    inner: crate::server::body::Body,
    in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.in_flight.taken();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_data() {
                self.in_flight.delivered();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The limits a connection runs with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    pub write: Duration,
}

/// A transport with the connection's time limits.
pub(crate) struct Guarded<I> {
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
    pub(crate) fn new(
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
        let now = Instant::now();
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.idle_since = None;
            self.partial_since = None;
            // A chunk the client has not taken for `write_timeout` (HTTP/2 flow control).
            let Some(since) = self.activity.oldest_delivery() else {
                return Poll::Pending;
            };
            let deadline = since + self.timeouts.write;
            if self.read_timer.deadline() != deadline {
                self.read_timer.as_mut().reset(deadline);
            }
            return match self.read_timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(self.timed_out(Limit::WriteTimeout)),
                Poll::Pending => Poll::Pending,
            };
        }
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
