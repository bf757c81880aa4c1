//! VirtualService delegation: a root VirtualService's `http[]` rule with `delegate` is replaced
//! by the rules of the delegate VirtualService (one without hosts), merged as Istio merges
//! them. Each delegate rule's match blocks must refine some root block (then the two are
//! ANDed) or the delegate rule is dropped; properties the delegate rule leaves unset are the
//! root rule's; names become `root-delegate`. A delegate that does not exist, or is not
//! exported to the root's namespace, drops the root rule. Delegates are one level deep.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::registry::expand_host;
use super::scopes::Exported;
use crate::config::{
    ConfigSet, Destination, HttpMatchRequest, HttpRoute, Object, StringMatch, VirtualService,
};

/// Why a root rule or a delegate rule was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// `ns/name` of the root VirtualService.
    pub root: String,
    /// Index of the root's `http[]` rule.
    pub rule: usize,
    /// What happened.
    pub why: String,
}

/// The set with every root VirtualService's delegated rules merged in and the delegates
/// themselves (VirtualServices without hosts) left out; unchanged when nothing delegates.
pub fn merge(set: &ConfigSet) -> Cow<'_, ConfigSet> {
    let any = set
        .virtual_services
        .iter()
        .any(|vs| vs.spec.hosts.is_empty() || vs.spec.http.iter().any(|r| r.delegate.is_some()));
    if !any {
        return Cow::Borrowed(set);
    }
    let (virtual_services, _) = merged(set);
    Cow::Owned(ConfigSet {
        virtual_services,
        ..set.clone()
    })
}

/// The merged VirtualServices, and what was dropped (for analysis).
pub fn merged(set: &ConfigSet) -> (Vec<Object<VirtualService>>, Vec<Dropped>) {
    let mut dropped = Vec::new();
    let by_name: BTreeMap<(&str, &str), &Object<VirtualService>> = set
        .virtual_services
        .iter()
        .filter(|vs| vs.spec.hosts.is_empty())
        .map(|vs| ((vs.namespace.as_str(), vs.name.as_str()), vs))
        .collect();
    let mut out = Vec::new();
    for vs in set
        .virtual_services
        .iter()
        .filter(|vs| !vs.spec.hosts.is_empty())
    {
        if vs.spec.http.iter().all(|r| r.delegate.is_none()) {
            out.push(vs.clone());
            continue;
        }
        let root = format!("{}/{}", vs.namespace, vs.name);
        let mut http = Vec::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            let Some(d) = &r.delegate else {
                http.push(r.clone());
                continue;
            };
            let ns = d.namespace.as_deref().unwrap_or(&vs.namespace);
            let Some(child) = by_name.get(&(ns, d.name.as_str())) else {
                dropped.push(Dropped {
                    root: root.clone(),
                    rule: i,
                    why: format!(
                        "delegate VirtualService {ns}/{} not found (a delegate has no hosts)",
                        d.name
                    ),
                });
                continue;
            };
            if !Exported::of(&child.spec.export_to, &child.namespace)
                .visible_to(Some(&vs.namespace))
            {
                dropped.push(Dropped {
                    root: root.clone(),
                    rule: i,
                    why: format!(
                        "delegate VirtualService {ns}/{} is not exported to namespace {}",
                        d.name, vs.namespace
                    ),
                });
                continue;
            }
            for (j, c) in child.spec.http.iter().enumerate() {
                if c.delegate.is_some() {
                    dropped.push(Dropped {
                        root: root.clone(),
                        rule: i,
                        why: format!(
                            "delegate {ns}/{} rule {j} delegates again (one level only)",
                            d.name
                        ),
                    });
                    continue;
                }
                let mut c = qualify(c.clone(), &child.namespace, set);
                c.delegated_from = Some(format!("{}/{}", child.namespace, child.name));
                match merge_route(r, c) {
                    Some(m) => http.push(m),
                    None => dropped.push(Dropped {
                        root: root.clone(),
                        rule: i,
                        why: format!(
                            "delegate {ns}/{} rule {j}: its match conditions are not within the root rule's",
                            d.name
                        ),
                    }),
                }
            }
        }
        let mut merged = vs.clone();
        merged.spec.http = http;
        out.push(merged);
    }
    (out, dropped)
}

