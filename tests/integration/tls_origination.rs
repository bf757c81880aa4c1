//! DestinationRule `tls` (SIMPLE, MUTUAL): the proxy originates TLS to the destination, with
//! the SNI and server verification Istio's settings ask for, and never falls back to plain text.

use std::sync::{Arc, Mutex};

use nodeproxy_tests::http_get;
use nodeproxy_tests::proxy::{self, Scenario, unique_net};
use nodeproxy_tests::tls::{TestCa, https_backend};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn config(net: &str, dir: &std::path::Path, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [api.example]
  addresses: [{net}1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  endpoints: [{{address: {net}11}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api}}
spec:
  host: api.example
  trafficPolicy:
    tls: {tls}
",
        tls = tls.replace("DIR", &dir.display().to_string())
    )
}

/// A fresh address range, a CA, and a directory holding the CA as `ca.pem`.
fn pki() -> (String, TestCa, nodeproxy_tests::proxy::TempDir) {
    let ca = TestCa::new();
    let dir = nodeproxy_tests::proxy::TempDir::new();
    std::fs::write(dir.0.join("ca.pem"), ca.cert_pem()).unwrap();
    (unique_net(), ca, dir)
}

/// Start the proxy on `tls` and GET through it.
async fn start_and_get(net: &str, dir: &std::path::Path, tls: &str) -> (u16, String) {
    let s = Scenario::from_yaml_on(config(net, dir, tls), net.to_string());
    let _p = proxy::start(&s, None).await;
    get(net).await
}

async fn get(net: &str) -> (u16, String) {
    let addr = format!("{net}1:80");
    tokio::task::spawn_blocking(move || http_get(&addr, "/").expect("an answer"))
        .await
        .unwrap()
}

#[tokio::test]
async fn simple_sends_tls_with_the_host_as_sni_and_verifies_the_server() {
    let (net, ca, dir) = pki();
    let seen = https_backend(
        &format!("{net}11:8443"),
        ca.leaf(&["api.example"]),
        None,
        "secret",
    )
    .await;
    let (status, body) =
        start_and_get(&net, &dir.0, "{mode: SIMPLE, caCertificates: DIR/ca.pem}").await;
    assert_eq!((status, body.as_str()), (200, "secret"));
    assert_eq!(
        seen.lock().unwrap().first().cloned(),
        Some((Some("api.example".to_string()), false)),
        "a TLS handshake with the destination host as SNI"
    );
}

#[tokio::test]
async fn a_server_without_the_subject_alt_name_fails_the_request_closed() {
    let (net, ca, dir) = pki();
    let _seen = https_backend(
        &format!("{net}11:8443"),
        ca.leaf(&["api.example"]),
        None,
        "secret",
    )
    .await;
    let (status, body) = start_and_get(&net, &dir.0, "{mode: SIMPLE, caCertificates: DIR/ca.pem, sni: api.example, subjectAltNames: [billing.example]}").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("TLS_error"), "{body}");
}

#[tokio::test]
async fn mutual_presents_the_client_certificate() {
    let (net, ca, dir) = pki();
    let client = ca.leaf(&["client.example"]);
    std::fs::write(dir.0.join("client.pem"), &client.cert_pem).unwrap();
    std::fs::write(dir.0.join("client.key"), &client.key_pem).unwrap();
    let seen = https_backend(
        &format!("{net}11:8443"),
        ca.leaf(&["api.example"]),
        Some(&ca),
        "mtls",
    )
    .await;
    let (status, body) = start_and_get(&net, &dir.0, "{mode: MUTUAL, caCertificates: DIR/ca.pem, clientCertificate: DIR/client.pem, privateKey: DIR/client.key}").await;
    assert_eq!((status, body.as_str()), (200, "mtls"));
    assert_eq!(seen.lock().unwrap().first().map(|s| s.1), Some(true));
}

