//! Cluster traffic policy: DestinationRule layering (top level → port level → subset, whole
//! components replaced, ISTIO-API.md §3.2) resolved into concrete values with Istio's defaults.

use std::time::Duration;

use serde::Serialize;

use crate::config::{
    ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, LocalityLbSetting,
    OutlierDetection, TrafficPolicy,
};

/// Envoy's "unlimited" circuit-breaker value (istiod sends 2^32-1).
pub const UNLIMITED: u32 = u32::MAX;
/// Default cluster connect timeout (mesh `connectTimeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default upstream idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a consistent hash is computed over.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header's value.
    Header(String),
    /// A cookie's value; generated with this ttl when absent and `ttl` is set.
    Cookie {
        /// Cookie name.
        name: String,
        /// Cookie path.
        path: Option<String>,
        /// Lifetime of a generated cookie.
        ttl: Option<Duration>,
    },
    /// The client IP.
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
}

/// Load-balancing algorithm of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LbAlgorithm {
    /// Power of two choices on active requests (Istio's default since 1.14).
    LeastRequest,
    /// Weighted round robin.
    RoundRobin,
    /// Uniform random.
    Random,
    /// Forward to the original destination.
    Passthrough,
    /// Ketama-style ring.
    RingHash {
        /// Hash input.
        key: HashKey,
        /// Minimum ring entries.
        min_ring_size: u64,
    },
    /// Maglev table.
    Maglev {
        /// Hash input.
        key: HashKey,
        /// Prime table size.
        table_size: u64,
    },
}

/// Load balancing with locality settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LbPolicy {
    /// Algorithm.
    pub algorithm: LbAlgorithm,
    /// Locality distribution/failover, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityLbSetting>,
}

/// Connection-pool limits (circuit breakers), per cluster for the whole node proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolLimits {
    /// `tcp.maxConnections`.
    pub max_connections: u32,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Duration,
    /// `tcp.tcpKeepalive` (probes, time, interval), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<(Option<u32>, Option<Duration>, Option<Duration>)>,
    /// `tcp.maxConnectionDuration`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
    /// TCP proxy idle timeout (`tcp.idleTimeout`, default 1h; `None` = disabled by `0s`).
    pub tcp_idle_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`.
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection` (0 = unlimited).
    pub max_requests_per_connection: u32,
    /// `http.maxRetries` (concurrent retries).
    pub max_retries: u32,
    /// Upstream HTTP connection idle timeout.
    pub idle_timeout: Duration,
    /// `http.h2UpgradePolicy: UPGRADE`.
    pub h2_upgrade: bool,
    /// `http.useClientProtocol`.
    pub use_client_protocol: bool,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_connections: UNLIMITED,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tcp_keepalive: None,
            max_connection_duration: None,
            tcp_idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_requests_per_connection: 0,
            max_retries: UNLIMITED,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_upgrade: false,
            use_client_protocol: false,
        }
    }
}

/// Outlier detection, with Envoy's defaults for unset fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierPolicy {
    /// Consecutive 5xx before ejection (0 = off).
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 before ejection (0 = off).
    pub consecutive_gateway: u32,
    /// Local-origin failures counted apart.
    pub split_local_origin: bool,
    /// Consecutive local-origin failures (split mode).
    pub consecutive_local_origin: u32,
    /// Sweep interval.
    pub interval: Duration,
    /// Base ejection time.
    pub base_ejection_time: Duration,
    /// Maximum ejected share, percent.
    pub max_ejection_percent: u32,
    /// Panic threshold, percent.
    pub min_health_percent: u32,
}

/// Effective policy of one cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPolicy {
    /// Load balancing.
    pub lb: LbPolicy,
    /// Circuit breakers.
    pub pool: PoolLimits,
    /// Outlier detection (absent = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierPolicy>,
    /// TLS origination (absent = plain text).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared")]
    pub tls: Option<std::sync::Arc<super::tls::TlsOrigination>>,
}

fn shared<S: serde::Serializer, T: Serialize>(
    v: &Option<std::sync::Arc<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    v.as_deref().serialize(s)
}

/// The four layered components, still as written.
#[derive(Default, Clone)]
struct Components {
    lb: Option<LoadBalancerSettings>,
    pool: Option<ConnectionPoolSettings>,
    outlier: Option<OutlierDetection>,
    tls: Option<crate::config::ClientTls>,
}

