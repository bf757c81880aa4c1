//! Access log: one line per HTTP request (written when the response body ends) and per TCP
//! connection, in an Envoy-like format with response flags, to the `nodeproxy::access` tracing
//! target (stderr).

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use http::{Request, Response, StatusCode};

use crate::proxy::ConnInfo;

use crate::proxy::body::OnEnd;
use crate::proxy::error::Flags;

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write access-log entries as JSON objects instead of text lines.
pub fn set_json(on: bool) {
    JSON.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// An access-log entry being filled in.
#[derive(Debug, Clone)]
pub struct AccessLog {
    at: SystemTime,
    start: Instant,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    user_agent: String,
    request_id: String,
    peer: SocketAddr,
    flags: Flags,
    route: Option<String>,
    cluster: Option<String>,
    upstream: Option<String>,
    status: u16,
}

impl AccessLog {
    /// Start an entry for a request; `None` when the access log is off (nothing is allocated).
    pub fn start<B>(req: &Request<B>, conn: &ConnInfo) -> Option<Self> {
        if !tracing::enabled!(target: "nodeproxy::access", tracing::Level::INFO) {
            return None;
        }
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        Some(AccessLog {
            at: SystemTime::now(),
            start: Instant::now(),
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "/".into()),
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| h("host")),
            user_agent: h("user-agent"),
            request_id: h("x-request-id"),
            peer: conn.peer,
            flags: Flags::NONE,
            route: None,
            cluster: None,
            upstream: None,
            status: 0,
        })
    }

    /// An entry for a request refused before it could be parsed (method and path unknown).
    pub fn unparsed(conn: &ConnInfo) -> Option<Self> {
        let mut req = Request::new(());
        *req.version_mut() = http::Version::HTTP_11;
        Self::start(&req, conn).map(|mut log| {
            log.method = "-".into();
            log.path = "-".into();
            log
        })
    }

    /// Log a reply sent without a response object (a refused request).
    pub fn finish_status(mut self, status: StatusCode, flags: Flags) {
        self.status = status.as_u16();
        self.flags = flags;
        self.emit(0, true);
    }

    /// Record routing results.
    pub fn set(
        &mut self,
        flags: Flags,
        route: Option<String>,
        cluster: Option<String>,
        upstream: Option<String>,
    ) {
        self.flags = flags;
        self.route = route;
        self.cluster = cluster;
        self.upstream = upstream;
    }

    /// Record the status sent downstream.
    pub fn with_status(mut self, s: StatusCode) -> Self {
        self.status = s.as_u16();
        self
    }

    /// Log a local reply now.
    pub fn finish_local<B>(
        &mut self,
        resp: &Response<B>,
        flags: Flags,
        route: Option<&str>,
        cluster: Option<&str>,
    ) {
        self.flags = flags;
        self.route = route.map(str::to_string);
        self.cluster = cluster.map(str::to_string);
        self.status = resp.status().as_u16();
        let len = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.emit(len, true);
    }

    fn emit(&self, bytes: u64, complete: bool) {
        let flags = if complete {
            self.flags
        } else {
            self.flags.with(Flags::DC)
        };
        if json() {
            let line = serde_json::json!({
                "start_time": humantime::format_rfc3339_millis(self.at).to_string(),
                "method": self.method,
                "path": self.path,
                "protocol": self.protocol,
                "response_code": self.status,
                "response_flags": flags.to_string(),
                "bytes_sent": bytes,
                "duration": self.start.elapsed().as_millis() as u64,
                "user_agent": self.user_agent,
                "request_id": self.request_id,
                "authority": self.authority,
                "upstream_host": self.upstream,
                "upstream_cluster": self.cluster,
                "route_name": self.route,
                "downstream_remote_address": self.peer.to_string(),
            });
            tracing::info!(target: "nodeproxy::access", "{line}");
            return;
        }
        tracing::info!(
            target: "nodeproxy::access",
            "[{}] \"{} {} {}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" {} {} {}",
            humantime::format_rfc3339_millis(self.at),
            self.method,
            self.path,
            self.protocol,
            self.status,
            flags,
            bytes,
            self.start.elapsed().as_millis(),
            self.user_agent,
            self.request_id,
            self.authority,
            self.upstream.as_deref().unwrap_or("-"),
            self.cluster.as_deref().unwrap_or("-"),
            self.route.as_deref().unwrap_or("-"),
            self.peer,
        );
    }
}

impl OnEnd for AccessLog {
    fn on_end(self: Box<Self>, bytes: u64, complete: bool) {
        self.emit(bytes, complete);
    }
}

/// Log one TCP connection.
#[allow(clippy::too_many_arguments)]
pub fn tcp_access(
    peer: SocketAddr,
    dst: SocketAddr,
    sni: Option<&str>,
    cluster: Option<&str>,
    upstream: Option<&str>,
    flags: Flags,
    sent: u64,
    received: u64,
    start: Instant,
) {
    tracing::info!(
        target: "nodeproxy::access",
        "[{}] TCP {} -> {} sni={} {} {} {} {} \"{}\" {}",
        humantime::format_rfc3339_millis(SystemTime::now()),
        peer,
        dst,
        sni.unwrap_or("-"),
        flags,
        received,
        sent,
        start.elapsed().as_millis(),
        upstream.unwrap_or("-"),
        cluster.unwrap_or("-"),
    );
}
