//! Upgraded connections (WebSocket and other `101 Switching Protocols`) under the same rules as
//! every other upstream use: they hold a request and a connection for their whole life, so they
//! count against `http2MaxRequests` and `maxConnections` (503 UO past either), their outcome
//! feeds outlier detection, and the bytes they carry honour `tcp.idleTimeout` and
//! `maxConnectionDuration` (they bypassed all four before).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::forward::{UpstreamRequest, reset_body, reset_reason};
use super::h1server::OnUpgrade;
use crate::body::BoxBody;
use crate::reply::{BODY_NO_HEALTHY, BODY_OVERFLOW, Flags, LocalReply};
use crate::upstream::outlier::{self, Outcome};
use crate::upstream::{ClusterState, EndpointState};
use crate::upstream::{lb, pool};

/// What an upgraded connection holds until both its HTTP exchange and its bytes end: one
/// request and one connection of its cluster and endpoint.
pub struct Hold {
    cluster: Arc<ClusterState>,
    endpoint: Arc<EndpointState>,
}

/// Why an upgrade was refused before any connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `http2MaxRequests` reached.
    Requests,
    /// `maxConnections` reached.
    Connections,
}

impl Hold {
    /// Take a request and a connection slot, or say which limit is reached (counted in the
    /// cluster's overflow stats).
    pub fn take(
        cluster: &Arc<ClusterState>,
        endpoint: &Arc<EndpointState>,
    ) -> Result<Hold, Overflow> {
        let policy = cluster.policy.load();
        let reserve = |counter: &std::sync::atomic::AtomicU32, max: u32| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        };
        if !reserve(&cluster.active_requests, policy.pool.max_requests) {
            cluster
                .stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Requests);
        }
        if !reserve(&cluster.connections, policy.pool.max_connections) {
            cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
            cluster
                .stats
                .upstream_cx_overflow
                .fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Connections);
        }
        endpoint.active_requests.fetch_add(1, Ordering::Relaxed);
        endpoint.active_connections.fetch_add(1, Ordering::Relaxed);
        Ok(Hold {
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.endpoint
            .active_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.endpoint
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
        self.cluster.connections.fetch_sub(1, Ordering::AcqRel);
        self.cluster.conn_released.notify_waiters();
    }
}

/// A byte stream that notes when bytes last moved (either way, shared with its peer).
struct Tracked<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copy both ways until a side closes, nothing moves for `idle`, or `max` elapses.
pub async fn splice<A, B>(down: A, up: B, idle: Option<Duration>, max: Option<Duration>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut down = Tracked {
        inner: down,
        last: last.clone(),
        epoch,
    };
    let mut up = Tracked {
        inner: up,
        last: last.clone(),
        epoch,
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let moved = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
            let due = moved.max(epoch) + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let limit = async {
        match max {
            Some(m) => tokio::time::sleep(m).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
        () = watchdog => {}
        () = limit => {}
    }
}

/// The upstream host of an upgraded connection (for the access log).
#[derive(Clone)]
pub struct UpstreamHost(pub String);

/// Forward an upgrade request on a connection of its own; after `101`, splice the bytes.
pub async fn forward(
    state: &Arc<ClusterState>,
    req: &UpstreamRequest,
    on_upgrade: OnUpgrade,
) -> Result<Response<BoxBody>, LocalReply> {
    let policy = state.policy.load_full();
    let set = state.lb_set();
    let Some(ep) = lb::pick(&state.lb, &policy.lb.algorithm, &set, None, &[]) else {
        return Err(LocalReply::new(503, BODY_NO_HEALTHY, Flags::UH));
    };
    // The request and connection this upgrade holds for its whole life, or 503 UO.
    let hold = Arc::new(
        Hold::take(state, &ep).map_err(|_| LocalReply::new(503, BODY_OVERFLOW, Flags::UO))?,
    );
    let connect_failure = |reason: String| {
        outlier::record(state, &ep, Outcome::LocalFailure);
        LocalReply::new(
            503,
            reset_body(
                false,
                &format!("remote connection failure, transport failure reason: {reason}"),
            ),
            Flags::UF,
        )
    };
    // An HTTP/1 request first: what follows the upgrade is spliced from its first byte too.
    let stream = pool::connect_upstream(
        state,
        &ep.target,
        &policy.pool,
        pool::FirstByte::Proxy,
        false,
    )
    .await
    .map_err(|e| connect_failure(format!("{e:?}")))?;
    let (mut send, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| connect_failure(e.to_string()))?;
    let held = hold.clone();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
        drop(held);
    });
    let mut resp = send.send_request(req.build(false, 1)).await.map_err(|e| {
        outlier::record(state, &ep, Outcome::LocalFailure);
        LocalReply::new(
            503,
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {}",
                reset_reason(&e)
            ),
            Flags::UC,
        )
    })?;
    outlier::record(state, &ep, Outcome::Status(resp.status().as_u16()));
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up = hyper::upgrade::on(&mut resp);
        let (idle, max) = (
            policy.pool.tcp_idle_timeout,
            policy.pool.max_connection_duration,
        );
        tokio::spawn(async move {
            if let (Ok(up), Some(down)) = (up.await, on_upgrade.connection().await) {
                splice(down, hyper_util::rt::TokioIo::new(up), idle, max).await;
            }
            drop(hold);
        });
    }
    let (mut parts, body) = resp.into_parts();
    parts.extensions.insert(UpstreamHost(ep.target.to_string()));
    Ok(Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as crate::body::BoxError)
            .boxed_unsync(),
    ))
}
