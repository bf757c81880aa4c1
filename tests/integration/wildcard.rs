//! A ServiceEntry with a wildcard host makes each host under it a destination: a
//! VirtualService may route `reviews.eu.bookinfo.example` when only `*.eu.bookinfo.example`
//! is declared, and it is reached at the wildcard entry's endpoints. (Resolving the requested
//! host itself, DNS without endpoints, is the e2e test `wildcard`: it needs its own
//! /etc/hosts.)

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::get_from;
use nodeproxy_tests::proxy::{self, Scenario, unique_net};

#[tokio::test]
async fn a_host_under_a_wildcard_service_entry_is_a_destination() {
    let net = unique_net();
    let _eu = Backend::start(&format!("{net}21:8080"), "eu").await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: eu}}
spec:
  hosts: ['*.eu.bookinfo.example']
  addresses: [{net}1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: {net}21}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-eu}}
spec:
  hosts: [reviews.eu.bookinfo.example]
  http:
  - route: [{{destination: {{host: reviews.eu.bookinfo.example}}}}]
    headers: {{response: {{set: {{x-route: reviews-eu}}}}}}
"
    );
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let file = s.path.to_str().unwrap();
    let out = nodeproxy_tests::nodeproxy(&["validate", file]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a destination under a wildcard validates: {text}"
    );
    let out = nodeproxy_tests::nodeproxy(&[
        "simulate",
        file,
        "--host",
        "reviews.eu.bookinfo.example",
        "--port",
        "80",
        "--address",
        &format!("{net}1"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("outbound|80||reviews.eu.bookinfo.example"),
        "{text}"
    );
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:80");
    let r = get_from(None, &vip, "reviews.eu.bookinfo.example", "/")
        .await
        .expect("an answer");
    assert_eq!((r.status, r.body.as_str()), (200, "eu"), "{r:?}");
    assert!(
        r.head.contains("x-route: reviews-eu"),
        "the VirtualService's route: {r:?}"
    );
    // Another host under the wildcard: the wildcard entry's own route, no VirtualService.
    let r = get_from(None, &vip, "ratings.eu.bookinfo.example", "/")
        .await
        .expect("an answer");
    assert_eq!((r.status, r.body.as_str()), (200, "eu"), "{r:?}");
    assert!(!r.head.contains("x-route"), "{r:?}");
}
