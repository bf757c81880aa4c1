//! The service registry: services from ServiceEntries and Kubernetes Services, their endpoints
//! (inline, WorkloadEntries selected by labels), the workloads known by address (for
//! `sourceLabels`), and Istio's host-name rules.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::config::{
    self, ConfigSet, KubeEndpointSlice, KubePod, Object, SERVICE_NAME_LABEL, labels_match,
};

pub use crate::config::{ClusterDomain, DEFAULT_CLUSTER_DOMAIN};

/// Index of a service in [`Registry::services`].
pub type ServiceId = usize;

/// Application protocol of a service or gateway port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 when the client speaks it).
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// TLS carrying HTTP; routed by SNI unless terminated at a gateway.
    Https,
    /// Opaque TLS; routed by SNI.
    Tls,
    /// Opaque bytes.
    Tcp,
    /// Not declared: sniffed per connection.
    Unknown,
}

impl Protocol {
    /// Istio's protocol names (`HTTP`, `grpc-web`...) to a protocol; unknown names are TCP.
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" | "GRPC-WEB" => Protocol::Grpc,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "" => Protocol::Unknown,
            _ => Protocol::Tcp,
        }
    }

    /// Protocol of a Kubernetes port: `appProtocol`, else the name prefix (`http-web`, `grpc`).
    pub fn from_kube_port(name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        if let Some(p) = app_protocol {
            let p = p.rsplit('/').next().unwrap_or(p);
            return match p.to_ascii_lowercase().as_str() {
                "h2c" => Protocol::Http2,
                other => Protocol::parse(other),
            };
        }
        let Some(name) = name else {
            return Protocol::Unknown;
        };
        let prefix = name.split('-').next().unwrap_or(name);
        match Protocol::parse(prefix) {
            Protocol::Tcp
                if !matches!(
                    prefix.to_ascii_lowercase().as_str(),
                    "tcp" | "mongo" | "redis" | "mysql"
                ) =>
            {
                Protocol::Unknown
            }
            p => p,
        }
    }

    /// Does this port carry HTTP the proxy can route (`http[]` rules)?
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Is this port routed by SNI (`tls[]` rules)?
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }
}

/// How a service's endpoints are found (ServiceEntry `resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Forward to the original destination.
    None,
    /// Endpoint addresses are IPs.
    Static,
    /// Resolve endpoint (or host) names; every address is an endpoint.
    Dns,
    /// Resolve; use only the first address.
    DnsRoundRobin,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Service port.
    pub number: u16,
    /// Port name (endpoints override target ports by this name).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Default endpoint port.
    pub target_port: u16,
}

/// Where an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointAddress {
    /// A literal IP.
    Ip(IpAddr),
    /// A DNS name resolved by the upstream module.
    Dns(String),
}

/// One endpoint of a service (all ports).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Address.
    pub address: EndpointAddress,
    /// Port overrides by service port name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Labels (subsets select on these).
    pub labels: BTreeMap<String, String>,
    /// LB weight (>= 1).
    pub weight: u32,
    /// `region/zone/subzone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// `namespace/name` of the WorkloadEntry this came from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl Endpoint {
    /// The endpoint port serving `port` of the service.
    pub fn port_for(&self, port: &ServicePort) -> u16 {
        self.ports
            .get(&port.name)
            .copied()
            .unwrap_or(port.target_port)
    }
}

/// Where a service came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceOrigin {
    /// A ServiceEntry.
    ServiceEntry,
    /// A Kubernetes Service.
    Kubernetes,
}

/// A service in the registry: one host of a ServiceEntry (each host is its own service, as in
/// Istio), or one Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Canonical host (FQDN for Kubernetes services, literal for ServiceEntries), lowercase.
    pub host: String,
    /// Namespace of the defining object.
    pub namespace: String,
    /// `kind/ns/name` of the defining object.
    pub defined_by: String,
    /// Origin.
    pub origin: ServiceOrigin,
    /// VIPs the service is reached at (empty: identified by port alone).
    pub addresses: Vec<IpAddr>,
    /// CIDR addresses (ServiceEntry only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNet>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoint discovery.
    pub resolution: Resolution,
    /// `true` for MESH_EXTERNAL.
    pub external: bool,
    /// Endpoints (all ports).
    pub endpoints: Vec<Endpoint>,
    /// A ServiceEntry's `subjectAltNames`: verified when TLS is originated to it and the
    /// DestinationRule names none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

