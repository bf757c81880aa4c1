//! TCP and TLS (SNI) forwarding: pick a rule (first match wins; no match falls back to the
//! service's own cluster, or for TLS rules closes with NR), pick a destination per connection,
//! pass the maxConnections breaker, connect, and copy bytes both ways.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{ConnInfo, Shared};
use crate::compile::{ClusterId, ClusterRef, match_l4};
use crate::reply::Flags;
use crate::telemetry::TcpAccess;
use crate::telemetry::metrics::{Side, peers};
use crate::upstream::outlier::{self, Outcome};
use crate::upstream::{lb, pool};

/// How long to wait for a ClientHello.
const SNI_TIMEOUT: Duration = Duration::from_secs(5);

/// Proxy one TCP connection (`sni_routed`: use the listener's TLS rules).
pub async fn proxy(shared: Arc<Shared>, conn: Arc<ConnInfo>, down: TcpStream, sni_routed: bool) {
    let start = Instant::now();
    let views = shared.view.load_full();
    let view = views.for_client(conn.gateway_port(), conn.peer.ip());
    let snap = &view.snapshot;
    let mut sni = None;
    // A connection closed before any upstream byte: log it with its flag.
    let refused = |sni: Option<&str>, cluster: Option<&str>, flags: Flags| {
        TcpAccess {
            peer: conn.peer,
            dst: conn.local,
            sni,
            cluster,
            upstream: None,
            flags,
            sent: 0,
            received: 0,
            start,
        }
        .log()
    };
    let Some(listener) = conn.listener.lookup(snap) else {
        refused(None, None, Flags::NR);
        return;
    };
    if sni_routed {
        sni = read_sni(&down).await;
    }
    let (cid, name) = match route(snap, listener, &conn, sni_routed, sni.as_deref()) {
        Ok(r) => r,
        Err((name, flags)) => {
            refused(sni.as_deref(), name, flags);
            return;
        }
    };
    let state = view.clusters[cid].clone();
    let policy = state.policy.load_full();
    let ep = match endpoint(snap, &state, &policy, cid, &conn, sni.as_deref()) {
        Ok(ep) => ep,
        Err(flags) => {
            refused(sni.as_deref(), Some(name), flags);
            return;
        }
    };
    // TCP proxy: maxConnections overflow closes the downstream connection at once (UO).
    let Some(_slot) = Slot::take(&state, policy.pool.max_connections) else {
        refused(sni.as_deref(), Some(name), Flags::UO);
        return;
    };
    let upstream = ep.target.to_string();
    let log = |flags, sent, received| {
        TcpAccess {
            peer: conn.peer,
            dst: conn.local,
            sni: sni.as_deref(),
            cluster: Some(name),
            upstream: Some(&upstream),
            flags,
            sent,
            received,
            start,
        }
        .log()
    };
    if policy.tls.is_some() {
        // TLS origination is for HTTP; a TCP connection is never sent in plain text instead.
        tracing::warn!(cluster = %state.key.name(), "TCP to a cluster whose DestinationRule originates TLS: not supported, refused");
        log(Flags::UF, 0, 0);
        let mut down = down;
        let _ = down.shutdown().await;
        return;
    }
    let first = pool::FirstByte::Either;
    let up = match pool::connect_tcp(&ep.target, &policy.pool, first, &state.guard).await {
        Ok(s) => s,
        Err(_) => {
            outlier::record(&state, &ep, Outcome::LocalFailure);
            log(Flags::UF, 0, 0);
            let mut down = down;
            let _ = down.shutdown().await;
            return;
        }
    };
    let (received, sent, ended) =
        serve_bytes(&shared, snap, &conn, cid, &ep, &policy, down, up).await;
    let flags = match ended {
        Ended::MaxDuration => Flags::DT,
        _ => Flags::NONE,
    };
    log(flags, sent, received);
}

/// Copy bytes both ways, counted in the TCP metrics and the endpoint's connections: until
/// either side closes, the connection idles for tcp.idleTimeout (1h by default) or lives for
/// tcp.maxConnectionDuration (flag DT).
#[allow(clippy::too_many_arguments)]
async fn serve_bytes(
    shared: &Shared,
    snap: &crate::compile::Snapshot,
    conn: &ConnInfo,
    cid: ClusterId,
    ep: &crate::upstream::EndpointState,
    policy: &crate::compile::policy::ClusterPolicy,
    mut down: TcpStream,
    mut up: TcpStream,
) -> (u64, u64, Ended) {
    ep.active_connections.fetch_add(1, Ordering::Relaxed);
    let labels = peers(
        &Side::source(snap, conn.peer.ip()),
        Some(&ep.side),
        Some(snap.service(snap.clusters[cid].service)),
        "",
        "tcp",
    );
    let m = &shared.metrics;
    m.tcp_opened.get_or_create(&labels).inc();
    let pool = &policy.pool;
    let (received, sent, ended) = copy_bounded(
        &mut down,
        &mut up,
        pool.tcp_idle_timeout,
        pool.max_connection_duration,
    )
    .await;
    ep.active_connections.fetch_sub(1, Ordering::Relaxed);
    m.tcp_closed.get_or_create(&labels).inc();
    m.tcp_sent.get_or_create(&labels).inc_by(sent);
    m.tcp_received.get_or_create(&labels).inc_by(received);
    (received, sent, ended)
}

