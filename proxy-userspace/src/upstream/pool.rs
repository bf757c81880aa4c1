//! Upstream HTTP connections with Envoy's circuit breakers: `maxConnections` queues requests
//! (counted as pending), `http1MaxPendingRequests` bounds that queue, `maxRequestsPerConnection`
//! retires connections, `idleTimeout` drops idle ones. HTTP/1 connections (`h1.rs`) return to
//! the idle list when their response body ends; HTTP/2 connections (hyper) are shared.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::h1::H1Conn;
use super::{ClusterState, EndpointState, Target};
use crate::compile::policy::PoolLimits;

/// Request body type sent upstream (requests are buffered so they can be retried).
pub type ReqBody = Full<Bytes>;

/// Idle connections of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointPool {
    /// Idle HTTP/1 connections per runtime thread driving them, each list oldest first
    /// (connections return in time order). As Envoy's per-worker pools: a request takes its own
    /// runtime's connection, so the connection's task is woken on the same thread.
    idle: Mutex<Vec<(std::thread::ThreadId, std::collections::VecDeque<Idle>)>>,
    /// Shared HTTP/2 connections, at most one per runtime thread (as Envoy's per-worker pools):
    /// streams stay on the thread that drives their connection.
    h2: Mutex<Vec<H2Conn>>,
}

#[derive(Debug)]
struct H2Conn {
    send: http2::SendRequest<ReqBody>,
    created: Instant,
    owner: std::thread::ThreadId,
}

#[derive(Debug)]
struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum PoolError {
    /// A circuit breaker refused (503 UO).
    Overflow,
    /// Connect refused, unreachable, or DNS failure (503 UF).
    Connect(String),
    /// Connect timed out (503 UF).
    ConnectTimeout,
    /// The deadline passed while waiting for a connection (504 UT).
    Deadline,
}

/// A connection ready for one request.
pub enum Lease {
    /// HTTP/1.1: returns to the idle list after the response when reusable.
    H1(H1Conn),
    /// HTTP/2: shared.
    H2(http2::SendRequest<ReqBody>),
}

/// Counts a request waiting for a connection; decremented on drop.
struct PendingGuard<'a>(&'a ClusterState);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Get a connection to `ep`, waiting in the cluster's pending queue when `maxConnections` is
/// reached, until `deadline`.
pub async fn acquire(
    cluster: &Arc<ClusterState>,
    ep: &Arc<EndpointState>,
    h2: bool,
    deadline: Option<Instant>,
) -> Result<Lease, PoolError> {
    let policy = cluster.policy.load_full();
    let limits = &policy.pool;
    let mut pending: Option<PendingGuard<'_>> = None;
    loop {
        let notified = cluster.conn_released.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if h2 {
            if let Some(send) = ep.pool.h2_conn(limits.max_connection_duration, true) {
                return Ok(Lease::H2(send));
            }
        } else {
            if let Some(conn) =
                ep.pool
                    .take_idle(limits.idle_timeout, limits.max_connection_duration, true)
            {
                return Ok(Lease::H1(conn));
            }
        }
        if try_reserve_connection(cluster, limits.max_connections) {
            drop(pending);
            // Boxed: connecting (DNS, TCP, the HTTP/2 handshake) is rare next to reuse and
            // would otherwise size every request's state.
            return Box::pin(connect(cluster, ep, h2, limits)).await;
        }
        // At maxConnections: share another runtime's connection before queueing.
        if h2 && let Some(send) = ep.pool.h2_conn(limits.max_connection_duration, false) {
            return Ok(Lease::H2(send));
        }
        if !h2
            && let Some(conn) =
                ep.pool
                    .take_idle(limits.idle_timeout, limits.max_connection_duration, false)
        {
            return Ok(Lease::H1(conn));
        }
        if pending.is_none() {
            cluster
                .stats
                .upstream_cx_overflow
                .fetch_add(1, Ordering::Relaxed);
            let queued = cluster.pending_requests.fetch_add(1, Ordering::Relaxed);
            let guard = PendingGuard(cluster);
            if queued >= limits.max_pending_requests {
                cluster
                    .stats
                    .upstream_rq_pending_overflow
                    .fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Overflow);
            }
            pending = Some(guard);
        }
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d.into(), notified).await.is_err() {
                    return Err(PoolError::Deadline);
                }
            }
            None => notified.await,
        }
    }
}