impl Service {
    /// The port numbered `n`.
    pub fn port(&self, n: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == n)
    }

    /// The short name (first DNS label) for metrics: `reviews` of `reviews.default.svc...`.
    pub fn short_name(&self) -> &str {
        self.host.split('.').next().unwrap_or(&self.host)
    }
}

/// A workload known by address: used to find a client's labels (`sourceLabels`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Name (WorkloadEntry name or the service host for inline endpoints).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// All services and workloads, indexed for request-path lookups.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// Services in definition order.
    pub services: Vec<Service>,
    #[serde(skip)]
    by_host: HashMap<String, ServiceId>,
    /// Workloads by IP.
    pub workloads: HashMap<IpAddr, Workload>,
    /// The cluster domain of Kubernetes hosts.
    #[serde(skip)]
    pub cluster_domain: ClusterDomain,
}

impl Registry {
    /// Build the registry from a config set. Never fails: bad addresses are skipped here and
    /// reported by analysis.
    pub fn build(set: &ConfigSet) -> Registry {
        let mut reg = Registry {
            cluster_domain: set.cluster_domain.clone(),
            ..Registry::default()
        };
        let pods = PodIndex::new(&set.pods);
        let mut slices_of: HashMap<(&str, &str), Vec<&Object<KubeEndpointSlice>>> = HashMap::new();
        for s in &set.endpoint_slices {
            if let Some(svc) = s.labels.get(SERVICE_NAME_LABEL) {
                slices_of.entry((&s.namespace, svc)).or_default().push(s);
            }
        }
        for we in &set.workload_entries {
            if let Ok(ip) = we.spec.address.parse::<IpAddr>() {
                reg.workloads.insert(
                    ip,
                    Workload {
                        name: we.name.clone(),
                        namespace: we.namespace.clone(),
                        labels: we.spec.labels.clone(),
                    },
                );
            }
        }
        for se in &set.service_entries {
            let spec = &se.spec;
            let resolution = match spec.resolution.as_deref().unwrap_or("NONE") {
                "STATIC" => Resolution::Static,
                "DNS" => Resolution::Dns,
                "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
                // Per requested host: resolved for each host derived from the wildcard.
                "DYNAMIC_DNS" => Resolution::Dns,
                _ => Resolution::None,
            };
            let ports: Vec<ServicePort> = spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    number: p.number as u16,
                    name: p.name.clone(),
                    protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("")),
                    target_port: p.target_port.unwrap_or(p.number) as u16,
                })
                .collect();
            let mut addresses = Vec::new();
            let mut cidrs = Vec::new();
            for a in &spec.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    addresses.push(ip);
                } else if let Ok(net) = a.parse::<IpNet>() {
                    cidrs.push(net);
                }
            }
            let mut endpoints: Vec<Endpoint> = spec
                .endpoints
                .iter()
                .map(|e| endpoint_from(e, None))
                .collect();
            if let Some(sel) = &spec.workload_selector {
                // Istio's workloadSelector picks Pods and WorkloadEntries of the namespace.
                endpoints.extend(pods.selected(&se.namespace, &sel.labels));
                endpoints.extend(selected_workload_entries(set, &se.namespace, &sel.labels));
            }
            // DNS without endpoints: each host is resolved itself.
            let dns_self = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                && endpoints.is_empty();
            for (i, e) in spec.endpoints.iter().enumerate() {
                if let Ok(ip) = e.address.parse::<IpAddr>() {
                    reg.workloads.entry(ip).or_insert_with(|| Workload {
                        name: format!("{}-{i}", se.name),
                        namespace: se.namespace.clone(),
                        labels: e.labels.clone(),
                    });
                }
            }
            for host in &spec.hosts {
                let host = host.to_ascii_lowercase();
                let eps = if dns_self {
                    vec![Endpoint {
                        address: EndpointAddress::Dns(host.clone()),
                        ports: BTreeMap::new(),
                        labels: BTreeMap::new(),
                        weight: 1,
                        locality: None,
                        workload: None,
                    }]
                } else {
                    endpoints.clone()
                };
                reg.insert(Service {
                    host,
                    namespace: se.namespace.clone(),
                    defined_by: format!("ServiceEntry/{}/{}", se.namespace, se.name),
                    origin: ServiceOrigin::ServiceEntry,
                    addresses: addresses.clone(),
                    cidrs: cidrs.clone(),
                    ports: ports.clone(),
                    resolution,
                    external: spec.location.as_deref() != Some("MESH_INTERNAL"),
                    endpoints: eps,
                    subject_alt_names: spec.subject_alt_names.clone(),
                });
            }
        }
        for ks in &set.kube_services {
            let spec = &ks.spec;
            // Headless and ExternalName Services have no VIP to route; their clients resolve
            // pod addresses (or a CNAME) and reach them as plain pod-to-pod traffic.
            if spec.cluster_ip.as_deref() == Some("None")
                || spec.service_type.as_deref() == Some("ExternalName")
            {
                continue;
            }
            let host = format!(
                "{}.{}.svc.{}",
                ks.name,
                ks.namespace,
                set.cluster_domain.as_str()
            )
            .to_ascii_lowercase();
            let ports = spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    number: p.port as u16,
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::from_kube_port(
                        p.name.as_deref(),
                        p.app_protocol.as_deref(),
                    ),
                    target_port: p
                        .target_port
                        .as_ref()
                        .and_then(|v| v.as_u64())
                        .unwrap_or(p.port as u64) as u16,
                })
                .collect();
            let addresses = spec
                .cluster_ip
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .collect();
            // Endpoints: the Service's EndpointSlices when it has any (the API server's view), else
            // the Pods its selector picks (files without slices); plus the WorkloadEntries the
            // selector picks (Istio does the same).
            let mut endpoints = match slices_of.get(&(ks.namespace.as_str(), ks.name.as_str())) {
                Some(slices) => slice_endpoints(slices, &pods),
                None if !spec.selector.is_empty() => pods.selected(&ks.namespace, &spec.selector),
                None => Vec::new(),
            };
            if !spec.selector.is_empty() {
                endpoints.extend(selected_workload_entries(
                    set,
                    &ks.namespace,
                    &spec.selector,
                ));
            }
            if reg.by_host.contains_key(&host) {
                continue; // a ServiceEntry with the same host is already there
            }
            reg.insert(Service {
                host,
                namespace: ks.namespace.clone(),
                defined_by: format!("Service/{}/{}", ks.namespace, ks.name),
                origin: ServiceOrigin::Kubernetes,
                addresses,
                cidrs: Vec::new(),
                ports,
                resolution: Resolution::Static,
                external: false,
                endpoints,
                subject_alt_names: Vec::new(),
            });
        }
        reg.derive_wildcard_hosts(set);
        for pod in &set.pods {
            for ip in pod.spec.ips() {
                reg.workloads.entry(ip).or_insert_with(|| Workload {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    labels: pod.labels.clone(),
                });
            }
        }
        reg
    }

    /// A host a VirtualService names (as a host, destination or mirror) that is no service
    /// but falls under a wildcard ServiceEntry host (`reviews.eu.bookinfo.com` under
    /// `*.eu.bookinfo.com`) becomes a service of its own, as Istio makes it a known
    /// destination: the wildcard entry's ports, location and endpoints; with DNS resolution
    /// and no endpoints, the requested host itself is resolved; with NONE, traffic goes to the
    /// original destination.
    fn derive_wildcard_hosts(&mut self, set: &ConfigSet) {
        let wildcards: Vec<ServiceId> = (0..self.services.len())
            .filter(|i| self.services[*i].host.starts_with("*."))
            .collect();
        if wildcards.is_empty() {
            return;
        }
        let domain = &set.cluster_domain;
        let mut named: Vec<String> = Vec::new();
        for vs in &set.virtual_services {
            let ns = &vs.namespace;
            named.extend(vs.spec.hosts.iter().map(|h| expand_host(h, ns, domain)));
            for r in &vs.spec.http {
                named.extend(
                    r.route
                        .iter()
                        .map(|d| expand_host(&d.destination.host, ns, domain)),
                );
                named.extend(r.mirror.iter().map(|d| expand_host(&d.host, ns, domain)));
                named.extend(
                    r.mirrors
                        .iter()
                        .map(|m| expand_host(&m.destination.host, ns, domain)),
                );
            }
            for r in &vs.spec.tcp {
                named.extend(
                    r.route
                        .iter()
                        .map(|d| expand_host(&d.destination.host, ns, domain)),
                );
            }
            for r in &vs.spec.tls {
                named.extend(
                    r.route
                        .iter()
                        .map(|d| expand_host(&d.destination.host, ns, domain)),
                );
            }
        }
        for host in named {
            if host.contains('*') || self.by_host.contains_key(&host) {
                continue;
            }
            let Some(w) = wildcards
                .iter()
                .filter(|i| host_matches(&self.services[**i].host, &host))
                .max_by_key(|i| self.services[**i].host.len())
            else {
                continue;
            };
            let mut svc = self.services[*w].clone();
            let pattern = std::mem::replace(&mut svc.host, host.clone());
            for e in &mut svc.endpoints {
                if e.address == EndpointAddress::Dns(pattern.clone()) {
                    e.address = EndpointAddress::Dns(host.clone());
                }
            }
            // The wildcard entry keeps its addresses; the host is reached by name or port.
            svc.addresses.clear();
            svc.cidrs.clear();
            self.insert(svc);
        }
    }

    fn insert(&mut self, svc: Service) {
        if self.by_host.contains_key(&svc.host) {
            // Istio merges ServiceEntries with one host; the first definition wins here and
            // analysis reports the conflict when protocols disagree.
            return;
        }
        self.by_host.insert(svc.host.clone(), self.services.len());
        self.services.push(svc);
    }

    /// The service with this exact (lowercase) host.
    pub fn by_host(&self, host: &str) -> Option<ServiceId> {
        self.by_host.get(host).copied()
    }

    /// Services whose host matches a VirtualService/DestinationRule host pattern (exact or
    /// `*.suffix` / `*`).
    pub fn matching(&self, pattern: &str) -> Vec<ServiceId> {
        if !pattern.starts_with('*') {
            return self.by_host(pattern).into_iter().collect();
        }
        self.services
            .iter()
            .enumerate()
            .filter(|(_, s)| host_matches(pattern, &s.host))
            .map(|(i, _)| i)
            .collect()
    }

    /// The workload at `ip`, if known.
    pub fn workload(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.get(&ip)
    }
}

