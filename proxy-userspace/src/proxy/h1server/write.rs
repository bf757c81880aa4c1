//! Writing HTTP/1.1 responses: the head in one buffer with the framing the body needs
//! (length, chunked, or close-delimited), small body frames coalesced with it.

use super::*;

/// A local error reply that closes the connection.
pub(super) async fn write_error<I: Transport>(
    io: &mut I,
    status: StatusCode,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128);
    status_line(&mut out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    date_header(&mut out);
    out.extend_from_slice(b"\r\n");
    io.write_all(&out).await?;
    io.flush().await?;
    io.shutdown().await
}

pub(super) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: <IMF-fixdate>`, formatted once a second per thread.
pub(super) fn date_header(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// How a response ends on this connection.
pub(super) struct WriteEnds {
    pub(super) head_only: bool,
    pub(super) http10: bool,
    pub(super) keep_alive: bool,
    pub(super) trailers: bool,
}

enum Out {
    Length(u64),
    Chunked,
    Close,
    None,
}

/// Write a response. `Ok(true)`: the connection can carry another request.
pub(super) async fn write_response<I: Transport>(
    io: &mut I,
    resp: Response<BoxBody>,
    ends: WriteEnds,
) -> std::io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let (mut out, framing, mut keep_alive) = encode_head(&parts, body.size_hint(), &ends);
    let mut remaining = match framing {
        Out::Length(n) => n,
        Out::None => {
            io.write_all(&out).await?;
            io.flush().await?;
            return Ok(keep_alive);
        }
        _ => u64::MAX,
    };
    let chunked = matches!(framing, Out::Chunked);
    loop {
        let frame = match next_frame(io, &mut out, &mut body).await? {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                // The body failed (upstream reset, route timeout): HTTP/1 can only close.
                if !out.is_empty() {
                    io.write_all(&out).await?;
                }
                io.flush().await?;
                return Ok(false);
            }
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                } else if remaining != u64::MAX && remaining > 0 {
                    // Shorter than declared: the client must see the connection end.
                    keep_alive = false;
                }
                break;
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                let framing = Staging {
                    chunked,
                    remaining: &mut remaining,
                    keep_alive: &mut keep_alive,
                };
                if let Some(large) = stage_data(&mut out, data, framing) {
                    io.write_all(&out).await?;
                    out.clear();
                    io.write_all(&large).await?;
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                } else if remaining == 0 {
                    break;
                }
            }
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    // The last chunk, then the trailers when the client takes them.
                    out.extend_from_slice(b"0\r\n");
                    if ends.trailers {
                        encode_headers(&mut out, &trailers);
                    }
                    out.extend_from_slice(b"\r\n");
                    io.write_all(&out).await?;
                    io.flush().await?;
                    return Ok(keep_alive);
                }
            }
        }
    }
    if !out.is_empty() {
        io.write_all(&out).await?;
    }
    io.flush().await?;
    Ok(keep_alive && !matches!(framing, Out::Close))
}

/// The body's next frame: one ready now joins what is pending; otherwise what is pending is
/// sent before waiting (a streaming response's head must not wait for its body).
async fn next_frame<I: Transport>(
    io: &mut I,
    out: &mut Vec<u8>,
    body: &mut BoxBody,
) -> std::io::Result<Option<Result<Frame<Bytes>, BoxError>>> {
    if let Some(f) = body.frame().now_or_never() {
        return Ok(f);
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        io.flush().await?;
        out.clear();
    }
    Ok(body.frame().await)
}

/// The framing state a data frame is staged under.
struct Staging<'a> {
    chunked: bool,
    remaining: &'a mut u64,
    keep_alive: &'a mut bool,
}

/// Stage a data frame after the pending bytes: a small one is copied in, a large one is
/// returned to be written on its own after them (a chunk's size line is staged either way).
/// Data past the declared length is cut, and the connection will close.
fn stage_data(out: &mut Vec<u8>, mut data: Bytes, f: Staging<'_>) -> Option<Bytes> {
    if f.chunked {
        use std::io::Write as _;
        let _ = write!(out, "{:x}\r\n", data.len());
    } else {
        if data.len() as u64 > *f.remaining {
            // More than the declared length: send what was declared, then close.
            data.truncate(*f.remaining as usize);
            *f.keep_alive = false;
        }
        *f.remaining -= data.len() as u64;
    }
    if data.len() <= COALESCE {
        out.extend_from_slice(&data);
        return None;
    }
    Some(data)
}

/// The response head: status line and fields (hop-by-hop framing fields are this hop's to
/// write), the framing the body gets, and whether the connection stays open.
fn encode_head(
    parts: &http::response::Parts,
    size: SizeHint,
    ends: &WriteEnds,
) -> (Vec<u8>, Out, bool) {
    let status = parts.status;
    // One pass over the fields: encode them and note what framing needs.
    let mut out = Vec::with_capacity(256 + parts.headers.len() * 40);
    status_line(&mut out, status);
    let mut fields = crate::http1::Fields::default();
    for (name, value) in &parts.headers {
        fields.see(name, value.as_bytes());
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH
        {
            continue;
        }
        encode_header(&mut out, name.as_str(), value.as_bytes());
    }
    let mut keep_alive = ends.keep_alive && fields.persistent(1);
    let no_body = ends.head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = fields.content_length.and_then(Result::ok);
    let length = |out: &mut Vec<u8>, n: u64| {
        encode_header(
            out,
            "content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        )
    };
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        Out::None
    } else if no_body {
        // A HEAD (or 304) answer keeps the length the body would have had; 1xx and 204
        // must not carry one.
        if let Some(n) = declared.filter(|_| ends.head_only || status == StatusCode::NOT_MODIFIED) {
            length(&mut out, n);
        }
        Out::None
    } else if let Some(n) = declared.or_else(|| size.exact()) {
        length(&mut out, n);
        Out::Length(n)
    } else if !ends.http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    } else {
        // Unknown length to an HTTP/1.0 client (or an unparsable upstream Content-Length,
        // which is dropped): delimited by the close.
        keep_alive = false;
        Out::Close
    };
    if !fields.date {
        date_header(&mut out);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if ends.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, framing, keep_alive)
}

pub(super) fn encode_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        encode_header(out, name.as_str(), value.as_bytes());
    }
}

pub(super) fn encode_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