/// The cluster a connection goes to: the first TLS (by SNI) or TCP rule that matches, one of
/// its weighted destinations; else the service's own cluster. `Err`: the cluster name, when
/// known, and the flag to close with (NR: no route, NC: no such cluster).
fn route<'s>(
    snap: &'s crate::compile::Snapshot,
    listener: &'s crate::compile::Listener,
    conn: &ConnInfo,
    sni_routed: bool,
    sni: Option<&str>,
) -> Result<(ClusterId, &'s str), (Option<&'s str>, Flags)> {
    let source = conn.source_info(snap);
    let dst_ip = Some(conn.original_dst.ip());
    let chosen = if sni_routed && !listener.tls.is_empty() {
        let rule = match_l4(&listener.tls, dst_ip, source, sni).ok_or((None, Flags::NR))?;
        Some(&rule.route)
    } else {
        match_l4(&listener.tcp, dst_ip, source, None).map(|r| &r.route)
    };
    let (cluster, name) = match chosen {
        Some(wc) => {
            let c = match wc.clusters.len() {
                1 => &wc.clusters[0],
                _ => &wc.clusters[super::decide::Dice::pick(&mut super::decide::ThreadDice, wc)],
            };
            (&c.cluster, c.name.as_str())
        }
        None => {
            let id = listener.default_cluster.ok_or((None, Flags::NR))?;
            return Ok((id, &snap.clusters[id].name));
        }
    };
    match cluster {
        ClusterRef::Cluster(id) => Ok((*id, name)),
        ClusterRef::Missing(_) => Err((Some(name), Flags::NC)),
    }
}

/// The endpoint for a connection: the original destination for a passthrough cluster
/// (resolution NONE / PASSTHROUGH; it exists only when captured, else UF), else the load
/// balancer's pick (source-IP hash for consistent hashing; UH when none is healthy).
fn endpoint(
    snap: &crate::compile::Snapshot,
    state: &crate::upstream::ClusterState,
    policy: &crate::compile::policy::ClusterPolicy,
    cid: ClusterId,
    conn: &ConnInfo,
    sni: Option<&str>,
) -> Result<Arc<crate::upstream::EndpointState>, Flags> {
    if let (Some(port), Some(sni)) = (snap.clusters[cid].resolve_requested_host, sni) {
        // A wildcard DNS entry: the SNI's host, if it is under the wildcard.
        let host = sni.to_ascii_lowercase();
        if !crate::compile::registry::host_matches(&state.key.host, &host) {
            return Err(Flags::UF);
        }
        return Ok(Arc::new(crate::upstream::EndpointState::transient_name(
            host, port,
        )));
    }
    if snap.clusters[cid].passthrough {
        if conn.original_dst == conn.local {
            return Err(Flags::UF);
        }
        return Ok(Arc::new(crate::upstream::EndpointState::transient(
            conn.original_dst,
        )));
    }
    let set = state.lb_set_for_request();
    let hash = matches!(
        policy.lb.algorithm,
        crate::compile::policy::LbAlgorithm::RingHash { .. }
            | crate::compile::policy::LbAlgorithm::Maglev { .. }
    )
    .then(|| lb::hash64(conn.peer.ip()));
    lb::pick(&state.lb, &policy.lb.algorithm, &set, hash, &[]).ok_or(Flags::UH)
}

/// A connection of a cluster's maxConnections, held while the connection lives.
struct Slot(Arc<crate::upstream::ClusterState>);

impl Slot {
    /// Take one, or count an overflow.
    fn take(state: &Arc<crate::upstream::ClusterState>, max: u32) -> Option<Slot> {
        let taken = state
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            state
                .stats
                .upstream_cx_overflow
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.conn_released.notify_waiters();
    }
}

/// Why a bounded copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A side closed (or failed).
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// The connection reached its maximum duration.
    MaxDuration,
}

