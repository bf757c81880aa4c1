//! The proxy's HTTP/1.1 client connection: the request task writes the request and reads the
//! response head on the upstream socket itself, and the response body reads the rest. There is
//! no connection task and no channel between the request and its connection (hyper's client
//! dispatch costs a task wake-up, an mpsc and a oneshot per request), and an idle connection
//! holds only its socket and read buffer. Responses are framed as RFC 9112 §6.3 says:
//! no body for HEAD, 1xx, 204 and 304; chunked; content-length; else until the connection
//! closes. A connection goes back to its endpoint's idle list as soon as its response ends,
//! when both sides allow keep-alive and nothing unread is left.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{ClusterState, EndpointState};
use crate::proxy::body::BoxError;

/// Largest response head accepted (Envoy's default `max_request_headers_kb` is 60).
const MAX_HEAD: usize = 60 * 1024;
/// Most response headers accepted (Envoy's default `max_headers_count`).
const MAX_HEADERS: usize = 100;
/// Read size.
const READ_CHUNK: usize = 8 * 1024;
/// Request bodies up to this size are written with the head in one `write`.
const INLINE_BODY: usize = 16 * 1024;

/// One upstream HTTP/1.1 connection. Counted in its cluster's `maxConnections` from open to
/// drop (dropping closes it).
#[derive(Debug)]
pub struct H1Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Requests sent on it.
    pub(crate) used: u32,
    /// When it was opened (`maxConnectionDuration`).
    pub(crate) created: Instant,
    /// The runtime thread whose I/O driver the socket is registered with.
    pub(crate) owner: std::thread::ThreadId,
    // Weak: idle connections live in their endpoint's pool.
    cluster: Weak<ClusterState>,
    ep: Weak<EndpointState>,
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        if let Some(ep) = self.ep.upgrade() {
            ep.active_connections.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = self.cluster.upgrade() {
            c.connections.fetch_sub(1, Ordering::AcqRel);
            c.conn_released.notify_waiters();
        }
    }
}

/// The parts of a request the connection writes.
pub struct RequestHead<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    /// Host.
    pub authority: &'a str,
    /// Headers (hop-by-hop ones already removed).
    pub headers: &'a HeaderMap,
    /// `x-envoy-attempt-count`.
    pub attempt: u32,
}

/// Why an exchange failed before the response head arrived (Envoy's reset reasons).
#[derive(Debug)]
pub enum Reset {
    /// The connection closed or failed (`connection termination`, 503 UC).
    Terminated,
    /// The response was not valid HTTP/1.1 (`protocol error`, 502 UPE); the detail is logged.
    Protocol(String),
}

fn termination() -> Reset {
    Reset::Terminated
}

impl H1Conn {
    /// A new connection on `io`, already counted in `cluster` and `ep` by the caller.
    pub fn new(io: TcpStream, cluster: &Arc<ClusterState>, ep: &Arc<EndpointState>) -> H1Conn {
        H1Conn {
            io,
            buf: BytesMut::new(),
            used: 0,
            created: Instant::now(),
            owner: std::thread::current().id(),
            cluster: Arc::downgrade(cluster),
            ep: Arc::downgrade(ep),
        }
    }

    /// Its cluster, while it exists.
    pub(crate) fn cluster(&self) -> Option<Arc<ClusterState>> {
        self.cluster.upgrade()
    }

    /// Its endpoint, while it exists.
    pub(crate) fn endpoint(&self) -> Option<Arc<EndpointState>> {
        self.ep.upgrade()
    }

