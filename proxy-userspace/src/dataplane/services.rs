//! What the kernel should do with each mesh service address: send it to the proxy, or
//! load-balance it at connect() (the fast path). Pure: a function of the snapshot.
//!
//! A service takes the fast path only when the kernel can do exactly what the proxy would: a TCP
//! port, no TLS/SNI rules, no TCP rule with match conditions before a catch-all, destinations
//! that exist, clusters without circuit breakers, outlier detection, consistent hashing,
//! passthrough or DNS, and every endpoint an IP. Cilium's socket LB bypasses L7 policy for
//! services that have it (istio/istio#27619); this check is what prevents that here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::compile::policy::{LbAlgorithm, UNLIMITED};
use crate::compile::{
    ClusterRef, EndpointAddress, ListenerKind, Protocol, Snapshot, WeightedClusters,
};

use super::abi::{NP_MAX_BACKENDS, NP_MODE_FASTPATH, NP_MODE_PROXY};

/// Kernel handling of one service address:port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    /// `NP_MODE_PROXY` or `NP_MODE_FASTPATH`.
    pub mode: u32,
    /// Fast-path endpoints and integer weights.
    pub backends: Vec<(SocketAddr, u32)>,
    /// Why the proxy is needed (for `/kernel`), when it is.
    pub why_proxy: Option<&'static str>,
}

impl KernelService {
    fn proxy(why: &'static str) -> KernelService {
        KernelService {
            mode: NP_MODE_PROXY,
            backends: Vec::new(),
            why_proxy: Some(why),
        }
    }
}

/// Resolution of route weights times endpoint weights.
const SCALE: u64 = 1_000_000;

/// Every mesh service address and what the kernel does with it. The kernel does not know
/// the client's namespace at connect(): an address whose handling differs between `exportTo`
/// scopes, or that only some scopes have, goes to the proxy.
pub fn kernel_services(snap: &Snapshot) -> BTreeMap<SocketAddr, KernelService> {
    let mut out = scope_services(snap);
    for scoped in &snap.scoped {
        let other = scope_services(&scoped.snapshot);
        for (addr, svc) in &other {
            if out.get(addr) != Some(svc) {
                out.insert(
                    *addr,
                    KernelService::proxy("handled differently by client namespace (exportTo)"),
                );
            }
        }
        for (addr, svc) in out.iter_mut() {
            if !other.contains_key(addr) {
                *svc = KernelService::proxy("handled differently by client namespace (exportTo)");
            }
        }
    }
    out
}

fn scope_services(snap: &Snapshot) -> BTreeMap<SocketAddr, KernelService> {
    let mut out = BTreeMap::new();
    for l in &snap.listeners {
        let ListenerKind::Mesh { .. } = &l.kind else {
            continue;
        };
        let Some(ip) = l.address else {
            // A service without addresses: every connect to its port, either family, goes to
            // the proxy (the kernel matches these entries only in proxy mode).
            for any in [
                IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            ] {
                out.insert(
                    SocketAddr::new(any, l.port),
                    KernelService::proxy("service without addresses: every connect to its port"),
                );
            }
            continue;
        };
        let svc = match l.protocol {
            Protocol::Tcp => fast_path(snap, l),
            Protocol::Https | Protocol::Tls => KernelService::proxy("TLS port (SNI routing)"),
            _ => KernelService::proxy("HTTP or undeclared protocol"),
        };
        out.insert(SocketAddr::new(ip, l.port), svc);
    }
    out
}

