//! Header work on the request path: hop-by-hop removal, request ids, and the header names
//! looked up per request (made once: a `&str` key is parsed on every lookup).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub(crate) static X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
pub(crate) static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
];

/// Remove hop-by-hop headers (RFC 9110 §7.6.1). One scan over the (few) present headers
/// instead of a hash lookup per hop-by-hop name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found: [Option<HeaderName>; 6] = Default::default();
    let mut n = 0;
    for name in headers.keys() {
        if n < found.len()
            && HOP_BY_HOP.contains(name)
            && !found[..n].iter().any(|f| f.as_ref() == Some(name))
        {
            found[n] = Some(name.clone());
            n += 1;
        }
    }
    if found[..n]
        .iter()
        .any(|f| f.as_ref() == Some(&header::CONNECTION))
    {
        // Fields the sender named in `Connection` are this hop's too (`Connection:
        // keep-alive, X-Secret`). `Upgrade` and `Host` stay (the upgrade path forwards
        // `Upgrade` on purpose). The usual tokens (`close`, `keep-alive`, the hop-by-hop names
        // removed below anyway) name nothing else: they are passed over without making a
        // header name (an allocation each), so the usual message allocates nothing here.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !names_nothing_else(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in found.into_iter().flatten() {
        headers.remove(name);
    }
}

/// A `Connection` token that names no field to remove besides the hop-by-hop ones (or one
/// that stays: `Upgrade`, `Host`).
fn names_nothing_else(token: &[u8]) -> bool {
    // The two usual ones first.
    token.eq_ignore_ascii_case(b"keep-alive")
        || token.eq_ignore_ascii_case(b"close")
        || token.is_empty()
        || token.eq_ignore_ascii_case(b"upgrade")
        || token.eq_ignore_ascii_case(b"host")
        || HOP_BY_HOP
            .iter()
            .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// A random 128-bit request id in hex, without going through `fmt`.
pub fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::rng().random();
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// `httpbin:8000` → `httpbin-shadow:8000` (Envoy's mirror Host suffix).
pub fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{h}-shadow:{p}"),
        _ => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret ,close"),
            ("connection", "Upgrade, TE, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "a"),
            ("x-kept", "2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "upgrade", "x-kept"]);
        for t in ["close", "Keep-Alive", "", "TE", "proxy-connection"] {
            assert!(names_nothing_else(t.as_bytes()), "{t}");
        }
        assert!(!names_nothing_else(b"x-secret"));
    }

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("httpbin:8000"), "httpbin-shadow:8000");
        assert_eq!(shadow_host("httpbin"), "httpbin-shadow");
    }
}