    /// Can this idle connection carry another request: not closed by the peer, nothing
    /// unexpected sent. Costs no system call unless the socket became readable while idle.
    pub fn usable_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Send one request and read the response head. The body reads the rest and returns the
    /// connection to its pool when it ends.
    pub async fn send(
        mut self,
        head: &RequestHead<'_>,
        body: &Bytes,
    ) -> Result<Response<H1Body>, Reset> {
        self.used += 1;
        let mut out = Vec::with_capacity(256 + head.headers.len() * 48 + inline_len(body));
        encode_head(&mut out, head, body.len());
        if body.len() <= INLINE_BODY {
            out.extend_from_slice(body);
            self.io.write_all(&out).await.map_err(|_| termination())?;
        } else {
            self.io.write_all(&out).await.map_err(|_| termination())?;
            self.io.write_all(body).await.map_err(|_| termination())?;
        }
        let head_only = head.method == Method::HEAD;
        loop {
            match parse_head(&mut self.buf, head_only)? {
                Some(Parsed::Informational) => continue,
                Some(Parsed::Head(parts, framing, keep_alive)) => {
                    let mut body = H1Body {
                        conn: Some(self),
                        framing,
                        keep_alive,
                        done: false,
                    };
                    if matches!(body.framing, Framing::Length(0)) {
                        body.finish();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                None => {
                    let n = std::future::poll_fn(|cx| self.poll_fill(cx))
                        .await
                        .map_err(|_| termination())?;
                    if n == 0 {
                        return Err(termination());
                    }
                }
            }
        }
    }

    /// Read more into the buffer; 0 at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

fn inline_len(body: &Bytes) -> usize {
    if body.len() <= INLINE_BODY {
        body.len()
    } else {
        0
    }
}

/// Headers the connection writes itself or that must not go upstream: `expect` (the body
/// is already here, so the proxy answers 100-continue downstream as Envoy does).
fn skipped(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::EXPECT
        || name.as_str() == "x-envoy-attempt-count"
}

/// A request-target the head can carry (visible ASCII, starting with `/` or `*`).
fn valid_target(path: &str) -> bool {
    path.starts_with(['/', '*']) && path.bytes().all(|b| (0x21..0x7f).contains(&b))
}

fn encode_head(out: &mut Vec<u8>, head: &RequestHead<'_>, body_len: usize) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    if valid_target(head.path) {
        out.extend_from_slice(head.path.as_bytes());
    } else {
        out.push(b'/');
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if HeaderValue::from_str(head.authority).is_ok() {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(head.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.headers {
        if skipped(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"x-envoy-attempt-count: ");
    out.extend_from_slice(n.format(head.attempt).as_bytes());
    out.extend_from_slice(b"\r\n");
    if body_len > 0 || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

enum Parsed {
    /// A 1xx response other than 101: skipped.
    Informational,
    Head(http::response::Parts, Framing, bool),
}

fn protocol(what: impl std::fmt::Display) -> Reset {
    Reset::Protocol(what.to_string())
}

/// Parse a response head from the front of `buf` (consumed when complete); `None`: need more.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Parsed>, Reset> {
    // Header slots are left uninitialised (initialising 100 of them cost more than parsing).
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res, buf, &mut slots,
    ) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Complete(_)) => return Err(protocol("response headers too large")),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(protocol("response headers too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(e)),
    };
    let code = res.code.unwrap_or(0);
    let version = res.version.unwrap_or(1);
    // Offsets of names and values (the head is below MAX_HEAD, so u16 holds them), kept on
    // the stack while the buffer is borrowed.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = res.headers.len();
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (
            n as u16,
            (n + h.name.len()) as u16,
            v as u16,
            (v + h.value.len()) as u16,
        );
    }
    let head = buf.split_to(len).freeze();
    if (100..200).contains(&code) && code != 101 {
        return Ok(Some(Parsed::Informational));
    }
    let status = StatusCode::from_u16(code).map_err(protocol)?;
    let mut map = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(protocol)?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(protocol)?;
        map.append(name, value);
    }
    let mut keep_alive = version == 1;
    for v in map.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                keep_alive = true;
            }
        }
    }
    let framing = if head_only
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        Framing::Length(0)
    } else if let Some(te) = last_token(&map, header::TRANSFER_ENCODING) {
        if te.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if map.contains_key(header::CONTENT_LENGTH) {
        Framing::Length(content_length(&map)?)
    } else {
        keep_alive = false;
        Framing::Close
    };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    parts.headers = map;
    Ok(Some(Parsed::Head(parts, framing, keep_alive)))
}

