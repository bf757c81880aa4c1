//! `exportTo`: which client namespaces see which VirtualServices, DestinationRules,
//! ServiceEntries and Services, and the scopes the snapshot is compiled in.
//!
//! A scope is a set of client namespaces that see the same objects (and pick the same
//! DestinationRule where several namespaces define one for a host, Istio's lookup path: the
//! client's namespace, then the service's, then `istio-system`, then any other). The default
//! scope is what a client of any other namespace, or of no known namespace, sees; with no
//! restricted `exportTo` in the set it is the only scope and nothing changes.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{ConfigSet, Object};

/// The Service annotation carrying a Service's `exportTo` (comma-separated).
pub const SERVICE_EXPORT_TO: &str = "networking.istio.io/exportTo";

/// Istio's configuration root namespace (third on the DestinationRule lookup path).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// To whom an object is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exported {
    /// Every namespace (`exportTo` empty or `*`).
    All,
    /// These namespaces only (`.` resolved to the object's own; `~` leaves it empty).
    To(BTreeSet<String>),
}

impl Exported {
    /// The visibility of an object of namespace `own` with this `exportTo`.
    pub fn of(export_to: &[String], own: &str) -> Exported {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Exported::All;
        }
        Exported::To(
            export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| if e == "." { own.to_string() } else { e.clone() })
                .collect(),
        )
    }

    /// A Service's visibility, from its `networking.istio.io/exportTo` annotation.
    pub fn of_annotation(annotations: &BTreeMap<String, String>, own: &str) -> Exported {
        match annotations.get(SERVICE_EXPORT_TO) {
            Some(v) => {
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                Exported::of(&list, own)
            }
            None => Exported::All,
        }
    }

    /// Does a client in namespace `ns` (None: unknown) see it?
    pub fn visible_to(&self, ns: Option<&str>) -> bool {
        match self {
            Exported::All => true,
            Exported::To(set) => ns.is_some_and(|n| set.contains(n)),
        }
    }

    /// Is there a namespace that sees both?
    pub fn overlaps(&self, other: &Exported) -> bool {
        match (self, other) {
            (Exported::All, Exported::All) => true,
            (Exported::All, Exported::To(s)) | (Exported::To(s), Exported::All) => !s.is_empty(),
            (Exported::To(a), Exported::To(b)) => a.intersection(b).next().is_some(),
        }
    }

    /// Seen by some namespaces only.
    pub fn restricted(&self) -> bool {
        !matches!(self, Exported::All)
    }
}

/// Objects a scope cannot see, by kind and index into the set's vectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Hidden {
    virtual_services: Vec<usize>,
    destination_rules: Vec<usize>,
    service_entries: Vec<usize>,
    kube_services: Vec<usize>,
    /// The client namespace's own DestinationRules, where the lookup path makes them differ.
    preferred_rules: Vec<usize>,
}

/// One compile scope.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The client namespaces in it (empty for the default scope).
    pub namespaces: Vec<String>,
    hidden: Hidden,
}

impl Scope {
    /// The namespace whose own DestinationRules come first on the lookup path: set when the
    /// scope's client namespace holds a rule for a host that other namespaces also have rules
    /// for (such a scope has that one namespace).
    pub fn client_namespace(&self) -> Option<&str> {
        (!self.hidden.preferred_rules.is_empty()).then(|| self.namespaces[0].as_str())
    }

    /// Does the scope see every object?
    pub fn hides_nothing(&self) -> bool {
        let h = &self.hidden;
        h.virtual_services.is_empty()
            && h.destination_rules.is_empty()
            && h.service_entries.is_empty()
            && h.kube_services.is_empty()
    }

    /// The set as clients of this scope see it: hidden objects removed.
    pub fn filter(&self, set: &ConfigSet) -> ConfigSet {
        fn keep<T: Clone>(v: &[Object<T>], hidden: &[usize]) -> Vec<Object<T>> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| hidden.binary_search(i).is_err())
                .map(|(_, o)| o.clone())
                .collect()
        }
        let h = &self.hidden;
        ConfigSet {
            virtual_services: keep(&set.virtual_services, &h.virtual_services),
            destination_rules: keep(&set.destination_rules, &h.destination_rules),
            gateways: set.gateways.clone(),
            service_entries: keep(&set.service_entries, &h.service_entries),
            workload_entries: set.workload_entries.clone(),
            kube_services: keep(&set.kube_services, &h.kube_services),
            endpoint_slices: set.endpoint_slices.clone(),
            pods: set.pods.clone(),
            cluster_domain: set.cluster_domain.clone(),
            credentials_dir: set.credentials_dir.clone(),
        }
    }
}

