use std::path::Path;

use super::*;

pub(crate) fn snapshot(yaml: &str) -> Snapshot {
    let mut set = ConfigSet::default();
    let mut diags = Vec::new();
    set.load_str(Path::new("t.yaml"), yaml, &mut diags);
    assert!(!crate::diagnostic::has_errors(&diags), "{diags:#?}");
    compile(&set).expect("compiles")
}

use proptest::prelude::*;

const SE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [127.0.60.1]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints:
  - {address: 127.0.60.11, labels: {version: v1}}
  - {address: 127.0.60.12, labels: {version: v2}}
  - {address: 127.0.60.13, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
";

fn rules_for<'s>(snap: &'s Snapshot, authority: &str) -> &'s [HttpRule] {
    let table = snap.mesh_http_table(80).expect("port 80 table");
    &table.vhosts[table.vhost(authority).expect("vhost")].rules
}

fn view<'a>(path: &'a str, headers: &'a http::HeaderMap, src: &'a SourceInfo) -> RequestView<'a> {
    RequestView {
        method: "GET",
        scheme: "http",
        authority: "reviews",
        path_and_query: path,
        headers,
        source: src,
    }
}

#[test]
fn listeners_and_vhosts_are_found_by_address_and_host() {
    let snap = snapshot(SE);
    let l = snap
        .mesh_listener("127.0.60.1:80".parse().unwrap())
        .expect("listener");
    assert_eq!(l.protocol, Protocol::Http);
    let table = &snap.http_tables[l.http.unwrap()];
    for host in [
        "reviews.default.svc.cluster.local",
        "REVIEWS.default.svc.cluster.local:80",
        "127.0.60.1:80",
    ] {
        assert_eq!(table.vhost(host), l.fallback_vhost, "{host}");
    }
    assert_eq!(table.vhost("other"), None);
    let c = snap
        .cluster(&ClusterKey {
            host: "reviews.default.svc.cluster.local".into(),
            subset: Some("v2".into()),
            port: 80,
            scope: None,
        })
        .unwrap();
    assert_eq!(snap.clusters[c].endpoints.len(), 1);
    assert_eq!(snap.clusters[c].endpoints[0].port, 8080);
    assert_eq!(
        snap.clusters[c].name,
        "outbound|80|v2|reviews.default.svc.cluster.local"
    );
    // No VirtualService: the default route with Istio's default retry policy and no timeout.
    let rules = rules_for(&snap, "reviews");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].retry.num_retries, 2);
    assert_eq!(rules[0].timeout, None);
}

#[test]
fn undefined_subset_compiles_to_a_missing_cluster() {
    let snap = snapshot(&format!(
        "{SE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  tcp:\n  - route: [{{destination: {{host: reviews, subset: v9}}}}]\n"
    ));
    let l = snap
        .mesh_listener("127.0.60.1:80".parse().unwrap())
        .unwrap();
    assert!(
        matches!(l.tcp[0].route.clusters[0].cluster, ClusterRef::Missing(ref n) if n == "outbound|80|v9|reviews.default.svc.cluster.local")
    );
}

