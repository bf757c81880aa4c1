//! DestinationRules by host, merged as Istio merges them.

use super::*;

/// DestinationRules indexed by expanded host; several for one host are merged (subsets
/// unioned, first wins; top-level policy from the first that has one).
pub struct DrIndex {
    rules: Vec<(String, DestinationRule, String)>,
    /// Exact host → indices into `rules`, in order.
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard hosts → indices (few in practice; scanned).
    wildcard: Vec<usize>,
}

impl DrIndex {
    /// Index every DR of the set.
    pub fn new(set: &ConfigSet) -> Self {
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
            exact,
            wildcard,
        }
    }

    /// The merged rule for a service host: exact host rules first, else the most specific
    /// wildcard.
    pub fn for_host(&self, host: &str) -> Option<DestinationRule> {
        let chosen: Vec<&(String, DestinationRule, String)> = match self.exact.get(host) {
            Some(ix) => ix.iter().map(|i| &self.rules[*i]).collect(),
            None => {
                let mut wild: Vec<_> = self
                    .wildcard
                    .iter()
                    .map(|i| &self.rules[*i])
                    .filter(|(h, _, _)| host_matches(h, host))
                    .collect();
                let best = wild.iter().map(|(h, _, _)| h.len()).max()?;
                wild.retain(|(h, _, _)| h.len() == best);
                wild
            }
        };
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

    /// Every (expanded host, origin) for analysis.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().map(|(h, _, o)| (h.as_str(), o.as_str()))
    }
}
