//! ServiceEntries: hosts, addresses, ports, resolution and endpoints.

use super::*;

impl Analyzer<'_> {
    pub(super) fn service_entry(&mut self, se: &Object<config::ServiceEntry>) {
        let e = Emit::new(se.object_ref("ServiceEntry"), &se.source);
        let s = &se.spec;
        check_export_to(&e, &se.namespace, &s.export_to, true, false);
        if s.hosts.is_empty() {
            e.error(codes::SCHEMA, "spec.hosts", "ServiceEntry has no hosts");
        }
        let resolution = s.resolution.as_deref().unwrap_or("NONE");
        for (i, h) in s.hosts.iter().enumerate() {
            let name = h.strip_prefix("*.").unwrap_or(h);
            if h == "*" {
                e.error(
                    codes::SCHEMA,
                    format!("spec.hosts[{i}]"),
                    "host `*` is not allowed",
                );
            } else if !super::workload_entry::is_fqdn(name) {
                e.error(
                    codes::SCHEMA,
                    format!("spec.hosts[{i}]"),
                    format!("invalid host `{h}`: a DNS name, with at most a leading `*.`"),
                );
            } else if s.endpoints.is_empty()
                && matches!(resolution, "DNS" | "DNS_ROUND_ROBIN")
                && !name.contains('.')
            {
                // Istio: without endpoints each host is resolved, so it must be an FQDN.
                e.error(
                    codes::SCHEMA,
                    format!("spec.hosts[{i}]"),
                    format!("hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode {resolution}"),
                );
            }
        }
        // Several hosts on a plain TCP port cannot be told apart unless the entry passes
        // traffic through (NONE).
        if resolution != "NONE" && s.hosts.len() > 1 {
            let opaque = s.ports.iter().any(|p| {
                let proto = crate::compile::Protocol::parse(p.protocol.as_deref().unwrap_or(""));
                !proto.is_http()
                    && !matches!(
                        proto,
                        crate::compile::Protocol::Https | crate::compile::Protocol::Tls
                    )
            });
            if opaque {
                e.error(
                    codes::SCHEMA,
                    "spec.hosts",
                    "multiple hosts provided with non-HTTP, non-TLS ports",
                );
            }
        }
        if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"].contains(&resolution) {
            e.error(
                codes::SCHEMA,
                "spec.resolution",
                format!("unknown resolution `{resolution}`"),
            );
        }
        if resolution == "DYNAMIC_DNS" {
            // Istio's rules: the requested host (Host, SNI) is resolved, so every host is a
            // wildcard, and there are no addresses or endpoints; HTTP, HTTP2, GRPC and TLS.
            for (i, h) in s.hosts.iter().enumerate() {
                if !h.starts_with("*.") {
                    e.error(
                        codes::SCHEMA,
                        format!("spec.hosts[{i}]"),
                        "host must be a wildcard for resolution DYNAMIC_DNS",
                    );
                }
            }
            if !s.addresses.is_empty() {
                e.error(
                    codes::SCHEMA,
                    "spec.addresses",
                    "addresses cannot be set for resolution DYNAMIC_DNS",
                );
            }
            if !s.endpoints.is_empty() {
                e.error(codes::SCHEMA, "spec.endpoints", "endpoints cannot be set for resolution DYNAMIC_DNS: the requested host is resolved");
            }
            for (i, p) in s.ports.iter().enumerate() {
                let proto = p.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
                if !["HTTP", "HTTP2", "GRPC", "TLS"].contains(&proto.as_str()) {
                    e.error(
                        codes::SCHEMA,
                        format!("spec.ports[{i}].protocol"),
                        "only HTTP, HTTP2, GRPC and TLS ports for resolution DYNAMIC_DNS",
                    );
                }
            }
        }
        for (i, a) in s.addresses.iter().enumerate() {
            let ip = a.parse::<std::net::IpAddr>().is_ok();
            let cidr = a.parse::<ipnet::IpNet>().is_ok();
            if !ip && !cidr {
                e.error(
                    codes::SCHEMA,
                    format!("spec.addresses[{i}]"),
                    format!("`{a}` is not an IP or CIDR"),
                );
            } else if cidr && !ip && resolution.starts_with("DNS") {
                e.error(
                    codes::SCHEMA,
                    format!("spec.addresses[{i}]"),
                    "CIDR addresses are not allowed with DNS resolution",
                );
            }
        }
        if resolution == "NONE" && !s.endpoints.is_empty() {
            e.error(
                codes::SCHEMA,
                "spec.endpoints",
                "endpoints are not allowed with resolution NONE",
            );
        }
        if resolution == "DNS_ROUND_ROBIN" && s.endpoints.len() > 1 {
            e.error(
                codes::SCHEMA,
                "spec.endpoints",
                "DNS_ROUND_ROBIN allows at most one endpoint",
            );
        }
        if !s.endpoints.is_empty() && s.workload_selector.is_some() {
            e.error(
                codes::SCHEMA,
                "spec.workloadSelector",
                "endpoints and workloadSelector are exclusive",
            );
        }
        for (i, ep) in s.endpoints.iter().enumerate() {
            let Ok(ip) = ep.address.parse::<std::net::IpAddr>() else {
                continue;
            };
            let link_local = match ip {
                std::net::IpAddr::V4(v4) => v4.is_link_local(),
                std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
            let own_port = s.ports.iter().any(|p| {
                let port = p.target_port.unwrap_or(p.number);
                port == 15000 || port == 15001
            });
            if link_local || (ip.is_loopback() && own_port) {
                e.warn(codes::NODE_LOCAL_ENDPOINT, format!("spec.endpoints[{i}].address"), format!("`{ip}` is {}: with --capture ebpf the proxy runs in the node's network namespace and refuses to dial it for pods (503 UF, counted in nodeproxy_upstream_refused_total) unless --allow-upstream-cidr lets it through", if link_local { "link-local (the node's, e.g. a cloud metadata service)" } else { "the node's loopback on a nodeproxy port (its admin API or capture listener)" }));
            }
        }
        // Endpoints have the WorkloadEntry shape: names only with DNS resolution, ports named
        // as the entry names its ports.
        let port_names: HashSet<String> = s.ports.iter().map(|p| p.name.clone()).collect();
        let names_ok = resolution.starts_with("DNS");
        for (i, ep) in s.endpoints.iter().enumerate() {
            super::workload_entry::endpoint_fields(
                &e,
                &format!("spec.endpoints[{i}]"),
                ep,
                names_ok,
                Some(&port_names),
            );
        }
        let mut numbers = HashSet::new();
        let mut pnames = HashSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            if p.number == 0 || p.number > 65535 {
                e.error(
                    codes::SCHEMA,
                    format!("spec.ports[{i}].number"),
                    format!("port {} is out of range", p.number),
                );
            }
            if !numbers.insert(p.number) {
                e.error(
                    codes::SCHEMA,
                    format!("spec.ports[{i}].number"),
                    format!("duplicate port {}", p.number),
                );
            }
            if !p.name.is_empty() && !pnames.insert(p.name.clone()) {
                e.error(
                    codes::SCHEMA,
                    format!("spec.ports[{i}].name"),
                    format!("duplicate port name `{}`", p.name),
                );
            }
            let proto = crate::compile::Protocol::parse(p.protocol.as_deref().unwrap_or(""));
            if s.addresses.is_empty()
                && matches!(
                    proto,
                    crate::compile::Protocol::Tcp | crate::compile::Protocol::Unknown
                )
            {
                e.warn(codes::ADDRESSES_REQUIRED, format!("spec.ports[{i}]"), "TCP (or undeclared) port without addresses: the port alone identifies the service, so it must be unique on the node");
            }
        }
        self.out.extend(e.finish());
    }
}

