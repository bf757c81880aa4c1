//! Listeners follow the snapshot: each new version binds the addresses that appeared and stops
//! accepting on those that went away (connections already accepted run to completion). Each
//! connection's protocol comes from its listener: HTTP ports are served by `h1server` (HTTP/1.1;
//! h2c prior knowledge goes on to hyper's HTTP/2 server), TCP ports are copied byte for byte,
//! TLS ports are routed by SNI, and undeclared ports are sniffed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::accepted::Accepted;
use super::{ConnInfo, ListenerRef, Shared, h1server, tcp, tls};
use crate::compile::{ListenerKind, Protocol, Snapshot};
use crate::publish::Publisher;
use crate::upstream::outlier;

/// How often a listener that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_millis(500);

/// Addresses to listen on for a snapshot in `--capture none` mode.
pub fn desired(snap: &Snapshot, shared: &Shared) -> Vec<(SocketAddr, ListenerRef)> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Every scope's: an address only some namespaces see (exportTo) is still listened on.
    for l in snap.all_scopes().flat_map(|s| &s.listeners) {
        if !seen.insert((
            l.address,
            l.port,
            matches!(l.kind, ListenerKind::Gateway { .. }),
        )) {
            continue;
        }
        match (&l.kind, l.address) {
            // With eBPF capture, service addresses are virtual: connects reach the capture port.
            (ListenerKind::Mesh { .. }, Some(_)) if shared.kernel.is_some() => {}
            (ListenerKind::Mesh { .. }, Some(ip)) => {
                let a = SocketAddr::new(ip, l.port);
                out.push((a, ListenerRef::Mesh(a)));
            }
            (ListenerKind::Gateway { .. }, _) => out.push((
                SocketAddr::new(shared.options.gateway_ip, l.port),
                ListenerRef::Gateway(l.port),
            )),
            // Services without addresses are identified by port alone; binding 0.0.0.0:port
            // would capture the node's own traffic to that port, so --capture none skips them.
            (ListenerKind::Mesh { .. }, None) => {}
        }
    }
    out
}

/// The listening sockets (held by the primary runtime), kept in step with the snapshot.
#[derive(Default)]
struct Listeners {
    active: HashMap<SocketAddr, JoinHandle<()>>,
    capture: HashMap<SocketAddr, JoinHandle<()>>,
}

impl Listeners {
    /// Bind what `snap` asks for and stop accepting on what it no longer has (accepted
    /// connections run to completion).
    /// Binding failures (port in use, no permission) are recorded in `shared` and retried by
    /// the next call.
    fn apply(&mut self, shared: &Arc<Shared>, snap: &Snapshot) {
        if *shared.accepting_stopped().borrow() {
            // A successor accepts on these sockets now: close this process's descriptors.
            self.stop(shared);
            shared.set_unbound(Default::default());
            return;
        }
        let sockets = &shared.options.sockets;
        let mut unbound = std::collections::BTreeMap::new();
        if let Some(k) = &shared.kernel {
            for &addr in k.captures() {
                if self.capture.contains_key(&addr) {
                    continue;
                }
                match bind(sockets, addr) {
                    Ok(l) => {
                        tracing::info!(%addr, "capture listener");
                        let task = tokio::spawn(capture_loop(shared.clone(), k.clone(), l));
                        self.capture.insert(addr, task);
                    }
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "cannot listen on the capture address; retrying");
                        unbound.insert(addr, format!("capture listener: {e}"));
                    }
                }
            }
        }
        let want: HashMap<SocketAddr, ListenerRef> = desired(snap, shared).into_iter().collect();
        self.active.retain(|addr, task| {
            let keep = want.contains_key(addr);
            if !keep {
                tracing::info!(%addr, "listener removed");
                task.abort();
                sockets.closed(*addr);
            }
            keep
        });
        let before = shared.unbound_listeners();
        for (addr, lref) in want {
            if self.active.contains_key(&addr) {
                continue;
            }
            match bind(sockets, addr) {
                Ok(l) => {
                    if before.contains_key(&addr) {
                        tracing::info!(%addr, "listening (bound after retries)");
                    } else {
                        tracing::debug!(%addr, "listening");
                    }
                    self.active
                        .insert(addr, tokio::spawn(accept_loop(shared.clone(), l, lref)));
                }
                Err(e) => {
                    // Once per address, not once per retry.
                    if !before.contains_key(&addr) {
                        tracing::error!(%addr, error = %e, "cannot listen; not ready, retrying");
                    }
                    let what = match lref {
                        ListenerRef::Mesh(_) => "service listener",
                        ListenerRef::Gateway(_) => "gateway listener",
                    };
                    unbound.insert(addr, format!("{what}: {e}"));
                }
            }
        }
        shared.set_unbound(unbound);
        shared.guard.set_listeners(self.active.keys().copied());
    }
}