fn port_entry(tp: &TrafficPolicy, port: u16) -> Option<Components> {
    tp.port_level_settings
        .iter()
        .find(|p| p.port.map(|s| s.number) == Some(port as u32))
        .map(|p| Components {
            lb: p.load_balancer.clone(),
            pool: p.connection_pool.clone(),
            outlier: p.outlier_detection.clone(),
            tls: p.tls.clone(),
        })
}

/// Effective policy for (`dr`, subset, port): §3.2 of ISTIO-API.md.
pub fn effective(dr: Option<&DestinationRule>, subset: Option<&str>, port: u16) -> ClusterPolicy {
    let mut c = Components::default();
    if let Some(tp) = dr.and_then(|d| d.traffic_policy.as_ref()) {
        c = port_entry(tp, port).unwrap_or_else(|| Components {
            lb: tp.load_balancer.clone(),
            pool: tp.connection_pool.clone(),
            outlier: tp.outlier_detection.clone(),
            tls: tp.tls.clone(),
        });
    }
    let sub_tp = dr
        .zip(subset)
        .and_then(|(d, s)| d.subsets.iter().find(|x| x.name == s))
        .and_then(|s| s.traffic_policy.as_ref());
    if let Some(stp) = sub_tp {
        match port_entry(stp, port) {
            Some(entry) => c = entry,
            None => {
                if stp.load_balancer.is_some() {
                    c.lb = stp.load_balancer.clone();
                }
                if stp.connection_pool.is_some() {
                    c.pool = stp.connection_pool.clone();
                }
                if stp.outlier_detection.is_some() {
                    c.outlier = stp.outlier_detection.clone();
                }
                if stp.tls.is_some() {
                    c.tls = stp.tls.clone();
                }
            }
        }
    }
    ClusterPolicy {
        lb: lb_policy(c.lb.as_ref()),
        pool: pool_limits(c.pool.as_ref()),
        outlier: c.outlier.as_ref().map(outlier_policy),
        tls: c.tls.as_ref().and_then(super::tls::TlsOrigination::of),
    }
}

fn lb_policy(lb: Option<&LoadBalancerSettings>) -> LbPolicy {
    let Some(lb) = lb else {
        return LbPolicy {
            algorithm: LbAlgorithm::LeastRequest,
            locality: None,
        };
    };
    let algorithm = if let Some(ch) = &lb.consistent_hash {
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl.map(|d| d.get()),
            }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            HashKey::SourceIp
        };
        match &ch.maglev {
            Some(m) => LbAlgorithm::Maglev {
                key,
                table_size: m.table_size.unwrap_or(65537),
            },
            None => LbAlgorithm::RingHash {
                key,
                min_ring_size: ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    // proto3: 0 is "not set", Envoy's default applies.
                    .filter(|n| *n > 0)
                    .unwrap_or(1024),
            },
        }
    } else {
        match lb.simple.as_deref().unwrap_or("LEAST_REQUEST") {
            "ROUND_ROBIN" => LbAlgorithm::RoundRobin,
            "RANDOM" => LbAlgorithm::Random,
            "PASSTHROUGH" => LbAlgorithm::Passthrough,
            _ => LbAlgorithm::LeastRequest,
        }
    };
    LbPolicy {
        algorithm,
        locality: lb.locality_lb_setting.clone(),
    }
}

/// istiod treats 0 or unset as "default" for the four limits.
fn limit(v: Option<i64>) -> u32 {
    match v {
        Some(n) if n > 0 => n.min(u32::MAX as i64) as u32,
        _ => UNLIMITED,
    }
}

fn pool_limits(pool: Option<&ConnectionPoolSettings>) -> PoolLimits {
    let mut out = PoolLimits::default();
    let Some(pool) = pool else { return out };
    if let Some(tcp) = &pool.tcp {
        out.max_connections = limit(tcp.max_connections);
        if let Some(t) = tcp.connect_timeout {
            out.connect_timeout = t.get();
        }
        out.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| {
            (
                k.probes,
                k.time.map(|d| d.get()),
                k.interval.map(|d| d.get()),
            )
        });
        out.max_connection_duration = tcp.max_connection_duration.map(|d| d.get());
        if let Some(t) = tcp.idle_timeout {
            out.tcp_idle_timeout = (!t.get().is_zero()).then_some(t.get());
            out.idle_timeout = t.get();
        }
    }
    if let Some(http) = &pool.http {
        out.max_pending_requests = limit(http.http1_max_pending_requests);
        out.max_requests = limit(http.http2_max_requests);
        out.max_requests_per_connection = http
            .max_requests_per_connection
            .filter(|n| *n > 0)
            .unwrap_or(0) as u32;
        out.max_retries = limit(http.max_retries);
        if let Some(t) = http.idle_timeout {
            out.idle_timeout = t.get();
        }
        out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        out.h2_upgrade =
            !out.use_client_protocol && http.h2_upgrade_policy.as_deref() == Some("UPGRADE");
    }
    out
}

