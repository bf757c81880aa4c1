//! Prometheus metrics with Istio's names, types, buckets and labels (ISTIO-API.md §7), reported
//! as `reporter="source"` (the node proxy acts for the client), and `nodeproxy_*` internals.
//! Label values come from the registry (workload names, `app`/`version` labels, services) and
//! from the outcome (code, flags): never paths or raw header values, so cardinality is bounded
//! by workloads × services × codes × flags.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::compile::{Service, Snapshot};

/// Istio's (Envoy's default) duration buckets, ms.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Byte-size buckets (Istio's exponential 1..10^8).
pub const SIZE_BUCKETS: [f64; 9] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

/// Who is on each side of a request or connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Peers {
    /// `source`.
    pub reporter: &'static str,
    /// Client workload name.
    pub source_workload: Arc<str>,
    /// Client namespace.
    pub source_workload_namespace: Arc<str>,
    /// Client principal (no mTLS here: `unknown`).
    pub source_principal: Arc<str>,
    /// Client `app` label.
    pub source_app: Arc<str>,
    /// Client `version` label.
    pub source_version: Arc<str>,
    /// Client canonical service.
    pub source_canonical_service: Arc<str>,
    /// Client canonical revision.
    pub source_canonical_revision: Arc<str>,
    /// Client cluster.
    pub source_cluster: Arc<str>,
    /// Serving workload.
    pub destination_workload: Arc<str>,
    /// Serving namespace.
    pub destination_workload_namespace: Arc<str>,
    /// Serving principal.
    pub destination_principal: Arc<str>,
    /// Serving `app`.
    pub destination_app: Arc<str>,
    /// Serving `version`.
    pub destination_version: Arc<str>,
    /// Serving canonical service.
    pub destination_canonical_service: Arc<str>,
    /// Serving canonical revision.
    pub destination_canonical_revision: Arc<str>,
    /// Serving cluster.
    pub destination_cluster: Arc<str>,
    /// Routed service FQDN.
    pub destination_service: Arc<str>,
    /// Routed service short name.
    pub destination_service_name: Arc<str>,
    /// Routed service namespace.
    pub destination_service_namespace: Arc<str>,
    /// `http`, `grpc` or `tcp`.
    pub request_protocol: &'static str,
    /// `unknown` for reporter=source.
    pub connection_security_policy: &'static str,
}

/// Labels of HTTP metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// Peers.
    #[prometheus(flatten)]
    pub peers: Peers,
    /// Status sent downstream (0: none).
    pub response_code: Arc<str>,
    /// gRPC status, empty for non-gRPC.
    pub grpc_response_status: Arc<str>,
    /// Envoy response flags.
    pub response_flags: Arc<str>,
}

/// `cluster` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabel {
    /// `outbound|port|subset|host`.
    pub cluster_name: String,
}

/// `reason` label (kernel counters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Reason code name.
    pub reason: String,
}

fn unknown() -> Arc<str> {
    static UNKNOWN: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    UNKNOWN.get_or_init(|| Arc::from("unknown")).clone()
}

/// The four HTTP metrics of one label set, resolved once.
#[derive(Debug, Clone)]
pub struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    /// Record one finished request.
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// Identity facts for one side.
#[derive(Debug, Clone)]
pub struct Side {
    /// Workload name.
    pub workload: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// `app`.
    pub app: Arc<str>,
    /// `version`.
    pub version: Arc<str>,
}

impl Side {
    /// Nothing known.
    pub fn unknown() -> Side {
        static UNKNOWN: std::sync::OnceLock<Side> = std::sync::OnceLock::new();
        UNKNOWN
            .get_or_init(|| Side {
                workload: unknown(),
                namespace: unknown(),
                app: unknown(),
                version: unknown(),
            })
            .clone()
    }

    /// From a workload name, namespace and labels.
    pub fn from_labels(
        workload: &str,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Side {
        let l = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .map(|v| Arc::from(v.as_str()))
                .unwrap_or_else(unknown)
        };
        Side {
            workload: Arc::from(workload),
            namespace: Arc::from(namespace),
            app: l(&[
                "app",
                "app.kubernetes.io/name",
                "service.istio.io/canonical-name",
            ]),
            version: l(&[
                "version",
                "app.kubernetes.io/version",
                "service.istio.io/canonical-revision",
            ]),
        }
    }

    /// The client at `ip` as the registry knows it.
    pub fn source(snap: &Snapshot, ip: std::net::IpAddr) -> Side {
        match snap.registry.workload(ip) {
            Some(w) => Side::from_labels(&w.name, &w.namespace, &w.labels),
            None => Side::unknown(),
        }
    }
}

