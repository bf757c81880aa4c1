//! `nodeproxy run --source kubernetes` on a netns node: the real binary, eBPF capture, and the
//! Kubernetes source reading a scripted list/watch server (there is no real API server in this
//! build environment; `nodeproxy_tests::apiserver` speaks the protocol, bound inside the node's
//! namespace so the proxy reaches it on 127.0.0.1 through a kubeconfig). The API objects are
//! `tests/fixtures/kubernetes/cluster.json` moved onto this node's addresses. A pod here is a
//! network namespace plus a process in a cgroup named as the kubelet names a pod's
//! (`kubepods-besteffort-pod<uid>.slice`): the proxy finds the namespace from /proc by the
//! pod's uid and checks that it holds the pod's IP, as it does on a real node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use nodeproxy::test_util::require_root;
use nodeproxy_tests::apiserver::FakeApiServer;
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::eventually;
use nodeproxy_tests::node::{Node, Pod, in_netns};
use nodeproxy_tests::proxy::TempDir;
use serde_json::Value;

use super::SERIAL;

const ADMIN: &str = "127.0.0.1:15000";
const NODE_NAME: &str = "kind-worker";
const FRONTEND_UID: &str = "7e1f0000-0004-4b2c-9d3e-000000000014";
const PLAIN_UID: &str = "7e1f0000-0008-4b2c-9d3e-000000000018";

/// A pod's "sandbox": a process inside its namespace, in a kubelet-style pod cgroup.
struct Sandbox {
    child: Child,
    cgroup: PathBuf,
}

impl Sandbox {
    fn start(pod: &Pod, uid: &str, root: &std::path::Path) -> Sandbox {
        let cgroup = root.join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", pod.path().display()))
            .args(["sleep", "600"])
            .spawn()
            .expect("sandbox process");
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .expect("move the sandbox into its pod cgroup");
        Sandbox { child, cgroup }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The fixture with its addresses replaced by this node's.
fn objects(replace: &[(&str, String)]) -> Vec<Value> {
    let mut text = std::fs::read_to_string(nodeproxy_tests::repo_path(
        "tests/fixtures/kubernetes/cluster.json",
    ))
    .expect("fixture");
    for (from, to) in replace {
        text = text.replace(&format!("\"{from}\""), &format!("\"{to}\""));
    }
    text = text.replace("\"port\": 5678", "\"port\": 8080");
    serde_json::from_str(&text).expect("fixture json")
}

fn find(objs: &[Value], kind: &str, name: &str) -> Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .expect("object")
        .clone()
}

fn enrolled(node: &Node) -> Vec<String> {
    let (s, body) = node.http_get(ADMIN, "/kernel").expect("admin /kernel");
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("kernel json");
    v["enrolled"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_source_enrolls_ambient_pods_and_routes_their_traffic() {
    if !require_root("kubernetes_source_enrolls_ambient_pods_and_routes_their_traffic") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut node = Node::new("k8s");
    let frontend = node.add_pod("fe");
    let plain = node.add_pod("plain");
    let v1 = node.add_pod("v1");
    let v2 = node.add_pod("v2");
    let _backends = [
        Backend::from_std(node.pods[v1].listen(8080), "v1"),
        Backend::from_std(node.pods[v2].listen(8080), "v2"),
    ];
    let vip = node.vip(1);
    let objs = objects(&[
        ("10.96.12.34", vip.to_string()),
        ("10.244.1.11", node.pods[v1].ip.to_string()),
        ("10.244.1.12", node.pods[v2].ip.to_string()),
        ("10.244.1.14", node.pods[frontend].ip.to_string()),
        ("10.244.1.18", node.pods[plain].ip.to_string()),
    ]);
    let cgroups = nodeproxy::dataplane::cgroup2_root()
        .expect("cgroup v2")
        .join(format!("nodeproxy-e2e-{}.slice", std::process::id()));
    let sandboxes = [
        Sandbox::start(&node.pods[frontend], FRONTEND_UID, &cgroups),
        Sandbox::start(&node.pods[plain], PLAIN_UID, &cgroups),
    ];

    let listener = in_netns(&node.ns.path(), || {
        std::net::TcpListener::bind("127.0.0.1:0")
    })
    .expect("bind the API server in the node netns");
    let api = FakeApiServer::start_on(listener, &objs);
    let dir = TempDir::new();
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let env_kubeconfig = format!("KUBECONFIG={}", kubeconfig.display());
    let capture = format!("{}:15001", node.ip());
    let bin = nodeproxy_tests::nodeproxy_bin().display().to_string();
    let mut proxy = node.spawn_proxy_bin(
        std::path::Path::new("/usr/bin/env"),
        &[
            &env_kubeconfig,
            &bin,
            "run",
            "--source",
            "kubernetes",
            "--node-name",
            NODE_NAME,
            "--capture",
            "ebpf",
            "--capture-listen",
            &capture,
            "--admin",
            ADMIN,
            "--access-log",
            "off",
        ],
    );
    eventually("proxy ready", Duration::from_secs(30), || {
        node.http_get(ADMIN, "/ready").filter(|(s, _)| *s == 200)
    });

    // The frontend (namespace `demo` is ambient) is enrolled; `plain`'s pod is not.
    let keys = eventually("frontend enrolled", Duration::from_secs(15), || {
        let e = enrolled(&node);
        e.iter().any(|k| k.contains(FRONTEND_UID)).then_some(e)
    });
    assert!(!keys.iter().any(|k| k.contains(PLAIN_UID)), "{keys:?}");

    // Its connects to the Service's ClusterIP are captured and split 80/20 by the
    // VirtualService: 99.9% binomial bound over 400 requests is 320 +- 27.
    let to = SocketAddr::new(vip.into(), 80);
    let fe = &node.pods[frontend];
    let mut v1_count = 0;
    for _ in 0..400 {
        let (status, body) = fe
            .http_get(to, "/", &[])
            .expect("request from the frontend pod");
        assert_eq!(status, 200, "{body}");
        if body.contains("v1") {
            v1_count += 1;
        }
    }
    assert!((293..=347).contains(&v1_count), "v1 got {v1_count} of 400");
    let (status, _) = fe
        .http_get(to, "/", &[("x-fault", "abort")])
        .expect("fault request");
    assert_eq!(status, 503, "the VirtualService's fault applies");

    // The pod of the non-ambient namespace is left alone: the ClusterIP is virtual, unreachable.
    assert!(
        !node.pods[plain]
            .http_get(to, "/", &[])
            .is_ok_and(|(s, _)| s == 200),
        "a pod outside the mesh must not be captured"
    );

    // The frontend pod is deleted: it leaves capture (its connects to the VIP fail again).
    api.event("DELETED", &find(&objs, "Pod", "frontend-7b9c8d6e5-klmno"));
    eventually("frontend unenrolled", Duration::from_secs(15), || {
        (!enrolled(&node).iter().any(|k| k.contains(FRONTEND_UID))).then_some(())
    });
    assert!(
        fe.connect(to, Duration::from_secs(2)).is_err(),
        "an unenrolled pod's connect to a VIP is not redirected"
    );
    assert!(proxy.terminate(), "clean exit on SIGTERM");
    drop(sandboxes);
    let _ = std::fs::remove_dir(&cgroups);
}