fn outlier_policy(o: &OutlierDetection) -> OutlierPolicy {
    let split = o.split_external_local_origin_errors.unwrap_or(false);
    let nonneg = |v: Option<i64>, d: u32| v.map(|n| n.max(0) as u32).unwrap_or(d);
    OutlierPolicy {
        consecutive_5xx: nonneg(o.consecutive_5xx_errors, 5),
        consecutive_gateway: nonneg(o.consecutive_gateway_errors, 0),
        split_local_origin: split,
        consecutive_local_origin: if split {
            nonneg(o.consecutive_local_origin_failures, 5)
        } else {
            0
        },
        interval: o
            .interval
            .map(|d| d.get())
            .unwrap_or(Duration::from_secs(10)),
        base_ejection_time: o
            .base_ejection_time
            .map(|d| d.get())
            .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: nonneg(o.max_ejection_percent, 10).min(100),
        min_health_percent: nonneg(o.min_health_percent, 0).min(100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dr(yaml: &str) -> DestinationRule {
        serde_yaml::from_str(yaml).expect("valid DR")
    }

    #[test]
    fn port_level_replaces_whole_components() {
        let d = dr(
            "host: a\ntrafficPolicy:\n  connectionPool:\n    tcp: {maxConnections: 7}\n    http: {http1MaxPendingRequests: 3}\n  portLevelSettings:\n  - port: {number: 80}\n    loadBalancer: {simple: ROUND_ROBIN}\n",
        );
        let top = effective(Some(&d), None, 9080);
        assert_eq!(top.pool.max_connections, 7);
        assert_eq!(top.pool.max_pending_requests, 3);
        let p80 = effective(Some(&d), None, 80);
        assert_eq!(p80.lb.algorithm, LbAlgorithm::RoundRobin);
        assert_eq!(
            p80.pool,
            PoolLimits::default(),
            "port-level entry omits connectionPool: defaults, not inherited"
        );
    }

    #[test]
    fn subset_replaces_components_it_sets_and_inherits_others() {
        let d = dr(
            "host: a\ntrafficPolicy:\n  loadBalancer: {simple: RANDOM}\n  connectionPool:\n    tcp: {maxConnections: 7}\nsubsets:\n- name: v2\n  labels: {version: v2}\n  trafficPolicy:\n    connectionPool:\n      http: {http2MaxRequests: 9}\n",
        );
        let v2 = effective(Some(&d), Some("v2"), 80);
        assert_eq!(v2.lb.algorithm, LbAlgorithm::Random, "inherited");
        assert_eq!(v2.pool.max_requests, 9);
        assert_eq!(
            v2.pool.max_connections, UNLIMITED,
            "tcp part lost: whole component replaced"
        );
        let v1 = effective(Some(&d), Some("v1"), 80);
        assert_eq!(v1.pool.max_connections, 7);
    }

    #[test]
    fn defaults_match_istio() {
        let p = effective(None, None, 80);
        assert_eq!(p.lb.algorithm, LbAlgorithm::LeastRequest);
        assert!(p.outlier.is_none());
        let d = dr(
            "host: a\ntrafficPolicy:\n  outlierDetection: {baseEjectionTime: 1s}\n  connectionPool:\n    http: {http1MaxPendingRequests: 0}\n",
        );
        let p = effective(Some(&d), None, 80);
        let o = p.outlier.expect("outlier on");
        assert_eq!(
            (o.consecutive_5xx, o.max_ejection_percent, o.interval),
            (5, 10, Duration::from_secs(10))
        );
        assert_eq!(p.pool.max_pending_requests, UNLIMITED, "0 means default");
    }
}
