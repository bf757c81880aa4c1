//! Analysis of a config set, in the spirit of `istioctl analyze`: Istio's admission validation
//! (IST0106) plus cross-object checks (missing subsets, hosts and gateways, host conflicts,
//! subsets selecting nothing, retry budgets longer than the timeout...). Input: a
//! [`ConfigSet`]; output: diagnostics with stable codes. Pure: no I/O.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::compile::registry::{Registry, Resolution, expand_host, host_matches};
use crate::compile::scopes::Exported;
use crate::compile::{
    DrIndex, MESH_GATEWAY, RetryOn, StrMatch, compile_match, header_rules, qualify_gateway,
};
use crate::config::{self, ConfigSet, Destination, Object, Percent, VirtualService, labels_match};
use crate::diagnostic::{Code, Diagnostic, Severity, codes};

/// Envoy's largest hash ring (`RingHashLbConfig.maximum_ring_size`'s bound, 8M entries): a
/// larger `minimumRingSize` would allocate without limit on the request path.
mod destination_rule;
mod gateway;
mod headers;
mod reachability;
mod service_entry;
mod virtual_service;
mod workload_entry;

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
        vs_export: Exported::All,
        // Only then can a host exist but be hidden from a namespace.
        services_restricted: set
            .service_entries
            .iter()
            .any(|se| Exported::of(&se.spec.export_to, &se.namespace).restricted())
            || set
                .kube_services
                .iter()
                .any(|ks| Exported::of_annotation(&ks.annotations, &ks.namespace).restricted()),
    };
    for vs in &set.virtual_services {
        a.virtual_service(vs);
    }
    a.host_conflicts();
    a.delegation();
    for dr in &set.destination_rules {
        a.destination_rule(dr);
    }
    for gw in &set.gateways {
        a.gateway(gw);
    }
    a.gateway_conflicts();
    for se in &set.service_entries {
        a.service_entry(se);
    }
    a.protocol_conflicts();
    for ks in &set.kube_services {
        a.kube_service(ks);
    }
    for we in &set.workload_entries {
        a.workload_entry(we);
    }
    a.out
}

struct Analyzer<'a> {
    set: &'a ConfigSet,
    registry: Registry,
    drs: DrIndex,
    out: Vec<Diagnostic>,
    /// Who sees the VirtualService being analyzed (its subsets must be defined for them).
    vs_export: Exported,
    /// Some ServiceEntry or Service is exported to some namespaces only.
    services_restricted: bool,
}

/// Collects the diagnostics of one object: `e.error(code, field, message)` instead of
/// building each diagnostic with its object, source and severity by hand.
struct Emit<'o> {
    obj: crate::diagnostic::ObjectRef,
    src: &'o crate::diagnostic::Source,
    out: std::cell::RefCell<Vec<Diagnostic>>,
}

impl<'o> Emit<'o> {
    fn new(obj: crate::diagnostic::ObjectRef, src: &'o crate::diagnostic::Source) -> Self {
        Emit {
            obj,
            src,
            out: Default::default(),
        }
    }

    fn push(&self, code: Code, sev: Severity, field: impl Into<String>, msg: impl Into<String>) {
        self.out.borrow_mut().push(
            Diagnostic::new(code, sev, msg)
                .on(self.obj.clone(), self.src.clone())
                .at(field),
        );
    }

    fn error(&self, code: Code, field: impl Into<String>, msg: impl Into<String>) {
        self.push(code, Severity::Error, field, msg);
    }

    fn warn(&self, code: Code, field: impl Into<String>, msg: impl Into<String>) {
        self.push(code, Severity::Warning, field, msg);
    }

    fn info(&self, code: Code, field: impl Into<String>, msg: impl Into<String>) {
        self.push(code, Severity::Info, field, msg);
    }

    /// The diagnostics collected.
    fn finish(self) -> Vec<Diagnostic> {
        self.out.into_inner()
    }
}

/// No `*`, or only a leading `*.` (`*.example.com`; `foo.*.com` and `*foo.com` are invalid).
fn wildcard_ok(h: &str) -> bool {
    match h.strip_prefix("*.") {
        Some(rest) => !rest.contains('*'),
        None => !h.contains('*'),
    }
}

fn check_duration(e: &Emit<'_>, field: String, d: Option<config::Duration>) {
    if let Some(d) = d
        && d.get() < Duration::from_millis(1)
    {
        e.error(
            codes::SCHEMA,
            field,
            format!("duration {d} is below the 1ms minimum"),
        );
    }
}

fn check_percent(e: &Emit<'_>, field: String, p: Option<Percent>) {
    if let Some(p) = p
        && (!(0.0..=100.0).contains(&p.value) || p.value.is_nan())
    {
        e.error(
            codes::SCHEMA,
            field,
            format!("percentage {} is outside 0..100", p.value),
        );
    }
}

