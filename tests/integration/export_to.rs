//! `exportTo`: a VirtualService, DestinationRule or ServiceEntry exported to some namespaces
//! only applies to clients of those namespaces. Clients are told apart by source address:
//! WorkloadEntries give `{net}11` namespace team1 and `{net}12` team2; `{net}13` is no known
//! workload (it sees only what is exported to every namespace).

use std::collections::BTreeMap;
use std::time::Duration;

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::eventually_async;
use nodeproxy_tests::proxy::{self, Scenario, unique_net};

/// GET `/` from source address `src`: (status, body).
async fn get_from(src: &str, dst: &str, host: &str) -> Option<(u16, String)> {
    nodeproxy_tests::get_from(Some(src), dst, host, "/")
        .await
        .map(|r| (r.status, r.body))
}

fn clients(net: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: team1}}
spec: {{address: {net}11, labels: {{app: client}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: team2}}
spec: {{address: {net}12, labels: {{app: client}}}}
"
    )
}

/// Bodies of `n` requests from `src`, counted.
async fn tally(src: &str, dst: &str, host: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get_from(src, dst, host).await.expect("an answer");
        assert_eq!(status, 200, "from {src}: {body}");
        *out.entry(body).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn each_team_routes_a_shared_service_by_its_own_private_rules() {
    let net = unique_net();
    let _v1 = Backend::start(&format!("{net}21:8080"), "v1").await;
    let _v2 = Backend::start(&format!("{net}22:8080"), "v2").await;
    let mut yaml = clients(&net);
    yaml += &format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: shared}}
spec:
  hosts: [ratings.shared.example]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints:
  - {{address: {net}21, labels: {{version: v1}}}}
  - {{address: {net}22, labels: {{version: v2}}}}
"
    );
    for (team, version) in [("team1", "v1"), ("team2", "v2")] {
        yaml += &format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings, namespace: {team}}}
spec:
  host: ratings.shared.example
  exportTo: [.]
  subsets: [{{name: {version}, labels: {{version: {version}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: {team}}}
spec:
  hosts: [ratings.shared.example]
  exportTo: [.]
  http:
  - route: [{{destination: {{host: ratings.shared.example, subset: {version}}}}}]
"
        );
    }
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let check = nodeproxy_tests::nodeproxy(&["validate", s.path.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "two teams' private rules for one host validate: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // simulate and routes show what each namespace sees.
    for (ns, cluster) in [
        (Some("team1"), "outbound|80|v1|ratings.shared.example"),
        (Some("team2"), "outbound|80|v2|ratings.shared.example"),
        (None, "outbound|80||ratings.shared.example"),
    ] {
        let file = s.path.to_str().unwrap();
        let mut args = vec![
            "simulate",
            file,
            "--host",
            "ratings.shared.example",
            "--port",
            "80",
        ];
        args.extend(ns.map(|n| ["--source-namespace", n]).into_iter().flatten());
        let out = nodeproxy_tests::nodeproxy(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(cluster), "{ns:?}: {text}");
        let mut args = vec!["routes", file];
        args.extend(ns.map(|n| ["--source-namespace", n]).into_iter().flatten());
        let out = nodeproxy_tests::nodeproxy(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(cluster), "{ns:?}: {text}");
    }
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:80");
    let host = "ratings.shared.example";
    let t1 = tally(&format!("{net}11"), &vip, host, 8).await;
    assert_eq!(t1, BTreeMap::from([("v1".to_string(), 8)]), "team1");
    let t2 = tally(&format!("{net}12"), &vip, host, 8).await;
    assert_eq!(t2, BTreeMap::from([("v2".to_string(), 8)]), "team2");
    // Anyone else sees neither team's rules: the service's own endpoints, both of them.
    let other = tally(&format!("{net}13"), &vip, host, 8).await;
    assert_eq!(
        other.len(),
        2,
        "an unknown client is balanced over both: {other:?}"
    );
}

#[tokio::test]
async fn each_team_reaches_its_own_service_of_the_same_name() {
    let net = unique_net();
    let _a = Backend::start(&format!("{net}21:8080"), "team1-ratings").await;
    let _b = Backend::start(&format!("{net}22:8080"), "team2-ratings").await;
    let mut yaml = clients(&net);
    for (team, ep) in [("team1", 21), ("team2", 22)] {
        yaml += &format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: {team}}}
spec:
  hosts: [ratings.example.com]
  addresses: [{net}1]
  exportTo: [.]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: {net}{ep}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: {team}}}
