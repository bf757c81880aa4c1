//! DestinationRules by host, merged as Istio merges them.

use super::scopes::{Exported, ROOT_NAMESPACE};
use super::*;

/// DestinationRules indexed by expanded host. Rules of several namespaces for one host: the
/// lookup path picks one namespace (the client's when the scope has one, then the service's,
/// then `istio-system`, then the first in load order); that namespace's rules are merged
/// (subsets unioned, first wins; top-level policy from the first that has one).
pub struct DrIndex {
    rules: Vec<(String, DestinationRule, String)>,
    /// Namespace and visibility of each rule.
    meta: Vec<(String, super::scopes::Exported)>,
    /// The client namespace first on the lookup path.
    client_ns: Option<String>,
    /// Exact host → indices into `rules`, in order.
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard hosts → indices (few in practice; scanned).
    wildcard: Vec<usize>,
}

impl DrIndex {
    /// Index every DR of the set.
    pub fn new(set: &ConfigSet) -> Self {
        Self::for_client(set, None)
    }

    /// Index every DR of the set for clients of namespace `client_ns`.
    pub fn for_client(set: &ConfigSet, client_ns: Option<&str>) -> Self {
        let meta = set
            .destination_rules
            .iter()
            .map(|d| {
                (
                    d.namespace.clone(),
                    super::scopes::Exported::of(&d.spec.export_to, &d.namespace),
                )
            })
            .collect();
        let rules: Vec<(String, DestinationRule, String)> = set
            .destination_rules
            .iter()
            .map(|d| {
                (
                    expand_host(&d.spec.host, &d.namespace, &set.cluster_domain),
                    d.spec.clone(),
                    format!("DestinationRule/{}/{}", d.namespace, d.name),
                )
            })
            .collect();
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard = Vec::new();
        for (i, (h, _, _)) in rules.iter().enumerate() {
            if h.starts_with('*') {
                wildcard.push(i);
            } else {
                exact.entry(h.clone()).or_default().push(i);
            }
        }
        DrIndex {
            rules,
            meta,
            client_ns: client_ns.map(str::to_string),
            exact,
            wildcard,
        }
    }

    /// The rules (indices) for a host: exact host rules, else the most specific wildcard.
    fn candidates(&self, host: &str) -> Vec<usize> {
        match self.exact.get(host) {
            Some(ix) => ix.clone(),
            None => {
                let mut wild: Vec<usize> = self
                    .wildcard
                    .iter()
                    .copied()
                    .filter(|i| host_matches(&self.rules[*i].0, host))
                    .collect();
                let Some(best) = wild.iter().map(|i| self.rules[*i].0.len()).max() else {
                    return Vec::new();
                };
                wild.retain(|i| self.rules[*i].0.len() == best);
                wild
            }
        }
    }

    /// The merged rule for a service host of namespace `service_ns`, by the lookup path.
    pub fn for_host(&self, host: &str, service_ns: &str) -> Option<DestinationRule> {
        let all = self.candidates(host);
        let first_ns = &self.meta[*all.first()?].0;
        let ns = [
            self.client_ns.as_deref(),
            Some(service_ns),
            Some(ROOT_NAMESPACE),
        ]
        .into_iter()
        .flatten()
        .find(|n| all.iter().any(|i| self.meta[*i].0 == *n))
        .unwrap_or(first_ns)
        .to_string();
        let chosen: Vec<&(String, DestinationRule, String)> = all
            .iter()
            .filter(|i| self.meta[**i].0 == ns)
            .map(|i| &self.rules[*i])
            .collect();
        let mut merged = chosen.first()?.1.clone();
        for (_, dr, _) in chosen.iter().skip(1) {
            if merged.traffic_policy.is_none() {
                merged.traffic_policy = dr.traffic_policy.clone();
            }
            for s in &dr.subsets {
                if !merged.subsets.iter().any(|m| m.name == s.name) {
                    merged.subsets.push(s.clone());
                }
            }
        }
        Some(merged)
    }

    /// Is `subset` of `host` defined by a rule some client of `seen_by` also sees?
    pub fn defines_subset(&self, host: &str, subset: &str, seen_by: &Exported) -> bool {
        self.candidates(host).into_iter().any(|i| {
            self.meta[i].1.overlaps(seen_by)
                && self.rules[i].1.subsets.iter().any(|s| s.name == subset)
        })
    }

    /// Every (expanded host, origin) for analysis.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().map(|(h, _, o)| (h.as_str(), o.as_str()))
    }
}
