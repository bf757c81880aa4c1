//! Admin HTTP server (default 127.0.0.1:15000), on its own thread and runtime, off the data
//! plane: `/ready`, `/healthz`, `/config_dump` (snapshot with version and last change),
//! `/diagnostics` (last analysis, including a rejected set and why, and listeners that are not
//! bound), `/listeners`, `/routes`, `/clusters`,
//! `/endpoints` (health, ejection and until when, active requests and connections, weight),
//! `/metrics` (Prometheus), `/logging?level=` (run-time log level), `/kernel` and `/enroll`
//! (eBPF capture).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::proxy::Shared;
use crate::publish::Publisher;

/// Default admin address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";

/// Changes the log filter at run time (`/logging?level=`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// State the admin handlers read.
#[derive(Clone)]
pub struct Admin {
    /// Published configuration.
    pub publisher: Arc<Publisher>,
    /// The data plane, when running.
    pub shared: Option<Arc<Shared>>,
    /// Log filter control, when the binary installed one.
    pub log: Option<LogControl>,
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(b)))
            .expect("valid response"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialize: {e}\n"),
        ),
    }
}

/// Set by the proxy on every request it forwards (`x-forwarded-proto`).
const FORWARDED_MARK: &str = "x-forwarded-proto";

/// A listener and, when it is not bound, why.
#[derive(Serialize)]
struct ListenerState {
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A log filter an operator meant: every directive names a level, alone (`debug`) or for a
/// target (`nodeproxy::access=off`). tracing's own syntax also takes a bare word as "every
/// level of target `word`", which turns `level=bogus` into a silent no-op; refuse it.
fn check_log_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty".into());
    }
    for directive in filter.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "`{directive}` names no level (one of {}, alone or as target=level)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// An endpoint as `/endpoints` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// `ip:port` or `name:port`.
    pub address: String,
    /// `HEALTHY` or `EJECTED`.
    pub health: &'static str,
    /// When the ejection ends, RFC 3339 (the endpoint returns at the first sweep after it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_until: Option<String>,
    /// Milliseconds until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u128>,
    /// Times ejected.
    pub ejections: u64,
    /// Current ejection multiplier.
    pub ejection_multiplier: u32,
    /// Consecutive 5xx now.
    pub consecutive_5xx: u32,
    /// Requests in flight.
    pub active_requests: u32,
    /// Open connections.
    pub active_connections: u32,
    /// LB weight.
    pub weight: u32,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A cluster as `/endpoints` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEndpoints {
    /// `outbound|port|subset|host`.
    pub cluster: String,
    /// Requests waiting for a connection (cluster-wide).
    pub pending_requests: u32,
    /// Endpoints.
    pub endpoints: Vec<EndpointStatus>,
}

