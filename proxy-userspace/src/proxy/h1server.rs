//! The downstream HTTP/1.1 server: one loop per connection reads a request head, reads the
//! body whole (the pipeline buffers request bodies anyway, for retries and mirrors), runs the
//! request pipeline, and writes the response, the head and a ready first body chunk in one
//! write. h2c (prior knowledge) connections are handed to hyper's HTTP/2 server. An idle plain
//! TCP connection holds no read buffer: it waits for readability first.
//!
//! Envoy's limits and replies: a head over 60 KiB or over 100 fields gets 431, a malformed
//! request 400, both with `Connection: close`. Request bodies: `Content-Length`, or chunked;
//! both at once, or another transfer coding, is a 400 (request smuggling). `Expect:
//! 100-continue` is answered here before the body is read. Upgrades (WebSocket) hand the
//! connection to the pipeline after a 101.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::http as pipeline;
use super::{ConnInfo, Shared};
use crate::body::{BoxBody, BoxError};
use crate::http1::{
    Chunk, MAX_HEAD, MAX_HEADERS, READ_CHUNK, Step, chunk_step, header_map, record_spans,
};

mod write;

use write::{WriteEnds, write_error, write_response};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Body bytes up to this size are copied next to the head (or chunk header) and sent in
/// one write.
const COALESCE: usize = 16 * 1024;

/// A downstream transport. Plain TCP can wait for bytes without a buffer.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when the connection has bytes (or an error) to read.
    fn poll_idle(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// End the connection gracefully before it is dropped (TLS: close_notify).
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

impl Transport for tokio::net::TcpStream {
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }

    /// Closing the socket sends the FIN; a separate shutdown would be one more system call.
    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

/// Any byte stream, boxed.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection taken over after a `101 Switching Protocols`: bytes the client sent after
/// its request come first.
pub struct Upgraded {
    prefix: Bytes,
    io: Box<dyn Io>,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// In a request's extensions when it asks for an upgrade: resolves to the connection once
/// the response was a 101 and has been written.
/// (Shared so it can live in `http::Extensions`, which must be `Clone`.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The upgraded connection, or `None` when the response was not a 101 after all.
    pub async fn connection(self) -> Option<Upgraded> {
        let rx = self.0.lock().expect("upgrade lock").take()?;
        rx.await.ok()
    }
}

/// The body of a downstream request.
pub enum RequestBody {
    /// Read whole by this server (`None` once yielded).
    Buffered(Option<Bytes>),
    /// Over the buffering limit: yields [`BodyTooLarge`].
    TooLarge,
    /// From hyper's HTTP/2 server, with its idle timer.
    Hyper(hyper::body::Incoming, BodyIdle),
}

/// The request body exceeded what the proxy buffers.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body too large to buffer")
    }
}

impl std::error::Error for BodyTooLarge {}

/// An HTTP/2 request body that stalled for the body-idle timeout (408).
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body idle timeout")
    }
}