impl Analyzer<'_> {
    /// One host and port declared with different protocols by ServiceEntries some namespace
    /// sees together (IST0177): each of them is reported, as Istio does.
    pub(super) fn protocol_conflicts(&mut self) {
        let mut by_port: std::collections::BTreeMap<(String, u32), Vec<(usize, String)>> =
            Default::default();
        for (k, se) in self.set.service_entries.iter().enumerate() {
            for h in &se.spec.hosts {
                for p in &se.spec.ports {
                    let proto = p.protocol.clone().unwrap_or_default().to_ascii_uppercase();
                    by_port
                        .entry((h.to_ascii_lowercase(), p.number))
                        .or_default()
                        .push((k, proto));
                }
            }
        }
        let mut reported = HashSet::new();
        for ((host, port), decls) in by_port {
            for (k, proto) in &decls {
                let se = &self.set.service_entries[*k];
                let seen = Exported::of(&se.spec.export_to, &se.namespace);
                let others: Vec<String> = decls
                    .iter()
                    .filter(|(o, p)| {
                        let other = &self.set.service_entries[*o];
                        o != k
                            && p != proto
                            && Exported::of(&other.spec.export_to, &other.namespace).overlaps(&seen)
                    })
                    .map(|(o, p)| {
                        let other = &self.set.service_entries[*o];
                        format!(
                            "{}/{} ({})",
                            other.namespace,
                            other.name,
                            if p.is_empty() { "unset" } else { p }
                        )
                    })
                    .collect();
                if others.is_empty() || !reported.insert(*k) {
                    continue;
                }
                self.out.push(
                    Diagnostic::new(
                        codes::CONFLICTING_PROTOCOL,
                        Severity::Warning,
                        format!(
                            "{host}:{port} is declared {} here and otherwise by ServiceEntry {}",
                            if proto.is_empty() { "(unset)" } else { proto },
                            others.join(", ")
                        ),
                    )
                    .on(se.object_ref("ServiceEntry"), se.source.clone())
                    .at("spec.ports"),
                );
            }
        }
    }

    /// Kubernetes Service ports whose protocol Istio cannot tell from the name or
    /// appProtocol (IST0118, info; IST0150 for ExternalName Services, whose port named `tcp`
    /// is also reported). Istio's control plane namespace is skipped, as Istio does.
    pub(super) fn kube_service(&mut self, ks: &Object<config::KubeService>) {
        if ks.namespace == crate::compile::scopes::ROOT_NAMESPACE {
            return;
        }
        let e = Emit::new(ks.object_ref("Service"), &ks.source);
        let external_name = ks.spec.service_type.as_deref() == Some("ExternalName");
        for (i, p) in ks.spec.ports.iter().enumerate() {
            let name = p.name.as_deref().unwrap_or("");
            let known = kube_port_protocol_known(p);
            if external_name && (!known || name == "tcp") {
                e.warn(codes::EXTERNAL_NAME_PORT_NAME, format!("spec.ports[{i}].name"), "port name for ExternalName service is invalid: the proxy may treat its traffic as plain TCP");
            } else if !known {
                let tp = p
                    .target_port
                    .as_ref()
                    .map(|v| {
                        serde_yaml::to_string(v)
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_else(|| p.port.to_string());
                e.info(codes::PORT_NAME_CONVENTION, format!("spec.ports[{i}].name"), format!("port name {name} (port: {}, targetPort: {tp}) doesn't follow the naming convention of Istio port (`<protocol>[-<suffix>]` or appProtocol): its protocol is unknown", p.port));
            }
        }
        self.out.extend(e.finish());
    }
}

/// Istio's protocol for a Service port: UDP; appProtocol, else the port name's prefix before
/// `-` (`grpc-web` whole); well-known ports (SMTP, DNS, MySQL, MongoDB) are TCP.
fn kube_port_protocol_known(p: &config::KubeServicePort) -> bool {
    if p.protocol.as_deref() == Some("UDP") {
        return true;
    }
    let name = p
        .app_protocol
        .as_deref()
        .or(p.name.as_deref())
        .unwrap_or("");
    if p.app_protocol.is_some()
        && matches!(
            name,
            "kubernetes.io/h2c" | "kubernetes.io/ws" | "kubernetes.io/wss"
        )
    {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    let prefix = if lower.starts_with("grpc-web") {
        "grpc-web"
    } else {
        lower.split('-').next().unwrap_or("")
    };
    [
        "tcp", "udp", "grpc", "grpc-web", "http", "http2", "https", "tls", "mongo", "redis",
        "mysql",
    ]
    .contains(&prefix)
        || [25, 53, 3306, 27017].contains(&p.port)
}
