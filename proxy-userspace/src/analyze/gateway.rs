//! Gateways: servers, ports, hosts and TLS settings.

use super::*;

impl Analyzer<'_> {
    pub(super) fn gateway(&mut self, gw: &Object<config::Gateway>) {
        let e = Emit::new(gw.object_ref("Gateway"), &gw.source);
        if gw.spec.servers.is_empty() {
            e.error(codes::SCHEMA, "spec.servers", "gateway has no servers");
        }
        let mut names = HashSet::new();
        for (i, s) in gw.spec.servers.iter().enumerate() {
            let f = format!("spec.servers[{i}]");
            if s.hosts.is_empty() {
                e.error(codes::SCHEMA, format!("{f}.hosts"), "server has no hosts");
            }
            if s.port.name.is_empty() {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.port.name"),
                    "port name is required",
                );
            } else if !names.insert(s.port.name.clone()) {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.port.name"),
                    format!("duplicate port name `{}`", s.port.name),
                );
            }
            if s.port.target_port.is_some() {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.port.targetPort"),
                    "targetPort is not allowed on Gateway ports",
                );
            }
            let proto = s.port.protocol.to_ascii_uppercase();
            if ![
                "HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS",
                "MYSQL",
            ]
            .contains(&proto.as_str())
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.port.protocol"),
                    format!("unknown protocol `{}`", s.port.protocol),
                );
            }
            let is_tls_port = proto == "HTTPS" || proto == "TLS";
            match &s.tls {
                None if is_tls_port => e.error(
                    codes::SCHEMA,
                    format!("{f}.tls"),
                    format!("{proto} server needs tls settings"),
                ),
                Some(t)
                    if !is_tls_port
                        && (t.mode.is_some() || t.credential_name.is_some())
                        && !t.https_redirect =>
                {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.tls"),
                        "tls settings on a plain-text port (only httpsRedirect is allowed)",
                    )
                }
                Some(t) => {
                    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
                    if matches!(mode, "SIMPLE" | "MUTUAL")
                        && t.credential_name.is_none()
                        && t.server_certificate.is_none()
                    {
                        e.error(
                            codes::SCHEMA,
                            format!("{f}.tls"),
                            format!(
                                "{mode} TLS needs credentialName or serverCertificate/privateKey"
                            ),
                        );
                    }
                    if matches!(
                        mode,
                        "OPTIONAL_MUTUAL" | "ISTIO_MUTUAL" | "AUTO_PASSTHROUGH"
                    ) {
                        e.warn(
                            codes::UNSUPPORTED_FIELD,
                            format!("{f}.tls.mode"),
                            format!("tls mode {mode} is not supported by nodeproxy, ignored"),
                        );
                    }
                }
                None => {}
            }
        }
        self.out.extend(e.finish());
        // VirtualServices bound to this gateway whose hosts match no server host (IST0132).
        let me = format!("{}/{}", gw.namespace, gw.name);
        for vs in &self.set.virtual_services {
            if !vs
                .spec
                .gateways
                .iter()
                .any(|g| qualify_gateway(g, &vs.namespace) == me)
            {
                continue;
            }
            for (i, h) in vs.spec.hosts.iter().enumerate() {
                let vh = expand_host(h, &vs.namespace, &self.set.cluster_domain);
                let hit = gw.spec.servers.iter().flat_map(|s| &s.hosts).any(|sh| {
                    let name = sh
                        .split_once('/')
                        .map(|x| x.1)
                        .unwrap_or(sh)
                        .to_ascii_lowercase();
                    crate::compile::registry::hosts_intersect(&vh, &name)
                });
                if !hit {
                    self.out.push(
                        Diagnostic::new(
                            codes::HOST_NOT_IN_GATEWAY,
                            Severity::Warning,
                            format!("host `{vh}` matches no server host of gateway {me}"),
                        )
                        .on(vs.object_ref("VirtualService"), vs.source.clone())
                        .at(format!("spec.hosts[{i}]")),
                    );
                }
            }
        }
    }
}