impl std::error::Error for BodyTimeout {}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Buffered(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::TooLarge => Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
            RequestBody::Hyper(b, idle) => match crate::body::poll_incoming(b, cx) {
                Poll::Pending if idle.poll_expired(cx) => {
                    Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                }
                Poll::Pending => Poll::Pending,
                ready => {
                    idle.sleep = None;
                    ready
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered(b) => b.is_none(),
            RequestBody::TooLarge => false,
            RequestBody::Hyper(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RequestBody::Buffered(None) => SizeHint::with_exact(0),
            RequestBody::TooLarge => SizeHint::default(),
            RequestBody::Hyper(b, _) => b.size_hint(),
        }
    }
}

/// A parsed request head.
struct Head {
    parts: http::request::Parts,
    body: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// How waiting for a request head ended without one.
enum NoHead {
    /// The connection is done (closed by the client, idle or shed): close it silently.
    Close,
    /// The client spoke HTTP/2 with prior knowledge.
    H2,
    /// A bad or too slow head: answer with this status and close.
    Refuse(StatusCode),
}

/// Where a connection is in its life, for the head's deadline and the first read.
struct ConnState {
    /// No request seen yet (the head timeout runs from the accept; h2c is possible).
    first: bool,
    /// The next idle wait may be speculative (`Accepted`: answered without asking the
    /// kernel); its read must then not wait holding a buffer.
    speculative: bool,
}

/// Serve one HTTP connection (HTTP/1.1, or h2c with prior knowledge).
pub async fn serve<I: Transport>(shared: Arc<Shared>, conn: Arc<ConnInfo>, mut io: I) {
    let mut buf = BytesMut::new();
    let mut st = ConnState {
        first: true,
        speculative: true,
    };
    let limits = shared.options.timeouts;
    // Descriptor pressure is signalled per thread; this connection stays on this one.
    let shed = shared.shed.local();
    loop {
        let head = match read_head(&mut io, &mut buf, &mut st, &limits, &shed).await {
            Ok(h) => h,
            Err(NoHead::Close) => return,
            Err(NoHead::H2) => {
                let io = Upgraded {
                    prefix: buf.freeze(),
                    io: Box::new(io),
                };
                return serve_h2(shared, conn, io).await;
            }
            Err(NoHead::Refuse(status)) => {
                pipeline::record_refused(&shared, &conn, status);
                let _ = write_error(&mut io, status).await;
                return;
            }
        };
        st.first = false;
        let method = head.parts.method.clone();
        let version = head.parts.version;
        let body = match read_body(&mut io, &mut buf, &head, limits.body_idle).await {
            Ok(b) => b,
            Err(Some(status)) => {
                pipeline::record_refused(&shared, &conn, status);
                let _ = write_error(&mut io, status).await;
                return;
            }
            Err(None) => return,
        };
        let too_large = matches!(body, RequestBody::TooLarge);
        let mut req = Request::from_parts(head.parts, body);
        let mut upgrade_tx = None;
        if head.upgrade {
            let (tx, rx) = tokio::sync::oneshot::channel();
            req.extensions_mut()
                .insert(OnUpgrade(Arc::new(std::sync::Mutex::new(Some(rx)))));
            upgrade_tx = Some(tx);
        }
        // Boxed: the pipeline's state is ~3.5 KB and exists only while a request is in flight.
        // Allocated first and written in place (`Box::pin(handle(..))` built it on the stack
        // and copied it into the box).
        let fut = Box::write(
            Box::new_uninit(),
            pipeline::handle(shared.clone(), conn.clone(), req),
        );
        let resp = Box::into_pin(fut).await;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let ends = WriteEnds {
            head_only: method == Method::HEAD,
            http10: version == Version::HTTP_10,
            keep_alive: head.keep_alive && !too_large,
            trailers: head.trailers,
        };
        let written = write_response(&mut io, resp, ends).await;
        if switching {
            // The pipeline takes the connection over (or, without an upgrade request, it ends).
            if let (Ok(_), Some(tx)) = (written, upgrade_tx) {
                let _ = tx.send(Upgraded {
                    prefix: buf.freeze(),
                    io: Box::new(io),
                });
            }
            return;
        }
        if !matches!(written, Ok(true)) {
            let _ = poll_fn(|cx| io.poll_finish(cx)).await;
            return;
        }
    }
}

/// Wait for a whole request head: idle without a buffer until the client sends something,
/// then read within the head timeout (from the accept for a new connection, from the first
/// byte for a kept-alive one); shed when descriptors run out.
async fn read_head<I: Transport>(
    io: &mut I,
    buf: &mut BytesMut,
    st: &mut ConnState,
    limits: &super::Timeouts,
    shed: &tokio::sync::Notify,
) -> Result<Head, NoHead> {
    let mut head_deadline = st
        .first
        .then(|| tokio::time::Instant::now() + limits.request_head);
    loop {
        if st.first && buf.starts_with(H2_PREFACE) {
            return Err(NoHead::H2);
        }
        let maybe_h2 = st.first && H2_PREFACE.starts_with(buf);
        if !buf.is_empty() && !maybe_h2 {
            match parse_request(buf) {
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(status) => return Err(NoHead::Refuse(status)),
            }
        }
        if buf.is_empty() {
            // Idle: no buffer is held until the client sends something. A new connection
            // gets the head timeout for its first byte, a kept-alive one the idle timeout;
            // either way a silent client is closed silently.
            *buf = BytesMut::new();
            let idle = tokio::time::timeout_at(
                head_deadline.unwrap_or_else(|| tokio::time::Instant::now() + limits.idle),
                poll_fn(|cx| io.poll_idle(cx)),
            );
            let since = tokio::time::Instant::now();
            if !matches!(shed_or(shed, since, idle).await, Some(Ok(Ok(())))) {
                return Err(NoHead::Close);
            }
            if std::mem::take(&mut st.speculative) {
                // Read once without waiting; if nothing is there yet, wait again (now for
                // real) without the buffer.
                match read_more(io, buf).now_or_never() {
                    Some(Ok(0) | Err(_)) => return Err(NoHead::Close),
                    Some(Ok(_)) => {}
                    None => *buf = BytesMut::new(),
                }
                continue;
            }
        }
        let deadline =
            *head_deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.request_head);
        let read = tokio::time::timeout_at(deadline, read_more(io, buf));
        match shed_or(shed, deadline - limits.request_head, read).await {
            None | Some(Ok(Ok(0) | Err(_))) => return Err(NoHead::Close),
            Some(Ok(Ok(_))) => {}
            // A head trickled in too slowly (slowloris): 408 and close.
            Some(Err(_)) => return Err(NoHead::Refuse(StatusCode::REQUEST_TIMEOUT)),
        }
    }
}

/// An HTTP/2 connection's streams: how many are being handled, and when the last one ended
/// (milliseconds since the connection started; `u64::MAX`: none has started yet).
struct H2Streams {
    open: std::sync::atomic::AtomicUsize,
    last_end: std::sync::atomic::AtomicU64,
    born: tokio::time::Instant,
}

/// Counts a stream as open while its request is handled.
struct StreamGuard(Arc<H2Streams>);

impl StreamGuard {
    fn new(s: &Arc<H2Streams>) -> StreamGuard {
        s.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StreamGuard(s.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = self.0.born.elapsed().as_millis() as u64;
        self.0
            .last_end
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// HTTP/2 (h2c with prior knowledge) through hyper's server, under the same time limits as
/// HTTP/1: a connection that opens no stream within the head timeout, or has none open for the
/// idle timeout, is shut down gracefully (GOAWAY; streams in flight finish); a request body
/// that stalls for the body-idle timeout fails its stream.
async fn serve_h2(shared: Arc<Shared>, conn: Arc<ConnInfo>, io: Upgraded) {
    let limits = shared.options.timeouts;
    let streams = Arc::new(H2Streams {
        open: Default::default(),
        last_end: std::sync::atomic::AtomicU64::new(u64::MAX),
        born: tokio::time::Instant::now(),
    });
    let counted = streams.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let guard = StreamGuard::new(&counted);
        let req = req.map(|b| RequestBody::Hyper(b, BodyIdle::new(limits.body_idle)));
        let fut = Box::into_pin(Box::write(
            Box::new_uninit(),
            pipeline::handle(shared.clone(), conn.clone(), req),
        ));
        async move {
            let resp = fut.await;
            drop(guard);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        // Envoy's defaults for a proxy: bounded streams and header lists, rapid resets capped
        // by hyper's own defaults (CVE-2023-44487).
        .max_concurrent_streams(1024)
        .max_header_list_size(MAX_HEAD as u32);
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    let mut wake = streams.born + limits.request_head;
    loop {
        tokio::select! {
            _ = served.as_mut() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        if streams.open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            wake = now + limits.idle;
            continue;
        }
        let idle_since = match streams.last_end.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => streams.born,
            ms => streams.born + std::time::Duration::from_millis(ms),
        };
        let limit = match streams.last_end.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => limits.request_head,
            _ => limits.idle,
        };
        if now < idle_since + limit {
            wake = idle_since + limit;
            continue;
        }
        // GOAWAY; the connection ends once the client has read it (bounded).
        served.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), served).await;
        return;
    }
}

/// The body-idle timer of an HTTP/2 request body: armed while waiting for a frame, reset by
/// each one.
pub struct BodyIdle {
    limit: std::time::Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl BodyIdle {
    fn new(limit: std::time::Duration) -> BodyIdle {
        BodyIdle { limit, sleep: None }
    }

    /// Ready when the body has been silent for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// `wait`, unless the proxy runs out of descriptors meanwhile and the wait for this request
/// head (since `started`) has lasted longer than [`super::SHED_GRACE`]: then `None`, and the
/// connection closes. A head trickled byte by byte counts from its first byte.
async fn shed_or<T>(
    shed: &tokio::sync::Notify,
    started: tokio::time::Instant,
    wait: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut wait = std::pin::pin!(wait);
    loop {
        tokio::select! {
            biased;
            r = &mut wait => return Some(r),
            () = shed.notified() => {
                if started.elapsed() >= super::SHED_GRACE {
                    return None;
                }
            }
        }
    }
}

/// Read more bytes into `buf`; 0 at end of stream.
async fn read_more<I: Transport>(io: &mut I, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)).await
}

/// Parse a request head from the front of `buf` (consumed when complete); `None`: need more.
fn parse_request(buf: &mut BytesMut) -> Result<Option<Head>, StatusCode> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let minor = req.version.unwrap_or(1);
    let path = req.path.unwrap_or("/");
    let path_span = {
        let start = path.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + path.len()
    };
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = record_spans(buf, req.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_span)).map_err(|_| StatusCode::BAD_REQUEST)?;
    let (headers, fields) =
        header_map(&head, &spans[..count]).map_err(|_| StatusCode::BAD_REQUEST)?;
    // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host, any request at most one; an
    // absolute-form target's authority is the one routed on, so a Host that differs is
    // refused rather than left for the next hop to read differently.
    if fields.hosts > 1 || (minor == 1 && fields.hosts == 0) {
        return Err(StatusCode::BAD_REQUEST);
    }
    if let (Some(a), Some(h)) = (uri.authority(), headers.get(header::HOST))
        && !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes())
    {
        return Err(StatusCode::BAD_REQUEST);
    }
    let body = match (fields.chunked, fields.content_length) {
        // Chunked alone, once, in HTTP/1.1. Anything else with Transfer-Encoding is a 400:
        // both framings (request smuggling), a coding the proxy would have to drop (`gzip,
        // chunked`), repeats (`chunked, chunked`), and HTTP/1.0 (RFC 9112 §6.1: faulty
        // framing).
        (Some(true), None) if fields.transfer_codings == 1 && minor == 1 => Framing::Chunked,
        (Some(_), _) => return Err(StatusCode::BAD_REQUEST),
        (None, Some(len)) => Framing::Length(len.map_err(|_| StatusCode::BAD_REQUEST)?),
        (None, None) => Framing::Length(0),
    };
    let keep_alive = fields.persistent(minor);
    let expect_continue = minor == 1 && fields.expect_continue;
    let upgrade = minor == 1 && fields.upgrade && fields.upgrade_token;
    let trailers = fields.te_trailers;
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    }))
}

