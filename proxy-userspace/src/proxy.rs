//! The node proxy's data plane: listeners that follow the snapshot, protocol selection per
//! connection, and the HTTP and TCP forwarding paths.
//!
//! Each accepted connection is identified by the address it arrived on (`--capture none`: the
//! service address the proxy listens on; eBPF capture: the original destination). Every request
//! reads the current [`View`] (snapshot + cluster state) once; in-flight requests finish on the
//! view they started with.

pub mod accepted;
pub mod affinity;
pub mod decide;
pub mod forward;
pub mod h1server;
pub mod headers;
pub mod http;
pub mod listener;
pub mod respond;
pub mod tcp;
pub mod tls;
pub mod upgrade;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::compile::{Listener, Protocol, Snapshot};
use crate::upstream::{ClusterState, Clusters, View};

/// Mirror requests in flight at most (beyond: dropped and counted).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// Data-plane options from the command line.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Address Gateway servers listen on.
    pub gateway_ip: IpAddr,
    /// Append `-shadow` to the mirrored Host (Istio <= 1.27 behaviour; off by default since 1.28).
    pub shadow_host_suffix: bool,
    /// Where Gateway `credentialName` secrets live as `<name>.crt` / `<name>.key`.
    pub credentials_dir: std::path::PathBuf,
    /// The node's locality, `region/zone/subzone` (for locality-aware load balancing).
    pub locality: Option<String>,
    /// How long downstream HTTP/1 connections may take, or stay idle.
    pub timeouts: Timeouts,
    /// Node ranges upstream connections may reach although capture refuses them
    /// (`--allow-upstream-cidr`).
    pub allow_upstream: Vec<ipnet::IpNet>,
    /// Downstream connections past which those waiting for a request are shed (0: no cap);
    /// past twice this, new connections are closed at accept.
    pub max_connections: usize,
    /// Listening sockets inherited from a predecessor, and those to pass on to a successor.
    pub sockets: Arc<crate::sockets::Sockets>,
}

/// Downstream HTTP/1 time limits: what a slow or idle client may hold (a slowloris holds a
/// connection, a descriptor and a buffer for as long as it is allowed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From a connection's accept, or a request's first byte, to its complete head (Envoy's
    /// `request_headers_timeout` idea). 408 and close.
    pub request_head: std::time::Duration,
    /// A keep-alive connection between requests (Envoy's `idle_timeout`). Closed.
    pub idle: std::time::Duration,
    /// Between two reads of a request body. 408 and close.
    pub body_idle: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_head: std::time::Duration::from_secs(10),
            idle: std::time::Duration::from_secs(60),
            body_idle: std::time::Duration::from_secs(30),
        }
    }
}

/// The descriptor-pressure signal: one `Notify` per data-plane thread, so that a connection's
/// wait registers with its own thread's (a connection stays on one thread) and keep-alive
/// requests on different cores never share a lock; the accept loop wakes them all.
pub struct ShedSignal {
    /// Unique per signal (a thread may serve several proxies, e.g. in tests; an address could
    /// be reused after one is dropped).
    id: u64,
    all: std::sync::Mutex<Vec<Arc<tokio::sync::Notify>>>,
}

impl Default for ShedSignal {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        ShedSignal {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            all: std::sync::Mutex::default(),
        }
    }
}

impl ShedSignal {
    /// This thread's `Notify` (made and registered on the thread's first call).
    pub fn local(&self) -> Arc<tokio::sync::Notify> {
        thread_local! {
            static LOCAL: std::cell::RefCell<Vec<(u64, Arc<tokio::sync::Notify>)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let me = self.id;
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if let Some((_, n)) = l.iter().find(|(k, _)| *k == me) {
                return n.clone();
            }
            let n = Arc::new(tokio::sync::Notify::new());
            self.all.lock().expect("shed lock").push(n.clone());
            l.push((me, n.clone()));
            n
        })
    }

    /// Wake every waiting connection on every thread.
    pub fn notify_all(&self) {
        for n in self.all.lock().expect("shed lock").iter() {
            n.notify_waiters();
        }
    }
}

/// Under descriptor pressure, a connection that has waited this long for a request head (a
/// slow head, or idle between requests) closes; one whose head is on its way in a normal
/// round trip is left alone.
pub const SHED_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Default `--credentials-dir`.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/etc/nodeproxy/credentials";

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            gateway_ip: IpAddr::from([0, 0, 0, 0]),
            shadow_host_suffix: false,
            credentials_dir: DEFAULT_CREDENTIALS_DIR.into(),
            locality: None,
            timeouts: Timeouts::default(),
            allow_upstream: Vec::new(),
            max_connections: 0,
            sockets: Arc::default(),
        }
    }
}

