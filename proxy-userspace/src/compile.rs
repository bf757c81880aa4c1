//! Compile a validated [`ConfigSet`] into an immutable [`Snapshot`]: the service registry,
//! clusters (host, subset, port) with their merged policy and endpoints, listeners (service
//! address × port, gateway ports) and per-port HTTP route tables with Istio's host expansion and
//! first-match-wins rules, plus TCP and TLS rules.
//!
//! Request-path lookups never scan all services: listener by `address:port` (hash), virtual host
//! by Host (hash, then one hash probe per DNS label for wildcards), then the host's rules.

pub mod policy;
pub mod registry;
pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use http::{HeaderName, HeaderValue};
use serde::Serialize;

pub use self::policy::ClusterPolicy;
pub use self::registry::{
    Endpoint, EndpointAddress, Protocol, Registry, Resolution, Service, ServiceId,
};
pub use self::route::*;
use crate::config::{
    self, ConfigSet, DestinationRule, Gateway, HttpRoute, Object, Subset, VirtualService,
    labels_match,
};
use crate::diagnostic::{Diagnostic, Severity, codes};
use registry::{expand_host, host_matches, hosts_intersect, kube_aliases};

/// A map looked up per request, keyed by data from the configuration: foldhash (seeded per
/// process) instead of SipHash, a third of the cost per lookup.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The gateway name of mesh (sidecar/node proxy) traffic.
pub const MESH_GATEWAY: &str = "mesh";

/// Identity of a cluster: service host, subset, port. Stable across snapshots, so state kept
/// outside the snapshot (health, ejections, pools, LB cursors) survives a swap.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ClusterKey {
    /// Service host.
    pub host: String,
    /// Subset name.
    pub subset: Option<String>,
    /// Service port.
    pub port: u16,
}

impl ClusterKey {
    /// Envoy's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local`.
    pub fn name(&self) -> String {
        format!(
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

/// An endpoint of a cluster, at the port serving the cluster's service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEndpoint {
    /// IP or DNS name.
    pub address: EndpointAddress,
    /// Endpoint port.
    pub port: u16,
    /// LB weight.
    pub weight: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Locality.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// Workload name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// An upstream cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// Identity.
    pub key: ClusterKey,
    /// `outbound|port|subset|host`.
    pub name: String,
    /// The service.
    pub service: ServiceId,
    /// Protocol of the service port.
    pub protocol: Protocol,
    /// Effective policy.
    pub policy: ClusterPolicy,
    /// Endpoints (subset-filtered).
    pub endpoints: Vec<ClusterEndpoint>,
    /// `resolution: NONE` or `PASSTHROUGH`: forward to the original destination.
    pub passthrough: bool,
    /// Endpoint names must be resolved (DNS resolution).
    pub dns: bool,
}

/// A virtual host: the rules for a set of Host names.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    /// Name (`host:port`).
    pub name: String,
    /// Host names (lowercase; `*.x` wildcards, `*`).
    pub domains: Vec<String>,
    /// Ordered rules.
    pub rules: Vec<HttpRule>,
    /// Rules used when every rule is excluded for a client by source checks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default_rules: Vec<HttpRule>,
    /// Gateway `httpsRedirect`: answer 301 to https.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
}

/// HTTP routes of one port (mesh) or one gateway port.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpTable {
    /// Name: the port number, or `gateway:<port>`.
    pub name: String,
    /// Virtual hosts.
    pub vhosts: Vec<VirtualHost>,
    #[serde(skip)]
    exact: FastMap<String, usize>,
    #[serde(skip)]
    wildcard: FastMap<String, usize>,
    #[serde(skip)]
    catch_all: Option<usize>,
}

impl HttpTable {
    fn add_vhost(&mut self, mut vh: VirtualHost) -> usize {
        // Tables live as long as the snapshot and are large at scale: no spare capacity.
        vh.rules.shrink_to_fit();
        for r in vh.rules.iter_mut().chain(vh.default_rules.iter_mut()) {
            r.shrink_to_fit();
        }
        vh.domains.shrink_to_fit();
        let idx = self.vhosts.len();
        for d in &vh.domains {
            if d == "*" {
                self.catch_all.get_or_insert(idx);
            } else if let Some(suffix) = d.strip_prefix('*') {
                self.wildcard.entry(suffix.to_string()).or_insert(idx);
            } else {
                self.exact.entry(d.clone()).or_insert(idx);
            }
        }
        self.vhosts.push(vh);
        idx
    }

    /// The virtual host for a Host/`:authority` value (port ignored, case-insensitive): exact
    /// name, then the most specific wildcard, then `*`.
    pub fn vhost(&self, authority: &str) -> Option<usize> {
        let host = strip_port(authority);
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        if !self.wildcard.is_empty() {
            for (pos, _) in host.match_indices('.') {
                if let Some(i) = self.wildcard.get(&host[pos..]) {
                    return Some(*i);
                }
            }
        }
        self.catch_all
    }
}

/// Strip `:port` from a Host value (IPv6 literals keep their brackets' content).
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// A gateway server as the listener needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    /// `ns/name` of the Gateway.
    pub gateway: String,
    /// Server hosts (namespace part stripped).
    pub hosts: Vec<String>,
    /// Declared protocol.
    pub protocol: Protocol,
    /// TLS mode (`SIMPLE`, `PASSTHROUGH`, `MUTUAL`...), when TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_mode: Option<String>,
    /// Secret name for `<credentials-dir>/<name>.crt|.key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Certificate and key file paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_files: Option<(String, String)>,
    /// CA file for client certificates (MUTUAL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// Answer 301 to https.
    pub https_redirect: bool,
}

