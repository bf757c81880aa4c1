//! Responses the proxy makes itself from a [`Reply`] decision: redirects, direct responses,
//! CORS preflights, fault aborts, no route; and the CORS headers of a forwarded response.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::decide::Reply;
use crate::body::BoxBody;
use crate::compile::{AbortStatus, Cors};
use crate::reply::{BODY_FAULT, Flags, LocalReply};

/// A response made here: complete (no flags of its own), or a local reply carrying flags.
pub enum Made {
    /// A response to send as it is (redirect, direct response, preflight, gRPC abort).
    Ready(Response<BoxBody>),
    /// A local reply; its flags join the request's.
    Local(LocalReply),
}

/// The response for `reply`; `flags` are the request's so far (DI after a fault delay) and
/// collect the reply's own (NR, FI, NC).
pub fn reply(r: Reply<'_>, flags: &mut Flags) -> Made {
    match r {
        Reply::NoRoute => {
            *flags = flags.with(Flags::NR);
            Made::Local(LocalReply::new(404, "", *flags))
        }
        Reply::NoCluster(_) => {
            *flags = flags.with(Flags::NC);
            Made::Local(LocalReply::new(503, "", *flags))
        }
        Reply::HttpsRedirect(location) => Made::Ready(redirect(301, location)),
        Reply::Redirect { code, location } => Made::Ready(redirect(code, location)),
        Reply::Direct { status, body, rule } => {
            let mut b = Response::builder()
                .status(status)
                .header(header::CONTENT_LENGTH, body.len());
            if !body.is_empty() {
                b = b.header(header::CONTENT_TYPE, "text/plain");
            }
            let mut r = b
                .body(full(Bytes::copy_from_slice(body)))
                .expect("direct response");
            rule.headers.apply_response(r.headers_mut());
            Made::Ready(r)
        }
        Reply::Preflight {
            cors,
            origin,
            allowed,
        } => Made::Ready(preflight(cors, &origin, allowed)),
        Reply::Abort(status) => {
            *flags = flags.with(Flags::FI);
            match status {
                AbortStatus::Http(s) => Made::Local(LocalReply::new(s, BODY_FAULT, *flags)),
                AbortStatus::Grpc(g) => {
                    let mut r = LocalReply::new(200, BODY_FAULT, *flags);
                    r.grpc_status = Some(g);
                    Made::Ready(r.into_response(true))
                }
            }
        }
    }
}

fn redirect(code: u16, location: String) -> Response<BoxBody> {
    Response::builder()
        .status(code)
        .header(header::LOCATION, location)
        .header(header::CONTENT_LENGTH, 0)
        .body(empty())
        .expect("redirect")
}

/// An empty body.
pub fn empty() -> BoxBody {
    full(Bytes::new())
}

fn full(b: Bytes) -> BoxBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn preflight(c: &Cors, origin: &HeaderValue, allowed: bool) -> Response<BoxBody> {
    let mut r = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, 0)
        .body(empty())
        .expect("preflight");
    if allowed {
        let h = r.headers_mut();
        cors_headers(c, origin, h);
        for (name, v) in [
            (header::ACCESS_CONTROL_ALLOW_METHODS, &c.allow_methods),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, &c.allow_headers),
        ] {
            if !v.is_empty()
                && let Ok(v) = HeaderValue::from_str(v)
            {
                h.insert(name, v);
            }
        }
        if let Some(age) = c.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
        }
    }
    r
}

/// The CORS headers of a response to an allowed origin.
pub fn cors_headers(c: &Cors, origin: &HeaderValue, h: &mut HeaderMap) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if c.allow_credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if !c.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&c.expose_headers)
    {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}
