//! Istio's egress TLS origination task, its YAML as the task gives it: a ServiceEntry for
//! `edition.cnn.com` (no addresses, DNS; port 80 sent to 443) and a DestinationRule with
//! `tls: {mode: SIMPLE}` on port 80. A pod's plain `GET http://edition.cnn.com/politics`
//! leaves the proxy as TLS to port 443 with the host as SNI, verified against the system CA
//! bundle. The external server is a pod; the proxy runs in a mount namespace whose
//! /etc/hosts names it and whose system bundle trusts the test CA.
//!
//! A service without addresses is identified by its port, so every connect of an enrolled
//! pod to port 80 reaches the proxy: a Host no service claims goes to the original
//! destination (allow_any), as with Istio's sidecars.

use std::path::Path;
use std::time::Duration;

use nodeproxy::test_util::require_root;
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::eventually;
use nodeproxy_tests::node::Node;
use nodeproxy_tests::proxy::TempDir;
use nodeproxy_tests::tls::{TestCa, https_serve};

use super::SERIAL;
use super::capture::{ADMIN, blocking};

const TUTORIAL: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: edition-cnn-com
spec:
  hosts:
  - edition.cnn.com
  ports:
  - number: 80
    name: http-port
    protocol: HTTP
    targetPort: 443
  - number: 443
    name: https-port
    protocol: HTTPS
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: edition-cnn-com
spec:
  host: edition.cnn.com
  trafficPolicy:
    portLevelSettings:
    - port:
        number: 80
      tls:
        mode: SIMPLE # initiates HTTPS when accessing edition.cnn.com
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_egress_tls_origination_task_works_end_to_end() {
    if !require_root("the_egress_tls_origination_task_works_end_to_end") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut node = Node::new("egress");
    let client = node.add_pod("client");
    let cnn = node.add_pod("cnn");
    let web = node.add_pod("web");
    let ca = TestCa::new();
    let seen = https_serve(
        tokio::net::TcpListener::from_std(node.pods[cnn].listen(443)).unwrap(),
        ca.leaf(&["edition.cnn.com"]),
        None,
        "cnn",
    );
    let _web = Backend::from_std(node.pods[web].listen(80), "web");
    let dir = TempDir::new();
    let cfg = dir.0.join("egress.yaml");
    std::fs::write(&cfg, TUTORIAL).unwrap();
    let hosts = dir.0.join("hosts");
    let cnn_ip = node.pods[cnn].ip;
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{cnn_ip} edition.cnn.com\n"),
    )
    .unwrap();
    let bundle = dir.0.join("ca-certificates.crt");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let capture = format!("{}:15001", node.ip());
    let script = format!(
        "mount --bind {hosts} /etc/hosts && mount --bind {bundle} /etc/ssl/certs/ca-certificates.crt && exec {bin} run --capture ebpf --capture-listen {capture} --admin {ADMIN} --config {cfg} --enroll-netns {pod}",
        hosts = hosts.display(),
        bundle = bundle.display(),
        bin = nodeproxy_tests::nodeproxy_bin().display(),
        cfg = cfg.display(),
        pod = node.pods[client].path().display(),
    );
    let _proxy = node.spawn_proxy_bin(
        Path::new("unshare"),
        &["--mount", "--propagation", "private", "sh", "-c", &script],
    );
    eventually("proxy ready", Duration::from_secs(30), || {
        node.http_get(ADMIN, "/ready").filter(|(s, _)| *s == 200)
    });
    let node = std::sync::Arc::new(node);
    // The pod resolved edition.cnn.com to the server and sends plain HTTP to port 80, where
    // the server does not even listen: only the proxy's TLS to 443 can answer.
    let n = node.clone();
    let (status, body) = blocking(move || {
        n.pods[client].http_get(
            std::net::SocketAddr::new(cnn_ip.into(), 80),
            "/politics",
            &[("Host", "edition.cnn.com")],
        )
    })
    .await
    .expect("an answer");
    assert_eq!((status, body.as_str()), (200, "cnn"));
    assert_eq!(
        seen.lock().unwrap().first().cloned(),
        Some((Some("edition.cnn.com".to_string()), false)),
        "TLS with the host as SNI"
    );
    // Another pod's port 80, a Host nobody declares: to the original destination.
    let web_ip = node.pods[web].ip;
    let n = node.clone();
    let (status, body) = blocking(move || {
        n.pods[client].http_get(std::net::SocketAddr::new(web_ip.into(), 80), "/", &[])
    })
    .await
    .expect("an answer");
    assert_eq!((status, body.as_str()), (200, "web"));
    let (_, kernel) = node.http_get(ADMIN, "/kernel").expect("kernel");
    assert!(
        kernel.contains("0.0.0.0:80"),
        "the port-only entry: {kernel}"
    );
}
