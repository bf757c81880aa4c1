//! Analysis of a config set, in the spirit of `istioctl analyze`: Istio's admission validation
//! (IST0106) plus cross-object checks (missing subsets, hosts and gateways, host conflicts,
//! subsets selecting nothing, retry budgets longer than the timeout...). Input: a
//! [`ConfigSet`]; output: diagnostics with stable codes. Pure: no I/O.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::compile::registry::{Registry, Resolution, expand_host, host_matches};
use crate::compile::{
    DrIndex, MESH_GATEWAY, RetryOn, StrMatch, compile_match, header_rules, qualify_gateway,
};
use crate::config::{self, ConfigSet, Destination, Object, Percent, VirtualService, labels_match};
use crate::diagnostic::{Code, Diagnostic, Severity, codes};

/// Envoy's largest hash ring (`RingHashLbConfig.maximum_ring_size`'s bound, 8M entries): a
/// larger `minimumRingSize` would allocate without limit on the request path.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// Analyze a whole config set.
pub fn analyze(set: &ConfigSet) -> Vec<Diagnostic> {
    let registry = Registry::build(set);
    let drs = DrIndex::new(set);
    let mut a = Analyzer {
        set,
        registry,
        drs,
        out: Vec::new(),
        se_ports: HashMap::new(),
    };
    for vs in &set.virtual_services {
        a.virtual_service(vs);
    }
    a.host_conflicts();
    for dr in &set.destination_rules {
        a.destination_rule(dr);
    }
    for gw in &set.gateways {
        a.gateway(gw);
    }
    for se in &set.service_entries {
        a.service_entry(se);
    }
    a.out
}

struct Analyzer<'a> {
    set: &'a ConfigSet,
    registry: Registry,
    drs: DrIndex,
    out: Vec<Diagnostic>,
    /// (host, port) → (protocol, `ns/name`) of the first ServiceEntry declaring it.
    se_ports: HashMap<(String, u32), (String, String)>,
}

/// Emits diagnostics for one object.
struct Emit<'o> {
    obj: crate::diagnostic::ObjectRef,
    src: &'o crate::diagnostic::Source,
}

impl Emit<'_> {
    fn d(
        &self,
        code: Code,
        sev: Severity,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(code, sev, msg)
            .on(self.obj.clone(), self.src.clone())
            .at(field)
    }
}

fn check_duration(
    e: &Emit<'_>,
    out: &mut Vec<Diagnostic>,
    field: String,
    d: Option<config::Duration>,
) {
    if let Some(d) = d
        && d.get() < Duration::from_millis(1)
    {
        out.push(e.d(
            codes::SCHEMA,
            Severity::Error,
            field,
            format!("duration {d} is below the 1ms minimum"),
        ));
    }
}

fn check_percent(e: &Emit<'_>, out: &mut Vec<Diagnostic>, field: String, p: Option<Percent>) {
    if let Some(p) = p
        && (!(0.0..=100.0).contains(&p.value) || p.value.is_nan())
    {
        out.push(e.d(
            codes::SCHEMA,
            Severity::Error,
            field,
            format!("percentage {} is outside 0..100", p.value),
        ));
    }
}