fn fast_path(snap: &Snapshot, l: &crate::compile::Listener) -> KernelService {
    if !l.tls.is_empty() {
        return KernelService::proxy("TLS rules");
    }
    let route: WeightedClusters = match l.tcp.first() {
        Some(r) if r.matches.is_empty() => r.route.clone(),
        Some(_) => return KernelService::proxy("tcp rules with match conditions"),
        None => match l.default_cluster {
            Some(id) => WeightedClusters::new(vec![crate::compile::WeightedCluster {
                cluster: ClusterRef::Cluster(id),
                name: String::new(),
                weight: 1,
                headers: Default::default(),
            }]),
            None => return KernelService::proxy("no cluster"),
        },
    };
    let mut backends = Vec::new();
    for wc in &route.clusters {
        let ClusterRef::Cluster(id) = wc.cluster else {
            return KernelService::proxy("missing cluster (NC)");
        };
        let c = &snap.clusters[id];
        let p = &c.policy;
        if p.outlier.is_some() {
            return KernelService::proxy("outlier detection");
        }
        if p.tls.is_some() {
            // Never balanced in plain text by the kernel (the proxy refuses it, closed).
            return KernelService::proxy("TLS origination (DestinationRule tls)");
        }
        if p.pool.max_connections != UNLIMITED {
            return KernelService::proxy("connection limits");
        }
        if !matches!(
            p.lb.algorithm,
            LbAlgorithm::LeastRequest | LbAlgorithm::RoundRobin | LbAlgorithm::Random
        ) {
            return KernelService::proxy("consistent hash or passthrough load balancing");
        }
        if c.passthrough || c.dns {
            return KernelService::proxy("passthrough or DNS endpoints");
        }
        let sum: u64 = c.endpoints.iter().map(|e| e.weight as u64).sum();
        if sum == 0 {
            return KernelService::proxy("no endpoints (503 UH from the proxy)");
        }
        let share = SCALE * wc.weight as u64 / route.total.max(1) as u64;
        for e in &c.endpoints {
            let EndpointAddress::Ip(ip) = e.address else {
                return KernelService::proxy("DNS endpoint");
            };
            let w = (share * e.weight as u64 / sum).max(1) as u32;
            backends.push((SocketAddr::new(ip, e.port), w));
        }
    }
    if backends.is_empty() {
        return KernelService::proxy("no endpoints");
    }
    if backends.len() > NP_MAX_BACKENDS {
        return KernelService::proxy("more endpoints than the kernel table holds");
    }
    KernelService {
        mode: NP_MODE_FASTPATH,
        backends,
        why_proxy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(yaml: &str) -> Snapshot {
        let mut set = crate::config::ConfigSet::default();
        let mut d = Vec::new();
        set.load_str(std::path::Path::new("t.yaml"), yaml, &mut d);
        assert!(d.is_empty(), "{d:?}");
        crate::compile::compile(&set).expect("compiles")
    }

    const SE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.example]\n  addresses: [10.9.0.1]\n  resolution: STATIC\n  ports: [{number: 5432, name: tcp, protocol: TCP}, {number: 80, name: http, protocol: HTTP}]\n  endpoints:\n  - {address: 10.9.0.11, labels: {v: a}}\n  - {address: 10.9.0.12, labels: {v: b}, weight: 3}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\nspec:\n  host: db.example\n  subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]\n";

    #[test]
    fn plain_tcp_takes_the_fast_path_http_does_not() {
        let s = snap(SE);
        let k = kernel_services(&s);
        let tcp = &k[&"10.9.0.1:5432".parse().unwrap()];
        assert_eq!(tcp.mode, NP_MODE_FASTPATH);
        assert_eq!(
            tcp.backends,
            vec![
                ("10.9.0.11:5432".parse().unwrap(), 250_000),
                ("10.9.0.12:5432".parse().unwrap(), 750_000)
            ]
        );
        assert_eq!(k[&"10.9.0.1:80".parse().unwrap()].mode, NP_MODE_PROXY);
    }

    #[test]
    fn tcp_weights_multiply_endpoint_weights() {
        let s = snap(&format!(
            "{SE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db}}\nspec:\n  hosts: [db.example]\n  tcp:\n  - route:\n    - {{destination: {{host: db.example, subset: a, port: {{number: 5432}}}}, weight: 80}}\n    - {{destination: {{host: db.example, subset: b, port: {{number: 5432}}}}, weight: 20}}\n"
        ));
        let tcp = &kernel_services(&s)[&"10.9.0.1:5432".parse().unwrap()];
        assert_eq!(tcp.mode, NP_MODE_FASTPATH);
        assert_eq!(
            tcp.backends.iter().map(|b| b.1).collect::<Vec<_>>(),
            vec![800_000, 200_000]
        );
    }

    /// TLS origination is never done by the kernel: a TCP service whose DestinationRule asks
    /// for it is not balanced in plain text (the proxy refuses it instead).
    #[test]
    fn tls_origination_keeps_tcp_off_the_fast_path() {
        let s = snap(&format!(
            "{SE}  trafficPolicy:\n    tls: {{mode: SIMPLE}}\n"
        ));
        assert_eq!(
            kernel_services(&s)[&"10.9.0.1:5432".parse().unwrap()].why_proxy,
            Some("TLS origination (DestinationRule tls)")
        );
    }

    #[test]
    fn l7_policy_keeps_the_proxy() {
        let s = snap(&format!(
            "{SE}  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 5}}\n"
        ));
        assert_eq!(
            kernel_services(&s)[&"10.9.0.1:5432".parse().unwrap()].why_proxy,
            Some("connection limits")
        );
        let s = snap(&format!(
            "{SE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db}}\nspec:\n  hosts: [db.example]\n  tcp:\n  - match: [{{sourceLabels: {{app: x}}}}]\n    route: [{{destination: {{host: db.example, subset: a, port: {{number: 5432}}}}}}]\n"
        ));
        assert_eq!(
            kernel_services(&s)[&"10.9.0.1:5432".parse().unwrap()].mode,
            NP_MODE_PROXY
        );
    }

    /// The kernel cannot tell a client's namespace at connect(): a TCP route exported to one
    /// namespace only keeps the service in the proxy for everyone, and a plain service no
    /// scope changes keeps the fast path.
    #[test]
    fn a_route_some_namespaces_see_keeps_the_proxy() {
        let other = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: other}\nspec:\n  hosts: [other.example]\n  addresses: [10.9.0.2]\n  resolution: STATIC\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  endpoints: [{address: 10.9.0.21}]\n";
        let s = snap(&format!(
            "{SE}{other}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: team1}}\nspec:\n  hosts: [db.example]\n  exportTo: [.]\n  tcp:\n  - route: [{{destination: {{host: db.example, subset: a, port: {{number: 5432}}}}}}]\n"
        ));
        let k = kernel_services(&s);
        assert_eq!(
            k[&"10.9.0.1:5432".parse().unwrap()].why_proxy,
            Some("handled differently by client namespace (exportTo)")
        );
        assert_eq!(k[&"10.9.0.2:5432".parse().unwrap()].mode, NP_MODE_FASTPATH);
    }
}
