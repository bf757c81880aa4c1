//! The proxy's HTTP/1.1 client connection: the request task writes the request and reads the
//! response head on the upstream socket itself, and the response body reads the rest. There is
//! no connection task and no channel between the request and its connection (hyper's client
//! dispatch costs a task wake-up, an mpsc and a oneshot per request), and an idle connection
//! holds only its socket and read buffer. Responses are framed as RFC 9112 §6.3 says:
//! no body for HEAD, 1xx, 204 and 304; chunked; content-length; else until the connection
//! closes. A connection goes back to its endpoint's idle list as soon as its response ends,
//! when both sides allow keep-alive and nothing unread is left.

use std::pin::Pin;
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
use crate::body::{BodyError, BoxError, poll_incoming};

use crate::http1::{
    Chunk, MAX_HEAD, MAX_HEADERS, READ_CHUNK, Step, chunk_step, header_map, record_spans,
};
/// Request bodies up to this size are written with the head in one `write`.
const INLINE_BODY: usize = 16 * 1024;

/// One upstream HTTP/1.1 connection. Counted in its cluster's `maxConnections` from open to
/// drop (dropping closes it).
#[derive(Debug)]
pub struct H1Conn {
    io: UpstreamIo,
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
        super::pool::release_connection(self.cluster().as_deref(), self.endpoint().as_deref());
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
    pub fn new(io: UpstreamIo, cluster: &Arc<ClusterState>, ep: &Arc<EndpointState>) -> H1Conn {
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
        let would_block = |r: std::io::Result<usize>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        match &self.io {
            UpstreamIo::Tcp(tcp) => would_block(tcp.try_read(&mut [0u8; 1])),
            // Peeked, not read: a byte taken from under TLS would break its record stream.
            UpstreamIo::Tls(tls) => {
                let tcp = tls.get_ref().0;
                would_block(tcp.try_io(tokio::io::Interest::READABLE, || {
                    socket2::SockRef::from(tcp).peek(&mut [std::mem::MaybeUninit::uninit(); 1])
                }))
            }
        }
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
            let parsed = if self.buf.is_empty() {
                None
            } else {
                parse_head(&mut self.buf, head_only)?
            };
            match parsed {
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
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
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
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = record_spans(buf, res.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    if (100..200).contains(&code) && code != 101 {
        return Ok(Some(Parsed::Informational));
    }
    let status = StatusCode::from_u16(code).map_err(protocol)?;
    let (map, fields) = header_map(&head, &spans[..count]).map_err(protocol)?;
    // Both framings at once is a smuggling shape; Envoy's codec refuses it too.
    if fields.chunked.is_some() && fields.content_length.is_some() {
        return Err(protocol("both content-length and transfer-encoding"));
    }
    let mut keep_alive = fields.persistent(version);
    let framing = if head_only
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        Framing::Length(0)
    } else if let Some(chunked) = fields.chunked {
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if let Some(len) = fields.content_length {
        Framing::Length(len.map_err(protocol)?)
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

/// Fuzzing entry (`nodeproxy::fuzz::response_head`): parse response heads from `data` as the
/// client does (skipping 1xx), and decode a chunked body after one.
pub(crate) fn fuzz_response(data: &[u8], head_only: bool) {
    let mut buf = BytesMut::from(data);
    loop {
        match parse_head(&mut buf, head_only) {
            Ok(Some(Parsed::Informational)) => continue,
            Ok(Some(Parsed::Head(_, Framing::Chunked(state), _))) => {
                crate::http1::fuzz_chunked_from(&mut buf, state);
                return;
            }
            _ => return,
        }
    }
}

/// An upstream response body read straight from its connection.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<H1Conn>,
    framing: Framing,
    keep_alive: bool,
    done: bool,
}

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
                    let data = crate::http1::take(&mut conn.buf, rem);
                    let rem = rem - data.len() as u64;
                    this.framing = Framing::Length(rem);
                    if rem == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !conn.buf.is_empty() => {
                    let data = crate::http1::take(&mut conn.buf, u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) if !conn.buf.is_empty() => {
                    match chunk_step(&mut conn.buf, state) {
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
                    }
                }
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
            ResponseBody::H2(b) => poll_incoming(b, cx),
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
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
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

/// An upstream connection's transport: TCP, or TLS over it (`DestinationRule` `tls`).
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plain text.
    Tcp(TcpStream),
    /// TLS originated by the proxy.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