/// Short destination hosts of a delegate rule name services of the delegate's namespace.
fn qualify(mut r: HttpRoute, ns: &str, set: &ConfigSet) -> HttpRoute {
    let fix = |d: &mut Destination| d.host = expand_host(&d.host, ns, &set.cluster_domain);
    for d in &mut r.route {
        fix(&mut d.destination);
    }
    if let Some(m) = &mut r.mirror {
        fix(m);
    }
    for m in &mut r.mirrors {
        fix(&mut m.destination);
    }
    r
}

/// A delegate rule under its root rule, or None when its matches conflict with the root's.
fn merge_route(root: &HttpRoute, mut child: HttpRoute) -> Option<HttpRoute> {
    child.matches = merge_matches(&root.matches, &child.matches)?;
    child.name = joined(&root.name, &child.name);
    macro_rules! inherit {
        ($($f:ident),*) => { $( if child.$f.is_none() { child.$f = root.$f.clone(); } )* };
    }
    inherit!(
        rewrite,
        direct_response,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percent,
        mirror_percentage,
        cors_policy,
        headers
    );
    if child.mirrors.is_empty() {
        child.mirrors = root.mirrors.clone();
    }
    Some(child)
}

/// Each child block ANDed with every root block it does not conflict with; None when a child
/// block fits no root block.
fn merge_matches(
    root: &[HttpMatchRequest],
    child: &[HttpMatchRequest],
) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(child.to_vec());
    }
    if child.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for c in child {
        let mut fits = false;
        for r in root {
            if conflict(r, c) {
                continue;
            }
            out.push(and(r, c));
            fits = true;
        }
        if !fits {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Istio's merged name: `root-child`, or whichever is set.
fn joined(root: &Option<String>, child: &Option<String>) -> Option<String> {
    match (root, child) {
        (r, None) => r.clone(),
        (Some(r), Some(c)) => Some(format!("{r}-{c}")),
        (None, c) => c.clone(),
    }
}

fn and(r: &HttpMatchRequest, c: &HttpMatchRequest) -> HttpMatchRequest {
    let mut out = c.clone();
    out.name = joined(&r.name, &c.name);
    if out.uri.is_none() {
        out.uri = r.uri.clone();
    }
    if out.scheme.is_none() {
        out.scheme = r.scheme.clone();
    }
    if out.method.is_none() {
        out.method = r.method.clone();
    }
    if out.authority.is_none() {
        out.authority = r.authority.clone();
    }
    fn union<V: Clone>(r: &BTreeMap<String, V>, c: &BTreeMap<String, V>) -> BTreeMap<String, V> {
        let mut m = r.clone();
        m.extend(c.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    }
    out.headers = union(&r.headers, &c.headers);
    out.without_headers = union(&r.without_headers, &c.without_headers);
    out.query_params = union(&r.query_params, &c.query_params);
    out.source_labels = union(&r.source_labels, &c.source_labels);
    if out.port.is_none_or(|p| p == 0) {
        out.port = r.port;
    }
    if out.source_namespace.as_deref().is_none_or(str::is_empty) {
        out.source_namespace = r.source_namespace.clone();
    }
    if out.gateways.is_empty() {
        out.gateways = r.gateways.clone();
    }
    if out.stat_prefix.is_none() {
        out.stat_prefix = r.stat_prefix.clone();
    }
    out
}

/// Does the child block ask for something outside the root block?
fn conflict(r: &HttpMatchRequest, c: &HttpMatchRequest) -> bool {
    let pairs = [
        (r.uri.as_ref(), c.uri.as_ref()),
        (r.scheme.as_deref(), c.scheme.as_deref()),
        (r.method.as_deref(), c.method.as_deref()),
        (r.authority.as_deref(), c.authority.as_deref()),
    ];
    if pairs.iter().any(|(a, b)| str_conflict(*a, *b)) {
        return true;
    }
    let maps = [
        (&r.headers, &c.headers),
        (&r.without_headers, &c.without_headers),
        (&r.query_params, &c.query_params),
    ];
    if maps
        .iter()
        .any(|(rm, cm)| cm.iter().any(|(k, v)| str_conflict(rm.get(k), Some(v))))
    {
        return true;
    }
    if r.ignore_uri_case != c.ignore_uri_case {
        return true;
    }
    if let (Some(a), Some(b)) = (r.port.filter(|p| *p > 0), c.port.filter(|p| *p > 0))
        && a != b
    {
        return true;
    }
    if let Some(ns) = r.source_namespace.as_deref().filter(|s| !s.is_empty())
        && c.source_namespace.as_deref() != Some(ns)
    {
        return true;
    }
    if c.source_labels
        .iter()
        .any(|(k, v)| r.source_labels.get(k).is_some_and(|rv| rv != v))
    {
        return true;
    }
    if !r.gateways.is_empty() && !c.gateways.is_empty() {
        return c.gateways.len() > r.gateways.len()
            || c.gateways.iter().any(|g| !r.gateways.contains(g));
    }
    false
}

/// A child string match is within the root's: equal exact values, an exact or prefix under a
/// prefix; a regex on either side conflicts with anything on the other.
fn str_conflict(root: Option<&StringMatch>, child: Option<&StringMatch>) -> bool {
    let (Some(r), Some(c)) = (root, child) else {
        return false;
    };
    let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|v| !v.is_empty());
    let any = |m: &StringMatch| nonempty(&m.exact) || nonempty(&m.prefix) || nonempty(&m.regex);
    if nonempty(&r.regex) && any(c) || nonempty(&c.regex) && any(r) {
        return true;
    }
    if let Some(exact) = r.exact.as_deref().filter(|s| !s.is_empty()) {
        return nonempty(&c.prefix) || c.exact.as_deref() != Some(exact);
    }
    if let Some(prefix) = r.prefix.as_deref().filter(|s| !s.is_empty()) {
        if let Some(p) = c.prefix.as_deref().filter(|s| !s.is_empty()) {
            return !p.starts_with(prefix);
        }
        if let Some(e) = c.exact.as_deref().filter(|s| !s.is_empty()) {
            return !e.starts_with(prefix);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(kind: &str, v: &str) -> StringMatch {
        let mut m = StringMatch::default();
        match kind {
            "exact" => m.exact = Some(v.into()),
            "prefix" => m.prefix = Some(v.into()),
            _ => m.regex = Some(v.into()),
        }
        m
    }

    #[test]
    fn string_refinement() {
        let c = |r: (&str, &str), ch: (&str, &str)| {
            str_conflict(Some(&sm(r.0, r.1)), Some(&sm(ch.0, ch.1)))
        };
        assert!(!c(("prefix", "/a"), ("prefix", "/a/b")));
        assert!(c(("prefix", "/a/b"), ("prefix", "/a")));
        assert!(!c(("prefix", "/a"), ("exact", "/a/x")));
        assert!(c(("prefix", "/a"), ("exact", "/b")));
        assert!(!c(("exact", "/a"), ("exact", "/a")));
        assert!(c(("exact", "/a"), ("exact", "/b")));
        assert!(c(("exact", "/a"), ("prefix", "/a")));
        assert!(c(("regex", "/a.*"), ("regex", "/a.*")));
        assert!(c(("prefix", "/a"), ("regex", "/a.*")));
        assert!(!str_conflict(None, Some(&sm("exact", "/x"))));
        assert!(!str_conflict(Some(&sm("exact", "/x")), None));
    }

    #[test]
    fn blocks_and_and_properties_inherit() {
        let root = HttpRoute {
            name: Some("root".into()),
            matches: vec![HttpMatchRequest {
                uri: Some(sm("prefix", "/api")),
                ..Default::default()
            }],
            timeout: Some(crate::config::Duration::parse("3s").unwrap()),
            ..Default::default()
        };
        let child = HttpRoute {
            name: Some("v2".into()),
            matches: vec![HttpMatchRequest {
                uri: Some(sm("prefix", "/api/v2")),
                headers: BTreeMap::from([("x".to_string(), sm("exact", "1"))]),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = merge_route(&root, child.clone()).expect("refines");
        assert_eq!(m.name.as_deref(), Some("root-v2"));
        assert_eq!(m.timeout, root.timeout);
        assert_eq!(m.matches.len(), 1);
        assert_eq!(m.matches[0].uri, Some(sm("prefix", "/api/v2")));
        assert_eq!(m.matches[0].headers.len(), 1);
        let outside = HttpRoute {
            matches: vec![HttpMatchRequest {
                uri: Some(sm("prefix", "/web")),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(merge_route(&root, outside), None);
        // No child blocks: the root's apply.
        let m = merge_route(&root, HttpRoute::default()).unwrap();
        assert_eq!(m.matches, root.matches);
    }
}
