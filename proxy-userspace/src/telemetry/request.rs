//! Recording one HTTP request: Istio's request metrics and the access log entry, for a reply
//! made by the proxy (recorded at once) or an upstream response (recorded when its body ends).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Request, Response, StatusCode, header};

use super::AccessLog;
use super::metrics::{HttpLabels, Metrics, Series, SeriesCache, SeriesKeyRef, Side, peers};
use crate::body::OnEnd;
use crate::compile::Service;
use crate::reply::Flags;

static GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");

/// Who a request's metrics name: the client, the endpoint that served (with its series
/// cache), the destination service and the authority asked for.
#[derive(Clone, Copy)]
pub struct Parties<'a> {
    /// The client workload.
    pub source: &'a Side,
    /// The endpoint that served (or last failed), with its series cache.
    pub endpoint: Option<(&'a Side, &'a SeriesCache)>,
    /// The routed service.
    pub service: Option<&'a Service>,
    /// The request's authority without port (the service label when no service is known).
    pub authority: &'a str,
}

/// The routing facts the access log prints.
#[derive(Debug, Default)]
pub struct Routing<'a> {
    /// Response flags.
    pub flags: Flags,
    /// Route name.
    pub route: Option<&'a str>,
    /// Cluster name.
    pub cluster: Option<&'a str>,
    /// Upstream host (`None` when none was tried; formatted only when the log is on).
    pub upstream: Option<String>,
}

/// One request being recorded.
pub struct RequestRecord {
    start: Instant,
    grpc: bool,
    /// Boxed: the record moves through the pipeline by value, and the entry is ~300 bytes
    /// that every move would copy even when the log is off.
    log: Option<Box<AccessLog>>,
    /// Request body bytes received.
    pub request_bytes: u64,
}

impl RequestRecord {
    /// Start recording a request that arrived from `peer` at `start`.
    pub fn start<B>(req: &Request<B>, peer: SocketAddr, start: Instant) -> RequestRecord {
        RequestRecord {
            start,
            grpc: is_grpc(req.headers()),
            log: AccessLog::start(req, peer).map(Box::new),
            request_bytes: 0,
        }
    }

    /// Is the request gRPC (local replies are then gRPC trailers-only responses)?
    pub fn grpc(&self) -> bool {
        self.grpc
    }

    /// Is an access log entry being written (then the upstream host is worth formatting)?
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    fn protocol(&self) -> &'static str {
        if self.grpc { "grpc" } else { "http" }
    }

    /// Istio's `grpc_response_status` label: for gRPC requests only.
    fn grpc_status<'h>(&self, headers: &'h HeaderMap) -> &'h str {
        if !self.grpc {
            return "";
        }
        headers
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn labels(&self, p: &Parties<'_>, status: u16, flags: Flags, grpc_status: &str) -> HttpLabels {
        HttpLabels {
            peers: peers(
                p.source,
                p.endpoint.map(|e| e.0),
                p.service,
                p.authority,
                self.protocol(),
            ),
            response_code: code_label(status),
            grpc_response_status: Arc::from(grpc_status),
            response_flags: flags_label(flags),
        }
    }

    /// Record a reply made here, whose body is all in `resp` (`Content-Length`).
    pub fn local<B>(self, metrics: &Metrics, p: Parties<'_>, r: Routing<'_>, resp: &Response<B>) {
        let grpc_status = resp
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let body_len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        metrics.record_http(
            &self.labels(&p, resp.status().as_u16(), r.flags, grpc_status),
            self.start.elapsed().as_secs_f64() * 1000.0,
            self.request_bytes,
            body_len,
        );
        if let Some(mut log) = self.log {
            log.finish_local(resp, r.flags, r.route, r.cluster, r.upstream);
        }
    }

    /// What to record when the body of `resp` ends (its bytes are counted as they stream).
    pub fn streamed<B>(
        self,
        metrics: &Metrics,
        p: Parties<'_>,
        r: Routing<'_>,
        resp: &Response<B>,
    ) -> Box<dyn OnEnd> {
        let status = resp.status();
        let flags = r.flags;
        let grpc_status = self.grpc_status(resp.headers());
        let make = || metrics.series(&self.labels(&p, status.as_u16(), flags, grpc_status));
        // The endpoint's series cache spares building and hashing the full label set.
        let series = match p.endpoint {
            Some((_, cache)) => cache.get(
                SeriesKeyRef {
                    source: &p.source.workload,
                    source_ns: &p.source.namespace,
                    code: status.as_u16(),
                    flags: flags.bits(),
                    grpc: grpc_status.parse().ok(),
                },
                p.source,
                make,
            ),
            None => make(),
        };
        Box::new(RequestEnd {
            start: self.start,
            series,
            request_bytes: self.request_bytes,
            log: self.log.map(|mut l| {
                l.set(
                    flags,
                    r.route.map(str::to_string),
                    r.cluster.map(str::to_string),
                    r.upstream,
                );
                l.set_status(status);
                l
            }),
        })
    }
}

/// Is this a gRPC request (`content-type: application/grpc...`)?
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

/// Account for a request the HTTP/1.1 server refused before it could be parsed (400, 431):
/// `istio_requests_total` and the access log with flag DPE, as for Envoy's codec errors.
pub fn record_refused(metrics: &Metrics, source: &Side, peer: SocketAddr, status: StatusCode) {
    let labels = HttpLabels {
        peers: peers(source, None, None, "", "http"),
        response_code: code_label(status.as_u16()),
        grpc_response_status: Arc::from(""),
        response_flags: flags_label(Flags::DPE),
    };
    metrics.record_http(&labels, 0.0, 0, 0);
    if let Some(log) = AccessLog::unparsed(peer) {
        log.finish_status(status, Flags::DPE);
    }
}

/// Records metrics and the access log when a response body ends.
struct RequestEnd {
    start: Instant,
    series: Series,
    request_bytes: u64,
    log: Option<Box<AccessLog>>,
}

impl OnEnd for RequestEnd {
    fn on_end(self: Box<Self>, bytes: u64, complete: bool) {
        self.series.record(
            self.start.elapsed().as_secs_f64() * 1000.0,
            self.request_bytes,
            bytes,
        );
        if let Some(log) = self.log {
            log.on_end(bytes, complete);
        }
    }
}

/// `response_code` label values, shared (no allocation per request).
fn code_label(code: u16) -> Arc<str> {
    static CODES: std::sync::OnceLock<Vec<Arc<str>>> = std::sync::OnceLock::new();
    let codes = CODES.get_or_init(|| (0..600).map(|c| Arc::from(c.to_string())).collect());
    codes
        .get(code as usize)
        .cloned()
        .unwrap_or_else(|| Arc::from(code.to_string()))
}

fn flags_label(flags: Flags) -> Arc<str> {
    static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    if flags == Flags::NONE {
        return NONE.get_or_init(|| Arc::from("-")).clone();
    }
    Arc::from(flags.to_string())
}