impl Admin {
    /// Route one admin request.
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let query = req.uri().query().unwrap_or("");
        // A request the proxy forwarded carries the headers it always adds: a mutating
        // call that arrives that way came from a pod, not from an operator on the node.
        if req.method() != Method::GET && req.headers().contains_key(FORWARDED_MARK) {
            return text(
                StatusCode::FORBIDDEN,
                "mutating admin requests that arrive through the proxy are refused\n",
            );
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ready") => self.handle_ready(),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/config_dump") => self.handle_config_dump(),
            (&Method::GET, "/diagnostics") => self.handle_diagnostics(),
            (&Method::GET, "/listeners") => json(&self.listeners()),
            (&Method::GET, "/routes") => self.handle_routes(),
            (&Method::GET, "/clusters") => self.handle_clusters(),
            (&Method::GET, "/endpoints") => json(&self.endpoints()),
            (&Method::GET, "/metrics" | "/stats/prometheus") => self.handle_metrics(),
            (&Method::POST, "/logging") => self.handle_logging(query),
            (&Method::GET, "/kernel") => match self.kernel() {
                Some(k) => json(&k.status()),
                None => text(
                    StatusCode::NOT_FOUND,
                    "no eBPF state: the proxy runs with --capture none\n",
                ),
            },
            (m @ (&Method::POST | &Method::DELETE), "/enroll") => {
                self.handle_enroll(m == Method::POST, query)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /ready /healthz /config_dump /diagnostics /routes /clusters /endpoints /metrics POST /logging?level=\n",
            ),
        }
    }

    fn kernel(&self) -> Option<&Arc<crate::dataplane::Kernel>> {
        self.shared.as_ref().and_then(|s| s.kernel.as_ref())
    }

    fn handle_enroll(&self, enroll: bool, query: &str) -> Response<Full<Bytes>> {
        let Some(k) = self.kernel() else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "enrollment needs --capture ebpf\n",
            );
        };
        let Some(path) = query.split('&').find_map(|kv| kv.strip_prefix("netns=")) else {
            return text(
                StatusCode::BAD_REQUEST,
                "usage: POST|DELETE /enroll?netns=/run/netns/NAME\n",
            );
        };
        let path = std::path::PathBuf::from(path.replace("%2F", "/"));
        if enroll {
            match k.enroll(&path) {
                Ok(cookie) => {
                    json(&serde_json::json!({ "netns": path, "cookie": cookie, "enrolled": true }))
                }
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{e}: {}\n",
                        std::error::Error::source(&e)
                            .map(|s| s.to_string())
                            .unwrap_or_default()
                    ),
                ),
            }
        } else {
            match k.unenroll(&path) {
                Ok(true) => json(&serde_json::json!({ "netns": path, "enrolled": false })),
                Ok(false) => text(
                    StatusCode::NOT_FOUND,
                    format!("{} is not enrolled\n", path.display()),
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
    }

    fn handle_ready(&self) -> Response<Full<Bytes>> {
        if self.shared.as_ref().is_some_and(|s| s.draining()) {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else if self.kernel().is_some_and(|k| k.is_handed_over()) {
            // The successor shares this port until it is ready: a probe of its readiness that
            // this instance answers must not say yes for it.
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "handing over to a successor\n",
            )
        } else if let Some(unbound) = self
            .shared
            .as_ref()
            .map(|s| s.unbound_listeners())
            .filter(|u| !u.is_empty())
        {
            let list: Vec<String> = unbound.iter().map(|(a, e)| format!("{a} ({e})")).collect();
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not listening on {}\n", list.join(", ")),
            )
        } else if match &self.shared {
            // Ready once the data plane serves a snapshot (listeners bound, kernel maps filled),
            // not merely once one is published.
            Some(s) => s.applied_version() > 0,
            None => self.publisher.status().version > 0,
        } {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration published yet\n",
            )
        }
    }

    /// The configuration's status, and what the data plane could not do with it.
    fn handle_diagnostics(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Diagnostics {
            #[serde(flatten)]
            status: crate::publish::Status,
            /// Listeners of the snapshot in force that are not bound, with why.
            unbound_listeners: Vec<ListenerState>,
        }
        json(&Diagnostics {
            status: self.publisher.status(),
            unbound_listeners: self
                .listeners()
                .into_iter()
                .filter(|l| l.error.is_some())
                .collect(),
        })
    }

    /// Every listener the snapshot in force asks for, bound or not.
    fn listeners(&self) -> Vec<ListenerState> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let unbound = shared.unbound_listeners();
        let snap = self.publisher.load();
        let mut out: Vec<ListenerState> = crate::proxy::listener::desired(&snap, shared)
            .into_iter()
            .map(|(addr, _)| ListenerState {
                address: addr.to_string(),
                error: unbound.get(&addr).cloned(),
            })
            .collect();
        if let Some(k) = &shared.kernel {
            out.push(ListenerState {
                address: k.capture().to_string(),
                error: unbound.get(&k.capture()).cloned(),
            });
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        out
    }

    fn handle_config_dump(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Dump<'a> {
            version: u64,
            last_change: Option<SystemTime>,
            last_change_source: String,
            snapshot: &'a crate::compile::Snapshot,
        }
        let status = self.publisher.status();
        let snap = self.publisher.load();
        json(&Dump {
            version: snap.version,
            last_change: status.last_change,
            last_change_source: status.last_change_source,
            snapshot: &snap,
        })
    }

    fn handle_routes(&self) -> Response<Full<Bytes>> {
        let snap = self.publisher.load();
        let l4: Vec<_> = snap
            .listeners
            .iter()
            .filter(|l| !l.tcp.is_empty() || !l.tls.is_empty())
            .collect();
        json(
            &serde_json::json!({ "version": snap.version, "httpTables": snap.http_tables, "l4Listeners": l4 }),
        )
    }

    fn handle_clusters(&self) -> Response<Full<Bytes>> {
        let Some(shared) = &self.shared else {
            return json(&Vec::<()>::new());
        };
        let view = shared.view.load_full();
        let out: Vec<_> = view
            .snapshot
            .clusters
            .iter()
            .zip(&view.clusters)
            .map(|(c, st)| {
                let eps = st.endpoints.load();
                serde_json::json!({
                    "name": c.name,
                    "service": view.snapshot.service(c.service).host,
                    "protocol": c.protocol,
                    "policy": c.policy,
                    "endpoints": eps.len(),
                    "healthyEndpoints": eps.iter().filter(|e| e.healthy()).count(),
                    "activeRequests": st.active_requests.load(Ordering::Relaxed),
                    "pendingRequests": st.pending_requests.load(Ordering::Relaxed),
                    "activeConnections": st.connections.load(Ordering::Relaxed),
                    "activeRetries": st.active_retries.load(Ordering::Relaxed),
                    "stats": st.stats,
                })
            })
            .collect();
        json(&out)
    }

    /// Every cluster's endpoints with health and load.
    pub fn endpoints(&self) -> Vec<ClusterEndpoints> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let view = shared.view.load_full();
        let now = Instant::now();
        let wall = SystemTime::now();
        view.clusters
            .iter()
            .map(|st| ClusterEndpoints {
                cluster: st.key.name(),
                pending_requests: st.pending_requests.load(Ordering::Relaxed),
                endpoints: st
                    .endpoints
                    .load()
                    .iter()
                    .map(|e| {
                        let o = e.outlier.lock().expect("outlier lock").clone();
                        let ejected = !e.healthy();
                        let left = o
                            .ejected_until
                            .filter(|_| ejected)
                            .map(|u| u.saturating_duration_since(now));
                        EndpointStatus {
                            address: e.target.to_string(),
                            health: if ejected { "EJECTED" } else { "HEALTHY" },
                            ejected_until: left
                                .map(|d| humantime::format_rfc3339_millis(wall + d).to_string()),
                            ejected_for_ms: left.map(|d| d.as_millis()),
                            ejections: o.ejections,
                            ejection_multiplier: o.multiplier,
                            consecutive_5xx: o.consecutive_5xx,
                            active_requests: e.active_requests.load(Ordering::Relaxed),
                            active_connections: e.active_connections.load(Ordering::Relaxed),
                            weight: e.weight,
                            labels: e.labels.clone(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    fn handle_metrics(&self) -> Response<Full<Bytes>> {
        let Some(shared) = &self.shared else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "data plane not running\n");
        };
        let view = shared.view.load_full();
        if let Some(k) = &shared.kernel {
            shared.metrics.record_kernel(&k.counters());
        }
        let body = shared
            .metrics
            .render(&view.samples(), &self.publisher.status());
        Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    }

    fn handle_logging(&self, query: &str) -> Response<Full<Bytes>> {
        let Some(level) = query.split('&').find_map(|kv| kv.strip_prefix("level=")) else {
            return text(
                StatusCode::BAD_REQUEST,
                "usage: POST /logging?level=<filter> (e.g. debug, info,nodeproxy::access=off)\n",
            );
        };
        let Some(log) = &self.log else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "log level control is not installed\n",
            );
        };
        let level = level
            .replace("%2C", ",")
            .replace("%3D", "=")
            .replace("%3A", ":");
        if let Err(e) = check_log_filter(&level) {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid log filter `{level}`: {e}\n"),
            );
        }
        match log(&level) {
            Ok(()) => text(StatusCode::OK, format!("log level: {level}\n")),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!("invalid log filter `{level}`: {e}\n"),
            ),
        }
    }

    /// Serve on `listener` until the task is dropped, or until the data plane stops accepting
    /// (a successor serves this socket too: its `/ready` must not be answered by this one).
    pub async fn serve(self, listener: TcpListener) {
        let mut stopped = self.shared.as_ref().map(|s| s.accepting_stopped());
        loop {
            let accepted = match &mut stopped {
                Some(stop) => tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.wait_for(|s| *s) => {
                        tracing::info!("admin API: a successor serves it now");
                        return;
                    }
                },
                None => listener.accept().await,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: back off as the data path does, never spin.
                    tracing::warn!(error = %e, "admin accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = admin.handle(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// Does the admin address need `--admin-public`?
pub fn is_public(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Bind and serve the admin API on a thread with its own runtime. Returns the bound address.
/// A socket a predecessor passed on for `addr` is used instead of binding a new one.
pub fn spawn_admin(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    let sockets = admin.shared.as_ref().map(|s| s.options.sockets.clone());
    let inherited = sockets.as_ref().and_then(|s| s.take_inherited(addr));
    let std_listener = match inherited {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr)?,
    };
    if let Some(s) = &sockets {
        s.listening(&std_listener);
    }
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("admin listener");
                tracing::info!(%local, "admin API listening");
                admin.serve(listener).await;
            });
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::check_log_filter;

    #[test]
    fn log_filters_must_name_a_level() {
        for ok in [
            "debug",
            "INFO",
            "info,nodeproxy::access=off",
            "nodeproxy=trace",
            "off",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "bogus", "info,bogus", "nodeproxy=loud", "debug,"] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }
}