spec:
  hosts: [ratings.example.com]
  exportTo: [.]
  http:
  - route: [{{destination: {{host: ratings.example.com}}}}]
    timeout: 5s
"
        );
    }
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let check = nodeproxy_tests::nodeproxy(&["validate", s.path.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:80");
    let host = "ratings.example.com";
    let src1 = format!("{net}11");
    eventually_async(Duration::from_secs(5), || get_from(&src1, &vip, host)).await;
    let t1 = tally(&src1, &vip, host, 4).await;
    assert_eq!(t1, BTreeMap::from([("team1-ratings".to_string(), 4)]));
    let t2 = tally(&format!("{net}12"), &vip, host, 4).await;
    assert_eq!(t2, BTreeMap::from([("team2-ratings".to_string(), 4)]));
    // A client of no team: the service does not exist for it.
    let other = get_from(&format!("{net}13"), &vip, host).await;
    assert!(
        other.as_ref().is_none_or(|(s, _)| *s == 404),
        "not routed for an unknown client: {other:?}"
    );
}

#[tokio::test]
async fn overlapping_exports_of_one_host_conflict_and_disjoint_ones_do_not() {
    let vs = |ns: &str, export: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: r, namespace: {ns}}}
spec:
  hosts: [ratings.example.com]
  exportTo: {export}
  http: [{{route: [{{destination: {{host: ratings.example.com}}}}]}}]
"
        )
    };
    let se = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shared}
spec:
  hosts: [ratings.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
";
    for (yaml, conflict) in [
        (format!("{se}{}{}", vs("a", "[.]"), vs("b", "[.]")), false),
        (format!("{se}{}{}", vs("a", "[.]"), vs("b", "[a]")), true),
        (format!("{se}{}{}", vs("a", "[.]"), vs("b", "['*']")), true),
        (format!("{se}{}{}", vs("a", "[b, c]"), vs("b", "[.]")), true),
        (format!("{se}{}{}", vs("a", "[c]"), vs("b", "[d]")), false),
    ] {
        let s = Scenario::from_yaml_on(yaml, unique_net());
        let out = nodeproxy_tests::nodeproxy(&["validate", s.path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(text.contains("IST0109"), conflict, "{}\n{text}", s.yaml);
        assert_eq!(out.status.success(), !conflict, "{text}");
    }
}

/// A gateway is a client of its Gateways' namespace: a VirtualService bound to it applies
/// only when exported to that namespace.
#[tokio::test]
async fn a_gateway_sees_what_is_exported_to_its_namespace() {
    let net = unique_net();
    let _b = Backend::start(&format!("{net}21:8080"), "shop").await;
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop, namespace: shop}}
spec:
  hosts: [shop.example.com]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: {net}21}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: ingress}}
spec:
  servers:
  - port: {{number: 18080, name: http, protocol: HTTP}}
    hosts: ['*/*.example.com']
"
    );
    for (name, host, export) in [
        ("visible", "a.example.com", "[ingress]"),
        ("hidden", "b.example.com", "[.]"),
    ] {
        yaml += &format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  gateways: [ingress/gw]
  exportTo: {export}
  http: [{{route: [{{destination: {{host: shop.example.com}}}}]}}]
"
        );
    }
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let gw_ip = s.ip(100);
    let _p = proxy::start(&s, Some(&gw_ip)).await;
    let gw = format!("{gw_ip}:18080");
    let r = eventually_async(Duration::from_secs(5), || {
        nodeproxy_tests::get_from(None, &gw, "a.example.com", "/")
    })
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "shop"), "{r:?}");
    let r = nodeproxy_tests::get_from(None, &gw, "b.example.com", "/")
        .await
        .expect("an answer");
    assert_eq!(
        r.status, 404,
        "not exported to the gateway's namespace: {r:?}"
    );
}