/// Fuzzing entry (`nodeproxy::fuzz::request_head`): parse pipelined request heads from
/// `data` as the server does, until one is incomplete or refused.
pub(crate) fn fuzz_request_heads(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(head)) = parse_request(&mut buf) {
        // What the server does next with a head: the body framing decides how much to skip.
        if let Framing::Length(n) = head.body {
            let n = (n as usize).min(buf.len());
            let _ = buf.split_to(n);
        }
    }
}

/// Read the request body whole, up to the pipeline's buffering limit. `Err(Some(status))`: the
/// body was malformed (to be answered with `status`); `Err(None)`: the connection failed.
async fn read_body<I: Transport>(
    io: &mut I,
    buf: &mut BytesMut,
    head: &Head,
    idle: std::time::Duration,
) -> Result<RequestBody, Option<StatusCode>> {
    const LIMIT: u64 = pipeline::MAX_BUFFERED_BODY as u64;
    // Each read must bring bytes within `idle`: 408 and close otherwise.
    let more =
        async |io: &mut I, buf: &mut BytesMut| match tokio::time::timeout(idle, read_more(io, buf))
            .await
        {
            Ok(Ok(0) | Err(_)) => Err(None),
            Ok(Ok(_)) => Ok(()),
            Err(_) => Err(Some(StatusCode::REQUEST_TIMEOUT)),
        };
    let continue_first = async |io: &mut I| {
        if head.expect_continue {
            io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| None)?;
        }
        Ok::<(), Option<StatusCode>>(())
    };
    match head.body {
        Framing::Length(0) => Ok(RequestBody::Buffered(None)),
        Framing::Length(n) if n > LIMIT => Ok(RequestBody::TooLarge),
        Framing::Length(n) => {
            continue_first(io).await?;
            // Memory follows the bytes that arrive, not the length the client declared.
            let n = n as usize;
            while buf.len() < n {
                more(io, buf).await?;
            }
            Ok(RequestBody::Buffered(Some(buf.split_to(n).freeze())))
        }
        Framing::Chunked => {
            continue_first(io).await?;
            let mut body = BytesMut::new();
            let mut state = Chunk::Size;
            loop {
                if !buf.is_empty() {
                    match chunk_step(buf, state) {
                        Ok(Step::Data(data, next)) => {
                            if (body.len() + data.len()) as u64 > LIMIT {
                                return Ok(RequestBody::TooLarge);
                            }
                            body.extend_from_slice(&data);
                            state = next;
                            continue;
                        }
                        Ok(Step::Next(next)) => {
                            state = next;
                            continue;
                        }
                        // Request trailers are not forwarded.
                        Ok(Step::End(_)) => return Ok(RequestBody::Buffered(Some(body.freeze()))),
                        Ok(Step::More) => {}
                        Err(_) => return Err(Some(StatusCode::BAD_REQUEST)),
                    }
                }
                more(io, buf).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, StatusCode> {
        parse_request(&mut BytesMut::from(raw))
    }

    #[test]
    fn request_heads() {
        let h = parse("GET /a?b HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.parts.uri.path_and_query().unwrap().as_str(), "/a?b");
        assert_eq!(h.parts.headers["host"], "x");
        assert!(h.keep_alive && h.trailers && !h.upgrade && !h.expect_continue);
        assert_eq!(h.body, Framing::Length(0));
        let h = parse("POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive && !h.expect_continue);
        assert_eq!(h.body, Framing::Length(3));
        let h = parse(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.upgrade);
        let h =
            parse("PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-Continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body, Framing::Chunked);
        assert!(h.expect_continue);
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn bad_requests() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET http://y/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(StatusCode::BAD_REQUEST), "{raw:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            parse(&big).err(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }
}