/// What kind of listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    /// A mesh service address (or any address, for services without addresses).
    Mesh {
        /// The service owning the address:port.
        service: ServiceId,
    },
    /// A gateway port (bound at `--gateway-ip`).
    Gateway {
        /// Servers on this port.
        servers: Vec<GatewayServer>,
    },
}

/// A listener: where traffic arrives and how it is routed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Address (None: every address for this port; gateways: `--gateway-ip`).
    pub address: Option<IpAddr>,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Kind.
    pub kind: ListenerKind,
    /// HTTP table index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<usize>,
    /// The vhost used when the Host matches none (the address's own service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_vhost: Option<usize>,
    /// TCP rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<L4Rule>,
    /// TLS (SNI) rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<L4Rule>,
    /// Cluster for TCP traffic no rule matched (the service itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cluster: Option<ClusterId>,
}

/// The compiled, immutable configuration in force.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Monotonic version set by the publisher.
    pub version: u64,
    /// Services and workloads.
    pub registry: Registry,
    /// Clusters.
    pub clusters: Vec<Cluster>,
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// HTTP route tables.
    pub http_tables: Vec<HttpTable>,
    #[serde(skip)]
    cluster_index: FastMap<ClusterKey, ClusterId>,
    #[serde(skip)]
    listener_index: FastMap<SocketAddr, usize>,
    #[serde(skip)]
    port_index: FastMap<u16, usize>,
    #[serde(skip)]
    gateway_index: FastMap<u16, usize>,
}

impl Snapshot {
    /// The mesh listener for a connection's original destination: exact address:port first,
    /// then a port-only service (no addresses).
    pub fn mesh_listener(&self, dst: SocketAddr) -> Option<&Listener> {
        self.listener_index
            .get(&dst)
            .or_else(|| self.port_index.get(&dst.port()))
            .map(|i| &self.listeners[*i])
    }

    /// The gateway listener on `port`.
    pub fn gateway_listener(&self, port: u16) -> Option<&Listener> {
        self.gateway_index.get(&port).map(|i| &self.listeners[*i])
    }

    /// Cluster by identity.
    pub fn cluster(&self, key: &ClusterKey) -> Option<ClusterId> {
        self.cluster_index.get(key).copied()
    }

    /// The service of a cluster.
    pub fn service(&self, id: ServiceId) -> &Service {
        &self.registry.services[id]
    }

    /// The client identity for a source address (labels from the workload registry).
    pub fn source_info(&self, ip: IpAddr) -> route::SourceInfo {
        match self.registry.workload(ip) {
            Some(w) => route::SourceInfo {
                ip: Some(ip),
                labels: w.labels.clone(),
                namespace: Some(w.namespace.clone()),
            },
            None => route::SourceInfo {
                ip: Some(ip),
                ..Default::default()
            },
        }
    }

    /// The HTTP route table serving mesh port `port`, if any.
    pub fn mesh_http_table(&self, port: u16) -> Option<&HttpTable> {
        self.listeners
            .iter()
            .find(|l| {
                l.port == port && matches!(l.kind, ListenerKind::Mesh { .. }) && l.http.is_some()
            })
            .and_then(|l| l.http)
            .map(|i| &self.http_tables[i])
    }
}

/// DestinationRules indexed by expanded host; several for one host are merged (subsets
/// unioned, first wins; top-level policy from the first that has one).
pub struct DrIndex {
    rules: Vec<(String, DestinationRule, String)>,
    /// Exact host → indices into `rules`, in order.
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard hosts → indices (few in practice; scanned).
    wildcard: Vec<usize>,
}

impl DrIndex {
    /// Index every DR of the set.
    pub fn new(set: &ConfigSet) -> Self {
        let rules: Vec<(String, DestinationRule, String)> = set
            .destination_rules
            .iter()
            .map(|d| {
                (
                    expand_host(&d.spec.host, &d.namespace, &set.cluster_domain),
                    d.spec.clone(),
                    format!("DestinationRule/{}/{}", d.namespace, d.name),
                )
            })
            .collect();
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard = Vec::new();
        for (i, (h, _, _)) in rules.iter().enumerate() {
            if h.starts_with('*') {
                wildcard.push(i);
            } else {
                exact.entry(h.clone()).or_default().push(i);
            }
        }
        DrIndex {
            rules,
            exact,
            wildcard,
        }
    }

    /// The merged rule for a service host: exact host rules first, else the most specific
    /// wildcard.
    pub fn for_host(&self, host: &str) -> Option<DestinationRule> {
        let chosen: Vec<&(String, DestinationRule, String)> = match self.exact.get(host) {
            Some(ix) => ix.iter().map(|i| &self.rules[*i]).collect(),
            None => {
                let mut wild: Vec<_> = self
                    .wildcard
                    .iter()
                    .map(|i| &self.rules[*i])
                    .filter(|(h, _, _)| host_matches(h, host))
                    .collect();
                let best = wild.iter().map(|(h, _, _)| h.len()).max()?;
                wild.retain(|(h, _, _)| h.len() == best);
                wild
            }
        };
        let mut merged = chosen.first()?.1.clone();
        for (_, dr, _) in chosen.iter().skip(1) {
            if merged.traffic_policy.is_none() {
                merged.traffic_policy = dr.traffic_policy.clone();
            }
            for s in &dr.subsets {
                if !merged.subsets.iter().any(|m| m.name == s.name) {
                    merged.subsets.push(s.clone());
                }
            }
        }
        Some(merged)
    }