fn try_reserve_connection(cluster: &ClusterState, max: u32) -> bool {
    cluster
        .connections
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Release a connection slot reserved by [`try_reserve_connection`] (either side may be gone
/// already when an HTTP/1 connection outlives its endpoint or cluster).
pub(super) fn release_connection(cluster: Option<&ClusterState>, ep: Option<&EndpointState>) {
    if let Some(ep) = ep {
        ep.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
    if let Some(cluster) = cluster {
        cluster.connections.fetch_sub(1, Ordering::AcqRel);
        cluster.conn_released.notify_waiters();
    }
}

fn too_old(created: Instant, max: Option<Duration>) -> bool {
    max.is_some_and(|m| created.elapsed() >= m)
}

/// Who sends the first byte on a new upstream connection. The kernel splice (`--sockmap`) may
/// only take over a connection before its peer has sent anything: a byte that travelled TCP
/// before could be read after spliced ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstByte {
    /// The proxy (an HTTP/1 request): the connection may be spliced.
    Proxy,
    /// Either side (HTTP/2's server preface, opaque TCP): never spliced.
    Either,
}

/// Open a TCP connection to `target` within the cluster's connect timeout, with its TCP
/// keepalive settings.
pub async fn connect_tcp(
    target: &Target,
    limits: &PoolLimits,
    first: FirstByte,
    guard: &super::guard::DialGuard,
) -> Result<TcpStream, PoolError> {
    let timeout = limits.connect_timeout;
    let fut = async {
        let addr = match target {
            Target::Addr(a) => *a,
            Target::Name(n, p) => tokio::net::lookup_host((n.as_str(), *p))
                .await
                .map_err(|e| PoolError::Connect(format!("resolve {n}: {e}")))?
                .next()
                .ok_or_else(|| PoolError::Connect(format!("resolve {n}: no address")))?,
        };
        // After resolution: a name that resolves to the node is refused like an address.
        guard.check(addr).map_err(PoolError::Connect)?;
        let stream = match guard.mark {
            0 => TcpStream::connect(addr).await,
            mark => connect_marked(addr, mark).await,
        };
        stream.map_err(|e| PoolError::Connect(e.to_string()))
    };
    let stream = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| PoolError::ConnectTimeout)??;
    let _ = stream.set_nodelay(true);
    if let Some((probes, time, interval)) = limits.tcp_keepalive {
        // tcpKeepalive: SO_KEEPALIVE with the configured probes/time/interval (OS defaults for
        // the unset ones).
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = time {
            ka = ka.with_time(t);
        }
        if let Some(i) = interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = probes {
            ka = ka.with_retries(p);
        }
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
    }
    if let Some(hook) = &guard.hook {
        hook(&stream, first);
    }
    Ok(stream)
}

/// Called with each new upstream connection before its first byte is written (the data path's
/// with `--sockmap`, which splices node-local upstreams in the kernel; see `DialGuard`).
pub type ConnectHook = Arc<dyn Fn(&TcpStream, FirstByte) + Send + Sync>;

async fn connect_marked(addr: std::net::SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(addr)
        .await
}

async fn connect(
    cluster: &Arc<ClusterState>,
    ep: &Arc<EndpointState>,
    h2: bool,
    limits: &PoolLimits,
) -> Result<Lease, PoolError> {
    ep.active_connections.fetch_add(1, Ordering::Relaxed);
    let created = Instant::now();
    let first = if h2 {
        FirstByte::Either
    } else {
        FirstByte::Proxy
    };
    let io = match connect_upstream(cluster, &ep.target, limits, first, h2).await {
        Ok(s) => s,
        Err(e) => {
            release_connection(Some(cluster), Some(ep));
            return Err(e);
        }
    };
    if h2 {
        let io = TokioIo::new(io);
        let (c2, e2) = (cluster.clone(), ep.clone());
        let (send, conn) = match http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                release_connection(Some(cluster), Some(ep));
                return Err(PoolError::Connect(e.to_string()));
            }
        };
        tokio::spawn(async move {
            let _ = conn.await;
            release_connection(Some(&c2), Some(&e2));
        });
        let owner = std::thread::current().id();
        let mut conns = ep.pool.h2.lock().expect("pool lock");
        conns.retain(|c| c.owner != owner);
        conns.push(H2Conn {
            send: send.clone(),
            created,
            owner,
        });
        drop(conns);
        Ok(Lease::H2(send))
    } else {
        Ok(Lease::H1(H1Conn::new(io, cluster, ep)))
    }
}

/// A new connection to `target` of `cluster`: TCP, and TLS over it when the cluster's
/// `DestinationRule` originates TLS (`h2`: offered by ALPN).
pub async fn connect_upstream(
    cluster: &ClusterState,
    target: &Target,
    limits: &PoolLimits,
    first: FirstByte,
    h2: bool,
) -> Result<super::h1::UpstreamIo, PoolError> {
    let stream = connect_tcp(target, limits, first, &cluster.guard).await?;
    let tls = cluster.policy.load().tls.clone();
    match tls {
        None => Ok(super::h1::UpstreamIo::Tcp(stream)),
        Some(tls) => originate_tls(&tls, &cluster.key.host, h2, stream, limits)
            .await
            .map(|s| super::h1::UpstreamIo::Tls(Box::new(s))),
    }
}

