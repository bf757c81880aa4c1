//! Upstream clusters at run time: endpoint state (active requests, health, outlier ejection),
//! circuit breakers, load balancing and connection pools.
//!
//! State lives here, outside the immutable snapshot, keyed by [`ClusterKey`] and endpoint
//! address, so health, ejections, pool counters and LB cursors survive a snapshot swap for
//! clusters that still exist. [`Clusters::sync`] builds the per-snapshot view.

pub mod guard;
pub mod h1;
pub mod lb;
pub mod locality;
pub mod outlier;
pub mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::compile::policy::ClusterPolicy;
use crate::compile::{Cluster, ClusterKey, EndpointAddress, Snapshot};

/// Where an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Target {
    /// A socket address.
    Addr(SocketAddr),
    /// A DNS name and port, resolved at connect time.
    Name(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// One endpoint of a cluster and its run-time state.
#[derive(Debug)]
pub struct EndpointState {
    /// Address.
    pub target: Target,
    /// LB weight.
    pub weight: u32,
    /// Labels (for metrics).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Requests in flight.
    pub active_requests: AtomicU32,
    /// Open upstream connections.
    pub active_connections: AtomicU32,
    /// Ejected by outlier detection.
    pub ejected: AtomicBool,
    /// Outlier counters and ejection history.
    pub outlier: Mutex<outlier::HostOutlier>,
    /// Idle HTTP connections.
    pub(crate) pool: pool::EndpointPool,
    /// Workload identity for metrics.
    pub side: crate::telemetry::metrics::Side,
    /// `region/zone/subzone`, when known.
    pub locality: Option<String>,
    /// Metric series of the requests this endpoint served.
    pub series: crate::telemetry::metrics::SeriesCache,
}

impl EndpointState {
    fn new(
        target: Target,
        weight: u32,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Self {
        EndpointState {
            target,
            weight,
            labels,
            active_requests: AtomicU32::new(0),
            active_connections: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            outlier: Mutex::new(outlier::HostOutlier::default()),
            pool: pool::EndpointPool::default(),
            side: crate::telemetry::metrics::Side::unknown(),
            locality: None,
            series: Default::default(),
        }
    }

    /// A one-off endpoint for a passthrough request (the client's original destination).
    pub fn transient(addr: SocketAddr) -> EndpointState {
        EndpointState::new(Target::Addr(addr), 1, Default::default())
    }

    /// A one-off endpoint reached by name (a wildcard DNS entry resolves the requested host).
    pub fn transient_name(host: String, port: u16) -> EndpointState {
        EndpointState::new(Target::Name(host, port), 1, Default::default())
    }

    /// Is it in the LB set?
    pub fn healthy(&self) -> bool {
        !self.ejected.load(Ordering::Relaxed)
    }
}

/// Counters Envoy exposes per cluster.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct ClusterStats {
    /// Requests rejected by the pending-queue or max-requests breaker.
    pub upstream_rq_pending_overflow: AtomicU64,
    /// Times max connections was reached.
    pub upstream_cx_overflow: AtomicU64,
    /// Retries attempted.
    pub upstream_rq_retry: AtomicU64,
    /// Retries skipped by the max-retries breaker.
    pub upstream_rq_retry_overflow: AtomicU64,
    /// Route or per-try timeouts.
    pub upstream_rq_timeout: AtomicU64,
    /// Ejections enforced.
    pub ejections_enforced_total: AtomicU64,
    /// Ejections refused by maxEjectionPercent.
    pub ejections_overflow: AtomicU64,
    /// Mirror requests dropped (too many in flight).
    pub mirror_dropped: AtomicU64,
}

/// Run-time state of one cluster.
#[derive(Debug)]
pub struct ClusterState {
    /// The node's locality (the clients' locality for locality-aware LB).
    pub node_locality: Option<Arc<str>>,
    /// Identity.
    pub key: ClusterKey,
    /// Policy of the snapshot in force (replaced on swap).
    pub policy: ArcSwap<ClusterPolicy>,
    /// Endpoints (replaced on swap, keeping state of unchanged addresses).
    pub endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    /// Requests in flight (http2MaxRequests breaker).
    pub active_requests: AtomicU32,
    /// Requests waiting for a connection (http1MaxPendingRequests breaker).
    pub pending_requests: AtomicU32,
    /// Open connections (maxConnections breaker).
    pub connections: AtomicU32,
    /// Retries in flight (maxRetries breaker).
    pub active_retries: AtomicU32,
    /// Woken when a connection closes or returns idle.
    pub(crate) conn_released: Notify,
    /// LB state.
    pub(crate) lb: lb::LbState,
    /// Counters.
    pub stats: ClusterStats,
    /// When the outlier sweep last ran.
    pub(crate) last_sweep: Mutex<Instant>,
    /// What this proxy may dial.
    pub(crate) guard: Arc<guard::DialGuard>,
}

impl ClusterState {
    fn new(c: &Cluster, node_locality: Option<Arc<str>>, guard: Arc<guard::DialGuard>) -> Self {
        ClusterState {
            guard,
            node_locality,
            key: c.key.clone(),
            policy: ArcSwap::from_pointee(c.policy.clone()),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            active_requests: AtomicU32::new(0),
            pending_requests: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            conn_released: Notify::new(),
            lb: lb::LbState::default(),
            stats: ClusterStats::default(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Apply a cluster definition of a new snapshot (`namespace`: the service's).
    fn update(&self, c: &Cluster, namespace: &str) {
        let side = |e: &crate::compile::ClusterEndpoint, target: &Target| match e
            .workload
            .as_deref()
            .and_then(|w| w.split_once('/'))
        {
            Some((ns, name)) => crate::telemetry::metrics::Side::from_labels(name, ns, &e.labels),
            None => crate::telemetry::metrics::Side::from_labels(
                &target.to_string(),
                namespace,
                &e.labels,
            ),
        };
        self.policy.store(Arc::new(c.policy.clone()));
        let old = self.endpoints.load();
        let mut by_target: HashMap<&Target, &Arc<EndpointState>> =
            old.iter().map(|e| (&e.target, e)).collect();
        let new: Vec<Arc<EndpointState>> = c
            .endpoints
            .iter()
            .map(|e| {
                let target = match &e.address {
                    EndpointAddress::Ip(ip) => Target::Addr(SocketAddr::new(*ip, e.port)),
                    EndpointAddress::Dns(n) => Target::Name(n.clone(), e.port),
                };
                match by_target.remove(&target) {
                    Some(existing)
                        if existing.weight == e.weight && existing.labels == e.labels =>
                    {
                        existing.clone()
                    }
                    Some(existing) => {
                        // Same address, new weight or labels: keep health, take the new values.
                        let mut fresh = EndpointState::new(target, e.weight, e.labels.clone());
                        fresh.side = side(e, &fresh.target);
                        fresh.locality = e.locality.clone();
                        fresh
                            .ejected
                            .store(existing.ejected.load(Ordering::Relaxed), Ordering::Relaxed);
                        *fresh.outlier.lock().expect("outlier lock") =
                            existing.outlier.lock().expect("outlier lock").clone();
                        Arc::new(fresh)
                    }
                    None => {
                        let mut fresh = EndpointState::new(target, e.weight, e.labels.clone());
                        fresh.side = side(e, &fresh.target);
                        fresh.locality = e.locality.clone();
                        Arc::new(fresh)
                    }
                }
            })
            .collect();
        self.endpoints.store(Arc::new(new));
        self.lb.invalidate();
    }

    /// The endpoints to balance over for one request: the LB set narrowed by locality when the
    /// node has one and the cluster asks for it (outlier detection on, or `distribute`).
    pub fn lb_set_for_request(&self) -> LbSet {
        let set = self.lb_set();
        let Some(client) = &self.node_locality else {
            return set;
        };
        let policy = self.policy.load();
        let all = self.endpoints.load();
        match locality::select(
            &all,
            &set,
            client,
            policy.lb.locality.as_ref(),
            policy.outlier.is_some(),
        ) {
            Some(v) => LbSet::Healthy(v),
            None => set,
        }
    }

    /// The endpoints eligible for load balancing: healthy ones, or all of them in panic mode
    /// (healthy share below minHealthPercent).
    pub fn lb_set(&self) -> LbSet {
        let all = self.endpoints.load_full();
        // Common case: nothing ejected, no copy.
        if all.iter().all(|e| e.healthy()) {
            return LbSet::All(all);
        }
        let healthy: Vec<_> = all.iter().filter(|e| e.healthy()).cloned().collect();
        let policy = self.policy.load();
        if let Some(o) = &policy.outlier
            && !all.is_empty()
            && o.min_health_percent > 0
            && (healthy.len() * 100) < (o.min_health_percent as usize * all.len())
        {
            return LbSet::All(all);
        }
        LbSet::Healthy(healthy)
    }
}

/// The endpoints eligible for load balancing.
pub enum LbSet {
    /// Every endpoint (none ejected, or panic mode).
    All(Arc<Vec<Arc<EndpointState>>>),
    /// The healthy subset.
    Healthy(Vec<Arc<EndpointState>>),
}

impl std::ops::Deref for LbSet {
    type Target = [Arc<EndpointState>];
    fn deref(&self) -> &Self::Target {
        match self {
            LbSet::All(v) => v,
            LbSet::Healthy(v) => v,
        }
    }
}

/// The per-snapshot view: the snapshot and the state of each of its clusters, by ClusterId.
#[derive(Debug)]
pub struct View {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Cluster states, indexed like `snapshot.clusters`.
    pub clusters: Vec<Arc<ClusterState>>,
    /// The views of the snapshot's scopes (`snapshot.scoped`), in order.
    pub scoped: Vec<View>,
}

impl View {
    /// The view a connection routes by: at a gateway port, its Gateways' namespace's scope;
    /// else the client's (by the workload at `ip`); or this one.
    #[inline]
    pub fn for_client(&self, gateway_port: Option<u16>, ip: std::net::IpAddr) -> &View {
        if self.scoped.is_empty() {
            return self;
        }
        match self.snapshot.scope_of_connection(gateway_port, ip) {
            Some(i) => &self.scoped[i],
            None => self,
        }
    }

    /// Every cluster's counters, for the metrics exposition.
    pub fn samples(&self) -> Vec<crate::telemetry::metrics::ClusterSample> {
        // A scope's own clusters once each (the others are the default scope's states).
        self.clusters
            .iter()
            .chain(
                self.scoped
                    .iter()
                    .flat_map(|v| v.clusters.iter().filter(|c| c.key.scope.is_some())),
            )
            .map(|st| {
                let s = &st.stats;
                let counters = [
                    &s.upstream_rq_pending_overflow,
                    &s.upstream_cx_overflow,
                    &s.upstream_rq_retry,
                    &s.upstream_rq_retry_overflow,
                    &s.upstream_rq_timeout,
                    &s.ejections_enforced_total,
                    &s.ejections_overflow,
                    &s.mirror_dropped,
                ]
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
                let ejected = st.endpoints.load().iter().filter(|e| !e.healthy()).count() as i64;
                crate::telemetry::metrics::ClusterSample {
                    name: st.key.name(),
                    counters,
                    ejected: (ejected > 0 || st.policy.load().outlier.is_some()).then_some(ejected),
                }
            })
            .collect()
    }
}

/// All cluster states, surviving snapshot swaps.
pub struct Clusters {
    states: Mutex<HashMap<ClusterKey, Weak<ClusterState>>>,
    locality: Option<Arc<str>>,
    guard: Arc<guard::DialGuard>,
}

impl Clusters {
    /// Cluster states for a node at `locality` (`region/zone/subzone`), dialling what
    /// `guard` allows.
    pub fn new(locality: Option<String>, guard: Arc<guard::DialGuard>) -> Clusters {
        Clusters {
            states: Mutex::default(),
            locality: locality.map(Arc::from),
            guard,
        }
    }

    /// Build the view for a new snapshot, reusing state of clusters that still exist.
    pub fn sync(&self, snapshot: Arc<Snapshot>) -> View {
        let mut states = self.states.lock().expect("clusters lock");
        let scoped = (0..snapshot.scoped.len())
            .map(|i| {
                let clusters = self.states_for(&mut states, &snapshot.scoped[i].snapshot);
                View {
                    snapshot: snapshot.scoped[i].snapshot.clone(),
                    clusters,
                    scoped: Vec::new(),
                }
            })
            .collect();
        let clusters = self.states_for(&mut states, &snapshot);
        states.retain(|_, w| w.strong_count() > 0);
        View {
            snapshot,
            clusters,
            scoped,
        }
    }

    fn states_for(
        &self,
        states: &mut HashMap<ClusterKey, Weak<ClusterState>>,
        snapshot: &Snapshot,
    ) -> Vec<Arc<ClusterState>> {
        snapshot
            .clusters
            .iter()
            .map(|c| {
                let st = states
                    .get(&c.key)
                    .and_then(Weak::upgrade)
                    .unwrap_or_else(|| {
                        Arc::new(ClusterState::new(
                            c,
                            self.locality.clone(),
                            self.guard.clone(),
                        ))
                    });
                st.update(c, &snapshot.service(c.service).namespace);
                states.insert(c.key.clone(), Arc::downgrade(&st));
                st
            })
            .collect()
    }
}