    /// Every (expanded host, origin) for analysis.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().map(|(h, _, o)| (h.as_str(), o.as_str()))
    }
}

/// Compile a config set. Analysis must have passed; anything that still cannot be built is
/// returned as error diagnostics, never a panic.
pub fn compile(set: &ConfigSet) -> Result<Snapshot, Vec<Diagnostic>> {
    let mut c = Compiler {
        set,
        snap: Snapshot::default(),
        drs: DrIndex::new(set),
        errors: Vec::new(),
        vs_exact: HashMap::new(),
        vs_wildcard: Vec::new(),
    };
    c.snap.registry = Registry::build(set);
    c.index_virtual_services();
    c.build_clusters();
    c.build_mesh_listeners();
    c.build_gateway_listeners();
    if c.errors.is_empty() {
        Ok(c.snap)
    } else {
        Err(c.errors)
    }
}

struct Compiler<'a> {
    set: &'a ConfigSet,
    snap: Snapshot,
    drs: DrIndex,
    errors: Vec<Diagnostic>,
    vs_exact: HashMap<String, &'a Object<VirtualService>>,
    vs_wildcard: Vec<(String, &'a Object<VirtualService>)>,
}

/// Where rules are being installed: the mesh on a service port, or a gateway port.
struct Scope<'a> {
    gateways: Vec<String>,
    port: u16,
    /// The service port targeted (destinations without a port use it when the service has
    /// several ports).
    default_port: u16,
    _marker: std::marker::PhantomData<&'a ()>,
}

impl<'a> Compiler<'a> {
    fn build_clusters(&mut self) {
        let services = self.snap.registry.services.clone();
        for (sid, svc) in services.iter().enumerate() {
            let dr = self.drs.for_host(&svc.host);
            let mut subsets: Vec<Option<&Subset>> = vec![None];
            if let Some(d) = &dr {
                subsets.extend(d.subsets.iter().map(Some));
            }
            for port in &svc.ports {
                for subset in &subsets {
                    let key = ClusterKey {
                        host: svc.host.clone(),
                        subset: subset.map(|s| s.name.clone()),
                        port: port.number,
                    };
                    let policy = policy::effective(
                        dr.as_ref(),
                        subset.map(|s| s.name.as_str()),
                        port.number,
                    );
                    let endpoints = svc
                        .endpoints
                        .iter()
                        .filter(|e| subset.is_none_or(|s| labels_match(&s.labels, &e.labels)))
                        .map(|e| ClusterEndpoint {
                            address: e.address.clone(),
                            port: e.port_for(port),
                            weight: e.weight,
                            labels: e.labels.clone(),
                            locality: e.locality.clone(),
                            workload: e.workload.clone(),
                        })
                        .collect();
                    let passthrough = svc.resolution == Resolution::None
                        || policy.lb.algorithm == policy::LbAlgorithm::Passthrough;
                    let id = self.snap.clusters.len();
                    self.snap.cluster_index.insert(key.clone(), id);
                    self.snap.clusters.push(Cluster {
                        name: key.name(),
                        key,
                        service: sid,
                        protocol: port.protocol,
                        policy,
                        endpoints,
                        passthrough,
                        dns: matches!(svc.resolution, Resolution::Dns | Resolution::DnsRoundRobin),
                    });
                }
            }
        }
    }

    /// The mesh VirtualService for a service host: exact host first, then the most specific
    /// wildcard; among equals the oldest (creation time, then load order). Indexed once, so
    /// compiling N services is not N x VirtualServices.
    fn mesh_vs_for(&self, host: &str) -> Option<&'a Object<VirtualService>> {
        if let Some(vs) = self.vs_exact.get(host) {
            return Some(vs);
        }
        let mut best: Option<(usize, &'a Object<VirtualService>)> = None;
        for (pattern, vs) in &self.vs_wildcard {
            if host_matches(pattern, host) && best.is_none_or(|(s, _)| pattern.len() > s) {
                best = Some((pattern.len(), vs));
            }
        }
        best.map(|(_, v)| v)
    }

    /// Index mesh-bound VirtualServices by expanded host (first, oldest, wins).
    fn index_virtual_services(&mut self) {
        let set: &'a ConfigSet = self.set;
        for vs in vs_in_order(set) {
            if !bound_to(&vs.spec.gateways, &vs.namespace, MESH_GATEWAY, true)
                && !rules_mention_gateway(&vs.spec, MESH_GATEWAY)
            {
                continue;
            }
            for h in &vs.spec.hosts {
                let h = expand_host(h, &vs.namespace, &self.set.cluster_domain);
                if h.starts_with('*') {
                    self.vs_wildcard.push((h, vs));
                } else {
                    self.vs_exact.entry(h).or_insert(vs);
                }
            }
        }
    }