fn endpoint_from(e: &config::WorkloadEntry, workload: Option<String>) -> Endpoint {
    let address = match e.address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(ip),
        Err(_) => EndpointAddress::Dns(e.address.to_ascii_lowercase()),
    };
    Endpoint {
        address,
        ports: e
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), *v as u16))
            .collect(),
        labels: e.labels.clone(),
        weight: e.weight.filter(|w| *w > 0).unwrap_or(1),
        locality: e.locality.clone(),
        workload,
    }
}

fn selected_workload_entries(
    set: &ConfigSet,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<Endpoint> {
    set.workload_entries
        .iter()
        .filter(|we| we.namespace == namespace && labels_match(selector, &we.spec.labels))
        .map(|we| endpoint_from(&we.spec, Some(format!("{}/{}", we.namespace, we.name))))
        .collect()
}

/// Pods by namespace and name, for slice endpoints' `targetRef` and selectors.
struct PodIndex<'a> {
    by_name: HashMap<(&'a str, &'a str), &'a Object<KubePod>>,
    all: &'a [Object<KubePod>],
}

impl<'a> PodIndex<'a> {
    fn new(all: &'a [Object<KubePod>]) -> Self {
        let by_name = all
            .iter()
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
            .collect();
        PodIndex { by_name, all }
    }

