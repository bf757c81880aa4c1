//! Admin HTTP server (default 127.0.0.1:15000): `/ready` (200 once a snapshot is serving),
//! `/healthz`, `/config_dump` (the snapshot in force with its version and last change) and
//! `/diagnostics` (the last analysis, including a rejected set and why). Runs on its own
//! runtime thread, off the data plane.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::publish::Publisher;

/// Default admin address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";

/// State the admin handlers read.
#[derive(Clone)]
pub struct Admin {
    /// Published configuration.
    pub publisher: Arc<Publisher>,
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

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body.into()))
        .expect("valid response")
}

impl Admin {
    /// Route one admin request.
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ready") => self.handle_ready(),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/config_dump") => self.handle_config_dump(),
            (&Method::GET, "/diagnostics") => json(&self.publisher.status()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /ready, /healthz, /config_dump, /diagnostics\n",
            ),
        }
    }

    fn handle_ready(&self) -> Response<Full<Bytes>> {
        if self.publisher.status().version > 0 {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration published yet\n",
            )
        }
    }

    fn handle_config_dump(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Dump<'a> {
            version: u64,
            last_change: Option<std::time::SystemTime>,
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

    /// Serve on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
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

/// Bind and serve the admin API on a thread with its own runtime. Returns the bound address.
pub fn spawn_admin(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
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
