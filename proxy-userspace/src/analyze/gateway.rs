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
                    server_tls(&e, &f, mode, t);
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
    }
}

impl Analyzer<'_> {
    /// Across gateways: two of one selector claiming a host on one port (IST0145, an error:
    /// which one serves it is undefined), and two that present the same certificate
    /// (IST0138: HTTP/2 clients reuse a connection across their hosts and get 404s).
    pub(super) fn gateway_conflicts(&mut self) {
        let gws = &self.set.gateways;
        let name = |g: &Object<config::Gateway>| format!("{}/{}", g.namespace, g.name);
        let selector = |g: &Object<config::Gateway>| {
            g.spec
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let bind = |s: &config::Server| {
            s.bind
                .as_ref()
                .map(|b| serde_yaml::to_string(b).unwrap_or_default())
                .unwrap_or_default()
        };
        for (i, a) in gws.iter().enumerate() {
            let e = Emit::new(a.object_ref("Gateway"), &a.source);
            // Same selector, or both selecting one pod.
            let same_workload = |b: &Object<config::Gateway>| {
                selector(a) == selector(b)
                    || self.set.pods.iter().any(|p| {
                        p.namespace == b.namespace
                            && p.namespace == a.namespace
                            && labels_match(&a.spec.selector, &p.labels)
                            && labels_match(&b.spec.selector, &p.labels)
                    })
            };
            for (k, server) in a.spec.servers.iter().enumerate() {
                let mut others: Vec<String> = gws
                    .iter()
                    .enumerate()
                    .filter(|(j, b)| *j != i && same_workload(b))
                    .filter(|(_, b)| {
                        b.spec.servers.iter().any(|o| {
                            o.port.number == server.port.number
                                && bind(o) == bind(server)
                                && o.hosts.iter().any(|h| server.hosts.contains(h))
                        })
                    })
                    .map(|(_, b)| name(b))
                    .collect();
                if !others.is_empty() {
                    others.sort();
                    e.error(
                        codes::CONFLICTING_GATEWAYS,
                        format!("spec.servers[{k}]"),
                        format!(
                            "conflict with gateways {} (workload selector {}, port {}, hosts {})",
                            others.join(","),
                            selector(a),
                            server.port.number,
                            server.hosts.join(",")
                        ),
                    );
                }
            }
            for (j, b) in gws.iter().enumerate() {
                let superset = a
                    .spec
                    .selector
                    .iter()
                    .all(|(k, v)| b.spec.selector.get(k) == Some(v));
                if j == i || !superset {
                    continue;
                }
                let shared = a.spec.servers.iter().any(|x| {
                    b.spec.servers.iter().any(|y| match (&x.tls, &y.tls) {
                        (Some(x), Some(y)) => same_certificate(x, y),
                        _ => false,
                    })
                });
                if shared {
                    e.warn(
                        codes::GATEWAY_DUPLICATE_CERTIFICATE,
                        "metadata.name",
                        format!("duplicate certificate in gateways {} and {}: HTTP/2 clients reusing a connection across their hosts may get 404s", name(a), name(b)),
                    );
                }
            }
            self.out.extend(e.finish());
        }
    }
}

/// Istio's rule: the same credentialName, or (neither with one) the same certificate and key
/// files.
fn same_certificate(a: &config::ServerTlsSettings, b: &config::ServerTlsSettings) -> bool {
    match (&a.credential_name, &b.credential_name) {
        (Some(x), Some(y)) => x == y,
        (None, None) => {
            a.server_certificate.is_some()
                && a.server_certificate == b.server_certificate
                && a.private_key.is_some()
                && a.private_key == b.private_key
        }
        _ => false,
    }
}

/// Istio's `ServerTLSSettings` rules on certificate sources: one of credentialName,
/// credentialNames, serverCertificate/privateKey, tlsCertificates; SIMPLE and MUTUAL need one
/// (each certificate with its key); MUTUAL needs a client CA unless credentials come from a
/// Secret; ISTIO_MUTUAL takes none; PASSTHROUGH ignores them.
fn server_tls(e: &Emit<'_>, f: &str, mode: &str, t: &config::ServerTlsSettings) {
    let pair = t.server_certificate.is_some() && t.private_key.is_some();
    let sources = [
        pair,
        t.credential_name.is_some(),
        !t.credential_names.is_empty(),
        !t.tls_certificates.is_empty(),
    ];
    let any_cert = sources.iter().any(|s| *s)
        || t.server_certificate.is_some()
        || t.private_key.is_some()
        || t.ca_certificates.is_some();
    match mode {
        "ISTIO_MUTUAL" if any_cert => e.error(
            codes::SCHEMA,
            format!("{f}.tls"),
            "ISTIO_MUTUAL TLS cannot have associated certificates, keys, CA bundles or credentials",
        ),
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" if any_cert => e.warn(
            codes::SCHEMA_WARNING,
            format!("{f}.tls"),
            format!("{mode} mode does not use certificates, they will be ignored"),
        ),
        _ => {}
    }
    if sources.iter().filter(|s| **s).count() > 1 {
        e.error(
            codes::SCHEMA,
            format!("{f}.tls"),
            "only one of credentialName, credentialNames, serverCertificate/privateKey, tlsCertificates should be specified",
        );
    }
    if !matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") {
        return;
    }
    let prefix = if mode == "SIMPLE" {
        "SIMPLE TLS"
    } else {
        "MUTUAL TLS"
    };
    if t.credential_name.is_some() || !t.credential_names.is_empty() {
        if t.credential_names.len() > 1 {
            e.warn(codes::UNSUPPORTED_FIELD, format!("{f}.tls.credentialNames"), "nodeproxy serves the first of credentialNames only (Istio serves an RSA and an ECDSA certificate)");
        }
        return;
    }
    if mode != "SIMPLE"
        && t.ca_certificates.is_none()
        && t.tls_certificates
            .iter()
            .all(|c| c.ca_certificates.is_none())
    {
        e.error(
            codes::SCHEMA,
            format!("{f}.tls.caCertificates"),
            format!("{prefix} requires a client CA bundle"),
        );
    }
    if t.tls_certificates.len() > 2 {
        e.warn(
            codes::SCHEMA_WARNING,
            format!("{f}.tls.tlsCertificates"),
            format!("{prefix} can support up to 2 server certificates"),
        );
    } else if t.tls_certificates.len() == 2 {
        e.warn(codes::UNSUPPORTED_FIELD, format!("{f}.tls.tlsCertificates"), "nodeproxy serves the first of tlsCertificates only (Istio serves an RSA and an ECDSA certificate)");
    }
    let certs: Vec<(bool, bool)> = match t.tls_certificates.is_empty() {
        true => vec![(t.server_certificate.is_some(), t.private_key.is_some())],
        false => t
            .tls_certificates
            .iter()
            .map(|c| (!c.server_certificate.is_empty(), !c.private_key.is_empty()))
            .collect(),
    };
    for (cert, key) in certs {
        if !cert {
            e.error(
                codes::SCHEMA,
                format!("{f}.tls"),
                format!("{prefix} requires a server certificate"),
            );
        }
        if !key {
            e.error(
                codes::SCHEMA,
                format!("{f}.tls"),
                format!("{prefix} requires a private key"),
            );
        }
    }
}