impl Listeners {
    /// Stop accepting everywhere and close this process's listening descriptors.
    fn stop(&mut self, shared: &Shared) {
        for (_, t) in self.active.drain().chain(self.capture.drain()) {
            t.abort();
        }
        shared.options.sockets.clear();
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for (_, t) in self.active.drain().chain(self.capture.drain()) {
            t.abort();
        }
    }
}

/// The primary runner: installs each published snapshot (view, kernel maps), runs the outlier
/// sweeps, and serves its own listeners, until the publisher is dropped.
pub async fn run(shared: Arc<Shared>, publisher: Arc<Publisher>) {
    let mut versions = publisher.subscribe();
    let mut listeners = Listeners::default();
    let sweeper = tokio::spawn(sweep(shared.clone()));
    let mut stopped = shared.accepting_stopped();
    let mut first = true;
    loop {
        let snap = publisher.load();
        // The view first: a service the kernel starts redirecting must already be routable.
        shared.update(snap.clone());
        if let Some(k) = &shared.kernel
            && let Err(e) = k.sync(&snap)
        {
            tracing::error!(error = %e, "kernel maps not updated; the previous service table stays");
        }
        listeners.apply(&shared, &snap);
        if std::mem::take(&mut first) {
            // Sockets a predecessor passed on that this configuration does not listen on.
            for addr in shared.options.sockets.release_inherited() {
                tracing::info!(%addr, "inherited listening socket closed: not in this configuration");
            }
        }
        shared.set_applied(snap.version);
        // Until the next snapshot, retry what could not be bound.
        let next = loop {
            let retry = !shared.unbound_listeners().is_empty();
            tokio::select! {
                changed = versions.changed() => break changed,
                () = tokio::time::sleep(BIND_RETRY), if retry => listeners.apply(&shared, &snap),
                Ok(()) = stopped.changed() => listeners.apply(&shared, &snap),
            }
        };
        if next.is_err() {
            break;
        }
    }
    sweeper.abort();
}

/// A worker runtime (one per extra core, single-threaded): serves the connections the acceptor
/// hands it, so each connection's tasks stay on one thread. Listening sockets exist once (in the
/// primary runtime): thousands of services do not multiply file descriptors per core.
pub async fn run_worker(
    shared: Arc<Shared>,
    mut conns: tokio::sync::mpsc::UnboundedReceiver<super::Handoff>,
) {
    while let Some((stream, conn)) = conns.recv().await {
        spawn_served(&shared, conn, stream);
    }
}

/// Serve an accepted (non-blocking, not yet registered) socket on a task of this runtime; it
/// joins this runtime's I/O driver when it first has to wait (see [`Accepted`]).
pub fn spawn_served(shared: &Arc<Shared>, conn: Arc<ConnInfo>, stream: std::net::TcpStream) {
    tokio::spawn(serve_connection(
        shared.clone(),
        conn,
        Accepted::new(stream),
    ));
}

