//! Compile a validated [`ConfigSet`] into an immutable [`Snapshot`]: the service registry,
//! clusters (host, subset, port) with their merged policy and endpoints, listeners (service
//! address × port, gateway ports) and per-port HTTP route tables with Istio's host expansion and
//! first-match-wins rules, plus TCP and TLS rules.
//!
//! Request-path lookups never scan all services: listener by `address:port` (hash), virtual host
//! by Host (hash, then one hash probe per DNS label for wildcards), then the host's rules.

mod convert;
pub mod delegate;
mod dr_index;
mod listeners;
pub mod policy;
pub mod registry;
pub mod route;
mod rules;
pub mod scopes;
mod snapshot;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use http::{HeaderName, HeaderValue};
use serde::Serialize;

pub use self::convert::*;
pub use self::dr_index::DrIndex;
use self::listeners::rules_mention_gateway;
pub use self::listeners::{bound_to, qualify_gateway};
pub use self::policy::ClusterPolicy;
pub use self::registry::{
    Endpoint, EndpointAddress, Protocol, Registry, Resolution, Service, ServiceId,
};
pub use self::route::*;
pub use self::snapshot::*;
use crate::config::{
    self, ConfigSet, DestinationRule, Gateway, HttpRoute, Object, Subset, VirtualService,
    labels_match,
};
use crate::diagnostic::{Diagnostic, Severity, codes};
use registry::{expand_host, host_matches, hosts_intersect, kube_aliases};

/// The cluster of requests a port's services do not claim (Envoy's name).
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Compile a config set. Analysis must have passed; anything that still cannot be built is
/// returned as error diagnostics, never a panic.
pub fn compile(set: &ConfigSet) -> Result<Snapshot, Vec<Diagnostic>> {
    let set = &*delegate::merge(set);
    let plan = scopes::plan(set);
    if plan.len() == 1 && plan[0].client_namespace().is_none() && plan[0].hides_nothing() {
        return compile_scope(set, None);
    }
    let mut base = compile_scope(&plan[0].filter(set), None)?;
    for scope in plan.iter().skip(1) {
        let mut snap = compile_scope(&scope.filter(set), scope.client_namespace())?;
        // A cluster that is the default scope's in all but name shares its run-time state.
        let name = scope.namespaces.join(",");
        for c in &mut snap.clusters {
            let same = base
                .cluster(&c.key)
                .map(|id| &base.clusters[id])
                .is_some_and(|b| {
                    b.policy == c.policy
                        && b.endpoints == c.endpoints
                        && b.passthrough == c.passthrough
                        && b.dns == c.dns
                        && b.protocol == c.protocol
                });
            if !same {
                c.key.scope = Some(name.clone());
            }
        }
        snap.cluster_index = snap
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.key.clone(), i))
            .collect();
        let index = base.scoped.len();
        for ns in &scope.namespaces {
            base.scope_index.insert(ns.clone(), index);
        }
        base.scoped.push(Scoped {
            namespaces: scope.namespaces.clone(),
            snapshot: std::sync::Arc::new(snap),
        });
    }
    // A gateway port whose Gateways share one namespace sees what that namespace sees.
    for (port, &li) in &base.gateway_index {
        let ListenerKind::Gateway { servers } = &base.listeners[li].kind else {
            continue;
        };
        let namespaces: std::collections::BTreeSet<&str> = servers
            .iter()
            .filter_map(|s| s.gateway.split_once('/').map(|x| x.0))
            .collect();
        if let [ns] = namespaces.into_iter().collect::<Vec<_>>()[..]
            && let Some(&i) = base.scope_index.get(ns)
        {
            base.gateway_scope.insert(*port, i);
        }
    }
    Ok(base)
}