/// Which listener a connection belongs to.
#[derive(Debug, Clone, Copy)]
pub enum ListenerRef {
    /// A mesh service address:port.
    Mesh(SocketAddr),
    /// A gateway port.
    Gateway(u16),
}

impl ListenerRef {
    /// The listener in `snap`.
    pub fn lookup(self, snap: &Snapshot) -> Option<&Listener> {
        match self {
            ListenerRef::Mesh(a) => snap.mesh_listener(a),
            ListenerRef::Gateway(p) => snap.gateway_listener(p),
        }
    }
}

/// Per-connection facts.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// Address the proxy accepted on.
    pub local: SocketAddr,
    /// The destination the client asked for.
    pub original_dst: SocketAddr,
    /// Listener identity.
    pub listener: ListenerRef,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The client's identity, looked up once per connection (a workload's labels for an IP do
    /// not change while a connection lives).
    pub source: std::sync::OnceLock<crate::telemetry::metrics::Side>,
    /// The client's labels and namespace for `sourceLabels`/`sourceNamespace` matching,
    /// looked up once per connection for the same reason.
    pub source_info: std::sync::OnceLock<crate::compile::route::SourceInfo>,
}

impl ConnInfo {
    /// A connection's facts.
    pub fn new(
        peer: SocketAddr,
        local: SocketAddr,
        original_dst: SocketAddr,
        listener: ListenerRef,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            local,
            original_dst,
            listener,
            scheme: "http",
            source: std::sync::OnceLock::new(),
            source_info: std::sync::OnceLock::new(),
        }
    }

    /// The client workload's metric identity.
    pub fn source_side(&self, snap: &Snapshot) -> crate::telemetry::metrics::Side {
        self.source
            .get_or_init(|| crate::telemetry::metrics::Side::source(snap, self.peer.ip()))
            .clone()
    }

    /// The client as route matching sees it.
    pub fn source_info(&self, snap: &Snapshot) -> &crate::compile::route::SourceInfo {
        self.source_info
            .get_or_init(|| snap.source_info(self.peer.ip()))
    }

    /// The gateway port the connection arrived on, if a gateway's.
    pub fn gateway_port(&self) -> Option<u16> {
        match self.listener {
            ListenerRef::Gateway(p) => Some(p),
            ListenerRef::Mesh(_) => None,
        }
    }

    /// The listener port.
    pub fn port(&self) -> u16 {
        self.original_dst.port()
    }
}

/// An accepted connection handed to a worker runtime.
pub type Handoff = (std::net::TcpStream, Arc<ConnInfo>);

/// The queue feeding one worker runtime.
pub type WorkerQueue = tokio::sync::mpsc::UnboundedSender<Handoff>;

/// State shared by every connection.
pub struct Shared {
    /// Snapshot and cluster states in force.
    pub view: ArcSwap<View>,
    /// Cluster states across swaps.
    pub clusters: Clusters,
    /// Options.
    pub options: ProxyOptions,
    /// TLS server configs of terminating gateway ports.
    pub tls: tls::TlsConfigs,
    /// Metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// The eBPF data path, when capture is `ebpf`.
    pub kernel: Option<Arc<crate::dataplane::Kernel>>,
    /// Hand-off queues of the worker runtimes (set once at start).
    workers: std::sync::OnceLock<Vec<WorkerQueue>>,
    next_worker: std::sync::atomic::AtomicUsize,
    mirrors: Arc<Semaphore>,
    /// Downstream connections being served.
    active: Arc<std::sync::atomic::AtomicUsize>,
    draining: std::sync::atomic::AtomicBool,
    /// Snapshot version the data plane (listeners, kernel maps) has applied.
    applied: std::sync::atomic::AtomicU64,
    /// What upstream connections may dial (SSRF guard).
    pub guard: Arc<crate::upstream::guard::DialGuard>,
    /// Woken when the node runs out of descriptors: every connection waiting for a request
    /// head (slow, or idle between requests) for longer than [`SHED_GRACE`] closes.
    pub shed: ShedSignal,
    /// Listeners the snapshot asks for that could not be bound, with why (retried).
    unbound: std::sync::Mutex<std::collections::BTreeMap<SocketAddr, String>>,
    /// Set when a successor serves the listening sockets: this process stops accepting.
    accepting_stopped: tokio::sync::watch::Sender<bool>,
}

