//! TCP routes, TLS SNI routes and Gateway TLS termination, with real TLS clients and servers.

use std::time::Duration;

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{self, Scenario, unique_net};
use nodeproxy_tests::tls::{TestCa, tcp_backend, tcp_read, tls_backend, tls_exchange};

fn registry(net: &str, name: &str, port: u16, protocol: &str, target: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.example]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: p, protocol: {protocol}, targetPort: {target}}}]
  endpoints:
  - {{address: {net}11, labels: {{version: v1}}}}
  - {{address: {net}12, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {name}.example
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
"
    )
}

#[tokio::test]
async fn tcp_route_weights_per_connection() {
    let net = unique_net();
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db}}
spec:
  hosts: [db.example]
  tcp:
  - route:
    - {{destination: {{host: db.example, subset: v1}}, weight: 75}}
    - {{destination: {{host: db.example, subset: v2}}, weight: 25}}
",
        registry(&net, "db", 10090, "TCP", 9000)
    );
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let _a = tcp_backend(&format!("{net}11:9000"), "v1").await;
    let _b = tcp_backend(&format!("{net}12:9000"), "v2").await;
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:10090");
    let n = 400u64;
    let mut v2 = 0;
    for _ in 0..n {
        let got = tcp_read(&vip).await.expect("connection");
        assert!(got == "v1" || got == "v2", "{got:?}");
        if got == "v2" {
            v2 += 1;
        }
    }
    let sd = (n as f64 * 0.25 * 0.75).sqrt();
    assert!(
        (v2 as f64 - n as f64 * 0.25).abs() <= 3.29 * sd + 1.0,
        "v2 {v2}/{n}"
    );
}

#[tokio::test]
async fn tls_routes_by_sni_without_terminating() {
    let net = unique_net();
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web.example, \"*.web.example\"]
  tls:
  - match: [{{sniHosts: [a.web.example]}}]
    route: [{{destination: {{host: web.example, subset: v1}}}}]
  - match: [{{sniHosts: [b.web.example]}}]
    route: [{{destination: {{host: web.example, subset: v2}}}}]
",
        registry(&net, "web", 10443, "TLS", 8443)
    );
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let ca = TestCa::new();
    let _a = tls_backend(
        &format!("{net}11:8443"),
        ca.leaf(&["a.web.example"]),
        "backend-a",
    )
    .await;
    let _b = tls_backend(
        &format!("{net}12:8443"),
        ca.leaf(&["b.web.example"]),
        "backend-b",
    )
    .await;
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:10443").parse().unwrap();
    let cfg = ca.client_config();
    for _ in 0..5 {
        assert_eq!(
            tls_exchange(cfg.clone(), vip, "a.web.example", b"")
                .await
                .expect("tls to a"),
            "backend-a"
        );
        assert_eq!(
            tls_exchange(cfg.clone(), vip, "b.web.example", b"")
                .await
                .expect("tls to b"),
            "backend-b"
        );
    }
    // An SNI no rule matches: the connection is closed (NR).
    assert!(tls_exchange(cfg, vip, "c.web.example", b"").await.is_err());
}

#[tokio::test]
async fn gateway_terminates_https_with_credential_name() {
    let s = Scenario::from_config("gateway.yaml");
    let yaml = s.yaml.replace(
        "  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: [\"bookinfo.example.com\"]\n",
        "  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: [\"bookinfo.example.com\"]\n    tls: {httpsRedirect: true}\n  - port: {number: 8443, name: https, protocol: HTTPS}\n    hosts: [\"bookinfo.example.com\"]\n    tls: {mode: SIMPLE, credentialName: bookinfo-cert}\n",
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let ca = TestCa::new();
    let creds = s.path.parent().unwrap().to_path_buf();
    ca.write_credential(&creds, "bookinfo-cert", &["bookinfo.example.com"]);
    let _v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let gw_ip = s.ip(100);
    let _p = proxy::start_with(&s, Some(&gw_ip), creds).await;
    let addr = format!("{gw_ip}:8443").parse().unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = tls_exchange(
        ca.client_config(),
        addr,
        "bookinfo.example.com",
        b"GET /productpage HTTP/1.1\r\nHost: bookinfo.example.com\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("https");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("v1"), "{resp}");
    // The plain-text server redirects to https.
    let r = proxy::get(
        &proxy::client(),
        &format!("{gw_ip}:8080"),
        "/productpage?x=1",
        &[("host", "bookinfo.example.com")],
    )
    .await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        "https://bookinfo.example.com/productpage?x=1"
    );
}
