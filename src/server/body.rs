//! Response bodies: small in-memory ones, streams, and the metered wrapper that logs and counts
//! every request once, when its body ends (so duration and bytes cover the whole transfer).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};

/// Every response body the server sends.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn stream(s: BoxStream<'static, Result<Bytes, std::io::Error>>) -> Body {
    StreamBody::new(s.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// What the access log and metrics record about a request.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    pub method: String,
    pub route: &'static str,
    pub repository: String,
    pub status: u16,
    pub cache: &'static str,
    pub error: Option<&'static str>,
}

/// Called once per request, when the body is finished or dropped.
pub trait Recorder: Send + Sync + 'static {
    fn record(&self, rec: &RequestRecord, bytes: u64, elapsed: std::time::Duration, complete: bool);
}

/// Wraps a body, counting bytes and reporting to the recorder exactly once.
pub struct Metered {
    inner: Body,
    record: Option<RequestRecord>,
    recorder: std::sync::Arc<dyn Recorder>,
    started: Instant,
    bytes: u64,
    complete: bool,
}

impl Metered {
    pub fn new(
        inner: Body,
        record: RequestRecord,
        recorder: std::sync::Arc<dyn Recorder>,
        started: Instant,
    ) -> Self {
        Metered {
            inner,
            record: Some(record),
            recorder,
            started,
            bytes: 0,
            complete: false,
        }
    }

    fn finish(&mut self) {
        if let Some(rec) = self.record.take() {
            self.recorder
                .record(&rec, self.bytes, self.started.elapsed(), self.complete);
        }
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                this.complete = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
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

impl Drop for Metered {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.complete = true;
        }
        self.finish();
    }
}