    fn build_mesh_listeners(&mut self) {
        let services = self.snap.registry.services.clone();
        let mut tables: BTreeMap<u16, HttpTable> = BTreeMap::new();
        let mut vhost_of: HashMap<(ServiceId, u16), usize> = HashMap::new();
        // HTTP tables: one per port, with a vhost per service exposing it.
        for (sid, svc) in services.iter().enumerate() {
            for port in svc
                .ports
                .iter()
                .filter(|p| p.protocol.is_http() || p.protocol == Protocol::Unknown)
            {
                let scope = Scope {
                    gateways: vec![MESH_GATEWAY.into()],
                    port: port.number,
                    default_port: port.number,
                    _marker: Default::default(),
                };
                let vs = self.mesh_vs_for(&svc.host);
                let default_rules = vec![self.default_rule(svc, port.number)];
                let rules = match vs {
                    Some(vs) => {
                        let r = self.http_rules(vs, &scope);
                        if r.is_empty() {
                            default_rules.clone()
                        } else {
                            r
                        }
                    }
                    None => default_rules.clone(),
                };
                let mut domains = kube_aliases(&svc.host, &self.set.cluster_domain);
                domains.extend(svc.addresses.iter().map(|a| a.to_string()));
                let table = tables.entry(port.number).or_insert_with(|| HttpTable {
                    name: port.number.to_string(),
                    ..Default::default()
                });
                let idx = table.add_vhost(VirtualHost {
                    name: format!("{}:{}", svc.host, port.number),
                    domains,
                    rules,
                    default_rules,
                    https_redirect: false,
                });
                vhost_of.insert((sid, port.number), idx);
            }
        }
        let mut table_idx = HashMap::new();
        for (port, table) in tables {
            table_idx.insert(port, self.snap.http_tables.len());
            self.snap.http_tables.push(table);
        }
        for (sid, svc) in services.iter().enumerate() {
            for port in &svc.ports {
                let default_cluster = self.snap.cluster(&ClusterKey {
                    host: svc.host.clone(),
                    subset: None,
                    port: port.number,
                });
                let scope = Scope {
                    gateways: vec![MESH_GATEWAY.into()],
                    port: port.number,
                    default_port: port.number,
                    _marker: Default::default(),
                };
                let (tcp, tls) = match self.mesh_vs_for(&svc.host) {
                    Some(vs) => (
                        self.l4_rules(vs, &scope, false),
                        self.l4_rules(vs, &scope, true),
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                let http = table_idx
                    .get(&port.number)
                    .copied()
                    .filter(|_| vhost_of.contains_key(&(sid, port.number)));
                let base = Listener {
                    address: None,
                    port: port.number,
                    protocol: port.protocol,
                    kind: ListenerKind::Mesh { service: sid },
                    http,
                    fallback_vhost: vhost_of.get(&(sid, port.number)).copied(),
                    tcp,
                    tls,
                    default_cluster,
                };
                if svc.addresses.is_empty() {
                    if !self.snap.port_index.contains_key(&port.number) {
                        self.snap
                            .port_index
                            .insert(port.number, self.snap.listeners.len());
                        self.snap.listeners.push(base);
                    }
                    continue;
                }
                for addr in &svc.addresses {
                    let sa = SocketAddr::new(*addr, port.number);
                    if self.snap.listener_index.contains_key(&sa) {
                        continue; // first service to claim an address:port keeps it (analysis warns)
                    }
                    self.snap
                        .listener_index
                        .insert(sa, self.snap.listeners.len());
                    self.snap.listeners.push(Listener {
                        address: Some(*addr),
                        ..base.clone()
                    });
                }
            }
        }
    }

    fn build_gateway_listeners(&mut self) {
        let mut by_port: BTreeMap<u16, Vec<(GatewayServer, &Object<Gateway>)>> = BTreeMap::new();
        for gw in &self.set.gateways {
            for server in &gw.spec.servers {
                let tls = server.tls.as_ref();
                let gs = GatewayServer {
                    gateway: format!("{}/{}", gw.namespace, gw.name),
                    hosts: server
                        .hosts
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                    protocol: Protocol::parse(&server.port.protocol),
                    tls_mode: tls
                        .filter(|t| !t.https_redirect || t.mode.is_some())
                        .map(|t| t.mode.clone().unwrap_or_else(|| "PASSTHROUGH".into())),
                    credential_name: tls.and_then(|t| t.credential_name.clone()),
                    ca_certificates: tls.and_then(|t| t.ca_certificates.clone()),
                    cert_files: tls
                        .and_then(|t| t.server_certificate.clone().zip(t.private_key.clone())),
                    https_redirect: tls.is_some_and(|t| t.https_redirect),
                };
                by_port
                    .entry(server.port.number as u16)
                    .or_default()
                    .push((gs, gw));
            }
        }
        for (port, servers) in by_port {
            let protocol = servers[0].0.protocol;
            let terminated = matches!(
                servers[0].0.tls_mode.as_deref(),
                Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" | "ISTIO_MUTUAL")
            );
            let gateways: Vec<String> = servers.iter().map(|(s, _)| s.gateway.clone()).collect();
            let scope = Scope {
                gateways: gateways.clone(),
                port,
                default_port: port,
                _marker: Default::default(),
            };
            let http_like = protocol.is_http() || (protocol == Protocol::Https && terminated);
            let mut listener = Listener {
                address: None,
                port,
                protocol,
                kind: ListenerKind::Gateway {
                    servers: servers.iter().map(|(s, _)| s.clone()).collect(),
                },
                http: None,
                fallback_vhost: None,
                tcp: Vec::new(),
                tls: Vec::new(),
                default_cluster: None,
            };
            if http_like {
                let mut table = HttpTable {
                    name: format!("gateway:{port}"),
                    ..Default::default()
                };
                let mut vhosts: Vec<VirtualHost> = Vec::new();
                for vs in vs_in_order(self.set) {
                    let bound: Vec<&GatewayServer> = servers
                        .iter()
                        .filter(|(s, _)| {
                            bound_to(&vs.spec.gateways, &vs.namespace, &s.gateway, false)
                                || rules_mention_gateway_ns(&vs.spec, &vs.namespace, &s.gateway)
                        })
                        .map(|(s, _)| s)
                        .collect();
                    if bound.is_empty() {
                        continue;
                    }
                    let rules = self.http_rules(vs, &scope);
                    for h in &vs.spec.hosts {
                        let vh = expand_host(h, &vs.namespace, &self.set.cluster_domain);
                        for s in &bound {
                            for sh in &s.hosts {
                                let (ns_part, name) = sh.split_once('/').unwrap_or(("*", sh));
                                if !(ns_part == "*"
                                    || ns_part == vs.namespace
                                    || (ns_part == "."
                                        && s.gateway.starts_with(&format!("{}/", vs.namespace))))
                                {
                                    continue;
                                }
                                if !hosts_intersect(&vh, name) {
                                    continue;
                                }
                                // The vhost is built for the more specific of the two names.
                                let domain = if host_matches(name, &vh) {
                                    vh.clone()
                                } else {
                                    name.to_string()
                                };
                                match vhosts.iter_mut().find(|v| v.domains[0] == domain) {
                                    Some(v) => v.rules.extend(rules.iter().cloned()),
                                    None => vhosts.push(VirtualHost {
                                        name: format!("{domain}:{port}"),
                                        domains: vec![domain],
                                        rules: rules.clone(),
                                        default_rules: Vec::new(),
                                        https_redirect: s.https_redirect,
                                    }),
                                }
                            }
                        }
                    }
                }
                // httpsRedirect servers answer 301 even without a bound VirtualService.
                for (s, _) in &servers {
                    if s.https_redirect {
                        for sh in &s.hosts {
                            let name = sh.split_once('/').map(|x| x.1).unwrap_or(sh);
                            match vhosts.iter_mut().find(|v| v.domains[0] == name) {
                                Some(v) => v.https_redirect = true,
                                None => vhosts.push(VirtualHost {
                                    name: format!("{name}:{port}"),
                                    domains: vec![name.to_string()],
                                    rules: Vec::new(),
                                    default_rules: Vec::new(),
                                    https_redirect: true,
                                }),
                            }
                        }
                    }
                }
                for mut v in vhosts {
                    // Merged VirtualServices: catch-all rules move to the end (stable).
                    v.rules.sort_by_key(|r| {
                        r.matches.is_empty() || r.matches.iter().any(is_catch_all_block)
                    });
                    table.add_vhost(v);
                }
                listener.http = Some(self.snap.http_tables.len());
                self.snap.http_tables.push(table);
            } else {
                for vs in vs_in_order(self.set) {
                    if servers
                        .iter()
                        .any(|(s, _)| bound_to(&vs.spec.gateways, &vs.namespace, &s.gateway, false))
                    {
                        listener.tcp.extend(self.l4_rules(vs, &scope, false));
                        listener.tls.extend(self.l4_rules(vs, &scope, true));
                    }
                }
            }
            self.snap
                .gateway_index
                .insert(port, self.snap.listeners.len());
            self.snap.listeners.push(listener);
        }
    }

    fn default_rule(&self, svc: &Service, port: u16) -> HttpRule {
        let key = ClusterKey {
            host: svc.host.clone(),
            subset: None,
            port,
        };
        let name = key.name();
        let cluster = self
            .snap
            .cluster(&key)
            .map(ClusterRef::Cluster)
            .unwrap_or(ClusterRef::Missing(name.clone()));
        HttpRule {
            name: None,
            origin: "default".into(),
            matches: Vec::new(),
            action: HttpAction::Route(WeightedClusters::new(vec![WeightedCluster {
                cluster,
                name,
                weight: 1,
                headers: HeaderRules::default(),
            }])),
            fault: None,
            timeout: None,
            retry: RetryPolicy::default(),
            mirrors: Vec::new(),
            cors: None,
            headers: HeaderRules::default(),
            rewrite: None,
        }
    }

    fn error(&mut self, vs: &Object<VirtualService>, field: String, msg: String) {
        self.errors.push(
            Diagnostic::new(codes::SCHEMA, Severity::Error, msg)
                .on(vs.object_ref("VirtualService"), vs.source.clone())
                .at(field),
        );
    }

    /// Compile the `http[]` rules of `vs` for `scope`, dropping blocks for other ports or
    /// gateways and rules left without blocks.
    fn http_rules(&mut self, vs: &Object<VirtualService>, scope: &Scope<'_>) -> Vec<HttpRule> {
        let mut out = Vec::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            let mut matches = Vec::new();
            for (j, m) in r.matches.iter().enumerate() {
                if m.port.is_some_and(|p| p != scope.port as u32) {
                    continue;
                }
                if !m.gateways.is_empty()
                    && !scope
                        .gateways
                        .iter()
                        .any(|g| bound_to(&m.gateways, &vs.namespace, g, false))
                {
                    continue;
                }
                match compile_match(m) {
                    Ok(mut cm) => {
                        // At a gateway with block gateways, sourceLabels are not checked.
                        if !m.gateways.is_empty()
                            && let Some(mut r) = cm.rare.take()
                        {
                            r.source_labels.clear();
                            r.source_namespace = None;
                            cm.rare = r.boxed();
                        }
                        matches.push(cm)
                    }
                    Err((f, e)) => self.error(vs, format!("spec.http[{i}].match[{j}].{f}"), e),
                }
            }
            if !r.matches.is_empty() && matches.is_empty() {
                continue;
            }
            match self.http_rule(vs, i, r, matches, scope) {
                Ok(rule) => out.push(rule),
                Err((f, e)) => self.error(vs, format!("spec.http[{i}].{f}"), e),
            }
        }
        out
    }

    fn destination(
        &self,
        d: &config::Destination,
        ns: &str,
        scope: &Scope<'_>,
    ) -> (ClusterRef, String) {
        let host = expand_host(&d.host, ns, &self.set.cluster_domain);
        let svc = self
            .snap
            .registry
            .by_host(&host)
            .map(|s| &self.snap.registry.services[s]);
        let port = match (d.port, svc) {
            (Some(p), _) => p.number as u16,
            (None, Some(s)) if s.ports.len() == 1 => s.ports[0].number,
            _ => scope.default_port,
        };
        let key = ClusterKey {
            host,
            subset: d.subset.clone(),
            port,
        };
        let name = key.name();
        match self.snap.cluster(&key) {
            Some(id) => (ClusterRef::Cluster(id), name),
            None => (ClusterRef::Missing(name.clone()), name),
        }
    }

    fn http_rule(
        &self,
        vs: &Object<VirtualService>,
        _index: usize,
        r: &HttpRoute,
        matches: Vec<HttpMatch>,
        scope: &Scope<'_>,
    ) -> Result<HttpRule, (String, String)> {
        let ns = &vs.namespace;
        let action = if let Some(d) = &r.direct_response {
            let body = match &d.body {
                Some(b) => match (&b.string, &b.bytes) {
                    (Some(s), _) => s.clone().into_bytes(),
                    (None, Some(b64)) => decode_base64(b64).ok_or((
                        "directResponse.body.bytes".to_string(),
                        "invalid base64".to_string(),
                    ))?,
                    _ => Vec::new(),
                },
                None => Vec::new(),
            };
            HttpAction::DirectResponse {
                status: d.status as u16,
                body,
            }
        } else if let Some(rd) = &r.redirect {
            HttpAction::Redirect(Box::new(Redirect {
                uri: rd.uri.clone(),
                prefix_rewrite: rd.prefix_rewrite.clone(),
                authority: rd.authority.clone(),
                port: rd.port.map(|p| p as u16),
                from_request_port: rd.derive_port.as_deref() == Some("FROM_REQUEST_PORT"),
                scheme: rd.scheme.clone(),
                code: rd.redirect_code.unwrap_or(301) as u16,
            }))
        } else {
            let single = r.route.len() == 1;
            let mut clusters = Vec::new();
            for (k, d) in r.route.iter().enumerate() {
                let weight = if single { 1 } else { route::weight(d.weight) };
                if weight == 0 {
                    continue;
                }
                let (cluster, name) = self.destination(&d.destination, ns, scope);
                let headers = header_rules(d.headers.as_deref())
                    .map_err(|e| (format!("route[{k}].headers"), e))?;
                clusters.push(WeightedCluster {
                    cluster,
                    name,
                    weight,
                    headers,
                });
            }
            if clusters.is_empty() {
                return Err((
                    "route".into(),
                    "no destination with a weight above 0".into(),
                ));
            }
            HttpAction::Route(WeightedClusters::new(clusters))
        };
        let fault = r
            .fault
            .as_ref()
            .map(|f| compile_fault(f).map(Box::new))
            .transpose()
            .map_err(|e| ("fault".to_string(), e))?;
        let retry = match &r.retries {
            None => RetryPolicy::default(),
            Some(rt) => {
                let retry_on = match rt.retry_on.as_deref() {
                    Some(s) if !s.is_empty() => {
                        RetryOn::parse(s).map_err(|e| ("retries.retryOn".to_string(), e))?
                    }
                    _ => RetryOn::parse(DEFAULT_RETRY_ON).expect("default parses"),
                };
                RetryPolicy {
                    num_retries: u32::try_from(rt.attempts.max(0)).unwrap_or(u32::MAX),
                    per_try_timeout: rt.per_try_timeout.map(|d| d.get()),
                    retry_on,
                    backoff_base: rt
                        .backoff
                        .map(|d| d.get())
                        .unwrap_or(std::time::Duration::from_millis(25)),
                    ignore_previous_hosts: rt.retry_ignore_previous_hosts.unwrap_or(true),
                }
            }
        };
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let per_million = match (r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => p.per_million(),
                (None, Some(p)) => p.min(100) * 10_000,
                (None, None) => 1_000_000,
            };
            let (cluster, name) = self.destination(m, ns, scope);
            mirrors.push(Mirror {
                cluster,
                name,
                per_million,
            });
        }
        for m in &r.mirrors {
            let (cluster, name) = self.destination(&m.destination, ns, scope);
            mirrors.push(Mirror {
                cluster,
                name,
                per_million: m.percentage.map(|p| p.per_million()).unwrap_or(1_000_000),
            });
        }
        let cors = r
            .cors_policy
            .as_ref()
            .map(|c| compile_cors(c))
            .transpose()
            .map_err(|e| ("corsPolicy".to_string(), e))?;
        let headers = header_rules(r.headers.as_deref()).map_err(|e| ("headers".to_string(), e))?;
        let rewrite = match &r.rewrite {
            None => None,
            Some(rw) => Some(Rewrite {
                uri: rw.uri.clone(),
                uri_regex: match &rw.uri_regex_rewrite {
                    Some(x) => Some((
                        FullRegex::new(&x.pattern).map_err(|e| {
                            ("rewrite.uriRegexRewrite.match".to_string(), e.to_string())
                        })?,
                        x.rewrite.clone(),
                    )),
                    None => None,
                },
                authority: rw.authority.clone(),
            }),
        };
        Ok(HttpRule {
            name: r.name.clone(),
            origin: format!("VirtualService/{}/{}", vs.namespace, vs.name),
            matches,
            action,
            fault,
            timeout: r.timeout.map(|d| d.get()).filter(|d| !d.is_zero()),
            retry,
            mirrors,
            cors: cors.map(Box::new),
            headers,
            rewrite: rewrite.map(Box::new),
        })
    }