/// Istio's `exportTo` rules: `.`, `*` or namespace names (`~` on ServiceEntries only), no
/// duplicates (`.` and the own namespace count as one), `*` and `~` alone; a DestinationRule
/// with a workloadSelector is exported to its own namespace only.
fn check_export_to(
    e: &Emit<'_>,
    ns: &str,
    list: &[String],
    service_entry: bool,
    dr_selector: bool,
) {
    let mut seen = HashSet::new();
    for (i, v) in list.iter().enumerate() {
        let field = format!("spec.exportTo[{i}]");
        let key = if v == "." { ns } else { v.as_str() };
        if !seen.insert(key.to_string()) {
            e.error(
                codes::SCHEMA,
                field,
                format!(
                    "duplicate exportTo entry `{v}`{}",
                    if v == "." || key == ns && list.iter().any(|x| x == ".") {
                        format!(" (`.` is namespace {ns})")
                    } else {
                        String::new()
                    }
                ),
            );
            continue;
        }
        let ok = v == "."
            || v == "*"
            || (v == "~" && service_entry)
            || crate::config::is_dns1123_label(v);
        if !ok {
            e.error(
                codes::SCHEMA,
                field,
                format!(
                    "invalid exportTo value `{v}`: `.`, `*`{} or a namespace name",
                    if service_entry { ", `~`" } else { "" }
                ),
            );
        }
    }
    if list.len() > 1 && list.iter().any(|v| v == "*") {
        e.error(
            codes::SCHEMA,
            "spec.exportTo",
            "`*` (every namespace) cannot be combined with other exportTo values",
        );
    }
    if list.len() > 1 && list.iter().any(|v| v == "~") {
        e.error(
            codes::SCHEMA,
            "spec.exportTo",
            "`~` (no namespace) cannot be combined with other exportTo values",
        );
    }
    if dr_selector && !list.is_empty() {
        if !seen.contains(ns) {
            e.error(codes::SCHEMA, "spec.exportTo", "a DestinationRule with a workloadSelector cannot be exported beyond its own namespace");
        } else if seen.len() > 1 {
            e.error(
                codes::SCHEMA,
                "spec.exportTo",
                "a DestinationRule with a workloadSelector cannot have several exportTo entries",
            );
        }
    }
}

impl Analyzer<'_> {
    /// Delegated rules left out of their root (missing or hidden delegate, a conflict).
    fn delegation(&mut self) {
        for d in crate::compile::delegate::merged(self.set).1 {
            let Some(vs) = self
                .set
                .virtual_services
                .iter()
                .find(|v| format!("{}/{}", v.namespace, v.name) == d.root)
            else {
                continue;
            };
            self.out.push(
                Diagnostic::new(
                    codes::DELEGATE_DROPPED,
                    Severity::Warning,
                    format!("{}: left out of the route table", d.why),
                )
                .on(vs.object_ref("VirtualService"), vs.source.clone())
                .at(format!("spec.http[{}].delegate", d.rule)),
            );
        }
    }

    /// Two mesh VirtualServices for one host that some client namespace both sees (IST0109;
    /// `exportTo` scopes them, as Istio's analyzer does).
    fn host_conflicts(&mut self) {
        // Every mesh VirtualService of each host, with who sees it.
        let mut claims: HashMap<String, Vec<(usize, usize, Exported)>> = HashMap::new();
        for (v, vs) in self.set.virtual_services.iter().enumerate() {
            let on_mesh =
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == MESH_GATEWAY);
            if !on_mesh {
                continue;
            }
            let seen_by = Exported::of(&vs.spec.export_to, &vs.namespace);
            for (i, h) in vs.spec.hosts.iter().enumerate() {
                let host = expand_host(h, &vs.namespace, &self.set.cluster_domain);
                let claimed = claims.entry(host).or_default();
                if !claimed.iter().any(|(o, _, _)| *o == v) {
                    claimed.push((v, i, seen_by.clone()));
                }
            }
        }
        // A VirtualService exported to some namespaces also conflicts with a public one whose
        // host overlaps its own by wildcard (`*.productpage.d` and `*.d`), as Istio finds it.
        let mut wild: Vec<(String, usize, usize, String)> = Vec::new();
        for (host, claimed) in &claims {
            for (v, i, seen_by) in claimed {
                if !seen_by.restricted() {
                    continue;
                }
                for (other, public) in &claims {
                    if other == host || !crate::compile::registry::hosts_intersect(host, other) {
                        continue;
                    }
                    for (o, _, x) in public {
                        if !x.restricted() && o != v {
                            wild.push((host.clone(), *v, *i, other.clone()));
                            wild.push((other.clone(), *o, 0, host.clone()));
                        }
                    }
                }
            }
        }
        // As Istio, each VirtualService of a conflict is reported, once.
        wild.sort();
        let mut reported = std::collections::BTreeSet::new();
        for (host, v, i, other) in wild {
            if !reported.insert(v) {
                continue;
            }
            let vs = &self.set.virtual_services[v];
            self.out.push(
                Diagnostic::new(
                    codes::CONFLICTING_HOSTS,
                    Severity::Error,
                    format!("host `{host}` overlaps `{other}` of a VirtualService some namespace also sees (exportTo): mesh VirtualServices are not merged, one would be ignored"),
                )
                .on(vs.object_ref("VirtualService"), vs.source.clone())
                .at(format!("spec.hosts[{i}]")),
            );
        }
        let mut hosts: Vec<_> = claims.into_iter().collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        for (host, claimed) in hosts {
            for (v, i, seen_by) in &claimed {
                let others: Vec<String> = claimed
                    .iter()
                    .filter(|(o, _, x)| o != v && x.overlaps(seen_by))
                    .map(|(o, _, _)| {
                        let vs = &self.set.virtual_services[*o];
                        format!("{}/{}", vs.namespace, vs.name)
                    })
                    .collect();
                if others.is_empty() || !reported.insert(*v) {
                    continue;
                }
                let vs = &self.set.virtual_services[*v];
                self.out.push(
                    Diagnostic::new(
                        codes::CONFLICTING_HOSTS,
                        Severity::Error,
                        format!("host `{host}` is also claimed by VirtualService {}, and some namespace sees both (exportTo): mesh VirtualServices are not merged, one would be ignored", others.join(", ")),
                    )
                    .on(vs.object_ref("VirtualService"), vs.source.clone())
                    .at(format!("spec.hosts[{i}]")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