/// Compile the set one scope sees (`client_ns`: the namespace first on the DestinationRule
/// lookup path).
fn compile_scope(set: &ConfigSet, client_ns: Option<&str>) -> Result<Snapshot, Vec<Diagnostic>> {
    let mut c = Compiler {
        set,
        snap: Snapshot::default(),
        drs: DrIndex::for_client(set, client_ns),
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
            let dr = self.drs.for_host(&svc.host, &svc.namespace);
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
                        scope: None,
                    };
                    let mut policy = policy::effective(
                        dr.as_ref(),
                        subset.map(|s| s.name.as_str()),
                        port.number,
                    );
                    // A ServiceEntry's subjectAltNames, when the rule's TLS names none; a
                    // credentialName's files.
                    if let Some(t) = &policy.tls {
                        let mut settings = t.settings.clone();
                        if settings.subject_alt_names.is_empty() {
                            settings.subject_alt_names = svc.subject_alt_names.clone();
                        }
                        tls::with_credential(&mut settings, self.set.credentials_dir.as_deref());
                        if settings != t.settings {
                            policy.tls = tls::TlsOrigination::of(&settings);
                        }
                    }
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
                    let resolve_requested_host =
                        endpoints_of_wildcard(svc).map(|e| e.port_for(port));
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
                        resolve_requested_host,
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

    fn default_rule(&self, svc: &Service, port: u16) -> HttpRule {
        let key = ClusterKey {
            host: svc.host.clone(),
            subset: None,
            port,
            scope: None,
        };
        let name = key.name();
        let cluster = self
            .snap
            .cluster(&key)
            .map(ClusterRef::Cluster)
            .unwrap_or(ClusterRef::Missing(name.clone()));
        self.default_rule_to(cluster, name)
    }

    fn default_rule_to(&self, cluster: ClusterRef, name: String) -> HttpRule {
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

    /// A rule sending a request to its original destination (`PassthroughCluster`), the
    /// cluster made on first use.
    fn passthrough_rule(&mut self) -> HttpRule {
        let key = ClusterKey::new(PASSTHROUGH_CLUSTER.into(), None, 0);
        let id = match self.snap.cluster(&key) {
            Some(id) => id,
            None => {
                let service = self.snap.registry.services.len();
                self.snap.registry.services.push(Service {
                    host: PASSTHROUGH_CLUSTER.into(),
                    namespace: String::new(),
                    defined_by: "outboundTrafficPolicy ALLOW_ANY".into(),
                    origin: registry::ServiceOrigin::ServiceEntry,
                    addresses: Vec::new(),
                    cidrs: Vec::new(),
                    ports: Vec::new(),
                    resolution: Resolution::None,
                    external: true,
                    endpoints: Vec::new(),
                    subject_alt_names: Vec::new(),
                });
                let id = self.snap.clusters.len();
                self.snap.cluster_index.insert(key.clone(), id);
                self.snap.clusters.push(Cluster {
                    name: PASSTHROUGH_CLUSTER.into(),
                    key: key.clone(),
                    service,
                    protocol: Protocol::Http,
                    policy: policy::effective(None, None, 0),
                    endpoints: Vec::new(),
                    passthrough: true,
                    dns: false,
                    resolve_requested_host: None,
                });
                id
            }
        };
        let mut rule = self.default_rule_to(ClusterRef::Cluster(id), PASSTHROUGH_CLUSTER.into());
        rule.origin = "allow_any".into();
        rule
    }

    fn error(&mut self, vs: &Object<VirtualService>, field: String, msg: String) {
        self.errors.push(
            Diagnostic::new(codes::SCHEMA, Severity::Error, msg)
                .on(vs.object_ref("VirtualService"), vs.source.clone())
                .at(field),
        );
    }
}

/// The one endpoint of a wildcard host resolved by name (DNS without endpoints): the name
/// is the pattern itself, so each request's host is resolved instead.
fn endpoints_of_wildcard(svc: &Service) -> Option<&registry::Endpoint> {
    match svc.endpoints.as_slice() {
        [e] if svc.host.starts_with("*.")
            && matches!(svc.resolution, Resolution::Dns | Resolution::DnsRoundRobin)
            && e.address == EndpointAddress::Dns(svc.host.clone()) =>
        {
            Some(e)
        }
        _ => None,
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

#[cfg(test)]
mod tests;