/// The last comma-separated token of the last `name` field.
fn last_token(map: &HeaderMap, name: HeaderName) -> Option<&[u8]> {
    map.get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .map(|t| t.trim_ascii())
}

/// Content-Length: every value (and comma-separated element) must be the same number.
fn content_length(map: &HeaderMap) -> Result<u64, Reset> {
    let mut len = None;
    for v in map.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| protocol("invalid content-length"))?;
            if len.is_some_and(|l| l != n) {
                return Err(protocol("conflicting content-length"));
            }
            len = Some(n);
        }
    }
    len.ok_or_else(|| protocol("invalid content-length"))
}

/// An upstream response body read straight from its connection.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<H1Conn>,
    framing: Framing,
    keep_alive: bool,
    done: bool,
}

#[derive(Debug)]
struct BodyError(&'static str);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

impl H1Body {
    /// The body ended: return the connection to its pool when it can carry another request.
    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            super::pool::recycle(conn);
        }
    }

    fn fail(&mut self, what: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(BodyError(what)))))
    }

    /// Up to `max` buffered bytes as a frame.
    fn take(conn: &mut H1Conn, max: u64) -> Bytes {
        let n = (conn.buf.len() as u64).min(max) as usize;
        conn.buf.split_to(n).freeze()
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Work on what is buffered first.
            match this.framing {
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(rem) if !conn.buf.is_empty() => {
                    let data = H1Body::take(conn, rem);
                    let rem = rem - data.len() as u64;
                    this.framing = Framing::Length(rem);
                    if rem == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !conn.buf.is_empty() => {
                    let data = H1Body::take(conn, u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) if !conn.buf.is_empty() => match chunk_step(conn, state) {
                    Ok(Step::Data(data, next)) => {
                        this.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::Next(next)) => {
                        this.framing = Framing::Chunked(next);
                        continue;
                    }
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        return match trailers {
                            Some(t) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                            None => Poll::Ready(None),
                        };
                    }
                    Ok(Step::More) => {}
                    Err(what) => return this.fail(what),
                },
                _ => {}
            }
            let n = match ready!(conn.poll_fill(cx)) {
                Ok(n) => n,
                Err(_) => return this.fail("upstream connection reset while reading the body"),
            };
            if n == 0 {
                if this.framing == Framing::Close {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                return this.fail("upstream closed the connection before the body ended");
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) if !self.done => SizeHint::with_exact(n),
            _ if self.done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    /// Chunk data, then this state.
    Data(Bytes, Chunk),
    /// Moved to this state without data.
    Next(Chunk),
    /// Last chunk and trailers read.
    End(Option<HeaderMap>),
    /// Need more bytes.
    More,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

/// One step of chunked decoding over the buffered bytes.
fn chunk_step(conn: &mut H1Conn, state: Chunk) -> Result<Step, &'static str> {
    let buf = &mut conn.buf;
    match state {
        Chunk::Size => {
            let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                return if buf.len() > MAX_LINE {
                    Err("chunk size line too long")
                } else {
                    Ok(Step::More)
                };
            };
            let line = buf.split_to(eol + 1);
            let digits = line[..]
                .split(|&b| b == b';' || b == b'\r' || b == b'\n')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            let size = std::str::from_utf8(digits)
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or("invalid chunk size")?;
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(rem) => {
            let data = H1Body::take(conn, rem);
            let rem = rem - data.len() as u64;
            Ok(Step::Data(
                data,
                if rem == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rem)
                },
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 && buf.first() != Some(&b'\n') {
                return Ok(Step::More);
            }
            if buf.starts_with(b"\r\n") {
                let _ = buf.split_to(2);
            } else if buf.starts_with(b"\n") {
                let _ = buf.split_to(1);
            } else {
                return Err("missing CRLF after chunk data");
            }
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            // Trailer section: header lines up to an empty line.
            let mut map = HeaderMap::new();
            let mut at = 0;
            loop {
                let Some(eol) = buf[at..].iter().position(|&b| b == b'\n') else {
                    return if buf.len() > MAX_HEAD {
                        Err("trailers too large")
                    } else {
                        Ok(Step::More)
                    };
                };
                let line = buf[at..at + eol].trim_ascii_end();
                at += eol + 1;
                if line.is_empty() {
                    break;
                }
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    return Err("invalid trailer");
                };
                let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| "invalid trailer")?;
                let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
                    .map_err(|_| "invalid trailer")?;
                map.append(name, value);
            }
            let _ = buf.split_to(at);
            Ok(Step::End((!map.is_empty()).then_some(map)))
        }
    }
}

