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

use crate::upstream::{ClusterState, EndpointState};

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
