//! HTTP/1.1 wire pieces shared by the proxy's client (`upstream/h1.rs`) and server
//! (`proxy/h1server.rs`): header fields from a parsed head without copying their bytes,
//! message framing fields, `Connection` tokens and chunked transfer decoding (RFC 9112).

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Largest message head accepted (Envoy's default `max_request_headers_kb` is 60).
pub const MAX_HEAD: usize = 60 * 1024;
/// Most header fields accepted (Envoy's default `max_headers_count`).
pub const MAX_HEADERS: usize = 100;
/// Read size.
pub const READ_CHUNK: usize = 8 * 1024;

/// Offsets of header names and values in a head (below [`MAX_HEAD`], so `u16` holds them).
pub type Spans = [(u16, u16, u16, u16); MAX_HEADERS];

/// Record where each parsed header's name and value lie in `buf` (which `headers` borrow).
pub fn record_spans(buf: &[u8], headers: &[httparse::Header<'_>], spans: &mut Spans) -> usize {
    let base = buf.as_ptr() as usize;
    for (span, h) in spans.iter_mut().zip(headers) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (
            n as u16,
            (n + h.name.len()) as u16,
            v as u16,
            (v + h.value.len()) as u16,
        );
    }
    headers.len()
}

/// What framing and connection management need from a head's fields, gathered while the
/// header map is built (one pass instead of a lookup per field).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Connection: upgrade`.
    pub upgrade_token: bool,
    /// An `Upgrade` field.
    pub upgrade: bool,
    /// `Transfer-Encoding` present: whether its last coding is `chunked`.
    pub chunked: Option<bool>,
    /// How many transfer codings all `Transfer-Encoding` fields list together (an empty
    /// list element counts: `chunked,` is two).
    pub transfer_codings: u8,
    /// How many `Host` fields.
    pub hosts: u8,
    /// `Content-Length`: absent, one consistent value, or invalid/conflicting.
    pub content_length: Option<Result<u64, &'static str>>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `TE: trailers`.
    pub te_trailers: bool,
    /// A `Date` field.
    pub date: bool,
}

impl Fields {
    /// Whether a message of HTTP/1.`minor` leaves the connection open (1.1: unless
    /// `Connection: close`; 1.0: only with `Connection: keep-alive`).
    pub fn persistent(&self, minor: u8) -> bool {
        !self.close && (minor == 1 || self.keep_alive)
    }

    /// Note one field.
    pub fn see(&mut self, name: &HeaderName, value: &[u8]) {
        let tokens = || value.split(|&b| b == b',').map(|t| t.trim_ascii());
        if *name == header::CONNECTION {
            for t in tokens() {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                self.upgrade_token |= t.eq_ignore_ascii_case(b"upgrade");
            }
        } else if *name == header::CONTENT_LENGTH {
            // Every value, and every comma-separated element, must be the same number.
            for t in tokens() {
                let n = std::str::from_utf8(t)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or("invalid content-length");
                self.content_length = Some(match (self.content_length, n) {
                    (Some(Err(e)), _) | (_, Err(e)) => Err(e),
                    (Some(Ok(l)), Ok(n)) if l != n => Err("conflicting content-length"),
                    (_, Ok(n)) => Ok(n),
                });
            }
        } else if *name == header::TRANSFER_ENCODING {
            self.chunked = tokens()
                .next_back()
                .map(|t| t.eq_ignore_ascii_case(b"chunked"));
            self.transfer_codings = self
                .transfer_codings
                .saturating_add(tokens().count().min(255) as u8);
        } else if *name == header::HOST {
            self.hosts = self.hosts.saturating_add(1);
        } else if *name == header::EXPECT {
            self.expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        } else if *name == header::UPGRADE {
            self.upgrade = true;
        } else if *name == header::TE {
            self.te_trailers |= tokens().any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if *name == header::DATE {
            self.date = true;
        }
    }
}

/// The header map of a head whose bytes are `head` (values share its memory), and its
/// framing fields. `spans` are httparse's fields (from [`record_spans`]): their values passed
/// httparse's check, the same byte set `HeaderValue` accepts (unit-tested below), so they are
/// not checked again; the function is crate-private so that only such spans reach it.
#[allow(unsafe_code)]
pub(crate) fn header_map(
    head: &Bytes,
    spans: &[(u16, u16, u16, u16)],
) -> Result<(HeaderMap, Fields), &'static str> {
    // Room for the fields the pipeline adds (x-forwarded-proto, x-request-id,
    // x-envoy-upstream-service-time, ...) without growing and rehashing the map.
    let mut map = HeaderMap::with_capacity(spans.len() + 6);
    let mut fields = Fields::default();
    for &(ns, ne, vs, ve) in spans {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| "invalid header name")?;
        // SAFETY: httparse accepted these bytes as a field value: HTAB, 0x20-0x7E and
        // 0x80-0xFF, exactly `HeaderValue`'s valid bytes
        // (`httparse_values_are_valid_header_values`). Debug builds check again.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(vs..ve)) };
        fields.see(&name, value.as_bytes());
        map.append(name, value);
    }
    Ok((map, fields))
}

