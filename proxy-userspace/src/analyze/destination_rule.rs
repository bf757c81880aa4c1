//! DestinationRules: subsets and traffic policies (load balancer, connection pool,
//! outlier detection, TLS, port-level settings).

use super::*;

impl Analyzer<'_> {
    pub(super) fn destination_rule(&mut self, dr: &Object<config::DestinationRule>) {
        let e = Emit::new(dr.object_ref("DestinationRule"), &dr.source);
        self.server_verification(&e, dr);
        check_export_to(
            &e,
            &dr.namespace,
            &dr.spec.export_to,
            false,
            dr.spec.workload_selector.is_some(),
        );
        let host = expand_host(&dr.spec.host, &dr.namespace, &self.set.cluster_domain);
        let services = self.registry.matching(&host);
        if services.is_empty() {
            e.warn(
                codes::UNKNOWN_DR_HOST,
                "spec.host",
                format!("host `{host}` matches no service in the registry: the rule has no effect"),
            );
        }
        let mut names = HashSet::new();
        for (i, s) in dr.spec.subsets.iter().enumerate() {
            let f = format!("spec.subsets[{i}]");
            if !names.insert(s.name.as_str()) {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.name"),
                    format!("duplicate subset name `{}`", s.name),
                );
            }
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.name"),
                    format!("subset name `{}` is not a DNS-1123 label", s.name),
                );
            }
            for sid in &services {
                let svc = &self.registry.services[*sid];
                // NONE services and ServiceEntries without endpoints have nothing to select
                // from; a Kubernetes Service without pods selects none (Istio reports it).
                let kube = svc.origin == crate::compile::registry::ServiceOrigin::Kubernetes;
                if svc.resolution == Resolution::None || (svc.endpoints.is_empty() && !kube) {
                    continue;
                }
                if !svc
                    .endpoints
                    .iter()
                    .any(|ep| labels_match(&s.labels, &ep.labels))
                {
                    e.warn(codes::SUBSET_SELECTS_NOTHING, format!("{f}.labels"), format!("subset `{}` selects no endpoint of `{}`: requests routed to it fail with 503 UH", s.name, svc.host));
                }
            }
            if let Some(tp) = &s.traffic_policy {
                self.traffic_policy(&e, &format!("{f}.trafficPolicy"), tp);
            }
        }
        if let Some(tp) = &dr.spec.traffic_policy {
            self.traffic_policy(&e, "spec.trafficPolicy", tp);
        }
        self.out.extend(e.finish());
    }

    pub(super) fn traffic_policy(&self, e: &Emit<'_>, base: &str, tp: &config::TrafficPolicy) {
        let components = [(
            base.to_string(),
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
        )]
        .into_iter()
        .chain(tp.port_level_settings.iter().enumerate().map(|(i, p)| {
            (
                format!("{base}.portLevelSettings[{i}]"),
                p.load_balancer.as_ref(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
            )
        }))
        .collect::<Vec<_>>();
        let tls = std::iter::once((format!("{base}.tls"), tp.tls.as_ref())).chain(
            tp.port_level_settings
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("{base}.portLevelSettings[{i}].tls"), p.tls.as_ref())),
        );
        for (f, t) in tls {
            if let Some(t) = t {
                client_tls(e, &f, t);
            }
        }
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            if p.port.is_none() {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.portLevelSettings[{i}].port"),
                    "port level setting needs a port",
                );
            }
        }
        for (f, lb, pool, od) in components {
            if let Some(lb) = lb {
                if let Some(s) = &lb.simple
                    && ![
                        "UNSPECIFIED",
                        "LEAST_CONN",
                        "RANDOM",
                        "PASSTHROUGH",
                        "ROUND_ROBIN",
                        "LEAST_REQUEST",
                    ]
                    .contains(&s.as_str())
                {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.loadBalancer.simple"),
                        format!("unknown load balancer `{s}`"),
                    );
                }
                if lb.simple.is_some() && lb.consistent_hash.is_some() {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.loadBalancer"),
                        "simple and consistentHash are exclusive",
                    );
                }
                if let Some(ch) = &lb.consistent_hash {
                    let cf = format!("{f}.loadBalancer.consistentHash");
                    if ch.http_cookie.as_ref().is_some_and(|c| c.name.is_empty()) {
                        e.error(
                            codes::SCHEMA,
                            format!("{cf}.httpCookie.name"),
                            "cookie hash needs a name",
                        );
                    }
                    if let Some(t) = ch.maglev.as_ref().and_then(|m| m.table_size)
                        && (t == 0 || t >= 5_000_011 || !is_prime(t))
                    {
                        e.error(
                            codes::SCHEMA,
                            format!("{cf}.maglev.tableSize"),
                            format!("maglev table size {t} must be a prime below 5000011"),
                        );
                    }
                    let ring = ch
                        .ring_hash
                        .as_ref()
                        .and_then(|r| r.minimum_ring_size)
                        .or(ch.minimum_ring_size);
                    if let Some(n) = ring.filter(|n| *n > MAX_RING_SIZE) {
                        e.error(
                            codes::SCHEMA,
                            format!("{cf}.ringHash.minimumRingSize"),
                            format!("ring size {n} is above Envoy's maximum of {MAX_RING_SIZE}"),
                        );
                    }
                    if ch.minimum_ring_size.is_some()
                        && (ch.ring_hash.is_some() || ch.maglev.is_some())
                    {
                        e.error(
                            codes::SCHEMA,
                            format!("{cf}.minimumRingSize"),
                            "minimumRingSize cannot be combined with ringHash or maglev",
                        );
                    }
                    let keys = [
                        ch.http_header_name.is_some(),
                        ch.http_cookie.is_some(),
                        ch.use_source_ip == Some(true),
                        ch.http_query_parameter_name.is_some(),
                    ];
                    if keys.iter().filter(|b| **b).count() != 1 {
                        e.error(codes::SCHEMA, cf.clone(), "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName");
                    }
                }
            }
            if let Some(pool) = pool {
                let pf = format!("{f}.connectionPool");
                if pool.tcp.is_none() && pool.http.is_none() {
                    e.error(
                        codes::SCHEMA,
                        pf.clone(),
                        "connectionPool needs tcp or http",
                    );
                }
                if let Some(t) = &pool.tcp {
                    if t.max_connections.is_some_and(|n| n < 0) {
                        e.error(
                            codes::SCHEMA,
                            format!("{pf}.tcp.maxConnections"),
                            "must not be negative",
                        );
                    }
                    check_duration(e, format!("{pf}.tcp.connectTimeout"), t.connect_timeout);
                    check_duration(
                        e,
                        format!("{pf}.tcp.maxConnectionDuration"),
                        t.max_connection_duration,
                    );
                }
                if let Some(h) = &pool.http {
                    for (name, v) in [
                        ("http1MaxPendingRequests", h.http1_max_pending_requests),
                        ("http2MaxRequests", h.http2_max_requests),
                        ("maxRequestsPerConnection", h.max_requests_per_connection),
                        ("maxRetries", h.max_retries),
                    ] {
                        if v.is_some_and(|n| n < 0) {
                            e.error(
                                codes::SCHEMA,
                                format!("{pf}.http.{name}"),
                                "must not be negative",
                            );
                        }
                    }
                    if h.use_client_protocol == Some(true)
                        && h.h2_upgrade_policy.as_deref() == Some("UPGRADE")
                    {
                        e.error(
                            codes::SCHEMA,
                            format!("{pf}.http.h2UpgradePolicy"),
                            "UPGRADE cannot be combined with useClientProtocol",
                        );
                    }
                    check_duration(e, format!("{pf}.http.idleTimeout"), h.idle_timeout);
                }
            }
            if let Some(od) = od {
                let of = format!("{f}.outlierDetection");
                for (name, v) in [
                    ("maxEjectionPercent", od.max_ejection_percent),
                    ("minHealthPercent", od.min_health_percent),
                ] {
                    if v.is_some_and(|n| !(0..=100).contains(&n)) {
                        e.error(
                            codes::SCHEMA,
                            format!("{of}.{name}"),
                            "must be within 0..100",
                        );
                    }
                }
                if od.consecutive_local_origin_failures.is_some()
                    && od.split_external_local_origin_errors != Some(true)
                {
                    e.error(
                        codes::SCHEMA,
                        format!("{of}.consecutiveLocalOriginFailures"),
                        "needs splitExternalLocalOriginErrors: true",
                    );
                }
                if od.consecutive_errors.is_some() {
                    e.warn(
                        codes::SCHEMA_WARNING,
                        format!("{of}.consecutiveErrors"),
                        "consecutiveErrors is deprecated and ignored: use consecutive5xxErrors",
                    );
                }
                check_duration(e, format!("{of}.interval"), od.interval);
                check_duration(e, format!("{of}.baseEjectionTime"), od.base_ejection_time);
            }
        }
    }
}