impl Analyzer<'_> {
    fn virtual_service(&mut self, vs: &Object<VirtualService>) {
        let e = Emit {
            obj: vs.object_ref("VirtualService"),
            src: &vs.source,
        };
        let spec = &vs.spec;
        let ns = &vs.namespace;
        let mut out = Vec::new();
        let on_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH_GATEWAY);
        if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec",
                "VirtualService has no http, tcp or tls rules",
            ));
        }
        if spec.hosts.is_empty() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.hosts",
                "VirtualService has no hosts (delegate VirtualServices are not supported)",
            ));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if h == "*" && on_mesh {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.hosts[{i}]"),
                    "host `*` is only allowed for gateway-bound VirtualServices",
                ));
            }
            if h.contains('*') && !(h == "*" || (h.starts_with("*.") && !h[1..].contains('*'))) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.hosts[{i}]"),
                    format!("invalid wildcard host `{h}` (only a leading `*.` is allowed)"),
                ));
            }
        }
        for (i, g) in spec.gateways.iter().enumerate() {
            if g == MESH_GATEWAY {
                continue;
            }
            let q = qualify_gateway(g, ns);
            if !self
                .set
                .gateways
                .iter()
                .any(|gw| format!("{}/{}", gw.namespace, gw.name) == q)
            {
                out.push(e.d(
                    codes::NOT_FOUND,
                    Severity::Error,
                    format!("spec.gateways[{i}]"),
                    format!("gateway `{q}` referenced by the VirtualService does not exist"),
                ));
            }
        }
        let mut catch_all_at: Option<usize> = None;
        let mut seen_blocks: Vec<(usize, config::HttpMatchRequest)> = Vec::new();
        for (i, r) in spec.http.iter().enumerate() {
            let base = format!("spec.http[{i}]");
            if let Some(c) = catch_all_at {
                out.push(e.d(
                    codes::UNREACHABLE_RULE,
                    Severity::Warning,
                    base.clone(),
                    format!("rule is unreachable: rule {c} before it matches every request"),
                ));
            }
            let actions = [
                !r.route.is_empty(),
                r.redirect.is_some(),
                r.direct_response.is_some(),
                r.delegate.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if actions == 0 {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "rule has none of route, redirect, directResponse",
                ));
            } else if actions > 1 {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "rule may have only one of route, redirect, directResponse, delegate",
                ));
            }
            if (r.redirect.is_some() || r.direct_response.is_some())
                && (r.fault.is_some() || r.rewrite.is_some())
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "redirect and directResponse cannot be combined with fault or rewrite",
                ));
            }
            if r.mirror.is_some() && !r.mirrors.is_empty() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "mirror and mirrors cannot both be set",
                ));
            }
            for (j, m) in r.matches.iter().enumerate() {
                let mf = format!("{base}.match[{j}]");
                if *m == config::HttpMatchRequest::default() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        mf.clone(),
                        "empty match block (omit `match` for a catch-all)",
                    ));
                    continue;
                }
                if let Err((f, msg)) = compile_match(m) {
                    out.push(e.d(codes::SCHEMA, Severity::Error, format!("{mf}.{f}"), msg));
                }
                for (k, sm) in m.headers.iter().chain(&m.without_headers) {
                    if sm.prefix.as_deref() == Some("") {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{mf}.headers.{k}"),
                            "empty prefix is only allowed for uri",
                        ));
                    }
                }
                let mut plain = m.clone();
                plain.name = None;
                if let Some((pi, _)) = seen_blocks.iter().find(|(_, b)| *b == plain) {
                    out.push(e.d(
                        codes::INEFFECTIVE_MATCH,
                        Severity::Info,
                        mf.clone(),
                        format!("match block duplicates one of rule {pi}"),
                    ));
                }
                seen_blocks.push((i, plain));
            }
            let catch_all = r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    let mut only_uri = config::HttpMatchRequest {
                        uri: m.uri.clone(),
                        name: m.name.clone(),
                        ..Default::default()
                    };
                    only_uri.ignore_uri_case = m.ignore_uri_case;
                    *m == only_uri
                        && m.uri
                            .as_ref()
                            .is_some_and(|u| u.prefix.as_deref() == Some("/"))
                });
            if catch_all && catch_all_at.is_none() {
                catch_all_at = Some(i);
            }
            self.route_destinations(&e, &mut out, ns, &base, r);
            self.http_policies(&e, &mut out, &base, r);
        }
        for (i, r) in spec.tcp.iter().enumerate() {
            let base = format!("spec.tcp[{i}]");
            if r.route.is_empty() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "tcp rule has no route",
                ));
            }
            self.weights(
                &e,
                &mut out,
                &base,
                r.route.iter().map(|d| d.weight).collect(),
            );
            for (k, d) in r.route.iter().enumerate() {
                self.destination(
                    &e,
                    &mut out,
                    ns,
                    &format!("{base}.route[{k}].destination"),
                    &d.destination,
                    "host",
                );
            }
            for (j, m) in r.matches.iter().enumerate() {
                self.subnets(
                    &e,
                    &mut out,
                    &format!("{base}.match[{j}].destinationSubnets"),
                    &m.destination_subnets,
                );
            }
        }
        for (i, r) in spec.tls.iter().enumerate() {
            let base = format!("spec.tls[{i}]");
            if r.route.is_empty() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    base.clone(),
                    "tls rule has no route",
                ));
            }
            if r.matches.is_empty() || r.matches.iter().any(|m| m.sni_hosts.is_empty()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.match"),
                    "tls rules need match blocks with sniHosts",
                ));
            }
            let vs_hosts: Vec<String> = spec
                .hosts
                .iter()
                .map(|h| expand_host(h, ns, &self.set.cluster_domain))
                .collect();
            for (j, m) in r.matches.iter().enumerate() {
                for (k, sni) in m.sni_hosts.iter().enumerate() {
                    let s = sni.to_ascii_lowercase();
                    if !vs_hosts.iter().any(|h| host_matches(h, &s) || h == &s) {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{base}.match[{j}].sniHosts[{k}]"),
                            format!("SNI host `{sni}` is not within the VirtualService hosts"),
                        ));
                    }
                }
                self.subnets(
                    &e,
                    &mut out,
                    &format!("{base}.match[{j}].destinationSubnets"),
                    &m.destination_subnets,
                );
            }
            self.weights(
                &e,
                &mut out,
                &base,
                r.route.iter().map(|d| d.weight).collect(),
            );
            for (k, d) in r.route.iter().enumerate() {
                self.destination(
                    &e,
                    &mut out,
                    ns,
                    &format!("{base}.route[{k}].destination"),
                    &d.destination,
                    "host",
                );
            }
        }
        self.out.extend(out);
    }

    fn subnets(&self, e: &Emit<'_>, out: &mut Vec<Diagnostic>, field: &str, v: &[String]) {
        for (i, s) in v.iter().enumerate() {
            if s.parse::<ipnet::IpNet>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{field}[{i}]"),
                    format!("`{s}` is not an IP or CIDR"),
                ));
            }
        }
    }

    fn weights(
        &self,
        e: &Emit<'_>,
        out: &mut Vec<Diagnostic>,
        base: &str,
        weights: Vec<Option<i64>>,
    ) {
        let max = i64::from(i32::MAX);
        for (k, w) in weights.iter().enumerate() {
            if w.is_some_and(|w| w < 0) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.route[{k}].weight"),
                    "weight must not be negative",
                ));
            } else if let Some(w) = w.filter(|w| *w > max) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.route[{k}].weight"),
                    format!("weight {w} is out of range: weights are int32 (at most {max})"),
                ));
            }
        }
        // i128: the YAML takes any i64, and a sum of them must not overflow here either.
        let sum: i128 = weights
            .iter()
            .map(|w| i128::from(w.unwrap_or(0).max(0)))
            .sum();
        if weights.len() > 1 && sum > i128::from(max) {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                format!("{base}.route"),
                format!("route weights sum to {sum}, above {max}: the total must fit an int32"),
            ));
        }
        if weights.len() > 1 && sum == 0 {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                format!("{base}.route"),
                "route weights sum to 0: no destination would receive traffic",
            ));
        }
    }

    fn route_destinations(
        &self,
        e: &Emit<'_>,
        out: &mut Vec<Diagnostic>,
        ns: &str,
        base: &str,
        r: &config::HttpRoute,
    ) {
        self.weights(e, out, base, r.route.iter().map(|d| d.weight).collect());
        for (k, d) in r.route.iter().enumerate() {
            self.destination(
                e,
                out,
                ns,
                &format!("{base}.route[{k}].destination"),
                &d.destination,
                "host",
            );
            if let Err(msg) = header_rules(d.headers.as_deref()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.route[{k}].headers"),
                    msg,
                ));
            }
        }
        if let Some(m) = &r.mirror {
            self.destination(e, out, ns, &format!("{base}.mirror"), m, "mirror host");
        }
        for (k, m) in r.mirrors.iter().enumerate() {
            self.destination(
                e,
                out,
                ns,
                &format!("{base}.mirrors[{k}].destination"),
                &m.destination,
                "mirror host",
            );
            check_percent(
                e,
                out,
                format!("{base}.mirrors[{k}].percentage"),
                m.percentage,
            );
        }
    }

    /// Host, port and subset of one destination.
    fn destination(
        &self,
        e: &Emit<'_>,
        out: &mut Vec<Diagnostic>,
        ns: &str,
        field: &str,
        d: &Destination,
        what: &str,
    ) {
        let host = expand_host(&d.host, ns, &self.set.cluster_domain);
        if host.contains('*') {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                format!("{field}.host"),
                format!("destination host `{}` may not be a wildcard", d.host),
            ));
            return;
        }
        let Some(sid) = self.registry.by_host(&host) else {
            out.push(e.d(
                codes::NOT_FOUND,
                Severity::Error,
                format!("{field}.host"),
                format!("referenced {what} not found: `{host}` is not in the service registry (add a ServiceEntry or Service)"),
            ));
            return;
        };
        let svc = &self.registry.services[sid];
        match d.port {
            Some(p) if svc.port(p.number as u16).is_none() => {
                out.push(e.d(
                    codes::NOT_FOUND,
                    Severity::Error,
                    format!("{field}.port"),
                    format!("port {} is not a port of `{host}`", p.number),
                ));
            }
            None if svc.ports.len() > 1 => {
                out.push(e.d(
                    codes::PORT_REQUIRED,
                    Severity::Error,
                    format!("{field}.port"),
                    format!("`{host}` has several ports: the destination must name one"),
                ));
            }
            _ => {}
        }
        if let Some(subset) = &d.subset {
            let defined = self
                .drs
                .for_host(&host)
                .is_some_and(|dr| dr.subsets.iter().any(|s| &s.name == subset));
            if !defined {
                out.push(e.d(
                    codes::NOT_FOUND,
                    Severity::Error,
                    format!("{field}.subset"),
                    format!("subset `{subset}` of host `{host}` is not defined by any DestinationRule: requests routed to it fail with 503 NC"),
                ));
            }
        }
    }

    fn http_policies(
        &self,
        e: &Emit<'_>,
        out: &mut Vec<Diagnostic>,
        base: &str,
        r: &config::HttpRoute,
    ) {
        check_duration(e, out, format!("{base}.timeout"), r.timeout);
        check_percent(
            e,
            out,
            format!("{base}.mirrorPercentage"),
            r.mirror_percentage,
        );
        if r.mirror_percent.is_some_and(|p| p > 100) {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                format!("{base}.mirrorPercent"),
                "mirrorPercent is above 100",
            ));
        }
        if let Err(msg) = header_rules(r.headers.as_deref()) {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                format!("{base}.headers"),
                msg,
            ));
        }
        if let Some(rt) = &r.retries {
            let f = format!("{base}.retries");
            if rt.attempts > i64::from(i32::MAX) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.attempts"),
                    format!("attempts {} is out of range: it is an int32", rt.attempts),
                ));
            }
            if rt.attempts < 0 {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.attempts"),
                    "attempts must not be negative",
                ));
            }
            if rt.attempts == 0 && (rt.per_try_timeout.is_some() || rt.retry_on.is_some()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.attempts"),
                    "attempts is 0 (retries disabled) but other retry fields are set",
                ));
            }
            check_duration(e, out, format!("{f}.perTryTimeout"), rt.per_try_timeout);
            check_duration(e, out, format!("{f}.backoff"), rt.backoff);
            if let Some(on) = rt.retry_on.as_deref().filter(|s| !s.is_empty())
                && let Err(msg) = RetryOn::parse(on)
            {
                out.push(e.d(codes::SCHEMA, Severity::Error, format!("{f}.retryOn"), msg));
            }
            if let (Some(per), Some(total)) = (rt.per_try_timeout, r.timeout) {
                let tries = u32::try_from(rt.attempts.max(0))
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                if per.get().saturating_mul(tries) > total.get() {
                    out.push(e.d(
                        codes::RETRY_EXCEEDS_TIMEOUT,
                        Severity::Warning,
                        f.clone(),
                        format!("{tries} tries x perTryTimeout {per} exceed the route timeout {total}: later retries are cut by the timeout"),
                    ));
                }
            }
        }
        if let Some(fault) = &r.fault {
            let f = format!("{base}.fault");
            if fault.delay.is_none() && fault.abort.is_none() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    f.clone(),
                    "fault needs delay or abort",
                ));
            }
            if let Some(d) = &fault.delay {
                if d.exponential_delay.is_some() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.delay.exponentialDelay"),
                        "exponentialDelay is not supported by Istio",
                    ));
                }
                if d.fixed_delay.is_none() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.delay.fixedDelay"),
                        "delay needs fixedDelay",
                    ));
                }
                check_duration(e, out, format!("{f}.delay.fixedDelay"), d.fixed_delay);
                check_percent(e, out, format!("{f}.delay.percentage"), d.percentage);
                if d.percentage.is_none() && d.percent.is_none() {
                    out.push(e.d(
                        codes::FAULT_NEVER_FIRES,
                        Severity::Info,
                        format!("{f}.delay"),
                        "delay has no percentage: it never fires",
                    ));
                }
            }
            if let Some(a) = &fault.abort {
                if a.http2_error.is_some() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.abort.http2Error"),
                        "http2Error is not supported by Istio",
                    ));
                }
                if let Some(s) = a.http_status
                    && !(200..=599).contains(&s)
                {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.abort.httpStatus"),
                        format!("abort status {s} is outside 200..599"),
                    ));
                }
                if let Some(g) = &a.grpc_status
                    && !crate::compile::GRPC_STATUS_NAMES.contains(&g.as_str())
                {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.abort.grpcStatus"),
                        format!("unknown gRPC status `{g}`"),
                    ));
                }
                if a.http_status.is_none() && a.grpc_status.is_none() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.abort"),
                        "abort needs httpStatus or grpcStatus",
                    ));
                }
                check_percent(e, out, format!("{f}.abort.percentage"), a.percentage);
                if a.percentage.is_none() {
                    out.push(e.d(
                        codes::FAULT_NEVER_FIRES,
                        Severity::Info,
                        format!("{f}.abort"),
                        "abort has no percentage: it never fires",
                    ));
                }
            }
        }
        if let Some(rd) = &r.redirect {
            let f = format!("{base}.redirect");
            if let Some(c) = rd.redirect_code
                && ![301, 302, 303, 307, 308].contains(&c)
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.redirectCode"),
                    format!("redirect code {c} is not one of 301, 302, 303, 307, 308"),
                ));
            }
            if rd
                .scheme
                .as_deref()
                .is_some_and(|s| s != "http" && s != "https")
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.scheme"),
                    "scheme must be http or https",
                ));
            }
            if rd.uri.is_some() && rd.prefix_rewrite.is_some() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    f.clone(),
                    "uri and prefixRewrite are exclusive",
                ));
            }
            if rd.prefix_rewrite.is_some()
                && r.matches
                    .iter()
                    .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_none()))
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.prefixRewrite"),
                    "prefixRewrite needs every uri match of the rule to be a prefix match",
                ));
            }
            if rd.uri.is_none()
                && rd.prefix_rewrite.is_none()
                && rd.authority.is_none()
                && rd.scheme.is_none()
                && rd.port.is_none()
                && rd.derive_port.is_none()
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    f.clone(),
                    "redirect sets nothing",
                ));
            }
        }
        if let Some(d) = &r.direct_response {
            if !(200..=599).contains(&d.status) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.directResponse.status"),
                    format!("status {} is outside 200..599", d.status),
                ));
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
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.directResponse.body"),
                    "body is larger than 1 MiB",
                ));
            }
        }
        if let Some(rw) = &r.rewrite {
            let f = format!("{base}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    f.clone(),
                    "uri and uriRegexRewrite are exclusive",
                ));
            }
            if rw.uri.is_none() && rw.uri_regex_rewrite.is_none() && rw.authority.is_none() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    f.clone(),
                    "rewrite sets nothing",
                ));
            }
            if let Some(x) = &rw.uri_regex_rewrite
                && let Err(err) = regex::Regex::new(&x.pattern)
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.uriRegexRewrite.match"),
                    format!("invalid regex `{}`: {err}", x.pattern),
                ));
            }
        }
        if let Some(c) = &r.cors_policy {
            for (k, o) in c.allow_origins.iter().enumerate() {
                if let Err(msg) = StrMatch::compile(o) {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{base}.corsPolicy.allowOrigins[{k}]"),
                        msg,
                    ));
                }
            }
        }
    }

    /// Two mesh VirtualServices for one host (IST0109).
    fn host_conflicts(&mut self) {
        let mut owners: HashMap<String, (String, usize)> = HashMap::new();
        for vs in &self.set.virtual_services {
            let on_mesh =
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == MESH_GATEWAY);
            if !on_mesh {
                continue;
            }
            let me = format!("{}/{}", vs.namespace, vs.name);
            for (i, h) in vs.spec.hosts.iter().enumerate() {
                let host = expand_host(h, &vs.namespace, &self.set.cluster_domain);
                match owners.get(&host) {
                    Some((other, _)) if *other != me => {
                        self.out.push(
                            Diagnostic::new(
                                codes::CONFLICTING_HOSTS,
                                Severity::Error,
                                format!("host `{host}` is also claimed by VirtualService {other}: mesh VirtualServices are not merged, one would be ignored"),
                            )
                            .on(vs.object_ref("VirtualService"), vs.source.clone())
                            .at(format!("spec.hosts[{i}]")),
                        );
                    }
                    _ => {
                        owners.insert(host, (me.clone(), i));
                    }
                }
            }
        }
    }

    fn destination_rule(&mut self, dr: &Object<config::DestinationRule>) {
        let e = Emit {
            obj: dr.object_ref("DestinationRule"),
            src: &dr.source,
        };
        let mut out = Vec::new();
        let host = expand_host(&dr.spec.host, &dr.namespace, &self.set.cluster_domain);
        let services = self.registry.matching(&host);
        if services.is_empty() {
            out.push(e.d(
                codes::UNKNOWN_DR_HOST,
                Severity::Warning,
                "spec.host",
                format!("host `{host}` matches no service in the registry: the rule has no effect"),
            ));
        }
        let mut names = HashSet::new();
        for (i, s) in dr.spec.subsets.iter().enumerate() {
            let f = format!("spec.subsets[{i}]");
            if !names.insert(s.name.as_str()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.name"),
                    format!("duplicate subset name `{}`", s.name),
                ));
            }
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.name"),
                    format!("subset name `{}` is not a DNS-1123 label", s.name),
                ));
            }
            for sid in &services {
                let svc = &self.registry.services[*sid];
                // NONE services and services without endpoints (a Kubernetes Service with no
                // WorkloadEntry in file mode) have nothing to select from.
                if svc.resolution == Resolution::None || svc.endpoints.is_empty() {
                    continue;
                }
                if !svc
                    .endpoints
                    .iter()
                    .any(|ep| labels_match(&s.labels, &ep.labels))
                {
                    out.push(e.d(
                        codes::SUBSET_SELECTS_NOTHING,
                        Severity::Warning,
                        format!("{f}.labels"),
                        format!("subset `{}` selects no endpoint of `{}`: requests routed to it fail with 503 UH", s.name, svc.host),
                    ));
                }
            }
            if let Some(tp) = &s.traffic_policy {
                self.traffic_policy(&e, &mut out, &format!("{f}.trafficPolicy"), tp);
            }
        }
        if let Some(tp) = &dr.spec.traffic_policy {
            self.traffic_policy(&e, &mut out, "spec.trafficPolicy", tp);
        }
        self.out.extend(out);
    }

    fn traffic_policy(
        &self,
        e: &Emit<'_>,
        out: &mut Vec<Diagnostic>,
        base: &str,
        tp: &config::TrafficPolicy,
    ) {
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
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            if p.port.is_none() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{base}.portLevelSettings[{i}].port"),
                    "port level setting needs a port",
                ));
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
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.loadBalancer.simple"),
                        format!("unknown load balancer `{s}`"),
                    ));
                }
                if lb.simple.is_some() && lb.consistent_hash.is_some() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.loadBalancer"),
                        "simple and consistentHash are exclusive",
                    ));
                }
                if let Some(ch) = &lb.consistent_hash {
                    let cf = format!("{f}.loadBalancer.consistentHash");
                    if ch.http_cookie.as_ref().is_some_and(|c| c.name.is_empty()) {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{cf}.httpCookie.name"),
                            "cookie hash needs a name",
                        ));
                    }
                    if let Some(t) = ch.maglev.as_ref().and_then(|m| m.table_size)
                        && (t == 0 || t >= 5_000_011 || !is_prime(t))
                    {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{cf}.maglev.tableSize"),
                            format!("maglev table size {t} must be a prime below 5000011"),
                        ));
                    }
                    let ring = ch
                        .ring_hash
                        .as_ref()
                        .and_then(|r| r.minimum_ring_size)
                        .or(ch.minimum_ring_size);
                    if let Some(n) = ring.filter(|n| *n > MAX_RING_SIZE) {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{cf}.ringHash.minimumRingSize"),
                            format!("ring size {n} is above Envoy's maximum of {MAX_RING_SIZE}"),
                        ));
                    }
                    if ch.minimum_ring_size.is_some()
                        && (ch.ring_hash.is_some() || ch.maglev.is_some())
                    {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{cf}.minimumRingSize"),
                            "minimumRingSize cannot be combined with ringHash or maglev",
                        ));
                    }
                    let keys = [
                        ch.http_header_name.is_some(),
                        ch.http_cookie.is_some(),
                        ch.use_source_ip == Some(true),
                        ch.http_query_parameter_name.is_some(),
                    ];
                    if keys.iter().filter(|b| **b).count() != 1 {
                        out.push(e.d(codes::SCHEMA, Severity::Error, cf.clone(), "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"));
                    }
                }
            }
            if let Some(pool) = pool {
                let pf = format!("{f}.connectionPool");
                if pool.tcp.is_none() && pool.http.is_none() {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        pf.clone(),
                        "connectionPool needs tcp or http",
                    ));
                }
                if let Some(t) = &pool.tcp {
                    if t.max_connections.is_some_and(|n| n < 0) {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{pf}.tcp.maxConnections"),
                            "must not be negative",
                        ));
                    }
                    check_duration(
                        e,
                        out,
                        format!("{pf}.tcp.connectTimeout"),
                        t.connect_timeout,
                    );
                    check_duration(
                        e,
                        out,
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
                            out.push(e.d(
                                codes::SCHEMA,
                                Severity::Error,
                                format!("{pf}.http.{name}"),
                                "must not be negative",
                            ));
                        }
                    }
                    if h.use_client_protocol == Some(true)
                        && h.h2_upgrade_policy.as_deref() == Some("UPGRADE")
                    {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{pf}.http.h2UpgradePolicy"),
                            "UPGRADE cannot be combined with useClientProtocol",
                        ));
                    }
                    check_duration(e, out, format!("{pf}.http.idleTimeout"), h.idle_timeout);
                }
            }
            if let Some(od) = od {
                let of = format!("{f}.outlierDetection");
                for (name, v) in [
                    ("maxEjectionPercent", od.max_ejection_percent),
                    ("minHealthPercent", od.min_health_percent),
                ] {
                    if v.is_some_and(|n| !(0..=100).contains(&n)) {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{of}.{name}"),
                            "must be within 0..100",
                        ));
                    }
                }
                if od.consecutive_local_origin_failures.is_some()
                    && od.split_external_local_origin_errors != Some(true)
                {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{of}.consecutiveLocalOriginFailures"),
                        "needs splitExternalLocalOriginErrors: true",
                    ));
                }
                if od.consecutive_errors.is_some() {
                    out.push(e.d(
                        codes::SCHEMA_WARNING,
                        Severity::Warning,
                        format!("{of}.consecutiveErrors"),
                        "consecutiveErrors is deprecated and ignored: use consecutive5xxErrors",
                    ));
                }
                check_duration(e, out, format!("{of}.interval"), od.interval);
                check_duration(
                    e,
                    out,
                    format!("{of}.baseEjectionTime"),
                    od.base_ejection_time,
                );
            }
        }
    }

    fn gateway(&mut self, gw: &Object<config::Gateway>) {
        let e = Emit {
            obj: gw.object_ref("Gateway"),
            src: &gw.source,
        };
        let mut out = Vec::new();
        if gw.spec.servers.is_empty() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.servers",
                "gateway has no servers",
            ));
        }
        let mut names = HashSet::new();
        for (i, s) in gw.spec.servers.iter().enumerate() {
            let f = format!("spec.servers[{i}]");
            if s.hosts.is_empty() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.hosts"),
                    "server has no hosts",
                ));
            }
            if s.port.name.is_empty() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.port.name"),
                    "port name is required",
                ));
            } else if !names.insert(s.port.name.clone()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.port.name"),
                    format!("duplicate port name `{}`", s.port.name),
                ));
            }
            if s.port.target_port.is_some() {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.port.targetPort"),
                    "targetPort is not allowed on Gateway ports",
                ));
            }
            let proto = s.port.protocol.to_ascii_uppercase();
            if ![
                "HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS",
                "MYSQL",
            ]
            .contains(&proto.as_str())
            {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.port.protocol"),
                    format!("unknown protocol `{}`", s.port.protocol),
                ));
            }
            let is_tls_port = proto == "HTTPS" || proto == "TLS";
            match &s.tls {
                None if is_tls_port => out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("{f}.tls"),
                    format!("{proto} server needs tls settings"),
                )),
                Some(t)
                    if !is_tls_port
                        && (t.mode.is_some() || t.credential_name.is_some())
                        && !t.https_redirect =>
                {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("{f}.tls"),
                        "tls settings on a plain-text port (only httpsRedirect is allowed)",
                    ))
                }
                Some(t) => {
                    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
                    if matches!(mode, "SIMPLE" | "MUTUAL")
                        && t.credential_name.is_none()
                        && t.server_certificate.is_none()
                    {
                        out.push(e.d(
                            codes::SCHEMA,
                            Severity::Error,
                            format!("{f}.tls"),
                            format!(
                                "{mode} TLS needs credentialName or serverCertificate/privateKey"
                            ),
                        ));
                    }
                    if matches!(
                        mode,
                        "OPTIONAL_MUTUAL" | "ISTIO_MUTUAL" | "AUTO_PASSTHROUGH"
                    ) {
                        out.push(e.d(
                            codes::UNSUPPORTED_FIELD,
                            Severity::Warning,
                            format!("{f}.tls.mode"),
                            format!("tls mode {mode} is not supported by nodeproxy, ignored"),
                        ));
                    }
                }
                None => {}
            }
        }
        self.out.extend(out);
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

    fn service_entry(&mut self, se: &Object<config::ServiceEntry>) {
        let e = Emit {
            obj: se.object_ref("ServiceEntry"),
            src: &se.source,
        };
        let mut out = Vec::new();
        let s = &se.spec;
        if s.hosts.is_empty() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.hosts",
                "ServiceEntry has no hosts",
            ));
        }
        for (i, h) in s.hosts.iter().enumerate() {
            if h == "*" {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.hosts[{i}]"),
                    "host `*` is not allowed",
                ));
            }
        }
        let resolution = s.resolution.as_deref().unwrap_or("NONE");
        if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"].contains(&resolution) {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.resolution",
                format!("unknown resolution `{resolution}`"),
            ));
        }
        if resolution == "DYNAMIC_DNS" {
            out.push(e.d(
                codes::UNSUPPORTED_FIELD,
                Severity::Warning,
                "spec.resolution",
                "DYNAMIC_DNS is not supported by nodeproxy, ignored",
            ));
        }
        for (i, a) in s.addresses.iter().enumerate() {
            let ip = a.parse::<std::net::IpAddr>().is_ok();
            let cidr = a.parse::<ipnet::IpNet>().is_ok();
            if !ip && !cidr {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.addresses[{i}]"),
                    format!("`{a}` is not an IP or CIDR"),
                ));
            } else if cidr && !ip && resolution.starts_with("DNS") {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.addresses[{i}]"),
                    "CIDR addresses are not allowed with DNS resolution",
                ));
            }
        }
        if resolution == "NONE" && !s.endpoints.is_empty() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.endpoints",
                "endpoints are not allowed with resolution NONE",
            ));
        }
        if resolution == "DNS_ROUND_ROBIN" && s.endpoints.len() > 1 {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.endpoints",
                "DNS_ROUND_ROBIN allows at most one endpoint",
            ));
        }
        if !s.endpoints.is_empty() && s.workload_selector.is_some() {
            out.push(e.d(
                codes::SCHEMA,
                Severity::Error,
                "spec.workloadSelector",
                "endpoints and workloadSelector are exclusive",
            ));
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
                out.push(e.d(
                    codes::NODE_LOCAL_ENDPOINT,
                    Severity::Warning,
                    format!("spec.endpoints[{i}].address"),
                    format!("`{ip}` is {}: with --capture ebpf the proxy runs in the node's network namespace and refuses to dial it for pods (503 UF, counted in nodeproxy_upstream_refused_total) unless --allow-upstream-cidr lets it through", if link_local { "link-local (the node's, e.g. a cloud metadata service)" } else { "the node's loopback on a nodeproxy port (its admin API or capture listener)" }),
                ));
            }
        }
        if resolution == "STATIC" {
            for (i, ep) in s.endpoints.iter().enumerate() {
                if ep.address.parse::<std::net::IpAddr>().is_err()
                    && !ep.address.starts_with("unix://")
                {
                    out.push(e.d(
                        codes::SCHEMA,
                        Severity::Error,
                        format!("spec.endpoints[{i}].address"),
                        format!("`{}` is not an IP (STATIC resolution)", ep.address),
                    ));
                }
            }
        }
        let mut numbers = HashSet::new();
        let mut pnames = HashSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            if p.number == 0 || p.number > 65535 {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.ports[{i}].number"),
                    format!("port {} is out of range", p.number),
                ));
            }
            if !numbers.insert(p.number) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.ports[{i}].number"),
                    format!("duplicate port {}", p.number),
                ));
            }
            if !p.name.is_empty() && !pnames.insert(p.name.clone()) {
                out.push(e.d(
                    codes::SCHEMA,
                    Severity::Error,
                    format!("spec.ports[{i}].name"),
                    format!("duplicate port name `{}`", p.name),
                ));
            }
            let proto = crate::compile::Protocol::parse(p.protocol.as_deref().unwrap_or(""));
            if s.addresses.is_empty()
                && matches!(
                    proto,
                    crate::compile::Protocol::Tcp | crate::compile::Protocol::Unknown
                )
            {
                out.push(e.d(
                    codes::ADDRESSES_REQUIRED,
                    Severity::Warning,
                    format!("spec.ports[{i}]"),
                    "TCP (or undeclared) port without addresses: the port alone identifies the service, so it must be unique on the node",
                ));
            }
        }
        // Same host and port declared by an earlier ServiceEntry with another protocol (IST0177).
        for h in &s.hosts {
            for p in &s.ports {
                let proto = p.protocol.clone().unwrap_or_default();
                let key = (h.to_ascii_lowercase(), p.number);
                match self.se_ports.get(&key) {
                    Some((other_proto, owner)) if !other_proto.eq_ignore_ascii_case(&proto) => {
                        out.push(e.d(
                            codes::CONFLICTING_PROTOCOL,
                            Severity::Warning,
                            "spec.ports",
                            format!(
                                "{h}:{} is declared {} here and {} by ServiceEntry {owner}",
                                p.number,
                                if proto.is_empty() { "(unset)" } else { &proto },
                                if other_proto.is_empty() {
                                    "(unset)"
                                } else {
                                    other_proto
                                },
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.se_ports
                            .insert(key, (proto, format!("{}/{}", se.namespace, se.name)));
                    }
                }
            }
        }
        self.out.extend(out);
    }
}

fn is_prime(n: u64) -> bool {
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

#[cfg(test)]
mod tests;
