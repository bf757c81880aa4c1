//! VirtualServices: hosts, gateways, match blocks, destinations and weights, and the
//! per-route policies (retries, timeouts, faults, mirrors, CORS, headers, rewrites).

use super::*;

impl Analyzer<'_> {
    pub(super) fn virtual_service(&mut self, vs: &Object<VirtualService>) {
        self.vs_export = Exported::of(&vs.spec.export_to, &vs.namespace);
        let e = Emit::new(vs.object_ref("VirtualService"), &vs.source);
        let spec = &vs.spec;
        let ns = &vs.namespace;
        let on_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH_GATEWAY);
        check_export_to(&e, ns, &spec.export_to, false, false);
        if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
            e.error(
                codes::SCHEMA,
                "spec",
                "VirtualService has no http, tcp or tls rules",
            );
        }
        // No hosts: a delegate, whose rules a root VirtualService takes in.
        let delegate = spec.hosts.is_empty();
        if delegate {
            for (bad, what) in [
                (!spec.gateways.is_empty(), "gateways"),
                (!spec.tls.is_empty(), "tls routes"),
                (!spec.tcp.is_empty(), "tcp routes"),
            ] {
                if bad {
                    e.error(
                        codes::SCHEMA,
                        "spec",
                        format!("a delegate VirtualService (no hosts) may not have {what}"),
                    );
                }
            }
            let used = self.set.virtual_services.iter().any(|root| {
                root.spec.http.iter().any(|r| {
                    r.delegate.as_ref().is_some_and(|d| {
                        d.name == vs.name
                            && d.namespace.as_deref().unwrap_or(&root.namespace) == vs.namespace
                    })
                })
            });
            if !used {
                e.info(
                    codes::DELEGATE_DROPPED,
                    "spec.hosts",
                    "VirtualService without hosts and no root VirtualService delegates to it: it applies to nothing",
                );
            }
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if h == "*" && on_mesh {
                e.error(
                    codes::SCHEMA,
                    format!("spec.hosts[{i}]"),
                    "host `*` is only allowed for gateway-bound VirtualServices",
                );
            }
            if h != "*" && !wildcard_ok(h) {
                e.error(
                    codes::SCHEMA,
                    format!("spec.hosts[{i}]"),
                    format!("invalid wildcard host `{h}` (only a leading `*.` is allowed)"),
                );
            }
        }
        // Duplicate hosts, literal or by wildcard (`*.foo.com` and `a.foo.com`), as Istio.
        for (i, a) in spec.hosts.iter().enumerate() {
            for b in &spec.hosts[i + 1..] {
                let (x, y) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
                if wildcard_ok(&x)
                    && wildcard_ok(&y)
                    && (x == y || host_matches(&x, &y) || host_matches(&y, &x))
                {
                    e.error(
                        codes::SCHEMA,
                        "spec.hosts",
                        format!("duplicate hosts in virtual service: {a} & {b}"),
                    );
                }
            }
        }
        for (i, g) in spec.gateways.iter().enumerate() {
            if g == MESH_GATEWAY {
                continue;
            }
            let q = qualify_gateway(g, ns);
            let gw = self
                .set
                .gateways
                .iter()
                .find(|gw| format!("{}/{}", gw.namespace, gw.name) == q);
            if gw.is_none() {
                e.error(
                    codes::NOT_FOUND,
                    format!("spec.gateways[{i}]"),
                    format!("gateway `{q}` referenced by the VirtualService does not exist"),
                );
            }
            // IST0132, per gateway as Istio: no host of the VirtualService is among the
            // gateway's server hosts visible to this namespace (a missing gateway has none).
            if !gw.is_some_and(|gw| self.hosts_in_gateway(gw, ns, &spec.hosts)) {
                e.warn(
                    codes::HOST_NOT_IN_GATEWAY,
                    format!("spec.gateways[{i}]"),
                    format!("one or more host {:?} defined in VirtualService {ns}/{} not found in Gateway {q}", spec.hosts, vs.name),
                );
            }
        }
        self.reachability(&e, spec);
        for (i, r) in spec.http.iter().enumerate() {
            let base = format!("spec.http[{i}]");
            if r.delegate.is_some() {
                if delegate {
                    e.error(
                        codes::SCHEMA,
                        format!("{base}.delegate"),
                        "a delegate's rule cannot delegate again",
                    );
                }
                if !r.route.is_empty() || r.redirect.is_some() {
                    e.error(
                        codes::SCHEMA,
                        base.clone(),
                        "a rule with delegate may not have route or redirect",
                    );
                }
            }
            let actions = [
                !r.route.is_empty(),
                r.redirect.is_some(),
                r.direct_response.is_some() && r.delegate.is_none(),
                r.delegate.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if actions == 0 {
                e.error(
                    codes::SCHEMA,
                    base.clone(),
                    "rule has none of route, redirect, directResponse",
                );
            } else if actions > 1 {
                e.error(
                    codes::SCHEMA,
                    base.clone(),
                    "rule may have only one of route, redirect, directResponse, delegate",
                );
            }
            if (r.redirect.is_some() || r.direct_response.is_some())
                && (r.fault.is_some() || r.rewrite.is_some())
            {
                e.error(
                    codes::SCHEMA,
                    base.clone(),
                    "redirect and directResponse cannot be combined with fault or rewrite",
                );
            }
            if r.mirror.is_some() && !r.mirrors.is_empty() {
                e.error(
                    codes::SCHEMA,
                    base.clone(),
                    "mirror and mirrors cannot both be set",
                );
            }
            for (j, m) in r.matches.iter().enumerate() {
                let mf = format!("{base}.match[{j}]");
                if *m == config::HttpMatchRequest::default() {
                    e.error(
                        codes::SCHEMA,
                        mf.clone(),
                        "empty match block (omit `match` for a catch-all)",
                    );
                    continue;
                }
                if let Err((f, msg)) = compile_match(m) {
                    e.error(codes::SCHEMA, format!("{mf}.{f}"), msg);
                }
                for (k, sm) in m.headers.iter().chain(&m.without_headers) {
                    if sm.prefix.as_deref() == Some("") {
                        e.error(
                            codes::SCHEMA,
                            format!("{mf}.headers.{k}"),
                            "empty prefix is only allowed for uri",
                        );
                    }
                }
            }
            self.route_destinations(&e, ns, &base, r);
            self.http_policies(&e, &base, r);
        }
        for (i, r) in spec.tcp.iter().enumerate() {
            let base = format!("spec.tcp[{i}]");
            if r.route.is_empty() {
                e.error(codes::SCHEMA, base.clone(), "tcp rule has no route");
            }
            self.weights(&e, &base, r.route.iter().map(|d| d.weight).collect());
            for (k, d) in r.route.iter().enumerate() {
                self.destination(
                    &e,
                    ns,
                    &format!("{base}.route[{k}].destination"),
                    &d.destination,
                    "host",
                );
            }
            for (j, m) in r.matches.iter().enumerate() {
                self.subnets(
                    &e,
                    &format!("{base}.match[{j}].destinationSubnets"),
                    &m.destination_subnets,
                );
            }
        }
        for (i, r) in spec.tls.iter().enumerate() {
            let base = format!("spec.tls[{i}]");
            if r.route.is_empty() {
                e.error(codes::SCHEMA, base.clone(), "tls rule has no route");
            }
            if r.matches.is_empty() || r.matches.iter().any(|m| m.sni_hosts.is_empty()) {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.match"),
                    "tls rules need match blocks with sniHosts",
                );
            }
            let vs_hosts: Vec<String> = spec
                .hosts
                .iter()
                .map(|h| expand_host(h, ns, &self.set.cluster_domain))
                .collect();
            for (j, m) in r.matches.iter().enumerate() {
                for (k, sni) in m.sni_hosts.iter().enumerate() {
                    let s = sni.to_ascii_lowercase();
                    if s.parse::<std::net::IpAddr>().is_ok() {
                        // Istio warns and accepts it: clients rarely send an IP as SNI.
                        e.warn(
                            codes::SCHEMA_WARNING,
                            format!("{base}.match[{j}].sniHosts[{k}]"),
                            format!(
                                "SNI host `{sni}` is an IP address: against the SNI spec, and most clients never send one"
                            ),
                        );
                        continue;
                    }
                    if !vs_hosts.iter().any(|h| host_matches(h, &s) || h == &s) {
                        e.error(
                            codes::SCHEMA,
                            format!("{base}.match[{j}].sniHosts[{k}]"),
                            format!("SNI host `{sni}` is not within the VirtualService hosts"),
                        );
                    }
                }
                self.subnets(
                    &e,
                    &format!("{base}.match[{j}].destinationSubnets"),
                    &m.destination_subnets,
                );
            }
            self.weights(&e, &base, r.route.iter().map(|d| d.weight).collect());
            for (k, d) in r.route.iter().enumerate() {
                self.destination(
                    &e,
                    ns,
                    &format!("{base}.route[{k}].destination"),
                    &d.destination,
                    "host",
                );
            }
        }
        self.out.extend(e.finish());
    }

    pub(super) fn subnets(&self, e: &Emit<'_>, field: &str, v: &[String]) {
        for (i, s) in v.iter().enumerate() {
            if s.parse::<ipnet::IpNet>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
                e.error(
                    codes::SCHEMA,
                    format!("{field}[{i}]"),
                    format!("`{s}` is not an IP or CIDR"),
                );
            }
        }
    }

    pub(super) fn weights(&self, e: &Emit<'_>, base: &str, weights: Vec<Option<i64>>) {
        let max = i64::from(i32::MAX);
        for (k, w) in weights.iter().enumerate() {
            if w.is_some_and(|w| w < 0) {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.route[{k}].weight"),
                    "weight must not be negative",
                );
            } else if let Some(w) = w.filter(|w| *w > max) {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.route[{k}].weight"),
                    format!("weight {w} is out of range: weights are int32 (at most {max})"),
                );
            }
        }
        // i128: the YAML takes any i64, and a sum of them must not overflow here either.
        let sum: i128 = weights
            .iter()
            .map(|w| i128::from(w.unwrap_or(0).max(0)))
            .sum();
        if weights.len() > 1 && sum > i128::from(max) {
            e.error(
                codes::SCHEMA,
                format!("{base}.route"),
                format!("route weights sum to {sum}, above {max}: the total must fit an int32"),
            );
        }
        if weights.len() > 1 && sum == 0 {
            e.error(
                codes::SCHEMA,
                format!("{base}.route"),
                "route weights sum to 0: no destination would receive traffic",
            );
        }
    }

    pub(super) fn route_destinations(
        &self,
        e: &Emit<'_>,
        ns: &str,
        base: &str,
        r: &config::HttpRoute,
    ) {
        self.weights(e, base, r.route.iter().map(|d| d.weight).collect());
        for (k, d) in r.route.iter().enumerate() {
            self.destination(
                e,
                ns,
                &format!("{base}.route[{k}].destination"),
                &d.destination,
                "host",
            );
            if let Err(msg) = header_rules(d.headers.as_deref()) {
                e.error(codes::SCHEMA, format!("{base}.route[{k}].headers"), msg);
            }
            super::headers::check_headers(
                e,
                &format!("{base}.route[{k}].headers"),
                d.headers.as_deref(),
                None,
            );
        }
        if let Some(m) = &r.mirror {
            self.destination(e, ns, &format!("{base}.mirror"), m, "mirror host");
        }
        for (k, m) in r.mirrors.iter().enumerate() {
            self.destination(
                e,
                ns,
                &format!("{base}.mirrors[{k}].destination"),
                &m.destination,
                "mirror host",
            );
            check_percent(e, format!("{base}.mirrors[{k}].percentage"), m.percentage);
        }
    }

    /// Host, port and subset of one destination.
    pub(super) fn destination(
        &self,
        e: &Emit<'_>,
        ns: &str,
        field: &str,
        d: &Destination,
        what: &str,
    ) {
        if d.host.is_empty() {
            e.error(
                codes::NOT_FOUND,
                format!("{field}.host"),
                format!("referenced {what} not found: the destination names no host"),
            );
            return;
        }
        let host = expand_host(&d.host, ns, &self.set.cluster_domain);
        // `*` is no destination; `*.x` is one when a ServiceEntry declares that very host.
        if host == "*" || !wildcard_ok(&host) {
            e.error(
                codes::SCHEMA,
                format!("{field}.host"),
                format!("invalid destination host `{}`", d.host),
            );
            return;
        }
        let Some(sid) = self.registry.by_host(&host) else {
            e.error(codes::NOT_FOUND, format!("{field}.host"), format!("referenced {what} not found: `{host}` is not in the service registry (add a ServiceEntry or Service)"));
            return;
        };
        let svc = &self.registry.services[sid];
        // The host must exist for the clients the VirtualService serves: its own namespace, or
        // each namespace it is exported to (Istio's destination-host analyzer).
        let clients: Vec<String> = match &self.vs_export {
            Exported::To(list) => list.iter().cloned().collect(),
            Exported::All => vec![ns.to_string()],
        };
        if let Some(blind) = clients
            .iter()
            .find(|c| self.services_restricted && !self.host_visible(&host, c))
        {
            e.error(
                codes::NOT_FOUND,
                format!("{field}.host"),
                format!(
                    "referenced {what} not found: `{host}` is not exported to namespace {blind}"
                ),
            );
            return;
        }
        match d.port {
            Some(p) if svc.port(p.number as u16).is_none() => {
                e.error(
                    codes::NOT_FOUND,
                    format!("{field}.port"),
                    format!("port {} is not a port of `{host}`", p.number),
                );
            }
            None if svc.ports.len() > 1 => {
                e.error(
                    codes::PORT_REQUIRED,
                    format!("{field}.port"),
                    format!("`{host}` has several ports: the destination must name one"),
                );
            }
            _ => {}
        }
        if let Some(subset) = &d.subset {
            let defined = self.drs.defines_subset(&host, subset, &self.vs_export);
            if !defined {
                e.error(codes::NOT_FOUND, format!("{field}.subset"), format!("subset `{subset}` of host `{host}` is not defined by any DestinationRule: requests routed to it fail with 503 NC"));
            }
        }
    }

    pub(super) fn http_policies(&self, e: &Emit<'_>, base: &str, r: &config::HttpRoute) {
        check_duration(e, format!("{base}.timeout"), r.timeout);
        check_percent(e, format!("{base}.mirrorPercentage"), r.mirror_percentage);
        if r.mirror_percent.is_some_and(|p| p > 100) {
            e.error(
                codes::SCHEMA,
                format!("{base}.mirrorPercent"),
                "mirrorPercent is above 100",
            );
        }
        if r.mirror_percent.is_some() {
            e.warn(
                codes::SCHEMA_WARNING,
                format!("{base}.mirrorPercent"),
                "using deprecated setting mirrorPercent, use mirrorPercentage instead",
            );
        }
        if let Err(msg) = header_rules(r.headers.as_deref()) {
            e.error(codes::SCHEMA, format!("{base}.headers"), msg);
        }
        super::headers::check_headers(
            e,
            &format!("{base}.headers"),
            r.headers.as_deref(),
            r.rewrite.as_ref().and_then(|rw| rw.authority.as_deref()),
        );
        if let Some(rt) = &r.retries {
            let f = format!("{base}.retries");
            if rt.attempts > i64::from(i32::MAX) {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.attempts"),
                    format!("attempts {} is out of range: it is an int32", rt.attempts),
                );
            }
            if rt.attempts < 0 {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.attempts"),
                    "attempts must not be negative",
                );
            }
            if rt.attempts == 0 && (rt.per_try_timeout.is_some() || rt.retry_on.is_some()) {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.attempts"),
                    "attempts is 0 (retries disabled) but other retry fields are set",
                );
            }
            check_duration(e, format!("{f}.perTryTimeout"), rt.per_try_timeout);
            check_duration(e, format!("{f}.backoff"), rt.backoff);
            if let Some(on) = rt.retry_on.as_deref().filter(|s| !s.is_empty())
                && let Err(msg) = RetryOn::parse(on)
            {
                e.error(codes::SCHEMA, format!("{f}.retryOn"), msg);
            }
            if let (Some(per), Some(total)) = (rt.per_try_timeout, r.timeout) {
                let tries = u32::try_from(rt.attempts.max(0))
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                if per.get().saturating_mul(tries) > total.get() {
                    e.warn(codes::RETRY_EXCEEDS_TIMEOUT, f.clone(), format!("{tries} tries x perTryTimeout {per} exceed the route timeout {total}: later retries are cut by the timeout"));
                }
            }
        }
        if let Some(fault) = &r.fault {
            let f = format!("{base}.fault");
            if fault.delay.is_none() && fault.abort.is_none() {
                e.error(codes::SCHEMA, f.clone(), "fault needs delay or abort");
            }
            if let Some(d) = &fault.delay {
                if d.exponential_delay.is_some() {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.delay.exponentialDelay"),
                        "exponentialDelay is not supported by Istio",
                    );
                }
                if d.fixed_delay.is_none() {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.delay.fixedDelay"),
                        "delay needs fixedDelay",
                    );
                }
                check_duration(e, format!("{f}.delay.fixedDelay"), d.fixed_delay);
                check_percent(e, format!("{f}.delay.percentage"), d.percentage);
                if d.percent.is_some_and(|p| p > 0) {
                    e.warn(
                        codes::DEPRECATED,
                        format!("{f}.delay.percent"),
                        "HTTPRoute.fault.delay.percent is deprecated; use HTTPRoute.fault.delay.percentage",
                    );
                }
                if d.percentage.is_none() && d.percent.is_none() {
                    e.info(
                        codes::FAULT_NEVER_FIRES,
                        format!("{f}.delay"),
                        "delay has no percentage: it never fires",
                    );
                }
            }
            if let Some(a) = &fault.abort {
                if a.http2_error.is_some() {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.abort.http2Error"),
                        "http2Error is not supported by Istio",
                    );
                }
                if let Some(s) = a.http_status
                    && !(200..=599).contains(&s)
                {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.abort.httpStatus"),
                        format!("abort status {s} is outside 200..599"),
                    );
                }
                if let Some(g) = &a.grpc_status
                    && !crate::compile::GRPC_STATUS_NAMES.contains(&g.as_str())
                {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.abort.grpcStatus"),
                        format!("unknown gRPC status `{g}`"),
                    );
                }
                if a.http_status.is_none() && a.grpc_status.is_none() {
                    e.error(
                        codes::SCHEMA,
                        format!("{f}.abort"),
                        "abort needs httpStatus or grpcStatus",
                    );
                }
                check_percent(e, format!("{f}.abort.percentage"), a.percentage);
                if a.percentage.is_none() {
                    e.info(
                        codes::FAULT_NEVER_FIRES,
                        format!("{f}.abort"),
                        "abort has no percentage: it never fires",
                    );
                }
            }
        }
        if let Some(rd) = &r.redirect {
            let f = format!("{base}.redirect");
            if let Some(c) = rd.redirect_code
                && ![301, 302, 303, 307, 308].contains(&c)
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.redirectCode"),
                    format!("redirect code {c} is not one of 301, 302, 303, 307, 308"),
                );
            }
            if rd
                .scheme
                .as_deref()
                .is_some_and(|s| s != "http" && s != "https")
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.scheme"),
                    "scheme must be http or https",
                );
            }
            if rd.uri.is_some() && rd.prefix_rewrite.is_some() {
                e.error(
                    codes::SCHEMA,
                    f.clone(),
                    "uri and prefixRewrite are exclusive",
                );
            }
            if rd.prefix_rewrite.is_some()
                && r.matches
                    .iter()
                    .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_none()))
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.prefixRewrite"),
                    "prefixRewrite needs every uri match of the rule to be a prefix match",
                );
            }
            if rd.uri.is_none()
                && rd.prefix_rewrite.is_none()
                && rd.authority.is_none()
                && rd.scheme.is_none()
                && rd.port.is_none()
                && rd.derive_port.is_none()
            {
                e.error(codes::SCHEMA, f.clone(), "redirect sets nothing");
            }
        }
        if let Some(d) = &r.direct_response {
            if !(200..=599).contains(&d.status) {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.directResponse.status"),
                    format!("status {} is outside 200..599", d.status),
                );
            }
            let len = d
                .body
                .as_ref()
                .map(|b| {
                    b.string.as_ref().map(|s| s.len()).unwrap_or(0)
                        + b.bytes.as_ref().map(|s| s.len() * 3 / 4).unwrap_or(0)
                })
                .unwrap_or(0);
            if len > 1 << 20 {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.directResponse.body"),
                    "body is larger than 1 MiB",
                );
            }
        }
        if let Some(rw) = &r.rewrite {
            let f = format!("{base}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                e.error(
                    codes::SCHEMA,
                    f.clone(),
                    "uri and uriRegexRewrite are exclusive",
                );
            }
            if rw.uri.is_none() && rw.uri_regex_rewrite.is_none() && rw.authority.is_none() {
                e.error(codes::SCHEMA, f.clone(), "rewrite sets nothing");
            }
            if let Some(x) = &rw.uri_regex_rewrite
                && let Err(err) = regex::Regex::new(&x.pattern)
            {
                e.error(
                    codes::SCHEMA,
                    format!("{f}.uriRegexRewrite.match"),
                    format!("invalid regex `{}`: {err}", x.pattern),
                );
            }
        }
        if let Some(c) = &r.cors_policy {
            for (k, o) in c.allow_origins.iter().enumerate() {
                if let Err(msg) = StrMatch::compile(o) {
                    e.error(
                        codes::SCHEMA,
                        format!("{base}.corsPolicy.allowOrigins[{k}]"),
                        msg,
                    );
                }
            }
            // Istio's rules: methods from a fixed list (or `*`), header names as RFC 7230
            // tokens (or `*`), maxAge in whole seconds.
            const METHODS: [&str; 10] = [
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*",
            ];
            for (k, m) in c.allow_methods.iter().enumerate() {
                if !METHODS.contains(&m.as_str()) {
                    e.error(
                        codes::SCHEMA,
                        format!("{base}.corsPolicy.allowMethods[{k}]"),
                        format!("{m:?} is not a supported HTTP method"),
                    );
                }
            }
            let token = |h: &str| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            };
            for (field, names) in [
                ("allowHeaders", &c.allow_headers),
                ("exposeHeaders", &c.expose_headers),
            ] {
                for (k, h) in names.iter().enumerate() {
                    if h != "*" && !token(h) {
                        e.error(
                            codes::SCHEMA,
                            format!("{base}.corsPolicy.{field}[{k}]"),
                            format!("header name {h:?} is not a valid header name"),
                        );
                    }
                }
            }
            if let Some(age) = c.max_age
                && age.get().subsec_nanos() > 0
            {
                e.error(
                    codes::SCHEMA,
                    format!("{base}.corsPolicy.maxAge"),
                    "max_age duration is accurate only to seconds precision",
                );
            }
        }
    }

    /// Does a ServiceEntry or Service defining `host` (or a wildcard entry covering it) export
    /// it to namespace `ns`?
    fn host_visible(&self, host: &str, ns: &str) -> bool {
        let se = self.set.service_entries.iter().any(|se| {
            se.spec.hosts.iter().any(|h| {
                h.eq_ignore_ascii_case(host) || host_matches(&h.to_ascii_lowercase(), host)
            }) && Exported::of(&se.spec.export_to, &se.namespace).visible_to(Some(ns))
        });
        se || self.set.kube_services.iter().any(|ks| {
            format!(
                "{}.{}.svc.{}",
                ks.name,
                ks.namespace,
                self.set.cluster_domain.as_str()
            )
            .eq_ignore_ascii_case(host)
                && crate::compile::scopes::Exported::of_annotation(&ks.annotations, &ks.namespace)
                    .visible_to(Some(ns))
        })
    }

    /// Does some host of a VirtualService of namespace `ns` match a server host of `gw`
    /// (`ns/host` scoping: `*` any namespace, `.` the Gateway's, else that one)?
    fn hosts_in_gateway(&self, gw: &Object<config::Gateway>, ns: &str, hosts: &[String]) -> bool {
        gw.spec.servers.iter().flat_map(|s| &s.hosts).any(|sh| {
            let (scope, name) = sh.split_once('/').unwrap_or(("*", sh));
            let ns_ok = match scope {
                "*" => true,
                "." => ns == gw.namespace,
                other => ns == other,
            };
            let name = name.to_ascii_lowercase();
            ns_ok
                && hosts.iter().any(|h| {
                    let lit = h.to_ascii_lowercase();
                    let full = expand_host(h, ns, &self.set.cluster_domain);
                    crate::compile::registry::hosts_intersect(&lit, &name)
                        || crate::compile::registry::hosts_intersect(&full, &name)
                })
        })
    }
}