impl Analyzer<'_> {
    /// Istio's IST0128/IST0129: top-level (and its port-level) TLS whose server is not
    /// verified against a CA of the rule's own; nodeproxy then uses the system bundle.
    fn server_verification(&self, e: &Emit<'_>, dr: &Object<config::DestinationRule>) {
        let Some(tp) = &dr.spec.traffic_policy else {
            return;
        };
        let levels = std::iter::once(("spec.trafficPolicy.tls".to_string(), tp.tls.as_ref(), None))
            .chain(tp.port_level_settings.iter().enumerate().map(|(i, p)| {
                (
                    format!("spec.trafficPolicy.portLevelSettings[{i}].tls"),
                    p.tls.as_ref(),
                    p.port.as_ref().map(|p| p.number),
                )
            }));
        for (f, t, port) in levels {
            let Some(t) = t else { continue };
            if !matches!(t.mode, config::TlsMode::Simple | config::TlsMode::Mutual)
                || t.ca_certificates.is_some()
                || (t.credential_name.is_some() && dr.spec.workload_selector.is_some())
            {
                continue;
            }
            let (code, at) = match port {
                None => (codes::NO_SERVER_CERT_VERIFICATION_DR, String::new()),
                Some(p) => (
                    codes::NO_SERVER_CERT_VERIFICATION_PORT,
                    format!(" on port {p}"),
                ),
            };
            e.warn(code, f, format!("TLS mode {}{at} for host {} has no caCertificates to validate the server's identity (nodeproxy verifies it against the system bundle)", if t.mode == config::TlsMode::Simple { "SIMPLE" } else { "MUTUAL" }, dr.spec.host));
        }
    }
}

/// `ClientTLSSettings` as Istio validates them, and what nodeproxy does not do.
fn client_tls(e: &Emit<'_>, f: &str, t: &config::ClientTls) {
    use config::TlsMode;
    if t.mode == TlsMode::Mutual
        && t.credential_name.is_none()
        && (t.client_certificate.is_none() || t.private_key.is_none())
    {
        e.error(
            codes::SCHEMA,
            f.to_string(),
            "mode MUTUAL needs clientCertificate and privateKey (or credentialName)",
        );
    }
    if t.insecure_skip_verify == Some(true)
        && (t.ca_certificates.is_some() || !t.subject_alt_names.is_empty())
    {
        e.error(
            codes::SCHEMA,
            format!("{f}.insecureSkipVerify"),
            "insecureSkipVerify cannot be set together with caCertificates or subjectAltNames",
        );
    }
    if t.mode == TlsMode::IstioMutual {
        e.warn(
            codes::SCHEMA_WARNING,
            format!("{f}.mode"),
            "mode ISTIO_MUTUAL needs mesh identities (istiod-issued certificates), which nodeproxy does not have: this traffic is sent without TLS",
        );
    }
}

pub(super) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}