/// Accept captured connections: their original destination comes from the kernel; a
/// connection without one is refused (the capture port is no open relay).
async fn capture_loop(
    shared: Arc<Shared>,
    kernel: Arc<crate::dataplane::Kernel>,
    listener: Listener,
) {
    let bound = listener.get_ref().local_addr().ok();
    loop {
        let (stream, peer) = accept(&shared, &listener).await;
        let Some(orig) = kernel.take_orig_dst(peer) else {
            tracing::warn!(%peer, "refused: connection to the capture port without an original destination");
            continue;
        };
        let local = local_addr(bound, &stream, peer);
        let conn = Arc::new(ConnInfo::new(peer, local, orig, ListenerRef::Mesh(orig)));
        shared.dispatch(stream, conn);
    }
}

/// A listening socket the primary runtime waits on. Accepted sockets are not registered with
/// its I/O driver: the runtime that serves a connection registers it once (registering here
/// and moving it to a worker cost an `epoll_ctl` delete and add per handed-off connection).
type Listener = AsyncFd<std::net::TcpListener>;

/// The next connection, non-blocking; accept errors (EMFILE and the like) are logged and
/// retried after a pause instead of spinning.
async fn accept(shared: &Shared, listener: &Listener) -> (std::net::TcpStream, SocketAddr) {
    loop {
        let accepted = match listener.readable().await {
            Ok(mut ready) => match ready.try_io(|l| {
                socket2::SockRef::from(l.get_ref())
                    .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            }) {
                Ok(r) => r,
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        match accepted {
            Ok((sock, addr)) => {
                shed_at_cap(shared);
                if let Some(peer) = addr.as_socket() {
                    return (sock.into(), peer);
                }
            }
            Err(e) => {
                // Out of descriptors: the connections that hold one without a request in
                // progress (slow heads, idle keep-alives) give theirs back first.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    shared.shed_waiting();
                }
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The downstream connection cap, at accept: at it, the connections waiting for a request
/// (slow heads, idle keep-alives, waiting longer than the shed grace) give theirs back, so an
/// attack on the count cannot lock out clients with work to do.
fn shed_at_cap(shared: &Shared) {
    let cap = shared.options.max_connections;
    if cap != 0 && shared.active_connections() >= cap {
        shared.metrics.downstream_shed.inc();
        shared.shed_waiting();
    }
}

/// Past twice the cap, a new connection waits a moment for the sheds to take effect and is
/// closed if they have not (in its own task: the accept loop never waits).
async fn room_past_cap(shared: &Shared) -> bool {
    let hard = shared.options.max_connections.saturating_mul(2);
    if hard == 0 || shared.active_connections() < hard {
        return true;
    }
    shared.shed_waiting();
    tokio::time::sleep(Duration::from_millis(50)).await;
    if shared.active_connections() < hard {
        return true;
    }
    shared.metrics.downstream_overflow.inc();
    false
}

/// The socket a predecessor passed on for `addr`, else a new one; recorded to pass on in turn.
#[allow(unsafe_code)]
fn bind(sockets: &crate::sockets::Sockets, addr: SocketAddr) -> std::io::Result<Listener> {
    let listener = match sockets.take_inherited(addr) {
        Some(l) => {
            l.set_nonblocking(true)?;
            tracing::info!(%addr, "listening on the socket passed on by the predecessor");
            l
        }
        None => bind_new(addr)?,
    };
    sockets.listening(&listener);
    // SAFETY: the `TcpListener` owns its file descriptor, returns that same descriptor from
    // `as_raw_fd` for as long as it lives, and lives exactly as long as the `AsyncFd` that
    // owns it, which is what `register_with_interest` asks for.
    unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

fn bind_new(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (one system call less per
    // connection than setting it on each).
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// A connection's local address: the listener's when it is bound to one address (no system
/// call), else the socket's.
fn local_addr(
    bound: Option<SocketAddr>,
    stream: &std::net::TcpStream,
    peer: SocketAddr,
) -> SocketAddr {
    match bound {
        Some(a) if !a.ip().is_unspecified() => a,
        _ => stream.local_addr().ok().or(bound).unwrap_or(peer),
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: Listener, lref: ListenerRef) {
    let bound = listener.get_ref().local_addr().ok();
    loop {
        let (stream, peer) = accept(&shared, &listener).await;
        let local = local_addr(bound, &stream, peer);
        let conn = Arc::new(ConnInfo::new(peer, local, local, lref));
        shared.dispatch(stream, conn);
    }
}

/// Serve one accepted connection according to its listener's protocol. Plain HTTP/1 is served
/// on the bare socket as long as nothing has to wait; TLS, TCP and protocol sniffing register
/// it at once.
pub async fn serve_connection(shared: Arc<Shared>, conn: Arc<ConnInfo>, accepted: Accepted) {
    if !room_past_cap(&shared).await {
        return;
    }
    let _active = shared.track_connection();
    let (protocol, tls_config) = {
        let views = shared.view.load();
        let view = views.for_client(conn.gateway_port(), conn.peer.ip());
        let Some(l) = conn.listener.lookup(&view.snapshot) else {
            return;
        };
        let tls_config = if tls::terminates(l) {
            match shared
                .tls
                .get(view.snapshot.version, l, &shared.options.credentials_dir)
            {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(port = l.port, error = %e, "cannot terminate TLS, closing connection");
                    return;
                }
            }
        } else {
            None
        };
        (l.protocol, tls_config)
    };
    if let Some(cfg) = tls_config {
        if let Some(stream) = register(accepted, &conn) {
            // Boxed: the TLS states are large, and an unboxed branch would size every plain
            // connection's task for them.
            Box::pin(serve_tls(shared, conn, stream, cfg)).await;
        }
        return;
    }
    match protocol {
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
            h1server::serve(shared, conn, accepted).await
        }
        Protocol::Tcp | Protocol::Https | Protocol::Tls => {
            if let Some(stream) = register(accepted, &conn) {
                let tls = !matches!(protocol, Protocol::Tcp);
                tcp::proxy(shared, conn, stream, tls).await
            }
        }
        Protocol::Unknown => {
            let Some(stream) = register(accepted, &conn) else {
                return;
            };
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.peek(&mut buf))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            if n > 0 && tcp::looks_like_http(&buf[..n]) {
                h1server::serve(shared, conn, stream).await
            } else {
                tcp::proxy(shared, conn, stream, false).await
            }
        }
    }
}

/// The connection as a Tokio stream, for the paths that wait at once (TLS handshake, TCP copy,
/// protocol sniffing); `None`, logged, when it cannot be registered.
fn register(accepted: Accepted, conn: &ConnInfo) -> Option<TcpStream> {
    accepted
        .into_registered()
        .inspect_err(
            |e| tracing::warn!(peer = %conn.peer, error = %e, "register accepted connection"),
        )
        .ok()
}

async fn serve_tls(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    stream: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    // The handshake is the head of a TLS connection: the same limit.
    let limit = shared.options.timeouts.request_head;
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let conn = Arc::new(ConnInfo {
                scheme: "https",
                ..(*conn).clone()
            });
            h1server::serve(shared, conn, tls_stream).await;
        }
        Ok(Err(e)) => tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(peer = %conn.peer, "TLS handshake timed out"),
    }
}

/// Run outlier-detection sweeps for every cluster at its interval, and once a second close
/// idle upstream HTTP/1 connections that timed out or that the upstream closed.
async fn sweep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_idle_sweep = Instant::now();
    loop {
        tick.tick().await;
        let views = shared.view.load_full();
        let now = Instant::now();
        for view in std::iter::once(&*views).chain(&views.scoped) {
            for (c, st) in view.snapshot.clusters.iter().zip(&view.clusters) {
                if c.policy.outlier.is_some() {
                    outlier::maybe_sweep(st, now);
                }
            }
        }
        if now.duration_since(last_idle_sweep) >= Duration::from_secs(1) {
            last_idle_sweep = now;
            // Clusters without open connections have nothing to sweep (most, with 10k services).
            for st in std::iter::once(&*views)
                .chain(&views.scoped)
                .flat_map(|v| &v.clusters)
                .filter(|st| st.connections.load(std::sync::atomic::Ordering::Relaxed) > 0)
            {
                let idle_timeout = st.policy.load().pool.idle_timeout;
                for ep in st.endpoints.load().iter() {
                    ep.pool.sweep_idle(idle_timeout);
                }
            }
        }
    }
}