    fn l4_rules(
        &mut self,
        vs: &Object<VirtualService>,
        scope: &Scope<'_>,
        tls: bool,
    ) -> Vec<L4Rule> {
        let mut out = Vec::new();
        let rules: Vec<(Vec<L4Match>, bool, &Vec<config::RouteDestination>)> = if tls {
            vs.spec
                .tls
                .iter()
                .map(|r| {
                    let ms: Vec<L4Match> = r
                        .matches
                        .iter()
                        .filter(|m| {
                            m.port.is_none_or(|p| p == scope.port as u32)
                                && gateway_ok(&m.gateways, &vs.namespace, &scope.gateways)
                        })
                        .map(|m| L4Match {
                            sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                            destination_subnets: parse_subnets(&m.destination_subnets),
                            source_labels: m.source_labels.clone(),
                            source_namespace: m.source_namespace.clone(),
                        })
                        .collect();
                    (ms, !r.matches.is_empty(), &r.route)
                })
                .collect()
        } else {
            vs.spec
                .tcp
                .iter()
                .map(|r| {
                    let ms: Vec<L4Match> = r
                        .matches
                        .iter()
                        .filter(|m| {
                            m.port.is_none_or(|p| p == scope.port as u32)
                                && gateway_ok(&m.gateways, &vs.namespace, &scope.gateways)
                        })
                        .map(|m| L4Match {
                            sni_hosts: Vec::new(),
                            destination_subnets: parse_subnets(&m.destination_subnets),
                            source_labels: m.source_labels.clone(),
                            source_namespace: m.source_namespace.clone(),
                        })
                        .collect();
                    (ms, !r.matches.is_empty(), &r.route)
                })
                .collect()
        };
        for (matches, had, route) in rules {
            if had && matches.is_empty() {
                continue;
            }
            let single = route.len() == 1;
            let clusters: Vec<WeightedCluster> = route
                .iter()
                .filter_map(|d| {
                    let weight = if single { 1 } else { route::weight(d.weight) };
                    (weight > 0).then(|| {
                        let (cluster, name) =
                            self.destination(&d.destination, &vs.namespace, scope);
                        WeightedCluster {
                            cluster,
                            name,
                            weight,
                            headers: HeaderRules::default(),
                        }
                    })
                })
                .collect();
            if clusters.is_empty() {
                continue;
            }
            out.push(L4Rule {
                origin: format!("VirtualService/{}/{}", vs.namespace, vs.name),
                matches,
                route: WeightedClusters::new(clusters),
            });
        }
        out
    }
}

