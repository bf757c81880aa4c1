//! Listeners: one per mesh service address and port (with its route table or TCP/TLS rules),
//! and one per gateway port (its servers' virtual hosts); which VirtualServices bind where.

use super::*;

impl Compiler<'_> {
    pub(super) fn build_mesh_listeners(&mut self) {
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
        // Ports served by a service without addresses: the kernel sends every connect to such
        // a port here, so a Host no service claims goes to its original destination (Istio's
        // `allow_any` virtual host, outboundTrafficPolicy ALLOW_ANY), not to that service.
        let mut allow_any: HashMap<u16, usize> = HashMap::new();
        for svc in services.iter().filter(|s| s.addresses.is_empty()) {
            for port in &svc.ports {
                let Some(table) = tables.get_mut(&port.number) else {
                    continue;
                };
                if allow_any.contains_key(&port.number) {
                    continue;
                }
                let rule = self.passthrough_rule();
                let idx = table.add_vhost(VirtualHost {
                    name: format!("allow_any:{}", port.number),
                    domains: Vec::new(),
                    rules: vec![rule.clone()],
                    default_rules: vec![rule],
                    https_redirect: false,
                });
                allow_any.insert(port.number, idx);
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
                    scope: None,
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
                let fallback_vhost = match svc.addresses.is_empty() {
                    true => allow_any.get(&port.number).copied(),
                    false => vhost_of.get(&(sid, port.number)).copied(),
                };
                let base = Listener {
                    address: None,
                    port: port.number,
                    protocol: port.protocol,
                    kind: ListenerKind::Mesh { service: sid },
                    http,
                    fallback_vhost,
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

    pub(super) fn build_gateway_listeners(&mut self) {
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
                    // One certificate is served: the first of `credentialNames` or
                    // `tlsCertificates` when those are used (analysis says so).
                    credential_name: tls.and_then(|t| {
                        t.credential_name
                            .clone()
                            .or_else(|| t.credential_names.first().cloned())
                    }),
                    ca_certificates: tls.and_then(|t| {
                        t.ca_certificates.clone().or_else(|| {
                            t.tls_certificates
                                .first()
                                .and_then(|c| c.ca_certificates.clone())
                        })
                    }),
                    cert_files: tls.and_then(|t| {
                        t.server_certificate
                            .clone()
                            .zip(t.private_key.clone())
                            .or_else(|| {
                                t.tls_certificates
                                    .first()
                                    .map(|c| (c.server_certificate.clone(), c.private_key.clone()))
                            })
                    }),
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

pub(super) fn rules_mention_gateway(vs: &VirtualService, gateway: &str) -> bool {
    vs.http
        .iter()
        .flat_map(|r| &r.matches)
        .any(|m| m.gateways.iter().any(|g| g == gateway))
}

pub(super) fn rules_mention_gateway_ns(vs: &VirtualService, ns: &str, gateway: &str) -> bool {
    vs.http
        .iter()
        .flat_map(|r| &r.matches)
        .any(|m| m.gateways.iter().any(|g| qualify_gateway(g, ns) == gateway))
}
