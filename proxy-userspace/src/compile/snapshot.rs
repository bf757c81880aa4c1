//! The compiled snapshot's types and its request-path lookups (listener by address, virtual
//! host by Host, cluster by identity).

use super::*;

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
    /// The client namespaces of an `exportTo` scope whose policy or endpoints for this
    /// cluster differ from the default scope's (None: the default scope's cluster). Not part
    /// of the Envoy name: it keeps run-time state apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl ClusterKey {
    /// The key of a cluster of the default scope.
    pub fn new(host: String, subset: Option<String>, port: u16) -> ClusterKey {
        ClusterKey {
            host,
            subset,
            port,
            scope: None,
        }
    }

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
    /// A wildcard host with DNS resolution and no endpoints: each request's own host is
    /// resolved, at this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_requested_host: Option<u16>,
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
    pub(super) exact: FastMap<String, usize>,
    #[serde(skip)]
    pub(super) wildcard: FastMap<String, usize>,
    #[serde(skip)]
    pub(super) catch_all: Option<usize>,
}

impl HttpTable {
    pub(super) fn add_vhost(&mut self, mut vh: VirtualHost) -> usize {
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
    pub(super) cluster_index: FastMap<ClusterKey, ClusterId>,
    #[serde(skip)]
    pub(super) listener_index: FastMap<SocketAddr, usize>,
    #[serde(skip)]
    pub(super) port_index: FastMap<u16, usize>,
    #[serde(skip)]
    pub(super) gateway_index: FastMap<u16, usize>,
    /// What clients of other namespaces see, when `exportTo` (or a client namespace's own
    /// DestinationRule) makes it differ from this, the default scope.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scoped: Vec<Scoped>,
    #[serde(skip)]
    pub(super) scope_index: FastMap<String, usize>,
    /// Gateway ports whose Gateways all live in one namespace of a scope: that scope's view
    /// of `exportTo` applies there (the gateway is that namespace's client).
    #[serde(skip)]
    pub(super) gateway_scope: FastMap<u16, usize>,
}

/// The snapshot a group of client namespaces sees.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Scoped {
    /// The client namespaces.
    pub namespaces: Vec<String>,
    /// Their snapshot (its own `scoped` is empty).
    pub snapshot: std::sync::Arc<Snapshot>,
}

impl Snapshot {
    /// The scope of a client address (index into `scoped`): by the namespace of the workload
    /// at that address. None: the default scope (this snapshot).
    pub fn scope_of(&self, ip: IpAddr) -> Option<usize> {
        if self.scoped.is_empty() {
            return None;
        }
        self.scope_of_namespace(&self.registry.workload(ip)?.namespace)
    }

    /// The scope of clients of namespace `ns`.
    pub fn scope_of_namespace(&self, ns: &str) -> Option<usize> {
        self.scope_index.get(ns).copied()
    }

    /// The scope of a connection: a gateway port's (its Gateways' namespace), else the
    /// client's.
    pub fn scope_of_connection(&self, gateway_port: Option<u16>, ip: IpAddr) -> Option<usize> {
        if self.scoped.is_empty() {
            return None;
        }
        match gateway_port {
            Some(p) => self.gateway_scope.get(&p).copied(),
            None => self.scope_of(ip),
        }
    }

    /// The snapshot clients at `ip` see.
    pub fn for_client(&self, ip: IpAddr) -> &Snapshot {
        match self.scope_of(ip) {
            Some(i) => &self.scoped[i].snapshot,
            None => self,
        }
    }

    /// This snapshot and every scoped one.
    pub fn all_scopes(&self) -> impl Iterator<Item = &Snapshot> {
        std::iter::once(self).chain(self.scoped.iter().map(|s| &*s.snapshot))
    }

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