fn gateway_ok(block: &[String], ns: &str, scope: &[String]) -> bool {
    block.is_empty() || scope.iter().any(|g| bound_to(block, ns, g, false))
}

fn parse_subnets(v: &[String]) -> Vec<ipnet::IpNet> {
    v.iter()
        .filter_map(|s| {
            s.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
        })
        .collect()
}

/// VirtualServices oldest first: creation time when set, else load order.
fn vs_in_order(set: &ConfigSet) -> Vec<&Object<VirtualService>> {
    let mut v: Vec<_> = set.virtual_services.iter().enumerate().collect();
    v.sort_by(
        |(ia, a), (ib, b)| match (&a.creation_timestamp, &b.creation_timestamp) {
            (Some(x), Some(y)) => x.cmp(y).then(ia.cmp(ib)),
            _ => ia.cmp(ib),
        },
    );
    v.into_iter().map(|(_, o)| o).collect()
}

/// Is a VS with these `gateways` (in namespace `ns`) installed on `gateway` (`mesh` or
/// `ns/name`)? Empty means mesh only.
pub fn bound_to(gateways: &[String], ns: &str, gateway: &str, empty_is_mesh: bool) -> bool {
    if gateways.is_empty() {
        return empty_is_mesh && gateway == MESH_GATEWAY;
    }
    gateways.iter().any(|g| qualify_gateway(g, ns) == gateway)
}

