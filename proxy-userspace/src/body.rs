//! Response bodies: a boxed body type, and a wrapper that keeps per-request guards (circuit
//! breaker and LB counters) alive until the body ends, enforces the route deadline while the
//! body streams, and reports completion to the access log.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The error type of bodies the proxy sends downstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every downstream response.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Called once when a response body ends (fully sent, failed or dropped).
pub trait OnEnd: Send + 'static {
    /// `bytes` sent; `complete` false when the body failed or was dropped early.
    fn on_end(self: Box<Self>, bytes: u64, complete: bool);
}

/// Wraps an upstream body with guards (`G`, whatever must live until the body ends: the
/// proxy's circuit-breaker counters), a deadline and an end callback.
pub struct Guarded<B, G> {
    inner: B,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    bytes: u64,
    on_end: Option<Box<dyn OnEnd>>,
    _guards: G,
}

impl<B, G> Guarded<B, G> {
    /// Wrap `inner`.
    pub fn new(
        inner: B,
        deadline: Option<Instant>,
        guards: G,
        on_end: Option<Box<dyn OnEnd>>,
    ) -> Self {
        Guarded {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            bytes: 0,
            on_end,
            _guards: guards,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(cb) = self.on_end.take() {
            cb.on_end(self.bytes, complete);
        }
    }
}

impl<B, G> Drop for Guarded<B, G> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Why a body stopped early, in words.
#[derive(Debug)]
pub struct BodyError(pub &'static str);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

/// A frame of a body hyper received (HTTP/2), with the proxy's error type.
pub fn poll_incoming(
    body: &mut hyper::body::Incoming,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Pin::new(body)
        .poll_frame(cx)
        .map_err(|e| Box::new(e) as BoxError)
}

impl<B, G> Body for Guarded<B, G>
where
    G: Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.finish(false);
            return Poll::Ready(Some(Err(Box::new(BodyError(
                "upstream request timeout while streaming the response",
            )))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                // hyper stops polling once the body reports its end (content-length reached).
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;