    /// Live pods of `namespace` whose labels match `selector`, one endpoint per address.
    fn selected(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Endpoint> {
        self.all
            .iter()
            .filter(|p| p.namespace == namespace && !p.spec.is_terminal())
            .filter(|p| labels_match(selector, &p.labels))
            .flat_map(|p| {
                p.spec.ips().into_iter().map(|ip| Endpoint {
                    address: EndpointAddress::Ip(ip),
                    ports: BTreeMap::new(),
                    labels: p.labels.clone(),
                    weight: 1,
                    locality: None,
                    workload: Some(format!("{}/{}", p.namespace, p.name)),
                })
            })
            .collect()
    }
}

/// Ready endpoints of a Service's slices. Labels come from the pod behind each endpoint (subsets
/// select on them); ports are keyed by the Service port name, as the slices name them. An
/// address listed twice (slices overlap while the controller rebalances) is one endpoint.
fn slice_endpoints(slices: &[&Object<KubeEndpointSlice>], pods: &PodIndex<'_>) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for slice in slices {
        if slice.spec.address_type.as_deref() == Some("FQDN") {
            continue;
        }
        let ports: BTreeMap<String, u16> = slice
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port? as u16)))
            .collect();
        for ep in &slice.spec.endpoints {
            let c = &ep.conditions;
            if c.ready == Some(false) || c.terminating == Some(true) {
                continue;
            }
            let pod = ep.target_ref.as_ref().and_then(|r| {
                let name = r.name.as_deref()?;
                let ns = r.namespace.as_deref().unwrap_or(&slice.namespace);
                (r.kind.as_deref() == Some("Pod"))
                    .then(|| pods.by_name.get(&(ns, name)).copied())
                    .flatten()
            });
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if !seen.insert(ip) {
                    continue;
                }
                out.push(Endpoint {
                    address: EndpointAddress::Ip(ip),
                    ports: ports.clone(),
                    labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                    weight: 1,
                    locality: None,
                    workload: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
                });
            }
        }
    }
    out
}