/// Build the peer labels.
pub fn peers(
    src: &Side,
    dst: Option<&Side>,
    service: Option<&Service>,
    host_fallback: &str,
    protocol: &'static str,
) -> Peers {
    let d = dst.cloned().unwrap_or_else(Side::unknown);
    let (svc, name, ns): (Arc<str>, Arc<str>, Arc<str>) = match service {
        Some(s) => (
            Arc::from(s.host.as_str()),
            Arc::from(s.short_name()),
            Arc::from(s.namespace.as_str()),
        ),
        None => {
            let h: Arc<str> = Arc::from(if host_fallback.is_empty() {
                "unknown"
            } else {
                host_fallback
            });
            (h.clone(), h, unknown())
        }
    };
    Peers {
        reporter: "source",
        source_workload: src.workload.clone(),
        source_workload_namespace: src.namespace.clone(),
        source_principal: unknown(),
        source_app: src.app.clone(),
        source_version: src.version.clone(),
        source_canonical_service: src.app.clone(),
        source_canonical_revision: if &*src.version == "unknown" {
            Arc::from("latest")
        } else {
            src.version.clone()
        },
        source_cluster: unknown(),
        destination_workload: d.workload.clone(),
        destination_workload_namespace: d.namespace.clone(),
        destination_principal: unknown(),
        destination_app: d.app.clone(),
        destination_version: d.version.clone(),
        destination_canonical_service: d.app.clone(),
        destination_canonical_revision: if &*d.version == "unknown" {
            Arc::from("latest")
        } else {
            d.version.clone()
        },
        destination_cluster: unknown(),
        destination_service: svc,
        destination_service_name: name,
        destination_service_namespace: ns,
        request_protocol: protocol,
        connection_security_policy: "unknown",
    }
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    names: Vec<&'static str>,
    /// `istio_requests_total`.
    pub requests: Family<HttpLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<HttpLabels, Histogram>,
    /// `istio_request_bytes`.
    pub request_bytes: Family<HttpLabels, Histogram>,
    /// `istio_response_bytes`.
    pub response_bytes: Family<HttpLabels, Histogram>,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<Peers, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<Peers, Counter>,
    /// `istio_tcp_sent_bytes_total`.
    pub tcp_sent: Family<Peers, Counter>,
    /// `istio_tcp_received_bytes_total`.
    pub tcp_received: Family<Peers, Counter>,
    /// `nodeproxy_config_reloads_total`.
    pub reloads: Counter,
    /// `nodeproxy_config_rejections_total`.
    pub rejections: Counter,
    /// `nodeproxy_snapshot_version`.
    pub snapshot_version: Gauge,
    cluster_counters: Vec<(&'static str, Family<ClusterLabel, Counter>)>,
    /// `nodeproxy_outlier_ejections_active`.
    pub ejections_active: Family<ClusterLabel, Gauge>,
    /// `nodeproxy_kernel_events_total` by reason (filled when capture is ebpf).
    pub kernel: Family<ReasonLabel, Counter>,
    /// `nodeproxy_fastpath_connections_total`.
    pub fastpath: Counter,
    /// `nodeproxy_upstream_refused_total`: dials the SSRF guard refused.
    pub upstream_refused: Counter,
    /// `nodeproxy_downstream_cx_shed_total`: accepts that found the downstream connection cap
    /// reached and shed the connections waiting for a request.
    pub downstream_shed: Counter,
    /// `nodeproxy_downstream_cx_overflow_total`: connections closed at accept, past twice the cap.
    pub downstream_overflow: Counter,
    last_reloads: AtomicU64,
    last_rejections: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Cluster counters mirrored from `ClusterStats` at scrape time (name, help).
const CLUSTER_COUNTERS: [(&str, &str); 8] = [
    (
        "nodeproxy_upstream_rq_pending_overflow",
        "Requests rejected by the pending-queue or max-requests circuit breaker (503 UO)",
    ),
    (
        "nodeproxy_upstream_cx_overflow",
        "Times the maxConnections circuit breaker was reached",
    ),
    ("nodeproxy_upstream_rq_retry", "Retries attempted"),
    (
        "nodeproxy_upstream_rq_retry_overflow",
        "Retries skipped by the maxRetries circuit breaker",
    ),
    ("nodeproxy_upstream_rq_timeout", "Route or per-try timeouts"),
    (
        "nodeproxy_outlier_ejections_enforced",
        "Outlier ejections enforced",
    ),
    (
        "nodeproxy_outlier_ejections_overflow",
        "Outlier ejections refused by maxEjectionPercent",
    ),
    (
        "nodeproxy_mirror_dropped",
        "Mirror requests dropped because too many were in flight",
    ),
];

impl Metrics {
    /// Register every metric.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let mut names: Vec<&'static str> = Vec::new();
        let requests = Family::<HttpLabels, Counter>::default();
        let duration = Family::<HttpLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let request_bytes = Family::<HttpLabels, Histogram>::new_with_constructor(
            size_histogram as fn() -> Histogram,
        );
        let response_bytes = Family::<HttpLabels, Histogram>::new_with_constructor(
            size_histogram as fn() -> Histogram,
        );
        names.push("istio_requests");
        registry.register(
            "istio_requests",
            "Requests, at stream end",
            requests.clone(),
        );
        names.push("istio_request_duration_milliseconds");
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        names.push("istio_request_bytes");
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            request_bytes.clone(),
        );
        names.push("istio_response_bytes");
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let tcp =
            |r: &mut Registry, names: &mut Vec<&'static str>, name: &'static str, help: &str| {
                let f = Family::<Peers, Counter>::default();
                names.push(name);
                r.register(name, help, f.clone());
                f
            };
        let tcp_opened = tcp(
            &mut registry,
            &mut names,
            "istio_tcp_connections_opened",
            "TCP connections opened",
        );
        let tcp_closed = tcp(
            &mut registry,
            &mut names,
            "istio_tcp_connections_closed",
            "TCP connections closed",
        );
        let tcp_sent = tcp(
            &mut registry,
            &mut names,
            "istio_tcp_sent_bytes",
            "Bytes sent to the client on TCP connections",
        );
        let tcp_received = tcp(
            &mut registry,
            &mut names,
            "istio_tcp_received_bytes",
            "Bytes received from the client on TCP connections",
        );
        let reloads = Counter::default();
        let rejections = Counter::default();
        let upstream_refused = Counter::default();
        names.push("nodeproxy_upstream_refused");
        registry.register(
            "nodeproxy_upstream_refused",
            "Upstream connections refused: the destination is the node's own or the proxy's",
            upstream_refused.clone(),
        );
        let downstream_shed = Counter::default();
        names.push("nodeproxy_downstream_cx_shed");
        registry.register(
            "nodeproxy_downstream_cx_shed",
            "Accepts that found the downstream connection cap reached (connections waiting for a request were shed)",
            downstream_shed.clone(),
        );
        let downstream_overflow = Counter::default();
        names.push("nodeproxy_downstream_cx_overflow");
        registry.register(
            "nodeproxy_downstream_cx_overflow",
            "Downstream connections closed at accept, past twice the connection cap",
            downstream_overflow.clone(),
        );
        let snapshot_version = Gauge::default();
        names.push("nodeproxy_config_reloads");
        registry.register(
            "nodeproxy_config_reloads",
            "Configuration sets accepted",
            reloads.clone(),
        );
        names.push("nodeproxy_config_rejections");
        registry.register(
            "nodeproxy_config_rejections",
            "Configuration sets rejected (errors)",
            rejections.clone(),
        );
        names.push("nodeproxy_snapshot_version");
        registry.register(
            "nodeproxy_snapshot_version",
            "Version of the snapshot in force",
            snapshot_version.clone(),
        );
        let mut cluster_counters = Vec::new();
        for (name, help) in CLUSTER_COUNTERS {
            let f = Family::<ClusterLabel, Counter>::default();
            names.push(name);
            registry.register(name, help, f.clone());
            cluster_counters.push((name, f));
        }
        let ejections_active = Family::<ClusterLabel, Gauge>::default();
        names.push("nodeproxy_outlier_ejections_active");
        registry.register(
            "nodeproxy_outlier_ejections_active",
            "Endpoints ejected now",
            ejections_active.clone(),
        );
        let kernel = Family::<ReasonLabel, Counter>::default();
        names.push("nodeproxy_kernel_events");
        registry.register(
            "nodeproxy_kernel_events",
            "eBPF program decisions by reason",
            kernel.clone(),
        );
        let fastpath = Counter::default();
        names.push("nodeproxy_fastpath_connections");
        registry.register(
            "nodeproxy_fastpath_connections",
            "Connections load-balanced in the kernel (no proxy hop)",
            fastpath.clone(),
        );
        Arc::new(Metrics {
            registry,
            names,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            reloads,
            rejections,
            snapshot_version,
            cluster_counters,
            ejections_active,
            kernel,
            fastpath,
            upstream_refused,
            downstream_shed,
            downstream_overflow,
            last_reloads: AtomicU64::new(0),
            last_rejections: AtomicU64::new(0),
        })
    }

    /// Names of every registered metric family.
    pub fn families(&self) -> &[&'static str] {
        &self.names
    }

    /// Copy the kernel's counters (monotonic per-CPU sums) into their families.
    pub fn record_kernel(&self, counters: &std::collections::BTreeMap<&'static str, u64>) {
        for (reason, v) in counters {
            self.kernel
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .inner()
                .store(*v, Ordering::Relaxed);
        }
        if let Some(v) = counters.get("fastpath") {
            self.fastpath.inner().store(*v, Ordering::Relaxed);
        }
    }

    /// The series of a label set (to cache and record into).
    pub fn series(&self, labels: &HttpLabels) -> Series {
        Series {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Record one finished HTTP request.
    pub fn record_http(
        &self,
        labels: &HttpLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }

    /// Render the Prometheus text exposition, first copying the clusters' counters and the
    /// config status into their families.
    pub fn render(&self, clusters: &[ClusterSample], status: &crate::publish::Status) -> String {
        self.snapshot_version.set(status.version as i64);
        let r = status.reloads;
        let prev = self.last_reloads.swap(r, Ordering::Relaxed);
        self.reloads.inc_by(r.saturating_sub(prev));
        let j = status.rejections;
        let prev = self.last_rejections.swap(j, Ordering::Relaxed);
        self.rejections.inc_by(j.saturating_sub(prev));
        for c in clusters {
            let label = ClusterLabel {
                cluster_name: c.name.clone(),
            };
            for ((_, fam), v) in self.cluster_counters.iter().zip(c.counters) {
                if v > 0 {
                    fam.get_or_create(&label)
                        .inner()
                        .store(v, Ordering::Relaxed);
                }
            }
            if let Some(ejected) = c.ejected {
                self.ejections_active.get_or_create(&label).set(ejected);
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Key of an endpoint's metric series cache: everything in the label set that is not the
/// endpoint's own identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    /// Client workload.
    pub source: Arc<str>,
    /// Client namespace.
    pub source_ns: Arc<str>,
    /// Response code.
    pub code: u16,
    /// Response flags bits.
    pub flags: u32,
    /// gRPC status.
    pub grpc: Option<u32>,
}

/// [`SeriesKey`] borrowed: what a request looks its series up with (no string is cloned
/// per request). Hashes as `SeriesKey` does: the same fields in the same order, `Arc<str>`
/// hashing as `str`.
#[derive(Debug, Clone, Copy, Hash)]
pub struct SeriesKeyRef<'a> {
    /// Client workload.
    pub source: &'a str,
    /// Client namespace.
    pub source_ns: &'a str,
    /// Response code.
    pub code: u16,
    /// Response flags bits.
    pub flags: u32,
    /// gRPC status.
    pub grpc: Option<u32>,
}

impl hashbrown::Equivalent<SeriesKey> for SeriesKeyRef<'_> {
    fn equivalent(&self, k: &SeriesKey) -> bool {
        self.code == k.code
            && self.flags == k.flags
            && self.grpc == k.grpc
            && *self.source == *k.source
            && *self.source_ns == *k.source_ns
    }
}

/// An endpoint's metric series by the rest of the label set: a request served by a known
/// endpoint finds its series without building and hashing the full label set.
#[derive(Debug, Default)]
pub struct SeriesCache(
    std::sync::RwLock<hashbrown::HashMap<SeriesKey, Series, foldhash::fast::RandomState>>,
);

impl SeriesCache {
    /// The cached series for `key`, made with `make` on first use (then the key's strings
    /// are shared, once).
    pub fn get(
        &self,
        key: SeriesKeyRef<'_>,
        source: &Side,
        make: impl FnOnce() -> Series,
    ) -> Series {
        // Read-mostly: a read lock does not contend between worker threads.
        if let Some(s) = self.0.read().expect("series lock").get(&key) {
            return s.clone();
        }
        let s = make();
        let owned = SeriesKey {
            source: source.workload.clone(),
            source_ns: source.namespace.clone(),
            code: key.code,
            flags: key.flags,
            grpc: key.grpc,
        };
        self.0
            .write()
            .expect("series lock")
            .insert(owned, s.clone());
        s
    }
}

/// One cluster's counters for [`Metrics::render`], in the order of the cluster counter
/// families: pending overflow, connection overflow, retries, retry overflow, timeouts,
/// ejections enforced, ejection overflow, mirrors dropped.
#[derive(Debug, Clone)]
pub struct ClusterSample {
    /// Envoy's cluster name.
    pub name: String,
    /// The counters.
    pub counters: [u64; 8],
    /// Endpoints ejected now (`None`: no outlier detection and none ejected).
    pub ejected: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the Grafana dashboard queries is one we export.
    #[test]
    fn dashboard_queries_exported_metrics() {
        let dash = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/nodeproxy-canary.json"
        ))
        .expect("dashboard");
        let v: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
        let m = Metrics::new();
        let families = m.families();
        let re = regex::Regex::new(r"(istio|nodeproxy)_[a-z_]+").unwrap();
        let mut n = 0;
        for p in v["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                for name in re.find_iter(t["expr"].as_str().unwrap()) {
                    let family = name
                        .as_str()
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_total");
                    assert!(
                        families.contains(&family),
                        "dashboard uses {} which is not exported: {families:?}",
                        name.as_str()
                    );
                    n += 1;
                }
            }
        }
        assert!(n >= 10);
    }
}
