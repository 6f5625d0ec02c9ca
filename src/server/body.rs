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
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn stream(s: BoxStream<'static, Result<Bytes, std::io::Error>>) -> Body {
    StreamBody::new(s.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// What the access log and metrics record about a request.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestRecord {
    pub method: String,
    pub route: &'static str,
    pub repository: String,
    pub status: u16,
    pub cache: &'static str,
    pub error: Option<&'static str>,
}

/// Called once per request, when the body is finished or dropped. `complete` says that every
/// promised byte was sent (the body's length, or its end when the length was not known).
pub(crate) trait Recorder: Send + Sync + 'static {
    fn record(&self, rec: &RequestRecord, bytes: u64, elapsed: std::time::Duration, complete: bool);
}

/// Wraps a body, counting bytes and reporting to the recorder exactly once.
///
/// hyper stops polling a body once the `Content-Length` bytes are out, so the end of the
/// stream is often never seen: completeness is "bytes sent = bytes promised" when a length was
/// promised, and "the stream ended" otherwise.
pub(crate) struct Metered {
    inner: Body,
    record: Option<RequestRecord>,
    recorder: std::sync::Arc<dyn Recorder>,
    started: Instant,
    bytes: u64,
    /// The body's length, from its exact size hint or the response's `Content-Length`.
    promised: Option<u64>,
    complete: bool,
}

impl Metered {
    /// `content_length` is the response's header (ignored when the body's own size is
    /// exact: a HEAD answer promises an empty body whatever its header says).
    pub(crate) fn new(
        inner: Body,
        content_length: Option<u64>,
        record: RequestRecord,
        recorder: std::sync::Arc<dyn Recorder>,
        started: Instant,
    ) -> Self {
        let promised = inner.size_hint().exact().or(content_length);
        Metered {
            inner,
            record: Some(record),
            recorder,
            started,
            bytes: 0,
            promised,
            complete: false,
        }
    }

    fn all_sent(&self) -> bool {
        self.promised == Some(self.bytes)
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
        if self.all_sent() {
            self.complete = true;
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures_util::stream;

    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(u64, bool)>>);

    impl Recorder for Seen {
        fn record(&self, _: &RequestRecord, bytes: u64, _: std::time::Duration, complete: bool) {
            self.0.lock().unwrap().push((bytes, complete));
        }
    }

    fn chunks(n: usize) -> Body {
        let items: Vec<Result<Bytes, std::io::Error>> =
            (0..n).map(|_| Ok(Bytes::from_static(b"abcd"))).collect();
        stream(stream::iter(items).boxed())
    }

    /// Reads `frames` frames and drops the body without polling its end, as hyper does once
    /// `Content-Length` bytes are out.
    async fn send(body: Body, content_length: Option<u64>, frames: usize) -> (u64, bool) {
        let seen = Arc::new(Seen::default());
        let mut m = Metered::new(
            body,
            content_length,
            RequestRecord::default(),
            seen.clone(),
            Instant::now(),
        );
        for _ in 0..frames {
            // The frame after the last is the end of the stream.
            if let Some(frame) = m.frame().await {
                frame.unwrap();
            }
        }
        drop(m);
        let got = seen.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "recorded once");
        got[0]
    }

    #[tokio::test]
    async fn complete_means_every_promised_byte_was_sent() {
        assert_eq!(send(chunks(3), Some(12), 3).await, (12, true));
        assert_eq!(send(chunks(3), Some(12), 2).await, (8, false));
        // No length promised: only the end of the stream makes it complete.
        assert_eq!(send(chunks(3), None, 3).await, (12, false));
        assert_eq!(send(chunks(3), None, 4).await, (12, true));
        // A HEAD answer: empty body, whatever the header says.
        assert_eq!(send(empty(), Some(1 << 20), 0).await, (0, true));
        assert_eq!(send(full("xy"), None, 1).await, (2, true));
    }
}