/// Counts a downstream connection while it is served.
pub struct ActiveConn(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Shared state starting from `snapshot`.
    pub fn new(
        snapshot: Arc<Snapshot>,
        options: ProxyOptions,
        kernel: Option<Arc<crate::dataplane::Kernel>>,
    ) -> Arc<Self> {
        let metrics = crate::telemetry::Metrics::new();
        let mut guard = crate::upstream::guard::DialGuard::new(
            kernel.is_some(),
            options.allow_upstream.clone(),
            metrics.upstream_refused.clone(),
        );
        if let Some(k) = &kernel {
            guard = guard.with_socket(crate::dataplane::abi::NP_PROXY_MARK, k.splice_hook());
        }
        let guard = Arc::new(guard);
        if let Some(k) = &kernel {
            for &a in k.captures() {
                guard.add_base(a);
            }
        }
        let clusters = Clusters::new(options.locality.clone(), guard.clone());
        let view = clusters.sync(snapshot);
        Arc::new(Shared {
            view: ArcSwap::from_pointee(view),
            clusters,
            options,
            kernel,
            tls: tls::TlsConfigs::default(),
            workers: std::sync::OnceLock::new(),
            next_worker: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            guard,
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            active: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            draining: std::sync::atomic::AtomicBool::new(false),
            applied: std::sync::atomic::AtomicU64::new(0),
            unbound: std::sync::Mutex::default(),
            accepting_stopped: tokio::sync::watch::Sender::new(false),
            shed: ShedSignal::default(),
        })
    }

    /// Count a connection until the guard drops.
    pub fn track_connection(&self) -> ActiveConn {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConn(self.active.clone())
    }

    /// Downstream connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Start draining: `/ready` fails and HTTP/1 responses close their connection.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Stop accepting on every listening socket (a successor accepts on them now); the
    /// connections already accepted are served on.
    pub fn stop_accepting(&self) {
        self.accepting_stopped.send_replace(true);
    }

    /// Resolves once [`Shared::stop_accepting`] was called (at once if it was).
    pub fn accepting_stopped(&self) -> tokio::sync::watch::Receiver<bool> {
        self.accepting_stopped.subscribe()
    }

    /// Record that listeners and kernel maps now follow snapshot `version`.
    pub fn set_applied(&self, version: u64) {
        self.applied.store(version, Ordering::Release);
    }

    /// The snapshot version the data plane has applied (0: none yet).
    pub fn applied_version(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Listeners the snapshot asks for that are not bound, with the reason; empty when every
    /// one is. The proxy is not ready while any is missing.
    pub fn unbound_listeners(&self) -> std::collections::BTreeMap<SocketAddr, String> {
        self.unbound.lock().expect("unbound lock").clone()
    }

    /// Record the listeners that failed to bind (the whole set, replacing the last).
    fn set_unbound(&self, unbound: std::collections::BTreeMap<SocketAddr, String>) {
        *self.unbound.lock().expect("unbound lock") = unbound;
    }

    /// Under descriptor pressure: close the connections that wait for a request head.
    pub fn shed_waiting(&self) {
        self.shed.notify_all();
    }

    /// Is the proxy draining?
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Install a new snapshot (cluster state carried over).
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        let view = self.clusters.sync(snapshot);
        self.view.store(Arc::new(view));
    }

    /// Set the worker runtimes' hand-off queues (once).
    pub fn set_workers(&self, workers: Vec<WorkerQueue>) {
        let _ = self.workers.set(workers);
    }

    /// Serve an accepted connection: round robin over this runtime and the workers.
    pub fn dispatch(self: &Arc<Self>, stream: std::net::TcpStream, conn: Arc<ConnInfo>) {
        let workers = self.workers.get().map(Vec::as_slice).unwrap_or(&[]);
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % (workers.len() + 1);
        let (stream, conn) = if i == 0 {
            (stream, conn)
        } else {
            match workers[i - 1].send((stream, conn)) {
                Ok(()) => return,
                // The worker is gone (shutdown): serve here rather than drop the connection.
                Err(tokio::sync::mpsc::error::SendError(back)) => back,
            }
        };
        listener::spawn_served(self, conn, stream);
    }

    /// Dispatch a mirror copy, fire and forget; dropped (and counted) when too many are in flight.
    pub fn spawn_mirror(
        &self,
        state: Arc<ClusterState>,
        protocol: Protocol,
        req: forward::UpstreamRequest,
    ) {
        match self.mirrors.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    forward::send_mirror(state, protocol, req).await;
                    drop(permit);
                });
            }
            Err(_) => {
                state.stats.mirror_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