/// A CA file that cannot be read: the requests fail (503, the reason in the body), nothing
/// reaches the destination in plain text.
#[tokio::test]
async fn an_unreadable_ca_never_falls_back_to_plain_text() {
    let net = unique_net();
    let dir = nodeproxy_tests::proxy::TempDir::new();
    let l = TcpListener::bind(format!("{net}11:8443")).await.unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 256];
            let n = s.read(&mut b).await.unwrap_or(0);
            g.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    let (status, body) = start_and_get(
        &net,
        &dir.0,
        "{mode: SIMPLE, caCertificates: DIR/missing.pem}",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("caCertificates"), "{body}");
    assert!(
        !String::from_utf8_lossy(&got.lock().unwrap()).contains("GET /"),
        "a request reached the destination in plain text"
    );
}

/// Certificate files are read again when they change: a CA rotated on disk is used by the
/// next connection, without a configuration change.
#[tokio::test]
async fn a_rotated_ca_file_is_used_by_the_next_connection() {
    let (net, old_ca, dir) = pki();
    let new_ca = TestCa::new();
    let _seen = https_backend(
        &format!("{net}11:8443"),
        new_ca.leaf(&["api.example"]),
        None,
        "rotated",
    )
    .await;
    let s = Scenario::from_yaml_on(
        config(&net, &dir.0, "{mode: SIMPLE, caCertificates: DIR/ca.pem}"),
        net.clone(),
    );
    let _p = proxy::start(&s, None).await;
    let (status, body) = get(&net).await;
    assert_eq!(status, 503, "the server's CA is not trusted yet: {body}");
    drop(old_ca);
    // A later modification time than the first file's, also on coarse-grained clocks.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    std::fs::write(dir.0.join("ca.pem"), new_ca.cert_pem()).unwrap();
    let (status, body) = get(&net).await;
    assert_eq!((status, body.as_str()), (200, "rotated"));
}

/// A ServiceEntry's `subjectAltNames` are verified when the DestinationRule's TLS names none
/// (Istio's rule for external services), and the rule's own take precedence.
#[tokio::test]
async fn service_entry_subject_alt_names_are_verified() {
    for (sans, tls, ok) in [
        (
            "[billing.example]",
            "{mode: SIMPLE, caCertificates: DIR/ca.pem}",
            false,
        ),
        (
            "[api.example]",
            "{mode: SIMPLE, caCertificates: DIR/ca.pem}",
            true,
        ),
        (
            "[billing.example]",
            "{mode: SIMPLE, caCertificates: DIR/ca.pem, subjectAltNames: [api.example]}",
            true,
        ),
    ] {
        let (net, ca, dir) = pki();
        let _seen = https_backend(
            &format!("{net}11:8443"),
            ca.leaf(&["api.example"]),
            None,
            "secret",
        )
        .await;
        let yaml = config(&net, &dir.0, tls).replace(
            "  endpoints: [",
            &format!("  subjectAltNames: {sans}\n  endpoints: ["),
        );
        let s = Scenario::from_yaml_on(yaml, net.clone());
        let _p = proxy::start(&s, None).await;
        let (status, body) = get(&net).await;
        assert_eq!(status == 200, ok, "{sans} {tls}: {status} {body}");
        if !ok {
            assert!(body.contains("TLS_error"), "{body}");
        }
    }
}

/// `credentialName` on a DestinationRule: the client certificate and key come from
/// `<credentials-dir>/<name>.crt|.key`, the CA from `<name>-cacert.crt` (the files a Gateway's
/// credential uses).
#[tokio::test]
async fn mutual_with_a_credential_name_reads_the_credentials_directory() {
    let (net, ca, dir) = pki();
    let creds = nodeproxy_tests::proxy::TempDir::new();
    ca.write_credential(&creds.0, "billing-client", &["client.example"]);
    std::fs::write(creds.0.join("billing-client-cacert.crt"), ca.cert_pem()).unwrap();
    let seen = https_backend(
        &format!("{net}11:8443"),
        ca.leaf(&["api.example"]),
        Some(&ca),
        "mtls",
    )
    .await;
    let s = Scenario::from_yaml_on(
        config(
            &net,
            &dir.0,
            "{mode: MUTUAL, credentialName: billing-client}",
        ),
        net.clone(),
    );
    let out = nodeproxy_tests::nodeproxy(&["validate", s.path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _p = proxy::start_with(&s, None, creds.0.clone()).await;
    let (status, body) = get(&net).await;
    assert_eq!((status, body.as_str()), (200, "mtls"));
    assert_eq!(seen.lock().unwrap().first().map(|s| s.1), Some(true));
}