/// `name` → `ns/name`; `mesh` stays; legacy `name.ns.svc.domain` → `ns/name`.
pub fn qualify_gateway(g: &str, ns: &str) -> String {
    if g == MESH_GATEWAY || g.contains('/') {
        return g.to_string();
    }
    let parts: Vec<&str> = g.split('.').collect();
    if parts.len() >= 2 {
        return format!("{}/{}", parts[1], parts[0]);
    }
    format!("{ns}/{g}")
}

fn rules_mention_gateway(vs: &VirtualService, gateway: &str) -> bool {
    vs.http
        .iter()
        .flat_map(|r| &r.matches)
        .any(|m| m.gateways.iter().any(|g| g == gateway))
}

fn rules_mention_gateway_ns(vs: &VirtualService, ns: &str, gateway: &str) -> bool {
    vs.http
        .iter()
        .flat_map(|r| &r.matches)
        .any(|m| m.gateways.iter().any(|g| qualify_gateway(g, ns) == gateway))
}

/// A block matching everything a catch-all would (`uri: prefix: /` and nothing else).
pub fn is_catch_all_block(m: &HttpMatch) -> bool {
    let only_root = matches!(&m.uri, None | Some(StrMatch::Prefix(_)))
        && matches!(&m.uri, Some(StrMatch::Prefix(p)) if p == "/");
    only_root && m.headers.is_empty() && m.rare().is_empty()
}