/// The body of an upstream response: HTTP/1.1 read by the proxy, or HTTP/2 from hyper.
pub enum ResponseBody {
    /// HTTP/1.1.
    H1(H1Body),
    /// HTTP/2 (hyper's client).
    H2(hyper::body::Incoming),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::H1(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::H1(b) => b.is_end_stream(),
            ResponseBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::H1(b) => b.size_hint(),
            ResponseBody::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, head_only: bool) -> Result<Option<Parsed>, Reset> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, head_only)
    }

    fn head(raw: &str) -> (http::response::Parts, Framing, bool) {
        match parse(raw, false) {
            Ok(Some(Parsed::Head(p, f, k))) => (p, f, k),
            Ok(Some(Parsed::Informational)) => panic!("informational"),
            Ok(None) => panic!("partial"),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (p, f, k) = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\n");
        assert_eq!((p.status, f, k), (StatusCode::OK, Framing::Length(5), true));
        assert_eq!(p.headers["x-a"], "b");
        let (_, f, k) = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert_eq!((f, k), (Framing::Chunked(Chunk::Size), true));
        let (_, f, k) = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((f, k), (Framing::Close, false));
        let (_, f, k) = head("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n");
        assert_eq!((f, k), (Framing::Length(0), true));
        let (_, _, k) = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        assert!(!k);
        let (p, _, k) = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((p.version, k), (Version::HTTP_10, false));
        let (_, _, k) =
            head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n");
        assert!(k);
        match parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true) {
            Ok(Some(Parsed::Head(_, f, _))) => assert_eq!(f, Framing::Length(0)),
            _ => panic!("HEAD response"),
        }
        assert!(matches!(
            parse("HTTP/1.1 100 Continue\r\n\r\n", false),
            Ok(Some(Parsed::Informational))
        ));
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(None)
        ));
    }

    #[test]
    fn bad_heads_are_protocol_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1,2\r\n\r\n",
            "HTTTP/1.1 200 OK\r\n\r\n",
        ] {
            let e = parse(raw, false).err().expect(raw);
            assert!(matches!(e, Reset::Protocol(_)), "{raw}: {e:?}");
        }
        let (_, f, _) = head("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n");
        assert_eq!(f, Framing::Length(5));
        let big = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(parse(&big, false).is_err());
    }

    #[test]
    fn request_head_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert("x-b3", HeaderValue::from_static("1"));
        headers.insert(header::HOST, HeaderValue::from_static("ignored"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let head = RequestHead {
            method: &Method::POST,
            path: "/a?b=c",
            authority: "svc.ns:8080",
            headers: &headers,
            attempt: 2,
        };
        let mut out = Vec::new();
        encode_head(&mut out, &head, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=c HTTP/1.1\r\nhost: svc.ns:8080\r\nx-b3: 1\r\n\
             x-envoy-attempt-count: 2\r\ncontent-length: 3\r\n\r\n"
        );
        let head = RequestHead {
            method: &Method::GET,
            path: "/bad path",
            authority: "a",
            headers: &HeaderMap::new(),
            attempt: 1,
        };
        let mut out = Vec::new();
        encode_head(&mut out, &head, 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: a\r\nx-envoy-attempt-count: 1\r\n\r\n"
        );
    }
}