/// Copy both ways until a side closes, nothing moves for `idle`, or `max` elapses.
/// Returns (bytes client→upstream, bytes upstream→client, why it ended).
pub async fn copy_bounded(
    a: &mut TcpStream,
    b: &mut TcpStream,
    idle: Option<Duration>,
    max: Option<Duration>,
) -> (u64, u64, Ended) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let (mut up, mut down) = (0u64, 0u64);
    let (mut a_open, mut b_open) = (true, true);
    let mut buf_a = vec![0u8; 16 * 1024];
    let mut buf_b = vec![0u8; 16 * 1024];
    let deadline = max.map(|m| tokio::time::Instant::now() + m);
    loop {
        if !a_open && !b_open {
            return (up, down, Ended::Closed);
        }
        let idle_sleep = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let max_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = ar.read(&mut buf_a), if a_open => {
                if relay(r, &buf_a, &mut bw, &mut a_open, b_open, &mut up).await {
                    return (up, down, Ended::Closed);
                }
            }
            r = br.read(&mut buf_b), if b_open => {
                if relay(r, &buf_b, &mut aw, &mut b_open, a_open, &mut down).await {
                    return (up, down, Ended::Closed);
                }
            }
            _ = idle_sleep => return (up, down, Ended::Idle),
            _ = max_sleep => return (up, down, Ended::MaxDuration),
        }
    }
}

/// One direction's read result: write it on, or half-close the other side at EOF (`open` goes
/// false). True when the copy is over (both directions closed, or a write failed).
async fn relay<W: AsyncWrite + Unpin>(
    read: std::io::Result<usize>,
    buf: &[u8],
    to: &mut W,
    open: &mut bool,
    other_open: bool,
    moved: &mut u64,
) -> bool {
    match read {
        Ok(0) | Err(_) => {
            *open = false;
            let _ = to.shutdown().await;
            !other_open
        }
        Ok(n) => {
            if to.write_all(&buf[..n]).await.is_err() {
                return true;
            }
            *moved += n as u64;
            false
        }
    }
}

/// Peek the ClientHello (without consuming it) and return its SNI.
pub async fn read_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + SNI_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline.into(), stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        match parse_sni(&buf[..n]) {
            Ok(sni) => return sni,
            Err(Incomplete) if n < buf.len() => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(Incomplete) => return None,
        }
    }
}

/// Not enough bytes yet.
#[derive(Debug, PartialEq)]
pub struct Incomplete;

/// Parse the server_name extension of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3).
/// `Ok(None)`: not TLS or no SNI.
pub fn parse_sni(b: &[u8]) -> Result<Option<String>, Incomplete> {
    if b.len() < 5 {
        return Err(Incomplete);
    }
    if b[0] != 22 {
        return Ok(None); // not a handshake record
    }
    let rec_len = u16::from_be_bytes([b[3], b[4]]) as usize;
    if b.len() < 5 + rec_len {
        return Err(Incomplete);
    }
    let h = &b[5..5 + rec_len];
    let get = |i: usize| h.get(i).copied();
    if get(0) != Some(1) {
        return Ok(None); // not a ClientHello
    }
    // type(1) len(3) version(2) random(32)
    let mut i = 4 + 2 + 32;
    let sid = get(i).ok_or(Incomplete)? as usize;
    i += 1 + sid;
    let cs =
        u16::from_be_bytes([get(i).ok_or(Incomplete)?, get(i + 1).ok_or(Incomplete)?]) as usize;
    i += 2 + cs;
    let comp = get(i).ok_or(Incomplete)? as usize;
    i += 1 + comp;
    if i + 2 > h.len() {
        return Ok(None);
    }
    let ext_end = (i + 2 + u16::from_be_bytes([h[i], h[i + 1]]) as usize).min(h.len());
    i += 2;
    while i + 4 <= ext_end {
        let ty = u16::from_be_bytes([h[i], h[i + 1]]);
        let len = u16::from_be_bytes([h[i + 2], h[i + 3]]) as usize;
        let data = h.get(i + 4..i + 4 + len).ok_or(Incomplete)?;
        if ty == 0 && data.len() >= 5 && data[2] == 0 {
            let n = u16::from_be_bytes([data[3], data[4]]) as usize;
            return Ok(data
                .get(5..5 + n)
                .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase()));
        }
        i += 4 + len;
    }
    Ok(None)
}

/// Does this look like the start of an HTTP request (method token or the HTTP/2 preface)?
pub fn looks_like_http(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    b.starts_with(b"PRI * HTTP/2.0")
        || METHODS
            .iter()
            .any(|m| b.starts_with(m) || (b.len() < m.len() && m.starts_with(b)))
}
