//! VirtualService delegation: a root VirtualService hands a path of its host to a delegate
//! VirtualService of another team's namespace; requests route by the delegate's rules, merged
//! under the root rule's match, and `validate`, `routes` and `simulate` show the merge.

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::get_from;
use nodeproxy_tests::proxy::{self, Scenario, unique_net};

fn config(net: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints:
  - {{address: {net}21, labels: {{version: v1}}}}
  - {{address: {net}22, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  host: reviews
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - name: api
    match: [{{uri: {{prefix: /api}}}}]
    delegate: {{name: reviews-api, namespace: team}}
    headers: {{response: {{set: {{x-root: api}}}}}}
  - route: [{{destination: {{host: reviews, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-api, namespace: team}}
spec:
  http:
  - name: v2
    match: [{{uri: {{prefix: /api/v2}}}}]
    route: [{{destination: {{host: reviews.bookinfo.svc.cluster.local, subset: v2}}}}]
  - name: web
    match: [{{uri: {{prefix: /web}}}}]
    route: [{{destination: {{host: reviews.bookinfo.svc.cluster.local, subset: v2}}}}]
  - route: [{{destination: {{host: reviews.bookinfo.svc.cluster.local, subset: v1}}}}]
    headers: {{response: {{set: {{x-team: api}}}}}}
"
    )
}

#[tokio::test]
async fn a_delegated_path_routes_by_the_delegates_rules() {
    let net = unique_net();
    let _v1 = Backend::start(&format!("{net}21:8080"), "v1").await;
    let _v2 = Backend::start(&format!("{net}22:8080"), "v2").await;
    let s = Scenario::from_yaml_on(config(&net), net.clone());
    let file = s.path.to_str().unwrap();

    // Validates; the delegate rule outside the root's `/api` is reported and left out.
    let out = nodeproxy_tests::nodeproxy(&["validate", file]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("NP1004") && text.contains("rule 1"), "{text}");

    // simulate shows the merged rule and its name.
    let out = nodeproxy_tests::nodeproxy(&[
        "simulate",
        file,
        "--host",
        "reviews.bookinfo.svc.cluster.local",
        "--port",
        "80",
        "--path",
        "/api/v2/ratings",
        "-o",
        "json",
    ]);
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(sim["rule"]["name"], "api-v2", "{sim:#}");
    assert!(sim["outcome"].as_str().unwrap().contains("|v2|"), "{sim:#}");
    let out = nodeproxy_tests::nodeproxy(&["routes", file]);
    let routes = String::from_utf8_lossy(&out.stdout);
    let delegated: Vec<&str> = routes
        .lines()
        .filter(|l| {
            l.trim_end()
                .ends_with("VirtualService/bookinfo/reviews < team/reviews-api")
        })
        .collect();
    assert_eq!(
        delegated.len(),
        2,
        "the delegate's two rules under /api: {routes}"
    );
    assert!(
        delegated[0].contains("uri^/api/v2") && delegated[1].contains("uri^/api "),
        "{routes}"
    );

    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:80");
    let host = "reviews.bookinfo.svc.cluster.local";
    let get = |path: &'static str| {
        let vip = vip.clone();
        async move { get_from(None, &vip, host, path).await.expect("an answer") }
    };
    // The delegate's first rule: its own match, the root's response header inherited.
    let r = get("/api/v2/ratings").await;
    assert_eq!((r.status, r.body.as_str()), (200, "v2"), "{r:?}");
    assert!(r.head.contains("x-root: api"), "{r:?}");
    // The delegate's catch-all, under the root's /api: its own headers, not the root's.
    let r = get("/api/v1").await;
    assert_eq!(r.body, "v1");
    assert!(
        r.head.contains("x-team: api") && !r.head.contains("x-root"),
        "{r:?}"
    );
    // Outside /api the root's own rule; the dropped /web rule never applies.
    let r = get("/web/x").await;
    assert_eq!(r.body, "v1");
    assert!(
        !r.head.contains("x-team") && !r.head.contains("x-root"),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_delegate_not_exported_to_the_root_namespace_is_left_out() {
    let net = unique_net();
    let yaml = config(&net).replace(
        "metadata: {name: reviews-api, namespace: team}\nspec:\n",
        "metadata: {name: reviews-api, namespace: team}\nspec:\n  exportTo: [.]\n",
    );
    let s = Scenario::from_yaml_on(yaml, net);
    let out = nodeproxy_tests::nodeproxy(&["validate", s.path.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("not exported to namespace bookinfo"),
        "{text}"
    );
    let out = nodeproxy_tests::nodeproxy(&[
        "simulate",
        s.path.to_str().unwrap(),
        "--host",
        "reviews.bookinfo.svc.cluster.local",
        "--port",
        "80",
        "--path",
        "/api/v2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("|v1|"), "the root's own rule: {text}");
}