/// Up to `max` buffered bytes, as shared bytes.
pub fn take(buf: &mut BytesMut, max: u64) -> Bytes {
    let n = (buf.len() as u64).min(max) as usize;
    buf.split_to(n).freeze()
}

/// Where chunked decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

/// What one decoding step produced.
pub enum Step {
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
pub const MAX_LINE: usize = 8 * 1024;

/// One step of chunked decoding over the buffered bytes.
pub fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Step, &'static str> {
    match state {
        Chunk::Size => {
            // httparse's chunk-size grammar (RFC 9112 §7.1): hex digits first, then optional
            // whitespace and extensions, then CRLF: `+5`, ` 5`, `5\rX` are errors.
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((n, size))) => {
                    let _ = buf.split_to(n);
                    Ok(Step::Next(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    }))
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
                    Err("chunk size line too long")
                }
                Ok(httparse::Status::Partial) => Ok(Step::More),
                Err(_) => Err("invalid chunk size"),
            }
        }
        // Nothing buffered is no progress: say so (a caller looping on `Data` with an empty
        // buffer would otherwise spin; the fuzzer found it).
        Chunk::Data(_) if buf.is_empty() => Ok(Step::More),
        Chunk::Data(rem) => {
            let data = take(buf, rem);
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

/// Decode chunked data from `buf` starting in `state`, as far as it goes (fuzzing).
pub(crate) fn fuzz_chunked_from(buf: &mut BytesMut, mut state: Chunk) {
    loop {
        match chunk_step(buf, state) {
            Ok(Step::Data(_, next) | Step::Next(next)) => state = next,
            Ok(Step::End(_) | Step::More) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `header_map` skips `HeaderValue`'s byte check because httparse already made it: the two
    /// must accept exactly the same bytes in a field value.
    #[test]
    fn httparse_values_are_valid_header_values() {
        for b in 0..=255u8 {
            let mut raw = b"HTTP/1.1 200 OK\r\nx-a: a".to_vec();
            raw.push(b);
            raw.extend_from_slice(b"z\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut res = httparse::Response::new(&mut headers);
            let parsed = matches!(res.parse(&raw), Ok(httparse::Status::Complete(_)));
            let value = [b'a', b, b'z'];
            let valid = HeaderValue::from_bytes(&value).is_ok();
            // CR and LF end the line in httparse, so they never reach a value.
            if b == b'\r' || b == b'\n' {
                assert!(!parsed || res.headers[0].value != value, "byte {b:#x}");
                continue;
            }
            assert_eq!(
                parsed, valid,
                "byte {b:#x}: httparse {parsed}, HeaderValue {valid}"
            );
        }
    }

    #[test]
    fn header_map_shares_values_and_sees_framing_fields() {
        let raw = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-Obs: caf\xc3\xa9\r\n\r\n",
        );
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut res = httparse::Response::new(&mut headers);
        assert!(matches!(res.parse(&raw), Ok(httparse::Status::Complete(_))));
        let mut spans: Spans = [(0, 0, 0, 0); MAX_HEADERS];
        let n = record_spans(&raw, res.headers, &mut spans);
        let (map, fields) = header_map(&raw, &spans[..n]).unwrap();
        assert_eq!(map["content-length"], "2");
        assert_eq!(map["x-obs"].as_bytes(), "café".as_bytes());
        assert!(fields.close);
    }
}