/// The scopes of a set: the default scope first, then one per group of client namespaces
/// that see something else.
pub fn plan(set: &ConfigSet) -> Vec<Scope> {
    fn exports<T>(objs: &[Object<T>], list: impl Fn(&T) -> &[String]) -> Vec<Exported> {
        objs.iter()
            .map(|o| Exported::of(list(&o.spec), &o.namespace))
            .collect()
    }
    let vs = exports(&set.virtual_services, |s| &s.export_to);
    let dr = exports(&set.destination_rules, |s| &s.export_to);
    let se = exports(&set.service_entries, |s| &s.export_to);
    let ks: Vec<Exported> = set
        .kube_services
        .iter()
        .map(|o| Exported::of_annotation(&o.annotations, &o.namespace))
        .collect();
    // DestinationRules whose choice depends on the client's namespace: a host with rules in
    // more than one namespace.
    let domain = &set.cluster_domain;
    let mut dr_namespaces: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for d in &set.destination_rules {
        let host = super::registry::expand_host(&d.spec.host, &d.namespace, domain);
        dr_namespaces.entry(host).or_default().insert(&d.namespace);
    }
    // The service's own namespace picks what every client without a rule of its own picks.
    let service_ns = |host: &str| -> Option<String> {
        if let Some(se) = set
            .service_entries
            .iter()
            .find(|se| se.spec.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
        {
            return Some(se.namespace.clone());
        }
        let rest = host.strip_suffix(domain.as_str())?.strip_suffix(".svc.")?;
        rest.split_once('.').map(|(_, ns)| ns.to_string())
    };
    let contested: BTreeSet<&str> = dr_namespaces
        .iter()
        .filter(|(_, n)| n.len() > 1)
        .flat_map(|(h, n)| {
            let own = service_ns(h);
            n.iter()
                .copied()
                .filter(move |ns| own.as_deref() != Some(*ns))
        })
        .collect();
    let any_restricted = vs
        .iter()
        .chain(&dr)
        .chain(&se)
        .chain(&ks)
        .any(Exported::restricted);
    if !any_restricted && contested.is_empty() {
        return vec![Scope {
            namespaces: Vec::new(),
            hidden: Hidden::default(),
        }];
    }
    // Every namespace that could see something the default scope does not.
    let mut universe: BTreeSet<String> = BTreeSet::new();
    for e in vs.iter().chain(&dr).chain(&se).chain(&ks) {
        if let Exported::To(s) = e {
            universe.extend(s.iter().cloned());
        }
    }
    universe.extend(contested.iter().map(|s| s.to_string()));
    let hidden_for = |ns: Option<&str>| {
        let pick = |v: &[Exported]| -> Vec<usize> {
            v.iter()
                .enumerate()
                .filter(|(_, e)| !e.visible_to(ns))
                .map(|(i, _)| i)
                .collect()
        };
        let destination_rules = pick(&dr);
        let preferred_rules = match ns {
            Some(n) if contested.contains(n) => set
                .destination_rules
                .iter()
                .enumerate()
                .filter(|(i, d)| d.namespace == n && destination_rules.binary_search(i).is_err())
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        };
        Hidden {
            virtual_services: pick(&vs),
            destination_rules,
            service_entries: pick(&se),
            kube_services: pick(&ks),
            preferred_rules,
        }
    };
    let default = hidden_for(None);
    let mut groups: BTreeMap<Hidden, Vec<String>> = BTreeMap::new();
    for ns in universe {
        let h = hidden_for(Some(&ns));
        if h != default {
            groups.entry(h).or_default().push(ns);
        }
    }
    let mut scopes = vec![Scope {
        namespaces: Vec::new(),
        hidden: default,
    }];
    let mut rest: Vec<Scope> = groups
        .into_iter()
        .map(|(hidden, namespaces)| Scope { namespaces, hidden })
        .collect();
    rest.sort_by(|a, b| a.namespaces.cmp(&b.namespaces));
    scopes.extend(rest);
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(v: &[&str], own: &str) -> Exported {
        Exported::of(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), own)
    }

    #[test]
    fn export_to_values() {
        assert_eq!(ex(&[], "a"), Exported::All);
        assert_eq!(ex(&["*"], "a"), Exported::All);
        let own = ex(&["."], "a");
        assert!(own.visible_to(Some("a")));
        assert!(!own.visible_to(Some("b")));
        assert!(!own.visible_to(None));
        let none = ex(&["~"], "a");
        assert!(!none.visible_to(Some("a")));
        let two = ex(&[".", "b"], "a");
        assert!(two.visible_to(Some("b")) && two.visible_to(Some("a")));
        assert!(own.overlaps(&two));
        assert!(!own.overlaps(&ex(&["."], "b")));
        assert!(!none.overlaps(&Exported::All));
        assert!(own.overlaps(&Exported::All));
    }

    #[test]
    fn annotation() {
        let mut a = BTreeMap::new();
        assert_eq!(Exported::of_annotation(&a, "x"), Exported::All);
        a.insert(SERVICE_EXPORT_TO.to_string(), ". , y".to_string());
        let e = Exported::of_annotation(&a, "x");
        assert!(e.visible_to(Some("x")) && e.visible_to(Some("y")) && !e.visible_to(Some("z")));
    }
}
