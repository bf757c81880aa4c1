//! The node proxy's data plane: listeners that follow the snapshot, protocol selection per
//! connection, and the HTTP and TCP forwarding paths.
//!
//! Each accepted connection is identified by the address it arrived on (`--capture none`: the
//! service address the proxy listens on; eBPF capture: the original destination). Every request
//! reads the current [`View`] (snapshot + cluster state) once; in-flight requests finish on the
//! view they started with.

pub mod body;
pub mod error;
pub mod http;
pub mod listener;
pub mod tcp;
pub mod tls;

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
}

/// Default `--credentials-dir`.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/etc/nodeproxy/credentials";

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            gateway_ip: IpAddr::from([0, 0, 0, 0]),
            shadow_host_suffix: false,
            credentials_dir: DEFAULT_CREDENTIALS_DIR.into(),
            locality: None,
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
        }
    }

    /// The client workload's metric identity.
    pub fn source_side(&self, snap: &Snapshot) -> crate::telemetry::metrics::Side {
        self.source
            .get_or_init(|| crate::telemetry::metrics::Side::source(snap, self.peer.ip()))
            .clone()
    }

    /// The listener port.
    pub fn port(&self) -> u16 {
        self.original_dst.port()
    }
}

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
    /// Signals worker runtimes that a new view is installed.
    views: tokio::sync::watch::Sender<u64>,
    mirrors: Arc<Semaphore>,
}

impl Shared {
    /// Shared state starting from `snapshot`.
    pub fn new(
        snapshot: Arc<Snapshot>,
        options: ProxyOptions,
        kernel: Option<Arc<crate::dataplane::Kernel>>,
    ) -> Arc<Self> {
        let clusters = Clusters::new(options.locality.clone());
        let view = clusters.sync(snapshot);
        Arc::new(Shared {
            view: ArcSwap::from_pointee(view),
            clusters,
            options,
            kernel,
            tls: tls::TlsConfigs::default(),
            views: tokio::sync::watch::channel(0).0,
            metrics: crate::telemetry::Metrics::new(),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
        })
    }

    /// Install a new snapshot (cluster state carried over) and tell the worker runtimes.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        let version = snapshot.version;
        let view = self.clusters.sync(snapshot);
        self.view.store(Arc::new(view));
        self.views.send_replace(version);
    }

    /// Follow view changes (worker runtimes).
    pub fn subscribe_views(&self) -> tokio::sync::watch::Receiver<u64> {
        self.views.subscribe()
    }

    /// Dispatch a mirror copy, fire and forget; dropped (and counted) when too many are in flight.
    pub fn spawn_mirror(
        &self,
        state: Arc<ClusterState>,
        protocol: Protocol,
        req: http::UpstreamRequest,
    ) {
        match self.mirrors.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    http::send_mirror(state, protocol, req).await;
                    drop(permit);
                });
            }
            Err(_) => {
                state.stats.mirror_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