/// Compile one match block; errors carry the field below the block.
pub fn compile_match(m: &config::HttpMatchRequest) -> Result<HttpMatch, (String, String)> {
    let sm = |f: &str, v: Option<&config::StringMatch>| {
        v.map(StrMatch::compile)
            .transpose()
            .map_err(|e| (f.to_string(), e))
    };
    let hdrs = |f: &str,
                v: &BTreeMap<String, config::StringMatch>|
     -> Result<Vec<(HeaderName, StrMatch)>, (String, String)> {
        v.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "uri" | "scheme" | "method" | "authority"))
            .map(|(k, x)| {
                let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| (format!("{f}.{k}"), format!("invalid header name `{k}`")))?;
                Ok((
                    name,
                    StrMatch::compile(x).map_err(|e| (format!("{f}.{k}"), e))?,
                ))
            })
            .collect()
    };
    Ok(HttpMatch {
        name: m.name.clone(),
        uri: sm("uri", m.uri.as_ref())?,
        headers: hdrs("headers", &m.headers)?,
        ignore_uri_case: m.ignore_uri_case,
        rare: RareMatch {
            scheme: sm("scheme", m.scheme.as_deref())?,
            method: sm("method", m.method.as_deref())?,
            authority: sm("authority", m.authority.as_deref())?,
            without_headers: hdrs("withoutHeaders", &m.without_headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, x)| {
                    Ok((
                        k.clone(),
                        StrMatch::compile(x).map_err(|e| (format!("queryParams.{k}"), e))?,
                    ))
                })
                .collect::<Result<_, (String, String)>>()?,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
        .boxed(),
    })
}

/// gRPC status names Istio accepts in `abort.grpcStatus`.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn compile_fault(f: &config::HttpFaultInjection) -> Result<Fault, String> {
    let delay = match &f.delay {
        Some(d) => {
            let per_million = match (d.percentage, d.percent) {
                (Some(p), _) => p.per_million(),
                (None, Some(p)) => (p.clamp(0, 100) as u32) * 10_000,
                (None, None) => 0,
            };
            d.fixed_delay.map(|fd| (fd.get(), per_million))
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let per_million = a.percentage.map(|p| p.per_million()).unwrap_or(0);
            let status = if let Some(code) = a.http_status {
                AbortStatus::Http(code.clamp(0, 999) as u16)
            } else if let Some(g) = &a.grpc_status {
                let idx = GRPC_STATUS_NAMES
                    .iter()
                    .position(|n| n == g)
                    .ok_or_else(|| format!("unknown grpcStatus `{g}`"))?;
                AbortStatus::Grpc(idx as u32)
            } else {
                return Err("abort needs httpStatus or grpcStatus".into());
            };
            Some((status, per_million))
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

fn compile_cors(c: &config::CorsPolicy) -> Result<Cors, String> {
    let mut allow_origins = c
        .allow_origins
        .iter()
        .map(StrMatch::compile)
        .collect::<Result<Vec<_>, _>>()?;
    allow_origins.extend(c.allow_origin.iter().map(|o| StrMatch::Exact(o.clone())));
    Ok(Cors {
        allow_origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age.map(|d| d.get().as_secs()),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights: c.unmatched_preflights.as_deref() != Some("IGNORE"),
    })
}

/// Compile `headers:`; `host`/`:authority` in request set/add becomes an authority rewrite;
/// other pseudo-headers and `host` removals are dropped, as istiod does.
pub fn header_rules(h: Option<&config::Headers>) -> Result<HeaderRules, String> {
    let mut out = HeaderMutations::default();
    let Some(h) = h else {
        return Ok(HeaderRules::default());
    };
    let ops = |o: Option<&config::HeaderOperations>,
               authority: &mut Option<String>,
               is_request: bool|
     -> Result<HeaderOps, String> {
        let mut r = HeaderOps::default();
        let Some(o) = o else { return Ok(r) };
        let pair = |k: &String, v: &String| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("invalid header name `{k}`"))?,
                HeaderValue::from_str(v).map_err(|_| format!("invalid value for header `{k}`"))?,
            ))
        };
        for (list, dst) in [(&o.set, &mut r.set), (&o.add, &mut r.add)] {
            for (k, v) in list {
                let lk = k.to_ascii_lowercase();
                if is_request && (lk == "host" || lk == ":authority") {
                    *authority = Some(v.clone());
                } else if !lk.starts_with(':') {
                    dst.push(pair(k, v)?);
                }
            }
        }
        for k in &o.remove {
            let lk = k.to_ascii_lowercase();
            if lk == "host" || lk.starts_with(':') {
                continue;
            }
            r.remove.push(
                HeaderName::from_bytes(lk.as_bytes())
                    .map_err(|_| format!("invalid header name `{k}`"))?,
            );
        }
        Ok(r)
    };
    let mut authority = None;
    out.request = ops(h.request.as_ref(), &mut authority, true)?;
    out.response = ops(h.response.as_ref(), &mut authority, false)?;
    out.authority = authority;
    Ok(HeaderRules::new(out))
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

#[cfg(test)]
mod tests;