/// The TLS handshake of a cluster with `DestinationRule` `tls` (SIMPLE, MUTUAL), within the
/// connect timeout. A configuration that could not be made fails here, with its reason: never
/// plain text instead.
async fn originate_tls(
    tls: &crate::compile::tls::TlsOrigination,
    host: &str,
    h2: bool,
    stream: TcpStream,
    limits: &PoolLimits,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, PoolError> {
    let failed = |e: String| PoolError::Connect(format!("TLS_error: {e}"));
    let config = tls.config().map_err(failed)?;
    let name = tls.server_name(host).map_err(failed)?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(limits.connect_timeout, connector.connect(name, stream))
        .await
        .map_err(|_| PoolError::ConnectTimeout)?
        .map_err(|e| failed(e.to_string()))
}

impl EndpointPool {
    /// A live HTTP/2 connection: this thread's, or (`own_only` false) any runtime's. Closed ones
    /// and ones past maxConnectionDuration leave the list (they drain as their streams finish).
    fn h2_conn(
        &self,
        max_duration: Option<Duration>,
        own_only: bool,
    ) -> Option<http2::SendRequest<ReqBody>> {
        let me = std::thread::current().id();
        let mut conns = self.h2.lock().expect("pool lock");
        conns.retain(|c| !c.send.is_closed() && !too_old(c.created, max_duration));
        conns
            .iter()
            .find(|c| c.owner == me)
            .or_else(|| if own_only { None } else { conns.first() })
            .map(|c| c.send.clone())
    }

    /// The most recently returned live idle connection of this thread's runtime, or (`own_only`
    /// false, at maxConnections) of any runtime. Constant work per call however many are idle
    /// (h2c with hundreds of streams keeps hundreds of upstream HTTP/1 connections): expired
    /// connections leave from the fronts, where the oldest are; only candidates are checked.
    fn take_idle(
        &self,
        idle_timeout: Duration,
        max_duration: Option<Duration>,
        own_only: bool,
    ) -> Option<H1Conn> {
        let me = std::thread::current().id();
        let now = Instant::now();
        let mut lists = self.idle.lock().expect("pool lock");
        let usable = |c: &Idle| {
            max_duration.is_none_or(|m| now.saturating_duration_since(c.conn.created) < m)
                && c.conn.usable_idle()
        };
        for (owner, list) in lists.iter_mut() {
            while list
                .front()
                .is_some_and(|c| now.saturating_duration_since(c.since) >= idle_timeout)
            {
                list.pop_front();
            }
            if *owner != me {
                continue;
            }
            while let Some(c) = list.pop_back() {
                if usable(&c) {
                    return Some(c.conn);
                }
            }
        }
        if own_only {
            return None;
        }
        for (_, list) in lists.iter_mut() {
            while let Some(c) = list.pop_back() {
                if usable(&c) {
                    return Some(c.conn);
                }
            }
        }
        None
    }

    /// Close idle HTTP/1 connections past `idleTimeout` or closed by the upstream (run
    /// periodically, so a connection the upstream closed does not linger in CLOSE_WAIT until
    /// the next request to this endpoint).
    pub fn sweep_idle(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut closed: Vec<Idle> = Vec::new();
        let mut lists = self.idle.lock().expect("pool lock");
        for (_, list) in lists.iter_mut() {
            let (gone, keep): (std::collections::VecDeque<Idle>, _) =
                list.drain(..).partition(|c| {
                    now.saturating_duration_since(c.since) >= idle_timeout || !c.conn.usable_idle()
                });
            closed.extend(gone);
            *list = keep;
        }
        drop(lists);
        // `closed` drops here, outside the lock: dropping a connection notifies the waiters.
    }
}

/// Put an HTTP/1 connection whose response ended back on its endpoint's idle list (the list of
/// the runtime whose I/O driver its socket is registered with), unless it served
/// `maxRequestsPerConnection` requests or is past `maxConnectionDuration` (dropping it closes
/// it), or its endpoint or cluster is gone.
pub fn recycle(conn: H1Conn) {
    let (Some(cluster), Some(ep)) = (conn.cluster(), conn.endpoint()) else {
        return;
    };
    let policy = cluster.policy.load();
    let max = policy.pool.max_requests_per_connection;
    if (max > 0 && conn.used >= max) || too_old(conn.created, policy.pool.max_connection_duration) {
        return;
    }
    let owner = conn.owner;
    let idle = Idle {
        conn,
        since: Instant::now(),
    };
    let mut lists = ep.pool.idle.lock().expect("pool lock");
    match lists.iter_mut().find(|(o, _)| *o == owner) {
        Some((_, list)) => list.push_back(idle),
        None => lists.push((owner, std::collections::VecDeque::from([idle]))),
    }
    drop(lists);
    if cluster.pending_requests.load(Ordering::Relaxed) > 0 {
        cluster.conn_released.notify_waiters();
    }
}