/// Expand a VS/DR host written in namespace `ns`: a name without dots becomes
/// `name.ns.svc.cluster.local`; anything with a dot, a wildcard or an IP is used as written.
pub fn expand_host(host: &str, ns: &str, domain: &ClusterDomain) -> String {
    let h = host.to_ascii_lowercase();
    if h.contains('.') || h.starts_with('*') || h.parse::<IpAddr>().is_ok() {
        h
    } else {
        format!("{h}.{ns}.svc.{}", domain.as_str())
    }
}

/// Does host pattern `pattern` (`*`, `*.suffix` or exact) cover `host`? Both lowercase.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Do two host patterns overlap (one covers the other)?
pub fn hosts_intersect(a: &str, b: &str) -> bool {
    host_matches(a, b)
        || host_matches(b, a)
        || (a.starts_with('*')
            && b.starts_with('*')
            && (a.ends_with(&b[1..]) || b.ends_with(&a[1..])))
}

/// The names a client may use for a Kubernetes service: `name`, `name.ns`, `name.ns.svc`, FQDN.
pub fn kube_aliases(host: &str, domain: &ClusterDomain) -> Vec<String> {
    let suffix = format!(".svc.{}", domain.as_str());
    match host.strip_suffix(&suffix) {
        Some(name_ns) => {
            let name = name_ns.split('.').next().unwrap_or(name_ns).to_string();
            vec![
                name,
                name_ns.to_string(),
                format!("{name_ns}.svc"),
                host.to_string(),
            ]
        }
        None => vec![host.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_against_config_namespace() {
        assert_eq!(
            expand_host("reviews", "shop", &ClusterDomain::default()),
            "reviews.shop.svc.cluster.local"
        );
        assert_eq!(
            expand_host("reviews.default", "shop", &ClusterDomain::default()),
            "reviews.default"
        );
        assert_eq!(
            expand_host("*.example.com", "shop", &ClusterDomain::default()),
            "*.example.com"
        );
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("*", "x"));
        assert!(hosts_intersect("*.foo.com", "a.foo.com"));
        assert!(hosts_intersect("*.foo.com", "*.a.foo.com"));
    }

    #[test]
    fn kube_port_protocols() {
        assert_eq!(
            Protocol::from_kube_port(Some("http-web"), None),
            Protocol::Http
        );
        assert_eq!(Protocol::from_kube_port(Some("grpc"), None), Protocol::Grpc);
        assert_eq!(
            Protocol::from_kube_port(Some("web"), None),
            Protocol::Unknown
        );
        assert_eq!(
            Protocol::from_kube_port(Some("tcp-db"), None),
            Protocol::Tcp
        );
        assert_eq!(
            Protocol::from_kube_port(None, Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
    }
}
