//! A wildcard ServiceEntry with DNS resolution and no endpoints resolves each request's own
//! host (Host, or SNI for TLS ports), never the pattern, and only hosts under the wildcard.
//! The proxy runs in a mount namespace of its own whose /etc/hosts names the test backends:
//! root.

use std::process::{Command, Stdio};
use std::time::Duration;

use nodeproxy::test_util::require_root;
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{TempDir, unique_net};
use nodeproxy_tests::{ChildGuard, eventually_async, get_from, nodeproxy_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_dns_entry_resolves_the_requested_host() {
    if !require_root("a_wildcard_dns_entry_resolves_the_requested_host") {
        return;
    }
    let net = unique_net();
    let _a = Backend::start(&format!("{net}21:8080"), "reviews").await;
    let _b = Backend::start(&format!("{net}22:8080"), "ratings").await;
    let dir = TempDir::new();
    let hosts = dir.0.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n{net}21 reviews.eu.bookinfo.example\n{net}22 ratings.eu.bookinfo.example\n{net}22 other.example\n"
        ),
    )
    .unwrap();
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: eu}}
spec:
  hosts: ['*.eu.bookinfo.example']
  addresses: [{net}1]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
"
        ),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec {} run --capture none --config {} --admin 127.0.0.1:0",
        hosts.display(),
        nodeproxy_bin().display(),
        config.display()
    );
    let _proxy = ChildGuard(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the proxy"),
    );
    let vip = format!("{net}1:80");
    let get = |host: &'static str| {
        let vip = vip.clone();
        async move { get_from(None, &vip, host, "/").await }
    };
    let r = eventually_async(Duration::from_secs(10), || {
        get("reviews.eu.bookinfo.example")
    })
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "reviews"), "{r:?}");
    let r = get("ratings.eu.bookinfo.example").await.expect("an answer");
    assert_eq!((r.status, r.body.as_str()), (200, "ratings"), "{r:?}");
    // A Host outside the wildcard, sent to the entry's address, is not resolved (it would
    // let a client make the proxy dial any name); and the test process itself cannot resolve
    // these names: the proxy's /etc/hosts did.
    let r = get("other.example").await.expect("an answer");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("`other.example` is not under"), "{r:?}");
    assert!(
        tokio::net::lookup_host("reviews.eu.bookinfo.example:80")
            .await
            .is_err()
    );
}