#[test]
fn header_ops_host_becomes_authority_rewrite() {
    let snap = snapshot(&format!(
        "{SE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - headers:\n      request:\n        set: {{host: upstream.example, x-a: b}}\n        remove: [host, x-c]\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    let rules = rules_for(&snap, "reviews");
    let h = &rules[0].headers;
    assert_eq!(h.authority().map(String::as_str), Some("upstream.example"));
    assert_eq!(h.get().request.set.len(), 1);
    assert_eq!(
        h.get().request.remove,
        vec![http::HeaderName::from_static("x-c")]
    );
    let mut map = http::HeaderMap::new();
    map.insert("x-c", http::HeaderValue::from_static("1"));
    h.apply_request(&mut map);
    assert_eq!(map.get("x-a").unwrap(), "b");
    assert!(map.get("x-c").is_none());
}

#[test]
fn rules_without_header_mutations_hold_none_and_dump_as_before() {
    let snap = snapshot(&format!(
        "{SE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - headers: {{request: {{set: {{}}}}}}\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    let rules = rules_for(&snap, "reviews");
    assert_eq!(rules[0].headers, HeaderRules::default());
    let HttpAction::Route(w) = &rules[0].action else {
        panic!("route action expected");
    };
    assert_eq!(w.clusters[0].headers, HeaderRules::default());
    assert_eq!(w.clusters.capacity(), 1, "no spare room kept per rule");
    assert_eq!(
        serde_json::to_value(&rules[0].headers).unwrap(),
        serde_json::json!({"request": {}, "response": {}})
    );
}

fn weights_yaml(weights: &[u32]) -> String {
    let dests: String = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "    - {{destination: {{host: reviews, subset: v{}}}, weight: {w}}}\n",
                i % 3 + 1
            )
        })
        .collect();
    format!(
        "{SE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n{dests}"
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random weights compile to a split whose probabilities are the normalized weights
    /// (0-weight destinations vanish; a single destination gets everything).
    #[test]
    fn weights_compile_to_normalized_probabilities(weights in prop::collection::vec(0u32..1000, 1..6)) {
        prop_assume!(weights.len() == 1 || weights.iter().any(|w| *w > 0));
        let snap = snapshot(&weights_yaml(&weights));
        let HttpAction::Route(wc) = &rules_for(&snap, "reviews")[0].action else { panic!("route") };
        let probs: Vec<f64> = wc.probabilities().into_iter().map(|(_, p)| p).collect();
        let expected: Vec<f64> = if weights.len() == 1 {
            vec![1.0]
        } else {
            let total: u32 = weights.iter().sum();
            weights.iter().filter(|w| **w > 0).map(|w| *w as f64 / total as f64).collect()
        };
        prop_assert_eq!(probs.len(), expected.len());
        for (p, e) in probs.iter().zip(&expected) {
            prop_assert!((p - e).abs() < 1e-12);
        }
        // pick() realizes exactly these shares over the whole draw range.
        let mut counts = vec![0u64; wc.clusters.len()];
        for r in 0..wc.total {
            let c = wc.pick(r);
            let i = wc.clusters.iter().position(|x| std::ptr::eq(x, c)).unwrap();
            counts[i] += 1;
        }
        for (c, w) in counts.iter().zip(&wc.clusters) {
            prop_assert_eq!(*c, w.weight as u64);
        }
    }

    /// Rules are evaluated in order and the first matching one wins, whatever matches later.
    #[test]
    fn first_match_wins(prefixes in prop::collection::vec(prop::sample::select(vec!["/", "/a", "/a/b", "/b", "/a/b/c"]), 1..6), path in prop::sample::select(vec!["/", "/a", "/a/b", "/a/b/c/d", "/b/x", "/c"])) {
        let rules: String = prefixes
            .iter()
            .map(|p| format!("  - match: [{{uri: {{prefix: \"{p}\"}}}}]\n    route: [{{destination: {{host: reviews, subset: v1}}}}]\n"))
            .collect();
        let yaml = format!("{SE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n{rules}");
        let snap = snapshot(&yaml);
        let headers = http::HeaderMap::new();
        let src = SourceInfo::default();
        let got = match_http(rules_for(&snap, "reviews"), &view(path, &headers, &src));
        let expected = prefixes.iter().position(|p| path.starts_with(p));
        match expected {
            Some(i) => prop_assert_eq!(got, RuleMatch::Matched { rule: i, block: Some(0) }),
            None => prop_assert_eq!(got, RuleMatch::NoMatch),
        }
    }
}

/// The DestinationRule of a client's own namespace comes first on the lookup path; other
/// clients get the service namespace's. Run-time state stays apart only where policy differs.
#[test]
fn destination_rule_lookup_path_by_client_namespace() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews.prod.svc.cluster.local]
  addresses: [127.0.61.1]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.61.11}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: prod}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: client}
spec:
  host: reviews.prod.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: c, namespace: client}
spec: {address: 127.0.61.50}
";
    let snap = snapshot(yaml);
    let algo = |s: &Snapshot| s.clusters[0].policy.lb.algorithm.clone();
    assert_eq!(
        algo(&snap),
        policy::LbAlgorithm::Random,
        "service namespace's rule"
    );
    let mine = snap.for_client("127.0.61.50".parse().unwrap());
    assert_eq!(
        algo(mine),
        policy::LbAlgorithm::RoundRobin,
        "the client's own"
    );
    assert_eq!(mine.clusters[0].key.scope.as_deref(), Some("client"));
    let other = snap.for_client("127.0.61.99".parse().unwrap());
    assert!(std::ptr::eq(other, &snap));
    assert_eq!(snap.scoped.len(), 1);
}

/// Without restricted exports and contested rules there is one scope: nothing is copied.
#[test]
fn one_scope_without_export_to() {
    let snap = snapshot(SE);
    assert!(snap.scoped.is_empty());
}
